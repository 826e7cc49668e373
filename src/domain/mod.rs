//! The pure model of quotad: plans and products, pricing, rolling windows, reservations, the
//! credit ledger and the decisions that tie them together.
//!
//! Nothing here does I/O or knows about gRPC or Redis; time comes in as a [`Timestamp`] read
//! from an injected [`Clock`]. Given the same state, policy and instant, every operation gives
//! the same answer, which is what lets the stores stay thin and the tests be exact.

pub mod account;
pub mod decision;
pub mod error;
pub mod fingerprint;
pub mod ledger;
pub mod money;
pub mod notice;
pub mod policy;
pub mod pricing;
pub mod rls;
pub mod time;
pub mod top_up;
pub mod window;

pub use account::AccountState;
pub use account::persisted::{
    AccountWrite, DecodeError, FORMAT_VERSION, RecordKind, RecordValue, decode_account,
    decode_account_of, decode_counter, decode_event, encode_account, encode_account_changes,
    encode_counter, encode_event,
};
pub use decision::*;
pub use error::DomainError;
pub use ledger::{CreditLot, LedgerTotals, LotSource};
pub use money::{Credits, Funding, MICROS_PER_CREDIT, Micros};
pub use policy::{Limits, Overage, Plan, Policy, Product};
pub use pricing::{ModelPrice, PriceSheet, PricingError, Usage};
pub use time::{Clock, ManualClock, SystemClock, Timestamp};
pub use window::{FIVE_HOUR, WEEKLY, WindowSpec};
