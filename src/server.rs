//! Serving: wires the gRPC services, health and reflection onto a listener and runs until the
//! shutdown future resolves, then drains in-flight calls for at most the grace period.
//!
//! `run` takes an already-bound listener, so tests bind port 0 and read the address, and the
//! binary logs `listening on ADDR` before serving.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::api::auth::BearerAuth;
use crate::api::pb::admin_service_server::AdminServiceServer;
use crate::api::pb::quota_service_server::QuotaServiceServer;
use crate::api::{AdminApi, QuotaApi, pb};
use crate::app::Quota;
use crate::payment::{PaymentProvider, RetryPolicy, run_worker};
use crate::store::{Store, StoreHealth};

/// Names under which `grpc.health.v1` reports; "" is the server as a whole.
const HEALTH_NAMES: [&str; 3] = ["", "quota.v1.QuotaService", "quota.v1.AdminService"];

/// The health name that reports the backing store alone. A store outage shows here (and in the
/// logs), never in the names above: one shared dependency must not take every pod out of service.
pub const STORE_HEALTH_NAME: &str = "quotad.store";

/// How often the store's health is copied into `grpc.health.v1`.
const STORE_HEALTH_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub admin_token: Option<String>,
    /// How long in-flight calls may run on after shutdown begins.
    pub shutdown_grace: Duration,
    /// Pays for auto top-up purchases.
    pub payments: Arc<dyn PaymentProvider>,
    pub payment_retry: RetryPolicy,
    /// A purchase still in flight this long after it started is paid again (same key).
    pub payment_resume_after: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Serves quotad on `listener` until `shutdown` resolves, then stops accepting, reports
/// NOT_SERVING and lets in-flight calls finish within `settings.shutdown_grace`.
pub async fn run<S: Store>(
    listener: TcpListener,
    app: Arc<Quota<S>>,
    settings: ServeSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in HEALTH_NAMES {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    if settings.admin_token.is_none() {
        tracing::warn!("no admin token configured: AdminService will refuse every call");
    }
    let auth = BearerAuth::new(settings.admin_token.as_deref());

    let payer = app.payments().take().map(|orders| {
        tokio::spawn(run_worker(
            orders,
            settings.payments.clone(),
            app.clone(),
            settings.payment_retry,
        ))
    });
    let store_health = {
        let (app, health) = (app.clone(), health.clone());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(STORE_HEALTH_EVERY);
            loop {
                ticks.tick().await;
                let status = match app.store().health() {
                    StoreHealth::Up => ServingStatus::Serving,
                    StoreHealth::Down { .. } => ServingStatus::NotServing,
                };
                health.set_service_status(STORE_HEALTH_NAME, status).await;
            }
        })
    };
    let upkeep = {
        let every = app
            .store()
            .maintenance_interval()
            .unwrap_or(Duration::from_secs(1));
        let (app, resume_after) = (app.clone(), settings.payment_resume_after);
        Some(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                app.maintain(resume_after).await;
            }
        }))
    };
    let draining = Arc::new(Notify::new());
    let signal = {
        let draining = draining.clone();
        async move {
            shutdown.await;
            tracing::info!(grace = ?settings.shutdown_grace, "shutting down: draining in-flight calls");
            for name in HEALTH_NAMES {
                health
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            draining.notify_one();
        }
    };
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(QuotaServiceServer::new(QuotaApi::new(app.clone())))
        .add_service(AdminServiceServer::with_interceptor(
            AdminApi::new(app),
            auth,
        ))
        .serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    let served = tokio::select! {
        result = &mut server => result.map_err(ServerError::from),
        () = async { draining.notified().await; tokio::time::sleep(settings.shutdown_grace).await } => {
            tracing::warn!("grace period over: closing the calls still in flight");
            Ok(())
        }
    };
    store_health.abort();
    if let Some(payer) = payer {
        payer.abort();
    }
    if let Some(upkeep) = upkeep {
        upkeep.abort();
    }
    served
}
