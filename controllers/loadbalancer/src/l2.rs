//! The L2 announcement decision, pure: which LoadBalancer IPs this node answers ARP/NDP for.
//!
//! ```text
//!  Services (ours, with ingress IPs) ─┐
//!  IPAddressPools ─► pool of the IP ──┼─► L2Advertisements of the pool ─► eligible nodes
//!  Nodes (labels) ∩ live agents ──────┤      (nodeSelectors, exclude label, Local policy:
//!  EndpointSlices (Local policy) ─────┘       nodes with a ready endpoint)
//!                                                   │
//!        reach (membership) ─► only nodes able to announce the IP on a selected interface
//!        preferredNodeSelectors ─► only the highest summed weight (all when none)
//!                    winner = min sha256("node#ip") ─► mine? ─► owned IPs + interfaces
//! ```
//!
//! No I/O: the interface routing to an IP is looked up by the caller (the announcement
//! reconciler) and handed in as a function, so this module only decides. Per pass the
//! EndpointSlices are indexed by Service once, and each pool's advertisements, eligible nodes
//! and this node's interfaces are worked out once: selectors are matched per pool × node, so a
//! pass costs O(IPs × eligible nodes) hashes plus O(pools × nodes × advertisements) matches.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::announce::{
    advertisements_for_pool, decision_with_winner, election_key, eligible_nodes, interfaces_for,
    most_preferred, preference_score, reachable_nodes, InterfaceChoice, NodeReach, TrafficPolicy,
};
use crate::pool::Pool;
use crate::service::{is_ours, service_key, status_ips};
use crate::{IPAddressPool, L2Advertisement, L2AdvertisementSpec};

/// IPs this node answers for, with the interfaces to answer on.
pub type Owned = BTreeMap<IpAddr, Vec<String>>;

/// One IP's outcome in a pass (for events, logs and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpDecision {
    pub service: (String, String),
    pub uid: Option<String>,
    pub ip: IpAddr,
    pub winner: Option<String>,
    pub interfaces: Vec<String>,
}

/// Inputs of one announcement pass.
pub struct AnnounceInputs<'a> {
    pub me: &'a str,
    /// The interface that routes to an IP (resolved by the caller, who does the I/O and may
    /// cache it); `Err` says why there is none.
    pub route_interface: &'a dyn Fn(IpAddr) -> Result<String, String>,
    pub live: &'a BTreeSet<String>,
    /// Where each node can announce, as its agent reported over the membership (this node's
    /// own entry included). Nodes missing here are not restricted.
    pub reach: &'a BTreeMap<String, NodeReach>,
    pub services: &'a [Arc<Service>],
    pub pools: &'a [IPAddressPool],
    pub advertisements: &'a [L2Advertisement],
    pub nodes: &'a [Arc<Node>],
    pub slices: &'a [Arc<EndpointSlice>],
    pub class: &'a str,
    pub claim_unclassed: bool,
    /// Cordoned (`spec.unschedulable`, what `kubectl drain` starts with) nodes may not win.
    /// Nodes tainted [`OUT_OF_SERVICE_TAINT`] never may.
    pub exclude_unschedulable: bool,
}

/// The taint of a node that is shut down or being taken out of service.
pub const OUT_OF_SERVICE_TAINT: &str = "node.kubernetes.io/out-of-service";

/// Whether `node` is in maintenance: tainted [`OUT_OF_SERVICE_TAINT`] (any effect), or
/// cordoned when `exclude_unschedulable`. Its IPs move to the next winner while it still
/// answers (every agent re-elects on the same Node update), so clients lose nothing.
pub fn in_maintenance(node: &Node, exclude_unschedulable: bool) -> bool {
    let spec = node.spec.as_ref();
    spec.and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == OUT_OF_SERVICE_TAINT))
        || (exclude_unschedulable && spec.and_then(|s| s.unschedulable) == Some(true))
}

/// Pure: which IPs this node owns, and the decision for every announced IP.
pub fn decide(input: &AnnounceInputs) -> (Owned, Vec<IpDecision>) {
    decide_with_memo(input, &mut ElectionMemo::default())
}

/// The election key of a winner, and its name.
type Elected = Option<([u8; 32], String)>;

/// The elections of the last pass, so that the next one hashes only what changed.
///
/// The winner of an IP is the eligible node with the smallest `sha256("node#ip")`: when the
/// eligible set is the same as last time, so is the winner; when nodes left it but not the
/// winner, the winner stays; when nodes joined, only their keys are computed. Everything
/// else (the winner left, an IP not seen before) is elected from scratch. The result is
/// always what [`crate::announce::winner`] would say (a test checks this step by step).
#[derive(Clone, Default)]
pub struct ElectionMemo {
    ips: HashMap<IpAddr, (u64, Elected)>,
    sets: HashMap<u64, Arc<[String]>>,
}

impl ElectionMemo {
    /// IPs remembered.
    pub fn len(&self) -> usize {
        self.ips.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ips.is_empty()
    }
}

fn fingerprint(names: &[&str]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    names.hash(&mut h);
    h.finish()
}

fn elect_all(ip_text: &str, eligible: &[&str]) -> Elected {
    eligible
        .iter()
        .map(|n| (election_key(n, ip_text), *n))
        .min()
        .map(|(k, n)| (k, n.to_string()))
}

/// One pass's view of the last pass's memo: which remembered sets equal the current ones,
/// and what joined a set since.
struct Recall<'m> {
    old: &'m ElectionMemo,
    same: HashMap<u64, bool>,
    joined: HashMap<(u64, u64), Vec<String>>,
}

impl Recall<'_> {
    fn elect(&mut self, ip: IpAddr, fp: u64, eligible: &[&str]) -> Elected {
        let fresh = || elect_all(&ip.to_string(), eligible);
        let Some((old_fp, old_winner)) = self.old.ips.get(&ip) else {
            return fresh();
        };
        let Some(old_set) = self.old.sets.get(old_fp) else {
            return fresh();
        };
        if *old_fp == fp {
            let same = *self.same.entry(fp).or_insert_with(|| {
                old_set
                    .iter()
                    .map(String::as_str)
                    .eq(eligible.iter().copied())
            });
            if same {
                return old_winner.clone();
            }
        }
        let Some((key, w)) = old_winner else {
            return fresh();
        };
        if eligible.binary_search(&w.as_str()).is_err() {
            return fresh();
        }
        // The old winner is still eligible: it beats every node that stayed, so only the
        // nodes that joined can beat it.
        let joined = self.joined.entry((*old_fp, fp)).or_insert_with(|| {
            eligible
                .iter()
                .filter(|n| old_set.binary_search_by(|o| o.as_str().cmp(n)).is_err())
                .map(|n| n.to_string())
                .collect()
        });
        let ip_text = ip.to_string();
        let mut best = (*key, w.clone());
        for n in joined.iter() {
            let k = election_key(n, &ip_text);
            if (k, n.as_str()) < (best.0, best.1.as_str()) {
                best = (k, n.clone());
            }
        }
        Some(best)
    }
}

/// [`decide`], remembering this pass's elections in `memo` and reusing the last pass's:
/// a pass after a small change hashes only for the IPs it touched.
pub fn decide_with_memo(
    input: &AnnounceInputs,
    memo: &mut ElectionMemo,
) -> (Owned, Vec<IpDecision>) {
    let mut pools: Vec<Pool> = input
        .pools
        .iter()
        .filter_map(|p| {
            let name = p.metadata.name.clone().unwrap_or_default();
            let labels = p.metadata.labels.clone().unwrap_or_default();
            Pool::from_spec(&name, &labels, &p.spec).ok()
        })
        .collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    let ads: Vec<&L2AdvertisementSpec> = input.advertisements.iter().map(|a| &a.spec).collect();
    let node_labels: BTreeMap<String, BTreeMap<String, String>> = input
        .nodes
        .iter()
        .filter(|n| !in_maintenance(n, input.exclude_unschedulable))
        .map(|n| {
            (
                n.metadata.name.clone().unwrap_or_default(),
                n.metadata.labels.clone().unwrap_or_default(),
            )
        })
        .collect();
    // Live agents whose Node we know (labels are needed for nodeSelectors).
    let live_nodes: Vec<(&str, &BTreeMap<String, String>)> = node_labels
        .iter()
        .filter(|(n, _)| input.live.contains(*n))
        .map(|(n, l)| (n.as_str(), l))
        .collect();
    let empty = BTreeMap::new();
    let my_labels = node_labels.get(input.me).unwrap_or(&empty);

    let slices = slices_by_service(input.slices);
    // Per pass, each pool's advertisements, eligible nodes (under `Cluster` policy) and this
    // node's interfaces are worked out once: selectors are matched per pool × node, not per
    // IP × node.
    let mut views: BTreeMap<&str, PoolView> = BTreeMap::new();
    let old = std::mem::take(memo);
    let mut recall = Recall {
        old: &old,
        same: HashMap::new(),
        joined: HashMap::new(),
    };
    let mut owned = Owned::new();
    let mut decisions = Vec::new();
    for svc in input.services {
        if !is_ours(svc, input.class, input.claim_unclassed) {
            continue;
        }
        let ips = status_ips(svc);
        if ips.is_empty() {
            continue;
        }
        let key = service_key(svc);
        let local = svc
            .spec
            .as_ref()
            .and_then(|s| s.external_traffic_policy.as_deref())
            == Some("Local");
        let ready_nodes: BTreeSet<String> = if local {
            slices
                .get(&(key.namespace.as_str(), key.name.as_str()))
                .map(|s| ready_endpoint_nodes(s))
                .unwrap_or_default()
        } else {
            BTreeSet::new()
        };
        for ip in ips {
            let Some(pool) = pools.iter().find(|p| p.contains(ip)) else {
                continue;
            };
            let view = views.entry(pool.name.as_str()).or_insert_with(|| {
                PoolView::new(
                    advertisements_for_pool(ads.iter().copied(), &pool.name, &pool.labels),
                    &live_nodes,
                    my_labels,
                )
            });
            if view.ads.is_empty() {
                continue;
            }
            // `Local`: the nodes eligible under `Cluster` that have a ready endpoint (the
            // same filter `eligible_nodes` applies, on an already sorted list).
            let mut eligible_refs: Vec<&str> = view
                .eligible
                .iter()
                .map(String::as_str)
                .filter(|n| !local || ready_nodes.contains(*n))
                .collect();
            // Only nodes that reported they can announce the IP on a selected interface.
            if !input.reach.is_empty() {
                let choices = &view.choices;
                eligible_refs = reachable_nodes(&eligible_refs, ip, input.reach, |n| {
                    choices.get(n).and_then(Option::as_ref)
                });
            }
            // Soft preferences: the hash election runs among the most preferred eligible
            // nodes only (all of them when the pool has no preferences).
            let narrowed;
            let candidates: &[&str] = if view.preferred {
                let scores = &view.scores;
                narrowed = most_preferred(&eligible_refs, |n| scores.get(n).copied().unwrap_or(0));
                &narrowed
            } else {
                &eligible_refs
            };
            // The pool's set is shared by its `Cluster` IPs unless reach or preferences
            // narrowed it.
            let fp = if local || !input.reach.is_empty() || candidates.len() != view.eligible.len()
            {
                fingerprint(candidates)
            } else {
                view.fingerprint
            };
            memo.sets
                .entry(fp)
                .or_insert_with(|| candidates.iter().map(|n| n.to_string()).collect());
            let elected = recall.elect(ip, fp, candidates);
            let decision = decision_with_winner(
                input.me,
                &eligible_refs,
                elected.as_ref().map(|(_, w)| w.as_str()),
            );
            memo.ips.insert(ip, (fp, elected));
            let mut interfaces = Vec::new();
            if decision.announce {
                if let Some(choice) = &view.interfaces {
                    interfaces = choice.named.clone();
                    if choice.route_interface {
                        match (input.route_interface)(ip) {
                            Ok(i) if !interfaces.contains(&i) => interfaces.push(i),
                            Ok(_) => {}
                            // The caller's lookup reports it; the IP is left unannounced here.
                            Err(_) => {}
                        }
                    }
                    if !interfaces.is_empty() {
                        owned
                            .entry(ip)
                            .or_default()
                            .extend(interfaces.iter().cloned());
                    }
                }
            }
            decisions.push(IpDecision {
                service: (key.namespace.clone(), key.name.clone()),
                uid: svc.metadata.uid.clone(),
                ip,
                winner: decision.winner,
                interfaces,
            });
        }
    }
    for ifaces in owned.values_mut() {
        ifaces.sort();
        ifaces.dedup();
    }
    (owned, decisions)
}

/// What a pass works out once per pool.
struct PoolView<'a> {
    /// The advertisements that announce the pool.
    ads: Vec<&'a L2AdvertisementSpec>,
    /// Live nodes allowed by those advertisements under `externalTrafficPolicy: Cluster`,
    /// sorted (see [`eligible_nodes`]).
    eligible: Vec<String>,
    /// Where this node answers for the pool's IPs (`None`: no advertisement matches it).
    interfaces: Option<InterfaceChoice>,
    /// Of `eligible`, for the election memo.
    fingerprint: u64,
    /// Where each eligible node would answer (for the reach filter), matched once per pass.
    choices: BTreeMap<String, Option<InterfaceChoice>>,
    /// Whether any advertisement of the pool has `preferredNodeSelectors`.
    preferred: bool,
    /// Each eligible node's [`preference_score`] (only when `preferred`).
    scores: HashMap<String, u32>,
}

impl<'a> PoolView<'a> {
    fn new(
        ads: Vec<&'a L2AdvertisementSpec>,
        live_nodes: &[(&str, &BTreeMap<String, String>)],
        my_labels: &BTreeMap<String, String>,
    ) -> Self {
        let eligible = eligible_nodes(&ads, live_nodes.iter().copied(), TrafficPolicy::Cluster);
        let interfaces = interfaces_for(&ads, my_labels);
        let refs: Vec<&str> = eligible.iter().map(String::as_str).collect();
        let fingerprint = fingerprint(&refs);
        let choices = live_nodes
            .iter()
            .filter(|(n, _)| refs.binary_search(n).is_ok())
            .map(|(n, l)| (n.to_string(), interfaces_for(&ads, l)))
            .collect();
        let preferred = ads.iter().any(|a| !a.preferred_node_selectors.is_empty());
        let scores = if preferred {
            live_nodes
                .iter()
                .filter(|(n, _)| refs.binary_search(n).is_ok())
                .map(|(n, l)| (n.to_string(), preference_score(&ads, l)))
                .collect()
        } else {
            HashMap::new()
        };
        PoolView {
            ads,
            eligible,
            interfaces,
            fingerprint,
            choices,
            preferred,
            scores,
        }
    }
}

/// EndpointSlices by the (namespace, name) of their Service, built once per pass.
pub(crate) fn slices_by_service(
    slices: &[Arc<EndpointSlice>],
) -> BTreeMap<(&str, &str), Vec<&EndpointSlice>> {
    let mut out: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        let ns = s.metadata.namespace.as_deref();
        let svc = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"));
        if let (Some(ns), Some(svc)) = (ns, svc) {
            out.entry((ns, svc.as_str())).or_default().push(s);
        }
    }
    out
}

/// Nodes with at least one ready endpoint in the Service's slices.
pub(crate) fn ready_endpoint_nodes(slices: &[&EndpointSlice]) -> BTreeSet<String> {
    slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .filter_map(|e| e.node_name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::announce::{preferred_winner, winner};
    use serde_json::json;

    fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).expect("valid object")
    }

    fn node(name: &str, zone: &str) -> Arc<Node> {
        Arc::new(obj(
            json!({"metadata": {"name": name, "labels": {"zone": zone}}}),
        ))
    }

    /// `n` `Cluster` Services `<prefix>0..` on `<subnet>.200` onwards.
    fn cluster_services(prefix: &str, subnet: &str, n: usize) -> Vec<Arc<Service>> {
        (0..n)
            .map(|i| {
                svc(
                    &format!("{prefix}{i}"),
                    &format!("{subnet}.{}", 200 + i),
                    "Cluster",
                )
            })
            .collect()
    }

    fn svc(name: &str, ip: &str, policy: &str) -> Arc<Service> {
        Arc::new(obj(json!({
            "metadata": {"namespace": "shop", "name": name, "uid": format!("uid-{name}")},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": policy, "ports": [{"port": 80}]},
            "status": {"loadBalancer": {"ingress": [{"ip": ip}]}}
        })))
    }

    fn pool() -> IPAddressPool {
        obj(
            json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "IPAddressPool",
            "metadata": {"name": "lan"}, "spec": {"addresses": ["198.51.100.200-198.51.100.250"]}}),
        )
    }

    fn ad(spec: serde_json::Value) -> L2Advertisement {
        obj(
            json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "L2Advertisement",
            "metadata": {"name": "ad"}, "spec": spec}),
        )
    }

    fn owners(
        services: &[Arc<Service>],
        ads: &[L2Advertisement],
        live: &[&str],
        slices: &[Arc<EndpointSlice>],
    ) -> BTreeMap<IpAddr, Vec<String>> {
        owners_with(services, ads, live, slices, &BTreeMap::new(), "eth9")
    }

    fn owners_with(
        services: &[Arc<Service>],
        ads: &[L2Advertisement],
        live: &[&str],
        slices: &[Arc<EndpointSlice>],
        reach: &BTreeMap<String, NodeReach>,
        route: &'static str,
    ) -> BTreeMap<IpAddr, Vec<String>> {
        let nodes = vec![node("n1", "a"), node("n2", "a"), node("n3", "b")];
        let live: BTreeSet<String> = live.iter().map(|s| s.to_string()).collect();
        let pools = vec![pool()];
        let mut out: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
        for me in ["n1", "n2", "n3"] {
            if !live.contains(me) {
                continue;
            }
            let (owned, _) = decide(&AnnounceInputs {
                me,
                route_interface: &|_| Ok(route.to_string()),
                live: &live,
                reach,
                services,
                pools: &pools,
                advertisements: ads,
                nodes: &nodes,
                slices,
                class: "palisade.dev/palisade",
                claim_unclassed: true,
                exclude_unschedulable: true,
            });
            for (ip, ifaces) in owned {
                assert_eq!(ifaces, vec![route.to_string()]);
                out.entry(ip).or_default().push(me.to_string());
            }
        }
        out
    }

    #[test]
    fn every_ip_has_exactly_one_owner_and_moves_only_when_its_owner_dies() {
        let services = cluster_services("s", "198.51.100", 20);
        let ads = vec![ad(json!({"interfaces": ["eth9"]}))];
        let all = owners(&services, &ads, &["n1", "n2", "n3"], &[]);
        assert_eq!(all.len(), 20);
        assert!(all.values().all(|o| o.len() == 1), "{all:?}");
        // n2 dies: only its IPs move.
        let without = owners(&services, &ads, &["n1", "n3"], &[]);
        for (ip, o) in &all {
            if o[0] != "n2" {
                assert_eq!(&without[ip], o, "{ip} moved although its owner lives");
            } else {
                assert_ne!(without[ip][0], "n2");
            }
        }
    }

    #[test]
    fn node_selectors_and_local_policy_restrict_the_owner() {
        let services = vec![svc("web", "198.51.100.201", "Cluster")];
        let ads = vec![ad(
            json!({"interfaces": ["eth9"], "nodeSelectors": [{"matchLabels": {"zone": "b"}}]}),
        )];
        let o = owners(&services, &ads, &["n1", "n2", "n3"], &[]);
        assert_eq!(o.values().next().unwrap(), &vec!["n3".to_string()]);
        // n3 dead: nobody may announce.
        assert!(owners(&services, &ads, &["n1", "n2"], &[]).is_empty());

        let local = vec![svc("api", "198.51.100.202", "Local")];
        let ads = vec![ad(json!({"interfaces": ["eth9"]}))];
        let slice: Arc<EndpointSlice> = Arc::new(obj(json!({
            "metadata": {"namespace": "shop", "name": "api-1", "labels": {"kubernetes.io/service-name": "api"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.2.5"], "nodeName": "n2", "conditions": {"ready": true}},
                {"addresses": ["10.244.1.5"], "nodeName": "n1", "conditions": {"ready": false}}
            ]
        })));
        let o = owners(
            &local,
            &ads,
            &["n1", "n2", "n3"],
            std::slice::from_ref(&slice),
        );
        assert_eq!(o.values().next().unwrap(), &vec!["n2".to_string()]);
        // No ready endpoint anywhere: no announcement (traffic would be dropped anyway).
        assert!(owners(&local, &ads, &["n1", "n2", "n3"], &[]).is_empty());
    }

    #[test]
    fn ips_without_advertisement_or_pool_are_not_announced() {
        let services = vec![
            svc("web", "198.51.100.201", "Cluster"),
            svc("far", "203.0.113.9", "Cluster"),
        ];
        assert!(owners(&services, &[], &["n1", "n2", "n3"], &[]).is_empty());
        let ads = vec![ad(
            json!({"interfaces": ["eth9"], "ipAddressPools": ["other"]}),
        )];
        assert!(owners(&services, &ads, &["n1", "n2", "n3"], &[]).is_empty());
        let ads = vec![ad(json!({"interfaces": ["eth9"]}))];
        let o = owners(&services, &ads, &["n1", "n2", "n3"], &[]);
        assert_eq!(
            o.keys().map(ToString::to_string).collect::<Vec<_>>(),
            ["198.51.100.201"]
        );
    }

    /// The decision for one IP worked out from scratch with the building blocks (what a pass
    /// did per IP before pools were viewed once per pass).
    fn reference(
        input: &AnnounceInputs,
        svc: &Service,
        ip: IpAddr,
    ) -> Option<(Option<String>, bool)> {
        let pools: Vec<Pool> = input
            .pools
            .iter()
            .filter_map(|p| {
                let name = p.metadata.name.clone().unwrap_or_default();
                let labels = p.metadata.labels.clone().unwrap_or_default();
                Pool::from_spec(&name, &labels, &p.spec).ok()
            })
            .collect();
        let mut pools = pools;
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        let pool = pools.iter().find(|p| p.contains(ip))?;
        let ads = advertisements_for_pool(
            input.advertisements.iter().map(|a| &a.spec),
            &pool.name,
            &pool.labels,
        );
        if ads.is_empty() {
            return None;
        }
        let nodes: Vec<(String, BTreeMap<String, String>)> = input
            .nodes
            .iter()
            .map(|n| {
                (
                    n.metadata.name.clone().unwrap_or_default(),
                    n.metadata.labels.clone().unwrap_or_default(),
                )
            })
            .filter(|(n, _)| input.live.contains(n))
            .collect();
        let key = service_key(svc);
        let local = svc
            .spec
            .as_ref()
            .and_then(|s| s.external_traffic_policy.as_deref())
            == Some("Local");
        let ready: BTreeSet<String> = input
            .slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(key.namespace.as_str())
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        == Some(&key.name)
            })
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .filter_map(|e| e.node_name.clone())
            .collect();
        let policy = if local {
            TrafficPolicy::Local(&ready)
        } else {
            TrafficPolicy::Cluster
        };
        let eligible = eligible_nodes(&ads, nodes.iter().map(|(n, l)| (n.as_str(), l)), policy);
        let refs: Vec<&str> = eligible.iter().map(String::as_str).collect();
        let labels_of = |n: &str| &nodes.iter().find(|(m, _)| m == n).expect("live node").1;
        let w = preferred_winner(ip, &refs, |n| preference_score(&ads, labels_of(n)));
        let d = decision_with_winner(input.me, &refs, w);
        let empty = BTreeMap::new();
        let mine = nodes
            .iter()
            .find(|(n, _)| n == input.me)
            .map(|(_, l)| l)
            .unwrap_or(&empty);
        let announced = d.announce && interfaces_for(&ads, mine).is_some_and(|c| !c.is_empty());
        Some((d.winner, announced))
    }

    #[test]
    fn a_pass_decides_every_ip_as_the_per_ip_reference_does() {
        // Two pools, advertisements with pool names, pool selectors and node selectors, an
        // excluded node, a dead node, Local Services with and without ready endpoints.
        let pools: Vec<IPAddressPool> = vec![
            obj(
                json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "IPAddressPool",
                "metadata": {"name": "lan"}, "spec": {"addresses": ["198.51.100.0/24"]}}),
            ),
            obj(
                json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "IPAddressPool",
                "metadata": {"name": "dmz", "labels": {"site": "x"}},
                "spec": {"addresses": ["203.0.113.0/24"]}}),
            ),
        ];
        let ads = vec![
            ad(json!({"ipAddressPools": ["lan"], "interfaces": ["eth9"],
                      "nodeSelectors": [{"matchLabels": {"zone": "a"}}]})),
            ad(
                json!({"ipAddressPoolSelectors": [{"matchLabels": {"site": "x"}}],
                      "nodeSelectors": [{"matchExpressions": [
                          {"key": "zone", "operator": "In", "values": ["b", "c"]}]}]}),
            ),
        ];
        let mut nodes: Vec<Arc<Node>> = (0..8)
            .map(|i| node(&format!("n{i}"), ["a", "b", "c"][i % 3]))
            .collect();
        nodes.push(Arc::new(obj(
            json!({"metadata": {"name": "nx", "labels": {"zone": "a",
            "node.kubernetes.io/exclude-from-external-load-balancers": ""}}}),
        )));
        let live: BTreeSet<String> = (0..7)
            .map(|i| format!("n{i}"))
            .chain(["nx".to_string()])
            .collect();
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for i in 0..60 {
            let ip = if i % 2 == 0 {
                format!("198.51.100.{}", 10 + i)
            } else {
                format!("203.0.113.{}", 10 + i)
            };
            let policy = if i % 3 == 0 { "Local" } else { "Cluster" };
            services.push(svc(&format!("s{i}"), &ip, policy));
            if i % 6 == 0 {
                slices.push(Arc::new(obj::<EndpointSlice>(json!({
                    "metadata": {"namespace": "shop", "name": format!("s{i}-1"),
                                 "labels": {"kubernetes.io/service-name": format!("s{i}")}},
                    "addressType": "IPv4",
                    "endpoints": [
                        {"addresses": ["10.0.0.1"], "nodeName": format!("n{}", i % 8), "conditions": {"ready": true}},
                        {"addresses": ["10.0.0.2"], "nodeName": format!("n{}", (i + 1) % 8), "conditions": {"ready": i % 4 == 0}},
                        {"addresses": ["10.0.0.3"], "nodeName": "nx"}
                    ]
                }))));
            }
        }
        let mut announced_somewhere = 0;
        for me in (0..8).map(|i| format!("n{i}")).chain(["nx".to_string()]) {
            let input = AnnounceInputs {
                me: &me,
                route_interface: &|_| Ok("eth0".to_string()),
                live: &live,
                reach: &BTreeMap::new(),
                services: &services,
                pools: &pools,
                advertisements: &ads,
                nodes: &nodes,
                slices: &slices,
                class: "palisade.dev/palisade",
                claim_unclassed: true,
                exclude_unschedulable: false,
            };
            let (owned, decisions) = decide(&input);
            let mut expected_decisions = 0;
            for s in &services {
                for ip in status_ips(s) {
                    let Some((winner, announced)) = reference(&input, s, ip) else {
                        assert!(decisions.iter().all(|d| d.ip != ip), "{me}: {ip} decided");
                        continue;
                    };
                    expected_decisions += 1;
                    let d = decisions.iter().find(|d| d.ip == ip).expect("decided");
                    assert_eq!(d.winner, winner, "{me}: winner of {ip}");
                    assert_eq!(owned.contains_key(&ip), announced, "{me}: owns {ip}?");
                    announced_somewhere += usize::from(announced);
                }
            }
            assert_eq!(decisions.len(), expected_decisions, "{me}");
        }
        assert!(announced_somewhere > 10, "the fixture announces something");
    }

    #[test]
    fn a_remembered_election_equals_a_fresh_one_after_every_change() {
        let pools = vec![pool()];
        let ads = vec![ad(json!({"interfaces": ["eth9"]}))];
        let mut nodes: Vec<Arc<Node>> = (0..12).map(|i| node(&format!("n{i}"), "a")).collect();
        let mut live: BTreeSet<String> = (0..10).map(|i| format!("n{i}")).collect();
        let mut services: Vec<Arc<Service>> = (0..40)
            .map(|i| {
                let policy = if i % 5 == 0 { "Local" } else { "Cluster" };
                svc(
                    &format!("s{i}"),
                    &format!("198.51.100.{}", 200 + i % 50),
                    policy,
                )
            })
            .collect();
        let slice = |i: usize, nodes: &[usize]| -> Arc<EndpointSlice> {
            let eps: Vec<_> = nodes
                .iter()
                .map(|n| json!({"addresses": ["10.0.0.1"], "nodeName": format!("n{n}")}))
                .collect();
            Arc::new(obj(json!({
                "metadata": {"namespace": "shop", "name": format!("s{i}-1"),
                             "labels": {"kubernetes.io/service-name": format!("s{i}")}},
                "addressType": "IPv4", "endpoints": eps})))
        };
        let mut slices: Vec<Arc<EndpointSlice>> = (0..40)
            .step_by(5)
            .map(|i| slice(i, &[i % 10, (i + 3) % 10]))
            .collect();
        let mut memos: BTreeMap<String, ElectionMemo> = BTreeMap::new();
        let mut reused = 0;
        for step in 0..14 {
            match step {
                0 => {}
                1 => {
                    live.remove("n3");
                }
                2 => {
                    live.insert("n10".into());
                }
                3 => services.push(svc("late", "198.51.100.249", "Cluster")),
                4 => slices[2] = slice(10, &[1, 2, 10]),
                5 => {
                    // Every node's winner: remove the winner of s1 (from a fresh pass).
                    let input = inputs("n0", &live, &services, &pools, &ads, &nodes, &slices);
                    let (_, d) = decide(&input);
                    let w = d[1].winner.clone().unwrap();
                    live.remove(&w);
                }
                6 => {
                    live.insert("n3".into());
                    live.insert("n11".into());
                }
                7 => nodes.push(node("n12", "a")),
                8 => {
                    live.insert("n12".into());
                }
                9 => {
                    services.remove(0);
                }
                10 => slices[0] = slice(5, &[]),
                11 => live.retain(|n| n != "n1" && n != "n2"),
                12 => {
                    live.clear();
                }
                _ => live = (0..13).map(|i| format!("n{i}")).collect(),
            }
            for me in (0..13).map(|i| format!("n{i}")) {
                let input = inputs(&me, &live, &services, &pools, &ads, &nodes, &slices);
                let memo = memos.entry(me.clone()).or_default();
                reused += memo.len();
                let remembered = decide_with_memo(&input, memo);
                let fresh = decide(&input);
                assert_eq!(remembered, fresh, "step {step}, node {me}");
            }
        }
        assert!(reused > 1000, "the memo was used ({reused})");
    }

    fn inputs<'a>(
        me: &'a str,
        live: &'a BTreeSet<String>,
        services: &'a [Arc<Service>],
        pools: &'a [IPAddressPool],
        ads: &'a [L2Advertisement],
        nodes: &'a [Arc<Node>],
        slices: &'a [Arc<EndpointSlice>],
    ) -> AnnounceInputs<'a> {
        fn route(_: IpAddr) -> Result<String, String> {
            Ok("eth0".to_string())
        }
        static NO_REACH: BTreeMap<String, NodeReach> = BTreeMap::new();
        AnnounceInputs {
            me,
            route_interface: &route,
            live,
            reach: &NO_REACH,
            services,
            pools,
            advertisements: ads,
            nodes,
            slices,
            class: "palisade.dev/palisade",
            claim_unclassed: true,
            exclude_unschedulable: false,
        }
    }

    /// Two LAN segments, a pool on each: only nodes with an up interface on a pool's subnet
    /// win its IPs; every node computes the same owners from the same reports.
    #[test]
    fn only_nodes_on_the_ips_segment_are_elected() {
        use crate::announce::ReachInterface;
        let on = |net: &str| NodeReach {
            interfaces: vec![ReachInterface {
                name: "eth0".into(),
                up: true,
                nets: vec![(net.parse().unwrap(), 24)],
            }],
        };
        let mut reach = BTreeMap::new();
        reach.insert("n1".to_string(), on("198.51.100.0"));
        reach.insert("n2".to_string(), on("198.51.100.0"));
        reach.insert("n3".to_string(), on("198.51.101.0"));
        let mut services = cluster_services("a", "198.51.100", 10);
        services.extend(cluster_services("b", "198.51.101", 10));
        let pools = [
            json!({"metadata": {"name": "lan"}, "spec": {"addresses": ["198.51.100.200-198.51.100.250"]}}),
            json!({"metadata": {"name": "lan-b"}, "spec": {"addresses": ["198.51.101.200-198.51.101.250"]}}),
        ];
        let pools: Vec<IPAddressPool> = pools
            .into_iter()
            .map(|mut p| {
                p["apiVersion"] = json!("palisade.dev/v1alpha1");
                p["kind"] = json!("IPAddressPool");
                obj(p)
            })
            .collect();
        let ads = vec![ad(json!({}))];
        let nodes = vec![node("n1", "a"), node("n2", "a"), node("n3", "b")];
        let live: BTreeSet<String> = ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect();
        let mut owner: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
        for me in ["n1", "n2", "n3"] {
            let (owned, _) = decide(&AnnounceInputs {
                me,
                route_interface: &|_| Ok("eth0".into()),
                live: &live,
                reach: &reach,
                services: &services,
                pools: &pools,
                advertisements: &ads,
                nodes: &nodes,
                slices: &[],
                class: "palisade.dev/palisade",
                claim_unclassed: true,
                exclude_unschedulable: false,
            });
            for ip in owned.into_keys() {
                owner.entry(ip).or_default().push(me.to_string());
            }
        }
        assert_eq!(owner.len(), 20);
        for (ip, o) in &owner {
            assert_eq!(o.len(), 1, "{ip}: {o:?}");
            let want_b = ip.to_string().starts_with("198.51.101.");
            assert_eq!(o[0] == "n3", want_b, "{ip} won by {o:?}");
        }
        // Without reports every node may win anything (the old behaviour this fixes).
        let blind = owners_with(
            &services[..10],
            &ads,
            &["n1", "n2", "n3"],
            &[],
            &BTreeMap::new(),
            "eth0",
        );
        assert!(
            blind.values().any(|o| o == &["n3".to_string()]),
            "{blind:?}"
        );
    }

    /// Maintenance: a cordoned node (when configured) or one tainted out-of-service wins
    /// nothing; only its IPs move.
    #[test]
    fn cordoned_and_out_of_service_nodes_hand_their_ips_over() {
        let services = cluster_services("s", "198.51.100", 20);
        let ads = vec![ad(json!({"interfaces": ["eth9"]}))];
        let pools = vec![pool()];
        let live: BTreeSet<String> = ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect();
        let run = |nodes: &[Arc<Node>], exclude: bool| {
            let mut out: BTreeMap<IpAddr, String> = BTreeMap::new();
            for me in ["n1", "n2", "n3"] {
                let (owned, _) = decide(&AnnounceInputs {
                    me,
                    route_interface: &|_| Err("none".into()),
                    live: &live,
                    reach: &BTreeMap::new(),
                    services: &services,
                    pools: &pools,
                    advertisements: &ads,
                    nodes,
                    slices: &[],
                    class: "palisade.dev/palisade",
                    claim_unclassed: true,
                    exclude_unschedulable: exclude,
                });
                for ip in owned.into_keys() {
                    assert!(out.insert(ip, me.to_string()).is_none(), "{ip} twice");
                }
            }
            out
        };
        let plain = vec![node("n1", "a"), node("n2", "a"), node("n3", "b")];
        let all = run(&plain, true);
        assert_eq!(all.len(), 20);
        assert!(all.values().any(|n| n == "n2"));
        let cordoned: Arc<Node> = Arc::new(obj(json!({
            "metadata": {"name": "n2", "labels": {"zone": "a"}},
            "spec": {"unschedulable": true}
        })));
        let nodes = vec![node("n1", "a"), cordoned, node("n3", "b")];
        assert_eq!(
            run(&nodes, false),
            all,
            "cordon alone changes nothing by default"
        );
        let moved = run(&nodes, true);
        assert_eq!(moved.len(), 20);
        for (ip, owner) in &all {
            if owner == "n2" {
                assert_ne!(&moved[ip], "n2");
            } else {
                assert_eq!(&moved[ip], owner, "{ip} moved although its owner is fine");
            }
        }
        let tainted: Arc<Node> = Arc::new(obj(json!({
            "metadata": {"name": "n2", "labels": {"zone": "a"}},
            "spec": {"taints": [{"key": OUT_OF_SERVICE_TAINT, "value": "nodeshutdown", "effect": "NoExecute"}]}
        })));
        let nodes = vec![node("n1", "a"), tainted, node("n3", "b")];
        assert_eq!(run(&nodes, false), moved, "out-of-service: always excluded");
    }

    /// A tiny deterministic generator for the property tests (no proptest in the workspace).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn labelled(name: &str, labels: &[(&str, &str)]) -> Arc<Node> {
        let l: BTreeMap<&str, &str> = labels.iter().copied().collect();
        Arc::new(obj(json!({"metadata": {"name": name, "labels": l}})))
    }

    /// Owner of every IP, asking every live node; panics when two nodes announce one IP.
    fn single_owners(
        mut input: impl FnMut(&str) -> (Owned, Vec<IpDecision>),
        live: &BTreeSet<String>,
    ) -> BTreeMap<IpAddr, String> {
        let mut out = BTreeMap::new();
        for me in live {
            for ip in input(me).0.into_keys() {
                if let Some(other) = out.insert(ip, me.clone()) {
                    panic!("{ip} announced by {other} and {me}");
                }
            }
        }
        out
    }

    #[test]
    fn the_most_preferred_live_node_wins_and_gets_the_ip_back() {
        let nodes = vec![
            labelled("n1", &[("zone", "a")]),
            labelled("n2", &[("zone", "a")]),
            labelled("n3", &[("zone", "b"), ("edge", "")]),
            labelled("n4", &[("zone", "c")]),
        ];
        let services = cluster_services("s", "198.51.100", 30);
        let pools = vec![pool()];
        let edge = ad(json!({"interfaces": ["eth9"], "preferredNodeSelectors": [
            {"weight": 50, "preference": {"matchExpressions": [{"key": "edge", "operator": "Exists"}]}},
            {"weight": 10, "preference": {"matchExpressions": [
                {"key": "zone", "operator": "In", "values": ["a", "b"]}]}}]}));
        let run = |ads: &[L2Advertisement], live: &[&str]| {
            let live: BTreeSet<String> = live.iter().map(|s| s.to_string()).collect();
            single_owners(
                |me| decide(&inputs(me, &live, &services, &pools, ads, &nodes, &[])),
                &live,
            )
        };
        let all = ["n1", "n2", "n3", "n4"];
        let owners = run(std::slice::from_ref(&edge), &all);
        assert_eq!(owners.len(), 30);
        assert!(owners.values().all(|o| o == "n3"), "{owners:?}");
        // n3 dies: the next best (score 10: n1, n2) share by hash; n4 (score 0) gets nothing.
        let failed = run(std::slice::from_ref(&edge), &["n1", "n2", "n4"]);
        assert_eq!(failed.len(), 30);
        assert!(
            failed.values().all(|o| o == "n1" || o == "n2"),
            "{failed:?}"
        );
        assert!(failed.values().any(|o| o == "n1") && failed.values().any(|o| o == "n2"));
        for (ip, o) in &failed {
            assert_eq!(
                Some(o.as_str()),
                winner(*ip, ["n1", "n2"]),
                "{ip}: hash among the best"
            );
        }
        // Only n4 left: preferences are soft, it announces everything.
        assert!(run(std::slice::from_ref(&edge), &["n4"])
            .values()
            .all(|o| o == "n4"));
        // n3 is back: every IP returns to it.
        assert_eq!(run(std::slice::from_ref(&edge), &all), owners);
        // A second advertisement of the same pool adds its weights: zone a now scores
        // 10 + 55 = 65 > n3's 60.
        let mut zone_a = ad(json!({"preferredNodeSelectors": [
            {"weight": 55, "preference": {"matchLabels": {"zone": "a"}}}]}));
        zone_a.metadata.name = Some("zone-a".into());
        let combined = run(&[edge.clone(), zone_a], &all);
        assert!(
            combined.values().all(|o| o == "n1" || o == "n2"),
            "{combined:?}"
        );
        // Malformed selectors and out-of-range weights count nothing.
        let broken = ad(json!({"interfaces": ["eth9"], "preferredNodeSelectors": [
            {"weight": 100, "preference": {"matchExpressions": [{"key": "edge", "operator": "Bogus"}]}},
            {"weight": 1000, "preference": {"matchLabels": {"zone": "c"}}}]}));
        let plain = ad(json!({"interfaces": ["eth9"]}));
        assert_eq!(run(&[broken], &all), run(&[plain], &all));
    }

    /// Property: on random clusters, preferences and failures, every agent computes the same
    /// single winner per IP, which is the reference (highest score, then smallest hash); the
    /// remembered election equals a fresh one; without preferences (or with the same score
    /// everywhere) the winner is exactly the old hash winner.
    #[test]
    fn every_agent_elects_the_same_preferred_winner_and_no_preference_changes_nothing() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let pools = vec![pool()];
        let zones = ["a", "b", "c"];
        let mut memos: BTreeMap<String, ElectionMemo> = BTreeMap::new();
        for case in 0..60 {
            let n = 2 + rng.below(9) as usize;
            let nodes: Vec<Arc<Node>> = (0..n)
                .map(|i| {
                    let zone = zones[rng.below(3) as usize];
                    let rack = format!("r{}", rng.below(3));
                    labelled(&format!("n{i}"), &[("zone", zone), ("rack", &rack)])
                })
                .collect();
            let mut live: BTreeSet<String> = (0..n)
                .filter(|_| rng.below(4) != 0)
                .map(|i| format!("n{i}"))
                .collect();
            live.insert(format!("n{}", rng.below(n as u64)));
            let terms: Vec<_> = (0..rng.below(4))
                .map(|_| {
                    let weight = 1 + rng.below(100);
                    if rng.below(2) == 0 {
                        json!({"weight": weight, "preference": {"matchLabels": {"zone": zones[rng.below(3) as usize]}}})
                    } else {
                        json!({"weight": weight, "preference": {"matchExpressions": [
                            {"key": "rack", "operator": "NotIn", "values": [format!("r{}", rng.below(3))]}]}})
                    }
                })
                .collect();
            let mut ads = vec![ad(
                json!({"interfaces": ["eth9"], "preferredNodeSelectors": terms}),
            )];
            if rng.below(3) == 0 {
                let mut second = ad(json!({"preferredNodeSelectors": [
                    {"weight": 1 + rng.below(100), "preference": {"matchLabels": {"zone": "b"}}}]}));
                second.metadata.name = Some("second".into());
                ads.push(second);
            }
            let plain = vec![ad(json!({"interfaces": ["eth9"]}))];
            let everyone = vec![ad(
                json!({"interfaces": ["eth9"], "preferredNodeSelectors": [
                {"weight": 7, "preference": {}}]}),
            )];
            let services: Vec<_> = (0..25)
                .map(|i| {
                    let ip = format!("198.51.100.{}", 200 + rng.below(51));
                    svc(&format!("s{case}-{i}"), &ip, "Cluster")
                })
                .collect();
            let labels: BTreeMap<String, BTreeMap<String, String>> = nodes
                .iter()
                .map(|n| {
                    (
                        n.metadata.name.clone().unwrap(),
                        n.metadata.labels.clone().unwrap(),
                    )
                })
                .collect();
            let specs: Vec<&L2AdvertisementSpec> = ads.iter().map(|a| &a.spec).collect();
            let eligible: Vec<&str> = live.iter().map(String::as_str).collect();
            let with_prefs = single_owners(
                |me| {
                    let input = inputs(me, &live, &services, &pools, &ads, &nodes, &[]);
                    let memo = memos.entry(me.to_string()).or_default();
                    let mut scratch = memo.clone();
                    let remembered = decide_with_memo(&input, &mut scratch);
                    let fresh = decide(&input);
                    assert_eq!(remembered, fresh, "case {case}, {me}");
                    *memo = scratch;
                    // Every agent names the same winner for every IP, also where it loses.
                    for d in &fresh.1 {
                        let want = preferred_winner(d.ip, &eligible, |n| {
                            preference_score(&specs, &labels[n])
                        });
                        assert_eq!(d.winner.as_deref(), want, "case {case}, {me}, {}", d.ip);
                    }
                    fresh
                },
                &live,
            );
            let old = |ads: &[L2Advertisement]| {
                single_owners(
                    |me| decide(&inputs(me, &live, &services, &pools, ads, &nodes, &[])),
                    &live,
                )
            };
            let no_prefs = old(&plain);
            assert_eq!(no_prefs.len(), with_prefs.len(), "case {case}");
            for (ip, o) in &no_prefs {
                assert_eq!(Some(o.as_str()), winner(*ip, eligible.iter().copied()));
            }
            assert_eq!(
                old(&everyone),
                no_prefs,
                "case {case}: same score everywhere"
            );
        }
    }
}
