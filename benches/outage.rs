//! Failing fast while Redis is down, measured: quotad on the Redis store, Redis killed, then a
//! million Reserve calls for a million distinct accounts with hundreds in flight over gRPC.
//! Reports the latency of the UNAVAILABLE answers, and how long after Redis returns quotad
//! serves again (no restart).
//!
//! `cargo bench --bench outage` (needs `redis-server`). `BENCH_CALLS` (default 1000000) and
//! `BENCH_IN_FLIGHT` (400) tune it.

mod common;

use std::time::{Duration, Instant};

use common::{Redis, env_or, serve};
use quotad::api::pb;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use quotad::config::{Config, StoreKind};
use tonic::transport::Channel;

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

fn main() {
    let calls = env_or("BENCH_CALLS", 1_000_000);
    let in_flight = env_or("BENCH_IN_FLIGHT", 400);
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
        QuotaServiceClient::new(channels[0].clone()).reserve(reserve(u64::MAX)).await.unwrap();

        redis.kill();
        let started = Instant::now();
        let per_loop = calls / in_flight;
        let loops: Vec<_> = (0..in_flight)
            .map(|l| {
                let mut client = QuotaServiceClient::new(channels[l as usize % channels.len()].clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(per_loop as usize);
                    let mut unexpected = 0u64;
                    for i in 0..per_loop {
                        let t = Instant::now();
                        let out = client.reserve(reserve(l * per_loop + i)).await;
                        latencies.push(t.elapsed());
                        if !matches!(out, Err(ref s) if s.code() == tonic::Code::Unavailable) {
                            unexpected += 1;
                        }
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
        let elapsed = started.elapsed();
        latencies.sort_unstable();
        let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
        println!(
            "Redis down, command timeout {timeout} ms: {} calls ({} distinct accounts, {in_flight} in flight) in {elapsed:?}; \
             {unexpected} answers other than UNAVAILABLE",
            latencies.len(),
            latencies.len()
        );
        println!("p50 {:?}  p99 {:?}  p99.9 {:?}  max {:?}", at(0.5), at(0.99), at(0.999), at(1.0));

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
