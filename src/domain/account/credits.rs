//! Credits an account is given: lots granted (and revoked) by an admin, and lots bought by auto
//! top-up. This file owns the account's side of auto top-up: who may have credits bought for
//! them, when the trigger runs (at the end of every change), and what a settled purchase
//! becomes; the purchase rules themselves are [`crate::domain::top_up`]'s.

use std::collections::HashMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{AccountState, MAX_EXACT_MICROS};
use crate::domain::decision::{
    GrantCommand, GrantOutcome, RevokeCommand, RevokeOutcome, SetTopUpCommand, SettleTopUpCommand,
    TopUpOutcome, TopUpPreview, TopUpView,
};
use crate::domain::error::DomainError;
use crate::domain::ledger::{CreditLot, LotSource};
use crate::domain::money::{Micros, check_amount};
use crate::domain::policy::Policy;
use crate::domain::time::Timestamp;
use crate::domain::top_up::{Purchase, TopUp};

/// Credit lots last this many months unless a grant says otherwise.
pub const LOT_VALIDITY_MONTHS: u32 = 12;

/// When a lot granted at `now` expires, unless its grant says otherwise. Every store dates its
/// lots by this, auto top-up lots always.
pub fn default_lot_expiry(now: Timestamp) -> Timestamp {
    now.plus_months(LOT_VALIDITY_MONTHS)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct GrantRecord {
    fingerprint: u64,
    lot: CreditLot,
    /// What a revocation took back, once revoked.
    revoked: Option<Micros>,
}

impl GrantRecord {
    fn check(&self) -> Result<(), String> {
        self.lot.check(false)?;
        if let Some(revoked) = self.revoked {
            check_amount("revoked", revoked)?;
            if revoked > self.lot.granted {
                return Err(format!(
                    "revoked {revoked} of a grant of {}",
                    self.lot.granted
                ));
            }
        }
        Ok(())
    }
}

/// An account's grants, by grant id (the id of the lot each made).
#[allow(clippy::box_collection)]
pub(super) type Grants = Option<Box<HashMap<String, GrantRecord>>>;

/// Stores the grants as their records ordered by id (a map's order changes from run to run,
/// and the same state must encode to the same bytes); each is keyed by its lot's id again.
pub(super) mod grants_by_id {
    use super::*;

    pub fn serialize<S: Serializer>(grants: &Grants, s: S) -> Result<S::Ok, S::Error> {
        let mut records: Vec<&GrantRecord> = grants.iter().flat_map(|g| g.values()).collect();
        records.sort_unstable_by(|a, b| a.lot.id.cmp(&b.lot.id));
        s.collect_seq(records)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Grants, D::Error> {
        let records = Vec::<GrantRecord>::deserialize(d)?;
        if records.is_empty() {
            return Ok(None);
        }
        let mut grants = HashMap::with_capacity(records.len());
        for record in records {
            let id = record.lot.id.clone();
            if grants.insert(id, record).is_some() {
                return Err(serde::de::Error::custom("a grant id appears twice"));
            }
        }
        Ok(Some(Box::new(grants)))
    }
}

/// The auto top-up state of an account that never configured it.
static NO_TOP_UP: std::sync::LazyLock<TopUp> = std::sync::LazyLock::new(TopUp::default);

impl AccountState {
    /// Every grant record sound and agreeing with the ledger: the grants granted and revoked no
    /// more than the ledger counts, and each lot in the ledger is what its grant made, less what
    /// was spent from it since.
    ///
    /// (A lot id may appear twice, in a corner: an admin grant whose id is that of a later auto
    /// top-up purchase, `topup:ACCOUNT:N`, which replaces its record. Such lots are checked as
    /// lots only.)
    pub(super) fn check_grants(&self) -> Result<(), String> {
        let grants = self.grants.as_deref();
        let (mut granted, mut revoked) = (0i128, 0i128);
        for (id, record) in grants.into_iter().flatten() {
            record.check().map_err(|e| format!("grant {id:?}: {e}"))?;
            if *id != record.lot.id {
                return Err(format!("grant {id:?} made lot {:?}", record.lot.id));
            }
            granted += i128::from(record.lot.granted);
            revoked += i128::from(record.revoked.unwrap_or(0));
        }
        let totals = self.ledger.totals();
        if granted > i128::from(totals.granted) || revoked > i128::from(totals.revoked) {
            return Err(format!(
                "grants add up to {granted} granted and {revoked} revoked, the ledger to {} and {}",
                totals.granted, totals.revoked
            ));
        }
        let lots = self.ledger.lots();
        for lot in lots {
            let Some(record) = grants.and_then(|g| g.get(&lot.id)) else {
                return Err(format!("lot {:?} has no grant", lot.id));
            };
            if lots.iter().filter(|l| l.id == lot.id).count() > 1 {
                continue;
            }
            let made = &record.lot;
            let same = lot.source == made.source
                && lot.granted == made.granted
                && lot.granted_at == made.granted_at
                && lot.expires_at == made.expires_at;
            if !same || lot.remaining > made.remaining || record.revoked.is_some() {
                return Err(format!(
                    "lot {:?} is not what its grant made (or was revoked)",
                    lot.id
                ));
            }
        }
        Ok(())
    }

    /// Credits not already spoken for by open holds.
    pub(super) fn credits_available(&self) -> Micros {
        self.ledger.balance() - self.held().credit
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
        let expires_at = cmd.expires_at.unwrap_or_else(|| default_lot_expiry(now));
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
        let lot = self.add_lot(fingerprint, lot);
        self.check_notices(policy, now);
        Ok(GrantOutcome {
            lot,
            credit_balance: self.ledger.balance(),
        })
    }

    /// Adds a lot to the ledger and keeps it by id, for retries of its grant and for revoking
    /// it. What the lot pays off of a debt is not left in it; returns the lot as kept.
    fn add_lot(&mut self, fingerprint: u64, lot: CreditLot) -> CreditLot {
        let paid_off = self.ledger.grant(lot.clone());
        let lot = CreditLot {
            remaining: lot.granted - paid_off,
            ..lot
        };
        self.grants.get_or_insert_with(Box::default).insert(
            lot.id.clone(),
            GrantRecord {
                fingerprint,
                lot: lot.clone(),
                revoked: None,
            },
        );
        lot
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

    /// Whether this account may have credits bought for it.
    pub(super) fn top_up_eligible(&self, policy: &Policy) -> bool {
        policy.may_buy_credits(&self.account)
    }

    /// The auto top-up trigger, run at the end of every change; the notification rules run
    /// first (a change they report on is one the trigger may buy after).
    pub(super) fn check_top_up(&mut self, policy: &Policy, now: Timestamp) -> Option<Purchase> {
        self.check_notices(policy, now);
        if !self.top_up_eligible(policy) {
            return None;
        }
        let available = self.credits_available();
        // Never configured: nothing to check.
        self.top_up
            .as_deref_mut()?
            .check(available, &self.account.id, policy.top_up, now)
    }

    pub(super) fn top_up(&self) -> &TopUp {
        self.top_up.as_deref().unwrap_or(&NO_TOP_UP)
    }

    pub(super) fn top_up_view(&self) -> TopUpView {
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
        self.settle(policy, now);
        if cmd.settings.enabled() && !self.top_up_eligible(policy) {
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
        );
        Ok(TopUpOutcome {
            view: self.top_up_view(),
            top_up,
            credit_balance: self.ledger.balance(),
        })
    }

    /// What [`set_top_up`](Self::set_top_up) would do now, without doing it: the same rule run
    /// on a copy of the account, so a preview can never answer differently from saving.
    pub fn preview_top_up(
        &self,
        policy: &Policy,
        cmd: &SetTopUpCommand,
        now: Timestamp,
    ) -> Result<TopUpPreview, DomainError> {
        let mut copy = self.clone();
        copy.settle(policy, now);
        let available = copy.credits_available();
        let in_flight = copy.top_up().in_flight().map(|p| p.amount);
        let outcome = copy.set_top_up(policy, cmd, now)?;
        let purchase = outcome.top_up.map(|p| p.amount);
        Ok(TopUpPreview {
            view: outcome.view,
            available,
            purchase,
            purchase_price: purchase.map(|amount| policy.top_up.price.of(amount)),
            in_flight,
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
        let settling = (self.top_up().in_flight())
            .filter(|p| p.id == cmd.purchase_id)
            .cloned();
        let was_enabled = self.top_up().settings().enabled();
        if let Some(paid) = self.top_up.get_or_insert_with(Box::default).settle(
            &cmd.purchase_id,
            &cmd.result,
            policy.top_up,
            now,
        ) {
            let lot = CreditLot {
                id: paid.id,
                source: LotSource::AutoTopUp,
                granted: paid.amount,
                remaining: paid.amount,
                granted_at: now,
                expires_at: default_lot_expiry(now),
            };
            // No request to compare retries with: a purchase settles once.
            self.add_lot(0, lot);
        }
        // Only the answer that settled the purchase in flight is news (not a duplicate).
        if let Some(purchase) = settling
            && self.top_up().in_flight().is_none()
        {
            let disabled = was_enabled && !self.top_up().settings().enabled();
            self.notice_settled(policy, purchase, &cmd.result, disabled, now);
        }
        let top_up = self.check_top_up(policy, now);
        Ok(TopUpOutcome {
            view: self.top_up_view(),
            top_up,
            credit_balance: self.ledger.balance(),
        })
    }
}
