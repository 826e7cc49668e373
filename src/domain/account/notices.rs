//! The account's side of notifications: when the rules of [`crate::domain::notice`] look at
//! the account (at the end of every change, and after what time did), what they are shown, and
//! the notices a settled auto top-up purchase records. The notices live in the account's state,
//! so each is durable with the decision that caused it.

use super::AccountState;
use crate::domain::notice::{self, Notice, NoticeKind};
use crate::domain::policy::Policy;
use crate::domain::time::Timestamp;
use crate::domain::top_up::{PaymentResult, Purchase};

impl AccountState {
    /// Runs the notification rules on the account as it is now.
    pub(super) fn check_notices(&mut self, policy: &Policy, now: Timestamp) {
        let rules = policy.notifications;
        if !rules.record {
            return;
        }
        let top_up_on = self.top_up_eligible(policy) && self.top_up().settings().enabled();
        let balance = self.ledger.balance();
        notice::check_balance(&mut self.notices, rules, balance, top_up_on, now);
        let Some(plan) = policy.plan(&self.account.plan) else {
            return;
        };
        let windows = [
            (&self.five_hour, plan.limit_5h_micros),
            (&self.weekly, plan.limit_weekly_micros),
        ];
        for (index, (window, limit)) in windows.into_iter().enumerate() {
            let spec = window.spec();
            notice::check_window(
                &mut self.notices,
                index,
                spec.name,
                window.committed(),
                limit,
                spec.length_ms,
                window.resets_at(),
                now,
            );
        }
    }

    /// Records what settling `purchase` (the one in flight, now settled with `result`) told the
    /// account: `top_up.succeeded`, or `top_up.declined` and, when the declines turned auto
    /// top-up off (`disabled`), `top_up.disabled`.
    pub(super) fn notice_settled(
        &mut self,
        policy: &Policy,
        purchase: Purchase,
        result: &PaymentResult,
        disabled: bool,
        now: Timestamp,
    ) {
        if !policy.notifications.record {
            return;
        }
        match result {
            PaymentResult::Approved { payment_id } => {
                let kind = NoticeKind::TopUpSucceeded {
                    purchase_id: purchase.id,
                    amount: purchase.amount,
                    payment_id: payment_id.clone(),
                    balance: self.ledger.balance(),
                };
                notice::record(&mut self.notices, now, kind);
            }
            PaymentResult::Declined { error } => {
                let consecutive_declines = self.top_up().consecutive_declines();
                let kind = NoticeKind::TopUpDeclined {
                    purchase_id: purchase.id,
                    amount: purchase.amount,
                    error: error.clone(),
                    consecutive_declines,
                };
                notice::record(&mut self.notices, now, kind);
                if disabled {
                    let error = self
                        .top_up()
                        .last_attempt()
                        .map(|a| a.error.clone())
                        .unwrap_or_else(|| error.clone());
                    let kind = NoticeKind::TopUpDisabled {
                        consecutive_declines,
                        error,
                    };
                    notice::record(&mut self.notices, now, kind);
                }
            }
            // Not settled: nothing happened yet.
            PaymentResult::Failed { .. } => {}
        }
    }

    /// Notifications recorded and not yet delivered, oldest first.
    pub fn pending_notices(&self) -> impl Iterator<Item = &Notice> {
        self.notices.iter().flat_map(|n| n.pending().iter())
    }

    /// When the oldest undelivered notification was recorded.
    pub fn oldest_notice(&self) -> Option<Timestamp> {
        self.notices.as_ref().and_then(|n| n.oldest())
    }

    /// Notifications recorded so far (each is numbered by this).
    pub fn notices_recorded(&self) -> u64 {
        self.notices.as_ref().map_or(0, |n| n.recorded())
    }

    /// Forgets notification `seq` once its receiver has it; whether it was still pending.
    pub fn notice_delivered(&mut self, seq: u64) -> bool {
        self.notices.as_mut().is_some_and(|n| n.delivered(seq))
    }
}
