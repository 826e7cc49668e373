//! The Redis store's operations as one Redis function library (Redis 7 `FUNCTION LOAD`, run
//! with `FCALL`), built from the Lua sources in `lua/`.
//!
//! Why functions rather than `EVALSHA` scripts: a script runs its whole text on every call, so
//! each call re-made the prelude's sixty-odd helper closures and decoded the policy JSON again;
//! together that was about a sixth of the Redis time of a decision. A library runs its text
//! once, at load; each call only runs its own function, which starts with `begin()` (the end of
//! the prelude) to take its keys and arguments.
//!
//! The library's name and its functions' names carry a digest of the library's text, so
//! replicas of two quotad versions (during a rolling upgrade) never call each other's code: each
//! loads its own library beside the other's. A Redis that lost its functions (restarted without
//! persistence, a new Cluster node) gets the library again on the first `Function not found`.

use redis::Script;

/// The account operations, each the shared prelude's rules applied by one function.
#[derive(Debug, Clone, Copy)]
pub enum Operation {
    Reserve,
    Commit,
    Release,
    Grant,
    Upsert,
    Account,
    Usage,
    Sweep,
    Revoke,
    SetTopUp,
    SettleTopUp,
    /// Not an account operation: Envoy RLS counters of one domain (no prelude).
    Rls,
}

impl Operation {
    const ALL: [Operation; 12] = [
        Operation::Reserve,
        Operation::Commit,
        Operation::Release,
        Operation::Grant,
        Operation::Upsert,
        Operation::Account,
        Operation::Usage,
        Operation::Sweep,
        Operation::Revoke,
        Operation::SetTopUp,
        Operation::SettleTopUp,
        Operation::Rls,
    ];

    fn name(self) -> &'static str {
        match self {
            Operation::Reserve => "reserve",
            Operation::Commit => "commit",
            Operation::Release => "release",
            Operation::Grant => "grant",
            Operation::Upsert => "upsert",
            Operation::Account => "account",
            Operation::Usage => "usage",
            Operation::Sweep => "sweep",
            Operation::Revoke => "revoke",
            Operation::SetTopUp => "set_top_up",
            Operation::SettleTopUp => "settle_top_up",
            Operation::Rls => "rls",
        }
    }

    /// Whether running the call twice with the same arguments acts as running it once, so that
    /// an attempt that timed out (and may yet run in Redis) may be sent again. The retry runs
    /// at the same `now` as the first attempt, queued behind it on the same connection, and
    /// finds what the first did:
    /// - Reserve: the first answer is recorded by request id; the retry replays it.
    /// - Commit: final, recorded by reservation id and replayed; partial, the usage is
    ///   cumulative, so the retry charges the difference to what is charged already (none),
    ///   renews the same hold to the same expiry, and records no second usage event.
    /// - Release, Revoke: recorded by reservation and grant id; Grant: by grant id.
    /// - SetTopUp and Upsert set values; a purchase starts only while none is in flight (the
    ///   one the first attempt started is), and a purchase's settlement acts only while that
    ///   purchase is in flight (SettleTopUp).
    /// - Account and Usage read; Sweep settles what time has done, which settling again finds
    ///   done.
    ///
    /// A retry's answer tells of the state the first attempt left: a partial Commit's says
    /// `charged` 0 (the total is right), and an answer never names a purchase the first attempt
    /// started (the stalled-purchase sweep pays it after `payments.resume_after_ms`), as for a
    /// client retrying a call whose answer it lost.
    ///
    /// RLS is not: each run counts its hits.
    pub fn retry_safe(self) -> bool {
        !matches!(self, Operation::Rls)
    }

    fn body(self) -> &'static str {
        match self {
            Operation::Reserve => include_str!("lua/reserve.lua"),
            Operation::Commit => include_str!("lua/commit.lua"),
            Operation::Release => include_str!("lua/release.lua"),
            Operation::Grant => include_str!("lua/grant.lua"),
            Operation::Upsert => include_str!("lua/upsert.lua"),
            Operation::Account => include_str!("lua/account.lua"),
            Operation::Usage => include_str!("lua/usage.lua"),
            Operation::Sweep => include_str!("lua/sweep.lua"),
            Operation::Revoke => include_str!("lua/revoke.lua"),
            Operation::SetTopUp => include_str!("lua/set_top_up.lua"),
            Operation::SettleTopUp => include_str!("lua/settle_top_up.lua"),
            Operation::Rls => include_str!("lua/rls.lua"),
        }
    }
}

/// The library's text and the names to call its functions by.
#[derive(Debug)]
pub struct Library {
    source: String,
    /// `quotad_DIGEST_OP` runs operation OP (the library is `quotad_DIGEST`), in the order of
    /// [`Operation::ALL`].
    functions: Vec<String>,
}

const PRELUDE: &str = include_str!("lua/prelude.lua");

/// Replaced by the library's name in its text.
const NAME_MARK: &str = "@LIBRARY@";

impl Library {
    pub fn new() -> Library {
        let mut text = format!("#!lua name={NAME_MARK}\n{PRELUDE}\n");
        for op in Operation::ALL {
            // The body sees the call's KEYS and ARGV as parameters, as a script would.
            let begin = if matches!(op, Operation::Rls) {
                "init()\n"
            } else {
                "begin(KEYS, ARGV)\n"
            };
            text.push_str(&format!(
                "redis.register_function('{NAME_MARK}_{}', function(KEYS, ARGV)\n{begin}{}\nend)\n",
                op.name(),
                op.body()
            ));
        }
        // The SHA-1 of the text, as redis-rs computes it for scripts.
        let digest = Script::new(&text).get_hash()[..16].to_owned();
        let name = format!("quotad_{digest}");
        Library {
            source: text.replace(NAME_MARK, &name),
            functions: Operation::ALL
                .iter()
                .map(|op| format!("{name}_{}", op.name()))
                .collect(),
        }
    }

    /// The text to `FUNCTION LOAD`.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The name to `FCALL` for an operation.
    pub fn function(&self, op: Operation) -> &str {
        &self.functions[op as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_is_registered_under_a_name_that_follows_the_text() {
        let library = Library::new();
        assert!(library.source().starts_with("#!lua name=quotad_"));
        for op in Operation::ALL {
            let function = library.function(op);
            assert!(
                library
                    .source()
                    .contains(&format!("redis.register_function('{function}',")),
                "{function}"
            );
        }
        assert!(!library.source().contains(NAME_MARK));
        assert_eq!(
            Library::new().function(Operation::Reserve),
            library.function(Operation::Reserve)
        );
    }
}
