//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`) with real packets: the same
//! x/y/z × a/b/c two-node lab as `netpol_matrix` (see `palisade_e2e::netpol`), policies applied
//! with `palisade netpol apply` in each node's namespace, every pod probing every pod.
//!
//! Expectations are written from the API's documented semantics (network-policy-api
//! `apis/v1alpha2`, `site-src`), never derived from the compiler:
//! - per direction: Admin tier (priority ascending, rules in order, first match decides;
//!   Accept/Deny final, Pass skips to the next tier) → NetworkPolicy tier (pods isolated by
//!   NetworkPolicies get their verdict, others fall through) → Baseline tier → allow;
//! - an egress Accept still needs the destination's ingress to allow;
//! - a peer with no known field fails closed (Accept: matches nothing; Deny/Pass: deny all).
//!
//! Pod placement: node1 runs x/a x/c y/b z/a z/c; node2 runs x/b y/a y/c z/b. Labels: pods
//! `pod=<name>`, namespaces `ns=<name>`; named ports `serve-<port>-<proto>`.
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
    admin_deny_between_namespaces,
    admin_accept_overrides_networkpolicy_deny,
    admin_pass_to_networkpolicy_then_baseline,
    baseline_overridden_by_networkpolicy,
    egress_accept_still_needs_destination_ingress,
    priority_change_and_delete,
    relabel_subject_and_peer,
    rule_order_and_protocols,
    named_ports_and_ranges,
    networks_peer_matches_pods_and_outside,
    nodes_peer,
    unknown_peer_fails_closed,
);

mod scenario {
    use anyhow::Result;
    use palisade_e2e::k8s::network_policy as np;
    use palisade_e2e::netpol::Cluster;
    use palisade_e2e::Matrix;
    use palisade_e2e::Protocol::{Sctp, Tcp, Udp};
    use serde_json::{json, Value};

    /// A ClusterNetworkPolicy object.
    fn cnp(name: &str, tier: &str, priority: i32, rest: Value) -> Value {
        let mut spec = json!({ "tier": tier, "priority": priority });
        if let (Some(m), Value::Object(r)) = (spec.as_object_mut(), rest) {
            m.extend(r);
        }
        json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy",
            "metadata": { "name": name },
            "spec": spec,
        })
    }

    fn ns(name: &str) -> Value {
        json!({ "namespaces": { "matchLabels": { "ns": name } } })
    }

    fn all_ns() -> Value {
        json!({ "namespaces": {} })
    }

    /// Admin Deny into x from y, every protocol.
    pub fn admin_deny_between_namespaces(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![cnp(
            "deny-y-to-x",
            "Admin",
            10,
            json!({ "subject": ns("x"), "ingress": [{ "action": "Deny", "from": [ns("y")] }] }),
        )]);
        c.apply()?;
        let exp = c.expect(|from, to| !(to.ns == "x" && from.ns == "y"));
        c.check(80, Tcp, &exp)?;
        c.check(81, Udp, &exp)?;
        c.check(80, Sctp, &exp)
    }

    /// A NetworkPolicy denies all ingress into x; an Admin Accept from z overrides it.
    pub fn admin_accept_overrides_networkpolicy_deny(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![
            np(
                "x",
                "deny-all",
                json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
            ),
            cnp(
                "z-may-reach-x",
                "Admin",
                10,
                json!({ "subject": ns("x"), "ingress": [{ "action": "Accept", "from": [ns("z")] }] }),
            ),
        ]);
        c.apply()?;
        let exp = c.expect(|from, to| to.ns != "x" || from.ns == "z");
        c.check(80, Tcp, &exp)?;
        c.check(81, Udp, &exp)
    }

    /// Admin: Pass y→x (priority 1), Deny all→x (priority 2). NetworkPolicy: x/a accepts
    /// pod=b from anywhere. Baseline: Deny y→x.
    ///
    /// Into x from y: passed; x/a is isolated → its NetworkPolicy decides (only y/b); x/b and
    /// x/c are not isolated → Baseline denies. From x or z into x: the Admin Deny.
    pub fn admin_pass_to_networkpolicy_then_baseline(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![
            cnp(
                "pass-y",
                "Admin",
                1,
                json!({ "subject": ns("x"), "ingress": [{ "action": "Pass", "from": [ns("y")] }] }),
            ),
            cnp(
                "deny-all-x",
                "Admin",
                2,
                json!({ "subject": ns("x"), "ingress": [{ "action": "Deny", "from": [all_ns()] }] }),
            ),
            np(
                "x",
                "a-from-b",
                json!({
                    "podSelector": { "matchLabels": { "pod": "a" } },
                    "ingress": [{ "from": [{ "namespaceSelector": {}, "podSelector": { "matchLabels": { "pod": "b" } } }] }],
                }),
            ),
            cnp(
                "baseline-deny-y",
                "Baseline",
                1,
                json!({ "subject": ns("x"), "ingress": [{ "action": "Deny", "from": [ns("y")] }] }),
            ),
        ]);
        c.apply()?;
        let exp = c.expect(|from, to| {
            if to.ns != "x" {
                return true;
            }
            if from.ns == "y" {
                return to.name == "a" && from.name == "b";
            }
            false
        });
        c.check(80, Tcp, &exp)?;
        c.check(80, Udp, &exp)
    }

    /// Baseline denies all ingress everywhere; a NetworkPolicy in y allows from x. y pods are
    /// isolated by it, so the Baseline never applies to them.
    pub fn baseline_overridden_by_networkpolicy(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![
            cnp(
                "default-deny",
                "Baseline",
                100,
                json!({ "subject": { "namespaces": {} }, "ingress": [{ "action": "Deny", "from": [all_ns()] }] }),
            ),
            np(
                "y",
                "from-x",
                json!({ "podSelector": {}, "ingress": [{ "from": [{ "namespaceSelector": { "matchLabels": { "ns": "x" } } }] }] }),
            ),
        ]);
        c.apply()?;
        let exp = c.expect(|from, to| to.ns == "y" && from.ns == "x");
        c.check(80, Tcp, &exp)?;
        c.check(81, Sctp, &exp)
    }

    /// Admin egress Accept from x to every namespace overrides x's NetworkPolicy egress
    /// deny-all, but z's ingress deny-all still applies.
    pub fn egress_accept_still_needs_destination_ingress(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![
            cnp(
                "x-out",
                "Admin",
                5,
                json!({ "subject": ns("x"), "egress": [{ "action": "Accept", "to": [all_ns()] }] }),
            ),
            np(
                "x",
                "no-egress",
                json!({ "podSelector": {}, "policyTypes": ["Egress"] }),
            ),
            np(
                "z",
                "no-ingress",
                json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
            ),
        ]);
        c.apply()?;
        let exp = c.expect(|_, to| to.ns != "z");
        c.check(80, Tcp, &exp)?;
        c.check(80, Udp, &exp)
    }

    /// Accept y→x at priority 10 and Deny all→x at 20; then the Accept moves to 30 (the
    /// Deny now wins); then the Deny is deleted.
    pub fn priority_change_and_delete(c: &mut Cluster) -> Result<()> {
        let accept = |p| {
            cnp(
                "accept-y",
                "Admin",
                p,
                json!({ "subject": ns("x"), "ingress": [{ "action": "Accept", "from": [ns("y")] }] }),
            )
        };
        let deny = cnp(
            "deny-all",
            "Admin",
            20,
            json!({ "subject": ns("x"), "ingress": [{ "action": "Deny", "from": [all_ns()] }] }),
        );
        c.set_policies(vec![accept(10), deny.clone()]);
        c.apply()?;
        c.check(
            80,
            Tcp,
            &c.expect(|from, to| to.ns != "x" || from.ns == "y"),
        )?;
        c.set_policies(vec![accept(30), deny]);
        c.apply()?;
        c.check(80, Tcp, &c.expect(|_, to| to.ns != "x"))?;
        c.set_policies(vec![accept(30)]);
        c.apply()?;
        c.check(80, Tcp, &c.expect(|_, _| true))
    }

    /// Subject pods labelled team=red, peers from namespaces labelled tenant=bad: nothing is
    /// denied until the labels appear, and traffic flows again once the pod label goes.
    pub fn relabel_subject_and_peer(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![cnp(
            "red-guard",
            "Admin",
            1,
            json!({
                "subject": { "pods": { "namespaceSelector": {}, "podSelector": { "matchLabels": { "team": "red" } } } },
                "ingress": [{ "action": "Deny", "from": [{ "namespaces": { "matchLabels": { "tenant": "bad" } } }] }],
            }),
        )]);
        c.apply()?;
        c.check(80, Tcp, &c.expect(|_, _| true))?;
        c.set_pod_label("x/a", "team", Some("red"));
        c.set_namespace_label("z", "tenant", Some("bad"));
        c.apply()?;
        c.check(
            80,
            Tcp,
            &c.expect(|from, to| !(to.is("x/a") && from.ns == "z")),
        )?;
        c.set_pod_label("x/a", "team", None);
        c.set_pod_label("y/c", "team", Some("red"));
        c.apply()?;
        c.check(
            80,
            Tcp,
            &c.expect(|from, to| !(to.is("y/c") && from.ns == "z")),
        )
    }

    /// Rules of one policy apply in order: Accept y→x on TCP 80, then Deny y→x (all).
    pub fn rule_order_and_protocols(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![cnp(
            "ordered",
            "Admin",
            1,
            json!({ "subject": ns("x"), "ingress": [
                { "action": "Accept", "from": [ns("y")], "protocols": [{ "tcp": { "destinationPort": { "number": 80 } } }] },
                { "action": "Deny", "from": [ns("y")] },
            ] }),
        )]);
        c.apply()?;
        let open = c.expect(|_, _| true);
        let denied = c.expect(|from, to| !(to.ns == "x" && from.ns == "y"));
        c.check(80, Tcp, &open)?;
        c.check(81, Tcp, &denied)?;
        c.check(80, Udp, &denied)?;
        c.check(80, Sctp, &denied)
    }

    /// Baseline Deny into y for the named port serve-81-udp and the TCP range 81-90.
    pub fn named_ports_and_ranges(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![cnp(
            "ports",
            "Baseline",
            1,
            json!({ "subject": ns("y"), "ingress": [{ "action": "Deny", "from": [all_ns()], "protocols": [
                { "destinationNamedPort": "serve-81-udp" },
                { "tcp": { "destinationPort": { "range": { "start": 81, "end": 90 } } } },
                { "sctp": { "destinationPort": { "number": 80 } } },
            ] }] }),
        )]);
        c.apply()?;
        let open = c.expect(|_, _| true);
        let denied = c.expect(|_, to| to.ns != "y");
        c.check(80, Tcp, &open)?;
        c.check(81, Tcp, &denied)?;
        c.check(81, Udp, &denied)?;
        c.check(80, Udp, &open)?;
        c.check(80, Sctp, &denied)?;
        c.check(81, Sctp, &open)
    }

    /// Egress from x: Accept to the client's /32, Deny node2's pod CIDR (pods match networks
    /// peers too), then Deny 0.0.0.0/0 on TCP 81 only.
    pub fn networks_peer_matches_pods_and_outside(c: &mut Cluster) -> Result<()> {
        let client = c.lab().client().expect("the cluster has a client").clone();
        c.lab_mut().serve(&client)?;
        let node2_cidr = c.lab().nodes()[1].pod_cidr_text();
        c.set_policies(vec![cnp(
            "x-networks",
            "Admin",
            1,
            json!({ "subject": ns("x"), "egress": [
                { "action": "Accept", "to": [{ "networks": [format!("{}/32", client.ip)] }] },
                { "action": "Deny", "to": [{ "networks": [node2_cidr] }] },
                { "action": "Deny", "to": [{ "networks": ["0.0.0.0/0"] }], "protocols": [{ "tcp": { "destinationPort": { "number": 81 } } }] },
            ] }),
        )]);
        c.apply()?;
        c.check(
            80,
            Tcp,
            &c.expect(|from, to| from.ns != "x" || to.node != 2),
        )?;
        c.check(81, Tcp, &c.expect(|from, _| from.ns != "x"))?;
        let xs: Vec<_> = c
            .pods()
            .into_iter()
            .filter(|p| p.name.starts_with("x/"))
            .collect();
        let rows: Vec<String> = xs.iter().map(|p| p.name.clone()).collect();
        let to = std::slice::from_ref(&client);
        for port in [80, 81] {
            c.check_between(
                &xs,
                to,
                port,
                Tcp,
                &Matrix::new(rows.clone(), vec!["client".into()], true),
            )?;
        }
        Ok(())
    }

    /// Egress from x to node2 (by its hostname label) is denied; node1 stays reachable.
    pub fn nodes_peer(c: &mut Cluster) -> Result<()> {
        let nodes: Vec<_> = c.lab().nodes().iter().map(|n| n.endpoint()).collect();
        for n in &nodes {
            c.lab_mut().serve(n)?;
        }
        c.set_policies(vec![cnp(
            "x-not-node2",
            "Admin",
            1,
            json!({ "subject": ns("x"), "egress": [
                { "action": "Deny", "to": [{ "nodes": { "matchLabels": { "kubernetes.io/hostname": "node2" } } }] },
            ] }),
        )]);
        c.apply()?;
        c.check(80, Tcp, &c.expect(|_, _| true))?;
        let pods = c.pods();
        let rows: Vec<String> = pods.iter().map(|p| p.name.clone()).collect();
        let cols: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let exp = Matrix::from_fn(rows, cols, |from, to| {
            !(from.starts_with("x/") && to == "node2")
        });
        c.check_between(&pods, &nodes, 80, Tcp, &exp)
    }

    /// An Accept whose peer has no known field matches nothing (the NetworkPolicy deny-all
    /// of x applies); a Pass with such a peer becomes "deny all" for its subject (y).
    pub fn unknown_peer_fails_closed(c: &mut Cluster) -> Result<()> {
        c.set_policies(vec![
            np(
                "x",
                "deny-all",
                json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
            ),
            cnp(
                "future-accept",
                "Admin",
                1,
                json!({ "subject": ns("x"), "ingress": [{ "action": "Accept", "from": [{ "serviceAccounts": { "name": "any" } }] }] }),
            ),
            cnp(
                "future-pass",
                "Admin",
                2,
                json!({ "subject": ns("y"), "ingress": [{ "action": "Pass", "from": [{ "serviceAccounts": { "name": "any" } }] }] }),
            ),
        ]);
        c.apply()?;
        let exp = c.expect(|_, to| to.ns == "z");
        c.check(80, Tcp, &exp)?;
        c.check(80, Udp, &exp)
    }
}
