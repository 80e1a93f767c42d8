//! The speaker against a real router: BIRD 2 in a router namespace on the lab LAN, three node
//! namespaces each running a [`Speaker`] (in-process, on a thread that entered the node's
//! namespace) that announces one VIP /32.
//!
//! Checks the kernel route BIRD installs in the router namespace (`merge paths on`): all three
//! nodes as ECMP next hops; a speaker's `shutdown()` removes its next hop at once; a crashed
//! node (link down, then the speaker aborted) disappears once the 3 s hold time expires.
//!
//! Needs root and `bird` (Debian package bird2, installed by `make deps`); skips with a message
//! otherwise, except under CI=true, where a missing `bird` fails.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipnetwork::IpNetwork;
use palisade_bgp::bfd::{BfdConfig, BfdState};
use palisade_bgp::{PeerConfig, PeerStatus, SessionState, Speaker};
use palisade_e2e::lab::{Lab, LabSpec};
use palisade_e2e::netns;
use palisade_e2e::poll;

const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
const VIP: &str = "203.0.113.10";
const NODE_ASN: u32 = 64500;
const ROUTER_ASN: u32 = 64501;
/// Hold time both sides propose (BIRD's minimum is 3 s).
const HOLD: Duration = Duration::from_secs(3);

/// A speaker running on its own thread inside a node namespace.
struct NodeSpeaker {
    speaker: Arc<Speaker>,
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl NodeSpeaker {
    fn start(netns_name: &str) -> Result<NodeSpeaker> {
        let (tx, rx) = mpsc::channel();
        let name = netns_name.to_string();
        let thread = thread::spawn(move || {
            let setup = (|| {
                netns::enter(&name)?;
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("building a runtime")
            })();
            let rt = match setup {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            rt.block_on(async {
                let speaker = Arc::new(Speaker::new());
                let _ = tx.send(Ok((
                    speaker.clone(),
                    tokio::runtime::Handle::current(),
                    stop_tx,
                )));
                let _ = stop_rx.await;
                drop(speaker);
            });
        });
        let (speaker, handle, stop) = rx
            .recv_timeout(Duration::from_secs(10))
            .context("speaker thread did not start")??;
        Ok(NodeSpeaker {
            speaker,
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `Speaker::shutdown` on the speaker's own runtime; returns how long it took.
    fn shutdown(&self, limit: Duration) -> Result<Duration> {
        let (tx, rx) = mpsc::channel();
        let speaker = self.speaker.clone();
        let started = Instant::now();
        self.handle.spawn(async move {
            speaker.shutdown(limit).await;
            let _ = tx.send(());
        });
        rx.recv_timeout(limit + Duration::from_secs(2))
            .context("shutdown did not return")?;
        Ok(started.elapsed())
    }
}

impl Drop for NodeSpeaker {
    fn drop(&mut self) {
        self.speaker.abort();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn bird_config(nodes: &[Ipv4Addr]) -> String {
    bird_config_with(nodes, HOLD, "")
}

/// BIRD's configuration for the nodes: `extra` goes into the BGP template (e.g. `bfd on;`).
fn bird_config_with(nodes: &[Ipv4Addr], hold: Duration, extra: &str) -> String {
    let mut c = format!(
        "log stderr all;\n\
         router id {ROUTER_IP};\n\
         protocol device {{ scan time 1; }}\n\
         protocol kernel {{\n  ipv4 {{ import none; export all; }};\n  merge paths on;\n}}\n\
         template bgp nodes {{\n  local {ROUTER_IP} as {ROUTER_ASN};\n  passive on;\n  \
         hold time {};\n  ipv4 {{ import all; export none; }};\n  {extra}\n}}\n",
        hold.as_secs()
    );
    for (i, ip) in nodes.iter().enumerate() {
        c.push_str(&format!(
            "protocol bgp node{} from nodes {{ neighbor {ip} as {NODE_ASN}; }}\n",
            i + 1
        ));
    }
    c
}

/// The next hops of the router's kernel route to `vip` (empty when there is none).
fn next_hops(router: &str, vip: &str) -> Result<BTreeSet<IpAddr>> {
    let family = if vip.contains(':') { "-6" } else { "-4" };
    let out = netns::ip_in(router, &[family, "route", "show", vip])?;
    let words: Vec<&str> = out.split_whitespace().collect();
    let mut hops = BTreeSet::new();
    for pair in words.windows(2) {
        if pair[0] == "via" {
            hops.insert(pair[1].parse().with_context(|| format!("route: {out}"))?);
        }
    }
    Ok(hops)
}

fn vip_next_hops(router: &str) -> Result<BTreeSet<Ipv4Addr>> {
    Ok(next_hops(router, VIP)?
        .into_iter()
        .filter_map(|a| match a {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        })
        .collect())
}

fn wait_for(router: &str, vip: &str, want: &BTreeSet<IpAddr>, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut last = BTreeSet::new();
    let took = poll(limit, Duration::from_millis(20), || {
        last = next_hops(router, vip)?;
        Ok((last == *want).then(|| started.elapsed()))
    })?;
    took.with_context(|| {
        format!("router next hops for {vip}: {last:?}, wanted {want:?} within {limit:?}")
    })
}

fn wait_for_hops(router: &str, want: &BTreeSet<Ipv4Addr>, limit: Duration) -> Result<Duration> {
    let want: BTreeSet<IpAddr> = want.iter().map(|a| IpAddr::V4(*a)).collect();
    wait_for(router, VIP, &want, limit)
}

fn bird_ready(test: &str) -> bool {
    if !palisade_e2e::lab_ready(test) {
        return false;
    }
    if !palisade_e2e::on_path("bird") {
        if palisade_e2e::under_ci() {
            panic!("{test}: bird is not installed (make deps installs bird2)");
        }
        println!("skipped: {test} needs bird (apt-get install bird2)");
        return false;
    }
    true
}

#[test]
fn bird_ecmp_shutdown_and_hold_timer() -> Result<()> {
    if !bird_ready("bird_ecmp_shutdown_and_hold_timer") {
        return Ok(());
    }
    let mut lab = Lab::new(LabSpec {
        nodes: 3,
        ports: Vec::new(),
        client: false,
        serve_pods: false,
    })?;
    let router = lab.add_lan_host("router", ROUTER_IP)?.netns;
    let nodes: Vec<(String, Ipv4Addr)> = lab
        .nodes()
        .iter()
        .map(|n| (n.netns.clone(), n.ip))
        .collect();
    let conf = lab.tmp_dir().join("bird.conf");
    std::fs::write(
        &conf,
        bird_config(&nodes.iter().map(|n| n.1).collect::<Vec<_>>()),
    )?;
    let sock = lab.tmp_dir().join("bird.ctl");
    let conf_s = conf.to_string_lossy().into_owned();
    let sock_s = sock.to_string_lossy().into_owned();
    let bird = lab.spawn_in(
        &router,
        "bird",
        &["bird", "-f", "-c", &conf_s, "-s", &sock_s],
    )?;

    let speakers: Vec<NodeSpeaker> = nodes
        .iter()
        .map(|(ns, _)| NodeSpeaker::start(ns))
        .collect::<Result<_>>()?;
    let vip: IpNetwork = format!("{VIP}/32").parse()?;
    for (speaker, (_, ip)) in speakers.iter().zip(&nodes) {
        let mut peer = PeerConfig::new("router", NODE_ASN, ROUTER_ASN, IpAddr::V4(ROUTER_IP));
        peer.hold_time = HOLD;
        peer.keepalive_time = Some(Duration::from_secs(1));
        peer.router_id = *ip;
        peer.source_address = Some(IpAddr::V4(*ip));
        peer.connect_retry = Duration::from_millis(200);
        speaker.speaker.set_peers(vec![peer]);
        assert!(speaker.speaker.set_prefixes("router", [vip].into()));
    }

    let all: BTreeSet<Ipv4Addr> = nodes.iter().map(|n| n.1).collect();
    let took = wait_for_hops(&router, &all, Duration::from_secs(20)).map_err(|e| {
        let log = std::fs::read_to_string(bird.log_path()).unwrap_or_default();
        e.context(format!("bird log:\n{log}"))
    })?;
    println!("ECMP route with 3 next hops after {took:?}");
    for s in &speakers {
        let status = s.speaker.status();
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].state, SessionState::Established, "{status:?}");
        assert_eq!(status[0].prefixes_sent, 1);
        assert_eq!(status[0].hold_time, Some(HOLD));
        assert!(status[0].uptime().is_some());
    }

    // Graceful: node2 withdraws and closes; its next hop is gone by the time shutdown returns
    // (BIRD closes only after reading the withdrawal; give the kernel sync a moment).
    let shutdown_took = speakers[1].shutdown(Duration::from_secs(5))?;
    let mut left = all.clone();
    left.remove(&nodes[1].1);
    let gone = wait_for_hops(&router, &left, Duration::from_secs(1))?;
    println!("shutdown() took {shutdown_took:?}; next hop gone {gone:?} after it returned");
    assert!(speakers[1].speaker.status().is_empty());

    // Crash: node3's link goes down, then its speaker dies without a word. BIRD notices when
    // the hold time runs out.
    netns::ip_in(&nodes[2].0, &["link", "set", "eth0", "down"])?;
    let crashed = Instant::now();
    speakers[2].speaker.abort();
    left.remove(&nodes[2].1);
    wait_for_hops(&router, &left, HOLD + Duration::from_secs(3))?;
    let after = crashed.elapsed();
    println!("crashed node's next hop gone after {after:?} (hold time {HOLD:?})");
    assert!(
        after >= HOLD - Duration::from_millis(1500),
        "removed after {after:?}, before the hold time could expire: not the hold timer"
    );

    // The remaining node keeps its route and session.
    assert_eq!(vip_next_hops(&router)?, [nodes[0].1].into());
    assert_eq!(
        speakers[0].speaker.status()[0].state,
        SessionState::Established
    );
    drop(speakers);
    drop(bird);
    lab.teardown()?;
    Ok(())
}

const ROUTER_IP6: &str = "2001:db8:100::fe";
const VIP6: &str = "2001:db8:ff::10";

fn bird_config_v6(nodes: &[Ipv6Addr]) -> String {
    let mut c = format!(
        "log stderr all;\n\
         router id {ROUTER_IP};\n\
         protocol device {{ scan time 1; }}\n\
         protocol kernel {{\n  ipv6 {{ import none; export all; }};\n  merge paths on;\n}}\n\
         template bgp nodes {{\n  local {ROUTER_IP6} as {ROUTER_ASN};\n  passive on;\n  \
         hold time {};\n  ipv6 {{ import all; export none; }};\n}}\n",
        HOLD.as_secs()
    );
    for (i, ip) in nodes.iter().enumerate() {
        c.push_str(&format!(
            "protocol bgp node{} from nodes {{ neighbor {ip} as {NODE_ASN}; }}\n",
            i + 1
        ));
    }
    c
}

/// IPv6 peering (MP-BGP, MP_REACH with the node's global address as next hop) and a v6 VIP:
/// ECMP over three nodes, then one node's graceful shutdown.
#[test]
fn bird_ipv6_ecmp_and_shutdown() -> Result<()> {
    if !bird_ready("bird_ipv6_ecmp_and_shutdown") {
        return Ok(());
    }
    let mut lab = Lab::new(LabSpec {
        nodes: 3,
        ports: Vec::new(),
        client: false,
        serve_pods: false,
    })?;
    let router = lab.add_lan_host("router", ROUTER_IP)?.netns;
    netns::ip_in(
        &router,
        &[
            "-6",
            "addr",
            "add",
            &format!("{ROUTER_IP6}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    )?;
    let mut nodes: Vec<(String, Ipv6Addr)> = Vec::new();
    for n in lab.nodes() {
        let ip: Ipv6Addr = format!("2001:db8:100::{}", 10 + n.index).parse()?;
        netns::ip_in(
            &n.netns,
            &[
                "-6",
                "addr",
                "add",
                &format!("{ip}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
        nodes.push((n.netns.clone(), ip));
    }
    let conf = lab.tmp_dir().join("bird6.conf");
    std::fs::write(
        &conf,
        bird_config_v6(&nodes.iter().map(|n| n.1).collect::<Vec<_>>()),
    )?;
    let sock = lab.tmp_dir().join("bird6.ctl");
    let conf_s = conf.to_string_lossy().into_owned();
    let sock_s = sock.to_string_lossy().into_owned();
    let bird = lab.spawn_in(
        &router,
        "bird6",
        &["bird", "-f", "-c", &conf_s, "-s", &sock_s],
    )?;

    let speakers: Vec<NodeSpeaker> = nodes
        .iter()
        .map(|(ns, _)| NodeSpeaker::start(ns))
        .collect::<Result<_>>()?;
    let vip: IpNetwork = format!("{VIP6}/128").parse()?;
    for (i, (speaker, (_, ip))) in speakers.iter().zip(&nodes).enumerate() {
        let mut peer = PeerConfig::new("router6", NODE_ASN, ROUTER_ASN, ROUTER_IP6.parse()?);
        peer.hold_time = HOLD;
        peer.router_id = Ipv4Addr::new(198, 51, 100, 11 + i as u8);
        peer.source_address = Some(IpAddr::V6(*ip));
        peer.connect_retry = Duration::from_millis(200);
        speaker.speaker.set_peers(vec![peer]);
        assert!(speaker.speaker.set_prefixes("router6", [vip].into()));
    }
    let all: BTreeSet<IpAddr> = nodes.iter().map(|n| IpAddr::V6(n.1)).collect();
    let took = wait_for(&router, VIP6, &all, Duration::from_secs(20)).map_err(|e| {
        let log = std::fs::read_to_string(bird.log_path()).unwrap_or_default();
        e.context(format!("bird log:\n{log}"))
    })?;
    println!("IPv6 ECMP route with 3 next hops after {took:?}");
    for s in &speakers {
        let status = s.speaker.status();
        assert_eq!(status[0].state, SessionState::Established, "{status:?}");
        assert_eq!(status[0].prefixes_sent, 1);
    }
    speakers[0].shutdown(Duration::from_secs(5))?;
    let mut left = all.clone();
    left.remove(&IpAddr::V6(nodes[0].1));
    let gone = wait_for(&router, VIP6, &left, Duration::from_secs(1))?;
    println!("IPv6 next hop gone {gone:?} after shutdown() returned");
    drop(speakers);
    drop(bird);
    lab.teardown()?;
    Ok(())
}

/// BFD 100 ms x 3 on both sides (BIRD's `protocol bfd` + `bfd on` per neighbour).
const BFD_BIRD: &str = "protocol bfd {\n  interface \"*\" {\n    min rx interval 100 ms;\n    \
                        min tx interval 100 ms;\n    multiplier 3;\n  };\n}\n";
/// Hold time of the BFD test: long, so that only BFD can explain a fast failover.
const BFD_HOLD: Duration = Duration::from_secs(9);

fn fast_bfd() -> BfdConfig {
    BfdConfig {
        desired_min_tx: Duration::from_millis(100),
        required_min_rx: Duration::from_millis(100),
        detect_mult: 3,
        passive: false,
        minimum_ttl: 255,
    }
}

fn wait_status(
    speaker: &Speaker,
    what: &str,
    limit: Duration,
    ok: impl Fn(&PeerStatus) -> bool,
) -> Result<PeerStatus> {
    let mut status = Vec::new();
    let reached = poll(limit, Duration::from_millis(20), || {
        status = speaker.status();
        status.first().filter(|s| ok(s)).cloned()
    });
    reached.with_context(|| format!("{what}: not within {limit:?}: {status:?}"))
}

/// BFD against BIRD's BFD: sessions come Up; a node crash (link down, speaker aborted without a
/// word) removes its next hop long before the 9 s hold time; BFD packets dropped on a node make
/// its BFD session go Down, which closes that node's BGP session (reason recorded) while TCP is
/// still fine; once they flow again BFD and BGP come back.
#[test]
fn bird_bfd_failover() -> Result<()> {
    if !bird_ready("bird_bfd_failover") {
        return Ok(());
    }
    if !palisade_e2e::on_path("iptables") {
        println!("skipped: bird_bfd_failover needs iptables");
        return Ok(());
    }
    let mut lab = Lab::new(LabSpec {
        nodes: 3,
        ports: Vec::new(),
        client: false,
        serve_pods: false,
    })?;
    let router = lab.add_lan_host("router", ROUTER_IP)?.netns;
    let nodes: Vec<(String, Ipv4Addr)> = lab
        .nodes()
        .iter()
        .map(|n| (n.netns.clone(), n.ip))
        .collect();
    let conf = lab.tmp_dir().join("bird-bfd.conf");
    let mut text = bird_config_with(
        &nodes.iter().map(|n| n.1).collect::<Vec<_>>(),
        BFD_HOLD,
        "bfd on;\n  error wait time 1, 2;",
    );
    text.push_str(BFD_BIRD);
    std::fs::write(&conf, text)?;
    let sock = lab.tmp_dir().join("bird-bfd.ctl");
    let conf_s = conf.to_string_lossy().into_owned();
    let sock_s = sock.to_string_lossy().into_owned();
    let bird = lab.spawn_in(
        &router,
        "bird-bfd",
        &["bird", "-f", "-c", &conf_s, "-s", &sock_s],
    )?;
    let bird_log = || std::fs::read_to_string(bird.log_path()).unwrap_or_default();

    let speakers: Vec<NodeSpeaker> = nodes
        .iter()
        .map(|(ns, _)| NodeSpeaker::start(ns))
        .collect::<Result<_>>()?;
    let vip: IpNetwork = format!("{VIP}/32").parse()?;
    for (speaker, (_, ip)) in speakers.iter().zip(&nodes) {
        let mut peer = PeerConfig::new("router", NODE_ASN, ROUTER_ASN, IpAddr::V4(ROUTER_IP));
        peer.hold_time = BFD_HOLD;
        peer.router_id = *ip;
        peer.source_address = Some(IpAddr::V4(*ip));
        peer.connect_retry = Duration::from_millis(200);
        peer.bfd = Some(fast_bfd());
        speaker.speaker.set_peers(vec![peer]);
        assert!(speaker.speaker.set_prefixes("router", [vip].into()));
    }
    let all: BTreeSet<Ipv4Addr> = nodes.iter().map(|n| n.1).collect();
    wait_for_hops(&router, &all, Duration::from_secs(20))
        .map_err(|e| e.context(format!("bird log:\n{}", bird_log())))?;
    for s in &speakers {
        wait_status(&s.speaker, "BFD Up", Duration::from_secs(20), |s| {
            s.bfd_state == Some(BfdState::Up) && s.state == SessionState::Established
        })
        .map_err(|e| e.context(format!("bird log:\n{}", bird_log())))?;
    }
    let bfd_show = lab.exec_in(
        &router,
        &["birdc", "-s", &sock_s, "show", "bfd", "sessions"],
    )?;
    let shown = String::from_utf8_lossy(&bfd_show.stdout).into_owned();
    println!("{shown}");
    assert_eq!(
        shown.matches(" Up ").count(),
        3,
        "BIRD's BFD sessions: {shown}"
    );

    // Crash: node3's link down and its speaker gone without a word.
    netns::ip_in(&nodes[2].0, &["link", "set", "eth0", "down"])?;
    let crashed = Instant::now();
    speakers[2].speaker.abort();
    let mut left = all.clone();
    left.remove(&nodes[2].1);
    wait_for_hops(&router, &left, BFD_HOLD).map_err(|e| {
        let status: Vec<_> = speakers[..2].iter().map(|s| s.speaker.status()).collect();
        e.context(format!("status {status:?}\nbird log:\n{}", bird_log()))
    })?;
    let after = crashed.elapsed();
    println!(
        "crashed node's next hop gone after {after:?} (BFD 100 ms x 3, hold time {BFD_HOLD:?})"
    );
    assert!(
        after < BFD_HOLD / 2,
        "removed after {after:?}: the hold timer, not BFD"
    );

    // BFD packets to node1 dropped: its BFD session expires and the BGP session closes at
    // once although TCP still works.
    let drop_bfd = [
        "iptables", "-w", "-I", "INPUT", "-p", "udp", "--dport", "3784", "-j", "DROP",
    ];
    let out = lab.exec_in(&nodes[0].0, &drop_bfd)?;
    assert!(out.status.success(), "iptables: {out:?}");
    let down = wait_status(
        &speakers[0].speaker,
        "BGP closed by BFD",
        BFD_HOLD / 2,
        |s| {
            s.last_down_reason
                .as_deref()
                .is_some_and(|r| r.contains("BFD"))
        },
    )?;
    assert!(down.bfd_flaps >= 1, "{down:?}");
    assert_ne!(down.bfd_state, Some(BfdState::Up), "{down:?}");
    let mut undo = drop_bfd.to_vec();
    undo[2] = "-D";
    let out = lab.exec_in(&nodes[0].0, &undo)?;
    assert!(out.status.success(), "iptables: {out:?}");
    wait_status(
        &speakers[0].speaker,
        "BFD and BGP back",
        Duration::from_secs(30),
        |s| s.bfd_state == Some(BfdState::Up) && s.state == SessionState::Established,
    )?;
    wait_for_hops(&router, &left, Duration::from_secs(20))?;
    // Node2 never noticed anything.
    let s1 = &speakers[1].speaker.status()[0];
    assert_eq!((s1.established_count, s1.bfd_flaps), (1, 0), "{s1:?}");
    drop(speakers);
    drop(bird);
    lab.teardown()?;
    Ok(())
}

/// TCP MD5 (RFC 2385) against BIRD's `password`: the node with the right key establishes and
/// its route is installed; a node with a wrong key and one with no key never establish (BIRD's
/// kernel drops their unsigned or badly signed segments), watched for a bounded 8 s.
#[test]
fn bird_tcp_md5() -> Result<()> {
    if !bird_ready("bird_tcp_md5") {
        return Ok(());
    }
    let mut lab = Lab::new(LabSpec {
        nodes: 3,
        ports: Vec::new(),
        client: false,
        serve_pods: false,
    })?;
    let router = lab.add_lan_host("router", ROUTER_IP)?.netns;
    let nodes: Vec<(String, Ipv4Addr)> = lab
        .nodes()
        .iter()
        .map(|n| (n.netns.clone(), n.ip))
        .collect();
    let conf = lab.tmp_dir().join("bird.conf");
    std::fs::write(
        &conf,
        bird_config_with(
            &nodes.iter().map(|n| n.1).collect::<Vec<_>>(),
            HOLD,
            "password \"s3cret-md5\";",
        ),
    )?;
    let sock = lab.tmp_dir().join("bird.ctl");
    let conf_s = conf.to_string_lossy().into_owned();
    let sock_s = sock.to_string_lossy().into_owned();
    let bird = lab.spawn_in(
        &router,
        "bird",
        &["bird", "-f", "-c", &conf_s, "-s", &sock_s],
    )?;

    let speakers: Vec<NodeSpeaker> = nodes
        .iter()
        .map(|(ns, _)| NodeSpeaker::start(ns))
        .collect::<Result<_>>()?;
    let vip: IpNetwork = format!("{VIP}/32").parse()?;
    let keys: [Option<&[u8]>; 3] = [Some(b"s3cret-md5"), Some(b"wrong-key"), None];
    for ((speaker, (_, ip)), key) in speakers.iter().zip(&nodes).zip(keys) {
        let mut peer = PeerConfig::new("router", NODE_ASN, ROUTER_ASN, IpAddr::V4(ROUTER_IP));
        peer.hold_time = HOLD;
        peer.keepalive_time = Some(Duration::from_secs(1));
        peer.router_id = *ip;
        peer.source_address = Some(IpAddr::V4(*ip));
        peer.connect_retry = Duration::from_millis(200);
        peer.password = key.map(|k| palisade_bgp::Md5Key(k.to_vec()));
        speaker.speaker.set_peers(vec![peer]);
        assert!(speaker.speaker.set_prefixes("router", [vip].into()));
    }

    let good: BTreeSet<Ipv4Addr> = [nodes[0].1].into();
    let took = wait_for_hops(&router, &good, Duration::from_secs(20)).map_err(|e| {
        let log = std::fs::read_to_string(bird.log_path()).unwrap_or_default();
        e.context(format!("bird log:\n{log}"))
    })?;
    println!("signed session's route installed after {took:?}");
    wait_status(
        &speakers[0].speaker,
        "right key established",
        Duration::from_secs(5),
        |s| s.state == SessionState::Established,
    )?;

    // Bounded watch: the other two must never get past Connect, nor their next hop appear.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        for (i, s) in speakers.iter().enumerate().skip(1) {
            let status = s.speaker.status();
            assert_eq!(status.len(), 1);
            assert!(
                matches!(status[0].state, SessionState::Idle | SessionState::Connect),
                "node{} ({}) got to {:?}: {status:?}",
                i + 1,
                if i == 1 { "wrong key" } else { "no key" },
                status[0].state
            );
        }
        assert_eq!(vip_next_hops(&router)?, good);
        thread::sleep(Duration::from_millis(100));
    }
    for s in &speakers[1..] {
        println!("unsigned/badly signed session: {:?}", s.speaker.status()[0]);
    }
    assert_eq!(
        speakers[0].speaker.status()[0].state,
        SessionState::Established
    );
    drop(speakers);
    drop(bird);
    lab.teardown()?;
    Ok(())
}
