//! The node-local NetworkPolicy reconciler.
//!
//! ```text
//! NetpolCaches (pods, namespaces, policies, nodes) ── snapshot ──► IncrementalCompiler::sync
//!        ▲ pokes                                                     │
//!   Trigger ◄── reflectors                                   render ─┴─► Payload
//!                                                                        │ same as last? skip
//!                                            palisade_dataplane::Executor::apply (blocking pool)
//! ```
//!
//! Safety rules: nothing is applied before every watch it reads has listed once (an empty
//! cache would otherwise "converge" to no policies and open every pod). During an API outage
//! the caches keep their last content, so enforcement stays as it was. A failed apply leaves
//! the previous kernel state in place and is retried with backoff. Nothing is flushed on exit.
//!
//! Address families: each family the node's pods use (its `podCIDRs`, its pods' IPs) gets
//! its own compiler and executor (`iptables` / `ip6tables`); a dual-stack node enforces
//! both, and a family once enforced is never dropped.
pub mod denied_log;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::ObjectReference;
use palisade_dataplane::Executor;
use palisade_netpol::{ClusterState, Diagnostic, Family, IncrementalCompiler, NodeConfig, Payload};
use tokio_util::sync::CancellationToken;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::reflector::Store;
use palisade_runtime::config::SyncSettings;
use palisade_runtime::events::EventSink;
use palisade_runtime::metrics::{labels1, Metrics};
use palisade_runtime::prune::SlimPod;
use palisade_runtime::stores::{CacheGroup, Caches};
use palisade_runtime::sync::{run_sync_loop, Cause, JobError, Trigger};

pub mod cnp;

/// Event reasons of the netpol reconciler.
pub mod reasons {
    pub const APPLY_FAILED: &str = "NetworkPolicyApplyFailed";
}

/// Why a NetworkPolicy sync failed (retried with backoff; the previous rules stay in force).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("the reconciler's state lock is poisoned")]
    Poisoned,
    #[error("applying the {family:?} rules failed: {message}")]
    Apply { family: Family, message: String },
    #[error("the apply task died: {0}")]
    ApplyTask(String),
}

impl JobError for SyncError {
    fn label(&self) -> &'static str {
        match self {
            SyncError::Poisoned => "poisoned",
            SyncError::Apply { .. } => "apply",
            SyncError::ApplyTask(_) => "apply_task",
        }
    }
}

/// Gives the executor of an address family (created when the family is first needed; an
/// IPv6 executor needs the `ip6tables` tools, which an IPv4-only node may lack).
pub type ExecutorFactory = Arc<dyn Fn(Family) -> Result<Arc<dyn Executor>, String> + Send + Sync>;

/// The caches NetworkPolicy enforcement reads.
#[derive(Clone)]
pub struct NetpolCaches {
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    pub network_policies: Store<NetworkPolicy>,
    pub nodes: Store<Node>,
    /// ClusterNetworkPolicies, when enabled (see [`cnp`]).
    pub cluster_policies: Option<cnp::CnpWatch>,
    pub group: CacheGroup,
}

impl NetpolCaches {
    /// Registers what enforcement reads; every change pokes `trigger`.
    pub fn register(caches: &mut Caches, trigger: &Trigger) -> NetpolCaches {
        Self::register_with(caches, trigger, None)
    }

    /// [`NetpolCaches::register`], plus ClusterNetworkPolicies when `cluster_policies` has
    /// the client their status is written with.
    pub fn register_with(
        caches: &mut Caches,
        trigger: &Trigger,
        cluster_policies: Option<kube::Client>,
    ) -> NetpolCaches {
        let mut r = caches.register(trigger);
        NetpolCaches {
            // Decoded slim: only the fields enforcement reads (labels, node, host network,
            // named ports, phase, IPs) are ever built.
            pods: r.watch_decoded::<Pod, SlimPod>(|_| {}),
            namespaces: r.watch(),
            network_policies: r.watch(),
            nodes: r.watch(),
            cluster_policies: cluster_policies
                .map(|client| cnp::CnpWatch::new(r.watch_custom(&cnp::api_resource()), client)),
            group: r.finish(),
        }
    }
}

pub struct NetpolReconciler {
    pub stores: NetpolCaches,
    /// This node's settings; `family` is ignored (each family gets its own compile).
    pub node: NodeConfig,
    pub executors: ExecutorFactory,
    /// Where local pods' interfaces are read from when `node.anti_spoofing` is on.
    pub links: Option<Arc<dyn palisade_dataplane::LinkSource>>,
    /// Revocation (`--revoke-denied-connections`): after an apply that changed the rules,
    /// conntrack entries of local pods' flows the new rules deny are deleted. Set together
    /// with `node.revoke_denied_connections` (the mid-stream rule); `None` = off.
    pub conntrack: Option<Arc<dyn palisade_dataplane::Conntrack>>,
    pub metrics: Arc<Metrics>,
    pub events: EventSink,
    pub settings: SyncSettings,
    /// Kept current for the denied-traffic log (`node.deny_log` on): IP → pod, profile →
    /// policies, from each sync's snapshot and compiled rules.
    pub deny_index: Option<denied_log::SharedIndex>,
}

/// One address family's compiler, executor and last applied payload.
struct FamilyState {
    /// Keeps the previous compile, so pod churn only recomputes what it touches.
    compiler: IncrementalCompiler,
    executor: Arc<dyn Executor>,
    /// Shared with the apply task: a payload is copied once, when it changed.
    payload: Option<Arc<Payload>>,
}

#[derive(Default)]
struct LastState {
    families: BTreeMap<Family, FamilyState>,
    /// Families whose executor could not be created (reported once; retried on resync).
    unavailable: BTreeSet<Family>,
    /// Diagnostics already reported as Events (reported again only when they change).
    reported: BTreeSet<(String, String, String, String)>,
}

/// Milliseconds since `t` (for the phase timings in the sync log).
fn ms_since(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e4).round() / 10.0
}

/// The address families this node's pods use: the families of its `spec.podCIDRs` and of
/// its local pods' IPs; IPv4 when nothing says otherwise.
pub fn node_families(state: &ClusterState, node: &str) -> BTreeSet<Family> {
    let mut out = BTreeSet::new();
    let of = |s: &str| {
        let s = s.split('/').next().unwrap_or(s);
        s.parse::<IpAddr>().ok().map(|ip| match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        })
    };
    for n in &state.nodes {
        if n.metadata.name.as_deref() != Some(node) {
            continue;
        }
        let spec = n.spec.as_ref();
        for c in spec
            .and_then(|s| s.pod_cidrs.as_ref())
            .into_iter()
            .flatten()
            .chain(spec.and_then(|s| s.pod_cidr.as_ref()))
        {
            out.extend(of(c));
        }
    }
    for p in &state.pods {
        let spec = p.spec.as_ref();
        if spec.and_then(|s| s.node_name.as_deref()) != Some(node)
            || spec.and_then(|s| s.host_network) == Some(true)
        {
            continue;
        }
        let status = p.status.as_ref();
        for ip in status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|i| i.ip.as_str())
            .chain(status.and_then(|s| s.pod_ip.as_deref()))
        {
            out.extend(of(ip));
        }
    }
    if out.is_empty() {
        out.insert(Family::V4);
    }
    out
}

impl NetpolReconciler {
    /// Runs until `shutdown`. `trigger` must be the one the caches were registered with.
    pub async fn run(self, trigger: Trigger, shutdown: CancellationToken) {
        // Wait for the first complete list of everything we read.
        if !self.stores.group.synced(&shutdown).await {
            return;
        }
        tracing::info!(node = %self.node.node_name, "caches synced; NetworkPolicy enforcement starts");
        let this = Arc::new(self);
        let last = Arc::new(Mutex::new(LastState::default()));
        trigger.poke();
        let metrics = Some(this.metrics.clone());
        run_sync_loop(
            this.settings,
            trigger,
            shutdown,
            "netpol",
            metrics,
            |cause| {
                let this = this.clone();
                let last = last.clone();
                async move { this.sync_once(cause, &last).await }
            },
        )
        .await;
    }

    /// A snapshot of the caches as the pure compiler's input.
    pub fn snapshot(&self) -> ClusterState {
        self.snapshot_full().0
    }

    /// The snapshot and the full ClusterNetworkPolicy objects (for status).
    fn snapshot_full(
        &self,
    ) -> (
        ClusterState,
        Vec<Arc<palisade_netpol::cnp::ClusterNetworkPolicy>>,
    ) {
        let (cluster_policies, full) = self
            .stores
            .cluster_policies
            .as_ref()
            .map(cnp::CnpWatch::snapshot)
            .unwrap_or_default();
        let state = ClusterState {
            nodes: self.stores.nodes.state(),
            namespaces: self.stores.namespaces.state(),
            pods: self.stores.pods.state(),
            policies: self.stores.network_policies.state(),
            cluster_policies,
        };
        (state, full)
    }

    async fn report_cnp_status(
        &self,
        full: &[Arc<palisade_netpol::cnp::ClusterNetworkPolicy>],
        diags: &[Diagnostic],
        apply_error: Option<&str>,
    ) {
        if let Some(w) = &self.stores.cluster_policies {
            w.report_status(&self.node.node_name, full, diags, apply_error)
                .await;
        }
    }

    /// Brings the families the node needs under enforcement. A family once enforced stays
    /// (its rules are never dropped because pods of it went away: fail closed).
    async fn ensure_families(&self, state: &ClusterState, cause: Cause, last: &Mutex<LastState>) {
        let wanted = node_families(state, &self.node.node_name);
        let missing: Vec<Family> = {
            let Ok(mut l) = last.lock() else { return };
            if cause == Cause::Resync {
                l.unavailable.clear();
            }
            wanted
                .into_iter()
                .filter(|f| !l.families.contains_key(f) && !l.unavailable.contains(f))
                .collect()
        };
        for family in missing {
            match (self.executors)(family) {
                Ok(executor) => {
                    let mut cfg = self.node.clone();
                    cfg.family = family;
                    tracing::info!(
                        ?family,
                        "NetworkPolicy enforcement for this address family starts"
                    );
                    if let Ok(mut l) = last.lock() {
                        l.families.insert(
                            family,
                            FamilyState {
                                compiler: IncrementalCompiler::new(cfg),
                                executor,
                                payload: None,
                            },
                        );
                    }
                }
                Err(e) => {
                    tracing::error!(?family, error = %e, "pods of this node use this address family but its rules cannot be applied");
                    self.events
                        .warning(
                            &self.node_ref(),
                            reasons::APPLY_FAILED,
                            "Apply",
                            format!("{family:?} NetworkPolicies cannot be enforced: {e}"),
                        )
                        .await;
                    if let Ok(mut l) = last.lock() {
                        l.unavailable.insert(family);
                    }
                }
            }
        }
    }

    fn node_ref(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.node.node_name.clone()),
            ..Default::default()
        }
    }

    async fn sync_once(&self, cause: Cause, last: &Mutex<LastState>) -> Result<(), SyncError> {
        let start = Instant::now();
        let (state, cnp_full) = self.snapshot_full();
        let snapshot_ms = ms_since(start);
        self.ensure_families(&state, cause, last).await;
        let links = self.link_dump().await;
        let compile_start = Instant::now();
        // Compile every enforced family; collect what must be applied.
        let mut diagnostics = Vec::new();
        let mut work = Vec::new();
        {
            let Ok(mut l) = last.lock() else {
                return Err(SyncError::Poisoned);
            };
            for (family, fs) in l.families.iter_mut() {
                if let Some(dump) = &links {
                    let ips = palisade_netpol::local_pod_ips(&state, &self.node.node_name, *family);
                    let found = palisade_dataplane::interfaces::resolve(dump, &ips);
                    fs.compiler.set_pod_interfaces(found);
                }
                let payload = fs.compiler.sync(&state);
                let unchanged = fs.payload.as_deref() == Some(payload);
                if !unchanged || cause == Cause::Resync {
                    let payload = match (&fs.payload, unchanged) {
                        (Some(p), true) => p.clone(),
                        _ => Arc::new(payload.clone()),
                    };
                    work.push((*family, fs.executor.clone(), payload));
                }
                if let Some(c) = fs.compiler.compiled() {
                    diagnostics.extend(c.diagnostics.iter().cloned());
                }
            }
        }
        let compile_ms = ms_since(compile_start);
        if let Some(shared) = &self.deny_index {
            if let Ok(l) = last.lock() {
                let index = palisade_netpol::denied::DenyIndex::new(
                    &state,
                    l.families.values().filter_map(|fs| fs.compiler.compiled()),
                );
                if let Ok(mut w) = shared.write() {
                    *w = Arc::new(index);
                }
            }
        }
        diagnostics.sort();
        diagnostics.dedup();
        if work.is_empty() {
            self.report_cnp_status(&cnp_full, &diagnostics, None).await;
            self.report_diagnostics(&diagnostics, last).await;
            self.metrics
                .netpol_syncs
                .get_or_create(&labels1("result", "unchanged"))
                .inc();
            return Ok(());
        }
        let mut failure = None;
        for (family, executor, payload) in work {
            let to_apply = payload.clone();
            let apply_start = Instant::now();
            let result = tokio::task::spawn_blocking(move || executor.apply_shared(to_apply)).await;
            let apply_ms = ms_since(apply_start);
            match result {
                Ok(Ok(report)) => {
                    let first = last
                        .lock()
                        .ok()
                        .and_then(|l| l.families.get(&family).map(|f| f.payload.is_none()))
                        .unwrap_or(true);
                    if report.changed || first {
                        self.revoke(&state, family, &payload, last).await;
                    }
                    tracing::debug!(
                        cause = cause.as_str(),
                        ?family,
                        changed = report.changed,
                        snapshot_ms,
                        compile_ms,
                        apply_ms,
                        rules = payload.stats.rules,
                        sets = payload.stats.sets,
                        "netpol sync applied"
                    );
                    if let Ok(mut l) = last.lock() {
                        if let Some(fs) = l.families.get_mut(&family) {
                            fs.payload = Some(payload);
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(?family, error = %e, "applying NetworkPolicy rules failed; previous rules stay in force, retrying");
                    self.events
                        .warning(
                            &self.node_ref(),
                            reasons::APPLY_FAILED,
                            "Apply",
                            e.to_string(),
                        )
                        .await;
                    // Force a full re-apply next time.
                    if let Ok(mut l) = last.lock() {
                        if let Some(fs) = l.families.get_mut(&family) {
                            fs.payload = None;
                        }
                    }
                    failure = Some(SyncError::Apply {
                        family,
                        message: e.to_string(),
                    });
                }
                Err(join) => {
                    tracing::error!(error = %join, "apply task died");
                    failure = Some(SyncError::ApplyTask(join.to_string()));
                }
            }
        }
        let ok = failure.is_none();
        let apply_error = failure.as_ref().map(ToString::to_string);
        self.report_cnp_status(&cnp_full, &diagnostics, apply_error.as_deref())
            .await;
        let elapsed = start.elapsed();
        self.metrics
            .netpol_sync_duration
            .observe(elapsed.as_secs_f64());
        // Events (one per new diagnostic, an API call each) go out once the kernel has the
        // rules: they never delay enforcement.
        self.report_diagnostics(&diagnostics, last).await;
        self.metrics
            .netpol_syncs
            .get_or_create(&labels1("result", if ok { "applied" } else { "failed" }))
            .inc();
        if ok {
            self.record_payload_metrics(last);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            self.metrics.netpol_last_success.set(now);
        }
        failure.map_or(Ok(()), Err)
    }

    /// Revocation after an apply: deletes the conntrack entries of this node's pods' flows
    /// that `payload` (now in force) denies. Failures are logged; the rules stay applied.
    async fn revoke(
        &self,
        state: &ClusterState,
        family: Family,
        payload: &Arc<Payload>,
        last: &Mutex<LastState>,
    ) {
        let Some(ct) = self.conntrack.clone() else {
            return;
        };
        let interfaces = last
            .lock()
            .ok()
            .and_then(|l| {
                l.families
                    .get(&family)
                    .map(|f| f.compiler.config().pod_interfaces.clone())
            })
            .unwrap_or_default();
        let ctx = palisade_netpol::revoke::RevokeContext {
            local_pods: palisade_netpol::local_pod_ips(state, &self.node.node_name, family)
                .into_iter()
                .collect(),
            local_addrs: BTreeSet::new(),
            interfaces,
        };
        // The shared payload, not a copy of its rules and 10⁴ set members.
        let payload = Arc::clone(payload);
        let revoking = Arc::clone(&ct);
        let result = tokio::task::spawn_blocking(move || {
            palisade_dataplane::revoke_denied(revoking.as_ref(), &payload, ctx)
        })
        .await;
        match result {
            Ok(Ok(r)) => {
                self.metrics
                    .netpol_revoked_connections
                    .inc_by(r.deleted as u64);
                if r.deleted > 0 {
                    tracing::info!(
                        ?family,
                        deleted = r.deleted,
                        entries = r.entries,
                        ms = r.duration.as_millis() as u64,
                        "revoked connections the new rules deny"
                    );
                }
                self.sweep_resurrected(ct, family, r.revoked);
            }
            Ok(Err(e)) => {
                tracing::warn!(?family, error = %e, "revoking denied connections failed; established flows may continue until they end")
            }
            Err(e) => tracing::warn!(error = %e, "revocation task died"),
        }
    }

    /// In the background (the next apply does not wait for it): deletes, during the second
    /// after a revocation, the entries its UDP flows come back as when an answer was already
    /// on its way (`palisade_dataplane::sweep_resurrected`).
    fn sweep_resurrected(
        &self,
        ct: Arc<dyn palisade_dataplane::Conntrack>,
        family: Family,
        revoked: Vec<palisade_netpol::revoke::CtEntry>,
    ) {
        if revoked.is_empty() {
            return;
        }
        let counter = self.metrics.netpol_revoked_connections.clone();
        tokio::spawn(async move {
            let swept = tokio::task::spawn_blocking(move || {
                palisade_dataplane::sweep_resurrected(
                    ct.as_ref(),
                    family,
                    &revoked,
                    &palisade_dataplane::RESURRECTION_SWEEPS,
                )
            })
            .await;
            match swept {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => {
                    counter.inc_by(n as u64);
                    tracing::info!(
                        ?family,
                        deleted = n,
                        "revoked flows that came back as answers"
                    );
                }
                Ok(Err(e)) => tracing::warn!(?family, error = %e, "sweeping revoked flows failed"),
                Err(e) => tracing::warn!(error = %e, "revocation sweep task died"),
            }
        });
    }

    /// Rules, sets and bytes over every enforced family.
    fn record_payload_metrics(&self, last: &Mutex<LastState>) {
        let Ok(l) = last.lock() else { return };
        let (mut rules, mut sets, mut members, mut bytes) = (0, 0, 0, 0);
        for p in l.families.values().filter_map(|f| f.payload.as_ref()) {
            rules += p.stats.rules;
            sets += p.stats.sets;
            members += p.stats.members;
            bytes += p.ipset_restore.len() + p.iptables_restore.len();
        }
        let m = &self.metrics;
        m.netpol_rules.set(rules as i64);
        m.netpol_ipsets.set(sets as i64);
        m.netpol_ipset_members.set(members as i64);
        m.netpol_payload_bytes.set(bytes as i64);
    }

    /// Anti-spoofing input: the kernel's routes, neighbours and bridge FDB (`None` when off, or
    /// when the dump fails: the interfaces found last stay in force).
    async fn link_dump(&self) -> Option<palisade_dataplane::interfaces::LinkDump> {
        let links = self.links.clone().filter(|_| self.node.anti_spoofing)?;
        match tokio::task::spawn_blocking(move || links.dump()).await {
            Ok(Ok(d)) => Some(d),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read pod interfaces; keeping the last ones");
                None
            }
            Err(_) => None,
        }
    }

    async fn report_diagnostics(&self, diags: &[Diagnostic], last: &Mutex<LastState>) {
        self.metrics.netpol_diagnostics.set(diags.len() as i64);
        let unprotected = diags
            .iter()
            .filter(|d| d.reason == palisade_netpol::reasons::POD_INTERFACE_UNKNOWN)
            .count();
        self.metrics.netpol_pods_unprotected.set(unprotected as i64);
        let current: BTreeSet<_> = diags
            .iter()
            .map(|d| {
                (
                    d.kind.to_string(),
                    d.namespace.clone().unwrap_or_default(),
                    d.name.clone(),
                    format!("{}: {}", d.reason, d.message),
                )
            })
            .collect();
        let new: Vec<&Diagnostic> = {
            let Ok(mut l) = last.lock() else { return };
            let new = diags
                .iter()
                .filter(|d| {
                    !l.reported.contains(&(
                        d.kind.to_string(),
                        d.namespace.clone().unwrap_or_default(),
                        d.name.clone(),
                        format!("{}: {}", d.reason, d.message),
                    ))
                })
                .collect();
            l.reported = current;
            new
        };
        for d in new {
            let obj = ObjectReference {
                api_version: Some(
                    match d.kind {
                        "NetworkPolicy" => "networking.k8s.io/v1",
                        palisade_netpol::cnp::DIAG_KIND => palisade_netpol::cnp::API_VERSION,
                        _ => "v1",
                    }
                    .into(),
                ),
                kind: Some(d.kind.to_string()),
                namespace: d.namespace.clone(),
                name: Some(d.name.clone()),
                ..Default::default()
            };
            self.events
                .warning(&obj, d.reason, "Compile", d.message.clone())
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_netpol::builders::{cluster, mk_node, mk_node_cidrs, mk_pod, with_pod_ips};

    #[test]
    fn families_come_from_the_nodes_pod_cidrs_and_its_pods() {
        let fams = |st: &ClusterState| node_families(st, "n1").into_iter().collect::<Vec<_>>();
        // Nothing known: IPv4.
        assert_eq!(fams(&cluster(vec![], vec![], vec![], vec![])), [Family::V4]);
        let dual = mk_node_cidrs("n1", &["10.244.1.0/24", "fd00:10:1::/64"]);
        assert_eq!(
            fams(&cluster(vec![dual], vec![], vec![], vec![])),
            [Family::V4, Family::V6]
        );
        // IPv6-only node.
        let v6 = mk_node("n1", "fd00:10:1::/64");
        assert_eq!(
            fams(&cluster(vec![v6], vec![], vec![], vec![])),
            [Family::V6]
        );
        // No pod CIDRs (e.g. Calico IPAM): the local pods' addresses tell; other nodes'
        // pods do not count.
        let bare = mk_node("n1", "");
        let pods = vec![
            with_pod_ips(mk_pod("x", "a", &[], "", "n1"), &["10.244.1.5", "fd00::5"]),
            mk_pod("x", "b", &[], "fd00:2::5", "n2"),
        ];
        assert_eq!(
            fams(&cluster(vec![bare.clone()], vec![], pods, vec![])),
            [Family::V4, Family::V6]
        );
        let only_remote = vec![mk_pod("x", "b", &[], "fd00:2::5", "n2")];
        assert_eq!(
            fams(&cluster(vec![bare], vec![], only_remote, vec![])),
            [Family::V4]
        );
    }
}
