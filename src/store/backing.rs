//! What the in-memory engine ([`super::MemoryStore`]) makes its decisions durable in: the data
//! dir (a commit log and an embedded database, one process) or Redis (partitions this replica
//! owns, shared by replicas). Both take changes in decision order, number them, write them in
//! batches and say when a number is durable; the engine answers a call only then. Reads of
//! what memory does not keep (an account not resident, history, the export) go to the backing.

use super::data_dir::Change;
use super::group_commit::GroupCommit;
use super::redis::owned::{Admission, OwnedRedis, Queued};
use super::{ExportRead, StoreError};
use crate::domain::{AccountState, ExportedEvent, Timestamp, UsageEvent};

#[derive(Debug)]
pub(super) enum Backing {
    DataDir(GroupCommit),
    Redis(OwnedRedis),
}

impl Backing {
    /// Whether a new decision on `account_id` may be made here now (checked before deciding,
    /// so a refusal changes nothing). On Redis, the admission keeps the account's partition
    /// here until it is dropped: drop it once the decision's change is queued.
    pub async fn admit(&self, account_id: &str) -> Result<Option<Admission>, StoreError> {
        match self {
            Backing::DataDir(commits) => commits.admit().map(|()| None),
            Backing::Redis(redis) => redis.admit(account_id).await.map(Some),
        }
    }

    /// Queues a change decided under `epoch` (the caller holds the account's lock); returns its
    /// number.
    pub fn submit(&self, change: Change, epoch: u64) -> u64 {
        match self {
            Backing::DataDir(commits) => commits.submit(change),
            Backing::Redis(redis) => redis.submit(Queued::Account(change), epoch),
        }
    }

    /// Waits until change `number` and every change before it are durable.
    pub async fn durable(&self, number: u64) -> Result<(), StoreError> {
        match self {
            Backing::DataDir(commits) => commits.durable(number).await,
            Backing::Redis(redis) => redis.durable(number).await,
        }
    }

    /// The number of the last change the backing's reads see (the data dir's database lags
    /// its commit log; Redis lags the outage journal).
    pub fn readable_number(&self) -> u64 {
        match self {
            Backing::DataDir(commits) => commits.applied_number(),
            Backing::Redis(redis) => redis.landed_number(),
        }
    }

    /// Waits until the backing's reads see everything acknowledged so far.
    pub async fn caught_up(&self) -> Result<(), StoreError> {
        match self {
            Backing::DataDir(commits) => commits.applied(commits.durable_number()).await,
            Backing::Redis(_) => Ok(()),
        }
    }

    pub async fn load_account(&self, account_id: &str) -> Result<Option<AccountState>, StoreError> {
        match self {
            Backing::DataDir(commits) => commits.data().load_account(account_id),
            Backing::Redis(redis) => redis.load_account(account_id).await,
        }
    }

    /// The newest `limit` charges of an account, newest first.
    pub async fn history(
        &self,
        account_id: &str,
        limit: usize,
    ) -> Result<Vec<UsageEvent>, StoreError> {
        self.caught_up().await?;
        match self {
            Backing::DataDir(commits) => commits.data().history(account_id, limit),
            Backing::Redis(redis) => redis.history(account_id, limit).await,
        }
    }

    pub async fn export_read(
        &self,
        read: &ExportRead,
        now: Timestamp,
    ) -> Result<Vec<ExportedEvent>, StoreError> {
        self.caught_up().await?;
        match self {
            Backing::DataDir(commits) => commits.data().export_read(read, now),
            Backing::Redis(redis) => redis.export_read(read).await,
        }
    }

    pub async fn export_ack(
        &self,
        group: &str,
        delivery_ids: &[String],
    ) -> Result<u64, StoreError> {
        self.caught_up().await?;
        match self {
            Backing::DataDir(commits) => commits.data().export_ack(group, delivery_ids),
            Backing::Redis(redis) => redis.export_ack(group, delivery_ids).await,
        }
    }

    /// Why the backing stopped taking changes, if it did.
    pub fn failure(&self) -> Option<&str> {
        match self {
            Backing::DataDir(commits) => commits.failure(),
            Backing::Redis(redis) => redis.failure(),
        }
    }

    /// Batches written and the changes they held, since start.
    pub fn written(&self) -> (usize, usize) {
        match self {
            Backing::DataDir(commits) => commits.written(),
            Backing::Redis(redis) => redis.written(),
        }
    }

    /// The data dir's size on disk, if the backing is a data dir.
    pub fn disk_space(&self) -> Option<u64> {
        match self {
            Backing::DataDir(commits) => Some(commits.data().disk_space()),
            Backing::Redis(_) => None,
        }
    }
}
