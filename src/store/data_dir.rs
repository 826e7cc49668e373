//! The embedded durable backing store: one fjall database in `store.data_dir` that keeps what
//! the memory store decides, so that an acknowledged charge, grant, hold or top-up survives a
//! crash and a restart.
//!
//! Why fjall: it is an LSM tree whose writes are appended to a checksummed journal, so a batch
//! of many accounts' changes costs one sequential append and one `fdatasync`, which is what
//! group commit needs (a B-tree such as redb rewrites a page per account touched). Recovery
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
//! - `purchases`: account id → when its auto top-up purchase in flight started;
//! - `meta`: the format version, the counters the store reports without a scan, and the number
//!   of batches written.
//!
//! Beside the database, `quotad.mark` holds the number of the last batch fjall confirmed as
//! synced, rewritten in place after every batch (no sync of its own: it only has to outlive
//! the process, and after a power loss it can only be behind). fjall drops everything after a
//! damaged journal entry as if it were a torn tail, even when the damage is in the middle of
//! the journal and the batches after it were synced and acknowledged. Comparing the batch count
//! fjall recovered with the mark turns that silent loss into a refusal to start.
//!
//! Only [`super::group_commit`] writes accounts, history and the export (one batch, one sync,
//! per group); export reads and acknowledgements write group state directly.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::export_log::Group;
use super::{ExportRead, StoreError};
use crate::domain::{
    AccountState, AccountWrite, ExportedEvent, FORMAT_VERSION, RecordKind, Timestamp, UsageEvent,
    decode_account, decode_event, encode_account_changes, encode_event,
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
        "data dir {path} recovered {recovered} batches, but quotad had written {written}: its \
         journal was damaged before its end and the database dropped acknowledged writes while \
         recovering; restore the data dir from a backup, or remove {mark} to accept the loss"
    )]
    Lost {
        path: PathBuf,
        mark: PathBuf,
        recovered: u64,
        written: u64,
    },
    #[error("data dir {path}: {reason}")]
    Open { path: PathBuf, reason: String },
}

/// One decision's changes to an account, to be made durable by one group commit.
#[derive(Debug)]
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

/// What a decision did to the index of purchases in flight.
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
    /// `quotad.mark`: the number of the last batch written.
    mark: std::fs::File,
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
/// most of quotad's memory, for writes that are already durable in the journal; much smaller
/// ones flush so often that the flushes show in the tail latency of the syncs (8 MiB: p99 of
/// a Reserve at 4,000 tasks/s three times that of 32 MiB, on a 2-core VM).
const MEMTABLE_BYTES: u64 = 32 << 20;
const FORMAT_KEY: &[u8] = b"format";
const OPEN_HOLDS_KEY: &[u8] = b"open_holds";
const EXPORT_NEXT_KEY: &[u8] = b"export_next";
const BATCHES_KEY: &[u8] = b"batches";
const MARK_FILE: &str = "quotad.mark";
/// Mixed into the mark's check word, so that a zeroed or foreign file does not read as a mark.
const MARK_CHECK: u64 = 0x7175_6f74_6164_6d6b;
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

fn failed(what: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("data dir: {what}: {err}"))
}

fn corrupt(what: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("data dir holds a corrupt {what}: {err}"))
}

fn read_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// The mark's bytes: the batch number and a check word.
fn encode_mark(batches: u64) -> [u8; 16] {
    let mut bytes = [0; 16];
    bytes[..8].copy_from_slice(&batches.to_le_bytes());
    bytes[8..].copy_from_slice(&(batches ^ MARK_CHECK).to_le_bytes());
    bytes
}

/// An empty file (created, never written) is no mark; anything else must check out.
fn decode_mark(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return Some(0);
    }
    let bytes: &[u8; 16] = bytes.try_into().ok()?;
    let batches = u64::from_le_bytes(bytes[..8].try_into().ok()?);
    let check = u64::from_le_bytes(bytes[8..].try_into().ok()?);
    (check == batches ^ MARK_CHECK).then_some(batches)
}

impl DataDir {
    /// Opens (or creates) the database in `path`, recovering what the journal holds. `cache`
    /// is the block cache's size in bytes.
    pub fn open(path: &Path, cache: u64) -> Result<DataDir, DataDirError> {
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
                other => open_err(other.to_string()),
            })?;
        let keyspace = |name: &str| {
            db.keyspace(name, || {
                KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
            })
            .map_err(|e| open_err(format!("keyspace {name}: {e}")))
        };
        let mark_path = path.join(MARK_FILE);
        let mark = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&mark_path)
            .map_err(|e| open_err(format!("cannot open {}: {e}", mark_path.display())))?;
        let dir = DataDir {
            mark,
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
        let written = std::fs::read(&mark_path)
            .ok()
            .and_then(|bytes| decode_mark(&bytes))
            .ok_or_else(|| {
                open_err(format!(
                    "{} is unreadable; remove it to start without the check it makes",
                    mark_path.display()
                ))
            })?;
        let recovered = dir.counters().map_err(|e| open_err(e.to_string()))?.batches;
        if recovered < written {
            return Err(DataDirError::Lost {
                path: path_buf,
                mark: mark_path,
                recovered,
                written,
            });
        }
        Ok(dir)
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

    /// Accounts with a purchase in flight and when each started.
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

    /// Writes a group of changes as one atomic batch, synced to disk before it returns, then
    /// moves the mark to it.
    pub fn write(&self, changes: &[Change], counters: &mut Counters) -> Result<(), fjall::Error> {
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        // An account several calls changed in one batch has only its last core written: the
        // batch lands whole or not at all, so the earlier ones could never be read.
        let mut last_core: HashMap<&str, usize> = HashMap::with_capacity(changes.len());
        for (at, change) in changes.iter().enumerate() {
            last_core.insert(change.account_id.as_str(), at);
        }
        for (at, change) in changes.iter().enumerate() {
            let id = change.account_id.as_str();
            if last_core.get(id) == Some(&at) {
                batch.insert(&self.accounts, id, &*change.state.core);
            }
            for (kind, numbers) in &change.state.forgotten {
                for seq in numbers.clone() {
                    batch.remove(&self.records, record_key(id, *kind, seq));
                }
            }
            for record in &change.state.added {
                batch.insert(
                    &self.records,
                    record_key(id, record.kind, record.seq),
                    &*record.bytes,
                );
            }
            for event in &change.events {
                batch.insert(
                    &self.history,
                    history_key(&change.account_id, event.seq),
                    encode_event(&change.account_id, event),
                );
                let keep = u64::from(change.recent_keep);
                if event.seq > keep {
                    batch.remove(
                        &self.history,
                        history_key(&change.account_id, event.seq - keep),
                    );
                }
                let offset = counters.export_next;
                counters.export_next += 1;
                batch.insert(
                    &self.export,
                    offset.to_be_bytes().to_vec(),
                    encode_event(&change.account_id, event),
                );
                if offset >= change.export_keep.max(1) {
                    let trimmed = offset - change.export_keep.max(1);
                    batch.remove(&self.export, trimmed.to_be_bytes().to_vec());
                }
            }
            counters.open_holds += change.holds_delta;
            match change.purchase {
                PurchaseIndex::Unchanged => {}
                PurchaseIndex::Started(at) => batch.insert(
                    &self.purchases,
                    change.account_id.as_str(),
                    (at.as_millis() as u64).to_be_bytes().to_vec(),
                ),
                PurchaseIndex::Ended => batch.remove(&self.purchases, change.account_id.as_str()),
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
        counters.batches += 1;
        batch.insert(
            &self.meta,
            BATCHES_KEY,
            counters.batches.to_be_bytes().to_vec(),
        );
        batch.commit()?;
        self.mark
            .write_all_at(&encode_mark(counters.batches), 0)
            .map_err(fjall::Error::Io)
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
    use super::*;

    #[test]
    fn a_mark_reads_back_and_a_foreign_one_does_not() {
        for n in [0, 1, 42, u64::MAX] {
            assert_eq!(decode_mark(&encode_mark(n)), Some(n));
        }
        assert_eq!(decode_mark(&[]), Some(0));
        assert_eq!(decode_mark(&[0; 16]), None);
        assert_eq!(decode_mark(&encode_mark(7)[..15]), None);
    }

    #[test]
    fn a_mark_ahead_of_what_was_recovered_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(dir.path(), 1 << 20).unwrap();
        let mut counters = data.counters().unwrap();
        data.write(&[], &mut counters).unwrap();
        data.write(&[], &mut counters).unwrap();
        assert_eq!(data.counters().unwrap().batches, 2);
        drop(data);
        // The journal kept both batches: the start goes ahead.
        drop(DataDir::open(dir.path(), 1 << 20).unwrap());

        // As if a damaged journal had lost the last batch.
        let mark = dir.path().join(MARK_FILE);
        std::fs::write(&mark, encode_mark(3)).unwrap();
        let err = DataDir::open(dir.path(), 1 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                DataDirError::Lost {
                    recovered: 2,
                    written: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("quotad.mark"), "{err}");

        std::fs::write(&mark, b"not a mark").unwrap();
        let err = DataDir::open(dir.path(), 1 << 20).unwrap_err().to_string();
        assert!(err.contains("unreadable"), "{err}");

        std::fs::remove_file(&mark).unwrap();
        let data = DataDir::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(data.counters().unwrap().batches, 2);
    }
}
