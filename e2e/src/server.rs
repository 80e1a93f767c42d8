//! In-process servers that answer probes inside one network namespace.
//!
//! One thread per endpoint enters its namespace, opens every socket there and then polls them:
//!
//! ```text
//!   TCP  0.0.0.0:<port>   accept, note (tcp, peer ip, port), close
//!   UDP  0.0.0.0:<port>   note (udp, peer ip, port), echo the datagram back
//!   raw  IPPROTO_SCTP     parse INIT, note (sctp, src ip, dst port) and its initiate tag
//! ```
//!
//! Every packet that reaches a server is counted in its [`ServerLog`], so a test can ask not
//! only "did the probe get an answer" but "did anything from that address ever arrive" — the
//! question the no-gap test asks. The thread stops within [`POLL_INTERVAL`] of [`Servers::stop`]
//! or drop.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::socket::{recv, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};

use crate::netns;
use crate::sctp;

/// How often a server thread looks at its stop flag.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A transport protocol the lab serves and probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    /// Raw INIT packets, see [`crate::sctp`].
    Sctp,
}

impl Protocol {
    /// All three, in the order the matrices are usually probed.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The name Kubernetes uses (`TCP`, `UDP`, `SCTP`).
    pub fn k8s_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// Lower-case name, as in container port names (`serve-80-tcp`).
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.k8s_name())
    }
}

/// What reached one endpoint's servers.
#[derive(Default)]
pub struct ServerLog {
    inner: Mutex<LogInner>,
}

#[derive(Default)]
struct LogInner {
    seen: BTreeMap<(Protocol, Ipv4Addr, u16), u64>,
    sctp_tags: HashSet<u32>,
}

impl ServerLog {
    fn lock(&self) -> MutexGuard<'_, LogInner> {
        // A panicking server thread cannot leave the counters half-written; keep going.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn note(&self, protocol: Protocol, src: Ipv4Addr, port: u16) {
        *self.lock().seen.entry((protocol, src, port)).or_default() += 1;
    }

    /// How many connections/datagrams/INITs of `protocol` arrived from `src` on `port`.
    pub fn count(&self, protocol: Protocol, src: Ipv4Addr, port: u16) -> u64 {
        self.lock()
            .seen
            .get(&(protocol, src, port))
            .copied()
            .unwrap_or(0)
    }

    /// Everything that arrived from `src`, any protocol or port.
    pub fn total_from(&self, src: Ipv4Addr) -> u64 {
        self.lock()
            .seen
            .iter()
            .filter(|((_, ip, _), _)| *ip == src)
            .map(|(_, n)| n)
            .sum()
    }

    /// Whether an SCTP INIT with this initiate tag arrived.
    pub fn saw_init(&self, initiate_tag: u32) -> bool {
        self.lock().sctp_tags.contains(&initiate_tag)
    }

    /// A copy of the counters: (protocol, source, port) → count.
    pub fn snapshot(&self) -> BTreeMap<(Protocol, Ipv4Addr, u16), u64> {
        self.lock().seen.clone()
    }

    /// Forgets everything seen so far.
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.seen.clear();
        inner.sctp_tags.clear();
    }
}

/// The servers of one endpoint; stopped on drop.
pub struct Servers {
    netns: String,
    log: Arc<ServerLog>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Sockets {
    tcp: Vec<(u16, TcpListener)>,
    udp: Vec<(u16, UdpSocket)>,
    sctp: OwnedFd,
}

impl Servers {
    /// Starts TCP and UDP servers on `ports` and the SCTP INIT receiver inside `netns`;
    /// returns once every socket is bound.
    pub fn start(netns: &str, ports: &[u16]) -> Result<Servers> {
        let log = Arc::new(ServerLog::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let thread = {
            let (netns, ports, log, stop) =
                (netns.to_string(), ports.to_vec(), log.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("srv-{netns}"))
                .spawn(move || {
                    let sockets = netns::enter(&netns).and_then(|()| open_sockets(&ports));
                    match sockets {
                        Ok(sockets) => {
                            let _ = ready_tx.send(Ok(()));
                            serve(&netns, &sockets, &log, &stop);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .context("spawning a server thread")?
        };
        let mut servers = Servers {
            netns: netns.to_string(),
            log,
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(servers),
            Ok(Err(e)) => {
                servers.stop();
                Err(e.context(format!("starting servers in netns {netns}")))
            }
            Err(_) => {
                servers.stop();
                Err(anyhow!("servers in netns {netns} did not start within 10s"))
            }
        }
    }

    /// What reached these servers.
    pub fn log(&self) -> &Arc<ServerLog> {
        &self.log
    }

    /// The namespace the servers live in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Stops the thread and closes the sockets; idempotent.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!("lab: server thread of netns {} panicked", self.netns);
            }
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop();
    }
}

fn open_sockets(ports: &[u16]) -> Result<Sockets> {
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for &port in ports {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let listener = TcpListener::bind(addr).with_context(|| format!("binding tcp/{port}"))?;
        listener
            .set_nonblocking(true)
            .context("non-blocking tcp listener")?;
        tcp.push((port, listener));
        let socket = UdpSocket::bind(addr).with_context(|| format!("binding udp/{port}"))?;
        socket
            .set_nonblocking(true)
            .context("non-blocking udp socket")?;
        udp.push((port, socket));
    }
    let sctp = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::Sctp,
    )
    .context("opening a raw IPPROTO_SCTP socket")?;
    Ok(Sockets { tcp, udp, sctp })
}

fn serve(netns: &str, sockets: &Sockets, log: &ServerLog, stop: &AtomicBool) {
    let timeout = u16::try_from(POLL_INTERVAL.as_millis()).unwrap_or(100);
    while !stop.load(Ordering::Relaxed) {
        let mut fds: Vec<PollFd<'_>> = Vec::new();
        fds.extend(
            sockets
                .tcp
                .iter()
                .map(|(_, l)| PollFd::new(l.as_fd(), PollFlags::POLLIN)),
        );
        fds.extend(
            sockets
                .udp
                .iter()
                .map(|(_, s)| PollFd::new(s.as_fd(), PollFlags::POLLIN)),
        );
        fds.push(PollFd::new(sockets.sctp.as_fd(), PollFlags::POLLIN));
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("lab: poll failed in netns {netns}: {e}; servers stop");
                return;
            }
        }
        drop(fds);
        for (port, listener) in &sockets.tcp {
            while let Ok((_stream, peer)) = listener.accept() {
                if let SocketAddr::V4(peer) = peer {
                    log.note(Protocol::Tcp, *peer.ip(), *port);
                }
            }
        }
        let mut buf = [0u8; 2048];
        for (port, socket) in &sockets.udp {
            // Stops at WouldBlock, or at an error such as ECONNREFUSED queued by an ICMP error
            // for an earlier echo (reading it clears it; the next poll comes back).
            while let Ok((n, peer)) = socket.recv_from(&mut buf) {
                if let SocketAddr::V4(v4) = peer {
                    log.note(Protocol::Udp, *v4.ip(), *port);
                }
                let _ = socket.send_to(&buf[..n], peer);
            }
        }
        loop {
            match recv(sockets.sctp.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => {
                    if let Some(init) = sctp::parse_init(&buf[..n]) {
                        log.note(Protocol::Sctp, init.src, init.dst_port);
                        log.lock().sctp_tags.insert(init.initiate_tag);
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
    }
}
