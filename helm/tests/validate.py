#!/usr/bin/env python3
"""Checks of the quotad Helm chart, offline.

Lints the chart, renders it for both modes (and standalone for the embedded store with and
without its data volume, and for Redis) and for every values file in helm/quotad/examples,
validates every manifest against the Kubernetes OpenAPI schemas (kubernetes-validate, strict, a
fixed Kubernetes version; the ServiceMonitor and PrometheusRule, which are CRDs, against small
schemas of their own), checks the properties the chart promises (among them that the Grafana
dashboard and the alerts are the files in the chart, and that only settings quotad cannot reload
roll the pods), renders a frontend chart that includes the sidecar templates, and checks that
every file in helm/tests/bad-values is rejected with the message its first line announces
(`# expect: ...`).

Needs the packages helm-python-sdk, kubernetes-validate and promql-parser (tests/integration/helm_chart.rs
installs pinned versions into target/chart-venv). Prints a summary; exits 1 on any failure.

    python helm/tests/validate.py [--write-configs DIR] [-v]
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator

import helm_python as helm
import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import promql_parser
import yaml

KUBE_VERSION = "1.30.0"
HERE = Path(__file__).resolve().parent
CHART = HERE.parent / "quotad"
EXAMPLES = CHART / "examples"
BAD_VALUES = HERE / "bad-values"
CRATE = HERE.parent.parent

# The ConfigMap is mounted as a directory (no subPath), so that the kubelet updates the file.
CONFIG_DIR = "/etc/quotad/config"
CONFIG_PATH = f"{CONFIG_DIR}/quotad.toml"
DASHBOARD = CHART / "dashboards" / "quotad.json"
ALERTS = CHART / "alerts" / "quotad.rules.yaml"
TLS_DIR = "/etc/quotad/tls"
# The embedded store's volume: the StatefulSet's claim template, or the existing claim's volume.
DATA_VOLUME = "quotad-data"
NONROOT_UID = 65532

# kubernetes-validate reads its (large) schema files again for every object; read each once.
kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)

# The Prometheus Operator's ServiceMonitor is a CRD, not in the Kubernetes schemas: the part of
# it this chart uses.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                        "matchExpressions": {"type": "array"},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}


DURATION = "^([0-9]+(ms|s|m|h|d|w|y))+$"

# The Prometheus Operator's PrometheusRule: the part of it this chart uses (alerting rules only).
PROMETHEUS_RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": SERVICE_MONITOR_SCHEMA["properties"]["metadata"],
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": DURATION},
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["alert", "expr", "for", "labels", "annotations"],
                                    "properties": {
                                        "alert": {
                                            "type": "string",
                                            "pattern": "^[A-Za-z_][A-Za-z0-9_]*$",
                                        },
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": {"type": "string", "pattern": DURATION},
                                        "labels": {
                                            "type": "object",
                                            "required": ["severity"],
                                            "properties": {
                                                "severity": {
                                                    "enum": ["critical", "warning", "info"]
                                                }
                                            },
                                            "additionalProperties": {"type": "string"},
                                        },
                                        "annotations": {
                                            "type": "object",
                                            "required": ["summary", "description"],
                                            "additionalProperties": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}

CRD_SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR_SCHEMA, "PrometheusRule": PROMETHEUS_RULE_SCHEMA}


class Failure(Exception):
    """A check that did not hold."""


def check(condition: Any, message: str) -> None:
    if not condition:
        raise Failure(message)


class Report:
    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.passed = 0
        self.failed: list[tuple[str, str]] = []
        self.manifests = 0
        self.renders = 0

    def run(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Failure as e:
            self.failed.append((name, str(e)))
            print(f"FAIL {name}: {e}")
        except Exception as e:  # an unexpected error fails this check, not the whole run
            self.failed.append((name, f"{type(e).__name__}: {e}"))
            print(f"FAIL {name}: {type(e).__name__}: {e}")
        else:
            self.passed += 1
            if self.verbose:
                print(f"ok   {name}")


# ---------------------------------------------------------------- rendering


def load_values(path: Path) -> dict[str, Any]:
    values = yaml.safe_load(path.read_text()) or {}
    check(isinstance(values, dict), f"{path.name}: not a mapping")
    return values


def render(
    chart: helm.Chart, values: dict[str, Any], name: str = "quotad", namespace: str = "quotad"
) -> list[dict[str, Any]]:
    """Rendered objects, NOTES.txt left out."""
    files = chart.render(values, name=name, namespace=namespace, is_install=True)
    objects = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                check(isinstance(doc, dict), f"{path}: a document that is not a mapping")
                doc.setdefault("__file", path)
                objects.append(doc)
    return objects


def strip(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "__file"}


def kube_validate(obj: dict[str, Any]) -> None:
    where = f"{obj.get('__file')}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if obj.get("kind") in CRD_SCHEMAS:
        try:
            jsonschema.Draft7Validator(CRD_SCHEMAS[obj["kind"]]).validate(strip(obj))
        except jsonschema.ValidationError as e:
            raise Failure(f"{where}: {'.'.join(map(str, e.path))}: {e.message}") from None
        return
    try:
        kubernetes_validate.validate(strip(obj), KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        raise Failure(f"{where}: {path}: {e.message}") from None
    except kubernetes_validate.SchemaNotFoundError as e:
        raise Failure(f"{where}: {e.message}") from None


# ---------------------------------------------------------------- property checks


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield o, o["spec"]["template"]


def component(objects: list[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    """Objects of a kind labelled app.kubernetes.io/component=name (the quotad server: "server",
    the bundled Redis: "redis")."""
    return [
        o
        for o in of_kind(objects, kind)
        if (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == name
    ]


def server_workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The standalone quotad server: a Deployment, or a StatefulSet with a data dir."""
    return component(objects, "Deployment", "server") + component(objects, "StatefulSet", "server")


def is_persistent(merged: dict[str, Any]) -> bool:
    """Whether the chart should keep the embedded store on a volume: standalone mode, no Redis,
    persistence.enabled."""
    redis = merged["redis"]
    on_redis = bool(redis["url"] or redis["clusterNodes"] or redis["bundled"]["enabled"])
    return merged["mode"] == "standalone" and not on_redis and merged["persistence"]["enabled"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


def quotad_container(pod: dict[str, Any]) -> dict[str, Any] | None:
    found = [c for c in containers(pod) if c["name"] == "quotad"]
    return found[0] if found else None


def check_security(objects: list[dict[str, Any]]) -> None:
    for owner, pod in pod_specs(objects):
        name = f"{owner['kind']}/{owner['metadata']['name']}"
        check(
            pod["spec"].get("automountServiceAccountToken") is False,
            f"{name}: automountServiceAccountToken must be false",
        )
        for c in containers(pod):
            sc = c.get("securityContext") or {}
            where = f"{name} container {c['name']}"
            check(sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot")
            uid = sc.get("runAsUser")
            check(isinstance(uid, int) and uid > 0, f"{where}: numeric non-root runAsUser")
            check(isinstance(sc.get("runAsGroup"), int), f"{where}: numeric runAsGroup")
            if c["name"] != "redis":
                check(uid == NONROOT_UID, f"{where}: runAsUser {uid}, want {NONROOT_UID}")
            check(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem")
            check(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation")
            check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: drop ALL")
            check(
                sc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
                f"{where}: seccomp RuntimeDefault",
            )
            res = c.get("resources") or {}
            check(res.get("requests") and res.get("limits"), f"{where}: requests and limits")


def config_of(objects: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    maps = [o for o in of_kind(objects, "ConfigMap") if "quotad.toml" in o.get("data", {})]
    check(len(maps) == 1, f"{len(maps)} ConfigMaps with quotad.toml, want 1")
    text = maps[0]["data"]["quotad.toml"]
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise Failure(f"quotad.toml is not valid TOML: {e}\n{text}") from None


def walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, value


def secret_values(values: dict[str, Any]) -> list[str]:
    refs = list((values.get("secrets") or {}).values())
    refs.append(((values.get("redis") or {}).get("password")) or {})
    return [str(r["value"]) for r in refs if isinstance(r, dict) and r.get("value")]


def check_data_volume(
    objects: list[dict[str, Any]],
    workload: dict[str, Any],
    merged: dict[str, Any],
    persistent: bool,
) -> None:
    """The embedded store's data dir. With persistence: a StatefulSet of one replica that rolls by
    stopping the old pod first, mounting a claim (its own volumeClaimTemplate, or
    persistence.existingClaim) writable by uid 65532 at persistence.mountPath, which quotad.toml
    names as store.data_dir, behind a headless governing Service. Without: no claim at all, and
    on the embedded store a Deployment that never runs two pods side by side."""
    p = merged["persistence"]
    spec = workload["spec"]
    name = f"{workload['kind']}/{workload['metadata']['name']}"
    pod = spec["template"]
    c = quotad_container(pod)
    assert c is not None
    mounts = [m for m in c.get("volumeMounts", []) if m["name"] == DATA_VOLUME]
    templates = spec.get("volumeClaimTemplates", [])
    claim_volumes = [v for v in pod["spec"].get("volumes", []) if "persistentVolumeClaim" in v]
    if not persistent:
        check(
            not mounts and not templates and not claim_volumes,
            f"{name}: a data volume without persistence",
        )
        _, config = config_of(objects)
        if config["store"]["kind"] == "memory":
            strategy = spec.get("strategy", {}).get("type")
            check(strategy == "Recreate", f"{name}: strategy {strategy}, want Recreate")
        return
    check(
        spec.get("replicas") == merged["replicas"] <= 1,
        f"{name}: replicas {spec.get('replicas')}, want at most 1 (a single writer)",
    )
    check(
        spec.get("podManagementPolicy", "OrderedReady") == "OrderedReady"
        and spec.get("updateStrategy", {}).get("type", "RollingUpdate") == "RollingUpdate",
        f"{name}: an OrderedReady RollingUpdate (the old pod stops before the new one starts)",
    )
    check(len(mounts) == 1, f"{name}: {len(mounts)} mounts of {DATA_VOLUME}, want 1")
    mount = mounts[0]
    check(
        mount["mountPath"] == p["mountPath"],
        f"{name}: {DATA_VOLUME} mounted at {mount['mountPath']}, want {p['mountPath']}",
    )
    check(
        not mount.get("readOnly") and "subPath" not in mount,
        f"{name}: {DATA_VOLUME} must be mounted writable, whole",
    )
    _, config = config_of(objects)
    check(
        config["store"].get("data_dir") == mount["mountPath"],
        f"store.data_dir {config['store'].get('data_dir')!r} is not where the volume is mounted",
    )
    fs_group = pod["spec"].get("securityContext", {}).get("fsGroup")
    check(
        fs_group == (c.get("securityContext") or {}).get("runAsGroup") == NONROOT_UID,
        f"{name}: fsGroup {fs_group}: the volume must be writable by quotad's group",
    )
    if p["existingClaim"]:
        check(not templates, f"{name}: volumeClaimTemplates beside persistence.existingClaim")
        volume = [v for v in claim_volumes if v["name"] == DATA_VOLUME]
        check(
            volume and volume[0]["persistentVolumeClaim"]["claimName"] == p["existingClaim"],
            f"{name}: {DATA_VOLUME} is not the claim {p['existingClaim']}",
        )
    else:
        check(not claim_volumes, f"{name}: a claim volume beside volumeClaimTemplates")
        names = [t["metadata"]["name"] for t in templates]
        check(names == [DATA_VOLUME], f"{name}: volumeClaimTemplates {names}, want {DATA_VOLUME}")
        claim = templates[0]["spec"]
        check(claim["accessModes"] == p["accessModes"], f"{name}: accessModes")
        storage = claim["resources"]["requests"]["storage"]
        check(storage == p["size"], f"{name}: claim size {storage}, want {p['size']}")
        want_class = {"": None, "-": ""}.get(p["storageClass"], p["storageClass"])
        check(
            claim.get("storageClassName") == want_class,
            f"{name}: storageClassName {claim.get('storageClassName')!r}, want {want_class!r}",
        )
    governing = [
        s for s in of_kind(objects, "Service") if s["metadata"]["name"] == spec["serviceName"]
    ]
    check(
        governing and governing[0]["spec"].get("clusterIP") == "None",
        f"{name}: serviceName {spec['serviceName']} must be a headless Service of the chart",
    )
    labels = pod["metadata"]["labels"]
    check(
        all(labels.get(k) == v for k, v in governing[0]["spec"]["selector"].items()),
        f"{name}: the headless Service selects no quotad pod",
    )


def check_release(
    objects: list[dict[str, Any]],
    values: dict[str, Any],
    merged: dict[str, Any],
    namespace: str = "quotad",
) -> None:
    """Everything a rendered release must satisfy, in either mode."""
    mode = merged["mode"]
    text, config = config_of(objects)
    configmap = [o for o in of_kind(objects, "ConfigMap") if "quotad.toml" in o.get("data", {})][0]

    # quotad.toml: the chart's keys, integers written as integers, no secrets.
    ports = merged["ports"]
    check(config.get("listen") == f"0.0.0.0:{ports['grpc']}", f"listen is {config.get('listen')}")
    check(config.get("http_listen") == f"0.0.0.0:{ports['http']}", "http_listen")
    check(config.get("log_format") == "json", "log_format must be json")
    grace = config.get("shutdown_grace_seconds")
    check(
        grace == merged["shutdownGraceSeconds"] and isinstance(grace, int), "shutdown_grace_seconds"
    )
    if merged["admin"]["separatePort"]:
        check(config.get("admin_listen") == f"0.0.0.0:{ports['admin']}", "admin_listen")
    else:
        check("admin_listen" not in config, "admin_listen without admin.separatePort")
    for key in ("admin_token", "quota_token", "admin_token_file", "quota_token_file"):
        check(key not in config, f"secret key {key} in the ConfigMap")
    for key in ("http_token", "http_hmac_secret"):
        check(key not in config.get("payments", {}), f"secret key payments.{key} in the ConfigMap")
    check(
        "hmac_secret" not in config.get("notifications", {}),
        "secret key notifications.hmac_secret in the ConfigMap",
    )
    for path, value in walk(config):
        check(not isinstance(value, float), f"quotad.toml: {path} = {value!r} is a float")
    redis = merged["redis"]
    external = bool(redis["url"] or redis["clusterNodes"])
    want_kind = "redis" if external or redis["bundled"]["enabled"] else "memory"
    store = config.get("store", {})
    check(store.get("kind") == want_kind, f"store.kind {store.get('kind')}, want {want_kind}")
    if want_kind == "redis":
        if redis["clusterNodes"]:
            check(store["redis"].get("cluster_nodes") == redis["clusterNodes"], "cluster_nodes")
        else:
            url = store.get("redis", {}).get("url", "")
            check(re.match(r"^(rediss?|redis\+sentinel)://[^@]+$", url), f"store.redis.url {url!r}")
    persistent = is_persistent(merged)
    mount_path = merged["persistence"]["mountPath"]
    if persistent:
        check(
            store.get("data_dir") == mount_path,
            f"store.data_dir {store.get('data_dir')!r}, want persistence.mountPath {mount_path!r}",
        )
    else:
        check("data_dir" not in store, f"store.data_dir {store.get('data_dir')!r} without a volume")
    tls = merged["tls"]
    if tls["enabled"]:
        want = {"cert_file": f"{TLS_DIR}/tls.crt", "key_file": f"{TLS_DIR}/tls.key"}
        if tls["clientAuth"]:
            want["client_ca_file"] = f"{TLS_DIR}/ca.crt"
        # Owned mode's forwards between replicas: ca.crt, under the Service's name.
        want["peer_ca_file"] = f"{TLS_DIR}/ca.crt"
        peer_name = (config.get("tls") or {}).get("peer_server_name", "")
        check(
            re.fullmatch(rf"[a-z0-9]([-a-z0-9]*[a-z0-9])?\.{re.escape(namespace)}\.svc", peer_name),
            f"tls.peer_server_name {peer_name!r} is not a Service of namespace {namespace}",
        )
        want["peer_server_name"] = peer_name
        check(config.get("tls") == want, f"tls is {config.get('tls')}, want {want}")
    else:
        check("tls" not in config, "tls keys without tls.enabled")
    for secret in secret_values(values):
        for o in objects:
            if o["kind"] != "Secret":
                check(
                    secret not in json.dumps(o),
                    f"a secret value appears in {o['kind']}/{o['metadata']['name']}",
                )

    # Pods.
    check_security(objects)
    deployments = of_kind(objects, "Deployment")
    servers = server_workloads(objects)
    quotad_pods = [(o, p) for o, p in pod_specs(objects) if quotad_container(p)]
    for owner, pod in quotad_pods:
        name = f"{owner['kind']}/{owner['metadata']['name']}"
        c = quotad_container(pod)
        assert c is not None
        env = env_of(c)
        check(env.get("QUOTAD_CONFIG", {}).get("value") == CONFIG_PATH, f"{name}: QUOTAD_CONFIG")
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        claims = {t["metadata"]["name"]: t for t in owner["spec"].get("volumeClaimTemplates", [])}
        for m in c.get("volumeMounts", []):
            check(
                m["name"] in volumes or m["name"] in claims,
                f"{name}: mount {m['name']} has no volume",
            )
        mount = mounts.get(CONFIG_DIR, {})
        check(
            mount.get("readOnly") and "subPath" not in mount,
            f"{name}: the ConfigMap must be mounted read-only as the directory {CONFIG_DIR}, not "
            "through subPath (the kubelet never updates a subPath mount, so quotad could not "
            "reload its config)",
        )
        check(
            volumes.get(mount.get("name"), {}).get("configMap", {}).get("name")
            == configmap["metadata"]["name"],
            f"{name}: {CONFIG_DIR} is not the quotad.toml ConfigMap",
        )
        annotations = pod["metadata"].get("annotations", {})
        key = "checksum/config" if mode == "standalone" else "checksum/quotad-config"
        check(
            re.fullmatch("[0-9a-f]{64}", annotations.get(key, "")),
            f"{name}: {key} must be a sha256 (of the settings that need a restart)",
        )
        tgps = pod["spec"].get("terminationGracePeriodSeconds", 30)
        check(
            tgps > grace, f"{name}: terminationGracePeriodSeconds {tgps} <= shutdown grace {grace}"
        )
        for env_name, ref in (
            ("QUOTAD_ADMIN_TOKEN", merged["secrets"]["adminToken"]),
            ("QUOTAD_QUOTA_TOKEN", merged["secrets"]["quotaToken"]),
            ("QUOTAD_PAYMENTS_TOKEN", merged["secrets"]["paymentsToken"]),
            ("QUOTAD_PAYMENTS_HMAC_SECRET", merged["secrets"]["paymentsHmacSecret"]),
            ("QUOTAD_NOTIFICATIONS_HMAC_SECRET", merged["secrets"]["notificationsHmacSecret"]),
            ("QUOTAD_ACCOUNT_TOKEN_KEYS", merged["secrets"]["accountTokenKeys"]),
            ("QUOTAD_REDIS_PASSWORD", redis["password"] if want_kind == "redis" else {}),
        ):
            if ref.get("existingSecret") or ref.get("value"):
                check(env_name in env, f"{name}: {env_name} missing")
                check(
                    "secretKeyRef" in env[env_name].get("valueFrom", {}),
                    f"{name}: {env_name} not from a Secret",
                )
            else:
                check(env_name not in env, f"{name}: {env_name} set without a secret")
        journal = env.get("QUOTAD_STORE__REDIS__JOURNAL_DIR", {}).get("value")
        if want_kind == "redis":
            # Owned mode's outage journal: a writable volume of the pod's own, which outlives a
            # container restart (the root filesystem is read-only).
            check(journal in mounts, f"{name}: the outage journal {journal} is not mounted")
            check(
                "emptyDir" in volumes.get(mounts.get(journal, {}).get("name"), {}),
                f"{name}: the outage journal is not an emptyDir of the pod",
            )
        else:
            check(journal is None, f"{name}: an outage journal without Redis")
        if merged["otel"]["endpoint"]:
            check(
                env.get("OTEL_EXPORTER_OTLP_ENDPOINT", {}).get("value")
                == merged["otel"]["endpoint"],
                f"{name}: OTEL_EXPORTER_OTLP_ENDPOINT",
            )
            check(env.get("OTEL_SERVICE_NAME", {}).get("value"), f"{name}: OTEL_SERVICE_NAME")
        else:
            check("OTEL_EXPORTER_OTLP_ENDPOINT" not in env, f"{name}: OTLP endpoint set while off")
        for probe in ("readinessProbe", "livenessProbe"):
            p = c.get(probe) or {}
            if tls["enabled"]:
                want_path = "/readyz" if probe == "readinessProbe" else "/healthz"
                got = p.get("httpGet", {})
                check(
                    got.get("path") == want_path and got.get("port") == ports["http"],
                    f"{name}: {probe} must be GET {want_path} on {ports['http']} with TLS on",
                )
            else:
                check(
                    p.get("grpc", {}).get("port") == ports["grpc"], f"{name}: {probe} must be gRPC"
                )
                check("service" not in p["grpc"], f'{name}: {probe} must check service ""')
        if tls["enabled"]:
            check(
                mounts.get(TLS_DIR, {}).get("readOnly"),
                f"{name}: TLS Secret not mounted at {TLS_DIR}",
            )
            tls_volume = volumes.get(mounts[TLS_DIR]["name"], {})
            check(
                tls_volume.get("secret", {}).get("secretName") == tls["secretName"],
                f"{name}: TLS volume",
            )

    if mode == "standalone":
        check(len(servers) == 1, f"{len(servers)} quotad Deployments and StatefulSets, want 1")
        check(len(quotad_pods) == 1, "the server must run quotad")
        dep = servers[0]
        workload = "StatefulSet" if persistent else "Deployment"
        check(
            dep["kind"] == workload,
            f"quotad runs as a {dep['kind']}, want a {workload} (persistent: {persistent})",
        )
        check_data_volume(objects, dep, merged, persistent)
        services = [s for s in of_kind(objects, "Service") if s["spec"].get("clusterIP") != "None"]
        check(len(services) == 1, f"{len(services)} Services, want 1")
        service_ports = {p["name"]: p["port"] for p in services[0]["spec"]["ports"]}
        want_ports = {"grpc": ports["grpc"], "http": ports["http"]}
        if merged["admin"]["separatePort"]:
            want_ports["admin"] = ports["admin"]
        check(service_ports == want_ports, f"Service ports {service_ports}, want {want_ports}")
        selector = services[0]["spec"]["selector"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        check(
            all(labels.get(k) == v for k, v in selector.items()),
            "the Service selects no quotad pod",
        )
        hpas = of_kind(objects, "HorizontalPodAutoscaler")
        if merged["autoscaling"]["enabled"]:
            check(
                len(hpas) == 1 and "replicas" not in dep["spec"], "HPA: one HPA, no fixed replicas"
            )
            metric = hpas[0]["spec"]["metrics"][0]
            check(metric["resource"]["name"] == "cpu", "HPA must scale on CPU")
        else:
            check(not hpas and dep["spec"]["replicas"] == merged["replicas"], "replicas")
        pdbs = of_kind(objects, "PodDisruptionBudget")
        check(bool(pdbs) == merged["podDisruptionBudget"]["enabled"], "PodDisruptionBudget")
        for pdb in pdbs:
            # One replica on the embedded store: a pod that is not ready must stay evictable, or
            # it holds its node's drain for good.
            policy = pdb["spec"].get("unhealthyPodEvictionPolicy")
            want_policy = "AlwaysAllow" if want_kind == "memory" else None
            check(
                policy == want_policy,
                f"PDB unhealthyPodEvictionPolicy {policy}, want {want_policy}",
            )
        monitors = of_kind(objects, "ServiceMonitor")
        check(len(monitors) == int(merged["serviceMonitor"]["enabled"]), "ServiceMonitor")
        for m in monitors:
            ep = m["spec"]["endpoints"][0]
            check(
                ep["port"] == "http" and ep["path"] == "/metrics",
                "ServiceMonitor scrapes http /metrics",
            )
        policies = [
            p
            for p in of_kind(objects, "NetworkPolicy")
            if p["metadata"]["name"] == dep["metadata"]["name"]
        ]
        check(len(policies) == int(merged["networkPolicy"]["enabled"]), "NetworkPolicy")
        for np in policies:
            ingress_ports = {p["port"] for rule in np["spec"]["ingress"] for p in rule["ports"]}
            check({ports["grpc"], ports["http"]} <= ingress_ports, "NetworkPolicy ingress ports")
            egress_ports = {
                p["port"] for rule in np["spec"]["egress"] for p in rule.get("ports", [])
            }
            check(53 in egress_ports, "NetworkPolicy must allow DNS")
            if want_kind == "redis":
                check(egress_ports - {53}, "NetworkPolicy must allow Redis")
            if merged["otel"]["endpoint"]:
                port = int(
                    re.search(r":(\d+)", merged["otel"]["endpoint"].split("//", 1)[1]).group(1)
                )
                check(port in egress_ports, "NetworkPolicy must allow the OTLP port")
    else:
        # Sidecar mode: no quotad Deployment; only the example frontend, when asked for.
        example = merged["sidecar"]["example"]["enabled"]
        check(not servers, "a quotad Deployment or StatefulSet in sidecar mode")
        for _, pod in quotad_pods:
            c = quotad_container(pod)
            assert c is not None
            check(
                all(m["name"] != DATA_VOLUME for m in c.get("volumeMounts", [])),
                "the sidecar mounts a data volume (its pod is the frontend's)",
            )
        check(
            not of_kind(objects, "Service") or redis["bundled"]["enabled"],
            "a quotad Service in sidecar mode",
        )
        check(not of_kind(objects, "HorizontalPodAutoscaler"), "an HPA in sidecar mode")
        for dep in deployments:
            names = [c["name"] for c in containers(dep["spec"]["template"])]
            check(
                example and dep["metadata"]["name"].endswith("-example-frontend"),
                f"Deployment {dep['metadata']['name']} in sidecar mode",
            )
            check(
                "frontend" in names and "quotad" in names,
                "the example runs frontend and quotad side by side",
            )
        check(len(deployments) == int(example), "the example frontend Deployment")
        for dep in deployments:
            pod = dep["spec"]["template"]
            frontend = [c for c in pod["spec"]["containers"] if c["name"] == "frontend"][0]
            scheme = "https" if tls["enabled"] else "http"
            want_addr = f"{scheme}://127.0.0.1:{ports['grpc']}"
            check(
                env_of(frontend).get("QUOTAD_ADDR", {}).get("value") == want_addr,
                f"QUOTAD_ADDR, want {want_addr}",
            )
            quotad = quotad_container(pod)
            assert quotad is not None
            if merged["sidecar"]["native"]:
                check(
                    quotad in pod["spec"].get("initContainers", []),
                    "a native sidecar is an init container",
                )
                check(
                    quotad.get("restartPolicy") == "Always",
                    "a native sidecar has restartPolicy Always",
                )
            else:
                check(quotad in pod["spec"]["containers"], "the sidecar is a container")

    check_monitoring(objects, merged, namespace)

    # Bundled Redis.
    sets = component(objects, "StatefulSet", "redis")
    check(
        len(of_kind(objects, "StatefulSet"))
        == len(sets) + len(component(objects, "StatefulSet", "server")),
        "a StatefulSet that is neither quotad's nor the bundled Redis",
    )
    check(len(sets) == int(redis["bundled"]["enabled"]), "the bundled Redis StatefulSet")
    for sts in sets:
        c = sts["spec"]["template"]["spec"]["containers"][0]
        line = " ".join(c.get("command", []) + c.get("args", []))
        check(line.startswith("redis-server"), "the bundled Redis runs redis-server")
        for flag in ("--appendonly yes", "--appendfsync everysec"):
            check(flag in line, f"the bundled Redis needs {flag}")
        check(
            sts["spec"].get("volumeClaimTemplates"), "the bundled Redis needs a volumeClaimTemplate"
        )
        headless = [
            s
            for s in of_kind(objects, "Service")
            if s["metadata"]["name"] == sts["spec"]["serviceName"]
        ]
        check(
            headless and headless[0]["spec"].get("clusterIP") == "None",
            "the bundled Redis needs a headless Service",
        )


def alert_rules() -> list[tuple[str, dict[str, Any]]]:
    """(group name, rule) of every rule in alerts/quotad.rules.yaml."""
    rules = yaml.safe_load(ALERTS.read_text())
    return [(g["name"], r) for g in rules["groups"] for r in g["rules"]]


def check_monitoring(objects: list[dict[str, Any]], merged: dict[str, Any], namespace: str) -> None:
    """The Grafana dashboard ConfigMap and the PrometheusRule: there exactly when asked for, and
    holding the chart's files."""
    dash = merged["grafanaDashboard"]
    key, value = dash["labelKey"], str(dash["labelValue"])
    boards = [
        o
        for o in of_kind(objects, "ConfigMap")
        if (o["metadata"].get("labels") or {}).get(key) == value
    ]
    want = int(dash["enabled"])
    check(len(boards) == want, f"{len(boards)} ConfigMaps labelled {key}={value!r}, want {want}")
    for board in boards:
        meta = board["metadata"]
        check(
            set(board["data"]) == {"quotad.json"}, "the dashboard ConfigMap holds quotad.json only"
        )
        check(
            json.loads(board["data"]["quotad.json"]) == json.loads(DASHBOARD.read_text()),
            "the dashboard ConfigMap must hold dashboards/quotad.json",
        )
        check(len(board["data"]["quotad.json"]) < 900_000, "the dashboard must fit a ConfigMap")
        check(
            meta.get("namespace") == (dash["namespace"] or None),
            f"dashboard namespace {meta.get('namespace')!r}, want {dash['namespace']!r}",
        )
        check(
            (meta.get("annotations") or {}) == dash["annotations"],
            "the dashboard ConfigMap's annotations",
        )
        for label in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "helm.sh/chart"):
            check(label in meta["labels"], f"the dashboard ConfigMap lacks the label {label}")

    config = merged["prometheusRule"]
    found = of_kind(objects, "PrometheusRule")
    want = int(config["enabled"])
    check(len(found) == want, f"{len(found)} PrometheusRules, want {want}")
    for rule in found:
        labels = rule["metadata"]["labels"]
        for k, v in config["labels"].items():
            check(labels.get(k) == v, f"the PrometheusRule lacks the label {k}={v}")
        check(
            labels.get("app.kubernetes.io/instance") and labels.get("helm.sh/chart"),
            "the PrometheusRule carries the chart's labels",
        )
        expected = [(g, r) for g, r in alert_rules() if r["alert"] not in config["disabled"]]
        rendered = [(g["name"], r) for g in rule["spec"]["groups"] for r in g["rules"]]
        check(
            [r["alert"] for _, r in rendered] == [r["alert"] for _, r in expected],
            f"alerts {[r['alert'] for _, r in rendered]}, want those of {ALERTS.name} less "
            f"{config['disabled']}",
        )
        for (group, want_rule), (got_group, got) in zip(expected, rendered):
            name = got["alert"]
            check(got_group == group, f"{name}: group {got_group}, want {group}")
            check(
                got["expr"] == want_rule["expr"].replace("$namespace", namespace),
                f"{name}: expr is not the file's with the release's namespace",
            )
            check("$namespace" not in got["expr"], f"{name}: $namespace left in expr")
            check(got["for"] == want_rule["for"], f"{name}: for")
            check(
                got["labels"] == {**config["ruleLabels"], **want_rule["labels"]},
                f"{name}: labels {got['labels']}, want the file's over ruleLabels",
            )
            annotations = dict(want_rule["annotations"])
            if config["runbookBaseUrl"]:
                annotations["runbook_url"] = f"{config['runbookBaseUrl']}#{name.lower()}"
            check(got["annotations"] == annotations, f"{name}: annotations")


# ---------------------------------------------------------------- checks


class Checks:
    def __init__(self, report: Report, write_configs: Path | None) -> None:
        self.report = report
        self.chart = helm.Chart.load(CHART)
        self.write_configs = write_configs

    def release(
        self, label: str, values: dict[str, Any], name: str = "quotad"
    ) -> list[dict[str, Any]]:
        objects = render(self.chart, values, name=name)
        self.report.renders += 1
        for o in objects:
            kube_validate(o)
        self.report.manifests += len(objects)
        check_release(objects, values, self.chart.merge_values(values), namespace="quotad")
        if self.write_configs is not None:
            text, _ = config_of(objects)
            (self.write_configs / f"{label}.toml").write_text(text)
        return objects

    def lint(self) -> None:
        for values in [None] + [load_values(p) for p in sorted(EXAMPLES.glob("*.yaml"))]:
            result = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
            problems = list(result.get("errors") or [])
            problems += [
                f"{m['path']}: {m['error']}"
                for m in result.get("messages") or []
                if m["severity"] >= 2
            ]
            check(not problems, "helm lint: " + "; ".join(problems))

    def metadata(self) -> None:
        meta = self.chart.metadata
        check(meta.get("apiVersion") == "v2", "Chart.yaml apiVersion must be v2")
        helpers = (CHART / "templates" / "_helpers.tpl").read_text()
        pinned = re.search(r'define "quotad.appVersion" -}}([^{]*){{', helpers)
        check(
            pinned and pinned.group(1) == meta.get("appVersion"),
            "quotad.appVersion must equal Chart.yaml appVersion",
        )
        cargo = tomllib.loads((CRATE / "Cargo.toml").read_text())
        version = cargo["package"]["version"]
        check(
            meta.get("appVersion") == version,
            f"appVersion {meta.get('appVersion')} != crate version {version}",
        )
        schema = json.loads((CHART / "values.schema.json").read_text())
        jsonschema.Draft7Validator.check_schema(schema)
        check(
            schema.get("$schema", "").startswith("http://json-schema.org/draft-07/"),
            "schema must be draft-07",
        )
        self.chart.validate_schema(self.chart.values)

    def config_rolls(self) -> None:
        """What quotad reloads from its mounted file changes the ConfigMap and leaves the pod
        template alone; what it reads only at start changes the checksum annotation, which rolls
        the pods. In both modes (sidecar: the frontend's pods)."""
        modes = (
            ("standalone", {}, "checksum/config"),
            (
                "sidecar",
                {"mode": "sidecar", "sidecar": {"example": {"enabled": True}}},
                "checksum/quotad-config",
            ),
        )
        for mode, mode_values, key in modes:

            def rendered(values: dict[str, Any]) -> tuple[dict[str, Any], str]:
                objects = render(self.chart, {**mode_values, **values})
                pods = [pod for _, pod in pod_specs(objects) if quotad_container(pod)]
                check(len(pods) == 1, f"{mode}: one workload runs quotad")
                text, _ = config_of(objects)
                return pods[0], text

            base_pod, base_text = rendered({})
            check(rendered({}) == (base_pod, base_text), f"{mode}: rendering must be stable")
            for label, values in RELOADED:
                pod, text = rendered(values)
                check(text != base_text, f"{mode}: {label}: quotad.toml must change")
                check(
                    pod == base_pod,
                    f"{mode}: {label} is reloaded by quotad, but the pod template changes "
                    f"(annotations {pod['metadata'].get('annotations')} vs "
                    f"{base_pod['metadata'].get('annotations')})",
                )
            for label, values in NEED_RESTART:
                pod, _ = rendered(values)
                check(
                    pod["metadata"]["annotations"].get(key)
                    != base_pod["metadata"]["annotations"].get(key),
                    f"{mode}: {label} needs a restart, but {key} does not change",
                )
            pod, _ = rendered({"secrets": {"adminToken": {"value": "another-token"}}})
            check(
                pod["metadata"]["annotations"].get(f"{key}-secret")
                != base_pod["metadata"]["annotations"].get(f"{key}-secret"),
                f"{mode}: a new secret value must change {key}-secret",
            )

    def notes(self, values: dict[str, Any]) -> str:
        files = self.chart.render(values, name="quotad", namespace="quotad", is_install=True)
        found = [text for path, text in files.items() if path.endswith("NOTES.txt")]
        check(len(found) == 1, "NOTES.txt")
        return found[0]

    def persistence(self) -> None:
        """The embedded store's data dir: on a claim by default (a StatefulSet), gone with
        persistence off (the old Deployment), untouched on Redis; NOTES.txt says what a restart
        keeps. check_release and check_data_volume check each release in detail."""

        def server(objects: list[dict[str, Any]]) -> dict[str, Any]:
            found = server_workloads(objects)
            check(len(found) == 1, f"{len(found)} quotad workloads, want 1")
            return found[0]

        # Embedded, the defaults: a StatefulSet whose claim is mounted where quotad.toml puts
        # the data dir.
        objects = render(self.chart, {})
        sts = server(objects)
        check(sts["kind"] == "StatefulSet", f"embedded store, defaults: a {sts['kind']}")
        c = quotad_container(sts["spec"]["template"])
        assert c is not None
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        _, config = config_of(objects)
        check(
            config["store"] == {"kind": "memory", "data_dir": "/var/lib/quotad"}
            and mounts.get(DATA_VOLUME) == "/var/lib/quotad",
            f"embedded store, defaults: store {config['store']}, mounts {mounts}",
        )
        notes = self.notes({})
        check(
            "Everything" in notes
            and "/var/lib/quotad" in notes
            and "quotad-data-quotad-0" in notes,
            f"NOTES.txt must say that the embedded store's data survives, and where:\n{notes}",
        )

        # The volume's shape, another mount path, a pre-bound volume, an existing claim.
        custom = {
            "persistence": {
                "size": "5Gi",
                "storageClass": "fast-ssd",
                "accessModes": ["ReadWriteOncePod"],
                "mountPath": "/data/quotad",
            }
        }
        objects = self.release("embedded-custom-volume", custom)
        _, config = config_of(objects)
        check(config["store"].get("data_dir") == "/data/quotad", "data_dir follows mountPath")
        self.release("embedded-prebound-volume", {"persistence": {"storageClass": "-"}})
        claim = {"persistence": {"existingClaim": "quotad-balances"}}
        objects = self.release("embedded-existing-claim", claim)
        check(
            "volumeClaimTemplates" not in server(objects)["spec"],
            "existingClaim: no claim template",
        )
        check("quotad-balances" in self.notes(claim), "NOTES.txt names the existing claim")
        # A new data dir is a restart: the pod template changes (checksum and mount alike).
        base = server(render(self.chart, {}))["spec"]["template"]["metadata"]["annotations"]
        moved = server(render(self.chart, custom))["spec"]["template"]["metadata"]["annotations"]
        check(base["checksum/config"] != moved["checksum/config"], "a new data dir rolls the pod")

        # Persistence off: the Deployment as before, no claim, and NOTES.txt warns.
        off = {"persistence": {"enabled": False}}
        objects = self.release("embedded-no-persistence", off)
        dep = server(objects)
        check(dep["kind"] == "Deployment", f"persistence off: a {dep['kind']}")
        check(
            not of_kind(objects, "StatefulSet") and not of_kind(objects, "PersistentVolumeClaim"),
            "persistence off: no StatefulSet, no claim",
        )
        notes = self.notes(off)
        check(
            "WARNING: nothing" in notes and "restarts" in notes,
            f"NOTES.txt must warn that nothing survives a restart:\n{notes}",
        )

        # Redis: the Deployment, whatever persistence says.
        for label, redis in (
            ("redis-url", {"url": "redis://redis.example:6379"}),
            ("redis-bundled", {"bundled": {"enabled": True}}),
        ):
            on = self.release(f"{label}-persistence-ignored", {"redis": redis, "replicas": 2})
            without = render(self.chart, {"redis": redis, "replicas": 2, **off})
            check(server(on)["kind"] == "Deployment", f"{label}: a Deployment")
            check(
                [strip(o) for o in on] == [strip(o) for o in without],
                f"{label}: persistence must not change what the chart renders on Redis",
            )
            check(
                all(
                    o["spec"].get("volumeClaimTemplates") is None
                    for o in component(on, "StatefulSet", "server")
                ),
                f"{label}: no quotad claim",
            )
            notes = self.notes({"redis": redis})
            check("state in Redis" in notes, f"NOTES.txt, Redis: {notes}")

        # Redis behind Sentinel: the URL passes, and the NetworkPolicy lets quotad reach every
        # sentinel it names and the masters they name.
        sentinel = "redis+sentinel://s1.example:26379,s2.example:26380/mymaster"
        objects = self.release(
            "redis-sentinel", {"redis": {"url": sentinel}, "networkPolicy": {"enabled": True}}
        )
        egress = {
            p["port"]
            for np in of_kind(objects, "NetworkPolicy")
            for rule in np["spec"]["egress"]
            for p in rule.get("ports", [])
        }
        check({26379, 26380, 6379} <= egress, f"Sentinel: egress ports {egress}")

        # Sidecar mode: the frontend owns the pod, so no data dir, and NOTES.txt warns.
        notes = self.notes({"mode": "sidecar"})
        check("WARNING: nothing" in notes, f"NOTES.txt, sidecar on the embedded store: {notes}")

    def monitoring(self) -> None:
        """The dashboard and the alerts, with every value that shapes them, in both modes."""
        values = {
            "grafanaDashboard": {
                "enabled": True,
                "labelKey": "example.com/dashboard",
                "labelValue": "quotad",
                "namespace": "grafana",
                "annotations": {"grafana_folder": "Quotas"},
            },
            "prometheusRule": {
                "enabled": True,
                "labels": {"release": "kube-prometheus-stack"},
                "ruleLabels": {"team": "billing", "severity": "never-wins"},
                "disabled": ["QuotadShedding"],
                "runbookBaseUrl": "https://runbooks.example.com/quotad",
            },
        }
        self.release("monitoring-standalone", values)
        self.release("monitoring-sidecar", {**values, "mode": "sidecar"})
        # Every selector of a quotad series in the alerts is limited to the release's namespace.
        for _, rule in alert_rules():
            for selector in re.finditer(r"quotad_\w+(\{[^}]*\})?", rule["expr"]):
                check(
                    'namespace="$namespace"' in (selector.group(1) or ""),
                    f"{rule['alert']}: {selector.group(0)} lacks namespace=\"$namespace\"",
                )

    def promql(self) -> None:
        """Every PromQL expression of the dashboard's panels and of the alerts parses (a
        PrometheusRule with a broken expression is refused by the operator's webhook, a panel
        just stays empty)."""
        exprs = [
            (f"panel {panel.get('title')!r}", target["expr"])
            for panel in json.loads(DASHBOARD.read_text())["panels"]
            for target in panel.get("targets", [])
        ]
        exprs += [(f"alert {rule['alert']}", rule["expr"]) for _, rule in alert_rules()]
        check(exprs, "no PromQL found")
        for where, expr in exprs:
            # Grafana's interval variables stand where PromQL has a duration.
            plain = re.sub(r"\$__\w+", "5m", expr)
            try:
                promql_parser.parse(plain)
            except Exception as e:
                raise Failure(f"{where}: {e}: {expr}") from None

    def toml_numbers(self) -> None:
        values = {
            "config": {
                "plans": {
                    "team": {
                        "limit_5h_micros": 500000000,
                        "limit_weekly_micros": 9007199254740991,
                        "overage": "credits",
                    }
                },
                "pricing": {"models": {"gpt-5.5": {"input_per_mtok_micros": 100000000}}},
                "default_plan": 'quote " and \\ backslash',
            }
        }
        _, config = config_of(render(self.chart, values))
        team = config["plans"]["team"]
        check(team["limit_5h_micros"] == 500000000, f"limit_5h_micros {team['limit_5h_micros']!r}")
        check(team["limit_weekly_micros"] == 9007199254740991, "2^53-1 must survive exactly")
        check(
            config["pricing"]["models"]["gpt-5.5"]["input_per_mtok_micros"] == 100000000,
            "quoted keys",
        )
        check(config["default_plan"] == 'quote " and \\ backslash', "string escaping")

    def bad_values(self) -> None:
        files = sorted(BAD_VALUES.glob("*.yaml"))
        check(files, "no bad-values files")
        for path in files:
            first = path.read_text().splitlines()[0]
            m = re.match(r"#\s*expect:\s*(.+)$", first)
            check(m, f"{path.name}: the first line must be '# expect: <part of the error>'")
            expected = m.group(1).strip()
            values = load_values(path)
            try:
                render(self.chart, values)
            except (helm.HelmValuesError, helm.HelmRenderError) as e:
                message = str(e)
                check(
                    expected in message,
                    f"{path.name}: rejected, but the error does not say {expected!r}: {message}",
                )
                if isinstance(e, helm.HelmValuesError):
                    # The schema alone rejects it, as `helm install` would before rendering.
                    try:
                        self.chart.validate_schema(self.chart.merge_values(values))
                    except helm.HelmValuesError:
                        pass
                    else:
                        raise Failure(f"{path.name}: validate_schema accepted it")
            else:
                raise Failure(f"{path.name}: accepted, but must be rejected ({expected})")

    def parent_chart(self) -> None:
        """A frontend chart that depends on quotad and includes the sidecar templates, as the
        chart's README tells: by the dependency's name, and with an alias."""
        for key, arg in (("quotad", "."), ("quota", '(dict "root" $ "values" .Values.quota)')):
            with tempfile.TemporaryDirectory() as tmp:
                parent = Path(tmp) / "frontend"
                (parent / "templates").mkdir(parents=True)
                shutil.copytree(CHART, parent / "charts" / "quotad")
                alias = f"\n    alias: {key}" if key != "quotad" else ""
                (parent / "Chart.yaml").write_text(PARENT_CHART + alias + "\n")
                (parent / "values.yaml").write_text(PARENT_VALUES.replace("quotad:", f"{key}:"))
                template = PARENT_DEPLOYMENT.replace("ARG", arg)
                (parent / "templates" / "deployment.yaml").write_text(template)
                objects = render(helm.Chart.load(parent), {}, name="shop", namespace="shop")
                self.check_parent(objects, key)

    def check_parent(self, objects: list[dict[str, Any]], key: str) -> None:
        for o in objects:
            kube_validate(o)
        self.report.manifests += len(objects)
        deployments = of_kind(objects, "Deployment")
        names = [d["metadata"]["name"] for d in deployments]
        check(names == ["shop-frontend"], f"{key}: Deployments {names}, want the frontend's only")
        pod = deployments[0]["spec"]["template"]
        quotad = quotad_container(pod)
        check(quotad is not None, f"{key}: the frontend's pod runs quotad")
        assert quotad is not None
        check("QUOTAD_ADMIN_TOKEN" in env_of(quotad), f"{key}: the sidecar gets the admin token")
        text, config = config_of(objects)
        check(config["store"]["kind"] == "redis", f"{key}: the subchart's ConfigMap uses Redis")
        configmap = of_kind(objects, "ConfigMap")[0]["metadata"]["name"]
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        check(
            volumes["quotad-config"]["configMap"]["name"] == configmap,
            f"{key}: the sidecar mounts the subchart's ConfigMap",
        )
        annotations = pod["metadata"]["annotations"]
        check(
            re.fullmatch("[0-9a-f]{64}", annotations.get("checksum/quotad-config", "")),
            f"{key}: the sidecar's checksum annotation",
        )
        frontend = pod["spec"]["containers"][0]
        addr = env_of(frontend)["QUOTAD_ADDR"]["value"]
        check(addr == "http://127.0.0.1:50051", f"{key}: QUOTAD_ADDR {addr}")
        check_security(objects)

    def examples(self) -> None:
        files = sorted(EXAMPLES.glob("*.yaml"))
        check(len(files) >= 5, "fewer than five example values files")
        for path in files:
            self.report.run(
                f"example {path.name}", lambda p=path: self.release(p.stem, load_values(p))
            )


# Settings quotad reloads from its mounted config while running: changing them must not roll pods.
RELOADED: list[tuple[str, dict[str, Any]]] = [
    ("a plan's limit", {"config": {"plans": {"plus": {"limit_5h_micros": 123000000}}}}),
    (
        "a new plan",
        {
            "config": {
                "plans": {
                    "team": {
                        "limit_5h_micros": 500000000,
                        "limit_weekly_micros": 2500000000,
                        "overage": "credits",
                    }
                }
            }
        },
    ),
    ("a price", {"config": {"pricing": {"models": {"gpt-5.5": {"input_per_mtok_micros": 1}}}}}),
    ("the price sheet's version", {"config": {"pricing": {"version": "2027-01-01"}}}),
    ("default_plan", {"config": {"default_plan": "go"}}),
    ("a product", {"config": {"products": {"excel": {"credits": False}}}}),
    ("limits", {"config": {"limits": {"max_ttl_seconds": 3600}}}),
    ("top_up", {"config": {"top_up": {"max_declines": 5}}}),
    ("shadow", {"config": {"shadow": True}}),
    ("a plan's shadow flag", {"config": {"plans": {"free": {"shadow": True}}}}),
]

# Settings quotad reads only when it starts: changing them must roll pods.
NEED_RESTART: list[tuple[str, dict[str, Any]]] = [
    ("the store", {"redis": {"url": "redis://redis.example:6379"}}),
    ("store.redis tuning", {"config": {"store": {"redis": {"command_timeout_ms": 40}}}}),
    ("server limits", {"config": {"server": {"max_concurrent_requests": 100}}}),
    ("worker threads", {"config": {"server": {"worker_threads": 2}}}),
    ("log_level", {"config": {"log_level": "debug"}}),
    ("telemetry", {"config": {"telemetry": {"metrics_interval_ms": 5000}}}),
    ("payments", {"config": {"payments": {"retry_attempts": 5}}}),
    ("notifications", {"config": {"notifications": {"low_balance_micros": 5000000}}}),
    ("the grace period", {"shutdownGraceSeconds": 25}),
    ("the admin listener", {"admin": {"separatePort": True}}),
]

PARENT_CHART = """\
apiVersion: v2
name: frontend
version: 1.0.0
dependencies:
  - name: quotad
    version: 0.1.0
    repository: file://../quotad"""

PARENT_VALUES = """\
image: example/frontend:1.0
quotad:
  mode: sidecar
  secrets:
    adminToken:
      existingSecret: tokens
      key: admin
  redis:
    url: redis://redis:6379
"""

PARENT_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-frontend
spec:
  replicas: 2
  selector:
    matchLabels:
      app: frontend
  template:
    metadata:
      labels:
        app: frontend
        app.kubernetes.io/instance: {{ .Release.Name }}
      annotations:
        {{- include "quotad.sidecarAnnotations" ARG | nindent 8 }}
    spec:
      automountServiceAccountToken: false
      containers:
        - name: frontend
          image: {{ .Values.image }}
          env:
            - name: QUOTAD_ADDR
              value: {{ include "quotad.sidecarAddress" ARG | quote }}
          resources:
            requests: {cpu: 100m, memory: 64Mi}
            limits: {cpu: "1", memory: 256Mi}
          securityContext:
            runAsNonRoot: true
            runAsUser: 65532
            runAsGroup: 65532
            readOnlyRootFilesystem: true
            allowPrivilegeEscalation: false
            capabilities: {drop: [ALL]}
            seccompProfile: {type: RuntimeDefault}
        {{- include "quotad.sidecarContainer" ARG | nindent 8 }}
      volumes:
        {{- include "quotad.sidecarVolumes" ARG | nindent 8 }}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-configs", type=Path, help="write each rendered quotad.toml here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    if args.write_configs:
        args.write_configs.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    helm.disable_logging()
    report = Report(args.verbose)
    checks = Checks(report, args.write_configs)
    report.run("chart metadata and schema", checks.metadata)
    report.run("helm lint (strict)", checks.lint)
    report.run("standalone defaults", lambda: checks.release("standalone-defaults", {}))
    report.run(
        "standalone, release name without the chart name",
        lambda: checks.release("standalone-named", {}, name="prod"),
    )
    report.run("sidecar defaults", lambda: checks.release("sidecar-defaults", {"mode": "sidecar"}))
    report.run(
        "sidecar with bundled Redis and TLS",
        lambda: checks.release(
            "sidecar-bundled-tls",
            {
                "mode": "sidecar",
                "redis": {"bundled": {"enabled": True}},
                "tls": {"enabled": True, "secretName": "quotad-tls", "clientAuth": False},
                "sidecar": {"example": {"enabled": True, "replicas": 2}},
            },
        ),
    )
    checks.examples()
    report.run("the embedded store's data dir and what a restart keeps", checks.persistence)
    report.run("only settings quotad cannot reload roll the pods", checks.config_rolls)
    report.run("Grafana dashboard and PrometheusRule", checks.monitoring)
    report.run("the dashboard's and the alerts' PromQL parses", checks.promql)
    report.run("integers stay integers in quotad.toml", checks.toml_numbers)
    report.run("bad values are rejected", checks.bad_values)
    report.run("a frontend chart includes the sidecar templates", checks.parent_chart)

    elapsed = time.monotonic() - started
    bad = len(list(BAD_VALUES.glob("*.yaml")))
    print(
        f"chart checks: {report.renders} releases rendered, {report.manifests} manifests valid for "
        f"Kubernetes {KUBE_VERSION} (strict), {bad} bad values files rejected, {elapsed:.1f}s"
    )
    print(f"{report.passed} passed, {len(report.failed)} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
