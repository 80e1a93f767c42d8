//! The BGP announcement reconciler: every agent computes alone (with the pure
//! `palisade_loadbalancer::bgp::plan`) which routers it peers with and which prefixes it
//! announces to each, and hands that to its BGP speaker (`palisade-bgp`).
//!
//! ```text
//!  caches: BGPPeer, BGPAdvertisement, BFDProfile, IPAddressPool, Service, Node, EndpointSlice
//!      │
//!      ▼  bgp::plan (pure)         PlannedPeer ─► PeerConfig (next hops from the Node's
//!  peers + routes per peer ──────►              InternalIPs) ─► Speaker::set_peers
//!                                  routes      ─► Speaker::set_routes (diffs go out)
//!  shutdown ─► Speaker::shutdown: withdraw everything, wait until each router closed
//! ```
//!
//! There is no election and no membership: every eligible node announces, the routers spread
//! the flows (ECMP) and drop a node whose session ends (BFD, hold timer, or its graceful
//! withdrawal on SIGTERM). The allocator and the pools are shared with L2 mode; one pool may
//! be announced by both.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, ObjectReference, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use kube::runtime::reflector::Store;
use palisade_bgp::bfd::BfdConfig;
use palisade_bgp::{PeerConfig, PeerStatus, RouteAttrs, Routes, SessionState, Speaker};
use palisade_loadbalancer::bgp::{plan, BgpInputs, BgpPlan, PlannedPeer, Problem};
use palisade_loadbalancer::crd::{BFDProfile, BGPAdvertisement, BGPPeer};
use palisade_loadbalancer::IPAddressPool;
use palisade_runtime::config::SyncSettings;
use palisade_runtime::events::EventSink;
use palisade_runtime::metrics::{labels1, Metrics};
use palisade_runtime::stores::{palisade_api_resource, typed_objects, CacheGroup, Caches};
use palisade_runtime::sync::{run_sync_loop, JobError, Trigger};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub mod status;

/// Why a pass failed (retried with backoff). Planning itself cannot fail: problems with
/// single objects are reported and skipped.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("the BGP speaker has no session for peer {0} after set_peers")]
    MissingPeer(String),
}

impl JobError for PassError {
    fn label(&self) -> &'static str {
        match self {
            PassError::MissingPeer(_) => "bgp_speaker",
        }
    }
}

/// Event reason on a BGP object whose configuration cannot be used as written.
pub const BGP_CONFIG_PROBLEM: &str = "BGPConfigProblem";
/// Event reasons on a BGPPeer when this node's session with it comes up / goes down.
pub const BGP_SESSION_ESTABLISHED: &str = "BGPSessionEstablished";
pub const BGP_SESSION_DOWN: &str = "BGPSessionDown";

/// The caches the BGP reconciler reads.
#[derive(Clone)]
pub struct BgpCaches {
    pub services: Store<Service>,
    pub nodes: Store<Node>,
    pub endpoint_slices: Store<EndpointSlice>,
    pub ip_address_pools: Store<DynamicObject>,
    pub bgp_peers: Store<DynamicObject>,
    pub bgp_advertisements: Store<DynamicObject>,
    pub bfd_profiles: Store<DynamicObject>,
    pub group: CacheGroup,
}

impl BgpCaches {
    /// Registers what the BGP reconciler reads; every change pokes `trigger`.
    pub fn register(caches: &mut Caches, trigger: &Trigger) -> BgpCaches {
        let mut r = caches.register(trigger);
        BgpCaches {
            services: r.watch(),
            nodes: r.watch(),
            endpoint_slices: r.watch(),
            ip_address_pools: r
                .watch_custom(&palisade_api_resource("IPAddressPool", "ipaddresspools")),
            bgp_peers: r.watch_custom(&palisade_api_resource("BGPPeer", "bgppeers")),
            bgp_advertisements: r.watch_custom(&palisade_api_resource(
                "BGPAdvertisement",
                "bgpadvertisements",
            )),
            bfd_profiles: r.watch_custom(&palisade_api_resource("BFDProfile", "bfdprofiles")),
            group: r.finish(),
        }
    }
}

/// A node's InternalIP addresses, first of each family.
pub fn node_addresses(node: Option<&Node>) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let mut v4 = None;
    let mut v6 = None;
    let addrs = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref());
    for a in addrs.into_iter().flatten() {
        if a.type_ != "InternalIP" {
            continue;
        }
        match a.address.parse::<IpAddr>().map(|ip| ip.to_canonical()) {
            Ok(IpAddr::V4(ip)) if v4.is_none() => v4 = Some(ip),
            Ok(IpAddr::V6(ip)) if v6.is_none() => v6 = Some(ip),
            _ => {}
        }
    }
    (v4, v6)
}

/// The speaker's session settings for a planned peer. Next hops: the session's own local
/// address for its family (the speaker's default), the node's InternalIP of the other family
/// for the other one (a v6 prefix over a v4 session), unless the peer's source address fixes
/// it.
pub fn peer_config(p: &PlannedPeer, v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) -> PeerConfig {
    let mut c = PeerConfig::new(&p.name, p.my_asn, p.peer_asn, p.peer_address);
    c.peer_port = p.peer_port;
    c.source_address = p.source_address;
    c.hold_time = p.hold_time;
    c.keepalive_time = p.keepalive_time;
    c.router_id = p.router_id;
    match p.peer_address {
        IpAddr::V4(_) => c.next_hop_v6 = v6,
        IpAddr::V6(_) => c.next_hop_v4 = v4,
    }
    c.bfd = p.bfd.map(|b| BfdConfig {
        desired_min_tx: b.transmit_interval,
        required_min_rx: b.receive_interval,
        detect_mult: b.detect_multiplier,
        passive: b.passive,
        minimum_ttl: b.minimum_ttl,
    });
    c
}

/// A planned peer's routes in the speaker's terms.
pub fn speaker_routes(p: &PlannedPeer) -> Routes {
    p.routes
        .iter()
        .map(|(net, a)| {
            (
                *net,
                RouteAttrs {
                    local_pref: a.local_pref,
                    communities: a.communities.clone(),
                },
            )
        })
        .collect()
}

pub struct BgpReconciler {
    pub node_name: String,
    pub stores: BgpCaches,
    pub metrics: Arc<Metrics>,
    pub events: EventSink,
    pub settings: SyncSettings,
    pub speaker: Arc<Speaker>,
    pub class: String,
    pub claim_unclassed: bool,
    /// How long the graceful withdrawal on shutdown may take.
    pub shutdown_limit: Duration,
    /// After every pass: the plan, for the status writer and tests.
    pub plan: watch::Sender<Option<BgpPlan>>,
}

impl BgpReconciler {
    pub async fn run(self, trigger: Trigger, shutdown: CancellationToken) {
        if !self.stores.group.synced(&shutdown).await {
            return;
        }
        let this = Arc::new(self);
        // Session states → metrics and Events, once a second.
        {
            let this = this.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut last = BTreeMap::new();
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    last = this.observe_sessions(last).await;
                }
            });
        }
        let reported = Arc::new(tokio::sync::Mutex::new(Vec::<Problem>::new()));
        trigger.poke();
        let metrics = Some(this.metrics.clone());
        run_sync_loop(this.settings, trigger, shutdown, "bgp", metrics, |_| {
            let this = this.clone();
            let reported = reported.clone();
            async move { this.pass(&mut *reported.lock().await).await }
        })
        .await;
        // SIGTERM: withdraw every route and wait until each router has it, so that a rolling
        // update of the DaemonSet blackholes nothing.
        tracing::info!("withdrawing BGP routes before exit");
        this.speaker.shutdown(this.shutdown_limit).await;
        tracing::info!("BGP sessions closed");
    }

    /// Copies the speaker's per-peer status into the metrics, and sends an Event on the
    /// BGPPeer when a session comes up or goes down. Returns what it saw.
    async fn observe_sessions(
        &self,
        last: BTreeMap<String, PeerStatus>,
    ) -> BTreeMap<String, PeerStatus> {
        let now: BTreeMap<String, PeerStatus> = self
            .speaker
            .status()
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let m = &self.metrics.bgp;
        for (name, s) in &now {
            let l = labels1("peer", name.clone());
            let before = last.get(name);
            m.session_up
                .get_or_create(&l)
                .set(i64::from(s.state == SessionState::Established));
            m.prefixes_sent
                .get_or_create(&l)
                .set(s.prefixes_sent as i64);
            // Counters of a restarted session start again from 0.
            let delta = |now: u64, then: Option<u64>| match then {
                Some(t) if t <= now => now - t,
                _ => now,
            };
            m.updates_sent
                .get_or_create(&l)
                .inc_by(delta(s.updates_sent, before.map(|b| b.updates_sent)));
            m.established.get_or_create(&l).inc_by(delta(
                s.established_count,
                before.map(|b| b.established_count),
            ));
            if let Some(bfd) = s.bfd_state {
                m.bfd_up
                    .get_or_create(&l)
                    .set(i64::from(bfd == palisade_bgp::bfd::BfdState::Up));
                m.bfd_flaps
                    .get_or_create(&l)
                    .inc_by(delta(s.bfd_flaps, before.map(|b| b.bfd_flaps)));
            }
            let was_up = before.is_some_and(|b| b.state == SessionState::Established);
            let is_up = s.state == SessionState::Established;
            if was_up != is_up {
                let obj = ObjectReference {
                    api_version: Some("palisade.dev/v1alpha1".into()),
                    kind: Some("BGPPeer".into()),
                    name: Some(name.clone()),
                    ..Default::default()
                };
                if is_up {
                    let note = format!(
                        "node {}: session Established (hold time {:?})",
                        self.node_name,
                        s.hold_time.unwrap_or_default()
                    );
                    self.events
                        .normal(&obj, BGP_SESSION_ESTABLISHED, "Connect", note)
                        .await;
                } else {
                    let note = format!(
                        "node {}: session down: {}",
                        self.node_name,
                        s.last_down_reason.as_deref().unwrap_or("closed")
                    );
                    self.events
                        .warning(&obj, BGP_SESSION_DOWN, "Disconnect", note)
                        .await;
                }
            }
        }
        // Peers that went away: their series go too.
        for name in last.keys().filter(|n| !now.contains_key(*n)) {
            let l = labels1("peer", name.clone());
            m.session_up.remove(&l);
            m.prefixes_sent.remove(&l);
            m.bfd_up.remove(&l);
        }
        now
    }

    /// One pass: plan from the caches, hand the result to the speaker.
    pub async fn pass(&self, reported: &mut Vec<Problem>) -> Result<(), PassError> {
        let services = self.stores.services.state();
        let nodes = self.stores.nodes.state();
        let slices = self.stores.endpoint_slices.state();
        let (pools, _) = typed_objects::<IPAddressPool>(&self.stores.ip_address_pools.state());
        let (peers, bad_peers) = typed_objects::<BGPPeer>(&self.stores.bgp_peers.state());
        let (ads, bad_ads) =
            typed_objects::<BGPAdvertisement>(&self.stores.bgp_advertisements.state());
        let (profiles, _) = typed_objects::<BFDProfile>(&self.stores.bfd_profiles.state());
        let me = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()));
        let (v4, v6) = node_addresses(me.map(|n| n.as_ref()));
        let mut planned = plan(&BgpInputs {
            me: &self.node_name,
            my_ipv4: v4,
            peers: &peers,
            advertisements: &ads,
            bfd_profiles: &profiles,
            pools: &pools,
            services: &services,
            nodes: &nodes,
            slices: &slices,
            class: &self.class,
            claim_unclassed: self.claim_unclassed,
        });
        for (kind, bad) in [("BGPPeer", bad_peers), ("BGPAdvertisement", bad_ads)] {
            for (name, message) in bad {
                planned.problems.push(Problem {
                    kind,
                    name,
                    reason: BGP_CONFIG_PROBLEM,
                    message,
                });
            }
        }
        let configs: Vec<PeerConfig> = planned
            .peers
            .values()
            .map(|p| peer_config(p, v4, v6))
            .collect();
        self.speaker.set_peers(configs);
        for p in planned.peers.values() {
            if !self.speaker.set_routes(&p.name, speaker_routes(p)) {
                return Err(PassError::MissingPeer(p.name.clone()));
            }
        }
        if planned.problems != *reported {
            for pr in planned.problems.iter().filter(|p| !reported.contains(p)) {
                tracing::warn!(kind = pr.kind, name = %pr.name, reason = pr.reason, "{}", pr.message);
                let obj = ObjectReference {
                    api_version: Some("palisade.dev/v1alpha1".into()),
                    kind: Some(pr.kind.into()),
                    name: Some(pr.name.clone()),
                    ..Default::default()
                };
                self.events
                    .warning(&obj, pr.reason, "Configure", pr.message.clone())
                    .await;
            }
            *reported = planned.problems.clone();
        }
        let planned = Some(planned);
        self.plan.send_if_modified(|cur| {
            if *cur != planned {
                *cur = planned;
                true
            } else {
                false
            }
        });
        Ok(())
    }
}

/// Announced prefixes per peer name (for logs and tests).
pub fn routes_by_peer(plan: &BgpPlan) -> BTreeMap<String, usize> {
    plan.peers
        .iter()
        .map(|(n, p)| (n.clone(), p.routes.len()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_loadbalancer::bgp::BfdTimers;

    fn planned(addr: &str) -> PlannedPeer {
        PlannedPeer {
            name: "tor".into(),
            my_asn: 64500,
            peer_asn: 64501,
            peer_address: addr.parse().unwrap(),
            peer_port: 1179,
            source_address: None,
            hold_time: Duration::from_secs(9),
            keepalive_time: Some(Duration::from_secs(3)),
            router_id: Ipv4Addr::new(192, 0, 2, 10),
            bfd: Some(BfdTimers {
                receive_interval: Duration::from_millis(100),
                transmit_interval: Duration::from_millis(200),
                detect_multiplier: 3,
                passive: true,
                minimum_ttl: 255,
            }),
            ebgp_multi_hop: false,
            routes: [(
                "203.0.113.10/32".parse().unwrap(),
                palisade_loadbalancer::bgp::RouteAttrs {
                    local_pref: Some(7),
                    communities: vec![1, 2],
                },
            )]
            .into(),
        }
    }

    #[test]
    fn planned_peer_becomes_a_session_with_the_other_family_next_hop() {
        let v4 = Some(Ipv4Addr::new(192, 0, 2, 10));
        let v6: Option<Ipv6Addr> = Some("2001:db8::10".parse().unwrap());
        let c = peer_config(&planned("192.0.2.254"), v4, v6);
        assert_eq!(c.peer_port, 1179);
        assert_eq!(c.hold_time, Duration::from_secs(9));
        assert_eq!(c.keepalive_time, Some(Duration::from_secs(3)));
        assert_eq!(c.next_hop_v4, None, "the session's own address");
        assert_eq!(c.next_hop_v6, v6);
        let bfd = c.bfd.expect("bfd");
        assert_eq!(bfd.desired_min_tx, Duration::from_millis(200));
        assert_eq!(bfd.required_min_rx, Duration::from_millis(100));
        assert!(bfd.passive);
        let c6 = peer_config(&planned("2001:db8::fe"), v4, v6);
        assert_eq!((c6.next_hop_v4, c6.next_hop_v6), (v4, None));
        let r = speaker_routes(&planned("192.0.2.254"));
        assert_eq!(r.len(), 1);
        let attrs = r.values().next().unwrap();
        assert_eq!(
            (attrs.local_pref, attrs.communities.clone()),
            (Some(7), vec![1, 2])
        );
    }

    #[test]
    fn node_addresses_take_internal_ips_per_family() {
        let node: Node = serde_json_value(
            r#"{"metadata": {"name": "n1"}, "status": {"addresses": [
            {"type": "Hostname", "address": "n1"},
            {"type": "ExternalIP", "address": "198.51.100.1"},
            {"type": "InternalIP", "address": "192.0.2.10"},
            {"type": "InternalIP", "address": "2001:db8::10"},
            {"type": "InternalIP", "address": "192.0.2.99"}]}}"#,
        );
        assert_eq!(
            node_addresses(Some(&node)),
            (
                Some(Ipv4Addr::new(192, 0, 2, 10)),
                Some("2001:db8::10".parse().unwrap())
            )
        );
        assert_eq!(node_addresses(None), (None, None));
    }

    fn serde_json_value<T: serde::de::DeserializeOwned>(text: &str) -> T {
        serde_json::from_str(text).expect("valid JSON")
    }
}
