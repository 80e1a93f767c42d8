//! ClusterNetworkPolicy tiers: Admin → NetworkPolicy → Baseline → default allow, per
//! direction, for the local pods that are subjects of some ClusterNetworkPolicy.
//!
//! ```text
//! PALISADE-EGRESS  -s podIP -g PAL-XE-<tiered profile>     (instead of -g PAL-EG-<np profile>)
//!
//! PAL-XE-<profile>                       A = accept bit (the NetworkPolicy mark bit),
//!   clear A|D                            D = decided bit (the next bit)
//!   -j PAL-TE-<admin list>               the pod's Admin policies (shared chain)
//!   A set → -g PALISADE-CNP-ALLOW        an Admin Accept: the direction is allowed
//!   clear A|D                            a Pass, or nothing matched
//!   -g PAL-EG-<np profile>               if NetworkPolicies isolate the pod: their verdict
//!   (otherwise) -j PAL-TE-<baseline list>, then the same two rules
//!   (falls off: default allow)
//!
//! PAL-TE-<list>                          one per distinct list of policies of one tier
//!   -j PAL-CE-<cnp 1>; -j PAL-CE-<cnp 2> ...   priority ascending, then name
//!
//! PAL-CE-<cnp>                           one per policy and direction, shared by all pods
//!   D set → RETURN                       an earlier policy of the tier decided
//!   <peer> <ports> comment cnp/<tier>/<name>/<dir>/<index>
//!        → -g PALISADE-CNP-ACCEPT (sets A|D) | -j DROP | -g PALISADE-CNP-PASS (sets D)
//!
//! PALISADE-CNP-ALLOW: clear A|D and fall off (back to FORWARD/INPUT: next direction).
//! ```
//!
//! A pod's egress Accept only ends its egress evaluation: the destination's ingress (here, or
//! on the destination's node) is still evaluated. Replies pass the conntrack rule first.
//! Rules stay O(local pods + policies): one CNP chain per policy and direction, one tier chain
//! per distinct list of a tier's policies, and one tiered profile of at most seven rules per
//! distinct (admin list, NetworkPolicy profile, baseline list).

use std::collections::{BTreeMap, BTreeSet};

use super::{
    dedup_rules, merge_ranges, multiport_chunks, split_zero, Compiler, Dir, Match, Rule,
    SetBuilder, SetDir, SetKind, SetMember, SetSource, Target,
};
use crate::cnp::{Action, CnpInfo, CnpPeer, Tier};
use crate::ir::Protocol;
use crate::model::{PortInfo, PortSel};
use crate::names::{self, hashed};
use crate::selector::{NamespaceLabels, Selector};
use crate::{reasons, Diagnostic};

/// The decided bit (set by Accept and Pass): the bit next to the accept (mark) bit.
pub(super) fn pass_bit(mark: u32) -> u32 {
    if mark == 1 << 31 {
        mark >> 1
    } else {
        mark << 1
    }
}

/// The ClusterNetworkPolicies whose subject is one local pod, per tier and direction
/// (indexes into `model.cnps`, in evaluation order).
#[derive(Default)]
pub(super) struct CnpSelection {
    pub admin_in: Vec<usize>,
    pub admin_eg: Vec<usize>,
    pub base_in: Vec<usize>,
    pub base_eg: Vec<usize>,
}

impl CnpSelection {
    pub fn lists(&self, dir: Dir) -> (&[usize], &[usize]) {
        match dir {
            Dir::Ingress => (&self.admin_in, &self.base_in),
            Dir::Egress => (&self.admin_eg, &self.base_eg),
        }
    }
}

fn rules_of<'c>(c: &'c CnpInfo<'_>, dir: Dir) -> &'c [crate::cnp::CnpRule] {
    match dir {
        Dir::Ingress => &c.ingress,
        Dir::Egress => &c.egress,
    }
}

/// Whether some ClusterNetworkPolicy rule evaluated for a pod in `dir` can drop its
/// traffic: a Deny rule of an Admin policy selecting it, or — when no NetworkPolicy
/// (enforced or audit) selects it in `dir`, since only then is the Baseline tier evaluated
/// ([`Compiler::tiered_profile`]) — a Deny rule of a Baseline policy selecting it. Accept
/// and Pass never drop. Conservative: a Deny shadowed by an earlier Accept still counts.
pub(super) fn cnp_can_deny(
    cnps: &[CnpInfo<'_>],
    sel: &CnpSelection,
    dir: Dir,
    np_selects: bool,
) -> bool {
    let (admin, base) = sel.lists(dir);
    let base: &[usize] = if np_selects { &[] } else { base };
    admin.iter().chain(base).any(|&c| {
        rules_of(&cnps[c], dir)
            .iter()
            .any(|r| r.action == Action::Deny)
    })
}

impl<'m, 'a> Compiler<'m, 'a> {
    /// Which ClusterNetworkPolicies select local pod `pi` (host-network pods are not in the
    /// model's pods at all, so they are never subjects).
    pub(super) fn cnp_selection(&self, pi: usize) -> CnpSelection {
        let model = self.model;
        let pod = &model.pods[pi];
        let ns = NamespaceLabels {
            name: pod.ns,
            labels: model.ns_labels.get(pod.ns).copied(),
        };
        let mut sel = CnpSelection::default();
        for (ci, c) in model.cnps.iter().enumerate() {
            if !(c.subject.namespaces.matches(&ns) && c.subject.pods.matches(pod.labels)) {
                continue;
            }
            let (ing, eg) = match c.tier {
                Tier::Admin => (&mut sel.admin_in, &mut sel.admin_eg),
                Tier::Baseline => (&mut sel.base_in, &mut sel.base_eg),
            };
            if !c.ingress.is_empty() {
                ing.push(ci);
            }
            if !c.egress.is_empty() {
                eg.push(ci);
            }
        }
        sel
    }

    /// Named ports the ClusterNetworkPolicies selecting local pods refer to.
    pub(super) fn cnp_named_ports(
        &self,
        selections: &[CnpSelection],
        out: &mut BTreeSet<(Protocol, &'m str)>,
    ) {
        let model = self.model;
        let mut used = BTreeSet::new();
        for s in selections {
            for (list, dir) in [
                (&s.admin_in, Dir::Ingress),
                (&s.base_in, Dir::Ingress),
                (&s.admin_eg, Dir::Egress),
                (&s.base_eg, Dir::Egress),
            ] {
                used.extend(list.iter().map(|&c| (c, dir)));
            }
        }
        for (c, dir) in used {
            for port in rules_of(&model.cnps[c], dir)
                .iter()
                .flat_map(|r| r.ports.iter().flatten())
            {
                if let PortSel::Named(n) = &port.port {
                    out.insert((port.proto, n.as_str()));
                }
            }
        }
    }

    /// The chain a local pod's dispatch rule goes to for one direction, when ClusterNetwork-
    /// Policies select it; `None` when none does (then the NetworkPolicy profile, if any, is
    /// used directly, exactly as without ClusterNetworkPolicies).
    pub(super) fn tiered_profile(
        &mut self,
        dir: Dir,
        sel: &CnpSelection,
        np_profile: Option<&str>,
        generated: &mut BTreeMap<String, Vec<Rule>>,
    ) -> Option<String> {
        let (admin, base) = sel.lists(dir);
        // Baseline only matters for pods NetworkPolicies do not isolate.
        let base: &[usize] = if np_profile.is_some() { &[] } else { base };
        if admin.is_empty() && base.is_empty() {
            return None;
        }
        let keys = |list: &[usize]| -> Vec<String> {
            list.iter().map(|&c| self.model.cnps[c].key()).collect()
        };
        let identity = format!(
            "admin:{}|np:{}|baseline:{}",
            keys(admin).join(","),
            np_profile.unwrap_or("-"),
            keys(base).join(",")
        );
        let prefix = match dir {
            Dir::Ingress => names::INGRESS_TIERED_PREFIX,
            Dir::Egress => names::EGRESS_TIERED_PREFIX,
        };
        let name = hashed(prefix, &identity);
        if generated.contains_key(&name) {
            return Some(name);
        }
        self.cnp_fixed_chains(generated);
        let accept = self.mark;
        let both = accept | pass_bit(accept);
        let mut rules = vec![Rule::new(vec![], Target::ClearMark(both))];
        let tier_exit = |rules: &mut Vec<Rule>| {
            rules.push(Rule::new(
                vec![Match::Mark {
                    bit: accept,
                    negate: false,
                }],
                Target::Goto(names::CNP_ALLOW_CHAIN.into()),
            ));
            rules.push(Rule::new(vec![], Target::ClearMark(both)));
        };
        if !admin.is_empty() {
            let chain = self.tier_chain(dir, admin, generated);
            rules.push(Rule::new(
                vec![Match::Comment("admin tier".into())],
                Target::Jump(chain),
            ));
            tier_exit(&mut rules);
        }
        match np_profile {
            Some(p) => rules.push(Rule::new(
                vec![Match::Comment("networkpolicy tier".into())],
                Target::Goto(p.to_string()),
            )),
            None if !base.is_empty() => {
                let chain = self.tier_chain(dir, base, generated);
                rules.push(Rule::new(
                    vec![Match::Comment("baseline tier".into())],
                    Target::Jump(chain),
                ));
                tier_exit(&mut rules);
            }
            None => {}
        }
        generated.insert(name.clone(), rules);
        Some(name)
    }

    /// The chain jumping to each policy of one tier's list, in order (shared by every pod
    /// with the same list).
    fn tier_chain(
        &mut self,
        dir: Dir,
        list: &[usize],
        generated: &mut BTreeMap<String, Vec<Rule>>,
    ) -> String {
        let keys: Vec<String> = list.iter().map(|&c| self.model.cnps[c].key()).collect();
        let prefix = match dir {
            Dir::Ingress => names::INGRESS_TIER_PREFIX,
            Dir::Egress => names::EGRESS_TIER_PREFIX,
        };
        let name = hashed(prefix, &keys.join(","));
        if generated.contains_key(&name) {
            return name;
        }
        let mut rules = Vec::with_capacity(list.len());
        for (&c, key) in list.iter().zip(keys) {
            let chain = self.cnp_chain(c, dir, generated);
            rules.push(Rule::new(vec![Match::Comment(key)], Target::Jump(chain)));
        }
        generated.insert(name.clone(), rules);
        name
    }

    fn cnp_fixed_chains(&self, generated: &mut BTreeMap<String, Vec<Rule>>) {
        if generated.contains_key(names::CNP_ALLOW_CHAIN) {
            return;
        }
        let accept = self.mark;
        let pass = pass_bit(accept);
        generated.insert(
            names::CNP_ACCEPT_CHAIN.into(),
            vec![Rule::new(vec![], Target::SetMark(accept | pass))],
        );
        generated.insert(
            names::CNP_PASS_CHAIN.into(),
            vec![Rule::new(vec![], Target::SetMark(pass))],
        );
        generated.insert(
            names::CNP_ALLOW_CHAIN.into(),
            vec![Rule::new(vec![], Target::ClearMark(accept | pass))],
        );
    }

    /// The chain of one ClusterNetworkPolicy and direction, created on first use.
    fn cnp_chain(
        &mut self,
        ci: usize,
        dir: Dir,
        generated: &mut BTreeMap<String, Vec<Rule>>,
    ) -> String {
        let model = self.model;
        let cnp = &model.cnps[ci];
        let prefix = match dir {
            Dir::Ingress => names::INGRESS_CNP_PREFIX,
            Dir::Egress => names::EGRESS_CNP_PREFIX,
        };
        let name = hashed(prefix, &cnp.key());
        if generated.contains_key(&name) {
            return name;
        }
        let mut out = vec![Rule::new(
            vec![Match::Mark {
                bit: pass_bit(self.mark),
                negate: false,
            }],
            Target::Return,
        )];
        for rule in rules_of(cnp, dir) {
            let peers: Vec<Option<Match>> = match &rule.peers {
                None => vec![None],
                Some(list) => list.iter().map(|p| Some(self.cnp_peer(p, dir))).collect(),
            };
            let ports: Vec<Vec<Match>> = match &rule.ports {
                None => vec![vec![]],
                Some(list) => self.cnp_port_groups(cnp, dir, list),
            };
            let target = match rule.action {
                Action::Accept => Target::Goto(names::CNP_ACCEPT_CHAIN.into()),
                Action::Deny => Target::Drop,
                Action::Pass => Target::Goto(names::CNP_PASS_CHAIN.into()),
            };
            let comment = Match::Comment(format!("{}/{}/{}", cnp.key(), dir.as_str(), rule.index));
            for peer in &peers {
                for port in &ports {
                    let mut m = Vec::with_capacity(port.len() + 2);
                    m.extend(peer.iter().cloned());
                    m.extend(port.iter().cloned());
                    if let (Action::Deny, Some(log)) = (rule.action, &self.deny_log) {
                        // The denied-traffic log: the CNP chain is the prefix.
                        out.push(super::log_rule(log, m.clone(), dir == Dir::Egress, &name));
                    }
                    m.push(comment.clone());
                    out.push(Rule::new(m, target.clone()));
                }
            }
        }
        dedup_rules(&mut out);
        generated.insert(name.clone(), out);
        name
    }

    fn cnp_peer(&mut self, peer: &CnpPeer, dir: Dir) -> Match {
        let set_dir = match dir {
            Dir::Ingress => SetDir::Src,
            Dir::Egress => SetDir::Dst,
        };
        let name = match peer {
            CnpPeer::Pods { namespaces, pods } => self.sets.pods(namespaces, pods),
            CnpPeer::Nodes(sel) => self.sets.nodes(sel),
            CnpPeer::Networks(nets) => self.sets.networks(nets),
        };
        Match::Set { name, dir: set_dir }
    }

    /// Like the NetworkPolicy port groups: per protocol "all ports", merged numeric ranges
    /// (`--dport` / `multiport`), and each named port as a `hash:ip,port` set.
    fn cnp_port_groups(
        &mut self,
        cnp: &CnpInfo<'a>,
        dir: Dir,
        list: &[PortInfo],
    ) -> Vec<Vec<Match>> {
        let mut out = Vec::new();
        let mut named: BTreeMap<&str, bool> = BTreeMap::new();
        for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            let entries: Vec<&PortSel> = list
                .iter()
                .filter(|p| p.proto == proto)
                .map(|p| &p.port)
                .collect();
            if entries.is_empty() {
                continue;
            }
            if entries.iter().any(|p| **p == PortSel::All) {
                out.push(vec![Match::Proto(proto)]);
                continue;
            }
            let mut ranges: Vec<(u16, u16)> = entries
                .iter()
                .filter_map(|p| match p {
                    PortSel::Range(lo, hi) => Some((*lo, *hi)),
                    _ => None,
                })
                .collect();
            for chunk in multiport_chunks(merge_ranges(&mut ranges)) {
                let m = if chunk.len() == 1 {
                    Match::DPort(proto, chunk[0].0, chunk[0].1)
                } else {
                    Match::MultiPort(chunk)
                };
                out.push(vec![Match::Proto(proto), m]);
            }
            for p in entries {
                let PortSel::Named(port_name) = p else {
                    continue;
                };
                let set = self.sets.named_port(proto, port_name);
                let known = self
                    .sets
                    .sets
                    .get(&set)
                    .is_some_and(|s| !s.members.is_empty());
                *named.entry(port_name.as_str()).or_default() |= known;
                out.push(vec![
                    Match::Proto(proto),
                    Match::Set {
                        name: set,
                        dir: SetDir::DstDst,
                    },
                ]);
            }
        }
        for (port_name, known) in named {
            if !known {
                self.diags.push(Diagnostic {
                    kind: crate::cnp::DIAG_KIND,
                    namespace: None,
                    name: cnp.name.to_string(),
                    reason: reasons::UNKNOWN_NAMED_PORT,
                    message: format!(
                        "{} destinationNamedPort {port_name:?}: no pod in the cluster declares \
                         it; it matches nothing until one does",
                        dir.as_str()
                    ),
                });
            }
        }
        out
    }
}

impl SetBuilder<'_, '_> {
    /// Addresses of the nodes matching `sel` (hash:ip; rebuilt whenever Nodes change).
    fn nodes(&mut self, sel: &Selector) -> String {
        let identity = format!("nodes {sel}");
        self.insert(
            SetKind::HashIp,
            identity,
            || SetSource::Block,
            |this| {
                let family = this.model.family;
                let mut members = BTreeSet::new();
                for n in this.model.nodes {
                    let labels = n.metadata.labels.as_ref().unwrap_or(&NO_LABELS);
                    if sel.matches(labels) {
                        for ip in crate::cnp::node_addresses(n, family) {
                            members.insert(SetMember::Ip(ip));
                        }
                    }
                }
                members
            },
        )
    }

    /// A `networks` peer (hash:net, a /0 split in two halves).
    fn networks(&mut self, nets: &[ipnetwork::IpNetwork]) -> String {
        let list: Vec<String> = nets.iter().map(ToString::to_string).collect();
        let identity = format!("networks {}", list.join(","));
        self.insert(
            SetKind::HashNet,
            identity,
            || SetSource::Block,
            |_| {
                nets.iter()
                    .flat_map(|n| split_zero(*n))
                    .map(|net| SetMember::Net {
                        net,
                        nomatch: false,
                    })
                    .collect()
            },
        )
    }
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();
