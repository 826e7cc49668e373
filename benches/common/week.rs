//! A simulated week of coding tasks on an in-process store, shared by the benches that measure
//! memory over a week (`data_dir`, on a data dir, and `owned`, on Redis in owned mode), so that
//! both see exactly the same load: each task a Reserve and, two minutes later, a final Commit,
//! spread evenly over the week, with the store's maintenance every simulated minute (which is
//! when idle accounts leave memory).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use quotad::domain::time::{DAY_MS, MINUTE_MS};
use quotad::domain::{CommitCommand, Decision, PriceSheet, ReserveCommand, Timestamp, Usage};
use quotad::store::{MemoryStore, Store};

use super::patiently;

/// What a week did.
pub struct Week {
    pub tasks: u64,
    pub allowed: u64,
    /// Calls refused UNAVAILABLE (the store's writes behind) and sent again.
    pub refused: u64,
    pub elapsed: Duration,
    /// The simulated time the week ended at.
    pub end: Timestamp,
}

/// Runs `per_account` tasks for each of `accounts` accounts (`acct-00000000` …) from `start`,
/// `in_flight` started together (what a busy quotad has in flight, so that group commit batches
/// them). `progress` is called at every twentieth of the tasks with the share done, in per cent.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    store: &Arc<MemoryStore>,
    accounts: u64,
    per_account: u64,
    start: Timestamp,
    in_flight: u64,
    mut progress: impl FnMut(u64, &MemoryStore),
) -> Week {
    let tasks = accounts * per_account;
    let prices = PriceSheet::default();
    let week = 7 * DAY_MS;
    let now_of = |k: u64| start.plus_millis((k as i128 * week as i128 / tasks as i128) as i64);
    let began = Instant::now();
    let mut allowed = 0u64;
    let refused = Arc::new(AtomicU64::new(0));
    runtime.block_on(async {
        let mut next_maintain = start;
        let mut k = 0;
        while k < tasks {
            let chunk = k..(k + in_flight).min(tasks);
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
            if k % (tasks / 20).max(1) < in_flight {
                progress(k * 100 / tasks, store);
            }
        }
    });
    Week {
        tasks,
        allowed,
        refused: refused.load(std::sync::atomic::Ordering::Relaxed),
        elapsed: began.elapsed(),
        end: now_of(tasks),
    }
}
