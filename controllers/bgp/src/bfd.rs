//! Bidirectional Forwarding Detection, single hop, asynchronous mode (RFC 5880, RFC 5881).
//!
//! Three layers, from pure to the world:
//!
//! ```text
//!  Packet::decode/encode      24-byte control packets, every check of RFC 5880 §6.8.6 that
//!                             does not need a session; hostile input is an error, never a panic
//!  Session                    the state machine (Down/Init/Up/AdminDown), timers negotiated
//!                             from both sides, poll/final, detection time; time is passed in
//!  Hub / run_session          UDP sockets: one receive socket per family on port 3784 (TTL of
//!                             received packets must be 255), one send socket per session from
//!                             a source port in 49152..=65535 with TTL 255; packets are handed
//!                             to the session of their source address
//! ```
//!
//! Not implemented: authentication (packets with the A bit are discarded), demand mode, echo.
//! The BGP session of a peer with BFD watches the BFD state and closes at once when an Up
//! session goes Down (see `session.rs`).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

/// Destination port of single-hop control packets (RFC 5881 §4).
pub const BFD_PORT: u16 = 3784;
/// Length of a control packet without authentication.
pub const PACKET_LEN: usize = 24;
/// Slowest transmit rate while the session is not Up (RFC 5880 §6.8.3).
pub const IDLE_TX: Duration = Duration::from_secs(1);

/// Session states (RFC 5880 §4.1, the values on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BfdState {
    AdminDown = 0,
    Down = 1,
    Init = 2,
    Up = 3,
}

impl BfdState {
    fn from_bits(b: u8) -> BfdState {
        match b & 3 {
            0 => BfdState::AdminDown,
            1 => BfdState::Down,
            2 => BfdState::Init,
            _ => BfdState::Up,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BfdState::AdminDown => "AdminDown",
            BfdState::Down => "Down",
            BfdState::Init => "Init",
            BfdState::Up => "Up",
        }
    }
}

/// Diagnostic codes (RFC 5880 §4.1).
pub mod diag {
    pub const NONE: u8 = 0;
    pub const DETECTION_EXPIRED: u8 = 1;
    pub const NEIGHBOR_DOWN: u8 = 3;
    pub const ADMIN_DOWN: u8 = 7;
}

const FLAG_POLL: u8 = 0x20;
const FLAG_FINAL: u8 = 0x10;
const FLAG_CPI: u8 = 0x08;
const FLAG_AUTH: u8 = 0x04;
const FLAG_DEMAND: u8 = 0x02;
const FLAG_MULTIPOINT: u8 = 0x01;

/// One control packet. Intervals are in microseconds, as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub diag: u8,
    pub state: BfdState,
    pub poll: bool,
    pub final_: bool,
    pub control_plane_independent: bool,
    pub demand: bool,
    pub detect_mult: u8,
    pub my_discr: u32,
    pub your_discr: u32,
    pub desired_min_tx_us: u32,
    pub required_min_rx_us: u32,
    pub required_min_echo_rx_us: u32,
}

/// Why a received packet was discarded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("packet of {0} bytes is shorter than 24")]
    Short(usize),
    #[error("version {0}, not 1")]
    Version(u8),
    #[error("length field {field} does not fit the {got} bytes received")]
    Length { field: u8, got: usize },
    #[error("authentication is not configured")]
    Authentication,
    #[error("multipoint bit set")]
    Multipoint,
    #[error("detect multiplier 0")]
    DetectMult,
    #[error("my discriminator 0")]
    MyDiscriminator,
    #[error("your discriminator 0 in state {0:?}")]
    YourDiscriminator(BfdState),
}

impl Packet {
    pub fn encode(&self) -> [u8; PACKET_LEN] {
        let mut b = [0u8; PACKET_LEN];
        b[0] = (1 << 5) | (self.diag & 0x1f);
        let mut flags = (self.state as u8) << 6;
        if self.poll {
            flags |= FLAG_POLL;
        }
        if self.final_ {
            flags |= FLAG_FINAL;
        }
        if self.control_plane_independent {
            flags |= FLAG_CPI;
        }
        if self.demand {
            flags |= FLAG_DEMAND;
        }
        b[1] = flags;
        b[2] = self.detect_mult;
        b[3] = PACKET_LEN as u8;
        b[4..8].copy_from_slice(&self.my_discr.to_be_bytes());
        b[8..12].copy_from_slice(&self.your_discr.to_be_bytes());
        b[12..16].copy_from_slice(&self.desired_min_tx_us.to_be_bytes());
        b[16..20].copy_from_slice(&self.required_min_rx_us.to_be_bytes());
        b[20..24].copy_from_slice(&self.required_min_echo_rx_us.to_be_bytes());
        b
    }

    /// Parses and applies the checks of RFC 5880 §6.8.6 that need no session.
    pub fn decode(buf: &[u8]) -> Result<Packet, PacketError> {
        if buf.len() < PACKET_LEN {
            return Err(PacketError::Short(buf.len()));
        }
        let version = buf[0] >> 5;
        if version != 1 {
            return Err(PacketError::Version(version));
        }
        let length = buf[3];
        let flags = buf[1];
        if usize::from(length) < PACKET_LEN || usize::from(length) > buf.len() {
            return Err(PacketError::Length {
                field: length,
                got: buf.len(),
            });
        }
        if flags & FLAG_AUTH != 0 {
            return Err(PacketError::Authentication);
        }
        if flags & FLAG_MULTIPOINT != 0 {
            return Err(PacketError::Multipoint);
        }
        let word = |i: usize| u32::from_be_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let p = Packet {
            diag: buf[0] & 0x1f,
            state: BfdState::from_bits(flags >> 6),
            poll: flags & FLAG_POLL != 0,
            final_: flags & FLAG_FINAL != 0,
            control_plane_independent: flags & FLAG_CPI != 0,
            demand: flags & FLAG_DEMAND != 0,
            detect_mult: buf[2],
            my_discr: word(4),
            your_discr: word(8),
            desired_min_tx_us: word(12),
            required_min_rx_us: word(16),
            required_min_echo_rx_us: word(20),
        };
        if p.detect_mult == 0 {
            return Err(PacketError::DetectMult);
        }
        if p.my_discr == 0 {
            return Err(PacketError::MyDiscriminator);
        }
        if p.your_discr == 0 && !matches!(p.state, BfdState::Down | BfdState::AdminDown) {
            return Err(PacketError::YourDiscriminator(p.state));
        }
        Ok(p)
    }
}

/// What the local side asks for (MetalLB's BFDProfile: `transmitInterval`, `receiveInterval`,
/// `detectMultiplier`, `passiveMode`, `minimumTtl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BfdConfig {
    pub desired_min_tx: Duration,
    pub required_min_rx: Duration,
    pub detect_mult: u8,
    /// Send nothing until the peer has been heard from.
    pub passive: bool,
    /// Smallest TTL / hop limit accepted on received packets (255 for single hop).
    pub minimum_ttl: u8,
}

impl Default for BfdConfig {
    /// MetalLB's defaults: 300 ms both ways, multiplier 3.
    fn default() -> BfdConfig {
        BfdConfig {
            desired_min_tx: Duration::from_millis(300),
            required_min_rx: Duration::from_millis(300),
            detect_mult: 3,
            passive: false,
            minimum_ttl: 255,
        }
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// The state machine of one session (RFC 5880 §6.8). Pure: the caller passes the time in, and
/// sends the packets it returns.
#[derive(Clone, Debug)]
pub struct Session {
    config: BfdConfig,
    local_discr: u32,
    remote_discr: u32,
    state: BfdState,
    remote_state: BfdState,
    local_diag: u8,
    remote_min_rx: Duration,
    remote_desired_tx: Duration,
    remote_detect_mult: u8,
    /// Desired transmit interval currently advertised.
    advertised_tx: Duration,
    poll_active: bool,
    last_rx: Option<Instant>,
    next_tx: Instant,
    rng: u64,
}

impl Session {
    /// A session in state Down. `local_discr` must be non-zero and unique on this system.
    pub fn new(config: BfdConfig, local_discr: u32, seed: u64, now: Instant) -> Session {
        let mut config = config;
        config.detect_mult = config.detect_mult.max(1);
        config.desired_min_tx = config.desired_min_tx.max(Duration::from_millis(1));
        config.required_min_rx = config.required_min_rx.max(Duration::from_millis(1));
        Session {
            config,
            local_discr: local_discr.max(1),
            remote_discr: 0,
            state: BfdState::Down,
            remote_state: BfdState::Down,
            local_diag: diag::NONE,
            // RFC 5880 §6.8.1: initial bfd.RemoteMinRxInterval is 1 µs.
            remote_min_rx: Duration::from_micros(1),
            remote_desired_tx: Duration::ZERO,
            remote_detect_mult: 0,
            advertised_tx: config.desired_min_tx.max(IDLE_TX),
            poll_active: false,
            last_rx: None,
            next_tx: now,
            rng: seed | 1,
        }
    }

    pub fn state(&self) -> BfdState {
        self.state
    }

    pub fn local_diag(&self) -> u8 {
        self.local_diag
    }

    pub fn remote_state(&self) -> BfdState {
        self.remote_state
    }

    pub fn local_discr(&self) -> u32 {
        self.local_discr
    }

    pub fn remote_discr(&self) -> u32 {
        self.remote_discr
    }

    /// The negotiated transmit interval (before jitter).
    pub fn tx_interval(&self) -> Duration {
        self.advertised_tx.max(self.remote_min_rx)
    }

    /// How long without a packet before the session goes Down; None before the peer was heard.
    pub fn detection_time(&self) -> Option<Duration> {
        if self.remote_detect_mult == 0 {
            return None;
        }
        Some(
            self.config.required_min_rx.max(self.remote_desired_tx)
                * u32::from(self.remote_detect_mult),
        )
    }

    fn detection_deadline(&self) -> Option<Instant> {
        if !matches!(self.state, BfdState::Init | BfdState::Up) {
            return None;
        }
        Some(self.last_rx? + self.detection_time()?)
    }

    fn may_transmit(&self) -> bool {
        self.state != BfdState::AdminDown
            && self.remote_min_rx != Duration::ZERO
            && !(self.config.passive && self.remote_discr == 0)
    }

    /// When [`Session::poll`] has something to do next.
    pub fn next_deadline(&self) -> Instant {
        let far = self.next_tx + Duration::from_secs(3600);
        let tx = if self.may_transmit() {
            self.next_tx
        } else {
            far
        };
        self.detection_deadline().map_or(tx, |d| d.min(tx))
    }

    fn packet(&self, final_: bool) -> Packet {
        Packet {
            diag: self.local_diag,
            state: self.state,
            poll: self.poll_active && !final_,
            final_,
            control_plane_independent: false,
            demand: false,
            detect_mult: self.config.detect_mult,
            my_discr: self.local_discr,
            your_discr: self.remote_discr,
            desired_min_tx_us: micros(self.advertised_tx),
            required_min_rx_us: micros(self.config.required_min_rx),
            required_min_echo_rx_us: 0,
        }
    }

    fn jittered(&mut self, interval: Duration) -> Duration {
        // xorshift64: only spreads transmissions (RFC 5880 §6.8.7), no security role.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        // 75..=100 % of the interval; 75..=90 % with a detect multiplier of 1.
        let span: u64 = if self.config.detect_mult == 1 { 16 } else { 26 };
        let cut = 75 + (self.rng % span) as u32;
        interval * cut / 100
    }

    fn schedule_tx(&mut self, now: Instant) {
        let interval = self.tx_interval();
        self.next_tx = now + self.jittered(interval);
    }

    fn set_state(&mut self, state: BfdState, diag: u8) {
        if state == self.state {
            return;
        }
        self.state = state;
        self.local_diag = diag;
        let wanted = if state == BfdState::Up {
            self.config.desired_min_tx
        } else {
            self.config.desired_min_tx.max(IDLE_TX)
        };
        if wanted != self.advertised_tx {
            self.advertised_tx = wanted;
            // RFC 5880 §6.8.3: a change of timers starts a poll sequence.
            self.poll_active = true;
        }
    }

    /// Handles a received packet (already through [`Packet::decode`]). Returns a packet to send
    /// at once: the Final answer to a Poll, or the news of a state change.
    pub fn receive(&mut self, p: &Packet, now: Instant) -> Option<Packet> {
        if p.your_discr != 0 && p.your_discr != self.local_discr {
            return None;
        }
        if self.state == BfdState::AdminDown {
            return None;
        }
        self.remote_discr = p.my_discr;
        self.remote_state = p.state;
        self.remote_desired_tx = Duration::from_micros(u64::from(p.desired_min_tx_us));
        self.remote_min_rx = Duration::from_micros(u64::from(p.required_min_rx_us));
        self.remote_detect_mult = p.detect_mult;
        self.last_rx = Some(now);
        if p.final_ {
            self.poll_active = false;
        }
        let before = self.state;
        if p.state == BfdState::AdminDown {
            if self.state != BfdState::Down {
                self.set_state(BfdState::Down, diag::NEIGHBOR_DOWN);
            }
        } else {
            match (self.state, p.state) {
                (BfdState::Down, BfdState::Down) => self.set_state(BfdState::Init, diag::NONE),
                (BfdState::Down, BfdState::Init) => self.set_state(BfdState::Up, diag::NONE),
                (BfdState::Init, BfdState::Init | BfdState::Up) => {
                    self.set_state(BfdState::Up, diag::NONE)
                }
                (BfdState::Up, BfdState::Down) => {
                    self.set_state(BfdState::Down, diag::NEIGHBOR_DOWN)
                }
                _ => {}
            }
        }
        // Faster timers (Up, or the peer asking for more) take effect now, not after the
        // slow interval already scheduled.
        let interval = self.tx_interval();
        if self.next_tx > now + interval {
            self.next_tx = now + self.jittered(interval);
        }
        if p.poll {
            // The Final answer goes out now, outside the periodic schedule (§6.8.7).
            return Some(self.packet(true));
        }
        if self.state != before && self.may_transmit() {
            let out = self.packet(false);
            self.schedule_tx(now);
            return Some(out);
        }
        None
    }

    /// Runs the timers: detection time expiry, then the periodic transmission when due.
    pub fn poll(&mut self, now: Instant) -> Option<Packet> {
        if let Some(deadline) = self.detection_deadline() {
            if now >= deadline {
                self.set_state(BfdState::Down, diag::DETECTION_EXPIRED);
                // §6.8.1: the remote discriminator is forgotten when detection time expires.
                self.remote_discr = 0;
                self.remote_detect_mult = 0;
                self.remote_desired_tx = Duration::ZERO;
                self.remote_min_rx = Duration::from_micros(1);
                self.poll_active = false;
                if self.may_transmit() {
                    let out = self.packet(false);
                    self.schedule_tx(now);
                    return Some(out);
                }
                return None;
            }
        }
        if self.may_transmit() && now >= self.next_tx {
            let out = self.packet(false);
            self.schedule_tx(now);
            return Some(out);
        }
        None
    }

    /// Goes AdminDown (diag 7) and returns the packet that tells the peer.
    pub fn admin_down(&mut self) -> Packet {
        self.set_state(BfdState::AdminDown, diag::ADMIN_DOWN);
        self.poll_active = false;
        self.packet(false)
    }
}

/// What a running session reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BfdStatus {
    pub state: BfdState,
    /// Times the session went from Up to another state.
    pub flaps: u64,
    /// Diagnostic of the last state change.
    pub diag: u8,
    /// Why the session cannot run (its sockets could not be set up; retried every 5 s).
    pub error: Option<String>,
}

type Inbox = mpsc::Sender<(Packet, Instant)>;
type Sessions = Mutex<HashMap<IpAddr, Inbox>>;

/// The receive side shared by every session of a speaker: one socket per address family on
/// port 3784, opened by the first session of that family, and a table of sessions by peer
/// address. Sockets are opened by tasks on the hub's runtime, so in the network namespace of
/// its worker threads.
pub struct Hub {
    runtime: tokio::runtime::Handle,
    inner: Arc<HubInner>,
}

struct HubInner {
    sessions: Sessions,
    receivers: Mutex<[Option<JoinHandle<()>>; 2]>,
    /// Packets dropped by the receive tasks (wrong TTL, malformed, no session).
    dropped: std::sync::atomic::AtomicU64,
}

/// A running session; dropping it sends AdminDown (best effort) and stops it.
pub struct BfdHandle {
    status: watch::Receiver<BfdStatus>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<()>,
    peer: IpAddr,
    hub: Weak<HubInner>,
}

impl BfdHandle {
    pub fn status(&self) -> watch::Receiver<BfdStatus> {
        self.status.clone()
    }

    /// Handle to stop the session's task without telling the peer.
    pub fn abort_handle(&self) -> tokio::task::AbortHandle {
        self.task.abort_handle()
    }

    /// Stops without telling the peer (what a crash looks like).
    pub fn abort(mut self) {
        self.stop = None;
        self.task.abort();
    }
}

impl Drop for BfdHandle {
    fn drop(&mut self) {
        match self.stop.take() {
            Some(stop) => {
                // The task sends AdminDown and ends by itself.
                let _ = stop.send(());
            }
            None => self.task.abort(),
        }
        if let Some(hub) = self.hub.upgrade() {
            hub.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.peer);
        }
    }
}

/// Errors starting a session.
#[derive(Debug, thiserror::Error)]
pub enum BfdError {
    #[error("a BFD session to {0} exists already")]
    Duplicate(IpAddr),
    #[error("BFD socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("BFD socket option: {0}")]
    Sockopt(#[from] nix::Error),
}

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

impl Hub {
    /// A hub on the current tokio runtime (panics outside one).
    pub fn new() -> Hub {
        Hub {
            runtime: tokio::runtime::Handle::current(),
            inner: Arc::new(HubInner {
                sessions: Mutex::new(HashMap::new()),
                receivers: Mutex::new([None, None]),
                dropped: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// Packets the receive sockets discarded (wrong TTL, malformed, unknown sender).
    pub fn dropped(&self) -> u64 {
        self.inner
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts a session with `peer` (packets sent from `local`, when given). The sockets are
    /// opened by the session's task; failures show in [`BfdStatus::error`].
    pub fn start(
        &self,
        peer: IpAddr,
        local: Option<IpAddr>,
        config: BfdConfig,
    ) -> Result<BfdHandle, BfdError> {
        let (inbox, rx) = mpsc::channel(64);
        {
            let mut sessions = self
                .inner
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if sessions.contains_key(&peer) {
                return Err(BfdError::Duplicate(peer));
            }
            sessions.insert(peer, inbox);
        }
        let seed = random_u64();
        let discr = (seed >> 32) as u32 | 1;
        let (status_tx, status) = watch::channel(BfdStatus {
            state: BfdState::Down,
            flaps: 0,
            diag: diag::NONE,
            error: None,
        });
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let session = Session::new(config, discr, seed, Instant::now());
        let hub = self.inner.clone();
        let task = self.runtime.spawn(async move {
            let mut stop_rx = stop_rx;
            let socket = loop {
                let opened = ensure_receiver(&hub, peer.is_ipv6(), config.minimum_ttl)
                    .and_then(|()| send_socket(peer, local));
                match opened {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "BFD session cannot start");
                        status_tx.send_modify(|s| s.error = Some(e.to_string()));
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = &mut stop_rx => return,
                }
            };
            status_tx.send_modify(|s| s.error = None);
            drop(hub);
            run_session(session, socket, rx, status_tx, stop_rx).await;
        });
        Ok(BfdHandle {
            status,
            stop: Some(stop),
            task,
            peer,
            hub: Arc::downgrade(&self.inner),
        })
    }
}

/// Opens the family's receive socket unless it is open (inside a task of the hub's runtime).
fn ensure_receiver(hub: &Arc<HubInner>, v6: bool, min_ttl: u8) -> Result<(), BfdError> {
    let mut receivers = hub.receivers.lock().unwrap_or_else(|p| p.into_inner());
    let slot = &mut receivers[usize::from(v6)];
    if slot.as_ref().is_some_and(|t| !t.is_finished()) {
        return Ok(());
    }
    let bind: SocketAddr = if v6 {
        (Ipv6Addr::UNSPECIFIED, BFD_PORT).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, BFD_PORT).into()
    };
    let std_socket = if v6 {
        // V6ONLY must be set before bind; std binds v6 sockets dual-stack by default, so bind
        // through a socket created with the option (nix) instead.
        let fd = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet6,
            nix::sys::socket::SockType::Datagram,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
        setsockopt(&fd, sockopt::Ipv6RecvHopLimit, &true)?;
        nix::sys::socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(bind))?;
        std::net::UdpSocket::from(fd)
    } else {
        let s = std::net::UdpSocket::bind(bind)?;
        setsockopt(&s, sockopt::Ipv4RecvTtl, &true)?;
        s
    };
    std_socket.set_nonblocking(true)?;
    let socket = UdpSocket::from_std(std_socket)?;
    *slot = Some(tokio::spawn(receive_loop(
        socket,
        Arc::downgrade(hub),
        min_ttl,
    )));
    Ok(())
}

impl Default for Hub {
    fn default() -> Hub {
        Hub::new()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        for t in self
            .inner
            .receivers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter_mut()
            .flatten()
        {
            t.abort();
        }
    }
}

/// A socket connected to the peer's port 3784 from a source port in 49152..=65535, TTL 255.
fn send_socket(peer: IpAddr, local: Option<IpAddr>) -> Result<UdpSocket, BfdError> {
    let ip = local.unwrap_or(match peer {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    });
    let start = (random_u64() % 16384) as u16;
    let mut last = None;
    for i in 0..64u16 {
        let port = 49152 + (start.wrapping_add(i.wrapping_mul(257)) % 16384);
        match std::net::UdpSocket::bind(SocketAddr::new(ip, port)) {
            Ok(s) => {
                s.set_nonblocking(true)?;
                match peer {
                    IpAddr::V4(_) => s.set_ttl(255)?,
                    IpAddr::V6(_) => setsockopt(&s, sockopt::Ipv6Ttl, &255)?,
                }
                s.connect(SocketAddr::new(peer, BFD_PORT))?;
                return Ok(UdpSocket::from_std(s)?);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last
        .unwrap_or_else(|| std::io::Error::other("no free source port"))
        .into())
}

/// Receives one datagram with its TTL / hop limit.
fn recv_with_ttl(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, IpAddr, Option<i32>)> {
    let mut cmsg = nix::cmsg_space!(i32, i32);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(cmsg.as_mut_slice()),
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(std::io::Error::from)?;
    let mut ttl = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            match c {
                ControlMessageOwned::Ipv4Ttl(t) => ttl = Some(t),
                ControlMessageOwned::Ipv6HopLimit(t) => ttl = Some(t),
                _ => {}
            }
        }
    }
    let from = msg.address.as_ref().and_then(|a| {
        a.as_sockaddr_in()
            .map(|s| IpAddr::V4(s.ip()))
            .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
    });
    let n = msg.bytes;
    match from {
        Some(from) => Ok((n, from, ttl)),
        None => Err(std::io::Error::other("datagram without a source address")),
    }
}

/// Unmaps `::ffff:a.b.c.d` so that a v4 peer's packets find its session either way.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

async fn receive_loop(socket: UdpSocket, hub: Weak<HubInner>, min_ttl: u8) {
    let mut buf = [0u8; 512];
    loop {
        let got = socket
            .async_io(Interest::READABLE, || recv_with_ttl(&socket, &mut buf))
            .await;
        let Some(hub) = hub.upgrade() else { return };
        let (n, from, ttl) = match got {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "BFD receive");
                drop(hub);
                // Not a busy loop on a persistent error.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let drop_one = || {
            hub.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        // RFC 5881 §5: single-hop packets arrive with TTL / hop limit 255 (GTSM).
        if ttl.is_none_or(|t| t < i32::from(min_ttl)) {
            drop_one();
            continue;
        }
        let packet = match Packet::decode(&buf[..n]) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(%from, error = %e, "BFD packet discarded");
                drop_one();
                continue;
            }
        };
        let inbox = hub
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&canonical(from))
            .cloned();
        match inbox {
            Some(inbox) => {
                if inbox.try_send((packet, Instant::now())).is_err() {
                    drop_one();
                }
            }
            None => drop_one(),
        }
    }
}

async fn run_session(
    mut session: Session,
    socket: UdpSocket,
    mut inbox: mpsc::Receiver<(Packet, Instant)>,
    status: watch::Sender<BfdStatus>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let send = |p: Packet| {
        // Errors (link down, no route) are what BFD is there to detect: not ours to report.
        let _ = socket.try_send(&p.encode());
    };
    let publish = |session: &Session| {
        status.send_if_modified(|s| {
            if s.state == session.state() {
                return false;
            }
            if s.state == BfdState::Up {
                s.flaps += 1;
            }
            tracing::info!(
                from = s.state.as_str(),
                to = session.state().as_str(),
                diag = session.local_diag(),
                "BFD session state"
            );
            s.state = session.state();
            s.diag = session.local_diag();
            true
        });
    };
    loop {
        tokio::select! {
            _ = &mut stop => {
                let p = session.admin_down();
                send(p);
                publish(&session);
                return;
            }
            received = inbox.recv() => {
                let Some((packet, at)) = received else { return };
                if let Some(p) = session.receive(&packet, at) {
                    send(p);
                }
                publish(&session);
            }
            _ = sleep_until(session.next_deadline()) => {
                if let Some(p) = session.poll(Instant::now()) {
                    send(p);
                }
                publish(&session);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ms: u64) -> BfdConfig {
        BfdConfig {
            desired_min_tx: Duration::from_millis(ms),
            required_min_rx: Duration::from_millis(ms),
            detect_mult: 3,
            passive: false,
            minimum_ttl: 255,
        }
    }

    fn sample() -> Packet {
        Packet {
            diag: diag::NEIGHBOR_DOWN,
            state: BfdState::Up,
            poll: true,
            final_: false,
            control_plane_independent: true,
            demand: false,
            detect_mult: 3,
            my_discr: 0xdead_beef,
            your_discr: 7,
            desired_min_tx_us: 100_000,
            required_min_rx_us: 200_000,
            required_min_echo_rx_us: 0,
        }
    }

    #[test]
    fn packet_round_trip_and_wire_layout() {
        let p = sample();
        let b = p.encode();
        assert_eq!(b[0], 0x23, "version 1, diag 3");
        assert_eq!(b[1], 0xc0 | 0x20 | 0x08, "state Up, P, C");
        assert_eq!(b[3], 24);
        assert_eq!(&b[4..8], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(Packet::decode(&b), Ok(p));
        // Trailing bytes beyond the length field are ignored.
        let mut long = b.to_vec();
        long.extend_from_slice(&[1, 2, 3]);
        assert_eq!(Packet::decode(&long), Ok(p));
    }

    #[test]
    fn decode_rejects_what_rfc5880_discards() {
        let good = sample().encode();
        let bad = |f: &dyn Fn(&mut [u8; 24])| {
            let mut b = good;
            f(&mut b);
            Packet::decode(&b)
        };
        assert_eq!(Packet::decode(&good[..23]), Err(PacketError::Short(23)));
        assert_eq!(bad(&|b| b[0] = 0x43), Err(PacketError::Version(2)));
        assert!(matches!(
            bad(&|b| b[3] = 23),
            Err(PacketError::Length { .. })
        ));
        assert!(matches!(
            bad(&|b| b[3] = 25),
            Err(PacketError::Length { .. })
        ));
        assert_eq!(
            bad(&|b| b[1] |= FLAG_AUTH),
            Err(PacketError::Authentication)
        );
        assert_eq!(
            bad(&|b| b[1] |= FLAG_MULTIPOINT),
            Err(PacketError::Multipoint)
        );
        assert_eq!(bad(&|b| b[2] = 0), Err(PacketError::DetectMult));
        assert_eq!(bad(&|b| b[4..8].fill(0)), Err(PacketError::MyDiscriminator));
        assert_eq!(
            bad(&|b| b[8..12].fill(0)),
            Err(PacketError::YourDiscriminator(BfdState::Up))
        );
        // Your discriminator 0 is fine in Down.
        assert!(bad(&|b| {
            b[8..12].fill(0);
            b[1] = (b[1] & 0x3f) | 0x40;
        })
        .is_ok());
    }

    #[test]
    fn hostile_input_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let good = sample().encode();
        let t0 = Instant::now();
        let mut s = Session::new(cfg(100), 7, 1, t0);
        for round in 0..20_000u32 {
            let len = (next() % 40) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && len >= 24 {
                // Mostly valid packets with one mutated byte reach deeper checks.
                buf[..24].copy_from_slice(&good);
                let i = (next() % 24) as usize;
                buf[i] = next() as u8;
            }
            if let Ok(p) = Packet::decode(&buf) {
                let now = t0 + Duration::from_millis(u64::from(round));
                let _ = s.receive(&p, now);
                let _ = s.poll(now);
                let _ = s.next_deadline();
            }
        }
    }

    /// Delivers packets between two sessions for `steps` × 10 ms.
    fn run_pair(a: &mut Session, b: &mut Session, t: &mut Instant, steps: u32, cut: bool) {
        for _ in 0..steps {
            *t += Duration::from_millis(10);
            let mut to_b: Vec<Packet> = a.poll(*t).into_iter().collect();
            let mut to_a: Vec<Packet> = b.poll(*t).into_iter().collect();
            // Replies can cascade (state change news, Final answers): bounded rounds.
            for _ in 0..4 {
                if cut {
                    break;
                }
                let mut next_b = Vec::new();
                let mut next_a = Vec::new();
                for p in to_b.drain(..) {
                    next_a.extend(b.receive(&p, *t));
                }
                for p in to_a.drain(..) {
                    next_b.extend(a.receive(&p, *t));
                }
                to_b = next_b;
                to_a = next_a;
            }
        }
    }

    #[test]
    fn three_way_handshake_fast_timers_and_detection() {
        let mut t = Instant::now();
        let mut a = Session::new(cfg(100), 11, 3, t);
        let mut b = Session::new(cfg(100), 22, 5, t);
        assert_eq!(a.tx_interval(), IDLE_TX, "slow while not Up");
        run_pair(&mut a, &mut b, &mut t, 300, false);
        assert_eq!((a.state(), b.state()), (BfdState::Up, BfdState::Up));
        assert_eq!((a.remote_discr(), b.remote_discr()), (22, 11));
        // Up: both advertise 100 ms; the poll sequences have completed.
        assert_eq!(a.tx_interval(), Duration::from_millis(100));
        assert_eq!(a.detection_time(), Some(Duration::from_millis(300)));
        assert!(!a.poll_active && !b.poll_active);
        // The link is cut: after the detection time (300 ms) a goes Down with diag 1.
        let cut_at = t;
        let mut down_at = None;
        for _ in 0..100 {
            run_pair(&mut a, &mut b, &mut t, 1, true);
            if a.state() == BfdState::Down {
                down_at = Some(t);
                break;
            }
        }
        let down_at = down_at.expect("detection time expired");
        let took = down_at - cut_at;
        assert!(
            took <= Duration::from_millis(310) && took >= Duration::from_millis(200),
            "{took:?}"
        );
        assert_eq!(a.local_diag(), diag::DETECTION_EXPIRED);
        assert_eq!(a.remote_discr(), 0);
        assert_eq!(a.tx_interval(), IDLE_TX);
        // Back together: Up again.
        run_pair(&mut a, &mut b, &mut t, 400, false);
        assert_eq!((a.state(), b.state()), (BfdState::Up, BfdState::Up));
    }

    #[test]
    fn going_up_pulls_the_next_packet_in() {
        let t = Instant::now();
        let mut a = Session::new(cfg(100), 1, 3, t);
        assert!(a.poll(t).is_some(), "first packet at once");
        assert!(a.next_deadline() >= t + Duration::from_millis(750));
        let mut p = sample();
        p.your_discr = 1;
        p.state = BfdState::Init;
        p.required_min_rx_us = 100_000;
        let reply = a.receive(&p, t).expect("final");
        assert!(reply.final_);
        assert_eq!(a.state(), BfdState::Up);
        assert!(a.next_deadline() <= t + Duration::from_millis(100));
    }

    #[test]
    fn admin_down_and_neighbor_down() {
        let mut t = Instant::now();
        let mut a = Session::new(cfg(100), 1, 3, t);
        let mut b = Session::new(cfg(100), 2, 5, t);
        run_pair(&mut a, &mut b, &mut t, 300, false);
        assert_eq!(a.state(), BfdState::Up);
        let p = b.admin_down();
        assert_eq!(p.state, BfdState::AdminDown);
        assert_eq!(p.diag, diag::ADMIN_DOWN);
        let _ = a.receive(&p, t);
        assert_eq!(a.state(), BfdState::Down);
        assert_eq!(a.local_diag(), diag::NEIGHBOR_DOWN);
        // An AdminDown session ignores everything and sends nothing.
        assert!(b.receive(&a.poll(t + IDLE_TX).unwrap_or(p), t).is_none());
        assert!(b.poll(t + Duration::from_secs(10)).is_none());
        assert_eq!(b.state(), BfdState::AdminDown);
    }

    #[test]
    fn packets_for_another_session_and_poll_final() {
        let t = Instant::now();
        let mut a = Session::new(cfg(100), 1, 3, t);
        let mut p = sample();
        p.your_discr = 99;
        assert!(a.receive(&p, t).is_none());
        assert_eq!(a.remote_discr(), 0, "not ours: ignored");
        p.your_discr = 1;
        p.state = BfdState::Down;
        let reply = a.receive(&p, t).expect("poll gets a final");
        assert!(reply.final_ && !reply.poll);
        assert_eq!(a.state(), BfdState::Init);
        assert_eq!(a.tx_interval(), IDLE_TX.max(Duration::from_millis(200)));
    }

    #[test]
    fn passive_waits_for_the_peer_and_zero_min_rx_silences() {
        let t = Instant::now();
        let mut c = cfg(100);
        c.passive = true;
        let mut a = Session::new(c, 1, 3, t);
        assert!(a.poll(t + Duration::from_secs(5)).is_none());
        let mut p = sample();
        p.your_discr = 0;
        p.state = BfdState::Down;
        p.poll = false;
        assert!(a.receive(&p, t).is_some(), "state change news once heard");
        p.required_min_rx_us = 0;
        let _ = a.receive(&p, t);
        assert!(a.poll(t + Duration::from_secs(5)).is_none());
    }

    #[test]
    fn jitter_stays_within_rfc_bounds() {
        let t = Instant::now();
        let mut a = Session::new(cfg(100), 1, 3, t);
        for _ in 0..1000 {
            let j = a.jittered(Duration::from_millis(100));
            assert!(j >= Duration::from_millis(75) && j <= Duration::from_millis(100));
        }
        let mut c = cfg(100);
        c.detect_mult = 1;
        let mut b = Session::new(c, 1, 3, t);
        for _ in 0..1000 {
            let j = b.jittered(Duration::from_millis(100));
            assert!(j >= Duration::from_millis(75) && j <= Duration::from_millis(90));
        }
    }
}
