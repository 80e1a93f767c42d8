//! The BGP announcement plan, pure: which routers this node peers with and which prefixes it
//! announces to each.
//!
//! ```text
//!  BGPPeers ── nodeSelectors match me? ──► peers (timers, router ID, BFDProfile)
//!  Services (ours, with ingress IPs) ──┐
//!  IPAddressPools ─► pool of the IP ───┼─► BGPAdvertisements of the pool that select me
//!  EndpointSlices (Local policy) ──────┘      (nodeSelectors, exclude label, Local: a ready
//!                                              endpoint on this node) ─► peers of the ad
//!                                                   │
//!           prefix = IP / aggregationLength(V6), LOCAL_PREF, communities ─► peer's routes
//! ```
//!
//! Unlike L2 there is no election: every eligible node announces and the router spreads the
//! flows (ECMP). Nothing here talks to the API server or the routers; the reconciler turns a
//! [`PlannedPeer`] into a speaker session. Problems with one object (bad address, unknown
//! BFD profile, unsupported option) are reported in [`BgpPlan::problems`] and affect only
//! that object.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::announce::node_excluded;
use crate::crd::{parse_duration, BFDProfile, BGPAdvertisement, BGPPeer};
use crate::l2::{ready_endpoint_nodes, slices_by_service};
use crate::pool::Pool;
use crate::selector;
use crate::service::{is_ours, service_key, status_ips};
use crate::IPAddressPool;

/// Route attributes of one announced prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteAttrs {
    /// LOCAL_PREF (sent on iBGP sessions only).
    pub local_pref: Option<u32>,
    /// COMMUNITIES (RFC 1997), sorted and without duplicates.
    pub communities: Vec<u32>,
}

/// BFD timers from a `BFDProfile`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BfdTimers {
    pub receive_interval: Duration,
    pub transmit_interval: Duration,
    pub detect_multiplier: u8,
    pub passive: bool,
    pub minimum_ttl: u8,
}

/// One BGP session this node should have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedPeer {
    /// The BGPPeer's name.
    pub name: String,
    pub my_asn: u32,
    pub peer_asn: u32,
    pub peer_address: IpAddr,
    pub peer_port: u16,
    pub source_address: Option<IpAddr>,
    pub hold_time: Duration,
    pub keepalive_time: Option<Duration>,
    pub router_id: Ipv4Addr,
    pub bfd: Option<BfdTimers>,
    pub ebgp_multi_hop: bool,
    /// What to announce, with each prefix's attributes.
    pub routes: BTreeMap<IpNetwork, RouteAttrs>,
}

/// A problem with one object, for a status condition or an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// `BGPPeer`, `BGPAdvertisement` or `Service`.
    pub kind: &'static str,
    /// Name (`namespace/name` for Services).
    pub name: String,
    /// A constant reason (`InvalidPeer`, `UnknownBFDProfile`, `Unsupported`, ...).
    pub reason: &'static str,
    pub message: String,
}

/// The outcome of one planning pass for this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BgpPlan {
    /// Sessions by BGPPeer name.
    pub peers: BTreeMap<String, PlannedPeer>,
    /// Per Service (namespace, name): the peers this node announces at least one of its IPs to.
    pub services: BTreeMap<(String, String), BTreeSet<String>>,
    pub problems: Vec<Problem>,
}

/// Inputs of one pass.
pub struct BgpInputs<'a> {
    pub me: &'a str,
    /// This node's IPv4 address: the default BGP router ID.
    pub my_ipv4: Option<Ipv4Addr>,
    pub peers: &'a [BGPPeer],
    pub advertisements: &'a [BGPAdvertisement],
    pub bfd_profiles: &'a [BFDProfile],
    pub pools: &'a [IPAddressPool],
    pub services: &'a [Arc<Service>],
    pub nodes: &'a [Arc<Node>],
    pub slices: &'a [Arc<EndpointSlice>],
    pub class: &'a str,
    pub claim_unclassed: bool,
}

pub mod reason {
    pub const INVALID_PEER: &str = "InvalidPeer";
    pub const UNKNOWN_BFD_PROFILE: &str = "UnknownBFDProfile";
    pub const UNSUPPORTED: &str = "Unsupported";
    pub const INVALID_ADVERTISEMENT: &str = "InvalidAdvertisement";
    pub const NO_ROUTER_ID: &str = "NoRouterID";
}

/// A community as MetalLB writes them: `ASN:VALUE` (16 bits each) or a well-known name.
pub fn parse_community(text: &str) -> Result<u32, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "no-export" => return Ok(0xFFFF_FF01),
        "no-advertise" => return Ok(0xFFFF_FF02),
        "no-export-subconfed" => return Ok(0xFFFF_FF03),
        _ => {}
    }
    let parts: Vec<&str> = text.trim().split(':').collect();
    if parts.len() != 2 {
        return Err(format!(
            "community {text:?}: want ASN:VALUE (large communities are not supported)"
        ));
    }
    let half = |s: &str| {
        s.parse::<u16>()
            .map_err(|_| format!("community {text:?}: {s:?} is not a number 0-65535"))
    };
    Ok((u32::from(half(parts[0])?) << 16) | u32::from(half(parts[1])?))
}

fn bfd_timers(profile: &BFDProfile) -> Result<BfdTimers, String> {
    let s = &profile.spec;
    let ms = |v: Option<u32>, what: &str| -> Result<Duration, String> {
        let v = v.unwrap_or(300);
        if !(10..=60_000).contains(&v) {
            return Err(format!("{what} {v} ms is outside 10..=60000"));
        }
        Ok(Duration::from_millis(u64::from(v)))
    };
    if s.echo_mode == Some(true) {
        return Err("echoMode is not supported".into());
    }
    let mult = s.detect_multiplier.unwrap_or(3);
    let detect_multiplier = u8::try_from(mult)
        .ok()
        .filter(|m| (2..=255).contains(m))
        .ok_or_else(|| format!("detectMultiplier {mult} is outside 2..=255"))?;
    let ttl = s.minimum_ttl.unwrap_or(255);
    let minimum_ttl = u8::try_from(ttl)
        .ok()
        .filter(|t| *t >= 1)
        .ok_or_else(|| format!("minimumTtl {ttl} is outside 1..=255"))?;
    Ok(BfdTimers {
        receive_interval: ms(s.receive_interval, "receiveInterval")?,
        transmit_interval: ms(s.transmit_interval, "transmitInterval")?,
        detect_multiplier,
        passive: s.passive_mode.unwrap_or(false),
        minimum_ttl,
    })
}

/// The session settings of a BGPPeer (without routes), or why it cannot be used.
fn plan_peer(
    peer: &BGPPeer,
    my_ipv4: Option<Ipv4Addr>,
    profiles: &BTreeMap<&str, &BFDProfile>,
    problems: &mut Vec<Problem>,
) -> Option<PlannedPeer> {
    let name = peer.metadata.name.clone().unwrap_or_default();
    let s = &peer.spec;
    let mut problem = |reason: &'static str, message: String| {
        problems.push(Problem {
            kind: "BGPPeer",
            name: name.clone(),
            reason,
            message,
        })
    };
    let peer_address = match s.peer_address.trim().parse::<IpAddr>() {
        Ok(a) => a,
        Err(_) => {
            problem(
                reason::INVALID_PEER,
                format!("peerAddress {:?} is not an IP address", s.peer_address),
            );
            return None;
        }
    };
    if s.my_asn == 0 || s.peer_asn == 0 {
        problem(
            reason::INVALID_PEER,
            "myASN and peerASN must not be 0".into(),
        );
        return None;
    }
    if s.password_secret.is_some() {
        // TCP MD5 needs the TCP_MD5SIG socket option, which no crate we depend on exposes
        // without unsafe code (docs/bgp.md). A router that expects a password would refuse
        // the session anyway; say why instead of trying.
        problem(
            reason::UNSUPPORTED,
            "passwordSecret (TCP MD5) is not supported yet".into(),
        );
        return None;
    }
    let source_address = match s.source_address.as_deref().map(|a| a.trim().parse()) {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(_)) => {
            problem(
                reason::INVALID_PEER,
                format!("sourceAddress {:?} is not an IP address", s.source_address),
            );
            return None;
        }
    };
    let duration = |v: &Option<String>, what: &str| -> Result<Option<Duration>, String> {
        v.as_deref()
            .map(|t| parse_duration(t).map_err(|e| format!("{what}: {e}")))
            .transpose()
    };
    let hold_time = match duration(&s.hold_time, "holdTime") {
        Ok(h) => h.unwrap_or(Duration::from_secs(90)),
        Err(e) => {
            problem(reason::INVALID_PEER, e);
            return None;
        }
    };
    if !hold_time.is_zero() && hold_time < Duration::from_secs(3) {
        problem(
            reason::INVALID_PEER,
            format!("holdTime {hold_time:?}: 0 or at least 3s (RFC 4271)"),
        );
        return None;
    }
    let keepalive_time = match duration(&s.keepalive_time, "keepaliveTime") {
        Ok(k) => k,
        Err(e) => {
            problem(reason::INVALID_PEER, e);
            return None;
        }
    };
    let router_id = match s.router_id.as_deref() {
        Some(r) => match r.trim().parse::<Ipv4Addr>() {
            Ok(r) => r,
            Err(_) => {
                problem(
                    reason::INVALID_PEER,
                    format!("routerID {r:?} is not an IPv4 address"),
                );
                return None;
            }
        },
        None => match my_ipv4 {
            Some(ip) => ip,
            None => {
                problem(
                    reason::NO_ROUTER_ID,
                    "the node has no IPv4 address: set routerID".into(),
                );
                return None;
            }
        },
    };
    let bfd = match s.bfd_profile.as_deref() {
        None => None,
        Some(p) => match profiles.get(p) {
            Some(profile) => match bfd_timers(profile) {
                Ok(t) => Some(t),
                Err(e) => {
                    // Without BFD the session still carries the routes (failover by hold
                    // timer): better than withdrawing everything over a profile typo.
                    problem(reason::UNKNOWN_BFD_PROFILE, format!("BFDProfile {p}: {e}"));
                    None
                }
            },
            None => {
                problem(
                    reason::UNKNOWN_BFD_PROFILE,
                    format!("BFDProfile {p} does not exist; running without BFD"),
                );
                None
            }
        },
    };
    Some(PlannedPeer {
        name: name.clone(),
        my_asn: s.my_asn,
        peer_asn: s.peer_asn,
        peer_address,
        peer_port: s.peer_port,
        source_address,
        hold_time,
        keepalive_time,
        router_id,
        bfd,
        ebgp_multi_hop: s.ebgp_multi_hop,
        routes: BTreeMap::new(),
    })
}

/// A BGPAdvertisement, checked once per pass.
struct Ad<'a> {
    spec: &'a crate::crd::BGPAdvertisementSpec,
    attrs: RouteAttrs,
}

impl Ad<'_> {
    fn selects_pool(&self, pool: &Pool) -> bool {
        let s = self.spec;
        if s.ip_address_pools.is_empty() && s.ip_address_pool_selectors.is_empty() {
            return true;
        }
        s.ip_address_pools.contains(&pool.name)
            || s.ip_address_pool_selectors
                .iter()
                .any(|sel| selector::matches(sel, &pool.labels))
    }

    fn prefix(&self, ip: IpAddr) -> Option<IpNetwork> {
        let len = match ip {
            IpAddr::V4(_) => self.spec.aggregation_length,
            IpAddr::V6(_) => self.spec.aggregation_length_v6,
        };
        IpNetwork::new(ip, len)
            .ok()
            .and_then(|n| IpNetwork::new(n.network(), len).ok())
    }
}

/// Pure: this node's sessions and routes.
pub fn plan(input: &BgpInputs) -> BgpPlan {
    let mut out = BgpPlan::default();
    let my_labels = input
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(input.me))
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    let profiles: BTreeMap<&str, &BFDProfile> = input
        .bfd_profiles
        .iter()
        .filter_map(|p| Some((p.metadata.name.as_deref()?, p)))
        .collect();
    for peer in input.peers {
        if !selector::any_api_matches(&peer.spec.node_selectors, &my_labels) {
            continue;
        }
        if let Some(p) = plan_peer(peer, input.my_ipv4, &profiles, &mut out.problems) {
            out.peers.insert(p.name.clone(), p);
        }
    }
    if out.peers.is_empty() || node_excluded(&my_labels) {
        return out;
    }

    let mut ads: Vec<Ad> = Vec::new();
    for a in input.advertisements {
        let name = a.metadata.name.clone().unwrap_or_default();
        let s = &a.spec;
        let mut bad = |message: String| {
            out.problems.push(Problem {
                kind: "BGPAdvertisement",
                name: name.clone(),
                reason: reason::INVALID_ADVERTISEMENT,
                message,
            })
        };
        if s.aggregation_length > 32 || s.aggregation_length_v6 > 128 {
            bad(format!(
                "aggregationLength {} / aggregationLengthV6 {}: at most 32 / 128",
                s.aggregation_length, s.aggregation_length_v6
            ));
            continue;
        }
        let communities: Result<BTreeSet<u32>, String> =
            s.communities.iter().map(|c| parse_community(c)).collect();
        let communities = match communities {
            Ok(c) => c.into_iter().collect(),
            Err(e) => {
                bad(e);
                continue;
            }
        };
        if !selector::any_api_matches(&s.node_selectors, &my_labels) {
            continue;
        }
        ads.push(Ad {
            spec: s,
            attrs: RouteAttrs {
                local_pref: s.local_pref,
                communities,
            },
        });
    }
    if ads.is_empty() {
        return out;
    }

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
    let slices = slices_by_service(input.slices);
    let peer_names: Vec<String> = out.peers.keys().cloned().collect();
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
        if local {
            let ready = slices
                .get(&(key.namespace.as_str(), key.name.as_str()))
                .map(|s| ready_endpoint_nodes(s))
                .unwrap_or_default();
            if !ready.contains(input.me) {
                continue;
            }
        }
        for ip in ips {
            let Some(pool) = pools.iter().find(|p| p.contains(ip)) else {
                continue;
            };
            for ad in ads.iter().filter(|a| a.selects_pool(pool)) {
                let Some(prefix) = ad.prefix(ip) else {
                    continue;
                };
                let targets = peer_names
                    .iter()
                    .filter(|p| ad.spec.peers.is_empty() || ad.spec.peers.iter().any(|n| n == *p));
                for peer in targets {
                    let Some(planned) = out.peers.get_mut(peer) else {
                        continue;
                    };
                    let attrs = planned.routes.entry(prefix).or_default();
                    merge(attrs, &ad.attrs);
                    out.services
                        .entry((key.namespace.clone(), key.name.clone()))
                        .or_default()
                        .insert(peer.clone());
                }
            }
        }
    }
    out
}

/// Two advertisements for one prefix and peer: the communities add up, the higher LOCAL_PREF
/// wins (deterministic whatever the order).
fn merge(into: &mut RouteAttrs, from: &RouteAttrs) {
    into.local_pref = match (into.local_pref, from.local_pref) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let mut c: BTreeSet<u32> = into.communities.iter().copied().collect();
    c.extend(from.communities.iter().copied());
    into.communities = c.into_iter().collect();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).expect("valid object")
    }

    fn node(name: &str, zone: &str) -> Arc<Node> {
        Arc::new(obj(
            json!({"metadata": {"name": name, "labels": {"zone": zone}}}),
        ))
    }

    fn svc(name: &str, ip: &str, policy: &str) -> Arc<Service> {
        Arc::new(obj(json!({
            "metadata": {"namespace": "shop", "name": name, "uid": format!("uid-{name}")},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": policy, "ports": [{"port": 80}]},
            "status": {"loadBalancer": {"ingress": [{"ip": ip}]}}
        })))
    }

    fn pool(name: &str, addresses: &[&str]) -> IPAddressPool {
        obj(
            json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "IPAddressPool",
            "metadata": {"name": name, "labels": {"tier": name}}, "spec": {"addresses": addresses}}),
        )
    }

    fn peer(name: &str, spec: serde_json::Value) -> BGPPeer {
        obj(
            json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "BGPPeer",
            "metadata": {"name": name}, "spec": spec}),
        )
    }

    fn ad(name: &str, spec: serde_json::Value) -> BGPAdvertisement {
        obj(
            json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "BGPAdvertisement",
            "metadata": {"name": name}, "spec": spec}),
        )
    }

    fn fast() -> BFDProfile {
        obj(
            json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "BFDProfile",
            "metadata": {"name": "fast"},
            "spec": {"receiveInterval": 100, "transmitInterval": 100, "detectMultiplier": 3}}),
        )
    }

    fn slice(svc: &str, nodes: &[(&str, bool)]) -> Arc<EndpointSlice> {
        let endpoints: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(i, (n, ready))| {
                json!({"addresses": [format!("10.0.0.{i}")], "nodeName": n,
                "conditions": {"ready": ready}})
            })
            .collect();
        Arc::new(obj(
            json!({"metadata": {"namespace": "shop", "name": format!("{svc}-x"),
            "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "endpoints": endpoints}),
        ))
    }

    struct World {
        peers: Vec<BGPPeer>,
        ads: Vec<BGPAdvertisement>,
        pools: Vec<IPAddressPool>,
        services: Vec<Arc<Service>>,
        slices: Vec<Arc<EndpointSlice>>,
    }

    impl World {
        /// The issue's example: BGPPeer {myASN 64500, peerASN 64501, 192.0.2.254, holdTime 9s,
        /// keepaliveTime 3s, bfdProfile fast}, BFDProfile fast 100/100/3, BGPAdvertisement
        /// {ipAddressPools: [pool]}.
        fn example() -> World {
            World {
                peers: vec![peer(
                    "tor",
                    json!({"myASN": 64500, "peerASN": 64501, "peerAddress": "192.0.2.254",
                        "holdTime": "9s", "keepaliveTime": "3s", "bfdProfile": "fast"}),
                )],
                ads: vec![ad("ad", json!({"ipAddressPools": ["pool"]}))],
                pools: vec![
                    pool("pool", &["203.0.113.0/24", "2001:db8:ff::/120"]),
                    pool("other", &["198.51.100.0/24"]),
                ],
                services: vec![
                    svc("web", "203.0.113.10", "Cluster"),
                    svc("api", "203.0.113.11", "Local"),
                    svc("v6", "2001:db8:ff::10", "Cluster"),
                    svc("elsewhere", "198.51.100.7", "Cluster"),
                ],
                slices: vec![slice("api", &[("n1", true), ("n2", false)])],
            }
        }

        fn plan(&self, me: &str) -> BgpPlan {
            let nodes = vec![node("n1", "a"), node("n2", "a"), node("n3", "b")];
            plan(&BgpInputs {
                me,
                my_ipv4: Some(Ipv4Addr::new(192, 0, 2, 10)),
                peers: &self.peers,
                advertisements: &self.ads,
                bfd_profiles: &[fast()],
                pools: &self.pools,
                services: &self.services,
                nodes: &nodes,
                slices: &self.slices,
                class: "palisade.dev/palisade",
                claim_unclassed: true,
            })
        }
    }

    fn nets(list: &[&str]) -> BTreeSet<IpNetwork> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn issue_example_cluster_and_local_policy() {
        let w = World::example();
        let p1 = w.plan("n1");
        assert!(p1.problems.is_empty(), "{:?}", p1.problems);
        let tor = &p1.peers["tor"];
        assert_eq!(tor.peer_address, "192.0.2.254".parse::<IpAddr>().unwrap());
        assert_eq!(
            (tor.my_asn, tor.peer_asn, tor.peer_port),
            (64500, 64501, 179)
        );
        assert_eq!(tor.hold_time, Duration::from_secs(9));
        assert_eq!(tor.keepalive_time, Some(Duration::from_secs(3)));
        assert_eq!(tor.router_id, Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(
            tor.bfd,
            Some(BfdTimers {
                receive_interval: Duration::from_millis(100),
                transmit_interval: Duration::from_millis(100),
                detect_multiplier: 3,
                passive: false,
                minimum_ttl: 255,
            })
        );
        // n1 has the Local Service's ready endpoint; the other pool is not advertised.
        let got: BTreeSet<IpNetwork> = tor.routes.keys().copied().collect();
        assert_eq!(
            got,
            nets(&["203.0.113.10/32", "203.0.113.11/32", "2001:db8:ff::10/128"])
        );
        assert_eq!(
            p1.services.keys().map(|k| k.1.as_str()).collect::<Vec<_>>(),
            vec!["api", "v6", "web"]
        );
        // n2's endpoint is not ready, n3 has none: only the Cluster Services.
        for me in ["n2", "n3"] {
            let p = w.plan(me);
            let got: BTreeSet<IpNetwork> = p.peers["tor"].routes.keys().copied().collect();
            assert_eq!(
                got,
                nets(&["203.0.113.10/32", "2001:db8:ff::10/128"]),
                "{me}"
            );
        }
    }

    #[test]
    fn selectors_peers_aggregation_and_attributes() {
        let mut w = World::example();
        w.peers.push(peer(
            "zone-b-router",
            json!({"myASN": 64500, "peerASN": 64500, "peerAddress": "2001:db8::fe",
                "routerID": "10.9.9.9", "nodeSelectors": [{"matchLabels": {"zone": "b"}}]}),
        ));
        w.ads = vec![
            ad(
                "agg",
                json!({"ipAddressPoolSelectors": [{"matchLabels": {"tier": "pool"}}],
                    "aggregationLength": 24, "aggregationLengthV6": 120,
                    "peers": ["zone-b-router"], "localPref": 50,
                    "communities": ["64500:1", "no-export"]}),
            ),
            ad(
                "host",
                json!({"ipAddressPools": ["pool"], "peers": ["zone-b-router"],
                    "localPref": 200, "communities": ["64500:2"],
                    "nodeSelectors": [{"matchLabels": {"zone": "b"}}]}),
            ),
        ];
        // n1 is not selected by the zone-b peer; "tor" gets no advertisement.
        let p1 = w.plan("n1");
        assert_eq!(p1.peers.keys().collect::<Vec<_>>(), vec!["tor"]);
        assert!(p1.peers["tor"].routes.is_empty());
        let p3 = w.plan("n3");
        let b = &p3.peers["zone-b-router"];
        assert_eq!(b.router_id, Ipv4Addr::new(10, 9, 9, 9));
        assert_eq!(b.hold_time, Duration::from_secs(90));
        assert_eq!(b.bfd, None);
        let agg = RouteAttrs {
            local_pref: Some(50),
            communities: vec![(64500 << 16) | 1, 0xFFFF_FF01],
        };
        let host = RouteAttrs {
            local_pref: Some(200),
            communities: vec![(64500 << 16) | 2],
        };
        let want: BTreeMap<IpNetwork, RouteAttrs> = [
            ("203.0.113.0/24", agg.clone()),
            ("2001:db8:ff::/120", agg),
            ("203.0.113.10/32", host.clone()),
            ("2001:db8:ff::10/128", host),
        ]
        .into_iter()
        .map(|(n, a)| (n.parse().unwrap(), a))
        .collect();
        assert_eq!(b.routes, want);
        assert!(p3.peers["tor"].routes.is_empty());
    }

    #[test]
    fn problems_are_reported_per_object() {
        let mut w = World::example();
        w.peers = vec![
            peer(
                "bad-addr",
                json!({"myASN": 1, "peerASN": 2, "peerAddress": "router"}),
            ),
            peer(
                "md5",
                json!({"myASN": 1, "peerASN": 2, "peerAddress": "192.0.2.1",
                    "passwordSecret": {"name": "s"}}),
            ),
            peer(
                "hold",
                json!({"myASN": 1, "peerASN": 2, "peerAddress": "192.0.2.2", "holdTime": "1s"}),
            ),
            peer(
                "nobfd",
                json!({"myASN": 1, "peerASN": 2, "peerAddress": "192.0.2.3", "bfdProfile": "gone"}),
            ),
        ];
        w.ads
            .push(ad("bad-comm", json!({"communities": ["1:2:3"]})));
        w.ads.push(ad("bad-len", json!({"aggregationLength": 33})));
        let p = w.plan("n1");
        let reasons: Vec<(&str, &str)> = p
            .problems
            .iter()
            .map(|x| (x.name.as_str(), x.reason))
            .collect();
        assert_eq!(
            reasons,
            vec![
                ("bad-addr", reason::INVALID_PEER),
                ("md5", reason::UNSUPPORTED),
                ("hold", reason::INVALID_PEER),
                ("nobfd", reason::UNKNOWN_BFD_PROFILE),
                ("bad-comm", reason::INVALID_ADVERTISEMENT),
                ("bad-len", reason::INVALID_ADVERTISEMENT),
            ]
        );
        // The peer with the unknown profile still runs (without BFD) and gets the routes.
        assert_eq!(p.peers.keys().collect::<Vec<_>>(), vec!["nobfd"]);
        assert_eq!(p.peers["nobfd"].bfd, None);
        assert_eq!(p.peers["nobfd"].routes.len(), 3);
    }

    #[test]
    fn excluded_node_and_no_ipv4_router_id() {
        let w = World::example();
        let nodes = vec![Arc::new(obj::<Node>(json!({"metadata": {"name": "n1",
            "labels": {"node.kubernetes.io/exclude-from-external-load-balancers": ""}}})))];
        let input = |my_ipv4| BgpInputs {
            me: "n1",
            my_ipv4,
            peers: &w.peers,
            advertisements: &w.ads,
            bfd_profiles: &[],
            pools: &w.pools,
            services: &w.services,
            nodes: &nodes,
            slices: &w.slices,
            class: "palisade.dev/palisade",
            claim_unclassed: true,
        };
        let p = plan(&input(Some(Ipv4Addr::new(192, 0, 2, 1))));
        // The session exists (the router sees the node) but carries nothing.
        assert!(p.peers["tor"].routes.is_empty());
        let p = plan(&input(None));
        assert!(p.peers.is_empty());
        assert!(p.problems.iter().any(|x| x.reason == reason::NO_ROUTER_ID));
    }

    #[test]
    fn communities() {
        assert_eq!(parse_community("64500:100"), Ok((64500 << 16) | 100));
        assert_eq!(parse_community("no-advertise"), Ok(0xFFFF_FF02));
        assert!(parse_community("70000:1").is_err());
        assert!(parse_community("1:2:3").is_err());
        assert!(parse_community("").is_err());
    }

    #[test]
    fn thousand_services_plan() {
        let mut w = World::example();
        w.pools = vec![pool("pool", &["10.128.0.0/16"])];
        w.services = (0..1000)
            .map(|i| {
                svc(
                    &format!("s{i}"),
                    &format!("10.128.{}.{}", i / 250, i % 250 + 1),
                    "Cluster",
                )
            })
            .collect();
        let p = w.plan("n2");
        assert_eq!(p.peers["tor"].routes.len(), 1000);
        assert_eq!(p.services.len(), 1000);
    }
}
