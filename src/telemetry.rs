//! Logs, traces and OpenTelemetry export.
//!
//! One `tracing` subscriber writes log lines (pretty on a terminal, JSON otherwise) and, when an
//! OTLP endpoint is configured, turns spans into OpenTelemetry traces exported over OTLP/gRPC;
//! metrics go the same way through the global meter provider ([`crate::metrics`] records into
//! it). W3C trace context (`traceparent`) in incoming metadata makes a call's span a child of
//! the caller's. [`Telemetry::shutdown`] flushes what is still buffered, so the last spans of a
//! draining pod are not lost.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{Config, LogFormat};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(String),
}

/// Whether spans are exported (set once at start): calls then get INFO spans with their
/// domain fields; otherwise DEBUG spans, which cost nothing unless debug logging is on.
static EXPORTING_TRACES: AtomicBool = AtomicBool::new(false);

pub fn exporting_traces() -> bool {
    EXPORTING_TRACES.load(Ordering::Relaxed)
}

/// An account id as it may appear in logs, spans and traces: the first 8 bytes of its SHA-256,
/// in hex. Stable (the same account always gives the same value, so its calls can be followed)
/// but not the id itself.
pub fn account_hash(account_id: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, account_id.as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What must be flushed at exit.
#[derive(Debug, Default)]
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
    metrics: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Installs the global subscriber, propagator and meter provider; call once, early, inside
    /// the Tokio runtime.
    pub fn init(config: &Config) -> Result<Telemetry, TelemetryError> {
        // The embedded database logs its housekeeping (flushes, compactions) at info: only its
        // warnings and errors belong in quotad's log unless RUST_LOG asks for more.
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            EnvFilter::new(format!("{},fjall=warn,lsm_tree=warn", config.log_level))
        });
        let json = match config.log_format {
            LogFormat::Json => true,
            LogFormat::Pretty => false,
            LogFormat::Auto => !std::io::stdout().is_terminal(),
        };
        let (pretty, json) = if json {
            let layer = tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .with_target(false);
            (None, Some(layer))
        } else {
            let layer = tracing_subscriber::fmt::layer().with_target(false);
            (Some(layer), None)
        };
        let mut telemetry = Telemetry::default();
        let otel = match &config.telemetry.otlp_endpoint {
            Some(endpoint) => {
                opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
                let resource = Resource::builder()
                    .with_service_name(config.telemetry.service_name.clone())
                    .build();
                let spans = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .with_timeout(Duration::from_secs(5))
                    .build()
                    .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
                let traces = SdkTracerProvider::builder()
                    .with_batch_exporter(spans)
                    .with_resource(resource.clone())
                    .build();
                let tracer = traces.tracer("quotad");
                telemetry.traces = Some(traces);
                EXPORTING_TRACES.store(true, Ordering::Relaxed);

                let exporter = opentelemetry_otlp::MetricExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .with_timeout(Duration::from_secs(5))
                    .build()
                    .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
                let reader = PeriodicReader::builder(exporter)
                    .with_interval(Duration::from_millis(
                        config.telemetry.metrics_interval_ms.max(100),
                    ))
                    .build();
                let metrics = SdkMeterProvider::builder()
                    .with_reader(reader)
                    .with_resource(resource)
                    .build();
                opentelemetry::global::set_meter_provider(metrics.clone());
                telemetry.metrics = Some(metrics);
                Some(tracing_opentelemetry::layer().with_tracer(tracer))
            }
            None => None,
        };
        tracing_subscriber::registry()
            .with(filter)
            .with(pretty)
            .with(json)
            .with(otel)
            .try_init()
            .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
        Ok(telemetry)
    }

    /// Whether spans and metrics are exported.
    pub fn exporting(&self) -> bool {
        self.traces.is_some()
    }

    /// Exports what is buffered and stops the exporters.
    pub fn shutdown(self) {
        if let Some(traces) = self.traces {
            if let Err(e) = traces.force_flush() {
                eprintln!("quotad: flushing traces failed: {e}");
            }
            let _ = traces.shutdown();
        }
        if let Some(metrics) = self.metrics {
            if let Err(e) = metrics.force_flush() {
                eprintln!("quotad: flushing metrics failed: {e}");
            }
            let _ = metrics.shutdown();
        }
    }
}
