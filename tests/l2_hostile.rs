//! Hostile membership traffic against real agents (issue 10, part 1): three `palisade agent`
//! processes with L2 on and a shared key file (the lab's [`LabAgents`] writes one), an
//! attacker host on the LAN and a pod on node3.
//!
//! ```text
//!   netns <p>-lan: bridge 198.51.100.0/24
//!   ├─ <p>-cp        .2    test API server
//!   ├─ <p>-node1..3  .11-.13  palisade agent --enable-l2 --memberlist-key-file <lab key>
//!   │    └─ node3: pod 10.244.3.2 (routed via node3)
//!   └─ <p>-attacker  .66   sends forged / replayed datagrams to every node's port 7946,
//!                          from its own address and from spoofed node addresses (/32
//!                          secondaries, ARP replies off so the LAN keeps its real owners)
//! ```
//!
//! What is sent: the original attack (`PAL1 palisade leave node2 18446744073709551615`) and
//! `PAL1` joins, v2 leave/join/alive for every node with incarnations 1, now and `u64::MAX`
//! authenticated with a wrong key, and the owner's own datagrams, captured on its interface and
//! replayed with its source address — while it runs and after its agent was SIGKILLed.
//! Checked: the owner (`palisade_l2_owned_ips`) never changes and every agent keeps
//! `members_alive = 3` while under attack; the rejected counters rise by reason; after the
//! SIGKILL another node takes the IP within 5 s although the replays keep coming.
//!
//! Needs root and `cargo build -p palisade` (or `PALISADE_BIN`); otherwise `skipped: ...`.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use palisade_e2e::api::{ControlPlane, CONTROL_PLANE_IP};
use palisade_e2e::lab::{Lab, LabSpec, NodeHandle};
use palisade_e2e::lab_cluster::{FAST_LEASE_FLAGS, FAST_SYNC_FLAGS};
use palisade_e2e::{netns, LabAgents};
use palisade_membership::memberlist_key::Key;
use palisade_membership::memberlist_wire::{self, Datagram, Kind};
use palisade_testapi::Store;
use serde_json::{json, Value};

const PORT: u16 = 7946;
const ATTACKER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 66);
const AGENT_FLAGS: &[&str] = &[
    "--pod-namespace",
    "palisade-system",
    "--enable-netpol=false",
    "--enable-loadbalancer=true",
    "--enable-l2=true",
    "--memberlist-port",
    "7946",
    "--memberlist-timeout",
    "1s",
    "--memberlist-interval",
    "200ms",
    "--log-level",
    "info",
];

struct Hostile {
    agents: LabAgents,
    cp: Option<ControlPlane>,
    lab: Lab,
    nodes: Vec<NodeHandle>,
    attacker: String,
    /// (netns, the node address it sends from)
    spoofers: Vec<(String, Ipv4Addr)>,
    pod: String,
    kubeconfig: std::path::PathBuf,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.agents.log_tails(30));
        }
        self.agents.kill_all();
        if let Some(cp) = self.cp.as_mut() {
            cp.stop();
        }
        self.cp = None;
        if let Err(e) = self.lab.teardown() {
            eprintln!("lab teardown: {e:#}");
        }
    }
}

fn put(store: &Store, obj: Value) -> Result<()> {
    store
        .put_object(obj)
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("put_object: {e:?}"))
}

impl Hostile {
    /// The lab; `dead_nodes` extra Node objects with LAN addresses nothing answers; `extra`
    /// flags for every agent.
    fn start(dead_nodes: usize, extra: &[&str]) -> Result<Hostile> {
        let mut spec = LabSpec::new(3);
        spec.serve_pods = false;
        spec.ports = Vec::new();
        let mut lab = Lab::new(spec)?;
        let cp_host = lab.add_lan_host("cp", CONTROL_PLANE_IP)?;
        let attacker = lab.add_lan_host("attacker", ATTACKER_IP)?;
        let pod = lab.add_pod(3, "evil", "shell", None)?;
        let nodes = lab.nodes().to_vec();
        let dir = lab.tmp_dir().to_path_buf();
        let bin = palisade_tests::palisade_bin();
        let mut h = Hostile {
            agents: LabAgents::new(bin, &dir, &cp_host.netns, &nodes),
            cp: None,
            lab,
            nodes: nodes.clone(),
            attacker: attacker.netns.clone(),
            spoofers: Vec::new(),
            pod: pod.netns.clone(),
            kubeconfig: dir.join("kubeconfig"),
        };
        // One spoofing host per node address (a host holding all of them would deliver
        // datagrams to them locally): it may send from the node's address but never answers
        // ARP for it.
        for (i, n) in nodes.iter().enumerate() {
            let host = h.lab.add_lan_host(
                &format!("spoof{}", i + 1),
                Ipv4Addr::new(198, 51, 100, 67 + i as u8),
            )?;
            for (k, v) in [
                ("net/ipv4/conf/all/arp_ignore", "8"),
                ("net/ipv4/conf/all/arp_announce", "2"),
            ] {
                netns::write_sysctl(&host.netns, k, v)?;
            }
            netns::ip_in(
                &host.netns,
                &["addr", "add", &format!("{}/32", n.ip), "dev", "eth0"],
            )?;
            h.spoofers.push((host.netns.clone(), n.ip));
        }
        let cp = ControlPlane::start_lab(&cp_host.netns, &dir)?;
        h.kubeconfig = cp.agent_kubeconfig().to_path_buf();
        h.cp = Some(cp);
        let store = h.store()?;
        for ns in ["default", "palisade-system"] {
            put(
                store,
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            )?;
        }
        for n in &nodes {
            put(
                store,
                json!({
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": n.name, "labels": {"kubernetes.io/hostname": n.name}},
                    "spec": {"podCIDR": n.pod_cidr_text(), "podCIDRs": [n.pod_cidr_text()]},
                    "status": {"addresses": [
                        {"type": "InternalIP", "address": n.ip.to_string()},
                        {"type": "Hostname", "address": n.name}]}
                }),
            )?;
        }
        // Unused LAN addresses: .101-.199 and .251-.254 (the pool is .200-.250).
        let dead_ips = (101..=199u8)
            .chain(251..=254)
            .map(|i| Ipv4Addr::new(198, 51, 100, i));
        for (i, ip) in dead_ips.take(dead_nodes).enumerate() {
            put(
                store,
                json!({
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": format!("dead{i}")},
                    "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]}
                }),
            )?;
        }
        put(
            store,
            json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "IPAddressPool",
                   "metadata": {"name": "lan"},
                   "spec": {"addresses": ["198.51.100.200-198.51.100.250"]}}),
        )?;
        put(
            store,
            json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "L2Advertisement",
                   "metadata": {"name": "lan"}, "spec": {}}),
        )?;
        put(
            store,
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"namespace": "default", "name": "web"},
                   "spec": {"type": "LoadBalancer", "selector": {"app": "web"},
                            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
        )?;
        let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let flags = [AGENT_FLAGS, FAST_LEASE_FLAGS, FAST_SYNC_FLAGS, extra].concat();
        for n in &names {
            h.agents.start(n, &h.kubeconfig, &flags)?;
        }
        for n in &names {
            h.agents.wait_ready(n, Duration::from_secs(30))?;
        }
        Ok(h)
    }

    fn store(&self) -> Result<&Store> {
        Ok(self
            .cp
            .as_ref()
            .context("control plane stopped")?
            .test_server()
            .context("not the lab's API server")?
            .store())
    }

    fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// The nodes whose agent says it owns an IP, and each running agent's `members_alive`.
    fn owners(&mut self) -> (Vec<String>, Vec<(String, f64)>) {
        let mut owners = Vec::new();
        let mut alive = Vec::new();
        for n in self.names() {
            if !self.agents.running(&n) {
                continue;
            }
            if self
                .agents
                .metric(&n, "palisade_l2_owned_ips")
                .unwrap_or(0.0)
                >= 1.0
            {
                owners.push(n.clone());
            }
            alive.push((
                n.clone(),
                self.agents
                    .metric(&n, "palisade_members_alive")
                    .unwrap_or(-1.0),
            ));
        }
        (owners, alive)
    }

    fn rejected(&self, node: &str, reason: &str) -> f64 {
        self.agents
            .metric(
                node,
                &format!("palisade_memberlist_rejected_total{{reason=\"{reason}\"}}"),
            )
            .unwrap_or(0.0)
    }
}

/// Waits until exactly one node owns the IP and every agent counts three members.
fn wait_settled(h: &mut Hostile, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let (owners, alive) = h.owners();
        if owners.len() == 1 && alive.iter().all(|(_, a)| *a == 3.0) {
            return Ok(owners[0].clone());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not settled: owners {owners:?}, alive {alive:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Membership datagrams `node` sends during `d`, captured on its eth0 (AF_PACKET).
fn capture(node: &NodeHandle, d: Duration) -> Result<Vec<Vec<u8>>> {
    use pnet::datalink::{self, Channel};
    let (netns_name, src) = (node.netns.clone(), node.ip.octets());
    netns::run_in(&netns_name, move || {
        let iface = datalink::interfaces()
            .into_iter()
            .find(|i| i.name == "eth0")
            .context("no eth0")?;
        let cfg = datalink::Config {
            read_timeout: Some(Duration::from_millis(50)),
            ..Default::default()
        };
        let Channel::Ethernet(_tx, mut rx) = datalink::channel(&iface, cfg)? else {
            anyhow::bail!("not an Ethernet channel");
        };
        let mut out = Vec::new();
        let until = Instant::now() + d;
        while Instant::now() < until {
            let Ok(frame) = rx.next() else { continue };
            if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] {
                continue;
            }
            let ip = &frame[14..];
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ip[9] != 17 || ip[12..16] != src || ip.len() < ihl + 8 {
                continue;
            }
            let udp = &ip[ihl..];
            if u16::from_be_bytes([udp[2], udp[3]]) == PORT {
                out.push(udp[8..].to_vec());
            }
        }
        Ok(out)
    })
}

/// Sends every datagram to every node from `netns_name`, bound to `from` (port 0).
fn send_all(netns_name: &str, from: Ipv4Addr, targets: &[Ipv4Addr], datagrams: &[Vec<u8>]) {
    let targets: Vec<Ipv4Addr> = targets.iter().copied().filter(|t| *t != from).collect();
    let datagrams = datagrams.to_vec();
    netns::run_in(netns_name, move || {
        let s = UdpSocket::bind(SocketAddr::from((from, 0)))?;
        for d in &datagrams {
            for t in &targets {
                let _ = s.send_to(d, SocketAddr::from((*t, PORT)));
            }
        }
        Ok(())
    })
    .expect("sending from the attacker");
}

/// The forged datagrams: the PAL1 attack and v2 ones with a wrong key, for every node.
fn forgeries(nodes: &[String]) -> Vec<Vec<u8>> {
    let wrong = Key::parse(b"not-the-cluster-key-at-all").unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut out = Vec::new();
    for n in nodes {
        out.push(format!("PAL1 palisade leave {n} 18446744073709551615").into_bytes());
        out.push(format!("PAL1 palisade join {n} 18446744073709551615").into_bytes());
        for kind in [Kind::Leave, Kind::Join, Kind::Alive] {
            for incarnation in [1, now_ms * 1000, u64::MAX] {
                out.push(memberlist_wire::encode(
                    "palisade",
                    &Datagram {
                        kind,
                        node: n.clone(),
                        incarnation,
                        seq: u64::MAX,
                        timestamp_ms: now_ms,
                        reach: Vec::new(),
                        owned: None,
                    },
                    &wrong,
                ));
            }
        }
    }
    out
}

#[test]
fn forged_and_replayed_datagrams_move_nothing_and_failover_still_works() {
    if !palisade_e2e::lab_ready("forged_and_replayed_datagrams_move_nothing") {
        return;
    }
    let started = Instant::now();
    let mut h = Hostile::start(0, &[]).expect("lab");
    let owner = wait_settled(&mut h, Duration::from_secs(20)).expect("settles");
    let owner_node = h.nodes.iter().find(|n| n.name == owner).unwrap().clone();
    let node_ips: Vec<Ipv4Addr> = h.nodes.iter().map(|n| n.ip).collect();
    let captured = capture(&owner_node, Duration::from_millis(1500)).expect("capture");
    assert!(
        captured.len() >= 10,
        "captured only {} datagrams of {owner}",
        captured.len()
    );
    let forged = forgeries(&h.names());
    let owner_spoofer = h
        .spoofers
        .iter()
        .find(|(_, ip)| *ip == owner_node.ip)
        .map(|(ns, _)| ns.clone())
        .unwrap();
    let others: Vec<String> = h.names().into_iter().filter(|n| *n != owner).collect();
    let before: Vec<(String, f64, f64, f64)> = others
        .iter()
        .map(|n| {
            (
                n.clone(),
                h.rejected(n, "malformed") + h.rejected(n, "unknown_key"),
                h.rejected(n, "replay"),
                h.rejected(n, "source_address"),
            )
        })
        .collect();

    // 3 s of attack: forged from the attacker's own address and from every node's, forged
    // from the pod, replays of the owner's datagrams from the owner's address.
    let pod_ip = h.lab.pods()[0].ip;
    let until = Instant::now() + Duration::from_secs(3);
    let mut rounds = 0;
    while Instant::now() < until {
        send_all(&h.attacker, ATTACKER_IP, &node_ips, &forged);
        for (spoofer, ip) in &h.spoofers {
            send_all(spoofer, *ip, &node_ips, &forged);
        }
        send_all(&h.pod, pod_ip, &node_ips, &forged);
        send_all(&owner_spoofer, owner_node.ip, &node_ips, &captured);
        // Genuine datagrams from the wrong address (the attacker's, a pod's).
        send_all(&h.attacker, ATTACKER_IP, &node_ips, &captured);
        send_all(&h.pod, pod_ip, &node_ips, &captured);
        rounds += 1;
        let (owners, alive) = h.owners();
        assert_eq!(owners, vec![owner.clone()], "ownership moved under attack");
        assert!(
            alive.iter().all(|(_, a)| *a == 3.0),
            "membership changed under attack: {alive:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for (n, forged_before, replay_before, source_before) in &before {
        let forged_now = h.rejected(n, "malformed") + h.rejected(n, "unknown_key");
        assert!(
            forged_now >= forged_before + (rounds * forged.len()) as f64,
            "{n}: forged rejections {forged_before} → {forged_now} after {rounds} rounds"
        );
        let all: Vec<(&str, f64)> = palisade_membership::memberlist_wire::Reject::ALL
            .iter()
            .map(|r| (r.reason(), h.rejected(n, r.reason())))
            .collect();
        assert!(
            h.rejected(n, "replay") > *replay_before,
            "{n}: no replay rejected: {all:?}"
        );
        assert!(
            h.rejected(n, "source_address") > *source_before,
            "{n}: no source address rejected: {all:?}"
        );
    }

    // The owner dies (SIGKILL: no leave); its replayed datagrams keep coming. Failover anyway.
    let killed_at = Instant::now();
    assert!(h.agents.kill(&owner).unwrap());
    let mut new_owner = None;
    while killed_at.elapsed() < Duration::from_secs(5) {
        send_all(&owner_spoofer, owner_node.ip, &node_ips, &captured);
        send_all(&h.attacker, ATTACKER_IP, &node_ips, &forged);
        let (owners, alive) = h.owners();
        if owners.len() == 1 && alive.iter().all(|(_, a)| *a == 2.0) {
            new_owner = Some((owners[0].clone(), killed_at.elapsed()));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (new_owner, took) = new_owner.expect("no failover within 5 s while replaying");
    assert_ne!(new_owner, owner);
    println!(
        "failover under replay: {owner} → {new_owner} in {} ms",
        took.as_millis()
    );
    // And it stays put while the replays go on.
    for _ in 0..10 {
        send_all(&owner_spoofer, owner_node.ip, &node_ips, &captured);
        let (owners, _) = h.owners();
        assert_eq!(
            owners,
            vec![new_owner.clone()],
            "ownership moved after failover"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let panics = h.agents.panics();
    assert!(panics.is_empty(), "{panics:?}");
    println!(
        "forged_and_replayed_datagrams: {} rounds, {:.1} s",
        rounds,
        started.elapsed().as_secs_f64()
    );
}

/// Issue 10, part 3: 100 Node objects whose addresses nothing answers (their neighbour entries
/// never resolve) must not slow the heartbeats between the three live agents: the membership
/// stays at 3 on every agent while nothing happens, and a SIGKILLed owner fails over as usual.
#[test]
fn a_hundred_dead_nodes_do_not_disturb_the_live_ones() {
    if !palisade_e2e::lab_ready("a_hundred_dead_nodes_do_not_disturb_the_live_ones") {
        return;
    }
    let mut h = Hostile::start(100, &[]).expect("lab");
    let owner = wait_settled(&mut h, Duration::from_secs(20)).expect("settles");
    // 6 s of quiet: no membership change anywhere (silent peers are probed at a low rate,
    // every send is non-blocking).
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let (owners, alive) = h.owners();
        assert_eq!(owners, vec![owner.clone()], "ownership moved");
        assert!(
            alive.iter().all(|(_, a)| *a == 3.0),
            "membership flapped: {alive:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let killed_at = Instant::now();
    assert!(h.agents.kill(&owner).unwrap());
    let mut took = None;
    while killed_at.elapsed() < Duration::from_secs(5) {
        let (owners, alive) = h.owners();
        if owners.len() == 1 && owners[0] != owner && alive.iter().all(|(_, a)| *a == 2.0) {
            took = Some(killed_at.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = took.expect("no failover within 5 s with 100 dead Nodes");
    println!("failover with 100 dead Nodes: {} ms", took.as_millis());
    let panics = h.agents.panics();
    assert!(panics.is_empty(), "{panics:?}");
}

/// Issue 10, part 1, key rotation with real agents: the key files of the three agents are
/// replaced one after the other (1 s apart, as the kubelet updates a Secret volume node by
/// node); through the whole rotation window the owner never changes, every agent keeps three
/// members and no datagram of a peer is rejected for its key. Then the owner is restarted with
/// a wrong key: it is never elected (the failover's new owner keeps the IP, the restarted
/// agent answers nothing) and the other two never count it.
#[test]
fn a_key_rotation_keeps_the_membership_and_a_wrong_key_agent_is_never_elected() {
    const WINDOW_SECS: u64 = 10;
    if !palisade_e2e::lab_ready("a_key_rotation_keeps_the_membership") {
        return;
    }
    let window = format!("{WINDOW_SECS}s");
    let mut h =
        Hostile::start(0, &["--memberlist-key-rotation-window", window.as_str()]).expect("lab");
    let owner = wait_settled(&mut h, Duration::from_secs(20)).expect("settles");
    let names = h.names();
    let unknown_key =
        |h: &Hostile| -> Vec<f64> { names.iter().map(|n| h.rejected(n, "unknown_key")).collect() };
    let before = unknown_key(&h);
    // The file poll (2 s) plus the 2 s stagger stay inside half the window, when the first
    // agent starts sending with the new key.
    for (i, n) in names.iter().enumerate() {
        h.agents
            .write_key(n, "palisade-lab-memberlist-key-rotated-42")
            .expect("key file");
        if i + 1 < names.len() {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let until = Instant::now() + Duration::from_secs(WINDOW_SECS + 4);
    let mut samples = 0;
    while Instant::now() < until {
        let (owners, alive) = h.owners();
        assert_eq!(
            owners,
            vec![owner.clone()],
            "ownership moved in the rotation"
        );
        assert!(
            alive.iter().all(|(_, a)| *a == 3.0),
            "membership changed in the rotation: {alive:?}"
        );
        samples += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        unknown_key(&h),
        before,
        "peers' datagrams rejected for their key during the rotation"
    );
    // Every agent took the new key (so the checks above ran across a real rotation).
    for n in &names {
        let log = h.agents.log(n);
        assert!(
            log.contains("memberlist key changed"),
            "{n} never rotated its key:\n{log}"
        );
    }

    // The owner comes back with a wrong key (killed first, so the others fail over).
    assert!(h.agents.kill(&owner).unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    let new_owner = loop {
        let (owners, alive) = h.owners();
        if owners.len() == 1 && owners[0] != owner && alive.iter().all(|(_, a)| *a == 2.0) {
            break owners[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no failover: owners {owners:?}, alive {alive:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    h.agents
        .write_key(&owner, "an-attacker-guessed-key-0000000000")
        .expect("key file");
    let flags = [
        AGENT_FLAGS,
        FAST_LEASE_FLAGS,
        FAST_SYNC_FLAGS,
        &["--memberlist-key-rotation-window", window.as_str()],
    ]
    .concat();
    h.agents
        .start(&owner, &h.kubeconfig, &flags)
        .expect("restart");
    let others: Vec<String> = names.iter().filter(|n| **n != owner).cloned().collect();
    let rejected_before: Vec<f64> = others
        .iter()
        .map(|n| h.rejected(n, "unknown_key"))
        .collect();
    // 8 s: longer than warm-up, the hold-back decision and two membership timeouts.
    let until = Instant::now() + Duration::from_secs(8);
    let mut answered_metrics = false;
    while Instant::now() < until {
        let (owners, _) = h.owners();
        assert_eq!(
            owners,
            vec![new_owner.clone()],
            "the agent with a wrong key took the IP (or disturbed the owner)"
        );
        for n in &others {
            let alive = h.agents.metric(n, "palisade_members_alive").unwrap_or(-1.0);
            assert_eq!(alive, 2.0, "{n} counts the agent with a wrong key");
        }
        if let Some(owned) = h.agents.metric(&owner, "palisade_l2_owned_ips") {
            answered_metrics = true;
            assert_eq!(owned, 0.0, "the agent with a wrong key announces");
        }
        assert!(
            h.agents.running(&owner),
            "the agent with a wrong key exited"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        answered_metrics,
        "the restarted agent never served /metrics"
    );
    for (n, before) in others.iter().zip(&rejected_before) {
        assert!(
            h.rejected(n, "unknown_key") > *before,
            "{n} rejected none of the wrong key's datagrams"
        );
    }
    let panics = h.agents.panics();
    assert!(panics.is_empty(), "{panics:?}");
    println!(
        "key rotation: {samples} samples with 3 members and one owner; wrong key never counted"
    );
}
