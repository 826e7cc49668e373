//! How work is paid for: a cost is split into plan allowance first (the tighter of the 5-hour
//! and weekly windows, holds included), then credits where the plan, the product and the
//! account allow them; or it is denied, and the denial says why, what to do and when the plan
//! can next pay for it.

use super::AccountState;
use crate::domain::decision::{Action, Denial, DenialFacts, Shortfall};
use crate::domain::money::{Funding, Micros};
use crate::domain::policy::{Overage, Plan, Policy};
use crate::domain::time::Timestamp;

/// How usage beyond the plan's allowance is handled for one product on one account.
pub(super) enum Route<'p> {
    Credits,
    /// No credits: the denial names this reason and action.
    Deny {
        credits_barred: bool,
        action: Action,
        upgrade_to: Option<&'p str>,
    },
}

impl AccountState {
    /// Plan allowance left in the tighter of the two windows, holds included.
    pub(super) fn plan_room(&self, plan: &Plan) -> Micros {
        let held = self.held().plan;
        self.windows(plan)
            .iter()
            .map(|(w, limit)| (limit - w.committed() - held).max(0))
            .min()
            .unwrap_or(0)
    }

    pub(super) fn route<'p>(&self, policy: &'p Policy, plan: &'p Plan, product: &str) -> Route<'p> {
        let product_credits = policy.product(product).is_some_and(|p| p.credits);
        let upgrade = || match plan.upgrade_to.as_deref() {
            Some(to) => (Action::UpgradePlan, Some(to)),
            None => (Action::WaitForReset, None),
        };
        match plan.overage {
            Overage::Credits if product_credits && self.account.credit_purchase_allowed => {
                Route::Credits
            }
            Overage::Credits if product_credits => {
                let (action, upgrade_to) = upgrade();
                Route::Deny {
                    credits_barred: true,
                    action,
                    upgrade_to,
                }
            }
            Overage::Credits => Route::Deny {
                credits_barred: false,
                action: Action::WaitForReset,
                upgrade_to: None,
            },
            Overage::Upgrade => {
                let (action, upgrade_to) = upgrade();
                Route::Deny {
                    credits_barred: false,
                    action,
                    upgrade_to,
                }
            }
        }
    }

    /// Splits `cost` into plan allowance first, then credits where the route allows; or says
    /// why it cannot be funded.
    pub(super) fn fund(
        &self,
        policy: &Policy,
        plan: &Plan,
        product: &str,
        cost: Micros,
        now: Timestamp,
    ) -> Result<Funding, Denial> {
        let room = self.plan_room(plan);
        if cost <= room {
            return Ok(Funding::new(cost, 0));
        }
        let (action, upgrade_to, shortfall, retry_at) = match self.route(policy, plan, product) {
            Route::Credits => {
                let available = self.credits_available();
                let need = cost - room;
                if available >= need {
                    return Ok(Funding::new(room, need));
                }
                let (_, retry_at) = self.plan_refill(plan, cost - available.max(0), now);
                let shortfall = Shortfall::Credits {
                    need,
                    available: available.max(0),
                };
                // After declines, buying more will not help until the payment method is fixed.
                let action = if self.top_up().payment_method_failing() {
                    Action::UpdatePaymentMethod
                } else {
                    Action::BuyCredits
                };
                (action, None, shortfall, retry_at)
            }
            Route::Deny {
                credits_barred,
                action,
                upgrade_to,
            } => {
                let (weekly, retry_at) = self.plan_refill(plan, cost, now);
                let shortfall = if credits_barred {
                    Shortfall::CreditsBarred
                } else {
                    Shortfall::Window { weekly }
                };
                (action, upgrade_to, shortfall, retry_at)
            }
        };
        Err(Denial::from_facts(DenialFacts {
            plan: &self.account.plan,
            product,
            product_credits: policy.product(product).is_some_and(|p| p.credits),
            shortfall,
            action,
            upgrade_to: upgrade_to.map(str::to_owned),
            retry_at,
        }))
    }

    /// When the plan windows can next fund `need` (holds as they are now), and whether the
    /// weekly window is the one that takes longest. A need larger than a window can ever hold
    /// gets the instant that window has fully reset.
    fn plan_refill(&self, plan: &Plan, need: Micros, now: Timestamp) -> (bool, Option<Timestamp>) {
        let held = self.held().plan;
        // (never fits, instant): a window that can never fit the need binds over one that can.
        let [five_hour, weekly] = self.windows(plan).map(|(w, limit)| {
            match w.committed_at_most_at(now, limit - held - need) {
                Some(at) => (false, at),
                None => (true, w.resets_at().unwrap_or(now)),
            }
        });
        let weekly_binds = weekly > five_hour;
        let at = if weekly_binds { weekly.1 } else { five_hour.1 };
        (weekly_binds, (at > now).then_some(at))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::domain::decision::{Account, CommitCommand, Decision, DenyReason, ReserveCommand};
    use crate::domain::money::MICROS_PER_CREDIT as C;
    use crate::domain::time::{DAY_MS, HOUR_MS};

    #[test]
    fn a_deny_points_at_the_window_that_binds() {
        let policy = Policy::default();
        let mut s = AccountState::new(Account {
            id: "a".into(),
            plan: "free".into(),
            credit_purchase_allowed: true,
        });
        let mut now = Timestamp::from_millis(T0);
        // 14 credits a day for four days: the 5-hour window has room, the week does not.
        for day in 0..4 {
            let cmd = ReserveCommand {
                account_id: "a".into(),
                request_id: format!("d{day}"),
                product: "codex".into(),
                estimate: usage(14),
                cost: 14 * C,
                plan_hint: None,
                ttl_ms: HOUR_MS,
                reservation_id: format!("r{day}"),
                wait_for_top_up: false,
            };
            assert!(matches!(
                s.reserve(&policy, &cmd, now).unwrap().decision,
                Decision::Allow { .. }
            ));
            let commit = CommitCommand {
                account_id: "a".into(),
                reservation_id: format!("r{day}"),
                usage: usage(14),
                cost: 14 * C,
                is_final: true,
                price_version: "v".into(),
            };
            s.commit(&policy, &commit, now).unwrap();
            now = now.plus_millis(DAY_MS);
        }
        let cmd = ReserveCommand {
            account_id: "a".into(),
            request_id: "late".into(),
            product: "codex".into(),
            estimate: usage(5),
            cost: 5 * C,
            plan_hint: None,
            ttl_ms: HOUR_MS,
            reservation_id: "late".into(),
            wait_for_top_up: false,
        };
        let Decision::Deny(d) = s.reserve(&policy, &cmd, now).unwrap().decision else {
            panic!("week is full")
        };
        assert_eq!(d.reason, DenyReason::WeeklyExhausted);
        assert_eq!(d.upgrade_to.as_deref(), Some("go"));
        // 56 used of 60: the first day's 14 must leave, a week (and one bucket at most) after it.
        let retry = d.retry_at.unwrap();
        assert!(
            retry >= Timestamp::from_millis(T0 + 7 * DAY_MS)
                && retry <= Timestamp::from_millis(T0 + 7 * DAY_MS + HOUR_MS)
        );
        assert!(d.message.contains("this week"), "{}", d.message);
    }
}
