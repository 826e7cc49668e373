//! A week of use on one owner in Redis's owned mode: the week of `data_dir` (`BENCH_ACCOUNTS`
//! accounts, default 1,000,000, `BENCH_TASKS` coding tasks each, default 20, spread evenly over
//! a simulated week), decided by one replica that owns every partition, on a `redis-server` of
//! its own. Issue 17 asks what owned mode costs in memory on each side: the owner keeps the
//! accounts used within `evict_idle` (600 s, the default) and reloads the others from Redis;
//! Redis keeps every account, and the usage export.
//!
//! Reported: the owner's RSS (this process decides, as quotad would) at its peak and at the
//! end, and once every account has gone idle; accounts resident in memory; Redis's
//! `used_memory` before and after, the export streams' part of it, and what one account's keys
//! take; the rate; and the first read of an account that is only in Redis.
//!
//! `cargo bench --bench owned` (`bench/figures.sh redis-week`). Needs `redis-server` and
//! `redis-cli`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use quotad::domain::time::MINUTE_MS;
use quotad::domain::{Policy, Timestamp};
use quotad::rules::LiveRules;
use quotad::store::{MemoryStore, OwnedSettings, RedisSettings, Store};

use common::{Redis, env_or, mib, rss_bytes, watch_peak_rss};

mod common;

// The allocator the quotad binary uses, so that the figure is the one it would show.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tasks started together, as in `data_dir`: what a busy quotad has in flight.
const IN_FLIGHT: u64 = 512;

const PREFIX: &str = "bench";

/// Bytes `MEMORY USAGE` counts for a key (every element sampled), 0 if it does not exist.
fn key_bytes(redis: &Redis, key: &str) -> u64 {
    redis
        .cli(&["MEMORY", "USAGE", key, "SAMPLES", "0"])
        .trim()
        .parse()
        .unwrap_or(0)
}

fn main() {
    let accounts = env_or("BENCH_ACCOUNTS", 1_000_000);
    let per_account = env_or("BENCH_TASKS", 20);
    let redis = Redis::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // quotad's defaults, as a replica on Redis runs.
    let settings = RedisSettings {
        url: redis.url(),
        key_prefix: PREFIX.into(),
        ..RedisSettings::default()
    };
    let owned = OwnedSettings::default();
    let rules = LiveRules::fixed(Arc::new(Policy::default()));
    let store = runtime
        .block_on(MemoryStore::open_on_redis(rules, &settings, &owned))
        .expect("owns every partition");
    let store = Arc::new(store);
    assert_eq!(
        store.owned_partitions(),
        Some(usize::from(owned.partitions))
    );

    let redis_before = redis.info("used_memory");
    let before = rss_bytes();
    let peak = watch_peak_rss();
    let mut peak_resident = 0;
    let began = Instant::now();
    let start = Timestamp::from_millis(1_800_000_000_000);
    let week = common::week::run(
        &runtime,
        &store,
        accounts,
        per_account,
        start,
        IN_FLIGHT,
        |done, store| {
            let used = redis.info("used_memory");
            peak_resident = peak_resident.max(store.resident_accounts());
            eprintln!(
                "{done:>3} % of tasks, {:.0} s, RSS {:.0} MiB, resident accounts {}, Redis \
                 used_memory {:.0} MiB",
                began.elapsed().as_secs_f64(),
                mib(rss_bytes()),
                store.resident_accounts(),
                mib(used)
            );
        },
    );
    let after = rss_bytes();
    peak.fetch_max(after, Ordering::Relaxed);
    let resident = store.resident_accounts();
    let redis_after = redis.info("used_memory");
    let redis_rss = redis.info("used_memory_rss");
    let keys = redis.cli(&["DBSIZE"]).trim().parse::<u64>().unwrap_or(0);

    let tasks = week.tasks;
    println!(
        "{accounts} accounts, {per_account} tasks each over a simulated week, one owner of all \
         {} partitions: {tasks} tasks ({} allowed) in {:.0} s, {:.0} tasks/s ({IN_FLIGHT} in \
         flight); {} calls refused UNAVAILABLE (Redis behind) and sent again after 5 ms",
        owned.partitions,
        week.allowed,
        week.elapsed.as_secs_f64(),
        tasks as f64 / week.elapsed.as_secs_f64(),
        week.refused
    );
    println!(
        "owner's RSS before: {:.0} MiB, peak: {:.0} MiB, at the end: {:.0} MiB (goal: at most \
         1,536 MiB)",
        mib(before),
        mib(peak.load(Ordering::Relaxed)),
        mib(after)
    );
    println!(
        "accounts resident in the owner's memory at the end: {resident} (at most {} at the \
         twentieths of the run; idle ones leave after {} s)",
        peak_resident.max(resident),
        owned.evict_idle.as_secs()
    );

    // The export: one stream per partition, each kept to `export_max_len` events.
    let (mut streams, mut events) = (0, 0);
    for partition in 0..owned.partitions {
        let key = format!("{PREFIX}:{{o{partition}}}:x");
        streams += key_bytes(&redis, &key);
        events += redis
            .cli(&["XLEN", &key])
            .trim()
            .parse::<u64>()
            .unwrap_or(0);
    }
    let grown = redis_after.saturating_sub(redis_before);
    println!(
        "Redis used_memory before: {:.1} MiB, at the end: {:.0} MiB (peak {:.0} MiB), RSS {:.0} \
         MiB; {keys} keys",
        mib(redis_before),
        mib(redis_after),
        mib(redis.info("used_memory_peak")),
        mib(redis_rss)
    );
    println!(
        "of which the usage export: {:.0} MiB ({events} events in {} streams); the rest, {:.0} B \
         per account ({:.0} B per account with the export)",
        mib(streams),
        owned.partitions,
        grown.saturating_sub(streams) as f64 / accounts as f64,
        grown as f64 / accounts as f64
    );
    let sample = "acct-00000042";
    let partition = quotad::store::redis::owned::partition_of(sample, owned.partitions);
    let tag = format!("{PREFIX}:{{o{partition}}}");
    let (core, records, history) = (
        key_bytes(&redis, &format!("{tag}:a:{sample}")),
        key_bytes(&redis, &format!("{tag}:r:{sample}")),
        key_bytes(&redis, &format!("{tag}:h:{sample}")),
    );
    println!(
        "one account's keys ({sample}): core {core} B, records kept for retries {records} B, \
         charges {history} B ({} B)",
        core + records + history
    );

    // Every account idle (the last Commits came two minutes after the week's end): what the
    // owner keeps with nothing resident.
    let later = week
        .end
        .plus_millis(owned.evict_idle.as_millis() as i64 + 5 * MINUTE_MS);
    runtime.block_on(store.maintain(later));
    println!(
        "once every account is idle: {} resident, RSS {:.0} MiB",
        store.resident_accounts(),
        mib(rss_bytes())
    );
    let first = Instant::now();
    let usage = runtime.block_on(store.usage(sample, 10, later));
    let loaded = first.elapsed();
    assert!(usage.is_ok(), "{usage:?}");
    println!(
        "the first read of an account only in Redis: {:.2} ms",
        loaded.as_secs_f64() * 1e3
    );
    let _inside = runtime.enter();
    drop(Arc::into_inner(store).expect("every task ended"));
}
