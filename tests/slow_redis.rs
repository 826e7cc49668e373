//! A slow Redis is not a Redis outage. Redis made slow on purpose (`DEBUG SLEEP` sent now and
//! then from a connection of the test's own, so that every call queued behind it waits) must
//! not turn into UNAVAILABLE on the default settings: calls wait out stalls of tens of
//! milliseconds, a call whose attempt outlasts the command timeout is retried once when that
//! cannot act twice, and the circuit breaker stays closed. A Redis that really stops answering
//! still fails fast: stopped, at once; stalled for longer than calls may wait, after a few
//! failures in a row. Either way the breaker opens, and closes again once Redis answers.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quotad::api::pb;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use quotad::domain::rls::{CounterCheck, RlsUnit};
use quotad::domain::time::MINUTE_MS;
use quotad::domain::{Policy, ReserveCommand, Usage};
use quotad::server::STORE_HEALTH_NAME;
use quotad::store::{RedisSettings, RedisStore, Store, StoreError, StoreHealth};
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

/// Three quotad replicas on one Redis, default settings, 24 clients on one account, while Redis
/// sleeps 20 to 50 ms every 100 ms, 12 times: every call is answered. Then Redis stops: calls
/// fail with UNAVAILABLE at once, and each replica's breaker opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_ride_out_a_redis_that_stalls_now_and_then() {
    let mut redis = tokio::task::spawn_blocking(sleepy_redis).await.unwrap();
    let url = redis.url();
    let replicas: Vec<Quotad> = tokio::task::spawn_blocking(move || {
        (0..3)
            .map(|_| {
                // The Lua functions' retry and breaker (owned mode's writer has its own).
                let mode = [("QUOTAD_STORE__REDIS__MODE", "scripts")];
                Quotad::start(&["--store", "redis", "--redis-url", &url], &mode)
            })
            .collect()
    })
    .await
    .unwrap();
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
            !replica.output().contains("Redis is unreachable"),
            "replica {i} opened its breaker:\n{}",
            replica.output()
        );
        assert_eq!(
            health(&channels[i], STORE_HEALTH_NAME).await,
            ServingStatus::Serving
        );
    }

    // Stopped: every call fails at once (no call hangs; the figures are in the outage bench).
    redis.kill();
    for (i, channel) in channels.iter().enumerate() {
        let mut client = QuotaServiceClient::new(channel.clone());
        for n in 0..20 {
            let reserve = pb::ReserveRequest {
                account_id: format!("down-{n}"),
                request_id: "r".into(),
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
        let started = Instant::now();
        while health(channel, STORE_HEALTH_NAME).await != ServingStatus::NotServing {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "replica {i} still says its store is serving"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(replicas[i].output().contains("Redis is unreachable"));
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

async fn store_on(redis: &RedisServer) -> RedisStore {
    let settings = RedisSettings {
        url: redis.url(),
        key_prefix: fresh_prefix(),
        ..RedisSettings::default()
    };
    let store = RedisStore::connect(settings, Arc::new(Policy::default()))
        .await
        .unwrap();
    store.reserve(&reserve("warm", "w"), T0).await.unwrap();
    store
}

/// On the default settings (250 ms an attempt, 500 ms a call), Redis asleep for 400 ms: a
/// Reserve's first attempt times out, its retry gets the answer, and the Reserve held once.
/// The RLS counter, which would count twice, is not retried: it fails, alone, and one slow
/// call leaves the breaker closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_outlasts_its_attempt_is_retried_once_when_that_cannot_act_twice() {
    let redis = tokio::task::spawn_blocking(sleepy_redis).await.unwrap();
    let store = store_on(&redis).await;

    let asleep = stall(&redis, 0.4).await;
    let out = store.reserve(&reserve("a", "r1"), T0).await;
    asleep.await.unwrap();
    assert!(out.is_ok(), "{out:?}");
    assert_eq!(store.retried_calls(), 1, "the first attempt timed out");
    assert_eq!(store.health(), StoreHealth::Up);
    let usage = store.usage("a", 10, T0).await.unwrap();
    assert_eq!(usage.holds.len(), 1, "held once");
    assert_eq!(usage.status.windows[0].used, CREDIT);

    let check = CounterCheck {
        key: "k".into(),
        unit: RlsUnit::Minute,
        limit: 10,
        hits: 1,
    };
    let asleep = stall(&redis, 0.4).await;
    let counted = store.rls_check("d", std::slice::from_ref(&check), T0).await;
    asleep.await.unwrap();
    assert!(
        matches!(counted, Err(StoreError::Unavailable(_))),
        "{counted:?}"
    );
    assert_eq!(store.retried_calls(), 1, "not retried");
    assert_eq!(store.health(), StoreHealth::Up, "one slow call");
    // The timed-out call may have counted once (Redis ran it on waking), never twice.
    let after = store.rls_check("d", &[check], T0).await.unwrap();
    assert!(after[0].remaining >= 8, "{after:?}");
}

/// Redis asleep for longer than calls may wait, with calls arriving: after a few failures in a
/// row the breaker opens and calls fail at once; once Redis answers a probe, it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_answering_opens_the_breaker_until_it_answers_again() {
    let redis = tokio::task::spawn_blocking(sleepy_redis).await.unwrap();
    let store = Arc::new(store_on(&redis).await);

    let asleep = stall(&redis, 1.5).await;
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.reserve(&reserve("b", &format!("r{i}")), T0).await })
        })
        .collect();
    for call in calls {
        let out = call.await.unwrap();
        assert!(matches!(out, Err(StoreError::Unavailable(_))), "{out:?}");
    }
    assert!(
        matches!(store.health(), StoreHealth::Down { .. }),
        "eight calls in a row found no answer"
    );
    let started = Instant::now();
    let out = store.reserve(&reserve("b", "fast"), T0).await;
    match out {
        Err(StoreError::Unavailable(e)) => assert!(e.contains("unreachable"), "{e}"),
        other => panic!("expected a fast UNAVAILABLE, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "an open breaker fails calls at once, not after {:?}",
        started.elapsed()
    );

    asleep.await.unwrap();
    let back = Instant::now();
    let mut n = 0;
    while store
        .reserve(&reserve("b", &format!("after{n}")), T0)
        .await
        .is_err()
    {
        n += 1;
        assert!(
            back.elapsed() < Duration::from_secs(2),
            "the breaker did not close"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.health(), StoreHealth::Up);
}
