//! Real Redis for tests: `redis-server` processes on free loopback ports, standalone or as a
//! 3-master cluster built with `redis-cli --cluster create`. Each process is watched by a tiny
//! shell loop that kills it when the test binary exits, so no server outlives its tests even
//! when they are shared through a `static`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quotad::domain::Policy;
use quotad::store::{RedisSettings, RedisStore};
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
            let child = spawn_redis(port, &dir, &extra);
            let mut server = RedisServer {
                port,
                child,
                dir: dir.clone(),
                extra: extra.clone(),
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
        self.child = spawn_redis(self.port, &self.dir, &self.extra);
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

fn spawn_redis(port: u16, dir: &std::path::Path, extra: &[String]) -> Child {
    let child = Command::new("redis-server")
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

/// A standalone server shared by the tests of one test binary.
pub fn shared_server() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

/// A cluster shared by the tests of one test binary.
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

/// Settings for a standalone server (or a cluster when `cluster` is given), with a fresh prefix,
/// and the memory in front of Redis as in production (GetUsage within the staleness bound).
pub fn settings(url: &str, cluster: Option<&RedisCluster>) -> RedisSettings {
    RedisSettings {
        url: url.to_owned(),
        cluster_nodes: cluster.map(RedisCluster::urls).unwrap_or_default(),
        key_prefix: fresh_prefix(),
        command_timeout: Duration::from_millis(2_000),
        // One maintenance step covers the whole slot ring.
        sweep_interval: Duration::from_secs(16),
        ..RedisSettings::default()
    }
}

pub async fn standalone_store() -> RedisStore {
    let server = tokio::task::spawn_blocking(shared_server).await.unwrap();
    RedisStore::connect(settings(&server.url(), None), Arc::new(Policy::default()))
        .await
        .expect("connects to redis")
}

pub async fn cluster_store() -> RedisStore {
    let cluster = tokio::task::spawn_blocking(shared_cluster).await.unwrap();
    RedisStore::connect(settings("", Some(cluster)), Arc::new(Policy::default()))
        .await
        .expect("connects to the cluster")
}

/// The memory store's engine backed by Redis in owned mode (every partition owned by this
/// store), at its default settings, on the shared standalone server.
pub async fn owned_store() -> quotad::store::MemoryStore {
    let server = tokio::task::spawn_blocking(shared_server).await.unwrap();
    owned_store_with(settings(&server.url(), None), Default::default()).await
}

/// The same on the shared 3-master cluster.
pub async fn owned_cluster_store() -> quotad::store::MemoryStore {
    let cluster = tokio::task::spawn_blocking(shared_cluster).await.unwrap();
    owned_store_with(settings("", Some(cluster)), Default::default()).await
}

pub async fn owned_store_with(
    redis: RedisSettings,
    owned: quotad::store::OwnedSettings,
) -> quotad::store::MemoryStore {
    let rules = quotad::rules::LiveRules::fixed(Arc::new(Policy::default()));
    quotad::store::MemoryStore::open_on_redis(rules, &redis, &owned)
        .await
        .expect("owns every partition")
}
