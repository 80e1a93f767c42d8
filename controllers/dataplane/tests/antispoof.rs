//! Anti-spoofing against the real kernel, in fresh network namespaces (root only; skipped
//! otherwise): interfaces resolved by [`KernelLinks`], rules applied by [`KernelExecutor`],
//! real datagrams with forged source addresses.
//!
//! ```text
//!  node netns:  routed layout: veth per pod, /32 route per pod (10.9.2.0/24)
//!               bridged layout: bridge cni0 10.9.1.1/24, pods on ports, br_netfilter on
//!  pods x/a, y/b, z/a in their own netns; namespace x accepts ingress only from y.
//!  z/a adds y/b's address (or the node's) to its own interface and sends from it.
//! ```

use std::process::{Command, Stdio};
use std::time::Duration;

use palisade_dataplane::netns::{lab_skip_reason, Netns};
use palisade_dataplane::{pod_interfaces, Executor, KernelExecutor, KernelLinks};
use palisade_netpol::builders::*;
use palisade_netpol::{compile, local_pod_ips, reasons, render, ClusterState, Family, NodeConfig};
use serde_json::json;

fn skip_reason() -> Option<String> {
    lab_skip_reason(&["ip", "bridge", "ipset", "iptables", "python3"])
}

struct Lab {
    node: Netns,
    pods: Vec<(&'static str, &'static str, Netns)>,
    node_ip: &'static str,
}

const PODS: [(&str, &str, u8); 3] = [("x", "a", 10), ("y", "b", 20), ("z", "a", 30)];

fn sh(ns: &Netns, cmd: &str) {
    ns.exec("sh", &["-c", cmd])
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
}

/// Builds the node and its three pods. `bridged`: pods on cni0 (10.9.1.0/24); otherwise one
/// veth and /32 route per pod (10.9.2.0/24).
fn lab(bridged: bool) -> Lab {
    let node = Netns::create("pal-spoof-n").expect("netns");
    let net = if bridged { 1 } else { 2 };
    let node_ip = if bridged { "10.9.1.1" } else { "10.9.2.1" };
    if bridged {
        sh(
            &node,
            "ip link set lo up; ip link add cni0 type bridge; ip addr add 10.9.1.1/24 dev cni0; \
             ip link set cni0 up; sysctl -qw net.bridge.bridge-nf-call-iptables=1",
        );
    } else {
        sh(&node, "ip link set lo up; sysctl -qw net.ipv4.ip_forward=1");
    }
    let mut pods = Vec::new();
    for (i, (ns, name, last)) in PODS.iter().enumerate() {
        let pod = Netns::create("pal-spoof-p").expect("netns");
        let host = format!("vp{i}");
        let ip = format!("10.9.{net}.{last}");
        sh(
            &node,
            &format!(
                "ip link add {host} type veth peer name eth0 netns {}; ip link set {host} up",
                pod.name()
            ),
        );
        if bridged {
            sh(&node, &format!("ip link set {host} master cni0"));
            sh(
                &pod,
                &format!(
                    "ip link set lo up; ip addr add {ip}/24 dev eth0; ip link set eth0 up; \
                     ip route add default via 10.9.1.1"
                ),
            );
        } else {
            sh(
                &node,
                &format!("ip addr add 10.9.2.1/32 dev {host}; ip route add {ip}/32 dev {host}"),
            );
            sh(
                &pod,
                &format!(
                    "ip link set lo up; ip addr add {ip}/32 dev eth0; ip link set eth0 up; \
                     ip route add 10.9.2.1/32 dev eth0; ip route add default via 10.9.2.1"
                ),
            );
        }
        pods.push((*ns, *name, pod));
    }
    // Let every pod talk once so the node learns neighbours and the bridge its FDB.
    for (_, _, pod) in &pods {
        let _ = pod.exec(
            "python3",
            &[
                "-c",
                &format!(
                    "import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.sendto(b'hi',('{node_ip}',9))"
                ),
            ],
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    Lab {
        node,
        pods,
        node_ip,
    }
}

fn state(bridged: bool) -> ClusterState {
    let net = if bridged { 1 } else { 2 };
    cluster(
        vec![mk_node("n1", &format!("10.9.{net}.0/24"))],
        vec![
            mk_ns("x", &[("ns", "x")]),
            mk_ns("y", &[("ns", "y")]),
            mk_ns("z", &[("ns", "z")]),
        ],
        PODS.iter()
            .map(|(ns, name, last)| mk_pod(ns, name, &[], &format!("10.9.{net}.{last}"), "n1"))
            .collect(),
        vec![mk_policy(
            "x",
            "from-y",
            json!({"podSelector": {}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        )],
    )
}

/// Sends 3 UDP datagrams from pod `from` (source `src`, added to its interface when it is not
/// its own) to x/a port 9000; returns how many x/a received.
fn udp_delivered(lab: &Lab, from: usize, src: &str, own: &str) -> usize {
    let x = &lab.pods[0].2;
    let sender = &lab.pods[from].2;
    let server = Command::new("ip")
        .args(["netns", "exec", x.name(), "python3", "-c"])
        .arg(
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
             s.bind(('0.0.0.0',9000))\ns.settimeout(1.0)\nn=0\n\
             try:\n  while True:\n    s.recvfrom(100); n+=1\nexcept Exception: pass\nprint(n)",
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("server");
    std::thread::sleep(Duration::from_millis(300));
    if src != own {
        sh(
            sender,
            &format!("ip addr add {src}/32 dev eth0 nodad 2>/dev/null || true"),
        );
    }
    let dst = format!("10.9.{}.10", if lab.node_ip == "10.9.1.1" { 1 } else { 2 });
    let _ = sender.exec(
        "python3",
        &[
            "-c",
            &format!(
                "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                 s.bind(('{src}',0))\nfor i in range(3): s.sendto(b'x',('{dst}',9000))"
            ),
        ],
    );
    if src != own {
        sh(
            sender,
            &format!("ip addr del {src}/32 dev eth0 2>/dev/null || true"),
        );
    }
    let out = server.wait_with_output().expect("server output");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn run_layout(bridged: bool) {
    let lab = lab(bridged);
    let st = state(bridged);
    let links = KernelLinks::in_netns(lab.node.name()).expect("ip/bridge");
    let ips = local_pod_ips(&st, "n1", Family::V4);
    let found = pod_interfaces(&links, &ips).expect("dump");
    assert_eq!(found.len(), 3, "bridged={bridged}: {found:?}");
    for (i, ip) in ips.iter().enumerate() {
        let want = format!("vp{i}");
        assert_eq!(found[ip].name(), want, "bridged={bridged}");
        assert_eq!(
            matches!(found[ip], palisade_netpol::PodInterface::BridgePort(_)),
            bridged
        );
    }
    let exec = KernelExecutor::detect_in_netns(lab.node.name(), "auto").expect("executor");
    let (yb, zb) = (ips[1].to_string(), ips[2].to_string());

    // Without anti-spoofing the forgery works (what the issue reported): the test can fail.
    let mut cfg = NodeConfig::new("n1");
    exec.apply(&render(&compile(&st, &cfg))).expect("apply");
    assert_eq!(
        udp_delivered(&lab, 1, &yb, &yb),
        3,
        "y/b legit, bridged={bridged}"
    );
    assert_eq!(
        udp_delivered(&lab, 2, &zb, &zb),
        0,
        "z/a denied, bridged={bridged}"
    );
    assert_eq!(
        udp_delivered(&lab, 2, &yb, &zb),
        3,
        "forgery passes without anti-spoofing"
    );

    cfg.anti_spoofing = true;
    cfg.pod_interfaces = found;
    let c = compile(&st, &cfg);
    assert!(!c
        .diagnostics
        .iter()
        .any(|d| d.reason == reasons::POD_INTERFACE_UNKNOWN));
    exec.apply(&render(&c)).expect("apply with anti-spoofing");
    assert_eq!(
        udp_delivered(&lab, 1, &yb, &yb),
        3,
        "y/b legit, bridged={bridged}"
    );
    assert_eq!(
        udp_delivered(&lab, 2, &yb, &zb),
        0,
        "forged y/b, bridged={bridged}"
    );
    assert_eq!(
        udp_delivered(&lab, 2, lab.node_ip, &zb),
        0,
        "forged node address, bridged={bridged}"
    );
    drop(lab);
}

#[test]
fn forged_udp_is_dropped_routed_layout() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    run_layout(false);
}

#[test]
fn forged_udp_is_dropped_bridged_layout() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    run_layout(true);
}
