//! Crash safety of the embedded data dir (`quotad serve --data-dir`): a quotad SIGKILLed in the
//! middle of its work and started again on the same directory has everything it acknowledged.
//!
//! - Under load (grants, auto top-up turned on and paid by a real HTTP billing service, coding
//!   tasks running past the plan window onto credits), quotad is killed at a random moment,
//!   restarted, checked, loaded again and killed again, several times. Every answer a client got
//!   is kept; a call cut off by the kill may or may not have happened, so the checks accept both,
//!   and sending it again must then give one answer that later retries repeat.
//! - A torn write at the tail of the commit log (a batch the kill interrupted, so never
//!   acknowledged) is dropped when the data dir is recovered, and nothing acknowledged is lost;
//!   a batch the log holds whole but the database had not yet applied is replayed. Damage
//!   before the log's tail, in the database's journal, or in an account's stored value, is an
//!   error that says what is wrong, never a wrong balance. Damage to a journal entry's header,
//!   which fjall takes for a torn tail and cuts off, is repaired from the commit log while the
//!   log still holds those batches, and refused (naming what was lost) once it does not.
//! - One data dir, one process: a second quotad on it refuses to start.
//!
//! The load's choices come from a seed printed at the start (`QUOTAD_CRASH_SEED=N` reuses it);
//! the moments of the kills are real time, so a rerun replays the choices, not the interleaving.

use crate::support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quotad::api::pb;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use support::billing::{Answer, Billing, billing_service};
use support::process::Quotad;
use support::{ADMIN_TOKEN, AdminClient, CREDIT, QuotaClient, costing};
use tonic::{Code, Status};

/// Rounds of load, each ended by a SIGKILL and followed by a restart and the checks.
const KILLS: usize = 5;
const ACCOUNTS: usize = 24;
/// Clients sending calls in parallel.
const WORKERS: u64 = 8;

/// xorshift64*, seeded.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }

    /// A number in `low..=high`.
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

fn seed() -> u64 {
    std::env::var("QUOTAD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

fn env_of(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    let mut env = vec![
        ("QUOTAD_ADMIN_TOKEN".to_owned(), ADMIN_TOKEN.to_owned()),
        ("QUOTAD_LOG_LEVEL".to_owned(), "info".to_owned()),
    ];
    env.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env
}

/// quotad on `dir`, once it serves.
async fn start(dir: &Path, env: &[(String, String)]) -> Quotad {
    let dir = dir.to_str().unwrap().to_owned();
    let env = env.to_vec();
    tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Quotad::start(&["--data-dir", &dir], &env)
    })
    .await
    .unwrap()
}

/// SIGKILL, and wait until the process is gone (and so has let go of the data dir).
async fn kill(mut quotad: Quotad) {
    quotad.signal("KILL");
    tokio::task::spawn_blocking(move || quotad.wait())
        .await
        .unwrap();
}

/// Runs `quotad serve --data-dir DIR`, expected to exit by itself: its exit and output, or
/// `None` if it was still running after `wait` (it is then killed).
async fn run_to_exit(dir: &Path, env: &[(String, String)], wait: Duration) -> Option<Output> {
    let mut child = support::process::command()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + wait;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut stderr = Vec::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_end(&mut stderr)
            .unwrap();
        Some(Output {
            status: child.wait().unwrap(),
            stdout: Vec::new(),
            stderr,
        })
    })
    .await
    .unwrap()
}

fn answer<T>(result: Result<tonic::Response<T>, Status>, what: &str) -> T {
    match result {
        Ok(response) => response.into_inner(),
        Err(status) => panic!("{what}: {status:?}"),
    }
}

async fn usage_of(quota: &mut QuotaClient, account: &str) -> pb::GetUsageResponse {
    let request = pb::GetUsageRequest {
        account_id: account.into(),
        recent_limit: 1,
    };
    answer(quota.get_usage(request).await, account)
}

fn amounts(funding: &Option<pb::Funding>) -> (i64, i64) {
    funding
        .as_ref()
        .map_or((0, 0), |f| (f.plan_micros, f.credit_micros))
}

async fn upsert_plus(admin: &mut AdminClient, account: &str) {
    let account = pb::Account {
        account_id: account.into(),
        plan: "plus".into(),
        credit_purchase_allowed: true,
    };
    let request = pb::UpsertAccountRequest {
        account: Some(account),
    };
    answer(admin.upsert_account(request).await, "upsert");
}

// ---------------------------------------------------------------------------------------------
// What the clients sent and what they were told.

/// A grant and its answer (`None`: the kill cut the call off).
#[derive(Debug, Clone)]
struct Grant {
    request: pb::GrantCreditsRequest,
    answer: Option<pb::GrantCreditsResponse>,
}

#[derive(Debug, Clone)]
struct TopUpSetting {
    request: pb::SetAutoTopUpRequest,
    answer: Option<pb::AutoTopUp>,
}

impl TopUpSetting {
    fn settings(&self) -> (i64, i64) {
        (self.request.threshold_micros, self.request.target_micros)
    }
}

/// One coding task: its Reserve, then its calls on the reservation, in order. A client stops at
/// its first call without an answer, so only the last call of a task can lack one.
#[derive(Debug, Clone)]
struct Task {
    reserve: pb::ReserveRequest,
    reserved: Option<pb::ReserveResponse>,
    steps: Vec<Step>,
}

#[derive(Debug, Clone)]
enum Step {
    Commit(pb::CommitRequest, Option<Box<pb::CommitResponse>>),
    Release(pb::ReleaseRequest, Option<pb::ReleaseResponse>),
}

impl Step {
    fn answered(&self) -> bool {
        match self {
            Step::Commit(_, answer) => answer.is_some(),
            Step::Release(_, answer) => answer.is_some(),
        }
    }
}

/// Where a task stands by its answers (all of them given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Denied,
    /// Open: what it was charged so far.
    Open((i64, i64)),
    /// Finished (final commit or release): what it was charged in all.
    Closed((i64, i64)),
}

impl Task {
    fn answered(&self) -> bool {
        self.reserved.is_some() && self.steps.iter().all(Step::answered)
    }

    fn reservation_id(&self) -> Option<&str> {
        let reserved = self.reserved.as_ref()?;
        (reserved.decision() == pb::Decision::Allow).then_some(reserved.reservation_id.as_str())
    }

    /// Only for a task whose every call was answered.
    fn standing(&self) -> Standing {
        if self.reservation_id().is_none() {
            return Standing::Denied;
        }
        let mut charged = (0, 0);
        for step in &self.steps {
            match step {
                Step::Commit(request, Some(answer)) => {
                    charged = amounts(&answer.charged_total);
                    if request.r#final {
                        return Standing::Closed(charged);
                    }
                }
                Step::Release(_, Some(_)) => return Standing::Closed(charged),
                _ => unreachable!("an unanswered call"),
            }
        }
        Standing::Open(charged)
    }
}

/// Everything sent for one account.
#[derive(Debug, Default, Clone)]
struct History {
    grants: Vec<Grant>,
    /// Auto top-up settings sent since the last check.
    top_ups: Vec<TopUpSetting>,
    /// The auto top-up settings (threshold, target) the last check found.
    top_up_found: Option<(i64, i64)>,
    tasks: Vec<Task>,
}

type Histories = BTreeMap<String, History>;

// ---------------------------------------------------------------------------------------------
// Load.

/// How a call ended: answered, or cut off by the kill (any failure once the kill is under way;
/// a failure before it fails the test).
async fn call<T>(
    killed: &AtomicBool,
    what: &str,
    sent: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> Option<T> {
    let result = tokio::time::timeout(Duration::from_secs(10), sent).await;
    match result {
        Ok(Ok(response)) => Some(response.into_inner()),
        _ if killed.load(Ordering::SeqCst) => None,
        Ok(Err(status)) => panic!("{what} failed before any kill: {status:?}"),
        Err(_) => panic!("{what}: no answer within 10 s before any kill"),
    }
}

struct Worker {
    name: String,
    rng: Rng,
    accounts: Arc<Vec<String>>,
    quota: QuotaClient,
    admin: AdminClient,
    killed: Arc<AtomicBool>,
    histories: Arc<Mutex<Histories>>,
}

impl Worker {
    /// Sends calls until one gets no answer.
    async fn run(mut self) {
        for n in 0.. {
            let account =
                self.accounts[self.rng.below(self.accounts.len() as u64) as usize].clone();
            let roll = self.rng.below(100);
            let answered = if roll < 12 {
                self.grant(&account, n).await
            } else if roll < 17 {
                self.set_top_up(&account).await
            } else {
                self.task(&account, n).await
            };
            if !answered {
                return;
            }
        }
    }

    fn record(&self, account: &str, add: impl FnOnce(&mut History)) {
        add(self
            .histories
            .lock()
            .unwrap()
            .entry(account.into())
            .or_default());
    }

    async fn grant(&mut self, account: &str, n: u64) -> bool {
        let request = pb::GrantCreditsRequest {
            account_id: account.into(),
            grant_id: format!("{}-g{n}", self.name),
            amount_micros: self.rng.between(20, 120) as i64 * CREDIT,
            source: if self.rng.percent(30) {
                "promo"
            } else {
                "purchase"
            }
            .into(),
            expires_at: None,
        };
        let sent = self.admin.grant_credits(request.clone());
        let answer = call(&self.killed, "grant", sent).await;
        let answered = answer.is_some();
        self.record(account, |h| h.grants.push(Grant { request, answer }));
        answered
    }

    async fn set_top_up(&mut self, account: &str) -> bool {
        let threshold = self.rng.between(10, 30) as i64 * CREDIT;
        let request = pb::SetAutoTopUpRequest {
            account_id: account.into(),
            enabled: true,
            threshold_micros: threshold,
            target_micros: threshold + self.rng.between(30, 80) as i64 * CREDIT,
            monthly_cap_micros: 0,
        };
        let sent = self.admin.set_auto_top_up(request.clone());
        let answer = call(&self.killed, "set auto top-up", sent).await;
        let answered = answer.is_some();
        self.record(account, |h| {
            h.top_ups.push(TopUpSetting { request, answer })
        });
        answered
    }

    /// Reserve, a few partial commits (cumulative usage), then a final commit, a release, or
    /// nothing (the task is left open).
    async fn task(&mut self, account: &str, n: u64) -> bool {
        let estimate = self.rng.between(15, 40);
        let reserve = pb::ReserveRequest {
            account_id: account.into(),
            request_id: format!("{}-t{n}", self.name),
            product: if self.rng.percent(70) {
                "codex"
            } else {
                "excel"
            }
            .into(),
            estimate: Some(costing(estimate)),
            ..Default::default()
        };
        let reserved = call(&self.killed, "reserve", self.quota.reserve(reserve.clone())).await;
        let mut task = Task {
            reserve,
            reserved,
            steps: Vec::new(),
        };
        let answered = self.task_steps(&mut task).await;
        self.record(account, |h| h.tasks.push(task));
        answered
    }

    async fn task_steps(&mut self, task: &mut Task) -> bool {
        let Some(reserved) = &task.reserved else {
            return false;
        };
        if reserved.decision() != pb::Decision::Allow {
            return true;
        }
        let (account, id) = (
            task.reserve.account_id.clone(),
            reserved.reservation_id.clone(),
        );
        let commit = |used: u64, is_final: bool| pb::CommitRequest {
            account_id: account.clone(),
            reservation_id: id.clone(),
            usage: Some(costing(used)),
            r#final: is_final,
        };
        let mut used = 0;
        for _ in 0..self.rng.between(0, 4) {
            used += self.rng.between(5, 25);
            let request = commit(used, false);
            let answer = call(&self.killed, "commit", self.quota.commit(request.clone())).await;
            let answered = answer.is_some();
            task.steps.push(Step::Commit(request, answer.map(Box::new)));
            if !answered {
                return false;
            }
        }
        let roll = self.rng.below(100);
        if roll < 10 {
            // Left open: its hold must still be there after every restart.
            true
        } else if roll < 22 {
            let request = pb::ReleaseRequest {
                account_id: account.clone(),
                reservation_id: id.clone(),
            };
            let answer = call(&self.killed, "release", self.quota.release(request.clone())).await;
            let answered = answer.is_some();
            task.steps.push(Step::Release(request, answer));
            answered
        } else {
            let request = commit(used + self.rng.between(1, 20), true);
            let answer = call(&self.killed, "commit", self.quota.commit(request.clone())).await;
            let answered = answer.is_some();
            task.steps.push(Step::Commit(request, answer.map(Box::new)));
            answered
        }
    }
}

/// Accounts made (and answered) before any kill: plus, some credits, a third on auto top-up.
async fn set_up_accounts(url: &str, accounts: &[String], histories: &mut Histories) {
    let mut admin = support::admin_client(url).await;
    for (i, account) in accounts.iter().enumerate() {
        upsert_plus(&mut admin, account).await;
        let request = pb::GrantCreditsRequest {
            account_id: account.clone(),
            grant_id: "welcome".into(),
            amount_micros: 100 * CREDIT,
            ..Default::default()
        };
        let granted = answer(admin.grant_credits(request.clone()).await, "grant");
        let history = histories.entry(account.clone()).or_default();
        history.grants.push(Grant {
            request,
            answer: Some(granted),
        });
        if i % 3 == 0 {
            let request = pb::SetAutoTopUpRequest {
                account_id: account.clone(),
                enabled: true,
                threshold_micros: 20 * CREDIT,
                target_micros: 60 * CREDIT,
                monthly_cap_micros: 0,
            };
            let set = answer(admin.set_auto_top_up(request.clone()).await, "top-up");
            history.top_ups.push(TopUpSetting {
                request,
                answer: Some(set),
            });
        }
    }
}

/// Load on `quotad` from every worker until it is SIGKILLed, `after` into the load.
async fn load_then_kill(
    quotad: Quotad,
    round: usize,
    rng: &mut Rng,
    accounts: &Arc<Vec<String>>,
    histories: &mut Histories,
    after: Duration,
) {
    let shared = Arc::new(Mutex::new(std::mem::take(histories)));
    let killed = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let worker = Worker {
            name: format!("r{round}w{w}"),
            rng: Rng::new(rng.below(u64::MAX)),
            accounts: accounts.clone(),
            quota: QuotaServiceClient::connect(quotad.url()).await.unwrap(),
            admin: support::admin_client(&quotad.url()).await,
            killed: killed.clone(),
            histories: shared.clone(),
        };
        workers.push(tokio::spawn(worker.run()));
    }
    tokio::time::sleep(after).await;
    killed.store(true, Ordering::SeqCst);
    kill(quotad).await;
    for worker in workers {
        worker.await.expect("a worker failed");
    }
    *histories = Arc::try_unwrap(shared).unwrap().into_inner().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Checks after a restart.

/// Calls the kills cut off, and of the commits among them, how many turned out to have been
/// made (sent again, they charged nothing) or not (sent again, they charged).
#[derive(Debug, Default, Clone, Copy)]
struct Unanswered {
    grants: usize,
    top_ups: usize,
    reserves: usize,
    releases: usize,
    commits_made: usize,
    commits_not_made: usize,
}

impl std::ops::AddAssign for Unanswered {
    fn add_assign(&mut self, other: Unanswered) {
        self.grants += other.grants;
        self.top_ups += other.top_ups;
        self.reserves += other.reserves;
        self.releases += other.releases;
        self.commits_made += other.commits_made;
        self.commits_not_made += other.commits_not_made;
    }
}

/// What the checks of one account found, for the check of the export.
struct Figures {
    unanswered: Unanswered,
    usage: pb::GetUsageResponse,
    /// Reservation id → what it was charged in all (plan, credits).
    charged: HashMap<String, (i64, i64)>,
}

/// What a Reserve's retry must repeat (the account's figures it also returns are today's).
type ReserveAnswer = (
    i32,
    String,
    Option<pb::Funding>,
    Option<quotad::api::wkt::Timestamp>,
    i64,
    i32,
    i32,
    Option<quotad::api::wkt::Timestamp>,
);

fn reserve_answer(r: &pb::ReserveResponse) -> ReserveAnswer {
    (
        r.decision,
        r.reservation_id.clone(),
        r.held,
        r.expires_at,
        r.estimate_micros,
        r.reason,
        r.action,
        r.retry_at,
    )
}

/// Checks one account after a restart: first what was acknowledged, as recovered; then every
/// call that got no answer is sent twice more (the two answers must agree, and become the
/// call's answer); then, once no auto top-up purchase is in flight, the ledger against
/// everything answered and everything the billing service was asked to charge.
async fn check_account(
    url: String,
    account: String,
    mut history: History,
    billing: Arc<Billing>,
) -> (History, Figures) {
    let mut quota = QuotaServiceClient::connect(url.clone()).await.unwrap();
    let mut admin = support::admin_client(&url).await;

    // 1. As recovered.
    for grant in &history.grants {
        if let Some(first) = &grant.answer {
            let again = answer(
                admin.grant_credits(grant.request.clone()).await,
                "grant retry",
            );
            // A lot made again would carry the retry's time.
            assert_eq!(
                again.lot, first.lot,
                "{account}: acknowledged grant {} is there, unchanged",
                grant.request.grant_id
            );
        }
    }
    let usage = usage_of(&mut quota, &account).await;
    // Settings sent concurrently may land in either order: any of those sent since the last
    // check may be the one in force, or, if none of them was answered, the one found then
    // (`None`: auto top-up was off, as it is until an account first sets it).
    let mut candidates: Vec<Option<(i64, i64)>> =
        history.top_ups.iter().map(|t| Some(t.settings())).collect();
    if history.top_ups.iter().all(|t| t.answer.is_none()) {
        candidates.push(history.top_up_found);
    }
    if !history.top_ups.is_empty() {
        let shown = usage.auto_top_up.clone().unwrap_or_default();
        let in_force = shown
            .enabled
            .then_some((shown.threshold_micros, shown.target_micros));
        assert!(
            candidates.contains(&in_force),
            "{account}: auto top-up as acknowledged: {shown:?}, {candidates:?}"
        );
    }
    for task in &history.tasks {
        let Some(first) = &task.reserved else {
            continue;
        };
        let again = answer(quota.reserve(task.reserve.clone()).await, "reserve retry");
        assert_eq!(
            reserve_answer(&again),
            reserve_answer(first),
            "{account}: a retried Reserve gets its first answer"
        );
        for step in &task.steps {
            match step {
                Step::Commit(request, Some(first)) if request.r#final => {
                    let again = answer(quota.commit(request.clone()).await, "commit retry");
                    assert_eq!(
                        (&again.charged, &again.charged_total),
                        (&first.charged, &first.charged_total),
                        "{account}: a retried final Commit of {} charges nothing again",
                        request.reservation_id
                    );
                }
                Step::Release(request, Some(first)) => {
                    let again = answer(quota.release(request.clone()).await, "release retry");
                    assert_eq!(
                        again.released, first.released,
                        "{account}: a retried Release of {}",
                        request.reservation_id
                    );
                }
                _ => {}
            }
        }
    }
    let open: Vec<&Task> = history
        .tasks
        .iter()
        .filter(|t| t.answered() && matches!(t.standing(), Standing::Open(_)))
        .collect();
    check_open_holds(&mut quota, &account, &usage, &open).await;

    // 2. What got no answer: it may or may not have happened; sent again, it happens once.
    let mut grants = std::mem::take(&mut history.grants);
    let lost_grants = grants.iter().filter(|g| g.answer.is_none()).count();
    for grant in grants.iter_mut().filter(|g| g.answer.is_none()) {
        let once = answer(admin.grant_credits(grant.request.clone()).await, "grant");
        let again = answer(admin.grant_credits(grant.request.clone()).await, "grant");
        assert_eq!(once.lot, again.lot, "{account}: one lot per grant id");
        grant.answer = Some(once);
    }
    history.grants = grants;
    // Settings sent again now are the newest.
    let top_ups = std::mem::take(&mut history.top_ups);
    let lost_top_ups = top_ups.iter().filter(|t| t.answer.is_none()).count();
    for setting in top_ups.iter().filter(|t| t.answer.is_none()) {
        let once = answer(
            admin.set_auto_top_up(setting.request.clone()).await,
            "top-up",
        );
        let again = answer(
            admin.set_auto_top_up(setting.request.clone()).await,
            "top-up",
        );
        let settings = |t: &pb::AutoTopUp| (t.enabled, t.threshold_micros, t.target_micros);
        assert_eq!(settings(&once), settings(&again));
        assert_eq!(
            settings(&once),
            (true, setting.settings().0, setting.settings().1)
        );
    }
    let mut unanswered = Unanswered {
        grants: lost_grants,
        top_ups: lost_top_ups,
        ..Unanswered::default()
    };
    for task in history.tasks.iter_mut().filter(|t| !t.answered()) {
        match resend_unanswered(&mut quota, &account, task).await {
            Resent::Reserve => unanswered.reserves += 1,
            Resent::Release => unanswered.releases += 1,
            Resent::Commit { made: true } => unanswered.commits_made += 1,
            Resent::Commit { made: false } => unanswered.commits_not_made += 1,
        }
    }
    let open: Vec<&Task> = history
        .tasks
        .iter()
        .filter(|t| matches!(t.standing(), Standing::Open(_)))
        .collect();
    let usage = usage_of(&mut quota, &account).await;
    check_open_holds(&mut quota, &account, &usage, &open).await;
    assert_eq!(
        usage.holds.len(),
        open.len(),
        "{account}: the open holds are the tasks left open: {:?}",
        usage.holds
    );

    // 3. The ledger, once every auto top-up purchase is paid and settled.
    let waited = Instant::now();
    let usage = loop {
        let usage = usage_of(&mut quota, &account).await;
        let top_up = usage.auto_top_up.clone().unwrap_or_default();
        if top_up.in_flight_purchase_id.is_empty() {
            break usage;
        }
        // Purchases cut off by the kill are resumed by maintenance (every second) once
        // `payments.resume_after_ms` has passed since they started.
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "{account}: a purchase stays in flight: {top_up:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ledger = usage.ledger.unwrap_or_default();
    assert_eq!(
        ledger.granted_micros,
        ledger.balance_micros + ledger.spent_micros + ledger.expired_micros + ledger.revoked_micros,
        "{account}: conservation: {ledger:?}"
    );
    // Each purchase the billing service was asked for is one lot, however often it was asked.
    let mut bought: BTreeMap<String, i64> = BTreeMap::new();
    for seen in billing.seen() {
        if seen.body["account_id"] != account.as_str() {
            continue;
        }
        let amount = seen.body["amount_micros"].as_i64().unwrap();
        assert_eq!(seen.body["purchase_id"], seen.idempotency_key.as_str());
        assert!(
            seen.idempotency_key
                .starts_with(&format!("topup:{account}:")),
            "{seen:?}"
        );
        if let Some(before) = bought.insert(seen.idempotency_key.clone(), amount) {
            assert_eq!(
                before, amount,
                "{account}: purchase {} charged for two amounts (an id used twice)",
                seen.idempotency_key
            );
        }
    }
    let granted: i64 = history
        .grants
        .iter()
        .map(|g| g.request.amount_micros)
        .sum::<i64>()
        + bought.values().sum::<i64>();
    assert_eq!(
        ledger.granted_micros, granted,
        "{account}: granted = every grant once + every purchase paid once ({bought:?})"
    );
    if !bought.is_empty() {
        let last = usage
            .auto_top_up
            .as_ref()
            .and_then(|t| t.last_attempt.clone());
        assert!(
            last.as_ref()
                .is_some_and(|a| a.outcome() == pb::TopUpOutcome::Succeeded),
            "{account}: {last:?}"
        );
    }
    history.top_up_found = usage
        .auto_top_up
        .as_ref()
        .filter(|t| t.enabled)
        .map(|t| (t.threshold_micros, t.target_micros));
    let mut charged = HashMap::new();
    let (mut plan, mut credit) = (0, 0);
    for task in &history.tasks {
        if let (Some(id), Standing::Open(total) | Standing::Closed(total)) =
            (task.reservation_id(), task.standing())
        {
            plan += total.0;
            credit += total.1;
            charged.insert(id.to_owned(), total);
        }
    }
    assert_eq!(
        ledger.spent_micros, credit,
        "{account}: credits spent = what the tasks were charged in credits"
    );
    for window in &usage.windows {
        assert_eq!(
            window.used_micros - window.held_micros,
            plan,
            "{account}: {} window = what the tasks were charged on the plan",
            window.name
        );
    }
    let figures = Figures {
        unanswered,
        usage,
        charged,
    };
    (history, figures)
}

/// Each task left open is still held, charged what its last answer said; sending its last
/// commit again charges nothing.
async fn check_open_holds(
    quota: &mut QuotaClient,
    account: &str,
    usage: &pb::GetUsageResponse,
    open: &[&Task],
) {
    for task in open {
        let (id, Standing::Open(charged)) = (task.reservation_id().unwrap(), task.standing())
        else {
            unreachable!()
        };
        let hold = usage.holds.iter().find(|h| h.reservation_id == id);
        let hold = hold.unwrap_or_else(|| panic!("{account}: open reservation {id} is gone"));
        assert_eq!(amounts(&hold.charged), charged, "{account}: hold {id}");
        if let Some(Step::Commit(request, Some(_))) = task.steps.last() {
            let again = answer(quota.commit(request.clone()).await, "commit retry");
            assert_eq!(
                (amounts(&again.charged), amounts(&again.charged_total)),
                ((0, 0), charged),
                "{account}: a retried Commit of {id} charges nothing again"
            );
        }
    }
}

enum Resent {
    Reserve,
    Release,
    Commit { made: bool },
}

/// Sends a task's unanswered call twice: the two answers agree, and the first becomes the call's.
/// For a commit, whether it had been made before (each commit adds usage, so it charges when
/// sent again if and only if it had not).
async fn resend_unanswered(quota: &mut QuotaClient, account: &str, task: &mut Task) -> Resent {
    if task.reserved.is_none() {
        let once = answer(quota.reserve(task.reserve.clone()).await, "reserve");
        let again = answer(quota.reserve(task.reserve.clone()).await, "reserve");
        assert_eq!(
            reserve_answer(&again),
            reserve_answer(&once),
            "{account}: a Reserve sent again"
        );
        task.reserved = Some(once);
        return Resent::Reserve;
    }
    let before = match task.steps.iter().rev().nth(1) {
        Some(Step::Commit(_, Some(answer))) => amounts(&answer.charged_total),
        _ => (0, 0),
    };
    match task.steps.last_mut() {
        Some(Step::Commit(request, slot @ None)) => {
            let once = answer(quota.commit(request.clone()).await, "commit");
            let again = answer(quota.commit(request.clone()).await, "commit");
            let total = amounts(&once.charged_total);
            assert!(
                total.0 + total.1 >= before.0 + before.1,
                "{account}: {once:?} after {before:?}"
            );
            if request.r#final {
                assert_eq!(
                    (&again.charged, &again.charged_total),
                    (&once.charged, &once.charged_total),
                    "{account}: a final Commit sent again"
                );
            } else {
                assert_eq!(
                    (amounts(&again.charged), amounts(&again.charged_total)),
                    ((0, 0), total),
                    "{account}: a Commit sent again"
                );
            }
            let made = amounts(&once.charged) == (0, 0);
            *slot = Some(Box::new(once));
            Resent::Commit { made }
        }
        Some(Step::Release(request, slot @ None)) => {
            let once = answer(quota.release(request.clone()).await, "release");
            let again = answer(quota.release(request.clone()).await, "release");
            assert_eq!(
                once.released, again.released,
                "{account}: a Release sent again"
            );
            *slot = Some(once);
            Resent::Release
        }
        _ => unreachable!("a task with an unanswered call"),
    }
}

/// The usage export read whole by a new consumer group: one event per charge. Event ids are
/// unique, each account's charge numbers run 1..=N with no gap, and the events add up to what
/// every reservation, and so every account, was charged.
async fn check_export(url: &str, group: &str, figures: &BTreeMap<String, Figures>) {
    let mut admin = support::admin_client(url).await;
    let mut events: Vec<pb::ExportedUsageEvent> = Vec::new();
    loop {
        let read = pb::ReadUsageExportRequest {
            group: group.into(),
            consumer: "auditor".into(),
            max_events: 1000,
            claim_idle_ms: 3_600_000,
        };
        let batch = answer(admin.read_usage_export(read).await, "export read").events;
        if batch.is_empty() {
            break;
        }
        events.extend(batch);
    }
    let mut ids = BTreeSet::new();
    let mut seqs: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut by_reservation: HashMap<(&str, &str), (i64, i64)> = HashMap::new();
    for exported in &events {
        let event = exported.event.as_ref().unwrap();
        let account = exported.account_id.as_str();
        assert_eq!(event.event_id, format!("{account}:{}", event.seq));
        assert!(
            ids.insert(event.event_id.clone()),
            "event {} exported twice",
            event.event_id
        );
        seqs.entry(account).or_default().push(event.seq);
        let (plan, credit) = amounts(&event.charged);
        let sum = by_reservation
            .entry((account, event.reservation_id.as_str()))
            .or_default();
        sum.0 += plan;
        sum.1 += credit;
    }
    for (account, figures) in figures {
        let mut numbers = seqs.remove(account.as_str()).unwrap_or_default();
        numbers.sort_unstable();
        let n = numbers.len() as u64;
        assert_eq!(
            numbers,
            (1..=n).collect::<Vec<_>>(),
            "{account}: charges numbered 1..=N, each exported once"
        );
        let newest = figures.usage.recent.first().map_or(0, |e| e.seq);
        assert_eq!(newest, n, "{account}: the history's newest charge");
        for (reservation, &charged) in &figures.charged {
            let exported = by_reservation
                .remove(&(account.as_str(), reservation.as_str()))
                .unwrap_or_default();
            assert_eq!(
                exported, charged,
                "{account}: the export holds what {reservation} was charged"
            );
        }
    }
    assert!(seqs.is_empty(), "events of unknown accounts: {seqs:?}");
    assert!(
        by_reservation.is_empty(),
        "events of unknown reservations: {by_reservation:?}"
    );
}

async fn check_all(
    url: &str,
    round: usize,
    histories: &mut Histories,
    billing: &Arc<Billing>,
) -> Unanswered {
    let mut checks = Vec::new();
    for (account, history) in std::mem::take(histories) {
        let check = check_account(url.to_owned(), account.clone(), history, billing.clone());
        checks.push((account, tokio::spawn(check)));
    }
    let mut figures = BTreeMap::new();
    let mut unanswered = Unanswered::default();
    for (account, check) in checks {
        let (history, found) = check.await.expect("an account's check failed");
        unanswered += found.unanswered;
        histories.insert(account.clone(), history);
        figures.insert(account, found);
    }
    check_export(url, &format!("audit-{round}"), &figures).await;
    unanswered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_money_survives_sigkill() {
    let seed = seed();
    eprintln!("seed {seed} (QUOTAD_CRASH_SEED={seed} replays the load's choices)");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let (billing_url, billing) = billing_service().await;
    // Some charges take a while, so that kills find purchases waiting for their payment.
    let script: Vec<Answer> = (0..4000)
        .map(|_| match rng.below(10) {
            0..=7 => Answer::Approve,
            _ => Answer::Stall(Duration::from_millis(rng.between(30, 300))),
        })
        .collect();
    billing.answers(&script);
    let env = env_of(&[
        ("QUOTAD_PAYMENTS__PROVIDER", "http".into()),
        ("QUOTAD_PAYMENTS__HTTP_URL", billing_url),
        ("QUOTAD_PAYMENTS__HTTP_TIMEOUT_MS", "5000".into()),
        ("QUOTAD_PAYMENTS__RESUME_AFTER_MS", "200".into()),
        // A Reserve short of credits waits this long for a purchase in flight: shorter than
        // the default, so that the clients spend their time on every kind of call.
        ("QUOTAD_PAYMENTS__RESERVE_WAIT_MS", "40".into()),
        // Idle accounts leave memory and are read back from the data dir between calls too.
        ("QUOTAD_STORE__EMBEDDED__EVICT_IDLE_SECONDS", "1".into()),
        // The smallest commit log segments: kills meet segment changes, and segments used
        // again after a checkpoint.
        ("QUOTAD_STORE__EMBEDDED__LOG_SEGMENT_MB", "1".into()),
    ]);
    let accounts: Arc<Vec<String>> =
        Arc::new((0..ACCOUNTS).map(|i| format!("crash-{i:02}")).collect());
    let mut histories = Histories::new();
    let mut unanswered = Unanswered::default();

    let mut quotad = start(dir.path(), &env).await;
    set_up_accounts(&quotad.url(), &accounts, &mut histories).await;
    for round in 1..=KILLS {
        let after = Duration::from_millis(rng.between(200, 600));
        load_then_kill(quotad, round, &mut rng, &accounts, &mut histories, after).await;
        quotad = start(dir.path(), &env).await;
        let cut_off = check_all(&quotad.url(), round, &mut histories, &billing).await;
        eprintln!("kill {round} after {after:?}: {cut_off:?}");
        unanswered += cut_off;
    }
    let tasks: usize = histories.values().map(|h| h.tasks.len()).sum();
    let allowed = histories
        .values()
        .flat_map(|h| &h.tasks)
        .filter(|t| t.reservation_id().is_some())
        .count();
    let mut charges: BTreeMap<String, usize> = BTreeMap::new();
    for seen in billing.seen() {
        *charges.entry(seen.idempotency_key).or_default() += 1;
    }
    let paid_again = charges.values().filter(|&&n| n > 1).count();
    eprintln!(
        "{KILLS} kills, {tasks} tasks ({allowed} allowed), {} auto top-up purchases \
         ({paid_again} paid again after a kill); cut off: {unanswered:?}",
        charges.len()
    );
    assert!(tasks > 100 && !charges.is_empty(), "the load did little");
    drop(quotad);
}

// ---------------------------------------------------------------------------------------------
// The journal on disk.

/// fjall 3 keeps its journal at the top of the data dir, as `N.jnl` files; the newest is the
/// one being written. Oldest first.
fn journals(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter_map(|path| {
            let number = path
                .file_name()?
                .to_str()?
                .strip_suffix(".jnl")?
                .parse()
                .ok()?;
            Some((number, path))
        })
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no journal in {}", dir.display());
    found.into_iter().map(|(_, path)| path).collect()
}

/// One write batch in a journal file.
#[derive(Debug, Clone)]
struct JournalBatch {
    /// Where it is in the file.
    range: Range<usize>,
    items: Vec<JournalItem>,
}

#[derive(Debug, Clone)]
struct JournalItem {
    key: Vec<u8>,
    /// Where its value is in the file, and whether it is stored LZ4-compressed.
    value: Range<usize>,
    compressed: bool,
}

/// Splits a journal file into its batches, following fjall 3.1.13's format
/// (`src/journal/entry.rs`; integers little endian): a batch is a Start entry (tag 1, item count
/// u32, seqno u64), its items (tag 2, value type u8, compression u8, keyspace id u64, key length
/// u16, value length u32, stored value length u32, key, value) and an End entry (tag 3, the
/// xxh3 checksum of the items u64, the trailer `FJL\x03`). A new journal file is preallocated
/// with zeros (`src/journal/writer.rs`, `PRE_ALLOCATED_BYTES`): what follows the last batch is
/// zeros, or nothing once a recovery has cut the file to its batches. Everything before must
/// parse: after a SIGKILL every batch quotad wrote is whole, because each was synced before it
/// was acknowledged and the next one was not begun before that.
fn parse_journal(bytes: &[u8]) -> Vec<JournalBatch> {
    let int = |range: Range<usize>| {
        let mut le = [0u8; 8];
        le[..range.len()].copy_from_slice(&bytes[range]);
        u64::from_le_bytes(le)
    };
    let mut at = 0;
    let mut batches = Vec::new();
    while at < bytes.len() && bytes[at] != 0 {
        let start = at;
        assert_eq!(bytes[at], 1, "a batch starts at {at}");
        let count = int(at + 1..at + 5);
        at += 13;
        let mut items = Vec::new();
        for _ in 0..count {
            match bytes[at] {
                2 => {
                    let key_len = int(at + 11..at + 13) as usize;
                    let stored_len = int(at + 17..at + 21) as usize;
                    let key = at + 21..at + 21 + key_len;
                    let value = key.end..key.end + stored_len;
                    items.push(JournalItem {
                        key: bytes[key].to_vec(),
                        compressed: bytes[at + 2] != 0,
                        value: value.clone(),
                    });
                    at = value.end;
                }
                // A cleared keyspace.
                4 => at += 9,
                tag => panic!("unknown journal entry {tag} at {at}"),
            }
        }
        assert_eq!(bytes[at], 3, "the batch from {start} ends at {at}");
        assert_eq!(&bytes[at + 9..at + 13], b"FJL\x03");
        at += 13;
        batches.push(JournalBatch {
            range: start..at,
            items,
        });
    }
    assert!(
        bytes[at..].iter().all(|&b| b == 0),
        "only preallocated space after the last batch (at {at})"
    );
    batches
}

// ---------------------------------------------------------------------------------------------
// A small load whose every write is acknowledged, for the tests that damage the data dir.

const SMALL: [&str; 3] = ["torn-a", "torn-b", "torn-c"];

/// Three plus accounts with credits; each runs tasks past its plan window onto credits and
/// leaves its last one open. Calls one at a time, so each change is a batch of its own.
async fn small_load(url: &str) {
    let mut admin = support::admin_client(url).await;
    let mut quota = QuotaServiceClient::connect(url.to_owned()).await.unwrap();
    for account in SMALL {
        upsert_plus(&mut admin, account).await;
        let grant = pb::GrantCreditsRequest {
            account_id: account.into(),
            grant_id: "g1".into(),
            amount_micros: 200 * CREDIT,
            ..Default::default()
        };
        answer(admin.grant_credits(grant).await, "grant");
        for t in 0..4u64 {
            let reserve = support::reserve_request(account, &format!("t{t}"), "codex", 60);
            let reserved = answer(quota.reserve(reserve).await, "reserve");
            assert_eq!(reserved.decision(), pb::Decision::Allow, "{reserved:?}");
            for (used, is_final) in [(40, false), (70 + t, t < 3)] {
                let commit = pb::CommitRequest {
                    account_id: account.into(),
                    reservation_id: reserved.reservation_id.clone(),
                    usage: Some(costing(used)),
                    r#final: is_final,
                };
                answer(quota.commit(commit).await, "commit");
            }
            // A read waits for the database to hold what was acknowledged, so the applier
            // writes at once: the journal gets a batch per task for the damage tests to aim at.
            let usage = pb::GetUsageRequest {
                account_id: account.to_string(),
                recent_limit: 1,
            };
            answer(quota.get_usage(usage).await, "usage");
        }
    }
}

async fn snapshots_of(url: &str, accounts: &[&str]) -> Vec<pb::GetUsageResponse> {
    let mut quota = QuotaServiceClient::connect(url.to_owned()).await.unwrap();
    let mut all = Vec::new();
    for account in accounts {
        let request = pb::GetUsageRequest {
            account_id: account.to_string(),
            recent_limit: 100,
        };
        all.push(answer(quota.get_usage(request).await, account));
    }
    all
}

async fn snapshots(url: &str) -> Vec<pb::GetUsageResponse> {
    snapshots_of(url, &SMALL).await
}

/// Where an account's value is stored in the journal: the batches (oldest first) writing
/// `account` uncompressed, with the item.
fn writes_of(bytes: &[u8], batches: &[JournalBatch], account: &str) -> Vec<(usize, JournalItem)> {
    let mut found = Vec::new();
    for (b, batch) in batches.iter().enumerate() {
        for item in &batch.items {
            // An account's persisted form starts with its magic, "QA".
            if item.key == account.as_bytes()
                && !item.compressed
                && bytes[item.value.clone()].starts_with(b"QA")
            {
                found.push((b, item.clone()));
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// The commit log on disk (format: `src/store/commit_log.rs`).

const BLOCK: usize = 4096;

/// The commit log's segments, oldest first (named by their first batch, zero-padded).
fn log_segments(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir.join("commit-log"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            let name = path.file_name().unwrap().to_str().unwrap();
            name.ends_with(".qlog") && name != "spare.qlog"
        })
        .collect();
    found.sort();
    assert!(
        !found.is_empty(),
        "no commit log segment in {}",
        dir.display()
    );
    found
}

/// The frames of a segment: where each is (block-aligned, padded) and its batch number.
fn log_frames(bytes: &[u8]) -> Vec<(Range<usize>, u64)> {
    let mut frames = Vec::new();
    let mut at = BLOCK;
    while bytes.get(at..at + 4) == Some(b"QLBF") {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        let batch = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap());
        let end = at + (20 + len).div_ceil(BLOCK) * BLOCK;
        frames.push((at..end, batch));
        at = end;
    }
    frames
}

/// Copies a directory tree (a data dir, to try several damages on the same one).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The batch number a journal batch records in `meta` (key `batches`, big endian), if any.
fn batch_number(bytes: &[u8], batch: &JournalBatch) -> Option<u64> {
    batch
        .items
        .iter()
        .rev()
        .find(|item| item.key == b"batches" && !item.compressed)
        .map(|item| u64::from_be_bytes(bytes[item.value.clone()].try_into().unwrap()))
}

/// Takes out of the database's journal every batch that applied commit log batch `from` or a
/// later one, as if the applier had not reached them when quotad was killed (zeros, as after
/// the last batch of a preallocated journal file).
fn unapply_from(dir: &Path, from: u64) {
    for journal in journals(dir) {
        let mut bytes = std::fs::read(&journal).unwrap();
        let batches = parse_journal(&bytes);
        if let Some(cut) = batches
            .iter()
            .find(|b| batch_number(&bytes, b).is_some_and(|n| n >= from))
        {
            let start = cut.range.start;
            bytes[start..].fill(0);
            std::fs::write(&journal, &bytes).unwrap();
        }
    }
}

/// A torn write is what a crash in the middle of writing a batch leaves. The commit log writes
/// each batch as one frame, block-aligned, into a segment of zeros, and only once every frame
/// before it is durable; its header carries the payload's length and a CRC-32 of it
/// (`src/store/commit_log.rs`). So a torn batch can only be the last frame, and any cut of it
/// (a part of its header, a part of its payload, a block of it never reaching the disk) fails
/// its check: recovery ends the log there, and that batch, never acknowledged, is dropped.
///
/// The torn frame here is real: the log's last batch (a grant), taken out of the database's
/// journal too, as when the kill came before the applier reached it. Cut anywhere, it is
/// dropped and everything acknowledged before it is there, unchanged; written whole, it is
/// replayed from the log and the grant is back, which shows that the cuts alone made the
/// difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_write_is_dropped_on_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let pristine = dir.path().join("pristine");
    let env = env_of(&[]);
    let quotad = start(&pristine, &env).await;
    small_load(&quotad.url()).await;
    let acknowledged = snapshots(&quotad.url()).await;
    let mut admin = support::admin_client(&quotad.url()).await;
    let grant = pb::GrantCreditsRequest {
        account_id: "torn-a".into(),
        grant_id: "late".into(),
        amount_micros: 7 * CREDIT,
        ..Default::default()
    };
    answer(admin.grant_credits(grant).await, "grant");
    let granted = snapshots(&quotad.url()).await;
    assert_ne!(granted, acknowledged);
    kill(quotad).await;

    let segment = log_segments(&pristine).pop().unwrap();
    let bytes = std::fs::read(&segment).unwrap();
    let (last, number) = log_frames(&bytes).pop().expect("the grant's frame");
    let frame = bytes[last.clone()].to_vec();
    let payload_len = u32::from_le_bytes(frame[4..8].try_into().unwrap()) as usize;
    let mut flipped = frame.clone();
    flipped[20 + payload_len / 2] ^= 0x04;
    let mut garbage = frame[..20].to_vec();
    garbage.extend(std::iter::repeat_n(0xA5, payload_len));
    let torn: Vec<(&str, Vec<u8>)> = vec![
        ("a part of its header", frame[..9].to_vec()),
        ("its header alone", frame[..20].to_vec()),
        ("cut in its payload", frame[..20 + payload_len / 2].to_vec()),
        // (Zeros at the end of a frame are written as the spare's zeros: a cut must miss a
        // byte that is not zero.)
        ("cut before its last byte that is not zero", {
            let last = frame[..20 + payload_len]
                .iter()
                .rposition(|&b| b != 0)
                .unwrap();
            frame[..last].to_vec()
        }),
        ("its header, then garbage", garbage),
        ("a bit of its payload changed", flipped),
    ];
    let run = dir.path().join("run");
    for (what, tail) in torn {
        let _ = std::fs::remove_dir_all(&run);
        copy_dir(&pristine, &run);
        unapply_from(&run, number);
        let segment = log_segments(&run).pop().unwrap();
        let mut damaged = bytes.clone();
        damaged[last.clone()].fill(0);
        damaged[last.start..last.start + tail.len()].copy_from_slice(&tail);
        std::fs::write(&segment, &damaged).unwrap();
        let quotad = start(&run, &env).await;
        assert_eq!(
            snapshots(&quotad.url()).await,
            acknowledged,
            "a torn batch ({what}) changed what was acknowledged"
        );
        kill(quotad).await;
    }

    // Whole, the same frame is replayed: the database did not have the grant, the log did.
    let _ = std::fs::remove_dir_all(&run);
    copy_dir(&pristine, &run);
    unapply_from(&run, number);
    let quotad = start(&run, &env).await;
    assert_eq!(snapshots(&quotad.url()).await, granted);
}

/// Damage that is not a torn tail: a flipped bit in a batch before the last fails that
/// batch's checksum, and fjall refuses to recover (quotad exits, naming the data dir and the
/// error) instead of starting without it; in the commit log, a frame that fails its check with
/// whole frames after it is refused the same way. Neither refusal changes anything on disk. An account's
/// stored value damaged past fjall's checks (written through fjall itself here) fails the
/// persisted form's own checksum: every call on that account fails with INTERNAL and says the
/// stored account is corrupt (a Reserve does not start the account afresh), and the other
/// accounts answer as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_before_the_tail_is_an_error_not_a_wrong_balance() {
    let dir = tempfile::tempdir().unwrap();
    let env = env_of(&[]);
    let quotad = start(dir.path(), &env).await;
    small_load(&quotad.url()).await;
    let acknowledged = snapshots(&quotad.url()).await;
    kill(quotad).await;

    let journal = journals(dir.path()).pop().unwrap();
    let intact = std::fs::read(&journal).unwrap();
    let batches = parse_journal(&intact);
    let writes = writes_of(&intact, &batches, "torn-b");
    let (_, item) = writes
        .iter()
        .find(|(b, _)| *b + 2 < batches.len())
        .expect("a write of torn-b before the last batches");
    let mut damaged = intact.clone();
    damaged[item.value.start + item.value.len() / 2] ^= 0x10;
    std::fs::write(&journal, &damaged).unwrap();
    let refused = run_to_exit(dir.path(), &env, Duration::from_secs(20))
        .await
        .expect("quotad refuses to start");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains(dir.path().to_str().unwrap()) && stderr.contains("ChecksumMismatch"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&journal).unwrap(), damaged, "nothing cut off");
    std::fs::write(&journal, &intact).unwrap();

    // The same in the commit log: a bit flipped in a frame with whole frames after it.
    let segment = log_segments(dir.path()).pop().unwrap();
    let log_intact = std::fs::read(&segment).unwrap();
    let frames = log_frames(&log_intact);
    assert!(frames.len() > 4, "{} frames", frames.len());
    let (frame, number) = frames[frames.len() / 2].clone();
    let mut damaged = log_intact.clone();
    damaged[frame.start + 24] ^= 0x10;
    std::fs::write(&segment, &damaged).unwrap();
    let refused = run_to_exit(dir.path(), &env, Duration::from_secs(20))
        .await
        .expect("quotad refuses to start");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains(dir.path().to_str().unwrap())
            && stderr.contains(&format!(
                "damaged before its end: batch {number} is unreadable"
            )),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&segment).unwrap(), damaged, "nothing cut off");
    std::fs::write(&segment, &log_intact).unwrap();

    let quotad = start(dir.path(), &env).await;
    assert_eq!(snapshots(&quotad.url()).await, acknowledged);
    kill(quotad).await;

    {
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let accounts = db
            .keyspace("accounts", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        let mut value = accounts.get("torn-b").unwrap().unwrap().to_vec();
        let last = value.len() - 1;
        value[last] ^= 0x01;
        accounts.insert("torn-b", value).unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let quotad = start(dir.path(), &env).await;
    let mut quota = QuotaServiceClient::connect(quotad.url()).await.unwrap();
    let mut admin = support::admin_client(&quotad.url()).await;
    let usage = pb::GetUsageRequest {
        account_id: "torn-b".into(),
        recent_limit: 0,
    };
    let reserve = support::reserve_request("torn-b", "after", "codex", 5);
    let grant = pb::GrantCreditsRequest {
        account_id: "torn-b".into(),
        grant_id: "g2".into(),
        amount_micros: CREDIT,
        ..Default::default()
    };
    let failures = [
        quota.get_usage(usage).await.map(|_| ()),
        quota.reserve(reserve).await.map(|_| ()),
        admin.grant_credits(grant).await.map(|_| ()),
    ];
    for failure in failures {
        let status = failure.expect_err("a call on a corrupt account fails");
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert!(status.message().contains("corrupt account"), "{status:?}");
    }
    let now = snapshots_of(&quotad.url(), &["torn-a", "torn-c"]).await;
    assert_eq!(now, [acknowledged[0].clone(), acknowledged[2].clone()]);
}

/// One data dir, one process: fjall's lock file keeps a second quotad off it, and it says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_quotad_on_the_same_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let env = env_of(&[]);
    let first = start(dir.path(), &env).await;
    let second = run_to_exit(dir.path(), &env, Duration::from_secs(20))
        .await
        .expect("the second quotad exits");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "data dir {} is in use by another quotad process",
            dir.path().display()
        )),
        "{stderr}"
    );
    let mut quota = QuotaServiceClient::connect(first.url()).await.unwrap();
    let reserve = support::reserve_request("solo", "r1", "codex", 1);
    let reserved = answer(quota.reserve(reserve).await, "reserve");
    assert_eq!(
        reserved.decision(),
        pb::Decision::Allow,
        "the first one serves on"
    );
}

/// A damaged entry header before the tail of the database's journal (here the tag byte of a
/// batch's Start entry) is damage, not a torn write: what follows it are whole batches,
/// acknowledged. fjall 3.1.13's journal reader (`src/journal/reader.rs`) takes any entry it
/// cannot decode for the end of the journal and truncates the file there, wherever it is, and
/// the batch reader then accepts what came before; by the time quotad can look, the batches
/// after the damage are gone from the database.
///
/// Each of them carries its commit log batch number, and the commit log holds every batch
/// since the last checkpoint: while it still holds the lost ones, the start replays them and
/// nothing acknowledged is missing. A start checkpoints the database and begins a new log, so
/// the same damage after it is a loss the log cannot repair: quotad refuses to start, names the
/// data dir and what was lost, and keeps refusing until an operator restores a backup or
/// removes the log to accept the loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_to_an_entry_header_before_the_tail_is_not_taken_for_a_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    let env = env_of(&[]);
    let damage_a_middle_batch = || {
        let journal = journals(dir.path()).pop().unwrap();
        let mut bytes = std::fs::read(&journal).unwrap();
        let batches = parse_journal(&bytes);
        assert!(batches.len() > 4, "{} batches", batches.len());
        let start = batches[batches.len() / 2].range.start;
        bytes[start] = 0x07;
        std::fs::write(&journal, &bytes).unwrap();
    };
    let quotad = start(dir.path(), &env).await;
    small_load(&quotad.url()).await;
    let acknowledged = snapshots(&quotad.url()).await;
    kill(quotad).await;

    damage_a_middle_batch();
    let quotad = start(dir.path(), &env).await;
    assert_eq!(
        snapshots(&quotad.url()).await,
        acknowledged,
        "the commit log gives back what the damaged journal dropped"
    );
    kill(quotad).await;

    damage_a_middle_batch();
    for attempt in ["first", "second"] {
        let refused = run_to_exit(dir.path(), &env, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "quotad started ({attempt} start) on a journal that lost acknowledged batches"
                )
            });
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("data dir {}", dir.path().display()))
                && stderr.contains("acknowledged and are lost")
                && stderr.contains("commit-log"),
            "the {attempt} start names the data dir, the loss and the way out: {stderr}"
        );
    }

    // An operator who accepts the loss removes the log: quotad starts on what is left.
    std::fs::remove_dir_all(dir.path().join("commit-log")).unwrap();
    let quotad = start(dir.path(), &env).await;
    kill(quotad).await;
}
