//! The whole quota state of one account and the rules that change it.
//!
//! Every operation is a method on [`AccountState`] that takes the configured [`Policy`] and
//! "now", first [`settles`](AccountState::settle) what time has done (expired holds are
//! returned, expired lots move to `expired`, old usage leaves the windows), then decides and
//! applies. A store keeps one `AccountState` per account and runs each method as one atomic
//! step, which is all the concurrency control the rules need: accounts never share state.
//!
//! Reservations follow the two-phase pattern of a ledger transfer: a hold is *pending* until it
//! is committed (posted), released (voided) or passes its `expires_at` (timed out). Holds count
//! as used from the moment they are made, so two tasks cannot both spend the last of a window.
//! Open reservations are kept apart from finished ones, so the work of an operation grows with
//! the tasks in flight, not with the day's history; finished ones are kept only to answer
//! retries, and forgotten after the idempotency retention.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::decision::{
    Account, AccountStatus, Action, CommitCommand, CommitOutcome, CommitReceipt, Decision, Denial,
    DenialFacts, DenyReason, GrantCommand, GrantOutcome, HoldView, ReleaseCommand, ReleaseOutcome,
    ReserveCommand, ReserveOutcome, RevokeCommand, RevokeOutcome, SetTopUpCommand,
    SettleTopUpCommand, Shortfall, TopUpOutcome, TopUpView, UsageEvent, UsageSnapshot,
    WindowStatus,
};
use super::error::DomainError;
use super::ledger::{CreditLot, Ledger, LotSource};
use super::money::{Funding, Micros};
use super::policy::{Overage, Plan, Policy};
use super::pricing::Usage;
use super::time::{SECOND_MS, Timestamp};
use super::top_up::{Purchase, TopUp};
use super::window::{FIVE_HOUR, SlidingWindow, WEEKLY};

/// The largest amount any account total may reach: every integer up to 2^53 − 1 is exact in an
/// IEEE double, which is what the Redis store's Lua scripts compute with.
pub const MAX_EXACT_MICROS: Micros = (1 << 53) - 1;

/// Credit lots last this many months unless a grant says otherwise.
pub const LOT_VALIDITY_MONTHS: u32 = 12;

/// A task's open hold on the plan and on credits, and what it has been charged so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Shared with the first answer, the closed record and the usage events that name it: a
    /// finished task keeps one copy of its id, not three.
    id: Arc<str>,
    product: String,
    /// Price of the estimate: what each (re-)hold asks for.
    estimate: Micros,
    ttl_ms: i64,
    held: Funding,
    charged: Funding,
    /// Highest cumulative usage committed so far, to record what each commit added.
    usage: Usage,
    expires_at: Timestamp,
}

/// How a reservation ended; kept to answer retries.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Closed {
    /// Only a final commit closes a reservation, so its receipt is always
    /// [`CommitReceipt::finished`]: the two amounts are all there is to keep.
    Committed {
        fingerprint: u64,
        charged: Funding,
        charged_total: Funding,
    },
    Released {
        released: Funding,
    },
    Expired {
        released: Funding,
        at: Timestamp,
    },
}

/// The first answer to a Reserve, kept for retries with the same request id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RequestRecord {
    fingerprint: u64,
    decision: Decision,
    estimate: Micros,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct GrantRecord {
    fingerprint: u64,
    lot: CreditLot,
    /// What a revocation took back, once revoked.
    revoked: Option<Micros>,
}

/// Records kept for a while, forgotten in the order they were made. An id recorded again
/// (a request id reused after its first answer was forgotten) lives on from its new time.
///
/// Most accounts keep a handful of records, so they are a queue searched from the newest, sized
/// exactly (a hash map would cost a few hundred bytes per account even for one record); an
/// index by id is built once an account keeps many.
#[derive(Debug, Clone)]
struct Retained<T> {
    /// (when recorded, id, record), oldest first; an id recorded again appears again, and
    /// the newer entry is the one that counts.
    entries: VecDeque<(Timestamp, Arc<str>, T)>,
    /// Sequence number of `entries[0]`.
    first: u64,
    /// id -> sequence number of its newest entry, once there are more than [`INDEX_FROM`].
    /// Boxed on purpose: 8 bytes in every account instead of a map's 48, for an index that
    /// few accounts ever build.
    #[allow(clippy::box_collection)]
    index: Option<Box<HashMap<Arc<str>, u64>>>,
}

/// Records an account keeps before they are indexed by id.
const INDEX_FROM: usize = 16;

impl<T> Default for Retained<T> {
    fn default() -> Self {
        Retained {
            entries: VecDeque::new(),
            first: 0,
            index: None,
        }
    }
}

impl<T: PartialEq> PartialEq for Retained<T> {
    /// The same records in the same order; how they are indexed does not matter.
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl<T: Eq> Eq for Retained<T> {}

/// Pushes onto a queue that grows by half its length at a time (from one), not by doubling
/// from four: per-account queues are short and there are millions of them.
fn push_compact<T>(queue: &mut VecDeque<T>, item: T) {
    if queue.len() == queue.capacity() {
        queue.reserve_exact((queue.len() / 2).max(1));
    }
    queue.push_back(item);
}

impl<T> Retained<T> {
    fn get(&self, id: &str) -> Option<&T> {
        match &self.index {
            Some(index) => {
                let seq = *index.get(id)?;
                let position = usize::try_from(seq - self.first).ok()?;
                self.entries.get(position).map(|(_, _, record)| record)
            }
            None => self
                .entries
                .iter()
                .rev()
                .find(|(_, entry, _)| &**entry == id)
                .map(|(_, _, record)| record),
        }
    }

    fn insert(&mut self, now: Timestamp, id: Arc<str>, record: T) {
        let seq = self.first + self.entries.len() as u64;
        if let Some(index) = &mut self.index {
            index.insert(id.clone(), seq);
        }
        push_compact(&mut self.entries, (now, id, record));
        if self.index.is_none() && self.entries.len() > INDEX_FROM {
            let mut index = HashMap::with_capacity(self.entries.len());
            for (offset, (_, id, _)) in self.entries.iter().enumerate() {
                index.insert(id.clone(), self.first + offset as u64);
            }
            self.index = Some(Box::new(index));
        }
    }

    /// Forgets records made at or before `cutoff`.
    fn forget_until(&mut self, cutoff: Timestamp) {
        while self.entries.front().is_some_and(|(at, _, _)| *at <= cutoff) {
            if let Some((_, id, _)) = self.entries.pop_front()
                && let Some(index) = &mut self.index
                && index.get(&id) == Some(&self.first)
            {
                index.remove(&id);
            }
            self.first += 1;
        }
        if self.entries.is_empty() {
            // Give the memory back: most accounts are idle most of the time.
            *self = Retained {
                first: self.first,
                ..Retained::default()
            };
        }
    }
}

/// Open reservations by id (the key shares the reservation's id). Made on the first hold and
/// dropped with the last: most accounts have nothing open most of the time, and an empty map
/// would still cost 48 bytes in each of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(clippy::box_collection)]
struct OpenHolds(Option<Box<HashMap<Arc<str>, Reservation>>>);

impl OpenHolds {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    fn values(&self) -> impl Iterator<Item = &Reservation> {
        self.0.iter().flat_map(|m| m.values())
    }

    #[cfg(test)]
    fn get(&self, id: &str) -> Option<&Reservation> {
        self.0.as_ref()?.get(id)
    }

    fn insert(&mut self, r: Reservation) {
        self.0.get_or_insert_default().insert(r.id.clone(), r);
    }

    fn remove(&mut self, id: &str) -> Option<Reservation> {
        let map = self.0.as_mut()?;
        let r = map.remove(id);
        if map.is_empty() {
            self.0 = None;
        }
        r
    }
}

/// How usage beyond the plan's allowance is handled for one product on one account.
enum Route<'p> {
    Credits,
    /// No credits: the denial names this reason and action.
    Deny {
        credits_barred: bool,
        action: Action,
        upgrade_to: Option<&'p str>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountState {
    account: Account,
    five_hour: SlidingWindow,
    weekly: SlidingWindow,
    ledger: Ledger,
    open: OpenHolds,
    closed: Retained<Closed>,
    requests: Retained<RequestRecord>,
    /// Boxed and made on the first grant: most accounts never get one.
    #[allow(clippy::box_collection)]
    grants: Option<Box<HashMap<String, GrantRecord>>>,
    /// Newest last.
    recent: VecDeque<UsageEvent>,
    /// Charges recorded so far (the last event's `seq`).
    events: u64,
    /// None until auto top-up is first configured (most accounts never do).
    top_up: Option<Box<TopUp>>,
}

/// The auto top-up state of an account that never configured it.
static NO_TOP_UP: std::sync::LazyLock<TopUp> = std::sync::LazyLock::new(TopUp::default);

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
        }
    }

    pub fn account(&self) -> &Account {
        &self.account
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
        let expired: Vec<Arc<str>> = self
            .open
            .values()
            .filter(|r| r.expires_at <= now)
            .map(|r| r.id.clone())
            .collect();
        for id in expired {
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
    }

    /// The auto top-up purchase in flight, if any.
    pub fn top_up_in_flight(&self) -> Option<&Purchase> {
        self.top_up().in_flight()
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

    /// Plan allowance left in the tighter of the two windows, holds included.
    fn plan_room(&self, plan: &Plan) -> Micros {
        let held = self.held().plan;
        self.windows(plan)
            .iter()
            .map(|(w, limit)| (limit - w.committed() - held).max(0))
            .min()
            .unwrap_or(0)
    }

    /// Credits not already spoken for by open holds.
    fn credits_available(&self) -> Micros {
        self.ledger.balance() - self.held().credit
    }

    fn route<'p>(&self, policy: &'p Policy, plan: &'p Plan, product: &str) -> Route<'p> {
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
    fn fund(
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
        let (held, denial) = match self.fund(policy, plan, &cmd.product, cmd.cost, now) {
            Ok(held) => (Some(held), None),
            Err(denial) => (None, Some(denial)),
        };
        // Short of credits while a purchase is on its way: the caller may wait for it and ask
        // again, so this answer is not recorded as the request's first.
        if let Some(denial) = &denial
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
        let (held, denial, shadow_denial) = match (held, denial) {
            (None, Some(denial)) if policy.shadow(&self.account.plan) => (
                Some(Funding::new(cmd.cost, 0)),
                None,
                Some(Box::new(denial)),
            ),
            (held, denial) => (held, denial, None),
        };
        let decision = match (held, denial) {
            (Some(held), _) => {
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
            (None, denial) => Decision::Deny(Box::new(denial.expect("funded or denied"))),
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
            product: super::decision::intern(&r.product),
            usage: Usage {
                // Priced already, so one of the sheet's few models: one copy for all events.
                model: super::decision::intern(&cmd.usage.model),
                ..cmd.usage.since(&r.usage)
            },
            charged,
            reservation_id: r.id.clone(),
            price_version: super::decision::intern(&cmd.price_version),
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

    pub fn grant(
        &mut self,
        policy: &Policy,
        cmd: &GrantCommand,
        now: Timestamp,
    ) -> Result<GrantOutcome, DomainError> {
        self.settle(policy, now);
        let fingerprint = cmd.fingerprint();
        if let Some(first) = self.grants.as_ref().and_then(|g| g.get(&cmd.grant_id)) {
            if first.fingerprint != fingerprint {
                return Err(DomainError::grant_reused(&cmd.grant_id));
            }
            return Ok(GrantOutcome {
                lot: first.lot.clone(),
                credit_balance: self.ledger.balance(),
            });
        }
        if self
            .ledger
            .totals()
            .granted
            .checked_add(cmd.amount)
            .is_none_or(|total| total > MAX_EXACT_MICROS)
        {
            return Err(DomainError::lifetime_grants_too_large());
        }
        let expires_at = cmd
            .expires_at
            .unwrap_or_else(|| now.plus_months(LOT_VALIDITY_MONTHS));
        if expires_at <= now {
            return Err(DomainError::expiry_not_in_future(now, expires_at));
        }
        let lot = CreditLot {
            id: cmd.grant_id.clone(),
            source: cmd.source,
            granted: cmd.amount,
            remaining: cmd.amount,
            granted_at: now,
            expires_at,
        };
        let paid_off = self.ledger.grant(lot.clone());
        let lot = CreditLot {
            remaining: cmd.amount - paid_off,
            ..lot
        };
        self.grants.get_or_insert_with(Box::default).insert(
            cmd.grant_id.clone(),
            GrantRecord {
                fingerprint,
                lot: lot.clone(),
                revoked: None,
            },
        );
        Ok(GrantOutcome {
            lot,
            credit_balance: self.ledger.balance(),
        })
    }

    /// Takes back what is left of a grant's lot (a refund or a chargeback); acts once per grant.
    pub fn revoke(
        &mut self,
        policy: &Policy,
        cmd: &RevokeCommand,
        now: Timestamp,
    ) -> Result<RevokeOutcome, DomainError> {
        self.settle(policy, now);
        let record = self
            .grants
            .as_mut()
            .and_then(|g| g.get_mut(&cmd.grant_id))
            .ok_or_else(|| DomainError::grant_not_found(&cmd.grant_id))?;
        let revoked = match record.revoked {
            Some(revoked) => revoked,
            None => {
                let revoked = self.ledger.revoke(&cmd.grant_id);
                record.revoked = Some(revoked);
                revoked
            }
        };
        let top_up = self.check_top_up(policy, now);
        Ok(RevokeOutcome {
            revoked,
            credit_balance: self.ledger.balance(),
            top_up,
        })
    }

    /// Whether this account may have credits bought for it: a plan on the credits route and
    /// credit purchase allowed.
    fn top_up_eligible(&self, policy: &Policy) -> bool {
        self.account.credit_purchase_allowed
            && policy
                .plan(&self.account.plan)
                .is_some_and(|p| p.overage == Overage::Credits)
    }

    /// The auto top-up trigger, run at the end of every change.
    fn check_top_up(&mut self, policy: &Policy, now: Timestamp) -> Option<Purchase> {
        if !self.top_up_eligible(policy) {
            return None;
        }
        let available = self.credits_available();
        // Never configured: nothing to check.
        self.top_up
            .as_deref_mut()?
            .check(available, &self.account.id, policy.top_up, now)
    }

    fn top_up(&self) -> &TopUp {
        self.top_up.as_deref().unwrap_or(&NO_TOP_UP)
    }

    fn top_up_view(&self) -> TopUpView {
        TopUpView {
            settings: self.top_up().settings(),
            last_attempt: self.top_up().last_attempt().cloned(),
            consecutive_declines: self.top_up().consecutive_declines(),
            in_flight: self.top_up().in_flight().cloned(),
        }
    }

    /// SetAutoTopUp: free/go accounts and accounts barred from buying credits may only turn it off.
    pub fn set_top_up(
        &mut self,
        policy: &Policy,
        cmd: &SetTopUpCommand,
        now: Timestamp,
    ) -> Result<TopUpOutcome, DomainError> {
        cmd.settings.validate()?;
        self.settle(policy, now);
        if cmd.settings.enabled && !self.top_up_eligible(policy) {
            return Err(DomainError::top_up_not_allowed(
                &self.account.id,
                &self.account.plan,
            ));
        }
        let available = self.credits_available();
        let top_up = self.top_up.get_or_insert_with(Box::default).configure(
            cmd.settings,
            available,
            &self.account.id,
            policy.top_up,
            now,
        )?;
        Ok(TopUpOutcome {
            view: self.top_up_view(),
            top_up,
            credit_balance: self.ledger.balance(),
        })
    }

    /// Settles an auto top-up purchase with the payment's result: an approved one becomes a lot
    /// (source `auto_top_up`, id the purchase id, valid 12 months); a duplicate changes nothing.
    pub fn settle_top_up(
        &mut self,
        policy: &Policy,
        cmd: &SettleTopUpCommand,
        now: Timestamp,
    ) -> Result<TopUpOutcome, DomainError> {
        self.settle(policy, now);
        if let Some(paid) = self.top_up.get_or_insert_with(Box::default).settle(
            &cmd.purchase_id,
            &cmd.result,
            policy.top_up,
            now,
        ) {
            let lot = CreditLot {
                id: paid.id.clone(),
                source: LotSource::AutoTopUp,
                granted: paid.amount,
                remaining: paid.amount,
                granted_at: now,
                expires_at: now.plus_months(LOT_VALIDITY_MONTHS),
            };
            let paid_off = self.ledger.grant(lot.clone());
            let lot = CreditLot {
                remaining: paid.amount - paid_off,
                ..lot
            };
            self.grants.get_or_insert_with(Box::default).insert(
                paid.id,
                GrantRecord {
                    fingerprint: 0,
                    lot,
                    revoked: None,
                },
            );
        }
        let top_up = self.check_top_up(policy, now);
        Ok(TopUpOutcome {
            view: self.top_up_view(),
            top_up,
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
    use super::*;
    use crate::domain::decision::DenyReason;
    use crate::domain::decision::{
        CommitCommand, GrantCommand, ReleaseCommand, ReserveCommand, RevokeCommand,
    };
    use crate::domain::ledger::LotSource;
    use crate::domain::money::MICROS_PER_CREDIT as C;
    use crate::domain::time::{DAY_MS, HOUR_MS, MINUTE_MS};
    use proptest::prelude::*;

    const T0: i64 = 1_795_557_600_000;

    /// Small limits so that random sequences hit every boundary.
    fn tight_policy() -> Policy {
        let mut p = Policy::default();
        for (name, h5, week) in [("free", 10, 25), ("plus", 20, 50)] {
            let plan = p.plans.get_mut(name).unwrap();
            plan.limit_5h_micros = h5 * C;
            plan.limit_weekly_micros = week * C;
        }
        p
    }

    fn usage(credits: i64) -> Usage {
        // 200 credits per million output tokens on the mini model: 5,000 tokens a credit.
        Usage {
            model: "gpt-5.5-mini".into(),
            output_tokens: credits as u64 * 5_000,
            ..Usage::default()
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
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

    fn op() -> impl Strategy<Value = Op> {
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

        /// Credits are conserved; nothing but a commit spends beyond the credits there are; a
        /// Reserve never takes a window over its limit or credits below zero; a Commit takes a
        /// window over its limit by at most the usage beyond its hold.
        #[test]
        fn random_operations_keep_the_invariants(ops in prop::collection::vec(op(), 1..120)) {
            let policy = tight_policy();
            let products = ["codex", "excel", "workspace_agents"];
            let mut s = AccountState::new(Account { id: "a".into(), plan: "plus".into(), credit_purchase_allowed: true });
            let mut now = Timestamp::from_millis(T0);
            let mut reservations: Vec<String> = Vec::new();
            let mut grants: Vec<String> = Vec::new();
            for (i, op) in ops.into_iter().enumerate() {
                s.settle(&policy, now);
                let before = observe(&s, &policy);
                let mut beyond_hold = 0;
                match op {
                    Op::Reserve { product, credits, ttl_min } => {
                        let cmd = ReserveCommand {
                            account_id: "a".into(),
                            request_id: format!("q{i}"),
                            product: products[product].into(),
                            estimate: usage(credits),
                            cost: credits * C,
                            plan_hint: None,
                            ttl_ms: ttl_min * MINUTE_MS,
                            reservation_id: format!("r{i}"),
                            wait_for_top_up: false,
                        };
                        if let Decision::Allow { reservation_id, .. } = s.reserve(&policy, &cmd, now).unwrap().decision {
                            reservations.push(reservation_id.to_string());
                        }
                    }
                    Op::Commit { pick, credits, is_final } if !reservations.is_empty() => {
                        let id = reservations[pick % reservations.len()].clone();
                        if let Some(r) = s.open.get(&id) {
                            beyond_hold = (credits * C - r.charged.total() - r.held.total()).max(0);
                        }
                        let cmd = CommitCommand {
                            account_id: "a".into(),
                            reservation_id: id,
                            usage: usage(credits),
                            cost: credits * C,
                            is_final,
                            price_version: "v".into(),
                        };
                        let _ = s.commit(&policy, &cmd, now);
                    }
                    Op::Release { pick } if !reservations.is_empty() => {
                        let id = reservations[pick % reservations.len()].clone();
                        let _ = s.release(&policy, &ReleaseCommand { account_id: "a".into(), reservation_id: id }, now);
                    }
                    Op::Grant { credits, days } => {
                        let cmd = GrantCommand {
                            account_id: "a".into(),
                            grant_id: format!("g{i}"),
                            amount: credits * C,
                            source: if i % 3 == 0 { LotSource::Promo } else { LotSource::Purchase },
                            expires_at: Some(now.plus_millis(days * DAY_MS)),
                        };
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

                let t = s.ledger.totals();
                prop_assert_eq!(t.granted, t.balance + t.spent + t.expired + t.revoked, "conservation");
                if !is_commit {
                    prop_assert!(after.debt <= before.debt, "only a commit may spend credits that are not there");
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

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Shadow mode answers every Reserve ALLOW; one it lets through holds the estimate on
        /// the plan and no credits, and reports why the rules would have denied it; a task's
        /// next chunk is always funded. Credits stay conserved.
        #[test]
        fn shadow_mode_lets_work_through_without_spending_credits(ops in prop::collection::vec(op(), 1..120)) {
            let mut policy = tight_policy();
            policy.shadow = true;
            let products = ["codex", "excel", "workspace_agents"];
            let mut s = AccountState::new(Account { id: "a".into(), plan: "plus".into(), credit_purchase_allowed: true });
            let mut now = Timestamp::from_millis(T0);
            let mut reservations: Vec<String> = Vec::new();
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Reserve { product, credits, ttl_min } => {
                        let cmd = ReserveCommand {
                            account_id: "a".into(),
                            request_id: format!("q{i}"),
                            product: products[product].into(),
                            estimate: usage(credits),
                            cost: credits * C,
                            plan_hint: None,
                            ttl_ms: ttl_min * MINUTE_MS,
                            reservation_id: format!("r{i}"),
                            wait_for_top_up: false,
                        };
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
                        let cmd = CommitCommand {
                            account_id: "a".into(),
                            reservation_id: id,
                            usage: usage(credits),
                            cost: credits * C,
                            is_final,
                            price_version: "v".into(),
                        };
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
                        let cmd = GrantCommand {
                            account_id: "a".into(),
                            grant_id: format!("g{i}"),
                            amount: credits * C,
                            source: LotSource::Purchase,
                            expires_at: Some(now.plus_millis(days * DAY_MS)),
                        };
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
            }
        }
    }

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

#[cfg(test)]
mod retained_tests {
    use super::*;

    #[test]
    fn records_are_found_forgotten_in_order_and_indexed_when_many() {
        let t = Timestamp::from_millis;
        for n in [3_i64, 40] {
            let mut r: Retained<i64> = Retained::default();
            for i in 0..n {
                r.insert(t(i), format!("id{i}").into(), i);
            }
            // Recorded again later: the newer record counts.
            r.insert(t(n), "id0".into(), 100);
            assert_eq!(r.index.is_some(), n > INDEX_FROM as i64);
            assert_eq!(r.get("id0"), Some(&100));
            assert_eq!(r.get(&format!("id{}", n - 1)), Some(&(n - 1)));
            assert_eq!(r.get("nope"), None);
            r.forget_until(t(1));
            assert_eq!(r.get("id1"), None);
            assert_eq!(r.get("id0"), Some(&100), "its newer record stays");
            assert_eq!(r.get("id2"), Some(&2));
            r.forget_until(t(n));
            assert_eq!(r.get("id0"), None);
            assert!(
                r.entries.is_empty() && r.entries.capacity() == 0,
                "memory given back"
            );
            r.insert(t(n + 1), "again".into(), 7);
            assert_eq!(r.get("again"), Some(&7));
        }
    }
}
