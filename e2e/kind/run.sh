#!/usr/bin/env bash
# Palisade's e2e suite on kind: the same scenarios as the lab backend (e2e/src/scenarios.rs),
# driven through kubectl and docker, plus the upstream Kubernetes NetworkPolicy conformance
# tests (e2e.test --ginkgo.focus=Netpol).
#
#   e2e/kind/run.sh up            create the cluster, install flannel, build+load the image,
#                                 helm install charts/palisade, start the LAN client container
#   e2e/kind/run.sh test          run the Rust scenarios with PALISADE_E2E_BACKEND=kind
#   e2e/kind/run.sh lb-smoke      shell-only LoadBalancer check: pool + Service → IP, client
#                                 connects, the announcing node found from the client's ARP table
#   e2e/kind/run.sh conformance   upstream e2e.test, focus "[sig-network] Netpol"
#   e2e/kind/run.sh down          delete the cluster and the client container
#   e2e/kind/run.sh all           up, test, lb-smoke, down (the default; down also on failure)
#
# Needs: docker, kind (>= 0.24), kubectl, helm (>= 3.12), cargo, curl. Everything is named after
# $CLUSTER so several runs can share a machine.
set -euo pipefail

CLUSTER=${PALISADE_E2E_KIND_CLUSTER:-palisade-e2e}
CLIENT=${PALISADE_E2E_KIND_CLIENT:-${CLUSTER}-client}
IMAGE=${PALISADE_IMAGE:-palisade:e2e}
AGNHOST_IMAGE=${AGNHOST_IMAGE:-registry.k8s.io/e2e-test-images/agnhost:2.53}
FLANNEL_VERSION=${FLANNEL_VERSION:-v0.26.1}
CNI_PLUGINS_VERSION=${CNI_PLUGINS_VERSION:-v1.6.0}
NAMESPACE=palisade-system
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CONTEXT="kind-${CLUSTER}"
export PALISADE_E2E_KIND_CLUSTER=$CLUSTER PALISADE_E2E_KIND_CLIENT=$CLIENT AGNHOST_IMAGE

log() { printf '\n==> %s\n' "$*"; }
k() { kubectl --context "$CONTEXT" "$@"; }

arch() {
  case "$(uname -m)" in
    x86_64) echo amd64 ;;
    aarch64 | arm64) echo arm64 ;;
    *) echo "unsupported architecture $(uname -m)" >&2; exit 1 ;;
  esac
}

# The LoadBalancer range: .200-.250 of the last /24 of the kind docker network (MetalLB's e2e
# does the same), unless PALISADE_E2E_LB_RANGE says otherwise.
lb_range() {
  if [[ -n "${PALISADE_E2E_LB_RANGE:-}" ]]; then echo "$PALISADE_E2E_LB_RANGE"; return; fi
  local subnet
  subnet=$(docker network inspect kind -f '{{range .IPAM.Config}}{{.Subnet}} {{end}}' |
    tr ' ' '\n' | grep -v ':' | grep '/' | head -n1)
  python3 - "$subnet" <<'PY'
import ipaddress, sys
net = ipaddress.ip_network(sys.argv[1])
last24 = list(net.subnets(new_prefix=24))[-1] if net.prefixlen <= 24 else None
if last24 is None:
    sys.exit(f"the kind network {net} is smaller than a /24")
base = int(last24.network_address)
print(f"{ipaddress.ip_address(base + 200)}-{ipaddress.ip_address(base + 250)}")
PY
}

up() {
  log "creating kind cluster $CLUSTER"
  if ! kind get clusters | grep -qx "$CLUSTER"; then
    kind create cluster --name "$CLUSTER" --config "$HERE/kind-config.yaml" --wait 0s
  fi

  log "installing flannel $FLANNEL_VERSION (no NetworkPolicy enforcement) and the bridge CNI plugin"
  # kind's node image ships only the plugins kindnet needs (ptp, host-local, loopback, portmap);
  # flannel delegates to bridge.
  local tgz="cni-plugins-linux-$(arch)-${CNI_PLUGINS_VERSION}.tgz"
  curl -fsSL -o "/tmp/$tgz" \
    "https://github.com/containernetworking/plugins/releases/download/${CNI_PLUGINS_VERSION}/$tgz"
  for node in $(kind get nodes --name "$CLUSTER"); do
    docker cp "/tmp/$tgz" "$node:/tmp/$tgz"
    docker exec "$node" tar -xzf "/tmp/$tgz" -C /opt/cni/bin ./bridge ./host-local ./loopback ./portmap
  done
  k apply -f "https://github.com/flannel-io/flannel/releases/download/${FLANNEL_VERSION}/kube-flannel.yml"
  k wait --for=condition=Ready nodes --all --timeout=300s

  log "building $IMAGE from the repository's Dockerfile and loading it into the nodes"
  docker build -t "$IMAGE" "$REPO"
  kind load docker-image "$IMAGE" --name "$CLUSTER"
  docker pull -q "$AGNHOST_IMAGE"
  kind load docker-image "$AGNHOST_IMAGE" --name "$CLUSTER"

  log "installing charts/palisade"
  helm upgrade --install palisade "$REPO/charts/palisade" \
    --kube-context "$CONTEXT" --namespace "$NAMESPACE" --create-namespace \
    --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" \
    --set image.pullPolicy=Never \
    --set netpol.enabled=true --set loadbalancer.enabled=true \
    --set loadbalancer.l2.enabled=true \
    --wait --timeout 5m
  k -n "$NAMESPACE" rollout status daemonset --timeout=180s

  log "starting the LAN client $CLIENT (a container on the kind network)"
  docker rm -f "$CLIENT" >/dev/null 2>&1 || true
  docker run -d --name "$CLIENT" --network kind "$AGNHOST_IMAGE" pause >/dev/null
  echo "LoadBalancer range for the scenarios: $(lb_range)"
}

test_scenarios() {
  log "running the e2e scenarios on kind (one cluster, so one scenario at a time)"
  export PALISADE_E2E_BACKEND=kind
  export PALISADE_E2E_LB_RANGE=${PALISADE_E2E_LB_RANGE:-$(lb_range)}
  (cd "$REPO" && cargo test -p palisade-tests \
    --test e2e_netpol --test e2e_resilience --test e2e_loadbalancer -- --test-threads=1 --nocapture)
}

# The LoadBalancer path without Rust: what a user would do by hand.
lb_smoke() {
  log "LoadBalancer smoke test: pool, Service, client connect, announcing node"
  local range vip mac node
  range=$(lb_range)
  k create namespace lb-smoke --dry-run=client -o yaml | k apply -f -
  cat <<YAML | k apply -f -
apiVersion: palisade.dev/v1alpha1
kind: IPAddressPool
metadata: {name: smoke}
spec: {addresses: ["$range"]}
---
apiVersion: palisade.dev/v1alpha1
kind: L2Advertisement
metadata: {name: smoke}
spec: {ipAddressPools: [smoke]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: lb-smoke, labels: {app: web}}
spec:
  containers:
    - name: web
      image: $AGNHOST_IMAGE
      args: [netexec, --http-port=80]
      ports: [{containerPort: 80}]
      readinessProbe: {tcpSocket: {port: 80}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: lb-smoke}
spec:
  type: LoadBalancer
  selector: {app: web}
  ports: [{port: 80, targetPort: 80}]
YAML
  k -n lb-smoke wait --for=condition=Ready pod/web --timeout=120s
  for _ in $(seq 1 60); do
    vip=$(k -n lb-smoke get svc web -o jsonpath='{.status.loadBalancer.ingress[0].ip}')
    [[ -n "$vip" ]] && break
    sleep 1
  done
  [[ -n "${vip:-}" ]] || { echo "Service lb-smoke/web got no IP"; k -n lb-smoke describe svc web; exit 1; }
  echo "Service lb-smoke/web got $vip"
  for _ in $(seq 1 30); do
    docker exec "$CLIENT" /agnhost connect "$vip:80" --timeout=1s --protocol=tcp && break
    sleep 1
  done
  docker exec "$CLIENT" /agnhost connect "$vip:80" --timeout=1s --protocol=tcp
  # Which node answered the client's ARP request: match the MAC in the client's ARP table
  # against the nodes' MACs on the kind network (as MetalLB's e2e does).
  mac=$(docker exec "$CLIENT" cat /proc/net/arp | awk -v ip="$vip" '$1 == ip {print $4}')
  node=""
  for n in $(kind get nodes --name "$CLUSTER"); do
    if [[ "$(docker inspect -f '{{(index .NetworkSettings.Networks "kind").MacAddress}}' "$n")" == "$mac" ]]; then
      node=$n
    fi
  done
  echo "client reached $vip:80; announced by ${node:-unknown} ($mac)"
  [[ -n "$node" ]] || exit 1
  k delete namespace lb-smoke --wait=false
  k delete ipaddresspool.palisade.dev smoke
  k delete l2advertisement.palisade.dev smoke
}

# Upstream's NetworkPolicy conformance tests against the cluster, with Palisade as the enforcer.
conformance() {
  log "running upstream e2e.test --ginkgo.focus='\\[sig-network\\] Netpol'"
  local version dir
  version=$(k version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')
  dir="/tmp/kubernetes-test-${version}"
  if [[ ! -x "$dir/kubernetes/test/bin/e2e.test" ]]; then
    mkdir -p "$dir"
    curl -fsSL "https://dl.k8s.io/${version}/kubernetes-test-linux-$(arch).tar.gz" | tar -xz -C "$dir"
  fi
  local kubeconfig
  kubeconfig=$(mktemp)
  kind get kubeconfig --name "$CLUSTER" >"$kubeconfig"
  # SCTP needs the sctp kernel module on the host; skip it where that is not given.
  "$dir/kubernetes/test/bin/e2e.test" \
    --kubeconfig "$kubeconfig" --provider local \
    --ginkgo.focus='\[sig-network\] Netpol' \
    --ginkgo.skip="${NETPOL_SKIP:-SCTP}" \
    --ginkgo.timeout=2h --ginkgo.v \
    --report-dir "${REPORT_DIR:-/tmp/palisade-netpol-report}"
}

down() {
  log "deleting kind cluster $CLUSTER and $CLIENT"
  docker rm -f "$CLIENT" >/dev/null 2>&1 || true
  kind delete cluster --name "$CLUSTER" || true
}

case "${1:-all}" in
  up) up ;;
  test) test_scenarios ;;
  lb-smoke) lb_smoke ;;
  conformance) conformance ;;
  down) down ;;
  all)
    trap down EXIT
    up
    test_scenarios
    lb_smoke
    ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
