//! The real [`Announcer`]: raw-socket ARP/NDP responders plus gratuitous announcements.
//!
//! ```text
//!   set_owned(owned) ──cmd──► control thread (born in the creator's netns)
//!                               1. empty interface list ─► route
//!                               2. publish table ─────────────────────┐ (losses: answered no more)
//!                               3. open/close responders              │
//!                               4. join/leave solicited-node groups   ▼
//!                               5. new (ip, iface) ─► GARP/NA    Arc<Shared>{table, counters}
//!                                  at 0/100/300 ms                    ▲ read per request
//!   responder threads, one per (interface, family):                   │
//!     AF_PACKET socket bound to ETH_P_ARP or ETH_P_IPV6 ─► parse ─► owns(ip, iface)? ─► reply
//! ```
//!
//! * Every socket, route lookup and interface lookup happens on threads spawned by
//!   [`Speaker::new`]'s caller, so the speaker lives in the network namespace it was created in,
//!   whichever thread later calls [`Announcer::set_owned`].
//! * Sockets are bound to one EtherType (not `ETH_P_ALL`), so the kernel hands an IPv4 responder
//!   only ARP frames and never copies our own outgoing traffic back. pnet always opens
//!   `SOCK_DGRAM` for such a channel, which would strip the Ethernet header and make replies
//!   go to our own MAC; we therefore open the `SOCK_RAW` socket ourselves (nix, no `unsafe`)
//!   and let pnet bind it to the EtherType (`Config::socket_fd`). Receiving goes through
//!   `recvfrom` on a duplicate of that socket, because the kernel also hands a socket bound to
//!   `eth0` the frames of `eth0`'s upper devices (VLAN, macvlan) once their tag is stripped;
//!   only frames whose `sll_ifindex` is the responder's own interface are answered, so a reply
//!   always leaves on the interface the request came in on, with that interface's MAC.
//! * IPv6 responders see every IPv6 frame arriving on their interface (there is no
//!   ICMPv6-only packet socket); they exist only while the interface has an owned IPv6 address.
//!   Solicitations go to the solicited-node multicast group, which a real NIC filters out
//!   unless someone joined it: the control thread joins each group on a UDP socket (what the
//!   kernel does for its own addresses). No interface is made promiscuous.
//! * Gratuitous schedule (default [`DEFAULT_GARP_SCHEDULE`], 0/100/300 ms after gaining an IP on
//!   an interface, also after a responder comes back from an error): each round is a
//!   gratuitous ARP request *and* reply (hosts differ in which one they honour; Linux needs the
//!   reply's target MAC equal to the sender's to call it gratuitous), or one unsolicited
//!   Neighbor Advertisement with the override flag to `ff02::1`. Three rounds ride out a lost
//!   frame and a switch port still learning, and the whole burst is over in a third of a second.
//! * Periodic refresh ([`SpeakerConfig::refresh_interval`], default
//!   [`DEFAULT_REFRESH_INTERVAL`], zero = off): one more gratuitous round per answered
//!   (IP, interface) pair every interval after its burst. Switch FDB entries and client
//!   neighbour caches age out while nothing changes (a quiet VIP, a client that only receives);
//!   the refresh re-teaches them before they do.
//! * A lost IP is removed from the shared table before `set_owned` returns: no answer for it
//!   leaves this node afterwards. Pending gratuitous rounds for it are dropped.
//! * Responders poll with a read timeout ([`SpeakerConfig::read_timeout`]) so they stop
//!   promptly. Every [`SpeakerConfig::resync_interval`] (1 s) the control thread re-applies the
//!   desired set: a responder whose interface went down, lost its carrier, vanished or changed
//!   index or MAC is closed, and reopened with a fresh gratuitous burst once the interface is
//!   up and running again (a link flap re-announces, like a switch port reset needs).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr, UdpSocket};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pnet::datalink::{self, Channel, ChannelType, DataLinkSender, MacAddr, NetworkInterface};
use tracing::{debug, info, warn};

use crate::announcer::{Announcer, Owned, SpeakerStats};
use crate::error::SpeakerError;
use crate::packet::{self, Request};
use crate::route::{best_route, read_routes, Route};

/// Offsets after gaining an IP at which gratuitous rounds go out.
pub const DEFAULT_GARP_SCHEDULE: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(300),
];

/// Default [`SpeakerConfig::refresh_interval`]: well inside the common switch FDB ageing
/// (300 s) and Linux's neighbour garbage collection of stale entries (`gc_stale_time`, 60 s),
/// and rare enough (two frames per IP a minute) to be noise on any LAN.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;

/// Tunables of a [`Speaker`].
#[derive(Clone, Debug)]
pub struct SpeakerConfig {
    /// Offsets (from the moment an IP is gained on an interface) of the gratuitous rounds.
    pub garp_schedule: Vec<Duration>,
    /// Poll timeout of responder sockets: the longest a stopped responder lingers.
    pub read_timeout: Duration,
    /// How often the desired set is re-applied: interfaces that were missing or down are
    /// retried (and announced once up), responders that failed or whose interface changed are
    /// reopened, and route-derived interfaces are re-resolved.
    pub resync_interval: Duration,
    /// How long `set_owned` waits for the control thread.
    pub reply_timeout: Duration,
    /// Period of the gratuitous refresh: every answered (IP, interface) pair gets one more
    /// gratuitous round this long after its last one, so switch FDBs and client neighbour
    /// caches that age out while nothing changes learn the owner again. `Duration::ZERO`
    /// turns the refresh off.
    pub refresh_interval: Duration,
}

impl Default for SpeakerConfig {
    fn default() -> Self {
        Self {
            garp_schedule: DEFAULT_GARP_SCHEDULE.to_vec(),
            read_timeout: Duration::from_millis(100),
            resync_interval: Duration::from_secs(1),
            reply_timeout: Duration::from_secs(10),
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
        }
    }
}

/// Resolved announcements: IP ─► interfaces answered on.
type Table = BTreeMap<IpAddr, BTreeSet<String>>;

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    replies: AtomicU64,
    gratuitous: AtomicU64,
    refreshes: AtomicU64,
    send_errors: AtomicU64,
    owned: AtomicU64,
    responders: AtomicU64,
}

/// What responders read on every request.
#[derive(Default)]
struct Shared {
    table: RwLock<Table>,
    counters: Counters,
}

impl Shared {
    fn owns(&self, ip: IpAddr, iface: &str) -> bool {
        self.table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ip)
            .is_some_and(|ifaces| ifaces.contains(iface))
    }
}

enum Command {
    SetOwned(Owned, mpsc::Sender<Result<(), SpeakerError>>),
    Stop,
}

/// ARP/NDP responder for a set of owned IPs. See the module docs.
pub struct Speaker {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    control: Option<JoinHandle<()>>,
    reply_timeout: Duration,
}

impl Speaker {
    /// Starts a speaker with the default configuration in the calling thread's network namespace.
    pub fn new() -> Result<Self, SpeakerError> {
        Self::with_config(SpeakerConfig::default())
    }

    /// Starts a speaker in the calling thread's network namespace. Nothing is opened until the
    /// first `set_owned`.
    pub fn with_config(config: SpeakerConfig) -> Result<Self, SpeakerError> {
        let shared = Arc::new(Shared::default());
        let (commands, rx) = mpsc::channel();
        let reply_timeout = config.reply_timeout;
        let mut control = Control::new(config, shared.clone());
        let handle = std::thread::Builder::new()
            .name("palisade-speaker".into())
            .spawn(move || control.run(rx))
            .map_err(SpeakerError::Spawn)?;
        Ok(Self {
            commands,
            shared,
            control: Some(handle),
            reply_timeout,
        })
    }
}

impl Announcer for Speaker {
    fn set_owned(&self, owned: Owned) -> Result<(), SpeakerError> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(Command::SetOwned(owned, tx))
            .map_err(|_| SpeakerError::Stopped)?;
        match rx.recv_timeout(self.reply_timeout) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(SpeakerError::Timeout(self.reply_timeout)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(SpeakerError::Stopped),
        }
    }

    fn stats(&self) -> SpeakerStats {
        let c = &self.shared.counters;
        SpeakerStats {
            requests_received: c.requests.load(Ordering::Relaxed),
            replies_sent: c.replies.load(Ordering::Relaxed),
            gratuitous_sent: c.gratuitous.load(Ordering::Relaxed),
            refresh_rounds: c.refreshes.load(Ordering::Relaxed),
            send_errors: c.send_errors.load(Ordering::Relaxed),
            owned_ips: c.owned.load(Ordering::Relaxed),
            responders: c.responders.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Speaker {
    /// Stops answering and closes every socket; returns within about one read timeout.
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(handle) = self.control.take() {
            let _ = handle.join();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// One raw socket on one interface for one address family, and its reader thread.
struct Responder {
    iface: String,
    mac: MacAddr,
    index: u32,
    tx: Arc<Mutex<Box<dyn DataLinkSender>>>,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
    /// IPv6 only: solicited-node groups joined on `index`, and the socket holding them.
    groups: BTreeSet<Ipv6Addr>,
    membership: Option<UdpSocket>,
}

impl Responder {
    fn open(
        iface: &NetworkInterface,
        family: Family,
        shared: Arc<Shared>,
        read_timeout: Duration,
    ) -> Result<Self, SpeakerError> {
        let name = iface.name.as_str();
        let mac = usable_mac(iface)?;
        let socket_err = |source: std::io::Error| SpeakerError::Socket {
            interface: name.to_owned(),
            source,
        };
        // See the module docs: SOCK_RAW, bound by pnet to one EtherType.
        let fd = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Packet,
            nix::sys::socket::SockType::Raw,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| socket_err(e.into()))?;
        // Our own handle on the same socket for receiving: `recvfrom` tells the interface a
        // frame arrived on, which pnet's receiver does not (see `respond`).
        let reader = nix::unistd::dup(&fd).map_err(|e| socket_err(e.into()))?;
        nix::sys::socket::setsockopt(
            &reader,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &<nix::sys::time::TimeVal as nix::sys::time::TimeValLike>::milliseconds(
                i64::try_from(read_timeout.as_millis().max(1)).unwrap_or(i64::MAX),
            ),
        )
        .map_err(|e| socket_err(e.into()))?;
        let ethertype = match family {
            Family::V4 => ETH_P_ARP,
            Family::V6 => ETH_P_IPV6,
        };
        let config = datalink::Config {
            read_timeout: Some(read_timeout),
            write_timeout: Some(read_timeout),
            channel_type: ChannelType::Layer3(ethertype),
            promiscuous: false,
            socket_fd: Some(fd.into_raw_fd()),
            ..datalink::Config::default()
        };
        let tx = match datalink::channel(iface, config) {
            Ok(Channel::Ethernet(tx, _rx)) => tx,
            Ok(_) => return Err(SpeakerError::UnsupportedChannel(name.to_owned())),
            Err(e) => return Err(socket_err(e)),
        };
        let tx = Arc::new(Mutex::new(tx));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let index = iface.index;
            let (tx, stop, iface) = (tx.clone(), stop.clone(), name.to_owned());
            std::thread::Builder::new()
                .name(format!(
                    "pal-{}-{name}",
                    if family == Family::V4 { "arp" } else { "ndp" }
                ))
                .spawn(move || respond(&iface, index, mac, &reader, &tx, &shared, &stop))
                .map_err(SpeakerError::Spawn)?
        };
        info!(interface = name, %mac, ?family, "responder started");
        Ok(Self {
            iface: name.to_owned(),
            mac,
            index: iface.index,
            tx,
            stop,
            handle,
            groups: BTreeSet::new(),
            membership: None,
        })
    }

    /// Still reading, and still bound to what `link` is now (same index and MAC)?
    fn current(&self, link: &NetworkInterface) -> bool {
        !self.handle.is_finished() && self.index == link.index && Some(self.mac) == link.mac
    }

    fn send(&self, frame: &[u8]) -> Result<(), SpeakerError> {
        send_frame(&self.tx, &self.iface, frame)
    }

    /// Joins and leaves solicited-node groups so the NIC delivers solicitations for `want`.
    /// Best effort: with IPv6 disabled or on drivers that flood multicast it does not matter.
    fn set_groups(&mut self, want: BTreeSet<Ipv6Addr>) {
        if want == self.groups {
            return;
        }
        if self.membership.is_none() {
            match UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)) {
                Ok(s) => self.membership = Some(s),
                Err(e) => {
                    warn!(interface = %self.iface, error = %e, "cannot join solicited-node groups");
                    return;
                }
            }
        }
        let Some(sock) = &self.membership else { return };
        for gone in self.groups.difference(&want) {
            let _ = sock.leave_multicast_v6(gone, self.index);
        }
        for new in want.difference(&self.groups) {
            if let Err(e) = sock.join_multicast_v6(new, self.index) {
                warn!(interface = %self.iface, group = %new, error = %e, "joining solicited-node group");
            }
        }
        self.groups = want;
    }

    /// Asks the reader to stop; the caller joins the handle later.
    fn stop(self) -> JoinHandle<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
    }
}

/// The interface's MAC, if it can be announced on now.
fn usable_mac(link: &NetworkInterface) -> Result<MacAddr, SpeakerError> {
    if !(link.is_up() && link.is_running()) {
        return Err(SpeakerError::InterfaceDown(link.name.clone()));
    }
    link.mac
        .filter(|m| *m != MacAddr::zero())
        .ok_or_else(|| SpeakerError::NotEthernet(link.name.clone()))
}

/// Whether IPv6 is on for `iface` in this thread's network namespace: its
/// `disable_ipv6` sysctl exists and is 0. Neighbor Discovery on an interface without IPv6
/// would only fail (joining groups) or confuse (advertising a family the link does not run).
fn ipv6_enabled(iface: &str) -> bool {
    // Names come from the interface list or the user; never let one walk out of the directory.
    if iface.is_empty() || iface.contains('/') || iface == "." || iface == ".." {
        return false;
    }
    std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{iface}/disable_ipv6"))
        .is_ok_and(|v| v.trim() == "0")
}

fn send_frame(
    tx: &Mutex<Box<dyn DataLinkSender>>,
    iface: &str,
    frame: &[u8],
) -> Result<(), SpeakerError> {
    let mut tx = tx.lock().unwrap_or_else(|e| e.into_inner());
    match tx.send_to(frame, None) {
        Some(Ok(())) => Ok(()),
        Some(Err(source)) => Err(SpeakerError::Send {
            interface: iface.to_owned(),
            source,
        }),
        None => Err(SpeakerError::Send {
            interface: iface.to_owned(),
            source: std::io::Error::other("frame larger than the write buffer"),
        }),
    }
}

/// Largest frame read; longer ones are truncated and then fail the length checks of
/// `packet::parse` (requests are far shorter).
const MAX_FRAME: usize = 9216;
/// `sll_pkttype` of a frame addressed to another host: unicast to another MAC (flooded by a
/// switch or seen in promiscuous mode), or tagged with a VLAN this host has no device for
/// (the core receive path strips the tag and marks it so, also without the 802.1Q module).
const PACKET_OTHERHOST: u8 = 3;
/// `sll_pkttype` of a frame this host sent.
const PACKET_OUTGOING: u8 = 4;

/// The reader loop of a responder: answer requests for IPs owned on this interface that came
/// in on this interface. A socket bound to an interface also receives what the kernel hands
/// to the interface's upper devices (macvlan, VLAN, bond/bridge members' masters) after
/// stripping their tags, with `sll_ifindex` naming the upper device; such a frame is the upper
/// device's responder's business and answering it here would leave with our MAC and without
/// the tag. Frames for another host are not answered either (the kernel's ARP and NDP drop
/// them too): that would answer, untagged and on the native VLAN, a client in a VLAN this
/// node is not in, or take over a request meant for another host's MAC.
#[allow(clippy::too_many_arguments)]
fn respond(
    iface: &str,
    index: u32,
    mac: MacAddr,
    reader: &OwnedFd,
    tx: &Mutex<Box<dyn DataLinkSender>>,
    shared: &Shared,
    stop: &AtomicBool,
) {
    let counters = &shared.counters;
    let mut buf = vec![0u8; MAX_FRAME];
    while !stop.load(Ordering::Relaxed) {
        let (len, from) = match nix::sys::socket::recvfrom::<nix::sys::socket::LinkAddr>(
            reader.as_raw_fd(),
            &mut buf,
        ) {
            Ok(got) => got,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                // Link down or interface gone: the control thread reopens us at resync.
                warn!(interface = iface, error = %e, "responder stopped on receive error");
                return;
            }
        };
        let Some(from) = from else { continue };
        if from.ifindex() != index as usize
            || matches!(from.pkttype(), PACKET_OUTGOING | PACKET_OTHERHOST)
        {
            continue;
        }
        let frame = &buf[..len.min(buf.len())];
        let Some(request) = packet::parse(frame) else {
            continue;
        };
        counters.requests.fetch_add(1, Ordering::Relaxed);
        let reply = match request {
            Request::Arp {
                sender_mac,
                sender_ip,
                target,
            } if shared.owns(IpAddr::V4(target), iface) => {
                debug!(interface = iface, %target, asker = %sender_ip, "ARP reply");
                packet::arp_reply(mac, target, sender_mac, sender_ip)
            }
            Request::Solicit {
                reply_mac,
                source,
                target,
            } if shared.owns(IpAddr::V6(target), iface) => {
                debug!(interface = iface, %target, asker = %source, "neighbor advertisement");
                packet::advert_for(mac, target, reply_mac, source)
            }
            _ => continue,
        };
        match send_frame(tx, iface, &reply) {
            Ok(()) => counters.replies.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                debug!(error = %e, "reply not sent");
                counters.send_errors.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// A gratuitous round due at `due` for `ip` on `iface`.
struct Pending {
    due: Instant,
    ip: IpAddr,
    iface: String,
}

/// State owned by the control thread.
struct Control {
    config: SpeakerConfig,
    shared: Arc<Shared>,
    desired: Owned,
    responders: BTreeMap<(String, Family), Responder>,
    /// Readers asked to stop, joined once finished.
    stopping: Vec<JoinHandle<()>>,
    /// (IP, interface) pairs being answered; a pair new here gets a gratuitous burst.
    announced: BTreeSet<(IpAddr, String)>,
    pending: Vec<Pending>,
    /// When each announced pair is refreshed next (empty when the refresh is off).
    refresh: BTreeMap<(IpAddr, String), Instant>,
    /// Problems of the last reconcile, to log only changes.
    last_problems: Vec<String>,
}

impl Control {
    fn new(config: SpeakerConfig, shared: Arc<Shared>) -> Self {
        Self {
            config,
            shared,
            desired: Owned::new(),
            responders: BTreeMap::new(),
            stopping: Vec::new(),
            announced: BTreeSet::new(),
            pending: Vec::new(),
            refresh: BTreeMap::new(),
            last_problems: Vec::new(),
        }
    }

    fn run(&mut self, commands: mpsc::Receiver<Command>) {
        let mut next_resync = Instant::now() + self.config.resync_interval;
        loop {
            let now = Instant::now();
            let wake = self
                .pending
                .iter()
                .map(|p| p.due)
                .chain(self.refresh.values().copied())
                .min()
                .map_or(next_resync, |due| due.min(next_resync));
            match commands.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(Command::SetOwned(owned, reply)) => {
                    self.desired = owned;
                    let _ = reply.send(self.reconcile());
                }
                Ok(Command::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            self.queue_refresh();
            self.send_due();
            if Instant::now() >= next_resync {
                if let Err(e) = self.reconcile() {
                    debug!(error = %e, "resync incomplete");
                }
                next_resync = Instant::now() + self.config.resync_interval;
            }
            self.stopping.retain(|h| !h.is_finished());
        }
        self.shutdown();
    }

    /// Brings table, responders, groups and announcements in line with `desired`.
    fn reconcile(&mut self) -> Result<(), SpeakerError> {
        let mut problems = Vec::new();

        // 1. Resolve interfaces (each routing table read at most once).
        let mut routes: BTreeMap<Family, Option<Vec<Route>>> = BTreeMap::new();
        let mut table = Table::new();
        for (ip, ifaces) in &self.desired {
            let set: BTreeSet<String> = if ifaces.is_empty() {
                let family_routes = routes
                    .entry(Family::of(*ip))
                    .or_insert_with(|| read_routes(*ip).map_err(|e| problems.push(e)).ok());
                let Some(family_routes) = family_routes else {
                    continue;
                };
                match best_route(family_routes, *ip) {
                    Some(route) => [route.iface.clone()].into(),
                    None => {
                        problems.push(SpeakerError::NoRoute(*ip));
                        continue;
                    }
                }
            } else {
                ifaces.iter().cloned().collect()
            };
            table.insert(*ip, set);
        }

        // 2. Publish: from here on, lost IPs are not answered.
        for (ip, _) in self
            .announced
            .iter()
            .filter(|(ip, iface)| !table.get(ip).is_some_and(|s| s.contains(iface.as_str())))
        {
            info!(%ip, "stopped announcing");
        }
        *self.shared.table.write().unwrap_or_else(|e| e.into_inner()) = table.clone();
        self.shared
            .counters
            .owned
            .store(self.desired.len() as u64, Ordering::Relaxed);

        // 3. Responders: close unneeded, dead or outdated ones (interface down, gone, new
        //    index or MAC), open missing ones on interfaces that are up.
        let links: BTreeMap<String, NetworkInterface> = datalink::interfaces()
            .into_iter()
            .map(|l| (l.name.clone(), l))
            .collect();
        let needed: BTreeSet<(String, Family)> = table
            .iter()
            .flat_map(|(ip, ifaces)| ifaces.iter().map(|i| (i.clone(), Family::of(*ip))))
            .collect();
        let stale: Vec<(String, Family)> = self
            .responders
            .iter()
            .filter(|(key, r)| {
                !needed.contains(*key)
                    || !links
                        .get(&key.0)
                        .is_some_and(|l| usable_mac(l).is_ok() && r.current(l))
                    || (key.1 == Family::V6 && !ipv6_enabled(&key.0))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for (iface, family) in stale {
            if let Some(r) = self.responders.remove(&(iface.clone(), family)) {
                self.stopping.push(r.stop());
            }
            // Whatever it answered is announced afresh by its successor.
            self.announced
                .retain(|(ip, i)| !(*i == iface && Family::of(*ip) == family));
        }
        for key in &needed {
            if self.responders.contains_key(key) {
                continue;
            }
            let Some(link) = links.get(&key.0) else {
                problems.push(SpeakerError::InterfaceNotFound(key.0.clone()));
                continue;
            };
            if key.1 == Family::V6 && !ipv6_enabled(&key.0) {
                problems.push(SpeakerError::NoIpv6(key.0.clone()));
                continue;
            }
            match Responder::open(link, key.1, self.shared.clone(), self.config.read_timeout) {
                Ok(r) => {
                    self.responders.insert(key.clone(), r);
                }
                Err(e) => problems.push(e),
            }
        }
        self.shared
            .counters
            .responders
            .store(self.responders.len() as u64, Ordering::Relaxed);

        // 4. Solicited-node groups for IPv6 responders.
        for ((iface, family), r) in &mut self.responders {
            if *family == Family::V6 {
                let groups = table
                    .iter()
                    .filter(|(_, ifaces)| ifaces.contains(iface))
                    .filter_map(|(ip, _)| match ip {
                        IpAddr::V6(v6) => Some(packet::solicited_node(*v6)),
                        IpAddr::V4(_) => None,
                    })
                    .collect();
                r.set_groups(groups);
            }
        }

        // 5. Gratuitous bursts for newly answered pairs.
        let live: BTreeSet<(IpAddr, String)> = table
            .iter()
            .flat_map(|(ip, ifaces)| ifaces.iter().map(move |i| (*ip, i.clone())))
            .filter(|(ip, i)| self.responders.contains_key(&(i.clone(), Family::of(*ip))))
            .collect();
        let now = Instant::now();
        let burst_end = self.config.garp_schedule.iter().max().copied();
        for (ip, iface) in live.difference(&self.announced) {
            info!(%ip, interface = %iface, "announcing");
            for offset in &self.config.garp_schedule {
                self.pending.push(Pending {
                    due: now + *offset,
                    ip: *ip,
                    iface: iface.clone(),
                });
            }
            if !self.config.refresh_interval.is_zero() {
                let last = now + burst_end.unwrap_or_default();
                self.refresh
                    .insert((*ip, iface.clone()), last + self.config.refresh_interval);
            }
        }
        self.announced = live;
        let announced = &self.announced;
        self.pending
            .retain(|p| announced.contains(&(p.ip, p.iface.clone())));
        self.refresh.retain(|pair, _| announced.contains(pair));
        self.send_due();

        // Warn when the problems change, not on every resync.
        let described: Vec<String> = problems.iter().map(ToString::to_string).collect();
        if described != self.last_problems {
            for p in &problems {
                warn!(error = %p, kind = p.label(), "announcement problem");
            }
            self.last_problems = described;
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SpeakerError::Incomplete(problems))
        }
    }

    /// Queues one gratuitous round for every pair whose refresh is due, and schedules its next
    /// one an interval from now (a stalled thread does not catch up with a burst).
    fn queue_refresh(&mut self) {
        let now = Instant::now();
        let interval = self.config.refresh_interval;
        for ((ip, iface), due) in &mut self.refresh {
            if *due <= now {
                self.pending.push(Pending {
                    due: now,
                    ip: *ip,
                    iface: iface.clone(),
                });
                self.shared
                    .counters
                    .refreshes
                    .fetch_add(1, Ordering::Relaxed);
                *due = now + interval;
            }
        }
    }

    /// Sends the gratuitous rounds that are due.
    fn send_due(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<Pending>, Vec<Pending>) =
            self.pending.drain(..).partition(|p| p.due <= now);
        self.pending = later;
        for p in due {
            if !self.announced.contains(&(p.ip, p.iface.clone())) {
                continue;
            }
            let Some(r) = self.responders.get(&(p.iface.clone(), Family::of(p.ip))) else {
                continue;
            };
            let frames = match p.ip {
                IpAddr::V4(v4) => vec![
                    packet::garp_request(r.mac, v4),
                    packet::garp_reply(r.mac, v4),
                ],
                IpAddr::V6(v6) => vec![packet::unsolicited_advert(r.mac, v6)],
            };
            for frame in frames {
                let counter = match r.send(&frame) {
                    Ok(()) => &self.shared.counters.gratuitous,
                    Err(e) => {
                        debug!(error = %e, "gratuitous frame not sent");
                        &self.shared.counters.send_errors
                    }
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn shutdown(&mut self) {
        self.shared
            .table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let handles: Vec<JoinHandle<()>> = std::mem::take(&mut self.responders)
            .into_values()
            .map(Responder::stop)
            .chain(self.stopping.drain(..))
            .collect();
        for h in handles {
            let _ = h.join();
        }
        self.shared.counters.owned.store(0, Ordering::Relaxed);
        self.shared.counters.responders.store(0, Ordering::Relaxed);
    }
}
