//! The persisted form of an account and of a usage event: the bytes a durable store writes,
//! and reads back.
//!
//! An account is persisted as several values: its core (windows, ledger, open holds, grants,
//! auto top-up, and the numbers of the records it keeps) and one value per record kept for
//! retries (a closed reservation, a request's first answer). Records are written once, when
//! made, and deleted when forgotten, so a decision writes the core and what it added: a busy
//! account keeps a day of records for retries, and rewriting them all on every decision would
//! make each write grow with the account's traffic. [`encode_account_changes`] gives what
//! changed since the last write; [`decode_account`] reads the core and its records back.
//!
//! Every value is an 8-byte header, then a `postcard` payload of the domain types' serde form:
//!
//! ```text
//! magic (2 bytes: "QA" account core, "QR" record, "QE" event) | format version (u16 LE) | CRC-32 of payload (u32 LE) | payload
//! ```
//!
//! The magic says what a value is, so an event read where an account is expected is refused,
//! not misread. The version comes before anything whose shape it governs: a quotad meets data
//! written by another format only on an upgrade or a rollback, and the operator is told which
//! format each side speaks. The checksum catches what the disk or a stray write did.
//!
//! Decoding is a trust boundary: whatever the bytes, it gives a value or a [`DecodeError`],
//! never a panic and never an allocation a forged length asks for (postcard's lengths are
//! bounded by the bytes actually there). A payload that parses still has to be a state the
//! rules could have made (`AccountState::check`: credits conserved, amounts in range, windows
//! and records consistent, every record the core counts present once), so a corrupt value, or
//! one a buggy writer made, is refused rather than served with a wrong balance. Neither guard
//! stops someone who rewrites a value consistently on purpose: the data directory is as
//! trusted as the binary.
//!
//! An account's recent usage history is not part of its persisted form: the store keeps
//! history in its own table (events encoded with [`encode_event`]), taking it from the state
//! with [`AccountState::take_recent`].

use std::collections::{HashSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::credits::{Grants, grants_by_id};
use super::holds::{Closed, Entry, OpenHolds, Retained};
use super::reserve::RequestRecord;
use super::{AccountState, five_hour_window, weekly_window};
use crate::domain::decision::{Account, UsageEvent};
use crate::domain::ledger::Ledger;
use crate::domain::notice::Notices;
use crate::domain::time::Timestamp;
use crate::domain::top_up::TopUp;
use crate::domain::window::{SlidingWindow, WindowSpec};

/// The persisted format this quotad writes and reads. Any change to the payload of any value
/// (a field added, removed, reordered or retyped in a persisted type), or to what a data dir
/// must hold to be whole, needs a new version. 2: records apart from the core; 3: the commit
/// log, which a quotad of version 2 would not replay; 4: the core keeps the account's
/// notifications (its outbox for the webhook worker).
pub const FORMAT_VERSION: u16 = 4;

const ACCOUNT_MAGIC: [u8; 2] = *b"QA";
const RECORD_MAGIC: [u8; 2] = *b"QR";
const EVENT_MAGIC: [u8; 2] = *b"QE";
const COUNTER_MAGIC: [u8; 2] = *b"QC";
const HEADER_LEN: usize = 8;

/// Why bytes read back are not a persisted record this quotad can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("a persisted {expected} is at least {HEADER_LEN} bytes, this value has {len}")]
    TooShort { expected: &'static str, len: usize },
    #[error("not a persisted {expected}: it starts with {found:?}")]
    WrongKind {
        expected: &'static str,
        found: [u8; 2],
    },
    #[error(
        "this quotad reads persisted format {supported}, but the data was written by format \
         {found}: run a quotad release that reads format {found} on this data directory"
    )]
    Version { found: u16, supported: u16 },
    #[error(
        "checksum mismatch (stored {stored:08x}, computed {computed:08x}): the value is corrupt"
    )]
    Checksum { stored: u32, computed: u32 },
    #[error("the payload does not parse: {0}")]
    Malformed(String),
    #[error("the payload parses but is not a valid state: {0}")]
    Invalid(String),
}

/// The two kinds of record an account keeps for retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKind {
    /// How a reservation ended.
    Closed,
    /// A Reserve's first answer.
    Request,
}

impl RecordKind {
    /// A byte for a store's keys: records of one kind sort together, by number.
    pub fn tag(self) -> u8 {
        match self {
            RecordKind::Closed => 0,
            RecordKind::Request => 1,
        }
    }

    /// The kind a [`tag`](Self::tag) names.
    pub fn from_tag(tag: u8) -> Option<RecordKind> {
        match tag {
            0 => Some(RecordKind::Closed),
            1 => Some(RecordKind::Request),
            _ => None,
        }
    }
}

/// One record as a store keeps it: its kind and number (together, its key within the account)
/// and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordValue {
    pub kind: RecordKind,
    pub seq: u64,
    pub bytes: Vec<u8>,
}

/// What a store writes for an account: the core, records to add, and the numbers of records
/// to delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountWrite {
    pub core: Vec<u8>,
    pub added: Vec<RecordValue>,
    pub forgotten: Vec<(RecordKind, Range<u64>)>,
}

impl AccountWrite {
    /// Adds what `records` changed since a store last took them (each added record made into
    /// a value by `value`), and counts them taken.
    fn take<T>(
        &mut self,
        kind: RecordKind,
        records: &mut Retained<T>,
        value: impl Fn(u64, &Entry<T>) -> Vec<u8>,
    ) {
        let (forgotten, added) = records.unsynced();
        if !forgotten.is_empty() {
            self.forgotten.push((kind, forgotten));
        }
        for (seq, entry) in added {
            self.added.push(RecordValue {
                kind,
                seq,
                bytes: value(seq, entry),
            });
        }
        records.mark_synced();
    }
}

/// The core as written: the account's state but its records, of which it keeps the numbers.
#[derive(Serialize)]
struct CoreRef<'a> {
    account: &'a Account,
    five_hour: &'a SlidingWindow,
    weekly: &'a SlidingWindow,
    ledger: &'a Ledger,
    open: &'a OpenHolds,
    closed: (u64, u64),
    requests: (u64, u64),
    #[serde(serialize_with = "grants_ref")]
    grants: &'a Grants,
    events: u64,
    top_up: &'a Option<Box<TopUp>>,
    notices: &'a Option<Box<Notices>>,
}

fn grants_ref<S: serde::Serializer>(grants: &&Grants, s: S) -> Result<S::Ok, S::Error> {
    grants_by_id::serialize(grants, s)
}

/// The core as read back.
#[derive(Deserialize)]
#[serde(rename = "CoreRef")]
struct Core {
    account: Account,
    #[serde(deserialize_with = "five_hour_window")]
    five_hour: SlidingWindow,
    #[serde(deserialize_with = "weekly_window")]
    weekly: SlidingWindow,
    ledger: Ledger,
    open: OpenHolds,
    closed: (u64, u64),
    requests: (u64, u64),
    #[serde(with = "grants_by_id")]
    grants: Grants,
    events: u64,
    top_up: Option<Box<TopUp>>,
    notices: Option<Box<Notices>>,
}

/// A record as written, and as read back.
#[derive(Serialize)]
enum RecordRef<'a> {
    Closed(u64, Timestamp, &'a Arc<str>, &'a Closed),
    Request(u64, Timestamp, &'a Arc<str>, &'a RequestRecord),
}

#[derive(Deserialize)]
#[serde(rename = "RecordRef")]
enum Record {
    Closed(u64, Timestamp, Arc<str>, Closed),
    Request(u64, Timestamp, Arc<str>, RequestRecord),
}

/// The whole persisted form of an account: its core and every record it keeps.
pub fn encode_account(state: &AccountState) -> AccountWrite {
    let mut whole = state.clone();
    whole.closed.mark_unsynced();
    whole.requests.mark_unsynced();
    encode_account_changes(&mut whole)
}

/// What changed since the account was last written, read back or made: its core, the records
/// made since, and those forgotten since. The state then counts itself written.
pub fn encode_account_changes(state: &mut AccountState) -> AccountWrite {
    let core = seal(
        ACCOUNT_MAGIC,
        &CoreRef {
            account: &state.account,
            five_hour: &state.five_hour,
            weekly: &state.weekly,
            ledger: &state.ledger,
            open: &state.open,
            closed: state.closed.span(),
            requests: state.requests.span(),
            grants: &state.grants,
            events: state.events,
            top_up: &state.top_up,
            notices: &state.notices,
        },
    );
    let mut write = AccountWrite {
        core,
        added: Vec::new(),
        forgotten: Vec::new(),
    };
    write.take(
        RecordKind::Closed,
        &mut state.closed,
        |seq, (at, id, record)| seal(RECORD_MAGIC, &RecordRef::Closed(seq, *at, id, record)),
    );
    write.take(
        RecordKind::Request,
        &mut state.requests,
        |seq, (at, id, record)| seal(RECORD_MAGIC, &RecordRef::Request(seq, *at, id, record)),
    );
    write
}

/// The account a store keeps under `account_id`, from its core and its records: as
/// [`decode_account`], and refused if the value is another account's (a key that holds the wrong
/// value is as corrupt as one that does not decode).
pub fn decode_account_of<'a>(
    account_id: &str,
    core: &[u8],
    records: impl IntoIterator<Item = &'a [u8]>,
) -> Result<AccountState, DecodeError> {
    let state = decode_account(core, records)?;
    if state.account().id != account_id {
        return Err(DecodeError::Invalid(format!(
            "its key holds account {:?}",
            state.account().id
        )));
    }
    Ok(state)
}

/// An account from its core and its records (in any order).
pub fn decode_account<'a>(
    core: &[u8],
    records: impl IntoIterator<Item = &'a [u8]>,
) -> Result<AccountState, DecodeError> {
    let payload = open(core, ACCOUNT_MAGIC, "account")?;
    let core: Core = parse(payload)?;
    let mut closed = Vec::new();
    let mut requests = Vec::new();
    for bytes in records {
        match parse(open(bytes, RECORD_MAGIC, "account record")?)? {
            Record::Closed(seq, at, id, record) => closed.push((seq, (at, id, record))),
            Record::Request(seq, at, id, record) => requests.push((seq, (at, id, record))),
        }
    }
    let mut state = AccountState {
        account: core.account,
        five_hour: core.five_hour,
        weekly: core.weekly,
        ledger: core.ledger,
        open: core.open,
        closed: retained("closed reservation", core.closed, closed)?,
        requests: retained("request", core.requests, requests)?,
        grants: core.grants,
        recent: VecDeque::new(),
        events: core.events,
        top_up: core.top_up,
        notices: core.notices,
    };
    state.check().map_err(DecodeError::Invalid)?;
    state.share_reservation_ids();
    Ok(state)
}

/// The records the core counts, `first..end`, each present once.
fn retained<T>(
    what: &str,
    (first, end): (u64, u64),
    mut found: Vec<(u64, Entry<T>)>,
) -> Result<Retained<T>, DecodeError> {
    found.sort_unstable_by_key(|(seq, _)| *seq);
    let expected = end.checked_sub(first).ok_or_else(|| {
        DecodeError::Invalid(format!(
            "{what} record numbers {first}..{end} are out of range"
        ))
    })?;
    let numbered = found
        .iter()
        .enumerate()
        .all(|(offset, (seq, _))| first.checked_add(offset as u64) == Some(*seq));
    if found.len() as u64 != expected || !numbered {
        return Err(DecodeError::Invalid(format!(
            "the account keeps {what} records {first}..{end}, but {} were found{}",
            found.len(),
            match (found.first(), found.last()) {
                (Some((a, _)), Some((b, _))) => format!(", numbered {a} to {b}"),
                _ => String::new(),
            }
        )));
    }
    Ok(Retained::from_parts(
        first,
        found.into_iter().map(|(_, entry)| entry).collect(),
    ))
}

/// A usage event of account `account_id`, as history and the export store it.
pub fn encode_event(account_id: &str, event: &UsageEvent) -> Vec<u8> {
    seal(EVENT_MAGIC, &(account_id, event))
}

/// The account id and the event of a value made by [`encode_event`].
pub fn decode_event(bytes: &[u8]) -> Result<(String, UsageEvent), DecodeError> {
    let payload = open(bytes, EVENT_MAGIC, "usage event")?;
    let (account_id, event): (String, UsageEvent) = parse(payload)?;
    if account_id.is_empty() {
        return Err(DecodeError::Invalid("the event names no account".into()));
    }
    event.check().map_err(DecodeError::Invalid)?;
    Ok((account_id, event))
}

/// An Envoy RLS counter's window, as it is kept in Redis: the window's length, then
/// its buckets.
pub fn encode_counter(window: &SlidingWindow) -> Vec<u8> {
    seal(COUNTER_MAGIC, &(window.spec().length_ms, window))
}

/// A counter's window made by [`encode_counter`], read as `spec`'s; `None` if it was counted
/// in a window of another length (the rule's unit changed since: the counter starts afresh,
/// as a new rule's would).
pub fn decode_counter(
    bytes: &[u8],
    spec: &'static WindowSpec,
) -> Result<Option<SlidingWindow>, DecodeError> {
    let payload = open(bytes, COUNTER_MAGIC, "rate limit counter")?;
    let malformed = |e: postcard::Error| DecodeError::Malformed(e.to_string());
    let (length_ms, rest): (i64, &[u8]) = postcard::take_from_bytes(payload).map_err(malformed)?;
    if length_ms != spec.length_ms {
        return Ok(None);
    }
    let mut de = postcard::Deserializer::from_bytes(rest);
    let window = SlidingWindow::deserialize_as(spec, &mut de).map_err(malformed)?;
    let left = de.finalize().map_err(malformed)?;
    if !left.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} bytes left over after the counter",
            left.len()
        )));
    }
    window.check().map_err(DecodeError::Invalid)?;
    Ok(Some(window))
}

impl AccountState {
    /// Gives each reservation's records one copy of its id again, as they had when made (an
    /// answer kept for retries names the reservation it made): read back, each has its own.
    fn share_reservation_ids(&mut self) {
        let ids: HashSet<Arc<str>> = (self.open.values().map(|r| r.id.clone()))
            .chain(self.closed.records().map(|(id, _)| id.clone()))
            .collect();
        if ids.is_empty() {
            return;
        }
        for record in self.requests.records_mut() {
            record.share_id(&ids);
        }
    }
}

fn seal(magic: [u8; 2], value: &impl serde::Serialize) -> Vec<u8> {
    thread_local! {
        /// Where values are encoded before being copied out at their exact size: an account's
        /// core is hundreds of bytes, and growing a new buffer to it copied it several times on
        /// every decision.
        static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let mut out = SCRATCH.take();
    out.clear();
    out.extend_from_slice(&magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    // Cannot fail: the persisted types are plain data with known lengths, and the output
    // grows as needed.
    let mut out = postcard::to_extend(value, out).expect("persisted types always serialize");
    let crc = crc32fast::hash(&out[HEADER_LEN..]);
    out[4..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    let sealed = out.to_vec();
    // A rare huge value does not stay behind in every thread.
    if out.capacity() <= 64 << 10 {
        SCRATCH.set(out);
    }
    sealed
}

/// Checks the header and returns the payload.
fn open<'a>(
    bytes: &'a [u8],
    magic: [u8; 2],
    expected: &'static str,
) -> Result<&'a [u8], DecodeError> {
    let Some((header, payload)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(DecodeError::TooShort {
            expected,
            len: bytes.len(),
        });
    };
    let found = [header[0], header[1]];
    if found != magic {
        return Err(DecodeError::WrongKind { expected, found });
    }
    let version = u16::from_le_bytes([header[2], header[3]]);
    if version != FORMAT_VERSION {
        return Err(DecodeError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let stored = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    Ok(payload)
}

/// Parses a whole payload: bytes left over mean it is not what was written.
fn parse<'a, T: serde::Deserialize<'a>>(payload: &'a [u8]) -> Result<T, DecodeError> {
    let (value, rest) =
        postcard::take_from_bytes(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} bytes left over after the value",
            rest.len()
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::super::MAX_EXACT_MICROS;
    use super::super::testing::*;
    use super::*;
    use crate::domain::decision::{
        Account, Decision, ReleaseCommand, RevokeCommand, SetTopUpCommand, SettleTopUpCommand,
    };
    use crate::domain::ledger::LotSource;
    use crate::domain::money::MICROS_PER_CREDIT as C;
    use crate::domain::policy::Policy;
    use crate::domain::rls::RlsUnit;
    use crate::domain::time::{MINUTE_MS, Timestamp};
    use crate::domain::top_up::{PaymentResult, TopUpSettings};
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use serde_json::{Value, json};

    /// Plays `ops` on account "a" from `now`, numbering their ids from `first` (auto top-up on
    /// from the start when `top_up`, each purchase answered approved, declined or failed in
    /// turn); returns the instant reached.
    fn play(
        s: &mut AccountState,
        policy: &Policy,
        ops: &[Op],
        first: usize,
        top_up: bool,
        mut now: Timestamp,
    ) -> Timestamp {
        let mut reservations: Vec<String> = Vec::new();
        let mut grants: Vec<String> = Vec::new();
        if top_up {
            let settings = TopUpSettings::new(true, 5 * C, 20 * C, Some(60 * C)).unwrap();
            let cmd = SetTopUpCommand {
                account_id: "a".into(),
                settings,
            };
            s.set_top_up(policy, &cmd, now).unwrap();
        }
        for (i, op) in ops.iter().enumerate() {
            let i = first + i;
            match *op {
                Op::Reserve {
                    product,
                    credits,
                    ttl_min,
                } => {
                    let cmd = reserve_cmd(i, product, credits, ttl_min);
                    if let Decision::Allow { reservation_id, .. } =
                        s.reserve(policy, &cmd, now).unwrap().decision
                    {
                        reservations.push(reservation_id.to_string());
                    }
                }
                Op::Commit {
                    pick,
                    credits,
                    is_final,
                } if !reservations.is_empty() => {
                    let id = reservations[pick % reservations.len()].clone();
                    let _ = s.commit(policy, &commit_cmd(id, credits, is_final), now);
                }
                Op::Release { pick } if !reservations.is_empty() => {
                    let reservation_id = reservations[pick % reservations.len()].clone();
                    let cmd = ReleaseCommand {
                        account_id: "a".into(),
                        reservation_id,
                    };
                    let _ = s.release(policy, &cmd, now);
                }
                Op::Grant { credits, days } => {
                    let source = if i.is_multiple_of(3) {
                        LotSource::Promo
                    } else {
                        LotSource::Purchase
                    };
                    let cmd = grant_cmd(i, credits, days, source, now);
                    s.grant(policy, &cmd, now).unwrap();
                    grants.push(cmd.grant_id);
                }
                Op::Advance { minutes } => now = now.plus_millis(minutes * MINUTE_MS),
                Op::SetPlan { plus, allowed } => {
                    s.update_account(if plus { "plus" } else { "free" }.into(), allowed);
                }
                Op::Revoke { pick } if !grants.is_empty() => {
                    let grant_id = grants[pick % grants.len()].clone();
                    let cmd = RevokeCommand {
                        account_id: "a".into(),
                        grant_id,
                    };
                    s.revoke(policy, &cmd, now).unwrap();
                }
                _ => {}
            }
            if let Some(purchase) = s.top_up_in_flight().cloned() {
                let result = match i % 3 {
                    0 => PaymentResult::Approved {
                        payment_id: format!("pay{i}"),
                    },
                    1 => PaymentResult::Declined {
                        error: "card declined".into(),
                    },
                    _ => PaymentResult::Failed {
                        error: "timeout".into(),
                    },
                };
                let cmd = SettleTopUpCommand {
                    account_id: "a".into(),
                    purchase_id: purchase.id,
                    result,
                };
                s.settle_top_up(policy, &cmd, now).unwrap();
            }
        }
        now
    }

    fn fresh() -> AccountState {
        AccountState::new(Account {
            id: "a".into(),
            plan: "plus".into(),
            credit_purchase_allowed: true,
        })
    }

    /// A state made by random operations, and the instant they ended at.
    fn made_by(ops: &[Op], top_up: bool) -> (AccountState, Timestamp) {
        let mut s = fresh();
        let now = play(
            &mut s,
            &tight_policy(),
            ops,
            0,
            top_up,
            Timestamp::from_millis(T0),
        );
        (s, now)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// A state reads back equal (all but the recent history, which is not persisted),
        /// encodes again to the same bytes, and goes on exactly as the original does.
        #[test]
        fn states_round_trip(
            ops in prop::collection::vec(op(), 1..120),
            more in prop::collection::vec(op(), 0..40),
            top_up in any::<bool>(),
        ) {
            let policy = tight_policy();
            let (mut s, now) = made_by(&ops, top_up);
            prop_assert_eq!(s.check(), Ok(()));
            let written = encode_account(&s);
            let mut back = read(&written).unwrap();
            prop_assert!(back.recent.is_empty());
            let recent = s.take_recent();
            prop_assert!(recent.windows(2).all(|w| w[0].seq < w[1].seq), "oldest first");
            prop_assert_eq!(&back, &s);
            prop_assert_eq!(encode_account(&back), written);

            play(&mut s, &policy, &more, 1_000, false, now);
            play(&mut back, &policy, &more, 1_000, false, now);
            prop_assert_eq!(s.take_recent(), back.take_recent());
            prop_assert_eq!(back, s);
        }

        #[test]
        fn events_round_trip(ops in prop::collection::vec(op(), 1..80)) {
            let (mut s, _) = made_by(&ops, false);
            for event in s.take_recent() {
                let bytes = encode_event("acct:1", &event);
                let (account, back) = decode_event(&bytes).unwrap();
                prop_assert_eq!(account, "acct:1");
                prop_assert_eq!(&back, &event);
                prop_assert_eq!(encode_event("acct:1", &back), bytes);
            }
        }
    }

    #[test]
    fn interned_names_are_shared_again() {
        let (s, _) = made_by(
            &[
                Op::Reserve {
                    product: 0,
                    credits: 2,
                    ttl_min: 30,
                },
                Op::Commit {
                    pick: 0,
                    credits: 1,
                    is_final: false,
                },
            ],
            false,
        );
        let a = read(&encode_account(&s)).unwrap();
        let b = read(&encode_account(&s)).unwrap();
        assert!(std::sync::Arc::ptr_eq(&a.account.plan, &b.account.plan));
        let model = |s: &AccountState| s.open.values().next().unwrap().usage.model.clone();
        assert!(std::sync::Arc::ptr_eq(&model(&a), &model(&b)));
    }

    #[test]
    fn an_account_under_another_accounts_key_is_refused() {
        let state = samples().remove(0);
        let written = encode_account(&state);
        let records = || written.added.iter().map(|r| &r.bytes[..]);
        let id = state.account().id.clone();
        let back = decode_account_of(&id, &written.core, records()).unwrap();
        assert_eq!(back.account().id, id);
        let err = decode_account_of("someone-else", &written.core, records()).unwrap_err();
        assert!(err.to_string().contains("its key holds account"), "{err}");
    }

    /// An account read back from all it wrote.
    fn read(written: &AccountWrite) -> Result<AccountState, DecodeError> {
        decode_account(&written.core, written.added.iter().map(|r| &r.bytes[..]))
    }

    /// Realistic states (and their events) from fixed pseudo-random operation sequences.
    fn samples() -> Vec<AccountState> {
        let mut runner = TestRunner::deterministic();
        let ops = prop::collection::vec(op(), 60..120);
        (0..6)
            .map(|n| made_by(&ops.new_tree(&mut runner).unwrap().current(), n % 2 == 0).0)
            .collect()
    }

    /// A header and a good checksum around any payload, as if a store had written it.
    fn sealed(magic: [u8; 2], version: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = magic.to_vec();
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// The state as JSON, changed by `tamper`, read back through serde (no checks) and encoded
    /// with a good checksum, then decoded.
    fn tampered(
        s: &AccountState,
        tamper: impl FnOnce(&mut Value),
    ) -> Result<AccountState, DecodeError> {
        let mut value = serde_json::to_value(s).unwrap();
        tamper(&mut value);
        let forged: AccountState = serde_json::from_value(value).unwrap();
        read(&encode_account(&forged))
    }

    fn refused(result: Result<AccountState, DecodeError>, says: &str) {
        match result {
            Err(DecodeError::Invalid(why)) => assert!(why.contains(says), "{why}"),
            other => panic!("expected Invalid({says}…), got {other:?}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3_000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            prop_assert!(decode_account(&bytes, []).is_err());
            let fresh = encode_account(&fresh()).core;
            prop_assert!(decode_account(&fresh, [&bytes[..]]).is_err());
            prop_assert!(decode_event(&bytes).is_err());
            prop_assert!(decode_counter(&bytes, crate::domain::rls::RlsUnit::Minute.window()).is_err());
        }

        /// Past a good header, whatever the payload: a clean refusal (or, by a fluke, a state
        /// that passes every check), never a panic.
        #[test]
        fn arbitrary_payloads_never_panic(payload in prop::collection::vec(any::<u8>(), 0..400)) {
            let fresh = encode_account(&fresh()).core;
            let record = sealed(RECORD_MAGIC, FORMAT_VERSION, &payload);
            for result in [
                decode_account(&sealed(ACCOUNT_MAGIC, FORMAT_VERSION, &payload), []).map(|_| ()),
                decode_account(&fresh, [&record[..]]).map(|_| ()),
                decode_event(&sealed(EVENT_MAGIC, FORMAT_VERSION, &payload)).map(|_| ()),
                decode_counter(&sealed(COUNTER_MAGIC, FORMAT_VERSION, &payload), RlsUnit::Second.window()).map(|_| ()),
            ] {
                prop_assert!(matches!(result, Ok(()) | Err(DecodeError::Malformed(_) | DecodeError::Invalid(_))));
            }
        }
    }

    proptest! {
        /// A counter reads back as it was counted, and only as a window of its own length.
        #[test]
        fn counters_round_trip(hits in prop::collection::vec((0..120_000i64, 1..50i64), 0..40)) {
            let spec = RlsUnit::Minute.window();
            let mut window = SlidingWindow::new(spec);
            let mut at = 1_800_000_000_000;
            for (step, n) in hits {
                at += step;
                window.advance(Timestamp::from_millis(at));
                window.add(Timestamp::from_millis(at), n);
            }
            let bytes = encode_counter(&window);
            prop_assert_eq!(decode_counter(&bytes, spec).unwrap(), Some(window));
            prop_assert_eq!(decode_counter(&bytes, RlsUnit::Hour.window()).unwrap(), None);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1_500, ..ProptestConfig::default() })]

        /// Real payloads (an account's core or one of its records) with a few bytes changed
        /// and the checksum made good again (what a bug in a writer could store): read back as
        /// a state that passes every check, or refused.
        #[test]
        fn edited_payloads_are_checked_not_trusted(
            pick in any::<prop::sample::Index>(),
            part in any::<prop::sample::Index>(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            thread_local!(static SAMPLES: Vec<AccountWrite> = samples().iter().map(encode_account).collect());
            let mut written = SAMPLES.with(|s| s[pick.index(s.len())].clone());
            let part = part.index(written.added.len() + 1);
            let (bytes, magic) = match part.checked_sub(1) {
                None => (&mut written.core, ACCOUNT_MAGIC),
                Some(record) => (&mut written.added[record].bytes, RECORD_MAGIC),
            };
            let mut payload = bytes[HEADER_LEN..].to_vec();
            for (at, byte) in edits {
                let at = at.index(payload.len());
                payload[at] = byte;
            }
            *bytes = sealed(magic, FORMAT_VERSION, &payload);
            if let Ok(state) = read(&written) {
                prop_assert_eq!(state.check(), Ok(()));
            }
        }
    }

    #[test]
    fn every_truncation_and_bit_flip_is_refused() {
        let mut events = Vec::new();
        for mut s in samples() {
            let written = encode_account(&s);
            assert!(!written.added.is_empty());
            // The core, then the first record, each damaged with the rest intact.
            for part in 0..2 {
                let with = |bytes: &[u8]| {
                    let mut damaged = written.clone();
                    match part {
                        0 => damaged.core = bytes.to_vec(),
                        _ => damaged.added[0].bytes = bytes.to_vec(),
                    }
                    read(&damaged)
                };
                let bytes = match part {
                    0 => &written.core,
                    _ => &written.added[0].bytes,
                };
                for len in 0..bytes.len() {
                    assert!(with(&bytes[..len]).is_err(), "cut at {len}");
                }
                let mut longer = bytes.clone();
                longer.push(0);
                assert!(matches!(with(&longer), Err(DecodeError::Checksum { .. })));
                for bit in 0..bytes.len() * 8 {
                    let mut flipped = bytes.clone();
                    flipped[bit / 8] ^= 1 << (bit % 8);
                    let err = with(&flipped).unwrap_err();
                    let expected = match bit / 8 {
                        0..2 => matches!(err, DecodeError::WrongKind { .. }),
                        2..4 => matches!(err, DecodeError::Version { .. }),
                        _ => matches!(err, DecodeError::Checksum { .. }),
                    };
                    assert!(expected, "part {part}, bit {bit}: {err}");
                }
            }
            events.extend(s.take_recent());
        }
        assert!(!events.is_empty());
        for event in events.iter().step_by(7) {
            let bytes = encode_event("acct", event);
            for len in 0..bytes.len() {
                assert!(decode_event(&bytes[..len]).is_err(), "cut at {len}");
            }
            for bit in 0..bytes.len() * 8 {
                let mut flipped = bytes.clone();
                flipped[bit / 8] ^= 1 << (bit % 8);
                assert!(decode_event(&flipped).is_err(), "bit {bit}");
            }
        }
    }

    #[test]
    fn an_account_is_not_an_event_nor_the_reverse() {
        let (mut s, _) = made_by(
            &[
                Op::Reserve {
                    product: 0,
                    credits: 2,
                    ttl_min: 9,
                },
                Op::Commit {
                    pick: 0,
                    credits: 1,
                    is_final: true,
                },
            ],
            false,
        );
        let written = encode_account(&s);
        let account = written.core.clone();
        let event = encode_event("a", &s.take_recent()[0]);
        assert!(
            matches!(decode_event(&account), Err(DecodeError::WrongKind { expected: "usage event", found }) if found == *b"QA")
        );
        assert!(matches!(
            decode_account(&event, []),
            Err(DecodeError::WrongKind {
                expected: "account",
                ..
            })
        ));
        // A record where the core belongs, and the reverse.
        assert!(matches!(
            decode_account(&written.added[0].bytes, []),
            Err(DecodeError::WrongKind {
                expected: "account",
                ..
            })
        ));
        assert!(matches!(
            decode_account(&account, [&account[..]]),
            Err(DecodeError::WrongKind {
                expected: "account record",
                ..
            })
        ));
        assert_eq!(
            decode_account(b"QA\x01", []),
            Err(DecodeError::TooShort {
                expected: "account",
                len: 3
            })
        );
    }

    #[test]
    fn another_format_version_is_named_with_this_one() {
        let s = &samples()[0];
        for version in [0, FORMAT_VERSION - 1, FORMAT_VERSION + 1, u16::MAX] {
            let mut bytes = encode_account(s).core;
            bytes[2..4].copy_from_slice(&version.to_le_bytes());
            let err = decode_account(&bytes, []).unwrap_err();
            assert_eq!(
                err,
                DecodeError::Version {
                    found: version,
                    supported: FORMAT_VERSION
                }
            );
            let message = err.to_string();
            assert!(
                message.contains(&format!("reads persisted format {FORMAT_VERSION}"))
                    && message.contains(&format!("written by format {version}")),
                "{message}"
            );
        }
        let event = sealed(EVENT_MAGIC, 9, b"");
        assert!(matches!(
            decode_event(&event),
            Err(DecodeError::Version {
                found: 9,
                supported: FORMAT_VERSION
            })
        ));
    }

    #[test]
    fn a_forged_length_allocates_nothing() {
        // An account id claiming 2^32 − 1 bytes, then a sequence claiming 2^63: refused for want
        // of the bytes, before anything that size is made.
        let mut payload = vec![0xff, 0xff, 0xff, 0xff, 0x0f];
        payload.extend_from_slice(b"abc");
        assert!(matches!(
            decode_account(&sealed(ACCOUNT_MAGIC, FORMAT_VERSION, &payload), []),
            Err(DecodeError::Malformed(_))
        ));
        let (s, _) = made_by(&[], false);
        let good = encode_account(&s).core;
        let mut payload = good[HEADER_LEN..good.len() - 3].to_vec();
        payload.extend_from_slice(&[0xff; 9]);
        payload.push(0x7f);
        assert!(decode_account(&sealed(ACCOUNT_MAGIC, FORMAT_VERSION, &payload), []).is_err());
    }

    /// The checksum is not the only guard: a payload with a good checksum whose balance, lots,
    /// windows or holds were changed is refused by the invariant checks.
    #[test]
    fn a_good_checksum_does_not_make_a_state_valid() {
        let s = samples()
            .into_iter()
            .find(|s| {
                !s.ledger.lots().is_empty()
                    && s.five_hour.committed() > 0
                    && s.open.len() > 0
                    && s.requests.records().count() > 0
            })
            .expect("a sample with lots, usage and open holds");
        // Untouched, it reads back.
        let mut expected = s.clone();
        expected.take_recent();
        assert_eq!(tampered(&s, |_| {}), Ok(expected));

        refused(
            tampered(&s, |v| {
                *v.pointer_mut("/ledger/granted").unwrap() =
                    json!(v["ledger"]["granted"].as_i64().unwrap() + 1)
            }),
            "not conserved",
        );
        // More left in a lot than it was granted.
        refused(
            tampered(&s, |v| {
                *v.pointer_mut("/ledger/lots/0/remaining").unwrap() =
                    json!(v["ledger"]["lots"][0]["remaining"].as_i64().unwrap() + 1)
            }),
            "remaining of",
        );
        // ... even with the totals adjusted to match: the lot is not what its grant made.
        refused(
            tampered(&s, |v| {
                let add = 50 * C;
                for path in [
                    "/ledger/lots/0/remaining",
                    "/ledger/lots/0/granted",
                    "/ledger/granted",
                ] {
                    let at = v.pointer_mut(path).unwrap();
                    *at = json!(at.as_i64().unwrap() + add);
                }
            }),
            "not what its grant made",
        );
        refused(
            tampered(&s, |v| {
                *v.pointer_mut("/ledger/lots/0/remaining").unwrap() = json!(-1)
            }),
            "outside",
        );
        refused(
            tampered(&s, |v| *v.pointer_mut("/ledger/debt").unwrap() = json!(1)),
            "in debt while lots",
        );
        refused(
            tampered(&s, |v| {
                *v.pointer_mut("/ledger/spent").unwrap() = json!(MAX_EXACT_MICROS + 1)
            }),
            "outside",
        );
        refused(
            tampered(&s, |v| {
                *v.pointer_mut("/five_hour/total").unwrap() =
                    json!(v["five_hour"]["total"].as_i64().unwrap() + 1)
            }),
            "buckets sum",
        );
        refused(
            tampered(&s, |v| {
                *v.pointer_mut("/five_hour/buckets/0/0").unwrap() = json!(i64::MAX)
            }),
            "out of range",
        );
        refused(
            tampered(&s, |v| {
                *v.pointer_mut("/weekly/buckets").unwrap() =
                    json!((0..200).map(|b| [b, 1]).collect::<Vec<_>>())
            }),
            "buckets, a window holds at most",
        );
        refused(
            tampered(&s, |v| {
                *v.pointer_mut("/open/0/held/credit").unwrap() = json!(-5)
            }),
            "outside",
        );
        refused(
            tampered(&s, |v| {
                *v.pointer_mut("/open/0/held/plan").unwrap() = json!(MAX_EXACT_MICROS)
            }),
            "for an estimate of",
        );
        refused(
            tampered(&s, |v| {
                *v.pointer_mut("/requests/first").unwrap() = json!(u64::MAX)
            }),
            "out of range",
        );
        refused(
            tampered(&s, |v| *v.pointer_mut("/events").unwrap() = json!(u64::MAX)),
            "out of range",
        );
        refused(
            tampered(&s, |v| *v.pointer_mut("/account/id").unwrap() = json!("")),
            "no id",
        );
    }

    #[test]
    fn forged_events_are_refused() {
        let (mut s, _) = made_by(
            &[
                Op::Reserve {
                    product: 0,
                    credits: 2,
                    ttl_min: 9,
                },
                Op::Commit {
                    pick: 0,
                    credits: 1,
                    is_final: true,
                },
            ],
            false,
        );
        let event = s.take_recent().remove(0);
        let forge = |tamper: &dyn Fn(&mut Value)| {
            let mut value = serde_json::to_value(&event).unwrap();
            tamper(&mut value);
            encode_event("a", &serde_json::from_value(value).unwrap())
        };
        assert!(matches!(
            decode_event(&forge(&|v| v["seq"] = json!(0))),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            decode_event(&forge(&|v| v["charged"]["credit"] = json!(-1))),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            decode_event(&encode_event("", &event)),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn a_reservation_id_is_shared_again_by_the_request_that_made_it() {
        let (s, _) = made_by(
            &[Op::Reserve {
                product: 0,
                credits: 2,
                ttl_min: 30,
            }],
            false,
        );
        let back = read(&encode_account(&s)).unwrap();
        let open = back.open.values().next().unwrap().id.clone();
        assert_eq!(
            Arc::strong_count(&open),
            4,
            "the map's key, the reservation, the request that made it, and this clone"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 150, ..ProptestConfig::default() })]

        /// A store that applies each decision's changes (core replaced, records added and
        /// deleted) holds what the whole form would write, and reads back the same state.
        #[test]
        fn changes_add_up_to_the_whole(
            chunks in prop::collection::vec(prop::collection::vec(op(), 1..30), 1..10),
            top_up in any::<bool>(),
        ) {
            let policy = tight_policy();
            let mut s = fresh();
            let mut now = Timestamp::from_millis(T0);
            let mut core = Vec::new();
            let mut records = std::collections::BTreeMap::new();
            for (n, ops) in chunks.iter().enumerate() {
                now = play(&mut s, &policy, ops, n * 100, top_up && n == 0, now);
                let changes = encode_account_changes(&mut s);
                core = changes.core;
                for (kind, numbers) in changes.forgotten {
                    for seq in numbers {
                        records.remove(&(kind, seq));
                    }
                }
                for record in changes.added {
                    prop_assert!(records.insert((record.kind, record.seq), record.bytes).is_none());
                }
            }
            let whole = encode_account(&s);
            prop_assert_eq!(&core, &whole.core);
            let held: Vec<_> = records.iter().map(|(&(kind, seq), bytes)| (kind, seq, bytes.clone())).collect();
            let expected: Vec<_> = whole.added.iter().map(|r| (r.kind, r.seq, r.bytes.clone())).collect();
            prop_assert_eq!(held, expected);
            let back = decode_account(&core, records.values().map(|b| &b[..])).unwrap();
            s.take_recent();
            prop_assert_eq!(back, s);
        }
    }

    #[test]
    fn a_missing_or_repeated_record_is_refused() {
        let s = samples()
            .into_iter()
            .find(|s| s.requests.records().count() > 1)
            .expect("a sample with requests");
        let written = encode_account(&s);
        let mut missing = written.clone();
        missing.added.remove(1);
        refused(read(&missing), "records");
        let mut repeated = written.clone();
        repeated.added.push(written.added[0].clone());
        refused(read(&repeated), "records");
        // In any order, all of them read back.
        let mut shuffled = written.clone();
        shuffled.added.reverse();
        assert!(read(&shuffled).is_ok());
    }
}
