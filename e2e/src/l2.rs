//! The L2 harness: a three-node lab with real `palisade agent` processes running the L2
//! announcer, a test API server inside the lab, the client's raw-socket wire (ARP / NDP
//! requests and a capture of every reply, gratuitous ARP and NA) and TCP probers.
//!
//! Used by `tests/l2_failover.rs` (the topology is drawn there), the other real-agent L2 tests
//! and the benchmark `tests/examples/l2_failover_bench.rs`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::api::{ControlPlane, CONTROL_PLANE_IP};
use crate::lab::{Lab, LabSpec, NodeHandle};
use crate::lab_cluster::{mac_of, FAST_LEASE_FLAGS, FAST_SYNC_FLAGS};
use crate::netns;
pub use crate::{poll, LabAgents};
use anyhow::{bail, ensure, Context, Result};
use palisade_speaker::packet::{self, Observed};
use palisade_testapi::{Outage, Store};
use pnet::datalink::{self, Channel, MacAddr};
use serde_json::{json, Value};

/// The Service port clients connect to, and where the node backends listen.
pub const SERVICE_PORT: u16 = 80;
pub const BACKEND_PORT: u16 = 8080;
/// The pool range and the REDIRECT match that covers it.
pub const POOL_V4: &str = "198.51.100.200-198.51.100.250";
pub const POOL_V4_MATCH: &str = "198.51.100.192/26";
pub const POOL_V6: &str = "fd00:51:100::200-fd00:51:100::2ff";
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x51, 0x100, 0, 0, 0, 0, 0x100);
pub const NS: &str = "default";
pub const SYSTEM_NS: &str = "palisade-system";
/// Node label the L2Advertisement's `nodeSelectors` match on (once they are set).
pub const L2_LABEL: &str = "lab.palisade.dev/l2";
/// Every agent flag that is not per node, besides the fast lease and sync timings
/// (`FAST_LEASE_FLAGS`, `FAST_SYNC_FLAGS`).
pub const AGENT_FLAGS: &[&str] = &[
    "--pod-namespace",
    SYSTEM_NS,
    "--enable-netpol=false",
    "--enable-loadbalancer=true",
    "--enable-l2=true",
    "--memberlist-port",
    "7946",
    "--memberlist-timeout",
    "1s",
    "--memberlist-interval",
    "200ms",
    "--log-level",
    "info",
];

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// IPv6 address of node `index` on the LAN (`fd00:51:100::1N`, like its IPv4 `.1N`).
pub fn node_v6(index: usize) -> Ipv6Addr {
    // 0x10 + index reads as "1N" in hex for N < 10.
    Ipv6Addr::new(0xfd00, 0x51, 0x100, 0, 0, 0, 0, 0x10 + index as u16)
}

/// What to build.
#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: usize,
    /// IPv6 on the LAN, an IPv6 pool and IPv6 pod CIDRs (for NDP).
    pub ipv6: bool,
    /// Indices of the nodes that also sit on a second LAN segment ([`LAN_B`], their and
    /// the client's `eth1`, no route between the segments), with its own pool `lan-b`.
    pub segment_b: Vec<usize>,
    /// More agent flags.
    pub extra_flags: Vec<&'static str>,
}

/// The second segment: subnet prefix, pool, REDIRECT match, client address.
pub const LAN_B: &str = "198.51.101";
pub const POOL_B: &str = "198.51.101.200-198.51.101.250";
pub const POOL_B_MATCH: &str = "198.51.101.192/26";
pub const CLIENT_B: &str = "198.51.101.100";

/// A TCP backend in a node netns: accepts on [`BACKEND_PORT`], writes the node's name.
struct Backend {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    fn start(netns_name: &str, node: &str) -> Result<Backend> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = {
            let (stop, name, node) = (stop.clone(), netns_name.to_string(), node.to_string());
            std::thread::Builder::new()
                .name(format!("backend-{node}"))
                .spawn(move || {
                    let listener = netns::enter(&name).and_then(|()| {
                        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT))
                            .context("binding the backend")?;
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
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((mut s, _)) => {
                                let _ = s.set_nonblocking(false);
                                let _ = s.write_all(format!("{node}\n").as_bytes());
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(2)),
                        }
                    }
                })
                .context("spawning a backend")?
        };
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

/// The lab, its control plane, one agent per node (asked over HTTP from the control-plane
/// host), backends. Drop order: agents, backends, control plane, lab (namespaces).
pub struct L2Cluster {
    pub agents: LabAgents,
    backends: Vec<Backend>,
    cp: Option<ControlPlane>,
    lab: Lab,
    pub nodes: Vec<NodeHandle>,
    pub macs: BTreeMap<String, MacAddr>,
    pub client_netns: String,
    pub cp_netns: String,
    kubeconfig: PathBuf,
    pub opts: Options,
}

impl Drop for L2Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.agents.log_tails(40));
        }
        // Explicit order (fields would drop in this order anyway).
        self.agents.kill_all();
        self.backends.clear();
        if let Some(cp) = self.cp.as_mut() {
            cp.stop();
        }
        self.cp = None;
        if let Err(e) = self.lab.teardown() {
            eprintln!("l2 lab teardown: {e:#}");
        }
    }
}

fn eth0_mac(netns_name: &str) -> Result<MacAddr> {
    let mac = mac_of(netns_name, "eth0")?;
    mac.parse()
        .ok()
        .with_context(|| format!("MAC {mac} of eth0 in {netns_name}"))
}

/// One TCP connection to `vip:80` from inside `netns_name`: the banner (node name).
pub fn tcp_once(netns_name: &str, vip: IpAddr, timeout: Duration) -> Result<String> {
    netns::run_in(netns_name, move || tcp_here(vip, timeout))
}

fn tcp_here(vip: IpAddr, timeout: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::new(vip, SERVICE_PORT), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let name = buf.trim().to_string();
    ensure!(!name.is_empty(), "empty banner");
    Ok(name)
}

impl L2Cluster {
    /// Builds the lab, the control plane, the objects (Namespaces, Nodes, pools, an
    /// L2Advertisement with an empty spec), backends, and starts one agent per node,
    /// waiting until every agent is ready.
    pub fn start(opts: Options) -> Result<L2Cluster> {
        let bin = crate::netpol::palisade_bin()?;
        let mut spec = LabSpec::new(opts.nodes);
        spec.serve_pods = false;
        spec.ports = Vec::new();
        let mut lab = Lab::new(spec)?;
        let cp_host = lab.add_lan_host("cp", CONTROL_PLANE_IP)?;
        let client = lab.client().cloned().context("the lab has no client")?;
        let nodes = lab.nodes().to_vec();
        let dir = lab.tmp_dir().to_path_buf();
        let mut cluster = L2Cluster {
            agents: LabAgents::new(bin, &dir, &cp_host.netns, &nodes),
            backends: Vec::new(),
            cp: None,
            lab,
            nodes: nodes.clone(),
            macs: BTreeMap::new(),
            client_netns: client.netns.clone(),
            cp_netns: cp_host.netns.clone(),
            kubeconfig: dir.join("kubeconfig"),
            opts: opts.clone(),
        };
        // From here on an error drops `cluster`, which removes everything.
        let cp = ControlPlane::start_lab(&cp_host.netns, &dir)?;
        cluster.kubeconfig = cp.agent_kubeconfig().to_path_buf();
        cluster.cp = Some(cp);
        for n in &nodes {
            cluster.macs.insert(n.name.clone(), eth0_mac(&n.netns)?);
        }
        if !opts.segment_b.is_empty() {
            let lanb = cluster.lab.add_namespace("lanb")?;
            netns::ip_in(&lanb, &["link", "add", "br0", "type", "bridge"])?;
            netns::ip_in(&lanb, &["link", "set", "br0", "up"])?;
            let mut ends: Vec<(String, String)> = opts
                .segment_b
                .iter()
                .filter_map(|i| nodes.iter().find(|n| n.index == *i))
                .map(|n| (n.netns.clone(), format!("{LAN_B}.{}/24", 10 + n.index)))
                .collect();
            ends.push((client.netns.clone(), format!("{CLIENT_B}/24")));
            for (k, (ns, addr)) in ends.iter().enumerate() {
                let port = format!("b{k}");
                netns::ip_in(
                    &lanb,
                    &[
                        "link", "add", &port, "type", "veth", "peer", "name", "eth1", "netns", ns,
                    ],
                )?;
                netns::ip_in(&lanb, &["link", "set", &port, "master", "br0", "up"])?;
                netns::ip_in(ns, &["addr", "add", addr, "dev", "eth1"])?;
                netns::ip_in(ns, &["link", "set", "eth1", "up"])?;
            }
        }
        if opts.ipv6 {
            for n in &nodes {
                netns::ip_in(
                    &n.netns,
                    &[
                        "addr",
                        "add",
                        &format!("{}/64", node_v6(n.index)),
                        "dev",
                        "eth0",
                        "nodad",
                    ],
                )?;
            }
            netns::ip_in(
                &client.netns,
                &[
                    "addr",
                    "add",
                    &format!("{CLIENT_V6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
        }
        let store = cluster.store()?;
        for ns in [NS, SYSTEM_NS] {
            store
                .put_object(
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
                )
                .map_err(|e| anyhow::anyhow!("namespace {ns}: {e:?}"))?;
        }
        for n in &nodes {
            let mut cidrs = vec![n.pod_cidr_text()];
            if opts.ipv6 {
                cidrs.push(format!("fd00:10:244:{}::/64", n.index));
            }
            put(
                store,
                json!({
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": n.name, "labels": {
                        "kubernetes.io/hostname": n.name, L2_LABEL: "on"}},
                    "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs},
                    "status": {"addresses": [
                        {"type": "InternalIP", "address": n.ip.to_string()},
                        {"type": "Hostname", "address": n.name}]}
                }),
            )?;
        }
        put(
            store,
            json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "IPAddressPool",
                   "metadata": {"name": "lan"}, "spec": {"addresses": [POOL_V4]}}),
        )?;
        if opts.ipv6 {
            put(
                store,
                json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "IPAddressPool",
                       "metadata": {"name": "lan6"}, "spec": {"addresses": [POOL_V6]}}),
            )?;
        }
        if !opts.segment_b.is_empty() {
            put(
                store,
                json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "IPAddressPool",
                       "metadata": {"name": "lan-b"},
                       "spec": {"addresses": [POOL_B], "autoAssign": false}}),
            )?;
        }
        cluster.set_advertisement(None)?;
        // The kube-proxy stand-in (see the module docs).
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
                    POOL_V4_MATCH,
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
            if !opts.segment_b.is_empty() {
                netns::exec_ok(
                    &n.netns,
                    &[
                        "iptables",
                        "-t",
                        "nat",
                        "-A",
                        "PREROUTING",
                        "-d",
                        POOL_B_MATCH,
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
            }
            cluster.backends.push(Backend::start(&n.netns, &n.name)?);
        }
        let names = cluster.node_names();
        for n in &names {
            cluster.start_agent(n)?;
        }
        for n in &names {
            cluster.agents.wait_ready(n, Duration::from_secs(30))?;
        }
        Ok(cluster)
    }

    pub fn store(&self) -> Result<&Store> {
        Ok(self
            .cp
            .as_ref()
            .context("control plane stopped")?
            .test_server()
            .context("not the lab's API server")?
            .store())
    }

    pub fn set_outage(&self, outage: Outage) -> Result<()> {
        self.cp
            .as_ref()
            .context("control plane stopped")?
            .set_outage(outage)
    }

    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    pub fn node(&self, name: &str) -> Result<&NodeHandle> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    pub fn mac(&self, node: &str) -> MacAddr {
        self.macs[node]
    }

    /// The node whose eth0 has `mac`, or the MAC as text.
    pub fn who(&self, mac: MacAddr) -> String {
        self.macs
            .iter()
            .find(|(_, m)| **m == mac)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| format!("unknown {mac}"))
    }

    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// Starts (or restarts) the agent of `node` inside its namespace.
    /// `Options::extra_flags` may also override one of [`AGENT_FLAGS`]' `--flag value` pairs
    /// (e.g. `--memberlist-timeout 4s`): the default pair is left out then.
    pub fn start_agent(&mut self, node: &str) -> Result<()> {
        let extra = &self.opts.extra_flags;
        let mut defaults: Vec<&str> = Vec::new();
        let mut i = 0;
        while i < AGENT_FLAGS.len() {
            let pair = AGENT_FLAGS[i].starts_with("--")
                && !AGENT_FLAGS[i].contains('=')
                && AGENT_FLAGS.get(i + 1).is_some_and(|v| !v.starts_with("--"));
            let n = if pair { 2 } else { 1 };
            if !(pair && extra.contains(&AGENT_FLAGS[i])) {
                defaults.extend_from_slice(&AGENT_FLAGS[i..i + n]);
            }
            i += n;
        }
        let flags = [&defaults, FAST_LEASE_FLAGS, FAST_SYNC_FLAGS, extra].concat();
        self.agents.start(node, &self.kubeconfig, &flags)
    }

    /// SIGKILLs the agent of `node`; returns the instant just before the signal.
    pub fn kill_agent(&mut self, node: &str) -> Result<Instant> {
        let t = Instant::now();
        ensure!(self.agents.kill(node)?, "no agent on {node}");
        Ok(t)
    }

    /// A `type: LoadBalancer` Service with TCP port 80 (single-stack IPv6 with `v6`).
    pub fn add_service(&self, name: &str, v6: bool) -> Result<()> {
        let mut spec = json!({"type": "LoadBalancer", "selector": {"app": name},
                              "ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "TCP"}]});
        if v6 {
            spec["ipFamilies"] = json!(["IPv6"]);
            spec["ipFamilyPolicy"] = json!("SingleStack");
        }
        put(
            self.store()?,
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"namespace": NS, "name": name}, "spec": spec}),
        )
    }

    /// A `type: LoadBalancer` Service (TCP 80) with its IP from pool `pool`.
    pub fn add_service_from(&self, name: &str, pool: &str) -> Result<()> {
        put(
            self.store()?,
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"namespace": NS, "name": name,
                                "annotations": {"palisade.dev/address-pool": pool}},
                   "spec": {"type": "LoadBalancer", "selector": {"app": name},
                            "ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "TCP"}]}}),
        )
    }

    /// Waits until the Service has an IP in its status.
    pub fn wait_vip(&self, name: &str, timeout: Duration) -> Result<IpAddr> {
        let store = self.store()?;
        poll(timeout, Duration::from_millis(20), || {
            Ok(store
                .get_object("v1", "Service", Some(NS), name)
                .and_then(|s| {
                    s.pointer("/status/loadBalancer/ingress/0/ip")
                        .and_then(Value::as_str)
                        .and_then(|ip| ip.parse().ok())
                }))
        })?
        .with_context(|| format!("Service {name} got no IP within {timeout:?}"))
    }

    /// Replaces the L2Advertisement: empty spec, or `nodeSelectors` matching
    /// `L2_LABEL=<value>`.
    pub fn set_advertisement(&self, selector_value: Option<&str>) -> Result<()> {
        let spec = match selector_value {
            None => json!({}),
            Some(v) => json!({"nodeSelectors": [{"matchLabels": {L2_LABEL: v}}]}),
        };
        put(
            self.store()?,
            json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "L2Advertisement",
                   "metadata": {"name": "lan"}, "spec": spec}),
        )
    }

    /// Sets the Node's `L2_LABEL`.
    pub fn set_node_label(&self, node: &str, value: &str) -> Result<()> {
        let store = self.store()?;
        let mut n = store
            .get_object("v1", "Node", None, node)
            .with_context(|| format!("no Node {node}"))?;
        n["metadata"]["labels"][L2_LABEL] = json!(value);
        if let Some(m) = n["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        put(store, n)
    }

    /// Applies `f` to the Node object `node` and stores it.
    pub fn edit_node(&self, node: &str, f: impl FnOnce(&mut Value)) -> Result<()> {
        let store = self.store()?;
        let mut n = store
            .get_object("v1", "Node", None, node)
            .with_context(|| format!("no Node {node}"))?;
        f(&mut n);
        if let Some(m) = n["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        put(store, n)
    }

    /// `L2Announced` Event notes on the Service.
    pub fn announced_notes(&self, service: &str) -> Result<Vec<String>> {
        let store = self.store()?;
        let mut notes = Vec::new();
        for e in store.list_objects("events.k8s.io/v1", "Event", Some(NS)) {
            if e["reason"] == "L2Announced" && e["regarding"]["name"] == service {
                notes.push(e["note"].as_str().unwrap_or_default().to_string());
            }
        }
        for e in store.list_objects("v1", "Event", Some(NS)) {
            if e["reason"] == "L2Announced" && e["involvedObject"]["name"] == service {
                notes.push(e["message"].as_str().unwrap_or_default().to_string());
            }
        }
        Ok(notes)
    }

    /// The `ServiceL2Status` objects of a Service, as sorted `(name, node, ips)`.
    pub fn l2_statuses(&self, service: &str) -> Result<Vec<(String, String, Vec<String>)>> {
        let store = self.store()?;
        let mut out: Vec<(String, String, Vec<String>)> = store
            .list_objects("palisade.dev/v1alpha1", "ServiceL2Status", Some(NS))
            .into_iter()
            .filter(|o| o["status"]["serviceName"] == service)
            .map(|o| {
                let ips = o["status"]["ips"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect();
                (
                    o["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    o["status"]["node"].as_str().unwrap_or_default().to_string(),
                    ips,
                )
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Waits until the Service's only `ServiceL2Status` says `node` announces `ip`;
    /// returns what was last seen on timeout.
    pub fn wait_l2_status(
        &self,
        service: &str,
        node: &str,
        ip: IpAddr,
    ) -> std::result::Result<(), Vec<(String, String, Vec<String>)>> {
        let want = vec![(
            format!("{service}.{node}"),
            node.to_string(),
            vec![ip.to_string()],
        )];
        let mut last = Vec::new();
        let seen = poll(Duration::from_secs(10), Duration::from_millis(100), || {
            last = self.l2_statuses(service).unwrap_or_default();
            last == want
        });
        if seen {
            Ok(())
        } else {
            Err(last)
        }
    }

    /// The client kernel's neighbour entry for `ip`: its MAC, if it has one.
    pub fn client_neighbour(&self, ip: IpAddr) -> Result<Option<MacAddr>> {
        let out = netns::ip_in(
            &self.client_netns,
            &["neigh", "show", &ip.to_string(), "dev", "eth0"],
        )?;
        let mut words = out.split_whitespace();
        if words.by_ref().any(|w| w == "lladdr") {
            return Ok(words.next().and_then(|m| m.parse().ok()));
        }
        Ok(None)
    }

    /// The bridge-side veth of node's eth0 (in the LAN namespace), found by its ifindex.
    pub fn bridge_port(&self, node: &str) -> Result<String> {
        let n = self.node(node)?;
        let out = netns::ip_in(&n.netns, &["-o", "link", "show", "eth0"])?;
        let peer: u32 = out
            .split_whitespace()
            .nth(1)
            .and_then(|w| w.trim_end_matches(':').split_once("@if"))
            .and_then(|(_, i)| i.parse().ok())
            .with_context(|| format!("no peer ifindex in {out}"))?;
        let lan = netns::ip_in(self.lab.lan_netns(), &["-o", "link", "show"])?;
        lan.lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                let idx: u32 = w.next()?.trim_end_matches(':').parse().ok()?;
                let name = w
                    .next()?
                    .trim_end_matches(':')
                    .split('@')
                    .next()?
                    .to_string();
                (idx == peer).then_some(name)
            })
            .with_context(|| format!("no link with index {peer} in the LAN namespace"))
    }

    /// Sets the node's LAN cable (the bridge-side veth) up or down.
    pub fn set_link(&self, node: &str, up: bool) -> Result<()> {
        let port = self.bridge_port(node)?;
        netns::ip_in(
            self.lab.lan_netns(),
            &["link", "set", &port, if up { "up" } else { "down" }],
        )?;
        Ok(())
    }

    /// Starts the client's wire (capture + ARP/NS probe rounds for `targets`).
    pub fn start_wire(&self, targets: &[IpAddr], limit: Duration) -> Result<Wire> {
        Wire::start(&self.client_netns, targets, limit)
    }

    /// Starts TCP probes from the client to `targets`.
    pub fn start_tcp(
        &self,
        targets: &[IpAddr],
        interval: Duration,
        timeout: Duration,
        limit: Duration,
    ) -> Result<TcpProber> {
        TcpProber::start(&self.client_netns, targets, interval, timeout, limit)
    }
}

fn put(store: &Store, obj: Value) -> Result<()> {
    store
        .put_object(obj)
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("put_object: {e:?}"))
}

/// One frame that claims a VIP: who, and whether unsolicited (gratuitous ARP / unsolicited NA).
#[derive(Clone, Copy, Debug)]
pub struct Claim {
    pub at: Instant,
    pub ip: IpAddr,
    pub mac: MacAddr,
    pub gratuitous: bool,
}

/// One probe round: requests for every target sent at `at`, the MACs that answered each
/// within the round (at least 100 ms, at most 300 ms if someone has not answered yet).
#[derive(Clone, Debug)]
pub struct Round {
    pub at: Instant,
    pub answers: BTreeMap<IpAddr, BTreeSet<MacAddr>>,
}

#[derive(Default, Debug)]
pub struct WireLog {
    pub claims: Vec<Claim>,
    pub rounds: Vec<Round>,
}

impl WireLog {
    /// Claims for `ip` at or after `since`.
    pub fn claims_for(&self, ip: IpAddr, since: Instant) -> Vec<Claim> {
        self.claims
            .iter()
            .filter(|c| c.ip == ip && c.at >= since)
            .copied()
            .collect()
    }

    /// The MACs that claimed `ip` since `since`, consecutive repeats collapsed.
    pub fn owner_runs(&self, ip: IpAddr, since: Instant) -> Vec<MacAddr> {
        let mut runs: Vec<MacAddr> = Vec::new();
        for c in self.claims_for(ip, since) {
            if runs.last() != Some(&c.mac) {
                runs.push(c.mac);
            }
        }
        runs
    }

    /// The longest stretch in which rounds started in `[from, to)` went unanswered for
    /// `ip`: from the first unanswered round's start to the next answered round's start.
    pub fn longest_gap(&self, ip: IpAddr, from: Instant, to: Instant) -> Duration {
        let mut longest = Duration::ZERO;
        let mut since: Option<Instant> = None;
        for r in self.rounds_between(from, to) {
            let answered = r.answers.get(&ip).is_some_and(|s| !s.is_empty());
            match (answered, since) {
                (false, None) => since = Some(r.at),
                (true, Some(s)) => {
                    longest = longest.max(r.at - s);
                    since = None;
                }
                _ => {}
            }
        }
        if let Some(s) = since {
            longest = longest.max(to.saturating_duration_since(s));
        }
        longest
    }

    /// Hand-over of `ip` from `old` to `new` after `since`: from the last claim (answer or
    /// gratuitous) by `old` before `new`'s first claim, to that first claim. `None` if
    /// `new` never claimed it.
    pub fn handover_gap(
        &self,
        ip: IpAddr,
        old: MacAddr,
        new: MacAddr,
        since: Instant,
    ) -> Option<Duration> {
        let claims = self.claims_for(ip, since);
        let first_new = claims.iter().find(|c| c.mac == new)?.at;
        let last_old = claims
            .iter()
            .rev()
            .find(|c| c.mac == old && c.at <= first_new)
            .map_or(since, |c| c.at);
        Some(first_new.saturating_duration_since(last_old))
    }

    pub fn rounds_between(&self, from: Instant, to: Instant) -> Vec<&Round> {
        self.rounds
            .iter()
            .filter(|r| r.at >= from && r.at < to)
            .collect()
    }

    /// The rounds in which some target was answered by more than one MAC.
    pub fn double_answers(&self) -> Vec<&Round> {
        self.rounds
            .iter()
            .filter(|r| r.answers.values().any(|s| s.len() > 1))
            .collect()
    }
}

/// The client's raw-socket view of the LAN. One thread inside the client namespace sends
/// an ARP request (IPv4) / Neighbor Solicitation (IPv6) for every target each round
/// (every 100 ms) and records every ARP reply, gratuitous ARP and Neighbor Advertisement.
pub struct Wire {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<WireLog>>,
    targets: Arc<Mutex<Vec<IpAddr>>>,
    thread: Option<JoinHandle<Result<()>>>,
}

pub const ROUND_INTERVAL: Duration = Duration::from_millis(100);
pub const ROUND_TIMEOUT: Duration = Duration::from_millis(300);

impl Wire {
    fn start(client_netns: &str, targets: &[IpAddr], limit: Duration) -> Result<Wire> {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(WireLog::default()));
        let targets = Arc::new(Mutex::new(targets.to_vec()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = {
            let (stop, log, targets) = (stop.clone(), log.clone(), targets.clone());
            let name = client_netns.to_string();
            std::thread::Builder::new()
                .name("wire".into())
                .spawn(move || -> Result<()> {
                    let opened = netns::enter(&name).and_then(|()| {
                        let iface = datalink::interfaces()
                            .into_iter()
                            .find(|i| i.name == "eth0")
                            .context("client eth0")?;
                        let mac = iface.mac.context("client MAC")?;
                        let config = datalink::Config {
                            read_timeout: Some(Duration::from_millis(5)),
                            promiscuous: false,
                            ..Default::default()
                        };
                        match datalink::channel(&iface, config) {
                            Ok(Channel::Ethernet(tx, rx)) => Ok((tx, rx, mac)),
                            Ok(_) => bail!("not an Ethernet channel"),
                            Err(e) => bail!("raw socket on the client's eth0: {e}"),
                        }
                    });
                    let (mut tx, mut rx, mac) = match opened {
                        Ok(x) => {
                            let _ = ready_tx.send(Ok(()));
                            x
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                            return Err(e);
                        }
                    };
                    let client_v4 = crate::lab::CLIENT_IP;
                    let end = Instant::now() + limit;
                    let mut current: Option<Round> = None;
                    let mut next_round = Instant::now();
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                        let now = Instant::now();
                        if current.is_none() && now >= next_round {
                            let ts = lock(&targets).clone();
                            if !ts.is_empty() {
                                for t in &ts {
                                    let frame = match t {
                                        IpAddr::V4(v4) => packet::arp_request(mac, client_v4, *v4),
                                        IpAddr::V6(v6) => {
                                            packet::neighbor_solicit(mac, CLIENT_V6, *v6)
                                        }
                                    };
                                    let _ = tx.send_to(&frame, None);
                                }
                                current = Some(Round {
                                    at: now,
                                    answers: ts.iter().map(|t| (*t, BTreeSet::new())).collect(),
                                });
                            }
                            next_round = now + ROUND_INTERVAL;
                        }
                        if let Ok(frame) = rx.next() {
                            let at = Instant::now();
                            let claim = match packet::observe(frame) {
                                Some(Observed::ArpReply {
                                    ip,
                                    mac,
                                    gratuitous,
                                }) => Some((IpAddr::V4(ip), mac, gratuitous)),
                                Some(Observed::GarpRequest { ip, mac }) => {
                                    Some((IpAddr::V4(ip), mac, true))
                                }
                                Some(Observed::Advert {
                                    target,
                                    mac,
                                    solicited,
                                    ..
                                }) => Some((IpAddr::V6(target), mac, !solicited)),
                                None => None,
                            };
                            if let Some((ip, m, gratuitous)) = claim {
                                if let Some(r) = current.as_mut() {
                                    if !gratuitous {
                                        if let Some(set) = r.answers.get_mut(&ip) {
                                            set.insert(m);
                                        }
                                    }
                                }
                                lock(&log).claims.push(Claim {
                                    at,
                                    ip,
                                    mac: m,
                                    gratuitous,
                                });
                            }
                        }
                        if let Some(r) = &current {
                            let age = Instant::now().saturating_duration_since(r.at);
                            let all = r.answers.values().all(|s| !s.is_empty());
                            if (all && age >= ROUND_INTERVAL) || age >= ROUND_TIMEOUT {
                                let done = current.take().expect("current round");
                                lock(&log).rounds.push(done);
                            }
                        }
                    }
                    if let Some(r) = current.take() {
                        lock(&log).rounds.push(r);
                    }
                    Ok(())
                })
                .context("spawning the wire")?
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("wire did not start")??;
        Ok(Wire {
            stop,
            log,
            targets,
            thread: Some(thread),
        })
    }

    pub fn log(&self) -> MutexGuard<'_, WireLog> {
        lock(&self.log)
    }

    pub fn set_targets(&self, targets: &[IpAddr]) {
        *lock(&self.targets) = targets.to_vec();
    }

    /// Waits until `rounds` consecutive rounds (started after `since`) were each answered
    /// for every `(ip, mac)` of `expect` by exactly that MAC. Returns when the first of
    /// them started.
    pub fn wait_stable(
        &self,
        expect: &BTreeMap<IpAddr, MacAddr>,
        since: Instant,
        rounds: usize,
        timeout: Duration,
    ) -> Result<Instant> {
        let found = poll(timeout, Duration::from_millis(10), || {
            let log = self.log();
            let mut streak: Vec<Instant> = Vec::new();
            for r in log.rounds.iter().filter(|r| r.at >= since) {
                let good = expect.iter().all(|(ip, mac)| {
                    r.answers
                        .get(ip)
                        .is_some_and(|s| s.len() == 1 && s.contains(mac))
                });
                if good {
                    streak.push(r.at);
                    if streak.len() >= rounds {
                        return Ok(Some(streak[0]));
                    }
                } else {
                    streak.clear();
                }
            }
            Ok(None)
        })?;
        match found {
            Some(t) => Ok(t),
            None => {
                let log = self.log();
                let last: Vec<String> = log
                    .rounds
                    .iter()
                    .rev()
                    .take(3)
                    .map(|r| format!("{:?}", r.answers))
                    .collect();
                bail!("no {rounds} stable rounds answering {expect:?} within {timeout:?}; last rounds: {last:?}")
            }
        }
    }

    /// Stops the wire; returns its log.
    pub fn finish(mut self) -> Result<WireLog> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("wire thread panicked"))??;
        }
        Ok(std::mem::take(&mut *lock(&self.log)))
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One TCP attempt.
#[derive(Clone, Debug)]
pub struct TcpAttempt {
    pub at: Instant,
    pub done: Instant,
    pub vip: IpAddr,
    /// The node whose backend answered, or the error.
    pub result: Result<String, String>,
}

/// TCP probes from the client to each target, every `interval`, until stopped.
pub struct TcpProber {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<TcpAttempt>>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpProber {
    fn start(
        client_netns: &str,
        targets: &[IpAddr],
        interval: Duration,
        timeout: Duration,
        limit: Duration,
    ) -> Result<TcpProber> {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = {
            let (stop, log, targets) = (stop.clone(), log.clone(), targets.to_vec());
            let name = client_netns.to_string();
            std::thread::Builder::new()
                .name("tcp-prober".into())
                .spawn(move || {
                    if let Err(e) = netns::enter(&name) {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                    let _ = ready_tx.send(Ok(()));
                    let end = Instant::now() + limit;
                    let mut next = Instant::now();
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                        for vip in &targets {
                            let at = Instant::now();
                            let result = tcp_here(*vip, timeout).map_err(|e| format!("{e:#}"));
                            lock(&log).push(TcpAttempt {
                                at,
                                done: Instant::now(),
                                vip: *vip,
                                result,
                            });
                        }
                        next += interval;
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        } else {
                            next = now;
                        }
                    }
                })
                .context("spawning the TCP prober")?
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("TCP prober did not start")??;
        Ok(TcpProber {
            stop,
            log,
            thread: Some(thread),
        })
    }

    pub fn attempts(&self) -> Vec<TcpAttempt> {
        lock(&self.log).clone()
    }

    /// The first attempt on `vip` started at or after `since` and served by `node`.
    pub fn first_served_by(&self, vip: IpAddr, node: &str, since: Instant) -> Option<TcpAttempt> {
        lock(&self.log)
            .iter()
            .find(|a| a.vip == vip && a.at >= since && a.result.as_deref() == Ok(node))
            .cloned()
    }

    pub fn finish(mut self) -> Vec<TcpAttempt> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *lock(&self.log))
    }
}

impl Drop for TcpProber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The expected winner of `ip` among `nodes`.
pub fn expected_winner(ip: IpAddr, nodes: &[String]) -> String {
    palisade_loadbalancer::announce::winner(ip, nodes.iter().map(String::as_str))
        .expect("at least one node")
        .to_string()
}

/// `nodes` without `gone`.
pub fn without(nodes: &[String], gone: &str) -> Vec<String> {
    nodes.iter().filter(|n| *n != gone).cloned().collect()
}

/// A duration in whole milliseconds, for reports.
pub fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Median, p90 and max of durations (empty: zeros).
pub fn stats(samples: &[Duration]) -> (Duration, Duration, Duration) {
    let mut s = samples.to_vec();
    s.sort();
    if s.is_empty() {
        return (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    }
    let pick = |q: f64| s[((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1];
    (pick(0.5), pick(0.9), s[s.len() - 1])
}
