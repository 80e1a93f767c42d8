//! ClusterNetworkPolicy evaluation order, traced through the rendered payloads.
//!
//! Cluster (this node is `n1`, pod CIDR 10.244.1.0/24, address 192.168.0.1):
//!
//! | pod         | labels    | node | IP          | named ports   |
//! |-------------|-----------|------|-------------|---------------|
//! | shop/web-1  | app=web   | n1   | 10.244.1.10 | http 8080/TCP |
//! | shop/api-1  | app=api   | n1   | 10.244.1.11 | dns 53/UDP    |
//! | db/pg-1     | app=pg    | n1   | 10.244.1.20 | pg 5432/TCP   |
//! | db/pg-2     | app=pg    | n2   | 10.244.2.20 | —             |
//! | mon/prom-1  | app=prom  | n2   | 10.244.2.30 | —             |
//! | shop/agent  | app=agent | n1   | 192.168.0.1 | hostNetwork   |
//!
//! Namespaces: shop {team: a}, db {team: b}, mon {purpose: monitoring}.
//! Nodes: n1 (192.168.0.1), n2 {role: infra} (192.168.0.2).

use palisade_netpol::builders::*;
use palisade_netpol::cnp::ClusterNetworkPolicy;
use palisade_netpol::compile::Protocol;
use palisade_netpol::k8s_openapi::api::networking::v1::NetworkPolicy;
use palisade_netpol::trace::{CtState, Packet, Trace, Tracer, Verdict};
use palisade_netpol::{
    compile, reasons, render, ClusterState, Compiled, Family, IncrementalCompiler, NodeConfig,
    Payload,
};
use serde_json::{json, Value};
use std::sync::Arc;

const WEB1: &str = "10.244.1.10";
const API1: &str = "10.244.1.11";
const PG1: &str = "10.244.1.20";
const PG2: &str = "10.244.2.20";
const PROM: &str = "10.244.2.30";
const NODE1: &str = "192.168.0.1";
const NODE2: &str = "192.168.0.2";
const OUTSIDE: &str = "8.8.8.8";

use Verdict::{Accept, Drop};

fn state(nps: Vec<NetworkPolicy>, cnps: Vec<ClusterNetworkPolicy>) -> ClusterState {
    let mut s = cluster(
        vec![
            with_node_addresses(mk_node("n1", "10.244.1.0/24"), &[], &[NODE1]),
            with_node_addresses(
                mk_node("n2", "10.244.2.0/24"),
                &[("role", "infra")],
                &[NODE2],
            ),
        ],
        vec![
            mk_ns("shop", &[("team", "a")]),
            mk_ns("db", &[("team", "b")]),
            mk_ns("mon", &[("purpose", "monitoring")]),
        ],
        vec![
            with_ports(
                mk_pod("shop", "web-1", &[("app", "web")], WEB1, "n1"),
                &[("http", 8080, "TCP")],
            ),
            with_ports(
                mk_pod("shop", "api-1", &[("app", "api")], API1, "n1"),
                &[("dns", 53, "UDP")],
            ),
            with_ports(
                mk_pod("db", "pg-1", &[("app", "pg")], PG1, "n1"),
                &[("pg", 5432, "TCP")],
            ),
            mk_pod("db", "pg-2", &[("app", "pg")], PG2, "n2"),
            mk_pod("mon", "prom-1", &[("app", "prom")], PROM, "n2"),
            with_host_network(mk_pod("shop", "agent", &[("app", "agent")], NODE1, "n1")),
        ],
        nps,
    );
    s.cluster_policies = cnps.into_iter().map(Arc::new).collect();
    s
}

struct Run {
    compiled: Compiled,
    payload: Payload,
    tracer: Tracer,
}

impl Run {
    fn trace(&self, chain: &str, p: &Packet) -> Trace {
        self.tracer.trace(chain, p).expect("trace")
    }
    fn fwd(&self, p: Packet) -> Verdict {
        self.trace("FORWARD", &p).verdict
    }
    fn tcp(&self, src: &str, dst: &str, port: u16) -> Verdict {
        self.fwd(Packet::tcp(src, dst, port))
    }
    fn has_diag(&self, reason: &str) -> bool {
        self.compiled.diagnostics.iter().any(|d| d.reason == reason)
    }
    /// The comment of the last Accept/Deny rule on the packet's path that carries a `cnp/`
    /// comment: what `palisade netpol explain` reports as the deciding ClusterNetworkPolicy
    /// rule (`None`: a NetworkPolicy or the default decided).
    fn deciding(&self, src: &str, dst: &str, port: u16) -> Option<String> {
        let t = self.trace("FORWARD", &Packet::tcp(src, dst, port));
        let rules = self.payload.chain_rules();
        t.path.iter().rev().find_map(|step| {
            let (at, target) = step.split_once(" -> ")?;
            if target.ends_with(palisade_netpol::names::CNP_PASS_CHAIN) {
                return None; // a Pass hands the decision on
            }
            let (chain, i) = at.split_once('#')?;
            let line = rules.get(chain)?.get(i.parse::<usize>().ok()?)?;
            let c = line.split("--comment ").nth(1)?;
            let c = c.trim_start_matches('"');
            let c = c.split(['"', ' ']).next()?;
            (c.starts_with("cnp/") && c.matches('/').count() == 4).then(|| c.to_string())
        })
    }
}

fn run_family(state: &ClusterState, family: Family) -> Run {
    let mut cfg = NodeConfig::new("n1");
    cfg.family = family;
    let compiled = compile(state, &cfg);
    let payload = render(&compiled);
    let tracer = Tracer::new(&payload).unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}",
            payload.iptables_restore, payload.ipset_restore
        )
    });
    Run {
        compiled,
        payload,
        tracer,
    }
}

fn run(nps: Vec<NetworkPolicy>, cnps: Vec<ClusterNetworkPolicy>) -> Run {
    run_family(&state(nps, cnps), Family::V4)
}

fn cnp(name: &str, tier: &str, priority: i32, rest: Value) -> ClusterNetworkPolicy {
    let mut spec = json!({"tier": tier, "priority": priority});
    if let (Some(m), Value::Object(r)) = (spec.as_object_mut(), rest) {
        m.extend(r);
    }
    mk_cnp(name, spec)
}

fn ns_subject(name: &str) -> Value {
    json!({"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": name}}})
}

fn from_ns(name: &str) -> Value {
    json!([{"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": name}}}])
}

/// NetworkPolicy: pods of db accept ingress from namespace shop only.
fn np_db_from_shop() -> NetworkPolicy {
    mk_policy(
        "db",
        "from-shop",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}]}),
    )
}

#[test]
fn no_cluster_policies_change_nothing() {
    let a = run_family(&state(vec![np_db_from_shop()], vec![]), Family::V4);
    let mut s = state(vec![np_db_from_shop()], vec![]);
    s.cluster_policies.clear();
    let b = run_family(&s, Family::V4);
    assert_eq!(a.payload, b.payload);
    assert!(!a.payload.iptables_restore.contains("PALISADE-CNP"));
}

#[test]
fn admin_deny_overrides_networkpolicy_allow_and_admin_accept_overrides_its_deny() {
    let deny = cnp(
        "deny-shop",
        "Admin",
        10,
        json!({"subject": ns_subject("db"), "ingress": [{"action": "Deny", "from": from_ns("shop")}]}),
    );
    let r = run(vec![np_db_from_shop()], vec![deny]);
    assert_eq!(
        r.tcp(WEB1, PG1, 5432),
        Drop,
        "Admin Deny beats the NP allow"
    );
    assert_eq!(r.tcp(PROM, PG1, 5432), Drop, "NP still isolates");
    assert_eq!(
        r.deciding(WEB1, PG1, 5432).as_deref(),
        Some("cnp/admin/deny-shop/ingress/0")
    );
    let accept = cnp(
        "monitoring",
        "Admin",
        10,
        json!({"subject": ns_subject("db"), "ingress": [{"action": "Accept", "from": from_ns("mon")}]}),
    );
    let r = run(vec![np_db_from_shop()], vec![accept]);
    assert_eq!(
        r.tcp(PROM, PG1, 5432),
        Accept,
        "Admin Accept beats the NP deny"
    );
    assert_eq!(r.tcp(WEB1, PG1, 5432), Accept, "NP allow still applies");
    assert_eq!(r.tcp(API1, PG1, 1), Accept);
}

#[test]
fn priority_orders_policies_and_rules_apply_in_order() {
    let a = |p| {
        cnp(
            "accept-mon",
            "Admin",
            p,
            json!({"subject": ns_subject("db"), "ingress": [{"action": "Accept", "from": from_ns("mon")}]}),
        )
    };
    let d = |p| {
        cnp(
            "deny-all",
            "Admin",
            p,
            json!({"subject": ns_subject("db"), "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}),
        )
    };
    let r = run(vec![], vec![a(10), d(20)]);
    assert_eq!(r.tcp(PROM, PG1, 80), Accept);
    assert_eq!(r.tcp(WEB1, PG1, 80), Drop);
    assert_eq!(
        r.deciding(PROM, PG1, 80).as_deref(),
        Some("cnp/admin/accept-mon/ingress/0")
    );
    // Priority change: the Deny policy now comes first.
    let r = run(vec![], vec![a(30), d(20)]);
    assert_eq!(r.tcp(PROM, PG1, 80), Drop);
    assert_eq!(
        r.deciding(PROM, PG1, 80).as_deref(),
        Some("cnp/admin/deny-all/ingress/0")
    );
    // Equal priority: the name decides (documented tie-break), deterministically.
    let r = run(vec![], vec![a(20), d(20)]);
    assert_eq!(r.tcp(PROM, PG1, 80), Accept, "accept-mon < deny-all");

    // Rule order inside one policy.
    let ordered = |first: &str, second: &str| {
        cnp(
            "ordered",
            "Admin",
            1,
            json!({"subject": ns_subject("db"), "ingress": [
                {"action": first, "from": from_ns("mon")},
                {"action": second, "from": [{"namespaces": {}}]},
            ]}),
        )
    };
    let r = run(vec![], vec![ordered("Accept", "Deny")]);
    assert_eq!(r.tcp(PROM, PG1, 80), Accept);
    assert_eq!(r.tcp(WEB1, PG1, 80), Drop);
    assert_eq!(
        r.deciding(WEB1, PG1, 80).as_deref(),
        Some("cnp/admin/ordered/ingress/1")
    );
    let r = run(vec![], vec![ordered("Deny", "Accept")]);
    assert_eq!(r.tcp(PROM, PG1, 80), Drop);
    assert_eq!(r.tcp(WEB1, PG1, 80), Accept);
}

#[test]
fn pass_goes_to_the_networkpolicy_tier_then_baseline() {
    let pass = cnp(
        "pass-mon",
        "Admin",
        1,
        json!({"subject": ns_subject("db"), "ingress": [{"action": "Pass", "from": from_ns("mon")}]}),
    );
    let deny_later = cnp(
        "deny-mon",
        "Admin",
        2,
        json!({"subject": ns_subject("db"), "ingress": [{"action": "Deny", "from": from_ns("mon")}]}),
    );
    let base_deny = cnp(
        "base-deny",
        "Baseline",
        1,
        json!({"subject": ns_subject("db"), "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}),
    );
    let base_accept_mon = cnp(
        "base-mon",
        "Baseline",
        0,
        json!({"subject": ns_subject("db"), "ingress": [{"action": "Accept", "from": from_ns("mon")}]}),
    );
    // Pass skips the later Admin Deny; the NetworkPolicy tier decides (denies mon).
    let r = run(
        vec![np_db_from_shop()],
        vec![pass.clone(), deny_later.clone()],
    );
    assert_eq!(r.tcp(PROM, PG1, 80), Drop);
    assert_eq!(r.deciding(PROM, PG1, 80), None, "the NetworkPolicy decided");
    let t = r.trace("FORWARD", &Packet::tcp(PROM, PG1, 80));
    assert!(
        t.visited(palisade_netpol::names::CNP_PASS_CHAIN),
        "{:?}",
        t.path
    );
    assert_eq!(r.tcp(WEB1, PG1, 80), Accept);
    // Without NetworkPolicies: Pass → Baseline → default allow.
    let r = run(vec![], vec![pass.clone(), deny_later.clone()]);
    assert_eq!(r.tcp(PROM, PG1, 80), Accept, "passed, nothing else decides");
    // Pass → Baseline Deny.
    let r = run(
        vec![],
        vec![pass.clone(), deny_later.clone(), base_deny.clone()],
    );
    assert_eq!(r.tcp(PROM, PG1, 80), Drop);
    assert_eq!(
        r.deciding(PROM, PG1, 80).as_deref(),
        Some("cnp/baseline/base-deny/ingress/0")
    );
    // Baseline priorities: Accept at 0 wins over Deny at 1.
    let r = run(vec![], vec![pass, deny_later, base_deny, base_accept_mon]);
    assert_eq!(r.tcp(PROM, PG1, 80), Accept);
    assert_eq!(r.tcp(WEB1, PG1, 80), Drop);
    // A Baseline Pass: default allow.
    let base_pass = cnp(
        "base-pass",
        "Baseline",
        0,
        json!({"subject": ns_subject("db"), "ingress": [{"action": "Pass", "from": from_ns("shop")}]}),
    );
    let base_deny = cnp(
        "base-deny",
        "Baseline",
        1,
        json!({"subject": ns_subject("db"), "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}),
    );
    let r = run(vec![], vec![base_pass, base_deny]);
    assert_eq!(r.tcp(WEB1, PG1, 80), Accept);
    assert_eq!(r.tcp(PROM, PG1, 80), Drop);
}

#[test]
fn networkpolicy_overrides_baseline_for_the_pods_it_isolates() {
    let base_deny = cnp(
        "base-deny",
        "Baseline",
        1,
        json!({"subject": {"namespaces": {}}, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}),
    );
    let r = run(vec![np_db_from_shop()], vec![base_deny]);
    assert_eq!(
        r.tcp(WEB1, PG1, 80),
        Accept,
        "NP allows: Baseline not reached"
    );
    assert_eq!(r.tcp(PROM, PG1, 80), Drop, "NP denies");
    assert_eq!(r.deciding(PROM, PG1, 80), None);
    // shop pods are not isolated by a NetworkPolicy: Baseline applies.
    assert_eq!(r.tcp(PROM, WEB1, 80), Drop);
    assert_eq!(
        r.deciding(PROM, WEB1, 80).as_deref(),
        Some("cnp/baseline/base-deny/ingress/0")
    );
}

#[test]
fn egress_accept_still_needs_the_destination_ingress() {
    let eg = cnp(
        "web-out",
        "Admin",
        1,
        json!({"subject": ns_subject("shop"), "egress": [{"action": "Accept", "to": [{"namespaces": {}}]}]}),
    );
    // web-1's own egress NetworkPolicy denies everything: the Admin Accept overrides it.
    let np_eg = mk_policy(
        "shop",
        "no-egress",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    );
    let np_pg = mk_policy(
        "db",
        "no-ingress",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    );
    let r = run(vec![np_eg.clone()], vec![eg.clone()]);
    assert_eq!(
        r.tcp(WEB1, PG2, 80),
        Accept,
        "egress Accept beats the NP egress deny"
    );
    assert_eq!(
        r.tcp(WEB1, OUTSIDE, 80),
        Drop,
        "not a pod: NP egress deny applies"
    );
    let r = run(vec![np_eg, np_pg], vec![eg]);
    assert_eq!(r.tcp(WEB1, PG1, 80), Drop, "pg-1's ingress still denies");
    let t = r.trace("FORWARD", &Packet::tcp(WEB1, PG1, 80));
    assert!(
        t.visited(palisade_netpol::names::CNP_ALLOW_CHAIN),
        "{:?}",
        t.path
    );
    // Replies of accepted traffic pass, whatever the rules.
    assert_eq!(
        r.fwd(Packet::tcp(PG1, WEB1, 40000).with_state(CtState::Established)),
        Accept
    );
}

#[test]
fn unknown_peers_fail_closed() {
    let accept_unknown = cnp(
        "future-accept",
        "Admin",
        1,
        json!({"subject": ns_subject("db"), "ingress": [{"action": "Accept", "from": [{"serviceAccounts": {"name": "x"}}]}]}),
    );
    let r = run(vec![np_db_from_shop()], vec![accept_unknown]);
    assert_eq!(
        r.tcp(PROM, PG1, 80),
        Drop,
        "the Accept matches nothing; NP denies"
    );
    assert_eq!(r.tcp(WEB1, PG1, 80), Accept);
    assert!(r.has_diag(reasons::UNKNOWN_PEER));
    let pass_unknown = cnp(
        "future-pass",
        "Admin",
        1,
        json!({"subject": ns_subject("db"), "ingress": [{"action": "Pass", "from": [{"serviceAccounts": {"name": "x"}}]}]}),
    );
    let r = run(vec![], vec![pass_unknown]);
    assert_eq!(
        r.tcp(WEB1, PG1, 80),
        Drop,
        "a Pass rule fails closed to Deny all"
    );
    assert_eq!(
        r.fwd(Packet::new(PROM, PG1, Protocol::Udp, 53)),
        Drop,
        "every protocol"
    );
    assert_eq!(r.tcp(WEB1, API1, 80), Accept, "only the subject");
    let dns = cnp(
        "dns-names",
        "Admin",
        1,
        json!({"subject": ns_subject("shop"), "egress": [
            {"action": "Accept", "to": [{"domainNames": ["*.example.com"]}, {"namespaces": {"matchLabels": {"purpose": "monitoring"}}}]},
            {"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]},
        ]}),
    );
    let r = run(vec![], vec![dns]);
    assert!(r.has_diag(reasons::UNSUPPORTED_DOMAIN_NAMES));
    assert_eq!(
        r.tcp(WEB1, PROM, 80),
        Accept,
        "the rule's other peer still applies"
    );
    assert_eq!(r.tcp(WEB1, OUTSIDE, 443), Drop);
}

#[test]
fn ports_ranges_and_named_ports() {
    let p = cnp(
        "ports",
        "Admin",
        1,
        json!({"subject": ns_subject("shop"), "ingress": [
            {"action": "Accept", "from": [{"namespaces": {}}], "protocols": [
                {"destinationNamedPort": "http"},
                {"tcp": {"destinationPort": {"range": {"start": 9000, "end": 9100}}}},
                {"udp": {"destinationPort": {"number": 53}}},
                {"sctp": {}},
            ]},
            {"action": "Deny", "from": [{"namespaces": {}}]},
        ]}),
    );
    let r = run(vec![], vec![p]);
    assert_eq!(r.tcp(PROM, WEB1, 8080), Accept, "named port http of web-1");
    assert_eq!(
        r.tcp(PROM, API1, 8080),
        Drop,
        "api-1 has no port named http"
    );
    assert_eq!(r.tcp(PROM, WEB1, 9000), Accept);
    assert_eq!(r.tcp(PROM, WEB1, 9100), Accept);
    assert_eq!(r.tcp(PROM, WEB1, 9101), Drop);
    assert_eq!(r.tcp(PROM, WEB1, 53), Drop);
    assert_eq!(r.fwd(Packet::new(PROM, API1, Protocol::Udp, 53)), Accept);
    assert_eq!(r.fwd(Packet::new(PROM, API1, Protocol::Udp, 54)), Drop);
    assert_eq!(r.fwd(Packet::new(PROM, API1, Protocol::Sctp, 1)), Accept);
    let named_udp = cnp(
        "named-udp",
        "Admin",
        1,
        json!({"subject": ns_subject("shop"), "ingress": [
            {"action": "Deny", "from": [{"namespaces": {}}], "protocols": [{"destinationNamedPort": "dns"}]},
        ]}),
    );
    let r = run(vec![], vec![named_udp]);
    assert_eq!(r.fwd(Packet::new(PROM, API1, Protocol::Udp, 53)), Drop);
    assert_eq!(
        r.tcp(PROM, API1, 53),
        Accept,
        "dns is declared for UDP only"
    );
    let unknown_named = cnp(
        "nobody",
        "Admin",
        1,
        json!({"subject": ns_subject("shop"), "ingress": [
            {"action": "Accept", "from": [{"namespaces": {}}], "protocols": [{"destinationNamedPort": "nope"}]},
        ]}),
    );
    assert!(run(vec![], vec![unknown_named]).has_diag(reasons::UNKNOWN_NAMED_PORT));
}

#[test]
fn every_peer_kind() {
    let p = cnp(
        "peers",
        "Admin",
        1,
        json!({"subject": {"pods": {"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {"matchLabels": {"app": "web"}}}}, "egress": [
            {"action": "Accept", "to": [{"pods": {"namespaceSelector": {"matchLabels": {"team": "b"}}, "podSelector": {"matchLabels": {"app": "pg"}}}}]},
            {"action": "Accept", "to": [{"namespaces": {"matchLabels": {"purpose": "monitoring"}}}]},
            {"action": "Accept", "to": [{"nodes": {"matchLabels": {"role": "infra"}}}]},
            {"action": "Accept", "to": [{"networks": ["8.8.8.0/24", "fd00::/8"]}]},
            {"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]},
        ]}),
    );
    let r = run(vec![], vec![p]);
    assert_eq!(r.tcp(WEB1, PG1, 5432), Accept, "pods peer (local)");
    assert_eq!(r.tcp(WEB1, PG2, 5432), Accept, "pods peer (remote)");
    assert_eq!(r.tcp(WEB1, PROM, 9090), Accept, "namespaces peer");
    assert_eq!(r.tcp(WEB1, NODE2, 22), Accept, "nodes peer");
    assert_eq!(r.tcp(WEB1, OUTSIDE, 53), Accept, "networks peer");
    assert_eq!(r.tcp(WEB1, "8.8.4.4", 53), Drop, "networks 0.0.0.0/0 Deny");
    assert_eq!(r.tcp(WEB1, API1, 80), Drop, "0.0.0.0/0 matches pod IPs too");
    // This node's own address is reached through INPUT: n1 has no role label.
    let t = r.trace("INPUT", &Packet::tcp(WEB1, NODE1, 10250));
    assert_eq!(t.verdict, Drop);
    // Subjects: api-1 (app=api) is not selected.
    assert_eq!(r.tcp(API1, OUTSIDE, 80), Accept);
    // Host-network pods are neither subjects nor peers: the agent pod (node address) is
    // no member of the shop namespace's sets.
    let host = cnp(
        "no-host",
        "Admin",
        1,
        json!({"subject": ns_subject("db"), "ingress": [{"action": "Deny", "from": from_ns("shop")}]}),
    );
    let r = run(vec![], vec![host]);
    assert_eq!(r.tcp(NODE2, PG1, 5432), Accept);
    assert_eq!(r.tcp(WEB1, PG1, 5432), Drop);
    assert!(!r
        .payload
        .ipset_restore
        .contains(&format!("add PAL-P4-{NODE1}")));
}

#[test]
fn ipv6_works_the_same() {
    let mut s = state(vec![], vec![]);
    // Dual-stack variants of two pods and the node CIDR.
    s.nodes = vec![Arc::new(with_node_addresses(
        mk_node_cidrs("n1", &["10.244.1.0/24", "fd10:1::/64"]),
        &[],
        &[NODE1, "fd00:ff::1"],
    ))];
    s.pods = vec![
        Arc::new(with_pod_ips(
            mk_pod("shop", "web-1", &[("app", "web")], WEB1, "n1"),
            &[WEB1, "fd10:1::10"],
        )),
        Arc::new(with_pod_ips(
            mk_pod("db", "pg-1", &[("app", "pg")], PG1, "n1"),
            &[PG1, "fd10:1::20"],
        )),
    ];
    s.cluster_policies = vec![Arc::new(cnp(
        "v6",
        "Admin",
        1,
        json!({"subject": ns_subject("shop"), "egress": [
            {"action": "Accept", "to": [{"networks": ["2001:db8::/32"]}]},
            {"action": "Accept", "to": [{"nodes": {}}]},
            {"action": "Deny", "to": [{"networks": ["::/0", "0.0.0.0/0"]}]},
        ]}),
    ))];
    let r = run_family(&s, Family::V6);
    assert_eq!(r.tcp("fd10:1::10", "2001:db8::1", 443), Accept);
    assert_eq!(r.tcp("fd10:1::10", "2001:db9::1", 443), Drop);
    assert_eq!(
        r.tcp("fd10:1::10", "fd10:1::20", 5432),
        Drop,
        "::/0 covers pods"
    );
    assert_eq!(
        r.trace("INPUT", &Packet::tcp("fd10:1::10", "fd00:ff::1", 22))
            .verdict,
        Accept,
        "nodes peer, IPv6 address"
    );
    let r4 = run_family(&s, Family::V4);
    assert_eq!(r4.tcp(WEB1, OUTSIDE, 443), Drop);
    assert_eq!(r4.tcp(WEB1, PG1, 5432), Drop);
}

#[test]
fn updates_recompile_incrementally_to_the_same_result() {
    let base = state(vec![], vec![]);
    let mut inc = IncrementalCompiler::new(NodeConfig::new("n1"));
    inc.sync(&base);
    let mut with = base.clone();
    with.cluster_policies = vec![Arc::new(cnp(
        "deny-mon",
        "Admin",
        5,
        json!({"subject": ns_subject("db"), "ingress": [{"action": "Deny", "from": from_ns("mon")}]}),
    ))];
    let p = inc.sync(&with).clone();
    assert_eq!(p, render(&compile(&with, &NodeConfig::new("n1"))));
    let t = Tracer::new(&p).unwrap();
    assert_eq!(
        t.trace("FORWARD", &Packet::tcp(PROM, PG1, 1))
            .unwrap()
            .verdict,
        Drop
    );
    // A remote pod joining the peer namespace only patches set members.
    let mut more = with.clone();
    more.pods
        .push(Arc::new(mk_pod("mon", "prom-2", &[], "10.244.2.31", "n2")));
    let p = inc.sync(&more).clone();
    assert_eq!(inc.last_mode(), palisade_netpol::SyncMode::Patched);
    assert_eq!(p, render(&compile(&more, &NodeConfig::new("n1"))));
    let t = Tracer::new(&p).unwrap();
    assert_eq!(
        t.trace("FORWARD", &Packet::tcp("10.244.2.31", PG1, 1))
            .unwrap()
            .verdict,
        Drop
    );
    // Deleting the policy.
    let p = inc.sync(&base).clone();
    let t = Tracer::new(&p).unwrap();
    assert_eq!(
        t.trace("FORWARD", &Packet::tcp(PROM, PG1, 1))
            .unwrap()
            .verdict,
        Accept
    );
}

#[test]
fn chains_stay_linear_in_policies_and_local_pods() {
    let many: Vec<ClusterNetworkPolicy> = (0..50)
        .map(|i| {
            cnp(
                &format!("p{i}"),
                if i % 2 == 0 { "Admin" } else { "Baseline" },
                i,
                json!({"subject": {"namespaces": {}}, "ingress": [{"action": "Deny", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"x": format!("{i}")}}}}]}]}),
            )
        })
        .collect();
    let r = run(vec![], many);
    let cnp_chains = r
        .payload
        .chains
        .iter()
        .filter(|c| c.starts_with("PAL-CI-"))
        .count();
    assert_eq!(cnp_chains, 50);
    // One tiered profile shared by the three local pods.
    let profiles = r
        .payload
        .chains
        .iter()
        .filter(|c| c.starts_with("PAL-XI-"))
        .count();
    assert_eq!(profiles, 1);
    assert!(
        r.payload.stats.rules < 50 * 4 + 60,
        "{}",
        r.payload.stats.rules
    );
}

#[test]
fn the_documented_example_compiles_cleanly() {
    let text = include_str!("../../../examples/clusternetworkpolicy/tenant-guard.yaml");
    let mut s = state(vec![], vec![]);
    s.merge(palisade_netpol::manifests::parse(text).expect("example parses"));
    assert_eq!(s.cluster_policies.len(), 2);
    // shop becomes tenant blue; mon is the monitoring namespace.
    s.namespaces = vec![
        Arc::new(mk_ns("shop", &[("tenant", "blue")])),
        Arc::new(mk_ns("db", &[("tenant", "red")])),
        Arc::new(mk_ns("mon", &[("purpose", "monitoring")])),
    ];
    let r = run_family(&s, Family::V4);
    let cnp_diags: Vec<_> = r
        .compiled
        .diagnostics
        .iter()
        .filter(|d| d.kind == "ClusterNetworkPolicy")
        .collect();
    // Nobody declares a port named "metrics" in this cluster: that is the only remark.
    assert!(
        cnp_diags
            .iter()
            .all(|d| d.reason == reasons::UNKNOWN_NAMED_PORT),
        "{cnp_diags:?}"
    );
    assert_eq!(r.tcp(PG1, WEB1, 80), Drop, "another tenant");
    assert_eq!(
        r.tcp(API1, WEB1, 80),
        Drop,
        "same tenant: passed, then the Baseline default deny"
    );
    assert_eq!(r.tcp(WEB1, PG1, 80), Drop, "Baseline default deny for db");
    assert_eq!(r.tcp(WEB1, "169.254.169.254", 80), Drop);
    // The namespace opts in with a NetworkPolicy: it overrides the Baseline.
    s.policies = vec![Arc::new(mk_policy(
        "shop",
        "same-namespace",
        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
    ))];
    let r = run_family(&s, Family::V4);
    assert_eq!(r.tcp(API1, WEB1, 80), Accept);
    assert_eq!(r.tcp(PG1, WEB1, 80), Drop, "the Admin Deny still wins");
}

#[test]
fn synthetic_cluster_with_200_cluster_policies() {
    use palisade_netpol::synthetic::*;
    let mut cl = build_cluster();
    cl.state.cluster_policies = cluster_network_policies()
        .into_iter()
        .map(Arc::new)
        .collect();
    let c = compile(&cl.state, &NodeConfig::new(NODE));
    let p = render(&c);
    Tracer::new(&p).expect("parses");
    let cnp_chains = p
        .chains
        .iter()
        .filter(|n| n.starts_with("PAL-CI-") || n.starts_with("PAL-CE-"))
        .count();
    // At most one chain per policy and direction, and no more tiered profiles than local
    // pods per direction.
    assert!(
        cnp_chains > 0 && cnp_chains <= 2 * CLUSTER_POLICIES,
        "{cnp_chains}"
    );
    let tiered = p
        .chains
        .iter()
        .filter(|n| n.starts_with("PAL-XI-") || n.starts_with("PAL-XE-"))
        .count();
    assert!(tiered > 0 && tiered <= 2 * LOCAL_PODS, "{tiered}");
    assert!(
        !c.diagnostics
            .iter()
            .any(|d| d.kind == "ClusterNetworkPolicy" && d.reason != reasons::UNKNOWN_NAMED_PORT),
        "{:?}",
        c.diagnostics
    );
}
