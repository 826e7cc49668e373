//! quotad: a quota-enforcement sidecar for AI coding-assistant subscriptions.
//!
//! - [`domain`]: the pure rules (plans, pricing, windows, reservations, credits).
//! - [`store`]: where account state lives, behind one [`store::Store`] trait.
//! - [`app`]: validation, pricing and id generation in front of a store.
//! - [`api`]: the gRPC edge (tonic), converting protobuf to domain types and back.
//! - [`config`]: layered configuration; [`server`]: serving until shutdown;
//!   [`telemetry`]: logs.

pub mod api;
pub mod app;
pub mod config;
pub mod domain;
pub mod payment;
pub mod server;
pub mod store;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::app::Quota;
use crate::config::{Config, StoreKind};
use crate::domain::Clock;
use crate::server::{ServeSettings, ServerError};
use crate::store::{MemoryStore, RedisStore, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// Runs quotad as `config` says on `listener` until `shutdown` resolves, reading time from
/// `clock`: builds the configured store, then serves (see [`server::run`]).
pub async fn run(
    config: &Config,
    listener: TcpListener,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let settings = ServeSettings {
        admin_token: config.admin_token.clone(),
        shutdown_grace: Duration::from_secs(config.shutdown_grace_seconds),
        payments: config.payments.provider()?,
        payment_retry: config.payments.retry(),
        payment_resume_after: Duration::from_millis(config.payments.resume_after_ms),
    };
    let policy = Arc::new(config.policy());
    match config.store.kind {
        StoreKind::Memory => {
            let store = MemoryStore::new(policy.clone());
            serve_on(store, config, policy, clock, listener, settings, shutdown).await
        }
        StoreKind::Redis => {
            let redis = config.store.redis.settings()?;
            let store = RedisStore::connect(redis, policy.clone()).await?;
            serve_on(store, config, policy, clock, listener, settings, shutdown).await
        }
    }
}

async fn serve_on<S: Store>(
    store: S,
    config: &Config,
    policy: Arc<crate::domain::Policy>,
    clock: Arc<dyn Clock>,
    listener: TcpListener,
    settings: ServeSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let wait = Duration::from_millis(config.payments.reserve_wait_ms);
    let quota =
        Quota::new(store, policy, Arc::new(config.pricing.clone()), clock).with_reserve_wait(wait);
    let app = Arc::new(quota);
    server::run(listener, app, settings, shutdown).await?;
    Ok(())
}
