//! ClusterNetworkPolicy, `policy.networking.k8s.io/v1alpha2` (network-policy-api v0.2.0):
//! serde types that read the upstream objects field for field, and their validation into the
//! compiler's model.
//!
//! The types keep every value the API allows *and* what a newer CRD might add: `tier` and
//! `action` are strings, and peers, subjects and protocols collect fields they do not know
//! (`unknown`), because the API's fail-closed rule depends on seeing them:
//!
//! > If an implementation sees no fields are set then it can infer that the deployed CRD is of
//! > an incompatible version with an unknown field. In that case it should fail closed. For
//! > "Accept" rules, "fail closed" means: "treat the rule as matching no traffic". For "Deny"
//! > and "Pass" rules, "fail closed" means: "treat the rule as a 'Deny all' rule".
//!
//! Validation (→ [`CnpInfo`]) applies that rule to every rule the compiler cannot honour as
//! written: a peer or protocol with no known field (or more than one), an invalid selector,
//! CIDR or port, an empty `from`/`to`, and `domainNames` (needs DNS interception, which
//! Palisade does not do) in a `Deny`/`Pass` rule. `domainNames` in an `Accept` rule (the only
//! place the API allows it) is dropped from the rule: the rule's other peers still match. Every
//! such case is a [`Diagnostic`] of kind `ClusterNetworkPolicy`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ir::Protocol;
use crate::model::{family_of, normalize, PortInfo, PortSel};
use crate::selector::Selector;
use crate::{reasons, Diagnostic, Family};

/// API group of ClusterNetworkPolicy.
pub const GROUP: &str = "policy.networking.k8s.io";
/// API version.
pub const VERSION: &str = "v1alpha2";
/// `apiVersion` value.
pub const API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";
/// Kind.
pub const KIND: &str = "ClusterNetworkPolicy";
/// Resource plural.
pub const PLURAL: &str = "clusternetworkpolicies";
/// Diagnostic kind used for these objects.
pub const DIAG_KIND: &str = "ClusterNetworkPolicy";

/// Fields a newer CRD version may add, kept so validation can fail closed on them.
pub type Unknown = BTreeMap<String, Value>;

/// A cluster-scoped network policy of the Admin or the Baseline tier.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ClusterNetworkPolicySpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ClusterNetworkPolicyStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicySpec {
    /// `Admin` or `Baseline`.
    #[serde(default)]
    pub tier: String,
    /// 0–1000, lower first within the tier.
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub subject: ClusterNetworkPolicySubject,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<ClusterNetworkPolicyIngressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<ClusterNetworkPolicyEgressRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicyStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// Exactly one field must be set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicySubject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// Pods selected by namespace AND pod selectors (an empty selector selects all).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    #[serde(default)]
    pub namespace_selector: LabelSelector,
    #[serde(default)]
    pub pod_selector: LabelSelector,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicyIngressRule {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// `Accept`, `Deny` or `Pass`.
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub from: Vec<ClusterNetworkPolicyIngressPeer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocols: Vec<ClusterNetworkPolicyProtocol>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicyEgressRule {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// `Accept`, `Deny` or `Pass`.
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub to: Vec<ClusterNetworkPolicyEgressPeer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocols: Vec<ClusterNetworkPolicyProtocol>,
}

/// Exactly one field must be set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicyIngressPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// Exactly one field must be set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicyEgressPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    /// Node addresses (`status.addresses`) of the nodes matching the selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<LabelSelector>,
    /// CIDRs; they match pod addresses too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<String>>,
    /// Experimental; not supported by Palisade (see the module docs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_names: Option<Vec<String>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// Exactly one field must be set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicyProtocol {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<ProtocolPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<ProtocolPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<ProtocolPorts>,
    /// A container port name of the destination pod (any protocol it is declared with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `tcp`, `udp` and `sctp` attributes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolPorts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<Port>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// Exactly one of `number` and `range`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<PortRange>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// Inclusive; `start` < `end`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortRange {
    pub start: i64,
    pub end: i64,
}

// ---------------------------------------------------------------------------------------
// Validated model.

/// Tier of a ClusterNetworkPolicy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Admin,
    Baseline,
}

impl Tier {
    /// Lower-case name used in rule comments (`cnp/admin/...`).
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Admin => "admin",
            Tier::Baseline => "baseline",
        }
    }
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Accept,
    Deny,
    Pass,
}

/// A peer the compiler can match.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum CnpPeer {
    /// Pods matching `pods` in namespaces matching `namespaces` (host-network pods never).
    Pods {
        namespaces: Selector,
        pods: Selector,
    },
    /// Addresses of the nodes matching the selector.
    Nodes(Selector),
    /// CIDRs of the payload's family (normalized, sorted, non-empty).
    Networks(Vec<IpNetwork>),
}

/// One validated rule.
#[derive(Clone, Debug)]
pub(crate) struct CnpRule {
    /// Position in the policy's `ingress`/`egress` list.
    pub index: usize,
    pub action: Action,
    /// `None`: every peer (a fail-closed "Deny all"). `Some(list)`: any of them.
    pub peers: Option<Vec<CnpPeer>>,
    /// `None`: every protocol and port. Named ports appear once per protocol.
    pub ports: Option<Vec<PortInfo>>,
}

/// Subject: pods matching `pods` in namespaces matching `namespaces`.
#[derive(Clone, Debug)]
pub(crate) struct CnpSubject {
    pub namespaces: Selector,
    pub pods: Selector,
}

/// A validated ClusterNetworkPolicy.
#[derive(Clone, Debug)]
pub(crate) struct CnpInfo<'a> {
    pub name: &'a str,
    pub tier: Tier,
    pub priority: i32,
    pub subject: CnpSubject,
    pub ingress: Vec<CnpRule>,
    pub egress: Vec<CnpRule>,
}

impl CnpInfo<'_> {
    /// `cnp/<tier>/<name>`.
    pub fn key(&self) -> String {
        format!("cnp/{}/{}", self.tier.as_str(), self.name)
    }
}

fn diag(name: &str, reason: &'static str, message: String) -> Diagnostic {
    Diagnostic {
        kind: DIAG_KIND,
        namespace: None,
        name: name.to_string(),
        reason,
        message,
    }
}

/// Validates every policy (sorted by tier, priority, name; later duplicates of a name win).
pub(crate) fn validate_all<'a>(
    policies: &'a [std::sync::Arc<ClusterNetworkPolicy>],
    family: Family,
    diags: &mut Vec<Diagnostic>,
) -> Vec<CnpInfo<'a>> {
    let mut by_name: BTreeMap<&str, &ClusterNetworkPolicy> = BTreeMap::new();
    for p in policies {
        if let Some(name) = p.metadata.name.as_deref() {
            by_name.insert(name, p);
        }
    }
    let mut out: Vec<CnpInfo> = by_name
        .values()
        .filter_map(|p| validate(p, family, diags))
        .collect();
    out.sort_by(|a, b| (a.tier, a.priority, a.name).cmp(&(b.tier, b.priority, b.name)));
    out
}

/// Validates one policy; `None` (with a diagnostic) when it cannot be used at all.
pub(crate) fn validate<'a>(
    p: &'a ClusterNetworkPolicy,
    family: Family,
    diags: &mut Vec<Diagnostic>,
) -> Option<CnpInfo<'a>> {
    let name = p.metadata.name.as_deref()?;
    let spec = &p.spec;
    let tier = match spec.tier.as_str() {
        "Admin" => Tier::Admin,
        "Baseline" => Tier::Baseline,
        other => {
            diags.push(diag(
                name,
                reasons::UNKNOWN_TIER,
                format!("spec.tier {other:?} is not Admin or Baseline; the policy is ignored"),
            ));
            return None;
        }
    };
    if !(0..=1000).contains(&spec.priority) {
        diags.push(diag(
            name,
            reasons::INVALID_PRIORITY,
            format!(
                "spec.priority {} is outside 0-1000; it is used as given",
                spec.priority
            ),
        ));
    }
    let subject = match subject(&spec.subject) {
        Ok(s) => s,
        Err(msg) => {
            diags.push(diag(
                name,
                reasons::INVALID_SUBJECT,
                format!("spec.subject: {msg}; the policy selects no pod"),
            ));
            return None;
        }
    };
    let mut ctx = Ctx {
        name,
        family,
        diags,
    };
    let ingress = spec
        .ingress
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let peers: Vec<PeerIn> = r.from.iter().map(PeerIn::Ingress).collect();
            ctx.rule("ingress", i, &r.action, &peers, &r.protocols)
        })
        .collect();
    let egress = spec
        .egress
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let peers: Vec<PeerIn> = r.to.iter().map(PeerIn::Egress).collect();
            ctx.rule("egress", i, &r.action, &peers, &r.protocols)
        })
        .collect();
    Some(CnpInfo {
        name,
        tier,
        priority: spec.priority,
        subject,
        ingress,
        egress,
    })
}

fn selector(s: &LabelSelector) -> Result<Selector, String> {
    Selector::from_api(Some(s)).map_err(|e| e.to_string())
}

fn subject(s: &ClusterNetworkPolicySubject) -> Result<CnpSubject, String> {
    let set = usize::from(s.namespaces.is_some()) + usize::from(s.pods.is_some());
    if set != 1 || !s.unknown.is_empty() {
        let fields: Vec<&str> = s.unknown.keys().map(String::as_str).collect();
        return Err(format!(
            "exactly one of namespaces and pods must be set (unknown fields: {fields:?})"
        ));
    }
    if let Some(ns) = &s.namespaces {
        return Ok(CnpSubject {
            namespaces: selector(ns).map_err(|e| format!("namespaces: {e}"))?,
            pods: Selector::everything(),
        });
    }
    let pods = s.pods.as_ref().ok_or("no field")?;
    Ok(CnpSubject {
        namespaces: selector(&pods.namespace_selector)
            .map_err(|e| format!("pods.namespaceSelector: {e}"))?,
        pods: selector(&pods.pod_selector).map_err(|e| format!("pods.podSelector: {e}"))?,
    })
}

enum PeerIn<'a> {
    Ingress(&'a ClusterNetworkPolicyIngressPeer),
    Egress(&'a ClusterNetworkPolicyEgressPeer),
}

/// A peer after validation.
enum PeerOut {
    Peer(CnpPeer),
    /// Valid but matches nothing in this family (networks of the other family).
    Nothing,
    /// `domainNames`: unsupported.
    Domains,
}

struct Ctx<'a, 'd> {
    name: &'a str,
    family: Family,
    diags: &'d mut Vec<Diagnostic>,
}

impl Ctx<'_, '_> {
    fn rule(
        &mut self,
        dir: &str,
        index: usize,
        action: &str,
        peers: &[PeerIn],
        protocols: &[ClusterNetworkPolicyProtocol],
    ) -> Option<CnpRule> {
        let field = if dir == "ingress" { "from" } else { "to" };
        let at = format!("spec.{dir}[{index}]");
        let action = match action {
            "Accept" => Action::Accept,
            "Deny" => Action::Deny,
            "Pass" => Action::Pass,
            other => {
                self.diags.push(diag(
                    self.name,
                    reasons::UNKNOWN_ACTION,
                    format!("{at}.action {other:?} is not Accept, Deny or Pass; treated as Deny"),
                ));
                Action::Deny
            }
        };
        // Collect every reason the rule cannot be honoured as written.
        let mut broken: Vec<String> = Vec::new();
        let mut out_peers = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut domains = false;
        if peers.is_empty() {
            broken.push(format!("{at}.{field} is empty"));
        }
        for (j, p) in peers.iter().enumerate() {
            match self.peer(p) {
                Ok(PeerOut::Peer(peer)) => {
                    if seen.insert(peer.clone()) {
                        out_peers.push(peer);
                    }
                }
                Ok(PeerOut::Nothing) => {}
                Ok(PeerOut::Domains) => domains = true,
                Err(msg) => broken.push(format!("{at}.{field}[{j}]: {msg}")),
            }
        }
        let mut ports = Vec::new();
        for (j, p) in protocols.iter().enumerate() {
            match protocol(p) {
                Ok(list) => ports.extend(list),
                Err(msg) => broken.push(format!("{at}.protocols[{j}]: {msg}")),
            }
        }
        if domains {
            if action == Action::Accept {
                self.diags.push(diag(
                    self.name,
                    reasons::UNSUPPORTED_DOMAIN_NAMES,
                    format!(
                        "{at}: domainNames peers are not supported (no DNS interception); \
                         they match nothing, the rule's other peers still apply"
                    ),
                ));
            } else {
                broken.push(format!(
                    "{at}: domainNames peers are not supported (and only allowed in Accept rules)"
                ));
            }
        }
        if !broken.is_empty() {
            let reason = if domains && action != Action::Accept {
                reasons::UNSUPPORTED_DOMAIN_NAMES
            } else {
                reasons::UNKNOWN_PEER
            };
            return match action {
                Action::Accept => {
                    self.diags.push(diag(
                        self.name,
                        reason,
                        format!(
                            "{}; fail closed: this Accept rule matches no traffic",
                            broken.join("; ")
                        ),
                    ));
                    None
                }
                Action::Deny | Action::Pass => {
                    self.diags.push(diag(
                        self.name,
                        reason,
                        format!(
                            "{}; fail closed: this rule denies all traffic",
                            broken.join("; ")
                        ),
                    ));
                    Some(CnpRule {
                        index,
                        action: Action::Deny,
                        peers: None,
                        ports: None,
                    })
                }
            };
        }
        if out_peers.is_empty() {
            // Every peer was for the other family (or domainNames): matches nothing here.
            return None;
        }
        ports.sort();
        ports.dedup();
        Some(CnpRule {
            index,
            action,
            peers: Some(out_peers),
            ports: (!protocols.is_empty()).then_some(ports),
        })
    }

    fn peer(&mut self, p: &PeerIn) -> Result<PeerOut, String> {
        let (namespaces, pods, nodes, networks, domains, unknown) = match p {
            PeerIn::Ingress(p) => (
                p.namespaces.as_ref(),
                p.pods.as_ref(),
                None,
                None,
                None,
                &p.unknown,
            ),
            PeerIn::Egress(p) => (
                p.namespaces.as_ref(),
                p.pods.as_ref(),
                p.nodes.as_ref(),
                p.networks.as_ref(),
                p.domain_names.as_ref(),
                &p.unknown,
            ),
        };
        let set = [
            namespaces.is_some(),
            pods.is_some(),
            nodes.is_some(),
            networks.is_some(),
            domains.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if set != 1 {
            let fields: Vec<&str> = unknown.keys().map(String::as_str).collect();
            return Err(match set {
                0 => format!("no known peer field (unknown fields: {fields:?})"),
                _ => "more than one peer field is set".to_string(),
            });
        }
        if let Some(ns) = namespaces {
            return Ok(PeerOut::Peer(CnpPeer::Pods {
                namespaces: selector(ns).map_err(|e| format!("namespaces: {e}"))?,
                pods: Selector::everything(),
            }));
        }
        if let Some(np) = pods {
            return Ok(PeerOut::Peer(CnpPeer::Pods {
                namespaces: selector(&np.namespace_selector)
                    .map_err(|e| format!("pods.namespaceSelector: {e}"))?,
                pods: selector(&np.pod_selector).map_err(|e| format!("pods.podSelector: {e}"))?,
            }));
        }
        if let Some(n) = nodes {
            return Ok(PeerOut::Peer(CnpPeer::Nodes(
                selector(n).map_err(|e| format!("nodes: {e}"))?,
            )));
        }
        if let Some(list) = networks {
            if list.is_empty() {
                return Err("networks is empty".into());
            }
            let mut nets = Vec::new();
            for c in list {
                let net = IpNetwork::from_str(c.trim())
                    .map_err(|e| format!("networks entry {c:?}: {e}"))?;
                if family_of(net) == self.family {
                    nets.push(normalize(net));
                }
            }
            nets.sort();
            nets.dedup();
            return Ok(if nets.is_empty() {
                PeerOut::Nothing
            } else {
                PeerOut::Peer(CnpPeer::Networks(nets))
            });
        }
        Ok(PeerOut::Domains)
    }
}

/// One protocol entry → port entries (a named port once per protocol).
fn protocol(p: &ClusterNetworkPolicyProtocol) -> Result<Vec<PortInfo>, String> {
    let set = [
        p.tcp.is_some(),
        p.udp.is_some(),
        p.sctp.is_some(),
        p.destination_named_port.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set != 1 || !p.unknown.is_empty() {
        let fields: Vec<&str> = p.unknown.keys().map(String::as_str).collect();
        return Err(format!(
            "exactly one of tcp, udp, sctp and destinationNamedPort must be set \
             (unknown fields: {fields:?})"
        ));
    }
    if let Some(name) = &p.destination_named_port {
        if name.is_empty() {
            return Err("empty destinationNamedPort".into());
        }
        return Ok([Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
            .into_iter()
            .map(|proto| PortInfo {
                proto,
                port: PortSel::Named(name.clone()),
            })
            .collect());
    }
    let (proto, ports) = match (&p.tcp, &p.udp, &p.sctp) {
        (Some(t), _, _) => (Protocol::Tcp, t),
        (_, Some(u), _) => (Protocol::Udp, u),
        (_, _, Some(s)) => (Protocol::Sctp, s),
        _ => return Err("no protocol".into()),
    };
    if !ports.unknown.is_empty() {
        let fields: Vec<&str> = ports.unknown.keys().map(String::as_str).collect();
        return Err(format!("{}: unknown fields {fields:?}", proto.as_str()));
    }
    let port = match &ports.destination_port {
        None => PortSel::All,
        Some(dp) => port_sel(dp).map_err(|e| format!("{}.destinationPort: {e}", proto.as_str()))?,
    };
    Ok(vec![PortInfo { proto, port }])
}

fn port_sel(p: &Port) -> Result<PortSel, String> {
    let valid = |n: i64| u16::try_from(n).ok().filter(|n| *n != 0);
    if !p.unknown.is_empty() {
        let fields: Vec<&str> = p.unknown.keys().map(String::as_str).collect();
        return Err(format!("unknown fields {fields:?}"));
    }
    match (p.number, &p.range) {
        (Some(n), None) => valid(n)
            .map(|n| PortSel::Range(n, n))
            .ok_or_else(|| format!("number {n} is out of range 1-65535")),
        (None, Some(r)) => {
            let (Some(lo), Some(hi)) = (valid(r.start), valid(r.end)) else {
                return Err(format!(
                    "range {}-{} is out of range 1-65535",
                    r.start, r.end
                ));
            };
            if lo >= hi {
                return Err(format!("range start {lo} is not below end {hi}"));
            }
            Ok(PortSel::Range(lo, hi))
        }
        _ => Err("exactly one of number and range must be set".into()),
    }
}

/// A node's labels and its addresses of `family` (`status.addresses` entries that are IPs).
pub(crate) fn node_addresses(node: &Node, family: Family) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| matches!(a.type_.as_str(), "InternalIP" | "ExternalIP"))
        .filter_map(|a| IpAddr::from_str(a.address.trim()).ok())
        .filter(|ip| family.contains(*ip) && crate::model::usable_host_ip(*ip))
        .collect();
    out.sort();
    out.dedup();
    out
}

// ---------------------------------------------------------------------------------------
// Status.

/// Condition type of node `node` on a policy: `palisade.dev/<node>` (one per node, merged by
/// type through server-side apply; node names fit the condition type's name part).
pub fn condition_type(node: &str) -> String {
    format!("palisade.dev/{node}")
}

/// Condition reasons.
pub mod condition_reasons {
    /// Everything in the policy is enforced as written.
    pub const APPLIED: &str = "Applied";
    /// Enforced, but parts fail closed or match nothing (see the message).
    pub const APPLIED_WITH_WARNINGS: &str = "AppliedWithWarnings";
    /// The policy is not enforced (unknown tier, unusable subject).
    pub const NOT_APPLIED: &str = "NotApplied";
    /// The node's last apply failed; the previous rules stay in force.
    pub const APPLY_FAILED: &str = "ApplyFailed";
}

/// The condition this node reports on `policy`, from the diagnostics of its last compile
/// (all families) and whether its last apply succeeded. `now` becomes
/// `lastTransitionTime` unless `existing` already has the same status.
pub fn node_condition(
    policy: &ClusterNetworkPolicy,
    node: &str,
    diags: &[Diagnostic],
    apply_error: Option<&str>,
    now: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> Condition {
    let name = policy.metadata.name.as_deref().unwrap_or_default();
    let mine: Vec<&Diagnostic> = diags
        .iter()
        .filter(|d| d.kind == DIAG_KIND && d.name == name)
        .collect();
    let ignored = mine
        .iter()
        .any(|d| matches!(d.reason, reasons::UNKNOWN_TIER | reasons::INVALID_SUBJECT));
    let (status, reason, mut message) = if let Some(e) = apply_error {
        (
            "False",
            condition_reasons::APPLY_FAILED,
            format!("applying the rules failed: {e}"),
        )
    } else if ignored {
        ("False", condition_reasons::NOT_APPLIED, String::new())
    } else if mine.is_empty() {
        (
            "True",
            condition_reasons::APPLIED,
            "enforced on this node".to_string(),
        )
    } else {
        (
            "True",
            condition_reasons::APPLIED_WITH_WARNINGS,
            String::new(),
        )
    };
    for d in &mine {
        if !message.is_empty() {
            message.push_str("; ");
        }
        message.push_str(d.reason);
        message.push_str(": ");
        message.push_str(&d.message);
    }
    if message.len() > 1024 {
        let mut end = 1021;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    let ty = condition_type(node);
    let existing = policy
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == ty));
    let last_transition_time = match existing {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now,
    };
    Condition {
        type_: ty,
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: policy.metadata.generation,
        last_transition_time,
    }
}

/// Whether `policy` already carries `cond` (ignoring `lastTransitionTime`).
pub fn has_condition(policy: &ClusterNetworkPolicy, cond: &Condition) -> bool {
    policy.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == cond.type_
                && c.status == cond.status
                && c.reason == cond.reason
                && c.message == cond.message
                && c.observed_generation == cond.observed_generation
        })
    })
}

/// What the compiler reads of a policy (name and spec): two objects with equal views
/// compile identically, so a status-only update need not recompile.
pub fn compiled_view(p: &ClusterNetworkPolicy) -> ClusterNetworkPolicy {
    ClusterNetworkPolicy {
        api_version: None,
        kind: None,
        metadata: ObjectMeta {
            name: p.metadata.name.clone(),
            ..Default::default()
        },
        spec: p.spec.clone(),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> ClusterNetworkPolicy {
        serde_saphyr::from_str(yaml).expect("parses")
    }

    const ADMIN: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata:
  name: sensitive-ns
spec:
  tier: Admin
  priority: 10
  subject:
    namespaces:
      matchLabels:
        kubernetes.io/metadata.name: sensitive-ns
  ingress:
  - name: deny-from-untrusted
    action: Deny
    from:
    - namespaces:
        matchLabels:
          tenant: untrusted
  - action: Accept
    from:
    - pods:
        namespaceSelector: {}
        podSelector:
          matchLabels: {app: monitoring}
    protocols:
    - tcp:
        destinationPort:
          number: 9090
    - udp:
        destinationPort:
          range: {start: 5000, end: 5010}
    - destinationNamedPort: metrics
  egress:
  - action: Pass
    to:
    - networks: ["10.0.0.0/8", "fd00::/8"]
  - action: Accept
    to:
    - nodes:
        matchExpressions:
        - {key: node-role.kubernetes.io/control-plane, operator: Exists}
  - action: Accept
    to:
    - domainNames: ["*.kubernetes.io"]
    - pods:
        podSelector: {matchLabels: {app: dns}}
status:
  conditions:
  - type: Applied
    status: "True"
    reason: Applied
    message: ok
    lastTransitionTime: "2026-01-01T00:00:00Z"
"#;

    #[test]
    fn upstream_object_round_trips() {
        let p = parse(ADMIN);
        assert_eq!(p.spec.tier, "Admin");
        assert_eq!(p.spec.priority, 10);
        assert_eq!(p.spec.ingress.len(), 2);
        assert_eq!(p.spec.ingress[0].name, "deny-from-untrusted");
        let r = &p.spec.ingress[1];
        assert_eq!(
            r.protocols[1]
                .udp
                .as_ref()
                .and_then(|u| u.destination_port.as_ref())
                .and_then(|d| d.range.as_ref())
                .map(|r| (r.start, r.end)),
            Some((5000, 5010))
        );
        assert_eq!(
            r.protocols[2].destination_named_port.as_deref(),
            Some("metrics")
        );
        assert_eq!(
            p.spec.egress[2].to[0].domain_names.as_deref(),
            Some(&["*.kubernetes.io".to_string()][..])
        );
        assert_eq!(p.status.as_ref().map(|s| s.conditions.len()), Some(1));
        // JSON round trip keeps every field.
        let json = serde_json::to_value(&p).expect("serializes");
        let back: ClusterNetworkPolicy = serde_json::from_value(json).expect("parses back");
        assert_eq!(back, p);
    }

    #[test]
    fn validation_follows_the_api() {
        let p = parse(ADMIN);
        let mut d = Vec::new();
        let v = validate(&p, Family::V4, &mut d).expect("valid");
        assert_eq!(v.tier, Tier::Admin);
        assert_eq!(v.ingress.len(), 2);
        assert_eq!(v.ingress[0].action, Action::Deny);
        // tcp 9090, udp 5000-5010, named port ×3 protocols
        assert_eq!(v.ingress[1].ports.as_ref().map(Vec::len), Some(5));
        // networks: only the IPv4 one in the IPv4 model
        match &v.egress[0].peers.as_deref() {
            Some([CnpPeer::Networks(n)]) => assert_eq!(n.len(), 1),
            other => panic!("{other:?}"),
        }
        // domainNames dropped from the Accept rule, pods peer kept, diagnostic given
        assert_eq!(v.egress[2].peers.as_ref().map(Vec::len), Some(1));
        assert!(d
            .iter()
            .any(|x| x.reason == reasons::UNSUPPORTED_DOMAIN_NAMES));
        let mut d6 = Vec::new();
        let v6 = validate(&p, Family::V6, &mut d6).expect("valid");
        match &v6.egress[0].peers.as_deref() {
            Some([CnpPeer::Networks(n)]) => assert_eq!(n[0].to_string(), "fd00::/8"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_peer_fails_closed() {
        let p = parse(
            r#"
metadata: {name: future}
spec:
  tier: Baseline
  priority: 5
  subject: {namespaces: {}}
  ingress:
  - action: Accept
    from: [{serviceAccounts: {name: x}}]
  - action: Deny
    from: [{serviceAccounts: {name: x}}]
    protocols: [{tcp: {destinationPort: {number: 80}}}]
  - action: Pass
    from: [{namespaces: {}}, {futurePeer: {}}]
  egress:
  - action: Accept
    to: [{pods: {podSelector: {}}}]
    protocols: [{icmp: {}}]
  - action: Deny
    to: [{domainNames: ["example.com"]}]
"#,
        );
        assert!(p.spec.ingress[0].from[0]
            .unknown
            .contains_key("serviceAccounts"));
        let mut d = Vec::new();
        let v = validate(&p, Family::V4, &mut d).expect("valid");
        // Accept with an unknown peer: gone. Deny/Pass: deny everything.
        assert_eq!(v.ingress.len(), 2);
        for r in &v.ingress {
            assert_eq!(r.action, Action::Deny);
            assert!(r.peers.is_none() && r.ports.is_none());
        }
        assert_eq!(v.ingress[0].index, 1);
        // Accept with an unknown protocol: gone; Deny with domainNames: deny all.
        assert_eq!(v.egress.len(), 1);
        assert_eq!(v.egress[0].action, Action::Deny);
        assert!(v.egress[0].peers.is_none());
        assert!(
            d.iter()
                .filter(|x| x.reason == reasons::UNKNOWN_PEER)
                .count()
                >= 3
        );
    }

    #[test]
    fn bad_policies_are_reported() {
        let mut d = Vec::new();
        let p = parse(
            "metadata: {name: a}\nspec: {tier: Developer, priority: 1, subject: {namespaces: {}}}",
        );
        assert!(validate(&p, Family::V4, &mut d).is_none());
        let p = parse("metadata: {name: b}\nspec: {tier: Admin, priority: 1, subject: {}}");
        assert!(validate(&p, Family::V4, &mut d).is_none());
        let p = parse(
            "metadata: {name: c}\nspec: {tier: Admin, priority: 2000, subject: {namespaces: {}},\n  \
             ingress: [{action: Drop, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {range: {start: 9, end: 9}}}}]}]}",
        );
        let v = validate(&p, Family::V4, &mut d).expect("used");
        assert_eq!(v.ingress[0].action, Action::Deny);
        assert!(v.ingress[0].peers.is_none(), "bad range fails closed");
        let reasons: Vec<&str> = d.iter().map(|x| x.reason).collect();
        for r in [
            reasons::UNKNOWN_TIER,
            reasons::INVALID_SUBJECT,
            reasons::INVALID_PRIORITY,
            reasons::UNKNOWN_ACTION,
            reasons::UNKNOWN_PEER,
        ] {
            assert!(reasons.contains(&r), "{r} in {reasons:?}");
        }
    }

    #[test]
    fn node_conditions() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let t0 = Time(jiff::Timestamp::UNIX_EPOCH);
        let t1 = Time(jiff::Timestamp::from_second(100).unwrap());
        let mut p = parse(ADMIN);
        p.metadata.generation = Some(3);
        let mut d = Vec::new();
        let _ = validate(&p, Family::V4, &mut d);
        let c = node_condition(&p, "n1", &d, None, t1.clone());
        assert_eq!(c.type_, "palisade.dev/n1");
        assert_eq!(c.status, "True");
        assert_eq!(c.reason, condition_reasons::APPLIED_WITH_WARNINGS);
        assert!(
            c.message.contains("UnsupportedDomainNames"),
            "{}",
            c.message
        );
        assert_eq!(c.observed_generation, Some(3));
        assert!(!has_condition(&p, &c));
        // Once stored, the same condition needs no patch and keeps its transition time.
        p.status = Some(ClusterNetworkPolicyStatus {
            conditions: vec![Condition {
                last_transition_time: t0.clone(),
                ..c.clone()
            }],
        });
        assert!(has_condition(&p, &c));
        let again = node_condition(&p, "n1", &d, None, t1.clone());
        assert_eq!(again.last_transition_time, t0);
        let failed = node_condition(&p, "n1", &d, Some("boom"), t1.clone());
        assert_eq!(failed.status, "False");
        assert_eq!(failed.last_transition_time, t1);
        let clean = node_condition(&p, "n2", &[], None, t1);
        assert_eq!(clean.reason, condition_reasons::APPLIED);
        assert_eq!(compiled_view(&p).status, None);
    }

    #[test]
    fn hostile_input_never_panics() {
        for text in [
            "{}",
            "spec: {priority: -5}",
            "metadata: {name: x}\nspec: {tier: Admin, subject: {pods: {}}, egress: [{action: Accept, to: [{networks: [\"nonsense\"]}]}]}",
            "metadata: {name: x}\nspec: {tier: Admin, subject: {pods: {}}, egress: [{action: Accept, to: [{networks: []}]}]}",
            "metadata: {name: x}\nspec: {tier: Admin, subject: {pods: {}}, egress: [{action: Deny, to: [{nodes: {matchExpressions: [{key: a, operator: Bad}]}}]}]}",
        ] {
            if let Ok(p) = serde_saphyr::from_str::<ClusterNetworkPolicy>(text) {
                let mut d = Vec::new();
                let _ = validate(&p, Family::V4, &mut d);
            }
        }
    }
}
