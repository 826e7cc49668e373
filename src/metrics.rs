//! Operational metrics, recorded once and offered two ways: Prometheus text on the HTTP admin
//! port (`/metrics`) and OpenTelemetry instruments exported over OTLP when telemetry is on.
//!
//! Labels are low-cardinality on purpose: decisions by decision, action, deny reason, plan and
//! product
//! (plans and products come from config), latencies by method or store operation, errors by
//! kind. Account ids never appear in a label.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::KeyValue;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
    action: &'static str,
    /// Why a Reserve was denied (`NONE` when allowed).
    reason: &'static str,
    /// Shared, not copied per call: plan and product names are interned.
    plan: Arc<str>,
    product: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShadowLabels {
    /// Where the work was let through: `reserve`, or `commit` (the next chunk of a task).
    op: &'static str,
    reason: &'static str,
    action: &'static str,
    plan: Arc<str>,
    product: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpErrorLabels {
    op: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    /// The event type (`credits.low`, …): a handful of names.
    r#type: &'static str,
    /// `delivered` (the receiver answered 2xx) or `failed` (an attempt to be retried).
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs to about 1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// The OpenTelemetry side: the same events through the global meter (a no-op unless
/// telemetry export is on).
struct Otel {
    decisions: opentelemetry::metrics::Counter<u64>,
    rpc_duration: opentelemetry::metrics::Histogram<f64>,
    store_duration: opentelemetry::metrics::Histogram<f64>,
    store_errors: opentelemetry::metrics::Counter<u64>,
    credits_spent: opentelemetry::metrics::Counter<u64>,
    top_ups: opentelemetry::metrics::Counter<u64>,
    webhooks: opentelemetry::metrics::Counter<u64>,
}

pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    rpc_duration: HistogramFamily<MethodLabels>,
    rpc_responses: Family<CallLabels, Counter>,
    store_duration: HistogramFamily<OpLabels>,
    store_errors: Family<OpErrorLabels, Counter>,
    store_up: Gauge,
    holds_opened: Counter,
    holds_closed: Family<OutcomeLabels, Counter>,
    open_holds: Gauge,
    credits_spent: Counter,
    credits_granted: Family<SourceLabels, Counter>,
    top_ups: Family<OutcomeLabels, Counter>,
    webhooks: Family<WebhookLabels, Counter>,
    webhooks_pending: Gauge,
    webhooks_dropped: Counter,
    /// The store's own count of dropped notifications at the last sample.
    webhooks_dropped_seen: AtomicU64,
    shed: Counter,
    config_reloads: Family<OutcomeLabels, Counter>,
    config_restart_pending: Gauge,
    shadow_denials: Family<ShadowLabels, Counter>,
    store_retries: Counter,
    forwarded: Family<OutcomeLabels, Counter>,
    resident_accounts: Gauge,
    data_dir_bytes: Gauge,
    data_dir_batches: Counter,
    data_dir_changes: Counter,
    /// The store's cumulative (batches, changes) when last sampled.
    data_dir_seen: std::sync::Mutex<(u64, u64)>,
    redis_outage: Gauge,
    outage_journal_pending: Gauge,
    outage_decisions: Counter,
    outage_changes: Family<OutcomeLabels, Counter>,
    /// The store's cumulative outage counts when last sampled.
    outage_seen: std::sync::Mutex<crate::store::OutageStats>,
    /// The store's own count of retried calls at the last sample, to add only what is new.
    store_retries_seen: AtomicU64,
    otel: Otel,
    /// Serialises scrapes (encoding needs the registry whole).
    scrape: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("quotad");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Reserve decisions by decision, action, deny reason, plan and product",
            decisions.clone(),
        );
        let rpc_duration: HistogramFamily<MethodLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "rpc_duration_seconds",
            "Time to answer a gRPC call, by method",
            rpc_duration.clone(),
        );
        let rpc_responses = Family::<CallLabels, Counter>::default();
        registry.register(
            "rpc_responses",
            "gRPC answers by method and status code",
            rpc_responses.clone(),
        );
        let store_duration: HistogramFamily<OpLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "store_duration_seconds",
            "Round trip of one store operation, by operation",
            store_duration.clone(),
        );
        let store_errors = Family::<OpErrorLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Store operations that failed, by operation and kind (unavailable, internal)",
            store_errors.clone(),
        );
        let store_up = Gauge::default();
        registry.register(
            "store_up",
            "1 while the backing store answers, 0 during an outage",
            store_up.clone(),
        );
        let holds_opened = Counter::default();
        registry.register(
            "holds_opened",
            "Reservations this replica allowed",
            holds_opened.clone(),
        );
        let holds_closed = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "holds_closed",
            "Reservations this replica closed, by how (commit, release)",
            holds_closed.clone(),
        );
        let open_holds = Gauge::default();
        registry.register(
            "open_holds",
            "Open reservations in the store (memory store; with Redis, this replica's opened minus closed)",
            open_holds.clone(),
        );
        let credits_spent = Counter::default();
        registry.register(
            "credits_spent_micros",
            "Micro-credits charged by commits",
            credits_spent.clone(),
        );
        let credits_granted = Family::<SourceLabels, Counter>::default();
        registry.register(
            "credits_granted_micros",
            "Micro-credits granted, by source",
            credits_granted.clone(),
        );
        let top_ups = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "top_ups",
            "Auto top-up purchases settled, by outcome",
            top_ups.clone(),
        );
        let webhooks = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "webhooks",
            "Notification webhook attempts, by event type and outcome: delivered (2xx), or failed (retried with back-off)",
            webhooks.clone(),
        );
        let webhooks_pending = Gauge::default();
        registry.register(
            "webhooks_pending",
            "Notifications recorded and not yet delivered, on the accounts this replica decides (as the last maintenance pass found them)",
            webhooks_pending.clone(),
        );
        let webhooks_dropped = Counter::default();
        registry.register(
            "webhooks_dropped",
            "Notifications dropped undelivered: recorded while their account already held 32 undelivered, which drops the oldest (the receiver has not taken them for that long)",
            webhooks_dropped.clone(),
        );
        let shed = Counter::default();
        registry.register(
            "shed",
            "Calls refused at once because max_concurrent_requests were in flight",
            shed.clone(),
        );
        let config_reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads by outcome (applied, refused)",
            config_reloads.clone(),
        );
        let config_restart_pending = Gauge::default();
        registry.register(
            "config_restart_pending",
            "1 while the config file changes settings that take effect only after a restart",
            config_restart_pending.clone(),
        );
        let shadow_denials = Family::<ShadowLabels, Counter>::default();
        registry.register(
            "shadow_denials",
            "Denials shadow mode answered ALLOW instead, by operation, reason, action, plan and product",
            shadow_denials.clone(),
        );
        let forwarded = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "forwarded_calls",
            "Calls sent on to the replica owning the account (on Redis), by outcome: answered, or unreachable",
            forwarded.clone(),
        );
        let store_retries = Counter::default();
        registry.register(
            "store_retries",
            "Store calls whose first attempt timed out and that were tried again (once, where that cannot act twice)",
            store_retries.clone(),
        );
        let resident_accounts = Gauge::default();
        registry.register(
            "resident_accounts",
            "Accounts in memory (with a data dir or on Redis, idle ones leave memory and are read back on use)",
            resident_accounts.clone(),
        );
        let data_dir_bytes = Gauge::default();
        registry.register(
            "data_dir_bytes",
            "Bytes the embedded store's data dir takes on disk",
            data_dir_bytes.clone(),
        );
        let data_dir_batches = Counter::default();
        registry.register(
            "data_dir_batches",
            "Group commits written to the data dir (one synced write each)",
            data_dir_batches.clone(),
        );
        let data_dir_changes = Counter::default();
        registry.register(
            "data_dir_changes",
            "Decisions written to the data dir; over data_dir_batches, the mean batch size",
            data_dir_changes.clone(),
        );
        let redis_outage = Gauge::default();
        registry.register(
            "redis_outage",
            "1 while Redis does not answer this owner (on Redis): it decides from memory, journaled, for up to the outage grace",
            redis_outage.clone(),
        );
        let outage_journal_pending = Gauge::default();
        registry.register(
            "outage_journal_pending",
            "Journaled batch sections not yet written to Redis",
            outage_journal_pending.clone(),
        );
        let outage_decisions = Counter::default();
        registry.register(
            "outage_decisions",
            "Decisions made while Redis did not answer (on Redis, within the outage grace)",
            outage_decisions.clone(),
        );
        let outage_changes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "outage_changes",
            "Changes decided while Redis did not answer, by outcome: journaled, replayed (written to Redis from the journal), fenced (could not be written: the partition was taken first)",
            outage_changes.clone(),
        );
        let meter = opentelemetry::global::meter("quotad");
        let otel = Otel {
            decisions: meter.u64_counter("quotad.decisions").build(),
            rpc_duration: meter
                .f64_histogram("quotad.rpc.duration")
                .with_unit("s")
                .build(),
            store_duration: meter
                .f64_histogram("quotad.store.duration")
                .with_unit("s")
                .build(),
            store_errors: meter.u64_counter("quotad.store.errors").build(),
            credits_spent: meter
                .u64_counter("quotad.credits.spent")
                .with_unit("{micro-credit}")
                .build(),
            top_ups: meter.u64_counter("quotad.top_ups").build(),
            webhooks: meter.u64_counter("quotad.webhooks").build(),
        };
        Metrics {
            registry,
            decisions,
            rpc_duration,
            rpc_responses,
            store_duration,
            store_errors,
            store_up,
            holds_opened,
            holds_closed,
            open_holds,
            credits_spent,
            credits_granted,
            top_ups,
            webhooks,
            webhooks_pending,
            webhooks_dropped,
            webhooks_dropped_seen: AtomicU64::new(0),
            shed,
            config_reloads,
            config_restart_pending,
            shadow_denials,
            store_retries,
            forwarded,
            store_retries_seen: AtomicU64::new(0),
            resident_accounts,
            data_dir_bytes,
            data_dir_batches,
            data_dir_changes,
            data_dir_seen: std::sync::Mutex::new((0, 0)),
            redis_outage,
            outage_journal_pending,
            outage_decisions,
            outage_changes,
            outage_seen: std::sync::Mutex::new(crate::store::OutageStats::default()),
            otel,
            scrape: Mutex::new(()),
        }
    }

    pub fn decision(
        &self,
        decision: &'static str,
        action: &'static str,
        reason: &'static str,
        plan: &Arc<str>,
        product: &Arc<str>,
    ) {
        self.decisions
            .get_or_create(&DecisionLabels {
                decision,
                action,
                reason,
                plan: plan.clone(),
                product: product.clone(),
            })
            .inc();
        self.otel.decisions.add(
            1,
            &[
                KeyValue::new("decision", decision),
                KeyValue::new("action", action),
                KeyValue::new("reason", reason),
                KeyValue::new("plan", plan.clone()),
                KeyValue::new("product", product.clone()),
            ],
        );
        if decision == "ALLOW" {
            self.holds_opened.inc();
        }
    }

    pub fn hold_closed(&self, how: &'static str) {
        self.holds_closed
            .get_or_create(&OutcomeLabels { outcome: how })
            .inc();
    }

    pub fn rpc(&self, method: &'static str, code: tonic::Code, took: Duration) {
        self.rpc_duration
            .get_or_create(&MethodLabels { method })
            .observe(took.as_secs_f64());
        self.rpc_responses
            .get_or_create(&CallLabels {
                method,
                code: code_name(code),
            })
            .inc();
        self.otel.rpc_duration.record(
            took.as_secs_f64(),
            &[
                KeyValue::new("rpc.method", method),
                KeyValue::new("rpc.grpc.status_code", code as i64),
            ],
        );
    }

    pub fn store_call(&self, op: &'static str, took: Duration, error: Option<&'static str>) {
        self.store_duration
            .get_or_create(&OpLabels { op })
            .observe(took.as_secs_f64());
        self.otel
            .store_duration
            .record(took.as_secs_f64(), &[KeyValue::new("op", op)]);
        if let Some(kind) = error {
            self.store_errors
                .get_or_create(&OpErrorLabels { op, kind })
                .inc();
            self.otel
                .store_errors
                .add(1, &[KeyValue::new("op", op), KeyValue::new("kind", kind)]);
        }
    }

    pub fn credits_spent(&self, micros: i64) {
        if let Ok(micros) = u64::try_from(micros)
            && micros > 0
        {
            self.credits_spent.inc_by(micros);
            self.otel.credits_spent.add(micros, &[]);
        }
    }

    pub fn credits_granted(&self, source: &'static str, micros: i64) {
        if let Ok(micros) = u64::try_from(micros) {
            self.credits_granted
                .get_or_create(&SourceLabels { source })
                .inc_by(micros);
        }
    }

    pub fn top_up(&self, outcome: &'static str) {
        self.top_ups.get_or_create(&OutcomeLabels { outcome }).inc();
        self.otel
            .top_ups
            .add(1, &[KeyValue::new("outcome", outcome)]);
    }

    /// A notification webhook attempt of event type `kind`: `delivered` or `failed`.
    pub fn webhook(&self, kind: &'static str, outcome: &'static str) {
        let labels = WebhookLabels {
            r#type: kind,
            outcome,
        };
        self.webhooks.get_or_create(&labels).inc();
        self.otel.webhooks.add(
            1,
            &[
                KeyValue::new("type", kind),
                KeyValue::new("outcome", outcome),
            ],
        );
    }

    /// Samples the notifications pending on the accounts this replica decides.
    pub fn observe_webhooks_pending(&self, pending: usize) {
        (self.webhooks_pending).set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    /// Samples the store's count of notifications dropped undelivered since start.
    pub fn observe_webhooks_dropped(&self, dropped: u64) {
        let before = self.webhooks_dropped_seen.swap(dropped, Ordering::Relaxed);
        self.webhooks_dropped.inc_by(dropped.saturating_sub(before));
    }

    /// A call sent on to the account's owner: `answered` or `unreachable`.
    pub fn forwarded(&self, outcome: &'static str) {
        self.forwarded
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn shed(&self) {
        self.shed.inc();
    }

    /// A denial that shadow mode turned into an ALLOW (or a funded next chunk).
    pub fn shadow_denial(
        &self,
        op: &'static str,
        reason: &'static str,
        action: &'static str,
        plan: &Arc<str>,
        product: &Arc<str>,
    ) {
        self.shadow_denials
            .get_or_create(&ShadowLabels {
                op,
                reason,
                action,
                plan: plan.clone(),
                product: product.clone(),
            })
            .inc();
    }

    pub fn config_reload(&self, outcome: &'static str) {
        self.config_reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn config_restart_pending(&self, pending: bool) {
        self.config_restart_pending.set(i64::from(pending));
    }

    /// Samples what the store knows of itself (called every few hundred ms).
    /// Samples what the store knows of itself; `retried` is its count since start of calls
    /// whose first attempt timed out and that were tried again.
    pub fn observe_store(&self, up: bool, open_holds: Option<u64>, retried: u64) {
        self.store_up.set(i64::from(up));
        let before = self.store_retries_seen.swap(retried, Ordering::Relaxed);
        self.store_retries.inc_by(retried.saturating_sub(before));
        let open = match open_holds {
            Some(n) => n,
            None => {
                let closed: u64 = ["commit", "release"]
                    .into_iter()
                    .map(|outcome| {
                        self.holds_closed
                            .get_or_create(&OutcomeLabels { outcome })
                            .get()
                    })
                    .sum();
                self.holds_opened.get().saturating_sub(closed)
            }
        };
        self.open_holds.set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    /// Samples the accounts in memory (a store that lets idle ones go).
    pub fn observe_resident(&self, accounts: u64) {
        (self.resident_accounts).set(i64::try_from(accounts).unwrap_or(i64::MAX));
    }

    /// Samples the embedded store's data dir.
    pub fn observe_data_dir(&self, stats: &crate::store::DataDirStats) {
        self.data_dir_bytes
            .set(i64::try_from(stats.bytes).unwrap_or(i64::MAX));
        let mut seen = self.data_dir_seen.lock().unwrap_or_else(|e| e.into_inner());
        self.data_dir_batches
            .inc_by(stats.batches.saturating_sub(seen.0));
        self.data_dir_changes
            .inc_by(stats.changes.saturating_sub(seen.1));
        *seen = (stats.batches.max(seen.0), stats.changes.max(seen.1));
    }

    /// Samples what deciding without Redis has done (on Redis).
    pub fn observe_outage(&self, stats: &crate::store::OutageStats) {
        self.redis_outage
            .set(i64::from(stats.deciding_without_redis));
        (self.outage_journal_pending).set(i64::try_from(stats.journal_pending).unwrap_or(i64::MAX));
        let mut seen = self.outage_seen.lock().unwrap_or_else(|e| e.into_inner());
        self.outage_decisions
            .inc_by(stats.decisions.saturating_sub(seen.decisions));
        for (outcome, now, before) in [
            ("journaled", stats.journaled, seen.journaled),
            ("replayed", stats.replayed, seen.replayed),
            ("fenced", stats.fenced, seen.fenced),
        ] {
            self.outage_changes
                .get_or_create(&OutcomeLabels { outcome })
                .inc_by(now.saturating_sub(before));
        }
        *seen = *stats;
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            text = format!("# cannot encode metrics: {e}\n");
        }
        text
    }
}

/// The canonical name of a gRPC status code, as in the gRPC specification.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.decision(
            "DENY",
            "UPGRADE_PLAN",
            "WINDOW_EXHAUSTED",
            &"free".into(),
            &"codex".into(),
        );
        m.rpc("Reserve", tonic::Code::Ok, Duration::from_micros(300));
        m.observe_store(true, Some(2), 3);
        m.webhook("credits.low", "failed");
        m.webhook("credits.low", "delivered");
        m.observe_webhooks_pending(4);
        m.observe_webhooks_dropped(2);
        m.observe_webhooks_dropped(5);
        let text = m.render();
        for line in [
            r#"quotad_decisions_total{decision="DENY",action="UPGRADE_PLAN",reason="WINDOW_EXHAUSTED",plan="free",product="codex"} 1"#,
            r#"quotad_rpc_responses_total{method="Reserve",code="OK"} 1"#,
            "quotad_open_holds 2",
            "quotad_store_up 1",
            "quotad_store_retries_total 3",
            r#"quotad_webhooks_total{type="credits.low",outcome="delivered"} 1"#,
            r#"quotad_webhooks_total{type="credits.low",outcome="failed"} 1"#,
            "quotad_webhooks_pending 4",
            "quotad_webhooks_dropped_total 5",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
