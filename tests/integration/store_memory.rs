//! The store contract, run against the embedded memory store.

use crate::support;

use std::sync::Arc;

use quotad::domain::Policy;
use quotad::store::MemoryStore;
use support::contract::store_contract_tests;

store_contract_tests!(async { MemoryStore::new(Arc::new(Policy::default())) });
