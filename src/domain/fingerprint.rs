//! Stable fingerprints of request payloads, to tell an idempotent retry (same key, same payload)
//! from a conflicting reuse of the key. FNV-1a over a length-prefixed encoding: deterministic
//! across processes and versions, so replicas sharing a store agree on what "the same" means.

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

#[derive(Debug, Clone, Copy)]
pub struct Fingerprint(u64);

impl Default for Fingerprint {
    fn default() -> Self {
        Fingerprint(OFFSET)
    }
}

impl Fingerprint {
    fn bytes(mut self, bytes: &[u8]) -> Self {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(PRIME);
        }
        self
    }

    pub fn u64(self, v: u64) -> Self {
        self.bytes(&v.to_le_bytes())
    }

    pub fn i64(self, v: i64) -> Self {
        self.bytes(&v.to_le_bytes())
    }

    pub fn str(self, s: &str) -> Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }

    pub fn finish(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_prefix_separates_fields() {
        let a = Fingerprint::default().str("ab").str("c").finish();
        let b = Fingerprint::default().str("a").str("bc").finish();
        assert_ne!(a, b);
        assert_eq!(a, Fingerprint::default().str("ab").str("c").finish());
    }
}
