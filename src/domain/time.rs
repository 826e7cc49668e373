//! Time as the domain sees it: instants in milliseconds since the Unix epoch and an injected
//! [`Clock`], so that windows, hold expiry and credit-lot expiry are deterministic in tests
//! (a [`ManualClock`] is moved by hand) and never depend on how fast a test runs.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use serde::{Deserialize, Serialize};

/// An instant, in whole milliseconds since 1970-01-01T00:00:00Z.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Timestamp(i64);

pub const SECOND_MS: i64 = 1_000;
pub const MINUTE_MS: i64 = 60 * SECOND_MS;
pub const HOUR_MS: i64 = 60 * MINUTE_MS;
pub const DAY_MS: i64 = 24 * HOUR_MS;

impl Timestamp {
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }

    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// This instant moved by `ms` milliseconds, saturating at the ends of the range.
    pub const fn plus_millis(self, ms: i64) -> Self {
        Self(self.0.saturating_add(ms))
    }

    /// The calendar month (UTC) this instant falls in, as months since January of year 0, so
    /// that two instants are in the same month exactly when their indexes are equal.
    pub fn month_index(self) -> i64 {
        let (y, m, _) = civil_from_days(self.0.div_euclid(DAY_MS));
        y * 12 + i64::from(m) - 1
    }

    /// The same wall-clock instant `months` calendar months later (UTC). A day that does not
    /// exist in the target month is clamped to that month's last day (Jan 31 + 1 month = Feb 28/29).
    pub fn plus_months(self, months: u32) -> Self {
        let days = self.0.div_euclid(DAY_MS);
        let in_day = self.0.rem_euclid(DAY_MS);
        let (y, m, d) = civil_from_days(days);
        let total = i64::from(m) - 1 + i64::from(months);
        let year = y + total.div_euclid(12);
        let month = (total.rem_euclid(12) + 1) as u32;
        let day = d.min(days_in_month(year, month));
        Self(days_from_civil(year, month, day) * DAY_MS + in_day)
    }
}

/// RFC 3339 in UTC with millisecond precision, e.g. `2026-11-24T14:05:00.000Z`.
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.0.div_euclid(DAY_MS);
        let ms = self.0.rem_euclid(DAY_MS);
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            ms / HOUR_MS,
            ms % HOUR_MS / MINUTE_MS,
            ms % MINUTE_MS / SECOND_MS,
            ms % SECOND_MS
        )
    }
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Proleptic Gregorian calendar conversions (H. Hinnant's algorithms), exact for any i64 day.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The source of "now" for everything that depends on time.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> Timestamp;
}

/// Wall-clock time from the operating system.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX))
    }
}

/// A clock that only moves when told to; clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self(Arc::new(AtomicI64::new(start.0)))
    }

    pub fn advance_millis(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn advance_secs(&self, secs: i64) {
        self.advance_millis(secs * SECOND_MS);
    }

    pub fn set(&self, to: Timestamp) {
        self.0.store(to.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(
            Timestamp::from_millis(0).to_string(),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            Timestamp::from_millis(1_795_500_123_456).to_string(),
            "2026-11-24T06:02:03.456Z"
        );
    }

    #[test]
    fn twelve_months_later_is_the_same_date_next_year() {
        let t = Timestamp::from_millis(1_795_500_123_456);
        assert_eq!(t.plus_months(12).to_string(), "2027-11-24T06:02:03.456Z");
        // 2028-02-29 + 12 months clamps to 2029-02-28.
        let leap = Timestamp::from_millis(days_from_civil(2028, 2, 29) * DAY_MS);
        assert_eq!(leap.plus_months(12).to_string(), "2029-02-28T00:00:00.000Z");
    }

    proptest! {
        #[test]
        fn civil_round_trips(days in -1_000_000i64..1_000_000) {
            let (y, m, d) = civil_from_days(days);
            prop_assert_eq!(days_from_civil(y, m, d), days);
        }

        #[test]
        fn adding_months_moves_forward(ms in 0i64..4_000_000_000_000, months in 1u32..40) {
            prop_assert!(Timestamp::from_millis(ms).plus_months(months) > Timestamp::from_millis(ms));
        }
    }
}
