//! The `quotad` binary itself: it serves on the address it logs, prints its effective config
//! without secrets, refuses a bad config with a clear message, exits 0 on SIGTERM, and serves
//! on the worker threads it is given.

use crate::support;

use quotad::api::pb;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use support::process::{Quotad, command as quotad};

#[tokio::test]
async fn serves_on_the_logged_address_and_exits_0_on_sigterm() {
    // Kubernetes injects QUOTAD_PORT & co. for a Service named quotad: they are not config.
    let env = [
        ("QUOTAD_PORT", "tcp://10.0.0.1:50051"),
        ("QUOTAD_SERVICE_HOST", "10.0.0.1"),
    ];
    let mut server = tokio::task::spawn_blocking(move || Quotad::start(&[], &env))
        .await
        .unwrap();
    let mut client = QuotaServiceClient::connect(server.url()).await.unwrap();
    let resp = client.reserve(a_reserve()).await.unwrap().into_inner();
    assert_eq!(resp.decision(), pb::Decision::Allow);

    server.signal("TERM");
    let (server, exit) = tokio::task::spawn_blocking(move || {
        let exit = server.wait();
        (server, exit)
    })
    .await
    .unwrap();
    assert_eq!(exit.code(), Some(0));
    let printed = server.output();
    assert!(
        printed.contains("shutting down") && printed.contains("stopped"),
        "{printed}"
    );
    // The default keeps nothing, and says so.
    assert!(printed.contains("nothing survives a restart"), "{printed}");
}

fn a_reserve() -> pb::ReserveRequest {
    pb::ReserveRequest {
        account_id: "a".into(),
        request_id: "r".into(),
        product: "codex".into(),
        estimate: Some(pb::Usage {
            model: "gpt-5.5".into(),
            output_tokens: 1_000,
            ..Default::default()
        }),
        ..Default::default()
    }
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

/// What `quotad serve` prints on standard error when it refuses to start with `name=value`.
fn refused_at_start(name: &str, value: &str) -> String {
    let out = quotad().args(["serve"]).env(name, value).output().unwrap();
    assert!(!out.status.success(), "started with {name}={value}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_bad_config_fails_at_start_naming_the_key() {
    let err = refused_at_start("QUOTAD_LIMITS__MAX_TTL_SECONDS", "999999");
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

#[tokio::test]
async fn serves_on_as_many_worker_threads_as_configured() {
    // Worker threads of the runtime, by the name tokio gives them (cut to 15 bytes by Linux).
    let workers = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter(|task| {
                let comm = task.as_ref().unwrap().path().join("comm");
                std::fs::read_to_string(comm).is_ok_and(|name| name.starts_with("tokio-r"))
            })
            .count()
    };
    let cores = std::thread::available_parallelism().unwrap().get();
    for (setting, expected) in [("1", 1), ("3", 3), ("0", cores)] {
        let env = [("QUOTAD_SERVER__WORKER_THREADS", setting)];
        let server = tokio::task::spawn_blocking(move || Quotad::start(&[], &env))
            .await
            .unwrap();
        let mut client = QuotaServiceClient::connect(server.url()).await.unwrap();
        let resp = client.reserve(a_reserve()).await.unwrap().into_inner();
        assert_eq!(resp.decision(), pb::Decision::Allow);
        assert_eq!(
            workers(server.pid()),
            expected,
            "worker_threads = {setting}"
        );
    }

    let err = refused_at_start("QUOTAD_SERVER__WORKER_THREADS", "5000");
    assert!(
        err.contains("server.worker_threads must be between 0 (one per core) and 1024, got 5000"),
        "{err}"
    );
}
