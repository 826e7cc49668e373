//! Shadow mode, end to end: an account whose plan is in shadow mode is answered ALLOW where the
//! rules deny, with the denial it would have had; its usage is recorded as usual (on the plan's
//! windows, past their limits; no credits the rules would not spend); plans not in shadow mode
//! still deny. On both stores (in-process servers, manual clock), and once as the real binary
//! to see the denial counted in `/metrics` and logged.

use crate::support;

use quotad::api::pb::{self, Action, Decision, DenyReason};
use quotad::config::Config;
use support::process::{Quotad, http_get};
use support::{ADMIN_TOKEN, CREDIT, QuotaClient, TestServer, costing, reserve_request};

support::on_every_store!(
    an_over_limit_account_is_allowed_and_told_what_it_would_have_been,
    a_credits_plan_in_shadow_spends_no_credits_it_has_not_got,
);

async fn reserve(q: &mut QuotaClient, req: pb::ReserveRequest) -> pb::ReserveResponse {
    q.reserve(req).await.unwrap().into_inner()
}

async fn commit(
    q: &mut QuotaClient,
    account: &str,
    reservation: &str,
    credits: u64,
    is_final: bool,
) -> pb::CommitResponse {
    q.commit(pb::CommitRequest {
        account_id: account.into(),
        reservation_id: reservation.into(),
        usage: Some(costing(credits)),
        r#final: is_final,
    })
    .await
    .unwrap()
    .into_inner()
}

fn free_in_shadow() -> Config {
    let mut config = Config::default();
    config.plans.get_mut("free").unwrap().shadow = true;
    config
}

async fn an_over_limit_account_is_allowed_and_told_what_it_would_have_been(
    store: support::TestStore,
) {
    let server = TestServer::start_with(free_in_shadow(), store).await;
    let mut q = server.quota().await;

    // Within the free plan's 15 credits: an ordinary ALLOW.
    let first = reserve(&mut q, reserve_request("ann", "r1", "codex", 10)).await;
    assert_eq!(first.decision(), Decision::Allow);
    assert_eq!(first.shadow_denial, None);
    commit(&mut q, "ann", &first.reservation_id, 10, true).await;

    // 10 more would be denied with the upgrade prompt; shadow mode lets it through.
    let second = reserve(&mut q, reserve_request("ann", "r2", "codex", 10)).await;
    assert_eq!(second.decision(), Decision::Allow, "{second:?}");
    assert_eq!(
        second.held,
        Some(pb::Funding {
            plan_micros: 10 * CREDIT,
            credit_micros: 0
        })
    );
    let shadow = second
        .shadow_denial
        .clone()
        .expect("the denial it would have had");
    assert_eq!(shadow.reason(), DenyReason::WindowExhausted);
    assert_eq!(shadow.action(), Action::UpgradePlan);
    assert_eq!(shadow.upgrade_to, "go");
    assert!(shadow.retry_at.is_some());
    assert!(
        shadow.message.contains("Upgrade to go"),
        "{}",
        shadow.message
    );

    // A retry gets its first answer (the same reservation), without counting the denial again.
    let retried = reserve(&mut q, reserve_request("ann", "r2", "codex", 10)).await;
    assert_eq!(retried.reservation_id, second.reservation_id);
    assert_eq!(retried.shadow_denial, None);

    // A long task's next chunk is funded too, and says so.
    let partial = commit(&mut q, "ann", &second.reservation_id, 4, false).await;
    assert!(partial.may_continue);
    let chunk = partial
        .shadow_denial
        .expect("the next chunk is over the limit");
    assert_eq!(chunk.reason(), DenyReason::WindowExhausted);
    let done = commit(&mut q, "ann", &second.reservation_id, 12, true).await;
    assert_eq!(
        done.charged_total,
        Some(pb::Funding {
            plan_micros: 12 * CREDIT,
            credit_micros: 0
        })
    );

    // Recorded as usual: the window past its limit, two charges in the history.
    let usage = q
        .get_usage(pb::GetUsageRequest {
            account_id: "ann".into(),
            recent_limit: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let five_hour = &usage.windows[0];
    assert_eq!(
        (five_hour.used_micros, five_hour.limit_micros),
        (22 * CREDIT, 15 * CREDIT)
    );
    assert_eq!(usage.recent.len(), 3, "{:?}", usage.recent);

    // A plan not in shadow mode still denies.
    let hint = pb::ReserveRequest {
        plan_hint: "go".into(),
        ..reserve_request("gus", "g1", "codex", 60)
    };
    let denied = reserve(&mut q, hint).await;
    assert_eq!(denied.decision(), Decision::Deny);
    assert_eq!(denied.shadow_denial, None);
    server.stop().await;
}

async fn a_credits_plan_in_shadow_spends_no_credits_it_has_not_got(store: support::TestStore) {
    let config = Config {
        shadow: true,
        ..Config::default()
    };
    let server = TestServer::start_with(config, store).await;
    let mut q = server.quota().await;
    let mut admin = server.admin().await;
    admin
        .upsert_account(pb::UpsertAccountRequest {
            account: Some(pb::Account {
                account_id: "pat".into(),
                plan: "plus".into(),
                credit_purchase_allowed: true,
            }),
        })
        .await
        .unwrap();
    admin
        .grant_credits(pb::GrantCreditsRequest {
            account_id: "pat".into(),
            grant_id: "g1".into(),
            amount_micros: 5 * CREDIT,
            ..Default::default()
        })
        .await
        .unwrap();
    // 150 plan credits + 5 credits pay for 155; 160 would be CREDITS_EXHAUSTED.
    let r = reserve(&mut q, reserve_request("pat", "p1", "codex", 160)).await;
    assert_eq!(r.decision(), Decision::Allow);
    assert_eq!(
        r.shadow_denial.as_ref().map(pb::ShadowDenial::action),
        Some(Action::BuyCredits)
    );
    assert_eq!(
        r.held,
        Some(pb::Funding {
            plan_micros: 160 * CREDIT,
            credit_micros: 0
        }),
        "held on the plan, not on credits"
    );
    let done = commit(&mut q, "pat", &r.reservation_id, 160, true).await;
    assert_eq!(done.charged.unwrap().credit_micros, 0);
    assert_eq!(
        done.credit_balance_micros,
        5 * CREDIT,
        "the credits are untouched"
    );
    server.stop().await;
}

/// The real binary with `shadow = true` in its file: the denial is counted by reason and
/// action in `/metrics` and logged with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_denial_is_counted_and_logged() {
    let dir = std::env::temp_dir().join(format!("quotad-shadow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("quotad.toml");
    std::fs::write(&file, "shadow = true\n").unwrap();
    let path = file.to_str().unwrap().to_owned();
    let quotad = tokio::task::spawn_blocking(move || {
        Quotad::start(&["--config", &path], &[("QUOTAD_ADMIN_TOKEN", ADMIN_TOKEN)])
    })
    .await
    .unwrap();
    let mut q = pb::quota_service_client::QuotaServiceClient::connect(quotad.url())
        .await
        .unwrap();
    let over = reserve(&mut q, reserve_request("zoe", "z1", "excel", 20)).await;
    assert_eq!(over.decision(), Decision::Allow);
    let (status, metrics) = http_get(&quotad.http_addr, "/metrics").await;
    assert_eq!(status, 200);
    let counted = r#"quotad_shadow_denials_total{op="reserve",reason="WINDOW_EXHAUSTED",action="UPGRADE_PLAN",plan="free",product="excel"} 1"#;
    assert!(
        metrics.contains(counted),
        "{counted} missing from\n{metrics}"
    );
    assert!(
        metrics.contains(
            r#"quotad_decisions_total{decision="ALLOW",action="NONE",reason="NONE",plan="free",product="excel"} 1"#
        ),
        "answered ALLOW:\n{metrics}"
    );
    quotad
        .until_logged("the shadow denial", |l| {
            l.contains("shadow mode")
                && l.contains("WINDOW_EXHAUSTED")
                && l.contains("UPGRADE_PLAN")
        })
        .await;
    let _ = std::fs::remove_dir_all(&dir);
}
