//! The shared store: all account state in Redis (standalone, behind Sentinel, or Cluster), so
//! that any number of quotad replicas agree, and state survives restarts as far as Redis
//! persistence goes.
//!
//! Each intent is one Lua function of one Redis function library (`lua/*.lua`, documented there
//! with the key schema; assembled in `library.rs`), run with FCALL: one round trip, atomic on the
//! account, since all of an account's keys share one hash tag. The functions are a port of
//! [`crate::domain::account`]; the store contract suite holds them to the same behaviour. They
//! answer with JSON facts ([`wire`]); words come from the domain.
//!
//! Connections are multiplexed (one pipelined connection per node, shared by every call), with
//! short connect and response timeouts, and reconnect on their own. A call that cannot reach
//! Redis in time fails with [`StoreError::Unavailable`]; it never hangs. A slow Redis is not a
//! down one: an attempt that times out is tried once more when running it twice cannot act
//! twice (every account function; see [`Operation::retry_safe`]), within the call's own time
//! limit, and the circuit breaker ([`health`]) opens on a failed connection or on sustained
//! failure, not on one slow call.

mod export;
mod front;
mod health;
mod journal;
mod keys;
mod library;
pub mod owned;
mod sentinel;
pub mod storage;
mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use arc_swap::ArcSwap;
use library::{Library, Operation};
use serde::de::DeserializeOwned;
use serde_json::json;

pub use keys::{hold_index_key, slot};
pub use sentinel::SentinelUrl;

use super::{ExportRead, Store, StoreError, StoreHealth};
use crate::domain::account::default_lot_expiry;
use crate::domain::rls::{CounterCheck, CounterStatus};
use crate::domain::time::{DAY_MS, MINUTE_MS};
use crate::domain::top_up::{PaymentResult, Purchase};
use crate::domain::{
    Account, CommitCommand, CommitOutcome, ExportedEvent, GrantCommand, GrantOutcome, Policy,
    ReleaseCommand, ReleaseOutcome, ReserveCommand, ReserveOutcome, RevokeCommand, RevokeOutcome,
    SetTopUpCommand, SettleTopUpCommand, Timestamp, TopUpOutcome, UsageSnapshot,
};
use crate::rules::LiveRules;
use front::Front;
pub use health::BreakerPolicy;
use health::{Failure, Health};
use wire::Reply;

/// How to reach Redis and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]` or `rediss://…` for TLS, or
    /// `redis+sentinel://[user:password@]host:port[,host:port…]/SERVICE[/db]` for the master
    /// that the sentinels at those addresses monitor as SERVICE; used when `cluster_nodes` is
    /// empty.
    pub url: String,
    /// Seed nodes of a Redis Cluster (`redis://host:port` each).
    pub cluster_nodes: Vec<String>,
    /// Prefix of every key, so several deployments (or tests) can share a Redis.
    pub key_prefix: String,
    pub connect_timeout: Duration,
    /// Longest wait for one attempt at a call: past it the attempt has timed out.
    pub command_timeout: Duration,
    /// Longest wait for a call in all (never less than `command_timeout`): a call whose
    /// attempt timed out is tried once more, if that cannot act twice and time is left. Equal
    /// to `command_timeout`: never retried.
    pub operation_timeout: Duration,
    /// When the circuit breaker opens, and for how long (its `probe_timeout` is overridden by
    /// `operation_timeout`, a call's whole wait).
    pub breaker: BreakerPolicy,
    /// How long an account with no activity and no live credits is kept.
    pub account_ttl: Duration,
    /// GetUsage is answered from this replica's memory when its copy is at most this old.
    pub usage_staleness: Duration,
    /// How often expired holds of clients that died are swept.
    pub sweep_interval: Duration,
    /// TLS (`rediss://`) material in PEM, when the system's trust store is not the one to use.
    pub tls: RedisTls,
    /// Streams the usage export is spread over (`PREFIX:export:{0}` …), for Clusters where
    /// one stream's node would be the bottleneck. An account's events stay in one shard.
    pub export_shards: u16,
    /// Whether charges reach the export stream through the per-slot outboxes and the relay on
    /// a standalone Redis too. On a Cluster they always do, since a script may only touch keys
    /// of one slot; a standalone Redis's Commit appends to the export stream itself, in the
    /// charge's own atomic step. For proxies that shard a "standalone" endpoint.
    pub export_outbox: bool,
}

impl RedisSettings {
    /// The longest a call waits in all.
    fn call_timeout(&self) -> Duration {
        self.operation_timeout.max(self.command_timeout)
    }
}

/// PEM bytes for TLS to Redis: a CA to trust instead of the system's roots, and a client
/// certificate and key for Redis servers that require them (`tls-auth-clients yes`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    pub ca: Option<Vec<u8>>,
    pub client_cert_and_key: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca.is_some())
            .field("client_cert", &self.client_cert_and_key.is_some())
            .finish()
    }
}

impl RedisTls {
    fn certificates(&self) -> Option<redis::TlsCertificates> {
        if self.ca.is_none() && self.client_cert_and_key.is_none() {
            return None;
        }
        Some(redis::TlsCertificates {
            client_tls: self
                .client_cert_and_key
                .clone()
                .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }),
            root_cert: self.ca.clone(),
        })
    }

    /// A client for one node: plain, or TLS with this material.
    fn client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        match self.certificates() {
            Some(certs) => redis::Client::build_with_tls(url, certs),
            None => redis::Client::open(url),
        }
    }
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            url: "redis://127.0.0.1:6379".into(),
            cluster_nodes: Vec::new(),
            key_prefix: "quotad".into(),
            connect_timeout: Duration::from_millis(250),
            command_timeout: Duration::from_millis(250),
            operation_timeout: Duration::from_millis(500),
            breaker: BreakerPolicy::default(),
            account_ttl: Duration::from_millis(400 * DAY_MS as u64),
            usage_staleness: Duration::from_millis(250),
            sweep_interval: Duration::from_millis(100),
            tls: RedisTls::default(),
            export_shards: 1,
            export_outbox: false,
        }
    }
}

/// One multiplexed connection to a standalone Redis or to the master Sentinel names (moved
/// after a failover), or a cluster connection that routes each command to the node owning its
/// slot.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Sentinel(sentinel::SentinelConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Sentinel(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Sentinel(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

pub struct RedisStore {
    conn: Connection,
    library: Library,
    /// The rules in force (a reload may replace them); each call runs on one policy.
    rules: Arc<LiveRules>,
    /// The current policy as the functions read it (ARGV[1]), encoded once per policy.
    encoded: ArcSwap<EncodedPolicy>,
    /// Whether a Commit appends its event to the export stream itself (a standalone Redis, see
    /// [`RedisSettings::export_outbox`]; its last argument is then the stream's length limit),
    /// rather than to its slot's outbox for the relay (its last argument empty).
    direct_export: bool,
    settings: RedisSettings,
    front: Arc<Front>,
    health: Health,
    /// Calls whose first attempt timed out and that were tried again, since start.
    retried: AtomicU64,
    /// Where the next maintenance tick's sweep starts.
    sweep_cursor: AtomicU16,
    /// Where the next look for stalled purchases starts.
    purchase_cursor: AtomicU16,
    /// Listens for admin changes announced by any replica.
    subscriber: JoinHandle<()>,
    /// Slots whose usage export outbox this replica wrote to since it last relayed.
    dirty: export::DirtySlots,
    /// This process's name on relay leases.
    replica: String,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

/// How long the maintenance ticks take to go once round the ring of 16,384 slots (sweeping
/// hold indexes, probing outboxes, looking for stalled purchases), whatever their interval.
const RING_ROUND: Duration = Duration::from_secs(16);

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects (failing if Redis cannot be reached within the connect timeout) and loads the
    /// function library on every primary.
    pub async fn connect(
        settings: RedisSettings,
        policy: Arc<Policy>,
    ) -> Result<RedisStore, StoreError> {
        Self::connect_with_rules(settings, LiveRules::fixed(policy)).await
    }

    /// As [`connect`](Self::connect), deciding by whatever `rules` hold when each call runs
    /// (they may be reloaded).
    pub async fn connect_with_rules(
        settings: RedisSettings,
        rules: Arc<LiveRules>,
    ) -> Result<RedisStore, StoreError> {
        let conn = connect(&settings).await?;
        let front = Arc::new(Front::default());
        let subscriber = spawn_subscriber(&settings, front.clone());
        let health = Health::new(BreakerPolicy {
            probe_timeout: settings.call_timeout(),
            ..settings.breaker
        });
        let policy = rules.policy();
        let store = RedisStore {
            encoded: ArcSwap::from_pointee(EncodedPolicy {
                json: policy_json(&policy, &settings),
                policy: policy.clone(),
            }),
            direct_export: settings.cluster_nodes.is_empty() && !settings.export_outbox,
            conn,
            library: Library::new(),
            rules,
            settings,
            front,
            health,
            retried: AtomicU64::new(0),
            sweep_cursor: AtomicU16::new(start_slice()),
            purchase_cursor: AtomicU16::new(start_slice()),
            subscriber,
            dirty: export::DirtySlots::new(),
            replica: replica_name(),
        };
        store.load_library().await?;
        Ok(store)
    }

    /// Loads the function library on every primary (again, if it is there already).
    async fn load_library(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(self.library.source())
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot load the function library (Redis 7.0 or later is needed): {e}"
                ))
            })?;
        Ok(())
    }

    pub fn settings(&self) -> &RedisSettings {
        &self.settings
    }

    /// How many accounts this replica remembers in front of Redis.
    pub fn remembered_accounts(&self) -> usize {
        self.front.len()
    }

    /// Calls whose first attempt timed out and that were tried again, since start.
    pub fn retried_calls(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    /// Whether a Commit appends its event to the export stream itself (given as its last key),
    /// rather than to its slot's outbox for the relay.
    fn direct_export(&self) -> bool {
        self.direct_export
    }

    /// The policy in force, encoded for the functions; encoded again only after a reload.
    fn policy(&self) -> Arc<EncodedPolicy> {
        let rules = self.rules.snapshot();
        let encoded = self.encoded.load();
        if Arc::ptr_eq(&encoded.policy, &rules.policy) {
            return arc_swap::Guard::into_inner(encoded);
        }
        let fresh = Arc::new(EncodedPolicy {
            json: policy_json(&rules.policy, &self.settings),
            policy: rules.policy.clone(),
        });
        self.encoded.store(fresh.clone());
        fresh
    }

    /// Runs one account operation on `policy` and decodes its JSON answer.
    async fn run<T: DeserializeOwned>(
        &self,
        policy: &EncodedPolicy,
        op: Operation,
        account_id: &str,
        now: Timestamp,
        args: &[&str],
    ) -> Result<T, StoreError> {
        let mut keys = keys::account_keys(&self.settings.key_prefix, account_id);
        if matches!(op, Operation::Commit) && self.direct_export() {
            let shard = self.export_shard(keys::account_slot(account_id));
            keys[13] = keys::export_key(&self.settings.key_prefix, shard);
        }
        let mut call = redis::cmd("FCALL");
        call.arg(self.library.function(op))
            .arg(keys.len())
            .arg(&keys)
            .arg(policy.json.as_str())
            .arg(now.as_millis())
            .arg(account_id)
            .arg(args);
        let text = self.invoke(&call, op).await?;
        match wire::decode_reply::<T>(&text).map_err(|e| {
            StoreError::Internal(format!("cannot decode script answer ({e}): {text}"))
        })? {
            Reply::Done(value) => Ok(value),
            Reply::Refused { err } => Err(err
                .into_error(&policy.policy, account_id, now)
                .map_err(StoreError::Internal)?
                .into()),
        }
    }

    /// Runs an `FCALL` of `op`: failing at once while the breaker is open; each attempt within
    /// the command timeout; an attempt that timed out tried once more if `op` is safe to run
    /// twice and the call's time (the operation timeout) is not up; telling the breaker how
    /// the call ended.
    async fn invoke(&self, call: &Cmd, op: Operation) -> Result<String, StoreError> {
        self.health.check().map_err(|e| {
            StoreError::Unavailable(format!("Redis is unreachable ({e}); retrying shortly"))
        })?;
        let started = Instant::now();
        let mut conn = self.conn.clone();
        let mut retried = false;
        loop {
            let left = self
                .settings
                .call_timeout()
                .saturating_sub(started.elapsed());
            let timeout = self.settings.command_timeout.min(left);
            let (failure, error) = match self.attempt(&mut conn, call, timeout).await {
                Ok(text) => {
                    self.health.succeeded();
                    return Ok(text);
                }
                Err(Missed::Script(error)) => {
                    // Redis answered: a bug in a function, not a Redis outage.
                    self.health.succeeded();
                    return Err(StoreError::Internal(format!("function failed: {error}")));
                }
                Err(Missed::TimedOut) => {
                    // The attempt may still run in Redis: only a call that acts once however
                    // often it runs may go again, and only while calls go through at all.
                    let time_left = started.elapsed() < self.settings.call_timeout();
                    if op.retry_safe() && !retried && time_left && self.health.is_closed() {
                        retried = true;
                        self.retried.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(?timeout, "Redis did not answer in time; trying again");
                        continue;
                    }
                    let tries = if retried { " (tried twice)" } else { "" };
                    let waited = started.elapsed().as_millis();
                    let error = format!("Redis did not answer within {waited} ms{tries}");
                    (Failure::Call, error)
                }
                Err(Missed::Connection(e)) => (Failure::Connection, format!("Redis: {e}")),
                Err(Missed::Error(e)) => (Failure::Call, format!("Redis: {e}")),
            };
            self.health.failed(failure, &error);
            return Err(StoreError::Unavailable(error));
        }
    }

    /// One attempt at a call, within `timeout`; loads the library again if Redis lost it.
    async fn attempt(
        &self,
        conn: &mut Connection,
        call: &Cmd,
        timeout: Duration,
    ) -> Result<String, Missed> {
        let mut answer = tokio::time::timeout(timeout, call.query_async::<String>(conn)).await;
        if let Ok(Err(e)) = &answer
            && e.to_string().contains("Function not found")
        {
            tracing::info!("Redis lost the function library; loading it again");
            self.load_library()
                .await
                .map_err(|e| Missed::Error(e.to_string()))?;
            answer = tokio::time::timeout(timeout, call.query_async::<String>(conn)).await;
        }
        match answer {
            Ok(Ok(text)) => Ok(text),
            Ok(Err(e))
                if matches!(e.kind(), redis::ErrorKind::Server(_))
                    && e.to_string().contains("user_function") =>
            {
                Err(Missed::Script(e.to_string()))
            }
            Ok(Err(e)) if e.is_timeout() => Err(Missed::TimedOut),
            // Refused, reset, closed, or no connection could be made.
            Ok(Err(e)) if e.is_io_error() || e.is_unrecoverable_error() => {
                Err(Missed::Connection(e.to_string()))
            }
            // An error answer (LOADING, BUSY, READONLY, OOM, …) or a client-side error.
            Ok(Err(e)) => Err(Missed::Error(e.to_string())),
            Err(_) => Err(Missed::TimedOut),
        }
    }

    /// Settles every account whose earliest hold expired at or before `now`, in every slot;
    /// returns how many accounts were settled.
    pub async fn sweep_expired_holds(&self, now: Timestamp) -> Result<usize, StoreError> {
        self.sweep_slots(now, (0..keys::SLOTS).collect()).await
    }

    /// The next slice of the slot ring from `cursor`: small, frequent slices rather than large
    /// ones, since each is a burst of reads that decisions queue behind in Redis.
    fn next_slots(&self, cursor: &AtomicU16) -> Vec<u16> {
        let per_tick = slots_per_tick(self.settings.sweep_interval);
        // The cursor wraps at 2^16, a multiple of the ring's size.
        let start = cursor.fetch_add(per_tick, Ordering::Relaxed);
        (0..per_tick)
            .map(|i| start.wrapping_add(i) % keys::SLOTS)
            .collect()
    }

    /// Sweeps the hold indexes of `slots`.
    async fn sweep_slots(&self, now: Timestamp, slots: Vec<u16>) -> Result<usize, StoreError> {
        let policy = self.policy();
        let due = self.indexed_until(slots, keys::hold_index_key, now).await?;
        let mut settled = 0;
        for account_id in &due {
            let _: serde::de::IgnoredAny = self
                .run(&policy, Operation::Sweep, account_id, now, &[])
                .await?;
            settled += 1;
        }
        Ok(settled)
    }

    /// The accounts a per-slot index (hold or purchase index) scores at or before `until`, at
    /// most 100 per slot, in slot order.
    async fn indexed_until(
        &self,
        slots: Vec<u16>,
        index_key: fn(&str, u16) -> String,
        until: Timestamp,
    ) -> Result<Vec<String>, StoreError> {
        let prefix = &self.settings.key_prefix;
        let indexed: Vec<(u16, Vec<String>)> = self
            .per_slot(slots, |slot| {
                let mut read = redis::cmd("ZRANGEBYSCORE");
                read.arg(index_key(prefix, slot))
                    .arg("-inf")
                    .arg(until.as_millis())
                    .arg("LIMIT")
                    .arg(0)
                    .arg(100);
                read
            })
            .await?;
        Ok(indexed.into_iter().flat_map(|(_, ids)| ids).collect())
    }

    /// Runs one read per slot and answers in slot order: on one Redis as one pipeline (one
    /// round trip, the cheapest for both sides every maintenance tick); on a Cluster, where a
    /// pipeline may not span slots, concurrently on the shared connection (which pipelines
    /// them per node).
    async fn per_slot<T: redis::FromRedisValue + Send + 'static>(
        &self,
        slots: Vec<u16>,
        read: impl Fn(u16) -> Cmd,
    ) -> Result<Vec<(u16, T)>, StoreError> {
        if !matches!(self.conn, Connection::Cluster(_)) {
            let mut pipe = redis::pipe();
            for &slot in &slots {
                pipe.add_command(read(slot));
            }
            let timeout = self.settings.command_timeout * 10;
            let answers: Vec<T> =
                match tokio::time::timeout(timeout, pipe.query_async(&mut self.conn.clone())).await
                {
                    Ok(Ok(answers)) => answers,
                    Ok(Err(e)) => {
                        return Err(StoreError::Unavailable(format!("slot scan: {e}")));
                    }
                    Err(_) => {
                        return Err(StoreError::Unavailable(
                            "slot scan: Redis did not answer in time".into(),
                        ));
                    }
                };
            return Ok(slots.into_iter().zip(answers).collect());
        }
        let mut answers = Vec::with_capacity(slots.len());
        // A few hundred reads in flight at a time: enough to fill the pipe, not to flood it.
        for chunk in slots.chunks(256) {
            let mut reads = tokio::task::JoinSet::new();
            for &slot in chunk {
                let mut conn = self.conn.clone();
                let cmd = read(slot);
                let timeout = self.settings.command_timeout * 10;
                reads.spawn(async move {
                    match tokio::time::timeout(timeout, cmd.query_async::<T>(&mut conn)).await {
                        Ok(Ok(answer)) => Ok((slot, answer)),
                        Ok(Err(e)) => Err(StoreError::Unavailable(format!("slot scan: {e}"))),
                        Err(_) => Err(StoreError::Unavailable(
                            "slot scan: Redis did not answer in time".into(),
                        )),
                    }
                });
            }
            while let Some(read) = reads.join_next().await {
                answers
                    .push(read.map_err(|e| StoreError::Internal(format!("slot scan task: {e}")))??);
            }
        }
        answers.sort_unstable_by_key(|&(slot, _)| slot);
        Ok(answers)
    }
}

/// How an attempt at a call got no answer.
enum Missed {
    /// None came within the attempt's time.
    TimedOut,
    /// The connection failed.
    Connection(String),
    /// Redis answered with an error.
    Error(String),
    /// A function raised a Lua error.
    Script(String),
}

/// One multiplexed connection to the Redis `settings` name (standalone, behind Sentinel, or
/// Cluster), failing if it cannot be reached within the connect timeout.
pub(super) async fn connect(settings: &RedisSettings) -> Result<Connection, StoreError> {
    // rustls is built without a default crypto provider; install ring's once per process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let unavailable =
        |e: redis::RedisError| StoreError::Unavailable(format!("cannot connect to Redis: {e}"));
    // One connection attempt per reconnection, no retry after a backoff: while Redis is down
    // the breaker paces the attempts (one probe per cool-down), and a probe that waited out a
    // backoff would hold its caller for nothing.
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(settings.connect_timeout))
        .set_response_timeout(Some(backstop(settings)))
        .set_number_of_retries(0);
    let conn = if SentinelUrl::is_sentinel(&settings.url) && settings.cluster_nodes.is_empty() {
        let finder = sentinel_finder(settings, config)?;
        let conn = sentinel::SentinelConnection::connect(finder)
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot connect to Redis through Sentinel: {e}"))
            })?;
        Connection::Sentinel(conn)
    } else if settings.cluster_nodes.is_empty() {
        let client = settings.tls.client(&settings.url).map_err(unavailable)?;
        let manager = tokio::time::timeout(
            settings.connect_timeout * 2,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| StoreError::Unavailable("cannot connect to Redis: timed out".into()))?
        .map_err(unavailable)?;
        Connection::Single(manager)
    } else {
        let mut builder = redis::cluster::ClusterClient::builder(settings.cluster_nodes.clone())
            .connection_timeout(settings.connect_timeout)
            .response_timeout(backstop(settings))
            .retries(1);
        if let Some(certs) = settings.tls.certificates() {
            builder = builder.certs(certs);
        }
        let client = builder.build().map_err(unavailable)?;
        let conn =
            tokio::time::timeout(settings.connect_timeout * 4, client.get_async_connection())
                .await
                .map_err(|_| {
                    StoreError::Unavailable("cannot connect to Redis Cluster: timed out".into())
                })?
                .map_err(unavailable)?;
        Connection::Cluster(conn)
    };
    Ok(conn)
}

/// How to find the master of the Sentinel deployment `settings.url` names.
fn sentinel_finder(
    settings: &RedisSettings,
    config: ConnectionManagerConfig,
) -> Result<sentinel::Finder, StoreError> {
    // The configuration refuses this too; a store built by hand must not go plaintext silently.
    if settings.tls.certificates().is_some() {
        return Err(StoreError::Internal(
            "TLS material is set, but quotad does not support TLS with Sentinel yet".into(),
        ));
    }
    let url = SentinelUrl::parse(&settings.url).map_err(|e| {
        StoreError::Internal(format!(
            "store.redis.url {:?}: {e}",
            crate::config::redact_url(&settings.url)
        ))
    })?;
    Ok(sentinel::Finder::new(
        url,
        settings.connect_timeout,
        settings.command_timeout,
        config,
    ))
}

/// The connections' own response timeout: later than any of this store's own time limits (so
/// that those decide, and tell a timeout from a failed connection), for the few commands that
/// have none (loading the library, reading the purchase index).
fn backstop(settings: &RedisSettings) -> Duration {
    (settings.command_timeout * 10).max(settings.call_timeout() * 2)
}

/// A policy and its encoding for the functions.
#[derive(Debug)]
struct EncodedPolicy {
    policy: Arc<Policy>,
    json: String,
}

/// The policy as the scripts read it: plan limits and routes, products' credit flags, and the
/// retention and lifetime settings.
fn policy_json(policy: &Policy, settings: &RedisSettings) -> String {
    let plans: serde_json::Map<String, serde_json::Value> = policy
        .plans
        .iter()
        .map(|(name, plan)| {
            let mut p = json!({
                "l5": plan.limit_5h_micros,
                "lw": plan.limit_weekly_micros,
                "credits": plan.overage == crate::domain::Overage::Credits,
            });
            if policy.shadow(name) {
                p["shadow"] = json!(true);
            }
            if let Some(to) = &plan.upgrade_to {
                p["up"] = json!(to);
            }
            (name.clone(), p)
        })
        .collect();
    let products: serde_json::Map<String, serde_json::Value> = policy
        .products
        .iter()
        .map(|(name, p)| (name.clone(), json!(p.credits)))
        .collect();
    json!({
        "plans": plans,
        "products": products,
        "default_plan": policy.default_plan,
        "retention_ms": i64::from(policy.limits.idempotency_retention_seconds) * 1_000,
        "account_ttl_ms": settings.account_ttl.as_millis() as i64,
        "admin_channel": admin_channel(&settings.key_prefix),
        "top_up": policy.top_up,
    })
    .to_string()
}

/// A Commit's usage as the function reads it: counts as decimal strings (Lua numbers are
/// doubles). Written straight from a struct: a `json!` tree per Commit showed in profiles.
fn usage_json(u: &crate::domain::Usage) -> String {
    #[derive(serde::Serialize)]
    struct UsageArg<'a> {
        model: &'a str,
        i: String,
        c: String,
        o: String,
        img: String,
        fast: bool,
    }
    serde_json::to_string(&UsageArg {
        model: &u.model,
        i: u.input_tokens.to_string(),
        c: u.cached_input_tokens.to_string(),
        o: u.output_tokens.to_string(),
        img: u.images.to_string(),
        fast: u.fast_mode,
    })
    .expect("plain data serializes")
}

impl Store for RedisStore {
    async fn reserve(
        &self,
        cmd: &ReserveCommand,
        now: Timestamp,
    ) -> Result<ReserveOutcome, StoreError> {
        let policy = self.policy();
        let args = [
            cmd.request_id.as_str(),
            &cmd.cost.to_string(),
            &cmd.product,
            cmd.plan_hint.as_deref().unwrap_or(""),
            &cmd.ttl_ms.to_string(),
            &cmd.reservation_id,
            &cmd.fingerprint().to_string(),
            &cmd.estimate.model,
            if cmd.wait_for_top_up { "1" } else { "0" },
        ];
        // Every Reserve asks Redis: only the record of a request's first answer may answer its
        // retries, and records written by other replicas are only in Redis.
        let reply: wire::ReserveJ = self
            .run(&policy, Operation::Reserve, &cmd.account_id, now, &args)
            .await?;
        self.front.changed(&cmd.account_id);
        Ok(ReserveOutcome {
            decision: reply.decision.into_decision(&policy.policy),
            estimate: reply.estimate,
            status: reply.status.into(),
            top_up: reply.top_up.map(Into::into),
            awaiting_top_up: reply.awaiting,
            shadow_denial: reply
                .shadow
                .map(|facts| Box::new(facts.into_denial(&policy.policy))),
        })
    }

    async fn commit(
        &self,
        cmd: CommitCommand,
        now: Timestamp,
    ) -> Result<CommitOutcome, StoreError> {
        let policy = self.policy();
        let args = [
            cmd.reservation_id.as_str(),
            &cmd.cost.to_string(),
            if cmd.is_final { "1" } else { "0" },
            &cmd.fingerprint().to_string(),
            &usage_json(&cmd.usage),
            &cmd.price_version,
            &policy.policy.limits.recent_events.to_string(),
            &if self.direct_export {
                policy.policy.limits.export_max_len.to_string()
            } else {
                String::new()
            },
        ];
        let reply: wire::CommitJ = self
            .run(&policy, Operation::Commit, &cmd.account_id, now, &args)
            .await?;
        self.front.changed(&cmd.account_id);
        if reply.event.is_some() && !self.direct_export() {
            self.dirty.mark(keys::account_slot(&cmd.account_id));
        }
        Ok(CommitOutcome {
            receipt: reply.receipt.into_receipt(&policy.policy),
            status: reply.status.into(),
            top_up: reply.top_up.map(Into::into),
            event: reply.event.map(Into::into),
            shadow_denial: reply
                .shadow
                .map(|facts| Box::new(facts.into_denial(&policy.policy))),
        })
    }

    async fn release(
        &self,
        cmd: ReleaseCommand,
        now: Timestamp,
    ) -> Result<ReleaseOutcome, StoreError> {
        let policy = self.policy();
        let args = [cmd.reservation_id.as_str()];
        let reply: wire::ReleaseJ = self
            .run(&policy, Operation::Release, &cmd.account_id, now, &args)
            .await?;
        self.front.changed(&cmd.account_id);
        Ok(ReleaseOutcome {
            released: reply.released.into(),
        })
    }

    async fn grant(&self, cmd: GrantCommand, now: Timestamp) -> Result<GrantOutcome, StoreError> {
        let policy = self.policy();
        let expires_at = cmd.expires_at.unwrap_or_else(|| default_lot_expiry(now));
        let args = [
            cmd.grant_id.as_str(),
            &cmd.amount.to_string(),
            cmd.source.as_str(),
            &expires_at.as_millis().to_string(),
            &cmd.fingerprint().to_string(),
        ];
        let reply: wire::GrantJ = self
            .run(&policy, Operation::Grant, &cmd.account_id, now, &args)
            .await?;
        self.front.forget(&cmd.account_id);
        Ok(GrantOutcome {
            lot: reply.lot.try_into().map_err(StoreError::Internal)?,
            credit_balance: reply.balance,
        })
    }

    async fn revoke_grant(
        &self,
        cmd: RevokeCommand,
        now: Timestamp,
    ) -> Result<RevokeOutcome, StoreError> {
        let policy = self.policy();
        let args = [cmd.grant_id.as_str()];
        let reply: wire::RevokeJ = self
            .run(&policy, Operation::Revoke, &cmd.account_id, now, &args)
            .await?;
        self.front.forget(&cmd.account_id);
        Ok(RevokeOutcome {
            revoked: reply.revoked,
            credit_balance: reply.balance,
            top_up: reply.top_up.map(Into::into),
        })
    }

    async fn set_top_up(
        &self,
        cmd: SetTopUpCommand,
        now: Timestamp,
    ) -> Result<TopUpOutcome, StoreError> {
        let policy = self.policy();
        let s = cmd.settings;
        let cap = s.monthly_cap().map(|c| c.to_string()).unwrap_or_default();
        let args = [
            if s.enabled() { "1" } else { "0" },
            &s.threshold().to_string(),
            &s.target().to_string(),
            &cap,
        ];
        let reply: wire::TopUpJ = self
            .run(&policy, Operation::SetTopUp, &cmd.account_id, now, &args)
            .await?;
        self.front.forget(&cmd.account_id);
        Ok(reply.into())
    }

    async fn settle_top_up(
        &self,
        cmd: SettleTopUpCommand,
        now: Timestamp,
    ) -> Result<TopUpOutcome, StoreError> {
        let policy = self.policy();
        let (kind, detail) = match &cmd.result {
            PaymentResult::Approved { payment_id } => ("approved", payment_id.as_str()),
            PaymentResult::Declined { error } => ("declined", error.as_str()),
            PaymentResult::Failed { error } => ("failed", error.as_str()),
        };
        let expiry = default_lot_expiry(now).as_millis().to_string();
        let args = [cmd.purchase_id.as_str(), kind, detail, &expiry];
        let reply: wire::TopUpJ = self
            .run(&policy, Operation::SettleTopUp, &cmd.account_id, now, &args)
            .await?;
        self.front.forget(&cmd.account_id);
        Ok(reply.into())
    }

    async fn upsert_account(
        &self,
        account: Account,
        now: Timestamp,
    ) -> Result<Account, StoreError> {
        let policy = self.policy();
        let allowed = if account.credit_purchase_allowed {
            "1"
        } else {
            "0"
        };
        let args = [&*account.plan, allowed];
        let reply: wire::AccountReply = self
            .run(&policy, Operation::Upsert, &account.id, now, &args)
            .await?;
        self.front.forget(&account.id);
        Ok(reply.account.into())
    }

    async fn account(&self, account_id: &str) -> Result<Account, StoreError> {
        let policy = self.policy();
        let reply: wire::AccountReply = self
            .run(
                &policy,
                Operation::Account,
                account_id,
                Timestamp::default(),
                &[],
            )
            .await?;
        Ok(reply.account.into())
    }

    async fn usage(
        &self,
        account_id: &str,
        recent_limit: usize,
        now: Timestamp,
    ) -> Result<UsageSnapshot, StoreError> {
        let policy = self.policy();
        let staleness =
            i64::try_from(self.settings.usage_staleness.as_millis()).unwrap_or(i64::MAX);
        let mut snapshot = match self.front.snapshot(account_id, now, staleness) {
            Some(snapshot) => snapshot,
            None => {
                // Fetch every kept event once, so that any recent_limit can be answered from the copy.
                let keep = policy.policy.limits.recent_events.to_string();
                let read = self.front.version(account_id);
                let reply: wire::SnapshotJ = self
                    .run(&policy, Operation::Usage, account_id, now, &[&keep])
                    .await?;
                let until = reply.stable_until.map(Timestamp::from_millis);
                let snapshot = reply.into_snapshot().map_err(StoreError::Internal)?;
                self.front
                    .remember_snapshot(read, account_id, &snapshot, (now, until));
                snapshot
            }
        };
        snapshot.recent.truncate(recent_limit);
        Ok(snapshot)
    }

    fn maintenance_interval(&self) -> Option<Duration> {
        Some(self.settings.sweep_interval)
    }

    async fn maintain(&self, now: Timestamp) {
        // A slice of the slots per tick keeps the sweep's cost flat: the whole ring is covered
        // every RING_ROUND, by each replica, starting from a random place.
        let slots = self.next_slots(&self.sweep_cursor);
        match self.sweep_slots(now, slots.clone()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(accounts = n, "returned expired holds"),
            Err(e) => tracing::debug!("sweep skipped: {e}"),
        }
        match self.relay_exports(slots).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(events = n, "relayed usage events to the export stream"),
            Err(e) => tracing::debug!("export relay skipped: {e}"),
        }
        self.front.prune(now.plus_millis(-MINUTE_MS));
    }

    fn retried_calls(&self) -> u64 {
        RedisStore::retried_calls(self)
    }

    fn health(&self) -> StoreHealth {
        self.health.status()
    }

    async fn rls_check(
        &self,
        domain: &str,
        checks: &[CounterCheck],
        now: Timestamp,
    ) -> Result<Vec<CounterStatus>, StoreError> {
        let mut call = redis::cmd("FCALL");
        call.arg(self.library.function(Operation::Rls))
            .arg(1)
            .arg(keys::rls_key(&self.settings.key_prefix, domain))
            .arg(now.as_millis())
            .arg(checks.len());
        for check in checks {
            let window = check.unit.window();
            call.arg(check.key.as_str())
                .arg(window.length_ms)
                .arg(window.bucket_ms)
                .arg(check.limit)
                .arg(check.hits);
        }
        let text = self.invoke(&call, Operation::Rls).await?;
        let answers: Vec<wire::RlsJ> = serde_json::from_str(&text)
            .map_err(|e| StoreError::Internal(format!("cannot decode rls answer ({e}): {text}")))?;
        Ok(answers.into_iter().map(Into::into).collect())
    }

    async fn export_read(
        &self,
        read: ExportRead,
        _now: Timestamp,
    ) -> Result<Vec<ExportedEvent>, StoreError> {
        // Idle times are Redis's own (XAUTOCLAIM), not the caller's clock.
        self.read_exports(&read).await
    }

    async fn export_ack(&self, group: &str, delivery_ids: &[String]) -> Result<u64, StoreError> {
        self.ack_exports(group, delivery_ids).await
    }

    async fn stalled_purchases(
        &self,
        started_before: Timestamp,
    ) -> Result<Vec<(String, Purchase)>, StoreError> {
        // A slice of the slots per call, like the sweeper.
        let slots = self.next_slots(&self.purchase_cursor);
        let indexed = self
            .indexed_until(slots, keys::purchase_index_key, started_before)
            .await?;
        let prefix = &self.settings.key_prefix;
        let mut found = Vec::new();
        let mut conn = self.conn.clone();
        for account in indexed {
            let key = keys::account_key(prefix, &account);
            let text: Option<String> = redis::cmd("HGET")
                .arg(key)
                .arg("tu_if")
                .query_async(&mut conn)
                .await
                .map_err(|e| StoreError::Unavailable(format!("purchase index: {e}")))?;
            if let Some(purchase) = text
                .filter(|t| !t.is_empty())
                .and_then(|t| serde_json::from_str::<wire::PurchaseJ>(&t).ok())
            {
                found.push((account, purchase.into()));
            }
        }
        Ok(found)
    }
}

/// Listens on the admin channel and forgets what this replica remembers of an account as soon
/// as an admin change for it is announced. Reconnects on its own; while disconnected, changes
/// may be missed, so it forgets everything each time it (re)subscribes. Behind Sentinel it
/// subscribes at the master the sentinels name at the time (replicas get what is published on
/// the master too, so one demoted under it still serves until Sentinel disconnects it).
fn spawn_subscriber(settings: &RedisSettings, front: Arc<Front>) -> JoinHandle<()> {
    let urls = if settings.cluster_nodes.is_empty() {
        vec![settings.url.clone()]
    } else {
        settings.cluster_nodes.clone()
    };
    let mut finder = (SentinelUrl::is_sentinel(&settings.url) && settings.cluster_nodes.is_empty())
        .then(|| sentinel_finder(settings, ConnectionManagerConfig::new()).ok())
        .flatten();
    let channel = admin_channel(&settings.key_prefix);
    let timeout = settings.connect_timeout;
    let tls = settings.tls.clone();
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(50);
        loop {
            let urls = match &mut finder {
                Some(finder) => finder.master_url().await.into_iter().collect(),
                None => urls.clone(),
            };
            for url in &urls {
                let Ok(client) = tls.client(url) else {
                    continue;
                };
                let Ok(Ok(mut pubsub)) =
                    tokio::time::timeout(timeout, client.get_async_pubsub()).await
                else {
                    continue;
                };
                if pubsub.subscribe(&channel).await.is_err() {
                    continue;
                }
                front.forget_all();
                backoff = Duration::from_millis(50);
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    if let Ok(account) = message.get_payload::<String>() {
                        front.forget(&account);
                    }
                }
                front.forget_all();
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    })
}

/// How many slots each maintenance tick takes, for the ticks to go round the ring in
/// RING_ROUND.
fn slots_per_tick(interval: Duration) -> u16 {
    let tick = interval.as_millis().max(1);
    let per_tick = (u128::from(keys::SLOTS) * tick).div_ceil(RING_ROUND.as_millis());
    u16::try_from(per_tick.min(u128::from(keys::SLOTS))).unwrap_or(keys::SLOTS)
}

/// A slot to start sweeping from, different on each replica (from the process id and the
/// clock), so that replicas together cover the ring sooner.
fn start_slice() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let seed = u64::from(nanos) ^ u64::from(std::process::id()).rotate_left(17);
    (seed % u64::from(keys::SLOTS)) as u16
}

/// A name unique to this process, for leases: host, process id and start time.
fn replica_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    format!("{host}/{}/{nanos}", std::process::id())
}

fn admin_channel(prefix: &str) -> String {
    format!("{prefix}:admin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maintenance_ticks_go_round_the_ring_in_sixteen_seconds_whatever_their_interval() {
        let ms = Duration::from_millis;
        assert_eq!(slots_per_tick(ms(100)), 103);
        assert_eq!(slots_per_tick(ms(1_000)), 1_024);
        assert_eq!(slots_per_tick(ms(1)), 2);
        assert_eq!(slots_per_tick(ms(16_000)), keys::SLOTS);
        assert_eq!(slots_per_tick(ms(60_000)), keys::SLOTS);
    }
}
