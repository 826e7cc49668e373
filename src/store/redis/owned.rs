//! Redis as the backing store of the in-memory engine: the replica that owns an account decides
//! on it in memory with the Rust rules (the [memory store](crate::store::MemoryStore)), and what
//! the decisions changed is written here, in batches, before the calls are answered. Redis
//! keeps state; it holds no quota rule.
//!
//! Accounts fall into `partitions` by the CRC16 of their id. All keys of a partition share one
//! hash tag (`PREFIX:{oN}:…`), so one script call writes a partition's part of a batch
//! atomically, on a Cluster too. Each partition has an owner holding a lease (`…:lease`, with
//! a time to live) under an epoch (`…:fence`, incremented by every acquisition and never
//! reset). Every write carries the epoch it was decided under and is refused (`FENCED`) once
//! another replica has taken the partition: a paused owner that wakes up cannot overwrite its
//! successor. The owner counts its lease from the instant *before* it sent the acquisition or
//! renewal, and stops deciding a tenth of the lease before it could have expired, so that its
//! own clock's drift and a slow answer never let two owners decide at once.
//!
//! A batch is written as one script call per partition it touches (in parallel), each numbered
//! in the partition (kept in `…:fence`), so a call retried after a timeout that had in fact landed is not
//! applied twice. Batches are written in order: the next is taken once every partition of the
//! one before has landed. While Redis cannot be reached, the batch is retried, calls wait at most
//! `write_timeout` and get UNAVAILABLE, and once `max_unflushed` changes wait no new decision is
//! made.
//!
//! The storage scripts (`STORAGE_SCRIPTS` below) take the partition's epoch and batch number and a
//! list of plain writes: set, delete, hash set and delete, append to a list kept to a length,
//! append to a stream kept to a length, add to a hash field. Keys, per partition `{oN}`:
//! - `a:ID`: the account's core (`domain::persisted`, versioned); `r:ID`: a hash of the records
//!   it keeps for retries (field: kind tag and number, big endian); `h:ID`: its newest charges,
//!   a list, oldest first;
//! - `x`: the partition's part of the usage export, a stream read with consumer groups;
//! - `pur`: accounts with an auto top-up purchase in flight and when it started; `meta`: the
//!   partition's count of open holds;
//! - `lease` (owner and epoch, with a time to live) and `fence` (the epoch, never reset, and
//!   the last batch number landed under it): ownership and fencing.
//!
//! `PREFIX:owned-format` holds the persisted format's version; a quotad reading another refuses
//! to start.
//!
//! For now one replica owns every partition: a second one on the same key prefix waits for
//! the leases and gives up with a clear error. Spreading partitions over replicas, and
//! forwarding calls to their owner, come next.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use redis::Script;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use tokio::sync::{Notify, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::{Connection, RedisSettings, connect, keys};
use crate::domain::{
    AccountState, ExportedEvent, FORMAT_VERSION, Timestamp, UsageEvent, decode_account,
    decode_event, encode_event,
};
use crate::store::data_dir::{Change, PurchaseIndex};
use crate::store::{ExportRead, StoreError};

/// The fenced batch write, for one or more partitions (all in one call on a standalone Redis;
/// one partition a call on a Cluster, where a script's keys share a slot). ARGV[1]: how many
/// partitions; then each partition's section: the key index of its fence (a hash of the epoch
/// and the last batch number landed), the epoch the batch was decided under, its number in the
/// partition, how many arguments its writes take, and the writes, each an op, a key index and its arguments. Every fence is
/// checked before anything is written, so a fenced call writes nothing; a partition whose batch
/// number has already landed (a retry) is skipped.
const WRITE: &str = r#"
local sections, at = {}, 2
for _ = 1, tonumber(ARGV[1]) do
  local s = {fence = KEYS[tonumber(ARGV[at])], number = ARGV[at + 2], first = at + 4}
  s.last = at + 3 + tonumber(ARGV[at + 3])
  local fence = redis.call('HMGET', s.fence, 'epoch', 'seq')
  if fence[1] ~= ARGV[at + 1] then
    return redis.error_reply('FENCED partition epoch is ' .. tostring(fence[1]) .. ', not ' .. ARGV[at + 1])
  end
  s.landed = tonumber(fence[2] or '0') >= tonumber(s.number)
  sections[#sections + 1] = s
  at = s.last + 1
end
for _, s in ipairs(sections) do
  if not s.landed then
    local i = s.first
    while i <= s.last do
      local op, key = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
      if op == 'S' then redis.call('SET', key, ARGV[i + 2]); i = i + 3
      elseif op == 'H' then redis.call('HSET', key, ARGV[i + 2], ARGV[i + 3]); i = i + 4
      elseif op == 'h' then redis.call('HDEL', key, ARGV[i + 2]); i = i + 3
      elseif op == 'L' then
        local keep = tonumber(ARGV[i + 3])
        if redis.call('RPUSH', key, ARGV[i + 2]) > keep then
          redis.call('LTRIM', key, -keep, -1)
        end
        i = i + 4
      elseif op == 'X' then
        redis.call('XADD', key, 'MAXLEN', '~', ARGV[i + 3], '*', 'e', ARGV[i + 2]); i = i + 4
      elseif op == 'C' then redis.call('HINCRBY', key, ARGV[i + 2], ARGV[i + 3]); i = i + 4
      else return redis.error_reply('unknown write ' .. op) end
    end
    redis.call('HSET', s.fence, 'seq', s.number)
  end
end
return 1
"#;

/// Takes a partition's lease if nobody else holds it, under the next epoch. KEYS: lease,
/// fence. ARGV: owner, lease in ms. Answers `{1, epoch}` or `{0, holder, ms left}`.
const ACQUIRE: &str = r#"
local holder = redis.call('HGET', KEYS[1], 'owner')
if holder and holder ~= ARGV[1] then
  return {0, holder, redis.call('PTTL', KEYS[1])}
end
local epoch = redis.call('HINCRBY', KEYS[2], 'epoch', 1)
redis.call('HSET', KEYS[2], 'seq', 0)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'epoch', epoch)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, epoch}
"#;

/// Extends a lease still held under its epoch. KEYS: lease. ARGV: epoch, lease in ms.
const RENEW: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Gives a lease up (at shutdown), if still held under its epoch.
const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

/// An account's core and the values of its records. KEYS: core, records.
const LOAD: &str = r#"
return {redis.call('GET', KEYS[1]) or '', redis.call('HVALS', KEYS[2])}
"#;

/// How the engine writes to Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedSettings {
    /// Partitions accounts fall into: the unit of ownership (and, later, of moving between
    /// replicas).
    pub partitions: u16,
    /// How long a partition's lease lasts unless renewed (renewed every third of it).
    pub lease: Duration,
    /// Changes queued and not yet in Redis past which calls are refused with UNAVAILABLE.
    pub max_unflushed: usize,
    /// Longest wait for a call's batch to reach Redis.
    pub write_timeout: Duration,
    /// An account unused for this long leaves memory (it is reloaded on its next use).
    pub evict_idle: Duration,
}

impl Default for OwnedSettings {
    fn default() -> Self {
        OwnedSettings {
            partitions: 64,
            lease: Duration::from_secs(10),
            max_unflushed: 20_000,
            write_timeout: Duration::from_secs(2),
            evict_idle: Duration::from_secs(600),
        }
    }
}

/// The partition of an account.
pub fn partition_of(account_id: &str, partitions: u16) -> u16 {
    keys::slot(account_id.as_bytes()) % partitions.max(1)
}

/// Redis behind the engine: leases, the batch writer and the reads of what is not in memory.
pub struct OwnedRedis {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for OwnedRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedRedis")
            .field("owner", &self.shared.owner)
            .field("partitions", &self.shared.epochs.len())
            .finish()
    }
}

struct Shared {
    conn: Connection,
    settings: RedisSettings,
    prefix: String,
    owner: String,
    lease: Duration,
    /// The epoch this replica holds each partition under.
    epochs: Vec<u64>,
    /// Batches written to each partition under its epoch.
    seqs: Vec<AtomicU64>,
    /// Until when this replica may decide: nanoseconds after `base`.
    base: Instant,
    valid_until: AtomicU64,
    queue: Mutex<Queue>,
    wake: Notify,
    durable: watch::Sender<u64>,
    failed: OnceLock<String>,
    unflushed: AtomicUsize,
    max_unflushed: usize,
    write_timeout: Duration,
    batches: AtomicUsize,
    changes: AtomicUsize,
    /// Consumer groups known to exist on every partition's stream.
    groups: Mutex<HashSet<String>>,
    write_script: Script,
}

#[derive(Default)]
struct Queue {
    last: u64,
    changes: Vec<Change>,
}

fn unavailable(what: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("Redis, {what}: {err}"))
}

fn corrupt(what: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("Redis holds a corrupt {what}: {err}"))
}

impl OwnedRedis {
    /// Connects, checks the persisted format, takes every partition's lease (waiting for the
    /// lease of a replica that stopped to run out) and starts the writer and the renewals.
    /// Returns the accounts with a purchase in flight and the open holds, for the engine's
    /// indexes.
    pub async fn open(
        settings: &RedisSettings,
        owned: &OwnedSettings,
    ) -> Result<(OwnedRedis, Vec<(String, Timestamp)>, i64), StoreError> {
        let mut conn = connect(settings).await?;
        let prefix = settings.key_prefix.clone();
        check_format(&mut conn, &prefix).await?;
        let owner = format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple());
        let base = Instant::now();
        let started = Instant::now();
        let partitions = owned.partitions.max(1);
        let lease_ms = owned.lease.as_millis() as u64;
        let mut epochs = Vec::with_capacity(usize::from(partitions));
        let give_up = started + owned.lease * 2 + Duration::from_secs(1);
        for partition in 0..partitions {
            let tag = tag(&prefix, partition);
            loop {
                let reply: Vec<redis::Value> = Script::new(ACQUIRE)
                    .key(format!("{tag}:lease"))
                    .key(format!("{tag}:fence"))
                    .arg(&owner)
                    .arg(lease_ms)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| unavailable("taking a partition's lease", e))?;
                let number = |i: usize| -> Option<i64> {
                    reply
                        .get(i)
                        .and_then(|v| redis::from_redis_value_ref(v).ok())
                };
                if number(0) == Some(1) {
                    let epoch = number(1).ok_or_else(|| corrupt("lease epoch", "missing"))?;
                    epochs.push(epoch as u64);
                    break;
                }
                let holder: String = (reply.get(1))
                    .and_then(|v| redis::from_redis_value_ref(v).ok())
                    .unwrap_or_default();
                let left = number(2).unwrap_or(0).max(0) as u64;
                if Instant::now() >= give_up {
                    return Err(StoreError::Unavailable(format!(
                        "partition {partition} of key prefix {prefix:?} is owned by replica \
                         {holder} (its lease ends in {left} ms): owned mode runs one replica per \
                         key prefix for now; stop the other replica or give this one its own \
                         store.redis.key_prefix"
                    )));
                }
                tracing::info!(
                    partition,
                    holder,
                    left_ms = left,
                    "waiting for a partition's lease"
                );
                tokio::time::sleep(Duration::from_millis(left.clamp(10, 200))).await;
            }
        }
        let (purchases, holds) = read_indexes(&mut conn, &prefix, partitions).await?;
        let valid = started + owned.lease - owned.lease / 10;
        let shared = Arc::new(Shared {
            conn,
            settings: settings.clone(),
            prefix,
            owner,
            lease: owned.lease,
            seqs: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            epochs,
            valid_until: AtomicU64::new(valid.duration_since(base).as_nanos() as u64),
            base,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            durable: watch::Sender::new(0),
            failed: OnceLock::new(),
            unflushed: AtomicUsize::new(0),
            max_unflushed: owned.max_unflushed.max(1),
            write_timeout: owned.write_timeout,
            batches: AtomicUsize::new(0),
            changes: AtomicUsize::new(0),
            groups: Mutex::new(HashSet::new()),
            write_script: Script::new(WRITE),
        });
        tracing::info!(
            owner = %shared.owner,
            partitions,
            lease_ms,
            "owner of every partition on Redis: decisions in memory, written to Redis before each answer"
        );
        let tasks = vec![
            tokio::spawn(shared.clone().write_loop()),
            tokio::spawn(shared.clone().renew_loop()),
        ];
        Ok((OwnedRedis { shared, tasks }, purchases, holds))
    }

    /// Whether a new decision may be made now: not once ownership is lost, not past the
    /// lease's safe end, not with too much waiting to be written.
    pub fn admit(&self) -> Result<(), StoreError> {
        let shared = &self.shared;
        if let Some(reason) = shared.failed.get() {
            return Err(StoreError::Unavailable(reason.clone()));
        }
        let now = shared.base.elapsed().as_nanos() as u64;
        if now >= shared.valid_until.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable(
                "this replica could not renew its partition leases on Redis in time, and \
                 decides nothing until it does"
                    .into(),
            ));
        }
        if shared.unflushed.load(Ordering::Relaxed) >= shared.max_unflushed {
            return Err(StoreError::Unavailable(format!(
                "Redis is behind: {} changes are waiting to be written",
                shared.max_unflushed
            )));
        }
        Ok(())
    }

    /// Queues a change; returns its number, to wait on with [`durable`](Self::durable).
    pub fn submit(&self, change: Change) -> u64 {
        let shared = &self.shared;
        shared.unflushed.fetch_add(1, Ordering::Relaxed);
        let number = {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.last += 1;
            queue.changes.push(change);
            queue.last
        };
        shared.wake.notify_one();
        number
    }

    /// The number of the last change in Redis.
    pub fn durable_number(&self) -> u64 {
        *self.shared.durable.borrow()
    }

    /// Waits until change `number` (and every change queued before it) is in Redis.
    pub async fn durable(&self, number: u64) -> Result<(), StoreError> {
        let shared = &self.shared;
        let mut seen = shared.durable.subscribe();
        let landed = tokio::time::timeout(
            shared.write_timeout,
            seen.wait_for(|&n| n >= number || shared.failed.get().is_some()),
        )
        .await;
        match landed {
            Ok(Ok(n)) if *n >= number => Ok(()),
            Ok(_) => Err(StoreError::Unavailable(
                shared
                    .failed
                    .get()
                    .cloned()
                    .unwrap_or_else(|| "the Redis writer stopped".into()),
            )),
            Err(_) => Err(StoreError::Unavailable(format!(
                "Redis did not confirm the write within {} ms",
                shared.write_timeout.as_millis()
            ))),
        }
    }

    /// Why this replica stopped writing, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.shared.failed.get().map(String::as_str)
    }

    /// Batches written and the changes they held, since start.
    pub fn written(&self) -> (usize, usize) {
        (
            self.shared.batches.load(Ordering::Relaxed),
            self.shared.changes.load(Ordering::Relaxed),
        )
    }

    /// The account as last written, if it was ever written.
    pub async fn load_account(&self, account_id: &str) -> Result<Option<AccountState>, StoreError> {
        let keys = self.shared.account_keys(account_id);
        let mut conn = self.shared.conn.clone();
        let (core, records): (Vec<u8>, Vec<Vec<u8>>) = Script::new(LOAD)
            .key(&keys.core)
            .key(&keys.records)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable("reading an account", e))?;
        if core.is_empty() {
            return Ok(None);
        }
        let what = format!("account {account_id:?}");
        let state =
            decode_account(&core, records.iter().map(|r| &r[..])).map_err(|e| corrupt(&what, e))?;
        if state.account().id != account_id {
            return Err(corrupt(
                &what,
                format!("its key holds account {:?}", state.account().id),
            ));
        }
        Ok(Some(state))
    }

    /// The newest `limit` charges of an account, newest first.
    pub async fn history(
        &self,
        account_id: &str,
        limit: usize,
    ) -> Result<Vec<UsageEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let keys = self.shared.account_keys(account_id);
        let mut conn = self.shared.conn.clone();
        let values: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(&keys.history)
            .arg(-(limit.min(i64::MAX as usize) as i64))
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable("reading history", e))?;
        values
            .iter()
            .rev()
            .map(|v| {
                decode_event(v)
                    .map(|(_, e)| e)
                    .map_err(|e| corrupt("usage event", e))
            })
            .collect()
    }

    /// A consumer group's read of the export: deliveries idle past `claim_idle_ms` first
    /// (Redis's clock measures the idle time), then new events, partition by partition.
    pub async fn export_read(&self, read: &ExportRead) -> Result<Vec<ExportedEvent>, StoreError> {
        let shared = &self.shared;
        let partitions = shared.epochs.len() as u16;
        let mut conn = shared.conn.clone();
        self.ensure_group(&read.group).await?;
        let mut events = Vec::new();
        for partition in 0..partitions {
            let left = read.max_events.saturating_sub(events.len());
            if left == 0 {
                return Ok(events);
            }
            let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(stream_key(&shared.prefix, partition))
                .arg(&read.group)
                .arg(&read.consumer)
                .arg(read.claim_idle_ms.max(0))
                .arg("0-0")
                .arg("COUNT")
                .arg(left)
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable("claiming export deliveries", e))?;
            for entry in claimed.claimed {
                events.push(exported(partition, &entry)?);
            }
        }
        for partition in 0..partitions {
            let left = read.max_events.saturating_sub(events.len());
            if left == 0 {
                break;
            }
            let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&read.group)
                .arg(&read.consumer)
                .arg("COUNT")
                .arg(left)
                .arg("STREAMS")
                .arg(stream_key(&shared.prefix, partition))
                .arg(">")
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable("reading the export", e))?;
            for stream in reply.into_iter().flat_map(|r| r.keys) {
                for entry in &stream.ids {
                    events.push(exported(partition, entry)?);
                }
            }
        }
        Ok(events)
    }

    /// Acknowledges deliveries; returns how many were pending. Unknown ids count for nothing.
    pub async fn export_ack(
        &self,
        group: &str,
        delivery_ids: &[String],
    ) -> Result<u64, StoreError> {
        let shared = &self.shared;
        let partitions = shared.epochs.len() as u16;
        let mut by_partition: HashMap<u16, Vec<&str>> = HashMap::new();
        for id in delivery_ids {
            let Some((partition, entry)) = id.split_once('/') else {
                continue;
            };
            let Ok(partition) = partition.parse::<u16>() else {
                continue;
            };
            let valid_entry = entry
                .split_once('-')
                .is_some_and(|(a, b)| a.parse::<u64>().is_ok() && b.parse::<u64>().is_ok());
            if partition < partitions && valid_entry {
                by_partition.entry(partition).or_default().push(entry);
            }
        }
        let mut conn = shared.conn.clone();
        let mut acked = 0;
        for (partition, entries) in by_partition {
            let result: Result<u64, _> = redis::cmd("XACK")
                .arg(stream_key(&shared.prefix, partition))
                .arg(group)
                .arg(&entries)
                .query_async(&mut conn)
                .await;
            match result {
                Ok(n) => acked += n,
                Err(e) if e.code() == Some("NOGROUP") => {}
                Err(e) => return Err(unavailable("acknowledging export deliveries", e)),
            }
        }
        Ok(acked)
    }

    /// Creates `group` on every partition's stream (at its oldest entry) unless known to exist.
    async fn ensure_group(&self, group: &str) -> Result<(), StoreError> {
        let shared = &self.shared;
        if shared
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(group)
        {
            return Ok(());
        }
        let mut conn = shared.conn.clone();
        for partition in 0..shared.epochs.len() as u16 {
            let made: Result<(), _> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream_key(&shared.prefix, partition))
                .arg(group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match made {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(unavailable("creating an export consumer group", e)),
            }
        }
        shared
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(group.to_owned());
        Ok(())
    }
}

impl Drop for OwnedRedis {
    /// Stops the writer and the renewals, and gives the leases up so that a replica started
    /// next need not wait for them to run out. Everything acknowledged is already in Redis.
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let shared = self.shared.clone();
        // A thread of its own with a runtime of its own: a drop may run inside a runtime (where
        // blocking on one is refused) or outside any.
        let released = std::thread::Builder::new()
            .name("quotad-lease-release".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async {
                    let released = async {
                        let mut conn = connect(&shared.settings).await.ok()?;
                        for (partition, epoch) in shared.epochs.iter().enumerate() {
                            let tag = tag(&shared.prefix, partition as u16);
                            let _: Result<i64, _> = Script::new(RELEASE)
                                .key(format!("{tag}:lease"))
                                .arg(epoch)
                                .invoke_async(&mut conn)
                                .await;
                        }
                        Some(())
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(2), released).await;
                });
            });
        if let Ok(thread) = released {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn account_keys(&self, account_id: &str) -> AccountKeys {
        let partition = partition_of(account_id, self.epochs.len() as u16);
        AccountKeys::new(&tag(&self.prefix, partition), account_id)
    }

    fn fail(&self, reason: String) {
        if self.failed.set(reason.clone()).is_ok() {
            tracing::error!(
                reason,
                "Redis owner stopped: every call is refused until restart"
            );
        }
        // Wakes every waiter; they see the failure.
        self.durable.send_modify(|_| {});
    }

    /// Takes everything queued, writes it (one script call on a standalone Redis, one per
    /// partition in parallel on a Cluster, each retried until it lands or is fenced),
    /// publishes it durable, and goes on.
    async fn write_loop(self: Arc<Self>) {
        let cluster = !self.settings.cluster_nodes.is_empty();
        loop {
            let (changes, last) = loop {
                let notified = self.wake.notified();
                {
                    let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                    if !queue.changes.is_empty() {
                        break (std::mem::take(&mut queue.changes), queue.last);
                    }
                }
                notified.await;
            };
            let count = changes.len();
            let mut calls: Vec<WriteCall> = Vec::new();
            for (partition, ops) in self.partition_ops(&changes) {
                if cluster || calls.is_empty() {
                    calls.push(WriteCall::default());
                }
                let seq = self.seqs[usize::from(partition)].fetch_add(1, Ordering::Relaxed) + 1;
                let epoch = self.epochs[usize::from(partition)];
                let call = calls.last_mut().expect("a call");
                call.section(&tag(&self.prefix, partition), epoch, seq, &ops);
            }
            drop(changes);
            let mut pending: Vec<Arc<WriteCall>> = calls.into_iter().map(Arc::new).collect();
            let mut backoff = Duration::from_millis(20);
            while !pending.is_empty() && self.failed.get().is_none() {
                let results = if pending.len() == 1 {
                    let call = pending.pop().expect("one call");
                    let result = self.invoke(&call).await;
                    vec![(call, result)]
                } else {
                    let mut running = JoinSet::new();
                    for call in pending.drain(..) {
                        let shared = self.clone();
                        running.spawn(async move {
                            let result = shared.invoke(&call).await;
                            (call, result)
                        });
                    }
                    running.join_all().await
                };
                for (call, result) in results {
                    match result {
                        Ok(()) => {}
                        Err(e) if e.code() == Some("FENCED") => self.fail(format!(
                            "a partition was taken by another replica ({}); this replica \
                             stopped deciding",
                            e.detail().unwrap_or_default()
                        )),
                        Err(e) => {
                            tracing::warn!(error = %e, "writing a batch to Redis; retrying");
                            pending.push(call);
                        }
                    }
                }
                if !pending.is_empty() {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
            if self.failed.get().is_some() {
                return;
            }
            self.batches.fetch_add(1, Ordering::Relaxed);
            self.changes.fetch_add(count, Ordering::Relaxed);
            self.unflushed.fetch_sub(count, Ordering::Relaxed);
            self.durable.send_replace(last);
        }
    }

    async fn invoke(&self, call: &WriteCall) -> redis::RedisResult<()> {
        let mut invocation = self.write_script.prepare_invoke();
        for key in &call.keys {
            invocation.key(key);
        }
        invocation.arg(call.sections);
        for arg in &call.args {
            invocation.arg(&arg[..]);
        }
        let mut conn = self.conn.clone();
        let _: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }

    /// The writes of a run of changes, by partition.
    fn partition_ops(&self, changes: &[Change]) -> BTreeMap<u16, Vec<Op>> {
        let partitions = self.epochs.len() as u16;
        // An account changed several times in the batch has its last core written.
        let mut last_core: HashMap<&str, usize> = HashMap::new();
        for (i, change) in changes.iter().enumerate() {
            last_core.insert(&change.account_id, i);
        }
        let mut ops: BTreeMap<u16, Vec<Op>> = BTreeMap::new();
        let mut holds: BTreeMap<u16, i64> = BTreeMap::new();
        for (i, change) in changes.iter().enumerate() {
            let id = change.account_id.as_str();
            let partition = partition_of(id, partitions);
            let tag = tag(&self.prefix, partition);
            let ops = ops.entry(partition).or_default();
            let keys = AccountKeys::new(&tag, id);
            let mut op = |code: &'static [u8], key: &str, args: Vec<Vec<u8>>| {
                ops.push(Op {
                    code,
                    key: key.to_owned(),
                    args,
                })
            };
            if last_core[id] == i {
                op(b"S", &keys.core, vec![change.state.core.clone()]);
            }
            for (kind, numbers) in &change.state.forgotten {
                for seq in numbers.clone() {
                    op(b"h", &keys.records, vec![record_field(kind.tag(), seq)]);
                }
            }
            for record in &change.state.added {
                let field = record_field(record.kind.tag(), record.seq);
                op(b"H", &keys.records, vec![field, record.bytes.clone()]);
            }
            for event in &change.events {
                let encoded = encode_event(id, event);
                let keep = change.recent_keep.max(1).to_string().into_bytes();
                op(b"L", &keys.history, vec![encoded.clone(), keep]);
                let keep = change.export_keep.max(1).to_string().into_bytes();
                op(b"X", &format!("{tag}:x"), vec![encoded, keep]);
            }
            match change.purchase {
                PurchaseIndex::Unchanged => {}
                PurchaseIndex::Started(at) => {
                    let at = at.as_millis().to_string().into_bytes();
                    op(
                        b"H",
                        &format!("{tag}:pur"),
                        vec![id.as_bytes().to_vec(), at],
                    );
                }
                PurchaseIndex::Ended => {
                    op(b"h", &format!("{tag}:pur"), vec![id.as_bytes().to_vec()]);
                }
            }
            *holds.entry(partition).or_default() += change.holds_delta;
        }
        for (partition, delta) in holds {
            if delta != 0 {
                let key = format!("{}:meta", tag(&self.prefix, partition));
                let args = vec![b"holds".to_vec(), delta.to_string().into_bytes()];
                (ops.entry(partition).or_default()).push(Op {
                    code: b"C",
                    key,
                    args,
                });
            }
        }
        ops
    }

    /// Renews every lease a third of a lease apart; the safe end moves only when all were
    /// renewed, counted from before the renewals were sent.
    async fn renew_loop(self: Arc<Self>) {
        let lease_ms = self.lease.as_millis() as u64;
        loop {
            tokio::time::sleep(self.lease / 3).await;
            let sent = Instant::now();
            let mut calls = JoinSet::new();
            for (partition, &epoch) in self.epochs.iter().enumerate() {
                let mut conn = self.conn.clone();
                let lease = format!("{}:lease", tag(&self.prefix, partition as u16));
                calls.spawn(async move {
                    let renewed: redis::RedisResult<i64> = Script::new(RENEW)
                        .key(lease)
                        .arg(epoch)
                        .arg(lease_ms)
                        .invoke_async(&mut conn)
                        .await;
                    (partition, renewed)
                });
            }
            let mut all = true;
            while let Some(done) = calls.join_next().await {
                match done {
                    Ok((_, Ok(1))) => {}
                    Ok((partition, Ok(_))) => {
                        all = false;
                        self.fail(format!(
                            "the lease on partition {partition} ran out and another replica may \
                             hold it; this replica stopped deciding"
                        ));
                    }
                    Ok((partition, Err(e))) => {
                        all = false;
                        tracing::warn!(partition, error = %e, "renewing a partition lease");
                    }
                    Err(_) => all = false,
                }
            }
            if self.failed.get().is_some() {
                return;
            }
            if all {
                let valid = sent + self.lease - self.lease / 10;
                self.valid_until.store(
                    valid.duration_since(self.base).as_nanos() as u64,
                    Ordering::Release,
                );
            }
        }
    }
}

/// One write of a batch to a partition's key.
struct Op {
    code: &'static [u8],
    key: String,
    args: Vec<Vec<u8>>,
}

/// One script call of a batch: the sections of the partitions it writes, the keys they name
/// (each once) and the arguments.
#[derive(Default)]
struct WriteCall {
    keys: Vec<String>,
    index: HashMap<String, usize>,
    sections: usize,
    args: Vec<Vec<u8>>,
}

impl WriteCall {
    /// The index of `key` among the script's KEYS (from 1, as Lua counts).
    fn key(&mut self, key: &str) -> usize {
        if let Some(&i) = self.index.get(key) {
            return i;
        }
        self.keys.push(key.to_owned());
        let i = self.keys.len();
        self.index.insert(key.to_owned(), i);
        i
    }

    /// Adds a partition's section: its fence, its batch number and its writes.
    fn section(&mut self, tag: &str, epoch: u64, seq: u64, ops: &[Op]) {
        let fence = self.key(&format!("{tag}:fence"));
        self.sections += 1;
        self.args.push(fence.to_string().into_bytes());
        self.args.push(epoch.to_string().into_bytes());
        self.args.push(seq.to_string().into_bytes());
        let count = self.args.len();
        self.args.push(Vec::new());
        for op in ops {
            let key = self.key(&op.key);
            self.args.push(op.code.to_vec());
            self.args.push(key.to_string().into_bytes());
            self.args.extend(op.args.iter().cloned());
        }
        self.args[count] = (self.args.len() - count - 1).to_string().into_bytes();
    }
}

struct AccountKeys {
    core: String,
    records: String,
    history: String,
}

impl AccountKeys {
    fn new(tag: &str, account_id: &str) -> AccountKeys {
        AccountKeys {
            core: format!("{tag}:a:{account_id}"),
            records: format!("{tag}:r:{account_id}"),
            history: format!("{tag}:h:{account_id}"),
        }
    }
}

/// The common beginning of a partition's keys, with its hash tag.
fn tag(prefix: &str, partition: u16) -> String {
    format!("{prefix}:{{o{partition}}}")
}

fn stream_key(prefix: &str, partition: u16) -> String {
    format!("{}:x", tag(prefix, partition))
}

fn record_field(tag: u8, seq: u64) -> Vec<u8> {
    let mut field = Vec::with_capacity(9);
    field.push(tag);
    field.extend_from_slice(&seq.to_be_bytes());
    field
}

fn exported(partition: u16, entry: &StreamId) -> Result<ExportedEvent, StoreError> {
    let bytes: Vec<u8> = match entry.map.get("e") {
        Some(value) => {
            redis::from_redis_value_ref(value).map_err(|e| corrupt("export entry", e))?
        }
        None => return Err(corrupt("export entry", "no field e")),
    };
    let (account_id, event) = decode_event(&bytes).map_err(|e| corrupt("export entry", e))?;
    Ok(ExportedEvent {
        delivery_id: format!("{partition}/{}", entry.id),
        account_id,
        event,
    })
}

async fn check_format(conn: &mut Connection, prefix: &str) -> Result<(), StoreError> {
    let key = format!("{prefix}:owned-format");
    let _: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(FORMAT_VERSION)
        .arg("NX")
        .query_async(conn)
        .await
        .map_err(|e| unavailable("checking the persisted format", e))?;
    let found: u16 = redis::cmd("GET")
        .arg(&key)
        .query_async(conn)
        .await
        .map_err(|e| unavailable("checking the persisted format", e))?;
    if found != FORMAT_VERSION {
        return Err(StoreError::Internal(format!(
            "Redis key prefix {prefix:?} was written in persisted format {found}, and this \
             quotad reads format {FORMAT_VERSION} only; run the quotad version that wrote it, or \
             use another store.redis.key_prefix"
        )));
    }
    Ok(())
}

/// Accounts with a purchase in flight, and the open holds, of every partition.
async fn read_indexes(
    conn: &mut Connection,
    prefix: &str,
    partitions: u16,
) -> Result<(Vec<(String, Timestamp)>, i64), StoreError> {
    let mut purchases = Vec::new();
    let mut holds = 0;
    for partition in 0..partitions {
        let tag = tag(prefix, partition);
        let found: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(format!("{tag}:pur"))
            .query_async(conn)
            .await
            .map_err(|e| unavailable("reading purchases in flight", e))?;
        purchases.extend(
            found
                .into_iter()
                .map(|(id, at)| (id, Timestamp::from_millis(at))),
        );
        let open: Option<i64> = redis::cmd("HGET")
            .arg(format!("{tag}:meta"))
            .arg("holds")
            .query_async(conn)
            .await
            .map_err(|e| unavailable("reading open holds", e))?;
        holds += open.unwrap_or(0);
    }
    Ok((purchases, holds))
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "quotad".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_always_falls_in_the_same_partition() {
        assert_eq!(partition_of("acct-1", 64), partition_of("acct-1", 64));
        assert!(partition_of("acct-1", 64) < 64);
        assert_eq!(partition_of("anything", 1), 0);
        let spread: HashSet<u16> = (0..1_000)
            .map(|i| partition_of(&format!("acct-{i}"), 64))
            .collect();
        assert_eq!(
            spread.len(),
            64,
            "a thousand accounts reach every partition"
        );
    }

    #[test]
    fn a_call_names_each_key_once_and_counts_each_sections_arguments() {
        let op = |code: &'static [u8], key: &str, arg: &[u8]| Op {
            code,
            key: key.into(),
            args: vec![arg.to_vec()],
        };
        let mut call = WriteCall::default();
        call.section(
            "p:{o1}",
            7,
            3,
            &[
                op(b"S", "p:{o1}:a:x", b"core"),
                op(b"S", "p:{o1}:a:x", b"again"),
            ],
        );
        call.section("p:{o2}", 9, 1, &[op(b"h", "p:{o2}:r:y", b"f")]);
        assert_eq!(call.sections, 2);
        assert_eq!(
            call.keys,
            ["p:{o1}:fence", "p:{o1}:a:x", "p:{o2}:fence", "p:{o2}:r:y"]
        );
        let args: Vec<String> = call
            .args
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "1", "7", "3", "6", "S", "2", "core", "S", "2", "again", "3", "9", "1", "3", "h",
                "4", "f"
            ]
        );
    }
}
