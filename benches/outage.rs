//! Failing fast while Redis is down, measured: quotad on the Redis store, Redis killed, then a
//! million Reserve calls for a million distinct accounts with hundreds in flight over gRPC.
//! Reports the latency of the UNAVAILABLE answers, and how long after Redis returns quotad
//! serves again (no restart).
//!
//! `cargo bench --bench outage` (needs `redis-server`). `BENCH_CALLS` (default 1000000) and
//! `BENCH_IN_FLIGHT` (200) tune it. The same load on
//! `grpc.health.v1.Health/Check` first gives the floor: what any gRPC call costs here.

mod common;

use std::time::{Duration, Instant};

use common::{Redis, env_or, serve};
use quotad::api::pb;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use quotad::config::{Config, StoreKind};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn reserve(n: u64) -> pb::ReserveRequest {
    pb::ReserveRequest {
        account_id: format!("acct-{n}"),
        request_id: format!("r-{n}"),
        product: "codex".into(),
        estimate: Some(pb::Usage {
            model: "gpt-5.5-mini".into(),
            output_tokens: 500,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Latencies of `calls` calls made by `in_flight` loops; `call(n)` makes call number `n` and says
/// whether its answer was the expected one.
async fn drive<F, Fut>(calls: u64, in_flight: u64, call: F) -> (Vec<Duration>, u64)
where
    F: Fn(u64, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let per_loop = calls / in_flight;
    let loops: Vec<_> = (0..in_flight)
        .map(|l| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_loop as usize);
                let mut unexpected = 0u64;
                for i in 0..per_loop {
                    let t = Instant::now();
                    let expected = call(l * per_loop + i, l as usize).await;
                    latencies.push(t.elapsed());
                    unexpected += u64::from(!expected);
                }
                (latencies, unexpected)
            })
        })
        .collect();
    let (mut latencies, mut unexpected) = (Vec::new(), 0);
    for l in loops {
        let (mut lat, bad) = l.await.unwrap();
        latencies.append(&mut lat);
        unexpected += bad;
    }
    latencies.sort_unstable();
    (latencies, unexpected)
}

fn report(name: &str, latencies: &[Duration], elapsed: Duration) {
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    println!(
        "{name:<28} {:>9.0}/s  p50 {:>9.2?}  p99 {:>9.2?}  p99.9 {:>9.2?}  max {:>9.2?}",
        latencies.len() as f64 / elapsed.as_secs_f64(),
        at(0.5),
        at(0.99),
        at(0.999),
        at(1.0)
    );
}

fn main() {
    let calls = env_or("BENCH_CALLS", 1_000_000);
    let in_flight = env_or("BENCH_IN_FLIGHT", 200);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut redis = Redis::start();
    runtime.block_on(async {
        let mut config = Config::default();
        config.store.kind = StoreKind::Redis;
        config.store.redis.url = redis.url();
        let timeout = config.store.redis.command_timeout_ms;
        let (url, stop) = serve(config).await;
        let mut channels = Vec::new();
        for _ in 0..4 {
            channels.push(Channel::from_shared(url.clone()).unwrap().connect().await.unwrap());
        }
        // quotad answers UNAVAILABLE until its store has answered once.
        let started = Instant::now();
        while QuotaServiceClient::new(channels[0].clone()).reserve(reserve(u64::MAX)).await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "quotad did not start serving");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!("{calls} calls, {in_flight} in flight on 4 connections, command timeout {timeout} ms");

        // The gRPC floor on the same connections: a health check does no work at all.
        let floor = channels.clone();
        let started = Instant::now();
        let (latencies, _) = drive(calls, in_flight, move |_, l| {
            let mut client = HealthClient::new(floor[l % floor.len()].clone());
            async move { client.check(HealthCheckRequest { service: String::new() }).await.is_ok() }
        })
        .await;
        report("health check (gRPC floor)", &latencies, started.elapsed());

        redis.kill();
        let down = channels.clone();
        let started = Instant::now();
        let (latencies, unexpected) = drive(calls, in_flight, move |n, l| {
            let mut client = QuotaServiceClient::new(down[l % down.len()].clone());
            async move { matches!(client.reserve(reserve(n)).await, Err(s) if s.code() == tonic::Code::Unavailable) }
        })
        .await;
        report("Reserve, Redis down", &latencies, started.elapsed());
        println!("{} distinct accounts; {unexpected} answers other than UNAVAILABLE", latencies.len());

        redis.restart();
        let back = Instant::now();
        let mut client = QuotaServiceClient::new(channels[0].clone());
        let mut n = calls;
        while client.reserve(reserve(n)).await.is_err() {
            n += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        println!("serving again {:?} after Redis returned", back.elapsed());
        let _ = stop.send(());
    });
}
