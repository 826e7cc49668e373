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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quotad::domain::time::{DAY_MS, MINUTE_MS};
use quotad::domain::{
    CommitCommand, Decision, Policy, PriceSheet, ReserveCommand, Timestamp, Usage,
};
use quotad::rules::LiveRules;

use common::{env_or, rss_bytes};
use quotad::store::{DataDirSettings, MemoryStore, Store, StoreError};

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

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

/// Runs a call until the store takes it: an UNAVAILABLE while the data dir is behind comes
/// before anything is decided (and a retry is answered from the first answer anyway), so the
/// bench, like a client, waits a little and sends it again.
async fn patiently<T, F, Fut>(refused: &AtomicU64, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    loop {
        match call().await {
            Ok(answer) => return answer,
            Err(StoreError::Unavailable(_)) => {
                refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(err) => panic!("{err}"),
        }
    }
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
    let prices = PriceSheet::default();
    let start = Timestamp::from_millis(1_800_000_000_000);
    let week = 7 * DAY_MS;
    let before = rss_bytes();
    let peak = Arc::new(AtomicU64::new(before));
    {
        let peak = peak.clone();
        std::thread::spawn(move || {
            loop {
                peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
    }
    let began = Instant::now();
    let mut allowed = 0u64;
    let refused = Arc::new(AtomicU64::new(0));
    runtime.block_on(async {
        let mut next_maintain = start;
        let mut k = 0;
        while k < tasks {
            let chunk = k..(k + IN_FLIGHT).min(tasks);
            let now_of =
                |k: u64| start.plus_millis((k as i128 * week as i128 / tasks as i128) as i64);
            let mut running = tokio::task::JoinSet::new();
            for k in chunk.clone() {
                let store = store.clone();
                let now = now_of(k);
                let version = prices.version.clone();
                // Tasks of a few sizes, as a coding agent's vary.
                let usage = Usage {
                    model: "gpt-5.5-mini".into(),
                    input_tokens: 1_000 + (k % 7) * 700,
                    cached_input_tokens: (k % 3) * 500,
                    output_tokens: 200 + (k % 5) * 150,
                    ..Usage::default()
                };
                let cost = prices.price(&usage).unwrap();
                let refused = refused.clone();
                running.spawn(async move {
                    let account = format!("acct-{:08}", k % accounts);
                    let reservation = format!("rsv-{k}");
                    let reserve = ReserveCommand {
                        account_id: account.clone(),
                        request_id: format!("req-{k}"),
                        product: "codex".into(),
                        estimate: usage.clone(),
                        cost,
                        plan_hint: None,
                        ttl_ms: 15 * MINUTE_MS,
                        reservation_id: reservation.clone(),
                        wait_for_top_up: false,
                    };
                    let reserved = patiently(&refused, || store.reserve(&reserve, now)).await;
                    if !matches!(reserved.decision, Decision::Allow { .. }) {
                        return false;
                    }
                    let commit = CommitCommand {
                        account_id: account,
                        reservation_id: reservation,
                        usage,
                        cost,
                        is_final: true,
                        price_version: version,
                    };
                    let at = now.plus_millis(2 * MINUTE_MS);
                    patiently(&refused, || store.commit(commit.clone(), at)).await;
                    true
                });
            }
            while let Some(done) = running.join_next().await {
                allowed += u64::from(done.unwrap());
            }
            k = chunk.end;
            let now = now_of(k);
            if now >= next_maintain {
                store.maintain(now).await;
                next_maintain = now.plus_millis(MINUTE_MS);
            }
            if k % (tasks / 20).max(1) < IN_FLIGHT {
                eprintln!(
                    "{:>3} % of tasks, {:.0} s, RSS {:.0} MiB, resident accounts {}",
                    k * 100 / tasks,
                    began.elapsed().as_secs_f64(),
                    mib(rss_bytes()),
                    store.resident_accounts()
                );
            }
        }
    });
    let elapsed = began.elapsed();
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
        refused.load(Ordering::Relaxed)
    );
    println!(
        "RSS before: {:.0} MiB, peak: {:.0} MiB, at the end: {:.0} MiB (goal: at most 1,536 MiB)",
        mib(before),
        mib(peak.load(Ordering::Relaxed)),
        mib(after)
    );
    println!(
        "accounts resident in memory at the end: {}",
        stats.resident_accounts
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
    let usage = runtime.block_on(store.usage("acct-00000042", 10, start.plus_millis(week)));
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
