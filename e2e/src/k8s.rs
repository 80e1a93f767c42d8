//! Kubernetes manifests for what the lab runs: Nodes, Namespaces, Pods (and any other object).
//!
//! The `palisade netpol compile|apply --manifests DIR` commands read plain Kubernetes objects;
//! the lab writes them as block YAML ([`to_yaml`]), one object per `.yaml` file, shaped as the
//! API server would return them: Nodes with `spec.podCIDR(s)` and an `InternalIP`, Namespaces with
//! the `kubernetes.io/metadata.name` label, Running Pods with `spec.nodeName`, `status.podIP`
//! and named container ports.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

use crate::lab::NodeHandle;
use crate::server::Protocol;

/// Labels (or any string map).
pub type Labels = BTreeMap<String, String>;

/// Builds a label map from pairs.
pub fn labels<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Labels {
    pairs
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
}

/// A Node object for a lab node.
pub fn node(node: &NodeHandle) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": { "kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux" },
        },
        "spec": { "podCIDR": node.pod_cidr_text(), "podCIDRs": [node.pod_cidr_text()] },
        "status": {
            "addresses": [
                { "type": "InternalIP", "address": node.ip.to_string() },
                { "type": "Hostname", "address": node.name },
            ],
        },
    })
}

/// A Namespace; `kubernetes.io/metadata.name` is always set to its name, as the API server does.
pub fn namespace(name: &str, labels: &Labels) -> Value {
    let mut all = labels.clone();
    all.insert("kubernetes.io/metadata.name".into(), name.into());
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": name, "labels": all },
    })
}

/// A named container port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

impl NamedPort {
    /// The upstream e2e naming: `serve-<port>-<tcp|udp|sctp>`.
    pub fn upstream(port: u16, protocol: Protocol) -> NamedPort {
        NamedPort {
            name: format!("serve-{port}-{}", protocol.lower()),
            port,
            protocol,
        }
    }
}

/// What a Pod object says about a pod.
#[derive(Clone, Debug)]
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub labels: &'a Labels,
    pub node_name: &'a str,
    pub host_ip: Ipv4Addr,
    pub pod_ip: Ipv4Addr,
    /// One container per port, like the upstream e2e pods (`cont-80-tcp` serving `serve-80-tcp`).
    pub ports: &'a [NamedPort],
}

/// A Running Pod object.
pub fn pod(p: &PodSpec<'_>) -> Value {
    let containers: Vec<Value> = p
        .ports
        .iter()
        .map(|port| {
            json!({
                "name": format!("cont-{}-{}", port.port, port.protocol.lower()),
                "image": "palisade.invalid/lab-server:1",
                "ports": [{
                    "name": port.name,
                    "containerPort": port.port,
                    "protocol": port.protocol.k8s_name(),
                }],
            })
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": p.name,
            "namespace": p.namespace,
            "labels": p.labels,
            "uid": format!("lab-{}-{}", p.namespace, p.name),
        },
        "spec": { "nodeName": p.node_name, "containers": containers },
        "status": {
            "phase": "Running",
            "hostIP": p.host_ip.to_string(),
            "hostIPs": [{ "ip": p.host_ip.to_string() }],
            "podIP": p.pod_ip.to_string(),
            "podIPs": [{ "ip": p.pod_ip.to_string() }],
        },
    })
}

/// A NetworkPolicy `namespace/name` with the given `spec`.
pub fn network_policy(namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": name, "namespace": namespace },
        "spec": spec,
    })
}

fn file_name(index: usize, object: &Value) -> String {
    let field = |path: &[&str]| {
        let mut v = object;
        for key in path {
            v = v.get(key).unwrap_or(&Value::Null);
        }
        v.as_str().unwrap_or("").to_ascii_lowercase()
    };
    let mut name = format!("{index:04}-{}", field(&["kind"]));
    for part in [
        field(&["metadata", "namespace"]),
        field(&["metadata", "name"]),
    ] {
        if !part.is_empty() {
            name.push('-');
            name.extend(part.chars().map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            }));
        }
    }
    name + ".yaml"
}

/// Renders a JSON value as block-style YAML. Strings are written as JSON string literals (a
/// valid YAML double-quoted scalar), so no value is ever re-typed (`"80"`, `"on"`, `"1.0"`).
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(m) if !m.is_empty() => yaml_block(value, 0, &mut out),
        Value::Array(a) if !a.is_empty() => yaml_block(value, 0, &mut out),
        other => {
            out.push_str(&yaml_scalar(other));
            out.push('\n');
        }
    }
    out
}

fn yaml_key(key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
        && key.as_bytes()[0].is_ascii_alphabetic();
    if plain {
        key.to_string()
    } else {
        Value::String(key.to_string()).to_string()
    }
}

/// Scalars and empty collections, which fit on the line of their key.
fn yaml_scalar(value: &Value) -> String {
    match value {
        Value::Object(m) if m.is_empty() => "{}".into(),
        Value::Array(a) if a.is_empty() => "[]".into(),
        // JSON's rendering of strings, numbers, booleans and null is valid YAML.
        other => other.to_string(),
    }
}

fn is_block(value: &Value) -> bool {
    match value {
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => false,
    }
}

/// Writes a non-empty object or array at `indent` spaces.
fn yaml_block(value: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                if is_block(v) {
                    out.push_str(&format!("{pad}{}:\n", yaml_key(key)));
                    yaml_block(v, indent + 2, out);
                } else {
                    out.push_str(&format!("{pad}{}: {}\n", yaml_key(key), yaml_scalar(v)));
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                if is_block(item) {
                    // Render the item two deeper, then put the dash in the first line's indent.
                    let mut inner = String::new();
                    yaml_block(item, indent + 2, &mut inner);
                    out.push_str(&pad);
                    out.push_str("- ");
                    out.push_str(&inner[indent + 2..]);
                } else {
                    out.push_str(&format!("{pad}- {}\n", yaml_scalar(item)));
                }
            }
        }
        other => {
            out.push_str(&format!("{pad}{}\n", yaml_scalar(other)));
        }
    }
}

/// Replaces the `.yaml` files in `dir` (created if needed) with one file per object.
pub fn write_manifests(dir: &Path, objects: &[Value]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "yaml") {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    for (i, object) in objects.iter().enumerate() {
        let path = dir.join(file_name(i, object));
        let text = serde_json::to_string_pretty(object).context("serialising a manifest")?;
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Sets `metadata.labels[key] = value` on an object (e.g. to relabel a Pod or Namespace).
pub fn set_label(object: &mut Value, key: &str, value: &str) {
    let metadata = object.as_object_mut().map(|o| {
        o.entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()))
    });
    if let Some(Value::Object(metadata)) = metadata {
        let labels = metadata
            .entry("labels")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(labels) = labels {
            labels.insert(key.into(), Value::String(value.into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_is_block_style_with_quoted_strings() {
        // Keys in sorted order, so the test holds with or without serde_json's preserve_order.
        let v = json!({
            "kind": "Pod",
            "metadata": { "labels": { "a b": "on", "kubernetes.io/metadata.name": "x" } },
            "spec": {
                "empty": [],
                "nested": [[1, 2], {}],
                "podSelector": {},
                "ports": [{ "port": 80, "protocol": "TCP" }, { "port": "serve-81-udp" }],
                "values": ["a", "b"],
            },
        });
        let expected = [
            "kind: \"Pod\"",
            "metadata:",
            "  labels:",
            "    \"a b\": \"on\"",
            "    kubernetes.io/metadata.name: \"x\"",
            "spec:",
            "  empty: []",
            "  nested:",
            "    - - 1",
            "      - 2",
            "    - {}",
            "  podSelector: {}",
            "  ports:",
            "    - port: 80",
            "      protocol: \"TCP\"",
            "    - port: \"serve-81-udp\"",
            "  values:",
            "    - \"a\"",
            "    - \"b\"",
            "",
        ]
        .join("\n");
        assert_eq!(to_yaml(&v), expected);
        assert_eq!(to_yaml(&json!({})), "{}\n");
    }

    #[test]
    fn objects_look_like_the_api_servers() {
        let ns = namespace("x", &labels([("ns", "x")]));
        assert_eq!(ns["metadata"]["labels"]["kubernetes.io/metadata.name"], "x");
        let l = labels([("pod", "a")]);
        let ports = [
            NamedPort::upstream(80, Protocol::Tcp),
            NamedPort::upstream(81, Protocol::Sctp),
        ];
        let p = pod(&PodSpec {
            namespace: "x",
            name: "a",
            labels: &l,
            node_name: "node1",
            host_ip: Ipv4Addr::new(198, 51, 100, 11),
            pod_ip: Ipv4Addr::new(10, 244, 1, 2),
            ports: &ports,
        });
        assert_eq!(
            p["spec"]["containers"][1]["ports"][0]["name"],
            "serve-81-sctp"
        );
        assert_eq!(p["spec"]["containers"][1]["ports"][0]["protocol"], "SCTP");
        assert_eq!(p["status"]["podIP"], "10.244.1.2");
        assert_eq!(file_name(3, &p), "0003-pod-x-a.yaml");
        let mut ns = ns;
        set_label(&mut ns, "team", "blue");
        assert_eq!(ns["metadata"]["labels"]["team"], "blue");
    }
}
