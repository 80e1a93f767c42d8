//! One allocation pass: API objects in, the writes and Events that converge them out.
//!
//! ```text
//!   pools (typed) ─► Pool::from_spec ─► Allocator::set_pools ─► pool problems/invalidated
//!   Services ─► ours? ─► restore from status (oldest first) ─► assign ─► desired ingress
//!                                                                 │
//!   Plan { service status writes, pool status writes, Events } ◄──┘
//! ```
//!
//! No I/O: the reconciler (`palisade-allocation`) performs the plan. The allocator persists
//! between passes while this agent leads; a new leader starts from an empty allocator and
//! rebuilds it from every Service's `status.loadBalancer.ingress` (oldest Service first)
//! before it assigns anything, so a Service keeps its IP across restarts and leader changes
//! and no IP is ever given to two Services unless sharing allows it.
use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use crate::allocator::{Allocator, ServiceKey};
use crate::constants::{conditions, reasons};
use crate::pool::{find_overlaps, Family, Pool};
use crate::service::{is_ours, service_key, service_request, status_ips};
use crate::{IPAddressPool, IPAddressPoolStatus};
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// An Event to publish on a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEvent {
    pub key: ServiceKey,
    pub uid: Option<String>,
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// What one pass wants written.
#[derive(Debug, Default)]
pub struct Plan {
    /// Services whose `status.loadBalancer.ingress` must become these IPs (empty = clear).
    pub service_status: Vec<(ServiceKey, Vec<IpAddr>)>,
    /// Pools whose status must become this (only those that differ from what they show).
    pub pool_status: Vec<(String, IPAddressPoolStatus)>,
    pub events: Vec<ServiceEvent>,
    /// Allocation failures by reason, for metrics.
    pub errors: Vec<&'static str>,
    /// Per pool and family: (total, in use), for metrics.
    pub pool_counts: BTreeMap<(String, &'static str), (u128, u128)>,
    pub services_allocated: usize,
}

/// Inputs of a pass.
pub struct Inputs<'a> {
    pub pools: &'a [IPAddressPool],
    pub services: &'a [Arc<Service>],
    pub namespaces: &'a [Arc<Namespace>],
    pub nodes: &'a [Arc<Node>],
    pub class: &'a str,
    pub claim_unclassed: bool,
    pub now: jiff::Timestamp,
}

/// The families this cluster serves, from the Nodes' pod CIDRs (IPv4 first). Without any
/// pod CIDR information, both.
pub fn cluster_families(nodes: &[Arc<Node>]) -> Vec<Family> {
    let mut v4 = false;
    let mut v6 = false;
    for n in nodes {
        let spec = n.spec.as_ref();
        let cidrs = spec
            .and_then(|s| s.pod_cidrs.clone())
            .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
            .unwrap_or_default();
        for c in cidrs {
            if c.contains(':') {
                v6 = true;
            } else {
                v4 = true;
            }
        }
    }
    match (v4, v6) {
        (true, false) => vec![Family::V4],
        (false, true) => vec![Family::V6],
        _ => vec![Family::V4, Family::V6],
    }
}

/// Keeps the allocator between passes. `None` means "rebuild from Service status first".
///
/// Incremental passes: a Service whose last pass confirmed its addresses (assigned, and shown
/// in its status) is skipped while nothing it depends on changed — the Service object itself
/// (its `resourceVersion`), its Namespace's labels, and the pools and address families
/// (`epoch`: any change there clears every confirmation). Failures are never remembered, so a
/// Service waiting for an address is tried on every pass. Most passes are the watch echo of
/// the leader's own writes; at 10,000 Services this is what keeps them cheap.
#[derive(Default)]
pub struct AllocationState {
    allocator: Option<Allocator>,
    confirmed: HashMap<ServiceKey, Fingerprint>,
    epoch: Option<u64>,
    /// Recompute every Service on every pass (see [`AllocationState::recomputing_everything`]).
    full: bool,
}

/// What a Service's confirmed allocation depended on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    object: u64,
    namespace_labels: u64,
}

fn hash_of(v: &impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// The Service object's identity and version; `None` (never skipped) without both.
fn object_version(svc: &Service) -> Option<u64> {
    let uid = svc.metadata.uid.as_deref()?;
    let rv = svc.metadata.resource_version.as_deref()?;
    Some(hash_of(&(uid, rv)))
}

impl AllocationState {
    /// A state that never skips a Service: what the incremental passes are checked and
    /// benchmarked against.
    pub fn recomputing_everything() -> Self {
        AllocationState {
            full: true,
            ..Default::default()
        }
    }

    /// Forget everything (on losing leadership): the next leader pass rebuilds.
    pub fn reset(&mut self) {
        self.allocator = None;
        self.confirmed.clear();
        self.epoch = None;
    }

    /// One pass, in named phases: allocator epoch, pools, our Services, release, restore,
    /// assign, pool statuses.
    pub fn pass(&mut self, input: &Inputs) -> Plan {
        let mut plan = Plan::default();
        let rebuilding = self.start_epoch(input);
        let full = self.full;
        let confirmed = &mut self.confirmed;
        let Some(alloc) = self.allocator.as_mut() else {
            return plan;
        };
        let pools = validate_pools(input.pools);
        let report = alloc.set_pools(pools.valid);
        let pools = PoolCheck {
            invalid: pools.invalid,
            overlaps: pools.overlaps,
            report,
        };
        let services = ServiceIndex::build(input);
        release_stale(alloc, confirmed, &services, &pools.report, &mut plan);
        let restore_failed = restore_claims(alloc, &services, rebuilding);
        let ctx = AssignCtx {
            services: &services,
            report: &pools.report,
            restore_failed: &restore_failed,
            full,
        };
        assign_all(alloc, confirmed, &ctx, &mut plan);
        pool_statuses(alloc, input, &pools, &mut plan);
        plan.services_allocated = alloc.service_count();
        plan
    }

    /// Checks the families and the pools' epoch: a family change rebuilds the allocator, an
    /// epoch change forgets every confirmation. True when the allocator is (re)built now.
    fn start_epoch(&mut self, input: &Inputs) -> bool {
        let families = cluster_families(input.nodes);
        if self
            .allocator
            .as_ref()
            .is_some_and(|a| a.families() != families.as_slice())
        {
            tracing::info!(
                ?families,
                "cluster address families changed; rebuilding the allocator"
            );
            self.allocator = None;
        }
        let rebuilding = self.allocator.is_none();
        // Pools and families: everything else every confirmation depends on.
        let epoch = hash_of(&(
            families
                .iter()
                .map(|f| *f == Family::V6)
                .collect::<Vec<_>>(),
            input
                .pools
                .iter()
                .map(|p| {
                    (
                        p.metadata.name.clone(),
                        p.metadata.labels.clone(),
                        serde_json::to_string(&p.spec).unwrap_or_default(),
                    )
                })
                .collect::<Vec<_>>(),
        ));
        if rebuilding || self.epoch != Some(epoch) {
            self.confirmed.clear();
        }
        self.epoch = Some(epoch);
        self.allocator
            .get_or_insert_with(|| Allocator::with_families(&families));
        rebuilding
    }
}

/// The pools of a pass: the valid ones, and why the others are left out.
struct ValidatedPools {
    valid: Vec<Pool>,
    invalid: BTreeMap<String, String>,
    overlaps: Vec<crate::pool::Overlap>,
}

/// Validates each pool; an invalid one is left out (its condition says why).
fn validate_pools(pools: &[IPAddressPool]) -> ValidatedPools {
    let mut valid = Vec::new();
    let mut invalid: BTreeMap<String, String> = BTreeMap::new();
    for p in pools {
        let name = p.metadata.name.clone().unwrap_or_default();
        let labels = p.metadata.labels.clone().unwrap_or_default();
        match Pool::from_spec(&name, &labels, &p.spec) {
            Ok(pool) => valid.push(pool),
            Err(e) => {
                invalid.insert(name, e.to_string());
            }
        }
    }
    let overlaps = find_overlaps(&valid);
    ValidatedPools {
        valid,
        invalid,
        overlaps,
    }
}

/// What the pool phase found, for the pool statuses.
struct PoolCheck {
    invalid: BTreeMap<String, String>,
    overlaps: Vec<crate::pool::Overlap>,
    report: crate::allocator::PoolsReport,
}

/// The Services and Namespaces of a pass, keyed once.
struct ServiceIndex<'a> {
    ns_labels: BTreeMap<String, BTreeMap<String, String>>,
    ns_hashes: HashMap<String, u64>,
    /// Every Service with its key (computed once: a pass looks at each Service several
    /// times, and with thousands of Services building keys in a sort comparator dominated).
    keyed: Vec<(ServiceKey, &'a Arc<Service>)>,
    /// Indexes into `keyed` of our Services, oldest first (the first claim on an IP wins on
    /// restore).
    ours: Vec<usize>,
}

impl<'a> ServiceIndex<'a> {
    fn build(input: &Inputs<'a>) -> Self {
        let ns_labels: BTreeMap<String, BTreeMap<String, String>> = input
            .namespaces
            .iter()
            .map(|n| {
                (
                    n.metadata.name.clone().unwrap_or_default(),
                    n.metadata.labels.clone().unwrap_or_default(),
                )
            })
            .collect();
        let ns_hashes = ns_labels
            .iter()
            .map(|(n, l)| (n.clone(), hash_of(l)))
            .collect();
        let keyed: Vec<(ServiceKey, &Arc<Service>)> =
            input.services.iter().map(|s| (service_key(s), s)).collect();
        let mut ours: Vec<usize> = (0..keyed.len())
            .filter(|&i| is_ours(keyed[i].1, input.class, input.claim_unclassed))
            .collect();
        ours.sort_by(|&i, &j| {
            let (ka, a) = &keyed[i];
            let (kb, b) = &keyed[j];
            let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
            let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
            ta.cmp(&tb).then_with(|| ka.cmp(kb))
        });
        ServiceIndex {
            ns_labels,
            ns_hashes,
            keyed,
            ours,
        }
    }

    fn ours(&self) -> impl Iterator<Item = (&ServiceKey, &'a Arc<Service>)> + '_ {
        self.ours
            .iter()
            .map(|&i| (&self.keyed[i].0, self.keyed[i].1))
    }
}

/// Releases what no longer belongs to one of our Services.
fn release_stale(
    alloc: &mut Allocator,
    confirmed: &mut HashMap<ServiceKey, Fingerprint>,
    services: &ServiceIndex,
    report: &crate::allocator::PoolsReport,
    plan: &mut Plan,
) {
    let our_keys: HashSet<&ServiceKey> = services.ours().map(|(k, _)| k).collect();
    let all: HashMap<&ServiceKey, &Arc<Service>> =
        services.keyed.iter().map(|(k, s)| (k, *s)).collect();
    let stale_keys: BTreeSet<ServiceKey> = services
        .keyed
        .iter()
        .map(|(k, _)| k)
        .chain(report.invalidated.iter().map(|i| &i.service))
        // Deleted Services are not in the store at all: find them through the allocator.
        .chain(alloc.service_keys())
        .filter(|k| !our_keys.contains(k) && alloc.assigned(k).is_some())
        .cloned()
        .collect();
    for key in stale_keys {
        confirmed.remove(&key);
        let released = alloc.unassign(&key);
        if let Some(svc) = all.get(&key) {
            // Still exists but is not ours any more (type or class changed): take back
            // only the addresses we gave it.
            let shown = status_ips(svc);
            if !shown.is_empty() && shown.iter().all(|ip| released.contains(ip)) {
                plan.service_status.push((key.clone(), Vec::new()));
            }
            plan.events.push(ServiceEvent {
                key: key.clone(),
                uid: svc.metadata.uid.clone(),
                warning: false,
                reason: reasons::IP_RELEASED,
                note: format!(
                    "released {} (the Service is no longer a LoadBalancer handled by Palisade)",
                    join_ips(&released)
                ),
            });
        }
    }
}

/// Restore: claims shown in status first, before anything new is assigned. Returns why each
/// claim that could not be kept failed.
fn restore_claims(
    alloc: &mut Allocator,
    services: &ServiceIndex,
    rebuilding: bool,
) -> BTreeMap<ServiceKey, String> {
    let mut restore_failed = BTreeMap::new();
    for (key, svc) in services.ours() {
        if alloc.assigned(key).is_some() {
            continue;
        }
        let shown = status_ips(svc);
        if shown.is_empty() {
            continue;
        }
        let labels = labels_of(&services.ns_labels, &key.namespace);
        let Ok(req) = service_request(svc, &labels) else {
            continue;
        };
        if let Err(e) = alloc.restore(&req, &shown) {
            if !rebuilding {
                tracing::debug!(service = %key, error = %e, "status claim not restorable");
            }
            restore_failed.insert(key.clone(), e.to_string());
        }
    }
    restore_failed
}

/// What the assign phase reads besides the allocator.
struct AssignCtx<'a, 'b> {
    services: &'a ServiceIndex<'b>,
    report: &'a crate::allocator::PoolsReport,
    restore_failed: &'a BTreeMap<ServiceKey, String>,
    full: bool,
}

/// Assign: every one of our Services not confirmed since it last changed.
fn assign_all(
    alloc: &mut Allocator,
    confirmed: &mut HashMap<ServiceKey, Fingerprint>,
    ctx: &AssignCtx,
    plan: &mut Plan,
) {
    for (key, svc) in ctx.services.ours() {
        let shown = status_ips(svc);
        let fingerprint = object_version(svc).map(|object| Fingerprint {
            object,
            namespace_labels: ctx
                .services
                .ns_hashes
                .get(key.namespace.as_str())
                .copied()
                .unwrap_or(0),
        });
        let fingerprint = fingerprint.filter(|_| !ctx.full);
        if fingerprint.is_some()
            && confirmed.get(key) == fingerprint.as_ref()
            && alloc.assigned(key) == Some(shown.as_slice())
        {
            continue;
        }
        let labels = labels_of(&ctx.services.ns_labels, &key.namespace);
        let before: Vec<IpAddr> = alloc
            .assigned(key)
            .map(<[IpAddr]>::to_vec)
            .unwrap_or_default();
        let result = service_request(svc, &labels).and_then(|req| alloc.assign(&req));
        match (&result, fingerprint) {
            // Confirmed as shown: skipped until something it depends on changes. (A
            // status write bumps the resourceVersion, so a written Service is confirmed
            // by the pass that sees the write.)
            (Ok(ips), Some(fp)) if *ips == shown => {
                confirmed.insert(key.clone(), fp);
            }
            _ => {
                confirmed.remove(key);
            }
        }
        match result {
            Ok(ips) => {
                if ips != shown {
                    plan.service_status.push((key.clone(), ips.clone()));
                    let pool = ips
                        .first()
                        .and_then(|ip| alloc.pool_for_ip(*ip))
                        .unwrap_or("?")
                        .to_string();
                    let mut note = format!("assigned {} from pool {pool}", join_ips(&ips));
                    if let Some(why) = ctx.restore_failed.get(key) {
                        note.push_str(&format!(" (its previous address could not be kept: {why})"));
                    } else if !before.is_empty() && before != ips {
                        note.push_str(&format!(" (was {})", join_ips(&before)));
                    }
                    plan.events.push(ServiceEvent {
                        key: key.clone(),
                        uid: svc.metadata.uid.clone(),
                        warning: false,
                        reason: reasons::IP_ALLOCATED,
                        note,
                    });
                }
            }
            Err(e) => {
                plan.errors.push(e.reason());
                // An address that left every pool must not stay in use.
                let invalid_now = ctx.report.invalidated.iter().any(|i| &i.service == key)
                    || ctx.restore_failed.contains_key(key);
                if invalid_now {
                    alloc.unassign(key);
                    if !shown.is_empty() {
                        plan.service_status.push((key.clone(), Vec::new()));
                    }
                }
                plan.events.push(ServiceEvent {
                    key: key.clone(),
                    uid: svc.metadata.uid.clone(),
                    warning: true,
                    reason: reasons::ALLOCATION_FAILED,
                    note: format!("{}: {e}", e.reason()),
                });
            }
        }
    }
}

/// Pool statuses (conditions and counters) and the pool metrics.
fn pool_statuses(alloc: &Allocator, input: &Inputs, pools: &PoolCheck, plan: &mut Plan) {
    let (invalid, overlaps, report) = (&pools.invalid, &pools.overlaps, &pools.report);
    for p in input.pools {
        let name = p.metadata.name.clone().unwrap_or_default();
        let mut status = IPAddressPoolStatus::default();
        let mut conds = Vec::new();
        if let Some(err) = invalid.get(&name) {
            conds.push(cond(
                conditions::INVALID,
                true,
                reasons::INVALID_ADDRESS,
                err,
                input.now,
            ));
            conds.push(cond(
                conditions::READY,
                false,
                reasons::INVALID_ADDRESS,
                "see the Invalid condition",
                input.now,
            ));
        } else {
            if let Some(c) = alloc.counters(&name) {
                c.write_status(&mut status);
                plan.pool_counts.insert(
                    (name.clone(), "IPv4"),
                    (c.assigned_v4 + c.available_v4, c.assigned_v4),
                );
                plan.pool_counts.insert(
                    (name.clone(), "IPv6"),
                    (c.assigned_v6 + c.available_v6, c.assigned_v6),
                );
            }
            let mine: Vec<String> = overlaps
                .iter()
                .filter(|o| o.pool == name || o.other == name)
                .map(|o| {
                    let other = if o.pool == name { &o.other } else { &o.pool };
                    format!("{}-{} also in pool {other}", o.first, o.last)
                })
                .collect();
            let problems: Vec<String> = report
                .problems
                .get(&name)
                .into_iter()
                .flatten()
                .filter(|e| e.reason() != reasons::OVERLAPPING_POOL)
                .map(|e| e.to_string())
                .collect();
            if mine.is_empty() {
                conds.push(cond(
                    conditions::OVERLAPPING,
                    false,
                    reasons::NO_OVERLAP,
                    "no address is shared with another pool",
                    input.now,
                ));
            } else {
                conds.push(cond(
                    conditions::OVERLAPPING,
                    true,
                    reasons::OVERLAPPING_POOL,
                    &mine.join("; "),
                    input.now,
                ));
            }
            if problems.is_empty() {
                conds.push(cond(
                    conditions::INVALID,
                    false,
                    reasons::VALID,
                    "every address entry is valid",
                    input.now,
                ));
                conds.push(cond(
                    conditions::READY,
                    true,
                    reasons::VALID,
                    "addresses can be assigned",
                    input.now,
                ));
            } else {
                let msg = problems.join("; ");
                let reason = report
                    .problems
                    .get(&name)
                    .into_iter()
                    .flatten()
                    .map(|e| e.reason())
                    .find(|r| *r != reasons::OVERLAPPING_POOL)
                    .unwrap_or(reasons::INVALID_ADDRESS);
                conds.push(cond(conditions::INVALID, true, reason, &msg, input.now));
                // What is left after the problem (e.g. only IPv6 entries in an IPv4-only
                // cluster) may be nothing at all: then the pool is not Ready.
                let usable = alloc.counters(&name).is_some_and(|c| {
                    c.assigned_v4 + c.available_v4 + c.assigned_v6 + c.available_v6 > 0
                });
                if usable {
                    conds.push(cond(
                        conditions::READY,
                        true,
                        reason,
                        &format!("usable in part: {msg}"),
                        input.now,
                    ));
                } else {
                    conds.push(cond(
                        conditions::READY,
                        false,
                        reason,
                        &format!("no usable address: {msg}"),
                        input.now,
                    ));
                }
            }
        }
        let current = p.status.clone().unwrap_or_default();
        status.conditions = keep_transition_times(conds, &current.conditions);
        if status != current {
            plan.pool_status.push((name, status));
        }
    }
}

/// The status an `L2Advertisement` should have for its `preferredNodeSelectors`, when it
/// differs from the current one (`None`: leave the status alone).
///
/// Terms [`crate::announce::preference_problems`] names: `Invalid=True` with reason
/// [`reasons::INVALID_PREFERENCE`] naming them, and `Ready=True` (the advertisement still
/// announces; only those terms are ignored). Once fixed: `Invalid=False`/`Ready=True`,
/// reason [`reasons::VALID`]. An advertisement that never had such a problem is left alone
/// (its status may carry another writer's conditions). Transition times are kept for
/// unchanged conditions, so a steady object is never rewritten.
pub fn advertisement_status(
    ad: &crate::L2Advertisement,
    now: jiff::Timestamp,
) -> Option<crate::L2AdvertisementStatus> {
    let problems = crate::announce::preference_problems(&ad.spec);
    let current = ad.status.clone().unwrap_or_default();
    let flagged = current
        .conditions
        .iter()
        .any(|c| c.type_ == conditions::INVALID && c.reason == reasons::INVALID_PREFERENCE);
    let conds = if !problems.is_empty() {
        let msg = problems.join("; ");
        vec![
            cond(
                conditions::INVALID,
                true,
                reasons::INVALID_PREFERENCE,
                &msg,
                now,
            ),
            cond(
                conditions::READY,
                true,
                reasons::INVALID_PREFERENCE,
                &format!("announcing; ignored: {msg}"),
                now,
            ),
        ]
    } else if flagged {
        vec![
            cond(
                conditions::INVALID,
                false,
                reasons::VALID,
                "every preferredNodeSelectors term is valid",
                now,
            ),
            cond(conditions::READY, true, reasons::VALID, "announcing", now),
        ]
    } else {
        return None;
    };
    let status = crate::L2AdvertisementStatus {
        conditions: keep_transition_times(conds, &current.conditions),
    };
    (status != current).then_some(status)
}

/// A Namespace's labels; for a Namespace not (yet) in the cache, the one label the API
/// server always sets.
fn labels_of<'a>(
    ns_labels: &'a BTreeMap<String, BTreeMap<String, String>>,
    ns: &str,
) -> Cow<'a, BTreeMap<String, String>> {
    match ns_labels.get(ns) {
        Some(l) => Cow::Borrowed(l),
        None => Cow::Owned(BTreeMap::from([(
            "kubernetes.io/metadata.name".to_string(),
            ns.to_string(),
        )])),
    }
}

fn join_ips(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn cond(type_: &str, status: bool, reason: &str, message: &str, now: jiff::Timestamp) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time: Time(now),
        observed_generation: None,
    }
}

/// A condition whose status did not change keeps its old transition time, so unchanged
/// pools compare equal and are not rewritten.
fn keep_transition_times(mut new: Vec<Condition>, old: &[Condition]) -> Vec<Condition> {
    for c in &mut new {
        if let Some(o) = old
            .iter()
            .find(|o| o.type_ == c.type_ && o.status == c.status)
        {
            c.last_transition_time = o.last_transition_time.clone();
        }
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// A tiny API: objects as JSON, every write bumps the resourceVersion.
    struct World {
        pools: Vec<Value>,
        services: Vec<Value>,
        namespaces: Vec<Value>,
        rv: u64,
    }

    impl World {
        fn bump(&mut self, v: &mut Value) {
            self.rv += 1;
            v["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        }
        fn add_service(&mut self, ns: &str, name: &str, extra: Value) {
            let mut v = json!({
                "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{ns}-{name}"),
                             "creationTimestamp": format!("2026-11-23T10:{:02}:00Z", self.services.len() % 60),
                             "annotations": extra},
                "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}
            });
            self.bump(&mut v);
            self.services.push(v);
        }
        fn edit_service(&mut self, name: &str, f: impl FnOnce(&mut Value)) {
            let mut v = self
                .services
                .iter()
                .find(|s| s["metadata"]["name"] == name)
                .cloned()
                .expect("service");
            f(&mut v);
            self.bump(&mut v);
            let i = self
                .services
                .iter()
                .position(|s| s["metadata"]["name"] == name)
                .expect("service");
            self.services[i] = v;
        }
        fn set_ns_labels(&mut self, ns: &str, labels: Value) {
            for n in &mut self.namespaces {
                if n["metadata"]["name"] == ns {
                    n["metadata"]["labels"] = labels.clone();
                }
            }
        }
        /// Writes a plan's Service statuses back, as the API would.
        fn write(&mut self, plan: &Plan) {
            for (key, ips) in &plan.service_status {
                let ingress: Vec<Value> =
                    ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
                if self
                    .services
                    .iter()
                    .any(|s| s["metadata"]["name"] == key.name.as_str())
                {
                    self.edit_service(&key.name, |s| {
                        s["status"] = json!({"loadBalancer": {"ingress": ingress}});
                    });
                }
            }
        }
        fn pass(&self, state: &mut AllocationState) -> Plan {
            let pools: Vec<IPAddressPool> = self
                .pools
                .iter()
                .map(|p| serde_json::from_value(p.clone()).unwrap())
                .collect();
            let services: Vec<Arc<Service>> = self
                .services
                .iter()
                .map(|s| Arc::new(serde_json::from_value(s.clone()).unwrap()))
                .collect();
            let namespaces: Vec<Arc<Namespace>> = self
                .namespaces
                .iter()
                .map(|n| Arc::new(serde_json::from_value(n.clone()).unwrap()))
                .collect();
            state.pass(&Inputs {
                pools: &pools,
                services: &services,
                namespaces: &namespaces,
                nodes: &[],
                class: "palisade.dev/palisade",
                claim_unclassed: true,
                now: jiff::Timestamp::from_second(1_800_000_000).unwrap(),
            })
        }
    }

    fn pool(name: &str, addrs: &[&str], alloc: Value) -> Value {
        json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "IPAddressPool",
               "metadata": {"name": name}, "spec": {"addresses": addrs, "serviceAllocation": alloc}})
    }

    fn summary(plan: &Plan) -> String {
        format!(
            "status={:?} events={:?} pools={:?} errors={:?} allocated={}",
            plan.service_status,
            plan.events,
            plan.pool_status,
            plan.errors,
            plan.services_allocated
        )
    }

    /// The incremental pass decides exactly what a pass recomputing every Service decides,
    /// through a script of the changes that matter: new Services, status echoes, steady
    /// passes, Namespace relabels that change which pool may serve, requested IPs, deletions,
    /// pool edits that take addresses away, exhaustion and its relief.
    #[test]
    fn incremental_passes_decide_what_full_passes_decide() {
        let mut w = World {
            pools: vec![
                pool("gold", &["10.0.0.0/30"], json!({"priority": 1, "namespaceSelectors": [{"matchLabels": {"tier": "gold"}}]})),
                pool("general", &["10.0.1.0/29"], json!({})),
            ],
            services: Vec::new(),
            namespaces: ["a", "b", "c"]
                .iter()
                .map(|n| json!({"metadata": {"name": n, "labels": {"tier": if *n == "a" { "gold" } else { "plain" }}}}))
                .collect(),
            rv: 0,
        };
        for i in 0..9 {
            let ns = ["a", "b", "c"][i % 3];
            w.add_service(ns, &format!("s{i}"), json!({}));
        }
        let mut inc = AllocationState::default();
        let mut full = AllocationState::recomputing_everything();
        fn step(
            w: &mut World,
            inc: &mut AllocationState,
            full: &mut AllocationState,
            what: &str,
        ) -> Plan {
            let a = w.pass(inc);
            let b = w.pass(full);
            assert_eq!(summary(&a), summary(&b), "step {what}");
            w.write(&a);
            a
        }
        step(&mut w, &mut inc, &mut full, "first pass");
        step(&mut w, &mut inc, &mut full, "echo of the status writes");
        let steady = step(&mut w, &mut inc, &mut full, "steady");
        assert!(steady.service_status.is_empty() && steady.events.is_empty());
        assert!(
            !inc.confirmed.is_empty(),
            "nothing was confirmed: the test proves nothing"
        );
        // Namespace b becomes gold: pool selection changes for its Services.
        w.set_ns_labels("b", json!({"tier": "gold"}));
        step(&mut w, &mut inc, &mut full, "namespace relabel");
        step(&mut w, &mut inc, &mut full, "echo");
        w.set_ns_labels("a", json!({"tier": "plain"}));
        step(
            &mut w,
            &mut inc,
            &mut full,
            "namespace relabel away from gold",
        );
        step(&mut w, &mut inc, &mut full, "echo");
        // A Service asks for a specific address.
        w.edit_service("s4", |s| {
            s["metadata"]["annotations"] = json!({"palisade.dev/loadBalancerIPs": "10.0.1.6"})
        });
        step(&mut w, &mut inc, &mut full, "requested IP");
        step(&mut w, &mut inc, &mut full, "echo");
        // Deletions free addresses.
        w.services.retain(|s| s["metadata"]["name"] != "s0");
        step(&mut w, &mut inc, &mut full, "deletion");
        // Exhaustion: more Services than addresses, then one goes away.
        for i in 9..14 {
            w.add_service("c", &format!("s{i}"), json!({}));
        }
        let p = step(&mut w, &mut inc, &mut full, "exhaustion");
        assert!(!p.errors.is_empty(), "the pools should be exhausted");
        step(&mut w, &mut inc, &mut full, "echo");
        step(&mut w, &mut inc, &mut full, "still exhausted");
        w.services.retain(|s| s["metadata"]["name"] != "s1");
        step(&mut w, &mut inc, &mut full, "relief");
        step(&mut w, &mut inc, &mut full, "echo");
        // A pool shrinks: addresses leave, their Services move or fail.
        w.pools[1] = pool("general", &["10.0.1.0/30"], json!({}));
        step(&mut w, &mut inc, &mut full, "pool shrinks");
        step(&mut w, &mut inc, &mut full, "echo");
        step(&mut w, &mut inc, &mut full, "steady at the end");
    }

    #[test]
    fn malformed_preferences_get_an_invalid_condition_that_clears_when_fixed() {
        let now: jiff::Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let later: jiff::Timestamp = "2026-01-01T00:05:00Z".parse().unwrap();
        let ad = |terms: Value, status: Option<crate::L2AdvertisementStatus>| {
            let mut a: crate::L2Advertisement = serde_json::from_value(json!({
                "apiVersion": "palisade.dev/v1alpha1", "kind": "L2Advertisement",
                "metadata": {"name": "lan"}, "spec": {"preferredNodeSelectors": terms}}))
            .unwrap();
            a.status = status;
            a
        };
        let good = json!([{"weight": 50, "preference": {"matchLabels": {"zone": "a"}}}]);
        let bad = json!([
            {"weight": 50, "preference": {"matchLabels": {"zone": "a"}}},
            {"weight": 80, "preference": {"matchExpressions": [{"key": "edge", "operator": "Bogus"}]}}
        ]);
        // Never flagged and valid: the status is not ours to touch.
        assert_eq!(advertisement_status(&ad(good.clone(), None), now), None);
        // Broken term: Invalid=True naming it, still Ready.
        let st = advertisement_status(&ad(bad.clone(), None), now).expect("flagged");
        let get = |st: &crate::L2AdvertisementStatus, t: &str| {
            st.conditions
                .iter()
                .find(|c| c.type_ == t)
                .cloned()
                .unwrap()
        };
        let inv = get(&st, conditions::INVALID);
        assert_eq!(
            (inv.status.as_str(), inv.reason.as_str()),
            ("True", reasons::INVALID_PREFERENCE)
        );
        assert!(
            inv.message.contains("preferredNodeSelectors[1]") && inv.message.contains("Bogus"),
            "{}",
            inv.message
        );
        assert!(!inv.message.contains("[0]"), "{}", inv.message);
        assert_eq!(get(&st, conditions::READY).status, "True");
        // Steady: nothing to write, even later.
        assert_eq!(
            advertisement_status(&ad(bad, Some(st.clone())), later),
            None
        );
        // Fixed: cleared.
        let fixed = advertisement_status(&ad(good.clone(), Some(st)), later).expect("cleared");
        let inv = get(&fixed, conditions::INVALID);
        assert_eq!(
            (inv.status.as_str(), inv.reason.as_str()),
            ("False", reasons::VALID)
        );
        assert_eq!(inv.last_transition_time, Time(later));
        assert_eq!(advertisement_status(&ad(good, Some(fixed)), later), None);
    }
}
