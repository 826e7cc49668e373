//! The two-phase reservation: Reserve holds the priced estimate, Commit charges usage against
//! it (and, for a task that goes on, holds its next chunk), Release returns it.
//!
//! Reservations follow the two-phase pattern of a ledger transfer: a hold is *pending* until it
//! is committed (posted), released (voided) or passes its `expires_at` (timed out). Holds count
//! as used from the moment they are made, so two tasks cannot both spend the last of a window.
//! Every answer is kept for retries: a Reserve's under its request id, a finished reservation's
//! under its id (see [`super::holds`]). A commit that charges something is numbered and kept in
//! the account's bounded recent history.

use std::collections::HashSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::funding::Route;
use super::holds::{Closed, Reservation};
use super::{AccountState, push_compact};
use crate::domain::decision::{
    CommitCommand, CommitOutcome, CommitReceipt, Decision, DenyReason, ReleaseCommand,
    ReleaseOutcome, ReserveCommand, ReserveOutcome, UsageEvent,
};
use crate::domain::error::DomainError;
use crate::domain::money::{Funding, Micros, check_amount};
use crate::domain::policy::Policy;
use crate::domain::pricing::Usage;
use crate::domain::time::Timestamp;

/// The first answer to a Reserve, kept for retries with the same request id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct RequestRecord {
    fingerprint: u64,
    decision: Decision,
    estimate: Micros,
}

impl RequestRecord {
    /// An allowed request held its estimate, no more.
    pub(super) fn check(&self) -> Result<(), String> {
        check_amount("estimate", self.estimate)?;
        if let Decision::Allow { held, .. } = self.decision {
            held.check("held")?;
            if held.total() > self.estimate {
                return Err(format!(
                    "held {} for an estimate of {}",
                    held.total(),
                    self.estimate
                ));
            }
        }
        Ok(())
    }

    /// Makes an allowed request name its reservation with the copy of the id in `ids`, as the
    /// request that made it did: read back from storage, each has its own.
    pub(super) fn share_id(&mut self, ids: &HashSet<Arc<str>>) {
        if let Decision::Allow { reservation_id, .. } = &mut self.decision
            && let Some(shared) = ids.get(&**reservation_id)
        {
            *reservation_id = shared.clone();
        }
    }
}

impl AccountState {
    pub fn reserve(
        &mut self,
        policy: &Policy,
        cmd: &ReserveCommand,
        now: Timestamp,
    ) -> Result<ReserveOutcome, DomainError> {
        self.settle(policy, now);
        let fingerprint = cmd.fingerprint();
        if let Some(first) = self.requests.get(&cmd.request_id) {
            if first.fingerprint != fingerprint {
                return Err(DomainError::request_reused(&cmd.request_id));
            }
            let (decision, estimate) = (first.decision.clone(), first.estimate);
            return Ok(ReserveOutcome {
                decision,
                estimate,
                status: self.status(policy)?,
                top_up: None,
                awaiting_top_up: false,
                shadow_denial: None,
            });
        }
        let plan = self.plan(policy)?;
        let funded = self.fund(policy, plan, &cmd.product, cmd.cost, now);
        // Short of credits while a purchase is on its way: the caller may wait for it and ask
        // again, so this answer is not recorded as the request's first.
        if let Err(denial) = &funded
            && cmd.wait_for_top_up
            && denial.reason == DenyReason::CreditsExhausted
        {
            let top_up = self.check_top_up(policy, now);
            if self.top_up().in_flight().is_some() {
                return Ok(ReserveOutcome {
                    decision: Decision::Deny(Box::new(denial.clone())),
                    estimate: cmd.cost,
                    status: self.status(policy)?,
                    top_up,
                    awaiting_top_up: true,
                    shadow_denial: None,
                });
            }
        }
        // Shadow mode lets the work go ahead, held on the plan beyond its limits: no credits
        // are spent that the rules would not spend.
        let (funded, shadow_denial) = match funded {
            Err(denial) if policy.shadow(&self.account.plan) => {
                (Ok(Funding::new(cmd.cost, 0)), Some(Box::new(denial)))
            }
            funded => (funded, None),
        };
        let decision = match funded {
            Ok(held) => {
                let expires_at = now.plus_millis(cmd.ttl_ms);
                let id: Arc<str> = cmd.reservation_id.as_str().into();
                self.open.insert(Reservation {
                    id: id.clone(),
                    product: cmd.product.clone(),
                    estimate: cmd.cost,
                    ttl_ms: cmd.ttl_ms,
                    held,
                    charged: Funding::ZERO,
                    usage: Usage {
                        model: cmd.estimate.model.clone(),
                        ..Usage::default()
                    },
                    expires_at,
                });
                Decision::Allow {
                    reservation_id: id,
                    held,
                    expires_at,
                }
            }
            Err(denial) => Decision::Deny(Box::new(denial)),
        };
        let record = RequestRecord {
            fingerprint,
            decision: decision.clone(),
            estimate: cmd.cost,
        };
        self.requests
            .insert(now, cmd.request_id.as_str().into(), record);
        let top_up = self.check_top_up(policy, now);
        Ok(ReserveOutcome {
            decision,
            estimate: cmd.cost,
            status: self.status(policy)?,
            top_up,
            awaiting_top_up: false,
            shadow_denial,
        })
    }

    /// The answer for a reservation that is no longer open.
    fn closed_answer(
        &self,
        id: &str,
        is_final: bool,
        fingerprint: u64,
    ) -> Result<CommitReceipt, DomainError> {
        match self.closed.get(id) {
            None => Err(DomainError::reservation_not_found(id)),
            Some(Closed::Committed {
                fingerprint: first,
                charged,
                charged_total,
            }) if is_final && *first == fingerprint => {
                Ok(CommitReceipt::finished(*charged, *charged_total))
            }
            Some(Closed::Committed { .. }) => Err(DomainError::already_committed(id, true)),
            Some(Closed::Released { .. }) => Err(DomainError::already_released(id)),
            Some(Closed::Expired { at, .. }) => Err(DomainError::reservation_expired(id, *at)),
        }
    }

    pub fn commit(
        &mut self,
        policy: &Policy,
        cmd: &CommitCommand,
        now: Timestamp,
    ) -> Result<CommitOutcome, DomainError> {
        self.settle(policy, now);
        let fingerprint = cmd.fingerprint();
        let plan = self.plan(policy)?;
        // Take the reservation out so the account's other state can be read while it changes.
        let Some(mut r) = self.open.remove(&cmd.reservation_id) else {
            let receipt = self.closed_answer(&cmd.reservation_id, cmd.is_final, fingerprint)?;
            return Ok(CommitOutcome {
                receipt,
                status: self.status(policy)?,
                top_up: None,
                event: None,
                shadow_denial: None,
            });
        };

        let delta = (cmd.cost - r.charged.total()).max(0);
        let hold_plan = delta.min(r.held.plan);
        let from_hold = Funding::new(hold_plan, (delta - hold_plan).min(r.held.credit));
        let beyond = delta - from_hold.total();
        r.held = Funding::ZERO;
        // Usage beyond the hold is charged all the same: plan allowance first, then credits
        // where the route allows (possibly below zero), else as overage on the plan windows.
        let beyond_plan = match self.route(policy, plan, &r.product) {
            Route::Credits => beyond.min((self.plan_room(plan) - from_hold.plan).max(0)),
            Route::Deny { .. } => beyond,
        };
        let charge = from_hold.plus(Funding::new(beyond_plan, beyond - beyond_plan));
        self.five_hour.add(now, charge.plan);
        self.weekly.add(now, charge.plan);
        self.ledger.spend(charge.credit);
        r.charged = r.charged.plus(charge);
        let event = (delta > 0).then(|| self.record_event(policy, now, &r, cmd, charge));
        r.usage = max_usage(&r.usage, &cmd.usage);

        let mut shadow_denial = None;
        let receipt = if cmd.is_final {
            let closed = Closed::Committed {
                fingerprint,
                charged: charge,
                charged_total: r.charged,
            };
            self.closed.insert(now, r.id, closed);
            CommitReceipt::finished(charge, r.charged)
        } else {
            r.expires_at = now.plus_millis(r.ttl_ms);
            let (held, denial) = match self.fund(policy, plan, &r.product, r.estimate, now) {
                Ok(held) => (held, None),
                // Shadow mode: the next chunk goes ahead on the plan, as a Reserve would.
                Err(denial) if policy.shadow(&self.account.plan) => {
                    shadow_denial = Some(Box::new(denial));
                    (Funding::new(r.estimate, 0), None)
                }
                Err(denial) => (Funding::ZERO, Some(denial)),
            };
            r.held = held;
            let receipt = CommitReceipt::continuing(charge, r.charged, held, r.expires_at, denial);
            self.open.insert(r);
            receipt
        };
        let top_up = self.check_top_up(policy, now);
        Ok(CommitOutcome {
            receipt,
            status: self.status(policy)?,
            top_up,
            event,
            shadow_denial,
        })
    }

    /// Numbers a charge and keeps it in the bounded recent history.
    fn record_event(
        &mut self,
        policy: &Policy,
        now: Timestamp,
        r: &Reservation,
        cmd: &CommitCommand,
        charged: Funding,
    ) -> UsageEvent {
        self.events += 1;
        let event = UsageEvent {
            seq: self.events,
            at: now,
            product: crate::domain::decision::intern(&r.product),
            usage: Usage {
                // Priced already, so one of the sheet's few models: one copy for all events.
                model: crate::domain::decision::intern(&cmd.usage.model),
                ..cmd.usage.since(&r.usage)
            },
            charged,
            reservation_id: r.id.clone(),
            price_version: crate::domain::decision::intern(&cmd.price_version),
        };
        let capacity = policy.limits.recent_events as usize;
        if capacity > 0 {
            while self.recent.len() >= capacity {
                self.recent.pop_front();
            }
            push_compact(&mut self.recent, event.clone());
        }
        event
    }

    pub fn release(
        &mut self,
        policy: &Policy,
        cmd: &ReleaseCommand,
        now: Timestamp,
    ) -> Result<ReleaseOutcome, DomainError> {
        self.settle(policy, now);
        let id = &cmd.reservation_id;
        if let Some(r) = self.open.remove(id) {
            self.closed
                .insert(now, r.id, Closed::Released { released: r.held });
            return Ok(ReleaseOutcome { released: r.held });
        }
        match self.closed.get(id) {
            None => Err(DomainError::reservation_not_found(id)),
            Some(Closed::Released { released } | Closed::Expired { released, .. }) => {
                Ok(ReleaseOutcome {
                    released: *released,
                })
            }
            Some(Closed::Committed { .. }) => Err(DomainError::already_committed(id, false)),
        }
    }
}

fn max_usage(a: &Usage, b: &Usage) -> Usage {
    Usage {
        model: b.model.clone(),
        input_tokens: a.input_tokens.max(b.input_tokens),
        cached_input_tokens: a.cached_input_tokens.max(b.cached_input_tokens),
        output_tokens: a.output_tokens.max(b.output_tokens),
        images: a.images.max(b.images),
        fast_mode: b.fast_mode,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::domain::decision::Account;
    use crate::domain::ledger::LotSource;
    use crate::domain::money::MICROS_PER_CREDIT as C;
    use crate::domain::time::MINUTE_MS;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Shadow mode answers every Reserve ALLOW; one it lets through holds the estimate on
        /// the plan and no credits, and reports why the rules would have denied it; a task's
        /// next chunk is always funded. Credits stay conserved.
        #[test]
        fn shadow_mode_lets_work_through_without_spending_credits(ops in prop::collection::vec(op(), 1..120)) {
            let mut policy = tight_policy();
            policy.shadow = true;
            let mut s = AccountState::new(Account { id: "a".into(), plan: "plus".into(), credit_purchase_allowed: true });
            let mut now = Timestamp::from_millis(T0);
            let mut reservations: Vec<String> = Vec::new();
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Reserve { product, credits, ttl_min } => {
                        let cmd = reserve_cmd(i, product, credits, ttl_min);
                        s.settle(&policy, now);
                        let available = s.credits_available();
                        let outcome = s.reserve(&policy, &cmd, now).unwrap();
                        let Decision::Allow { reservation_id, held, .. } = outcome.decision else {
                            return Err(TestCaseError::fail(format!("denied in shadow mode: {outcome:?}")));
                        };
                        if let Some(denial) = &outcome.shadow_denial {
                            prop_assert_eq!(held, Funding::new(credits * C, 0));
                            prop_assert!(!denial.message.is_empty());
                            prop_assert_eq!(s.credits_available(), available, "no credits held");
                        }
                        reservations.push(reservation_id.to_string());
                    }
                    Op::Commit { pick, credits, is_final } if !reservations.is_empty() => {
                        let id = reservations[pick % reservations.len()].clone();
                        let cmd = commit_cmd(id, credits, is_final);
                        if let Ok(outcome) = s.commit(&policy, &cmd, now) {
                            prop_assert_eq!(outcome.receipt.may_continue, !is_final);
                            if outcome.shadow_denial.is_some() {
                                prop_assert_eq!(outcome.receipt.held.credit, 0);
                            }
                        }
                    }
                    Op::Release { pick } if !reservations.is_empty() => {
                        let id = reservations[pick % reservations.len()].clone();
                        let _ = s.release(&policy, &ReleaseCommand { account_id: "a".into(), reservation_id: id }, now);
                    }
                    Op::Grant { credits, days } => {
                        let cmd = grant_cmd(i, credits, days, LotSource::Purchase, now);
                        s.grant(&policy, &cmd, now).unwrap();
                    }
                    Op::Advance { minutes } => now = now.plus_millis(minutes * MINUTE_MS),
                    Op::SetPlan { plus, allowed } => {
                        s.update_account(if plus { "plus" } else { "free" }.into(), allowed);
                    }
                    _ => {}
                }
                let t = s.ledger.totals();
                prop_assert_eq!(t.granted, t.balance + t.spent + t.expired + t.revoked, "conservation");
                // Windows past their limits are still states a store may read back.
                prop_assert_eq!(s.check(), Ok(()));
            }
        }
    }
}
