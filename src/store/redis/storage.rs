//! What the Redis engine keeps in Redis, behind one trait ([`OwnedStorage`]): the membership of
//! replicas, each partition's lease under an epoch, fenced batch writes, and the reads of a
//! partition's index and of one account. [`RedisStorage`] does it with the small storage
//! scripts below (they hold no quota rule), on a standalone Redis, through Sentinel or on a
//! Cluster. On a standalone Redis and behind Sentinel, batches are written as plain
//! transactions instead (`Transactions`): the same fenced write for half of Redis's work, since
//! a script spends as much in Lua as in the writes themselves.
//!
//! The owner's logic (`super::owned`: rounds, admission, the writer, fencing) only sees the
//! trait, so the deterministic simulation of several replicas
//! (`tests/integration/ownership_simulation.rs`) runs that same logic over a model of this
//! storage with faults between them: delays, lost requests and answers, cut links, pauses and a
//! drifting clock, replayable by seed.

use std::future::Future;
use std::pin::Pin;

use std::borrow::Cow;

use redis::Script;
use tokio::task::JoinSet;

use super::owned::{AccountKeys, CORE_FIELD, Op, Purchases, Section, members_key, tag};
use super::{Connection, RedisSettings, backstop};
use crate::domain::Timestamp;
use std::collections::HashMap;

/// A storage call in flight.
pub type StorageFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StorageError>> + Send + 'a>>;

/// Why a storage call did not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageError {
    /// A write under an epoch that is no longer the partition's: another replica took it.
    Fenced(u16),
    /// No answer (the connection failed, or the answer did not come in time).
    Unavailable(String),
    /// An answer that makes no sense.
    Corrupt(String),
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageError::Fenced(partition) => {
                write!(f, "partition {partition} is held under another epoch")
            }
            StorageError::Unavailable(why) => write!(f, "no answer: {why}"),
            StorageError::Corrupt(why) => write!(f, "a corrupt answer: {why}"),
        }
    }
}

/// A lease taken: its epoch, and the storage's clock then (milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub epoch: u64,
    pub at_ms: i64,
}

/// An account as stored: its core and the values of its records.
pub type StoredAccount = (Vec<u8>, Vec<Vec<u8>>);

/// Per group of partitions written together: the storage's clock when the write landed
/// (milliseconds), or why it did not.
pub type Written = Vec<(Vec<u16>, Result<i64, StorageError>)>;

/// What the engine needs of the store behind it. Every method is one atomic step there.
pub trait OwnedStorage: Send + Sync + 'static {
    /// Says `replica` (reached at `address`) is alive for `lease_ms` more (by the storage's
    /// clock), forgets replicas whose time ran out, and answers the live ones, `(id, address)`
    /// sorted by id.
    fn join<'a>(
        &'a self,
        replica: &'a str,
        address: &'a str,
        lease_ms: u64,
    ) -> StorageFuture<'a, Vec<(String, String)>>;

    /// Takes `partition`'s lease for `replica` if nobody else holds it (a replica may take its
    /// own again), under an epoch never issued before; None if another holds it.
    fn acquire<'a>(
        &'a self,
        partition: u16,
        replica: &'a str,
        lease_ms: u64,
    ) -> StorageFuture<'a, Option<Taken>>;

    /// Extends the lease still held under `epoch`; false if it is not.
    fn renew(&self, partition: u16, epoch: u64, lease_ms: u64) -> StorageFuture<'_, bool>;

    /// Deletes the lease if still held under `epoch`.
    fn release(&self, partition: u16, epoch: u64) -> StorageFuture<'_, ()>;

    /// Writes `sections` (a partition's, in order), each only if its partition is still held
    /// under its epoch and its batch number has not landed yet (a retry lands once). A group
    /// written together is refused whole if any of its partitions is fenced.
    fn write<'a>(
        &'a self,
        sections: &'a [&'a Section],
    ) -> Pin<Box<dyn Future<Output = Written> + Send + 'a>>;

    /// A partition's accounts with a purchase in flight or notifications to deliver, and its
    /// open holds.
    fn partition_index(&self, partition: u16) -> StorageFuture<'_, (Purchases, i64)>;

    /// An account's core and the values of its records, if it was ever written.
    fn load<'a>(&'a self, account_id: &'a str) -> StorageFuture<'a, Option<StoredAccount>>;

    /// The values of string keys of one partition (its Envoy RLS counters), None where a key
    /// holds nothing.
    fn load_values<'a>(&'a self, keys: &'a [String]) -> StorageFuture<'a, Vec<Option<Vec<u8>>>>;
}

/// The fenced batch write, for one or more partitions (all in one call on a standalone Redis;
/// one partition a call on a Cluster, where a script's keys share a slot). ARGV[1]: how many
/// partitions; then each partition's section: the key index of its fence (see [`Fence`]), the
/// partition's number (named by a `FENCED` error), the epoch the batch was decided under, its
/// number in the partition, the open holds after it, how many arguments its writes take, and
/// the writes, each an op, a key index and its arguments. Every fence is checked before
/// anything is written, so a fenced call writes nothing; a partition whose batch number has
/// already landed (a retry) is skipped. Answers Redis's clock, in milliseconds.
const WRITE: &str = r#"
local sections, at = {}, 2
for _ = 1, tonumber(ARGV[1]) do
  local s = {fence = KEYS[tonumber(ARGV[at])], epoch = ARGV[at + 2], number = ARGV[at + 3], holds = ARGV[at + 4], first = at + 6}
  s.last = at + 5 + tonumber(ARGV[at + 5])
  local epoch, seq = string.match(redis.call('GET', s.fence) or '', '^(%d+):(%d+):')
  if epoch ~= s.epoch then
    return redis.error_reply('FENCED ' .. ARGV[at + 1] .. ' partition epoch is ' .. tostring(epoch) .. ', not ' .. s.epoch)
  end
  s.landed = tonumber(seq) >= tonumber(s.number)
  sections[#sections + 1] = s
  at = s.last + 1
end
for _, s in ipairs(sections) do
  if not s.landed then
    local i = s.first
    while i <= s.last do
      local op, key = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
      if op == 'H' then redis.call('HSET', key, ARGV[i + 2], ARGV[i + 3]); i = i + 4
      elseif op == 'h' then redis.call('HDEL', key, ARGV[i + 2]); i = i + 3
      elseif op == 'L' then
        local keep = tonumber(ARGV[i + 3])
        if redis.call('RPUSH', key, ARGV[i + 2]) > keep and keep > 0 then
          redis.call('LTRIM', key, -keep, -1)
        end
        i = i + 4
      elseif op == 'X' then
        redis.call('XADD', key, 'MAXLEN', '~', ARGV[i + 3], '*', 'e', ARGV[i + 2]); i = i + 4
      elseif op == 'P' then redis.call('SET', key, ARGV[i + 2], 'PX', ARGV[i + 3]); i = i + 4
      else return redis.error_reply('unknown write ' .. op) end
    end
    redis.call('SET', s.fence, s.epoch .. ':' .. s.number .. ':' .. s.holds)
  end
end
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// Takes a partition's lease if nobody else holds it, under the next epoch: the fence's epoch
/// plus one, or Redis's clock in ms if that is more. Fencing compares epochs for equality, so
/// an epoch must never be issued twice; a failover to a replica that had not yet received the
/// last acquisition would count up again from the one before, re-issuing the lost epoch to the
/// next owner while the owner that took it may still write under it. From the clock, the next
/// epoch is past any issued before the failover (unless the old master's clock ran ahead of the
/// new one's by more than the failover took). The batch number starts again from 0 and the open
/// holds stay. KEYS: lease, fence. ARGV: owner, lease in ms. Answers `{1, epoch, Redis's clock
/// in ms}` or `{0, holder, ms left}`.
const ACQUIRE: &str = r#"
local holder = redis.call('HGET', KEYS[1], 'owner')
if holder and holder ~= ARGV[1] then
  return {0, holder, redis.call('PTTL', KEYS[1])}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last, holds = string.match(redis.call('GET', KEYS[2]) or '0:0:0', '^(%d+):%d+:(%-?%d+)$')
if not last then
  return redis.error_reply('CORRUPT the fence of ' .. KEYS[2] .. ' is not epoch:batch:holds')
end
-- Epochs stay below 2^53, so a Lua number holds them exactly.
local epoch = math.max(tonumber(last) + 1, now)
redis.call('SET', KEYS[2], string.format('%d:0:%s', epoch, holds))
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'epoch', string.format('%d', epoch))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, epoch, now}
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

/// Says a replica is alive until the lease's end (by Redis's clock), forgets replicas whose
/// time ran out, and answers the live ones with their addresses, sorted by id. KEYS: the
/// membership (a sorted set: id by expiry) and the addresses (a hash). ARGV: id, address,
/// lease in ms.
const MEMBERS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('HDEL', KEYS[2], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(ids)
local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
end
return out
"#;

/// The ownership scripts, hashed once (a `Script` carries its SHA-1, which `EVALSHA` sends).
struct Scripts {
    members: Script,
    acquire: Script,
    renew: Script,
    release: Script,
}

static SCRIPTS: std::sync::LazyLock<Scripts> = std::sync::LazyLock::new(|| Scripts {
    members: Script::new(MEMBERS),
    acquire: Script::new(ACQUIRE),
    renew: Script::new(RENEW),
    release: Script::new(RELEASE),
});

/// One script call of a batch: the sections of the partitions it writes, the keys they name
/// (each once) and the arguments, borrowed from the sections where they can be (a batch's
/// bytes are copied once, into the command).
#[derive(Default)]
struct WriteCall<'a> {
    keys: Vec<Cow<'a, str>>,
    index: HashMap<Cow<'a, str>, usize>,
    partitions: Vec<u16>,
    args: Vec<Cow<'a, [u8]>>,
}

impl<'a> WriteCall<'a> {
    fn of(prefix: &str, sections: impl IntoIterator<Item = &'a Section>) -> WriteCall<'a> {
        let mut call = WriteCall::default();
        for s in sections {
            call.section(
                &tag(prefix, s.partition),
                s.partition,
                s.epoch,
                s.seq,
                s.holds,
                &s.ops,
            );
        }
        call
    }

    /// The index of `key` among the script's KEYS (from 1, as Lua counts).
    fn key(&mut self, key: Cow<'a, str>) -> usize {
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        self.keys.push(key.clone());
        let i = self.keys.len();
        self.index.insert(key, i);
        i
    }

    /// The call with copies of what it borrowed (for a task of its own).
    fn into_owned(self) -> WriteCall<'static> {
        let keys: Vec<Cow<'static, str>> = (self.keys.into_iter())
            .map(|k| Cow::Owned(k.into_owned()))
            .collect();
        WriteCall {
            index: HashMap::new(),
            keys,
            partitions: self.partitions,
            args: (self.args.into_iter())
                .map(|a| Cow::Owned(a.into_owned()))
                .collect(),
        }
    }

    fn number(&mut self, n: impl ToString) {
        self.args.push(Cow::Owned(n.to_string().into_bytes()));
    }

    /// Adds a partition's section: its fence, its batch number and its writes.
    fn section(
        &mut self,
        tag: &str,
        partition: u16,
        epoch: u64,
        seq: u64,
        holds: i64,
        ops: &'a [Op],
    ) {
        let fence = self.key(Cow::Owned(format!("{tag}:fence")));
        self.partitions.push(partition);
        self.number(fence);
        self.number(partition);
        self.number(epoch);
        self.number(seq);
        self.number(holds);
        let count = self.args.len();
        self.args.push(Cow::Borrowed(&[]));
        for op in ops {
            let key = self.key(Cow::Borrowed(&op.key));
            self.args.push(Cow::Borrowed(op.code));
            self.number(key);
            self.args
                .extend(op.args.iter().map(|a| Cow::Borrowed(&a[..])));
        }
        self.args[count] = Cow::Owned((self.args.len() - count - 1).to_string().into_bytes());
    }
}

/// The engine's storage on Redis (standalone, through Sentinel, or Cluster).
pub struct RedisStorage {
    conn: Connection,
    prefix: String,
    partitions: u16,
    cluster: bool,
    write_script: Script,
    /// On a standalone Redis and behind Sentinel, batches go through plain transactions on a
    /// connection of their own; on a Cluster through the `WRITE` script.
    transactions: Option<Transactions>,
}

impl RedisStorage {
    pub(super) fn new(conn: Connection, settings: &RedisSettings, partitions: u16) -> RedisStorage {
        let transactions = Transactions::new(&conn, settings);
        RedisStorage {
            conn,
            prefix: settings.key_prefix.clone(),
            partitions: partitions.max(1),
            cluster: !settings.cluster_nodes.is_empty(),
            write_script: Script::new(WRITE),
            transactions,
        }
    }
}

/// Batch writes as plain transactions on one master (standalone, or the one Sentinel names):
/// the fences are watched and read (`WATCH`, `MGET`), then, if every epoch is the batch's, the
/// writes and the new fences (one `MSET`) go in one `MULTI` … `EXEC`, which Redis refuses if a
/// fence changed in between (another replica took a partition, or an abandoned attempt of this
/// one landed late): the write is then tried again from the read, which sees the new epoch or
/// batch number. The same fenced, numbered write as the `WRITE` script, one round trip longer,
/// at about half of Redis's work (no Lua).
///
/// A `WATCH` belongs to its connection, so the connection is the writer's own, used by one
/// write at a time, and never reconnected underneath: it is dropped at its first error, or if
/// a write is abandoned midway (its time ran out), and made anew for the next write. A
/// connection that reconnected on its own would have lost the `WATCH` and let a fenced write
/// through. Behind Sentinel it is made to the master the sentinels name, and made anew when
/// they name another (a failover).
struct Transactions {
    master: Master,
    config: redis::AsyncConnectionConfig,
    /// The connection, and the address of the master it was made to.
    conn: tokio::sync::Mutex<Option<(String, redis::aio::MultiplexedConnection)>>,
}

/// Where the writer's connection goes.
enum Master {
    Standalone(Box<redis::Client>),
    Sentinel(super::sentinel::SentinelConnection),
}

impl Master {
    /// The master's address now (empty for a standalone Redis).
    fn address(&self) -> String {
        match self {
            Master::Standalone(_) => String::new(),
            Master::Sentinel(sentinel) => sentinel.master_address(),
        }
    }

    /// A new connection to the master at `address`.
    async fn connect(
        &self,
        address: &str,
        config: &redis::AsyncConnectionConfig,
    ) -> Result<redis::aio::MultiplexedConnection, StorageError> {
        let client = match self {
            Master::Standalone(client) => Cow::Borrowed(&**client),
            Master::Sentinel(sentinel) => Cow::Owned(
                redis::Client::open(sentinel.master_url(address))
                    .map_err(|e| missed("connecting the writer", e))?,
            ),
        };
        (client.get_multiplexed_async_connection_with_config(config))
            .await
            .map_err(|e| missed("connecting the writer", e))
    }
}

/// How often a transaction is tried again when a fence changed between its read and its
/// `EXEC`, before the write counts as not answered (the next attempt reads again).
const WATCH_TRIES: usize = 3;

impl Transactions {
    /// None on a Cluster, where a transaction cannot span the nodes a batch writes to.
    fn new(conn: &Connection, settings: &RedisSettings) -> Option<Transactions> {
        let master = match conn {
            Connection::Single(_) => {
                Master::Standalone(Box::new(settings.tls.client(&settings.url).ok()?))
            }
            Connection::Sentinel(sentinel) => Master::Sentinel(sentinel.clone()),
            Connection::Cluster(_) => return None,
        };
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(backstop(settings)));
        Some(Transactions {
            master,
            config,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    async fn write(&self, prefix: &str, sections: &[&Section]) -> Result<i64, StorageError> {
        let mut held = self.conn.lock().await;
        let address = self.master.address();
        // Taken out while in use: a write dropped midway leaves no connection behind. One made
        // to a master that is no longer the one named is dropped.
        let mut conn = match held.take() {
            Some((made_to, conn)) if made_to == address => conn,
            _ => self.master.connect(&address, &self.config).await?,
        };
        let written = fenced_write(&mut conn, prefix, sections).await;
        match &written {
            // Kept only where no `WATCH` is left behind on it: a corrupt fence ends the write
            // between its `WATCH` and its `EXEC`.
            Ok(_) | Err(StorageError::Fenced(_)) => *held = Some((address, conn)),
            Err(StorageError::Corrupt(_)) => {}
            Err(StorageError::Unavailable(_)) => {
                if let Master::Sentinel(sentinel) = &self.master {
                    sentinel.look_again();
                }
            }
        }
        written
    }
}

/// A partition's fence, a string `EPOCH:BATCH:HOLDS`: the epoch its lease was last taken under
/// (raised by every taking, never reset), the number of the last batch that landed under it,
/// and the partition's open holds as of that batch. One string, so that a batch over several
/// partitions reads all its fences with one `MGET` and sets them with one `MSET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub epoch: u64,
    pub seq: u64,
    pub holds: i64,
}

impl Fence {
    pub fn parse(value: &[u8]) -> Result<Fence, StorageError> {
        let corrupt = || {
            StorageError::Corrupt(format!(
                "a fence {:?} is not epoch:batch:holds",
                String::from_utf8_lossy(value)
            ))
        };
        let text = std::str::from_utf8(value).map_err(|_| corrupt())?;
        let mut parts = text.split(':');
        let mut next = || parts.next().ok_or_else(corrupt);
        let fence = Fence {
            epoch: next()?.parse().map_err(|_| corrupt())?,
            seq: next()?.parse().map_err(|_| corrupt())?,
            holds: next()?.parse().map_err(|_| corrupt())?,
        };
        match parts.next() {
            None => Ok(fence),
            Some(_) => Err(corrupt()),
        }
    }

    pub fn value(&self) -> String {
        format!("{}:{}:{}", self.epoch, self.seq, self.holds)
    }
}

/// One batch as a transaction on `conn` (see [`Transactions`]).
async fn fenced_write(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    sections: &[&Section],
) -> Result<i64, StorageError> {
    // Each partition's fence once.
    let mut fences: Vec<(u16, String)> = Vec::new();
    for s in sections {
        if !fences.iter().any(|(p, _)| *p == s.partition) {
            fences.push((s.partition, format!("{}:fence", tag(prefix, s.partition))));
        }
    }
    let fence_of = |partition: u16| fences.iter().position(|(p, _)| *p == partition);
    for _ in 0..WATCH_TRIES {
        let mut read = redis::pipe();
        read.cmd("WATCH").ignore();
        for (_, key) in &fences {
            read.arg(key);
        }
        read.cmd("MGET");
        for (_, key) in &fences {
            read.arg(key);
        }
        let (read,): (Vec<Option<Vec<u8>>>,) = read
            .query_async(conn)
            .await
            .map_err(|e| missed("reading the fences", e))?;
        let mut found = Vec::with_capacity(read.len());
        for value in &read {
            found.push(value.as_deref().map(Fence::parse).transpose()?);
        }
        let ops: usize = sections.iter().map(|s| s.ops.len()).sum();
        let mut write = redis::Pipeline::with_capacity(ops + 2);
        write.atomic();
        // The new value of each fence the batch moves.
        let mut moved: Vec<Option<Fence>> = vec![None; fences.len()];
        for s in sections {
            let i = fence_of(s.partition).unwrap_or(0);
            let fence = found.get(i).copied().flatten();
            if fence.map(|f| f.epoch) != Some(s.epoch) {
                let unwatched: redis::RedisResult<()> =
                    redis::cmd("UNWATCH").query_async(conn).await;
                unwatched.map_err(|e| missed("after a fenced read", e))?;
                return Err(StorageError::Fenced(s.partition));
            }
            if fence.map_or(0, |f| f.seq) >= s.seq {
                // Landed before (a retry after a timeout): written once.
                continue;
            }
            for run in s.ops.chunk_by(|a, b| a.code == b.code && a.key == b.key) {
                queue(&mut write, run)?;
            }
            moved[i] = Some(Fence {
                epoch: s.epoch,
                seq: s.seq,
                holds: s.holds,
            });
        }
        let moved: Vec<(&str, String)> = (fences.iter().zip(&moved))
            .filter_map(|((_, key), to)| Some((key.as_str(), to.as_ref()?.value())))
            .collect();
        if !moved.is_empty() {
            write.cmd("MSET").arg(&moved[..]).ignore();
        }
        write.cmd("TIME");
        let answer: Option<(Vec<i64>,)> = write
            .query_async(conn)
            .await
            .map_err(|e| missed("writing a batch", e))?;
        if let Some((time,)) = answer {
            return match time[..] {
                [seconds, micros] => Ok(seconds * 1000 + micros / 1000),
                _ => Err(StorageError::Corrupt(format!("TIME answered {time:?}"))),
            };
        }
    }
    Err(StorageError::Unavailable(
        "a fence kept changing while the batch was written".into(),
    ))
}

/// Adds a run of a batch's writes (one op, or hash sets or deletes of one key one after the
/// other, which become one command) to a transaction, as the `WRITE` script runs them.
fn queue(pipe: &mut redis::Pipeline, run: &[Op]) -> Result<(), StorageError> {
    let op = &run[0];
    if run.len() > 1 && matches!(op.code, b"H" | b"h") {
        let (command, width): (&[u8], usize) = if op.code == b"H" {
            (b"HSET", 2)
        } else {
            (b"HDEL", 1)
        };
        let mut parts: Vec<&[u8]> = Vec::with_capacity(2 + width * run.len());
        parts.extend([command, op.key.as_bytes()]);
        for op in run {
            let args = (op.args.get(..width))
                .ok_or_else(|| StorageError::Corrupt("a hash write lacks an argument".into()))?;
            parts.extend(args.iter().map(Vec::as_slice));
        }
        pipe.add_command(command_of(&parts)).ignore();
        return Ok(());
    }
    for op in run {
        queue_one(pipe, op)?;
    }
    Ok(())
}

/// A command of `parts` (its name first), built with room for all of them: a batch's values
/// are copied once into it, not again each time a growing buffer moves.
fn command_of(parts: &[&[u8]]) -> redis::Cmd {
    let bytes = parts.iter().map(|p| p.len()).sum();
    let mut command = redis::Cmd::with_capacity(parts.len(), bytes);
    for part in parts {
        command.arg(*part);
    }
    command
}

/// Adds one of a batch's writes to a transaction.
fn queue_one(pipe: &mut redis::Pipeline, op: &Op) -> Result<(), StorageError> {
    let arg = |i: usize| -> Result<&[u8], StorageError> {
        (op.args.get(i).map(Vec::as_slice))
            .ok_or_else(|| StorageError::Corrupt(format!("a write lacks argument {i}")))
    };
    let key = op.key.as_bytes();
    let command = match op.code {
        b"H" => command_of(&[b"HSET", key, arg(0)?, arg(1)?]),
        b"h" => command_of(&[b"HDEL", key, arg(0)?]),
        b"L" => {
            let keep = (std::str::from_utf8(arg(1)?).ok())
                .and_then(|k| k.parse::<i64>().ok())
                .ok_or_else(|| StorageError::Corrupt("a list write's length".into()))?;
            let push = command_of(&[b"RPUSH", key, arg(0)?]);
            if keep == 0 {
                push
            } else {
                pipe.add_command(push).ignore();
                let from = (-keep).to_string();
                command_of(&[b"LTRIM", key, from.as_bytes(), b"-1"])
            }
        }
        b"X" => command_of(&[b"XADD", key, b"MAXLEN", b"~", arg(1)?, b"*", b"e", arg(0)?]),
        b"P" => command_of(&[b"SET", key, arg(0)?, b"PX", arg(1)?]),
        other => {
            return Err(StorageError::Corrupt(format!(
                "unknown write {}",
                String::from_utf8_lossy(other)
            )));
        }
    };
    pipe.add_command(command).ignore();
    Ok(())
}

/// Runs one write call of `script` (the fenced batch write) on `conn`; answers Redis's clock.
async fn invoke(
    mut conn: Connection,
    script: &Script,
    call: &WriteCall<'_>,
) -> redis::RedisResult<i64> {
    let mut invocation = script.prepare_invoke();
    for key in &call.keys {
        invocation.key(&key[..]);
    }
    invocation.arg(call.partitions.len());
    for arg in &call.args {
        invocation.arg(&arg[..]);
    }
    invocation.invoke_async(&mut conn).await
}

fn missed(what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Unavailable(format!("Redis, {what}: {e}"))
}

impl OwnedStorage for RedisStorage {
    fn join<'a>(
        &'a self,
        replica: &'a str,
        address: &'a str,
        lease_ms: u64,
    ) -> StorageFuture<'a, Vec<(String, String)>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let listed: Vec<String> = SCRIPTS
                .members
                .key(members_key(&self.prefix))
                .key(format!("{}:addr", members_key(&self.prefix)))
                .arg(replica)
                .arg(address)
                .arg(lease_ms)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| missed("joining the replicas", e))?;
            Ok(listed
                .chunks(2)
                .filter_map(|pair| match pair {
                    [id, address] => Some((id.clone(), address.clone())),
                    _ => None,
                })
                .collect())
        })
    }

    fn acquire<'a>(
        &'a self,
        partition: u16,
        replica: &'a str,
        lease_ms: u64,
    ) -> StorageFuture<'a, Option<Taken>> {
        Box::pin(async move {
            let tag = tag(&self.prefix, partition);
            let mut conn = self.conn.clone();
            let reply: Vec<redis::Value> = SCRIPTS
                .acquire
                .key(format!("{tag}:lease"))
                .key(format!("{tag}:fence"))
                .arg(replica)
                .arg(lease_ms)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| missed("taking a partition's lease", e))?;
            let number = |i: usize| -> Option<i64> {
                reply
                    .get(i)
                    .and_then(|v| redis::from_redis_value_ref(v).ok())
            };
            if number(0) != Some(1) {
                return Ok(None);
            }
            let epoch = number(1).ok_or_else(|| StorageError::Corrupt("no lease epoch".into()))?;
            Ok(Some(Taken {
                epoch: epoch as u64,
                at_ms: number(2).unwrap_or(0),
            }))
        })
    }

    fn renew(&self, partition: u16, epoch: u64, lease_ms: u64) -> StorageFuture<'_, bool> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let renewed: i64 = SCRIPTS
                .renew
                .key(format!("{}:lease", tag(&self.prefix, partition)))
                .arg(epoch)
                .arg(lease_ms)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| missed("renewing a partition lease", e))?;
            Ok(renewed == 1)
        })
    }

    fn release(&self, partition: u16, epoch: u64) -> StorageFuture<'_, ()> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let _: i64 = SCRIPTS
                .release
                .key(format!("{}:lease", tag(&self.prefix, partition)))
                .arg(epoch)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| missed("giving a lease up", e))?;
            Ok(())
        })
    }

    fn write<'a>(
        &'a self,
        sections: &'a [&'a Section],
    ) -> Pin<Box<dyn Future<Output = Written> + Send + 'a>> {
        Box::pin(async move {
            if let Some(transactions) = &self.transactions {
                let partitions = sections.iter().map(|s| s.partition).collect();
                let written = transactions.write(&self.prefix, sections).await;
                return vec![(partitions, written)];
            }
            // One call on a standalone Redis; one a partition on a Cluster (a script's keys
            // share a slot), in parallel.
            let calls: Vec<WriteCall<'_>> = if self.cluster {
                let mut by_partition: std::collections::BTreeMap<u16, Vec<&Section>> =
                    std::collections::BTreeMap::new();
                for s in sections {
                    by_partition.entry(s.partition).or_default().push(s);
                }
                (by_partition.into_values())
                    .map(|of| WriteCall::of(&self.prefix, of))
                    .collect()
            } else {
                vec![WriteCall::of(&self.prefix, sections.iter().copied())]
            };
            let results = if calls.len() == 1 {
                let call = calls.into_iter().next().expect("one call");
                let result = invoke(self.conn.clone(), &self.write_script, &call).await;
                vec![(call.partitions, result)]
            } else {
                let mut running = JoinSet::new();
                for call in calls {
                    let (conn, script) = (self.conn.clone(), self.write_script.clone());
                    let call = call.into_owned();
                    running.spawn(async move {
                        let result = invoke(conn, &script, &call).await;
                        (call.partitions, result)
                    });
                }
                running.join_all().await
            };
            results
                .into_iter()
                .map(|(partitions, result)| {
                    let result = result.map_err(|e| {
                        let fenced: Option<u16> = (e.code() == Some("FENCED"))
                            .then(|| e.detail()?.split_whitespace().next()?.parse().ok())
                            .flatten();
                        match fenced {
                            Some(partition) => StorageError::Fenced(partition),
                            None if e.code() == Some("FENCED") => {
                                StorageError::Corrupt(format!("a fenced write: {e}"))
                            }
                            None => missed("writing a batch", e),
                        }
                    });
                    (partitions, result)
                })
                .collect()
        })
    }

    fn partition_index(&self, partition: u16) -> StorageFuture<'_, (Purchases, i64)> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            read_partition_index(&mut conn, &self.prefix, partition).await
        })
    }

    fn load<'a>(&'a self, account_id: &'a str) -> StorageFuture<'a, Option<StoredAccount>> {
        Box::pin(async move {
            let keys = AccountKeys::of(&self.prefix, self.partitions, account_id);
            let mut conn = self.conn.clone();
            let fields: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
                .arg(&keys.account)
                .query_async(&mut conn)
                .await
                .map_err(|e| missed("reading an account", e))?;
            let mut core = None;
            let mut records = Vec::with_capacity(fields.len().saturating_sub(1));
            for (field, value) in fields {
                if field == CORE_FIELD {
                    core = Some(value);
                } else {
                    records.push(value);
                }
            }
            match core {
                Some(core) => Ok(Some((core, records))),
                None if records.is_empty() => Ok(None),
                None => Err(StorageError::Corrupt(format!(
                    "account {account_id:?} has records and no core"
                ))),
            }
        })
    }

    fn load_values<'a>(&'a self, keys: &'a [String]) -> StorageFuture<'a, Vec<Option<Vec<u8>>>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let mut conn = self.conn.clone();
            // MGET answers an array even for one key.
            redis::cmd("MGET")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .map_err(|e| missed("reading rate limit counters", e))
        })
    }
}

/// Accounts with a purchase in flight or notifications to deliver, and the open holds, of a
/// partition.
async fn read_partition_index(
    conn: &mut Connection,
    prefix: &str,
    partition: u16,
) -> Result<(Purchases, i64), StorageError> {
    let tag = tag(prefix, partition);
    let found: HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(format!("{tag}:pur"))
        .query_async(conn)
        .await
        .map_err(|e| missed("reading purchases in flight", e))?;
    let purchases = (found.into_iter())
        .map(|(id, at)| (id, Timestamp::from_millis(at)))
        .collect();
    let fence: Option<Vec<u8>> = redis::cmd("GET")
        .arg(format!("{tag}:fence"))
        .query_async(conn)
        .await
        .map_err(|e| missed("reading open holds", e))?;
    let holds = fence.as_deref().map(Fence::parse).transpose()?;
    Ok((purchases, holds.map_or(0, |f| f.holds)))
}

#[cfg(test)]
mod tests {
    use super::super::owned::Op;
    use super::*;

    #[test]
    fn a_fence_reads_back_what_it_wrote_and_refuses_anything_else() {
        let fence = Fence {
            epoch: 1_800_000_000_123,
            seq: 42,
            holds: 7,
        };
        assert_eq!(fence.value(), "1800000000123:42:7");
        assert_eq!(Fence::parse(fence.value().as_bytes()), Ok(fence));
        for bad in [
            "", "1:2", "1:2:3:4", "x:2:3", "1:-2:3", "1:2:", "1::3", "\u{ff}",
        ] {
            let refused = Fence::parse(bad.as_bytes());
            assert!(
                matches!(&refused, Err(StorageError::Corrupt(why)) if why.contains("epoch:batch:holds")),
                "{bad:?}: {refused:?}"
            );
        }
    }

    #[test]
    fn a_call_names_each_key_once_and_counts_each_sections_arguments() {
        let op = |code: &'static [u8], key: &str, arg: &[u8]| Op {
            code,
            key: key.into(),
            args: vec![arg.to_vec()],
        };
        let first = [
            op(b"h", "p:{o1}:a:x", b"core"),
            op(b"h", "p:{o1}:a:x", b"again"),
        ];
        let second = [op(b"h", "p:{o2}:r:y", b"f")];
        let mut call = WriteCall::default();
        call.section("p:{o1}", 1, 7, 3, 5, &first);
        call.section("p:{o2}", 2, 9, 1, 0, &second);
        assert_eq!(call.partitions, [1, 2]);
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
                "1", "1", "7", "3", "5", "6", "h", "2", "core", "h", "2", "again", "3", "2", "9",
                "1", "0", "3", "h", "4", "f"
            ]
        );
    }
}
