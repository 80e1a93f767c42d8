//! Revocation of denied connections: which existing flows the rules just applied deny, and
//! the rule that keeps a revoked TCP flow from being picked up again mid-stream.
//!
//! ```text
//!  conntrack entries (dataplane reads them)            the payload just applied
//!        │ orig src, reply src = post-DNAT dst, …            │ Tracer::new
//!        ▼                                                    ▼
//!  judge(): touches a local pod? ── no ──► NotLocal (never deleted)
//!        │ yes: trace a NEW SYN of the original direction through FORWARD
//!        │      (INPUT when the destination is a node address)
//!        ▼
//!  Allowed (untouched) | Denied (the dataplane deletes the entry)
//! ```
//!
//! Deleting an entry is not enough on its own: a segment of the flow that arrives afterwards
//! (the client's next data, the server's retransmission) is a TCP packet in state NEW without
//! SYN, which conntrack picks up as a new connection (`nf_conntrack_tcp_loose`, on by
//! default) — in the *reverse* direction when the server sends, which the policy may allow,
//! and the flow would resume as its "reply". `PALISADE-MIDSTREAM` drops such packets to and
//! from every *guarded* local pod, without touching the node's sysctls. SCTP needs no such
//! rule (a packet without an INIT is INVALID and dropped), and UDP's next packet in the
//! denied direction is judged as a new flow by the rules — but UDP can come back in reverse
//! as an answer already on its way when the entry went: [`resurrected`] finds those entries,
//! which the dataplane deletes in the second after the revocation.
//!
//! A local pod is guarded when, in ingress or egress, some rule evaluated for it can drop:
//! - an enforced (not audit-mode) NetworkPolicy selects it in that direction, or
//! - an Admin-tier ClusterNetworkPolicy with a `Deny` rule in that direction selects it, or
//! - no NetworkPolicy (enforced or audit) selects it in that direction and a Baseline-tier
//!   ClusterNetworkPolicy with a `Deny` rule in that direction does (the Baseline tier is
//!   evaluated only then).
//!
//! Pods that only audit-mode policies, or only `Accept`/`Pass` cluster rules, select are not
//! guarded: nothing can deny them, so nothing is ever revoked and the kernel's default stays.
//!
//! This module is pure: the conntrack table is read and written by `palisade-dataplane`.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use crate::compile::host_net;
use crate::ir::{Match, Protocol, Rule, Target};
use crate::trace::{CtState, Packet, Tracer, Verdict};
use crate::{names, NetpolError, PodInterface};

/// The jump into `PALISADE-MIDSTREAM` (FORWARD after the INVALID drop, INPUT after the
/// RELATED,ESTABLISHED return): TCP, state NEW, not a SYN.
pub(crate) fn midstream_jump() -> Rule {
    Rule::new(
        vec![
            Match::Proto(Protocol::Tcp),
            Match::TcpNotSyn,
            Match::CtState("NEW"),
        ],
        Target::Jump(names::MIDSTREAM_CHAIN.into()),
    )
}

/// `PALISADE-MIDSTREAM`: two rules per isolated local pod (its address as source, as
/// destination → DROP). Only packets picked up mid-stream ever traverse it.
pub(crate) fn midstream_rules(isolated: impl IntoIterator<Item = (IpAddr, String)>) -> Vec<Rule> {
    let mut rules = Vec::new();
    for (ip, key) in isolated {
        for m in [Match::Src(host_net(ip)), Match::Dst(host_net(ip))] {
            rules.push(Rule::new(
                vec![m, Match::Comment(key.clone())],
                Target::Drop,
            ));
        }
    }
    rules
}

/// One conntrack entry: the original and the reply tuple as the kernel keeps them. With
/// DNAT (a Service), the reply source is the real destination; the filter table sees the
/// original source and that destination.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtEntry {
    pub proto: Protocol,
    pub orig_src: IpAddr,
    pub orig_dst: IpAddr,
    pub orig_sport: u16,
    pub orig_dport: u16,
    pub reply_src: IpAddr,
    pub reply_dst: IpAddr,
    pub reply_sport: u16,
    pub reply_dport: u16,
}

impl CtEntry {
    /// An entry without NAT (reply = original reversed).
    pub fn plain(proto: Protocol, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> CtEntry {
        CtEntry {
            proto,
            orig_src: src,
            orig_dst: dst,
            orig_sport: sport,
            orig_dport: dport,
            reply_src: dst,
            reply_dst: src,
            reply_sport: dport,
            reply_dport: sport,
        }
    }

    /// (source, destination, destination port) of the original direction as the filter
    /// table sees it: after DNAT (PREROUTING), before SNAT (POSTROUTING).
    pub fn filter_view(&self) -> (IpAddr, IpAddr, u16) {
        (self.orig_src, self.reply_src, self.reply_sport)
    }
}

/// What the node knows when judging entries.
#[derive(Clone, Debug, Default)]
pub struct RevokeContext {
    /// IPs of this node's active pods (only flows touching one are ever revoked).
    pub local_pods: BTreeSet<IpAddr>,
    /// The node's own addresses (`addrtype LOCAL`): a flow to one is traced through INPUT, a
    /// flow from one never passes our chains in its original direction.
    pub local_addrs: BTreeSet<IpAddr>,
    /// Where local pods' packets enter (as for anti-spoofing), so the trace is the kernel's.
    pub interfaces: BTreeMap<IpAddr, PodInterface>,
}

impl RevokeContext {
    fn is_local_addr(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.local_addrs.contains(&ip)
    }
}

/// The decision for one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// Neither end (as the filter table sees it) is a local pod, or the flow starts on the
    /// node itself: not ours to revoke.
    NotLocal,
    /// A new connection like this one would pass the rules: untouched.
    Allowed,
    /// The rules drop a new connection like this one: delete the entry.
    Denied,
}

/// What a judgement depends on: the protocol and the entry's [`CtEntry::filter_view`]
/// (source ports and the rest of the reply tuple play no part), so the many connections of
/// one client to one port share one.
type View = (Protocol, IpAddr, IpAddr, u16);

fn view(e: &CtEntry) -> View {
    let (src, dst, dport) = e.filter_view();
    (e.proto, src, dst, dport)
}

/// Judges one entry against the rules of `tracer` (the payload just applied).
pub fn judge(tracer: &Tracer, ctx: &RevokeContext, e: &CtEntry) -> Result<Judgement, NetpolError> {
    judge_view(tracer, ctx, view(e))
}

fn judge_view(
    tracer: &Tracer,
    ctx: &RevokeContext,
    (proto, src, dst, dport): View,
) -> Result<Judgement, NetpolError> {
    if !ctx.local_pods.contains(&src) && !ctx.local_pods.contains(&dst) {
        return Ok(Judgement::NotLocal);
    }
    if ctx.is_local_addr(src) {
        return Ok(Judgement::NotLocal);
    }
    let mut pkt = Packet {
        src,
        dst,
        proto,
        dport,
        state: CtState::New,
        src_local: false,
        icmp6_type: None,
        in_iface: None,
        physdev_in: None,
        physdev_out: None,
        related_to: None,
        mid_stream: false,
    };
    match ctx.interfaces.get(&src) {
        Some(PodInterface::Routed(n)) => pkt.in_iface = Some(n.clone()),
        Some(PodInterface::BridgePort(n)) => pkt.physdev_in = Some(n.clone()),
        None => {}
    }
    let builtin = if ctx.is_local_addr(dst) {
        "INPUT"
    } else {
        "FORWARD"
    };
    Ok(match tracer.trace(builtin, &pkt)?.verdict {
        Verdict::Accept => Judgement::Allowed,
        Verdict::Drop => Judgement::Denied,
    })
}

/// The entries of `entries` the rules deny (in input order). Each distinct view is traced
/// once (a table of 100,000 entries is mostly a few clients' connections to a few ports).
pub fn denied<'e>(
    tracer: &Tracer,
    ctx: &RevokeContext,
    entries: &'e [CtEntry],
) -> Result<Vec<&'e CtEntry>, NetpolError> {
    let mut judged: HashMap<View, Judgement> = HashMap::new();
    let mut out = Vec::new();
    for e in entries {
        let j = match judged.entry(view(e)) {
            Entry::Occupied(o) => *o.get(),
            Entry::Vacant(v) => {
                let j = judge_view(tracer, ctx, *v.key())?;
                *v.insert(j)
            }
        };
        if j == Judgement::Denied {
            out.push(e);
        }
    }
    Ok(out)
}

/// Entries that a revoked flow came back as. Deleting an entry is not the end of a flow: a
/// datagram the far side already received may still be answered, and the answer, seen by
/// conntrack as a new flow in the reverse direction (which the policy may allow), creates an
/// entry whose original tuple is the revoked entry's reply tuple; the denied side's next
/// packets then pass as its replies. TCP cannot come back that way (`PALISADE-MIDSTREAM` drops
/// a NEW segment without SYN); UDP can. An entry of `entries` is returned when its original
/// tuple equals the reply tuple of one of `revoked` (same protocol).
pub fn resurrected<'e>(revoked: &[CtEntry], entries: &'e [CtEntry]) -> Vec<&'e CtEntry> {
    let replies: BTreeSet<(Protocol, IpAddr, IpAddr, u16, u16)> = revoked
        .iter()
        .map(|e| {
            (
                e.proto,
                e.reply_src,
                e.reply_dst,
                e.reply_sport,
                e.reply_dport,
            )
        })
        .collect();
    entries
        .iter()
        .filter(|e| {
            replies.contains(&(e.proto, e.orig_src, e.orig_dst, e.orig_sport, e.orig_dport))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::*;
    use crate::{compile, render, NodeConfig};
    use serde_json::json;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// x/a (10.0.1.10) accepts ingress only from namespace y; y/b (10.0.1.20) and z/c
    /// (10.0.1.30) are local, r/d (10.0.2.40) on another node.
    fn setup(revoke: bool) -> (Tracer, RevokeContext) {
        let st = cluster(
            vec![mk_node("n1", "10.0.1.0/24"), mk_node("n2", "10.0.2.0/24")],
            vec![
                mk_ns("x", &[("ns", "x")]),
                mk_ns("y", &[("ns", "y")]),
                mk_ns("z", &[("ns", "z")]),
                mk_ns("r", &[("ns", "r")]),
            ],
            vec![
                mk_pod("x", "a", &[], "10.0.1.10", "n1"),
                mk_pod("y", "b", &[], "10.0.1.20", "n1"),
                mk_pod("z", "c", &[], "10.0.1.30", "n1"),
                mk_pod("r", "d", &[], "10.0.2.40", "n2"),
            ],
            vec![mk_policy(
                "x",
                "from-y",
                json!({"podSelector": {}, "ingress": [{"from": [
                    {"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                    "ports": [{"port": 80}]}]}),
            )],
        );
        let mut cfg = NodeConfig::new("n1");
        cfg.revoke_denied_connections = revoke;
        let p = render(&compile(&st, &cfg));
        let ctx = RevokeContext {
            local_pods: ["10.0.1.10", "10.0.1.20", "10.0.1.30"]
                .iter()
                .map(|s| ip(s))
                .collect(),
            local_addrs: [ip("10.0.1.1"), ip("192.0.2.1")].into_iter().collect(),
            interfaces: BTreeMap::new(),
        };
        (Tracer::new(&p).unwrap(), ctx)
    }

    #[test]
    fn denied_flows_are_exactly_those_a_new_connection_could_not_open() {
        let (t, ctx) = setup(true);
        let tcp =
            |s: &str, d: &str, dport| CtEntry::plain(Protocol::Tcp, ip(s), 40000, ip(d), dport);
        let cases = [
            (tcp("10.0.1.20", "10.0.1.10", 80), Judgement::Allowed),
            (tcp("10.0.1.30", "10.0.1.10", 80), Judgement::Denied),
            (tcp("10.0.1.20", "10.0.1.10", 81), Judgement::Denied),
            (tcp("10.0.2.40", "10.0.1.10", 80), Judgement::Denied),
            // x/a is not egress-isolated: its own connections stay.
            (tcp("10.0.1.10", "10.0.1.30", 22), Judgement::Allowed),
            // Remote to remote, and node-originated: not ours.
            (tcp("10.0.2.40", "10.0.2.41", 80), Judgement::NotLocal),
            (tcp("10.0.1.1", "10.0.1.10", 81), Judgement::NotLocal),
            // Pod to the node (INPUT): x has no egress policy.
            (tcp("10.0.1.10", "192.0.2.1", 22), Judgement::Allowed),
        ];
        for (e, want) in &cases {
            assert_eq!(judge(&t, &ctx, e).unwrap(), *want, "{e:?}");
        }
        let entries: Vec<CtEntry> = cases.iter().map(|(e, _)| e.clone()).collect();
        let d = denied(&t, &ctx, &entries).unwrap();
        assert_eq!(d.len(), 3);
    }

    /// The per-view memo in `denied` gives what judging every entry alone gives: many
    /// source ports per view, DNATed entries whose view equals a plain one, and views that
    /// differ only in the protocol or the port.
    #[test]
    fn denied_with_shared_views_agrees_with_judging_each_entry() {
        let (t, ctx) = setup(true);
        let mut entries = Vec::new();
        for sport in [40000, 40001, 40002] {
            for (src, dport) in [("10.0.1.20", 80), ("10.0.1.30", 80), ("10.0.1.20", 81)] {
                for proto in [Protocol::Tcp, Protocol::Udp] {
                    entries.push(CtEntry::plain(
                        proto,
                        ip(src),
                        sport,
                        ip("10.0.1.10"),
                        dport,
                    ));
                }
            }
            // Through a VIP DNATed to x/a: the same view as the direct entries.
            let mut nat =
                CtEntry::plain(Protocol::Tcp, ip("10.0.1.30"), sport, ip("10.96.0.1"), 443);
            nat.reply_src = ip("10.0.1.10");
            nat.reply_sport = 80;
            entries.push(nat);
        }
        let want: Vec<&CtEntry> = entries
            .iter()
            .filter(|e| judge(&t, &ctx, e).unwrap() == Judgement::Denied)
            .collect();
        assert_eq!(denied(&t, &ctx, &entries).unwrap(), want);
        // The policy allows TCP port 80 from y only: 3 sports × (y→80 over UDP, z→80 and
        // y→81 over both, the DNATed z→80) = 18.
        assert_eq!(want.len(), 18);
    }

    #[test]
    fn dnat_is_judged_on_the_real_destination() {
        let (t, ctx) = setup(true);
        // z/c → Service VIP 10.96.0.10:8080, DNATed to x/a:80: denied (z is not y).
        let svc = CtEntry {
            proto: Protocol::Tcp,
            orig_src: ip("10.0.1.30"),
            orig_dst: ip("10.96.0.10"),
            orig_sport: 40000,
            orig_dport: 8080,
            reply_src: ip("10.0.1.10"),
            reply_dst: ip("10.0.1.30"),
            reply_sport: 80,
            reply_dport: 40000,
        };
        assert_eq!(judge(&t, &ctx, &svc).unwrap(), Judgement::Denied);
        // The same from y/b: allowed.
        let mut ok = svc.clone();
        ok.orig_src = ip("10.0.1.20");
        ok.reply_dst = ip("10.0.1.20");
        assert_eq!(judge(&t, &ctx, &ok).unwrap(), Judgement::Allowed);
    }

    #[test]
    fn udp_and_sctp_are_judged_by_protocol() {
        let (t, ctx) = setup(true);
        for proto in [Protocol::Udp, Protocol::Sctp] {
            let e = CtEntry::plain(proto, ip("10.0.1.20"), 5000, ip("10.0.1.10"), 80);
            // The policy's port is TCP 80 only.
            assert_eq!(judge(&t, &ctx, &e).unwrap(), Judgement::Denied, "{proto:?}");
        }
    }

    #[test]
    fn midstream_segments_of_isolated_pods_are_dropped_both_ways() {
        let (t, _) = setup(true);
        let est = |s, d, p| Packet::tcp(s, d, p).with_state(CtState::Established);
        // A server retransmission (x/a → z/c, not isolated for egress) after the entry was
        // deleted: NEW without SYN → dropped, so the flow cannot resume in reverse.
        let retrans = Packet::tcp("10.0.1.10", "10.0.1.30", 40000).mid_stream();
        let tr = t.trace("FORWARD", &retrans).unwrap();
        assert_eq!(tr.verdict, Verdict::Drop);
        assert!(tr.visited(names::MIDSTREAM_CHAIN));
        // The client's next segment too.
        let next = Packet::tcp("10.0.1.30", "10.0.1.10", 80).mid_stream();
        assert_eq!(t.trace("FORWARD", &next).unwrap().verdict, Verdict::Drop);
        // A SYN from x/a is a new connection: allowed (x is not egress-isolated).
        let syn = Packet::tcp("10.0.1.10", "10.0.1.30", 22);
        assert_eq!(t.trace("FORWARD", &syn).unwrap().verdict, Verdict::Accept);
        // Established traffic never reaches the chain.
        assert_eq!(
            t.trace("FORWARD", &est("10.0.1.30", "10.0.1.10", 81))
                .unwrap()
                .verdict,
            Verdict::Accept
        );
        // Pods no policy isolates keep the kernel's default (picked up mid-stream).
        let other = Packet::tcp("10.0.1.20", "10.0.1.30", 22).mid_stream();
        assert_eq!(t.trace("FORWARD", &other).unwrap().verdict, Verdict::Accept);
        // UDP is not TCP: no mid-stream notion.
        let udp = Packet::new("10.0.1.10", "10.0.1.30", Protocol::Udp, 53).mid_stream();
        assert_eq!(t.trace("FORWARD", &udp).unwrap().verdict, Verdict::Accept);
        // Pod → node, mid-stream, from an isolated pod: dropped in INPUT.
        let inp = Packet::tcp("10.0.1.10", "192.0.2.1", 22).mid_stream();
        assert_eq!(t.trace("INPUT", &inp).unwrap().verdict, Verdict::Drop);
    }

    /// Which pods `PALISADE-MIDSTREAM` guards, by the rule comments (one pod key each).
    fn guarded(st: &crate::ClusterState) -> BTreeSet<String> {
        let mut cfg = NodeConfig::new("n1");
        cfg.revoke_denied_connections = true;
        let compiled = compile(st, &cfg);
        let chain = compiled
            .chains
            .iter()
            .find(|c| c.name == names::MIDSTREAM_CHAIN)
            .expect("the mid-stream chain");
        chain
            .rules
            .iter()
            .flat_map(|r| &r.matches)
            .filter_map(|m| match m {
                Match::Comment(c) => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn pods_only_a_cluster_policy_can_deny_are_guarded() {
        let ns = |n: &str| mk_ns(n, &[("ns", n)]);
        let subject = |n: &str| json!({"namespaces": {"matchLabels": {"ns": n}}});
        let mut audit = mk_policy(
            "c",
            "audit",
            json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}),
        );
        audit.metadata.annotations = Some(
            [(
                crate::ENFORCEMENT_ANNOTATION.to_string(),
                "audit".to_string(),
            )]
            .into_iter()
            .collect(),
        );
        let mut st = cluster(
            vec![mk_node("n1", "10.0.1.0/24")],
            ["a", "b", "c", "d", "e", "f", "w"]
                .iter()
                .map(|n| ns(n))
                .collect(),
            vec![
                mk_pod("a", "p", &[], "10.0.1.10", "n1"),
                mk_pod("b", "p", &[], "10.0.1.20", "n1"),
                mk_pod("c", "p", &[], "10.0.1.30", "n1"),
                mk_pod("d", "p", &[], "10.0.1.40", "n1"),
                mk_pod("e", "p", &[], "10.0.1.50", "n1"),
                mk_pod("f", "p", &[], "10.0.1.60", "n1"),
                mk_pod("w", "p", &[], "10.0.1.70", "n1"),
            ],
            vec![
                audit,
                mk_policy(
                    "f",
                    "deny-all",
                    json!({"podSelector": {}, "policyTypes": ["Egress"]}),
                ),
            ],
        );
        let deny_from_w = json!([{"action": "Deny", "from": [{"namespaces": subject("w")}]}]);
        let cnps = [
            // a: an Admin Deny.
            ("admin-deny", "Admin", subject("a"), deny_from_w.clone()),
            // b: a Baseline Deny, no NetworkPolicy.
            ("base-deny-b", "Baseline", subject("b"), deny_from_w.clone()),
            // c: a Baseline Deny, but an (audit) NetworkPolicy selects c for ingress, so the
            // Baseline tier is never evaluated for it: nothing can drop.
            ("base-deny-c", "Baseline", subject("c"), deny_from_w.clone()),
            // d: Admin Accept and Pass only.
            (
                "admin-allow",
                "Admin",
                subject("d"),
                json!([{"action": "Accept", "from": [{"namespaces": subject("w")}]},
                       {"action": "Pass", "from": [{"namespaces": {}}]}]),
            ),
            // e: nothing selects it. f: an enforced NetworkPolicy (as before).
        ];
        for (name, tier, subj, ingress) in cnps {
            st.cluster_policies.push(std::sync::Arc::new(mk_cnp(
                name,
                json!({"tier": tier, "priority": 10, "subject": subj, "ingress": ingress}),
            )));
        }
        let want: BTreeSet<String> = ["a/p", "b/p", "f/p"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(guarded(&st), want);
        // The guard in the trace: w/p's mid-stream segment to a/p (which the Deny names) and
        // a/p's own retransmission towards an unselected pod are dropped in MIDSTREAM; the
        // same to d/p (no Deny) is picked up as the kernel does without policies.
        let mut cfg = NodeConfig::new("n1");
        cfg.revoke_denied_connections = true;
        let t = Tracer::new(&render(&compile(&st, &cfg))).unwrap();
        for (src, dst, dropped) in [
            ("10.0.1.70", "10.0.1.10", true),
            ("10.0.1.10", "10.0.1.50", true),
            ("10.0.1.20", "10.0.1.50", true),
            ("10.0.1.70", "10.0.1.40", false),
            ("10.0.1.30", "10.0.1.50", false),
        ] {
            let tr = t
                .trace("FORWARD", &Packet::tcp(src, dst, 80).mid_stream())
                .unwrap();
            assert_eq!(tr.verdict == Verdict::Drop, dropped, "{src} -> {dst}");
            assert_eq!(
                tr.visited(names::MIDSTREAM_CHAIN),
                dropped,
                "{src} -> {dst}"
            );
        }
    }

    #[test]
    fn without_revocation_no_midstream_chain() {
        let (t, _) = setup(false);
        assert!(!t.chain_names().contains(names::MIDSTREAM_CHAIN));
        let retrans = Packet::tcp("10.0.1.10", "10.0.1.30", 40000).mid_stream();
        assert_eq!(
            t.trace("FORWARD", &retrans).unwrap().verdict,
            Verdict::Accept
        );
    }

    /// The answer to a revoked UDP flow comes back as an entry in the reverse direction; only
    /// that one is returned: not the allowed flow next to it, not the same ports over TCP, not
    /// an unrelated flow of the same pods. With DNAT (a Service) the answer comes from the
    /// real destination, so the reply tuple is what is compared.
    #[test]
    fn a_revoked_flow_answered_after_deletion_is_found_by_its_reply_tuple() {
        let (x, z, y) = (ip("10.0.1.10"), ip("10.0.1.30"), ip("10.0.1.20"));
        let revoked = vec![CtEntry::plain(Protocol::Udp, z, 53035, x, 9000)];
        let back = CtEntry::plain(Protocol::Udp, x, 9000, z, 53035);
        let entries = vec![
            CtEntry::plain(Protocol::Udp, y, 55423, x, 9000),
            CtEntry::plain(Protocol::Tcp, x, 9000, z, 53035),
            CtEntry::plain(Protocol::Udp, x, 9000, z, 53036),
            back.clone(),
        ];
        assert_eq!(resurrected(&revoked, &entries), vec![&back]);
        assert!(resurrected(&[], &entries).is_empty());

        let vip = ip("10.96.0.10");
        let mut via_service = CtEntry::plain(Protocol::Udp, z, 40000, vip, 53);
        via_service.reply_src = x;
        via_service.reply_sport = 9000;
        let answer = CtEntry::plain(Protocol::Udp, x, 9000, z, 40000);
        let entries = [
            answer.clone(),
            CtEntry::plain(Protocol::Udp, vip, 53, z, 40000),
        ];
        assert_eq!(resurrected(&[via_service], &entries), vec![&answer]);
    }
}
