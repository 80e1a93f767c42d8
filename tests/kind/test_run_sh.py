"""Dry runs of e2e/kind/run.sh with stub tools, and shellcheck.

The kind backend cannot run here (no Docker, no internet). What can be checked is that the
script is well-formed and drives the tools the way it should: `docker`, `kind`, `kubectl`,
`helm`, `curl` and `cargo` are replaced by a stub that records every call and answers like
the real tool would for this script (canned cluster: a control plane and two workers on a
`kind` network 172.18.0.0/16). The assertions tie the script to the rest of the repository:
the Helm values it sets exist, the DaemonSet it waits for is the one the chart renders, the
CRDs it waits for are the chart's CRDs, flannel is switched to host-gw before it is applied,
and a failing step still tears the cluster down.

Run from the repository root:  python3 -m pytest tests/kind -q
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RUN_SH = REPO / "e2e" / "kind" / "run.sh"
CLUSTER = "pal-dry"
NODES = [f"{CLUSTER}-control-plane", f"{CLUSTER}-worker", f"{CLUSTER}-worker2"]
MACS = {
    NODES[0]: "02:42:ac:12:00:02",
    NODES[1]: "02:42:ac:12:00:03",
    NODES[2]: "02:42:ac:12:00:04",
}
VIP = "172.18.255.200"

# One stub for every tool: it appends its argv (JSON) to $STUB_LOG, saves any file or stdin
# it is given to apply, and prints what the real tool would print for the calls run.sh makes.
STUB = r'''#!/usr/bin/env python3
import hashlib, io, json, os, sys, tarfile
tool = os.path.basename(sys.argv[0]); args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps([tool] + args) + "\n")
fail = os.environ.get("STUB_FAIL", "")
if fail and " ".join([tool] + args).startswith(fail):
    sys.stderr.write("stub: failing on purpose\n"); sys.exit(1)
state = os.environ["STUB_STATE"]
nodes = json.loads(os.environ["STUB_NODES"]); macs = json.loads(os.environ["STUB_MACS"])
vip = os.environ["STUB_VIP"]

def save(name, data):
    with open(os.path.join(state, name), "wb") as f:
        f.write(data)

if tool == "kind":
    if args[:2] == ["get", "clusters"]:
        print("other-cluster")
    elif args[:2] == ["get", "nodes"]:
        print("\n".join(nodes))
    elif args[:2] == ["get", "kubeconfig"]:
        print("apiVersion: v1\nkind: Config")
elif tool == "docker":
    if args[:2] == ["network", "inspect"]:
        print("172.18.0.0/16 fc00:f853:ccd:e793::/64 ")
    elif args[0] == "inspect":
        print(macs.get(args[-1], "00:00:00:00:00:00"))
    elif args[0] == "exec" and "neigh" in args:
        print(f"{vip} dev eth0 lladdr {macs[nodes[1]]} REACHABLE")
    elif args[0] == "exec" and "-i" in args:
        sys.stdin.buffer.read()
elif tool == "curl":
    out = args[args.index("-o") + 1] if "-o" in args else None
    url = args[-1]
    if url.endswith(".tgz"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for p in ["bridge", "host-local", "loopback", "portmap", "macvlan"]:
                data = b"#!/bin/sh\n"
                info = tarfile.TarInfo("./" + p); info.size = len(data); info.mode = 0o755
                tar.addfile(info, io.BytesIO(data))
        open(out, "wb").write(buf.getvalue())
        save("cni.sha256", hashlib.sha256(buf.getvalue()).hexdigest().encode())
    elif url.endswith(".tgz.sha256"):
        digest = open(os.path.join(state, "cni.sha256")).read()
        open(out, "w").write(f"{digest}  {os.path.basename(url)[:-len('.sha256')]}\n")
    elif url.endswith("kube-flannel.yml"):
        open(out, "w").write(os.environ["STUB_FLANNEL"])
elif tool == "kubectl":
    rest = args[2:] if args[:1] == ["--context"] else args
    if rest[:1] == ["apply"] and "-f" in rest:
        src = rest[rest.index("-f") + 1]
        if src == "-":
            save("applied-stdin.yaml", sys.stdin.buffer.read())
        elif os.path.isfile(src):
            save("applied-" + os.path.basename(src), open(src, "rb").read())
    elif "jsonpath={.status.loadBalancer.ingress[0].ip}" in rest:
        print(vip, end="")
elif tool == "cargo":
    pass
'''

FLANNEL = """\
kind: ConfigMap
apiVersion: v1
metadata: {name: kube-flannel-cfg, namespace: kube-flannel}
data:
  net-conf.json: |
    {
      "Network": "10.244.0.0/16",
      "EnableNFTables": false,
      "Backend": {
        "Type": "vxlan"
      }
    }
"""


def run(tmp_path: Path, *argv: str, fail: str = "", flannel: str = FLANNEL) -> tuple[int, list[list[str]], str, Path]:
    stubs = tmp_path / "bin"
    state = tmp_path / "state"
    stubs.mkdir(exist_ok=True)
    state.mkdir(exist_ok=True)
    for tool in ["docker", "kind", "kubectl", "helm", "curl", "cargo"]:
        path = stubs / tool
        path.write_text(STUB)
        path.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    log.write_text("")
    env = {
        **os.environ,
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "STUB_LOG": str(log),
        "STUB_STATE": str(state),
        "STUB_FAIL": fail,
        "STUB_NODES": json.dumps(NODES),
        "STUB_MACS": json.dumps(MACS),
        "STUB_VIP": VIP,
        "STUB_FLANNEL": flannel,
        "PALISADE_E2E_KIND_CLUSTER": CLUSTER,
        "KEEP_CLUSTER": "0",
    }
    env.pop("ARTIFACTS", None)
    env.pop("PALISADE_E2E_LB_RANGE", None)
    proc = subprocess.run(
        ["bash", str(RUN_SH), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    calls = [json.loads(line) for line in log.read_text().splitlines() if line]
    return proc.returncode, calls, proc.stdout + proc.stderr, state


def find(calls: list[list[str]], *prefix: str) -> list[list[str]]:
    return [c for c in calls if c[: len(prefix)] == list(prefix)]


def index_of(calls: list[list[str]], pred) -> int:
    for i, c in enumerate(calls):
        if pred(c):
            return i
    raise AssertionError("no such call")


def kubectl_args(call: list[str]) -> list[str]:
    assert call[:3] == ["kubectl", "--context", f"kind-{CLUSTER}"], call
    return call[3:]


def test_run_sh_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run([shellcheck, str(RUN_SH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_up_creates_the_cluster_and_installs_what_the_chart_expects(tmp_path: Path) -> None:
    rc, calls, out, state = run(tmp_path, "up")
    assert rc == 0, out
    # The cluster, from the committed config (whose CNI is disabled: flannel replaces it).
    create = find(calls, "kind", "create", "cluster")
    assert len(create) == 1, calls
    config = Path(create[0][create[0].index("--config") + 1])
    assert config == REPO / "e2e" / "kind" / "kind-config.yaml"
    kind_cfg = yaml.safe_load(config.read_text())
    assert kind_cfg["networking"]["disableDefaultCNI"] is True
    assert [n["role"] for n in kind_cfg["nodes"]] == ["control-plane", "worker", "worker"]
    # br_netfilter and the CNI plugins reach every node.
    for node in NODES:
        assert any(c[:3] == ["docker", "exec", node] and "sysctl" in c for c in calls), node
        copied = {c[-1].split("/")[-1] for c in find(calls, "docker", "cp") if c[-1].startswith(node + ":")}
        assert copied == {"bridge", "host-local", "loopback", "portmap"}, (node, copied)
    # flannel: switched to host-gw before it was applied, network = kind's podSubnet.
    applied = (state / "applied-kube-flannel.yml").read_text()
    assert '"Type": "host-gw"' in applied and "vxlan" not in applied
    assert kind_cfg["networking"]["podSubnet"] in applied
    # The image is built from the repository and loaded before the chart is installed.
    build = index_of(calls, lambda c: c[:2] == ["docker", "build"])
    assert calls[build][-1] == str(REPO)
    load = index_of(calls, lambda c: c[:3] == ["kind", "load", "docker-image"])
    helm = index_of(calls, lambda c: c[:1] == ["helm"])
    assert build < load < helm
    # Every --set key exists in the chart's values.
    values = yaml.safe_load((REPO / "charts" / "palisade" / "values.yaml").read_text())
    sets = [calls[helm][i + 1] for i, a in enumerate(calls[helm]) if a == "--set"]
    assert sets, calls[helm]
    for s in sets:
        key, _ = s.split("=", 1)
        node = values
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"--set {key}: not in values.yaml"
            node = node[part]
    assert "image.pullPolicy=Never" in sets
    assert calls[helm][calls[helm].index("--namespace") + 1] == "palisade-system"
    # The CRDs it waits for are exactly the chart's.
    wait = next(
        kubectl_args(c) for c in calls
        if c[:1] == ["kubectl"] and "condition=Established" in " ".join(c)
    )
    waited = {a.removeprefix("crd/") for a in wait if a.startswith("crd/")}
    chart_crds = {
        yaml.safe_load(p.read_text())["metadata"]["name"]
        for p in (REPO / "charts" / "palisade" / "crds").glob("*.yaml")
    }
    assert waited == chart_crds
    # The DaemonSet it waits for is the one the chart renders for release "palisade".
    rollout = [
        kubectl_args(c) for c in calls
        if c[:1] == ["kubectl"] and "rollout" in c and any(a.startswith("daemonset/palisade") for a in c)
    ]
    assert rollout, calls
    ds_name = next(a for a in rollout[0] if a.startswith("daemonset/")).split("/", 1)[1]
    assert ds_name == rendered_daemonset_name()
    # The control plane never announces; the LAN client joins the kind network.
    assert any(
        c[:1] == ["kubectl"] and "label" in c and "node.kubernetes.io/exclude-from-external-load-balancers=" in c
        and f"{CLUSTER}-control-plane" in c
        for c in calls
    )
    client = find(calls, "docker", "run")
    assert client and client[0][client[0].index("--network") + 1] == "kind"
    assert "LoadBalancer range for the scenarios: 172.18.255.200-172.18.255.250" in out


def rendered_daemonset_name() -> str:
    helm = pytest.importorskip("helm_python")
    chart = helm.Chart.load(REPO / "charts" / "palisade")
    try:
        rendered = chart.render(None, name="palisade", namespace="palisade-system", is_install=True)
    finally:
        chart.close()
    for path, text in rendered.items():
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc and doc.get("kind") == "DaemonSet":
                return doc["metadata"]["name"]
    raise AssertionError("the chart renders no DaemonSet")


def test_an_unexpected_flannel_manifest_stops_the_run(tmp_path: Path) -> None:
    rc, calls, out, _ = run(tmp_path, "up", flannel=FLANNEL.replace("vxlan", "wireguard"))
    assert rc != 0
    assert "no vxlan backend to replace" in out
    assert not find(calls, "helm"), "went on after a manifest it cannot use"


def test_lb_smoke_finds_the_announcing_worker_from_the_clients_neighbour_entry(tmp_path: Path) -> None:
    rc, calls, out, state = run(tmp_path, "lb-smoke")
    assert rc == 0, out
    manifest = list(yaml.safe_load_all((state / "applied-stdin.yaml").read_text()))
    pool = next(d for d in manifest if d["kind"] == "IPAddressPool")
    assert pool["spec"]["addresses"] == ["172.18.255.200-172.18.255.250"]
    assert next(d for d in manifest if d["kind"] == "Service")["spec"]["type"] == "LoadBalancer"
    assert f"client reached {VIP}:80; announced by {NODES[1]} ({MACS[NODES[1]]})" in out
    # Cleaned up after itself.
    assert any(c[:1] == ["kubectl"] and c[3:5] == ["delete", "namespace"] and "lb-smoke" in c for c in calls[-4:])


def test_a_failing_step_in_all_still_tears_the_cluster_down(tmp_path: Path) -> None:
    rc, calls, out, _ = run(tmp_path, "all", fail="helm upgrade")
    assert rc != 0
    assert "failed (exit" in out
    # Diagnostics first, then the cluster and the client go.
    assert any(c[:1] == ["kubectl"] and "logs" in c for c in calls)
    assert find(calls, "kind", "delete", "cluster")[-1][-1] == CLUSTER
    assert find(calls, "docker", "rm", "-f")
    assert not find(calls, "cargo"), "ran the scenarios after a failed install"


def test_all_runs_up_smoke_and_the_scenarios_on_the_kind_backend(tmp_path: Path) -> None:
    rc, calls, out, _ = run(tmp_path, "all")
    assert rc == 0, out
    cargo = find(calls, "cargo", "test")
    assert len(cargo) == 1
    for t in ["e2e_netpol", "e2e_resilience", "e2e_loadbalancer"]:
        assert t in cargo[0]
    assert "--test-threads=1" in cargo[0]
    smoke = index_of(calls, lambda c: c[:1] == ["kubectl"] and "lb-smoke" in c)
    assert smoke < index_of(calls, lambda c: c[:2] == ["cargo", "test"])
    # `all` removes the cluster at the end.
    assert find(calls, "kind", "delete", "cluster")
