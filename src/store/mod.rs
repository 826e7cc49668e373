//! Where account state lives. One [`Store`] trait with one method per intent (reserve, commit,
//! release, grant, …), each of which a store must perform as **one atomic step** on one
//! account. The decisions themselves come from [`crate::domain`] and are made in memory, under
//! the account's map-shard lock ([`MemoryStore`]); what differs is what backs that memory:
//! nothing (tests, trials), an embedded database in a data dir (`data_dir`), or Redis, where
//! each account is decided by the replica owning its partition ([`redis`]). Each change is
//! durable in the backing store, by group commit, before its call is answered.
//!
//! Every store must pass the same contract suite (`tests/integration/support/contract.rs`).

mod backing;
mod commit_log;
mod data_dir;
mod export_log;
mod group_commit;
pub mod memory;
pub mod redis;
mod rls_counters;

use std::future::Future;
use std::time::Duration;

use crate::domain::notice::Notice;
use crate::domain::rls::{CounterCheck, CounterStatus};
use crate::domain::top_up::Purchase;
use crate::domain::{
    Account, CommitCommand, CommitOutcome, DomainError, ExportedEvent, GrantCommand, GrantOutcome,
    ReleaseCommand, ReleaseOutcome, ReserveCommand, ReserveOutcome, RevokeCommand, RevokeOutcome,
    SetTopUpCommand, SettleTopUpCommand, Timestamp, TopUpOutcome, TopUpPreview, UsageSnapshot,
};

pub use data_dir::DataDirError;
pub use memory::{DataDirSettings, MemoryStore};
pub use redis::owned::OwnedSettings;
pub use redis::{RedisSettings, RedisTls};

/// Whether the backing store answers, as this replica last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreHealth {
    Up,
    Down { error: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The rules refused the operation; nothing changed.
    #[error(transparent)]
    Rule(#[from] DomainError),
    /// The backing store could not be reached in time; the operation may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered something it should never answer (a bug, or a version mismatch).
    #[error("store error: {0}")]
    Internal(String),
    /// The account is decided by another replica (on Redis), reached at `address`;
    /// nothing changed here.
    #[error("account decided by replica {owner} at {address}")]
    Moved { owner: String, address: String },
}

/// The embedded store's data dir, as sampled for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataDirStats {
    pub bytes: u64,
    /// Group commits written since start, and the decisions they held.
    pub batches: u64,
    pub changes: u64,
}

/// What deciding without Redis has done (on Redis with an outage grace), as sampled for
/// metrics: counts since start, and the state now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutageStats {
    /// Redis does not answer and decisions go on from memory, journaled.
    pub deciding_without_redis: bool,
    pub decisions: u64,
    pub journaled: u64,
    pub replayed: u64,
    pub fenced: u64,
    pub journal_pending: u64,
}

/// A consumer group's read of the usage export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRead {
    /// The group; created at the oldest retained event on its first read.
    pub group: String,
    /// The reading member of the group: what it is given stays pending under its name.
    pub consumer: String,
    pub max_events: usize,
    /// Events delivered at least this long ago and still unacknowledged are delivered again
    /// (the consumer that had them probably died) before new ones.
    pub claim_idle_ms: i64,
}

/// Account state behind intent-level atomic operations. `now` comes from the caller's clock
/// so that every store decides at the same instant the caller saw.
pub trait Store: Send + Sync + 'static {
    /// Holds the priced estimate, or denies; creates the account on first sight. By reference:
    /// a Reserve that waits for a top-up asks again with the same command.
    fn reserve(
        &self,
        cmd: &ReserveCommand,
        now: Timestamp,
    ) -> impl Future<Output = Result<ReserveOutcome, StoreError>> + Send;

    /// Charges cumulative usage against a reservation; `is_final` closes it.
    fn commit(
        &self,
        cmd: CommitCommand,
        now: Timestamp,
    ) -> impl Future<Output = Result<CommitOutcome, StoreError>> + Send;

    /// Returns a reservation's hold.
    fn release(
        &self,
        cmd: ReleaseCommand,
        now: Timestamp,
    ) -> impl Future<Output = Result<ReleaseOutcome, StoreError>> + Send;

    /// Adds a credit lot to an existing account.
    fn grant(
        &self,
        cmd: GrantCommand,
        now: Timestamp,
    ) -> impl Future<Output = Result<GrantOutcome, StoreError>> + Send;

    /// Takes back what is left of a grant's lot; acts once per grant.
    fn revoke_grant(
        &self,
        cmd: RevokeCommand,
        now: Timestamp,
    ) -> impl Future<Output = Result<RevokeOutcome, StoreError>> + Send;

    /// Changes an account's auto top-up settings.
    fn set_top_up(
        &self,
        cmd: SetTopUpCommand,
        now: Timestamp,
    ) -> impl Future<Output = Result<TopUpOutcome, StoreError>> + Send;

    /// What changing an account's auto top-up settings would do now; changes nothing.
    fn preview_top_up(
        &self,
        cmd: SetTopUpCommand,
        now: Timestamp,
    ) -> impl Future<Output = Result<TopUpPreview, StoreError>> + Send;

    /// Settles an auto top-up purchase with the payment's result.
    fn settle_top_up(
        &self,
        cmd: SettleTopUpCommand,
        now: Timestamp,
    ) -> impl Future<Output = Result<TopUpOutcome, StoreError>> + Send;

    /// Creates an account or changes its plan and credit eligibility.
    fn upsert_account(
        &self,
        account: Account,
        now: Timestamp,
    ) -> impl Future<Output = Result<Account, StoreError>> + Send;

    fn account(&self, account_id: &str)
    -> impl Future<Output = Result<Account, StoreError>> + Send;

    /// Windows, credits, holds and the newest `recent_limit` usage events of an account.
    fn usage(
        &self,
        account_id: &str,
        recent_limit: usize,
        now: Timestamp,
    ) -> impl Future<Output = Result<UsageSnapshot, StoreError>> + Send;

    /// An account's windows and credits for an Envoy RLS account check (no history). A store
    /// that does not decide on the account here may answer what it last wrote instead of
    /// refusing (on Redis: the owner's state, behind it by at most the batch in
    /// flight), so one RLS request can name an account and counters decided elsewhere.
    fn account_status(
        &self,
        account_id: &str,
        now: Timestamp,
    ) -> impl Future<Output = Result<UsageSnapshot, StoreError>> + Send {
        self.usage(account_id, 0, now)
    }

    /// How often [`maintain`](Store::maintain) should run; `None` if the store needs no upkeep.
    fn maintenance_interval(&self) -> Option<Duration> {
        None
    }

    /// Background upkeep at `now` (for example, returning holds of clients that died).
    fn maintain(&self, now: Timestamp) -> impl Future<Output = ()> + Send {
        let _ = now;
        async {}
    }

    /// Whether this replica decides on every account (on Redis: it holds every
    /// partition). When it does, no call needs forwarding and requests are not buffered.
    fn owns_every_account(&self) -> bool {
        true
    }

    /// Whether the backing store answers, as this replica last saw it.
    fn health(&self) -> StoreHealth {
        StoreHealth::Up
    }

    /// Notifications dropped undelivered since start, on the accounts this replica decided:
    /// recorded while their account held as many undelivered ones as it keeps
    /// ([`crate::domain::notice::MAX_PENDING`]), which drops the oldest.
    fn notices_dropped(&self) -> u64 {
        0
    }

    /// Writes to the backing store whose attempt failed or timed out and that were tried
    /// again, since start.
    fn retried_calls(&self) -> u64 {
        0
    }

    /// Accounts in memory now, for a store that lets idle ones leave memory (the memory store
    /// with a data dir or on Redis).
    fn resident_accounts(&self) -> Option<u64> {
        None
    }

    /// What the embedded store's data dir has done, if the store has one.
    fn data_dir_stats(&self) -> Option<DataDirStats> {
        None
    }

    /// What deciding without Redis has done, for a store that can (on Redis).
    fn outage_stats(&self) -> Option<OutageStats> {
        None
    }

    /// Open reservations in the whole store, when the store can tell cheaply.
    fn open_holds(&self) -> Option<u64> {
        None
    }

    /// Usage events for a consumer group: unacknowledged ones idle past `claim_idle_ms` first,
    /// then new ones. At least once: consumers deduplicate by [`ExportedEvent::event_id`].
    fn export_read(
        &self,
        read: ExportRead,
        now: Timestamp,
    ) -> impl Future<Output = Result<Vec<ExportedEvent>, StoreError>> + Send;

    /// Acknowledges deliveries of [`export_read`](Store::export_read); returns how many were
    /// pending for the group.
    fn export_ack(
        &self,
        group: &str,
        delivery_ids: &[String],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Envoy RLS: checks the counted descriptors of one request of `domain` and counts them
    /// if all fit, as one atomic step (see [`crate::domain::rls`]).
    fn rls_check(
        &self,
        domain: &str,
        checks: &[CounterCheck],
        now: Timestamp,
    ) -> impl Future<Output = Result<Vec<CounterStatus>, StoreError>> + Send;

    /// Accounts with notifications recorded and not yet delivered, each with its notices,
    /// oldest first; only those whose decisions are durable. A store may answer for the
    /// accounts it decides on (on Redis: the partitions this replica owns).
    fn pending_notices(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, Vec<Notice>)>, StoreError>> + Send;

    /// Forgets notification `seq` of an account once its receiver has it, durably; answers
    /// whether it was still pending (a second delivery changes nothing).
    fn notice_delivered(
        &self,
        account_id: &str,
        seq: u64,
        now: Timestamp,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Auto top-up purchases still in flight that started at or before `started_before`: a
    /// replica that died while paying them left them unsettled. A store may answer for a part
    /// of its accounts at a time (each call the next part).
    fn stalled_purchases(
        &self,
        started_before: Timestamp,
    ) -> impl Future<Output = Result<Vec<(String, Purchase)>, StoreError>> + Send;
}

pub(crate) fn account_not_found(account_id: &str) -> StoreError {
    StoreError::Rule(DomainError::account_not_found(account_id))
}
