//! The rules of the quota API, end to end: a real quotad on a loopback port, real tonic
//! clients, a manual clock. Each test starts its own server, once on the memory store and
//! once on the Redis store (a real `redis-server` started by the test).

use crate::support;

use quotad::api::pb::{self, Action, Decision, DenyReason};
use support::{ADMIN_TOKEN, AdminClient, CREDIT, QuotaClient, TestServer, costing, usage};
use tonic::Code;

support::on_every_store!(
    free_user_over_the_5h_window_gets_the_upgrade_prompt,
    go_user_is_prompted_to_plus_and_the_weekly_limit_binds_too,
    plus_user_runs_on_credits_across_the_boundary,
    workspace_agents_wait_for_reset_instead_of_credits,
    accounts_barred_from_credits_get_upgrade_or_wait,
    a_long_task_continues_on_credits_mid_task,
    expired_holds_return_without_any_call,
    retries_act_once_and_conflicting_reuse_is_already_exists,
    lots_are_spent_earliest_expiry_first_and_never_after_expiry,
    bad_input_is_invalid_argument_naming_the_field_and_changes_nothing,
    admin_calls_need_the_bearer_token,
    health_and_reflection_are_served,
    without_a_configured_token_admin_is_disabled,
    a_revoked_grant_takes_back_what_is_left_of_its_lot,
    auto_top_up_below_the_threshold_buys_at_once_in_the_background,
    a_top_up_preview_shows_the_purchase_before_it_is_made,
    declined_top_ups_ask_for_a_new_payment_method,
);

const MINUTE: i64 = 60;
const HOUR: i64 = 3_600;

fn reserve_req(
    account: &str,
    request: &str,
    product: &str,
    estimate: pb::Usage,
) -> pb::ReserveRequest {
    pb::ReserveRequest {
        account_id: account.into(),
        request_id: request.into(),
        product: product.into(),
        estimate: Some(estimate),
        ..Default::default()
    }
}

async fn reserve(
    q: &mut QuotaClient,
    account: &str,
    request: &str,
    product: &str,
    credits: u64,
) -> pb::ReserveResponse {
    q.reserve(reserve_req(account, request, product, costing(credits)))
        .await
        .unwrap()
        .into_inner()
}

async fn commit(
    q: &mut QuotaClient,
    account: &str,
    reservation: &str,
    credits: u64,
    is_final: bool,
) -> pb::CommitResponse {
    let req = pb::CommitRequest {
        account_id: account.into(),
        reservation_id: reservation.into(),
        usage: Some(costing(credits)),
        r#final: is_final,
    };
    q.commit(req).await.unwrap().into_inner()
}

/// Reserves and finally commits `credits` worth of codex usage.
async fn spend(q: &mut QuotaClient, account: &str, request: &str, credits: u64) {
    let r = reserve(q, account, request, "codex", credits).await;
    assert_eq!(r.decision(), Decision::Allow, "{}", r.message);
    commit(q, account, &r.reservation_id, credits, true).await;
}

async fn usage_of(q: &mut QuotaClient, account: &str) -> pb::GetUsageResponse {
    let req = pb::GetUsageRequest {
        account_id: account.into(),
        recent_limit: 50,
    };
    q.get_usage(req).await.unwrap().into_inner()
}

async fn set_account(
    a: &mut AdminClient,
    account: &str,
    plan: &str,
    credit_purchase_allowed: bool,
) {
    let account = pb::Account {
        account_id: account.into(),
        plan: plan.into(),
        credit_purchase_allowed,
    };
    a.upsert_account(pb::UpsertAccountRequest {
        account: Some(account),
    })
    .await
    .unwrap();
}

async fn grant(
    a: &mut AdminClient,
    account: &str,
    grant_id: &str,
    credits: i64,
) -> pb::GrantCreditsResponse {
    let req = pb::GrantCreditsRequest {
        account_id: account.into(),
        grant_id: grant_id.into(),
        amount_micros: credits * CREDIT,
        ..Default::default()
    };
    a.grant_credits(req).await.unwrap().into_inner()
}

fn funding(plan: i64, credit: i64) -> Option<pb::Funding> {
    Some(pb::Funding {
        plan_micros: plan * CREDIT,
        credit_micros: credit * CREDIT,
    })
}

fn seconds(t: &Option<quotad::api::wkt::Timestamp>) -> i64 {
    t.as_ref().expect("timestamp set").seconds
}

async fn free_user_over_the_5h_window_gets_the_upgrade_prompt(store: support::TestStore) {
    let server = TestServer::start(store).await;
    let mut q = server.quota().await;
    let t0 = server.now_secs();
    spend(&mut q, "free-user", "t1", 15).await;
    let r = reserve(&mut q, "free-user", "t2", "excel", 2).await;
    assert_eq!(r.decision(), Decision::Deny);
    assert_eq!(r.reason(), DenyReason::WindowExhausted);
    assert_eq!(r.action(), Action::UpgradePlan);
    assert_eq!(r.upgrade_to, "go");
    assert!(r.reservation_id.is_empty());
    assert!(r.message.contains("Upgrade to go"), "{}", r.message);
    // Usage leaves the window 5 hours after its 5-minute bucket ends, never before.
    let retry = seconds(&r.retry_at);
    assert_eq!(retry, t0 + 5 * HOUR + 5 * MINUTE);
    let five_hour = &r.windows[0];
    assert_eq!(
        (
            five_hour.name.as_str(),
            five_hour.used_micros,
            five_hour.limit_micros
        ),
        ("5h", 15 * CREDIT, 15 * CREDIT)
    );
    assert_eq!(seconds(&five_hour.resets_at), retry);

    server.clock.advance_secs(retry - t0 - 1);
    assert_eq!(
        reserve(&mut q, "free-user", "t3", "excel", 2)
            .await
            .decision(),
        Decision::Deny
    );
    server.clock.advance_secs(1);
    assert_eq!(
        reserve(&mut q, "free-user", "t4", "excel", 2)
            .await
            .decision(),
        Decision::Allow
    );
}

async fn go_user_is_prompted_to_plus_and_the_weekly_limit_binds_too(store: support::TestStore) {
    let server = TestServer::start(store).await;
    let mut q = server.quota().await;
    let mut first = reserve_req("go-user", "t0", "codex", costing(50));
    first.plan_hint = "go".into();
    let r = q.reserve(first).await.unwrap().into_inner();
    commit(&mut q, "go-user", &r.reservation_id, 50, true).await;
    let r = reserve(&mut q, "go-user", "t1", "codex", 1).await;
    assert_eq!(
        (r.reason(), r.action(), r.upgrade_to.as_str()),
        (DenyReason::WindowExhausted, Action::UpgradePlan, "plus")
    );

    // Three more full windows fill the week (200): then the weekly limit is what binds.
    for i in 0..3 {
        server.clock.advance_secs(6 * HOUR);
        spend(&mut q, "go-user", &format!("w{i}"), 50).await;
    }
    server.clock.advance_secs(6 * HOUR);
    let r = reserve(&mut q, "go-user", "t2", "codex", 1).await;
    assert_eq!(r.decision(), Decision::Deny);
    assert_eq!(r.reason(), DenyReason::WeeklyExhausted);
    assert_eq!(r.windows[1].used_micros, 200 * CREDIT);
    assert!(r.message.contains("this week"), "{}", r.message);
}

async fn plus_user_runs_on_credits_across_the_boundary(store: support::TestStore) {
    let server = TestServer::start(store).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    set_account(&mut a, "plus-user", "plus", true).await;
    // No credits: buy some.
    spend(&mut q, "plus-user", "t0", 140).await;
    let r = reserve(&mut q, "plus-user", "t1", "codex", 30).await;
    assert_eq!(
        (r.decision(), r.reason(), r.action()),
        (
            Decision::Deny,
            DenyReason::CreditsExhausted,
            Action::BuyCredits
        )
    );
    assert!(r.retry_at.is_some());

    let g = grant(&mut a, "plus-user", "purchase-1", 100).await;
    assert_eq!(g.credit_balance_micros, 100 * CREDIT);
    // 10 left on the plan, 20 from credits: the hold shows both parts.
    let r = reserve(&mut q, "plus-user", "t2", "excel", 30).await;
    assert_eq!(r.decision(), Decision::Allow);
    assert_eq!(r.held, funding(10, 20));
    assert_eq!(r.estimate_micros, 30 * CREDIT);
    let c = commit(&mut q, "plus-user", &r.reservation_id, 25, true).await;
    assert_eq!(c.charged, funding(10, 15));
    assert_eq!(c.credit_balance_micros, 85 * CREDIT);
    assert!(!c.may_continue);
    let u = usage_of(&mut q, "plus-user").await;
    let ledger = u.ledger.unwrap();
    assert_eq!(
        (
            ledger.granted_micros,
            ledger.spent_micros,
            ledger.balance_micros
        ),
        (100 * CREDIT, 15 * CREDIT, 85 * CREDIT)
    );
    assert_eq!(u.recent[0].charged, funding(10, 15));
}

async fn workspace_agents_wait_for_reset_instead_of_credits(store: support::TestStore) {
    let server = TestServer::start(store).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    set_account(&mut a, "team", "plus", true).await;
    grant(&mut a, "team", "g", 500).await;
    spend(&mut q, "team", "t0", 150).await;
    let r = reserve(&mut q, "team", "t1", "workspace_agents", 5).await;
    assert_eq!(
        (r.decision(), r.reason(), r.action()),
        (
            Decision::Deny,
            DenyReason::WindowExhausted,
            Action::WaitForReset
        )
    );
    assert!(r.upgrade_to.is_empty());
    assert!(r.retry_at.is_some());
    // The same account still runs codex on credits.
    assert_eq!(
        reserve(&mut q, "team", "t2", "codex", 5).await.held,
        funding(0, 5)
    );
}

async fn accounts_barred_from_credits_get_upgrade_or_wait(store: support::TestStore) {
    let server = TestServer::start(store).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    set_account(&mut a, "plus-barred", "plus", false).await;
    set_account(&mut a, "pro-barred", "pro", false).await;
    grant(&mut a, "plus-barred", "g", 100).await;
    spend(&mut q, "plus-barred", "t0", 150).await;
    spend(&mut q, "pro-barred", "t0", 1_500).await;
    let r = reserve(&mut q, "plus-barred", "t1", "codex", 1).await;
    assert_eq!(
        (r.reason(), r.action(), r.upgrade_to.as_str()),
        (DenyReason::CreditsNotAllowed, Action::UpgradePlan, "pro")
    );
    let r = reserve(&mut q, "pro-barred", "t1", "excel", 1).await;
    assert_eq!(
        (r.reason(), r.action(), r.upgrade_to.as_str()),
        (DenyReason::CreditsNotAllowed, Action::WaitForReset, "")
    );
    assert!(r.message.contains("cannot buy credits"), "{}", r.message);
}

async fn a_long_task_continues_on_credits_mid_task(store: support::TestStore) {
    let server = TestServer::start(store).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    set_account(&mut a, "agent", "plus", true).await;
    grant(&mut a, "agent", "g", 40).await;
    spend(&mut q, "agent", "earlier", 120).await;
    let r = reserve(&mut q, "agent", "task", "codex", 20).await;
    assert_eq!(r.held, funding(20, 0));
    let id = r.reservation_id;
    // Chunk 1 (20): the plan has 10 left, so the next chunk is held half on credits.
    server.clock.advance_secs(5 * MINUTE);
    let c = commit(&mut q, "agent", &id, 20, false).await;
    assert!(c.may_continue);
    assert_eq!((c.charged, c.held), (funding(20, 0), funding(10, 10)));
    assert_eq!(
        seconds(&c.expires_at),
        server.now_secs() + 15 * MINUTE,
        "TTL renewed"
    );
    assert!(c.message.contains("continues on credits"), "{}", c.message);
    // Chunk 2 (cumulative 40): now all credits.
    server.clock.advance_secs(5 * MINUTE);
    let c = commit(&mut q, "agent", &id, 40, false).await;
    assert_eq!((c.charged, c.held), (funding(10, 10), funding(0, 20)));
    assert!(c.may_continue);
    // Chunk 3 (cumulative 60) leaves 10 credits, less than the next chunk's 20.
    let c = commit(&mut q, "agent", &id, 60, false).await;
    assert!(!c.may_continue);
    assert_eq!(
        (c.action(), c.reason()),
        (Action::BuyCredits, DenyReason::CreditsExhausted)
    );
    let c = commit(&mut q, "agent", &id, 62, true).await;
    assert_eq!(c.charged, funding(0, 2));
    assert_eq!(c.charged_total, funding(30, 32));
    assert_eq!(c.credit_balance_micros, 8 * CREDIT);
}

async fn expired_holds_return_without_any_call(store: support::TestStore) {
    let server = TestServer::start(store).await;
    let mut q = server.quota().await;
    let mut req = reserve_req("u", "t1", "codex", costing(10));
    req.ttl_seconds = 120;
    let r = q.reserve(req).await.unwrap().into_inner();
    assert_eq!(seconds(&r.expires_at), server.now_secs() + 120);
    assert_eq!(
        usage_of(&mut q, "u").await.windows[0].held_micros,
        10 * CREDIT
    );
    server.clock.advance_secs(120);
    let u = usage_of(&mut q, "u").await;
    assert_eq!((u.windows[0].used_micros, u.holds.len()), (0, 0));
    let late = pb::CommitRequest {
        account_id: "u".into(),
        reservation_id: r.reservation_id.clone(),
        usage: Some(costing(1)),
        r#final: true,
    };
    assert_eq!(
        q.commit(late).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let release = pb::ReleaseRequest {
        account_id: "u".into(),
        reservation_id: r.reservation_id,
    };
    assert_eq!(
        q.release(release).await.unwrap().into_inner().released,
        funding(10, 0)
    );
    // The default TTL is 15 minutes; more than 24 hours is refused.
    let r = reserve(&mut q, "u", "t2", "codex", 1).await;
    assert_eq!(seconds(&r.expires_at), server.now_secs() + 15 * MINUTE);
}

async fn retries_act_once_and_conflicting_reuse_is_already_exists(store: support::TestStore) {
    let server = TestServer::start(store).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    let first = reserve(&mut q, "u", "same", "codex", 5).await;
    let retry = reserve(&mut q, "u", "same", "codex", 5).await;
    assert_eq!(first.reservation_id, retry.reservation_id);
    assert_eq!(retry.windows[0].used_micros, 5 * CREDIT, "held once");
    let conflict = q
        .reserve(reserve_req("u", "same", "excel", costing(5)))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);
    assert!(
        conflict.message().contains("request_id"),
        "{}",
        conflict.message()
    );

    let c1 = commit(&mut q, "u", &first.reservation_id, 3, true).await;
    let c2 = commit(&mut q, "u", &first.reservation_id, 3, true).await;
    assert_eq!(
        (c1.charged, c1.charged_total),
        (c2.charged, c2.charged_total)
    );
    assert_eq!(
        usage_of(&mut q, "u").await.windows[0].used_micros,
        3 * CREDIT,
        "charged once"
    );
    let other = pb::CommitRequest {
        account_id: "u".into(),
        reservation_id: first.reservation_id.clone(),
        usage: Some(costing(4)),
        r#final: true,
    };
    assert_eq!(
        q.commit(other).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    let release = pb::ReleaseRequest {
        account_id: "u".into(),
        reservation_id: first.reservation_id.clone(),
    };
    assert_eq!(
        q.release(release).await.unwrap_err().code(),
        Code::AlreadyExists
    );

    let r = reserve(&mut q, "u", "to-release", "codex", 4).await;
    let release = pb::ReleaseRequest {
        account_id: "u".into(),
        reservation_id: r.reservation_id,
    };
    let once = q.release(release.clone()).await.unwrap().into_inner();
    let twice = q.release(release).await.unwrap().into_inner();
    assert_eq!(
        (once.released, twice.released),
        (funding(4, 0), funding(4, 0))
    );

    set_account(&mut a, "u", "plus", true).await;
    let g1 = grant(&mut a, "u", "grant-1", 10).await;
    let g2 = grant(&mut a, "u", "grant-1", 10).await;
    assert_eq!(g1.lot, g2.lot);
    assert_eq!(g2.credit_balance_micros, 10 * CREDIT, "granted once");
    let conflict = pb::GrantCreditsRequest {
        account_id: "u".into(),
        grant_id: "grant-1".into(),
        amount_micros: 11 * CREDIT,
        ..Default::default()
    };
    assert_eq!(
        a.grant_credits(conflict).await.unwrap_err().code(),
        Code::AlreadyExists
    );
}

async fn lots_are_spent_earliest_expiry_first_and_never_after_expiry(store: support::TestStore) {
    let server = TestServer::start(store).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    set_account(&mut a, "p", "plus", true).await;
    let now = server.now_secs();
    let lot = |id: &str, credits: i64, days: i64, source: &str| pb::GrantCreditsRequest {
        account_id: "p".into(),
        grant_id: id.into(),
        amount_micros: credits * CREDIT,
        source: source.into(),
        expires_at: Some(quotad::api::wkt::Timestamp {
            seconds: now + days * 86_400,
            nanos: 0,
        }),
    };
    for req in [
        lot("year", 10, 300, ""),
        lot("month", 10, 30, "purchase"),
        lot("week", 10, 7, ""),
        lot("promo", 10, 30, "promo"),
    ] {
        a.grant_credits(req).await.unwrap();
    }
    let default = grant(&mut a, "p", "default", 1).await.lot.unwrap();
    assert_eq!(
        seconds(&default.expires_at),
        now + 365 * 86_400,
        "12 months from the grant"
    );
    spend(&mut q, "p", "plan", 150).await;
    spend(&mut q, "p", "credits", 15).await;
    let lots: Vec<(String, i64)> = usage_of(&mut q, "p")
        .await
        .lots
        .into_iter()
        .map(|l| (l.lot_id, l.remaining_micros))
        .collect();
    let expected = [("promo", 5), ("month", 10), ("year", 10), ("default", 1)];
    assert_eq!(lots, expected.map(|(id, c)| (id.to_string(), c * CREDIT)));

    // 30 days on, the month and promo lots have expired; nothing is taken from them.
    server.clock.advance_secs(30 * 86_400);
    spend(&mut q, "p", "plan-again", 150).await;
    let r = reserve(&mut q, "p", "more", "codex", 12).await;
    assert_eq!(
        (r.decision(), r.reason()),
        (Decision::Deny, DenyReason::CreditsExhausted)
    );
    spend(&mut q, "p", "fits", 11).await;
    let u = usage_of(&mut q, "p").await;
    let ledger = u.ledger.unwrap();
    assert_eq!(ledger.expired_micros, 15 * CREDIT);
    assert_eq!(ledger.balance_micros, 0);
    assert_eq!(
        ledger.granted_micros,
        ledger.balance_micros + ledger.spent_micros + ledger.expired_micros
    );
}

async fn bad_input_is_invalid_argument_naming_the_field_and_changes_nothing(
    store: support::TestStore,
) {
    let server = TestServer::start(store).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    set_account(&mut a, "p", "plus", true).await;
    let r = reserve(&mut q, "p", "ok", "codex", 3).await;
    let before = usage_of(&mut q, "p").await;

    let base = || reserve_req("p", "bad", "codex", costing(1));
    let cases: Vec<(pb::ReserveRequest, &str)> = vec![
        (
            pb::ReserveRequest {
                account_id: String::new(),
                ..base()
            },
            "account_id",
        ),
        (
            pb::ReserveRequest {
                request_id: String::new(),
                ..base()
            },
            "request_id",
        ),
        (
            pb::ReserveRequest {
                product: "chess".into(),
                ..base()
            },
            "product: unknown product \"chess\"; allowed: codex, excel, workspace_agents",
        ),
        (
            pb::ReserveRequest {
                estimate: Some(usage("gpt-2", 1, 0, 0)),
                ..base()
            },
            "estimate.model: unknown model \"gpt-2\"; allowed: gpt-5.5, gpt-5.5-mini",
        ),
        (
            pb::ReserveRequest {
                estimate: Some(usage("gpt-5.5", 0, 0, 0)),
                ..base()
            },
            "estimate: must count at least one token",
        ),
        (
            pb::ReserveRequest {
                estimate: Some(usage("gpt-5.5", u64::MAX, 0, 0)),
                ..base()
            },
            "estimate.input_tokens: must be at most",
        ),
        (
            pb::ReserveRequest {
                estimate: None,
                ..base()
            },
            "estimate: is required",
        ),
        (
            pb::ReserveRequest {
                ttl_seconds: 86_401,
                ..base()
            },
            "ttl_seconds: must be at most 86400",
        ),
        (
            pb::ReserveRequest {
                plan_hint: "gold".into(),
                ..base()
            },
            "plan_hint: unknown plan \"gold\"; allowed: free, go, plus, pro",
        ),
    ];
    for (req, message) in cases {
        let err = q.reserve(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{message}");
        assert!(
            err.message().contains(message),
            "{:?} does not contain {message:?}",
            err.message()
        );
    }
    let bad_commit = pb::CommitRequest {
        account_id: "p".into(),
        reservation_id: r.reservation_id.clone(),
        usage: Some(usage("gpt-5.5", 0, 0, u64::MAX)),
        r#final: true,
    };
    assert_eq!(
        q.commit(bad_commit).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let grants = [
        (
            pb::GrantCreditsRequest {
                amount_micros: 0,
                ..grant_req("p")
            },
            "amount_micros",
        ),
        (
            pb::GrantCreditsRequest {
                amount_micros: -5,
                ..grant_req("p")
            },
            "amount_micros",
        ),
        (
            pb::GrantCreditsRequest {
                source: "gift".into(),
                ..grant_req("p")
            },
            "source: unknown source \"gift\"; allowed: purchase, promo",
        ),
        (
            pb::GrantCreditsRequest {
                expires_at: Some(quotad::api::wkt::Timestamp {
                    seconds: 1,
                    nanos: 0,
                }),
                ..grant_req("p")
            },
            "expires_at: must be after now",
        ),
        (
            pb::GrantCreditsRequest {
                grant_id: String::new(),
                ..grant_req("p")
            },
            "grant_id",
        ),
    ];
    for (req, message) in grants {
        let err = a.grant_credits(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{message}");
        assert!(
            err.message().contains(message),
            "{:?} does not contain {message:?}",
            err.message()
        );
    }
    let export_read = |group: &str, consumer: &str, max_events| pb::ReadUsageExportRequest {
        group: group.into(),
        consumer: consumer.into(),
        max_events,
        claim_idle_ms: 0,
    };
    for (req, message) in [
        (export_read("", "c", 0), "group: must not be empty"),
        (export_read("g", "", 0), "consumer: must not be empty"),
        (
            export_read("g", "c", 1_001),
            "max_events: must be between 1 and 1000 (0 means 100), got 1001",
        ),
    ] {
        let err = a.read_usage_export(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{message}");
        assert!(err.message().contains(message), "{}", err.message());
    }
    let bad_account = pb::UpsertAccountRequest {
        account: Some(pb::Account {
            account_id: "p".into(),
            plan: "gold".into(),
            credit_purchase_allowed: true,
        }),
    };
    assert_eq!(
        a.upsert_account(bad_account).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let after = usage_of(&mut q, "p").await;
    assert_eq!(before, after, "nothing changed");
    // A bad first request does not create the account either.
    let err = q
        .reserve(reserve_req("newcomer", "r", "chess", costing(1)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let missing = q
        .get_usage(pb::GetUsageRequest {
            account_id: "newcomer".into(),
            recent_limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let missing = a.grant_credits(grant_req("nobody")).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

fn grant_req(account: &str) -> pb::GrantCreditsRequest {
    pb::GrantCreditsRequest {
        account_id: account.into(),
        grant_id: "g".into(),
        amount_micros: CREDIT,
        ..Default::default()
    }
}

async fn admin_calls_need_the_bearer_token(store: support::TestStore) {
    let server = TestServer::start(store).await;
    let get = || pb::GetAccountRequest {
        account_id: "x".into(),
    };
    for token in [None, Some("wrong-token")] {
        let mut a = server.admin_with_token(token).await;
        let err = a.get_account(get()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
    }
    let mut a = server.admin_with_token(Some(ADMIN_TOKEN)).await;
    assert_eq!(
        a.get_account(get()).await.unwrap_err().code(),
        Code::NotFound,
        "authenticated, and x does not exist"
    );
    set_account(&mut a, "x", "pro", true).await;
    let account = a.get_account(get()).await.unwrap().into_inner();
    assert_eq!(
        (account.plan.as_str(), account.credit_purchase_allowed),
        ("pro", true)
    );
    // QuotaService needs no admin token.
    let mut q = server.quota().await;
    assert_eq!(usage_of(&mut q, "x").await.plan, "pro");
}

async fn health_and_reflection_are_served(store: support::TestStore) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::{v1, v1alpha};

    let server = TestServer::start(store).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "quota.v1.QuotaService", "quota.v1.AdminService"] {
        let req = tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        };
        let status = health.check(req).await.unwrap().into_inner().status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }

    let list = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([list]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(services)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = services.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"quota.v1.QuotaService".to_string())
            && names.contains(&"quota.v1.AdminService".to_string()),
        "{names:?}"
    );

    let list = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([list]))
        .await
        .unwrap()
        .into_inner();
    assert!(
        stream.message().await.unwrap().is_some(),
        "v1alpha answers too"
    );
}

async fn without_a_configured_token_admin_is_disabled(store: support::TestStore) {
    let server = TestServer::start_without_admin_token(store).await;
    let mut a = server.admin_with_token(Some("anything")).await;
    let err = a
        .get_account(pb::GetAccountRequest {
            account_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("no admin token"),
        "{}",
        err.message()
    );
}

async fn a_revoked_grant_takes_back_what_is_left_of_its_lot(store: support::TestStore) {
    let server = TestServer::start(store).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    set_account(&mut a, "p", "plus", true).await;
    grant(&mut a, "p", "refunded", 10).await;
    grant(&mut a, "p", "kept", 10).await;
    spend(&mut q, "p", "plan", 150).await;
    spend(&mut q, "p", "credits", 3).await;
    let revoke = pb::RevokeGrantRequest {
        account_id: "p".into(),
        grant_id: "refunded".into(),
    };
    let first = a.revoke_grant(revoke.clone()).await.unwrap().into_inner();
    // Same expiry, source and instant: the lot id decides, so "kept" was spent and "refunded"
    // is whole.
    assert_eq!(
        (first.revoked_micros, first.credit_balance_micros),
        (10 * CREDIT, 7 * CREDIT)
    );
    let retry = a.revoke_grant(revoke).await.unwrap().into_inner();
    assert_eq!(retry, first);
    let ledger = usage_of(&mut q, "p").await.ledger.unwrap();
    assert_eq!(ledger.revoked_micros, 10 * CREDIT);
    assert_eq!(
        ledger.granted_micros,
        ledger.balance_micros + ledger.spent_micros + ledger.expired_micros + ledger.revoked_micros
    );
    let unknown = pb::RevokeGrantRequest {
        account_id: "p".into(),
        grant_id: "nope".into(),
    };
    assert_eq!(
        a.revoke_grant(unknown).await.unwrap_err().code(),
        Code::NotFound
    );
    let mut anonymous = server.admin_with_token(None).await;
    let revoke = pb::RevokeGrantRequest {
        account_id: "p".into(),
        grant_id: "kept".into(),
    };
    assert_eq!(
        anonymous.revoke_grant(revoke).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

fn set_top_up(account: &str, threshold: i64, target: i64) -> pb::SetAutoTopUpRequest {
    pb::SetAutoTopUpRequest {
        account_id: account.into(),
        enabled: true,
        threshold_micros: threshold * CREDIT,
        target_micros: target * CREDIT,
        monthly_cap_micros: 0,
    }
}

async fn auto_top_up_below_the_threshold_buys_at_once_in_the_background(store: support::TestStore) {
    let server = TestServer::start(store).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    set_account(&mut a, "p", "plus", true).await;
    grant(&mut a, "p", "seed", 3).await;
    let settings = a
        .set_auto_top_up(set_top_up("p", 10, 50))
        .await
        .unwrap()
        .into_inner();
    assert!(settings.enabled);
    let usage = support::usage_until(&mut q, "p", |u| u.credit_balance_micros == 50 * CREDIT).await;
    let top_up = usage.auto_top_up.unwrap();
    let last = top_up.last_attempt.unwrap();
    assert_eq!(
        (last.outcome(), last.amount_micros),
        (pb::TopUpOutcome::Succeeded, 47 * CREDIT)
    );
    assert_eq!(last.payment_id, "sim_topup:p:1");
    assert!(top_up.in_flight_purchase_id.is_empty());
    let lot = usage
        .lots
        .iter()
        .find(|l| l.source == "auto_top_up")
        .unwrap();
    assert_eq!(
        (lot.lot_id.as_str(), lot.granted_micros),
        ("topup:p:1", 47 * CREDIT)
    );
    // Saving the same settings again buys nothing.
    a.set_auto_top_up(set_top_up("p", 10, 50)).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(
        usage_of(&mut q, "p").await.credit_balance_micros,
        50 * CREDIT
    );
    // Free accounts cannot turn it on; a target not above the threshold is refused.
    let err = a
        .set_auto_top_up(set_top_up("nobody-free", 10, 50))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    set_account(&mut a, "f", "free", true).await;
    assert_eq!(
        a.set_auto_top_up(set_top_up("f", 10, 50))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    let err = a
        .set_auto_top_up(set_top_up("p", 10, 10))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("target_micros"),
        "{}",
        err.message()
    );
}

/// PreviewAutoTopUp answers what saving would buy, in numbers and in words, and buys nothing;
/// its input is checked as SetAutoTopUp checks it.
async fn a_top_up_preview_shows_the_purchase_before_it_is_made(store: support::TestStore) {
    let server = TestServer::start(store).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    set_account(&mut a, "p", "plus", true).await;
    grant(&mut a, "p", "seed", 3).await;
    let asked = set_top_up("p", 5, 20);
    let preview = a
        .preview_auto_top_up(asked.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            preview.available_micros,
            preview.purchase_micros,
            preview.in_flight_micros
        ),
        (3 * CREDIT, 17 * CREDIT, 0)
    );
    assert_eq!(
        preview.summary,
        "your balance is 3 credits, below the 5-credit threshold: saving buys 17 credits for \
         0.68 USD now with your default payment method"
    );
    assert_eq!(
        (
            preview.purchase_price_minor,
            preview.currency.as_str(),
            preview.purchase_price.as_str()
        ),
        (68, "USD", "0.68 USD")
    );
    assert!(preview.after.unwrap().enabled);
    // Nothing changed: auto top-up is still off and nothing was bought.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let usage = usage_of(&mut q, "p").await;
    assert!(!usage.auto_top_up.unwrap_or_default().enabled);
    assert_eq!(usage.credit_balance_micros, 3 * CREDIT);
    // Saved, it buys what the preview said.
    a.set_auto_top_up(asked).await.unwrap();
    let usage = support::usage_until(&mut q, "p", |u| u.credit_balance_micros == 20 * CREDIT).await;
    assert_eq!(usage.credit_balance_micros, 20 * CREDIT);

    let err = a
        .preview_auto_top_up(set_top_up("p", 10, 10))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("target_micros"),
        "{}",
        err.message()
    );
    let err = a
        .preview_auto_top_up(set_top_up("nobody", 10, 50))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let mut anonymous = server.admin_with_token(None).await;
    let err = anonymous
        .preview_auto_top_up(set_top_up("p", 10, 50))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

async fn declined_top_ups_ask_for_a_new_payment_method(store: support::TestStore) {
    let mut config = quotad::config::Config::default();
    config.payments.simulated_decline = true;
    let server = TestServer::start_with(config, store).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    set_account(&mut a, "p", "plus", true).await;
    a.set_auto_top_up(set_top_up("p", 10, 50)).await.unwrap();
    let usage = support::usage_until(&mut q, "p", |u| {
        u.auto_top_up
            .as_ref()
            .is_some_and(|t| t.consecutive_declines == 1)
    })
    .await;
    let last = usage.auto_top_up.unwrap().last_attempt.unwrap();
    assert_eq!(last.outcome(), pb::TopUpOutcome::Declined);
    assert_eq!(usage.credit_balance_micros, 0, "a decline grants nothing");
    spend(&mut q, "p", "plan", 150).await;
    let r = reserve(&mut q, "p", "more", "codex", 5).await;
    assert_eq!(
        (r.decision(), r.action()),
        (Decision::Deny, Action::UpdatePaymentMethod)
    );
}
