//! The memory store's usage export: one bounded, in-process log of every charge, read by
//! consumer groups with the same semantics as a Redis stream read with `XREADGROUP` and
//! `XAUTOCLAIM`, so that billing and analytics consumers behave the same on either store.
//!
//! A group starts at the oldest retained event the first time it reads. Each event is
//! delivered to one consumer of a group and stays pending until acknowledged; an event left
//! unacknowledged for longer than the reader's `claim_idle` is delivered again (to whoever
//! reads next), so delivery is at least once and consumers deduplicate by event id.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use super::ExportRead;
use crate::domain::{ExportedEvent, Timestamp, UsageEvent};

#[derive(Debug)]
pub struct ExportLog {
    state: Mutex<LogState>,
}

#[derive(Debug, Default)]
struct LogState {
    /// Offset of `entries[0]`; offsets are delivery ids and never reused.
    first: u64,
    entries: Chunked<(String, UsageEvent)>,
    groups: HashMap<String, Group>,
}

/// Entries per chunk of the log.
const CHUNK: usize = 1024;

/// A queue in fixed-size chunks: appending never moves what is already there. A `VecDeque`
/// doubles by copying everything it holds, under the log's lock, which every charge takes: at
/// 65,536 events that copy and the fresh pages behind it stalled every charge for 40 ms on a
/// small VM (`bench/README.md`). Here growth allocates one chunk at a time, and a log at its
/// bound frees a chunk as it allocates one.
#[derive(Debug)]
struct Chunked<T> {
    /// Each holds `CHUNK` slots once full; slots before `head` in the first were popped.
    chunks: VecDeque<Vec<Option<T>>>,
    head: usize,
    len: usize,
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Chunked {
            chunks: VecDeque::new(),
            head: 0,
            len: 0,
        }
    }
}

impl<T> Chunked<T> {
    fn len(&self) -> usize {
        self.len
    }

    fn push_back(&mut self, item: T) {
        match self.chunks.back_mut() {
            Some(last) if last.len() < CHUNK => last.push(Some(item)),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(Some(item));
                self.chunks.push_back(chunk);
            }
        }
        self.len += 1;
    }

    fn pop_front(&mut self) -> Option<T> {
        let first = self.chunks.front_mut()?;
        let item = first[self.head].take();
        self.head += 1;
        self.len -= 1;
        if self.head == first.len() {
            // Drained (a partly filled last chunk too, so that an empty queue holds nothing).
            self.chunks.pop_front();
            self.head = 0;
        }
        item
    }

    fn get(&self, index: usize) -> Option<&T> {
        if index >= self.len {
            return None;
        }
        let at = self.head + index;
        self.chunks[at / CHUNK][at % CHUNK].as_ref()
    }
}

impl<T> std::ops::Index<usize> for Chunked<T> {
    type Output = T;

    fn index(&self, index: usize) -> &T {
        self.get(index).expect("an index within the log")
    }
}

/// A consumer group's place in a log: shared with the data dir's export, which keeps the same
/// state on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Group {
    /// The next offset never delivered to this group.
    pub(super) next: u64,
    /// Delivered, not yet acknowledged: offset -> when last delivered.
    pub(super) pending: BTreeMap<u64, Timestamp>,
}

impl Group {
    /// A new group starts at the oldest retained event.
    pub(super) fn starting_at(first: u64) -> Group {
        Group {
            next: first,
            pending: BTreeMap::new(),
        }
    }

    /// The offsets to deliver now, of a log holding `first..end`: unacknowledged ones idle past
    /// `claim_idle_ms` first, then new ones; each is marked delivered at `now`.
    pub(super) fn deliver(
        &mut self,
        first: u64,
        end: u64,
        read: &ExportRead,
        now: Timestamp,
    ) -> Vec<u64> {
        // Trimmed events can no longer be delivered: like a stream, forget them.
        self.pending.retain(|&offset, _| offset >= first);
        self.next = self.next.max(first);
        let stale_before = now.plus_millis(-read.claim_idle_ms);
        let mut offsets: Vec<u64> = self
            .pending
            .iter()
            .filter(|&(_, &delivered)| delivered <= stale_before)
            .map(|(&offset, _)| offset)
            .take(read.max_events)
            .collect();
        while offsets.len() < read.max_events && self.next < end {
            offsets.push(self.next);
            self.next += 1;
        }
        for &offset in &offsets {
            self.pending.insert(offset, now);
        }
        offsets
    }

    /// Acknowledges deliveries; returns how many were pending. Unknown ids count for nothing.
    pub(super) fn ack(&mut self, delivery_ids: &[String]) -> u64 {
        delivery_ids
            .iter()
            .filter_map(|id| id.parse::<u64>().ok())
            .filter(|offset| self.pending.remove(offset).is_some())
            .count() as u64
    }
}

impl Default for ExportLog {
    fn default() -> Self {
        ExportLog::new()
    }
}

impl ExportLog {
    pub fn new() -> ExportLog {
        ExportLog {
            state: Mutex::new(LogState::default()),
        }
    }

    /// Appends an event, keeping the newest `max_len` (the limit in force, which a reload may
    /// change).
    pub fn append(&self, account_id: &str, event: UsageEvent, max_len: u64) {
        let max_len = usize::try_from(max_len.max(1)).unwrap_or(usize::MAX);
        let mut state = self.lock();
        state.entries.push_back((account_id.to_owned(), event));
        while state.entries.len() > max_len {
            state.entries.pop_front();
            state.first += 1;
        }
    }

    pub fn read(&self, read: &ExportRead, now: Timestamp) -> Vec<ExportedEvent> {
        let mut state = self.lock();
        let LogState {
            first,
            entries,
            groups,
        } = &mut *state;
        let first = *first;
        let group = groups
            .entry(read.group.clone())
            .or_insert_with(|| Group::starting_at(first));
        let end = first + entries.len() as u64;
        group
            .deliver(first, end, read, now)
            .into_iter()
            .map(|offset| {
                let (account_id, event) = &entries[(offset - first) as usize];
                ExportedEvent {
                    delivery_id: offset.to_string(),
                    account_id: account_id.clone(),
                    event: event.clone(),
                }
            })
            .collect()
    }

    /// Acknowledges deliveries; returns how many were pending. Unknown ids count for nothing.
    pub fn ack(&self, group: &str, delivery_ids: &[String]) -> u64 {
        let mut state = self.lock();
        state
            .groups
            .get_mut(group)
            .map_or(0, |group| group.ack(delivery_ids))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        // The state stays consistent even if a holder panicked: every change is a push or pop.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Funding, Usage};

    /// The chunked queue against a `VecDeque` over pushes and pops that cross chunk bounds,
    /// drain it, and fill it again.
    #[test]
    fn the_chunked_queue_behaves_as_a_deque() {
        let mut chunked = Chunked::default();
        let mut model = VecDeque::new();
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        for step in 0..20_000u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // Mostly growing for the first half, mostly shrinking for the second.
            let push = if step < 10_000 {
                rng % 10 < 7
            } else {
                rng % 10 < 3
            };
            if push {
                chunked.push_back(step);
                model.push_back(step);
            } else {
                assert_eq!(chunked.pop_front(), model.pop_front());
            }
            assert_eq!(chunked.len(), model.len());
            for probe in [
                0,
                model.len() / 2,
                model.len().saturating_sub(1),
                model.len(),
            ] {
                assert_eq!(chunked.get(probe), model.get(probe), "step {step}");
            }
        }
        while chunked.pop_front().is_some() {}
        assert!(chunked.chunks.is_empty(), "an empty queue holds no chunk");
    }

    fn event(seq: u64) -> UsageEvent {
        UsageEvent {
            seq,
            at: Timestamp::from_millis(0),
            product: "codex".into(),
            usage: Usage::default(),
            charged: Funding::new(1, 0),
            reservation_id: format!("r{seq}").into(),
            price_version: "v".into(),
        }
    }

    fn read(group: &str, max_events: usize, claim_idle_ms: i64) -> ExportRead {
        ExportRead {
            group: group.into(),
            consumer: "c".into(),
            max_events,
            claim_idle_ms,
        }
    }

    fn seqs(events: &[ExportedEvent]) -> Vec<u64> {
        events.iter().map(|e| e.event.seq).collect()
    }

    #[test]
    fn groups_read_independently_and_redeliver_what_stays_unacknowledged() {
        let log = ExportLog::new();
        let t = |ms| Timestamp::from_millis(ms);
        for seq in 1..=3 {
            log.append("a", event(seq), 10);
        }
        let first = log.read(&read("billing", 2, 1_000), t(0));
        assert_eq!(seqs(&first), [1, 2]);
        assert_eq!(
            seqs(&log.read(&read("analytics", 10, 1_000), t(0))),
            [1, 2, 3]
        );
        assert_eq!(log.ack("billing", &[first[0].delivery_id.clone()]), 1);
        // Not idle long enough: only the new event.
        assert_eq!(seqs(&log.read(&read("billing", 10, 1_000), t(500))), [3]);
        // Event 2 was never acknowledged: delivered again once idle.
        assert_eq!(seqs(&log.read(&read("billing", 10, 1_000), t(1_000))), [2]);
        assert_eq!(log.ack("billing", &["99".into(), "x".into()]), 0);
        assert_eq!(log.ack("nobody", &["0".into()]), 0);
    }

    #[test]
    fn trimming_keeps_the_newest_events() {
        let log = ExportLog::new();
        for seq in 1..=5 {
            log.append("a", event(seq), 2);
        }
        let got = log.read(&read("g", 10, 0), Timestamp::from_millis(0));
        assert_eq!(seqs(&got), [4, 5]);
        assert_eq!(got[0].event_id(), "a:4");
    }
}
