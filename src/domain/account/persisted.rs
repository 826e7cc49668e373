//! The persisted form of an account and of a usage event: the bytes a durable store writes as
//! one value, and reads back.
//!
//! Every record is an 8-byte header, then a `postcard` payload of the domain types' serde form:
//!
//! ```text
//! magic (2 bytes: "QA" account, "QE" event) | format version (u16 LE) | CRC-32 of payload (u32 LE) | payload
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
//! rules could have made, so a corrupt or hand-edited value is refused rather than served
//! with a wrong balance.
//!
//! An account's recent usage history is not part of its persisted form: the store keeps
//! history in its own table (events encoded with [`encode_event`]), taking it from the state
//! with [`AccountState::take_recent`].

use super::AccountState;
use crate::domain::decision::UsageEvent;

/// The persisted format this quotad writes and reads. Any change to the payload of either
/// record (a field added, removed, reordered or retyped in a persisted type) needs a new version.
pub const FORMAT_VERSION: u16 = 1;

const ACCOUNT_MAGIC: [u8; 2] = *b"QA";
const EVENT_MAGIC: [u8; 2] = *b"QE";
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

pub fn encode_account(state: &AccountState) -> Vec<u8> {
    seal(ACCOUNT_MAGIC, state)
}

pub fn decode_account(bytes: &[u8]) -> Result<AccountState, DecodeError> {
    let payload = open(bytes, ACCOUNT_MAGIC, "account")?;
    let state: AccountState = parse(payload)?;
    Ok(state)
}

/// A usage event of account `account_id`, as history and the export store it.
pub fn encode_event(account_id: &str, event: &UsageEvent) -> Vec<u8> {
    seal(EVENT_MAGIC, &(account_id, event))
}

/// The account id and the event of a value made by [`encode_event`].
pub fn decode_event(bytes: &[u8]) -> Result<(String, UsageEvent), DecodeError> {
    let payload = open(bytes, EVENT_MAGIC, "usage event")?;
    let (account_id, event): (String, UsageEvent) = parse(payload)?;
    Ok((account_id, event))
}

fn seal(magic: [u8; 2], value: &impl serde::Serialize) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    // Cannot fail: the persisted types are plain data with known lengths, and the output
    // grows as needed.
    let mut out = postcard::to_extend(value, out).expect("persisted types always serialize");
    let crc = crc32fast::hash(&out[HEADER_LEN..]);
    out[4..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    out
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
    use super::super::testing::*;
    use super::*;
    use crate::domain::decision::{
        Account, Decision, ReleaseCommand, RevokeCommand, SetTopUpCommand, SettleTopUpCommand,
    };
    use crate::domain::ledger::LotSource;
    use crate::domain::money::MICROS_PER_CREDIT as C;
    use crate::domain::policy::Policy;
    use crate::domain::time::{MINUTE_MS, Timestamp};
    use crate::domain::top_up::{PaymentResult, TopUpSettings};
    use proptest::prelude::*;

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
                    let source = if i % 3 == 0 {
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
            let bytes = encode_account(&s);
            let mut back = decode_account(&bytes).unwrap();
            prop_assert!(back.recent.is_empty());
            let recent = s.take_recent();
            prop_assert!(recent.windows(2).all(|w| w[0].seq < w[1].seq), "oldest first");
            prop_assert_eq!(&back, &s);
            prop_assert_eq!(encode_account(&back), bytes);

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
        let a = decode_account(&encode_account(&s)).unwrap();
        let b = decode_account(&encode_account(&s)).unwrap();
        assert!(std::sync::Arc::ptr_eq(&a.account.plan, &b.account.plan));
        let model = |s: &AccountState| s.open.values().next().unwrap().usage.model.clone();
        assert!(std::sync::Arc::ptr_eq(&model(&a), &model(&b)));
    }
}
