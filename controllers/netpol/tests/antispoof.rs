//! Anti-spoofing (`PALISADE-ANTISPOOF`): compile → render → trace packets that carry their
//! input interface.
//!
//! Node n1 (pod CIDR 10.244.1.0/24, fd00:10:1::/64) holds x/a, y/b and z/a; n2 holds y/r.
//! Namespace x accepts ingress only from namespace y.

use std::collections::BTreeMap;
use std::net::IpAddr;

use palisade_netpol::builders::*;
use palisade_netpol::compile::Protocol;
use palisade_netpol::names;
use palisade_netpol::trace::{CtState, Packet, Tracer, Verdict};
use palisade_netpol::{
    compile, local_pod_ips, reasons, render, ClusterState, Compiled, Family, IncrementalCompiler,
    NodeConfig, PodInterface,
};
use serde_json::json;

use Verdict::{Accept, Drop};

const XA: &str = "10.244.1.10";
const YB: &str = "10.244.1.20";
const ZA: &str = "10.244.1.30";
const YR: &str = "10.244.2.20";
const NODE: &str = "192.168.0.1";
const XA6: &str = "fd00:10:1::10";
const YB6: &str = "fd00:10:1::20";
const ZA6: &str = "fd00:10:1::30";

fn state() -> ClusterState {
    let pod = |ns: &str, name: &str, v4: &str, v6: &str, node: &str| {
        with_pod_ips(mk_pod(ns, name, &[("app", name)], v4, node), &[v4, v6])
    };
    cluster(
        vec![
            mk_node_cidrs("n1", &["10.244.1.0/24", "fd00:10:1::/64"]),
            mk_node_cidrs("n2", &["10.244.2.0/24", "fd00:10:2::/64"]),
        ],
        vec![
            mk_ns("x", &[("ns", "x")]),
            mk_ns("y", &[("ns", "y")]),
            mk_ns("z", &[("ns", "z")]),
        ],
        vec![
            pod("x", "a", XA, XA6, "n1"),
            pod("y", "b", YB, YB6, "n1"),
            pod("z", "a", ZA, ZA6, "n1"),
            pod("y", "r", YR, "fd00:10:2::20", "n2"),
            with_host_network(mk_pod("x", "host", &[("app", "h")], NODE, "n1")),
        ],
        vec![mk_policy(
            "x",
            "from-y",
            json!({"podSelector": {}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        )],
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// Interfaces of the local pods: routed (`vethXX`) or bridge ports (`brp-XX`).
fn ifaces(bridged: bool, family: Family) -> BTreeMap<IpAddr, PodInterface> {
    let list = match family {
        Family::V4 => [(XA, "xa"), (YB, "yb"), (ZA, "za")],
        Family::V6 => [(XA6, "xa"), (YB6, "yb"), (ZA6, "za")],
    };
    list.iter()
        .map(|(a, n)| {
            let i = if bridged {
                PodInterface::BridgePort(format!("brp-{n}"))
            } else {
                PodInterface::Routed(format!("veth{n}"))
            };
            (ip(a), i)
        })
        .collect()
}

fn cfg(bridged: bool, family: Family) -> NodeConfig {
    let mut c = NodeConfig::new("n1");
    c.family = family;
    c.anti_spoofing = true;
    c.pod_interfaces = ifaces(bridged, family);
    c
}

fn build(c: &NodeConfig) -> (Compiled, Tracer, String) {
    let compiled = compile(&state(), c);
    let payload = render(&compiled);
    let tracer =
        Tracer::new(&payload).unwrap_or_else(|e| panic!("{e}\n{}", payload.iptables_restore));
    (compiled, tracer, payload.iptables_restore)
}

/// A packet sent by the pod behind `who` (its veth / bridge port).
fn from_pod(p: Packet, who: &str, bridged: bool) -> Packet {
    if bridged {
        p.bridged("cni0", &format!("brp-{who}"))
    } else {
        p.entering(&format!("veth{who}"))
    }
}

fn verdict(t: &Tracer, chain: &str, p: &Packet) -> Verdict {
    t.trace(chain, p).expect("trace").verdict
}

#[test]
fn forged_sources_are_dropped_routed_and_bridged_v4_and_v6() {
    for bridged in [false, true] {
        for family in [Family::V4, Family::V6] {
            let (compiled, t, text) = build(&cfg(bridged, family));
            let what = format!("bridged={bridged} {family:?}\n{text}");
            let (xa, yb, za, node) = match family {
                Family::V4 => (XA, YB, ZA, NODE),
                Family::V6 => (XA6, YB6, ZA6, "fd00:0:0:1::1"),
            };
            // Chain first in both hooks, before conntrack.
            for base in [names::FORWARD_CHAIN, names::INPUT_CHAIN] {
                let first = &compiled.chain(base).expect("base chain").rules[0];
                assert_eq!(
                    first.target,
                    palisade_netpol::compile::Target::Jump(names::ANTISPOOF_CHAIN.into()),
                    "{what}"
                );
            }
            // At most 2 rules per local pod (3 local pods; IPv6 adds 9 shared rules: 3 for
            // DAD from `::`, 6 for link-local neighbour discovery and MLD).
            let n = compiled
                .chain(names::ANTISPOOF_CHAIN)
                .expect("chain")
                .rules
                .len();
            let shared = if family == Family::V6 { 9 } else { 0 };
            assert!(n - shared <= 2 * 3, "{what}");
            assert!(
                !compiled
                    .diagnostics
                    .iter()
                    .any(|d| d.reason == reasons::POD_INTERFACE_UNKNOWN),
                "{what}"
            );

            for proto in [Protocol::Udp, Protocol::Tcp, Protocol::Sctp] {
                // Legitimate: y/b → x/a allowed, z/a → x/a denied by policy.
                let legit = from_pod(Packet::new(yb, xa, proto, 80), "yb", bridged);
                assert_eq!(verdict(&t, "FORWARD", &legit), Accept, "{what}");
                let denied = from_pod(Packet::new(za, xa, proto, 80), "za", bridged);
                assert_eq!(verdict(&t, "FORWARD", &denied), Drop, "{what}");
                // z/a forging y/b's address, or its node's: dropped.
                for forged in [yb, node] {
                    let p = from_pod(Packet::new(forged, xa, proto, 80), "za", bridged);
                    assert_eq!(verdict(&t, "FORWARD", &p), Drop, "{forged} {what}");
                    // Even when it would match someone's conntrack entry.
                    let p = p.with_state(CtState::Established);
                    assert_eq!(verdict(&t, "FORWARD", &p), Drop, "{forged} {what}");
                    let p = from_pod(Packet::new(forged, node, proto, 80), "za", bridged);
                    assert_eq!(verdict(&t, "INPUT", &p), Drop, "{forged} {what}");
                }
            }
            // The node's own traffic and traffic from other nodes are not checked here.
            let p = Packet::tcp(node, xa, 80).from_local();
            assert_eq!(verdict(&t, "FORWARD", &p), Accept, "{what}");
            // Replies of x/a to y/b still flow.
            let p =
                from_pod(Packet::tcp(xa, yb, 80), "xa", bridged).with_state(CtState::Established);
            assert_eq!(verdict(&t, "FORWARD", &p), Accept, "{what}");
        }
    }
}

#[test]
fn ipv6_neighbour_discovery_and_dad_keep_working() {
    for bridged in [false, true] {
        let (_, t, text) = build(&cfg(bridged, Family::V6));
        let nd = |src: &str, ty: u8| {
            from_pod(Packet::icmp6(src, "ff02::1:ff00:10", ty), "za", bridged)
                .with_state(CtState::Invalid)
        };
        // DAD: Neighbor Solicitation and MLDv2 report from `::`.
        assert_eq!(verdict(&t, "INPUT", &nd("::", 135)), Accept, "{text}");
        assert_eq!(verdict(&t, "INPUT", &nd("::", 143)), Accept, "{text}");
        // Link-local NDP (NS, NA, RS).
        for ty in [133, 135, 136] {
            assert_eq!(verdict(&t, "INPUT", &nd("fe80::1", ty)), Accept, "{text}");
        }
        // From the pod's own global address: fine; from another pod's: dropped.
        assert_eq!(verdict(&t, "INPUT", &nd(ZA6, 135)), Accept, "{text}");
        assert_eq!(verdict(&t, "INPUT", &nd(YB6, 135)), Drop, "{text}");
        // `::` is only good for DAD, not for UDP.
        let p = from_pod(Packet::new("::", XA6, Protocol::Udp, 53), "za", bridged);
        assert_eq!(verdict(&t, "FORWARD", &p), Drop, "{text}");
    }
}

/// A pod's link-local ICMPv6 is only neighbour discovery and MLD: its Router Advertisement
/// or Redirect (taking over other pods' routes) and its echo past an egress policy are
/// dropped, in FORWARD (bridged: other pods) and INPUT (the node). The same from the LAN
/// (not a pod's interface) is not this chain's business.
#[test]
fn a_pods_router_advertisements_redirects_and_link_local_echo_are_dropped() {
    for bridged in [false, true] {
        let (_, t, text) = build(&cfg(bridged, Family::V6));
        let from_z = |ty: u8, dst: &str| {
            from_pod(Packet::icmp6("fe80::30", dst, ty), "za", bridged).with_state(CtState::Invalid)
        };
        for (ty, dst) in [(134, "ff02::1"), (137, "fe80::10"), (128, "fe80::10")] {
            for chain in ["FORWARD", "INPUT"] {
                assert_eq!(
                    verdict(&t, chain, &from_z(ty, dst)),
                    Drop,
                    "{ty} {chain}\n{text}"
                );
            }
        }
        for ty in [131, 132, 133, 135, 136, 143] {
            assert_eq!(
                verdict(&t, "INPUT", &from_z(ty, "ff02::16")),
                Accept,
                "{ty}\n{text}"
            );
        }
        // A router on the LAN (no pod's interface) still advertises.
        let lan = Packet::icmp6("fe80::1", "ff02::1", 134)
            .entering("eth0")
            .with_state(CtState::Invalid);
        assert_eq!(verdict(&t, "INPUT", &lan), Accept, "{text}");
    }
}

/// What a pod sends related to a connection (an ICMP error) must be about one of its own
/// connections: z/a's forged "port unreachable" about x/a's flow to y/b is dropped before the
/// RELATED accept; y/b's genuine one, and z/a's about its own flows, pass.
#[test]
fn forged_icmp_errors_about_other_pods_connections_are_dropped() {
    for bridged in [false, true] {
        for family in [Family::V4, Family::V6] {
            let (_, t, text) = build(&cfg(bridged, family));
            let what = format!("bridged={bridged} {family:?}\n{text}");
            let (xa, yb, za) = match family {
                Family::V4 => (XA, YB, ZA),
                Family::V6 => (XA6, YB6, ZA6),
            };
            let error = |from: &str, who: &str, orig: &str, repl: &str| {
                from_pod(Packet::new(from, xa, Protocol::Udp, 0), who, bridged)
                    .related_to(orig, repl)
            };
            assert_eq!(
                verdict(&t, "FORWARD", &error(za, "za", xa, yb)),
                Drop,
                "{what}"
            );
            assert_eq!(
                verdict(&t, "FORWARD", &error(za, "za", yb, xa)),
                Drop,
                "{what}"
            );
            assert_eq!(
                verdict(&t, "FORWARD", &error(yb, "yb", xa, yb)),
                Accept,
                "{what}"
            );
            assert_eq!(
                verdict(&t, "FORWARD", &error(za, "za", xa, za)),
                Accept,
                "{what}"
            );
            assert_eq!(
                verdict(&t, "FORWARD", &error(za, "za", za, xa)),
                Accept,
                "{what}"
            );
        }
    }
}

/// Bridged: what the bridge forwards to an isolated pod's port for another address
/// (broadcast, multicast, its link-local address) is judged by the pod's ingress policy:
/// denied from z/a, allowed from y/b. Neighbour discovery to the pod's groups passes.
#[test]
fn broadcast_and_multicast_bridged_to_an_isolated_pod_meet_its_policy() {
    for family in [Family::V4, Family::V6] {
        let (_, t, text) = build(&cfg(true, family));
        let (yb, za, dsts) = match family {
            Family::V4 => (YB, ZA, vec!["255.255.255.255", "224.0.0.1", "10.244.1.255"]),
            Family::V6 => (YB6, ZA6, vec!["ff02::1", "fe80::10"]),
        };
        for dst in dsts {
            for proto in [Protocol::Udp, Protocol::Tcp] {
                let to_x = |src: &str, who: &str| {
                    from_pod(Packet::new(src, dst, proto, 80), who, true).bridged_out("brp-xa")
                };
                assert_eq!(
                    verdict(&t, "FORWARD", &to_x(za, "za")),
                    Drop,
                    "{dst}\n{text}"
                );
                // The subnet broadcast is also an address of the pod CIDR no pod has.
                let allowed = if dst == "10.244.1.255" { Drop } else { Accept };
                assert_eq!(
                    verdict(&t, "FORWARD", &to_x(yb, "yb")),
                    allowed,
                    "{dst}\n{text}"
                );
                // To a pod no policy isolates: not judged.
                let to_z =
                    from_pod(Packet::new(yb, dst, proto, 80), "yb", true).bridged_out("brp-za");
                let open = if dst == "10.244.1.255" { Drop } else { Accept };
                assert_eq!(verdict(&t, "FORWARD", &to_z), open, "{dst}\n{text}");
            }
        }
        if family == Family::V6 {
            let ns = from_pod(Packet::icmp6(ZA6, "ff02::1:ff00:10", 135), "za", true)
                .bridged_out("brp-xa")
                .with_state(CtState::Untracked);
            assert_eq!(verdict(&t, "FORWARD", &ns), Accept, "{text}");
        }
    }
}

#[test]
fn rules_match_the_interface_kind() {
    let (_, _, routed) = build(&cfg(false, Family::V4));
    assert!(routed.contains(&format!(
        "-A {} ! -s 10.244.1.30/32 -i vethza -m comment --comment \"z/a\" -j DROP",
        names::ANTISPOOF_CHAIN
    )));
    let (_, _, bridged) = build(&cfg(true, Family::V4));
    assert!(bridged.contains(&format!(
        "-A {} ! -s 10.244.1.30/32 -m physdev --physdev-in brp-za -m comment --comment \"z/a\" -j DROP",
        names::ANTISPOOF_CHAIN
    )));
}

#[test]
fn a_pod_without_a_known_interface_is_a_diagnostic_not_silence() {
    let mut c = cfg(false, Family::V4);
    c.pod_interfaces.remove(&ip(ZA));
    c.pod_interfaces
        .insert(ip(YB), PodInterface::Routed("bad name\n-j ACCEPT".into()));
    let (compiled, t, _) = build(&c);
    let unknown: Vec<_> = compiled
        .diagnostics
        .iter()
        .filter(|d| d.reason == reasons::POD_INTERFACE_UNKNOWN)
        .map(|d| format!("{}/{}", d.namespace.as_deref().unwrap_or(""), d.name))
        .collect();
    assert_eq!(unknown, vec!["y/b".to_string(), "z/a".to_string()]);
    // x/a is still protected.
    let p = Packet::tcp(YB, ZA, 80).entering("vethxa");
    assert_eq!(verdict(&t, "FORWARD", &p), Drop);
    // Host-network pods are exempt: no diagnostic for x/host.
    assert!(!compiled.diagnostics.iter().any(|d| d.name == "host"));
}

#[test]
fn off_means_no_chain_and_no_jump() {
    let mut c = cfg(false, Family::V4);
    c.anti_spoofing = false;
    let (compiled, t, text) = build(&c);
    assert!(compiled.chain(names::ANTISPOOF_CHAIN).is_none());
    assert!(!text.contains(names::ANTISPOOF_CHAIN));
    let p = Packet::tcp(YB, XA, 80).entering("vethza");
    assert_eq!(verdict(&t, "FORWARD", &p), Accept);
}

#[test]
fn local_pod_ips_are_the_active_local_pods_of_the_family() {
    let s = state();
    assert_eq!(
        local_pod_ips(&s, "n1", Family::V4),
        vec![ip(XA), ip(YB), ip(ZA)]
    );
    assert_eq!(
        local_pod_ips(&s, "n1", Family::V6),
        vec![ip(XA6), ip(YB6), ip(ZA6)]
    );
    assert_eq!(local_pod_ips(&s, "n2", Family::V4), vec![ip(YR)]);
}

#[test]
fn incremental_compiler_follows_interface_changes() {
    let s = state();
    let mut c = cfg(false, Family::V4);
    let mut inc = IncrementalCompiler::new(c.clone());
    let first = inc.sync(&s).clone();
    assert_eq!(first, render(&compile(&s, &c)));
    let mut moved = c.pod_interfaces.clone();
    moved.insert(ip(ZA), PodInterface::Routed("vethnew".into()));
    inc.set_pod_interfaces(moved.clone());
    let second = inc.sync(&s).clone();
    c.pod_interfaces = moved;
    assert_eq!(second, render(&compile(&s, &c)));
    assert!(second.iptables_restore.contains("-i vethnew"));
}
