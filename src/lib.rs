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
pub mod server;
pub mod store;
pub mod telemetry;

use std::sync::Arc;

use crate::app::Quota;
use crate::config::{Config, StoreKind};
use crate::domain::Clock;
use crate::store::MemoryStore;

/// The quota service for `config` on its configured store, reading time from `clock`.
pub fn build_memory(config: &Config, clock: Arc<dyn Clock>) -> Arc<Quota<MemoryStore>> {
    debug_assert_eq!(config.store.kind, StoreKind::Memory);
    let policy = Arc::new(config.policy());
    let store = MemoryStore::new(policy.clone());
    Arc::new(Quota::new(
        store,
        policy,
        Arc::new(config.pricing.clone()),
        clock,
    ))
}
