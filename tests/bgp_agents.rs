//! BGP mode with real agents: three `palisade agent --enable-bgp` processes in their node
//! namespaces, the lab's test API server, a router namespace running BIRD 2 (with BFD), and a
//! client that reaches the VIPs only through the router.
//!
//! ```text
//!   netns <p>-lan: bridge 198.51.100.0/24
//!   ├─ <p>-cp      .2    test API server
//!   ├─ <p>-node1   .11   palisade agent --enable-bgp=true --enable-l2=false + TCP backend
//!   ├─ <p>-node2   .12   ...
//!   ├─ <p>-node3   .13   ...
//!   ├─ <p>-router  .254  BIRD 2: passive BGP neighbours .11-.13 (AS 64501), BFD 100 ms x 3,
//!   │                    kernel protocol with `merge paths on` (ECMP), IP forwarding on
//!   └─ <p>-client  .100  route 203.0.113.0/24 via .254 (ICMP redirects off on both)
//! ```
//!
//! Objects are the README's worked example: BGPPeer `tor` {myASN 64500, peerASN 64501,
//! peerAddress 198.51.100.254, holdTime 9s, keepaliveTime 3s, bfdProfile fast}, BFDProfile
//! `fast` {100, 100, 3}, BGPAdvertisement {ipAddressPools: [bgp]}, and an IPAddressPool
//! `bgp` 203.0.113.10-203.0.113.50. Each node REDIRECTs TCP 80 to 203.0.113.0/24 to a
//! backend on 8080 that writes the node's name (the kube-proxy stand-in of the L2 tests).
//!
//! One test (one lab, about 30 s):
//! - a `Cluster` Service: the router's route has all three nodes as next hops; the client
//!   connects through the router;
//! - a `Local` Service with a ready endpoint on node2 only (an EndpointSlice): only node2 is a
//!   next hop; the endpoint moves to node3: only node3;
//! - SIGTERM of node1's agent: it exits 0, and its next hop is gone from the Cluster route
//!   (graceful withdrawal; BIRD's kernel sync may lag the session close by milliseconds, so
//!   the check waits up to 1 s after the exit);
//! - SIGKILL of node2's agent plus its link down: BFD removes its next hop (time printed).
//!
//! Needs root, `bird` and `cargo build -p palisade` (or `PALISADE_BIN`); prints `skipped:`
//! otherwise (under CI=true a missing `bird` fails).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use palisade_e2e::api::{ControlPlane, CONTROL_PLANE_IP};
use palisade_e2e::lab::{Lab, LabSpec, NodeHandle};
use palisade_e2e::lab_cluster::{FAST_LEASE_FLAGS, FAST_SYNC_FLAGS};
use palisade_e2e::process::LabProcess;
use palisade_e2e::{netns, poll, LabAgents};
use palisade_testapi::Store;
use serde_json::{json, Value};

const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
const NS: &str = "default";
const SYSTEM_NS: &str = "palisade-system";
const POOL: &str = "203.0.113.10-203.0.113.50";
const POOL_MATCH: &str = "203.0.113.0/24";
const BACKEND_PORT: u16 = 8080;

const AGENT_FLAGS: &[&str] = &[
    "--pod-namespace",
    SYSTEM_NS,
    "--enable-netpol=false",
    "--enable-loadbalancer=true",
    "--enable-l2=false",
    "--enable-bgp=true",
    "--memberlist-insecure",
    "--log-level",
    "info",
];

fn bird_config(nodes: &[Ipv4Addr]) -> String {
    let mut c = format!(
        "log stderr all;\nrouter id {ROUTER_IP};\n\
         protocol device {{ scan time 1; }}\n\
         protocol kernel {{\n  ipv4 {{ import none; export all; }};\n  merge paths on;\n}}\n\
         protocol bfd {{\n  interface \"*\" {{ min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }};\n}}\n\
         template bgp nodes {{\n  local {ROUTER_IP} as 64501;\n  passive on;\n  hold time 9;\n  \
         bfd on;\n  error wait time 1, 2;\n  ipv4 {{ import all; export none; }};\n}}\n"
    );
    for (i, ip) in nodes.iter().enumerate() {
        c.push_str(&format!(
            "protocol bgp node{} from nodes {{ neighbor {ip} as 64500; }}\n",
            i + 1
        ));
    }
    c
}

struct Backend {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    fn start(netns_name: &str, node: &str) -> Result<Backend> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        let (stop2, name, node) = (stop.clone(), netns_name.to_string(), node.to_string());
        let thread = std::thread::spawn(move || {
            let listener = netns::enter(&name).and_then(|()| {
                let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT))?;
                l.set_nonblocking(true)?;
                Ok(l)
            });
            let listener = match listener {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.write_all(format!("{node}\n").as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .context("backend did not start")??;
        Ok(Backend {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Lab, control plane, router with BIRD, backends, agents. Drops in that reverse order.
struct BgpLab {
    agents: LabAgents,
    bird: Option<LabProcess>,
    backends: Vec<Backend>,
    cp: Option<ControlPlane>,
    lab: Lab,
    nodes: Vec<NodeHandle>,
    router: String,
    client: String,
    kubeconfig: std::path::PathBuf,
    bird_sock: String,
}

impl Drop for BgpLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.agents.log_tails(40));
            if let Some(b) = &self.bird {
                eprintln!("bird: {}", b.output());
            }
        }
        self.agents.kill_all();
        self.bird = None;
        self.backends.clear();
        if let Some(cp) = self.cp.as_mut() {
            cp.stop();
        }
        self.cp = None;
        if let Err(e) = self.lab.teardown() {
            eprintln!("bgp lab teardown: {e:#}");
        }
    }
}

fn put(store: &Store, obj: Value) -> Result<()> {
    store
        .put_object(obj)
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("put_object: {e:?}"))
}

fn sysctl(netns_name: &str, kv: &str) -> Result<()> {
    netns::exec_ok(netns_name, &["sysctl", "-q", "-w", kv]).map(|_| ())
}

impl BgpLab {
    fn start() -> Result<BgpLab> {
        let bin = palisade_tests::palisade_bin();
        let mut spec = LabSpec::new(3);
        spec.serve_pods = false;
        spec.ports = Vec::new();
        let mut lab = Lab::new(spec)?;
        let cp_host = lab.add_lan_host("cp", CONTROL_PLANE_IP)?;
        let router = lab.add_lan_host("router", ROUTER_IP)?.netns;
        let client = lab
            .client()
            .cloned()
            .context("the lab has no client")?
            .netns;
        let nodes = lab.nodes().to_vec();
        let dir = lab.tmp_dir().to_path_buf();
        let mut me = BgpLab {
            agents: LabAgents::new(bin, &dir, &cp_host.netns, &nodes),
            bird: None,
            backends: Vec::new(),
            cp: None,
            lab,
            nodes: nodes.clone(),
            router: router.clone(),
            client: client.clone(),
            kubeconfig: dir.join("kubeconfig"),
            bird_sock: dir.join("bird.ctl").display().to_string(),
        };
        let cp = ControlPlane::start_lab(&cp_host.netns, &dir)?;
        me.kubeconfig = cp.agent_kubeconfig().to_path_buf();
        me.cp = Some(cp);

        // Router: forwards, sends no redirects (the client must keep using it); the client
        // reaches the pool through it.
        sysctl(&router, "net.ipv4.ip_forward=1")?;
        // Hash on ports too, so one client's connections spread over the next hops.
        sysctl(&router, "net.ipv4.fib_multipath_hash_policy=1")?;
        for k in ["all", "default", "eth0"] {
            sysctl(&router, &format!("net.ipv4.conf.{k}.send_redirects=0"))?;
            sysctl(&client, &format!("net.ipv4.conf.{k}.accept_redirects=0"))?;
        }
        netns::ip_in(
            &client,
            &["route", "add", POOL_MATCH, "via", &ROUTER_IP.to_string()],
        )?;
        let conf = dir.join("bird.conf");
        std::fs::write(
            &conf,
            bird_config(&nodes.iter().map(|n| n.ip).collect::<Vec<_>>()),
        )?;
        let conf_s = conf.display().to_string();
        let sock_s = me.bird_sock.clone();
        me.bird = Some(me.lab.spawn_in(
            &router,
            "bird",
            &["bird", "-f", "-c", &conf_s, "-s", &sock_s],
        )?);

        let store = me.store()?;
        for ns in [NS, SYSTEM_NS] {
            put(
                store,
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            )?;
        }
        for n in &nodes {
            put(
                store,
                json!({"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": n.name, "labels": {"kubernetes.io/hostname": n.name}},
                    "spec": {"podCIDR": n.pod_cidr_text(), "podCIDRs": [n.pod_cidr_text()]},
                    "status": {"addresses": [
                        {"type": "InternalIP", "address": n.ip.to_string()},
                        {"type": "Hostname", "address": n.name}]}}),
            )?;
        }
        let pd = "palisade.dev/v1alpha1";
        put(
            store,
            json!({"apiVersion": pd, "kind": "IPAddressPool", "metadata": {"name": "bgp"},
                "spec": {"addresses": [POOL]}}),
        )?;
        // The README's worked example, with the lab router's address.
        put(
            store,
            json!({"apiVersion": pd, "kind": "BGPPeer", "metadata": {"name": "tor"},
                "spec": {"myASN": 64500, "peerASN": 64501, "peerAddress": ROUTER_IP.to_string(),
                    "holdTime": "9s", "keepaliveTime": "3s", "bfdProfile": "fast"}}),
        )?;
        put(
            store,
            json!({"apiVersion": pd, "kind": "BFDProfile", "metadata": {"name": "fast"},
                "spec": {"receiveInterval": 100, "transmitInterval": 100, "detectMultiplier": 3}}),
        )?;
        put(
            store,
            json!({"apiVersion": pd, "kind": "BGPAdvertisement", "metadata": {"name": "bgp"},
                "spec": {"ipAddressPools": ["bgp"]}}),
        )?;
        for n in &nodes {
            netns::exec_ok(
                &n.netns,
                &[
                    "iptables",
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-d",
                    POOL_MATCH,
                    "-p",
                    "tcp",
                    "--dport",
                    "80",
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    "8080",
                ],
            )?;
            me.backends.push(Backend::start(&n.netns, &n.name)?);
        }
        let flags = [AGENT_FLAGS, FAST_LEASE_FLAGS, FAST_SYNC_FLAGS].concat();
        for n in &nodes {
            me.agents.start(&n.name, &me.kubeconfig, &flags)?;
        }
        for n in &nodes {
            me.agents.wait_ready(&n.name, Duration::from_secs(30))?;
        }
        Ok(me)
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

    fn add_service(&self, name: &str, policy: &str) -> Result<()> {
        put(
            self.store()?,
            json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"namespace": NS, "name": name},
                "spec": {"type": "LoadBalancer", "externalTrafficPolicy": policy,
                    "selector": {"app": name},
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
        )
    }

    /// An EndpointSlice with one ready endpoint on `node`.
    fn set_endpoint(&self, service: &str, node: &str) -> Result<()> {
        put(
            self.store()?,
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"namespace": NS, "name": format!("{service}-1"),
                    "labels": {"kubernetes.io/service-name": service}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.244.9.9"], "nodeName": node,
                    "conditions": {"ready": true}}],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}),
        )
    }

    fn wait_vip(&self, name: &str) -> Result<IpAddr> {
        let store = self.store()?;
        poll(Duration::from_secs(20), Duration::from_millis(20), || {
            Ok(store
                .get_object("v1", "Service", Some(NS), name)
                .and_then(|s| {
                    s.pointer("/status/loadBalancer/ingress/0/ip")
                        .and_then(Value::as_str)
                        .and_then(|ip| ip.parse().ok())
                }))
        })?
        .with_context(|| format!("Service {name} got no IP"))
    }

    fn next_hops(&self, vip: IpAddr) -> Result<BTreeSet<IpAddr>> {
        let out = netns::ip_in(&self.router, &["-4", "route", "show", &vip.to_string()])?;
        let words: Vec<&str> = out.split_whitespace().collect();
        let mut hops = BTreeSet::new();
        for pair in words.windows(2) {
            if pair[0] == "via" {
                hops.insert(pair[1].parse().with_context(|| format!("route: {out}"))?);
            }
        }
        Ok(hops)
    }

    fn wait_hops(&self, vip: IpAddr, want: &[&str], limit: Duration) -> Result<Duration> {
        let want: BTreeSet<IpAddr> = want
            .iter()
            .map(|n| {
                self.nodes
                    .iter()
                    .find(|h| h.name == *n)
                    .map(|h| IpAddr::V4(h.ip))
                    .with_context(|| format!("no node {n}"))
            })
            .collect::<Result<_>>()?;
        let started = Instant::now();
        let mut last = BTreeSet::new();
        while started.elapsed() < limit {
            last = self.next_hops(vip)?;
            if last == want {
                return Ok(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let bird = self.bird.as_ref().map(|b| b.output()).unwrap_or_default();
        bail!("next hops of {vip}: {last:?}, wanted {want:?} within {limit:?}\nbird: {bird}")
    }

    /// Waits until BIRD's BFD session with `node` is Up (its fast timers in force).
    fn wait_bfd_up(&self, node: &str) -> Result<()> {
        let ip = self
            .nodes
            .iter()
            .find(|n| n.name == node)
            .map(|n| n.ip.to_string())
            .with_context(|| format!("no node {node}"))?;
        let started = Instant::now();
        loop {
            let out = netns::exec_ok(
                &self.router,
                &["birdc", "-s", &self.bird_sock, "show", "bfd", "sessions"],
            )?;
            let up = out
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ip.as_str()) && l.contains(" Up "));
            if up {
                // One more poll sequence for BIRD to settle on 100 ms.
                std::thread::sleep(Duration::from_millis(300));
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!("BIRD's BFD session with {node} not Up:\n{out}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One TCP connection from the client to `vip:80`: the banner (node name).
    fn connect(&self, vip: IpAddr) -> Result<String> {
        netns::run_in(&self.client, move || {
            let t = Duration::from_secs(2);
            let mut s = TcpStream::connect_timeout(&SocketAddr::new(vip, 80), t)?;
            s.set_read_timeout(Some(t))?;
            let mut buf = String::new();
            s.read_to_string(&mut buf)?;
            let name = buf.trim().to_string();
            ensure!(!name.is_empty(), "empty banner");
            Ok(name)
        })
    }
}

/// What a prober saw.
#[derive(Debug, Default)]
struct Probed {
    attempts: u64,
    connect_failures: u64,
    /// Connections that were accepted but then reset or closed without a banner.
    resets: u64,
    served: BTreeSet<String>,
}

/// Opens connection after connection from the client to `vip:80` until stopped.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Probed>>>,
}

impl Prober {
    fn start(client_ns: &str, vip: IpAddr) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, ns) = (stop.clone(), client_ns.to_string());
        let thread = std::thread::spawn(move || -> Result<Probed> {
            netns::enter(&ns)?;
            let mut p = Probed::default();
            let t = Duration::from_millis(500);
            while !stop2.load(Ordering::Relaxed) {
                p.attempts += 1;
                match TcpStream::connect_timeout(&SocketAddr::new(vip, 80), t) {
                    Err(_) => p.connect_failures += 1,
                    Ok(mut s) => {
                        s.set_read_timeout(Some(t))?;
                        let mut buf = String::new();
                        match s.read_to_string(&mut buf) {
                            Ok(_) if !buf.trim().is_empty() => {
                                p.served.insert(buf.trim().to_string());
                            }
                            _ => p.resets += 1,
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(p)
        });
        Prober {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Result<Probed> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .context("stopped twice")?
            .join()
            .map_err(|_| anyhow::anyhow!("prober panicked"))?
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ready(test: &str) -> bool {
    if !palisade_e2e::lab_ready(test) {
        return false;
    }
    if !palisade_e2e::on_path("bird") {
        if palisade_e2e::under_ci() {
            panic!("{test}: bird is not installed (make deps installs bird2)");
        }
        println!("skipped: {test} needs bird (apt-get install bird2)");
        return false;
    }
    let bin = palisade_tests::palisade_bin();
    if !bin.exists() {
        println!(
            "skipped: {test} needs {} (cargo build -p palisade)",
            bin.display()
        );
        return false;
    }
    true
}

#[test]
fn agents_announce_cluster_and_local_withdraw_on_sigterm_and_bfd_on_crash() -> Result<()> {
    if !ready("agents_announce_cluster_and_local_withdraw_on_sigterm_and_bfd_on_crash") {
        return Ok(());
    }
    let mut lab = BgpLab::start()?;
    lab.add_service("web", "Cluster")?;
    lab.add_service("api", "Local")?;
    lab.set_endpoint("api", "node2")?;
    let web = lab.wait_vip("web")?;
    let api = lab.wait_vip("api")?;
    let took = lab.wait_hops(web, &["node1", "node2", "node3"], Duration::from_secs(30))?;
    println!("Cluster VIP {web}: ECMP over three nodes {took:?} after the IP was assigned");
    let banner = lab.connect(web)?;
    assert!(banner.starts_with("node"), "{banner}");
    println!("client through the router reached {banner}");

    lab.wait_hops(api, &["node2"], Duration::from_secs(10))?;
    assert_eq!(lab.connect(api)?, "node2");
    lab.set_endpoint("api", "node3")?;
    lab.wait_hops(api, &["node3"], Duration::from_secs(10))?;
    assert_eq!(lab.connect(api)?, "node3");

    // Metrics of a node with an established session and BFD up.
    lab.wait_bfd_up("node3")?;
    let m = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        let up = lab
            .agents
            .metric("node3", "palisade_bgp_session_up{peer=\"tor\"}");
        let bfd = lab
            .agents
            .metric("node3", "palisade_bgp_bfd_up{peer=\"tor\"}");
        let sent = lab
            .agents
            .metric("node3", "palisade_bgp_prefixes_sent{peer=\"tor\"}");
        Ok((up == Some(1.0) && bfd == Some(1.0) && sent == Some(2.0)).then_some(()))
    })?;
    assert!(
        m.is_some(),
        "node3 metrics: {:?}",
        lab.agents.get("node3", "/metrics")
    );

    // Status objects: node3's session and its Services.
    let store = lab.store()?;
    let pd = "palisade.dev/v1alpha1";
    let sess = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        Ok(store
            .get_object(pd, "BGPSessionStatus", None, "tor.node3")
            .filter(|o| {
                o.pointer("/status/state").and_then(Value::as_str) == Some("Established")
                    && o.pointer("/status/bfdState").and_then(Value::as_str) == Some("Up")
                    && o.pointer("/status/prefixesSent").and_then(Value::as_u64) == Some(2)
            }))
    })?;
    let sess = sess.context("BGPSessionStatus tor.node3 not Established with BFD Up")?;
    assert_eq!(sess["status"]["peerAddress"], ROUTER_IP.to_string());
    assert!(sess.pointer("/status/establishedAt").is_some(), "{sess}");
    for svc in ["web", "api"] {
        let name = format!("{svc}.node3");
        let o = poll(Duration::from_secs(10), Duration::from_millis(100), || {
            Ok(store.get_object(pd, "ServiceBGPStatus", Some(NS), &name))
        })?
        .with_context(|| format!("no ServiceBGPStatus {name}"))?;
        assert_eq!(o["status"]["peers"], json!(["tor"]), "{o}");
        assert_eq!(
            o["metadata"]["ownerReferences"][0]["kind"], "Service",
            "{o}"
        );
    }
    // node2 no longer has api's endpoint: no object for it.
    let gone = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        Ok(store
            .get_object(pd, "ServiceBGPStatus", Some(NS), "api.node2")
            .is_none()
            .then_some(()))
    })?;
    assert!(gone.is_some(), "api.node2 still there");
    let _ = store;

    // SIGTERM while a client opens connection after connection (spread over the nodes by the
    // router's L4 hash): node1 withdraws, exits 0, then its link goes down — no connection
    // attempt is lost (a SYN the router still sent to node1 would time out once the link is
    // down). Resets of connections that were open while the router re-hashed are counted
    // apart: that is ECMP, not the withdrawal.
    let prober = Prober::start(&lab.client, web);
    std::thread::sleep(Duration::from_millis(300));
    let status = lab
        .agents
        .terminate("node1", Duration::from_secs(15))?
        .context("node1's agent did not exit within 15 s of SIGTERM")?;
    assert!(status.success(), "agent exit status {status}");
    let lag = lab.wait_hops(web, &["node2", "node3"], Duration::from_secs(1))?;
    println!("node1's next hop gone {lag:?} after its agent exited (graceful withdrawal)");
    netns::ip_in(&lab.nodes[0].netns, &["link", "set", "eth0", "down"])?;
    std::thread::sleep(Duration::from_millis(500));
    let calm = prober.stop()?;
    println!("during SIGTERM of node1: {calm:?}");
    assert!(
        calm.served.contains("node1"),
        "no connection reached node1: {calm:?}"
    );
    assert_eq!(calm.connect_failures, 0, "{calm:?}");
    let log = lab.agents.log("node1");
    assert!(log.contains("BGP sessions closed"), "{log}");
    assert!(
        lab.store()?
            .get_object(pd, "BGPSessionStatus", None, "tor.node1")
            .is_none(),
        "node1's session object outlived its agent"
    );

    // Crash: node2's agent SIGKILLed and its link down; BFD (100 ms x 3) at the router.
    let node2 = lab.nodes[1].clone();
    lab.wait_bfd_up("node2")?;
    let prober = Prober::start(&lab.client, web);
    std::thread::sleep(Duration::from_millis(300));
    // Link first: a killed process's sockets would otherwise send FIN, and the router would
    // drop the session at once without BFD.
    netns::ip_in(&node2.netns, &["link", "set", "eth0", "down"])?;
    let t = Instant::now();
    ensure!(lab.agents.kill("node2")?, "no agent on node2");
    lab.wait_hops(web, &["node3"], Duration::from_secs(9))?;
    let after = t.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let crash = prober.stop()?;
    println!("during the crash of node2: {crash:?}");
    // The contrast that makes the zero above mean something: without a withdrawal, SYNs
    // hashed to the dead node are lost until BFD removes it.
    assert!(crash.connect_failures >= 1, "{crash:?}");
    println!("crashed node2's next hop gone after {after:?} (BFD 100 ms x 3, hold time 9 s)");
    assert!(
        after < Duration::from_millis(4500),
        "removed after {after:?}: the hold timer, not BFD"
    );
    // Not before BFD could have noticed (200 ms: two lost packets at 100 ms).
    assert!(
        after >= Duration::from_millis(150),
        "removed after {after:?}: too soon for BFD, something else closed the session"
    );
    assert_eq!(lab.connect(web)?, "node3");
    Ok(())
}
