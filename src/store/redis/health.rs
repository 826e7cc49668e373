//! Whether Redis is reachable, as this replica last saw it, and the circuit breaker that turns an
//! outage into fast failures: once a call could not reach Redis, calls fail at once for a short
//! cool-down instead of each waiting out its timeout and queueing behind the others. After the
//! cool-down exactly one call (the probe) tries again while the others keep failing fast; its
//! success closes the breaker, its failure starts another cool-down.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::store::StoreHealth;

#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Nanoseconds after `started` until which calls fail without trying; 0 when closed.
    open_until: AtomicU64,
    down: AtomicBool,
    last_error: Mutex<String>,
    cooldown: Duration,
}

impl Health {
    pub fn new(cooldown: Duration) -> Health {
        Health {
            started: Instant::now(),
            open_until: AtomicU64::new(0),
            down: AtomicBool::new(false),
            last_error: Mutex::new(String::new()),
            cooldown,
        }
    }

    fn elapsed(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// `Err(last error)` while the breaker is open; `Ok` when closed, or for the one call
    /// that probes once the cool-down is over.
    pub fn check(&self) -> Result<(), String> {
        let open_until = self.open_until.load(Ordering::Acquire);
        if open_until == 0 {
            return Ok(());
        }
        let now = self.elapsed();
        if now >= open_until {
            // Claim the probe: whoever moves the deadline goes; everyone else waits it out.
            let next = now + u64::try_from(self.cooldown.as_nanos()).unwrap_or(u64::MAX);
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
        Err(self
            .last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default())
    }

    pub fn succeeded(&self) {
        self.open_until.store(0, Ordering::Release);
        if self.down.swap(false, Ordering::AcqRel) {
            tracing::info!("Redis is reachable again");
        }
    }

    pub fn failed(&self, error: &str) {
        if let Ok(mut last) = self.last_error.lock() {
            error.clone_into(&mut last);
        }
        let until = self.elapsed() + u64::try_from(self.cooldown.as_nanos()).unwrap_or(u64::MAX);
        self.open_until.store(until, Ordering::Release);
        if !self.down.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                error,
                "Redis is unreachable: calls fail fast with UNAVAILABLE until it answers again"
            );
        }
    }

    pub fn status(&self) -> StoreHealth {
        if self.down.load(Ordering::Acquire) {
            StoreHealth::Down {
                error: self
                    .last_error
                    .lock()
                    .map(|e| e.clone())
                    .unwrap_or_default(),
            }
        } else {
            StoreHealth::Up
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_on_failure_and_closes_on_success() {
        let health = Health::new(Duration::from_secs(60));
        assert!(health.check().is_ok());
        health.failed("connection refused");
        assert_eq!(health.check(), Err("connection refused".to_string()));
        assert_eq!(
            health.status(),
            StoreHealth::Down {
                error: "connection refused".into()
            }
        );
        health.succeeded();
        assert!(health.check().is_ok());
        assert_eq!(health.status(), StoreHealth::Up);
    }

    #[test]
    fn lets_one_call_probe_after_the_cooldown() {
        let health = Health::new(Duration::from_millis(50));
        health.failed("timeout");
        assert!(health.check().is_err());
        std::thread::sleep(Duration::from_millis(60));
        assert!(health.check().is_ok(), "the probe may try");
        assert!(health.check().is_err(), "the others still fail fast");
        assert!(
            matches!(health.status(), StoreHealth::Down { .. }),
            "still down until a success"
        );
        health.succeeded();
        assert!(health.check().is_ok());
    }
}
