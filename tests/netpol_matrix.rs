//! NetworkPolicy enforcement with real packets: upstream's x/y/z × a/b/c model on a two-node
//! lab (see `palisade_e2e::netpol`), policies applied with `palisade netpol apply` in each
//! node's namespace, every pod probing every pod.
//!
//! Each scenario is a function of `mod scenario`; each `#[test]` builds its own lab and runs
//! one. Expectations are written from Kubernetes semantics per scenario (never derived from
//! the compiler): `c.expect(|from, to| reachable?)`, the diagonal (a pod reaching itself over
//! its loopback) always reachable.
//!
//! Pod placement: node1 runs x/a x/c y/b z/a z/c; node2 runs x/b y/a y/c z/b, so every
//! namespace and most policies see both same-node and cross-node flows.
//!
//! SCTP is probed with raw INIT packets (the kernel has no SCTP sockets): reachable means the
//! destination pod saw the INIT (see `palisade_e2e::sctp`). UDP is reachable when the echo
//! comes back. There is no DNS in the lab, so egress scenarios need no DNS exception.
//!
//! Needs root and `cargo build -p palisade` first (or `PALISADE_BIN`).

use palisade_e2e::netpol::Cluster;
use palisade_tests::run_lab_test;

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run_lab_test(stringify!($name), Cluster::new, scenario::$name);
            }
        )*
    };
}

scenarios!(
    deny_all_ingress,
    deny_all_egress,
    deny_all_ingress_and_egress,
    allow_from_namespace,
    allow_from_pod_in_other_namespace_and,
    allow_from_namespace_or_pod_two_peers,
    match_expressions,
    named_ports_ingress,
    named_ports_egress,
    end_port_ranges,
    ip_block_with_except_ingress,
    ip_block_with_except_egress,
    egress_to_pods_on_port,
    multiple_policies_union,
    policy_update_and_delete,
    pod_relabel,
    namespace_relabel,
    egress_and_ingress_both_apply,
    sctp_and_udp_variants,
    allow_all_overrides_deny_all,
    policy_selecting_no_pods_changes_nothing,
    policy_only_selects_its_namespace,
    protocol_without_port,
    pod_selector_in_all_namespaces,
    node_to_local_pod_always_allowed,
    design_unknown_pod_in_pod_cidr_gets_no_traffic,
    ip_block_overlapping_peers_union,
    named_port_resolves_per_pod,
    policy_types_default_from_rules,
    terminated_pod_ip_is_not_selected,
    egress_to_external_ip_block,
    audit_mode_is_not_enforced,
);

mod scenario {
    use anyhow::Result;
    use palisade_e2e::k8s::{self, network_policy as np, NamedPort};
    use palisade_e2e::netpol::Cluster;
    use palisade_e2e::Matrix;
    use palisade_e2e::Protocol::{Sctp, Tcp, Udp};
    use serde_json::json;

    /// Audit mode (`palisade.dev/enforcement: audit`): an audited deny-all into x changes
    /// nothing; an enforced policy next to it on x/a keeps its effect (only y reaches x/a).
    pub fn audit_mode_is_not_enforced(c: &mut Cluster) -> Result<()> {
        let mut audited = np(
            "x",
            "deny-all-audit",
            json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
        );
        audited["metadata"]["annotations"] = json!({ "palisade.dev/enforcement": "audit" });
        c.set_policies(vec![audited.clone()]);
        c.apply()?;
        let open = c.expect(|_, _| true);
        c.check(80, Tcp, &open)?;
        c.check(81, Udp, &open)?;
        c.set_policies(vec![
            audited,
            np(
                "x",
                "a-from-y",
                json!({
                    "podSelector": { "matchLabels": { "pod": "a" } },
                    "ingress": [{ "from": [{ "namespaceSelector": { "matchLabels": { "ns": "y" } } }] }],
                }),
            ),
        ]);
        c.apply()?;
        let exp = c.expect(|from, to| !to.is("x/a") || from.ns == "y");
        c.check(80, Tcp, &exp)
    }

    /// Deny all ingress into namespace x: nothing reaches x pods, everything else is open.
    pub fn deny_all_ingress(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![np(
            "x",
            "deny-all",
            json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
        )]);
        c.apply()?;
        let exp = c.expect(|_, to| to.ns != "x");
        c.check(80, Tcp, &exp)?;
        c.check(81, Tcp, &exp)?;
        c.check(80, Udp, &exp)?;
        c.check(81, Sctp, &exp)
    }

    /// Deny all egress from namespace x: x pods reach nothing (no DNS in the lab to allow).
    pub fn deny_all_egress(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![np(
            "x",
            "deny-all-egress",
            json!({ "podSelector": {}, "policyTypes": ["Egress"] }),
        )]);
        c.apply()?;
        let exp = c.expect(|from, _| from.ns != "x");
        c.check(80, Tcp, &exp)?;
        c.check(81, Udp, &exp)?;
        c.check(80, Sctp, &exp)
    }

    /// Both directions in one policy.
    pub fn deny_all_ingress_and_egress(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![np(
            "x",
            "deny-all",
            json!({ "podSelector": {}, "policyTypes": ["Ingress", "Egress"] }),
        )]);
        c.apply()?;
        let exp = c.expect(|from, to| from.ns != "x" && to.ns != "x");
        c.check(80, Tcp, &exp)?;
        c.check(80, Udp, &exp)
    }

    /// x/a accepts only pods of namespaces labelled ns=y.
    pub fn allow_from_namespace(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![np(
            "x",
            "allow-from-y",
            json!({
                "podSelector": { "matchLabels": { "pod": "a" } },
                "ingress": [{ "from": [{ "namespaceSelector": { "matchLabels": { "ns": "y" } } }] }],
            }),
        )]);
        c.apply()?;
        let exp = c.expect(|from, to| !to.is("x/a") || from.ns == "y");
        c.check(80, Tcp, &exp)?;
        c.check(81, Udp, &exp)
    }

    /// One peer with namespaceSelector AND podSelector: only y/b reaches x/a.
    pub fn allow_from_pod_in_other_namespace_and(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![np(
            "x",
            "allow-from-yb",
            json!({
                "podSelector": { "matchLabels": { "pod": "a" } },
                "ingress": [{ "from": [{
                    "namespaceSelector": { "matchLabels": { "ns": "y" } },
                    "podSelector": { "matchLabels": { "pod": "b" } },
                }] }],
            }),
        )]);
        c.apply()?;
        let exp = c.expect(|from, to| !to.is("x/a") || from.is("y/b"));
        c.check(80, Tcp, &exp)
    }

    /// Two peers are OR-ed: all of y, or pod=b of x's own namespace (podSelector alone).
    pub fn allow_from_namespace_or_pod_two_peers(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![np(
            "x",
            "allow-from-y-or-b",
            json!({
                "podSelector": { "matchLabels": { "pod": "a" } },
                "ingress": [{ "from": [
                    { "namespaceSelector": { "matchLabels": { "ns": "y" } } },
                    { "podSelector": { "matchLabels": { "pod": "b" } } },
                ] }],
            }),
        )]);
        c.apply()?;
        let exp = c.expect(|from, to| !to.is("x/a") || from.ns == "y" || from.is("x/b"));
        c.check(80, Tcp, &exp)
    }

    /// matchExpressions with In, NotIn, Exists and DoesNotExist, in target and peer selectors.
    pub fn match_expressions(c: &mut Cluster) -> Result<()> {
        c.set_pod_label("x/c", "team", Some("red"));
        c.set_policies(vec![
            // Targets x/a and x/b; from namespaces other than x and y, or any pod=c anywhere.
            np(
                "x",
                "expr-in-notin",
                json!({
                    "podSelector": { "matchExpressions": [
                        { "key": "pod", "operator": "In", "values": ["a", "b"] } ] },
                    "ingress": [{ "from": [
                        { "namespaceSelector": { "matchExpressions": [
                            { "key": "ns", "operator": "NotIn", "values": ["x", "y"] } ] } },
                        { "namespaceSelector": {},
                          "podSelector": { "matchExpressions": [
                            { "key": "pod", "operator": "NotIn", "values": ["a", "b"] } ] } },
                    ] }],
                }),
            ),
            // Targets every y pod; from pods without a team label, in namespaces with an ns label.
            np(
                "y",
                "expr-exists",
                json!({
                    "podSelector": { "matchExpressions": [ { "key": "pod", "operator": "Exists" } ] },
                    "ingress": [{ "from": [{
                        "namespaceSelector": { "matchExpressions": [
                            { "key": "ns", "operator": "Exists" } ] },
                        "podSelector": { "matchExpressions": [
                            { "key": "team", "operator": "DoesNotExist" } ] },
                    }] }],
                }),
            ),
        ]);
        c.apply()?;
        let exp = c.expect(|from, to| {
            if to.is("x/a") || to.is("x/b") {
                from.ns == "z" || from.name == "c"
            } else if to.ns == "y" {
                !from.is("x/c")
            } else {
                true
            }
        });
        c.check(80, Tcp, &exp)?;
        c.check(81, Udp, &exp)
    }

    /// Named ports resolve per protocol: serve-80-tcp opens TCP 80 only, serve-81-udp UDP 81
    /// only; a named port asked for with the wrong protocol opens nothing.
    pub fn named_ports_ingress(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![np(
            "x",
            "named",
            json!({
                "podSelector": { "matchLabels": { "pod": "a" } },
                "ingress": [{ "ports": [
                    { "port": "serve-80-tcp" },
                    { "protocol": "UDP", "port": "serve-81-udp" },
                ] }],
            }),
        )]);
        c.apply()?;
        let open = c.expect(|_, _| true);
        let closed = c.expect(|_, to| !to.is("x/a"));
        c.check(80, Tcp, &open)?;
        c.check(81, Tcp, &closed)?;
        c.check(80, Udp, &closed)?;
        c.check(81, Udp, &open)?;
        c.check(80, Sctp, &closed)?;

        c.set_policies(vec![np(
            "x",
            "named",
            json!({
                "podSelector": { "matchLabels": { "pod": "a" } },
                "ingress": [{ "ports": [ { "protocol": "UDP", "port": "serve-80-tcp" } ] }],
            }),
        )]);
        c.apply()?;
        c.check(80, Udp, &closed)?;
        c.check(80, Tcp, &closed)
    }

    /// Egress named ports resolve on the destination pods.
    pub fn named_ports_egress(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![np(
            "x",
            "named-egress",
            json!({
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [{ "ports": [ { "port": "serve-81-tcp" }, { "protocol": "SCTP", "port": "serve-80-sctp" } ] }],
            }),
        )]);
        c.apply()?;
        let open = c.expect(|_, _| true);
        let closed = c.expect(|from, _| from.ns != "x");
        c.check(81, Tcp, &open)?;
        c.check(80, Tcp, &closed)?;
        c.check(81, Udp, &closed)?;
        c.check(80, Sctp, &open)?;
        c.check(81, Sctp, &closed)
    }

    /// endPort ranges, updated in place, for TCP and SCTP.
    pub fn end_port_ranges(c: &mut Cluster) -> Result<()> {
        let policy = |ports: serde_json::Value| {
            np(
                "x",
                "range",
                json!({ "podSelector": { "matchLabels": { "pod": "a" } }, "ingress": [{ "ports": ports }] }),
            )
        };
        let open = c.expect(|_, _| true);
        let closed = c.expect(|_, to| !to.is("x/a"));

        c.set_policies(vec![policy(
            json!([{ "protocol": "TCP", "port": 81, "endPort": 90 }]),
        )]);
        c.apply()?;
        c.check(80, Tcp, &closed)?;
        c.check(81, Tcp, &open)?;

        c.set_policies(vec![policy(
            json!([{ "protocol": "TCP", "port": 70, "endPort": 80 }]),
        )]);
        c.apply()?;
        c.check(80, Tcp, &open)?;
        c.check(81, Tcp, &closed)?;

        c.set_policies(vec![policy(
            json!([{ "protocol": "SCTP", "port": 80, "endPort": 81 }]),
        )]);
        c.apply()?;
        c.check(80, Sctp, &open)?;
        c.check(81, Sctp, &open)?;
        c.check(80, Tcp, &closed)
    }

    /// ipBlock with except, for pods (node2's pod CIDR excepted) and the LAN client.
    pub fn ip_block_with_except_ingress(c: &mut Cluster) -> Result<()> {
        let client = c.lab().client().expect("the cluster has a client").clone();
        let peers = |lan_except: &str| {
            np(
                "x",
                "ipblock",
                json!({
                    "podSelector": { "matchLabels": { "pod": "a" } },
                    "ingress": [{ "from": [
                        { "ipBlock": { "cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"] } },
                        { "ipBlock": { "cidr": "198.51.100.0/24", "except": [lan_except] } },
                    ] }],
                }),
            )
        };
        c.set_policies(vec![peers("198.51.100.100/32")]);
        c.apply()?;
        let exp = c.expect(|from, to| !to.is("x/a") || from.node == 1);
        c.check(80, Tcp, &exp)?;
        let blocked = c.expect_from(std::slice::from_ref(&client), |_, to| !to.is("x/a"));
        c.check_between(std::slice::from_ref(&client), &c.pods(), 80, Tcp, &blocked)?;

        c.set_policies(vec![peers("198.51.100.101/32")]);
        c.apply()?;
        c.check(80, Tcp, &exp)?;
        let open = c.expect_from(std::slice::from_ref(&client), |_, _| true);
        c.check_between(std::slice::from_ref(&client), &c.pods(), 80, Tcp, &open)
    }

    /// Egress ipBlock: x/a reaches node1's pod CIDR except z/a.
    pub fn ip_block_with_except_egress(c: &mut Cluster) -> Result<()> {
        let za = c.pod("z/a")?.ip;
        c.set_policies(vec![np(
            "x",
            "ipblock-egress",
            json!({
                "podSelector": { "matchLabels": { "pod": "a" } },
                "policyTypes": ["Egress"],
                "egress": [{ "to": [ { "ipBlock": { "cidr": "10.244.1.0/24", "except": [format!("{za}/32")] } } ] }],
            }),
        )]);
        c.apply()?;
        let exp = c.expect(|from, to| !from.is("x/a") || (to.node == 1 && !to.is("z/a")));
        c.check(80, Tcp, &exp)?;
        c.check(81, Udp, &exp)
    }

    /// Egress to pod=b in any namespace, TCP 80 only.
    pub fn egress_to_pods_on_port(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![np(
            "x",
            "egress-to-b",
            json!({
                "podSelector": { "matchLabels": { "pod": "a" } },
                "policyTypes": ["Egress"],
                "egress": [{
                    "to": [{ "namespaceSelector": {}, "podSelector": { "matchLabels": { "pod": "b" } } }],
                    "ports": [{ "protocol": "TCP", "port": 80 }],
                }],
            }),
        )]);
        c.apply()?;
        c.check(
            80,
            Tcp,
            &c.expect(|from, to| !from.is("x/a") || to.name == "b"),
        )?;
        let closed = c.expect(|from, _| !from.is("x/a"));
        c.check(81, Tcp, &closed)?;
        c.check(80, Udp, &closed)
    }

    /// Several policies select the same pods: their allowances add up.
    pub fn multiple_policies_union(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![
            np("x", "deny-all", json!({ "podSelector": {}, "policyTypes": ["Ingress"] })),
            np(
                "x",
                "a-from-y",
                json!({
                    "podSelector": { "matchLabels": { "pod": "a" } },
                    "ingress": [{ "from": [{ "namespaceSelector": { "matchLabels": { "ns": "y" } } }] }],
                }),
            ),
            np(
                "x",
                "a-from-zc",
                json!({
                    "podSelector": { "matchLabels": { "pod": "a" } },
                    "ingress": [{ "from": [{
                        "namespaceSelector": { "matchLabels": { "ns": "z" } },
                        "podSelector": { "matchLabels": { "pod": "c" } },
                    }] }],
                }),
            ),
        ]);
        c.apply()?;
        let exp = c.expect(|from, to| {
            to.ns != "x" || (to.is("x/a") && (from.ns == "y" || from.is("z/c")))
        });
        c.check(80, Tcp, &exp)?;
        c.check(80, Sctp, &exp)
    }

    /// Re-applying other manifests converges: a policy replaced, then all deleted.
    pub fn policy_update_and_delete(c: &mut Cluster) -> Result<()> {
        let from_ns = |ns: &str| {
            np(
                "x",
                "allow-a",
                json!({
                    "podSelector": { "matchLabels": { "pod": "a" } },
                    "ingress": [{ "from": [{ "namespaceSelector": { "matchLabels": { "ns": ns } } }] }],
                }),
            )
        };
        c.set_policies(vec![from_ns("y")]);
        c.apply()?;
        c.check(
            80,
            Tcp,
            &c.expect(|from, to| !to.is("x/a") || from.ns == "y"),
        )?;

        c.set_policies(vec![from_ns("z")]);
        c.apply()?;
        c.check(
            80,
            Tcp,
            &c.expect(|from, to| !to.is("x/a") || from.ns == "z"),
        )?;

        c.set_policies(vec![]);
        c.apply()?;
        c.check(80, Tcp, &c.expect(|_, _| true))?;

        c.set_policies(vec![np(
            "z",
            "deny-all",
            json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
        )]);
        c.apply()?;
        c.check(80, Tcp, &c.expect(|_, to| to.ns != "z"))
    }

    /// Relabelled peers join and leave a selector; a relabelled target leaves the policy.
    pub fn pod_relabel(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![np(
            "x",
            "a-from-b",
            json!({
                "podSelector": { "matchLabels": { "pod": "a" } },
                "ingress": [{ "from": [{ "namespaceSelector": {}, "podSelector": { "matchLabels": { "pod": "b" } } }] }],
            }),
        )]);
        c.apply()?;
        c.check(
            80,
            Tcp,
            &c.expect(|from, to| !to.is("x/a") || from.name == "b"),
        )?;

        c.set_pod_label("z/c", "pod", Some("b"));
        c.set_pod_label("y/b", "pod", Some("other"));
        c.apply()?;
        let exp = c
            .expect(|from, to| !to.is("x/a") || from.is("x/b") || from.is("z/b") || from.is("z/c"));
        c.check(80, Tcp, &exp)?;

        c.set_pod_label("x/a", "pod", Some("moved"));
        c.apply()?;
        c.check(80, Tcp, &c.expect(|_, _| true))
    }

    /// A namespace label appears, then moves to another namespace.
    pub fn namespace_relabel(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![np(
            "x",
            "a-from-blue",
            json!({
                "podSelector": { "matchLabels": { "pod": "a" } },
                "ingress": [{ "from": [{ "namespaceSelector": { "matchLabels": { "team": "blue" } } }] }],
            }),
        )]);
        c.apply()?;
        c.check(80, Tcp, &c.expect(|_, to| !to.is("x/a")))?;

        c.set_namespace_label("z", "team", Some("blue"));
        c.apply()?;
        c.check(
            80,
            Tcp,
            &c.expect(|from, to| !to.is("x/a") || from.ns == "z"),
        )?;

        c.set_namespace_label("z", "team", None);
        c.set_namespace_label("y", "team", Some("blue"));
        c.apply()?;
        c.check(
            80,
            Tcp,
            &c.expect(|from, to| !to.is("x/a") || from.ns == "y"),
        )
    }

    /// A flow needs the source's egress and the destination's ingress, same node or not:
    /// x/a may only send to z; z and y/b only accept x/a. So x/a→z/* passes, x/a→y/b does
    /// not (egress), and nobody else reaches z or y/b (ingress).
    pub fn egress_and_ingress_both_apply(c: &mut Cluster) -> Result<()> {
        let only_from_xa = json!([{ "from": [{
            "namespaceSelector": { "matchLabels": { "ns": "x" } },
            "podSelector": { "matchLabels": { "pod": "a" } },
        }] }]);
        c.set_policies(vec![
            np(
                "x",
                "a-egress-to-z",
                json!({
                    "podSelector": { "matchLabels": { "pod": "a" } },
                    "policyTypes": ["Egress"],
                    "egress": [{ "to": [{ "namespaceSelector": { "matchLabels": { "ns": "z" } } }] }],
                }),
            ),
            np("z", "from-xa", json!({ "podSelector": {}, "ingress": only_from_xa })),
            np("y", "b-from-xa", json!({ "podSelector": { "matchLabels": { "pod": "b" } }, "ingress": only_from_xa })),
        ]);
        c.apply()?;
        let exp = c.expect(|from, to| {
            let egress = !from.is("x/a") || to.ns == "z";
            let ingress = if to.ns == "z" || to.is("y/b") {
                from.is("x/a")
            } else {
                true
            };
            egress && ingress
        });
        c.check(80, Tcp, &exp)?;
        c.check(81, Udp, &exp)?;
        c.check(80, Sctp, &exp)
    }

    /// A rule for one protocol opens only that protocol (SCTP, then UDP).
    pub fn sctp_and_udp_variants(c: &mut Cluster) -> Result<()> {
        let policy = |protocol: &str| {
            np(
                "x",
                "from-y",
                json!({
                    "podSelector": {},
                    "ingress": [{
                        "from": [{ "namespaceSelector": { "matchLabels": { "ns": "y" } } }],
                        "ports": [{ "protocol": protocol, "port": 80 }],
                    }],
                }),
            )
        };
        let open_from_y = c.expect(|from, to| to.ns != "x" || from.ns == "y");
        let closed = c.expect(|_, to| to.ns != "x");

        c.set_policies(vec![policy("SCTP")]);
        c.apply()?;
        c.check(80, Sctp, &open_from_y)?;
        c.check(81, Sctp, &closed)?;
        c.check(80, Tcp, &closed)?;
        c.check(80, Udp, &closed)?;

        c.set_policies(vec![policy("UDP")]);
        c.apply()?;
        c.check(80, Udp, &open_from_y)?;
        c.check(81, Udp, &closed)?;
        c.check(80, Sctp, &closed)?;
        c.check(80, Tcp, &closed)
    }

    /// An empty ingress/egress rule allows everything, whatever else selects the pods.
    pub fn allow_all_overrides_deny_all(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![
            np(
                "x",
                "deny-all",
                json!({ "podSelector": {}, "policyTypes": ["Ingress", "Egress"] }),
            ),
            np(
                "x",
                "allow-all-in",
                json!({ "podSelector": {}, "ingress": [{}] }),
            ),
            np(
                "x",
                "allow-all-out",
                json!({ "podSelector": {}, "policyTypes": ["Egress"], "egress": [{}] }),
            ),
        ]);
        c.apply()?;
        let open = c.expect(|_, _| true);
        c.check(80, Tcp, &open)?;
        c.check(81, Sctp, &open)
    }

    /// A policy whose podSelector matches nothing isolates nothing.
    pub fn policy_selecting_no_pods_changes_nothing(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![np(
            "x",
            "nobody",
            json!({
                "podSelector": { "matchLabels": { "pod": "nonexistent" } },
                "policyTypes": ["Ingress", "Egress"],
            }),
        )]);
        c.apply()?;
        c.check(80, Tcp, &c.expect(|_, _| true))
    }

    /// A podSelector only selects pods of the policy's namespace: y/a, not x/a or z/a.
    pub fn policy_only_selects_its_namespace(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![np(
            "y",
            "deny-a",
            json!({ "podSelector": { "matchLabels": { "pod": "a" } }, "policyTypes": ["Ingress"] }),
        )]);
        c.apply()?;
        c.check(80, Tcp, &c.expect(|_, to| !to.is("y/a")))
    }

    /// A port entry with only a protocol opens every port of that protocol.
    pub fn protocol_without_port(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![np(
            "x",
            "udp-only",
            json!({ "podSelector": { "matchLabels": { "pod": "a" } }, "ingress": [{ "ports": [{ "protocol": "UDP" }] }] }),
        )]);
        c.apply()?;
        let open = c.expect(|_, _| true);
        c.check(80, Udp, &open)?;
        c.check(81, Udp, &open)?;
        c.check(80, Tcp, &c.expect(|_, to| !to.is("x/a")))
    }

    /// An empty namespaceSelector with a podSelector picks that label in every namespace.
    pub fn pod_selector_in_all_namespaces(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![np(
            "x",
            "from-any-a",
            json!({
                "podSelector": {},
                "ingress": [{ "from": [{ "namespaceSelector": {}, "podSelector": { "matchLabels": { "pod": "a" } } }] }],
            }),
        )]);
        c.apply()?;
        c.check(
            80,
            Tcp,
            &c.expect(|from, to| to.ns != "x" || from.name == "a"),
        )
    }

    /// With every pod isolated for ingress, a node still reaches its own pods (kubelet
    /// probes); another node and the client do not.
    pub fn node_to_local_pod_always_allowed(c: &mut Cluster) -> Result<()> {
        let deny = |ns: &str| {
            np(
                ns,
                "deny-all",
                json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
            )
        };
        c.set_policies(vec![deny("x"), deny("y"), deny("z")]);
        c.apply()?;
        c.check(80, Tcp, &c.expect(|_, _| false))?;
        let nodes: Vec<_> = c.lab().nodes().iter().map(|n| n.endpoint()).collect();
        let exp = c.expect_from(&nodes, |node, to| node.name == format!("node{}", to.node));
        c.check_between(&nodes, &c.pods(), 80, Tcp, &exp)?;
        c.check_between(&nodes, &c.pods(), 81, Udp, &exp)?;
        let client = vec![c.lab().client().expect("the cluster has a client").clone()];
        c.check_between(
            &client,
            &c.pods(),
            80,
            Tcp,
            &c.expect_from(&client, |_, _| false),
        )
    }

    /// Palisade design (not Kubernetes): a pod inside the node's pod CIDR that the agent does
    /// not know gets no traffic until it is programmed ("first instant" rule).
    pub fn design_unknown_pod_in_pod_cidr_gets_no_traffic(c: &mut Cluster) -> Result<()> {
        let pods = c.pods();
        let late = c.lab_mut().add_pod(1, "x", "late", None)?.endpoint();
        c.set_hidden("x/late", true);
        c.apply()?;
        let names: Vec<String> = pods.iter().map(|p| p.name.clone()).collect();
        let blocked = Matrix::new(names.clone(), vec![late.name.clone()], false);
        c.check_between(&pods, std::slice::from_ref(&late), 80, Tcp, &blocked)?;

        c.set_hidden("x/late", false);
        c.apply()?;
        let open = Matrix::new(names, vec![late.name.clone()], true);
        c.check_between(&pods, std::slice::from_ref(&late), 80, Tcp, &open)
    }

    /// ipBlock peers are OR-ed even when one's except overlaps another's cidr (upstream: "an
    /// IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed").
    pub fn ip_block_overlapping_peers_union(c: &mut Cluster) -> Result<()> {
        let ya = c.pod("y/a")?.ip;
        let xb = c.pod("x/b")?.ip;
        let policy = |peers: serde_json::Value| {
            np(
                "x",
                "blocks",
                json!({
                    "podSelector": { "matchLabels": { "pod": "a" } },
                    "ingress": [{ "from": peers }],
                }),
            )
        };
        c.set_policies(vec![policy(json!([
            { "ipBlock": { "cidr": "10.244.0.0/16", "except": [format!("{ya}/32")] } },
            { "ipBlock": { "cidr": format!("{ya}/32") } },
        ]))]);
        c.apply()?;
        c.check(80, Tcp, &c.expect(|_, _| true))?;

        c.set_policies(vec![policy(json!([
            { "ipBlock": { "cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"] } },
            { "ipBlock": { "cidr": "10.244.2.0/24", "except": [format!("{xb}/32")] } },
        ]))]);
        c.apply()?;
        c.check(
            80,
            Tcp,
            &c.expect(|from, to| !to.is("x/a") || !from.is("x/b")),
        )
    }

    /// A named port means whatever each pod declares: `web` is TCP 80 on x/b and TCP 81 on
    /// y/b, and absent elsewhere — for egress (resolved on destinations) and ingress.
    pub fn named_port_resolves_per_pod(c: &mut Cluster) -> Result<()> {
        let web = |port| {
            vec![NamedPort {
                name: "web".into(),
                port,
                protocol: Tcp,
            }]
        };
        c.set_extra_ports("x/b", web(80));
        c.set_extra_ports("y/b", web(81));
        c.set_policies(vec![
            np(
                "x",
                "a-egress-web",
                json!({
                    "podSelector": { "matchLabels": { "pod": "a" } },
                    "policyTypes": ["Egress"],
                    "egress": [{ "ports": [{ "port": "web" }] }],
                }),
            ),
            np(
                "y",
                "ingress-web",
                json!({ "podSelector": {}, "ingress": [{ "ports": [{ "port": "web" }] }] }),
            ),
        ]);
        c.apply()?;
        c.check(
            80,
            Tcp,
            &c.expect(|from, to| (!from.is("x/a") || to.is("x/b")) && to.ns != "y"),
        )?;
        c.check(
            81,
            Tcp,
            &c.expect(|from, to| {
                (!from.is("x/a") || to.is("y/b")) && (to.ns != "y" || to.is("y/b"))
            }),
        )
    }

    /// Without policyTypes, every policy affects ingress and those with egress rules also
    /// egress: x/a (egress rules only) gets no ingress at all; y/b (ingress rules only) keeps
    /// its egress.
    pub fn policy_types_default_from_rules(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![
            np(
                "x",
                "a-egress-only-rules",
                json!({
                    "podSelector": { "matchLabels": { "pod": "a" } },
                    "egress": [{ "to": [{ "namespaceSelector": { "matchLabels": { "ns": "z" } } }] }],
                }),
            ),
            np(
                "y",
                "b-from-y",
                json!({
                    "podSelector": { "matchLabels": { "pod": "b" } },
                    "ingress": [{ "from": [{ "podSelector": {} }] }],
                }),
            ),
        ]);
        c.apply()?;
        let exp = c.expect(|from, to| {
            let xa_out = !from.is("x/a") || to.ns == "z";
            let xa_in = !to.is("x/a");
            let yb_in = !to.is("y/b") || from.ns == "y";
            xa_out && xa_in && yb_in
        });
        c.check(80, Tcp, &exp)?;
        c.check(81, Udp, &exp)
    }

    /// A Succeeded pod keeps its old status.podIP, which a running pod (z/c) now has; the
    /// terminated pod's labels must not open the door for z/c.
    pub fn terminated_pod_ip_is_not_selected(c: &mut Cluster) -> Result<()> {
        let zc = c.pod("z/c")?.clone();
        let node = c.lab().node(zc.node)?.clone();
        let labels = k8s::labels([("pod", "b")]);
        let mut old = k8s::pod(&k8s::PodSpec {
            namespace: "y",
            name: "old-b",
            labels: &labels,
            node_name: &node.name,
            host_ip: node.ip,
            pod_ip: zc.ip,
            ports: &[],
        });
        old["status"]["phase"] = json!("Succeeded");
        c.set_extra_objects(vec![old]);
        c.set_policies(vec![np(
            "x",
            "a-from-b",
            json!({
                "podSelector": { "matchLabels": { "pod": "a" } },
                "ingress": [{ "from": [{ "namespaceSelector": {}, "podSelector": { "matchLabels": { "pod": "b" } } }] }],
            }),
        )]);
        c.apply()?;
        c.check(
            80,
            Tcp,
            &c.expect(|from, to| !to.is("x/a") || from.name == "b"),
        )
    }

    /// Egress to an address outside the cluster (the LAN client) through an ipBlock.
    pub fn egress_to_external_ip_block(c: &mut Cluster) -> Result<()> {
        let client = c.lab().client().expect("the cluster has a client").clone();
        c.lab_mut().serve(&client)?;
        c.set_policies(vec![np(
            "x",
            "a-to-client",
            json!({
                "podSelector": { "matchLabels": { "pod": "a" } },
                "policyTypes": ["Egress"],
                "egress": [{ "to": [{ "ipBlock": { "cidr": "198.51.100.100/32" } }], "ports": [{ "port": 80 }] }],
            }),
        )]);
        c.apply()?;
        c.check(80, Tcp, &c.expect(|from, _| !from.is("x/a")))?;
        let pods = c.pods();
        let xa = vec![pods[0].clone()];
        let to = std::slice::from_ref(&client);
        c.check_between(
            &xa,
            to,
            80,
            Tcp,
            &Matrix::new(vec!["x/a".into()], vec!["client".into()], true),
        )?;
        c.check_between(
            &xa,
            to,
            81,
            Tcp,
            &Matrix::new(vec!["x/a".into()], vec!["client".into()], false),
        )?;
        // Everyone else still reaches the client.
        let others = &pods[1..];
        let rows: Vec<String> = others.iter().map(|p| p.name.clone()).collect();
        c.check_between(
            others,
            to,
            81,
            Tcp,
            &Matrix::new(rows, vec!["client".into()], true),
        )
    }
}
