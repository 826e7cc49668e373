//! `quotactl` against a real quotad: human output, `--json`, denials exiting 0, bad input and
//! missing credentials exiting 1 with one line that says what to do; the quota token on
//! QuotaService and Envoy RLS calls; TLS and mTLS; and the words for a wrong address (no
//! scheme, quotad's HTTP port, the wrong scheme for the server's TLS).

use crate::support;

use std::process::{Command, Output};

use quotad::config::StoreKind;
use serde_json::Value;
use support::pki::Pki;
use support::process::Quotad;
use support::{ADMIN_TOKEN, TestServer};

/// Runs quotactl with `args` and `env` added, and none of the caller's quotactl or quotad
/// variables, so each test says everything it means.
async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_quotactl"));
    for (key, _) in std::env::vars() {
        if key.starts_with("QUOTACTL_") || key.starts_with("QUOTAD_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(args).envs(env.iter().copied());
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

async fn quotactl(server: &TestServer, args: &[&str], token: Option<&str>) -> Output {
    let url = server.url();
    let addr = ["--addr", url.as_str()];
    let env: Vec<(&str, &str)> = token
        .map(|t| ("QUOTAD_ADMIN_TOKEN", t))
        .into_iter()
        .collect();
    run(&[&addr[..], args].concat(), &env).await
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_str(&stdout(out)).unwrap()
}

/// A failure's message: exit code 1, one line `error: …` on stderr, nothing on stdout, and no
/// piece of it said twice (as "transport error: transport error" would).
fn failure(out: &Output) -> String {
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let mut lines = err.lines();
    let line = lines.next().unwrap_or_default();
    assert_eq!(lines.next(), None, "one line: {err}");
    let message = line
        .strip_prefix("error: ")
        .unwrap_or_else(|| panic!("starts with `error: `: {err}"));
    let pieces: Vec<&str> = message.split(": ").collect();
    for (i, piece) in pieces.iter().enumerate() {
        assert!(
            !pieces[i + 1..].contains(piece),
            "{piece:?} said twice: {err}"
        );
    }
    assert!(!message.contains("transport error"), "{err}");
    message.to_owned()
}

/// `text` holds every one of `parts`.
#[track_caller]
fn says(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{part:?} missing from: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_user_hits_the_limit_and_a_plus_user_runs_on_credits() {
    let server = TestServer::start(StoreKind::Memory).await;
    // 40k input + 5k output tokens on gpt-5.5: 10 credits of the free plan's 15.
    let task = ["--product", "codex", "--input", "40000", "--output", "5000"];
    let first = json(
        &quotactl(
            &server,
            &[&["--json", "reserve", "alice"][..], &task].concat(),
            None,
        )
        .await,
    );
    assert_eq!(first["decision"], "ALLOW");
    assert_eq!(first["held"]["planMicros"], "10000000");
    let id = first["reservationId"].as_str().unwrap().to_owned();
    let done = stdout(
        &quotactl(
            &server,
            &[
                "commit", "alice", &id, "--input", "40000", "--output", "5000",
            ],
            None,
        )
        .await,
    );
    assert!(
        done.contains("charged  10 credits (plan 10, credits 0)"),
        "{done}"
    );

    let denied = quotactl(&server, &[&["reserve", "alice"][..], &task].concat(), None).await;
    let text = stdout(&denied);
    assert!(text.starts_with("DENY"), "{text}");
    assert!(
        text.contains("action   UPGRADE_PLAN") && text.contains("upgrade  go"),
        "{text}"
    );

    assert!(
        stdout(
            &quotactl(
                &server,
                &["account", "set", "bob", "--plan", "plus"],
                Some(ADMIN_TOKEN)
            )
            .await
        )
        .contains("plan plus")
    );
    let grant = json(
        &quotactl(
            &server,
            &[
                "--json",
                "grant",
                "bob",
                "--credits",
                "25.5",
                "--grant-id",
                "g1",
            ],
            Some(ADMIN_TOKEN),
        )
        .await,
    );
    assert_eq!(grant["creditBalanceMicros"], "25500000");
    // 140 credits of the plan's 150, then a 16-credit spreadsheet task: 10 on the plan, 6 on credits.
    let big = json(
        &quotactl(
            &server,
            &[
                "--json",
                "reserve",
                "bob",
                "--product",
                "codex",
                "--output",
                "140000",
            ],
            None,
        )
        .await,
    );
    let big_id = big["reservationId"].as_str().unwrap().to_owned();
    stdout(
        &quotactl(
            &server,
            &["commit", "bob", &big_id, "--output", "140000"],
            None,
        )
        .await,
    );
    let sheet = [
        "--product",
        "excel",
        "--input",
        "60000",
        "--cached",
        "40000",
        "--output",
        "8000",
    ];
    let split = json(
        &quotactl(
            &server,
            &[&["--json", "reserve", "bob"][..], &sheet].concat(),
            None,
        )
        .await,
    );
    assert_eq!(split["held"]["planMicros"], "10000000");
    assert_eq!(split["held"]["creditMicros"], "6000000");
    let usage = stdout(&quotactl(&server, &["usage", "bob"], None).await);
    assert!(
        usage.contains("balance  25.5 credits") && usage.contains("held 6"),
        "{usage}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_missing_credentials_exit_1_with_a_clear_message() {
    let server = TestServer::start(StoreKind::Memory).await;
    let bad = quotactl(
        &server,
        &["grant", "bob", "--credits", "1.0000001"],
        Some(ADMIN_TOKEN),
    )
    .await;
    says(&failure(&bad), &["--credits", "at most 6 decimal places"]);

    // quotad answers UNAUTHENTICATED; quotactl names where the token goes.
    let anonymous = quotactl(&server, &["account", "get", "bob"], None).await;
    assert_eq!(
        failure(&anonymous),
        "this is an admin call and needs quotad's admin token: pass --token TOKEN or set \
         QUOTAD_ADMIN_TOKEN"
    );
    let wrong = quotactl(&server, &["account", "get", "bob"], Some("not-it")).await;
    says(
        &failure(&wrong),
        &[
            "quotad refused the admin token",
            "--token",
            "QUOTAD_ADMIN_TOKEN",
        ],
    );

    let unknown = quotactl(
        &server,
        &["reserve", "bob", "--product", "chess", "--output", "1"],
        None,
    )
    .await;
    let err = failure(&unknown);
    assert!(
        err.starts_with("INVALID_ARGUMENT: product: unknown product \"chess\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quotad_without_an_admin_token_is_named_as_the_cause() {
    let server = TestServer::start_without_admin_token(StoreKind::Memory).await;
    let refused = quotactl(&server, &["account", "get", "bob"], Some("any")).await;
    says(
        &failure(&refused),
        &[
            "quotad has no admin token configured",
            "admin_token",
            "--token",
            "QUOTAD_ADMIN_TOKEN",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topup_preview_set_show_and_disable() {
    let server = TestServer::start(StoreKind::Memory).await;
    stdout(
        &quotactl(
            &server,
            &["account", "set", "carol", "--plan", "pro"],
            Some(ADMIN_TOKEN),
        )
        .await,
    );
    let preview = [
        "topup",
        "preview",
        "carol",
        "--threshold",
        "10",
        "--target",
        "50.5",
    ];
    let said = stdout(&quotactl(&server, &preview, Some(ADMIN_TOKEN)).await);
    assert_eq!(
        said.trim(),
        "your balance is 0 credits, below the 10-credit threshold: saving buys 51 credits for \
         2.04 USD now with your default payment method"
    );
    let as_json = json(
        &quotactl(
            &server,
            &[&["--json"], &preview[..]].concat(),
            Some(ADMIN_TOKEN),
        )
        .await,
    );
    assert_eq!(as_json["purchaseMicros"], "51000000");
    let shown = json(&quotactl(&server, &["--json", "topup", "show", "carol"], None).await);
    assert_eq!(shown["enabled"], false, "a preview saves nothing");
    let set = stdout(
        &quotactl(
            &server,
            &[
                "topup",
                "set",
                "carol",
                "--threshold",
                "10",
                "--target",
                "50.5",
            ],
            Some(ADMIN_TOKEN),
        )
        .await,
    );
    assert!(
        set.starts_with("auto top-up on: below 10 credits, buy back up to 50.5"),
        "{set}"
    );
    let started = std::time::Instant::now();
    loop {
        let shown = json(&quotactl(&server, &["--json", "topup", "show", "carol"], None).await);
        if shown["lastAttempt"]["outcome"] == "SUCCEEDED" {
            assert_eq!(
                shown["lastAttempt"]["amountMicros"], "51000000",
                "rounded up to whole credits"
            );
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{shown}"
        );
    }
    let off = stdout(&quotactl(&server, &["topup", "disable", "carol"], Some(ADMIN_TOKEN)).await);
    assert!(off.starts_with("auto top-up off"), "{off}");
}

/// `quotactl token` mints an account-scoped token, and quotactl holding it (as its quota
/// token) reads that account and is refused another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_token_from_quotactl_reads_its_account_only() {
    let mut config = quotad::config::Config::default();
    config.account_tokens.keys = "k1:0123456789abcdef0123456789abcdef".into();
    let server = TestServer::start_with(config, StoreKind::Memory).await;
    for account in ["carol", "dave"] {
        let set = ["account", "set", account, "--plan", "plus"];
        stdout(&quotactl(&server, &set, Some(ADMIN_TOKEN)).await);
    }
    let minted = json(
        &quotactl(
            &server,
            &["--json", "token", "carol", "--ttl", "600"],
            Some(ADMIN_TOKEN),
        )
        .await,
    );
    let token = minted["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("qat1.k1."), "{minted}");
    assert!(minted["expiresAt"].is_string(), "{minted}");
    let mine = ["--quota-token", token.as_str(), "usage", "carol"];
    assert!(stdout(&quotactl(&server, &mine, None).await).contains("plus"));
    let theirs = ["--quota-token", token.as_str(), "usage", "dave"];
    let refused = failure(&quotactl(&server, &theirs, None).await);
    assert!(refused.contains("another account"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_export_show_every_charge() {
    let server = TestServer::start(StoreKind::Memory).await;
    for _ in 0..2 {
        let reserved = json(
            &quotactl(
                &server,
                &[
                    "--json",
                    "reserve",
                    "dora",
                    "--product",
                    "codex",
                    "--output",
                    "1000",
                ],
                None,
            )
            .await,
        );
        let id = reserved["reservationId"].as_str().unwrap().to_owned();
        stdout(&quotactl(&server, &["commit", "dora", &id, "--output", "1000"], None).await);
    }
    let history = json(&quotactl(&server, &["--json", "history", "dora"], None).await);
    let events = history["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["eventId"], "dora:2", "newest first");
    assert_eq!(events[0]["usage"]["outputTokens"], "1000");
    let text = stdout(&quotactl(&server, &["history", "dora"], None).await);
    assert!(
        text.contains("dora:1") && text.contains("codex gpt-5.5"),
        "{text}"
    );

    let read = |ack: bool| {
        let mut args = vec!["--json", "export", "read", "--group", "billing"];
        if ack {
            args.push("--ack");
        }
        let server = &server;
        async move { json(&quotactl(server, &args, Some(ADMIN_TOKEN)).await) }
    };
    let first = read(true).await;
    assert_eq!(first["events"].as_array().unwrap().len(), 2);
    assert_eq!(first["ack"]["acknowledged"], "2");
    assert_eq!(first["events"][1]["event"]["eventId"], "dora:2");
    let again = read(false).await;
    assert!(again["events"].as_array().unwrap().is_empty(), "{again}");
    let refused = quotactl(&server, &["export", "read", "--group", "billing"], None).await;
    assert_eq!(refused.status.code(), Some(1));
}

/// `http://HOST:PORT` → `HOST:PORT`.
fn authority(url: &str) -> &str {
    url.split_once("://").unwrap().1
}

fn port(addr: &str) -> &str {
    addr.rsplit_once(':').unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quota_token_goes_on_quota_and_rls_calls_and_wrong_addresses_say_which_to_use() {
    let quotad = Quotad::start(
        &[],
        &[
            ("QUOTAD_QUOTA_TOKEN", "quota-secret"),
            ("QUOTAD_ADMIN_TOKEN", ADMIN_TOKEN),
        ],
    );
    let url = quotad.url();
    let at = |extra: &[&'static str]| -> Vec<String> {
        ["--addr", url.as_str()]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let go = async |args: Vec<String>, env: &[(&str, &str)]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&args, env).await
    };
    let token = [("QUOTAD_QUOTA_TOKEN", "quota-secret")];
    let task = ["--product", "codex", "--output", "1000"];

    // With the token (from the environment, or the flag), QuotaService calls go through.
    let reserved = json(
        &go(
            at(&[&["--json", "reserve", "alice"][..], &task].concat()),
            &token,
        )
        .await,
    );
    assert_eq!(reserved["decision"], "ALLOW", "{reserved}");
    let id = reserved["reservationId"].as_str().unwrap().to_owned();
    let commit = [
        "--addr",
        &url,
        "--quota-token",
        "quota-secret",
        "commit",
        "alice",
        &id,
        "--output",
        "1000",
    ];
    says(&stdout(&run(&commit, &[]).await), &["charged  1 credits"]);
    let usage = stdout(&go(at(&["usage", "alice"]), &token).await);
    says(&usage, &["plan     free", "alice:1"]);

    // Without it, or with a wrong one, the refusal names the option and the variable.
    let anonymous = go(at(&["usage", "alice"]), &[]).await;
    assert_eq!(
        failure(&anonymous),
        "quotad requires its quota token on QuotaService calls: pass --quota-token TOKEN or set \
         QUOTAD_QUOTA_TOKEN"
    );
    let wrong = go(at(&["usage", "alice"]), &[("QUOTAD_QUOTA_TOKEN", "guess")]).await;
    says(
        &failure(&wrong),
        &[
            "quotad refused the quota token",
            "--quota-token",
            "QUOTAD_QUOTA_TOKEN",
        ],
    );
    // The admin token is a different one, on AdminService only.
    let admin = go(at(&["account", "get", "alice"]), &token).await;
    says(
        &failure(&admin),
        &["admin call", "--token", "QUOTAD_ADMIN_TOKEN"],
    );
    let admin = go(
        at(&["--token", ADMIN_TOKEN, "account", "get", "alice"]),
        &token,
    )
    .await;
    says(&stdout(&admin), &["alice: plan free"]);

    // Envoy RLS calls carry the quota token too, in bench as everywhere.
    let rls = [
        "bench",
        "--workload",
        "rls",
        "--requests",
        "50",
        "--warmup",
        "0s",
        "--accounts",
        "20",
        "--connections",
        "2",
        "--concurrency",
        "4",
        "--json",
    ];
    let report = json(&go(at(&rls), &token).await);
    assert_eq!(report["operations"], 50, "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    let refused = go(at(&rls), &[]).await;
    assert_eq!(
        failure(&refused),
        "quotad requires its quota token on Envoy rate limit (RLS) calls: pass --quota-token \
         TOKEN or set QUOTAD_QUOTA_TOKEN"
    );
    let reserves = go(
        at(&["bench", "--workload", "reserve", "--requests", "10"]),
        &[],
    )
    .await;
    says(&failure(&reserves), &["QuotaService", "--quota-token"]);

    // Addresses without a scheme get an example with one.
    let bare = authority(&url);
    let no_scheme = run(&["--addr", bare, "usage", "alice"], &token).await;
    assert_eq!(
        failure(&no_scheme),
        format!(
            "--addr \"{bare}\" has no scheme: use http://{bare} (or https://{bare} when quotad \
             serves TLS)"
        )
    );
    let localhost = format!("localhost:{}", port(bare));
    let no_scheme = run(&["--addr", &localhost, "usage", "alice"], &token).await;
    says(
        &failure(&no_scheme),
        &[&format!("use http://{localhost} (or https://")],
    );

    // quotad's HTTP port names the gRPC port, whatever the scheme used.
    let grpc_port = port(bare);
    for scheme in ["http", "https"] {
        let http_port = format!("{scheme}://{}", quotad.http_addr);
        let wrong_port = run(&["--addr", &http_port, "usage", "alice"], &token).await;
        assert_eq!(
            failure(&wrong_port),
            format!(
                "{} is quotad's HTTP port (metrics and probes); the gRPC port is {grpc_port} \
                 (quotad listens on {bare}): use --addr http://127.0.0.1:{grpc_port}",
                quotad.http_addr
            )
        );
    }

    // https:// to a quotad without TLS.
    let tls_to_plain = run(
        &["--addr", &format!("https://{bare}"), "usage", "alice"],
        &token,
    )
    .await;
    assert_eq!(
        failure(&tls_to_plain),
        format!("quotad at {bare} serves plain gRPC, without TLS: use --addr http://{bare}")
    );

    // Nothing listening.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let refused = run(
        &["--addr", &format!("http://{closed}"), "usage", "alice"],
        &[],
    )
    .await;
    says(
        &failure(&refused),
        &[&format!("cannot connect to {closed}: connection refused")],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotactl_speaks_mtls_and_says_what_a_tls_mismatch_needs() {
    let dir = std::env::temp_dir().join(format!("quotactl-mtls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let (servers, clients, stranger) = (
        Pki::new(&dir, "server-ca"),
        Pki::new(&dir, "client-ca"),
        Pki::new(&dir, "other-ca"),
    );
    let (server_cert, server_key) = servers.issue("quotad", &["localhost", "127.0.0.1"]);
    let (cert, key) = clients.issue("frontend", &["frontend"]);
    let (alien_cert, alien_key) = stranger.issue("alien", &["frontend"]);
    let config = dir.join("quotad.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert_file = {server_cert:?}\nkey_file = {server_key:?}\n\
             client_ca_file = {:?}\n",
            clients.ca_file()
        ),
    )
    .unwrap();
    let quotad = Quotad::start(&["--config", config.to_str().unwrap()], &[]);
    let bare = quotad.addr.clone();
    let https = format!("https://{bare}");
    let ca = servers.ca_file();
    let trusted = ["--addr", &https, "--ca-cert", &ca];

    // The CA, the client certificate and its key from the environment; the CA by flag.
    let identity = [
        ("QUOTACTL_CERT", cert.as_str()),
        ("QUOTACTL_KEY", key.as_str()),
    ];
    let task = [
        "reserve",
        "erin",
        "--product",
        "codex",
        "--output",
        "1000",
        "--json",
    ];
    let reserved = json(&run(&[&trusted[..], &task].concat(), &identity).await);
    assert_eq!(reserved["decision"], "ALLOW", "{reserved}");
    let by_flags = [
        "--addr", &https, "--cert", &cert, "--key", &key, "usage", "erin",
    ];
    says(
        &stdout(&run(&by_flags, &[("QUOTACTL_CA_CERT", ca.as_str())]).await),
        &["plan     free", "hold "],
    );
    // bench connects the same way.
    let bench = [
        "bench",
        "--workload",
        "reserve-commit",
        "--requests",
        "30",
        "--warmup",
        "0s",
        "--accounts",
        "10",
        "--connections",
        "2",
        "--concurrency",
        "4",
        "--json",
    ];
    let report = json(&run(&[&trusted[..], &bench].concat(), &identity).await);
    assert_eq!(report["operations"], 30, "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");

    // No client certificate: quotad requires one; the same for bench.
    let usage = ["usage", "erin"];
    let expected = "quotad requires a client certificate (mTLS): pass --cert FILE --key FILE \
                    (QUOTACTL_CERT, QUOTACTL_KEY), signed by the CA in quotad's \
                    tls.client_ca_file";
    assert_eq!(
        failure(&run(&[&trusted[..], &usage].concat(), &[]).await),
        expected
    );
    assert_eq!(
        failure(&run(&[&trusted[..], &bench].concat(), &[]).await),
        expected
    );
    // One from a CA quotad does not trust.
    let alien = [
        ("QUOTACTL_CERT", alien_cert.as_str()),
        ("QUOTACTL_KEY", alien_key.as_str()),
    ];
    says(
        &failure(&run(&[&trusted[..], &usage].concat(), &alien).await),
        &[
            "quotad refused the client certificate in --cert",
            "tls.client_ca_file",
        ],
    );
    // quotad's certificate checked against another CA.
    let other_ca = stranger.ca_file();
    let untrusted = run(
        &[&["--addr", &https, "--ca-cert", &other_ca][..], &usage].concat(),
        &identity,
    )
    .await;
    assert_eq!(
        failure(&untrusted),
        format!(
            "quotad's certificate is not signed by the CA in --ca-cert ({other_ca}): pass the \
             CA that signed quotad's certificate with --ca-cert"
        )
    );

    // http:// to a quotad that speaks TLS.
    let plain = run(&["--addr", &format!("http://{bare}"), "usage", "erin"], &[]).await;
    assert_eq!(
        failure(&plain),
        format!(
            "quotad at {bare} speaks TLS: use --addr https://{bare} (with --ca-cert FILE when a \
             private CA signed its certificate)"
        )
    );
    // TLS options with an http:// address are a mistake, not ignored.
    let mixed = run(
        &[
            "--addr",
            &format!("http://{bare}"),
            "--ca-cert",
            &ca,
            "usage",
            "erin",
        ],
        &[],
    )
    .await;
    says(
        &failure(&mixed),
        &["--ca-cert", "is for TLS", &format!("use https://{bare}")],
    );
    // The HTTP port of a TLS quotad points at https://.
    let http_port = format!("http://{}", quotad.http_addr);
    says(
        &failure(&run(&["--addr", &http_port, "usage", "erin"], &[]).await),
        &[&format!("use --addr https://127.0.0.1:{}", port(&bare))],
    );
    // Files that are not what their option needs.
    let wrong_file = run(
        &[&["--addr", &https, "--ca-cert", &key][..], &usage].concat(),
        &[],
    )
    .await;
    assert_eq!(
        failure(&wrong_file),
        format!("--ca-cert: {key} holds no PEM certificate")
    );
    let half = run(&[&trusted[..], &["--cert", &cert], &usage].concat(), &[]).await;
    says(&failure(&half), &["--cert needs --key"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_shows_what_the_answer_would_have_been() {
    let config = quotad::config::Config {
        shadow: true,
        ..quotad::config::Config::default()
    };
    let server = TestServer::start_with(config, StoreKind::Memory).await;
    let over = [
        "reserve",
        "sam",
        "--product",
        "codex",
        "--output",
        "100000",
        "--request-id",
        "s1",
    ];
    let text = stdout(&quotactl(&server, &over, None).await);
    says(
        &text,
        &[
            "ALLOW",
            "shadow   would have been DENY: WINDOW_EXHAUSTED UPGRADE_PLAN",
            "Upgrade to go",
        ],
    );
    let value = json(&quotactl(&server, &[&["--json"], &over[..]].concat(), None).await);
    assert_eq!(value["decision"], "ALLOW");
    assert_eq!(
        value["shadowDenial"],
        Value::Null,
        "a retry repeats the ALLOW alone"
    );
    server.stop().await;
}
