//! `rediss://`: the Redis store over TLS to a real `redis-server` with a certificate from a
//! test CA (made here with rcgen), trusted through `tls_ca_file`; and refused when the CA is
//! not trusted.

use crate::support;

use std::sync::Arc;

use quotad::config::RedisConfig;
use quotad::domain::{Decision, Policy, ReserveCommand, Usage};
use quotad::rules::LiveRules;
use quotad::store::{MemoryStore, OwnedSettings, Store, StoreError};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use support::redis::{RedisServer, free_port, fresh_prefix};
use support::{CREDIT, T0};

struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    /// A CA, and a server certificate for 127.0.0.1 and localhost signed by it.
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "quotad-tls-{}-{}",
            std::process::id(),
            fresh_prefix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
        std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_speaks_tls() {
    let pki = Pki::new();
    let tls_port = free_port().to_string();
    let args = [
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &pki.path("server.pem"),
        "--tls-key-file",
        &pki.path("server.key"),
        "--tls-ca-cert-file",
        &pki.path("ca.pem"),
        "--tls-auth-clients",
        "no",
    ]
    .map(str::to_owned);
    let server = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        RedisServer::start_with(&args)
    })
    .await
    .unwrap();

    let config = RedisConfig {
        url: format!("rediss://127.0.0.1:{tls_port}"),
        key_prefix: fresh_prefix(),
        command_timeout_ms: 2_000,
        tls_ca_file: Some(pki.path("ca.pem").into()),
        ..RedisConfig::default()
    };
    let rules = LiveRules::fixed(Arc::new(Policy::default()));
    let owned = OwnedSettings::default();
    let store = MemoryStore::open_on_redis(rules.clone(), &config.settings().unwrap(), &owned)
        .await
        .unwrap();
    let estimate = Usage {
        model: "gpt-5.5-mini".into(),
        output_tokens: 5_000,
        ..Usage::default()
    };
    let cmd = ReserveCommand {
        account_id: "over-tls".into(),
        request_id: "r1".into(),
        product: "codex".into(),
        cost: CREDIT,
        estimate,
        plan_hint: None,
        ttl_ms: 60_000,
        reservation_id: "rsv-1".into(),
        wait_for_top_up: false,
    };
    let out = store.reserve(&cmd, T0).await.unwrap();
    assert!(matches!(out.decision, Decision::Allow { .. }));
    assert_eq!(store.usage("over-tls", 5, T0).await.unwrap().holds.len(), 1);

    // Without the CA, the server's certificate is not trusted: connecting fails, clearly.
    let untrusted = RedisConfig {
        tls_ca_file: None,
        ..config
    };
    let err = MemoryStore::open_on_redis(rules, &untrusted.settings().unwrap(), &owned)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Unavailable(ref m) if m.contains("cannot connect")),
        "{err:?}"
    );
    drop(server);
}
