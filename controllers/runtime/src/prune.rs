//! What the caches keep of a Pod: only the fields a reconciler reads.
//!
//! ```text
//!  list/watch JSON ──serde──► SlimPod (unknown fields skipped, never allocated)
//!                                 │ into_inner
//!                                 ▼
//!                      Pod { metadata: name, namespace, uid, resourceVersion, labels,
//!                            spec: nodeName, hostNetwork, containers[name, ports],
//!                            status: phase, podIP, podIPs }
//! ```
//!
//! A node agent watches every Pod of the cluster, and a Pod as the API server serves it is
//! mostly what no reconciler reads (managedFields, images, env, probes, volumes, conditions,
//! container statuses). [`SlimPod`] decodes straight into a `Pod` holding only the fields
//! NetworkPolicy enforcement reads (see `palisade_netpol`'s model: labels, node, host
//! network, named container ports, phase, IPs); serde skips the rest of the JSON without
//! building it, so neither the list pages nor the cache ever hold the full objects.
//! [`prune_pod`] is the same projection applied to an already decoded `Pod` (tests hold
//! both to the same result). Enforcement registers its Pod cache with
//! `Registration::watch_decoded::<Pod, SlimPod>` (see `stores`); every other reader of that
//! cache sees the same slim Pods.
//!
//! Decoding is more lenient than `k8s-openapi`'s where a field we drop would have failed it
//! (a malformed probe does not matter to us), and as strict on the fields we keep.
use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher;
use kube::Resource;
use serde::{Deserialize, Deserializer};

/// A `Pod` decoded with only the fields reconcilers read (see the module docs).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlimPod(pub Pod);

impl SlimPod {
    pub fn into_inner(self) -> Pod {
        self.0
    }
}

impl From<SlimPod> for Pod {
    fn from(p: SlimPod) -> Pod {
        p.0
    }
}

impl Resource for SlimPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        Pod::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        Pod::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        Pod::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        Pod::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.0.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}

// The shadow of a Pod: what we keep, in the API's field names. Everything else is skipped.
#[derive(Deserialize, Default)]
#[serde(default)]
struct PodShadow {
    metadata: MetaShadow,
    spec: Option<SpecShadow>,
    status: Option<StatusShadow>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct MetaShadow {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct SpecShadow {
    node_name: Option<String>,
    host_network: Option<bool>,
    containers: Option<Vec<ContainerShadow>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ContainerShadow {
    name: String,
    ports: Option<Vec<PortShadow>>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct PortShadow {
    name: Option<String>,
    container_port: i32,
    protocol: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct StatusShadow {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<PodIpShadow>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PodIpShadow {
    ip: String,
}

impl<'de> Deserialize<'de> for SlimPod {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = PodShadow::deserialize(d)?;
        let m = s.metadata;
        Ok(SlimPod(Pod {
            metadata: ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                uid: m.uid,
                resource_version: m.resource_version,
                labels: m.labels,
                ..Default::default()
            },
            spec: s.spec.map(|sp| PodSpec {
                node_name: sp.node_name,
                host_network: sp.host_network,
                containers: sp
                    .containers
                    .unwrap_or_default()
                    .into_iter()
                    .map(|c| Container {
                        name: c.name,
                        ports: c.ports.map(|ps| {
                            ps.into_iter()
                                .map(|p| ContainerPort {
                                    name: p.name,
                                    container_port: p.container_port,
                                    protocol: p.protocol,
                                    ..Default::default()
                                })
                                .collect()
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            status: s.status.map(|st| PodStatus {
                phase: st.phase,
                pod_ip: st.pod_ip,
                pod_ips: st
                    .pod_ips
                    .map(|v| v.into_iter().map(|p| PodIP { ip: p.ip }).collect()),
                ..Default::default()
            }),
        }))
    }
}

/// Converts the object of a watch event.
pub fn map_event<A, B>(ev: watcher::Event<A>, f: impl FnOnce(A) -> B) -> watcher::Event<B> {
    use watcher::Event;
    match ev {
        Event::Apply(o) => Event::Apply(f(o)),
        Event::Delete(o) => Event::Delete(f(o)),
        Event::InitApply(o) => Event::InitApply(f(o)),
        Event::Init => Event::Init,
        Event::InitDone => Event::InitDone,
    }
}

/// [`SlimPod`]'s projection of a decoded Pod, in place.
pub fn prune_pod(pod: &mut Pod) {
    let meta = std::mem::take(&mut pod.metadata);
    pod.metadata = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        labels: meta.labels,
        ..Default::default()
    };
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(PodSpec {
            node_name: spec.node_name,
            host_network: spec.host_network,
            containers: spec
                .containers
                .into_iter()
                .map(|c| Container {
                    name: c.name,
                    ports: c.ports.map(|ps| {
                        ps.into_iter()
                            .map(|p| ContainerPort {
                                name: p.name,
                                container_port: p.container_port,
                                protocol: p.protocol,
                                ..Default::default()
                            })
                            .collect()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
    }
    if let Some(st) = pod.status.take() {
        pod.status = Some(PodStatus {
            phase: st.phase,
            pod_ip: st.pod_ip,
            pod_ips: st.pod_ips,
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A Pod as a kube-apiserver serves one of a Deployment's (trimmed, but with every kind
    /// of field we drop).
    fn full() -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-7d4b9c-x2x", "namespace": "shop", "uid": "u-1",
                "resourceVersion": "42", "generateName": "web-7d4b9c-",
                "creationTimestamp": "2026-11-30T09:12:44Z",
                "labels": {"app": "web", "pod-template-hash": "7d4b9c"},
                "annotations": {"kubectl.kubernetes.io/restartedAt": "now"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web-7d4b9c", "uid": "rs-1", "controller": true}],
                "managedFields": [{"manager": "kubelet", "operation": "Update",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:phase": {}}}}]
            },
            "spec": {
                "nodeName": "n1", "hostNetwork": false, "dnsPolicy": "ClusterFirst",
                "containers": [
                    {"name": "app", "image": "r/web:1", "env": [{"name": "A", "value": "b"}],
                     "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                               {"containerPort": 9100, "hostPort": 9100}],
                     "readinessProbe": {"httpGet": {"path": "/", "port": 8080}},
                     "resources": {"requests": {"cpu": "100m"}}},
                    {"name": "sidecar", "image": "r/proxy:1"}
                ],
                "volumes": [{"name": "v", "emptyDir": {}}],
                "tolerations": [{"key": "k", "operator": "Exists"}]
            },
            "status": {
                "phase": "Running", "podIP": "10.0.0.5",
                "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}],
                "hostIP": "192.0.2.1", "qosClass": "Burstable",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0,
                    "image": "r/web:1", "imageID": "x", "state": {"running": {}}}]
            }
        })
    }

    #[test]
    fn slim_decode_keeps_what_reconcilers_read_and_equals_pruning_a_full_pod() {
        let slim: SlimPod = serde_json::from_value(full()).unwrap();
        let mut pruned: Pod = serde_json::from_value(full()).unwrap();
        prune_pod(&mut pruned);
        assert_eq!(slim.0, pruned);

        let p = slim.into_inner();
        assert_eq!(p.metadata.name.as_deref(), Some("web-7d4b9c-x2x"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(p.metadata.uid.as_deref(), Some("u-1"));
        assert_eq!(p.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(p.metadata.labels.as_ref().unwrap()["app"], "web");
        assert!(p.metadata.managed_fields.is_none());
        assert!(p.metadata.annotations.is_none());
        assert!(p.metadata.owner_references.is_none());
        let spec = p.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert_eq!(spec.host_network, Some(false));
        assert!(spec.volumes.is_none() && spec.tolerations.is_none());
        assert_eq!(spec.containers.len(), 2);
        let ports = spec.containers[0].ports.as_ref().unwrap();
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        assert_eq!(ports[0].container_port, 8080);
        assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
        assert_eq!(ports[1].container_port, 9100);
        assert_eq!(ports[1].host_port, None);
        assert!(spec.containers[0].image.is_none());
        let st = p.status.unwrap();
        assert_eq!(st.phase.as_deref(), Some("Running"));
        assert_eq!(st.pod_ip.as_deref(), Some("10.0.0.5"));
        assert_eq!(st.pod_ips.unwrap().len(), 2);
        assert!(st.conditions.is_none() && st.container_statuses.is_none());
    }

    #[test]
    fn slim_decode_of_sparse_and_odd_pods_never_fails_where_it_need_not() {
        // No spec/status at all, nulls, a malformed field we drop.
        for v in [
            json!({"metadata": {"name": "a"}}),
            json!({"metadata": {"name": "a", "labels": null}, "spec": null, "status": null}),
            json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "c",
                "readinessProbe": "not an object"}]}}),
        ] {
            let p: SlimPod =
                serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(p.0.metadata.name.as_deref(), Some("a"));
        }
        // A field we keep with the wrong type is an error, as in the full decode.
        let bad = json!({"metadata": {"name": "a"}, "spec": {"nodeName": 7}});
        assert!(serde_json::from_value::<SlimPod>(bad.clone()).is_err());
        assert!(serde_json::from_value::<Pod>(bad).is_err());
    }

    #[test]
    fn slim_pod_is_a_pod_resource() {
        assert_eq!(SlimPod::kind(&()), "Pod");
        assert_eq!(SlimPod::plural(&()), "pods");
        assert_eq!(SlimPod::api_version(&()), "v1");
        let list: kube::core::ObjectList<SlimPod> = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "7"},
            "items": [full(), {"metadata": {"name": "b", "namespace": "x"}}]
        }))
        .unwrap();
        assert_eq!(list.items.len(), 2);
        assert_eq!(list.items[1].meta().name.as_deref(), Some("b"));
    }
}
