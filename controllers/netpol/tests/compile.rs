//! Scenario tests: objects → compile → render → trace packets through the rendered text.
//!
//! Cluster used throughout (this node is `n1`, pod CIDR 10.244.1.0/24):
//!
//! | pod            | labels    | node | IP          | named ports      |
//! |----------------|-----------|------|-------------|------------------|
//! | shop/web-1     | app=web   | n1   | 10.244.1.10 | http 8080/TCP    |
//! | shop/web-2     | app=web   | n2   | 10.244.2.10 | http 9090/TCP    |
//! | shop/api-1     | app=api   | n1   | 10.244.1.11 | dns 53/UDP       |
//! | db/pg-1        | app=pg    | n1   | 10.244.1.20 | pg 5432/TCP      |
//! | db/pg-2        | app=pg    | n2   | 10.244.2.20 | —                |
//! | mon/prom-1     | app=prom  | n2   | 10.244.2.30 | —                |
//! | ghost/g-1      | app=g     | n2   | 10.244.2.40 | — (no Namespace) |
//! | shop/agent     | app=agent | n1   | 192.168.0.1 | hostNetwork      |
//!
//! Namespaces: shop {team: a}, db {team: b, env: prod}, mon {purpose: monitoring}.

use palisade_netpol::builders::*;
use palisade_netpol::compile::Protocol;
use palisade_netpol::k8s_openapi::api::core::v1::Pod;
use palisade_netpol::k8s_openapi::api::networking::v1::NetworkPolicy;
use palisade_netpol::names;
use palisade_netpol::trace::{CtState, Packet, Tracer, Verdict};
use palisade_netpol::{
    compile, reasons, render, ClusterState, Compiled, Family, NodeConfig, Payload,
};
use serde_json::json;

const WEB1: &str = "10.244.1.10";
const WEB2: &str = "10.244.2.10";
const API1: &str = "10.244.1.11";
const PG1: &str = "10.244.1.20";
const PG2: &str = "10.244.2.20";
const PROM: &str = "10.244.2.30";
const GHOST: &str = "10.244.2.40";
const HOST: &str = "192.168.0.1";
const UNKNOWN_LOCAL: &str = "10.244.1.99";

fn pods() -> Vec<Pod> {
    vec![
        with_ports(
            mk_pod("shop", "web-1", &[("app", "web")], WEB1, "n1"),
            &[("http", 8080, "TCP")],
        ),
        with_ports(
            mk_pod("shop", "web-2", &[("app", "web")], WEB2, "n2"),
            &[("http", 9090, "TCP")],
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
        mk_pod("ghost", "g-1", &[("app", "g")], GHOST, "n2"),
        with_host_network(mk_pod("shop", "agent", &[("app", "agent")], HOST, "n1")),
    ]
}

fn state_with(pods: Vec<Pod>, policies: Vec<NetworkPolicy>) -> ClusterState {
    cluster(
        vec![
            mk_node("n1", "10.244.1.0/24"),
            mk_node("n2", "10.244.2.0/24"),
        ],
        vec![
            mk_ns("shop", &[("team", "a")]),
            mk_ns("db", &[("team", "b"), ("env", "prod")]),
            mk_ns("mon", &[("purpose", "monitoring")]),
        ],
        pods,
        policies,
    )
}

struct Run {
    compiled: Compiled,
    payload: Payload,
    tracer: Tracer,
}

impl Run {
    fn fwd(&self, p: Packet) -> Verdict {
        self.tracer.trace("FORWARD", &p).expect("trace").verdict
    }
    fn tcp(&self, src: &str, dst: &str, port: u16) -> Verdict {
        self.fwd(Packet::tcp(src, dst, port))
    }
    fn has_diag(&self, reason: &str) -> bool {
        self.compiled.diagnostics.iter().any(|d| d.reason == reason)
    }
}

fn run_cfg(state: &ClusterState, cfg: &NodeConfig) -> Run {
    let compiled = compile(state, cfg);
    let payload = render(&compiled);
    // Every jump target and set exists, and the text parses back.
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

fn run(policies: Vec<NetworkPolicy>) -> Run {
    run_cfg(&state_with(pods(), policies), &NodeConfig::new("n1"))
}

use Verdict::{Accept, Drop};

#[test]
fn no_policies_means_no_isolation_but_unknown_local_pods_are_blocked() {
    let r = run(vec![]);
    assert_eq!(r.tcp(WEB2, WEB1, 80), Accept);
    assert_eq!(r.tcp(WEB1, PROM, 80), Accept);
    assert_eq!(r.tcp(WEB1, API1, 80), Accept);
    // The first-instant rule: an address of our pod CIDR that is not a known pod.
    assert_eq!(r.tcp(WEB2, UNKNOWN_LOCAL, 80), Drop);
    assert_eq!(r.tcp(UNKNOWN_LOCAL, WEB2, 80), Drop);
    // ... but not from the node itself.
    assert_eq!(
        r.fwd(Packet::tcp(HOST, UNKNOWN_LOCAL, 80).from_local()),
        Accept
    );
    // Only the fixed chains, no sets.
    let chains: Vec<&str> = r.payload.chains.iter().map(String::as_str).collect();
    assert_eq!(
        chains,
        vec![
            names::EGRESS_CHAIN,
            names::FORWARD_CHAIN,
            names::INGRESS_CHAIN,
            names::INPUT_CHAIN
        ]
    );
    assert!(r.payload.sets.is_empty());
}

#[test]
fn first_instant_rule_can_be_turned_off() {
    let mut cfg = NodeConfig::new("n1");
    cfg.block_unknown_pods = false;
    let r = run_cfg(&state_with(pods(), vec![]), &cfg);
    assert_eq!(r.tcp(WEB2, UNKNOWN_LOCAL, 80), Accept);
    assert!(!r.payload.iptables_restore.contains("10.244.1.0/24"));
}

#[test]
fn an_unusable_log_rate_is_reported_and_logs_nothing_not_even_unknown_pods() {
    // A rate iptables would refuse (`0/sec`) must not reach the payload anywhere, or the
    // kernel rejects the whole restore: the unknown-pod rules used to take it unchecked.
    let mut cfg = NodeConfig::new("n1");
    cfg.deny_log = Some(palisade_netpol::DenyLog {
        rate: "0/sec".into(),
        ..Default::default()
    });
    let policies = vec![mk_policy("shop", "deny", json!({"podSelector": {}}))];
    let r = run_cfg(&state_with(pods(), policies), &cfg);
    assert!(
        r.payload.iptables_restore.contains("10.244.1.0/24"),
        "unknown pods blocked"
    );
    assert!(
        !r.payload.iptables_restore.contains("NFLOG"),
        "no log rule at all"
    );
    assert!(!r.payload.iptables_restore.contains("0/sec"));
    assert!(r
        .compiled
        .diagnostics
        .iter()
        .any(|d| d.reason == reasons::INVALID_CONFIG && d.message.contains("the log is off")));
    // A usable rate logs unknown pods' traffic too.
    let mut cfg = NodeConfig::new("n1");
    cfg.deny_log = Some(palisade_netpol::DenyLog::default());
    let r = run_cfg(&state_with(pods(), vec![]), &cfg);
    assert!(r
        .payload
        .iptables_restore
        .contains(palisade_netpol::denied::PREFIX_UNKNOWN_INGRESS));
}

#[test]
fn default_deny_ingress_isolates_only_ingress() {
    let r = run(vec![mk_policy("shop", "deny", json!({"podSelector": {}}))]);
    assert_eq!(r.tcp(WEB2, WEB1, 8080), Drop);
    assert_eq!(r.tcp(PG1, API1, 80), Drop);
    assert_eq!(r.tcp(WEB1, PROM, 80), Accept, "egress is not isolated");
    assert_eq!(r.tcp(PG1, PG2, 80), Accept, "other namespaces untouched");
    // Return traffic of an allowed connection passes; INVALID is dropped.
    assert_eq!(
        r.fwd(Packet::tcp(WEB2, WEB1, 8080).with_state(CtState::Established)),
        Accept
    );
    assert_eq!(
        r.fwd(Packet::tcp(WEB2, WEB1, 8080).with_state(CtState::Related)),
        Accept
    );
    assert_eq!(
        r.fwd(Packet::tcp(WEB2, PROM, 80).with_state(CtState::Invalid)),
        Drop
    );
    // The node may always reach its pods (kubelet probes).
    assert_eq!(r.fwd(Packet::tcp(HOST, WEB1, 8080).from_local()), Accept);
}

#[test]
fn empty_rule_list_and_explicit_deny_all_egress() {
    let r = run(vec![mk_policy(
        "shop",
        "deny-all",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [], "egress": []}),
    )]);
    assert_eq!(r.tcp(WEB2, WEB1, 8080), Drop);
    assert_eq!(r.tcp(WEB1, PROM, 80), Drop);
    assert_eq!(r.tcp(API1, WEB2, 80), Drop);
    // pod → node (INPUT) is egress too.
    let to_node = Packet::tcp(WEB1, HOST, 10250);
    assert_eq!(r.tracer.trace("INPUT", &to_node).unwrap().verdict, Drop);
    let back = to_node.with_state(CtState::Established);
    assert_eq!(r.tracer.trace("INPUT", &back).unwrap().verdict, Accept);
    // A pod without egress isolation may reach the node.
    let pg = Packet::tcp(PG1, HOST, 10250);
    assert_eq!(r.tracer.trace("INPUT", &pg).unwrap().verdict, Accept);
}

#[test]
fn empty_from_and_ports_allow_everyone() {
    let r = run(vec![mk_policy(
        "shop",
        "allow-all",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}]}),
    )]);
    assert_eq!(r.tcp(PROM, WEB1, 1), Accept);
    assert_eq!(
        r.fwd(Packet::new("8.8.8.8", WEB1, Protocol::Sctp, 9)),
        Accept
    );
    let r = run(vec![mk_policy(
        "shop",
        "allow-all",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [], "ports": []}]}),
    )]);
    assert_eq!(r.tcp(PROM, WEB1, 1), Accept);
}

#[test]
fn pod_selector_peer_is_same_namespace_only() {
    let r = run(vec![mk_policy(
        "db",
        "from-web",
        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
    )]);
    // shop/web-* are not in namespace db.
    assert_eq!(r.tcp(WEB1, PG1, 5432), Drop);
    assert_eq!(r.tcp(WEB2, PG1, 5432), Drop);
}

#[test]
fn namespace_and_pod_selector_in_one_peer_is_an_and() {
    let and = mk_policy(
        "db",
        "and",
        json!({"podSelector": {"matchLabels": {"app": "pg"}}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {"matchLabels": {"app": "web"}}}
        ]}]}),
    );
    let r = run(vec![and]);
    assert_eq!(r.tcp(WEB1, PG1, 5432), Accept);
    assert_eq!(r.tcp(WEB2, PG1, 5432), Accept);
    assert_eq!(r.tcp(API1, PG1, 5432), Drop, "right namespace, wrong pod");
    assert_eq!(r.tcp(PROM, PG1, 5432), Drop, "wrong namespace");

    // The same two selectors as two peers is an OR.
    let or = mk_policy(
        "db",
        "or",
        json!({"podSelector": {"matchLabels": {"app": "pg"}}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"team": "a"}}},
            {"podSelector": {"matchLabels": {"app": "web"}}}
        ]}]}),
    );
    let r = run(vec![or]);
    assert_eq!(r.tcp(API1, PG1, 5432), Accept);
    assert_eq!(r.tcp(PROM, PG1, 5432), Drop);
}

#[test]
fn namespace_selector_operators_and_empty_selector() {
    let mk = |sel: serde_json::Value| {
        run(vec![mk_policy(
            "shop",
            "p",
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [{"namespaceSelector": sel}]}]}),
        )])
    };
    // {} = every namespace, including one without a Namespace object.
    let r = mk(json!({}));
    for src in [PG2, PROM, GHOST, API1] {
        assert_eq!(r.tcp(src, WEB1, 8080), Accept, "{src}");
    }
    assert_eq!(r.tcp("8.8.8.8", WEB1, 8080), Drop);

    let r =
        mk(json!({"matchExpressions": [{"key": "team", "operator": "In", "values": ["b", "c"]}]}));
    assert_eq!(r.tcp(PG2, WEB1, 1), Accept);
    assert_eq!(r.tcp(PROM, WEB1, 1), Drop);

    let r =
        mk(json!({"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["a"]}]}));
    assert_eq!(r.tcp(PG2, WEB1, 1), Accept);
    assert_eq!(r.tcp(PROM, WEB1, 1), Accept, "no team label: NotIn matches");
    assert_eq!(
        r.tcp(GHOST, WEB1, 1),
        Accept,
        "unknown namespace has no team label"
    );
    assert_eq!(r.tcp(API1, WEB1, 1), Drop);

    let r = mk(json!({"matchExpressions": [{"key": "purpose", "operator": "Exists"}]}));
    assert_eq!(r.tcp(PROM, WEB1, 1), Accept);
    assert_eq!(r.tcp(PG2, WEB1, 1), Drop);

    let r = mk(json!({"matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]}));
    assert_eq!(r.tcp(PROM, WEB1, 1), Accept);
    assert_eq!(r.tcp(GHOST, WEB1, 1), Accept);
    assert_eq!(r.tcp(PG2, WEB1, 1), Drop);
}

#[test]
fn namespace_without_object_matches_by_name_only() {
    let r = run(vec![
        mk_policy(
            "shop",
            "from-ghost",
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ghost"}}}
            ]}]}),
        ),
        // A policy in a namespace that has no Namespace object still selects its pods.
        mk_policy(
            "ghost",
            "deny",
            json!({"podSelector": {}, "policyTypes": ["Egress"]}),
        ),
    ]);
    assert_eq!(r.tcp(GHOST, WEB1, 8080), Accept);
    assert_eq!(r.tcp(PROM, WEB1, 8080), Drop);
    // ghost/g-1 is remote: its egress is enforced on its own node, nothing to do here.
    assert!(!r
        .compiled
        .diagnostics
        .iter()
        .any(|d| d.kind == "NetworkPolicy"));
}

#[test]
fn named_ports_resolve_per_destination_pod() {
    // Ingress: `http` is 8080 on web-1 (local) and 9090 on web-2 (remote).
    let r = run(vec![mk_policy(
        "shop",
        "web-http",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [{"port": "http"}]}]}),
    )]);
    assert_eq!(r.tcp(PROM, WEB1, 8080), Accept);
    assert_eq!(r.tcp(PROM, WEB1, 9090), Drop);
    assert_eq!(
        r.fwd(Packet::new(PROM, WEB1, Protocol::Udp, 8080)),
        Drop,
        "the named port is TCP"
    );
    assert!(!r.has_diag(reasons::UNKNOWN_NAMED_PORT));

    // Egress: api-1 may reach `pg` of db pods; pg-1 declares 5432, pg-2 declares nothing.
    let r = run(vec![mk_policy(
        "shop",
        "api-to-pg",
        json!({"podSelector": {"matchLabels": {"app": "api"}}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}], "ports": [{"port": "pg"}]}
        ]}),
    )]);
    assert_eq!(r.tcp(API1, PG1, 5432), Accept);
    assert_eq!(r.tcp(API1, PG1, 5433), Drop);
    assert_eq!(r.tcp(API1, PG2, 5432), Drop, "pg-2 has no port named pg");
    assert_eq!(r.tcp(API1, WEB2, 5432), Drop);
    let set = r
        .payload
        .set_specs
        .iter()
        .find(|s| s.identity.contains("named-port tcp/pg"))
        .expect("named port set");
    let members: Vec<String> = set.members.iter().map(ToString::to_string).collect();
    assert_eq!(members, vec![format!("{PG1},tcp:5432")]);
}

#[test]
fn unknown_named_port_matches_nothing_and_is_reported() {
    let r = run(vec![mk_policy(
        "shop",
        "typo",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [{"port": "htpp"}, {"port": 22}]}]}),
    )]);
    assert!(r.has_diag(reasons::UNKNOWN_NAMED_PORT));
    assert_eq!(r.tcp(PROM, WEB1, 8080), Drop);
    assert_eq!(
        r.tcp(PROM, WEB1, 22),
        Accept,
        "other ports of the rule still apply"
    );
    let r = run(vec![mk_policy(
        "shop",
        "typo-egress",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "nope"}]}]}),
    )]);
    assert!(r.has_diag(reasons::UNKNOWN_NAMED_PORT));
    assert_eq!(r.tcp(WEB1, PG1, 5432), Drop);
}

#[test]
fn end_port_ranges_and_protocols() {
    let r = run(vec![mk_policy(
        "shop",
        "ranges",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [
            {"port": 8000, "endPort": 8080},
            {"port": 53, "protocol": "UDP"},
            {"protocol": "SCTP"},
            {"port": 9000}
        ]}]}),
    )]);
    assert_eq!(r.tcp(PROM, WEB1, 8000), Accept);
    assert_eq!(r.tcp(PROM, WEB1, 8050), Accept);
    assert_eq!(r.tcp(PROM, WEB1, 8080), Accept);
    assert_eq!(r.tcp(PROM, WEB1, 8081), Drop);
    assert_eq!(r.tcp(PROM, WEB1, 9000), Accept);
    assert_eq!(r.tcp(PROM, WEB1, 53), Drop);
    assert_eq!(r.fwd(Packet::new(PROM, WEB1, Protocol::Udp, 53)), Accept);
    assert_eq!(r.fwd(Packet::new(PROM, WEB1, Protocol::Udp, 8050)), Drop);
    assert_eq!(r.fwd(Packet::new(PROM, WEB1, Protocol::Sctp, 1234)), Accept);
    // 8000:8080 and 9000 share one multiport rule.
    assert!(r
        .payload
        .iptables_restore
        .contains("-p tcp -m multiport --dports 8000:8080,9000"));
}

#[test]
fn ip_block_with_except_matches_addresses_literally() {
    let r = run(vec![mk_policy(
        "shop",
        "block",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.2.0/24", "10.9.9.9/32"]}},
            {"ipBlock": {"cidr": "10.244.2.30/32"}},
            {"ipBlock": {"cidr": "fd00::/8"}}
        ]}]}),
    )]);
    assert_eq!(r.tcp("10.1.2.3", WEB1, 80), Accept);
    assert_eq!(
        r.tcp(WEB2, WEB1, 80),
        Drop,
        "pod IPs inside an except are excluded"
    );
    assert_eq!(r.tcp("10.9.9.9", WEB1, 80), Drop);
    assert_eq!(
        r.tcp(PROM, WEB1, 80),
        Accept,
        "second block matches the pod IP literally"
    );
    assert_eq!(r.tcp("172.16.0.1", WEB1, 80), Drop);
    assert_eq!(r.tcp(API1, WEB1, 80), Accept, "10.244.1.11 is inside 10/8");
    let set = r
        .payload
        .set_specs
        .iter()
        .find(|s| s.identity.starts_with("block 10.0.0.0/8"))
        .expect("block set");
    let members: Vec<String> = set.members.iter().map(ToString::to_string).collect();
    assert_eq!(
        members,
        vec!["10.0.0.0/8", "10.9.9.9 nomatch", "10.244.2.0/24 nomatch"]
    );
    // Egress to 0.0.0.0/0 except the cluster range.
    let r = run(vec![mk_policy(
        "shop",
        "internet",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"], "egress": [{"to": [
            {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}
        ]}]}),
    )]);
    assert_eq!(r.tcp(WEB1, "8.8.8.8", 443), Accept);
    assert_eq!(r.tcp(WEB1, "200.1.1.1", 443), Accept);
    assert_eq!(r.tcp(WEB1, PG2, 5432), Drop);
}

#[test]
fn policy_types_inference() {
    // No policyTypes, egress rules present: both directions.
    let r = run(vec![mk_policy(
        "shop",
        "both",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "egress": [{"to": [{"ipBlock": {"cidr": "8.8.8.8/32"}}]}]}),
    )]);
    assert_eq!(
        r.tcp(PROM, WEB1, 80),
        Drop,
        "ingress isolated (always inferred)"
    );
    assert_eq!(r.tcp(WEB1, "8.8.8.8", 53), Accept);
    assert_eq!(r.tcp(WEB1, "8.8.4.4", 53), Drop);
    // policyTypes [Egress] with ingress rules: ingress rules are ignored, ingress open.
    let r = run(vec![mk_policy(
        "shop",
        "egress-only",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
               "ingress": [{"from": [{"ipBlock": {"cidr": "1.1.1.1/32"}}]}]}),
    )]);
    assert_eq!(r.tcp(PROM, WEB1, 80), Accept);
    assert_eq!(r.tcp(WEB1, PROM, 80), Drop);
    // No policyTypes, empty egress list: ingress only.
    let r = run(vec![mk_policy(
        "shop",
        "ingress-only",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "egress": []}),
    )]);
    assert_eq!(r.tcp(PROM, WEB1, 80), Drop);
    assert_eq!(r.tcp(WEB1, PROM, 80), Accept);
}

#[test]
fn several_policies_on_one_pod_are_a_union() {
    let from = |name: &str, app: &str, ns: &str| {
        mk_policy(
            "shop",
            name,
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}, "podSelector": {"matchLabels": {"app": app}}}
            ]}]}),
        )
    };
    let r = run(vec![
        from("from-prom", "prom", "mon"),
        from("from-pg", "pg", "db"),
    ]);
    assert_eq!(r.tcp(PROM, WEB1, 80), Accept);
    assert_eq!(r.tcp(PG2, WEB1, 80), Accept);
    assert_eq!(r.tcp(API1, WEB1, 80), Drop);
    // Both policies hang off one profile chain.
    let profile = r
        .compiled
        .chains
        .iter()
        .find(|c| c.name.starts_with(names::INGRESS_PROFILE_PREFIX))
        .expect("profile");
    let jumps = profile
        .rules
        .iter()
        .filter(|r| matches!(r.target, palisade_netpol::compile::Target::Jump(_)))
        .count();
    assert_eq!(jumps, 2);
}

#[test]
fn pod_to_pod_on_one_node_needs_egress_and_ingress() {
    let r = run(vec![
        // api-1 may only talk to db pods.
        mk_policy(
            "shop",
            "api-egress",
            json!({"podSelector": {"matchLabels": {"app": "api"}}, "policyTypes": ["Egress"], "egress": [
                {"to": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}
            ]}),
        ),
        // pg-1 only accepts web pods.
        mk_policy(
            "db",
            "pg-ingress",
            json!({"podSelector": {"matchLabels": {"app": "pg"}}, "ingress": [
                {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}]}
            ]}),
        ),
    ]);
    let t = r
        .tracer
        .trace("FORWARD", &Packet::tcp(API1, PG1, 5432))
        .unwrap();
    assert_eq!(
        t.verdict, Drop,
        "egress allows, ingress denies: {:?}",
        t.path
    );
    assert!(t
        .path
        .iter()
        .any(|p| p.contains(names::EGRESS_PROFILE_PREFIX)));
    assert_eq!(
        r.tcp(WEB1, PG1, 5432),
        Accept,
        "web-1 egress is open, pg-1 ingress allows"
    );
    assert_eq!(r.tcp(API1, WEB1, 80), Drop, "api-1 egress denies");
    assert_eq!(
        r.tcp(API1, PG2, 5432),
        Accept,
        "remote pg-2 ingress is its node's job"
    );
}

#[test]
fn host_network_pods_are_never_isolated_nor_peers() {
    let r = run(vec![mk_policy(
        "shop",
        "deny-all",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"app": "agent"}}}]}
        ]}),
    )]);
    assert!(!r.payload.iptables_restore.contains(HOST));
    assert!(!r.payload.ipset_restore.contains(HOST));
    assert_eq!(r.tcp(PROM, HOST, 10250), Accept);
}

#[test]
fn inactive_and_ip_less_pods() {
    let mut p = pods();
    p.push(with_phase(
        mk_pod("shop", "job", &[("app", "web")], "10.244.1.50", "n1"),
        "Succeeded",
    ));
    p.push(mk_pod("shop", "starting", &[("app", "web")], "", "n1"));
    let st = state_with(
        p,
        vec![mk_policy(
            "shop",
            "from-web",
            json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
        )],
    );
    let r = run_cfg(&st, &NodeConfig::new("n1"));
    assert!(!r.payload.ipset_restore.contains("10.244.1.50"));
    assert_eq!(
        r.tcp("10.244.1.50", WEB1, 80),
        Drop,
        "a finished pod's IP is unknown"
    );
    assert!(r
        .compiled
        .diagnostics
        .iter()
        .any(|d| d.reason == reasons::POD_WITHOUT_IP && d.name == "starting"));
}

#[test]
fn unsupported_protocol_skips_the_rule_and_fails_closed() {
    let r = run(vec![mk_policy(
        "shop",
        "icmp",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
            {"ports": [{"protocol": "ICMP"}, {"port": 80}]},
            {"from": [{"ipBlock": {"cidr": "1.2.3.4/32"}}]}
        ]}),
    )]);
    assert!(r.has_diag(reasons::UNSUPPORTED_PROTOCOL));
    assert_eq!(r.tcp(PROM, WEB1, 80), Drop, "the whole rule is skipped");
    assert_eq!(
        r.tcp("1.2.3.4", WEB1, 80),
        Accept,
        "other rules still apply"
    );
}

#[test]
fn invalid_input_fails_closed_with_diagnostics() {
    let r = run(vec![mk_policy(
        "shop",
        "bad",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
            {"from": [{}]},
            {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]},
            {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]},
            {"from": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}]},
            {"ports": [{"port": 9000, "endPort": 8000}, {"port": "http", "endPort": 9}]}
        ]}),
    )]);
    for reason in [
        reasons::INVALID_PEER,
        reasons::INVALID_IP_BLOCK,
        reasons::INVALID_SELECTOR,
        reasons::INVALID_PORT,
    ] {
        assert!(r.has_diag(reason), "{reason}: {:?}", r.compiled.diagnostics);
    }
    for (src, port) in [(PROM, 8080), ("10.1.1.1", 80), (API1, 8500), (PG2, 9)] {
        assert_eq!(r.tcp(src, WEB1, port), Drop, "{src}:{port}");
    }
}

#[test]
fn identical_selectors_share_one_set() {
    let r = run(vec![
        mk_policy(
            "shop",
            "a",
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"purpose": "monitoring"}}}
            ]}]}),
        ),
        mk_policy(
            "shop",
            "b",
            json!({"podSelector": {"matchLabels": {"app": "api"}}, "ingress": [{"from": [
                {"namespaceSelector": {"matchExpressions": [{"key": "purpose", "operator": "In", "values": ["monitoring"]}]}, "podSelector": {}}
            ]}]}),
        ),
        // podSelector-only peer ≡ namespace by name.
        mk_policy(
            "db",
            "c",
            json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
        ),
        mk_policy(
            "db",
            "d",
            json!({"podSelector": {}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "db"}}}
            ]}]}),
        ),
    ]);
    assert_eq!(r.payload.sets.len(), 2, "{:#?}", r.payload.set_specs);
    assert_eq!(r.tcp(PROM, WEB1, 1), Accept);
    assert_eq!(r.tcp(PROM, API1, 1), Accept);
    assert_eq!(r.tcp(PG2, PG1, 1), Accept);
}

fn realistic() -> Vec<NetworkPolicy> {
    vec![
        mk_policy("shop", "deny", json!({"podSelector": {}})),
        mk_policy(
            "shop",
            "web",
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"purpose": "monitoring"}}}], "ports": [{"port": "http"}]},
                {"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}], "ports": [{"port": 443}, {"port": 8000, "endPort": 8100}]}
            ]}),
        ),
        mk_policy(
            "db",
            "pg",
            json!({"podSelector": {"matchLabels": {"app": "pg"}}, "policyTypes": ["Ingress", "Egress"], "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {"matchLabels": {"app": "api"}}}], "ports": [{"port": "pg"}]}
            ], "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "pg"}}}]}]}),
        ),
    ]
}

#[test]
fn output_is_deterministic_and_order_independent() {
    let a = run(realistic());
    let b = run(realistic());
    assert_eq!(a.payload, b.payload);
    let mut p = pods();
    p.reverse();
    let mut pol = realistic();
    pol.reverse();
    let c = run_cfg(&state_with(p, pol), &NodeConfig::new("n1"));
    assert_eq!(a.payload, c.payload);
    assert_eq!(a.compiled.diagnostics, c.compiled.diagnostics);
}

#[test]
fn remote_pod_churn_changes_only_set_members() {
    let before = run(realistic());
    let mut p = pods();
    p.push(mk_pod(
        "mon",
        "prom-2",
        &[("app", "prom")],
        "10.244.3.7",
        "n3",
    ));
    p.push(mk_pod(
        "shop",
        "api-9",
        &[("app", "api")],
        "10.244.3.8",
        "n3",
    ));
    p.retain(|x| x.metadata.name.as_deref() != Some("pg-2"));
    let after = run_cfg(&state_with(p, realistic()), &NodeConfig::new("n1"));
    assert_eq!(
        before.payload.iptables_restore, after.payload.iptables_restore,
        "rules must not change"
    );
    assert_eq!(before.payload.sets, after.payload.sets, "same set names");
    assert_ne!(before.payload.ipset_restore, after.payload.ipset_restore);
    assert!(after.payload.ipset_restore.contains("10.244.3.7"));
    assert!(after.payload.ipset_restore.contains("10.244.3.8"));
    assert!(!after.payload.ipset_restore.contains(PG2));
    assert_eq!(after.tcp("10.244.3.7", WEB1, 8080), Accept);
    // Namespace label churn is also a set-only change.
    let mut st = state_with(pods(), realistic());
    st.namespaces.push(std::sync::Arc::new(mk_ns("mon", &[])));
    let relabelled = run_cfg(&st, &NodeConfig::new("n1"));
    assert_eq!(
        before.payload.iptables_restore,
        relabelled.payload.iptables_restore
    );
    assert_eq!(relabelled.tcp(PROM, WEB1, 8080), Drop);
}

#[test]
fn local_pod_churn_changes_dispatch_not_policy_chains() {
    let before = run(realistic());
    let mut p = pods();
    p.push(with_ports(
        mk_pod("shop", "web-3", &[("app", "web")], "10.244.1.30", "n1"),
        &[("http", 8080, "TCP")],
    ));
    let after = run_cfg(&state_with(p, realistic()), &NodeConfig::new("n1"));
    let b = before.payload.chain_rules();
    let a = after.payload.chain_rules();
    let changed: Vec<&String> = a.keys().filter(|k| a.get(*k) != b.get(*k)).collect();
    assert_eq!(
        changed,
        vec![names::EGRESS_CHAIN, names::INGRESS_CHAIN],
        "the new pod reuses web-1's profile; only dispatch rules change"
    );
    assert_eq!(after.tcp(PROM, "10.244.1.30", 8080), Accept);
    assert_eq!(after.tcp(PROM, "10.244.1.30", 22), Drop);
}

#[test]
fn realistic_payload_shape() {
    let r = run(realistic());
    let p = &r.payload;
    assert!(p.iptables_restore.starts_with("# Palisade"));
    assert!(p.iptables_restore.ends_with("COMMIT\n"));
    assert_eq!(
        p.stats.rules,
        p.iptables_restore
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count()
    );
    assert_eq!(p.stats.sets, p.sets.len());
    assert_eq!(
        p.stats.members,
        p.set_specs.iter().map(|s| s.members.len()).sum::<usize>()
    );
    for c in &p.chains {
        assert!(
            c.len() <= names::MAX_CHAIN_NAME && names::is_ours_chain(c),
            "{c}"
        );
    }
    for s in &p.sets {
        assert!(names::temp_set_name(s).len() <= names::MAX_SET_NAME && names::is_ours_set(s));
    }
    // Tracing the whole story.
    assert_eq!(r.tcp(PROM, WEB1, 8080), Accept);
    assert_eq!(r.tcp(PROM, WEB1, 9090), Drop);
    assert_eq!(r.tcp("8.8.8.8", WEB1, 443), Accept);
    assert_eq!(r.tcp("8.8.8.8", WEB1, 8100), Accept);
    assert_eq!(r.tcp("10.1.1.1", WEB1, 443), Drop);
    assert_eq!(r.tcp(API1, PG1, 5432), Accept);
    assert_eq!(r.tcp(WEB1, PG1, 5432), Drop);
    assert_eq!(r.tcp(PG1, PG2, 5432), Accept);
    assert_eq!(r.tcp(PG1, WEB2, 80), Drop);
    assert_eq!(
        r.tcp(PG1, API1, 80),
        Drop,
        "pg egress denies, shop ingress denies too"
    );
    let hooks: Vec<String> = p.hooks.iter().map(Payload::hook_rule).collect();
    assert_eq!(
        hooks,
        vec![
            "-A FORWARD -j PALISADE-FORWARD",
            "-A INPUT -j PALISADE-INPUT"
        ]
    );
}

#[test]
fn manifests_round_trip_through_the_compiler() {
    let yaml = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
spec: {podCIDRs: [10.244.1.0/24]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  nodeName: n1
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.244.1.10}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{ports: [{port: http}]}]
"#;
    let st = palisade_netpol::manifests::parse_yaml(yaml).expect("yaml");
    let r = run_cfg(&st, &NodeConfig::new("n1"));
    assert_eq!(r.tcp("1.2.3.4", WEB1, 8080), Accept);
    assert_eq!(r.tcp("1.2.3.4", WEB1, 80), Drop);
}

#[test]
#[ignore]
fn print_realistic() {
    let r = run(realistic());
    println!(
        "{}\n{}",
        r.payload.ipset_restore, r.payload.iptables_restore
    );
    for d in &r.compiled.diagnostics {
        println!("{d}");
    }
}

#[test]
fn ten_thousand_ip_block_excepts_compile_into_one_set() {
    // 10.0.0.0/8 except 10,000 /30s (10.100.x.y/30): every except becomes a `nomatch`
    // member of one hash:net set, the rule count does not grow with them.
    let excepts: Vec<String> = (0..10_000u32)
        .map(|i| format!("10.100.{}.{}/30", i / 64, (i % 64) * 4))
        .collect();
    let r = run(vec![mk_policy(
        "shop",
        "many-excepts",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": excepts}}
        ]}]}),
    )]);
    assert!(
        r.compiled.diagnostics.is_empty(),
        "{:?}",
        r.compiled.diagnostics
    );
    let set = r
        .payload
        .set_specs
        .iter()
        .find(|s| s.identity.starts_with("block 10.0.0.0/8"))
        .expect("block set");
    assert_eq!(set.members.len(), 10_001);
    assert!(
        r.payload.stats.rules < 40,
        "rules grew with the excepts: {}",
        r.payload.stats.rules
    );
    assert_eq!(r.tcp("10.100.0.1", WEB1, 80), Drop, "first except");
    assert_eq!(r.tcp("10.100.156.63", WEB1, 80), Drop, "last except");
    assert_eq!(
        r.tcp("10.100.156.64", WEB1, 80),
        Accept,
        "just past the last except"
    );
    assert_eq!(r.tcp("10.7.0.1", WEB1, 80), Accept);
}

/// Pod IPs no host can have (`0.0.0.0`, `::`, loopback, multicast, broadcast, IPv4-mapped
/// IPv6) come only from a status written past validation. `ipset` refuses some of them and
/// would fail the whole payload; each such pod is ignored with `InvalidPodIP` instead, and
/// every other pod is programmed as usual.
#[test]
fn unusable_pod_ips_are_ignored_not_put_into_sets() {
    let bad = [
        "0.0.0.0",
        "127.0.0.2",
        "224.0.0.1",
        "255.255.255.255",
        "::",
        "::1",
        "ff02::1",
        "::ffff:10.244.2.50",
    ];
    let mut all = pods();
    for (i, ip) in bad.iter().enumerate() {
        all.push(with_ports(
            mk_pod("db", &format!("bad-{i}"), &[("app", "pg")], ip, "n2"),
            &[("pg", 5432, "TCP")],
        ));
    }
    let policy = mk_policy(
        "shop",
        "to-pg",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "pg"}}}],
                           "ports": [{"port": "pg"}]}]}),
    );
    for family in [Family::V4, Family::V6] {
        let mut cfg = NodeConfig::new("n1");
        cfg.family = family;
        let r = run_cfg(&state_with(all.clone(), vec![policy.clone()]), &cfg);
        let flagged: Vec<&str> = r
            .compiled
            .diagnostics
            .iter()
            .filter(|d| d.reason == reasons::INVALID_POD_IP)
            .map(|d| d.name.as_str())
            .collect();
        assert_eq!(flagged.len(), bad.len(), "{family:?}: {flagged:?}");
        for ip in bad {
            assert!(
                !r.payload
                    .ipset_restore
                    .lines()
                    .any(|l| l.starts_with("add ") && l.contains(&format!(" {ip},"))
                        || l.ends_with(&format!(" {ip}"))),
                "{family:?}: {ip} in a set:\n{}",
                r.payload.ipset_restore
            );
        }
        if family == Family::V4 {
            // The real pg pod is still reached by its named port.
            assert_eq!(r.tcp(WEB1, PG1, 5432), Accept);
            assert_eq!(r.tcp(WEB1, PG1, 5433), Drop);
        }
    }
}

/// A rule with many peers and many port groups is not their product: each peer jumps to one
/// chain of the port groups (1,000 peers × 1,000 named ports were a million rules), with the
/// same verdicts.
#[test]
fn a_large_rule_costs_peers_plus_ports_not_their_product() {
    let peers: Vec<serde_json::Value> = (0..30)
        .map(|i| json!({"ipBlock": {"cidr": format!("10.0.{i}.0/24")}}))
        .collect();
    let mut ports: Vec<serde_json::Value> = (1..10)
        .map(|i| json!({"port": format!("unused-{i}")}))
        .collect();
    ports.push(json!({"port": "http"}));
    let r = run(vec![mk_policy(
        "shop",
        "many",
        json!({"podSelector": {"matchLabels": {"app": "web"}},
               "ingress": [{"from": peers, "ports": ports}]}),
    )]);
    let chain = |prefix: &str| {
        r.compiled
            .chains
            .iter()
            .filter(|c| c.name.starts_with(prefix))
            .map(|c| c.rules.len())
            .collect::<Vec<_>>()
    };
    // One mark-return plus one jump per peer; one chain of the ten port groups.
    assert_eq!(chain(names::INGRESS_POLICY_PREFIX), vec![31]);
    assert_eq!(chain(names::RULE_PORTS_PREFIX), vec![10]);
    assert_eq!(r.tcp("10.0.5.7", WEB1, 8080), Accept);
    assert_eq!(r.tcp("10.0.29.1", WEB1, 8080), Accept);
    assert_eq!(r.tcp("10.0.5.7", WEB1, 8081), Drop);
    assert_eq!(r.tcp("10.0.30.1", WEB1, 8080), Drop);
    assert_eq!(
        r.fwd(Packet::new("10.0.5.7", WEB1, Protocol::Udp, 8080)),
        Drop
    );
}

/// ipsets are budgeted: a NetworkPolicy direction that would take its namespace past
/// `NAMESPACE_SET_BUDGET` (or the node past `NODE_SET_BUDGET`) creates none, allows nothing
/// (its pods stay isolated) and is reported; other namespaces' policies are untouched.
#[test]
fn a_policy_over_the_set_budget_fails_closed_and_spares_others() {
    use palisade_netpol::compile::{NAMESPACE_SET_BUDGET, NODE_SET_BUDGET};
    let named = |prefix: &str, n: usize| -> Vec<serde_json::Value> {
        (0..n)
            .map(|i| json!({"port": format!("{prefix}{i}")}))
            .collect()
    };
    let mut big = named("n", NAMESPACE_SET_BUDGET + 1);
    big.push(json!({"port": "http"}));
    let policies = vec![
        mk_policy(
            "shop",
            "huge",
            json!({"podSelector": {"matchLabels": {"app": "web"}},
                   "ingress": [{"ports": big}]}),
        ),
        mk_policy(
            "db",
            "pg",
            json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}],
                                                    "ports": [{"port": "pg"}]}]}),
        ),
    ];
    let r = run(policies);
    let over: Vec<_> = r
        .compiled
        .diagnostics
        .iter()
        .filter(|d| d.reason == reasons::POLICY_OVER_BUDGET)
        .collect();
    assert_eq!(over.len(), 1, "{over:?}");
    assert_eq!(over[0].name, "huge");
    assert!(r.compiled.sets.len() < 10, "{} sets", r.compiled.sets.len());
    // Fails closed: web-1 is isolated and nothing reaches it, not even its http.
    assert_eq!(r.tcp(API1, WEB1, 8080), Drop);
    // The other namespace's policy works.
    assert_eq!(r.tcp(WEB1, PG1, 5432), Accept);
    assert_eq!(r.tcp(WEB1, PG1, 5433), Drop);

    // The node's budget: many namespaces, each within its own.
    let per = NAMESPACE_SET_BUDGET - 8;
    let namespaces = NODE_SET_BUDGET / per + 1;
    let mut nss = Vec::new();
    let mut pods = pods();
    let mut policies = Vec::new();
    for k in 0..namespaces {
        let ns = format!("t{k:02}");
        nss.push(mk_ns(&ns, &[]));
        pods.push(mk_pod(
            &ns,
            "p",
            &[],
            &format!("10.244.1.{}", 100 + k),
            "n1",
        ));
        policies.push(mk_policy(
            &ns,
            "many",
            json!({"podSelector": {}, "ingress": [{"ports": named(&format!("{ns}-"), per)}]}),
        ));
    }
    let st = cluster(vec![mk_node("n1", "10.244.1.0/24")], nss, pods, policies);
    let r = run_cfg(&st, &NodeConfig::new("n1"));
    let over = r
        .compiled
        .diagnostics
        .iter()
        .filter(|d| d.reason == reasons::POLICY_OVER_BUDGET)
        .count();
    assert!(over >= 1, "the node budget was not enforced");
    assert!(over < namespaces, "{over} of {namespaces} failed");
    assert!(
        r.compiled.sets.len() <= NODE_SET_BUDGET,
        "{} sets",
        r.compiled.sets.len()
    );
}
