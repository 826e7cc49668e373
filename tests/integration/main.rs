//! The integration tests: real quotad servers and processes, real Redis servers, real clients.
//!
//! One test binary, one module per subject: the shared harness (`support`) is compiled once and
//! the suite links once, and the test threads take tests from every subject, so a long test
//! never leaves a core idle while its own file's others are done. One subject runs with
//! `cargo test --test integration replicas::` (a module's name, then `::`).

mod support;

mod account_tokens;
mod bench_tool;
mod binary;
mod cli;
mod crash;
mod dashboards;
mod dockerfile;
mod envoy_examples;
mod examples;
mod grpc_api;
mod helm_chart;
mod hot_reload;
mod json_api;
mod operations;
mod outage;
mod outage_grace;
mod ownership_simulation;
mod payments_http;
mod redis_tls;
mod replicas;
mod rls;
mod shadow;
mod simulation;
mod slow_redis;
mod store_differential;
mod store_embedded;
mod store_memory;
mod store_redis;
mod store_redis_cluster;
mod store_redis_sentinel;
mod telemetry;
mod top_up_restart;
mod usage_page;
mod webhooks;
