//! The store contract, run unchanged against the Redis store on a real standalone
//! `redis-server` started by the test.

mod support;

use support::contract::store_contract_tests;

store_contract_tests!(support::redis::standalone_store());

use std::sync::Arc;

use quotad::domain::{Policy, ReserveCommand, Timestamp, Usage};
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
