//! The rules quotad enforces, as configured: plans with their window limits and overage route,
//! products of the shared agentic pool, and the bounds on reservations and requests.
//! A [`Policy`] is validated once at start; the decision code can then rely on it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::decision::Account;
use super::money::{MICROS_PER_CREDIT, Micros};
use super::notice::NotificationRules;
use super::top_up::TopUpRules;

/// What happens when a plan's included usage runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overage {
    /// Keep working on prepaid credits (products that allow it).
    Credits,
    /// Prompt the user to move to `upgrade_to`.
    Upgrade,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Included usage in any 5 hours, in micro-credits.
    pub limit_5h_micros: Micros,
    /// Included usage in any 7 days, in micro-credits.
    pub limit_weekly_micros: Micros,
    pub overage: Overage,
    /// The plan an upgrade prompt points to; none for the top plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_to: Option<String>,
    /// Shadow mode for this plan's accounts (see [`Policy::shadow`]).
    #[serde(default)]
    pub shadow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Product {
    /// Whether usage over the plan's limits may be paid with credits.
    pub credits: bool,
}

/// Bounds on reservations and on what a request may ask for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Hold lifetime when a Reserve does not say.
    pub default_ttl_seconds: u32,
    /// Longest hold a Reserve may ask for.
    pub max_ttl_seconds: u32,
    /// How long answers are kept for idempotent retries (and closed reservations for late calls).
    pub idempotency_retention_seconds: u32,
    /// Largest token count accepted in any one field of a usage.
    pub max_tokens: u64,
    /// Largest image count accepted in a usage.
    pub max_images: u32,
    /// Largest single grant, in micro-credits.
    pub max_grant_micros: Micros,
    /// Usage events kept per account for GetUsage.
    pub recent_events: u32,
    /// Usage events kept in the export stream (the newest; Redis trims approximately, a
    /// little above this). Consumers must read faster than this many charges arrive.
    pub export_max_len: u64,
    /// Longest accepted id (account, request, reservation, grant), in bytes.
    pub max_id_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default_ttl_seconds: 15 * 60,
            max_ttl_seconds: 24 * 60 * 60,
            idempotency_retention_seconds: 24 * 60 * 60,
            max_tokens: 100_000_000,
            max_images: 1_000,
            max_grant_micros: 1_000_000_000 * MICROS_PER_CREDIT,
            recent_events: 100,
            export_max_len: 100_000,
            max_id_bytes: 128,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Plan of an account first seen by a Reserve without a plan hint.
    pub default_plan: String,
    pub plans: BTreeMap<String, Plan>,
    pub products: BTreeMap<String, Product>,
    pub limits: Limits,
    pub top_up: TopUpRules,
    /// Which changes are recorded as notifications for the webhook worker.
    #[serde(default)]
    pub notifications: NotificationRules,
    /// Shadow mode for every plan: quotad decides and records as usual, but where it would deny
    /// (a Reserve, or the next chunk of a task) it lets the work go ahead, held and charged on
    /// the plan's windows beyond their limits, and reports the denial it would have given. For
    /// putting quotad in front of live traffic before enforcing.
    #[serde(default)]
    pub shadow: bool,
}

impl Policy {
    /// Whether accounts on `plan` are in shadow mode.
    pub fn shadow(&self, plan: &str) -> bool {
        self.shadow || self.plan(plan).is_some_and(|p| p.shadow)
    }

    pub fn plan(&self, name: &str) -> Option<&Plan> {
        self.plans.get(name)
    }

    /// Whether credits may be bought for `account`: its plan goes on to credits past its
    /// allowance, and credit purchase is not barred for it.
    pub fn may_buy_credits(&self, account: &Account) -> bool {
        account.credit_purchase_allowed
            && self
                .plan(&account.plan)
                .is_some_and(|p| p.overage == Overage::Credits)
    }

    pub fn product(&self, name: &str) -> Option<&Product> {
        self.products.get(name)
    }

    pub fn plan_names(&self) -> String {
        self.plans
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn product_names(&self) -> String {
        self.products
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Checks a policy from configuration; the error names the offending entry.
    pub fn validate(&self) -> Result<(), String> {
        self.notifications.validate()?;
        if self.plans.is_empty() {
            return Err("plans must define at least one plan".into());
        }
        if !self.plans.contains_key(&self.default_plan) {
            return Err(format!(
                "default_plan {:?} is not a configured plan; plans: {}",
                self.default_plan,
                self.plan_names()
            ));
        }
        for (name, plan) in &self.plans {
            if !valid_name(name) {
                return Err(format!(
                    "plans.{name}: plan names use a-z, 0-9, '_' and '-'"
                ));
            }
            for (field, limit) in [
                ("limit_5h_micros", plan.limit_5h_micros),
                ("limit_weekly_micros", plan.limit_weekly_micros),
            ] {
                if limit <= 0 || limit > 1_000_000_000 * MICROS_PER_CREDIT {
                    return Err(format!(
                        "plans.{name}.{field} must be between 1 and 10^15, got {limit}"
                    ));
                }
            }
            if let Some(to) = &plan.upgrade_to
                && (!self.plans.contains_key(to) || to == name)
            {
                return Err(format!(
                    "plans.{name}.upgrade_to {to:?} must name another configured plan; plans: {}",
                    self.plan_names()
                ));
            }
        }
        if self.products.is_empty() {
            return Err("products must define at least one product".into());
        }
        if let Some(bad) = self.products.keys().find(|p| !valid_name(p)) {
            return Err(format!(
                "products.{bad}: product names use a-z, 0-9, '_' and '-'"
            ));
        }
        let l = &self.limits;
        if l.default_ttl_seconds == 0 || l.default_ttl_seconds > l.max_ttl_seconds {
            return Err(format!(
                "limits.default_ttl_seconds must be between 1 and limits.max_ttl_seconds ({}), got {}",
                l.max_ttl_seconds, l.default_ttl_seconds
            ));
        }
        if l.max_ttl_seconds > 24 * 60 * 60 {
            return Err(format!(
                "limits.max_ttl_seconds must be at most 86400 (24 h), got {}",
                l.max_ttl_seconds
            ));
        }
        if l.idempotency_retention_seconds < l.max_ttl_seconds {
            return Err(format!(
                "limits.idempotency_retention_seconds must be at least limits.max_ttl_seconds ({}), got {}",
                l.max_ttl_seconds, l.idempotency_retention_seconds
            ));
        }
        if l.max_tokens == 0 || l.max_tokens > 1_000_000_000_000 {
            return Err(format!(
                "limits.max_tokens must be between 1 and 10^12, got {}",
                l.max_tokens
            ));
        }
        if l.max_grant_micros <= 0 {
            return Err("limits.max_grant_micros must be positive".into());
        }
        if self.top_up.purchase_unit_micros <= 0
            || self.top_up.max_declines == 0
            || self.top_up.decline_backoff_ms < 0
        {
            return Err("top_up: purchase_unit_micros and max_declines must be positive, decline_backoff_ms not negative".into());
        }
        self.top_up.price.check()?;
        if l.max_id_bytes == 0 || l.max_id_bytes > 1024 {
            return Err(format!(
                "limits.max_id_bytes must be between 1 and 1024, got {}",
                l.max_id_bytes
            ));
        }
        Ok(())
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-' || b == b'.'
        })
}

impl Default for Policy {
    /// Plans `free`, `go`, `plus`, `pro` and the products of the shared agentic pool.
    fn default() -> Self {
        let c = MICROS_PER_CREDIT;
        let plan = |h5: Micros, week: Micros, overage: Overage, upgrade_to: Option<&str>| Plan {
            limit_5h_micros: h5 * c,
            limit_weekly_micros: week * c,
            overage,
            upgrade_to: upgrade_to.map(str::to_owned),
            shadow: false,
        };
        Policy {
            default_plan: "free".into(),
            plans: BTreeMap::from([
                ("free".into(), plan(15, 60, Overage::Upgrade, Some("go"))),
                ("go".into(), plan(50, 200, Overage::Upgrade, Some("plus"))),
                ("plus".into(), plan(150, 750, Overage::Credits, Some("pro"))),
                ("pro".into(), plan(1_500, 7_500, Overage::Credits, None)),
            ]),
            products: BTreeMap::from([
                ("codex".into(), Product { credits: true }),
                ("excel".into(), Product { credits: true }),
                ("workspace_agents".into(), Product { credits: false }),
            ]),
            limits: Limits::default(),
            top_up: TopUpRules::default(),
            notifications: NotificationRules::default(),
            shadow: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_is_valid() {
        Policy::default().validate().unwrap();
    }

    #[test]
    fn rejects_an_upgrade_to_an_unknown_plan() {
        let mut p = Policy::default();
        p.plans.get_mut("free").unwrap().upgrade_to = Some("gold".into());
        let err = p.validate().unwrap_err();
        assert!(err.contains("plans.free.upgrade_to \"gold\""), "{err}");
    }

    #[test]
    fn rejects_a_default_ttl_over_the_maximum() {
        let mut p = Policy::default();
        p.limits.default_ttl_seconds = p.limits.max_ttl_seconds + 1;
        assert!(
            p.validate()
                .unwrap_err()
                .starts_with("limits.default_ttl_seconds")
        );
    }
}
