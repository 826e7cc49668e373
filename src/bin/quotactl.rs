//! `quotactl`: talk to a running quotad from a terminal or a script. Each subcommand is one RPC;
//! output is short human-readable text by default (amounts in credits, instants in RFC 3339), or
//! with `--json` the answer's message in the proto3 JSON mapping generated from `proto/`, the
//! same as quotad's JSON door (lowerCamelCase names, amounts as `*Micros` integers in decimal
//! strings, enums by their proto names).
//! A deny is an answer, not a failure: it exits 0. Any failure prints one line, `error: …`,
//! that says what to do where it can (see `failure.rs`), and exits 1. How quotad is reached
//! (address, TLS, tokens) is `connect.rs`; `quotactl bench` is a load generator (`bench.rs`).

#[path = "quotactl/bench.rs"]
mod bench;
#[path = "quotactl/connect.rs"]
mod connect;
#[path = "quotactl/failure.rs"]
mod failure;
#[path = "quotactl/probe.rs"]
mod probe;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use connect::{ConnectArgs, Connection, QuotaClient};
use failure::{Answer, Service};
use quotad::api::pb;
use quotad::domain::money::{Credits, parse_credits};
use quotad::domain::{Timestamp, time::SECOND_MS};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "quotactl",
    version,
    about = "Command-line client of quotad",
    long_about = "Command-line client of quotad: one gRPC call per subcommand, and a load \
                  generator (bench).\n\nAmounts are in credits, exact to six decimals (1 credit \
                  = 1,000,000 micro-credits); --json prints the answer in the proto3 JSON \
                  mapping (as quotad's JSON door does), amounts as integer *Micros strings. A denial is an answer and exits 0; any failure prints one \
                  line, `error: …`, and exits 1."
)]
struct Cli {
    #[command(flatten)]
    connect: ConnectArgs,
    /// One JSON object per command instead of text, for scripts.
    ///
    /// Amounts as integer *_micros (1 credit = 1,000,000), instants in RFC 3339, enums by their
    /// proto names.
    #[arg(long, global = true, help_heading = "Output (every subcommand)")]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// May a task start, and who pays? Holds the priced estimate (QuotaService).
    Reserve {
        /// Account id.
        account: String,
        /// Product the task runs in: codex, excel, workspace_agents, or one added in quotad's
        /// config.
        #[arg(long)]
        product: String,
        #[command(flatten)]
        usage: UsageArgs,
        /// Plan of an account seen for the first time (free, go, plus, pro) [default: free];
        /// ignored for a known account.
        #[arg(long, value_name = "PLAN")]
        plan_hint: Option<String>,
        /// Hold lifetime in seconds [default: quotad's `limits.default_ttl_seconds`, 900].
        #[arg(long, value_name = "SECONDS")]
        ttl: Option<u32>,
        /// Idempotency key: a retry with the same id gets the first answer [default: a fresh
        /// UUID].
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
    },
    /// Report a task's cumulative usage; final unless --partial (QuotaService).
    Commit {
        /// Account id.
        account: String,
        /// Reservation id, as Reserve answered it (rsv_…).
        reservation: String,
        #[command(flatten)]
        usage: UsageArgs,
        /// Keep the reservation open (the hold is renewed for the next chunk).
        #[arg(long)]
        partial: bool,
    },
    /// Return a reservation's hold (QuotaService).
    Release {
        /// Account id.
        account: String,
        /// Reservation id, as Reserve answered it (rsv_…).
        reservation: String,
    },
    /// Windows, credits, holds and recent usage of an account (QuotaService).
    Usage {
        /// Account id.
        account: String,
        /// How many recent usage events to show (at most quotad's `limits.recent_events`).
        #[arg(long, value_name = "N", default_value_t = 10)]
        recent: u32,
    },
    /// An account's recent charges, newest first: what, when, how many tokens, who paid
    /// (QuotaService).
    History {
        /// Account id.
        account: String,
        /// How many events (at most quotad's `limits.recent_events`).
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: u32,
    },
    /// The usage export, as a consumer group reads it (AdminService: needs --token).
    #[command(subcommand)]
    Export(ExportCommand),
    /// Grant credits to an account (AdminService: needs --token).
    Grant {
        /// Account id.
        account: String,
        /// Amount in credits, exact to six decimals (e.g. 25.5).
        #[arg(long, value_name = "CREDITS")]
        credits: String,
        /// Idempotency key: granting again with the same id changes nothing [default: a fresh
        /// UUID].
        #[arg(long, value_name = "ID")]
        grant_id: Option<String>,
        /// Where the credits come from: purchase, promo, auto_top_up or adjustment [default:
        /// purchase].
        #[arg(long)]
        source: Option<String>,
        /// Expiry as an RFC 3339 instant, e.g. 2027-01-31T00:00:00Z [default: 12 months after the
        /// grant].
        #[arg(long, value_name = "INSTANT")]
        expires_at: Option<String>,
    },
    /// Auto top-up: show (QuotaService), set, preview or disable (AdminService: needs --token).
    #[command(subcommand)]
    Topup(TopupCommand),
    /// Mint an account-scoped token: its holder may read (read_usage) or change auto top-up
    /// (change_top_up) for this account only, until it expires (AdminService: needs --token).
    Token {
        /// Account id.
        account: String,
        /// read_usage or change_top_up; repeat for both [default: read_usage].
        #[arg(long = "ability", value_name = "ABILITY")]
        abilities: Vec<String>,
        /// Lifetime in seconds [default: an hour, or quotad's account_tokens.max_ttl_seconds].
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        ttl: u32,
    },
    /// Take back what is left of a grant's lot: a refund or chargeback (AdminService: needs
    /// --token).
    Revoke {
        /// Account id.
        account: String,
        /// The grant's idempotency key, as given to `grant --grant-id`.
        grant_id: String,
    },
    /// Read or change an account's plan (AdminService: needs --token).
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
    /// The connection options (--addr, --quota-token, --token, --ca-cert, --cert, --key) are
    /// the same as every other subcommand's; one call is made first to check that quotad is
    /// reachable and takes the token, so a wrong setting fails at once with the cure.
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
    /// Show an account's plan and whether it may buy credits.
    Get {
        /// Account id.
        account: String,
    },
    /// Create or change an account: its plan, and whether it may buy credits.
    Set {
        /// Account id.
        account: String,
        /// Plan: free, go, plus or pro (or one added in quotad's config).
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
        /// Consumer group (e.g. billing); created at the oldest event still kept on its first
        /// read.
        #[arg(long)]
        group: String,
        /// The reading member of the group.
        #[arg(long, default_value = "quotactl")]
        consumer: String,
        /// At most this many events (1 to 1000).
        #[arg(long, value_name = "N", default_value_t = 100)]
        max: u32,
        /// Acknowledge what was read (otherwise it is delivered again after a minute).
        #[arg(long)]
        ack: bool,
    },
    /// Acknowledge deliveries by their delivery ids.
    Ack {
        /// Consumer group the events were delivered to.
        #[arg(long)]
        group: String,
        /// Delivery ids, as `export read` printed them.
        #[arg(required = true, value_name = "DELIVERY_ID")]
        delivery_ids: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TopupCommand {
    /// Settings, the last attempt and any purchase in flight (QuotaService).
    Show {
        /// Account id.
        account: String,
    },
    /// Turn auto top-up on: below THRESHOLD credits, buy back up to TARGET (AdminService).
    Set(TopUpAmounts),
    /// What `set` with these settings would do now, without doing it: whether it would buy
    /// at once, how much and for what price (AdminService).
    Preview(TopUpAmounts),
    /// Turn auto top-up off, keeping its amounts (AdminService).
    Disable {
        /// Account id.
        account: String,
    },
}

/// Auto top-up amounts, for `topup set` and `topup preview`.
#[derive(Args)]
struct TopUpAmounts {
    /// Account id.
    account: String,
    /// Buy when the balance falls below this many credits (e.g. 10).
    #[arg(long, value_name = "CREDITS")]
    threshold: String,
    /// Buy back up to this many credits; more than --threshold.
    #[arg(long, value_name = "CREDITS")]
    target: String,
    /// Most bought per calendar month (UTC), in credits [default: no cap].
    #[arg(long, value_name = "CREDITS")]
    monthly_cap: Option<String>,
}

/// A task's usage: what Reserve prices as its estimate and Commit charges.
#[derive(Args)]
struct UsageArgs {
    /// Model, as in quotad's price sheet.
    #[arg(long, default_value = "gpt-5.5")]
    model: String,
    /// Input tokens, not counting cached ones (priced at the model's input price).
    #[arg(long, value_name = "TOKENS", default_value_t = 0)]
    input: u64,
    /// Cached input tokens (priced at the model's cached-input price).
    #[arg(long, value_name = "TOKENS", default_value_t = 0)]
    cached: u64,
    /// Output tokens.
    #[arg(long, value_name = "TOKENS", default_value_t = 0)]
    output: u64,
    /// Images generated.
    #[arg(long, value_name = "N", default_value_t = 0)]
    images: u32,
    /// Fast mode (priced at the model's fast-mode multiplier).
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

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let conn = match Connection::new(&cli.connect) {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("error: {}", failure::plain(&e));
            std::process::exit(1);
        }
    };
    if let Err(e) = run(&conn, cli.json, cli.command).await {
        eprintln!("error: {}", failure::explain(&e, &conn).await);
        std::process::exit(1);
    }
}

async fn run(conn: &Connection, json: bool, command: Command) -> anyhow::Result<()> {
    if let Command::Bench(args) = command {
        return bench::run(conn, json, *args).await;
    }
    let channel = conn.channel().await?;
    let mut quota = conn.quota(channel.clone());
    let mut admin = conn.admin(channel);
    let out = Output { json };
    use Service::{Admin, Quota};
    match command {
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
            out.reserve(&quota.reserve(request).await.answer(Quota)?);
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
            out.commit(&quota.commit(request).await.answer(Quota)?);
        }
        Command::Release {
            account,
            reservation,
        } => {
            let request = pb::ReleaseRequest {
                account_id: account,
                reservation_id: reservation,
            };
            out.release(&quota.release(request).await.answer(Quota)?);
        }
        Command::Usage { account, recent } => {
            let request = pb::GetUsageRequest {
                account_id: account,
                recent_limit: recent,
            };
            out.usage(&quota.get_usage(request).await.answer(Quota)?);
        }
        Command::History { account, limit } => {
            let request = pb::GetUsageRequest {
                account_id: account.clone(),
                recent_limit: limit,
            };
            out.history(
                &account,
                &quota.get_usage(request).await.answer(Quota)?.recent,
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
            let events = admin.read_usage_export(request).await.answer(Admin)?.events;
            let acknowledged = if ack && !events.is_empty() {
                let request = pb::AckUsageExportRequest {
                    group,
                    delivery_ids: events.iter().map(|e| e.delivery_id.clone()).collect(),
                };
                Some(
                    admin
                        .ack_usage_export(request)
                        .await
                        .answer(Admin)?
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
                .await
                .answer(Admin)?
                .acknowledged;
            out.emit(
                &pb::AckUsageExportResponse { acknowledged: n },
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
            out.grant(&admin.grant_credits(request).await.answer(Admin)?);
        }
        Command::Topup(TopupCommand::Show { account }) => {
            out.top_up(&current_top_up(&mut quota, &account).await?);
        }
        Command::Topup(TopupCommand::Set(amounts)) => {
            let request = top_up_request(amounts)?;
            out.top_up(&admin.set_auto_top_up(request).await.answer(Admin)?);
        }
        Command::Topup(TopupCommand::Preview(amounts)) => {
            let request = top_up_request(amounts)?;
            out.top_up_preview(&admin.preview_auto_top_up(request).await.answer(Admin)?);
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
            out.top_up(&admin.set_auto_top_up(request).await.answer(Admin)?);
        }
        Command::Token {
            account,
            abilities,
            ttl,
        } => {
            let abilities = if abilities.is_empty() {
                vec!["read_usage".to_owned()]
            } else {
                abilities
            };
            let request = pb::MintAccountTokenRequest {
                account_id: account,
                abilities,
                ttl_seconds: ttl,
            };
            out.token(&admin.mint_account_token(request).await.answer(Admin)?);
        }
        Command::Revoke { account, grant_id } => {
            let request = pb::RevokeGrantRequest {
                account_id: account,
                grant_id,
            };
            out.revoke(&admin.revoke_grant(request).await.answer(Admin)?);
        }
        Command::Account(AccountCommand::Get { account }) => {
            let request = pb::GetAccountRequest {
                account_id: account,
            };
            out.account(&admin.get_account(request).await.answer(Admin)?);
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
            out.account(&admin.upsert_account(request).await.answer(Admin)?);
        }
        Command::Bench(_) => unreachable!("run before connecting"),
    }
    Ok(())
}

/// The account's auto top-up settings: AdminService has no getter, GetUsage carries them.
/// Auto top-up turned on with these amounts, for `topup set` and `topup preview`.
fn top_up_request(amounts: TopUpAmounts) -> anyhow::Result<pb::SetAutoTopUpRequest> {
    Ok(pb::SetAutoTopUpRequest {
        account_id: amounts.account,
        enabled: true,
        threshold_micros: credits("--threshold", &amounts.threshold)?,
        target_micros: credits("--target", &amounts.target)?,
        monthly_cap_micros: (amounts.monthly_cap)
            .map(|c| credits("--monthly-cap", &c))
            .transpose()?
            .unwrap_or(0),
    })
}

async fn current_top_up(quota: &mut QuotaClient, account: &str) -> anyhow::Result<pb::AutoTopUp> {
    let request = pb::GetUsageRequest {
        account_id: account.to_owned(),
        recent_limit: 0,
    };
    let usage = quota.get_usage(request).await.answer(Service::Quota)?;
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

/// Parses an RFC 3339 instant (`2027-01-31T00:00:00Z`, or with another offset).
fn parse_instant(text: &str) -> anyhow::Result<quotad::api::wkt::Timestamp> {
    text.parse()
        .map_err(|why| anyhow::anyhow!("--expires-at: {why}"))
}

fn instant(t: &Option<quotad::api::wkt::Timestamp>) -> Option<String> {
    t.as_ref().map(|t| {
        Timestamp::from_millis(t.seconds * SECOND_MS + i64::from(t.nanos) / 1_000_000).to_string()
    })
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

struct Output {
    json: bool,
}

impl Output {
    /// Prints the answer: its message in the proto3 JSON mapping generated from `proto/` (the
    /// JSON door's mapping) with --json, else the text.
    fn emit(&self, message: &impl serde::Serialize, text: Vec<String>) {
        if self.json {
            match serde_json::to_string(message) {
                Ok(json) => println!("{json}"),
                Err(e) => eprintln!("error: cannot print the answer as JSON: {e}"),
            }
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

    /// What shadow mode let through: the denial the rules would have given.
    fn shadow_text(lines: &mut Vec<String>, shadow: &Option<pb::ShadowDenial>) {
        if let Some(d) = shadow {
            lines.push(format!(
                "shadow   would have been DENY: {} {}",
                d.reason().as_str_name(),
                d.action().as_str_name()
            ));
            if !d.message.is_empty() {
                lines.push(format!("         {}", d.message));
            }
        }
    }

    fn reserve(&self, r: &pb::ReserveResponse) {
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
            Self::shadow_text(&mut lines, &r.shadow_denial);
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
        self.emit(r, lines);
    }

    fn commit(&self, c: &pb::CommitResponse) {
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
        Self::shadow_text(&mut lines, &c.shadow_denial);
        if !c.message.is_empty() {
            lines.push(c.message.clone());
        }
        Self::windows_text(&mut lines, &c.windows, c.credit_balance_micros);
        self.emit(c, lines);
    }

    fn release(&self, r: &pb::ReleaseResponse) {
        self.emit(r, vec![format!("released {}", funding_text(&r.released))]);
    }

    fn usage(&self, u: &pb::GetUsageResponse) {
        let ledger = u.ledger.unwrap_or_default();
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
        self.emit(u, lines);
    }

    fn history(&self, account: &str, events: &[pb::UsageEvent]) {
        let mut lines: Vec<String> = events.iter().map(event_text).collect();
        if lines.is_empty() {
            lines.push(format!("no charges recorded for {account}"));
        }
        self.emit(&json!({ "accountId": account, "events": events }), lines);
    }

    fn export(&self, events: &[pb::ExportedUsageEvent], acknowledged: Option<u64>) {
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
        let ack = acknowledged.map(|acknowledged| pb::AckUsageExportResponse { acknowledged });
        self.emit(&json!({ "events": events, "ack": ack }), lines);
    }

    fn grant(&self, g: &pb::GrantCreditsResponse) {
        let lot = g.lot.clone().unwrap_or_default();
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
        self.emit(g, lines);
    }

    fn top_up_preview(&self, p: &pb::AutoTopUpPreview) {
        self.emit(p, vec![p.summary.clone()]);
    }

    fn top_up(&self, t: &pb::AutoTopUp) {
        let last = t.last_attempt.clone().unwrap_or_default();
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
        self.emit(t, lines);
    }

    fn token(&self, t: &pb::AccountToken) {
        let expires = instant(&t.expires_at);
        let lines = vec![
            t.token.clone(),
            format!("expires  {}", expires.unwrap_or_default()),
        ];
        self.emit(t, lines);
    }

    fn revoke(&self, r: &pb::RevokeGrantResponse) {
        let lines = vec![
            format!("revoked  {} credits", Credits(r.revoked_micros)),
            format!("balance  {} credits", Credits(r.credit_balance_micros)),
        ];
        self.emit(r, lines);
    }

    fn account(&self, a: &pb::Account) {
        let barred = if a.credit_purchase_allowed {
            ""
        } else {
            ", credit purchase barred"
        };
        self.emit(
            a,
            vec![format!("{}: plan {}{barred}", a.account_id, a.plan)],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--help` is the manual: every subcommand says what it does, every argument (positional
    /// ones and enum values included) says what it takes.
    #[test]
    fn every_subcommand_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            if cmd.get_about().is_none() && cmd.get_long_about().is_none() {
                missing.push(format!("subcommand `{path}`"));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id();
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("argument `{id}` of `{path}`"));
                }
                for value in arg.get_possible_values() {
                    if !value.is_hide_set() && value.get_help().is_none() {
                        missing.push(format!(
                            "value `{}` of `{id}` of `{path}`",
                            value.get_name()
                        ));
                    }
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut cli = <Cli as clap::CommandFactory>::command();
        cli.build();
        let mut missing = Vec::new();
        walk(&cli, "quotactl", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
        // The walk sees what --help shows.
        assert!(cli.find_subcommand("bench").is_some());
        assert!(cli.get_arguments().any(|a| a.get_id() == "quota_token"));
    }

    #[test]
    fn parses_rfc3339_instants() {
        assert_eq!(parse_instant("1970-01-01T00:00:00Z").unwrap().seconds, 0);
        for same in ["2027-11-24T06:02:03Z", "2027-11-24T07:02:03+01:00"] {
            assert_eq!(parse_instant(same).unwrap().seconds, 1_827_036_123);
        }
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
