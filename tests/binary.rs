//! The `quotad` binary itself: it serves on the address it logs, prints its effective config
//! without secrets, refuses a bad config with a clear message, and exits 0 on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quotad::api::pb;
use quotad::api::pb::quota_service_client::QuotaServiceClient;

fn quotad() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_quotad"));
    cmd.env_remove("RUST_LOG")
        .env_remove("QUOTAD_CONFIG")
        .env_remove("QUOTAD_ADMIN_TOKEN");
    cmd
}

/// Starts `quotad serve` on port 0 and returns the child and the address it logged.
fn serve(extra_env: &[(&str, &str)]) -> (Child, String, BufReader<std::process::ChildStdout>) {
    let mut child = quotad()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .envs(extra_env.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Some(rest) = line.split("listening on ").nth(1) {
            let addr = rest.split_whitespace().next().unwrap().to_owned();
            return (child, addr, out);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("quotad did not log its address; last line: {line}");
}

#[tokio::test]
async fn serves_on_the_logged_address_and_exits_0_on_sigterm() {
    // Kubernetes injects QUOTAD_PORT & co. for a Service named quotad: they are not config.
    let (mut child, addr, mut out) = serve(&[
        ("QUOTAD_PORT", "tcp://10.0.0.1:50051"),
        ("QUOTAD_SERVICE_HOST", "10.0.0.1"),
    ]);
    let mut client = QuotaServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let req = pb::ReserveRequest {
        account_id: "a".into(),
        request_id: "r".into(),
        product: "codex".into(),
        estimate: Some(pb::Usage {
            model: "gpt-5.5".into(),
            output_tokens: 1_000,
            ..Default::default()
        }),
        ..Default::default()
    };
    let resp = client.reserve(req).await.unwrap().into_inner();
    assert_eq!(resp.decision(), pb::Decision::Allow);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(
        rest.contains("shutting down") && rest.contains("stopped"),
        "{rest}"
    );
}

#[test]
fn config_prints_the_layers_without_secrets() {
    let dir = std::env::temp_dir().join(format!("quotad-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("quotad.toml");
    std::fs::write(&file, "listen = \"0.0.0.0:6000\"\n[limits]\ndefault_ttl_seconds = 120\nmax_ttl_seconds = 3600\nidempotency_retention_seconds = 86400\nmax_tokens = 1000\nmax_images = 1\nmax_grant_micros = 1000\nrecent_events = 5\nmax_id_bytes = 64\n").unwrap();
    let out = quotad()
        .args(["config", "--config"])
        .arg(&file)
        .args(["--listen", "127.0.0.1:7000"])
        .env("QUOTAD_ADMIN_TOKEN", "hunter2-token")
        .env("QUOTAD_LOG_LEVEL", "debug")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(
        shown.contains("listen = \"127.0.0.1:7000\""),
        "flag over file: {shown}"
    );
    assert!(
        shown.contains("default_ttl_seconds = 120"),
        "file over defaults: {shown}"
    );
    assert!(
        shown.contains("log_level = \"debug\""),
        "env over defaults: {shown}"
    );
    assert!(shown.contains("[plans.plus]"), "defaults kept: {shown}");
    assert!(
        !shown.contains("hunter2-token") && shown.contains("admin_token = \"<redacted>\""),
        "{shown}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_config_fails_at_start_naming_the_key() {
    let out = quotad()
        .args(["serve"])
        .env("QUOTAD_LIMITS__MAX_TTL_SECONDS", "999999")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("limits.max_ttl_seconds must be at most 86400"),
        "{err}"
    );

    let out = quotad()
        .args(["config", "--config", "/nonexistent/quotad.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/quotad.toml does not exist")
    );
}
