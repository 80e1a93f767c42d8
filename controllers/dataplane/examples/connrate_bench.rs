//! New-TCP-connection rate through Palisade's rules with anti-spoofing and revocation on:
//! no Palisade rules at all vs 1,000 policies on the node, in network namespaces (root).
//! Also counts the anti-spoofing rules per local pod (IPv4 and IPv6).
//!
//! ```text
//! cargo run --release -p palisade-dataplane --example connrate_bench
//! CONNRATE_ROUNDS=15 cargo run --release -p palisade-dataplane --example connrate_bench
//! ```
//!
//! Lab: a node netns with two real pods (routed: veth + /32 route), client x/client and
//! server x/server; the server accepts and closes, the client connects, reads the EOF and
//! closes, for `ROUND` per round. Configurations alternate round by round:
//! - `none`: Palisade's hooks removed from FORWARD/INPUT (no rule of ours is traversed);
//! - `anti-spoofing only`: no policy, anti-spoofing + revocation rules for 102 local pods;
//! - `1,000 policies`: 1,000 policies over 100 namespaces with one local pod each (plus the
//!   two real pods, both isolated: the flow is allowed by one of 11 policies), anti-spoofing
//!   and revocation (PALISADE-MIDSTREAM) on.
//!
//! The client and server run as this program re-executed inside the pods' namespaces.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use palisade_dataplane::netns::{is_root, Netns};
use palisade_dataplane::{Executor, KernelExecutor};
use palisade_netpol::builders::*;
use palisade_netpol::{compile, names, render, ClusterState, Family, NodeConfig, PodInterface};
use serde_json::json;

const ROLE: &str = "PALISADE_CONNRATE_ROLE";
const ROUND: Duration = Duration::from_secs(2);
/// Rounds per configuration (`CONNRATE_ROUNDS` overrides).
const ROUNDS: usize = 5;
const SERVER: &str = "10.40.0.20";
const CLIENT: &str = "10.40.0.10";
const PORT: u16 = 8080;

fn server() {
    let l = TcpListener::bind(("0.0.0.0", PORT)).expect("bind");
    for s in l.incoming() {
        drop(s);
    }
}

fn client() {
    let addr = SocketAddr::from((SERVER.parse::<IpAddr>().expect("ip"), PORT));
    let end = Instant::now() + ROUND;
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut buf = [0u8; 16];
    while Instant::now() < end {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let _ = s.read(&mut buf);
                ok += 1;
            }
            Err(_) => failed += 1,
        }
    }
    println!("{ok} {failed}");
}

fn sh(ns: &Netns, cmd: &str) {
    ns.sh(cmd).unwrap_or_else(|e| panic!("{cmd}: {e}"));
}

/// Two real pods and 100 namespaces with one (interface-only) local pod each.
fn cluster_state(policies: usize) -> ClusterState {
    let mut nss = vec![mk_ns("x", &[("team", "x")])];
    let mut pods = vec![
        mk_pod("x", "client", &[("app", "client")], CLIENT, "n1"),
        with_ports(
            mk_pod("x", "server", &[("app", "server")], SERVER, "n1"),
            &[("http", i32::from(PORT), "TCP")],
        ),
    ];
    for t in 0..100 {
        nss.push(mk_ns(&format!("t{t}"), &[("team", &format!("t{t}"))]));
        pods.push(mk_pod(
            &format!("t{t}"),
            "p",
            &[("tier", "web"), ("app", &format!("app{}", t % 7))],
            &format!("10.40.1.{}", t + 2),
            "n1",
        ));
    }
    let mut pols = Vec::new();
    if policies > 0 {
        pols.push(mk_policy(
            "x",
            "server-from-client",
            json!({"podSelector": {"matchLabels": {"app": "server"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                "ports": [{"port": "http"}]}]}),
        ));
        pols.push(mk_policy(
            "x",
            "client-to-server",
            json!({"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "server"}}}]}]}),
        ));
        for i in 0..9 {
            pols.push(mk_policy(
                "x",
                &format!("server-from-t{i}"),
                json!({"podSelector": {"matchLabels": {"app": "server"}},
                       "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{i}")}}}],
                                    "ports": [{"port": 9000 + i, "endPort": 9100 + i}]}]}),
            ));
        }
    }
    for i in 0..policies.saturating_sub(11) {
        let ns = format!("t{}", i % 100);
        let spec = match i % 4 {
            0 => json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
            1 => json!({"podSelector": {"matchLabels": {"tier": "web"}},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", i % 10)}}}],
                                     "ports": [{"port": 80}, {"port": 443}]}]}),
            2 => {
                json!({"podSelector": {"matchLabels": {"app": format!("app{}", i % 7)}}, "policyTypes": ["Egress"],
                        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("10.{}.0.0/16", i % 200)]}}],
                                    "ports": [{"protocol": "UDP", "port": 53}]}]})
            }
            _ => json!({"podSelector": {"matchLabels": {"tier": "web"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("app{}", i % 7)}}}],
                                     "ports": [{"port": 8000, "endPort": 8100}]}]}),
        };
        pols.push(mk_policy(&ns, &format!("pol-{i}"), spec));
    }
    cluster(vec![mk_node("n1", "10.40.0.0/16")], nss, pods, pols)
}

fn config(family: Family) -> NodeConfig {
    let mut cfg = NodeConfig::new("n1");
    cfg.family = family;
    cfg.anti_spoofing = true;
    cfg.revoke_denied_connections = true;
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    cfg.pod_interfaces
        .insert(ip(CLIENT), PodInterface::Routed("vc0".into()));
    cfg.pod_interfaces
        .insert(ip(SERVER), PodInterface::Routed("vs0".into()));
    for t in 0..100 {
        cfg.pod_interfaces.insert(
            ip(&format!("10.40.1.{}", t + 2)),
            PodInterface::Routed(format!("vf{t}")),
        );
    }
    cfg
}

fn spawn_in(ns: &Netns, role: &str) -> std::process::Child {
    Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(std::env::current_exe().expect("own path"))
        .env(ROLE, role)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("server") => return server(),
        Ok("client") => return client(),
        _ => {}
    }
    // Anti-spoofing rules per local pod (no kernel needed).
    println!("## Anti-spoofing rules per local pod\n");
    println!("| family | local pods | PALISADE-ANTISPOOF rules | per pod |");
    println!("|---|---:|---:|---:|");
    for family in [Family::V4, Family::V6] {
        let mut st = cluster_state(0);
        let mut cfg = config(family);
        if family == Family::V6 {
            // The same pods with IPv6 addresses.
            st = ClusterState {
                pods: st
                    .pods
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let ns = p.metadata.namespace.clone().unwrap_or_default();
                        let name = p.metadata.name.clone().unwrap_or_default();
                        std::sync::Arc::new(mk_pod(
                            &ns,
                            &name,
                            &[],
                            &format!("fd40::{:x}", i + 2),
                            "n1",
                        ))
                    })
                    .collect(),
                nodes: vec![std::sync::Arc::new(mk_node("n1", "fd40::/64"))],
                ..st
            };
            cfg.pod_interfaces = (0..st.pods.len())
                .map(|i| {
                    (
                        format!("fd40::{:x}", i + 2).parse().expect("ip"),
                        PodInterface::Routed(format!("vf{i}")),
                    )
                })
                .collect();
        }
        let c = compile(&st, &cfg);
        let rules = c
            .chain(names::ANTISPOOF_CHAIN)
            .map_or(0, |ch| ch.rules.len());
        let pods = st.pods.len();
        println!(
            "| {family:?} | {pods} | {rules} | {:.2} |",
            rules as f64 / pods as f64
        );
    }
    println!(
        "\n(IPv6 adds 9 fixed rules for DAD and link-local neighbour discovery / MLD, whatever the pod count.)\n"
    );

    if !is_root() {
        println!("connection rate: skipped (needs root)");
        return;
    }
    let node = Netns::create("pal-cr-n").expect("netns");
    sh(&node, "ip link set lo up; sysctl -qw net.ipv4.ip_forward=1");
    let mut pods = Vec::new();
    for (host, ip) in [("vc0", CLIENT), ("vs0", SERVER)] {
        let pod = Netns::create("pal-cr-p").expect("netns");
        sh(
            &node,
            &format!(
                "ip link add {host} type veth peer name eth0 netns {}; ip link set {host} up; \
                 ip addr add 10.40.0.1/32 dev {host}; ip route add {ip}/32 dev {host}",
                pod.name()
            ),
        );
        sh(
            &pod,
            &format!(
                "ip link set lo up; ip addr add {ip}/32 dev eth0; ip link set eth0 up; \
                 ip route add 10.40.0.1/32 dev eth0; ip route add default via 10.40.0.1; \
                 sysctl -qw net.ipv4.tcp_tw_reuse=1"
            ),
        );
        pods.push(pod);
    }
    let mut server = spawn_in(&pods[1], "server");
    std::thread::sleep(Duration::from_millis(300));

    let exec = KernelExecutor::detect_in_netns(node.name(), "auto").expect("executor");
    let cfg = config(Family::V4);
    let antispoof_only = render(&compile(&cluster_state(0), &cfg));
    let full = render(&compile(&cluster_state(1000), &cfg));
    let configs: [(&str, Option<&palisade_netpol::Payload>); 3] = [
        ("none (no Palisade rule traversed)", None),
        (
            "anti-spoofing + revocation, 0 policies",
            Some(&antispoof_only),
        ),
        ("anti-spoofing + revocation, 1,000 policies", Some(&full)),
    ];
    let rounds: usize = std::env::var("CONNRATE_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(ROUNDS);
    let mut rates: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut failures = 0u64;
    for _ in 0..rounds {
        for (i, (_, payload)) in configs.iter().enumerate() {
            match payload {
                Some(p) => {
                    exec.apply(p).expect("apply");
                }
                None => {
                    let _ = node.sh("iptables -D FORWARD -j PALISADE-FORWARD 2>/dev/null; \
                         iptables -D INPUT -j PALISADE-INPUT 2>/dev/null; true");
                }
            }
            let out = spawn_in(&pods[0], "client")
                .wait_with_output()
                .expect("client");
            let text = String::from_utf8_lossy(&out.stdout);
            let mut w = text.split_whitespace();
            let ok: f64 = w.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
            failures += w.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            rates.entry(i).or_default().push(ok / ROUND.as_secs_f64());
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    let base = median(rates[&0].clone());
    println!("## New TCP connections/s (median of {rounds} alternating rounds of {ROUND:?})\n");
    println!("| configuration | rules | connections/s | relative |");
    println!("|---|---:|---:|---:|");
    for (i, (name, payload)) in configs.iter().enumerate() {
        let r = median(rates[&i].clone());
        let rules = payload.map_or(0, |p| p.stats.rules);
        let all: Vec<String> = rates[&i].iter().map(|x| format!("{x:.0}")).collect();
        println!(
            "| {name} | {rules} | {r:.0} ({}) | {:.1}% |",
            all.join(", "),
            100.0 * r / base
        );
    }
    println!("\nfailed connects: {failures}");
    drop(pods);
    drop(node);
}
