//! The chart's Grafana dashboard (`helm/quotad/dashboards/quotad.json`) and alerts
//! (`helm/quotad/alerts/quotad.rules.yaml`, which the PrometheusRule template holds) read only
//! series that quotad exports.
//!
//! A real quotad process on a real Redis, paying auto top-ups through a real HTTP billing
//! service, is driven through allowed and denied Reserves, Commits, Releases, a credit grant, an
//! approved top-up (after one failed payment attempt) and a declined one, a Reserve that shadow
//! mode lets through, a config reload refused, then through a Redis outage; its `/metrics` is
//! then scraped. Every selector in every PromQL expression (panel
//! targets, template variable queries, alert expressions) must match at least one scraped sample:
//! the exact series name (a histogram is read through `_bucket`, `_sum` or `_count`, a counter
//! through `_total`), with its `=` and `!=` matchers. Matchers on Grafana variables or the
//! chart's `$namespace` are left out, as are regular-expression matchers. Every label an
//! expression groups by or matches on must exist on a series it selects, unless Prometheus adds
//! it when scraping (`namespace`, `pod`, `job`, …).

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use quotad::api::pb;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use serde_json::Value;
use support::billing::{Answer, billing_service};
use support::process::{Quotad, http_get};
use support::redis::{RedisServer, fresh_prefix};
use support::{ADMIN_TOKEN, CREDIT, costing};

const DASHBOARD: &str = "helm/quotad/dashboards/quotad.json";
const ALERTS: &str = "helm/quotad/alerts/quotad.rules.yaml";

/// Labels Prometheus attaches to every series it scrapes in Kubernetes, not quotad's own.
const TARGET_LABELS: &[&str] = &[
    "namespace",
    "pod",
    "job",
    "instance",
    "service",
    "container",
    "endpoint",
];

/// Grafana's own variables.
const GRAFANA_VARIABLES: &[&str] = &[
    "__rate_interval",
    "__interval",
    "__interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
];

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ------------------------------------------------------------------ PromQL selectors

#[derive(Debug, Clone, PartialEq)]
struct Matcher {
    label: String,
    op: String,
    value: String,
}

#[derive(Debug, Clone, PartialEq)]
struct Selector {
    metric: String,
    matchers: Vec<Matcher>,
}

/// What an expression reads: the selectors of `quotad_…` series, and the labels it groups or
/// joins by (`by`, `without`, `on`, `ignoring`, `group_left`, `group_right`, and the label
/// argument of Grafana's `label_values`).
#[derive(Debug, Default, PartialEq)]
struct Reads {
    selectors: Vec<Selector>,
    labels: BTreeSet<String>,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// A string literal starting at `chars[i]` (a quote): its value and the index after it.
fn string_at(chars: &[char], mut i: usize) -> (String, usize) {
    let quote = chars[i];
    let mut value = String::new();
    i += 1;
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' && quote != '`' && i + 1 < chars.len() {
            i += 1;
            value.push(match chars[i] {
                'n' => '\n',
                c => c,
            });
        } else {
            value.push(chars[i]);
        }
        i += 1;
    }
    (value, i + 1)
}

fn skip_space(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    i
}

/// The matchers between `{` at `chars[i]` and its `}`; and the index after it.
fn matchers_at(chars: &[char], mut i: usize) -> (Vec<Matcher>, usize) {
    let mut matchers = Vec::new();
    i += 1;
    loop {
        i = skip_space(chars, i);
        match chars.get(i) {
            None => return (matchers, i),
            Some('}') => return (matchers, i + 1),
            Some(',') => {
                i += 1;
                continue;
            }
            _ => {}
        }
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        let label: String = chars[start..i].iter().collect();
        i = skip_space(chars, i);
        let op_start = i;
        while i < chars.len() && matches!(chars[i], '=' | '!' | '~') {
            i += 1;
        }
        let op: String = chars[op_start..i].iter().collect();
        i = skip_space(chars, i);
        let value = if matches!(chars.get(i), Some('"' | '\'' | '`')) {
            let (value, next) = string_at(chars, i);
            i = next;
            value
        } else {
            panic!("a matcher without a quoted value after {label}{op}");
        };
        assert!(
            !label.is_empty() && ["=", "!=", "=~", "!~"].contains(&op.as_str()),
            "cannot read the matcher {label:?} {op:?} {value:?}"
        );
        matchers.push(Matcher { label, op, value });
    }
}

/// The label names in a `( … )` list at `chars[i]`; and the index after it.
fn label_list_at(chars: &[char], mut i: usize) -> (Vec<String>, usize) {
    let mut labels = Vec::new();
    i += 1;
    while i < chars.len() && chars[i] != ')' {
        if is_ident_start(chars[i]) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            labels.push(chars[start..i].iter().collect());
        } else {
            i += 1;
        }
    }
    (labels, i + 1)
}

fn reads(expr: &str) -> Reads {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Reads::default();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = string_at(&chars, i).1;
        } else if c == '[' {
            // A range or subquery: [5m], [$__rate_interval], [1h:5m].
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            // A selector with no metric name: its matchers are not a quotad series.
            i = matchers_at(&chars, i).1;
        } else if is_ident_start(c) && (i == 0 || !is_ident(chars[i - 1]) && chars[i - 1] != '$') {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = skip_space(&chars, i);
            if word.starts_with("quotad_") {
                let mut selector = Selector {
                    metric: word,
                    matchers: Vec::new(),
                };
                if chars.get(next) == Some(&'{') {
                    let (matchers, after) = matchers_at(&chars, next);
                    selector.matchers = matchers;
                    i = after;
                }
                out.selectors.push(selector);
            } else if matches!(
                word.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) && chars.get(next) == Some(&'(')
            {
                let (labels, after) = label_list_at(&chars, next);
                out.labels.extend(labels);
                i = after;
            } else if word == "label_values" && chars.get(next) == Some(&'(') {
                // label_values(SELECTOR, LABEL): the last argument is a label.
                let close = (next..chars.len())
                    .rfind(|&j| chars[j] == ')')
                    .unwrap_or(next);
                let args: String = chars[next + 1..close].iter().collect();
                if let Some((_, label)) = args.rsplit_once(',') {
                    out.labels.insert(label.trim().to_owned());
                }
                i = next + 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

// ------------------------------------------------------------------ what the chart queries

/// Every PromQL expression of the dashboard (panel targets and variable queries), labelled by
/// where it is.
fn dashboard_expressions(dashboard: &Value) -> Vec<(String, String)> {
    fn panels<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            if let Some(inner) = panel.get("panels") {
                panels(inner, out);
            }
        }
    }
    let mut all = Vec::new();
    panels(&dashboard["panels"], &mut all);
    let mut exprs = Vec::new();
    for panel in all {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                exprs.push((
                    format!("panel {:?}", panel["title"].as_str().unwrap_or_default()),
                    expr.to_owned(),
                ));
            }
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] == "query" {
            let query = var["query"]
                .get("query")
                .unwrap_or(&var["query"])
                .as_str()
                .unwrap_or_default();
            exprs.push((format!("variable {}", var["name"]), query.to_owned()));
        }
    }
    exprs
}

/// Every alert's expression in the rule file, by alert name.
fn alert_expressions() -> Vec<(String, String)> {
    let rules: serde_norway::Value = serde_norway::from_str(&read(ALERTS)).expect("alerts parse");
    let mut exprs = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("an alerting rule");
            let expr = rule["expr"].as_str().expect("expr");
            exprs.push((format!("alert {name}"), expr.to_owned()));
        }
    }
    exprs
}

/// `$name`, `${name}` and `[[name]]` variables an expression uses.
fn variables(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let name: String = rest
            .trim_start_matches('{')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

#[test]
fn the_dashboard_is_valid_and_every_panel_queries_through_the_datasource_variable() {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    assert!(
        dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "a uid"
    );
    assert!(
        dashboard["title"].as_str().is_some_and(|t| !t.is_empty()),
        "a title"
    );
    // Provisioned dashboards carry no database id.
    assert!(dashboard["id"].is_null(), "id must be null");
    assert!(dashboard["schemaVersion"].is_u64(), "schemaVersion");

    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    let defined: BTreeSet<&str> = vars.iter().filter_map(|v| v["name"].as_str()).collect();
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a Prometheus datasource variable named datasource"
    );
    let through_variable = |where_: &str, ds: &Value| {
        assert_eq!(
            ds["uid"], "${datasource}",
            "{where_}: must query through the datasource variable, not {ds}"
        );
    };

    let mut ids = BTreeSet::new();
    let mut panels = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(panel["id"].as_u64().expect("a panel id")),
            "{title}: id reused"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{title}: wider than the dashboard");
        assert!(
            panel
                .get("panels")
                .is_none_or(|p| p.as_array().unwrap().is_empty()),
            "{title}: panels inside a collapsed row are not checked here"
        );
        if panel["type"] == "row" {
            continue;
        }
        panels += 1;
        assert!(!title.is_empty(), "a panel without a title");
        through_variable(title, &panel["datasource"]);
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert!(!targets.is_empty(), "{title}: no target");
        for target in targets {
            through_variable(title, &target["datasource"]);
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.trim().is_empty(),
                "{title}: a target without an expression"
            );
            assert!(
                !reads(expr).selectors.is_empty(),
                "{title}: reads no quotad series"
            );
        }
    }
    assert!(panels >= 10, "only {panels} panels");
    for (where_, expr) in dashboard_expressions(&dashboard) {
        for var in variables(&expr) {
            assert!(
                defined.contains(var.as_str()) || GRAFANA_VARIABLES.contains(&var.as_str()),
                "{where_}: ${var} is not a variable of the dashboard"
            );
        }
    }
}

#[test]
fn selectors_are_read_from_promql() {
    let r = reads(
        r#"histogram_quantile(0.99, sum by (method, le) (rate(quotad_rpc_duration_seconds_bucket{namespace=~"$namespace", code!="OK"}[$__rate_interval]))) / on (pod) group_left (plan) quotad_store_up and {job="x"}"#,
    );
    assert_eq!(
        r.selectors,
        vec![
            Selector {
                metric: "quotad_rpc_duration_seconds_bucket".into(),
                matchers: vec![
                    Matcher {
                        label: "namespace".into(),
                        op: "=~".into(),
                        value: "$namespace".into()
                    },
                    Matcher {
                        label: "code".into(),
                        op: "!=".into(),
                        value: "OK".into()
                    },
                ],
            },
            Selector {
                metric: "quotad_store_up".into(),
                matchers: vec![],
            },
        ]
    );
    assert_eq!(
        r.labels,
        ["le", "method", "plan", "pod"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    let v = reads(r#"label_values(quotad_store_up{namespace=~"$namespace"}, job)"#);
    assert_eq!(v.selectors[0].metric, "quotad_store_up");
    assert!(v.labels.contains("job"));
    // Strings and variables that look like metric names are not selectors.
    assert!(
        reads(r#"sum(x{a="quotad_x"}) + $quotad_y"#)
            .selectors
            .is_empty()
    );
}

// ------------------------------------------------------------------ the scrape

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
}

/// The samples of a Prometheus text exposition.
fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let chars: Vec<char> = line.chars().collect();
        let end = chars
            .iter()
            .position(|&c| c == '{' || c == ' ')
            .unwrap_or(chars.len());
        let name: String = chars[..end].iter().collect();
        let mut labels = BTreeMap::new();
        if chars.get(end) == Some(&'{') {
            for m in matchers_at(&chars, end).0 {
                labels.insert(m.label, m.value);
            }
        }
        out.push(Sample { name, labels });
    }
    out
}

fn matches(selector: &Selector, sample: &Sample) -> bool {
    sample.name == selector.metric
        && selector.matchers.iter().all(|m| {
            let value = sample.labels.get(&m.label).map_or("", String::as_str);
            match m.op.as_str() {
                _ if m.value.contains('$') => true,
                "=" => value == m.value,
                "!=" => value != m.value,
                _ => true, // regular expressions: not checked
            }
        })
}

/// Why `expr` reads something the scrape does not have (empty: it does not).
fn unmatched(expr: &str, scraped: &[Sample]) -> Vec<String> {
    let read = reads(expr);
    let mut problems = Vec::new();
    for selector in &read.selectors {
        if !scraped.iter().any(|s| matches(selector, s)) {
            let same_name: BTreeSet<String> = scraped
                .iter()
                .filter(|s| s.name == selector.metric)
                .map(|s| format!("{:?}", s.labels))
                .collect();
            problems.push(if same_name.is_empty() {
                format!("no series named {}", selector.metric)
            } else {
                format!(
                    "no {} series matches {:?}; there are {same_name:?}",
                    selector.metric, selector.matchers
                )
            });
        }
    }
    let mut used: BTreeSet<&str> = read.labels.iter().map(String::as_str).collect();
    for selector in &read.selectors {
        used.extend(selector.matchers.iter().map(|m| m.label.as_str()));
    }
    for label in used {
        if TARGET_LABELS.contains(&label) {
            continue;
        }
        let has = scraped.iter().any(|s| {
            read.selectors.iter().any(|sel| sel.metric == s.name) && s.labels.contains_key(label)
        });
        if !has {
            problems.push(format!("no series it reads has the label {label}"));
        }
    }
    problems
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: not within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn last_top_up(q: &mut support::QuotaClient, account: &str) -> Option<pb::TopUpOutcome> {
    let usage = q
        .get_usage(pb::GetUsageRequest {
            account_id: account.into(),
            recent_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    usage
        .auto_top_up
        .and_then(|t| t.last_attempt)
        .map(|a| a.outcome())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_the_dashboard_and_alerts_read_is_exported() {
    let mut redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let (billing_url, billing) = billing_service().await;
    let env: Vec<(String, String)> = vec![
        ("QUOTAD_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
        ("QUOTAD_STORE__KIND".into(), "redis".into()),
        ("QUOTAD_REDIS_URL".into(), redis.url()),
        ("QUOTAD_STORE__REDIS__KEY_PREFIX".into(), fresh_prefix()),
        // An outage shows as errors quickly.
        (
            "QUOTAD_STORE__REDIS__COMMAND_TIMEOUT_MS".into(),
            "300".into(),
        ),
        ("QUOTAD_PAYMENTS__PROVIDER".into(), "http".into()),
        ("QUOTAD_PAYMENTS__HTTP_URL".into(), billing_url),
        ("QUOTAD_PAYMENTS__RETRY_FIRST_DELAY_MS".into(), "10".into()),
    ];
    // A config file with the go plan in shadow mode (for the shadow-denial series); it is
    // broken later on to see a reload refused.
    let dir = std::env::temp_dir().join(format!("quotad-dashboards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("quotad.toml");
    std::fs::write(&file, "[plans.go]\nshadow = true\n").unwrap();
    let config_arg = file.to_str().unwrap().to_owned();
    let quotad = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Quotad::start(&["--config", &config_arg], &env)
    })
    .await
    .unwrap();
    let mut q = QuotaServiceClient::connect(quotad.url()).await.unwrap();
    let mut admin = support::admin_client(&quotad.url()).await;

    // Reserves allowed and denied; a commit and a release.
    let reserve = |account: &str, request: &str, credits: u64| pb::ReserveRequest {
        account_id: account.into(),
        request_id: request.into(),
        product: "codex".into(),
        estimate: Some(costing(credits)),
        ..Default::default()
    };
    let committed = q.reserve(reserve("a", "r1", 1)).await.unwrap().into_inner();
    assert_eq!(committed.decision(), pb::Decision::Allow);
    q.commit(pb::CommitRequest {
        account_id: "a".into(),
        reservation_id: committed.reservation_id,
        usage: Some(costing(1)),
        r#final: true,
    })
    .await
    .unwrap();
    let released = q.reserve(reserve("a", "r2", 1)).await.unwrap().into_inner();
    q.release(pb::ReleaseRequest {
        account_id: "a".into(),
        reservation_id: released.reservation_id,
    })
    .await
    .unwrap();
    let denied = q
        .reserve(reserve("a", "r3", 10_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(denied.decision(), pb::Decision::Deny, "{denied:?}");
    // Shadow mode lets an over-limit go account through.
    let shadowed = q
        .reserve(pb::ReserveRequest {
            plan_hint: "go".into(),
            ..reserve("g", "s1", 10_000)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(shadowed.shadow_denial.is_some(), "{shadowed:?}");
    // A config change that does not validate: refused, and counted.
    std::fs::write(&file, "default_plan = \"nope\"\n").unwrap();
    quotad.signal("HUP");
    let http = quotad.http_addr.clone();
    wait_for("a refused reload in the metrics", async || {
        http_get(&http, "/metrics")
            .await
            .1
            .contains(r#"quotad_config_reloads_total{outcome="refused"}"#)
    })
    .await;
    // An answer that is not OK.
    let unknown = pb::ReleaseRequest {
        account_id: "a".into(),
        reservation_id: "rsv_none".into(),
    };
    assert!(q.release(unknown).await.is_err());

    // A grant, and auto top-ups: one paid after a failed attempt, one declined.
    admin
        .grant_credits(pb::GrantCreditsRequest {
            account_id: "a".into(),
            grant_id: "g1".into(),
            amount_micros: 5 * CREDIT,
            source: "promo".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    billing.answers(&[Answer::ServerError, Answer::Approve]);
    for (account, wanted) in [
        ("paid", pb::TopUpOutcome::Succeeded),
        ("declined", pb::TopUpOutcome::Declined),
    ] {
        if wanted == pb::TopUpOutcome::Declined {
            billing.answers(&[Answer::Decline]);
        }
        let account_row = pb::Account {
            account_id: account.into(),
            plan: "pro".into(),
            credit_purchase_allowed: true,
        };
        admin
            .upsert_account(pb::UpsertAccountRequest {
                account: Some(account_row),
            })
            .await
            .unwrap();
        admin
            .set_auto_top_up(pb::SetAutoTopUpRequest {
                account_id: account.into(),
                enabled: true,
                threshold_micros: 10 * CREDIT,
                target_micros: 40 * CREDIT,
                monthly_cap_micros: 0,
            })
            .await
            .unwrap();
        let q = &mut q;
        wait_for(&format!("top-up of {account}"), async || {
            last_top_up(q, account).await == Some(wanted)
        })
        .await;
    }

    // A Redis outage: store errors, the store down, calls failing.
    let _stopped = tokio::task::spawn_blocking(move || {
        redis.kill();
        redis
    })
    .await
    .unwrap();
    let mut text = String::new();
    wait_for("the outage in the metrics", async || {
        let _ = q.reserve(reserve("a", "r4", 1)).await;
        text = http_get(&http, "/metrics").await.1;
        text.lines().any(|l| l == "quotad_store_up 0")
            && text.contains("quotad_store_errors_total{")
    })
    .await;

    let scraped = samples(&text);
    // The approved top-up's 40 credits count as granted, beside the admin's 5 promo credits.
    for granted in [
        r#"quotad_credits_granted_micros_total{source="auto_top_up"} 40000000"#,
        r#"quotad_credits_granted_micros_total{source="promo"} 5000000"#,
    ] {
        assert!(
            text.lines().any(|l| l == granted),
            "{granted} missing:\n{text}"
        );
    }
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard JSON");
    let mut exprs = dashboard_expressions(&dashboard);
    exprs.extend(alert_expressions());
    assert!(exprs.len() > 20, "too few expressions: {exprs:?}");
    let problems: Vec<String> = exprs
        .iter()
        .flat_map(|(where_, expr)| {
            unmatched(expr, &scraped)
                .into_iter()
                .map(move |p| format!("{where_}: {p}\n    {expr}"))
        })
        .collect();
    assert!(
        problems.is_empty(),
        "the chart reads series quotad does not export:\n{}\n\nscraped:\n{text}",
        problems.join("\n")
    );
    // The deprecated deny-cache counter is on its way out: nothing may rely on it.
    for (where_, expr) in &exprs {
        assert!(
            !expr.contains("deny_cache"),
            "{where_} reads the deny cache counter"
        );
    }
    assert!(billing.seen().len() >= 3, "{:?}", billing.seen());
    let _ = std::fs::remove_dir_all(&dir);
}
