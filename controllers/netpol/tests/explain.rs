//! `explain`: verdicts and reasons read from the compiled rules, for every kind of endpoint.
//!
//! Two nodes: node1 (10.244.1.0/24, address 192.168.0.1) runs x/a, y/b; node2
//! (10.244.2.0/24) runs x/b, y/a. Namespaces x and y are labelled ns=<name>.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};
use palisade_netpol::builders::*;
use palisade_netpol::compile::Protocol;
use palisade_netpol::explain::{Decision, EndpointKind, ExplainOptions, Explainer, Flow, PortSpec};
use palisade_netpol::ClusterState;
use serde_json::json;

fn node(name: &str, cidr: &str, addr: &str) -> k8s_openapi::api::core::v1::Node {
    let mut n = mk_node(name, cidr);
    n.status = Some(NodeStatus {
        addresses: Some(vec![NodeAddress {
            type_: "InternalIP".into(),
            address: addr.into(),
        }]),
        ..Default::default()
    });
    n
}

fn state(policies: Vec<serde_json::Value>) -> ClusterState {
    let ports = [("http", 8080, "TCP"), ("dns", 53, "UDP")];
    cluster(
        vec![
            node("node1", "10.244.1.0/24", "192.168.0.1"),
            node("node2", "10.244.2.0/24", "192.168.0.2"),
        ],
        vec![mk_ns("x", &[("ns", "x")]), mk_ns("y", &[("ns", "y")])],
        vec![
            with_ports(
                mk_pod("x", "a", &[("pod", "a")], "10.244.1.2", "node1"),
                &ports,
            ),
            mk_pod("y", "b", &[("pod", "b")], "10.244.1.3", "node1"),
            with_ports(
                mk_pod("x", "b", &[("pod", "b")], "10.244.2.2", "node2"),
                &ports,
            ),
            mk_pod("y", "a", &[("pod", "a")], "10.244.2.3", "node2"),
            with_host_network(mk_pod("y", "h", &[], "192.168.0.2", "node2")),
        ],
        policies
            .into_iter()
            .map(|p| {
                mk_policy(
                    p["ns"].as_str().unwrap(),
                    p["name"].as_str().unwrap(),
                    p["spec"].clone(),
                )
            })
            .collect(),
    )
}

fn pol(ns: &str, name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({ "ns": ns, "name": name, "spec": spec })
}

fn flow(line: &str) -> Flow {
    Flow::parse_line(line).unwrap_or_else(|e| panic!("{line}: {e}"))
}

fn explain(s: &ClusterState, line: &str) -> palisade_netpol::explain::Explanation {
    Explainer::new(s, ExplainOptions::default())
        .explain(&flow(line))
        .unwrap_or_else(|e| panic!("{line}: {e}"))
}

fn deny_x_allow_y_http() -> ClusterState {
    state(vec![
        pol(
            "x",
            "deny-all",
            json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
        ),
        pol(
            "x",
            "allow-y-http",
            json!({
                "podSelector": { "matchLabels": { "pod": "a" } },
                "ingress": [
                    { "from": [{ "podSelector": { "matchLabels": { "pod": "nobody" } } }] },
                    { "from": [{ "namespaceSelector": { "matchLabels": { "ns": "y" } } }],
                      "ports": [{ "port": "http" }] },
                ],
            }),
        ),
    ])
}

#[test]
fn allowed_by_names_policy_rule_peer_and_port() {
    let s = deny_x_allow_y_http();
    // Same node (node1): one FORWARD trace covers both directions.
    let e = explain(&s, "y/b x/a http TCP");
    assert_eq!(e.decision, Decision::Allowed, "{}", e.to_text());
    assert_eq!(e.port, 8080);
    assert_eq!(e.port_name.as_deref(), Some("http"));
    assert_eq!(e.hops.len(), 1);
    let ing = &e.ingress;
    assert!(ing.isolated);
    let by: Vec<String> = ing.isolated_by.iter().map(|p| p.short()).collect();
    assert_eq!(by, vec!["x/allow-y-http", "x/deny-all"]);
    let hit = &ing.allowed_by[0];
    assert_eq!(hit.rule.policy.short(), "x/allow-y-http");
    assert_eq!(hit.rule.direction, "ingress");
    assert_eq!(hit.rule.index, 1);
    assert!(hit.peer.contains("ns in (y)"), "{}", hit.peer);
    assert!(hit.port.contains("named-port tcp/http"), "{}", hit.port);
    assert!(!e.egress.isolated);
    assert_eq!(e.egress.reason, "no policy isolates y/b for egress");
    let text = e.to_text();
    assert!(text.starts_with("ALLOWED: y/b"), "{text}");
    assert!(
        text.contains("allowed by x/allow-y-http ingress rule 1"),
        "{text}"
    );
}

#[test]
fn denied_names_isolating_policies() {
    let s = deny_x_allow_y_http();
    // Cross-node: x/b (node2) → x/a (node1), two traces.
    let e = explain(&s, "x/b x/a 8080 TCP");
    assert_eq!(e.decision, Decision::Denied);
    assert_eq!(e.hops.len(), 2);
    assert_eq!(e.hops[0].node, "node2");
    assert_eq!(e.hops[1].node, "node1");
    assert_eq!(e.ingress.decision, Decision::Denied);
    assert_eq!(e.ingress.node.as_deref(), Some("node1"));
    assert!(e.ingress.allowed_by.is_empty());
    assert!(
        e.reason
            .contains("x/a is isolated for ingress by x/allow-y-http, x/deny-all"),
        "{}",
        e.reason
    );
    // Wrong port from the allowed namespace: also denied.
    let e = explain(&s, "y/a x/a 80 TCP");
    assert_eq!(e.decision, Decision::Denied);
    // x/b is isolated by deny-all only.
    let e = explain(&s, "y/b x/b 8080 TCP");
    assert_eq!(e.decision, Decision::Denied);
    let by: Vec<String> = e.ingress.isolated_by.iter().map(|p| p.short()).collect();
    assert_eq!(by, vec!["x/deny-all"]);
    let j = e.to_json();
    assert_eq!(j["verdict"], "denied");
    assert_eq!(j["from"], "y/b");
    assert_eq!(j["to"], "x/b");
    assert_eq!(j["port"], 8080);
    assert_eq!(j["protocol"], "TCP");
    assert_eq!(j["ingress"]["isolated_by"], json!(["x/deny-all"]));
}

#[test]
fn egress_side_is_checked_on_the_source_node() {
    let s = state(vec![pol(
        "y",
        "egress-to-x-a",
        json!({
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{ "to": [{ "namespaceSelector": {}, "podSelector": { "matchLabels": { "pod": "a" } } }],
                         "ports": [{ "protocol": "UDP", "port": 53 }] }],
        }),
    )]);
    let e = explain(&s, "y/a 10.244.1.2 53 udp");
    assert_eq!(e.decision, Decision::Allowed, "{}", e.to_text());
    assert_eq!(e.egress.node.as_deref(), Some("node2"));
    assert_eq!(
        e.egress.allowed_by[0].rule.policy.short(),
        "y/egress-to-x-a"
    );
    assert_eq!(e.egress.allowed_by[0].port, "UDP 53");
    assert_eq!(e.to.pod.as_deref(), Some("x/a"));
    let e = explain(&s, "y/a x/a 53 TCP");
    assert_eq!(e.decision, Decision::Denied);
    assert_eq!(e.egress.decision, Decision::Denied);
    assert!(e
        .reason
        .starts_with("egress: y/a is isolated for egress by y/egress-to-x-a"));
    // To the outside world: only the source's node decides.
    let e = explain(&s, "y/a 8.8.8.8 53 UDP");
    assert_eq!(e.decision, Decision::Denied);
    assert_eq!(e.to.kind, EndpointKind::External);
    assert_eq!(e.hops.len(), 1);
}

#[test]
fn external_node_and_unknown_sources() {
    let s = deny_x_allow_y_http();
    let e = explain(&s, "203.0.113.9 x/a 8080 TCP");
    assert_eq!(e.decision, Decision::Denied);
    assert_eq!(e.from.kind, EndpointKind::External);
    assert!(e.egress.node.is_none());
    assert_eq!(e.hops.len(), 1);
    // A node reaches its own pods whatever the policies say.
    let e = explain(&s, "192.168.0.1 x/a 8080 TCP");
    assert_eq!(e.from.kind, EndpointKind::Node);
    assert_eq!(e.decision, Decision::Allowed, "{}", e.to_text());
    // Another node does not.
    let e = explain(&s, "192.168.0.2 x/a 8080 TCP");
    assert_eq!(e.decision, Decision::Denied);
    // A host-network pod has its node's address.
    let e = explain(&s, "y/h x/b 8080 TCP");
    assert_eq!(e.from.kind, EndpointKind::HostNetworkPod);
    assert_eq!(e.decision, Decision::Allowed);
    // An address in node2's pod CIDR that no pod has: the first-instant rule.
    let e = explain(&s, "10.244.2.77 y/a 80 TCP");
    assert_eq!(e.from.kind, EndpointKind::UnknownPod);
    assert_eq!(e.decision, Decision::Denied);
    assert!(e.reason.contains("first-instant rule"), "{}", e.reason);
    let off = Explainer::new(
        &s,
        ExplainOptions {
            block_unknown_pods: false,
        },
    )
    .explain(&flow("10.244.2.77 y/a 80 TCP"))
    .unwrap();
    assert_eq!(off.decision, Decision::Allowed);
    // A pod to itself: loopback.
    let e = explain(&s, "x/a x/a 80 TCP");
    assert_eq!(e.decision, Decision::Allowed);
    assert!(e.hops.is_empty());
}

#[test]
fn sctp_and_port_ranges() {
    let s = state(vec![pol(
        "x",
        "ranges",
        json!({
            "podSelector": {},
            "ingress": [{ "ports": [{ "protocol": "SCTP", "port": 80, "endPort": 90 }] }],
        }),
    )]);
    assert_eq!(explain(&s, "y/b x/a 85 SCTP").decision, Decision::Allowed);
    assert_eq!(
        explain(&s, "y/b x/a 85 sctp").ingress.allowed_by[0].port,
        "SCTP 80-90"
    );
    assert_eq!(explain(&s, "y/b x/a 91 SCTP").decision, Decision::Denied);
    assert_eq!(explain(&s, "y/b x/a 85 TCP").decision, Decision::Denied);
}

#[test]
fn bad_flows_are_errors_not_panics() {
    let s = deny_x_allow_y_http();
    let mut ex = Explainer::new(&s, ExplainOptions::default());
    for line in [
        "x/nope x/a 80 TCP",
        "x/a x/a nope TCP",
        "x/a 10.244.1.3 http TCP", // a name needs a destination pod
        "x/a y/b http TCP",        // y/b declares no http
        "x/a fd00::1 80 TCP",
    ] {
        let f = flow(line);
        assert!(ex.explain(&f).is_err(), "{line}");
    }
    for line in [
        "",
        "a b c",
        "x/a x/b 80 ICMP",
        "x/a x/b 0 TCP",
        "x/a x/b 70000 TCP",
        "x/a/b x/b 80 TCP",
        "x/a x/b 80 TCP extra",
        "/a x/b 80 TCP",
        "x/a x/b HTTP TCP",
    ] {
        assert!(Flow::parse_line(line).is_err(), "{line:?}");
    }
    assert_eq!(
        flow("x/a 10.0.0.1 dns UDP").port,
        PortSpec::Name("dns".into())
    );
    assert_eq!(flow("x/a 10.0.0.1 dns udp").protocol, Protocol::Udp);
}

#[test]
fn ipv6_flows_use_the_ipv6_rules() {
    let mut s = state(vec![pol(
        "x",
        "deny-all",
        json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
    )]);
    s.pods.push(Arc::new(with_pod_ips(
        mk_pod("x", "six", &[], "", "node1"),
        &["fd00:1::2"],
    )));
    s.pods.push(Arc::new(with_pod_ips(
        mk_pod("y", "six", &[], "", "node2"),
        &["fd00:2::2"],
    )));
    let e = explain(&s, "y/six x/six 80 TCP");
    assert_eq!(e.from.ip.to_string(), "fd00:2::2");
    assert_eq!(e.decision, Decision::Denied);
    assert_eq!(
        explain(&s, "x/six y/six 80 TCP").decision,
        Decision::Allowed
    );
}

#[test]
fn audit_mode_policies_are_explained_not_enforced() {
    let mut s = state(vec![
        pol(
            "x",
            "deny-all",
            json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
        ),
        pol(
            "y",
            "allow-from-x",
            json!({ "podSelector": {}, "ingress": [{ "from": [{ "namespaceSelector": { "matchLabels": { "ns": "x" } } }] }] }),
        ),
    ]);
    let audited: Vec<_> = s
        .policies
        .iter()
        .map(|p| {
            let mut p = (**p).clone();
            p.metadata.annotations = Some(
                [(
                    palisade_netpol::ENFORCEMENT_ANNOTATION.to_string(),
                    "audit".to_string(),
                )]
                .into(),
            );
            Arc::new(p)
        })
        .collect();
    s.policies = audited;
    // x/a is isolated by an audit-mode deny-all only: allowed, but would be denied.
    let e = explain(&s, "y/b x/a 80 TCP");
    assert_eq!(e.decision, Decision::Allowed, "{}", e.to_text());
    assert_eq!(e.audit_decision, Decision::Denied);
    assert!(e.ingress.audit && e.ingress.would_deny);
    assert!(
        e.ingress
            .reason
            .contains("audit-mode policies (x/deny-all)"),
        "{}",
        e.ingress.reason
    );
    assert_eq!(e.to_json()["audit_verdict"], "denied");
    // y/b is isolated by an audit-mode policy that allows x: allowed either way.
    let e = explain(&s, "x/a y/b 80 TCP");
    assert_eq!(e.decision, Decision::Allowed);
    assert_eq!(e.audit_decision, Decision::Allowed);
    assert!(
        e.ingress
            .reason
            .starts_with("allowed (audit mode) by y/allow-from-x"),
        "{}",
        e.ingress.reason
    );
    // An enforced policy next to an audited one keeps its effect.
    s.policies.push(Arc::new(mk_policy(
        "x",
        "enforced-deny",
        json!({ "podSelector": { "matchLabels": { "pod": "a" } }, "policyTypes": ["Ingress"] }),
    )));
    let e = explain(&s, "y/b x/a 80 TCP");
    assert_eq!(e.decision, Decision::Denied);
    let by: Vec<String> = e.ingress.isolated_by.iter().map(|p| p.short()).collect();
    assert_eq!(by, vec!["x/enforced-deny"]);
}

/// A rule over the peer × port limit is compiled as a jump per peer to a chain of its ports;
/// explain still names the peer that matched, not "any".
#[test]
fn a_large_rule_still_names_its_peer() {
    let mut from = vec![json!({ "namespaceSelector": { "matchLabels": { "ns": "y" } } })];
    from.extend((0..40).map(|i| json!({ "ipBlock": { "cidr": format!("172.16.{i}.0/24") } })));
    let mut ports: Vec<serde_json::Value> = (0..9)
        .map(|i| json!({ "port": format!("none-{i}") }))
        .collect();
    ports.push(json!({ "port": "http" }));
    let s = state(vec![pol(
        "x",
        "large",
        json!({ "podSelector": {}, "ingress": [{ "from": from, "ports": ports }] }),
    )]);
    let e = explain(&s, "y/b x/a http TCP");
    assert_eq!(e.decision, Decision::Allowed, "{}", e.to_text());
    let hit = &e.ingress.allowed_by[0];
    assert!(hit.peer.contains("ns in (y)"), "{}", e.to_text());
    assert!(hit.port.contains("named-port tcp/http"), "{}", e.to_text());
    let e = explain(&s, "172.16.7.9 x/a http TCP");
    assert_eq!(e.decision, Decision::Allowed, "{}", e.to_text());
    assert!(
        e.ingress.allowed_by[0].peer.contains("172.16.7.0/24"),
        "{}",
        e.to_text()
    );
    let e = explain(&s, "172.16.40.9 x/a http TCP");
    assert_eq!(e.decision, Decision::Denied, "{}", e.to_text());
}
