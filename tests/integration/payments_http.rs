//! Auto top-up against a real HTTP billing endpoint started by the test (plain HTTP/1.1 over a
//! loopback socket): approvals, declines, a 500 then success on retry, a timeout then success,
//! a slow answer; exactly one lot per successful purchase, none per decline, the same
//! idempotency key on every retry of a purchase, back-off and auto-disable after 3 declines.

use crate::support;

use std::time::Duration;

use quotad::api::pb;
use quotad::config::{Config, PaymentProviderKind, StoreKind};
use support::billing::{Answer, billing_service};
use support::{CREDIT, QuotaClient, TestServer};

async fn server_with_billing(url: &str) -> TestServer {
    let mut config = Config::default();
    config.payments.provider = PaymentProviderKind::Http;
    config.payments.http_url = Some(url.to_owned());
    config.payments.http_token = Some("billing-secret".into());
    config.payments.http_hmac_secret = Some(HMAC_SECRET.into());
    config.payments.http_timeout_ms = 300;
    config.payments.retry_first_delay_ms = 20;
    TestServer::start_with(config, StoreKind::Memory).await
}

const HMAC_SECRET: &str = "a shared secret of the billing service";

/// What the billing service does with `Quotad-Signature`: recompute it over the raw body (as a
/// webhook receiver does: the same signing).
fn signature_is_valid(seen: &support::billing::Seen) -> bool {
    support::webhooks::signature_is_valid(HMAC_SECRET, &seen.signature, &seen.raw_body)
}

async fn usage(q: &mut QuotaClient, account: &str) -> pb::GetUsageResponse {
    let req = pb::GetUsageRequest {
        account_id: account.into(),
        recent_limit: 0,
    };
    q.get_usage(req).await.unwrap().into_inner()
}

fn outcome(u: &pb::GetUsageResponse) -> Option<pb::TopUpOutcome> {
    u.auto_top_up
        .as_ref()?
        .last_attempt
        .as_ref()
        .map(|a| a.outcome())
}

async fn turn_on(server: &TestServer, id: &str) {
    let req = pb::SetAutoTopUpRequest {
        account_id: id.into(),
        enabled: true,
        threshold_micros: 10 * CREDIT,
        target_micros: 30 * CREDIT,
        monthly_cap_micros: 0,
    };
    server.admin().await.set_auto_top_up(req).await.unwrap();
}

fn auto_lots(u: &pb::GetUsageResponse) -> usize {
    u.lots.iter().filter(|l| l.source == "auto_top_up").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_reuse_the_key_and_one_success_makes_one_lot() {
    let (url, billing) = billing_service().await;
    billing.answers(&[
        Answer::ServerError,
        Answer::Stall(Duration::from_millis(800)),
        Answer::Approve,
    ]);
    let server = server_with_billing(&url).await;
    let mut q = server.quota().await;
    support::plus_account(&server, "p").await;
    turn_on(&server, "p").await;
    let u = support::usage_until(&mut q, "p", |u| {
        outcome(u) == Some(pb::TopUpOutcome::Succeeded)
    })
    .await;
    assert_eq!(u.credit_balance_micros, 30 * CREDIT);
    assert_eq!(auto_lots(&u), 1, "exactly one lot for the purchase");
    let seen = billing.seen();
    assert!(seen.len() >= 3, "{seen:?}");
    assert!(
        seen.iter().all(|s| s.idempotency_key == "topup:p:1"),
        "the same key on every retry: {seen:?}"
    );
    assert!(
        seen.iter()
            .all(|s| s.authorization == "Bearer billing-secret")
    );
    assert!(
        seen.iter().all(signature_is_valid),
        "every request signed over its body: {seen:?}"
    );
    let mut forged = seen[0].clone();
    forged.raw_body = forged.raw_body.replace("30000000", "90000000");
    assert!(
        !signature_is_valid(&forged),
        "an altered body fails the check"
    );
    assert_eq!(seen[0].body["amount_micros"], 30 * CREDIT);
    // And what they cost, at the default price of credits (2,500 for 100.00 USD).
    assert_eq!(seen[0].body["amount_minor"], 120);
    assert_eq!(seen[0].body["currency"], "USD");
    assert_eq!(seen[0].body["account_id"], "p");
    // A late answer to the stalled try would be a duplicate: nothing more is granted.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let u = usage(&mut q, "p").await;
    assert_eq!((u.credit_balance_micros, auto_lots(&u)), (30 * CREDIT, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declines_create_nothing_back_off_and_turn_it_off_after_three() {
    let (url, billing) = billing_service().await;
    billing.answers(&[Answer::Decline, Answer::Decline, Answer::Decline]);
    let server = server_with_billing(&url).await;
    let mut q = server.quota().await;
    support::plus_account(&server, "d").await;
    turn_on(&server, "d").await;
    let u = support::usage_until(&mut q, "d", |u| {
        outcome(u) == Some(pb::TopUpOutcome::Declined)
    })
    .await;
    assert_eq!(
        (u.credit_balance_micros, auto_lots(&u)),
        (0, 0),
        "a decline grants nothing"
    );
    // An hour of back-off later, raising the threshold re-arms it: declined again, twice.
    for n in 2..=3 {
        server.clock.advance_secs(3_600);
        turn_on_again(&server, "d", 10 + n as i64).await;
        support::usage_until(&mut q, "d", |u| {
            u.auto_top_up
                .as_ref()
                .is_some_and(|t| t.consecutive_declines == n)
        })
        .await;
    }
    let t = usage(&mut q, "d").await.auto_top_up.unwrap();
    assert!(!t.enabled, "turned off after three declines");
    assert!(
        t.last_attempt
            .unwrap()
            .error
            .contains("turned off after 3 declines")
    );
    assert_eq!(billing.seen().len(), 3);
}

/// Raising the threshold re-arms the trigger (the account is still below it).
async fn turn_on_again(server: &TestServer, id: &str, threshold: i64) {
    let req = pb::SetAutoTopUpRequest {
        account_id: id.into(),
        enabled: true,
        threshold_micros: threshold * CREDIT,
        target_micros: 30 * CREDIT,
        monthly_cap_micros: 0,
    };
    server.admin().await.set_auto_top_up(req).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_short_of_credits_waits_briefly_for_the_purchase_in_flight() {
    let (url, billing) = billing_service().await;
    billing.answers(&[Answer::Stall(Duration::from_millis(50))]);
    let server = server_with_billing(&url).await;
    let mut q = server.quota().await;
    let mut admin = server.admin().await;
    support::plus_account(&server, "w").await;
    let grant = pb::GrantCreditsRequest {
        account_id: "w".into(),
        grant_id: "g".into(),
        amount_micros: 20 * CREDIT,
        ..Default::default()
    };
    admin.grant_credits(grant).await.unwrap();
    turn_on(&server, "w").await; // 20 available, threshold 10: nothing to buy yet
    let reserve = |id: &str, credits: u64| pb::ReserveRequest {
        account_id: "w".into(),
        request_id: id.into(),
        product: "codex".into(),
        estimate: Some(support::costing(credits)),
        ..Default::default()
    };
    let plan = q.reserve(reserve("plan", 150)).await.unwrap().into_inner();
    let commit = pb::CommitRequest {
        account_id: "w".into(),
        reservation_id: plan.reservation_id,
        usage: Some(support::costing(150)),
        r#final: true,
    };
    q.commit(commit).await.unwrap();
    // Holding 15 of the 20 credits takes available credits below the threshold: a purchase starts.
    let first = q.reserve(reserve("first", 15)).await.unwrap().into_inner();
    assert_eq!(first.decision(), pb::Decision::Allow);
    // 10 more do not fit in the 5 left, but the purchase is on its way: the Reserve waits for it.
    let second = q.reserve(reserve("second", 10)).await.unwrap().into_inner();
    assert_eq!(second.decision(), pb::Decision::Allow, "{}", second.message);
    assert_eq!(second.held.unwrap().credit_micros, 10 * CREDIT);
    assert_eq!(billing.seen().len(), 1);
}
