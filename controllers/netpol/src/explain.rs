//! `palisade netpol explain`: why one flow is allowed or denied, read from the very rules the
//! agents apply.
//!
//! ```text
//!  Flow (from, to, port, protocol)
//!    │ resolve endpoints: pod (ns/name or its IP) · host-network pod · node address ·
//!    │                    unknown address in a node's pod CIDR · external
//!    ▼
//!  compile + render for the source's node (egress) and the destination's node (ingress)
//!    │ (cached per node and family)       same code as the agent: compile.rs, render.rs
//!    ▼
//!  trace.rs: a NEW packet through FORWARD (or INPUT when the destination is that node)
//!    ▼
//!  the traversed rules' comments (provenance.rs) and chain names
//!    ─► verdict, isolating policies per direction, the rule that allowed it or why not
//! ```
//!
//! Nothing here re-implements NetworkPolicy semantics: a verdict differs from the kernel's
//! only if the tracer or the compiler does, and `tests/netpol_matrix.rs` compares the two for
//! every probe. Rules written by other compilers (ClusterNetworkPolicy tiers) are explained
//! as long as their comments follow [`crate::provenance`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::str::FromStr;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Value};

use crate::ir::Protocol;
use crate::model::{is_active, pod_ip};
use crate::provenance::{PolicyRef, RuleRef};
use crate::trace::{Action, CtState, Packet, Step, Tracer, Verdict};
use crate::{compile, names, render, ClusterState, Family, NetpolError, NodeConfig};

/// One side of a flow as given: `NS/POD` or an IP address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointSpec {
    Pod { namespace: String, name: String },
    Ip(IpAddr),
}

impl FromStr for EndpointSpec {
    type Err = NetpolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = IpAddr::from_str(s) {
            return Ok(EndpointSpec::Ip(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(EndpointSpec::Pod {
                    namespace: ns.into(),
                    name: name.into(),
                })
            }
            _ => Err(bad(format!(
                "{:?} is neither NAMESPACE/POD nor an IP address",
                clip(s)
            ))),
        }
    }
}

impl std::fmt::Display for EndpointSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndpointSpec::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            EndpointSpec::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A destination port: a number, or a container port name of the destination pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    Number(u16),
    Name(String),
}

impl FromStr for PortSpec {
    type Err = NetpolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(n) = s.parse::<u16>() {
            if n == 0 {
                return Err(bad("port 0 is not a port".into()));
            }
            return Ok(PortSpec::Number(n));
        }
        // IANA_SVC_NAME: 1-15 lowercase letters, digits and '-', at least one letter.
        let ok = (1..=15).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && s.bytes().any(|b| b.is_ascii_lowercase());
        if ok {
            Ok(PortSpec::Name(s.into()))
        } else {
            Err(bad(format!(
                "{:?} is neither a port number (1-65535) nor a port name",
                clip(s)
            )))
        }
    }
}

/// `TCP`, `UDP` or `SCTP` (any case).
pub fn parse_protocol(s: &str) -> Result<Protocol, NetpolError> {
    Protocol::parse(Some(s.to_ascii_uppercase().as_str()))
        .ok_or_else(|| bad(format!("protocol {:?}: expected TCP, UDP or SCTP", clip(s))))
}

/// The flow to explain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub from: EndpointSpec,
    pub to: EndpointSpec,
    pub port: PortSpec,
    pub protocol: Protocol,
}

impl Flow {
    /// One line of a probes file: `FROM TO PORT PROTOCOL` separated by tabs or spaces.
    pub fn parse_line(line: &str) -> Result<Flow, NetpolError> {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() != 4 {
            return Err(bad(format!(
                "expected 4 fields (from to port protocol), got {}",
                w.len()
            )));
        }
        Ok(Flow {
            from: w[0].parse()?,
            to: w[1].parse()?,
            port: w[2].parse()?,
            protocol: parse_protocol(w[3])?,
        })
    }
}

/// What an address is, for Palisade.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointKind {
    /// An active pod with its own address.
    Pod,
    /// A pod on the host network (it has its node's address; never isolated).
    HostNetworkPod,
    /// One of a Node's addresses.
    Node,
    /// An address in a node's pod CIDR that belongs to no pod we know (first-instant rule).
    UnknownPod,
    /// Anything else.
    External,
}

impl EndpointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointKind::Pod => "pod",
            EndpointKind::HostNetworkPod => "host-network-pod",
            EndpointKind::Node => "node",
            EndpointKind::UnknownPod => "unknown-pod",
            EndpointKind::External => "external",
        }
    }

    /// Whether our chains police this address's own traffic on its node.
    fn policed(self) -> bool {
        matches!(self, EndpointKind::Pod | EndpointKind::UnknownPod)
    }
}

/// A resolved side of the flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// As given (`ns/name` or the IP).
    pub given: String,
    pub ip: IpAddr,
    pub kind: EndpointKind,
    /// `ns/name` of the pod, when it is one.
    pub pod: Option<String>,
    /// The node it is on (pods, host-network pods, nodes, addresses in a node's pod CIDR).
    pub node: Option<String>,
}

impl Endpoint {
    fn describe(&self) -> String {
        let what = match (&self.pod, self.kind) {
            (Some(p), EndpointKind::Pod) if *p == self.given => "pod".to_string(),
            (Some(p), EndpointKind::Pod) => format!("pod {p}"),
            (Some(p), _) if *p == self.given => "host-network pod".to_string(),
            (Some(p), _) => format!("host-network pod {p}"),
            (None, EndpointKind::Node) => "node address".into(),
            (None, EndpointKind::UnknownPod) => "no known pod, in the node's pod CIDR".into(),
            _ => "external".into(),
        };
        match &self.node {
            Some(n) => format!("{} ({what}, {}, node {n})", self.given, self.ip),
            None if self.given == self.ip.to_string() => format!("{} ({what})", self.ip),
            None => format!("{} ({what}, {})", self.given, self.ip),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "ip": self.ip.to_string(),
            "kind": self.kind.as_str(),
            "pod": self.pod,
            "node": self.node,
        })
    }
}

/// Allowed or denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Denied,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Denied => "denied",
        }
    }
}

/// A policy rule a traced packet matched (read from its comment, see [`crate::provenance`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleHit {
    pub rule: RuleRef,
    /// What the rule matched the peer on (a set's identity, a CIDR, `any`).
    pub peer: String,
    /// What it matched the port on.
    pub port: String,
    /// What the rule did (`allow`, `deny`, `pass`, ...).
    pub action: &'static str,
}

impl RuleHit {
    fn describe(&self) -> String {
        format!(
            "{} {} rule {} (peer: {}; port: {})",
            self.rule.policy.short(),
            self.rule.direction,
            self.rule.index,
            self.peer,
            self.port
        )
    }

    fn to_json(&self) -> Value {
        json!({
            "policy": self.rule.policy.short(),
            "kind": self.rule.policy.kind,
            "direction": self.rule.direction,
            "index": self.rule.index,
            "peer": self.peer,
            "port": self.port,
            "action": self.action,
        })
    }
}

/// One direction of the flow: egress from the source, or ingress into the destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Side {
    /// `egress` or `ingress`.
    pub direction: &'static str,
    /// The node whose rules decided it; `None` when Palisade enforces nothing for this side
    /// (the endpoint is external, a node, or a host-network pod).
    pub node: Option<String>,
    pub decision: Decision,
    /// Whether any policy isolates the endpoint in this direction.
    pub isolated: bool,
    /// The policies isolating it (`KIND/SCOPE/NAME`, e.g. `np/x/deny-all`).
    pub isolated_by: Vec<PolicyRef>,
    /// The rules that let the flow through (the first one decides).
    pub allowed_by: Vec<RuleHit>,
    /// The rule that dropped it, when the drop came from a policy rule (a deny rule).
    pub denied_by: Option<RuleHit>,
    /// One sentence for people.
    pub reason: String,
    /// Isolated only by audit-mode policies (`palisade.dev/enforcement: audit`).
    pub audit: bool,
    /// Those audit-mode policies would deny the flow (it is let through).
    pub would_deny: bool,
}

impl Side {
    fn to_json(&self) -> Value {
        json!({
            "node": self.node,
            "verdict": self.decision.as_str(),
            "isolated": self.isolated,
            "isolated_by": self.isolated_by.iter().map(PolicyRef::short).collect::<Vec<_>>(),
            "allowed_by": self.allowed_by.iter().map(RuleHit::to_json).collect::<Vec<_>>(),
            "denied_by": self.denied_by.as_ref().map(RuleHit::to_json),
            "reason": self.reason,
            "audit": self.audit,
            "would_deny": self.would_deny,
        })
    }
}

/// One packet trace on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    pub node: String,
    /// `FORWARD` or `INPUT`.
    pub chain: &'static str,
    pub decision: Decision,
    /// `CHAIN#index -> target` of every rule that matched.
    pub path: Vec<String>,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub from: Endpoint,
    pub to: Endpoint,
    pub port: u16,
    /// The port name given, resolved on the destination pod.
    pub port_name: Option<String>,
    pub protocol: Protocol,
    pub decision: Decision,
    /// The verdict if the audit-mode policies were enforced too.
    pub audit_decision: Decision,
    pub egress: Side,
    pub ingress: Side,
    pub hops: Vec<Hop>,
    /// Why, in one sentence.
    pub reason: String,
}

impl Explanation {
    /// One JSON object (the `--probes` output line): `from`, `to`, `port`, `protocol`,
    /// `verdict`, `reason`, and the details per side.
    pub fn to_json(&self) -> Value {
        json!({
            "from": self.from.given,
            "to": self.to.given,
            "port": self.port_name.clone().map_or_else(|| json!(self.port), Value::from),
            "protocol": self.protocol.as_str().to_uppercase(),
            "verdict": self.decision.as_str(),
            "audit_verdict": self.audit_decision.as_str(),
            "reason": self.reason,
            "resolved_port": self.port,
            "source": self.from.to_json(),
            "destination": self.to.to_json(),
            "egress": self.egress.to_json(),
            "ingress": self.ingress.to_json(),
            "hops": self.hops.iter().map(|h| json!({
                "node": h.node,
                "chain": h.chain,
                "verdict": h.decision.as_str(),
                "path": h.path,
            })).collect::<Vec<_>>(),
        })
    }

    /// The human form the CLI prints.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let port = match &self.port_name {
            Some(n) => format!(
                "{}/{} ({n})",
                self.protocol.as_str().to_uppercase(),
                self.port
            ),
            None => format!("{}/{}", self.protocol.as_str().to_uppercase(), self.port),
        };
        let _ = writeln!(
            out,
            "{}: {} -> {} {port}",
            self.decision.as_str().to_uppercase(),
            self.from.describe(),
            self.to.describe()
        );
        let _ = writeln!(out, "  {}", self.reason);
        if self.audit_decision != self.decision {
            let _ = writeln!(
                out,
                "  with the audit-mode policies enforced: {}",
                self.audit_decision.as_str().to_uppercase()
            );
        }
        for side in [&self.egress, &self.ingress] {
            let node = side
                .node
                .as_deref()
                .map(|n| format!(" on {n}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {}{node}: {}",
                side.direction,
                side.decision.as_str()
            );
            if !side.isolated_by.is_empty() {
                let list: Vec<String> = side.isolated_by.iter().map(PolicyRef::short).collect();
                let _ = writeln!(out, "    isolated by: {}", list.join(", "));
            }
            let _ = writeln!(out, "    {}", side.reason);
        }
        for h in &self.hops {
            let _ = writeln!(
                out,
                "  trace on {} ({}): {}",
                h.node,
                h.chain,
                h.path.join(", ")
            );
        }
        out
    }
}

/// Knobs that change the compiled rules.
#[derive(Clone, Debug)]
pub struct ExplainOptions {
    /// The agents' `--block-unknown-pods` (default on).
    pub block_unknown_pods: bool,
}

impl Default for ExplainOptions {
    fn default() -> Self {
        ExplainOptions {
            block_unknown_pods: true,
        }
    }
}

struct NodeInfo {
    name: String,
    addresses: Vec<IpAddr>,
    pod_cidrs: Vec<IpNetwork>,
}

/// Explains flows over one cluster snapshot; compiled rules are cached per node and family,
/// so a probes file over many flows compiles each node once.
pub struct Explainer<'s> {
    state: &'s ClusterState,
    options: ExplainOptions,
    nodes: Vec<NodeInfo>,
    tracers: HashMap<(String, Family), Tracer>,
}

impl<'s> Explainer<'s> {
    pub fn new(state: &'s ClusterState, options: ExplainOptions) -> Explainer<'s> {
        let nodes = state
            .nodes
            .iter()
            .rev() // a later object with the same name wins
            .filter_map(|n| node_info(n))
            .fold(Vec::<NodeInfo>::new(), |mut acc, n| {
                if !acc.iter().any(|o| o.name == n.name) {
                    acc.push(n);
                }
                acc
            });
        Explainer {
            state,
            options,
            nodes,
            tracers: HashMap::new(),
        }
    }

    /// Explains one flow. Errors only when the flow cannot be resolved.
    pub fn explain(&mut self, flow: &Flow) -> Result<Explanation, NetpolError> {
        let family = self.family(flow)?;
        let from = self.resolve(&flow.from, family)?;
        let to = self.resolve(&flow.to, family)?;
        let (port, port_name) = match &flow.port {
            PortSpec::Number(n) => (*n, None),
            PortSpec::Name(name) => (
                self.named_port(&flow.to, name, flow.protocol)?,
                Some(name.clone()),
            ),
        };
        let mut hops = Vec::new();
        let mut traces = Vec::new();
        let same_pod = from.kind == EndpointKind::Pod && from.ip == to.ip;
        if !same_pod {
            let mut pkt = Packet {
                src: from.ip,
                dst: to.ip,
                proto: flow.protocol,
                dport: port,
                state: CtState::New,
                src_local: false,
                icmp6_type: None,
                in_iface: None,
                physdev_in: None,
                physdev_out: None,
                related_to: None,
                mid_stream: false,
            };
            // 1. Leaving the source's node (its egress rules).
            let mut src_forward_node = None;
            if let (true, Some(a)) = (from.kind.policed(), from.node.clone()) {
                let to_this_node = !to.kind.policed() && to.node.as_deref() == Some(a.as_str());
                let chain = if to_this_node { "INPUT" } else { "FORWARD" };
                if chain == "FORWARD" {
                    src_forward_node = Some(a.clone());
                }
                traces.push(self.trace(&a, family, chain, &pkt)?);
            }
            // 2. Arriving at the destination's node (its ingress rules).
            if let Some(b) = to.node.clone() {
                let covered = if to.kind.policed() {
                    src_forward_node.as_deref() == Some(b.as_str())
                } else {
                    from.kind.policed() && from.node.as_deref() == Some(b.as_str())
                };
                if !covered {
                    pkt.src_local = self.node_has_address(&b, from.ip);
                    let chain = if to.kind.policed() {
                        "FORWARD"
                    } else {
                        "INPUT"
                    };
                    traces.push(self.trace(&b, family, chain, &pkt)?);
                }
            }
        }
        for (node, chain, t) in &traces {
            hops.push(Hop {
                node: node.clone(),
                chain,
                decision: decision(t.verdict),
                path: t.path.clone(),
            });
        }
        let find = |node: &Option<String>| {
            node.as_ref()
                .and_then(|n| traces.iter().find(|(tn, _, _)| tn == n))
        };
        let egress = side(
            "egress",
            &from,
            from.kind.policed().then(|| find(&from.node)).flatten(),
        );
        let ingress = side(
            "ingress",
            &to,
            to.kind.policed().then(|| find(&to.node)).flatten(),
        );
        let dropped = traces.iter().find(|(_, _, t)| t.verdict == Verdict::Drop);
        let decision = if dropped.is_some() {
            Decision::Denied
        } else {
            Decision::Allowed
        };
        let reason = if same_pod {
            "a pod reaching its own address never leaves it (loopback): always allowed".into()
        } else {
            match (egress.decision, ingress.decision, dropped) {
                (Decision::Denied, _, _) => format!("egress: {}", egress.reason),
                (_, Decision::Denied, _) => format!("ingress: {}", ingress.reason),
                (_, _, Some((node, _, t))) => {
                    format!(
                        "dropped on {node} by {}",
                        t.path.last().cloned().unwrap_or_default()
                    )
                }
                _ => "allowed in both directions".into(),
            }
        };
        let audit_decision =
            if decision == Decision::Denied || egress.would_deny || ingress.would_deny {
                Decision::Denied
            } else {
                Decision::Allowed
            };
        Ok(Explanation {
            from,
            to,
            port,
            port_name,
            protocol: flow.protocol,
            decision,
            audit_decision,
            egress,
            ingress,
            hops,
            reason,
        })
    }

    /// The family of the flow: an explicit address decides; two pods use IPv4 when both
    /// have one, else IPv6.
    fn family(&self, flow: &Flow) -> Result<Family, NetpolError> {
        let fam = |ip: &IpAddr| if ip.is_ipv4() { Family::V4 } else { Family::V6 };
        match (&flow.from, &flow.to) {
            (EndpointSpec::Ip(a), EndpointSpec::Ip(b)) if fam(a) != fam(b) => Err(bad(format!(
                "{a} and {b} are of different address families"
            ))),
            (EndpointSpec::Ip(a), _) | (_, EndpointSpec::Ip(a)) => Ok(fam(a)),
            (from, to) => {
                for f in [Family::V4, Family::V6] {
                    let has = |e: &EndpointSpec| {
                        self.find_pod(e)
                            .is_some_and(|p| matches!(pod_ip(p, f), Ok(Some(_))))
                    };
                    if has(from) && has(to) {
                        return Ok(f);
                    }
                }
                Ok(Family::V4)
            }
        }
    }

    fn find_pod(&self, e: &EndpointSpec) -> Option<&'s Pod> {
        let EndpointSpec::Pod { namespace, name } = e else {
            return None;
        };
        self.state.pods.iter().rev().map(|p| &**p).find(|p| {
            p.metadata.namespace.as_deref() == Some(namespace.as_str())
                && p.metadata.name.as_deref() == Some(name.as_str())
        })
    }

    fn resolve(&self, e: &EndpointSpec, family: Family) -> Result<Endpoint, NetpolError> {
        match e {
            EndpointSpec::Pod { .. } => {
                let pod = self
                    .find_pod(e)
                    .ok_or_else(|| bad(format!("pod {e} not found")))?;
                let finished = matches!(
                    pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                );
                if finished {
                    return Err(bad(format!("pod {e} has finished; it has no traffic")));
                }
                let ip = pod_ip(pod, family)
                    .map_err(|b| bad(format!("pod {e}: IP {b:?} does not parse")))?
                    .ok_or_else(|| bad(format!("pod {e} has no IPv{} address", family.tag())))?;
                let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
                let kind = if is_active(pod) {
                    EndpointKind::Pod
                } else {
                    EndpointKind::HostNetworkPod
                };
                Ok(Endpoint {
                    given: e.to_string(),
                    ip,
                    kind,
                    pod: Some(e.to_string()),
                    node,
                })
            }
            EndpointSpec::Ip(ip) => Ok(self.resolve_ip(*ip)),
        }
    }

    fn resolve_ip(&self, ip: IpAddr) -> Endpoint {
        let family = if ip.is_ipv4() { Family::V4 } else { Family::V6 };
        let mut out = Endpoint {
            given: ip.to_string(),
            ip,
            kind: EndpointKind::External,
            pod: None,
            node: None,
        };
        // An active pod with this address (the last one listed wins, as in the compiler's
        // de-duplication of equal names; two pods with one IP are a diagnostic there).
        let pod = self
            .state
            .pods
            .iter()
            .rev()
            .find(|p| is_active(p) && matches!(pod_ip(p, family), Ok(Some(a)) if a == ip));
        if let Some(p) = pod {
            out.kind = EndpointKind::Pod;
            out.pod = Some(format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default()
            ));
            out.node = p.spec.as_ref().and_then(|s| s.node_name.clone());
            return out;
        }
        if let Some(n) = self.nodes.iter().find(|n| n.addresses.contains(&ip)) {
            out.kind = EndpointKind::Node;
            out.node = Some(n.name.clone());
            return out;
        }
        if let Some(n) = self
            .nodes
            .iter()
            .find(|n| n.pod_cidrs.iter().any(|c| c.contains(ip)))
        {
            out.kind = EndpointKind::UnknownPod;
            out.node = Some(n.name.clone());
        }
        out
    }

    fn named_port(
        &self,
        to: &EndpointSpec,
        name: &str,
        proto: Protocol,
    ) -> Result<u16, NetpolError> {
        let pod = self.find_pod(to).ok_or_else(|| {
            bad(format!(
                "port name {name:?} needs a destination pod (NAMESPACE/POD), not {to}"
            ))
        })?;
        pod.spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| {
                p.name.as_deref() == Some(name)
                    && Protocol::parse(p.protocol.as_deref()) == Some(proto)
            })
            .and_then(|p| u16::try_from(p.container_port).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                bad(format!(
                    "pod {to} declares no {} port named {name:?}",
                    proto.as_str().to_uppercase()
                ))
            })
    }

    fn node_has_address(&self, node: &str, ip: IpAddr) -> bool {
        self.nodes
            .iter()
            .any(|n| n.name == node && n.addresses.contains(&ip))
            || self.state.pods.iter().any(|p| {
                !is_active(p)
                    && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
                    && matches!(pod_ip(p, if ip.is_ipv4() { Family::V4 } else { Family::V6 }), Ok(Some(a)) if a == ip)
            })
    }

    fn trace(
        &mut self,
        node: &str,
        family: Family,
        chain: &'static str,
        pkt: &Packet,
    ) -> Result<(String, &'static str, crate::trace::Trace), NetpolError> {
        let key = (node.to_string(), family);
        if !self.tracers.contains_key(&key) {
            let mut cfg = NodeConfig::new(node);
            cfg.family = family;
            cfg.block_unknown_pods = self.options.block_unknown_pods;
            // Anti-spoofing only drops forged sources; explained flows are never forged.
            cfg.anti_spoofing = false;
            // The agents log denied packets by default: trace through those rules too.
            cfg.deny_log = Some(crate::DenyLog::default());
            let payload = render(&compile(self.state, &cfg));
            self.tracers.insert(key.clone(), Tracer::new(&payload)?);
        }
        let tracer = &self.tracers[&key];
        Ok((node.to_string(), chain, tracer.trace(chain, pkt)?))
    }
}

fn node_info(n: &Node) -> Option<NodeInfo> {
    let name = n.metadata.name.clone()?;
    let addresses = n
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter_map(|a| IpAddr::from_str(&a.address).ok())
        .collect();
    let spec = n.spec.as_ref();
    let cidrs: Vec<&String> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(l) if !l.is_empty() => l.iter().collect(),
        _ => spec.and_then(|s| s.pod_cidr.as_ref()).into_iter().collect(),
    };
    let pod_cidrs = cidrs
        .into_iter()
        .filter_map(|c| IpNetwork::from_str(c).ok())
        .collect();
    Some(NodeInfo {
        name,
        addresses,
        pod_cidrs,
    })
}

fn decision(v: Verdict) -> Decision {
    match v {
        Verdict::Accept => Decision::Allowed,
        Verdict::Drop => Decision::Denied,
    }
}

/// Which direction a traced rule belongs to: under the egress / ingress dispatch chain, or
/// (for chains outside them) the direction its provenance comment names.
fn direction_of(step: &Step) -> Option<&'static str> {
    let under = |c: &str| step.chain == c || step.via.iter().any(|v| v == c);
    if under(names::EGRESS_CHAIN) {
        return Some("egress");
    }
    if under(names::INGRESS_CHAIN) {
        return Some("ingress");
    }
    let rule = step.comment.as_deref().and_then(RuleRef::parse)?;
    match rule.direction.as_str() {
        "egress" => Some("egress"),
        "ingress" => Some("ingress"),
        _ => None,
    }
}

fn action_word(a: &Action) -> &'static str {
    match a {
        Action::Drop => "deny",
        Action::Mark(true) | Action::Accept => "allow",
        Action::Return | Action::Goto(_) | Action::Jump(_) => "pass",
        Action::Mark(false) | Action::Log(_) => "none",
    }
}

/// Builds one side from the trace on the endpoint's node (`None`: not policed).
fn side(
    direction: &'static str,
    ep: &Endpoint,
    trace: Option<&(String, &'static str, crate::trace::Trace)>,
) -> Side {
    let who = ep.pod.clone().unwrap_or_else(|| ep.ip.to_string());
    let Some((node, _, t)) = trace else {
        let reason = match (ep.kind, direction) {
            (EndpointKind::External, "egress") => {
                "the source is outside the cluster: no egress policy applies"
            }
            (EndpointKind::External, _) => {
                "the destination is outside the cluster: no ingress policy applies"
            }
            (EndpointKind::Node | EndpointKind::HostNetworkPod, "egress") => {
                "the source is on a node's network: no egress policy applies"
            }
            (EndpointKind::Node | EndpointKind::HostNetworkPod, _) => {
                "the destination is on a node's network: no ingress policy applies"
            }
            _ => "the pod is on no node yet: nothing enforces it",
        };
        return Side {
            direction,
            node: None,
            decision: Decision::Allowed,
            isolated: false,
            isolated_by: Vec::new(),
            allowed_by: Vec::new(),
            denied_by: None,
            reason: reason.into(),
            audit: false,
            would_deny: false,
        };
    };
    let profile_prefix = if direction == "egress" {
        names::EGRESS_PROFILE_PREFIX
    } else {
        names::INGRESS_PROFILE_PREFIX
    };
    let mut isolated_by = Vec::new();
    let mut allowed_by = Vec::new();
    let mut denied_by = None;
    let mut isolated = false;
    let mut audit = false;
    let mut would_deny = false;
    let mut drop: Option<&Step> = None;
    let mut ports_peer: Option<String> = None;
    for s in t
        .steps
        .iter()
        .filter(|s| direction_of(s) == Some(direction))
    {
        match s.comment.as_deref() {
            Some(crate::AUDIT_PROFILE_COMMENT) => audit = true,
            Some(crate::WOULD_DENY_COMMENT) => would_deny = true,
            _ => {}
        }
        if let Action::Goto(c) | Action::Jump(c) = &s.action {
            if c.starts_with(profile_prefix) {
                isolated = true;
            }
        }
        let rule = s.comment.as_deref().and_then(RuleRef::parse);
        let policy = s.comment.as_deref().and_then(PolicyRef::parse);
        if let (Some(p), Action::Jump(_) | Action::Goto(_)) = (policy, &s.action) {
            isolated = true;
            if !isolated_by.contains(&p) {
                isolated_by.push(p);
            }
        }
        if let Some(rule) = rule {
            // A large rule's port groups live in their own chain, jumped to per peer: the
            // peer is the jump's.
            if let Action::Jump(c) = &s.action {
                if c.starts_with(names::RULE_PORTS_PREFIX) {
                    ports_peer = Some(s.peer.clone());
                }
            }
            let peer = match &ports_peer {
                Some(p) if s.chain.starts_with(names::RULE_PORTS_PREFIX) => p.clone(),
                _ => s.peer.clone(),
            };
            let hit = RuleHit {
                rule,
                peer,
                port: s.port.clone(),
                action: action_word(&s.action),
            };
            match s.action {
                Action::Drop => denied_by = Some(hit),
                Action::Mark(true) | Action::Accept | Action::Return => allowed_by.push(hit),
                _ => {}
            }
        }
        if s.action == Action::Drop {
            drop = Some(s);
        }
    }
    let policies: Vec<String> = isolated_by.iter().map(PolicyRef::short).collect();
    let (decision, reason) = match drop {
        Some(s) => {
            let why = if let Some(hit) = &denied_by {
                format!("denied by {}", hit.describe())
            } else if s.chain.starts_with(profile_prefix) {
                format!(
                    "{who} is isolated for {direction} by {} and no rule of {} allows this flow",
                    policies.join(", "),
                    if policies.len() == 1 { "it" } else { "them" }
                )
            } else if s.comment.as_deref() == Some("local pod not known yet") {
                format!(
                    "{} is in {node}'s pod CIDR but no pod the agent knows has it: \
                     dropped until its pod is programmed (first-instant rule)",
                    ep.ip
                )
            } else {
                format!(
                    "dropped by {}#{}{}",
                    s.chain,
                    s.index,
                    s.comment
                        .as_deref()
                        .map(|c| format!(" ({c})"))
                        .unwrap_or_default()
                )
            };
            (Decision::Denied, why)
        }
        None if !isolated => (
            Decision::Allowed,
            format!("no policy isolates {who} for {direction}"),
        ),
        None if would_deny => (
            Decision::Allowed,
            format!(
                "{who} is isolated for {direction} only by audit-mode policies ({}); none of \
                 them allows this flow, so it would be denied once they are enforced: \
                 let through and logged as would-deny",
                policies.join(", ")
            ),
        ),
        None => match allowed_by.first() {
            Some(hit) if audit => (
                Decision::Allowed,
                format!("allowed (audit mode) by {}", hit.describe()),
            ),
            Some(hit) => (Decision::Allowed, format!("allowed by {}", hit.describe())),
            None => (
                Decision::Allowed,
                format!(
                    "{who} is isolated by {} and the flow passed",
                    policies.join(", ")
                ),
            ),
        },
    };
    Side {
        direction,
        node: Some(node.clone()),
        decision,
        isolated,
        isolated_by,
        allowed_by,
        denied_by,
        reason,
        audit,
        would_deny,
    }
}

fn bad(message: String) -> NetpolError {
    NetpolError::Explain(message)
}

fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Trace;

    fn step(chain: &str, via: &[&str], action: Action, comment: Option<&str>) -> Step {
        Step {
            chain: chain.into(),
            index: 0,
            via: via.iter().map(|s| s.to_string()).collect(),
            action,
            comment: comment.map(str::to_string),
            peer: "cidr 10.0.0.0/8".into(),
            port: "TCP 80".into(),
            rule: String::new(),
        }
    }

    fn pod() -> Endpoint {
        Endpoint {
            given: "x/a".into(),
            ip: "10.244.1.2".parse().unwrap(),
            kind: EndpointKind::Pod,
            pod: Some("x/a".into()),
            node: Some("node1".into()),
        }
    }

    /// Rules of another compiler (ClusterNetworkPolicy tiers) are explained from their
    /// comments alone, wherever their chains hang.
    #[test]
    fn tier_rules_are_explained_from_their_comments() {
        let t = Trace {
            verdict: Verdict::Drop,
            path: vec![],
            steps: vec![
                step(
                    "PALISADE-FORWARD",
                    &["FORWARD"],
                    Action::Jump("PAL-CNP-ADMIN".into()),
                    None,
                ),
                step(
                    "PAL-CNP-ADMIN",
                    &["FORWARD", "PALISADE-FORWARD"],
                    Action::Jump("PAL-CNPI-X".into()),
                    Some("cnp/admin/block-db"),
                ),
                step(
                    "PAL-CNPI-X",
                    &["FORWARD", "PALISADE-FORWARD", "PAL-CNP-ADMIN"],
                    Action::Drop,
                    Some("cnp/admin/block-db/ingress/2"),
                ),
            ],
        };
        let hop = ("node1".to_string(), "FORWARD", t);
        let s = side("ingress", &pod(), Some(&hop));
        assert_eq!(s.decision, Decision::Denied);
        let hit = s.denied_by.as_ref().unwrap();
        assert_eq!(hit.rule.policy.short(), "cnp/admin/block-db");
        assert_eq!(hit.rule.index, 2);
        assert_eq!(hit.action, "deny");
        assert!(s
            .reason
            .starts_with("denied by cnp/admin/block-db ingress rule 2"));
        // The egress side saw none of it.
        let e = side("egress", &pod(), Some(&hop));
        assert_eq!(e.decision, Decision::Allowed);
        assert!(!e.isolated);
    }
}
