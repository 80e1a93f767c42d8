//! The L2 announcement reconciler: every agent decides alone (with the pure
//! `palisade_loadbalancer::l2::decide`) which LoadBalancer IPs it must answer ARP/NDP for,
//! and tells the speaker; [`status`] keeps the `ServiceL2Status` objects true.
//!
//! ```text
//!  Services (ours, with ingress IPs) ─┐
//!  IPAddressPools ─► pool of the IP ──┼─► L2Advertisements of the pool ─► eligible nodes
//!  Nodes (labels) ∩ live agents ──────┤      (nodeSelectors, exclude label, Local policy:
//!  EndpointSlices (Local policy) ─────┘       nodes with a ready endpoint)
//!                                                   │
//!                    winner = min sha256("node#ip") ─► mine? ─► Speaker::set_owned
//! ```
//!
//! Inputs come from the caches and from `palisade_membership` (agents' own heartbeats), so
//! an API outage changes nothing: announcements continue from the last known state, and a
//! dead agent's IPs move within the membership timeout. Until the membership has warmed up
//! the agent announces nothing (it cannot yet know who else is alive).
//!
//! Two rules keep one answer per IP across link failures (see [`gate_links`] and
//! [`apply`]): nothing is claimed on an interface that is down, or that came back up less
//! than one membership timeout ago (the agent was cut off, believed itself alone, and must
//! hear its peers again first); and whatever the speaker could not apply yet (an interface
//! down) is left to the speaker's own retries — it is no reason to back off, since the next
//! membership change must be acted on at once.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use kube::runtime::reflector::Store;
use palisade_loadbalancer::announce::{NodeReach, ReachInterface};
use palisade_loadbalancer::l2::{decide_with_memo, AnnounceInputs, ElectionMemo, IpDecision};
use palisade_loadbalancer::l2status::Snapshot;
use palisade_loadbalancer::{IPAddressPool, L2Advertisement};
use palisade_membership::handover::{blocker, taken_over, Block, Waits};
use palisade_membership::{Answering, Live, ServedInterface};
use palisade_runtime::config::SyncSettings;
use palisade_runtime::events::EventSink;
use palisade_runtime::metrics::Metrics;
use palisade_runtime::stores::{palisade_api_resource, typed_objects, CacheGroup, Caches};
use palisade_runtime::sync::{poke_on_change, run_sync_loop, JobError, Trigger};
use palisade_speaker::{Announcer, Owned, SpeakerError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub mod status;

/// Why an announcement pass failed (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("the speaker task died: {0}")]
    SpeakerTask(String),
    #[error("the speaker could not apply every announcement yet")]
    Speaker,
}

impl JobError for PassError {
    fn label(&self) -> &'static str {
        match self {
            PassError::SpeakerTask(_) => "speaker_task",
            PassError::Speaker => "speaker",
        }
    }
}

/// Event reason on a Service when this node starts announcing one of its IPs.
pub const L2_ANNOUNCED: &str = "L2Announced";
/// Warning on this node's Node: LoadBalancer IPs on a local interface while ARP is not
/// strict (kube-proxy IPVS without `strictARP`).
pub const L2_KERNEL_ARP: &str = "KernelAnswersARPForLoadBalancerIPs";

/// The caches the announcer reads.
#[derive(Clone)]
pub struct AnnouncerCaches {
    pub services: Store<Service>,
    pub nodes: Store<Node>,
    pub ip_address_pools: Store<DynamicObject>,
    pub l2_advertisements: Store<DynamicObject>,
    pub endpoint_slices: Store<EndpointSlice>,
    pub group: CacheGroup,
}

impl AnnouncerCaches {
    /// Registers what the announcer reads; every change pokes `trigger`.
    pub fn register(caches: &mut Caches, trigger: &Trigger) -> AnnouncerCaches {
        let mut r = caches.register(trigger);
        AnnouncerCaches {
            services: r.watch(),
            nodes: r.watch(),
            ip_address_pools: r
                .watch_custom(&palisade_api_resource("IPAddressPool", "ipaddresspools")),
            l2_advertisements: r.watch_custom(&palisade_api_resource(
                "L2Advertisement",
                "l2advertisements",
            )),
            endpoint_slices: r.watch(),
            group: r.finish(),
        }
    }
}

pub struct AnnouncerReconciler {
    pub node_name: String,
    pub stores: AnnouncerCaches,
    pub metrics: Arc<Metrics>,
    pub events: EventSink,
    pub settings: SyncSettings,
    pub speaker: Arc<dyn Announcer>,
    pub live: watch::Receiver<Live>,
    /// Peer addresses for the membership, refreshed from the Node cache.
    pub peers: watch::Sender<Option<palisade_membership::PeerMap>>,
    /// Where this node can announce, refreshed every pass and reported to peers by the
    /// membership (`MembershipSettings::reach`); the election uses everybody's reports.
    pub reach: watch::Sender<Vec<ServedInterface>>,
    /// What this node's speaker answers (IP → releasing), published after every apply and
    /// reported to peers by the membership (`MembershipSettings::owned`): the hand-over
    /// protocol ([`gate_handover`]).
    pub answering: watch::Sender<Answering>,
    pub class: String,
    pub claim_unclassed: bool,
    /// Drop the kernel's own ARP replies for LoadBalancer IPs this node does not own when
    /// they sit on a local interface with lax ARP sysctls (kube-proxy IPVS without strictARP).
    pub arp_filter: bool,
    /// Cordoned Nodes hand their IPs over (out-of-service ones always do).
    pub exclude_unschedulable: bool,
    /// After every pass: what the speaker holds and every IP's winner, for the
    /// `ServiceL2Status` writer ([`status`]).
    pub status: watch::Sender<Option<Snapshot>>,
}

/// The membership's reach reports as the election's input.
fn node_reach(reports: BTreeMap<String, Vec<ServedInterface>>) -> BTreeMap<String, NodeReach> {
    reports
        .into_iter()
        .map(|(node, ifaces)| {
            let interfaces = ifaces
                .into_iter()
                .map(|i| ReachInterface {
                    name: i.name,
                    up: i.up,
                    nets: i.nets,
                })
                .collect();
            (node, NodeReach { interfaces })
        })
        .collect()
}

/// What the announcer last saw of one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinkSeen {
    Down,
    /// Up; since when, if it was seen down before (`None`: up from the first look).
    Up(Option<Instant>),
}

/// Interfaces the announcer may claim IPs on now: up, and — if it saw them down — up for at
/// least `settle` (the membership timeout) since.
///
/// Why: an agent whose link is down hears no peer, believes it is alone and wins every IP; it
/// cannot answer for them, but the speaker would re-announce all of them (gratuitous ARP)
/// the moment the link came back, before the agent had heard its peers again — stealing the
/// other nodes' IPs from their clients and answering next to their owners for a while
/// (measured by `tests/examples/l2_failover_bench.rs`, link phase). Claims on a link are
/// therefore held back until the agent has listened on it for one membership timeout, like
/// the warm-up of a starting agent; while it is down nothing is claimed on it. Returns when
/// a pass is needed even without events: when the first settling link is due, or within
/// [`LINK_POLL`] while a link is down (it may come back without any other event).
fn gate_links(
    owned: &mut Owned,
    links: &mut BTreeMap<String, LinkSeen>,
    is_up: impl Fn(&str) -> bool,
    now: Instant,
    settle: Duration,
) -> Option<Instant> {
    let names: BTreeSet<String> = owned.values().flatten().cloned().collect();
    let mut recheck: Option<Instant> = None;
    let mut due = |t: Instant| recheck = Some(recheck.map_or(t, |r| r.min(t)));
    let mut usable = BTreeSet::new();
    for name in names {
        let seen = if is_up(&name) {
            match links.get(&name) {
                None => LinkSeen::Up(None),
                Some(LinkSeen::Down) => LinkSeen::Up(Some(now)),
                Some(up) => *up,
            }
        } else {
            LinkSeen::Down
        };
        links.insert(name.clone(), seen);
        match seen {
            LinkSeen::Up(None) => {
                usable.insert(name);
            }
            LinkSeen::Up(Some(t)) if now.saturating_duration_since(t) >= settle => {
                links.insert(name.clone(), LinkSeen::Up(None));
                usable.insert(name);
            }
            LinkSeen::Up(Some(t)) => due(t + settle),
            LinkSeen::Down => due(now + LINK_POLL),
        }
    }
    owned.retain(|_, ifaces| {
        ifaces.retain(|i| usable.contains(i));
        !ifaces.is_empty()
    });
    recheck
}

/// How often a link that is down is looked at again (when nothing else causes a pass).
const LINK_POLL: Duration = Duration::from_millis(500);

/// Whether a network interface is operationally up (`/sys/class/net/<name>/operstate` is
/// `up`, or `unknown` for drivers that do not report it). The agent runs in the node's
/// network namespace, whose sysfs this is.
fn link_is_up(name: &str) -> bool {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return false;
    }
    match std::fs::read_to_string(format!("/sys/class/net/{name}/operstate")) {
        Ok(state) => matches!(state.trim(), "up" | "unknown"),
        // No sysfs view of it: let the speaker judge (it reports missing interfaces).
        Err(_) => !std::path::Path::new("/sys/class/net").is_dir(),
    }
}

#[derive(Default)]
struct AnnState {
    /// What the speaker was last told. The speaker keeps a desired set even when it could not
    /// apply all of it (an interface down), so this is the set it works from, not merely the
    /// last one that applied cleanly.
    owned: Owned,
    /// The last `set_owned` failed outright (speaker stopped or timed out): its state is
    /// unknown, so the next pass sends the desired set even if it looks unchanged.
    resend: bool,
    /// Link states, see [`gate_links`].
    links: BTreeMap<String, LinkSeen>,
    /// The kube-proxy IPVS finding of the last pass (reported on change).
    ipvs: Option<palisade_speaker::ipvs::IpvsFinding>,
    /// The kernel-ARP filter for foreign LoadBalancer IPs ([`palisade_speaker::ipvs`]).
    arp_filter: palisade_speaker::ipvs::ArpFilter,
    /// The last pass's elections: a pass re-elects only the IPs whose eligible nodes changed.
    elections: ElectionMemo,
    /// The hand-over between nodes ([`gate_handover`]).
    handover: Handover,
}

/// Hand-over state across passes: IPs gained but not answered yet (a live peer may still
/// answer them), IPs lost but still answered (this node is going away; released once a
/// successor took them over).
#[derive(Default)]
struct Handover {
    gains: Waits,
    releases: Waits,
    /// Answered only until a successor reports answering them.
    releasing: BTreeSet<IpAddr>,
}

/// What [`gate_handover`] decided for one pass.
#[derive(Debug, Default, PartialEq, Eq)]
struct HandoverGate {
    /// Gained IPs not answered yet, with the peer that may still answer each and why.
    held: Vec<(IpAddr, String, Block)>,
    /// Gained IPs answered now although a peer never confirmed (waited the whole bound).
    forced: Vec<IpAddr>,
    /// Lost IPs given up without a successor's confirmation (waited the whole bound).
    abandoned: Vec<IpAddr>,
    /// When a pass is due even without news.
    recheck: Option<tokio::time::Instant>,
}

/// The hand-over rules of `palisade_membership::handover` applied to one pass's desired set
/// (`owned`, changed in place) against what the speaker answers now (`answering`):
///
/// - **Gained IPs** (break-before-make): answered only once no live peer may still answer
///   them ([`blocker`]: every live peer that sends reports has reported, after counting this
///   agent alive, a set without the IP, or with it releasing). A restored winner thus takes
///   an IP back only after the current owner said it stopped — not after a fixed delay that a
///   slow owner can overrun. A peer that never confirms holds an IP back for at most `bound`.
/// - **Lost IPs while `going`** (this node is drained, out-of-service, or shutting down;
///   make-before-break): still answered, reported as releasing (which never blocks the
///   successor), until a live peer reports answering them ([`taken_over`]), or for at most
///   `bound`. Losses for any other reason (a peer won the IP back) stop at once.
#[allow(clippy::too_many_arguments)]
fn gate_handover(
    owned: &mut Owned,
    answering: &Owned,
    h: &mut Handover,
    me: &str,
    live: &Live,
    going: bool,
    now: tokio::time::Instant,
    bound: Duration,
) -> HandoverGate {
    let mut gate = HandoverGate::default();
    let gained: BTreeSet<IpAddr> = owned
        .keys()
        .filter(|ip| !answering.contains_key(ip))
        .copied()
        .collect();
    let blocked = |ip: IpAddr| blocker(ip, me, live.incarnation, &live.nodes, &live.owned);
    let held = h
        .gains
        .hold(&gained, |ip| blocked(ip).is_some(), now, bound);
    for ip in &held.held {
        owned.remove(ip);
        if let Some((peer, why)) = blocked(*ip) {
            gate.held.push((*ip, peer.to_string(), why));
        }
    }
    gate.forced = held.expired;
    let lost: BTreeSet<IpAddr> = if going {
        answering
            .keys()
            .filter(|ip| !owned.contains_key(ip))
            .copied()
            .collect()
    } else {
        BTreeSet::new()
    };
    let released = h.releases.hold(
        &lost,
        |ip| !taken_over(ip, me, &live.nodes, &live.owned),
        now,
        bound,
    );
    h.releasing.clear();
    for ip in &released.held {
        if let Some(ifaces) = answering.get(ip) {
            owned.insert(*ip, ifaces.clone());
            h.releasing.insert(*ip);
        }
    }
    gate.abandoned = released.expired;
    gate.recheck = [held.recheck, released.recheck].into_iter().flatten().min();
    gate
}

/// Logs what the hand-over gate held back, forced or gave up.
fn log_handover(gate: &HandoverGate) {
    for (ip, peer, why) in &gate.held {
        tracing::debug!(%ip, %peer, ?why, "not answering yet: a live peer may still answer it");
    }
    for ip in &gate.forced {
        tracing::warn!(%ip, "answering without a hand-back confirmation: a live peer did not confirm within one membership timeout");
    }
    for ip in &gate.abandoned {
        tracing::warn!(%ip, "stopped answering without a successor: nobody reported taking it over within one membership timeout");
    }
}

/// What this node reports answering (IP → releasing), from what the speaker was told.
fn answering_report(owned: &Owned, releasing: &BTreeSet<IpAddr>) -> Answering {
    owned
        .keys()
        .map(|ip| (*ip, releasing.contains(ip)))
        .collect()
}

/// What telling the speaker achieved.
#[derive(Debug, PartialEq, Eq)]
enum Applied {
    /// Nothing to tell.
    Unchanged,
    /// The speaker took the set (possibly with problems it retries by itself, see
    /// [`apply`]).
    Told,
    /// The speaker did not take it; retry with backoff.
    Failed,
}

/// Hands `owned` to the speaker if it differs from what the speaker was last told (or the
/// last attempt failed outright), and records what the speaker now holds.
///
/// An incomplete apply ([`SpeakerError::Incomplete`]: an interface down or missing, no
/// route yet) is not a failure here: the speaker applied everything else, keeps the full
/// desired set and retries the rest on its own every second (announcing an interface once it
/// comes up). Treating it as a failure used to have two effects: the sync loop backed off
/// (up to 30 s, ignoring membership changes meanwhile, so failover on this node stalled
/// behind one bad interface), and the recorded state stayed at the last clean set while the
/// speaker held the new one — when the desired set went back to the recorded one (a healed
/// partition), the speaker was never told and kept answering for other nodes' IPs.
fn apply(speaker: &dyn Announcer, st: &mut AnnState, owned: &Owned) -> Applied {
    if *owned == st.owned && !st.resend {
        return Applied::Unchanged;
    }
    match speaker.set_owned(owned.clone()) {
        Ok(()) => {}
        Err(SpeakerError::Incomplete(problems)) => {
            // The speaker logs each problem when it changes.
            tracing::debug!(
                problems = problems.len(),
                "speaker applied the announcements it could; it retries the rest by itself"
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "speaker did not take the announcements; retrying");
            st.resend = true;
            return Applied::Failed;
        }
    }
    st.owned = owned.clone();
    st.resend = false;
    Applied::Told
}

impl AnnouncerReconciler {
    pub async fn run(self, trigger: Trigger, shutdown: CancellationToken) {
        // Membership changes need a pass.
        poke_on_change(self.live.clone(), trigger.clone(), shutdown.clone());
        if !self.stores.group.synced(&shutdown).await {
            return;
        }
        // Peers are known now that the Nodes are listed: the membership's warm-up starts.
        self.refresh_peers();
        let this = Arc::new(self);
        // Speaker counters → metrics, once a second.
        {
            let this = this.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut last = palisade_speaker::SpeakerStats::default();
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    last = this.update_metrics(last);
                }
            });
        }
        let state = Arc::new(tokio::sync::Mutex::new(AnnState::default()));
        // While a link is down or settling, passes are needed without events (see gate_links).
        let (recheck_tx, mut recheck) = watch::channel::<Option<Instant>>(None);
        let recheck_tx = Arc::new(recheck_tx);
        {
            let trigger = trigger.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    let at = *recheck.borrow_and_update();
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        r = recheck.changed() => if r.is_err() { return },
                        _ = tokio::time::sleep_until(at.unwrap_or_else(Instant::now).into()),
                            if at.is_some() => {
                            trigger.poke();
                            // Wait for the pass to set the next time (or none).
                            if recheck.changed().await.is_err() { return }
                        }
                    }
                }
            });
        }
        trigger.poke();
        let metrics = Some(this.metrics.clone());
        run_sync_loop(
            this.settings,
            trigger,
            shutdown,
            "announcement",
            metrics,
            |_| {
                let this = this.clone();
                let state = state.clone();
                let recheck_tx = recheck_tx.clone();
                async move { this.pass(&mut *state.lock().await, &recheck_tx).await }
            },
        )
        .await;
        this.hand_over_on_exit(&state).await;
        let speaker = this.speaker.clone();
        let _ = tokio::task::spawn_blocking(move || speaker.set_owned(Owned::new())).await;
    }

    /// Make-before-break on the way out: the membership's "leave" (sent as the shutdown
    /// starts) makes the peers re-elect at once; every IP stays answered, reported as
    /// releasing, until a live peer reports answering it (then it is dropped at once), or for
    /// at most one membership timeout. The membership keeps listening after the leave
    /// (`LINGER_TIMEOUTS`), so the successors' reports arrive.
    async fn hand_over_on_exit(&self, state: &tokio::sync::Mutex<AnnState>) {
        let mut st = state.lock().await;
        if st.owned.is_empty() {
            return;
        }
        let mut live_rx = self.live.clone();
        let bound = live_rx.borrow().timeout;
        let start = tokio::time::Instant::now();
        let mut abandoned = 0;
        tracing::info!(
            ips = st.owned.len(),
            ?bound,
            "shutting down: answering until peers report that they took over"
        );
        loop {
            let live = live_rx.borrow_and_update().clone();
            let now = tokio::time::Instant::now();
            let answering = st.owned.clone();
            let mut owned = Owned::new();
            let gate = gate_handover(
                &mut owned,
                &answering,
                &mut st.handover,
                &self.node_name,
                &live,
                true,
                now,
                bound,
            );
            log_handover(&gate);
            abandoned += gate.abandoned.len();
            if owned != st.owned {
                let speaker = self.speaker.clone();
                let told = owned.clone();
                match tokio::task::spawn_blocking(move || speaker.set_owned(told)).await {
                    Ok(Ok(())) | Ok(Err(SpeakerError::Incomplete(_))) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "speaker did not take the hand-over"),
                    Err(e) => tracing::warn!(error = %e, "speaker task died"),
                }
                for ip in st.owned.keys().filter(|ip| !owned.contains_key(ip)) {
                    tracing::info!(%ip, "stopped announcing (taken over)");
                }
                st.owned = owned;
                self.publish_answering(&st);
            }
            if st.owned.is_empty() {
                let ms = start.elapsed().as_millis() as u64;
                if abandoned == 0 {
                    tracing::info!(ms, "every IP handed over");
                } else {
                    tracing::warn!(ms, abandoned, "hand-over over; some IPs had no successor");
                }
                return;
            }
            let due = gate.recheck.unwrap_or(now + bound);
            tokio::select! {
                r = live_rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep_until(due) => {}
            }
        }
    }

    /// Publishes what the speaker answers for the membership's owned reports.
    fn publish_answering(&self, st: &AnnState) {
        let report = answering_report(&st.owned, &st.handover.releasing);
        self.answering.send_if_modified(|cur| {
            if *cur != report {
                *cur = report;
                true
            } else {
                false
            }
        });
    }

    /// Whether this node's own Node is drained / out-of-service (its IPs move away, handed
    /// over make-before-break).
    fn in_maintenance(&self) -> bool {
        self.stores
            .nodes
            .state()
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()))
            .is_some_and(|n| {
                palisade_loadbalancer::l2::in_maintenance(n, self.exclude_unschedulable)
            })
    }

    /// Publishes this node's interfaces (those named by any L2Advertisement, and those on a
    /// subnet) for the membership to report.
    fn refresh_reach(&self, ads: &[L2Advertisement]) -> Vec<ServedInterface> {
        let named: BTreeSet<String> = ads
            .iter()
            .flat_map(|a| a.spec.interfaces.iter().cloned())
            .collect();
        let local: Vec<ServedInterface> = palisade_speaker::local_interfaces(&named)
            .into_iter()
            .map(|i| ServedInterface {
                name: i.name,
                up: i.up,
                nets: i.nets,
            })
            .collect();
        self.reach.send_if_modified(|cur| {
            if *cur != local {
                cur.clone_from(&local);
                true
            } else {
                false
            }
        });
        local
    }

    fn refresh_peers(&self) {
        let mut ips = palisade_membership::PeerMap::new();
        for n in self.stores.nodes.state() {
            let Some(name) = n.metadata.name.as_deref() else {
                continue;
            };
            if name == self.node_name {
                continue;
            }
            let addrs: BTreeSet<IpAddr> = n
                .status
                .iter()
                .flat_map(|s| s.addresses.iter().flatten())
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse::<IpAddr>().ok())
                .map(|ip| ip.to_canonical())
                .collect();
            if !addrs.is_empty() {
                ips.insert(name.to_string(), addrs);
            }
        }
        let ips = Some(ips);
        self.peers.send_if_modified(|cur| {
            if *cur != ips {
                *cur = ips;
                true
            } else {
                false
            }
        });
    }

    async fn pass(
        &self,
        st: &mut AnnState,
        recheck: &watch::Sender<Option<Instant>>,
    ) -> Result<(), PassError> {
        self.refresh_peers();
        let (ads, _) = typed_objects::<L2Advertisement>(&self.stores.l2_advertisements.state());
        let own_reach = self.refresh_reach(&ads);
        let live = self.live.borrow().clone();
        let (mut owned, decisions) = if live.warmed_up {
            let services = self.stores.services.state();
            let (pools, _) = typed_objects::<IPAddressPool>(&self.stores.ip_address_pools.state());
            let mut reach = live.reach.clone();
            reach.insert(self.node_name.clone(), own_reach);
            let reach = node_reach(reach);
            let nodes = self.stores.nodes.state();
            let slices = self.stores.endpoint_slices.state();
            // Route lookups are I/O: done here, once per IP and pass, and handed to the
            // pure decision.
            let routes = std::sync::Mutex::new(BTreeMap::<IpAddr, Result<String, String>>::new());
            let route_interface = |ip: IpAddr| {
                let mut cache = routes.lock().unwrap_or_else(|e| e.into_inner());
                cache
                    .entry(ip)
                    .or_insert_with(|| {
                        palisade_speaker::route_interface(ip).map_err(|e| {
                            tracing::warn!(%ip, error = %e, "no route to the IP's subnet; cannot pick an interface");
                            e.to_string()
                        })
                    })
                    .clone()
            };
            decide_with_memo(
                &AnnounceInputs {
                    me: &self.node_name,
                    route_interface: &route_interface,
                    live: &live.nodes,
                    reach: &reach,
                    services: &services,
                    pools: &pools,
                    advertisements: &ads,
                    nodes: &nodes,
                    slices: &slices,
                    class: &self.class,
                    claim_unclassed: self.claim_unclassed,
                    exclude_unschedulable: self.exclude_unschedulable,
                },
                &mut st.elections,
            )
        } else {
            (Owned::new(), Vec::new())
        };
        let next = gate_links(
            &mut owned,
            &mut st.links,
            link_is_up,
            Instant::now(),
            live.timeout,
        );
        let gate = gate_handover(
            &mut owned,
            &st.owned,
            &mut st.handover,
            &self.node_name,
            &live,
            self.in_maintenance(),
            tokio::time::Instant::now(),
            live.timeout,
        );
        log_handover(&gate);
        let next = [next, gate.recheck.map(|t| t.into_std())]
            .into_iter()
            .flatten()
            .min();
        recheck.send_replace(next);
        let gained: Vec<&IpDecision> = decisions
            .iter()
            .filter(|d| owned.contains_key(&d.ip) && !st.owned.contains_key(&d.ip))
            .collect();
        let lost: Vec<IpAddr> = st
            .owned
            .keys()
            .filter(|ip| !owned.contains_key(ip))
            .copied()
            .collect();
        // `apply` runs on the blocking pool (set_owned waits for the speaker's thread); the
        // state goes there and back with it.
        let speaker = self.speaker.clone();
        let mut state = std::mem::take(st);
        let desired = owned.clone();
        let (state, applied) = match tokio::task::spawn_blocking(move || {
            let applied = apply(speaker.as_ref(), &mut state, &desired);
            (state, applied)
        })
        .await
        {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "speaker task died");
                // The state went down with the task: make the retry tell the speaker again.
                st.resend = true;
                return Err(PassError::SpeakerTask(e.to_string()));
            }
        };
        *st = state;
        self.publish_answering(st);
        let snapshot = Some(Snapshot {
            warmed_up: live.warmed_up,
            live: live.nodes.clone(),
            owned: st.owned.clone(),
            decisions: decisions.clone(),
        });
        self.status.send_if_modified(|cur| {
            if *cur != snapshot {
                *cur = snapshot;
                true
            } else {
                false
            }
        });
        if applied == Applied::Told {
            for ip in &lost {
                tracing::info!(%ip, "stopped announcing");
            }
            for d in &gained {
                tracing::info!(ip = %d.ip, interfaces = ?d.interfaces, "announcing");
                let obj = ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Service".into()),
                    namespace: Some(d.service.0.clone()),
                    name: Some(d.service.1.clone()),
                    uid: d.uid.clone(),
                    ..Default::default()
                };
                self.events
                    .normal(
                        &obj,
                        L2_ANNOUNCED,
                        "Announce",
                        format!(
                            "node {} announces {} on {}",
                            self.node_name,
                            d.ip,
                            d.interfaces.join(", ")
                        ),
                    )
                    .await;
            }
        }
        self.guard_kernel_arp(st, &owned).await;
        if applied == Applied::Failed {
            Err(PassError::Speaker)
        } else {
            Ok(())
        }
    }

    /// kube-proxy IPVS: detects LoadBalancer IPs on local interfaces while ARP is lax
    /// (reported on change: log, Event on our Node, `palisade_l2_kernel_arp_conflicts`) and,
    /// with `arp_filter`, keeps the kernel from answering for the ones this node does not own.
    async fn guard_kernel_arp(&self, st: &mut AnnState, owned: &Owned) {
        let services = self.stores.services.state();
        let lb_ips: BTreeSet<IpAddr> = services
            .iter()
            .filter(|s| palisade_loadbalancer::is_ours(s, &self.class, self.claim_unclassed))
            .flat_map(|s| palisade_loadbalancer::status_ips(s))
            .collect();
        let found = palisade_speaker::ipvs::detect(&lb_ips);
        self.metrics
            .l2_kernel_arp_conflicts
            .set(found.as_ref().map_or(0, |f| f.ips.len() as i64));
        if found
            .as_ref()
            .map(|f| (&f.interfaces, f.arp_ignore, f.arp_announce))
            != st
                .ipvs
                .as_ref()
                .map(|f| (&f.interfaces, f.arp_ignore, f.arp_announce))
        {
            if let Some(f) = &found {
                let note = format!(
                    "LoadBalancer IPs sit on {} while arp_ignore={} arp_announce={} (kube-proxy \
                     IPVS without strictARP?): this node's kernel answers ARP for them next to \
                     their owner; {}",
                    f.interfaces.iter().cloned().collect::<Vec<_>>().join(", "),
                    f.arp_ignore,
                    f.arp_announce,
                    if self.arp_filter {
                        "dropping the kernel's replies for IPs this node does not own (nft table arp palisade_l2)"
                    } else {
                        "--l2-arp-filter is off: set kube-proxy strictARP or turn it on"
                    }
                );
                tracing::warn!(ips = f.ips.len(), "{note}");
                let node = ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Node".into()),
                    name: Some(self.node_name.clone()),
                    ..Default::default()
                };
                self.events
                    .warning(&node, L2_KERNEL_ARP, "Detect", note)
                    .await;
            } else {
                tracing::info!("no LoadBalancer IP on a local interface with lax ARP any more");
            }
        }
        st.ipvs = found.clone();
        if !self.arp_filter {
            return;
        }
        let result = match &found {
            Some(f) => {
                let foreign: BTreeSet<std::net::Ipv4Addr> = f
                    .ips
                    .iter()
                    .filter(|ip| !owned.contains_key(&IpAddr::V4(**ip)))
                    .copied()
                    .collect();
                st.arp_filter.apply(&foreign)
            }
            None => st.arp_filter.remove_if_applied(),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot update the kernel-ARP filter (nft)");
        }
    }

    fn update_metrics(
        &self,
        last: palisade_speaker::SpeakerStats,
    ) -> palisade_speaker::SpeakerStats {
        let s = self.speaker.stats();
        let m = &self.metrics;
        m.l2_owned_ips.set(s.owned_ips as i64);
        m.l2_requests
            .inc_by(s.requests_received.saturating_sub(last.requests_received));
        m.l2_replies
            .inc_by(s.replies_sent.saturating_sub(last.replies_sent));
        m.l2_gratuitous
            .inc_by(s.gratuitous_sent.saturating_sub(last.gratuitous_sent));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_membership::OwnedReport;

    /// A speaker that answers each `set_owned` with the next scripted result and records the
    /// sets it was given.
    struct Scripted {
        results: std::sync::Mutex<Vec<Result<(), SpeakerError>>>,
        calls: std::sync::Mutex<Vec<Owned>>,
    }

    impl Scripted {
        fn new(mut results: Vec<Result<(), SpeakerError>>) -> Self {
            results.reverse();
            Scripted {
                results: std::sync::Mutex::new(results),
                calls: std::sync::Mutex::new(Vec::new()),
            }
        }
        fn calls(&self) -> Vec<Owned> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Announcer for Scripted {
        fn set_owned(&self, owned: Owned) -> Result<(), SpeakerError> {
            self.calls.lock().unwrap().push(owned);
            self.results.lock().unwrap().pop().unwrap_or(Ok(()))
        }
        fn stats(&self) -> palisade_speaker::SpeakerStats {
            Default::default()
        }
    }

    fn set(ips: &[&str]) -> Owned {
        ips.iter()
            .map(|ip| (ip.parse().unwrap(), vec!["eth0".to_string()]))
            .collect()
    }

    /// A healed partition: while the link was down the node won every IP (the speaker could
    /// not open eth0: Incomplete), then it goes back to its own IP. The speaker must be told,
    /// or it keeps answering for the other nodes' IPs (seen in tests/l2_failover_bench.rs).
    #[test]
    fn incomplete_applies_are_recorded_and_do_not_back_off() {
        let down = || {
            Err(SpeakerError::Incomplete(vec![SpeakerError::InterfaceDown(
                "eth0".into(),
            )]))
        };
        let speaker = Scripted::new(vec![Ok(()), down(), Ok(())]);
        let mut st = AnnState::default();
        let mine = set(&["198.51.100.200"]);
        let all = set(&["198.51.100.200", "198.51.100.201", "198.51.100.202"]);
        assert_eq!(apply(&speaker, &mut st, &mine), Applied::Told);
        assert_eq!(apply(&speaker, &mut st, &mine), Applied::Unchanged);
        // Link down, peers gone: everything, incompletely. Not a failure (no backoff: the
        // next membership change is acted on at once), and recorded as told.
        assert_eq!(apply(&speaker, &mut st, &all), Applied::Told);
        assert_eq!(apply(&speaker, &mut st, &all), Applied::Unchanged);
        // Healed: back to the node's own IP — the speaker hears about it.
        assert_eq!(apply(&speaker, &mut st, &mine), Applied::Told);
        assert_eq!(
            speaker.calls(),
            vec![mine.clone(), all.clone(), mine.clone()]
        );
    }

    #[test]
    fn outright_failures_are_retried_even_when_nothing_changed() {
        let speaker = Scripted::new(vec![
            Err(SpeakerError::Timeout(std::time::Duration::from_secs(10))),
            Ok(()),
        ]);
        let mut st = AnnState::default();
        let mine = set(&["198.51.100.200"]);
        assert_eq!(apply(&speaker, &mut st, &mine), Applied::Failed);
        // The retry sends the same set again (the speaker's state is unknown).
        assert_eq!(apply(&speaker, &mut st, &mine), Applied::Told);
        assert_eq!(apply(&speaker, &mut st, &mine), Applied::Unchanged);
        assert_eq!(speaker.calls(), vec![mine.clone(), mine]);
    }

    fn live(me: &str, peers: &[(&str, Option<OwnedReport>)]) -> Live {
        let mut l = Live {
            nodes: std::iter::once(me)
                .chain(peers.iter().map(|(n, _)| *n))
                .map(str::to_string)
                .collect(),
            incarnation: 7,
            timeout: Duration::from_secs(1),
            ..Default::default()
        };
        for (n, r) in peers {
            if let Some(r) = r {
                l.owned.insert(n.to_string(), r.clone());
            }
        }
        l
    }

    fn report(counted: u64, ips: &[(&str, bool)]) -> Option<OwnedReport> {
        Some(OwnedReport {
            counted,
            truncated: false,
            ips: ips
                .iter()
                .map(|(ip, r)| (ip.parse().unwrap(), *r))
                .collect(),
        })
    }

    const VIP: &str = "198.51.100.200";

    /// A restored winner takes its IP back only once the stand-in reported (having counted
    /// the winner's incarnation) that it stopped; a stand-in that never says so holds it
    /// back for one bound at most.
    #[tokio::test(start_paused = true)]
    async fn a_gained_ip_waits_for_the_stand_in_to_stop() {
        let t0 = tokio::time::Instant::now();
        let bound = Duration::from_secs(1);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut h = Handover::default();
        let none = Owned::new();
        let pass = |h: &mut Handover, l: &Live, now| {
            let mut owned = set(&[VIP]);
            let gate = gate_handover(&mut owned, &none, h, "n0", l, false, now, bound);
            (owned, gate)
        };
        // n1 answers and has not counted us yet: held, with the reason and a recheck.
        let l = live(
            "n0",
            &[("n1", report(0, &[(VIP, false)])), ("n2", report(7, &[]))],
        );
        let (owned, gate) = pass(&mut h, &l, t0);
        assert!(owned.is_empty());
        assert_eq!(
            gate.held,
            vec![(VIP.parse().unwrap(), "n1".to_string(), Block::NotCounted)]
        );
        assert_eq!(gate.recheck, Some(at(1000)));
        // Counted us, still answering: still held (same deadline).
        let l = live(
            "n0",
            &[("n1", report(7, &[(VIP, false)])), ("n2", report(7, &[]))],
        );
        let (owned, gate) = pass(&mut h, &l, at(300));
        assert!(owned.is_empty());
        assert_eq!(gate.held[0].2, Block::Answers);
        assert_eq!(gate.recheck, Some(at(1000)));
        // Stopped (reported without it): answered now, nothing forced.
        let l = live("n0", &[("n1", report(7, &[])), ("n2", report(7, &[]))]);
        let (owned, gate) = pass(&mut h, &l, at(400));
        assert_eq!(owned, set(&[VIP]));
        assert_eq!(gate, HandoverGate::default());
        // Another time the stand-in never confirms: answered after the bound, as forced.
        let mut h = Handover::default();
        let l = live("n0", &[("n1", report(7, &[(VIP, false)]))]);
        assert!(pass(&mut h, &l, at(5000)).0.is_empty());
        assert!(pass(&mut h, &l, at(5999)).0.is_empty());
        let (owned, gate) = pass(&mut h, &l, at(6000));
        assert_eq!(owned, set(&[VIP]));
        assert_eq!(gate.forced, vec![VIP.parse::<IpAddr>().unwrap()]);
        // A failover: the old owner is dead (not live), its last report blocks nothing.
        let mut h = Handover::default();
        let mut l = live("n0", &[("n2", report(7, &[]))]);
        l.owned
            .insert("n1".to_string(), report(7, &[(VIP, false)]).unwrap());
        let (owned, gate) = pass(&mut h, &l, at(7000));
        assert_eq!(owned, set(&[VIP]));
        assert_eq!(gate, HandoverGate::default());
        // Peers that send no reports (an older version) block nothing either.
        let mut h = Handover::default();
        let l = live("n0", &[("n1", None)]);
        assert_eq!(pass(&mut h, &l, at(8000)).0, set(&[VIP]));
    }

    /// A node going away keeps answering what it lost, reported as releasing, until a
    /// successor reports answering it (or one bound); a node that simply lost the election
    /// stops at once.
    #[tokio::test(start_paused = true)]
    async fn a_node_going_away_answers_until_a_successor_took_over() {
        let t0 = tokio::time::Instant::now();
        let bound = Duration::from_secs(1);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let answering = set(&[VIP, "198.51.100.201"]);
        let pass = |h: &mut Handover, l: &Live, going: bool, now| {
            // The election moved VIP away; .201 stays ours.
            let mut owned = set(&["198.51.100.201"]);
            let gate = gate_handover(&mut owned, &answering, h, "n0", l, going, now, bound);
            (owned, gate)
        };
        let vip: IpAddr = VIP.parse().unwrap();
        // Not going (n1 won it back): dropped at once.
        let mut h = Handover::default();
        let l = live("n0", &[("n1", report(7, &[]))]);
        let (owned, gate) = pass(&mut h, &l, false, t0);
        assert_eq!(owned, set(&["198.51.100.201"]));
        assert_eq!(gate, HandoverGate::default());
        assert!(h.releasing.is_empty());
        // Going: kept, releasing, until n1 reports answering it (its releasing report
        // does not count as taking over).
        let mut h = Handover::default();
        let (owned, gate) = pass(&mut h, &l, true, t0);
        assert_eq!(owned, answering);
        assert_eq!(h.releasing, [vip].into());
        assert_eq!(gate.recheck, Some(at(1000)));
        assert_eq!(
            answering_report(&owned, &h.releasing),
            [(vip, true), ("198.51.100.201".parse().unwrap(), false)].into()
        );
        let l = live("n0", &[("n1", report(7, &[(VIP, true)]))]);
        assert_eq!(pass(&mut h, &l, true, at(200)).0, answering);
        let l = live("n0", &[("n1", report(7, &[(VIP, false)]))]);
        let (owned, gate) = pass(&mut h, &l, true, at(300));
        assert_eq!(owned, set(&["198.51.100.201"]));
        assert!(gate.abandoned.is_empty());
        assert!(h.releasing.is_empty());
        // Nobody takes it over: given up after the bound, and said so.
        let mut h = Handover::default();
        let l = live("n0", &[("n1", report(7, &[]))]);
        assert_eq!(pass(&mut h, &l, true, at(2000)).0, answering);
        assert_eq!(pass(&mut h, &l, true, at(2999)).0, answering);
        let (owned, gate) = pass(&mut h, &l, true, at(3000));
        assert_eq!(owned, set(&["198.51.100.201"]));
        assert_eq!(gate.abandoned, vec![vip]);
    }

    #[test]
    fn links_that_come_back_settle_before_anything_is_claimed_on_them() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let settle = Duration::from_secs(1);
        let mut links = BTreeMap::new();
        let want: Owned = [
            ("198.51.100.200", vec!["eth0".to_string()]),
            (
                "198.51.100.201",
                vec!["eth0".to_string(), "eth1".to_string()],
            ),
            ("198.51.100.202", vec!["eth1".to_string()]),
        ]
        .into_iter()
        .map(|(ip, i)| (ip.parse().unwrap(), i))
        .collect();
        let gate = |links: &mut BTreeMap<String, LinkSeen>, eth0_up: bool, now| {
            let mut owned = want.clone();
            let recheck = gate_links(&mut owned, links, |i| i != "eth0" || eth0_up, now, settle);
            let view: Vec<(String, Vec<String>)> = owned
                .into_iter()
                .map(|(ip, i)| (ip.to_string(), i))
                .collect();
            (view, recheck)
        };
        let full = gate(&mut links, true, t0);
        // Up from the first look: usable at once (an agent start is not held back).
        assert_eq!(full.1, None);
        assert_eq!(full.0.len(), 3);
        // eth0 down: nothing on it; .201 keeps eth1; looked at again soon.
        let (view, recheck) = gate(&mut links, false, at(100));
        assert_eq!(recheck, Some(at(100) + LINK_POLL));
        assert_eq!(
            view,
            vec![
                ("198.51.100.201".to_string(), vec!["eth1".to_string()]),
                ("198.51.100.202".to_string(), vec!["eth1".to_string()]),
            ]
        );
        // Back up at 3 s: still held back for the settle time, with a pass due when it ends ...
        assert_eq!(
            gate(&mut links, true, at(3000)),
            (view.clone(), Some(at(4000)))
        );
        assert_eq!(
            gate(&mut links, true, at(3900)),
            (view.clone(), Some(at(4000)))
        );
        // ... then usable again, nothing pending.
        assert_eq!(gate(&mut links, true, at(4000)), full);
        assert_eq!(gate(&mut links, true, at(9000)), full);
    }
}
