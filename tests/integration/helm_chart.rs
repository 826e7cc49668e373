//! The Helm chart's checks (`helm/tests/validate.py`): lint, render both modes and every example,
//! validate every manifest against the Kubernetes schemas, and reject every bad values file.
//! Among them, standalone on the embedded store: by default a one-replica StatefulSet whose claim
//! is mounted where quotad.toml puts `store.data_dir`; with persistence off the Deployment and no
//! claim; on Redis the Deployment, whatever persistence says; and the refusals of more than one
//! replica or autoscaling without Redis (the store has a single writer).
//!
//! Every quotad.toml the chart renders is then loaded by the quotad binary (`quotad config`), so
//! the chart and quotad's config keys cannot drift apart; and quotad's effective config must put
//! the data dir where the chart mounts the volume, and nowhere when there is none.
//!
//! The checks run in a Python virtualenv under `target/chart-venv`, made on the first run with the
//! pinned packages below (the Helm library comes inside `helm-python-sdk`, so no `helm` binary is
//! needed); later runs reuse it and need no network.

use crate::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Exact versions, checked together. `helm-python-sdk` bundles Helm's Go library;
/// `kubernetes-validate` carries the Kubernetes OpenAPI schemas; `promql-parser` parses the
/// dashboard's and the alerts' PromQL.
const PACKAGES: &[&str] = &[
    "helm-python-sdk==0.2.2",
    "kubernetes-validate==1.37.0",
    "promql-parser==0.11.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "attrs==26.1.0",
    "PyYAML==6.0.4",
    "packaging==26.4",
    "importlib-resources==7.1.0",
    "typing-extensions==4.16.0",
];

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The virtualenv's python, with the pinned packages installed.
fn venv_python() -> PathBuf {
    let venv = crate_root().join("target").join("chart-venv");
    support::python::venv(&venv, &(PACKAGES.join("\n") + "\n"))
}

#[test]
fn helm_chart_lints_renders_and_validates() {
    let python = venv_python();
    let script = crate_root().join("helm").join("tests").join("validate.py");
    let configs = crate_root().join("target").join("chart-configs");
    let _ = std::fs::remove_dir_all(&configs);
    let output = Command::new(&python)
        .arg(&script)
        .arg("--write-configs")
        .arg(&configs)
        .current_dir(crate_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "chart checks failed ({}):\n{stdout}{stderr}",
        output.status
    );
    println!("{stdout}");

    // quotad itself accepts every quotad.toml the chart rendered.
    let mut files: Vec<PathBuf> = std::fs::read_dir(&configs)
        .expect("the rendered configs")
        .map(|entry| entry.expect("a rendered config").path())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "too few rendered configs: {files:?}");
    let mut effective = BTreeMap::new();
    for file in files {
        let mut quotad = Command::new(env!("CARGO_BIN_EXE_quotad"));
        quotad.arg("config").arg("--config").arg(&file);
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("QUOTAD_") || name.starts_with("OTEL_") || name == "RUST_LOG" {
                quotad.env_remove(&*name);
            }
        }
        let output = quotad.output().expect("run quotad config");
        assert!(
            output.status.success(),
            "quotad rejects the chart's {}:\n{}\n{}",
            file.display(),
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(&file).unwrap_or_default()
        );
        let label = file
            .file_stem()
            .expect("a file name")
            .to_string_lossy()
            .into_owned();
        let printed = String::from_utf8(output.stdout).expect("quotad config prints UTF-8");
        let config: toml::Table = printed.parse().unwrap_or_else(|e| {
            panic!("quotad config printed no TOML for {label}: {e}\n{printed}")
        });
        effective.insert(label, config);
    }

    // The data dir quotad uses, as it resolved the chart's quotad.toml ("" counts as none).
    let data_dir = |label: &str| -> Option<String> {
        let config = effective
            .get(label)
            .unwrap_or_else(|| panic!("validate.py rendered no {label}.toml"));
        let store = config.get("store").and_then(|s| s.as_table())?;
        let dir = store
            .get("data_dir")?
            .as_str()
            .expect("store.data_dir is a string");
        (!dir.is_empty()).then(|| dir.to_owned())
    };
    let mount_path = chart_values()["persistence"]["mountPath"]
        .as_str()
        .expect("values.yaml persistence.mountPath")
        .to_owned();
    assert_eq!(
        data_dir("standalone-defaults"),
        Some(mount_path.clone()),
        "by default quotad keeps the embedded store where the chart mounts its claim"
    );
    assert_eq!(data_dir("standalone-named"), Some(mount_path));
    assert_eq!(
        data_dir("embedded-custom-volume").as_deref(),
        Some("/data/quotad")
    );
    assert_eq!(
        data_dir("embedded-existing-claim"),
        data_dir("standalone-defaults")
    );
    for label in [
        "embedded-no-persistence",
        "redis-url-persistence-ignored",
        "redis-bundled-persistence-ignored",
        "sidecar-defaults",
    ] {
        assert_eq!(data_dir(label), None, "{label}: no volume, so no data dir");
    }
}

/// The chart's default values (helm/quotad/values.yaml).
fn chart_values() -> serde_norway::Value {
    let text = std::fs::read_to_string(crate_root().join("helm/quotad/values.yaml"))
        .expect("read values.yaml");
    serde_norway::from_str(&text).expect("values.yaml parses")
}

/// The chart rolls its pods for every config change but those quotad reloads: its list of
/// reloaded keys (`quotad.reloadable` in `_config.tpl`) is quotad's own.
#[test]
fn the_chart_reloads_what_quotad_reloads() {
    let template = std::fs::read_to_string(crate_root().join("helm/quotad/templates/_config.tpl"))
        .expect("read _config.tpl");
    let define = r#"{{- define "quotad.reloadable" -}}"#;
    let start = template.find(define).expect("quotad.reloadable is defined") + define.len();
    let end = start + template[start..].find("{{").expect("its end");
    let mut chart: Vec<&str> = template[start..end].split_whitespace().collect();
    let mut quotad = quotad::reload::RELOADABLE.to_vec();
    chart.sort_unstable();
    quotad.sort_unstable();
    assert_eq!(chart, quotad);
}
