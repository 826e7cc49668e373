//! Every store decides by the same Rust rules, so every store must answer exactly as the memory
//! store alone: seeded random sequences of operations (reserves, retried reserves and request
//! ids reused with another request, partial and final commits, releases, grants, plan changes,
//! clock jumps across hold expiry, lot expiry and window resets) run against a store with a
//! data dir, and against the Redis store, through their public operations, beside the memory
//! store alone, while the store under test is restarted now and then and idle accounts leave
//! its memory. Every answer must be equal.
//!
//! A failure prints the seed and the step; `QUOTAD_DIFF_SEED=N` replays one seed and
//! `QUOTAD_DIFF_SEEDS=N` runs more of them.

use crate::support;

use std::collections::HashMap;
use std::sync::Arc;

use quotad::domain::time::{DAY_MS, HOUR_MS, MINUTE_MS};
use quotad::domain::top_up::{PaymentResult, TopUpSettings};
use quotad::domain::{
    Account, CommitCommand, Decision, GrantCommand, LotSource, Policy, PriceSheet, ReleaseCommand,
    ReserveCommand, RevokeCommand, Timestamp, Usage, UsageSnapshot,
};
use quotad::domain::{SetTopUpCommand, SettleTopUpCommand};
use quotad::rules::LiveRules;
use quotad::store::{DataDirSettings, MemoryStore, OwnedSettings, Store, StoreError};
use support::T0;

/// xorshift64*: small, seeded, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A policy with small limits, so that sequences cross every boundary often; `go` (an upgrade
/// plan) and `pro` (a credits plan) in shadow mode, so that its answers are compared too.
fn policy() -> Policy {
    let mut p = Policy::default();
    for name in ["go", "pro"] {
        p.plans.get_mut(name).unwrap().shadow = true;
    }
    for (name, h5, week) in [
        ("free", 8, 20),
        ("go", 12, 30),
        ("plus", 20, 60),
        ("pro", 40, 90),
    ] {
        let plan = p.plans.get_mut(name).unwrap();
        plan.limit_5h_micros = h5 * 1_000_000;
        plan.limit_weekly_micros = week * 1_000_000;
    }
    p.limits.recent_events = 5;
    p.limits.idempotency_retention_seconds = 2 * 86_400;
    p
}

fn usage(rng: &mut Rng, scale: u64) -> Usage {
    Usage {
        model: (*rng.pick(&["gpt-5.5", "gpt-5.5-mini"])).into(),
        input_tokens: rng.below(20_000 * scale),
        cached_input_tokens: rng.below(20_000 * scale),
        output_tokens: rng.below(5_000 * scale),
        images: rng.below(2) as u32,
        fast_mode: rng.below(4) == 0,
    }
}

/// The store under test (one at a time: a restart replaces it).
struct Replicas<S> {
    stores: Vec<S>,
    /// Runs before each step with a random number below 100: may restart the stores (the
    /// embedded store reopens its data dir) or let time do its upkeep (idle accounts leave
    /// memory), which must change no answer.
    between: Option<Between<S>>,
}

type Between<S> = Box<dyn FnMut(&mut Vec<S>, u64)>;

/// How often the cases this test exists for came up, over all seeds.
#[derive(Debug, Default)]
struct Seen {
    retried_after_allow: u64,
    retried_after_deny: u64,
    reused_after_allow: u64,
    reused_after_deny: u64,
    reads_across_an_expiry: u64,
    /// Reserves and next chunks let through by shadow mode.
    shadow_reserves: u64,
    shadow_chunks: u64,
}

impl<S: Store> Replicas<S> {
    /// GetUsage on store `x`: the rules' answer now.
    async fn usage(
        &mut self,
        x: usize,
        memory: &MemoryStore,
        (account, limit, now): (&str, usize, Timestamp),
        context: &str,
    ) -> Result<UsageSnapshot, StoreError> {
        let m = memory.usage(account, limit, now).await;
        let r = self.stores[x].usage(account, limit, now).await;
        assert_eq!(m, r, "{context}: usage of {account} on store {x}");
        m
    }
}

async fn run<S: Store>(
    seed: u64,
    steps: usize,
    replicas: &mut Replicas<S>,
    memory: &MemoryStore,
    seen: &mut Seen,
) {
    let sheet = PriceSheet::default();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let accounts = ["a", "b", "c"];
    let mut now = T0;
    let mut reservations: Vec<(String, String, Usage)> = Vec::new();
    let mut requests: Vec<ReserveCommand> = Vec::new();
    // Whether the first answer to (account, request id) was an ALLOW, while it is kept.
    let mut first_answers: HashMap<(String, String), (bool, Timestamp)> = HashMap::new();
    let retention_ms = i64::from(policy().limits.idempotency_retention_seconds) * 1_000;
    let mut grants: Vec<GrantCommand> = Vec::new();
    let mut purchases: Vec<(String, String)> = Vec::new();
    // Whose holds and lots expire when, as the answers told (no extra reads: a read settles).
    let mut expiries: Vec<(String, i64)> = Vec::new();
    for step in 0..steps {
        let account = rng.pick(&accounts).to_string();
        if let Some(between) = &mut replicas.between {
            between(&mut replicas.stores, rng.below(100));
            for store in &replicas.stores {
                store.maintain(now).await;
            }
        }
        let x = rng.below(replicas.stores.len() as u64) as usize;
        let redis = &replicas.stores[x];
        let context = format!("seed {seed}, step {step}, replica {x}");
        match rng.below(100) {
            0..=29 => {
                let cmd = if !requests.is_empty() && rng.below(4) == 0 {
                    let mut again = rng.pick(&requests).clone();
                    let reused = rng.below(3) == 0;
                    if reused {
                        // The same request id with another request.
                        match rng.below(3) {
                            0 => {
                                again.estimate = usage(&mut rng, 1);
                                again.cost = sheet.price(&again.estimate).unwrap();
                            }
                            1 => again.product = "excel".into(),
                            _ => again.ttl_ms += MINUTE_MS,
                        }
                    }
                    let key = (again.account_id.clone(), again.request_id.clone());
                    match first_answers.get(&key) {
                        Some(&(allowed, at)) if now.as_millis() - at.as_millis() < retention_ms => {
                            let count = match (allowed, reused) {
                                (true, false) => &mut seen.retried_after_allow,
                                (false, false) => &mut seen.retried_after_deny,
                                (true, true) => &mut seen.reused_after_allow,
                                (false, true) => &mut seen.reused_after_deny,
                            };
                            *count += 1;
                        }
                        _ => {}
                    }
                    again
                } else {
                    let estimate = usage(&mut rng, 1);
                    ReserveCommand {
                        account_id: account.clone(),
                        request_id: format!("q{step}"),
                        product: rng
                            .pick(&["codex", "excel", "workspace_agents"])
                            .to_string(),
                        cost: sheet.price(&estimate).unwrap(),
                        estimate,
                        plan_hint: rng
                            .pick(&[None, Some("plus"), Some("go"), Some("pro")])
                            .map(str::to_owned),
                        ttl_ms: (1 + rng.below(90) as i64) * MINUTE_MS,
                        reservation_id: format!("r{step}"),
                        wait_for_top_up: rng.below(2) == 0,
                    }
                };
                requests.push(cmd.clone());
                let (m, r) = (
                    memory.reserve(&cmd, now).await,
                    redis.reserve(&cmd, now).await,
                );
                assert_eq!(m, r, "{context}: reserve");
                if let Ok(ref out) = m {
                    seen.shadow_reserves += u64::from(out.shadow_denial.is_some());
                    let key = (cmd.account_id.clone(), cmd.request_id.clone());
                    let kept = first_answers
                        .get(&key)
                        .is_some_and(|&(_, at)| now.as_millis() - at.as_millis() < retention_ms);
                    if !out.awaiting_top_up && !kept {
                        let allowed = matches!(out.decision, Decision::Allow { .. });
                        first_answers.insert(key, (allowed, now));
                    }
                    purchases.extend(
                        out.top_up
                            .iter()
                            .map(|p| (cmd.account_id.clone(), p.id.clone())),
                    );
                    if let Decision::Allow {
                        reservation_id,
                        expires_at,
                        ..
                    } = &out.decision
                    {
                        expiries.push((cmd.account_id.clone(), expires_at.as_millis()));
                        reservations.push((
                            cmd.account_id,
                            reservation_id.to_string(),
                            Usage {
                                model: cmd.estimate.model,
                                ..Usage::default()
                            },
                        ));
                    }
                }
            }
            30..=54 if !reservations.is_empty() => {
                let i = rng.below(reservations.len() as u64) as usize;
                let (account, id, so_far) = reservations[i].clone();
                let mut more = usage(&mut rng, 2);
                if rng.below(5) > 0 {
                    more.model = so_far.model.clone();
                }
                let cumulative = Usage {
                    input_tokens: so_far.input_tokens + more.input_tokens,
                    cached_input_tokens: so_far.cached_input_tokens + more.cached_input_tokens,
                    output_tokens: so_far.output_tokens + more.output_tokens,
                    images: so_far.images + more.images,
                    ..more
                };
                let cmd = CommitCommand {
                    account_id: account.clone(),
                    reservation_id: id.clone(),
                    cost: sheet.price(&cumulative).unwrap(),
                    usage: cumulative.clone(),
                    is_final: rng.below(2) == 0,
                    price_version: sheet.version.clone(),
                };
                reservations[i].2 = cumulative;
                let (m, r) = (
                    memory.commit(cmd.clone(), now).await,
                    redis.commit(cmd, now).await,
                );
                assert_eq!(m, r, "{context}: commit");
                if let Ok(out) = m {
                    seen.shadow_chunks += u64::from(out.shadow_denial.is_some());
                    let renewed = out.receipt.expires_at.map(Timestamp::as_millis);
                    expiries.extend(renewed.map(|t| (account.clone(), t)));
                    purchases.extend(out.top_up.map(|p| (account, p.id)));
                }
            }
            55..=62 if !reservations.is_empty() => {
                let (account, id, _) = rng.pick(&reservations).clone();
                let cmd = ReleaseCommand {
                    account_id: account.clone(),
                    reservation_id: id,
                };
                let (m, r) = (
                    memory.release(cmd.clone(), now).await,
                    redis.release(cmd, now).await,
                );
                assert_eq!(m, r, "{context}: release");
            }
            63..=70 => {
                let cmd = if !grants.is_empty() && rng.below(5) == 0 {
                    let mut again = rng.pick(&grants).clone();
                    if rng.below(2) == 0 {
                        again.amount += 1;
                    }
                    again
                } else {
                    GrantCommand {
                        account_id: account.clone(),
                        grant_id: format!("g{step}"),
                        amount: (1 + rng.below(30) as i64) * 1_000_000 + rng.below(1_000) as i64,
                        source: *rng.pick(&[
                            LotSource::Purchase,
                            LotSource::Promo,
                            LotSource::AutoTopUp,
                        ]),
                        expires_at: match rng.below(3) {
                            0 => None,
                            1 => Some(now.plus_millis((1 + rng.below(10) as i64) * DAY_MS)),
                            _ => Some(now.plus_millis(rng.below(5) as i64 * HOUR_MS - HOUR_MS)),
                        },
                    }
                };
                grants.push(cmd.clone());
                let granted_to = cmd.account_id.clone();
                let (m, r) = (
                    memory.grant(cmd.clone(), now).await,
                    redis.grant(cmd, now).await,
                );
                assert_eq!(m, r, "{context}: grant");
                if let Ok(out) = m {
                    expiries.push((granted_to.clone(), out.lot.expires_at.as_millis()));
                }
            }
            71..=72 if !grants.is_empty() => {
                let grant = rng.pick(&grants).clone();
                let cmd = RevokeCommand {
                    account_id: grant.account_id.clone(),
                    grant_id: grant.grant_id,
                };
                let (m, r) = (
                    memory.revoke_grant(cmd.clone(), now).await,
                    redis.revoke_grant(cmd, now).await,
                );
                assert_eq!(m, r, "{context}: revoke");
                if let Ok(out) = m {
                    purchases.extend(out.top_up.map(|p| (grant.account_id.clone(), p.id)));
                }
            }
            73..=78 => {
                let plan: std::sync::Arc<str> = (*rng.pick(&["free", "go", "plus", "pro"])).into();
                let changed = Account {
                    id: account.clone(),
                    plan,
                    credit_purchase_allowed: rng.below(4) > 0,
                };
                let (m, r) = (
                    memory.upsert_account(changed.clone(), now).await,
                    redis.upsert_account(changed, now).await,
                );
                assert_eq!(m, r, "{context}: upsert");
            }
            79..=88 => {
                let limit = rng.below(7) as usize;
                let read = (account.as_str(), limit, now);
                let _ = replicas.usage(x, memory, read, &context).await;
            }
            89..=91 => {
                let threshold = rng.below(20) as i64 * 1_000_000 + rng.below(1_000) as i64;
                let target = if rng.below(10) == 0 {
                    threshold
                } else {
                    threshold + (1 + rng.below(50) as i64) * 1_000_000
                };
                let enabled = rng.below(3) > 0;
                let monthly_cap =
                    (rng.below(3) == 0).then(|| (10 + rng.below(70) as i64) * 1_000_000);
                // A target not above the threshold never reaches a store: making the settings
                // refuses it.
                let Ok(settings) = TopUpSettings::new(enabled, threshold, target, monthly_cap)
                else {
                    continue;
                };
                let cmd = SetTopUpCommand {
                    account_id: account.clone(),
                    settings,
                };
                let (m, r) = (
                    memory.set_top_up(cmd.clone(), now).await,
                    redis.set_top_up(cmd, now).await,
                );
                assert_eq!(m, r, "{context}: set top-up");
                if let Ok(out) = m {
                    purchases.extend(out.top_up.map(|p| (account.clone(), p.id)));
                }
            }
            92..=94 if !purchases.is_empty() => {
                let (account, purchase_id) = rng.pick(&purchases).clone();
                let result = match rng.below(3) {
                    0 => PaymentResult::Approved {
                        payment_id: format!("pay-{step}"),
                    },
                    1 => PaymentResult::Declined {
                        error: "declined".into(),
                    },
                    _ => PaymentResult::Failed {
                        error: "timeout".into(),
                    },
                };
                let cmd = SettleTopUpCommand {
                    account_id: account.clone(),
                    purchase_id,
                    result,
                };
                let (m, r) = (
                    memory.settle_top_up(cmd.clone(), now).await,
                    redis.settle_top_up(cmd, now).await,
                );
                assert_eq!(m, r, "{context}: settle top-up");
                if let Ok(out) = m {
                    purchases.extend(out.top_up.map(|p| (account.clone(), p.id)));
                }
            }
            _ => {
                let next = (expiries.iter())
                    .filter(|(_, t)| *t > now.as_millis())
                    .min_by_key(|(_, t)| *t)
                    .cloned();
                if let (0..=1, Some((owner, t))) = (rng.below(6), next) {
                    // Reads of the account whose hold or lot expires next on one replica, a
                    // few milliseconds before and at or after the expiry.
                    let limit = rng.below(7) as usize;
                    let before =
                        Timestamp::from_millis((t - 1 - rng.below(3) as i64).max(now.as_millis()));
                    let read = (owner.as_str(), limit, before);
                    let _ = replicas.usage(x, memory, read, &context).await;
                    now = Timestamp::from_millis(t + rng.below(3) as i64);
                    let read = (owner.as_str(), limit, now);
                    let _ = replicas.usage(x, memory, read, &context).await;
                    seen.reads_across_an_expiry += 1;
                    continue;
                }
                let jump = match rng.below(10) {
                    0 => rng.below(3) as i64 * DAY_MS,
                    1..=3 => rng.below(6) as i64 * HOUR_MS,
                    _ => rng.below(30) as i64 * MINUTE_MS,
                };
                now = now.plus_millis(jump + rng.below(1_000) as i64);
            }
        }
    }
    for (x, account) in accounts.iter().enumerate() {
        let context = format!("seed {seed}: final usage");
        let x = x % replicas.stores.len();
        let m = replicas
            .usage(x, memory, (account, 10, now), &context)
            .await;
        if let Ok(s) = m {
            let t = s.totals;
            assert_eq!(
                t.granted,
                t.balance + t.spent + t.expired + t.revoked,
                "seed {seed}: conservation"
            );
        }
    }
    let _: Timestamp = now;
}

/// `QUOTAD_DIFF_SEED` alone (`only`), or the first `QUOTAD_DIFF_SEEDS` (default 40).
fn seeds(only: Option<u64>) -> std::ops::RangeInclusive<u64> {
    let count: u64 = std::env::var("QUOTAD_DIFF_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    only.map_or(1..=count, |s| s..=s)
}

/// Runs the seeds against a store from `opener` (a fresh one per seed, opened through the
/// function it returns), restarted from what it wrote before about 3% of the steps (the old one
/// lets go before the new one opens), beside the memory store alone: every answer must be equal.
async fn restarted_store_answers_as_memory_alone(
    policy: Arc<Policy>,
    mut opener: impl FnMut() -> Box<dyn Fn() -> MemoryStore>,
) {
    let only: Option<u64> = std::env::var("QUOTAD_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut seen = Seen::default();
    let restarts = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for seed in seeds(only) {
        let open = opener();
        let restarted = restarts.clone();
        let mut replicas = Replicas {
            stores: vec![open()],
            between: Some(Box::new(move |stores: &mut Vec<MemoryStore>, dice| {
                if dice < 3 {
                    stores.clear();
                    stores.push(open());
                    restarted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })),
        };
        let memory = MemoryStore::new(policy.clone());
        run(seed, 300, &mut replicas, &memory, &mut seen).await;
    }
    println!("{seen:?}");
    if only.is_none() {
        assert!(restarts.load(std::sync::atomic::Ordering::Relaxed) > 100);
        assert!(
            seen.retried_after_allow > 0 && seen.reads_across_an_expiry > 0,
            "the seeds retried request ids and read across expiries: {seen:?}"
        );
    }
}

/// The embedded store with a data dir decides exactly as the memory store alone: the same
/// sequences, while the store is restarted from its data dir now and then (every answer after a
/// restart comes from what was written) and idle accounts leave memory and are read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_data_dir_answers_exactly_as_memory_alone() {
    let policy = Arc::new(policy());
    let rules = LiveRules::fixed(policy.clone());
    restarted_store_answers_as_memory_alone(policy, || {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = DataDirSettings::new(dir.path());
        // Short, so that the clock's jumps send accounts out of memory often.
        settings.evict_idle = std::time::Duration::from_secs(20 * 60);
        // Small, so that the commit log changes segments (and checkpoints) within a seed, and
        // a fresh data dir does not zero-fill 128 MiB of log first.
        settings.log_segment_bytes = 256 << 10;
        let rules = rules.clone();
        // The closure keeps the directory for the seed.
        Box::new(move || {
            let _dir = &dir;
            MemoryStore::open(rules.clone(), &settings).unwrap()
        })
    })
    .await;
}

/// The Redis store decides exactly as the memory store alone: the
/// same sequences, while the owner is restarted now and then (it gives its leases up, the next
/// one takes them and every answer after that comes from what Redis holds) and idle accounts
/// leave memory and are read back from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_answers_exactly_as_memory_alone() {
    let server = tokio::task::spawn_blocking(support::redis::shared_server)
        .await
        .unwrap();
    let policy = Arc::new(policy());
    let rules = LiveRules::fixed(policy.clone());
    restarted_store_answers_as_memory_alone(policy, || {
        let redis = support::redis::settings(&server.url(), None);
        let owned = OwnedSettings {
            // Short, so that the clock's jumps send accounts out of memory often.
            evict_idle: std::time::Duration::from_secs(20 * 60),
            ..OwnedSettings::default()
        };
        let rules = rules.clone();
        Box::new(move || {
            let (rules, redis, owned) = (rules.clone(), redis.clone(), owned.clone());
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async move {
                    MemoryStore::open_on_redis(rules, &redis, &owned)
                        .await
                        .unwrap()
                })
            })
        })
    })
    .await;
}
