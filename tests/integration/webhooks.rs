//! Notifications delivered as signed webhooks to a real HTTP receiver (hyper, on a loopback
//! port) by a real quotad, on the memory store and on Redis: the 5-hour window used up, credits
//! running low with auto top-up off, an auto top-up bought, declined three times and turned
//! off. Each event arrives once per occurrence (by id): the receiver answers 500 to the first
//! delivery of every id, and the only duplicates are that id's retry, with the same body and a
//! valid signature. Time moves by quotad's manual clock, never by sleeping through it.

use crate::support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use quotad::api::pb;
use quotad::config::{Config, PaymentProviderKind};
use support::billing::{Answer, billing_service};
use support::webhooks::{Receiver, receiver};
use support::{CREDIT, QuotaClient, TestServer, TestStore};

const SECRET: &str = "the receiver's webhook secret";

fn config(webhook_url: &str, billing_url: &str) -> Config {
    let mut config = Config::default();
    config.notifications.webhook_url = Some(webhook_url.to_owned());
    config.notifications.hmac_secret = Some(SECRET.into());
    config.notifications.retry_first_delay_ms = 20;
    config.notifications.retry_max_delay_ms = 200;
    config.payments.provider = PaymentProviderKind::Http;
    config.payments.http_url = Some(billing_url.to_owned());
    config.payments.retry_first_delay_ms = 20;
    config
}

/// Reserves and commits exactly `credits` credits on codex.
async fn spend(q: &mut QuotaClient, account: &str, request: &str, credits: u64) {
    let reserved = q
        .reserve(support::reserve_request(account, request, "codex", credits))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reserved.decision(), pb::Decision::Allow, "{reserved:?}");
    let commit = pb::CommitRequest {
        account_id: account.into(),
        reservation_id: reserved.reservation_id,
        usage: Some(support::costing(credits)),
        r#final: true,
    };
    q.commit(commit).await.unwrap();
}

/// A Reserve and its release: a change that runs the auto top-up trigger, spending nothing.
async fn touch(q: &mut QuotaClient, account: &str, request: &str) {
    let reserved = q
        .reserve(support::reserve_request(account, request, "codex", 1))
        .await
        .unwrap()
        .into_inner();
    let release = pb::ReleaseRequest {
        account_id: account.into(),
        reservation_id: reserved.reservation_id,
    };
    q.release(release).await.unwrap();
}

/// Waits until the receiver has accepted `n` event ids.
async fn accepted(receiver: &Receiver, n: usize) -> Vec<String> {
    let started = Instant::now();
    loop {
        let ids = receiver.accepted_ids();
        if ids.len() >= n {
            return ids;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{} of {n} events accepted: {:#?}",
            ids.len(),
            receiver.deliveries()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn top_up_outcome(q: &mut QuotaClient, account: &str, declines: u32) {
    support::usage_until(q, account, |u| {
        u.auto_top_up.as_ref().is_some_and(|t| {
            t.consecutive_declines == declines && t.in_flight_purchase_id.is_empty()
        })
    })
    .await;
}

async fn every_event_once_per_occurrence(store: TestStore) {
    let (webhook_url, receiver) = receiver(SECRET).await;
    let (billing_url, billing) = billing_service().await;
    billing.answers(&[
        Answer::Approve,
        Answer::Decline,
        Answer::Decline,
        Answer::Decline,
    ]);
    let server = TestServer::start_with(config(&webhook_url, &billing_url), store).await;
    let mut q = server.quota().await;
    let mut admin = server.admin().await;
    support::plus_account(&server, "w").await;
    let grant = pb::GrantCreditsRequest {
        account_id: "w".into(),
        grant_id: "seed".into(),
        amount_micros: 20 * CREDIT,
        ..Default::default()
    };
    admin.grant_credits(grant).await.unwrap();

    // The plus plan's 5-hour window (150 credits) used up, then credits from 20 to 5 and 4:
    // window.exhausted once, credits.low once.
    spend(&mut q, "w", "plan", 150).await;
    spend(&mut q, "w", "c1", 15).await;
    spend(&mut q, "w", "c2", 1).await;
    // Auto top-up on below its threshold buys back to 30 (approved); spending to 5 buys again,
    // declined; an hour later again, declined; and again: three in a row turn it off.
    let settings = pb::SetAutoTopUpRequest {
        account_id: "w".into(),
        enabled: true,
        threshold_micros: 10 * CREDIT,
        target_micros: 30 * CREDIT,
        monthly_cap_micros: 0,
    };
    admin.set_auto_top_up(settings).await.unwrap();
    support::usage_until(&mut q, "w", |u| u.credit_balance_micros == 30 * CREDIT).await;
    spend(&mut q, "w", "c3", 25).await;
    top_up_outcome(&mut q, "w", 1).await;
    for declines in [2, 3] {
        server.clock.advance_secs(3_600);
        touch(&mut q, "w", &format!("touch{declines}")).await;
        top_up_outcome(&mut q, "w", declines).await;
    }

    let ids = accepted(&receiver, 7).await;
    // Nothing more comes: each accepted event was forgotten, and nothing fired twice.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let deliveries = receiver.deliveries();
    assert_eq!(receiver.accepted_ids(), ids, "{deliveries:#?}");
    let types: Vec<&str> = ids
        .iter()
        .map(|id| {
            let d = deliveries.iter().find(|d| d.body["id"] == *id.as_str());
            d.unwrap().body["type"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        types,
        [
            "window.exhausted",
            "credits.low",
            "top_up.succeeded",
            "top_up.declined",
            "top_up.declined",
            "top_up.declined",
            "top_up.disabled",
        ],
        "one event per occurrence, in order"
    );
    let expected_ids: Vec<String> = (1..=7).map(|n| format!("ntf:w:{n}")).collect();
    assert_eq!(ids, expected_ids);

    let mut by_id: BTreeMap<String, Vec<&support::webhooks::Delivery>> = BTreeMap::new();
    for d in &deliveries {
        assert!(d.signature_valid, "signed over its body: {d:?}");
        let id = d.body["id"].as_str().unwrap().to_owned();
        assert_eq!(d.idempotency_key, id, "the event id is the idempotency key");
        by_id.entry(id).or_default().push(d);
    }
    for (id, tries) in &by_id {
        // Retried after the 500: the first try failed, a later one landed; every try the
        // same event, byte for byte.
        assert_eq!(tries[0].status, 500, "{id}: {tries:#?}");
        assert!(tries[1..].iter().any(|d| d.status == 200), "{id}");
        assert!(
            tries.iter().all(|d| d.raw_body == tries[0].raw_body),
            "{id}: {tries:#?}"
        );
        assert_eq!(
            tries.iter().filter(|d| d.status == 200).count(),
            1,
            "{id} accepted once, then forgotten"
        );
    }
    let mut forged = deliveries[0].clone();
    forged.raw_body = forged.raw_body.replace("\"w\"", "\"x\"");
    assert!(!support::webhooks::signature_is_valid(
        SECRET,
        &forged.signature,
        &forged.raw_body
    ));

    // What each says, in integer micro-credits.
    let body = |n: usize| {
        let id = format!("ntf:w:{n}");
        (deliveries.iter().find(|d| d.body["id"] == *id.as_str()))
            .unwrap()
            .body
            .clone()
    };
    let window = body(1);
    assert_eq!(window["account_id"], "w");
    assert_eq!(window["window"], "5h");
    assert_eq!(window["used_micros"], 150 * CREDIT);
    assert_eq!(window["limit_micros"], 150 * CREDIT);
    assert_eq!(window["at"], "2026-11-24T22:00:00.000Z");
    let low = body(2);
    assert_eq!(low["balance_micros"], 5 * CREDIT);
    assert_eq!(low["threshold_micros"], 10 * CREDIT);
    let bought = body(3);
    assert_eq!(bought["purchase_id"], "topup:w:1");
    assert_eq!(bought["amount_micros"], 26 * CREDIT);
    assert_eq!(bought["balance_micros"], 30 * CREDIT);
    assert_eq!(bought["payment_id"], "pay_topup:w:1");
    let declined = body(6);
    assert_eq!(declined["consecutive_declines"], 3);
    assert_eq!(declined["error"], "card declined");
    assert_eq!(declined["at"], "2026-11-25T00:00:00.000Z");
    let off = body(7);
    assert_eq!(off["consecutive_declines"], 3);
    assert!(
        off["error"]
            .as_str()
            .unwrap()
            .contains("turned off after 3 declines"),
        "{off}"
    );
    server.stop().await;
}

support::on_every_store!(every_event_once_per_occurrence);

/// An event the receiver never took outlives the quotad that recorded it: the next quotad on
/// the same Redis posts it, with the same id and the same body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_event_outlives_a_restart_with_its_id() {
    let redis = tokio::task::spawn_blocking(support::redis::RedisServer::start)
        .await
        .unwrap();
    let (webhook_url, receiver) = receiver(SECRET).await;
    receiver.set_down(true);
    let mut config = Config::default();
    config.notifications.webhook_url = Some(webhook_url);
    config.notifications.hmac_secret = Some(SECRET.into());
    config.notifications.retry_first_delay_ms = 20;
    config.notifications.retry_max_delay_ms = 200;
    // The next quotad takes the partitions soon after the first one is gone.
    config.store.redis.lease_ms = 1_000;
    let server = TestServer::start_on_redis(config.clone(), &redis.url()).await;
    let mut q = server.quota().await;
    // The free plan's 5-hour window (15 credits) used up: one event, refused while it is down.
    spend(&mut q, "f", "all", 15).await;
    let started = Instant::now();
    while receiver.deliveries().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(10), "never posted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
    let first = receiver.deliveries()[0].clone();
    assert_eq!(first.body["id"], "ntf:f:1");

    receiver.set_down(false);
    let server = TestServer::start_on_redis(config, &redis.url()).await;
    assert_eq!(accepted(&receiver, 1).await, ["ntf:f:1"]);
    let deliveries = receiver.deliveries();
    let landed = deliveries.iter().find(|d| d.status == 200).unwrap();
    assert_eq!(landed.raw_body, first.raw_body, "the same event");
    assert!(deliveries.iter().all(|d| d.signature_valid));
    server.stop().await;
}
