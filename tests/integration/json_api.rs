//! The JSON door over real HTTP/1.1, on both stores: the same walkthrough run through gRPC and
//! through JSON gives the same answers (errors included, as `{code, message, field}` with the
//! documented HTTP status); every route `/openapi.json` lists answers by its schema; a contract
//! fuzz (schemathesis, from PyPI) finds no 5xx and no answer off the schema; and `quotactl
//! --json` prints what the door answers.

use crate::support;

use quotad::api::json::{code_name, http_status};
use quotad::api::pb;
use quotad::config::Config;
use serde_json::{Value, json};
use support::json::{get, post};
use support::{ADMIN_TOKEN, TestServer, on_every_store};

on_every_store!(
    grpc_and_json_give_the_same_answers,
    every_route_the_document_lists_answers_by_its_schema,
);

const KEYS: &str = "k1:0123456789abcdef0123456789abcdef";

fn config() -> Config {
    let mut config = Config::default();
    config.account_tokens.keys = KEYS.into();
    config
}

/// An answer, or an error as the door shows it (`code`, `message`, `field`).
type Outcome = Result<Value, Value>;

fn error_json(status: &tonic::Status) -> Value {
    let mut error = json!({ "code": code_name(status.code()), "message": status.message() });
    if let Some(field) = status.metadata().get("quotad-field") {
        error["field"] = field.to_str().unwrap().into();
    }
    error
}

/// Calls `service`/`method` over gRPC with `body` (read through the proto3 JSON mapping), and
/// shows the answer in the same mapping.
async fn over_grpc(server: &TestServer, service: &str, method: &str, body: Value) -> Outcome {
    macro_rules! call {
        ($client:expr, $call:ident, $request:ident) => {{
            let request: pb::$request =
                serde_json::from_value(body).expect("the step's body is a message");
            match $client.$call(request).await {
                Ok(answer) => Ok(serde_json::to_value(answer.into_inner()).unwrap()),
                Err(status) => Err(error_json(&status)),
            }
        }};
    }
    let mut quota = server.quota().await;
    let mut admin = server.admin().await;
    match (service, method) {
        ("QuotaService", "Reserve") => call!(quota, reserve, ReserveRequest),
        ("QuotaService", "Commit") => call!(quota, commit, CommitRequest),
        ("QuotaService", "Release") => call!(quota, release, ReleaseRequest),
        ("QuotaService", "GetUsage") => call!(quota, get_usage, GetUsageRequest),
        ("AdminService", "UpsertAccount") => call!(admin, upsert_account, UpsertAccountRequest),
        ("AdminService", "GetAccount") => call!(admin, get_account, GetAccountRequest),
        ("AdminService", "GrantCredits") => call!(admin, grant_credits, GrantCreditsRequest),
        ("AdminService", "RevokeGrant") => call!(admin, revoke_grant, RevokeGrantRequest),
        ("AdminService", "SetAutoTopUp") => call!(admin, set_auto_top_up, SetAutoTopUpRequest),
        ("AdminService", "PreviewAutoTopUp") => {
            call!(admin, preview_auto_top_up, SetAutoTopUpRequest)
        }
        ("AdminService", "MintAccountToken") => {
            call!(admin, mint_account_token, MintAccountTokenRequest)
        }
        ("AdminService", "ReadUsageExport") => {
            call!(admin, read_usage_export, ReadUsageExportRequest)
        }
        ("AdminService", "AckUsageExport") => call!(admin, ack_usage_export, AckUsageExportRequest),
        _ => panic!("no such call {service}.{method}"),
    }
}

/// Calls `service`/`method` on the JSON door, checking an error's shape and HTTP status.
async fn over_json(server: &TestServer, service: &str, method: &str, body: Value) -> Outcome {
    let token = (service == "AdminService").then_some(ADMIN_TOKEN);
    let path = format!("/v1/{service}/{method}");
    let answer = post(&server.url(), &path, token, &body).await;
    let kind = answer.headers.get("content-type").unwrap();
    assert_eq!(kind, "application/json");
    if answer.status == 200 {
        return Ok(answer.body);
    }
    let error = answer.body;
    let keys: Vec<&String> = error.as_object().unwrap().keys().collect();
    assert!(
        keys.iter()
            .all(|k| ["code", "message", "field"].contains(&k.as_str())),
        "{error}"
    );
    let code = (0..=16)
        .map(tonic::Code::from_i32)
        .find(|c| code_name(*c) == error["code"])
        .unwrap_or_else(|| panic!("an unknown code in {error}"));
    assert_eq!(answer.status, http_status(code).as_u16(), "{error}");
    Err(error)
}

/// An answer with what differs between two accounts by construction made equal: the account
/// id, generated reservation ids, and the signed token.
fn masked(outcome: &Outcome, account: &str) -> Outcome {
    fn mask(value: &Value, account: &str, key: &str) -> Value {
        match value {
            Value::String(_) if key == "token" => "TOKEN".into(),
            Value::String(s) => {
                let s = s.replace(account, "ACCOUNT");
                match s.find("rsv_") {
                    Some(at) => format!("{}rsv_ID", &s[..at]).into(),
                    None => s.into(),
                }
            }
            Value::Array(items) => items.iter().map(|v| mask(v, account, key)).collect(),
            Value::Object(map) => map
                .iter()
                .map(|(k, v)| (k.clone(), mask(v, account, k)))
                .collect(),
            other => other.clone(),
        }
    }
    match outcome {
        Ok(v) => Ok(mask(v, account, "")),
        Err(v) => Err(mask(v, account, "")),
    }
}

/// One way through the door: the answers so far, and the reservations their Reserves made.
struct Walk<'a> {
    server: &'a TestServer,
    json: bool,
    outcomes: Vec<(String, Outcome)>,
    reservations: Vec<String>,
}

impl Walk<'_> {
    async fn call(&mut self, service: &str, method: &str, body: Value) {
        let outcome = if self.json {
            over_json(self.server, service, method, body).await
        } else {
            over_grpc(self.server, service, method, body).await
        };
        if let (Ok(answer), "Reserve") = (&outcome, method) {
            let id = answer["reservationId"].as_str().unwrap().to_owned();
            if !self.reservations.contains(&id) {
                self.reservations.push(id);
            }
        }
        self.outcomes.push((format!("{service}.{method}"), outcome));
    }
}

/// The walkthrough: an account is made, gets credits, runs tasks onto them, is read, previews and
/// sets auto top-up, has a grant revoked and a token minted; wrong calls on the way.
async fn walkthrough(server: &TestServer, json: bool, account: &str) -> Vec<(String, Outcome)> {
    let codex_big = json!({ "model": "gpt-5.5", "outputTokens": "140000" });
    let sheet = json!({
        "model": "gpt-5.5", "inputTokens": "60000", "cachedInputTokens": "40000",
        "outputTokens": "8000"
    });
    let small = json!({ "model": "gpt-5.5", "outputTokens": "1000" });
    let mut walk = Walk {
        server,
        json,
        outcomes: Vec::new(),
        reservations: Vec::new(),
    };
    let upsert = json!({ "account": { "accountId": account, "plan": "plus", "creditPurchaseAllowed": true } });
    walk.call("AdminService", "UpsertAccount", upsert).await;
    let grant = json!({ "accountId": account, "grantId": "g1", "amountMicros": "20000000", "source": "purchase" });
    walk.call("AdminService", "GrantCredits", grant).await;
    let big = json!({ "accountId": account, "requestId": "r1", "product": "codex", "estimate": codex_big });
    walk.call("QuotaService", "Reserve", big.clone()).await;
    let commit = json!({ "accountId": account, "reservationId": walk.reservations[0], "usage": codex_big, "final": true });
    walk.call("QuotaService", "Commit", commit).await;
    // The same request id again: the first answer, not a second reservation.
    walk.call("QuotaService", "Reserve", big).await;
    assert_eq!(walk.reservations.len(), 1, "a retry reserves nothing new");
    // 10 credits left on the plan's window, 6 onto credits.
    let spill =
        json!({ "accountId": account, "requestId": "r2", "product": "excel", "estimate": sheet });
    walk.call("QuotaService", "Reserve", spill).await;
    let commit = json!({ "accountId": account, "reservationId": walk.reservations[1], "usage": sheet, "final": true });
    walk.call("QuotaService", "Commit", commit).await;
    let cancelled =
        json!({ "accountId": account, "requestId": "r3", "product": "codex", "estimate": small });
    walk.call("QuotaService", "Reserve", cancelled).await;
    let release = json!({ "accountId": account, "reservationId": walk.reservations[2] });
    walk.call("QuotaService", "Release", release).await;

    let top_up = json!({
        "accountId": account, "enabled": true, "thresholdMicros": "5000000",
        "targetMicros": "30000000"
    });
    let usage = json!({ "accountId": account, "recentLimit": 10 });
    let rest: Vec<(&str, &str, Value)> = vec![
        ("QuotaService", "GetUsage", usage.clone()),
        ("AdminService", "PreviewAutoTopUp", top_up.clone()),
        ("AdminService", "SetAutoTopUp", top_up),
        (
            "AdminService",
            "GetAccount",
            json!({ "accountId": account }),
        ),
        (
            "AdminService",
            "RevokeGrant",
            json!({ "accountId": account, "grantId": "g1" }),
        ),
        (
            "AdminService",
            "MintAccountToken",
            json!({ "accountId": account, "abilities": ["read_usage"], "ttlSeconds": 600 }),
        ),
        ("QuotaService", "GetUsage", usage),
        // Wrong calls: each error the same both ways.
        (
            "QuotaService",
            "Reserve",
            json!({ "accountId": account, "requestId": "r9", "product": "nope", "estimate": small }),
        ),
        (
            "QuotaService",
            "Reserve",
            json!({ "accountId": account, "requestId": "r1", "product": "excel", "estimate": small }),
        ),
        (
            "QuotaService",
            "Commit",
            json!({ "accountId": account, "reservationId": "rsv_unknown", "usage": small, "final": true }),
        ),
        (
            "AdminService",
            "GetAccount",
            json!({ "accountId": format!("{account}-nobody") }),
        ),
        (
            "AdminService",
            "GrantCredits",
            json!({ "accountId": account, "grantId": "g2", "amountMicros": "-5" }),
        ),
        (
            "AdminService",
            "MintAccountToken",
            json!({ "accountId": account, "abilities": ["everything"] }),
        ),
    ];
    for (service, method, body) in rest {
        walk.call(service, method, body).await;
    }
    walk.outcomes
}

async fn grpc_and_json_give_the_same_answers(store: support::TestStore) {
    let server = TestServer::start_with(config(), store).await;
    let by_grpc = walkthrough(&server, false, "walk-grpc").await;
    let by_json = walkthrough(&server, true, "walk-json").await;
    assert_eq!(by_grpc.len(), by_json.len());
    let mut errors = 0;
    for ((step, grpc), (_, json)) in by_grpc.iter().zip(&by_json) {
        assert_eq!(
            masked(grpc, "walk-grpc"),
            masked(json, "walk-json"),
            "{step} answered differently"
        );
        errors += usize::from(json.is_err());
    }
    assert_eq!(errors, 6, "every wrong call, and only those, failed");

    // The errors as documented: code, message, and the field when the input was wrong.
    let errors: Vec<&Value> = by_json
        .iter()
        .filter_map(|(_, o)| o.as_ref().err())
        .collect();
    assert_eq!(errors[0]["code"], "INVALID_ARGUMENT");
    assert_eq!(errors[0]["field"], "product");
    assert!(
        errors[0]["message"].as_str().unwrap().contains("codex"),
        "{}",
        errors[0]
    );
    assert_eq!(errors[1]["code"], "ALREADY_EXISTS");
    assert_eq!(errors[3]["code"], "NOT_FOUND");
    assert_eq!(errors[4]["field"], "amount_micros");
    assert_eq!(errors[5]["field"], "abilities");

    // The charge onto credits is in the usage both ways.
    let usage = &by_json
        .iter()
        .find(|(step, _)| step == "QuotaService.GetUsage")
        .unwrap()
        .1;
    let usage = usage.as_ref().unwrap();
    assert_eq!(usage["ledger"]["spentMicros"], "6000000", "{usage}");
    assert_eq!(usage["recent"].as_array().unwrap().len(), 2, "{usage}");
    // Instants as the mapping writes them: RFC 3339 in UTC with a `Z`.
    let at = usage["recent"][0]["at"].as_str().unwrap();
    let expires = usage["lots"][0]["expiresAt"].as_str().unwrap();
    for instant in [at, expires] {
        assert!(
            instant.len() >= 20 && instant.ends_with('Z') && instant.as_bytes()[10] == b'T',
            "{usage}"
        );
    }

    // The door's own refusals: no token, a wrong method, a body that is no message, another
    // content type, an unknown call.
    let url = server.url();
    let none = post(&url, "/v1/AdminService/GetAccount", None, &json!({})).await;
    assert_eq!(
        (none.status, none.body["code"].as_str()),
        (401, Some("UNAUTHENTICATED"))
    );
    let read = support::json::send(&url, "GET", "/v1/QuotaService/GetUsage", None, None).await;
    assert_eq!(read.status, 405);
    assert_eq!(read.headers.get("allow").unwrap(), "POST");
    let bad = post(
        &url,
        "/v1/QuotaService/GetUsage",
        None,
        &json!({ "accountId": 7 }),
    )
    .await;
    assert_eq!(
        (bad.status, bad.body["field"].as_str()),
        (400, Some("body"))
    );
    let unknown = post(&url, "/v1/QuotaService/Nothing", None, &json!({})).await;
    assert_eq!(
        (unknown.status, unknown.body["code"].as_str()),
        (404, Some("NOT_FOUND"))
    );
    server.stop().await;
}

/// A body for every call, in an order in which each succeeds.
fn route_bodies(
    account: &str,
    reservation: &str,
    delivery_ids: &[Value],
) -> Vec<(&'static str, Value)> {
    let usage = json!({ "model": "gpt-5.5", "outputTokens": "1000" });
    vec![
        (
            "AdminService.UpsertAccount",
            json!({ "account": { "accountId": account, "plan": "plus", "creditPurchaseAllowed": true } }),
        ),
        ("AdminService.GetAccount", json!({ "accountId": account })),
        (
            "AdminService.GrantCredits",
            json!({ "accountId": account, "grantId": "g1", "amountMicros": "3000000" }),
        ),
        (
            "QuotaService.Reserve",
            json!({ "accountId": account, "requestId": "r1", "product": "codex", "estimate": usage }),
        ),
        (
            "QuotaService.Commit",
            json!({ "accountId": account, "reservationId": reservation, "usage": usage, "final": false }),
        ),
        (
            "QuotaService.Release",
            json!({ "accountId": account, "reservationId": reservation }),
        ),
        (
            "QuotaService.GetUsage",
            json!({ "accountId": account, "recentLimit": 5 }),
        ),
        (
            "AdminService.PreviewAutoTopUp",
            json!({ "accountId": account, "enabled": true, "thresholdMicros": "1000000", "targetMicros": "2000000" }),
        ),
        (
            "AdminService.SetAutoTopUp",
            json!({ "accountId": account, "enabled": false, "thresholdMicros": "1000000", "targetMicros": "2000000" }),
        ),
        (
            "AdminService.RevokeGrant",
            json!({ "accountId": account, "grantId": "g1" }),
        ),
        (
            "AdminService.MintAccountToken",
            json!({ "accountId": account, "abilities": ["read_usage", "change_top_up"] }),
        ),
        (
            "AdminService.ReadUsageExport",
            json!({ "group": "door", "consumer": "c1", "maxEvents": 100 }),
        ),
        (
            "AdminService.AckUsageExport",
            json!({ "group": "door", "deliveryIds": delivery_ids }),
        ),
    ]
}

async fn every_route_the_document_lists_answers_by_its_schema(store: support::TestStore) {
    let server = TestServer::start_with(config(), store).await;
    let url = server.url();
    let document = get(&url, "/openapi.json").await;
    assert_eq!(document.status, 200);
    let document = document.body;
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().unwrap();
    let listed: Vec<(String, String)> = paths
        .iter()
        .map(|(path, item)| {
            let op = item["post"]["operationId"].as_str().unwrap().to_owned();
            (op, path.clone())
        })
        .collect();
    let mut table: Vec<&str> = route_bodies("", "", &[])
        .iter()
        .map(|(op, _)| *op)
        .collect();
    let mut ops: Vec<&str> = listed.iter().map(|(op, _)| op.as_str()).collect();
    table.sort_unstable();
    ops.sort_unstable();
    assert_eq!(
        table, ops,
        "the test calls every route the document lists, and no other"
    );

    let mut reservation = String::new();
    let mut deliveries = Vec::new();
    for index in 0..table.len() {
        let (op, body) = route_bodies("door-1", &reservation, &deliveries).remove(index);
        let path = &listed.iter().find(|(o, _)| o == op).unwrap().1;
        let token = op.starts_with("AdminService").then_some(ADMIN_TOKEN);
        let answer = post(&url, path, token, &body).await;
        assert_eq!(answer.status, 200, "{op}: {}", answer.body);
        let operation = &paths[path]["post"];
        let schema_ref =
            &operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"];
        let schema = json!({
            "$ref": schema_ref,
            "components": document["components"],
        });
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap();
        let problems: Vec<String> = validator
            .iter_errors(&answer.body)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(
            problems.is_empty(),
            "{op} answered off its schema: {problems:?}\n{}",
            answer.body
        );
        if op == "QuotaService.Reserve" {
            reservation = answer.body["reservationId"].as_str().unwrap().to_owned();
        }
        if op == "AdminService.ReadUsageExport" {
            deliveries = answer.body["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["deliveryId"].clone())
                .collect();
            assert!(!deliveries.is_empty(), "the commit's charge is exported");
        }
    }

    // An error answers by the document's Error schema.
    let wrong = post(
        &url,
        "/v1/QuotaService/GetUsage",
        None,
        &json!({ "accountId": "" }),
    )
    .await;
    assert_eq!(wrong.status, 400);
    let schema =
        json!({ "$ref": "#/components/schemas/Error", "components": document["components"] });
    assert!(jsonschema::is_valid(&schema, &wrong.body), "{}", wrong.body);
    server.stop().await;
}

/// schemathesis (from PyPI) against the live server: generated and mutated requests for every
/// route, checked for 5xx answers and answers off the schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_fuzz_finds_no_server_error_and_no_answer_off_the_schema() {
    let mut config = config();
    // One token for both services, so the fuzz reaches past authentication everywhere.
    config.quota_token = Some(ADMIN_TOKEN.into());
    let server = TestServer::start_with(config, support::TestStore::Memory).await;
    // Accounts for the generated ids to find now and then.
    for id in ["a", "0", "acct-1"] {
        support::plus_account(&server, id).await;
    }
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("schemathesis");
    let python = tokio::task::spawn_blocking(move || {
        support::python::venv(&root.join("venv"), "schemathesis==4.32.5\n")
    })
    .await
    .unwrap();
    let report = tempfile::tempdir().unwrap();
    let document = format!("{}/openapi.json", server.url());
    let bin = python.parent().unwrap().join("schemathesis");
    let mut fuzz = std::process::Command::new(bin);
    fuzz.args(["run", &document])
        .args(["--header", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,content_type_conformance,status_code_conformance",
        ])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", "40", "--seed", "7", "--workers", "2"])
        .args(["--warnings", "off"])
        .arg("--report-dir")
        .arg(report.path())
        // It keeps a cache in its working directory: there, not in the checkout.
        .current_dir(report.path())
        .env("NO_COLOR", "1");
    let output = tokio::task::spawn_blocking(move || fuzz.output().unwrap())
        .await
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{printed}"
    );
    assert!(printed.contains("13 selected"), "{printed}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotactl_json_prints_what_the_door_answers() {
    let server = TestServer::start_with(config(), support::TestStore::Memory).await;
    support::plus_account(&server, "cli").await;
    let grant = pb::GrantCreditsRequest {
        account_id: "cli".into(),
        grant_id: "g1".into(),
        amount_micros: 2_500_000,
        ..Default::default()
    };
    server.admin().await.grant_credits(grant).await.unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quotactl"))
        .args([
            "--addr",
            &server.url(),
            "--json",
            "usage",
            "cli",
            "--recent",
            "5",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let door = post(
        &server.url(),
        "/v1/QuotaService/GetUsage",
        None,
        &json!({ "accountId": "cli", "recentLimit": 5 }),
    )
    .await;
    assert_eq!(printed, door.body);
    assert_eq!(printed["creditBalanceMicros"], "2500000");
    server.stop().await;
}

/// Over TLS the door answers HTTP/1.1 too (ALPN offers `http/1.1` beside `h2`): Python's
/// standard library, trusting quotad's CA, makes the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_door_answers_https_with_the_grpc_ports_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let servers = support::pki::Pki::new(dir.path(), "server-ca");
    let (cert, key) = servers.issue("quotad", &["localhost", "127.0.0.1"]);
    let mut config = Config::default();
    config.tls.cert_file = Some(cert.into());
    config.tls.key_file = Some(key.into());
    let server = TestServer::start_with(config, support::TestStore::Memory).await;
    let script = r#"
import json, ssl, sys, time, urllib.error, urllib.request
context = ssl.create_default_context(cafile=sys.argv[2])
body = json.dumps({"accountId": "nobody"}).encode()
for attempt in range(200):
    request = urllib.request.Request(sys.argv[1] + "/v1/QuotaService/GetUsage", data=body,
                                     headers={"content-type": "application/json"})
    try:
        urllib.request.urlopen(request, context=context)
        sys.exit("an unknown account was found")
    except urllib.error.HTTPError as e:
        answer = json.load(e)
        if e.code == 503:  # still starting
            time.sleep(0.05)
            continue
        print(e.code, answer["code"])
        break
page = urllib.request.urlopen(sys.argv[1] + "/usage", context=context)
print(page.status, page.headers["content-type"])
"#;
    let url = format!("https://localhost:{}", server.addr.port());
    let ca = servers.ca_file();
    let output = tokio::task::spawn_blocking(move || {
        support::python::run(std::process::Command::new("python3").args(["-c", script, &url, &ca]))
    })
    .await
    .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        printed.lines().collect::<Vec<_>>(),
        ["404 NOT_FOUND", "200 text/html; charset=utf-8"],
        "{printed}"
    );
    server.stop().await;
}
