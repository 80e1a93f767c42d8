//! New-TCP-connection rate between two lab pods on one node, with no NetworkPolicy at all and
//! with 1,000 policies programmed on that node (both pods isolated, the flow allowed), to show
//! what Palisade's rules cost on the data path. Only a connection's first packet traverses our
//! chains (replies and later packets are ESTABLISHED), so connection setup is the worst case.
//!
//! Run (root; builds network namespaces, touches nothing else):
//!   cargo build --release -p palisade
//!   PALISADE_BIN=target/release/palisade cargo run --release -p palisade-tests --example conn_rate_bench
//!
//! Each configuration is measured in several alternating rounds of `ROUND` seconds; the table
//! shows the median rate. The client connects, the server accepts and closes at once, the
//! client reads the EOF and closes (so TIME_WAIT stays on the server side and the client never
//! runs out of ports).
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use palisade_e2e::k8s::{self, NamedPort, PodSpec};
use palisade_e2e::netpol::{palisade_bin, run_apply};
use palisade_e2e::server::Protocol;
use palisade_e2e::{netns, Lab, LabSpec};
use serde_json::{json, Value};

const PORT: u16 = 8080;
const ROUND: Duration = Duration::from_secs(2);
const ROUNDS: usize = 5;
const POLICIES: usize = 1000;
const NAMESPACES: usize = 100;
/// ClusterNetworkPolicies added in the third configuration (half Admin, half Baseline).
const CLUSTER_POLICIES: usize = 200;

fn main() -> Result<()> {
    if !palisade_tests::is_root() {
        println!("skipped: conn_rate_bench needs root (network namespaces)");
        return Ok(());
    }
    let bin = palisade_bin()?;
    let mut lab = Lab::new(LabSpec {
        nodes: 1,
        ports: vec![PORT],
        client: false,
        serve_pods: false,
    })?;
    let client = lab.add_pod(1, "x", "client", None)?;
    let server = lab.add_pod(1, "x", "server", None)?;
    let node = lab.node(1)?.clone();

    // Server: accept and close, until stopped.
    let stop = Arc::new(AtomicBool::new(false));
    let server_thread = {
        let stop = stop.clone();
        let ns = server.netns.clone();
        std::thread::spawn(move || -> Result<()> {
            netns::enter(&ns)?;
            let listener = TcpListener::bind(("0.0.0.0", PORT))?;
            listener.set_nonblocking(true)?;
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => drop(s),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_micros(200))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })
    };

    let ports = vec![NamedPort {
        name: "http".into(),
        port: PORT,
        protocol: Protocol::Tcp,
    }];
    let base = base_objects(&node, client.ip, server.ip, &ports);
    let with_policies = {
        let mut v = base.clone();
        v.extend(policies(POLICIES));
        v
    };
    let with_cnps = {
        let mut v = with_policies.clone();
        v.extend(cluster_policies(CLUSTER_POLICIES));
        v
    };
    let dir_none = lab.tmp_dir().join("none");
    let dir_many = lab.tmp_dir().join("many");
    let dir_cnp = lab.tmp_dir().join("cnp");
    k8s::write_manifests(&dir_none, &base)?;
    k8s::write_manifests(&dir_many, &with_policies)?;
    k8s::write_manifests(&dir_cnp, &with_cnps)?;

    let target = SocketAddr::from((server.ip, PORT));
    let mut none = Vec::new();
    let mut many = Vec::new();
    let mut cnp = Vec::new();
    let mut stats = String::new();
    let mut cnp_stats = String::new();
    for round in 0..ROUNDS {
        run_apply(&lab, &bin, &node.netns, &dir_none, &node.name, "apply-none")?;
        none.push(measure(&client.netns, target)?);
        let out = run_apply(&lab, &bin, &node.netns, &dir_many, &node.name, "apply-many")?;
        if round == 0 {
            stats = out.lines().last().unwrap_or_default().to_string();
        }
        many.push(measure(&client.netns, target)?);
        let out = run_apply(&lab, &bin, &node.netns, &dir_cnp, &node.name, "apply-cnp")?;
        if round == 0 {
            cnp_stats = out.lines().last().unwrap_or_default().to_string();
        }
        cnp.push(measure(&client.netns, target)?);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = server_thread.join();

    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (m0, m1, m2) = (med(&mut none), med(&mut many), med(&mut cnp));
    println!("new TCP connections per second, pod → pod on one node ({ROUNDS} rounds of {ROUND:?}, median)");
    println!("| policies on the node | connections/s | relative |");
    println!("|---:|---:|---:|");
    println!("| 0 | {m0:.0} | 100% |");
    println!("| {POLICIES} | {m1:.0} | {:.1}% |", 100.0 * m1 / m0);
    println!(
        "| {POLICIES} + {CLUSTER_POLICIES} ClusterNetworkPolicies | {m2:.0} | {:.1}% |",
        100.0 * m2 / m0
    );
    println!("rules with {POLICIES} policies: {stats}");
    println!("rules with {POLICIES} policies + {CLUSTER_POLICIES} CNPs: {cnp_stats}");
    println!("all rounds: none {none:.0?}, {POLICIES} policies {many:.0?}, with CNPs {cnp:.0?}");
    Ok(())
}

/// Connections completed per second from `ns` to `target` during one round.
fn measure(ns: &str, target: SocketAddr) -> Result<f64> {
    netns::run_in(ns, || {
        let start = Instant::now();
        let mut ok = 0u64;
        let mut failed = 0u64;
        let mut buf = [0u8; 1];
        while start.elapsed() < ROUND {
            match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                Ok(mut s) => {
                    s.set_read_timeout(Some(Duration::from_secs(1)))?;
                    let _ = s.read(&mut buf);
                    ok += 1;
                }
                Err(_) => failed += 1,
            }
        }
        anyhow::ensure!(
            failed == 0,
            "{failed} connections failed (policy or lab problem)"
        );
        Ok(ok as f64 / start.elapsed().as_secs_f64())
    })
    .context("measuring")
}

/// Node, namespaces and pods: the two real pods plus 10 data-only local pods per namespace
/// group (known to the compiler, so they get their own dispatch rules).
fn base_objects(
    node: &palisade_e2e::NodeHandle,
    client_ip: Ipv4Addr,
    server_ip: Ipv4Addr,
    ports: &[NamedPort],
) -> Vec<Value> {
    let mut v = vec![k8s::node(node)];
    v.push(k8s::namespace("x", &k8s::labels([("team", "x")])));
    for (name, ip) in [("client", client_ip), ("server", server_ip)] {
        let labels = k8s::labels([("app", name)]);
        v.push(k8s::pod(&PodSpec {
            namespace: "x",
            name,
            labels: &labels,
            node_name: &node.name,
            host_ip: node.ip,
            pod_ip: ip,
            ports,
        }));
    }
    for n in 0..NAMESPACES {
        let ns = format!("ns{n}");
        v.push(k8s::namespace(
            &ns,
            &k8s::labels([("team", format!("t{}", n % 10))]),
        ));
        // One local pod per namespace (100 local pods + the 2 real ones ≈ the benchmark node).
        let labels = k8s::labels([
            ("app", format!("app{}", n % 7)),
            ("tier", "web".to_string()),
        ]);
        let name = format!("p{n}");
        v.push(k8s::pod(&PodSpec {
            namespace: &ns,
            name: &name,
            labels: &labels,
            node_name: &node.name,
            host_ip: node.ip,
            pod_ip: Ipv4Addr::new(10, 244, 1, 100 + n as u8),
            ports,
        }));
    }
    v
}

/// `count` policies of realistic variety: most in the 100 other namespaces, plus 10 that
/// isolate the server (one allows the client on the named port) and one egress policy on the
/// client allowing the server.
fn policies(count: usize) -> Vec<Value> {
    let mut v = vec![
        k8s::network_policy(
            "x",
            "server-from-client",
            json!({"podSelector": {"matchLabels": {"app": "server"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                "ports": [{"port": "http"}]}]}),
        ),
        k8s::network_policy(
            "x",
            "client-to-server",
            json!({"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "server"}}}],
                               "ports": [{"port": PORT}]}]}),
        ),
    ];
    for i in 0..9 {
        v.push(k8s::network_policy(
            "x",
            &format!("server-extra-{i}"),
            json!({"podSelector": {"matchLabels": {"app": "server"}},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{i}")}}}],
                                "ports": [{"port": 9000 + i, "endPort": 9010 + i}]}]}),
        ));
    }
    let mut i = 0;
    while v.len() < count {
        let ns = format!("ns{}", i % NAMESPACES);
        let spec = match i % 5 {
            0 => json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
            1 => json!({"podSelector": {"matchLabels": {"tier": "web"}},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", i % 10)}}}],
                                     "ports": [{"port": "http"}]}]}),
            2 => {
                json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": [format!("app{}", i % 7)]}]},
                        "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("10.{}.0.0/16", i % 200)]}}]}]})
            }
            3 => {
                json!({"podSelector": {"matchLabels": {"app": format!("app{}", i % 7)}}, "policyTypes": ["Egress"],
                        "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"tier": "web"}}}],
                                    "ports": [{"port": 443}, {"port": 5432, "protocol": "TCP"}]}]})
            }
            _ => json!({"podSelector": {"matchLabels": {"tier": "web"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("app{}", i % 7)}}}],
                                     "ports": [{"port": 8000 + (i % 100) as u16, "endPort": 8100 + (i % 100) as u16}]}]}),
        };
        v.push(k8s::network_policy(&ns, &format!("pol-{i}"), spec));
        i += 1;
    }
    v
}

/// `count` ClusterNetworkPolicies whose subjects include both real pods (every namespace), so
/// a new connection's first packet walks every one of their chains in both directions
/// without matching (the flow is decided by the NetworkPolicies): half Admin (Deny from
/// other teams on high ports, egress Deny to documentation networks), half Baseline (Deny
/// from other teams on other ports).
fn cluster_policies(count: usize) -> Vec<Value> {
    (0..count)
        .map(|i| {
            let team = format!("t{}", i % 10);
            let spec = if i % 2 == 0 {
                json!({"tier": "Admin", "priority": i / 2,
                       "subject": {"namespaces": {}},
                       "ingress": [{"action": "Deny", "from": [{"namespaces": {"matchLabels": {"team": team}}}],
                                    "protocols": [{"tcp": {"destinationPort": {"range": {"start": 9000 + i, "end": 9100 + i}}}}]}],
                       "egress": [{"action": "Deny", "to": [{"networks": [format!("203.0.113.{}/32", i % 256)]}]}]})
            } else {
                json!({"tier": "Baseline", "priority": i / 2,
                       "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}}},
                       "ingress": [{"action": "Deny", "from": [{"pods": {"namespaceSelector": {"matchLabels": {"team": team}}, "podSelector": {}}}],
                                    "protocols": [{"udp": {"destinationPort": {"number": 5000 + i}}}]}]})
            };
            json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
                   "metadata": {"name": format!("cnp-{i:03}")}, "spec": spec})
        })
        .collect()
}
