//! Reserve+Commit throughput and latency over real gRPC, memory store and Redis store side by
//! side in one run on the same machine, and how many Redis commands each decision costs
//! (from `INFO commandstats`).
//!
//! `cargo bench --bench decisions` (needs `redis-server` on PATH). Tune with
//! `BENCH_SECONDS` (default 5 per store), `BENCH_IN_FLIGHT` (64) and `BENCH_ACCOUNTS` (10000).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Redis, env_or, serve};
use quotad::api::pb;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use quotad::config::{Config, StoreKind};
use tonic::transport::Channel;

struct Figures {
    pairs: u64,
    errors: u64,
    seconds: f64,
    latencies_us: Vec<u32>,
}

impl Figures {
    fn percentile(&self, p: f64) -> u32 {
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us.get(i).copied().unwrap_or_default()
    }
}

/// Reserve then final Commit, from `in_flight` concurrent loops over shared connections.
async fn drive(url: &str, seconds: u64, in_flight: u64, accounts: u64) -> Figures {
    let channels: Vec<Channel> = futures_channels(url, 4).await;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut loops = Vec::new();
    for worker in 0..in_flight {
        let client = QuotaServiceClient::new(channels[worker as usize % channels.len()].clone());
        let stop = stop.clone();
        loops.push(tokio::spawn(async move {
            let (mut client, mut n, mut errors, mut latencies) = (client, 0u64, 0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let account = format!("acct-{}", (worker * 7_919 + n * 104_729) % accounts);
                let t = Instant::now();
                let usage = pb::Usage {
                    model: "gpt-5.5-mini".into(),
                    output_tokens: 500,
                    ..Default::default()
                };
                let reserve = pb::ReserveRequest {
                    account_id: account.clone(),
                    request_id: format!("w{worker}-{n}"),
                    product: "codex".into(),
                    estimate: Some(usage.clone()),
                    plan_hint: "pro".into(),
                    ttl_seconds: 60,
                };
                let ok = match client.reserve(reserve).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        let allowed = r.decision() == pb::Decision::Allow;
                        let commit = pb::CommitRequest {
                            account_id: account,
                            reservation_id: r.reservation_id,
                            usage: Some(usage),
                            r#final: true,
                        };
                        allowed && client.commit(commit).await.is_ok()
                    }
                    Err(_) => false,
                };
                latencies.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                if !ok {
                    errors += 1;
                }
            }
            (errors, latencies)
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut figures = Figures {
        pairs: 0,
        errors: 0,
        seconds: 0.0,
        latencies_us: Vec::new(),
    };
    for l in loops {
        let (errors, latencies) = l.await.unwrap();
        figures.errors += errors;
        figures.pairs += latencies.len() as u64;
        figures.latencies_us.extend(latencies);
    }
    figures.seconds = started.elapsed().as_secs_f64();
    figures.latencies_us.sort_unstable();
    figures
}

async fn futures_channels(url: &str, n: usize) -> Vec<Channel> {
    let mut channels = Vec::new();
    for _ in 0..n {
        channels.push(
            Channel::from_shared(url.to_owned())
                .unwrap()
                .tcp_nodelay(true)
                .connect()
                .await
                .unwrap(),
        );
    }
    channels
}

fn row(name: &str, f: &Figures) {
    println!(
        "{name:<8} {:>10.0} {:>8} {:>9} {:>9} {:>9}",
        f.pairs as f64 / f.seconds,
        f.errors,
        f.percentile(0.50),
        f.percentile(0.99),
        f.percentile(0.999),
    );
}

fn main() {
    let seconds = env_or("BENCH_SECONDS", 5);
    let in_flight = env_or("BENCH_IN_FLIGHT", 64);
    let accounts = env_or("BENCH_ACCOUNTS", 10_000);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let redis = Redis::start();
    runtime.block_on(async {
        let (memory_url, stop_memory) = serve(Config::default()).await;
        let mut config = Config::default();
        config.store.kind = StoreKind::Redis;
        config.store.redis.url = redis.url();
        let (redis_url, stop_redis) = serve(config).await;

        println!("Reserve+Commit pairs over gRPC: {in_flight} in flight on 4 connections, {accounts} accounts, {seconds} s per store");
        println!("{:<8} {:>10} {:>8} {:>9} {:>9} {:>9}", "store", "pairs/s", "errors", "p50 µs", "p99 µs", "p99.9 µs");
        let memory = drive(&memory_url, seconds, in_flight, accounts).await;
        row("memory", &memory);
        let before = redis.command_calls();
        let on_redis = drive(&redis_url, seconds, in_flight, accounts).await;
        let after = redis.command_calls();
        row("redis", &on_redis);
        println!("redis/memory throughput: {:.2}", (on_redis.pairs as f64 / on_redis.seconds) / (memory.pairs as f64 / memory.seconds));

        let decisions = (on_redis.pairs * 2) as f64;
        let delta = |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
        // Decisions reach Redis in batches: one EVALSHA of the storage script per batch and
        // partition (EVAL only if Redis had lost it), and the commands the script runs.
        let scripts = delta("evalsha") + delta("eval");
        let inside: u64 = after.keys().map(|k| delta(k)).sum::<u64>() - scripts;
        println!(
            "Redis per decision (Reserve or Commit): {:.3} script calls, {:.1} commands run inside them or on their own",
            scripts as f64 / decisions,
            inside as f64 / decisions,
        );
        let _ = (stop_memory.send(()), stop_redis.send(()));
    });
}
