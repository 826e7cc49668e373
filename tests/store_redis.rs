//! The store contract, run unchanged against the Redis store on a real standalone
//! `redis-server` started by the test.

mod support;

use support::contract::store_contract_tests;

store_contract_tests!(support::redis::standalone_store());
