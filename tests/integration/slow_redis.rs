//! A slow Redis is not a Redis outage. Redis made slow on purpose (`DEBUG SLEEP` sent now and
//! then from a connection of the test's own, so that every write queued behind it waits) must
//! not turn into UNAVAILABLE on the default settings: owners wait out stalls of tens of
//! milliseconds, and a batch write whose attempt outlasts its time is tried again, and lands
//! once. A Redis that really stops answering still fails fast: stopped, at once (the owner
//! says so in its health); asleep for longer than a call may wait, after that wait, and a
//! retry once Redis answers gets the first answer.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quotad::api::pb;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use quotad::domain::time::MINUTE_MS;
use quotad::domain::{Decision, ReserveCommand, Usage};
use quotad::server::STORE_HEALTH_NAME;
use quotad::store::{MemoryStore, OwnedSettings, RedisSettings, Store, StoreError, StoreHealth};
use support::process::Quotad;
use support::redis::{RedisServer, fresh_prefix};
use support::{CREDIT, T0};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A Redis that lets this test put it to sleep (`DEBUG SLEEP`, off by default since 7.0).
fn sleepy_redis() -> RedisServer {
    RedisServer::start_with(&["--enable-debug-command", "yes"])
}

/// A connection that waits as long as Redis sleeps.
async fn connection(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// Puts Redis to sleep for `seconds` on a connection of its own, and returns once it sleeps
/// (a PING on another connection then gets no answer), so that what the test sends next waits
/// behind the sleep. The returned task ends when Redis wakes up.
async fn stall(redis: &RedisServer, seconds: f64) -> tokio::task::JoinHandle<()> {
    let mut sleeper = connection(redis).await;
    let mut probe = connection(redis).await;
    let task = tokio::spawn(async move {
        redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(seconds)
            .query_async::<()>(&mut sleeper)
            .await
            .unwrap();
    });
    let ping = redis::cmd("PING");
    loop {
        let answer = ping.query_async::<String>(&mut probe);
        if tokio::time::timeout(Duration::from_millis(50), answer)
            .await
            .is_err()
        {
            return task;
        }
    }
}

async fn health(channel: &Channel, service: &str) -> ServingStatus {
    let request = HealthCheckRequest {
        service: service.into(),
    };
    HealthClient::new(channel.clone())
        .check(request)
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// Three quotad replicas on one Redis, default settings but for the lease, 24 clients on one account (8 on each
/// replica, forwarded to its owner), while Redis sleeps 20 to 50 ms every 100 ms, 12 times:
/// every call is answered. Then Redis stops: calls fail with UNAVAILABLE at once, and every
/// replica says its store is not serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_ride_out_a_redis_that_stalls_now_and_then() {
    let mut redis = tokio::task::spawn_blocking(sleepy_redis).await.unwrap();
    let url = redis.url();
    let replicas: Vec<Quotad> = tokio::task::spawn_blocking(move || {
        (0..3)
            .map(|_| {
                // Each advertises the address it listens on, for the others to forward to.
                let listen = format!("127.0.0.1:{}", support::redis::free_port());
                let args = ["--store", "redis", "--redis-url", &url];
                let env = [
                    ("QUOTAD_STORE__REDIS__ADVERTISE_ADDR", listen.as_str()),
                    // Short, for the three to share the partitions within a few rounds.
                    ("QUOTAD_STORE__REDIS__LEASE_MS", "1000"),
                ];
                Quotad::start_on(&listen, &args, &env)
            })
            .collect()
    })
    .await
    .unwrap();
    // Every replica joins and takes its share (a few rounds of a third of a lease each).
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let mut channels = Vec::new();
    for replica in &replicas {
        let channel = Channel::from_shared(replica.url()).unwrap();
        channels.push(channel.connect().await.unwrap());
    }

    // The clients go on until Redis has stalled 12 times.
    let done = Arc::new(AtomicBool::new(false));
    let staller = {
        let done = done.clone();
        let mut conn = connection(&redis).await;
        tokio::spawn(async move {
            for n in 0..12 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                // 20, 30, 40, 50 ms in turn.
                let seconds = 0.02 + 0.01 * (n % 4) as f64;
                redis::cmd("DEBUG")
                    .arg("SLEEP")
                    .arg(seconds)
                    .query_async::<()>(&mut conn)
                    .await
                    .unwrap();
            }
            done.store(true, Ordering::Relaxed);
        })
    };

    // 24 clients, 8 on each replica, all on one account: tasks of a Reserve and a Commit.
    let calls = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..24)
        .map(|c| {
            let channel = channels[c % 3].clone();
            let (done, calls) = (done.clone(), calls.clone());
            tokio::spawn(async move {
                let mut client = QuotaServiceClient::new(channel);
                let mut failures = Vec::new();
                let mut t = 0;
                while !done.load(Ordering::Relaxed) {
                    t += 1;
                    let reserve = pb::ReserveRequest {
                        account_id: "one".into(),
                        request_id: format!("c{c}-t{t}"),
                        product: "codex".into(),
                        estimate: Some(support::usage("gpt-5.5-mini", 0, 0, 50)),
                        plan_hint: "pro".into(),
                        ..Default::default()
                    };
                    calls.fetch_add(1, Ordering::Relaxed);
                    let reserved = match client.reserve(reserve).await {
                        Ok(answer) => answer.into_inner(),
                        Err(status) => {
                            failures.push(format!("Reserve: {status:?}"));
                            continue;
                        }
                    };
                    // A deny is an answer too (should the plan run out).
                    if reserved.decision() != pb::Decision::Allow {
                        continue;
                    }
                    let commit = pb::CommitRequest {
                        account_id: "one".into(),
                        reservation_id: reserved.reservation_id,
                        usage: Some(support::usage("gpt-5.5-mini", 0, 0, 40)),
                        r#final: true,
                    };
                    calls.fetch_add(1, Ordering::Relaxed);
                    if let Err(status) = client.commit(commit).await {
                        failures.push(format!("Commit: {status:?}"));
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for client in clients {
        failures.extend(client.await.unwrap());
    }
    staller.await.unwrap();
    let calls = calls.load(Ordering::Relaxed);
    println!("{calls} calls while Redis stalled 12 times for 20-50 ms");
    assert!(failures.is_empty(), "calls failed: {failures:#?}");
    for (i, replica) in replicas.iter().enumerate() {
        assert!(
            !replica.output().contains("Redis does not answer"),
            "replica {i} took a stall for an outage:\n{}",
            replica.output()
        );
        assert_eq!(
            health(&channels[i], STORE_HEALTH_NAME).await,
            ServingStatus::Serving
        );
    }

    // Stopped: every call fails at once (no call hangs; the figures are in the outage bench).
    redis.kill();
    for channel in &channels {
        let mut client = QuotaServiceClient::new(channel.clone());
        for n in 0..20 {
            let reserve = pb::ReserveRequest {
                account_id: "one".into(),
                request_id: format!("down-{n}"),
                product: "codex".into(),
                estimate: Some(support::costing(1)),
                ..Default::default()
            };
            let started = Instant::now();
            let status = client.reserve(reserve).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "a call waited {:?} on a stopped Redis",
                started.elapsed()
            );
        }
    }
    assert!(
        replicas
            .iter()
            .any(|r| r.output().contains("Redis does not answer")),
        "the account's owner says Redis does not answer"
    );
    // Every replica says its store is not serving, the owner from its writes and the others
    // from their ownership rounds, though they have nothing to write.
    let started = Instant::now();
    for (i, channel) in channels.iter().enumerate() {
        while health(channel, STORE_HEALTH_NAME).await != ServingStatus::NotServing {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "replica {i} still says its store is serving"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn reserve(account: &str, request: &str) -> ReserveCommand {
    let estimate = Usage {
        model: "gpt-5.5-mini".into(),
        output_tokens: 5_000,
        ..Usage::default()
    };
    ReserveCommand {
        account_id: account.into(),
        request_id: request.into(),
        product: "codex".into(),
        cost: CREDIT,
        estimate,
        plan_hint: None,
        ttl_ms: 15 * MINUTE_MS,
        reservation_id: format!("rsv-{request}"),
        wait_for_top_up: false,
    }
}

/// A store on `redis` at the default settings but for a key prefix of its own, with one call
/// made; and its settings, for a store started afresh on what it wrote.
async fn store_on(redis: &RedisServer) -> (MemoryStore, RedisSettings) {
    let settings = RedisSettings {
        url: redis.url(),
        key_prefix: fresh_prefix(),
        ..RedisSettings::default()
    };
    let store = support::redis::store_with(settings.clone(), OwnedSettings::default()).await;
    store.reserve(&reserve("warm", "w"), T0).await.unwrap();
    (store, settings)
}

/// On the default settings a write attempt may take 1 s: Redis asleep for 0.6 s is waited
/// out, and the Reserve answered, with no attempt tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_shorter_than_a_write_attempt_is_waited_out() {
    let redis = tokio::task::spawn_blocking(sleepy_redis).await.unwrap();
    let (store, _) = store_on(&redis).await;

    let asleep = stall(&redis, 0.6).await;
    let out = store.reserve(&reserve("warm", "r1"), T0).await;
    asleep.await.unwrap();
    assert!(out.is_ok(), "{out:?}");
    assert_eq!(store.retried_calls(), 0);
    assert_eq!(store.health(), StoreHealth::Up);
}

/// Redis asleep for longer than a call may wait (3 s): the call whose batch it was gets
/// UNAVAILABLE after its wait, and calls after the attempt timed out at once. Once Redis
/// answers, the same Reserve asked again gets the answer the rules gave the first time (it was
/// decided, and written when Redis woke, once although Redis ran the timed-out attempt too:
/// each batch carries its number in the partition, and one already written is not written
/// again); a store started afresh on Redis reads the one hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_answering_fails_calls_until_it_answers_again() {
    let redis = tokio::task::spawn_blocking(sleepy_redis).await.unwrap();
    let (store, settings) = store_on(&redis).await;

    let asleep = stall(&redis, 3.0).await;
    let started = Instant::now();
    let out = store.reserve(&reserve("warm", "r1"), T0).await;
    assert!(matches!(out, Err(StoreError::Unavailable(_))), "{out:?}");
    // It waited its whole wait (`write_timeout_ms`): a Redis that is only slow may answer.
    let waited = started.elapsed();
    assert!(waited < Duration::from_millis(2_500), "{waited:?}");
    let started = Instant::now();
    let out = store.reserve(&reserve("warm", "r2"), T0).await;
    assert!(matches!(out, Err(StoreError::Unavailable(_))), "{out:?}");
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "once Redis is known not to answer, calls fail at once, not after {:?}",
        started.elapsed()
    );
    assert!(matches!(store.health(), StoreHealth::Down { .. }));

    asleep.await.unwrap();
    let back = Instant::now();
    let first = loop {
        match store.reserve(&reserve("warm", "r1"), T0).await {
            Ok(answer) => break answer,
            Err(e) => {
                assert!(
                    back.elapsed() < Duration::from_secs(3),
                    "still failing: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(
        matches!(first.decision, Decision::Allow { .. }),
        "{first:?}"
    );
    assert!(
        store.retried_calls() >= 1,
        "the timed-out attempt was tried again"
    );
    assert_eq!(store.health(), StoreHealth::Up);
    let held = |usage: &quotad::domain::UsageSnapshot| {
        let mut ids: Vec<_> = usage
            .holds
            .iter()
            .map(|h| h.reservation_id.clone())
            .collect();
        ids.sort();
        ids
    };
    let usage = store.usage("warm", 10, T0).await.unwrap();
    assert_eq!(
        held(&usage),
        ["rsv-r1", "rsv-w"],
        "r1 held once; r2 never decided"
    );

    drop(store);
    let again = support::redis::store_with(settings, OwnedSettings::default()).await;
    let usage = again.usage("warm", 10, T0).await.unwrap();
    assert_eq!(held(&usage), ["rsv-r1", "rsv-w"], "the same in Redis");
}
