//! Watch caches (kube-runtime reflectors) for every kind the reconcilers read, and the
//! readiness they imply.
//!
//! ```text
//!   API ──watch──► reflector ──► Store<K> (read by reconcilers)
//!                      │
//!                      ├─► pokes the Triggers of the reconcilers that read K
//!                      └─► readiness flag set after the first complete list
//! ```
//!
//! Custom resources (`IPAddressPool`, `L2Advertisement`) are watched as `DynamicObject`s and
//! converted one by one ([`typed_objects`]): a malformed object is reported and skipped, it
//! never breaks the watch or hides the valid ones. Stores keep their last content through API
//! outages (the reflector only replaces them after a successful relist).
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, ExponentialBackoff};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::metrics::{labels1, Metrics};
use crate::prune::{map_event, SlimPod};
use crate::sync::Trigger;

/// Names of watched resources, as used in logs, metrics and readiness output.
pub mod names {
    pub const PODS: &str = "pods";
    pub const NAMESPACES: &str = "namespaces";
    pub const NETWORK_POLICIES: &str = "networkpolicies";
    pub const NODES: &str = "nodes";
    pub const SERVICES: &str = "services";
    pub const ENDPOINT_SLICES: &str = "endpointslices";
    pub const IP_ADDRESS_POOLS: &str = "ipaddresspools";
    pub const L2_ADVERTISEMENTS: &str = "l2advertisements";
    pub const SERVICE_L2_STATUSES: &str = "servicel2statuses";
}

/// The `palisade.dev/v1alpha1` kinds, described without their Rust types so that the watch
/// itself never fails on a malformed object.
pub fn palisade_api_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "palisade.dev".into(),
        version: "v1alpha1".into(),
        api_version: "palisade.dev/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// Tracks which watches have completed their first list.
#[derive(Clone, Default)]
pub struct Readiness {
    flags: Arc<Mutex<BTreeMap<&'static str, Arc<AtomicBool>>>>,
    shutting_down: Arc<AtomicBool>,
}

impl Readiness {
    fn register(&self, name: &'static str) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        if let Ok(mut flags) = self.flags.lock() {
            flags.insert(name, flag.clone());
        }
        flag
    }

    /// Watches that have not listed yet (empty when ready).
    pub fn pending(&self) -> Vec<&'static str> {
        match self.flags.lock() {
            Ok(flags) => flags
                .iter()
                .filter(|(_, f)| !f.load(Ordering::SeqCst))
                .map(|(n, _)| *n)
                .collect(),
            Err(_) => vec!["<poisoned>"],
        }
    }

    pub fn is_ready(&self) -> bool {
        !self.shutting_down.load(Ordering::SeqCst) && self.pending().is_empty()
    }

    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Waits until none of `needed` is pending (their first list is complete); false if
    /// `shutdown` came first. A reconciler never acts on a partial view of the cluster.
    pub async fn wait_for(&self, needed: &[&str], shutdown: &CancellationToken) -> bool {
        loop {
            if !self.pending().iter().any(|p| needed.contains(p)) {
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}

/// Which caches to run; reconcilers say what they read.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wanted {
    pub pods: bool,
    pub namespaces: bool,
    pub network_policies: bool,
    pub nodes: bool,
    pub services: bool,
    pub endpoint_slices: bool,
    pub ip_address_pools: bool,
    pub l2_advertisements: bool,
    pub service_l2_statuses: bool,
}

impl Wanted {
    pub fn netpol() -> Self {
        Wanted {
            pods: true,
            namespaces: true,
            network_policies: true,
            nodes: true,
            ..Default::default()
        }
    }

    pub fn loadbalancer() -> Self {
        Wanted {
            namespaces: true,
            nodes: true,
            services: true,
            endpoint_slices: true,
            ip_address_pools: true,
            l2_advertisements: true,
            ..Default::default()
        }
    }

    /// What the L2 announcer's status writer reads (its own `ServiceL2Status` objects).
    pub fn l2_status() -> Self {
        Wanted {
            service_l2_statuses: true,
            ..Default::default()
        }
    }

    pub fn union(self, o: Wanted) -> Self {
        Wanted {
            pods: self.pods || o.pods,
            namespaces: self.namespaces || o.namespaces,
            network_policies: self.network_policies || o.network_policies,
            nodes: self.nodes || o.nodes,
            services: self.services || o.services,
            endpoint_slices: self.endpoint_slices || o.endpoint_slices,
            ip_address_pools: self.ip_address_pools || o.ip_address_pools,
            l2_advertisements: self.l2_advertisements || o.l2_advertisements,
            service_l2_statuses: self.service_l2_statuses || o.service_l2_statuses,
        }
    }
}

/// Triggers to poke on changes of each kind.
#[derive(Clone, Default)]
pub struct Subscribers {
    pub pods: Vec<Trigger>,
    pub namespaces: Vec<Trigger>,
    pub network_policies: Vec<Trigger>,
    pub nodes: Vec<Trigger>,
    pub services: Vec<Trigger>,
    pub endpoint_slices: Vec<Trigger>,
    pub ip_address_pools: Vec<Trigger>,
    pub l2_advertisements: Vec<Trigger>,
    pub service_l2_statuses: Vec<Trigger>,
}

/// The read side of every running cache. A kind that is not wanted has an empty store that
/// never becomes ready (and is not part of readiness).
#[derive(Clone)]
pub struct Stores {
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    pub network_policies: Store<NetworkPolicy>,
    pub nodes: Store<Node>,
    pub services: Store<Service>,
    pub endpoint_slices: Store<EndpointSlice>,
    pub ip_address_pools: Store<DynamicObject>,
    pub l2_advertisements: Store<DynamicObject>,
    pub service_l2_statuses: Store<DynamicObject>,
    pub readiness: Readiness,
}

impl Stores {
    /// Start a reflector task per wanted kind. Tasks end on `shutdown`.
    pub fn start(
        client: &Client,
        wanted: Wanted,
        subs: Subscribers,
        metrics: Arc<Metrics>,
        backoff_max: Duration,
        shutdown: CancellationToken,
    ) -> Stores {
        let readiness = Readiness::default();
        let ctx = Ctx {
            readiness: readiness.clone(),
            metrics,
            backoff_max,
            shutdown,
        };
        let pools_ar = palisade_api_resource("IPAddressPool", "ipaddresspools");
        let l2_ar = palisade_api_resource("L2Advertisement", "l2advertisements");
        let l2_status_ar = palisade_api_resource("ServiceL2Status", "servicel2statuses");
        Stores {
            // Pods are decoded slim (only what reconcilers read, see `prune`).
            pods: ctx.run(
                wanted.pods,
                names::PODS,
                Api::<SlimPod>::all(client.clone()),
                (),
                subs.pods,
            ),
            namespaces: ctx.run(
                wanted.namespaces,
                names::NAMESPACES,
                Api::all(client.clone()),
                (),
                subs.namespaces,
            ),
            network_policies: ctx.run(
                wanted.network_policies,
                names::NETWORK_POLICIES,
                Api::all(client.clone()),
                (),
                subs.network_policies,
            ),
            nodes: ctx.run(
                wanted.nodes,
                names::NODES,
                Api::all(client.clone()),
                (),
                subs.nodes,
            ),
            services: ctx.run(
                wanted.services,
                names::SERVICES,
                Api::all(client.clone()),
                (),
                subs.services,
            ),
            endpoint_slices: ctx.run(
                wanted.endpoint_slices,
                names::ENDPOINT_SLICES,
                Api::all(client.clone()),
                (),
                subs.endpoint_slices,
            ),
            ip_address_pools: ctx.run(
                wanted.ip_address_pools,
                names::IP_ADDRESS_POOLS,
                Api::all_with(client.clone(), &pools_ar),
                pools_ar.clone(),
                subs.ip_address_pools,
            ),
            l2_advertisements: ctx.run(
                wanted.l2_advertisements,
                names::L2_ADVERTISEMENTS,
                Api::all_with(client.clone(), &l2_ar),
                l2_ar.clone(),
                subs.l2_advertisements,
            ),
            service_l2_statuses: ctx.run(
                wanted.service_l2_statuses,
                names::SERVICE_L2_STATUSES,
                Api::all_with(client.clone(), &l2_status_ar),
                l2_status_ar.clone(),
                subs.service_l2_statuses,
            ),
            readiness,
        }
    }
}

struct Ctx {
    readiness: Readiness,
    metrics: Arc<Metrics>,
    backoff_max: Duration,
    shutdown: CancellationToken,
}

impl Ctx {
    /// Watches `D` (the decoded form) into a `Store<K>` (the cached form, `K: From<D>`; for
    /// most kinds the same type).
    fn run<K, D>(
        &self,
        wanted: bool,
        name: &'static str,
        api: Api<D>,
        dyntype: K::DynamicType,
        triggers: Vec<Trigger>,
    ) -> Store<K>
    where
        K: Resource + Clone + Debug + Send + Sync + 'static + From<D>,
        K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
        D: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        let writer = reflector::store::Writer::new(dyntype);
        let reader = writer.as_reader();
        if !wanted {
            return reader;
        }
        let ready_flag = self.readiness.register(name);
        let metrics = self.metrics.clone();
        let shutdown = self.shutdown.clone();
        // Short, jittered backoff: after an outage we want fresh state quickly; the store
        // keeps serving the last known objects meanwhile.
        let healthy = Arc::new(AtomicBool::new(true));
        let backoff = HealthGatedBackoff {
            inner: ExponentialBackoff::from(
                backon::ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(250))
                    .with_max_delay(self.backoff_max)
                    .with_factor(2.0)
                    .with_jitter()
                    .without_max_times(),
            ),
            healthy: healthy.clone(),
        };
        let stream = watcher::watcher(api, watcher::Config::default())
            .map_ok(|ev| map_event(ev, K::from))
            .backoff(backoff)
            .modify(prune)
            .reflect(writer);
        let ready_reader = reader.clone();
        tokio::spawn(async move {
            if ready_reader.wait_until_ready().await.is_ok() {
                ready_flag.store(true, Ordering::SeqCst);
                tracing::debug!(resource = name, "initial list complete");
            }
        });
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut failing = false;
            loop {
                let item = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    item = stream.next() => item,
                };
                match item {
                    None => break,
                    Some(Ok(ev)) => {
                        // `Init`/`InitApply` come before a list has succeeded (kube's watcher
                        // emits `Init` before every attempt): not a recovery yet.
                        let settled =
                            !matches!(ev, watcher::Event::Init | watcher::Event::InitApply(_));
                        if settled {
                            healthy.store(true, Ordering::SeqCst);
                            if failing {
                                tracing::info!(resource = name, "watch recovered");
                                failing = false;
                            }
                        }
                        metrics
                            .watch_events
                            .get_or_create(&labels1("resource", name))
                            .inc();
                        // Init/InitApply/InitDone: poke only when the list is complete.
                        match ev {
                            watcher::Event::Init | watcher::Event::InitApply(_) => {}
                            _ => triggers.iter().for_each(Trigger::poke),
                        }
                    }
                    Some(Err(e)) => {
                        healthy.store(false, Ordering::SeqCst);
                        metrics
                            .watch_errors
                            .get_or_create(&labels1("resource", name))
                            .inc();
                        if !failing {
                            tracing::warn!(resource = name, error = %e,
                                "watch failed; keeping the last known state and retrying with backoff");
                        } else {
                            tracing::debug!(resource = name, error = %e, "watch still failing");
                        }
                        failing = true;
                    }
                }
            }
        });
        reader
    }
}

/// Drops what no reconciler reads before an object enters a cache: `managedFields` and the
/// `kubectl.kubernetes.io/last-applied-configuration` annotation (a copy of the whole object)
/// are most of a typical object's size.
fn prune<K: Resource>(obj: &mut K) {
    obj.managed_fields_mut().clear();
    if let Some(a) = obj.meta_mut().annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The watcher's backoff, reset only once the watch is healthy again. kube's `StreamBackoff`
/// resets on every `Ok` item, and the watcher yields `Ok(Init)` before each list attempt, so
/// a list that keeps failing (403, an object that does not decode) would otherwise be retried
/// at the minimum delay forever.
struct HealthGatedBackoff {
    inner: ExponentialBackoff,
    healthy: Arc<AtomicBool>,
}

impl Iterator for HealthGatedBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.inner.next()
    }
}

impl Backoff for HealthGatedBackoff {
    fn reset(&mut self) {
        if self.healthy.load(Ordering::SeqCst) {
            self.inner.reset();
        }
    }
}

/// Converts watched custom resources to their Rust type, one by one. Returns the valid ones
/// and, for each malformed one, its name and the parse error.
pub fn typed_objects<T: DeserializeOwned>(
    objs: &[Arc<DynamicObject>],
) -> (Vec<T>, Vec<(String, String)>) {
    let mut ok = Vec::with_capacity(objs.len());
    let mut bad = Vec::new();
    for obj in objs {
        match serde_json::to_value(obj.as_ref()).and_then(serde_json::from_value::<T>) {
            Ok(t) => ok.push(t),
            Err(e) => bad.push((obj.name_any(), e.to_string())),
        }
    }
    (ok, bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    struct Thing {
        spec: ThingSpec,
    }
    #[derive(Deserialize, Debug)]
    struct ThingSpec {
        addresses: Vec<String>,
    }

    fn dynobj(name: &str, spec: serde_json::Value) -> Arc<DynamicObject> {
        let ar = palisade_api_resource("IPAddressPool", "ipaddresspools");
        let mut o = DynamicObject::new(name, &ar);
        o.data = serde_json::json!({ "spec": spec });
        Arc::new(o)
    }

    #[test]
    fn malformed_objects_are_skipped_and_named() {
        let objs = vec![
            dynobj("good", serde_json::json!({"addresses": ["10.0.0.0/24"]})),
            dynobj("bad", serde_json::json!({"addresses": "not-a-list"})),
        ];
        let (ok, bad): (Vec<Thing>, _) = typed_objects(&objs);
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].spec.addresses, vec!["10.0.0.0/24"]);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, "bad");
        assert!(bad[0].1.contains("invalid type"), "{}", bad[0].1);
    }

    #[test]
    fn cached_objects_lose_managed_fields_and_the_last_applied_copy() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "a", "namespace": "x",
                "labels": {"app": "web"},
                "annotations": {LAST_APPLIED: "{...}", "keep": "me"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
            }
        }))
        .unwrap();
        prune(&mut pod);
        assert!(pod.metadata.managed_fields.unwrap_or_default().is_empty());
        let ann = pod.metadata.annotations.unwrap();
        assert_eq!(ann.keys().collect::<Vec<_>>(), ["keep"]);
        assert_eq!(pod.metadata.labels.unwrap()["app"], "web");
    }

    #[test]
    fn readiness_waits_for_every_watch_and_drops_on_shutdown() {
        let r = Readiness::default();
        let a = r.register("a");
        let b = r.register("b");
        assert!(!r.is_ready());
        a.store(true, Ordering::SeqCst);
        assert_eq!(r.pending(), vec!["b"]);
        b.store(true, Ordering::SeqCst);
        assert!(r.is_ready());
        r.set_shutting_down();
        assert!(!r.is_ready());
    }
}
