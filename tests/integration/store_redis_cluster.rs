//! The store contract, run unchanged against the Redis store on a real 3-master Redis Cluster
//! built by the test with `redis-cli --cluster create`.

use crate::support;

use support::contract::store_contract_tests;

store_contract_tests!(support::redis::cluster_store());
