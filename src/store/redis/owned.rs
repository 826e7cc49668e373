//! Redis as the backing store of the in-memory engine: the replica that owns an account decides
//! on it in memory with the Rust rules (the [memory store](crate::store::MemoryStore)), and what
//! the decisions changed is written here, in batches, before the calls are answered. Redis
//! keeps state; it holds no quota rule.
//!
//! Accounts fall into `partitions` by the CRC16 of their id. All keys of a partition share one
//! hash tag (`PREFIX:{oN}:…`), so one call writes a partition's part of a batch atomically, on
//! a Cluster too. Replicas announce themselves in Redis (`PREFIX:{members}`,
//! expiring with the lease, with the address peers forward calls to), and a partition falls to
//! the live replica with the highest rendezvous hash of the two. Each partition's owner holds a
//! lease (`…:lease`, with a time to live) under an epoch (`…:fence`, raised by every
//! acquisition, to at least Redis's clock in ms, and never reset). Every change is written under the epoch it was decided under
//! and is refused (`FENCED`) once another replica has taken the partition: a paused owner that
//! wakes up cannot overwrite its successor. The owner counts its lease from the instant
//! *before* it sent the acquisition or renewal, and stops deciding a tenth of the lease before
//! it could have expired, so that its own clock's drift and a slow answer never let two owners
//! decide at once.
//!
//! Every third of a lease, a round renews what is held, gives up what now falls to another
//! replica (no new decision, those in flight finish, the queue reaches Redis, the accounts leave
//! memory, the lease is deleted) and takes what falls here; between rounds, the members are
//! looked at every half second at most (with the same giving up and taking), so that a move is
//! not as slow as a long lease. A decision on an account of another replica's partition is
//! refused with [`StoreError::Moved`], which names the owner; the gRPC layer forwards the call
//! there (`api::forward`). A call on a partition that falls here but is not held yet (its last
//! owner has not let it go) waits for it, up to `write_timeout`, and the partition is taken as
//! soon as it is free: a replica joining or leaving is not an error to callers.
//!
//! A batch is one call (a transaction on a standalone Redis, the `WRITE` script behind
//! Sentinel; see [`super::storage`]) with a section per partition, or one call per partition
//! on a Cluster, each section numbered in its partition (kept in `…:fence`), so a call retried
//! after a timeout that had in fact landed is not applied twice. Batches are
//! written in order: the next is taken once every partition of the one before has landed.
//! While Redis cannot be reached, the batch is retried, calls wait at most `write_timeout` and
//! get UNAVAILABLE, and once `max_unflushed` changes wait no new decision is made.
//!
//! A batch write takes the partition's epoch, its batch number, its open holds afterwards and a
//! list of plain writes: set, hash set and delete, append to a list kept to a length, append to
//! a stream kept to a length. Keys, per partition `{oN}`:
//! - `a:ID`: a hash of the account's core (field `c`, `domain::persisted`, versioned) and the
//!   records it keeps for retries (field: kind tag and number, big endian); `h:ID`: its newest
//!   charges, a list, oldest first;
//! - `x`: the partition's part of the usage export, a stream read with consumer groups;
//! - `c:LEN:DOMAIN:KEY`: an Envoy RLS counter's window (`LEN`: the domain's length), kept
//!   for its window's length; a domain's counters are all in one partition;
//! - `pur`: accounts with an auto top-up purchase in flight or notifications to deliver, and
//!   since when (the maintenance pass visits them);
//! - `lease` (owner and epoch, with a time to live) and `fence` (a string: the epoch, never
//!   reset, the last batch number landed under it, and the partition's open holds as of that
//!   batch): ownership and fencing. The owner counts the holds and each batch sets the count
//!   whole with its number, rather than adding to it, so Redis's count cannot drift from the
//!   owner's; a batch reads its partitions' fences with one `MGET` and sets them with one
//!   `MSET`.
//!
//! `PREFIX:owned-format` holds the persisted format's version; a quotad reading another refuses
//! to start.
//!
//! **Outage grace.** With a journal dir (`journal.rs`), an owner whose batch write fails
//! (Redis down, or not answering within the attempt's time) goes on deciding from memory for up
//! to `outage_grace`: each batch is made durable in the journal instead, its calls answered, and
//! written to Redis, in order and under the epoch it was decided in, once Redis answers again.
//! A decision on credits then may raise an account's credit exposure (spent plus held) by at
//! most `outage_credit_allowance` over the outage (the engine checks it, [`Admission::outage`]).
//! Past the grace, and at once without a journal (`outage_grace = 0`), calls get UNAVAILABLE.
//! The lease still bounds everything: an owner that cannot renew stops at 90% of it, so the
//! grace is never longer than half a lease (checked at start), and a journal replays under its
//! own epoch while nobody else can have taken the partition, as long as Redis returns within
//! the lease. Accounts and the partition leave memory, and the lease is let go, only once what
//! was journaled for them is in Redis.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
// Tokio's clock: real time in production, the simulation's own when it pauses time.
use tokio::time::Instant;

use super::journal::{Journal, JournalBatch};
use super::storage::{OwnedStorage, RedisStorage, StorageError};
use super::{Connection, RedisSettings, connect, keys};
use crate::domain::{
    AccountState, ExportedEvent, FORMAT_VERSION, Timestamp, UsageEvent, decode_account_of,
    decode_event, encode_event,
};
use crate::store::data_dir::{Change, PurchaseIndex};
use crate::store::{ExportRead, StoreError};

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
    /// Longest wait for a call's batch to reach Redis, and for a partition on its way to this
    /// replica.
    pub write_timeout: Duration,
    /// An account unused for this long leaves memory (it is reloaded on its next use).
    pub evict_idle: Duration,
    /// The address other replicas and clients reach this one at (`host:port`), told to callers
    /// that ask a replica which does not own the account.
    pub advertise: String,
    /// How long decisions go on from memory, journaled, while Redis does not answer (zero:
    /// UNAVAILABLE at once). Needs `journal_dir`; at most half the lease.
    pub outage_grace: Duration,
    /// How far one account's credit exposure (credits spent plus held) may rise over an outage,
    /// in micro-credits.
    pub outage_credit_allowance: i64,
    /// Where decisions made while Redis does not answer are journaled, and this replica's id
    /// kept across restarts. None: no outage grace.
    pub journal_dir: Option<PathBuf>,
}

impl Default for OwnedSettings {
    fn default() -> Self {
        OwnedSettings {
            partitions: 64,
            lease: Duration::from_secs(10),
            max_unflushed: 20_000,
            write_timeout: Duration::from_secs(2),
            evict_idle: Duration::from_secs(600),
            advertise: String::new(),
            outage_grace: Duration::from_secs(3),
            outage_credit_allowance: 5 * crate::domain::MICROS_PER_CREDIT,
            journal_dir: None,
        }
    }
}

/// The partition of an account.
pub fn partition_of(account_id: &str, partitions: u16) -> u16 {
    keys::slot(account_id.as_bytes()) % partitions.max(1)
}

/// The partition of an Envoy RLS domain's counters: all of a domain's counters fall in one, so
/// one owner counts a request's descriptors together, as one step.
pub fn counter_partition(domain: &str, partitions: u16) -> u16 {
    let mut named = Vec::with_capacity(domain.len() + 4);
    named.extend_from_slice(b"rls\0");
    named.extend_from_slice(domain.as_bytes());
    keys::slot(&named) % partitions.max(1)
}

/// The key of counter `key` of `domain` in partition `partition` (the domain's length first,
/// so no two pairs of names meet on one key).
pub fn counter_key(prefix: &str, partition: u16, domain: &str, key: &str) -> String {
    format!(
        "{}:c:{}:{domain}:{key}",
        tag(prefix, partition),
        domain.len()
    )
}

/// What a decision queues to be written: an account's change, or the Envoy RLS counters a
/// request changed (written behind: nobody waits for them).
pub enum Queued {
    Account(Change),
    Counters(CounterWrite),
}

/// Counters of one partition as a request left them: each key's encoded window and how long
/// Redis keeps it (a window and a bucket: by then everything in it has left).
pub struct CounterWrite {
    pub partition: u16,
    pub counters: Vec<(String, Vec<u8>, i64)>,
}

impl Queued {
    fn partition(&self, partitions: u16) -> u16 {
        match self {
            Queued::Account(change) => partition_of(&change.account_id, partitions),
            Queued::Counters(write) => write.partition,
        }
    }
}

/// The replica a partition falls to among the live ones: the highest score of the partition
/// and the replica's id (rendezvous hashing), so partitions spread evenly and a replica that
/// joins or leaves moves only the partitions it takes or had.
fn owner_of(partition: u16, members: &[Member]) -> Option<&Member> {
    members
        .iter()
        .max_by_key(|m| (rendezvous(partition, &m.id), m.id.as_str()))
}

/// FNV-1a over the id and the partition: stable across processes and versions.
fn rendezvous(partition: u16, id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.bytes().chain(partition.to_be_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's low bits mix poorly for short inputs; one more round of mixing spreads them.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

/// What the engine is told when a partition comes to this replica or leaves it: the accounts
/// the maintenance pass must visit (a purchase in flight, notifications to deliver) and the open
/// holds the partition has in Redis. A partition that leaves has been flushed and no decision on
/// it is in flight; the engine drops its accounts from memory before the lease is given up.
pub struct Hooks {
    pub came: Box<dyn Fn(u16, Purchases, i64) + Send + Sync>,
    pub gone: Box<dyn Fn(u16, i64) + Send + Sync>,
}

/// Accounts with an auto top-up purchase in flight or notifications to deliver, and since when
/// (the earlier of the purchase's start and the oldest notification).
pub type Purchases = Vec<(String, Timestamp)>;

/// Redis behind the engine: leases, the batch writer and the reads of what is not in memory.
pub struct OwnedRedis {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for OwnedRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedRedis")
            .field("replica", &self.shared.replica)
            .field("held", &self.held())
            .finish()
    }
}

/// This replica's hold on one partition.
#[derive(Default)]
struct Slot {
    /// The epoch the partition is held under; 0: not held.
    epoch: AtomicU64,
    /// Batches written to the partition under that epoch.
    seq: AtomicU64,
    /// The partition's open holds as of the last batch made for it: what Redis read when it
    /// was taken, plus every change since. Each batch writes it whole, beside its number, so
    /// Redis's count is always the owner's as of the last batch landed.
    holds: AtomicI64,
    /// New decisions are taken (held, and not being given up).
    admitting: AtomicBool,
    /// Decisions admitted and not yet queued: a partition is given up only once none is.
    inflight: AtomicUsize,
    /// Until when this replica may decide on the partition (nanoseconds after `base`): 90% of
    /// a lease after its last acquisition or renewal was sent. Each partition's own, so a
    /// renewal that fails stops only its partition.
    valid_until: AtomicU64,
    /// When it was taken, and when a batch of it last landed, by Redis's clock (milliseconds):
    /// the interval in which this replica answered for it, logged when it ends. One clock for
    /// every replica, so intervals of different replicas compare.
    since_ms: AtomicI64,
    last_ack_ms: AtomicI64,
    /// Taken by each change of hold (taken, lost, given up) for its few steps, so that a loss
    /// noticed by the writer and a taking by the ownership round cannot interleave.
    transition: Mutex<()>,
    /// Calls wait for the partition to arrive here: the ownership task tries to take it
    /// between rounds.
    wanted: AtomicBool,
}

/// A replica alive, as its last membership record says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    id: String,
    address: String,
}

struct Shared {
    storage: Arc<dyn OwnedStorage>,
    /// On Redis: the connection for what only Redis serves (history, the export) and how to
    /// reach it again at shutdown. None over another storage (the simulation's).
    conn: Option<Connection>,
    settings: Option<RedisSettings>,
    prefix: String,
    /// This replica's id in leases and membership, and the address peers reach it at.
    replica: String,
    address: String,
    lease: Duration,
    slots: Vec<Slot>,
    /// The live replicas as last seen, by id.
    members: Mutex<Vec<Member>>,
    /// Woken when a partition is taken (calls wait for the ones on their way here), and to
    /// have the ownership task try to take the partitions calls wait for.
    arrived: Notify,
    wanted: Notify,
    hooks: Hooks,
    /// Where this replica's clock starts (validity is kept in nanoseconds after it).
    base: Instant,
    queue: Mutex<Queue>,
    wake: Notify,
    /// The number of the last change in Redis, and the calls waiting for later ones (each woken
    /// once, when its own number lands, not at every batch).
    durable: AtomicU64,
    waiters: Mutex<Vec<(u64, oneshot::Sender<()>)>>,
    /// Changes that were never written because their partition was taken by another replica
    /// first, and when: every call that waits for one is told so instead of being
    /// acknowledged (the decision's own, and any read of the state it left in memory until
    /// that state is evicted). Kept a while, not consumed by the first to look.
    dropped: Mutex<HashMap<u64, Instant>>,
    failed: OnceLock<String>,
    unflushed: AtomicUsize,
    max_unflushed: usize,
    write_timeout: Duration,
    batches: AtomicUsize,
    changes: AtomicUsize,
    /// Consumer groups known to exist on every partition's stream.
    groups: Mutex<HashSet<String>>,
    /// How long one attempt at a batch may take before Redis counts as not answering.
    attempt_timeout: Duration,
    /// Write attempts that failed or timed out (their batch is tried again), since start.
    missed_attempts: AtomicU64,
    /// Why the last ownership round failed, while rounds fail: Redis does not answer this
    /// replica even when it has nothing to write.
    round_failing: Mutex<Option<String>>,
    /// The number of the last change known to be in Redis (behind `durable` while journaled
    /// changes wait): accounts leave memory, and partitions this replica, only up to it.
    landed: AtomicU64,
    journal: Option<Mutex<Journal>>,
    /// Zero without a journal.
    outage_grace: Duration,
    outage_allowance: i64,
    /// When Redis stopped answering the writer (nanoseconds after `base`, plus one; zero: it
    /// answers), and how many outages there were (an outage's number scopes the allowance).
    outage_since: AtomicU64,
    outages: AtomicU64,
    /// Journaled sections not yet in Redis; what the outage did.
    journal_pending: AtomicUsize,
    outage_counts: OutageCounts,
}

/// What deciding without Redis has done since start.
#[derive(Debug, Default)]
pub struct OutageCounts {
    /// Decisions admitted while Redis did not answer.
    pub decisions: AtomicU64,
    /// Changes made durable in the journal instead of Redis, and those of them later written.
    pub journaled: AtomicU64,
    pub replayed: AtomicU64,
    /// Journaled changes that could not be written: their partition was taken first.
    pub fenced: AtomicU64,
}

/// A journaled section waiting for Redis, with the first change number of its batch and its
/// journal batch's number.
struct Journaled {
    section: Section,
    first: u64,
    batch: u64,
}

#[derive(Default)]
struct Queue {
    last: u64,
    /// Each change with the epoch its partition was held under when it was decided (0: not
    /// held any more): it is written under that epoch or not at all.
    changes: Vec<(Queued, u64)>,
}

fn unavailable(what: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("Redis, {what}: {err}"))
}

fn corrupt(what: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("Redis holds a corrupt {what}: {err}"))
}

/// A decision admitted on a partition this replica holds; the partition is not given up
/// while it lives (drop it once the decision's change is queued).
pub struct Admission {
    shared: Arc<Shared>,
    partition: u16,
    epoch: u64,
    outage: Option<u64>,
}

impl Admission {
    /// The epoch the partition is held under: the decision is written under it or not at all,
    /// and an account in memory from another epoch is read again from Redis first.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Admitted while Redis does not answer: the outage's number and the credit allowance the
    /// decision must keep within (the engine keeps each account's exposure at the outage's
    /// start, and undoes a decision that would rise past it).
    pub fn outage(&self) -> Option<(u64, i64)> {
        self.outage.map(|n| (n, self.shared.outage_allowance))
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        (self.shared.slots[usize::from(self.partition)].inflight).fetch_sub(1, Ordering::AcqRel);
    }
}

impl OwnedRedis {
    /// Connects, checks the persisted format, joins the replicas on this key prefix, takes the
    /// leases of the partitions that fall to it (those still held by a replica that stopped
    /// come once their leases run out) and starts the writer and the ownership rounds.
    pub async fn open(
        settings: &RedisSettings,
        owned: &OwnedSettings,
        hooks: Hooks,
    ) -> Result<OwnedRedis, StoreError> {
        let mut conn = connect(settings).await?;
        check_format(&mut conn, &settings.key_prefix).await?;
        let storage = Arc::new(RedisStorage::new(conn.clone(), settings, owned.partitions));
        let redis = Some((conn, settings.clone()));
        OwnedRedis::start(storage, redis, &settings.key_prefix, owned, hooks, None).await
    }

    /// An owner over another storage than Redis (the simulation's model of it), as replica
    /// `replica`, its keys under `prefix`. History and the export are not served.
    pub async fn over(
        storage: Arc<dyn OwnedStorage>,
        prefix: &str,
        owned: &OwnedSettings,
        hooks: Hooks,
        replica: String,
    ) -> Result<OwnedRedis, StoreError> {
        OwnedRedis::start(storage, None, prefix, owned, hooks, Some(replica)).await
    }

    /// Starts an owner over `storage`: joins the replicas there, takes the leases of the
    /// partitions that fall to it and starts the writer and the ownership rounds. `redis`: the
    /// connection for history and the export, on Redis. `replica`: this replica's id (made
    /// up, or kept in the journal dir, if None).
    async fn start(
        storage: Arc<dyn OwnedStorage>,
        redis: Option<(Connection, RedisSettings)>,
        prefix: &str,
        owned: &OwnedSettings,
        hooks: Hooks,
        replica: Option<String>,
    ) -> Result<OwnedRedis, StoreError> {
        let prefix = prefix.to_owned();
        let (conn, settings) = redis.unzip();
        let command_timeout =
            (settings.as_ref()).map_or(Duration::from_millis(250), |s| s.command_timeout);
        let fresh_id = || {
            replica
                .clone()
                .unwrap_or_else(|| format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple()))
        };
        let (journal, replica, pending) = match &owned.journal_dir {
            Some(dir) => {
                let (journal, id, pending) = Journal::open(dir, fresh_id)
                    .map_err(|e| StoreError::Internal(e.to_string()))?;
                (Some(Mutex::new(journal)), id, pending)
            }
            None => (None, fresh_id(), Vec::new()),
        };
        let partitions = owned.partitions.max(1);
        let base = Instant::now();
        let shared = Arc::new(Shared {
            storage,
            conn,
            settings,
            prefix,
            address: owned.advertise.clone(),
            replica,
            lease: owned.lease,
            slots: (0..partitions).map(|_| Slot::default()).collect(),
            members: Mutex::new(Vec::new()),
            arrived: Notify::new(),
            wanted: Notify::new(),
            hooks,
            base,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            durable: AtomicU64::new(0),
            waiters: Mutex::new(Vec::new()),
            dropped: Mutex::new(HashMap::new()),
            failed: OnceLock::new(),
            unflushed: AtomicUsize::new(0),
            max_unflushed: owned.max_unflushed.max(1),
            write_timeout: owned.write_timeout,
            batches: AtomicUsize::new(0),
            changes: AtomicUsize::new(0),
            groups: Mutex::new(HashSet::new()),
            // Within the calls' own wait, so that a journaled batch still answers them.
            attempt_timeout: (command_timeout * 4)
                .max(Duration::from_millis(500))
                .min(owned.write_timeout / 2),
            missed_attempts: AtomicU64::new(0),
            round_failing: Mutex::new(None),
            landed: AtomicU64::new(0),
            outage_grace: if journal.is_some() {
                owned.outage_grace.min(owned.lease / 2)
            } else {
                Duration::ZERO
            },
            outage_allowance: owned.outage_credit_allowance.max(0),
            journal,
            outage_since: AtomicU64::new(0),
            outages: AtomicU64::new(0),
            journal_pending: AtomicUsize::new(0),
            outage_counts: OutageCounts::default(),
        });
        // Before any lease is taken (which would end the epochs the journal was written under).
        shared.replay(pending).await?;
        shared.round().await?;
        tracing::info!(
            replica = %shared.replica,
            partitions,
            held = shared.held(),
            lease_ms = owned.lease.as_millis() as u64,
            "owner of partitions on Redis: decisions in memory, written to Redis before each answer"
        );
        let tasks = vec![
            tokio::spawn(shared.clone().write_loop()),
            tokio::spawn(shared.clone().ownership_loop()),
        ];
        Ok(OwnedRedis { shared, tasks })
    }

    /// The partitions this replica holds now.
    pub fn held(&self) -> usize {
        self.shared.held()
    }

    /// Whether this replica holds every partition and takes decisions on all of them.
    pub fn owns_every_partition(&self) -> bool {
        (self.shared.slots.iter()).all(|slot| slot.admitting.load(Ordering::Acquire))
    }

    /// Whether a decision on `account_id` may be made here now: its partition held and not
    /// being given up, the lease within its safe end, not too much waiting to be written.
    /// A partition on its way here is waited for (see [`admit_partition`](Self::admit_partition)).
    pub async fn admit(&self, account_id: &str) -> Result<Admission, StoreError> {
        self.admit_partition(partition_of(account_id, self.partitions()))
            .await
    }

    /// Partitions accounts and counters fall into.
    pub fn partitions(&self) -> u16 {
        self.shared.slots.len() as u16
    }

    /// Whether a decision on `partition` may be made here (see [`admit`](Self::admit)).
    ///
    /// A partition that now falls to this replica but is not held yet (its last owner has not
    /// let it go, or this replica has not taken it since) is waited for, up to
    /// `write_timeout`, and taken as soon as it is free rather than at the next round: a
    /// replica joining or leaving moves partitions, and a move that completes within a call's
    /// wait is not an error to its caller.
    pub async fn admit_partition(&self, partition: u16) -> Result<Admission, StoreError> {
        match self.admit_now(partition) {
            Err(_) if self.shared.arriving(partition) => self.await_arrival(partition).await,
            admitted => admitted,
        }
    }

    async fn await_arrival(&self, partition: u16) -> Result<Admission, StoreError> {
        let shared = &self.shared;
        let deadline = Instant::now() + shared.write_timeout;
        loop {
            // Registered before looking again, so that a taking in between is not missed.
            let arrived = shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let refused = match self.admit_now(partition) {
                Err(refused) if shared.arriving(partition) => refused,
                admitted => return admitted,
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(refused);
            }
            shared.slots[usize::from(partition)]
                .wanted
                .store(true, Ordering::Release);
            shared.wanted.notify_one();
            let _ = tokio::time::timeout_at(deadline.min(now + ARRIVAL_POLL), arrived).await;
        }
    }

    fn admit_now(&self, partition: u16) -> Result<Admission, StoreError> {
        let shared = &self.shared;
        if let Some(reason) = shared.failed.get() {
            return Err(StoreError::Unavailable(reason.clone()));
        }
        let slot = &shared.slots[usize::from(partition)];
        slot.inflight.fetch_add(1, Ordering::AcqRel);
        let mut admission = Admission {
            shared: shared.clone(),
            partition,
            epoch: 0,
            outage: None,
        };
        // Checked after counting in: a partition being given up either sees this decision in
        // flight and waits for it, or this decision sees the partition no longer admitting.
        admission.epoch = slot.epoch.load(Ordering::Acquire);
        if !slot.admitting.load(Ordering::Acquire) || admission.epoch == 0 {
            return Err(shared.not_here(partition));
        }
        let now = shared.base.elapsed().as_nanos() as u64;
        if now >= slot.valid_until.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable(
                "this replica could not renew the partition's lease on Redis in time, and \
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
        let since = shared.outage_since.load(Ordering::Acquire);
        if since != 0 {
            let out_for = Duration::from_nanos(now.saturating_sub(since - 1));
            if out_for >= shared.outage_grace {
                return Err(StoreError::Unavailable(format!(
                    "Redis has not answered for {} ms, past the outage grace of {} ms: nothing \
                     is decided until it does",
                    out_for.as_millis(),
                    shared.outage_grace.as_millis()
                )));
            }
            admission.outage = Some(shared.outages.load(Ordering::Acquire));
            (shared.outage_counts.decisions).fetch_add(1, Ordering::Relaxed);
        }
        Ok(admission)
    }

    /// Queues a change decided under `epoch` (its admission's); returns its number, to wait on
    /// with [`durable`](Self::durable). The admission keeps the partition from being given up,
    /// but a fenced write or a lapsed lease may have ended the epoch since: then the change is
    /// not written.
    pub fn submit(&self, change: Queued, epoch: u64) -> u64 {
        let shared = &self.shared;
        shared.unflushed.fetch_add(1, Ordering::Relaxed);
        let number = {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.last += 1;
            queue.changes.push((change, epoch));
            queue.last
        };
        shared.wake.notify_one();
        number
    }

    /// The number of the last change acknowledged (in Redis, or in the journal while Redis
    /// does not answer).
    pub fn durable_number(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire)
    }

    /// The number of the last change in Redis: what a read from Redis sees.
    pub fn landed_number(&self) -> u64 {
        self.shared.landed.load(Ordering::Acquire)
    }

    /// What deciding without Redis has done, and whether it is doing so now (then also for
    /// how long).
    pub fn outage(&self) -> (crate::store::OutageStats, Option<Duration>) {
        let shared = &self.shared;
        let since = shared.outage_since.load(Ordering::Acquire);
        let now = shared.base.elapsed().as_nanos() as u64;
        let out_for = (since != 0).then(|| Duration::from_nanos(now.saturating_sub(since - 1)));
        let counts = &shared.outage_counts;
        let stats = crate::store::OutageStats {
            deciding_without_redis: out_for.is_some_and(|d| d < shared.outage_grace),
            decisions: counts.decisions.load(Ordering::Relaxed),
            journaled: counts.journaled.load(Ordering::Relaxed),
            replayed: counts.replayed.load(Ordering::Relaxed),
            fenced: counts.fenced.load(Ordering::Relaxed),
            journal_pending: shared.journal_pending.load(Ordering::Acquire) as u64,
        };
        (stats, out_for)
    }

    /// Why ownership rounds fail, while they do (Redis does not answer this replica).
    pub fn round_failing(&self) -> Option<String> {
        (self.shared.round_failing.lock())
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Write attempts that failed or timed out and were tried again, since start.
    pub fn retried_writes(&self) -> u64 {
        self.shared.missed_attempts.load(Ordering::Relaxed)
    }

    /// The outage grace this replica runs with (zero without a journal).
    pub fn outage_grace(&self) -> Duration {
        self.shared.outage_grace
    }

    /// Waits until change `number` (and every change queued before it) is in Redis.
    pub async fn durable(&self, number: u64) -> Result<(), StoreError> {
        self.shared.durable(number).await
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
        let loaded = self.shared.storage.load(account_id).await;
        let Some((core, records)) = loaded.map_err(|e| unavailable("reading an account", e))?
        else {
            return Ok(None);
        };
        let what = format!("account {account_id:?}");
        let state = decode_account_of(account_id, &core, records.iter().map(|r| &r[..]))
            .map_err(|e| corrupt(&what, e))?;
        Ok(Some(state))
    }

    /// What writes the counters of `domain` a request changed, with their windows now.
    pub fn counter_write(
        &self,
        domain: &str,
        changed: Vec<(String, crate::domain::window::SlidingWindow)>,
    ) -> Queued {
        let partition = counter_partition(domain, self.partitions());
        let counters = (changed.into_iter())
            .map(|(key, window)| {
                // Past that, everything counted now has left the window (a bucket leaves at
                // most a bucket late).
                let keep_ms = window.spec().length_ms + window.spec().bucket_ms;
                let key = counter_key(&self.shared.prefix, partition, domain, &key);
                (key, crate::domain::encode_counter(&window), keep_ms)
            })
            .collect();
        Queued::Counters(CounterWrite {
            partition,
            counters,
        })
    }

    /// Counters `keys` of `domain` as last written (or as they would be had they never counted:
    /// empty), read as windows of `spec`.
    pub async fn load_counters(
        &self,
        domain: &str,
        keys: &[String],
        spec: impl Fn(&str) -> &'static crate::domain::WindowSpec,
    ) -> Result<Vec<(String, crate::domain::window::SlidingWindow)>, StoreError> {
        let partition = counter_partition(domain, self.partitions());
        let names: Vec<String> = (keys.iter())
            .map(|key| counter_key(&self.shared.prefix, partition, domain, key))
            .collect();
        let values = (self.shared.storage.load_values(&names).await)
            .map_err(|e| unavailable("reading rate limit counters", e))?;
        keys.iter()
            .zip(values)
            .map(|(key, value)| {
                let spec = spec(key);
                let window = match value {
                    Some(bytes) => crate::domain::decode_counter(&bytes, spec)
                        .map_err(|e| corrupt(&format!("counter {key:?} of {domain:?}"), e))?,
                    None => None,
                };
                let window =
                    window.unwrap_or_else(|| crate::domain::window::SlidingWindow::new(spec));
                Ok((key.clone(), window))
            })
            .collect()
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
        let mut conn = self.shared.redis()?;
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
        let partitions = shared.slots.len() as u16;
        let mut conn = shared.redis()?;
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
        let partitions = shared.slots.len() as u16;
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
        let mut conn = shared.redis()?;
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
        let mut conn = shared.redis()?;
        for partition in 0..shared.slots.len() as u16 {
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

impl OwnedRedis {
    /// Waits (a write timeout at most) for the writer to land what is queued: Envoy RLS
    /// counters are answered before they are written, and the next owner reads them from
    /// Redis. Blocking, so only where the writer runs on other threads.
    fn let_the_queue_land(&self) {
        let shared = &self.shared;
        let on_other_threads = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if !on_other_threads {
            return;
        }
        let last = shared.queue.lock().unwrap_or_else(|e| e.into_inner()).last;
        let deadline = std::time::Instant::now() + shared.write_timeout;
        while shared.landed.load(Ordering::Acquire) < last
            && shared.failed.get().is_none()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for OwnedRedis {
    /// Stops the writer and the ownership rounds, and gives the leases up (and leaves the
    /// membership) so that other replicas need not wait for them to run out. Everything
    /// acknowledged is already in Redis; counters written behind get a moment to land first.
    fn drop(&mut self) {
        self.let_the_queue_land();
        for task in &self.tasks {
            task.abort();
        }
        if self.shared.journal_pending.load(Ordering::Acquire) > 0 {
            // Journaled batches are not in Redis yet: the leases stay held (until they run
            // out, or this replica comes back with its id and replays them under their epochs).
            tracing::warn!(
                pending = self.shared.journal_pending.load(Ordering::Acquire),
                "stopping with journaled batches not yet in Redis; they are written at the next \
                 start on this journal"
            );
            return;
        }
        for (partition, slot) in self.shared.slots.iter().enumerate() {
            let epoch = slot.epoch.load(Ordering::Acquire);
            if epoch != 0 {
                self.shared.answered(partition as u16, epoch);
            }
        }
        let shared = self.shared.clone();
        let Some(settings) = shared.settings.clone() else {
            // Another storage (the simulation's): the leases run out.
            return;
        };
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
                        let mut conn = connect(&settings).await.ok()?;
                        let partitions = shared.slots.len() as u16;
                        let storage = RedisStorage::new(conn.clone(), &settings, partitions);
                        for (partition, slot) in shared.slots.iter().enumerate() {
                            let epoch = slot.epoch.load(Ordering::Acquire);
                            if epoch != 0 {
                                let _ = storage.release(partition as u16, epoch).await;
                            }
                        }
                        let _: Result<i64, _> = redis::cmd("ZREM")
                            .arg(members_key(&shared.prefix))
                            .arg(&shared.replica)
                            .query_async(&mut conn)
                            .await;
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
    /// The Redis connection, for what only Redis serves (history, the export).
    fn redis(&self) -> Result<Connection, StoreError> {
        self.conn.clone().ok_or_else(|| {
            StoreError::Internal("history and the export are kept in Redis only".into())
        })
    }

    fn held(&self) -> usize {
        (self.slots.iter())
            .filter(|slot| slot.epoch.load(Ordering::Acquire) != 0)
            .count()
    }

    /// Whether `partition` falls to this replica, as last seen, without being held and taking
    /// decisions here yet: calls wait for it rather than being refused.
    fn arriving(&self, partition: u16) -> bool {
        if self.failed.get().is_some() {
            return false;
        }
        let slot = &self.slots[usize::from(partition)];
        if slot.admitting.load(Ordering::Acquire) {
            return false;
        }
        let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        owner_of(partition, &members).is_some_and(|owner| owner.id == self.replica)
    }

    /// Why a decision on `partition` is not made here: who should make it, as last seen.
    fn not_here(&self, partition: u16) -> StoreError {
        let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        match owner_of(partition, &members) {
            Some(owner) if owner.id != self.replica => StoreError::Moved {
                owner: owner.id.clone(),
                address: owner.address.clone(),
            },
            _ => StoreError::Unavailable(format!(
                "partition {partition} is moving to this replica; try again shortly"
            )),
        }
    }

    fn account_keys(&self, account_id: &str) -> AccountKeys {
        let partition = partition_of(account_id, self.slots.len() as u16);
        AccountKeys::new(&tag(&self.prefix, partition), account_id)
    }

    fn fail(&self, reason: String) {
        if self.failed.set(reason.clone()).is_ok() {
            tracing::error!(
                reason,
                "Redis owner stopped: every call is refused until restart"
            );
        }
        // Every waiter is woken by its sender's drop, and sees the failure.
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Publishes every change up to `last` as in Redis, waking the calls that waited for them.
    fn publish(&self, last: u64) {
        self.wake_up_to(last, true);
    }

    /// Wakes the calls waiting for changes up to `last` without their changes being durable:
    /// they are answered UNAVAILABLE (see [`durable`](Self::durable)).
    fn refuse_waiting(&self, last: u64) {
        self.wake_up_to(last, false);
    }

    /// Wakes the calls waiting for changes up to `last`, after recording them durable if
    /// `landed` (under the waiters' lock, which `durable` checks against).
    fn wake_up_to(&self, last: u64, landed: bool) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if landed {
            self.durable.store(last, Ordering::Release);
        }
        let mut i = 0;
        while i < waiters.len() {
            if waiters[i].0 <= last {
                let _ = waiters.swap_remove(i).1.send(());
            } else {
                i += 1;
            }
        }
    }

    async fn durable(&self, number: u64) -> Result<(), StoreError> {
        let landed = if self.durable.load(Ordering::Acquire) >= number {
            Ok(Ok(()))
        } else {
            let (wake, woken) = oneshot::channel();
            {
                let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
                // Checked again under the lock `publish` holds, so a batch that landed since is
                // not waited for.
                if self.durable.load(Ordering::Acquire) < number && self.failed.get().is_none() {
                    waiters.push((number, wake));
                }
            }
            if self.durable.load(Ordering::Acquire) >= number {
                Ok(Ok(()))
            } else {
                tokio::time::timeout(self.write_timeout, woken).await
            }
        };
        match landed {
            Ok(Ok(())) if self.durable.load(Ordering::Acquire) >= number => {
                let dropped = (self.dropped.lock())
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(&number);
                if dropped {
                    return Err(StoreError::Unavailable(
                        "the account's partition moved to another replica before this decision \
                         was written; it did not happen, and may be asked again"
                            .into(),
                    ));
                }
                Ok(())
            }
            Ok(_)
                if self.failed.get().is_none()
                    && self.outage_since.load(Ordering::Acquire) != 0 =>
            {
                Err(StoreError::Unavailable(
                    "Redis does not answer: this decision is written once it does; asked \
                     again with the same request id, the call gets its answer"
                        .into(),
                ))
            }
            Ok(_) => Err(StoreError::Unavailable(
                self.failed
                    .get()
                    .cloned()
                    .unwrap_or_else(|| "the Redis writer stopped".into()),
            )),
            Err(_) => Err(StoreError::Unavailable(format!(
                "Redis did not confirm the write within {} ms",
                self.write_timeout.as_millis()
            ))),
        }
    }

    /// A partition this replica held was taken by another (its write was fenced, or its lease
    /// ran out): nothing more is decided or written on it here, and its accounts leave memory.
    /// Only under `epoch`: a refusal of an older epoch's write says nothing about a hold taken
    /// since.
    fn lose(&self, partition: u16, epoch: u64) {
        let slot = &self.slots[usize::from(partition)];
        let _one_change = slot.transition.lock().unwrap_or_else(|e| e.into_inner());
        let lost = slot
            .epoch
            .compare_exchange(epoch, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if lost && epoch != 0 {
            slot.admitting.store(false, Ordering::Release);
            tracing::warn!(partition, epoch, "lost a partition to another replica");
            self.answered(partition, epoch);
            (self.hooks.gone)(partition, slot.holds.load(Ordering::Acquire));
        }
    }

    /// Logs the interval in which this replica answered for `partition` under `epoch`: from its
    /// taking to the last batch of it that landed. Operators read when a partition moved; the
    /// fault tests check that no two replicas' intervals for a partition overlap.
    fn answered(&self, partition: u16, epoch: u64) {
        let slot = &self.slots[usize::from(partition)];
        tracing::info!(
            partition,
            epoch,
            from_ms = slot.since_ms.load(Ordering::Acquire),
            to_ms = slot.last_ack_ms.load(Ordering::Acquire),
            "answered for a partition"
        );
    }

    /// Takes everything queued, writes it (one call on a standalone Redis or behind Sentinel,
    /// one per partition in parallel on a Cluster), publishes it durable, and goes on. The changes of a
    /// partition lost meanwhile are not written, and their callers are told. While Redis does
    /// not answer, batches go to the journal (if there is one) and are answered from there;
    /// they are written to Redis, in order, once it answers again.
    async fn write_loop(self: Arc<Self>) {
        let mut backoff = RETRY_FIRST;
        loop {
            let (changes, last) = self.take().await;
            let count = changes.len();
            let mut sections = self.sections(changes, last);
            let mut journaled = false;
            while !sections.is_empty() && self.failed.get().is_none() {
                let refs: Vec<&Section> = sections.iter().collect();
                let outcome = self.attempt(&refs).await;
                self.settle(&mut sections, &outcome, |s| self.drop_changes(&s.numbers));
                if !outcome.missed {
                    // Written, or fenced: a fenced call wrote nothing, its other sections are
                    // tried again at once.
                    continue;
                }
                self.outage_began();
                if self.journal.is_none() && !outcome.timed_out {
                    // No grace, and Redis refused or dropped the connection: the calls waiting
                    // on this batch are answered UNAVAILABLE now, as later ones are, rather
                    // than after their whole wait (a Redis that is only slow may still answer
                    // within it). The batch stays queued and is written once Redis answers; a
                    // retry gets its answer.
                    self.refuse_waiting(last);
                }
                if self.journal.is_some() {
                    let mut backlog = VecDeque::new();
                    let left = std::mem::take(&mut sections);
                    if !self.journal_batch(left, last, count, &mut backlog).await {
                        return;
                    }
                    journaled = true;
                    if !self.clone().journaling(backlog).await {
                        return;
                    }
                    break;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MOST);
            }
            if self.failed.get().is_some() {
                return;
            }
            backoff = RETRY_FIRST;
            if !journaled {
                self.batches.fetch_add(1, Ordering::Relaxed);
                self.changes.fetch_add(count, Ordering::Relaxed);
                self.unflushed.fetch_sub(count, Ordering::Relaxed);
                self.publish(last);
                self.landed.store(last, Ordering::Release);
                // Redis answered: a failed ownership round is no longer the latest word.
                (self.round_failing.lock())
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                if self.outage_since.load(Ordering::Acquire) != 0 {
                    self.outage_over().await;
                }
            }
        }
    }

    /// While journaled sections wait for Redis: every new batch is journaled behind them (and
    /// answered), and, beside that, the oldest are written to Redis, one bounded call at a
    /// time, until none is left. False if the writer must stop.
    async fn journaling(self: Arc<Self>, mut backlog: VecDeque<Journaled>) -> bool {
        let mut backoff = RETRY_FIRST;
        let mut next_try = Instant::now();
        let mut inflight: Option<JoinHandle<(Vec<Journaled>, Attempt)>> = None;
        loop {
            if inflight.is_none() {
                if backlog.is_empty() {
                    self.outage_over().await;
                    return true;
                }
                if Instant::now() >= next_try {
                    let chunk = one_call(&mut backlog);
                    let shared = self.clone();
                    inflight = Some(tokio::spawn(async move {
                        let refs: Vec<&Section> = chunk.iter().map(|j| &j.section).collect();
                        let attempt = shared.attempt(&refs).await;
                        (chunk, attempt)
                    }));
                }
            }
            tokio::select! {
                (changes, last) = self.take() => {
                    let count = changes.len();
                    let sections = self.sections(changes, last);
                    if !self.journal_batch(sections, last, count, &mut backlog).await {
                        return false;
                    }
                }
                done = async { inflight.as_mut().expect("guarded").await }, if inflight.is_some() => {
                    inflight = None;
                    let Ok((chunk, attempt)) = done else {
                        self.fail("the journal's replay task failed".into());
                        return false;
                    };
                    if attempt.missed {
                        next_try = Instant::now() + backoff;
                        backoff = (backoff * 2).min(RETRY_MOST);
                    } else {
                        backoff = RETRY_FIRST;
                    }
                    self.written_back(chunk, &attempt, &mut backlog).await;
                }
                () = tokio::time::sleep_until(next_try), if inflight.is_none() => {}
            }
            if self.failed.get().is_some() {
                return false;
            }
        }
    }

    /// Waits for queued changes and takes them all, with the number of the last.
    async fn take(&self) -> (Vec<(Queued, u64)>, u64) {
        loop {
            let notified = self.wake.notified();
            {
                let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                if !queue.changes.is_empty() {
                    return (std::mem::take(&mut queue.changes), queue.last);
                }
            }
            notified.await;
        }
    }

    /// The sections a run of changes (numbered up to `last`) writes, each partition's numbered
    /// in it. A change decided under an epoch its partition is no longer held under (lost, and
    /// perhaps taken again since) is not written: another replica may have decided on the
    /// account meanwhile.
    fn sections(&self, changes: Vec<(Queued, u64)>, last: u64) -> Vec<Section> {
        let count = changes.len();
        let first = last + 1 - count as u64;
        let mut current = Vec::with_capacity(count);
        let mut stale = Vec::new();
        for (i, (change, epoch)) in changes.into_iter().enumerate() {
            let partition = change.partition(self.slots.len() as u16);
            let held = self.slots[usize::from(partition)]
                .epoch
                .load(Ordering::Acquire);
            if epoch != 0 && epoch == held {
                current.push((first + i as u64, change));
            } else {
                stale.push(first + i as u64);
            }
        }
        self.drop_changes(&stale);
        let mut sections = Vec::new();
        for (partition, (ops, numbers, holds_delta)) in self.partition_ops(current) {
            let slot = &self.slots[usize::from(partition)];
            let epoch = slot.epoch.load(Ordering::Acquire);
            if epoch == 0 {
                self.drop_changes(&numbers);
                continue;
            }
            let seq = slot.seq.fetch_add(1, Ordering::AcqRel) + 1;
            let holds = slot.holds.fetch_add(holds_delta, Ordering::AcqRel) + holds_delta;
            sections.push(Section {
                partition,
                epoch,
                seq,
                holds,
                ops,
                numbers,
            });
        }
        sections
    }

    /// One attempt at writing `sections` (the storage groups them into calls), given
    /// `attempt_timeout` in all: past it, Redis counts as not answering.
    async fn attempt(self: &Arc<Self>, sections: &[&Section]) -> Attempt {
        let written =
            tokio::time::timeout(self.attempt_timeout, self.storage.write(sections)).await;
        let timed_out = written.is_err();
        let results = written.unwrap_or_else(|_| {
            let partitions = sections.iter().map(|s| s.partition).collect();
            let why = "no answer within the write attempt's time".to_string();
            vec![(partitions, Err(StorageError::Unavailable(why)))]
        });
        let mut attempt = Attempt {
            timed_out,
            ..Attempt::default()
        };
        for (partitions, result) in results {
            match result {
                Ok(at) => attempt.landed.extend(partitions.iter().map(|&p| (p, at))),
                Err(StorageError::Fenced(partition)) => attempt.fenced.push(partition),
                Err(StorageError::Corrupt(why)) => self.fail(format!("a write was refused: {why}")),
                Err(e) => {
                    tracing::warn!(error = %e, "writing a batch to Redis");
                    attempt.missed = true;
                }
            }
        }
        if attempt.missed {
            self.missed_attempts.fetch_add(1, Ordering::Relaxed);
        }
        attempt
    }

    /// Records that a batch of `partition` under `epoch` landed at `at` (Redis's clock, ms). The
    /// debug line lets the fault tests bound when a replica that never logged giving a
    /// partition up (killed, or stalled past its lease and not yet told) last answered for it.
    fn landed_at(&self, partition: u16, epoch: u64, at: i64) {
        (self.slots[usize::from(partition)].last_ack_ms).fetch_max(at, Ordering::AcqRel);
        tracing::debug!(partition, epoch, at_ms = at, "a batch landed");
    }

    /// Takes what an attempt did out of `sections`: landed ones leave (their time recorded),
    /// a fenced partition is lost and its sections leave (`fenced` is told of each). Another
    /// partition's section in the same fenced call was not written and stays, for the retry.
    /// Sections of one partition share a call, so they land or are fenced together.
    fn settle(
        &self,
        sections: &mut Vec<Section>,
        attempt: &Attempt,
        mut fenced: impl FnMut(&Section),
    ) {
        for &(partition, at) in &attempt.landed {
            if let Some(s) = sections.iter().find(|s| s.partition == partition) {
                self.landed_at(partition, s.epoch, at);
            }
        }
        sections.retain(|s| {
            if attempt.landed.iter().any(|&(p, _)| p == s.partition) {
                return false;
            }
            if attempt.fenced.contains(&s.partition) {
                self.lose(s.partition, s.epoch);
                fenced(s);
                return false;
            }
            true
        });
    }

    /// Makes a batch's sections durable in the journal and answers its calls from there; the
    /// sections wait in `backlog` for Redis. False if the journal cannot be written (the
    /// writer then stops: nothing more can be acknowledged).
    async fn journal_batch(
        self: &Arc<Self>,
        sections: Vec<Section>,
        last: u64,
        count: usize,
        backlog: &mut VecDeque<Journaled>,
    ) -> bool {
        let first = last + 1 - count as u64;
        let changes: usize = sections.iter().map(|s| s.numbers.len()).sum();
        let shared = self.clone();
        let written = tokio::task::spawn_blocking(move || {
            let refs: Vec<&Section> = sections.iter().collect();
            let journal = shared.journal.as_ref().expect("journaling needs a journal");
            let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
            journal.append(&refs).map(|batch| (batch, sections))
        })
        .await;
        let (batch, sections) = match written {
            Ok(Ok(written)) => written,
            Ok(Err(e)) => {
                self.fail(format!("cannot write the outage journal: {e}"));
                return false;
            }
            Err(e) => {
                self.fail(format!("the outage journal's writer failed: {e}"));
                return false;
            }
        };
        (self.journal_pending).fetch_add(sections.len(), Ordering::AcqRel);
        for section in sections {
            backlog.push_back(Journaled {
                section,
                first,
                batch,
            });
        }
        (self.outage_counts.journaled).fetch_add(changes as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.changes.fetch_add(count, Ordering::Relaxed);
        self.unflushed.fetch_sub(count, Ordering::Relaxed);
        self.publish(last);
        true
    }

    /// Takes what an attempt at journaled sections did: the written ones leave, fenced ones
    /// are set aside, the rest go back to the front of `backlog`, in order. Updates what
    /// counts as in Redis, and the journal's record of it once nothing is left.
    async fn written_back(
        self: &Arc<Self>,
        chunk: Vec<Journaled>,
        attempt: &Attempt,
        backlog: &mut VecDeque<Journaled>,
    ) {
        let last_batch = chunk.last().map(|j| j.batch);
        let sent = chunk.len();
        let before: u64 = chunk.iter().map(|j| j.section.numbers.len() as u64).sum();
        let mut left: Vec<Journaled> = Vec::new();
        for j in chunk {
            let partition = j.section.partition;
            if let Some(&(_, at)) = attempt.landed.iter().find(|&&(p, _)| p == partition) {
                self.landed_at(partition, j.section.epoch, at);
                continue;
            }
            if attempt.fenced.contains(&partition) {
                self.lose(partition, j.section.epoch);
                self.fenced_journal(&j.section);
                continue;
            }
            left.push(j);
        }
        let after: u64 = left.iter().map(|j| j.section.numbers.len() as u64).sum();
        (self.outage_counts.replayed).fetch_add(before - after, Ordering::Relaxed);
        (self.journal_pending).fetch_sub(sent - left.len(), Ordering::AcqRel);
        for j in left.into_iter().rev() {
            backlog.push_front(j);
        }
        let landed = match backlog.front() {
            Some(oldest) => oldest.first - 1,
            None => self.durable.load(Ordering::Acquire),
        };
        self.landed.fetch_max(landed, Ordering::AcqRel);
        if backlog.is_empty()
            && let Some(batch) = last_batch
        {
            let shared = self.clone();
            let recorded = tokio::task::spawn_blocking(move || {
                let journal = shared.journal.as_ref().expect("journaling needs a journal");
                let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
                journal.landed(batch)
            })
            .await;
            if let Ok(Err(e)) = recorded {
                // Harmless for correctness: a restart replays batches Redis skips.
                tracing::warn!(error = %e, "recording the journal as written to Redis");
            }
        }
    }

    /// A journaled section whose partition another replica took before Redis returned: its
    /// changes were acknowledged and cannot be written under their epoch. Kept aside, counted
    /// and logged for an operator.
    fn fenced_journal(&self, section: &Section) {
        let changes = section.numbers.len().max(1) as u64;
        (self.outage_counts.fenced).fetch_add(changes, Ordering::Relaxed);
        let kept = (self.journal.as_ref()).map(|j| {
            j.lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_aside(section)
        });
        tracing::error!(
            partition = section.partition,
            epoch = section.epoch,
            seq = section.seq,
            kept = ?kept.map(|k| k.map_err(|e| e.to_string())),
            "journaled decisions could not be written to Redis: their partition was taken by \
             another replica before Redis returned"
        );
    }

    /// Redis stopped answering the writer: decisions go on for the outage grace (journaled),
    /// or stop at once without one.
    fn outage_began(&self) {
        let now = self.base.elapsed().as_nanos() as u64 + 1;
        if (self.outage_since)
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let number = self.outages.fetch_add(1, Ordering::AcqRel) + 1;
            if self.outage_grace.is_zero() {
                tracing::warn!(
                    outage = number,
                    "Redis does not answer: calls get UNAVAILABLE until it does (no outage grace)"
                );
            } else {
                tracing::warn!(
                    outage = number,
                    grace_ms = self.outage_grace.as_millis() as u64,
                    "Redis does not answer: deciding from memory, journaled, for up to the \
                     outage grace"
                );
            }
        }
    }

    /// Everything decided during the outage is in Redis.
    async fn outage_over(&self) {
        let since = self.outage_since.swap(0, Ordering::AcqRel);
        if since == 0 {
            return;
        }
        let took = self.base.elapsed().as_nanos() as u64 - (since - 1);
        tracing::info!(
            outage = self.outages.load(Ordering::Acquire),
            took_ms = took / 1_000_000,
            journaled = self.outage_counts.journaled.load(Ordering::Relaxed),
            replayed = self.outage_counts.replayed.load(Ordering::Relaxed),
            "Redis answers again: every journaled decision is written"
        );
    }

    /// Writes what a journal held at start (before any lease is taken: its batches are
    /// written under the epochs they were decided in), waiting for Redis as long as it takes.
    async fn replay(self: &Arc<Self>, pending: Vec<JournalBatch>) -> Result<(), StoreError> {
        let mut backlog: VecDeque<Journaled> = VecDeque::new();
        for batch in pending {
            for section in batch.sections {
                backlog.push_back(Journaled {
                    section,
                    first: 0,
                    batch: batch.number,
                });
            }
        }
        let total = backlog.len();
        if total > 0 {
            tracing::info!(
                sections = total,
                "writing the outage journal left by the last run to Redis"
            );
        }
        let mut backoff = RETRY_FIRST;
        let mut landed = 0;
        while !backlog.is_empty() {
            let mut sections: Vec<Section> = (one_call(&mut backlog).into_iter())
                .map(|j| j.section)
                .collect();
            let refs: Vec<&Section> = sections.iter().collect();
            let attempt = self.attempt(&refs).await;
            // Nothing is held yet: a fenced partition is only counted and kept aside.
            let before = sections.len();
            sections.retain(|s| {
                if attempt.landed.iter().any(|&(p, _)| p == s.partition) {
                    return false;
                }
                if attempt.fenced.contains(&s.partition) {
                    self.fenced_journal(s);
                    return false;
                }
                true
            });
            landed += before - sections.len();
            for section in sections.into_iter().rev() {
                backlog.push_front(Journaled {
                    section,
                    first: 0,
                    batch: 0,
                });
            }
            if attempt.missed {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MOST);
            }
        }
        if let Some(journal) = &self.journal {
            let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
            journal
                .start()
                .map_err(|e| StoreError::Internal(e.to_string()))?;
        }
        if total > 0 {
            tracing::info!(sections = landed, "the outage journal is written to Redis");
        }
        Ok(())
    }

    fn drop_changes(&self, numbers: &[u64]) {
        if numbers.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut dropped = self.dropped.lock().unwrap_or_else(|e| e.into_inner());
        // Long after every wait for them has ended (a wait lasts a write timeout; the
        // accounts they touched have left memory since).
        let keep = self.write_timeout * 4 + self.lease;
        dropped.retain(|_, at| now.duration_since(*at) < keep);
        dropped.extend(numbers.iter().map(|&n| (n, now)));
    }

    /// The writes of a run of numbered changes, by partition, with the numbers they carry and
    /// the change of the partition's open holds. Takes the changes: their bytes move into the
    /// writes.
    fn partition_ops(&self, changes: Vec<(u64, Queued)>) -> BTreeMap<u16, PartitionOps> {
        let partitions = self.slots.len() as u16;
        // An account changed several times in the batch has its last core written, and a
        // counter its last window.
        let (core_written, window_written) = {
            let mut last_core: HashMap<&str, usize> = HashMap::with_capacity(changes.len());
            let mut last_counter: HashMap<&str, (usize, usize)> = HashMap::new();
            for (i, (_, change)) in changes.iter().enumerate() {
                match change {
                    Queued::Account(change) => {
                        last_core.insert(&change.account_id, i);
                    }
                    Queued::Counters(write) => {
                        for (j, (key, _, _)) in write.counters.iter().enumerate() {
                            last_counter.insert(key, (i, j));
                        }
                    }
                }
            }
            // Whether change i writes its core, and which (change, counter) pairs write theirs.
            let mut core_written = vec![false; changes.len()];
            for &i in last_core.values() {
                core_written[i] = true;
            }
            let window_written: HashSet<(usize, usize)> = last_counter.into_values().collect();
            (core_written, window_written)
        };
        let mut ops: BTreeMap<u16, PartitionOps> = BTreeMap::new();
        let mut tags: HashMap<u16, String> = HashMap::new();
        for (i, (number, change)) in changes.into_iter().enumerate() {
            let change = match change {
                Queued::Account(change) => change,
                Queued::Counters(write) => {
                    let (ops, numbers, _) = ops.entry(write.partition).or_default();
                    numbers.push(number);
                    for (j, (key, window, keep_ms)) in write.counters.into_iter().enumerate() {
                        if window_written.contains(&(i, j)) {
                            let keep = keep_ms.max(1).to_string().into_bytes();
                            ops.push(Op {
                                code: b"P",
                                key,
                                args: vec![window, keep],
                            });
                        }
                    }
                    continue;
                }
            };
            let id = change.account_id.as_str();
            let partition = partition_of(id, partitions);
            let tag = tags
                .entry(partition)
                .or_insert_with(|| tag(&self.prefix, partition));
            let (ops, numbers, holds) = ops.entry(partition).or_default();
            numbers.push(number);
            *holds += change.holds_delta;
            let mut op = |code: &'static [u8], key: String, args: Vec<Vec<u8>>| {
                ops.push(Op { code, key, args })
            };
            // Records forgotten first, then the core and the records made, one after the
            // other: a transaction sets those fields of the account's hash in one command.
            let account = AccountKeys::account(tag, id);
            for (kind, numbers) in &change.state.forgotten {
                for seq in numbers.clone() {
                    op(b"h", account.clone(), vec![record_field(kind.tag(), seq)]);
                }
            }
            if core_written[i] {
                let core = vec![CORE_FIELD.to_vec(), change.state.core];
                op(b"H", account.clone(), core);
            }
            for record in change.state.added {
                let field = record_field(record.kind.tag(), record.seq);
                op(b"H", account.clone(), vec![field, record.bytes]);
            }
            for event in &change.events {
                let encoded = encode_event(id, event);
                let keep = u64::from(change.recent_keep.max(1));
                let trim = event.seq > keep && event.seq % HISTORY_TRIM_EVERY == 0;
                let keep = if trim { keep } else { 0 };
                op(
                    b"L",
                    AccountKeys::history(tag, id),
                    vec![encoded.clone(), keep.to_string().into_bytes()],
                );
                let keep = change.export_keep.max(1).to_string().into_bytes();
                op(b"X", [tag, ":x"].concat(), vec![encoded, keep]);
            }
            match change.purchase {
                PurchaseIndex::Unchanged => {}
                PurchaseIndex::Started(at) => {
                    let at = at.as_millis().to_string().into_bytes();
                    op(
                        b"H",
                        [tag, ":pur"].concat(),
                        vec![id.as_bytes().to_vec(), at],
                    );
                }
                PurchaseIndex::Ended => {
                    op(b"h", [tag, ":pur"].concat(), vec![id.as_bytes().to_vec()]);
                }
            }
        }
        ops
    }

    /// One ownership round every third of a lease; between rounds, a look at the members
    /// every [`MEMBERS_LOOK`] at most, and an attempt at taking the partitions calls wait for
    /// every [`ARRIVAL_POLL`] while they wait.
    async fn ownership_loop(self: Arc<Self>) {
        let every = self.lease / 3;
        let look_every = every.min(MEMBERS_LOOK);
        let mut next_round = Instant::now() + every;
        let mut next_look = Instant::now() + look_every;
        let mut last_attempt = Instant::now();
        loop {
            // Biased: the simulation replays a seed exactly only if the order is fixed.
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(next_round.min(next_look)) => {}
                () = self.wanted.notified() => {
                    let attempt = (last_attempt + ARRIVAL_POLL).min(next_round);
                    tokio::time::sleep_until(attempt).await;
                    if self.failed.get().is_some() {
                        return;
                    }
                    last_attempt = Instant::now();
                    self.take_wanted().await;
                    continue;
                }
            }
            if self.failed.get().is_some() {
                return;
            }
            let now = Instant::now();
            next_look = now + look_every;
            if now < next_round {
                if let Err(e) = self.look().await {
                    tracing::debug!(error = %e, "looking at the replicas on Redis");
                }
                continue;
            }
            next_round = now + every;
            let round = self.round().await;
            let mut failing = (self.round_failing.lock()).unwrap_or_else(|e| e.into_inner());
            match round {
                Ok(()) => *failing = None,
                Err(e) => {
                    tracing::warn!(error = %e, "an ownership round on Redis failed; retrying");
                    *failing = Some(e.to_string());
                }
            }
        }
    }

    /// Says this replica is alive, renews the leases it holds (each partition's safe end
    /// moves with its own renewal, counted from before it was sent), gives up the partitions
    /// that now fall to another live replica and takes those that fall to it.
    async fn round(&self) -> Result<(), StoreError> {
        let lease_ms = self.lease.as_millis() as u64;
        let members = self.join().await.inspect_err(|_| {
            // Seen here first when nothing is being written.
            self.outage_began();
        })?;
        if self.journal_pending.load(Ordering::Acquire) == 0
            && self.unflushed.load(Ordering::Acquire) == 0
        {
            self.outage_over().await;
        }

        for (partition, slot) in self.slots.iter().enumerate() {
            let epoch = slot.epoch.load(Ordering::Acquire);
            if epoch == 0 {
                continue;
            }
            let sent = Instant::now();
            let renewed = (self.storage)
                .renew(partition as u16, epoch, lease_ms)
                .await;
            match renewed {
                Ok(true) => self.valid(slot, epoch, sent),
                Ok(false) => self.lose(partition as u16, epoch),
                Err(e) => {
                    tracing::warn!(partition, error = %e, "renewing a partition lease");
                }
            }
        }
        self.rebalance(&members).await
    }

    /// Between rounds (whose renewals are a call per partition held): the members and the
    /// partitions that move with them, so that a replica joining or leaving is seen within
    /// [`MEMBERS_LOOK`] whatever the lease, and the calls waiting on the newcomer for its share
    /// wait that long at most.
    async fn look(&self) -> Result<(), StoreError> {
        let members = self.join().await?;
        self.rebalance(&members).await
    }

    /// Says this replica is alive, and keeps the live members as listed.
    async fn join(&self) -> Result<Vec<Member>, StoreError> {
        let lease_ms = self.lease.as_millis() as u64;
        let listed = (self.storage)
            .join(&self.replica, &self.address, lease_ms)
            .await
            .map_err(|e| unavailable("joining the replicas", e))?;
        let members: Vec<Member> = (listed.into_iter())
            .map(|(id, address)| Member { id, address })
            .collect();
        *self.members.lock().unwrap_or_else(|e| e.into_inner()) = members.clone();
        Ok(members)
    }

    /// Gives up the partitions that now fall to another live replica and takes those that
    /// fall here.
    async fn rebalance(&self, members: &[Member]) -> Result<(), StoreError> {
        for partition in 0..self.slots.len() as u16 {
            let mine = owner_of(partition, members).is_some_and(|m| m.id == self.replica);
            let held = self.slots[usize::from(partition)]
                .epoch
                .load(Ordering::Acquire)
                != 0;
            if held && !mine {
                self.release(partition).await;
            } else if mine && !held {
                self.acquire(partition).await?;
            }
        }
        Ok(())
    }

    /// Tries to take the partitions calls wait for, with the members as last seen: their last
    /// owner may have let them go since the round.
    async fn take_wanted(&self) {
        let members = self
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (partition, slot) in self.slots.iter().enumerate() {
            let partition = partition as u16;
            if !slot.wanted.swap(false, Ordering::AcqRel) || slot.epoch.load(Ordering::Acquire) != 0
            {
                continue;
            }
            if owner_of(partition, &members).is_some_and(|m| m.id == self.replica)
                && let Err(e) = self.acquire(partition).await
            {
                tracing::debug!(partition, error = %e, "taking a partition calls wait for");
            }
        }
    }

    /// The partition's lease, held under `epoch`, was taken or renewed by a call sent at
    /// `sent`: decisions on it may go on until 90% of a lease after that (counted from before
    /// the call, so a slow answer or this clock's drift cannot make it later than the lease).
    fn valid(&self, slot: &Slot, epoch: u64, sent: Instant) {
        if slot.epoch.load(Ordering::Acquire) == epoch {
            let until = sent + self.lease - self.lease / 10;
            let until = until.duration_since(self.base).as_nanos() as u64;
            slot.valid_until.store(until, Ordering::Release);
        }
    }

    /// Takes a partition's lease if its last holder let it go or stopped; its accounts are
    /// then read from Redis on first use.
    async fn acquire(&self, partition: u16) -> Result<(), StoreError> {
        let lease_ms = self.lease.as_millis() as u64;
        let sent = Instant::now();
        let taken = (self.storage)
            .acquire(partition, &self.replica, lease_ms)
            .await
            .map_err(|e| unavailable("taking a partition's lease", e))?;
        let Some(taken) = taken else {
            return Ok(());
        };
        let epoch = taken.epoch;
        let (purchases, holds) = (self.storage)
            .partition_index(partition)
            .await
            .map_err(|e| unavailable("reading a partition's index", e))?;
        let slot = &self.slots[usize::from(partition)];
        let _one_change = slot.transition.lock().unwrap_or_else(|e| e.into_inner());
        let since = taken.at_ms;
        slot.since_ms.store(since, Ordering::Release);
        slot.last_ack_ms.store(since, Ordering::Release);
        slot.seq.store(0, Ordering::Release);
        slot.holds.store(holds, Ordering::Release);
        slot.epoch.store(epoch, Ordering::Release);
        self.valid(slot, epoch, sent);
        (self.hooks.came)(partition, purchases, holds);
        slot.admitting.store(true, Ordering::Release);
        self.arrived.notify_waiters();
        tracing::info!(partition, epoch, holds, from_ms = since, "took a partition");
        Ok(())
    }

    /// Gives a partition up to the replica it now falls to: no new decision on it, the ones in
    /// flight finish, everything queued reaches Redis, its accounts leave memory, and the
    /// lease is let go (the next owner takes it under a higher epoch).
    async fn release(&self, partition: u16) {
        let slot = &self.slots[usize::from(partition)];
        slot.admitting.store(false, Ordering::Release);
        let deadline = Instant::now() + self.write_timeout;
        while slot.inflight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let last = self.queue.lock().unwrap_or_else(|e| e.into_inner()).last;
        let _ = self.durable(last).await;
        // Journaled changes too: the next owner reads the partition from Redis.
        while self.landed.load(Ordering::Acquire) < last && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if self.landed.load(Ordering::Acquire) < last {
            slot.admitting
                .store(slot.epoch.load(Ordering::Acquire) != 0, Ordering::Release);
            tracing::warn!(
                partition,
                "not giving a partition up: its journal is not in Redis yet"
            );
            return;
        }
        let epoch = slot.epoch.swap(0, Ordering::AcqRel);
        if epoch == 0 {
            return;
        }
        self.answered(partition, epoch);
        (self.hooks.gone)(partition, slot.holds.load(Ordering::Acquire));
        let _ = self.storage.release(partition, epoch).await;
        tracing::info!(
            partition,
            epoch,
            holds = slot.holds.load(Ordering::Acquire),
            "gave a partition up"
        );
    }
}

/// An account's history list is trimmed to what it keeps at every this many charges, not at
/// each one: a trim is a command of its own in a transaction, and reads take only the newest
/// events kept. A list holds at most this many less one past what it keeps.
const HISTORY_TRIM_EVERY: u64 = 8;

/// How long a replica joining or leaving may go unseen by the others, whatever the lease.
const MEMBERS_LOOK: Duration = Duration::from_millis(500);

/// How often a partition calls wait for is tried between rounds (and how often each waiting
/// call looks again, should it miss the taking).
const ARRIVAL_POLL: Duration = Duration::from_millis(25);

/// First and longest wait between attempts at a batch Redis did not take.
const RETRY_FIRST: Duration = Duration::from_millis(20);
const RETRY_MOST: Duration = Duration::from_millis(250);
/// Journaled sections are written back in calls of about this many bytes: a long outage's
/// journal is not one call that holds Redis for seconds.
const REPLAY_CALL_BYTES: usize = 1 << 20;

/// One write of a batch to a partition's key (the storage scripts' ops: `H` hash set, `h` hash
/// delete, `L` list append, then trimmed to a length unless it is 0, `X` stream append kept to
/// a length, `P` set with a time to live in milliseconds).
pub struct Op {
    pub code: &'static [u8],
    pub key: String,
    pub args: Vec<Vec<u8>>,
}

impl Op {
    /// The code of a write the script knows, from its byte (as the journal stores it).
    pub fn code_of(byte: u8) -> Option<&'static [u8]> {
        Some(match byte {
            b'H' => b"H",
            b'h' => b"h",
            b'L' => b"L",
            b'X' => b"X",
            b'P' => b"P",
            _ => return None,
        })
    }
}

/// One partition's writes in a batch, the numbers of the changes they carry, and how much those
/// changes moved its open holds.
type PartitionOps = (Vec<Op>, Vec<u64>, i64);

/// One partition's part of a batch: its writes, under the epoch and batch number it is
/// written with, and the numbers of the changes they carry.
pub struct Section {
    pub partition: u16,
    pub epoch: u64,
    pub seq: u64,
    /// The partition's open holds once the section is written (kept in its fence).
    pub holds: i64,
    pub ops: Vec<Op>,
    pub numbers: Vec<u64>,
}

impl Section {
    /// About what it takes in a call.
    fn bytes(&self) -> usize {
        (self.ops.iter())
            .map(|op| op.key.len() + op.args.iter().map(Vec::len).sum::<usize>() + 8)
            .sum()
    }
}

/// The oldest journaled sections, as many as one bounded call takes (at least one).
fn one_call(backlog: &mut VecDeque<Journaled>) -> Vec<Journaled> {
    let mut bytes = 0;
    let take = (backlog.iter())
        .take_while(|j| {
            bytes += j.section.bytes();
            bytes <= REPLAY_CALL_BYTES
        })
        .count()
        .max(1)
        .min(backlog.len());
    backlog.drain(..take).collect()
}

/// What one attempt at a write did, by partition.
#[derive(Default)]
struct Attempt {
    /// Written, with Redis's clock when it was.
    landed: Vec<(u16, i64)>,
    /// Refused: another replica holds the partition now.
    fenced: Vec<u16>,
    /// Some call got no answer (connection failed, or not within the attempt's time).
    missed: bool,
    /// The attempt's time ran out: Redis may be slow rather than gone.
    timed_out: bool,
}

/// Where an account's state lives: one hash holds its core (field [`CORE_FIELD`]) and its
/// records kept for retries (one field each), so that a decision's writes to it are one
/// command and a load one read; a list holds its history.
pub struct AccountKeys {
    pub account: String,
    pub history: String,
}

/// The field of an account's hash that holds its core. A record's field is 9 bytes (its kind
/// and number), so the two never meet.
pub const CORE_FIELD: &[u8] = b"c";

impl AccountKeys {
    /// The keys of `account_id` under key prefix `prefix` with `partitions` partitions.
    pub fn of(prefix: &str, partitions: u16, account_id: &str) -> AccountKeys {
        AccountKeys::new(
            &tag(prefix, partition_of(account_id, partitions)),
            account_id,
        )
    }

    fn new(tag: &str, account_id: &str) -> AccountKeys {
        AccountKeys {
            account: AccountKeys::account(tag, account_id),
            history: AccountKeys::history(tag, account_id),
        }
    }

    /// Each key alone, for a writer that needs only some. Joined rather than formatted: the
    /// writer makes several keys per decision, and `format!` costs several times a copy.
    fn account(tag: &str, account_id: &str) -> String {
        [tag, ":a:", account_id].concat()
    }

    fn history(tag: &str, account_id: &str) -> String {
        [tag, ":h:", account_id].concat()
    }
}

/// The common beginning of a partition's keys, with its hash tag.
pub fn tag(prefix: &str, partition: u16) -> String {
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

/// How the persisted values are laid out in Redis's keys, beside their own format
/// ([`FORMAT_VERSION`], shared with the data dir). 2: an account's core and its records share
/// one hash. 3: a partition's open holds are kept in its fence. 4: a fence is one string.
const REDIS_LAYOUT: u16 = 4;

async fn check_format(conn: &mut Connection, prefix: &str) -> Result<(), StoreError> {
    let key = format!("{prefix}:owned-format");
    let expected = format!("{FORMAT_VERSION}.{REDIS_LAYOUT}");
    let _: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(&expected)
        .arg("NX")
        .query_async(conn)
        .await
        .map_err(|e| unavailable("checking the persisted format", e))?;
    let found: String = redis::cmd("GET")
        .arg(&key)
        .query_async(conn)
        .await
        .map_err(|e| unavailable("checking the persisted format", e))?;
    if found != expected {
        return Err(StoreError::Internal(format!(
            "Redis key prefix {prefix:?} was written in persisted format {found}, and this \
             quotad reads format {expected} only; run the quotad version that wrote it, or use \
             another store.redis.key_prefix"
        )));
    }
    Ok(())
}

/// The replicas on this key prefix (a sorted set; `…:addr` beside it, same hash tag).
pub(super) fn members_key(prefix: &str) -> String {
    format!("{prefix}:{{members}}")
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

    fn members(ids: &[&str]) -> Vec<Member> {
        (ids.iter())
            .map(|id| Member {
                id: (*id).into(),
                address: format!("{id}:50051"),
            })
            .collect()
    }

    fn owned_by(members: &[Member]) -> Vec<String> {
        (0..64)
            .map(|p| owner_of(p, members).unwrap().id.clone())
            .collect()
    }

    #[test]
    fn partitions_spread_over_replicas_and_a_newcomer_takes_only_its_share() {
        let three = owned_by(&members(&["quotad-0-a1", "quotad-1-b2", "quotad-2-c3"]));
        for id in ["quotad-0-a1", "quotad-1-b2", "quotad-2-c3"] {
            let count = three.iter().filter(|o| *o == id).count();
            assert!((12..=32).contains(&count), "{id} owns {count} of 64");
        }
        let four = owned_by(&members(&[
            "quotad-0-a1",
            "quotad-1-b2",
            "quotad-2-c3",
            "quotad-3-d4",
        ]));
        for (before, after) in three.iter().zip(&four) {
            assert!(
                after == before || after == "quotad-3-d4",
                "{before} -> {after}"
            );
        }
        assert!(four.iter().any(|o| o == "quotad-3-d4"));
        assert_eq!(owner_of(0, &[]), None);
    }
}
