//! The outage journal: where an owner keeps the batches it could not write to Redis, so that
//! it can go on deciding (for `store.redis.outage_grace_ms`) without losing what it answers.
//!
//! While Redis does not answer, each batch the owner would have written is appended here and
//! made durable before its calls are answered, exactly as a batch in Redis would have been; the
//! writer keeps trying Redis and, once it answers, writes the journaled batches there in order,
//! each under the epoch and batch number it was given. The write script skips a batch number a
//! partition already has, so a batch written twice (once by a call that timed out but landed,
//! once from the journal; or replayed again after a crash) lands once.
//!
//! The journal is a commit log ([`crate::store::commit_log`]: checksummed frames, torn tail
//! detected) in `DIR/log`, a marker `DIR/landed` with the number of the last journal batch known
//! to be in Redis, and `DIR/replica`: this replica's id, kept across restarts so that a quotad
//! restarted on the same journal takes its partitions back at once (its own leases) and
//! replays what it journaled under the epochs it held. A lock on `DIR/lock` keeps a second
//! process off the directory: two replicas with one id would both believe they own the same
//! partitions.
//!
//! A journaled batch whose partition another replica took before Redis returned cannot be
//! written (its epoch is fenced); it is kept in `DIR/fenced-…` for an operator and counted.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::owned::{Op, Section};
use crate::store::commit_log::{self, CommitLog, LogError};

/// Segments of the journal log: an outage of a few seconds at full load fits in a few.
const SEGMENT_BYTES: u64 = 8 << 20;
/// 2: an account's core is a field of its hash (the Redis layout's version 2), so a journal
/// of version 1 would write the old layout. 3: each section carries its partition's open holds
/// (layout 3, where a batch sets them whole).
const FORMAT: u8 = 3;

/// Why the journal could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("outage journal {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "outage journal {path} is in use by another quotad (each replica needs a journal dir of \
         its own)"
    )]
    InUse { path: PathBuf },
    #[error("outage journal: {0}")]
    Log(#[from] LogError),
    #[error("outage journal {path} holds a corrupt batch {batch}: {reason}")]
    Corrupt {
        path: PathBuf,
        batch: u64,
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A journal batch: the sections of one write, with the journal's number for it.
pub(super) struct JournalBatch {
    pub number: u64,
    pub sections: Vec<Section>,
}

/// The journal, open and locked.
pub(super) struct Journal {
    dir: PathBuf,
    /// None until [`start`](Self::start): the log is started fresh once what it held has been
    /// replayed.
    log: Option<CommitLog>,
    next: u64,
    _lock: File,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("dir", &self.dir).finish()
    }
}

impl Journal {
    /// Opens (creating if missing) and locks the journal in `dir`; answers it, this replica's
    /// id (made on first use as `fresh_id`), and the batches it holds that are not known to
    /// be in Redis, oldest first.
    pub fn open(
        dir: &Path,
        fresh_id: impl FnOnce() -> String,
    ) -> Result<(Journal, String, Vec<JournalBatch>), JournalError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(JournalError::InUse {
                path: dir.to_path_buf(),
            });
        }
        let id_path = dir.join("replica");
        let replica = match std::fs::read_to_string(&id_path) {
            Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
            _ => {
                let id = fresh_id();
                write_durably(dir, "replica", id.as_bytes())?;
                id
            }
        };
        let landed = match std::fs::read_to_string(dir.join("landed")) {
            Ok(n) => n.trim().parse::<u64>().unwrap_or(0),
            Err(_) => 0,
        };
        let log_dir = dir.join("log");
        let recovered = commit_log::recover(&log_dir)?;
        let mut pending = Vec::new();
        let mut last = landed;
        for (number, payload) in recovered.batches {
            last = last.max(number);
            if number <= landed {
                continue;
            }
            let sections = decode(&payload).map_err(|reason| JournalError::Corrupt {
                path: log_dir.clone(),
                batch: number,
                reason,
            })?;
            pending.push(JournalBatch { number, sections });
        }
        let journal = Journal {
            dir: dir.to_path_buf(),
            log: None,
            next: last + 1,
            _lock: lock,
        };
        Ok((journal, replica, pending))
    }

    /// Records that every batch so far is in Redis and starts the log afresh (its old segments
    /// removed). Called once what [`open`](Self::open) found has been replayed.
    pub fn start(&mut self) -> Result<(), JournalError> {
        self.landed(self.next - 1)?;
        self.log = Some(CommitLog::start(
            &self.dir.join("log"),
            SEGMENT_BYTES,
            self.next,
        )?);
        Ok(())
    }

    /// Appends a batch's sections durably; answers its journal number.
    pub fn append(&mut self, sections: &[&Section]) -> Result<u64, JournalError> {
        let log = self
            .log
            .as_mut()
            .expect("the journal is started before use");
        let number = self.next;
        log.append(number, &encode(sections))?;
        self.next += 1;
        Ok(number)
    }

    /// Records that journal batches up to `number` are in Redis: a restart replays only those
    /// after it. Segments holding only such batches are removed.
    pub fn landed(&mut self, number: u64) -> Result<(), JournalError> {
        write_durably(&self.dir, "landed", number.to_string().as_bytes())?;
        if let Some(log) = &mut self.log {
            log.checkpointed(number)?;
        }
        Ok(())
    }

    /// Keeps a journaled section that could not be written (its partition was taken by
    /// another replica first) where an operator finds it; answers the file.
    pub fn set_aside(&self, section: &Section) -> Result<PathBuf, JournalError> {
        let name = format!(
            "fenced-p{}-e{}-s{}.journal",
            section.partition, section.epoch, section.seq
        );
        write_durably(&self.dir, &name, &encode(&[section]))?;
        Ok(self.dir.join(name))
    }
}

/// Writes `name` in `dir` so that a crash leaves the old content or the new, never a part.
fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), JournalError> {
    let temp = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&temp).map_err(io_err(&temp))?;
    file.write_all(bytes).map_err(io_err(&temp))?;
    file.sync_all().map_err(io_err(&temp))?;
    let path = dir.join(name);
    std::fs::rename(&temp, &path).map_err(io_err(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// `FORMAT`, the section count (u32), then each section: partition (u16), epoch and batch
/// number (u64), open holds (i64), the op count (u32) and each op: its code (u8), its key and
/// its arguments (count u16, each length-prefixed u32). Little endian.
fn encode(sections: &[&Section]) -> Vec<u8> {
    let mut out = vec![FORMAT];
    out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    for s in sections {
        out.extend_from_slice(&s.partition.to_le_bytes());
        out.extend_from_slice(&s.epoch.to_le_bytes());
        out.extend_from_slice(&s.seq.to_le_bytes());
        out.extend_from_slice(&s.holds.to_le_bytes());
        out.extend_from_slice(&(s.ops.len() as u32).to_le_bytes());
        for op in &s.ops {
            out.push(op.code[0]);
            put_bytes(&mut out, op.key.as_bytes());
            out.extend_from_slice(&(op.args.len() as u16).to_le_bytes());
            for arg in &op.args {
                put_bytes(&mut out, arg);
            }
        }
    }
    out
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Reads what [`encode`] wrote; anything else is an error saying where, never a panic.
fn decode(bytes: &[u8]) -> Result<Vec<Section>, String> {
    let mut r = Reader { bytes, at: 0 };
    let format = r.take(1)?[0];
    if format != FORMAT {
        return Err(format!("format {format}, expected {FORMAT}"));
    }
    let count = r.u32()?;
    let mut sections = Vec::new();
    for _ in 0..count {
        let partition = u16::from_le_bytes(r.array()?);
        let epoch = u64::from_le_bytes(r.array()?);
        let seq = u64::from_le_bytes(r.array()?);
        let holds = i64::from_le_bytes(r.array()?);
        let ops = r.u32()?;
        let mut section = Section {
            partition,
            epoch,
            seq,
            holds,
            ops: Vec::new(),
            numbers: Vec::new(),
        };
        for _ in 0..ops {
            let code = Op::code_of(r.take(1)?[0]).ok_or("an unknown write")?;
            let key = String::from_utf8(r.bytes()?.to_vec()).map_err(|_| "a key not in UTF-8")?;
            let argc = u16::from_le_bytes(r.array()?);
            let args = (0..argc)
                .map(|_| r.bytes().map(<[u8]>::to_vec))
                .collect::<Result<_, _>>()?;
            section.ops.push(Op { code, key, args });
        }
        sections.push(section);
    }
    if r.at != bytes.len() {
        return Err(format!(
            "{} bytes after the last section",
            bytes.len() - r.at
        ));
    }
    Ok(sections)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len());
        let end = end.ok_or_else(|| format!("cut short at byte {}", self.at))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.u32()? as usize;
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn section(partition: u16, seq: u64) -> Section {
        Section {
            partition,
            epoch: 7,
            seq,
            holds: seq as i64 * 3 - 1,
            ops: vec![
                Op {
                    code: b"H",
                    key: format!("p:{{o{partition}}}:a:x"),
                    args: vec![b"c".to_vec(), b"core".to_vec()],
                },
                Op {
                    code: b"L",
                    key: format!("p:{{o{partition}}}:h:x"),
                    args: vec![vec![0, 1, 2], b"100".to_vec()],
                },
            ],
            numbers: Vec::new(),
        }
    }

    fn same(a: &Section, b: &Section) -> bool {
        (a.partition, a.epoch, a.seq, a.holds) == (b.partition, b.epoch, b.seq, b.holds)
            && a.ops.len() == b.ops.len()
            && (a.ops.iter().zip(&b.ops))
                .all(|(x, y)| x.code == y.code && x.key == y.key && x.args == y.args)
    }

    #[test]
    fn what_is_journaled_is_replayed_until_it_is_known_landed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, id, pending) = Journal::open(dir.path(), || "r-1".into()).unwrap();
        assert_eq!(id, "r-1");
        assert!(pending.is_empty());
        journal.start().unwrap();
        let (a, b) = (section(1, 1), section(2, 4));
        assert_eq!(journal.append(&[&a, &b]).unwrap(), 1);
        assert_eq!(journal.append(&[&section(1, 2)]).unwrap(), 2);
        assert!(
            matches!(
                Journal::open(dir.path(), || "r-2".into()),
                Err(JournalError::InUse { .. })
            ),
            "a second process is kept off"
        );
        drop(journal);

        let (mut journal, id, pending) = Journal::open(dir.path(), || "r-2".into()).unwrap();
        assert_eq!(id, "r-1", "the id survives a restart");
        assert_eq!(pending.len(), 2);
        assert!(same(&pending[0].sections[0], &a) && same(&pending[0].sections[1], &b));
        assert_eq!(pending[1].number, 2);
        journal.start().unwrap();
        assert_eq!(journal.append(&[&section(3, 1)]).unwrap(), 3);
        journal.landed(3).unwrap();
        drop(journal);

        let (_, _, pending) = Journal::open(dir.path(), || "r-3".into()).unwrap();
        assert!(pending.is_empty(), "what landed is not replayed");
    }

    proptest! {
        /// The decoder is a trust boundary: any bytes give sections or an error, never a panic.
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn a_cut_or_flipped_batch_is_refused_or_read_as_written(cut in 0usize..120, flip in 0usize..120) {
            let encoded = encode(&[&section(3, 9)]);
            prop_assert!(same(&decode(&encoded).unwrap()[0], &section(3, 9)));
            if cut < encoded.len() {
                prop_assert!(decode(&encoded[..cut]).is_err());
            }
            let mut flipped = encoded.clone();
            if flip < flipped.len() {
                flipped[flip] ^= 0x80;
                let _ = decode(&flipped);
            }
        }
    }
}
