//! The application core in front of a store: checks requests against the configured policy,
//! prices usage, stamps the time and mints ids, then asks the store to apply the operation.
//!
//! It knows nothing about gRPC: the API edge turns protobuf messages into the request types
//! below, and this layer turns them into the domain's commands. Everything a caller can get
//! wrong is caught here, before the store is touched, so bad input changes nothing.
//!
//! Its errors are [`QuotaError`]s: a refusal (bad input, or a rule saying no) is told apart
//! from a store that is unavailable or failing, whichever layer found it.

use std::sync::Arc;

use crate::domain::rls::{self, CounterCheck, RlsRule, Target};
use crate::domain::time::SECOND_MS;
use crate::domain::top_up::{PaymentResult, Purchase, TopUpSettings};
use crate::domain::{
    Account, Action, Clock, CommitCommand, CommitOutcome, Decision, Denial, DenyReason,
    DomainError, ExportedEvent, Funding, GrantCommand, GrantOutcome, LotSource, Micros, Policy,
    PricingError, ReleaseCommand, ReleaseOutcome, ReserveCommand, ReserveOutcome, RevokeCommand,
    RevokeOutcome, SetTopUpCommand, SettleTopUpCommand, Timestamp, TopUpOutcome, TopUpPreview,
    Usage, UsageSnapshot,
};
use crate::metrics::Metrics;
use crate::notify::{Backoff, NoticeOrder, NoticeQueue, Outbox, Webhook};
use crate::payment::{PaymentQueue, Settle};
use crate::rules::{LiveRules, Rules};
use crate::store::{ExportRead, Store, StoreError};
use tracing::Instrument;

/// Who pays, in a word, for spans and logs.
fn funding_name(f: Funding) -> &'static str {
    match (f.plan > 0, f.credit > 0) {
        (true, true) => "mixed",
        (true, false) => "plan",
        (false, true) => "credits",
        (false, false) => "none",
    }
}

fn reason_name(reason: DenyReason) -> &'static str {
    match reason {
        DenyReason::WindowExhausted => "WINDOW_EXHAUSTED",
        DenyReason::WeeklyExhausted => "WEEKLY_EXHAUSTED",
        DenyReason::CreditsExhausted => "CREDITS_EXHAUSTED",
        DenyReason::CreditsNotAllowed => "CREDITS_NOT_ALLOWED",
    }
}

fn action_name(action: Action) -> &'static str {
    match action {
        Action::UpgradePlan => "UPGRADE_PLAN",
        Action::BuyCredits => "BUY_CREDITS",
        Action::WaitForReset => "WAIT_FOR_RESET",
        Action::UpdatePaymentMethod => "UPDATE_PAYMENT_METHOD",
    }
}

/// Why a call to [`Quota`] has no answer. A deny is not here: it is a normal decision.
/// `api::status` turns each into one gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    /// The request was refused and nothing changed: by a check of its fields before any store
    /// was asked (`InvalidArgument` naming the field), or by the rules (not found, already
    /// used, not possible now).
    #[error(transparent)]
    Refused(#[from] DomainError),
    /// The store could not be reached in time; the call may be retried.
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    /// The store answered something it should never answer (a bug, or a version mismatch).
    #[error("store error: {0}")]
    StoreFailed(String),
    /// Another replica decides on the account, reached at `address`: the call is sent there
    /// (see [`crate::api::forward`]), or the caller is told.
    #[error("the account is decided by replica {owner} at {address}")]
    Moved { owner: String, address: String },
}

impl From<StoreError> for QuotaError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Rule(rule) => QuotaError::Refused(rule),
            StoreError::Unavailable(reason) => QuotaError::StoreUnavailable(reason),
            StoreError::Internal(reason) => QuotaError::StoreFailed(reason),
            StoreError::Moved { owner, address } => QuotaError::Moved { owner, address },
        }
    }
}

/// Recent usage events returned when a GetUsage does not say how many.
pub const DEFAULT_RECENT_LIMIT: u32 = 20;
/// Usage export reads: events per read by default and at most, and how long a delivery stays
/// with a consumer before it is delivered again.
const DEFAULT_EXPORT_READ: u32 = 100;
const MAX_EXPORT_READ: u32 = 1_000;
const DEFAULT_CLAIM_IDLE_MS: i64 = 60_000;

/// SetAutoTopUp's and PreviewAutoTopUp's input, unchecked (a monthly cap of 0: no cap).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopUpRequest {
    pub account_id: String,
    pub enabled: bool,
    pub threshold: Micros,
    pub target: Micros,
    pub monthly_cap: Micros,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReserveRequest {
    pub account_id: String,
    pub request_id: String,
    pub product: String,
    pub estimate: Option<Usage>,
    /// Empty: the default plan.
    pub plan_hint: String,
    /// 0: the configured default.
    pub ttl_seconds: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommitRequest {
    pub account_id: String,
    pub reservation_id: String,
    /// Cumulative usage of the task.
    pub usage: Option<Usage>,
    pub is_final: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReleaseRequest {
    pub account_id: String,
    pub reservation_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GrantRequest {
    pub account_id: String,
    pub grant_id: String,
    pub amount: Micros,
    /// Empty: `purchase`.
    pub source: String,
    pub expires_at: Option<Timestamp>,
}

/// The quota service: rules, prices and clock in front of a store.
#[derive(Debug)]
pub struct Quota<S> {
    store: S,
    /// Shared with the store; each call takes one snapshot when it starts (see
    /// [`crate::rules`]).
    rules: Arc<LiveRules>,
    clock: Arc<dyn Clock>,
    /// Auto top-up purchases that operations started, for the payment worker.
    payments: PaymentQueue,
    /// How long a Reserve short of credits may wait for a purchase in flight.
    reserve_wait: std::time::Duration,
    metrics: Arc<Metrics>,
    /// Where notifications go, when a webhook is configured.
    webhooks: Option<Webhooks>,
}

/// The webhook receiver, how it is retried, and the accounts queued for its worker.
#[derive(Debug)]
struct Webhooks {
    webhook: Arc<Webhook>,
    backoff: Backoff,
    queue: NoticeQueue,
}

/// How often a waiting Reserve asks again.
const RESERVE_WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(20);

impl<S: Store> Quota<S> {
    /// `rules` must be the ones `store` decides by.
    pub fn new(store: S, rules: Arc<LiveRules>, clock: Arc<dyn Clock>) -> Self {
        Quota {
            store,
            rules,
            clock,
            payments: PaymentQueue::default(),
            reserve_wait: std::time::Duration::ZERO,
            metrics: Arc::new(Metrics::new()),
            webhooks: None,
        }
    }

    /// Delivers the notifications the rules record to `webhook` (see [`crate::notify`]); the
    /// worker is [`webhook_worker`](Self::webhook_worker), fed by [`maintain`](Self::maintain).
    pub fn with_webhooks(mut self, webhook: Webhook, backoff: Backoff) -> Self {
        self.webhooks = Some(Webhooks {
            webhook: Arc::new(webhook),
            backoff,
            queue: NoticeQueue::default(),
        });
        self
    }

    /// The background task that posts notifications, once, when a webhook is configured.
    pub fn webhook_worker(
        self: &Arc<Self>,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let webhooks = self.webhooks.as_ref()?;
        let orders = webhooks.queue.take()?;
        Some(crate::notify::run_worker(
            orders,
            webhooks.webhook.clone(),
            self.clone(),
            webhooks.backoff,
            self.metrics.clone(),
        ))
    }

    /// Records into `metrics` (shared with the HTTP `/metrics` endpoint).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// One store operation, in a child span of the call's, timed and counted; the one place a
    /// store's error becomes the application's.
    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, QuotaError> {
        let started = std::time::Instant::now();
        let span = if crate::telemetry::exporting_traces() {
            tracing::info_span!("store", op, otel.kind = "client")
        } else {
            tracing::debug_span!("store", op, otel.kind = "client")
        };
        let result = call.instrument(span).await;
        let error = match &result {
            Err(StoreError::Unavailable(_)) => Some("unavailable"),
            Err(StoreError::Internal(_)) => Some("internal"),
            Err(StoreError::Moved { .. }) => Some("moved"),
            Ok(_) | Err(StoreError::Rule(_)) => None,
        };
        self.metrics.store_call(op, started.elapsed(), error);
        result.map_err(QuotaError::from)
    }

    /// Lets a Reserve short of credits wait up to `wait` for an auto top-up purchase in flight.
    pub fn with_reserve_wait(mut self, wait: std::time::Duration) -> Self {
        self.reserve_wait = wait;
        self
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// The live rules, which a reload replaces.
    pub fn rules(&self) -> &Arc<LiveRules> {
        &self.rules
    }

    pub fn payments(&self) -> &PaymentQueue {
        &self.payments
    }

    /// Hands a purchase an operation started to the payment worker.
    fn order(&self, account_id: &str, purchase: Option<Purchase>) {
        if let Some(purchase) = purchase {
            let price = self.rules.policy().top_up.price.of(purchase.amount);
            self.payments.push(account_id, purchase, price);
        }
    }

    /// The time by quotad's clock.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// SetAutoTopUp.
    pub async fn set_top_up(&self, req: TopUpRequest) -> Result<TopUpOutcome, QuotaError> {
        let account_id = req.account_id.clone();
        let cmd = self.top_up_command(req)?;
        let outcome = self
            .timed("set_top_up", self.store.set_top_up(cmd, self.clock.now()))
            .await?;
        self.order(&account_id, outcome.top_up.clone());
        Ok(outcome)
    }

    /// PreviewAutoTopUp: what SetAutoTopUp with these settings would do now, checked as it
    /// checks them; nothing changes and nothing is bought.
    pub async fn preview_top_up(&self, req: TopUpRequest) -> Result<TopUpPreview, QuotaError> {
        let cmd = self.top_up_command(req)?;
        let preview = self.store.preview_top_up(cmd, self.clock.now());
        self.timed("preview_top_up", preview).await
    }

    /// Auto top-up settings checked into a command.
    fn top_up_command(&self, req: TopUpRequest) -> Result<SetTopUpCommand, QuotaError> {
        check_account(&self.rules.policy(), &req.account_id)?;
        let monthly_cap = (req.monthly_cap != 0).then_some(req.monthly_cap);
        let settings = TopUpSettings::new(req.enabled, req.threshold, req.target, monthly_cap)?;
        Ok(SetTopUpCommand {
            account_id: req.account_id,
            settings,
        })
    }

    /// Background upkeep at the current time: the store's own, then resuming auto top-up
    /// purchases that a replica which died left unpaid (paid again with the same key).
    pub async fn maintain(&self, resume_after: std::time::Duration) {
        let now = self.clock.now();
        self.store.maintain(now).await;
        let cutoff = now.plus_millis(-i64::try_from(resume_after.as_millis()).unwrap_or(i64::MAX));
        match self.store.stalled_purchases(cutoff).await {
            Ok(stalled) => {
                for (account_id, purchase) in stalled {
                    let price = self.rules.policy().top_up.price.of(purchase.amount);
                    self.payments.push(&account_id, purchase, price);
                }
            }
            Err(e) => tracing::debug!("cannot look for stalled purchases: {e}"),
        }
        if let Some(webhooks) = &self.webhooks {
            match self.store.pending_notices().await {
                Ok(pending) => {
                    let count = pending.iter().map(|(_, notices)| notices.len()).sum();
                    self.metrics.observe_webhooks_pending(count);
                    let dropped = self.store.notices_dropped();
                    self.metrics.observe_webhooks_dropped(dropped);
                    for (account_id, notices) in pending {
                        webhooks.queue.push(NoticeOrder {
                            account_id,
                            notices,
                        });
                    }
                }
                Err(e) => tracing::debug!("cannot look for notifications to deliver: {e}"),
            }
        }
    }

    /// A Reserve checked, priced and made a command, on one snapshot of the rules.
    fn reserve_command(&self, req: ReserveRequest) -> Result<ReserveCommand, QuotaError> {
        let rules = self.rules.snapshot();
        let policy = &rules.policy;
        let limits = &policy.limits;
        check_account(policy, &req.account_id)?;
        check_id(policy, "request_id", &req.request_id)?;
        if policy.product(&req.product).is_none() {
            return Err(invalid(
                "product",
                format!(
                    "unknown product {:?}; allowed: {}",
                    req.product,
                    policy.product_names()
                ),
            ));
        }
        let estimate = req
            .estimate
            .ok_or_else(|| invalid("estimate", "is required"))?;
        let cost = price(&rules, "estimate", &estimate, false)?;
        let plan_hint = match req.plan_hint.as_str() {
            "" => None,
            plan => {
                check_plan(policy, "plan_hint", plan)?;
                Some(req.plan_hint)
            }
        };
        let ttl_seconds = match req.ttl_seconds {
            0 => limits.default_ttl_seconds,
            ttl if ttl > limits.max_ttl_seconds => {
                return Err(invalid(
                    "ttl_seconds",
                    format!(
                        "must be at most {} (0 means the default, {})",
                        limits.max_ttl_seconds, limits.default_ttl_seconds
                    ),
                ));
            }
            ttl => ttl,
        };
        Ok(ReserveCommand {
            account_id: req.account_id,
            request_id: req.request_id,
            product: req.product,
            estimate,
            cost,
            plan_hint,
            ttl_ms: i64::from(ttl_seconds) * SECOND_MS,
            reservation_id: new_id("rsv"),
            wait_for_top_up: !self.reserve_wait.is_zero(),
        })
    }

    pub async fn reserve(&self, req: ReserveRequest) -> Result<ReserveOutcome, QuotaError> {
        let mut cmd = self.reserve_command(req)?;
        let deadline = std::time::Instant::now() + self.reserve_wait;
        loop {
            let outcome = self
                .timed("reserve", self.store.reserve(&cmd, self.clock.now()))
                .await?;
            self.order(&cmd.account_id, outcome.top_up.clone());
            if !outcome.awaiting_top_up {
                self.observe_reserve(&cmd, &outcome);
                return Ok(outcome);
            }
            // Short of credits while a purchase is on its way: wait a little for it; at the
            // deadline, ask once more for an answer that is recorded.
            if std::time::Instant::now() >= deadline {
                cmd.wait_for_top_up = false;
            } else {
                tokio::time::sleep(RESERVE_WAIT_POLL).await;
            }
        }
    }

    /// A Commit checked, priced and made a command, on one snapshot of the rules (its price
    /// version names the sheet that priced it).
    fn commit_command(&self, req: CommitRequest) -> Result<CommitCommand, QuotaError> {
        let rules = self.rules.snapshot();
        check_account(&rules.policy, &req.account_id)?;
        check_id(&rules.policy, "reservation_id", &req.reservation_id)?;
        let usage = req.usage.ok_or_else(|| invalid("usage", "is required"))?;
        let cost = price(&rules, "usage", &usage, true)?;
        Ok(CommitCommand {
            account_id: req.account_id,
            reservation_id: req.reservation_id,
            usage,
            cost,
            is_final: req.is_final,
            price_version: rules.pricing.version.clone(),
        })
    }

    pub async fn commit(&self, req: CommitRequest) -> Result<CommitOutcome, QuotaError> {
        let cmd = self.commit_command(req)?;
        let account_id = cmd.account_id.clone();
        let is_final = cmd.is_final;
        let outcome = self
            .timed("commit", self.store.commit(cmd, self.clock.now()))
            .await?;
        self.order(&account_id, outcome.top_up.clone());
        let charged = outcome.receipt.charged;
        self.metrics.credits_spent(charged.credit);
        if is_final && outcome.event.is_some() {
            self.metrics.hold_closed("commit");
        }
        if let Some(denial) = &outcome.shadow_denial {
            // A partial commit that charged nothing names no product.
            let product = outcome.event.as_ref().map_or_else(
                || crate::domain::intern("unknown"),
                |event| event.product.clone(),
            );
            self.shadow("commit", denial, &outcome.status.plan, &product);
        }
        let span = tracing::Span::current();
        span.record("plan", &*outcome.status.plan);
        span.record("funding", funding_name(charged));
        Ok(outcome)
    }

    pub async fn release(&self, req: ReleaseRequest) -> Result<ReleaseOutcome, QuotaError> {
        {
            let rules = self.rules.snapshot();
            check_account(&rules.policy, &req.account_id)?;
            check_id(&rules.policy, "reservation_id", &req.reservation_id)?;
        }
        let cmd = ReleaseCommand {
            account_id: req.account_id,
            reservation_id: req.reservation_id,
        };
        let outcome = self
            .timed("release", self.store.release(cmd, self.clock.now()))
            .await?;
        self.metrics.hold_closed("release");
        Ok(outcome)
    }

    pub async fn usage(
        &self,
        account_id: &str,
        recent_limit: u32,
    ) -> Result<UsageSnapshot, QuotaError> {
        let limit = {
            let rules = self.rules.snapshot();
            check_account(&rules.policy, account_id)?;
            match recent_limit {
                0 => DEFAULT_RECENT_LIMIT,
                n => n,
            }
            .min(rules.policy.limits.recent_events)
        };
        self.timed(
            "usage",
            self.store
                .usage(account_id, limit as usize, self.clock.now()),
        )
        .await
    }

    pub async fn upsert_account(&self, account: Option<Account>) -> Result<Account, QuotaError> {
        let account = account.ok_or_else(|| invalid("account", "is required"))?;
        let policy = self.rules.policy();
        check_id(&policy, "account.account_id", &account.id)?;
        check_plan(&policy, "account.plan", &account.plan)?;
        self.timed(
            "upsert_account",
            self.store.upsert_account(account, self.clock.now()),
        )
        .await
    }

    pub async fn account(&self, account_id: &str) -> Result<Account, QuotaError> {
        check_account(&self.rules.policy(), account_id)?;
        self.timed("account", self.store.account(account_id)).await
    }

    pub async fn grant(&self, req: GrantRequest) -> Result<GrantOutcome, QuotaError> {
        let policy = self.rules.policy();
        check_account(&policy, &req.account_id)?;
        check_id(&policy, "grant_id", &req.grant_id)?;
        let max = policy.limits.max_grant_micros;
        if req.amount <= 0 || req.amount > max {
            return Err(invalid(
                "amount_micros",
                format!("must be between 1 and {max}, got {}", req.amount),
            ));
        }
        let source = match req.source.as_str() {
            "" => LotSource::Purchase,
            s => s.parse().map_err(|()| {
                invalid(
                    "source",
                    format!("unknown source {s:?}; allowed: {}", LotSource::ALLOWED),
                )
            })?,
        };
        let cmd = GrantCommand {
            account_id: req.account_id,
            grant_id: req.grant_id,
            amount: req.amount,
            source,
            expires_at: req.expires_at,
        };
        let source_name = cmd.source.as_str();
        let outcome = self
            .timed("grant", self.store.grant(cmd, self.clock.now()))
            .await?;
        self.metrics
            .credits_granted(source_name, outcome.lot.granted);
        Ok(outcome)
    }

    pub async fn revoke_grant(
        &self,
        account_id: String,
        grant_id: String,
    ) -> Result<RevokeOutcome, QuotaError> {
        let policy = self.rules.policy();
        check_account(&policy, &account_id)?;
        check_id(&policy, "grant_id", &grant_id)?;
        let cmd = RevokeCommand {
            account_id: account_id.clone(),
            grant_id,
        };
        let outcome = self
            .timed(
                "revoke_grant",
                self.store.revoke_grant(cmd, self.clock.now()),
            )
            .await?;
        self.order(&account_id, outcome.top_up.clone());
        Ok(outcome)
    }

    pub async fn read_export(
        &self,
        group: String,
        consumer: String,
        max_events: u32,
        claim_idle_ms: u32,
    ) -> Result<Vec<ExportedEvent>, QuotaError> {
        let policy = self.rules.policy();
        check_id(&policy, "group", &group)?;
        check_id(&policy, "consumer", &consumer)?;
        let max_events = match max_events {
            0 => DEFAULT_EXPORT_READ,
            n @ 1..=MAX_EXPORT_READ => n,
            n => {
                return Err(invalid(
                    "max_events",
                    format!(
                        "must be between 1 and {MAX_EXPORT_READ} (0 means {DEFAULT_EXPORT_READ}), got {n}"
                    ),
                ));
            }
        };
        let claim_idle_ms = match claim_idle_ms {
            0 => DEFAULT_CLAIM_IDLE_MS,
            n => i64::from(n),
        };
        let read = ExportRead {
            group,
            consumer,
            max_events: max_events as usize,
            claim_idle_ms,
        };
        self.timed(
            "export_read",
            self.store.export_read(read, self.clock.now()),
        )
        .await
    }

    pub async fn ack_export(
        &self,
        group: &str,
        delivery_ids: &[String],
    ) -> Result<u64, QuotaError> {
        check_id(&self.rules.policy(), "group", group)?;
        if delivery_ids.len() > MAX_EXPORT_READ as usize {
            return Err(invalid(
                "delivery_ids",
                format!(
                    "must hold at most {MAX_EXPORT_READ} ids, got {}",
                    delivery_ids.len()
                ),
            ));
        }
        self.timed("export_ack", self.store.export_ack(group, delivery_ids))
            .await
    }

    /// Counts and logs a denial that shadow mode let through.
    fn shadow(&self, op: &'static str, denial: &Denial, plan: &Arc<str>, product: &Arc<str>) {
        let (reason, action) = (reason_name(denial.reason), action_name(denial.action));
        self.metrics
            .shadow_denial(op, reason, action, plan, product);
        tracing::info!(
            op,
            reason,
            action,
            plan = &**plan,
            product = &**product,
            message = %denial.message,
            "shadow mode: would have denied; allowed"
        );
    }

    /// Counts a Reserve's decision and adds its domain fields to the call's span.
    fn observe_reserve(&self, cmd: &ReserveCommand, outcome: &ReserveOutcome) {
        let (decision, action, reason, funding) = match &outcome.decision {
            Decision::Allow { held, .. } => ("ALLOW", "NONE", "NONE", funding_name(*held)),
            Decision::Deny(denial) => (
                "DENY",
                action_name(denial.action),
                reason_name(denial.reason),
                "none",
            ),
        };
        let plan = &*outcome.status.plan;
        // The product was checked against the configured ones: one of a few names.
        let product = crate::domain::intern(&cmd.product);
        self.metrics
            .decision(decision, action, reason, &outcome.status.plan, &product);
        if let Some(denial) = &outcome.shadow_denial {
            self.shadow("reserve", denial, &outcome.status.plan, &product);
        }
        let span = tracing::Span::current();
        span.record("product", cmd.product.as_str());
        span.record("plan", plan);
        span.record("decision", decision);
        span.record("action", action);
        span.record("funding", funding);
    }
}

/// Checks an account id and names the account (hashed) on the call's span.
fn check_account(policy: &Policy, account_id: &str) -> Result<(), QuotaError> {
    check_id(policy, "account_id", account_id)?;
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record(
            "account",
            crate::telemetry::account_hash(account_id).as_str(),
        );
    }
    Ok(())
}

fn check_id(policy: &Policy, field: &str, id: &str) -> Result<(), QuotaError> {
    let max = policy.limits.max_id_bytes as usize;
    if id.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if id.len() > max {
        return Err(invalid(
            field,
            format!("must be at most {max} bytes, got {}", id.len()),
        ));
    }
    if id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid(
            field,
            "must not contain whitespace or control characters",
        ));
    }
    Ok(())
}

fn check_plan(policy: &Policy, field: &str, plan: &str) -> Result<(), QuotaError> {
    if policy.plan(plan).is_none() {
        return Err(invalid(
            field,
            format!("unknown plan {plan:?}; allowed: {}", policy.plan_names()),
        ));
    }
    Ok(())
}

/// Prices usage on `rules`' sheet after checking its bounds; an estimate must not be empty.
fn price(
    rules: &Rules,
    field: &str,
    usage: &Usage,
    may_be_empty: bool,
) -> Result<Micros, QuotaError> {
    let limits = &rules.policy.limits;
    for (name, count) in [
        ("input_tokens", usage.input_tokens),
        ("cached_input_tokens", usage.cached_input_tokens),
        ("output_tokens", usage.output_tokens),
    ] {
        if count > limits.max_tokens {
            return Err(invalid(
                format!("{field}.{name}"),
                format!("must be at most {}, got {count}", limits.max_tokens),
            ));
        }
    }
    if usage.images > limits.max_images {
        return Err(invalid(
            format!("{field}.images"),
            format!(
                "must be at most {}, got {}",
                limits.max_images, usage.images
            ),
        ));
    }
    if !may_be_empty && usage.is_empty() {
        return Err(invalid(field, "must count at least one token or image"));
    }
    rules.pricing.price(usage).map_err(|e| match e {
        PricingError::UnknownModel { .. } => invalid(format!("{field}.model"), e.to_string()),
        PricingError::Overflow => invalid(field, e.to_string()),
    })
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> QuotaError {
    QuotaError::Refused(DomainError::invalid(field, reason))
}

/// A fresh opaque id such as `rsv_5f0c…`: 122 random bits, so replicas never collide, from
/// uuid's `fast-rng` (a thread-local CSPRNG seeded from the OS), not a `getrandom` system call
/// per id on the Reserve path.
fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

impl<S: Store> Settle for Quota<S> {
    async fn settle(
        &self,
        account_id: &str,
        purchase_id: &str,
        result: PaymentResult,
    ) -> Option<Purchase> {
        let cmd = SettleTopUpCommand {
            account_id: account_id.to_owned(),
            purchase_id: purchase_id.to_owned(),
            result,
        };
        let outcome = match &cmd.result {
            PaymentResult::Approved { .. } => "succeeded",
            PaymentResult::Declined { .. } => "declined",
            PaymentResult::Failed { .. } => "failed",
        };
        match self
            .timed(
                "settle_top_up",
                self.store.settle_top_up(cmd, self.clock.now()),
            )
            .await
        {
            Ok(settled) => {
                self.metrics.top_up(outcome);
                // An approved payment became a lot: granted credits, like an admin grant's.
                if let Some(attempt) = &settled.view.last_attempt
                    && attempt.outcome == crate::domain::top_up::AttemptOutcome::Succeeded
                    && outcome == "succeeded"
                {
                    self.metrics
                        .credits_granted(LotSource::AutoTopUp.as_str(), attempt.amount);
                }
                settled.top_up
            }
            Err(e) => {
                // The purchase stays in flight in the store; it is not lost, only not yet settled.
                tracing::warn!(
                    account = %crate::telemetry::account_hash(account_id),
                    "cannot settle a top-up payment: {e}"
                );
                None
            }
        }
    }

    fn done(&self, purchase_id: &str) {
        self.payments.done(purchase_id);
    }
}

impl<S: Store> Outbox for Quota<S> {
    async fn delivered(&self, account_id: &str, seq: u64) -> bool {
        let forget = self
            .store
            .notice_delivered(account_id, seq, self.clock.now());
        match self.timed("notice_delivered", forget).await {
            Ok(_) => true,
            Err(e) => {
                // Still pending in the store: posted again later, with the same id.
                tracing::warn!(
                    account = %crate::telemetry::account_hash(account_id),
                    "cannot record a delivered notification: {e}"
                );
                false
            }
        }
    }

    fn done(&self, account_id: &str, rest: Option<std::time::Duration>) {
        if let Some(webhooks) = &self.webhooks {
            webhooks.queue.done(account_id, rest);
        }
    }
}

/// One descriptor of an Envoy rate-limit request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RlsDescriptor {
    pub entries: Vec<(String, String)>,
    /// Hits for this descriptor instead of the request's.
    pub hits: Option<u64>,
}

/// How one descriptor stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlsStatus {
    pub over: bool,
    /// The limit that applied: its name, amount and unit; none when no rule matched.
    pub limit: Option<RlsLimitView>,
    pub remaining: u64,
    pub reset_in_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlsLimitView {
    pub name: String,
    pub requests_per_unit: u64,
    pub unit: crate::domain::rls::RlsUnit,
}

impl<S: Store> Quota<S> {
    /// Envoy's ShouldRateLimit: each descriptor checked against the first matching rule; the
    /// counted ones together in one atomic store step, accounts against their plan windows.
    pub async fn should_rate_limit(
        &self,
        rules: &Rules,
        domain: &str,
        descriptors: &[RlsDescriptor],
        hits_addend: u32,
    ) -> Result<Vec<RlsStatus>, QuotaError> {
        if domain.is_empty() {
            return Err(invalid("domain", "must not be empty"));
        }
        if descriptors.is_empty() {
            return Err(invalid("descriptors", "must hold at least one descriptor"));
        }
        let default_hits = u64::from(hits_addend.max(1));
        let mut checks = Vec::new();
        let mut statuses = Vec::with_capacity(descriptors.len());
        // Where each counted descriptor's answer goes.
        let mut counted = Vec::new();
        // Account descriptors, read after the counters are counted: a store that decides on
        // counters elsewhere refuses before anything was read (the call goes there), and the
        // account check counts nothing, so its place changes no answer.
        let mut accounts = Vec::new();
        for (i, descriptor) in descriptors.iter().enumerate() {
            if descriptor.entries.is_empty() {
                return Err(invalid(
                    format!("descriptors[{i}].entries"),
                    "must hold at least one entry",
                ));
            }
            let hits = descriptor.hits.unwrap_or(default_hits);
            let status = match rls::target(&rules.rls, domain, &descriptor.entries) {
                Target::Unlimited => RlsStatus {
                    over: false,
                    limit: None,
                    remaining: 0,
                    reset_in_ms: 0,
                },
                Target::Account { rule, account_id } => {
                    check_id(&rules.policy, "descriptors.entries.account_id", &account_id)?;
                    accounts.push((i, rule, account_id));
                    RlsStatus {
                        over: false,
                        limit: None,
                        remaining: 0,
                        reset_in_ms: 0,
                    }
                }
                Target::Counter {
                    rule,
                    key,
                    limit,
                    unit,
                } => {
                    checks.push(CounterCheck {
                        key,
                        unit,
                        limit,
                        hits,
                    });
                    counted.push(i);
                    RlsStatus {
                        over: false,
                        limit: Some(RlsLimitView {
                            name: rule.label(),
                            requests_per_unit: limit,
                            unit,
                        }),
                        remaining: 0,
                        reset_in_ms: 0,
                    }
                }
            };
            statuses.push(status);
        }
        if !checks.is_empty() {
            let answers = self
                .timed(
                    "rls",
                    self.store.rls_check(domain, &checks, self.clock.now()),
                )
                .await?;
            for (i, answer) in counted.into_iter().zip(answers) {
                let status = &mut statuses[i];
                status.over = answer.over;
                status.remaining = answer.remaining;
                status.reset_in_ms = answer.reset_in_ms;
            }
        }
        for (i, rule, account_id) in accounts {
            statuses[i] = self
                .account_rate_limit(&rules.policy, rule, &account_id)
                .await?;
        }
        Ok(statuses)
    }

    /// An account's plan windows as a rate limit: over when no window has room left and
    /// credits cannot pay (not a credits plan, barred, or none available). An account quotad
    /// has never seen has all its room.
    async fn account_rate_limit(
        &self,
        policy: &Policy,
        rule: &RlsRule,
        account_id: &str,
    ) -> Result<RlsStatus, QuotaError> {
        let now = self.clock.now();
        let snapshot = match self
            .timed("usage", self.store.account_status(account_id, now))
            .await
        {
            Ok(snapshot) => Some(snapshot),
            Err(QuotaError::Refused(e)) if e.is_account_not_found() => None,
            Err(e) => return Err(e),
        };
        let plan_name = snapshot
            .as_ref()
            .map_or(policy.default_plan.as_str(), |s| &s.account.plan);
        let plan = policy.plan(plan_name);
        let windows = snapshot
            .as_ref()
            .map(|s| s.status.windows.clone())
            .unwrap_or_default();
        // The window with the least room binds.
        let binding = windows.iter().min_by_key(|w| w.limit - w.used).cloned();
        let (limit, room, reset_in_ms) = match &binding {
            Some(w) => (
                w.limit,
                (w.limit - w.used).max(0),
                w.resets_at
                    .map_or(0, |at| (at.as_millis() - now.as_millis()).max(0)),
            ),
            None => {
                let limit = plan.map_or(0, |p| p.limit_5h_micros);
                (limit, limit, 0)
            }
        };
        let credits_available = snapshot.as_ref().is_some_and(|s| {
            policy.may_buy_credits(&s.account) && s.totals.balance - s.credit_held > 0
        });
        Ok(RlsStatus {
            over: room <= 0 && !credits_available,
            limit: Some(RlsLimitView {
                name: format!("{}:{plan_name}", rule.label()),
                requests_per_unit: u64::try_from(limit / crate::domain::MICROS_PER_CREDIT)
                    .unwrap_or(0),
                unit: if binding.as_ref().is_some_and(|w| w.name == "weekly") {
                    crate::domain::rls::RlsUnit::Week
                } else {
                    crate::domain::rls::RlsUnit::Hour
                },
            }),
            remaining: u64::try_from(room / crate::domain::MICROS_PER_CREDIT).unwrap_or(0),
            reset_in_ms,
        })
    }
}
