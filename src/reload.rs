//! Hot reload: the rules (plans, products, limits, auto top-up rules, prices, RLS rules, shadow
//! mode) are read again from the config file on SIGHUP and whenever the file's contents change,
//! and swapped in without a restart (see [`crate::rules`] for what a swap guarantees to calls in
//! flight).
//!
//! The file is polled by content, not watched by inotify: Kubernetes updates a mounted ConfigMap
//! by swapping a symlink to a new directory, which file-change notifications on the old path
//! miss, while reading the path again always sees the current file. A config that does not load
//! or validate is refused whole, with a log line and a metric, and the rules in force stay.
//! Settings that cannot change under a running server (listeners, the store, TLS, tokens, …)
//! are reported as needing a restart when the file changes them, and otherwise left as they are.

use std::collections::BTreeSet;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::config::{Config, ConfigSource};
use crate::metrics::Metrics;
use crate::rules::LiveRules;

/// Top-level config keys whose changes take effect on reload; everything else needs a restart.
/// The Helm chart keeps the same list (its pods roll only for the others).
pub const RELOADABLE: [&str; 8] = [
    "default_plan",
    "plans",
    "products",
    "limits",
    "top_up",
    "pricing",
    "rls",
    "shadow",
];

/// What one look at the config found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// The file's contents are the ones last acted on.
    Unchanged,
    /// The new rules are in force; `restart` lists changed settings that are not.
    Applied {
        changed: Vec<String>,
        restart: Vec<String>,
    },
    /// Nothing that a reload applies changed; `restart` lists what needs a restart.
    NothingToApply { restart: Vec<String> },
    /// The new config does not load or validate; the rules in force stay.
    Refused(String),
}

/// Reads the config again and swaps in its rules.
pub struct Reloader {
    source: ConfigSource,
    live: Arc<LiveRules>,
    metrics: Arc<Metrics>,
    /// The config the server started with: settings that need a restart are compared to it.
    started: Value,
    /// The config whose rules are in force.
    applied: Value,
    /// A digest of the file's contents when it was last acted on.
    seen: Option<u64>,
}

impl Reloader {
    /// `config` is what `source` gave at start, and `live` holds its rules.
    pub fn new(
        source: ConfigSource,
        config: &Config,
        live: Arc<LiveRules>,
        metrics: Arc<Metrics>,
    ) -> Reloader {
        let started = settings(config);
        Reloader {
            seen: source.file.as_deref().and_then(digest),
            source,
            live,
            metrics,
            applied: started.clone(),
            started,
        }
    }

    /// Reloads if the file's contents changed since they were last acted on.
    pub fn check(&mut self) -> Reloaded {
        let now = self.source.file.as_deref().and_then(digest);
        if now == self.seen {
            return Reloaded::Unchanged;
        }
        self.seen = now;
        self.reload()
    }

    /// Reads the config again and applies what changed.
    pub fn reload(&mut self) -> Reloaded {
        let config = match self.source.load() {
            Ok(config) => config,
            Err(e) => {
                self.metrics.config_reload("refused");
                return Reloaded::Refused(e.to_string());
            }
        };
        let new = settings(&config);
        let restart: Vec<String> = differences(&self.started, &new)
            .into_iter()
            .filter(|path| !reloadable(path))
            .collect();
        self.metrics.config_restart_pending(!restart.is_empty());
        let changed: Vec<String> = differences(&self.applied, &new)
            .into_iter()
            .filter(|path| reloadable(path))
            .collect();
        if changed.is_empty() {
            return Reloaded::NothingToApply { restart };
        }
        self.live.replace(config.rules());
        self.applied = new;
        self.metrics.config_reload("applied");
        Reloaded::Applied { changed, restart }
    }

    fn file(&self) -> String {
        self.source
            .file
            .as_deref()
            .map_or_else(|| "the environment".into(), |p| p.display().to_string())
    }

    /// Logs what a look at the config did.
    fn report(&self, outcome: &Reloaded) {
        let file = self.file();
        match outcome {
            Reloaded::Unchanged => {}
            Reloaded::Applied { changed, restart } => {
                tracing::info!(
                    changed = %changed.join(", "),
                    price_version = %self.live.current().pricing.version,
                    "config reloaded from {file}"
                );
                warn_restart(&file, restart);
            }
            Reloaded::NothingToApply { restart } => {
                if restart.is_empty() {
                    tracing::info!("config reloaded from {file}: no rule changed");
                }
                warn_restart(&file, restart);
            }
            Reloaded::Refused(error) => {
                tracing::error!("config reload refused, the rules in force stay: {error}")
            }
        }
    }
}

fn warn_restart(file: &str, restart: &[String]) {
    if !restart.is_empty() {
        tracing::warn!(
            settings = %restart.join(", "),
            "{file} changes settings that take effect only after a restart; they keep their values until then"
        );
    }
}

/// Watches for reasons to reload until `shutdown`: SIGHUP, and the file's contents every
/// `interval` (none: SIGHUP only).
pub async fn watch(
    mut reloader: Reloader,
    interval: Option<Duration>,
    shutdown: impl Future<Output = ()>,
) {
    let mut hangups = hangups();
    let mut ticks = interval.map(|every| {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks
    });
    tokio::pin!(shutdown);
    loop {
        let outcome = tokio::select! {
            () = &mut shutdown => return,
            Some(()) = next_hangup(&mut hangups) => {
                tracing::info!("SIGHUP: reloading the config");
                // The file may be unchanged: SIGHUP reloads anyway (the environment or a
                // token file may have been the point).
                reloader.seen = reloader.source.file.as_deref().and_then(digest);
                reloader.reload()
            }
            _ = tick(&mut ticks) => reloader.check(),
        };
        reloader.report(&outcome);
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = Option<()>;

#[cfg(unix)]
fn hangups() -> Hangups {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP (reload by changing the file): {e}");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangups() -> Hangups {
    None
}

async fn next_hangup(hangups: &mut Hangups) -> Option<()> {
    #[cfg(unix)]
    if let Some(signal) = hangups {
        return signal.recv().await;
    }
    let _ = hangups;
    std::future::pending().await
}

async fn tick(ticks: &mut Option<tokio::time::Interval>) {
    match ticks {
        Some(ticks) => {
            ticks.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// A digest of a file's contents; `None` when it cannot be read (then a reload reports why).
fn digest(path: &std::path::Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut hasher = std::hash::DefaultHasher::new();
    bytes.hash(&mut hasher);
    Some(hasher.finish())
}

/// A config as a tree of settings, to compare key by key (secrets included, so that a changed
/// token is noticed; only key paths are ever logged, never values).
fn settings(config: &Config) -> Value {
    serde_json::to_value(config).unwrap_or(Value::Null)
}

fn reloadable(path: &str) -> bool {
    let top = path.split(['.', '[']).next().unwrap_or(path);
    RELOADABLE.contains(&top)
}

/// The dotted paths of the settings that differ between `old` and `new`: leaves and whole
/// tables that exist on one side only.
fn differences(old: &Value, new: &Value) -> Vec<String> {
    let mut found = BTreeSet::new();
    walk("", old, new, &mut found);
    found.into_iter().collect()
}

fn walk(path: &str, old: &Value, new: &Value, found: &mut BTreeSet<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => walk(&child, x, y, found),
                    _ => {
                        found.insert(child);
                    }
                }
            }
        }
        (a, b) if a != b => {
            found.insert(path.to_owned());
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    struct File(std::path::PathBuf);

    impl File {
        fn new(text: &str) -> File {
            let path =
                std::env::temp_dir().join(format!("quotad-reload-{}.toml", uuid::Uuid::new_v4()));
            let file = File(path);
            file.write(text);
            file
        }

        fn write(&self, text: &str) {
            let mut f = std::fs::File::create(&self.0).unwrap();
            f.write_all(text.as_bytes()).unwrap();
        }
    }

    impl Drop for File {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn reloader(file: &File) -> (Reloader, Arc<LiveRules>) {
        let source = ConfigSource {
            file: Some(file.0.clone()),
            ..ConfigSource::default()
        };
        let config = Config::load_from(Some(&file.0), |_| None, false).unwrap();
        let live = LiveRules::new(config.rules());
        let reloader = Reloader::new(source, &config, live.clone(), Arc::new(Metrics::new()));
        (reloader, live)
    }

    const PLUS_20: &str = "[plans.plus]\nlimit_5h_micros = 20000000\nlimit_weekly_micros = 750000000\noverage = \"credits\"\nupgrade_to = \"pro\"\n";

    #[test]
    fn a_changed_rule_is_applied_and_named() {
        let file = File::new("[pricing]\nversion = \"v1\"\n");
        let (mut reloader, live) = reloader(&file);
        assert_eq!(reloader.check(), Reloaded::Unchanged);
        file.write(&format!("{PLUS_20}[pricing]\nversion = \"v2\"\n"));
        let outcome = reloader.check();
        assert_eq!(
            outcome,
            Reloaded::Applied {
                changed: vec![
                    "plans.plus.limit_5h_micros".into(),
                    "pricing.version".into()
                ],
                restart: vec![],
            }
        );
        let rules = live.current();
        assert_eq!(rules.pricing.version, "v2");
        assert_eq!(
            rules.policy.plan("plus").unwrap().limit_5h_micros,
            20_000_000
        );
        assert_eq!(reloader.check(), Reloaded::Unchanged, "acted on once");
    }

    #[test]
    fn a_bad_file_is_refused_and_the_rules_in_force_stay() {
        let file = File::new("[pricing]\nversion = \"v1\"\n");
        let (mut reloader, live) = reloader(&file);
        let before = live.current();
        file.write("[plans.plus]\nlimit_5h_micros = -5\n");
        assert!(
            matches!(reloader.check(), Reloaded::Refused(e) if e.contains("plans.plus")),
            "the error names the key"
        );
        assert!(Arc::ptr_eq(&before, &live.current()));
        file.write("default_plan = \"nope\"\n");
        assert!(matches!(reloader.check(), Reloaded::Refused(_)));
        assert!(Arc::ptr_eq(&before, &live.current()));
    }

    #[test]
    fn settings_that_need_a_restart_are_named_and_left_alone() {
        let file = File::new("listen = \"127.0.0.1:7000\"\n");
        let (mut reloader, live) = reloader(&file);
        let before = live.current();
        file.write("listen = \"127.0.0.1:7001\"\n[store]\nkind = \"redis\"\n");
        let outcome = reloader.check();
        assert_eq!(
            outcome,
            Reloaded::NothingToApply {
                restart: vec!["listen".into(), "store.kind".into()],
            }
        );
        assert!(Arc::ptr_eq(&before, &live.current()), "nothing swapped");
        // A rule changed beside them is applied; they are still named.
        file.write(&format!(
            "listen = \"127.0.0.1:7001\"\n[store]\nkind = \"redis\"\n{PLUS_20}"
        ));
        match reloader.check() {
            Reloaded::Applied { changed, restart } => {
                assert_eq!(changed, vec!["plans.plus.limit_5h_micros".to_string()]);
                assert_eq!(
                    restart,
                    vec!["listen".to_string(), "store.kind".to_string()]
                );
            }
            other => panic!("{other:?}"),
        }
        // Back to the values the server runs with: nothing pending any more.
        file.write(&format!("listen = \"127.0.0.1:7000\"\n{PLUS_20}"));
        assert_eq!(
            reloader.check(),
            Reloaded::NothingToApply { restart: vec![] }
        );
    }

    #[test]
    fn a_file_swapped_through_a_symlink_is_seen() {
        // How Kubernetes updates a mounted ConfigMap: `quotad.toml -> ..data/quotad.toml`,
        // `..data -> ..v1`, and an update points `..data` at a new directory in one rename.
        let dir = std::env::temp_dir().join(format!("quotad-cm-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("..v1")).unwrap();
        std::fs::create_dir_all(dir.join("..v2")).unwrap();
        std::fs::write(
            dir.join("..v1/quotad.toml"),
            "[pricing]\nversion = \"v1\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("..v2/quotad.toml"),
            "[pricing]\nversion = \"v2\"\n",
        )
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::symlink;
            symlink("..v1", dir.join("..data")).unwrap();
            symlink("..data/quotad.toml", dir.join("quotad.toml")).unwrap();
            let source = ConfigSource {
                file: Some(dir.join("quotad.toml")),
                ..ConfigSource::default()
            };
            let config = source.load().unwrap();
            let live = LiveRules::new(config.rules());
            let mut reloader =
                Reloader::new(source, &config, live.clone(), Arc::new(Metrics::new()));
            symlink("..v2", dir.join("..data_tmp")).unwrap();
            std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
            assert!(matches!(reloader.check(), Reloaded::Applied { .. }));
            assert_eq!(live.current().pricing.version, "v2");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn paths_name_what_differs() {
        let a = serde_json::json!({"a": {"b": 1, "c": [1, 2]}, "d": "x"});
        let b = serde_json::json!({"a": {"b": 2, "c": [1, 2], "e": true}, "d": "x"});
        assert_eq!(
            differences(&a, &b),
            vec!["a.b".to_string(), "a.e".to_string()]
        );
        assert!(reloadable("plans.team"));
        assert!(reloadable("rls.rules"));
        assert!(reloadable("limits.export_max_len"));
        assert!(!reloadable("store.redis.url"));
        assert!(!reloadable("plansx"));
    }
}
