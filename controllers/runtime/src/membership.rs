//! Liveness of agents, learned from the agents themselves over the node network, so that the
//! L2 announcer keeps working (and fails over) while the API server is slow or gone.
//!
//! ```text
//!   every `interval` (200 ms):  agent ──UDP "alive <node> <incarnation> <seq>"──► every peer
//!   peer heard within `timeout` (1 s)  ⇒ alive;  "leave" on shutdown ⇒ dead at once
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
//! alone and briefly announce everybody's IPs.
//! Split brain: when the LAN partitions, each side sees the other side dead and elects among
//! its own members, so an IP may be announced on both sides — each side's clients reach one
//! node, which is the best a partitioned L2 segment allows. Datagrams carry a cluster tag;
//! they are not authenticated (the port should be reachable from nodes only).
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
}

impl MembershipSettings {
    pub fn new(node_name: impl Into<String>, port: u16) -> Self {
        MembershipSettings {
            node_name: node_name.into(),
            bind: SocketAddr::from(([0, 0, 0, 0], port)),
            peer_port: port,
            interval: Duration::from_millis(200),
            timeout: Duration::from_secs(1),
            cluster_tag: "palisade".into(),
        }
    }
}

/// What the rest of the agent sees: the live nodes (self included) once warmed up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Live {
    pub warmed_up: bool,
    pub nodes: BTreeSet<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum Msg {
    Alive { node: String, incarnation: u64 },
    Leave { node: String, incarnation: u64 },
}

fn encode(tag: &str, msg: &Msg) -> Vec<u8> {
    match msg {
        Msg::Alive { node, incarnation } => format!("PAL1 {tag} alive {node} {incarnation}"),
        Msg::Leave { node, incarnation } => format!("PAL1 {tag} leave {node} {incarnation}"),
    }
    .into_bytes()
}

fn decode(tag: &str, data: &[u8]) -> Option<Msg> {
    let text = std::str::from_utf8(data).ok()?;
    let mut it = text.split(' ');
    if it.next()? != "PAL1" || it.next()? != tag {
        return None;
    }
    let kind = it.next()?;
    let node = it.next()?.to_string();
    let incarnation = it.next()?.parse().ok()?;
    if it.next().is_some() || node.is_empty() || node.len() > 253 {
        return None;
    }
    match kind {
        "alive" => Some(Msg::Alive { node, incarnation }),
        "leave" => Some(Msg::Leave { node, incarnation }),
        _ => None,
    }
}

/// Pure bookkeeping of who was heard when (tested with explicit instants).
#[derive(Debug, Default)]
pub struct Table {
    last_seen: BTreeMap<String, (Instant, u64)>,
    left: BTreeMap<String, u64>,
}

impl Table {
    fn heard(&mut self, msg: Msg, now: Instant) {
        match msg {
            Msg::Alive { node, incarnation } => {
                // A "leave" is final for that incarnation; a restarted agent has a new one.
                if self.left.get(&node).is_some_and(|i| *i >= incarnation) {
                    return;
                }
                self.left.remove(&node);
                self.last_seen.insert(node, (now, incarnation));
            }
            Msg::Leave { node, incarnation } => {
                self.last_seen.remove(&node);
                self.left.insert(node, incarnation);
            }
        }
    }

    fn alive(&self, me: &str, now: Instant, timeout: Duration) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .last_seen
            .iter()
            .filter(|(_, (t, _))| now.saturating_duration_since(*t) < timeout)
            .map(|(n, _)| n.clone())
            .collect();
        out.insert(me.to_string());
        out
    }
}

/// Runs the membership until `shutdown`; peers' addresses come from `peers` (updated by the
/// caller from the Node cache; `None` until the Nodes have been listed). Returns the
/// live-set receiver. The warm-up starts when the peers are first known.
pub async fn start(
    settings: MembershipSettings,
    peers: watch::Receiver<Option<BTreeSet<IpAddr>>>,
    shutdown: CancellationToken,
) -> std::io::Result<watch::Receiver<Live>> {
    let socket = Arc::new(UdpSocket::bind(settings.bind).await?);
    let (tx, rx) = watch::channel(Live::default());
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let table = Arc::new(Mutex::new(Table::default()));
    let mut peers_known_at: Option<Instant> = None;

    // Receiver.
    {
        let socket = socket.clone();
        let table = table.clone();
        let tag = settings.cluster_tag.clone();
        let me = settings.node_name.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let r = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = socket.recv_from(&mut buf) => r,
                };
                let Ok((n, _from)) = r else { continue };
                if let Some(msg) = decode(&tag, &buf[..n]) {
                    let is_me = matches!(&msg, Msg::Alive { node, .. } | Msg::Leave { node, .. } if *node == me);
                    if !is_me {
                        if let Ok(mut t) = table.lock() {
                            t.heard(msg, Instant::now());
                        }
                    }
                }
            }
        });
    }

    // Sender + evaluator.
    tokio::spawn(async move {
        let alive_msg = encode(
            &settings.cluster_tag,
            &Msg::Alive {
                node: settings.node_name.clone(),
                incarnation,
            },
        );
        let mut tick = tokio::time::interval(settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let targets: Option<Vec<IpAddr>> =
                peers.borrow().as_ref().map(|p| p.iter().copied().collect());
            let now = Instant::now();
            if targets.is_some() && peers_known_at.is_none() {
                peers_known_at = Some(now);
            }
            for ip in targets.iter().flatten() {
                let _ = socket
                    .send_to(&alive_msg, SocketAddr::new(*ip, settings.peer_port))
                    .await;
            }
            let live = Live {
                warmed_up: peers_known_at
                    .is_some_and(|t| now.duration_since(t) >= settings.timeout),
                nodes: table
                    .lock()
                    .map(|t| t.alive(&settings.node_name, now, settings.timeout))
                    .unwrap_or_default(),
            };
            tx.send_if_modified(|cur| {
                if *cur != live {
                    if cur.nodes != live.nodes {
                        tracing::info!(live = ?live.nodes, "agent membership changed");
                    }
                    *cur = live;
                    true
                } else {
                    false
                }
            });
        }
        // Tell peers we are gone, so they need not wait for the timeout.
        let leave = encode(
            &settings.cluster_tag,
            &Msg::Leave {
                node: settings.node_name.clone(),
                incarnation,
            },
        );
        let targets: Vec<IpAddr> = peers
            .borrow()
            .as_ref()
            .map(|p| p.iter().copied().collect())
            .unwrap_or_default();
        for _ in 0..2 {
            for ip in &targets {
                let _ = socket
                    .send_to(&leave, SocketAddr::new(*ip, settings.peer_port))
                    .await;
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_round_trips_and_rejects_garbage() {
        let m = Msg::Alive {
            node: "node-1".into(),
            incarnation: 42,
        };
        assert_eq!(decode("c", &encode("c", &m)), Some(m));
        assert_eq!(
            decode(
                "other",
                &encode(
                    "c",
                    &Msg::Leave {
                        node: "n".into(),
                        incarnation: 1
                    }
                )
            ),
            None
        );
        for junk in [
            &b""[..],
            b"PAL1",
            b"PAL1 c alive",
            b"PAL1 c alive n x",
            b"PAL1 c hello n 1",
            b"\xff\xfe",
            b"PAL1 c alive n 1 extra",
        ] {
            assert_eq!(decode("c", junk), None, "{junk:?}");
        }
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
        );
        t.heard(
            Msg::Alive {
                node: "c".into(),
                incarnation: 1,
            },
            t0,
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
        );
        t.heard(
            Msg::Alive {
                node: "c".into(),
                incarnation: 1,
            },
            t0 + Duration::from_millis(1250),
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
        );
        assert_eq!(
            names(t.alive("a", t0 + Duration::from_millis(1500), timeout)),
            ["a", "c"]
        );
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
            let mut s = MembershipSettings::new(name, peer);
            s.bind = SocketAddr::from(([127, 0, 0, 1], bind));
            s.interval = Duration::from_millis(50);
            s.timeout = Duration::from_millis(300);
            s
        };
        let loopback: BTreeSet<IpAddr> = [IpAddr::from([127, 0, 0, 1])].into();
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
}
