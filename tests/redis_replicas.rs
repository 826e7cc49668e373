//! What the Redis store adds over the contract: several replicas (store instances) sharing one
//! real Redis, the memory each keeps in front of it (usage within staleness), idempotency
//! records that every replica honours, admin changes reaching every replica, the sweeper, and
//! failing fast while Redis is down.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use quotad::domain::time::MINUTE_MS;
use quotad::domain::{
    Account, CommitCommand, Decision, DomainError, Policy, PriceSheet, ReserveCommand, Timestamp,
    Usage,
};
use quotad::store::{RedisSettings, RedisStore, Store, StoreError, StoreHealth};
use support::redis::{RedisServer, fresh_prefix, shared_server};
use support::{CREDIT, T0};

fn at(ms: i64) -> Timestamp {
    T0.plus_millis(ms)
}

fn reserve(account: &str, request: &str, product: &str, credits: i64) -> ReserveCommand {
    let estimate = Usage {
        model: "gpt-5.5-mini".into(),
        output_tokens: credits as u64 * 5_000,
        ..Usage::default()
    };
    ReserveCommand {
        account_id: account.into(),
        request_id: request.into(),
        product: product.into(),
        cost: credits * CREDIT,
        estimate,
        plan_hint: None,
        ttl_ms: 15 * MINUTE_MS,
        reservation_id: format!("rsv-{request}"),
        wait_for_top_up: false,
    }
}

fn commit(account: &str, reservation: &str, credits: i64) -> CommitCommand {
    let usage = Usage {
        model: "gpt-5.5-mini".into(),
        output_tokens: credits as u64 * 5_000,
        ..Usage::default()
    };
    CommitCommand {
        account_id: account.into(),
        reservation_id: reservation.into(),
        cost: credits * CREDIT,
        usage,
        is_final: true,
        price_version: PriceSheet::default().version,
    }
}

/// Replica settings as in production: memory in front of Redis.
fn replica_settings(url: &str, prefix: &str) -> RedisSettings {
    RedisSettings {
        url: url.to_owned(),
        key_prefix: prefix.to_owned(),
        command_timeout: Duration::from_millis(500),
        // Slices of 1,024 slots: 16 maintenance ticks go round the ring.
        sweep_interval: Duration::from_secs(1),
        ..RedisSettings::default()
    }
}

async fn replicas(n: usize) -> Vec<RedisStore> {
    let server = tokio::task::spawn_blocking(shared_server).await.unwrap();
    let prefix = fresh_prefix();
    let mut stores = Vec::new();
    for _ in 0..n {
        let settings = replica_settings(&server.url(), &prefix);
        stores.push(
            RedisStore::connect(settings, Arc::new(Policy::default()))
                .await
                .unwrap(),
        );
    }
    stores
}

fn is_allow(d: &Decision) -> bool {
    matches!(d, Decision::Allow { .. })
}

/// A client whose Reserve answer was lost retries on whichever replica its retry reaches: each
/// answers from the record the first replica wrote, whatever it has seen of the account since
/// (here, the window filled and it denied the same estimate itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_reserve_gets_its_first_answer_on_every_replica() {
    let stores = replicas(2).await;
    let (a, b) = (&stores[0], &stores[1]);
    let first = a
        .reserve(&reserve("f", "r1", "codex", 5), at(0))
        .await
        .unwrap();
    assert!(is_allow(&first.decision));
    b.reserve(&reserve("f", "fill", "codex", 10), at(0))
        .await
        .unwrap();
    b.commit(commit("f", "rsv-fill", 11), at(0)).await.unwrap();
    for (store, request) in [(a, "d1"), (b, "d2")] {
        let denied = store
            .reserve(&reserve("f", request, "codex", 5), at(MINUTE_MS))
            .await
            .unwrap();
        assert!(!is_allow(&denied.decision));
    }
    let denied = b
        .reserve(&reserve("f", "d1", "codex", 5), at(MINUTE_MS))
        .await
        .unwrap();
    for store in [a, b] {
        let retry = store
            .reserve(&reserve("f", "r1", "codex", 5), at(2 * MINUTE_MS))
            .await
            .unwrap();
        assert_eq!(retry.decision, first.decision);
        let retry = store
            .reserve(&reserve("f", "d1", "codex", 5), at(2 * MINUTE_MS))
            .await
            .unwrap();
        assert_eq!(retry.decision, denied.decision);
        for request in ["r1", "d1"] {
            let reused = store
                .reserve(&reserve("f", request, "codex", 6), at(2 * MINUTE_MS))
                .await
                .unwrap_err();
            assert!(
                matches!(reused, StoreError::Rule(DomainError::AlreadyExists(_))),
                "{request}: {reused:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_answered_from_memory_within_the_staleness_bound() {
    let stores = replicas(2).await;
    let (a, b) = (&stores[0], &stores[1]);
    a.reserve(&reserve("u", "r1", "codex", 2), at(0))
        .await
        .unwrap();
    let first = a.usage("u", 10, at(0)).await.unwrap();
    b.commit(commit("u", "rsv-r1", 2), at(0)).await.unwrap();
    // Within 250 ms this replica may answer from its copy...
    assert_eq!(a.usage("u", 10, at(250)).await.unwrap(), first);
    // ...and after that it asks Redis again.
    let later = a.usage("u", 10, at(251)).await.unwrap();
    assert_eq!(later.status.windows[0].held, 0);
    assert_eq!(later.recent.len(), 1);
    // A change made by this replica is never hidden by its own copy.
    a.reserve(&reserve("u", "r2", "codex", 1), at(300))
        .await
        .unwrap();
    assert_eq!(a.usage("u", 10, at(300)).await.unwrap().holds.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_of_a_client_that_died_are_swept_by_any_replica() {
    let server = tokio::task::spawn_blocking(shared_server).await.unwrap();
    let stores = replicas(2).await;
    let (a, b) = (&stores[0], &stores[1]);
    let prefix = a.settings().key_prefix.clone();
    let mut cmd = reserve("dead-client", "r1", "codex", 4);
    cmd.ttl_ms = 60_000;
    a.reserve(&cmd, at(0)).await.unwrap();
    let open_key = format!("{prefix}:{{dead-client}}:open");
    assert_eq!(server.cli(&["HLEN", &open_key]).unwrap().trim(), "1");
    b.sweep_expired_holds(at(59_999)).await.unwrap();
    assert_eq!(
        server.cli(&["HLEN", &open_key]).unwrap().trim(),
        "1",
        "not before it expires"
    );
    // Both replicas sweep at once, slice by slice as their maintenance does: the hold is
    // returned, exactly once.
    for _ in 0..16 {
        tokio::join!(a.maintain(at(60_000)), b.maintain(at(60_000)));
    }
    assert_eq!(server.cli(&["HLEN", &open_key]).unwrap().trim(), "0");
    let closed_key = format!("{prefix}:{{dead-client}}:closed");
    assert!(
        server
            .cli(&["HGET", &closed_key, "rsv-r1"])
            .unwrap()
            .contains("expired")
    );
    // Nothing is left in the sweeper's index.
    let slot = quotad::store::redis::slot(b"dead-client");
    let index = quotad::store::redis::hold_index_key(&prefix, slot);
    assert_eq!(server.cli(&["ZCARD", &index]).unwrap().trim(), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_are_swept_on_a_cluster_too() {
    let store = support::redis::cluster_store().await;
    for (i, account) in ["alpha", "bravo", "charlie", "delta"].iter().enumerate() {
        let mut cmd = reserve(account, &format!("r{i}"), "codex", 1);
        cmd.ttl_ms = 1_000;
        store.reserve(&cmd, at(0)).await.unwrap();
    }
    assert_eq!(store.sweep_expired_holds(at(999)).await.unwrap(), 0);
    assert_eq!(
        store.sweep_expired_holds(at(1_000)).await.unwrap(),
        4,
        "one per account, across the nodes"
    );
    assert_eq!(
        store.sweep_expired_holds(at(1_000)).await.unwrap(),
        0,
        "and only once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_redis_is_down_calls_fail_fast_and_recover_within_a_second() {
    let mut redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    // The default settings: a Redis that is down fails calls at once, however long calls
    // may wait for a Redis that is only slow.
    let settings = RedisSettings {
        url: redis.url(),
        key_prefix: fresh_prefix(),
        ..RedisSettings::default()
    };
    let store = Arc::new(
        RedisStore::connect(settings, Arc::new(Policy::default()))
            .await
            .unwrap(),
    );
    store
        .reserve(&reserve("warm", "w", "codex", 1), at(0))
        .await
        .unwrap();
    redis.kill();

    // 400 calls in flight at a time, each for a different account: a million accounts in all.
    let started = Instant::now();
    let mut latencies = Vec::new();
    for wave in 0..2_500 {
        let calls: Vec<_> = (0..400)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    let out = store
                        .reserve(
                            &reserve(&format!("acct-{wave}-{i}"), "r", "codex", 1),
                            at(0),
                        )
                        .await;
                    (t.elapsed(), out)
                })
            })
            .collect();
        for call in calls {
            let (took, out) = call.await.unwrap();
            assert!(matches!(out, Err(StoreError::Unavailable(_))), "{out:?}");
            latencies.push(took);
        }
    }
    latencies.sort();
    let p999 = latencies[latencies.len() * 999 / 1000];
    println!(
        "outage: {} calls in {:?}, p50 {:?}, p99.9 {:?}, max {:?}",
        latencies.len(),
        started.elapsed(),
        latencies[latencies.len() / 2],
        p999,
        latencies.last().unwrap()
    );
    // Never hang, never queue behind the outage; the latency figures come from
    // `cargo bench --bench outage`, not from a timed assertion here.
    assert!(
        *latencies.last().unwrap() < Duration::from_secs(1),
        "a call hung"
    );
    assert!(matches!(store.health(), StoreHealth::Down { .. }));
    assert!(
        store.remembered_accounts() < 10,
        "failed calls leave nothing behind in memory"
    );

    // (Blocking here is fine: the runtime has other workers for the store's tasks.)
    redis.restart();
    let back = Instant::now();
    loop {
        if store
            .reserve(
                &reserve(
                    "after",
                    &format!("r{}", back.elapsed().as_micros()),
                    "codex",
                    1,
                ),
                at(0),
            )
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(1),
            "not serving again within 1 s of Redis returning"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("recovered {:?} after Redis returned", back.elapsed());
    assert_eq!(store.health(), StoreHealth::Up);
    redis.kill();
}

/// Two replicas charge accounts spread over four export shards, their Commits appending to the
/// export streams themselves: a consumer reading the streams straight from Redis (as billing
/// would, with its own client and consumer group) finds every charge exactly once, in the
/// documented format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_consumers_read_the_export_stream_straight_from_redis() {
    external_consumers_find_every_charge_once(false).await;
}

/// The same through the outboxes, the two replicas relaying at the same time (as on a Cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_consumers_find_what_two_replicas_relayed_at_once() {
    external_consumers_find_every_charge_once(true).await;
}

async fn external_consumers_find_every_charge_once(export_outbox: bool) {
    let server = tokio::task::spawn_blocking(shared_server).await.unwrap();
    let prefix = fresh_prefix();
    let mut stores = Vec::new();
    for _ in 0..2 {
        let settings = RedisSettings {
            export_shards: 4,
            export_outbox,
            ..replica_settings(&server.url(), &prefix)
        };
        stores.push(
            RedisStore::connect(settings, Arc::new(Policy::default()))
                .await
                .unwrap(),
        );
    }
    for i in 0..40 {
        let store = &stores[i % 2];
        let account = format!("acct-{}", i % 20);
        let request = format!("r{i}");
        let out = store
            .reserve(&reserve(&account, &request, "codex", 2), at(0))
            .await
            .unwrap();
        assert!(is_allow(&out.decision));
        store
            .commit(commit(&account, &format!("rsv-{request}"), 2), at(0))
            .await
            .unwrap();
    }
    let outboxes = server
        .cli(&["--scan", "--pattern", &format!("{prefix}:ob:*")])
        .unwrap();
    assert_eq!(
        outboxes.lines().any(|k| !k.is_empty()),
        export_outbox,
        "outboxes: {outboxes:?}"
    );
    // Both relay at once, each its own outboxes and (by the probe) possibly the other's.
    let (a, b) = (&stores[0], &stores[1]);
    tokio::join!(a.maintain(at(1_000)), b.maintain(at(1_000)));
    for store in &stores {
        store.maintain(at(2_000)).await; // whatever a lease held back
    }

    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut ids = std::collections::HashSet::new();
    for shard in 0..4 {
        let key = format!("{prefix}:export:{{{shard}}}");
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg("billing")
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await
            .unwrap();
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("billing")
            .arg("consumer-1")
            .arg("COUNT")
            .arg(1_000)
            .arg("STREAMS")
            .arg(&key)
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
        for entry in reply.keys.iter().flat_map(|k| &k.ids) {
            let id: String = entry.get("id").unwrap();
            let event: serde_json::Value =
                serde_json::from_str(&entry.get::<String>("event").unwrap()).unwrap();
            assert_eq!(event["id"], id.as_str());
            let account = event["account_id"].as_str().unwrap();
            assert_eq!(id, format!("{account}:{}", event["seq"]));
            assert_eq!(event["product"], "codex");
            assert_eq!(event["model"], "gpt-5.5-mini");
            assert_eq!(event["output_tokens"], 10_000);
            assert_eq!(
                event["plan_micros"].as_i64().unwrap() + event["credit_micros"].as_i64().unwrap(),
                2 * CREDIT
            );
            assert!(event["at_ms"].is_i64() && event["reservation_id"].is_string());
            assert!(ids.insert(id.clone()), "{id} exported twice");
        }
    }
    let expected: std::collections::HashSet<String> = (0..20)
        .flat_map(|a| [format!("acct-{a}:1"), format!("acct-{a}:2")])
        .collect();
    assert_eq!(ids, expected);
}

/// Every key of an account carries a lifetime after every kind of operation, although each
/// call refreshes only the keys it wrote: nothing an account leaves behind lives forever.
/// (Slot indexes and the export outbox are shared by the slot and drained, not expired.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_account_key_carries_a_lifetime() {
    use quotad::domain::top_up::TopUpSettings;
    use quotad::domain::{GrantCommand, LotSource, ReleaseCommand, RevokeCommand, SetTopUpCommand};
    let stores = replicas(1).await;
    let store = &stores[0];
    let server = tokio::task::spawn_blocking(shared_server).await.unwrap();
    let prefix = store.settings().key_prefix.clone();
    store
        .upsert_account(
            Account {
                id: "ttl".into(),
                plan: "plus".into(),
                credit_purchase_allowed: true,
            },
            at(0),
        )
        .await
        .unwrap();
    store
        .grant(
            GrantCommand {
                account_id: "ttl".into(),
                grant_id: "g1".into(),
                amount: 500 * CREDIT,
                source: LotSource::Purchase,
                expires_at: None,
            },
            at(0),
        )
        .await
        .unwrap();
    for (i, credits) in [60, 120, 30].into_iter().enumerate() {
        let request = format!("r{i}");
        let now = at(i as i64 * MINUTE_MS);
        assert!(is_allow(
            &store
                .reserve(&reserve("ttl", &request, "codex", credits), now)
                .await
                .unwrap()
                .decision
        ));
        if i == 2 {
            store
                .release(
                    ReleaseCommand {
                        account_id: "ttl".into(),
                        reservation_id: format!("rsv-{request}"),
                    },
                    now,
                )
                .await
                .unwrap();
        } else {
            store
                .commit(commit("ttl", &format!("rsv-{request}"), credits), now)
                .await
                .unwrap();
        }
    }
    store
        .set_top_up(
            SetTopUpCommand {
                account_id: "ttl".into(),
                settings: TopUpSettings::new(true, 10 * CREDIT, 20 * CREDIT, None).unwrap(),
            },
            at(4 * MINUTE_MS),
        )
        .await
        .unwrap();
    store
        .revoke_grant(
            RevokeCommand {
                account_id: "ttl".into(),
                grant_id: "g1".into(),
            },
            at(5 * MINUTE_MS),
        )
        .await
        .unwrap();
    store.usage("ttl", 10, at(6 * MINUTE_MS)).await.unwrap();

    let keys = server
        .cli(&["--scan", "--pattern", &format!("{prefix}:{{ttl}}:*")])
        .unwrap();
    let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
    assert!(keys.len() >= 8, "{keys:?}");
    for key in keys {
        let ttl: i64 = server.cli(&["PTTL", key]).unwrap().trim().parse().unwrap();
        assert!(ttl > 0, "{key} has no lifetime ({ttl})");
    }
}
