//! A real quotad process on a real Redis that goes away: calls fail fast with UNAVAILABLE,
//! gRPC health stays SERVING while the store's own health name says NOT_SERVING, quotad serves
//! again within seconds of Redis returning (no restart; owned mode at its next ownership round,
//! a third of a lease), and SIGTERM is honoured throughout.

use crate::support;

use std::time::{Duration, Instant};

use quotad::api::pb;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use quotad::server::STORE_HEALTH_NAME;
use support::costing;
use support::process::Quotad;
use support::redis::RedisServer;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn health(channel: &Channel, service: &str) -> ServingStatus {
    let mut client = HealthClient::new(channel.clone());
    let request = HealthCheckRequest {
        service: service.into(),
    };
    client.check(request).await.unwrap().into_inner().status()
}

async fn wait_for_store(channel: &Channel, status: ServingStatus) {
    let started = Instant::now();
    while health(channel, STORE_HEALTH_NAME).await != status {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "store health did not become {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn reserve(n: u64) -> pb::ReserveRequest {
    pb::ReserveRequest {
        account_id: format!("acct-{n}"),
        request_id: format!("r-{n}"),
        product: "codex".into(),
        estimate: Some(costing(1)),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quotad_fails_fast_while_redis_is_down_and_recovers_by_itself() {
    let mut redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let url = redis.url();
    let mut quotad = tokio::task::spawn_blocking(move || {
        Quotad::start(
            &["--store", "redis", "--redis-url", &url],
            // Owned mode (the default) takes its partitions back at its next ownership round
            // (every third of a lease) once Redis returns without them: a short lease.
            &[
                ("QUOTAD_LOG_LEVEL", "info"),
                ("QUOTAD_STORE__REDIS__LEASE_MS", "1500"),
            ],
        )
    })
    .await
    .unwrap();
    let channel = Channel::from_shared(quotad.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = QuotaServiceClient::new(channel.clone());
    client.clone().reserve(reserve(0)).await.unwrap();
    wait_for_store(&channel, ServingStatus::Serving).await;

    redis.kill();
    // 200 calls in flight at a time, 20,000 distinct accounts.
    let mut latencies = Vec::new();
    for wave in 0..100u64 {
        let calls: Vec<_> = (0..200u64)
            .map(|i| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    let out = client.reserve(reserve(1 + wave * 200 + i)).await;
                    (t.elapsed(), out.map(|_| ()).map_err(|s| s.code()))
                })
            })
            .collect();
        for call in calls {
            let (took, out) = call.await.unwrap();
            assert_eq!(out, Err(Code::Unavailable));
            latencies.push(took);
        }
    }
    latencies.sort();
    let max = *latencies.last().unwrap();
    println!(
        "outage over gRPC (debug build): p50 {:?}, max {max:?}",
        latencies[latencies.len() / 2]
    );
    // Never hang: the figures (p99.9 in a release build) come from `cargo bench --bench outage`.
    assert!(
        max < Duration::from_secs(1),
        "a call waited {max:?}: calls must fail, not hang, while Redis is down"
    );
    assert_eq!(
        health(&channel, "").await,
        ServingStatus::Serving,
        "one shared dependency must not take the pod out"
    );
    assert_eq!(
        health(&channel, "quota.v1.QuotaService").await,
        ServingStatus::Serving
    );
    wait_for_store(&channel, ServingStatus::NotServing).await;
    quotad
        .until_logged("the outage", |l| l.contains("Redis does not answer"))
        .await;

    redis.restart();
    let back = Instant::now();
    let mut n = 1_000_000;
    while client.clone().reserve(reserve(n)).await.is_err() {
        assert!(
            back.elapsed() < Duration::from_secs(3),
            "not serving within 3 s of Redis returning"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("serving again {:?} after Redis returned", back.elapsed());
    wait_for_store(&channel, ServingStatus::Serving).await;

    // SIGTERM is honoured during an outage too.
    redis.kill();
    let _ = client.clone().reserve(reserve(2_000_000)).await;
    quotad.signal("TERM");
    let exit = tokio::task::spawn_blocking(move || quotad.wait())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}
