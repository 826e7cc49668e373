//! What the account tests share: a policy with small limits, usage priced in whole credits, and
//! random operations (and their commands) for the property tests.

use crate::domain::money::MICROS_PER_CREDIT as C;
use crate::domain::policy::Policy;
use crate::domain::pricing::Usage;
use crate::domain::time::{DAY_MS, MINUTE_MS};
use crate::domain::{CommitCommand, GrantCommand, LotSource, ReserveCommand, Timestamp};
use proptest::prelude::*;

pub(super) const T0: i64 = 1_795_557_600_000;

/// Small limits so that random sequences hit every boundary.
pub(super) fn tight_policy() -> Policy {
    let mut p = Policy::default();
    for (name, h5, week) in [("free", 10, 25), ("plus", 20, 50)] {
        let plan = p.plans.get_mut(name).unwrap();
        plan.limit_5h_micros = h5 * C;
        plan.limit_weekly_micros = week * C;
    }
    p
}

pub(super) fn usage(credits: i64) -> Usage {
    // 200 credits per million output tokens on the mini model: 5,000 tokens a credit.
    Usage {
        model: "gpt-5.5-mini".into(),
        output_tokens: credits as u64 * 5_000,
        ..Usage::default()
    }
}

#[derive(Debug, Clone)]
pub(super) enum Op {
    Reserve {
        product: usize,
        credits: i64,
        ttl_min: i64,
    },
    Commit {
        pick: usize,
        credits: i64,
        is_final: bool,
    },
    Release {
        pick: usize,
    },
    Grant {
        credits: i64,
        days: i64,
    },
    Advance {
        minutes: i64,
    },
    Revoke {
        pick: usize,
    },
    SetPlan {
        plus: bool,
        allowed: bool,
    },
}

pub(super) fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..3, 1i64..15, 1i64..60).prop_map(|(product, credits, ttl_min)| Op::Reserve { product, credits, ttl_min }),
        4 => (any::<usize>(), 0i64..25, any::<bool>()).prop_map(|(pick, credits, is_final)| Op::Commit { pick, credits, is_final }),
        1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => (1i64..40, 1i64..10).prop_map(|(credits, days)| Op::Grant { credits, days }),
        2 => (0i64..400).prop_map(|minutes| Op::Advance { minutes }),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(plus, allowed)| Op::SetPlan { plus, allowed }),
        1 => any::<usize>().prop_map(|pick| Op::Revoke { pick }),
    ]
}

const PRODUCTS: [&str; 3] = ["codex", "excel", "workspace_agents"];

/// The Reserve of operation `i` for account "a".
pub(super) fn reserve_cmd(i: usize, product: usize, credits: i64, ttl_min: i64) -> ReserveCommand {
    ReserveCommand {
        account_id: "a".into(),
        request_id: format!("q{i}"),
        product: PRODUCTS[product].into(),
        estimate: usage(credits),
        cost: credits * C,
        plan_hint: None,
        ttl_ms: ttl_min * MINUTE_MS,
        reservation_id: format!("r{i}"),
        wait_for_top_up: false,
    }
}

/// A Commit of `credits` of cumulative usage to reservation `id` of account "a".
pub(super) fn commit_cmd(id: String, credits: i64, is_final: bool) -> CommitCommand {
    CommitCommand {
        account_id: "a".into(),
        reservation_id: id,
        usage: usage(credits),
        cost: credits * C,
        is_final,
        price_version: "v".into(),
    }
}

/// The grant of operation `i` to account "a", valid `days` from `now`.
pub(super) fn grant_cmd(
    i: usize,
    credits: i64,
    days: i64,
    source: LotSource,
    now: Timestamp,
) -> GrantCommand {
    GrantCommand {
        account_id: "a".into(),
        grant_id: format!("g{i}"),
        amount: credits * C,
        source,
        expires_at: Some(now.plus_millis(days * DAY_MS)),
    }
}
