//! Rolling usage windows, kept as sparse time buckets.
//!
//! Usage is added to the bucket of the instant it was committed; a bucket leaves the window once
//! its *end* is older than the window's length. So usage never leaves early and leaves at most one
//! bucket late. Only buckets that saw usage are stored, oldest first, so an account that works
//! now and then costs a handful of entries, and a busy one at most `length / bucket + 1`.
//!
//! | window   | length  | bucket    | at most late by |
//! |----------|---------|-----------|-----------------|
//! | `5h`     | 5 hours | 5 minutes | 5 minutes       |
//! | `weekly` | 7 days  | 1 hour    | 1 hour          |

use std::collections::VecDeque;

use serde::{Deserialize, Deserializer, Serialize};

use super::money::{Micros, check_amount};
use super::time::{DAY_MS, HOUR_MS, MINUTE_MS, Timestamp};

/// The shape of a window: its name in the API, its length and its bucket size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    pub name: &'static str,
    pub length_ms: i64,
    pub bucket_ms: i64,
}

pub const FIVE_HOUR: WindowSpec = WindowSpec {
    name: "5h",
    length_ms: 5 * HOUR_MS,
    bucket_ms: 5 * MINUTE_MS,
};
pub const WEEKLY: WindowSpec = WindowSpec {
    name: "weekly",
    length_ms: 7 * DAY_MS,
    bucket_ms: HOUR_MS,
};

/// Committed usage of one window. Serialized without its spec: whoever stores a window knows
/// which one it is, and reads it back with [`SlidingWindow::deserialize_as`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlidingWindow {
    /// A reference, not a copy: there are two windows per account, millions of accounts.
    #[serde(skip)]
    spec: &'static WindowSpec,
    /// (bucket index, amount), bucket index ascending.
    buckets: VecDeque<(i64, Micros)>,
    total: Micros,
}

impl SlidingWindow {
    /// Reads back a window serialized as `spec`'s; check it before use (`check`).
    pub fn deserialize_as<'de, D: Deserializer<'de>>(
        spec: &'static WindowSpec,
        d: D,
    ) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename = "SlidingWindow")]
        struct Stored {
            buckets: VecDeque<(i64, Micros)>,
            total: Micros,
        }
        let Stored { buckets, total } = Stored::deserialize(d)?;
        Ok(SlidingWindow {
            spec,
            buckets,
            total,
        })
    }

    /// What [`add`](Self::add) and [`advance`](Self::advance) keep true, and what the instants
    /// they compute need: buckets in ascending order, never more than a window's worth, each
    /// with usage, summing to the total, at instants that can be computed.
    pub(crate) fn check(&self) -> Result<(), String> {
        let spec = self.spec;
        let most = spec.length_ms / spec.bucket_ms + 1;
        if self.buckets.len() as i64 > most {
            return Err(format!(
                "{} buckets, a window holds at most {most}",
                self.buckets.len()
            ));
        }
        let mut sum: Micros = 0;
        let mut previous: Option<i64> = None;
        for &(bucket, amount) in &self.buckets {
            if previous.is_some_and(|p| p >= bucket) {
                return Err(format!("bucket {bucket} is out of order"));
            }
            previous = Some(bucket);
            bucket
                .checked_add(1)
                .and_then(|b| b.checked_mul(spec.bucket_ms))
                .and_then(|ms| ms.checked_add(spec.length_ms))
                .ok_or_else(|| format!("bucket {bucket} is out of range"))?;
            if amount == 0 {
                return Err(format!("bucket {bucket} is empty"));
            }
            check_amount("a bucket", amount)?;
            // Cannot overflow: at most a few hundred amounts of at most 2^53 each.
            sum += amount;
        }
        check_amount("the total", self.total)?;
        if sum != self.total {
            return Err(format!(
                "the buckets sum to {sum}, the total says {}",
                self.total
            ));
        }
        Ok(())
    }

    pub fn new(spec: &'static WindowSpec) -> Self {
        Self {
            spec,
            buckets: VecDeque::new(),
            total: 0,
        }
    }

    pub fn spec(&self) -> WindowSpec {
        *self.spec
    }

    /// The instant a bucket's usage stops counting.
    fn leaves_at(&self, bucket: i64) -> Timestamp {
        Timestamp::from_millis((bucket + 1) * self.spec.bucket_ms + self.spec.length_ms)
    }

    /// Drops the buckets that have left the window at `now`.
    pub fn advance(&mut self, now: Timestamp) {
        while let Some(&(bucket, amount)) = self.buckets.front() {
            if self.leaves_at(bucket) > now {
                break;
            }
            self.total -= amount;
            self.buckets.pop_front();
        }
    }

    /// Adds committed usage at `now`. A `now` earlier than the newest bucket (a clock that
    /// stepped back) lands in the newest bucket, so it leaves late rather than early.
    pub fn add(&mut self, now: Timestamp, amount: Micros) {
        if amount == 0 {
            return;
        }
        let bucket = now.as_millis().div_euclid(self.spec.bucket_ms);
        match self.buckets.back_mut() {
            Some((newest, sum)) if *newest >= bucket => *sum += amount,
            _ => {
                // Sized exactly: most windows hold a few buckets, and there is one per account.
                if self.buckets.len() == self.buckets.capacity() {
                    self.buckets.reserve_exact((self.buckets.len() / 2).max(1));
                }
                self.buckets.push_back((bucket, amount));
            }
        }
        self.total += amount;
    }

    /// Committed usage still in the window (call [`advance`](Self::advance) first).
    pub fn committed(&self) -> Micros {
        self.total
    }

    /// When everything counted now will have left the window; `None` when nothing is counted.
    pub fn resets_at(&self) -> Option<Timestamp> {
        self.buckets
            .back()
            .map(|&(bucket, _)| self.leaves_at(bucket))
    }

    /// The earliest instant at or after `now` at which committed usage is at most `target`,
    /// or `None` if that never happens (`target` < 0).
    pub fn committed_at_most_at(&self, now: Timestamp, target: Micros) -> Option<Timestamp> {
        if target < 0 {
            return None;
        }
        let mut remaining = self.total;
        if remaining <= target {
            return Some(now);
        }
        for &(bucket, amount) in &self.buckets {
            remaining -= amount;
            if remaining <= target {
                return Some(self.leaves_at(bucket));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: i64 = 1_795_000_000_000;

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millis(T0 + ms)
    }

    #[test]
    fn usage_leaves_after_the_window_and_at_most_one_bucket_late() {
        let mut w = SlidingWindow::new(&FIVE_HOUR);
        let start = at(0).as_millis().div_euclid(FIVE_HOUR.bucket_ms) * FIVE_HOUR.bucket_ms;
        let t = Timestamp::from_millis(start + 2 * MINUTE_MS);
        w.add(t, 10);
        w.advance(t.plus_millis(5 * HOUR_MS));
        assert_eq!(w.committed(), 10, "never early");
        let leaves = Timestamp::from_millis(start + FIVE_HOUR.bucket_ms + 5 * HOUR_MS);
        assert_eq!(w.resets_at(), Some(leaves));
        w.advance(leaves.plus_millis(-1));
        assert_eq!(w.committed(), 10);
        w.advance(leaves);
        assert_eq!(w.committed(), 0);
        assert_eq!(w.resets_at(), None);
    }

    #[test]
    fn finds_when_enough_capacity_returns() {
        let mut w = SlidingWindow::new(&FIVE_HOUR);
        w.add(at(0), 10);
        w.add(at(HOUR_MS), 20);
        w.add(at(2 * HOUR_MS), 30);
        let now = at(2 * HOUR_MS);
        assert_eq!(w.committed_at_most_at(now, 60), Some(now));
        let first = w.buckets[0].0;
        let second = w.buckets[1].0;
        assert_eq!(w.committed_at_most_at(now, 50), Some(w.leaves_at(first)));
        assert_eq!(w.committed_at_most_at(now, 30), Some(w.leaves_at(second)));
        assert_eq!(w.committed_at_most_at(now, 0), w.resets_at());
        assert_eq!(w.committed_at_most_at(now, -1), None);
    }

    #[test]
    fn a_clock_stepping_back_lands_in_the_newest_bucket() {
        let mut w = SlidingWindow::new(&WEEKLY);
        w.add(at(3 * HOUR_MS), 5);
        w.add(at(0), 7);
        assert_eq!(w.buckets.len(), 1);
        assert_eq!(w.committed(), 12);
    }

    proptest! {
        /// Against a reference that remembers every addition's exact instant: the window never
        /// forgets usage younger than its length and never keeps usage older than length + bucket.
        #[test]
        fn matches_the_exact_definition_within_one_bucket(
            steps in prop::collection::vec((0i64..3 * HOUR_MS, 1i64..1_000), 1..60),
            weekly in any::<bool>(),
        ) {
            let spec = if weekly { &WEEKLY } else { &FIVE_HOUR };
            let mut w = SlidingWindow::new(spec);
            let mut exact: Vec<(i64, i64)> = Vec::new();
            let mut now = T0;
            for (dt, amount) in steps {
                now += dt;
                w.advance(Timestamp::from_millis(now));
                w.add(Timestamp::from_millis(now), amount);
                exact.push((now, amount));
                let lower: i64 = exact.iter().filter(|(t, _)| *t + spec.length_ms > now).map(|(_, a)| a).sum();
                let upper: i64 = exact.iter().filter(|(t, _)| *t + spec.length_ms + spec.bucket_ms > now).map(|(_, a)| a).sum();
                prop_assert!(w.committed() >= lower && w.committed() <= upper);
                prop_assert!(w.buckets.len() as i64 <= spec.length_ms / spec.bucket_ms + 1);
            }
        }
    }
}
