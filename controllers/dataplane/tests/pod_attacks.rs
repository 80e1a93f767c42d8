//! Attacks by a pod on other pods of the same node that anti-spoofing does not cover (root
//! only; skipped otherwise): rogue IPv6 Router Advertisements and link-local ICMPv6,
//! broadcast / multicast / link-local UDP to an ingress-isolated pod, and forged ICMP errors
//! that conntrack classifies as RELATED to another pod's flow. Real packets, fresh network
//! namespaces, rules compiled by the real compiler and applied by [`KernelExecutor`]; every
//! test also checks that the legitimate traffic next to the attack still works.
//!
//! ```text
//!  node netns:  bridged layout: cni0 10.9.1.1/24, fd00:9:1::1/64, br_netfilter on
//!               routed layout:  veth + /32 (/128) route per pod (10.9.2.0/24, fd00:9:2::/64)
//!  pods (eth0 MAC 02:00:00:00:00:LL, link-local fe80::ff:fe00:LL):
//!    x/a .10  namespace x accepts ingress only from namespace y, TCP 80 and UDP 53
//!    y/b .20  allowed peer
//!    z/a .30  attacker (own, real addresses); egress-isolated where a test says so
//! ```

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use palisade_dataplane::netns::{lab_skip_reason, Netns};
use palisade_dataplane::{pod_interfaces, Executor, KernelExecutor, KernelLinks};
use palisade_netpol::builders::*;
use palisade_netpol::{compile, local_pod_ips, render, ClusterState, Family, NodeConfig};
use serde_json::json;

fn skip_reason() -> Option<String> {
    lab_skip_reason(&["ip", "bridge", "ipset", "iptables", "ip6tables", "python3"])
}

/// `serve.py SECONDS echo|quiet MAX`: UDP on 0.0.0.0:53 and [::]:53 (v6only); prints `ready`,
/// then `got SRC PAYLOAD` per datagram for SECONDS (or until MAX datagrams, 0 = no limit);
/// `echo` answers each with `reply:PAYLOAD`.
const SERVE: &str = r#"
import socket, select, sys, time
dur, echo, most = float(sys.argv[1]), sys.argv[2] == 'echo', int(sys.argv[3])
socks = []
for fam, addr in ((socket.AF_INET, '0.0.0.0'), (socket.AF_INET6, '::')):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, 53))
    socks.append(s)
print('ready', flush=True)
end, n = time.time() + dur, 0
while most == 0 or n < most:
    left = end - time.time()
    if left <= 0:
        break
    r, _, _ = select.select(socks, [], [], left)
    for s in r:
        d, a = s.recvfrom(2000)
        n += 1
        print('got', a[0], d.decode(errors='replace'), flush=True)
        if echo:
            s.sendto(b'reply:' + d, a)
"#;

/// `send.py reply|noreply [SRC>]DST PAYLOAD [[SRC>]DST PAYLOAD ...]`: 3 UDP datagrams to
/// DST:53 each, from SRC when given (else the kernel's choice; broadcast allowed, link-local
/// and ff02:: scoped to eth0, multicast TTL 1); with `reply`, prints `reply PAYLOAD` or
/// `noreply` for the first destination (1 s).
const SEND: &str = r#"
import socket, sys
want, rest = sys.argv[1] == 'reply', sys.argv[2:]
idx = socket.if_nametoindex('eth0')
for i in range(0, len(rest), 2):
    spec, data = rest[i], rest[i + 1].encode()
    src, dst = spec.split('>') if '>' in spec else ('-', spec)
    v6 = ':' in dst
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    if v6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
        scope = idx if dst.startswith(('fe80', 'ff02')) else 0
        if src != '-':
            s.bind((src, 0, 0, scope))
        a = (dst, 53, 0, scope)
    else:
        if src != '-':
            s.bind((src, 0))
        a = (dst, 53)
    for _ in range(3):
        s.sendto(data, a)
    if want and i == 0:
        s.settimeout(1.0)
        try:
            print('reply', s.recvfrom(2000)[0].decode(), flush=True)
        except Exception as e:
            print('noreply', e, flush=True)
"#;

/// `ra.py SRC`: a Router Advertisement (router lifetime 1800 s, preference high, source
/// link-layer option) from link-local SRC to ff02::1 on eth0, hop limit 255, twice.
const RA: &str = r#"
import socket, struct, sys
idx = socket.if_nametoindex('eth0')
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
s.bind((sys.argv[1], 0, 0, idx))
mac = bytes.fromhex(open('/sys/class/net/eth0/address').read().strip().replace(':', ''))
ra = struct.pack('!BBHBBHII', 134, 0, 0, 64, 0x08, 1800, 0, 0)
ra += struct.pack('!BB6s', 1, 1, mac)
for _ in range(2):
    s.sendto(ra, ('ff02::1', 0, 0, idx))
"#;

/// `ping6.py SRC DST`: one ICMPv6 echo request between link-local addresses on eth0; prints
/// `reply` if an echo reply arrives within 1 s, else `noreply`.
const PING6: &str = r#"
import socket, struct, sys, time
src, dst = sys.argv[1], sys.argv[2]
idx = socket.if_nametoindex('eth0')
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.bind((src, 0, 0, idx))
s.sendto(struct.pack('!BBHHH', 128, 0, 0, 7, 1) + b'palisade', (dst, 0, 0, idx))
end, got = time.time() + 1.0, 'noreply'
while time.time() < end:
    s.settimeout(max(0.01, end - time.time()))
    try:
        d, a = s.recvfrom(2000)
    except socket.timeout:
        break
    if d[0] == 129:
        got = 'reply'
        break
print(got)
"#;

/// `forge.py X Y MARK`: an ICMP port unreachable, from the sender's own address to X, that
/// embeds X:5555 -> Y:53/udp with MARK (x4) as the embedded payload.
const FORGE: &str = r#"
import socket, struct, sys
def csum(b):
    if len(b) % 2:
        b += b'\0'
    t = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while t >> 16:
        t = (t & 0xffff) + (t >> 16)
    return (~t) & 0xffff
x, y, mark = sys.argv[1], sys.argv[2], sys.argv[3].encode()
payload = mark * 4
udp = struct.pack('!HHHH', 5555, 53, 8 + len(payload), 0) + payload
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                 socket.inet_aton(x), socket.inet_aton(y))
ip = ip[:10] + struct.pack('!H', csum(ip)) + ip[12:]
icmp = struct.pack('!BBHI', 3, 3, 0, 0) + ip + udp
icmp = icmp[:2] + struct.pack('!H', csum(icmp)) + icmp[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
for _ in range(2):
    s.sendto(icmp, (x, 0))
"#;

/// `victim.py X Y MARK`: a UDP socket X:5555 connected to Y:53 and a raw ICMP socket. Sends
/// `q`, prints `first reply|refused|timeout` (1 s), then `ready`; then for 1 s counts
/// ECONNREFUSED on the UDP socket and ICMP packets carrying MARK; prints
/// `refused=R marker=M` (each 0 or 1: seen at least once).
const VICTIM: &str = r#"
import socket, select, sys, time
x, y, mark = sys.argv[1], sys.argv[2], sys.argv[3].encode()
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
u.bind((x, 5555))
u.connect((y, 53))
def wait(t, first):
    refused = marker = replies = 0
    end = time.time() + t
    while True:
        left = end - time.time()
        if left <= 0 or (first and (refused or replies)):
            break
        rd, _, _ = select.select([r, u], [], [], left)
        for s in rd:
            if s is r:
                if mark in r.recv(4000):
                    marker += 1
            else:
                try:
                    u.recv(2000)
                    replies += 1
                except ConnectionRefusedError:
                    refused += 1
    return refused, marker, replies
u.send(b'q')
ref, _, rep = wait(1.0, True)
print('first', 'reply' if rep else ('refused' if ref else 'timeout'), flush=True)
print('ready', flush=True)
ref, mk, _ = wait(1.0, False)
print('refused=%d marker=%d' % (min(ref, 1), min(mk, 1)), flush=True)
"#;

/// A python script running in a pod, started in the background; its stdout up to the line
/// `ready` is in `head`. Killed on drop if still running (every script also ends by itself).
struct Bg {
    child: Option<Child>,
    out: BufReader<ChildStdout>,
    head: String,
}

fn spawn(ns: &Netns, script: &str, args: &[&str]) -> Bg {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), "python3", "-c", script])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap_or(0) == 0 || line.trim() == "ready" {
            break;
        }
        head.push_str(&line);
    }
    Bg {
        child: Some(child),
        out,
        head,
    }
}

impl Bg {
    /// Waits for the script to end; returns everything it printed (without `ready`).
    fn finish(mut self) -> String {
        let mut all = std::mem::take(&mut self.head);
        let _ = self.out.read_to_string(&mut all);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        all
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn py(ns: &Netns, script: &str, args: &[&str]) -> String {
    let mut full = vec!["-c", script];
    full.extend_from_slice(args);
    ns.exec("python3", &full)
        .unwrap_or_else(|e| panic!("python3 in {}: {e}", ns.name()))
}

fn sh(ns: &Netns, cmd: &str) -> String {
    ns.sh(cmd).unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

const X: usize = 0;
const Y: usize = 1;
const Z: usize = 2;
/// (namespace, name, last address byte; also the last MAC byte, in hex).
const PODS: [(&str, &str, u8); 3] = [("x", "a", 0x10), ("y", "b", 0x20), ("z", "a", 0x30)];

struct Lab {
    node: Netns,
    pods: Vec<Netns>,
    net: u8,
    bridged: bool,
}

impl Lab {
    fn v4(&self, pod: usize) -> String {
        format!("10.9.{}.{:x}", self.net, PODS[pod].2)
    }
    fn v6(&self, pod: usize) -> String {
        format!("fd00:9:{}::{:x}", self.net, PODS[pod].2)
    }
    fn ll(&self, pod: usize) -> String {
        format!("fe80::ff:fe00:{:x}", PODS[pod].2)
    }
    fn pod(&self, pod: usize) -> &Netns {
        &self.pods[pod]
    }
}

/// The node and its three dual-stack pods. `bridged`: pods on cni0 with br_netfilter;
/// otherwise one veth and /32 (/128) route per pod.
fn lab(bridged: bool) -> Lab {
    let node = Netns::create("pal-atk-n").expect("netns");
    let net = if bridged { 1 } else { 2 };
    sh(
        &node,
        "ip link set lo up; sysctl -qw net.ipv4.ip_forward=1; \
         sysctl -qw net.ipv6.conf.all.forwarding=1; sysctl -qw net.ipv6.conf.default.forwarding=1",
    );
    if bridged {
        sh(
            &node,
            "ip link add cni0 type bridge; ip link set cni0 up; \
             ip addr add 10.9.1.1/24 dev cni0; ip -6 addr add fd00:9:1::1/64 dev cni0 nodad; \
             sysctl -qw net.bridge.bridge-nf-call-iptables=1; \
             sysctl -qw net.bridge.bridge-nf-call-ip6tables=1",
        );
    }
    let mut pods = Vec::new();
    for (i, (_, _, last)) in PODS.iter().enumerate() {
        let pod = Netns::create("pal-atk-p").expect("netns");
        let host = format!("va{i}");
        let (v4, v6) = (
            format!("10.9.{net}.{last:x}"),
            format!("fd00:9:{net}::{last:x}"),
        );
        sh(
            &node,
            &format!(
                "ip link add {host} type veth peer name eth0 netns {}; ip link set {host} up",
                pod.name()
            ),
        );
        // No duplicate address detection: link-local addresses usable at once.
        sh(
            &pod,
            &format!(
                "ip link set lo up; sysctl -qw net.ipv6.conf.eth0.accept_dad=0; \
                 ip link set eth0 address 02:00:00:00:00:{last:02x}"
            ),
        );
        if bridged {
            sh(&node, &format!("ip link set {host} master cni0"));
            sh(
                &pod,
                &format!(
                    "ip addr add {v4}/24 dev eth0; ip -6 addr add {v6}/64 dev eth0 nodad; \
                     ip link set eth0 up; ip route add default via 10.9.1.1; \
                     ip -6 route add default via fd00:9:1::1"
                ),
            );
        } else {
            sh(
                &node,
                &format!(
                    "sysctl -qw net.ipv6.conf.{host}.forwarding=1; \
                     ip addr add 10.9.2.1/32 dev {host}; \
                     ip -6 addr add fd00:9:2::1/128 dev {host} nodad; \
                     ip route add {v4}/32 dev {host}; ip -6 route add {v6}/128 dev {host}"
                ),
            );
            sh(
                &pod,
                &format!(
                    "ip addr add {v4}/32 dev eth0; ip -6 addr add {v6}/128 dev eth0 nodad; \
                     ip link set eth0 up; ip route add 10.9.2.1/32 dev eth0; \
                     ip route add default via 10.9.2.1; ip -6 route add fd00:9:2::1/128 dev eth0; \
                     ip -6 route add default via fd00:9:2::1"
                ),
            );
        }
        pods.push(pod);
    }
    // Every pod talks to its node once, so the node learns neighbours and the bridge its FDB
    // (what `KernelLinks` places bridge ports by).
    let gw = if bridged { 1 } else { 2 };
    for pod in &pods {
        let _ = pod.exec(
            "python3",
            &[
                "-c",
                &format!(
                    "import socket\nfor f, a in ((socket.AF_INET, '10.9.{gw}.1'), \
                     (socket.AF_INET6, 'fd00:9:{gw}::1')):\n  \
                     s = socket.socket(f, socket.SOCK_DGRAM)\n  s.sendto(b'hi', (a, 9))"
                ),
            ],
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    Lab {
        node,
        pods,
        net,
        bridged,
    }
}

/// x accepts ingress only from namespace y on TCP 80 and UDP 53; with `z_egress_isolated`,
/// z/a may send nothing.
fn state(lab: &Lab, z_egress_isolated: bool) -> ClusterState {
    let net = lab.net;
    let mut policies = vec![mk_policy(
        "x",
        "from-y",
        json!({"podSelector": {}, "ingress": [{
            "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
            "ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}]}]}),
    )];
    if z_egress_isolated {
        policies.push(mk_policy(
            "z",
            "deny-egress",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": []}),
        ));
    }
    cluster(
        vec![mk_node_cidrs(
            "n1",
            &[&format!("10.9.{net}.0/24"), &format!("fd00:9:{net}::/64")],
        )],
        vec![
            mk_ns("x", &[("ns", "x")]),
            mk_ns("y", &[("ns", "y")]),
            mk_ns("z", &[("ns", "z")]),
        ],
        (0..3)
            .map(|i| {
                let (v4, v6) = (lab.v4(i), lab.v6(i));
                with_pod_ips(mk_pod(PODS[i].0, PODS[i].1, &[], &v4, "n1"), &[&v4, &v6])
            })
            .collect(),
        policies,
    )
}

/// Compiles and applies both families' payloads (anti-spoofing on) in the node netns.
fn apply(lab: &Lab, st: &ClusterState) {
    let links = KernelLinks::in_netns(lab.node.name()).expect("links");
    for family in [Family::V4, Family::V6] {
        let mut cfg = NodeConfig::new("n1");
        cfg.family = family;
        cfg.anti_spoofing = true;
        let ips = local_pod_ips(st, "n1", family);
        cfg.pod_interfaces = pod_interfaces(&links, &ips).expect("dump");
        assert_eq!(
            cfg.pod_interfaces.len(),
            3,
            "every pod placed ({family:?}, bridged={}): {:?}",
            lab.bridged,
            cfg.pod_interfaces
        );
        let exec =
            KernelExecutor::for_family(family, "auto", Some(lab.node.name())).expect("executor");
        exec.apply(&render(&compile(st, &cfg))).expect("apply");
    }
}

fn ra_routes(ns: &Netns) -> String {
    sh(ns, "ip -6 route show proto ra").trim().to_string()
}

#[test]
fn pod_router_advertisements_and_link_local_icmpv6_are_dropped_bridged() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = lab(true);
    let (x, y, z) = (lab.pod(X), lab.pod(Y), lab.pod(Z));

    // Controls without Palisade's rules: the RA and the echo are well-formed and effective.
    py(z, RA, &[&lab.ll(Z)]);
    let before = palisade_poll::poll(Duration::from_secs(3), Duration::from_millis(50), || {
        Some(ra_routes(x)).filter(|r| !r.is_empty())
    })
    .unwrap_or_default();
    assert!(
        !before.is_empty(),
        "control: without rules, z's RA installs a default route in x"
    );
    for ns in [x, y] {
        sh(ns, "ip -6 route flush proto ra");
        assert_eq!(ra_routes(ns), "", "control: RA routes flushed");
    }
    assert_eq!(
        py(z, PING6, &[&lab.ll(Z), &lab.ll(X)]).trim(),
        "reply",
        "control: without rules, z's link-local echo to x is answered"
    );

    apply(&lab, &state(&lab, true));
    let mut failures = Vec::new();
    py(z, RA, &[&lab.ll(Z)]);
    // Not a wait for a condition: the time the control above needed, and more, for the RA
    // to do nothing.
    std::thread::sleep(Duration::from_millis(500));
    for (name, ns) in [("x", x), ("y", y)] {
        let routes = ra_routes(ns);
        if !routes.is_empty() {
            failures.push(format!(
                "ATTACK: z's RA to ff02::1 installed in {name}: {routes}"
            ));
        }
    }
    let echo = py(z, PING6, &[&lab.ll(Z), &lab.ll(X)]);
    if echo.trim() != "noreply" {
        failures.push(format!(
            "ATTACK: egress-isolated z's echo {} -> x {} answered: {}",
            lab.ll(Z),
            lab.ll(X),
            echo.trim()
        ));
    }

    // Control: neighbour discovery between allowed pods still works (caches flushed, so
    // y's datagram and x's reply each need NS/NA through the node's rules).
    for ns in [x, y] {
        sh(ns, "ip -6 neigh flush all; ip neigh flush all");
    }
    let server = spawn(x, SERVE, &["1.5", "echo", "1"]);
    let out = py(y, SEND, &["reply", &lab.v6(X), "nd-control"]);
    let served = server.finish();
    if !out.contains("reply reply:nd-control") {
        failures.push(format!(
            "CONTROL: y -> x [{}]:53 after neighbour flush: {} (x saw: {})",
            lab.v6(X),
            out.trim(),
            served.trim()
        ));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn broadcast_multicast_and_link_local_udp_to_an_isolated_pod_bridged() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = lab(true);
    let (x, y, z) = (lab.pod(X), lab.pod(Y), lab.pod(Z));
    apply(&lab, &state(&lab, false));

    let (xv4, xv6, xll) = (lab.v4(X), lab.v6(X), lab.ll(X));
    let (zv6, zll) = (lab.v6(Z), lab.ll(Z));
    let server = spawn(x, SERVE, &["2.0", "quiet", "0"]);
    py(
        z,
        SEND,
        &[
            "noreply",
            "255.255.255.255",
            "z-bcast4",
            "224.0.0.1",
            "z-mcast4",
            &format!("{zv6}>ff02::1"),
            "z-mcast6",
            &format!("{zv6}>{xll}"),
            "z-linklocal6",
            &format!("{zll}>ff02::1"),
            "z-mcast6-from-ll",
            &format!("{zll}>{xll}"),
            "z-linklocal6-from-ll",
            &xv4,
            "z-unicast4",
            &xv6,
            "z-unicast6",
        ],
    );
    py(
        y,
        SEND,
        &[
            "noreply",
            &xv4,
            "y-unicast4",
            &xv6,
            "y-unicast6",
            "255.255.255.255",
            "y-bcast4",
        ],
    );
    let got = server.finish();
    let count = |m: &str| {
        got.lines()
            .filter(|l| l.split_whitespace().nth(2) == Some(m))
            .count()
    };
    let cases: [(&str, &str, usize); 11] = [
        ("z-bcast4", "denied z -> 255.255.255.255:53", 0),
        ("z-mcast4", "denied z -> 224.0.0.1:53", 0),
        ("z-mcast6", "denied z (own global) -> [ff02::1]:53", 0),
        (
            "z-linklocal6",
            "denied z (own global) -> x's link-local :53",
            0,
        ),
        (
            "z-mcast6-from-ll",
            "denied z (own link-local) -> [ff02::1]:53",
            0,
        ),
        (
            "z-linklocal6-from-ll",
            "denied z (own link-local) -> x's link-local :53",
            0,
        ),
        ("z-unicast4", "denied z -> x's IPv4 :53 (sanity)", 0),
        ("z-unicast6", "denied z -> x's IPv6 :53 (sanity)", 0),
        ("y-unicast4", "allowed y -> x's IPv4 :53", 3),
        ("y-unicast6", "allowed y -> x's IPv6 :53", 3),
        ("y-bcast4", "allowed y -> 255.255.255.255:53", 3),
    ];
    let mut failures = Vec::new();
    for (marker, what, want) in cases {
        let n = count(marker);
        if n != want {
            let kind = if want == 0 { "ATTACK" } else { "CONTROL" };
            failures.push(format!("{kind}: {what}: x received {n} of 3, want {want}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}\nx received:\n{got}");
}

/// One run of the victim: y answers once (when `y_serves`), x establishes x:5555 -> y:53,
/// then `attacker` (if any) forges an ICMP port unreachable embedding that flow. Returns
/// x's output (`first ...`, `refused=N marker=M`).
fn icmp_round(lab: &Lab, y_serves: bool, attacker: Option<usize>, mark: &str) -> String {
    let (xv4, yv4) = (lab.v4(X), lab.v4(Y));
    let server = y_serves.then(|| spawn(lab.pod(Y), SERVE, &["3", "echo", "1"]));
    let victim = spawn(lab.pod(X), VICTIM, &[&xv4, &yv4, mark]);
    if let Some(a) = attacker {
        py(lab.pod(a), FORGE, &[&xv4, &yv4, mark]);
    }
    let out = victim.finish();
    if let Some(s) = server {
        s.finish();
    }
    out
}

fn forged_icmp_errors(bridged: bool) {
    let lab = lab(bridged);
    apply(&lab, &state(&lab, false));
    let mut failures = Vec::new();
    let mut check = |what: &str, out: &str, want: &[&str]| {
        for w in want {
            if !out.lines().any(|l| l.trim() == *w) {
                failures.push(format!(
                    "{what} (bridged={bridged}): want `{w}`, x printed {:?}",
                    out.trim()
                ));
            }
        }
    };
    // The attack: z (denied to x, its own real address) forges an error about x's flow.
    let attack = icmp_round(&lab, true, Some(Z), "PAL-MARK-Z");
    check(
        "ATTACK: forged ICMP error from z about x:5555->y:53",
        &attack,
        &["first reply", "refused=0 marker=0"],
    );
    // Control: the same crafted error from y (an endpoint of the flow) is delivered, so the
    // forged packet is well-formed and the attack assertion is not vacuous.
    let crafted = icmp_round(&lab, true, Some(Y), "PAL-MARK-Y");
    check(
        "CONTROL: crafted ICMP error from y (endpoint)",
        &crafted,
        &["first reply", "refused=1 marker=1"],
    );
    // Control: y's kernel answers x's datagram (same flow) with a genuine port unreachable.
    let genuine = icmp_round(&lab, false, None, "PAL-MARK-NONE");
    check(
        "CONTROL: genuine port unreachable from y",
        &genuine,
        &["first refused"],
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn forged_icmp_errors_do_not_pass_policy_routed() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    forged_icmp_errors(false);
}

#[test]
fn forged_icmp_errors_do_not_pass_policy_bridged() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    forged_icmp_errors(true);
}
