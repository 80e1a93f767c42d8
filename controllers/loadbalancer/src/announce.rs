//! Layer-2 announcement: which node answers ARP/NDP for a LoadBalancer IP, and on which
//! interfaces. Pure: every agent runs the same functions on the same inputs and reaches the
//! same answer alone, without talking to the others (MetalLB's `layer2` idea).
//!
//! ```text
//!  L2Advertisements ──► advertisements_for_pool(pool, pool labels) ──► ads for this IP
//!                                                                       │
//!  live nodes + labels ──► eligible_nodes(ads, nodes, Local? endpoints) ┤
//!                                                                       ▼
//!                      should_announce(me, ip, eligible) ─► Decision { announce, reason, winner }
//!                                                   │
//!                      winner = argmin sha256("<node>#<ip>")
//!                                                                       │
//!  my labels ──► interfaces_for(ads, my labels) ─► InterfaceChoice ─────┘ (if announce)
//! ```
//!
//! * A pool is announced by an advertisement that names it in `ipAddressPools`, or whose
//!   `ipAddressPoolSelectors` match the pool's labels; an advertisement with both lists empty
//!   announces every pool.
//! * A node may announce when any selected advertisement's `nodeSelectors` match it (an empty
//!   list matches every node), it is not labelled
//!   [`EXCLUDE_FROM_LB_LABEL`] (the well-known Kubernetes label, honoured like MetalLB does),
//!   and, for `externalTrafficPolicy: Local`, it has a ready local endpoint.
//! * "Live" is not decided here: the caller passes only nodes whose agent it believes alive.
//! * The winner is the eligible node with the smallest `sha256("<node>#<ip>")` (ties, which
//!   would need a hash collision, go to the smaller name). Removing a node that is not the
//!   winner never moves the IP; IPs spread evenly over nodes.
//! * `preferredNodeSelectors` (soft, weighted) only narrow the hash election to the eligible
//!   nodes with the highest [`preference_score`] ([`preferred_winner`]): still a pure
//!   function of the shared inputs, so every agent agrees without talking.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use sha2::{Digest, Sha256};

use crate::crd::L2AdvertisementSpec;
use crate::selector;

/// This node won the election and must announce the IP.
pub const REASON_ELECTED: &str = "Elected";
/// This node is eligible but another node won.
pub const REASON_NOT_ELECTED: &str = "NotElected";
/// This node is not among the eligible nodes (selectors, exclusion label, no local endpoint).
pub const REASON_NOT_ELIGIBLE: &str = "NotEligible";
/// No node at all may announce the IP.
pub const REASON_NO_ELIGIBLE_NODE: &str = "NoEligibleNode";

/// Nodes carrying this label (any value) never announce LoadBalancer IPs.
pub const EXCLUDE_FROM_LB_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

type Labels = BTreeMap<String, String>;

/// The election key of `node` for an IP in its canonical text form (`198.51.100.200`,
/// `fd00:51:100::200`): `sha256("<node>#<ip>")`.
pub(crate) fn election_key(node: &str, ip_text: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(node.as_bytes());
    h.update(b"#");
    h.update(ip_text.as_bytes());
    h.finalize().into()
}

/// The node that announces `ip` among `eligible`: the smallest `sha256("<node>#<ip>")`, ties
/// broken by name. `None` when `eligible` is empty. Duplicates in `eligible` are harmless.
pub fn winner<'a>(ip: IpAddr, eligible: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let ip_text = ip.to_string();
    eligible
        .into_iter()
        .map(|node| (election_key(node, &ip_text), node))
        .min()
        .map(|(_, node)| node)
}

/// The outcome of [`should_announce`] for one node and one IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Should this node answer ARP/NDP for the IP?
    pub announce: bool,
    /// One of [`REASON_ELECTED`], [`REASON_NOT_ELECTED`], [`REASON_NOT_ELIGIBLE`],
    /// [`REASON_NO_ELIGIBLE_NODE`].
    pub reason: &'static str,
    /// The node that announces the IP, if any node may.
    pub winner: Option<String>,
}

/// Should `node` announce `ip`, given the eligible nodes (all agents compute the same list)?
pub fn should_announce(node: &str, ip: IpAddr, eligible: &[&str]) -> Decision {
    decision_with_winner(node, eligible, winner(ip, eligible.iter().copied()))
}

/// [`should_announce`] when the winner among `eligible` is already known (remembered from an
/// earlier election over the same set).
pub fn decision_with_winner(node: &str, eligible: &[&str], winner: Option<&str>) -> Decision {
    let Some(w) = winner else {
        return Decision {
            announce: false,
            reason: REASON_NO_ELIGIBLE_NODE,
            winner: None,
        };
    };
    let (announce, reason) = if !eligible.contains(&node) {
        (false, REASON_NOT_ELIGIBLE)
    } else if w == node {
        (true, REASON_ELECTED)
    } else {
        (false, REASON_NOT_ELECTED)
    };
    Decision {
        announce,
        reason,
        winner: Some(w.to_owned()),
    }
}

/// Does `ad` announce the pool `pool_name` with labels `pool_labels`? Names and selectors are
/// OR-ed; both empty means every pool.
pub fn advertisement_selects_pool(
    ad: &L2AdvertisementSpec,
    pool_name: &str,
    pool_labels: &Labels,
) -> bool {
    if ad.ip_address_pools.is_empty() && ad.ip_address_pool_selectors.is_empty() {
        return true;
    }
    ad.ip_address_pools.iter().any(|p| p == pool_name)
        || ad
            .ip_address_pool_selectors
            .iter()
            .any(|s| selector::matches(s, pool_labels))
}

/// The advertisements (in input order) that announce the pool `pool_name`.
pub fn advertisements_for_pool<'a>(
    ads: impl IntoIterator<Item = &'a L2AdvertisementSpec>,
    pool_name: &str,
    pool_labels: &Labels,
) -> Vec<&'a L2AdvertisementSpec> {
    ads.into_iter()
        .filter(|ad| advertisement_selects_pool(ad, pool_name, pool_labels))
        .collect()
}

/// Do `ad`'s `nodeSelectors` allow a node with `node_labels`? Empty list: every node.
pub fn node_matches(ad: &L2AdvertisementSpec, node_labels: &Labels) -> bool {
    selector::any_api_matches(&ad.node_selectors, node_labels)
}

/// Is the node opted out of LoadBalancer announcements ([`EXCLUDE_FROM_LB_LABEL`])?
pub fn node_excluded(node_labels: &Labels) -> bool {
    node_labels.contains_key(EXCLUDE_FROM_LB_LABEL)
}

/// How an IP's traffic reaches endpoints, from `spec.externalTrafficPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficPolicy<'a> {
    /// `Cluster` (the default): any matching node may announce.
    Cluster,
    /// `Local`: only nodes in this set (nodes with a ready local endpoint) may announce.
    Local(&'a BTreeSet<String>),
}

/// The nodes that may announce an IP, sorted and without duplicates.
///
/// `ads` are the advertisements for the IP's pool ([`advertisements_for_pool`]); `nodes` are
/// the live nodes as `(name, labels)`. No advertisement: no eligible node.
pub fn eligible_nodes<'n>(
    ads: &[&L2AdvertisementSpec],
    nodes: impl IntoIterator<Item = (&'n str, &'n Labels)>,
    policy: TrafficPolicy<'_>,
) -> Vec<String> {
    let set: BTreeSet<&str> = nodes
        .into_iter()
        .filter(|(name, labels)| {
            !node_excluded(labels)
                && ads.iter().any(|ad| node_matches(ad, labels))
                && match policy {
                    TrafficPolicy::Cluster => true,
                    TrafficPolicy::Local(ready) => ready.contains(*name),
                }
        })
        .map(|(name, _)| name)
        .collect();
    set.into_iter().map(str::to_owned).collect()
}

/// The weights a preference may carry (`spec.preferredNodeSelectors[].weight`, as in
/// Kubernetes' preferred node affinity). The CRD rejects others; a term outside the range
/// that reaches an agent anyway (an older CRD installed) counts nothing.
pub const PREFERENCE_WEIGHTS: std::ops::RangeInclusive<i32> = 1..=100;

/// A node's preference score for a pool: the summed weights of the matching
/// `preferredNodeSelectors` terms of every advertisement `ads` of the pool (advertisements
/// add up, like MetalLB's). Malformed selectors and out-of-range weights count nothing.
pub fn preference_score(ads: &[&L2AdvertisementSpec], node_labels: &Labels) -> u32 {
    ads.iter()
        .flat_map(|ad| ad.preferred_node_selectors.iter())
        .filter(|p| PREFERENCE_WEIGHTS.contains(&p.weight))
        .filter(|p| selector::matches(&p.preference, node_labels))
        .map(|p| p.weight.unsigned_abs())
        .sum()
}

/// What is wrong with `ad`'s `preferredNodeSelectors`: one line per term that
/// [`preference_score`] ignores (a malformed `preference` — unknown operator, `In`/`NotIn`
/// without values, `Exists`/`DoesNotExist` with values — or a weight outside
/// [`PREFERENCE_WEIGHTS`]). Only that term is ignored; the other terms and the rest of the
/// advertisement keep working. Empty: every term counts.
pub fn preference_problems(ad: &L2AdvertisementSpec) -> Vec<String> {
    ad.preferred_node_selectors
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            if !PREFERENCE_WEIGHTS.contains(&p.weight) {
                return Some(format!(
                    "preferredNodeSelectors[{i}]: weight {} is outside {}..{}; the term is ignored",
                    p.weight,
                    PREFERENCE_WEIGHTS.start(),
                    PREFERENCE_WEIGHTS.end()
                ));
            }
            selector::validate(&p.preference).err().map(|e| {
                format!("preferredNodeSelectors[{i}].preference: {e}; the term is ignored")
            })
        })
        .collect()
}

/// The most preferred of `eligible`: the nodes with the highest score (all of them when no
/// node scores anything, so without preferences the election is unchanged). Order kept.
pub fn most_preferred<'n>(eligible: &[&'n str], score: impl Fn(&str) -> u32) -> Vec<&'n str> {
    let best = eligible.iter().map(|n| score(n)).max().unwrap_or(0);
    eligible
        .iter()
        .copied()
        .filter(|n| score(n) == best)
        .collect()
}

/// The winner under preferences: the smallest hash among [`most_preferred`] nodes.
pub fn preferred_winner<'n>(
    ip: IpAddr,
    eligible: &[&'n str],
    score: impl Fn(&str) -> u32,
) -> Option<&'n str> {
    winner(ip, most_preferred(eligible, score))
}

/// Where a node answers for an IP it announces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceChoice {
    /// Some matching advertisement lists no interface: answer on the interface that holds
    /// the route to the IP (the speaker resolves it, `palisade_speaker::route_interface`).
    pub route_interface: bool,
    /// Interfaces named by matching advertisements, sorted, without duplicates.
    pub named: Vec<String>,
}

impl InterfaceChoice {
    /// True when nothing would be announced (no advertisement matched the node).
    pub fn is_empty(&self) -> bool {
        !self.route_interface && self.named.is_empty()
    }
}

/// The interfaces a node with `node_labels` announces on, from the advertisements of the IP's
/// pool that match the node: the union of their `interfaces`, plus the route interface when any
/// of them lists none. `None` when no advertisement matches the node.
pub fn interfaces_for(
    ads: &[&L2AdvertisementSpec],
    node_labels: &Labels,
) -> Option<InterfaceChoice> {
    let mut choice = InterfaceChoice::default();
    let mut named = BTreeSet::new();
    let mut any = false;
    for ad in ads.iter().filter(|ad| node_matches(ad, node_labels)) {
        any = true;
        if ad.interfaces.is_empty() {
            choice.route_interface = true;
        }
        named.extend(ad.interfaces.iter().cloned());
    }
    choice.named = named.into_iter().collect();
    any.then_some(choice)
}

/// One interface a node's agent can announce on, as it reports it over the membership.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReachInterface {
    pub name: String,
    /// Up and running (carrier).
    pub up: bool,
    /// The interface's subnets: (network address, prefix length).
    pub nets: Vec<(IpAddr, u8)>,
}

/// Where a node can announce at layer 2: its interfaces (what its agent reported).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeReach {
    pub interfaces: Vec<ReachInterface>,
}

/// Whether `ip` lies in `net`/`len` (same family only; lengths beyond the family are no match).
pub fn net_contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    let mask = |bits: u32, len: u8| -> Option<u128> {
        let len = u32::from(len);
        (len <= bits).then(|| {
            if len == 0 {
                0
            } else {
                (u128::MAX << (128 - len)) >> (128 - bits)
            }
        })
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => mask(32, len)
            .is_some_and(|m| (u128::from(u32::from(n)) & m) == (u128::from(u32::from(i)) & m)),
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            mask(128, len).is_some_and(|m| (u128::from(n) & m) == (u128::from(i) & m))
        }
        _ => false,
    }
}

impl NodeReach {
    /// Whether a node with this reach can announce `ip` on what `choice` selects: a named
    /// interface that is up (explicitly listed: no subnet needed, e.g. a VLAN without an
    /// address), or — when the advertisement leaves the interface to the route — an up
    /// interface on the IP's subnet. A node whose only way to the IP is its default route
    /// would answer where no client can hear it (MetalLB #511).
    pub fn can_announce(&self, ip: IpAddr, choice: &InterfaceChoice) -> bool {
        self.interfaces.iter().filter(|i| i.up).any(|i| {
            choice.named.contains(&i.name)
                || (choice.route_interface
                    && i.nets.iter().any(|(net, len)| net_contains(*net, *len, ip)))
        })
    }
}

/// Narrows `eligible` to the nodes that can announce `ip` ([`NodeReach::can_announce`] with
/// each node's own [`InterfaceChoice`]). A node that reported nothing (an agent of an older
/// version, or not heard yet) is kept. When no node can, `eligible` is returned unchanged, so
/// a pool that is on no node's subnet keeps being announced as before. Pure and the same on
/// every agent given the same reports, so the election stays coordination-free.
pub fn reachable_nodes<'n, 'c>(
    eligible: &[&'n str],
    ip: IpAddr,
    reach: &BTreeMap<String, NodeReach>,
    choice_of: impl Fn(&str) -> Option<&'c InterfaceChoice>,
) -> Vec<&'n str> {
    let able: Vec<&str> = eligible
        .iter()
        .copied()
        .filter(|n| match reach.get(*n) {
            None => true,
            Some(r) => choice_of(n).is_some_and(|c| r.can_announce(ip, c)),
        })
        .collect();
    if able.is_empty() {
        eligible.to_vec()
    } else {
        able
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: Some(labels(pairs)),
            match_expressions: None,
        }
    }

    fn mk_ad(
        pools: &[&str],
        pool_sel: Vec<LabelSelector>,
        node_sel: Vec<LabelSelector>,
        ifs: &[&str],
    ) -> L2AdvertisementSpec {
        L2AdvertisementSpec {
            ip_address_pools: pools.iter().map(|s| s.to_string()).collect(),
            ip_address_pool_selectors: pool_sel,
            node_selectors: node_sel,
            interfaces: ifs.iter().map(|s| s.to_string()).collect(),
            preferred_node_selectors: Vec::new(),
        }
    }

    #[test]
    fn winner_is_smallest_hash_and_order_independent() {
        let vip = ip("198.51.100.200");
        let nodes = ["node-a", "node-b", "node-c", "node-d"];
        let w = winner(vip, nodes).unwrap();
        let expected = nodes
            .iter()
            .min_by_key(|n| Sha256::digest(format!("{n}#198.51.100.200")))
            .unwrap();
        assert_eq!(w, *expected);
        let mut rev = nodes;
        rev.reverse();
        assert_eq!(winner(vip, rev), Some(w));
        assert_eq!(
            winner(vip, nodes.iter().chain(nodes.iter()).copied()),
            Some(w)
        );
        assert_eq!(winner(vip, std::iter::empty()), None);
    }

    #[test]
    fn election_key_uses_canonical_ipv6_text() {
        let a = election_key("n1", &ip("fd00:51:100:0:0:0:0:200").to_string());
        let b: [u8; 32] = Sha256::digest("n1#fd00:51:100::200").into();
        assert_eq!(a, b);
    }

    #[test]
    fn should_announce_reasons() {
        let vip = ip("198.51.100.201");
        let eligible = ["n1", "n2", "n3"];
        let w = winner(vip, eligible).unwrap();
        let d = should_announce(w, vip, &eligible);
        assert_eq!(
            d,
            Decision {
                announce: true,
                reason: REASON_ELECTED,
                winner: Some(w.into())
            }
        );
        for other in eligible.iter().filter(|n| **n != w) {
            let d = should_announce(other, vip, &eligible);
            assert!(!d.announce);
            assert_eq!(d.reason, REASON_NOT_ELECTED);
            assert_eq!(d.winner.as_deref(), Some(w));
        }
        let d = should_announce("n9", vip, &eligible);
        assert_eq!((d.announce, d.reason), (false, REASON_NOT_ELIGIBLE));
        assert_eq!(d.winner.as_deref(), Some(w));
        let d = should_announce("n1", vip, &[]);
        assert_eq!(
            d,
            Decision {
                announce: false,
                reason: REASON_NO_ELIGIBLE_NODE,
                winner: None
            }
        );
    }

    #[test]
    fn exactly_one_node_announces_each_ip() {
        let eligible = ["n1", "n2", "n3", "n4", "n5"];
        for i in 0..=255u8 {
            let vip = IpAddr::from([198, 51, 100, i]);
            let n = eligible
                .iter()
                .filter(|node| should_announce(node, vip, &eligible).announce)
                .count();
            assert_eq!(n, 1, "{vip}");
        }
    }

    #[test]
    fn removing_a_non_winner_does_not_move_the_ip() {
        let all = ["n1", "n2", "n3", "n4", "n5", "n6"];
        for i in 0..200u8 {
            let vip = IpAddr::from([198, 51, 100, i]);
            let w = winner(vip, all).unwrap();
            for gone in all.iter().filter(|n| **n != w) {
                let rest: Vec<&str> = all.iter().copied().filter(|n| n != gone).collect();
                assert_eq!(
                    winner(vip, rest.iter().copied()),
                    Some(w),
                    "{vip} without {gone}"
                );
            }
            // Adding a node moves the IP only to the new node.
            let mut more = all.to_vec();
            more.push("n7");
            let w2 = winner(vip, more.iter().copied()).unwrap();
            assert!(w2 == w || w2 == "n7");
        }
    }

    #[test]
    fn many_ips_spread_evenly() {
        let nodes = ["node-1", "node-2", "node-3"];
        let mut count = BTreeMap::<&str, u32>::new();
        let n = 3000u32;
        for i in 0..n {
            let vip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            *count.entry(winner(vip, nodes).unwrap()).or_default() += 1;
        }
        for node in nodes {
            let c = count[node];
            // 1000 expected; sigma ~ 26, allow ~6 sigma.
            assert!((850..=1150).contains(&c), "{node}: {c} of {n} ({count:?})");
        }
        // IPv6 too.
        let mut count6 = BTreeMap::<&str, u32>::new();
        for i in 0..n {
            let vip = IpAddr::from(std::net::Ipv6Addr::from(
                0xfd00_0051_0100_u128 << 80 | i as u128,
            ));
            *count6.entry(winner(vip, nodes).unwrap()).or_default() += 1;
        }
        assert!(
            count6.values().all(|c| (850..=1150).contains(c)),
            "{count6:?}"
        );
    }

    #[test]
    fn pool_selection() {
        let gold = labels(&[("tier", "gold")]);
        let none = Labels::new();
        let all = mk_ad(&[], vec![], vec![], &[]);
        assert!(advertisement_selects_pool(&all, "any", &none));

        let by_name = mk_ad(&["lan"], vec![], vec![], &[]);
        assert!(advertisement_selects_pool(&by_name, "lan", &none));
        assert!(!advertisement_selects_pool(&by_name, "other", &gold));

        let by_sel = mk_ad(&[], vec![sel(&[("tier", "gold")])], vec![], &[]);
        assert!(advertisement_selects_pool(&by_sel, "x", &gold));
        assert!(!advertisement_selects_pool(&by_sel, "x", &none));

        // Names and selectors are OR-ed.
        let both = mk_ad(&["lan"], vec![sel(&[("tier", "gold")])], vec![], &[]);
        assert!(advertisement_selects_pool(&both, "lan", &none));
        assert!(advertisement_selects_pool(&both, "x", &gold));
        assert!(!advertisement_selects_pool(&both, "x", &none));

        // A malformed selector selects nothing, never everything.
        let bad = mk_ad(
            &[],
            vec![LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "Bogus".into(),
                    values: None,
                }]),
            }],
            vec![],
            &[],
        );
        assert!(!advertisement_selects_pool(&bad, "x", &gold));

        let ads = [by_name.clone(), by_sel.clone(), all.clone()];
        let got = advertisements_for_pool(&ads, "lan", &none);
        assert_eq!(got, vec![&by_name, &all]);
        let got = advertisements_for_pool(&ads, "x", &gold);
        assert_eq!(got, vec![&by_sel, &all]);
    }

    #[test]
    fn eligibility_with_node_selectors_and_exclusion() {
        let zone_a = labels(&[("zone", "a")]);
        let zone_b = labels(&[("zone", "b")]);
        let excluded = labels(&[("zone", "a"), (EXCLUDE_FROM_LB_LABEL, "")]);
        let nodes = [
            ("n1", &zone_a),
            ("n2", &zone_b),
            ("n3", &excluded),
            ("n1", &zone_a),
        ];

        let only_a = mk_ad(&[], vec![], vec![sel(&[("zone", "a")])], &[]);
        assert_eq!(
            eligible_nodes(&[&only_a], nodes, TrafficPolicy::Cluster),
            ["n1"]
        );

        let anywhere = mk_ad(&[], vec![], vec![], &[]);
        assert_eq!(
            eligible_nodes(&[&only_a, &anywhere], nodes, TrafficPolicy::Cluster),
            ["n1", "n2"]
        );
        // Two selectors in one advertisement are OR-ed.
        let a_or_b = mk_ad(
            &[],
            vec![],
            vec![sel(&[("zone", "a")]), sel(&[("zone", "b")])],
            &[],
        );
        assert_eq!(
            eligible_nodes(&[&a_or_b], nodes, TrafficPolicy::Cluster),
            ["n1", "n2"]
        );
        // No advertisement for the pool: nobody announces.
        assert!(eligible_nodes(&[], nodes, TrafficPolicy::Cluster).is_empty());
    }

    #[test]
    fn local_policy_needs_a_ready_endpoint() {
        let l = Labels::new();
        let nodes = [("n1", &l), ("n2", &l), ("n3", &l)];
        let ad = mk_ad(&[], vec![], vec![], &[]);
        let ready: BTreeSet<String> = ["n2".to_string(), "n9".to_string()].into();
        let eligible = eligible_nodes(&[&ad], nodes, TrafficPolicy::Local(&ready));
        assert_eq!(eligible, ["n2"]);
        let refs: Vec<&str> = eligible.iter().map(String::as_str).collect();
        let vip = ip("198.51.100.210");
        assert!(should_announce("n2", vip, &refs).announce);
        assert_eq!(
            should_announce("n1", vip, &refs).reason,
            REASON_NOT_ELIGIBLE
        );
        let empty = BTreeSet::new();
        let eligible = eligible_nodes(&[&ad], nodes, TrafficPolicy::Local(&empty));
        assert!(eligible.is_empty());
        assert_eq!(
            should_announce("n1", vip, &[]).reason,
            REASON_NO_ELIGIBLE_NODE
        );
    }

    #[test]
    fn interface_choice_is_the_union_of_matching_advertisements() {
        let a = labels(&[("zone", "a")]);
        let b = labels(&[("zone", "b")]);
        let eth1 = mk_ad(&[], vec![], vec![], &["eth1", "eth0"]);
        let eth2_a = mk_ad(&[], vec![], vec![sel(&[("zone", "a")])], &["eth2", "eth1"]);
        let route_b = mk_ad(&[], vec![], vec![sel(&[("zone", "b")])], &[]);

        let got = interfaces_for(&[&eth1, &eth2_a, &route_b], &a).unwrap();
        assert_eq!(
            got,
            InterfaceChoice {
                route_interface: false,
                named: vec!["eth0".into(), "eth1".into(), "eth2".into()]
            }
        );
        let got = interfaces_for(&[&eth1, &eth2_a, &route_b], &b).unwrap();
        assert!(got.route_interface);
        assert_eq!(got.named, ["eth0", "eth1"]);
        assert!(!got.is_empty());
        assert_eq!(interfaces_for(&[&eth2_a], &b), None);
        assert_eq!(
            interfaces_for(&[&route_b], &b),
            Some(InterfaceChoice {
                route_interface: true,
                named: vec![]
            })
        );
    }

    #[test]
    fn malformed_preference_terms_are_named_and_only_they_are_ignored() {
        let spec: L2AdvertisementSpec = serde_json::from_value(serde_json::json!({
            "preferredNodeSelectors": [
                {"weight": 100, "preference": {"matchExpressions": [{"key": "edge", "operator": "Bogus"}]}},
                {"weight": 90, "preference": {"matchExpressions": [{"key": "rack", "operator": "Exists", "values": ["r1"]}]}},
                {"weight": 1000, "preference": {"matchLabels": {"zone": "c"}}},
                {"weight": 0, "preference": {"matchLabels": {"zone": "c"}}},
                {"weight": 30, "preference": {"matchLabels": {"zone": "a"}}}
            ]
        }))
        .unwrap();
        let problems = preference_problems(&spec);
        assert_eq!(problems.len(), 4, "{problems:?}");
        for (i, p) in problems.iter().enumerate() {
            assert!(
                p.starts_with(&format!("preferredNodeSelectors[{i}]")),
                "{p}"
            );
            assert!(p.ends_with("the term is ignored"), "{p}");
        }
        assert!(problems[0].contains("Bogus"), "{}", problems[0]);
        assert!(problems[2].contains("1000"), "{}", problems[2]);
        // Only the valid term counts: a node matching every broken term scores nothing from them.
        let everything = labels(&[("edge", ""), ("rack", "r1"), ("zone", "c")]);
        assert_eq!(preference_score(&[&spec], &everything), 0);
        assert_eq!(preference_score(&[&spec], &labels(&[("zone", "a")])), 30);
        let fine = mk_ad(&[], vec![], vec![], &[]);
        assert!(preference_problems(&fine).is_empty());
    }

    fn reach(ifaces: &[(&str, bool, &[&str])]) -> NodeReach {
        NodeReach {
            interfaces: ifaces
                .iter()
                .map(|(name, up, nets)| ReachInterface {
                    name: name.to_string(),
                    up: *up,
                    nets: nets
                        .iter()
                        .map(|n| {
                            let (a, l) = n.split_once('/').unwrap();
                            (a.parse().unwrap(), l.parse().unwrap())
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn net_contains_checks_family_and_prefix() {
        assert!(net_contains(ip("198.51.100.0"), 24, ip("198.51.100.200")));
        assert!(!net_contains(ip("198.51.100.0"), 24, ip("198.51.101.200")));
        assert!(net_contains(ip("0.0.0.0"), 0, ip("203.0.113.1")));
        assert!(net_contains(ip("198.51.100.7"), 32, ip("198.51.100.7")));
        assert!(!net_contains(ip("198.51.100.0"), 33, ip("198.51.100.0")));
        assert!(net_contains(
            ip("fd00:51:100::"),
            64,
            ip("fd00:51:100::200")
        ));
        assert!(!net_contains(
            ip("fd00:51:100::"),
            64,
            ip("fd00:51:101::200")
        ));
        assert!(!net_contains(ip("fd00::"), 129, ip("fd00::")));
        assert!(!net_contains(
            ip("198.51.100.0"),
            24,
            ip("fd00:51:100::200")
        ));
        assert!(net_contains(ip("::"), 0, ip("fd00::1")));
    }

    #[test]
    fn reach_needs_an_up_interface_on_the_subnet_or_named() {
        let route = InterfaceChoice {
            route_interface: true,
            named: vec![],
        };
        let named = InterfaceChoice {
            route_interface: false,
            named: vec!["eth0.100".into()],
        };
        let lan_a = reach(&[("eth0", true, &["198.51.100.0/24"])]);
        let lan_b = reach(&[("eth0", true, &["198.51.101.0/24"])]);
        let down = reach(&[("eth0", false, &["198.51.100.0/24"])]);
        let vlan = reach(&[
            ("eth0", true, &["198.51.101.0/24"]),
            ("eth0.100", true, &[]),
        ]);
        let vip = ip("198.51.100.200");
        assert!(lan_a.can_announce(vip, &route));
        assert!(!lan_b.can_announce(vip, &route));
        assert!(!down.can_announce(vip, &route));
        assert!(vlan.can_announce(vip, &named), "listed, no address needed");
        assert!(!lan_a.can_announce(vip, &named), "no such interface");
        let vlan_down = reach(&[("eth0.100", false, &[])]);
        assert!(!vlan_down.can_announce(vip, &named));
    }

    #[test]
    fn reachable_nodes_filters_keeps_unknown_and_falls_back() {
        let all = || vec!["a1", "a2", "b1", "old"];
        let route = Some(InterfaceChoice {
            route_interface: true,
            named: vec![],
        });
        let route = || route.as_ref();
        let mut map = BTreeMap::new();
        map.insert(
            "a1".to_string(),
            reach(&[("eth0", true, &["198.51.100.0/24"])]),
        );
        map.insert(
            "a2".to_string(),
            reach(&[("eth0", true, &["198.51.100.0/24"])]),
        );
        map.insert(
            "b1".to_string(),
            reach(&[("eth0", true, &["198.51.101.0/24"])]),
        );
        let got = reachable_nodes(&all(), ip("198.51.100.200"), &map, |_| route());
        assert_eq!(got, ["a1", "a2", "old"]);
        let got = reachable_nodes(&all(), ip("198.51.101.200"), &map, |_| route());
        assert_eq!(got, ["b1", "old"]);
        // Nobody reports the subnet and nobody is unknown: unchanged (pre-reach behaviour).
        let known: Vec<&str> = all().into_iter().filter(|n| *n != "old").collect();
        let got = reachable_nodes(&known, ip("203.0.113.9"), &map, |_| route());
        assert_eq!(got, known);
        // A node no advertisement matches cannot announce.
        let got = reachable_nodes(&known, ip("198.51.100.200"), &map, |n| {
            (n != "a1").then(route).flatten()
        });
        assert_eq!(got, ["a2"]);
    }
}
