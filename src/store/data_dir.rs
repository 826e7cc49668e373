//! The embedded durable backing store: one fjall database in `store.data_dir` that keeps what
//! the memory store decides, so that an acknowledged charge, grant, hold or top-up survives a
//! crash and a restart.
//!
//! Why fjall: it is an LSM tree whose writes are appended to a checksummed journal, so a batch
//! of many accounts' changes costs one sequential append (synced at checkpoints; the commit
//! log makes each batch durable first), where a B-tree such as redb rewrites a page per
//! account touched. Recovery
//! replays the journal, not the data, so start-up does not grow with the number of accounts;
//! a torn last batch (a crash in the middle of a write) fails its checksum and is dropped whole,
//! as fjall documents (`RecoveryMode::TolerateCorruptTail`), and a batch that was synced is
//! never torn. The database holds a lock file, which keeps a second process off the directory.
//!
//! Layout (keyspaces):
//! - `accounts`: account id → the core of the account's persisted form (`domain::persisted`);
//! - `records`: account id, `0xFF`, record kind, record number (big endian) → a record the
//!   account keeps for retries; written once when made, deleted when forgotten;
//! - `history`: account id, `0xFF`, charge number (big endian) → the charge; the newest
//!   `recent_events` of each account are kept (UTF-8 never contains `0xFF`, so one account's
//!   prefix never matches another's keys);
//! - `export`: offset (big endian) → account id and charge, the newest `export_max_len` kept;
//! - `export_groups`: group → its next offset and its pending deliveries;
//! - `purchases`: account id → since when the maintenance pass must visit it: when its auto
//!   top-up purchase in flight started, or its oldest undelivered notification was recorded;
//! - `meta`: the format version, the counters the store reports without a scan, and the number
//!   of batches written.
//!
//! Beside the database, `commit-log/` holds the [commit log](super::commit_log): a batch is
//! durable once it is there, and is applied to the database afterwards without a sync of its
//! own. The database is synced at checkpoints, after which the log's older segments are
//! removed; every batch the database holds carries its number (meta key `batches`), so a start
//! replays exactly the batches of the log past that number. The log starts at the batch after
//! the last checkpoint; a database that recovered less than that (its journal damaged before
//! its end: fjall drops everything after a damaged entry as if it were a torn tail) has lost
//! acknowledged batches, and the start is refused rather than continue without them.
//!
//! Only [`super::group_commit`]'s applier writes accounts, history and the export (one
//! database batch for the net effect of the log batches it holds); export reads and
//! acknowledgements write group state directly.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fjall::{Database, JournalRecoveryError, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::commit_log::{self, CommitLog, LogError};
use super::export_log::Group;
use super::{ExportRead, StoreError};
use crate::domain::{
    AccountState, AccountWrite, ExportedEvent, FORMAT_VERSION, RecordKind, RecordValue, Timestamp,
    UsageEvent, decode_account_of, decode_event, encode_account_changes, encode_event,
};

/// Why a data dir could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "data dir {path} is in use by another quotad process (one data dir, one writer); \
         stop the other process or give this one its own data dir"
    )]
    Locked { path: PathBuf },
    #[error(
        "data dir {path} was written in persisted format {found}, and this quotad reads format \
         {supported} only; run the quotad version that wrote it, or start with an empty data dir"
    )]
    Version {
        path: PathBuf,
        found: u16,
        supported: u16,
    },
    #[error(
        "data dir {path}: its database recovered {recovered} batches, but its commit log starts \
         at batch {first}: the batches between were acknowledged and are lost (the database's \
         journal was damaged); restore the data dir from a backup, or remove {log} to accept \
         the loss and start from what the database holds"
    )]
    Lost {
        path: PathBuf,
        log: PathBuf,
        recovered: u64,
        first: u64,
    },
    #[error("data dir {path}: {source}; restore the data dir from a backup")]
    Log { path: PathBuf, source: LogError },
    #[error("data dir {path}: {reason}")]
    Open { path: PathBuf, reason: String },
}

/// Why the commit log could not be replayed.
enum Recovery {
    Lost { recovered: u64, first: u64 },
    Log(LogError),
    Store(StoreError),
}

/// One decision's changes to an account, to be made durable by one group commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub account_id: String,
    /// The account's core after the decision, and its records made and forgotten since the
    /// last change.
    pub state: AccountWrite,
    /// Charges the decision made, oldest first.
    pub events: Vec<UsageEvent>,
    /// How many of the account's charges its history keeps, and how many events the export
    /// keeps (the limits in force when the decision was made).
    pub recent_keep: u32,
    pub export_keep: u64,
    /// The change in the store's count of open reservations.
    pub holds_delta: i64,
    pub purchase: PurchaseIndex,
}

/// What a decision did to the index of purchases in flight (and of accounts with
/// notifications to deliver: the same index, see `MemoryStore`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurchaseIndex {
    Unchanged,
    Started(Timestamp),
    Ended,
}

impl Change {
    /// What the account changed since its last change was taken (it then counts as written).
    pub fn new(account_id: &str, state: &mut AccountState) -> Change {
        Change {
            account_id: account_id.to_owned(),
            state: encode_account_changes(state),
            events: Vec::new(),
            recent_keep: 0,
            export_keep: 0,
            holds_delta: 0,
            purchase: PurchaseIndex::Unchanged,
        }
    }
}

/// A batch's changes as the commit log holds them (integers little endian; strings and byte
/// strings as a u32 length and the bytes): the change count, then each change's account id,
/// core, added records (kind tag, number, bytes), forgotten record ranges (kind tag, start,
/// end), usage events (each as `encode_event` makes it), history and export limits, holds
/// delta, and purchase index (0 unchanged, 1 started at a u64 of milliseconds, 2 ended).
pub fn encode_changes(changes: &[Change]) -> Vec<u8> {
    fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }
    let mut out = Vec::with_capacity(changes.len() * 512);
    out.extend_from_slice(&(changes.len() as u32).to_le_bytes());
    for change in changes {
        bytes(&mut out, change.account_id.as_bytes());
        bytes(&mut out, &change.state.core);
        out.extend_from_slice(&(change.state.added.len() as u32).to_le_bytes());
        for record in &change.state.added {
            out.push(record.kind.tag());
            out.extend_from_slice(&record.seq.to_le_bytes());
            bytes(&mut out, &record.bytes);
        }
        out.extend_from_slice(&(change.state.forgotten.len() as u32).to_le_bytes());
        for (kind, numbers) in &change.state.forgotten {
            out.push(kind.tag());
            out.extend_from_slice(&numbers.start.to_le_bytes());
            out.extend_from_slice(&numbers.end.to_le_bytes());
        }
        out.extend_from_slice(&(change.events.len() as u32).to_le_bytes());
        for event in &change.events {
            bytes(&mut out, &encode_event(&change.account_id, event));
        }
        out.extend_from_slice(&change.recent_keep.to_le_bytes());
        out.extend_from_slice(&change.export_keep.to_le_bytes());
        out.extend_from_slice(&change.holds_delta.to_le_bytes());
        match change.purchase {
            PurchaseIndex::Unchanged => out.push(0),
            PurchaseIndex::Started(at) => {
                out.push(1);
                out.extend_from_slice(&(at.as_millis() as u64).to_le_bytes());
            }
            PurchaseIndex::Ended => out.push(2),
        }
    }
    out
}

/// Reads what [`encode_changes`] wrote; anything else is an error saying where it went wrong.
pub fn decode_changes(bytes: &[u8]) -> Result<Vec<Change>, String> {
    let mut r = Reader(bytes);
    let count = r.count("changes", 8)?;
    let mut changes = Vec::with_capacity(count);
    for _ in 0..count {
        let account_id = std::str::from_utf8(r.bytes("an account id")?)
            .map_err(|_| "an account id is not UTF-8".to_owned())?
            .to_owned();
        let core = r.bytes("an account core")?.to_vec();
        let mut added = Vec::with_capacity(r.count("records", 13)?);
        for _ in 0..added.capacity() {
            let kind = r.kind()?;
            let seq = r.u64("a record number")?;
            let bytes = r.bytes("a record")?.to_vec();
            added.push(RecordValue { kind, seq, bytes });
        }
        let mut forgotten = Vec::with_capacity(r.count("forgotten ranges", 17)?);
        for _ in 0..forgotten.capacity() {
            let kind = r.kind()?;
            let start = r.u64("a range")?;
            let end = r.u64("a range")?;
            forgotten.push((kind, start..end));
        }
        let mut events = Vec::with_capacity(r.count("events", 4)?);
        for _ in 0..events.capacity() {
            let (owner, event) =
                decode_event(r.bytes("an event")?).map_err(|e| format!("an event: {e}"))?;
            if owner != account_id {
                return Err(format!("an event of {account_id:?} names {owner:?}"));
            }
            events.push(event);
        }
        let recent_keep = r.u32("the history limit")?;
        let export_keep = r.u64("the export limit")?;
        let holds_delta = r.u64("the holds delta")? as i64;
        let purchase = match r.u8("the purchase index")? {
            0 => PurchaseIndex::Unchanged,
            1 => PurchaseIndex::Started(Timestamp::from_millis(r.u64("a purchase")? as i64)),
            2 => PurchaseIndex::Ended,
            other => return Err(format!("unknown purchase index change {other}")),
        };
        changes.push(Change {
            account_id,
            state: AccountWrite {
                core,
                added,
                forgotten,
            },
            events,
            recent_keep,
            export_keep,
            holds_delta,
            purchase,
        });
    }
    if !r.0.is_empty() {
        return Err(format!("{} bytes follow its last change", r.0.len()));
    }
    Ok(changes)
}

/// Reads a commit log payload front to back.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let (head, tail) = self
            .0
            .split_at_checked(n)
            .ok_or_else(|| format!("it ends inside {what}"))?;
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn bytes(&mut self, what: &str) -> Result<&'a [u8], String> {
        let len = self.u32(what)? as usize;
        self.take(len, what)
    }

    /// A count of items each at least `least` bytes long: one past what is left is corrupt
    /// (and must not size an allocation).
    fn count(&mut self, what: &str, least: usize) -> Result<usize, String> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(least) > self.0.len() {
            return Err(format!("its count of {what} ({n}) is more than it holds"));
        }
        Ok(n)
    }

    fn kind(&mut self) -> Result<RecordKind, String> {
        let tag = self.u8("a record kind")?;
        RecordKind::from_tag(tag).ok_or_else(|| format!("unknown record kind {tag}"))
    }
}

/// Counters kept in `meta`, carried by the writer from batch to batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub open_holds: i64,
    /// The next export offset.
    pub export_next: u64,
    /// Batches written since the data dir was created.
    pub batches: u64,
}

pub struct DataDir {
    path: PathBuf,
    db: Database,
    accounts: Keyspace,
    records: Keyspace,
    history: Keyspace,
    export: Keyspace,
    groups: Keyspace,
    purchases: Keyspace,
    meta: Keyspace,
    /// Export reads and acknowledgements change group state: one at a time.
    export_lock: Mutex<()>,
}

impl std::fmt::Debug for DataDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataDir").field("path", &self.path).finish()
    }
}

/// Journals fjall keeps before it flushes memtables to make room: what a start replays, so
/// it bounds start-up time and the disk the journal takes (fjall's default is 512 MiB).
const JOURNAL_BYTES: u64 = 128 << 20;
/// Each keyspace's memtable. fjall's default of 64 MiB in each of seven keyspaces would be
/// most of quotad's memory, for writes that are already durable in the commit log. Much
/// smaller ones flush and compact more often; while the database was synced on the answer's
/// path, 8 MiB tripled the p99 of a Reserve at 4,000 tasks/s (2-core VM). Off that path,
/// 4 and 32 MiB did not differ beyond the noise of that machine.
const MEMTABLE_BYTES: u64 = 32 << 20;
const FORMAT_KEY: &[u8] = b"format";
const OPEN_HOLDS_KEY: &[u8] = b"open_holds";
const EXPORT_NEXT_KEY: &[u8] = b"export_next";
const BATCHES_KEY: &[u8] = b"batches";
const LOG_DIR: &str = "commit-log";
const HISTORY_SEPARATOR: u8 = 0xFF;

fn history_key(account_id: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(account_id.len() + 9);
    key.extend_from_slice(account_id.as_bytes());
    key.push(HISTORY_SEPARATOR);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn record_key(account_id: &str, kind: RecordKind, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(account_id.len() + 10);
    key.extend_from_slice(account_id.as_bytes());
    key.push(HISTORY_SEPARATOR);
    key.push(kind.tag());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// fjall's error for an operator: its `Display` is its `Debug` form, which names a variant but
/// not what to do. The variant's name stays in the text, for a search.
fn describe(err: &fjall::Error) -> String {
    match err {
        fjall::Error::JournalRecovery(JournalRecoveryError::ChecksumMismatch) => {
            "a batch in its database journal fails its checksum (ChecksumMismatch) with whole \
             batches after it: that is damage, not a torn last write, and those batches were \
             acknowledged. Restore the data dir from a backup"
                .into()
        }
        fjall::Error::JournalRecovery(kind) => format!(
            "its database journal is damaged ({kind:?}). Restore the data dir from a backup"
        ),
        fjall::Error::Io(io) => format!("I/O error: {io}"),
        other => format!("{other:?}"),
    }
}

fn failed(what: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("data dir: {what}: {err}"))
}

fn corrupt(what: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("data dir holds a corrupt {what}: {err}"))
}

fn read_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// The tables a write touches beside the accounts'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Table {
    Records,
    History,
    Export,
    Purchases,
}

/// What a key ends up as after a run of changes.
#[derive(Debug)]
struct Slot<'a> {
    /// The value to write, or `None` for a removal.
    value: Option<Cow<'a, [u8]>>,
    /// Made within these changes: the database does not hold it yet, so dropping it again
    /// needs no removal.
    made_here: bool,
}

/// The net effect of a run of changes on the database, by key (sorted, so that the
/// memtables take them in order).
#[derive(Debug, Default)]
struct NetWrite<'a> {
    cores: BTreeMap<&'a str, &'a [u8]>,
    keys: BTreeMap<(Table, Vec<u8>), Slot<'a>>,
}

impl<'a> NetWrite<'a> {
    /// The net effect of `changes`, numbering their charges in the export from `counters`.
    fn of(changes: &'a [Change], counters: &mut Counters) -> NetWrite<'a> {
        let mut net = NetWrite::default();
        for change in changes {
            let id = change.account_id.as_str();
            net.cores.insert(id, &change.state.core);
            for (kind, numbers) in &change.state.forgotten {
                for seq in numbers.clone() {
                    net.remove(Table::Records, record_key(id, *kind, seq));
                }
            }
            for record in &change.state.added {
                net.add(
                    Table::Records,
                    record_key(id, record.kind, record.seq),
                    Cow::Borrowed(&record.bytes),
                );
            }
            for event in &change.events {
                let encoded = encode_event(id, event);
                let keep = u64::from(change.recent_keep);
                net.add(
                    Table::History,
                    history_key(id, event.seq),
                    Cow::Owned(encoded.clone()),
                );
                if event.seq > keep {
                    net.remove(Table::History, history_key(id, event.seq - keep));
                }
                let offset = counters.export_next;
                counters.export_next += 1;
                net.add(
                    Table::Export,
                    offset.to_be_bytes().to_vec(),
                    Cow::Owned(encoded),
                );
                let keep = change.export_keep.max(1);
                if offset >= keep {
                    net.remove(Table::Export, (offset - keep).to_be_bytes().to_vec());
                }
            }
            counters.open_holds += change.holds_delta;
            match change.purchase {
                PurchaseIndex::Unchanged => {}
                PurchaseIndex::Started(at) => net.put(
                    Table::Purchases,
                    id.as_bytes().to_vec(),
                    Some(Cow::Owned((at.as_millis() as u64).to_be_bytes().to_vec())),
                ),
                PurchaseIndex::Ended => net.put(Table::Purchases, id.as_bytes().to_vec(), None),
            }
        }
        net
    }

    /// A key written once, when made.
    fn add(&mut self, table: Table, key: Vec<u8>, value: Cow<'a, [u8]>) {
        self.keys.insert(
            (table, key),
            Slot {
                value: Some(value),
                made_here: true,
            },
        );
    }

    /// The end of a key written once: nothing at all if it was made within these changes.
    fn remove(&mut self, table: Table, key: Vec<u8>) {
        match self.keys.entry((table, key)) {
            Entry::Occupied(slot) if slot.get().made_here => {
                slot.remove();
            }
            Entry::Occupied(mut slot) => slot.get_mut().value = None,
            Entry::Vacant(slot) => {
                slot.insert(Slot {
                    value: None,
                    made_here: false,
                });
            }
        }
    }

    /// A key that may be written many times (`None`: removed): the last write wins.
    fn put(&mut self, table: Table, key: Vec<u8>, value: Option<Cow<'a, [u8]>>) {
        self.keys.insert(
            (table, key),
            Slot {
                value,
                made_here: false,
            },
        );
    }
}

impl DataDir {
    /// Opens (or creates) the data dir in `path`: the database, brought up to date with what
    /// the commit log holds past it, and a new log for the batches to come, in segments of
    /// `segment_bytes`. `cache` is the block cache's size in bytes.
    pub fn open(
        path: &Path,
        cache: u64,
        segment_bytes: u64,
    ) -> Result<(DataDir, CommitLog), DataDirError> {
        let path_buf = path.to_path_buf();
        let open_err = |reason: String| DataDirError::Open {
            path: path_buf.clone(),
            reason,
        };
        std::fs::create_dir_all(path).map_err(|e| open_err(format!("cannot create it: {e}")))?;
        let db = Database::builder(path)
            .cache_size(cache)
            .max_journaling_size(JOURNAL_BYTES)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => DataDirError::Locked {
                    path: path_buf.clone(),
                },
                other => open_err(describe(&other)),
            })?;
        let keyspace = |name: &str| {
            db.keyspace(name, || {
                KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
            })
            .map_err(|e| open_err(format!("keyspace {name}: {e}")))
        };
        let dir = DataDir {
            accounts: keyspace("accounts")?,
            records: keyspace("records")?,
            history: keyspace("history")?,
            export: keyspace("export")?,
            groups: keyspace("export_groups")?,
            purchases: keyspace("purchases")?,
            meta: keyspace("meta")?,
            db,
            path: path_buf.clone(),
            export_lock: Mutex::new(()),
        };
        match dir
            .meta
            .get(FORMAT_KEY)
            .map_err(|e| open_err(e.to_string()))?
        {
            Some(found) => {
                let found = <[u8; 2]>::try_from(&*found)
                    .map(u16::from_le_bytes)
                    .map_err(|_| open_err("its format version is unreadable".into()))?;
                if found != FORMAT_VERSION {
                    return Err(DataDirError::Version {
                        path: path_buf,
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
            }
            None => {
                let empty = dir
                    .accounts
                    .is_empty()
                    .map_err(|e| open_err(e.to_string()))?;
                if !empty {
                    return Err(open_err(
                        "it holds accounts but no format version; it was not written by quotad"
                            .into(),
                    ));
                }
                let mut batch = dir.db.batch().durability(Some(PersistMode::SyncAll));
                batch.insert(&dir.meta, FORMAT_KEY, FORMAT_VERSION.to_le_bytes().to_vec());
                batch.commit().map_err(|e| open_err(e.to_string()))?;
            }
        }
        let log = dir.recover().map_err(|e| match e {
            Recovery::Lost { recovered, first } => DataDirError::Lost {
                path: path_buf.clone(),
                log: path.join(LOG_DIR),
                recovered,
                first,
            },
            Recovery::Log(source) => DataDirError::Log {
                path: path_buf.clone(),
                source,
            },
            Recovery::Store(e) => open_err(e.to_string()),
        })?;
        let log =
            CommitLog::start(&path.join(LOG_DIR), segment_bytes, log + 1).map_err(|source| {
                DataDirError::Log {
                    path: path_buf.clone(),
                    source,
                }
            })?;
        Ok((dir, log))
    }

    /// Replays into the database the batches of the commit log it does not hold, and syncs
    /// it; returns the number of the last batch.
    fn recover(&self) -> Result<u64, Recovery> {
        let recovered = commit_log::recover(&self.path.join(LOG_DIR)).map_err(Recovery::Log)?;
        let mut counters = self.counters().map_err(Recovery::Store)?;
        let held = counters.batches;
        if let Some(first) = recovered.first
            && first > held + 1
        {
            return Err(Recovery::Lost {
                recovered: held,
                first,
            });
        }
        let mut replayed = false;
        for (batch, payload) in recovered.batches {
            if batch <= counters.batches {
                continue;
            }
            let changes = decode_changes(&payload)
                .map_err(|e| Recovery::Store(corrupt(&format!("commit log batch {batch}"), e)))?;
            self.write(&changes, &mut counters, batch)
                .map_err(|e| Recovery::Store(failed("replaying the commit log", e)))?;
            replayed = true;
        }
        if replayed {
            tracing::info!(
                path = %self.path.display(),
                from = held + 1,
                to = counters.batches,
                "replayed the commit log into the database"
            );
        }
        self.checkpoint()
            .map_err(|e| Recovery::Store(failed("syncing the database", e)))?;
        Ok(counters.batches)
    }

    /// Makes everything written to the database so far durable in it (the commit log may then
    /// drop it).
    pub fn checkpoint(&self) -> Result<(), fjall::Error> {
        self.db.persist(PersistMode::SyncAll)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes the database takes on disk.
    pub fn disk_space(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }

    /// The counters as the last batch left them.
    pub fn counters(&self) -> Result<Counters, StoreError> {
        let get = |key: &[u8]| -> Result<u64, StoreError> {
            match self.meta.get(key).map_err(|e| failed("reading meta", e))? {
                None => Ok(0),
                Some(bytes) => read_u64(&bytes).ok_or_else(|| corrupt("counter", "not 8 bytes")),
            }
        };
        Ok(Counters {
            open_holds: get(OPEN_HOLDS_KEY)? as i64,
            export_next: get(EXPORT_NEXT_KEY)?,
            batches: get(BATCHES_KEY)?,
        })
    }

    /// The account as last written, if it was ever written.
    pub fn load_account(&self, account_id: &str) -> Result<Option<AccountState>, StoreError> {
        let Some(core) = self
            .accounts
            .get(account_id)
            .map_err(|e| failed("reading an account", e))?
        else {
            return Ok(None);
        };
        let mut prefix = account_id.as_bytes().to_vec();
        prefix.push(HISTORY_SEPARATOR);
        let records = (self.records.prefix(&prefix))
            .map(|entry| entry.value())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| failed("reading an account's records", e))?;
        let what = format!("account {account_id:?}");
        let state = decode_account_of(account_id, &core, records.iter().map(|r| &r[..]))
            .map_err(|e| corrupt(&what, e))?;
        Ok(Some(state))
    }

    /// The newest `limit` charges of an account, newest first.
    pub fn history(&self, account_id: &str, limit: usize) -> Result<Vec<UsageEvent>, StoreError> {
        let mut prefix = account_id.as_bytes().to_vec();
        prefix.push(HISTORY_SEPARATOR);
        let mut events = Vec::new();
        for entry in self.history.prefix(&prefix).rev().take(limit) {
            let (_, value) = entry
                .into_inner()
                .map_err(|e| failed("reading history", e))?;
            let (_, event) = decode_event(&value).map_err(|e| corrupt("usage event", e))?;
            events.push(event);
        }
        Ok(events)
    }

    /// Accounts the maintenance pass must visit (a purchase in flight, notifications to
    /// deliver) and since when.
    pub fn purchases(&self) -> Result<Vec<(String, Timestamp)>, StoreError> {
        let mut found = Vec::new();
        for entry in self.purchases.iter() {
            let (key, value) = entry
                .into_inner()
                .map_err(|e| failed("reading purchases", e))?;
            let id = String::from_utf8(key.to_vec()).map_err(|e| corrupt("purchase key", e))?;
            let started = read_u64(&value).ok_or_else(|| corrupt("purchase", "not 8 bytes"))?;
            found.push((id, Timestamp::from_millis(started as i64)));
        }
        Ok(found)
    }

    /// Writes the changes of the commit log's batches up to `last_batch` as one atomic batch
    /// of the database, handed to the OS but not synced: the commit log made them durable.
    ///
    /// Only the net effect is written, since the batch lands whole or not at all: an account
    /// several decisions changed has its last core written, and a record, a charge of history
    /// or an export event both made and dropped within these changes is not written at all
    /// (each of those keys is written once, when made, so the database cannot hold it yet).
    /// Under load the applier hands over many batches at once, and a busy account's
    /// decisions then cost one write.
    pub fn write(
        &self,
        changes: &[Change],
        counters: &mut Counters,
        last_batch: u64,
    ) -> Result<(), fjall::Error> {
        let net = NetWrite::of(changes, counters);
        let mut batch = self.db.batch().durability(Some(PersistMode::Buffer));
        for (id, core) in net.cores {
            batch.insert(&self.accounts, id, core);
        }
        for ((table, key), slot) in net.keys {
            let keyspace = match table {
                Table::Records => &self.records,
                Table::History => &self.history,
                Table::Export => &self.export,
                Table::Purchases => &self.purchases,
            };
            match slot.value {
                Some(value) => batch.insert(keyspace, key, &*value),
                None => batch.remove(keyspace, key),
            }
        }
        batch.insert(
            &self.meta,
            OPEN_HOLDS_KEY,
            (counters.open_holds as u64).to_be_bytes().to_vec(),
        );
        batch.insert(
            &self.meta,
            EXPORT_NEXT_KEY,
            counters.export_next.to_be_bytes().to_vec(),
        );
        counters.batches = last_batch;
        batch.insert(
            &self.meta,
            BATCHES_KEY,
            counters.batches.to_be_bytes().to_vec(),
        );
        batch.commit()
    }

    /// A consumer group's read of the export, with the semantics of the memory store's
    /// (`export_log`): a group starts at the oldest retained event; what it was given stays
    /// pending until acknowledged and is delivered again once idle past `claim_idle_ms`.
    pub fn export_read(
        &self,
        read: &ExportRead,
        now: Timestamp,
    ) -> Result<Vec<ExportedEvent>, StoreError> {
        let _one_at_a_time = self.export_lock.lock().unwrap_or_else(|e| e.into_inner());
        let first = match self.export.first_key_value() {
            Some(entry) => {
                let key = entry.key().map_err(|e| failed("reading the export", e))?;
                read_u64(&key).ok_or_else(|| corrupt("export key", "not 8 bytes"))?
            }
            None => self.counters()?.export_next,
        };
        let end = self.counters()?.export_next;
        let mut group = self
            .group(&read.group)?
            .unwrap_or_else(|| Group::starting_at(first));
        let mut events = Vec::new();
        for offset in group.deliver(first, end, read, now) {
            let Some(value) = self
                .export
                .get(offset.to_be_bytes())
                .map_err(|e| failed("reading the export", e))?
            else {
                // Trimmed since (or never written, past a crash): nothing to deliver.
                group.pending.remove(&offset);
                continue;
            };
            let (account_id, event) = decode_event(&value).map_err(|e| corrupt("export", e))?;
            events.push(ExportedEvent {
                delivery_id: offset.to_string(),
                account_id,
                event,
            });
        }
        self.put_group(&read.group, &group)?;
        Ok(events)
    }

    /// Acknowledges deliveries; returns how many were pending. Unknown ids count for nothing.
    pub fn export_ack(&self, group_name: &str, delivery_ids: &[String]) -> Result<u64, StoreError> {
        let _one_at_a_time = self.export_lock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut group) = self.group(group_name)? else {
            return Ok(0);
        };
        let acked = group.ack(delivery_ids);
        if acked > 0 {
            self.put_group(group_name, &group)?;
        }
        Ok(acked)
    }

    fn group(&self, name: &str) -> Result<Option<Group>, StoreError> {
        match self
            .groups
            .get(name)
            .map_err(|e| failed("reading an export group", e))?
        {
            None => Ok(None),
            Some(bytes) => decode_group(&bytes)
                .map(Some)
                .ok_or_else(|| corrupt("export group", "bad length")),
        }
    }

    fn put_group(&self, name: &str, group: &Group) -> Result<(), StoreError> {
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        batch.insert(&self.groups, name, encode_group(group));
        batch
            .commit()
            .map_err(|e| failed("writing an export group", e))
    }
}

/// A consumer group on disk: its next offset, then each pending delivery's offset and when it
/// was delivered (milliseconds), all big endian.
fn encode_group(group: &Group) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 16 * group.pending.len());
    out.extend_from_slice(&group.next.to_be_bytes());
    for (offset, at) in &group.pending {
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&at.as_millis().to_be_bytes());
    }
    out
}

fn decode_group(bytes: &[u8]) -> Option<Group> {
    let (next, mut rest) = bytes.split_at_checked(8)?;
    if rest.len() % 16 != 0 {
        return None;
    }
    let mut group = Group::starting_at(read_u64(next)?);
    while let Some((entry, tail)) = rest.split_at_checked(16) {
        let (offset, at) = entry.split_at(8);
        let at = Timestamp::from_millis(read_u64(at)? as i64);
        group.pending.insert(read_u64(offset)?, at);
        rest = tail;
    }
    Some(group)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::domain::{Account, Funding, Usage};

    fn change(id: &str, n: u64) -> Change {
        let mut state = AccountState::new(Account {
            id: id.into(),
            plan: crate::domain::intern("plus"),
            credit_purchase_allowed: true,
        });
        let mut change = Change::new(id, &mut state);
        change.state.added.push(RecordValue {
            kind: RecordKind::Request,
            seq: n,
            bytes: vec![7; n as usize % 50],
        });
        change.state.forgotten.push((RecordKind::Closed, 1..n + 1));
        change.events.push(UsageEvent {
            seq: n + 1,
            at: Timestamp::from_millis(1_700_000_000_000 + n as i64),
            product: crate::domain::intern("codex"),
            usage: Usage {
                model: Arc::from("gpt-5.5-mini"),
                input_tokens: n,
                cached_input_tokens: 0,
                output_tokens: 3,
                images: 0,
                fast_mode: n.is_multiple_of(2),
            },
            charged: Funding::new(n as i64, 1),
            reservation_id: Arc::from(format!("r{n}")),
            price_version: crate::domain::intern("v1"),
        });
        change.recent_keep = 100;
        change.export_keep = 1_000_000;
        change.holds_delta = -(n as i64 % 3);
        change.purchase = match n % 3 {
            0 => PurchaseIndex::Unchanged,
            1 => PurchaseIndex::Started(Timestamp::from_millis(n as i64 * 1000)),
            _ => PurchaseIndex::Ended,
        };
        change
    }

    #[test]
    fn a_damaged_journal_is_told_as_damage_with_what_to_do() {
        let damaged = describe(&fjall::Error::JournalRecovery(
            JournalRecoveryError::ChecksumMismatch,
        ));
        assert!(
            damaged.contains("ChecksumMismatch") && damaged.contains("backup"),
            "{damaged}"
        );
        let io = describe(&fjall::Error::Io(std::io::Error::other("disk on fire")));
        assert_eq!(io, "I/O error: disk on fire");
    }

    #[test]
    fn a_batch_of_changes_reads_back_as_it_was_written() {
        let changes: Vec<Change> = (0..7).map(|n| change(&format!("acct-{n}"), n)).collect();
        assert_eq!(decode_changes(&encode_changes(&changes)).unwrap(), changes);
        assert_eq!(decode_changes(&encode_changes(&[])).unwrap(), vec![]);
    }

    const SEGMENT: u64 = 64 << 10;

    /// A change whose account reads back (no made-up records).
    fn loadable(id: &str, n: u64) -> Change {
        let mut change = change(id, n);
        change.state.added.clear();
        change.state.forgotten.clear();
        change
    }

    /// A change of `id` with charges numbered `seqs`, records `added` made and `dropped`
    /// forgotten, history and export each keeping two.
    fn charges(
        id: &str,
        seqs: std::ops::Range<u64>,
        added: &[u64],
        dropped: std::ops::Range<u64>,
    ) -> Change {
        let mut change = loadable(id, 1);
        let event = change.events.pop().unwrap();
        change.events = seqs
            .map(|seq| UsageEvent {
                seq,
                ..event.clone()
            })
            .collect();
        change.state.added = (added.iter())
            .map(|&seq| RecordValue {
                kind: RecordKind::Closed,
                seq,
                bytes: vec![1],
            })
            .collect();
        change.state.forgotten = vec![(RecordKind::Closed, dropped)];
        change.recent_keep = 2;
        change.export_keep = 2;
        change
    }

    #[test]
    fn a_write_leaves_out_what_its_own_changes_made_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (data, _log) = DataDir::open(dir.path(), 1 << 20, SEGMENT).unwrap();
        let mut counters = data.counters().unwrap();
        let count = |keyspace: &Keyspace| keyspace.iter().count();
        let records = |data: &DataDir| -> Vec<u64> {
            (data.records.iter())
                .map(|e| read_u64(&e.key().unwrap()[6..]).unwrap())
                .collect()
        };
        data.write(&[charges("acct", 1..3, &[1, 2], 0..0)], &mut counters, 1)
            .unwrap();
        assert_eq!(records(&data), [1, 2]);
        // Record 1 made earlier, 3 and 4 made here: all dropped; 5 kept. Charges 3 to 6
        // push 1 to 4 out of a history of two, and export offsets 0 to 3 out of the export.
        let changes = [
            charges("acct", 3..5, &[3, 4], 1..2),
            charges("acct", 5..7, &[5], 3..5),
        ];
        // What the write holds: each key made and dropped within it is absent, not written and
        // removed; a key the database holds is removed (`false`); the rest are written.
        let net = NetWrite::of(&changes, &mut counters.clone());
        let keys: Vec<(Table, u64, bool)> = (net.keys.iter())
            .filter(|((table, _), _)| *table != Table::Purchases)
            .map(|((table, key), slot)| {
                let number = read_u64(&key[key.len() - 8..]).unwrap();
                (*table, number, slot.value.is_some())
            })
            .collect();
        use Table::{Export, History, Records};
        assert_eq!(
            keys,
            [
                (Records, 1, false),
                (Records, 5, true),
                (History, 1, false),
                (History, 2, false),
                (History, 5, true),
                (History, 6, true),
                (Export, 0, false),
                (Export, 1, false),
                (Export, 4, true),
                (Export, 5, true),
            ]
        );
        assert_eq!(net.cores.len(), 1);
        let purchase = &net.keys[&(Table::Purchases, b"acct".to_vec())];
        assert!(purchase.value.is_some() && !purchase.made_here);
        data.write(&changes, &mut counters, 2).unwrap();
        assert_eq!(records(&data), [2, 5]);
        let seqs: Vec<u64> = (data.history("acct", 10).unwrap())
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [6, 5]);
        assert_eq!(count(&data.export), 2);
        assert_eq!(counters.export_next, 6);
    }

    #[test]
    fn a_start_replays_what_the_log_holds_past_the_database() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (data, mut log) = DataDir::open(dir.path(), 1 << 20, SEGMENT).unwrap();
            let mut counters = data.counters().unwrap();
            // Batch 1 reaches the database; batch 2 only the log, as when a crash comes
            // between the two.
            let first = vec![loadable("a", 1)];
            log.append(1, &encode_changes(&first)).unwrap();
            data.write(&first, &mut counters, 1).unwrap();
            log.append(2, &encode_changes(&[loadable("b", 2), loadable("a", 3)]))
                .unwrap();
        }
        let (data, log) = DataDir::open(dir.path(), 1 << 20, SEGMENT).unwrap();
        assert_eq!(log.next_batch(), 3);
        let counters = data.counters().unwrap();
        assert_eq!((counters.batches, counters.export_next), (2, 3));
        assert_eq!(counters.open_holds, -3);
        assert!(data.load_account("b").unwrap().is_some());
        let history = data.history("a", 10).unwrap();
        assert_eq!(
            history.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![4, 2]
        );
        assert_eq!(
            data.purchases().unwrap().len(),
            1,
            "a started, b ended, a unchanged"
        );
    }

    #[test]
    fn a_database_behind_the_start_of_the_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(DataDir::open(dir.path(), 1 << 20, SEGMENT).unwrap());
        // As if the database had lost batches 1 to 9, which a checkpoint had let the log drop.
        drop(CommitLog::start(&dir.path().join(LOG_DIR), SEGMENT, 10).unwrap());
        let err = DataDir::open(dir.path(), 1 << 20, SEGMENT).unwrap_err();
        assert!(
            matches!(
                err,
                DataDirError::Lost {
                    recovered: 0,
                    first: 10,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("backup"), "{err}");
    }

    proptest! {
        // The payload is checked by its frame's CRC before it is decoded, but the decoder
        // still never panics or allocates by a corrupt count.
        #[test]
        fn a_corrupt_payload_is_an_error_never_a_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let _ = decode_changes(&bytes);
        }

        #[test]
        fn a_damaged_payload_is_an_error_or_a_batch_never_a_panic(
            at in any::<prop::sample::Index>(),
            bit in 0u8..8,
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = encode_changes(&[change("a", 4), change("b", 5)]);
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
            let _ = decode_changes(&bytes);
            let _ = decode_changes(&bytes[..cut.index(bytes.len())]);
        }
    }
}
