//! Probes: can a packet get from one namespace to an address and port?
//!
//! A probe runs on a worker thread that has entered the source namespace, so its socket is
//! created there:
//!
//! - TCP: `connect` with a timeout; reachable = the handshake completed.
//! - UDP: send a token on a fresh socket, wait for the server's echo (sent again at half time);
//!   reachable = the echo came back.
//! - SCTP: send a hand-built INIT on a raw socket (again at half time); reachable = the
//!   destination's [`ServerLog`] recorded the probe's initiate tag (see [`crate::sctp`]).
//!
//! Each probe uses a new source port, so conntrack sees a new flow and policy is evaluated.
//! [`run_all`] runs many probes on a bounded pool of threads; a denied probe costs its whole
//! timeout, so parallelism is what keeps a 9×9 matrix at about a second.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::socket::{
    sendto, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn,
};

use crate::netns::Hopper;
use crate::sctp;
use crate::server::{Protocol, ServerLog};

/// Default time a probe waits before calling a destination blocked.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(300);

/// Upper bound on concurrent probe threads.
pub const MAX_WORKERS: usize = 24;

/// One probe to run.
#[derive(Clone)]
pub struct Job {
    /// Namespace the probe is sent from.
    pub from_netns: String,
    pub to_ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    /// The destination's server log; required for SCTP (it is how arrival is observed).
    pub dst_log: Option<Arc<ServerLog>>,
}

/// What a probe saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub reachable: bool,
    /// "connected", "echoed", "init seen", "timeout", "refused", or an error text.
    pub detail: String,
}

impl Outcome {
    fn yes(detail: &str) -> Outcome {
        Outcome {
            reachable: true,
            detail: detail.to_string(),
        }
    }
    fn no(detail: impl Into<String>) -> Outcome {
        Outcome {
            reachable: false,
            detail: detail.into(),
        }
    }
}

/// A 64-bit random number, good enough for ports, tokens and tags (not for secrets).
pub fn random_u64() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id()).rotate_left(32);
    let mut z = STATE
        .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
        .wrapping_add(seed);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs one probe on the calling thread, which must already be in `job.from_netns`.
pub fn probe_here(job: &Job, timeout: Duration) -> Result<Outcome> {
    match job.protocol {
        Protocol::Tcp => Ok(probe_tcp(job.to_ip, job.port, timeout)),
        Protocol::Udp => probe_udp(job.to_ip, job.port, timeout),
        Protocol::Sctp => {
            let log = job
                .dst_log
                .as_ref()
                .ok_or_else(|| anyhow!("no SCTP receiver is known at {}", job.to_ip))?;
            probe_sctp(job.to_ip, job.port, log, timeout)
        }
    }
}

fn probe_tcp(ip: Ipv4Addr, port: u16, timeout: Duration) -> Outcome {
    match TcpStream::connect_timeout(&SocketAddr::from((ip, port)), timeout) {
        Ok(_) => Outcome::yes("connected"),
        Err(e) => Outcome::no(io_detail(&e)),
    }
}

fn io_detail(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timeout".into(),
        std::io::ErrorKind::ConnectionRefused => "refused".into(),
        _ => e.to_string(),
    }
}

fn probe_udp(ip: Ipv4Addr, port: u16, timeout: Duration) -> Result<Outcome> {
    let socket =
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("binding a udp probe socket")?;
    socket
        .connect((ip, port))
        .context("connecting the udp probe socket")?;
    let token = format!("palisade-probe-{:016x}", random_u64());
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    for attempt in 0..2 {
        if let Err(e) = socket.send(token.as_bytes()) {
            return Ok(Outcome::no(io_detail(&e)));
        }
        let until = if attempt == 0 {
            Instant::now() + timeout / 2
        } else {
            deadline
        };
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            socket
                .set_read_timeout(Some(left))
                .context("udp probe read timeout")?;
            match socket.recv(&mut buf) {
                Ok(n) if &buf[..n] == token.as_bytes() => return Ok(Outcome::yes("echoed")),
                Ok(_) => continue,
                Err(e) if matches!(io_detail(&e).as_str(), "timeout") => break,
                Err(e) => return Ok(Outcome::no(io_detail(&e))),
            }
        }
    }
    Ok(Outcome::no("timeout"))
}

fn probe_sctp(ip: Ipv4Addr, port: u16, log: &ServerLog, timeout: Duration) -> Result<Outcome> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Sctp,
    )
    .context("opening a raw IPPROTO_SCTP socket")?;
    let r = random_u64();
    let src_port = 32768 + (r % 28000) as u16;
    let tag = ((r >> 16) as u32).max(1);
    let packet = sctp::build_init(src_port, port, tag, (r >> 40) as u32);
    let dst = SockaddrIn::from(SocketAddrV4::new(ip, 0));
    let deadline = Instant::now() + timeout;
    for attempt in 0..2 {
        if let Err(e) = sendto(fd.as_raw_fd(), &packet, &dst, MsgFlags::empty()) {
            return Ok(Outcome::no(format!("send: {e}")));
        }
        let until = if attempt == 0 {
            Instant::now() + timeout / 2
        } else {
            deadline
        };
        while Instant::now() < until {
            if log.saw_init(tag) {
                return Ok(Outcome::yes("init seen"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(if log.saw_init(tag) {
        Outcome::yes("init seen")
    } else {
        Outcome::no("timeout")
    })
}

/// Sends probes from the calling thread's namespace to `to_ip:port` as fast as is sensible
/// until `stop` is set, `max` probes went out, or `deadline` passes; returns how many went out.
/// Nothing waits for answers (TCP waits at most 25 ms per connect): whether anything arrived is
/// for the destination's [`ServerLog`] to say. Each probe is a new flow (new source port).
pub fn hammer_here(
    to_ip: Ipv4Addr,
    port: u16,
    protocol: Protocol,
    stop: &std::sync::atomic::AtomicBool,
    max: u64,
    deadline: Instant,
) -> Result<u64> {
    let dst = SocketAddr::from((to_ip, port));
    let raw = match protocol {
        Protocol::Sctp => Some(
            socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::Sctp,
            )
            .context("opening a raw IPPROTO_SCTP socket")?,
        ),
        _ => None,
    };
    let mut sent = 0;
    while sent < max && !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match (protocol, &raw) {
            (Protocol::Tcp, _) => {
                let _ = TcpStream::connect_timeout(&dst, Duration::from_millis(25));
            }
            (Protocol::Udp, _) => {
                let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("binding udp")?;
                let _ = socket.send_to(b"palisade-hammer", dst);
                std::thread::sleep(Duration::from_millis(1));
            }
            (Protocol::Sctp, Some(fd)) => {
                let r = random_u64();
                let packet =
                    sctp::build_init(32768 + (r % 28000) as u16, port, (r >> 16) as u32, 1);
                let to = SockaddrIn::from(SocketAddrV4::new(to_ip, 0));
                let _ = sendto(fd.as_raw_fd(), &packet, &to, MsgFlags::empty());
                std::thread::sleep(Duration::from_millis(1));
            }
            (Protocol::Sctp, None) => bail!("no raw socket"),
        }
        sent += 1;
    }
    Ok(sent)
}

/// Runs every job on at most [`MAX_WORKERS`] threads; results are in job order.
pub fn run_all(jobs: &[Job], timeout: Duration) -> Result<Vec<Outcome>> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; jobs.len()]);
    let workers = jobs.len().min(MAX_WORKERS);
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    let mut hopper = Hopper::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(job) = jobs.get(i) else {
                            return Ok(());
                        };
                        hopper.enter(&job.from_netns)?;
                        let outcome = probe_here(job, timeout).with_context(|| {
                            format!(
                                "probing {}:{}/{} from {}",
                                job.to_ip, job.port, job.protocol, job.from_netns
                            )
                        })?;
                        results
                            .lock()
                            .map_err(|_| anyhow!("probe results poisoned"))?[i] = Some(outcome);
                    }
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow!("a probe thread panicked"))??;
        }
        Ok(())
    })?;
    let results = results
        .into_inner()
        .map_err(|_| anyhow!("probe results poisoned"))?;
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.ok_or_else(|| anyhow!("probe {i} did not run")))
        .collect::<Result<Vec<_>>>()
        .and_then(|v| {
            if v.len() == jobs.len() {
                Ok(v)
            } else {
                bail!("lost probe results")
            }
        })
}
