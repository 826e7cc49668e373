//! Redis Cluster's hash slot, computed here as Redis does: the engine places accounts and RLS
//! domains in partitions by it, so that one partition's keys can share one hash tag.

/// Number of Redis Cluster hash slots.
pub const SLOTS: u16 = 16_384;

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
}
