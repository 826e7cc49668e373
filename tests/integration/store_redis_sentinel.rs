//! Redis behind Sentinel (`redis+sentinel://`), on a real master, replica and three sentinels
//! started by the test: the store contract, run unchanged through Sentinel; and failovers,
//! after which a store keeps deciding on the new master, with what it wrote before, without
//! being restarted.

use crate::support;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quotad::domain::{
    CommitCommand, CommitOutcome, Decision, Policy, ReserveCommand, Timestamp, Usage,
};
use quotad::rules::LiveRules;
use quotad::store::{MemoryStore, OwnedSettings, Store, StoreError};
use support::contract::store_contract_tests;
use support::redis::{RedisSentinel, SENTINEL_SERVICE, settings, store_with};

store_contract_tests!(support::redis::sentinel_store());

const NOW: Timestamp = Timestamp::from_millis(1_800_000_000_000);

/// How long calls may fail once the sentinels name the new master: the store looks at once
/// after a failed call and every second in any case.
const RESUME_WITHIN: Duration = Duration::from_secs(5);

fn reserve(request: &str) -> ReserveCommand {
    ReserveCommand {
        account_id: "acct".into(),
        request_id: request.into(),
        product: "codex".into(),
        estimate: Usage::default(),
        cost: 1_000_000,
        plan_hint: None,
        ttl_ms: 60_000,
        reservation_id: format!("rsv-{request}"),
        wait_for_top_up: false,
    }
}

/// Reserves and commits `cost` under `request`; returns the commit's outcome.
async fn spend(store: &impl Store, request: &str, cost: i64) -> Result<CommitOutcome, StoreError> {
    let allowed = store.reserve(&reserve(request), NOW).await?;
    let Decision::Allow { reservation_id, .. } = &allowed.decision else {
        panic!("denied: {allowed:?}");
    };
    let commit = CommitCommand {
        account_id: "acct".into(),
        reservation_id: reservation_id.to_string(),
        usage: Usage::default(),
        cost,
        is_final: true,
        price_version: "v".into(),
    };
    store.commit(commit, NOW).await
}

/// Retries `call` (safe to retry: a reserve and a commit act once by their ids) while it
/// answers UNAVAILABLE, for up to [`RESUME_WITHIN`]; returns its answer and how long it took.
async fn once_available<T, F: Future<Output = Result<T, StoreError>>>(
    mut call: impl FnMut() -> F,
) -> (T, Duration) {
    let started = Instant::now();
    loop {
        match call().await {
            Ok(answer) => return (answer, started.elapsed()),
            Err(StoreError::Unavailable(why)) if started.elapsed() < RESUME_WITHIN => {
                eprintln!("while the master moves: {why}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("still failing after {:?}: {e:?}", started.elapsed()),
        }
    }
}

fn windows(outcome: &CommitOutcome) -> Vec<i64> {
    outcome.status.windows.iter().map(|w| w.used).collect()
}

/// The master dies (SIGKILL); once the sentinels have promoted the replica, the store decides
/// again on it, from the state it had written before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_follows_a_failover_after_the_master_dies() {
    let mut deployment = tokio::task::spawn_blocking(|| RedisSentinel::start(3))
        .await
        .unwrap();
    let redis = settings(&deployment.url(), None);
    let store = store_with(redis.clone(), OwnedSettings::default()).await;
    let before = spend(&store, "r1", 300_000).await.unwrap();
    assert_eq!(windows(&before), [300_000, 300_000]);

    let new = tokio::task::block_in_place(|| {
        deployment.wait_replicated();
        let old = deployment.kill_master();
        deployment.wait_for_new_master(old, Duration::from_secs(30))
    });
    let (after, waited) = once_available(|| spend(&store, "r2", 200_000)).await;
    eprintln!("calls succeeded again {waited:?} after the sentinels named {new}");
    assert_eq!(
        windows(&after),
        [500_000, 500_000],
        "the charge before the failover is kept"
    );
    // The new master holds both: a store started afresh reads them there.
    drop(store);
    let fresh = store_with(redis, OwnedSettings::default()).await;
    let usage = fresh.usage("acct", 10, NOW).await.unwrap();
    assert_eq!(usage.recent.len(), 2, "{usage:?}");
}

/// Behind Sentinel, as on a standalone Redis, a batch is a plain transaction (`WATCH`,
/// `MULTI` … `EXEC`) on the master, not a script. (The failovers here check that the writer's
/// own connection follows the master.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_plain_transactions_on_the_master() {
    let deployment = tokio::task::spawn_blocking(support::redis::shared_sentinel)
        .await
        .unwrap();
    let store = store_with(settings(&deployment.url(), None), OwnedSettings::default()).await;
    spend(&store, "tx-1", 100_000).await.unwrap();
    let stats = deployment.master().cli(&["INFO", "commandstats"]).unwrap();
    let calls = |name: &str| {
        (stats.lines())
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(calls("exec") >= 2, "a reserve and a commit:\n{stats}");
    assert!(calls("watch") >= 2, "{stats}");
}

/// An operator's `SENTINEL FAILOVER`: the old master stays up and is turned into a replica.
/// The store, whose leases and fences live in Redis too, decides again once the replica is
/// promoted, and what it decided is in the new master: a restart reads it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_resumes_deciding_after_an_operators_failover() {
    let deployment = tokio::task::spawn_blocking(|| RedisSentinel::start(3))
        .await
        .unwrap();
    let redis = settings(&deployment.url(), None);
    let store = store_with(redis.clone(), OwnedSettings::default()).await;
    let before = spend(&store, "r1", 300_000).await.unwrap();
    assert_eq!(windows(&before), [300_000, 300_000]);
    assert_eq!(store.owned_partitions(), Some(64));

    let new = tokio::task::block_in_place(|| {
        deployment.wait_replicated();
        let old = deployment.master_port();
        let asked = deployment.sentinels[0].cli(&["SENTINEL", "FAILOVER", SENTINEL_SERVICE]);
        assert_eq!(asked.as_deref().map(str::trim), Some("OK"));
        let new = deployment.wait_for_new_master(old, Duration::from_secs(30));
        // The old master still takes writes until Sentinel demotes it, seconds later, and loses
        // them then: the store must have moved before it decides again.
        assert!(
            deployment.wait_for_client(new, RESUME_WITHIN),
            "the store did not connect to the new master"
        );
        new
    });
    let (after, waited) = once_available(|| spend(&store, "r2", 200_000)).await;
    eprintln!("decisions succeeded again {waited:?} after the sentinels named {new}");
    assert_eq!(windows(&after), [500_000, 500_000]);
    assert_eq!(store.owned_partitions(), Some(64), "no partition was lost");

    drop(store);
    let again = store_with(redis, OwnedSettings::default()).await;
    let usage = again.usage("acct", 10, NOW).await.unwrap();
    assert_eq!(usage.recent.len(), 2, "both charges are in the new master");
}

/// The URL's credentials are the master's, and a user without `@admin` commands (ROLE among
/// them) still connects: the sentinels' word stands for it. A sentinel that is down (the first
/// named) is passed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_that_may_not_run_role_connects_with_the_urls_credentials() {
    let deployment = tokio::task::spawn_blocking(support::redis::shared_sentinel)
        .await
        .unwrap();
    let created = deployment.master().cli(&[
        "ACL", "SETUSER", "quotad", "on", ">s3cret", "~*", "&*", "+@all", "-@admin",
    ]);
    assert_eq!(created.as_deref().map(str::trim), Some("OK"));
    let down = support::redis::free_port();
    let url = deployment.url().replace(
        "redis+sentinel://",
        &format!("redis+sentinel://quotad:s3cret@127.0.0.1:{down},"),
    );
    let store = store_with(settings(&url, None), OwnedSettings::default()).await;
    let outcome = spend(&store, "r1", 300_000).await.unwrap();
    assert_eq!(windows(&outcome), [300_000, 300_000]);

    let wrong = url.replace("s3cret", "wrong");
    let rules = LiveRules::fixed(Arc::new(Policy::default()));
    let owned = OwnedSettings::default();
    let refused = MemoryStore::open_on_redis(rules, &settings(&wrong, None), &owned).await;
    let Err(StoreError::Unavailable(why)) = refused else {
        panic!("connected with a wrong password");
    };
    assert!(!why.contains("wrong"), "{why}");
}
