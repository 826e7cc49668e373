//! What the benchmarks share: a throwaway `redis-server`, quotad served in-process on a free
//! port, settings read from the environment, the process's RSS, and a simulated week of tasks.
#![allow(dead_code)]

pub mod week;

use std::collections::BTreeMap;
use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quotad::config::Config;
use quotad::domain::SystemClock;
use quotad::store::StoreError;

/// Resident set size of this process, from `/proc/self/status` (Linux).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The highest RSS of this process, sampled every 200 ms from now on by a thread of its own.
pub fn watch_peak_rss() -> Arc<AtomicU64> {
    let peak = Arc::new(AtomicU64::new(rss_bytes()));
    let watched = peak.clone();
    std::thread::spawn(move || {
        loop {
            watched.fetch_max(rss_bytes(), Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    peak
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

/// Runs a call until the store takes it: an UNAVAILABLE while the store's writes are behind
/// comes before anything is decided (and a retry is answered from the first answer anyway), so
/// the bench, like a client, waits a little and sends it again.
pub async fn patiently<T, F, Fut>(refused: &AtomicU64, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    loop {
        match call().await {
            Ok(answer) => return answer,
            Err(StoreError::Unavailable(_)) => {
                refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(err) => panic!("{err}"),
        }
    }
}

pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A `redis-server` on a free loopback port, killed when dropped.
pub struct Redis(Child, pub u16);

impl Redis {
    pub fn start() -> Redis {
        let port = StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Redis::start_on(port)
    }

    /// `REDIS_ARGS` in the environment adds `redis-server` arguments, as in
    /// `bench/figures.sh` (e.g. `--hash-max-listpack-value 256`).
    pub fn start_on(port: u16) -> Redis {
        let extra = std::env::var("REDIS_ARGS").unwrap_or_default();
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
            .args(extra.split_whitespace())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        let redis = Redis(child, port);
        for _ in 0..200 {
            if redis.cli(&["PING"]).trim() == "PONG" {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start");
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.1.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A numeric field of `INFO` (e.g. `used_memory`), 0 if absent.
    pub fn info(&self, field: &str) -> u64 {
        let prefix = format!("{field}:");
        (self.cli(&["INFO"]).lines())
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `cmdstat_*` call counts.
    pub fn command_calls(&self) -> BTreeMap<String, u64> {
        self.cli(&["INFO", "commandstats"])
            .lines()
            .filter_map(|line| {
                let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = stats
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("calls="))?
                    .parse()
                    .ok()?;
                Some((name.to_owned(), calls))
            })
            .collect()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Redis {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.1)
    }

    /// Kills it (as a crash would) and, with `restart`, starts it again on the same port.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn restart(&mut self) {
        self.kill();
        *self = Redis::start_on(self.1);
    }
}

/// Serves `config` in this process on a free port; returns its URL and the shutdown trigger.
pub async fn serve(config: Config) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let shutdown = async {
            let _ = rx.await;
        };
        quotad::run(
            &config,
            quotad::Listeners::grpc_only(listener),
            Arc::new(SystemClock),
            shutdown,
        )
        .await
        .unwrap();
    });
    (url, tx)
}
