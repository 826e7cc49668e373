//! Notifications: what an account's owner is told about, and when. This module owns the rules
//! (which change is worth a notification, and how to fire once per occurrence) and the small
//! outbox an account keeps of notifications recorded and not yet delivered. Delivering them is
//! someone else's job (the webhook worker, [`crate::notify`]): the rules only record a
//! [`Notice`] with the decision that caused it and later forget it once it was delivered.
//!
//! - **Kinds.** `credits.low`: the credit balance fell below the configured threshold while
//!   auto top-up is off; `top_up.succeeded` / `top_up.declined`: an auto top-up purchase was
//!   settled; `top_up.disabled`: declines in a row turned auto top-up off; `window.exhausted`:
//!   committed usage in a plan window reached its limit.
//! - **Once per occurrence.** `credits.low` fires when the balance *crosses* below the
//!   threshold (it is armed again only once the balance is back at or above it), not on every
//!   call while below; `window.exhausted` fires at most once per window length (by then all
//!   the usage that filled the window has left it: the window has reset).
//! - **Ids.** Each notice is numbered per account, in the order recorded; its id,
//!   `ntf:ACCOUNT:N`, is the same on every delivery attempt and after a restart, because the
//!   number is part of the account's persisted state.
//! - **Bounded.** An account keeps at most [`MAX_PENDING`] undelivered notices; past that the
//!   oldest is dropped (a receiver that has been down that long has lost the least recent news).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::money::{MICROS_PER_CREDIT, Micros, check_amount};
use super::time::Timestamp;

/// The most undelivered notices one account keeps.
pub const MAX_PENDING: usize = 32;

/// Rules common to every account (from configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationRules {
    /// Whether notices are recorded at all: quotad turns this on when a webhook URL is
    /// configured (nothing would ever deliver them otherwise).
    pub record: bool,
    /// `credits.low` fires when the credit balance falls below this; 0: never.
    pub low_balance_micros: Micros,
}

impl Default for NotificationRules {
    fn default() -> Self {
        NotificationRules {
            record: true,
            low_balance_micros: 10 * MICROS_PER_CREDIT,
        }
    }
}

impl NotificationRules {
    /// What configuration may set: a threshold that is an amount an account can hold.
    pub fn validate(&self) -> Result<(), String> {
        check_amount("notifications.low_balance_micros", self.low_balance_micros)
    }
}

/// What happened, with the amounts a receiver needs (integer micro-credits, never floats).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoticeKind {
    CreditsLow {
        balance: Micros,
        threshold: Micros,
    },
    TopUpSucceeded {
        purchase_id: String,
        amount: Micros,
        payment_id: String,
        balance: Micros,
    },
    TopUpDeclined {
        purchase_id: String,
        amount: Micros,
        error: String,
        consecutive_declines: u32,
    },
    TopUpDisabled {
        consecutive_declines: u32,
        error: String,
    },
    WindowExhausted {
        /// `5h` or `weekly`.
        window: String,
        used: Micros,
        limit: Micros,
        /// When the oldest usage in the window leaves it.
        resets_at: Option<Timestamp>,
    },
}

impl NoticeKind {
    /// The event type a receiver sees.
    pub fn type_name(&self) -> &'static str {
        match self {
            NoticeKind::CreditsLow { .. } => "credits.low",
            NoticeKind::TopUpSucceeded { .. } => "top_up.succeeded",
            NoticeKind::TopUpDeclined { .. } => "top_up.declined",
            NoticeKind::TopUpDisabled { .. } => "top_up.disabled",
            NoticeKind::WindowExhausted { .. } => "window.exhausted",
        }
    }

    fn check(&self) -> Result<(), String> {
        match self {
            NoticeKind::CreditsLow { balance, threshold } => {
                check_amount("the threshold", *threshold)?;
                // A balance may be a debt (negative), never beyond what an amount can be.
                check_amount("the balance", balance.saturating_abs())
            }
            NoticeKind::TopUpSucceeded {
                amount, balance, ..
            } => {
                check_amount("the purchase", *amount)?;
                check_amount("the balance", balance.saturating_abs())
            }
            NoticeKind::TopUpDeclined { amount, .. } => check_amount("the purchase", *amount),
            NoticeKind::TopUpDisabled { .. } => Ok(()),
            NoticeKind::WindowExhausted { used, limit, .. } => {
                check_amount("the usage", *used)?;
                check_amount("the limit", *limit)
            }
        }
    }
}

/// One notification recorded for an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// Its number in the account's notices, from 1.
    pub seq: u64,
    pub at: Timestamp,
    pub kind: NoticeKind,
}

impl Notice {
    /// The id a receiver deduplicates by: the same on every attempt, and after a restart.
    pub fn id(&self, account_id: &str) -> String {
        format!("ntf:{account_id}:{}", self.seq)
    }
}

/// An account's notification state: the outbox, and what the once-per-occurrence rules
/// remember.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notices {
    /// Notices recorded so far (the last one's `seq`).
    recorded: u64,
    /// Recorded and not yet delivered, oldest first.
    pending: VecDeque<Notice>,
    /// The balance was at or above the low-balance threshold when last looked at: falling
    /// below it is news.
    above_low: bool,
    /// Per window (5-hour, weekly): until when a used-up window is not reported again.
    exhausted_until: [Option<Timestamp>; 2],
}

impl Notices {
    pub fn pending(&self) -> &VecDeque<Notice> {
        &self.pending
    }

    /// Notices recorded so far.
    pub fn recorded(&self) -> u64 {
        self.recorded
    }

    /// When the oldest undelivered notice was recorded.
    pub fn oldest(&self) -> Option<Timestamp> {
        self.pending.front().map(|n| n.at)
    }

    fn record(&mut self, at: Timestamp, kind: NoticeKind) {
        self.recorded += 1;
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back(Notice {
            seq: self.recorded,
            at,
            kind,
        });
    }

    /// Forgets a delivered notice; a notice not pending (delivered before) changes nothing.
    pub fn delivered(&mut self, seq: u64) -> bool {
        let before = self.pending.len();
        self.pending.retain(|n| n.seq != seq);
        self.pending.len() != before
    }

    /// What the rules keep true, read back from storage.
    pub(crate) fn check_state(&self) -> Result<(), String> {
        if self.pending.len() > MAX_PENDING {
            return Err(format!(
                "{} notices pending, at most {MAX_PENDING} are kept",
                self.pending.len()
            ));
        }
        let mut previous = 0;
        for notice in &self.pending {
            if notice.seq <= previous || notice.seq > self.recorded {
                return Err(format!("notice {} is out of order", notice.seq));
            }
            previous = notice.seq;
            notice
                .kind
                .check()
                .map_err(|e| format!("notice {}: {e}", notice.seq))?;
        }
        if self.recorded > i64::MAX as u64 {
            return Err("the notice counter is out of range".into());
        }
        Ok(())
    }
}

/// The notices of an account that may not have any yet: made on first need, since most
/// accounts never get one.
pub(crate) fn notices(slot: &mut Option<Box<Notices>>) -> &mut Notices {
    slot.get_or_insert_with(Box::default)
}

/// `credits.low`: records a notice when `balance` has just fallen below the threshold (auto
/// top-up `top_up_on` will buy instead: no notice, but the crossing is used up all the same).
pub(crate) fn check_balance(
    slot: &mut Option<Box<Notices>>,
    rules: NotificationRules,
    balance: Micros,
    top_up_on: bool,
    now: Timestamp,
) {
    let threshold = rules.low_balance_micros;
    if threshold <= 0 {
        return;
    }
    let above = slot.as_ref().is_some_and(|n| n.above_low);
    if balance >= threshold {
        if !above {
            notices(slot).above_low = true;
        }
    } else if above {
        let n = notices(slot);
        n.above_low = false;
        if !top_up_on {
            n.record(now, NoticeKind::CreditsLow { balance, threshold });
        }
    }
}

/// `window.exhausted` for window number `index` (0: 5-hour, 1: weekly) of `length_ms`: records
/// a notice when committed usage `used` has reached `limit`, at most once per window length.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_window(
    slot: &mut Option<Box<Notices>>,
    index: usize,
    name: &str,
    used: Micros,
    limit: Micros,
    length_ms: i64,
    resets_at: Option<Timestamp>,
    now: Timestamp,
) {
    if limit <= 0 || used < limit {
        return;
    }
    let quiet = slot
        .as_ref()
        .and_then(|n| n.exhausted_until[index])
        .is_some_and(|until| now < until);
    if quiet {
        return;
    }
    let n = notices(slot);
    n.exhausted_until[index] = Some(now.plus_millis(length_ms));
    n.record(
        now,
        NoticeKind::WindowExhausted {
            window: name.to_owned(),
            used,
            limit,
            resets_at,
        },
    );
}

/// Records a notice whose occurrence the caller decided (an auto top-up purchase settled).
pub(crate) fn record(slot: &mut Option<Box<Notices>>, now: Timestamp, kind: NoticeKind) {
    notices(slot).record(now, kind);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::money::MICROS_PER_CREDIT as C;

    const T0: Timestamp = Timestamp::from_millis(1_795_557_600_000);

    fn rules() -> NotificationRules {
        NotificationRules {
            record: true,
            low_balance_micros: 10 * C,
        }
    }

    fn kinds(slot: &Option<Box<Notices>>) -> Vec<&'static str> {
        slot.iter()
            .flat_map(|n| n.pending.iter().map(|n| n.kind.type_name()))
            .collect()
    }

    #[test]
    fn low_credits_fire_once_per_crossing() {
        let mut slot = None;
        // Never above the threshold: nothing to report (an account that never had credits).
        check_balance(&mut slot, rules(), 0, false, T0);
        assert!(slot.is_none(), "no state made for nothing");
        check_balance(&mut slot, rules(), 50 * C, false, T0);
        check_balance(&mut slot, rules(), 10 * C, false, T0);
        assert!(kinds(&slot).is_empty(), "at the threshold is not below it");
        check_balance(&mut slot, rules(), 9 * C, false, T0);
        check_balance(&mut slot, rules(), 5 * C, false, T0);
        check_balance(&mut slot, rules(), 0, false, T0);
        assert_eq!(kinds(&slot), ["credits.low"], "once while below");
        let n = &slot.as_ref().unwrap().pending[0];
        assert_eq!(
            n.kind,
            NoticeKind::CreditsLow {
                balance: 9 * C,
                threshold: 10 * C
            }
        );
        assert_eq!(n.id("acct"), "ntf:acct:1");
        // Back above (a grant), then below again: a second occurrence.
        check_balance(&mut slot, rules(), 20 * C, false, T0);
        check_balance(&mut slot, rules(), 2 * C, false, T0);
        assert_eq!(kinds(&slot), ["credits.low", "credits.low"]);
        // With auto top-up on, it buys instead: no notice for that crossing.
        check_balance(&mut slot, rules(), 20 * C, true, T0);
        check_balance(&mut slot, rules(), 2 * C, true, T0);
        assert_eq!(kinds(&slot).len(), 2);
        // A threshold of 0 turns it off.
        let off = NotificationRules {
            low_balance_micros: 0,
            ..rules()
        };
        let mut slot = None;
        check_balance(&mut slot, off, 20 * C, false, T0);
        check_balance(&mut slot, off, -5 * C, false, T0);
        assert!(slot.is_none());
    }

    #[test]
    fn a_used_up_window_fires_once_per_window_length() {
        let mut slot = None;
        let hour = crate::domain::time::HOUR_MS;
        let check = |slot: &mut Option<Box<Notices>>, used: Micros, now: Timestamp| {
            check_window(slot, 0, "5h", used, 100, 5 * hour, None, now)
        };
        check(&mut slot, 99, T0);
        assert!(slot.is_none());
        check(&mut slot, 100, T0);
        check(&mut slot, 120, T0.plus_millis(hour));
        check(&mut slot, 100, T0.plus_millis(5 * hour - 1));
        assert_eq!(kinds(&slot), ["window.exhausted"]);
        check(&mut slot, 100, T0.plus_millis(5 * hour));
        assert_eq!(kinds(&slot).len(), 2, "the window has reset since");
        // The weekly window is remembered apart.
        check_window(&mut slot, 1, "weekly", 100, 100, 7 * 24 * hour, None, T0);
        assert_eq!(kinds(&slot).len(), 3);
    }

    #[test]
    fn the_outbox_is_bounded_and_forgets_what_was_delivered() {
        let mut n = Notices::default();
        for _ in 0..MAX_PENDING + 3 {
            n.record(
                T0,
                NoticeKind::TopUpDisabled {
                    consecutive_declines: 3,
                    error: "card declined".into(),
                },
            );
        }
        assert_eq!(n.pending.len(), MAX_PENDING);
        assert_eq!(n.pending[0].seq, 4, "the oldest dropped");
        assert_eq!(n.check_state(), Ok(()));
        assert!(n.delivered(4));
        assert!(!n.delivered(4), "delivered once");
        assert!(!n.delivered(1), "long gone");
        assert_eq!(n.oldest(), Some(T0));
        assert_eq!(n.recorded(), MAX_PENDING as u64 + 3);
        let mut bad = n.clone();
        bad.pending.swap(0, 1);
        assert!(bad.check_state().is_err());
    }
}
