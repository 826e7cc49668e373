//! Whether Redis is reachable, as this replica last saw it, and the circuit breaker that turns
//! an outage into fast failures: while it is open, calls fail at once instead of each waiting
//! out its timeout and queueing behind the others.
//!
//! The breaker tells a Redis that is down from one that is slow, since failing every call fast
//! because one call was slow turns a slow Redis into an outage. It opens
//! - at once when a connection fails (refused, reset, closed, cannot be made): nothing gets
//!   through, and each call would otherwise wait for a connection attempt of its own;
//! - after `consecutive_failures` calls in a row got no answer (timed out, after their retry
//!   where one was allowed, or answered with an error such as `LOADING` or `BUSY`);
//! - when at least `failure_percent` of the calls of the last `window` failed, once that window
//!   holds `min_calls` calls: a Redis that fails every other call is not healthy even if it
//!   never fails five times in a row.
//!
//! These are the two triggers of Envoy's outlier detection (consecutive failures, success
//! rate), Finagle's fail-fast on a failed connection, and resilience4j's failure-rate window
//! with a minimum number of calls.
//!
//! Once open, calls fail at once for `cooldown`; then exactly one call (the probe) tries while
//! the others keep failing fast. The probe's success closes the breaker and forgets past
//! failures; its failure starts another cool-down. Should a probe never report (its caller went
//! away), another call may probe after `probe_timeout`.
//!
//! Every method takes the instant it happens at (the plain ones read the clock), so that the
//! policy is tested without sleeping.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::store::StoreHealth;

/// When the breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Failed calls in a row that open it (1: any failure does).
    pub consecutive_failures: u32,
    /// The share of failed calls over `window`, in percent, that opens it.
    pub failure_percent: u32,
    pub window: Duration,
    /// Calls `window` must hold before the share counts.
    pub min_calls: u32,
    /// How long calls fail at once before one probes.
    pub cooldown: Duration,
    /// How long a probe may take (a call's whole wait) before another call may probe instead.
    pub probe_timeout: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            consecutive_failures: 5,
            failure_percent: 50,
            window: Duration::from_secs(1),
            min_calls: 20,
            cooldown: Duration::from_millis(100),
            probe_timeout: Duration::from_millis(500),
        }
    }
}

/// How a call failed, as the breaker weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection failed: refused, reset, closed, or it could not be made.
    Connection,
    /// No answer in time, or an error answer: counted, not enough alone.
    Call,
}

/// The window is kept as this many buckets of calls and failures, each a tenth of it.
const BUCKETS: usize = 10;

#[derive(Debug)]
struct Bucket {
    /// Which stretch of time (nanoseconds since the start / bucket length) it counts;
    /// `u64::MAX` when none.
    index: AtomicU64,
    calls: AtomicU32,
    failures: AtomicU32,
}

#[derive(Debug)]
pub struct Health {
    policy: BreakerPolicy,
    started: Instant,
    /// Nanoseconds after `started` until which calls fail without trying; 0 when closed.
    open_until: AtomicU64,
    down: AtomicBool,
    in_a_row: AtomicU32,
    buckets: [Bucket; BUCKETS],
    last_error: Mutex<String>,
}

impl Health {
    pub fn new(policy: BreakerPolicy) -> Health {
        Health::starting_at(policy, Instant::now())
    }

    fn starting_at(policy: BreakerPolicy, started: Instant) -> Health {
        Health {
            policy,
            started,
            open_until: AtomicU64::new(0),
            down: AtomicBool::new(false),
            in_a_row: AtomicU32::new(0),
            buckets: std::array::from_fn(|_| Bucket {
                index: AtomicU64::new(u64::MAX),
                calls: AtomicU32::new(0),
                failures: AtomicU32::new(0),
            }),
            last_error: Mutex::new(String::new()),
        }
    }

    /// Nanoseconds from the start to `now`, plus one, so that a deadline is never 0 (closed).
    fn nanos(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.started).as_nanos();
        u64::try_from(since).unwrap_or(u64::MAX - 1) + 1
    }

    fn after(&self, now: Instant, wait: Duration) -> u64 {
        let wait = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        self.nanos(now).saturating_add(wait)
    }

    /// `Err(last error)` while the breaker is open; `Ok` when closed, or for the one call
    /// that probes once the cool-down is over.
    pub fn check(&self) -> Result<(), String> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Result<(), String> {
        let open_until = self.open_until.load(Ordering::Acquire);
        if open_until == 0 {
            return Ok(());
        }
        if self.nanos(now) >= open_until {
            // Claim the probe: whoever moves the deadline goes; everyone else waits it out.
            let next = self.after(now, self.policy.probe_timeout.max(self.policy.cooldown));
            let claimed = self.open_until.compare_exchange(
                open_until,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            if claimed.is_ok() {
                return Ok(());
            }
        }
        Err(self.last_error())
    }

    /// Whether calls go through (a call that timed out may then try again).
    pub fn is_closed(&self) -> bool {
        self.open_until.load(Ordering::Acquire) == 0
    }

    pub fn succeeded(&self) {
        self.succeeded_at(Instant::now());
    }

    fn succeeded_at(&self, now: Instant) {
        self.count(now, false);
        if self.in_a_row.load(Ordering::Relaxed) != 0 {
            self.in_a_row.store(0, Ordering::Relaxed);
        }
        if self.open_until.load(Ordering::Acquire) != 0 {
            self.open_until.store(0, Ordering::Release);
            // Failures from before the outage ended say nothing about Redis now.
            for bucket in &self.buckets {
                bucket.index.store(u64::MAX, Ordering::Release);
            }
        }
        if self.down.load(Ordering::Acquire) && self.down.swap(false, Ordering::AcqRel) {
            tracing::info!("Redis is reachable again");
        }
    }

    pub fn failed(&self, failure: Failure, error: &str) {
        self.failed_at(failure, error, Instant::now());
    }

    fn failed_at(&self, failure: Failure, error: &str, now: Instant) {
        if let Ok(mut last) = self.last_error.lock() {
            error.clone_into(&mut last);
        }
        let (calls, failures) = self.count(now, true);
        let in_a_row = self.in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        let reason = if failure == Failure::Connection {
            "the connection failed".to_owned()
        } else if !self.is_closed() {
            // A probe (or a call from before the breaker opened) failed: cool down again.
            "it still does not answer".to_owned()
        } else if in_a_row >= self.policy.consecutive_failures {
            format!("{in_a_row} calls in a row failed")
        } else if calls >= u64::from(self.policy.min_calls)
            && failures * 100 >= u64::from(self.policy.failure_percent) * calls
        {
            format!(
                "{failures} of the last {calls} calls failed (in {:?})",
                self.policy.window
            )
        } else {
            return;
        };
        let until = self.after(now, self.policy.cooldown);
        self.open_until.store(until, Ordering::Release);
        if !self.down.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                error,
                reason,
                "Redis is unreachable: calls fail fast with UNAVAILABLE until it answers again"
            );
        }
    }

    /// Counts a call in the window; for a failure, returns the window's calls and failures.
    fn count(&self, now: Instant, failed: bool) -> (u64, u64) {
        let length = u64::try_from((self.policy.window / BUCKETS as u32).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let index = self.nanos(now) / length;
        let bucket = &self.buckets[(index % BUCKETS as u64) as usize];
        let seen = bucket.index.load(Ordering::Acquire);
        if seen != index
            && bucket
                .index
                .compare_exchange(seen, index, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // A count racing this reset may be lost: the window is an estimate.
            bucket.calls.store(0, Ordering::Relaxed);
            bucket.failures.store(0, Ordering::Relaxed);
        }
        bucket.calls.fetch_add(1, Ordering::Relaxed);
        if !failed {
            return (0, 0);
        }
        bucket.failures.fetch_add(1, Ordering::Relaxed);
        let (mut calls, mut failures) = (0, 0);
        for bucket in &self.buckets {
            let at = bucket.index.load(Ordering::Acquire);
            if at <= index && index - at < BUCKETS as u64 {
                calls += u64::from(bucket.calls.load(Ordering::Relaxed));
                failures += u64::from(bucket.failures.load(Ordering::Relaxed));
            }
        }
        (calls, failures)
    }

    fn last_error(&self) -> String {
        self.last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    pub fn status(&self) -> StoreHealth {
        if self.down.load(Ordering::Acquire) {
            StoreHealth::Down {
                error: self.last_error(),
            }
        } else {
            StoreHealth::Up
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A breaker and the instant it started; `at(t)` is `t` milliseconds later.
    fn breaker(policy: BreakerPolicy) -> (Health, impl Fn(u64) -> Instant) {
        let t0 = Instant::now();
        (Health::starting_at(policy, t0), move |t| t0 + ms(t))
    }

    fn is_open(health: &Health) -> bool {
        matches!(health.status(), StoreHealth::Down { .. })
    }

    #[test]
    fn a_failed_connection_opens_it_at_once_and_a_success_closes_it() {
        let (health, at) = breaker(BreakerPolicy::default());
        assert!(health.check_at(at(0)).is_ok());
        health.failed_at(Failure::Connection, "connection refused", at(1));
        assert_eq!(
            health.check_at(at(2)),
            Err("connection refused".to_string())
        );
        assert_eq!(
            health.status(),
            StoreHealth::Down {
                error: "connection refused".into()
            }
        );
        health.succeeded_at(at(3));
        assert!(health.check_at(at(3)).is_ok());
        assert_eq!(health.status(), StoreHealth::Up);
    }

    #[test]
    fn one_slow_call_among_answers_leaves_it_closed() {
        let (health, at) = breaker(BreakerPolicy::default());
        for t in 0..100 {
            if t % 10 == 0 {
                health.failed_at(Failure::Call, "timed out", at(t * 10));
            } else {
                health.succeeded_at(at(t * 10));
            }
            assert!(health.check_at(at(t * 10)).is_ok(), "call {t}");
        }
        assert_eq!(health.status(), StoreHealth::Up);
    }

    #[test]
    fn failures_in_a_row_open_it() {
        let (health, at) = breaker(BreakerPolicy::default());
        for t in 0..4 {
            health.failed_at(Failure::Call, "timed out", at(t));
        }
        health.succeeded_at(at(4));
        for t in 5..9 {
            health.failed_at(Failure::Call, "timed out", at(t));
        }
        assert!(health.check_at(at(9)).is_ok(), "four in a row do not");
        health.failed_at(Failure::Call, "timed out", at(9));
        assert!(is_open(&health), "the fifth does");
        assert!(health.check_at(at(10)).is_err());
    }

    #[test]
    fn a_failure_share_over_the_window_opens_it() {
        let (health, at) = breaker(BreakerPolicy::default());
        // Every other call fails, never two in a row: half of the window's calls.
        for t in 0..18 {
            if t % 2 == 0 {
                health.succeeded_at(at(t * 10));
            } else {
                health.failed_at(Failure::Call, "BUSY", at(t * 10));
            }
        }
        assert!(!is_open(&health), "18 calls are too few to judge");
        health.succeeded_at(at(180));
        health.failed_at(Failure::Call, "BUSY", at(190));
        assert!(is_open(&health), "10 of 20 calls within a second failed");
    }

    #[test]
    fn failures_leave_the_window_as_it_slides() {
        let (health, at) = breaker(BreakerPolicy::default());
        // 8 of 10 calls fail, at most four in a row: too few calls to judge.
        for t in 0..10 {
            if t % 5 == 4 {
                health.succeeded_at(at(t));
            } else {
                health.failed_at(Failure::Call, "timed out", at(t));
            }
        }
        assert!(!is_open(&health));
        // More than a second later 5 of 15 fail; with the first ten, 13 of 25 would have.
        for t in 0..15 {
            if t % 3 == 0 {
                health.failed_at(Failure::Call, "timed out", at(1_200 + t));
            } else {
                health.succeeded_at(at(1_200 + t));
            }
        }
        assert!(!is_open(&health));
    }

    #[test]
    fn lets_one_call_probe_after_the_cooldown() {
        let (health, at) = breaker(BreakerPolicy::default());
        health.failed_at(Failure::Connection, "connection reset", at(0));
        assert!(health.check_at(at(99)).is_err(), "cooling down");
        assert!(health.check_at(at(100)).is_ok(), "the probe may try");
        assert!(
            health.check_at(at(100)).is_err(),
            "the others still fail fast"
        );
        assert!(
            health.check_at(at(599)).is_err(),
            "while the probe may still answer"
        );
        assert!(is_open(&health), "still down until a success");
        // The probe failed: another cool-down, then another probe.
        health.failed_at(Failure::Call, "timed out", at(300));
        assert!(health.check_at(at(399)).is_err());
        assert!(health.check_at(at(400)).is_ok());
        health.succeeded_at(at(401));
        assert!(health.check_at(at(401)).is_ok());
        assert_eq!(health.status(), StoreHealth::Up);
        // Closing forgot the outage's failures: one more is one slow call.
        health.failed_at(Failure::Call, "timed out", at(402));
        assert!(health.check_at(at(403)).is_ok());
    }

    #[test]
    fn a_probe_that_never_reports_is_replaced() {
        let (health, at) = breaker(BreakerPolicy::default());
        health.failed_at(Failure::Connection, "connection refused", at(0));
        assert!(
            health.check_at(at(100)).is_ok(),
            "a probe goes, and is never heard of"
        );
        assert!(health.check_at(at(599)).is_err());
        assert!(health.check_at(at(600)).is_ok(), "another one may");
    }

    #[test]
    fn opening_on_any_failure_is_one_setting_away() {
        let policy = BreakerPolicy {
            consecutive_failures: 1,
            ..BreakerPolicy::default()
        };
        let (health, at) = breaker(policy);
        health.failed_at(Failure::Call, "timed out", at(0));
        assert!(health.check_at(at(1)).is_err());
    }
}
