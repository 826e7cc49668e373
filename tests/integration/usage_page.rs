//! The usage page in a real headless Chromium (Debian's `chromium` and `chromium-driver`, over
//! WebDriver), served by a real quotad: a plus account that ran a task onto credits sees both
//! windows, its balance and lots and the charge; turning auto top-up on below the threshold shows
//! the preview first and, once confirmed, buys exactly once; a token for another account sees
//! nothing of this one; support staff open it with the admin token; the page works on a
//! phone-sized window; axe-core (from npm) finds no WCAG 2.1 A or AA violation in any of these
//! states; the console stays clean.
//! Screenshots are saved under the test's target folder (`usage-page/`).

use crate::support;

use std::time::Duration;

use quotad::api::pb;
use quotad::config::Config;
use serde_json::json;
use support::webdriver::Browser;
use support::{CREDIT, TestServer, TestStore};

const KEYS: &str = "k1:0123456789abcdef0123456789abcdef";

async fn mint(server: &TestServer, account: &str, abilities: &[&str]) -> String {
    let request = pb::MintAccountTokenRequest {
        account_id: account.into(),
        abilities: abilities.iter().map(|a| a.to_string()).collect(),
        ttl_seconds: 3_600,
    };
    let minted = server.admin().await.mint_account_token(request).await;
    minted.unwrap().into_inner().token
}

async fn usage(server: &TestServer, account: &str) -> pb::GetUsageResponse {
    let request = pb::GetUsageRequest {
        account_id: account.into(),
        recent_limit: 20,
    };
    server
        .quota()
        .await
        .get_usage(request)
        .await
        .unwrap()
        .into_inner()
}

/// A task of `usage` run to its end: reserved, then committed in full.
async fn task(server: &TestServer, account: &str, id: &str, product: &str, usage: pb::Usage) {
    let mut quota = server.quota().await;
    let reserve = pb::ReserveRequest {
        account_id: account.into(),
        request_id: id.into(),
        product: product.into(),
        estimate: Some(usage.clone()),
        ..Default::default()
    };
    let reserved = quota.reserve(reserve).await.unwrap().into_inner();
    assert_eq!(reserved.decision(), pb::Decision::Allow);
    let commit = pb::CommitRequest {
        account_id: account.into(),
        reservation_id: reserved.reservation_id,
        usage: Some(usage),
        r#final: true,
    };
    quota.commit(commit).await.unwrap();
}

/// axe-core, the accessibility rules engine (from npm, once per target folder).
fn axe() -> String {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("axe");
    let script = dir.join("node_modules/axe-core/axe.min.js");
    if !script.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        support::python::run(
            std::process::Command::new("npm")
                .args([
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--no-save",
                    "axe-core@4.14.1",
                ])
                .current_dir(&dir),
        );
    }
    std::fs::read_to_string(script).unwrap()
}

/// What axe finds against WCAG 2.1 A and AA on the page as it is: `rule: nodes` for each
/// violation (colour contrast, labels, names of controls, landmarks, …).
async fn accessibility_violations(browser: &Browser, axe: &str) -> Vec<String> {
    browser.run(axe, json!([])).await;
    let found = browser
        .run_async(
            "const done = arguments[arguments.length - 1];
             axe.run(document, { runOnly: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] })
               .then(r => done(r.violations.map(v =>
                  v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', '))))
               .catch(e => done(['axe failed: ' + e]));",
            json!([]),
        )
        .await;
    serde_json::from_value(found).unwrap()
}

/// Console entries that are errors.
fn errors(entries: &[(String, String, String)]) -> Vec<&(String, String, String)> {
    entries
        .iter()
        .filter(|(level, ..)| level == "SEVERE")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_sees_their_usage_and_turns_auto_top_up_on_after_a_preview() {
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("usage-page");
    std::fs::create_dir_all(&shots).unwrap();
    let mut config = Config::default();
    config.account_tokens.keys = KEYS.into();
    let server = TestServer::start_with(config, TestStore::Memory).await;
    support::plus_account(&server, "pat").await;
    support::plus_account(&server, "sam").await;
    let grant = pb::GrantCreditsRequest {
        account_id: "pat".into(),
        grant_id: "card-1".into(),
        amount_micros: 20 * CREDIT,
        source: "purchase".into(),
        ..Default::default()
    };
    server.admin().await.grant_credits(grant).await.unwrap();
    // 140 of the plan's 150 credits, then a spreadsheet task of 16: 10 on the plan, 6 on credits.
    task(
        &server,
        "pat",
        "t1",
        "codex",
        support::usage("gpt-5.5", 0, 0, 140_000),
    )
    .await;
    let sheet = support::usage("gpt-5.5", 60_000, 40_000, 8_000);
    task(&server, "pat", "t2", "excel", sheet).await;
    assert_eq!(
        usage(&server, "pat").await.credit_balance_micros,
        14 * CREDIT
    );

    let token = mint(&server, "pat", &["read_usage", "change_top_up"]).await;
    let browser = Browser::start(1280, 1700).await;
    browser
        .open(&format!("{}/usage#token={token}", server.url()))
        .await;
    browser
        .wait_for(
            "the usage",
            "return !document.getElementById('usage').hidden",
        )
        .await;
    let address = browser.run("return location.href", json!([])).await;
    assert!(
        !address.as_str().unwrap().contains("token"),
        "the token leaves the address bar: {address}"
    );

    // Both windows, the balance with its lot and price, and the charge onto credits.
    let windows = browser.text("#windows").await;
    assert!(windows.contains("5-hour window"), "{windows}");
    assert!(windows.contains("150 of 150 credits used"), "{windows}");
    assert!(windows.contains("Weekly limit"), "{windows}");
    assert!(windows.contains("150 of 750 credits used"), "{windows}");
    assert_eq!(browser.text("#balance").await, "14");
    let lots = browser.text("#lots").await;
    assert!(lots.contains("purchase 14 20"), "{lots}");
    assert!(
        browser
            .text("#price")
            .await
            .contains("2500 credits for 100.00 USD"),
        "the price of credits is shown"
    );
    let recent = browser.text("#recent").await;
    assert!(recent.contains("excel"), "{recent}");
    assert!(recent.contains("plan 10 · credits 6"), "{recent}");
    assert!(
        recent.contains("in 60,000 (cached 40,000) · out 8,000"),
        "{recent}"
    );
    assert!(browser.text("#plan").await == "plus");
    browser.screenshot(&shots.join("usage.png")).await;
    let axe = tokio::task::spawn_blocking(axe).await.unwrap();
    let violations = accessibility_violations(&browser, &axe).await;
    assert!(violations.is_empty(), "WCAG violations: {violations:#?}");
    // The checker sees what it should: an input without a label is one.
    browser
        .run(
            "const i = document.createElement('input'); i.id = 'unlabelled';
             document.querySelector('main').appendChild(i);",
            json!([]),
        )
        .await;
    let seen = accessibility_violations(&browser, &axe).await;
    assert!(seen.iter().any(|v| v.starts_with("label")), "{seen:?}");
    browser
        .run("document.getElementById('unlabelled').remove()", json!([]))
        .await;

    // Every input has a label, every control is a button or an input a keyboard reaches.
    let unlabelled = browser
        .run(
            "return [...document.querySelectorAll('input')]
                .filter(i => !document.querySelector(`label[for='${i.id}']`))
                .map(i => i.id)",
            json!([]),
        )
        .await;
    assert_eq!(unlabelled, json!([]), "inputs without a label");

    // Turning auto top-up on below the threshold (14 < 20): the preview comes first.
    browser.click("#top-up-enabled").await;
    browser.type_into("#top-up-threshold", "20").await;
    browser.type_into("#top-up-target", "50").await;
    browser.click("#top-up-review").await;
    browser
        .wait_for(
            "the preview",
            "return !document.getElementById('preview').hidden",
        )
        .await;
    let preview = browser.text("#preview-summary").await;
    assert!(
        preview.contains("below the 20-credit threshold"),
        "{preview}"
    );
    assert!(
        preview.contains("buys 36 credits for 1.44 USD"),
        "{preview}"
    );
    browser.screenshot(&shots.join("preview.png")).await;
    let violations = accessibility_violations(&browser, &axe).await;
    assert!(
        violations.is_empty(),
        "WCAG violations with the preview: {violations:#?}"
    );
    let before = usage(&server, "pat").await;
    assert!(
        !before.auto_top_up.unwrap().enabled,
        "the preview saved nothing"
    );
    assert_eq!(before.lots.len(), 1, "and bought nothing");

    browser.click("#preview-confirm").await;
    browser
        .wait_for(
            "the preview closing",
            "return document.getElementById('preview').hidden",
        )
        .await;
    // The purchase is paid in the background; the page shows it once refreshed.
    let started = std::time::Instant::now();
    loop {
        browser.click("#refresh").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let state = browser.text("#top-up-state").await;
        if state.contains("Last purchase: 36 credits bought") {
            assert!(
                state.starts_with("On: when available credits fall below 20"),
                "{state}"
            );
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{state}");
    }
    assert_eq!(browser.text("#balance").await, "50");
    // Exactly one purchase, now and a moment later.
    for _ in 0..2 {
        let after = usage(&server, "pat").await;
        assert_eq!(after.lots.len(), 2, "one lot bought: {:?}", after.lots);
        assert_eq!(after.credit_balance_micros, 50 * CREDIT);
        assert_eq!(after.ledger.unwrap().granted_micros, 56 * CREDIT);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    browser.screenshot(&shots.join("after-top-up.png")).await;

    // On a phone: the page fits the width (nothing scrolls sideways but the tables).
    browser.resize(390, 844).await;
    let overflow = browser
        .run(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth",
            json!([]),
        )
        .await;
    assert_eq!(overflow, json!(0), "no sideways scrolling on a phone");
    browser.screenshot(&shots.join("phone.png")).await;
    let violations = accessibility_violations(&browser, &axe).await;
    assert!(
        violations.is_empty(),
        "WCAG violations on a phone: {violations:#?}"
    );

    let entries = browser.console().await;
    assert!(errors(&entries).is_empty(), "console errors: {entries:?}");

    // Sam's token opens Sam's account, not Pat's.
    browser.resize(1280, 1000).await;
    let other = mint(&server, "sam", &["read_usage", "change_top_up"]).await;
    browser
        .open(&format!("{}/usage#token={other}&account=pat", server.url()))
        .await;
    browser
        .wait_for(
            "the refusal",
            "return document.getElementById('alert').textContent.length > 0",
        )
        .await;
    let alert = browser.text("#alert").await;
    assert!(alert.contains("does not open account pat"), "{alert}");
    let shown = browser.text("body").await;
    for secret in ["excel", "purchase", "Last purchase", "14", "50 credits"] {
        assert!(
            !shown.contains(secret),
            "{secret:?} of pat shown to sam:\n{shown}"
        );
    }
    browser.screenshot(&shots.join("another-account.png")).await;
    let violations = accessibility_violations(&browser, &axe).await;
    assert!(
        violations.is_empty(),
        "WCAG violations when refused: {violations:#?}"
    );
    // The only error is the refused call itself, as the browser logs a 403.
    let entries = browser.console().await;
    for (_, source, message) in errors(&entries) {
        assert!(
            source == "network" && message.contains("403"),
            "console error: {message}"
        );
    }

    // Support staff open any account with the admin token.
    browser.type_into("#token", support::ADMIN_TOKEN).await;
    browser.type_into("#account", "pat").await;
    browser.click("#sign-in-form button").await;
    browser
        .wait_for(
            "pat's usage",
            "return !document.getElementById('usage').hidden",
        )
        .await;
    assert_eq!(browser.text("#balance").await, "50");
    assert!(browser.text("#alert").await.is_empty());
    let kept = browser
        .run("return sessionStorage.getItem('quotad.token')", json!([]))
        .await;
    assert!(
        kept.as_str().unwrap().starts_with("qat1."),
        "the tab keeps an account token, not the admin token: {kept}"
    );

    // A token that may only read shows the settings but offers no way to change them.
    let reader = mint(&server, "pat", &["read_usage"]).await;
    browser
        .open(&format!("{}/usage#token={reader}", server.url()))
        .await;
    browser
        .wait_for(
            "the read-only settings",
            "return !document.getElementById('top-up-readonly').hidden",
        )
        .await;
    let hidden = browser
        .run(
            "return document.getElementById('top-up-form').hidden",
            json!([]),
        )
        .await;
    assert_eq!(hidden, json!(true), "no form to change auto top-up");
    assert!(browser.text("#top-up-state").await.starts_with("On:"));
    let entries = browser.console().await;
    assert!(errors(&entries).is_empty(), "console errors: {entries:?}");
    server.stop().await;
}
