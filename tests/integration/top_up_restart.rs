//! A quotad killed between recording an auto top-up purchase and the payment's reply: after it
//! comes back, the purchase is paid again with the same idempotency key and settled once (one
//! lot), never doubled.

use crate::support;

use std::time::{Duration, Instant};

use quotad::api::pb;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use support::billing::{Answer, billing_service};
use support::process::Quotad;
use support::redis::{RedisServer, fresh_prefix};
use support::{ADMIN_TOKEN, CREDIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purchase_cut_off_by_a_crash_is_resumed_with_the_same_key() {
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let (billing_url, billing) = billing_service().await;
    // The first charge is never answered while that quotad lives.
    billing.answers(&[Answer::Stall(Duration::from_secs(30))]);
    let env: Vec<(String, String)> = vec![
        ("QUOTAD_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
        ("QUOTAD_LOG_LEVEL".into(), "info".into()),
        ("QUOTAD_STORE__KIND".into(), "redis".into()),
        ("QUOTAD_REDIS_URL".into(), redis.url()),
        ("QUOTAD_STORE__REDIS__KEY_PREFIX".into(), fresh_prefix()),
        (
            "QUOTAD_STORE__REDIS__COMMAND_TIMEOUT_MS".into(),
            "2000".into(),
        ),
        // The killed owner's partitions move once its lease ends.
        ("QUOTAD_STORE__REDIS__LEASE_MS".into(), "2000".into()),
        ("QUOTAD_PAYMENTS__PROVIDER".into(), "http".into()),
        ("QUOTAD_PAYMENTS__HTTP_URL".into(), billing_url),
        ("QUOTAD_PAYMENTS__HTTP_TIMEOUT_MS".into(), "60000".into()),
        ("QUOTAD_PAYMENTS__RESUME_AFTER_MS".into(), "300".into()),
    ];
    let start = |env: Vec<(String, String)>| {
        tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            Quotad::start(&[], &env)
        })
    };
    let mut first = start(env.clone()).await.unwrap();
    let mut admin = support::admin_client(&first.url()).await;
    let account = pb::Account {
        account_id: "r".into(),
        plan: "pro".into(),
        credit_purchase_allowed: true,
    };
    admin
        .upsert_account(pb::UpsertAccountRequest {
            account: Some(account),
        })
        .await
        .unwrap();
    let settings = pb::SetAutoTopUpRequest {
        account_id: "r".into(),
        enabled: true,
        threshold_micros: 10 * CREDIT,
        target_micros: 40 * CREDIT,
        monthly_cap_micros: 0,
    };
    admin.set_auto_top_up(settings).await.unwrap();
    let waited = Instant::now();
    while billing.seen().is_empty() {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the charge was never sent"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Killed while the billing service has not answered: the purchase is in flight in Redis.
    first.signal("KILL");
    tokio::task::spawn_blocking(move || first.wait())
        .await
        .unwrap();

    let second = start(env).await.unwrap();
    let mut quota = QuotaServiceClient::connect(second.url()).await.unwrap();
    let waited = Instant::now();
    let usage = loop {
        let answer = quota
            .get_usage(pb::GetUsageRequest {
                account_id: "r".into(),
                recent_limit: 0,
            })
            .await;
        let u = match answer {
            Ok(u) => u.into_inner(),
            // Owned mode: the partition is still the killed owner's until its lease ends.
            Err(s) if s.code() == tonic::Code::Unavailable => {
                assert!(waited.elapsed() < Duration::from_secs(30), "{s:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(s) => panic!("{s:?}"),
        };
        let settled = u
            .auto_top_up
            .as_ref()
            .and_then(|t| t.last_attempt.as_ref())
            .map(|a| a.outcome());
        if settled == Some(pb::TopUpOutcome::Succeeded) {
            break u;
        }
        // Maintenance looks at a slice of the purchase index each tick and goes round all of
        // it every 16 s, starting anywhere: the purchase is found within one round.
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the purchase was not resumed: {u:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let seen = billing.seen();
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(
        seen.iter().all(|s| s.idempotency_key == "topup:r:1"),
        "the same key: {seen:?}"
    );
    let lots: Vec<_> = usage
        .lots
        .iter()
        .filter(|l| l.source == "auto_top_up")
        .collect();
    assert_eq!(lots.len(), 1, "one lot, never doubled");
    assert_eq!(usage.credit_balance_micros, 40 * CREDIT);
    drop(second);
}
