//! Prometheus metrics of the agent (served as text on `/metrics`).
//!
//! Names follow Prometheus conventions with the `palisade_` prefix. The registry is built
//! once; reconcilers get an `Arc<Metrics>` and update the families they own.
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label set: a list of (name, value) pairs.
pub type Labels = Vec<(&'static str, String)>;

pub fn labels1(k: &'static str, v: impl Into<String>) -> Labels {
    vec![(k, v.into())]
}

pub struct Metrics {
    registry: Registry,
    pub ready: Gauge,
    pub watch_events: Family<Labels, Counter>,
    pub watch_errors: Family<Labels, Counter>,
    pub invalid_objects: Family<Labels, Gauge>,
    pub is_leader: Gauge,
    pub leader_transitions: Counter,
    pub events_published: Family<Labels, Counter>,
    pub sync_errors: Family<Labels, Counter>,
    pub netpol_sync_duration: Histogram,
    pub netpol_syncs: Family<Labels, Counter>,
    pub netpol_rules: Gauge,
    pub netpol_ipsets: Gauge,
    pub netpol_ipset_members: Gauge,
    pub netpol_payload_bytes: Gauge,
    pub netpol_diagnostics: Gauge,
    pub netpol_pods_unprotected: Gauge,
    /// Conntrack entries deleted because the rules now deny their flow (revocation).
    pub netpol_revoked_connections: Counter,
    pub netpol_last_success: Gauge<f64, AtomicU64>,
    /// `palisade_netpol_denied_packets_total{direction,namespace,pod}`: packets of this
    /// node's pods dropped and logged (after the kernel's per-pod rate limit).
    pub netpol_denied_packets: Family<Labels, Counter>,
    /// The same for audit-mode policies (`would-deny`, not dropped).
    pub netpol_would_deny_packets: Family<Labels, Counter>,
    pub lb_addresses_total: Family<Labels, Gauge>,
    pub lb_addresses_in_use: Family<Labels, Gauge>,
    pub lb_services_allocated: Gauge,
    pub lb_allocation_errors: Family<Labels, Counter>,
    pub lb_status_writes: Family<Labels, Counter>,
    pub l2_owned_ips: Gauge,
    /// LoadBalancer IPs on a local interface (kube-proxy IPVS) while ARP is not strict.
    pub l2_kernel_arp_conflicts: Gauge,
    pub l2_requests: Counter,
    pub l2_replies: Counter,
    pub l2_gratuitous: Counter,
    pub l2_status_writes: Family<Labels, Counter>,
    pub members_alive: Gauge,
    /// `palisade_memberlist_rejected_total{reason}` (see `memberlist_wire::Reject`).
    pub memberlist_rejected: Family<Labels, Counter>,
    pub bgp: BgpMetrics,
}

/// BGP mode's families, all labelled by `peer` (the BGPPeer's name).
#[derive(Default)]
pub struct BgpMetrics {
    /// `palisade_bgp_session_up{peer}`: 1 while Established.
    pub session_up: Family<Labels, Gauge>,
    /// `palisade_bgp_session_established_total{peer}`: times the session came up.
    pub established: Family<Labels, Counter>,
    /// `palisade_bgp_prefixes_sent{peer}`: routes the router has from this node.
    pub prefixes_sent: Family<Labels, Gauge>,
    /// `palisade_bgp_updates_sent_total{peer}`.
    pub updates_sent: Family<Labels, Counter>,
    /// `palisade_bgp_bfd_up{peer}`: 1 while the BFD session is Up (absent without BFD).
    pub bfd_up: Family<Labels, Gauge>,
    /// `palisade_bgp_bfd_flaps_total{peer}`: BFD went from Up to Down.
    pub bfd_flaps: Family<Labels, Counter>,
}

impl BgpMetrics {
    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("bgp");
        r.register(
            "session_up",
            "1 while the BGP session with the peer is Established",
            self.session_up.clone(),
        );
        r.register(
            "session_established",
            "Times the BGP session with the peer reached Established",
            self.established.clone(),
        );
        r.register(
            "prefixes_sent",
            "Prefixes the peer currently has from this node",
            self.prefixes_sent.clone(),
        );
        r.register(
            "updates_sent",
            "BGP UPDATE messages sent to the peer",
            self.updates_sent.clone(),
        );
        r.register(
            "bfd_up",
            "1 while the BFD session with the peer is Up",
            self.bfd_up.clone(),
        );
        r.register(
            "bfd_flaps",
            "Times the BFD session with the peer went from Up to Down",
            self.bfd_flaps.clone(),
        );
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("palisade");
        let ready = Gauge::default();
        let watch_events = Family::<Labels, Counter>::default();
        let watch_errors = Family::<Labels, Counter>::default();
        let invalid_objects = Family::<Labels, Gauge>::default();
        let is_leader = Gauge::default();
        let leader_transitions = Counter::default();
        let events_published = Family::<Labels, Counter>::default();
        let sync_errors = Family::<Labels, Counter>::default();
        registry.register(
            "sync_errors",
            "Failed reconciler syncs (retried with backoff), by job and error",
            sync_errors.clone(),
        );
        let netpol_sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let netpol_syncs = Family::<Labels, Counter>::default();
        let netpol_rules = Gauge::default();
        let netpol_ipsets = Gauge::default();
        let netpol_ipset_members = Gauge::default();
        let netpol_payload_bytes = Gauge::default();
        let netpol_diagnostics = Gauge::default();
        let netpol_pods_unprotected = Gauge::default();
        let netpol_revoked_connections = Counter::default();
        let netpol_last_success = Gauge::<f64, AtomicU64>::default();
        let netpol_denied_packets = Family::<Labels, Counter>::default();
        let netpol_would_deny_packets = Family::<Labels, Counter>::default();
        registry.register(
            "netpol_denied_packets",
            "Packets of this node's pods dropped by NetworkPolicy and logged (rate-limited per pod), by direction and pod",
            netpol_denied_packets.clone(),
        );
        registry.register(
            "netpol_would_deny_packets",
            "Packets of this node's pods an audit-mode NetworkPolicy would drop (let through and logged), by direction and pod",
            netpol_would_deny_packets.clone(),
        );

        let lb_addresses_total = Family::<Labels, Gauge>::default();
        let lb_addresses_in_use = Family::<Labels, Gauge>::default();
        let lb_services_allocated = Gauge::default();
        let lb_allocation_errors = Family::<Labels, Counter>::default();
        let lb_status_writes = Family::<Labels, Counter>::default();
        let l2_owned_ips = Gauge::default();
        let l2_kernel_arp_conflicts = Gauge::default();
        let l2_requests = Counter::default();
        let l2_replies = Counter::default();
        let l2_gratuitous = Counter::default();
        let l2_status_writes = Family::<Labels, Counter>::default();
        let members_alive = Gauge::default();
        let memberlist_rejected = Family::<Labels, Counter>::default();
        let build_info = Family::<Labels, Gauge>::default();
        build_info
            .get_or_create(&labels1("version", env!("CARGO_PKG_VERSION")))
            .set(1);
        registry.register("build_info", "Palisade build information", build_info);
        registry.register(
            "ready",
            "1 when every watch has listed once and the agent is not shutting down",
            ready.clone(),
        );
        registry.register(
            "watch_events",
            "Watch events received, by resource",
            watch_events.clone(),
        );
        registry.register(
            "watch_errors",
            "Watch errors (retried with backoff), by resource",
            watch_errors.clone(),
        );
        registry.register(
            "invalid_objects",
            "Custom resources currently skipped because they do not parse, by kind",
            invalid_objects.clone(),
        );
        registry.register(
            "leader",
            "1 while this agent holds the allocator Lease",
            is_leader.clone(),
        );
        registry.register(
            "leader_transitions",
            "Times this agent gained or lost the allocator Lease",
            leader_transitions.clone(),
        );
        registry.register(
            "events_published",
            "Kubernetes Events published, by reason and result",
            events_published.clone(),
        );
        registry.register(
            "netpol_sync_duration_seconds",
            "Time of one NetworkPolicy sync (model, compile, render, apply)",
            netpol_sync_duration.clone(),
        );
        registry.register(
            "netpol_syncs",
            "NetworkPolicy syncs by result (applied, unchanged, failed)",
            netpol_syncs.clone(),
        );
        registry.register(
            "netpol_rules",
            "iptables rules Palisade currently programs",
            netpol_rules.clone(),
        );
        registry.register(
            "netpol_ipsets",
            "ipsets Palisade currently programs",
            netpol_ipsets.clone(),
        );
        registry.register(
            "netpol_ipset_members",
            "Members over all of Palisade's ipsets",
            netpol_ipset_members.clone(),
        );
        registry.register(
            "netpol_payload_bytes",
            "Size of the last rendered ipset + iptables payload",
            netpol_payload_bytes.clone(),
        );
        registry.register(
            "netpol_diagnostics",
            "Problems found in the last compile (unknown named ports, bad protocols, ...)",
            netpol_diagnostics.clone(),
        );
        registry.register(
            "netpol_pods_unprotected",
            "Local pods whose source addresses anti-spoofing cannot check (interface unknown)",
            netpol_pods_unprotected.clone(),
        );
        registry.register(
            "netpol_revoked_connections",
            "Connections cut after a policy change denied them (conntrack entries deleted)",
            netpol_revoked_connections.clone(),
        );
        registry.register(
            "netpol_last_success_timestamp_seconds",
            "Unix time of the last successful NetworkPolicy sync",
            netpol_last_success.clone(),
        );
        registry.register(
            "allocator_addresses",
            "Addresses in each IPAddressPool, by pool and family (saturates at i64::MAX)",
            lb_addresses_total.clone(),
        );
        registry.register(
            "allocator_addresses_in_use",
            "Addresses of each IPAddressPool assigned to Services, by pool and family",
            lb_addresses_in_use.clone(),
        );
        registry.register(
            "allocator_services_allocated",
            "LoadBalancer Services holding addresses from Palisade",
            lb_services_allocated.clone(),
        );
        registry.register(
            "allocator_errors",
            "Failed allocations, by reason (PoolExhausted, IPNotInPool, ...)",
            lb_allocation_errors.clone(),
        );
        registry.register(
            "allocator_status_writes",
            "Status writes by the allocator, by resource and result",
            lb_status_writes.clone(),
        );
        registry.register(
            "l2_owned_ips",
            "LoadBalancer IPs this node answers ARP/NDP for",
            l2_owned_ips.clone(),
        );
        registry.register(
            "l2_kernel_arp_conflicts",
            "LoadBalancer IPs on a local interface (kube-proxy IPVS kube-ipvs0) while arp_ignore/arp_announce are not strict: the kernel would answer ARP for them",
            l2_kernel_arp_conflicts.clone(),
        );
        registry.register(
            "l2_requests_received",
            "ARP requests and Neighbor Solicitations received",
            l2_requests.clone(),
        );
        registry.register(
            "l2_replies_sent",
            "ARP replies and Neighbor Advertisements sent for owned IPs",
            l2_replies.clone(),
        );
        registry.register(
            "l2_gratuitous_sent",
            "Gratuitous ARP and unsolicited Neighbor Advertisements sent",
            l2_gratuitous.clone(),
        );
        registry.register(
            "l2_status_writes",
            "ServiceL2Status writes by this node, by op (create, update, delete) and result",
            l2_status_writes.clone(),
        );
        registry.register(
            "members_alive",
            "Agents (this one included) heard from within the membership timeout",
            members_alive.clone(),
        );
        registry.register(
            "memberlist_rejected",
            "Membership datagrams dropped, by reason (bad_mac, unknown_key, replay, clock, \
             source_address, ...)",
            memberlist_rejected.clone(),
        );
        let bgp = BgpMetrics::default();
        bgp.register(&mut registry);
        Metrics {
            registry,
            bgp,
            l2_owned_ips,
            l2_kernel_arp_conflicts,
            l2_requests,
            l2_replies,
            l2_gratuitous,
            l2_status_writes,
            members_alive,
            memberlist_rejected,
            lb_addresses_total,
            lb_addresses_in_use,
            lb_services_allocated,
            lb_allocation_errors,
            lb_status_writes,
            ready,
            watch_events,
            watch_errors,
            invalid_objects,
            is_leader,
            leader_transitions,
            events_published,
            sync_errors,
            netpol_sync_duration,
            netpol_syncs,
            netpol_rules,
            netpol_ipsets,
            netpol_ipset_members,
            netpol_payload_bytes,
            netpol_diagnostics,
            netpol_pods_unprotected,
            netpol_revoked_connections,
            netpol_last_success,
            netpol_denied_packets,
            netpol_would_deny_packets,
        }
    }

    /// Registers a metric owned by a reconciler module (must happen before serving).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_known_families() {
        let m = Metrics::new();
        m.watch_events
            .get_or_create(&labels1("resource", "pods"))
            .inc();
        m.netpol_sync_duration.observe(0.02);
        let text = m.encode();
        assert!(
            text.contains("palisade_watch_events_total{resource=\"pods\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("palisade_netpol_sync_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("palisade_build_info{version="), "{text}");
        assert!(text.trim_end().ends_with("# EOF"));
    }
}
