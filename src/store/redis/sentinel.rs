//! Redis behind Sentinel: the sentinels named by a `redis+sentinel://` URL say which node is
//! the master, and a [`SentinelConnection`] sends every command there, following the master
//! when Sentinel promotes a replica, without a restart.
//!
//! redis-rs's own Sentinel client finds a master once and hands back a client pinned to that
//! address; its connection manager would keep reconnecting to the old master (dead, or demoted
//! to a read-only replica) after a failover. So this module keeps one multiplexed connection
//! to the master found, as the standalone store does, and a background task that follows the
//! Sentinel clients' guidelines: it listens for a sentinel's `+switch-master` announcements,
//! and asks the sentinels again (`SENTINEL GET-MASTER-ADDR-BY-NAME`) at once after a command
//! failed in a way a failover causes (a dropped or refused connection, `READONLY`,
//! `MASTERDOWN`) and every second in any case, since an announcement can be missed and a master
//! cut off from this replica may fail commands only by timing out, which the connection never
//! sees. When the sentinels name another node that confirms it is a master (`ROLE`), the next
//! commands go there. A command never waits for the sentinels: when nothing fails, the hot path
//! is the plain multiplexed connection.

use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection, PubSubStream,
};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Value};
use tokio::sync::Notify;
use tokio_stream::StreamExt;

/// How `store.redis.url` names a Sentinel deployment.
pub const SCHEME: &str = "redis+sentinel://";

/// The port a sentinel listens on when the URL names none.
const SENTINEL_PORT: u16 = 26379;

/// How often the sentinels are asked when no command failed.
const POLL: Duration = Duration::from_secs(1);

/// The least time between two lookups: a failover fails every call in flight at once, and one
/// lookup answers them all.
const MIN_GAP: Duration = Duration::from_millis(100);

/// A Sentinel deployment: `redis+sentinel://[user:password@]host:port[,host:port…]/SERVICE[/db]`.
/// The credentials are the master's (sentinels are asked without any).
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// `host:port` of each sentinel, in the URL's order.
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the master under.
    pub service: String,
    /// `user:password` as written in the URL (percent-encoded), for the master.
    userinfo: Option<String>,
    pub db: i64,
}

impl std::fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelUrl")
            .field("sentinels", &self.sentinels)
            .field("service", &self.service)
            .field("credentials", &self.userinfo.is_some())
            .field("db", &self.db)
            .finish()
    }
}

impl SentinelUrl {
    /// Whether `url` names a Sentinel deployment (well formed or not).
    pub fn is_sentinel(url: &str) -> bool {
        url.get(..SCHEME.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(SCHEME))
    }

    /// Reads a `redis+sentinel://` URL; the error says what is wrong in it, without the
    /// password.
    pub fn parse(url: &str) -> Result<SentinelUrl, String> {
        if !Self::is_sentinel(url) {
            return Err(format!("it must start with {SCHEME}"));
        }
        let rest = &url[SCHEME.len()..];
        if rest.contains(['?', '#']) {
            return Err("it takes no ?options or #fragment".into());
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo.to_owned()), hosts),
            None => (None, authority),
        };
        let mut sentinels = Vec::new();
        for host in hosts.split(',') {
            sentinels.push(sentinel_address(host)?);
        }
        let mut path = path.split('/');
        let service = path.next().unwrap_or_default();
        if service.is_empty() {
            return Err(
                "it names no service (the master's name in Sentinel) after the hosts".into(),
            );
        }
        let db = match path.next() {
            None | Some("") => 0,
            Some(db) => db
                .parse::<i64>()
                .ok()
                .filter(|db| *db >= 0)
                .ok_or_else(|| format!("{db:?} after the service name is not a database number"))?,
        };
        if path.next().is_some_and(|extra| !extra.is_empty()) {
            return Err("it has more than SERVICE/db after the hosts".into());
        }
        Ok(SentinelUrl {
            sentinels,
            service: service.to_owned(),
            userinfo: userinfo.filter(|u| !u.is_empty()),
            db,
        })
    }

    /// The URL of the master at `address` (`host:port`), with the credentials and database.
    fn master_url(&self, address: &str) -> String {
        let auth = self
            .userinfo
            .as_deref()
            .map(|u| format!("{u}@"))
            .unwrap_or_default();
        format!("redis://{auth}{address}/{}", self.db)
    }
}

/// `host[:port]` of one sentinel, checked, with the default port filled in.
fn sentinel_address(host: &str) -> Result<String, String> {
    let (name, port) = match host.rsplit_once(':') {
        // An IPv6 address without a port has colons only inside its brackets.
        Some((name, port)) if !host.ends_with(']') => {
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{host:?} has no valid port"))?;
            (name, port)
        }
        _ => (host, SENTINEL_PORT),
    };
    if name.is_empty() || name.contains(['@', ' ']) {
        return Err(format!("{host:?} is not a sentinel's host:port"));
    }
    Ok(format!("{name}:{port}"))
}

/// `host:port` from the parts Sentinel answers with (IPv6 addresses in brackets).
fn join(host: &str, port: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// How to reach the sentinels and the master, and the sentinel that answered last.
pub(crate) struct Finder {
    url: SentinelUrl,
    connect_timeout: Duration,
    response_timeout: Duration,
    /// For connections to the master.
    manager: ConnectionManagerConfig,
    /// The sentinel asked first next time (the one that answered last), and its connection.
    link: Option<(usize, MultiplexedConnection)>,
}

impl Finder {
    pub(super) fn new(
        url: SentinelUrl,
        connect_timeout: Duration,
        response_timeout: Duration,
        manager: ConnectionManagerConfig,
    ) -> Finder {
        Finder {
            url,
            connect_timeout,
            response_timeout,
            manager,
            link: None,
        }
    }

    /// The master's `host:port` as the first sentinel that knows the service says; the last
    /// one that answered is asked first.
    async fn ask(&mut self) -> Result<String, String> {
        let count = self.url.sentinels.len();
        let start = self.link.as_ref().map_or(0, |(i, _)| *i);
        let mut why = Vec::new();
        for k in 0..count {
            let i = (start + k) % count;
            let sentinel = &self.url.sentinels[i];
            let mut conn = match self.link.take() {
                Some((j, conn)) if j == i => conn,
                _ => match self.dial(sentinel).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        why.push(format!("sentinel {sentinel}: {e}"));
                        continue;
                    }
                },
            };
            let mut ask = redis::cmd("SENTINEL");
            ask.arg("GET-MASTER-ADDR-BY-NAME").arg(&self.url.service);
            let asked = ask.query_async::<Option<(String, String)>>(&mut conn);
            match tokio::time::timeout(self.response_timeout, asked).await {
                Ok(Ok(Some((host, port)))) => {
                    self.link = Some((i, conn));
                    return Ok(join(&host, &port));
                }
                Ok(Ok(None)) => why.push(format!(
                    "sentinel {sentinel} monitors no master named {:?}",
                    self.url.service
                )),
                Ok(Err(e)) => why.push(format!("sentinel {sentinel}: {e}")),
                Err(_) => why.push(format!("sentinel {sentinel} did not answer in time")),
            }
        }
        Err(why.join("; "))
    }

    async fn dial(&self, sentinel: &str) -> Result<MultiplexedConnection, RedisError> {
        let client = redis::Client::open(format!("redis://{sentinel}"))?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// A connection to the node at `address`, once it confirms it is a master: the sentinels
    /// name the new master a moment before it has taken the role, and a node that came back
    /// may still call itself master before Sentinel turns it into a replica.
    async fn open(&self, address: &str) -> Result<ConnectionManager, String> {
        let client =
            redis::Client::open(self.url.master_url(address)).map_err(|e| e.to_string())?;
        let mut conn = tokio::time::timeout(
            self.connect_timeout * 2,
            ConnectionManager::new_with_config(client, self.manager.clone()),
        )
        .await
        .map_err(|_| format!("{address}: cannot connect in time"))?
        .map_err(|e| format!("{address}: {e}"))?;
        let role = tokio::time::timeout(
            self.response_timeout,
            redis::cmd("ROLE").query_async::<redis::Role>(&mut conn),
        )
        .await
        .map_err(|_| format!("{address}: ROLE got no answer in time"))?;
        match role {
            Ok(redis::Role::Primary { .. }) => Ok(conn),
            Ok(redis::Role::Replica { .. }) => {
                Err(format!("{address} is a replica, not the master"))
            }
            Ok(_) => Err(format!("{address} is not the master")),
            // ROLE is an @admin command, which an ACL user may lack: the sentinels' word
            // stands, and a READONLY answer has them asked again.
            Err(e) if e.kind() == ErrorKind::Server(redis::ServerErrorKind::NoPerm) => Ok(conn),
            Err(e) => Err(format!("{address}: ROLE: {e}")),
        }
    }

    /// Announcements of master switches from the first sentinel that takes the subscription,
    /// starting with the one that answered last.
    async fn switches(&self) -> Option<Pin<Box<PubSubStream>>> {
        let count = self.url.sentinels.len();
        let start = self.link.as_ref().map_or(0, |(i, _)| *i);
        for k in 0..count {
            let sentinel = &self.url.sentinels[(start + k) % count];
            let Ok(client) = redis::Client::open(format!("redis://{sentinel}")) else {
                continue;
            };
            let subscribed = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe("+switch-master").await?;
                Ok::<_, RedisError>(pubsub)
            };
            if let Ok(Ok(pubsub)) = tokio::time::timeout(self.connect_timeout * 2, subscribed).await
            {
                return Some(Box::pin(pubsub.into_on_message()));
            }
        }
        None
    }

    /// The new master's `host:port` if `message` announces a switch of this service
    /// (`NAME OLD-IP OLD-PORT NEW-IP NEW-PORT`).
    fn switched_to(&self, message: &redis::Msg) -> Option<String> {
        let text: String = message.get_payload().ok()?;
        match text.split_whitespace().collect::<Vec<_>>()[..] {
            [name, _, _, host, port] if name == self.url.service => Some(join(host, port)),
            _ => None,
        }
    }

    /// The master and a connection to it.
    async fn locate(&mut self) -> Result<(String, ConnectionManager), String> {
        let address = self.ask().await?;
        let conn = self.open(&address).await?;
        Ok((address, conn))
    }
}

/// One multiplexed connection to the master the sentinels name, moved to the new master after
/// a failover. Clones share the connection.
#[derive(Clone)]
pub(crate) struct SentinelConnection {
    shared: Arc<Shared>,
}

struct Shared {
    master: ArcSwap<Master>,
    /// Asks the watcher to look at once.
    wake: Arc<Notify>,
    /// For connections of a caller's own to the master.
    url: SentinelUrl,
    db: i64,
    watcher: OnceLock<tokio::task::AbortHandle>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.get() {
            watcher.abort();
        }
    }
}

struct Master {
    address: String,
    conn: ConnectionManager,
}

impl SentinelConnection {
    /// Finds the master through the sentinels and connects to it; from then on a background
    /// task (ended when the last clone is dropped) follows it.
    pub(super) async fn connect(mut finder: Finder) -> Result<SentinelConnection, String> {
        let (address, conn) = finder.locate().await?;
        tracing::info!(service = %finder.url.service, master = %address, "Redis master found through Sentinel");
        let shared = Arc::new(Shared {
            master: ArcSwap::from_pointee(Master { address, conn }),
            wake: Arc::new(Notify::new()),
            url: finder.url.clone(),
            db: finder.url.db,
            watcher: OnceLock::new(),
        });
        let watcher = tokio::spawn(watch(Arc::downgrade(&shared), shared.wake.clone(), finder));
        let _ = shared.watcher.set(watcher.abort_handle());
        Ok(SentinelConnection { shared })
    }

    fn conn(&self) -> ConnectionManager {
        self.shared.master.load().conn.clone()
    }

    /// The master's `host:port` now, for a connection of the caller's own (the batch
    /// writer's, which holds a `WATCH`).
    pub(super) fn master_address(&self) -> String {
        self.shared.master.load().address.clone()
    }

    /// The URL (with the credentials) of the master at `address`.
    pub(super) fn master_url(&self, address: &str) -> String {
        self.shared.url.master_url(address)
    }

    /// Has the watcher ask the sentinels at once: a connection of the caller's own to the
    /// master failed.
    pub(super) fn look_again(&self) {
        self.shared.wake.notify_one();
    }

    /// Has the watcher ask the sentinels at once when `result` failed as a failover makes
    /// commands fail.
    fn check<T>(&self, result: &Result<T, RedisError>) {
        if let Err(e) = result
            && master_may_have_moved(e)
        {
            self.shared.wake.notify_one();
        }
    }
}

/// Whether `e` is how a command fails when the master it was sent to is gone or no longer the
/// master: the connection dropped or was refused (a dead master, or the clients Sentinel
/// disconnects when it demotes one), or the node answers as a replica.
fn master_may_have_moved(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown
            )
        )
}

impl ConnectionLike for SentinelConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.conn().req_packed_command(cmd).await;
            self.check(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = (self.conn())
                .req_packed_commands(pipeline, offset, count)
                .await;
            self.check(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.shared.db
    }
}

/// Moves the connection when the sentinels name another node that is a master: as soon as a
/// sentinel announces the switch (`+switch-master`), and otherwise by asking them, every
/// [`POLL`] and whenever a command failed. The announcement matters most when the old master
/// stays up: Sentinel demotes it only some seconds after the switch, and until then it still
/// takes writes, which are lost when it becomes a replica.
async fn watch(shared: Weak<Shared>, wake: Arc<Notify>, mut finder: Finder) {
    let mut switches = None;
    loop {
        if switches.is_none() {
            switches = finder.switches().await;
        }
        let announced = tokio::select! {
            _ = wake.notified() => None,
            _ = tokio::time::sleep(POLL) => None,
            message = next_switch(&mut switches) => match message {
                Some(message) => finder.switched_to(&message),
                // The sentinel went away: another one is listened to from the next round.
                None => {
                    switches = None;
                    None
                }
            },
        };
        let Some(current) = shared.upgrade().map(|s| s.master.load().address.clone()) else {
            return;
        };
        let named = match announced {
            Some(address) => Ok(address),
            None => finder.ask().await,
        };
        match named {
            Ok(address) if address == current => {}
            Ok(address) => match finder.open(&address).await {
                Ok(conn) => {
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    tracing::warn!(
                        service = %finder.url.service,
                        from = %current,
                        to = %address,
                        "Sentinel names another Redis master; commands go there from now on"
                    );
                    shared.master.store(Arc::new(Master { address, conn }));
                }
                Err(why) => tracing::debug!(
                    service = %finder.url.service,
                    "the master Sentinel names is not ready yet: {why}"
                ),
            },
            Err(why) => tracing::warn!(
                service = %finder.url.service,
                "no sentinel said where the Redis master is: {why}"
            ),
        }
        tokio::time::sleep(MIN_GAP).await;
    }
}

/// The next announcement on `switches`; never, while no sentinel is listened to.
async fn next_switch(switches: &mut Option<Pin<Box<PubSubStream>>>) -> Option<redis::Msg> {
    match switches {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_names_the_sentinels_the_service_and_the_masters_credentials() {
        let url = SentinelUrl::parse(
            "redis+sentinel://app:pa%40ss@10.0.0.1:26379,sentinel-b:26380,[::1]/mymaster/2",
        )
        .unwrap();
        assert_eq!(
            url.sentinels,
            ["10.0.0.1:26379", "sentinel-b:26380", "[::1]:26379"]
        );
        assert_eq!(url.service, "mymaster");
        assert_eq!(url.db, 2);
        assert_eq!(
            url.master_url("10.0.0.9:6379"),
            "redis://app:pa%40ss@10.0.0.9:6379/2"
        );
        assert!(!format!("{url:?}").contains("pa%40ss"));

        let plain = SentinelUrl::parse("redis+sentinel://s1:5000/cache").unwrap();
        assert_eq!(plain.sentinels, ["s1:5000"]);
        assert_eq!((plain.db, plain.userinfo), (0, None));
        assert_eq!(join("::1", "6379"), "[::1]:6379");
        assert_eq!(join("10.0.0.9", "6379"), "10.0.0.9:6379");
    }

    #[test]
    fn a_malformed_url_says_what_is_wrong_without_the_password() {
        for (url, why) in [
            ("redis://s1:26379/mymaster", "must start with"),
            ("redis+sentinel://s1:26379", "names no service"),
            ("redis+sentinel://s1:26379/", "names no service"),
            ("redis+sentinel://s1:port/mymaster", "no valid port"),
            ("redis+sentinel://s1:0/mymaster", "no valid port"),
            ("redis+sentinel://s1:1,/mymaster", "not a sentinel"),
            ("redis+sentinel://u:secret@/mymaster", "not a sentinel"),
            ("redis+sentinel://s1/mymaster/x", "not a database number"),
            (
                "redis+sentinel://s1/mymaster/0/more",
                "more than SERVICE/db",
            ),
            ("redis+sentinel://s1/mymaster?db=1", "no ?options"),
        ] {
            let err = SentinelUrl::parse(url).unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
            assert!(!err.contains("secret"), "{url}: {err}");
        }
    }

    #[test]
    fn failover_errors_wake_the_watcher_and_answers_do_not() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(master_may_have_moved(&io));
        let parse = |text: &str| {
            (redis::parse_redis_value(text.as_bytes()).unwrap())
                .extract_error()
                .unwrap_err()
        };
        assert!(master_may_have_moved(&parse(
            "-READONLY You can't write against a read only replica.\r\n"
        )));
        assert!(!master_may_have_moved(&parse(
            "-ERR user_function failed\r\n"
        )));
    }
}
