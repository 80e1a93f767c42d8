//! The lab: a small routed "bare-metal cluster" built from network namespaces.
//!
//! ```text
//!                 netns <p>-lan: bridge <p>br, 198.51.100.0/24
//!        ┌───────────────────┬─────────────────────────┬───────────────────────┐
//!   <p>-client          <p>-node1                  <p>-node2              (more hosts:
//!   eth0 .100           eth0 .11, ip_forward=1     eth0 .12, ip_forward=1  add_lan_host)
//!   10.244.N.0/24       10.244.2.0/24 via .12      10.244.1.0/24 via .11
//!     via node N        10.244.1.2/32 dev <p>p0    ...
//!                          │ <p>p0 ee:ee:ee:ee:ee:ee
//!                          │ veth
//!                          │ eth0 10.244.1.2/32                  netns <p>-x-a
//!                            default via 169.254.1.1 (static neighbour ee:ee:ee:ee:ee:ee)
//! ```
//!
//! - Everything is named with a per-lab prefix `pl<pid><letters>` and lives in namespaces the
//!   lab creates; veths are created inside a lab namespace with their peer moved straight into
//!   another, so nothing ever appears in the root namespace.
//! - Pods are routed Calico-style: the pod's default route points at `169.254.1.1`, which
//!   resolves (static neighbour entry) to the node-side veth; the node routes each pod /32 to its
//!   veth. Pod traffic therefore crosses the node's `FORWARD` chain, and pod→node traffic its
//!   `INPUT` chain.
//! - Nodes route each other's pod /24 via the LAN; the client (and any other LAN host, e.g. a
//!   `cp` host of the test API server, [`Lab::add_lan_host`]) routes every pod
//!   /24 via its node.
//! - Every pod runs in-process servers (TCP/UDP on [`LabSpec::ports`], SCTP INIT receiver).
//! - [`Lab`] tears everything down on drop (also when a test panics); namespaces that a killed
//!   test run left behind are removed by the next lab (see [`cleanup_stale`]).
//! - Processes (the `palisade` CLI, agents — see `lab_cluster`) start inside any
//!   lab namespace with [`Lab::spawn_in`] and are killed on drop.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::matrix::Matrix;
use crate::netns;
use crate::probe::{self, Job, Outcome};
use crate::process::LabProcess;
use crate::server::{Protocol, ServerLog, Servers};

/// The LAN's first three octets (it is a /24).
pub const LAN_PREFIX: [u8; 3] = [198, 51, 100];
/// Address of the client namespace on the LAN.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
/// The pods' default gateway (held by the node side of every pod veth).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// How long a new link may take to come up.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(5);
/// MAC address of every node-side pod veth (as Calico does).
pub const NODE_VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";

/// What to build.
#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Number of nodes, `node1..=nodeN` (at most 89).
    pub nodes: usize,
    /// Ports every pod serves on TCP and UDP (SCTP is received on any port).
    pub ports: Vec<u16>,
    /// Whether to create the client namespace at [`CLIENT_IP`].
    pub client: bool,
    /// Whether pods start their servers when added.
    pub serve_pods: bool,
}

impl LabSpec {
    /// `nodes` nodes, ports 80 and 81, a client, serving pods.
    pub fn new(nodes: usize) -> LabSpec {
        LabSpec {
            nodes,
            ports: vec![80, 81],
            client: true,
            serve_pods: true,
        }
    }
}

impl Default for LabSpec {
    fn default() -> LabSpec {
        LabSpec::new(2)
    }
}

/// Something probes can be sent from or to: a namespace and an address in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Label in matrices, e.g. `x/a`, `node1`, `client`.
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
}

/// A node of the lab.
#[derive(Clone, Debug)]
pub struct NodeHandle {
    /// 1-based.
    pub index: usize,
    /// Kubernetes name, `node<index>`.
    pub name: String,
    pub netns: String,
    /// LAN (InternalIP) address, `198.51.100.(10 + index)`.
    pub ip: Ipv4Addr,
    /// Network address of the node's pod CIDR, `10.244.<index>.0` (a /24).
    pub pod_cidr: Ipv4Addr,
}

impl NodeHandle {
    /// The node's pod CIDR as text, `10.244.N.0/24`.
    pub fn pod_cidr_text(&self) -> String {
        format!("{}/24", self.pod_cidr)
    }

    /// The node as a probe endpoint (its LAN address).
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            name: self.name.clone(),
            netns: self.netns.clone(),
            ip: self.ip,
        }
    }
}

/// A pod of the lab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodHandle {
    /// 1-based index of its node.
    pub node: usize,
    pub namespace: String,
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl PodHandle {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The pod as a probe endpoint, labelled `namespace/name`.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            name: self.id(),
            netns: self.netns.clone(),
            ip: self.ip,
        }
    }
}

/// A running lab; dropping it removes every namespace, veth, bridge, server and process of it.
pub struct Lab {
    prefix: String,
    spec: LabSpec,
    lan: String,
    nodes: Vec<NodeHandle>,
    client: Option<Endpoint>,
    pods: Vec<PodHandle>,
    next_host: HashMap<usize, u8>,
    veth_seq: usize,
    lan_seq: usize,
    lan_hosts: Vec<Endpoint>,
    /// Namespaces in creation order; removed in reverse.
    created: Vec<String>,
    servers: HashMap<String, Servers>,
    logs: HashMap<Ipv4Addr, Arc<ServerLog>>,
    /// Pod namespace → the node-side veth of that pod.
    veths: HashMap<String, String>,
    tmp: PathBuf,
    probe_timeout: Duration,
}

static LAB_SEQ: AtomicUsize = AtomicUsize::new(0);

/// Lower-case letters for a per-process sequence number: 0 → `a`, 25 → `z`, 26 → `ba`, ...
fn letters(mut n: usize) -> String {
    let mut out = Vec::new();
    loop {
        out.push(b'a' + (n % 26) as u8);
        n /= 26;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// Splits a lab namespace name `pl<pid><letters>-...` into (prefix, pid).
fn parse_lab_name(name: &str) -> Option<(&str, u32)> {
    let rest = name.strip_prefix("pl")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let after = &rest[digits..];
    let letters = after.bytes().take_while(u8::is_ascii_lowercase).count();
    if digits == 0 || letters == 0 || after.as_bytes().get(letters) != Some(&b'-') {
        return None;
    }
    let pid = rest[..digits].parse().ok()?;
    Some((&name[..2 + digits + letters], pid))
}

/// Removes lab namespaces left behind by lab runs whose process is gone (killed test runs).
/// Only names of the lab's own shape (`pl<pid><letters>-...`) are considered. Returns the
/// names removed.
pub fn cleanup_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in netns::list()? {
        let Some((_, pid)) = parse_lab_name(&name) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_processes_in(&name);
        netns::delete(&name)?;
        removed.push(name);
    }
    Ok(removed)
}

/// SIGKILLs whatever still runs in the lab namespace `name` (agents a killed lab run left
/// behind would otherwise keep the namespace alive after its file is removed). Best effort.
fn kill_processes_in(name: &str) {
    let me = std::process::id();
    for _ in 0..50 {
        let pids: Vec<u32> = netns::pids(name)
            .unwrap_or_default()
            .into_iter()
            .filter(|&p| p != me)
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes every lab namespace (`pl<pid><letters>-...`), also those of labs still running.
/// Returns the names removed.
pub fn cleanup_all() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in netns::list()? {
        if parse_lab_name(&name).is_some() {
            kill_processes_in(&name);
            netns::delete(&name)?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// Kills every process in, and removes, every lab namespace this process created (all its
/// labs), and their scratch directories: the emergency exit on a signal. Returns the names
/// removed.
pub fn cleanup_own() -> Result<Vec<String>> {
    let me = std::process::id();
    let mut prefixes = std::collections::BTreeSet::new();
    for name in netns::list()? {
        if let Some((prefix, pid)) = parse_lab_name(&name) {
            if pid == me {
                prefixes.insert(prefix.to_string());
            }
        }
    }
    let mut removed = Vec::new();
    for prefix in prefixes {
        removed.extend(cleanup_prefix(&prefix)?);
    }
    Ok(removed)
}

/// Kills every process in, and removes, the namespaces of the lab `prefix` and its scratch
/// directory: the emergency exit of a lab whose owner cannot tear it down (a signal arrived
/// in the middle of something). Returns the names removed.
pub fn cleanup_prefix(prefix: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    // Twice: a namespace being created while the first round ran is caught by the second.
    for _ in 0..2 {
        for name in leftovers(prefix)? {
            kill_processes_in(&name);
            netns::delete(&name)?;
            removed.push(name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let tmp = std::env::temp_dir().join(format!("palisade-lab-{prefix}"));
    let _ = std::fs::remove_dir_all(tmp);
    Ok(removed)
}

/// Namespaces whose name starts with `prefix-`.
pub fn leftovers(prefix: &str) -> Result<Vec<String>> {
    let start = format!("{prefix}-");
    Ok(netns::list()?
        .into_iter()
        .filter(|n| n.starts_with(&start))
        .collect())
}

impl Lab {
    /// Builds the LAN, the nodes and (per spec) the client.
    pub fn new(spec: LabSpec) -> Result<Lab> {
        ensure!(
            nix::unistd::geteuid().is_root(),
            "the lab needs root (network namespaces)"
        );
        ensure!(
            (1..=89).contains(&spec.nodes),
            "a lab has 1..=89 nodes, not {}",
            spec.nodes
        );
        let prefix = format!(
            "pl{}{}",
            std::process::id(),
            letters(LAB_SEQ.fetch_add(1, Ordering::Relaxed))
        );
        for name in cleanup_stale().context("removing stale lab namespaces")? {
            eprintln!("lab: removed stale namespace {name}");
        }
        for name in leftovers(&prefix)? {
            netns::delete(&name)?;
        }
        let tmp = std::env::temp_dir().join(format!("palisade-lab-{prefix}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("clearing {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let probe_timeout = std::env::var("PALISADE_PROBE_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(probe::DEFAULT_TIMEOUT);
        let mut lab = Lab {
            lan: format!("{prefix}-lan"),
            prefix,
            spec,
            nodes: Vec::new(),
            client: None,
            pods: Vec::new(),
            next_host: HashMap::new(),
            veth_seq: 0,
            lan_seq: 0,
            lan_hosts: Vec::new(),
            created: Vec::new(),
            servers: HashMap::new(),
            logs: HashMap::new(),
            veths: HashMap::new(),
            tmp,
            probe_timeout,
        };
        // From here on, an error drops `lab`, which removes whatever was built.
        lab.build()
            .with_context(|| format!("building lab {}", lab.prefix))?;
        Ok(lab)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        netns::add(name)?;
        self.created.push(name.to_string());
        Ok(())
    }

    fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    /// Plugs a new veth into the LAN bridge; its other end is `eth0` in `netns` with `ip/24`.
    fn attach_to_lan(&mut self, port: &str, netns: &str, ip: Ipv4Addr) -> Result<()> {
        let bridge = self.bridge();
        netns::ip_batch(
            &self.lan,
            &[
                format!("link add {port} type veth peer name eth0 netns {netns}"),
                format!("link set {port} master {bridge}"),
                format!("link set {port} up"),
            ],
        )?;
        netns::ip_batch(
            netns,
            &[
                format!("addr add {ip}/24 dev eth0"),
                "link set eth0 up".into(),
            ],
        )?;
        netns::wait_links_up(&self.lan, &[port], LINK_UP_TIMEOUT)?;
        netns::wait_links_up(netns, &["eth0"], LINK_UP_TIMEOUT)
    }

    fn build(&mut self) -> Result<()> {
        let lan = self.lan.clone();
        self.add_netns(&lan)?;
        let bridge = self.bridge();
        netns::ip_batch(
            &lan,
            &[
                format!("link add {bridge} type bridge"),
                format!("link set {bridge} up"),
            ],
        )?;
        for index in 1..=self.spec.nodes {
            let node = NodeHandle {
                index,
                name: format!("node{index}"),
                netns: format!("{}-node{index}", self.prefix),
                ip: Ipv4Addr::new(
                    LAN_PREFIX[0],
                    LAN_PREFIX[1],
                    LAN_PREFIX[2],
                    10 + index as u8,
                ),
                pod_cidr: Ipv4Addr::new(10, 244, index as u8, 0),
            };
            self.add_netns(&node.netns)?;
            netns::write_sysctl(&node.netns, "net/ipv4/ip_forward", "1")?;
            let port = format!("{}l{index}", self.prefix);
            self.attach_to_lan(&port, &node.netns, node.ip)?;
            self.nodes.push(node);
        }
        for node in &self.nodes {
            let routes: Vec<String> = self
                .nodes
                .iter()
                .filter(|other| other.index != node.index)
                .map(|other| {
                    format!(
                        "route add {} via {} dev eth0",
                        other.pod_cidr_text(),
                        other.ip
                    )
                })
                .collect();
            netns::ip_batch(&node.netns, &routes)?;
        }
        if self.spec.client {
            self.client = Some(self.add_lan_host("client", CLIENT_IP)?);
        }
        Ok(())
    }

    /// Adds a host on the LAN: namespace `<prefix>-<tag>` with `eth0` at `ip/24` and routes to
    /// every node's pod CIDR via that node — the client, or e.g. a `control-plane` host for a
    /// test API server.
    pub fn add_lan_host(&mut self, tag: &str, ip: Ipv4Addr) -> Result<Endpoint> {
        let taken =
            self.nodes.iter().any(|n| n.ip == ip) || self.lan_hosts.iter().any(|h| h.ip == ip);
        ensure!(
            ip.octets()[..3] == LAN_PREFIX && !taken && !matches!(ip.octets()[3], 0 | 255),
            "{ip} is not a free LAN address"
        );
        let netns = self.add_namespace(tag)?;
        let port = format!("{}h{}", self.prefix, self.lan_seq);
        self.lan_seq += 1;
        self.attach_to_lan(&port, &netns, ip)?;
        let routes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("route add {} via {} dev eth0", n.pod_cidr_text(), n.ip))
            .collect();
        netns::ip_batch(&netns, &routes)?;
        let host = Endpoint {
            name: tag.to_string(),
            netns,
            ip,
        };
        self.lan_hosts.push(host.clone());
        Ok(host)
    }

    /// Hosts on the LAN other than nodes (the client first, if any).
    pub fn lan_hosts(&self) -> &[Endpoint] {
        &self.lan_hosts
    }

    /// Creates an empty namespace `<prefix>-<tag>` (loopback only) owned by the lab, e.g. a
    /// pristine place to apply a ruleset for reference. Returns its name.
    pub fn add_namespace(&mut self, tag: &str) -> Result<String> {
        ensure!(
            !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "namespace tag {tag:?} must be alphanumeric"
        );
        let name = format!("{}-{tag}", self.prefix);
        ensure!(
            !self.created.contains(&name),
            "namespace {name} exists already"
        );
        self.add_netns(&name)?;
        Ok(name)
    }

    /// The per-lab prefix of every namespace (`<prefix>-...`) and interface name.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The spec the lab was built from.
    pub fn spec(&self) -> &LabSpec {
        &self.spec
    }

    /// A scratch directory for this lab (manifests, logs); removed on drop.
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Nodes, in index order.
    pub fn nodes(&self) -> &[NodeHandle] {
        &self.nodes
    }

    /// Node `index` (1-based).
    pub fn node(&self, index: usize) -> Result<&NodeHandle> {
        self.nodes
            .get(index.wrapping_sub(1))
            .with_context(|| format!("the lab has no node {index}"))
    }

    /// Namespace of node `index` (1-based).
    pub fn node_netns(&self, index: usize) -> Result<&str> {
        Ok(&self.node(index)?.netns)
    }

    /// The LAN bridge's namespace.
    pub fn lan_netns(&self) -> &str {
        &self.lan
    }

    /// The client, if the spec asked for one.
    pub fn client(&self) -> Option<&Endpoint> {
        self.client.as_ref()
    }

    /// Pods, in the order they were added.
    pub fn pods(&self) -> &[PodHandle] {
        &self.pods
    }

    /// The pod `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> Result<&PodHandle> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
            .with_context(|| format!("the lab has no pod {namespace}/{name}"))
    }

    /// Adds a pod on node `node` (1-based), with the next free `10.244.<node>.x` unless `ip`
    /// is given, and starts its servers (per [`LabSpec::serve_pods`]).
    pub fn add_pod(
        &mut self,
        node: usize,
        namespace: &str,
        name: &str,
        ip: Option<Ipv4Addr>,
    ) -> Result<PodHandle> {
        let node = self.node(node)?.clone();
        ensure!(
            self.pod(namespace, name).is_err(),
            "pod {namespace}/{name} exists already"
        );
        ensure!(
            !namespace.is_empty()
                && !name.is_empty()
                && format!("{namespace}{name}")
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'),
            "pod {namespace}/{name}: names must be DNS labels"
        );
        let ip = match ip {
            Some(ip) => ip,
            None => {
                let next = self.next_host.entry(node.index).or_insert(2);
                ensure!(*next < 255, "node {} has no free pod addresses", node.index);
                let ip = Ipv4Addr::new(10, 244, node.index as u8, *next);
                *next += 1;
                ip
            }
        };
        ensure!(
            !self.pods.iter().any(|p| p.ip == ip),
            "address {ip} is taken"
        );
        let pod = PodHandle {
            node: node.index,
            namespace: namespace.to_string(),
            name: name.to_string(),
            netns: format!("{}-{namespace}-{name}", self.prefix),
            ip,
        };
        let veth = format!("{}p{}", self.prefix, self.veth_seq);
        ensure!(veth.len() <= 15, "interface name {veth} is too long");
        self.veth_seq += 1;
        self.add_netns(&pod.netns)?;
        netns::ip_batch(
            &node.netns,
            &[
                format!(
                    "link add {veth} address {NODE_VETH_MAC} type veth peer name eth0 netns {}",
                    pod.netns
                ),
                format!("link set {veth} up"),
                // `replace`: a route of a just-removed pod with this address may linger.
                format!("route replace {ip}/32 dev {veth}"),
            ],
        )?;
        self.veths.insert(pod.netns.clone(), veth.clone());
        netns::ip_batch(
            &pod.netns,
            &[
                format!("addr add {ip}/32 dev eth0"),
                "link set eth0 up".into(),
                format!("route add {POD_GATEWAY} dev eth0 scope link"),
                format!("route add default via {POD_GATEWAY} dev eth0"),
                format!(
                    "neigh replace {POD_GATEWAY} lladdr {NODE_VETH_MAC} dev eth0 nud permanent"
                ),
            ],
        )?;
        netns::wait_links_up(&node.netns, &[&veth], LINK_UP_TIMEOUT)?;
        netns::wait_links_up(&pod.netns, &["eth0"], LINK_UP_TIMEOUT)?;
        self.pods.push(pod.clone());
        if self.spec.serve_pods {
            self.serve(&pod.endpoint())?;
        }
        Ok(pod)
    }

    /// Removes a pod: its servers, its namespace and so its veth and the node's route to it.
    pub fn remove_pod(&mut self, namespace: &str, name: &str) -> Result<()> {
        let pod = self.pod(namespace, name)?.clone();
        if let Some(mut servers) = self.servers.remove(&pod.netns) {
            servers.stop();
        }
        self.logs.remove(&pod.ip);
        // Deleting the node's end first removes the veth pair and the route to the pod now;
        // a namespace is freed asynchronously, and its address may be reused at once.
        if let Some(veth) = self.veths.remove(&pod.netns) {
            if let Ok(node) = self.node(pod.node) {
                let _ = netns::ip_in(&node.netns, &["link", "del", &veth]);
            }
        }
        netns::delete(&pod.netns)?;
        self.created.retain(|n| n != &pod.netns);
        self.pods.retain(|p| p != &pod);
        Ok(())
    }

    /// Starts servers (TCP/UDP on the spec's ports, SCTP receiver) in the endpoint's namespace,
    /// e.g. on a node or the client. Pods get theirs when added.
    pub fn serve(&mut self, endpoint: &Endpoint) -> Result<()> {
        ensure!(
            !self.servers.contains_key(&endpoint.netns),
            "netns {} serves already",
            endpoint.netns
        );
        let servers = Servers::start(&endpoint.netns, &self.spec.ports)?;
        self.logs.insert(endpoint.ip, servers.log().clone());
        self.servers.insert(endpoint.netns.clone(), servers);
        Ok(())
    }

    /// What reached the servers at `ip`.
    pub fn server_log(&self, ip: Ipv4Addr) -> Option<Arc<ServerLog>> {
        self.logs.get(&ip).cloned()
    }

    /// Runs `ARGV` inside `netns` (`ip netns exec`) and returns its output, whatever its status.
    pub fn exec_in(&self, netns: &str, argv: &[&str]) -> Result<Output> {
        netns::exec(netns, argv)
    }

    /// Runs `ARGV` inside `netns`; a non-zero exit is an error. Returns standard output.
    pub fn exec_ok(&self, netns: &str, argv: &[&str]) -> Result<String> {
        netns::exec_ok(netns, argv)
    }

    /// Starts `ARGV` inside `netns`, its output going to `<tmp_dir>/<name>.log`. The process is
    /// killed when the returned guard drops (keep it alive at least as long as you need it).
    pub fn spawn_in(&self, netns: &str, name: &str, argv: &[&str]) -> Result<LabProcess> {
        LabProcess::spawn(name, netns, argv, &self.tmp.join(format!("{name}.log")))
    }

    /// SIGKILLs every process running in the lab namespace `netns` (as a container runtime
    /// kills a whole container: children such as `iptables-restore` included) and waits, at
    /// most 10 s, until none is left. Returns how many were killed.
    pub fn kill_all_in(&self, netns: &str) -> Result<usize> {
        ensure!(
            netns.starts_with(&format!("{}-", self.prefix)),
            "{netns} is not a namespace of this lab"
        );
        let me = std::process::id();
        let mut killed = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let pids: Vec<u32> = netns::pids(netns)?
                .into_iter()
                .filter(|&p| p != me)
                .collect();
            if pids.is_empty() {
                return Ok(killed);
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "processes {pids:?} in {netns} survive SIGKILL"
            );
            for pid in pids {
                let Ok(pid) = i32::try_from(pid) else {
                    continue;
                };
                if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                    killed += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The timeout a first probe waits (env `PALISADE_PROBE_TIMEOUT_MS`, default 300 ms).
    pub fn probe_timeout(&self) -> Duration {
        self.probe_timeout
    }

    /// The probe job for one (from, to) pair (its destination's server log attached), to run
    /// with [`probe::run_all`] outside any lock on the lab.
    pub fn job(&self, from: &Endpoint, to: &Endpoint, port: u16, protocol: Protocol) -> Job {
        Job {
            from_netns: from.netns.clone(),
            to_ip: to.ip,
            port,
            protocol,
            dst_log: self.logs.get(&to.ip).cloned(),
        }
    }

    /// One probe.
    pub fn probe(
        &self,
        from: &Endpoint,
        to: &Endpoint,
        port: u16,
        protocol: Protocol,
    ) -> Result<Outcome> {
        let jobs = [self.job(from, to, port, protocol)];
        let mut out = probe::run_all(&jobs, self.probe_timeout)?;
        out.pop().context("no probe result")
    }

    /// Probes every (from, to) pair in parallel. Rows are `froms`, columns `tos`.
    pub fn probe_matrix(
        &self,
        froms: &[Endpoint],
        tos: &[Endpoint],
        port: u16,
        protocol: Protocol,
    ) -> Result<(Matrix, Vec<Outcome>)> {
        let mut jobs = Vec::with_capacity(froms.len() * tos.len());
        for from in froms {
            for to in tos {
                jobs.push(self.job(from, to, port, protocol));
            }
        }
        let outcomes = probe::run_all(&jobs, self.probe_timeout)?;
        let names = |v: &[Endpoint]| v.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
        let mut matrix = Matrix::new(names(froms), names(tos), false);
        for (i, outcome) in outcomes.iter().enumerate() {
            matrix.set_at(i / tos.len(), i % tos.len(), outcome.reachable);
        }
        Ok((matrix, outcomes))
    }

    /// Probes every pair and compares with `expected` (same rows and columns). Cells that
    /// disagree are probed again, up to two more times with a longer timeout, so a slow machine
    /// does not turn "reachable" into "blocked"; what still disagrees fails with the
    /// truth tables and the per-probe details.
    pub fn check_matrix(
        &self,
        froms: &[Endpoint],
        tos: &[Endpoint],
        port: u16,
        protocol: Protocol,
        expected: &Matrix,
    ) -> Result<()> {
        let (mut observed, mut outcomes) = self.probe_matrix(froms, tos, port, protocol)?;
        ensure!(
            observed.rows() == expected.rows() && observed.cols() == expected.cols(),
            "expected matrix has rows {:?} / columns {:?}, probed {:?} / {:?}",
            expected.rows(),
            expected.cols(),
            observed.rows(),
            observed.cols()
        );
        for round in 2..=3u32 {
            let wrong = expected.mismatches(&observed);
            if wrong.is_empty() {
                return Ok(());
            }
            let jobs: Vec<Job> = wrong
                .iter()
                .map(|&(r, c)| self.job(&froms[r], &tos[c], port, protocol))
                .collect();
            let again = probe::run_all(&jobs, self.probe_timeout * round)?;
            for (&(r, c), outcome) in wrong.iter().zip(again) {
                observed.set_at(r, c, outcome.reachable);
                outcomes[r * tos.len() + c] = outcome;
            }
        }
        let wrong = expected.mismatches(&observed);
        if wrong.is_empty() {
            return Ok(());
        }
        let mut report = format!("{protocol}/{port}: reachability differs from the expectation\n");
        report.push_str(&Matrix::report_with(expected, &observed, |r, c| {
            let o = &outcomes[r * tos.len() + c];
            format!("probe to {}: {}", tos[c].ip, o.detail)
        }));
        bail!(report)
    }

    /// Removes everything; called by drop. Returns the first error, after trying everything.
    pub fn teardown(&mut self) -> Result<()> {
        for (_, mut servers) in self.servers.drain() {
            servers.stop();
        }
        self.logs.clear();
        let mut first_error = None;
        for name in self.created.drain(..).rev() {
            if let Err(e) = netns::delete(&name) {
                eprintln!("lab: {e:#}");
                first_error.get_or_insert(e);
            }
        }
        match leftovers(&self.prefix) {
            Ok(rest) => {
                for name in rest {
                    if let Err(e) = netns::delete(&name) {
                        first_error.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        if self.tmp.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.tmp) {
                eprintln!("lab: removing {}: {e}", self.tmp.display());
            }
        }
        self.pods.clear();
        self.nodes.clear();
        self.lan_hosts.clear();
        self.client = None;
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("lab {}: teardown failed: {e:#}", self.prefix);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_short_and_parse_back() {
        assert_eq!(letters(0), "a");
        assert_eq!(letters(25), "z");
        assert_eq!(letters(26), "ba");
        assert_eq!(
            parse_lab_name("pl4194304ba-node1"),
            Some(("pl4194304ba", 4_194_304))
        );
        assert_eq!(parse_lab_name("pl12a-x-a"), Some(("pl12a", 12)));
        assert_eq!(parse_lab_name("pl12-x"), None);
        assert_eq!(parse_lab_name("plx1a-x"), None);
        assert_eq!(parse_lab_name("pl12a"), None);
        assert_eq!(parse_lab_name("other"), None);
        // The longest pod veth name still fits IFNAMSIZ.
        assert!(format!("pl{}{}p{}", 4_194_304, letters(675), 999).len() <= 15);
    }
}
