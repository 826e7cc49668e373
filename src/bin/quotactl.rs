//! `quotactl`: talk to a running quotad from a terminal or a script. Each subcommand is one RPC;
//! output is short human-readable text by default (amounts in credits, instants in RFC 3339), or
//! one JSON object with `--json` (amounts as integer `*_micros`, enums by their proto names).
//! A deny is an answer, not a failure: it exits 0. A gRPC error exits 1 with `error: CODE: …`.
//! `quotactl bench` is a load generator (see `bench.rs`).

#[path = "quotactl/bench.rs"]
mod bench;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use quotad::api::pb;
use quotad::api::pb::admin_service_client::AdminServiceClient;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use quotad::domain::money::{Credits, parse_credits};
use quotad::domain::{Timestamp, time::SECOND_MS};
use serde_json::{Value, json};
use tonic::transport::Channel;
use tonic::{Request, Status};

#[derive(Parser)]
#[command(name = "quotactl", version, about = "Command-line client of quotad")]
struct Cli {
    /// quotad's gRPC address.
    #[arg(
        long,
        global = true,
        env = "QUOTACTL_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    addr: String,
    /// Admin bearer token (AdminService calls only).
    #[arg(
        long,
        global = true,
        env = "QUOTAD_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// One JSON object per command, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// May a task start, and who pays? Holds the priced estimate.
    Reserve {
        account: String,
        #[arg(long)]
        product: String,
        #[command(flatten)]
        usage: UsageArgs,
        /// Plan of an account seen for the first time.
        #[arg(long)]
        plan_hint: Option<String>,
        /// Hold lifetime in seconds (default: the server's).
        #[arg(long)]
        ttl: Option<u32>,
        /// Idempotency key (default: a fresh one).
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Report a task's cumulative usage; final unless --partial.
    Commit {
        account: String,
        reservation: String,
        #[command(flatten)]
        usage: UsageArgs,
        /// Keep the reservation open (the hold is renewed for the next chunk).
        #[arg(long)]
        partial: bool,
    },
    /// Return a reservation's hold.
    Release {
        account: String,
        reservation: String,
    },
    /// Windows, credits, holds and recent usage of an account.
    Usage {
        account: String,
        /// How many recent usage events to show.
        #[arg(long, default_value_t = 10)]
        recent: u32,
    },
    /// An account's recent charges, newest first: what, when, how many tokens, who paid.
    History {
        account: String,
        /// How many events (at most the server's `limits.recent_events`).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// The usage export, as a consumer group reads it (admin).
    #[command(subcommand)]
    Export(ExportCommand),
    /// Grant credits (admin).
    Grant {
        account: String,
        /// Amount in credits, exact to six decimals (e.g. 25.5).
        #[arg(long)]
        credits: String,
        /// Idempotency key (default: a fresh one).
        #[arg(long)]
        grant_id: Option<String>,
        /// purchase, promo, auto_top_up or adjustment.
        #[arg(long)]
        source: Option<String>,
        /// Expiry as YYYY-MM-DDTHH:MM:SSZ (default: 12 months).
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Auto top-up: show, set or disable (admin for set and disable).
    #[command(subcommand)]
    Topup(TopupCommand),
    /// Take back what is left of a grant's lot: a refund or chargeback (admin).
    Revoke { account: String, grant_id: String },
    /// Read or change an account (admin).
    #[command(subcommand)]
    Account(AccountCommand),
    /// Load generator: throughput, outcomes and latency percentiles of one workload.
    ///
    /// Workloads: `reserve-commit` (default): a Reserve, then a final Commit of the same usage;
    /// one operation is the pair, timed as a pair and for its Reserve alone. `reserve`: a
    /// Reserve alone; an allowed hold is then released (the Release is not timed, but the
    /// worker waits for it, so holds never pile up). `health`: grpc.health.v1 Check of the whole
    /// server, the floor any call pays. `rls`: Envoy's ShouldRateLimit with one descriptor,
    /// `account_id = ACCOUNT`.
    ///
    /// Accounts are `bench-RUN-N`, drawn with a Zipf popularity; before the run a share is set
    /// up over the limit (free, 5-hour window used up: their Reserves are denied) and a share on
    /// credits (plus with credits granted and the 5-hour window used up; needs the admin token,
    /// skipped without one); the rest are new free accounts made by their first Reserve. The
    /// default task is tiny (10 input and 1 output tokens on gpt-5.5-mini: 0.00045 credits) so
    /// that even the most popular account, which gets about 15% of the calls with the defaults,
    /// lasts 33,000 tasks on the free plan's 5-hour window; larger tasks make popular accounts
    /// run out during the run, which shows as denials of free accounts.
    ///
    /// A denial is an answer (DENY, OVER_LIMIT) and counted apart from errors, which are counted
    /// by gRPC code. Latency covers the operations answered (allowed or denied), in
    /// microseconds; a denied reserve-commit operation is its Reserve alone. Output: a progress
    /// bar on stderr (on a terminal, without --json), then a summary, or one JSON object with
    /// --json.
    Bench(Box<bench::BenchArgs>),
}

#[derive(Subcommand)]
enum AccountCommand {
    Get {
        account: String,
    },
    Set {
        account: String,
        #[arg(long)]
        plan: String,
        /// Bar the account from buying (and spending) credits.
        #[arg(long)]
        no_credit_purchase: bool,
    },
}

#[derive(Subcommand)]
enum ExportCommand {
    /// Events not yet delivered to GROUP (and those left unacknowledged too long).
    Read {
        #[arg(long)]
        group: String,
        #[arg(long, default_value = "quotactl")]
        consumer: String,
        #[arg(long, default_value_t = 100)]
        max: u32,
        /// Acknowledge what was read (otherwise it is delivered again after a minute).
        #[arg(long)]
        ack: bool,
    },
    /// Acknowledge deliveries by their delivery ids.
    Ack {
        #[arg(long)]
        group: String,
        #[arg(required = true)]
        delivery_ids: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TopupCommand {
    /// Settings, the last attempt and any purchase in flight.
    Show {
        account: String,
    },
    /// Turn auto top-up on: below THRESHOLD credits, buy back up to TARGET.
    Set {
        account: String,
        #[arg(long)]
        threshold: String,
        #[arg(long)]
        target: String,
        /// Most bought per calendar month, in credits.
        #[arg(long)]
        monthly_cap: Option<String>,
    },
    Disable {
        account: String,
    },
}

#[derive(Args)]
struct UsageArgs {
    #[arg(long, default_value = "gpt-5.5")]
    model: String,
    #[arg(long, default_value_t = 0)]
    input: u64,
    #[arg(long, default_value_t = 0)]
    cached: u64,
    #[arg(long, default_value_t = 0)]
    output: u64,
    #[arg(long, default_value_t = 0)]
    images: u32,
    #[arg(long)]
    fast: bool,
}

impl From<UsageArgs> for pb::Usage {
    fn from(u: UsageArgs) -> pb::Usage {
        pb::Usage {
            model: u.model,
            input_tokens: u.input,
            cached_input_tokens: u.cached,
            output_tokens: u.output,
            images: u.images,
            fast_mode: u.fast,
        }
    }
}

/// Adds the admin bearer token to every call of the admin client.
#[derive(Clone)]
struct AdminToken(Option<String>);

impl tonic::service::Interceptor for AdminToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| Status::invalid_argument("token: not valid in a header"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        match e.downcast_ref::<Status>() {
            Some(status) => eprintln!("error: {:?}: {}", status.code(), status.message()),
            None => eprintln!("error: {e:#}"),
        }
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Bench(args) = cli.command {
        return bench::run(&cli.addr, cli.token.as_deref(), cli.json, *args).await;
    }
    let channel = Channel::from_shared(cli.addr.clone())
        .context("--addr must be a URL such as http://127.0.0.1:50051")?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {}", cli.addr))?;
    let mut quota = QuotaServiceClient::new(channel.clone());
    let mut admin = AdminServiceClient::with_interceptor(channel, AdminToken(cli.token.clone()));
    let out = Output { json: cli.json };
    match cli.command {
        Command::Reserve {
            account,
            product,
            usage,
            plan_hint,
            ttl,
            request_id,
        } => {
            let request = pb::ReserveRequest {
                account_id: account,
                request_id: request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                product,
                estimate: Some(usage.into()),
                plan_hint: plan_hint.unwrap_or_default(),
                ttl_seconds: ttl.unwrap_or(0),
            };
            out.reserve(&quota.reserve(request).await?.into_inner());
        }
        Command::Commit {
            account,
            reservation,
            usage,
            partial,
        } => {
            let request = pb::CommitRequest {
                account_id: account,
                reservation_id: reservation,
                usage: Some(usage.into()),
                r#final: !partial,
            };
            out.commit(&quota.commit(request).await?.into_inner());
        }
        Command::Release {
            account,
            reservation,
        } => {
            let request = pb::ReleaseRequest {
                account_id: account,
                reservation_id: reservation,
            };
            out.release(&quota.release(request).await?.into_inner());
        }
        Command::Usage { account, recent } => {
            let request = pb::GetUsageRequest {
                account_id: account,
                recent_limit: recent,
            };
            out.usage(&quota.get_usage(request).await?.into_inner());
        }
        Command::History { account, limit } => {
            let request = pb::GetUsageRequest {
                account_id: account.clone(),
                recent_limit: limit,
            };
            out.history(
                &account,
                &quota.get_usage(request).await?.into_inner().recent,
            );
        }
        Command::Export(ExportCommand::Read {
            group,
            consumer,
            max,
            ack,
        }) => {
            let request = pb::ReadUsageExportRequest {
                group: group.clone(),
                consumer,
                max_events: max,
                claim_idle_ms: 0,
            };
            let events = admin.read_usage_export(request).await?.into_inner().events;
            let acknowledged = if ack && !events.is_empty() {
                let request = pb::AckUsageExportRequest {
                    group,
                    delivery_ids: events.iter().map(|e| e.delivery_id.clone()).collect(),
                };
                Some(
                    admin
                        .ack_usage_export(request)
                        .await?
                        .into_inner()
                        .acknowledged,
                )
            } else {
                None
            };
            out.export(&events, acknowledged);
        }
        Command::Export(ExportCommand::Ack {
            group,
            delivery_ids,
        }) => {
            let request = pb::AckUsageExportRequest {
                group,
                delivery_ids,
            };
            let n = admin
                .ack_usage_export(request)
                .await?
                .into_inner()
                .acknowledged;
            out.emit(
                json!({ "acknowledged": n }),
                vec![format!("acknowledged {n}")],
            );
        }
        Command::Grant {
            account,
            credits,
            grant_id,
            source,
            expires_at,
        } => {
            let amount_micros = self::credits("--credits", &credits)?;
            let request = pb::GrantCreditsRequest {
                account_id: account,
                grant_id: grant_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                amount_micros,
                source: source.unwrap_or_default(),
                expires_at: expires_at.as_deref().map(parse_instant).transpose()?,
            };
            out.grant(&admin.grant_credits(request).await?.into_inner());
        }
        Command::Topup(TopupCommand::Show { account }) => {
            out.top_up(&current_top_up(&mut quota, &account).await?);
        }
        Command::Topup(TopupCommand::Set {
            account,
            threshold,
            target,
            monthly_cap,
        }) => {
            let request = pb::SetAutoTopUpRequest {
                account_id: account,
                enabled: true,
                threshold_micros: credits("--threshold", &threshold)?,
                target_micros: credits("--target", &target)?,
                monthly_cap_micros: monthly_cap
                    .map(|c| credits("--monthly-cap", &c))
                    .transpose()?
                    .unwrap_or(0),
            };
            out.top_up(&admin.set_auto_top_up(request).await?.into_inner());
        }
        Command::Topup(TopupCommand::Disable { account }) => {
            let current = current_top_up(&mut quota, &account).await?;
            // Keep the amounts (they must stay valid), only turn it off.
            let target = current.target_micros.max(current.threshold_micros + 1);
            let request = pb::SetAutoTopUpRequest {
                account_id: account,
                enabled: false,
                threshold_micros: current.threshold_micros,
                target_micros: target,
                monthly_cap_micros: current.monthly_cap_micros,
            };
            out.top_up(&admin.set_auto_top_up(request).await?.into_inner());
        }
        Command::Revoke { account, grant_id } => {
            let request = pb::RevokeGrantRequest {
                account_id: account,
                grant_id,
            };
            out.revoke(&admin.revoke_grant(request).await?.into_inner());
        }
        Command::Account(AccountCommand::Get { account }) => {
            let request = pb::GetAccountRequest {
                account_id: account,
            };
            out.account(&admin.get_account(request).await?.into_inner());
        }
        Command::Account(AccountCommand::Set {
            account,
            plan,
            no_credit_purchase,
        }) => {
            let account = pb::Account {
                account_id: account,
                plan,
                credit_purchase_allowed: !no_credit_purchase,
            };
            let request = pb::UpsertAccountRequest {
                account: Some(account),
            };
            out.account(&admin.upsert_account(request).await?.into_inner());
        }
        Command::Bench(_) => unreachable!("run before connecting"),
    }
    Ok(())
}

/// The account's auto top-up settings: AdminService has no getter, GetUsage carries them.
async fn current_top_up(
    quota: &mut QuotaServiceClient<Channel>,
    account: &str,
) -> anyhow::Result<pb::AutoTopUp> {
    let request = pb::GetUsageRequest {
        account_id: account.to_owned(),
        recent_limit: 0,
    };
    let usage = quota.get_usage(request).await?.into_inner();
    Ok(usage.auto_top_up.unwrap_or_default())
}

/// A credit amount from a flag, exactly, in micros.
fn credits(flag: &str, text: &str) -> anyhow::Result<i64> {
    match parse_credits(text) {
        Some(micros) => Ok(micros),
        None => bail!(
            "{flag} {text:?}: expected a positive decimal with at most 6 decimal places, e.g. 25 or 0.5"
        ),
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` (UTC) exactly.
fn parse_instant(text: &str) -> anyhow::Result<prost_types::Timestamp> {
    let bad = || {
        anyhow::anyhow!(
            "--expires-at {text:?}: expected YYYY-MM-DDTHH:MM:SSZ, e.g. 2027-01-31T00:00:00Z"
        )
    };
    let b = text.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return Err(bad());
    }
    let num = |range: std::ops::Range<usize>| text[range].parse::<i64>().map_err(|_| bad());
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(bad());
    }
    // Days from the epoch by H. Hinnant's civil-date algorithm.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second;
    let back = Timestamp::from_millis(seconds * SECOND_MS).to_string();
    if back[..19] != text[..19] {
        return Err(bad()); // e.g. February 30th
    }
    Ok(prost_types::Timestamp { seconds, nanos: 0 })
}

fn instant(t: &Option<prost_types::Timestamp>) -> Option<String> {
    t.as_ref().map(|t| {
        Timestamp::from_millis(t.seconds * SECOND_MS + i64::from(t.nanos) / 1_000_000).to_string()
    })
}

fn funding_json(f: &Option<pb::Funding>) -> Value {
    let f = f.unwrap_or_default();
    json!({ "plan_micros": f.plan_micros, "credit_micros": f.credit_micros })
}

fn funding_text(f: &Option<pb::Funding>) -> String {
    let f = f.unwrap_or_default();
    format!(
        "{} credits (plan {}, credits {})",
        Credits(f.plan_micros + f.credit_micros),
        Credits(f.plan_micros),
        Credits(f.credit_micros)
    )
}

fn event_json(e: &pb::UsageEvent) -> Value {
    let u = e.usage.clone().unwrap_or_default();
    json!({
        "event_id": e.event_id, "seq": e.seq, "at": instant(&e.at), "product": e.product,
        "model": e.model, "input_tokens": u.input_tokens, "cached_input_tokens": u.cached_input_tokens,
        "output_tokens": u.output_tokens, "images": u.images, "fast_mode": u.fast_mode,
        "charged": funding_json(&e.charged), "reservation_id": e.reservation_id,
        "price_version": e.price_version,
    })
}

fn event_text(e: &pb::UsageEvent) -> String {
    let u = e.usage.clone().unwrap_or_default();
    format!(
        "{}  {:<14} {} {}{}: in {} (cached {}), out {}{}  {}  [{}]",
        instant(&e.at).unwrap_or_default(),
        e.event_id,
        e.product,
        e.model,
        if u.fast_mode { " fast" } else { "" },
        u.input_tokens,
        u.cached_input_tokens,
        u.output_tokens,
        if u.images > 0 {
            format!(", {} images", u.images)
        } else {
            String::new()
        },
        funding_text(&e.charged),
        e.reservation_id
    )
}

fn windows_json(windows: &[pb::WindowStatus]) -> Value {
    windows
        .iter()
        .map(|w| {
            json!({
                "name": w.name, "used_micros": w.used_micros, "held_micros": w.held_micros,
                "limit_micros": w.limit_micros, "resets_at": instant(&w.resets_at),
            })
        })
        .collect()
}

struct Output {
    json: bool,
}

impl Output {
    fn emit(&self, value: Value, text: Vec<String>) {
        if self.json {
            println!("{value}");
        } else {
            println!("{}", text.join("\n"));
        }
    }

    fn windows_text(lines: &mut Vec<String>, windows: &[pb::WindowStatus], balance: i64) {
        for w in windows {
            let resets = instant(&w.resets_at)
                .map(|t| format!(", resets {t}"))
                .unwrap_or_default();
            lines.push(format!(
                "{:<8} used {} / {} credits{}{resets}",
                w.name,
                Credits(w.used_micros),
                Credits(w.limit_micros),
                if w.held_micros > 0 {
                    format!(" ({} held)", Credits(w.held_micros))
                } else {
                    String::new()
                }
            ));
        }
        lines.push(format!("balance  {} credits", Credits(balance)));
    }

    fn denial_text(
        lines: &mut Vec<String>,
        reason: &str,
        action: &str,
        upgrade_to: &str,
        retry_at: Option<String>,
        message: &str,
    ) {
        lines.push(format!("reason   {reason}"));
        lines.push(format!("action   {action}"));
        if !upgrade_to.is_empty() {
            lines.push(format!("upgrade  {upgrade_to}"));
        }
        if let Some(t) = retry_at {
            lines.push(format!("retry at {t}"));
        }
        if !message.is_empty() {
            lines.push(message.to_owned());
        }
    }

    fn reserve(&self, r: &pb::ReserveResponse) {
        let value = json!({
            "decision": r.decision().as_str_name(), "reservation_id": r.reservation_id,
            "held": funding_json(&r.held), "estimate_micros": r.estimate_micros,
            "expires_at": instant(&r.expires_at), "reason": r.reason().as_str_name(),
            "action": r.action().as_str_name(), "upgrade_to": r.upgrade_to, "retry_at": instant(&r.retry_at),
            "message": r.message, "windows": windows_json(&r.windows), "credit_balance_micros": r.credit_balance_micros,
        });
        let mut lines = vec![format!(
            "{}  (estimate {} credits)",
            r.decision().as_str_name(),
            Credits(r.estimate_micros)
        )];
        if r.decision() == pb::Decision::Allow {
            lines.push(format!("reservation {}", r.reservation_id));
            lines.push(format!("held     {}", funding_text(&r.held)));
            lines.push(format!(
                "expires  {}",
                instant(&r.expires_at).unwrap_or_default()
            ));
        } else {
            let (reason, action) = (r.reason().as_str_name(), r.action().as_str_name());
            Self::denial_text(
                &mut lines,
                reason,
                action,
                &r.upgrade_to,
                instant(&r.retry_at),
                &r.message,
            );
        }
        Self::windows_text(&mut lines, &r.windows, r.credit_balance_micros);
        self.emit(value, lines);
    }

    fn commit(&self, c: &pb::CommitResponse) {
        let value = json!({
            "charged": funding_json(&c.charged), "charged_total": funding_json(&c.charged_total),
            "held": funding_json(&c.held), "may_continue": c.may_continue, "expires_at": instant(&c.expires_at),
            "action": c.action().as_str_name(), "reason": c.reason().as_str_name(), "message": c.message,
            "windows": windows_json(&c.windows), "credit_balance_micros": c.credit_balance_micros,
        });
        let mut lines = vec![
            format!("charged  {}", funding_text(&c.charged)),
            format!("in all   {}", funding_text(&c.charged_total)),
        ];
        if c.expires_at.is_some() {
            lines.push(format!(
                "may continue: {}",
                if c.may_continue { "yes" } else { "no" }
            ));
            lines.push(format!("held     {}", funding_text(&c.held)));
        }
        if !c.may_continue && c.action() != pb::Action::Unspecified {
            lines.push(format!("action   {}", c.action().as_str_name()));
        }
        if !c.message.is_empty() {
            lines.push(c.message.clone());
        }
        Self::windows_text(&mut lines, &c.windows, c.credit_balance_micros);
        self.emit(value, lines);
    }

    fn release(&self, r: &pb::ReleaseResponse) {
        self.emit(
            json!({ "released": funding_json(&r.released) }),
            vec![format!("released {}", funding_text(&r.released))],
        );
    }

    fn usage(&self, u: &pb::GetUsageResponse) {
        let ledger = u.ledger.unwrap_or_default();
        let value = json!({
            "plan": u.plan, "credit_purchase_allowed": u.credit_purchase_allowed,
            "windows": windows_json(&u.windows), "credit_balance_micros": u.credit_balance_micros,
            "ledger": {
                "granted_micros": ledger.granted_micros, "spent_micros": ledger.spent_micros,
                "expired_micros": ledger.expired_micros, "revoked_micros": ledger.revoked_micros,
                "balance_micros": ledger.balance_micros,
                "held_micros": ledger.held_micros, "available_micros": ledger.available_micros,
            },
            "lots": u.lots.iter().map(|l| json!({
                "lot_id": l.lot_id, "source": l.source, "granted_micros": l.granted_micros,
                "remaining_micros": l.remaining_micros, "expires_at": instant(&l.expires_at),
            })).collect::<Vec<_>>(),
            "holds": u.holds.iter().map(|h| json!({
                "reservation_id": h.reservation_id, "product": h.product, "held": funding_json(&h.held),
                "charged": funding_json(&h.charged), "expires_at": instant(&h.expires_at),
            })).collect::<Vec<_>>(),
            "recent": u.recent.iter().map(event_json).collect::<Vec<_>>(),
        });
        let mut lines = vec![format!(
            "plan     {}{}",
            u.plan,
            if u.credit_purchase_allowed {
                ""
            } else {
                " (credit purchase barred)"
            }
        )];
        Self::windows_text(&mut lines, &u.windows, u.credit_balance_micros);
        lines.push(format!(
            "credits  granted {}, spent {}, expired {}, revoked {}, held {}, available {}",
            Credits(ledger.granted_micros),
            Credits(ledger.spent_micros),
            Credits(ledger.expired_micros),
            Credits(ledger.revoked_micros),
            Credits(ledger.held_micros),
            Credits(ledger.available_micros)
        ));
        for l in &u.lots {
            lines.push(format!(
                "  lot {} ({}): {} of {} left, expires {}",
                l.lot_id,
                l.source,
                Credits(l.remaining_micros),
                Credits(l.granted_micros),
                instant(&l.expires_at).unwrap_or_default()
            ));
        }
        for h in &u.holds {
            lines.push(format!(
                "  hold {} ({}): {}",
                h.reservation_id,
                h.product,
                funding_text(&h.held)
            ));
        }
        lines.extend(u.recent.iter().map(|e| format!("  {}", event_text(e))));
        self.emit(value, lines);
    }

    fn history(&self, account: &str, events: &[pb::UsageEvent]) {
        let value = json!({
            "account_id": account,
            "events": events.iter().map(event_json).collect::<Vec<_>>(),
        });
        let mut lines: Vec<String> = events.iter().map(event_text).collect();
        if lines.is_empty() {
            lines.push(format!("no charges recorded for {account}"));
        }
        self.emit(value, lines);
    }

    fn export(&self, events: &[pb::ExportedUsageEvent], acknowledged: Option<u64>) {
        let value = json!({
            "events": events.iter().map(|e| json!({
                "delivery_id": e.delivery_id, "account_id": e.account_id,
                "event": e.event.as_ref().map(event_json),
            })).collect::<Vec<_>>(),
            "acknowledged": acknowledged,
        });
        let mut lines: Vec<String> = events
            .iter()
            .map(|e| {
                let event = e.event.as_ref().map(event_text).unwrap_or_default();
                format!("{}  {event}", e.delivery_id)
            })
            .collect();
        if lines.is_empty() {
            lines.push("no new events".into());
        }
        if let Some(n) = acknowledged {
            lines.push(format!("acknowledged {n}"));
        }
        self.emit(value, lines);
    }

    fn grant(&self, g: &pb::GrantCreditsResponse) {
        let lot = g.lot.clone().unwrap_or_default();
        let value = json!({
            "lot": { "lot_id": lot.lot_id, "source": lot.source, "granted_micros": lot.granted_micros,
                     "remaining_micros": lot.remaining_micros, "expires_at": instant(&lot.expires_at) },
            "credit_balance_micros": g.credit_balance_micros,
        });
        let lines = vec![
            format!(
                "granted  {} credits as lot {} ({}), expires {}",
                Credits(lot.granted_micros),
                lot.lot_id,
                lot.source,
                instant(&lot.expires_at).unwrap_or_default()
            ),
            format!("balance  {} credits", Credits(g.credit_balance_micros)),
        ];
        self.emit(value, lines);
    }

    fn top_up(&self, t: &pb::AutoTopUp) {
        let last = t.last_attempt.clone().unwrap_or_default();
        let value = json!({
            "enabled": t.enabled, "threshold_micros": t.threshold_micros, "target_micros": t.target_micros,
            "monthly_cap_micros": t.monthly_cap_micros, "consecutive_declines": t.consecutive_declines,
            "in_flight_purchase_id": t.in_flight_purchase_id, "in_flight_micros": t.in_flight_micros,
            "last_attempt": t.last_attempt.as_ref().map(|a| json!({
                "at": instant(&a.at), "amount_micros": a.amount_micros, "outcome": a.outcome().as_str_name(),
                "error": a.error, "payment_id": a.payment_id,
            })),
        });
        let cap = if t.monthly_cap_micros > 0 {
            format!(", at most {} a month", Credits(t.monthly_cap_micros))
        } else {
            String::new()
        };
        let mut lines = vec![format!(
            "auto top-up {}: below {} credits, buy back up to {}{cap}",
            if t.enabled { "on" } else { "off" },
            Credits(t.threshold_micros),
            Credits(t.target_micros)
        )];
        if !t.in_flight_purchase_id.is_empty() {
            lines.push(format!(
                "paying   {} credits ({})",
                Credits(t.in_flight_micros),
                t.in_flight_purchase_id
            ));
        }
        if t.last_attempt.is_some() {
            let error = if last.error.is_empty() {
                String::new()
            } else {
                format!(": {}", last.error)
            };
            lines.push(format!(
                "last     {} {} credits at {}{error}",
                last.outcome().as_str_name(),
                Credits(last.amount_micros),
                instant(&last.at).unwrap_or_default()
            ));
        }
        if t.consecutive_declines > 0 {
            lines.push(format!("declines {} in a row", t.consecutive_declines));
        }
        self.emit(value, lines);
    }

    fn revoke(&self, r: &pb::RevokeGrantResponse) {
        let value = json!({ "revoked_micros": r.revoked_micros, "credit_balance_micros": r.credit_balance_micros });
        let lines = vec![
            format!("revoked  {} credits", Credits(r.revoked_micros)),
            format!("balance  {} credits", Credits(r.credit_balance_micros)),
        ];
        self.emit(value, lines);
    }

    fn account(&self, a: &pb::Account) {
        let value = json!({ "account_id": a.account_id, "plan": a.plan, "credit_purchase_allowed": a.credit_purchase_allowed });
        let barred = if a.credit_purchase_allowed {
            ""
        } else {
            ", credit purchase barred"
        };
        self.emit(
            value,
            vec![format!("{}: plan {}{barred}", a.account_id, a.plan)],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_utc_instants_exactly() {
        assert_eq!(parse_instant("1970-01-01T00:00:00Z").unwrap().seconds, 0);
        assert_eq!(
            parse_instant("2027-11-24T06:02:03Z").unwrap().seconds,
            1_827_036_123
        );
        for bad in [
            "2027-02-30T00:00:00Z",
            "2027-11-24 06:02:03Z",
            "2027-11-24T06:02:03",
            "tomorrow",
        ] {
            assert!(parse_instant(bad).is_err(), "{bad}");
        }
    }
}
