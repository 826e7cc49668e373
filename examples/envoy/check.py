"""Checks envoy.yaml and ../istio/envoyfilter.yaml against Envoy's v3 API without an Envoy
binary: every field name, enum value and scalar type, and the type behind every `typed_config`
(`@type`), by reading them into the API's message classes (the envoy-data-plane package).

    python -m venv .venv && .venv/bin/pip install -r requirements.txt
    .venv/bin/python check.py [ENVOY_YAML [ENVOYFILTER_YAML]]

Exits 1 naming every part that Envoy's API does not accept. What this cannot see: Envoy's own
checks beyond the schema (required fields, ranges, that a named cluster exists); the project's
tests check the parts that matter for quotad (the cluster, its port and HTTP/2, the domain and
descriptor keys against quotad's rules).
"""

import importlib
import os
import pkgutil
import sys

import envoy_data_plane
import yaml


def load_every_type():
    # A typed_config is found by its type URL among the message classes imported so far, so
    # every module is imported, as an Envoy binary knows every extension built into it.
    for module in pkgutil.walk_packages(envoy_data_plane.__path__, "envoy_data_plane."):
        importlib.import_module(module.name)


def main(argv):
    here = os.path.dirname(os.path.abspath(__file__))
    envoy_yaml = argv[1] if len(argv) > 1 else os.path.join(here, "envoy.yaml")
    filter_yaml = (
        argv[2] if len(argv) > 2 else os.path.join(here, "..", "istio", "envoyfilter.yaml")
    )
    load_every_type()
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster
    from envoy_data_plane.envoy.config.route.v3 import Route, VirtualHost
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpFilter,
    )

    # What each EnvoyFilter `applyTo` patches, as Envoy's message.
    patched = {
        "HTTP_FILTER": HttpFilter,
        "VIRTUAL_HOST": VirtualHost,
        "HTTP_ROUTE": Route,
        "CLUSTER": Cluster,
    }
    problems = []

    def check(label, message, value):
        try:
            message.from_dict(value)
            print(f"ok    {label}")
        except (KeyError, TypeError, ValueError) as err:
            problems.append(label)
            print(f"WRONG {label}: {err}")

    with open(envoy_yaml) as f:
        check(f"{os.path.relpath(envoy_yaml)} as Bootstrap", Bootstrap, yaml.safe_load(f))
    with open(filter_yaml) as f:
        envoy_filter = yaml.safe_load(f)
    for n, patch in enumerate(envoy_filter["spec"]["configPatches"], 1):
        apply_to = patch["applyTo"]
        label = f"{os.path.relpath(filter_yaml)} patch {n} ({apply_to})"
        if apply_to not in patched:
            problems.append(label)
            print(f"WRONG {label}: check.py knows {', '.join(patched)}")
            continue
        check(label, patched[apply_to], patch["patch"]["value"])
    if problems:
        print(f"{len(problems)} wrong")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
