//! The records of an account's reservations: the open ones (holds still counting against the
//! plan and credits) and the finished ones (kept only to answer retries).
//!
//! Open reservations are kept apart from finished ones, so the work of an operation grows with
//! the tasks in flight, not with the day's history; finished ones are forgotten after the
//! idempotency retention. Both are sized for millions of mostly idle accounts: nothing is
//! allocated until an account has something to keep, and an index by id is built only once an
//! account keeps many records.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde::de::Error as _;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::push_compact;
use crate::domain::money::{Funding, Micros, check_amount};
use crate::domain::pricing::Usage;
use crate::domain::time::Timestamp;

/// A task's open hold on the plan and on credits, and what it has been charged so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// Shared with the first answer, the closed record and the usage events that name it: a
    /// finished task keeps one copy of its id, not three.
    pub(super) id: Arc<str>,
    pub(super) product: String,
    /// Price of the estimate: what each (re-)hold asks for.
    pub(super) estimate: Micros,
    pub(super) ttl_ms: i64,
    pub(super) held: Funding,
    pub(super) charged: Funding,
    /// Highest cumulative usage committed so far, to record what each commit added.
    pub(super) usage: Usage,
    pub(super) expires_at: Timestamp,
}

impl Reservation {
    /// What reserving and committing keep true: amounts in range, and a hold of either nothing
    /// or the estimate (split between plan and credits).
    pub(super) fn check(&self) -> Result<(), String> {
        let id = &self.id;
        let at = |what: &str| format!("reservation {id:?}: {what}");
        check_amount(&at("estimate"), self.estimate)?;
        self.held.check(&at("held"))?;
        self.charged.check(&at("charged"))?;
        if self.held.total() > self.estimate {
            return Err(format!(
                "reservation {id:?} holds {} for an estimate of {}",
                self.held.total(),
                self.estimate
            ));
        }
        if self.ttl_ms < 0 {
            return Err(at("negative lifetime"));
        }
        Ok(())
    }
}

impl Closed {
    pub(super) fn check(&self) -> Result<(), String> {
        match *self {
            Closed::Committed {
                charged,
                charged_total,
                ..
            } => {
                charged.check("charged")?;
                charged_total.check("charged in all")?;
                if charged.plan > charged_total.plan || charged.credit > charged_total.credit {
                    return Err("the last commit charged more than the whole task".into());
                }
                Ok(())
            }
            Closed::Released { released } | Closed::Expired { released, .. } => {
                released.check("released")
            }
        }
    }
}

/// How a reservation ended; kept to answer retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Closed {
    /// Only a final commit closes a reservation, so its receipt is always
    /// [`CommitReceipt::finished`](crate::domain::decision::CommitReceipt::finished): the two
    /// amounts are all there is to keep.
    Committed {
        fingerprint: u64,
        charged: Funding,
        charged_total: Funding,
    },
    Released {
        released: Funding,
    },
    Expired {
        released: Funding,
        at: Timestamp,
    },
}

/// A record kept for a while: when it was made, its id, and the record.
pub(super) type Entry<T> = (Timestamp, Arc<str>, T);

/// Records kept for a while, forgotten in the order they were made. An id recorded again
/// (a request id reused after its first answer was forgotten) lives on from its new time.
///
/// Most accounts keep a handful of records, so they are a queue searched from the newest, sized
/// exactly (a hash map would cost a few hundred bytes per account even for one record); an
/// index by id is built once an account keeps many.
#[derive(Debug, Clone)]
pub(super) struct Retained<T> {
    /// (when recorded, id, record), oldest first; an id recorded again appears again, and
    /// the newer entry is the one that counts.
    entries: VecDeque<(Timestamp, Arc<str>, T)>,
    /// Sequence number of `entries[0]`.
    first: u64,
    /// id -> sequence number of its newest entry, once there are more than [`INDEX_FROM`].
    /// Boxed on purpose: 8 bytes in every account instead of a map's 48, for an index that
    /// few accounts ever build.
    #[allow(clippy::box_collection)]
    index: Option<Box<HashMap<Arc<str>, u64>>>,
    /// The numbers of the records a durable store holds (first, end): what was written when
    /// the store last took the changes ([`super::persisted`]). Not part of the state:
    /// equality and serde ignore it.
    synced: (u64, u64),
}

/// Records an account keeps before they are indexed by id.
const INDEX_FROM: usize = 16;

impl<T> Default for Retained<T> {
    fn default() -> Self {
        Retained {
            entries: VecDeque::new(),
            first: 0,
            index: None,
            synced: (0, 0),
        }
    }
}

impl<T: PartialEq> PartialEq for Retained<T> {
    /// The same records in the same order; how they are indexed does not matter.
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl<T: Eq> Eq for Retained<T> {}

/// Stored as the records and the sequence number of the first; the index is rebuilt on reading.
impl<T: Serialize> Serialize for Retained<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut form = s.serialize_struct("Retained", 2)?;
        form.serialize_field("first", &self.first)?;
        form.serialize_field("entries", &self.entries)?;
        form.end()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Retained<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename = "Retained")]
        struct Form<T> {
            first: u64,
            entries: VecDeque<(Timestamp, Arc<str>, T)>,
        }
        let Form { first, entries } = Form::deserialize(d)?;
        Ok(Retained::from_parts(first, entries))
    }
}

impl<T> Retained<T> {
    /// Records numbered from `first`, as a store read them back: all of them held there.
    pub(super) fn from_parts(first: u64, entries: VecDeque<Entry<T>>) -> Self {
        let end = first.wrapping_add(entries.len() as u64);
        let mut retained = Retained {
            entries,
            first,
            index: None,
            synced: (first, end),
        };
        if retained.entries.len() > INDEX_FROM {
            retained.index = Some(Box::new(retained.build_index()));
        }
        retained
    }

    /// The numbers of the records kept: first, and one past the last.
    pub(super) fn span(&self) -> (u64, u64) {
        (
            self.first,
            self.first.wrapping_add(self.entries.len() as u64),
        )
    }

    /// What changed since [`mark_synced`](Self::mark_synced): the numbers forgotten that a
    /// store holds, and the records it does not hold yet (numbered).
    pub(super) fn unsynced(
        &self,
    ) -> (std::ops::Range<u64>, impl Iterator<Item = (u64, &Entry<T>)>) {
        let (held_first, held_end) = self.synced;
        let forgotten = held_first..self.first.min(held_end).max(held_first);
        let skip = held_end.saturating_sub(self.first) as usize;
        let first = self.first;
        let added = (self.entries.iter().enumerate().skip(skip))
            .map(move |(offset, entry)| (first.wrapping_add(offset as u64), entry));
        (forgotten, added)
    }

    /// Notes that a store holds none of these records, so the next changes are all of them.
    pub(super) fn mark_unsynced(&mut self) {
        self.synced = (self.first, self.first);
    }

    /// Notes that a store now holds exactly these records.
    pub(super) fn mark_synced(&mut self) {
        self.synced = self.span();
    }

    pub(super) fn get(&self, id: &str) -> Option<&T> {
        match &self.index {
            Some(index) => {
                let seq = *index.get(id)?;
                let position = usize::try_from(seq - self.first).ok()?;
                self.entries.get(position).map(|(_, _, record)| record)
            }
            None => self
                .entries
                .iter()
                .rev()
                .find(|(_, entry, _)| &**entry == id)
                .map(|(_, _, record)| record),
        }
    }

    pub(super) fn insert(&mut self, now: Timestamp, id: Arc<str>, record: T) {
        let seq = self.first + self.entries.len() as u64;
        if let Some(index) = &mut self.index {
            index.insert(id.clone(), seq);
        }
        push_compact(&mut self.entries, (now, id, record));
        if self.index.is_none() && self.entries.len() > INDEX_FROM {
            self.index = Some(Box::new(self.build_index()));
        }
    }

    /// Each id's newest entry. Wrapping: a forged first number is refused by
    /// [`check`](Self::check), after it was read.
    fn build_index(&self) -> HashMap<Arc<str>, u64> {
        let mut index = HashMap::with_capacity(self.entries.len());
        for (offset, (_, id, _)) in self.entries.iter().enumerate() {
            index.insert(id.clone(), self.first.wrapping_add(offset as u64));
        }
        index
    }

    /// The records, oldest first.
    pub(super) fn records(&self) -> impl Iterator<Item = (&Arc<str>, &T)> {
        self.entries.iter().map(|(_, id, record)| (id, record))
    }

    pub(super) fn records_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.entries.iter_mut().map(|(_, _, record)| record)
    }

    /// Checks each record with `check`, and that the numbering can go on: records are numbered
    /// one at a time from zero, and no account makes 2^63 of them.
    pub(super) fn check(&self, check: impl Fn(&T) -> Result<(), String>) -> Result<(), String> {
        if self.first > i64::MAX as u64 {
            return Err(format!("record number {} is out of range", self.first));
        }
        for (_, id, record) in &self.entries {
            check(record).map_err(|e| format!("{id:?}: {e}"))?;
        }
        Ok(())
    }

    /// Forgets records made at or before `cutoff`.
    pub(super) fn forget_until(&mut self, cutoff: Timestamp) {
        while self.entries.front().is_some_and(|(at, _, _)| *at <= cutoff) {
            if let Some((_, id, _)) = self.entries.pop_front()
                && let Some(index) = &mut self.index
                && index.get(&id) == Some(&self.first)
            {
                index.remove(&id);
            }
            self.first += 1;
        }
        if self.entries.is_empty() {
            // Give the memory back: most accounts are idle most of the time.
            *self = Retained {
                first: self.first,
                synced: self.synced,
                ..Retained::default()
            };
        }
    }
}

/// Open reservations by id (the key shares the reservation's id). Made on the first hold and
/// dropped with the last: most accounts have nothing open most of the time, and an empty map
/// would still cost 48 bytes in each of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(clippy::box_collection)]
pub(super) struct OpenHolds(Option<Box<HashMap<Arc<str>, Reservation>>>);

/// Stored as the reservations ordered by id: a map's order changes from run to run, and the
/// same state must encode to the same bytes.
impl Serialize for OpenHolds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut open: Vec<&Reservation> = self.values().collect();
        open.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        s.collect_seq(open)
    }
}

impl<'de> Deserialize<'de> for OpenHolds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut holds = OpenHolds::default();
        for r in Vec::<Reservation>::deserialize(d)? {
            if holds.get(&r.id).is_some() {
                return Err(D::Error::custom(format!(
                    "reservation {:?} is open twice",
                    r.id
                )));
            }
            holds.insert(r);
        }
        Ok(holds)
    }
}

impl OpenHolds {
    pub(super) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Reservation> {
        self.0.iter().flat_map(|m| m.values())
    }

    pub(super) fn get(&self, id: &str) -> Option<&Reservation> {
        self.0.as_ref()?.get(id)
    }

    /// Every reservation sound, and what they hold together in range (the rules add it up).
    pub(super) fn check(&self) -> Result<(), String> {
        let mut held = (0i128, 0i128);
        for r in self.values() {
            r.check()?;
            held.0 += i128::from(r.held.plan);
            held.1 += i128::from(r.held.credit);
        }
        let max = i128::from(super::MAX_EXACT_MICROS);
        if held.0 > max || held.1 > max {
            return Err(format!("open reservations hold {held:?} in all"));
        }
        Ok(())
    }

    pub(super) fn insert(&mut self, r: Reservation) {
        self.0.get_or_insert_default().insert(r.id.clone(), r);
    }

    pub(super) fn remove(&mut self, id: &str) -> Option<Reservation> {
        let map = self.0.as_mut()?;
        let r = map.remove(id);
        if map.is_empty() {
            self.0 = None;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_found_forgotten_in_order_and_indexed_when_many() {
        let t = Timestamp::from_millis;
        for n in [3_i64, 40] {
            let mut r: Retained<i64> = Retained::default();
            for i in 0..n {
                r.insert(t(i), format!("id{i}").into(), i);
            }
            // Recorded again later: the newer record counts.
            r.insert(t(n), "id0".into(), 100);
            assert_eq!(r.index.is_some(), n > INDEX_FROM as i64);
            assert_eq!(r.get("id0"), Some(&100));
            assert_eq!(r.get(&format!("id{}", n - 1)), Some(&(n - 1)));
            assert_eq!(r.get("nope"), None);
            r.forget_until(t(1));
            assert_eq!(r.get("id1"), None);
            assert_eq!(r.get("id0"), Some(&100), "its newer record stays");
            assert_eq!(r.get("id2"), Some(&2));
            r.forget_until(t(n));
            assert_eq!(r.get("id0"), None);
            assert!(
                r.entries.is_empty() && r.entries.capacity() == 0,
                "memory given back"
            );
            r.insert(t(n + 1), "again".into(), 7);
            assert_eq!(r.get("again"), Some(&7));
        }
    }
}
