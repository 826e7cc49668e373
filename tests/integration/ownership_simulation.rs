//! A deterministic simulation of owned mode over many seeds. Several replicas run the real
//! owner logic (`OwnedRedis` under the real `MemoryStore` engine, as `quotad serve` runs it)
//! over a model of the storage behind them (what the storage scripts do: membership, leases
//! under epochs, fenced and numbered writes) with a clock of its own that drifts from the
//! replicas', and a network between them that delays, loses requests and answers, cuts a
//! replica's link, pauses a replica (it neither sends nor answers) and crashes one (it never
//! reaches the storage again; a new replica joins in its place). Clients run tasks (Reserve,
//! then Commit) on any replica, follow `Moved` to the owner as the gRPC layer forwards, and
//! retry with the same ids until answered.
//!
//! Everything runs on one thread in tokio's paused time, and every choice comes from the seed,
//! so a seed replays exactly:
//! `SIM_SEED=1234 cargo test --test integration ownership_simulation::`.
//! `SIM_SEEDS=n` runs more seeds than the suite's default. Each seed checks:
//! - **lease disjointness**: every answered decision was made by a replica holding the
//!   account's partition lease at that instant, by the storage's clock (a call that waited
//!   for its partition to arrive is decided once it is taken: it began before the lease
//!   did, and the lease was taken while it waited);
//! - **exactly once**: a replica that takes every partition afterwards reads, for every
//!   account, credits spent and plan usage equal to what clients were told, and the export
//!   holds one event per acknowledged charge, numbered 1..n;
//! - **open holds**: each partition's count of open holds in its fence is the number of holds
//!   its accounts have open (clients abandon some tasks, so there are some), and the auditor's
//!   gauge counts them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quotad::domain::{
    Account, CommitCommand, Decision, GrantCommand, LotSource, Policy, PriceSheet, ReserveCommand,
    Timestamp, Usage, decode_account_of, decode_event,
};
use quotad::rules::LiveRules;
use quotad::store::redis::owned::{AccountKeys, CORE_FIELD, Purchases, Section, partition_of, tag};
use quotad::store::redis::storage::{
    OwnedStorage, StorageError, StorageFuture, StoredAccount, Taken, Written,
};
use quotad::store::{MemoryStore, OwnedSettings, Store, StoreError};
use tokio::time::Instant;

const PREFIX: &str = "sim";
const PARTITIONS: u16 = 8;
const ACCOUNTS: u64 = 10;
const CLIENTS: usize = 4;
const CREDIT: i64 = 1_000_000;
/// What a task costs: a plus plan's 5-hour window (150 credits) runs out after a few tasks on
/// an account, and later ones run on credits.
const TASK: i64 = 20 * CREDIT;
/// The storage's clock at the start (ms), and the rules' clock.
const BASE_MS: i64 = 1_800_000_000_000;
/// How long a request or answer that is lost keeps its caller waiting.
const LOST_WAIT: Duration = Duration::from_millis(300);

/// SplitMix64: small, fast, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, per_thousand: u64) -> bool {
        self.below(1_000) < per_thousand
    }
}

/// What varies between seeds.
#[derive(Debug, Clone, Copy)]
struct Faults {
    /// The storage's clock runs this many parts per million fast (or slow, if negative).
    drift_ppm: i64,
    /// Longest one-way delay, and how often a request or an answer is lost (per thousand).
    max_delay_ms: u64,
    loss_per_thousand: u64,
    /// Pauses, cuts and crashes over the run.
    events: usize,
}

impl Faults {
    fn of(rng: &mut Rng) -> Faults {
        Faults {
            // Within the margin the owner keeps (it stops at 90% of its lease).
            drift_ppm: rng.below(160_001) as i64 - 80_000,
            max_delay_ms: 1 + rng.below(30),
            loss_per_thousand: rng.below(40),
            events: rng.below(6) as usize,
        }
    }
}

/// A lease as the storage holds it.
struct Lease {
    owner: String,
    epoch: u64,
    expires: i64,
}

/// A replica's hold on a partition's lease, by the storage's clock: from its taking to its
/// last expiry (moved by each renewal) or its release.
#[derive(Debug, Clone)]
struct Held {
    partition: u16,
    owner: String,
    from: i64,
    to: i64,
}

/// The storage: what the scripts keep and do, one atomic step per call.
struct Model {
    start: Instant,
    drift_ppm: i64,
    members: BTreeMap<String, (i64, String)>,
    leases: BTreeMap<u16, Lease>,
    /// Per partition: its epoch, last batch number landed and open holds then.
    fences: BTreeMap<u16, (u64, u64, i64)>,
    strings: HashMap<String, Vec<u8>>,
    hashes: HashMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
    lists: HashMap<String, Vec<Vec<u8>>>,
    streams: BTreeMap<String, Vec<Vec<u8>>>,
    held: Vec<Held>,
    /// What happened, for following one seed (`SIM_LOG`).
    trace: Vec<String>,
}

impl Model {
    fn new(drift_ppm: i64) -> Model {
        Model {
            start: Instant::now(),
            drift_ppm,
            members: BTreeMap::new(),
            leases: BTreeMap::new(),
            fences: BTreeMap::new(),
            strings: HashMap::new(),
            hashes: HashMap::new(),
            lists: HashMap::new(),
            streams: BTreeMap::new(),
            held: Vec::new(),
            trace: Vec::new(),
        }
    }

    /// The storage's clock at `at` (ms).
    fn clock(&self, at: Instant) -> i64 {
        let micros = at.duration_since(self.start).as_micros() as i64;
        BASE_MS + micros * (1_000_000 + self.drift_ppm) / 1_000_000 / 1_000
    }

    fn now(&self) -> i64 {
        self.clock(Instant::now())
    }

    fn live(&self, partition: u16) -> Option<&Lease> {
        let now = self.now();
        self.leases.get(&partition).filter(|l| l.expires > now)
    }

    fn hold_moved(&mut self, partition: u16, owner: &str, to: i64) {
        if let Some(h) =
            (self.held.iter_mut().rev()).find(|h| h.partition == partition && h.owner == owner)
        {
            h.to = to;
        }
    }

    fn join(&mut self, id: &str, address: &str, lease_ms: u64) -> Vec<(String, String)> {
        let now = self.now();
        self.members
            .insert(id.to_owned(), (now + lease_ms as i64, address.to_owned()));
        self.members.retain(|_, (expires, _)| *expires > now);
        (self.members.iter())
            .map(|(id, (_, address))| (id.clone(), address.clone()))
            .collect()
    }

    fn acquire(&mut self, partition: u16, owner: &str, lease_ms: u64) -> Option<Taken> {
        if self.live(partition).is_some_and(|l| l.owner != owner) {
            return None;
        }
        let now = self.now();
        if let Some(old) = self.live(partition).map(|l| l.owner.clone()) {
            self.hold_moved(partition, &old, now);
        }
        let fence = self.fences.entry(partition).or_insert((0, 0, 0));
        let epoch = (fence.0 + 1).max(now as u64);
        (fence.0, fence.1) = (epoch, 0);
        let expires = now + lease_ms as i64;
        self.leases.insert(
            partition,
            Lease {
                owner: owner.to_owned(),
                epoch,
                expires,
            },
        );
        self.held.push(Held {
            partition,
            owner: owner.to_owned(),
            from: now,
            to: expires,
        });
        self.trace.push(format!(
            "{now} p{partition} acquired by {owner} epoch {epoch}"
        ));
        Some(Taken { epoch, at_ms: now })
    }

    fn renew(&mut self, partition: u16, epoch: u64, lease_ms: u64) -> bool {
        let now = self.now();
        let Some(owner) = (self.live(partition))
            .filter(|l| l.epoch == epoch)
            .map(|l| l.owner.clone())
        else {
            return false;
        };
        let expires = now + lease_ms as i64;
        self.leases.get_mut(&partition).expect("live").expires = expires;
        self.hold_moved(partition, &owner, expires);
        true
    }

    fn release(&mut self, partition: u16, epoch: u64) {
        let now = self.now();
        if let Some(owner) = (self.live(partition))
            .filter(|l| l.epoch == epoch)
            .map(|l| l.owner.clone())
        {
            self.leases.remove(&partition);
            self.hold_moved(partition, &owner, now);
        }
    }

    fn write(&mut self, sections: &[&Section]) -> Result<i64, StorageError> {
        for s in sections {
            let epoch = self.fences.get(&s.partition).map_or(0, |f| f.0);
            if epoch != s.epoch {
                return Err(StorageError::Fenced(s.partition));
            }
        }
        for s in sections {
            let fence = self.fences.get_mut(&s.partition).expect("checked");
            if fence.1 >= s.seq {
                continue;
            }
            (fence.1, fence.2) = (s.seq, s.holds);
            let now = self.now();
            for op in &s.ops {
                if op.code == b"H" && op.args[0] == CORE_FIELD {
                    let id = op.key.rsplit(":a:").next().unwrap_or("").to_owned();
                    self.trace.push(format!(
                        "{now} p{} epoch {} seq {} wrote {id}",
                        s.partition, s.epoch, s.seq
                    ));
                }
                let arg = |i: usize| op.args[i].clone();
                match op.code {
                    // Counters are kept for good here: nothing reads them after their window.
                    b"P" => {
                        self.strings.insert(op.key.clone(), arg(0));
                    }
                    b"H" => {
                        self.hashes
                            .entry(op.key.clone())
                            .or_default()
                            .insert(arg(0), arg(1));
                    }
                    b"h" => {
                        self.hashes
                            .entry(op.key.clone())
                            .or_default()
                            .remove(&arg(0));
                    }
                    b"L" => {
                        let keep: usize = String::from_utf8(arg(1)).unwrap().parse().unwrap();
                        let list = self.lists.entry(op.key.clone()).or_default();
                        list.push(arg(0));
                        if keep > 0 && list.len() > keep {
                            list.drain(..list.len() - keep);
                        }
                    }
                    // The export is kept whole here: the checks count every event in it.
                    b"X" => self.streams.entry(op.key.clone()).or_default().push(arg(0)),
                    other => panic!("a write the scripts do not know: {other:?}"),
                }
            }
        }
        if std::env::var("SIM_LOG").is_ok() {
            for s in sections {
                for op in &s.ops {
                    if op.code == b"H" && op.args[0] == CORE_FIELD {
                        let id = op.key.rsplit(":a:").next().unwrap_or("").to_owned();
                        let (core, records) = self.load(&id).unwrap();
                        let state = quotad::domain::decode_account_of(
                            &id,
                            &core,
                            records.iter().map(|r| &r[..]),
                        );
                        let line = match state {
                            Ok(st) => format!(
                                "   {id} now {:?}",
                                st.snapshot(&Policy::default(), 0).map(|u| u.totals)
                            ),
                            Err(e) => format!("   {id} undecodable: {e}"),
                        };
                        self.trace.push(line);
                    }
                }
            }
        }
        Ok(self.now())
    }

    fn partition_index(&self, partition: u16) -> (Purchases, i64) {
        let tag = tag(PREFIX, partition);
        let purchases = (self.hashes.get(&format!("{tag}:pur")).into_iter().flatten())
            .map(|(id, at)| {
                let at: i64 = String::from_utf8_lossy(at).parse().unwrap();
                (
                    String::from_utf8_lossy(id).into_owned(),
                    Timestamp::from_millis(at),
                )
            })
            .collect();
        let holds = self.fences.get(&partition).map_or(0, |f| f.2);
        (purchases, holds)
    }

    fn load(&self, account_id: &str) -> Option<StoredAccount> {
        let keys = AccountKeys::of(PREFIX, PARTITIONS, account_id);
        let account = self.hashes.get(&keys.account)?;
        let core = account.get(CORE_FIELD)?.clone();
        let records = (account.iter())
            .filter(|(field, _)| *field != CORE_FIELD)
            .map(|(_, v)| v.clone())
            .collect();
        Some((core, records))
    }

    fn load_values(&self, keys: &[String]) -> Vec<Option<Vec<u8>>> {
        keys.iter().map(|k| self.strings.get(k).cloned()).collect()
    }
}

/// A replica's link to the storage.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    /// Nothing gets through until then.
    Cut(Instant),
    /// The replica crashed: nothing of it gets through again.
    Dead,
}

/// The network, the storage and the seed's choices, shared by everything in one run.
struct World {
    model: Mutex<Model>,
    rng: Mutex<Rng>,
    faults: Faults,
    links: Mutex<Vec<Link>>,
    /// A paused replica neither sends nor answers until then.
    paused: Mutex<Vec<Instant>>,
}

impl World {
    fn roll(&self, n: u64) -> u64 {
        self.rng.lock().unwrap().below(n)
    }

    /// One way between replica `replica` and the storage: delayed, perhaps lost (the caller
    /// then hears nothing until its wait runs out), held while the replica is paused.
    async fn travel(&self, replica: usize) -> Result<(), StorageError> {
        let delay = self.roll(self.faults.max_delay_ms + 1);
        let lost = self
            .rng
            .lock()
            .unwrap()
            .chance(self.faults.loss_per_thousand);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        loop {
            let until = self.paused.lock().unwrap()[replica];
            if until <= Instant::now() {
                break;
            }
            tokio::time::sleep_until(until).await;
        }
        let through = match self.links.lock().unwrap()[replica] {
            Link::Up => true,
            Link::Cut(until) => until <= Instant::now(),
            Link::Dead => false,
        };
        if lost || !through {
            tokio::time::sleep(LOST_WAIT).await;
            return Err(StorageError::Unavailable("lost on the way".into()));
        }
        Ok(())
    }
}

/// One replica's view of the storage, through its link.
struct Reach {
    world: Arc<World>,
    replica: usize,
}

impl Reach {
    async fn call<T>(&self, step: impl FnOnce(&mut Model) -> T) -> Result<T, StorageError> {
        self.world.travel(self.replica).await?;
        let answer = step(&mut self.world.model.lock().unwrap());
        self.world.travel(self.replica).await?;
        Ok(answer)
    }
}

impl OwnedStorage for Reach {
    fn join<'a>(
        &'a self,
        replica: &'a str,
        address: &'a str,
        lease_ms: u64,
    ) -> StorageFuture<'a, Vec<(String, String)>> {
        Box::pin(self.call(move |m| m.join(replica, address, lease_ms)))
    }

    fn acquire<'a>(
        &'a self,
        partition: u16,
        replica: &'a str,
        lease_ms: u64,
    ) -> StorageFuture<'a, Option<Taken>> {
        Box::pin(self.call(move |m| m.acquire(partition, replica, lease_ms)))
    }

    fn renew(&self, partition: u16, epoch: u64, lease_ms: u64) -> StorageFuture<'_, bool> {
        Box::pin(self.call(move |m| m.renew(partition, epoch, lease_ms)))
    }

    fn release(&self, partition: u16, epoch: u64) -> StorageFuture<'_, ()> {
        Box::pin(self.call(move |m| m.release(partition, epoch)))
    }

    fn write<'a>(
        &'a self,
        sections: &'a [&'a Section],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Written> + Send + 'a>> {
        Box::pin(async move {
            let partitions: Vec<u16> = sections.iter().map(|s| s.partition).collect();
            let result = match self.call(|m| m.write(sections)).await {
                Ok(written) => written,
                Err(e) => Err(e),
            };
            vec![(partitions, result)]
        })
    }

    fn partition_index(&self, partition: u16) -> StorageFuture<'_, (Purchases, i64)> {
        Box::pin(self.call(move |m| m.partition_index(partition)))
    }

    fn load<'a>(&'a self, account_id: &'a str) -> StorageFuture<'a, Option<StoredAccount>> {
        Box::pin(self.call(move |m| m.load(account_id)))
    }

    fn load_values<'a>(&'a self, keys: &'a [String]) -> StorageFuture<'a, Vec<Option<Vec<u8>>>> {
        Box::pin(self.call(move |m| m.load_values(keys)))
    }
}

fn settings() -> OwnedSettings {
    OwnedSettings {
        partitions: PARTITIONS,
        lease: Duration::from_millis(1_000),
        write_timeout: Duration::from_millis(800),
        ..OwnedSettings::default()
    }
}

/// A replica running: its id and its store.
type Running = (String, Arc<MemoryStore>);

/// The replicas: each slot holds the one running there now (a crashed one is replaced).
struct Cluster {
    world: Arc<World>,
    stores: Mutex<Vec<Option<Running>>>,
    started: Mutex<usize>,
}

impl Cluster {
    async fn start(&self, slot: usize) {
        let id = {
            let mut started = self.started.lock().unwrap();
            *started += 1;
            format!("replica-{slot}-{started}")
        };
        self.world.links.lock().unwrap()[slot] = Link::Up;
        let reach = Arc::new(Reach {
            world: self.world.clone(),
            replica: slot,
        });
        let rules = LiveRules::fixed(Arc::new(Policy::default()));
        let store = loop {
            match MemoryStore::open_over(
                rules.clone(),
                reach.clone(),
                PREFIX,
                &settings(),
                id.clone(),
            )
            .await
            {
                Ok(store) => break store,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.stores.lock().unwrap()[slot] = Some((id, Arc::new(store)));
    }

    fn crash(&self, slot: usize) {
        self.world.links.lock().unwrap()[slot] = Link::Dead;
        self.stores.lock().unwrap()[slot] = None;
    }

    /// A running replica: `owner` if it runs, else one chosen by the seed.
    fn pick(&self, owner: Option<&str>) -> Option<Running> {
        let stores = self.stores.lock().unwrap();
        if let Some(owner) = owner
            && let Some(found) = stores.iter().flatten().find(|(id, _)| id == owner)
        {
            return Some(found.clone());
        }
        let running: Vec<_> = stores.iter().flatten().cloned().collect();
        drop(stores);
        if running.is_empty() {
            return None;
        }
        let i = self.world.roll(running.len() as u64) as usize;
        Some(running[i].clone())
    }
}

/// A store call in flight.
type Pending<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send>>;

/// What the clients were told, per account.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
struct Told {
    plan: i64,
    credit: i64,
    charges: u64,
}

/// An answered decision: the replica that made it, on which partition, and when the call
/// began and was answered (by the storage's clock).
struct Answered {
    replica: String,
    partition: u16,
    at: i64,
    done: i64,
}

struct Run {
    cluster: Cluster,
    told: Mutex<BTreeMap<String, Told>>,
    answered: Mutex<Vec<Answered>>,
    clock_start: Instant,
}

impl Run {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(BASE_MS + self.clock_start.elapsed().as_millis() as i64)
    }

    /// Runs `op` until a replica answers it: on the owner a `Moved` names (as forwarding
    /// does), else on another running replica after a short wait.
    async fn until_answered<T>(
        &self,
        account: &str,
        op: impl Fn(Arc<MemoryStore>, Timestamp) -> Pending<T>,
    ) -> T {
        let mut owner: Option<String> = None;
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let Some((id, store)) = self.cluster.pick(owner.as_deref()) else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let at = Instant::now();
            match op(store, self.now()).await {
                Ok(answer) => {
                    let (at, done) = {
                        let mut model = self.cluster.world.model.lock().unwrap();
                        let at = model.clock(at);
                        let done = model.now();
                        model
                            .trace
                            .push(format!("{at}..{done} {account} answered by {id}"));
                        (at, done)
                    };
                    self.answered.lock().unwrap().push(Answered {
                        replica: id,
                        partition: partition_of(account, PARTITIONS),
                        at,
                        done,
                    });
                    return answer;
                }
                Err(StoreError::Moved { owner: to, .. }) => {
                    // Replicas may disagree for a round about who owns what.
                    owner = Some(to);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(StoreError::Unavailable(why)) => {
                    {
                        let mut model = self.cluster.world.model.lock().unwrap();
                        let now = model.now();
                        model
                            .trace
                            .push(format!("{now} {account} unavailable at {id}: {why}"));
                    }
                    owner = None;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{account}: {e:?}"),
            }
        }
        panic!("{account}: never answered");
    }

    async fn client(self: Arc<Self>, client: usize, until: Instant) {
        let mut n = 0;
        while Instant::now() < until {
            n += 1;
            let account = format!("acct-{}", self.cluster.world.roll(ACCOUNTS));
            let reserve = ReserveCommand {
                account_id: account.clone(),
                request_id: format!("c{client}-{n}"),
                product: "codex".into(),
                estimate: Usage::default(),
                cost: TASK,
                plan_hint: Some("plus".into()),
                ttl_ms: 60_000,
                reservation_id: format!("rsv-c{client}-{n}"),
                wait_for_top_up: false,
            };
            let reserved = self
                .until_answered(&account, |store, now| {
                    let reserve = reserve.clone();
                    Box::pin(async move { store.reserve(&reserve, now).await })
                })
                .await;
            let Decision::Allow { reservation_id, .. } = &reserved.decision else {
                if std::env::var("SIM_LOG").is_ok() {
                    let model = self.cluster.world.model.lock().unwrap();
                    let partition = partition_of(&account, PARTITIONS);
                    for line in model
                        .trace
                        .iter()
                        .filter(|l| l.contains(&format!("p{partition} ")) || l.contains(&account))
                    {
                        eprintln!("{line}");
                    }
                }
                panic!("{account} denied: {reserved:?}");
            };
            if n % 8 == 0 {
                // Now and then a task is abandoned: its hold stays open (the audit counts them).
                continue;
            }
            let commit = CommitCommand {
                account_id: account.clone(),
                reservation_id: reservation_id.to_string(),
                usage: Usage {
                    model: "gpt-5.5-mini".into(),
                    output_tokens: 5_000 * (TASK / CREDIT) as u64,
                    ..Usage::default()
                },
                cost: TASK,
                is_final: true,
                price_version: PriceSheet::default().version,
            };
            let committed = self
                .until_answered(&account, |store, now| {
                    let commit = commit.clone();
                    Box::pin(async move { store.commit(commit, now).await })
                })
                .await;
            let charged = committed.receipt.charged_total;
            {
                let mut told = self.told.lock().unwrap();
                let t = told.entry(account).or_default();
                t.plan += charged.plan;
                t.credit += charged.credit;
                t.charges += 1;
            }
            let think = self.cluster.world.roll(40);
            tokio::time::sleep(Duration::from_millis(think)).await;
        }
    }
}

/// Runs one seed; answers what it found (the same for the same seed).
async fn simulate(seed: u64, faults: Option<Faults>) -> Result<String, String> {
    let mut rng = Rng(seed);
    let faults = faults.unwrap_or_else(|| Faults::of(&mut rng));
    const REPLICAS: usize = 3;
    let world = Arc::new(World {
        model: Mutex::new(Model::new(faults.drift_ppm)),
        rng: Mutex::new(rng),
        faults,
        links: Mutex::new(vec![Link::Up; REPLICAS + 1]),
        paused: Mutex::new(vec![Instant::now(); REPLICAS + 1]),
    });
    let run = Arc::new(Run {
        cluster: Cluster {
            world: world.clone(),
            stores: Mutex::new(vec![None; REPLICAS + 1]),
            started: Mutex::new(0),
        },
        told: Mutex::default(),
        answered: Mutex::default(),
        clock_start: Instant::now(),
    });
    for slot in 0..REPLICAS {
        run.cluster.start(slot).await;
    }
    // Accounts, with credits beyond anything the run spends.
    for a in 0..ACCOUNTS {
        let account = format!("acct-{a}");
        let grant = GrantCommand {
            account_id: account.clone(),
            grant_id: format!("seed-{a}"),
            amount: 100_000 * CREDIT,
            source: LotSource::Purchase,
            expires_at: None,
        };
        let upsert = Account {
            id: account.clone(),
            plan: "plus".into(),
            credit_purchase_allowed: true,
        };
        run.until_answered(&account, |store, now| {
            let upsert = upsert.clone();
            Box::pin(async move { store.upsert_account(upsert, now).await })
        })
        .await;
        run.until_answered(&account, |store, now| {
            let grant = grant.clone();
            Box::pin(async move { store.grant(grant, now).await })
        })
        .await;
    }

    let load_for = Duration::from_secs(6);
    let until = Instant::now() + load_for;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(run.clone().client(c, until)))
        .collect();
    // The seed's faults, at times it picks.
    for _ in 0..faults.events {
        let wait = world.roll(load_for.as_millis() as u64 / (faults.events as u64 + 1));
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let slot = world.roll(REPLICAS as u64) as usize;
        let length = Duration::from_millis(300 + world.roll(2_700));
        match world.roll(3) {
            0 => world.paused.lock().unwrap()[slot] = Instant::now() + length,
            1 => {
                let mut links = world.links.lock().unwrap();
                if links[slot] == Link::Up {
                    links[slot] = Link::Cut(Instant::now() + length);
                }
            }
            _ => {
                run.cluster.crash(slot);
                tokio::time::sleep(Duration::from_millis(200 + world.roll(800))).await;
                run.cluster.start(slot).await;
            }
        }
    }
    for client in clients {
        client.await.map_err(|e| format!("a client failed: {e}"))?;
    }

    // Everyone stops; a new replica takes every partition once the leases run out, and reads.
    for slot in 0..REPLICAS {
        run.cluster.crash(slot);
    }
    run.cluster.start(REPLICAS).await;
    let (_, auditor) = run.cluster.pick(None).expect("the auditor runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    while auditor.owned_partitions() != Some(usize::from(PARTITIONS)) {
        if Instant::now() > deadline {
            return Err("the auditor never took every partition".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let told = run.told.lock().unwrap().clone();
    let mut summary = String::new();
    for a in 0..ACCOUNTS {
        let account = format!("acct-{a}");
        let t = told.get(&account).copied().unwrap_or_default();
        let usage = run
            .until_answered(&account, |store, now| {
                let account = account.clone();
                Box::pin(async move { store.usage(&account, 0, now).await })
            })
            .await;
        if usage.totals.spent != t.credit {
            return Err(format!(
                "{account}: credits spent {} but clients were told {}",
                usage.totals.spent, t.credit
            ));
        }
        for w in &usage.status.windows {
            if w.used - w.held != t.plan {
                return Err(format!(
                    "{account}: {} window used {} but clients were told {}",
                    w.name,
                    w.used - w.held,
                    t.plan
                ));
            }
        }
        summary.push_str(&format!("{account}:{}:{}:{};", t.charges, t.plan, t.credit));
    }
    // The export: one event per acknowledged charge, numbered 1..n.
    let model = world.model.lock().unwrap();
    let mut exported: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (key, entries) in &model.streams {
        if !key.ends_with(":x") {
            continue;
        }
        for entry in entries {
            let (account, event) = decode_event(entry).map_err(|e| e.to_string())?;
            exported.entry(account).or_default().push(event.seq);
        }
    }
    for a in 0..ACCOUNTS {
        let account = format!("acct-{a}");
        let mut seqs = exported.remove(&account).unwrap_or_default();
        seqs.sort_unstable();
        let charges = told.get(&account).map_or(0, |t| t.charges);
        if seqs != (1..=charges).collect::<Vec<_>>() {
            return Err(format!(
                "{account}: the export holds {seqs:?}, the clients were told of {charges} charges"
            ));
        }
    }
    // Each partition's open holds, as its fence keeps them, are those of its accounts.
    let mut open: BTreeMap<u16, i64> = BTreeMap::new();
    for a in 0..ACCOUNTS {
        let account = format!("acct-{a}");
        if let Some((core, records)) = model.load(&account) {
            let state = decode_account_of(&account, &core, records.iter().map(|r| &r[..]))
                .map_err(|e| format!("{account}: {e}"))?;
            *open.entry(partition_of(&account, PARTITIONS)).or_default() +=
                state.open_holds() as i64;
        }
    }
    for partition in 0..PARTITIONS {
        let kept = model.fences.get(&partition).map_or(0, |f| f.2);
        let held = open.get(&partition).copied().unwrap_or(0);
        if kept != held {
            return Err(format!(
                "partition {partition} keeps {kept} open holds, its accounts have {held}"
            ));
        }
    }
    // And the auditor counts them, while it holds every partition (faults may have cost it
    // some since it took them; nothing runs between these reads and the model's).
    let gauge = auditor.open_holds().map(|n| n as i64);
    let whole = auditor.owned_partitions() == Some(usize::from(PARTITIONS));
    if whole && gauge != Some(open.values().sum()) {
        return Err(format!(
            "the auditor counts {gauge:?} open holds, the accounts have {}",
            open.values().sum::<i64>()
        ));
    }
    // Lease disjointness: each answer came from the partition's lease holder, decided as the
    // call began (admission is its first step, and takes no time) or, if the partition was on
    // its way to the replica, once the replica had taken it.
    for answer in run.answered.lock().unwrap().iter() {
        let held = model.held.iter().any(|h| {
            h.partition == answer.partition
                && h.owner == answer.replica
                && ((h.from <= answer.at && answer.at < h.to)
                    || (answer.at < h.from && h.from <= answer.done))
        });
        if !held {
            return Err(format!(
                "{} answered for partition {} at {} without holding its lease",
                answer.replica, answer.partition, answer.at
            ));
        }
    }
    summary.push_str(&format!("answers:{}", run.answered.lock().unwrap().len()));
    Ok(summary)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

fn run_seed(seed: u64) -> Result<String, String> {
    if let Ok(filter) = std::env::var("SIM_LOG") {
        // What the replicas log, in virtual time, to follow one seed.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .try_init();
    }
    runtime().block_on(simulate(seed, None))
}

/// The seeds of this run: `SIM_SEED` alone, or `SIM_SEEDS` of them (by default a number the
/// suite runs in well under a minute), from a start that differs by day so that, over time,
/// the suite covers many more.
fn seeds(default: u64) -> Vec<u64> {
    if let Ok(seed) = std::env::var("SIM_SEED") {
        return vec![seed.parse().expect("SIM_SEED is a number")];
    }
    let count = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default);
    (0..count).collect()
}

#[test]
fn leases_stay_disjoint_and_every_answer_counts_once_over_many_seeds() {
    let seeds = seeds(1_000);
    // Two threads: the machine's cores.
    let (even, odd): (Vec<u64>, Vec<u64>) = seeds.iter().partition(|s| *s % 2 == 0);
    let failures: Vec<String> = std::thread::scope(|scope| {
        [even, odd]
            .into_iter()
            .map(|part| {
                scope.spawn(move || {
                    part.into_iter()
                        .filter_map(|seed| {
                            run_seed(seed)
                                .err()
                                .map(|e| format!("seed {seed}: {e} (replay: SIM_SEED={seed})"))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [7, 1_234] {
        let first = run_seed(seed).unwrap();
        eprintln!("seed {seed}: {first}");
        assert_eq!(run_seed(seed).unwrap(), first, "seed {seed}");
    }
}

/// The checks can fail: with the storage's clock running a third fast, leases run out there
/// well before their owners stop deciding, and some seed shows an answer from a replica whose
/// lease had ended.
#[test]
fn a_clock_drift_past_the_owners_margin_is_caught() {
    let faults = Faults {
        drift_ppm: 330_000,
        max_delay_ms: 20,
        loss_per_thousand: 50,
        events: 0,
    };
    let caught = (0..40)
        .filter_map(|seed| runtime().block_on(simulate(seed, Some(faults))).err())
        .any(|e| e.contains("without holding its lease"));
    assert!(
        caught,
        "no seed of 40 noticed leases ending under their owners"
    );
}
