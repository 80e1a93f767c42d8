//! Revocation of denied connections against the real kernel (root only; skipped otherwise):
//! long-lived TCP and UDP flows between pods in network namespaces, a policy change that
//! denies some of them, [`revoke_denied`] deleting their conntrack entries.
//!
//! ```text
//!  node netns, one of four layouts:
//!    routed  IPv4 10.9.3.0/24  veth + /32 route per pod, gateway 10.9.3.1 on every veth
//!    routed  IPv6 fd93::/64    veth + /128 route per pod, gateway fd93::1
//!    bridged IPv4 10.9.4.0/24  pods on bridge cni0 (10.9.4.1), br_netfilter on (per netns)
//!    bridged IPv6 fd94::/64    pods on bridge cni0 (fd94::1), bridge-nf-call-ip6tables on
//!    x/a .10  server: TCP 8000 (counts bytes in), UDP 9000 (echo), TCP 8001 (pushes)
//!    y/b .20  client of all three — stays allowed
//!    z/c .30  client of all three — denied by the second policy
//!  v1: x accepts ingress from every namespace; v2: only from namespace y (a NetworkPolicy),
//!      or an Admin ClusterNetworkPolicy denying ingress from namespace z (no NetworkPolicy)
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use palisade_dataplane::conntrack::Conntrack;
use palisade_dataplane::netns::{lab_skip_reason, Netns};
use palisade_dataplane::{
    revoke_denied, sweep_resurrected, Executor, KernelConntrack, KernelExecutor, NetlinkConntrack,
    RESURRECTION_SWEEPS,
};
use palisade_netpol::builders::*;
use palisade_netpol::revoke::RevokeContext;
use palisade_netpol::{compile, render, ClusterState, Family, NodeConfig};
use serde_json::{json, Value};
use std::net::IpAddr;
use std::sync::Arc;

fn skip_reason() -> Option<String> {
    lab_skip_reason(&["ip", "ipset", "iptables", "python3", "conntrack"])
}

/// One script for both roles; counters are written as JSON to OUT every 20 ms until DUR
/// seconds have passed (every socket operation has a timeout: the script always ends).
const SCRIPT: &str = r#"
import json, os, socket, sys, threading, time
role, out, dur = sys.argv[1], sys.argv[2], float(sys.argv[3])
fam = socket.AF_INET6 if sys.argv[4] == '6' else socket.AF_INET
any_addr = '::' if fam == socket.AF_INET6 else '0.0.0.0'
end = time.time() + dur
counts = {}
lock = threading.Lock()
def inc(k, n=1):
    with lock:
        counts[k] = counts.get(k, 0) + n
def alive():
    return time.time() < end
def recv_loop(c, key):
    c.settimeout(0.2)
    while alive():
        try:
            d = c.recv(4096)
        except socket.timeout:
            continue
        except OSError:
            return
        if not d:
            return
        inc(key, len(d))
def send_loop(c, key):
    c.settimeout(0.2)
    while alive():
        try:
            c.send(b'x')
            inc(key)
        except socket.timeout:
            pass
        except OSError:
            return
        time.sleep(0.02)
def tcp_server(port, push):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((any_addr, port)); s.listen(8); s.settimeout(0.2)
    while alive():
        try:
            c, a = s.accept()
        except socket.timeout:
            continue
        f = send_loop if push else recv_loop
        threading.Thread(target=f, args=(c, 'tcp%d-%s' % (port, a[0])), daemon=True).start()
def udp_echo(port):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((any_addr, port)); s.settimeout(0.2)
    while alive():
        try:
            d, a = s.recvfrom(100)
        except socket.timeout:
            continue
        inc('udp-%s' % a[0]); s.sendto(d, a)
def udp_client(host, port):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.connect((host, port)); s.settimeout(0.02)
    while alive():
        try:
            s.send(b'u')
            s.recv(100)
            inc('echo')
        except OSError:
            pass
        time.sleep(0.02)
def tcp_client(host, port, push):
    while alive():
        try:
            c = socket.create_connection((host, port), timeout=0.5)
            break
        except OSError:
            time.sleep(0.05)
    else:
        return
    inc('connected%d' % port)
    if push:
        recv_loop(c, 'read')
    else:
        send_loop(c, 'sent')
if role == 'server':
    jobs = [(tcp_server, (8000, False)), (tcp_server, (8001, True)), (udp_echo, (9000,))]
else:
    host = sys.argv[5]
    jobs = [(tcp_client, (host, 8000, False)), (tcp_client, (host, 8001, True)), (udp_client, (host, 9000))]
for f, a in jobs:
    threading.Thread(target=f, args=a, daemon=True).start()
while alive():
    with lock:
        data = json.dumps(counts)
    with open(out + '.tmp', 'w') as fh:
        fh.write(data)
    os.replace(out + '.tmp', out)
    time.sleep(0.02)
"#;

/// Where the pods live: family and node layout.
#[derive(Clone, Copy, Debug)]
struct Layout {
    v6: bool,
    bridged: bool,
}

const ROUTED4: Layout = Layout {
    v6: false,
    bridged: false,
};

impl Layout {
    fn family(self) -> Family {
        if self.v6 {
            Family::V6
        } else {
            Family::V4
        }
    }

    /// The pod CIDR and the address of pod `last` in it (`1`: the node's gateway).
    fn cidr(self) -> &'static str {
        match (self.v6, self.bridged) {
            (false, false) => "10.9.3.0/24",
            (false, true) => "10.9.4.0/24",
            (true, false) => "fd93::/64",
            (true, true) => "fd94::/64",
        }
    }

    fn addr(self, last: u8) -> String {
        match (self.v6, self.bridged) {
            (false, false) => format!("10.9.3.{last}"),
            (false, true) => format!("10.9.4.{last}"),
            (true, false) => format!("fd93::{last}"),
            (true, true) => format!("fd94::{last}"),
        }
    }

    fn pods(self) -> [String; 3] {
        [self.addr(10), self.addr(20), self.addr(30)]
    }
}

/// What denies z/c → x/a in the second state.
#[derive(Clone, Copy, Debug)]
enum Deny {
    /// x's NetworkPolicy narrows to namespace y.
    NetworkPolicy,
    /// No NetworkPolicy at all: an Admin ClusterNetworkPolicy denies ingress from z.
    ClusterPolicy,
}

struct Lab {
    node: Netns,
    pods: Vec<Netns>,
    layout: Layout,
    dir: TempDir,
    children: Vec<Child>,
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sh(ns: &Netns, cmd: &str) {
    ns.sh(cmd).unwrap_or_else(|e| panic!("{cmd}: {e}"));
}

fn lab(layout: Layout, tag: &str) -> Lab {
    let node = Netns::create("pal-rvk-n").expect("netns");
    let (ip, plen, host_len) = if layout.v6 {
        ("ip -6", 64, 128)
    } else {
        ("ip", 24, 32)
    };
    let nodad = if layout.v6 { " nodad" } else { "" };
    let gw = layout.addr(1);
    sh(
        &node,
        "ip link set lo up; sysctl -qw net.ipv4.ip_forward=1; \
         sysctl -qw net.ipv6.conf.all.forwarding=1; sysctl -qw net.ipv6.conf.default.forwarding=1",
    );
    if layout.bridged {
        // br_netfilter is built into the lab kernel; its switches are per network namespace.
        sh(
            &node,
            &format!(
                "ip link add cni0 type bridge; ip link set cni0 up; \
                 {ip} addr add {gw}/{plen} dev cni0{nodad}; \
                 sysctl -qw net.bridge.bridge-nf-call-iptables=1; \
                 sysctl -qw net.bridge.bridge-nf-call-ip6tables=1"
            ),
        );
    }
    let mut pods = Vec::new();
    for (i, pod_ip) in layout.pods().iter().enumerate() {
        let pod = Netns::create("pal-rvk-p").expect("netns");
        let host = format!("vr{i}");
        sh(
            &node,
            &format!(
                "ip link add {host} type veth peer name eth0 netns {}; ip link set {host} up",
                pod.name()
            ),
        );
        if layout.bridged {
            sh(&node, &format!("ip link set {host} master cni0"));
            sh(
                &pod,
                &format!(
                    "ip link set lo up; {ip} addr add {pod_ip}/{plen} dev eth0{nodad}; \
                     ip link set eth0 up; {ip} route add default via {gw}"
                ),
            );
        } else {
            sh(
                &node,
                &format!(
                    "{ip} addr add {gw}/{host_len} dev {host}{nodad}; \
                     {ip} route add {pod_ip}/{host_len} dev {host}"
                ),
            );
            sh(
                &pod,
                &format!(
                    "ip link set lo up; {ip} addr add {pod_ip}/{host_len} dev eth0{nodad}; \
                     ip link set eth0 up; {ip} route add {gw}/{host_len} dev eth0; \
                     {ip} route add default via {gw}"
                ),
            );
        }
        pods.push(pod);
    }
    let dir = std::env::temp_dir().join(format!("pal-revoke-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("flows.py"), SCRIPT).expect("script");
    Lab {
        node,
        pods,
        layout,
        dir: TempDir(dir),
        children: Vec::new(),
    }
}

impl Lab {
    fn start(&mut self, pod: usize, role: &str, secs: u32) {
        let script = self.dir.0.join("flows.py");
        let out = self.dir.0.join(format!("{role}-{pod}.json"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.pods[pod].name(), "python3"])
            .arg(&script)
            .arg(if role == "server" { "server" } else { "client" })
            .arg(&out)
            .arg(secs.to_string())
            .arg(if self.layout.v6 { "6" } else { "4" });
        if role != "server" {
            cmd.arg(self.layout.addr(10));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        self.children.push(child);
    }

    fn counts(&self, pod: usize, role: &str) -> BTreeMap<String, u64> {
        let path = self.dir.0.join(format!("{role}-{pod}.json"));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        v.as_object()
            .into_iter()
            .flatten()
            .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
            .collect()
    }

    /// What each flow has carried so far: (z tcp in, z udp, z push read, y tcp in, y udp,
    /// y push read).
    fn snapshot(&self) -> Flows {
        let [_, y_ip, z_ip] = self.layout.pods();
        let srv = self.counts(0, "server");
        let y = self.counts(1, "client");
        let z = self.counts(2, "client");
        let get = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        Flows {
            z_tcp: get(&srv, &format!("tcp8000-{z_ip}")),
            z_udp: get(&srv, &format!("udp-{z_ip}")),
            z_push: get(&z, "read"),
            y_tcp: get(&srv, &format!("tcp8000-{y_ip}")),
            y_udp: get(&srv, &format!("udp-{y_ip}")),
            y_push: get(&y, "read"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Flows {
    z_tcp: u64,
    z_udp: u64,
    z_push: u64,
    y_tcp: u64,
    y_udp: u64,
    y_push: u64,
}

impl Flows {
    fn all_moving(&self, before: &Flows) -> bool {
        self.z_tcp > before.z_tcp
            && self.z_udp > before.z_udp
            && self.z_push > before.z_push
            && self.y_tcp > before.y_tcp
            && self.y_udp > before.y_udp
            && self.y_push > before.y_push
    }
}

/// v1 (`deny` false): everything allowed. v2: z/c → x/a denied as `kind` says.
fn state(layout: Layout, kind: Deny, deny: bool) -> ClusterState {
    let [x, y, z] = layout.pods();
    let mut st = cluster(
        vec![mk_node("n1", layout.cidr())],
        vec![
            mk_ns("x", &[("ns", "x")]),
            mk_ns("y", &[("ns", "y")]),
            mk_ns("z", &[("ns", "z")]),
        ],
        vec![
            mk_pod("x", "a", &[], &x, "n1"),
            mk_pod("y", "b", &[], &y, "n1"),
            mk_pod("z", "c", &[], &z, "n1"),
        ],
        vec![],
    );
    match kind {
        Deny::NetworkPolicy => {
            let from = if deny {
                json!([{"namespaceSelector": {"matchLabels": {"ns": "y"}}}])
            } else {
                json!([{"namespaceSelector": {}}])
            };
            st.policies.push(Arc::new(mk_policy(
                "x",
                "ingress",
                json!({"podSelector": {}, "ingress": [{"from": from}]}),
            )));
        }
        Deny::ClusterPolicy if deny => {
            st.cluster_policies.push(Arc::new(mk_cnp(
                "deny-z-to-x",
                json!({
                    "tier": "Admin", "priority": 10,
                    "subject": {"namespaces": {"matchLabels": {"ns": "x"}}},
                    "ingress": [{"action": "Deny",
                                 "from": [{"namespaces": {"matchLabels": {"ns": "z"}}}]}],
                }),
            )));
        }
        Deny::ClusterPolicy => {}
    }
    st
}

/// Waits (bounded) until every flow has carried data twice in a row.
fn wait_all_moving(lab: &Lab) -> Flows {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = lab.snapshot();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = lab.snapshot();
        if now.all_moving(&last) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "flows did not start under the allowing policy ({:?}): {now:?}",
            lab.layout
        );
        last = now;
    }
}

/// Applies v1, starts the flows, applies v2 with the mid-stream rule on or off, checks that
/// without revocation everything still flows, revokes, and returns the flows 1 s after
/// revocation and 2.5 s after it.
/// Which [`Conntrack`] implementation revokes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ct {
    /// ctnetlink (what the agent uses).
    Netlink,
    /// The `conntrack` tool (the agent's fallback).
    Tool,
}

fn conntrack(ct: Ct, netns: &str) -> Box<dyn Conntrack> {
    match ct {
        Ct::Netlink => Box::new(NetlinkConntrack::in_netns(netns).expect("ctnetlink")),
        Ct::Tool => Box::new(KernelConntrack::in_netns(netns).expect("conntrack")),
    }
}

fn run(
    layout: Layout,
    kind: Deny,
    midstream: bool,
    backend: Ct,
    tag: &str,
) -> (Flows, Flows, palisade_dataplane::RevokeReport) {
    let mut lab = lab(layout, tag);
    let family = layout.family();
    let exec = KernelExecutor::for_family(family, "auto", Some(lab.node.name())).expect("executor");
    let ct = conntrack(backend, lab.node.name());
    let mut cfg = NodeConfig::new("n1");
    cfg.family = family;
    cfg.revoke_denied_connections = midstream;
    exec.apply(&render(&compile(&state(layout, kind, false), &cfg)))
        .expect("apply v1");
    lab.start(0, "server", 22);
    std::thread::sleep(Duration::from_millis(300));
    lab.start(1, "client", 21);
    lab.start(2, "client", 21);
    wait_all_moving(&lab);

    // The denying policy alone does not cut established flows (the issue's hole 4).
    let v2 = render(&compile(&state(layout, kind, true), &cfg));
    exec.apply(&v2).expect("apply v2");
    // The renderer prints PALISADE-MIDSTREAM exactly as iptables-save reads it back.
    let again = exec.apply(&v2).expect("apply v2 again");
    assert!(!again.changed, "kernel read back differs: {again:?}");
    let before = lab.snapshot();
    std::thread::sleep(Duration::from_millis(600));
    let after = lab.snapshot();
    assert!(
        after.all_moving(&before),
        "without revocation every established flow keeps going ({layout:?}): {before:?} -> {after:?}"
    );

    let pods = layout.pods();
    let ctx = RevokeContext {
        local_pods: pods.iter().map(|s| s.parse().unwrap()).collect(),
        ..Default::default()
    };
    // Every entry of z's is denied (its live flows, and any connection attempt the client
    // retried while the pod's link came up); none of y's.
    let z: IpAddr = pods[2].parse().unwrap();
    let touches_z = |e: &palisade_netpol::revoke::CtEntry| e.orig_src == z || e.reply_src == z;
    let z_entries = ct
        .entries(family)
        .expect("list")
        .iter()
        .filter(|e| touches_z(e))
        .count();
    let report = revoke_denied(ct.as_ref(), &v2, ctx).expect("revoke");
    assert!(z_entries >= 3, "z's three flows are tracked: {report:?}");
    assert_eq!(
        report.denied, z_entries,
        "exactly z's entries denied ({layout:?})"
    );
    assert_eq!(report.deleted, report.denied, "{report:?}");
    // An echo already on its way when z's UDP entry went is a new flow x → z, which the
    // policy allows; the sweep deletes what comes back that way (as the agent does).
    let swept = sweep_resurrected(ct.as_ref(), family, &report.revoked, &RESURRECTION_SWEEPS)
        .expect("sweep");
    // y's flows are still in the table (`conntrack -L -f ipv6` for IPv6).
    let y: IpAddr = pods[1].parse().unwrap();
    let entries = ct.entries(family).expect("list");
    let y_entries = entries
        .iter()
        .filter(|e| e.orig_src == y || e.reply_src == y)
        .count();
    assert!(y_entries >= 3, "allowed flows untouched: {entries:?}");
    // With the rule, nothing of z's comes back (without it, the pushed flow does: below).
    assert!(
        !midstream || !entries.iter().any(touches_z),
        "no entry of z's survives or comes back (swept {swept}): {entries:?}"
    );
    std::thread::sleep(Duration::from_millis(1000));
    let one_second = lab.snapshot();
    std::thread::sleep(Duration::from_millis(1500));
    let later = lab.snapshot();
    drop(lab);
    (one_second, later, report)
}

/// With the mid-stream rule: z's three flows are revoked (and stay cut), y's continue.
fn denied_stop_allowed_continue(layout: Layout, kind: Deny, backend: Ct, tag: &str) {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let (one, later, report) = run(layout, kind, true, backend, tag);
    let what = format!("{layout:?} {kind:?} {backend:?}");
    // z's TCP 8000, UDP 9000 and TCP 8001 entries (at least), nothing else: checked in run.
    assert!(report.deleted >= 3, "{what}: {report:?}");
    assert_eq!(
        later.z_tcp, one.z_tcp,
        "{what}: revoked TCP flow delivered data: {one:?} -> {later:?}"
    );
    assert_eq!(
        later.z_udp, one.z_udp,
        "{what}: revoked UDP flow delivered data: {one:?} -> {later:?}"
    );
    assert_eq!(
        later.z_push, one.z_push,
        "{what}: revoked server-pushed TCP flow resumed mid-stream: {one:?} -> {later:?}"
    );
    assert!(
        later.y_tcp > one.y_tcp,
        "{what}: allowed TCP disturbed: {one:?} -> {later:?}"
    );
    assert!(
        later.y_udp > one.y_udp,
        "{what}: allowed UDP disturbed: {one:?} -> {later:?}"
    );
    assert!(
        later.y_push > one.y_push,
        "{what}: allowed push disturbed: {one:?} -> {later:?}"
    );
}

/// The control: without `PALISADE-MIDSTREAM`, deleting the entry of a flow whose server keeps
/// sending is not enough — the server's next segment is picked up as a new connection in the
/// reverse direction (which the policy allows: z has no ingress policy) and the flow resumes.
/// This is why the rule exists; the test fails if the kernel ever stops doing that.
fn pushed_flow_resumes_without_the_rule(layout: Layout, kind: Deny, tag: &str) {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let (one, later, report) = run(layout, kind, false, Ct::Netlink, tag);
    assert!(report.deleted >= 3, "{report:?}");
    assert_eq!(
        later.z_tcp, one.z_tcp,
        "client-sent TCP stays cut: {one:?} -> {later:?}"
    );
    assert_eq!(
        later.z_udp, one.z_udp,
        "UDP stays cut: {one:?} -> {later:?}"
    );
    assert!(
        later.z_push > one.z_push,
        "expected the pushed flow to resume without the rule: {one:?} -> {later:?}"
    );
}

#[test]
fn denied_flows_stop_within_a_second_and_allowed_ones_continue() {
    denied_stop_allowed_continue(ROUTED4, Deny::NetworkPolicy, Ct::Netlink, "r4");
}

/// The agent's fallback when no ctnetlink socket can be opened.
#[test]
fn conntrack_tool_backend_revokes_the_same() {
    denied_stop_allowed_continue(ROUTED4, Deny::NetworkPolicy, Ct::Tool, "tool");
}

#[test]
fn without_the_midstream_rule_a_server_pushed_flow_resumes() {
    pushed_flow_resumes_without_the_rule(ROUTED4, Deny::NetworkPolicy, "off");
}

/// A pod that only a ClusterNetworkPolicy Deny isolates is guarded too.
#[test]
fn cluster_policy_deny_revokes_and_stays_cut() {
    denied_stop_allowed_continue(ROUTED4, Deny::ClusterPolicy, Ct::Netlink, "cnp");
}

#[test]
fn cluster_policy_without_the_midstream_rule_a_pushed_flow_resumes() {
    pushed_flow_resumes_without_the_rule(ROUTED4, Deny::ClusterPolicy, "cnp-off");
}

#[test]
fn ipv6_routed_denied_flows_stop_and_allowed_continue() {
    let layout = Layout {
        v6: true,
        bridged: false,
    };
    denied_stop_allowed_continue(layout, Deny::NetworkPolicy, Ct::Netlink, "r6");
}

#[test]
fn ipv4_bridged_denied_flows_stop_and_allowed_continue() {
    let layout = Layout {
        v6: false,
        bridged: true,
    };
    denied_stop_allowed_continue(layout, Deny::NetworkPolicy, Ct::Netlink, "b4");
}

#[test]
fn ipv6_bridged_denied_flows_stop_and_allowed_continue() {
    let layout = Layout {
        v6: true,
        bridged: true,
    };
    denied_stop_allowed_continue(layout, Deny::NetworkPolicy, Ct::Netlink, "b6");
}
