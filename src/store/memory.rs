//! The embedded store: every account's [`AccountState`] in a sharded concurrent map.
//!
//! An operation holds the write lock of the account's shard while the domain method runs (a few
//! microseconds, no I/O, no await), which makes it atomic for that account; accounts in other
//! shards proceed in parallel. Nothing is persisted: this is the default for a single replica,
//! for development and for tests. Shared, durable state is the Redis store's job.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use dashmap::DashMap;

use super::export_log::ExportLog;
use super::rls_counters::RlsCounters;
use super::{ExportRead, Store, StoreError, account_not_found};
use crate::domain::rls::{CounterCheck, CounterStatus};
use crate::domain::top_up::Purchase;
use crate::domain::{
    Account, AccountState, CommitCommand, CommitOutcome, ExportedEvent, GrantCommand, GrantOutcome,
    Policy, ReleaseCommand, ReleaseOutcome, ReserveCommand, ReserveOutcome, RevokeCommand,
    RevokeOutcome, SetTopUpCommand, SettleTopUpCommand, Timestamp, TopUpOutcome, UsageSnapshot,
};
use crate::rules::LiveRules;

#[derive(Debug)]
pub struct MemoryStore {
    /// Each operation decides on the policy current when it takes the account's lock.
    rules: Arc<LiveRules>,
    /// Boxed: the map's table then holds a pointer per slot, not a whole account, so its spare
    /// capacity costs little (it matters at millions of accounts).
    accounts: DashMap<String, Box<AccountState>>,
    export: ExportLog,
    /// Open reservations of all accounts, kept by every operation (it sees the account's count
    /// before and after, under the account's lock).
    open_holds: AtomicI64,
    /// Envoy RLS counters.
    rls: RlsCounters,
    /// Accounts with an auto top-up purchase in flight, and when it started, kept like
    /// `open_holds`. The once-a-second look for stalled purchases reads this, not every
    /// account: walking millions of accounts holds each shard's lock for milliseconds, and every
    /// decision on that shard would wait behind it.
    purchases: DashMap<String, Timestamp>,
}

/// What the store keeps indexed about an account, read before and after each operation.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Indexed {
    holds: usize,
    purchase_started: Option<Timestamp>,
}

impl Indexed {
    fn of(state: &AccountState) -> Indexed {
        Indexed {
            holds: state.open_holds(),
            purchase_started: state.top_up_in_flight().map(|p| p.started_at),
        }
    }
}

impl MemoryStore {
    /// A store deciding by `policy`, for good.
    pub fn new(policy: Arc<Policy>) -> Self {
        MemoryStore::with_rules(LiveRules::fixed(policy))
    }

    /// A store deciding by whatever `rules` hold when each operation runs (they may be
    /// reloaded).
    pub fn with_rules(rules: Arc<LiveRules>) -> Self {
        MemoryStore {
            export: ExportLog::new(),
            rules,
            accounts: DashMap::new(),
            open_holds: AtomicI64::new(0),
            rls: RlsCounters::default(),
            purchases: DashMap::new(),
        }
    }

    /// Runs `op` on an existing account under its shard lock.
    fn with_account<T>(
        &self,
        account_id: &str,
        op: impl FnOnce(&mut AccountState, &Policy) -> Result<T, crate::domain::DomainError>,
    ) -> Result<T, StoreError> {
        let mut state = self
            .accounts
            .get_mut(account_id)
            .ok_or_else(|| account_not_found(account_id))?;
        Ok(self.indexing(account_id, &mut state, &self.rules.snapshot().policy, op)?)
    }

    /// Runs `op` on an account (whose shard lock the caller holds) and brings the store's
    /// indexes up to date with what it changed.
    fn indexing<T>(
        &self,
        account_id: &str,
        state: &mut AccountState,
        policy: &Policy,
        op: impl FnOnce(&mut AccountState, &Policy) -> T,
    ) -> T {
        let before = Indexed::of(state);
        let result = op(state, policy);
        let after = Indexed::of(state);
        if before != after {
            if before.holds != after.holds {
                self.open_holds
                    .fetch_add(after.holds as i64 - before.holds as i64, Ordering::Relaxed);
            }
            if before.purchase_started != after.purchase_started {
                match after.purchase_started {
                    Some(started) => {
                        self.purchases.insert(account_id.to_owned(), started);
                    }
                    None => {
                        self.purchases.remove(account_id);
                    }
                }
            }
        }
        result
    }
}

impl Store for MemoryStore {
    async fn reserve(
        &self,
        cmd: &ReserveCommand,
        now: Timestamp,
    ) -> Result<ReserveOutcome, StoreError> {
        let rules = self.rules.snapshot();
        let policy = &rules.policy;
        let reserve = |state: &mut AccountState, policy: &Policy| state.reserve(policy, cmd, now);
        if let Some(mut state) = self.accounts.get_mut(&cmd.account_id) {
            return Ok(self.indexing(&cmd.account_id, &mut state, policy, reserve)?);
        }
        let mut state = self
            .accounts
            .entry(cmd.account_id.clone())
            .or_insert_with(|| {
                Box::new(AccountState::new(Account {
                    id: cmd.account_id.clone(),
                    plan: crate::domain::intern(
                        cmd.plan_hint.as_deref().unwrap_or(&policy.default_plan),
                    ),
                    credit_purchase_allowed: true,
                }))
            });
        Ok(self.indexing(&cmd.account_id, &mut state, policy, reserve)?)
    }

    async fn commit(
        &self,
        cmd: CommitCommand,
        now: Timestamp,
    ) -> Result<CommitOutcome, StoreError> {
        self.with_account(&cmd.account_id, |state, policy| {
            let outcome = state.commit(policy, &cmd, now)?;
            // Under the account's lock, so the export holds the account's events in order.
            if let Some(event) = &outcome.event {
                let max_len = policy.limits.export_max_len;
                self.export.append(&cmd.account_id, event.clone(), max_len);
            }
            Ok(outcome)
        })
    }

    async fn release(
        &self,
        cmd: ReleaseCommand,
        now: Timestamp,
    ) -> Result<ReleaseOutcome, StoreError> {
        self.with_account(&cmd.account_id, |state, policy| {
            state.release(policy, &cmd, now)
        })
    }

    async fn grant(&self, cmd: GrantCommand, now: Timestamp) -> Result<GrantOutcome, StoreError> {
        self.with_account(&cmd.account_id, |state, policy| {
            state.grant(policy, &cmd, now)
        })
    }

    async fn revoke_grant(
        &self,
        cmd: RevokeCommand,
        now: Timestamp,
    ) -> Result<RevokeOutcome, StoreError> {
        self.with_account(&cmd.account_id, |state, policy| {
            state.revoke(policy, &cmd, now)
        })
    }

    async fn set_top_up(
        &self,
        cmd: SetTopUpCommand,
        now: Timestamp,
    ) -> Result<TopUpOutcome, StoreError> {
        self.with_account(&cmd.account_id, |state, policy| {
            state.set_top_up(policy, &cmd, now)
        })
    }

    async fn settle_top_up(
        &self,
        cmd: SettleTopUpCommand,
        now: Timestamp,
    ) -> Result<TopUpOutcome, StoreError> {
        self.with_account(&cmd.account_id, |state, policy| {
            state.settle_top_up(policy, &cmd, now)
        })
    }

    async fn upsert_account(
        &self,
        account: Account,
        now: Timestamp,
    ) -> Result<Account, StoreError> {
        let mut state = self
            .accounts
            .entry(account.id.clone())
            .or_insert_with(|| Box::new(AccountState::new(account.clone())));
        self.indexing(
            &account.id,
            &mut state,
            &self.rules.snapshot().policy,
            |state, policy| {
                state.settle(policy, now);
            },
        );
        state.update_account(account.plan, account.credit_purchase_allowed);
        Ok(state.account().clone())
    }

    async fn account(&self, account_id: &str) -> Result<Account, StoreError> {
        let state = self
            .accounts
            .get(account_id)
            .ok_or_else(|| account_not_found(account_id))?;
        Ok(state.account().clone())
    }

    async fn usage(
        &self,
        account_id: &str,
        recent_limit: usize,
        now: Timestamp,
    ) -> Result<UsageSnapshot, StoreError> {
        self.with_account(account_id, |state, policy| {
            state.settle(policy, now);
            state.snapshot(policy, recent_limit)
        })
    }

    async fn rls_check(
        &self,
        domain: &str,
        checks: &[CounterCheck],
        now: Timestamp,
    ) -> Result<Vec<CounterStatus>, StoreError> {
        Ok(self.rls.check_and_count(domain, checks, now))
    }

    fn maintenance_interval(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_secs(1))
    }

    async fn maintain(&self, now: Timestamp) {
        self.rls.prune(now);
    }

    fn open_holds(&self) -> Option<u64> {
        u64::try_from(self.open_holds.load(Ordering::Relaxed)).ok()
    }

    async fn export_read(
        &self,
        read: ExportRead,
        now: Timestamp,
    ) -> Result<Vec<ExportedEvent>, StoreError> {
        Ok(self.export.read(&read, now))
    }

    async fn export_ack(&self, group: &str, delivery_ids: &[String]) -> Result<u64, StoreError> {
        Ok(self.export.ack(group, delivery_ids))
    }

    async fn stalled_purchases(
        &self,
        started_before: Timestamp,
    ) -> Result<Vec<(String, Purchase)>, StoreError> {
        let stalled: Vec<String> = self
            .purchases
            .iter()
            .filter(|entry| *entry.value() <= started_before)
            .map(|entry| entry.key().clone())
            .collect();
        // The index is read first and each account after, never both locks at once (an
        // operation holds the account's lock while it updates the index).
        Ok(stalled
            .into_iter()
            .filter_map(|account_id| {
                let purchase = self.accounts.get(&account_id)?.top_up_in_flight()?.clone();
                (purchase.started_at <= started_before).then_some((account_id, purchase))
            })
            .collect())
    }
}
