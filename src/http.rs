//! The HTTP admin port: `/metrics` (Prometheus text), `/healthz` (the process answers) and
//! `/readyz` (it should get traffic). Plain HTTP/1.1 on its own listener, apart from gRPC, so
//! scrapers and probes need no gRPC client and no credentials; keep the port inside the
//! cluster (the Helm chart's NetworkPolicy does).
//!
//! Every answer carries `quotad-grpc-listen` (the gRPC listen address) and `quotad-grpc-tls`
//! (`true` or `false`), so a gRPC client pointed at this port by mistake (`quotactl` does this)
//! can say which port to use instead.
//!
//! Readiness follows the serving phase only: not ready while starting (the store has not
//! answered yet) and while draining. A store outage after start is reported in the body and
//! in metrics but keeps the pod ready: one shared dependency must not take every pod out.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// Where the server is in its life, as probes see it.
#[derive(Debug, Default)]
pub struct Readiness {
    phase: AtomicU8,
    store_error: Mutex<Option<String>>,
}

// 0 (the default) is starting.
const SERVING: u8 = 1;
const DRAINING: u8 = 2;

impl Readiness {
    pub fn serving(&self) {
        self.phase.store(SERVING, Ordering::SeqCst);
    }

    pub fn draining(&self) {
        self.phase.store(DRAINING, Ordering::SeqCst);
    }

    pub fn is_serving(&self) -> bool {
        self.phase.load(Ordering::SeqCst) == SERVING
    }

    /// What the store last said: `None` while it answers.
    pub fn set_store_error(&self, error: Option<String>) {
        *self.store_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    fn report(&self) -> (StatusCode, String) {
        let store = match &*self.store_error.lock().unwrap_or_else(|e| e.into_inner()) {
            None => "store: up".to_owned(),
            Some(e) => format!("store: down ({e})"),
        };
        match self.phase.load(Ordering::SeqCst) {
            SERVING => (StatusCode::OK, format!("ready\n{store}\n")),
            DRAINING => (
                StatusCode::SERVICE_UNAVAILABLE,
                "draining: shutting down\n".into(),
            ),
            _ => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("starting: waiting for the store to answer once\n{store}\n"),
            ),
        }
    }
}

/// Where quotad serves gRPC, as the HTTP port tells it.
#[derive(Debug, Clone, Copy)]
pub struct GrpcPort {
    pub listen: std::net::SocketAddr,
    pub tls: bool,
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    grpc: Option<GrpcPort>,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!("http admin accept: {e}");
                    continue;
                }
            },
        };
        let (metrics, readiness) = (metrics.clone(), readiness.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let mut answer = answer(&request, &metrics, &readiness);
                if let Some(grpc) = grpc {
                    let headers = answer.headers_mut();
                    if let Ok(listen) = HeaderValue::from_str(&grpc.listen.to_string()) {
                        headers.insert("quotad-grpc-listen", listen);
                    }
                    let tls = if grpc.tls { "true" } else { "false" };
                    headers.insert("quotad-grpc-tls", HeaderValue::from_static(tls));
                }
                async move { Ok::<_, Infallible>(answer) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(
    request: &Request<Incoming>,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, content_type: &'static str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(content_type),
        );
        response
    };
    const PLAIN: &str = "text/plain; charset=utf-8";
    if request.method() != hyper::Method::GET && request.method() != hyper::Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "GET only\n".into());
    }
    match request.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => {
            let (status, body) = readiness.report();
            text(status, PLAIN, body)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}
