//! The store contract, run unchanged against the Redis store on a real standalone
//! `redis-server` started by the test.

mod support;

use support::contract::store_contract_tests;

store_contract_tests!(support::redis::standalone_store());

use std::sync::Arc;

use quotad::domain::{CommitCommand, Policy, ReserveCommand, Timestamp, Usage};
use quotad::store::{RedisStore, Store};

fn reserve(request: &str) -> ReserveCommand {
    ReserveCommand {
        account_id: "lost".into(),
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

/// A Redis that lost quotad's function library (restarted without persistence, a Cluster node
/// added empty) gets it again from the first call that misses it, and that call succeeds.
#[tokio::test]
async fn a_redis_that_lost_the_function_library_gets_it_again() {
    let redis = support::redis::RedisServer::start();
    let settings = support::redis::settings(&redis.url(), None);
    let store = RedisStore::connect(settings, Arc::new(Policy::default()))
        .await
        .unwrap();
    let now = Timestamp::from_millis(1_800_000_000_000);
    store.reserve(&reserve("r1"), now).await.unwrap();
    assert_eq!(redis.cli(&["FUNCTION", "FLUSH"]).unwrap().trim(), "OK");
    assert!(redis.cli(&["FUNCTION", "LIST"]).unwrap().trim().is_empty());
    store.reserve(&reserve("r2"), now).await.unwrap();
    assert!(
        redis
            .cli(&["FUNCTION", "LIST"])
            .unwrap()
            .contains("quotad_")
    );
}

/// The account record mirrors the ends of its window lists so that most calls never read them.
/// Should a list vanish under that mirror (it expired early under a replica clock running
/// ahead), the next charge starts the window again instead of failing, and the other window
/// keeps its usage.
#[tokio::test]
async fn a_window_list_that_vanished_under_its_mirror_starts_again() {
    let redis = support::redis::RedisServer::start();
    let settings = support::redis::settings(&redis.url(), None);
    let prefix = settings.key_prefix.clone();
    let store = RedisStore::connect(settings, Arc::new(Policy::default()))
        .await
        .unwrap();
    let now = Timestamp::from_millis(1_800_000_000_000);
    let commit = |request: &str, cost| CommitCommand {
        account_id: "lost".into(),
        reservation_id: format!("rsv-{request}"),
        usage: Usage::default(),
        cost,
        is_final: true,
        price_version: "v".into(),
    };
    store.reserve(&reserve("r1"), now).await.unwrap();
    store.commit(commit("r1", 300_000), now).await.unwrap();
    let five_hours = format!("{prefix}:{{lost}}:w5");
    assert_eq!(redis.cli(&["DEL", &five_hours]).unwrap().trim(), "1");

    let later = now.plus_millis(1_000);
    store.reserve(&reserve("r2"), later).await.unwrap();
    let outcome = store.commit(commit("r2", 200_000), later).await.unwrap();
    let used: Vec<_> = outcome.status.windows.iter().map(|w| w.used).collect();
    assert_eq!(used, vec![200_000, 500_000]);
    assert_eq!(redis.cli(&["LLEN", &five_hours]).unwrap().trim(), "1");
}
