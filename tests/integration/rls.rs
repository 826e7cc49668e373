//! Envoy's rate limit service over real gRPC, with a client generated from quotad's copy of
//! Envoy's definitions, on both stores: several descriptors in one request, `hits_addend` on
//! the request and on a descriptor, every status filled, a sliding window at its edge (the
//! server's clock is the test's), the default config stopping an exhausted account, bad
//! requests, `RateLimit-*` headers, and `UNAVAILABLE` when the store is gone.

use crate::support;

use quotad::api::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use quotad::api::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use quotad::api::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use quotad::api::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus};
use quotad::api::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use quotad::api::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use quotad::api::pb;
use quotad::config::Config;
use quotad::domain::rls::{EntryMatch, RlsRule, RlsUnit};
use support::redis::RedisServer;
use support::{TestServer, costing};
use tonic::transport::Channel;

support::on_every_store!(
    several_descriptors_are_checked_together_with_hits_at_both_levels,
    a_minute_limit_slides_over_any_60_seconds,
    the_default_config_stops_an_exhausted_account_at_the_edge,
    bad_requests_are_invalid_argument,
);

fn rule(entries: &[(&str, Option<&str>)], per_minute: u32, name: Option<&str>) -> RlsRule {
    RlsRule {
        domain: "edge".into(),
        entries: entries
            .iter()
            .map(|(k, v)| EntryMatch {
                key: k.to_string(),
                value: v.map(Into::into),
            })
            .collect(),
        requests_per_unit: Some(per_minute),
        unit: Some(RlsUnit::Minute),
        account_windows: false,
        name: name.map(Into::into),
    }
}

fn edge_config() -> Config {
    let mut config = Config::default();
    config.rls.rules = vec![
        rule(&[("path", Some("/login"))], 3, Some("login")),
        rule(&[("remote_address", None)], 10, None),
    ];
    config.rls.rate_limit_headers = true;
    config
}

fn descriptor(entries: &[(&str, &str)], hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        limit: None,
        hits_addend: hits,
    }
}

async fn client(server: &TestServer) -> RateLimitServiceClient<Channel> {
    RateLimitServiceClient::new(server.channel().await)
}

async fn ask(
    c: &mut RateLimitServiceClient<Channel>,
    domain: &str,
    descriptors: Vec<RateLimitDescriptor>,
    hits_addend: u32,
) -> RateLimitResponse {
    c.should_rate_limit(RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend,
    })
    .await
    .unwrap()
    .into_inner()
}

fn code(s: &DescriptorStatus) -> Code {
    Code::try_from(s.code).unwrap()
}

async fn several_descriptors_are_checked_together_with_hits_at_both_levels(
    store: support::TestStore,
) {
    let server = TestServer::start_with(edge_config(), store).await;
    let mut c = client(&server).await;
    let request = || {
        vec![
            descriptor(&[("remote_address", "10.0.0.1")], None),
            descriptor(&[("path", "/login")], Some(1)),
            descriptor(&[("user_agent", "curl")], None),
        ]
    };
    // hits_addend 2 on the request, 1 on the login descriptor.
    let first = ask(&mut c, "edge", request(), 2).await;
    assert_eq!(Code::try_from(first.overall_code).unwrap(), Code::Ok);
    assert_eq!(first.statuses.len(), 3, "a status for every descriptor");
    let [ip, login, other] = &first.statuses[..] else {
        unreachable!()
    };
    assert_eq!((code(ip), ip.limit_remaining), (Code::Ok, 8));
    let limit = ip.current_limit.as_ref().unwrap();
    assert_eq!((limit.requests_per_unit, limit.unit()), (10, Unit::Minute));
    assert_eq!(limit.name, "edge:remote_address");
    assert_eq!((code(login), login.limit_remaining), (Code::Ok, 2));
    assert_eq!(login.current_limit.as_ref().unwrap().name, "login");
    let reset = login.duration_until_reset.unwrap();
    assert!(reset.seconds > 0 && reset.seconds <= 61, "{reset:?}");
    assert_eq!(code(other), Code::Ok);
    assert!(other.current_limit.is_none(), "no rule: not limited");
    let headers: Vec<(String, String)> = first
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    assert!(
        headers.contains(&("RateLimit-Remaining".into(), "2".into())),
        "{headers:?}"
    );
    assert!(
        headers.contains(&("RateLimit-Limit".into(), "3, 3;w=60".into())),
        "{headers:?}"
    );

    // Login asks for 3 more: over; nothing is counted, not even on the address.
    let second = ask(
        &mut c,
        "edge",
        vec![
            descriptor(&[("remote_address", "10.0.0.1")], None),
            descriptor(&[("path", "/login")], Some(3)),
        ],
        1,
    )
    .await;
    assert_eq!(
        Code::try_from(second.overall_code).unwrap(),
        Code::OverLimit
    );
    assert_eq!(code(&second.statuses[0]), Code::Ok);
    assert_eq!(second.statuses[0].limit_remaining, 8, "not counted");
    assert_eq!(code(&second.statuses[1]), Code::OverLimit);
    // Another address has its own counter; hits_addend 0 means 1.
    let other_ip = ask(
        &mut c,
        "edge",
        vec![descriptor(&[("remote_address", "10.0.0.2")], None)],
        0,
    )
    .await;
    assert_eq!(other_ip.statuses[0].limit_remaining, 9);
}

async fn a_minute_limit_slides_over_any_60_seconds(store: support::TestStore) {
    let server = TestServer::start_with(edge_config(), store).await;
    let mut c = client(&server).await;
    let login = || vec![descriptor(&[("path", "/login")], None)];
    // Three logins 30 s apart... the first at 0 s, two at 30 s.
    assert_eq!(
        ask(&mut c, "edge", login(), 1).await.overall_code,
        Code::Ok as i32
    );
    server.clock.advance_secs(30);
    assert_eq!(
        ask(&mut c, "edge", login(), 2).await.overall_code,
        Code::Ok as i32
    );
    // At 59 s a fixed calendar minute might have reset; a sliding one has not.
    server.clock.advance_secs(29);
    let at_59 = ask(&mut c, "edge", login(), 1).await;
    assert_eq!(at_59.overall_code, Code::OverLimit as i32);
    let reset = at_59.statuses[0].duration_until_reset.unwrap().seconds;
    assert!(
        (1..=2).contains(&reset),
        "the first login leaves in about a second: {reset}"
    );
    // Past the minute (and its one-second bucket) the first login has left; the others stay.
    server.clock.advance_secs(2);
    let at_61 = ask(&mut c, "edge", login(), 1).await;
    assert_eq!(at_61.overall_code, Code::Ok as i32);
    assert_eq!(at_61.statuses[0].limit_remaining, 0);
    assert_eq!(
        ask(&mut c, "edge", login(), 1).await.overall_code,
        Code::OverLimit as i32
    );
}

async fn the_default_config_stops_an_exhausted_account_at_the_edge(store: support::TestStore) {
    let server = TestServer::start(store).await;
    let mut c = client(&server).await;
    let account = |id: &str| vec![descriptor(&[("account_id", id)], None)];
    let fresh = ask(&mut c, "quotad", account("newcomer"), 1).await;
    assert_eq!(fresh.overall_code, Code::Ok as i32);
    assert_eq!(
        fresh.statuses[0].limit_remaining, 15,
        "the free plan's 15 credits"
    );
    assert_eq!(
        fresh.statuses[0].current_limit.as_ref().unwrap().name,
        "plan:free"
    );

    let mut q = server.quota().await;
    let reserved = q
        .reserve(pb::ReserveRequest {
            account_id: "spent".into(),
            request_id: "r".into(),
            product: "codex".into(),
            estimate: Some(costing(15)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    q.commit(pb::CommitRequest {
        account_id: "spent".into(),
        reservation_id: reserved.reservation_id,
        usage: Some(costing(15)),
        r#final: true,
    })
    .await
    .unwrap();
    let spent = ask(&mut c, "quotad", account("spent"), 1).await;
    assert_eq!(spent.overall_code, Code::OverLimit as i32);
    let status = &spent.statuses[0];
    assert_eq!(status.limit_remaining, 0);
    assert!(status.duration_until_reset.unwrap().seconds > 0);
    // Other domains are not limited by default.
    let elsewhere = ask(&mut c, "other", account("spent"), 1).await;
    assert_eq!(elsewhere.overall_code, Code::Ok as i32);
}

async fn bad_requests_are_invalid_argument(store: support::TestStore) {
    let server = TestServer::start(store).await;
    let mut c = client(&server).await;
    for (request, message) in [
        (
            RateLimitRequest {
                domain: String::new(),
                descriptors: vec![descriptor(&[("account_id", "a")], None)],
                hits_addend: 1,
            },
            "domain: must not be empty",
        ),
        (
            RateLimitRequest {
                domain: "quotad".into(),
                descriptors: Vec::new(),
                hits_addend: 1,
            },
            "descriptors: must hold at least one descriptor",
        ),
        (
            RateLimitRequest {
                domain: "quotad".into(),
                descriptors: vec![descriptor(&[], None)],
                hits_addend: 1,
            },
            "descriptors[0].entries",
        ),
    ] {
        let err = c.should_rate_limit(request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains(message), "{}", err.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_is_unavailable_so_envoy_decides() {
    let mut redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    // Owned mode (the default) counts in memory while its lease lasts: a short one.
    let mut config = edge_config();
    config.store.redis.lease_ms = 1_000;
    let server = TestServer::start_on_redis(config, &redis.url()).await;
    let mut c = client(&server).await;
    let login = || vec![descriptor(&[("path", "/login")], None)];
    assert_eq!(
        ask(&mut c, "edge", login(), 1).await.overall_code,
        Code::Ok as i32
    );
    redis = tokio::task::spawn_blocking(move || {
        redis.kill();
        redis
    })
    .await
    .unwrap();
    // Counters are counted in memory until the owner's lease could have run out.
    let asked = std::time::Instant::now();
    let err = loop {
        let answer = c
            .should_rate_limit(RateLimitRequest {
                domain: "edge".into(),
                descriptors: login(),
                hits_addend: 0,
            })
            .await;
        match answer {
            Err(err) => break err,
            Ok(_) if asked.elapsed() < std::time::Duration::from_secs(5) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Ok(answer) => panic!("still answering 5 s after Redis went away: {answer:?}"),
        }
    };
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    drop(redis);
}
