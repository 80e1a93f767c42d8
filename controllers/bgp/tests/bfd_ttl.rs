//! The BFD sockets in a lab namespace, fed by hand-made packets from a LAN host (no router
//! software needed): single-hop packets must arrive with TTL 255 (RFC 5881 §5), packets from
//! an address without a session and malformed ones are dropped, and a valid exchange walks
//! the session Down → Init → Up, with our own packets leaving from a port in 49152-65535
//! with TTL 255.
//!
//! Needs root (network namespaces); prints `skipped: ...` otherwise.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use palisade_bgp::bfd::{BfdConfig, BfdState, BfdStatus, Hub, Packet, BFD_PORT};
use palisade_e2e::lab::{Lab, LabSpec};
use palisade_e2e::netns;

const PEER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);

fn packet(state: BfdState, your_discr: u32) -> Packet {
    Packet {
        diag: 0,
        state,
        poll: false,
        final_: false,
        control_plane_independent: false,
        demand: false,
        detect_mult: 3,
        my_discr: 0x1234,
        your_discr,
        desired_min_tx_us: 1_000_000,
        required_min_rx_us: 100_000,
        required_min_echo_rx_us: 0,
    }
}

#[test]
fn ttl_below_255_and_strangers_are_dropped_and_a_valid_peer_comes_up() -> Result<()> {
    if !palisade_e2e::lab_ready("ttl_below_255_and_strangers_are_dropped") {
        return Ok(());
    }
    let mut lab = Lab::new(LabSpec {
        nodes: 1,
        ports: Vec::new(),
        client: false,
        serve_pods: false,
    })?;
    let peer_ns = lab.add_lan_host("bfdpeer", PEER_IP)?.netns;
    let stranger_ns = lab
        .add_lan_host("stranger", Ipv4Addr::new(198, 51, 100, 253))?
        .netns;
    let node = (lab.nodes()[0].netns.clone(), lab.nodes()[0].ip);
    // The peer listens on 3784 to see what the node sends.
    let (tx, rx) = std::sync::mpsc::channel();
    let (discr_tx, discr_rx) = std::sync::mpsc::channel::<u32>();
    let listener = {
        let ns = peer_ns.clone();
        std::thread::spawn(move || -> Result<()> {
            netns::enter(&ns)?;
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, BFD_PORT))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let _ = tx.send(());
            let mut buf = [0u8; 64];
            let (n, from) = s.recv_from(&mut buf)?;
            let p = Packet::decode(&buf[..n]).context("node's packet")?;
            match from {
                SocketAddr::V4(a) if (49152..=65535).contains(&a.port()) => {}
                other => bail!("node sent from {other}"),
            }
            if p.state != BfdState::Down || p.your_discr != 0 {
                bail!("first packet: {p:?}");
            }
            let _ = discr_tx.send(p.my_discr);
            Ok(())
        })
    };
    rx.recv_timeout(Duration::from_secs(5))?;

    let node_ip = node.1;
    let send = move |ns: &str, ttl: u32, bytes: Vec<u8>| -> Result<()> {
        let target = SocketAddr::new(IpAddr::V4(node_ip), BFD_PORT);
        netns::run_in(ns, move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 49200))?;
            s.set_ttl(ttl)?;
            s.send_to(&bytes, target)?;
            Ok(())
        })
    };

    let rt_ns = node.0.clone();
    let outcome = std::thread::spawn(move || -> Result<(u64, Vec<BfdState>)> {
        netns::enter(&rt_ns)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let hub = Hub::new();
            let cfg = BfdConfig {
                desired_min_tx: Duration::from_millis(100),
                required_min_rx: Duration::from_millis(100),
                ..BfdConfig::default()
            };
            let handle = hub.start(IpAddr::V4(PEER_IP), None, cfg)?;
            let mut status = handle.status();
            // Let the session open its sockets.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let wait_state = |status: &mut tokio::sync::watch::Receiver<BfdStatus>,
                              want: BfdState| {
                let status = status.clone();
                async move {
                    let started = Instant::now();
                    while started.elapsed() < Duration::from_secs(3) {
                        let s: BfdStatus = status.borrow().clone();
                        if s.state == want {
                            return true;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    false
                }
            };
            let mut seen = Vec::new();
            // TTL 64 from the real peer: dropped, the session stays Down.
            let down = packet(BfdState::Down, 0).encode().to_vec();
            send(&peer_ns, 64, down.clone())?;
            // A stranger with TTL 255: no session for it.
            send(&stranger_ns, 255, down.clone())?;
            // Garbage with TTL 255 from the peer.
            send(&peer_ns, 255, vec![0x20, 0x40, 3])?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            seen.push(status.borrow().state);
            let dropped = hub.dropped();
            // The real thing: Down (TTL 255) → we go Init; then Up with our discriminator.
            send(&peer_ns, 255, down.clone())?;
            if !wait_state(&mut status, BfdState::Init).await {
                bail!("not Init: {:?}", status.borrow().clone());
            }
            seen.push(BfdState::Init);
            // Up addressed to another discriminator: ignored; to ours (seen by the peer's
            // listener in our first packet): Up.
            let ours = discr_rx
                .recv_timeout(Duration::from_secs(5))
                .context("the node sent nothing to the peer")?;
            send(
                &peer_ns,
                255,
                packet(BfdState::Up, ours ^ 1).encode().to_vec(),
            )?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            seen.push(status.borrow().state);
            send(&peer_ns, 255, packet(BfdState::Up, ours).encode().to_vec())?;
            if !wait_state(&mut status, BfdState::Up).await {
                bail!("not Up: {:?}", status.borrow().clone());
            }
            seen.push(BfdState::Up);
            drop(handle);
            Ok::<_, anyhow::Error>((dropped, seen))
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("node thread panicked"))??;
    listener
        .join()
        .map_err(|_| anyhow::anyhow!("listener panicked"))??;
    let (dropped, seen) = outcome;
    assert_eq!(
        seen[0],
        BfdState::Down,
        "a packet with TTL 64 or from a stranger counted"
    );
    assert!(
        dropped >= 3,
        "dropped {dropped}, want the TTL 64, stranger and garbage packets"
    );
    assert_eq!(seen[1..], [BfdState::Init, BfdState::Init, BfdState::Up]);
    lab.teardown()?;
    Ok(())
}
