//! `examples/envoy/envoy.yaml` and `examples/istio/envoyfilter.yaml`, checked as far as a
//! machine without Envoy or a cluster allows:
//!
//! - the rate limit filter points at a cluster that exists, on quotad's port 50051, over HTTP/2,
//!   sends the quota token, and sits before the router;
//! - its domain and descriptor keys are those of a rule of quotad's default config (the account)
//!   and of `examples/envoy/quotad.toml` (the account and the address);
//! - the Istio filter carries the same filter, descriptors and cluster;
//! - quotad answers the descriptors such a request makes, over real gRPC;
//! - both files read into Envoy's own v3 API messages (`examples/envoy/check.py`, in a
//!   virtualenv made under `target/examples-run/` on the first run), and a broken copy does not.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use quotad::api::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use quotad::api::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use quotad::api::envoy::service::ratelimit::v3::RateLimitRequest;
use quotad::api::envoy::service::ratelimit::v3::rate_limit_response::Code;
use quotad::api::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use quotad::api::pb;
use quotad::config::{Config, StoreKind};
use quotad::domain::rls::{RlsRule, Target, target};
use serde_norway::Value;
use support::{TestServer, costing};

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read_yaml(path: &str) -> Value {
    let path = crate_root().join(path);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path:?} is not YAML: {e}"))
}

fn seq(value: &Value) -> &[Value] {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("not a list: {value:?}"))
}

fn str_of(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value:?}"))
}

/// The quotad config that `examples/envoy/quotad.toml` gives.
fn example_config() -> Config {
    let path = crate_root().join("examples/envoy/quotad.toml");
    Config::load_from(Some(&path), |_| None, false).expect("examples/envoy/quotad.toml loads")
}

/// The parts of an Envoy config that concern quotad.
struct RateLimitSetup<'a> {
    /// The filter's `typed_config`.
    filter: &'a Value,
    /// The route's (or virtual host's) `rate_limits`.
    rate_limits: &'a Value,
    /// The cluster the filter calls.
    cluster: &'a Value,
}

impl RateLimitSetup<'_> {
    fn domain(&self) -> &str {
        str_of(&self.filter["domain"])
    }

    fn cluster_name(&self) -> &str {
        str_of(&self.filter["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"])
    }

    /// The descriptor keys each `rate_limits` entry produces, in order.
    fn descriptor_keys(&self) -> Vec<Vec<String>> {
        seq(self.rate_limits)
            .iter()
            .map(|limit| {
                seq(&limit["actions"])
                    .iter()
                    .map(|action| {
                        if let Some(headers) = action.get("request_headers") {
                            str_of(&headers["descriptor_key"]).to_owned()
                        } else if action.get("remote_address").is_some() {
                            // Envoy's fixed key for this action.
                            "remote_address".to_owned()
                        } else {
                            panic!("an action this test does not know: {action:?}")
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// What the filter needs of its cluster: its name, port 50051 and HTTP/2.
    fn check_cluster(&self) {
        assert_eq!(str_of(&self.cluster["name"]), self.cluster_name());
        let endpoints = seq(&self.cluster["load_assignment"]["endpoints"]);
        let ports: Vec<u64> = endpoints
            .iter()
            .flat_map(|e| seq(&e["lb_endpoints"]))
            .map(|lb| {
                lb["endpoint"]["address"]["socket_address"]["port_value"]
                    .as_u64()
                    .expect("a numeric port")
            })
            .collect();
        assert_eq!(ports, [50051], "quotad's gRPC port");
        let options = &self.cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
        assert_eq!(
            str_of(&options["@type"]),
            "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        );
        assert!(
            options["explicit_http_config"]
                .get("http2_protocol_options")
                .is_some(),
            "gRPC needs HTTP/2 to quotad: {options:?}"
        );
    }

    fn check_filter(&self) {
        assert_eq!(
            str_of(&self.filter["@type"]),
            "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit"
        );
        assert!(
            self.filter["failure_mode_deny"].as_bool().is_some(),
            "failure_mode_deny is spelled out"
        );
        let service = &self.filter["rate_limit_service"];
        assert_eq!(str_of(&service["transport_api_version"]), "V3");
        let metadata = seq(&service["grpc_service"]["initial_metadata"]);
        let authorization = metadata
            .iter()
            .find(|m| m["key"] == "authorization")
            .expect("the quota token is sent as `authorization`");
        assert!(str_of(&authorization["value"]).starts_with("Bearer "));
    }
}

/// The rate limit filter, its route's `rate_limits` and its cluster in the Envoy example.
fn envoy_setup(envoy: &Value) -> RateLimitSetup<'_> {
    let listeners = seq(&envoy["static_resources"]["listeners"]);
    let manager = &seq(&listeners[0]["filter_chains"][0]["filters"])[0]["typed_config"];
    let filters = seq(&manager["http_filters"]);
    let names: Vec<&str> = filters.iter().map(|f| str_of(&f["name"])).collect();
    let at = names
        .iter()
        .position(|n| *n == "envoy.filters.http.ratelimit")
        .expect("the rate limit filter");
    assert_eq!(
        names.last(),
        Some(&"envoy.filters.http.router"),
        "the router ends the chain: {names:?}"
    );
    assert!(at < names.len() - 1);
    let filter = &filters[at]["typed_config"];
    let routes = seq(&manager["route_config"]["virtual_hosts"][0]["routes"]);
    let rate_limits = &routes[0]["route"]["rate_limits"];
    let cluster_name =
        str_of(&filter["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"]);
    let cluster = seq(&envoy["static_resources"]["clusters"])
        .iter()
        .find(|c| c["name"] == cluster_name)
        .unwrap_or_else(|| panic!("no cluster {cluster_name}"));
    RateLimitSetup {
        filter,
        rate_limits,
        cluster,
    }
}

/// The same parts in the Istio EnvoyFilter's patches.
fn istio_setup(envoy_filter: &Value) -> RateLimitSetup<'_> {
    assert_eq!(
        str_of(&envoy_filter["apiVersion"]),
        "networking.istio.io/v1alpha3"
    );
    assert_eq!(str_of(&envoy_filter["kind"]), "EnvoyFilter");
    let patches = seq(&envoy_filter["spec"]["configPatches"]);
    let patch = |apply_to: &str| {
        let patch = patches
            .iter()
            .find(|p| p["applyTo"] == apply_to)
            .unwrap_or_else(|| panic!("no {apply_to} patch"));
        // Inbound: the workload's own sidecar, on requests to it.
        assert_eq!(str_of(&patch["match"]["context"]), "SIDECAR_INBOUND");
        patch
    };
    let http_filter = patch("HTTP_FILTER");
    assert_eq!(str_of(&http_filter["patch"]["operation"]), "INSERT_BEFORE");
    assert_eq!(
        str_of(&http_filter["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"]),
        "envoy.filters.http.router"
    );
    let value = &http_filter["patch"]["value"];
    assert_eq!(str_of(&value["name"]), "envoy.filters.http.ratelimit");
    let virtual_host = patch("VIRTUAL_HOST");
    assert_eq!(str_of(&virtual_host["patch"]["operation"]), "MERGE");
    let cluster = patch("CLUSTER");
    assert_eq!(str_of(&cluster["patch"]["operation"]), "ADD");
    RateLimitSetup {
        filter: &value["typed_config"],
        rate_limits: &virtual_host["patch"]["value"]["rate_limits"],
        cluster: &cluster["patch"]["value"],
    }
}

/// The rule that decides a descriptor with these keys (any values) in `domain`.
fn rule_for<'r>(rules: &'r [RlsRule], domain: &str, keys: &[String]) -> Target<'r> {
    let entries: Vec<(String, String)> = keys
        .iter()
        .map(|k| (k.clone(), "some-value".to_owned()))
        .collect();
    target(rules, domain, &entries)
}

#[test]
fn the_envoy_example_calls_quotad_with_descriptors_its_rules_know() {
    let envoy = read_yaml("examples/envoy/envoy.yaml");
    let setup = envoy_setup(&envoy);
    setup.check_filter();
    setup.check_cluster();
    assert_eq!(setup.domain(), "quotad");
    let keys = setup.descriptor_keys();
    assert_eq!(keys, [vec!["account_id"], vec!["remote_address"]]);

    // The account descriptor is quotad's default rule: no config needed.
    let defaults = Config::default().rls.rules;
    assert!(
        matches!(
            rule_for(&defaults, setup.domain(), &keys[0]),
            Target::Account { .. }
        ),
        "no default rule for {:?} in {defaults:?}",
        keys[0]
    );
    // With the example's quotad.toml, the account keeps its rule and the address is counted.
    let rules = example_config().rls.rules;
    assert!(matches!(
        rule_for(&rules, setup.domain(), &keys[0]),
        Target::Account { .. }
    ));
    match rule_for(&rules, setup.domain(), &keys[1]) {
        Target::Counter { limit, .. } => assert_eq!(limit, 600),
        other => panic!("the address is not counted: {other:?}"),
    }
}

#[test]
fn the_istio_filter_agrees_with_the_envoy_example() {
    let envoy = read_yaml("examples/envoy/envoy.yaml");
    let envoy_filter = read_yaml("examples/istio/envoyfilter.yaml");
    let (plain, istio) = (envoy_setup(&envoy), istio_setup(&envoy_filter));
    istio.check_filter();
    istio.check_cluster();
    assert_eq!(istio.filter, plain.filter, "the same rate limit filter");
    assert_eq!(istio.rate_limits, plain.rate_limits, "the same descriptors");
    assert_eq!(
        istio.cluster["typed_extension_protocol_options"],
        plain.cluster["typed_extension_protocol_options"]
    );
    assert_eq!(
        istio.cluster["connect_timeout"],
        plain.cluster["connect_timeout"]
    );
}

/// The descriptors Envoy builds from the example for a request with `x-account-id: ACCOUNT`
/// from `address`.
fn descriptors_for(account: &str, address: &str) -> Vec<RateLimitDescriptor> {
    let envoy = read_yaml("examples/envoy/envoy.yaml");
    envoy_setup(&envoy)
        .descriptor_keys()
        .into_iter()
        .map(|keys| RateLimitDescriptor {
            entries: keys
                .into_iter()
                .map(|key| {
                    let value = if key == "remote_address" {
                        address
                    } else {
                        account
                    };
                    Entry {
                        value: value.to_owned(),
                        key,
                    }
                })
                .collect(),
            limit: None,
            hits_addend: None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotad_answers_what_the_envoy_example_sends() {
    let server = TestServer::start_with(example_config(), StoreKind::Memory).await;
    let mut rls = RateLimitServiceClient::new(server.channel().await);
    let mut ask = async |account: &str| {
        let request = RateLimitRequest {
            domain: "quotad".into(),
            descriptors: descriptors_for(account, "192.0.2.10"),
            hits_addend: 0,
        };
        rls.should_rate_limit(request).await.unwrap().into_inner()
    };

    let fresh = ask("newcomer").await;
    assert_eq!(fresh.overall_code, Code::Ok as i32, "{fresh:?}");
    let [account, address] = &fresh.statuses[..] else {
        panic!("a status per descriptor: {fresh:?}")
    };
    assert_eq!(account.current_limit.as_ref().unwrap().name, "plan:free");
    assert_eq!(account.limit_remaining, 15, "the free plan's 15 credits");
    let per_address = address.current_limit.as_ref().unwrap();
    assert_eq!(
        (per_address.name.as_str(), per_address.requests_per_unit),
        ("per-address", 600)
    );
    assert_eq!(address.limit_remaining, 599);

    // An account whose plan is used up is over the limit at the edge.
    let mut quota = server.quota().await;
    let reserved = quota
        .reserve(pb::ReserveRequest {
            account_id: "spent".into(),
            request_id: "task-1".into(),
            product: "codex".into(),
            estimate: Some(costing(15)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    quota
        .commit(pb::CommitRequest {
            account_id: "spent".into(),
            reservation_id: reserved.reservation_id,
            usage: Some(costing(15)),
            r#final: true,
        })
        .await
        .unwrap();
    let spent = ask("spent").await;
    assert_eq!(spent.overall_code, Code::OverLimit as i32, "{spent:?}");
    assert_eq!(spent.statuses[0].code, Code::OverLimit as i32);
    // A refused request counts nothing: the address still has the same room.
    assert_eq!(spent.statuses[1].limit_remaining, 598);
}

fn run(command: &mut Command) -> Output {
    let shown = format!("{command:?}");
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

/// The virtualenv for `examples/envoy/check.py`, made once per version of its requirements.
fn check_python() -> PathBuf {
    let requirements = crate_root().join("examples/envoy/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).unwrap();
    support::python::venv(
        &crate_root().join("target/examples-run/envoy-venv"),
        &wanted,
    )
}

#[test]
fn the_examples_read_into_envoys_own_api() {
    let python = check_python();
    let check = crate_root().join("examples/envoy/check.py");
    let out = run(Command::new(&python).arg(&check));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout.matches("ok    ").count(), 4, "{stdout}");

    // The check has teeth: a misspelt field and an unknown typed_config are refused.
    let broken = crate_root().join("target/examples-run/broken");
    std::fs::create_dir_all(&broken).unwrap();
    let envoy = std::fs::read_to_string(crate_root().join("examples/envoy/envoy.yaml")).unwrap();
    let envoy = envoy.replace("failure_mode_deny:", "failure_mode_denied:");
    let istio =
        std::fs::read_to_string(crate_root().join("examples/istio/envoyfilter.yaml")).unwrap();
    let istio = istio.replace("ratelimit.v3.RateLimit\n", "ratelimit.v3.RateLimiter\n");
    std::fs::write(broken.join("envoy.yaml"), envoy).unwrap();
    std::fs::write(broken.join("envoyfilter.yaml"), istio).unwrap();
    let out = run(Command::new(&python)
        .arg(&check)
        .arg(broken.join("envoy.yaml"))
        .arg(broken.join("envoyfilter.yaml")));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("failure_mode_denied"), "{stdout}");
    assert!(stdout.contains("RateLimiter"), "{stdout}");
    assert!(stdout.contains("2 wrong"), "{stdout}");
}
