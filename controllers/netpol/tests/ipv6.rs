//! IPv6 and dual-stack: the same objects compiled once per family. Each payload holds only its
//! family's pods, CIDRs and ipBlocks; a peer of the other family matches nothing in it (it is
//! never "no peers = everyone").
//!
//! | pod        | labels  | node | IPv4        | IPv6             | named ports   |
//! |------------|---------|------|-------------|------------------|---------------|
//! | shop/web-1 | app=web | n1   | 10.244.1.10 | fd00:10:1::10    | http 8080/TCP |
//! | shop/web-2 | app=web | n2   | 10.244.2.10 | fd00:10:2::10    | http 9090/TCP |
//! | shop/v6    | app=v6  | n1   | —           | fd00:10:1::30    | —             |
//! | db/pg-1    | app=pg  | n1   | 10.244.1.20 | fd00:10:1::20    | —             |
//! | mon/prom-1 | app=prom| n2   | 10.244.2.30 | fd00:10:2::30    | —             |

use palisade_netpol::builders::*;
use palisade_netpol::compile::Protocol;
use palisade_netpol::k8s_openapi::api::core::v1::Pod;
use palisade_netpol::k8s_openapi::api::networking::v1::NetworkPolicy;
use palisade_netpol::trace::{CtState, Packet, Tracer, Verdict};
use palisade_netpol::{compile, render, ClusterState, Family, NodeConfig, Payload};
use serde_json::json;

use Verdict::{Accept, Drop};

const WEB1: &str = "fd00:10:1::10";
const WEB2: &str = "fd00:10:2::10";
const V6ONLY: &str = "fd00:10:1::30";
const PG1: &str = "fd00:10:1::20";
const PROM: &str = "fd00:10:2::30";
const UNKNOWN_LOCAL: &str = "fd00:10:1::99";
const HOST: &str = "fd00:0:0:1::1";
const OUTSIDE: &str = "2001:db8:5::7";

fn pods() -> Vec<Pod> {
    vec![
        with_ports(
            with_pod_ips(
                mk_pod("shop", "web-1", &[("app", "web")], "", "n1"),
                &["10.244.1.10", WEB1],
            ),
            &[("http", 8080, "TCP")],
        ),
        with_ports(
            with_pod_ips(
                mk_pod("shop", "web-2", &[("app", "web")], "", "n2"),
                &["10.244.2.10", WEB2],
            ),
            &[("http", 9090, "TCP")],
        ),
        mk_pod("shop", "v6", &[("app", "v6")], V6ONLY, "n1"),
        with_pod_ips(
            mk_pod("db", "pg-1", &[("app", "pg")], "", "n1"),
            &["10.244.1.20", PG1],
        ),
        with_pod_ips(
            mk_pod("mon", "prom-1", &[("app", "prom")], "", "n2"),
            &["10.244.2.30", PROM],
        ),
    ]
}

fn state(policies: Vec<NetworkPolicy>) -> ClusterState {
    cluster(
        vec![
            mk_node_cidrs("n1", &["10.244.1.0/24", "fd00:10:1::/64"]),
            mk_node_cidrs("n2", &["10.244.2.0/24", "fd00:10:2::/64"]),
        ],
        vec![
            mk_ns("shop", &[("team", "a")]),
            mk_ns("db", &[("team", "b")]),
            mk_ns("mon", &[("purpose", "monitoring")]),
        ],
        pods(),
        policies,
    )
}

struct Run {
    payload: Payload,
    tracer: Tracer,
}

impl Run {
    fn tcp(&self, src: &str, dst: &str, port: u16) -> Verdict {
        self.fwd(Packet::tcp(src, dst, port))
    }
    fn fwd(&self, p: Packet) -> Verdict {
        self.tracer.trace("FORWARD", &p).expect("trace").verdict
    }
}

fn run(policies: Vec<NetworkPolicy>, family: Family) -> Run {
    let mut cfg = NodeConfig::new("n1");
    cfg.family = family;
    let compiled = compile(&state(policies), &cfg);
    let payload = render(&compiled);
    let tracer = Tracer::new(&payload).unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}",
            payload.iptables_restore, payload.ipset_restore
        )
    });
    Run { payload, tracer }
}

fn v6(policies: Vec<NetworkPolicy>) -> Run {
    run(policies, Family::V6)
}

#[test]
fn the_v6_payload_holds_only_v6_addresses_and_inet6_sets() {
    let r = v6(vec![mk_policy(
        "shop",
        "from-db",
        json!({"podSelector": {"matchLabels": {"app": "web"}},
               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]}),
    )]);
    let ipt = &r.payload.iptables_restore;
    let ips = &r.payload.ipset_restore;
    assert!(ipt.contains("IPv6 (ip6tables)"), "{ipt}");
    assert!(!ipt.contains("10.244."), "IPv4 in the IPv6 payload:\n{ipt}");
    assert!(!ips.contains("10.244."), "IPv4 in the IPv6 sets:\n{ips}");
    assert!(ips.contains("family inet6"), "{ips}");
    assert!(!ips.contains("family inet "), "{ips}");
    assert!(ips.contains(PG1), "{ips}");
    // Set names carry the family: the v4 and v6 payloads never share a set.
    let v4 = run(vec![], Family::V4);
    for s in &r.payload.sets {
        assert!(!v4.payload.sets.contains(s), "{s} in both families");
    }
    // No reject/ICMP spelling of the other family.
    assert!(!ipt.contains("icmp-"), "{ipt}");
}

#[test]
fn ingress_isolation_and_selectors_over_ipv6() {
    let r = v6(vec![mk_policy(
        "shop",
        "from-db",
        json!({"podSelector": {"matchLabels": {"app": "web"}},
               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]}),
    )]);
    assert_eq!(r.tcp(PG1, WEB1, 8080), Accept, "db is team b");
    assert_eq!(r.tcp(PROM, WEB1, 8080), Drop);
    assert_eq!(r.tcp(WEB2, WEB1, 8080), Drop);
    assert_eq!(
        r.tcp(PROM, V6ONLY, 80),
        Accept,
        "not selected: not isolated"
    );
    assert_eq!(
        r.fwd(Packet::tcp(PROM, WEB1, 8080).with_state(CtState::Established)),
        Accept
    );
    assert_eq!(r.fwd(Packet::tcp(HOST, WEB1, 8080).from_local()), Accept);
}

#[test]
fn named_ports_resolve_per_destination_pod_over_ipv6() {
    let r = v6(vec![mk_policy(
        "shop",
        "to-http",
        json!({"podSelector": {}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                           "ports": [{"port": "http"}]}]}),
    )]);
    // web-1 declares http=8080, web-2 http=9090.
    assert_eq!(r.tcp(V6ONLY, WEB1, 8080), Accept);
    assert_eq!(r.tcp(V6ONLY, WEB1, 9090), Drop);
    assert_eq!(r.tcp(V6ONLY, WEB2, 9090), Accept);
    assert_eq!(r.tcp(V6ONLY, WEB2, 8080), Drop);
    assert_eq!(r.tcp(V6ONLY, PG1, 8080), Drop);
}

#[test]
fn ipv6_ip_blocks_with_except_and_port_ranges() {
    let r = v6(vec![mk_policy(
        "shop",
        "outside",
        json!({"podSelector": {"matchLabels": {"app": "v6"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"ipBlock": {"cidr": "2001:db8::/32", "except": ["2001:db8:5::/48"]}}],
                           "ports": [{"protocol": "TCP", "port": 8000, "endPort": 8100},
                                     {"protocol": "SCTP", "port": 9000}]}]}),
    )]);
    assert_eq!(r.tcp(V6ONLY, "2001:db8:1::1", 8000), Accept);
    assert_eq!(r.tcp(V6ONLY, "2001:db8:1::1", 8100), Accept);
    assert_eq!(r.tcp(V6ONLY, "2001:db8:1::1", 8101), Drop);
    assert_eq!(r.tcp(V6ONLY, OUTSIDE, 8000), Drop, "except");
    assert_eq!(r.tcp(V6ONLY, "2001:db9::1", 8000), Drop, "outside the cidr");
    let sctp = Packet::new(V6ONLY, "2001:db8:1::1", Protocol::Sctp, 9000);
    assert_eq!(r.fwd(sctp), Accept);
    let udp = Packet::new(V6ONLY, "2001:db8:1::1", Protocol::Udp, 9000);
    assert_eq!(r.fwd(udp), Drop);
}

#[test]
fn a_peer_of_the_other_family_matches_nothing_not_everything() {
    // Only IPv4 blocks: in the v6 payload the rule has peers, none of them v6 — it must
    // allow nothing (an empty `from` would mean "everyone").
    let policies = vec![mk_policy(
        "shop",
        "v4-only",
        json!({"podSelector": {"matchLabels": {"app": "web"}},
               "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16"}}]}]}),
    )];
    let r6 = v6(policies.clone());
    assert_eq!(r6.tcp(PG1, WEB1, 8080), Drop);
    assert_eq!(r6.tcp(OUTSIDE, WEB1, 8080), Drop);
    let r4 = run(policies, Family::V4);
    assert_eq!(r4.tcp("10.244.1.20", "10.244.1.10", 8080), Accept);
    assert_eq!(r4.tcp("192.0.2.9", "10.244.1.10", 8080), Drop);
    // And the other way round: a v6 block opens nothing over IPv4.
    let policies = vec![mk_policy(
        "shop",
        "v6-only",
        json!({"podSelector": {"matchLabels": {"app": "web"}},
               "ingress": [{"from": [{"ipBlock": {"cidr": "::/0"}}]}]}),
    )];
    assert_eq!(
        run(policies.clone(), Family::V4).tcp("10.244.1.20", "10.244.1.10", 8080),
        Drop
    );
    assert_eq!(v6(policies).tcp(OUTSIDE, WEB1, 8080), Accept);
}

#[test]
fn the_first_instant_rule_covers_the_v6_pod_cidr() {
    let r = v6(vec![]);
    assert_eq!(r.tcp(WEB2, WEB1, 80), Accept);
    assert_eq!(r.tcp(WEB2, UNKNOWN_LOCAL, 80), Drop);
    assert_eq!(r.tcp(UNKNOWN_LOCAL, WEB2, 80), Drop);
    assert!(r.payload.iptables_restore.contains("fd00:10:1::/64"));
    assert!(!r.payload.iptables_restore.contains("10.244.1.0/24"));
}

#[test]
fn a_v6_only_pod_is_isolated_in_the_v6_payload_and_absent_from_the_v4_one() {
    let policies = vec![mk_policy(
        "shop",
        "deny",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    )];
    let r6 = v6(policies.clone());
    assert_eq!(r6.tcp(PROM, V6ONLY, 80), Drop);
    assert_eq!(r6.tcp(PROM, WEB1, 80), Drop);
    let r4 = run(policies, Family::V4);
    assert_eq!(r4.tcp("10.244.2.30", "10.244.1.10", 80), Drop);
    assert!(!r4.payload.iptables_restore.contains("fd00"));
}

#[test]
fn neighbour_discovery_of_egress_isolated_pods_reaches_the_node() {
    let r = v6(vec![mk_policy(
        "shop",
        "deny-egress",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    )]);
    let input = |p: Packet| r.tracer.trace("INPUT", &p).expect("trace").verdict;
    // Solicitations for the gateway and advertisements, sourced from the pod's own address.
    for t in [133, 135, 136] {
        let nd = Packet::icmp6(WEB1, "ff02::1:ff00:1", t).with_state(CtState::Invalid);
        assert_eq!(input(nd), Accept, "ICMPv6 type {t}");
    }
    // Everything else from the isolated pod to the node stays denied.
    assert_eq!(input(Packet::tcp(WEB1, HOST, 10250)), Drop);
    let echo = Packet::icmp6(WEB1, HOST, 128);
    assert_eq!(input(echo), Drop, "echo request is not neighbour discovery");
    // And nothing of this kind in the IPv4 payload.
    let r4 = run(vec![], Family::V4);
    assert!(!r4.payload.iptables_restore.contains("icmp6"));
    assert!(r
        .payload
        .iptables_restore
        .contains("-A PALISADE-INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 135 -m comment --comment \"IPv6 neighbor solicitation\" -j RETURN"));
}
