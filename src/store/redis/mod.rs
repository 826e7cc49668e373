//! Redis as the shared, durable backing store (standalone, behind Sentinel, or Cluster): how
//! to reach it, and the connections every part of the Redis engine shares. Decisions are made
//! in memory by the account's owner ([`owned`]); Redis keeps state, written by fenced batch
//! writes and small lease scripts ([`storage`]) that hold no quota rule.
//!
//! Connections are multiplexed (one pipelined connection per node, shared by every call), with
//! short connect and response timeouts, and reconnect on their own (the batch writer's own
//! connection on a standalone Redis excepted: see [`storage`]); the engine bounds every wait
//! itself and answers UNAVAILABLE rather than hang.

mod journal;
mod keys;
pub mod owned;
mod sentinel;
pub mod storage;

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

pub use keys::slot;
pub use sentinel::SentinelUrl;

use super::StoreError;

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
    /// Longest wait for one command: the engine's write attempts are sized from it.
    pub command_timeout: Duration,
    /// TLS (`rediss://`) material in PEM, when the system's trust store is not the one to use.
    pub tls: RedisTls,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            url: "redis://127.0.0.1:6379".into(),
            cluster_nodes: Vec::new(),
            key_prefix: "quotad".into(),
            connect_timeout: Duration::from_millis(250),
            command_timeout: Duration::from_millis(250),
            tls: RedisTls::default(),
        }
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
    pub(super) fn client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        match self.certificates() {
            Some(certs) => redis::Client::build_with_tls(url, certs),
            None => redis::Client::open(url),
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

/// One multiplexed connection to the Redis `settings` name (standalone, behind Sentinel, or
/// Cluster), failing if it cannot be reached within the connect timeout.
pub(super) async fn connect(settings: &RedisSettings) -> Result<Connection, StoreError> {
    // rustls is built without a default crypto provider; install ring's once per process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let unavailable =
        |e: redis::RedisError| StoreError::Unavailable(format!("cannot connect to Redis: {e}"));
    // One connection attempt per reconnection, no retry after a backoff: the engine paces its
    // own attempts, and one that waited out a backoff would hold its callers for nothing.
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

/// The connections' own response timeout: later than any of the engine's own time limits (so
/// that those decide, and tell a timeout from a failed connection), for the few commands that
/// have none (loading state at start, reading the purchase index).
pub(super) fn backstop(settings: &RedisSettings) -> Duration {
    settings.command_timeout * 10
}
