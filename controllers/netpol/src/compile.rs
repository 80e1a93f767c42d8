//! Compile the model into a small rule IR: chains of rules, ipsets with members, hooks.
//!
//! ```text
//!  local pods ──► which policies select each (per direction) ──► profile = sorted policy list
//!  policies selecting ≥1 local pod ──► PAL-PI-/PAL-PE- chain: one rule per (peer × port group)
//!  peers ──► ipsets (identity = canonical selector text; equal selectors ⇒ one set)
//!  named ports ──► hash:ip,port set of every pod declaring (name, protocol), matched dst,dst
//! ```
//!
//! What depends on what (so updates stay small):
//! - rules depend only on policies and on *local* pods (dispatch rules, profiles);
//! - set members depend on all pods and namespace labels.
//!
//! A remote pod being added or removed therefore changes set members only, never a rule.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::str::FromStr;

use ipnetwork::IpNetwork;

use crate::model::{Model, Peer, PodInfo, PolicyInfo, PortInfo, PortSel, RuleInfo};
use crate::names::{self, hashed};
use crate::provenance::{PolicyRef, RuleRef};
use crate::selector::{NamespaceLabels, Selector};
use crate::{
    reasons, ClusterState, Diagnostic, Family, NodeConfig, PodInterface, DEFAULT_MARK_BIT,
};

mod tiers;

pub(crate) use crate::ir::SetSource;
pub use crate::ir::{
    Chain, Compiled, Hook, IpSet, Match, Protocol, Rule, SetDir, SetKind, SetMember, Target,
    ICMP6_MLD1_DONE, ICMP6_MLD1_REPORT, ICMP6_MLD2_REPORT, ICMP6_MLD_QUERY,
    ICMP6_NEIGHBOR_ADVERTISEMENT, ICMP6_NEIGHBOR_SOLICITATION, ICMP6_ROUTER_ADVERTISEMENT,
    ICMP6_ROUTER_SOLICITATION,
};

/// The hooks every payload installs.
pub fn hooks() -> Vec<Hook> {
    vec![
        Hook {
            table: "filter",
            builtin: "FORWARD",
            chain: names::FORWARD_CHAIN,
        },
        Hook {
            table: "filter",
            builtin: "INPUT",
            chain: names::INPUT_CHAIN,
        },
    ]
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
enum Dir {
    Ingress,
    Egress,
}

impl Dir {
    fn as_str(self) -> &'static str {
        match self {
            Dir::Ingress => "ingress",
            Dir::Egress => "egress",
        }
    }
}

/// Compiles every NetworkPolicy for the pods of `cfg.node_name`. Never fails: problems in the
/// input are returned as diagnostics and fail closed.
pub fn compile(state: &ClusterState, cfg: &NodeConfig) -> Compiled {
    let mut diags = Vec::new();
    let mark = if cfg.mark_bit.count_ones() == 1 {
        cfg.mark_bit
    } else {
        diags.push(Diagnostic {
            kind: "NodeConfig",
            namespace: None,
            name: cfg.node_name.clone(),
            reason: reasons::INVALID_CONFIG,
            message: format!(
                "mark bit {:#x} is not a single bit; using {:#x}",
                cfg.mark_bit, DEFAULT_MARK_BIT
            ),
        });
        DEFAULT_MARK_BIT
    };
    let deny_log = cfg.deny_log.clone().filter(|l| {
        let ok = crate::DenyLog::valid_rate(&l.rate) && l.burst >= 1;
        if !ok {
            diags.push(Diagnostic {
                kind: "NodeConfig",
                namespace: None,
                name: cfg.node_name.clone(),
                reason: reasons::INVALID_CONFIG,
                message: format!(
                    "denied-traffic log rate {:?} / burst {} unusable (N/sec, or N/min with \
                     N below 60; burst at least 1); the log is off",
                    crate::render::sanitize(&l.rate, 40),
                    l.burst
                ),
            });
        }
        ok
    });
    let model = Model::build(state, cfg, &mut diags);
    let mut c = Compiler {
        model: &model,
        deny_log,
        mark,
        sets: SetBuilder::new(&model),
        diags,
    };
    c.run(cfg)
}

struct Compiler<'m, 'a> {
    model: &'m Model<'a>,
    deny_log: Option<crate::DenyLog>,
    mark: u32,
    sets: SetBuilder<'m, 'a>,
    diags: Vec<Diagnostic>,
}

/// Local pod → the policies isolating it, per direction.
struct Selection {
    pod: usize,
    ingress: Vec<usize>,
    egress: Vec<usize>,
}

/// Which policies isolate which local pods: phase 1 of [`Compiler::run`].
struct Selections {
    /// Per local pod, the NetworkPolicies isolating it.
    pods: Vec<Selection>,
    /// Per local pod (same order), the ClusterNetworkPolicies selecting it.
    cnp: Vec<tiers::CnpSelection>,
    /// (policy, direction) → the local pods it isolates; only pairs with at least one.
    selected_by: BTreeMap<(usize, Dir), Vec<usize>>,
}

/// The chains built per policy and per profile, by name, and which chain each
/// (policy, direction) got.
#[derive(Default)]
struct Generated {
    chains: BTreeMap<String, Vec<Rule>>,
    policy_chain: HashMap<(usize, Dir), String>,
}

impl<'m, 'a> Compiler<'m, 'a> {
    /// The phases, in order (later ones read what earlier ones built; set names and
    /// diagnostics accumulate in `self` as they go).
    fn run(&mut self, cfg: &NodeConfig) -> Compiled {
        let selections = self.select();
        self.index_named_ports(&selections);
        let mut generated = self.policy_chains(&selections.selected_by);
        let (mut ingress_dispatch, egress_dispatch, bridged_in) =
            self.dispatch(cfg, &selections, &mut generated);
        let mut chains = self.fixed_chains(cfg, &selections);
        if !bridged_in.is_empty() {
            // After the node's own traffic returned, before any `-d POD` rule: a packet to
            // another address that is bridged to an isolated pod is judged for that pod.
            ingress_dispatch.insert(
                1,
                Rule::new(vec![], Target::Jump(names::BRIDGED_IN_CHAIN.into())),
            );
            chains.push(Chain {
                name: names::BRIDGED_IN_CHAIN.into(),
                rules: self.bridged_in(bridged_in),
            });
        }
        chains.extend([
            Chain {
                name: names::EGRESS_CHAIN.into(),
                rules: egress_dispatch,
            },
            Chain {
                name: names::INGRESS_CHAIN.into(),
                rules: ingress_dispatch,
            },
        ]);
        chains.extend(
            generated
                .chains
                .into_iter()
                .map(|(name, rules)| Chain { name, rules }),
        );
        self.finish(chains)
    }

    /// Phase 1: Which policies (and cluster policies) isolate which local pods.
    fn select(&self) -> Selections {
        let model = self.model;
        let mut pods = Vec::with_capacity(model.local.len());
        let mut selected_by: BTreeMap<(usize, Dir), Vec<usize>> = BTreeMap::new();
        for &pi in &model.local {
            let pod = &model.pods[pi];
            let mut sel = Selection {
                pod: pi,
                ingress: Vec::new(),
                egress: Vec::new(),
            };
            for &qi in model.policies_by_ns.get(pod.ns).into_iter().flatten() {
                let pol = &model.policies[qi];
                if !pol.selector.matches(pod.labels) {
                    continue;
                }
                if pol.ingress.is_some() {
                    sel.ingress.push(qi);
                    selected_by.entry((qi, Dir::Ingress)).or_default().push(pi);
                }
                if pol.egress.is_some() {
                    sel.egress.push(qi);
                    selected_by.entry((qi, Dir::Egress)).or_default().push(pi);
                }
            }
            pods.push(sel);
        }
        let cnp = model
            .local
            .iter()
            .map(|&pi| self.cnp_selection(pi))
            .collect();
        Selections {
            pods,
            cnp,
            selected_by,
        }
    }

    /// Named ports the used policies refer to: only those are indexed.
    fn index_named_ports(&mut self, selections: &Selections) {
        let model = self.model;
        let mut referenced: BTreeSet<(Protocol, &'m str)> = BTreeSet::new();
        for &(qi, dir) in selections.selected_by.keys() {
            let pol = &model.policies[qi];
            let rules = match dir {
                Dir::Ingress => pol.ingress.as_deref(),
                Dir::Egress => pol.egress.as_deref(),
            };
            for port in rules
                .unwrap_or_default()
                .iter()
                .flat_map(|r| r.ports.iter().flatten())
            {
                if let PortSel::Named(n) = &port.port {
                    referenced.insert((port.proto, n.as_str()));
                }
            }
        }
        self.cnp_named_ports(&selections.cnp, &mut referenced);
        self.sets
            .index_named_ports(referenced.into_iter().collect());
    }

    /// Phase 2: One chain per (policy, direction) that isolates at least one local pod.
    fn policy_chains(&mut self, selected_by: &BTreeMap<(usize, Dir), Vec<usize>>) -> Generated {
        let model = self.model;
        let mut generated = Generated::default();
        // Sets first created by each namespace's policies (shared ones count once, for the
        // first): the kernel's limit of 65,534 ipsets per network namespace is shared by
        // both families and the swaps' temporary twins, so no user may take all of it.
        let mut ns_sets: HashMap<&str, usize> = HashMap::new();
        for (&(qi, dir), pods) in selected_by {
            let pol = &model.policies[qi];
            let (prefix, rules) = match dir {
                Dir::Ingress => (names::INGRESS_POLICY_PREFIX, pol.ingress.as_deref()),
                Dir::Egress => (names::EGRESS_POLICY_PREFIX, pol.egress.as_deref()),
            };
            let name = hashed(prefix, &pol.key());
            let mut out = vec![Rule::new(
                vec![Match::Mark {
                    bit: self.mark,
                    negate: false,
                }],
                Target::Return,
            )];
            let sets_before = self.sets.created.len();
            let mut ports_chains = Vec::new();
            for rule in rules.unwrap_or_default() {
                ports_chains.extend(self.policy_rule(
                    pol,
                    dir,
                    rule,
                    pods,
                    &mut out,
                    &mut generated.chains,
                ));
            }
            let new_sets = self.sets.created.len() - sets_before;
            let used = ns_sets.get(pol.ns).copied().unwrap_or(0);
            if used + new_sets > NAMESPACE_SET_BUDGET || self.sets.sets.len() > NODE_SET_BUDGET {
                // Fails closed: the direction keeps isolating and allows nothing.
                self.sets.roll_back(sets_before);
                for c in &ports_chains {
                    generated.chains.remove(c);
                }
                out.truncate(1);
                self.diags.push(Diagnostic {
                    kind: "NetworkPolicy",
                    namespace: Some(pol.ns.to_string()),
                    name: pol.name.to_string(),
                    reason: reasons::POLICY_OVER_BUDGET,
                    message: format!(
                        "{} rules need {new_sets} more ipsets; namespace {} already has {used} of \
                         {NAMESPACE_SET_BUDGET}, the node {} of {NODE_SET_BUDGET} (IPv{}): they \
                         allow nothing until the policy is smaller (fails closed)",
                        dir.as_str(),
                        pol.ns,
                        self.sets.sets.len(),
                        model.family.tag()
                    ),
                });
            } else {
                *ns_sets.entry(pol.ns).or_default() += new_sets;
            }
            dedup_rules(&mut out);
            generated.chains.insert(name.clone(), out);
            generated.policy_chain.insert((qi, dir), name);
        }
        generated
    }

    /// Phase 3: Profiles (distinct policy lists) and the dispatch chains: per local pod and
    /// direction, a jump to its profile; then what becomes of unknown pods. Returns the
    /// ingress and the egress dispatch rules, and per ingress-isolated pod on a bridge port
    /// the rule sending what the bridge forwards to that port for another address (broadcast,
    /// multicast, its link-local address) to the same profile.
    fn dispatch(
        &mut self,
        cfg: &NodeConfig,
        selections: &Selections,
        generated: &mut Generated,
    ) -> (Vec<Rule>, Vec<Rule>, Vec<Rule>) {
        let mut bridged_in = Vec::new();
        let model = self.model;
        let mut ingress_dispatch = vec![Rule::new(vec![Match::SrcLocal], Target::Return)];
        let mut egress_dispatch = vec![Rule::new(vec![Match::SrcLocal], Target::Return)];
        let block = cfg.block_unknown_pods && !model.pod_cidrs.is_empty();
        for (sel, cnp_sel) in selections.pods.iter().zip(&selections.cnp) {
            let pod = &model.pods[sel.pod];
            let host = host_net(pod.ip);
            let in_cidr = model.pod_cidrs.iter().any(|c| c.contains(pod.ip));
            for (dir, policies, dispatch) in [
                (Dir::Ingress, &sel.ingress, &mut ingress_dispatch),
                (Dir::Egress, &sel.egress, &mut egress_dispatch),
            ] {
                let addr = match dir {
                    Dir::Ingress => Match::Dst(host),
                    Dir::Egress => Match::Src(host),
                };
                let comment = Match::Comment(pod.key());
                // Audit-mode policies count only where no enforced policy isolates the pod:
                // with one, the enforced verdict stands (adding policies only allows more).
                let enforced: Vec<usize> = policies
                    .iter()
                    .copied()
                    .filter(|&q| !model.policies[q].audit)
                    .collect();
                let np_profile = if policies.is_empty() {
                    None
                } else if enforced.is_empty() {
                    Some(self.profile(
                        dir,
                        policies,
                        true,
                        &generated.policy_chain,
                        &mut generated.chains,
                    ))
                } else {
                    Some(self.profile(
                        dir,
                        &enforced,
                        false,
                        &generated.policy_chain,
                        &mut generated.chains,
                    ))
                };
                let tiered =
                    self.tiered_profile(dir, cnp_sel, np_profile.as_deref(), &mut generated.chains);
                let Some(profile) = tiered.or(np_profile) else {
                    if block && in_cidr {
                        dispatch.push(Rule::new(vec![addr, comment], Target::Return));
                    }
                    continue;
                };
                if dir == Dir::Ingress {
                    if let Some(PodInterface::BridgePort(port)) = cfg
                        .pod_interfaces
                        .get(&pod.ip)
                        .filter(|i| PodInterface::valid_name(i.name()))
                    {
                        bridged_in.push(Rule::new(
                            vec![
                                Match::NotDst(host),
                                Match::PhysdevOut(port.clone()),
                                comment.clone(),
                            ],
                            Target::Goto(profile.clone()),
                        ));
                    }
                }
                dispatch.push(Rule::new(vec![addr, comment], Target::Goto(profile)));
            }
        }
        if block {
            self.block_unknown(&mut ingress_dispatch, &mut egress_dispatch);
        }
        (ingress_dispatch, egress_dispatch, bridged_in)
    }

    /// `PALISADE-BRIDGED-IN`: neighbour discovery and MLD pass (multicast to a pod is how they
    /// work; a pod's own forged Router Advertisement is dropped where it enters, by
    /// anti-spoofing), then the per-pod rules from [`Self::dispatch`].
    fn bridged_in(&self, per_pod: Vec<Rule>) -> Vec<Rule> {
        let mut rules = Vec::new();
        if self.model.family == Family::V6 {
            rules.extend(icmp6_returns(
                None,
                &[
                    ICMP6_MLD_QUERY,
                    ICMP6_ROUTER_ADVERTISEMENT,
                    ICMP6_NEIGHBOR_SOLICITATION,
                    ICMP6_NEIGHBOR_ADVERTISEMENT,
                ],
                "IPv6 neighbour discovery / MLD",
            ));
        }
        rules.extend(per_pod);
        rules
    }

    /// The end of the dispatch chains under `block_unknown_pods`: traffic of the node's pod
    /// CIDRs that no local pod's rule took (a pod not known yet) is logged and dropped.
    /// Logs with the validated denied-traffic log (an unusable rate was reported and turned
    /// off in `compile`; passing it on would make the kernel reject the whole payload).
    fn block_unknown(&self, ingress: &mut Vec<Rule>, egress: &mut Vec<Rule>) {
        for cidr in &self.model.pod_cidrs {
            let comment = Match::Comment("local pod not known yet".into());
            if let Some(log) = &self.deny_log {
                ingress.push(log_rule(
                    log,
                    vec![Match::Dst(*cidr)],
                    false,
                    crate::denied::PREFIX_UNKNOWN_INGRESS,
                ));
                egress.push(log_rule(
                    log,
                    vec![Match::Src(*cidr)],
                    true,
                    crate::denied::PREFIX_UNKNOWN_EGRESS,
                ));
            }
            ingress.push(Rule::new(
                vec![Match::Dst(*cidr), comment.clone()],
                Target::Drop,
            ));
            egress.push(Rule::new(vec![Match::Src(*cidr), comment], Target::Drop));
        }
    }

    /// Phase 4: Fixed chains: the mid-stream guard and anti-spoofing where configured, then
    /// `FORWARD` and `INPUT` (which jump to them and to the dispatch chains).
    fn fixed_chains(&mut self, cfg: &NodeConfig, selections: &Selections) -> Vec<Chain> {
        let model = self.model;
        let antispoof = cfg.anti_spoofing.then(|| self.antispoof(cfg));
        let mut forward = vec![
            Rule::new(vec![Match::CtState("RELATED,ESTABLISHED")], Target::Accept),
            Rule::new(vec![Match::CtState("INVALID")], Target::Drop),
            Rule::new(vec![], Target::Jump(names::EGRESS_CHAIN.into())),
            Rule::new(vec![], Target::Jump(names::INGRESS_CHAIN.into())),
        ];
        let mut input = vec![Rule::new(
            vec![Match::CtState("RELATED,ESTABLISHED")],
            Target::Return,
        )];
        if model.family == Family::V6 {
            // Neighbour discovery is ICMPv6: a pod's Neighbor Solicitation for its gateway
            // (sourced from the pod's own address when a packet of it triggered the lookup)
            // and its Neighbor Advertisements reach the node's INPUT chain, untracked. Egress
            // isolation must not cut them, or an isolated pod loses even its allowed traffic
            // (ARP, its IPv4 counterpart, never meets iptables). Router Solicitations too.
            for (t, what) in [
                (ICMP6_ROUTER_SOLICITATION, "router solicitation"),
                (ICMP6_NEIGHBOR_SOLICITATION, "neighbor solicitation"),
                (ICMP6_NEIGHBOR_ADVERTISEMENT, "neighbor advertisement"),
            ] {
                input.push(Rule::new(
                    vec![Match::Icmp6Type(t), Match::Comment(format!("IPv6 {what}"))],
                    Target::Return,
                ));
            }
        }
        input.push(Rule::new(vec![], Target::Jump(names::EGRESS_CHAIN.into())));
        let mut chains = Vec::new();
        if cfg.revoke_denied_connections {
            // Revocation: a flow whose entry was deleted must not resume mid-stream. A pod
            // is guarded when some rule evaluated for it can drop (crate::revoke): an
            // enforced NetworkPolicy, or a ClusterNetworkPolicy Deny of a tier that is
            // evaluated for it. Audit-mode policies never drop anything.
            let isolated = selections
                .pods
                .iter()
                .zip(&selections.cnp)
                .filter(|(s, c)| {
                    let np = s
                        .ingress
                        .iter()
                        .chain(&s.egress)
                        .any(|&q| !model.policies[q].audit);
                    np || [(Dir::Ingress, &s.ingress), (Dir::Egress, &s.egress)]
                        .into_iter()
                        .any(|(dir, nps)| tiers::cnp_can_deny(&model.cnps, c, dir, !nps.is_empty()))
                })
                .map(|(s, _)| (model.pods[s.pod].ip, model.pods[s.pod].key()));
            let jump = crate::revoke::midstream_jump();
            forward.insert(2, jump.clone());
            input.insert(1, jump);
            chains.push(Chain {
                name: names::MIDSTREAM_CHAIN.into(),
                rules: crate::revoke::midstream_rules(isolated),
            });
        }
        if let Some(rules) = antispoof {
            // First: a forged packet could match another pod's conntrack entry.
            let jump = Rule::new(vec![], Target::Jump(names::ANTISPOOF_CHAIN.into()));
            forward.insert(0, jump.clone());
            input.insert(0, jump);
            chains.push(Chain {
                name: names::ANTISPOOF_CHAIN.into(),
                rules,
            });
        }
        chains.extend([
            Chain {
                name: names::FORWARD_CHAIN.into(),
                rules: forward,
            },
            Chain {
                name: names::INPUT_CHAIN.into(),
                rules: input,
            },
        ]);
        chains
    }

    /// Phase 5: The result: `chains`, the sets built along the way, the hooks and the sorted,
    /// deduplicated diagnostics.
    fn finish(&mut self, chains: Vec<Chain>) -> Compiled {
        let mut diagnostics = std::mem::take(&mut self.diags);
        diagnostics.sort();
        diagnostics.dedup();
        Compiled {
            family: self.model.family,
            chains,
            sets: std::mem::take(&mut self.sets.sets),
            hooks: hooks(),
            diagnostics,
            sources: std::mem::take(&mut self.sets.sources),
        }
    }

    /// `PALISADE-ANTISPOOF`: per local pod with a known interface, two rules: drop what enters
    /// from it with another source, and what it sends related to a connection it is not an
    /// endpoint of. IPv6 first lets neighbour discovery through (duplicate address detection
    /// from `::`, link-local solicitations, advertisements and MLD reports), which never
    /// carries a pod's global address. Pods without a known interface become diagnostics.
    fn antispoof(&mut self, cfg: &NodeConfig) -> Vec<Rule> {
        let model = self.model;
        let mut rules = Vec::new();
        if model.family == Family::V6 {
            // Both addresses are constants that always parse; a failure must not widen a
            // rule to every source, so it would only drop the exemption.
            if let Ok(unspecified) = IpNetwork::new(IpAddr::from([0u16; 8]), 128) {
                rules.extend(icmp6_returns(
                    Some(unspecified),
                    &[
                        ICMP6_NEIGHBOR_SOLICITATION,
                        ICMP6_ROUTER_SOLICITATION,
                        ICMP6_MLD2_REPORT,
                    ],
                    "IPv6 DAD / unspecified source",
                ));
            }
            // From a link-local source only what a host sends (solicitations, advertisements
            // of its own addresses, MLD reports): a pod's Router Advertisement, Redirect or
            // echo from `fe80::` meets its own rule below and is dropped.
            if let Ok(ll) = IpNetwork::from_str("fe80::/10") {
                rules.extend(icmp6_returns(
                    Some(ll),
                    &[
                        ICMP6_ROUTER_SOLICITATION,
                        ICMP6_NEIGHBOR_SOLICITATION,
                        ICMP6_NEIGHBOR_ADVERTISEMENT,
                        ICMP6_MLD1_REPORT,
                        ICMP6_MLD1_DONE,
                        ICMP6_MLD2_REPORT,
                    ],
                    "IPv6 link-local neighbour discovery / MLD",
                ));
            }
        }
        for &pi in &model.local {
            let pod = &model.pods[pi];
            let iface = cfg
                .pod_interfaces
                .get(&pod.ip)
                .filter(|i| PodInterface::valid_name(i.name()));
            let Some(iface) = iface else {
                let message = match cfg.pod_interfaces.get(&pod.ip) {
                    Some(i) => format!(
                        "interface name {:?} of pod IP {} cannot be used in a rule; \
                         its source addresses are NOT checked (anti-spoofing)",
                        crate::render::sanitize(i.name(), 40),
                        pod.ip
                    ),
                    None => format!(
                        "no interface found for pod IP {}; its source addresses are NOT \
                         checked (anti-spoofing) until it is",
                        pod.ip
                    ),
                };
                self.diags.push(Diagnostic {
                    kind: "Pod",
                    namespace: Some(pod.ns.to_string()),
                    name: pod.name.to_string(),
                    reason: reasons::POD_INTERFACE_UNKNOWN,
                    message,
                });
                continue;
            };
            let dev = match iface {
                PodInterface::Routed(n) => Match::InIface(n.clone()),
                PodInterface::BridgePort(n) => Match::PhysdevIn(n.clone()),
            };
            rules.push(Rule::new(
                vec![
                    dev.clone(),
                    Match::NotSrc(host_net(pod.ip)),
                    Match::Comment(pod.key()),
                ],
                Target::Drop,
            ));
            // A pod is not a router: what it sends related to a connection (an ICMP error,
            // a helper's data connection) is about one of its own connections. Otherwise it
            // is a forged error smuggled past every policy by the RELATED accept.
            rules.push(Rule::new(
                vec![dev, Match::RelatedNotOf(pod.ip), Match::Comment(pod.key())],
                Target::Drop,
            ));
        }
        rules
    }

    /// The profile chain for a list of policies, created on first use: it clears the mark,
    /// jumps to each policy's chain (a matching rule sets the mark) and, when none allowed,
    /// logs (when the log is on) and drops — or, for a pod isolated only by audit-mode
    /// policies (`audit`), returns with the would-deny comment and lets the packet through.
    fn profile(
        &self,
        dir: Dir,
        policies: &[usize],
        audit: bool,
        policy_chain: &HashMap<(usize, Dir), String>,
        generated: &mut BTreeMap<String, Vec<Rule>>,
    ) -> String {
        let keys: Vec<String> = policies
            .iter()
            .map(|&q| self.model.policies[q].key())
            .collect();
        let prefix = match dir {
            Dir::Ingress => names::INGRESS_PROFILE_PREFIX,
            Dir::Egress => names::EGRESS_PROFILE_PREFIX,
        };
        let key = if audit {
            format!("audit|{}", keys.join(","))
        } else {
            keys.join(",")
        };
        let name = hashed(prefix, &key);
        if generated.contains_key(&name) {
            return name;
        }
        let first = if audit {
            vec![Match::Comment(crate::AUDIT_PROFILE_COMMENT.into())]
        } else {
            vec![]
        };
        let mut rules = vec![Rule::new(first, Target::ClearMark(self.mark))];
        for &q in policies {
            if let Some(chain) = policy_chain.get(&(q, dir)) {
                let pol = &self.model.policies[q];
                let provenance = PolicyRef::network_policy(pol.ns, pol.name);
                rules.push(Rule::new(
                    vec![Match::Comment(provenance.to_string())],
                    Target::Jump(chain.clone()),
                ));
            }
        }
        let unmarked = Match::Mark {
            bit: self.mark,
            negate: true,
        };
        if let Some(log) = &self.deny_log {
            rules.push(log_rule(
                log,
                vec![unmarked.clone()],
                dir == Dir::Egress,
                &name,
            ));
        }
        if audit {
            // The mark is clear exactly when no policy allowed: nothing to clear, just return.
            rules.push(Rule::new(
                vec![unmarked, Match::Comment(crate::WOULD_DENY_COMMENT.into())],
                Target::Return,
            ));
        } else {
            rules.push(Rule::new(vec![unmarked], Target::Drop));
        }
        rules.push(Rule::new(vec![], Target::ClearMark(self.mark)));
        generated.insert(name.clone(), rules);
        name
    }

    /// Appends the iptables rules of one policy rule: (each peer) × (each port group).
    /// One NetworkPolicy rule: a rule per (peer, port group) that sets the mark. Where that
    /// product exceeds [`RULE_PRODUCT_LIMIT`], each peer jumps to a chain of the port groups
    /// instead (a policy of 1,000 peers and 1,000 named ports would otherwise be a million
    /// rules); the verdict is the same. Returns the name of that chain when it made one.
    fn policy_rule(
        &mut self,
        pol: &PolicyInfo<'a>,
        dir: Dir,
        rule: &RuleInfo,
        selected: &[usize],
        out: &mut Vec<Rule>,
        chains: &mut BTreeMap<String, Vec<Rule>>,
    ) -> Option<String> {
        // Peers: `None` = any source/destination.
        let peers: Vec<Option<Match>> = match &rule.peers {
            None => vec![None],
            Some(list) => list.iter().map(|p| Some(self.peer_match(p, dir))).collect(),
        };
        let ports: Vec<Vec<Match>> = match &rule.ports {
            None => vec![vec![]],
            Some(list) => self.port_groups(pol, dir, list, selected),
        };
        let comment = Match::Comment(
            RuleRef {
                policy: PolicyRef::network_policy(pol.ns, pol.name),
                direction: dir.as_str().into(),
                index: rule.index,
            }
            .to_string(),
        );
        if peers.len() > 1 && peers.len() * ports.len() > RULE_PRODUCT_LIMIT {
            let chain = hashed(
                names::RULE_PORTS_PREFIX,
                &format!("{}|{}|{}", pol.key(), dir.as_str(), rule.index),
            );
            let mut port_rules: Vec<Rule> = ports
                .iter()
                .map(|port| {
                    let mut m = port.clone();
                    m.push(comment.clone());
                    Rule::new(m, Target::SetMark(self.mark))
                })
                .collect();
            dedup_rules(&mut port_rules);
            chains.insert(chain.clone(), port_rules);
            for peer in peers.iter().flatten() {
                out.push(Rule::new(
                    vec![peer.clone(), comment.clone()],
                    Target::Jump(chain.clone()),
                ));
            }
            return Some(chain);
        }
        for peer in &peers {
            for port in &ports {
                let mut m = Vec::with_capacity(port.len() + 2);
                if let Some(p) = peer {
                    m.push(p.clone());
                }
                m.extend(port.iter().cloned());
                m.push(comment.clone());
                out.push(Rule::new(m, Target::SetMark(self.mark)));
            }
        }
        None
    }

    fn peer_match(&mut self, peer: &Peer, dir: Dir) -> Match {
        let set_dir = match dir {
            Dir::Ingress => SetDir::Src,
            Dir::Egress => SetDir::Dst,
        };
        match peer {
            Peer::Pods { namespaces, pods } => Match::Set {
                name: self.sets.pods(namespaces, pods),
                dir: set_dir,
            },
            Peer::Block { cidr, except } if except.is_empty() => match dir {
                Dir::Ingress => Match::Src(*cidr),
                Dir::Egress => Match::Dst(*cidr),
            },
            Peer::Block { cidr, except } => Match::Set {
                name: self.sets.block(*cidr, except),
                dir: set_dir,
            },
        }
    }

    /// Port entries → match groups, each one iptables rule: per protocol either "all ports",
    /// or numeric ports merged into `--dport`/`multiport` groups; each named port is a
    /// `hash:ip,port` set matched on destination address and port.
    fn port_groups(
        &mut self,
        pol: &PolicyInfo<'a>,
        dir: Dir,
        list: &[PortInfo],
        selected: &[usize],
    ) -> Vec<Vec<Match>> {
        let mut out = Vec::new();
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
                    let (lo, hi) = chunk[0];
                    Match::DPort(proto, lo, hi)
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
                self.check_named_port(pol, dir, proto, port_name, &set, selected);
                out.push(vec![
                    Match::Proto(proto),
                    Match::Set {
                        name: set,
                        dir: SetDir::DstDst,
                    },
                ]);
            }
        }
        out
    }

    fn check_named_port(
        &mut self,
        pol: &PolicyInfo<'a>,
        dir: Dir,
        proto: Protocol,
        port_name: &str,
        set: &str,
        selected: &[usize],
    ) {
        let known = match dir {
            // Resolved against the selected (destination) pods on this node.
            Dir::Ingress => selected
                .iter()
                .any(|&i| self.model.pods[i].named_port(port_name, proto).is_some()),
            // Resolved against every destination pod.
            Dir::Egress => self
                .sets
                .sets
                .get(set)
                .is_some_and(|s| !s.members.is_empty()),
        };
        if !known {
            let whom = match dir {
                Dir::Ingress => "no pod this policy selects on this node",
                Dir::Egress => "no pod in the cluster",
            };
            self.diags.push(Diagnostic {
                kind: "NetworkPolicy",
                namespace: Some(pol.ns.to_string()),
                name: pol.name.to_string(),
                reason: reasons::UNKNOWN_NAMED_PORT,
                message: format!(
                    "{} port {:?}/{}: {whom} declares it; it matches nothing until one does",
                    dir.as_str(),
                    port_name,
                    proto.as_str().to_uppercase()
                ),
            });
        }
    }
}

/// Hash tables of the denied-traffic log's per-pod limits (per direction; ≤ 15 characters).
pub const HASHLIMIT_INGRESS: &str = "pal-deny-in";
pub const HASHLIMIT_EGRESS: &str = "pal-deny-eg";

/// An NFLOG rule sending what `matches` selects to the denied-traffic log, at most
/// `log.rate` per pod (source pod for egress, destination pod for ingress).
fn log_rule(log: &crate::DenyLog, mut matches: Vec<Match>, egress: bool, prefix: &str) -> Rule {
    matches.push(Match::HashLimit {
        rate: log.rate.clone(),
        burst: log.burst,
        by_src: egress,
        name: if egress {
            HASHLIMIT_EGRESS
        } else {
            HASHLIMIT_INGRESS
        },
    });
    Rule::new(
        matches,
        Target::Nflog {
            prefix: prefix.to_string(),
            group: log.group,
        },
    )
}

pub(crate) fn host_net(ip: IpAddr) -> IpNetwork {
    let prefix = if ip.is_ipv4() { 32 } else { 128 };
    IpNetwork::new(ip, prefix).unwrap_or_else(|_| IpNetwork::from(ip))
}

/// Sorts and merges overlapping or adjacent ranges.
fn merge_ranges(ranges: &mut [(u16, u16)]) -> Vec<(u16, u16)> {
    ranges.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
    for &(lo, hi) in ranges.iter() {
        match out.last_mut() {
            Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// Splits ranges into groups that fit one `multiport` match (15 slots, a range uses two).
fn multiport_chunks(ranges: Vec<(u16, u16)>) -> Vec<Vec<(u16, u16)>> {
    const SLOTS: usize = 15;
    let mut out: Vec<Vec<(u16, u16)>> = Vec::new();
    let mut cur = Vec::new();
    let mut used = 0;
    for r in ranges {
        let cost = if r.0 == r.1 { 1 } else { 2 };
        if used + cost > SLOTS {
            out.push(std::mem::take(&mut cur));
            used = 0;
        }
        cur.push(r);
        used += cost;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `RETURN` for each ICMPv6 type in `types` (from `src` when given), in that order.
fn icmp6_returns(src: Option<IpNetwork>, types: &[u8], comment: &str) -> Vec<Rule> {
    types
        .iter()
        .map(|&t| {
            let mut m: Vec<Match> = src.map(Match::Src).into_iter().collect();
            m.push(Match::Icmp6Type(t));
            m.push(Match::Comment(comment.into()));
            Rule::new(m, Target::Return)
        })
        .collect()
}

/// Most ipsets (per family) the NetworkPolicies of one namespace may create on a node.
pub const NAMESPACE_SET_BUDGET: usize = 2_048;
/// Most ipsets (per family) on a node from NetworkPolicies: with both families and the
/// temporary twins of a swap, 4 × 15,000 stays under the kernel's 65,534.
pub const NODE_SET_BUDGET: usize = 15_000;

/// Above this many (peer, port group) pairs one NetworkPolicy rule becomes a jump per peer to
/// a chain of its port groups.
pub const RULE_PRODUCT_LIMIT: usize = 256;

/// Drops repeated rules (keeps the first).
fn dedup_rules(rules: &mut Vec<Rule>) {
    let mut seen = std::collections::HashSet::new();
    rules.retain(|r| seen.insert(r.clone()));
}

/// (protocol, port name) → (pod IP, port) of every active pod declaring it.
type NamedIndex<'m> = HashMap<(Protocol, &'m str), Vec<(IpAddr, u16)>>;

/// Builds each set once (by identity) and computes its members.
struct SetBuilder<'m, 'a> {
    model: &'m Model<'a>,
    sets: BTreeMap<String, IpSet>,
    sources: BTreeMap<String, SetSource>,
    ns_cache: HashMap<Selector, Vec<&'a str>>,
    named_index: NamedIndex<'m>,
    /// Names of the sets in creation order (to undo a policy's over budget).
    created: Vec<String>,
}

impl<'m, 'a> SetBuilder<'m, 'a> {
    fn new(model: &'m Model<'a>) -> Self {
        SetBuilder {
            model,
            sets: BTreeMap::new(),
            sources: BTreeMap::new(),
            ns_cache: HashMap::new(),
            named_index: HashMap::new(),
            created: Vec::new(),
        }
    }

    /// Forgets the sets created after the first `keep`.
    fn roll_back(&mut self, keep: usize) {
        for name in self.created.drain(keep..) {
            self.sets.remove(&name);
            self.sources.remove(&name);
        }
    }

    fn insert(
        &mut self,
        kind: SetKind,
        identity: String,
        source: impl FnOnce() -> SetSource,
        members: impl FnOnce(&mut Self) -> BTreeSet<SetMember>,
    ) -> String {
        let family = self.model.family;
        let name = hashed(
            &kind.prefix(family),
            &format!("{}|{identity}", family.tag()),
        );
        if !self.sets.contains_key(&name) {
            let members = members(self);
            self.created.push(name.clone());
            self.sources.insert(name.clone(), source());
            self.sets.insert(
                name.clone(),
                IpSet {
                    name: name.clone(),
                    kind,
                    family,
                    identity,
                    members,
                },
            );
        }
        name
    }

    /// Namespaces (with at least one active pod) matching a namespace selector.
    fn namespaces(&mut self, sel: &Selector) -> Vec<&'a str> {
        if let Some(hit) = self.ns_cache.get(sel) {
            return hit.clone();
        }
        let model = self.model;
        let labels_of = |ns: &'a str| NamespaceLabels {
            name: ns,
            labels: model.ns_labels.get(ns).copied(),
        };
        let out: Vec<&'a str> = match sel.single_namespace() {
            Some(one) => model
                .pods_by_ns
                .get_key_value(one)
                .map(|(k, _)| *k)
                .filter(|ns| sel.matches(&labels_of(ns)))
                .into_iter()
                .collect(),
            None => model
                .pods_by_ns
                .keys()
                .copied()
                .filter(|ns| sel.matches(&labels_of(ns)))
                .collect(),
        };
        self.ns_cache.insert(sel.clone(), out.clone());
        out
    }

    fn pods(&mut self, namespaces: &Selector, pods: &Selector) -> String {
        let identity = format!("pods ns:{namespaces} pod:{pods}");
        let source = || SetSource::Pods {
            namespaces: namespaces.clone(),
            pods: pods.clone(),
        };
        self.insert(SetKind::HashIp, identity, source, |this| {
            let model = this.model;
            let mut members = BTreeSet::new();
            for ns in this.namespaces(namespaces) {
                for &i in model.pods_by_ns.get(ns).into_iter().flatten() {
                    let p: &PodInfo = &model.pods[i];
                    if pods.matches(p.labels) {
                        members.insert(SetMember::Ip(p.ip));
                    }
                }
            }
            members
        })
    }

    fn block(&mut self, cidr: IpNetwork, except: &[IpNetwork]) -> String {
        let ex: Vec<String> = except.iter().map(ToString::to_string).collect();
        let identity = format!("block {cidr} except {}", ex.join(","));
        self.insert(
            SetKind::HashNet,
            identity,
            || SetSource::Block,
            |_| {
                let mut members = BTreeSet::new();
                for net in split_zero(cidr) {
                    members.insert(SetMember::Net {
                        net,
                        nomatch: false,
                    });
                }
                for e in except {
                    for net in split_zero(*e) {
                        members.insert(SetMember::Net { net, nomatch: true });
                    }
                }
                // An except equal to the cidr cancels it: keep only the nomatch entry.
                let nomatched: BTreeSet<IpNetwork> = members
                    .iter()
                    .filter_map(|m| match m {
                        SetMember::Net { net, nomatch: true } => Some(*net),
                        _ => None,
                    })
                    .collect();
                members.retain(|m| match m {
                    SetMember::Net {
                        net,
                        nomatch: false,
                    } => !nomatched.contains(net),
                    _ => true,
                });
                members
            },
        )
    }

    fn named_port(&mut self, proto: Protocol, port_name: &str) -> String {
        let identity = format!("named-port {}/{port_name}", proto.as_str());
        let source = || SetSource::NamedPort {
            proto,
            name: port_name.to_string(),
        };
        self.insert(SetKind::HashIpPort, identity, source, |this| {
            this.named_index
                .get(&(proto, port_name))
                .into_iter()
                .flatten()
                .map(|&(ip, port)| SetMember::IpPort { ip, proto, port })
                .collect()
        })
    }

    /// Scans every active pod's container ports once for the referenced names.
    fn index_named_ports(&mut self, referenced: Vec<(Protocol, &'m str)>) {
        let mut index: NamedIndex<'m> = referenced.into_iter().map(|k| (k, Vec::new())).collect();
        if index.is_empty() {
            self.named_index = index;
            return;
        }
        for p in &self.model.pods {
            let Some(spec) = p.pod.spec.as_ref() else {
                continue;
            };
            for cp in spec
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
            {
                let Some(name) = cp.name.as_deref() else {
                    continue;
                };
                let Ok(port) = u16::try_from(cp.container_port) else {
                    continue;
                };
                if port == 0 {
                    continue;
                }
                let Some(proto) = Protocol::parse(cp.protocol.as_deref()) else {
                    continue;
                };
                if let Some(members) = index.get_mut(&(proto, name)) {
                    members.push((p.ip, port));
                }
            }
        }
        self.named_index = index;
    }
}

/// hash:net cannot hold a /0: split it into two halves.
fn split_zero(net: IpNetwork) -> Vec<IpNetwork> {
    if net.prefix() != 0 {
        return vec![net];
    }
    let halves: [(IpAddr, u8); 2] = match net {
        IpNetwork::V4(_) => [
            (IpAddr::from([0u8, 0, 0, 0]), 1),
            (IpAddr::from([128u8, 0, 0, 0]), 1),
        ],
        IpNetwork::V6(_) => [
            (IpAddr::from([0u16; 8]), 1),
            (IpAddr::from([0x8000u16, 0, 0, 0, 0, 0, 0, 0]), 1),
        ],
    };
    halves
        .iter()
        .filter_map(|(ip, p)| IpNetwork::new(*ip, *p).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_chunk() {
        let mut r = vec![(80, 80), (443, 443), (81, 90), (85, 100), (8000, 9000)];
        assert_eq!(
            merge_ranges(&mut r),
            vec![(80, 100), (443, 443), (8000, 9000)]
        );
        let many: Vec<(u16, u16)> = (1..=20).map(|p| (p * 10, p * 10)).collect();
        let chunks = multiport_chunks(many);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].len(), 15);
        let ranges: Vec<(u16, u16)> = (1..=9).map(|p| (p * 10, p * 10 + 1)).collect();
        let chunks = multiport_chunks(ranges);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), vec![7, 2]);
    }

    #[test]
    fn set_members_round_trip_through_ipset_text() {
        let cases = [
            (SetKind::HashIp, "10.0.0.1"),
            (SetKind::HashNet, "10.0.0.0/8"),
            (SetKind::HashNet, "10.1.0.0/16 nomatch"),
            (SetKind::HashNet, "10.2.0.5"),
            (SetKind::HashIpPort, "10.0.0.1,sctp:80"),
        ];
        for (kind, text) in cases {
            let m = SetMember::parse(kind, text).expect(text);
            assert_eq!(m.to_string(), text);
        }
        assert!(SetMember::parse(SetKind::HashIpPort, "10.0.0.1,icmp:0").is_none());
    }

    #[test]
    fn zero_prefix_is_split() {
        let n: IpNetwork = "0.0.0.0/0".parse().unwrap();
        let halves: Vec<String> = split_zero(n).iter().map(ToString::to_string).collect();
        assert_eq!(halves, vec!["0.0.0.0/1", "128.0.0.0/1"]);
    }
}
