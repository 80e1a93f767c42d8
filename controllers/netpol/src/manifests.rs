//! Read Kubernetes YAML (what `kubectl get -o yaml` prints, or hand-written manifests) into a
//! [`ClusterState`], for the `palisade netpol` CLI, tests and demos.
//!
//! Accepts multi-document streams (`---`), `kind: List` (and `PodList`, ...) with `items`,
//! and skips every kind we do not read (Services, Deployments, Calico's own `NetworkPolicy`
//! of another API group, ...) silently. Read: `v1` Pod, Namespace, Node and
//! `networking.k8s.io/v1` NetworkPolicy.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use crate::{ClusterState, ManifestError};

/// Parses a (multi-document) YAML stream.
pub fn parse_yaml(text: &str) -> Result<ClusterState, ManifestError> {
    // Documents go through untyped values first, so YAML 1.1 spellings would turn `name: y`
    // or a label `on` into booleans; read booleans the YAML 1.2 way instead.
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options.leading_zero_numbers_as_strings = true;
    let docs: Vec<Value> =
        serde_saphyr::from_str_multiple_with_options::<Value, Vec<Value>>(text, options)
            .map_err(|e| ManifestError::Yaml(e.to_string()))?;
    let mut state = ClusterState::default();
    for (i, doc) in docs.into_iter().enumerate() {
        add_document(&mut state, i, doc)?;
    }
    Ok(state)
}

fn add_document(state: &mut ClusterState, index: usize, doc: Value) -> Result<(), ManifestError> {
    let Value::Object(map) = &doc else {
        return Ok(());
    };
    let kind = map
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let api = map
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let kind = kind.as_str();
    if kind.ends_with("List") {
        if let Some(Value::Array(items)) = map.get("items") {
            let item_kind = kind.strip_suffix("List").unwrap_or_default();
            for item in items.clone() {
                let item = match item {
                    // `kubectl get pods -o yaml` items may omit kind/apiVersion.
                    Value::Object(mut m) if !item_kind.is_empty() => {
                        m.entry("kind")
                            .or_insert_with(|| Value::String(item_kind.to_string()));
                        m.entry("apiVersion")
                            .or_insert_with(|| Value::String(api.to_string()));
                        Value::Object(m)
                    }
                    other => other,
                };
                add_document(state, index, item)?;
            }
        }
        return Ok(());
    }
    match (api.as_str(), kind) {
        ("v1", "Pod") => state.pods.push(Arc::new(object(index, kind, doc)?)),
        ("v1", "Namespace") => state.namespaces.push(Arc::new(object(index, kind, doc)?)),
        ("v1", "Node") => state.nodes.push(Arc::new(object(index, kind, doc)?)),
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            state.policies.push(Arc::new(object(index, kind, doc)?))
        }
        _ => {}
    }
    Ok(())
}

fn object<T: serde::de::DeserializeOwned>(
    index: usize,
    kind: &str,
    doc: Value,
) -> Result<T, ManifestError> {
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    serde_json::from_value(doc).map_err(|e| ManifestError::Object {
        index,
        kind: kind.to_string(),
        name,
        message: e.to_string(),
    })
}

fn key(meta: &ObjectMeta) -> (Option<String>, Option<String>) {
    (meta.namespace.clone(), meta.name.clone())
}

fn merge_by_key<T>(into: &mut Vec<Arc<T>>, from: Vec<Arc<T>>, meta: fn(&T) -> &ObjectMeta) {
    let mut index: HashMap<_, usize> = into
        .iter()
        .enumerate()
        .map(|(i, o)| (key(meta(o)), i))
        .collect();
    for o in from {
        let k = key(meta(&o));
        match index.get(&k) {
            Some(&i) => into[i] = o,
            None => {
                index.insert(k, into.len());
                into.push(o);
            }
        }
    }
}

impl ClusterState {
    /// Adds `other`'s objects; an object with the same kind, namespace and name replaces
    /// the one already present.
    pub fn merge(&mut self, other: ClusterState) {
        merge_by_key(&mut self.nodes, other.nodes, |o: &Node| &o.metadata);
        merge_by_key(&mut self.namespaces, other.namespaces, |o: &Namespace| {
            &o.metadata
        });
        merge_by_key(&mut self.pods, other.pods, |o: &Pod| &o.metadata);
        merge_by_key(&mut self.policies, other.policies, |o: &NetworkPolicy| {
            &o.metadata
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {team: a}
---
apiVersion: v1
kind: Service
metadata: {name: ignored, namespace: shop}
spec: {ports: [{port: 80}]}
---
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - ports:
    - {port: http}
    - {port: 8000, endPort: 8080, protocol: UDP}
---
apiVersion: crd.projectcalico.org/v1
kind: NetworkPolicy
metadata: {name: calico-one, namespace: shop}
spec: {selector: all()}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: web-1, namespace: shop, labels: {app: web}}
  spec:
    nodeName: n1
    containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
  status: {podIP: 10.244.1.5, phase: Running}
- apiVersion: v1
  kind: Node
  metadata: {name: n1}
  spec: {podCIDRs: [10.244.1.0/24]}
"#;

    #[test]
    fn reads_multi_document_streams_and_lists() {
        let s = parse_yaml(STREAM).expect("parses");
        assert_eq!(s.namespaces.len(), 1);
        assert_eq!(
            s.policies.len(),
            1,
            "Calico's NetworkPolicy is another API group"
        );
        assert_eq!(s.pods.len(), 1);
        assert_eq!(s.nodes.len(), 1);
        let np = &s.policies[0];
        let spec = np.spec.as_ref().unwrap();
        let ports = spec.ingress.as_ref().unwrap()[0].ports.as_ref().unwrap();
        assert_eq!(ports[1].end_port, Some(8080));
        assert_eq!(
            s.pods[0].status.as_ref().unwrap().pod_ip.as_deref(),
            Some("10.244.1.5")
        );
    }

    #[test]
    fn yaml_1_1_booleans_stay_strings() {
        let s = parse_yaml(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: y, labels: {debug: on, zone: 007}}\n",
        )
        .expect("parses");
        let ns = &s.namespaces[0];
        assert_eq!(ns.metadata.name.as_deref(), Some("y"));
        let labels = ns.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["debug"], "on");
        assert_eq!(labels["zone"], "007");
    }

    #[test]
    fn typed_lists_fill_in_kind() {
        let s = parse_yaml(
            "apiVersion: v1\nkind: PodList\nitems:\n- metadata: {name: a, namespace: x}\n",
        )
        .unwrap();
        assert_eq!(s.pods.len(), 1);
    }

    #[test]
    fn errors_name_the_object() {
        let e =
            parse_yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: bad}\nspec: 7\n").unwrap_err();
        assert!(e.to_string().contains("Pod \"bad\""), "{e}");
        assert!(parse_yaml("a: [1, 2").is_err());
    }

    #[test]
    fn merge_replaces_same_object() {
        let mut a = parse_yaml(STREAM).unwrap();
        let b = parse_yaml(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: b}}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n",
        )
        .unwrap();
        a.merge(b);
        assert_eq!(a.namespaces.len(), 2);
        let labels = a.namespaces[0].metadata.labels.as_ref().unwrap();
        assert_eq!(labels.get("team").map(String::as_str), Some("b"));
    }
}
