//! The store contract: what every [`Store`] must do, written once and run against each store
//! (`store_contract_tests!(make_store)` in a store's test module expands to one test per rule).
//! Every store is built with `Policy::default()`; time is passed in explicitly.

use std::collections::HashSet;
use std::sync::Arc;

use quotad::domain::notice::{MAX_PENDING, NoticeKind};
use quotad::domain::time::{HOUR_MS, MINUTE_MS};
use quotad::domain::top_up::{AttemptOutcome, PaymentResult, TopUpSettings};
use quotad::domain::{
    Account, Action, CommitCommand, Decision, DenyReason, DomainError, Funding, GrantCommand,
    LotSource, Policy, PriceSheet, ReleaseCommand, ReserveCommand, ReserveOutcome, RevokeCommand,
    SetTopUpCommand, SettleTopUpCommand, Timestamp, Usage,
};
use quotad::store::{ExportRead, Store, StoreError};

use super::{CREDIT, T0};

/// Expands to one `#[tokio::test]` per contract rule, each on a fresh store from `$make`
/// (an expression evaluating to a future of a store).
/// `store_contract_tests!(in_data_dir MAKE)`: `MAKE` is a function of a fresh temporary
/// directory (a `PathBuf`), removed after the test.
macro_rules! store_contract_tests {
    (in_data_dir $make:expr) => {
        store_contract_tests!(@list [dir] $make);
    };
    ($make:expr) => {
        store_contract_tests!(@list [] $make);
    };
    (@list [$($dir:ident)?] $make:expr) => {
        store_contract_tests!(@tests [$($dir)?] $make;
            first_reserve_creates_the_account,
            reserve_holds_plan_allowance,
            free_plan_over_limit_is_denied_with_upgrade,
            plus_plan_splits_across_the_boundary_onto_credits,
            commit_charges_actual_usage_and_returns_the_excess,
            commit_beyond_the_hold_is_still_charged,
            non_final_commit_renews_the_hold_on_credits,
            final_commit_and_release_act_once,
            expired_holds_are_returned,
            reserve_retries_act_once,
            a_retried_reserve_gets_its_first_answer_whatever_happened_since,
            idempotency_records_last_exactly_the_retention,
            grants_are_idempotent_and_spent_in_order,
            expired_lots_are_never_spent,
            upsert_changes_plan_but_keeps_usage,
            unknown_accounts_and_reservations_are_not_found,
            usage_history_and_conservation,
            usage_follows_time_to_the_millisecond,
            concurrent_reserves_never_overcommit,
            lifetime_grants_stay_exact,
            revoking_a_grant_takes_back_what_is_left_of_its_lot_once,
            auto_top_up_buys_just_enough_once_and_backs_off_after_declines,
            auto_top_up_needs_an_account_that_may_buy_credits,
            a_top_up_preview_tells_what_saving_buys_and_changes_nothing,
            purchases_in_flight_are_found_until_settled,
            notifications_are_recorded_once_and_kept_until_delivered,
            undelivered_notifications_past_the_bound_drop_the_oldest_and_are_counted,
            every_charge_is_exported_once_per_consumer_group,
            rls_counts_a_request_only_if_every_descriptor_fits_and_slides,
        );
    };
    (@tests [] $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let store = $make.await;
                support::contract::$name(store).await;
            }
        )*
    };
    (@tests [dir] $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let dir = tempfile::tempdir().unwrap();
                let store = ($make)(dir.path().to_path_buf()).await;
                support::contract::$name(store).await;
                drop(dir);
            }
        )*
    };
}
pub(crate) use store_contract_tests;

fn at(ms: i64) -> Timestamp {
    T0.plus_millis(ms)
}

/// Usage on gpt-5.5-mini costing exactly `credits` credits.
fn costing(credits: i64) -> (Usage, i64) {
    let usage = Usage {
        model: "gpt-5.5-mini".into(),
        output_tokens: credits as u64 * 5_000,
        ..Usage::default()
    };
    let cost = PriceSheet::default().price(&usage).unwrap();
    assert_eq!(cost, credits * CREDIT);
    (usage, cost)
}

fn reserve_cmd(account: &str, request: &str, product: &str, credits: i64) -> ReserveCommand {
    let (estimate, cost) = costing(credits);
    ReserveCommand {
        account_id: account.into(),
        request_id: request.into(),
        product: product.into(),
        estimate,
        cost,
        plan_hint: None,
        ttl_ms: 15 * MINUTE_MS,
        reservation_id: format!("rsv-{account}-{request}"),
        wait_for_top_up: false,
    }
}

fn with_plan(mut cmd: ReserveCommand, plan: &str) -> ReserveCommand {
    cmd.plan_hint = Some(plan.into());
    cmd
}

fn commit_cmd(account: &str, reservation: &str, credits: i64, is_final: bool) -> CommitCommand {
    let (usage, cost) = costing(credits);
    CommitCommand {
        account_id: account.into(),
        reservation_id: reservation.into(),
        usage,
        cost,
        is_final,
        price_version: PriceSheet::default().version,
    }
}

fn grant_cmd(account: &str, grant: &str, credits: i64) -> GrantCommand {
    GrantCommand {
        account_id: account.into(),
        grant_id: grant.into(),
        amount: credits * CREDIT,
        source: LotSource::Purchase,
        expires_at: None,
    }
}

fn release_cmd(account: &str, reservation: &str) -> ReleaseCommand {
    ReleaseCommand {
        account_id: account.into(),
        reservation_id: reservation.into(),
    }
}

/// Reserves and expects an ALLOW: (reservation id, held).
async fn allow<S: Store>(store: &S, cmd: ReserveCommand, now: Timestamp) -> (String, Funding) {
    allowed(&store.reserve(&cmd, now).await.unwrap().decision)
}

/// Reserves `credits` on codex and commits exactly that, finally.
async fn spend<S: Store>(store: &S, account: &str, request: &str, credits: i64, now: Timestamp) {
    let (id, _) = allow(store, reserve_cmd(account, request, "codex", credits), now).await;
    store
        .commit(commit_cmd(account, &id, credits, true), now)
        .await
        .unwrap();
}

fn allowed(decision: &Decision) -> (String, Funding) {
    match decision {
        Decision::Allow {
            reservation_id,
            held,
            ..
        } => (reservation_id.to_string(), *held),
        Decision::Deny(d) => panic!("expected ALLOW, got {d:?}"),
    }
}

fn rule(err: StoreError) -> DomainError {
    match err {
        StoreError::Rule(e) => e,
        other => panic!("expected a rule error, got {other:?}"),
    }
}

async fn plus_account_with_credits<S: Store>(store: &S, id: &str, credits: i64) {
    let account = Account {
        id: id.into(),
        plan: "plus".into(),
        credit_purchase_allowed: true,
    };
    store.upsert_account(account, at(0)).await.unwrap();
    if credits > 0 {
        store
            .grant(grant_cmd(id, &format!("{id}-seed"), credits), at(0))
            .await
            .unwrap();
    }
}

pub async fn first_reserve_creates_the_account<S: Store>(store: S) {
    let out = store
        .reserve(&with_plan(reserve_cmd("a1", "r1", "codex", 1), "go"), at(0))
        .await
        .unwrap();
    allowed(&out.decision);
    let account = store.account("a1").await.unwrap();
    assert_eq!(
        account,
        Account {
            id: "a1".into(),
            plan: "go".into(),
            credit_purchase_allowed: true
        }
    );
    // The hint only applies on first sight.
    store
        .reserve(
            &with_plan(reserve_cmd("a1", "r2", "codex", 1), "pro"),
            at(0),
        )
        .await
        .unwrap();
    assert_eq!(store.account("a1").await.unwrap().plan.as_ref(), "go");
    // No hint: the default plan.
    store
        .reserve(&reserve_cmd("a2", "r1", "codex", 1), at(0))
        .await
        .unwrap();
    assert_eq!(
        store.account("a2").await.unwrap().plan.to_string(),
        Policy::default().default_plan
    );
}

pub async fn reserve_holds_plan_allowance<S: Store>(store: S) {
    let out = store
        .reserve(&reserve_cmd("a", "r1", "excel", 10), at(0))
        .await
        .unwrap();
    let (_, held) = allowed(&out.decision);
    assert_eq!(held, Funding::new(10 * CREDIT, 0));
    for w in &out.status.windows {
        assert_eq!((w.used, w.held), (10 * CREDIT, 10 * CREDIT), "{}", w.name);
    }
    assert_eq!(out.status.windows[0].limit, 15 * CREDIT);
    assert_eq!(out.status.windows[1].limit, 60 * CREDIT);
}

pub async fn free_plan_over_limit_is_denied_with_upgrade<S: Store>(store: S) {
    let (id, _) = allow(&store, reserve_cmd("a", "r1", "codex", 15), at(0)).await;
    store
        .commit(commit_cmd("a", &id, 15, true), at(MINUTE_MS))
        .await
        .unwrap();
    let out = store
        .reserve(&reserve_cmd("a", "r2", "excel", 1), at(2 * MINUTE_MS))
        .await
        .unwrap();
    let Decision::Deny(denial) = out.decision else {
        panic!("expected a deny")
    };
    assert_eq!(denial.reason, DenyReason::WindowExhausted);
    assert_eq!(denial.action, Action::UpgradePlan);
    assert_eq!(denial.upgrade_to.as_deref(), Some("go"));
    // Capacity really returns when the committed usage leaves the 5-hour window.
    let retry_at = denial.retry_at.expect("retry_at");
    assert!(
        retry_at > at(5 * HOUR_MS) && retry_at <= at(5 * HOUR_MS + 6 * MINUTE_MS),
        "{retry_at}"
    );
    let early = store
        .reserve(
            &reserve_cmd("a", "r3", "excel", 1),
            retry_at.plus_millis(-1),
        )
        .await
        .unwrap();
    assert!(matches!(early.decision, Decision::Deny(_)));
    let on_time = store
        .reserve(&reserve_cmd("a", "r4", "excel", 1), retry_at)
        .await
        .unwrap();
    allowed(&on_time.decision);
}

pub async fn plus_plan_splits_across_the_boundary_onto_credits<S: Store>(store: S) {
    plus_account_with_credits(&store, "p", 100).await;
    let (id, _) = allow(&store, reserve_cmd("p", "r1", "codex", 140), at(0)).await;
    store
        .commit(commit_cmd("p", &id, 140, true), at(MINUTE_MS))
        .await
        .unwrap();
    let out = store
        .reserve(&reserve_cmd("p", "r2", "excel", 30), at(2 * MINUTE_MS))
        .await
        .unwrap();
    let (_, held) = allowed(&out.decision);
    assert_eq!(held, Funding::new(10 * CREDIT, 20 * CREDIT));
    let snapshot = store.usage("p", 10, at(2 * MINUTE_MS)).await.unwrap();
    assert_eq!(snapshot.credit_held, 20 * CREDIT);
    assert_eq!(
        snapshot.totals.balance,
        100 * CREDIT,
        "a hold does not spend"
    );
}

pub async fn commit_charges_actual_usage_and_returns_the_excess<S: Store>(store: S) {
    plus_account_with_credits(&store, "p", 50).await;
    let (id, _) = allow(&store, reserve_cmd("p", "r1", "codex", 145), at(0)).await;
    let (id2, held2) = allow(&store, reserve_cmd("p", "r2", "codex", 20), at(0)).await;
    assert_eq!(held2, Funding::new(5 * CREDIT, 15 * CREDIT));
    let out = store
        .commit(commit_cmd("p", &id2, 8, true), at(MINUTE_MS))
        .await
        .unwrap();
    assert_eq!(
        out.receipt.charged,
        Funding::new(5 * CREDIT, 3 * CREDIT),
        "plan part of the hold first"
    );
    assert_eq!(out.status.credit_balance, 47 * CREDIT);
    let out = store
        .commit(commit_cmd("p", &id, 100, true), at(MINUTE_MS))
        .await
        .unwrap();
    assert_eq!(out.receipt.charged, Funding::new(100 * CREDIT, 0));
    assert_eq!(
        out.status.windows[0].used,
        105 * CREDIT,
        "the hold's excess returned"
    );
    assert_eq!(out.status.windows[0].held, 0);
}

pub async fn commit_beyond_the_hold_is_still_charged<S: Store>(store: S) {
    // Free plan: usage over the hold is charged to the plan, even past its limit.
    let (id, _) = allow(&store, reserve_cmd("f", "r1", "codex", 10), at(0)).await;
    let out = store
        .commit(commit_cmd("f", &id, 20, true), at(MINUTE_MS))
        .await
        .unwrap();
    assert_eq!(out.receipt.charged, Funding::new(20 * CREDIT, 0));
    assert_eq!(out.status.windows[0].used, 20 * CREDIT);
    // Plus plan: plan allowance first, then credits, and the balance may go below zero.
    plus_account_with_credits(&store, "p", 5).await;
    let (id, held) = allow(&store, reserve_cmd("p", "r1", "codex", 150), at(0)).await;
    assert_eq!(held, Funding::new(150 * CREDIT, 0));
    let out = store
        .commit(commit_cmd("p", &id, 160, true), at(MINUTE_MS))
        .await
        .unwrap();
    assert_eq!(out.receipt.charged, Funding::new(150 * CREDIT, 10 * CREDIT));
    assert_eq!(out.status.credit_balance, -5 * CREDIT);
    let snapshot = store.usage("p", 10, at(MINUTE_MS)).await.unwrap();
    let t = snapshot.totals;
    assert_eq!(t.granted, t.balance + t.spent + t.expired + t.revoked);
    // The next grant pays the debt first.
    let out = store
        .grant(grant_cmd("p", "g2", 20), at(2 * MINUTE_MS))
        .await
        .unwrap();
    assert_eq!(out.credit_balance, 15 * CREDIT);
    assert_eq!(out.lot.remaining, 15 * CREDIT);
}

pub async fn non_final_commit_renews_the_hold_on_credits<S: Store>(store: S) {
    plus_account_with_credits(&store, "p", 30).await;
    // 130 of 150 plan credits used by another task.
    let (other, _) = allow(&store, reserve_cmd("p", "big", "codex", 130), at(0)).await;
    store
        .commit(commit_cmd("p", &other, 130, true), at(0))
        .await
        .unwrap();
    let (id, held) = allow(&store, reserve_cmd("p", "task", "codex", 15), at(0)).await;
    assert_eq!(held, Funding::new(15 * CREDIT, 0));
    // First chunk used 15: the plan has 5 left, so the renewed hold is 5 plan + 10 credits.
    let out = store
        .commit(commit_cmd("p", &id, 15, false), at(10 * MINUTE_MS))
        .await
        .unwrap();
    assert!(out.receipt.may_continue);
    assert_eq!(out.receipt.charged, Funding::new(15 * CREDIT, 0));
    assert_eq!(out.receipt.held, Funding::new(5 * CREDIT, 10 * CREDIT));
    assert_eq!(
        out.receipt.expires_at,
        Some(at(25 * MINUTE_MS)),
        "TTL renewed"
    );
    // Second chunk (cumulative 30): paid from the renewed hold; the next hold is all credits.
    let out = store
        .commit(commit_cmd("p", &id, 30, false), at(20 * MINUTE_MS))
        .await
        .unwrap();
    assert_eq!(out.receipt.charged, Funding::new(5 * CREDIT, 10 * CREDIT));
    assert_eq!(out.receipt.held, Funding::new(0, 15 * CREDIT));
    assert!(out.receipt.may_continue);
    // Third chunk leaves 5 credits: not enough for another 15, so the task may not go on.
    let out = store
        .commit(commit_cmd("p", &id, 55, false), at(30 * MINUTE_MS))
        .await
        .unwrap();
    assert_eq!(out.receipt.charged, Funding::new(0, 25 * CREDIT));
    assert!(!out.receipt.may_continue);
    assert_eq!(
        out.receipt.denial.as_ref().map(|d| d.action),
        Some(Action::BuyCredits)
    );
    assert_eq!(out.status.credit_balance, -5 * CREDIT);
    // The final commit still lands and charges nothing more for a repeated cumulative usage.
    let out = store
        .commit(commit_cmd("p", &id, 55, true), at(31 * MINUTE_MS))
        .await
        .unwrap();
    assert_eq!(out.receipt.charged, Funding::ZERO);
    assert_eq!(
        out.receipt.charged_total,
        Funding::new(20 * CREDIT, 35 * CREDIT)
    );
}

pub async fn final_commit_and_release_act_once<S: Store>(store: S) {
    let (id, _) = allow(&store, reserve_cmd("a", "r1", "codex", 10), at(0)).await;
    let first = store
        .commit(commit_cmd("a", &id, 4, true), at(MINUTE_MS))
        .await
        .unwrap();
    let retry = store
        .commit(commit_cmd("a", &id, 4, true), at(2 * MINUTE_MS))
        .await
        .unwrap();
    assert_eq!(first.receipt, retry.receipt);
    assert_eq!(retry.status.windows[0].used, 4 * CREDIT, "charged once");
    let conflict = store
        .commit(commit_cmd("a", &id, 5, true), at(2 * MINUTE_MS))
        .await
        .unwrap_err();
    assert!(matches!(rule(conflict), DomainError::AlreadyExists(_)));
    let conflict = store
        .release(release_cmd("a", &id), at(2 * MINUTE_MS))
        .await
        .unwrap_err();
    assert!(matches!(rule(conflict), DomainError::AlreadyExists(_)));

    let (id, _) = allow(&store, reserve_cmd("a", "r2", "codex", 7), at(0)).await;
    let released = store
        .release(release_cmd("a", &id), at(MINUTE_MS))
        .await
        .unwrap();
    assert_eq!(released.released, Funding::new(7 * CREDIT, 0));
    let again = store
        .release(release_cmd("a", &id), at(MINUTE_MS))
        .await
        .unwrap();
    assert_eq!(again, released);
    let conflict = store
        .commit(commit_cmd("a", &id, 1, true), at(MINUTE_MS))
        .await
        .unwrap_err();
    assert!(matches!(rule(conflict), DomainError::AlreadyExists(_)));
    let snapshot = store.usage("a", 10, at(MINUTE_MS)).await.unwrap();
    assert_eq!(snapshot.status.windows[0].used, 4 * CREDIT);
}

pub async fn expired_holds_are_returned<S: Store>(store: S) {
    let mut cmd = reserve_cmd("a", "r1", "codex", 12);
    cmd.ttl_ms = 60_000;
    let (id, _) = allow(&store, cmd, at(0)).await;
    let before = store.usage("a", 10, at(59_999)).await.unwrap();
    assert_eq!(before.status.windows[0].held, 12 * CREDIT);
    let after = store.usage("a", 10, at(60_000)).await.unwrap();
    assert_eq!(after.status.windows[0].used, 0);
    assert!(after.holds.is_empty());
    let late = store
        .commit(commit_cmd("a", &id, 1, true), at(61_000))
        .await
        .unwrap_err();
    assert!(matches!(rule(late), DomainError::FailedPrecondition(_)));
    let released = store
        .release(release_cmd("a", &id), at(61_000))
        .await
        .unwrap();
    assert_eq!(released.released, Funding::new(12 * CREDIT, 0));
}

pub async fn reserve_retries_act_once<S: Store>(store: S) {
    let first = store
        .reserve(&reserve_cmd("a", "r1", "codex", 10), at(0))
        .await
        .unwrap();
    let mut retry_cmd = reserve_cmd("a", "r1", "codex", 10);
    retry_cmd.reservation_id = "another-fresh-id".into();
    let retry = store.reserve(&retry_cmd, at(1_000)).await.unwrap();
    assert_eq!(first.decision, retry.decision);
    assert_eq!(retry.status.windows[0].used, 10 * CREDIT, "held once");
    let conflict = store
        .reserve(&reserve_cmd("a", "r1", "excel", 10), at(1_000))
        .await
        .unwrap_err();
    assert!(matches!(rule(conflict), DomainError::AlreadyExists(_)));
    // A deny is an answer too: its retry is the same deny, even after capacity returned.
    let deny = store
        .reserve(&reserve_cmd("a", "r2", "codex", 10), at(0))
        .await
        .unwrap();
    assert!(matches!(deny.decision, Decision::Deny(_)));
    let (id, _) = allowed(&first.decision);
    store
        .release(release_cmd("a", &id), at(2_000))
        .await
        .unwrap();
    let again = store
        .reserve(&reserve_cmd("a", "r2", "codex", 10), at(3_000))
        .await
        .unwrap();
    assert_eq!(again.decision, deny.decision);
}

/// Retries `first` (command and first answer) at `now`: the same request gets its first
/// answer back; the same request id with another estimate or another product is
/// ALREADY_EXISTS.
async fn assert_first_answer<S: Store>(
    store: &S,
    (cmd, first): &(ReserveCommand, ReserveOutcome),
    now: Timestamp,
    after: &str,
) {
    let id = &cmd.request_id;
    let again = store
        .reserve(cmd, now)
        .await
        .unwrap_or_else(|e| panic!("{after}: the retry of {id} failed: {e:?}"));
    assert_eq!(again.decision, first.decision, "{after}: the retry of {id}");
    assert_eq!(again.estimate, first.estimate, "{after}: the retry of {id}");
    let larger = ReserveCommand {
        estimate: costing(cmd.cost / CREDIT + 1).0,
        cost: cmd.cost + CREDIT,
        ..cmd.clone()
    };
    let smaller = ReserveCommand {
        estimate: costing(cmd.cost / CREDIT - 1).0,
        cost: cmd.cost - CREDIT,
        ..cmd.clone()
    };
    let other_product = ReserveCommand {
        product: "excel".into(),
        ..cmd.clone()
    };
    for (what, reused) in [
        ("a larger estimate", larger),
        ("a smaller estimate", smaller),
        ("another product", other_product),
    ] {
        match store.reserve(&reused, now).await {
            Err(e) => assert!(
                matches!(rule(e.clone()), DomainError::AlreadyExists(_)),
                "{after}: {id} reused with {what}: {e:?}"
            ),
            Ok(out) => panic!(
                "{after}: {id} reused with {what} must be ALREADY_EXISTS, got {:?}",
                out.decision
            ),
        }
    }
}

/// A Reserve retried with its request id and payload gets its first answer back whatever
/// happened to the account since: other reserves filled the window, its hold was released,
/// time passed (within the retention), an admin changed the plan. The same request id with
/// another payload is ALREADY_EXISTS, after an ALLOW as after a DENY. Only the record of the
/// first answer may answer a retry: a store that also remembered denials would deny the
/// retried ALLOW below once the window is full.
pub async fn a_retried_reserve_gets_its_first_answer_whatever_happened_since<S: Store>(store: S) {
    // Free plan: 15 credits in 5 hours, no credits. 5 held, then 11 used: full until the used
    // credits leave the window, whatever becomes of the hold.
    let cmd = reserve_cmd("f", "allowed", "codex", 5);
    let first = (cmd.clone(), store.reserve(&cmd, at(0)).await.unwrap());
    allowed(&first.1.decision);
    let (filler, _) = allow(&store, reserve_cmd("f", "filler", "codex", 10), at(0)).await;
    store
        .commit(commit_cmd("f", &filler, 11, true), at(0))
        .await
        .unwrap();
    let cmd = reserve_cmd("f", "denied", "codex", 5);
    let last = (cmd.clone(), store.reserve(&cmd, at(0)).await.unwrap());
    assert!(
        matches!(last.1.decision, Decision::Deny(_)),
        "the window is full"
    );

    for answer in [&first, &last] {
        assert_first_answer(&store, answer, at(1), "the window filled").await;
    }
    let (id, _) = allowed(&first.1.decision);
    store
        .release(release_cmd("f", &id), at(MINUTE_MS))
        .await
        .unwrap();
    for answer in [&first, &last] {
        assert_first_answer(&store, answer, at(MINUTE_MS), "its hold was released").await;
    }
    // Every hold has expired and the window has reset: "denied" would be allowed now.
    let later = at(6 * HOUR_MS);
    allow(&store, reserve_cmd("f", "fresh", "codex", 5), later).await;
    for answer in [&first, &last] {
        assert_first_answer(&store, answer, later, "the window reset").await;
    }
    let upgraded = Account {
        id: "f".into(),
        plan: "pro".into(),
        credit_purchase_allowed: true,
    };
    store.upsert_account(upgraded, later).await.unwrap();
    for answer in [&first, &last] {
        assert_first_answer(&store, answer, later, "an admin changed the plan").await;
    }
    let retention = i64::from(Policy::default().limits.idempotency_retention_seconds) * 1_000;
    for answer in [&first, &last] {
        assert_first_answer(&store, answer, at(retention - 1), "the retention's last ms").await;
    }
}

/// A Reserve's first answer and a reservation's end are kept for the idempotency retention
/// from when they were made, to the millisecond, and forgotten after it: the request id may then
/// be used again, and the reservation is unknown.
pub async fn idempotency_records_last_exactly_the_retention<S: Store>(store: S) {
    let retention = i64::from(Policy::default().limits.idempotency_retention_seconds) * 1_000;
    let (id, _) = allow(&store, reserve_cmd("a", "r1", "codex", 10), at(0)).await;
    let released = store
        .release(release_cmd("a", &id), at(MINUTE_MS))
        .await
        .unwrap();

    let mut reused = reserve_cmd("a", "r1", "excel", 3);
    reused.reservation_id = "rsv-a-r1-again".into();
    let remembered = store.reserve(&reused, at(retention - 1)).await.unwrap_err();
    assert!(matches!(rule(remembered), DomainError::AlreadyExists(_)));
    let (again, _) = allow(&store, reused, at(retention)).await;
    assert_eq!(
        again, "rsv-a-r1-again",
        "a new request once the first is forgotten"
    );

    let retry = store
        .release(release_cmd("a", &id), at(MINUTE_MS + retention - 1))
        .await
        .unwrap();
    assert_eq!(retry, released);
    let forgotten = store
        .release(release_cmd("a", &id), at(MINUTE_MS + retention))
        .await
        .unwrap_err();
    assert!(matches!(rule(forgotten), DomainError::NotFound { .. }));
}

pub async fn grants_are_idempotent_and_spent_in_order<S: Store>(store: S) {
    plus_account_with_credits(&store, "p", 0).await;
    let later = GrantCommand {
        expires_at: Some(at(30 * 24 * HOUR_MS)),
        ..grant_cmd("p", "late", 10)
    };
    let sooner = GrantCommand {
        expires_at: Some(at(10 * 24 * HOUR_MS)),
        ..grant_cmd("p", "soon", 10)
    };
    let promo = GrantCommand {
        source: LotSource::Promo,
        expires_at: Some(at(30 * 24 * HOUR_MS)),
        ..grant_cmd("p", "promo", 10)
    };
    for g in [&later, &sooner, &promo] {
        store.grant(g.clone(), at(0)).await.unwrap();
    }
    let retry = store.grant(later.clone(), at(1_000)).await.unwrap();
    assert_eq!(retry.credit_balance, 30 * CREDIT, "granted once");
    let conflict = store
        .grant(
            GrantCommand {
                amount: 11 * CREDIT,
                ..later.clone()
            },
            at(1_000),
        )
        .await
        .unwrap_err();
    assert!(matches!(rule(conflict), DomainError::AlreadyExists(_)));
    let default_expiry = store
        .grant(grant_cmd("p", "default", 1), at(0))
        .await
        .unwrap();
    assert_eq!(default_expiry.lot.expires_at, at(0).plus_months(12));

    // Use up the plan, then 15 credits: the soonest lot first, then promo before purchased.
    spend(&store, "p", "r1", 150, at(0)).await;
    spend(&store, "p", "r2", 15, at(0)).await;
    let lots = store.usage("p", 10, at(0)).await.unwrap().lots;
    let remaining: Vec<(&str, i64)> = lots.iter().map(|l| (l.id.as_str(), l.remaining)).collect();
    assert_eq!(
        remaining,
        [
            ("promo", 5 * CREDIT),
            ("late", 10 * CREDIT),
            ("default", CREDIT)
        ]
    );
}

pub async fn expired_lots_are_never_spent<S: Store>(store: S) {
    plus_account_with_credits(&store, "p", 0).await;
    let short = GrantCommand {
        expires_at: Some(at(HOUR_MS)),
        ..grant_cmd("p", "short", 50)
    };
    store.grant(short, at(0)).await.unwrap();
    spend(&store, "p", "r1", 150, at(0)).await;
    let out = store
        .reserve(&reserve_cmd("p", "r2", "codex", 10), at(HOUR_MS))
        .await
        .unwrap();
    let Decision::Deny(denial) = out.decision else {
        panic!("the lot expired")
    };
    assert_eq!(
        (denial.reason, denial.action),
        (DenyReason::CreditsExhausted, Action::BuyCredits)
    );
    let t = store.usage("p", 10, at(HOUR_MS)).await.unwrap().totals;
    assert_eq!(
        (t.granted, t.expired, t.balance, t.spent),
        (50 * CREDIT, 50 * CREDIT, 0, 0)
    );
}

pub async fn upsert_changes_plan_but_keeps_usage<S: Store>(store: S) {
    spend(&store, "a", "r1", 15, at(0)).await;
    let upgraded = Account {
        id: "a".into(),
        plan: "plus".into(),
        credit_purchase_allowed: false,
    };
    assert_eq!(
        store.upsert_account(upgraded.clone(), at(0)).await.unwrap(),
        upgraded
    );
    let snapshot = store.usage("a", 10, at(0)).await.unwrap();
    assert_eq!(snapshot.account, upgraded);
    assert_eq!(snapshot.status.windows[0].used, 15 * CREDIT);
    assert_eq!(snapshot.status.windows[0].limit, 150 * CREDIT);
}

pub async fn unknown_accounts_and_reservations_are_not_found<S: Store>(store: S) {
    let is_not_found = |e: StoreError| matches!(rule(e), DomainError::NotFound { .. });
    assert!(is_not_found(store.account("nobody").await.unwrap_err()));
    assert!(is_not_found(
        store.usage("nobody", 10, at(0)).await.unwrap_err()
    ));
    assert!(is_not_found(
        store
            .grant(grant_cmd("nobody", "g", 1), at(0))
            .await
            .unwrap_err()
    ));
    assert!(is_not_found(
        store
            .commit(commit_cmd("nobody", "r", 1, true), at(0))
            .await
            .unwrap_err()
    ));
    store
        .reserve(&reserve_cmd("a", "r1", "codex", 1), at(0))
        .await
        .unwrap();
    assert!(is_not_found(
        store
            .commit(commit_cmd("a", "nope", 1, true), at(0))
            .await
            .unwrap_err()
    ));
    assert!(is_not_found(
        store
            .release(release_cmd("a", "nope"), at(0))
            .await
            .unwrap_err()
    ));
}

pub async fn usage_history_and_conservation<S: Store>(store: S) {
    plus_account_with_credits(&store, "p", 40).await;
    for (i, credits) in [100, 60, 20].into_iter().enumerate() {
        let request = format!("r{i}");
        let now = at(i as i64 * MINUTE_MS);
        let (id, _) = allow(&store, reserve_cmd("p", &request, "codex", credits), now).await;
        store
            .commit(commit_cmd("p", &id, credits, true), now)
            .await
            .unwrap();
    }
    let s = store.usage("p", 2, at(3 * MINUTE_MS)).await.unwrap();
    assert_eq!(s.recent.len(), 2, "recent_limit honoured");
    assert_eq!(
        s.recent[0].charged,
        Funding::new(0, 20 * CREDIT),
        "newest first"
    );
    assert_eq!(s.recent[1].charged, Funding::new(50 * CREDIT, 10 * CREDIT));
    assert_eq!(s.recent[0].usage.output_tokens, 100_000);
    assert_eq!(*s.recent[0].price_version, *PriceSheet::default().version);
    let t = s.totals;
    assert_eq!(
        (t.granted, t.spent, t.balance),
        (40 * CREDIT, 30 * CREDIT, 10 * CREDIT)
    );
    assert_eq!(t.granted, t.balance + t.spent + t.expired + t.revoked);
}

/// A GetUsage reads the account as it is at its instant, to the millisecond: a hold that
/// expires, a lot that expires and committed usage that leaves the window are gone from a read
/// made at that instant, even right after a read made one millisecond before.
pub async fn usage_follows_time_to_the_millisecond<S: Store>(store: S) {
    plus_account_with_credits(&store, "p", 0).await;
    let lot = GrantCommand {
        expires_at: Some(at(2 * MINUTE_MS)),
        ..grant_cmd("p", "short", 7)
    };
    store.grant(lot, at(0)).await.unwrap();
    spend(&store, "p", "done", 4, at(0)).await;
    let mut cmd = reserve_cmd("p", "held", "codex", 3);
    cmd.ttl_ms = MINUTE_MS;
    allow(&store, cmd, at(0)).await;

    let before = store.usage("p", 10, at(MINUTE_MS - 1)).await.unwrap();
    assert_eq!(before.holds.len(), 1);
    assert_eq!(before.status.windows[0].used, 7 * CREDIT);
    let after = store.usage("p", 10, at(MINUTE_MS)).await.unwrap();
    assert!(after.holds.is_empty(), "the hold expired at its instant");
    assert_eq!(after.status.windows[0].used, 4 * CREDIT);

    let before = store.usage("p", 10, at(2 * MINUTE_MS - 1)).await.unwrap();
    assert_eq!(before.totals.balance, 7 * CREDIT);
    let after = store.usage("p", 10, at(2 * MINUTE_MS)).await.unwrap();
    assert!(after.lots.is_empty(), "the lot expired at its instant");
    assert_eq!(
        (after.totals.balance, after.totals.expired),
        (0, 7 * CREDIT)
    );

    // T0 is on the hour: the committed usage's 5-minute bucket leaves the 5-hour window 5 hours
    // after the bucket's end.
    let leaves = 5 * MINUTE_MS + 5 * HOUR_MS;
    let before = store.usage("p", 10, at(leaves - 1)).await.unwrap();
    assert_eq!(before.status.windows[0].used, 4 * CREDIT);
    let after = store.usage("p", 10, at(leaves)).await.unwrap();
    assert_eq!(after.status.windows[0].used, 0, "the usage left the window");
    assert_eq!(after.status.windows[1].used, 4 * CREDIT, "but not the week");
}

pub async fn concurrent_reserves_never_overcommit<S: Store>(store: S) {
    let store = Arc::new(store);
    plus_account_with_credits(store.as_ref(), "p", 50).await;
    // 150 plan + 50 credits = 200 credits of capacity; 100 tasks ask for 3 each.
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .reserve(&reserve_cmd("p", &format!("r{i}"), "codex", 3), at(0))
                    .await
            })
        })
        .collect();
    let mut ids = HashSet::new();
    let mut held = Funding::ZERO;
    for task in tasks {
        if let Decision::Allow {
            reservation_id,
            held: h,
            ..
        } = task.await.unwrap().unwrap().decision
        {
            assert!(ids.insert(reservation_id));
            held = held.plus(h);
        }
    }
    assert_eq!(ids.len(), 66, "floor(200 / 3) tasks fit");
    assert!(
        held.plan <= 150 * CREDIT && held.credit <= 50 * CREDIT,
        "{held:?}"
    );
    let s = store.usage("p", 0, at(0)).await.unwrap();
    assert_eq!(s.credit_held, held.credit);
    assert!(s.status.windows.iter().all(|w| w.used <= w.limit));
}

pub async fn lifetime_grants_stay_exact<S: Store>(store: S) {
    plus_account_with_credits(&store, "rich", 0).await;
    let big = 1_000_000_000 * CREDIT; // the largest single grant
    for i in 0..9 {
        let g = GrantCommand {
            amount: big,
            ..grant_cmd("rich", &format!("g{i}"), 0)
        };
        store.grant(g, at(0)).await.unwrap();
    }
    // One micro-credit more per grant would pass 2^53 - 1 in all: refused, nothing changes.
    let one_more = GrantCommand {
        amount: 7_199_254_740_992,
        ..grant_cmd("rich", "g9", 0)
    };
    let err = store.grant(one_more, at(0)).await.unwrap_err();
    assert!(
        matches!(rule(err), DomainError::InvalidArgument { ref field, .. } if field == "amount_micros")
    );
    let last = GrantCommand {
        amount: 7_199_254_740_991,
        ..grant_cmd("rich", "g9", 0)
    };
    assert_eq!(
        store.grant(last, at(0)).await.unwrap().credit_balance,
        (1 << 53) - 1
    );
    spend(&store, "rich", "r", 150, at(0)).await;
    spend(&store, "rich", "r2", 1, at(0)).await;
    let t = store.usage("rich", 1, at(0)).await.unwrap().totals;
    assert_eq!(
        (t.balance, t.spent),
        ((1 << 53) - 1 - CREDIT, CREDIT),
        "exact at the top of the range"
    );
}

pub async fn revoking_a_grant_takes_back_what_is_left_of_its_lot_once<S: Store>(store: S) {
    plus_account_with_credits(&store, "p", 0).await;
    let soon = GrantCommand {
        expires_at: Some(at(10 * 24 * HOUR_MS)),
        ..grant_cmd("p", "soon", 10)
    };
    store.grant(soon, at(0)).await.unwrap();
    store
        .grant(grant_cmd("p", "later", 20), at(0))
        .await
        .unwrap();
    spend(&store, "p", "plan", 150, at(0)).await;
    spend(&store, "p", "credits", 4, at(0)).await; // from the lot expiring soonest
    let revoke = |grant: &str| RevokeCommand {
        account_id: "p".into(),
        grant_id: grant.into(),
    };
    let first = store.revoke_grant(revoke("soon"), at(0)).await.unwrap();
    assert_eq!(
        (first.revoked, first.credit_balance),
        (6 * CREDIT, 20 * CREDIT)
    );
    let again = store.revoke_grant(revoke("soon"), at(0)).await.unwrap();
    assert_eq!(again, first, "a retry takes nothing more");
    let lots = store.usage("p", 0, at(0)).await.unwrap().lots;
    assert_eq!(
        lots.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(),
        ["later"],
        "only that lot"
    );
    assert_eq!(
        store
            .revoke_grant(revoke("later"), at(0))
            .await
            .unwrap()
            .credit_balance,
        0
    );
    let t = store.usage("p", 0, at(0)).await.unwrap().totals;
    assert_eq!(
        (t.granted, t.spent, t.revoked, t.balance),
        (30 * CREDIT, 4 * CREDIT, 26 * CREDIT, 0)
    );
    assert_eq!(t.granted, t.balance + t.spent + t.expired + t.revoked);
    let missing = store
        .revoke_grant(revoke("never-granted"), at(0))
        .await
        .unwrap_err();
    assert!(matches!(
        rule(missing),
        DomainError::NotFound { what: "grant", .. }
    ));
}

fn top_up(account: &str, enabled: bool, threshold: i64, target: i64) -> SetTopUpCommand {
    let settings = TopUpSettings::new(enabled, threshold * CREDIT, target * CREDIT, None).unwrap();
    SetTopUpCommand {
        account_id: account.into(),
        settings,
    }
}

fn paid(account: &str, purchase: &str, result: PaymentResult) -> SettleTopUpCommand {
    SettleTopUpCommand {
        account_id: account.into(),
        purchase_id: purchase.into(),
        result,
    }
}

pub async fn auto_top_up_buys_just_enough_once_and_backs_off_after_declines<S: Store>(store: S) {
    plus_account_with_credits(&store, "p", 5).await;
    // Turned on below the threshold: one purchase at once, just enough to reach the target.
    let on = store
        .set_top_up(top_up("p", true, 10, 50), at(0))
        .await
        .unwrap();
    let first = on.top_up.expect("a purchase");
    assert_eq!(
        (first.id.as_str(), first.amount),
        ("topup:p:1", 45 * CREDIT)
    );
    assert_eq!(on.view.in_flight.as_ref(), Some(&first));
    assert_eq!(
        store
            .set_top_up(top_up("p", true, 10, 50), at(0))
            .await
            .unwrap()
            .top_up,
        None,
        "saved again"
    );
    // While it is in flight, crossings coalesce into it.
    spend(&store, "p", "plan", 150, at(0)).await;
    let (id, _) = allow(&store, reserve_cmd("p", "c1", "codex", 2), at(0)).await;
    let out = store
        .commit(commit_cmd("p", &id, 2, true), at(0))
        .await
        .unwrap();
    assert_eq!(out.top_up, None);
    let approved = PaymentResult::Approved {
        payment_id: "pay-1".into(),
    };
    let settled = store
        .settle_top_up(paid("p", &first.id, approved.clone()), at(MINUTE_MS))
        .await
        .unwrap();
    assert_eq!(settled.credit_balance, 48 * CREDIT);
    assert_eq!(
        settled.view.last_attempt.as_ref().map(|a| a.outcome),
        Some(AttemptOutcome::Succeeded)
    );
    assert_eq!(settled.top_up, None, "above the threshold after it settles");
    let again = store
        .settle_top_up(paid("p", &first.id, approved), at(MINUTE_MS))
        .await
        .unwrap();
    assert_eq!(again.credit_balance, 48 * CREDIT, "settled once");
    let lots = store.usage("p", 0, at(MINUTE_MS)).await.unwrap().lots;
    assert!(
        lots.iter().any(|l| l.id == first.id
            && l.source == LotSource::AutoTopUp
            && l.granted == 45 * CREDIT)
    );

    // A hold on credits that takes available credits below the threshold starts the next one.
    let held = store
        .reserve(&reserve_cmd("p", "c2", "codex", 40), at(MINUTE_MS))
        .await
        .unwrap();
    let second = held.top_up.expect("crossed the threshold");
    assert_eq!(
        (second.id.as_str(), second.amount),
        ("topup:p:2", 42 * CREDIT)
    );
    let (id, _) = allowed(&held.decision);
    let out = store
        .commit(commit_cmd("p", &id, 40, true), at(MINUTE_MS))
        .await
        .unwrap();
    assert_eq!(out.top_up, None, "one purchase in flight at most");
    // Three declines in a row: nothing granted, a back-off between them, then it turns off.
    let declined = PaymentResult::Declined {
        error: "card declined".into(),
    };
    let mut purchase = second;
    let mut now = at(MINUTE_MS);
    for n in 1..=3u32 {
        let out = store
            .settle_top_up(paid("p", &purchase.id, declined.clone()), now)
            .await
            .unwrap();
        assert_eq!(out.credit_balance, 8 * CREDIT, "a decline grants nothing");
        assert_eq!(out.view.consecutive_declines, n);
        assert_eq!(out.top_up, None, "backing off");
        if n == 3 {
            assert!(
                !out.view.settings.enabled(),
                "turned off after three declines"
            );
            break;
        }
        now = now.plus_millis(HOUR_MS);
        let out = store
            .reserve(&reserve_cmd("p", &format!("d{n}"), "codex", 1), now)
            .await
            .unwrap();
        purchase = out
            .top_up
            .expect("after the back-off, the next crossing buys again");
    }
    // Credits run out: the denial asks for a new payment method, not for more credits.
    let out = store
        .reserve(&reserve_cmd("p", "big", "codex", 30), now)
        .await
        .unwrap();
    let Decision::Deny(denial) = out.decision else {
        panic!("not enough credits")
    };
    assert_eq!(denial.action, Action::UpdatePaymentMethod);
}

/// The look a replica takes for purchases a dead replica left unpaid: every purchase in flight
/// that started at or before the cutoff, and no other.
/// A preview answers what saving the settings would do now, by the rule saving runs, and
/// changes nothing: saving afterwards buys exactly what the preview said.
pub async fn a_top_up_preview_tells_what_saving_buys_and_changes_nothing<S: Store>(store: S) {
    plus_account_with_credits(&store, "p", 5).await;
    let before = store.usage("p", 10, at(0)).await.unwrap();
    let preview = store
        .preview_top_up(top_up("p", true, 10, 50), at(0))
        .await
        .unwrap();
    assert_eq!(
        (preview.available, preview.purchase, preview.in_flight),
        (5 * CREDIT, Some(45 * CREDIT), None)
    );
    // At the default price of credits (2,500 for 100.00 USD), 4 cents each.
    assert_eq!(preview.purchase_price.map(|p| p.minor), Some(180));
    assert!(preview.view.settings.enabled());
    assert_eq!(
        preview.summary(),
        "your balance is 5 credits, below the 10-credit threshold: saving buys 45 credits for \
         1.80 USD now with your default payment method"
    );
    let after = store.usage("p", 10, at(0)).await.unwrap();
    assert_eq!(after, before, "a preview changes nothing");
    let nothing_started = store.stalled_purchases(at(HOUR_MS)).await.unwrap();
    assert!(nothing_started.is_empty(), "{nothing_started:?}");

    // Saving then does exactly what the preview said.
    let saved = store
        .set_top_up(top_up("p", true, 10, 50), at(0))
        .await
        .unwrap();
    let bought = saved.top_up.expect("a purchase");
    assert_eq!(Some(bought.amount), preview.purchase);
    // Now it is being paid: a preview of the same settings says so, and buys nothing more.
    let again = store
        .preview_top_up(top_up("p", true, 10, 50), at(0))
        .await
        .unwrap();
    assert_eq!((again.purchase, again.in_flight), (None, Some(45 * CREDIT)));
    // Above the threshold, or turned off, nothing would be bought.
    let off = store
        .preview_top_up(top_up("p", false, 10, 50), at(0))
        .await
        .unwrap();
    assert_eq!(off.purchase, None);
    assert!(off.summary().contains("stays off"), "{}", off.summary());
    let unknown = store
        .preview_top_up(top_up("nobody", true, 10, 50), at(0))
        .await
        .unwrap_err();
    assert!(rule(unknown).is_account_not_found());
}

pub async fn purchases_in_flight_are_found_until_settled<S: Store>(store: S) {
    plus_account_with_credits(&store, "buying", 5).await;
    plus_account_with_credits(&store, "idle", 5).await;
    let started = store
        .set_top_up(top_up("buying", true, 10, 50), at(0))
        .await
        .unwrap()
        .top_up
        .expect("a purchase");
    // A store may answer for a part of its accounts per call (the Redis store, for a slice of
    // its slot ring; the whole ring in the tests' settings).
    let stalled = async |cutoff| store.stalled_purchases(cutoff).await.unwrap();
    assert!(stalled(at(0).plus_millis(-1)).await.is_empty());
    assert_eq!(
        stalled(at(MINUTE_MS)).await,
        vec![("buying".to_owned(), started.clone())]
    );
    let approved = PaymentResult::Approved {
        payment_id: "pay-1".into(),
    };
    store
        .settle_top_up(paid("buying", &started.id, approved), at(MINUTE_MS))
        .await
        .unwrap();
    assert!(stalled(at(MINUTE_MS)).await.is_empty());
}

/// Each account's pending notifications as (number, type), for comparing.
async fn pending<S: Store>(store: &S) -> Vec<(String, Vec<(u64, &'static str)>)> {
    let mut found: Vec<_> = (store.pending_notices().await.unwrap().into_iter())
        .map(|(account, notices)| {
            let kinds = notices.iter().map(|n| (n.seq, n.kind.type_name()));
            (account, kinds.collect())
        })
        .collect();
    found.sort();
    found
}

pub async fn notifications_are_recorded_once_and_kept_until_delivered<S: Store>(store: S) {
    // `Policy::default()` records notifications, `credits.low` below 10 credits.
    plus_account_with_credits(&store, "n", 20).await;
    plus_account_with_credits(&store, "quiet", 20).await;
    assert!(pending(&store).await.is_empty());
    // The 5-hour window used up on the plan, then credits spent from 20 to 5, then to 4.
    spend(&store, "n", "plan", 150, at(MINUTE_MS)).await;
    spend(&store, "n", "c1", 15, at(2 * MINUTE_MS)).await;
    spend(&store, "n", "c2", 1, at(3 * MINUTE_MS)).await;
    assert_eq!(
        pending(&store).await,
        vec![(
            "n".to_owned(),
            vec![(1, "window.exhausted"), (2, "credits.low")]
        )],
        "once per occurrence, not once per call"
    );
    let notices = store.pending_notices().await.unwrap().remove(0).1;
    assert_eq!(
        notices[1].kind,
        NoticeKind::CreditsLow {
            balance: 5 * CREDIT,
            threshold: 10 * CREDIT
        }
    );
    assert_eq!(notices[1].id("n"), "ntf:n:2");
    assert_eq!(notices[1].at, at(2 * MINUTE_MS));
    match &notices[0].kind {
        NoticeKind::WindowExhausted {
            window,
            used,
            limit,
            ..
        } => assert_eq!(
            (window.as_str(), *used, *limit),
            ("5h", 150 * CREDIT, 150 * CREDIT)
        ),
        other => panic!("{other:?}"),
    }

    // Delivered: forgotten, once.
    let now = at(4 * MINUTE_MS);
    assert!(store.notice_delivered("n", 1, now).await.unwrap());
    assert!(!store.notice_delivered("n", 1, now).await.unwrap());
    assert_eq!(
        pending(&store).await,
        vec![("n".to_owned(), vec![(2, "credits.low")])]
    );

    // An auto top-up purchase settled: told once, however often its answer arrives.
    let bought = store
        .set_top_up(top_up("n", true, 10, 50), now)
        .await
        .unwrap()
        .top_up
        .expect("a purchase");
    let approved = PaymentResult::Approved {
        payment_id: "pay-n".into(),
    };
    for _ in 0..2 {
        store
            .settle_top_up(paid("n", &bought.id, approved.clone()), now)
            .await
            .unwrap();
    }
    let notices = store.pending_notices().await.unwrap().remove(0).1;
    assert_eq!(
        notices.last().map(|n| (n.seq, n.kind.clone())),
        Some((
            3,
            NoticeKind::TopUpSucceeded {
                purchase_id: bought.id.clone(),
                amount: 46 * CREDIT,
                payment_id: "pay-n".into(),
                balance: 50 * CREDIT,
            }
        ))
    );
    for seq in [2, 3] {
        assert!(store.notice_delivered("n", seq, now).await.unwrap());
    }
    assert!(pending(&store).await.is_empty());
    let unknown = store.notice_delivered("nobody", 1, now).await.unwrap_err();
    assert!(rule(unknown).is_account_not_found());
}

pub async fn undelivered_notifications_past_the_bound_drop_the_oldest_and_are_counted<S: Store>(
    store: S,
) {
    plus_account_with_credits(&store, "d", 0).await;
    // Each grant of 20 credits taken back records one `credits.low` (10 credits): three more
    // than an account keeps undelivered.
    let recorded = MAX_PENDING as u64 + 3;
    for i in 0..recorded {
        let now = at(i as i64 * MINUTE_MS);
        let grant_id = format!("g{i}");
        store
            .grant(grant_cmd("d", &grant_id, 20), now)
            .await
            .unwrap();
        let revoke = RevokeCommand {
            account_id: "d".into(),
            grant_id,
        };
        store.revoke_grant(revoke, now).await.unwrap();
    }
    let kept: Vec<u64> = pending(&store)
        .await
        .remove(0)
        .1
        .iter()
        .map(|n| n.0)
        .collect();
    assert_eq!(
        kept,
        (4..=recorded).collect::<Vec<_>>(),
        "the newest are kept"
    );
    assert_eq!(store.notices_dropped(), 3);
}

pub async fn auto_top_up_needs_an_account_that_may_buy_credits<S: Store>(store: S) {
    store
        .reserve(&reserve_cmd("free", "r", "codex", 1), at(0))
        .await
        .unwrap();
    let err = store
        .set_top_up(top_up("free", true, 10, 50), at(0))
        .await
        .unwrap_err();
    assert!(matches!(rule(err), DomainError::FailedPrecondition(_)));
    store
        .set_top_up(top_up("free", false, 10, 50), at(0))
        .await
        .unwrap();
    plus_account_with_credits(&store, "p", 100).await;
    let barred = Account {
        id: "p".into(),
        plan: "plus".into(),
        credit_purchase_allowed: false,
    };
    store.upsert_account(barred, at(0)).await.unwrap();
    let err = store
        .set_top_up(top_up("p", true, 10, 50), at(0))
        .await
        .unwrap_err();
    assert!(matches!(rule(err), DomainError::FailedPrecondition(_)));
}

fn export_read(group: &str, claim_idle_ms: i64) -> ExportRead {
    ExportRead {
        group: group.into(),
        consumer: "c1".into(),
        max_events: 1_000,
        claim_idle_ms,
    }
}

pub async fn every_charge_is_exported_once_per_consumer_group<S: Store>(store: S) {
    let mut expected = HashSet::new();
    // What each charge's Commit answered, by event id: the export must say exactly the same.
    let mut charged = std::collections::HashMap::new();
    for account in ["a", "b:with:colons"] {
        plus_account_with_credits(&store, account, 0).await;
        for i in 0..3 {
            let now = at(i * MINUTE_MS);
            let (id, _) = allow(
                &store,
                reserve_cmd(account, &format!("r{i}"), "codex", 5),
                now,
            )
            .await;
            // Two charges: a non-final commit, then the final one adding to it.
            let part = store
                .commit(commit_cmd(account, &id, 2, false), now)
                .await
                .unwrap();
            let done = store
                .commit(commit_cmd(account, &id, 5, true), now)
                .await
                .unwrap();
            assert!(done.event.is_some(), "a charge records an event");
            for event in [part.event, done.event.clone()].into_iter().flatten() {
                charged.insert(event.id(account), event);
            }
            // A retried final commit and a release of nothing are not charges.
            let retry = store
                .commit(commit_cmd(account, &id, 5, true), now)
                .await
                .unwrap();
            assert_eq!(retry.event, None);
        }
        let (id, _) = allow(&store, reserve_cmd(account, "free", "codex", 5), at(0)).await;
        store
            .commit(commit_cmd(account, &id, 0, true), at(0))
            .await
            .unwrap();
        expected.extend((1..=6).map(|seq| format!("{account}:{seq}")));
    }
    store.maintain(at(3 * MINUTE_MS)).await; // Redis: the relay copies the outboxes.

    let billing = store
        .export_read(export_read("billing", 60_000), at(4 * MINUTE_MS))
        .await
        .unwrap();
    let ids: Vec<String> = billing.iter().map(|e| e.event_id()).collect();
    assert_eq!(ids.len(), 12, "one event per charge: {ids:?}");
    assert_eq!(ids.iter().cloned().collect::<HashSet<_>>(), expected);
    for exported in &billing {
        assert_eq!(exported.event, charged[&exported.event_id()], "as charged");
    }
    for account in ["a", "b:with:colons"] {
        let seqs: Vec<u64> = billing
            .iter()
            .filter(|e| e.account_id == account)
            .map(|e| e.event.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5, 6], "an account's events in order");
    }
    let second = billing.iter().find(|e| e.event_id() == "a:2").unwrap();
    assert_eq!(second.event.charged, Funding::new(3 * CREDIT, 0));
    assert_eq!(&*second.event.product, "codex");
    assert_eq!(second.event.usage.output_tokens, 3 * 5_000);
    let history = store.usage("a", 10, at(4 * MINUTE_MS)).await.unwrap();
    assert_eq!(
        history.recent[0].seq, 6,
        "GetUsage shows the same numbering"
    );

    // Nothing new for the group until something is charged; another group reads everything.
    assert!(
        store
            .export_read(export_read("billing", 60_000), at(4 * MINUTE_MS))
            .await
            .unwrap()
            .is_empty()
    );
    let analytics = store
        .export_read(export_read("analytics", 60_000), at(4 * MINUTE_MS))
        .await
        .unwrap();
    assert_eq!(analytics.len(), 12);

    let deliveries: Vec<String> = billing.iter().map(|e| e.delivery_id.clone()).collect();
    assert_eq!(store.export_ack("billing", &deliveries).await.unwrap(), 12);
    assert_eq!(
        store.export_ack("billing", &deliveries).await.unwrap(),
        0,
        "acked once"
    );
    assert_eq!(
        store
            .export_ack("billing", &["0/0-1".into(), "junk".into()])
            .await
            .unwrap(),
        0
    );
    // Unacknowledged deliveries come back once idle (here: at once) and not to the acked group.
    let again = store
        .export_read(export_read("analytics", 0), at(5 * MINUTE_MS))
        .await
        .unwrap();
    assert_eq!(again.len(), 12, "redelivered until acknowledged");
    assert!(
        store
            .export_read(export_read("billing", 0), at(5 * MINUTE_MS))
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn rls_counts_a_request_only_if_every_descriptor_fits_and_slides<S: Store>(store: S) {
    use quotad::domain::rls::{CounterCheck, RlsUnit};
    let check = |key: &str, limit, hits| CounterCheck {
        key: key.into(),
        unit: RlsUnit::Minute,
        limit,
        hits,
    };
    let request = [check("ip:1", 10, 4), check("path:/x", 5, 4)];
    let first = store.rls_check("edge", &request, at(0)).await.unwrap();
    assert!(first.iter().all(|s| !s.over));
    assert_eq!((first[0].remaining, first[1].remaining), (6, 1));
    let second = store.rls_check("edge", &request, at(0)).await.unwrap();
    assert!(!second[0].over && second[1].over);
    assert_eq!(second[0].remaining, 6, "a refused request counts nowhere");
    // The 4 hits leave a minute (and one 1-second bucket) after they were counted.
    assert_eq!(second[1].reset_in_ms, MINUTE_MS + 1_000);
    assert!(
        store
            .rls_check("edge", &request, at(MINUTE_MS))
            .await
            .unwrap()[1]
            .over
    );
    let later = store
        .rls_check("edge", &request, at(MINUTE_MS + 1_000))
        .await
        .unwrap();
    assert!(later.iter().all(|s| !s.over), "{later:?}");
    // Domains are apart; the same counter twice in one request adds up.
    let other = store
        .rls_check(
            "other",
            &[check("ip:1", 10, 6), check("ip:1", 10, 6)],
            at(0),
        )
        .await
        .unwrap();
    assert!(other.iter().all(|s| s.over));
    let once = store
        .rls_check("other", &[check("ip:1", 10, 6)], at(0))
        .await
        .unwrap();
    assert!(!once[0].over);
    assert_eq!(once[0].remaining, 4);
}
