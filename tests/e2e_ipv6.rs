//! End to end, IPv6: real agents in a lab cluster whose nodes and pods are made dual-stack
//! (IPv6 pod CIDRs on the Nodes, IPv6 addresses on the pods, routed like the IPv4 ones). The
//! agents notice the family by themselves and enforce the same policies over `ip6tables`; TCP
//! over IPv6 between pods on two nodes follows the policy, including an egress-isolated pod
//! that must still resolve its gateway by neighbour discovery (every neighbour cache is
//! flushed after the policies are in force).
//!
//! Lab only (needs root). Needs `cargo build -p palisade` first (or `PALISADE_BIN`).

use std::io::ErrorKind;
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use palisade_e2e::api::Kind;
use palisade_e2e::cluster::Cluster;
use palisade_e2e::k8s::{self, network_policy as np};
use palisade_e2e::lab_cluster::{LabCluster, LabClusterSpec};
use palisade_e2e::netns;
use serde_json::json;

const PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;

fn v6_cidr(node: usize) -> String {
    format!("fd00:10:{node}::/64")
}

fn v6_lan(node: usize) -> Ipv6Addr {
    format!("fd00:51:100::{}", 10 + node)
        .parse()
        .expect("address")
}

/// IPv6 TCP listeners inside a pod's namespace, accepting until dropped.
struct Listeners {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Listeners {
    fn start(netns_name: &str, ports: &[u16]) -> Result<Listeners> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &port in ports {
            let (tx, rx) = std::sync::mpsc::channel();
            let name = netns_name.to_string();
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let bound = netns::enter(&name).and_then(|()| {
                    let l = TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                });
                let listener = match bound {
                    Ok(l) => {
                        let _ = tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => drop(conn),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
            rx.recv_timeout(Duration::from_secs(5))
                .context("listener thread did not start")??;
        }
        Ok(Listeners { stop, threads })
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP connect over IPv6 from inside `netns_name` (700 ms timeout).
fn connects(netns_name: &str, to: Ipv6Addr, port: u16) -> bool {
    netns::run_in(netns_name, move || {
        Ok(
            TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_millis(700))
                .is_ok(),
        )
    })
    .unwrap_or(false)
}

/// Waits (bounded) until every expectation holds; returns the ones still wrong.
fn converge(expect: &[(&str, &str, Ipv6Addr, u16, bool)], timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let wrong: Vec<String> = expect
            .iter()
            .filter(|(_, from, to, port, want)| connects(from, *to, *port) != *want)
            .map(|(what, _, to, port, want)| {
                format!(
                    "{what} ([{to}]:{port} should {})",
                    if *want { "connect" } else { "be blocked" }
                )
            })
            .collect();
        if wrong.is_empty() || Instant::now() >= deadline {
            return wrong;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn dual_stack(c: &mut LabCluster) -> Result<()> {
    let api = c.control_plane().api();
    let node_kind = Kind::of("v1", "Node");
    let nodes = c.nodes().to_vec();
    for n in &nodes {
        api.merge_patch(
            &node_kind,
            None,
            &n.name,
            &json!({"spec": {"podCIDRs": [n.pod_cidr_text(), v6_cidr(n.index)]}}),
            false,
        )
        .with_context(|| format!("IPv6 pod CIDR on {}", n.name))?;
        netns::write_sysctl(&n.netns, "net/ipv6/conf/all/forwarding", "1")?;
        netns::write_sysctl(&n.netns, "net/ipv6/conf/all/accept_dad", "0")?;
        netns::write_sysctl(&n.netns, "net/ipv6/conf/default/accept_dad", "0")?;
        netns::ip_batch(
            &n.netns,
            &[format!("addr add {}/64 dev eth0 nodad", v6_lan(n.index))],
        )?;
    }
    for n in &nodes {
        let routes: Vec<String> = nodes
            .iter()
            .filter(|o| o.index != n.index)
            .map(|o| {
                format!(
                    "route add {} via {} dev eth0",
                    v6_cidr(o.index),
                    v6_lan(o.index)
                )
            })
            .collect();
        netns::ip_batch(&n.netns, &routes)?;
    }
    Ok(())
}

/// Gives the pod an IPv6 address next to its IPv4 one (routed from its node like the IPv4
/// one, gateway fe80::1 on the node's side of the veth, resolved by neighbour discovery) and
/// writes both into the Pod's status.
fn add_v6(c: &mut LabCluster, ns: &str, name: &str) -> Result<Ipv6Addr> {
    let (pod_netns, v4, node) = {
        let lab = c.lab();
        let p = lab.pod(ns, name)?;
        (p.netns.clone(), p.ip, p.node)
    };
    let node_netns = c.nodes()[node - 1].netns.clone();
    let v6: Ipv6Addr = format!("fd00:10:{node}::{}", v4.octets()[3])
        .parse()
        .context("pod address")?;
    // The node's veth towards the pod: the device of its route to the pod's IPv4 address.
    let route = netns::ip_in(&node_netns, &["route", "get", &v4.to_string()])?;
    let dev = route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .context("no device in the node's route to the pod")?
        .to_string();
    netns::write_sysctl(&pod_netns, "net/ipv6/conf/all/accept_dad", "0")?;
    netns::write_sysctl(&pod_netns, "net/ipv6/conf/eth0/accept_dad", "0")?;
    netns::ip_batch(
        &node_netns,
        &[
            format!("addr replace fe80::1/64 dev {dev} nodad"),
            format!("route replace {v6}/128 dev {dev}"),
        ],
    )?;
    netns::ip_batch(
        &pod_netns,
        &[
            format!("addr add {v6}/128 dev eth0 nodad"),
            "route add ::/0 via fe80::1 dev eth0".to_string(),
        ],
    )?;
    c.control_plane().api().merge_patch(
        &Kind::of("v1", "Pod"),
        Some(ns),
        name,
        &json!({"status": {"podIPs": [{"ip": v4.to_string()}, {"ip": v6.to_string()}]}}),
        true,
    )?;
    Ok(v6)
}

fn flush_neighbours(c: &LabCluster, pods: &[String]) -> Result<()> {
    for n in c.nodes() {
        netns::ip_in(&n.netns, &["-6", "neigh", "flush", "all"])?;
    }
    for p in pods {
        netns::ip_in(p, &["-6", "neigh", "flush", "all"])?;
    }
    Ok(())
}

fn scenario(c: &mut LabCluster) -> Result<()> {
    dual_stack(c)?;
    for ns in ["x", "y"] {
        c.apply(&k8s::namespace(ns, &k8s::labels([("ns", ns)])))?;
    }
    // x/client and x/server on node1, x/far on node2, y/other on node2.
    let pods = [
        ("x", "client", "node1"),
        ("x", "server", "node1"),
        ("x", "far", "node2"),
        ("y", "other", "node2"),
    ];
    for (ns, name, node) in pods {
        c.apply(&c.pod_manifest(ns, name, &k8s::labels([("app", name)]), node))?;
    }
    let ids: Vec<String> = pods.iter().map(|(ns, n, _)| format!("{ns}/{n}")).collect();
    c.wait_pods_ready(&ids, Duration::from_secs(30))?;
    let mut v6 = std::collections::BTreeMap::new();
    let mut netns_of = std::collections::BTreeMap::new();
    let mut listeners = Vec::new();
    for (ns, name, _) in pods {
        v6.insert(name, add_v6(c, ns, name)?);
        let pod_netns = c.lab().pod(ns, name)?.netns.clone();
        listeners.push(Listeners::start(&pod_netns, &[PORT, OTHER_PORT])?);
        netns_of.insert(name, pod_netns);
    }
    let at = |n: &str| netns_of[n].as_str();

    // No policy yet: IPv6 flows everywhere (also across nodes).
    let open = [
        ("client → far", at("client"), v6["far"], PORT, true),
        ("other → server", at("other"), v6["server"], PORT, true),
        ("far → client", at("far"), v6["client"], OTHER_PORT, true),
    ];
    let wrong = converge(&open, Duration::from_secs(15));
    if !wrong.is_empty() {
        bail!("IPv6 before any policy: {wrong:?}");
    }

    // x/server: ingress only from x/client on PORT. x/client: egress only to x/server.
    c.apply(&np(
        "x",
        "server",
        json!({"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": PORT}]}
        ]}),
    ))?;
    c.apply(&np(
        "x",
        "client",
        json!({"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "server"}}}]}]}),
    ))?;
    let enforced = [
        (
            "other → server:PORT (not the client)",
            at("other"),
            v6["server"],
            PORT,
            false,
        ),
        (
            "far → server:PORT (not the client)",
            at("far"),
            v6["server"],
            PORT,
            false,
        ),
        (
            "client → far (egress only to the server)",
            at("client"),
            v6["far"],
            PORT,
            false,
        ),
        (
            "far → client (client not ingress-isolated)",
            at("far"),
            v6["client"],
            OTHER_PORT,
            true,
        ),
        (
            "other → far (not isolated)",
            at("other"),
            v6["far"],
            PORT,
            true,
        ),
    ];
    let wrong = converge(&enforced, Duration::from_secs(15));
    if !wrong.is_empty() {
        bail!("IPv6 under the policies: {wrong:?}");
    }
    // The allowed path, after every neighbour cache is emptied: the egress-isolated client
    // must resolve its gateway again (its Neighbor Solicitation, from its own address, meets
    // the node's INPUT chain).
    let pod_netns: Vec<String> = netns_of.values().cloned().collect();
    flush_neighbours(c, &pod_netns)?;
    let allowed = [
        (
            "client → server:PORT",
            at("client"),
            v6["server"],
            PORT,
            true,
        ),
        (
            "client → server:OTHER_PORT (port not allowed)",
            at("client"),
            v6["server"],
            OTHER_PORT,
            false,
        ),
    ];
    let wrong = converge(&allowed, Duration::from_secs(10));
    if !wrong.is_empty() {
        bail!("IPv6 allowed path after a neighbour flush: {wrong:?}");
    }
    // The agents say so.
    for n in c.nodes().to_vec() {
        let log = c.agent_log(&n.name);
        if !log.contains("V6") || !log.contains("address family starts") {
            bail!("agent on {} did not start IPv6 enforcement:\n{log}", n.name);
        }
    }
    drop(listeners);
    Ok(())
}

#[test]
fn e2e_ipv6_policies_are_enforced_by_the_agents() {
    let test = "e2e_ipv6_policies_are_enforced_by_the_agents";
    if !palisade_e2e::lab_ready(test) {
        return;
    }
    let started = Instant::now();
    let mut c = LabCluster::start(LabClusterSpec::new(2)).expect("lab cluster");
    let result = scenario(&mut c);
    if let Err(e) = &result {
        let logs: Vec<String> = c
            .nodes()
            .to_vec()
            .iter()
            .map(|n| c.agent_log(&n.name))
            .collect();
        panic!("{e:#}\n{}", logs.join("\n"));
    }
    println!("{test}: {:.1} s", started.elapsed().as_secs_f64());
}
