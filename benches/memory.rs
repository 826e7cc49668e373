//! Memory per account on the memory store: RSS before and after giving `BENCH_ACCOUNTS`
//! (default 1,000,000) accounts live windows (a Reserve and a final Commit each, so every
//! account holds both plan windows, a closed reservation kept for retries, an idempotency
//! record and a usage event), reported as bytes per account.
//!
//! `cargo bench --bench memory`

use std::sync::Arc;

use quotad::domain::time::MINUTE_MS;
use quotad::domain::{
    CommitCommand, Decision, Policy, PriceSheet, ReserveCommand, Timestamp, Usage,
};
use quotad::store::{MemoryStore, Store};

use common::rss_bytes;

mod common;

// The allocator the quotad binary uses, so that the figure is the one it would show.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let accounts: u64 = std::env::var("BENCH_ACCOUNTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let policy = Arc::new(Policy::default());
    let prices = PriceSheet::default();
    let usage = Usage {
        model: "gpt-5.5-mini".into(),
        input_tokens: 2_000,
        output_tokens: 400,
        ..Usage::default()
    };
    let cost = prices.price(&usage).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = MemoryStore::new(policy);
    let before = rss_bytes();
    let start = Timestamp::from_millis(1_800_000_000_000);
    runtime.block_on(async {
        for n in 0..accounts {
            let account = format!("acct-{n:08}");
            let now = start.plus_millis((n % 240) as i64 * MINUTE_MS);
            let reserved = store
                .reserve(
                    &ReserveCommand {
                        account_id: account.clone(),
                        request_id: format!("req-{n}"),
                        product: "codex".into(),
                        estimate: usage.clone(),
                        cost,
                        plan_hint: None,
                        ttl_ms: 15 * MINUTE_MS,
                        reservation_id: format!("rsv-{n}"),
                        wait_for_top_up: false,
                    },
                    now,
                )
                .await
                .unwrap();
            assert!(matches!(reserved.decision, Decision::Allow { .. }));
            store
                .commit(
                    CommitCommand {
                        account_id: account,
                        reservation_id: format!("rsv-{n}"),
                        usage: usage.clone(),
                        cost,
                        is_final: true,
                        price_version: prices.version.clone(),
                    },
                    now,
                )
                .await
                .unwrap();
        }
    });
    let after = rss_bytes();
    let per_account = (after.saturating_sub(before)) as f64 / accounts as f64;
    println!("accounts with live windows: {accounts}");
    println!(
        "RSS before: {:.1} MiB, after: {:.1} MiB",
        before as f64 / 1_048_576.0,
        after as f64 / 1_048_576.0
    );
    println!("bytes per account: {per_account:.0}");
    println!(
        "1,000,000 accounts would take {:.2} GiB (goal: within 1 GiB)",
        per_account * 1_000_000.0 / 1_073_741_824.0
    );
    drop(store);
}
