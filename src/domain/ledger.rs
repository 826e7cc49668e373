//! The credit ledger of one account: lots of prepaid credits, spent in a fixed order.
//!
//! Every grant is a [`CreditLot`] with its own expiry. Spending takes from lots in
//! **consumption order** — earliest expiry first, then promotional before purchased, then the
//! oldest grant, then the lot id — so the order is total and the same on every store. Nothing is
//! taken from a lot at or after its expiry: [`Ledger::expire`] moves what is left of it to
//! `expired` first.
//!
//! A commit whose usage outgrew its hold is charged even when the lots run dry (the work is
//! done); the shortfall is `debt`, a negative balance, which the next grant pays off first.
//! The ledger keeps its totals so that at every instant
//! `granted = balance + spent + expired + revoked`, where `balance = Σ remaining − debt`.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::money::{Micros, check_amount};
use super::time::Timestamp;

/// Where a lot's credits came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LotSource {
    Purchase,
    Promo,
    AutoTopUp,
    Adjustment,
}

impl LotSource {
    pub const ALLOWED: &'static str = "purchase, promo, auto_top_up, adjustment";

    pub fn as_str(self) -> &'static str {
        match self {
            LotSource::Purchase => "purchase",
            LotSource::Promo => "promo",
            LotSource::AutoTopUp => "auto_top_up",
            LotSource::Adjustment => "adjustment",
        }
    }

    /// Promotional credits are spent before paid ones of the same expiry.
    fn spend_rank(self) -> u8 {
        match self {
            LotSource::Promo => 0,
            _ => 1,
        }
    }
}

impl fmt::Display for LotSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LotSource {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "purchase" => Ok(LotSource::Purchase),
            "promo" => Ok(LotSource::Promo),
            "auto_top_up" => Ok(LotSource::AutoTopUp),
            "adjustment" => Ok(LotSource::Adjustment),
            _ => Err(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditLot {
    pub id: String,
    pub source: LotSource,
    pub granted: Micros,
    pub remaining: Micros,
    pub granted_at: Timestamp,
    pub expires_at: Timestamp,
}

impl CreditLot {
    /// What granting keeps true of a lot: it holds no more than was granted, and it expires
    /// after it was granted. A lot in the ledger also has credits left (`in_ledger`); a grant's
    /// record of it may not (its lot may have gone to pay off debt).
    pub(crate) fn check(&self, in_ledger: bool) -> Result<(), String> {
        let id = &self.id;
        check_amount(&format!("lot {id:?}: granted"), self.granted)?;
        check_amount(&format!("lot {id:?}: remaining"), self.remaining)?;
        if self.remaining > self.granted {
            return Err(format!(
                "lot {id:?}: {} remaining of {} granted",
                self.remaining, self.granted
            ));
        }
        if in_ledger && self.remaining == 0 {
            return Err(format!("lot {id:?} is empty"));
        }
        if self.expires_at <= self.granted_at {
            return Err(format!("lot {id:?} expires before it was granted"));
        }
        Ok(())
    }

    fn consumption_order(&self, other: &Self) -> Ordering {
        self.expires_at
            .cmp(&other.expires_at)
            .then(self.source.spend_rank().cmp(&other.source.spend_rank()))
            .then(self.granted_at.cmp(&other.granted_at))
            .then_with(|| self.id.cmp(&other.id))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Ledger {
    /// Lots with credits left, in consumption order.
    lots: Vec<CreditLot>,
    debt: Micros,
    granted: Micros,
    spent: Micros,
    expired: Micros,
    revoked: Micros,
}

/// The ledger's running totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LedgerTotals {
    pub granted: Micros,
    pub spent: Micros,
    pub expired: Micros,
    /// Taken back by revoked grants (refunds, chargebacks).
    pub revoked: Micros,
    pub balance: Micros,
}

impl Ledger {
    /// Lots with credits left, in consumption order.
    pub fn lots(&self) -> &[CreditLot] {
        &self.lots
    }

    /// Spendable credits minus debt (call [`expire`](Self::expire) first).
    pub fn balance(&self) -> Micros {
        self.lots.iter().map(|l| l.remaining).sum::<Micros>() - self.debt
    }

    pub fn totals(&self) -> LedgerTotals {
        LedgerTotals {
            granted: self.granted,
            spent: self.spent,
            expired: self.expired,
            revoked: self.revoked,
            balance: self.balance(),
        }
    }

    /// What the ledger keeps true: sound lots in consumption order, debt only once the lots are
    /// spent, and the conservation of credits, `granted = balance + spent + expired + revoked`.
    /// Sums are formed wide, so a forged ledger is refused rather than overflowing.
    pub(crate) fn check(&self) -> Result<(), String> {
        for lot in &self.lots {
            lot.check(true)?;
        }
        if let Some(pair) = self
            .lots
            .windows(2)
            .find(|w| w[0].consumption_order(&w[1]) == Ordering::Greater)
        {
            return Err(format!(
                "lot {:?} comes before {:?} but is spent after it",
                pair[0].id, pair[1].id
            ));
        }
        for (what, amount) in [
            ("debt", self.debt),
            ("granted", self.granted),
            ("spent", self.spent),
            ("expired", self.expired),
            ("revoked", self.revoked),
        ] {
            check_amount(what, amount)?;
        }
        if self.debt > 0 && !self.lots.is_empty() {
            return Err("in debt while lots have credits left".into());
        }
        let remaining: i128 = self.lots.iter().map(|l| i128::from(l.remaining)).sum();
        let balance = remaining - i128::from(self.debt);
        let accounted =
            balance + i128::from(self.spent) + i128::from(self.expired) + i128::from(self.revoked);
        if accounted != i128::from(self.granted) {
            return Err(format!(
                "credits not conserved: granted {} but balance {balance} + spent {} + expired {} + revoked {} = {accounted}",
                self.granted, self.spent, self.expired, self.revoked
            ));
        }
        Ok(())
    }

    /// Removes what is left of lot `id` (a refund or chargeback of its grant); returns how much.
    /// A lot already spent or expired has nothing left to take.
    pub fn revoke(&mut self, id: &str) -> Micros {
        let Some(at) = self.lots.iter().position(|l| l.id == id) else {
            return 0;
        };
        let lot = self.lots.remove(at);
        self.revoked += lot.remaining;
        lot.remaining
    }

    /// Moves what is left of every lot expiring at or before `now` to `expired`.
    pub fn expire(&mut self, now: Timestamp) {
        let expired = &mut self.expired;
        self.lots.retain(|lot| {
            if lot.expires_at <= now {
                *expired += lot.remaining;
                false
            } else {
                true
            }
        });
    }

    /// Adds a lot, paying off any debt from it first; returns the amount that paid off debt.
    pub fn grant(&mut self, mut lot: CreditLot) -> Micros {
        self.granted += lot.granted;
        let pay_off = self.debt.min(lot.remaining);
        self.debt -= pay_off;
        lot.remaining -= pay_off;
        if lot.remaining > 0 {
            let at = self
                .lots
                .partition_point(|l| l.consumption_order(&lot) == Ordering::Less);
            self.lots.insert(at, lot);
        }
        pay_off
    }

    /// Spends `amount` from the lots in consumption order; what they cannot cover becomes debt.
    /// Call [`expire`](Self::expire) first so that no expired lot is touched.
    pub fn spend(&mut self, amount: Micros) {
        debug_assert!(amount >= 0);
        self.spent += amount;
        let mut left = amount;
        let mut emptied = 0;
        for lot in &mut self.lots {
            if left == 0 {
                break;
            }
            let take = lot.remaining.min(left);
            lot.remaining -= take;
            left -= take;
            if lot.remaining == 0 {
                emptied += 1;
            }
        }
        self.lots.drain(..emptied);
        self.debt += left;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lot(
        id: &str,
        source: LotSource,
        amount: Micros,
        granted_at: i64,
        expires_at: i64,
    ) -> CreditLot {
        CreditLot {
            id: id.into(),
            source,
            granted: amount,
            remaining: amount,
            granted_at: Timestamp::from_millis(granted_at),
            expires_at: Timestamp::from_millis(expires_at),
        }
    }

    #[test]
    fn spends_in_consumption_order() {
        let mut l = Ledger::default();
        l.grant(lot("d", LotSource::Purchase, 10, 1, 500));
        l.grant(lot("c", LotSource::Purchase, 10, 2, 100));
        l.grant(lot("b", LotSource::Purchase, 10, 1, 100));
        l.grant(lot("a", LotSource::Promo, 10, 3, 100));
        let order: Vec<_> = l.lots().iter().map(|l| l.id.as_str()).collect();
        assert_eq!(order, ["a", "b", "c", "d"]);
        l.spend(25);
        let left: Vec<_> = l
            .lots()
            .iter()
            .map(|l| (l.id.as_str(), l.remaining))
            .collect();
        assert_eq!(left, [("c", 5), ("d", 10)]);
    }

    #[test]
    fn never_spends_from_an_expired_lot_and_debt_is_paid_by_the_next_grant() {
        let mut l = Ledger::default();
        l.grant(lot("old", LotSource::Purchase, 10, 0, 100));
        l.expire(Timestamp::from_millis(100));
        assert_eq!(l.balance(), 0);
        l.spend(4);
        assert_eq!(l.balance(), -4);
        l.grant(lot("new", LotSource::Purchase, 10, 200, 900));
        assert_eq!(l.balance(), 6);
        assert_eq!(
            l.totals(),
            LedgerTotals {
                granted: 20,
                spent: 4,
                expired: 10,
                revoked: 0,
                balance: 6
            }
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Grant(Micros, i64),
        Spend(Micros),
        Advance(i64),
        Revoke(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1i64..1_000, 1i64..50).prop_map(|(a, e)| Op::Grant(a, e)),
            (0i64..700).prop_map(Op::Spend),
            (0i64..20).prop_map(Op::Advance),
            (0usize..80).prop_map(Op::Revoke),
        ]
    }

    proptest! {
        #[test]
        fn conserves_credits(ops in prop::collection::vec(op(), 1..80)) {
            let mut l = Ledger::default();
            let mut now = 0i64;
            for (i, op) in ops.into_iter().enumerate() {
                l.expire(Timestamp::from_millis(now));
                match op {
                    Op::Grant(a, e) => {
                        l.grant(lot(&format!("{i}"), LotSource::Purchase, a, now, now + e));
                    }
                    Op::Spend(a) => l.spend(a),
                    Op::Advance(dt) => now += dt,
                    Op::Revoke(i) => {
                        l.revoke(&format!("{i}"));
                    }
                }
                let t = l.totals();
                prop_assert_eq!(t.granted, t.balance + t.spent + t.expired + t.revoked);
                prop_assert!(l.lots().iter().all(|lot| lot.remaining > 0 && lot.remaining <= lot.granted));
                prop_assert!(l.lots().windows(2).all(|w| w[0].consumption_order(&w[1]) == Ordering::Less));
            }
        }
    }
}
