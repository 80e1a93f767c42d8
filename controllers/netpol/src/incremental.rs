//! Incremental compilation: the same output as [`crate::compile()`] + [`crate::render()`],
//! but a change that only adds, removes or updates *remote* pods patches set members
//! instead of recompiling.
//!
//! ```text
//!  sync(state) ─► same Nodes/Namespaces/Policies (by Arc identity)?  no ─► full compile+render
//!                 │ yes
//!                 ▼ pod Arcs added/removed (≤ MAX_PATCH), none local, no IP conflicts,
//!                   no named-port set turning empty/non-empty (its diagnostic would change)?
//!                 │ yes                                                no ─► full compile+render
//!                 ▼
//!  for each changed pod × each set: selector match? → add/remove its IP (or IP,port)
//!  re-render only the changed sets' text; the iptables payload is untouched
//! ```
//!
//! Objects are recognised by `Arc` pointer: the agent's reflector stores hand out the same
//! `Arc` for an unchanged object, so comparing snapshots costs one pointer hash per object.
//! The cache holds clones of those `Arc`s, so a pointer can never be reused for another
//! object while it is remembered. The result is always equal to a full compile of the same
//! state (a randomized test checks exactly that).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::ir::{Compiled, IpSet, Protocol, SetMember, SetSource};
use crate::model::{is_active, pod_ip};
use crate::render::{ipset_swap_script, render_parts};
use crate::selector::NamespaceLabels;
use crate::{compile, ClusterState, NodeConfig, Payload};

/// More changed pods than this in one step: recompile (patching is no longer cheaper).
pub const MAX_PATCH: usize = 256;

/// How the last [`IncrementalCompiler::sync`] produced its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Nothing changed since the previous call.
    Unchanged,
    /// Remote pod churn applied to set members.
    Patched,
    /// Full compile and render.
    Full,
}

/// Compiles a stream of cluster snapshots for one node, patching set members on remote pod
/// churn. See the module docs.
#[derive(Debug)]
pub struct IncrementalCompiler {
    cfg: NodeConfig,
    cache: Option<Cache>,
    mode: SyncMode,
}

#[derive(Debug)]
struct Cache {
    compiled: Compiled,
    payload: Payload,
    /// Rendered ipset text per set (concatenated in name order = `payload.ipset_restore`).
    set_text: BTreeMap<String, String>,
    /// Pod Arcs of the snapshot, by pointer.
    pods: HashMap<usize, Arc<Pod>>,
    /// hash(namespace/name) of every pod → pointer (to detect duplicates; a hash collision
    /// only costs a full compile).
    pod_names: HashMap<u64, usize>,
    /// Nodes, namespaces and policies of the snapshot (compared by pointer; holding the Arcs
    /// keeps the pointers from being reused).
    keep: ClusterState,
    /// Namespace labels as the compiler saw them (last object with a name wins).
    namespaces: HashMap<String, Arc<Namespace>>,
    /// Active pods per IP.
    ip_count: HashMap<IpAddr, u32>,
    /// Two different pods share a name hash: never patch this cache.
    collision: bool,
}

fn ptr<T>(a: &Arc<T>) -> usize {
    Arc::as_ptr(a) as usize
}

fn other_ptrs(s: &ClusterState) -> Vec<usize> {
    // Arcs of different kinds never share an address while alive.
    let mut v: Vec<usize> = s
        .nodes
        .iter()
        .map(ptr)
        .chain(s.namespaces.iter().map(ptr))
        .chain(s.policies.iter().map(ptr))
        .chain(s.cluster_policies.iter().map(ptr))
        .collect();
    v.sort_unstable();
    v
}

/// What the compiler takes from a pod for set membership.
enum Facts {
    /// Not a set member (finished, host network, no IP of the family).
    Inactive,
    Active(IpAddr),
    /// Needs a full compile (local pod, unparsable IP, missing name).
    Full,
}

impl IncrementalCompiler {
    pub fn new(cfg: NodeConfig) -> Self {
        IncrementalCompiler {
            cfg,
            cache: None,
            mode: SyncMode::Full,
        }
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// How the last [`IncrementalCompiler::sync`] worked.
    pub fn last_mode(&self) -> SyncMode {
        self.mode
    }

    /// The payload of the last sync.
    pub fn payload(&self) -> Option<&Payload> {
        self.cache.as_ref().map(|c| &c.payload)
    }

    /// The compiled IR of the last sync (diagnostics included).
    pub fn compiled(&self) -> Option<&Compiled> {
        self.cache.as_ref().map(|c| &c.compiled)
    }

    /// Replaces the local pods' interfaces (anti-spoofing input). A change forces a full
    /// compile on the next sync; an equal map changes nothing.
    pub fn set_pod_interfaces(
        &mut self,
        interfaces: std::collections::BTreeMap<IpAddr, crate::PodInterface>,
    ) {
        if self.cfg.pod_interfaces != interfaces {
            self.cfg.pod_interfaces = interfaces;
            self.cache = None;
        }
    }

    /// Forgets everything: the next sync is a full compile.
    pub fn reset(&mut self) {
        self.cache = None;
    }

    /// Brings the output up to date with `state` and returns the payload (equal to
    /// `render(&compile(state, cfg))`).
    pub fn sync(&mut self, state: &ClusterState) -> &Payload {
        let (cache, mode) = match self.cache.take() {
            Some(mut cache) => match cache.patch(state, &self.cfg) {
                Some(mode) => (cache, mode),
                None => (Cache::full(state, &self.cfg), SyncMode::Full),
            },
            None => (Cache::full(state, &self.cfg), SyncMode::Full),
        };
        self.mode = mode;
        &self.cache.insert(cache).payload
    }
}

impl Cache {
    fn full(state: &ClusterState, cfg: &NodeConfig) -> Cache {
        let compiled = compile(state, cfg);
        let mut set_text = BTreeMap::new();
        let payload = render_parts(&compiled, Some(&mut set_text));
        let mut namespaces = HashMap::new();
        for n in &state.namespaces {
            if let Some(name) = n.metadata.name.as_deref() {
                namespaces.insert(name.to_string(), n.clone());
            }
        }
        let mut pods = HashMap::with_capacity(state.pods.len());
        let mut pod_names = HashMap::with_capacity(state.pods.len());
        let mut ip_count: HashMap<IpAddr, u32> = HashMap::new();
        let mut collision = false;
        for p in &state.pods {
            pods.insert(ptr(p), p.clone());
            if let Some(old) = pod_names.insert(pod_key(p), ptr(p)) {
                let same = |a: &Pod, b: &Pod| {
                    a.metadata.namespace == b.metadata.namespace
                        && a.metadata.name == b.metadata.name
                };
                collision |= pods.get(&old).is_some_and(|o| !same(o, p));
            }
        }
        // Count over the de-duplicated view the compiler used (last object wins).
        for &pp in pod_names.values() {
            let ip = pods
                .get(&pp)
                .filter(|p| is_active(p) && p.metadata.namespace.is_some())
                .and_then(|p| pod_ip(p, cfg.family).ok().flatten());
            if let Some(ip) = ip {
                *ip_count.entry(ip).or_default() += 1;
            }
        }
        Cache {
            compiled,
            payload,
            set_text,
            pods,
            pod_names,
            keep: ClusterState {
                nodes: state.nodes.clone(),
                namespaces: state.namespaces.clone(),
                pods: Vec::new(),
                policies: state.policies.clone(),
                cluster_policies: state.cluster_policies.clone(),
            },
            namespaces,
            ip_count,
            collision,
        }
    }

    /// `None`: a full compile is needed.
    fn patch(&mut self, state: &ClusterState, cfg: &NodeConfig) -> Option<SyncMode> {
        if self.collision || other_ptrs(state) != other_ptrs(&self.keep) {
            return None;
        }
        let new: HashSet<usize> = state.pods.iter().map(ptr).collect();
        if new.len() != state.pods.len() {
            return None; // the same Arc twice
        }
        let removed: Vec<usize> = self
            .pods
            .keys()
            .filter(|p| !new.contains(*p))
            .copied()
            .collect();
        let added: Vec<&Arc<Pod>> = state
            .pods
            .iter()
            .filter(|p| !self.pods.contains_key(&ptr(p)))
            .collect();
        if removed.is_empty() && added.is_empty() {
            return Some(SyncMode::Unchanged);
        }
        if removed.len() + added.len() > MAX_PATCH {
            return None;
        }

        // Classify; any local pod, bad IP, duplicate name or shared IP → full compile.
        let mut ip_count = self.ip_count.clone();
        let mut names = self.pod_names.clone();
        let mut out: Vec<(Arc<Pod>, IpAddr)> = Vec::new();
        let mut inn: Vec<(Arc<Pod>, IpAddr)> = Vec::new();
        for p in &removed {
            let pod = self.pods.get(p)?.clone();
            if names.remove(&pod_key(&pod)) != Some(*p) {
                return None;
            }
            match facts(&pod, cfg) {
                Facts::Full => return None,
                Facts::Inactive => {}
                Facts::Active(ip) => {
                    let c = ip_count.get_mut(&ip)?;
                    if *c != 1 {
                        return None;
                    }
                    ip_count.remove(&ip);
                    out.push((pod, ip));
                }
            }
        }
        for pod in &added {
            if names.insert(pod_key(pod), ptr(pod)).is_some() {
                return None;
            }
            match facts(pod, cfg) {
                Facts::Full => return None,
                Facts::Inactive => {}
                Facts::Active(ip) => {
                    if ip_count.insert(ip, 1).is_some() {
                        return None;
                    }
                    inn.push(((*pod).clone(), ip));
                }
            }
        }

        // New members of every affected set (committed only if all checks pass).
        let mut changed: Vec<IpSet> = Vec::new();
        for (name, source) in &self.compiled.sources {
            let set = self.compiled.sets.get(name)?;
            let mut members: Option<BTreeSet<SetMember>> = None;
            for (list, add) in [(&out, false), (&inn, true)] {
                for (pod, ip) in list.iter() {
                    for m in self.members_of(source, pod, *ip) {
                        let ms = members.get_or_insert_with(|| set.members.clone());
                        if add {
                            ms.insert(m);
                        } else {
                            ms.remove(&m);
                        }
                    }
                }
            }
            let Some(members) = members else { continue };
            if members == set.members {
                continue;
            }
            if matches!(source, SetSource::NamedPort { .. })
                && members.is_empty() != set.members.is_empty()
            {
                return None; // the UnknownNamedPort diagnostic would change
            }
            let mut s = set.clone();
            s.members = members;
            changed.push(s);
        }

        // Commit.
        for p in &removed {
            self.pods.remove(p);
        }
        for pod in added {
            self.pods.insert(ptr(pod), pod.clone());
        }
        self.pod_names = names;
        self.ip_count = ip_count;
        for s in changed {
            let mut t = String::new();
            ipset_swap_script(&mut t, &s);
            self.set_text.insert(s.name.clone(), t);
            if let Ok(i) = self
                .payload
                .set_specs
                .binary_search_by(|x| x.name.as_str().cmp(&s.name))
            {
                self.payload.set_specs[i] = s.clone();
            }
            self.compiled.sets.insert(s.name.clone(), s);
        }
        let mut ips = String::with_capacity(self.payload.ipset_restore.len() + 64);
        for t in self.set_text.values() {
            ips.push_str(t);
        }
        self.payload.ipset_restore = ips;
        self.payload.stats.members = self.compiled.sets.values().map(|s| s.members.len()).sum();
        self.payload.stats.bytes =
            self.payload.ipset_restore.len() + self.payload.iptables_restore.len();
        Some(SyncMode::Patched)
    }

    /// The members `pod` (active, with `ip`) contributes to a set of `source`.
    fn members_of(&self, source: &SetSource, pod: &Pod, ip: IpAddr) -> Vec<SetMember> {
        match source {
            SetSource::Block => Vec::new(),
            SetSource::Pods { namespaces, pods } => {
                let ns = pod.metadata.namespace.as_deref().unwrap_or("");
                let ns_labels = NamespaceLabels {
                    name: ns,
                    labels: self
                        .namespaces
                        .get(ns)
                        .map(|n| n.metadata.labels.as_ref().unwrap_or(&EMPTY)),
                };
                let labels = pod.metadata.labels.as_ref().unwrap_or(&EMPTY);
                if namespaces.matches(&ns_labels) && pods.matches(labels) {
                    vec![SetMember::Ip(ip)]
                } else {
                    Vec::new()
                }
            }
            SetSource::NamedPort { proto, name } => named_ports(pod)
                .filter(|(p, n, _)| p == proto && n == name)
                .map(|(_, _, port)| SetMember::IpPort {
                    ip,
                    proto: *proto,
                    port,
                })
                .collect(),
        }
    }
}

static EMPTY: BTreeMap<String, String> = BTreeMap::new();

fn pod_key(p: &Pod) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.metadata.namespace.as_deref().unwrap_or("").hash(&mut h);
    p.metadata.name.as_deref().unwrap_or("").hash(&mut h);
    h.finish()
}

fn facts(pod: &Pod, cfg: &NodeConfig) -> Facts {
    if pod.metadata.namespace.is_none() || pod.metadata.name.is_none() {
        return Facts::Full;
    }
    let local =
        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(cfg.node_name.as_str());
    if local {
        return Facts::Full;
    }
    if !is_active(pod) {
        return Facts::Inactive;
    }
    match pod_ip(pod, cfg.family) {
        Ok(Some(ip)) => Facts::Active(ip),
        Ok(None) => Facts::Inactive,
        Err(_) => Facts::Full,
    }
}

/// (protocol, name, port) of the pod's named container ports, as the compiler indexes them.
fn named_ports(pod: &Pod) -> impl Iterator<Item = (Protocol, &str, u16)> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|cp| {
            let name = cp.name.as_deref()?;
            let port = u16::try_from(cp.container_port).ok().filter(|p| *p != 0)?;
            let proto = Protocol::parse(cp.protocol.as_deref())?;
            Some((proto, name, port))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::*;
    use serde_json::json;

    /// xorshift64*
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn random_pod(rng: &mut Rng, serial: usize) -> Pod {
        let ns = ["a", "b", "c", "ghost"][rng.below(4)];
        let app = ["web", "db", "api"][rng.below(3)];
        // Mostly remote; sometimes local, finished, IP-less, host-network or IP-sharing.
        let node = if rng.below(10) == 0 { "n1" } else { "n2" };
        let ip = match rng.below(20) {
            0 => String::new(),
            1 => "10.9.9.9".to_string(),
            _ => format!(
                "10.{}.{}.{}",
                1 + rng.below(2),
                rng.below(4),
                1 + serial % 250
            ),
        };
        let mut pod = mk_pod(ns, &format!("{app}-{serial}"), &[("app", app)], &ip, node);
        if rng.below(2) == 0 {
            pod = with_ports(pod, &[("http", 8000 + rng.below(3) as i32, "TCP")]);
        }
        match rng.below(25) {
            0 => with_phase(pod, "Succeeded"),
            1 => with_host_network(pod),
            _ => pod,
        }
    }

    fn policies() -> Vec<k8s_openapi::api::networking::v1::NetworkPolicy> {
        vec![
            mk_policy(
                "a",
                "web",
                json!({"podSelector": {}, "ingress": [
                    {"from": [{"namespaceSelector": {"matchLabels": {"team": "x"}}, "podSelector": {"matchLabels": {"app": "web"}}}],
                     "ports": [{"port": "http"}]},
                    {"from": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]}}]}
                ]}),
            ),
            mk_policy(
                "a",
                "egress",
                json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [
                    {"to": [{"namespaceSelector": {}}], "ports": [{"port": "http"}]},
                    {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.2.0.0/16"]}}]}
                ]}),
            ),
        ]
    }

    #[test]
    fn patched_output_equals_a_full_compile() {
        let mut rng = Rng(0x1234_5678_9ABC_DEF1);
        let base = cluster(
            vec![mk_node("n1", "10.1.0.0/24")],
            vec![
                mk_ns("a", &[("team", "x")]),
                mk_ns("b", &[("team", "x")]),
                mk_ns("c", &[]),
            ],
            vec![
                mk_pod("a", "local-1", &[("app", "web")], "10.1.0.5", "n1"),
                mk_pod("a", "local-2", &[("app", "db")], "10.1.0.6", "n1"),
            ],
            policies(),
        );
        let mut state = base.clone();
        let cfg = NodeConfig::new("n1");
        let mut inc = IncrementalCompiler::new(cfg.clone());
        let mut serial = 0;
        let mut modes: BTreeMap<String, usize> = BTreeMap::new();
        for step in 0..400 {
            // Churn: add, remove or replace a few pods (by Arc), sometimes nothing.
            for _ in 0..rng.below(4) {
                match rng.below(3) {
                    0 if state.pods.len() > 2 => {
                        let i = rng.below(state.pods.len());
                        state.pods.remove(i);
                    }
                    1 if !state.pods.is_empty() => {
                        let i = rng.below(state.pods.len());
                        let mut p = (*state.pods[i]).clone();
                        if let Some(l) = p.metadata.labels.as_mut() {
                            l.insert("app".into(), ["web", "db", "api"][rng.below(3)].into());
                        }
                        state.pods[i] = Arc::new(p);
                    }
                    _ => {
                        serial += 1;
                        state.pods.push(Arc::new(random_pod(&mut rng, serial)));
                    }
                }
            }
            if step % 97 == 96 {
                // Occasionally a namespace relabel: must fall back to a full compile.
                state.namespaces[2] = Arc::new(mk_ns("c", &[("team", "x")]));
            }
            let got = inc.sync(&state).clone();
            *modes.entry(format!("{:?}", inc.last_mode())).or_default() += 1;
            let full = compile(&state, &cfg);
            let want = crate::render(&full);
            assert!(
                got == want,
                "step {step}: payload differs ({:?})",
                inc.last_mode()
            );
            assert_eq!(
                inc.compiled().map(|c| &c.diagnostics),
                Some(&full.diagnostics)
            );
            assert!(inc.compiled() == Some(&full), "step {step}: IR differs");
        }
        assert!(
            modes.get("Patched").copied().unwrap_or(0) > 100,
            "{modes:?}"
        );
        assert!(modes.get("Full").copied().unwrap_or(0) > 10, "{modes:?}");
    }
}
