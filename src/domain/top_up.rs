//! Auto top-up: when an account's available credits fall below its threshold, buy just enough to
//! return to its target, with its default payment method. This module owns the rules: when a
//! purchase starts, how much it is for, what settling it does. Paying is someone else's job (a
//! payment provider, called in the background): the rules only hand out a [`Purchase`] and later
//! take its result.
//!
//! - **Single flight.** At most one purchase is in flight per account; while one is, no other
//!   starts, so concurrent threshold crossings coalesce. The purchase's id is its payment
//!   idempotency key, made from the account and a per-account sequence number, so a retried or
//!   resumed payment can never be paid twice.
//! - **Amount.** `target − available`, rounded up to the purchase unit, within what is left of the
//!   monthly cap (rounded down to the unit). A purchase the cap cut short, or prevented, is
//!   recorded as `Capped`: reported, never silently skipped.
//! - **Triggers.** Any time available credits are below the threshold and nothing is in flight
//!   (after a commit, a credit hold, a lot expiring, a revoked grant), and at once when auto
//!   top-up is turned on (or its threshold raised) below the threshold. Saving the same settings
//!   again starts nothing.
//! - **Declines.** A decline creates nothing and backs off (default one hour, unless a later
//!   payment succeeds); after three consecutive declines auto top-up turns itself off, and says so.
//!   A payment that could not be completed (timeout, server error) stays in flight, to be retried
//!   with the same key; only the provider's answer settles it.

use serde::{Deserialize, Serialize};

use super::account::MAX_EXACT_MICROS;
use super::error::DomainError;
use super::money::{CreditPrice, Micros, check_amount};
use super::time::{HOUR_MS, Timestamp};

/// What the account asked for. Made by [`TopUpSettings::new`], which checks the request's
/// shape, so the rules and every store can rely on it (a target above a threshold that is not
/// negative, a cap that is not negative) and none checks it again; the one exception is
/// [`TopUpSettings::UNSET`], off with nothing set, which an account has until it first
/// configures auto top-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopUpSettings {
    enabled: bool,
    /// Buy when available credits fall below this.
    threshold: Micros,
    /// Buy back up to this.
    target: Micros,
    /// Most bought in one calendar month (UTC); `None`: no cap.
    monthly_cap: Option<Micros>,
}

impl TopUpSettings {
    /// An account that never configured auto top-up: off, nothing set.
    pub const UNSET: TopUpSettings = TopUpSettings {
        enabled: false,
        threshold: 0,
        target: 0,
        monthly_cap: None,
    };

    /// Settings as a SetAutoTopUp asks for them, checked; the error names the request field.
    pub fn new(
        enabled: bool,
        threshold: Micros,
        target: Micros,
        monthly_cap: Option<Micros>,
    ) -> Result<Self, DomainError> {
        // Every amount an account holds stays exact; a larger target would start a purchase no
        // grant could make (and, near `i64::MAX`, overflow working out its amount).
        for (field, micros) in [
            ("threshold_micros", threshold),
            ("target_micros", target),
            ("monthly_cap_micros", monthly_cap.unwrap_or(0)),
        ] {
            if micros > MAX_EXACT_MICROS {
                return Err(DomainError::invalid(
                    field,
                    format!("must be at most {MAX_EXACT_MICROS}, got {micros}"),
                ));
            }
        }
        if threshold < 0 {
            return Err(DomainError::invalid(
                "threshold_micros",
                "must not be negative",
            ));
        }
        if target <= threshold {
            return Err(DomainError::invalid(
                "target_micros",
                format!("must exceed threshold_micros ({threshold}), got {target}"),
            ));
        }
        if monthly_cap.is_some_and(|cap| cap < 0) {
            return Err(DomainError::invalid(
                "monthly_cap_micros",
                "must not be negative (0 means no cap)",
            ));
        }
        Ok(TopUpSettings {
            enabled,
            threshold,
            target,
            monthly_cap,
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn threshold(&self) -> Micros {
        self.threshold
    }

    pub fn target(&self) -> Micros {
        self.target
    }

    pub fn monthly_cap(&self) -> Option<Micros> {
        self.monthly_cap
    }
}

/// Rules common to every account (from configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopUpRules {
    /// Purchases are whole multiples of this.
    pub purchase_unit_micros: Micros,
    /// How long after a decline no purchase starts (unless one succeeds meanwhile).
    pub decline_backoff_ms: i64,
    /// Consecutive declines after which auto top-up turns itself off.
    pub max_declines: u32,
    /// What credits cost people: shown in previews, sent with each charge.
    #[serde(default)]
    pub price: CreditPrice,
}

impl Default for TopUpRules {
    fn default() -> Self {
        TopUpRules {
            purchase_unit_micros: 1_000_000,
            decline_backoff_ms: HOUR_MS,
            max_declines: 3,
            price: CreditPrice::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AttemptOutcome {
    Pending,
    Succeeded,
    Declined,
    Failed,
    Capped,
}

/// The last thing that happened to a purchase, as GetUsage reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopUpAttempt {
    pub at: Timestamp,
    pub amount: Micros,
    pub outcome: AttemptOutcome,
    pub error: String,
    pub payment_id: String,
}

/// A purchase to pay: its id is the payment's idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purchase {
    pub id: String,
    pub amount: Micros,
    pub started_at: Timestamp,
}

/// What the payment provider answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentResult {
    Approved {
        payment_id: String,
    },
    Declined {
        error: String,
    },
    /// No answer that settles it (timeout, server error): the purchase stays in flight.
    Failed {
        error: String,
    },
}

/// One account's auto top-up: settings, the purchase in flight, and what happened last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopUp {
    settings: TopUpSettings,
    in_flight: Option<Purchase>,
    last_attempt: Option<TopUpAttempt>,
    consecutive_declines: u32,
    /// No purchase starts before this instant (after a decline).
    quiet_until: Option<Timestamp>,
    /// The calendar month `bought` counts, as [`Timestamp::month_index`].
    month: i64,
    bought: Micros,
    /// Purchases started so far; numbers the next one's id.
    started: u64,
}

impl Default for TopUp {
    /// Never configured.
    fn default() -> Self {
        TopUp {
            settings: TopUpSettings::UNSET,
            in_flight: None,
            last_attempt: None,
            consecutive_declines: 0,
            quiet_until: None,
            month: 0,
            bought: 0,
            started: 0,
        }
    }
}

impl TopUp {
    pub fn settings(&self) -> TopUpSettings {
        self.settings
    }

    pub fn in_flight(&self) -> Option<&Purchase> {
        self.in_flight.as_ref()
    }

    pub fn last_attempt(&self) -> Option<&TopUpAttempt> {
        self.last_attempt.as_ref()
    }

    pub fn consecutive_declines(&self) -> u32 {
        self.consecutive_declines
    }

    /// Changes the settings, then starts a purchase if turning auto top-up on, or raising the
    /// threshold, found the account below it.
    pub fn configure(
        &mut self,
        settings: TopUpSettings,
        available: Micros,
        account_id: &str,
        rules: TopUpRules,
        now: Timestamp,
    ) -> Option<Purchase> {
        let before = self.settings;
        self.settings = settings;
        if settings.enabled && !before.enabled {
            // Turned on again: earlier declines no longer hold it back.
            self.consecutive_declines = 0;
            self.quiet_until = None;
        }
        let armed = settings.enabled && (!before.enabled || settings.threshold > before.threshold);
        if armed {
            self.check(available, account_id, rules, now)
        } else {
            None
        }
    }

    /// The trigger: starts a purchase when available credits are below the threshold and
    /// nothing stops it (disabled, one in flight, backing off after a decline, capped).
    pub fn check(
        &mut self,
        available: Micros,
        account_id: &str,
        rules: TopUpRules,
        now: Timestamp,
    ) -> Option<Purchase> {
        let s = self.settings;
        if !s.enabled || self.in_flight.is_some() || available >= s.threshold {
            return None;
        }
        if self.quiet_until.is_some_and(|until| now < until) {
            return None;
        }
        self.roll_month(now);
        let unit = rules.purchase_unit_micros.max(1);
        let wanted = (s.target - available).div_euclid(unit) * unit
            + if (s.target - available).rem_euclid(unit) == 0 {
                0
            } else {
                unit
            };
        let allowed = match s.monthly_cap {
            Some(cap) => ((cap - self.bought).max(0) / unit * unit).min(wanted),
            None => wanted,
        };
        if allowed < wanted {
            self.last_attempt = Some(TopUpAttempt {
                at: now,
                amount: allowed,
                outcome: AttemptOutcome::Capped,
                error: format!(
                    "the monthly cap allows {allowed} of the {wanted} micro-credits needed to reach the target"
                ),
                payment_id: String::new(),
            });
            if allowed == 0 {
                return None;
            }
        }
        self.started += 1;
        let purchase = Purchase {
            id: format!("topup:{account_id}:{}", self.started),
            amount: allowed,
            started_at: now,
        };
        if allowed == wanted {
            self.last_attempt = Some(TopUpAttempt {
                at: now,
                amount: allowed,
                outcome: AttemptOutcome::Pending,
                error: String::new(),
                payment_id: String::new(),
            });
        }
        self.in_flight = Some(purchase.clone());
        Some(purchase)
    }

    /// Settles the purchase `purchase_id` with the provider's answer. Returns the purchase when
    /// it was approved (its credits are to be granted, as a lot with the purchase's id); an
    /// answer for a purchase that is not in flight (a duplicate) changes nothing.
    pub fn settle(
        &mut self,
        purchase_id: &str,
        result: &PaymentResult,
        rules: TopUpRules,
        now: Timestamp,
    ) -> Option<Purchase> {
        let purchase = self
            .in_flight
            .as_ref()
            .filter(|p| p.id == purchase_id)?
            .clone();
        let attempt = |outcome, error: &str, payment_id: &str| TopUpAttempt {
            at: now,
            amount: purchase.amount,
            outcome,
            error: error.to_owned(),
            payment_id: payment_id.to_owned(),
        };
        match result {
            PaymentResult::Approved { payment_id } => {
                self.in_flight = None;
                self.roll_month(now);
                self.bought += purchase.amount;
                self.consecutive_declines = 0;
                self.quiet_until = None;
                self.last_attempt = Some(attempt(AttemptOutcome::Succeeded, "", payment_id));
                Some(purchase)
            }
            PaymentResult::Declined { error } => {
                self.in_flight = None;
                self.consecutive_declines += 1;
                self.quiet_until = Some(now.plus_millis(rules.decline_backoff_ms));
                let mut error = error.clone();
                if self.consecutive_declines >= rules.max_declines {
                    self.settings.enabled = false;
                    error = format!(
                        "{error}; auto top-up turned off after {} declines in a row",
                        self.consecutive_declines
                    );
                }
                self.last_attempt = Some(attempt(AttemptOutcome::Declined, &error, ""));
                None
            }
            PaymentResult::Failed { error } => {
                self.last_attempt = Some(attempt(AttemptOutcome::Failed, error, ""));
                None
            }
        }
    }

    /// What the rules keep true, read back from storage: settings of the shape
    /// [`TopUpSettings::new`] allows (or never set), purchases for something, and counters that
    /// can still count.
    /// (Not [`check`](Self::check), the trigger.)
    pub(crate) fn check_state(&self) -> Result<(), String> {
        let s = self.settings;
        if s != TopUpSettings::UNSET
            && let Err(e) = TopUpSettings::new(s.enabled, s.threshold, s.target, s.monthly_cap)
        {
            return Err(format!("settings: {e}"));
        }
        if let Some(p) = &self.in_flight {
            check_amount("the purchase in flight", p.amount)?;
            if p.amount == 0 || p.id.is_empty() {
                return Err("the purchase in flight buys nothing".into());
            }
        }
        if let Some(a) = &self.last_attempt {
            check_amount("the last attempt", a.amount)?;
        }
        check_amount("bought this month", self.bought)?;
        // Both are counted up by one: a value at the top of its range cannot have been reached.
        if self.consecutive_declines == u32::MAX || self.started > i64::MAX as u64 {
            return Err("a purchase counter is out of range".into());
        }
        Ok(())
    }

    /// Whether denials for lack of credits should ask for a new payment method.
    pub fn payment_method_failing(&self) -> bool {
        self.consecutive_declines > 0
    }

    fn roll_month(&mut self, now: Timestamp) {
        let month = now.month_index();
        if month != self.month {
            self.month = month;
            self.bought = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::money::MICROS_PER_CREDIT as C;
    use proptest::prelude::*;

    const T0: Timestamp = Timestamp::from_millis(1_795_557_600_000);

    fn settings(threshold: i64, target: i64, cap: Option<i64>) -> TopUpSettings {
        TopUpSettings::new(true, threshold * C, target * C, cap.map(|c| c * C)).unwrap()
    }

    fn rules() -> TopUpRules {
        TopUpRules::default()
    }

    #[test]
    fn turning_it_on_below_the_threshold_buys_once_at_once() {
        let mut t = TopUp::default();
        let p = t
            .configure(settings(10, 50, None), 4 * C, "a", rules(), T0)
            .expect("a purchase");
        assert_eq!((p.id.as_str(), p.amount), ("topup:a:1", 46 * C));
        assert_eq!(t.last_attempt().unwrap().outcome, AttemptOutcome::Pending);
        // Saving the same settings again, or crossing again while it is in flight, buys nothing.
        assert_eq!(
            t.configure(settings(10, 50, None), 4 * C, "a", rules(), T0),
            None
        );
        assert_eq!(t.check(C, "a", rules(), T0), None);
        assert_eq!(
            t.settle(
                "topup:a:1",
                &PaymentResult::Approved {
                    payment_id: "pay_1".into()
                },
                rules(),
                T0
            ),
            Some(p)
        );
        // After it settles the balance is at the target, above the threshold: nothing fires.
        assert_eq!(t.check(50 * C, "a", rules(), T0), None);
        assert_eq!(t.last_attempt().unwrap().outcome, AttemptOutcome::Succeeded);
    }

    #[test]
    fn turning_it_on_above_the_threshold_waits_for_the_crossing() {
        let mut t = TopUp::default();
        assert_eq!(
            t.configure(settings(10, 50, None), 10 * C, "a", rules(), T0),
            None
        );
        assert_eq!(
            t.check(10 * C, "a", rules(), T0),
            None,
            "at the threshold is not below it"
        );
        let p = t.check(10 * C - 1, "a", rules(), T0).unwrap();
        assert_eq!(p.amount, 41 * C, "rounded up to the purchase unit");
    }

    #[test]
    fn raising_the_threshold_above_the_balance_buys() {
        let mut t = TopUp::default();
        t.configure(settings(10, 50, None), 20 * C, "a", rules(), T0);
        assert!(
            t.configure(settings(30, 50, None), 20 * C, "a", rules(), T0)
                .is_some()
        );
    }

    #[test]
    fn the_monthly_cap_limits_and_is_reported() {
        let mut t = TopUp::default();
        let p = t
            .configure(settings(10, 50, Some(30)), 0, "a", rules(), T0)
            .unwrap();
        assert_eq!(p.amount, 30 * C);
        assert_eq!(t.last_attempt().unwrap().outcome, AttemptOutcome::Capped);
        t.settle(
            &p.id,
            &PaymentResult::Approved {
                payment_id: "x".into(),
            },
            rules(),
            T0,
        );
        assert_eq!(
            t.check(5 * C, "a", rules(), T0),
            None,
            "the cap is used up this month"
        );
        assert_eq!(t.last_attempt().unwrap().outcome, AttemptOutcome::Capped);
        let next_month = T0.plus_months(1);
        assert_eq!(
            t.check(5 * C, "a", rules(), next_month).unwrap().amount,
            30 * C
        );
    }

    #[test]
    fn declines_back_off_and_three_in_a_row_turn_it_off() {
        let mut t = TopUp::default();
        let mut now = T0;
        let declined = PaymentResult::Declined {
            error: "card declined".into(),
        };
        for n in 1..=3 {
            let p = t
                .check(0, "a", rules(), now)
                .or_else(|| t.configure(settings(10, 50, None), 0, "a", rules(), now));
            let p = p.expect("a purchase");
            assert_eq!(
                t.settle(&p.id, &declined, rules(), now),
                None,
                "a decline grants nothing"
            );
            assert_eq!(t.consecutive_declines(), n);
            assert!(t.payment_method_failing());
            assert_eq!(
                t.check(0, "a", rules(), now.plus_millis(HOUR_MS - 1)),
                None,
                "backing off"
            );
            now = now.plus_millis(HOUR_MS);
        }
        assert!(!t.settings().enabled, "off after three declines");
        assert!(
            t.last_attempt()
                .unwrap()
                .error
                .contains("turned off after 3 declines")
        );
        assert_eq!(t.check(0, "a", rules(), now), None);
    }

    #[test]
    fn a_failed_payment_stays_in_flight_and_duplicates_change_nothing() {
        let mut t = TopUp::default();
        let p = t
            .configure(settings(10, 50, None), 0, "a", rules(), T0)
            .unwrap();
        let failed = PaymentResult::Failed {
            error: "timeout".into(),
        };
        assert_eq!(t.settle(&p.id, &failed, rules(), T0), None);
        assert_eq!(t.in_flight(), Some(&p), "retried later with the same key");
        let ok = PaymentResult::Approved {
            payment_id: "pay".into(),
        };
        assert_eq!(t.settle(&p.id, &ok, rules(), T0), Some(p.clone()));
        assert_eq!(t.settle(&p.id, &ok, rules(), T0), None, "settled once");
        assert_eq!(t.settle("topup:a:99", &ok, rules(), T0), None);
    }

    #[test]
    fn bad_settings_name_the_field() {
        for (threshold, target, cap, field) in [
            (50, 50, None, "target_micros: must exceed"),
            (-1, 50, None, "threshold_micros: must not be negative"),
            (10, 50, Some(-1), "monthly_cap_micros: must not be negative"),
        ] {
            let err = TopUpSettings::new(true, threshold * C, target * C, cap.map(|c| c * C))
                .unwrap_err();
            assert!(err.to_string().starts_with(field), "{err}");
        }
        assert!(TopUpSettings::new(false, 0, 1, Some(0)).is_ok());
        let max = MAX_EXACT_MICROS;
        assert!(TopUpSettings::new(true, max - 1, max, Some(max)).is_ok());
        for (threshold, target, cap, field) in [
            (max + 1, max + 2, None, "threshold_micros: must be at most"),
            (0, max + 1, None, "target_micros: must be at most"),
            (0, 1, Some(max + 1), "monthly_cap_micros: must be at most"),
        ] {
            let err = TopUpSettings::new(true, threshold, target, cap).unwrap_err();
            assert!(err.to_string().starts_with(field), "{err}");
        }
    }

    proptest! {
        /// However balances move and payments answer: never two purchases in flight, never more
        /// bought in a month than the cap, and an uncapped purchase is just enough to return to
        /// the target.
        #[test]
        fn single_flight_and_the_cap_hold(
            steps in prop::collection::vec((0i64..80, 0u8..4, 0i64..3), 1..60),
            cap in prop::option::of(20i64..200),
        ) {
            let mut t = TopUp::default();
            let mut now = T0;
            let mut bought_by_month = std::collections::HashMap::<i64, i64>::new();
            t.configure(settings(20, 60, cap), 100 * C, "a", rules(), now);
            for (available, answer, days) in steps {
                now = now.plus_millis(days * 24 * HOUR_MS);
                let available = available * C;
                let before = t.in_flight().cloned();
                let started = t.check(available, "a", rules(), now);
                prop_assert!(before.is_none() || started.is_none(), "two purchases in flight");
                if let Some(p) = &started {
                    prop_assert!(p.amount > 0);
                    if t.last_attempt().map(|a| a.outcome) == Some(AttemptOutcome::Pending) {
                        // Just enough, to the unit: back to the target, less than a unit over it.
                        prop_assert!(available + p.amount >= 60 * C && available + p.amount < 61 * C);
                    }
                }
                let Some(p) = t.in_flight().cloned() else { continue };
                let result = match answer {
                    0 => PaymentResult::Approved { payment_id: "x".into() },
                    1 => PaymentResult::Declined { error: "no".into() },
                    _ => PaymentResult::Failed { error: "timeout".into() },
                };
                if let Some(granted) = t.settle(&p.id, &result, rules(), now) {
                    *bought_by_month.entry(now.month_index()).or_default() += granted.amount;
                }
                if let Some(cap) = cap {
                    prop_assert!(bought_by_month.values().all(|b| *b <= cap * C));
                }
            }
        }
    }
}
