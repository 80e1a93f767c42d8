//! Watch caches (kube-runtime reflectors) and the readiness they imply. Reconcilers register
//! the kinds they read ([`Caches::register`]); this module knows none of them.
//!
//! ```text
//!   API ──watch──► reflector ──► Store<K> (read by the reconcilers that registered K)
//!                      │
//!                      ├─► pokes the Triggers of those reconcilers
//!                      └─► readiness flag set after the first complete list
//! ```
//!
//! Custom resources are watched as `DynamicObject`s ([`Registration::watch_custom`]) and
//! converted one by one ([`typed_objects`]): a malformed object is reported and skipped, it
//! never breaks the watch or hides the valid ones. Stores keep their last content through API
//! outages (the reflector only replaces them after a successful relist).
use std::any::{Any, TypeId};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, ExponentialBackoff};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::metrics::{labels1, Metrics};
use crate::prune::map_event;
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
    /// Woken whenever a watch completes its first list ([`Readiness::wait_for`] sleeps on it).
    listed: Arc<tokio::sync::Notify>,
}

impl Readiness {
    fn register(&self, name: &'static str) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        if let Ok(mut flags) = self.flags.lock() {
            flags.insert(name, flag.clone());
        }
        flag
    }

    /// Marks `flag` (from [`Readiness::register`]) listed and wakes the waiters.
    fn mark_listed(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::SeqCst);
        self.listed.notify_waiters();
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
    /// Woken by each completed list (no polling delay between the last list and the first
    /// pass); the 1 s timer only bounds a missed wake-up.
    pub async fn wait_for(&self, needed: &[&str], shutdown: &CancellationToken) -> bool {
        loop {
            // Registered before the check, so a list completing in between still wakes us.
            let listed = self.listed.notified();
            let mut listed = std::pin::pin!(listed);
            listed.as_mut().enable();
            if !self.pending().iter().any(|p| needed.contains(p)) {
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = listed => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// The shared watch caches. Each reconciler registers what it reads ([`Caches::register`]);
/// a kind two reconcilers read is watched once and pokes both.
///
/// ```text
///   reconciler A ──register──► Registration ──watch::<Pod>()──┐
///   reconciler B ──register──► Registration ──watch::<Pod>()──┴─► one reflector, two Triggers
/// ```
pub struct Caches {
    ctx: Ctx,
    client: Client,
    entries: BTreeMap<CacheKey, Entry>,
}

/// A cache is identified by the Rust type it holds and the resource it watches, so the same
/// kind read as a typed object and as a `DynamicObject` are two caches, never a bad downcast.
type CacheKey = (TypeId, String, String);

struct Entry {
    /// The `Store<K>` of the key's type.
    store: Box<dyn Any + Send + Sync>,
    name: &'static str,
    triggers: Arc<Mutex<Vec<Trigger>>>,
}

impl Caches {
    /// Caches on `client`; watch tasks end on `shutdown`. `backoff_max` caps the retry delay
    /// of a failing watch.
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        backoff_max: Duration,
        shutdown: CancellationToken,
    ) -> Caches {
        Caches {
            ctx: Ctx {
                readiness: Readiness::default(),
                metrics,
                backoff_max,
                shutdown,
            },
            client,
            entries: BTreeMap::new(),
        }
    }

    /// Readiness of every cache registered so far (and of those registered later).
    pub fn readiness(&self) -> Readiness {
        self.ctx.readiness.clone()
    }

    /// Starts a registration for one reconciler: every cache it asks for pokes `trigger`.
    pub fn register(&mut self, trigger: &Trigger) -> Registration<'_> {
        Registration {
            caches: self,
            trigger: trigger.clone(),
            names: Vec::new(),
        }
    }

    /// Names of the running caches, in order.
    pub fn names(&self) -> Vec<&'static str> {
        let mut n: Vec<&'static str> = self.entries.values().map(|e| e.name).collect();
        n.sort_unstable();
        n.dedup();
        n
    }

    /// The cache of `K`, watched as `D` (the decoded form; `K` itself for most kinds).
    #[allow(clippy::too_many_arguments)]
    fn store<K, D>(
        &mut self,
        name: &'static str,
        api: Api<D>,
        dyntype: K::DynamicType,
        group: &str,
        trim: fn(&mut K),
        trigger: &Trigger,
    ) -> Store<K>
    where
        K: Resource + Clone + Debug + Send + Sync + 'static + From<D>,
        K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
        D: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        let key = (TypeId::of::<K>(), group.to_string(), name.to_string());
        if let Some(entry) = self.entries.get(&key) {
            if let Ok(mut t) = entry.triggers.lock() {
                t.push(trigger.clone());
            }
            if let Some(store) = entry.store.downcast_ref::<Store<K>>() {
                return store.clone();
            }
        }
        let triggers = Arc::new(Mutex::new(vec![trigger.clone()]));
        let store = self.ctx.run(name, api, dyntype, trim, triggers.clone());
        self.entries.insert(
            key,
            Entry {
                store: Box::new(store.clone()),
                name,
                triggers,
            },
        );
        store
    }
}

/// One reconciler's registration: the caches it reads, and its trigger on each.
pub struct Registration<'a> {
    caches: &'a mut Caches,
    trigger: Trigger,
    names: Vec<&'static str>,
}

impl Registration<'_> {
    /// The cache of a cluster-wide built-in kind, with the default trimming ([`prune`]).
    pub fn watch<K>(&mut self) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        self.watch_trimmed(prune::<K>)
    }

    /// Like [`Registration::watch`], with `trim` applied to every object before it is stored
    /// (drop what no reader needs). The first registration of a kind decides its trimming, so
    /// a trimming function must keep what every reader of the kind reads.
    pub fn watch_trimmed<K>(&mut self, trim: fn(&mut K)) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        let name = static_name(K::plural(&()).as_ref());
        self.names.push(name);
        let api = Api::all(self.caches.client.clone());
        let group = K::group(&()).to_string();
        self.caches
            .store(name, api, (), &group, trim, &self.trigger)
    }

    /// The cache of a cluster-wide built-in kind `K`, decoded from the API as `D` and stored
    /// as `K` (`K: From<D>`): `D` can skip fields while decoding, so that the full objects
    /// are never built ([`crate::prune::SlimPod`] for Pods). `trim` runs on the stored form.
    /// As with [`Registration::watch_trimmed`], the first registration of `K` decides.
    pub fn watch_decoded<K, D>(&mut self, trim: fn(&mut K)) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + Debug + Send + Sync + 'static + From<D>,
        D: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        let name = static_name(K::plural(&()).as_ref());
        self.names.push(name);
        let api = Api::<D>::all(self.caches.client.clone());
        let group = K::group(&()).to_string();
        self.caches
            .store(name, api, (), &group, trim, &self.trigger)
    }

    /// The cache of a cluster-wide custom resource, watched as `DynamicObject`s so that a
    /// malformed object never breaks the watch (convert with [`typed_objects`]).
    pub fn watch_custom(&mut self, ar: &ApiResource) -> Store<DynamicObject> {
        let name = static_name(&ar.plural);
        self.names.push(name);
        let api = Api::all_with(self.caches.client.clone(), ar);
        self.caches.store(
            name,
            api,
            ar.clone(),
            &ar.group,
            prune::<DynamicObject>,
            &self.trigger,
        )
    }

    /// The registration's result: what to wait for before the first pass.
    pub fn finish(self) -> CacheGroup {
        CacheGroup {
            names: self.names,
            readiness: self.caches.readiness(),
        }
    }
}

/// The caches one reconciler reads, for waiting on their first complete list.
#[derive(Clone)]
pub struct CacheGroup {
    names: Vec<&'static str>,
    readiness: Readiness,
}

impl CacheGroup {
    /// Waits until every cache of the group has listed; false if `shutdown` came first. A
    /// reconciler never acts on a partial view of the cluster.
    pub async fn synced(&self, shutdown: &CancellationToken) -> bool {
        self.readiness.wait_for(&self.names, shutdown).await
    }

    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }
}

/// Resource names live as long as the process: the known ones are constants, any other is
/// interned once (a handful per process, never per object).
fn static_name(plural: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        names::PODS,
        names::NAMESPACES,
        names::NETWORK_POLICIES,
        names::NODES,
        names::SERVICES,
        names::ENDPOINT_SLICES,
        names::IP_ADDRESS_POOLS,
        names::L2_ADVERTISEMENTS,
        names::SERVICE_L2_STATUSES,
    ];
    if let Some(k) = KNOWN.iter().find(|k| **k == plural) {
        return k;
    }
    static INTERNED: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let Ok(mut interned) = INTERNED.lock() else {
        return "<poisoned>";
    };
    if let Some(k) = interned.iter().find(|k| **k == plural) {
        return k;
    }
    let leaked: &'static str = Box::leak(plural.to_string().into_boxed_str());
    interned.push(leaked);
    leaked
}

struct Ctx {
    readiness: Readiness,
    metrics: Arc<Metrics>,
    backoff_max: Duration,
    shutdown: CancellationToken,
}

impl Ctx {
    fn run<K, D>(
        &self,
        name: &'static str,
        api: Api<D>,
        dyntype: K::DynamicType,
        trim: fn(&mut K),
        triggers: Arc<Mutex<Vec<Trigger>>>,
    ) -> Store<K>
    where
        K: Resource + Clone + Debug + Send + Sync + 'static + From<D>,
        K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
        D: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        let writer = reflector::store::Writer::new(dyntype);
        let reader = writer.as_reader();
        let ready_flag = self.readiness.register(name);
        let readiness = self.readiness.clone();
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
            .modify(trim)
            .reflect(writer);
        let ready_reader = reader.clone();
        tokio::spawn(async move {
            if ready_reader.wait_until_ready().await.is_ok() {
                readiness.mark_listed(&ready_flag);
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
                            _ => {
                                if let Ok(t) = triggers.lock() {
                                    t.iter().for_each(Trigger::poke);
                                }
                            }
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
pub fn prune<K: Resource>(obj: &mut K) {
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
    use k8s_openapi::api::core::v1::Pod;
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

    #[tokio::test]
    async fn a_kind_two_reconcilers_read_is_watched_once_and_pokes_both() {
        // Nothing listens there: the watches fail and retry, which is all this test needs.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let shutdown = CancellationToken::new();
        let mut caches = Caches::new(
            client,
            Arc::new(Metrics::new()),
            Duration::from_secs(1),
            shutdown.clone(),
        );
        let (a, b) = (Trigger::new(), Trigger::new());
        let mut r = caches.register(&a);
        let _pods: Store<Pod> = r.watch();
        let _pools = r.watch_custom(&palisade_api_resource("IPAddressPool", "ipaddresspools"));
        let group_a = r.finish();
        let mut r = caches.register(&b);
        let _pods_again: Store<Pod> = r.watch();
        let group_b = r.finish();
        assert_eq!(caches.names(), ["ipaddresspools", "pods"]);
        assert_eq!(caches.entries.len(), 2);
        let pods = caches.entries.values().find(|e| e.name == "pods").unwrap();
        assert_eq!(pods.triggers.lock().unwrap().len(), 2);
        assert_eq!(group_a.names(), ["pods", "ipaddresspools"]);
        assert_eq!(group_b.names(), ["pods"]);
        // Neither has listed: both are pending, and waiting ends with the shutdown.
        assert_eq!(caches.readiness().pending(), ["ipaddresspools", "pods"]);
        shutdown.cancel();
        assert!(!group_b.synced(&shutdown).await);
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

    /// The waiter wakes when the last list completes, not on a timer: on the paused clock
    /// no time passes (a poll or the 1 s fallback would advance it).
    #[tokio::test(start_paused = true)]
    async fn wait_for_wakes_when_the_last_list_completes() {
        let r = Readiness::default();
        let a = r.register("a");
        let b = r.register("b");
        let shutdown = CancellationToken::new();
        let waiter = {
            let (r, shutdown) = (r.clone(), shutdown.clone());
            tokio::spawn(async move { r.wait_for(&["a", "b"], &shutdown).await })
        };
        let start = tokio::time::Instant::now();
        tokio::task::yield_now().await;
        r.mark_listed(&a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        r.mark_listed(&b);
        assert!(waiter.await.unwrap());
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
