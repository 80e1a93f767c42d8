//! A deterministic synthetic cluster for benchmarks and scale tests: 1,000 namespaces × 10
//! pods (web/api/worker/db, named ports), 100 nodes with node `node-000` holding 110 pods,
//! 2,000 policies from seven templates (default deny, namespace selectors, namespace+pod AND,
//! matchExpressions, named ports, endPort ranges, ipBlocks with except, egress with DNS).
//! 13,103 objects in all.

use serde_json::json;

use crate::builders::*;
use crate::k8s_openapi::api::networking::v1::NetworkPolicy;
use crate::ClusterState;

pub const NAMESPACES: usize = 1000;
pub const PODS_PER_NS: usize = 10;
pub const NODES: usize = 100;
pub const LOCAL_PODS: usize = 110;
pub const NODE: &str = "node-000";

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const APPS: [&str; 4] = ["web", "api", "worker", "db"];

pub fn ports(app: &str) -> Vec<(&'static str, i32, &'static str)> {
    match app {
        "web" => vec![("http", 8080, "TCP"), ("metrics", 9100, "TCP")],
        "api" => vec![("http", 8000, "TCP"), ("grpc", 9000, "TCP")],
        "db" => vec![("pg", 5432, "TCP")],
        _ => vec![("metrics", 9100, "TCP")],
    }
}

pub fn ns_name(i: usize) -> String {
    format!("ns-{i:04}")
}

pub struct Cluster {
    pub state: ClusterState,
    /// Node of every pod (namespace index, pod index) → node index.
    pub local_namespaces: Vec<usize>,
}

pub fn pod_ip(node: usize, slot: usize) -> String {
    // node n owns 10.(64 + n/256).(n%256).0/24
    format!("10.{}.{}.{}", 64 + node / 256, node % 256, slot + 2)
}

pub fn build_cluster() -> Cluster {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let nodes: Vec<_> = (0..NODES)
        .map(|n| {
            mk_node(
                &format!("node-{n:03}"),
                &format!("10.{}.{}.0/24", 64 + n / 256, n % 256),
            )
        })
        .collect();
    let mut namespaces = Vec::new();
    for i in 0..NAMESPACES {
        let team = format!("team-{}", i % 50);
        let env = ["prod", "staging", "dev"][i % 3];
        let mut labels = vec![("team", team.as_str()), ("env", env)];
        if i % 100 == 7 {
            labels.push(("purpose", "monitoring"));
        }
        if i % 250 == 3 {
            labels.push(("purpose", "ingress"));
        }
        namespaces.push(mk_ns(&ns_name(i), &labels));
    }
    namespaces.push(mk_ns("kube-system", &[]));

    // 110 pods on our node, the rest spread over the others.
    let total = NAMESPACES * PODS_PER_NS;
    let mut local = vec![false; total];
    let mut placed = 0;
    while placed < LOCAL_PODS {
        let k = rng.below(total);
        if !local[k] {
            local[k] = true;
            placed += 1;
        }
    }
    let mut next_slot = vec![0usize; NODES];
    let mut pods = Vec::with_capacity(total + 2);
    let mut local_namespaces = Vec::new();
    let mut remote = 1;
    for (k, is_local) in local.iter().enumerate() {
        let (i, j) = (k / PODS_PER_NS, k % PODS_PER_NS);
        let node = if *is_local {
            local_namespaces.push(i);
            0
        } else {
            let n = remote;
            remote = if remote + 1 >= NODES { 1 } else { remote + 1 };
            n
        };
        let slot = next_slot[node];
        next_slot[node] += 1;
        let app = APPS[j % APPS.len()];
        let version = format!("v{}", j % 3);
        let pod = mk_pod(
            &ns_name(i),
            &format!("{app}-{j}"),
            &[("app", app), ("version", version.as_str())],
            &pod_ip(node, slot),
            &format!("node-{node:03}"),
        );
        pods.push(with_ports(pod, &ports(app)));
    }
    for d in 0..2 {
        let node = 1 + d;
        let slot = next_slot[node];
        next_slot[node] += 1;
        pods.push(with_ports(
            mk_pod(
                "kube-system",
                &format!("coredns-{d}"),
                &[("k8s-app", "kube-dns")],
                &pod_ip(node, slot),
                &format!("node-{node:03}"),
            ),
            &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
        ));
    }
    local_namespaces.sort_unstable();
    local_namespaces.dedup();

    let mut policies = Vec::new();
    for i in 0..NAMESPACES {
        for k in 0..2 {
            policies.push(policy(i, (i * 2 + k) % 7, 0));
        }
    }
    Cluster {
        state: cluster(nodes, namespaces, pods, policies),
        local_namespaces,
    }
}

/// Policy template `t` for namespace `i`; `variant` perturbs it (for "one policy changed").
pub fn policy(i: usize, t: usize, variant: u16) -> NetworkPolicy {
    let ns = ns_name(i);
    let team = format!("team-{}", i % 50);
    let extra_port = 7000 + variant;
    let (name, spec) = match t {
        0 => (
            "default-deny",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                            "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]}),
        ),
        1 => (
            "web-from-ingress",
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"purpose": "ingress"}}}], "ports": [{"port": "http"}, {"port": extra_port}]},
                {"from": [{"namespaceSelector": {"matchLabels": {"purpose": "monitoring"}}}], "ports": [{"port": "metrics"}]}]}),
        ),
        2 => (
            "api-from-web",
            json!({"podSelector": {"matchLabels": {"app": "api"}}, "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 8000}, {"port": "grpc"}, {"port": extra_port}]}]}),
        ),
        3 => (
            "db-from-team-api",
            json!({"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"team": team}}, "podSelector": {"matchLabels": {"app": "api"}}}],
                 "ports": [{"port": "pg"}, {"port": extra_port}]}]}),
        ),
        4 => (
            "api-egress",
            json!({"podSelector": {"matchLabels": {"app": "api"}}, "policyTypes": ["Egress"], "egress": [
                {"to": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}, "podSelector": {"matchLabels": {"app": "db"}}}], "ports": [{"port": "pg"}]},
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "192.168.0.0/16"]}}], "ports": [{"port": 443}, {"port": extra_port}]},
                {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}], "ports": [{"port": 53, "protocol": "UDP"}]}]}),
        ),
        5 => (
            "nodeports-from-lan",
            json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}]}, "ingress": [
                {"from": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}], "ports": [{"port": 30000, "endPort": 32767}, {"port": extra_port}]}]}),
        ),
        _ => (
            "from-prod-staging",
            json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]}, "ingress": [
                {"from": [{"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "staging"]}]},
                           "podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["worker"]}, {"key": "version", "operator": "Exists"}]}}],
                 "ports": [{"port": 8000, "endPort": 8100}, {"port": 9100, "protocol": "TCP"}, {"port": extra_port, "protocol": "SCTP"}]}]}),
        ),
    };
    mk_policy(&ns, name, spec)
}

/// One cluster written the ways users hand it to `palisade netpol`.
pub struct Dumps {
    /// Every object as its own YAML document (`---`).
    pub multi_yaml: String,
    /// One `kind: List` in YAML (`kubectl get ... -A -o yaml`).
    pub yaml_list: String,
    /// One `kind: List` in JSON (`kubectl get ... -A -o json`).
    pub json_list: String,
    /// Multi-document YAML files of at most `SPLIT` objects each.
    pub split: Vec<String>,
}

/// Objects per file of [`Dumps::split`].
pub const SPLIT: usize = 500;

/// Every object of `state` as a JSON value with `apiVersion` and `kind`.
pub fn objects(state: &ClusterState) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let to = |v: Result<serde_json::Value, serde_json::Error>| v.expect("objects serialize");
    out.extend(state.nodes.iter().map(|o| to(serde_json::to_value(&**o))));
    out.extend(
        state
            .namespaces
            .iter()
            .map(|o| to(serde_json::to_value(&**o))),
    );
    out.extend(state.pods.iter().map(|o| to(serde_json::to_value(&**o))));
    out.extend(
        state
            .policies
            .iter()
            .map(|o| to(serde_json::to_value(&**o))),
    );
    out
}

/// Writes `state` in the four forms of [`Dumps`].
pub fn dumps(state: &ClusterState) -> Dumps {
    let objs = objects(state);
    let yaml = |v: &serde_json::Value| serde_saphyr::to_string(v).expect("YAML serializes");
    let docs: Vec<String> = objs.iter().map(yaml).collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": objs});
    Dumps {
        multi_yaml: docs.join("---\n"),
        yaml_list: yaml(&list),
        json_list: serde_json::to_string_pretty(&list).expect("JSON serializes"),
        split: docs.chunks(SPLIT).map(|c| c.join("---\n")).collect(),
    }
}

const ENVS: [&str; 3] = ["prod", "staging", "dev"];

/// Number of ClusterNetworkPolicies of [`cluster_network_policies`] (Admin and Baseline).
pub const CLUSTER_POLICIES: usize = 200;

/// ClusterNetworkPolicy template for index `i` (five templates: three Admin, two Baseline;
/// namespace/pod subjects, every peer kind, port numbers, ranges and named ports); `variant`
/// shifts the priority (for "one policy changed").
pub fn cluster_network_policy(i: usize, variant: i32) -> crate::cnp::ClusterNetworkPolicy {
    let team = format!("team-{}", i % 50);
    let priority = ((i * 5) % 1000) as i32 + variant;
    let spec = match i % 5 {
        0 => json!({
            "tier": "Admin", "priority": priority,
            "subject": {"namespaces": {"matchLabels": {"team": team}}},
            "ingress": [
                {"action": "Accept", "from": [{"namespaces": {"matchLabels": {"purpose": "monitoring"}}}],
                 "protocols": [{"destinationNamedPort": "metrics"}]},
                {"action": "Deny", "from": [{"namespaces": {"matchLabels": {"env": "dev"}}}],
                 "protocols": [{"tcp": {"destinationPort": {"range": {"start": 8000, "end": 8100}}}}]},
            ],
        }),
        1 => json!({
            "tier": "Admin", "priority": priority,
            "subject": {"pods": {"namespaceSelector": {"matchLabels": {"env": "prod"}},
                                  "podSelector": {"matchLabels": {"app": "db"}}}},
            "ingress": [
                {"action": "Pass", "from": [{"pods": {"namespaceSelector": {"matchLabels": {"team": team}},
                                                       "podSelector": {"matchLabels": {"app": "api"}}}}]},
                {"action": "Deny", "from": [{"namespaces": {}}], "protocols": [{"tcp": {"destinationPort": {"number": 5432}}}]},
            ],
        }),
        2 => json!({
            "tier": "Admin", "priority": priority,
            "subject": {"namespaces": {"matchLabels": {"team": team}}},
            "egress": [
                {"action": "Deny", "to": [{"networks": ["169.254.169.254/32", format!("192.0.{}.0/24", i % 256)]}]},
                {"action": "Pass", "to": [{"namespaces": {"matchLabels": {"team": team}}}]},
            ],
        }),
        3 => json!({
            "tier": "Baseline", "priority": priority,
            "subject": {"namespaces": {"matchLabels": {"team": team}}},
            "ingress": [{"action": "Deny", "from": [{"namespaces": {"matchExpressions": [
                {"key": "team", "operator": "NotIn", "values": [team]}]}}]}],
        }),
        _ => json!({
            "tier": "Baseline", "priority": priority,
            "subject": {"namespaces": {"matchLabels": {"env": ENVS[i % 3]}}},
            "egress": [
                {"action": "Accept", "to": [{"nodes": {}}], "protocols": [{"tcp": {"destinationPort": {"number": 10250}}}]},
                {"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}], "protocols": [{"tcp": {"destinationPort": {"number": 25}}}]},
            ],
        }),
    };
    mk_cnp(&format!("cnp-{i:03}"), spec)
}

/// [`CLUSTER_POLICIES`] ClusterNetworkPolicies.
pub fn cluster_network_policies() -> Vec<crate::cnp::ClusterNetworkPolicy> {
    (0..CLUSTER_POLICIES)
        .map(|i| cluster_network_policy(i, 0))
        .collect()
}
