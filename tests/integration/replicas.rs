//! Three real quotad processes on one real Redis (and on a real 3-master Redis Cluster), driven
//! concurrently on the same accounts: hundreds of Reserve/Commit/Release calls spread over all
//! replicas, every one retried with the same key on another replica. Afterwards, for every
//! account, credits are conserved exactly, what was acknowledged is exactly what was charged
//! (each retry acted once), no window is over its limit and no balance below zero. One variant
//! kills a replica with SIGKILL in the middle of the load and starts it again. The usage
//! export then holds exactly one event per acknowledged charge, read by a consumer group.
//!
//! Leases are 1 s long: each account is decided by the replica owning its partition, and every
//! call that reaches another replica is forwarded there; a killed owner's partitions move once
//! its lease runs out, a replica that joins takes its share and one that leaves (SIGTERM)
//! hands its share over.

use crate::support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quotad::api::pb::admin_service_client::AdminServiceClient;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use quotad::api::pb::{self, Decision};
use support::fault_proxy::{FaultProxy, Link};
use support::process::Quotad;
use support::redis::{RedisCluster, RedisServer, fresh_prefix};
use support::{ADMIN_TOKEN, BearerToken, CREDIT, costing};
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use tonic::{Code, Status};

const REPLICAS: usize = 3;
const OPERATIONS: usize = 360;
const IN_FLIGHT: usize = 48;
const PLUS: [&str; 6] = ["p0", "p1", "p2", "p3", "p4", "p5"];
const FREE: [&str; 3] = ["f0", "f1", "f2"];

/// Where the replicas keep their state.
enum Backend<'a> {
    Standalone(&'a RedisServer),
    Cluster(&'a RedisCluster),
}

fn replica_env(backend: &Backend<'_>, prefix: &str) -> Vec<(String, String)> {
    let mut env = vec![
        ("QUOTAD_ADMIN_TOKEN".to_string(), ADMIN_TOKEN.to_string()),
        ("QUOTAD_STORE__KIND".into(), "redis".into()),
        ("QUOTAD_STORE__REDIS__KEY_PREFIX".into(), prefix.into()),
        // Debug builds on a loaded 2-core machine: this test is about correctness, not latency.
        (
            "QUOTAD_STORE__REDIS__COMMAND_TIMEOUT_MS".into(),
            "3000".into(),
        ),
        // Each landed batch at debug: when a replica last answered for a partition it never
        // logged giving up (killed, or stalled past its lease and not yet told).
        (
            "QUOTAD_LOG_LEVEL".into(),
            "info,quotad::store::redis::owned=debug".into(),
        ),
        ("QUOTAD_STORE__REDIS__LEASE_MS".into(), "1000".into()),
    ];
    match backend {
        Backend::Standalone(server) => {
            env.push(("QUOTAD_REDIS_URL".into(), server.url()));
        }
        Backend::Cluster(cluster) => {
            let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("{u:?}")).collect();
            env.push((
                "QUOTAD_STORE__REDIS__CLUSTER_NODES".into(),
                format!("[{}]", nodes.join(",")),
            ));
        }
    }
    env
}

/// Starts a replica on `listen` (`127.0.0.1:0`: a free port of its own), advertising the
/// address it listens on (the others forward calls there).
fn start(listen: &str, env: &[(String, String)]) -> Quotad {
    let listen = match listen {
        "127.0.0.1:0" => format!("127.0.0.1:{}", support::redis::free_port()),
        other => other.to_owned(),
    };
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.push(("QUOTAD_STORE__REDIS__ADVERTISE_ADDR", &listen));
    Quotad::start_on(&listen, &[], &env)
}

/// `REPLICAS` replicas with the same settings, each on a free port of its own.
async fn start_replicas(env: Vec<(String, String)>) -> Vec<Quotad> {
    tokio::task::spawn_blocking(move || (0..REPLICAS).map(|_| start("127.0.0.1:0", &env)).collect())
        .await
        .unwrap()
}

/// Clients of every replica; a call goes to its first choice and fails over to the others.
#[derive(Clone)]
struct Replicas {
    quota: Vec<QuotaServiceClient<Channel>>,
}

/// Whether another replica may answer: the replica could not, or the connection to it failed
/// (a replica that leaves sends GOAWAY, which can meet a request already on its way and reach
/// the client as `INTERNAL` from its own transport). Request ids make every retry act once.
fn retryable(s: &Status) -> bool {
    let transport = std::error::Error::source(s).is_some_and(|e| e.is::<tonic::transport::Error>());
    transport
        || matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
        )
}

impl Replicas {
    fn connect(urls: &[String]) -> Replicas {
        let quota = urls
            .iter()
            .map(|u| {
                QuotaServiceClient::new(Channel::from_shared(u.clone()).unwrap().connect_lazy())
            })
            .collect();
        Replicas { quota }
    }

    /// Runs `call` on replica `first`, then on the others while the replica cannot answer.
    async fn call<T, F, Fut>(&self, first: usize, call: F) -> T
    where
        F: Fn(QuotaServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        // Long enough for a killed owner's partitions to move (a lease of 1 s).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        for attempt in 0.. {
            if std::time::Instant::now() > deadline {
                break;
            }
            let client = self.quota[(first + attempt) % REPLICAS].clone();
            match call(client).await {
                Ok(response) => return response.into_inner(),
                Err(s) if retryable(&s) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(s) => panic!("unexpected error: {s:?}"),
            }
        }
        panic!("no replica answered");
    }
}

/// What the client was told, per account.
#[derive(Default, Debug)]
struct Acknowledged {
    charged_plan: i64,
    charged_credit: i64,
    open_holds: usize,
    /// Commits that charged something.
    charges: u64,
}

async fn drive(
    replicas: Replicas,
    operations: usize,
    mut on_third: impl FnMut() + Send,
) -> HashMap<String, Acknowledged> {
    let acknowledged: Arc<Mutex<HashMap<String, Acknowledged>>> = Arc::default();
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut tasks = Vec::new();
    for op in 0..operations {
        if op == operations / 3 {
            on_third();
        }
        let permit = gate.clone().acquire_owned().await.unwrap();
        let (replicas, acknowledged) = (replicas.clone(), acknowledged.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            one_task(op, &replicas, &acknowledged).await;
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    Arc::try_unwrap(acknowledged).unwrap().into_inner().unwrap()
}

/// One frontend task: reserve (and the same reserve again, elsewhere), then commit, release or
/// abandon it (and the same call again, elsewhere).
async fn one_task(
    op: usize,
    replicas: &Replicas,
    acknowledged: &Mutex<HashMap<String, Acknowledged>>,
) {
    let account = if op.is_multiple_of(4) {
        FREE[op % FREE.len()]
    } else {
        PLUS[op % PLUS.len()]
    };
    let product = if op.is_multiple_of(11) {
        "workspace_agents"
    } else {
        "codex"
    };
    let estimate = 2 + (op as u64 * 7) % 11;
    let replica = op % REPLICAS;
    let request = pb::ReserveRequest {
        account_id: account.into(),
        request_id: format!("req-{op}"),
        product: product.into(),
        estimate: Some(costing(estimate)),
        ..Default::default()
    };
    let reserve = |first: usize| {
        let request = request.clone();
        replicas.call(first, move |mut c| {
            let request = request.clone();
            async move { c.reserve(request).await }
        })
    };
    let first = reserve(replica).await;
    let retry = reserve(replica + 1).await;
    assert_eq!(
        first.reservation_id, retry.reservation_id,
        "op {op}: a retried Reserve acted twice"
    );
    assert_eq!(first.decision, retry.decision);
    if first.decision() != Decision::Allow {
        return;
    }
    let id = first.reservation_id;
    match op % 10 {
        0..=6 => {
            let used = 1 + (op as u64 * 13) % estimate;
            let commit = pb::CommitRequest {
                account_id: account.into(),
                reservation_id: id,
                usage: Some(costing(used)),
                r#final: true,
            };
            let call = |first: usize| {
                let commit = commit.clone();
                replicas.call(first, move |mut c| {
                    let commit = commit.clone();
                    async move { c.commit(commit).await }
                })
            };
            let once = call(replica + 1).await;
            let again = call(replica + 2).await;
            assert_eq!(
                once.charged, again.charged,
                "op {op}: a retried Commit acted twice"
            );
            let charged = once.charged.unwrap();
            assert_eq!(
                charged.plan_micros + charged.credit_micros,
                used as i64 * CREDIT
            );
            let mut acks = acknowledged.lock().unwrap();
            let ack = acks.entry(account.into()).or_default();
            ack.charged_plan += charged.plan_micros;
            ack.charged_credit += charged.credit_micros;
            ack.charges += 1;
        }
        7 | 8 => {
            let release = pb::ReleaseRequest {
                account_id: account.into(),
                reservation_id: id,
            };
            let call = |first: usize| {
                let release = release.clone();
                replicas.call(first, move |mut c| {
                    let release = release.clone();
                    async move { c.release(release).await }
                })
            };
            let once = call(replica + 2).await;
            let again = call(replica).await;
            assert_eq!(
                once.released, again.released,
                "op {op}: a retried Release acted twice"
            );
        }
        _ => {
            acknowledged
                .lock()
                .unwrap()
                .entry(account.into())
                .or_default()
                .open_holds += 1
        }
    }
}

async fn setup_accounts(url: &str) {
    let mut admin = support::admin_client(url).await;
    for (plans, plan) in [(&PLUS[..], "plus"), (&FREE[..], "free")] {
        for id in plans {
            let account = pb::Account {
                account_id: id.to_string(),
                plan: plan.into(),
                credit_purchase_allowed: true,
            };
            admin
                .upsert_account(pb::UpsertAccountRequest {
                    account: Some(account),
                })
                .await
                .unwrap();
        }
    }
    for id in PLUS {
        let grant = pb::GrantCreditsRequest {
            account_id: id.into(),
            grant_id: format!("seed-{id}"),
            amount_micros: 40 * CREDIT,
            ..Default::default()
        };
        admin.grant_credits(grant).await.unwrap();
    }
}

/// Everything every account shows agrees with what the clients were told.
async fn verify(url: &str, acknowledged: &HashMap<String, Acknowledged>) {
    // Past the usage staleness bound, so every answer comes from Redis.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut client = QuotaServiceClient::connect(url.to_owned()).await.unwrap();
    for id in PLUS.iter().chain(FREE.iter()) {
        // A partition may be moving (its owner just lost Redis); asked again.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let usage = loop {
            let read = client
                .get_usage(pb::GetUsageRequest {
                    account_id: id.to_string(),
                    recent_limit: 0,
                })
                .await;
            match read {
                Ok(usage) => break usage.into_inner(),
                Err(s) if retryable(&s) && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(s) => panic!("{id}: {s:?}"),
            }
        };
        let ledger = usage.ledger.unwrap();
        let ack = acknowledged.get(*id).map_or((0, 0, 0), |a| {
            (a.charged_plan, a.charged_credit, a.open_holds)
        });
        assert_eq!(
            ledger.granted_micros,
            ledger.balance_micros + ledger.spent_micros + ledger.expired_micros,
            "{id}: conservation"
        );
        assert_eq!(
            ledger.spent_micros, ack.1,
            "{id}: credits charged = credits acknowledged"
        );
        assert!(
            ledger.balance_micros >= 0 && ledger.available_micros >= 0,
            "{id}: credits overspent: {ledger:?}"
        );
        for window in &usage.windows {
            assert_eq!(
                window.used_micros - window.held_micros,
                ack.0,
                "{id}: plan usage = plan usage acknowledged"
            );
            assert!(
                window.used_micros <= window.limit_micros,
                "{id}: {window:?} over its limit"
            );
        }
        assert_eq!(
            usage.holds.len(),
            ack.2,
            "{id}: abandoned holds are still there"
        );
    }
}

/// A consumer group reads the usage export until it holds every charge: exactly the charges
/// acknowledged, each account's numbered 1..=n, none twice.
async fn verify_export(url: &str, acknowledged: &HashMap<String, Acknowledged>, killed: bool) {
    let mut admin = support::admin_client(url).await;
    let expected: u64 = acknowledged.values().map(|a| a.charges).sum();
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    let mut deliveries = 0;
    // On this standalone Redis, Commits write the export themselves; consumers may lag.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let distinct = |seen: &HashMap<String, Vec<u64>>| {
        let mut n = 0;
        for seqs in seen.values() {
            let mut seqs = seqs.clone();
            seqs.sort_unstable();
            seqs.dedup();
            n += seqs.len() as u64;
        }
        n
    };
    while distinct(&seen) < expected {
        assert!(
            std::time::Instant::now() < deadline,
            "export has {seen:?}, expected {expected} events"
        );
        let events = support::export_batch(&mut admin, 60_000, true).await;
        if events.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        deliveries += events.len();
        for e in events {
            let event = e.event.unwrap();
            assert_eq!(event.event_id, format!("{}:{}", e.account_id, event.seq));
            seen.entry(e.account_id).or_default().push(event.seq);
        }
    }
    for (account, ack) in acknowledged {
        let mut seqs = seen.remove(account).unwrap_or_default();
        seqs.sort_unstable();
        seqs.dedup(); // as consumers do, by event id
        assert_eq!(
            seqs,
            (1..=ack.charges).collect::<Vec<_>>(),
            "{account}: one event per charge"
        );
    }
    assert!(seen.is_empty(), "events of unknown accounts: {seen:?}");
    // At least once allows a copy twice if a relay dies between copying and deleting, which
    // only a killed replica can do.
    if !killed {
        assert_eq!(deliveries as u64, expected, "an event delivered twice");
    }
}

/// What happens to one replica a third of the way through the load.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// SIGKILL, then started again on the same port.
    Kill,
    /// SIGSTOP for 2.5 s (past an owned-mode lease of 1 s), then SIGCONT.
    Pause,
    /// Its link to Redis (through a fault proxy) in this state for 3 s, then restored.
    Link(Link),
    /// A fourth replica joins, and then this one leaves (SIGTERM: it drains, gives its
    /// partitions up and leaves the membership).
    JoinLeave,
}

async fn replicated_load(backend: Backend<'_>, fault: Fault) {
    let kill_one = fault == Fault::Kill;
    let env = replica_env(&backend, &fresh_prefix());
    // The victim's link to Redis goes through a proxy the test can cut.
    let proxy = match (&backend, fault) {
        (Backend::Standalone(server), Fault::Link(_)) => {
            Some(Arc::new(FaultProxy::start(server.port).await))
        }
        _ => None,
    };
    let mut victim_env = env.clone();
    if let Some(proxy) = &proxy {
        victim_env.retain(|(key, _)| key != "QUOTAD_REDIS_URL");
        victim_env.push(("QUOTAD_REDIS_URL".into(), proxy.url()));
    }
    let env_for_start = env.clone();
    let mut procs = tokio::task::spawn_blocking(move || {
        (0..REPLICAS)
            .map(|i| {
                let env = if i == 1 { &victim_env } else { &env_for_start };
                Some(start("127.0.0.1:0", env))
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let urls: Vec<String> = procs.iter().flatten().map(Quotad::url).collect();
    // Every replica joins and takes its share (a few rounds of a third of a lease each), so
    // that the fault hits an owner.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    setup_accounts(&urls[0]).await;
    let replicas = Replicas::connect(&urls);

    let victim_addr = procs[1].as_ref().unwrap().addr.clone();
    let mut victim = match fault {
        Fault::Kill | Fault::Pause | Fault::JoinLeave => procs[1].take(),
        Fault::None | Fault::Link(_) => None,
    };
    // Kept until the end: the proxy stops listening when dropped.
    let _proxy = proxy.clone();
    let cut = Arc::new(Mutex::new(None::<std::thread::JoinHandle<()>>));
    let cut_in = cut.clone();
    let killed = Arc::new(Mutex::new(None::<std::thread::JoinHandle<Quotad>>));
    let killed_in = killed.clone();
    // The log of the killed replica, and when it was killed (wall clock, ms).
    let dead: Arc<Mutex<Option<String>>> = Arc::default();
    let dead_in = dead.clone();
    // Long enough for a replica to join and another to leave while the load runs.
    let operations = if fault == Fault::JoinLeave {
        OPERATIONS * 6
    } else {
        OPERATIONS
    };
    let acknowledged = drive(replicas, operations, move || {
        if let (Fault::Link(link), Some(proxy)) = (fault, proxy.clone()) {
            proxy.set(link);
            *cut_in.lock().unwrap() = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(3));
                proxy.set(Link::Pass);
            }));
            return;
        }
        if fault == Fault::JoinLeave {
            let leaving = victim.take().unwrap();
            let env = env.clone();
            let dead_in = dead_in.clone();
            *killed_in.lock().unwrap() = Some(std::thread::spawn(move || {
                let joined = start("127.0.0.1:0", &env);
                // The newcomer takes its share at the others' next rounds, under load.
                std::thread::sleep(Duration::from_millis(1_000));
                let mut leaving = leaving;
                leaving.signal("TERM");
                let status = leaving.wait();
                assert!(
                    status.success(),
                    "a replica that leaves exits cleanly: {status:?}"
                );
                *dead_in.lock().unwrap() = Some(leaving.output());
                joined
            }));
            return;
        }
        if fault == Fault::Pause {
            let paused = victim.take().unwrap();
            paused.signal("STOP");
            *killed_in.lock().unwrap() = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(2_500));
                paused.signal("CONT");
                paused
            }));
            return;
        }
        if !kill_one {
            return;
        }
        let mut old = victim.take().unwrap();
        old.signal("KILL");
        old.wait();
        *dead_in.lock().unwrap() = Some(old.output());
        let (addr, env) = (victim_addr.clone(), env.clone());
        // Start it again on the same port while the load goes on.
        *killed_in.lock().unwrap() = Some(std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            start(&addr, &env)
        }));
    })
    .await;
    let during_load = killed.lock().unwrap().as_ref().map(|h| h.is_finished());
    let restarted = killed.lock().unwrap().take().map(|h| h.join().unwrap());
    if fault == Fault::JoinLeave {
        assert_eq!(
            during_load,
            Some(true),
            "the join and the leave came under load"
        );
        let joined = restarted.as_ref().unwrap().output();
        assert!(
            joined.contains("took a partition"),
            "the newcomer took its share"
        );
        let left = dead.lock().unwrap().clone().unwrap();
        assert!(
            procs
                .iter()
                .flatten()
                .any(|p| p.output().contains("gave a partition up")),
            "the others handed partitions to the newcomer"
        );
        assert!(
            left.contains("answered for a partition"),
            "the leaver let its partitions go"
        );
    }
    let restore = cut.lock().unwrap().take();
    if let Some(restore) = restore {
        restore.join().unwrap();
        // Back on Redis, the replica answers like the others (once its share is back).
        let victim = procs[1].as_ref().unwrap();
        verify(&victim.url(), &acknowledged).await;
        if matches!(fault, Fault::Link(Link::Blackhole | Link::Reset)) {
            // Told at its first ownership round that reaches Redis again, which may come after
            // a round sent into the cut has timed out.
            victim
                .until_logged("cut off past its leases, it lost its partitions", |l| {
                    l.contains("lost a partition to another replica")
                })
                .await;
        }
    }
    verify(&urls[0], &acknowledged).await;
    if let Some(replica) = &restarted {
        verify(&replica.url(), &acknowledged).await;
    }
    verify_export(&urls[2], &acknowledged, kill_one).await;
    let total: usize = acknowledged.values().map(|a| a.open_holds).sum();
    assert!(total > 0, "the load left some holds open");
    let mut logs: Vec<String> = procs.iter().flatten().map(|p| p.output()).collect();
    logs.extend(restarted.iter().map(|p| p.output()));
    logs.extend(dead.lock().unwrap().take());
    partitions_answered_one_replica_at_a_time(&logs);
}

/// From the replicas' logs: for every partition, the intervals in which replicas
/// answered for it, from taking its lease to the last batch of it that landed (both by Redis's
/// clock), never overlap, in the order of their epochs. A partition a replica never logged as
/// given up (it was killed, or it stalled past its lease and had not been told yet when the test
/// ended) counts until the last batch of it the replica saw land. A batch that landed as the
/// replica died, its answer unread, is not seen, so the check can miss an overlap there but
/// never reports one that did not happen.
fn partitions_answered_one_replica_at_a_time(logs: &[String]) {
    let field = |line: &str, name: &str| -> Option<i64> {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        line[at..].split_whitespace().next()?.parse().ok()
    };
    // (partition, epoch) -> (from, to)
    let mut intervals: HashMap<(i64, i64), (i64, i64)> = HashMap::new();
    let mut landed = 0;
    for log in logs {
        // (partition, epoch) -> (taken, last landed)
        let mut open: HashMap<(i64, i64), (i64, i64)> = HashMap::new();
        for line in log.lines() {
            let line = strip_ansi(line);
            let (Some(partition), Some(epoch)) = (field(&line, "partition"), field(&line, "epoch"))
            else {
                continue;
            };
            if line.contains("took a partition") {
                let from = field(&line, "from_ms").unwrap();
                open.insert((partition, epoch), (from, from));
            } else if line.contains("a batch landed") {
                let at = field(&line, "at_ms").unwrap();
                landed += 1;
                if let Some((_, to)) = open.get_mut(&(partition, epoch)) {
                    *to = (*to).max(at);
                }
            } else if line.contains("answered for a partition") {
                let from = field(&line, "from_ms").unwrap();
                let to = field(&line, "to_ms").unwrap();
                open.remove(&(partition, epoch));
                assert!(intervals.insert((partition, epoch), (from, to)).is_none());
            }
        }
        for (key, interval) in open {
            assert!(intervals.insert(key, interval).is_none(), "{key:?} twice");
        }
    }
    assert!(landed > 0, "the replicas logged their batches landing");
    let mut by_partition: HashMap<i64, Vec<(i64, i64, i64)>> = HashMap::new();
    for ((partition, epoch), (from, to)) in &intervals {
        by_partition
            .entry(*partition)
            .or_default()
            .push((*from, *to, *epoch));
    }
    assert!(
        by_partition.len() >= 64,
        "every partition was taken: {}",
        by_partition.len()
    );
    let mut moved = 0;
    for (partition, mut answered) in by_partition {
        answered.sort_by_key(|&(_, _, epoch)| epoch);
        for pair in answered.windows(2) {
            let ((_, to, epoch), (from, _, next_epoch)) = (pair[0], pair[1]);
            assert!(
                from >= to,
                "partition {partition}: epoch {next_epoch} answered from {from}, before epoch \
                 {epoch} stopped at {to}: {answered:?}"
            );
            moved += 1;
        }
    }
    assert!(moved > 0, "some partition moved between replicas");
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_on_one_redis_agree() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    replicated_load(Backend::Standalone(&server), Fault::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_mid_load_loses_nothing_acknowledged() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    replicated_load(Backend::Standalone(&server), Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_on_a_redis_cluster_agree() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    replicated_load(Backend::Cluster(&cluster), Fault::Kill).await;
}

/// Under load, a fourth replica joins and takes its share of the partitions, then one of the
/// first three leaves (SIGTERM) and hands its partitions over: nothing acknowledged is lost or
/// counted twice, and no two replicas answered for a partition at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_joins_and_another_leaves_under_load() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    replicated_load(Backend::Standalone(&server), Fault::JoinLeave).await;
}

/// An owner whose link to Redis is black-holed (connections open, nothing arrives), reset, or
/// slowed, for 3 s under load: it stops deciding before its leases could run out, the others
/// take its partitions, and once the link is back it takes its share again; everything
/// acknowledged is in Redis once, and no two replicas answered for a partition at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_cut_off_from_redis_loses_nothing_acknowledged() {
    for link in [
        Link::Blackhole,
        Link::Reset,
        Link::Delay(Duration::from_millis(400)),
    ] {
        let server = tokio::task::spawn_blocking(RedisServer::start)
            .await
            .unwrap();
        replicated_load(Backend::Standalone(&server), Fault::Link(link)).await;
    }
}

/// An owner paused past its lease (SIGSTOP) loses its partitions to the others while the load
/// goes on; resumed, it decides nothing under the leases it lost (its writes would be fenced),
/// and everything acknowledged by anyone is in Redis once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_paused_past_its_lease_loses_nothing_acknowledged() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    replicated_load(Backend::Standalone(&server), Fault::Pause).await;
}

/// Many parallel commits on one account, over three replicas on one Redis, cross the auto
/// top-up threshold together: exactly one purchase, and after it settles available credits are
/// back above the threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_commits_across_replicas_buy_exactly_once() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let env = replica_env(&Backend::Standalone(&server), &fresh_prefix());
    let procs = start_replicas(env).await;
    let urls: Vec<String> = procs.iter().map(Quotad::url).collect();
    let channel = Channel::from_shared(urls[0].clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin =
        AdminServiceClient::with_interceptor(channel, BearerToken(Some(ADMIN_TOKEN.into())));
    let account = pb::Account {
        account_id: "t".into(),
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
        account_id: "t".into(),
        grant_id: "seed".into(),
        amount_micros: 60 * CREDIT,
        ..Default::default()
    };
    admin.grant_credits(grant).await.unwrap();
    let settings = pb::SetAutoTopUpRequest {
        account_id: "t".into(),
        enabled: true,
        threshold_micros: 50 * CREDIT,
        target_micros: 100 * CREDIT,
        monthly_cap_micros: 0,
    };
    admin.set_auto_top_up(settings).await.unwrap();
    let replicas = Replicas::connect(&urls);
    // The plan's 150 first, so that what follows is paid in credits.
    let plan = pb::ReserveRequest {
        account_id: "t".into(),
        request_id: "plan".into(),
        product: "codex".into(),
        estimate: Some(costing(150)),
        ..Default::default()
    };
    let r = replicas
        .call(0, move |mut c| {
            let plan = plan.clone();
            async move { c.reserve(plan).await }
        })
        .await;
    let commit = pb::CommitRequest {
        account_id: "t".into(),
        reservation_id: r.reservation_id,
        usage: Some(costing(150)),
        r#final: true,
    };
    replicas
        .call(1, move |mut c| {
            let commit = commit.clone();
            async move { c.commit(commit).await }
        })
        .await;

    // 30 tasks of 1 credit each, all at once, over the three replicas: 60 → 30 available.
    let tasks: Vec<_> = (0..30usize)
        .map(|i| {
            let replicas = replicas.clone();
            tokio::spawn(async move {
                let reserve = pb::ReserveRequest {
                    account_id: "t".into(),
                    request_id: format!("c{i}"),
                    product: "codex".into(),
                    estimate: Some(costing(1)),
                    ..Default::default()
                };
                let r = replicas
                    .call(i, move |mut c| {
                        let reserve = reserve.clone();
                        async move { c.reserve(reserve).await }
                    })
                    .await;
                assert_eq!(r.decision(), Decision::Allow);
                let commit = pb::CommitRequest {
                    account_id: "t".into(),
                    reservation_id: r.reservation_id,
                    usage: Some(costing(1)),
                    r#final: true,
                };
                replicas
                    .call(i + 1, move |mut c| {
                        let commit = commit.clone();
                        async move { c.commit(commit).await }
                    })
                    .await;
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let mut client = QuotaServiceClient::connect(urls[2].clone()).await.unwrap();
    let started = std::time::Instant::now();
    let usage = loop {
        tokio::time::sleep(Duration::from_millis(300)).await; // past the usage staleness bound
        let request = pb::GetUsageRequest {
            account_id: "t".into(),
            recent_limit: 0,
        };
        // A partition may be moving (a lease renewal late on a busy machine): asked again.
        let u = match client.get_usage(request).await {
            Ok(answer) => answer.into_inner(),
            Err(s) if retryable(&s) && started.elapsed() < Duration::from_secs(10) => continue,
            Err(s) => panic!("GetUsage: {s:?}"),
        };
        if u.auto_top_up
            .as_ref()
            .is_some_and(|t| t.in_flight_purchase_id.is_empty() && t.last_attempt.is_some())
        {
            break u;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the purchase did not settle: {u:?}"
        );
    };
    let bought: Vec<_> = usage
        .lots
        .iter()
        .filter(|l| l.source == "auto_top_up")
        .collect();
    assert_eq!(bought.len(), 1, "exactly one purchase: {:?}", usage.lots);
    assert_eq!(bought[0].lot_id, "topup:t:1");
    let ledger = usage.ledger.unwrap();
    assert_eq!(ledger.spent_micros, 30 * CREDIT);
    assert_eq!(
        ledger.granted_micros,
        ledger.balance_micros + ledger.spent_micros + ledger.expired_micros + ledger.revoked_micros
    );
    assert!(
        ledger.available_micros > 50 * CREDIT,
        "back above the threshold: {ledger:?}"
    );
    drop(procs);
}

/// The owner every replica names for `account` in `quotad-owner` (each answers it, itself or
/// through the owner). While a partition still moves (a replica just joined) two replicas
/// may name different owners for a moment: asked again until they agree, for at most 15 s.
async fn agreed_owner(clients: &[QuotaServiceClient<Channel>], account: &str) -> String {
    let started = std::time::Instant::now();
    loop {
        let mut named = Vec::new();
        for client in clients {
            let asked = client
                .clone()
                .get_usage(pb::GetUsageRequest {
                    account_id: account.to_string(),
                    recent_limit: 0,
                })
                .await;
            named.push(match asked {
                Ok(answer) => {
                    let owner = answer.metadata().get("quotad-owner").expect("names it");
                    owner.to_str().unwrap().to_owned()
                }
                // A partition moving to its new owner answers UNAVAILABLE for a moment.
                Err(e) if retryable(&e) => format!("({e:?})"),
                Err(e) => panic!("{account}: {e:?}"),
            });
        }
        if named.iter().all(|n| n == &named[0]) {
            return named.swap_remove(0);
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{account}: the replicas name {named:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Any replica answers any account: a call at a replica that does not own the
/// account is forwarded to the owner, and every answer names the owner in `quotad-owner`, the
/// same one whichever replica was asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_owner_answers_for_every_account_and_names_the_owner() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let env = replica_env(&Backend::Standalone(&server), &fresh_prefix());
    let procs = start_replicas(env).await;
    let urls: Vec<String> = procs.iter().map(Quotad::url).collect();
    let addresses: Vec<String> = procs.iter().map(|p| p.addr.clone()).collect();
    // Until every replica has joined and taken its share, an owner may still be moving.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    setup_accounts(&urls[0]).await;
    let mut clients = Vec::new();
    for url in &urls {
        clients.push(QuotaServiceClient::connect(url.clone()).await.unwrap());
    }
    let mut owners = std::collections::HashSet::new();
    for id in PLUS.iter().chain(FREE.iter()) {
        let owner = agreed_owner(&clients, id).await;
        assert!(addresses.contains(&owner), "{id}: {owner} not a replica");
        owners.insert(owner);
    }
    assert!(
        owners.len() > 1,
        "the accounts spread over the replicas: {owners:?}"
    );
}

/// Envoy RLS counters are shared, not per replica: calls spread over three owned replicas
/// (each request naming a counter and an account, whose owners differ) are counted by the
/// owner of the domain's counters, so a limit of 20 a minute admits exactly 20 in all, and
/// every answer names that owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limit_counters_are_shared_by_the_replicas() {
    use quotad::api::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use quotad::api::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use quotad::api::envoy::service::ratelimit::v3::RateLimitRequest;
    use quotad::api::envoy::service::ratelimit::v3::rate_limit_response::Code as RlsCode;
    use quotad::api::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;

    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let mut env = replica_env(&Backend::Standalone(&server), &fresh_prefix());
    env.push((
        "QUOTAD_RLS__RULES".into(),
        "[{domain=\"edge\",entries=[{key=\"remote_address\"}],requests_per_unit=20,unit=\"minute\"},\
          {domain=\"edge\",entries=[{key=\"account_id\"}],account_windows=true}]"
            .into(),
    ));
    let procs = start_replicas(env).await;
    let urls: Vec<String> = procs.iter().map(Quotad::url).collect();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    setup_accounts(&urls[0]).await;
    let entry = |key: &str, value: &str| RateLimitDescriptor {
        entries: vec![Entry {
            key: key.into(),
            value: value.into(),
        }],
        ..Default::default()
    };
    let mut running = tokio::task::JoinSet::new();
    for i in 0..60 {
        let url = urls[i % urls.len()].clone();
        let account = PLUS[i % PLUS.len()];
        let request = RateLimitRequest {
            domain: "edge".into(),
            descriptors: vec![
                entry("remote_address", "10.1.2.3"),
                entry("account_id", account),
            ],
            hits_addend: 0,
        };
        running.spawn(async move {
            let mut client = RateLimitServiceClient::connect(url.clone()).await.unwrap();
            let answer = client
                .should_rate_limit(request)
                .await
                .unwrap_or_else(|e| panic!("at {url}: {e:?}"));
            let owner = answer.metadata().get("quotad-owner").cloned();
            let answer = answer.into_inner();
            let statuses: Vec<i32> = answer.statuses.iter().map(|s| s.code).collect();
            (answer.overall_code, statuses, owner)
        });
    }
    let answers = running.join_all().await;
    let admitted = (answers.iter())
        .filter(|(code, _, _)| *code == RlsCode::Ok as i32)
        .count();
    assert_eq!(admitted, 20, "{answers:?}");
    for (_, statuses, _) in &answers {
        assert_eq!(statuses[1], RlsCode::Ok as i32, "the accounts have room");
    }
    let owners: std::collections::HashSet<_> = answers.iter().map(|(_, _, o)| o.clone()).collect();
    assert_eq!(owners.len(), 1, "one owner counts the domain: {owners:?}");
    assert!(owners.iter().all(Option::is_some), "answers name it");
}

/// With TLS and client certificates required, owned replicas forward to each other over TLS,
/// each presenting its own certificate: a client with a certificate reaches every account
/// through any replica, and every replica names the same owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn owners_forward_to_each_other_over_mtls() {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let dir = std::env::temp_dir().join(format!("quotad-peers-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = support::pki::Pki::new(&dir, "ca");
    let (cert, key) = ca.issue("replica", &["localhost", "127.0.0.1"]);
    let (client_cert, client_key) = ca.issue("frontend", &["frontend"]);
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let mut env = replica_env(&Backend::Standalone(&server), &fresh_prefix());
    env.push(("QUOTAD_TLS__CERT_FILE".into(), cert));
    env.push(("QUOTAD_TLS__KEY_FILE".into(), key));
    env.push(("QUOTAD_TLS__CLIENT_CA_FILE".into(), ca.ca_file()));
    let procs = start_replicas(env).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca.ca_file()).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(client_cert).unwrap(),
            std::fs::read(client_key).unwrap(),
        ))
        .domain_name("localhost");
    let mut clients = Vec::new();
    for p in &procs {
        let channel = Channel::from_shared(format!("https://{}", p.addr))
            .unwrap()
            .tls_config(tls.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        clients.push(QuotaServiceClient::new(channel));
    }
    let addresses: Vec<String> = procs.iter().map(|p| p.addr.clone()).collect();
    let mut owners = std::collections::HashSet::new();
    for (i, account) in PLUS.iter().enumerate() {
        let reserved = clients[i % REPLICAS]
            .clone()
            .reserve(pb::ReserveRequest {
                account_id: account.to_string(),
                request_id: format!("tls-{account}"),
                product: "codex".into(),
                estimate: Some(costing(1)),
                plan_hint: "plus".into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{account}: {e:?}"));
        assert_eq!(reserved.get_ref().decision(), Decision::Allow);
        let owner = agreed_owner(&clients, account).await;
        assert!(
            addresses.contains(&owner),
            "{account}: {owner} not a replica"
        );
        owners.insert(owner);
    }
    assert!(owners.len() > 1, "calls were forwarded: {owners:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A replica that joins is asked at once for accounts whose partitions now fall to it but are
/// still held by the replica before it, which lets them go only at its next round (a third of
/// a 3 s lease): every call is answered, none refused, the calls on the newcomer's share by
/// the newcomer once it has taken them, and the others forwarded to the first replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_joins_answers_for_its_share_while_it_moves() {
    const ACCOUNTS: usize = 32;
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let mut env = replica_env(&Backend::Standalone(&server), &fresh_prefix());
    env.retain(|(key, _)| key != "QUOTAD_STORE__REDIS__LEASE_MS");
    env.push(("QUOTAD_STORE__REDIS__LEASE_MS".into(), "3000".into()));
    let first = {
        let env = env.clone();
        tokio::task::spawn_blocking(move || start("127.0.0.1:0", &env))
            .await
            .unwrap()
    };
    let task = |account: usize, request: &str| {
        let mut reserve = support::reserve_request(&format!("j{account}"), request, "codex", 1);
        reserve.plan_hint = "pro".into();
        reserve
    };
    let mut client = QuotaServiceClient::connect(first.url()).await.unwrap();
    for account in 0..ACCOUNTS {
        client.reserve(task(account, "before")).await.unwrap();
    }

    let second = tokio::task::spawn_blocking(move || start("127.0.0.1:0", &env))
        .await
        .unwrap();
    let channel = Channel::from_shared(second.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut running = tokio::task::JoinSet::new();
    for account in 0..ACCOUNTS {
        let mut client = QuotaServiceClient::new(channel.clone());
        let request = task(account, "after");
        running.spawn(async move {
            let answer = client.reserve(request).await;
            let answer = answer.unwrap_or_else(|e| panic!("j{account}: {e:?}"));
            let owner = answer.metadata().get("quotad-owner").cloned().unwrap();
            assert_eq!(answer.into_inner().decision(), Decision::Allow);
            owner.to_str().unwrap().to_owned()
        });
    }
    let owners = running.join_all().await;
    assert!(
        owners.contains(&second.addr),
        "the newcomer took its share: {owners:?}"
    );
    assert!(
        owners.contains(&first.addr),
        "the first kept its own: {owners:?}"
    );
}
