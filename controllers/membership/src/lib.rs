//! Liveness of agents, learned from the agents themselves over the node network, so that the
//! L2 announcer keeps working (and fails over) while the API server is slow or gone.
//!
//! ```text
//!   every `interval` (200 ms):  agent ──UDP "join|alive <node> <incarnation>"──► every peer
//!   peer heard "alive" within `timeout` (1 s)  ⇒ alive;  "leave" on shutdown ⇒ dead at once
//!   "join": heard, but not announcing yet (warming up) ⇒ not alive for the election
//!   peers = InternalIPs of the Nodes in the cache (kept through API outages)
//! ```
//!
//! Why heartbeats to every peer rather than SWIM gossip: detection time is one `timeout`
//! (bounded, measurable: ~1 s) with no indirect probes to tune, and the code is small enough to
//! reason about. The price is O(N²) datagrams: at 5 Hz and 64-byte datagrams a 100-node
//! cluster sends 500 datagrams/s per node (~32 kB/s) — fine for the bare-metal clusters
//! Palisade targets, not for thousands of nodes (there SWIM, e.g. the `foca` crate, would be
//! the better trade).
//!
//! Start-up: an agent answers nothing until it has known its peers (from the listed Nodes) and
//! listened to them for one `timeout` (warm-up), so a restarting agent cannot believe it is
//! alone and briefly announce everybody's IPs. While warming up it says "join", not "alive":
//! peers must not count it for the election yet, or they would drop the IPs it wins a whole
//! warm-up before it answers for them (a ~1.2 s hole on every agent restart, measured by
//! `tests/l2_failover.rs`). Once warmed up it says "alive", and only after a further
//! `2 × interval` (the hand-over hold: time for peers to hear it, even with one datagram lost,
//! and to stop answering) does it count itself alive and announce. Peers re-evaluate as soon
//! as a datagram changes who is alive, not at their next tick. A "join" of a new incarnation
//! also retires the old one at once (a crashed agent restarted within the timeout).
//! Split brain: when the LAN partitions, each side sees the other side dead and elects among
//! its own members, so an IP may be announced on both sides — each side's clients reach one
//! node, which is the best a partitioned L2 segment allows.
//!
//! Security (see `docs/security.md`): every datagram is authenticated with the
//! cluster key (HMAC-SHA256, [`crate::memberlist_wire`]), carries a per-incarnation sequence
//! number and a timestamp, and must come from one of the named Node's InternalIPs; anything
//! else is counted in `palisade_memberlist_rejected_total{reason}` and dropped.
//!
//! Dead peers and load: sends never wait (`try_send_to`; a full socket buffer drops that one
//! datagram), peers not heard for [`SILENT_AFTER_TIMEOUTS`] timeouts are sent to only every
//! [`PROBE_EVERY`] rounds, every queued datagram is read before anyone is judged dead, the
//! agent's own scheduling lag (how late its ticks fire) stretches the timeout, and when every
//! peer times out at the same moment the agent suspects itself first and waits one more
//! timeout before believing it is alone.
pub mod handover;
pub mod memberlist_key;
pub mod memberlist_keyfile;
pub mod memberlist_wire;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::memberlist_key::KeyRing;
use crate::memberlist_wire::{Context, Datagram, Guard, Kind, LogLimiter, Reject};
pub use crate::memberlist_wire::{OwnedReport, ServedInterface};
use palisade_runtime::metrics::{labels1, Labels};

/// "alive" rounds an agent sends before it counts itself alive (see the module docs).
const HOLD_ROUNDS: u32 = 2;
/// A peer not heard for this many timeouts counts as silent ...
pub const SILENT_AFTER_TIMEOUTS: u32 = 10;
/// ... and is sent to only every this many rounds.
pub const PROBE_EVERY: u64 = 5;
/// A node's reach goes out every this many rounds (and at once when it changes): within a
/// peer's warm-up (one timeout, 5 rounds) a restarted agent has heard everybody's twice.
pub const REACH_EVERY: u64 = 2;
/// After the "leave", the membership keeps listening this many timeouts (sending nothing
/// but nothing more), so a leaving announcer hears its successors' owned reports.
pub const LINGER_TIMEOUTS: u32 = 2;

/// What this node's speaker answers for: IP → releasing (answered only until a successor
/// took it over), reported to every peer in [`Kind::Owned`] datagrams.
pub type Answering = BTreeMap<IpAddr, bool>;

/// Every other Node's InternalIPs, from the Node cache: where heartbeats go, and where a
/// node's datagrams must come from.
pub type PeerMap = BTreeMap<String, BTreeSet<IpAddr>>;

/// Membership settings.
#[derive(Clone, Debug)]
pub struct MembershipSettings {
    pub node_name: String,
    pub bind: SocketAddr,
    /// Port peers listen on (the same for every agent).
    pub peer_port: u16,
    pub interval: Duration,
    pub timeout: Duration,
    /// Datagrams with another tag are ignored (several clusters on one LAN).
    pub cluster_tag: String,
    /// The cluster keys (sending and accepted); the key file watcher updates them.
    pub keys: watch::Receiver<KeyRing>,
    /// Datagrams whose timestamp differs from our clock by more are rejected.
    pub clock_window: Duration,
    /// `palisade_memberlist_rejected_total{reason}`.
    pub rejected: Family<Labels, Counter>,
    /// Where this node can announce (kept current by the announcer); sent to peers in
    /// [`Kind::Reach`] datagrams while not empty.
    pub reach: watch::Receiver<Vec<ServedInterface>>,
    /// What this node answers for (kept current by the announcer after every speaker apply);
    /// sent to peers in [`Kind::Owned`] datagrams every [`REACH_EVERY`] rounds and at once
    /// when it (or who is alive) changes.
    pub owned: watch::Receiver<Answering>,
}

impl MembershipSettings {
    pub fn new(node_name: impl Into<String>, port: u16, keys: watch::Receiver<KeyRing>) -> Self {
        MembershipSettings {
            node_name: node_name.into(),
            bind: SocketAddr::from(([0, 0, 0, 0], port)),
            peer_port: port,
            interval: Duration::from_millis(200),
            timeout: Duration::from_secs(1),
            cluster_tag: "palisade".into(),
            keys,
            clock_window: Duration::from_secs(30),
            rejected: Family::default(),
            reach: watch::channel(Vec::new()).1,
            owned: watch::channel(Answering::new()).1,
        }
    }
}

/// What the rest of the agent sees: the live nodes (self included) once warmed up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Live {
    pub warmed_up: bool,
    pub nodes: BTreeSet<String>,
    /// The membership timeout: how long an agent must listen to know who is alive. The
    /// announcer waits this long after one of its links comes back before it claims IPs on it.
    pub timeout: Duration,
    /// Where each live node can announce, as it last reported (this node's own entry from
    /// [`MembershipSettings::reach`]); nodes that reported nothing are missing.
    pub reach: BTreeMap<String, Vec<ServedInterface>>,
    /// This agent's incarnation (what peers' owned reports must name, see [`handover`]).
    pub incarnation: u64,
    /// The live peers' latest owned reports (of their current incarnation).
    pub owned: BTreeMap<String, OwnedReport>,
    /// The agent is shutting down: it sent "leave" and only listens (for a while).
    pub leaving: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Msg {
    /// Heard, warming up: not alive for the election yet.
    Join {
        node: String,
        incarnation: u64,
    },
    Alive {
        node: String,
        incarnation: u64,
    },
    Leave {
        node: String,
        incarnation: u64,
    },
}

impl From<Datagram> for Msg {
    fn from(d: Datagram) -> Msg {
        let (node, incarnation) = (d.node, d.incarnation);
        match d.kind {
            Kind::Join => Msg::Join { node, incarnation },
            Kind::Alive => Msg::Alive { node, incarnation },
            Kind::Leave => Msg::Leave { node, incarnation },
            // Handled before (Handler::handle); never liveness messages.
            Kind::Reach | Kind::Owned => Msg::Join { node, incarnation },
        }
    }
}

/// When a peer was last heard, its incarnation, and whether it was announcing ("alive")
/// rather than warming up ("join").
#[derive(Clone, Copy, Debug)]
struct Seen {
    at: Instant,
    incarnation: u64,
    ready: bool,
}

/// Pure bookkeeping of who was heard when (tested with explicit instants).
#[derive(Debug, Default)]
pub struct Table {
    last_seen: BTreeMap<String, Seen>,
    left: BTreeMap<String, u64>,
    /// Last reach report per node, with the incarnation that sent it.
    reach: BTreeMap<String, (u64, Vec<ServedInterface>)>,
    /// Last owned report per node, with the incarnation that sent it.
    owned: BTreeMap<String, (u64, OwnedReport)>,
}

impl Table {
    /// Records an owned report; true when it changed what is known of the node.
    fn owned_heard(&mut self, node: String, incarnation: u64, report: OwnedReport) -> bool {
        if self.left.get(&node).is_some_and(|i| *i >= incarnation)
            || self.owned.get(&node).is_some_and(|(i, _)| *i > incarnation)
        {
            return false;
        }
        let new = (incarnation, report);
        let changed = self.owned.get(&node) != Some(&new);
        self.owned.insert(node, new);
        changed
    }

    /// The reports of `nodes`, of the incarnation last heard from each.
    fn owned_of(&self, nodes: &BTreeSet<String>) -> BTreeMap<String, OwnedReport> {
        nodes
            .iter()
            .filter_map(|n| {
                let (inc, r) = self.owned.get(n)?;
                let seen = self.last_seen.get(n)?;
                (seen.incarnation == *inc).then(|| (n.clone(), r.clone()))
            })
            .collect()
    }

    /// The incarnation of `node` if it is alive now (for the `counted` field of reports).
    fn counted(&self, node: &str, now: Instant, timeout: Duration) -> u64 {
        self.last_seen
            .get(node)
            .filter(|s| s.ready && now.saturating_duration_since(s.at) < timeout)
            .map_or(0, |s| s.incarnation)
    }

    /// Records a reach report; true when it changed what is known of the node.
    fn reach_heard(&mut self, node: String, incarnation: u64, reach: Vec<ServedInterface>) -> bool {
        if self.left.get(&node).is_some_and(|i| *i >= incarnation)
            || self.reach.get(&node).is_some_and(|(i, _)| *i > incarnation)
        {
            return false;
        }
        let new = (incarnation, reach);
        if self.reach.get(&node).is_some_and(|old| old.1 == new.1) {
            self.reach.insert(node, new);
            return false;
        }
        self.reach.insert(node, new);
        true
    }

    /// The reports of `nodes`.
    fn reach_of(&self, nodes: &BTreeSet<String>) -> BTreeMap<String, Vec<ServedInterface>> {
        nodes
            .iter()
            .filter_map(|n| self.reach.get(n).map(|(_, r)| (n.clone(), r.clone())))
            .collect()
    }

    /// Records a datagram. Returns true when it may have changed who is alive (a peer became
    /// ready, came back after `timeout` of silence, left, or was replaced by a new
    /// incarnation), so the caller re-evaluates at once.
    fn heard(&mut self, msg: Msg, now: Instant, timeout: Duration) -> bool {
        let (node, incarnation, ready) = match msg {
            Msg::Leave { node, incarnation } => {
                self.reach.remove(&node);
                self.owned.remove(&node);
                let was = self.last_seen.remove(&node).is_some_and(|s| s.ready);
                self.left.insert(node, incarnation);
                return was;
            }
            Msg::Join { node, incarnation } => (node, incarnation, false),
            Msg::Alive { node, incarnation } => (node, incarnation, true),
        };
        // A "leave" is final for that incarnation; a restarted agent has a new one.
        if self.left.get(&node).is_some_and(|i| *i >= incarnation) {
            return false;
        }
        let prev = self.last_seen.get(&node).copied();
        // Late datagrams of an older incarnation say nothing about the current one.
        if prev.is_some_and(|p| p.incarnation > incarnation) {
            return false;
        }
        self.left.remove(&node);
        // Within one incarnation "ready" only goes up (a reordered "join" cannot undo "alive").
        let ready = ready || prev.is_some_and(|p| p.incarnation == incarnation && p.ready);
        self.last_seen.insert(
            node,
            Seen {
                at: now,
                incarnation,
                ready,
            },
        );
        prev.is_none_or(|p| {
            p.ready != ready
                || p.incarnation != incarnation
                || (ready && now.saturating_duration_since(p.at) >= timeout)
        })
    }

    fn alive(&self, me: &str, now: Instant, timeout: Duration) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .last_seen
            .iter()
            .filter(|(_, s)| s.ready && now.saturating_duration_since(s.at) < timeout)
            .map(|(n, _)| n.clone())
            .collect();
        out.insert(me.to_string());
        out
    }

    /// Whether `node` sent anything (join or alive) within `within` of `now`.
    fn heard_within(&self, node: &str, now: Instant, within: Duration) -> bool {
        self.last_seen
            .get(node)
            .is_some_and(|s| now.saturating_duration_since(s.at) < within)
    }

    /// Whether every one of `peers` (at least two) is still known, ready, and timed out —
    /// nobody left, they all just went silent at once: suspicious (see the module docs).
    fn all_timed_out(&self, peers: &BTreeSet<String>, now: Instant, timeout: Duration) -> bool {
        peers.len() >= 2
            && peers.iter().all(|n| {
                self.last_seen
                    .get(n)
                    .is_some_and(|s| s.ready && now.saturating_duration_since(s.at) >= timeout)
            })
    }
}

/// The receiving side's state: the checks, the log limiter and the table.
struct Receiving {
    guard: Guard,
    limiter: LogLimiter,
    table: Table,
    /// When a datagram from a Node's address last failed the key check (a peer with another
    /// key — or we have the wrong one).
    foreign_key_at: Option<Instant>,
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Everything a datagram handler needs, shared by the receiver task and the evaluator's
/// drain.
struct Handler {
    me: String,
    tag: String,
    timeout: Duration,
    keys: watch::Receiver<KeyRing>,
    peers: watch::Receiver<Option<PeerMap>>,
    rejected: Family<Labels, Counter>,
    state: Mutex<Receiving>,
}

impl Handler {
    /// Checks and records one datagram; true when it may have changed who is alive.
    fn handle(&self, data: &[u8], from: SocketAddr) -> bool {
        let now = Instant::now();
        let keys = self.keys.borrow().clone();
        let peers = self.peers.borrow().clone().unwrap_or_default();
        let cx = Context {
            tag: &self.tag,
            me: &self.me,
            keys: &keys,
            peers: &peers,
            wall_ms: wall_ms(),
            now,
        };
        let Ok(mut st) = self.state.lock() else {
            return false;
        };
        match st.guard.check(data, from.ip(), &cx) {
            Ok(d) if d.kind == Kind::Reach => st.table.reach_heard(d.node, d.incarnation, d.reach),
            Ok(d) if d.kind == Kind::Owned => {
                st.table
                    .owned_heard(d.node, d.incarnation, d.owned.unwrap_or_default())
            }
            Ok(d) => st.table.heard(Msg::from(d), now, self.timeout),
            Err(r) => {
                if matches!(r, Reject::UnknownKey | Reject::BadMac)
                    && peers
                        .values()
                        .any(|a| a.contains(&from.ip().to_canonical()))
                {
                    st.foreign_key_at = Some(now);
                }
                self.rejected
                    .get_or_create(&labels1("reason", r.reason()))
                    .inc();
                if let Some(suppressed) = st.limiter.allow(r, now) {
                    tracing::warn!(
                        reason = r.reason(),
                        %from,
                        suppressed,
                        "membership datagram rejected{}",
                        hint(r)
                    );
                }
                false
            }
        }
    }
}

fn hint(r: Reject) -> &'static str {
    match r {
        Reject::UnknownKey | Reject::BadMac => {
            " (a peer with another --memberlist-key-file, or forged)"
        }
        Reject::Clock => " (clocks differ by more than the window: is NTP running?)",
        _ => "",
    }
}

/// Runs the membership until `shutdown`; peers' addresses come from `peers` (updated by the
/// caller from the Node cache; `None` until the Nodes have been listed). Returns the
/// live-set receiver. The warm-up starts when the peers are first known; see the module docs
/// for "join", "alive" and the hand-over hold.
pub async fn start(
    settings: MembershipSettings,
    peers: watch::Receiver<Option<PeerMap>>,
    shutdown: CancellationToken,
) -> std::io::Result<watch::Receiver<Live>> {
    let socket = Arc::new(UdpSocket::bind(settings.bind).await?);
    // Heartbeats to peers not heard from (see the sender).
    let probe_socket = UdpSocket::bind(SocketAddr::new(settings.bind.ip(), 0)).await?;
    let (tx, rx) = watch::channel(Live::default());
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    for r in Reject::ALL {
        // Every reason shows (at 0) from the start.
        let _ = settings
            .rejected
            .get_or_create(&labels1("reason", r.reason()));
    }
    let handler = Arc::new(Handler {
        me: settings.node_name.clone(),
        tag: settings.cluster_tag.clone(),
        timeout: settings.timeout,
        keys: settings.keys.clone(),
        peers: peers.clone(),
        rejected: settings.rejected.clone(),
        state: Mutex::new(Receiving {
            guard: Guard::new(settings.clock_window),
            limiter: LogLimiter::new(Duration::from_secs(10)),
            table: Table::default(),
            foreign_key_at: None,
        }),
    });
    // Datagrams that change who is alive wake the evaluator at once.
    let changed = Arc::new(tokio::sync::Notify::new());
    let mut peers_known_at: Option<Instant> = None;
    // Rounds of "alive" sent so far (0 while warming up). Counted in ticks rather than
    // measured in time: tick instants jitter by a little, and a hold of exactly 2 intervals
    // measured against them would often cost a third.
    let mut alive_rounds: u32 = 0;

    // Receiver: runs until the linger after the leave is over (see LINGER_TIMEOUTS).
    let stopped = CancellationToken::new();
    {
        let socket = socket.clone();
        let handler = handler.clone();
        let changed = changed.clone();
        let shutdown = stopped.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; memberlist_wire::MAX_DATAGRAM + 1];
            loop {
                let r = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = socket.recv_from(&mut buf) => r,
                };
                let Ok((n, from)) = r else { continue };
                if handler.handle(&buf[..n], from) {
                    changed.notify_one();
                }
            }
        });
    }

    // Sender + evaluator.
    tokio::spawn(async move {
        let node = settings.node_name.clone();
        let mut seq: u64 = 0;
        let datagram =
            |kind: Kind, seq: &mut u64, reach: Vec<ServedInterface>, owned: Option<OwnedReport>| {
                *seq += 1;
                let key = settings.keys.borrow().sending(Instant::now()).clone();
                memberlist_wire::encode(
                    &settings.cluster_tag,
                    &Datagram {
                        kind,
                        node: node.clone(),
                        incarnation,
                        seq: *seq,
                        timestamp_ms: wall_ms(),
                        reach,
                        owned,
                    },
                    &key,
                )
            };
        let mut reach_rx = settings.reach.clone();
        let mut owned_rx = settings.owned.clone();
        // Owned reports are due: every REACH_EVERY rounds, and at once when what we answer
        // or who is alive changed (true also for silent peers: a peer that just left is one).
        let mut owned_due_all = false;
        let mut tick = tokio::time::interval(settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut round: u64 = 0;
        let started = Instant::now();
        // Local health: the largest recent lateness of our own ticks, decaying.
        let mut lag = Duration::ZERO;
        let mut suspect_until: Option<Instant> = None;
        let mut key_mismatch_logged = false;
        let mut buf = [0u8; memberlist_wire::MAX_DATAGRAM + 1];
        let silent_after = settings.timeout * SILENT_AFTER_TIMEOUTS;
        loop {
            let send = tokio::select! {
                _ = shutdown.cancelled() => break,
                at = tick.tick() => {
                    let late = Instant::now().saturating_duration_since(at);
                    lag = late.max(lag.mul_f32(0.9));
                    true
                },
                _ = changed.notified() => false,
                r = owned_rx.changed() => {
                    if r.is_ok() {
                        owned_due_all = true;
                    }
                    false
                },
            };
            // Read whatever is queued before judging anyone (a stalled receiver task must not
            // make live peers look dead).
            while let Ok((n, from)) = socket.try_recv_from(&mut buf) {
                handler.handle(&buf[..n], from);
            }
            let now = Instant::now();
            let timeout = settings.timeout + lag.min(settings.timeout * 4);
            if send {
                round += 1;
                let map = peers.borrow().clone();
                if map.is_some() && peers_known_at.is_none() {
                    peers_known_at = Some(now);
                }
                // Listened for one timeout (half a tick of slack for the same jitter).
                let warm = peers_known_at.is_some_and(|t| {
                    now.duration_since(t) + settings.interval / 2 >= settings.timeout
                });
                let kind = if alive_rounds > 0 || warm {
                    alive_rounds = alive_rounds.saturating_add(1);
                    Kind::Alive
                } else {
                    Kind::Join
                };
                let msg = datagram(kind, &mut seq, Vec::new(), None);
                let reach_msg = (reach_rx.has_changed().unwrap_or(false)
                    || round % REACH_EVERY == 1)
                    .then(|| reach_rx.borrow_and_update().clone())
                    .filter(|r| !r.is_empty())
                    .map(|r| datagram(Kind::Reach, &mut seq, r, None));
                let (recent, silent) = targets(&settings.node_name, map.as_ref(), |n| {
                    handler
                        .state
                        .lock()
                        .map(|s| s.table.heard_within(n, now, silent_after))
                        .unwrap_or(true)
                });
                // Never wait on one peer: non-blocking sends, a full buffer drops the datagram.
                for ip in recent {
                    let to = SocketAddr::new(ip, settings.peer_port);
                    let _ = socket.try_send_to(&msg, to);
                    if let Some(r) = &reach_msg {
                        let _ = socket.try_send_to(r, to);
                    }
                }
                // Peers not heard from go through their own socket, so that datagrams queued
                // behind their unresolved neighbour entries never fill the buffer the live
                // peers' heartbeats need; after the start-up grace only every few rounds.
                let grace = now.saturating_duration_since(started) < silent_after;
                if grace || round % PROBE_EVERY == 0 {
                    for ip in silent {
                        let to = SocketAddr::new(ip, settings.peer_port);
                        let _ = probe_socket.try_send_to(&msg, to);
                        if let Some(r) = &reach_msg {
                            let _ = probe_socket.try_send_to(r, to);
                        }
                    }
                }
            }
            let (mut nodes, suspicious, foreign, mut reach) = handler
                .state
                .lock()
                .map(|s| {
                    let foreign = s
                        .foreign_key_at
                        .is_some_and(|t| now.saturating_duration_since(t) < settings.timeout);
                    let prev: BTreeSet<String> = tx
                        .borrow()
                        .nodes
                        .iter()
                        .filter(|n| **n != settings.node_name)
                        .cloned()
                        .collect();
                    let alive = s.table.alive(&settings.node_name, now, timeout);
                    let reach = s.table.reach_of(&alive);
                    (
                        alive,
                        s.table.all_timed_out(&prev, now, timeout),
                        foreign,
                        reach,
                    )
                })
                .unwrap_or_default();
            if nodes.len() == 1 && suspicious {
                // Everybody at once: suspect ourselves first, for one more timeout.
                let until = *suspect_until.get_or_insert_with(|| {
                    tracing::warn!(
                        "every peer went silent at once; suspecting this agent first                          (keeping the membership for one more timeout)"
                    );
                    now + settings.timeout
                });
                if now < until {
                    nodes = tx.borrow().nodes.clone();
                }
            } else if nodes.len() > 1 {
                suspect_until = None;
            }
            // Alone, but hearing Nodes we cannot authenticate: most likely our key is the
            // wrong one. Announcing would take every IP from the nodes that are fine.
            let key_mismatch = foreign && nodes.len() == 1;
            if key_mismatch != key_mismatch_logged {
                key_mismatch_logged = key_mismatch;
                if key_mismatch {
                    tracing::error!(
                        "hearing other nodes' membership datagrams but none with our key; not \
                         announcing any IP until a peer with our key is heard (check \
                         --memberlist-key-file against the other nodes)"
                    );
                }
            }
            let own = settings.reach.borrow().clone();
            if own.is_empty() {
                reach.remove(&settings.node_name);
            } else {
                reach.insert(settings.node_name.clone(), own);
            }
            if tx.borrow().nodes != nodes {
                owned_due_all = true;
            }
            let owned_reports = handler
                .state
                .lock()
                .map(|s| s.table.owned_of(&nodes))
                .unwrap_or_default();
            if owned_due_all || (send && round % REACH_EVERY == 0) {
                let map = peers.borrow().clone();
                let answering = owned_rx.borrow_and_update().clone();
                send_owned(
                    &handler,
                    map.as_ref(),
                    &answering,
                    owned_due_all || round % PROBE_EVERY == 0,
                    now,
                    timeout,
                    silent_after,
                    |r| datagram(Kind::Owned, &mut seq, Vec::new(), Some(r)),
                    |bytes, ip, recent| {
                        let to = SocketAddr::new(ip, settings.peer_port);
                        let _ = if recent {
                            socket.try_send_to(bytes, to)
                        } else {
                            probe_socket.try_send_to(bytes, to)
                        };
                    },
                );
                owned_due_all = false;
            }
            let live = Live {
                // The hand-over hold: announce from the third "alive" round on, i.e. two
                // intervals after peers first heard it.
                warmed_up: alive_rounds > HOLD_ROUNDS && !key_mismatch,
                nodes,
                timeout: settings.timeout,
                reach,
                incarnation,
                owned: owned_reports,
                leaving: false,
            };
            tx.send_if_modified(|cur| {
                if *cur != live {
                    if cur.nodes != live.nodes {
                        tracing::info!(live = ?live.nodes, "agent membership changed");
                    }
                    if live.warmed_up && !cur.warmed_up {
                        tracing::info!(live = ?live.nodes, "membership warmed up: announcing");
                    }
                    *cur = live;
                    true
                } else {
                    false
                }
            });
        }
        // Tell peers we are gone, so they need not wait for the timeout.
        let map = peers.borrow().clone();
        let (targets, _) = targets(&settings.node_name, map.as_ref(), |_| true);
        for _ in 0..2 {
            let leave = datagram(Kind::Leave, &mut seq, Vec::new(), None);
            for ip in &targets {
                let _ = socket.try_send_to(&leave, SocketAddr::new(*ip, settings.peer_port));
            }
        }
        // Linger: keep listening (sending nothing) so that a leaving announcer hears its
        // successors report that they took its IPs over (make-before-break, see handover).
        let until = Instant::now() + settings.timeout * LINGER_TIMEOUTS;
        tx.send_modify(|l| l.leaving = true);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                _ = changed.notified() => {}
                _ = tokio::time::sleep(settings.interval) => {}
            }
            let now = Instant::now();
            let timeout = settings.timeout + lag.min(settings.timeout * 4);
            let (nodes, owned) = handler
                .state
                .lock()
                .map(|s| {
                    let alive = s.table.alive(&settings.node_name, now, timeout);
                    let owned = s.table.owned_of(&alive);
                    (alive, owned)
                })
                .unwrap_or_default();
            tx.send_if_modified(|cur| {
                if cur.nodes != nodes || cur.owned != owned {
                    cur.nodes = nodes;
                    cur.owned = owned;
                    true
                } else {
                    false
                }
            });
        }
        stopped.cancel();
    });
    Ok(rx)
}

/// Sends this node's owned report to every peer: one datagram per peer (each names the
/// peer's incarnation if we count it alive), to recent peers always, to silent ones only when
/// `to_silent`.
#[allow(clippy::too_many_arguments)]
fn send_owned(
    handler: &Handler,
    peers: Option<&PeerMap>,
    answering: &Answering,
    to_silent: bool,
    now: Instant,
    timeout: Duration,
    silent_after: Duration,
    mut encode: impl FnMut(OwnedReport) -> Vec<u8>,
    mut send: impl FnMut(&[u8], IpAddr, bool),
) {
    let Some(peers) = peers else { return };
    let Ok(views) = handler.state.lock().map(|s| {
        peers
            .keys()
            .filter(|n| **n != handler.me)
            .map(|n| {
                (
                    n.clone(),
                    s.table.counted(n, now, timeout),
                    s.table.heard_within(n, now, silent_after),
                )
            })
            .collect::<Vec<_>>()
    }) else {
        return;
    };
    for (node, counted, recent) in views {
        if !recent && !to_silent {
            continue;
        }
        let bytes = encode(OwnedReport {
            counted,
            truncated: false,
            ips: answering.clone(),
        });
        for ip in peers.get(&node).into_iter().flatten() {
            send(&bytes, *ip, recent);
        }
    }
}

/// Where this round's heartbeats go: the addresses of the other nodes heard from recently
/// (`recent(node)`), and those of the silent ones (both without duplicates; an address in
/// both counts as recent).
fn targets(
    me: &str,
    peers: Option<&PeerMap>,
    recent: impl Fn(&str) -> bool,
) -> (BTreeSet<IpAddr>, BTreeSet<IpAddr>) {
    let (mut live, mut silent) = (BTreeSet::new(), BTreeSet::new());
    for (n, ips) in peers.into_iter().flatten() {
        if n.as_str() == me {
            continue;
        }
        if recent(n) {
            live.extend(ips.iter().copied());
        } else {
            silent.extend(ips.iter().copied());
        }
    }
    silent.retain(|ip| !live.contains(ip));
    (live, silent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memberlist_key::Key;

    fn test_keys() -> watch::Receiver<KeyRing> {
        let key = Key::parse(b"membership-test-key-0123").unwrap();
        watch::channel(KeyRing::new(key)).1
    }

    /// Both agents on 127.0.0.1.
    fn loopback_peers() -> PeerMap {
        let lo: BTreeSet<IpAddr> = [IpAddr::from([127, 0, 0, 1])].into();
        [("a".to_string(), lo.clone()), ("b".to_string(), lo)].into()
    }

    #[tokio::test(start_paused = true)]
    async fn peers_time_out_and_leave_is_immediate() {
        let mut t = Table::default();
        let t0 = Instant::now();
        let timeout = Duration::from_secs(1);
        t.heard(
            Msg::Alive {
                node: "b".into(),
                incarnation: 1,
            },
            t0,
            timeout,
        );
        t.heard(
            Msg::Alive {
                node: "c".into(),
                incarnation: 1,
            },
            t0,
            timeout,
        );
        let names = |s: BTreeSet<String>| s.into_iter().collect::<Vec<_>>();
        assert_eq!(names(t.alive("a", t0, timeout)), ["a", "b", "c"]);
        // c keeps talking, b goes silent.
        t.heard(
            Msg::Alive {
                node: "c".into(),
                incarnation: 1,
            },
            t0 + Duration::from_millis(900),
            timeout,
        );
        assert_eq!(
            names(t.alive("a", t0 + Duration::from_millis(1100), timeout)),
            ["a", "c"]
        );
        // c leaves: gone at once, and its late heartbeats of the same incarnation are ignored.
        t.heard(
            Msg::Leave {
                node: "c".into(),
                incarnation: 1,
            },
            t0 + Duration::from_millis(1200),
            timeout,
        );
        t.heard(
            Msg::Alive {
                node: "c".into(),
                incarnation: 1,
            },
            t0 + Duration::from_millis(1250),
            timeout,
        );
        assert_eq!(
            names(t.alive("a", t0 + Duration::from_millis(1300), timeout)),
            ["a"]
        );
        // A restarted c (new incarnation) is alive again.
        t.heard(
            Msg::Alive {
                node: "c".into(),
                incarnation: 2,
            },
            t0 + Duration::from_millis(1400),
            timeout,
        );
        assert_eq!(
            names(t.alive("a", t0 + Duration::from_millis(1500), timeout)),
            ["a", "c"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn joining_peers_are_not_alive_until_they_say_so() {
        let mut t = Table::default();
        let t0 = Instant::now();
        let timeout = Duration::from_secs(1);
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let names = |s: BTreeSet<String>| s.into_iter().collect::<Vec<_>>();
        let join = |inc| Msg::Join {
            node: "b".into(),
            incarnation: inc,
        };
        let alive = |inc| Msg::Alive {
            node: "b".into(),
            incarnation: inc,
        };
        // Warming up: heard, not alive; repeated joins change nothing.
        assert!(t.heard(join(1), t0, timeout));
        assert!(!t.heard(join(1), ms(200), timeout));
        assert_eq!(names(t.alive("a", ms(300), timeout)), ["a"]);
        // Ready: alive, and the caller is told to re-evaluate at once.
        assert!(t.heard(alive(1), ms(400), timeout));
        assert!(!t.heard(alive(1), ms(600), timeout));
        assert_eq!(names(t.alive("a", ms(700), timeout)), ["a", "b"]);
        // A reordered join of the same incarnation does not undo "alive".
        assert!(!t.heard(join(1), ms(650), timeout));
        assert_eq!(names(t.alive("a", ms(700), timeout)), ["a", "b"]);
        // b crashes and restarts within the timeout: its new incarnation's join retires the
        // old one at once, and late datagrams of the old one are ignored.
        assert!(t.heard(join(2), ms(800), timeout));
        assert_eq!(names(t.alive("a", ms(810), timeout)), ["a"]);
        assert!(!t.heard(alive(1), ms(820), timeout));
        assert_eq!(names(t.alive("a", ms(830), timeout)), ["a"]);
        assert!(t.heard(alive(2), ms(1900), timeout));
        assert_eq!(names(t.alive("a", ms(2000), timeout)), ["a", "b"]);
        // Leave of a ready peer changes the set; of an unknown one it does not.
        assert!(t.heard(
            Msg::Leave {
                node: "b".into(),
                incarnation: 2
            },
            ms(2100),
            timeout
        ));
        assert!(!t.heard(
            Msg::Leave {
                node: "z".into(),
                incarnation: 1
            },
            ms(2100),
            timeout
        ));
        assert_eq!(names(t.alive("a", ms(2200), timeout)), ["a"]);
        // A ready peer heard again after a timeout of silence (a healed link) is news too.
        assert!(t.heard(alive(3), ms(2300), timeout));
        assert!(!t.heard(alive(3), ms(2400), timeout));
        assert_eq!(names(t.alive("a", ms(3500), timeout)), ["a"]);
        assert!(t.heard(alive(3), ms(3500), timeout));
        assert_eq!(names(t.alive("a", ms(3500), timeout)), ["a", "b"]);
    }

    /// The hand-over on restart: a peer counts the newcomer alive (and so stops answering for
    /// the newcomer's IPs) before the newcomer counts itself (and starts answering).
    #[tokio::test]
    async fn a_restarting_agent_is_counted_by_peers_before_it_announces() {
        let shutdown = CancellationToken::new();
        let port = |_| {
            std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (pa, pb) = (port(0), port(1));
        let mk = |name: &str, bind: u16, peer: u16| {
            let mut s = MembershipSettings::new(name, peer, test_keys());
            s.bind = SocketAddr::from(([127, 0, 0, 1], bind));
            s.interval = Duration::from_millis(50);
            s.timeout = Duration::from_millis(300);
            s
        };
        let loopback = loopback_peers();
        let (_ptx, prx) = watch::channel(Some(loopback));
        let mut a = start(mk("a", pa, pb), prx.clone(), shutdown.clone())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while !a.borrow_and_update().warmed_up {
                a.changed().await.unwrap();
            }
        })
        .await
        .expect("a warms up alone");
        let b_started = std::time::Instant::now();
        let mut b = start(mk("b", pb, pa), prx, shutdown.clone()).await.unwrap();
        let watch_a = async {
            loop {
                if a.borrow_and_update().nodes.contains("b") {
                    return std::time::Instant::now();
                }
                a.changed().await.unwrap();
            }
        };
        let watch_b = async {
            loop {
                let l = b.borrow_and_update().clone();
                if l.warmed_up {
                    return (std::time::Instant::now(), l);
                }
                b.changed().await.unwrap();
            }
        };
        let (a_counts_b, (b_announces, b_view)) =
            tokio::time::timeout(Duration::from_secs(5), async {
                tokio::join!(watch_a, watch_b)
            })
            .await
            .expect("both converge");
        // Not during b's warm-up (300 ms) ...
        assert!(
            a_counts_b - b_started >= Duration::from_millis(300),
            "a counted b {:?} after b started, during its warm-up",
            a_counts_b - b_started
        );
        // ... and before b announces anything, by most of the 100 ms hold.
        assert!(
            a_counts_b + Duration::from_millis(50) <= b_announces,
            "a counted b at {:?}, b announced at {:?}",
            a_counts_b - b_started,
            b_announces - b_started
        );
        assert!(b_view.nodes.contains("a"), "b heard a while warming up");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn two_agents_on_loopback_see_each_other_and_the_leave() {
        let shutdown_a = CancellationToken::new();
        let shutdown_b = CancellationToken::new();
        // Two ports on loopback; each sends to the other's port.
        let pa = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pb = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mk = |name: &str, bind: u16, peer: u16| {
            let mut s = MembershipSettings::new(name, peer, test_keys());
            s.bind = SocketAddr::from(([127, 0, 0, 1], bind));
            s.interval = Duration::from_millis(50);
            s.timeout = Duration::from_millis(300);
            s
        };
        let loopback = loopback_peers();
        let (ptx, prx) = watch::channel(None);
        let mut a = start(mk("a", pa, pb), prx.clone(), shutdown_a.clone())
            .await
            .unwrap();
        let b = start(mk("b", pb, pa), prx, shutdown_b.clone())
            .await
            .unwrap();
        // Peers unknown: never warmed up, however long we wait.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!a.borrow().warmed_up);
        ptx.send_replace(Some(loopback));
        let both = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let l = a.borrow_and_update().clone();
                if l.warmed_up && l.nodes.len() == 2 {
                    return l;
                }
                a.changed().await.unwrap();
            }
        })
        .await
        .expect("a sees b");
        assert!(both.nodes.contains("b"));
        assert!(b.borrow().nodes.contains("a") || b.borrow().nodes.len() <= 2);
        shutdown_b.cancel();
        let t0 = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if !a.borrow_and_update().nodes.contains("b") {
                    return;
                }
                a.changed().await.unwrap();
            }
        })
        .await
        .expect("a notices b left");
        // The leave message makes it faster than the 300 ms timeout.
        assert!(
            t0.elapsed() < Duration::from_millis(300),
            "{:?}",
            t0.elapsed()
        );
        shutdown_a.cancel();
    }

    /// Reach reports travel with the membership: b learns where a can announce, follows a
    /// change, and forgets it when a leaves; a's own entry is in its own view.
    #[tokio::test]
    async fn reach_reports_reach_peers_and_follow_changes() {
        let port = |_: ()| {
            std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (pa, pb) = (port(()), port(()));
        let served = |net: &str| {
            vec![ServedInterface {
                name: "eth0".into(),
                up: true,
                nets: vec![(net.parse().unwrap(), 24)],
            }]
        };
        let (reach_tx, reach_rx) = watch::channel(served("198.51.100.0"));
        let mk = |name: &str, bind: u16, peer: u16| {
            let mut s = MembershipSettings::new(name, peer, test_keys());
            s.bind = SocketAddr::from(([127, 0, 0, 1], bind));
            s.interval = Duration::from_millis(50);
            s.timeout = Duration::from_millis(300);
            s
        };
        let (shutdown_a, shutdown_b) = (CancellationToken::new(), CancellationToken::new());
        let (_ptx, prx) = watch::channel(Some(loopback_peers()));
        let mut sa = mk("a", pa, pb);
        sa.reach = reach_rx;
        let a = start(sa, prx.clone(), shutdown_a.clone()).await.unwrap();
        let mut b = start(mk("b", pb, pa), prx, shutdown_b.clone())
            .await
            .unwrap();
        let until = |b: &mut watch::Receiver<Live>, want: Option<Vec<ServedInterface>>| {
            let mut b = b.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(5), async {
                    loop {
                        if b.borrow_and_update().reach.get("a") == want.as_ref() {
                            return;
                        }
                        b.changed().await.unwrap();
                    }
                })
                .await
            }
        };
        until(&mut b, Some(served("198.51.100.0")))
            .await
            .expect("b learns a's reach");
        assert_eq!(a.borrow().reach.get("a"), Some(&served("198.51.100.0")));
        assert_eq!(b.borrow().reach.get("b"), None, "b reports nothing");
        reach_tx.send_replace(served("198.51.101.0"));
        until(&mut b, Some(served("198.51.101.0")))
            .await
            .expect("b follows the change");
        shutdown_a.cancel();
        until(&mut b, None).await.expect("a's reach gone with a");
        shutdown_b.cancel();
    }

    /// Three agents on 127.0.0.1-3 (one port): a and b share a key, c has another. c is never
    /// counted and never announces; then a and b rotate to a new key a little apart and never
    /// lose each other.
    #[tokio::test]
    async fn a_wrong_key_is_never_counted_and_a_rotation_keeps_the_membership() {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let ip = |n: u8| IpAddr::from([127, 0, 0, n]);
        let peers: PeerMap = [("a", 1), ("b", 2), ("c", 3)]
            .into_iter()
            .map(|(n, i)| (n.to_string(), [ip(i)].into()))
            .collect();
        let (_ptx, prx) = watch::channel(Some(peers));
        let key = |s: &str| Key::parse(s.as_bytes()).unwrap();
        let (ka, ka_rx) = watch::channel(KeyRing::new(key("the-shared-key-0123")));
        let (kb, kb_rx) = watch::channel(KeyRing::new(key("the-shared-key-0123")));
        let (_kc, kc_rx) = watch::channel(KeyRing::new(key("a-wrong-key-456789")));
        let shutdown = CancellationToken::new();
        let mut agents = Vec::new();
        for (name, i, keys) in [("a", 1, ka_rx), ("b", 2, kb_rx), ("c", 3, kc_rx)] {
            let mut s = MembershipSettings::new(name, port, keys);
            s.bind = SocketAddr::new(ip(i), port);
            s.interval = Duration::from_millis(50);
            s.timeout = Duration::from_millis(300);
            let rejected = s.rejected.clone();
            let rx = start(s, prx.clone(), shutdown.clone()).await.unwrap();
            agents.push((rx, rejected));
        }
        let names = |l: &Live| l.nodes.iter().cloned().collect::<Vec<_>>();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !(agents[0].0.borrow().warmed_up && names(&agents[0].0.borrow()) == ["a", "b"]) {
            assert!(std::time::Instant::now() < deadline, "a never saw b");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // c: alone and hearing only foreign keys, so it holds back; a and b never count it.
        let check_for = |ms: u64| {
            let until = std::time::Instant::now() + Duration::from_millis(ms);
            let agents = &agents;
            async move {
                while std::time::Instant::now() < until {
                    for (i, (rx, _)) in agents.iter().take(2).enumerate() {
                        let l = rx.borrow().clone();
                        assert_eq!(names(&l), ["a", "b"], "agent {i}");
                        assert!(l.warmed_up);
                    }
                    let c = agents[2].0.borrow().clone();
                    assert!(!c.warmed_up, "c announces with a wrong key: {c:?}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        check_for(1000).await;
        let unknown_key = |i: usize| {
            agents[i]
                .1
                .get_or_create(&labels1("reason", "unknown_key"))
                .get()
        };
        assert!(unknown_key(0) > 0 && unknown_key(1) > 0 && unknown_key(2) > 0);
        // Rotation, window 1.2 s: a first, b 400 ms later (longer than the timeout: had a sent
        // the new key at once, b would have lost it).
        let window = Duration::from_millis(1200);
        ka.send_modify(|r| r.rotate(key("the-next-key-abcdef"), Instant::now(), window));
        let before = unknown_key(0) + unknown_key(1);
        check_for(400).await;
        kb.send_modify(|r| r.rotate(key("the-next-key-abcdef"), Instant::now(), window));
        check_for(1500).await;
        // Nothing a or b sent was rejected by the other during the rotation (c's datagrams
        // still are: the counters rise by c's share only, about 2 × 38 in 1.9 s).
        let during = unknown_key(0) + unknown_key(1) - before;
        assert!(
            during <= 2 * 40,
            "{during} unknown-key rejections during the rotation"
        );
        assert_eq!(
            agents[0]
                .1
                .get_or_create(&labels1("reason", "bad_mac"))
                .get(),
            0
        );
        shutdown.cancel();
    }

    #[test]
    fn silent_peers_are_separated_from_recent_ones() {
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        let peers: PeerMap = [
            ("me".to_string(), [ip(1)].into()),
            ("live".to_string(), [ip(2), ip(3)].into()),
            ("dead".to_string(), [ip(4)].into()),
            ("shares".to_string(), [ip(3)].into()),
        ]
        .into();
        let (live, silent) = targets("me", Some(&peers), |n| n == "live");
        assert_eq!(live, [ip(2), ip(3)].into());
        assert_eq!(silent, [ip(4)].into());
        assert_eq!(targets("me", None, |_| true), Default::default());
    }
}
