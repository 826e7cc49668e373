//! One admission decision, in process, on the same key set: quotad's memory store next to the
//! `governor` crate's keyed limiter and the `limitador` crate's in-memory limiter.
//!
//! - `quotad/rls_check`: a sliding-window check-and-count of one counter (the decision an
//!   Envoy rate-limit call makes), through the memory store.
//! - `quotad/rls_check_all_cores`: the same with one thread per core, each on its own keys of
//!   the same domain; wall time per decision, so a lock the threads share shows as a time no
//!   better than one thread's.
//! - `quotad/reserve_release`: a plan-window Reserve (pricing done, idempotency recorded, hold
//!   taken) and the Release of its hold: the decision a frontend asks for before each task.
//! - `governor/check_key`: GCRA on a keyed in-memory state (no window, no record).
//! - `limitador/check_and_update`: limitador's fixed-window counter in memory.
//!
//! Every limit is set high enough that every call is admitted; keys cycle through
//! `KEYS` accounts. `cargo bench --bench admission` prints ns per decision for each.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, criterion_group, criterion_main};
use quotad::domain::rls::{CounterCheck, RlsUnit};
use quotad::domain::time::MINUTE_MS;
use quotad::domain::{Policy, PriceSheet, ReleaseCommand, ReserveCommand, Timestamp, Usage};
use quotad::store::{MemoryStore, Store};

const KEYS: usize = 10_000;

/// The memory store never waits: its futures are ready on the first poll.
fn ready<T>(future: impl Future<Output = T>) -> T {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(value) => value,
        Poll::Pending => unreachable!("the memory store does not wait"),
    }
}

fn admission(c: &mut Criterion) {
    let keys: Vec<String> = (0..KEYS).map(|n| format!("acct-{n:05}")).collect();
    let now = Timestamp::from_millis(1_800_000_000_000);
    let mut group = c.benchmark_group("admission");

    let store = MemoryStore::new(Arc::new(Policy::default()));
    let mut i = 0;
    group.bench_function("quotad/rls_check", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let check = [CounterCheck {
                key: keys[i].clone(),
                unit: RlsUnit::Minute,
                limit: u64::MAX / 2,
                hits: 1,
            }];
            ready(store.rls_check("bench", &check, now)).unwrap()
        })
    });

    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    group.bench_function("quotad/rls_check_all_cores", |b| {
        b.iter_custom(|iters| {
            let per_thread = iters.div_ceil(cores as u64);
            let start = std::time::Instant::now();
            std::thread::scope(|scope| {
                for core in 0..cores {
                    let (store, keys) = (&store, &keys);
                    scope.spawn(move || {
                        for n in 0..per_thread as usize {
                            let check = [CounterCheck {
                                key: keys[(n * cores + core) % KEYS].clone(),
                                unit: RlsUnit::Minute,
                                limit: u64::MAX / 2,
                                hits: 1,
                            }];
                            ready(store.rls_check("bench", &check, now)).unwrap();
                        }
                    });
                }
            });
            start.elapsed()
        })
    });

    let usage = Usage {
        model: "gpt-5.5-mini".into(),
        output_tokens: 1,
        ..Usage::default()
    };
    let cost = PriceSheet::default().price(&usage).unwrap();
    let mut n: u64 = 0;
    group.bench_function("quotad/reserve_release", |b| {
        b.iter(|| {
            n += 1;
            let account = &keys[n as usize % KEYS];
            let reservation_id = format!("rsv-{n}");
            let reserve = ReserveCommand {
                account_id: account.clone(),
                request_id: format!("req-{n}"),
                product: "codex".into(),
                estimate: usage.clone(),
                cost,
                plan_hint: Some("pro".into()),
                ttl_ms: 15 * MINUTE_MS,
                reservation_id: reservation_id.clone(),
                wait_for_top_up: false,
            };
            // Time moves so idempotency records are forgotten as they would be in a day.
            let at = now.plus_millis(n as i64 * 20);
            ready(store.reserve(&reserve, at)).unwrap();
            let release = ReleaseCommand {
                account_id: account.clone(),
                reservation_id,
            };
            ready(store.release(release, at)).unwrap()
        })
    });

    let quota = governor::Quota::per_second(NonZeroU32::MAX);
    let limiter = governor::RateLimiter::keyed(quota);
    let mut j = 0;
    group.bench_function("governor/check_key", |b| {
        b.iter(|| {
            j = (j + 1) % KEYS;
            limiter.check_key(&keys[j]).is_ok()
        })
    });

    let limitador = limitador::RateLimiter::new(KEYS as u64 * 2);
    limitador.add_limit(limitador::limit::Limit::new(
        "bench",
        u64::MAX / 2,
        60,
        vec![],
        vec!["account".try_into().expect("a CEL variable")],
    ));
    let contexts: Vec<limitador::limit::Context> = keys
        .iter()
        .map(|k| std::collections::HashMap::from([("account".to_string(), k.clone())]).into())
        .collect();
    let namespace = "bench".into();
    let mut k = 0;
    group.bench_function("limitador/check_and_update", |b| {
        b.iter(|| {
            k = (k + 1) % KEYS;
            limitador
                .check_rate_limited_and_update(&namespace, &contexts[k], 1)
                .unwrap()
                .limited
        })
    });
    group.finish();
}

criterion_group!(benches, admission);
criterion_main!(benches);
