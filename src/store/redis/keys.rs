//! Key names. Every key of one account carries the same hash tag, so all of them live in one
//! Redis Cluster slot and one Lua script may touch them all. The sweeper's index is sharded by
//! slot: for each of the 16,384 slots there is one index key whose hash tag lands in that slot,
//! and an account's script updates the index key of its own slot, atomically with its holds.
//! The usage export's outbox is sharded the same way (see [`outbox_key`]).

use std::sync::OnceLock;

/// Number of Redis Cluster hash slots.
pub const SLOTS: u16 = 16_384;

/// The per-account keys, in the order the scripts expect them (see `lua/prelude.lua`).
pub const ACCOUNT_KEYS: [&str; 11] = [
    "acct", "w5", "ww", "lots", "open", "closed", "closedz", "req", "reqz", "grants", "hist",
];

/// The keys one account script is given: the account's own, then its slot's hold index,
/// purchase index and export outbox. Built by appending rather than through `format!`: this
/// runs on every call, and the formatting machinery cost more than the call's other encoding.
pub fn account_keys(prefix: &str, account_id: &str) -> [String; 14] {
    let tag = hash_tag(account_id);
    let slot_tag = slot_tags()[usize::from(slot(tag.as_bytes()))].as_str();
    let joined = |parts: &[&str]| {
        let mut key = String::with_capacity(parts.iter().map(|p| p.len()).sum());
        parts.iter().for_each(|p| key.push_str(p));
        key
    };
    let mut keys: [String; 14] = Default::default();
    for (key, suffix) in keys.iter_mut().zip(ACCOUNT_KEYS) {
        *key = joined(&[prefix, ":{", &tag, "}:", suffix]);
    }
    keys[11] = joined(&[prefix, ":hx:{", slot_tag, "}"]);
    keys[12] = joined(&[prefix, ":pi:{", slot_tag, "}"]);
    keys[13] = joined(&[prefix, ":ob:{", slot_tag, "}"]);
    debug_assert_eq!(keys[11], hold_index_key(prefix, slot(tag.as_bytes())));
    debug_assert_eq!(keys[12], purchase_index_key(prefix, slot(tag.as_bytes())));
    debug_assert_eq!(keys[13], outbox_key(prefix, slot(tag.as_bytes())));
    keys
}

/// The slot of an account's keys.
pub fn account_slot(account_id: &str) -> u16 {
    slot(hash_tag(account_id).as_bytes())
}

/// The usage export's outbox of one slot: a stream the scripts append each charge to,
/// atomically with the charge, since a script may not write to a key in another slot. The
/// relay moves its entries into the export stream.
pub fn outbox_key(prefix: &str, slot: u16) -> String {
    format!("{prefix}:ob:{{{}}}", slot_tags()[usize::from(slot)])
}

/// The relay's lease on one slot's outbox, so that replicas do not relay the same entries.
pub fn outbox_lease_key(prefix: &str, slot: u16) -> String {
    format!("{prefix}:ol:{{{}}}", slot_tags()[usize::from(slot)])
}

/// Envoy RLS counters of one domain: one hash, so that all counters a request touches are in
/// one slot and one script checks them atomically (a busy domain lives on one node; split
/// traffic over several domains to spread it).
pub fn rls_key(prefix: &str, domain: &str) -> String {
    format!("{prefix}:rl:{{{}}}", hash_tag(domain))
}

/// One shard of the usage export stream, the stream consumers read.
pub fn export_key(prefix: &str, shard: u16) -> String {
    format!("{prefix}:export:{{{shard}}}")
}

/// The account record key (`acct`) of an account.
pub fn account_key(prefix: &str, account_id: &str) -> String {
    format!("{prefix}:{{{}}}:acct", hash_tag(account_id))
}

/// The index, for one slot, of accounts with an auto top-up purchase in flight, scored by when
/// it started: a replica resumes the purchases a dead replica left unpaid.
pub fn purchase_index_key(prefix: &str, slot: u16) -> String {
    format!("{prefix}:pi:{{{}}}", slot_tags()[usize::from(slot)])
}

/// The hold-expiry index key whose hash tag maps to `slot`.
pub fn hold_index_key(prefix: &str, slot: u16) -> String {
    format!("{prefix}:hx:{{{}}}", slot_tags()[usize::from(slot)])
}

/// An account id made safe as a hash tag: braces would end the tag early, so they (and the
/// escape character) are percent-encoded. The encoding is one-to-one, so ids never collide.
pub(crate) fn hash_tag(account_id: &str) -> std::borrow::Cow<'_, str> {
    if !account_id.contains(['{', '}', '%']) {
        return account_id.into();
    }
    account_id
        .replace('%', "%25")
        .replace('{', "%7B")
        .replace('}', "%7D")
        .into()
}

/// The Redis Cluster slot of a hash tag: CRC16-CCITT (XMODEM) modulo 16,384.
pub fn slot(tag: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in tag {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

/// For each slot, a short tag that hashes to it (found once by counting upwards).
fn slot_tags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut n: u64 = 0;
        while missing > 0 {
            let candidate = n.to_string();
            let s = usize::from(slot(candidate.as_bytes()));
            if tags[s].is_empty() {
                tags[s] = candidate;
                missing -= 1;
            }
            n += 1;
        }
        tags
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot(b"123456789"), 0x31C3 % SLOTS);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"user1000"), 3443);
    }

    #[test]
    fn an_account_and_its_index_share_a_slot() {
        for id in ["alice", "acct-42", "we{ird}", "%7B"] {
            let keys = account_keys("q", id);
            let tag_of = |k: &str| {
                let open = k.find('{').unwrap();
                let close = open + 1 + k[open + 1..].find('}').unwrap();
                slot(&k.as_bytes()[open + 1..close])
            };
            let s = tag_of(&keys[0]);
            assert!(keys.iter().all(|k| tag_of(k) == s), "{id}: {keys:?}");
        }
        assert_ne!(
            account_keys("q", "a{b}")[0],
            account_keys("q", "a%7Bb%7D")[0]
        );
    }
}
