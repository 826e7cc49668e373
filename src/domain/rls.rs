//! Rate limits for Envoy's rate limit service (RLS v3): which configured rule a request's
//! descriptor falls under, and the sliding-window check that admits or refuses a request.
//!
//! A rule names a domain and the descriptor entries it matches, each by key and either an exact
//! value or any value; the counter is per rule and per the entries' actual values (so a rule on
//! `remote_address` with any value limits each address separately). A descriptor matches the
//! first rule, in config order, with the same domain and the same keys in the same order whose
//! fixed values agree. A rule either has a limit per unit, counted on the same sliding windows
//! as the plan windows (usage never leaves a window early, so "100 per minute" holds for every
//! 60 seconds, not per calendar minute), or points at the plan windows of the account named by
//! the `account_id` entry, so that a mesh can stop an exhausted user at the edge.
//!
//! All counted descriptors of one request are checked together and counted only if every one
//! of them is under its limit: a refused request consumes nothing.

use serde::{Deserialize, Serialize};

use super::time::{DAY_MS, HOUR_MS, MINUTE_MS, SECOND_MS, Timestamp};
use super::window::{SlidingWindow, WindowSpec};

/// Envoy's `RateLimitResponse.RateLimit.Unit`, with quotad's lengths for the calendar ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RlsUnit {
    Second,
    Minute,
    Hour,
    Day,
    /// 7 days.
    Week,
    /// 30 days.
    Month,
    /// 365 days.
    Year,
}

impl RlsUnit {
    pub fn length_ms(self) -> i64 {
        match self {
            RlsUnit::Second => SECOND_MS,
            RlsUnit::Minute => MINUTE_MS,
            RlsUnit::Hour => HOUR_MS,
            RlsUnit::Day => DAY_MS,
            RlsUnit::Week => 7 * DAY_MS,
            RlsUnit::Month => 30 * DAY_MS,
            RlsUnit::Year => 365 * DAY_MS,
        }
    }

    /// The sliding window of this unit: 60 buckets, so a count leaves at most 1/60 late.
    pub fn window(self) -> &'static WindowSpec {
        const fn spec(length_ms: i64) -> WindowSpec {
            WindowSpec {
                name: "rls",
                length_ms,
                bucket_ms: length_ms / 60,
            }
        }
        const SPECS: [WindowSpec; 7] = [
            spec(SECOND_MS),
            spec(MINUTE_MS),
            spec(HOUR_MS),
            spec(DAY_MS),
            spec(7 * DAY_MS),
            spec(30 * DAY_MS),
            spec(365 * DAY_MS),
        ];
        &SPECS[self as usize]
    }
}

/// One entry a rule matches: a key, and a value unless any value will do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryMatch {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// `[[rls.rules]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlsRule {
    pub domain: String,
    pub entries: Vec<EntryMatch>,
    /// Requests per unit; unset for a rule on an account's plan windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_unit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<RlsUnit>,
    /// The limit is the plan windows of the account in the `account_id` entry.
    #[serde(default)]
    pub account_windows: bool,
    /// Shown as the limit's name in responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl RlsRule {
    pub fn validate(&self, at: &str) -> Result<(), String> {
        if self.domain.is_empty() {
            return Err(format!("{at}.domain must not be empty"));
        }
        if self.entries.is_empty() || self.entries.iter().any(|e| e.key.is_empty()) {
            return Err(format!(
                "{at}.entries must name at least one key, none empty"
            ));
        }
        match (self.account_windows, self.requests_per_unit, self.unit) {
            (true, None, None) => {
                if !self
                    .entries
                    .iter()
                    .any(|e| e.key == ACCOUNT_KEY && e.value.is_none())
                {
                    return Err(format!(
                        "{at}: account_windows needs an entry {{ key = \"{ACCOUNT_KEY}\" }} with any value"
                    ));
                }
                Ok(())
            }
            (false, Some(n), Some(_)) if n > 0 => Ok(()),
            (true, _, _) => Err(format!(
                "{at}: a rule on account_windows has no requests_per_unit or unit"
            )),
            _ => Err(format!(
                "{at}: requests_per_unit (at least 1) and unit (second, minute, hour, day, week, month, year) are required"
            )),
        }
    }

    fn matches(&self, domain: &str, entries: &[(String, String)]) -> bool {
        self.domain == domain
            && self.entries.len() == entries.len()
            && self.entries.iter().zip(entries).all(|(m, (key, value))| {
                m.key == *key && m.value.as_ref().is_none_or(|v| v == value)
            })
    }

    /// The label of the limit in responses.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let keys: Vec<&str> = self.entries.iter().map(|e| e.key.as_str()).collect();
            format!("{}:{}", self.domain, keys.join("."))
        })
    }
}

/// The descriptor key that names an account.
pub const ACCOUNT_KEY: &str = "account_id";

/// The default: domain `quotad`, one entry `account_id`, limited by that account's plan
/// windows. It works with no config at all.
pub fn default_rules() -> Vec<RlsRule> {
    vec![RlsRule {
        domain: "quotad".into(),
        entries: vec![EntryMatch {
            key: ACCOUNT_KEY.into(),
            value: None,
        }],
        requests_per_unit: None,
        unit: None,
        account_windows: true,
        name: Some("plan".into()),
    }]
}

/// What one descriptor is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'r> {
    /// A counted limit: the counter's key (unique per rule and entry values).
    Counter {
        rule: &'r RlsRule,
        key: String,
        limit: u64,
        unit: RlsUnit,
    },
    /// The plan windows of an account.
    Account {
        rule: &'r RlsRule,
        account_id: String,
    },
    /// No rule matches: not limited.
    Unlimited,
}

/// The target of a descriptor of `domain`, by the first matching rule.
pub fn target<'r>(rules: &'r [RlsRule], domain: &str, entries: &[(String, String)]) -> Target<'r> {
    let Some((index, rule)) = rules
        .iter()
        .enumerate()
        .find(|(_, r)| r.matches(domain, entries))
    else {
        return Target::Unlimited;
    };
    if rule.account_windows {
        let account_id = entries
            .iter()
            .find(|(k, _)| k == ACCOUNT_KEY)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        return Target::Account { rule, account_id };
    }
    // Rule index, then each value length-prefixed: distinct entries never share a counter.
    let mut key = index.to_string();
    for (_, value) in entries {
        key.push(':');
        key.push_str(&value.len().to_string());
        key.push(':');
        key.push_str(value);
    }
    Target::Counter {
        rule,
        key,
        limit: u64::from(rule.requests_per_unit.unwrap_or(0)),
        unit: rule.unit.unwrap_or(RlsUnit::Second),
    }
}

/// One counted descriptor of a request, as a store checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterCheck {
    pub key: String,
    pub unit: RlsUnit,
    pub limit: u64,
    pub hits: u64,
}

/// A counted descriptor's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterStatus {
    pub over: bool,
    /// What is left after this request (if admitted).
    pub remaining: u64,
    /// Over the limit: when enough has left the window to admit the request. Under it: when
    /// everything counted now has left the window (0 if nothing is counted).
    pub reset_in_ms: i64,
}

/// Which counter each check of a request counts on: `slots[i]` indexes the distinct counters,
/// numbered in order of first appearance, and `firsts[j]` is the first check naming counter `j`.
/// A request has a handful of descriptors, so a scan beats a map.
pub fn counter_slots(checks: &[CounterCheck]) -> (Vec<usize>, Vec<usize>) {
    let mut slots = Vec::with_capacity(checks.len());
    let mut firsts: Vec<usize> = Vec::with_capacity(checks.len());
    for (i, check) in checks.iter().enumerate() {
        let slot = match firsts.iter().position(|&f| checks[f].key == check.key) {
            Some(slot) => slot,
            None => {
                firsts.push(i);
                firsts.len() - 1
            }
        };
        slots.push(slot);
    }
    (slots, firsts)
}

/// Checks `checks` at `now` and, if all fit, counts them. `windows[slots[i]]` is the counter of
/// `checks[i]` (see [`counter_slots`]; a store makes a new one for a counter it has not seen),
/// so descriptors of one request that share a counter are added up. The memory store keeps the
/// counters in lock stripes, on Redis too (where the owner of the domain's partition counts).
pub fn check_and_count(
    now: Timestamp,
    checks: &[CounterCheck],
    slots: &[usize],
    windows: &mut [SlidingWindow],
) -> Vec<CounterStatus> {
    debug_assert_eq!(checks.len(), slots.len());
    // Per counter: what it holds now and the hits this request asks of it.
    let mut wanted: Vec<(u64, u64)> = windows
        .iter_mut()
        .map(|window| {
            window.advance(now);
            (u64::try_from(window.committed()).unwrap_or(0), 0)
        })
        .collect();
    for (check, &slot) in checks.iter().zip(slots) {
        wanted[slot].1 += check.hits;
    }
    let fits = |check: &CounterCheck, slot: usize| {
        let (counted, hits) = wanted[slot];
        counted + hits <= check.limit
    };
    let all_fit = checks.iter().zip(slots).all(|(c, &slot)| fits(c, slot));
    if all_fit {
        for (window, &(_, hits)) in windows.iter_mut().zip(&wanted) {
            window.add(now, i64::try_from(hits).unwrap_or(i64::MAX));
        }
    }
    checks
        .iter()
        .zip(slots)
        .map(|(check, &slot)| {
            let (counted, hits) = wanted[slot];
            let after = if all_fit { counted + hits } else { counted };
            let over = !fits(check, slot);
            let window = &windows[slot];
            let reset_at = if over {
                let target = i64::try_from(check.limit).unwrap_or(i64::MAX)
                    - i64::try_from(check.hits).unwrap_or(i64::MAX);
                window.committed_at_most_at(now, target)
            } else {
                Some(window.resets_at().unwrap_or(now))
            };
            let reset_in_ms = reset_at.map_or(check.unit.length_ms(), |at| {
                at.as_millis() - now.as_millis()
            });
            CounterStatus {
                over,
                remaining: check.limit.saturating_sub(after),
                reset_in_ms: reset_in_ms.max(0),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn rule(domain: &str, keys: &[(&str, Option<&str>)], limit: u32) -> RlsRule {
        RlsRule {
            domain: domain.into(),
            entries: keys
                .iter()
                .map(|(k, v)| EntryMatch {
                    key: k.to_string(),
                    value: v.map(Into::into),
                })
                .collect(),
            requests_per_unit: Some(limit),
            unit: Some(RlsUnit::Minute),
            account_windows: false,
            name: None,
        }
    }

    #[test]
    fn the_first_matching_rule_wins_and_values_make_their_own_counters() {
        let rules = vec![
            rule("edge", &[("path", Some("/login"))], 5),
            rule("edge", &[("path", None)], 100),
        ];
        let key = |path: &str| match target(&rules, "edge", &entries(&[("path", path)])) {
            Target::Counter { key, limit, .. } => (key, limit),
            other => panic!("{other:?}"),
        };
        assert_eq!(key("/login").1, 5);
        assert_eq!(key("/a").1, 100);
        assert_ne!(key("/a").0, key("/b").0);
        assert_eq!(
            target(&rules, "other", &entries(&[("path", "/a")])),
            Target::Unlimited
        );
        assert_eq!(
            target(&rules, "edge", &entries(&[("path", "/a"), ("x", "y")])),
            Target::Unlimited
        );
        let defaults = default_rules();
        let account = target(&defaults, "quotad", &entries(&[("account_id", "u1")]));
        assert!(matches!(account, Target::Account { account_id, .. } if account_id == "u1"));
    }

    #[test]
    fn a_request_counts_only_if_every_descriptor_fits() {
        let checks = [
            CounterCheck {
                key: "a".into(),
                unit: RlsUnit::Minute,
                limit: 10,
                hits: 4,
            },
            CounterCheck {
                key: "b".into(),
                unit: RlsUnit::Minute,
                limit: 5,
                hits: 4,
            },
        ];
        let (slots, firsts) = counter_slots(&checks);
        assert_eq!(
            (slots.as_slice(), firsts.as_slice()),
            (&[0, 1][..], &[0, 1][..])
        );
        let mut windows: Vec<_> = firsts
            .iter()
            .map(|&f| SlidingWindow::new(checks[f].unit.window()))
            .collect();
        let t = Timestamp::from_millis(60_000);
        let mut check = |now| check_and_count(now, &checks, &slots, &mut windows);
        let first = check(t);
        assert!(first.iter().all(|s| !s.over));
        assert_eq!((first[0].remaining, first[1].remaining), (6, 1));
        let second = check(t);
        assert!(!second[0].over && second[1].over);
        assert_eq!(second[0].remaining, 6, "a refused request counts nowhere");
        // Sliding: 4 hits leave the minute window only after a full minute (plus a bucket).
        assert!(check(t.plus_millis(59_000))[1].over);
        assert!(!check(t.plus_millis(61_000))[1].over);
    }

    #[test]
    fn descriptors_on_one_counter_add_up() {
        let check = |hits| CounterCheck {
            key: "a".into(),
            unit: RlsUnit::Second,
            limit: 5,
            hits,
        };
        let checks = [check(2), check(3)];
        let (slots, firsts) = counter_slots(&checks);
        assert_eq!(
            (slots.as_slice(), firsts.as_slice()),
            (&[0, 0][..], &[0][..])
        );
        let mut windows = vec![SlidingWindow::new(RlsUnit::Second.window())];
        let t = Timestamp::from_millis(1_000);
        let first = check_and_count(t, &checks, &slots, &mut windows);
        assert!(first.iter().all(|s| !s.over && s.remaining == 0));
        assert_eq!(windows[0].committed(), 5);
        let second = check_and_count(t, &checks, &slots, &mut windows);
        assert!(second.iter().all(|s| s.over));
        assert_eq!(
            windows[0].committed(),
            5,
            "a refused request counts nowhere"
        );
    }
}
