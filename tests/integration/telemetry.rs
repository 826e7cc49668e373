//! OpenTelemetry export against a real OTLP receiver: this test serves the OTLP trace and
//! metrics collector services over gRPC, starts a real quotad pointed at it by the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` variable, and calls it with a W3C `traceparent`. The spans
//! arrive as children of the caller's span with the decision's attributes (the account hashed,
//! never raw), the store call as their child, metrics arrive, and what is still buffered at
//! SIGTERM is flushed before exit.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use quotad::api::pb;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use support::costing;
use support::process::Quotad;
use tonic::{Request, Response, Status};

/// Everything the receiver was sent.
#[derive(Default, Clone)]
struct Received {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    metrics: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| a.value.as_ref()?.value.clone())
                .map(|v| match v {
                    Value::StringValue(s) => s,
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    self.spans.lock().unwrap().push((service.clone(), span));
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        for resource in request.into_inner().resource_metrics {
            for scope in resource.scope_metrics {
                for metric in scope.metrics {
                    self.metrics.lock().unwrap().push(metric.name);
                }
            }
        }
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

async fn receiver() -> (String, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Received::default();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(received.clone()))
        .add_service(MetricsServiceServer::new(received.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    (format!("http://{addr}"), received)
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|a| a.key == key)?
        .value
        .clone()?;
    Some(match value.value? {
        Value::StringValue(s) => s,
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Waits until `found` says the receiver has what the test needs.
async fn until<T>(what: &str, mut found: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(t) = found() {
            return t;
        }
        assert!(Instant::now() < deadline, "never received {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_with_traceparent_is_traced_and_metrics_arrive() {
    let (endpoint, received) = receiver().await;
    let env_endpoint = endpoint.clone();
    let mut quotad = tokio::task::spawn_blocking(move || {
        Quotad::start(
            &[],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", env_endpoint.as_str()),
                ("OTEL_SERVICE_NAME", "quotad-under-test"),
                ("QUOTAD_TELEMETRY__METRICS_INTERVAL_MS", "200"),
            ],
        )
    })
    .await
    .unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut q = QuotaServiceClient::connect(quotad.url()).await.unwrap();
    let mut request = Request::new(pb::ReserveRequest {
        account_id: "carol-raw-id".into(),
        request_id: "r1".into(),
        product: "codex".into(),
        estimate: Some(costing(5)),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    let answer = q.reserve(request).await.unwrap().into_inner();
    assert_eq!(answer.decision(), pb::Decision::Allow);

    let (service, rpc) = until("the Reserve span", || {
        received
            .spans
            .lock()
            .unwrap()
            .iter()
            .find(|(_, s)| hex(&s.trace_id) == trace_id && s.name.ends_with("/Reserve"))
            .cloned()
    })
    .await;
    assert_eq!(service, "quotad-under-test");
    assert_eq!(rpc.name, "quota.v1.QuotaService/Reserve");
    assert_eq!(
        hex(&rpc.parent_span_id),
        caller_span,
        "a child of the caller's span"
    );
    assert_eq!(rpc.kind, 2, "SPAN_KIND_SERVER");
    for (key, value) in [
        ("product", "codex"),
        ("plan", "free"),
        ("decision", "ALLOW"),
        ("action", "NONE"),
        ("funding", "plan"),
        ("rpc.method", "Reserve"),
        ("rpc.grpc.status_code", "0"),
    ] {
        assert_eq!(attribute(&rpc, key).as_deref(), Some(value), "{key}");
    }
    let account = attribute(&rpc, "account").expect("the account, hashed");
    assert_eq!(account.len(), 16);
    assert!(!account.contains("carol"));
    let store = until("the store span", || {
        received
            .spans
            .lock()
            .unwrap()
            .iter()
            .find(|(_, s)| s.parent_span_id == rpc.span_id && s.name == "store")
            .map(|(_, s)| s.clone())
    })
    .await;
    assert_eq!(attribute(&store, "op").as_deref(), Some("reserve"));
    assert_eq!(store.trace_id, rpc.trace_id);

    until("the decisions metric", || {
        received
            .metrics
            .lock()
            .unwrap()
            .iter()
            .any(|m| m == "quotad.decisions")
            .then_some(())
    })
    .await;
    assert!(
        received
            .metrics
            .lock()
            .unwrap()
            .iter()
            .any(|m| m == "quotad.rpc.duration")
    );

    // A call just before SIGTERM: its span is still in the batch, and the flush at exit sends it.
    q.get_usage(pb::GetUsageRequest {
        account_id: "carol-raw-id".into(),
        recent_limit: 0,
    })
    .await
    .unwrap();
    quotad.signal("TERM");
    let exit = tokio::task::spawn_blocking(move || quotad.wait())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    assert!(
        received
            .spans
            .lock()
            .unwrap()
            .iter()
            .any(|(_, s)| s.name == "quota.v1.QuotaService/GetUsage"),
        "the last span was flushed before exit"
    );
}
