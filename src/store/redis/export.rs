//! The usage export on Redis: on a Cluster, a transactional outbox relayed into the export
//! stream.
//!
//! On a standalone Redis a Commit appends its event to the export stream itself, in the
//! charge's atomic step, and nothing here has work but the probe for outboxes left by older
//! versions (the relay's round trips, several per slot that had charges, had cost about a tenth
//! of Redis's work and a fifth of quotad's per Reserve+Commit pair). On a Cluster (or with
//! `export_outbox`) a charge's script appends the event to its slot's outbox stream in the same
//! atomic step as the charge (a script may only touch keys of one Cluster slot, and the export
//! stream lives in another). The relay, run by every replica's maintenance tick, copies outbox
//! entries into the export stream (`PREFIX:export:{N}`, `export_shards` of them, an account
//! always in the same shard so its events stay in order) and then deletes them from the
//! outbox. A lease per outbox keeps replicas from relaying the same entries; a replica that
//! dies between the copy and the delete leaves entries that are copied again once its lease
//! runs out, which is why delivery is at least once and every event carries a unique id.
//!
//! Consumers read the export stream with consumer groups (`XREADGROUP`, `XAUTOCLAIM`, `XACK`),
//! directly or through quotad's `ReadUsageExport`; the entry format is in the README.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use redis::streams::{StreamAutoClaimReply, StreamId, StreamRangeReply, StreamReadReply};

use super::{RedisStore, keys, wire};
use crate::domain::{ExportedEvent, UsageEvent};
use crate::store::{ExportRead, StoreError};

/// Outbox entries moved per batch, and batches per slot per tick.
const RELAY_BATCH: usize = 500;
const RELAY_BATCHES: usize = 20;
/// How long a relay's lease on an outbox lasts if it dies holding it.
const LEASE_MS: u64 = 10_000;

/// Slots whose outbox this replica wrote to since its last relay, one bit per slot.
pub(super) struct DirtySlots(Box<[AtomicU64]>);

impl DirtySlots {
    pub fn new() -> DirtySlots {
        DirtySlots(
            (0..usize::from(keys::SLOTS) / 64)
                .map(|_| AtomicU64::new(0))
                .collect(),
        )
    }

    pub fn mark(&self, slot: u16) {
        self.0[usize::from(slot / 64)].fetch_or(1 << (slot % 64), Ordering::Relaxed);
    }

    /// The marked slots, unmarking them.
    pub fn take(&self) -> Vec<u16> {
        let mut slots = Vec::new();
        for (word_index, word) in self.0.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::Relaxed);
            while bits != 0 {
                let bit = bits.trailing_zeros() as u16;
                slots.push(word_index as u16 * 64 + bit);
                bits &= bits - 1;
            }
        }
        slots
    }
}

fn unavailable(what: &str) -> impl Fn(redis::RedisError) -> StoreError + '_ {
    move |e| StoreError::Unavailable(format!("{what}: {e}"))
}

impl RedisStore {
    pub(super) fn export_shard(&self, slot: u16) -> u16 {
        slot % self.settings.export_shards.max(1)
    }

    /// Relays the outboxes this replica wrote to, and those of `probe` that hold entries (left
    /// by replicas that died, or written while this one's relay failed). Returns how many
    /// events were copied into the export stream.
    ///
    /// All the outboxes of a tick move together, a few round trips in all (lease, read, copy,
    /// delete, give back), not a few per outbox: at thousands of charges a second the outboxes
    /// of a tick number in the thousands, and one round trip at a time they kept a core busy.
    pub(super) async fn relay_exports(&self, probe: Vec<u16>) -> Result<usize, StoreError> {
        let mut slots = self.dirty.take();
        let prefix = &self.settings.key_prefix;
        let lengths: Vec<(u16, u64)> = self
            .per_slot(probe, |slot| {
                let mut cmd = redis::cmd("XLEN");
                cmd.arg(keys::outbox_key(prefix, slot));
                cmd
            })
            .await?;
        slots.extend(lengths.into_iter().filter(|&(_, n)| n > 0).map(|(s, _)| s));
        slots.sort_unstable();
        slots.dedup();
        if slots.is_empty() {
            return Ok(0);
        }
        let result = self.relay_slots(&slots).await;
        if result.is_err() {
            // Try them all again next tick; copies made are deduplicated by event id.
            for &slot in &slots {
                self.dirty.mark(slot);
            }
        }
        result
    }

    async fn relay_slots(&self, slots: &[u16]) -> Result<usize, StoreError> {
        let prefix = &self.settings.key_prefix;
        let took: Vec<(u16, Option<String>)> = self
            .per_slot(slots.to_vec(), |slot| {
                let mut cmd = redis::cmd("SET");
                cmd.arg(keys::outbox_lease_key(prefix, slot))
                    .arg(&self.replica)
                    .arg("NX")
                    .arg("PX")
                    .arg(LEASE_MS);
                cmd
            })
            .await?;
        let mut leased = Vec::new();
        for (slot, took) in took {
            match took {
                Some(_) => leased.push(slot),
                // Another replica holds the lease; entries it missed are ours next tick.
                None => self.dirty.mark(slot),
            }
        }
        let moved = self.move_outboxes(leased.clone()).await;
        // Give each lease back only if it is still ours (it may have run out).
        let _ = self
            .per_slot::<i64>(leased, |slot| {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
                )
                .arg(1)
                .arg(keys::outbox_lease_key(prefix, slot))
                .arg(&self.replica);
                cmd
            })
            .await;
        moved
    }

    /// Copies the entries of leased outboxes into the export stream and deletes them, a batch
    /// per outbox at a time, until they are empty or each has had RELAY_BATCHES batches.
    async fn move_outboxes(&self, mut active: Vec<u16>) -> Result<usize, StoreError> {
        let prefix = &self.settings.key_prefix;
        let max_len = self.rules.policy().limits.export_max_len;
        let mut moved = 0;
        for _ in 0..RELAY_BATCHES {
            if active.is_empty() {
                break;
            }
            let batches: Vec<(u16, StreamRangeReply)> = self
                .per_slot(active, |slot| {
                    let mut cmd = redis::cmd("XRANGE");
                    cmd.arg(keys::outbox_key(prefix, slot))
                        .arg("-")
                        .arg("+")
                        .arg("COUNT")
                        .arg(RELAY_BATCH);
                    cmd
                })
                .await?;
            // One pipeline per export shard (a shard is one key, so one Cluster slot), in slot
            // and entry order: an account's events keep their order in its shard.
            let mut copies: BTreeMap<u16, redis::Pipeline> = BTreeMap::new();
            let mut read: BTreeMap<u16, Vec<String>> = BTreeMap::new();
            for (slot, batch) in &batches {
                if batch.ids.is_empty() {
                    continue;
                }
                let export = keys::export_key(prefix, self.export_shard(*slot));
                let copy = copies.entry(self.export_shard(*slot)).or_default();
                for entry in &batch.ids {
                    let (account, event) = outbox_entry(entry)?;
                    copy.cmd("XADD")
                        .arg(&export)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(max_len)
                        .arg("*")
                        .arg("id")
                        .arg(event.id(&account))
                        .arg("event")
                        .arg(wire::export_json(&account, &event))
                        .ignore();
                }
                read.insert(*slot, batch.ids.iter().map(|e| e.id.clone()).collect());
            }
            let mut writes = tokio::task::JoinSet::new();
            for copy in copies.into_values() {
                let mut conn = self.conn.clone();
                writes.spawn(async move { copy.query_async::<()>(&mut conn).await });
            }
            while let Some(written) = writes.join_next().await {
                written
                    .map_err(|e| StoreError::Internal(format!("export relay task: {e}")))?
                    .map_err(unavailable("export relay"))?;
            }
            let _: Vec<(u16, u64)> = self
                .per_slot(read.keys().copied().collect(), |slot| {
                    let mut cmd = redis::cmd("XDEL");
                    cmd.arg(keys::outbox_key(prefix, slot)).arg(&read[&slot]);
                    cmd
                })
                .await?;
            moved += read.values().map(Vec::len).sum::<usize>();
            active = read
                .into_iter()
                .filter(|(_, ids)| ids.len() == RELAY_BATCH)
                .map(|(slot, _)| slot)
                .collect();
        }
        Ok(moved)
    }

    pub(super) async fn read_exports(
        &self,
        read: &ExportRead,
    ) -> Result<Vec<ExportedEvent>, StoreError> {
        let mut events = Vec::new();
        for shard in 0..self.settings.export_shards.max(1) {
            if events.len() >= read.max_events {
                break;
            }
            let key = keys::export_key(&self.settings.key_prefix, shard);
            let entries = match self
                .read_shard(&key, read, read.max_events - events.len())
                .await
            {
                Err(e) if e.code() == Some("NOGROUP") => {
                    // A group starts at the oldest event still kept, like the memory store's.
                    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                        .arg("CREATE")
                        .arg(&key)
                        .arg(&read.group)
                        .arg("0")
                        .arg("MKSTREAM")
                        .query_async(&mut self.conn.clone())
                        .await;
                    match created {
                        Err(e) if e.code() != Some("BUSYGROUP") => {
                            return Err(unavailable("export read")(e));
                        }
                        _ => {}
                    }
                    self.read_shard(&key, read, read.max_events - events.len())
                        .await
                }
                other => other,
            }
            .map_err(unavailable("export read"))?;
            for entry in entries {
                let json: String = entry.get("event").ok_or_else(|| {
                    StoreError::Internal(format!("export entry {} has no event", entry.id))
                })?;
                let (account_id, event) = wire::parse_export_json(&json)
                    .map_err(|e| StoreError::Internal(format!("export entry {}: {e}", entry.id)))?;
                events.push(ExportedEvent {
                    delivery_id: format!("{shard}/{}", entry.id),
                    account_id,
                    event,
                });
            }
        }
        Ok(events)
    }

    /// Claims entries idle past `claim_idle_ms`, then reads new ones, up to `max` in all.
    async fn read_shard(
        &self,
        key: &str,
        read: &ExportRead,
        max: usize,
    ) -> redis::RedisResult<Vec<StreamId>> {
        let mut conn = self.conn.clone();
        let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(key)
            .arg(&read.group)
            .arg(&read.consumer)
            .arg(read.claim_idle_ms.max(0))
            .arg("0-0")
            .arg("COUNT")
            .arg(max)
            .query_async(&mut conn)
            .await?;
        let mut entries = claimed.claimed;
        if entries.len() < max {
            let fresh: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&read.group)
                .arg(&read.consumer)
                .arg("COUNT")
                .arg(max - entries.len())
                .arg("STREAMS")
                .arg(key)
                .arg(">")
                .query_async(&mut conn)
                .await?;
            entries.extend(fresh.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids));
        }
        Ok(entries)
    }

    pub(super) async fn ack_exports(
        &self,
        group: &str,
        delivery_ids: &[String],
    ) -> Result<u64, StoreError> {
        let mut by_shard: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
        for id in delivery_ids {
            // Ids that are not ours cannot be pending: they count for nothing, as in XACK.
            if let Some((shard, entry)) = id.split_once('/')
                && let Ok(shard) = shard.parse::<u16>()
                && shard < self.settings.export_shards.max(1)
                && is_entry_id(entry)
            {
                by_shard.entry(shard).or_default().push(entry);
            }
        }
        let mut acked = 0;
        let mut conn = self.conn.clone();
        for (shard, entries) in by_shard {
            let mut ack = redis::cmd("XACK");
            ack.arg(keys::export_key(&self.settings.key_prefix, shard))
                .arg(group)
                .arg(entries);
            acked += ack
                .query_async::<u64>(&mut conn)
                .await
                .map_err(unavailable("export ack"))?;
        }
        Ok(acked)
    }
}

/// A stream entry id, `MILLISECONDS-SEQUENCE`.
fn is_entry_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(ms, seq)| {
        [ms, seq]
            .iter()
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
    })
}

fn outbox_entry(entry: &StreamId) -> Result<(String, UsageEvent), StoreError> {
    let bad = |what: &str| StoreError::Internal(format!("outbox entry {}: {what}", entry.id));
    let account: String = entry.get("a").ok_or_else(|| bad("no account"))?;
    let text: String = entry.get("e").ok_or_else(|| bad("no event"))?;
    let event: wire::EventJ = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
    Ok((account, event.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_slots_are_taken_once() {
        let dirty = DirtySlots::new();
        for slot in [0, 63, 64, 16_383, 64] {
            dirty.mark(slot);
        }
        assert_eq!(dirty.take(), [0, 63, 64, 16_383]);
        assert!(dirty.take().is_empty());
    }
}
