#!/usr/bin/env bash
# Palisade's e2e suite on kind: the same scenarios as the lab backend (e2e/src/scenarios.rs),
# driven through kubectl and docker, plus the upstream Kubernetes NetworkPolicy conformance
# tests (e2e.test, focus "[sig-network] Netpol").
#
#   e2e/kind/run.sh up            create the cluster (kind-config.yaml), load br_netfilter, install
#                                 the CNI plugins and flannel (host-gw), build and load the image,
#                                 helm install charts/palisade, start the LAN client container
#   e2e/kind/run.sh lb-smoke      shell-only LoadBalancer check: pool + Service -> IP, the client
#                                 connects, the announcing node found from the client's neighbours
#   e2e/kind/run.sh test          run the Rust scenarios with PALISADE_E2E_BACKEND=kind
#   e2e/kind/run.sh conformance   upstream e2e.test through ginkgo, focus "[sig-network] Netpol"
#   e2e/kind/run.sh down          delete the cluster and the client container
#   e2e/kind/run.sh all           up, lb-smoke, test, down (the default; down also on failure,
#                                 unless KEEP_CLUSTER=1; logs go to $ARTIFACTS when it is set)
#
# Needs: docker, kind (>= 0.24), kubectl, helm (>= 3.12), cargo, curl, python3, sha256sum.
# Everything is named after $PALISADE_E2E_KIND_CLUSTER so several runs can share a machine.
set -euo pipefail

CLUSTER=${PALISADE_E2E_KIND_CLUSTER:-palisade-e2e}
CLIENT=${PALISADE_E2E_KIND_CLIENT:-${CLUSTER}-client}
NETWORK=${KIND_EXPERIMENTAL_DOCKER_NETWORK:-kind}
IMAGE=${PALISADE_IMAGE:-palisade:e2e}
AGNHOST_IMAGE=${AGNHOST_IMAGE:-registry.k8s.io/e2e-test-images/agnhost:2.53}
FLANNEL_VERSION=${FLANNEL_VERSION:-v0.26.1}
CNI_PLUGINS_VERSION=${CNI_PLUGINS_VERSION:-v1.6.0}
NAMESPACE=palisade-system
RELEASE=palisade
# The chart's fullname is the release name when it contains "palisade": <release>-agent.
DAEMONSET=${RELEASE}-agent
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "${HERE}/../.." && pwd)
CONTEXT=kind-${CLUSTER}
export PALISADE_E2E_KIND_CLUSTER=${CLUSTER} PALISADE_E2E_KIND_CLIENT=${CLIENT}
export PALISADE_E2E_KIND_NETWORK=${NETWORK} PALISADE_E2E_NAMESPACE=${NAMESPACE} AGNHOST_IMAGE

log() { printf '\n==> %s\n' "$*"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}
k() { kubectl --context "${CONTEXT}" "$@"; }
nodes() { kind get nodes --name "${CLUSTER}"; }

MACHINE=$(uname -m)
case "${MACHINE}" in
  x86_64) ARCH=amd64 ;;
  aarch64 | arm64) ARCH=arm64 ;;
  *) ARCH=unsupported ;;
esac
need_arch() { [[ ${ARCH} != unsupported ]] || die "unsupported architecture ${MACHINE}"; }

# The LoadBalancer range: .200-.250 of the last /24 of the kind network's IPv4 subnet (the
# Rust side, e2e/src/kind.rs default_pool, computes the same), unless PALISADE_E2E_LB_RANGE says
# otherwise.
lb_range() {
  if [[ -n ${PALISADE_E2E_LB_RANGE:-} ]]; then
    echo "${PALISADE_E2E_LB_RANGE}"
    return
  fi
  local subnets
  subnets=$(docker network inspect "${NETWORK}" -f '{{range .IPAM.Config}}{{.Subnet}} {{end}}')
  python3 - "${subnets}" <<'PY'
import ipaddress, sys
nets = [ipaddress.ip_network(s) for s in sys.argv[1].split()]
v4 = [n for n in nets if n.version == 4]
if not v4:
    sys.exit(f"the kind network has no IPv4 subnet ({sys.argv[1]})")
net = v4[0]
if net.prefixlen > 24:
    sys.exit(f"the kind network {net} is smaller than a /24")
last24 = int(net.broadcast_address) & ~0xFF
print(f"{ipaddress.ip_address(last24 + 200)}-{ipaddress.ip_address(last24 + 250)}")
PY
}

# Loads a locally built image into every node. `kind load docker-image` exports the image with
# `docker save` and imports it with `ctr import --all-platforms`, which fails on Docker's
# containerd image store when the index lists content that is not there (attestations, other
# platforms); importing only this machine's platform does not.
load_image() {
  local image=$1 node
  if kind load docker-image "${image}" --name "${CLUSTER}"; then
    return
  fi
  echo "kind load docker-image failed; importing ${image} for linux/${ARCH} with ctr" >&2
  for node in $(nodes); do
    docker save "${image}" |
      docker exec -i "${node}" ctr --namespace=k8s.io images import --platform "linux/${ARCH}" -
  done
}

up() {
  need_arch
  log "creating kind cluster ${CLUSTER}"
  local clusters
  clusters=$(kind get clusters)
  if ! grep -qx "${CLUSTER}" <<<"${clusters}"; then
    kind create cluster --name "${CLUSTER}" --config "${HERE}/kind-config.yaml" --wait 0s
  fi

  log "bridge netfilter in every node (flannel requires it; bridged pod traffic must cross FORWARD)"
  # The node containers share this machine's kernel: Docker >= 27.3 no longer loads br_netfilter,
  # and without it same-node pod traffic on flannel's cni0 bridge never meets iptables, so no
  # NetworkPolicy implementation could enforce it. The sysctls are per network namespace.
  local node
  for node in $(nodes); do
    docker exec "${node}" sh -c 'modprobe br_netfilter 2>/dev/null; test -e /proc/sys/net/bridge/bridge-nf-call-iptables' ||
      die "br_netfilter is not available in ${node}: run 'sudo modprobe br_netfilter' on this machine"
    docker exec "${node}" sysctl -q -w net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1
  done

  log "CNI plugins ${CNI_PLUGINS_VERSION} (bridge, host-local, loopback, portmap) in every node"
  # flannel's CNI plugin delegates to bridge + host-local and chains portmap; kind's node image
  # ships only what kindnet uses (no bridge), and its own copies may go away, so all four are
  # installed from the reference release, checksum verified.
  local tmp tgz url
  tmp=$(mktemp -d)
  tgz=cni-plugins-linux-${ARCH}-${CNI_PLUGINS_VERSION}.tgz
  url=https://github.com/containernetworking/plugins/releases/download/${CNI_PLUGINS_VERSION}/${tgz}
  curl -fsSL --retry 3 -o "${tmp}/${tgz}" "${url}"
  curl -fsSL --retry 3 -o "${tmp}/${tgz}.sha256" "${url}.sha256"
  (cd "${tmp}" && sha256sum -c "${tgz}.sha256")
  mkdir "${tmp}/bin"
  tar -xzf "${tmp}/${tgz}" -C "${tmp}/bin" ./bridge ./host-local ./loopback ./portmap
  for node in $(nodes); do
    docker exec "${node}" mkdir -p /opt/cni/bin
    for plugin in bridge host-local loopback portmap; do
      docker cp "${tmp}/bin/${plugin}" "${node}:/opt/cni/bin/${plugin}"
    done
  done

  log "flannel ${FLANNEL_VERSION} with the host-gw backend (no NetworkPolicy enforcement)"
  # host-gw routes each node's pod /24 via that node's address on the kind network, like the
  # lab's nodes. With VXLAN, a LoadBalancer connection that kube-proxy forwards to another node
  # arrives there masqueraded to the sender's flannel.1 address (inside the pod CIDR): a policy
  # admitting the LAN (rolling_update_behind_lb) would have to drop it.
  curl -fsSL --retry 3 -o "${tmp}/kube-flannel.yml" \
    "https://github.com/flannel-io/flannel/releases/download/${FLANNEL_VERSION}/kube-flannel.yml"
  sed -i -e 's/"Type": *"vxlan"/"Type": "host-gw"/' "${tmp}/kube-flannel.yml"
  grep -q '"Type": "host-gw"' "${tmp}/kube-flannel.yml" || die "kube-flannel.yml: no vxlan backend to replace"
  grep -q '"Network": "10.244.0.0/16"' "${tmp}/kube-flannel.yml" ||
    die "kube-flannel.yml: its Network is not kind-config.yaml's podSubnet 10.244.0.0/16"
  k apply -f "${tmp}/kube-flannel.yml"
  rm -rf "${tmp}"
  k -n kube-flannel rollout status daemonset/kube-flannel-ds --timeout=300s
  k wait --for=condition=Ready nodes --all --timeout=300s
  # kubeadm labels control planes so; Palisade's announcer (like MetalLB's) honours it. The
  # scenarios expect the announcing node to be a worker.
  k label node "${CLUSTER}-control-plane" node.kubernetes.io/exclude-from-external-load-balancers= --overwrite

  log "building ${IMAGE} from the repository's Dockerfile and loading it into the nodes"
  DOCKER_BUILDKIT=1 docker build -t "${IMAGE}" "${REPO}"
  load_image "${IMAGE}"
  # The test image is pulled by the nodes themselves (only their platform), not side-loaded.
  for node in $(nodes); do
    docker exec "${node}" crictl pull "${AGNHOST_IMAGE}" >/dev/null
  done

  log "installing charts/palisade"
  local name repo tag
  name=${IMAGE##*/}
  if [[ ${name} == *:* ]]; then
    repo=${IMAGE%:*}
    tag=${name##*:}
  else
    repo=${IMAGE}
    tag=latest
  fi
  k apply --server-side -f "${REPO}/charts/palisade/crds/"
  k wait --for=condition=Established --timeout=60s \
    crd/ipaddresspools.palisade.dev crd/l2advertisements.palisade.dev crd/servicel2statuses.palisade.dev \
    crd/bgppeers.palisade.dev crd/bgpadvertisements.palisade.dev crd/bfdprofiles.palisade.dev \
    crd/bgpsessionstatuses.palisade.dev crd/servicebgpstatuses.palisade.dev
  helm upgrade --install "${RELEASE}" "${REPO}/charts/palisade" \
    --kube-context "${CONTEXT}" --namespace "${NAMESPACE}" --create-namespace \
    --set image.repository="${repo}" --set image.tag="${tag}" --set image.pullPolicy=Never \
    --set netpol.enabled=true --set loadbalancer.enabled=true --set loadbalancer.l2.enabled=true \
    --wait --timeout 5m
  k -n "${NAMESPACE}" rollout status "daemonset/${DAEMONSET}" --timeout=180s

  log "starting the LAN client ${CLIENT} (a container on the ${NETWORK} network)"
  docker rm -f "${CLIENT}" >/dev/null 2>&1 || true
  docker run -d --name "${CLIENT}" --network "${NETWORK}" "${AGNHOST_IMAGE}" pause >/dev/null
  local range
  range=$(lb_range)
  echo "LoadBalancer range for the scenarios: ${range}"
}

# The LoadBalancer path without Rust: what a user would do by hand.
lb_smoke() {
  log "LoadBalancer smoke test: pool, Service, client connect, announcing node"
  local range vip="" connected=false neigh mac="" node="" node_mac n
  range=$(lb_range)
  # A pool left by the scenarios (`lan`) covers the same range: overlapping pools are refused.
  k delete ipaddresspools.palisade.dev lan smoke --ignore-not-found
  k delete l2advertisements.palisade.dev lan smoke --ignore-not-found
  k delete namespace lb-smoke --ignore-not-found --wait=true --timeout=120s
  k create namespace lb-smoke
  k apply -f - <<YAML
apiVersion: palisade.dev/v1alpha1
kind: IPAddressPool
metadata: {name: smoke}
spec: {addresses: ["${range}"]}
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
      image: ${AGNHOST_IMAGE}
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
  for _ in $(seq 60); do
    vip=$(k -n lb-smoke get service web -o jsonpath='{.status.loadBalancer.ingress[0].ip}')
    [[ -n ${vip} ]] && break
    sleep 1
  done
  if [[ -z ${vip} ]]; then
    k -n lb-smoke describe service web
    die "Service lb-smoke/web got no LoadBalancer IP within 60s"
  fi
  echo "Service lb-smoke/web got ${vip} (pool ${range})"
  for _ in $(seq 30); do
    if docker exec "${CLIENT}" /agnhost connect "${vip}:80" --timeout=1s --protocol=tcp; then
      connected=true
      break
    fi
    sleep 1
  done
  [[ ${connected} == true ]] || die "the client ${CLIENT} never connected to ${vip}:80"
  # Which node answered the client's ARP request: the neighbour entry's MAC against the nodes'
  # MACs on the kind network (as MetalLB's e2e does).
  # (`/proc/net/arp` where the image has no `ip`: completed entries only, flags not 0x0.)
  if neigh=$(docker exec "${CLIENT}" ip neigh show "${vip}"); then
    mac=$(awk '{ for (i = 1; i < NF; i++) if ($i == "lladdr") print $(i + 1) }' <<<"${neigh}")
  else
    neigh=$(docker exec "${CLIENT}" cat /proc/net/arp)
    mac=$(awk -v ip="${vip}" '$1 == ip && $3 != "0x0" { print $4 }' <<<"${neigh}")
  fi
  [[ -n ${mac} ]] || die "the client has no neighbour entry for ${vip}: '${neigh}'"
  for n in $(nodes); do
    node_mac=$(docker inspect -f "{{(index .NetworkSettings.Networks \"${NETWORK}\").MacAddress}}" "${n}")
    [[ ${node_mac} != "${mac}" ]] || node=${n}
  done
  [[ -n ${node} ]] || die "${vip} is answered by ${mac}, which is no node of ${CLUSTER}"
  [[ ${node} != "${CLUSTER}-control-plane" ]] || die "${vip} is announced by the control plane, which is excluded"
  echo "client reached ${vip}:80; announced by ${node} (${mac})"
  k delete namespace lb-smoke --wait=true --timeout=120s
  k delete ipaddresspools.palisade.dev smoke
  k delete l2advertisements.palisade.dev smoke
}

test_scenarios() {
  log "running the e2e scenarios on kind (one cluster, so one scenario at a time)"
  local range
  range=$(lb_range)
  export PALISADE_E2E_BACKEND=kind PALISADE_E2E_LB_RANGE=${range}
  (cd "${REPO}" && cargo test -p palisade-tests \
    --test e2e_netpol --test e2e_resilience --test e2e_loadbalancer -- --test-threads=1 --nocapture)
}

# Upstream's NetworkPolicy conformance tests against the cluster, with Palisade as the enforcer.
# NETPOL_FOCUS / NETPOL_SKIP are ginkgo regexps (an empty NETPOL_SKIP skips nothing),
# NETPOL_NODES the parallel ginkgo processes, NETPOL_TIMEOUT the whole suite's limit.
conformance() {
  need_arch
  local focus=${NETPOL_FOCUS:-'\[sig-network\] Netpol'} skip=${NETPOL_SKIP-SCTP}
  local report=${REPORT_DIR:-${ARTIFACTS:-/tmp/palisade-netpol}/netpol-report}
  log "upstream e2e.test: focus '${focus}', skip '${skip}'"
  local version dir kubeconfig rc=0
  version=$(k version -o json | python3 -c 'import json, sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')
  dir=${E2E_CACHE:-/tmp}/kubernetes-test-${version}-${ARCH}
  if [[ ! -x ${dir}/kubernetes/test/bin/e2e.test || ! -x ${dir}/kubernetes/test/bin/ginkgo ]]; then
    mkdir -p "${dir}"
    curl -fsSL --retry 3 "https://dl.k8s.io/${version}/kubernetes-test-linux-${ARCH}.tar.gz" |
      tar -xz -C "${dir}" kubernetes/test/bin/e2e.test kubernetes/test/bin/ginkgo
  fi
  mkdir -p "${report}"
  kubeconfig=$(mktemp)
  kind get kubeconfig --name "${CLUSTER}" >"${kubeconfig}"
  local args=(--nodes="${NETPOL_NODES:-4}" --timeout="${NETPOL_TIMEOUT:-3h}" -v --focus="${focus}")
  # SCTP needs the sctp kernel module on this machine; NETPOL_SKIP= runs those tests too.
  if [[ -n ${skip} ]]; then
    args+=(--skip="${skip}")
  fi
  "${dir}/kubernetes/test/bin/ginkgo" "${args[@]}" "${dir}/kubernetes/test/bin/e2e.test" -- \
    --kubeconfig="${kubeconfig}" --provider=local \
    --dump-logs-on-failure=false --disable-log-dump=true --report-dir="${report}" || rc=$?
  rm -f "${kubeconfig}"
  echo "JUnit reports: ${report}"
  return "${rc}"
}

down() {
  log "deleting kind cluster ${CLUSTER} and ${CLIENT}"
  docker rm -f "${CLIENT}" >/dev/null 2>&1 || true
  kind delete cluster --name "${CLUSTER}" || true
}

# `all`'s exit: on failure keep what explains it, then remove everything (unless KEEP_CLUSTER=1).
finish() {
  local rc=$?
  trap - EXIT
  if [[ ${rc} -ne 0 ]]; then
    echo "failed (exit ${rc})" >&2
    kubectl --context "${CONTEXT}" get pods -A -o wide >&2 || true
    kubectl --context "${CONTEXT}" -n "${NAMESPACE}" logs "daemonset/${DAEMONSET}" --tail=100 >&2 || true
    if [[ -n ${ARTIFACTS:-} ]]; then
      kind export logs "${ARTIFACTS}/kind-logs" --name "${CLUSTER}" || true
    fi
  fi
  if [[ ${KEEP_CLUSTER:-0} == 1 ]]; then
    echo "KEEP_CLUSTER=1: leaving ${CLUSTER} and ${CLIENT} running ($0 down removes them)"
  else
    down
  fi
  exit "${rc}"
}

case "${1:-all}" in
  up) up ;;
  lb-smoke) lb_smoke ;;
  test) test_scenarios ;;
  conformance) conformance ;;
  down) down ;;
  all)
    trap finish EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    up
    lb_smoke
    test_scenarios
    ;;
  *)
    sed -n '2,19p' "$0"
    exit 2
    ;;
esac
