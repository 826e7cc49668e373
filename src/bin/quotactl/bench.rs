//! `quotactl bench`: a load generator for a running quotad.
//!
//! Workers (`--concurrency` tokio tasks on the multi-threaded runtime) each run one operation at a
//! time and spread their calls over `--connections` HTTP/2 connections in turn. Each worker keeps
//! its own counters and HDR histograms, merged when the run ends, so the hot path shares nothing
//! but two atomic counters. Without `--rate` the workers go as fast as the server answers (closed
//! loop). With `--rate` a pacing thread releases operation `k` at `start + k / rate` whether or
//! not the workers keep up (open loop), and latency is measured from that scheduled instant, so
//! a server that stalls is charged for the calls that queued behind the stall.
//!
//! Before the run, a share of the accounts is set up: free accounts whose 5-hour window is used
//! up (their Reserves are denied) and, with an admin token, plus accounts with credits whose
//! 5-hour window is used up (they run on credits). Every other account is created by its first
//! Reserve. Accounts are drawn with a Zipf popularity from a seeded generator.
//!
//! Connections are made as every other subcommand makes them (`connect.rs`: address, TLS,
//! tokens). Before any setup, one call of the workload's service on the first connection
//! checks that quotad is reachable and takes this client's credentials, so that a wrong
//! setting stops the run at once with the cure rather than showing as a count of errors.

use std::collections::BTreeMap;
use std::error::Error as _;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use quotad::api::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor::Entry,
};
use quotad::api::envoy::service::ratelimit::v3::{RateLimitRequest, rate_limit_response};
use quotad::api::pb;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::connect::{AdminClient, Connection, QuotaClient, RlsClient};
use crate::failure::{Answer, Failure, Service, status_text};

/// Credits granted to each credit-funded account: enough for millions of benchmark tasks.
const CREDIT_GRANT_MICROS: i64 = 10_000 * 1_000_000;

#[derive(Args)]
pub struct BenchArgs {
    /// What one operation is (see above).
    #[arg(long, value_enum, default_value_t = Workload::ReserveCommit)]
    workload: Workload,
    /// HTTP/2 connections (each its own channel); calls take them in turn.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    connections: u32,
    /// Operations in flight at once, across all connections.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    concurrency: u32,
    /// Operations (Reserve+Commit pairs for reserve-commit) per second, scheduled by the clock
    /// (open loop); latency counts from each operation's scheduled start [default: as fast as
    /// the server answers].
    #[arg(long, value_name = "R", value_parser = parse_rate)]
    rate: Option<f64>,
    /// How long to measure, after the warm-up: e.g. 10s, 1.5s, 500ms [default: 10s].
    #[arg(long, value_name = "TIME", value_parser = parse_duration, conflicts_with = "requests")]
    duration: Option<Duration>,
    /// Measure this many operations (after the warm-up) instead of a duration.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,
    /// Run this long first without measuring (0s for none).
    #[arg(long, value_name = "TIME", value_parser = parse_duration, default_value = "1s")]
    warmup: Duration,
    /// Another replica of the same deployment (repeatable): the connections are spread over
    /// --addr and these, so each account's calls reach every replica (on Redis, most
    /// of them then forwarded to the account's owner).
    #[arg(long = "also", value_name = "ADDR")]
    also: Vec<String>,
    /// Distinct accounts, bench-RUN-0 … bench-RUN-(N-1).
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    accounts: u32,
    /// Zipf exponent of account popularity: the account of rank k is drawn in proportion to
    /// 1/k^S (0: uniform).
    #[arg(long, value_name = "S", default_value_t = 1.1, value_parser = parse_zipf)]
    zipf: f64,
    /// Seed of the account draws (and of which accounts are over the limit or on credits).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of accounts set up as free accounts with their 5-hour window used up.
    #[arg(long, value_name = "SHARE", default_value_t = 0.05, value_parser = parse_share)]
    over_limit_share: f64,
    /// Share of accounts set up as plus accounts with credits and their 5-hour window used up
    /// (needs the admin token; skipped without one).
    #[arg(long, value_name = "SHARE", default_value_t = 0.1, value_parser = parse_share)]
    credit_share: f64,
    /// RUN in the account ids [default: 8 random hex digits, so that runs do not collide].
    #[arg(long, value_name = "RUN")]
    run_id: Option<String>,
    /// Domain of the rls workload's requests (quotad's `rls.rules` match on it).
    #[arg(long, value_name = "DOMAIN", default_value = "quotad")]
    rls_domain: String,
    /// Product of each task (codex, excel, workspace_agents, or one added in quotad's config).
    #[arg(long, default_value = "codex")]
    product: String,
    /// Model of each task, as in quotad's price sheet.
    #[arg(long, default_value = "gpt-5.5-mini")]
    model: String,
    /// Input tokens of each task (estimate and final usage alike).
    #[arg(long, value_name = "TOKENS", default_value_t = 10)]
    input: u64,
    /// Cached input tokens of each task.
    #[arg(long, value_name = "TOKENS", default_value_t = 0)]
    cached: u64,
    /// Output tokens of each task.
    #[arg(long, value_name = "TOKENS", default_value_t = 1)]
    output: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// Reserve, then a final Commit of the same usage; latency of the pair and of the Reserve.
    ReserveCommit,
    /// Reserve alone; an allowed hold is then released (not timed).
    Reserve,
    /// grpc.health.v1.Health/Check of the server as a whole: the gRPC floor.
    Health,
    /// Two health checks one after the other on consecutive connections, as reserve-commit
    /// makes its two calls: the floor of a two-call task.
    HealthPair,
    /// envoy.service.ratelimit.v3 ShouldRateLimit with one descriptor, account_id = ACCOUNT.
    Rls,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::ReserveCommit => "reserve-commit",
            Workload::Reserve => "reserve",
            Workload::Health => "health",
            Workload::HealthPair => "health-pair",
            Workload::Rls => "rls",
        }
    }

    fn uses_accounts(self) -> bool {
        !matches!(self, Workload::Health | Workload::HealthPair)
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?}: expected a duration such as 10s, 1.5s or 500ms");
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else if text == "0" {
        (text, 1.0)
    } else {
        return Err(bad());
    };
    let value: f64 = number.parse().map_err(|_| bad())?;
    if !value.is_finite() || value < 0.0 || value * scale > 1e7 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(value * scale))
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= 1e8 => Ok(r),
        _ => Err(format!(
            "{text:?}: expected operations per second, e.g. 200"
        )),
    }
}

fn parse_share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if (0.0..=1.0).contains(&s) => Ok(s),
        _ => Err(format!(
            "{text:?}: expected a share between 0 and 1, e.g. 0.05"
        )),
    }
}

fn parse_zipf(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=10.0).contains(&s) => Ok(s),
        _ => Err(format!(
            "{text:?}: expected an exponent between 0 and 10, e.g. 1.1"
        )),
    }
}

/// splitmix64: tiny, fast and good enough to draw accounts.
#[derive(Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 53 bits.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n), by multiply-and-shift.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Zipf popularity over ranks 0..n: rank k is drawn with weight 1/(k+1)^s.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for k in 1..=n {
            sum += (k as f64).powf(-s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        if let Some(last) = cdf.last_mut() {
            *last = 1.0;
        }
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut SplitMix64) -> usize {
        let u = rng.unit();
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Free = 0,
    OverLimit = 1,
    Credit = 2,
}

/// The accounts of one run: ids by account number, their kind, and who is popular.
struct Population {
    ids: Vec<String>,
    kinds: Vec<Kind>,
    zipf: Zipf,
    /// Account number of each popularity rank (a seeded shuffle).
    by_rank: Vec<u32>,
}

impl Population {
    fn new(run: &str, n: usize, zipf: f64, seed: u64, over: usize, credit: usize) -> Population {
        let ids = (0..n).map(|i| format!("bench-{run}-{i}")).collect();
        let kinds = (0..n)
            .map(|i| {
                if i < over {
                    Kind::OverLimit
                } else if i < over + credit {
                    Kind::Credit
                } else {
                    Kind::Free
                }
            })
            .collect();
        let mut by_rank: Vec<u32> = (0..n as u32).collect();
        let mut rng = SplitMix64(seed ^ 0x5eed_0fac_c000_0075);
        for i in (1..n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            by_rank.swap(i, j);
        }
        Population {
            ids,
            kinds,
            zipf: Zipf::new(n, zipf),
            by_rank,
        }
    }

    fn draw(&self, rng: &mut SplitMix64) -> usize {
        self.by_rank[self.zipf.sample(rng)] as usize
    }
}

/// gRPC codes by their number, then what the tool counts as errors that are not gRPC errors.
pub(crate) const ERROR_NAMES: [&str; 18] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
    // A health check answered with a status other than SERVING.
    "NOT_SERVING",
];
const NOT_SERVING: usize = 17;

enum Outcome {
    Ok,
    Denied,
    Error(usize, tonic::Status),
}

fn error(status: tonic::Status) -> Outcome {
    Outcome::Error(status.code() as usize, status)
}

/// What one worker saw, merged at the end.
struct Stats {
    ok: u64,
    denied: u64,
    denied_by_kind: [u64; 3],
    errors: [u64; ERROR_NAMES.len()],
    /// The first message of each error, to say what went wrong.
    first_error: [Option<String>; ERROR_NAMES.len()],
    latency: Histogram<u64>,
    reserve_latency: Histogram<u64>,
    last_done: Option<Instant>,
}

/// A histogram of microseconds at 3 significant figures, growing as larger values arrive.
fn histogram() -> Histogram<u64> {
    let mut h = Histogram::new_with_bounds(1, 10_000, 3).expect("valid histogram bounds");
    h.auto(true);
    h
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Stats {
    fn new() -> Stats {
        Stats {
            ok: 0,
            denied: 0,
            denied_by_kind: [0; 3],
            errors: [0; ERROR_NAMES.len()],
            first_error: Default::default(),
            latency: histogram(),
            reserve_latency: histogram(),
            last_done: None,
        }
    }

    fn operations(&self) -> u64 {
        self.ok + self.denied + self.errors.iter().sum::<u64>()
    }

    fn merge(&mut self, other: Stats) {
        self.ok += other.ok;
        self.denied += other.denied;
        for (a, b) in self.denied_by_kind.iter_mut().zip(other.denied_by_kind) {
            *a += b;
        }
        for (a, b) in self.errors.iter_mut().zip(other.errors) {
            *a += b;
        }
        for (a, b) in self.first_error.iter_mut().zip(other.first_error) {
            if a.is_none() {
                *a = b;
            }
        }
        self.latency.add(&other.latency).expect("histograms merge");
        self.reserve_latency
            .add(&other.reserve_latency)
            .expect("histograms merge");
        self.last_done = self.last_done.max(other.last_done);
    }
}

/// How operations are started.
enum Pacing {
    /// As fast as the workers go; the measured part starts at `measure_from`.
    Closed {
        measure_from: Instant,
        end: Option<Instant>,
        requests: Option<u64>,
    },
    /// Operation k is released by the pacing thread at `start + k / rate`.
    Open {
        permits: Arc<Semaphore>,
        start: Instant,
        rate: f64,
        warm: u64,
        total: u64,
    },
}

/// What the workers share.
struct Shared {
    workload: Workload,
    pacing: Pacing,
    /// Operations claimed (open loop: all of them; closed loop with --requests: measured ones).
    claimed: AtomicU64,
    /// Measured operations finished, for the progress bar.
    done: AtomicU64,
    population: Option<Arc<Population>>,
    product: String,
    usage: pb::Usage,
    rls_domain: String,
}

enum Clients {
    Quota(Vec<QuotaClient>),
    Health(Vec<HealthClient<Channel>>),
    Rls(Vec<RlsClient>),
}

struct Worker {
    shared: Arc<Shared>,
    clients: Clients,
    /// The connection of the next call, of `connections`.
    turn: usize,
    connections: usize,
    rng: SplitMix64,
    /// Prefix of this worker's Reserve request ids.
    id: usize,
    seq: u64,
    stats: Stats,
}

impl Worker {
    fn next_turn(&mut self) -> usize {
        let t = self.turn;
        self.turn = if t + 1 == self.connections { 0 } else { t + 1 };
        t
    }

    async fn run(mut self) -> Stats {
        let shared = self.shared.clone();
        loop {
            let (from, measured) = match &shared.pacing {
                Pacing::Closed {
                    measure_from,
                    end,
                    requests,
                } => {
                    let now = Instant::now();
                    if end.is_some_and(|end| now >= end) {
                        break;
                    }
                    let measured = now >= *measure_from;
                    if measured
                        && let Some(n) = requests
                        && shared.claimed.fetch_add(1, Ordering::Relaxed) >= *n
                    {
                        break;
                    }
                    (now, measured)
                }
                Pacing::Open {
                    permits,
                    start,
                    rate,
                    warm,
                    total,
                } => {
                    match permits.acquire().await {
                        Ok(permit) => permit.forget(),
                        Err(_) => break,
                    }
                    let k = shared.claimed.fetch_add(1, Ordering::Relaxed);
                    if k >= *total {
                        break;
                    }
                    (
                        *start + Duration::from_secs_f64(k as f64 / rate),
                        k >= *warm,
                    )
                }
            };
            let account = shared.population.as_ref().map(|p| p.draw(&mut self.rng));
            let (outcome, reserve_done) = self.operation(account).await;
            if measured {
                let done = Instant::now();
                self.record(outcome, account, from, reserve_done, done);
                shared.done.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.stats
    }

    fn record(
        &mut self,
        outcome: Outcome,
        account: Option<usize>,
        from: Instant,
        reserve_done: Option<Instant>,
        done: Instant,
    ) {
        let s = &mut self.stats;
        s.last_done = Some(done);
        match outcome {
            Outcome::Error(i, status) => {
                s.errors[i] += 1;
                if s.first_error[i].is_none() {
                    s.first_error[i] = Some(if status.source().is_some() {
                        status_text(&status)
                    } else {
                        status.message().to_owned()
                    });
                }
                return;
            }
            Outcome::Ok => s.ok += 1,
            Outcome::Denied => {
                s.denied += 1;
                if let (Some(a), Some(p)) = (account, &self.shared.population) {
                    s.denied_by_kind[p.kinds[a] as usize] += 1;
                }
            }
        }
        s.latency
            .record(micros(done.saturating_duration_since(from)))
            .ok();
        if let Some(r) = reserve_done {
            s.reserve_latency
                .record(micros(r.saturating_duration_since(from)))
                .ok();
        }
    }

    /// One operation, and when its Reserve was answered (reserve workloads).
    async fn operation(&mut self, account: Option<usize>) -> (Outcome, Option<Instant>) {
        let shared = self.shared.clone();
        let account_id = || {
            let p = shared.population.as_ref().expect("accounts");
            p.ids[account.expect("an account")].clone()
        };
        let t = self.next_turn();
        match &mut self.clients {
            Clients::Health(clients) => {
                let request = HealthCheckRequest {
                    service: String::new(),
                };
                let mut answer = clients[t].check(request.clone()).await;
                if shared.workload == Workload::HealthPair && answer.is_ok() {
                    // The second call takes the next connection, as a Commit does.
                    let t = if t + 1 == clients.len() { 0 } else { t + 1 };
                    self.turn = if t + 1 == clients.len() { 0 } else { t + 1 };
                    answer = clients[t].check(request).await;
                }
                let outcome = match answer {
                    Ok(r) if serving(r.get_ref()) => Outcome::Ok,
                    Ok(_) => Outcome::Error(
                        NOT_SERVING,
                        tonic::Status::unavailable("the health check did not answer SERVING"),
                    ),
                    Err(s) => error(s),
                };
                (outcome, None)
            }
            Clients::Rls(clients) => {
                let request = RateLimitRequest {
                    domain: shared.rls_domain.clone(),
                    descriptors: vec![RateLimitDescriptor {
                        entries: vec![Entry {
                            key: "account_id".into(),
                            value: account_id(),
                        }],
                        ..Default::default()
                    }],
                    hits_addend: 0,
                };
                let outcome = match clients[t].should_rate_limit(request).await {
                    Ok(r) => match r.into_inner().overall_code() {
                        rate_limit_response::Code::OverLimit => Outcome::Denied,
                        // UNKNOWN is let through by Envoy too.
                        _ => Outcome::Ok,
                    },
                    Err(s) => error(s),
                };
                (outcome, None)
            }
            Clients::Quota(clients) => {
                let request = pb::ReserveRequest {
                    account_id: account_id(),
                    request_id: next_request_id(self.id, &mut self.seq),
                    product: shared.product.clone(),
                    estimate: Some(shared.usage.clone()),
                    plan_hint: String::new(),
                    ttl_seconds: 0,
                };
                let answer = clients[t].reserve(request).await;
                let reserved = Instant::now();
                let answer = match answer {
                    Ok(a) => a.into_inner(),
                    Err(s) => return (error(s), None),
                };
                if answer.decision() != pb::Decision::Allow {
                    return (Outcome::Denied, Some(reserved));
                }
                let reservation_id = answer.reservation_id;
                // The second call takes the next connection.
                let t = if t + 1 == clients.len() { 0 } else { t + 1 };
                self.turn = if t + 1 == clients.len() { 0 } else { t + 1 };
                if shared.workload == Workload::Reserve {
                    // Not timed: the operation is the Reserve.
                    let request = pb::ReleaseRequest {
                        account_id: account_id(),
                        reservation_id,
                    };
                    return match clients[t].release(request).await {
                        Ok(_) => (Outcome::Ok, Some(reserved)),
                        Err(s) => (error(s), None),
                    };
                }
                let request = pb::CommitRequest {
                    account_id: account_id(),
                    reservation_id,
                    usage: Some(shared.usage.clone()),
                    r#final: true,
                };
                match clients[t].commit(request).await {
                    Ok(_) => (Outcome::Ok, Some(reserved)),
                    Err(s) => (error(s), None),
                }
            }
        }
    }
}

/// A Reserve request id unique within the run: the worker and its count.
fn next_request_id(worker: usize, seq: &mut u64) -> String {
    *seq += 1;
    let mut id = String::with_capacity(24);
    let _ = write!(id, "b{worker:x}-{seq:x}");
    id
}

fn serving(r: &HealthCheckResponse) -> bool {
    r.status() == ServingStatus::Serving
}

/// Releases operations to the workers on schedule, from a thread of its own (its sleeps are
/// finer than the runtime's millisecond timer), then lets every waiting worker see the end.
fn pace(permits: Arc<Semaphore>, start: Instant, rate: f64, total: u64, workers: usize) {
    let mut released = 0u64;
    while released < total {
        let elapsed = start.elapsed().as_secs_f64();
        // Operation k is due at k / rate: 0 ..= floor(elapsed * rate) are due now.
        let due = ((elapsed * rate) as u64).saturating_add(1).min(total);
        if due > released {
            permits.add_permits((due - released) as usize);
            released = due;
        }
        if released < total {
            let next = start + Duration::from_secs_f64(released as f64 / rate);
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
        }
    }
    permits.add_permits(workers);
}

/// Connects `n` separate channels.
async fn connect(conn: &Connection, n: u32) -> Result<Vec<Channel>, Failure> {
    let mut channels = Vec::with_capacity(n as usize);
    for _ in 0..n {
        channels.push(conn.channel().await?);
    }
    Ok(channels)
}

/// One call of the workload's service before anything else, so that a wrong address, TLS
/// setting or token fails the run at once with its cure, rather than as a count of errors.
async fn preflight(
    conn: &Connection,
    channel: &Channel,
    workload: Workload,
    rls_domain: &str,
    account: Option<&str>,
) -> Result<(), Failure> {
    match workload {
        Workload::Health | Workload::HealthPair => {
            HealthClient::new(channel.clone())
                .check(HealthCheckRequest::default())
                .await
                .answer(Service::Health)?;
        }
        Workload::Rls => {
            // No descriptors: refused as invalid after the token is checked, so nothing is
            // counted against any account.
            let request = RateLimitRequest {
                domain: rls_domain.to_owned(),
                descriptors: Vec::new(),
                hits_addend: 0,
            };
            match conn.rls(channel.clone()).should_rate_limit(request).await {
                Err(status) if status.code() == tonic::Code::InvalidArgument => {}
                answer => {
                    answer.answer(Service::Rls)?;
                }
            }
        }
        Workload::Reserve | Workload::ReserveCommit => {
            let request = pb::GetUsageRequest {
                account_id: account.unwrap_or("bench").to_owned(),
                recent_limit: 1,
            };
            // A new account is not found: the call got through all the same.
            match conn.quota(channel.clone()).get_usage(request).await {
                Err(status) if status.code() == tonic::Code::NotFound => {}
                answer => {
                    answer.answer(Service::Quota)?;
                }
            }
        }
    }
    Ok(())
}

/// Setup of one account: free accounts get their 5-hour window used up; credit accounts become
/// plus accounts with credits and then get their 5-hour window used up.
async fn set_up_account(
    quota: &mut QuotaClient,
    admin: &mut AdminClient,
    account: &str,
    kind: Kind,
    task: &pb::Usage,
    product: &str,
) -> anyhow::Result<()> {
    if kind == Kind::Credit {
        let request = pb::UpsertAccountRequest {
            account: Some(pb::Account {
                account_id: account.to_owned(),
                plan: "plus".into(),
                credit_purchase_allowed: true,
            }),
        };
        admin.upsert_account(request).await.answer(Service::Admin)?;
        let request = pb::GrantCreditsRequest {
            account_id: account.to_owned(),
            grant_id: "bench-setup".into(),
            amount_micros: CREDIT_GRANT_MICROS,
            source: "promo".into(),
            expires_at: None,
        };
        admin.grant_credits(request).await.answer(Service::Admin)?;
    }
    // Learn the window's limit and the model's price from a small Reserve, then commit enough
    // usage to fill the 5-hour window: what goes past the hold is charged all the same (as
    // overage on a free plan, on credits on plus).
    const PROBE_TOKENS: u64 = 1_000;
    let probe = pb::Usage {
        model: task.model.clone(),
        output_tokens: PROBE_TOKENS,
        ..Default::default()
    };
    let request = pb::ReserveRequest {
        account_id: account.to_owned(),
        request_id: "bench-setup".into(),
        product: product.to_owned(),
        estimate: Some(probe.clone()),
        plan_hint: String::new(),
        ttl_seconds: 0,
    };
    let reserved = quota.reserve(request).await.answer(Service::Quota)?;
    if reserved.decision() != pb::Decision::Allow {
        bail!(
            "a small Reserve for a new account was denied ({}): {}",
            reserved.reason().as_str_name(),
            reserved.message
        );
    }
    let window = |windows: &[pb::WindowStatus]| {
        windows
            .iter()
            .find(|w| w.name == "5h")
            .map(|w| (w.used_micros, w.limit_micros))
    };
    let (_, limit) = window(&reserved.windows).context("no 5h window in the Reserve answer")?;
    let per_token = reserved.estimate_micros.max(1) as u128;
    let tokens = (limit.max(0) as u128 * u128::from(PROBE_TOKENS)).div_ceil(per_token) + 1;
    let request = pb::CommitRequest {
        account_id: account.to_owned(),
        reservation_id: reserved.reservation_id,
        usage: Some(pb::Usage {
            output_tokens: u64::try_from(tokens).unwrap_or(u64::MAX),
            ..probe
        }),
        r#final: true,
    };
    let committed = quota.commit(request).await.answer(Service::Quota)?;
    match window(&committed.windows) {
        Some((used, limit)) if used >= limit => Ok(()),
        other => bail!("the 5h window was not used up after setup: (used, limit) = {other:?}"),
    }
}

/// Sets up the over-limit and credit-funded accounts, `workers` at a time.
async fn set_up(
    conn: &Connection,
    channels: &[Channel],
    population: &Arc<Population>,
    task: &pb::Usage,
    product: &str,
    workers: usize,
) -> anyhow::Result<()> {
    let todo: Arc<Vec<usize>> = Arc::new(
        (0..population.kinds.len())
            .filter(|&a| population.kinds[a] != Kind::Free)
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..workers.min(todo.len()) {
        let channel = channels[w % channels.len()].clone();
        let mut quota = conn.quota(channel.clone());
        let mut admin = conn.admin(channel);
        let (todo, next, population) = (todo.clone(), next.clone(), population.clone());
        let (task, product) = (task.clone(), product.to_owned());
        tasks.push(tokio::spawn(async move {
            while let Some(&a) = todo.get(next.fetch_add(1, Ordering::Relaxed)) {
                let (account, kind) = (&population.ids[a], population.kinds[a]);
                set_up_account(&mut quota, &mut admin, account, kind, &task, &product)
                    .await
                    .with_context(|| format!("setting up account {account}"))?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("a setup task failed")??;
    }
    Ok(())
}

fn percentiles(h: &Histogram<u64>) -> [u64; 5] {
    if h.is_empty() {
        return [0; 5];
    }
    [
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
    ]
}

fn percentiles_json(h: &Histogram<u64>) -> Value {
    let [p50, p90, p99, p99_9, max] = percentiles(h);
    json!({ "p50": p50, "p90": p90, "p99": p99, "p99_9": p99_9, "max": max })
}

pub async fn run(conn: &Connection, json: bool, args: BenchArgs) -> anyhow::Result<()> {
    let workload = args.workload;
    let n = args.accounts as usize;
    let over = (n as f64 * args.over_limit_share).round() as usize;
    let mut credit = (n as f64 * args.credit_share).round() as usize;
    if over + credit > n {
        bail!("--over-limit-share and --credit-share add up to more than every account");
    }
    let mut notes = Vec::new();
    if workload.uses_accounts() && credit > 0 && !conn.has_admin_token() {
        notes.push(format!(
            "no admin token (--token or QUOTAD_ADMIN_TOKEN): the {credit} credit-funded accounts \
             were not set up and run as new free accounts"
        ));
        credit = 0;
    }
    let run_id = match args.run_id.clone() {
        Some(id) => id,
        None => uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
    };
    let population = workload
        .uses_accounts()
        .then(|| Population::new(&run_id, n, args.zipf, args.seed, over, credit))
        .map(Arc::new);
    let usage = pb::Usage {
        model: args.model.clone(),
        input_tokens: args.input,
        cached_input_tokens: args.cached,
        output_tokens: args.output,
        images: 0,
        fast_mode: false,
    };
    // The first connection is checked before the others are made: a server that refuses
    // this client (a token, a client certificate) says why on the first call.
    let first = conn.channel().await?;
    let first_account = population.as_ref().map(|p| p.ids[0].as_str());
    preflight(conn, &first, workload, &args.rls_domain, first_account).await?;
    let mut channels = vec![first];
    let others: Vec<Connection> = (args.also.iter())
        .map(|addr| conn.at(addr))
        .collect::<anyhow::Result<_>>()?;
    for i in 1..args.connections as usize {
        let replica = i % (others.len() + 1);
        let to = if replica == 0 {
            conn
        } else {
            &others[replica - 1]
        };
        channels.extend(connect(to, 1).await?);
    }
    for note in &notes {
        eprintln!("note: {note}");
    }
    let workers = args.concurrency as usize;
    let show_progress = !json && std::io::stderr().is_terminal();
    if let Some(population) = &population
        && over + credit > 0
    {
        if show_progress {
            eprintln!("setting up {over} over-limit and {credit} credit-funded accounts…");
        }
        set_up(conn, &channels, population, &usage, &args.product, workers).await?;
    }

    let start = Instant::now();
    let warmup = args.warmup;
    let duration = match (args.duration, args.requests) {
        (Some(d), _) => Some(d),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    let (pacing, measure_from) = match args.rate {
        None => {
            let measure_from = start + warmup;
            let pacing = Pacing::Closed {
                measure_from,
                end: duration.map(|d| measure_from + d),
                requests: args.requests,
            };
            (pacing, measure_from)
        }
        Some(rate) => {
            let warm = (warmup.as_secs_f64() * rate).round() as u64;
            let measured = match (args.requests, duration) {
                (Some(r), _) => r,
                (None, Some(d)) => (d.as_secs_f64() * rate).round() as u64,
                (None, None) => unreachable!(),
            };
            let measure_from = start + Duration::from_secs_f64(warm as f64 / rate);
            let pacing = Pacing::Open {
                permits: Arc::new(Semaphore::new(0)),
                start,
                rate,
                warm,
                total: warm + measured,
            };
            (pacing, measure_from)
        }
    };
    let pacer = match &pacing {
        Pacing::Open {
            permits,
            rate,
            total,
            ..
        } => {
            let (permits, rate, total) = (permits.clone(), *rate, *total);
            Some(std::thread::spawn(move || {
                pace(permits, start, rate, total, workers)
            }))
        }
        Pacing::Closed { .. } => None,
    };
    let shared = Arc::new(Shared {
        workload,
        pacing,
        claimed: AtomicU64::new(0),
        done: AtomicU64::new(0),
        population,
        product: args.product.clone(),
        usage,
        rls_domain: args.rls_domain.clone(),
    });

    let progress = progress_bar(show_progress, args.requests, duration);
    let ticker = {
        let (shared, progress) = (shared.clone(), progress.clone());
        let requests = args.requests;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let now = Instant::now();
                let done = shared.done.load(Ordering::Relaxed);
                if now < measure_from {
                    progress.set_prefix("warm-up");
                    continue;
                }
                progress.set_prefix("measure");
                let secs = now.duration_since(measure_from).as_secs_f64();
                match requests {
                    Some(_) => progress.set_position(done),
                    None => progress.set_position((secs * 1000.0) as u64),
                }
                let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
                progress.set_message(format!("{done} ops, {rate:.0} ops/s"));
            }
        })
    };

    let mut handles = Vec::with_capacity(workers);
    for w in 0..workers {
        let clients = match workload {
            Workload::Health | Workload::HealthPair => {
                Clients::Health(channels.iter().cloned().map(HealthClient::new).collect())
            }
            Workload::Rls => Clients::Rls(channels.iter().cloned().map(|c| conn.rls(c)).collect()),
            Workload::Reserve | Workload::ReserveCommit => {
                Clients::Quota(channels.iter().cloned().map(|c| conn.quota(c)).collect())
            }
        };
        let worker = Worker {
            shared: shared.clone(),
            clients,
            turn: w % channels.len(),
            connections: channels.len(),
            rng: SplitMix64(
                args.seed
                    .wrapping_add((w as u64 + 1).wrapping_mul(0xa076_1d64_78bd_642f)),
            ),
            id: w,
            seq: 0,
            stats: Stats::new(),
        };
        handles.push(tokio::spawn(worker.run()));
    }
    let mut stats = Stats::new();
    for h in handles {
        stats.merge(h.await.context("a worker failed")?);
    }
    if let Some(pacer) = pacer {
        pacer.join().expect("the pacing thread ends");
    }
    ticker.abort();
    progress.finish_and_clear();

    let measured = stats
        .last_done
        .map(|end| end.saturating_duration_since(measure_from))
        .unwrap_or_default();
    let report = Report {
        args: &args,
        run_id: &run_id,
        over,
        credit,
        measured,
        stats: &stats,
        notes: &notes,
    };
    if json {
        println!("{}", report.json());
    } else {
        println!("{}", report.text());
    }
    Ok(())
}

fn progress_bar(show: bool, requests: Option<u64>, duration: Option<Duration>) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let (len, template) = match requests {
        Some(n) => (n, "{prefix:8} [{bar:40}] {pos}/{len} operations  {msg}"),
        None => (
            duration.map_or(0, |d| d.as_millis() as u64),
            "{prefix:8} [{bar:40}] {elapsed}  {msg}",
        ),
    };
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix("warm-up");
    bar
}

struct Report<'a> {
    args: &'a BenchArgs,
    run_id: &'a str,
    over: usize,
    credit: usize,
    measured: Duration,
    stats: &'a Stats,
    notes: &'a [String],
}

impl Report<'_> {
    fn ops_per_s(&self) -> f64 {
        let secs = self.measured.as_secs_f64();
        if secs > 0.0 {
            self.stats.operations() as f64 / secs
        } else {
            0.0
        }
    }

    fn errors(&self) -> impl Iterator<Item = (&'static str, u64, Option<&str>)> + '_ {
        ERROR_NAMES
            .iter()
            .zip(self.stats.errors)
            .zip(&self.stats.first_error)
            .filter(|((_, n), _)| *n > 0)
            .map(|((name, n), first)| (*name, n, first.as_deref()))
    }

    fn json(&self) -> Value {
        let a = self.args;
        let s = self.stats;
        let errors: BTreeMap<&str, u64> = self.errors().map(|(name, n, _)| (name, n)).collect();
        let messages: BTreeMap<&str, &str> = self
            .errors()
            .filter_map(|(name, _, m)| Some((name, m?)))
            .collect();
        let mut value = json!({
            "workload": a.workload.name(),
            "connections": a.connections,
            "concurrency": a.concurrency,
            "rate": a.rate,
            "warmup_s": a.warmup.as_secs_f64(),
            "duration_s": round3(self.measured.as_secs_f64()),
            "operations": s.operations(),
            "ops_per_s": (self.ops_per_s() * 10.0).round() / 10.0,
            "ok": s.ok,
            "denied": s.denied,
            "errors": errors,
            "error_messages": messages,
            "latency_us": percentiles_json(&s.latency),
            "notes": self.notes,
        });
        if a.workload == Workload::ReserveCommit {
            value["reserve_latency_us"] = percentiles_json(&s.reserve_latency);
        }
        if a.workload.uses_accounts() {
            value["accounts"] = json!({
                "count": a.accounts, "zipf": a.zipf, "seed": a.seed, "run_id": self.run_id,
                "over_limit": self.over, "credit_funded": self.credit,
            });
            value["denied_by_account"] = json!({
                "over_limit": s.denied_by_kind[Kind::OverLimit as usize],
                "credit_funded": s.denied_by_kind[Kind::Credit as usize],
                "free": s.denied_by_kind[Kind::Free as usize],
            });
        }
        value
    }

    fn text(&self) -> String {
        let a = self.args;
        let s = self.stats;
        let mut lines = Vec::new();
        let pace = match a.rate {
            Some(r) => format!("{r} ops/s scheduled"),
            None => "as fast as possible".to_owned(),
        };
        lines.push(format!(
            "workload    {}: {} connections, {} in flight, {pace}",
            a.workload.name(),
            a.connections,
            a.concurrency
        ));
        if a.workload.uses_accounts() {
            lines.push(format!(
                "accounts    {} (zipf {}, seed {}): {} over the limit, {} on credits; ids bench-{}-N",
                a.accounts, a.zipf, a.seed, self.over, self.credit, self.run_id
            ));
        }
        lines.push(format!(
            "operations  {} in {:.3} s (after {:.3} s of warm-up): {:.1} ops/s",
            s.operations(),
            self.measured.as_secs_f64(),
            a.warmup.as_secs_f64(),
            self.ops_per_s()
        ));
        lines.push(format!("ok          {}", s.ok));
        let by_kind = if a.workload.uses_accounts() {
            format!(
                " (over-limit accounts {}, credit-funded {}, free {})",
                s.denied_by_kind[Kind::OverLimit as usize],
                s.denied_by_kind[Kind::Credit as usize],
                s.denied_by_kind[Kind::Free as usize]
            )
        } else {
            String::new()
        };
        lines.push(format!("denied      {}{by_kind}", s.denied));
        let errors: Vec<String> = self
            .errors()
            .map(|(name, n, first)| match first {
                Some(m) if !m.is_empty() => format!("{name} {n} ({m})"),
                _ => format!("{name} {n}"),
            })
            .collect();
        lines.push(format!(
            "errors      {}",
            if errors.is_empty() {
                "none".to_owned()
            } else {
                errors.join(", ")
            }
        ));
        lines.push(format!(
            "latency µs  {:>9} {:>9} {:>9} {:>9} {:>9}",
            "p50", "p90", "p99", "p99.9", "max"
        ));
        let row = |name: &str, h: &Histogram<u64>| {
            let [p50, p90, p99, p999, max] = percentiles(h);
            format!("  {name:<9} {p50:>9} {p90:>9} {p99:>9} {p999:>9} {max:>9}")
        };
        if a.workload == Workload::ReserveCommit {
            lines.push(row("pair", &s.latency));
            lines.push(row("reserve", &s.reserve_latency));
        } else {
            lines.push(row(a.workload.name(), &s.latency));
        }
        lines.join("\n")
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_s_and_ms() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["10", "-1s", "1m", "s", "NaNs", "1e9s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn splitmix_is_deterministic_and_uniform_enough() {
        let mut a = SplitMix64(7);
        let mut b = SplitMix64(7);
        let mut counts = [0u32; 10];
        for _ in 0..100_000 {
            let x = a.next_u64();
            assert_eq!(x, b.next_u64());
            counts[SplitMix64(x).below(10) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_000..11_000).contains(&c)),
            "{counts:?}"
        );
        let u = SplitMix64(1).unit();
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn zipf_favours_low_ranks_in_proportion() {
        let zipf = Zipf::new(1_000, 1.1);
        let mut rng = SplitMix64(42);
        let mut counts = vec![0u32; 1_000];
        let draws = 200_000;
        for _ in 0..draws {
            counts[zipf.sample(&mut rng)] += 1;
        }
        let h: f64 = (1..=1_000).map(|k| (k as f64).powf(-1.1)).sum();
        for k in [0usize, 1, 9] {
            let expected = draws as f64 * ((k + 1) as f64).powf(-1.1) / h;
            let got = f64::from(counts[k]);
            assert!(
                (got - expected).abs() < expected * 0.05,
                "rank {k}: {got} vs {expected}"
            );
        }
        assert!(counts[999] > 0, "the tail is drawn too");
        let uniform = Zipf::new(4, 0.0);
        assert_eq!(uniform.cdf, vec![0.25, 0.5, 0.75, 1.0]);
    }

    #[test]
    fn population_shuffles_ranks_and_assigns_kinds() {
        let p = Population::new("r", 100, 1.1, 3, 5, 10);
        assert_eq!(p.ids[7], "bench-r-7");
        let over = p.kinds.iter().filter(|k| **k == Kind::OverLimit).count();
        let credit = p.kinds.iter().filter(|k| **k == Kind::Credit).count();
        assert_eq!((over, credit), (5, 10));
        let mut seen = p.by_rank.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<u32>>(), "a permutation");
        let again = Population::new("r", 100, 1.1, 3, 5, 10);
        assert_eq!(p.by_rank, again.by_rank, "the seed decides");
    }
}
