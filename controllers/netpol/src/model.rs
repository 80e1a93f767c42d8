//! The policy model: API objects → the few facts the compiler needs, validated once.
//!
//! Everything here borrows from the [`ClusterState`] snapshot (no label maps are cloned), so
//! building the model for 10k pods is cheap. Problems become [`Diagnostic`]s and fail closed:
//! an invalid peer or port matches nothing, a rule with an unsupported protocol is dropped
//! (the pod stays isolated), and nothing here can panic on input data.
//!
//! Rules of the API we encode here:
//! - Pods in phase Succeeded/Failed, host-network pods and pods without an IP of the family
//!   are not *active*: never isolated, never a set member.
//! - `policyTypes` absent ⇒ Ingress, plus Egress iff `egress` is non-empty.
//! - `from`/`to` absent or empty ⇒ every peer (`peers: None`); `ports` likewise.
//! - A peer with only `podSelector` means pods of the policy's namespace; with only
//!   `namespaceSelector`, all pods of matching namespaces; with both, the AND.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::str::FromStr;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::sync::Arc;

pub(crate) use crate::ir::normalize;
use crate::ir::Protocol;
use crate::reasons;
use crate::selector::Selector;
use crate::{ClusterState, Diagnostic, Family, NodeConfig};

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// An active pod with an IP of the compiled family.
#[derive(Debug)]
pub(crate) struct PodInfo<'a> {
    pub ns: &'a str,
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub ip: IpAddr,
    pub local: bool,
    pub pod: &'a Pod,
}

impl PodInfo<'_> {
    /// The container port declared under `name` for `proto`, if any.
    pub fn named_port(&self, name: &str, proto: Protocol) -> Option<u16> {
        let spec = self.pod.spec.as_ref()?;
        spec.containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| {
                p.name.as_deref() == Some(name)
                    && Protocol::parse(p.protocol.as_deref()) == Some(proto)
            })
            .and_then(|p| u16::try_from(p.container_port).ok())
            .filter(|p| *p != 0)
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }
}

/// Port part of a rule entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum PortSel {
    /// Every port of the protocol.
    All,
    /// `port` .. `endPort` inclusive (equal for a single port).
    Range(u16, u16),
    /// A container port name, resolved per destination pod.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct PortInfo {
    pub proto: Protocol,
    pub port: PortSel,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Peer {
    /// Pods matching `pods` in namespaces matching `namespaces`.
    Pods {
        namespaces: Selector,
        pods: Selector,
    },
    /// An ipBlock (network addresses normalized, same family as the payload).
    Block {
        cidr: IpNetwork,
        except: Vec<IpNetwork>,
    },
}

/// One ingress or egress rule.
#[derive(Clone, Debug)]
pub(crate) struct RuleInfo {
    /// Position in the policy's rule list (for comments).
    pub index: usize,
    /// `None`: every peer. `Some(empty)`: nothing (every listed peer was invalid or of
    /// another family).
    pub peers: Option<Vec<Peer>>,
    /// `None`: every port. `Some(empty)`: nothing.
    pub ports: Option<Vec<PortInfo>>,
}

#[derive(Debug)]
pub(crate) struct PolicyInfo<'a> {
    pub ns: &'a str,
    pub name: &'a str,
    pub selector: Selector,
    /// `Some` iff the policy has policy type Ingress.
    pub ingress: Option<Vec<RuleInfo>>,
    /// `Some` iff the policy has policy type Egress.
    pub egress: Option<Vec<RuleInfo>>,
    /// Annotated `palisade.dev/enforcement: audit`: evaluated and logged, never enforced.
    pub audit: bool,
}

impl PolicyInfo<'_> {
    pub fn key(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }
}

/// The validated view of one [`ClusterState`] for one node and family.
pub(crate) struct Model<'a> {
    pub family: Family,
    /// Active pods, sorted by namespace/name.
    pub pods: Vec<PodInfo<'a>>,
    /// Indexes into `pods`, by namespace (sorted).
    pub pods_by_ns: BTreeMap<&'a str, Vec<usize>>,
    /// Labels of the Namespace objects we have.
    pub ns_labels: HashMap<&'a str, &'a BTreeMap<String, String>>,
    /// Indexes into `pods` of this node's pods.
    pub local: Vec<usize>,
    /// This node's pod CIDRs of the family.
    pub pod_cidrs: Vec<IpNetwork>,
    /// Valid policies, sorted by namespace/name.
    pub policies: Vec<PolicyInfo<'a>>,
    pub policies_by_ns: HashMap<&'a str, Vec<usize>>,
    /// Valid ClusterNetworkPolicies, sorted by tier, priority, name.
    pub cnps: Vec<crate::cnp::CnpInfo<'a>>,
    /// Every Node object (for `nodes` peers of ClusterNetworkPolicies).
    pub nodes: &'a [Arc<k8s_openapi::api::core::v1::Node>],
}

/// Sorts by namespace/name and drops duplicates (the later one in `items` wins), without
/// allocating keys. Groups by namespace first so only small groups are sorted by name.
fn sorted_unique<T>(items: &[Arc<T>], meta: fn(&T) -> &ObjectMeta) -> Vec<&T> {
    let mut groups: HashMap<&str, Vec<(usize, &T)>> = HashMap::new();
    for (i, it) in items.iter().enumerate() {
        let ns = meta(it).namespace.as_deref().unwrap_or("");
        groups.entry(ns).or_default().push((i, &**it));
    }
    let mut namespaces: Vec<&str> = groups.keys().copied().collect();
    namespaces.sort_unstable();
    fn name<T>(t: &T, meta: fn(&T) -> &ObjectMeta) -> &str {
        meta(t).name.as_deref().unwrap_or("")
    }
    let mut out = Vec::with_capacity(items.len());
    for ns in namespaces {
        let Some(mut group) = groups.remove(ns) else {
            continue;
        };
        group.sort_unstable_by(|a, b| name(a.1, meta).cmp(name(b.1, meta)).then(a.0.cmp(&b.0)));
        for (i, (_, item)) in group.iter().enumerate() {
            let superseded = group
                .get(i + 1)
                .is_some_and(|(_, next)| name(*next, meta) == name(*item, meta));
            if !superseded {
                out.push(*item);
            }
        }
    }
    out
}

impl<'a> Model<'a> {
    pub fn build(state: &'a ClusterState, cfg: &NodeConfig, diags: &mut Vec<Diagnostic>) -> Self {
        let family = cfg.family;

        let namespaces = sorted_unique(&state.namespaces, |n: &Namespace| &n.metadata);
        let ns_labels: HashMap<&str, &BTreeMap<String, String>> = namespaces
            .iter()
            .filter_map(|n| {
                let name = n.metadata.name.as_deref()?;
                Some((name, n.metadata.labels.as_ref().unwrap_or(&NO_LABELS)))
            })
            .collect();

        let pod_cidrs = node_pod_cidrs(state, cfg, diags);

        let mut pods = Vec::new();
        let mut seen_ips: HashMap<IpAddr, (&str, &str)> = HashMap::with_capacity(state.pods.len());
        for pod in sorted_unique(&state.pods, |p: &Pod| &p.metadata) {
            let (Some(ns), Some(name)) = (
                pod.metadata.namespace.as_deref(),
                pod.metadata.name.as_deref(),
            ) else {
                continue;
            };
            if !is_active(pod) {
                continue;
            }
            let spec = pod.spec.as_ref();
            let local = spec.and_then(|s| s.node_name.as_deref()) == Some(cfg.node_name.as_str());
            let ip = match pod_ip(pod, family) {
                Ok(Some(ip)) => ip,
                Ok(None) => {
                    if local {
                        diags.push(diag_pod(
                            ns,
                            name,
                            reasons::POD_WITHOUT_IP,
                            format!(
                                "no IPv{} address yet; the pod is not programmed",
                                family.tag()
                            ),
                        ));
                    }
                    continue;
                }
                Err(bad) => {
                    diags.push(diag_pod(
                        ns,
                        name,
                        reasons::INVALID_POD_IP,
                        format!(
                            "pod IP {bad:?} does not parse or is not a unicast host address; \
                             the pod is ignored"
                        ),
                    ));
                    continue;
                }
            };
            if let Some((ons, oname)) = seen_ips.get(&ip) {
                diags.push(diag_pod(
                    ns,
                    name,
                    reasons::DUPLICATE_POD_IP,
                    format!("IP {ip} is also claimed by pod {ons}/{oname}"),
                ));
            } else {
                seen_ips.insert(ip, (ns, name));
            }
            pods.push(PodInfo {
                ns,
                name,
                labels: pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS),
                ip,
                local,
                pod,
            });
        }
        let mut pods_by_ns: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        let mut local = Vec::new();
        let mut run: Option<(&str, Vec<usize>)> = None;
        for (i, p) in pods.iter().enumerate() {
            // Pods are sorted by namespace: collect runs, one map insert per namespace.
            match &mut run {
                Some((ns, list)) if *ns == p.ns => list.push(i),
                _ => {
                    if let Some((ns, list)) = run.replace((p.ns, vec![i])) {
                        pods_by_ns.insert(ns, list);
                    }
                }
            }
            if p.local {
                local.push(i);
            }
        }
        if let Some((ns, list)) = run {
            pods_by_ns.insert(ns, list);
        }

        let mut policies = Vec::new();
        for np in sorted_unique(&state.policies, |p: &NetworkPolicy| &p.metadata) {
            if let Some(p) = policy_info(np, family, diags) {
                policies.push(p);
            }
        }
        let mut policies_by_ns: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, p) in policies.iter().enumerate() {
            policies_by_ns.entry(p.ns).or_default().push(i);
        }

        let cnps = crate::cnp::validate_all(&state.cluster_policies, family, diags);
        Model {
            family,
            pods,
            pods_by_ns,
            ns_labels,
            local,
            pod_cidrs,
            policies,
            policies_by_ns,
            cnps,
            nodes: &state.nodes,
        }
    }
}

fn diag_pod(ns: &str, name: &str, reason: &'static str, message: String) -> Diagnostic {
    Diagnostic {
        kind: "Pod",
        namespace: Some(ns.to_string()),
        name: name.to_string(),
        reason,
        message,
    }
}

/// Not finished (Succeeded/Failed) and not on the host network. An active pod with an IP
/// is isolated (if local) and can be a set member.
pub(crate) fn is_active(pod: &Pod) -> bool {
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    let host = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    !finished && !host
}

/// Whether `ip` can be a host's unicast address in a rule or a set: not unspecified
/// (`0.0.0.0`, `::`, which `ipset` refuses and would fail the whole payload), loopback,
/// multicast, the IPv4 broadcast address, or an IPv4-mapped IPv6 address (the IPv4 address
/// in disguise: it would escape the IPv4 rules).
pub(crate) fn usable_host_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified() || v4.is_loopback() || v4.is_multicast() || v4.is_broadcast())
        }
        IpAddr::V6(v6) => {
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || v6.to_ipv4_mapped().is_some())
        }
    }
}

/// The pod's IP of `family`: `status.podIPs` first, then `status.podIP`.
/// `Err(text)` when an address does not parse or cannot be a pod's ([`usable_host_ip`]).
pub(crate) fn pod_ip(pod: &Pod, family: Family) -> Result<Option<IpAddr>, String> {
    let Some(status) = pod.status.as_ref() else {
        return Ok(None);
    };
    let candidates = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(status.pod_ip.as_deref());
    let mut bad = None;
    for c in candidates {
        if c.is_empty() {
            continue;
        }
        match IpAddr::from_str(c) {
            Ok(ip) if !usable_host_ip(ip) => bad = Some(c.to_string()),
            Ok(ip) if family.contains(ip) => return Ok(Some(ip)),
            Ok(_) => {}
            Err(_) => bad = Some(c.to_string()),
        }
    }
    match bad {
        Some(b) => Err(b),
        None => Ok(None),
    }
}

fn node_pod_cidrs(
    state: &ClusterState,
    cfg: &NodeConfig,
    diags: &mut Vec<Diagnostic>,
) -> Vec<IpNetwork> {
    let mut out: Vec<IpNetwork> = cfg
        .extra_pod_cidrs
        .iter()
        .filter(|n| family_of(**n) == cfg.family)
        .map(|n| normalize(*n))
        .collect();
    let node = state
        .nodes
        .iter()
        .rev()
        .find(|n| n.metadata.name.as_deref() == Some(cfg.node_name.as_str()));
    match node {
        None => {
            if cfg.block_unknown_pods && out.is_empty() {
                diags.push(Diagnostic {
                    kind: "Node",
                    namespace: None,
                    name: cfg.node_name.clone(),
                    reason: reasons::NODE_NOT_FOUND,
                    message: "no Node object for this node: its pod CIDRs are unknown, so \
                              traffic of not-yet-known local pods is not blocked"
                        .into(),
                });
            }
        }
        Some(node) => {
            let spec = node.spec.as_ref();
            let cidrs: Vec<&str> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
                Some(list) if !list.is_empty() => list.iter().map(String::as_str).collect(),
                _ => spec
                    .and_then(|s| s.pod_cidr.as_deref())
                    .into_iter()
                    .collect(),
            };
            for c in cidrs {
                match IpNetwork::from_str(c) {
                    Ok(n) if family_of(n) == cfg.family => out.push(normalize(n)),
                    Ok(_) => {}
                    Err(e) => diags.push(Diagnostic {
                        kind: "Node",
                        namespace: None,
                        name: cfg.node_name.clone(),
                        reason: reasons::INVALID_POD_CIDR,
                        message: format!("pod CIDR {c:?}: {e}"),
                    }),
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

pub(crate) fn family_of(n: IpNetwork) -> Family {
    match n {
        IpNetwork::V4(_) => Family::V4,
        IpNetwork::V6(_) => Family::V6,
    }
}

fn diag_policy(np: &NetworkPolicy, reason: &'static str, message: String) -> Diagnostic {
    Diagnostic {
        kind: "NetworkPolicy",
        namespace: np.metadata.namespace.clone(),
        name: np.metadata.name.clone().unwrap_or_default(),
        reason,
        message,
    }
}

fn policy_info<'a>(
    np: &'a NetworkPolicy,
    family: Family,
    diags: &mut Vec<Diagnostic>,
) -> Option<PolicyInfo<'a>> {
    let ns = np.metadata.namespace.as_deref()?;
    let name = np.metadata.name.as_deref()?;
    static DEFAULT_SPEC: NetworkPolicySpec = NetworkPolicySpec {
        egress: None,
        ingress: None,
        pod_selector: None,
        policy_types: None,
    };
    let spec = np.spec.as_ref().unwrap_or(&DEFAULT_SPEC);
    let selector = match Selector::from_api(spec.pod_selector.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            diags.push(diag_policy(
                np,
                reasons::INVALID_SELECTOR,
                format!("spec.podSelector: {e}; the policy is ignored"),
            ));
            return None;
        }
    };
    let egress_rules = spec.egress.as_deref().unwrap_or_default();
    let ingress_rules = spec.ingress.as_deref().unwrap_or_default();
    let (mut has_ingress, mut has_egress) = (false, false);
    match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => {
            for t in types {
                match t.as_str() {
                    "Ingress" => has_ingress = true,
                    "Egress" => has_egress = true,
                    other => diags.push(diag_policy(
                        np,
                        reasons::UNKNOWN_POLICY_TYPE,
                        format!("policyTypes entry {other:?} is ignored"),
                    )),
                }
            }
        }
        _ => {
            has_ingress = true;
            has_egress = !egress_rules.is_empty();
        }
    }
    let ctx = RuleCtx { np, ns, family };
    let ingress = has_ingress.then(|| {
        ingress_rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                ctx.rule("ingress", i, r.from.as_deref(), r.ports.as_deref(), diags)
            })
            .collect()
    });
    let egress = has_egress.then(|| {
        egress_rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| ctx.rule("egress", i, r.to.as_deref(), r.ports.as_deref(), diags))
            .collect()
    });
    let audit = np
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(crate::ENFORCEMENT_ANNOTATION))
        .is_some_and(|v| v == "audit");
    Some(PolicyInfo {
        ns,
        name,
        selector,
        ingress,
        egress,
        audit,
    })
}

struct RuleCtx<'a> {
    np: &'a NetworkPolicy,
    ns: &'a str,
    family: Family,
}

impl RuleCtx<'_> {
    /// `None` when the whole rule must be skipped.
    fn rule(
        &self,
        dir: &str,
        index: usize,
        peers: Option<&[NetworkPolicyPeer]>,
        ports: Option<&[NetworkPolicyPort]>,
        diags: &mut Vec<Diagnostic>,
    ) -> Option<RuleInfo> {
        let field = if dir == "ingress" { "from" } else { "to" };
        let ports = match ports {
            None | Some([]) => None,
            Some(list) => {
                let mut out = Vec::new();
                for (j, p) in list.iter().enumerate() {
                    let at = || format!("spec.{dir}[{index}].ports[{j}]");
                    let Some(proto) = Protocol::parse(p.protocol.as_deref()) else {
                        diags.push(diag_policy(
                            self.np,
                            reasons::UNSUPPORTED_PROTOCOL,
                            format!(
                                "{}: protocol {:?} is not supported (TCP, UDP, SCTP); \
                                 the whole rule is skipped",
                                at(),
                                p.protocol.as_deref().unwrap_or_default()
                            ),
                        ));
                        return None;
                    };
                    match port_sel(p) {
                        Ok(port) => out.push(PortInfo { proto, port }),
                        Err(msg) => diags.push(diag_policy(
                            self.np,
                            reasons::INVALID_PORT,
                            format!("{}: {msg}; this port entry matches nothing", at()),
                        )),
                    }
                }
                out.sort();
                out.dedup();
                Some(out)
            }
        };
        let peers = match peers {
            None | Some([]) => None,
            Some(list) => {
                let mut out = Vec::new();
                // Repeated peers once, in order (a set: a rule may list thousands).
                let mut seen = std::collections::HashSet::new();
                for (j, p) in list.iter().enumerate() {
                    let at = || format!("spec.{dir}[{index}].{field}[{j}]");
                    if let Some(peer) = self.peer(p, &at, diags) {
                        if seen.insert(peer.clone()) {
                            out.push(peer);
                        }
                    }
                }
                Some(out)
            }
        };
        Some(RuleInfo {
            index,
            peers,
            ports,
        })
    }

    fn peer(
        &self,
        p: &NetworkPolicyPeer,
        at: &dyn Fn() -> String,
        diags: &mut Vec<Diagnostic>,
    ) -> Option<Peer> {
        let has_selector = p.pod_selector.is_some() || p.namespace_selector.is_some();
        if let Some(block) = &p.ip_block {
            if has_selector {
                diags.push(diag_policy(
                    self.np,
                    reasons::INVALID_PEER,
                    format!(
                        "{}: ipBlock cannot be combined with selectors; the peer matches nothing",
                        at()
                    ),
                ));
                return None;
            }
            let bad = |msg: String, diags: &mut Vec<Diagnostic>| {
                diags.push(diag_policy(
                    self.np,
                    reasons::INVALID_IP_BLOCK,
                    format!("{}.ipBlock: {msg}; the peer matches nothing", at()),
                ));
            };
            let cidr = match IpNetwork::from_str(block.cidr.trim()) {
                Ok(c) => normalize(c),
                Err(e) => {
                    bad(format!("cidr {:?}: {e}", block.cidr), diags);
                    return None;
                }
            };
            let mut except = Vec::new();
            for e in block.except.iter().flatten() {
                match IpNetwork::from_str(e.trim()) {
                    Ok(x)
                        if family_of(x) == family_of(cidr)
                            && x.prefix() >= cidr.prefix()
                            && cidr.contains(x.network()) =>
                    {
                        except.push(normalize(x))
                    }
                    Ok(_) => {
                        bad(format!("except {e:?} is not inside cidr {cidr}"), diags);
                        return None;
                    }
                    Err(err) => {
                        bad(format!("except {e:?}: {err}"), diags);
                        return None;
                    }
                }
            }
            if family_of(cidr) != self.family {
                // Valid, but for the other family's payload.
                return None;
            }
            except.sort();
            except.dedup();
            return Some(Peer::Block { cidr, except });
        }
        if !has_selector {
            diags.push(diag_policy(
                self.np,
                reasons::INVALID_PEER,
                format!("{}: a peer needs podSelector, namespaceSelector or ipBlock; it matches nothing", at()),
            ));
            return None;
        }
        let namespaces = match &p.namespace_selector {
            None => Selector::namespace_named(self.ns),
            Some(s) => match Selector::from_api(Some(s)) {
                Ok(s) => s,
                Err(e) => {
                    diags.push(diag_policy(
                        self.np,
                        reasons::INVALID_SELECTOR,
                        format!("{}.namespaceSelector: {e}; the peer matches nothing", at()),
                    ));
                    return None;
                }
            },
        };
        let pods = match Selector::from_api(p.pod_selector.as_ref()) {
            Ok(s) => s,
            Err(e) => {
                diags.push(diag_policy(
                    self.np,
                    reasons::INVALID_SELECTOR,
                    format!("{}.podSelector: {e}; the peer matches nothing", at()),
                ));
                return None;
            }
        };
        Some(Peer::Pods { namespaces, pods })
    }
}

fn port_sel(p: &NetworkPolicyPort) -> Result<PortSel, String> {
    let in_range = |n: i32| u16::try_from(n).ok().filter(|n| *n != 0);
    match (&p.port, p.end_port) {
        (None, None) => Ok(PortSel::All),
        (None, Some(_)) => Err("endPort requires port".into()),
        (Some(IntOrString::Int(n)), end) => {
            let lo = in_range(*n).ok_or_else(|| format!("port {n} is out of range 1-65535"))?;
            match end {
                None => Ok(PortSel::Range(lo, lo)),
                Some(e) => {
                    let hi = in_range(e)
                        .ok_or_else(|| format!("endPort {e} is out of range 1-65535"))?;
                    if hi < lo {
                        Err(format!("endPort {hi} is below port {lo}"))
                    } else {
                        Ok(PortSel::Range(lo, hi))
                    }
                }
            }
        }
        (Some(IntOrString::String(name)), None) => {
            if name.is_empty() {
                Err("empty port name".into())
            } else {
                Ok(PortSel::Named(name.clone()))
            }
        }
        (Some(IntOrString::String(name)), Some(_)) => {
            Err(format!("endPort cannot be used with named port {name:?}"))
        }
    }
}
