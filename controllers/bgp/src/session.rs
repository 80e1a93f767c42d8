//! Per-peer BGP sessions (RFC 4271 §8, the active-open subset) and the [`Speaker`] that owns
//! them.
//!
//! Each peer runs as one tokio task: connect (optionally from `source_address`), OPEN exchange,
//! hold time negotiated as the minimum of both sides (0 = no keepalives and no hold timer),
//! KEEPALIVE every `keepalive_time` (default hold/3), then announce the peer's prefix set and
//! follow its changes. On any error the session closes and reconnects with exponential backoff.
//! Route refresh requests are answered by resending every announced prefix; routes the peer
//! sends are ignored (the speaker installs nothing locally).
//!
//! Sockets are created by the task, in the network namespace of the thread that runs the tokio
//! runtime's workers (what the lab tests rely on).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout};

use crate::bfd::{BfdConfig, BfdHandle, BfdState, BfdStatus, Hub};
use crate::wire::{
    code, AsSegment, Capability, Codec, DecodeError, Message, Notification, Open, PathAttribute,
    Update, AFI_IPV4, AFI_IPV6, SAFI_UNICAST,
};

/// How long a TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the peer's OPEN and KEEPALIVE when the hold time does not bound it.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Prefixes per UPDATE (well under 4096 bytes for /32 and /128 routes).
const V4_PER_UPDATE: usize = 400;
const V6_PER_UPDATE: usize = 120;

/// Attributes of one announced route (beyond ORIGIN, AS_PATH and NEXT_HOP, which the session
/// sets).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteAttrs {
    /// LOCAL_PREF on iBGP sessions (default: the peer's `local_pref`, else 100); not sent on
    /// eBGP.
    pub local_pref: Option<u32>,
    /// COMMUNITIES, added to the peer's own.
    pub communities: Vec<u32>,
}

/// What a peer should have: prefixes with their attributes.
pub type Routes = BTreeMap<IpNetwork, RouteAttrs>;

/// One peer's configuration (MetalLB's BGPPeer fields that concern the session).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// Unique key, e.g. the BGPPeer's name.
    pub name: String,
    pub my_asn: u32,
    pub peer_asn: u32,
    pub peer_address: IpAddr,
    pub peer_port: u16,
    pub source_address: Option<IpAddr>,
    /// Proposed hold time (whole seconds are sent; 0 disables keepalives).
    pub hold_time: Duration,
    /// Keepalive interval; default hold time / 3.
    pub keepalive_time: Option<Duration>,
    pub router_id: Ipv4Addr,
    /// Next hop for IPv4 prefixes; default the session's local address when it is IPv4.
    pub next_hop_v4: Option<Ipv4Addr>,
    /// Next hop for IPv6 prefixes; default the session's local address when it is IPv6.
    pub next_hop_v6: Option<Ipv6Addr>,
    /// LOCAL_PREF for iBGP sessions (default 100); not sent on eBGP.
    pub local_pref: Option<u32>,
    /// COMMUNITIES attached to every announcement.
    pub communities: Vec<u32>,
    /// First reconnect delay; doubles up to 30 s.
    pub connect_retry: Duration,
    /// Run a BFD session with the peer; when it goes from Up to Down the BGP session closes
    /// at once.
    pub bfd: Option<BfdConfig>,
}

impl PeerConfig {
    /// A peer with MetalLB's defaults: port 179, hold time 90 s, 1 s first retry.
    pub fn new(name: &str, my_asn: u32, peer_asn: u32, peer_address: IpAddr) -> PeerConfig {
        PeerConfig {
            name: name.to_string(),
            my_asn,
            peer_asn,
            peer_address,
            peer_port: 179,
            source_address: None,
            hold_time: Duration::from_secs(90),
            keepalive_time: None,
            router_id: Ipv4Addr::UNSPECIFIED,
            next_hop_v4: None,
            next_hop_v6: None,
            local_pref: None,
            communities: Vec::new(),
            connect_retry: Duration::from_secs(1),
            bfd: None,
        }
    }

    fn ibgp(&self) -> bool {
        self.my_asn == self.peer_asn
    }
}

/// Where a session is (RFC 4271's states; Active is folded into Connect).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    Idle,
    Connect,
    OpenSent,
    OpenConfirm,
    Established,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Idle => "Idle",
            SessionState::Connect => "Connect",
            SessionState::OpenSent => "OpenSent",
            SessionState::OpenConfirm => "OpenConfirm",
            SessionState::Established => "Established",
        }
    }
}

/// What a session reports for status and metrics.
#[derive(Clone, Debug)]
pub struct PeerStatus {
    pub name: String,
    pub state: SessionState,
    /// When the session last reached Established (None while it is not).
    pub established_at: Option<Instant>,
    /// The same on the wall clock (for status objects).
    pub established_wall: Option<std::time::SystemTime>,
    /// How many times it reached Established.
    pub established_count: u64,
    /// Prefixes the peer currently has from us.
    pub prefixes_sent: usize,
    pub updates_sent: u64,
    /// Negotiated hold time of the current session.
    pub hold_time: Option<Duration>,
    /// Why the last session ended or the last connect failed.
    pub last_error: Option<String>,
    /// Why the last established session ended (kept across reconnects).
    pub last_down_reason: Option<String>,
    /// State of the peer's BFD session (None without BFD).
    pub bfd_state: Option<BfdState>,
    /// Times the BFD session went from Up to Down.
    pub bfd_flaps: u64,
}

impl PeerStatus {
    fn new(name: &str) -> PeerStatus {
        PeerStatus {
            name: name.to_string(),
            state: SessionState::Idle,
            established_at: None,
            established_wall: None,
            established_count: 0,
            prefixes_sent: 0,
            updates_sent: 0,
            hold_time: None,
            last_error: None,
            last_down_reason: None,
            bfd_state: None,
            bfd_flaps: 0,
        }
    }

    /// Time since the session reached Established.
    pub fn uptime(&self) -> Option<Duration> {
        self.established_at.map(|t| t.elapsed())
    }
}

type SharedStatus = Arc<Mutex<PeerStatus>>;

fn with_status(status: &SharedStatus, f: impl FnOnce(&mut PeerStatus)) {
    // A poisoned lock only means another thread panicked mid-update; the data is still usable.
    let mut guard = status.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut guard);
}

struct Peer {
    config: PeerConfig,
    prefixes: watch::Sender<Routes>,
    /// `Some(deadline)`: withdraw everything, close by the deadline and stop.
    stop: watch::Sender<Option<tokio::time::Instant>>,
    status: SharedStatus,
    task: JoinHandle<()>,
    bfd_status: Option<watch::Receiver<BfdStatus>>,
    bfd_abort: Option<tokio::task::AbortHandle>,
}

/// The BGP speaker: one session per configured peer.
pub struct Speaker {
    runtime: tokio::runtime::Handle,
    peers: Mutex<BTreeMap<String, Peer>>,
    /// Sessions being closed after `set_peers` dropped or changed them.
    retiring: Mutex<Vec<JoinHandle<()>>>,
    /// How long a dropped peer's session may take to withdraw and close.
    retire_timeout: Duration,
    /// BFD sessions' shared receive side.
    bfd: Hub,
}

impl Speaker {
    /// A speaker whose sessions run on the current tokio runtime (panics outside one, like
    /// `tokio::spawn`).
    pub fn new() -> Speaker {
        Speaker {
            runtime: tokio::runtime::Handle::current(),
            peers: Mutex::new(BTreeMap::new()),
            retiring: Mutex::new(Vec::new()),
            retire_timeout: Duration::from_secs(5),
            bfd: Hub::new(),
        }
    }

    /// Makes the set of sessions match `configs` (keyed by name): new peers start, removed
    /// ones withdraw their prefixes and close, changed ones restart keeping their prefixes.
    pub fn set_peers(&self, configs: Vec<PeerConfig>) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let wanted: BTreeMap<String, PeerConfig> =
            configs.into_iter().map(|c| (c.name.clone(), c)).collect();
        let names: Vec<String> = peers.keys().cloned().collect();
        let mut carried: BTreeMap<String, Routes> = BTreeMap::new();
        for name in names {
            let keep = wanted.get(&name).is_some_and(|c| peers[&name].config == *c);
            if keep {
                continue;
            }
            if let Some(peer) = peers.remove(&name) {
                carried.insert(name, peer.prefixes.borrow().clone());
                let deadline = tokio::time::Instant::now() + self.retire_timeout;
                let _ = peer.stop.send(Some(deadline));
                self.retiring
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(peer.task);
            }
        }
        for (name, config) in wanted {
            if peers.contains_key(&name) {
                continue;
            }
            let initial = carried.remove(&name).unwrap_or_default();
            let (prefixes, prefixes_rx) = watch::channel(initial);
            let (stop, stop_rx) = watch::channel(None);
            let status = Arc::new(Mutex::new(PeerStatus::new(&name)));
            let bfd = config.bfd.and_then(|b| {
                match self
                    .bfd
                    .start(config.peer_address, config.source_address, b)
                {
                    Ok(h) => Some(h),
                    Err(e) => {
                        tracing::warn!(peer = %name, error = %e, "BFD session not started");
                        with_status(&status, |s| s.last_error = Some(e.to_string()));
                        None
                    }
                }
            });
            let bfd_status = bfd.as_ref().map(BfdHandle::status);
            let bfd_abort = bfd.as_ref().map(BfdHandle::abort_handle);
            let task = self.runtime.spawn(run_peer(
                config.clone(),
                prefixes_rx,
                stop_rx,
                status.clone(),
                bfd,
            ));
            peers.insert(
                name,
                Peer {
                    config,
                    prefixes,
                    stop,
                    status,
                    task,
                    bfd_status,
                    bfd_abort,
                },
            );
        }
    }

    /// Sets what `peer` announces, every prefix with the peer's default attributes. Returns
    /// false when there is no such peer.
    pub fn set_prefixes(&self, peer: &str, prefixes: BTreeSet<IpNetwork>) -> bool {
        self.set_routes(
            peer,
            prefixes
                .into_iter()
                .map(|p| (p, RouteAttrs::default()))
                .collect(),
        )
    }

    /// Sets what `peer` announces, with per-route attributes; the session sends only the
    /// differences (a changed attribute re-announces the route). Returns false when there is
    /// no such peer.
    pub fn set_routes(&self, peer: &str, prefixes: Routes) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        match peers.get(peer) {
            Some(p) => {
                p.prefixes.send_if_modified(|current| {
                    if *current == prefixes {
                        false
                    } else {
                        *current = prefixes;
                        true
                    }
                });
                true
            }
            None => false,
        }
    }

    /// Every session's status, by peer name.
    pub fn status(&self) -> Vec<PeerStatus> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .values()
            .map(|p| {
                let mut s = p.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some(bfd) = &p.bfd_status {
                    let b = bfd.borrow();
                    s.bfd_state = Some(b.state);
                    s.bfd_flaps = b.flaps;
                    if let Some(e) = &b.error {
                        s.last_error = Some(e.clone());
                    }
                }
                s
            })
            .collect()
    }

    /// Withdraws every prefix from every peer, waits (at most `limit`) until each peer has
    /// processed that and closed, then stops all sessions.
    pub async fn shutdown(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        let mut tasks = Vec::new();
        {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            for (_, peer) in std::mem::take(&mut *peers) {
                let _ = peer.stop.send(Some(deadline));
                tasks.push(peer.task);
            }
            tasks.append(&mut self.retiring.lock().unwrap_or_else(|p| p.into_inner()));
        }
        for mut task in tasks {
            // The session itself honours the deadline; this bound only guards against a bug.
            let grace = deadline + Duration::from_millis(500);
            if timeout(grace - tokio::time::Instant::now(), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }

    /// Stops every session at once without withdrawing anything (what a crash looks like to
    /// the peers: the sockets close, or with the link down, nothing at all).
    pub fn abort(&self) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        for (_, peer) in std::mem::take(&mut *peers) {
            // BFD first, silently: a crashed node sends no AdminDown.
            if let Some(bfd) = &peer.bfd_abort {
                bfd.abort();
            }
            peer.task.abort();
        }
        for task in self
            .retiring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

impl Default for Speaker {
    fn default() -> Speaker {
        Speaker::new()
    }
}

impl Drop for Speaker {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("peer sent NOTIFICATION {}/{}", .0.code, .0.subcode)]
    Notification(Notification),
    #[error("hold timer expired")]
    HoldExpired,
    #[error("BFD session down (diagnostic {0})")]
    BfdDown(u8),
    #[error("{0}")]
    Protocol(String),
    #[error("encode: {0}")]
    Encode(#[from] crate::wire::EncodeError),
}

async fn run_peer(
    config: PeerConfig,
    mut prefixes: watch::Receiver<Routes>,
    mut stop: watch::Receiver<Option<tokio::time::Instant>>,
    status: SharedStatus,
    bfd: Option<BfdHandle>,
) {
    let mut bfd_status = bfd.as_ref().map(BfdHandle::status);
    let mut backoff = config.connect_retry.max(Duration::from_millis(10));
    loop {
        if stop.borrow().is_some() {
            break;
        }
        with_status(&status, |s| s.state = SessionState::Connect);
        let mut established = false;
        let result = session(
            &config,
            &mut prefixes,
            &mut stop,
            &status,
            &mut bfd_status,
            &mut established,
        )
        .await;
        with_status(&status, |s| {
            s.state = SessionState::Idle;
            s.established_at = None;
            s.established_wall = None;
            s.prefixes_sent = 0;
            s.hold_time = None;
            if let Err(e) = &result {
                s.last_error = Some(e.to_string());
                if established {
                    s.last_down_reason = Some(e.to_string());
                }
            }
        });
        match result {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(peer = %config.name, error = %e, "BGP session down");
            }
        }
        if established {
            backoff = config.connect_retry.max(Duration::from_millis(10));
        }
        tokio::select! {
            _ = sleep(backoff) => {}
            _ = stop.changed() => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    // After the BGP session closed: the BFD session says AdminDown and stops.
    drop(bfd);
}

/// The next BFD state change (never, without BFD or once the session is gone).
async fn bfd_changed(bfd: &mut Option<watch::Receiver<BfdStatus>>) -> BfdStatus {
    if let Some(rx) = bfd {
        if rx.changed().await.is_ok() {
            return rx.borrow_and_update().clone();
        }
        // The BFD task ended: stop watching it.
        *bfd = None;
    }
    std::future::pending().await
}

async fn connect(
    config: &PeerConfig,
) -> Result<(OwnedReadHalf, OwnedWriteHalf, SocketAddr), SessionError> {
    let peer = SocketAddr::new(config.peer_address, config.peer_port);
    let socket = match peer {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(SessionError::Connect)?;
    if let Some(src) = config.source_address {
        socket
            .bind(SocketAddr::new(src, 0))
            .map_err(SessionError::Connect)?;
    }
    let stream = timeout(CONNECT_TIMEOUT, socket.connect(peer))
        .await
        .map_err(|_| {
            SessionError::Connect(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))
        })?
        .map_err(SessionError::Connect)?;
    stream.set_nodelay(true)?;
    let local = stream.local_addr()?;
    let (rd, wr) = stream.into_split();
    Ok((rd, wr, local))
}

/// Reads framed messages off the socket.
struct Reader {
    half: OwnedReadHalf,
    buf: Vec<u8>,
    codec: Codec,
}

impl Reader {
    /// Next message (cancel-safe: bytes read stay in the buffer).
    async fn next(&mut self) -> Result<Message, SessionError> {
        loop {
            if let Some((message, used)) = self.codec.decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(message);
            }
            let mut chunk = [0u8; 4096];
            let n = self.half.read(&mut chunk).await?;
            if n == 0 {
                return Err(SessionError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

struct Writer {
    half: OwnedWriteHalf,
    codec: Codec,
    status: SharedStatus,
}

impl Writer {
    async fn send(&mut self, message: &Message) -> Result<(), SessionError> {
        let bytes = self.codec.encode(message)?;
        self.half.write_all(&bytes).await?;
        if matches!(message, Message::Update(_)) {
            with_status(&self.status, |s| s.updates_sent += 1);
        }
        Ok(())
    }

    async fn notify(&mut self, code: u8, subcode: u8) {
        let n = Message::Notification(Notification {
            code,
            subcode,
            data: Vec::new(),
        });
        // Best effort: the session is ending anyway.
        let _ = timeout(Duration::from_secs(1), self.send(&n)).await;
    }
}

/// Announcement state of an established session.
struct Rib {
    ibgp: bool,
    my_asn: u32,
    /// LOCAL_PREF of routes that do not set one (iBGP).
    local_pref: u32,
    /// Communities of every route.
    communities: Vec<u32>,
    next_hop_v4: Option<Ipv4Addr>,
    next_hop_v6: Option<Ipv6Addr>,
    v4: bool,
    v6: bool,
    /// What the peer has from us.
    advertised: Routes,
}

impl Rib {
    fn eligible(&self, p: &IpNetwork) -> bool {
        match p {
            IpNetwork::V4(_) => self.v4 && self.next_hop_v4.is_some(),
            IpNetwork::V6(_) => self.v6 && self.next_hop_v6.is_some(),
        }
    }

    /// ORIGIN, AS_PATH, then LOCAL_PREF (iBGP) and COMMUNITIES for routes with `route`.
    fn attributes(&self, route: &RouteAttrs) -> Vec<PathAttribute> {
        let mut attrs = vec![PathAttribute::Origin(0)];
        if self.ibgp {
            attrs.push(PathAttribute::AsPath(Vec::new()));
            attrs.push(PathAttribute::LocalPref(
                route.local_pref.unwrap_or(self.local_pref),
            ));
        } else {
            attrs.push(PathAttribute::AsPath(vec![AsSegment::Sequence(vec![
                self.my_asn,
            ])]));
        }
        let communities: BTreeSet<u32> = self
            .communities
            .iter()
            .chain(&route.communities)
            .copied()
            .collect();
        if !communities.is_empty() {
            attrs.push(PathAttribute::Communities(
                communities.into_iter().collect(),
            ));
        }
        attrs
    }

    fn announce(&self, routes: &[(IpNetwork, &RouteAttrs)]) -> Vec<Message> {
        // One group of UPDATEs per distinct attribute set.
        let mut groups: BTreeMap<&RouteAttrs, Vec<IpNetwork>> = BTreeMap::new();
        for (p, a) in routes {
            groups.entry(a).or_default().push(*p);
        }
        let mut out = Vec::new();
        for (route, prefixes) in groups {
            let base = self.attributes(route);
            let v4: Vec<_> = prefixes
                .iter()
                .filter_map(|p| match p {
                    IpNetwork::V4(p) => Some(*p),
                    IpNetwork::V6(_) => None,
                })
                .collect();
            let v6: Vec<_> = prefixes.iter().filter(|p| p.is_ipv6()).copied().collect();
            if let Some(nh) = self.next_hop_v4 {
                for chunk in v4.chunks(V4_PER_UPDATE) {
                    let mut attributes = base.clone();
                    attributes.insert(2, PathAttribute::NextHop(nh));
                    out.push(Message::Update(Update {
                        withdrawn: Vec::new(),
                        attributes,
                        nlri: chunk.to_vec(),
                    }));
                }
            }
            if let Some(nh) = self.next_hop_v6 {
                for chunk in v6.chunks(V6_PER_UPDATE) {
                    let mut attributes = vec![PathAttribute::MpReach {
                        afi: AFI_IPV6,
                        safi: SAFI_UNICAST,
                        next_hops: vec![IpAddr::V6(nh)],
                        nlri: chunk.to_vec(),
                    }];
                    attributes.extend(base.iter().cloned());
                    out.push(Message::Update(Update {
                        attributes,
                        ..Update::default()
                    }));
                }
            }
        }
        out
    }

    fn withdraw(prefixes: &[IpNetwork]) -> Vec<Message> {
        let mut out = Vec::new();
        let v4: Vec<_> = prefixes
            .iter()
            .filter_map(|p| match p {
                IpNetwork::V4(p) => Some(*p),
                IpNetwork::V6(_) => None,
            })
            .collect();
        let v6: Vec<_> = prefixes.iter().filter(|p| p.is_ipv6()).copied().collect();
        for chunk in v4.chunks(V4_PER_UPDATE) {
            out.push(Message::Update(Update {
                withdrawn: chunk.to_vec(),
                ..Update::default()
            }));
        }
        for chunk in v6.chunks(V6_PER_UPDATE) {
            out.push(Message::Update(Update {
                attributes: vec![PathAttribute::MpUnreach {
                    afi: AFI_IPV6,
                    safi: SAFI_UNICAST,
                    withdrawn: chunk.to_vec(),
                }],
                ..Update::default()
            }));
        }
        out
    }

    /// Messages that bring the peer from `advertised` to `wanted`: withdrawals of what is
    /// gone, announcements of what is new or has other attributes.
    fn sync(&mut self, wanted: &Routes) -> Vec<Message> {
        let wanted: Routes = wanted
            .iter()
            .filter(|(p, _)| self.eligible(p))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        let gone: Vec<IpNetwork> = self
            .advertised
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        let new: Vec<(IpNetwork, &RouteAttrs)> = wanted
            .iter()
            .filter(|(p, a)| self.advertised.get(p) != Some(a))
            .map(|(p, a)| (*p, a))
            .collect();
        let mut out = Rib::withdraw(&gone);
        out.extend(self.announce(&new));
        self.advertised = wanted;
        out
    }
}

fn our_open(config: &PeerConfig) -> Message {
    Message::Open(Open {
        asn: config.my_asn,
        hold_time: u16::try_from(config.hold_time.as_secs()).unwrap_or(u16::MAX),
        router_id: config.router_id,
        capabilities: vec![
            Capability::Multiprotocol {
                afi: AFI_IPV4,
                safi: SAFI_UNICAST,
            },
            Capability::Multiprotocol {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
            },
            Capability::RouteRefresh,
            Capability::FourOctetAsn(config.my_asn),
        ],
    })
}

/// Negotiated hold time (seconds): the smaller proposal; 0 from either side means none.
pub fn negotiate_hold_time(ours: u16, theirs: u16) -> u16 {
    ours.min(theirs)
}

/// Keepalive interval for a negotiated hold time: the configured one, at most a third of the
/// hold time; None when the hold time is 0.
pub fn keepalive_interval(hold: Duration, configured: Option<Duration>) -> Option<Duration> {
    if hold.is_zero() {
        return None;
    }
    let third = hold / 3;
    Some(
        configured
            .map_or(third, |k| k.min(third))
            .max(Duration::from_millis(100)),
    )
}

async fn session(
    config: &PeerConfig,
    prefixes: &mut watch::Receiver<Routes>,
    stop: &mut watch::Receiver<Option<tokio::time::Instant>>,
    status: &SharedStatus,
    bfd: &mut Option<watch::Receiver<BfdStatus>>,
    established: &mut bool,
) -> Result<(), SessionError> {
    let (rd, wr, local) = tokio::select! {
        r = connect(config) => r?,
        _ = stop.changed() => return Ok(()),
    };
    let mut reader = Reader {
        half: rd,
        buf: Vec::new(),
        codec: Codec::default(),
    };
    let mut writer = Writer {
        half: wr,
        codec: Codec::default(),
        status: status.clone(),
    };
    writer.send(&our_open(config)).await?;
    with_status(status, |s| s.state = SessionState::OpenSent);

    let open = match timeout(OPEN_TIMEOUT, reader.next()).await {
        Err(_) => return Err(SessionError::Protocol("no OPEN from peer".into())),
        Ok(Err(SessionError::Decode(e))) => {
            writer.notify(e.code, e.subcode).await;
            return Err(e.into());
        }
        Ok(r) => match r? {
            Message::Open(open) => open,
            Message::Notification(n) => return Err(SessionError::Notification(n)),
            other => {
                writer.notify(code::FSM, 0).await;
                return Err(SessionError::Protocol(format!(
                    "expected OPEN, got {other:?}"
                )));
            }
        },
    };
    if open.asn != config.peer_asn {
        writer
            .notify(code::OPEN_MESSAGE, code::OPEN_BAD_PEER_AS)
            .await;
        return Err(SessionError::Protocol(format!(
            "peer ASN {} is not the configured {}",
            open.asn, config.peer_asn
        )));
    }
    let four = open.four_octet_asn();
    reader.codec.four_octet_asn = four;
    writer.codec.four_octet_asn = four;
    let ours = u16::try_from(config.hold_time.as_secs()).unwrap_or(u16::MAX);
    let hold = Duration::from_secs(u64::from(negotiate_hold_time(ours, open.hold_time)));
    let keepalive = keepalive_interval(hold, config.keepalive_time);
    writer.send(&Message::Keepalive).await?;
    with_status(status, |s| s.state = SessionState::OpenConfirm);

    let confirm_limit = if hold.is_zero() { OPEN_TIMEOUT } else { hold };
    match timeout(confirm_limit, reader.next()).await {
        Err(_) => {
            writer.notify(code::HOLD_TIMER_EXPIRED, 0).await;
            return Err(SessionError::HoldExpired);
        }
        Ok(r) => match r? {
            Message::Keepalive => {}
            Message::Notification(n) => return Err(SessionError::Notification(n)),
            other => {
                writer.notify(code::FSM, 0).await;
                return Err(SessionError::Protocol(format!(
                    "expected KEEPALIVE, got {other:?}"
                )));
            }
        },
    }

    // Families: those both sides advertised; a peer without any multiprotocol capability
    // speaks IPv4 unicast only (RFC 4760 §8).
    let peer_has_mp = open
        .capabilities
        .iter()
        .any(|c| matches!(c, Capability::Multiprotocol { .. }));
    let v4 = !peer_has_mp || open.supports(AFI_IPV4, SAFI_UNICAST);
    let v6 = open.supports(AFI_IPV6, SAFI_UNICAST);
    let mut rib = Rib {
        ibgp: config.ibgp(),
        my_asn: config.my_asn,
        local_pref: config.local_pref.unwrap_or(100),
        communities: config.communities.clone(),
        next_hop_v4: config.next_hop_v4.or(match local.ip() {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }),
        next_hop_v6: config.next_hop_v6.or(match local.ip() {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        }),
        v4,
        v6,
        advertised: Routes::new(),
    };
    *established = true;
    with_status(status, |s| {
        s.state = SessionState::Established;
        s.established_at = Some(Instant::now());
        s.established_wall = Some(std::time::SystemTime::now());
        s.established_count += 1;
        s.hold_time = Some(hold);
        s.last_error = None;
    });
    tracing::info!(peer = %config.name, hold = ?hold, "BGP session established");

    let wanted = prefixes.borrow_and_update().clone();
    for m in rib.sync(&wanted) {
        writer.send(&m).await?;
    }
    if v4 {
        writer
            .send(&Message::Update(Update::end_of_rib(AFI_IPV4, SAFI_UNICAST)))
            .await?;
    }
    if v6 {
        writer
            .send(&Message::Update(Update::end_of_rib(AFI_IPV6, SAFI_UNICAST)))
            .await?;
    }
    with_status(status, |s| s.prefixes_sent = rib.advertised.len());

    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let mut hold_deadline = if hold.is_zero() {
        far
    } else {
        tokio::time::Instant::now() + hold
    };
    let mut next_keepalive = keepalive.map_or(far, |k| tokio::time::Instant::now() + k);
    let mut prefixes_open = true;
    let mut bfd_up = bfd
        .as_mut()
        .is_some_and(|b| b.borrow_and_update().state == BfdState::Up);
    loop {
        tokio::select! {
            b = bfd_changed(bfd) => {
                if b.state == BfdState::Up {
                    bfd_up = true;
                } else if bfd_up {
                    // RFC 5882 §4.3: the forwarding path is gone; do not wait for the hold timer.
                    writer.notify(code::CEASE, 0).await;
                    return Err(SessionError::BfdDown(b.diag));
                }
            }
            changed = stop.changed() => {
                let deadline = match (changed, *stop.borrow()) {
                    (Ok(()), Some(d)) => d,
                    (Ok(()), None) => continue,
                    // The speaker is gone: close promptly.
                    (Err(_), _) => tokio::time::Instant::now() + Duration::from_secs(1),
                };
                graceful_close(&mut reader, &mut writer, &mut rib, deadline).await;
                with_status(status, |s| s.prefixes_sent = 0);
                return Ok(());
            }
            message = reader.next() => {
                let message = match message {
                    Err(SessionError::Decode(e)) => {
                        writer.notify(e.code, e.subcode).await;
                        return Err(e.into());
                    }
                    other => other?,
                };
                if !hold.is_zero() {
                    hold_deadline = tokio::time::Instant::now() + hold;
                }
                match message {
                    Message::Keepalive | Message::Update(_) => {}
                    Message::RouteRefresh { afi, safi } => {
                        tracing::debug!(peer = %config.name, afi, safi, "route refresh");
                        let family: Vec<(IpNetwork, &RouteAttrs)> = rib
                            .advertised
                            .iter()
                            .filter(|(p, _)| (afi == AFI_IPV4 && p.is_ipv4()) || (afi == AFI_IPV6 && p.is_ipv6()))
                            .map(|(p, a)| (*p, a))
                            .collect();
                        if safi == SAFI_UNICAST && !family.is_empty() {
                            for m in rib.announce(&family) {
                                writer.send(&m).await?;
                            }
                        }
                    }
                    Message::Notification(n) => return Err(SessionError::Notification(n)),
                    Message::Open(_) => {
                        writer.notify(code::FSM, 0).await;
                        return Err(SessionError::Protocol("OPEN in Established".into()));
                    }
                }
            }
            _ = sleep_until(hold_deadline) => {
                writer.notify(code::HOLD_TIMER_EXPIRED, 0).await;
                return Err(SessionError::HoldExpired);
            }
            _ = sleep_until(next_keepalive) => {
                writer.send(&Message::Keepalive).await?;
                next_keepalive = keepalive.map_or(far, |k| tokio::time::Instant::now() + k);
            }
            changed = prefixes.changed(), if prefixes_open => {
                if changed.is_err() {
                    prefixes_open = false;
                    continue;
                }
                let wanted = prefixes.borrow_and_update().clone();
                for m in rib.sync(&wanted) {
                    writer.send(&m).await?;
                }
                with_status(status, |s| s.prefixes_sent = rib.advertised.len());
            }
        }
    }
}

/// Withdraws everything, sends Cease (administrative shutdown) and waits until the peer closes
/// the connection — it has then processed the withdrawals, which precede the NOTIFICATION on
/// the stream — or until `deadline`.
async fn graceful_close(
    reader: &mut Reader,
    writer: &mut Writer,
    rib: &mut Rib,
    deadline: tokio::time::Instant,
) {
    let withdraw = rib.sync(&Routes::new());
    let _ = tokio::time::timeout_at(deadline, async {
        for m in &withdraw {
            writer.send(m).await?;
        }
        writer
            .send(&Message::Notification(Notification {
                code: code::CEASE,
                subcode: code::CEASE_ADMIN_SHUTDOWN,
                data: Vec::new(),
            }))
            .await?;
        writer.half.shutdown().await?;
        // Drain until the peer closes (or sends garbage: either way we are done).
        while reader.next().await.is_ok() {}
        Ok::<(), SessionError>(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_time_and_keepalive() {
        assert_eq!(negotiate_hold_time(90, 9), 9);
        assert_eq!(negotiate_hold_time(0, 90), 0);
        assert_eq!(keepalive_interval(Duration::ZERO, None), None);
        assert_eq!(
            keepalive_interval(Duration::from_secs(9), None),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            keepalive_interval(Duration::from_secs(90), Some(Duration::from_secs(3))),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            keepalive_interval(Duration::from_secs(9), Some(Duration::from_secs(30))),
            Some(Duration::from_secs(3))
        );
    }

    fn rib() -> Rib {
        Rib {
            ibgp: false,
            my_asn: 64500,
            local_pref: 100,
            communities: Vec::new(),
            next_hop_v4: Some(Ipv4Addr::new(198, 51, 100, 11)),
            next_hop_v6: None,
            v4: true,
            v6: true,
            advertised: Routes::new(),
        }
    }

    fn routes(list: &[IpNetwork]) -> Routes {
        list.iter().map(|p| (*p, RouteAttrs::default())).collect()
    }

    #[test]
    fn sync_sends_only_differences_and_skips_families_without_next_hop() {
        let mut rib = rib();
        let a: IpNetwork = "203.0.113.1/32".parse().unwrap();
        let b: IpNetwork = "203.0.113.2/32".parse().unwrap();
        let v6: IpNetwork = "2001:db8::1/128".parse().unwrap();
        let msgs = rib.sync(&routes(&[a, b, v6]));
        assert_eq!(msgs.len(), 1);
        let Message::Update(u) = &msgs[0] else {
            panic!()
        };
        assert_eq!(u.nlri.len(), 2);
        assert!(u
            .attributes
            .contains(&PathAttribute::NextHop(Ipv4Addr::new(198, 51, 100, 11))));
        assert_eq!(rib.advertised, routes(&[a, b]));
        let msgs = rib.sync(&routes(&[b]));
        assert_eq!(
            msgs,
            vec![Message::Update(Update {
                withdrawn: vec!["203.0.113.1/32".parse().unwrap()],
                ..Update::default()
            })]
        );
        assert!(rib.sync(&routes(&[b])).is_empty());
    }

    #[test]
    fn attributes_per_route_group_and_changes_reannounce() {
        let mut rib = rib();
        rib.ibgp = true;
        rib.communities = vec![7];
        let a: IpNetwork = "203.0.113.1/32".parse().unwrap();
        let b: IpNetwork = "203.0.113.2/32".parse().unwrap();
        let pref = RouteAttrs {
            local_pref: Some(200),
            communities: vec![9, 7],
        };
        let mut wanted = routes(&[a]);
        wanted.insert(b, pref.clone());
        let msgs = rib.sync(&wanted);
        assert_eq!(msgs.len(), 2, "one UPDATE per attribute set");
        let attrs_of = |m: &Message| match m {
            Message::Update(u) => (u.nlri.clone(), u.attributes.clone()),
            other => panic!("{other:?}"),
        };
        let (nlri, attrs) = attrs_of(&msgs[0]);
        assert_eq!(nlri, vec![a.to_string().parse().unwrap()]);
        assert!(attrs.contains(&PathAttribute::LocalPref(100)));
        assert!(attrs.contains(&PathAttribute::Communities(vec![7])));
        assert!(attrs.contains(&PathAttribute::AsPath(Vec::new())));
        let (_, attrs) = attrs_of(&msgs[1]);
        assert!(attrs.contains(&PathAttribute::LocalPref(200)));
        assert!(attrs.contains(&PathAttribute::Communities(vec![7, 9])));
        // Changing a's attributes re-announces a only; nothing is withdrawn.
        wanted.insert(a, pref);
        let msgs = rib.sync(&wanted);
        assert_eq!(msgs.len(), 1);
        let Message::Update(u) = &msgs[0] else {
            panic!()
        };
        assert!(u.withdrawn.is_empty());
        assert_eq!(u.nlri, vec![a.to_string().parse().unwrap()]);
    }

    #[test]
    fn large_sets_fit_in_messages() {
        let mut rib = rib();
        rib.next_hop_v6 = Some("2001:db8::11".parse().unwrap());
        let mut wanted = Routes::new();
        for i in 0..3000u32 {
            let attrs = RouteAttrs {
                local_pref: None,
                communities: vec![i % 5],
            };
            wanted.insert(
                IpNetwork::V4(
                    ipnetwork::Ipv4Network::new(Ipv4Addr::from(0xcb00_0000 + i), 32).unwrap(),
                ),
                attrs.clone(),
            );
            wanted.insert(
                IpNetwork::V6(
                    ipnetwork::Ipv6Network::new(
                        Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i)),
                        128,
                    )
                    .unwrap(),
                ),
                attrs,
            );
        }
        let codec = Codec::default();
        for m in rib.sync(&wanted) {
            codec.encode(&m).expect("fits in 4096 bytes");
        }
        for m in rib.sync(&Routes::new()) {
            codec.encode(&m).expect("fits in 4096 bytes");
        }
    }
}
