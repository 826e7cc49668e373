//! The store contract, run against the embedded store backed by a data dir, at its default
//! settings: every decision goes through group commit to the embedded database before it is
//! answered, and usage history and the export are read back from it.

use crate::support;

use std::path::PathBuf;
use std::sync::Arc;

use quotad::domain::Policy;
use quotad::rules::LiveRules;
use quotad::store::{DataDirSettings, MemoryStore};
use support::contract::store_contract_tests;

store_contract_tests!(in_data_dir |dir: PathBuf| async move {
    let rules = LiveRules::fixed(Arc::new(Policy::default()));
    MemoryStore::open(rules, &DataDirSettings::new(dir)).unwrap()
});
