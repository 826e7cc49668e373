//! What a replica remembers of the accounts it served, in front of Redis: the last full usage
//! snapshot (for GetUsage within the staleness bound) and denials that only time or an admin
//! change can turn (the deny cache). Every entry is a copy; Redis stays the truth.
//!
//! Invalidation: a replica forgets an account's snapshot whenever it changes that account, and
//! forgets everything about an account when an admin change for it is announced on the admin
//! channel (or everything at all, when the channel was lost and changes may have been missed).
//! A copy read from Redis is remembered only if nothing invalidated that account while it was
//! being read ([`Front::version`] before the read, checked when remembering): otherwise a read
//! that started before a change could store the old answer after the change forgot it.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

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

/// What [`Front::version`] saw before a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadVersion(u64, u64);

/// Stripes of invalidation counters.
const STRIPES: usize = 4_096;

#[derive(Debug)]
pub struct Front {
    accounts: DashMap<String, Entry>,
    /// Invalidation counters, striped by account (a fixed few thousand, however many accounts),
    /// and of everything (`epoch`), to spot a read that raced an invalidation. Two accounts
    /// sharing a stripe only ever cost a copy not kept.
    stripes: Vec<AtomicU64>,
    epoch: AtomicU64,
}

impl Default for Front {
    fn default() -> Self {
        Front {
            accounts: DashMap::new(),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            epoch: AtomicU64::new(0),
        }
    }
}

impl Front {
    /// Take this before reading an account from Redis; pass it when remembering what was read.
    pub fn version(&self, account: &str) -> ReadVersion {
        ReadVersion(
            self.epoch.load(Ordering::Acquire),
            self.stripe(account).load(Ordering::Acquire),
        )
    }

    fn stripe(&self, account: &str) -> &AtomicU64 {
        let mut hasher = std::hash::DefaultHasher::new();
        account.hash(&mut hasher);
        &self.stripes[(hasher.finish() % self.stripes.len() as u64) as usize]
    }

    fn invalidate(&self, account: &str) {
        self.stripe(account).fetch_add(1, Ordering::AcqRel);
    }

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

    /// Remembers a denial read at `read`, for (account, product), unless it raced a change.
    pub fn remember_deny(
        &self,
        read: ReadVersion,
        (account, product): (&str, &str),
        until: Timestamp,
        outcome: &ReserveOutcome,
        now: Timestamp,
    ) {
        if self.version(account) != read {
            return;
        }
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

    /// Remembers a snapshot read at `read`, unless it raced a change.
    pub fn remember_snapshot(
        &self,
        read: ReadVersion,
        account: &str,
        snapshot: &UsageSnapshot,
        now: Timestamp,
    ) {
        if self.version(account) != read {
            return;
        }
        let mut entry = self.accounts.entry(account.to_owned()).or_default();
        entry.touched = now;
        entry.snapshot = Some((now, snapshot.clone()));
    }

    /// This replica changed the account: its snapshot is out of date.
    pub fn changed(&self, account: &str) {
        self.invalidate(account);
        if let Some(mut entry) = self.accounts.get_mut(account) {
            entry.snapshot = None;
        }
    }

    /// An admin change (plan, eligibility, credits) for the account was announced.
    pub fn forget(&self, account: &str) {
        self.invalidate(account);
        self.accounts.remove(account);
    }

    pub fn forget_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Account, AccountStatus, LedgerTotals};

    fn snapshot() -> UsageSnapshot {
        UsageSnapshot {
            account: Account {
                id: "a".into(),
                plan: "free".into(),
                credit_purchase_allowed: true,
            },
            status: AccountStatus {
                plan: "free".into(),
                windows: Vec::new(),
                credit_balance: 0,
            },
            lots: Vec::new(),
            recent: Vec::new(),
            totals: LedgerTotals::default(),
            credit_held: 0,
            holds: Vec::new(),
            top_up: Default::default(),
        }
    }

    #[test]
    fn a_read_that_raced_a_change_is_not_remembered() {
        let front = Front::default();
        let now = Timestamp::from_millis(1_000);
        let read = front.version("a");
        front.changed("a"); // a change lands while the read is on its way
        front.remember_snapshot(read, "a", &snapshot(), now);
        assert_eq!(front.snapshot("a", now, 250), None);
        let read = front.version("a");
        front.remember_snapshot(read, "a", &snapshot(), now);
        assert!(front.snapshot("a", now, 250).is_some());
        let read = front.version("a");
        front.forget_all();
        front.remember_snapshot(read, "a", &snapshot(), now);
        assert_eq!(
            front.snapshot("a", now, 250),
            None,
            "a lost channel invalidates every read in flight"
        );
    }
}
