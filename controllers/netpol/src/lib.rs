//! Palisade NetworkPolicy compiler: Kubernetes objects in, iptables/ipset payloads out.
//!
//! This crate is **pure**: no kube client, no subprocesses, no file or network I/O. The agent
//! and the `palisade netpol` CLI feed it a [`ClusterState`] snapshot and hand the resulting
//! [`Payload`] to a `palisade_dataplane::Executor`.
//!
//! ```text
//!  ClusterState (Pods, Namespaces, NetworkPolicies, Nodes)      NodeConfig (node name, knobs)
//!        │                                                          │
//!        ▼  model.rs: active pods with IPs, local pods, policies ◄──┘
//!        ▼  selector.rs: canonical label selectors, matching
//!  compile.rs ──► Compiled { chains (rule IR, ir.rs), ipsets (members), hooks, diagnostics }
//!        ▼
//!  render.rs ──► Payload { ipset_restore, iptables_restore, names, stats }
//!        ▼
//!  trace.rs: a packet tracer over the rendered text (explain, revocation, tests)
//!
//!  incremental.rs: IncrementalCompiler — same output, but remote pod churn only patches
//!  set members (what the agent should call on every sync)
//! ```
//!
//! # Dataplane shape (filter table, one address family per payload)
//!
//! ```text
//! FORWARD ─(pos 1)─► PALISADE-FORWARD
//!                      ├ → PALISADE-ANTISPOOF (if anti_spoofing): per local pod
//!                      │     -i VETH | -m physdev --physdev-in PORT  ! -s podIP → DROP
//!                      ├ ctstate RELATED,ESTABLISHED → ACCEPT
//!                      ├ ctstate INVALID             → DROP
//!                      ├ → PALISADE-MIDSTREAM (if revoke_denied_connections): TCP NEW ! SYN
//!                      │     -s/-d guarded local pod → DROP (one some rule can deny: revoke)
//!                      ├ → PALISADE-EGRESS   -s podIP -g PAL-EG-<profile> | RETURN; -s podCIDR DROP
//!                      └ → PALISADE-INGRESS  -d podIP -g PAL-IN-<profile> | RETURN; -d podCIDR DROP
//! INPUT ───(pos 1)─► PALISADE-INPUT (pod → node traffic: egress only)
//!                      ├ → PALISADE-ANTISPOOF (if anti_spoofing)
//!                      ├ ctstate RELATED,ESTABLISHED → RETURN
//!                      └ → PALISADE-EGRESS
//!
//! PAL-IN-<profile>   (one per distinct set of policies isolating a pod)
//!    clear mark bit; -j PAL-PI-<policy> ...; no mark → DROP; clear mark bit (allowed: falls off)
//! PAL-PI-<policy>    (one per policy and direction; PAL-PE- for egress)
//!    mark already set → RETURN; <peer match> <port match> → set mark bit
//! ```
//!
//! ClusterNetworkPolicy subjects (see [`cnp`] and `compile/tiers.rs`) are dispatched to a
//! tiered profile instead: Admin tier chain → their NetworkPolicy profile (or the Baseline
//! tier chain) → allow, every CNP rule commented `cnp/<tier>/<name>/<direction>/<index>`.
//!
//! Allowed traffic is never ACCEPTed by policy chains: it leaves our chains and continues
//! through the rest of `FORWARD`, so a pod→pod flow on one node must pass the source's egress
//! profile *and* the destination's ingress profile, and other components' rules still apply.
//! Peers are ipsets named by a hash of the selector, so identical selectors share one set and
//! pod churn elsewhere in the cluster only changes set members.
#![forbid(unsafe_code)]

/// Object builders for tests and benchmarks (feature `test-support`).
#[cfg(any(test, feature = "test-support"))]
pub mod builders;
pub mod cnp;
pub mod compile;
pub mod denied;
mod error;
pub mod explain;
pub mod incremental;
pub mod ir;
pub mod manifests;
mod model;
pub mod names;
pub mod provenance;
pub mod render;
pub mod revoke;
pub mod selector;
/// The synthetic bench cluster (feature `test-support`).
#[cfg(any(test, feature = "test-support"))]
pub mod synthetic;
pub mod trace;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

pub use compile::{compile, Compiled};
pub use error::{ManifestError, NetpolError};
pub use explain::Explainer;
pub use incremental::{IncrementalCompiler, SyncMode};
pub use ipnetwork::IpNetwork;
pub use k8s_openapi;
pub use render::{render, Payload, PayloadStats};

/// A snapshot of the API objects the compiler reads. Order does not matter; the output is
/// sorted. Objects with the same namespace/name are de-duplicated (the last one wins).
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub nodes: Vec<Arc<Node>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub policies: Vec<Arc<NetworkPolicy>>,
    /// ClusterNetworkPolicies (`policy.networking.k8s.io/v1alpha2`, cluster-scoped).
    pub cluster_policies: Vec<Arc<cnp::ClusterNetworkPolicy>>,
}

/// IP address family of one payload: IPv4 through `iptables`, IPv6 through `ip6tables` with
/// `family inet6` sets; the IR, set names and renderer are the same shape for both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    #[default]
    V4,
    V6,
}

impl Family {
    /// Whether `ip` belongs to this family.
    pub fn contains(self, ip: std::net::IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::V4, std::net::IpAddr::V4(_)) | (Family::V6, std::net::IpAddr::V6(_))
        )
    }

    /// ipset `family` value.
    pub fn ipset_family(self) -> &'static str {
        match self {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        }
    }

    /// Short tag used in set names and identities.
    pub fn tag(self) -> &'static str {
        match self {
            Family::V4 => "4",
            Family::V6 => "6",
        }
    }
}

/// Default packet-mark bit used to carry "allowed by some policy" between a profile chain and
/// its policy chains. Chosen away from kube-proxy (0x4000, 0x8000) and kube-router / Weave
/// (0x10000, 0x20000, 0x40000). Only ever set and cleared inside our own chains.
pub const DEFAULT_MARK_BIT: u32 = 0x0020_0000;

/// Per-node compiler settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// This node's name (`Pod.spec.nodeName` of local pods, `Node.metadata.name`).
    pub node_name: String,
    /// The "first instant" rule: traffic to or from an address in this node's pod CIDRs that
    /// belongs to no pod the agent knows yet is dropped. On by default.
    pub block_unknown_pods: bool,
    /// Address family to compile for.
    pub family: Family,
    /// A single bit of the packet mark reserved for Palisade (see [`DEFAULT_MARK_BIT`]).
    pub mark_bit: u32,
    /// Pod CIDRs of this node in addition to `Node.spec.podCIDRs` (e.g. when Node objects do
    /// not carry them).
    pub extra_pod_cidrs: Vec<IpNetwork>,
    /// Anti-spoofing: drop packets entering from a local pod's interface whose source is not
    /// that pod's address (`PALISADE-ANTISPOOF`). Off in [`NodeConfig::new`] (the agent and
    /// the CLI turn it on by default and fill in [`NodeConfig::pod_interfaces`]).
    pub anti_spoofing: bool,
    /// Where each local pod's packets enter the node, by pod IP (found in the kernel by the
    /// dataplane adapter). A local pod missing here becomes a
    /// [`reasons::POD_INTERFACE_UNKNOWN`] diagnostic when `anti_spoofing` is on.
    pub pod_interfaces: BTreeMap<IpAddr, PodInterface>,
    /// Denied-traffic log: packets our chains drop are first sent to this NFLOG group,
    /// rate-limited per pod in the kernel. `None`: off.
    pub deny_log: Option<DenyLog>,
    /// Revocation, rule side: TCP packets in conntrack state NEW that are not a SYN (a flow
    /// picked up mid-stream, e.g. after its entry was deleted) to or from a local pod that
    /// any policy isolates are dropped (`PALISADE-MIDSTREAM`, see [`revoke`]). Off in
    /// [`NodeConfig::new`]; the agent turns it on with `--revoke-denied-connections`.
    pub revoke_denied_connections: bool,
}

/// Settings of the denied-traffic log (see `docs/observability.md`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DenyLog {
    /// NFLOG group the agent listens on.
    pub group: u16,
    /// Per pod and direction: `N/sec` (N ≥ 1) or `N/min` (1 ≤ N ≤ 59), the forms
    /// `iptables-save` prints back unchanged.
    pub rate: String,
    /// Packets logged at once before the rate applies.
    pub burst: u32,
}

impl Default for DenyLog {
    fn default() -> Self {
        DenyLog {
            group: DEFAULT_NFLOG_GROUP,
            rate: "10/min".into(),
            burst: 5,
        }
    }
}

impl DenyLog {
    /// Checks `rate` (see [`DenyLog::rate`]).
    pub fn valid_rate(rate: &str) -> bool {
        match rate.split_once('/') {
            Some((n, "sec")) => n.parse::<u32>().is_ok_and(|n| (1..=10_000).contains(&n)),
            Some((n, "min")) => n.parse::<u32>().is_ok_and(|n| (1..=59).contains(&n)),
            _ => false,
        }
    }
}

/// Annotation of a NetworkPolicy: `audit` puts it in audit mode (not enforced; what it
/// would deny is let through and logged `would-deny`); anything else, or none, enforces it.
pub const ENFORCEMENT_ANNOTATION: &str = "palisade.dev/enforcement";

/// Comment on the first rule of an audit-mode profile chain (read by `explain` and the log).
pub const AUDIT_PROFILE_COMMENT: &str = "audit-mode";
/// Comment on the rule an audit-mode profile matches when its policies would deny.
pub const WOULD_DENY_COMMENT: &str = "would-deny";

/// Default NFLOG group of the denied-traffic log.
pub const DEFAULT_NFLOG_GROUP: u16 = 1947;

/// The interface a local pod's packets enter the node from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PodInterface {
    /// Routed CNI: the pod's own host-side veth (`-i IF`).
    Routed(String),
    /// Bridged CNI with br_netfilter: the bridge port of the pod (`-m physdev --physdev-in IF`).
    BridgePort(String),
}

impl PodInterface {
    /// The interface name.
    pub fn name(&self) -> &str {
        match self {
            PodInterface::Routed(n) | PodInterface::BridgePort(n) => n,
        }
    }

    /// Whether `name` can be used in a rule: 1 to 15 bytes of `[A-Za-z0-9_.-]` (what Linux
    /// accepts, minus characters that could break a restore line or act as a wildcard).
    pub fn valid_name(name: &str) -> bool {
        (1..=15).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    }
}

/// The IPs of `family` of the active (not host-network, not finished) pods on `node`, sorted:
/// the addresses whose interfaces anti-spoofing needs.
pub fn local_pod_ips(state: &ClusterState, node: &str, family: Family) -> Vec<std::net::IpAddr> {
    let mut out: Vec<std::net::IpAddr> = state
        .pods
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter(|p| model::is_active(p))
        .filter_map(|p| model::pod_ip(p, family).ok().flatten())
        .collect();
    out.sort();
    out.dedup();
    out
}

impl NodeConfig {
    /// Defaults: IPv4, first-instant rule on, [`DEFAULT_MARK_BIT`].
    pub fn new(node_name: impl Into<String>) -> Self {
        NodeConfig {
            node_name: node_name.into(),
            block_unknown_pods: true,
            family: Family::V4,
            mark_bit: DEFAULT_MARK_BIT,
            extra_pod_cidrs: Vec::new(),
            anti_spoofing: false,
            pod_interfaces: BTreeMap::new(),
            deny_log: None,
            revoke_denied_connections: false,
        }
    }
}

/// Something in the input the compiler could not honour as written. Reported to users as a
/// Kubernetes Event (reason = [`Diagnostic::reason`]) by the agent, printed by the CLI.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Diagnostic {
    /// `"Pod"`, `"NetworkPolicy"`, `"Node"`, `"Namespace"` or `"NodeConfig"`.
    pub kind: &'static str,
    pub namespace: Option<String>,
    pub name: String,
    /// One of [`reasons`].
    pub reason: &'static str,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(
                f,
                "{} {}/{}: {}: {}",
                self.kind, ns, self.name, self.reason, self.message
            ),
            None => write!(
                f,
                "{} {}: {}: {}",
                self.kind, self.name, self.reason, self.message
            ),
        }
    }
}

/// Constant diagnostic reasons.
pub mod reasons {
    /// A local pod has no IP of the compiled family yet; it is not programmed.
    pub const POD_WITHOUT_IP: &str = "PodWithoutIP";
    /// `status.podIP(s)` does not parse.
    pub const INVALID_POD_IP: &str = "InvalidPodIP";
    /// Two active pods claim the same IP.
    pub const DUPLICATE_POD_IP: &str = "DuplicatePodIP";
    /// The configured node has no Node object: its pod CIDRs (first-instant rule) are unknown.
    pub const NODE_NOT_FOUND: &str = "NodeNotFound";
    /// `Node.spec.podCIDRs` has an entry that does not parse.
    pub const INVALID_POD_CIDR: &str = "InvalidPodCIDR";
    /// A label selector the API server would reject; it matches nothing.
    pub const INVALID_SELECTOR: &str = "InvalidSelector";
    /// A peer with no selector and no ipBlock, or an ipBlock combined with selectors.
    pub const INVALID_PEER: &str = "InvalidPeer";
    /// An ipBlock CIDR or except entry that does not parse or lies outside the CIDR.
    pub const INVALID_IP_BLOCK: &str = "InvalidIPBlock";
    /// A named port no relevant pod declares; it matches nothing until one does.
    pub const UNKNOWN_NAMED_PORT: &str = "UnknownNamedPort";
    /// A protocol other than TCP, UDP or SCTP; the whole rule is skipped (fails closed).
    pub const UNSUPPORTED_PROTOCOL: &str = "UnsupportedProtocol";
    /// A port out of range, `endPort` below `port`, or `endPort` with a named port.
    pub const INVALID_PORT: &str = "InvalidPort";
    /// A `policyTypes` entry other than Ingress or Egress.
    pub const UNKNOWN_POLICY_TYPE: &str = "UnknownPolicyType";
    /// Anti-spoofing is on but the interface a local pod's packets enter from is unknown (or
    /// its name cannot be used): the pod's source addresses are not checked.
    pub const POD_INTERFACE_UNKNOWN: &str = "PodInterfaceUnknown";
    /// A NodeConfig value that cannot be used as given.
    pub const INVALID_CONFIG: &str = "InvalidConfig";
    /// A NetworkPolicy direction that would need more ipsets than its namespace's or the
    /// node's budget leaves: it allows nothing (its pods stay isolated) until it is smaller.
    pub const POLICY_OVER_BUDGET: &str = "PolicyOverBudget";
    /// ClusterNetworkPolicy `spec.tier` other than Admin or Baseline: the policy is ignored.
    pub const UNKNOWN_TIER: &str = "UnknownTier";
    /// ClusterNetworkPolicy `spec.priority` outside 0-1000 (used as given).
    pub const INVALID_PRIORITY: &str = "InvalidPriority";
    /// ClusterNetworkPolicy `spec.subject` unusable: the policy selects no pod.
    pub const INVALID_SUBJECT: &str = "InvalidSubject";
    /// ClusterNetworkPolicy rule action other than Accept, Deny or Pass: treated as Deny.
    pub const UNKNOWN_ACTION: &str = "UnknownAction";
    /// A ClusterNetworkPolicy rule with a peer or protocol Palisade cannot honour (no known
    /// field, several, invalid selector, CIDR or port): fails closed (an Accept rule matches
    /// nothing, a Deny or Pass rule denies all traffic).
    pub const UNKNOWN_PEER: &str = "UnknownPeer";
    /// `domainNames` peers need DNS interception, which Palisade does not do.
    pub const UNSUPPORTED_DOMAIN_NAMES: &str = "UnsupportedDomainNames";
}
