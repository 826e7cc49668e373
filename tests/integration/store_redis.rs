//! The store contract, run unchanged against the Redis store (the engine that decides in
//! memory and writes to Redis) at its default settings, on a real standalone `redis-server`
//! (`store_redis_cluster.rs` runs it on a Cluster); and what ownership adds: fencing, a restart
//! that continues from Redis, a second replica kept off the partitions, a lease that lapses.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use quotad::domain::{
    Account, CommitCommand, Decision, GrantCommand, LotSource, Policy, PriceSheet, ReserveCommand,
    Timestamp, Usage,
};
use quotad::rules::LiveRules;
use quotad::store::redis::storage::Fence;
use quotad::store::{MemoryStore, OwnedSettings, Store, StoreError, StoreHealth};
use support::contract::store_contract_tests;
use support::redis::{RedisServer, settings, store_with};

store_contract_tests!(support::redis::standalone_store());

const CREDIT: i64 = 1_000_000;
const NOW: Timestamp = Timestamp::from_millis(1_800_000_000_000);

fn reserve(account: &str, request: &str) -> ReserveCommand {
    ReserveCommand {
        account_id: account.into(),
        request_id: request.into(),
        product: "codex".into(),
        estimate: Usage::default(),
        cost: CREDIT,
        plan_hint: Some("plus".into()),
        ttl_ms: 60_000,
        reservation_id: format!("rsv-{request}"),
        wait_for_top_up: false,
    }
}

fn commit(account: &str, reservation: &str, credits: i64) -> CommitCommand {
    CommitCommand {
        account_id: account.into(),
        reservation_id: reservation.into(),
        usage: Usage {
            model: "gpt-5.5-mini".into(),
            output_tokens: credits as u64 * 5_000,
            ..Usage::default()
        },
        cost: credits * CREDIT,
        is_final: true,
        price_version: PriceSheet::default().version,
    }
}

fn short_lease() -> OwnedSettings {
    OwnedSettings {
        lease: Duration::from_millis(600),
        ..OwnedSettings::default()
    }
}

async fn grant(store: &MemoryStore, account: &str, credits: i64) {
    store
        .upsert_account(
            Account {
                id: account.into(),
                plan: "plus".into(),
                credit_purchase_allowed: true,
            },
            NOW,
        )
        .await
        .unwrap();
    store
        .grant(
            GrantCommand {
                account_id: account.into(),
                grant_id: format!("g-{account}"),
                amount: credits * CREDIT,
                source: LotSource::Purchase,
                expires_at: None,
            },
            NOW,
        )
        .await
        .unwrap();
}

/// A store dropped gives its leases up, and the next one on the same prefix takes them at
/// once and continues from what Redis holds: balances, charges, history and the export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_continues_from_redis() {
    let redis = RedisServer::start();
    let redis_settings = settings(&redis.url(), None);
    let first = store_with(redis_settings.clone(), short_lease()).await;
    grant(&first, "acct", 10).await;
    let allowed = first.reserve(&reserve("acct", "r1"), NOW).await.unwrap();
    let Decision::Allow { reservation_id, .. } = &allowed.decision else {
        panic!("denied: {allowed:?}");
    };
    let reservation = reservation_id.to_string();
    first
        .commit(commit("acct", &reservation, 3), NOW)
        .await
        .unwrap();
    let before = first.usage("acct", 10, NOW).await.unwrap();
    drop(first);

    let started = std::time::Instant::now();
    let second = store_with(redis_settings, short_lease()).await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the leases were given up, not waited out"
    );
    let after = second.usage("acct", 10, NOW).await.unwrap();
    assert_eq!(after.lots, before.lots);
    assert_eq!(after.totals, before.totals);
    assert_eq!(after.recent, before.recent);
    assert_eq!(after.recent.len(), 1);
    // The retried Reserve gets its first answer; the retried Commit acts once.
    let again = second.reserve(&reserve("acct", "r1"), NOW).await.unwrap();
    assert_eq!(again.decision, allowed.decision);
    let retried = second
        .commit(commit("acct", &reservation, 3), NOW)
        .await
        .unwrap();
    assert_eq!(retried.event, None, "a retried commit charges nothing");
    let events = exported(&second).await;
    assert_eq!(events.len(), 1, "one event per charge");
}

/// Another replica's acquisition raises the partition's epoch: this replica's next write
/// there is refused by Redis, the call is UNAVAILABLE, health says why, and nothing it
/// decided after the takeover is in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_under_an_old_epoch_is_refused() {
    let redis = RedisServer::start();
    let redis_settings = settings(&redis.url(), None);
    let prefix = redis_settings.key_prefix.clone();
    let store = store_with(redis_settings, OwnedSettings::default()).await;
    grant(&store, "acct", 10).await;
    let partition = quotad::store::redis::owned::partition_of("acct", 64);
    let core_key = format!("{prefix}:{{o{partition}}}:a:acct");
    let core_before = redis.cli(&["HSTRLEN", &core_key, "c"]).unwrap();
    take_over(&redis, &prefix, partition);

    let refused = store.reserve(&reserve("acct", "r1"), NOW).await;
    assert!(
        matches!(&refused, Err(StoreError::Unavailable(why)) if why.contains("another replica")),
        "{refused:?}"
    );
    // The partition is no longer decided here (this replica, alone among the members, waits
    // for the lease, which the other holds past the call's wait); the others are.
    let later = store.reserve(&reserve("acct", "r2"), NOW).await;
    assert!(
        matches!(later, Err(StoreError::Unavailable(_))),
        "{later:?}"
    );
    assert_eq!(
        redis.cli(&["HSTRLEN", &core_key, "c"]).unwrap(),
        core_before
    );
    assert_eq!(store.owned_partitions(), Some(63));
    assert_eq!(store.health(), StoreHealth::Up);
}

/// An account's history list is trimmed every few charges, not at each one: it never holds
/// more than 7 past what the account keeps (100 by default), and reads answer exactly the
/// newest kept, after a restart from Redis as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_in_redis_stays_within_what_it_keeps() {
    let redis = RedisServer::start();
    let redis_settings = settings(&redis.url(), None);
    let prefix = redis_settings.key_prefix.clone();
    let store = store_with(redis_settings.clone(), short_lease()).await;
    grant(&store, "acct", 1_000).await;
    let partition = quotad::store::redis::owned::partition_of("acct", 64);
    let history = format!("{prefix}:{{o{partition}}}:h:acct");
    let mut longest = 0;
    for n in 1..=130 {
        spend(&store, "acct", &format!("t{n}")).await;
        let len: usize = (redis.cli(&["LLEN", &history]).unwrap().trim().parse()).unwrap();
        assert!(len <= 107, "after {n} charges the list holds {len}");
        assert!(len >= n.min(100), "after {n} charges the list holds {len}");
        longest = longest.max(len);
    }
    assert!(longest > 100, "trimmed at every charge: {longest}");
    let recent = store.usage("acct", 1_000, NOW).await.unwrap().recent;
    drop(store);
    assert_eq!(recent.len(), 100);
    assert_eq!(recent.first().map(|e| e.seq), Some(130), "newest first");
    assert_eq!(recent.last().map(|e| e.seq), Some(31));
    let again = store_with(redis_settings, short_lease()).await;
    assert_eq!(
        again.usage("acct", 1_000, NOW).await.unwrap().recent,
        recent
    );
}

/// On a standalone Redis a batch is a plain transaction (`WATCH`, `MULTI` … `EXEC`), not a
/// script; on a Cluster it stays the `WRITE` script (`store_redis_cluster.rs` runs the contract
/// there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_plain_transactions_on_a_standalone_redis() {
    let redis = RedisServer::start();
    let store = store_with(settings(&redis.url(), None), OwnedSettings::default()).await;
    let calls = |name: &str| {
        let stats = redis.cli(&["INFO", "commandstats"]).unwrap();
        (stats.lines())
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    grant(&store, "acct", 10).await;
    task(&store, "acct", "r1", CREDIT).await;
    assert!(calls("exec") >= 3, "a grant, a reserve and a commit");
    assert!(calls("watch") >= 3);
}

/// Another replica takes the partition after the writer read the fence and before its
/// `EXEC` arrives (the writer's link slowed by a proxy so that the test can act in between):
/// Redis refuses the transaction because the watched fence changed, the writer reads again,
/// finds itself fenced, and nothing of the decision is written. Without the `WATCH`, the read
/// having seen the old epoch, the write would have landed over the new owner's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_taken_between_the_read_and_the_exec_refuses_the_write() {
    use support::fault_proxy::{FaultProxy, Link};
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port).await;
    let redis_settings = settings(&proxy.url(), None);
    let prefix = redis_settings.key_prefix.clone();
    let store = store_with(redis_settings, OwnedSettings::default()).await;
    grant(&store, "acct", 10).await;
    let partition = quotad::store::redis::owned::partition_of("acct", 64);
    let core_key = format!("{prefix}:{{o{partition}}}:a:acct");
    let core_before = redis.cli(&["HGET", &core_key, "c"]).unwrap();

    proxy.set(Link::Delay(Duration::from_millis(100)));
    let store = Arc::new(store);
    let deciding = {
        let store = store.clone();
        tokio::spawn(async move { store.reserve(&reserve("acct", "r1"), NOW).await })
    };
    // The writer's read has reached Redis once a client's last command is the fences' HMGET.
    let read = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let clients = || redis.cli(&["CLIENT", "LIST"]).unwrap_or_default();
        while !clients().contains("cmd=mget") {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no fence was read"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        take_over(&redis, &prefix, partition);
        redis
    })
    .await
    .unwrap();

    let refused = deciding.await.unwrap();
    assert!(
        matches!(&refused, Err(StoreError::Unavailable(why)) if why.contains("another replica")),
        "{refused:?}"
    );
    assert_eq!(read.cli(&["HGET", &core_key, "c"]).unwrap(), core_before);
    assert_eq!(store.owned_partitions(), Some(63));
}

/// Two replicas on one key prefix split the partitions between them (each about half); a
/// call at the replica that does not own the account is refused with the owner's address; when
/// one leaves, the other takes its partitions over and continues from what Redis holds.
/// (Forwarding such calls to the owner is the gRPC layer's: `replicas.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_split_the_partitions_and_hand_them_over() {
    let redis = RedisServer::start();
    let redis_settings = settings(&redis.url(), None);
    let owned = |address: &str| OwnedSettings {
        advertise: address.into(),
        ..short_lease()
    };
    let a = store_with(redis_settings.clone(), owned("10.0.0.1:50051")).await;
    assert_eq!(
        a.owned_partitions(),
        Some(64),
        "alone, it owns every partition"
    );
    let accounts: Vec<String> = (0..24).map(|i| format!("acct-{i}")).collect();
    for account in &accounts {
        grant(&a, account, 10).await;
        spend(&a, account, "first").await;
    }

    let b = store_with(redis_settings.clone(), owned("10.0.0.2:50051")).await;
    let split = wait_for(|| {
        let (x, y) = (a.owned_partitions().unwrap(), b.owned_partitions().unwrap());
        x + y == 64 && x >= 16 && y >= 16
    })
    .await;
    assert!(
        split,
        "split: {:?} and {:?}",
        a.owned_partitions(),
        b.owned_partitions()
    );
    let mut at_b = 0;
    for account in &accounts {
        let (owner, other, address) = match a.usage(account, 10, NOW).await {
            Ok(_) => (&a, &b, "10.0.0.1:50051"),
            Err(_) => (&b, &a, "10.0.0.2:50051"),
        };
        if std::ptr::eq(owner, &b) {
            at_b += 1;
        }
        let seen = owner.usage(account, 10, NOW).await.unwrap();
        assert_eq!(seen.recent.len(), 1, "{account}: its charge came along");
        let refused = other.usage(account, 10, NOW).await;
        assert!(
            matches!(&refused, Err(StoreError::Moved { address: at, .. }) if at == address),
            "{account}: {refused:?}"
        );
        spend(owner, account, "second").await;
    }
    assert!(
        at_b > 0 && at_b < accounts.len(),
        "{at_b} accounts moved to b"
    );

    drop(b);
    assert!(
        wait_for(|| a.owned_partitions() == Some(64)).await,
        "a took b's partitions back: {:?}",
        a.owned_partitions()
    );
    for account in &accounts {
        let seen = a.usage(account, 10, NOW).await.unwrap();
        assert_eq!(seen.recent.len(), 2, "{account}: both charges, once each");
    }
}

/// Polls `done` for up to 5 s.
async fn wait_for(done: impl Fn() -> bool) -> bool {
    for _ in 0..500 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// One task of 1 credit, reserved and committed.
async fn spend(store: &MemoryStore, account: &str, request: &str) {
    task(store, account, request, 1).await;
}

/// One task of `credits`, reserved and committed.
async fn task(store: &MemoryStore, account: &str, request: &str, credits: i64) {
    let request = format!("{account}-{request}");
    let allowed = store
        .reserve(&reserve(account, &request), NOW)
        .await
        .unwrap();
    let Decision::Allow { reservation_id, .. } = &allowed.decision else {
        panic!("denied: {allowed:?}");
    };
    store
        .commit(commit(account, reservation_id, credits), NOW)
        .await
        .unwrap();
}

/// An owner that cannot renew its leases stops deciding before they could run out, and says
/// so at once rather than after a write timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_cannot_renew_stops_deciding() {
    let mut redis = RedisServer::start();
    let store = store_with(settings(&redis.url(), None), short_lease()).await;
    store.reserve(&reserve("acct", "r1"), NOW).await.unwrap();
    redis.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let started = std::time::Instant::now();
    let refused = store.reserve(&reserve("acct", "r2"), NOW).await;
    assert!(
        matches!(&refused, Err(StoreError::Unavailable(why)) if why.contains("renew")),
        "{refused:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(100));
}

/// A partition's fence as Redis holds it.
fn read_fence(redis: &RedisServer, fence: &str) -> Fence {
    let value = redis.cli(&["GET", fence]).unwrap();
    Fence::parse(value.trim().as_bytes()).unwrap()
}

/// What another replica's taking of the partition does to its fence.
fn raise_epoch(redis: &RedisServer, fence: &str) {
    let mut raised = read_fence(redis, fence);
    raised.epoch += 1;
    redis.cli(&["SET", fence, &raised.value()]).unwrap();
}

/// What another replica's taking of the partition does: its fence's epoch raised, and the
/// lease its own (for a minute), under that epoch.
fn take_over(redis: &RedisServer, prefix: &str, partition: u16) {
    let fence = format!("{prefix}:{{o{partition}}}:fence");
    raise_epoch(redis, &fence);
    let epoch = read_fence(redis, &fence).epoch.to_string();
    let lease = format!("{prefix}:{{o{partition}}}:lease");
    let owner = ["HSET", &lease, "owner", "another-replica", "epoch", &epoch];
    redis.cli(&owner).unwrap();
    redis.cli(&["PEXPIRE", &lease, "60000"]).unwrap();
}

/// Redis written in another persisted format is refused at start, with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_persisted_format_is_refused() {
    let redis = support::redis::shared_server();
    let redis_settings = settings(&redis.url(), None);
    redis
        .cli(&[
            "SET",
            &format!("{}:owned-format", redis_settings.key_prefix),
            "99",
        ])
        .unwrap();
    let rules = LiveRules::fixed(Arc::new(Policy::default()));
    let refused =
        MemoryStore::open_on_redis(rules, &redis_settings, &OwnedSettings::default()).await;
    let Err(StoreError::Internal(why)) = refused else {
        panic!("started on format 99");
    };
    assert!(why.contains("format 99"), "{why}");
}

/// What the export holds for consumer group `billing`, read once.
async fn exported(store: &MemoryStore) -> Vec<quotad::domain::ExportedEvent> {
    let read = quotad::store::ExportRead {
        group: "billing".into(),
        consumer: "c".into(),
        max_events: 100,
        claim_idle_ms: 60_000,
    };
    store.export_read(read, NOW).await.unwrap()
}

/// Takes `account`'s plan window to its limit, so that what it does next runs on credits.
async fn use_up_the_plan(store: &MemoryStore, account: &str) {
    task(store, account, "plan", 150).await;
}

/// With a journal, an owner whose Redis stops answering goes on deciding from memory for the
/// outage grace, each account spending at most the outage credit allowance; past the grace it
/// refuses at once. Once Redis answers, everything journaled is there, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_go_on_through_an_outage_and_reach_redis_once() {
    let redis = RedisServer::start();
    let journal = tempfile::tempdir().unwrap();
    let owned = OwnedSettings {
        lease: Duration::from_secs(10),
        outage_grace: Duration::from_millis(2_500),
        outage_credit_allowance: 3 * CREDIT,
        journal_dir: Some(journal.path().to_path_buf()),
        ..OwnedSettings::default()
    };
    let redis_settings = settings(&redis.url(), None);
    let store = store_with(redis_settings.clone(), owned).await;
    grant(&store, "acct", 20).await;
    use_up_the_plan(&store, "acct").await;
    let before = store.usage("acct", 10, NOW).await.unwrap();

    redis.signal("STOP");
    let outage = std::time::Instant::now();
    // The first write after Redis stopped finds it out; a decision admitted before that is
    // outside the allowance (at most one batch's worth), so this one spends no credits.
    let account = Account {
        id: "acct".into(),
        plan: "plus".into(),
        credit_purchase_allowed: true,
    };
    store.upsert_account(account, NOW).await.unwrap();
    for task in 0..3 {
        spend(&store, "acct", &format!("out-{task}")).await;
    }
    let stats = store.outage_stats().unwrap();
    assert!(stats.deciding_without_redis, "{stats:?}");
    assert!(stats.journaled >= 7, "{stats:?}");
    let capped = store.reserve(&reserve("acct", "out-3"), NOW).await;
    assert!(
        matches!(&capped, Err(StoreError::Unavailable(why)) if why.contains("allowance")),
        "a fourth credit is past the allowance: {capped:?}"
    );
    // The outage counts from the first write that got no answer (within a second).
    while outage.elapsed() < Duration::from_millis(3_800) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = std::time::Instant::now();
    let refused = store.reserve(&reserve("other", "late"), NOW).await;
    assert!(
        matches!(&refused, Err(StoreError::Unavailable(why)) if why.contains("outage grace")),
        "{refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "refused at once"
    );
    assert!(matches!(store.health(), StoreHealth::Down { .. }));

    redis.signal("CONT");
    assert!(
        wait_for(|| {
            let stats = store.outage_stats().unwrap();
            stats.journal_pending == 0 && store.health() == StoreHealth::Up
        })
        .await,
        "the journal reached Redis"
    );
    spend(&store, "acct", "after").await;
    drop(store);

    // Read back from Redis alone, by a replica without a journal.
    let second = store_with(redis_settings, short_lease()).await;
    let after = second.usage("acct", 10, NOW).await.unwrap();
    assert_eq!(after.totals.spent, before.totals.spent + 4 * CREDIT);
    assert_eq!(
        after.totals.granted,
        after.totals.balance + after.totals.spent
    );
    assert_eq!(after.recent.len(), before.recent.len() + 4);
    let events = exported(&second).await;
    let mut seqs: Vec<u64> = events.iter().map(|e| e.event.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=5).collect::<Vec<_>>(), "one event per charge");
}

/// Without a journal (or with a grace of zero), calls are refused at once while Redis does
/// not answer, as before outage grace existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_grace_an_outage_is_refused_at_once() {
    let redis = RedisServer::start();
    let owned = OwnedSettings {
        lease: Duration::from_secs(6),
        ..OwnedSettings::default()
    };
    let store = store_with(settings(&redis.url(), None), owned).await;
    grant(&store, "acct", 20).await;
    redis.signal("STOP");
    // The first call finds Redis gone (after its write attempt's time)…
    let first = store.reserve(&reserve("acct", "r1"), NOW).await;
    assert!(
        matches!(first, Err(StoreError::Unavailable(_))),
        "{first:?}"
    );
    // …and the next is refused without waiting.
    let started = std::time::Instant::now();
    let refused = store.reserve(&reserve("acct", "r2"), NOW).await;
    assert!(
        matches!(&refused, Err(StoreError::Unavailable(why)) if why.contains("outage grace")),
        "{refused:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(store.outage_stats().unwrap().decisions, 0);
    redis.signal("CONT");
    assert!(
        wait_for(|| store.health() == StoreHealth::Up).await,
        "serves again once Redis answers"
    );
    let again = store.reserve(&reserve("acct", "r2"), NOW).await;
    assert!(again.is_ok(), "{again:?}");
}

/// A failover to a replica that had not yet received a partition's last acquisition leaves the
/// epoch before it in the fence, and no lease. The next acquisition still gets an epoch never
/// issued before (fencing compares epochs for equality, so the owner that took the lost one
/// must not share it with its successor).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_lost_in_a_failover_is_never_issued_again() {
    let redis = RedisServer::start();
    let redis_settings = settings(&redis.url(), None);
    let prefix = redis_settings.key_prefix.clone();
    let one = OwnedSettings {
        partitions: 1,
        ..short_lease()
    };
    let store = store_with(redis_settings, one).await;
    let fence = format!("{prefix}:{{o0}}:fence");
    let epoch = || read_fence(&redis, &fence).epoch;
    let issued = epoch();
    let mut before = read_fence(&redis, &fence);
    before.epoch = issued - 1;
    redis.cli(&["SET", &fence, &before.value()]).unwrap();
    redis
        .cli(&["DEL", &format!("{prefix}:{{o0}}:lease")])
        .unwrap();
    // The owner finds its lease gone at its next renewal and takes the partition again.
    assert!(
        wait_for(|| epoch() != issued - 1).await,
        "the partition was not taken again"
    );
    let next = epoch();
    assert!(next > issued, "epoch {issued} was issued again as {next}");
    assert!(wait_for(|| store.owned_partitions() == Some(1)).await);
}

/// Envoy RLS counters are owned like accounts: a domain's counters are counted by the owner of
/// its partition, written behind to Redis (kept for their window's length), read back by the
/// next owner, and refused elsewhere with the owner's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_counters_are_owned_and_move_with_their_partition() {
    use quotad::domain::rls::{CounterCheck, RlsUnit};
    use quotad::store::redis::owned::{counter_key, counter_partition};
    let redis = RedisServer::start();
    let redis_settings = settings(&redis.url(), None);
    let owned = |address: &str| OwnedSettings {
        advertise: address.into(),
        ..short_lease()
    };
    let hits = |n: u64| {
        [CounterCheck {
            key: "ip:1".into(),
            unit: RlsUnit::Minute,
            limit: 10,
            hits: n,
        }]
    };
    let a = store_with(redis_settings.clone(), owned("10.0.0.1:50051")).await;
    let first = a.rls_check("edge", &hits(4), NOW).await.unwrap();
    assert_eq!((first[0].over, first[0].remaining), (false, 6));
    drop(a);

    let b = store_with(redis_settings.clone(), owned("10.0.0.2:50051")).await;
    let second = b.rls_check("edge", &hits(4), NOW).await.unwrap();
    assert_eq!(
        (second[0].over, second[0].remaining),
        (false, 2),
        "the first owner's count was read back from Redis"
    );
    let key = counter_key(
        &redis_settings.key_prefix,
        counter_partition("edge", 64),
        "edge",
        "ip:1",
    );
    let mut kept = 0;
    for _ in 0..100 {
        kept = redis.cli(&["PTTL", &key]).unwrap().trim().parse().unwrap();
        if kept > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        (1..=61_000).contains(&kept),
        "kept for a minute and a bucket at most: {kept}"
    );

    let c = store_with(redis_settings, owned("10.0.0.3:50051")).await;
    let split = wait_for(|| {
        let (x, y) = (b.owned_partitions().unwrap(), c.owned_partitions().unwrap());
        x + y == 64 && x >= 16 && y >= 16
    })
    .await;
    assert!(split, "c took its share");
    let (owner, other, address) = match b.rls_check("edge", &hits(0), NOW).await {
        Ok(_) => (&b, &c, "10.0.0.2:50051"),
        Err(_) => (&c, &b, "10.0.0.3:50051"),
    };
    let refused = other.rls_check("edge", &hits(1), NOW).await;
    assert!(
        matches!(&refused, Err(StoreError::Moved { address: at, .. }) if at == address),
        "{refused:?}"
    );
    let third = owner.rls_check("edge", &hits(2), NOW).await.unwrap();
    assert_eq!((third[0].over, third[0].remaining), (false, 0));
    let over = owner.rls_check("edge", &hits(1), NOW).await.unwrap();
    assert!(over[0].over, "ten counted over three owners, once each");
}

/// Redis restarted without its data (here: emptied): the owner's next write finds its
/// partition's fence gone and drops the partition, that call is refused (nothing of it
/// happened), and the next call on the partition has it taken again at once, under a new
/// epoch, instead of waiting for the ownership round (3.3 s at the default lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_loses_its_data_a_partition_is_taken_again_on_the_next_call() {
    let redis = RedisServer::start();
    let store = store_with(settings(&redis.url(), None), OwnedSettings::default()).await;
    grant(&store, "acct", 10).await;
    redis.cli(&["FLUSHALL"]).unwrap();

    let refused = store.reserve(&reserve("acct", "r1"), NOW).await;
    assert!(
        matches!(&refused, Err(StoreError::Unavailable(why)) if why.contains("another replica")),
        "{refused:?}"
    );
    let started = std::time::Instant::now();
    let again = store.reserve(&reserve("acct", "r2"), NOW).await;
    assert!(again.is_ok(), "{again:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "taken again after {:?}",
        started.elapsed()
    );
}
