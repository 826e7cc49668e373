//! The rules quotad decides by, as one snapshot: the policy (plans, products, limits, auto
//! top-up, shadow mode), the price sheet and the Envoy rate limit rules. A reload builds a new
//! snapshot and swaps it in whole ([`LiveRules::replace`]), so nothing ever sees half of one
//! config and half of another.
//!
//! Readers take the snapshot once and keep it for what they are doing: a call is checked and
//! priced on one snapshot (its price version comes from the same sheet it was priced with), and
//! a store runs each atomic step on one policy from start to end. A reload therefore lands
//! between steps, never inside one, and costs readers one atomic load (no lock on the hot path).

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

use crate::domain::rls::RlsRule;
use crate::domain::{Policy, PriceSheet};

/// Everything a reload may change without a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub policy: Arc<Policy>,
    pub pricing: Arc<PriceSheet>,
    /// Checked in order; see [`crate::domain::rls`].
    pub rls: Arc<[RlsRule]>,
    /// Add `RateLimit-*` headers to RLS answers.
    pub rls_headers: bool,
}

impl Rules {
    /// `policy` with the default prices and RLS rules: what stores built for tests and
    /// benchmarks decide by.
    pub fn with_policy(policy: Arc<Policy>) -> Rules {
        Rules {
            policy,
            pricing: Arc::new(PriceSheet::default()),
            rls: crate::domain::rls::default_rules().into(),
            rls_headers: false,
        }
    }
}

/// The current [`Rules`], shared by the application and its store.
#[derive(Debug)]
pub struct LiveRules {
    current: ArcSwap<Rules>,
}

impl LiveRules {
    pub fn new(rules: Rules) -> Arc<LiveRules> {
        Arc::new(LiveRules {
            current: ArcSwap::from_pointee(rules),
        })
    }

    /// Rules that never change (tests, benchmarks, tools).
    pub fn fixed(policy: Arc<Policy>) -> Arc<LiveRules> {
        LiveRules::new(Rules::with_policy(policy))
    }

    /// The snapshot to decide by; keep it for the whole step.
    pub fn current(&self) -> Arc<Rules> {
        self.current.load_full()
    }

    /// The snapshot for a step that does not wait on anything (no `.await` while it is held):
    /// reading it touches no shared reference count, so cores deciding at once do not contend
    /// on one cache line.
    pub fn snapshot(&self) -> Guard<Arc<Rules>> {
        self.current.load()
    }

    /// The current policy, for a step that needs nothing else.
    pub fn policy(&self) -> Arc<Policy> {
        self.current.load().policy.clone()
    }

    /// Swaps in `rules`: steps that already took a snapshot finish on theirs.
    pub fn replace(&self, rules: Rules) {
        self.current.store(Arc::new(rules));
    }
}
