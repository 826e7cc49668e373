//! Hot reload under load, with the real binary on each store: a plan's limit and a model's
//! price change in the config file while clients keep calling; no call fails; calls after the
//! reload see the new limit and price, and their usage events carry the new price version;
//! every event's charge is its usage priced on the sheet its version names (a call is priced on
//! one snapshot); a broken file is refused and the rules in force keep serving; a setting that
//! needs a restart is named and left alone. Reloads come from the file being polled (written by
//! rename, as Kubernetes swaps a ConfigMap) and from SIGHUP.

use crate::support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quotad::api::pb::{self, Decision};
use support::process::{Quotad, http_get};
use support::redis::RedisServer;
use support::{ADMIN_TOKEN, CREDIT, QuotaClient, costing, reserve_request};

/// The config before and after: the free plan's 5-hour limit, and gpt-5.5-mini's output price
/// (credits per million tokens; the test's usage is 5,000 output tokens per credit at 200).
fn config(limit_credits: i64, output_credits_per_mtok: i64, version: &str) -> String {
    format!(
        "reload_interval_ms = 100\n\
         [plans.free]\nlimit_5h_micros = {}\nlimit_weekly_micros = 100000000000\n\
         [pricing]\nversion = \"{version}\"\n\
         [pricing.models.\"gpt-5.5-mini\"]\noutput_per_mtok_micros = {}\n",
        limit_credits * CREDIT,
        output_credits_per_mtok * CREDIT
    )
}

/// Replaces the file's contents in one rename, so the poller never reads half a file.
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Until `done` holds of a fresh Reserve's answer (at most 10 s): the reload is seen.
async fn until_reserve(
    q: &mut QuotaClient,
    account: &str,
    done: impl Fn(&pb::ReserveResponse) -> bool,
) -> pb::ReserveResponse {
    let started = Instant::now();
    for i in 0.. {
        let r = q
            .reserve(reserve_request(account, &format!("probe-{i}"), "codex", 1))
            .await
            .unwrap()
            .into_inner();
        if r.decision() == Decision::Allow {
            q.release(pb::ReleaseRequest {
                account_id: account.into(),
                reservation_id: r.reservation_id.clone(),
            })
            .await
            .unwrap();
        }
        if done(&r) {
            return r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not reloaded: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!()
}

/// Clients calling Reserve then a final Commit (or Release) in a loop until told to stop;
/// every error is counted.
fn load(url: String, stop: Arc<AtomicBool>, calls: Arc<AtomicU64>, errors: Arc<AtomicU64>) {
    for worker in 0..6 {
        let (url, stop, calls, errors) = (url.clone(), stop.clone(), calls.clone(), errors.clone());
        tokio::spawn(async move {
            let mut q = QuotaClient::connect(url).await.unwrap();
            let failed = |e: tonic::Status| {
                eprintln!("load call failed: {e}");
                errors.fetch_add(1, Ordering::Relaxed);
            };
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let account = format!("load-{worker}-{}", i % 4);
                calls.fetch_add(1, Ordering::Relaxed);
                let r = match q
                    .reserve(reserve_request(
                        &account,
                        &format!("w{worker}-{i}"),
                        "codex",
                        2,
                    ))
                    .await
                {
                    Ok(r) => r.into_inner(),
                    Err(e) => {
                        failed(e);
                        continue;
                    }
                };
                if r.decision() != Decision::Allow {
                    continue;
                }
                calls.fetch_add(1, Ordering::Relaxed);
                let done = if i.is_multiple_of(5) {
                    q.release(pb::ReleaseRequest {
                        account_id: account.clone(),
                        reservation_id: r.reservation_id,
                    })
                    .await
                    .map(drop)
                } else {
                    q.commit(pb::CommitRequest {
                        account_id: account.clone(),
                        reservation_id: r.reservation_id,
                        usage: Some(costing(1)),
                        r#final: true,
                    })
                    .await
                    .map(drop)
                };
                if let Err(e) = done {
                    failed(e);
                }
            }
        });
    }
}

async fn metric(quotad: &Quotad, line: &str) -> bool {
    let (_, text) = http_get(&quotad.http_addr, "/metrics").await;
    text.lines().any(|l| l == line)
}

/// The value of a series (name and labels as exported), if exported.
async fn metric_value(quotad: &Quotad, series: &str) -> Option<u64> {
    let (_, text) = http_get(&quotad.http_addr, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn reload_under_load(dir: PathBuf, store_args: Vec<String>) {
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("quotad.toml");
    write(&file, &config(1_000, 200, "v1"));
    let mut args = vec!["--config".to_owned(), file.to_str().unwrap().to_owned()];
    args.extend(store_args);
    let quotad = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Quotad::start(&args, &[("QUOTAD_ADMIN_TOKEN", ADMIN_TOKEN)])
    })
    .await
    .unwrap();
    let mut q = QuotaClient::connect(quotad.url()).await.unwrap();
    let before = until_reserve(&mut q, "probe-v1", |_| true).await;
    assert_eq!(before.estimate_micros, CREDIT);
    assert_eq!(before.windows[0].limit_micros, 1_000 * CREDIT);

    let (stop, calls, errors) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    load(quotad.url(), stop.clone(), calls.clone(), errors.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 1. The file changes (seen by polling): a new limit and a doubled price, version v2.
    write(&file, &config(400, 400, "v2"));
    let after = until_reserve(&mut q, "probe-v2", |r| r.estimate_micros == 2 * CREDIT).await;
    assert_eq!(after.windows[0].limit_micros, 400 * CREDIT, "the new limit");
    let r = q
        .reserve(reserve_request("after", "a1", "codex", 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.estimate_micros, 6 * CREDIT, "the new price");
    q.commit(pb::CommitRequest {
        account_id: "after".into(),
        reservation_id: r.reservation_id,
        usage: Some(costing(3)),
        r#final: true,
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 2. A broken file (a limit that is not a number, then a plan that does not exist) is
    // refused, by polling and on SIGHUP; the rules in force keep serving.
    write(&file, "[plans.free]\nlimit_5h_micros = \"lots\"\n");
    quotad.until_printed("config reload refused").await;
    write(&file, "default_plan = \"platinum\"\n");
    quotad.signal("HUP");
    quotad.until_printed("SIGHUP: reloading the config").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(quotad.output().contains("platinum"), "{}", quotad.output());
    let still = until_reserve(&mut q, "probe-broken", |_| true).await;
    assert_eq!(still.estimate_micros, 2 * CREDIT, "still v2 prices");
    assert_eq!(
        still.windows[0].limit_micros,
        400 * CREDIT,
        "still the v2 limit"
    );

    // 3. A setting that needs a restart is named, and the rules beside it still apply.
    write(
        &file,
        &format!(
            "{}[server]\nrequest_timeout_ms = 1500\n",
            config(300, 400, "v3")
        ),
    );
    quotad.until_printed("server.request_timeout_ms").await;
    let v3 = until_reserve(&mut q, "probe-v3", |r| {
        r.windows[0].limit_micros == 300 * CREDIT
    })
    .await;
    assert_eq!(v3.estimate_micros, 2 * CREDIT);

    stop.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(errors.load(Ordering::Relaxed), 0, "no call failed");
    assert!(calls.load(Ordering::Relaxed) > 50, "the load ran");
    // The poller may see the second broken file before the SIGHUP comes, and refuse it too.
    let refused = metric_value(&quotad, r#"quotad_config_reloads_total{outcome="refused"}"#).await;
    assert!(
        matches!(refused, Some(2 | 3)),
        "refused reloads: {refused:?}"
    );
    assert!(
        metric(
            &quotad,
            r#"quotad_config_reloads_total{outcome="applied"} 2"#
        )
        .await
    );
    assert!(metric(&quotad, "quotad_config_restart_pending 1").await);

    // Every event is its usage priced on its own version's sheet: 1 credit of usage cost
    // 1 credit under v1 and 2 credits from v2 on; the version changed under load.
    let mut versions = std::collections::BTreeSet::new();
    for worker in 0..6 {
        for n in 0..4 {
            let usage = q
                .get_usage(pb::GetUsageRequest {
                    account_id: format!("load-{worker}-{n}"),
                    recent_limit: 100,
                })
                .await
                .unwrap()
                .into_inner();
            for event in usage.recent {
                let cost = event
                    .charged
                    .as_ref()
                    .map_or(0, |f| f.plan_micros + f.credit_micros);
                let expected = match event.price_version.as_str() {
                    "v1" => CREDIT,
                    "v2" | "v3" => 2 * CREDIT,
                    other => panic!("unknown price version {other}"),
                };
                assert_eq!(cost, expected, "{event:?}");
                versions.insert(event.price_version);
            }
        }
    }
    assert!(
        versions.contains("v1") && versions.contains("v2"),
        "{versions:?}"
    );
    let after = q
        .get_usage(pb::GetUsageRequest {
            account_id: "after".into(),
            recent_limit: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.recent[0].price_version, "v2");
    let _ = std::fs::remove_dir_all(&dir);
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("quotad-reload-{name}-{}", std::process::id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_reloads_under_load() {
    reload_under_load(scratch("memory"), Vec::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_reloads_under_load() {
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let args = vec![
        "--store".to_owned(),
        "redis".to_owned(),
        "--redis-url".to_owned(),
        redis.url(),
    ];
    reload_under_load(scratch("redis"), args).await;
    drop(redis);
}
