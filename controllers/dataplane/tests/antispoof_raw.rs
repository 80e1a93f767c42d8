//! Anti-spoofing with raw packets (root only; skipped otherwise): TCP SYN, SCTP INIT and UDP
//! frames built byte by byte (correct checksums, CRC32c for SCTP) and sent with an
//! `AF_PACKET` socket from a pod's interface, IPv4 and IPv6, to a pod on the same node and
//! from a pod of another node, routed and bridged node layouts. Arrival is counted by a
//! `raw PREROUTING` rule inside the target pod (before its own conntrack or checksum checks).
//!
//! ```text
//!   node1 (10.31.0.0/24, fd31::/64)              node2 (10.32.0.0/24, fd32::/64)
//!     x/a .10   target; x accepts only from ns y    z/c .40  attacker (other node)
//!     y/b .20   allowed peer                        y/d .50  allowed peer (other node)
//!     z/a .30   attacker (same node)
//!   node1 lnk 10.30.0.1/30, fd30::1 ── veth ── lnk 10.30.0.2/30, fd30::2 node2
//!   routed: veth + /32 (/128) route per pod;  bridged: cni0 + br_netfilter per node
//! ```

use std::time::Duration;

use palisade_dataplane::netns::{lab_skip_reason, Netns};
use palisade_dataplane::{pod_interfaces, Executor, KernelExecutor, KernelLinks};
use palisade_netpol::builders::*;
use palisade_netpol::{compile, local_pod_ips, render, ClusterState, Family, NodeConfig};
use serde_json::json;

fn skip_reason() -> Option<String> {
    lab_skip_reason(&["ip", "bridge", "ipset", "iptables", "ip6tables", "python3"])
}

/// `send.py IFACE DSTMAC SRC DST PROTO COUNT`: builds Ethernet + IPv4/IPv6 + TCP SYN / SCTP
/// INIT / UDP to port 9000 and sends COUNT frames from IFACE.
const SENDER: &str = r#"
import socket, struct, sys, ipaddress
iface, dmac, src, dst, proto, count = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((iface, 0))
smac = bytes.fromhex(open('/sys/class/net/%s/address' % iface).read().strip().replace(':', ''))
dmac = bytes.fromhex(dmac.replace(':', ''))
sa, da = ipaddress.ip_address(src), ipaddress.ip_address(dst)
v6 = sa.version == 6
def csum(b):
    if len(b) % 2:
        b += b'\0'
    t = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while t >> 16:
        t = (t & 0xffff) + (t >> 16)
    return (~t) & 0xffff
def crc32c(b):
    c = 0xffffffff
    for x in b:
        c ^= x
        for _ in range(8):
            c = (c >> 1) ^ (0x82f63b78 if c & 1 else 0)
    return c ^ 0xffffffff
num = {'tcp': 6, 'udp': 17, 'sctp': 132}[proto]
def pseudo(l4len):
    if v6:
        return sa.packed + da.packed + struct.pack('!I3xB', l4len, num)
    return sa.packed + da.packed + struct.pack('!BBH', 0, num, l4len)
def l4(i):
    sport = 40000 + i
    if proto == 'tcp':
        h = struct.pack('!HHIIBBHHH', sport, 9000, 1000 + i, 0, 5 << 4, 0x02, 64240, 0, 0)
        c = csum(pseudo(len(h)) + h)
        return h[:16] + struct.pack('!H', c) + h[18:]
    if proto == 'udp':
        body = b'spoof'
        h = struct.pack('!HHHH', sport, 9000, 8 + len(body), 0) + body
        c = csum(pseudo(len(h)) + h) or 0xffff
        return h[:6] + struct.pack('!H', c) + h[8:]
    # SCTP common header (verification tag 0) + INIT chunk.
    init = struct.pack('!BBHIIHHI', 1, 0, 20, 0x1234 + i, 65535, 1, 1, 77 + i)
    pkt = struct.pack('!HHII', sport, 9000, 0, 0) + init
    c = crc32c(pkt)
    return pkt[:8] + struct.pack('<I', c) + pkt[12:]
for i in range(count):
    seg = l4(i)
    if v6:
        ip = struct.pack('!IHBB', 6 << 28, len(seg), num, 64) + sa.packed + da.packed
        et = 0x86dd
    else:
        h = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(seg), i, 0, 64, num, 0, sa.packed, da.packed)
        ip = h[:10] + struct.pack('!H', csum(h)) + h[12:]
        et = 0x0800
    s.send(dmac + smac + struct.pack('!H', et) + ip + seg)
"#;

struct Pod {
    ns: Netns,
    v4: String,
    v6: String,
}

struct Lab {
    nodes: [Netns; 2],
    /// x/a, y/b, z/a on node1; z/c, y/d on node2.
    pods: Vec<Pod>,
    dir: std::path::PathBuf,
    bridged: bool,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const X: usize = 0;
const Y: usize = 1;
const Z: usize = 2;
const Z2: usize = 3;
const Y2: usize = 4;
/// (namespace, name, node index, last address byte).
const PODS: [(&str, &str, usize, u8); 5] = [
    ("x", "a", 0, 10),
    ("y", "b", 0, 20),
    ("z", "a", 0, 30),
    ("z", "c", 1, 40),
    ("y", "d", 1, 50),
];

fn sh(ns: &Netns, cmd: &str) -> String {
    ns.sh(cmd).unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn mac(ns: &Netns, dev: &str) -> String {
    sh(ns, &format!("cat /sys/class/net/{dev}/address"))
        .trim()
        .to_string()
}

fn lab(bridged: bool) -> Lab {
    let nodes = [
        Netns::create("pal-raw-n").expect("netns"),
        Netns::create("pal-raw-n").expect("netns"),
    ];
    for (i, n) in nodes.iter().enumerate() {
        let k = 31 + i;
        sh(
            n,
            "ip link set lo up; sysctl -qw net.ipv4.ip_forward=1; \
             sysctl -qw net.ipv6.conf.all.forwarding=1; sysctl -qw net.ipv6.conf.default.forwarding=1",
        );
        if bridged {
            sh(
                n,
                &format!(
                    "ip link add cni0 type bridge; ip link set cni0 up; \
                     ip addr add 10.{k}.0.1/24 dev cni0; ip -6 addr add fd{k}::1/64 dev cni0 nodad; \
                     sysctl -qw net.bridge.bridge-nf-call-iptables=1; \
                     sysctl -qw net.bridge.bridge-nf-call-ip6tables=1"
                ),
            );
        }
    }
    // The node link and routes to the other node's pod CIDR.
    sh(
        &nodes[0],
        &format!(
            "ip link add lnk type veth peer name lnk netns {}; ip link set lnk up; \
             ip addr add 10.30.0.1/30 dev lnk; ip -6 addr add fd30::1/126 dev lnk nodad; \
             ip route add 10.32.0.0/24 via 10.30.0.2; ip -6 route add fd32::/64 via fd30::2",
            nodes[1].name()
        ),
    );
    sh(
        &nodes[1],
        "ip link set lnk up; ip addr add 10.30.0.2/30 dev lnk; \
         ip -6 addr add fd30::2/126 dev lnk nodad; \
         ip route add 10.31.0.0/24 via 10.30.0.1; ip -6 route add fd31::/64 via fd30::1",
    );
    let mut pods = Vec::new();
    for (i, (_, _, node, last)) in PODS.iter().enumerate() {
        let k = 31 + node;
        let n = &nodes[*node];
        let pod = Netns::create("pal-raw-p").expect("netns");
        let host = format!("vq{i}");
        let (v4, v6) = (format!("10.{k}.0.{last}"), format!("fd{k}::{last}"));
        sh(
            n,
            &format!(
                "ip link add {host} type veth peer name eth0 netns {}; ip link set {host} up",
                pod.name()
            ),
        );
        if bridged {
            sh(n, &format!("ip link set {host} master cni0"));
            sh(
                &pod,
                &format!(
                    "ip link set lo up; ip addr add {v4}/24 dev eth0; \
                     ip -6 addr add {v6}/64 dev eth0 nodad; ip link set eth0 up; \
                     ip route add default via 10.{k}.0.1; ip -6 route add default via fd{k}::1"
                ),
            );
        } else {
            sh(
                n,
                &format!(
                    "sysctl -qw net.ipv6.conf.{host}.forwarding=1; \
                     ip addr add 10.{k}.0.1/32 dev {host}; ip -6 addr add fd{k}::1/128 dev {host} nodad; \
                     ip route add {v4}/32 dev {host}; ip -6 route add {v6}/128 dev {host}"
                ),
            );
            sh(
                &pod,
                &format!(
                    "ip link set lo up; ip addr add {v4}/32 dev eth0; \
                     ip -6 addr add {v6}/128 dev eth0 nodad; ip link set eth0 up; \
                     ip route add 10.{k}.0.1/32 dev eth0; ip route add default via 10.{k}.0.1; \
                     ip -6 route add fd{k}::1/128 dev eth0; ip -6 route add default via fd{k}::1"
                ),
            );
        }
        // Count arrivals at port 9000 before anything else in the pod looks at them.
        sh(
            &pod,
            "for t in iptables ip6tables; do for p in tcp udp sctp; do \
             $t -t raw -A PREROUTING -p $p --dport 9000 -j ACCEPT; done; done",
        );
        pods.push(Pod { ns: pod, v4, v6 });
    }
    // Every pod talks to its node once (neighbours, bridge FDB).
    for (i, p) in pods.iter().enumerate() {
        let k = 31 + PODS[i].2;
        let _ = p.ns.exec(
            "python3",
            &[
                "-c",
                &format!(
                    "import socket\nfor f, a in ((socket.AF_INET, '10.{k}.0.1'), (socket.AF_INET6, 'fd{k}::1')):\n  \
                     s = socket.socket(f, socket.SOCK_DGRAM)\n  s.sendto(b'hi', (a, 9))"
                ),
            ],
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let dir = std::env::temp_dir().join(format!(
        "pal-rawspoof-{}-{}",
        std::process::id(),
        if bridged { "b" } else { "r" }
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("send.py"), SENDER).expect("script");
    Lab {
        nodes,
        pods,
        dir,
        bridged,
    }
}

fn state() -> ClusterState {
    cluster(
        vec![
            mk_node_cidrs("n1", &["10.31.0.0/24", "fd31::/64"]),
            mk_node_cidrs("n2", &["10.32.0.0/24", "fd32::/64"]),
        ],
        vec![
            mk_ns("x", &[("ns", "x")]),
            mk_ns("y", &[("ns", "y")]),
            mk_ns("z", &[("ns", "z")]),
        ],
        PODS.iter()
            .map(|(ns, name, node, last)| {
                let k = 31 + node;
                let (v4, v6) = (format!("10.{k}.0.{last}"), format!("fd{k}::{last}"));
                with_pod_ips(
                    mk_pod(ns, name, &[], &v4, &format!("n{}", node + 1)),
                    &[&v4, &v6],
                )
            })
            .collect(),
        vec![mk_policy(
            "x",
            "from-y",
            json!({"podSelector": {}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        )],
    )
}

impl Lab {
    /// Applies both nodes' payloads of both families.
    fn apply(&self, anti_spoofing: bool) {
        let st = state();
        for (i, node) in self.nodes.iter().enumerate() {
            let links = KernelLinks::in_netns(node.name()).expect("links");
            for family in [Family::V4, Family::V6] {
                let name = format!("n{}", i + 1);
                let mut cfg = NodeConfig::new(&name);
                cfg.family = family;
                cfg.anti_spoofing = anti_spoofing;
                let ips = local_pod_ips(&st, &name, family);
                cfg.pod_interfaces = pod_interfaces(&links, &ips).expect("dump");
                if anti_spoofing {
                    assert_eq!(
                        cfg.pod_interfaces.len(),
                        ips.len(),
                        "every pod placed ({family:?}, node {name}, bridged={}): {:?}",
                        self.bridged,
                        cfg.pod_interfaces
                    );
                }
                let exec = KernelExecutor::for_family(family, "auto", Some(node.name()))
                    .expect("executor");
                let payload = render(&compile(&st, &cfg));
                exec.apply(&payload).expect("apply");
                // What the kernel prints back is what was rendered (no rewrite at resync).
                let again = exec.apply(&payload).expect("apply again");
                assert!(
                    again.verified && !again.changed,
                    "read-back differs ({family:?}, node {name}): {again:?}"
                );
            }
        }
    }

    fn arrivals(&self, pod: usize, v6: bool) -> u64 {
        let t = if v6 { "ip6tables" } else { "iptables" };
        let out = sh(
            &self.pods[pod].ns,
            &format!("{t} -t raw -nvxL PREROUTING | awk 'NR>2 {{s+=$1}} END {{print s+0}}'"),
        );
        out.trim().parse().unwrap_or(0)
    }

    /// The MAC `from`'s frames to x/a go to: x/a itself on a shared bridge, else the node.
    fn next_hop_mac(&self, from: usize) -> String {
        let node = PODS[from].2;
        if self.bridged && node == 0 {
            mac(&self.pods[X].ns, "eth0")
        } else if self.bridged {
            mac(&self.nodes[node], "cni0")
        } else {
            mac(&self.nodes[node], &format!("vq{from}"))
        }
    }

    /// Sends 3 frames from pod `from` with source `src` to x/a; returns how many arrived.
    fn delivered(&self, from: usize, src: &str, v6: bool, proto: &str) -> u64 {
        let before = self.arrivals(X, v6);
        let dst = if v6 {
            &self.pods[X].v6
        } else {
            &self.pods[X].v4
        };
        let script = self.dir.join("send.py");
        let dmac = self.next_hop_mac(from);
        self.pods[from]
            .ns
            .exec(
                "python3",
                &[
                    script.to_str().unwrap_or_default(),
                    "eth0",
                    &dmac,
                    src,
                    dst,
                    proto,
                    "3",
                ],
            )
            .expect("send");
        std::thread::sleep(Duration::from_millis(150));
        self.arrivals(X, v6) - before
    }

    fn addr(&self, pod: usize, v6: bool) -> String {
        if v6 {
            self.pods[pod].v6.clone()
        } else {
            self.pods[pod].v4.clone()
        }
    }
}

fn run_layout(bridged: bool) {
    let lab = lab(bridged);
    // Control: without anti-spoofing, a forged allowed source passes (the test can fail).
    lab.apply(false);
    for v6 in [false, true] {
        let yb = lab.addr(Y, v6);
        assert_eq!(
            lab.delivered(Z, &yb, v6, "tcp"),
            3,
            "control: forged SYN passes without anti-spoofing (v6={v6}, bridged={bridged})"
        );
    }
    lab.apply(true);
    let mut failures = Vec::new();
    for v6 in [false, true] {
        let node1 = if v6 { "fd31::1" } else { "10.31.0.1" };
        for proto in ["tcp", "sctp", "udp"] {
            let what = format!("{proto} v6={v6} bridged={bridged}");
            let (yb, y2, z) = (lab.addr(Y, v6), lab.addr(Y2, v6), lab.addr(Z, v6));
            let cases: [(&str, usize, &str, u64); 7] = [
                ("legit y/b, same node", Y, &yb, 3),
                ("legit y/d, other node", Y2, &y2, 3),
                ("z/a own address (policy denies)", Z, &z, 0),
                ("z/a forging y/b, same node", Z, &yb, 0),
                ("z/a forging its node's address", Z, node1, 0),
                ("z/c forging y/b, other node", Z2, &yb, 0),
                ("z/c forging y/d, other node", Z2, &y2, 0),
            ];
            for (name, from, src, want) in cases {
                let got = lab.delivered(from, src, v6, proto);
                if got != want {
                    failures.push(format!("{what}: {name}: {got} of 3 arrived, want {want}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn raw_spoofed_packets_are_dropped_routed() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    run_layout(false);
}

#[test]
fn raw_spoofed_packets_are_dropped_bridged() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    run_layout(true);
}
