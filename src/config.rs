//! quotad's configuration, in layers: compiled defaults ← TOML file ← `QUOTAD_*` environment
//! ← command-line flags. Nested keys use `__` in the environment (`QUOTAD_LIMITS__MAX_TTL_SECONDS`).
//!
//! A config is validated as a whole before anything starts, so a typo or an inconsistent value
//! stops quotad with a message naming the key, never a half-working server. Secrets are never
//! printed: [`Config::redacted`] is what `quotad config` shows.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::domain::top_up::TopUpRules;
use crate::domain::{Limits, Plan, Policy, PriceSheet, Product};

/// Environment variables that configure quotad start with this.
pub const ENV_PREFIX: &str = "QUOTAD_";
/// The QuotaService token is read verbatim from this variable.
pub const QUOTA_TOKEN_ENV: &str = "QUOTAD_QUOTA_TOKEN";
/// Account token signing keys, read verbatim (they are secrets).
pub const ACCOUNT_TOKEN_KEYS_ENV: &str = "QUOTAD_ACCOUNT_TOKEN_KEYS";
/// A Redis password read verbatim from this variable is put into the Redis URL(s), so that it
/// can come from a Kubernetes Secret while the URL stays in the config.
pub const REDIS_PASSWORD_ENV: &str = "QUOTAD_REDIS_PASSWORD";
/// The admin token is read verbatim from this variable (it is never parsed as TOML).
pub const ADMIN_TOKEN_ENV: &str = "QUOTAD_ADMIN_TOKEN";
/// The billing service's bearer token is read verbatim from this variable.
pub const PAYMENTS_TOKEN_ENV: &str = "QUOTAD_PAYMENTS_TOKEN";
/// The secret that signs requests to the billing service is read verbatim from this variable.
pub const PAYMENTS_HMAC_SECRET_ENV: &str = "QUOTAD_PAYMENTS_HMAC_SECRET";
/// The secret that signs notification webhooks is read verbatim from this variable.
pub const NOTIFICATIONS_HMAC_SECRET_ENV: &str = "QUOTAD_NOTIFICATIONS_HMAC_SECRET";
/// The Redis URL is read verbatim from this variable (it may carry a password).
pub const REDIS_URL_ENV: &str = "QUOTAD_REDIS_URL";
const REDACTED: &str = "<redacted>";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(String),
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// In-process state; nothing shared or persisted.
    #[default]
    Memory,
    /// Redis or Redis Cluster, shared by every replica.
    Redis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// Where the memory store keeps what it decides (an embedded database, created if
    /// missing); unset, nothing survives a restart. One quotad process per data dir. Also
    /// `--data-dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    pub embedded: EmbeddedConfig,
    pub redis: RedisConfig,
}

/// `[store.embedded]`: how the memory store writes to its data dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Decisions queued and not yet on disk past which calls get UNAVAILABLE (before deciding
    /// anything): the bound on memory when the disk cannot keep up.
    pub max_unflushed: usize,
    /// Longest a call waits for its batch to reach the disk before UNAVAILABLE (the decision
    /// stands; a retry with the same request id gets its answer). On Redis, also the longest a
    /// call waits for its account's partition to arrive at its new owner.
    pub write_timeout_ms: u64,
    /// An account unused this long leaves memory once its changes are on disk, and is read
    /// back on its next use.
    pub evict_idle_seconds: u64,
    /// The embedded database's block cache, in MiB.
    pub cache_mb: u64,
    /// Each commit log segment, in MiB. The log holds about three of them on disk, and a start
    /// replays at most about two.
    pub log_segment_mb: u64,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        let defaults = crate::store::DataDirSettings::new("");
        EmbeddedConfig {
            max_unflushed: defaults.max_unflushed,
            write_timeout_ms: defaults.write_timeout.as_millis() as u64,
            evict_idle_seconds: defaults.evict_idle.as_secs(),
            cache_mb: defaults.cache_bytes >> 20,
            log_segment_mb: defaults.log_segment_bytes >> 20,
        }
    }
}

impl StoreConfig {
    /// The data dir and how to write it, if one is set.
    pub fn data_dir(&self) -> Option<crate::store::DataDirSettings> {
        let path = self.data_dir.as_ref()?;
        let embedded = &self.embedded;
        Some(crate::store::DataDirSettings {
            path: path.clone(),
            max_unflushed: embedded.max_unflushed,
            write_timeout: std::time::Duration::from_millis(embedded.write_timeout_ms),
            evict_idle: std::time::Duration::from_secs(embedded.evict_idle_seconds),
            cache_bytes: embedded.cache_mb << 20,
            log_segment_bytes: embedded.log_segment_mb << 20,
        })
    }

    /// How the Redis engine owns partitions and writes to Redis.
    pub fn owned(&self) -> crate::store::OwnedSettings {
        let embedded = &self.embedded;
        crate::store::OwnedSettings {
            partitions: self.redis.partitions,
            lease: std::time::Duration::from_millis(self.redis.lease_ms),
            max_unflushed: embedded.max_unflushed,
            write_timeout: std::time::Duration::from_millis(embedded.write_timeout_ms),
            evict_idle: std::time::Duration::from_secs(embedded.evict_idle_seconds),
            advertise: self.redis.advertise_addr.clone(),
            outage_grace: std::time::Duration::from_millis(self.redis.outage_grace_ms),
            outage_credit_allowance: self.redis.outage_credit_allowance,
            journal_dir: self.redis.journal_dir.clone(),
        }
    }

    fn validate(&self) -> Result<(), String> {
        let embedded = &self.embedded;
        for (key, value) in [
            ("max_unflushed", embedded.max_unflushed as u64),
            ("write_timeout_ms", embedded.write_timeout_ms),
            ("evict_idle_seconds", embedded.evict_idle_seconds),
            ("cache_mb", embedded.cache_mb),
            ("log_segment_mb", embedded.log_segment_mb),
        ] {
            if value == 0 {
                return Err(format!("store.embedded.{key} must be greater than 0"));
            }
        }
        if self.kind == StoreKind::Redis && self.redis.advertise_addr.is_empty() {
            tracing::warn!(
                "store.kind = \"redis\" without store.redis.advertise_addr: other replicas \
                 cannot forward calls to this one, and refuse them with UNAVAILABLE instead"
            );
        }
        if self.data_dir.is_some() && self.kind == StoreKind::Redis {
            return Err(
                "store.data_dir is for the memory store; with store.kind = \"redis\" Redis keeps the state: unset one of them"
                    .into(),
            );
        }
        self.redis.validate()
    }
}

/// `[store.redis]`: how to reach Redis and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, `rediss://…` for TLS, or
    /// `redis+sentinel://[user:password@]host:port[,host:port…]/SERVICE[/db]` for the master
    /// that these sentinels monitor as SERVICE (the credentials are the master's). Used when
    /// `cluster_nodes` is empty. Also `QUOTAD_REDIS_URL` (read verbatim; it may hold a password).
    pub url: String,
    /// Seed nodes of a Redis Cluster, e.g. `["redis://10.0.0.1:6379", …]`.
    pub cluster_nodes: Vec<String>,
    /// Prefix of every key quotad writes.
    pub key_prefix: String,
    pub connect_timeout_ms: u64,
    /// Longest wait for one command to Redis; the owner's write attempts are sized from it.
    pub command_timeout_ms: u64,
    /// PEM file of the CA that signed Redis's certificate, when the system's roots do not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM files of a client certificate and its key, for Redis with `tls-auth-clients yes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    // `[store.embedded]`'s `max_unflushed`, `write_timeout_ms` and `evict_idle_seconds` bound
    // the writes to Redis as they bound the data dir's.
    /// the partitions accounts fall into, the unit of ownership (1 to 1024).
    pub partitions: u16,
    /// how long a partition's lease lasts unless renewed (renewed every third of
    /// it); a replica that stopped is replaced after at most this long.
    pub lease_ms: u64,
    /// the address (`host:port`) other replicas and clients reach this replica at,
    /// told to callers that ask a replica which does not own the account. The chart sets it
    /// from the pod's IP.
    pub advertise_addr: String,
    /// how long the owner goes on deciding from memory, journaled in
    /// `journal_dir`, while Redis does not answer (0: UNAVAILABLE at once). At most half of
    /// `lease_ms`; without `journal_dir` there is no grace.
    pub outage_grace_ms: u64,
    /// how far an account's credits spent and held may rise over one outage, in
    /// micro-credits (decisions past it get UNAVAILABLE until Redis answers).
    pub outage_credit_allowance: i64,
    /// where decisions made while Redis does not answer are journaled until they
    /// are written, and this replica's id is kept across restarts. One directory per replica
    /// (locked); it must survive a restart of quotad (the chart mounts one).
    pub journal_dir: Option<std::path::PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            cluster_nodes: Vec::new(),
            key_prefix: "quotad".into(),
            connect_timeout_ms: 250,
            command_timeout_ms: 250,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            partitions: crate::store::OwnedSettings::default().partitions,
            lease_ms: crate::store::OwnedSettings::default().lease.as_millis() as u64,
            advertise_addr: String::new(),
            outage_grace_ms: crate::store::OwnedSettings::default()
                .outage_grace
                .as_millis() as u64,
            outage_credit_allowance: crate::store::OwnedSettings::default().outage_credit_allowance,
            journal_dir: None,
        }
    }
}

impl RedisConfig {
    /// The store's settings, with the TLS files read.
    pub fn settings(&self) -> Result<crate::store::RedisSettings, ConfigError> {
        let read = |key: &str, path: &Path| {
            std::fs::read(path).map_err(|e| {
                ConfigError::Invalid(format!(
                    "store.redis.{key}: cannot read {}: {e}",
                    path.display()
                ))
            })
        };
        let ca = self
            .tls_ca_file
            .as_deref()
            .map(|p| read("tls_ca_file", p))
            .transpose()?;
        let client_cert_and_key = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => {
                Some((read("tls_cert_file", cert)?, read("tls_key_file", key)?))
            }
            _ => None,
        };
        Ok(crate::store::RedisSettings {
            url: self.url.clone(),
            cluster_nodes: self.cluster_nodes.clone(),
            key_prefix: self.key_prefix.clone(),
            connect_timeout: std::time::Duration::from_millis(self.connect_timeout_ms),
            command_timeout: std::time::Duration::from_millis(self.command_timeout_ms),
            tls: crate::store::RedisTls {
                ca,
                client_cert_and_key,
            },
        })
    }

    fn validate(&self) -> Result<(), String> {
        if !(1..=1024).contains(&self.partitions) {
            return Err(format!(
                "store.redis.partitions must be between 1 and 1024, got {}",
                self.partitions
            ));
        }
        if !(100..=600_000).contains(&self.lease_ms) {
            return Err(format!(
                "store.redis.lease_ms must be between 100 and 600000, got {}",
                self.lease_ms
            ));
        }
        if self.journal_dir.is_some() && self.outage_grace_ms > self.lease_ms / 2 {
            return Err(format!(
                "store.redis.outage_grace_ms must be at most half of store.redis.lease_ms ({}): \
                 an owner never decides past its lease, and its journal must reach Redis before \
                 the lease can end; got {}",
                self.lease_ms / 2,
                self.outage_grace_ms
            ));
        }
        if self.outage_credit_allowance < 0 {
            return Err(format!(
                "store.redis.outage_credit_allowance must be 0 or more micro-credits, got {}",
                self.outage_credit_allowance
            ));
        }
        if self.names_sentinel() {
            self.validate_sentinel()?;
        } else {
            let urls = if self.cluster_nodes.is_empty() {
                std::slice::from_ref(&self.url)
            } else {
                &self.cluster_nodes[..]
            };
            for url in urls {
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return Err(format!(
                        "store.redis: {:?} must start with redis://, rediss:// or (url only) \
                         redis+sentinel://",
                        redact_url(url)
                    ));
                }
            }
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err("store.redis.tls_cert_file and store.redis.tls_key_file go together: set both or neither".into());
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}']) {
            return Err("store.redis.key_prefix must be non-empty and contain no braces".into());
        }
        for (key, value) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("command_timeout_ms", self.command_timeout_ms),
        ] {
            if value == 0 || value > 60_000 {
                return Err(format!(
                    "store.redis.{key} must be between 1 and 60000, got {value}"
                ));
            }
        }
        Ok(())
    }
}

impl RedisConfig {
    /// Whether `url` names a Sentinel deployment (TLS or not, well formed or not).
    fn names_sentinel(&self) -> bool {
        crate::store::redis::SentinelUrl::is_sentinel(&self.url)
            || (self.url.get(..SENTINEL_TLS_SCHEME.len()))
                .is_some_and(|s| s.eq_ignore_ascii_case(SENTINEL_TLS_SCHEME))
    }

    /// A Sentinel URL: well formed, and not mixed with a Cluster or TLS, which quotad does not
    /// combine with Sentinel.
    fn validate_sentinel(&self) -> Result<(), String> {
        let shown = redact_url(&self.url);
        if !self.cluster_nodes.is_empty() {
            return Err(format!(
                "store.redis.url {shown:?} names a Sentinel deployment and \
                 store.redis.cluster_nodes a Redis Cluster: set one or the other"
            ));
        }
        let tls_files = [
            ("tls_ca_file", &self.tls_ca_file),
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
        ];
        let tls = (tls_files.iter())
            .find(|(_, file)| file.is_some())
            .map(|(key, _)| format!("store.redis.{key} is set"))
            .or_else(|| {
                (!crate::store::redis::SentinelUrl::is_sentinel(&self.url))
                    .then(|| format!("store.redis.url {shown:?} asks for TLS"))
            });
        if let Some(tls) = tls {
            return Err(format!(
                "{tls}, but quotad does not support TLS with Sentinel yet (the sentinels and the \
                 master would be reached in plaintext): use redis+sentinel:// without TLS files, \
                 or rediss://host:port for one Redis over TLS"
            ));
        }
        crate::store::redis::SentinelUrl::parse(&self.url)
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "store.redis.url {shown:?}: {e}; a Sentinel deployment is named \
                     redis+sentinel://[user:password@]host:port[,host:port…]/SERVICE[/db]"
                )
            })
    }
}

/// The scheme a Sentinel deployment over TLS would have; refused with a reason.
const SENTINEL_TLS_SCHEME: &str = "rediss+sentinel://";

#[cfg(test)]
mod redis_config_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_default_settings_are_the_stores_own() {
        let settings = RedisConfig::default().settings().unwrap();
        assert_eq!(settings.command_timeout, Duration::from_millis(250));
        assert_eq!(settings, crate::store::RedisSettings::default());
    }

    #[test]
    fn ownership_is_configured_and_its_bounds_are_checked() {
        let config: RedisConfig = Figment::from(Serialized::defaults(RedisConfig::default()))
            .merge(Toml::string("partitions = 16\nlease_ms = 500\n"))
            .extract()
            .unwrap();
        config.validate().unwrap();
        let mut store = StoreConfig {
            redis: config,
            ..StoreConfig::default()
        };
        let owned = store.owned();
        assert_eq!(owned.partitions, 16);
        assert_eq!(owned.lease, Duration::from_millis(500));
        assert_eq!(owned.max_unflushed, store.embedded.max_unflushed);
        // The mode setting is gone with the Lua functions: a config that still names it is
        // refused, not ignored.
        let wrong: Result<RedisConfig, _> =
            Figment::from(Serialized::defaults(RedisConfig::default()))
                .merge(Toml::string("mode = \"scripts\"\n"))
                .extract();
        let err = wrong.unwrap_err().to_string();
        assert!(err.contains("mode"), "{err}");
        for (key, partitions, lease_ms) in [("partitions", 0, 500), ("lease_ms", 16, 50)] {
            store.redis.partitions = partitions;
            store.redis.lease_ms = lease_ms;
            let err = store.redis.validate().unwrap_err();
            assert!(err.contains(&format!("store.redis.{key}")), "{err}");
        }
    }

    #[test]
    fn the_outage_grace_needs_a_journal_and_fits_in_half_a_lease() {
        let config: RedisConfig = Figment::from(Serialized::defaults(RedisConfig::default()))
            .merge(Toml::string(
                "lease_ms = 20000\noutage_grace_ms = 10000\n\
                 outage_credit_allowance = 2000000\njournal_dir = \"/var/lib/j\"\n",
            ))
            .extract()
            .unwrap();
        config.validate().unwrap();
        let mut store = StoreConfig {
            redis: config,
            ..StoreConfig::default()
        };
        let owned = store.owned();
        assert_eq!(owned.outage_grace, Duration::from_secs(10));
        assert_eq!(owned.outage_credit_allowance, 2_000_000);
        assert_eq!(owned.journal_dir.as_deref(), Some(Path::new("/var/lib/j")));
        store.redis.outage_grace_ms = 10_001;
        let err = store.redis.validate().unwrap_err();
        assert!(
            err.contains("store.redis.outage_grace_ms") && err.contains("10000"),
            "{err}"
        );
        // Without a journal there is no grace to bound.
        store.redis.journal_dir = None;
        store.redis.validate().unwrap();
        store.redis.outage_credit_allowance = -1;
        let err = store.redis.validate().unwrap_err();
        assert!(err.contains("store.redis.outage_credit_allowance"), "{err}");
    }

    /// Account token keys come from the environment too, and are never shown.
    #[test]
    fn account_token_keys_come_from_the_environment_and_are_redacted() {
        let keys = "k2:fedcba9876543210fedcba9876543210,k1:0123456789abcdef0123456789abcdef";
        let config = Config::load_from(
            None,
            |name| (name == ACCOUNT_TOKEN_KEYS_ENV).then(|| keys.to_owned()),
            false,
        )
        .unwrap();
        assert_eq!(config.account_tokens.keys, keys);
        assert!(config.account_tokens.tokens().unwrap().is_some());
        assert!(!config.to_toml().contains("fedcba"), "{}", config.to_toml());
        let mut short = Config::default();
        short.account_tokens.keys = "k1:short".into();
        let err = short.validate().unwrap_err().to_string();
        assert!(err.contains("account_tokens.keys"), "{err}");
    }

    /// The price of credits is configured under `[top_up.price]`; a currency that is not an
    /// ISO 4217 code, or a price that cannot be used, is refused with the reason.
    #[test]
    fn the_price_of_credits_is_configured_and_checked() {
        let read = |toml: &str| {
            Figment::from(Serialized::defaults(Config::default()))
                .merge(Toml::string(toml))
                .extract::<Config>()
                .map_err(|e| e.to_string())
        };
        let config = read(
            "[top_up.price]\ncredits = 100\namount_minor = 500\ncurrency = \"EUR\"\nminor_digits = 2\n",
        )
        .unwrap();
        config.validate().unwrap();
        let price = config.top_up.price;
        assert_eq!(price.of(3 * 1_000_000).to_string(), "0.15 EUR");
        let err = read("[top_up.price]\ncredits = 100\namount_minor = 500\ncurrency = \"eur\"\nminor_digits = 2\n")
            .unwrap_err();
        assert!(err.contains("ISO 4217"), "{err}");
        let mut config = Config::default();
        config.top_up.price.credits = 0;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("top_up.price"), "{err}");
        assert_eq!(
            Config::default().top_up.price.of(2_500_000_000).to_string(),
            "100.00 USD"
        );
    }

    /// Replicas on Redis over TLS forward to each other over TLS, so they need their CA.
    #[test]
    fn redis_with_tls_needs_the_replicas_ca() {
        let mut config = Config::default();
        config.store.kind = StoreKind::Redis;
        config.tls.cert_file = Some("/tls/tls.crt".into());
        config.tls.key_file = Some("/tls/tls.key".into());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("tls.peer_ca_file"), "{err}");
        config.tls.client_ca_file = Some("/tls/ca.crt".into());
        config.validate().unwrap();
        assert_eq!(config.tls.peer_ca(), Some(&PathBuf::from("/tls/ca.crt")));
        config.tls.peer_ca_file = Some("/tls/peers.crt".into());
        assert_eq!(config.tls.peer_ca(), Some(&PathBuf::from("/tls/peers.crt")));
        config.tls.cert_file = None;
        config.tls.key_file = None;
        config.tls.client_ca_file = None;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("tls.peer_ca_file"), "{err}");
    }

    #[test]
    fn a_sentinel_deployment_is_named_by_its_url() {
        let config = RedisConfig {
            url: "redis+sentinel://app:s3cret@10.0.0.1:26379,10.0.0.2:26379/mymaster".into(),
            ..RedisConfig::default()
        };
        config.validate().unwrap();
        let settings = config.settings().unwrap();
        assert_eq!(settings.url, config.url);
        let url = crate::store::redis::SentinelUrl::parse(&settings.url).unwrap();
        assert_eq!(url.sentinels, ["10.0.0.1:26379", "10.0.0.2:26379"]);
        assert_eq!(url.service, "mymaster");
        // From the environment, as any other setting.
        let from_env = Config::load_from(
            None,
            |name| {
                (name == REDIS_URL_ENV)
                    .then(|| "redis+sentinel://s1:26379,s2:26379/cache/1".to_owned())
            },
            false,
        )
        .unwrap();
        assert_eq!(
            from_env.store.redis.url,
            "redis+sentinel://s1:26379,s2:26379/cache/1"
        );
        let with_password = Config::load_from(
            None,
            |name| match name {
                REDIS_URL_ENV => Some("redis+sentinel://s1:26379/cache".to_owned()),
                REDIS_PASSWORD_ENV => Some("pa55word".to_owned()),
                _ => None,
            },
            false,
        )
        .unwrap();
        assert_eq!(
            with_password.store.redis.url,
            "redis+sentinel://:pa55word@s1:26379/cache"
        );
        let shown = with_password.to_toml();
        assert!(!shown.contains("pa55word"), "{shown}");
        assert!(
            shown.contains("redis+sentinel://:<redacted>@s1:26379/cache"),
            "{shown}"
        );
    }

    #[test]
    fn a_sentinel_url_that_cannot_work_is_refused_with_the_forms_and_no_password() {
        let sentinel = "redis+sentinel://app:s3cret@s1:26379/mymaster";
        for (config, expected) in [
            (
                RedisConfig {
                    url: "redis+sentinel://app:s3cret@s1:26379".into(),
                    ..RedisConfig::default()
                },
                "names no service",
            ),
            (
                RedisConfig {
                    url: "redis+sentinel://app:s3cret@s1:x/mymaster".into(),
                    ..RedisConfig::default()
                },
                "redis+sentinel://[user:password@]host:port[,host:port…]/SERVICE[/db]",
            ),
            (
                RedisConfig {
                    url: sentinel.into(),
                    cluster_nodes: vec!["redis://10.0.0.1:6379".into()],
                    ..RedisConfig::default()
                },
                "store.redis.cluster_nodes a Redis Cluster: set one or the other",
            ),
            (
                RedisConfig {
                    url: "rediss+sentinel://app:s3cret@s1:26379/mymaster".into(),
                    ..RedisConfig::default()
                },
                "does not support TLS with Sentinel",
            ),
            (
                RedisConfig {
                    url: sentinel.into(),
                    tls_ca_file: Some("ca.pem".into()),
                    ..RedisConfig::default()
                },
                "store.redis.tls_ca_file is set, but quotad does not support TLS with Sentinel",
            ),
            (
                RedisConfig {
                    url: "sentinel://app:s3cret@s1:26379/mymaster".into(),
                    ..RedisConfig::default()
                },
                "must start with redis://, rediss:// or (url only) redis+sentinel://",
            ),
        ] {
            let err = config.validate().unwrap_err();
            assert!(err.contains(expected), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
            assert!(err.contains("store.redis"), "{err}");
        }
    }
}

/// A Redis URL with any password replaced, for messages and `quotad config`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:{REDACTED}@{host}")
        }
        None => url.to_owned(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PaymentProviderKind {
    /// Embedded: approves every charge (or declines every one with `simulated_decline`).
    #[default]
    Simulated,
    /// A billing service over HTTP (`http_url`).
    Http,
}

/// `[payments]`: the payment provider for auto top-up and how its calls are retried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentsConfig {
    pub provider: PaymentProviderKind,
    /// With the simulated provider: decline every charge (for demos of the decline path).
    pub simulated_decline: bool,
    /// Tries of a payment that gets no settling answer, with the same idempotency key.
    pub retry_attempts: u32,
    pub retry_first_delay_ms: u64,
    /// With the http provider: where charges are posted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_url: Option<String>,
    /// Bearer token for the billing service; also `QUOTAD_PAYMENTS_TOKEN` (read verbatim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_token: Option<String>,
    /// Shared secret to sign each request with (HMAC-SHA256, header `Quotad-Signature`); also
    /// `QUOTAD_PAYMENTS_HMAC_SECRET` (read verbatim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_hmac_secret: Option<String>,
    pub http_timeout_ms: u64,
    /// A purchase still in flight this long after it started (its replica died, or gave up
    /// retrying) is paid again, with the same idempotency key.
    pub resume_after_ms: u64,
    /// How long a Reserve short of credits may wait for an auto top-up purchase in flight.
    pub reserve_wait_ms: u64,
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        PaymentsConfig {
            provider: PaymentProviderKind::Simulated,
            simulated_decline: false,
            retry_attempts: 8,
            retry_first_delay_ms: 200,
            http_url: None,
            http_token: None,
            http_hmac_secret: None,
            http_timeout_ms: 5_000,
            resume_after_ms: 60_000,
            reserve_wait_ms: 300,
        }
    }
}

impl PaymentsConfig {
    pub fn provider(
        &self,
    ) -> Result<std::sync::Arc<dyn crate::payment::PaymentProvider>, ConfigError> {
        Ok(match self.provider {
            PaymentProviderKind::Simulated => {
                std::sync::Arc::new(crate::payment::SimulatedProvider {
                    decline: self.simulated_decline,
                })
            }
            PaymentProviderKind::Http => {
                let url = self.http_url.as_deref().ok_or_else(|| {
                    ConfigError::Invalid(
                        "payments.http_url is required with provider = \"http\"".into(),
                    )
                })?;
                let timeout = std::time::Duration::from_millis(self.http_timeout_ms);
                let auth = crate::payment::HttpAuth {
                    bearer_token: self.http_token.clone(),
                    hmac_secret: self.http_hmac_secret.clone(),
                };
                if auth.hmac_secret.as_deref().is_some_and(|s| s.len() < 16) {
                    return Err(ConfigError::Invalid(
                        "payments.http_hmac_secret must be at least 16 bytes".into(),
                    ));
                }
                let provider = crate::payment::HttpProvider::new(url, auth, timeout)
                    .map_err(ConfigError::Invalid)?;
                std::sync::Arc::new(provider)
            }
        })
    }

    pub fn retry(&self) -> crate::payment::RetryPolicy {
        crate::payment::RetryPolicy {
            attempts: self.retry_attempts.max(1),
            first_delay: std::time::Duration::from_millis(self.retry_first_delay_ms),
            ..crate::payment::RetryPolicy::default()
        }
    }
}

/// `[notifications]`: signed HTTP webhooks about accounts (see [`crate::notify`]). Off while
/// `webhook_url` is not set: then nothing is recorded either.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationsConfig {
    /// Where events are posted (`http://`; put TLS in the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// Shared secret each request is signed with (HMAC-SHA256, header `Quotad-Signature`, as
    /// payments sign), at least 16 bytes; also `QUOTAD_NOTIFICATIONS_HMAC_SECRET` (read
    /// verbatim). Required with a webhook URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_secret: Option<String>,
    /// `credits.low` fires when an account's credit balance falls below this (auto top-up
    /// off); 0: never.
    pub low_balance_micros: i64,
    /// How long one attempt may take.
    pub timeout_ms: u64,
    /// Back-off between attempts: doubling from the first delay up to the most.
    pub retry_first_delay_ms: u64,
    pub retry_max_delay_ms: u64,
    /// Attempts in a row after which an account's receiver rests for `retry_max_delay_ms`
    /// before its events are tried again (they stay pending meanwhile).
    pub retry_attempts: u32,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        let backoff = crate::notify::Backoff::default();
        NotificationsConfig {
            webhook_url: None,
            hmac_secret: None,
            low_balance_micros: crate::domain::notice::NotificationRules::default()
                .low_balance_micros,
            timeout_ms: 5_000,
            retry_first_delay_ms: backoff.first_delay.as_millis() as u64,
            retry_max_delay_ms: backoff.max_delay.as_millis() as u64,
            retry_attempts: backoff.attempts,
        }
    }
}

impl NotificationsConfig {
    /// The receiver and how it is retried; `None` when notifications are off.
    pub fn webhook(
        &self,
    ) -> Result<Option<(crate::notify::Webhook, crate::notify::Backoff)>, ConfigError> {
        let invalid = |e: String| ConfigError::Invalid(e);
        let Some(url) = self.webhook_url.as_deref() else {
            return Ok(None);
        };
        let secret = self.hmac_secret.as_deref().ok_or_else(|| {
            invalid(format!(
                "notifications.hmac_secret (or {NOTIFICATIONS_HMAC_SECRET_ENV}) is required \
                 with notifications.webhook_url: every webhook is signed"
            ))
        })?;
        if !(1..=60_000).contains(&self.timeout_ms) {
            return Err(invalid(format!(
                "notifications.timeout_ms must be between 1 and 60000, got {}",
                self.timeout_ms
            )));
        }
        if self.retry_first_delay_ms == 0 || self.retry_first_delay_ms > self.retry_max_delay_ms {
            return Err(invalid(format!(
                "notifications.retry_first_delay_ms must be at least 1 and at most \
                 retry_max_delay_ms ({}), got {}",
                self.retry_max_delay_ms, self.retry_first_delay_ms
            )));
        }
        if self.retry_max_delay_ms > 3_600_000 || self.retry_attempts == 0 {
            return Err(invalid(format!(
                "notifications.retry_max_delay_ms must be at most 3600000 (got {}) and \
                 retry_attempts at least 1 (got {})",
                self.retry_max_delay_ms, self.retry_attempts
            )));
        }
        let timeout = std::time::Duration::from_millis(self.timeout_ms);
        let webhook = crate::notify::Webhook::new(url, secret, timeout)
            .map_err(|e| invalid(e.to_string()))?;
        let backoff = crate::notify::Backoff {
            first_delay: std::time::Duration::from_millis(self.retry_first_delay_ms),
            max_delay: std::time::Duration::from_millis(self.retry_max_delay_ms),
            attempts: self.retry_attempts,
        };
        Ok(Some((webhook, backoff)))
    }
}

/// `[tls]`: TLS on the gRPC listeners. The files are read again when they change (certificate
/// rotation by cert-manager or a Secret update needs no restart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain and private key of the server; both or neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// PEM CA bundle that signed the other replicas' certificates. A call forwarded
    /// to its account's owner goes over TLS, checked against it, with this server's certificate
    /// as the client's (for replicas that ask for one). Default: `client_ca_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_ca_file: Option<PathBuf>,
    /// the name the replicas' certificates carry, checked on each forward (for
    /// example the headless Service's name). Default: the host of the owner's advertised address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_server_name: Option<String>,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    fn validate(&self) -> Result<(), String> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("tls.cert_file and tls.key_file go together: set both or neither".into());
        }
        if self.client_ca_file.is_some() && !self.enabled() {
            return Err("tls.client_ca_file needs tls.cert_file and tls.key_file".into());
        }
        if (self.peer_ca_file.is_some() || self.peer_server_name.is_some()) && !self.enabled() {
            return Err(
                "tls.peer_ca_file and tls.peer_server_name need tls.cert_file and tls.key_file"
                    .into(),
            );
        }
        Ok(())
    }

    /// The CA the other replicas' certificates are checked against when forwarding.
    pub fn peer_ca(&self) -> Option<&PathBuf> {
        self.peer_ca_file.as_ref().or(self.client_ca_file.as_ref())
    }
}

/// `[rls]`: Envoy's rate limit service (`envoy.service.ratelimit.v3`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlsConfig {
    /// Checked in order; a descriptor matching none is not limited. The default serves domain
    /// `quotad` with an `account_id` entry against that account's plan windows.
    pub rules: Vec<crate::domain::rls::RlsRule>,
    /// Add `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` headers to responses.
    pub rate_limit_headers: bool,
}

impl Default for RlsConfig {
    fn default() -> Self {
        RlsConfig {
            rules: crate::domain::rls::default_rules(),
            rate_limit_headers: false,
        }
    }
}

/// The most `server.worker_threads` quotad starts.
const MAX_WORKER_THREADS: usize = 1024;

/// `[server]`: limits that keep an overloaded quotad answering instead of queueing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerLimits {
    /// A call still running after this long is answered UNAVAILABLE.
    pub request_timeout_ms: u64,
    /// Calls served at once (all connections together); one more is answered
    /// RESOURCE_EXHAUSTED at once.
    pub max_concurrent_requests: usize,
    /// Largest request or response message.
    pub max_message_bytes: usize,
    /// Threads that serve calls (the async runtime's workers); 0: one per core quotad may use
    /// (its CPU affinity and the container's CPU limit). Fewer than the node's cores suits a
    /// sidecar whose frontend keeps the cores busy: the calls of a batch are then answered
    /// together instead of being shared out between threads that each wake up to write a part.
    /// Read at start only.
    pub worker_threads: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            request_timeout_ms: 2_000,
            max_concurrent_requests: 4_096,
            max_message_bytes: 256 * 1024,
            worker_threads: 0,
        }
    }
}

impl ServerLimits {
    fn validate(&self) -> Result<(), String> {
        if !(1..=300_000).contains(&self.request_timeout_ms) {
            return Err(format!(
                "server.request_timeout_ms must be between 1 and 300000, got {}",
                self.request_timeout_ms
            ));
        }
        if self.max_concurrent_requests == 0 {
            return Err("server.max_concurrent_requests must be at least 1".into());
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.max_message_bytes) {
            return Err(format!(
                "server.max_message_bytes must be between 1024 and 67108864, got {}",
                self.max_message_bytes
            ));
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err(format!(
                "server.worker_threads must be between 0 (one per core) and {MAX_WORKER_THREADS}, got {}",
                self.worker_threads
            ));
        }
        Ok(())
    }
}

/// `[telemetry]`: OpenTelemetry export of traces and metrics over OTLP/gRPC; off unless an
/// endpoint is set (here or by `OTEL_EXPORTER_OTLP_ENDPOINT`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported resource; also `OTEL_SERVICE_NAME`.
    pub service_name: String,
    /// How often metrics are exported.
    pub metrics_interval_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "quotad".into(),
            metrics_interval_ms: 10_000,
        }
    }
}

/// `url` with its password replaced by `password`.
fn with_password(url: &str, password: &str) -> Result<String, ConfigError> {
    let bad = || {
        ConfigError::Invalid(format!(
            "{REDIS_PASSWORD_ENV} is set but the Redis URL {:?} is not redis://host… or rediss://host…",
            redact_url(url)
        ))
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let host = match rest.rsplit_once('@') {
        Some((_, host)) => host,
        None => rest,
    };
    let user = rest
        .rsplit_once('@')
        .map(|(auth, _)| auth.split_once(':').map_or(auth, |(user, _)| user))
        .unwrap_or("");
    if host.is_empty() {
        return Err(bad());
    }
    // Userinfo must be percent-encoded in a URL.
    let encoded: String = password
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    Ok(format!("{scheme}://{user}:{encoded}@{host}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Pretty on a terminal, JSON otherwise (in a container, under a log collector).
    #[default]
    Auto,
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Where a config comes from, so that it can be read again on reload: the file (if any) under
/// the `QUOTAD_*` environment, then the command-line flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    pub overrides: Overrides,
}

/// Settings given as command-line flags, laid over everything else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub store: Option<StoreKind>,
    pub redis_url: Option<String>,
    pub data_dir: Option<PathBuf>,
}

impl ConfigSource {
    /// Reads and validates the whole config.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = Config::load(self.file.as_deref())?;
        let flags = &self.overrides;
        if let Some(listen) = flags.listen {
            config.listen = listen;
        }
        if let Some(kind) = flags.store {
            config.store.kind = kind;
        }
        if let Some(url) = &flags.redis_url {
            config.store.redis.url = url.clone();
        }
        if let Some(dir) = &flags.data_dir {
            config.store.data_dir = Some(dir.clone());
        }
        config.validate()?;
        Ok(config)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// AdminService on its own gRPC listener (then not on `listen`), e.g. reachable only from
    /// the back office's network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,
    /// HTTP listener for `/metrics`, `/healthz` and `/readyz`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<SocketAddr>,
    /// Bearer token that AdminService calls must present. Unset: AdminService refuses every call.
    /// Also `admin_token_file` or `QUOTAD_ADMIN_TOKEN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// Bearer token that QuotaService calls must present; unset: QuotaService is open (to what
    /// can reach the port). Also `quota_token_file` or `QUOTAD_QUOTA_TOKEN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_token_file: Option<PathBuf>,
    /// Account-scoped tokens: signing keys and the longest lifetime a token may be given.
    pub account_tokens: AccountTokensConfig,
    /// TLS on the gRPC listeners, optionally requiring client certificates (mTLS).
    pub tls: TlsConfig,
    /// Limits that keep an overloaded quotad answering.
    pub server: ServerLimits,
    /// OpenTelemetry export.
    pub telemetry: TelemetryConfig,
    /// Envoy's rate limit service.
    pub rls: RlsConfig,
    /// How long in-flight calls may take to finish after SIGTERM/SIGINT.
    pub shutdown_grace_seconds: u64,
    /// How often the config file is read again for changed rules (0: only on SIGHUP).
    pub reload_interval_ms: u64,
    pub log_format: LogFormat,
    /// A tracing filter, e.g. `info` or `quotad=debug,info`; `RUST_LOG` overrides it.
    pub log_level: String,
    pub store: StoreConfig,
    /// Plan of an account first seen by a Reserve without a plan hint.
    pub default_plan: String,
    pub plans: BTreeMap<String, Plan>,
    pub products: BTreeMap<String, Product>,
    pub limits: Limits,
    /// Shadow mode for every plan (or per plan, `plans.NAME.shadow`): decide and record as
    /// usual, but answer ALLOW where quotad would deny, counting and logging the denial.
    pub shadow: bool,
    /// Auto top-up rules shared by every account.
    pub top_up: TopUpRules,
    /// Who pays for auto top-up purchases.
    pub payments: PaymentsConfig,
    /// Signed webhooks about accounts (low credits, auto top-up, used-up windows).
    pub notifications: NotificationsConfig,
    pub pricing: PriceSheet,
}

impl Default for Config {
    fn default() -> Self {
        let policy = Policy::default();
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            admin_listen: None,
            http_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            admin_token: None,
            admin_token_file: None,
            quota_token: None,
            quota_token_file: None,
            account_tokens: AccountTokensConfig::default(),
            tls: TlsConfig::default(),
            server: ServerLimits::default(),
            telemetry: TelemetryConfig::default(),
            rls: RlsConfig::default(),
            shutdown_grace_seconds: 20,
            reload_interval_ms: 2_000,
            log_format: LogFormat::default(),
            log_level: "info".into(),
            store: StoreConfig::default(),
            default_plan: policy.default_plan,
            plans: policy.plans,
            products: policy.products,
            limits: policy.limits,
            shadow: policy.shadow,
            top_up: policy.top_up,
            payments: PaymentsConfig::default(),
            notifications: NotificationsConfig::default(),
            pricing: PriceSheet::default(),
        }
    }
}

/// `[account_tokens]`: tokens the back office mints for one account and a set of abilities
/// (`api::tokens`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountTokensConfig {
    /// Signing keys, `KID:SECRET,KID:SECRET…` (secrets of 32 bytes or more): the first signs
    /// new tokens, all verify. Rotate by putting a new key first, and removing the old one
    /// once its tokens may go. Also `QUOTAD_ACCOUNT_TOKEN_KEYS` (read verbatim). Empty: no
    /// account tokens.
    pub keys: String,
    /// The longest lifetime MintAccountToken gives a token (60 s to 30 days).
    pub max_ttl_seconds: u64,
}

impl Default for AccountTokensConfig {
    fn default() -> Self {
        AccountTokensConfig {
            keys: String::new(),
            max_ttl_seconds: 86_400,
        }
    }
}

impl AccountTokensConfig {
    /// The signing keys, checked.
    pub fn tokens(
        &self,
    ) -> Result<Option<std::sync::Arc<crate::api::tokens::AccountTokens>>, String> {
        Ok(crate::api::tokens::AccountTokens::parse(&self.keys)?.map(std::sync::Arc::new))
    }
}

/// Top-level keys the environment may set; other `QUOTAD_*` variables (Kubernetes injects
/// `QUOTAD_PORT` and friends for a Service named quotad) are not configuration and are ignored.
const ENV_KEYS: &[&str] = &[
    "listen",
    "admin_listen",
    "http_listen",
    "admin_token_file",
    "quota_token_file",
    "account_tokens",
    "tls",
    "server",
    "telemetry",
    "rls",
    "shutdown_grace_seconds",
    "reload_interval_ms",
    "log_format",
    "log_level",
    "store",
    "default_plan",
    "plans",
    "products",
    "limits",
    "shadow",
    "top_up",
    "payments",
    "notifications",
    "pricing",
];

impl Config {
    /// Defaults ← `file` (if given) ← `QUOTAD_*` environment, validated.
    /// Command-line flags are applied by the caller, which then calls [`Config::validate`] again.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, |name| std::env::var(name).ok(), true)
    }

    /// As [`load`](Self::load), with the environment given explicitly (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        read_process_env: bool,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.display().to_string()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        if read_process_env {
            let known = |key: &figment::value::UncasedStr| {
                let top = key.as_str().split('.').next().unwrap_or_default();
                ENV_KEYS.iter().any(|k| top.eq_ignore_ascii_case(k))
            };
            figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__").filter(known));
        }
        let mut config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Parse(flatten(e)))?;
        if let Some(token) = env(ADMIN_TOKEN_ENV) {
            config.admin_token = Some(token);
        }
        if let Some(url) = env(REDIS_URL_ENV) {
            config.store.redis.url = url;
        }
        if let Some(password) = env(REDIS_PASSWORD_ENV) {
            config.store.redis.url = with_password(&config.store.redis.url, &password)?;
            config.store.redis.cluster_nodes = (config.store.redis.cluster_nodes.iter())
                .map(|node| with_password(node, &password))
                .collect::<Result<_, _>>()?;
        }
        if let Some(token) = env(QUOTA_TOKEN_ENV) {
            config.quota_token = Some(token);
        }
        if let Some(keys) = env(ACCOUNT_TOKEN_KEYS_ENV) {
            config.account_tokens.keys = keys;
        }
        // The standard OpenTelemetry variables, over the file.
        if let Some(endpoint) = env("OTEL_EXPORTER_OTLP_ENDPOINT") {
            config.telemetry.otlp_endpoint = Some(endpoint);
        }
        if let Some(name) = env("OTEL_SERVICE_NAME") {
            config.telemetry.service_name = name;
        }
        for (token, file, key) in [
            (
                &mut config.admin_token,
                &config.admin_token_file,
                "admin_token_file",
            ),
            (
                &mut config.quota_token,
                &config.quota_token_file,
                "quota_token_file",
            ),
        ] {
            if let Some(path) = file {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::Invalid(format!("{key}: cannot read {}: {e}", path.display()))
                })?;
                *token = Some(text.trim_end_matches(['\n', '\r']).to_owned());
            }
        }
        if let Some(token) = env(PAYMENTS_TOKEN_ENV) {
            config.payments.http_token = Some(token);
        }
        if let Some(secret) = env(PAYMENTS_HMAC_SECRET_ENV) {
            config.payments.http_hmac_secret = Some(secret);
        }
        if let Some(secret) = env(NOTIFICATIONS_HMAC_SECRET_ENV) {
            config.notifications.hmac_secret = Some(secret);
        }
        config.validate()?;
        Ok(config)
    }

    /// The rules this config describes.
    pub fn policy(&self) -> Policy {
        Policy {
            default_plan: self.default_plan.clone(),
            plans: self.plans.clone(),
            products: self.products.clone(),
            limits: self.limits.clone(),
            top_up: self.top_up,
            notifications: crate::domain::notice::NotificationRules {
                record: self.notifications.webhook_url.is_some(),
                low_balance_micros: self.notifications.low_balance_micros,
            },
            shadow: self.shadow,
        }
    }

    /// The rules this config describes, as one snapshot (what a reload swaps in).
    pub fn rules(&self) -> crate::rules::Rules {
        crate::rules::Rules {
            policy: std::sync::Arc::new(self.policy()),
            pricing: std::sync::Arc::new(self.pricing.clone()),
            rls: self.rls.rules.clone().into(),
            rls_headers: self.rls.rate_limit_headers,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.policy().validate().map_err(ConfigError::Invalid)?;
        self.account_tokens.tokens().map_err(ConfigError::Invalid)?;
        if !(60..=30 * 86_400).contains(&self.account_tokens.max_ttl_seconds) {
            return Err(ConfigError::Invalid(format!(
                "account_tokens.max_ttl_seconds must be between 60 and 2592000, got {}",
                self.account_tokens.max_ttl_seconds
            )));
        }
        self.pricing.validate().map_err(ConfigError::Invalid)?;
        self.store.validate().map_err(ConfigError::Invalid)?;
        self.payments.provider()?;
        self.notifications.webhook()?;
        for (key, token) in [
            ("admin_token", &self.admin_token),
            ("quota_token", &self.quota_token),
        ] {
            if token.as_deref().is_some_and(|t| t.trim().is_empty()) {
                return Err(ConfigError::Invalid(format!(
                    "{key} must not be empty when set"
                )));
            }
        }
        if self.reload_interval_ms > 0 && !(100..=3_600_000).contains(&self.reload_interval_ms) {
            return Err(ConfigError::Invalid(format!(
                "reload_interval_ms must be 0 (reload on SIGHUP only) or between 100 and 3600000, got {}",
                self.reload_interval_ms
            )));
        }
        self.tls.validate().map_err(ConfigError::Invalid)?;
        if self.tls.enabled() && self.store.kind == StoreKind::Redis && self.tls.peer_ca().is_none()
        {
            return Err(ConfigError::Invalid(
                "store.kind = \"redis\" with tls forwards calls to other replicas over \
                 TLS, and needs the CA that signed their certificates: set tls.peer_ca_file \
                 (or tls.client_ca_file)"
                    .into(),
            ));
        }
        self.server.validate().map_err(ConfigError::Invalid)?;
        for (i, rule) in self.rls.rules.iter().enumerate() {
            rule.validate(&format!("rls.rules[{i}]"))
                .map_err(ConfigError::Invalid)?;
        }
        if self
            .log_level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err(ConfigError::Invalid(format!(
                "log_level {:?} is not a valid filter",
                self.log_level
            )));
        }
        Ok(())
    }

    /// The config with secrets replaced, safe to print or log.
    pub fn redacted(&self) -> Config {
        let mut shown = self.clone();
        if shown.admin_token.is_some() {
            shown.admin_token = Some(REDACTED.into());
        }
        if shown.quota_token.is_some() {
            shown.quota_token = Some(REDACTED.into());
        }
        if !shown.account_tokens.keys.is_empty() {
            shown.account_tokens.keys = REDACTED.into();
        }
        for secret in [
            &mut shown.payments.http_token,
            &mut shown.payments.http_hmac_secret,
            &mut shown.notifications.hmac_secret,
        ] {
            if secret.is_some() {
                *secret = Some(REDACTED.into());
            }
        }
        let redis = &mut shown.store.redis;
        redis.url = redact_url(&redis.url);
        redis.cluster_nodes = redis.cluster_nodes.iter().map(|u| redact_url(u)).collect();
        shown
    }

    /// The redacted config as TOML, as `quotad config` prints it.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.redacted())
            .unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

fn flatten(e: figment::Error) -> String {
    e.into_iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut file = tempfile();
        file.1.write_all(toml.as_bytes()).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let result = Config::load_from(
            Some(&file.0),
            |name| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
            false,
        );
        let _ = std::fs::remove_file(&file.0);
        result
    }

    fn tempfile() -> (std::path::PathBuf, std::fs::File) {
        let path =
            std::env::temp_dir().join(format!("quotad-config-{}.toml", uuid::Uuid::new_v4()));
        let file = std::fs::File::create(&path).unwrap();
        (path, file)
    }

    #[test]
    fn a_file_adds_plans_and_overrides_limits() {
        let config = load(
            r#"
            listen = "0.0.0.0:7000"
            [plans.team]
            limit_5h_micros = 500000000
            limit_weekly_micros = 2000000000
            overage = "credits"
            [limits]
            default_ttl_seconds = 60
            max_ttl_seconds = 3600
            idempotency_retention_seconds = 3600
            max_tokens = 1000000
            max_images = 10
            max_grant_micros = 1000000000
            recent_events = 10
            max_id_bytes = 64
            "#,
            &[(ADMIN_TOKEN_ENV, "12345")],
        )
        .unwrap();
        assert_eq!(config.listen.port(), 7000);
        assert!(config.plans.contains_key("team") && config.plans.contains_key("free"));
        assert_eq!(config.limits.default_ttl_seconds, 60);
        assert_eq!(config.admin_token.as_deref(), Some("12345"));
    }

    #[test]
    fn a_typo_names_the_key() {
        let err = load("[limits]\ndefault_ttl = 5\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("default_ttl"), "{err}");
    }

    #[test]
    fn an_inconsistent_value_names_the_key() {
        let err = load(
            "[plans.free]\nlimit_5h_micros = 0\nlimit_weekly_micros = 1\noverage = \"upgrade\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("plans.free.limit_5h_micros"), "{err}");
    }

    #[test]
    fn secrets_are_redacted() {
        let mut config = Config {
            admin_token: Some("s3cret".into()),
            ..Config::default()
        };
        config.payments.http_token = Some("b1lling".into());
        config.payments.http_hmac_secret = Some("a-long-hmac-s3cret".into());
        let shown = config.to_toml();
        for secret in ["s3cret", "b1lling"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert_eq!(shown.matches(REDACTED).count(), 3, "{shown}");
    }

    /// `[notifications]` is off without a URL (and records nothing then); with one it needs a
    /// signing secret, which may come from the environment and is never shown.
    #[test]
    fn notifications_need_a_secret_and_keep_it_to_themselves() {
        let config = Config::default();
        assert!(config.notifications.webhook().unwrap().is_none());
        assert!(
            !config.policy().notifications.record,
            "off: nothing recorded"
        );
        let secret = "a webhook secret of the receiver";
        let config = Config::load_from(
            None,
            |name| (name == NOTIFICATIONS_HMAC_SECRET_ENV).then(|| secret.to_owned()),
            false,
        )
        .unwrap();
        assert_eq!(config.notifications.hmac_secret.as_deref(), Some(secret));
        let mut on = config.clone();
        on.notifications.webhook_url = Some("http://hooks:8080/quotad".into());
        on.validate().unwrap();
        assert!(on.policy().notifications.record);
        assert!(!on.to_toml().contains(secret), "{}", on.to_toml());
        for (change, expected) in [
            (
                (|c: &mut Config| c.notifications.hmac_secret = None) as fn(&mut Config),
                "notifications.hmac_secret (or QUOTAD_NOTIFICATIONS_HMAC_SECRET) is required",
            ),
            (
                |c| c.notifications.hmac_secret = Some("short".into()),
                "at least 16 bytes",
            ),
            (
                |c| c.notifications.webhook_url = Some("https://hooks/x".into()),
                "only http://",
            ),
            (
                |c| c.notifications.low_balance_micros = -1,
                "notifications.low_balance_micros is -1",
            ),
            (
                |c| c.notifications.retry_first_delay_ms = 120_000,
                "notifications.retry_first_delay_ms",
            ),
            (
                |c| c.notifications.timeout_ms = 0,
                "notifications.timeout_ms",
            ),
        ] {
            let mut bad = on.clone();
            change(&mut bad);
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn redis_passwords_are_redacted() {
        let mut config = Config::default();
        config.store.redis.url = "redis://app:pa55word@redis.internal:6379/0".into();
        let shown = config.to_toml();
        assert!(!shown.contains("pa55word"), "{shown}");
        assert!(
            shown.contains("redis://app:<redacted>@redis.internal:6379/0"),
            "{shown}"
        );
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let err = Config::load_from(Some(Path::new("/nonexistent/quotad.toml")), |_| None, false)
            .unwrap_err();
        assert!(matches!(err, ConfigError::MissingFile(_)));
    }
}
