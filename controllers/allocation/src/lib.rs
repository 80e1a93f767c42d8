//! The LoadBalancer side of the agent.
//!
//! ```text
//!  LbCaches (pools, l2ads, services, nodes, ns) ──► intake: typed, malformed ones reported
//!         ▲ pokes                                   │
//!     Trigger ◄── reflectors                        ▼ (leader only)
//!                       allocation pass (palisade_loadbalancer::plan) ──► Service status, pool status,
//!                                                           Events, metrics
//! ```
//!
//! Custom resources arrive as `DynamicObject`s (see `palisade_runtime::stores`); [`PoolIntake`]
//! converts them and keeps the malformed ones out, reporting each once per
//! generation: a log line, the `palisade_invalid_objects` gauge and, from the leader, an
//! `Invalid` condition in the object's status naming the parse error.
use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use palisade_loadbalancer::constants::{conditions, reasons};
use palisade_loadbalancer::{IPAddressPool, L2Advertisement};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::runtime::reflector::Store;
use palisade_loadbalancer::plan::{advertisement_status, AllocationState, Inputs};
use palisade_runtime::config::SyncSettings;
use palisade_runtime::events::EventSink;
use palisade_runtime::metrics::{labels1, Metrics};
use palisade_runtime::stores::{palisade_api_resource, typed_objects, CacheGroup, Caches};
use palisade_runtime::sync::{poke_on_change, run_sync_loop, JobError, Trigger};

/// Why an allocation pass failed (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("leadership was lost during the pass; the new leader takes over")]
    LostLeadership,
    #[error("some status writes failed")]
    Writes,
}

impl JobError for PassError {
    fn label(&self) -> &'static str {
        match self {
            PassError::LostLeadership => "lost_leadership",
            PassError::Writes => "status_write",
        }
    }
}

/// Condition reason for an object that does not parse at all.
pub const MALFORMED_OBJECT: &str = "MalformedObject";

/// Valid custom resources of one sync, and the names of the skipped ones.
pub struct Intake {
    pub pools: Vec<IPAddressPool>,
    pub l2_advertisements: Vec<L2Advertisement>,
    /// (kind, name, generation, error)
    pub malformed: Vec<(&'static str, String, String, String)>,
}

/// The caches the allocator reads (it is woken by nothing else).
#[derive(Clone)]
pub struct LbCaches {
    pub ip_address_pools: Store<DynamicObject>,
    pub l2_advertisements: Store<DynamicObject>,
    pub services: Store<Service>,
    pub namespaces: Store<Namespace>,
    pub nodes: Store<Node>,
    pub group: CacheGroup,
}

impl LbCaches {
    /// Registers what allocation reads; every change pokes `trigger`.
    pub fn register(caches: &mut Caches, trigger: &Trigger) -> LbCaches {
        let mut r = caches.register(trigger);
        LbCaches {
            ip_address_pools: r
                .watch_custom(&palisade_api_resource("IPAddressPool", "ipaddresspools")),
            l2_advertisements: r.watch_custom(&palisade_api_resource(
                "L2Advertisement",
                "l2advertisements",
            )),
            services: r.watch(),
            namespaces: r.watch(),
            nodes: r.watch(),
            group: r.finish(),
        }
    }
}

/// Converts the custom-resource stores, remembering what was already reported.
#[derive(Default)]
pub struct PoolIntake {
    reported: BTreeMap<(&'static str, String), String>,
    /// L2Advertisements with ignored `preferredNodeSelectors` terms: name -> problems logged.
    preferences_reported: BTreeMap<String, String>,
}

impl PoolIntake {
    pub fn take(
        &mut self,
        pools: &Store<DynamicObject>,
        l2_advertisements: &Store<DynamicObject>,
        metrics: &Metrics,
    ) -> Intake {
        let pool_objs = pools.state();
        let l2_objs = l2_advertisements.state();
        let (pools, bad_pools) = typed_objects::<IPAddressPool>(&pool_objs);
        let (l2_advertisements, bad_l2) = typed_objects::<L2Advertisement>(&l2_objs);
        // Keyed by generation, which only spec changes bump: our own status writes must not
        // make an object look new.
        let rv_of = |objs: &[Arc<DynamicObject>], name: &str| {
            objs.iter()
                .find(|o| o.name_any() == name)
                .map(|o| {
                    o.metadata
                        .generation
                        .map(|g| g.to_string())
                        .unwrap_or_default()
                })
                .unwrap_or_default()
        };
        let mut malformed = Vec::new();
        for (name, err) in bad_pools {
            let rv = rv_of(&pool_objs, &name);
            malformed.push(("IPAddressPool", name, rv, err));
        }
        for (name, err) in bad_l2 {
            let rv = rv_of(&l2_objs, &name);
            malformed.push(("L2Advertisement", name, rv, err));
        }
        for kind in ["IPAddressPool", "L2Advertisement"] {
            let n = malformed.iter().filter(|m| m.0 == kind).count();
            metrics
                .invalid_objects
                .get_or_create(&labels1("kind", kind))
                .set(n as i64);
        }
        let mut still = BTreeMap::new();
        for (kind, name, rv, err) in &malformed {
            let key = (*kind, name.clone());
            if self.reported.get(&key) != Some(rv) {
                tracing::warn!(kind, name, generation = rv, error = %err,
                    "skipping a malformed custom resource; fix its spec");
            }
            still.insert(key, rv.clone());
        }
        self.reported = still;
        // Ignored preference terms: a log line on every agent (each one ignores them), once
        // per change; the leader adds the Event and the condition.
        let mut still = BTreeMap::new();
        for ad in &l2_advertisements {
            let problems = palisade_loadbalancer::announce::preference_problems(&ad.spec);
            if problems.is_empty() {
                continue;
            }
            let name = ad.name_any();
            let text = problems.join("; ");
            if self.preferences_reported.get(&name) != Some(&text) {
                tracing::warn!(kind = "L2Advertisement", name, problems = %text,
                    "ignoring malformed preferredNodeSelectors terms; fix the spec");
            }
            still.insert(name, text);
        }
        self.preferences_reported = still;
        Intake {
            pools,
            l2_advertisements,
            malformed,
        }
    }
}

/// Writes an `Invalid` condition into a malformed object's status (merge patch on /status,
/// which does not need the spec to parse).
pub async fn mark_malformed(
    client: &Client,
    ar: &ApiResource,
    name: &str,
    error: &str,
) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), ar);
    let now = jiff::Timestamp::now().to_string();
    let patch = json!({
        "status": {
            "conditions": [
                {
                    "type": conditions::INVALID,
                    "status": "True",
                    "reason": MALFORMED_OBJECT,
                    "message": format!("the object does not match the {} schema: {error}", ar.kind),
                    "lastTransitionTime": now,
                },
                {
                    "type": conditions::READY,
                    "status": "False",
                    "reason": MALFORMED_OBJECT,
                    "message": "see the Invalid condition",
                    "lastTransitionTime": now,
                }
            ]
        }
    });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// The LoadBalancer reconciler: custom-resource intake on every agent; on the leader, the
/// allocation pass and its writes.
pub struct LoadBalancerReconciler {
    pub client: Client,
    pub stores: LbCaches,
    pub metrics: Arc<Metrics>,
    pub events: EventSink,
    pub settings: SyncSettings,
    pub is_leader: watch::Receiver<bool>,
    pub class: String,
    pub claim_unclassed: bool,
}

#[derive(Default)]
struct LbState {
    intake: PoolIntake,
    allocation: AllocationState,
    /// Malformed objects whose status we wrote: (kind, name) -> generation.
    marked: BTreeMap<(String, String), String>,
    was_leader: bool,
}

impl LoadBalancerReconciler {
    pub async fn run(self, trigger: Trigger, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let state = Arc::new(tokio::sync::Mutex::new(LbState::default()));
        // Leadership changes need a pass too.
        poke_on_change(this.is_leader.clone(), trigger.clone(), shutdown.clone());
        // Wait for the caches the allocator reads: never allocate from a partial view.
        if !this.stores.group.synced(&shutdown).await {
            return;
        }
        trigger.poke();
        let metrics = Some(this.metrics.clone());
        run_sync_loop(
            this.settings,
            trigger,
            shutdown,
            "allocation",
            metrics,
            |_| {
                let this = this.clone();
                let state = state.clone();
                async move {
                    let mut st = state.lock().await;
                    this.pass(&mut st).await
                }
            },
        )
        .await;
    }

    async fn pass(&self, st: &mut LbState) -> Result<(), PassError> {
        let intake = st.intake.take(
            &self.stores.ip_address_pools,
            &self.stores.l2_advertisements,
            &self.metrics,
        );
        let leading = *self.is_leader.borrow();
        if !leading {
            if st.was_leader {
                st.allocation.reset();
                st.was_leader = false;
            }
            return Ok(());
        }
        if !st.was_leader {
            tracing::info!("leading: rebuilding the allocator from Service status");
            st.allocation.reset();
            st.was_leader = true;
        }
        let mut failed = false;
        // Malformed objects: an Invalid condition once per generation.
        for (kind, name, generation, err) in &intake.malformed {
            let key = (kind.to_string(), name.clone());
            if st.marked.get(&key) == Some(generation) {
                continue;
            }
            let ar = match *kind {
                "IPAddressPool" => palisade_api_resource("IPAddressPool", "ipaddresspools"),
                _ => palisade_api_resource("L2Advertisement", "l2advertisements"),
            };
            match mark_malformed(&self.client, &ar, name, err).await {
                Ok(()) => {
                    st.marked.insert(key, generation.clone());
                }
                Err(e) => {
                    tracing::warn!(kind, name, error = %e, "cannot write status");
                    failed = true;
                }
            }
        }

        // Ignored preference terms: an Invalid condition and a Warning Event on the
        // L2Advertisement (cleared once fixed). Written only when the status differs, so a
        // new leader does not repeat the Event.
        for ad in &intake.l2_advertisements {
            let Some(status) = advertisement_status(ad, jiff::Timestamp::now()) else {
                continue;
            };
            if !*self.is_leader.borrow() {
                return Err(PassError::LostLeadership);
            }
            let name = ad.name_any();
            let api: Api<L2Advertisement> = Api::all(self.client.clone());
            let patch = json!({ "status": status });
            let result = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            self.metrics
                .lb_status_writes
                .get_or_create(&vec![
                    ("resource", "l2advertisements".into()),
                    ("result", if result.is_ok() { "ok" } else { "error" }.into()),
                ])
                .inc();
            if let Err(e) = result {
                tracing::warn!(l2advertisement = %name, error = %e, "cannot write L2Advertisement status; will retry");
                failed = true;
                continue;
            }
            let invalid = status
                .conditions
                .iter()
                .find(|c| c.type_ == conditions::INVALID && c.status == "True");
            if let Some(c) = invalid {
                let obj = ObjectReference {
                    api_version: Some("palisade.dev/v1alpha1".into()),
                    kind: Some("L2Advertisement".into()),
                    name: Some(name.clone()),
                    uid: ad.metadata.uid.clone(),
                    ..Default::default()
                };
                self.events
                    .warning(
                        &obj,
                        reasons::INVALID_PREFERENCE,
                        "Validate",
                        c.message.clone(),
                    )
                    .await;
            }
        }

        let services = self.stores.services.state();
        let namespaces = self.stores.namespaces.state();
        let nodes = self.stores.nodes.state();
        let inputs = Inputs {
            pools: &intake.pools,
            services: &services,
            namespaces: &namespaces,
            nodes: &nodes,
            class: &self.class,
            claim_unclassed: self.claim_unclassed,
            now: jiff::Timestamp::now(),
        };
        let plan = st.allocation.pass(&inputs);

        // Writes: only while still leading (checked before each one).
        for (key, ips) in &plan.service_status {
            if !*self.is_leader.borrow() {
                return Err(PassError::LostLeadership);
            }
            let ingress: Vec<serde_json::Value> = ips
                .iter()
                .map(|ip| json!({"ip": ip.to_string(), "ipMode": "VIP"}))
                .collect();
            let patch = if ingress.is_empty() {
                json!({"status": {"loadBalancer": {"ingress": null}}})
            } else {
                json!({"status": {"loadBalancer": {"ingress": ingress}}})
            };
            let api: Api<Service> = Api::namespaced(self.client.clone(), &key.namespace);
            let result = api
                .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            let label = match &result {
                Ok(_) => "ok",
                Err(kube::Error::Api(s)) if s.code == 404 => "gone",
                Err(_) => "error",
            };
            self.metrics
                .lb_status_writes
                .get_or_create(&vec![
                    ("resource", "services".into()),
                    ("result", label.into()),
                ])
                .inc();
            if label == "error" {
                tracing::warn!(service = %key, error = ?result.err(), "cannot write Service status; will retry");
                failed = true;
            }
        }
        for (name, status) in &plan.pool_status {
            if !*self.is_leader.borrow() {
                return Err(PassError::LostLeadership);
            }
            let api: Api<IPAddressPool> = Api::all(self.client.clone());
            let patch = json!({ "status": status });
            let result = api
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            let label = if result.is_ok() { "ok" } else { "error" };
            self.metrics
                .lb_status_writes
                .get_or_create(&vec![
                    ("resource", "ipaddresspools".into()),
                    ("result", label.into()),
                ])
                .inc();
            if let Err(e) = result {
                tracing::warn!(pool = %name, error = %e, "cannot write IPAddressPool status; will retry");
                failed = true;
            }
        }
        for ev in &plan.events {
            let obj = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Service".into()),
                namespace: Some(ev.key.namespace.clone()),
                name: Some(ev.key.name.clone()),
                uid: ev.uid.clone(),
                ..Default::default()
            };
            if ev.warning {
                self.events
                    .warning(&obj, ev.reason, "Allocate", ev.note.clone())
                    .await;
            } else {
                self.events
                    .normal(&obj, ev.reason, "Allocate", ev.note.clone())
                    .await;
            }
        }
        for reason in &plan.errors {
            self.metrics
                .lb_allocation_errors
                .get_or_create(&labels1("reason", *reason))
                .inc();
        }
        let sat = |n: u128| i64::try_from(n).unwrap_or(i64::MAX);
        for ((pool, family), (total, used)) in &plan.pool_counts {
            let labels = vec![("pool", pool.clone()), ("family", family.to_string())];
            self.metrics
                .lb_addresses_total
                .get_or_create(&labels)
                .set(sat(*total));
            self.metrics
                .lb_addresses_in_use
                .get_or_create(&labels)
                .set(sat(*used));
        }
        self.metrics
            .lb_services_allocated
            .set(plan.services_allocated as i64);
        if failed {
            Err(PassError::Writes)
        } else {
            Ok(())
        }
    }
}
