//! `quotactl bench` against a real quotad: every workload's counts add up, over-limit accounts
//! are denied and nothing else is, setup leaves the accounts it says it does, percentiles are
//! ordered, and a fixed rate is kept.

use crate::support;

use std::process::{Command, Output};

use quotad::api::pb;
use quotad::config::StoreKind;
use serde_json::Value;
use support::process::{Quotad, http_get};
use support::{ADMIN_TOKEN, TestServer};

async fn bench(addr: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_quotactl"));
    cmd.arg("--addr")
        .arg(addr)
        .args(["--token", ADMIN_TOKEN, "bench", "--warmup", "0s"])
        .args(args)
        .env_remove("QUOTAD_ADMIN_TOKEN")
        .env_remove("QUOTACTL_ADDR");
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

async fn bench_json(addr: &str, args: &[&str]) -> Value {
    let out = bench(addr, &[&["--json"][..], args].concat()).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// ok + denied + errors = operations; the percentiles are ordered and something was timed.
fn check_counts_and_percentiles(report: &Value) -> [u64; 5] {
    let errors: u64 = report["errors"].as_object().unwrap().values().map(n).sum();
    assert_eq!(
        n(&report["ok"]) + n(&report["denied"]) + errors,
        n(&report["operations"]),
        "{report}"
    );
    assert!(report["ops_per_s"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["duration_s"].as_f64().unwrap() > 0.0, "{report}");
    percentiles(&report["latency_us"])
}

fn percentiles(latency: &Value) -> [u64; 5] {
    let p = ["p50", "p90", "p99", "p99_9", "max"].map(|k| n(&latency[k]));
    assert!(p.windows(2).all(|w| w[0] <= w[1]), "{latency}");
    assert!(p[4] > 0, "{latency}");
    p
}

async fn usage(quota: &mut support::QuotaClient, account: &str) -> pb::GetUsageResponse {
    let request = pb::GetUsageRequest {
        account_id: account.into(),
        recent_limit: 0,
    };
    quota.get_usage(request).await.unwrap().into_inner()
}

const SMALL: [&str; 10] = [
    "--requests",
    "300",
    "--accounts",
    "50",
    "--over-limit-share",
    "0.2",
    "--seed",
    "7",
    "--connections",
    "2",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_commit_denies_only_the_over_limit_accounts() {
    let server = TestServer::start(StoreKind::Memory).await;
    let report = bench_json(&server.url(), &[&SMALL[..], &["--run-id", "rc"]].concat()).await;
    assert_eq!(report["workload"], "reserve-commit");
    assert_eq!(n(&report["operations"]), 300);
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    let pair = check_counts_and_percentiles(&report);
    let reserve = percentiles(&report["reserve_latency_us"]);
    assert!(
        reserve.iter().zip(pair).all(|(r, p)| *r <= p),
        "a Reserve never takes longer than its pair: {report}"
    );
    // 20% of 50 accounts over the limit, 10% on credits.
    assert_eq!(report["accounts"]["over_limit"], 10);
    assert_eq!(report["accounts"]["credit_funded"], 5);
    let denied = n(&report["denied"]);
    assert!(denied > 0, "{report}");
    assert_eq!(
        n(&report["denied_by_account"]["over_limit"]),
        denied,
        "{report}"
    );

    // Accounts 0..10 are over the limit, 10..15 plus accounts on credits.
    let mut quota = server.quota().await;
    let five_hours = |u: &pb::GetUsageResponse| {
        let w = u.windows.iter().find(|w| w.name == "5h").unwrap().clone();
        (w.used_micros, w.limit_micros)
    };
    let over = usage(&mut quota, "bench-rc-0").await;
    assert_eq!(over.plan, "free");
    let (used, limit) = five_hours(&over);
    assert!(used >= limit, "{over:?}");
    let credit = usage(&mut quota, "bench-rc-14").await;
    assert_eq!(credit.plan, "plus");
    let (used, limit) = five_hours(&credit);
    assert_eq!(used, limit, "{credit:?}");
    let ledger = credit.ledger.unwrap();
    assert_eq!(ledger.granted_micros, 10_000 * support::CREDIT);
    assert!(ledger.spent_micros > 0, "{ledger:?}");
    assert_eq!(ledger.held_micros, 0, "every pair was committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_health_and_rls_workloads_add_up() {
    let server = TestServer::start(StoreKind::Memory).await;
    let report = bench_json(
        &server.url(),
        &[&SMALL[..], &["--workload", "reserve"]].concat(),
    )
    .await;
    assert_eq!(report["workload"], "reserve");
    assert_eq!(n(&report["operations"]), 300);
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    assert!(report.get("reserve_latency_us").is_none(), "{report}");
    check_counts_and_percentiles(&report);
    let denied = n(&report["denied"]);
    assert!(denied > 0, "{report}");
    assert_eq!(n(&report["denied_by_account"]["over_limit"]), denied);

    let report = bench_json(
        &server.url(),
        &["--workload", "health", "--requests", "300"],
    )
    .await;
    assert_eq!(report["workload"], "health");
    assert_eq!(
        (n(&report["operations"]), n(&report["ok"])),
        (300, 300),
        "{report}"
    );
    check_counts_and_percentiles(&report);
    assert!(report.get("accounts").is_none(), "{report}");

    // Envoy's rate limit calls on the default config: the over-limit accounts are stopped at the
    // edge, nobody else is, and nothing fails.
    let report = bench_json(
        &server.url(),
        &[&SMALL[..], &["--workload", "rls"]].concat(),
    )
    .await;
    assert_eq!(report["workload"], "rls");
    assert_eq!(n(&report["operations"]), 300);
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    check_counts_and_percentiles(&report);
    let denied = n(&report["denied"]);
    assert!(denied > 0, "{report}");
    assert_eq!(n(&report["denied_by_account"]["over_limit"]), denied);

    let text = bench(
        &server.url(),
        &["--workload", "health", "--requests", "100"],
    )
    .await;
    assert!(text.status.success(), "{text:?}");
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.starts_with("workload    health: 4 connections, 64 in flight")
            && text.contains("operations  100 in ")
            && text.contains("ok          100")
            && text.contains("errors      none")
            && text.contains("p99.9"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_rate_is_kept() {
    let server = TestServer::start(StoreKind::Memory).await;
    let report = bench_json(
        &server.url(),
        &["--rate", "200", "--duration", "1s", "--accounts", "50"],
    )
    .await;
    let operations = n(&report["operations"]);
    assert!((190..=210).contains(&operations), "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    let secs = report["duration_s"].as_f64().unwrap();
    assert!((0.9..2.0).contains(&secs), "{report}");
    check_counts_and_percentiles(&report);
    assert_eq!(report["rate"], 200.0);
}

/// The health-pair workload makes two health checks per operation, as the server counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_pairs_are_two_health_checks_each() {
    let quotad = Quotad::start(&[], &[]);
    let checks = async || {
        let (status, text) = http_get(&quotad.http_addr, "/metrics").await;
        assert_eq!(status, 200);
        text.lines()
            .find_map(|l| {
                l.strip_prefix(r#"quotad_rpc_responses_total{method="Check",code="OK"} "#)
            })
            .map_or(0, |n| n.parse::<u64>().unwrap())
    };
    let before = checks().await;
    let report = bench_json(
        &quotad.url(),
        &["--workload", "health-pair", "--requests", "300"],
    )
    .await;
    assert_eq!(report["workload"], "health-pair");
    assert_eq!(
        (n(&report["operations"]), n(&report["ok"])),
        (300, 300),
        "{report}"
    );
    check_counts_and_percentiles(&report);
    // And the one check bench makes before the run, to see that quotad answers.
    assert_eq!(checks().await - before, 601);
}
