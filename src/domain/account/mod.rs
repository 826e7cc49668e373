//! The whole quota state of one account and the rules that change it.
//!
//! Every operation is a method on [`AccountState`] that takes the configured [`Policy`] and
//! "now", first [`settles`](AccountState::settle) what time has done (expired holds are
//! returned, expired lots move to `expired`, old usage leaves the windows), then decides and
//! applies. A store keeps one `AccountState` per account and runs each method as one atomic
//! step, which is all the concurrency control the rules need: accounts never share state.
//!
//! This file owns the state itself: its fields, how it is made, what time does to it
//! ([`settle`](AccountState::settle)) and how it is read ([`status`](AccountState::status),
//! [`snapshot`](AccountState::snapshot)). The operations live beside it, one idea a file:
//!
//! - `reserve`: the two-phase reservation (Reserve, Commit, Release) and the usage history
//!   commits leave;
//! - `credits`: credit lots (grant, revoke) and auto top-up (settings, trigger, settlement);
//! - `funding`: how a cost is paid for (plan allowance first, then credits where the route
//!   allows) and when the plan can next pay, for denials;
//! - `holds`: the records of open and finished reservations and how they are kept small;
//! - `notices`: when the notification rules look at the account, and what they are shown.

mod credits;
mod funding;
mod holds;
mod notices;
pub mod persisted;
mod reserve;
#[cfg(test)]
mod testing;

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::decision::{Account, AccountStatus, HoldView, UsageEvent, UsageSnapshot, WindowStatus};
use super::error::DomainError;
use super::ledger::Ledger;
use super::money::{Funding, Micros};
use super::notice::Notices;
use super::policy::{Plan, Policy};
use super::time::{SECOND_MS, Timestamp};
use super::top_up::{Purchase, TopUp};
use super::window::{FIVE_HOUR, SlidingWindow, WEEKLY, WindowSpec};

use credits::Grants;
use holds::{Closed, OpenHolds, Retained};
use reserve::RequestRecord;

pub use credits::{LOT_VALIDITY_MONTHS, default_lot_expiry};
pub use holds::Reservation;

/// The largest amount any account total may reach: every integer up to 2^53 − 1 is exact in an
/// IEEE double, which is how JSON readers such as JavaScript clients and dashboards hold
/// numbers, so no total is ever shown rounded.
pub const MAX_EXACT_MICROS: Micros = (1 << 53) - 1;

/// Serializable for the durable store (see [`persisted`]), all but the recent history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountState {
    account: Account,
    #[serde(deserialize_with = "five_hour_window")]
    five_hour: SlidingWindow,
    #[serde(deserialize_with = "weekly_window")]
    weekly: SlidingWindow,
    ledger: Ledger,
    open: OpenHolds,
    closed: Retained<Closed>,
    requests: Retained<RequestRecord>,
    /// Boxed and made on the first grant: most accounts never get one.
    #[serde(with = "credits::grants_by_id")]
    grants: Grants,
    /// Newest last. Not persisted: a durable store keeps the history apart, and takes it from
    /// here with [`take_recent`](Self::take_recent).
    #[serde(skip)]
    recent: VecDeque<UsageEvent>,
    /// Charges recorded so far (the last event's `seq`).
    events: u64,
    /// None until auto top-up is first configured (most accounts never do).
    top_up: Option<Box<TopUp>>,
    /// Notifications for the webhook worker, with what their rules remember; None until the
    /// first is needed (most accounts never get one).
    notices: Option<Box<Notices>>,
}

fn five_hour_window<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SlidingWindow, D::Error> {
    SlidingWindow::deserialize_as(&FIVE_HOUR, d)
}

fn weekly_window<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SlidingWindow, D::Error> {
    SlidingWindow::deserialize_as(&WEEKLY, d)
}

/// Pushes onto a queue that grows by half its length at a time (from one), not by doubling
/// from four: per-account queues are short and there are millions of them.
fn push_compact<T>(queue: &mut VecDeque<T>, item: T) {
    if queue.len() == queue.capacity() {
        queue.reserve_exact((queue.len() / 2).max(1));
    }
    queue.push_back(item);
}

impl AccountState {
    pub fn new(account: Account) -> Self {
        AccountState {
            account,
            five_hour: SlidingWindow::new(&FIVE_HOUR),
            weekly: SlidingWindow::new(&WEEKLY),
            ledger: Ledger::default(),
            open: OpenHolds::default(),
            closed: Retained::default(),
            requests: Retained::default(),
            grants: None,
            recent: VecDeque::new(),
            events: 0,
            top_up: None,
            notices: None,
        }
    }

    pub fn account(&self) -> &Account {
        &self.account
    }

    /// Takes the recent history out, oldest first, leaving it empty (a durable store keeps the
    /// history in its own table).
    pub fn take_recent(&mut self) -> Vec<UsageEvent> {
        std::mem::take(&mut self.recent).into()
    }

    /// Whether this state is one the rules could have made, as far as its parts can tell:
    /// every amount in range, credits conserved, windows and records consistent, counters that
    /// can still count. For states read back from storage; the error says what is wrong where.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.account.id.is_empty() {
            return Err("the account has no id".into());
        }
        let windows: [(&SlidingWindow, &WindowSpec); 2] =
            [(&self.five_hour, &FIVE_HOUR), (&self.weekly, &WEEKLY)];
        for (window, spec) in windows {
            if window.spec() != *spec {
                return Err(format!("the {} window has another shape", spec.name));
            }
            window
                .check()
                .map_err(|e| format!("{} window: {e}", spec.name))?;
        }
        self.ledger.check().map_err(|e| format!("ledger: {e}"))?;
        self.check_grants()?;
        self.open.check()?;
        self.closed
            .check(Closed::check)
            .map_err(|e| format!("closed reservation {e}"))?;
        self.requests
            .check(RequestRecord::check)
            .map_err(|e| format!("request {e}"))?;
        // Counted up by one per charge.
        if self.events > i64::MAX as u64 {
            return Err(format!("event number {} is out of range", self.events));
        }
        for event in &self.recent {
            event.check()?;
        }
        if let Some(top_up) = &self.top_up {
            top_up
                .check_state()
                .map_err(|e| format!("auto top-up: {e}"))?;
        }
        if let Some(notices) = &self.notices {
            notices
                .check_state()
                .map_err(|e| format!("notifications: {e}"))?;
        }
        Ok(())
    }

    /// Open reservations.
    pub fn open_holds(&self) -> usize {
        self.open.len()
    }

    /// Changes plan and credit eligibility; windows, holds and credits stay.
    pub fn update_account(&mut self, plan: Arc<str>, credit_purchase_allowed: bool) {
        self.account.plan = plan;
        self.account.credit_purchase_allowed = credit_purchase_allowed;
    }

    /// Applies what time has done up to `now`: returns expired holds, expires lots, lets old
    /// usage leave the windows and forgets idempotency records past their retention.
    pub fn settle(&mut self, policy: &Policy, now: Timestamp) {
        let mut expired: Vec<(Timestamp, Arc<str>)> = self
            .open
            .values()
            .filter(|r| r.expires_at <= now)
            .map(|r| (r.expires_at, r.id.clone()))
            .collect();
        // In the order they expired, not the map's (which differs from run to run): the same
        // operations make the same state, down to its persisted bytes.
        expired.sort_unstable();
        for (_, id) in expired {
            if let Some(r) = self.open.remove(&id) {
                self.closed.insert(
                    now,
                    id,
                    Closed::Expired {
                        released: r.held,
                        at: r.expires_at,
                    },
                );
            }
        }
        let retention = i64::from(policy.limits.idempotency_retention_seconds) * SECOND_MS;
        let cutoff = now.plus_millis(-retention);
        self.closed.forget_until(cutoff);
        self.requests.forget_until(cutoff);
        self.ledger.expire(now);
        self.five_hour.advance(now);
        self.weekly.advance(now);
        // A lot that expired may have taken the balance below the low-balance threshold.
        self.check_notices(policy, now);
    }

    /// The auto top-up purchase in flight, if any.
    pub fn top_up_in_flight(&self) -> Option<&Purchase> {
        self.top_up().in_flight()
    }

    /// Credits this account has spent or holds for open reservations: what a decision could
    /// have taken from its balance. A store deciding while its backing cannot be reached caps
    /// how far this may rise (the outage credit allowance); releases lower it.
    pub fn credit_exposure(&self) -> Micros {
        self.ledger
            .totals()
            .spent
            .saturating_add(self.held().credit)
    }

    fn plan<'p>(&self, policy: &'p Policy) -> Result<&'p Plan, DomainError> {
        policy.plan(&self.account.plan).ok_or_else(|| {
            DomainError::plan_not_configured(
                &self.account.id,
                &self.account.plan,
                &policy.plan_names(),
            )
        })
    }

    fn held(&self) -> Funding {
        self.open
            .values()
            .fold(Funding::ZERO, |sum, r| sum.plus(r.held))
    }

    fn windows(&self, plan: &Plan) -> [(&SlidingWindow, Micros); 2] {
        [
            (&self.five_hour, plan.limit_5h_micros),
            (&self.weekly, plan.limit_weekly_micros),
        ]
    }

    pub fn status(&self, policy: &Policy) -> Result<AccountStatus, DomainError> {
        let plan = self.plan(policy)?;
        let held = self.held().plan;
        let windows = self
            .windows(plan)
            .iter()
            .map(|(w, limit)| WindowStatus {
                name: w.spec().name,
                used: w.committed() + held,
                held,
                limit: *limit,
                resets_at: w.resets_at(),
            })
            .collect();
        Ok(AccountStatus {
            plan: self.account.plan.clone(),
            windows,
            credit_balance: self.ledger.balance(),
        })
    }

    pub fn snapshot(
        &self,
        policy: &Policy,
        recent_limit: usize,
    ) -> Result<UsageSnapshot, DomainError> {
        let mut holds: Vec<HoldView> = self
            .open
            .values()
            .map(|r| HoldView {
                reservation_id: r.id.to_string(),
                product: r.product.clone(),
                held: r.held,
                charged: r.charged,
                expires_at: r.expires_at,
            })
            .collect();
        holds.sort_by(|a, b| {
            (a.expires_at, &a.reservation_id).cmp(&(b.expires_at, &b.reservation_id))
        });
        Ok(UsageSnapshot {
            account: self.account.clone(),
            status: self.status(policy)?,
            lots: self.ledger.lots().to_vec(),
            recent: self
                .recent
                .iter()
                .rev()
                .take(recent_limit)
                .cloned()
                .collect(),
            totals: self.ledger.totals(),
            credit_held: self.held().credit,
            holds,
            top_up: self.top_up_view(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::domain::decision::{Decision, ReleaseCommand, RevokeCommand, SetTopUpCommand};
    use crate::domain::ledger::LotSource;
    use crate::domain::money::MICROS_PER_CREDIT as C;
    use crate::domain::time::MINUTE_MS;
    use proptest::prelude::*;

    #[derive(Debug, Clone, Copy, PartialEq)]
    struct Observed {
        used: [Micros; 2],
        limit: [Micros; 2],
        available: Micros,
        debt: Micros,
    }

    fn observe(s: &AccountState, policy: &Policy) -> Observed {
        let status = s.status(policy).unwrap();
        let balance = s.ledger.balance();
        Observed {
            used: [status.windows[0].used, status.windows[1].used],
            limit: [status.windows[0].limit, status.windows[1].limit],
            available: s.credits_available(),
            debt: (-balance).max(0),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// A preview of auto top-up settings buys what saving them then buys, whatever the
        /// balance and whatever was saved before (a purchase may be in flight), and leaves the
        /// account exactly as it was.
        #[test]
        fn a_top_up_preview_answers_as_saving_does(
            granted in 0i64..60,
            before in prop::option::of((0i64..40, 1i64..40)),
            threshold in 0i64..40,
            above in 1i64..40,
            enabled in any::<bool>(),
            cap in prop::option::of(0i64..60),
        ) {
            let policy = tight_policy();
            let now = Timestamp::from_millis(T0);
            let mut s = AccountState::new(Account { id: "a".into(), plan: "plus".into(), credit_purchase_allowed: true });
            if granted > 0 {
                s.grant(&policy, &grant_cmd(0, granted, 30, LotSource::Purchase, now), now).unwrap();
            }
            let settings = |enabled: bool, threshold: i64, above: i64, cap: Option<i64>| {
                let cap = cap.map(|c| c * C);
                crate::domain::top_up::TopUpSettings::new(enabled, threshold * C, (threshold + above) * C, cap).unwrap()
            };
            if let Some((t, a)) = before {
                let cmd = SetTopUpCommand { account_id: "a".into(), settings: settings(true, t, a, None) };
                s.set_top_up(&policy, &cmd, now).unwrap();
            }
            let cmd = SetTopUpCommand { account_id: "a".into(), settings: settings(enabled, threshold, above, cap) };
            s.settle(&policy, now);
            let untouched = s.clone();
            let preview = s.preview_top_up(&policy, &cmd, now).unwrap();
            prop_assert_eq!(&s, &untouched);
            let saved = s.set_top_up(&policy, &cmd, now).unwrap();
            prop_assert_eq!(preview.purchase, saved.top_up.map(|p| p.amount));
            prop_assert_eq!(preview.view, saved.view);
        }

        /// Credits are conserved; nothing but a commit spends beyond the credits there are; a
        /// Reserve never takes a window over its limit or credits below zero; a Commit takes a
        /// window over its limit by at most the usage beyond its hold.
        #[test]
        fn random_operations_keep_the_invariants(ops in prop::collection::vec(op(), 1..120)) {
            let policy = tight_policy();
            let mut s = AccountState::new(Account { id: "a".into(), plan: "plus".into(), credit_purchase_allowed: true });
            let mut now = Timestamp::from_millis(T0);
            let mut reservations: Vec<String> = Vec::new();
            let mut grants: Vec<String> = Vec::new();
            // Notifications: whether the balance was seen at or above the low-balance threshold
            // since the last credits.low, and when each window was last reported used up.
            let low = policy.notifications.low_balance_micros;
            let mut armed = false;
            let mut exhausted: [Option<Timestamp>; 2] = [None, None];
            for (i, op) in ops.into_iter().enumerate() {
                let recorded = s.notices_recorded();
                s.settle(&policy, now);
                armed |= s.ledger.balance() >= low;
                let before = observe(&s, &policy);
                let exposure_before = s.credit_exposure();
                let mut beyond_hold = 0;
                match op {
                    Op::Reserve { product, credits, ttl_min } => {
                        let cmd = reserve_cmd(i, product, credits, ttl_min);
                        if let Decision::Allow { reservation_id, .. } = s.reserve(&policy, &cmd, now).unwrap().decision {
                            reservations.push(reservation_id.to_string());
                        }
                    }
                    Op::Commit { pick, credits, is_final } if !reservations.is_empty() => {
                        let id = reservations[pick % reservations.len()].clone();
                        if let Some(r) = s.open.get(&id) {
                            beyond_hold = (credits * C - r.charged.total() - r.held.total()).max(0);
                        }
                        let cmd = commit_cmd(id, credits, is_final);
                        let _ = s.commit(&policy, &cmd, now);
                    }
                    Op::Release { pick } if !reservations.is_empty() => {
                        let id = reservations[pick % reservations.len()].clone();
                        let _ = s.release(&policy, &ReleaseCommand { account_id: "a".into(), reservation_id: id }, now);
                    }
                    Op::Grant { credits, days } => {
                        let cmd = grant_cmd(i, credits, days, if i % 3 == 0 { LotSource::Promo } else { LotSource::Purchase }, now);
                        s.grant(&policy, &cmd, now).unwrap();
                        grants.push(cmd.grant_id);
                    }
                    Op::Advance { minutes } => now = now.plus_millis(minutes * MINUTE_MS),
                    Op::SetPlan { plus, allowed } => {
                        s.update_account(if plus { "plus" } else { "free" }.into(), allowed);
                    }
                    Op::Revoke { pick } if !grants.is_empty() => {
                        let grant_id = grants[pick % grants.len()].clone();
                        s.revoke(&policy, &RevokeCommand { account_id: "a".into(), grant_id }, now).unwrap();
                    }
                    _ => {}
                }
                let is_commit = matches!(op, Op::Commit { .. });
                let is_reserve = matches!(op, Op::Reserve { .. });
                let plan_changed = matches!(op, Op::SetPlan { .. });
                s.settle(&policy, now);
                let after = observe(&s, &policy);

                // Each notice once per occurrence: credits.low only on a crossing below the
                // threshold, a used-up window at most once per window length.
                let new = (s.notices_recorded() - recorded) as usize;
                let pending: Vec<_> = s.pending_notices().cloned().collect();
                for notice in &pending[pending.len().saturating_sub(new)..] {
                    match &notice.kind {
                        crate::domain::notice::NoticeKind::CreditsLow { balance, .. } => {
                            prop_assert!(armed, "credits.low twice without the balance back at {low}");
                            prop_assert!(*balance < low);
                            armed = false;
                        }
                        crate::domain::notice::NoticeKind::WindowExhausted { window, used, limit, .. } => {
                            prop_assert!(used >= limit);
                            let (w, length) = if window == "5h" { (0, FIVE_HOUR.length_ms) } else { (1, WEEKLY.length_ms) };
                            if let Some(last) = exhausted[w] {
                                prop_assert!(now.as_millis() - last.as_millis() >= length, "{window} reported twice in one window");
                            }
                            exhausted[w] = Some(now);
                        }
                        other => prop_assert!(false, "no auto top-up here: {other:?}"),
                    }
                }
                armed |= s.ledger.balance() >= low;

                let t = s.ledger.totals();
                prop_assert_eq!(t.granted, t.balance + t.spent + t.expired + t.revoked, "conservation");
                // What a state read back from storage is checked for holds of every state made.
                prop_assert_eq!(s.check(), Ok(()));
                if !is_commit {
                    prop_assert!(after.debt <= before.debt, "only a commit may spend credits that are not there");
                }
                if is_commit || is_reserve || matches!(op, Op::Release { .. }) {
                    // What a decision takes from the credits shows in the exposure an outage
                    // allowance caps.
                    let taken = before.available - after.available;
                    prop_assert!(taken <= (s.credit_exposure() - exposure_before).max(0), "exposure rose less than the credits taken");
                }
                if is_reserve {
                    prop_assert!(after.available >= before.available.min(0), "a hold never overdraws credits");
                }
                if !plan_changed {
                    for w in 0..2 {
                        let allowed_used = before.used[w].max(after.limit[w]) + if is_commit { beyond_hold } else { 0 };
                        prop_assert!(after.used[w] <= allowed_used,
                            "window {w}: {} > {allowed_used} after {op:?}", after.used[w]);
                    }
                }
            }
        }
    }
}
