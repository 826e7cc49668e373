//! quotad: a quota-enforcement sidecar for AI coding-assistant subscriptions.
//!
//! - [`domain`]: the pure rules (plans, pricing, windows, reservations, credits).
//! - [`store`]: where account state lives, behind one [`store::Store`] trait.
//! - [`app`]: validation, pricing and id generation in front of a store.
//! - [`api`]: the gRPC edge (tonic), converting protobuf to domain types and back.
//! - [`config`]: layered configuration; [`server`]: serving until shutdown;
//!   [`telemetry`]: logs, traces and OTLP export; [`metrics`]: Prometheus and OTLP metrics;
//!   [`http`]: the HTTP admin port; [`tls`]: TLS with certificate reload.
//! - [`rules`]: the rules in force, one snapshot swapped whole; [`reload`]: reading them again
//!   on SIGHUP or when the config file changes.

pub mod api;
pub mod app;
pub mod config;
pub mod domain;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod payment;
pub mod reload;
pub mod rules;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::app::Quota;
use crate::config::{Config, ConfigSource, StoreKind};
use crate::domain::Clock;
use crate::metrics::Metrics;
use crate::rules::LiveRules;
use crate::server::{ServeSettings, ServerError};

pub use crate::server::Listeners;
use crate::store::{MemoryStore, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    DataDir(#[from] crate::store::DataDirError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Runs quotad as `config` says on `listeners` until `shutdown` resolves, reading time from
/// `clock`: serves at once, connects the configured store (retrying while it is not up), and
/// drains on shutdown (see [`server::run`]). The rules stay as `config` gives them.
pub async fn run(
    config: &Config,
    listeners: Listeners,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let live = LiveRules::new(config.rules());
    serve(
        config,
        live,
        Arc::new(Metrics::new()),
        listeners,
        clock,
        shutdown,
    )
    .await
}

/// As [`run`], with `config` read from `source`, whose rules are read again on SIGHUP and
/// every `reload_interval_ms` when the file changed (see [`reload`]).
pub async fn run_reloading(
    source: ConfigSource,
    config: &Config,
    listeners: Listeners,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let live = LiveRules::new(config.rules());
    let metrics = Arc::new(Metrics::new());
    let reloader = reload::Reloader::new(source, config, live.clone(), metrics.clone());
    let interval =
        (config.reload_interval_ms > 0).then(|| Duration::from_millis(config.reload_interval_ms));
    let (stop_watching, stopped) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(reload::watch(reloader, interval, async {
        let _ = stopped.await;
    }));
    let served = serve(config, live, metrics, listeners, clock, shutdown).await;
    let _ = stop_watching.send(());
    let _ = watcher.await;
    served
}

async fn serve(
    config: &Config,
    rules: Arc<LiveRules>,
    metrics: Arc<Metrics>,
    listeners: Listeners,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let tls = if config.tls.enabled() {
        Some(Arc::new(crate::tls::Certificates::load(&config.tls)?))
    } else {
        None
    };
    let settings = ServeSettings {
        admin_token: config.admin_token.clone(),
        quota_token: config.quota_token.clone(),
        shutdown_grace: Duration::from_secs(config.shutdown_grace_seconds),
        request_timeout: Duration::from_millis(config.server.request_timeout_ms),
        max_concurrent_requests: config.server.max_concurrent_requests,
        max_message_bytes: config.server.max_message_bytes,
        tls,
        payments: config.payments.provider()?,
        payment_retry: config.payments.retry(),
        payment_resume_after: Duration::from_millis(config.payments.resume_after_ms),
        metrics: metrics.clone(),
        forward_from: (config.store.kind == StoreKind::Redis)
            .then(|| config.store.redis.advertise_addr.clone()),
        forward_tls: match crate::tls::PeerTls::from_config(&config.tls) {
            Some(peers) => {
                peers.check()?;
                Some(peers)
            }
            None => None,
        },
        account_tokens: config
            .account_tokens
            .tokens()
            .map_err(crate::config::ConfigError::Invalid)?,
        account_token_max_ttl: config.account_tokens.max_ttl_seconds,
        clock: clock.clone(),
    };
    let parts = Parts {
        rules,
        clock: clock.clone(),
        reserve_wait: Duration::from_millis(config.payments.reserve_wait_ms),
        metrics,
        webhooks: config.notifications.webhook()?,
    };
    match config.store.kind {
        StoreKind::Memory => {
            let store = match config.store.data_dir() {
                Some(data_dir) => {
                    let store = MemoryStore::open(parts.rules.clone(), &data_dir)?;
                    tracing::info!(
                        data_dir = %data_dir.path.display(),
                        "memory store backed by its data dir: what is acknowledged survives a restart"
                    );
                    store
                }
                None => {
                    tracing::warn!(
                        "memory store without a data dir: nothing survives a restart \
                         (set store.data_dir or --data-dir to keep balances, grants and windows)"
                    );
                    MemoryStore::with_rules(parts.rules.clone())
                }
            };
            serve_memory(store, parts, listeners, settings, shutdown).await?;
        }
        StoreKind::Redis => {
            let redis = config.store.redis.settings()?;
            let owned = config.store.owned();
            // What Redis holds but this quotad cannot use (another persisted format) stops it
            // at once; a Redis not up yet is waited for, serving NOT_SERVING meanwhile.
            let first = match MemoryStore::open_on_redis(parts.rules.clone(), &redis, &owned).await
            {
                Err(StoreError::Internal(why)) => return Err(StoreError::Internal(why).into()),
                opened => std::sync::Mutex::new(Some(opened)),
            };
            let connect = move || {
                let first = first.lock().unwrap_or_else(|e| e.into_inner()).take();
                let (redis, owned, parts) = (redis.clone(), owned.clone(), parts.clone());
                Box::pin(async move {
                    let store = match first {
                        Some(opened) => opened?,
                        None => {
                            MemoryStore::open_on_redis(parts.rules.clone(), &redis, &owned).await?
                        }
                    };
                    Ok(parts.quota(store))
                }) as Connecting<MemoryStore>
            };
            server::run(listeners, connect, settings, shutdown).await?;
        }
    }
    Ok(())
}

/// Serves a memory store opened before serving (once: a data dir that cannot be used stops
/// quotad).
async fn serve_memory(
    store: MemoryStore,
    parts: Parts,
    listeners: Listeners,
    settings: ServeSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let store = std::sync::Mutex::new(Some(store));
    let connect = move || {
        let store = store.lock().unwrap_or_else(|e| e.into_inner()).take();
        let quota = store
            .map(|store| parts.quota(store))
            .ok_or_else(|| StoreError::Internal("the memory store was already handed out".into()));
        Box::pin(async move { quota }) as Connecting<MemoryStore>
    };
    server::run(listeners, connect, settings, shutdown).await?;
    Ok(())
}

/// What every store's application is built from.
#[derive(Clone)]
struct Parts {
    rules: Arc<LiveRules>,
    clock: Arc<dyn Clock>,
    reserve_wait: Duration,
    metrics: Arc<Metrics>,
    /// Where notifications are posted, if anywhere.
    webhooks: Option<(notify::Webhook, notify::Backoff)>,
}

impl Parts {
    fn quota<S: Store>(&self, store: S) -> Quota<S> {
        let quota = Quota::new(store, self.rules.clone(), self.clock.clone())
            .with_reserve_wait(self.reserve_wait)
            .with_metrics(self.metrics.clone());
        match &self.webhooks {
            Some((webhook, backoff)) => quota.with_webhooks(webhook.clone(), *backoff),
            None => quota,
        }
    }
}

type Connecting<S> = std::pin::Pin<Box<dyn Future<Output = Result<Quota<S>, StoreError>> + Send>>;
