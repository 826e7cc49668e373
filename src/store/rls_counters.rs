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
//! On Redis the counters are owned like accounts: a domain's counters fall in one
//! partition, its owner decides on them here, and each counter it changes is written behind (see
//! `MemoryStore::rls_check`). Each counter then carries the epoch of its partition it was read
//! under, and a step never runs on a counter it has not read under its own epoch: it answers
//! which counters to read from Redis first ([`Counted::Missing`]). Memory-only counters carry
//! no epoch, and a counter not seen yet starts empty.
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

/// A counter's window and the epoch of its partition it was read under (0: memory only).
#[derive(Debug)]
struct Counter {
    window: SlidingWindow,
    epoch: u64,
}

/// Counters by domain, then by counter key: two levels, so a lookup borrows both names instead
/// of building a combined key on every call.
type Stripe = HashMap<String, HashMap<String, Counter>>;

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

/// A domain's counters in a stripe, made on first use (looked up by borrowing the name first:
/// the domain exists nearly always).
fn domain_counters<'s>(stripe: &'s mut Stripe, domain: &str) -> &'s mut HashMap<String, Counter> {
    if !stripe.contains_key(domain) {
        stripe.insert(domain.to_owned(), HashMap::new());
    }
    stripe.get_mut(domain).expect("inserted above")
}

/// A panic inside a step would leave at most that request's counters uncounted; refusing every
/// later call on the stripe would be worse.
fn lock(stripe: &Mutex<Stripe>) -> MutexGuard<'_, Stripe> {
    stripe.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a step under an epoch did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Counted {
    /// Checked (and counted if all fit): the answers, and the counters the request changed
    /// with their windows now (to write behind).
    Done(Vec<CounterStatus>, Vec<(String, SlidingWindow)>),
    /// Not read under this epoch (never, or under an older one): read these, install them,
    /// and step again. Nothing changed.
    Missing(Vec<String>),
    /// A counter was read under a newer epoch: the partition moved while this call waited.
    /// Nothing changed.
    Stale,
}

impl RlsCounters {
    fn stripe_of(&self, domain: &str, key: &str) -> usize {
        (self.hasher.hash_one((domain, key)) as usize) & (STRIPES - 1)
    }

    /// Checks and counts one request's `checks` of `domain` (see [`rls::check_and_count`]),
    /// memory only.
    pub fn check_and_count(
        &self,
        domain: &str,
        checks: &[CounterCheck],
        now: Timestamp,
    ) -> Vec<CounterStatus> {
        match self.step(domain, checks, now, None) {
            Counted::Done(statuses, _) => statuses,
            Counted::Missing(_) | Counted::Stale => {
                unreachable!("memory-only counters need no reading")
            }
        }
    }

    /// Checks and counts one request's `checks` of `domain` under `epoch` of its partition.
    pub fn check_and_count_under(
        &self,
        domain: &str,
        checks: &[CounterCheck],
        now: Timestamp,
        epoch: u64,
    ) -> Counted {
        self.step(domain, checks, now, Some(epoch))
    }

    /// Puts counters read from the backing under `epoch` in memory, unless one was read under
    /// that epoch meanwhile (it may have counted since).
    pub fn install(&self, domain: &str, read: Vec<(String, SlidingWindow)>, epoch: u64) {
        for (key, window) in read {
            let mut stripe = lock(&self.stripes[self.stripe_of(domain, &key)]);
            let counters = domain_counters(&mut stripe, domain);
            match counters.get_mut(key.as_str()) {
                Some(counter) if counter.epoch >= epoch => {}
                Some(counter) => *counter = Counter { window, epoch },
                None => {
                    counters.insert(key, Counter { window, epoch });
                }
            }
        }
    }

    /// One step. With an epoch, every counter must be in memory under it.
    fn step(
        &self,
        domain: &str,
        checks: &[CounterCheck],
        now: Timestamp,
        epoch: Option<u64>,
    ) -> Counted {
        let Some(first) = checks.first() else {
            return Counted::Done(Vec::new(), Vec::new());
        };
        if checks.iter().all(|c| c.key == first.key) {
            return self.step_one_counter(domain, checks, now, epoch);
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
        if let Some(epoch) = epoch {
            let mut missing = Vec::new();
            for (&f, &home) in firsts.iter().zip(&homes) {
                let key = &checks[f].key;
                let held = guards[guard(home)]
                    .get(domain)
                    .and_then(|counters| counters.get(key.as_str()))
                    .map(|c| c.epoch);
                match held {
                    Some(e) if e == epoch => {}
                    Some(e) if e > epoch => return Counted::Stale,
                    _ => missing.push(key.clone()),
                }
            }
            if !missing.is_empty() {
                return Counted::Missing(missing);
            }
        }

        // Each counter leaves its map for the step (the step needs them side by side) and goes
        // back only if it still counts something, or was read from the backing.
        let mut keys: Vec<Option<String>> = Vec::with_capacity(firsts.len());
        let mut windows: Vec<SlidingWindow> = Vec::with_capacity(firsts.len());
        for (&f, &home) in firsts.iter().zip(&homes) {
            let check = &checks[f];
            let found = guards[guard(home)]
                .get_mut(domain)
                .and_then(|counters| counters.remove_entry(check.key.as_str()));
            match found {
                Some((key, counter)) => {
                    keys.push(Some(key));
                    windows.push(counter.window);
                }
                None => {
                    keys.push(None);
                    windows.push(SlidingWindow::new(check.unit.window()));
                }
            }
        }
        let statuses = rls::check_and_count(now, checks, &slots, &mut windows);
        let changed = epoch.is_some() && counted(checks, &statuses);
        let mut written = Vec::new();
        for (((window, key), &f), &home) in windows.into_iter().zip(keys).zip(&firsts).zip(&homes) {
            if window.committed() == 0 && epoch.is_none() {
                continue;
            }
            let key = key.unwrap_or_else(|| checks[f].key.clone());
            if changed {
                written.push((key.clone(), window.clone()));
            }
            let stripe = &mut guards[guard(home)];
            let counters = domain_counters(&mut *stripe, domain);
            let epoch = epoch.unwrap_or(0);
            counters.insert(key, Counter { window, epoch });
        }
        Counted::Done(statuses, written)
    }

    /// The common request, one counter (named by one descriptor or several): counted in place
    /// under one stripe's lock.
    fn step_one_counter(
        &self,
        domain: &str,
        checks: &[CounterCheck],
        now: Timestamp,
        epoch: Option<u64>,
    ) -> Counted {
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
        match (found, epoch) {
            (Some(counter), None) => {
                let window = std::slice::from_mut(&mut counter.window);
                Counted::Done(rls::check_and_count(now, checks, slots, window), Vec::new())
            }
            (Some(counter), Some(epoch)) if counter.epoch == epoch => {
                let window = std::slice::from_mut(&mut counter.window);
                let statuses = rls::check_and_count(now, checks, slots, window);
                let written = if counted(checks, &statuses) {
                    vec![(first.key.clone(), counter.window.clone())]
                } else {
                    Vec::new()
                };
                Counted::Done(statuses, written)
            }
            (Some(counter), Some(epoch)) if counter.epoch > epoch => Counted::Stale,
            (_, Some(_)) => Counted::Missing(vec![first.key.clone()]),
            (None, None) => {
                let mut window = SlidingWindow::new(first.unit.window());
                let statuses =
                    rls::check_and_count(now, checks, slots, std::slice::from_mut(&mut window));
                if window.committed() > 0 {
                    let counters = domain_counters(&mut stripe, domain);
                    counters.insert(first.key.clone(), Counter { window, epoch: 0 });
                }
                Counted::Done(statuses, Vec::new())
            }
        }
    }

    /// Forgets the counters whose counts have all left their windows at `now`.
    pub fn prune(&self, now: Timestamp) {
        self.retain(|_, counter| {
            counter.window.advance(now);
            counter.window.committed() > 0
        });
    }

    /// Forgets the counters of the domains `gone` names (their partition left this replica).
    pub fn forget(&self, gone: impl Fn(&str) -> bool) {
        self.retain(|domain, _| !gone(domain));
    }

    fn retain(&self, mut keep: impl FnMut(&str, &mut Counter) -> bool) {
        for stripe in self.stripes.iter() {
            let mut stripe = lock(stripe);
            stripe.retain(|domain, counters| {
                counters.retain(|_, counter| keep(domain, counter));
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

/// Whether the step counted the request's hits (it does only when every descriptor fits, and
/// changes a counter only if it asked for hits).
fn counted(checks: &[CounterCheck], statuses: &[CounterStatus]) -> bool {
    statuses.iter().all(|s| !s.over) && checks.iter().any(|c| c.hits > 0)
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

    /// Under an epoch a counter is counted only once read under it: a newer epoch reads it
    /// again, an older one is refused, and what a step changed comes back to be written.
    #[test]
    fn owned_counters_are_read_under_their_epoch_before_they_count() {
        let counters = RlsCounters::default();
        let t = Timestamp::from_millis(0);
        let request = [check("k", 5, 2), check("other", 5, 1)];
        assert_eq!(
            counters.check_and_count_under("a", &request, t, 7),
            Counted::Missing(vec!["k".into(), "other".into()])
        );
        let mut read = SlidingWindow::new(RlsUnit::Minute.window());
        read.add(t, 2);
        let fresh = SlidingWindow::new(RlsUnit::Minute.window());
        counters.install("a", vec![("k".into(), read), ("other".into(), fresh)], 7);
        let Counted::Done(statuses, written) = counters.check_and_count_under("a", &request, t, 7)
        else {
            panic!("both counters were read");
        };
        assert_eq!(statuses[0].remaining, 1, "2 read + 2 counted of 5");
        let totals: Vec<(String, i64)> = written
            .iter()
            .map(|(k, w)| (k.clone(), w.committed()))
            .collect();
        assert_eq!(totals, [("k".into(), 4), ("other".into(), 1)]);
        // Over the limit: nothing changes, nothing to write.
        let Counted::Done(statuses, written) =
            counters.check_and_count_under("a", &[check("k", 5, 2)], t, 7)
        else {
            panic!("read under this epoch");
        };
        assert!(statuses[0].over && written.is_empty());
        assert_eq!(
            counters.check_and_count_under("a", &[check("k", 5, 1)], t, 8),
            Counted::Missing(vec!["k".into()]),
            "a newer epoch reads again"
        );
        assert_eq!(
            counters.check_and_count_under("a", &[check("k", 5, 1)], t, 6),
            Counted::Stale
        );
        counters.forget(|domain| domain == "a");
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
