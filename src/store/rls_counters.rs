//! The memory store's Envoy RLS counters: a sliding window per domain and counter key, kept in
//! lock stripes.
//!
//! A request's descriptors are checked and counted as one atomic step, so the step holds the
//! lock of every counter the request names. One lock for all counters, or one per domain, would
//! put every RLS call of the process in one queue (a mesh's edge keeps all its counters in one
//! domain); with stripes, calls on different counters run on different cores. A request whose
//! counters sit in several stripes locks them in ascending order, so two requests never wait on
//! each other in a cycle.
//!
//! Forgetting counters whose counts have all left their windows takes one stripe at a time, so
//! the once-a-second prune holds up a stripe's share of calls at most, never all of them.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::domain::Timestamp;
use crate::domain::rls::{self, CounterCheck, CounterStatus};
use crate::domain::window::SlidingWindow;

/// Enough that the cores of a large node seldom meet on one stripe; a power of two.
const STRIPES: usize = 64;

/// Counters by domain, then by counter key: two levels, so a lookup borrows both names instead
/// of building a combined key on every call.
type Stripe = HashMap<String, HashMap<String, SlidingWindow>>;

#[derive(Debug)]
pub(super) struct RlsCounters {
    hasher: RandomState,
    stripes: Box<[Mutex<Stripe>]>,
}

impl Default for RlsCounters {
    fn default() -> Self {
        RlsCounters {
            hasher: RandomState::new(),
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
        }
    }
}

/// A panic inside a step would leave at most that request's counters uncounted; refusing every
/// later call on the stripe would be worse.
fn lock(stripe: &Mutex<Stripe>) -> MutexGuard<'_, Stripe> {
    stripe.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RlsCounters {
    fn stripe_of(&self, domain: &str, key: &str) -> usize {
        (self.hasher.hash_one((domain, key)) as usize) & (STRIPES - 1)
    }

    /// Checks and counts one request's `checks` of `domain` (see [`rls::check_and_count`]).
    pub fn check_and_count(
        &self,
        domain: &str,
        checks: &[CounterCheck],
        now: Timestamp,
    ) -> Vec<CounterStatus> {
        match checks.first() {
            None => return Vec::new(),
            Some(first) if checks.iter().all(|c| c.key == first.key) => {
                return self.check_one_counter(domain, checks, now);
            }
            Some(_) => {}
        }
        let (slots, firsts) = rls::counter_slots(checks);
        let homes: Vec<usize> = firsts
            .iter()
            .map(|&f| self.stripe_of(domain, &checks[f].key))
            .collect();
        let mut order = homes.clone();
        order.sort_unstable();
        order.dedup();
        // In ascending order: see the module's note.
        let mut guards: Vec<MutexGuard<'_, Stripe>> =
            order.iter().map(|&s| lock(&self.stripes[s])).collect();
        let guard = |home: usize| {
            order
                .binary_search(&home)
                .expect("every counter's stripe is among the locked ones")
        };

        // Each counter leaves its map for the step (the step needs them side by side) and goes
        // back only if it still counts something.
        let mut keys: Vec<Option<String>> = Vec::with_capacity(firsts.len());
        let mut windows: Vec<SlidingWindow> = Vec::with_capacity(firsts.len());
        for (&f, &home) in firsts.iter().zip(&homes) {
            let check = &checks[f];
            let found = guards[guard(home)]
                .get_mut(domain)
                .and_then(|counters| counters.remove_entry(check.key.as_str()));
            match found {
                Some((key, window)) => {
                    keys.push(Some(key));
                    windows.push(window);
                }
                None => {
                    keys.push(None);
                    windows.push(SlidingWindow::new(check.unit.window()));
                }
            }
        }
        let statuses = rls::check_and_count(now, checks, &slots, &mut windows);
        for (((window, key), &f), &home) in windows.into_iter().zip(keys).zip(&firsts).zip(&homes) {
            if window.committed() == 0 {
                continue;
            }
            let stripe = &mut guards[guard(home)];
            let counters = match stripe.get_mut(domain) {
                Some(counters) => counters,
                None => stripe.entry(domain.to_owned()).or_default(),
            };
            counters.insert(key.unwrap_or_else(|| checks[f].key.clone()), window);
        }
        statuses
    }

    /// The common request, one counter (named by one descriptor or several): counted in place
    /// under one stripe's lock.
    fn check_one_counter(
        &self,
        domain: &str,
        checks: &[CounterCheck],
        now: Timestamp,
    ) -> Vec<CounterStatus> {
        const SAME: [usize; 16] = [0; 16];
        let many;
        let slots = match SAME.get(..checks.len()) {
            Some(slots) => slots,
            None => {
                many = vec![0; checks.len()];
                &many
            }
        };
        let first = &checks[0];
        let mut stripe = lock(&self.stripes[self.stripe_of(domain, &first.key)]);
        let found = stripe
            .get_mut(domain)
            .and_then(|counters| counters.get_mut(first.key.as_str()));
        if let Some(window) = found {
            return rls::check_and_count(now, checks, slots, std::slice::from_mut(window));
        }
        let mut window = SlidingWindow::new(first.unit.window());
        let statuses = rls::check_and_count(now, checks, slots, std::slice::from_mut(&mut window));
        if window.committed() > 0 {
            let counters = match stripe.get_mut(domain) {
                Some(counters) => counters,
                None => stripe.entry(domain.to_owned()).or_default(),
            };
            counters.insert(first.key.clone(), window);
        }
        statuses
    }

    /// Forgets the counters whose counts have all left their windows at `now`.
    pub fn prune(&self, now: Timestamp) {
        for stripe in self.stripes.iter() {
            let mut stripe = lock(stripe);
            stripe.retain(|_, counters| {
                counters.retain(|_, window| {
                    window.advance(now);
                    window.committed() > 0
                });
                !counters.is_empty()
            });
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| lock(s).values().map(HashMap::len).sum::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::domain::rls::RlsUnit;

    fn check(key: &str, limit: u64, hits: u64) -> CounterCheck {
        CounterCheck {
            key: key.into(),
            unit: RlsUnit::Minute,
            limit,
            hits,
        }
    }

    #[test]
    fn counters_are_kept_per_domain_and_key_and_forgotten_once_empty() {
        let counters = RlsCounters::default();
        let t = Timestamp::from_millis(0);
        let ok = |domain, key, hits| {
            !counters.check_and_count(domain, &[check(key, 3, hits)], t)[0].over
        };
        assert!(ok("a", "k", 3));
        assert!(!ok("a", "k", 1), "the counter is full");
        assert!(ok("b", "k", 3), "another domain has its own counter");
        assert!(!ok("a", "new", 4), "refused on a new key");
        assert_eq!(
            counters.len(),
            2,
            "a refused request on a new key leaves nothing behind"
        );
        counters.prune(t.plus_millis(59_000));
        assert_eq!(counters.len(), 2);
        counters.prune(t.plus_millis(2 * 60_000));
        assert_eq!(counters.len(), 0);
    }

    /// Requests that each name a shared counter and one of their own, from many threads: the
    /// shared counter admits exactly its limit, and no request is counted on one counter and
    /// not the other (each admitted request leaves one hit on its own counter).
    #[test]
    fn a_request_over_several_stripes_is_one_step() {
        let counters = Arc::new(RlsCounters::default());
        let t = Timestamp::from_millis(0);
        let limit = 500;
        let threads: Vec<_> = (0..8)
            .map(|thread| {
                let counters = counters.clone();
                std::thread::spawn(move || {
                    let mut admitted = 0;
                    for i in 0..400 {
                        // Own counters first in half the requests, so stripes are named in
                        // both orders.
                        let own = check(&format!("own-{thread}-{}", i % 37), u64::MAX, 1);
                        let shared = check("shared", limit, 1);
                        let checks = if i % 2 == 0 {
                            [own, shared]
                        } else {
                            [shared, own]
                        };
                        let statuses = counters.check_and_count("edge", &checks, t);
                        if statuses.iter().all(|s| !s.over) {
                            admitted += 1;
                        }
                    }
                    admitted
                })
            })
            .collect();
        let admitted: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(admitted, limit);
        let own_hits: u64 = (0..8)
            .flat_map(|thread| (0..37).map(move |i| format!("own-{thread}-{i}")))
            .map(|key| {
                let status = counters.check_and_count("edge", &[check(&key, 1_000, 0)], t);
                1_000 - status[0].remaining
            })
            .sum();
        assert_eq!(own_hits, limit);
    }
}
