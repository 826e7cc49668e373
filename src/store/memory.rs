//! The embedded store: decisions on in-memory account state, one account's [`AccountState`] in
//! a sharded concurrent map, optionally backed by a data dir that makes them durable.
//!
//! An operation holds the write lock of the account's shard while the domain method runs (a few
//! microseconds, no I/O, no await), which makes it atomic for that account; accounts in other
//! shards proceed in parallel.
//!
//! With a data dir ([`MemoryStore::open`]) the store is the engine the issue calls "decide,
//! batch, commit, answer": still under the lock, the account's new persisted form and the
//! charges it made are queued for `GroupCommit`; the lock is released, and the call is
//! answered once the batch holding its change is on disk. Accounts are loaded on first use and
//! leave memory when idle (once their last change is on disk), so start-up does not grow with
//! the number of accounts and memory holds only what decisions need; usage history and the
//! export live in the data dir. Any call that reads an account waits for the account's last
//! queued change to be durable, so nothing not yet on disk is ever shown.
//!
//! Without one everything lives in this process and nothing survives a restart: for trials and
//! tests. The Envoy RLS counters are in memory either way (they count seconds to minutes).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use dashmap::mapref::one::RefMut;

use super::backing::Backing;
use super::data_dir::{Change, DataDir, DataDirError, PurchaseIndex};
use super::export_log::ExportLog;
use super::group_commit::GroupCommit;
use super::redis::RedisSettings;
use super::redis::owned::{Hooks, OwnedRedis, OwnedSettings, counter_partition, partition_of};
use super::redis::storage::OwnedStorage;
use super::rls_counters::{Counted, RlsCounters};
use super::{
    DataDirStats, ExportRead, OutageStats, Store, StoreError, StoreHealth, account_not_found,
};
use crate::domain::notice::Notice;
use crate::domain::rls::{CounterCheck, CounterStatus};
use crate::domain::time::SECOND_MS;
use crate::domain::top_up::Purchase;
use crate::domain::{
    Account, AccountState, CommitCommand, CommitOutcome, DomainError, ExportedEvent, GrantCommand,
    GrantOutcome, Micros, Policy, ReleaseCommand, ReleaseOutcome, ReserveCommand, ReserveOutcome,
    RevokeCommand, RevokeOutcome, SetTopUpCommand, SettleTopUpCommand, Timestamp, TopUpOutcome,
    TopUpPreview, UsageSnapshot,
};
use crate::rules::LiveRules;

/// Where and how a memory store keeps its data dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDirSettings {
    pub path: PathBuf,
    /// Changes queued and not yet on disk past which calls are refused with UNAVAILABLE.
    pub max_unflushed: usize,
    /// Longest wait for a call's batch to reach the disk.
    pub write_timeout: Duration,
    /// An account unused for this long leaves memory (it is reloaded on its next use).
    pub evict_idle: Duration,
    /// The database's block cache, in bytes.
    pub cache_bytes: u64,
    /// The size of each commit log segment.
    pub log_segment_bytes: u64,
}

impl DataDirSettings {
    pub fn new(path: impl Into<PathBuf>) -> DataDirSettings {
        DataDirSettings {
            path: path.into(),
            max_unflushed: 20_000,
            write_timeout: Duration::from_millis(2_000),
            evict_idle: Duration::from_secs(600),
            cache_bytes: 64 << 20,
            log_segment_bytes: 64 << 20,
        }
    }
}

#[derive(Debug)]
pub struct MemoryStore {
    /// Each operation decides on the policy current when it takes the account's lock.
    rules: Arc<LiveRules>,
    accounts: Arc<DashMap<String, Resident>>,
    /// The data dir behind memory, if any.
    durable: Option<Durable>,
    /// The export, when there is no data dir.
    export: ExportLog,
    /// Open reservations of all accounts, kept by every operation (it sees the account's count
    /// before and after, under the account's lock).
    open_holds: Arc<AtomicI64>,
    /// Envoy RLS counters (on Redis, those of the partitions held here).
    rls: Arc<RlsCounters>,
    /// Accounts the maintenance pass must visit, kept like `open_holds`: those with an auto
    /// top-up purchase in flight or notifications not yet delivered, and since when (the
    /// earlier of the purchase's start and the oldest notification). The once-a-second look
    /// for stalled purchases and pending notifications reads this, not every account: walking
    /// millions of accounts holds each shard's lock for milliseconds, and every decision on
    /// that shard would wait behind it. The data dir and Redis keep it as their purchase
    /// index, so it is whole again after a restart.
    purchases: Arc<DashMap<String, Timestamp>>,
    /// Notifications dropped undelivered since start: recorded while their account already
    /// held as many undelivered as it keeps, which drops its oldest.
    notices_dropped: AtomicU64,
}

#[derive(Debug)]
struct Durable {
    backing: Backing,
    evict_idle_ms: i64,
    /// Bumped before each eviction pass: a load that read the data dir while one ran reads
    /// again, so it never brings back a state older than one a decision has since written.
    evictions: AtomicU64,
    /// When the last eviction pass ran (milliseconds).
    last_eviction: AtomicI64,
}

/// An account in memory.
#[derive(Debug)]
struct Resident {
    /// Boxed: the map's table then holds a pointer per slot, not a whole account, so its spare
    /// capacity costs little (it matters at millions of accounts).
    state: Box<AccountState>,
    /// The number of its last change queued for the data dir (0: none).
    last_change: u64,
    last_used: Timestamp,
    /// On Redis, the epoch of its partition it was read under: an account from
    /// an epoch that ended (the partition went to another replica and came back) is read again.
    epoch: u64,
    /// The last Redis outage it was decided in, and its credit exposure when that began.
    outage: Option<(u64, Micros)>,
}

/// Shards of the accounts map: DashMap's default (four per core), but at least 64. A shard
/// grows by moving everything it holds into a table twice the size, under its lock, and every
/// call on its accounts waits meanwhile: with 8 shards (the default on two cores) the longest
/// Reserve while 1.6 million accounts were made was 112–127 ms, with 64 shards 41–45 ms
/// (`bench/README.md`). More shards cost a few kilobytes.
fn account_shards() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores * 4).next_power_of_two().max(64)
}

impl Resident {
    fn new(state: AccountState, now: Timestamp) -> Resident {
        Resident {
            state: Box::new(state),
            last_change: 0,
            last_used: now,
            epoch: 0,
            outage: None,
        }
    }
}

/// What the store keeps indexed about an account, read before and after each operation.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Indexed {
    holds: usize,
    /// Since when the maintenance pass must visit the account (see `MemoryStore::purchases`).
    due: Option<Timestamp>,
    /// Notifications recorded: one recorded by a read (a lot expiring) is written too.
    notices: u64,
    /// Notifications not yet delivered: beside `notices`, how many a decision dropped.
    pending: usize,
}

impl Indexed {
    fn of(state: &AccountState) -> Indexed {
        let purchase = state.top_up_in_flight().map(|p| p.started_at);
        let due = match (purchase, state.oldest_notice()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Indexed {
            holds: state.open_holds(),
            due,
            notices: state.notices_recorded(),
            pending: state.pending_notices().count(),
        }
    }
}

/// Whether an operation changes the account (and so is written to the data dir) or only reads
/// it (written only if time changed what the store indexes, such as a hold expiring).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Effect {
    Writes,
    Reads,
}

/// The account to run an operation on, and what to do when it does not exist yet.
enum Missing<'a> {
    NotFound,
    Create(&'a (dyn Fn() -> Account + Sync)),
}

impl MemoryStore {
    /// A store deciding by `policy`, for good, in memory only.
    pub fn new(policy: Arc<Policy>) -> Self {
        MemoryStore::with_rules(LiveRules::fixed(policy))
    }

    /// A store deciding by whatever `rules` hold when each operation runs (they may be
    /// reloaded), in memory only: nothing survives a restart.
    pub fn with_rules(rules: Arc<LiveRules>) -> Self {
        MemoryStore {
            export: ExportLog::new(),
            rules,
            accounts: Arc::new(DashMap::with_shard_amount(account_shards())),
            durable: None,
            open_holds: Arc::new(AtomicI64::new(0)),
            rls: Arc::new(RlsCounters::default()),
            purchases: Arc::new(DashMap::new()),
            notices_dropped: AtomicU64::new(0),
        }
    }

    /// A store whose decisions are made durable in the data dir `settings` names (created if
    /// missing), continuing from what it holds.
    pub fn open(rules: Arc<LiveRules>, settings: &DataDirSettings) -> Result<Self, DataDirError> {
        let (data, log) = DataDir::open(
            &settings.path,
            settings.cache_bytes,
            settings.log_segment_bytes,
        )?;
        let data = Arc::new(data);
        let open_err = |e: StoreError| DataDirError::Open {
            path: settings.path.clone(),
            reason: e.to_string(),
        };
        let counters = data.counters().map_err(open_err)?;
        let purchases = data.purchases().map_err(open_err)?;
        let commits = GroupCommit::start(data, log, settings.max_unflushed, settings.write_timeout)
            .map_err(open_err)?;
        let store = MemoryStore::with_rules(rules);
        store
            .open_holds
            .store(counters.open_holds, Ordering::Relaxed);
        for (account_id, started) in purchases {
            store.purchases.insert(account_id, started);
        }
        Ok(store.backed_by(Backing::DataDir(commits), settings.evict_idle))
    }

    /// A store whose decisions are made durable in Redis, on the partitions of its key prefix
    /// that fall to this replica ([`OwnedRedis`]), continuing from what Redis holds.
    pub async fn open_on_redis(
        rules: Arc<LiveRules>,
        redis: &RedisSettings,
        owned: &OwnedSettings,
    ) -> Result<Self, StoreError> {
        let store = MemoryStore::with_rules(rules);
        let hooks = store.owner_hooks(owned.partitions);
        let backing = OwnedRedis::open(redis, owned, hooks).await?;
        Ok(store.backed_by(Backing::Redis(backing), owned.evict_idle))
    }

    /// A store deciding as it does on Redis, over another storage (the simulation's
    /// model of it), as replica `replica` with its keys under `prefix`.
    pub async fn open_over(
        rules: Arc<LiveRules>,
        storage: Arc<dyn OwnedStorage>,
        prefix: &str,
        owned: &OwnedSettings,
        replica: String,
    ) -> Result<Self, StoreError> {
        let store = MemoryStore::with_rules(rules);
        let hooks = store.owner_hooks(owned.partitions);
        let backing = OwnedRedis::over(storage, prefix, owned, hooks, replica).await?;
        Ok(store.backed_by(Backing::Redis(backing), owned.evict_idle))
    }

    /// What the owner of partitions tells this store when one comes or goes.
    fn owner_hooks(&self, partitions: u16) -> Hooks {
        let store = self;
        let partitions = partitions.max(1);
        Hooks {
            came: Box::new({
                let (indexed, holds) = (store.purchases.clone(), store.open_holds.clone());
                move |_, purchases, open| {
                    for (account_id, started) in purchases {
                        indexed.insert(account_id, started);
                    }
                    holds.fetch_add(open, Ordering::Relaxed);
                }
            }),
            gone: Box::new({
                let (accounts, indexed) = (store.accounts.clone(), store.purchases.clone());
                let (holds, counters) = (store.open_holds.clone(), store.rls.clone());
                move |partition, open| {
                    let elsewhere = |id: &String| partition_of(id, partitions) != partition;
                    accounts.retain(|id, _| elsewhere(id));
                    indexed.retain(|id, _| elsewhere(id));
                    holds.fetch_sub(open, Ordering::Relaxed);
                    counters.forget(|domain| counter_partition(domain, partitions) == partition);
                }
            }),
        }
    }

    /// The partitions this replica owns, on Redis.
    pub fn owned_partitions(&self) -> Option<usize> {
        match &self.durable.as_ref()?.backing {
            Backing::Redis(redis) => Some(redis.held()),
            Backing::DataDir(_) => None,
        }
    }

    fn backed_by(self, backing: Backing, evict_idle: Duration) -> Self {
        MemoryStore {
            durable: Some(Durable {
                backing,
                evict_idle_ms: i64::try_from(evict_idle.as_millis()).unwrap_or(i64::MAX),
                evictions: AtomicU64::new(0),
                last_eviction: AtomicI64::new(i64::MIN),
            }),
            ..self
        }
    }

    /// Accounts in memory now.
    pub fn resident_accounts(&self) -> usize {
        self.accounts.len()
    }

    /// The account in memory, loaded from the data dir if it is there, or made by `missing`;
    /// with `epoch`, read again if what memory holds is from another epoch of its partition.
    async fn resident(
        &self,
        account_id: &str,
        missing: Missing<'_>,
        now: Timestamp,
        epoch: Option<u64>,
    ) -> Result<RefMut<'_, String, Resident>, StoreError> {
        // Epochs of a partition only grow. A resident from an older epoch than the decision's
        // is stale (the partition went away and came back) and is read again; a decision
        // from an older epoch than the resident's was admitted before the partition moved,
        // and must neither decide on nor drop the newer state (whose changes may not be
        // written yet): it is refused, as its write would be.
        let moved = || {
            StoreError::Unavailable(
                "the account's partition moved while this call waited; it did not happen, and \
                 may be asked again"
                    .into(),
            )
        };
        loop {
            if let Some(mut resident) = self.accounts.get_mut(account_id) {
                match epoch.map(|e| resident.epoch.cmp(&e)) {
                    None | Some(std::cmp::Ordering::Equal) => {
                        resident.last_used = now;
                        return Ok(resident);
                    }
                    Some(std::cmp::Ordering::Greater) => return Err(moved()),
                    Some(std::cmp::Ordering::Less) => {}
                }
                drop(resident);
                self.accounts
                    .remove_if(account_id, |_, r| epoch.is_some_and(|e| r.epoch < e));
                continue;
            }
            let (generation, stored) = match &self.durable {
                Some(durable) => {
                    let generation = durable.evictions.load(Ordering::Acquire);
                    (generation, durable.backing.load_account(account_id).await?)
                }
                None => (0, None),
            };
            let state = match (stored, &missing) {
                (Some(state), _) => state,
                (None, Missing::Create(make)) => AccountState::new(make()),
                (None, Missing::NotFound) => return Err(account_not_found(account_id)),
            };
            match self.accounts.entry(account_id.to_owned()) {
                Entry::Occupied(entry) => {
                    // Loaded meanwhile by another call; of this epoch, it is as fresh as ours
                    // and may hold more. Otherwise go round again and sort it out above.
                    if epoch.is_none_or(|e| entry.get().epoch == e) {
                        let mut resident = entry.into_ref();
                        resident.last_used = now;
                        return Ok(resident);
                    }
                }
                Entry::Vacant(entry) => {
                    let raced = self
                        .durable
                        .as_ref()
                        .is_some_and(|d| d.evictions.load(Ordering::Acquire) != generation);
                    if !raced {
                        let mut resident = Resident::new(state, now);
                        resident.epoch = epoch.unwrap_or(0);
                        return Ok(entry.insert(resident));
                    }
                }
            }
        }
    }

    /// Runs `op` on an account whose shard lock the caller holds, brings the store's indexes up
    /// to date with what it changed and, with a data dir, queues the change.
    ///
    /// Decided while Redis does not answer (`outage`: its number and the credit allowance), an
    /// operation that would raise the account's credit exposure past the allowance over the
    /// outage is undone and refused: nothing changes.
    fn apply<T>(
        &self,
        account_id: &str,
        resident: &mut Resident,
        policy: &Policy,
        effect: Effect,
        outage: Option<(u64, Micros)>,
        op: impl FnOnce(&mut AccountState, &Policy) -> T,
    ) -> Result<T, StoreError> {
        let before = Indexed::of(&resident.state);
        // Only while Redis is out: a copy to undo with.
        let undo = outage.map(|_| (resident.state.clone(), resident.state.credit_exposure()));
        let result = op(&mut resident.state, policy);
        if let (Some((number, allowance)), Some((earlier, exposure))) = (outage, undo) {
            let base = match resident.outage {
                Some((seen, base)) if seen == number => base,
                _ => exposure,
            };
            let now = resident.state.credit_exposure();
            if now > exposure && now - base > allowance {
                resident.state = earlier;
                return Err(StoreError::Unavailable(format!(
                    "Redis does not answer, and this would take account {account_id:?}'s \
                     credits spent and held to {} micro-credits over the outage, past the \
                     outage credit allowance of {allowance}; try again once Redis answers",
                    now - base
                )));
            }
            resident.outage = Some((number, base));
        }
        let after = Indexed::of(&resident.state);
        if after.notices != before.notices {
            // Nothing is delivered within a decision: what was recorded and is not pending
            // was dropped.
            let recorded = after.notices - before.notices;
            let kept = after.pending.saturating_sub(before.pending);
            let dropped = recorded.saturating_sub(kept as u64);
            if dropped > 0 {
                self.notices_dropped.fetch_add(dropped, Ordering::Relaxed);
                tracing::warn!(
                    account_id,
                    dropped,
                    "dropped an account's oldest undelivered notification: it held {} already \
                     (the webhook receiver has not taken them)",
                    crate::domain::notice::MAX_PENDING
                );
            }
        }
        let holds_delta = after.holds as i64 - before.holds as i64;
        let purchase = if before.due == after.due {
            PurchaseIndex::Unchanged
        } else {
            match after.due {
                Some(started) => {
                    self.purchases.insert(account_id.to_owned(), started);
                    PurchaseIndex::Started(started)
                }
                None => {
                    self.purchases.remove(account_id);
                    PurchaseIndex::Ended
                }
            }
        };
        if holds_delta != 0 {
            self.open_holds.fetch_add(holds_delta, Ordering::Relaxed);
        }
        if let Some(durable) = &self.durable {
            let events = resident.state.take_recent();
            if effect == Effect::Writes || before != after || !events.is_empty() {
                let mut change = Change::new(account_id, &mut resident.state);
                change.events = events;
                change.recent_keep = policy.limits.recent_events;
                change.export_keep = policy.limits.export_max_len;
                change.holds_delta = holds_delta;
                change.purchase = purchase;
                resident.last_change = durable.backing.submit(change, resident.epoch);
            }
        }
        Ok(result)
    }

    /// Runs `op` on an account as one atomic step and answers once what it changed is durable.
    async fn run<T>(
        &self,
        account_id: &str,
        missing: Missing<'_>,
        effect: Effect,
        now: Timestamp,
        op: impl FnOnce(&mut AccountState, &Policy) -> Result<T, DomainError>,
    ) -> Result<T, StoreError> {
        let admission = match &self.durable {
            Some(durable) => durable.backing.admit(account_id).await?,
            None => None,
        };
        let epoch = admission.as_ref().map_or(0, |a| a.epoch());
        let outage = admission.as_ref().and_then(|a| a.outage());
        let (result, change) = {
            let rules = self.rules.snapshot();
            let mut resident = self.resident(account_id, missing, now, Some(epoch)).await?;
            let result = self.apply(account_id, &mut resident, &rules.policy, effect, outage, op);
            (result?, resident.last_change)
        };
        drop(admission);
        if let Some(durable) = &self.durable {
            durable.backing.durable(change).await?;
        }
        Ok(result?)
    }

    /// Envoy RLS on Redis: the owner of the domain's partition decides in memory
    /// (another replica is refused with the owner's address, and the call forwarded there),
    /// reading each counter from Redis the first time it counts under the partition's epoch.
    /// What a request changed is written behind, by the same batches as accounts' changes, and
    /// the answer does not wait for it: counters are not money, and a rate limit gains at most
    /// a batch's worth of requests (a millisecond or so) if the owner dies before its write.
    async fn owned_rls_check(
        &self,
        redis: &OwnedRedis,
        domain: &str,
        checks: &[CounterCheck],
        now: Timestamp,
    ) -> Result<Vec<CounterStatus>, StoreError> {
        let admission = redis
            .admit_partition(counter_partition(domain, redis.partitions()))
            .await?;
        let epoch = admission.epoch();
        // Twice at most: a counter pruned between its reading and the step is read again.
        for _ in 0..3 {
            match self.rls.check_and_count_under(domain, checks, now, epoch) {
                Counted::Done(statuses, changed) => {
                    if !changed.is_empty() {
                        redis.submit(redis.counter_write(domain, changed), epoch);
                    }
                    return Ok(statuses);
                }
                Counted::Missing(keys) => {
                    let unit_of = |key: &str| {
                        let check = checks.iter().find(|c| c.key == key);
                        check.map_or(crate::domain::rls::RlsUnit::Second, |c| c.unit)
                    };
                    let read = redis
                        .load_counters(domain, &keys, |key| unit_of(key).window())
                        .await?;
                    self.rls.install(domain, read, epoch);
                }
                Counted::Stale => break,
            }
        }
        Err(StoreError::Unavailable(
            "the rate limit's partition moved while this call waited; nothing was counted, \
             and it may be asked again"
                .into(),
        ))
    }

    /// Leaves out of memory the accounts idle since `now − evict_idle` whose changes are all
    /// in the database. Runs at most once per quarter of `evict_idle` (a pass visits every account).
    fn evict_idle(&self, now: Timestamp) {
        let Some(durable) = &self.durable else {
            return;
        };
        let last = durable.last_eviction.load(Ordering::Relaxed);
        if now.as_millis().saturating_sub(last) < (durable.evict_idle_ms / 4).max(SECOND_MS) {
            return;
        }
        durable
            .last_eviction
            .store(now.as_millis(), Ordering::Relaxed);
        let on_disk = durable.backing.readable_number();
        let idle_since = now.plus_millis(-durable.evict_idle_ms);
        durable.evictions.fetch_add(1, Ordering::AcqRel);
        self.accounts.retain(|_, resident| {
            resident.last_used > idle_since || resident.last_change > on_disk
        });
    }
}

impl Store for MemoryStore {
    async fn reserve(
        &self,
        cmd: &ReserveCommand,
        now: Timestamp,
    ) -> Result<ReserveOutcome, StoreError> {
        let new_account = || Account {
            id: cmd.account_id.clone(),
            plan: crate::domain::intern(
                cmd.plan_hint
                    .as_deref()
                    .unwrap_or(&self.rules.snapshot().policy.default_plan),
            ),
            credit_purchase_allowed: true,
        };
        self.run(
            &cmd.account_id,
            Missing::Create(&new_account),
            Effect::Writes,
            now,
            |state, policy| state.reserve(policy, cmd, now),
        )
        .await
    }

    async fn commit(
        &self,
        cmd: CommitCommand,
        now: Timestamp,
    ) -> Result<CommitOutcome, StoreError> {
        let durable = self.durable.is_some();
        self.run(
            &cmd.account_id,
            Missing::NotFound,
            Effect::Writes,
            now,
            |state, policy| {
                let outcome = state.commit(policy, &cmd, now)?;
                // Under the account's lock, so the export holds the account's events in order.
                // With a data dir, the event goes out with the account's change instead.
                if let (Some(event), false) = (&outcome.event, durable) {
                    let max_len = policy.limits.export_max_len;
                    self.export.append(&cmd.account_id, event.clone(), max_len);
                }
                Ok(outcome)
            },
        )
        .await
    }

    async fn release(
        &self,
        cmd: ReleaseCommand,
        now: Timestamp,
    ) -> Result<ReleaseOutcome, StoreError> {
        self.run(
            &cmd.account_id,
            Missing::NotFound,
            Effect::Writes,
            now,
            |state, policy| state.release(policy, &cmd, now),
        )
        .await
    }

    async fn grant(&self, cmd: GrantCommand, now: Timestamp) -> Result<GrantOutcome, StoreError> {
        self.run(
            &cmd.account_id,
            Missing::NotFound,
            Effect::Writes,
            now,
            |state, policy| state.grant(policy, &cmd, now),
        )
        .await
    }

    async fn revoke_grant(
        &self,
        cmd: RevokeCommand,
        now: Timestamp,
    ) -> Result<RevokeOutcome, StoreError> {
        self.run(
            &cmd.account_id,
            Missing::NotFound,
            Effect::Writes,
            now,
            |state, policy| state.revoke(policy, &cmd, now),
        )
        .await
    }

    async fn set_top_up(
        &self,
        cmd: SetTopUpCommand,
        now: Timestamp,
    ) -> Result<TopUpOutcome, StoreError> {
        self.run(
            &cmd.account_id,
            Missing::NotFound,
            Effect::Writes,
            now,
            |state, policy| state.set_top_up(policy, &cmd, now),
        )
        .await
    }

    async fn preview_top_up(
        &self,
        cmd: SetTopUpCommand,
        now: Timestamp,
    ) -> Result<TopUpPreview, StoreError> {
        self.run(
            &cmd.account_id,
            Missing::NotFound,
            Effect::Reads,
            now,
            |state, policy| {
                state.settle(policy, now);
                state.preview_top_up(policy, &cmd, now)
            },
        )
        .await
    }

    async fn settle_top_up(
        &self,
        cmd: SettleTopUpCommand,
        now: Timestamp,
    ) -> Result<TopUpOutcome, StoreError> {
        self.run(
            &cmd.account_id,
            Missing::NotFound,
            Effect::Writes,
            now,
            |state, policy| state.settle_top_up(policy, &cmd, now),
        )
        .await
    }

    async fn upsert_account(
        &self,
        account: Account,
        now: Timestamp,
    ) -> Result<Account, StoreError> {
        let new_account = || account.clone();
        self.run(
            &account.id,
            Missing::Create(&new_account),
            Effect::Writes,
            now,
            |state, policy| {
                state.settle(policy, now);
                state.update_account(account.plan.clone(), account.credit_purchase_allowed);
                Ok(state.account().clone())
            },
        )
        .await
    }

    async fn account(&self, account_id: &str) -> Result<Account, StoreError> {
        let admission = match &self.durable {
            Some(durable) => durable.backing.admit(account_id).await?,
            None => None,
        };
        let epoch = admission.as_ref().map_or(0, |a| a.epoch());
        let (account, change) = {
            let in_memory = self.accounts.get(account_id).filter(|r| r.epoch == epoch);
            let resident = match in_memory {
                Some(resident) => resident,
                None => self
                    .resident(
                        account_id,
                        Missing::NotFound,
                        Timestamp::from_millis(0),
                        Some(epoch),
                    )
                    .await?
                    .downgrade(),
            };
            (resident.state.account().clone(), resident.last_change)
        };
        drop(admission);
        if let Some(durable) = &self.durable {
            durable.backing.durable(change).await?;
        }
        Ok(account)
    }

    async fn usage(
        &self,
        account_id: &str,
        recent_limit: usize,
        now: Timestamp,
    ) -> Result<UsageSnapshot, StoreError> {
        let (mut snapshot, keep) = self
            .run(
                account_id,
                Missing::NotFound,
                Effect::Reads,
                now,
                |state, policy| {
                    state.settle(policy, now);
                    let snapshot = state.snapshot(policy, recent_limit)?;
                    Ok((snapshot, policy.limits.recent_events as usize))
                },
            )
            .await?;
        if let Some(durable) = &self.durable {
            snapshot.recent = (durable.backing)
                .history(account_id, recent_limit.min(keep))
                .await?;
        }
        Ok(snapshot)
    }

    async fn account_status(
        &self,
        account_id: &str,
        now: Timestamp,
    ) -> Result<UsageSnapshot, StoreError> {
        let redis = match self.durable.as_ref().map(|d| &d.backing) {
            Some(Backing::Redis(redis)) => redis,
            _ => return self.usage(account_id, 0, now).await,
        };
        match self.usage(account_id, 0, now).await {
            Err(StoreError::Moved { .. }) => {}
            answered => return answered,
        }
        let mut state =
            (redis.load_account(account_id).await?).ok_or_else(|| account_not_found(account_id))?;
        let rules = self.rules.snapshot();
        state.settle(&rules.policy, now);
        Ok(state.snapshot(&rules.policy, 0)?)
    }

    async fn rls_check(
        &self,
        domain: &str,
        checks: &[CounterCheck],
        now: Timestamp,
    ) -> Result<Vec<CounterStatus>, StoreError> {
        match self.durable.as_ref().map(|d| &d.backing) {
            Some(Backing::Redis(redis)) => self.owned_rls_check(redis, domain, checks, now).await,
            _ => Ok(self.rls.check_and_count(domain, checks, now)),
        }
    }

    fn maintenance_interval(&self) -> Option<Duration> {
        Some(Duration::from_secs(1))
    }

    async fn maintain(&self, now: Timestamp) {
        self.rls.prune(now);
        self.evict_idle(now);
    }

    fn owns_every_account(&self) -> bool {
        match self.durable.as_ref().map(|d| &d.backing) {
            Some(Backing::Redis(redis)) => redis.owns_every_partition(),
            _ => true,
        }
    }

    fn health(&self) -> StoreHealth {
        let Some(durable) = &self.durable else {
            return StoreHealth::Up;
        };
        if let Some(reason) = durable.backing.failure() {
            return StoreHealth::Down {
                error: reason.to_owned(),
            };
        }
        // Down only once calls are refused: within the outage grace this replica decides.
        if let Backing::Redis(redis) = &durable.backing
            && let (_, Some(out_for)) = redis.outage()
            && out_for >= redis.outage_grace()
        {
            return StoreHealth::Down {
                error: format!(
                    "Redis has not answered for {} ms (outage grace {} ms)",
                    out_for.as_millis(),
                    redis.outage_grace().as_millis()
                ),
            };
        }
        // Without a grace, a Redis that does not answer the ownership rounds is down for this
        // replica even while it has nothing to write (its next decision would be refused).
        if let Backing::Redis(redis) = &durable.backing
            && redis.outage_grace().is_zero()
            && let Some(why) = redis.round_failing()
        {
            return StoreHealth::Down {
                error: format!("Redis does not answer this replica: {why}"),
            };
        }
        StoreHealth::Up
    }

    fn outage_stats(&self) -> Option<OutageStats> {
        match &self.durable.as_ref()?.backing {
            Backing::Redis(redis) => Some(redis.outage().0),
            Backing::DataDir(_) => None,
        }
    }

    fn notices_dropped(&self) -> u64 {
        self.notices_dropped.load(Ordering::Relaxed)
    }

    fn retried_calls(&self) -> u64 {
        match self.durable.as_ref().map(|d| &d.backing) {
            Some(Backing::Redis(redis)) => redis.retried_writes(),
            _ => 0,
        }
    }

    fn resident_accounts(&self) -> Option<u64> {
        self.durable.as_ref().map(|_| self.accounts.len() as u64)
    }

    fn data_dir_stats(&self) -> Option<DataDirStats> {
        let backing = &self.durable.as_ref()?.backing;
        let (batches, changes) = backing.written();
        Some(DataDirStats {
            bytes: backing.disk_space()?,
            batches: batches as u64,
            changes: changes as u64,
        })
    }

    fn open_holds(&self) -> Option<u64> {
        u64::try_from(self.open_holds.load(Ordering::Relaxed)).ok()
    }

    async fn export_read(
        &self,
        read: ExportRead,
        now: Timestamp,
    ) -> Result<Vec<ExportedEvent>, StoreError> {
        match &self.durable {
            Some(durable) => durable.backing.export_read(&read, now).await,
            None => Ok(self.export.read(&read, now)),
        }
    }

    async fn export_ack(&self, group: &str, delivery_ids: &[String]) -> Result<u64, StoreError> {
        match &self.durable {
            Some(durable) => durable.backing.export_ack(group, delivery_ids).await,
            None => Ok(self.export.ack(group, delivery_ids)),
        }
    }

    async fn pending_notices(&self) -> Result<Vec<(String, Vec<Notice>)>, StoreError> {
        let due: Vec<String> = (self.purchases.iter())
            .map(|entry| entry.key().clone())
            .collect();
        let mut found = Vec::new();
        for account_id in due {
            let (notices, change) = {
                let resident = match self.accounts.get(&account_id) {
                    Some(resident) => resident,
                    None => match self
                        .resident(
                            &account_id,
                            Missing::NotFound,
                            Timestamp::from_millis(0),
                            None,
                        )
                        .await
                    {
                        Ok(resident) => resident.downgrade(),
                        Err(_) => continue,
                    },
                };
                let notices: Vec<Notice> = resident.state.pending_notices().cloned().collect();
                (notices, resident.last_change)
            };
            if notices.is_empty() {
                continue;
            }
            // Only what is durable: a notice whose decision never reached the backing store
            // (the write failed, or is still on its way) is not news yet.
            if let Some(durable) = &self.durable
                && durable.backing.durable(change).await.is_err()
            {
                continue;
            }
            found.push((account_id, notices));
        }
        Ok(found)
    }

    async fn notice_delivered(
        &self,
        account_id: &str,
        seq: u64,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        self.run(
            account_id,
            Missing::NotFound,
            Effect::Writes,
            now,
            |state, policy| {
                state.settle(policy, now);
                Ok(state.notice_delivered(seq))
            },
        )
        .await
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
        let mut found = Vec::new();
        for account_id in stalled {
            let purchase = {
                let resident = match self.accounts.get(&account_id) {
                    Some(resident) => resident,
                    None => match self
                        .resident(&account_id, Missing::NotFound, started_before, None)
                        .await
                    {
                        Ok(resident) => resident.downgrade(),
                        Err(_) => continue,
                    },
                };
                resident.state.top_up_in_flight().cloned()
            };
            if let Some(purchase) = purchase.filter(|p| p.started_at <= started_before) {
                found.push((account_id, purchase));
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::time::MINUTE_MS;
    use crate::domain::{Decision, PriceSheet, Usage};

    const T0: Timestamp = Timestamp::from_millis(1_795_557_600_000);

    fn reserve(account: &str, request: &str) -> ReserveCommand {
        let estimate = Usage {
            model: "gpt-5.5-mini".into(),
            output_tokens: 5_000,
            ..Usage::default()
        };
        ReserveCommand {
            account_id: account.into(),
            request_id: request.into(),
            product: "codex".into(),
            cost: PriceSheet::default().price(&estimate).unwrap(),
            estimate,
            plan_hint: Some("plus".into()),
            ttl_ms: 15 * MINUTE_MS,
            reservation_id: format!("rsv-{request}"),
            wait_for_top_up: false,
        }
    }

    fn commit(reserved: &ReserveCommand) -> CommitCommand {
        CommitCommand {
            account_id: reserved.account_id.clone(),
            reservation_id: reserved.reservation_id.clone(),
            usage: reserved.estimate.clone(),
            cost: reserved.cost,
            is_final: true,
            price_version: PriceSheet::default().version,
        }
    }

    fn open(dir: &std::path::Path) -> MemoryStore {
        let mut settings = DataDirSettings::new(dir);
        settings.evict_idle = Duration::from_secs(60);
        MemoryStore::open(LiveRules::fixed(Arc::new(Policy::default())), &settings).unwrap()
    }

    #[tokio::test]
    async fn idle_accounts_leave_memory_and_come_back_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for (i, account) in ["a", "b"].into_iter().enumerate() {
            let cmd = reserve(account, &format!("q{i}"));
            let out = store.reserve(&cmd, T0).await.unwrap();
            assert!(matches!(out.decision, Decision::Allow { .. }));
            store.commit(commit(&cmd), T0).await.unwrap();
        }
        let before = store.usage("a", 10, T0).await.unwrap();
        assert_eq!(before.recent.len(), 1, "history is read from the data dir");

        // "b" stays in use; "a" is idle past a minute.
        store.maintain(T0.plus_millis(61_000)).await;
        store
            .reserve(&reserve("b", "q9"), T0.plus_millis(61_000))
            .await
            .unwrap();
        store.maintain(T0.plus_millis(120_000)).await;
        assert_eq!(store.resident_accounts(), 1, "only the busy account stays");
        let after = store.usage("a", 10, T0).await.unwrap();
        assert_eq!(after, before);
        assert_eq!(store.resident_accounts(), 2, "read back on use");
    }

    #[tokio::test]
    async fn a_reopened_data_dir_keeps_what_was_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = reserve("a", "q1");
        let (first, before) = {
            let store = open(dir.path());
            let first = store.reserve(&cmd, T0).await.unwrap();
            (first, store.usage("a", 10, T0).await.unwrap())
        };
        let store = open(dir.path());
        assert_eq!(store.usage("a", 10, T0).await.unwrap(), before);
        assert_eq!(store.open_holds(), Some(1));
        // The retry is answered from the record the data dir kept, not decided again.
        assert_eq!(store.reserve(&cmd, T0).await.unwrap(), first);
        store.commit(commit(&cmd), T0).await.unwrap();
        assert_eq!(store.open_holds(), Some(0));
    }

    #[tokio::test]
    async fn undelivered_notifications_survive_a_restart_with_their_ids() {
        let dir = tempfile::tempdir().unwrap();
        // The plus plan's 5-hour window (150 credits) used up: one notification.
        let mut cmd = reserve("a", "q1");
        cmd.estimate.output_tokens = 750_000;
        cmd.cost = PriceSheet::default().price(&cmd.estimate).unwrap();
        let before = {
            let store = open(dir.path());
            store.reserve(&cmd, T0).await.unwrap();
            store.commit(commit(&cmd), T0).await.unwrap();
            let pending = store.pending_notices().await.unwrap();
            assert_eq!(pending.len(), 1, "{pending:?}");
            assert_eq!(pending[0].1[0].kind.type_name(), "window.exhausted");
            pending
        };
        // Read back from the data dir (the index of accounts to visit too), the same ids.
        let store = open(dir.path());
        assert_eq!(store.pending_notices().await.unwrap(), before);
        assert!(store.notice_delivered("a", 1, T0).await.unwrap());
        drop(store);
        let store = open(dir.path());
        assert!(store.pending_notices().await.unwrap().is_empty());
        assert!(store.usage("a", 1, T0).await.is_ok());
    }

    // The guard stalls the writer thread, not a task: holding it across awaits is the point.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_disk_that_cannot_keep_up_gets_unavailable_never_an_unbounded_wait() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = DataDirSettings::new(dir.path());
        settings.max_unflushed = 3;
        settings.write_timeout = Duration::from_millis(300);
        let store = Arc::new(
            MemoryStore::open(LiveRules::fixed(Arc::new(Policy::default())), &settings).unwrap(),
        );
        let Backing::DataDir(commits) = &store.durable.as_ref().unwrap().backing else {
            unreachable!("a data dir store");
        };
        let stalled = commits.stall();
        // The writer takes the first change and stalls on it; two more queue behind it.
        let waiting: Vec<_> = (0..3)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(
                    async move { store.reserve(&reserve("a", &format!("q{i}")), T0).await },
                )
            })
            .collect();
        while commits.unflushed() < 3 {
            tokio::task::yield_now().await;
        }
        // Full: refused at once, before deciding anything.
        let started = std::time::Instant::now();
        let refused = store.reserve(&reserve("a", "q9"), T0).await.unwrap_err();
        assert!(
            matches!(refused, StoreError::Unavailable(ref m) if m.contains("behind")),
            "{refused:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(100));
        // The queued ones wait no longer than the write timeout.
        for call in waiting {
            let err = call.await.unwrap().unwrap_err();
            assert!(
                matches!(err, StoreError::Unavailable(ref m) if m.contains("did not confirm")),
                "{err:?}"
            );
        }
        drop(stalled);
        while commits.unflushed() > 0 {
            tokio::task::yield_now().await;
        }
        // Their decisions stand and are written; a retry gets each one's first answer, and the
        // refused call, never decided, is decided now.
        for i in 0..3 {
            let out = store
                .reserve(&reserve("a", &format!("q{i}")), T0)
                .await
                .unwrap();
            assert!(matches!(out.decision, Decision::Allow { .. }));
        }
        assert_eq!(store.open_holds(), Some(3));
        // (The retries' changes count against the bound until the applier has them.)
        while commits.unflushed() > 0 {
            tokio::task::yield_now().await;
        }
        store.reserve(&reserve("a", "q9"), T0).await.unwrap();
        assert_eq!(store.open_holds(), Some(4));
    }

    #[test]
    fn a_data_dir_in_use_or_of_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let rules = LiveRules::fixed(Arc::new(Policy::default()));
        let second = MemoryStore::open(rules.clone(), &DataDirSettings::new(dir.path()));
        assert!(
            matches!(second, Err(DataDirError::Locked { .. })),
            "{second:?}"
        );
        drop(store);

        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let meta = db
            .keyspace("meta", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        meta.insert("format", 99u16.to_le_bytes()).unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
        drop((meta, db));
        let err = MemoryStore::open(rules, &DataDirSettings::new(dir.path())).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("format 99")
                && message.contains(&format!("format {}", crate::domain::FORMAT_VERSION)),
            "{message}"
        );
    }
}
