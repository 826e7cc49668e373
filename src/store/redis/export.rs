//! The usage export on Redis: a transactional outbox relayed into the export stream.
//!
//! A charge's script appends the event to its slot's outbox stream in the same atomic step as
//! the charge (a script may only touch keys of one Cluster slot, and the export stream lives
//! in another). The relay, run by every replica's maintenance tick, copies outbox entries into
//! the export stream (`PREFIX:export:{N}`, `export_shards` of them, an account always in the
//! same shard so its events stay in order) and then deletes them from the outbox. A lease per
//! outbox keeps replicas from relaying the same entries; a replica that dies between the copy
//! and the delete leaves entries that are copied again once its lease runs out, which is why
//! delivery is at least once and every event carries a unique id.
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
    fn export_shard(&self, slot: u16) -> u16 {
        slot % self.settings.export_shards.max(1)
    }

    /// Relays the outboxes this replica wrote to, and those of `probe` that hold entries (left
    /// by replicas that died, or written while this one's relay failed). Returns how many
    /// events were copied into the export stream.
    pub(super) async fn relay_exports(
        &self,
        probe: std::ops::Range<u16>,
    ) -> Result<usize, StoreError> {
        let mut slots = self.dirty.take();
        let prefix = &self.settings.key_prefix;
        let lengths: Vec<(u16, u64)> = self
            .per_slot(probe.collect(), |slot| {
                let mut cmd = redis::cmd("XLEN");
                cmd.arg(keys::outbox_key(prefix, slot));
                cmd
            })
            .await?;
        slots.extend(lengths.into_iter().filter(|&(_, n)| n > 0).map(|(s, _)| s));
        slots.sort_unstable();
        slots.dedup();
        let mut moved = 0;
        for (i, &slot) in slots.iter().enumerate() {
            match self.relay_slot(slot).await {
                Ok(Some(n)) => moved += n,
                // Another replica holds the lease; entries it missed are ours next tick.
                Ok(None) => self.dirty.mark(slot),
                Err(e) => {
                    // Try these again next tick.
                    for &slot in &slots[i..] {
                        self.dirty.mark(slot);
                    }
                    return Err(e);
                }
            }
        }
        Ok(moved)
    }

    /// Moves one outbox into the export stream; `None` if another replica holds its lease.
    async fn relay_slot(&self, slot: u16) -> Result<Option<usize>, StoreError> {
        let prefix = &self.settings.key_prefix;
        let outbox = keys::outbox_key(prefix, slot);
        let lease = keys::outbox_lease_key(prefix, slot);
        let mut conn = self.conn.clone();
        let took: Option<String> = redis::cmd("SET")
            .arg(&lease)
            .arg(&self.replica)
            .arg("NX")
            .arg("PX")
            .arg(LEASE_MS)
            .query_async(&mut conn)
            .await
            .map_err(unavailable("export relay"))?;
        if took.is_none() {
            return Ok(None);
        }
        let export = keys::export_key(prefix, self.export_shard(slot));
        let max_len = self.policy.limits.export_max_len;
        let mut moved = 0;
        let result = async {
            for _ in 0..RELAY_BATCHES {
                let batch: StreamRangeReply = redis::cmd("XRANGE")
                    .arg(&outbox)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(RELAY_BATCH)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable("export relay"))?;
                if batch.ids.is_empty() {
                    break;
                }
                let mut copy = redis::pipe();
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
                copy.query_async::<()>(&mut conn)
                    .await
                    .map_err(unavailable("export relay"))?;
                let mut delete = redis::cmd("XDEL");
                delete.arg(&outbox);
                for entry in &batch.ids {
                    delete.arg(&entry.id);
                }
                delete
                    .query_async::<u64>(&mut conn)
                    .await
                    .map_err(unavailable("export relay"))?;
                moved += batch.ids.len();
                if batch.ids.len() < RELAY_BATCH {
                    break;
                }
            }
            Ok::<_, StoreError>(())
        }
        .await;
        // Give the lease back only if it is still ours (it may have run out).
        let _: Result<i64, _> = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        )
        .key(&lease)
        .arg(&self.replica)
        .invoke_async(&mut conn)
        .await;
        result.map(|()| Some(moved))
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
