//! The Redis scripts are a port of the Rust rules, so they are held to them directly: seeded
//! random sequences of operations (reserves, partial and final commits, releases, retries,
//! grants, plan changes, clock jumps across hold expiry, lot expiry and window resets) run
//! against the memory store and a Redis store side by side, and every answer must be equal.
//! A failure prints the seed and the step; `QUOTAD_DIFF_SEED=N` replays one seed and
//! `QUOTAD_DIFF_SEEDS=N` runs more of them.

mod support;

use std::sync::Arc;

use quotad::domain::time::{DAY_MS, HOUR_MS, MINUTE_MS};
use quotad::domain::top_up::{PaymentResult, TopUpSettings};
use quotad::domain::{
    Account, CommitCommand, Decision, GrantCommand, LotSource, Policy, PriceSheet, ReleaseCommand,
    ReserveCommand, RevokeCommand, Timestamp, Usage,
};
use quotad::domain::{SetTopUpCommand, SettleTopUpCommand};
use quotad::store::{MemoryStore, RedisStore, Store};
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

/// A policy with small limits, so that sequences cross every boundary often.
fn policy() -> Policy {
    let mut p = Policy::default();
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

async fn run(seed: u64, steps: usize, redis: &RedisStore, memory: &MemoryStore) {
    let sheet = PriceSheet::default();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let accounts = ["a", "b", "c"];
    let mut now = T0;
    let mut reservations: Vec<(String, String, Usage)> = Vec::new();
    let mut requests: Vec<ReserveCommand> = Vec::new();
    let mut grants: Vec<GrantCommand> = Vec::new();
    let mut purchases: Vec<(String, String)> = Vec::new();
    for step in 0..steps {
        let account = rng.pick(&accounts).to_string();
        let context = format!("seed {seed}, step {step}");
        match rng.below(100) {
            0..=29 => {
                let cmd = if !requests.is_empty() && rng.below(6) == 0 {
                    rng.pick(&requests).clone()
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
                    purchases.extend(
                        out.top_up
                            .iter()
                            .map(|p| (cmd.account_id.clone(), p.id.clone())),
                    );
                    if let Decision::Allow { reservation_id, .. } = &out.decision {
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
                    purchases.extend(out.top_up.map(|p| (account, p.id)));
                }
            }
            55..=62 if !reservations.is_empty() => {
                let (account, id, _) = rng.pick(&reservations).clone();
                let cmd = ReleaseCommand {
                    account_id: account,
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
                let (m, r) = (
                    memory.grant(cmd.clone(), now).await,
                    redis.grant(cmd, now).await,
                );
                assert_eq!(m, r, "{context}: grant");
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
                let account = Account {
                    id: account,
                    plan,
                    credit_purchase_allowed: rng.below(4) > 0,
                };
                let (m, r) = (
                    memory.upsert_account(account.clone(), now).await,
                    redis.upsert_account(account, now).await,
                );
                assert_eq!(m, r, "{context}: upsert");
            }
            79..=88 => {
                let limit = rng.below(7) as usize;
                let (m, r) = (
                    memory.usage(&account, limit, now).await,
                    redis.usage(&account, limit, now).await,
                );
                assert_eq!(m, r, "{context}: usage of {account}");
            }
            89..=91 => {
                let threshold = rng.below(20) as i64 * 1_000_000 + rng.below(1_000) as i64;
                let target = if rng.below(10) == 0 {
                    threshold
                } else {
                    threshold + (1 + rng.below(50) as i64) * 1_000_000
                };
                let settings = TopUpSettings {
                    enabled: rng.below(3) > 0,
                    threshold,
                    target,
                    monthly_cap: (rng.below(3) == 0)
                        .then(|| (10 + rng.below(70) as i64) * 1_000_000),
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
                let jump = match rng.below(10) {
                    0 => rng.below(3) as i64 * DAY_MS,
                    1..=3 => rng.below(6) as i64 * HOUR_MS,
                    _ => rng.below(30) as i64 * MINUTE_MS,
                };
                now = now.plus_millis(jump + rng.below(1_000) as i64);
            }
        }
    }
    for account in accounts {
        let (m, r) = (
            memory.usage(account, 10, now).await,
            redis.usage(account, 10, now).await,
        );
        assert_eq!(m, r, "seed {seed}: final usage of {account}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_scripts_answer_exactly_as_the_rust_rules() {
    let server = tokio::task::spawn_blocking(support::redis::shared_server)
        .await
        .unwrap();
    let policy = Arc::new(policy());
    let seeds: u64 = std::env::var("QUOTAD_DIFF_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let only: Option<u64> = std::env::var("QUOTAD_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    for seed in only.map_or(1..=seeds, |s| s..=s) {
        let settings = support::redis::settings(&server.url(), None);
        let redis = RedisStore::connect(settings, policy.clone()).await.unwrap();
        let memory = MemoryStore::new(policy.clone());
        run(seed, 300, &redis, &memory).await;
    }
}
