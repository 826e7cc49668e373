//! What a platform team relies on: `/metrics`, `/healthz` and `/readyz` on the HTTP admin port
//! after real traffic; not serving while the store has never answered; bearer tokens on each
//! service; mTLS with a CA made by the test, and certificates reloaded from disk; load beyond
//! the concurrency limit refused at once; SIGTERM letting a call in flight finish while new
//! connections are refused, then exiting 0.

use crate::support;

use std::path::Path;
use std::time::{Duration, Instant};

use quotad::api::pb;
use quotad::api::pb::admin_service_client::AdminServiceClient;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use quotad::config::{Config, TlsConfig};
use support::pki::Pki;
use support::process::{Quotad, http_get};
use support::redis::RedisServer;
use support::{ADMIN_TOKEN, BearerToken, TestServer, costing};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// `GET path` over a fresh connection: (status code, body).
fn reserve(account: &str, request: &str, credits: u64) -> pb::ReserveRequest {
    pb::ReserveRequest {
        account_id: account.into(),
        request_id: request.into(),
        product: "codex".into(),
        estimate: Some(costing(credits)),
        ..Default::default()
    }
}

async fn health(url: &str, service: &str) -> Result<ServingStatus, tonic::Status> {
    let channel = Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let request = tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    };
    let answer = HealthClient::new(channel).check(request).await?;
    Ok(answer.into_inner().status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_probes_after_traffic() {
    let quotad =
        tokio::task::spawn_blocking(|| Quotad::start(&[], &[("QUOTAD_ADMIN_TOKEN", ADMIN_TOKEN)]))
            .await
            .unwrap();
    let mut q = QuotaServiceClient::connect(quotad.url()).await.unwrap();
    let allowed = q
        .reserve(reserve("alice-secret-id", "r1", 10))
        .await
        .unwrap()
        .into_inner();
    q.commit(pb::CommitRequest {
        account_id: "alice-secret-id".into(),
        reservation_id: allowed.reservation_id,
        usage: Some(costing(8)),
        r#final: true,
    })
    .await
    .unwrap();
    let denied = q
        .reserve(reserve("alice-secret-id", "r2", 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(denied.decision(), pb::Decision::Deny);
    q.reserve(reserve("bob", "r3", 2)).await.unwrap(); // left open
    let bad = q.reserve(reserve("", "r4", 1)).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // The store's sample is taken every 200 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, text) = http_get(&quotad.http_addr, "/metrics").await;
    assert_eq!(status, 200);
    for expected in [
        r#"quotad_decisions_total{decision="ALLOW",action="NONE",reason="NONE",plan="free",product="codex"} 2"#,
        r#"quotad_decisions_total{decision="DENY",action="UPGRADE_PLAN",reason="WINDOW_EXHAUSTED",plan="free",product="codex"} 1"#,
        r#"quotad_rpc_responses_total{method="Reserve",code="OK"} 3"#,
        r#"quotad_rpc_responses_total{method="Reserve",code="INVALID_ARGUMENT"} 1"#,
        r#"quotad_rpc_duration_seconds_count{method="Commit"} 1"#,
        r#"quotad_store_duration_seconds_count{op="reserve"} 3"#,
        r#"quotad_holds_closed_total{outcome="commit"} 1"#,
        "quotad_open_holds 1",
        "quotad_store_up 1",
        "quotad_shed_total 0",
    ] {
        assert!(text.contains(expected), "{expected} missing from\n{text}");
    }
    assert!(!text.contains("alice"), "no account id in metrics");
    assert!(
        !quotad.output().contains("alice-secret-id"),
        "no account id in logs"
    );
    assert_eq!(http_get(&quotad.http_addr, "/healthz").await.0, 200);
    let (status, body) = http_get(&quotad.http_addr, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\nstore: up\n"));
    assert_eq!(http_get(&quotad.http_addr, "/nope").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_until_the_store_has_answered_once() {
    let mut redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    redis.kill();
    let url = redis.url();
    let quotad = tokio::task::spawn_blocking(move || {
        Quotad::start_listening(
            &["--store", "redis"],
            &[
                ("QUOTAD_REDIS_URL", url.as_str()),
                ("QUOTAD_ADMIN_TOKEN", ADMIN_TOKEN),
            ],
        )
    })
    .await
    .unwrap();
    let (status, body) = http_get(&quotad.http_addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("starting"), "{body}");
    assert_eq!(
        health(&quotad.url(), "").await.unwrap(),
        ServingStatus::NotServing
    );
    let mut q = QuotaServiceClient::connect(quotad.url()).await.unwrap();
    let err = q.reserve(reserve("a", "r", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    let redis = tokio::task::spawn_blocking(move || {
        redis.restart();
        redis
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while health(&quotad.url(), "").await.unwrap() != ServingStatus::Serving {
        assert!(Instant::now() < deadline, "{}", quotad.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http_get(&quotad.http_addr, "/readyz").await.0, 200);
    q.reserve(reserve("a", "r", 1)).await.unwrap();

    // Once serving, an outage does not make the pod unready: it shows in the body.
    let mut redis = redis;
    tokio::task::spawn_blocking(move || {
        redis.kill();
    })
    .await
    .unwrap();
    let _ = q.reserve(reserve("a", "r2", 1)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, body) = http_get(&quotad.http_addr, "/readyz").await;
    assert_eq!(status, 200);
    assert!(body.contains("store: down"), "{body}");
    assert_eq!(
        health(&quotad.url(), "").await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(
        health(&quotad.url(), "quotad.store").await.unwrap(),
        ServingStatus::NotServing
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_checks_its_own_bearer_token() {
    let config = Config {
        quota_token: Some("quota-token".into()),
        ..Config::default()
    };
    let server = TestServer::start_with(config, quotad::config::StoreKind::Memory).await;
    let channel = server.channel().await;
    let quota = |token: Option<&str>| {
        QuotaServiceClient::with_interceptor(channel.clone(), BearerToken(token.map(Into::into)))
    };
    let admin = |token: Option<&str>| {
        AdminServiceClient::with_interceptor(channel.clone(), BearerToken(token.map(Into::into)))
    };
    for token in [None, Some("wrong"), Some(ADMIN_TOKEN)] {
        let err = quota(token)
            .reserve(reserve("a", "r", 1))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
    }
    quota(Some("quota-token"))
        .reserve(reserve("a", "r", 1))
        .await
        .unwrap();
    let get = || pb::GetAccountRequest {
        account_id: "a".into(),
    };
    for token in [None, Some("wrong"), Some("quota-token")] {
        let err = admin(token).get_account(get()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
    }
    admin(Some(ADMIN_TOKEN)).get_account(get()).await.unwrap();
    // Probes need no token.
    assert_eq!(
        health(&server.url(), "").await.unwrap(),
        ServingStatus::Serving
    );
}

async fn tls_client(
    url: &str,
    trust: &str,
    identity: Option<&(String, String)>,
) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(trust))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(url.replace("http://", "https://"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    QuotaServiceClient::new(channel)
        .reserve(reserve("tls-user", &uuid::Uuid::new_v4().to_string(), 1))
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

fn write(dir: &Path, name: &str, text: &str) {
    // Write then rename, as a Secret update does, so quotad never reads half a file.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join(name)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_needs_a_client_certificate_of_the_ca_and_certificates_reload() {
    let dir = std::env::temp_dir().join(format!("quotad-mtls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let (servers, clients, stranger) = (
        Pki::new(&dir, "server-ca"),
        Pki::new(&dir, "client-ca"),
        Pki::new(&dir, "other-ca"),
    );
    let (cert, key) = servers.issue_pem(&["localhost"]);
    write(&dir, "tls.crt", &cert);
    write(&dir, "tls.key", &key);
    write(&dir, "ca.crt", &clients.ca_pem());
    let config = Config {
        tls: TlsConfig {
            cert_file: Some(dir.join("tls.crt")),
            key_file: Some(dir.join("tls.key")),
            client_ca_file: Some(dir.join("ca.crt")),
            ..TlsConfig::default()
        },
        ..Config::default()
    };
    let server = TestServer::start_with(config, quotad::config::StoreKind::Memory).await;
    let url = server.url();
    let good = clients.issue_pem(&["frontend"]);
    let bad = stranger.issue_pem(&["frontend"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = tls_client(&url, &servers.ca_pem(), Some(&good)).await {
        assert!(Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        tls_client(&url, &servers.ca_pem(), None).await.is_err(),
        "no client certificate"
    );
    assert!(
        tls_client(&url, &servers.ca_pem(), Some(&bad))
            .await
            .is_err(),
        "a certificate of another CA"
    );
    // Plain text is refused too.
    let plain = QuotaServiceClient::connect(url.clone()).await;
    if let Ok(mut plain) = plain {
        assert!(plain.reserve(reserve("x", "y", 1)).await.is_err());
    }

    // Rotation: a server certificate from a new CA, written to the same files.
    let renewed = Pki::new(&dir, "renewed-server-ca");
    let (cert, key) = renewed.issue_pem(&["localhost"]);
    write(&dir, "tls.key", &key);
    write(&dir, "tls.crt", &cert);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tls_client(&url, &renewed.ca_pem(), Some(&good))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        tls_client(&url, &servers.ca_pem(), Some(&good))
            .await
            .is_err(),
        "old certificate gone"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_the_concurrency_limit_is_refused_at_once() {
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let mut config = Config::default();
    config.server.max_concurrent_requests = 4;
    let server = TestServer::start_on_redis(config, &redis.url()).await;
    let q = server.quota().await;
    q.clone().reserve(reserve("warm", "w", 1)).await.unwrap();

    // Redis holds every command for 1.5 s: four calls take every slot and wait.
    let redis = std::sync::Arc::new(redis);
    let pause = redis.clone();
    tokio::task::spawn_blocking(move || pause.cli(&["CLIENT", "PAUSE", "1500", "ALL"]).unwrap())
        .await
        .unwrap();
    let paused_at = Instant::now();
    let waiting: Vec<_> = (0..4)
        .map(|i| {
            let mut q = q.clone();
            tokio::spawn(async move { q.reserve(reserve("slow", &format!("s{i}"), 1)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let flood: Vec<_> = (0..100)
        .map(|i| {
            let mut q = q.clone();
            tokio::spawn(async move {
                let answer = q.reserve(reserve("flood", &format!("f{i}"), 1)).await;
                (answer, Instant::now())
            })
        })
        .collect();
    for call in flood {
        let (answer, at) = call.await.unwrap();
        let err = answer.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(
            at < paused_at + Duration::from_millis(1_500),
            "refused while the slots were still taken, not after waiting for one"
        );
    }
    for call in waiting {
        call.await.unwrap().unwrap();
    }
    q.clone().reserve(reserve("after", "a", 1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_calls_in_flight_refuses_new_ones_and_exits_0() {
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let url = redis.url();
    let mut quotad = tokio::task::spawn_blocking(move || {
        Quotad::start(
            &["--store", "redis"],
            &[
                ("QUOTAD_REDIS_URL", url.as_str()),
                ("QUOTAD_STORE__REDIS__COMMAND_TIMEOUT_MS", "5000"),
                ("QUOTAD_SHUTDOWN_GRACE_SECONDS", "10"),
            ],
        )
    })
    .await
    .unwrap();
    let mut q = QuotaServiceClient::connect(quotad.url()).await.unwrap();
    q.reserve(reserve("a", "warm", 1)).await.unwrap();
    // Owned mode (the Redis default) keeps the accounts it decides on in memory, and says so.
    let mut sampled = String::new();
    for _ in 0..50 {
        sampled = http_get(&quotad.http_addr, "/metrics").await.1;
        if sampled.contains("quotad_resident_accounts 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        sampled.contains("quotad_resident_accounts 1"),
        "quotad_resident_accounts missing or wrong in\n{sampled}"
    );

    let redis = std::sync::Arc::new(redis);
    let pause = redis.clone();
    tokio::task::spawn_blocking(move || pause.cli(&["CLIENT", "PAUSE", "1500", "ALL"]).unwrap())
        .await
        .unwrap();
    let in_flight = {
        let mut q = q.clone();
        tokio::spawn(async move { q.reserve(reserve("a", "in-flight", 1)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    quotad.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (status, body) = http_get(&quotad.http_addr, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "draining: shutting down\n"));
    let refused = QuotaServiceClient::connect(quotad.url()).await;
    assert!(
        refused.is_err(),
        "a new connection after SIGTERM is refused"
    );
    let answer = in_flight
        .await
        .unwrap()
        .expect("the call in flight completes");
    assert_eq!(answer.into_inner().decision(), pb::Decision::Allow);
    let exit = tokio::task::spawn_blocking(move || quotad.wait())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_on_its_own_listener_with_its_token_from_a_file() {
    let dir = std::env::temp_dir().join(format!("quotad-admin-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, "from-a-file\n").unwrap();
    let path = token_file.display().to_string();
    let quotad = tokio::task::spawn_blocking(move || {
        Quotad::start(
            &[],
            &[
                ("QUOTAD_ADMIN_LISTEN", "127.0.0.1:0"),
                ("QUOTAD_ADMIN_TOKEN_FILE", path.as_str()),
            ],
        )
    })
    .await
    .unwrap();
    let output = quotad.output();
    let admin_addr = output
        .split("AdminService at ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the admin address is logged")
        .to_owned();
    let admin = |url: String, token: &str| {
        let token = BearerToken(Some(token.into()));
        async move {
            let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
            AdminServiceClient::with_interceptor(channel, token)
        }
    };
    let get = || pb::GetAccountRequest {
        account_id: "nobody".into(),
    };
    // On its own port, with the token read from the file (its trailing newline dropped).
    let err = admin(format!("http://{admin_addr}"), "from-a-file")
        .await
        .get_account(get())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // Not on the main port at all.
    let err = admin(quotad.url(), "from-a-file")
        .await
        .get_account(get())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    // QuotaService stays on the main port.
    let mut q = QuotaServiceClient::connect(quotad.url()).await.unwrap();
    q.reserve(reserve("a", "r", 1)).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_deadline_is_unavailable_and_oversized_messages_are_refused() {
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let mut config = Config::default();
    config.server.request_timeout_ms = 300;
    config.server.max_message_bytes = 1_024;
    let server = TestServer::start_on_redis(config, &redis.url()).await;
    let mut q = server.quota().await;
    q.reserve(reserve("warm", "w", 1)).await.unwrap();

    // Redis holds every command for 1.5 s (the store's own timeout is 3 s): the call is
    // answered at its 300 ms deadline instead.
    let redis = std::sync::Arc::new(redis);
    let pause = redis.clone();
    tokio::task::spawn_blocking(move || pause.cli(&["CLIENT", "PAUSE", "1500", "ALL"]).unwrap())
        .await
        .unwrap();
    let err = q.reserve(reserve("slow", "s", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("did not answer within 300ms"),
        "{}",
        err.message()
    );

    // A request over server.max_message_bytes never reaches a handler.
    let huge = "x".repeat(2_000);
    let err = q.reserve(reserve("a", &huge, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{}", err.message());
}
