//! A week of use on the embedded store with a data dir: `BENCH_ACCOUNTS` accounts (default
//! 1,000,000), `BENCH_TASKS` coding tasks each (default 20: a Reserve and a final Commit),
//! spread evenly over a simulated week, so each account is used every few hours and sits idle
//! in between. Reported: RSS at its peak and at the end, accounts resident in memory, the data
//! dir's size, the rate, and how long opening the data dir again takes (then one account
//! loaded on first use).
//!
//! `cargo bench --bench data_dir`. `BENCH_DATA_DIR` keeps the data dir at that path (for
//! `bench/figures.sh startup`); otherwise a temporary one is removed at the end.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use quotad::domain::{Policy, Timestamp};
use quotad::rules::LiveRules;

use common::{env_or, mib, rss_bytes, watch_peak_rss};
use quotad::store::{DataDirSettings, MemoryStore, Store};

mod common;

// The allocator the quotad binary uses, so that the figure is the one it would show.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tasks started together: what a busy quotad has in flight, so group commit batches them.
const IN_FLIGHT: u64 = 512;

fn du(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => du(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn main() {
    let accounts = env_or("BENCH_ACCOUNTS", 1_000_000);
    let per_account = env_or("BENCH_TASKS", 20);
    let tasks = accounts * per_account;
    let kept = std::env::var_os("BENCH_DATA_DIR").map(std::path::PathBuf::from);
    let temp = tempfile::tempdir().unwrap();
    let path = kept.clone().unwrap_or_else(|| temp.path().join("data"));
    let settings = DataDirSettings::new(&path);
    let rules = LiveRules::fixed(Arc::new(Policy::default()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let store = Arc::new(MemoryStore::open(rules.clone(), &settings).unwrap());
    let start = Timestamp::from_millis(1_800_000_000_000);
    let before = rss_bytes();
    let peak = watch_peak_rss();
    let began = Instant::now();
    let week = common::week::run(
        &runtime,
        &store,
        accounts,
        per_account,
        start,
        IN_FLIGHT,
        |done, store| {
            eprintln!(
                "{done:>3} % of tasks, {:.0} s, RSS {:.0} MiB, resident accounts {}",
                began.elapsed().as_secs_f64(),
                mib(rss_bytes()),
                store.resident_accounts()
            );
        },
    );
    let (elapsed, allowed) = (week.elapsed, week.allowed);
    let after = rss_bytes();
    peak.fetch_max(after, Ordering::Relaxed);
    let stats = store.data_dir_stats().unwrap();
    println!(
        "{accounts} accounts, {per_account} tasks each over a simulated week: {tasks} tasks \
         ({allowed} allowed) in {:.0} s, {:.0} tasks/s ({IN_FLIGHT} in flight)",
        elapsed.as_secs_f64(),
        tasks as f64 / elapsed.as_secs_f64()
    );
    println!(
        "group commits: {} batches, {:.1} decisions per batch; {} calls refused UNAVAILABLE while \
         the data dir was behind (retried after 5 ms)",
        stats.batches,
        stats.changes as f64 / stats.batches.max(1) as f64,
        week.refused
    );
    println!(
        "RSS before: {:.0} MiB, peak: {:.0} MiB, at the end: {:.0} MiB (goal: at most 1,536 MiB)",
        mib(before),
        mib(peak.load(Ordering::Relaxed)),
        mib(after)
    );
    println!(
        "accounts resident in memory at the end: {}",
        store.resident_accounts()
    );
    println!(
        "data dir: {:.0} MiB on disk ({:.0} B per account)",
        mib(du(&path)),
        du(&path) as f64 / accounts as f64
    );

    drop(Arc::into_inner(store).expect("every task ended"));
    let opening = Instant::now();
    let store = MemoryStore::open(rules, &settings).unwrap();
    let opened = opening.elapsed();
    let first = Instant::now();
    let usage = runtime.block_on(store.usage("acct-00000042", 10, week.end));
    let loaded = first.elapsed();
    assert!(usage.is_ok(), "{usage:?}");
    println!(
        "opening the data dir again: {:.1} ms; the first read of an account on disk: {:.2} ms",
        opened.as_secs_f64() * 1e3,
        loaded.as_secs_f64() * 1e3
    );
    drop(store);
    if kept.is_some() {
        println!("data dir kept at {}", path.display());
    }
}
