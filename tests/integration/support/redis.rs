//! Real Redis for tests: `redis-server` processes on free loopback ports, standalone, as a
//! 3-master cluster built with `redis-cli --cluster create`, or as a master with a replica
//! watched by sentinels (`redis-server CONF --sentinel`). Each process is watched by a tiny
//! shell loop that kills it when the test binary exits, so no server outlives its tests even
//! when they are shared through a `static`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quotad::domain::Policy;
use quotad::store::{MemoryStore, OwnedSettings, RedisSettings};
use std::sync::Arc;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port whose cluster-bus port (port + 10000) is valid and free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55_535 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn scratch_dir(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "quotad-test-{}-{}-{}",
        std::process::id(),
        name,
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One `redis-server` process.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    dir: PathBuf,
    extra: Vec<String>,
    /// A config file read first (a sentinel's, which Sentinel rewrites as it learns).
    conf: Option<PathBuf>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `--cluster-enabled yes`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let dir = scratch_dir("redis");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let cluster = extra.iter().any(|a| a == "--cluster-enabled");
        for _ in 0..5 {
            let port = if cluster {
                free_cluster_port()
            } else {
                free_port()
            };
            let child = spawn_redis(port, &dir, None, &extra);
            let mut server = RedisServer {
                port,
                child,
                dir: dir.clone(),
                extra: extra.clone(),
                conf: None,
            };
            if server.wait_ready(Duration::from_secs(10)) {
                return server;
            }
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
        panic!("redis-server did not start (is it installed?)");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if self.cli(&["PING"]).is_some_and(|out| out.trim() == "PONG") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Runs `redis-cli` against this server; `None` if it failed.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sends the server a signal by name (`STOP` pauses it with its connections open, `CONT`
    /// resumes it).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn_redis(self.port, &self.dir, self.conf.as_deref(), &self.extra);
        assert!(
            self.wait_ready(Duration::from_secs(10)),
            "redis-server did not come back"
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn_redis(
    port: u16,
    dir: &std::path::Path,
    conf: Option<&std::path::Path>,
    extra: &[String],
) -> Child {
    let child = Command::new("redis-server")
        .args(conf)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed");
    watch(child.id());
    child
}

/// Kills `pid` once this test process is gone.
fn watch(pid: u32) {
    let me = std::process::id();
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill -9 {pid} 2>/dev/null"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// Three masters with no replicas, all slots assigned.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("redis-cli is installed");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ok = nodes.iter().all(|n| {
                n.cli(&["CLUSTER", "INFO"])
                    .is_some_and(|i| i.contains("cluster_state:ok"))
            });
            if ok {
                return RedisCluster { nodes };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the cluster did not become ready");
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// A standalone server shared by every test of a run that asks for one.
pub fn shared_server() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

/// A cluster shared by every test of a run that asks for one.
pub fn shared_cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(RedisCluster::start)
}

/// A key prefix no other store in this process uses, so stores sharing a server never meet.
pub fn fresh_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "t{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Settings for a standalone server (or a cluster when `cluster` is given), with a fresh prefix.
pub fn settings(url: &str, cluster: Option<&RedisCluster>) -> RedisSettings {
    RedisSettings {
        url: url.to_owned(),
        cluster_nodes: cluster.map(RedisCluster::urls).unwrap_or_default(),
        key_prefix: fresh_prefix(),
        command_timeout: Duration::from_millis(2_000),
        ..RedisSettings::default()
    }
}

/// The Redis store (the memory store's engine backed by Redis, every partition owned by this
/// store), at its default settings, on the shared standalone server.
pub async fn standalone_store() -> MemoryStore {
    let server = tokio::task::spawn_blocking(shared_server).await.unwrap();
    store_with(settings(&server.url(), None), Default::default()).await
}

/// The same on the shared 3-master cluster.
pub async fn cluster_store() -> MemoryStore {
    let cluster = tokio::task::spawn_blocking(shared_cluster).await.unwrap();
    store_with(settings("", Some(cluster)), Default::default()).await
}

pub async fn store_with(redis: RedisSettings, owned: OwnedSettings) -> MemoryStore {
    let rules = quotad::rules::LiveRules::fixed(Arc::new(Policy::default()));
    MemoryStore::open_on_redis(rules, &redis, &owned)
        .await
        .expect("owns every partition")
}

/// The name the sentinels of a [`RedisSentinel`] monitor its master under.
pub const SENTINEL_SERVICE: &str = "quotad";

/// A master, one replica of it, and sentinels (quorum: a majority of them) that promote the
/// replica once the master has not answered for a second.
pub struct RedisSentinel {
    /// The master and the replica, in the order they were started (the master may change).
    pub nodes: Vec<RedisServer>,
    pub sentinels: Vec<RedisServer>,
}

impl RedisSentinel {
    /// Starts the deployment and waits until every sentinel knows the replica and the other
    /// sentinels, so that a failover can start at once.
    pub fn start(sentinels: usize) -> RedisSentinel {
        let master = RedisServer::start();
        let replica =
            RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
        let quorum = sentinels / 2 + 1;
        let sentinels: Vec<RedisServer> = (0..sentinels)
            .map(|_| RedisServer::start_sentinel(master.port, quorum))
            .collect();
        let deployment = RedisSentinel {
            nodes: vec![master, replica],
            sentinels,
        };
        let everyone = format!("OK {} usable", deployment.sentinels.len());
        let ready = wait_until(Duration::from_secs(30), || {
            deployment.nodes[1]
                .cli(&["INFO", "replication"])
                .is_some_and(|i| i.contains("master_link_status:up"))
                && deployment.sentinels.iter().all(|s| {
                    s.cli(&["SENTINEL", "CKQUORUM", SENTINEL_SERVICE])
                        .is_some_and(|out| out.starts_with(&everyone))
                        && s.cli(&["SENTINEL", "REPLICAS", SENTINEL_SERVICE])
                            .is_some_and(|out| out.lines().any(|l| l == "slave"))
                })
        });
        assert!(
            ready,
            "the sentinels did not learn the replica and each other"
        );
        deployment
    }

    /// `redis+sentinel://…/quotad`, naming every sentinel.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = (self.sentinels.iter())
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{SENTINEL_SERVICE}", hosts.join(","))
    }

    /// The master's port as the first sentinel that answers names it.
    pub fn master_port(&self) -> u16 {
        (self.sentinels.iter())
            .find_map(|s| {
                let out = s.cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_SERVICE])?;
                out.lines().nth(1)?.trim().parse().ok()
            })
            .expect("a sentinel names the master")
    }

    /// The node that is the master now.
    pub fn master(&self) -> &RedisServer {
        let port = self.master_port();
        (self.nodes.iter())
            .find(|n| n.port == port)
            .expect("the master is one of the nodes")
    }

    /// Waits until every write the master acknowledged has reached the replica.
    pub fn wait_replicated(&self) {
        // Not WAIT from a new connection: it waits only for that connection's own writes (none),
        // and answers at once. The replica has caught up when its offset reaches the master's.
        let offset = |server: &RedisServer, field: &str| -> Option<u64> {
            let info = server.cli(&["INFO", "replication"])?;
            let line = info.lines().find(|l| l.starts_with(field))?;
            line.split(':').nth(1)?.trim().parse().ok()
        };
        let master = self.master();
        let target = offset(master, "master_repl_offset:").expect("the master's offset");
        let replica = (self.nodes.iter())
            .find(|n| n.port != master.port)
            .expect("a replica");
        let caught_up = wait_until(Duration::from_secs(5), || {
            offset(replica, "slave_repl_offset:").is_some_and(|at| at >= target)
        });
        assert!(caught_up, "the replica caught up");
    }

    /// Kills the master (as a crash would); returns its port.
    pub fn kill_master(&mut self) -> u16 {
        let port = self.master_port();
        let node = (self.nodes.iter_mut())
            .find(|n| n.port == port)
            .expect("the master is one of the nodes");
        node.kill();
        port
    }

    /// Waits until every live sentinel names a master other than `old`, and that node says it
    /// is one; returns its port.
    pub fn wait_for_new_master(&self, old: u16, limit: Duration) -> u16 {
        let mut named = None;
        let switched = wait_until(limit, || {
            let ports: Vec<Option<u16>> = (self.sentinels.iter())
                .map(|s| {
                    let out = s.cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_SERVICE])?;
                    out.lines().nth(1)?.trim().parse().ok()
                })
                .collect();
            let Some(Some(port)) = ports.first().copied() else {
                return false;
            };
            named = Some(port);
            port != old
                && ports.iter().all(|p| *p == Some(port))
                && (self.nodes.iter()).any(|n| {
                    n.port == port && n.cli(&["ROLE"]).is_some_and(|r| r.starts_with("master"))
                })
        });
        assert!(
            switched,
            "no new master within {limit:?} (sentinels name {named:?})"
        );
        named.unwrap()
    }
}

impl RedisSentinel {
    /// Waits until a client other than the sentinels (which name their connections) and the
    /// replicas is connected to the node at `port`: a store following the master there.
    pub fn wait_for_client(&self, port: u16, limit: Duration) -> bool {
        let node = (self.nodes.iter())
            .find(|n| n.port == port)
            .expect("one of the nodes");
        wait_until(limit, || {
            node.cli(&["CLIENT", "LIST"]).is_some_and(|list| {
                list.lines().any(|client| {
                    client.contains(" name= ")
                        && client.contains(" flags=N ")
                        && !client.contains(" cmd=client|list ")
                })
            })
        })
    }
}

impl RedisServer {
    /// A sentinel monitoring the master at `master_port` as [`SENTINEL_SERVICE`], with a short
    /// down-after (1 s) and failover timeout (2 s), so that a failover takes a few seconds.
    fn start_sentinel(master_port: u16, quorum: usize) -> RedisServer {
        let dir = scratch_dir("sentinel");
        let conf = dir.join("sentinel.conf");
        let extra = vec!["--sentinel".to_owned()];
        for _ in 0..5 {
            std::fs::write(
                &conf,
                format!(
                    "sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {master_port} {quorum}\n\
                     sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\n\
                     sentinel failover-timeout {SENTINEL_SERVICE} 2000\n"
                ),
            )
            .unwrap();
            let port = free_port();
            let child = spawn_redis(port, &dir, Some(&conf), &extra);
            let mut server = RedisServer {
                port,
                child,
                dir: dir.clone(),
                extra: extra.clone(),
                conf: Some(conf.clone()),
            };
            if server.wait_ready(Duration::from_secs(10)) {
                return server;
            }
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
        panic!("redis-server --sentinel did not start");
    }
}

/// Polls `done` every 50 ms for up to `limit`.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Sentinel deployment (three sentinels) shared by every test of a run that asks for one.
pub fn shared_sentinel() -> &'static RedisSentinel {
    static DEPLOYMENT: OnceLock<RedisSentinel> = OnceLock::new();
    DEPLOYMENT.get_or_init(|| RedisSentinel::start(3))
}

/// The Redis store through the shared Sentinel deployment.
pub async fn sentinel_store() -> MemoryStore {
    let deployment = tokio::task::spawn_blocking(shared_sentinel).await.unwrap();
    store_with(settings(&deployment.url(), None), Default::default()).await
}
