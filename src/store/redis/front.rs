//! What a replica remembers of the accounts it served, in front of Redis: the last full usage
//! snapshot (for GetUsage within the staleness bound) and denials that only time or an admin
//! change can turn (the deny cache). Every entry is a copy; Redis stays the truth.
//!
//! Invalidation: a replica forgets an account's snapshot whenever it changes that account, and
//! forgets everything about an account when an admin change for it is announced on the admin
//! channel (or everything at all, when the channel was lost and changes may have been missed).

use dashmap::DashMap;

use crate::domain::{AccountStatus, Decision, Micros, ReserveOutcome, Timestamp, UsageSnapshot};

#[derive(Debug, Clone)]
struct CachedDeny {
    product: String,
    /// The estimate that was denied; larger ones are denied too.
    cost: Micros,
    /// Until when no release of holds could turn the answer (only time or an admin change).
    until: Timestamp,
    decision: Decision,
    status: AccountStatus,
}

#[derive(Debug, Default)]
struct Entry {
    snapshot: Option<(Timestamp, UsageSnapshot)>,
    denies: Vec<CachedDeny>,
    touched: Timestamp,
}

#[derive(Debug, Default)]
pub struct Front {
    accounts: DashMap<String, Entry>,
}

impl Front {
    /// A remembered denial for an estimate of `cost` on `product`, if one still holds at `now`.
    pub fn deny(
        &self,
        account: &str,
        product: &str,
        cost: Micros,
        now: Timestamp,
    ) -> Option<(Decision, AccountStatus)> {
        let entry = self.accounts.get(account)?;
        let hit = entry
            .denies
            .iter()
            .find(|d| d.product == product && cost >= d.cost && now < d.until)?;
        Some((hit.decision.clone(), hit.status.clone()))
    }

    pub fn remember_deny(
        &self,
        account: &str,
        product: &str,
        until: Timestamp,
        outcome: &ReserveOutcome,
        now: Timestamp,
    ) {
        let mut entry = self.accounts.entry(account.to_owned()).or_default();
        entry.touched = now;
        entry
            .denies
            .retain(|d| d.product != product && now < d.until);
        entry.denies.push(CachedDeny {
            product: product.to_owned(),
            cost: outcome.estimate,
            until,
            decision: outcome.decision.clone(),
            status: outcome.status.clone(),
        });
    }

    /// The last snapshot of `account` if it was taken at most `staleness_ms` before `now`.
    pub fn snapshot(
        &self,
        account: &str,
        now: Timestamp,
        staleness_ms: i64,
    ) -> Option<UsageSnapshot> {
        let entry = self.accounts.get(account)?;
        let (taken, snapshot) = entry.snapshot.as_ref()?;
        let age = now.as_millis() - taken.as_millis();
        (staleness_ms > 0 && (0..=staleness_ms).contains(&age)).then(|| snapshot.clone())
    }

    pub fn remember_snapshot(&self, account: &str, snapshot: &UsageSnapshot, now: Timestamp) {
        let mut entry = self.accounts.entry(account.to_owned()).or_default();
        entry.touched = now;
        entry.snapshot = Some((now, snapshot.clone()));
    }

    /// This replica changed the account: its snapshot is out of date.
    pub fn changed(&self, account: &str) {
        if let Some(mut entry) = self.accounts.get_mut(account) {
            entry.snapshot = None;
        }
    }

    /// An admin change (plan, eligibility, credits) for the account was announced.
    pub fn forget(&self, account: &str) {
        self.accounts.remove(account);
    }

    pub fn forget_all(&self) {
        self.accounts.clear();
    }

    /// Drops entries untouched since `idle_before` whose denials have all lapsed, so memory
    /// follows the accounts in use, not every account ever seen.
    pub fn prune(&self, now: Timestamp, idle_before: Timestamp) {
        self.accounts
            .retain(|_, e| e.touched >= idle_before || e.denies.iter().any(|d| now < d.until));
    }

    pub fn len(&self) -> usize {
        self.accounts.len()
    }
}
