//! ClusterNetworkPolicy input and status for the enforcement reconciler.
//!
//! ```text
//! watch clusternetworkpolicies (DynamicObject) ─► convert (cached per object, reused while
//!        name + spec are unchanged: our own status patches never force a recompile)
//!        ─► ClusterState.cluster_policies ─► compile (all families) ─► apply
//!        ─► per policy: condition `palisade.dev/<node>` ─► server-side apply on /status
//!           (field manager per node, so nodes never overwrite each other's condition)
//! ```
//!
//! Off unless the agent runs with `--enable-cluster-network-policy` (the chart's
//! `clusterNetworkPolicy.enabled`): the watch needs the CRD, and enforcement waits for every
//! watch it reads to list once.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Api, Client, ResourceExt};
use palisade_netpol::cnp::{self, ClusterNetworkPolicy};
use palisade_netpol::Diagnostic;

/// The upstream resource, `policy.networking.k8s.io/v1alpha2` `clusternetworkpolicies`.
pub fn api_resource() -> ApiResource {
    ApiResource {
        group: cnp::GROUP.into(),
        version: cnp::VERSION.into(),
        api_version: cnp::API_VERSION.into(),
        kind: cnp::KIND.into(),
        plural: cnp::PLURAL.into(),
    }
}

/// The ClusterNetworkPolicy cache plus what status reporting needs.
#[derive(Clone)]
pub struct CnpWatch {
    pub store: Store<DynamicObject>,
    pub client: Client,
    converted: Arc<Mutex<Converted>>,
}

#[derive(Default)]
struct Converted {
    /// Name → (the object's Arc, its full typed form, the compiler's view). The object Arc
    /// is kept so its pointer cannot be reused for another object.
    by_name: HashMap<String, Entry>,
    /// Objects that do not deserialize, reported once each (name → error).
    bad: BTreeMap<String, String>,
}

struct Entry {
    object: Arc<DynamicObject>,
    full: Arc<ClusterNetworkPolicy>,
    view: Arc<ClusterNetworkPolicy>,
}

impl CnpWatch {
    pub fn new(store: Store<DynamicObject>, client: Client) -> CnpWatch {
        CnpWatch {
            store,
            client,
            converted: Arc::default(),
        }
    }

    /// The policies for the compiler (name + spec only; the same `Arc` while a policy's name
    /// and spec stay the same) and their full objects (for status), sorted by name.
    pub fn snapshot(
        &self,
    ) -> (
        Vec<Arc<ClusterNetworkPolicy>>,
        Vec<Arc<ClusterNetworkPolicy>>,
    ) {
        let objects = self.store.state();
        let Ok(mut c) = self.converted.lock() else {
            return (Vec::new(), Vec::new());
        };
        let mut seen = BTreeSet::new();
        let mut bad = BTreeMap::new();
        for obj in objects {
            let name = obj.name_any();
            seen.insert(name.clone());
            if let Some(e) = c.by_name.get(&name) {
                if Arc::ptr_eq(&e.object, &obj) {
                    continue;
                }
            }
            let typed = serde_json::to_value(obj.as_ref())
                .and_then(serde_json::from_value::<ClusterNetworkPolicy>);
            match typed {
                Ok(full) => {
                    let view = cnp::compiled_view(&full);
                    let view = match c.by_name.get(&name) {
                        Some(e) if *e.view == view => e.view.clone(),
                        _ => Arc::new(view),
                    };
                    c.by_name.insert(
                        name,
                        Entry {
                            object: obj,
                            full: Arc::new(full),
                            view,
                        },
                    );
                }
                Err(e) => {
                    c.by_name.remove(&name);
                    bad.insert(name, e.to_string());
                }
            }
        }
        c.by_name.retain(|name, _| seen.contains(name));
        for (name, error) in &bad {
            if c.bad.get(name) != Some(error) {
                tracing::warn!(policy = %name, %error, "ClusterNetworkPolicy does not match the v1alpha2 schema; ignored");
            }
        }
        c.bad = bad;
        let mut names: Vec<&String> = c.by_name.keys().collect();
        names.sort();
        let views = names.iter().map(|n| c.by_name[*n].view.clone()).collect();
        let full = names.iter().map(|n| c.by_name[*n].full.clone()).collect();
        (views, full)
    }

    /// Brings this node's condition on every policy up to date (server-side apply of the
    /// status, only where it differs). Errors are logged; the next sync retries.
    pub async fn report_status(
        &self,
        node: &str,
        policies: &[Arc<ClusterNetworkPolicy>],
        diags: &[Diagnostic],
        apply_error: Option<&str>,
    ) {
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now());
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &api_resource());
        let params = PatchParams::apply(&format!("palisade-agent-{node}")).force();
        for p in policies {
            let cond = cnp::node_condition(p, node, diags, apply_error, now.clone());
            if cnp::has_condition(p, &cond) {
                continue;
            }
            let Some(name) = p.metadata.name.as_deref() else {
                continue;
            };
            let body = serde_json::json!({
                "apiVersion": cnp::API_VERSION,
                "kind": cnp::KIND,
                "metadata": { "name": name },
                "status": { "conditions": [cond] },
            });
            match api.patch_status(name, &params, &Patch::Apply(&body)).await {
                Ok(_) => {
                    tracing::debug!(policy = name, status = %cond.status, reason = %cond.reason, "ClusterNetworkPolicy status updated")
                }
                Err(e) => {
                    tracing::warn!(policy = name, error = %e, "cannot update ClusterNetworkPolicy status")
                }
            }
        }
    }
}
