//! Revocation of denied connections against the real kernel (root only; skipped otherwise):
//! long-lived TCP and UDP flows between pods in network namespaces, a policy change that
//! denies some of them, [`revoke_denied`] deleting their conntrack entries.
//!
//! ```text
//!  node netns (routed: veth + /32 route per pod, 10.9.3.0/24)
//!    x/a 10.9.3.10  server: TCP 8000 (counts bytes in), UDP 9000 (echo), TCP 8001 (pushes)
//!    y/b 10.9.3.20  client of all three — stays allowed
//!    z/c 10.9.3.30  client of all three — denied by the second policy
//!  v1: x accepts ingress from every namespace; v2: only from namespace y
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use palisade_dataplane::conntrack::Conntrack;
use palisade_dataplane::netns::{is_root, Netns};
use palisade_dataplane::{revoke_denied, Executor, KernelConntrack, KernelExecutor};
use palisade_netpol::builders::*;
use palisade_netpol::revoke::RevokeContext;
use palisade_netpol::{compile, render, ClusterState, Family, NodeConfig};
use serde_json::{json, Value};

fn skip_reason() -> Option<String> {
    if !is_root() {
        return Some("needs root".into());
    }
    for tool in ["ip", "ipset", "iptables", "python3", "conntrack"] {
        let ok = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !ok {
            return Some(format!("{tool} not installed"));
        }
    }
    None
}

/// One script for both roles; counters are written as JSON to OUT every 20 ms until DUR
/// seconds have passed (every socket operation has a timeout: the script always ends).
const SCRIPT: &str = r#"
import json, os, socket, sys, threading, time
role, out, dur = sys.argv[1], sys.argv[2], float(sys.argv[3])
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
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('0.0.0.0', port)); s.listen(8); s.settimeout(0.2)
    while alive():
        try:
            c, a = s.accept()
        except socket.timeout:
            continue
        f = send_loop if push else recv_loop
        threading.Thread(target=f, args=(c, 'tcp%d-%s' % (port, a[0])), daemon=True).start()
def udp_echo(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(('0.0.0.0', port)); s.settimeout(0.2)
    while alive():
        try:
            d, a = s.recvfrom(100)
        except socket.timeout:
            continue
        inc('udp-%s' % a[0]); s.sendto(d, a)
def udp_client(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
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
    host = sys.argv[4]
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

const X: &str = "10.9.3.10";
const Y: &str = "10.9.3.20";
const Z: &str = "10.9.3.30";

struct Lab {
    node: Netns,
    pods: Vec<Netns>,
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

fn lab(tag: &str) -> Lab {
    let node = Netns::create("pal-rvk-n").expect("netns");
    sh(&node, "ip link set lo up; sysctl -qw net.ipv4.ip_forward=1");
    let mut pods = Vec::new();
    for (i, ip) in [X, Y, Z].iter().enumerate() {
        let pod = Netns::create("pal-rvk-p").expect("netns");
        let host = format!("vr{i}");
        sh(
            &node,
            &format!(
                "ip link add {host} type veth peer name eth0 netns {}; ip link set {host} up; \
                 ip addr add 10.9.3.1/32 dev {host}; ip route add {ip}/32 dev {host}",
                pod.name()
            ),
        );
        sh(
            &pod,
            &format!(
                "ip link set lo up; ip addr add {ip}/32 dev eth0; ip link set eth0 up; \
                 ip route add 10.9.3.1/32 dev eth0; ip route add default via 10.9.3.1"
            ),
        );
        pods.push(pod);
    }
    let dir = std::env::temp_dir().join(format!("pal-revoke-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("flows.py"), SCRIPT).expect("script");
    Lab {
        node,
        pods,
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
            .arg(secs.to_string());
        if role != "server" {
            cmd.arg(X);
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
        let srv = self.counts(0, "server");
        let y = self.counts(1, "client");
        let z = self.counts(2, "client");
        let get = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        Flows {
            z_tcp: get(&srv, &format!("tcp8000-{Z}")),
            z_udp: get(&srv, &format!("udp-{Z}")),
            z_push: get(&z, "read"),
            y_tcp: get(&srv, &format!("tcp8000-{Y}")),
            y_udp: get(&srv, &format!("udp-{Y}")),
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

fn state(only_y: bool) -> ClusterState {
    let from = if only_y {
        json!([{"namespaceSelector": {"matchLabels": {"ns": "y"}}}])
    } else {
        json!([{"namespaceSelector": {}}])
    };
    cluster(
        vec![mk_node("n1", "10.9.3.0/24")],
        vec![
            mk_ns("x", &[("ns", "x")]),
            mk_ns("y", &[("ns", "y")]),
            mk_ns("z", &[("ns", "z")]),
        ],
        vec![
            mk_pod("x", "a", &[], X, "n1"),
            mk_pod("y", "b", &[], Y, "n1"),
            mk_pod("z", "c", &[], Z, "n1"),
        ],
        vec![mk_policy(
            "x",
            "ingress",
            json!({"podSelector": {}, "ingress": [{"from": from}]}),
        )],
    )
}

/// Waits (bounded) until every flow has carried data twice in a row.
fn wait_all_moving(lab: &Lab) -> Flows {
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut last = lab.snapshot();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = lab.snapshot();
        if now.all_moving(&last) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "flows did not start under the allowing policy: {now:?}"
        );
        last = now;
    }
}

/// Applies v1, starts the flows, applies v2 with the mid-stream rule on or off, checks that
/// without revocation everything still flows, revokes, and returns the flows 1 s after
/// revocation and 2.5 s after it.
fn run(midstream: bool, tag: &str) -> (Flows, Flows, palisade_dataplane::RevokeReport) {
    let mut lab = lab(tag);
    let exec = KernelExecutor::detect_in_netns(lab.node.name(), "auto").expect("executor");
    let ct = KernelConntrack::in_netns(lab.node.name()).expect("conntrack");
    let mut cfg = NodeConfig::new("n1");
    cfg.revoke_denied_connections = midstream;
    exec.apply(&render(&compile(&state(false), &cfg)))
        .expect("apply v1");
    lab.start(0, "server", 20);
    std::thread::sleep(Duration::from_millis(300));
    lab.start(1, "client", 19);
    lab.start(2, "client", 19);
    wait_all_moving(&lab);

    // The denying policy alone does not cut established flows (the issue's hole 4).
    let v2 = render(&compile(&state(true), &cfg));
    exec.apply(&v2).expect("apply v2");
    // The renderer prints PALISADE-MIDSTREAM exactly as iptables-save reads it back.
    let again = exec.apply(&v2).expect("apply v2 again");
    assert!(!again.changed, "kernel read back differs: {again:?}");
    let before = lab.snapshot();
    std::thread::sleep(Duration::from_millis(600));
    let after = lab.snapshot();
    assert!(
        after.all_moving(&before),
        "without revocation every established flow keeps going: {before:?} -> {after:?}"
    );

    let ctx = RevokeContext {
        local_pods: [X, Y, Z].iter().map(|s| s.parse().unwrap()).collect(),
        ..Default::default()
    };
    let report = revoke_denied(&ct, &v2, ctx).expect("revoke");
    // y's flows are still in the table.
    let entries = ct.entries(Family::V4).expect("list");
    let y_entries = entries
        .iter()
        .filter(|e| e.orig_src.to_string() == Y || e.reply_src.to_string() == Y)
        .count();
    assert!(y_entries >= 3, "allowed flows untouched: {entries:?}");
    std::thread::sleep(Duration::from_millis(1000));
    let one_second = lab.snapshot();
    std::thread::sleep(Duration::from_millis(1500));
    let later = lab.snapshot();
    drop(lab);
    (one_second, later, report)
}

#[test]
fn denied_flows_stop_within_a_second_and_allowed_ones_continue() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let (one, later, report) = run(true, "on");
    // z's TCP 8000, UDP 9000 and TCP 8001 entries, nothing else.
    assert_eq!(report.denied, 3, "{report:?}");
    assert_eq!(report.deleted, 3, "{report:?}");
    assert_eq!(
        later.z_tcp, one.z_tcp,
        "revoked TCP flow delivered data: {one:?} -> {later:?}"
    );
    assert_eq!(
        later.z_udp, one.z_udp,
        "revoked UDP flow delivered data: {one:?} -> {later:?}"
    );
    assert_eq!(
        later.z_push, one.z_push,
        "revoked server-pushed TCP flow resumed mid-stream: {one:?} -> {later:?}"
    );
    assert!(
        later.y_tcp > one.y_tcp,
        "allowed TCP disturbed: {one:?} -> {later:?}"
    );
    assert!(
        later.y_udp > one.y_udp,
        "allowed UDP disturbed: {one:?} -> {later:?}"
    );
    assert!(
        later.y_push > one.y_push,
        "allowed push disturbed: {one:?} -> {later:?}"
    );
}

/// The control: without `PALISADE-MIDSTREAM`, deleting the entry of a flow whose server keeps
/// sending is not enough — the server's next segment is picked up as a new connection in the
/// reverse direction (which the policy allows: z has no ingress policy) and the flow resumes.
/// This is why the rule exists; the test fails if the kernel ever stops doing that.
#[test]
fn without_the_midstream_rule_a_server_pushed_flow_resumes() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let (one, later, report) = run(false, "off");
    assert_eq!(report.deleted, 3, "{report:?}");
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
