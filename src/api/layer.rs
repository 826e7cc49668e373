//! The tower layer every gRPC call passes first: its span, its admission and its deadline.
//!
//! - **Span.** One `grpc` span per call, a child of the caller's trace when the request carries
//!   W3C trace context (`traceparent` metadata); the handlers add the decision's domain fields
//!   (product, plan, decision, action, funding, and the account id hashed).
//! - **Admission.** At most `max_concurrent` calls run at once across all connections; one more
//!   is answered `RESOURCE_EXHAUSTED` at once rather than queued, so an overloaded quotad stays
//!   fast to say no and clients back off.
//! - **Deadline.** A call still running after `timeout` is answered `UNAVAILABLE` (retryable,
//!   like a store that did not answer in time).
//! - **Metrics.** Latency and status code by method.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use opentelemetry::propagation::Extractor;
use prost::Message;
use tokio::sync::Semaphore;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct GuardLayer {
    permits: Arc<Semaphore>,
    max_concurrent: usize,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl GuardLayer {
    pub fn new(max_concurrent: usize, timeout: Duration, metrics: Arc<Metrics>) -> GuardLayer {
        GuardLayer {
            permits: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            timeout,
            metrics,
        }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    layer: GuardLayer,
}

/// Reads W3C trace context from request headers (gRPC metadata).
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

impl<S, B> Service<http::Request<B>> for Guard<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The ready service goes with this call; its clone waits for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        let path = request.uri().path();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", path));
        // Spans cost a formatted record each; they are made at INFO (recorded) only while traces
        // are exported, at DEBUG (usually off) otherwise.
        macro_rules! call_span {
            ($make:ident) => {
                tracing::$make!(
                    "grpc",
                    otel.name = %path.trim_start_matches('/'),
                    otel.kind = "server",
                    rpc.system = "grpc",
                    rpc.service = %service,
                    rpc.method = %method,
                    rpc.grpc.status_code = tracing::field::Empty,
                    account = tracing::field::Empty,
                    product = tracing::field::Empty,
                    plan = tracing::field::Empty,
                    decision = tracing::field::Empty,
                    action = tracing::field::Empty,
                    funding = tracing::field::Empty,
                )
            };
        }
        let span = if crate::telemetry::exporting_traces() {
            let span = call_span!(info_span);
            let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
                propagator.extract(&Headers(request.headers()))
            });
            let _ = span.set_parent(parent);
            span
        } else {
            call_span!(debug_span)
        };
        let method = method_label(method);
        let started = Instant::now();
        Box::pin(
            async move {
                let Ok(permit) = layer.permits.clone().try_acquire_owned() else {
                    layer.metrics.shed();
                    let status = Status::resource_exhausted(format!(
                        "quotad is serving its limit of {} calls at once; retry with backoff",
                        layer.max_concurrent
                    ));
                    return Ok(finish(&layer, method, started, status.into_http()));
                };
                let response = match tokio::time::timeout(layer.timeout, inner.call(request)).await
                {
                    Ok(response) => response?,
                    Err(_) => Status::unavailable(format!(
                        "quotad did not answer within {:?}",
                        layer.timeout
                    ))
                    .into_http(),
                };
                drop(permit);
                Ok(finish(&layer, method, started, response))
            }
            .instrument(span),
        )
    }
}

/// The method as a metric label: one of the methods quotad serves (read from the descriptors it
/// serves them by), or `unknown`. A client's made-up paths then neither grow the label sets
/// without bound nor cost an allocation per call.
fn method_label(method: &str) -> &'static str {
    static SERVED: LazyLock<HashSet<String>> = LazyLock::new(|| {
        [
            super::pb::FILE_DESCRIPTOR_SET,
            super::envoy::service::ratelimit::v3::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        ]
        .into_iter()
        .filter_map(|bytes| prost_types::FileDescriptorSet::decode(bytes).ok())
        .flat_map(|set| set.file)
        .flat_map(|file| file.service)
        .flat_map(|service| service.method)
        .filter_map(|method| method.name)
        .collect()
    });
    SERVED.get(method).map_or("unknown", String::as_str)
}

/// Records the answer's status; a unary success carries it in trailers, so no header means OK.
fn finish(
    layer: &GuardLayer,
    method: &'static str,
    started: Instant,
    response: http::Response<Body>,
) -> http::Response<Body> {
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32);
    tracing::Span::current().record("rpc.grpc.status_code", code as i32);
    layer.metrics.rpc(method, code, started.elapsed());
    response
}

#[cfg(test)]
mod tests {
    use super::method_label;

    #[test]
    fn served_methods_are_their_own_labels_and_anything_else_is_unknown() {
        for method in [
            "Reserve",
            "Commit",
            "ShouldRateLimit",
            "Check",
            "ServerReflectionInfo",
        ] {
            assert_eq!(method_label(method), method);
        }
        for made_up in ["", "reserve", "Reserve2", "../Reserve"] {
            assert_eq!(method_label(made_up), "unknown");
        }
    }
}
