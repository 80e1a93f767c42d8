//! BGP benchmarks against BIRD 2 in the e2e lab (root, `bird` on PATH); prints a table.
//!
//! ```sh
//! cargo run --release -p palisade-bgp --example bgp_bench            # all three
//! BGP_BENCH_RUNS=5 cargo run --release -p palisade-bgp --example bgp_bench
//! ```
//!
//! 1. `prefixes`: three node speakers (in-process, each on a thread inside its node namespace)
//!    start together and announce 1,000 /32s each; time until the router's kernel table has
//!    all 1,000 routes with three ECMP next hops.
//! 2. `failover`: two nodes with BFD 100 ms x 3 (hold time 9 s) announce one VIP; node2's
//!    link goes down and its speaker is aborted; time until its next hop is gone from the
//!    router's kernel route. Repeated `BGP_BENCH_RUNS` times (default 20): min / median / max.
//! 3. `memory`: one speaker with four sessions (four router addresses, one BIRD) and 1,000
//!    prefixes each; the process's resident memory before the speaker and with everything
//!    established and announced (VmRSS, so it includes the tokio runtime's threads).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipnetwork::{IpNetwork, Ipv4Network};
use palisade_bgp::bfd::{BfdConfig, BfdState};
use palisade_bgp::{PeerConfig, SessionState, Speaker};
use palisade_e2e::lab::{Lab, LabSpec};
use palisade_e2e::netns;

const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);

struct NodeSpeaker {
    speaker: Arc<Speaker>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl NodeSpeaker {
    fn start(netns_name: &str) -> Result<NodeSpeaker> {
        let (tx, rx) = mpsc::channel();
        let name = netns_name.to_string();
        let thread = thread::spawn(move || {
            let rt = match netns::enter(&name).and_then(|()| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("runtime")
            }) {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            rt.block_on(async {
                let speaker = Arc::new(Speaker::new());
                let _ = tx.send(Ok((speaker.clone(), stop_tx)));
                let _ = stop_rx.await;
                drop(speaker);
            });
        });
        let (speaker, stop) = rx.recv_timeout(Duration::from_secs(10))??;
        Ok(NodeSpeaker {
            speaker,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for NodeSpeaker {
    fn drop(&mut self) {
        self.speaker.abort();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn bird_config(routers: &[Ipv4Addr], nodes: &[Ipv4Addr], bfd: bool) -> String {
    let mut c = format!(
        "router id {ROUTER_IP};\nprotocol device {{ scan time 1; }}\n\
         protocol kernel {{\n  ipv4 {{ import none; export all; }};\n  merge paths on;\n}}\n"
    );
    if bfd {
        c.push_str(
            "protocol bfd {\n  interface \"*\" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; };\n}\n",
        );
    }
    for (r, router) in routers.iter().enumerate() {
        for (i, ip) in nodes.iter().enumerate() {
            c.push_str(&format!(
                "protocol bgp r{r}n{i} {{ local {router} as 64501; neighbor {ip} as 64500; passive on; \
                 hold time 9; error wait time 1, 2; {} ipv4 {{ import all; export none; }}; }}\n",
                if bfd { "bfd on;" } else { "" }
            ));
        }
    }
    c
}

fn start_bird(lab: &Lab, router: &str, text: &str, tag: &str) -> Result<palisade_e2e::LabProcess> {
    let conf = lab.tmp_dir().join(format!("{tag}.conf"));
    std::fs::write(&conf, text)?;
    let conf_s = conf.display().to_string();
    let sock_s = lab
        .tmp_dir()
        .join(format!("{tag}.ctl"))
        .display()
        .to_string();
    lab.spawn_in(router, tag, &["bird", "-f", "-c", &conf_s, "-s", &sock_s])
}

fn peer(name: &str, router: Ipv4Addr, me: Ipv4Addr) -> PeerConfig {
    let mut p = PeerConfig::new(name, 64500, 64501, IpAddr::V4(router));
    p.hold_time = Duration::from_secs(9);
    p.router_id = me;
    p.source_address = Some(IpAddr::V4(me));
    p.connect_retry = Duration::from_millis(100);
    p
}

fn prefixes(n: u32) -> BTreeSet<IpNetwork> {
    (0..n)
        .map(|i| {
            IpNetwork::V4(
                Ipv4Network::new(Ipv4Addr::from(0xcb00_7100 + (i << 8) + 10), 32).unwrap(),
            )
        })
        .collect()
}

/// Routes of the router's main table learnt from BIRD, and how many of them have `hops`
/// next hops.
fn bird_routes(router: &str, hops: usize) -> Result<(usize, usize)> {
    let out = netns::ip_in(router, &["-4", "route", "show", "proto", "bird"])?;
    let mut routes = 0;
    let mut full = 0;
    let mut current = 0;
    for line in out.lines() {
        if !line.starts_with(char::is_whitespace) {
            if routes > 0 && current == hops {
                full += 1;
            }
            routes += 1;
            current = usize::from(line.contains(" via "));
        } else if line.contains("nexthop via") {
            current += 1;
        }
    }
    if routes > 0 && current == hops {
        full += 1;
    }
    Ok((routes, full))
}

fn lab(nodes: usize) -> Result<(Lab, String)> {
    let mut lab = Lab::new(LabSpec {
        nodes,
        ports: Vec::new(),
        client: false,
        serve_pods: false,
    })?;
    let router = lab.add_lan_host("router", ROUTER_IP)?.netns;
    Ok((lab, router))
}

fn bench_prefixes() -> Result<Duration> {
    let (mut lab, router) = lab(3)?;
    let nodes: Vec<(String, Ipv4Addr)> = lab
        .nodes()
        .iter()
        .map(|n| (n.netns.clone(), n.ip))
        .collect();
    let ips: Vec<Ipv4Addr> = nodes.iter().map(|n| n.1).collect();
    let _bird = start_bird(
        &lab,
        &router,
        &bird_config(&[ROUTER_IP], &ips, false),
        "bird-prefixes",
    )?;
    thread::sleep(Duration::from_millis(500));
    let set = prefixes(1000);
    let speakers: Vec<NodeSpeaker> = nodes
        .iter()
        .map(|(ns, _)| NodeSpeaker::start(ns))
        .collect::<Result<_>>()?;
    let started = Instant::now();
    for (s, (_, ip)) in speakers.iter().zip(&nodes) {
        s.speaker.set_peers(vec![peer("r", ROUTER_IP, *ip)]);
        s.speaker.set_prefixes("r", set.clone());
    }
    let took = loop {
        let (_, full) = bird_routes(&router, 3)?;
        if full >= 1000 {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("1,000 ECMP routes not there after 60 s");
        }
        thread::sleep(Duration::from_millis(10));
    };
    drop(speakers);
    lab.teardown()?;
    Ok(took)
}

fn bench_failover(runs: usize) -> Result<Vec<Duration>> {
    let (mut lab, router) = lab(2)?;
    let nodes: Vec<(String, Ipv4Addr)> = lab
        .nodes()
        .iter()
        .map(|n| (n.netns.clone(), n.ip))
        .collect();
    let ips: Vec<Ipv4Addr> = nodes.iter().map(|n| n.1).collect();
    let _bird = start_bird(
        &lab,
        &router,
        &bird_config(&[ROUTER_IP], &ips, true),
        "bird-failover",
    )?;
    let vip: IpNetwork = "203.0.113.10/32".parse()?;
    let bfd = BfdConfig {
        desired_min_tx: Duration::from_millis(100),
        required_min_rx: Duration::from_millis(100),
        detect_mult: 3,
        passive: false,
        minimum_ttl: 255,
    };
    let keeper = NodeSpeaker::start(&nodes[0].0)?;
    let mut p = peer("r", ROUTER_IP, nodes[0].1);
    p.bfd = Some(bfd);
    keeper.speaker.set_peers(vec![p]);
    keeper.speaker.set_prefixes("r", [vip].into());
    let mut out = Vec::new();
    for run in 0..runs {
        netns::ip_in(&nodes[1].0, &["link", "set", "eth0", "up"])?;
        let victim = NodeSpeaker::start(&nodes[1].0)?;
        let mut p = peer("r", ROUTER_IP, nodes[1].1);
        p.bfd = Some(bfd);
        victim.speaker.set_peers(vec![p]);
        victim.speaker.set_prefixes("r", [vip].into());
        let t0 = Instant::now();
        loop {
            let st = victim.speaker.status();
            let (_, full) = bird_routes(&router, 2)?;
            if full == 1
                && st.first().is_some_and(|s| {
                    s.state == SessionState::Established && s.bfd_state == Some(BfdState::Up)
                })
            {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("run {run}: two next hops with BFD up not reached: {st:?}");
            }
            thread::sleep(Duration::from_millis(10));
        }
        // Let BIRD's side of BFD reach its fast timers too (its poll sequence).
        thread::sleep(Duration::from_millis(300));
        netns::ip_in(&nodes[1].0, &["link", "set", "eth0", "down"])?;
        let t = Instant::now();
        victim.speaker.abort();
        loop {
            let (routes, full) = bird_routes(&router, 1)?;
            if routes == 1 && full == 1 {
                break;
            }
            if t.elapsed() > Duration::from_secs(15) {
                bail!("run {run}: next hop not gone after 15 s");
            }
            thread::sleep(Duration::from_millis(2));
        }
        out.push(t.elapsed());
        drop(victim);
    }
    drop(keeper);
    lab.teardown()?;
    Ok(out)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn bench_memory() -> Result<(u64, u64)> {
    let (mut lab, _router) = lab(1)?;
    // Four routers, each in its own namespace with its own BIRD (BIRD keys neighbours by
    // address, so one BIRD cannot hold four sessions with one node).
    let routers: Vec<Ipv4Addr> = (250..=253)
        .map(|i| Ipv4Addr::new(198, 51, 100, i))
        .collect();
    let node = (lab.nodes()[0].netns.clone(), lab.nodes()[0].ip);
    let mut birds = Vec::new();
    for (i, r) in routers.iter().enumerate() {
        let ns = lab.add_lan_host(&format!("rtr{i}"), *r)?.netns;
        let conf = bird_config(&[*r], &[node.1], false)
            .replace(&format!("router id {ROUTER_IP}"), &format!("router id {r}"));
        birds.push(start_bird(&lab, &ns, &conf, &format!("bird-memory{i}"))?);
    }
    thread::sleep(Duration::from_millis(500));
    let before = rss_kib();
    let s = NodeSpeaker::start(&node.0)?;
    let set = prefixes(1000);
    let peers: Vec<PeerConfig> = routers
        .iter()
        .enumerate()
        .map(|(i, r)| peer(&format!("r{i}"), *r, node.1))
        .collect();
    s.speaker.set_peers(peers);
    for i in 0..routers.len() {
        s.speaker.set_prefixes(&format!("r{i}"), set.clone());
    }
    let t = Instant::now();
    loop {
        let st = s.speaker.status();
        if st.len() == 4
            && st
                .iter()
                .all(|p| p.state == SessionState::Established && p.prefixes_sent == 1000)
        {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("sessions not established: {st:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_secs(1));
    let after = rss_kib();
    drop(s);
    lab.teardown()?;
    Ok((before, after))
}

fn main() -> Result<()> {
    if !palisade_e2e::lab_ready("bgp_bench") || !palisade_e2e::on_path("bird") {
        println!("skipped: bgp_bench needs root and bird");
        return Ok(());
    }
    let runs: usize = std::env::var("BGP_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let only = std::env::var("BGP_BENCH_ONLY").unwrap_or_default();
    let want = |name: &str| only.is_empty() || only.split(',').any(|o| o == name);
    println!("| benchmark | result |");
    println!("|---|---|");
    if want("prefixes") {
        let prefixes = bench_prefixes()?;
        println!(
            "| 1,000 prefixes x 3 nodes: all ECMP routes in the router's kernel after start | {} |",
            ms(prefixes)
        );
    }
    if want("failover") {
        let mut failover = bench_failover(runs)?;
        failover.sort();
        println!(
            "| node failure (link down + abort) -> next hop gone, BFD 100 ms x 3, {} runs | min {} / median {} / max {} |",
            failover.len(),
            ms(failover[0]),
            ms(failover[failover.len() / 2]),
            ms(failover[failover.len() - 1])
        );
    }
    if want("memory") {
        let (before, after) = bench_memory()?;
        println!(
            "| speaker memory, 4 peers x 1,000 prefixes (VmRSS growth; process total) | {} KiB ({} KiB) |",
            after.saturating_sub(before),
            after
        );
    }
    Ok(())
}
