//! Small builders for API objects, for tests, examples and benchmarks.
//!
//! ```
//! use palisade_netpol::builders::*;
//! let pod = with_ports(mk_pod("shop", "web-1", &[("app", "web")], "10.244.1.5", "n1"),
//!                      &[("http", 8080, "TCP")]);
//! let np = mk_policy("shop", "allow-web", serde_json::json!({
//!     "podSelector": {"matchLabels": {"app": "web"}},
//!     "ingress": [{"ports": [{"port": "http"}]}],
//! }));
//! let state = cluster(vec![mk_node("n1", "10.244.1.0/24")], vec![], vec![pod], vec![np]);
//! assert_eq!(state.pods.len(), 1);
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Node, NodeSpec, Pod, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::ClusterState;

/// A label map from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn meta(ns: Option<&str>, name: &str, l: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        namespace: ns.map(str::to_string),
        name: Some(name.to_string()),
        labels: if l.is_empty() { None } else { Some(labels(l)) },
        ..Default::default()
    }
}

/// A Namespace (the API server's `kubernetes.io/metadata.name` label is implied anyway).
pub fn mk_ns(name: &str, l: &[(&str, &str)]) -> Namespace {
    Namespace {
        metadata: meta(None, name, l),
        ..Default::default()
    }
}

/// A Node with one pod CIDR (`""` for none).
pub fn mk_node(name: &str, pod_cidr: &str) -> Node {
    let cidrs = (!pod_cidr.is_empty()).then(|| vec![pod_cidr.to_string()]);
    Node {
        metadata: meta(None, name, &[]),
        spec: Some(NodeSpec {
            pod_cidr: cidrs.as_ref().and_then(|c| c.first().cloned()),
            pod_cidrs: cidrs,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Running pod on `node` with IP `ip` (`""`: no IP yet) and one container without ports.
pub fn mk_pod(ns: &str, name: &str, l: &[(&str, &str)], ip: &str, node: &str) -> Pod {
    let has_ip = !ip.is_empty();
    Pod {
        metadata: meta(Some(ns), name, l),
        spec: Some(PodSpec {
            node_name: (!node.is_empty()).then(|| node.to_string()),
            containers: vec![Container {
                name: "main".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: has_ip.then(|| ip.to_string()),
            pod_ips: has_ip.then(|| vec![PodIP { ip: ip.to_string() }]),
            ..Default::default()
        }),
    }
}

/// Gives the pod these IPs (dual-stack: one per family, the first is `status.podIP`).
pub fn with_pod_ips(mut pod: Pod, ips: &[&str]) -> Pod {
    if let Some(st) = pod.status.as_mut() {
        st.pod_ip = ips.first().map(|s| s.to_string());
        st.pod_ips = Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect());
    }
    pod
}

/// A Node with these pod CIDRs (dual-stack: one per family).
pub fn mk_node_cidrs(name: &str, pod_cidrs: &[&str]) -> Node {
    let mut node = mk_node(name, pod_cidrs.first().copied().unwrap_or(""));
    if let Some(spec) = node.spec.as_mut() {
        spec.pod_cidrs = Some(pod_cidrs.iter().map(|c| c.to_string()).collect());
    }
    node
}

/// Adds named container ports `(name, port, protocol)` to the first container.
pub fn with_ports(mut pod: Pod, ports: &[(&str, i32, &str)]) -> Pod {
    if let Some(c) = pod.spec.as_mut().and_then(|s| s.containers.first_mut()) {
        let list = c.ports.get_or_insert_with(Vec::new);
        for (name, port, proto) in ports {
            list.push(ContainerPort {
                name: (!name.is_empty()).then(|| name.to_string()),
                container_port: *port,
                protocol: Some(proto.to_string()),
                ..Default::default()
            });
        }
    }
    pod
}

/// Marks the pod `hostNetwork: true`.
pub fn with_host_network(mut pod: Pod) -> Pod {
    if let Some(s) = pod.spec.as_mut() {
        s.host_network = Some(true);
    }
    pod
}

/// Sets `status.phase`.
pub fn with_phase(mut pod: Pod, phase: &str) -> Pod {
    if let Some(s) = pod.status.as_mut() {
        s.phase = Some(phase.to_string());
    }
    pod
}

/// A NetworkPolicy from its `spec` written as API JSON (camelCase).
///
/// # Panics
/// When `spec` is not a valid NetworkPolicySpec (a bug in the calling test).
#[track_caller]
pub fn mk_policy(ns: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
    let spec: NetworkPolicySpec = match serde_json::from_value(spec) {
        Ok(s) => s,
        Err(e) => panic!("mk_policy({ns}/{name}): invalid spec: {e}"),
    };
    NetworkPolicy {
        metadata: meta(Some(ns), name, &[]),
        spec: Some(spec),
    }
}

/// A ClusterNetworkPolicy from its `spec` written as API JSON (camelCase).
///
/// # Panics
/// When `spec` does not deserialize (a bug in the calling test).
#[track_caller]
pub fn mk_cnp(name: &str, spec: serde_json::Value) -> crate::cnp::ClusterNetworkPolicy {
    let spec = match serde_json::from_value(spec) {
        Ok(s) => s,
        Err(e) => panic!("mk_cnp({name}): invalid spec: {e}"),
    };
    crate::cnp::ClusterNetworkPolicy {
        api_version: Some(crate::cnp::API_VERSION.into()),
        kind: Some(crate::cnp::KIND.into()),
        metadata: meta(None, name, &[]),
        spec,
        status: None,
    }
}

/// Gives a Node labels and `status.addresses` (`InternalIP` entries).
pub fn with_node_addresses(mut node: Node, l: &[(&str, &str)], ips: &[&str]) -> Node {
    if !l.is_empty() {
        node.metadata.labels = Some(labels(l));
    }
    let status = node.status.get_or_insert_with(Default::default);
    status.addresses = Some(
        ips.iter()
            .map(|ip| k8s_openapi::api::core::v1::NodeAddress {
                type_: "InternalIP".into(),
                address: ip.to_string(),
            })
            .collect(),
    );
    node
}

/// A [`ClusterState`] from owned objects.
pub fn cluster(
    nodes: Vec<Node>,
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    policies: Vec<NetworkPolicy>,
) -> ClusterState {
    ClusterState {
        nodes: nodes.into_iter().map(Arc::new).collect(),
        namespaces: namespaces.into_iter().map(Arc::new).collect(),
        pods: pods.into_iter().map(Arc::new).collect(),
        policies: policies.into_iter().map(Arc::new).collect(),
        cluster_policies: Vec::new(),
    }
}
