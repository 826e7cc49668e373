#!/usr/bin/env python3
"""Checks of the quotad Helm chart, offline.

Lints the chart, renders it for both modes and for every values file in helm/quotad/examples,
validates every manifest against the Kubernetes OpenAPI schemas (kubernetes-validate, strict, a
fixed Kubernetes version; the ServiceMonitor and PrometheusRule, which are CRDs, against small
schemas of their own), checks the properties the chart promises (among them that the Grafana
dashboard and the alerts are the files in the chart, and that only settings quotad cannot reload
roll the pods), renders a frontend chart that includes the sidecar templates, and checks that
every file in helm/tests/bad-values is rejected with the message its first line announces
(`# expect: ...`).

Needs the packages helm-python-sdk, kubernetes-validate and promql-parser (tests/helm_chart.rs
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
            check(re.match(r"^rediss?://[^@]+$", url), f"store.redis.url {url!r}")
    tls = merged["tls"]
    if tls["enabled"]:
        want = {"cert_file": f"{TLS_DIR}/tls.crt", "key_file": f"{TLS_DIR}/tls.key"}
        if tls["clientAuth"]:
            want["client_ca_file"] = f"{TLS_DIR}/ca.crt"
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
    quotad_pods = [(o, p) for o, p in pod_specs(objects) if quotad_container(p)]
    for owner, pod in quotad_pods:
        name = f"{owner['kind']}/{owner['metadata']['name']}"
        c = quotad_container(pod)
        assert c is not None
        env = env_of(c)
        check(env.get("QUOTAD_CONFIG", {}).get("value") == CONFIG_PATH, f"{name}: QUOTAD_CONFIG")
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for m in c.get("volumeMounts", []):
            check(m["name"] in volumes, f"{name}: mount {m['name']} has no volume")
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
        check(len(deployments) == 1, f"{len(deployments)} Deployments, want 1")
        check(len(quotad_pods) == 1, "the Deployment must run quotad")
        dep = deployments[0]
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
        check(
            bool(of_kind(objects, "PodDisruptionBudget"))
            == merged["podDisruptionBudget"]["enabled"],
            "PodDisruptionBudget",
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
    sets = of_kind(objects, "StatefulSet")
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

    def release(self, label: str, values: dict[str, Any], name: str = "quotad") -> None:
        objects = render(self.chart, values, name=name)
        self.report.renders += 1
        for o in objects:
            kube_validate(o)
        self.report.manifests += len(objects)
        check_release(objects, values, self.chart.merge_values(values), namespace="quotad")
        if self.write_configs is not None:
            text, _ = config_of(objects)
            (self.write_configs / f"{label}.toml").write_text(text)

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
                deployments = of_kind(objects, "Deployment")
                check(len(deployments) == 1, f"{mode}: one Deployment")
                text, _ = config_of(objects)
                return deployments[0]["spec"]["template"], text

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
    ("log_level", {"config": {"log_level": "debug"}}),
    ("telemetry", {"config": {"telemetry": {"metrics_interval_ms": 5000}}}),
    ("payments", {"config": {"payments": {"retry_attempts": 5}}}),
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
