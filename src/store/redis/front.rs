//! What a replica remembers of the accounts it served, in front of Redis: the last full usage
//! snapshot, for GetUsage within the staleness bound. Every entry is a copy; Redis stays the
//! truth. Nothing else is answered from memory: a Reserve's answer depends on its request's
//! record, which any replica may have written, so every Reserve asks Redis.
//!
//! A copy is used only while it is at most `usage_staleness_ms` old and before the first
//! instant at which time alone changes the account (a hold or a lot expires, usage leaves a
//! window), so that it differs from Redis only by what other replicas did meanwhile.
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

use crate::domain::{Timestamp, UsageSnapshot};

/// A snapshot, when it was read, and until when time leaves it as it is (`None`: forever).
#[derive(Debug)]
struct Copy {
    taken: Timestamp,
    until: Option<Timestamp>,
    snapshot: UsageSnapshot,
}

#[derive(Debug, Default)]
struct Entry {
    snapshot: Option<Copy>,
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

    /// The last snapshot of `account` if it was taken at most `staleness_ms` before `now` and
    /// time has not changed the account since.
    pub fn snapshot(
        &self,
        account: &str,
        now: Timestamp,
        staleness_ms: i64,
    ) -> Option<UsageSnapshot> {
        let entry = self.accounts.get(account)?;
        let copy = entry.snapshot.as_ref()?;
        let age = now.as_millis() - copy.taken.as_millis();
        let fresh = staleness_ms > 0 && (0..=staleness_ms).contains(&age);
        (fresh && copy.until.is_none_or(|until| now < until)).then(|| copy.snapshot.clone())
    }

    /// Remembers a snapshot read at `read`, taken at `now` and left as it is by time until
    /// `until`, unless the read raced a change.
    pub fn remember_snapshot(
        &self,
        read: ReadVersion,
        account: &str,
        snapshot: &UsageSnapshot,
        (now, until): (Timestamp, Option<Timestamp>),
    ) {
        if self.version(account) != read {
            return;
        }
        let mut entry = self.accounts.entry(account.to_owned()).or_default();
        entry.touched = now;
        entry.snapshot = Some(Copy {
            taken: now,
            until,
            snapshot: snapshot.clone(),
        });
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

    /// Drops entries untouched since `idle_before`, so memory follows the accounts in use, not
    /// every account ever seen.
    pub fn prune(&self, idle_before: Timestamp) {
        self.accounts.retain(|_, e| e.touched >= idle_before);
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
        front.remember_snapshot(read, "a", &snapshot(), (now, None));
        assert_eq!(front.snapshot("a", now, 250), None);
        let read = front.version("a");
        front.remember_snapshot(read, "a", &snapshot(), (now, None));
        assert!(front.snapshot("a", now, 250).is_some());
        let read = front.version("a");
        front.forget_all();
        front.remember_snapshot(read, "a", &snapshot(), (now, None));
        assert_eq!(
            front.snapshot("a", now, 250),
            None,
            "a lost channel invalidates every read in flight"
        );
    }

    #[test]
    fn a_copy_lasts_the_staleness_bound_but_not_past_a_change_made_by_time() {
        let front = Front::default();
        let at = Timestamp::from_millis;
        let read = front.version("a");
        front.remember_snapshot(read, "a", &snapshot(), (at(1_000), None));
        assert!(front.snapshot("a", at(1_250), 250).is_some());
        assert_eq!(front.snapshot("a", at(1_251), 250), None, "too old");
        assert_eq!(front.snapshot("a", at(999), 250), None, "taken later");
        assert_eq!(
            front.snapshot("a", at(1_000), 0),
            None,
            "no staleness allowed"
        );
        // A hold of the copy expires at 1,100.
        let read = front.version("a");
        front.remember_snapshot(read, "a", &snapshot(), (at(1_000), Some(at(1_100))));
        assert!(front.snapshot("a", at(1_099), 250).is_some());
        assert_eq!(
            front.snapshot("a", at(1_100), 250),
            None,
            "the hold expired"
        );
    }
}
