//! Serving: the gRPC services, health, reflection and the HTTP admin port on their listeners,
//! from start to drain.
//!
//! - **Starting.** Listeners serve at once, but `grpc.health.v1` and `/readyz` say not serving
//!   and QuotaService/AdminService answer `UNAVAILABLE` until the store has answered once (a
//!   Redis that is not up yet is retried with backoff, it does not stop quotad).
//! - **Serving.** Every call passes the [`GuardLayer`] (span, admission, deadline, metrics),
//!   then its service's bearer-token check. A store outage after start shows in the
//!   `quotad.store` health name, `/readyz`'s body and metrics, never in readiness: one shared
//!   dependency must not take every pod out of service.
//! - **Draining.** When `shutdown` resolves: not serving everywhere, listeners closed (new
//!   connections are refused), in-flight calls finish within the grace period.
//!
//! `run` takes already-bound listeners, so tests bind port 0 and read the addresses, and the
//! binary logs them before serving.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::api::auth::BearerAuth;
use crate::api::envoy::service::ratelimit::v3 as envoy_rls;
use crate::api::forward::ForwardLayer;
use crate::api::json::JsonLayer;
use crate::api::layer::GuardLayer;
use crate::api::pb::admin_service_server::AdminServiceServer;
use crate::api::pb::quota_service_server::QuotaServiceServer;
use crate::api::{AdminApi, AppSlot, QuotaApi, RlsApi, pb};
use crate::app::Quota;
use crate::http::Readiness;
use crate::metrics::Metrics;
use crate::payment::{PaymentProvider, RetryPolicy, run_worker};
use crate::store::{Store, StoreError, StoreHealth};
use crate::tls::Certificates;

/// Names under which `grpc.health.v1` reports; "" is the server as a whole.
const HEALTH_NAMES: [&str; 3] = ["", "quota.v1.QuotaService", "quota.v1.AdminService"];

/// The health name that reports the backing store alone. A store outage shows here (and in the
/// logs), never in the names above: one shared dependency must not take every pod out of service.
pub const STORE_HEALTH_NAME: &str = "quotad.store";

/// How often the store's health is copied into `grpc.health.v1`, `/readyz` and metrics.
const STORE_HEALTH_EVERY: Duration = Duration::from_millis(200);

/// The sockets quotad serves on.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC: QuotaService, and AdminService unless `admin` is given; health and reflection.
    pub grpc: TcpListener,
    /// gRPC for AdminService alone (with health and reflection).
    pub admin: Option<TcpListener>,
    /// HTTP: `/metrics`, `/healthz`, `/readyz`.
    pub http: Option<TcpListener>,
}

impl Listeners {
    pub fn grpc_only(grpc: TcpListener) -> Listeners {
        Listeners {
            grpc,
            admin: None,
            http: None,
        }
    }
}

#[derive(Clone)]
pub struct ServeSettings {
    pub admin_token: Option<String>,
    pub quota_token: Option<String>,
    /// How long in-flight calls may run on after shutdown begins.
    pub shutdown_grace: Duration,
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
    pub max_message_bytes: usize,
    pub tls: Option<Arc<Certificates>>,
    /// Pays for auto top-up purchases.
    pub payments: Arc<dyn PaymentProvider>,
    pub payment_retry: RetryPolicy,
    /// A purchase still in flight this long after it started is paid again (same key).
    pub payment_resume_after: Duration,
    pub metrics: Arc<Metrics>,
    /// On Redis, the address other replicas reach this one at: calls about accounts
    /// another replica owns are forwarded there ([`crate::api::forward`]).
    pub forward_from: Option<String>,
    /// With TLS on, how forwards reach the other replicas.
    pub forward_tls: Option<crate::tls::PeerTls>,
    /// Keys of account-scoped tokens (none: such tokens are refused), and the longest
    /// lifetime, in seconds, one is minted for.
    pub account_tokens: Option<Arc<crate::api::tokens::AccountTokens>>,
    pub account_token_max_ttl: u64,
    /// quotad's clock, which account tokens expire by.
    pub clock: Arc<dyn crate::domain::time::Clock>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Serves on `listeners` until `shutdown` resolves. `connect` builds the application (its
/// store reachable); it is retried with backoff until it succeeds or shutdown begins.
pub async fn run<S, C, F>(
    listeners: Listeners,
    connect: C,
    settings: ServeSettings,
    shutdown: F,
) -> Result<(), ServerError>
where
    S: Store,
    C: Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<Quota<S>, StoreError>> + Send>>
        + Send
        + 'static,
    F: Future<Output = ()> + Send,
{
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in HEALTH_NAMES.into_iter().chain([STORE_HEALTH_NAME]) {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    let readiness = Arc::new(Readiness::default());
    let slot: AppSlot<S> = Arc::new(OnceLock::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    // The HTTP port outlives the drain, so probes see "draining" while calls finish.
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let grpc_port = listeners
        .grpc
        .local_addr()
        .ok()
        .map(|listen| crate::http::GrpcPort {
            listen,
            tls: settings.tls.is_some(),
        });
    let http = listeners.http.map(|listener| {
        tokio::spawn(crate::http::serve(
            listener,
            settings.metrics.clone(),
            readiness.clone(),
            grpc_port,
            async move {
                let _ = http_stopped.await;
            },
        ))
    });
    let startup = tokio::spawn(start(
        connect,
        slot.clone(),
        health.clone(),
        readiness.clone(),
        settings.clone(),
        stopped(),
    ));

    let (grpc_incoming, grpc_accept) = crate::tls::incoming(listeners.grpc, settings.tls.clone());
    let admin_separate = listeners.admin.is_some();
    let mut accepts = vec![grpc_accept];
    let mut servers = Vec::new();
    servers.push(tokio::spawn(
        router(&slot, &settings, &health_service, !admin_separate, true)?
            .serve_with_incoming_shutdown(grpc_incoming, stopped()),
    ));
    if let Some(admin) = listeners.admin {
        let (incoming, accept) = crate::tls::incoming(admin, settings.tls.clone());
        accepts.push(accept);
        servers.push(tokio::spawn(
            router(&slot, &settings, &health_service, true, false)?
                .serve_with_incoming_shutdown(incoming, stopped()),
        ));
    }
    let reload = settings.tls.clone().map(|certificates| {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(crate::tls::RELOAD_EVERY);
            loop {
                ticks.tick().await;
                certificates.reload_if_changed();
            }
        })
    });

    shutdown.await;
    tracing::info!(grace = ?settings.shutdown_grace, "shutting down: draining in-flight calls");
    readiness.draining();
    for name in HEALTH_NAMES {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    // Closing the listeners refuses new connections at once; open ones get GOAWAY.
    for accept in &accepts {
        accept.abort();
    }
    let _ = stop_tx.send(true);
    let drained = async {
        let mut result = Ok(());
        for server in servers {
            if let Ok(Err(e)) = server.await {
                result = Err(ServerError::from(e));
            }
        }
        result
    };
    let served = match tokio::time::timeout(settings.shutdown_grace, drained).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!("grace period over: closing the calls still in flight");
            Ok(())
        }
    };
    startup.abort();
    let _ = http_stop.send(());
    if let Some(http) = http {
        let _ = http.await;
    }
    if let Some(reload) = reload {
        reload.abort();
    }
    served
}

/// Every listener's services, behind the JSON door, the guard, the account-token check and then
/// the forwarding to owners.
type Routes = tonic::transport::server::Router<
    tower::layer::util::Stack<
        ForwardLayer,
        tower::layer::util::Stack<
            crate::api::tokens::AccountTokenLayer,
            tower::layer::util::Stack<
                GuardLayer,
                tower::layer::util::Stack<JsonLayer, tower::layer::util::Identity>,
            >,
        >,
    >,
>;

/// The gRPC services for one listener.
fn router<S: Store>(
    slot: &AppSlot<S>,
    settings: &ServeSettings,
    health_service: &tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    with_admin: bool,
    with_quota: bool,
) -> Result<Routes, ServerError> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(envoy_rls::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(envoy_rls::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let guard = GuardLayer::new(
        settings.max_concurrent_requests,
        settings.request_timeout,
        settings.metrics.clone(),
    );
    let size = settings.max_message_bytes;
    let quota = with_quota.then(|| {
        InterceptedService::new(
            QuotaServiceServer::new(QuotaApi::new(slot.clone()))
                .max_decoding_message_size(size)
                .max_encoding_message_size(size),
            BearerAuth::optional(settings.quota_token.as_deref()),
        )
    });
    let rate_limits = with_quota.then(|| {
        InterceptedService::new(
            envoy_rls::rate_limit_service_server::RateLimitServiceServer::new(RlsApi::new(
                slot.clone(),
            ))
            .max_decoding_message_size(size)
            .max_encoding_message_size(size),
            BearerAuth::optional(settings.quota_token.as_deref()),
        )
    });
    let admin = with_admin.then(|| {
        InterceptedService::new(
            AdminServiceServer::new(AdminApi::new(slot.clone()).with_tokens(
                settings.account_tokens.clone(),
                settings.account_token_max_ttl,
            ))
            .max_decoding_message_size(size)
            .max_encoding_message_size(size),
            BearerAuth::new(settings.admin_token.as_deref()),
        )
    });
    Ok(Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // The JSON door takes HTTP/1.1 as well; gRPC stays HTTP/2.
        .accept_http1(true)
        .layer(JsonLayer::new(with_quota, with_admin, size))
        .layer(guard)
        .layer(crate::api::tokens::AccountTokenLayer::new(
            settings.account_tokens.clone(),
            settings.clock.clone(),
        ))
        .layer(ForwardLayer::new(
            settings.forward_from.as_deref(),
            settings.forward_tls.clone(),
            Arc::new({
                let slot = slot.clone();
                move || {
                    slot.get()
                        .is_none_or(|app| app.store().owns_every_account())
                }
            }),
            Duration::from_secs(1),
            settings.metrics.clone(),
        ))
        .add_service(health_service.clone())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_optional_service(quota)
        .add_optional_service(rate_limits)
        .add_optional_service(admin))
}

/// Builds the application (retrying while the store cannot be reached), then marks quotad
/// serving and starts the background work: payments, notifications, store health, maintenance.
async fn start<S, C>(
    connect: C,
    slot: AppSlot<S>,
    health: HealthReporter,
    readiness: Arc<Readiness>,
    settings: ServeSettings,
    stopped: impl Future<Output = ()> + Send,
) where
    S: Store,
    C: Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<Quota<S>, StoreError>> + Send>>,
{
    let mut backoff = Duration::from_millis(100);
    let app = loop {
        match connect().await {
            Ok(app) => break Arc::new(app),
            Err(e) => {
                tracing::warn!("store not reachable yet, retrying in {backoff:?}: {e}");
                readiness.set_store_error(Some(e.to_string()));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    let _ = slot.set(app.clone());
    readiness.set_store_error(None);
    readiness.serving();
    for name in HEALTH_NAMES.into_iter().chain([STORE_HEALTH_NAME]) {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    if settings.admin_token.is_none() {
        tracing::warn!("no admin token configured: AdminService will refuse every call");
    }
    tracing::info!("ready: serving requests");

    let mut tasks = Vec::new();
    if let Some(orders) = app.payments().take() {
        tasks.push(tokio::spawn(run_worker(
            orders,
            settings.payments.clone(),
            app.clone(),
            settings.payment_retry,
        )));
    }
    if let Some(webhooks) = app.webhook_worker() {
        tasks.push(tokio::spawn(webhooks));
    }
    tasks.push({
        let (app, health, readiness) = (app.clone(), health.clone(), readiness.clone());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(STORE_HEALTH_EVERY);
            loop {
                ticks.tick().await;
                let store = app.store();
                let (status, error) = match store.health() {
                    StoreHealth::Up => (ServingStatus::Serving, None),
                    StoreHealth::Down { error } => (ServingStatus::NotServing, Some(error)),
                };
                app.metrics().observe_store(
                    error.is_none(),
                    store.open_holds(),
                    store.retried_calls(),
                );
                if let Some(accounts) = store.resident_accounts() {
                    app.metrics().observe_resident(accounts);
                }
                if let Some(stats) = store.data_dir_stats() {
                    app.metrics().observe_data_dir(&stats);
                }
                if let Some(stats) = store.outage_stats() {
                    app.metrics().observe_outage(&stats);
                }
                readiness.set_store_error(error);
                health.set_service_status(STORE_HEALTH_NAME, status).await;
            }
        })
    });
    tasks.push({
        let every = app
            .store()
            .maintenance_interval()
            .unwrap_or(Duration::from_secs(1));
        let (app, resume_after) = (app.clone(), settings.payment_resume_after);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                app.maintain(resume_after).await;
            }
        })
    });
    stopped.await;
    for task in tasks {
        task.abort();
    }
}
