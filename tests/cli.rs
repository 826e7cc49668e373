//! `quotactl` against a real quotad: human output, `--json`, denials exiting 0, bad input and
//! missing credentials exiting 1 with a clear message.

mod support;

use std::process::{Command, Output};

use quotad::config::StoreKind;
use serde_json::Value;
use support::{ADMIN_TOKEN, TestServer};

async fn quotactl(server: &TestServer, args: &[&str], token: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_quotactl"));
    cmd.arg("--addr")
        .arg(server.url())
        .args(args)
        .env_remove("QUOTAD_ADMIN_TOKEN")
        .env_remove("QUOTACTL_ADDR");
    if let Some(token) = token {
        cmd.env("QUOTAD_ADMIN_TOKEN", token);
    }
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_str(&stdout(out)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_user_hits_the_limit_and_a_plus_user_runs_on_credits() {
    let server = TestServer::start(StoreKind::Memory).await;
    // 40k input + 5k output tokens on gpt-5.5: 10 credits of the free plan's 15.
    let task = ["--product", "codex", "--input", "40000", "--output", "5000"];
    let first = json(
        &quotactl(
            &server,
            &[&["--json", "reserve", "alice"][..], &task].concat(),
            None,
        )
        .await,
    );
    assert_eq!(first["decision"], "ALLOW");
    assert_eq!(first["held"]["plan_micros"], 10_000_000);
    let id = first["reservation_id"].as_str().unwrap().to_owned();
    let done = stdout(
        &quotactl(
            &server,
            &[
                "commit", "alice", &id, "--input", "40000", "--output", "5000",
            ],
            None,
        )
        .await,
    );
    assert!(
        done.contains("charged  10 credits (plan 10, credits 0)"),
        "{done}"
    );

    let denied = quotactl(&server, &[&["reserve", "alice"][..], &task].concat(), None).await;
    let text = stdout(&denied);
    assert!(text.starts_with("DENY"), "{text}");
    assert!(
        text.contains("action   UPGRADE_PLAN") && text.contains("upgrade  go"),
        "{text}"
    );

    assert!(
        stdout(
            &quotactl(
                &server,
                &["account", "set", "bob", "--plan", "plus"],
                Some(ADMIN_TOKEN)
            )
            .await
        )
        .contains("plan plus")
    );
    let grant = json(
        &quotactl(
            &server,
            &[
                "--json",
                "grant",
                "bob",
                "--credits",
                "25.5",
                "--grant-id",
                "g1",
            ],
            Some(ADMIN_TOKEN),
        )
        .await,
    );
    assert_eq!(grant["credit_balance_micros"], 25_500_000);
    // 140 credits of the plan's 150, then a 16-credit spreadsheet task: 10 on the plan, 6 on credits.
    let big = json(
        &quotactl(
            &server,
            &[
                "--json",
                "reserve",
                "bob",
                "--product",
                "codex",
                "--output",
                "140000",
            ],
            None,
        )
        .await,
    );
    let big_id = big["reservation_id"].as_str().unwrap().to_owned();
    stdout(
        &quotactl(
            &server,
            &["commit", "bob", &big_id, "--output", "140000"],
            None,
        )
        .await,
    );
    let sheet = [
        "--product",
        "excel",
        "--input",
        "60000",
        "--cached",
        "40000",
        "--output",
        "8000",
    ];
    let split = json(
        &quotactl(
            &server,
            &[&["--json", "reserve", "bob"][..], &sheet].concat(),
            None,
        )
        .await,
    );
    assert_eq!(split["held"]["plan_micros"], 10_000_000);
    assert_eq!(split["held"]["credit_micros"], 6_000_000);
    let usage = stdout(&quotactl(&server, &["usage", "bob"], None).await);
    assert!(
        usage.contains("balance  25.5 credits") && usage.contains("held 6"),
        "{usage}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_missing_credentials_exit_1_with_a_clear_message() {
    let server = TestServer::start(StoreKind::Memory).await;
    let bad = quotactl(
        &server,
        &["grant", "bob", "--credits", "1.0000001"],
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("at most 6 decimal places"));

    let anonymous = quotactl(&server, &["account", "get", "bob"], None).await;
    assert_eq!(anonymous.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&anonymous.stderr).contains("Unauthenticated"),
        "{anonymous:?}"
    );

    let unknown = quotactl(
        &server,
        &["reserve", "bob", "--product", "chess", "--output", "1"],
        None,
    )
    .await;
    assert_eq!(unknown.status.code(), Some(1));
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        err.contains("InvalidArgument") && err.contains("product: unknown product \"chess\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topup_set_show_and_disable() {
    let server = TestServer::start(StoreKind::Memory).await;
    stdout(
        &quotactl(
            &server,
            &["account", "set", "carol", "--plan", "pro"],
            Some(ADMIN_TOKEN),
        )
        .await,
    );
    let set = stdout(
        &quotactl(
            &server,
            &[
                "topup",
                "set",
                "carol",
                "--threshold",
                "10",
                "--target",
                "50.5",
            ],
            Some(ADMIN_TOKEN),
        )
        .await,
    );
    assert!(
        set.starts_with("auto top-up on: below 10 credits, buy back up to 50.5"),
        "{set}"
    );
    let started = std::time::Instant::now();
    loop {
        let shown = json(&quotactl(&server, &["--json", "topup", "show", "carol"], None).await);
        if shown["last_attempt"]["outcome"] == "SUCCEEDED" {
            assert_eq!(
                shown["last_attempt"]["amount_micros"], 51_000_000,
                "rounded up to whole credits"
            );
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{shown}"
        );
    }
    let off = stdout(&quotactl(&server, &["topup", "disable", "carol"], Some(ADMIN_TOKEN)).await);
    assert!(off.starts_with("auto top-up off"), "{off}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_export_show_every_charge() {
    let server = TestServer::start(StoreKind::Memory).await;
    for _ in 0..2 {
        let reserved = json(
            &quotactl(
                &server,
                &[
                    "--json",
                    "reserve",
                    "dora",
                    "--product",
                    "codex",
                    "--output",
                    "1000",
                ],
                None,
            )
            .await,
        );
        let id = reserved["reservation_id"].as_str().unwrap().to_owned();
        stdout(&quotactl(&server, &["commit", "dora", &id, "--output", "1000"], None).await);
    }
    let history = json(&quotactl(&server, &["--json", "history", "dora"], None).await);
    let events = history["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["event_id"], "dora:2", "newest first");
    assert_eq!(events[0]["output_tokens"], 1000);
    let text = stdout(&quotactl(&server, &["history", "dora"], None).await);
    assert!(
        text.contains("dora:1") && text.contains("codex gpt-5.5"),
        "{text}"
    );

    let read = |ack: bool| {
        let mut args = vec!["--json", "export", "read", "--group", "billing"];
        if ack {
            args.push("--ack");
        }
        let server = &server;
        async move { json(&quotactl(server, &args, Some(ADMIN_TOKEN)).await) }
    };
    let first = read(true).await;
    assert_eq!(first["events"].as_array().unwrap().len(), 2);
    assert_eq!(first["acknowledged"], 2);
    assert_eq!(first["events"][1]["event"]["event_id"], "dora:2");
    let again = read(false).await;
    assert!(again["events"].as_array().unwrap().is_empty(), "{again}");
    let refused = quotactl(&server, &["export", "read", "--group", "billing"], None).await;
    assert_eq!(refused.status.code(), Some(1));
}
