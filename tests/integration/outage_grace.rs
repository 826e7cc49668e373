//! A real quotad process on Redis (a journal dir, `outage_grace_ms = 10000`) under steady load on a real Redis that stops answering: the
//! Redis process is paused with SIGSTOP for 5 s (its connections stay open and silent, the
//! worst kind of outage for a client) and resumed. No Reserve or Commit fails; afterwards every
//! acknowledged charge is in Redis exactly once (ledgers, windows and the usage export agree
//! with what clients were told). A second run kills quotad with SIGKILL in the middle of the
//! outage and starts it again on the same journal once Redis is back: it writes its journal
//! to Redis once, and the clients' retries act once.

use crate::support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quotad::api::pb::quota_service_client::QuotaServiceClient;
use quotad::api::pb::{self, Decision};
use support::process::Quotad;
use support::redis::{RedisServer, free_port, fresh_prefix};
use support::{ADMIN_TOKEN, CREDIT, costing};
use tonic::transport::Channel;

const ACCOUNTS: usize = 6;
const IN_FLIGHT: usize = 12;

fn account_id(n: usize) -> String {
    format!("acct-{}", n % ACCOUNTS)
}

fn env(
    redis: &RedisServer,
    prefix: &str,
    journal: &std::path::Path,
    listen: &str,
) -> Vec<(String, String)> {
    [
        ("QUOTAD_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
        ("QUOTAD_STORE__KIND", "redis".into()),
        ("QUOTAD_REDIS_URL", redis.url()),
        ("QUOTAD_STORE__REDIS__KEY_PREFIX", prefix.into()),
        ("QUOTAD_STORE__REDIS__LEASE_MS", "30000".into()),
        ("QUOTAD_STORE__REDIS__OUTAGE_GRACE_MS", "10000".into()),
        (
            "QUOTAD_STORE__REDIS__OUTAGE_CREDIT_ALLOWANCE",
            (1_000 * CREDIT).to_string(),
        ),
        (
            "QUOTAD_STORE__REDIS__JOURNAL_DIR",
            journal.display().to_string(),
        ),
        ("QUOTAD_STORE__REDIS__ADVERTISE_ADDR", listen.into()),
        ("QUOTAD_LOG_LEVEL", "info".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn start(listen: &str, env: &[(String, String)]) -> Quotad {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Quotad::start_on(listen, &[], &env)
}

/// What clients were told, per account: credits and plan usage charged, and charges.
#[derive(Default, Debug, Clone, Copy)]
struct Acknowledged {
    plan: i64,
    credit: i64,
    charges: u64,
}

/// Clients running tasks (Reserve, then Commit of one credit) until told to stop. Every call
/// that fails is counted and retried with the same ids until it is answered.
struct Load {
    acknowledged: Mutex<HashMap<String, Acknowledged>>,
    failures: Mutex<Vec<String>>,
    next: AtomicUsize,
    stop: AtomicBool,
}

impl Load {
    async fn call<T, F, Fut>(&self, what: &str, call: F) -> T
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match call().await {
                Ok(answer) => return answer.into_inner(),
                Err(status) => {
                    assert!(Instant::now() < deadline, "{what}: {status:?}");
                    self.failures.lock().unwrap().push(format!(
                        "{what}: {:?} {}",
                        status.code(),
                        status.message()
                    ));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn worker(self: Arc<Self>, client: QuotaServiceClient<Channel>) {
        while !self.stop.load(Ordering::Relaxed) {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let reserve = pb::ReserveRequest {
                account_id: account_id(n),
                request_id: format!("r-{n}"),
                product: "codex".into(),
                estimate: Some(costing(1)),
                ..Default::default()
            };
            let reserved = self
                .call("Reserve", || {
                    let (mut client, reserve) = (client.clone(), reserve.clone());
                    async move { client.reserve(reserve).await }
                })
                .await;
            assert_eq!(reserved.decision(), Decision::Allow, "{reserved:?}");
            let commit = pb::CommitRequest {
                account_id: account_id(n),
                reservation_id: reserved.reservation_id,
                usage: Some(costing(1)),
                r#final: true,
            };
            let committed = self
                .call("Commit", || {
                    let (mut client, commit) = (client.clone(), commit.clone());
                    async move { client.commit(commit).await }
                })
                .await;
            let charged = committed.charged.unwrap();
            let mut acks = self.acknowledged.lock().unwrap();
            let ack = acks.entry(account_id(n)).or_default();
            ack.plan += charged.plan_micros;
            ack.credit += charged.credit_micros;
            ack.charges += 1;
        }
    }
}

async fn setup(url: &str) {
    let mut admin = support::admin_client(url).await;
    for n in 0..ACCOUNTS {
        let account = pb::Account {
            account_id: account_id(n),
            plan: "plus".into(),
            credit_purchase_allowed: true,
        };
        admin
            .upsert_account(pb::UpsertAccountRequest {
                account: Some(account),
            })
            .await
            .unwrap();
        let grant = pb::GrantCreditsRequest {
            account_id: account_id(n),
            grant_id: format!("seed-{n}"),
            amount_micros: 5_000 * CREDIT,
            ..Default::default()
        };
        admin.grant_credits(grant).await.unwrap();
    }
}

/// Every account's ledger, windows and export agree with what clients were told.
async fn verify(url: &str, acknowledged: &HashMap<String, Acknowledged>) {
    let mut client = QuotaServiceClient::connect(url.to_owned()).await.unwrap();
    for n in 0..ACCOUNTS {
        let id = account_id(n);
        let ack = acknowledged.get(&id).copied().unwrap_or_default();
        let usage = client
            .get_usage(pb::GetUsageRequest {
                account_id: id.clone(),
                recent_limit: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let ledger = usage.ledger.unwrap();
        assert_eq!(
            ledger.granted_micros,
            ledger.balance_micros + ledger.spent_micros + ledger.expired_micros,
            "{id}: conservation"
        );
        assert_eq!(ledger.spent_micros, ack.credit, "{id}: credits charged");
        for window in &usage.windows {
            assert_eq!(
                window.used_micros - window.held_micros,
                ack.plan,
                "{id}: plan usage"
            );
        }
        assert!(usage.holds.is_empty(), "{id}: every task was committed");
    }
    let mut admin = support::admin_client(url).await;
    let expected: u64 = acknowledged.values().map(|a| a.charges).sum();
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    let mut delivered = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered < expected {
        assert!(
            Instant::now() < deadline,
            "export: {delivered} of {expected}"
        );
        let events = support::export_batch(&mut admin, 600_000, false).await;
        if events.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        delivered += events.len() as u64;
        for e in events {
            seen.entry(e.account_id)
                .or_default()
                .push(e.event.unwrap().seq);
        }
    }
    assert_eq!(delivered, expected, "no event twice");
    for (id, ack) in acknowledged {
        let mut seqs = seen.remove(id).unwrap_or_default();
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=ack.charges).collect::<Vec<_>>(),
            "{id}: one event per charge"
        );
    }
}

/// Runs the load on quotad; `outage` is called a second into it (with the quotad process, which
/// it may replace) and the load stops two seconds after it returns.
async fn under_load(kill_in_outage: bool) -> (Vec<String>, HashMap<String, Acknowledged>, Quotad) {
    let redis = Arc::new(
        tokio::task::spawn_blocking(RedisServer::start)
            .await
            .unwrap(),
    );
    let journal = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let env = env(&redis, &fresh_prefix(), journal.path(), &listen);
    let (l, e) = (listen.clone(), env.clone());
    let mut quotad = tokio::task::spawn_blocking(move || start(&l, &e))
        .await
        .unwrap();
    let url = quotad.url();
    setup(&url).await;
    let load = Arc::new(Load {
        acknowledged: Mutex::default(),
        failures: Mutex::default(),
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    });
    let channel = Channel::from_shared(url.clone()).unwrap().connect_lazy();
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            tokio::spawn(
                load.clone()
                    .worker(QuotaServiceClient::new(channel.clone())),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = load.next.load(Ordering::Relaxed);
    redis.signal("STOP");
    if kill_in_outage {
        tokio::time::sleep(Duration::from_secs(2)).await;
        quotad.signal("KILL");
        quotad.wait();
        let journal_log = quotad.output();
        assert!(
            journal_log.contains("deciding from memory"),
            "{journal_log}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        redis.signal("CONT");
        let (l, e) = (listen.clone(), env.clone());
        quotad = tokio::task::spawn_blocking(move || start(&l, &e))
            .await
            .unwrap();
        assert!(
            quotad
                .output()
                .contains("writing the outage journal left by the last run"),
            "{}",
            quotad.output()
        );
    } else {
        tokio::time::sleep(Duration::from_secs(5)).await;
        redis.signal("CONT");
    }
    let during = load.next.load(Ordering::Relaxed) - before;
    assert!(
        during > 20,
        "the load went on during the outage: {during} tasks"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let failures = load.failures.lock().unwrap().clone();
    let acknowledged = load.acknowledged.lock().unwrap().clone();
    verify(&quotad.url(), &acknowledged).await;
    drop(journal);
    (failures, acknowledged, quotad)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_for_five_seconds_fails_no_call_and_loses_nothing() {
    let (failures, acknowledged, quotad) = under_load(false).await;
    assert!(
        failures.is_empty(),
        "calls failed during the outage: {failures:?}"
    );
    let charges: u64 = acknowledged.values().map(|a| a.charges).sum();
    assert!(charges > 50, "{charges} charges");
    let log = quotad.output();
    assert!(log.contains("deciding from memory"), "{log}");
    assert!(log.contains("every journaled decision is written"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_killed_in_an_outage_replays_its_journal_once() {
    let (failures, _, quotad) = under_load(true).await;
    // Calls in flight when quotad was killed, and those made while it was down, failed and
    // were retried with the same ids: each acted once (verified above).
    assert!(!failures.is_empty(), "the kill was seen by clients");
    assert!(
        quotad
            .output()
            .contains("the outage journal is written to Redis")
    );
}
