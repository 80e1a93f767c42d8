//! The denied-traffic log, pure part: what a packet the kernel sent to NFLOG means.
//!
//! ```text
//!  NFLOG message (prefix, IP packet bytes)          ── read by palisade-dataplane (netlink)
//!     │ parse_packet: addresses, protocol, destination port
//!     │ prefix: PAL-IN-<profile> / PAL-EG-<profile> (a profile chain dropped it: the policies
//!     │         isolating the pod are that chain's) or PALISADE-UNKNOWN-IN/-EG (first-instant)
//!     ▼
//!  DenyIndex (built from the snapshot + compiled rules at every sync): IP → pod,
//!            profile chain → policies
//!     ▼
//!  DeniedFlow ─► Dedup (one line per flow and window) ─► text / JSON line, metric, Event
//! ```
//!
//! The kernel rate-limits per pod (hashlimit) before NFLOG; [`Dedup`] then folds the few
//! packets of one flow (SYN retransmissions) into one line.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use serde_json::json;

use crate::ir::{Compiled, Match, Protocol, Target};
use crate::model::{is_active, pod_ip};
use crate::provenance::PolicyRef;
use crate::{names, ClusterState, Family};

/// NFLOG prefixes of the first-instant rule (an address of this node's pod CIDR no known
/// pod has), per direction.
pub const PREFIX_UNKNOWN_INGRESS: &str = "PALISADE-UNKNOWN-IN";
pub const PREFIX_UNKNOWN_EGRESS: &str = "PALISADE-UNKNOWN-EG";

/// Addresses and ports of a logged IP packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP, ...).
    pub proto: u8,
    /// Destination port for TCP, UDP and SCTP.
    pub dport: Option<u16>,
}

impl PacketInfo {
    pub fn protocol_name(&self) -> String {
        match self.proto {
            6 => "TCP".into(),
            17 => "UDP".into(),
            132 => "SCTP".into(),
            1 => "ICMP".into(),
            58 => "ICMPv6".into(),
            n => format!("proto-{n}"),
        }
    }
}

/// Parses the network header (IPv4 or IPv6, IPv6 extension headers skipped) and the
/// transport ports. `None` for anything truncated or malformed; never panics.
pub fn parse_packet(b: &[u8]) -> Option<PacketInfo> {
    let version = b.first()? >> 4;
    let (src, dst, mut proto, mut off) = match version {
        4 => {
            let ihl = usize::from(b.first()? & 0x0f) * 4;
            if ihl < 20 || b.len() < ihl {
                return None;
            }
            let src: [u8; 4] = b.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = b.get(16..20)?.try_into().ok()?;
            // A non-first fragment carries no ports.
            let frag = u16::from_be_bytes([*b.get(6)?, *b.get(7)?]) & 0x1fff;
            let proto = *b.get(9)?;
            if frag != 0 {
                return Some(PacketInfo {
                    src: IpAddr::from(src),
                    dst: IpAddr::from(dst),
                    proto,
                    dport: None,
                });
            }
            (IpAddr::from(src), IpAddr::from(dst), proto, ihl)
        }
        6 => {
            let src: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = b.get(24..40)?.try_into().ok()?;
            (IpAddr::from(src), IpAddr::from(dst), *b.get(6)?, 40)
        }
        _ => return None,
    };
    if version == 6 {
        // Hop-by-hop, routing, destination options: skip; a fragment header ends it.
        for _ in 0..8 {
            match proto {
                0 | 43 | 60 => {
                    proto = *b.get(off)?;
                    off += (usize::from(*b.get(off + 1)?) + 1) * 8;
                }
                44 => {
                    proto = *b.get(off)?;
                    return Some(PacketInfo {
                        src,
                        dst,
                        proto,
                        dport: None,
                    });
                }
                _ => break,
            }
        }
    }
    let dport = match proto {
        6 | 17 | 132 => Some(u16::from_be_bytes([*b.get(off + 2)?, *b.get(off + 3)?])),
        _ => None,
    };
    Some(PacketInfo {
        src,
        dst,
        proto,
        dport,
    })
}

/// What an address is, as the log names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Party {
    pub ip: IpAddr,
    /// `ns/name` of the pod, `None` for "external" (or a node).
    pub pod: Option<(String, String)>,
}

impl Party {
    pub fn name(&self) -> String {
        match &self.pod {
            Some((ns, n)) => format!("{ns}/{n}"),
            None => "external".into(),
        }
    }
}

/// One denied packet, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeniedFlow {
    /// `ingress` (into a local pod) or `egress` (out of one).
    pub direction: &'static str,
    pub protocol: String,
    pub dport: Option<u16>,
    pub src: Party,
    pub dst: Party,
    /// The policies isolating the local pod in that direction (`ns/name`); empty for the
    /// first-instant rule.
    pub policies: Vec<String>,
    /// `denied` (a policy isolation dropped it), `would-deny` (audit-mode policies would
    /// have; it was let through) or `unknown-pod` (first-instant rule).
    pub cause: &'static str,
    /// The local pod the counter and the Event are for (the isolated side); `None` for an
    /// address no pod has.
    pub local_pod: Option<(String, String)>,
}

impl DeniedFlow {
    /// The flow identity used for de-duplication.
    fn key(&self) -> (IpAddr, IpAddr, String, Option<u16>, &'static str) {
        (
            self.src.ip,
            self.dst.ip,
            self.protocol.clone(),
            self.dport,
            self.direction,
        )
    }

    /// `key=value` text (values with spaces quoted), after `time=`.
    pub fn to_text(&self, time: &str) -> String {
        format!(
            "time={time} verdict={} direction={} protocol={} src={} dst={} dport={} \
             src_pod={} dst_pod={} policies={}",
            self.cause,
            self.direction,
            self.protocol,
            self.src.ip,
            self.dst.ip,
            self.dport
                .map_or_else(|| "-".to_string(), |p| p.to_string()),
            self.src.name(),
            self.dst.name(),
            if self.policies.is_empty() {
                "-".to_string()
            } else {
                self.policies.join(",")
            },
        )
    }

    pub fn to_json(&self, time: &str) -> serde_json::Value {
        json!({
            "time": time,
            "verdict": self.cause,
            "direction": self.direction,
            "protocol": self.protocol,
            "src": self.src.ip.to_string(),
            "dst": self.dst.ip.to_string(),
            "dport": self.dport,
            "src_pod": self.src.name(),
            "dst_pod": self.dst.name(),
            "policies": self.policies,
        })
    }

    /// The note of the Event on the local pod.
    pub fn event_note(&self) -> String {
        let port = self.dport.map(|p| format!("/{p}")).unwrap_or_default();
        let policies = if self.policies.is_empty() {
            String::new()
        } else {
            format!(" (isolated by {})", self.policies.join(", "))
        };
        let what = if self.cause == "would-deny" {
            "would be denied (audit mode, let through)"
        } else {
            "denied"
        };
        format!(
            "{} {}{port} from {} ({}) to {} ({}) {what}{policies}",
            self.direction,
            self.protocol,
            self.src.name(),
            self.src.ip,
            self.dst.name(),
            self.dst.ip
        )
    }
}

/// Address → pod and profile chain → policies, rebuilt at every sync.
#[derive(Clone, Debug, Default)]
pub struct DenyIndex {
    pods: HashMap<IpAddr, (String, String)>,
    /// Profile chain → (isolating policies, audit mode).
    profiles: HashMap<String, (Vec<String>, bool)>,
}

impl DenyIndex {
    /// From the snapshot the rules were compiled from and the compiled rules (one per
    /// address family).
    pub fn new<'c>(state: &ClusterState, compiled: impl IntoIterator<Item = &'c Compiled>) -> Self {
        let mut pods = HashMap::with_capacity(state.pods.len());
        for p in &state.pods {
            if !is_active(p) {
                continue;
            }
            let (Some(ns), Some(name)) =
                (p.metadata.namespace.as_deref(), p.metadata.name.as_deref())
            else {
                continue;
            };
            for f in [Family::V4, Family::V6] {
                if let Ok(Some(ip)) = pod_ip(p, f) {
                    pods.insert(ip, (ns.to_string(), name.to_string()));
                }
            }
        }
        let mut profiles = HashMap::new();
        for c in compiled {
            for ch in &c.chains {
                // A ClusterNetworkPolicy chain logs its own Deny rules: name that policy.
                if ch.name.starts_with(names::INGRESS_CNP_PREFIX)
                    || ch.name.starts_with(names::EGRESS_CNP_PREFIX)
                {
                    let cnp =
                        ch.rules
                            .iter()
                            .flat_map(|r| r.matches.iter())
                            .find_map(|m| match m {
                                Match::Comment(c) => {
                                    crate::provenance::RuleRef::parse(c).map(|r| r.policy.short())
                                }
                                _ => None,
                            });
                    profiles.insert(ch.name.clone(), (cnp.into_iter().collect(), false));
                    continue;
                }
                if !(ch.name.starts_with(names::INGRESS_PROFILE_PREFIX)
                    || ch.name.starts_with(names::EGRESS_PROFILE_PREFIX))
                {
                    continue;
                }
                let audit = ch.rules.iter().any(|r| {
                    r.matches.iter().any(
                        |m| matches!(m, Match::Comment(c) if c == crate::AUDIT_PROFILE_COMMENT),
                    )
                });
                let policies: Vec<String> = ch
                    .rules
                    .iter()
                    .filter(|r| matches!(r.target, Target::Jump(_)))
                    .flat_map(|r| r.matches.iter())
                    .filter_map(|m| match m {
                        Match::Comment(c) => PolicyRef::parse(c).map(|p| p.short()),
                        _ => None,
                    })
                    .collect();
                profiles.insert(ch.name.clone(), (policies, audit));
            }
        }
        DenyIndex { pods, profiles }
    }

    fn party(&self, ip: IpAddr) -> Party {
        Party {
            ip,
            pod: self.pods.get(&ip).cloned(),
        }
    }

    /// Resolves one NFLOG message; `None` when the prefix is not one of ours.
    pub fn resolve(&self, prefix: &str, pkt: &PacketInfo) -> Option<DeniedFlow> {
        let profile = |direction: &'static str| {
            let known = self.profiles.get(prefix);
            let cause = if known.is_some_and(|(_, audit)| *audit) {
                "would-deny"
            } else {
                "denied"
            };
            (direction, cause, known.map(|(p, _)| p.clone()))
        };
        let (direction, cause, policies) = if prefix.starts_with(names::INGRESS_PROFILE_PREFIX)
            || prefix.starts_with(names::INGRESS_CNP_PREFIX)
        {
            profile("ingress")
        } else if prefix.starts_with(names::EGRESS_PROFILE_PREFIX)
            || prefix.starts_with(names::EGRESS_CNP_PREFIX)
        {
            profile("egress")
        } else if prefix == PREFIX_UNKNOWN_INGRESS {
            ("ingress", "unknown-pod", Some(Vec::new()))
        } else if prefix == PREFIX_UNKNOWN_EGRESS {
            ("egress", "unknown-pod", Some(Vec::new()))
        } else {
            return None;
        };
        let src = self.party(pkt.src);
        let dst = self.party(pkt.dst);
        let local_pod = if direction == "ingress" {
            dst.pod.clone()
        } else {
            src.pod.clone()
        };
        Some(DeniedFlow {
            direction,
            protocol: pkt.protocol_name(),
            dport: pkt.dport,
            src,
            dst,
            // A profile the index does not know (rules newer than the index): say so.
            policies: policies.unwrap_or_else(|| vec![format!("(profile {prefix})")]),
            cause,
            local_pod,
        })
    }
}

/// One line per flow per `window`: later packets of a flow within the window are counted
/// but not logged again. Holds at most `capacity` flows (the oldest are forgotten first).
#[derive(Debug)]
pub struct Dedup {
    window: Duration,
    capacity: usize,
    seen: HashMap<(IpAddr, IpAddr, String, Option<u16>, &'static str), Duration>,
}

impl Dedup {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Dedup {
            window,
            capacity: capacity.max(1),
            seen: HashMap::new(),
        }
    }

    /// Whether `flow` seen at `now` (any monotonic clock) starts a new line.
    pub fn first(&mut self, flow: &DeniedFlow, now: Duration) -> bool {
        let key = flow.key();
        if let Some(t) = self.seen.get(&key) {
            if now.saturating_sub(*t) < self.window {
                return false;
            }
        }
        if self.seen.len() >= self.capacity {
            let window = self.window;
            self.seen.retain(|_, t| now.saturating_sub(*t) < window);
            if self.seen.len() >= self.capacity {
                if let Some(oldest) = self
                    .seen
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(k, _)| k.clone())
                {
                    self.seen.remove(&oldest);
                }
            }
        }
        self.seen.insert(key, now);
        true
    }
}

/// The ports of a logged protocol, for the explain-style Protocol type (TCP/UDP/SCTP).
pub fn protocol_of(proto: u8) -> Option<Protocol> {
    match proto {
        6 => Some(Protocol::Tcp),
        17 => Some(Protocol::Udp),
        132 => Some(Protocol::Sctp),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::*;
    use crate::{compile, DenyLog, NodeConfig};
    use serde_json::json;

    fn ipv4_tcp(src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut b = vec![0u8; 40];
        b[0] = 0x45;
        b[9] = 6;
        b[12..16].copy_from_slice(&src);
        b[16..20].copy_from_slice(&dst);
        b[22..24].copy_from_slice(&dport.to_be_bytes());
        b
    }

    #[test]
    fn packets_parse_and_garbage_does_not_panic() {
        let p = parse_packet(&ipv4_tcp([10, 244, 1, 3], [10, 244, 1, 2], 80)).unwrap();
        assert_eq!(p.src.to_string(), "10.244.1.3");
        assert_eq!(p.dport, Some(80));
        assert_eq!(p.protocol_name(), "TCP");
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        v6[6] = 17;
        v6[8] = 0xfd;
        v6[24] = 0xfd;
        v6[42..44].copy_from_slice(&53u16.to_be_bytes());
        let p = parse_packet(&v6).unwrap();
        assert_eq!(p.proto, 17);
        assert_eq!(p.dport, Some(53));
        for len in 0..40 {
            let _ = parse_packet(&ipv4_tcp([1, 2, 3, 4], [5, 6, 7, 8], 1)[..len]);
            let _ = parse_packet(&v6[..len]);
        }
        assert!(parse_packet(&[0x4f; 10]).is_none());
        assert!(parse_packet(&[0x00; 60]).is_none());
    }

    #[test]
    fn prefixes_resolve_to_pods_and_isolating_policies() {
        let state = cluster(
            vec![mk_node("node1", "10.244.1.0/24")],
            vec![mk_ns("x", &[])],
            vec![
                mk_pod("x", "a", &[("pod", "a")], "10.244.1.2", "node1"),
                mk_pod("x", "b", &[("pod", "b")], "10.244.1.3", "node1"),
            ],
            vec![mk_policy(
                "x",
                "deny-all",
                json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
            )],
        );
        let mut cfg = NodeConfig::new("node1");
        cfg.deny_log = Some(DenyLog::default());
        let compiled = compile(&state, &cfg);
        let profile = compiled
            .chains
            .iter()
            .find(|c| c.name.starts_with(names::INGRESS_PROFILE_PREFIX))
            .unwrap()
            .name
            .clone();
        let index = DenyIndex::new(&state, [&compiled]);
        let pkt = parse_packet(&ipv4_tcp([10, 244, 1, 3], [10, 244, 1, 2], 80)).unwrap();
        let flow = index.resolve(&profile, &pkt).unwrap();
        assert_eq!(flow.direction, "ingress");
        assert_eq!(flow.policies, vec!["x/deny-all"]);
        assert_eq!(flow.local_pod, Some(("x".into(), "a".into())));
        let line = flow.to_text("T");
        assert_eq!(
            line,
            "time=T verdict=denied direction=ingress protocol=TCP src=10.244.1.3 \
             dst=10.244.1.2 dport=80 src_pod=x/b dst_pod=x/a policies=x/deny-all"
        );
        let ext = parse_packet(&ipv4_tcp([8, 8, 8, 8], [10, 244, 1, 2], 80)).unwrap();
        assert_eq!(
            index.resolve(&profile, &ext).unwrap().src.name(),
            "external"
        );
        assert!(index.resolve("SOMETHING-ELSE", &pkt).is_none());
        let unknown = index.resolve(PREFIX_UNKNOWN_EGRESS, &pkt).unwrap();
        assert_eq!(unknown.cause, "unknown-pod");
        assert_eq!(unknown.direction, "egress");
    }

    #[test]
    fn cluster_network_policy_denies_are_logged_and_named() {
        let mut state = cluster(
            vec![mk_node("node1", "10.244.1.0/24")],
            vec![mk_ns("x", &[]), mk_ns("y", &[])],
            vec![
                mk_pod("x", "a", &[], "10.244.1.2", "node1"),
                mk_pod("y", "b", &[], "10.244.1.3", "node1"),
            ],
            vec![],
        );
        state.cluster_policies.push(std::sync::Arc::new(mk_cnp(
            "block-x",
            json!({
                "tier": "Admin", "priority": 10,
                "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}},
                "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}],
            }),
        )));
        let mut cfg = NodeConfig::new("node1");
        cfg.deny_log = Some(DenyLog::default());
        let compiled = compile(&state, &cfg);
        let chain = compiled
            .chains
            .iter()
            .find(|c| c.name.starts_with(names::INGRESS_CNP_PREFIX))
            .expect("a CNP chain");
        assert!(
            chain.rules.iter().any(
                |r| matches!(&r.target, Target::Nflog { prefix, .. } if *prefix == chain.name)
            ),
            "the Deny rule is logged first"
        );
        let index = DenyIndex::new(&state, [&compiled]);
        let pkt = parse_packet(&ipv4_tcp([10, 244, 1, 3], [10, 244, 1, 2], 80)).unwrap();
        let flow = index.resolve(&chain.name, &pkt).unwrap();
        assert_eq!(flow.direction, "ingress");
        assert_eq!(flow.cause, "denied");
        assert_eq!(flow.policies, vec!["cnp/admin/block-x"]);
        assert_eq!(flow.src.name(), "y/b");
    }

    #[test]
    fn dedup_folds_a_flow_within_the_window_and_stays_bounded() {
        let index = DenyIndex::default();
        let flow = |d: u16| {
            index
                .resolve(
                    PREFIX_UNKNOWN_INGRESS,
                    &parse_packet(&ipv4_tcp([1, 1, 1, 1], [2, 2, 2, 2], d)).unwrap(),
                )
                .unwrap()
        };
        let mut d = Dedup::new(Duration::from_secs(10), 3);
        let s = Duration::from_secs;
        assert!(d.first(&flow(80), s(0)));
        assert!(!d.first(&flow(80), s(1)));
        assert!(!d.first(&flow(80), s(9)));
        assert!(d.first(&flow(81), s(9)));
        assert!(d.first(&flow(80), s(11)));
        for p in 100..200 {
            d.first(&flow(p), s(12));
        }
        assert!(d.seen.len() <= 3);
    }
}
