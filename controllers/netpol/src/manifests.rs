//! Read Kubernetes YAML (what `kubectl get -o yaml` prints, or hand-written manifests) into a
//! [`ClusterState`], for the `palisade netpol` CLI, tests and demos.
//!
//! Accepts JSON (detected by its first byte, read with serde_json) and YAML; any number of
//! documents (`---`), `kind: List` (and `PodList`, ...) with `items` of any size,
//! and skips every kind we do not read (Services, Deployments, Calico's own `NetworkPolicy`
//! of another API group, ...) silently. Read: `v1` Pod, Namespace, Node,
//! `networking.k8s.io/v1` NetworkPolicy and `policy.networking.k8s.io/v1alpha2`
//! ClusterNetworkPolicy.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use crate::{ClusterState, ManifestError};

mod fastyaml;

/// Parses manifests in either format: text whose first non-space byte is `{` or `[` is JSON
/// (what `kubectl get -o json` prints; several concatenated values are allowed), anything
/// else is a (multi-document) YAML stream.
pub fn parse(text: &str) -> Result<ClusterState, ManifestError> {
    match text.trim_start().as_bytes().first() {
        Some(b'{' | b'[') => parse_json(text),
        _ => parse_yaml(text),
    }
}

/// Parses one or more concatenated JSON values (objects, `kind: List`s, or arrays of objects).
pub fn parse_json(text: &str) -> Result<ClusterState, ManifestError> {
    let mut state = ClusterState::default();
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let mut index = 0;
    loop {
        let line = line_at(text, stream.byte_offset());
        let Some(doc) = stream.next() else { break };
        let doc = doc.map_err(|e| ManifestError::Syntax {
            format: "JSON",
            document: index,
            line: e.line().max(1),
            message: e.to_string(),
        })?;
        match doc {
            Value::Array(items) => {
                for (i, item) in items.into_iter().enumerate() {
                    add_document(
                        &mut state,
                        Doc {
                            index,
                            line,
                            item: Some(i),
                        },
                        item,
                    )?;
                }
            }
            doc => add_document(
                &mut state,
                Doc {
                    index,
                    line,
                    item: None,
                },
                doc,
            )?,
        }
        index += 1;
    }
    Ok(state)
}

/// 1-based line of a byte offset (the first line after leading whitespace).
fn line_at(text: &str, offset: usize) -> usize {
    let head = text.get(..offset).unwrap_or(text);
    let rest = text.get(offset..).unwrap_or_default();
    let ws = rest.len() - rest.trim_start().len();
    let skipped = rest.get(..ws).unwrap_or_default();
    1 + head.bytes().filter(|&b| b == b'\n').count()
        + skipped.bytes().filter(|&b| b == b'\n').count()
}

/// Splits a YAML stream at its document markers (`---` at the start of a line, which YAML
/// forbids inside content), returning each chunk with its first line (1-based).
fn yaml_chunks(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut pos = 0;
    for (line, l) in (1..).zip(text.split_inclusive('\n')) {
        let marker = l
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']));
        if marker && pos > start {
            out.push((start_line, &text[start..pos]));
            start = pos;
            start_line = line;
        }
        pos += l.len();
    }
    if pos > start {
        out.push((start_line, &text[start..pos]));
    }
    out
}

/// Parser options for one YAML chunk: YAML 1.2 scalars, and budgets that scale with the
/// chunk's size (every node and event costs at least a byte of input, so a large dump is
/// not refused while alias and anchor expansion keep their fixed caps).
fn yaml_options(len: usize) -> serde_saphyr::Options {
    // Documents go through untyped values first, so YAML 1.1 spellings would turn `name: y`
    // or a label `on` into booleans; read booleans the YAML 1.2 way instead.
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options.leading_zero_numbers_as_strings = true;
    let mut budget = serde_saphyr::budget::Budget::default();
    budget.max_nodes = budget.max_nodes.max(len.saturating_add(16));
    budget.max_events = budget
        .max_events
        .max(len.saturating_mul(2).saturating_add(16));
    budget.max_documents = budget.max_documents.max(len.saturating_add(16));
    budget.max_total_scalar_bytes = budget.max_total_scalar_bytes.max(len.saturating_add(16));
    options.budget = Some(budget);
    options
}

/// One chunk through serde-saphyr, the general YAML parser.
fn yaml_general(chunk: &str) -> Result<Vec<Value>, serde_saphyr::Error> {
    serde_saphyr::from_str_multiple_with_options::<Value, Vec<Value>>(
        chunk,
        yaml_options(chunk.len()),
    )
}

/// The fast reader and the general parser on one YAML chunk, for the differential fuzz
/// target: what the fast reader returns (`None`: it declined) and what serde-saphyr returns.
#[cfg(feature = "test-support")]
#[doc(hidden)]
pub fn yaml_both_ways(chunk: &str) -> (Option<Vec<Value>>, Result<Vec<Value>, String>) {
    (
        fastyaml::parse_chunk(chunk),
        yaml_general(chunk).map_err(|e| e.to_string()),
    )
}

/// Parses a (multi-document) YAML stream of any number of documents. Each document goes
/// through a fast reader of the block-style subset `kubectl` prints first; whatever it does
/// not read with certainty goes to serde-saphyr (so errors and rare YAML features are the
/// general parser's).
pub fn parse_yaml(text: &str) -> Result<ClusterState, ManifestError> {
    parse_yaml_with(text, true)
}

/// [`parse_yaml`] with every document through serde-saphyr, for the benchmark's comparison.
#[cfg(feature = "test-support")]
#[doc(hidden)]
pub fn parse_yaml_general_only(text: &str) -> Result<ClusterState, ManifestError> {
    parse_yaml_with(text, false)
}

fn parse_yaml_with(text: &str, fast: bool) -> Result<ClusterState, ManifestError> {
    let mut state = ClusterState::default();
    let mut index = 0;
    for (line, chunk) in yaml_chunks(text) {
        let docs = match fast.then(|| fastyaml::parse_chunk(chunk)).flatten() {
            Some(docs) => docs,
            None => yaml_general(chunk).map_err(|e| ManifestError::Syntax {
                format: "YAML",
                document: index,
                line: line
                    + e.location()
                        .map_or(0, |l| (l.line() as usize).saturating_sub(1)),
                message: e.to_string(),
            })?,
        };
        for doc in docs {
            add_document(
                &mut state,
                Doc {
                    index,
                    line,
                    item: None,
                },
                doc,
            )?;
            index += 1;
        }
    }
    Ok(state)
}

/// Where a document came from, for error messages.
#[derive(Clone, Copy)]
struct Doc {
    index: usize,
    line: usize,
    item: Option<usize>,
}

fn add_document(state: &mut ClusterState, at: Doc, doc: Value) -> Result<(), ManifestError> {
    let Value::Object(mut map) = doc else {
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
        if let Some(Value::Array(items)) = map.remove("items") {
            let item_kind = kind.strip_suffix("List").unwrap_or_default();
            for (i, item) in items.into_iter().enumerate() {
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
                // Nested lists are not a Kubernetes thing: items of items are not read.
                if at.item.is_none() {
                    add_document(
                        state,
                        Doc {
                            item: Some(i),
                            ..at
                        },
                        item,
                    )?;
                }
            }
        }
        return Ok(());
    }
    let doc = Value::Object(map);
    match (api.as_str(), kind) {
        ("v1", "Pod") => state.pods.push(Arc::new(object(at, kind, doc)?)),
        ("v1", "Namespace") => state.namespaces.push(Arc::new(object(at, kind, doc)?)),
        ("v1", "Node") => state.nodes.push(Arc::new(object(at, kind, doc)?)),
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            state.policies.push(Arc::new(object(at, kind, doc)?))
        }
        (crate::cnp::API_VERSION, crate::cnp::KIND) => state
            .cluster_policies
            .push(Arc::new(object(at, kind, doc)?)),
        _ => {}
    }
    Ok(())
}

fn object<T: serde::de::DeserializeOwned>(
    at: Doc,
    kind: &str,
    doc: Value,
) -> Result<T, ManifestError> {
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    serde_json::from_value(doc).map_err(|e| ManifestError::Object {
        index: at.index,
        line: at.line,
        item: at.item,
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
        merge_by_key(
            &mut self.cluster_policies,
            other.cluster_policies,
            |o: &crate::cnp::ClusterNetworkPolicy| &o.metadata,
        );
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
    fn reads_cluster_network_policies() {
        let text = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: deny-tenants}
spec:
  tier: Admin
  priority: 5
  subject: {namespaces: {matchLabels: {tenant: a}}}
  ingress:
  - {action: Deny, from: [{namespaces: {matchLabels: {tenant: b}}}]}
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: old-api}
spec: {priority: 1, subject: {namespaces: {}}}
---
apiVersion: v1
kind: List
items:
- apiVersion: policy.networking.k8s.io/v1alpha2
  kind: ClusterNetworkPolicy
  metadata: {name: base}
  spec: {tier: Baseline, priority: 0, subject: {pods: {podSelector: {}}}}
"#;
        let mut s = parse_yaml(text).expect("parses");
        assert_eq!(s.cluster_policies.len(), 2, "v1alpha1 kinds are not read");
        assert_eq!(s.cluster_policies[0].spec.tier, "Admin");
        assert_eq!(s.cluster_policies[0].spec.ingress[0].action, "Deny");
        let json = serde_json::to_string(&*s.cluster_policies[1]).unwrap();
        let again = parse(&json).expect("JSON too");
        s.merge(again);
        assert_eq!(s.cluster_policies.len(), 2, "merged by name");
        let bad = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: x}\nspec: {priority: high}\n";
        assert!(parse_yaml(bad).is_err());
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
        let e = parse_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: bad}\nspec: 7\n").unwrap_err();
        assert!(e.to_string().starts_with("document 1 (line 4)"), "{e}");
        let e = parse("{\"kind\": \"PodList\", \"apiVersion\": \"v1\",\n \"items\": [{}, {\"metadata\": {\"name\": \"bad\"}, \"spec\": 7}]}").unwrap_err();
        assert!(e.to_string().contains("item 1: invalid Pod \"bad\""), "{e}");
        let e = parse("{}\n{\n  \"a\": [1,\n}").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("document 1 (line 4): invalid JSON"),
            "{e}"
        );
        let e = parse_yaml("a: 1\n---\nb: 2\n---\nc: [1,\n").unwrap_err();
        assert!(e.to_string().starts_with("document 2 (line"), "{e}");
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

#[cfg(test)]
mod scale_tests {
    use super::*;

    fn ns_doc(i: usize) -> String {
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{i}}}\n")
    }

    #[test]
    fn thousands_of_documents_and_a_huge_list() {
        let multi: Vec<String> = (0..3000).map(ns_doc).collect();
        let s = parse(&multi.join("---\n")).expect("3000 documents");
        assert_eq!(s.namespaces.len(), 3000);
        // One List of more than the default 250,000 YAML nodes.
        let mut list = String::from("apiVersion: v1\nkind: List\nitems:\n");
        for i in 0..30_000 {
            list.push_str(&format!(
                "- apiVersion: v1\n  kind: Namespace\n  metadata:\n    name: ns-{i}\n    labels: {{a: b, c: d, e: f}}\n"
            ));
        }
        let s = parse(&list).expect("a big List");
        assert_eq!(s.namespaces.len(), 30_000);
    }

    #[test]
    fn json_is_detected_and_read() {
        let s = parse(
            " \n{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [\
             {\"apiVersion\": \"v1\", \"kind\": \"Namespace\", \"metadata\": {\"name\": \"a\"}}]}\n\
             {\"apiVersion\": \"v1\", \"kind\": \"Namespace\", \"metadata\": {\"name\": \"b\"}}\n\
             [{\"apiVersion\": \"v1\", \"kind\": \"Namespace\", \"metadata\": {\"name\": \"c\"}}]",
        )
        .expect("json");
        let names: Vec<_> = s
            .namespaces
            .iter()
            .map(|n| n.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn document_markers_split_where_yaml_does() {
        let chunks = yaml_chunks("a: 1\n---\nb: |\n  --- not a marker\n--- {c: 1}\n---x: 2\n");
        let lines: Vec<usize> = chunks.iter().map(|c| c.0).collect();
        assert_eq!(lines, [1, 2, 5]);
        assert!(chunks[2].1.contains("---x"));
    }
}
