//! [`LabCluster`]: a whole cluster in network namespaces — the lab, its control plane, the
//! lab's kubelet/endpoints/kube-proxy, and one real `palisade agent` per node.
//!
//! ```text
//!   netns <p>-cp 198.51.100.2 ── test API server :6443 (api.rs)
//!        ▲ watch/list/update over the LAN
//!   netns <p>-nodeN 198.51.100.1N ── palisade agent --node-name nodeN
//!        │                             --kubeconfig http://198.51.100.2:6443
//!        │                             --listen-addr 198.51.100.1N:9476
//!        └─ pods (created by the lab's kubelet from Pod objects, kubelet.rs)
//!   netns <p>-client 198.51.100.100 ── probes LoadBalancer IPs like a machine on the LAN
//! ```
//!
//! Drop order: agents (SIGKILL), the kubelet thread, the control plane, then the lab's
//! namespaces. A panicking test gets the tail of every agent log printed first.
//!
//! The agents themselves are a [`LabAgents`] (start, kill, readiness, logs, metrics), which
//! other lab harnesses (the L2 failover tests) use on their own, with the HTTP helpers
//! [`http_get`] and [`http_get_in`].

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use palisade_testapi::Outage;
use serde_json::{json, Value};

use crate::api::{ControlPlane, Kind, CONTROL_PLANE_IP};
use crate::cluster::{poll, ApiOutage, Attempt, Cluster, Peer, ProbeLog, Prober};
use crate::k8s::{self, Labels, NamedPort};
use crate::kubelet::{pod_is_ready, KubeletConfig, KubeletLoop, TERMINATING_ANNOTATION};
use crate::lab::{Endpoint, Lab, LabSpec, NodeHandle};
use crate::matrix::Matrix;
use crate::netns::{self, Hopper};
use crate::probe::{self, Job};
use crate::process::LabProcess;
use crate::server::Protocol;

/// Port of every agent's /healthz, /readyz, /metrics (on its node's LAN address).
pub const AGENT_PORT: u16 = 9476;
/// Leader-election timings that keep tests fast.
pub const FAST_LEASE_FLAGS: &[&str] = &[
    "--lease-duration",
    "2s",
    "--lease-renew-deadline",
    "1500ms",
    "--lease-retry-period",
    "200ms",
];
/// The sync interval that keeps tests fast.
pub const FAST_SYNC_FLAGS: &[&str] = &["--sync-min-interval", "20ms"];
/// The namespace of the agents' Lease and Events.
pub const SYSTEM_NAMESPACE: &str = "palisade-system";

/// What to build.
#[derive(Clone, Debug)]
pub struct LabClusterSpec {
    /// Number of nodes (`node1..`).
    pub nodes: usize,
    /// Start an agent on every node.
    pub agents: bool,
    pub kubelet: KubeletConfig,
    /// A real cluster's kubeconfig instead of the lab's own API server.
    pub kubeconfig: Option<PathBuf>,
    /// `--log-level` of the agents.
    pub agent_log_level: String,
    /// More agent flags.
    pub agent_args: Vec<String>,
    /// How long a probe waits before calling a target blocked.
    pub probe_timeout: Duration,
}

impl LabClusterSpec {
    pub fn new(nodes: usize) -> LabClusterSpec {
        LabClusterSpec {
            nodes,
            agents: true,
            kubelet: KubeletConfig::default(),
            kubeconfig: None,
            agent_log_level: "info".into(),
            agent_args: Vec::new(),
            probe_timeout: std::env::var("PALISADE_PROBE_TIMEOUT_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis)
                .unwrap_or(Duration::from_millis(400)),
        }
    }
}

/// A cluster in network namespaces with real agents; see the module docs.
pub struct LabCluster {
    agents: LabAgents,
    kubelet: Option<KubeletLoop>,
    cp: Option<Arc<ControlPlane>>,
    lab: Arc<Mutex<Lab>>,
    spec: LabClusterSpec,
    prefix: String,
    cp_netns: String,
    client: Endpoint,
    nodes: Vec<NodeHandle>,
    outage: ApiOutage,
    /// Whether this build's agent has the L2 announcer (`--enable-l2`).
    l2: bool,
}

/// Whether the `palisade` binary's agent has the L2 announcer (its `--help` lists
/// `--enable-l2`).
pub fn agent_has_l2(bin: &std::path::Path) -> bool {
    std::process::Command::new(bin)
        .args(["agent", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--enable-l2"))
        .unwrap_or(false)
}

fn lock(lab: &Mutex<Lab>) -> MutexGuard<'_, Lab> {
    lab.lock().unwrap_or_else(|p| p.into_inner())
}

/// `GET path` over HTTP/1.0 from the calling thread's namespace, waiting at most `connect` for
/// the connection and `read` for each read; returns (status, body).
pub fn http_get(
    addr: SocketAddr,
    path: &str,
    connect: Duration,
    read: Duration,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, connect)?;
    s.set_read_timeout(Some(read))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Ok((code, body))
}

/// [`http_get`] from inside `netns_name` (1 s to connect, 3 s per read).
pub fn http_get_in(netns_name: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    netns::run_in(netns_name, || {
        Ok(http_get(
            addr,
            path,
            Duration::from_secs(1),
            Duration::from_secs(3),
        )?)
    })
}

/// The value of one sample of an OpenMetrics/Prometheus text (`sample` is the exact name,
/// labels included).
pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(sample)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// The MAC address of `ifname` in `netns_name` (from `ip -o link show`).
pub fn mac_of(netns_name: &str, ifname: &str) -> Result<String> {
    let out = netns::ip_in(netns_name, &["-o", "link", "show", ifname])?;
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_string)
        .with_context(|| format!("no MAC in {out}"))
}

/// Metric names (no labels, no comments) in an OpenMetrics/Prometheus text.
pub fn metric_names(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
        .collect()
}

/// Whether metric names show a layer-2 announcer (speaker) in the agent.
pub fn metrics_show_announcer(text: &str) -> bool {
    metric_names(text).iter().any(|n| {
        let n = n.to_ascii_lowercase();
        n.contains("announce") || n.contains("speaker") || n.contains("_arp") || n.contains("l2_")
    })
}

/// The `palisade agent` of every lab node. Each runs inside its node's namespace, listens on
/// `<node IP>:`[`AGENT_PORT`] and is asked over HTTP from `probe_netns` (a LAN host, e.g. the
/// control plane's). Every run of a node's agent logs to `<dir>/agent-<node>-<run>.log`.
/// Agents are SIGKILLed when dropped; [`LabCluster`] and the L2 failover tests build on this.
pub struct LabAgents {
    bin: PathBuf,
    dir: PathBuf,
    probe_netns: String,
    nodes: Vec<NodeHandle>,
    running: BTreeMap<String, LabProcess>,
    logs: BTreeMap<String, Vec<PathBuf>>,
}

/// The membership key every lab agent gets unless a test writes another
/// ([`LabAgents::write_key`]).
pub const LAB_MEMBERLIST_KEY: &str = "palisade-lab-memberlist-key-0123456789";

impl LabAgents {
    /// No agent runs yet; `bin` is the `palisade` binary, `dir` takes the logs.
    pub fn new(bin: PathBuf, dir: &Path, probe_netns: &str, nodes: &[NodeHandle]) -> LabAgents {
        LabAgents {
            bin,
            dir: dir.to_path_buf(),
            probe_netns: probe_netns.to_string(),
            nodes: nodes.to_vec(),
            running: BTreeMap::new(),
            logs: BTreeMap::new(),
        }
    }

    fn node(&self, name: &str) -> Result<&NodeHandle> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("the lab has no node {name}"))
    }

    /// The membership key file of `node`'s agent (`<dir>/memberlist-<node>.key`), passed
    /// as `--memberlist-key-file` unless the flags name a key file or
    /// `--memberlist-insecure` themselves.
    pub fn key_file(&self, node: &str) -> PathBuf {
        self.dir.join(format!("memberlist-{node}.key"))
    }

    /// Replaces the key file of `node` (atomically, like the kubelet updates a Secret
    /// volume); a running agent picks it up within its poll interval.
    pub fn write_key(&self, node: &str, key: &str) -> Result<()> {
        let path = self.key_file(node);
        let tmp = path.with_extension("key.tmp");
        std::fs::write(&tmp, key).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
    }

    /// Starts (or restarts) the agent of `node`: `palisade agent --node-name <node>
    /// --kubeconfig <kubeconfig> --listen-addr <node IP>:9476 --memberlist-key-file
    /// <key file> <flags>`, in a new log. The key file is written with
    /// [`LAB_MEMBERLIST_KEY`] first if it does not exist.
    pub fn start(&mut self, node: &str, kubeconfig: &Path, flags: &[&str]) -> Result<()> {
        ensure!(
            !self.running(node),
            "the agent of {node} is running already"
        );
        let n = self.node(node)?.clone();
        let runs = self.logs.entry(node.to_string()).or_default();
        let name = format!("agent-{node}-{}", runs.len() + 1);
        let log = self.dir.join(format!("{name}.log"));
        runs.push(log.clone());
        let bin = self.bin.display().to_string();
        let kubeconfig = kubeconfig.display().to_string();
        let listen = format!("{}:{AGENT_PORT}", n.ip);
        let mut argv: Vec<&str> = vec![
            &bin,
            "agent",
            "--node-name",
            node,
            "--kubeconfig",
            &kubeconfig,
            "--listen-addr",
            &listen,
        ];
        let key_file = self.key_file(node);
        let key_arg = key_file.display().to_string();
        let own_key = flags.iter().any(|f| {
            f.starts_with("--memberlist-key-file") || f.starts_with("--memberlist-insecure")
        });
        if !own_key {
            if !key_file.exists() {
                self.write_key(node, LAB_MEMBERLIST_KEY)?;
            }
            argv.extend_from_slice(&["--memberlist-key-file", &key_arg]);
        }
        argv.extend_from_slice(flags);
        let process = LabProcess::spawn(&name, &n.netns, &argv, &log)?;
        self.running.insert(node.to_string(), process);
        Ok(())
    }

    /// SIGKILLs and reaps the agent of `node`; `false` if it had none.
    pub fn kill(&mut self, node: &str) -> Result<bool> {
        match self.running.remove(node) {
            Some(mut p) => p.kill().map(|_| true),
            None => Ok(false),
        }
    }

    /// SIGTERMs the agent of `node` and waits (at most `timeout`) for it to exit; `None`
    /// when it was still running then (it is left running).
    pub fn terminate(
        &mut self,
        node: &str,
        timeout: Duration,
    ) -> Result<Option<std::process::ExitStatus>> {
        let p = self
            .running
            .get_mut(node)
            .with_context(|| format!("no agent on {node}"))?;
        let pid = nix::unistd::Pid::from_raw(p.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .with_context(|| format!("SIGTERM to the agent of {node}"))?;
        let status = p.wait_timeout(timeout)?;
        if status.is_some() {
            self.running.remove(node);
        }
        Ok(status)
    }

    /// SIGKILLs every agent.
    pub fn kill_all(&mut self) {
        for (_, mut p) in std::mem::take(&mut self.running) {
            let _ = p.kill();
        }
    }

    /// Whether the agent process of `node` is running.
    pub fn running(&mut self, node: &str) -> bool {
        self.running
            .get_mut(node)
            .is_some_and(|p| matches!(p.try_status(), Ok(None)))
    }

    /// Everything the agent of `node` logged, each run under a line naming its file.
    pub fn log(&self, node: &str) -> String {
        let mut out = String::new();
        for path in self.logs.get(node).into_iter().flatten() {
            if let Ok(text) = std::fs::read_to_string(path) {
                out.push_str(&format!("---- {} ----\n{text}", path.display()));
            }
        }
        out
    }

    /// The last `lines` lines of every run's log, for failure reports.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for (node, paths) in &self.logs {
            for path in paths {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let all: Vec<&str> = text.lines().collect();
                out.push_str(&format!(
                    "==== {node}: last {lines} lines of {} ====\n{}\n",
                    path.display(),
                    all[all.len().saturating_sub(lines)..].join("\n")
                ));
            }
        }
        out
    }

    /// The lines of every agent log that mention a panic, as `node: line`.
    pub fn panics(&self) -> Vec<String> {
        self.logs
            .keys()
            .flat_map(|n| {
                self.log(n)
                    .lines()
                    .filter(|l| l.contains("panicked"))
                    .map(|l| format!("{n}: {l}"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// `GET path` on the agent of `node` (from `probe_netns`).
    pub fn get(&self, node: &str, path: &str) -> Result<(u16, String)> {
        let ip = self.node(node)?.ip;
        http_get_in(&self.probe_netns, SocketAddr::from((ip, AGENT_PORT)), path)
    }

    /// Waits until the agent of `node` answers `/readyz` with 200; fails at once when it
    /// exits, and after `timeout`, with its log.
    pub fn wait_ready(&mut self, node: &str, timeout: Duration) -> Result<()> {
        let ready = poll(timeout, Duration::from_millis(50), || {
            if !self.running(node) {
                bail!("the agent of {node} exited:\n{}", self.log(node));
            }
            Ok(matches!(self.get(node, "/readyz"), Ok((200, _))).then_some(()))
        })?;
        ensure!(
            ready.is_some(),
            "the agent of {node} is not ready after {timeout:?}:\n{}",
            self.log(node)
        );
        Ok(())
    }

    /// One sample of the agent's `/metrics` (exact name, labels included).
    pub fn metric(&self, node: &str, sample: &str) -> Option<f64> {
        let (code, body) = self.get(node, "/metrics").ok()?;
        if code != 200 {
            return None;
        }
        metric_value(&body, sample)
    }
}

impl LabCluster {
    /// Builds the lab (nodes, client, control plane), registers the Nodes and starts the
    /// kubelet loop and (per spec) the agents, waiting until they are ready.
    pub fn start(spec: LabClusterSpec) -> Result<LabCluster> {
        let bin = crate::netpol::palisade_bin()?;
        let l2 = agent_has_l2(&bin);
        let mut lab = Lab::new(LabSpec::new(spec.nodes))?;
        let cp_host = lab.add_lan_host("cp", CONTROL_PLANE_IP)?;
        let client = lab.client().cloned().context("the lab has no client")?;
        let nodes = lab.nodes().to_vec();
        let prefix = lab.prefix().to_string();
        let dir = lab.tmp_dir().to_path_buf();
        let lab = Arc::new(Mutex::new(lab));
        let mut cluster = LabCluster {
            agents: LabAgents::new(bin, &dir, &cp_host.netns, &nodes),
            kubelet: None,
            cp: None,
            lab: lab.clone(),
            spec: spec.clone(),
            prefix,
            cp_netns: cp_host.netns.clone(),
            client,
            nodes,
            outage: ApiOutage::Off,
            l2,
        };
        // From here on an error drops `cluster`, which removes everything.
        let cp = match &spec.kubeconfig {
            None => ControlPlane::start_lab(&cp_host.netns, &dir)?,
            Some(path) => ControlPlane::start_external(path, &cp_host.netns, &dir)?,
        };
        let cp = Arc::new(cp);
        cluster.cp = Some(cp.clone());
        let api = cp.api();
        api.apply(&json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": SYSTEM_NAMESPACE },
        }))
        .context("creating the palisade-system namespace")?;
        for node in &cluster.nodes {
            let object = k8s::node(node);
            api.apply(&object)
                .with_context(|| format!("registering Node {}", node.name))?;
            // Nodes keep their status on create; make sure addresses are there.
            api.merge_patch(
                &Kind::of("v1", "Node"),
                None,
                &node.name,
                &json!({ "status": object["status"].clone() }),
                true,
            )
            .with_context(|| format!("writing the status of Node {}", node.name))?;
        }
        let mut kubelet_cfg = spec.kubelet.clone();
        if !cp.is_lab() {
            kubelet_cfg.write_endpoint_slices = false;
        }
        cluster.kubelet = Some(KubeletLoop::start(kubelet_cfg, lab, cp)?);
        if spec.agents {
            let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
            for node in &names {
                cluster.start_agent(node)?;
            }
            for node in &names {
                cluster.wait_agent_ready(node, Duration::from_secs(30))?;
            }
        }
        Ok(cluster)
    }

    /// The lab underneath (locked; do not hold it across waits).
    pub fn lab(&self) -> MutexGuard<'_, Lab> {
        lock(&self.lab)
    }

    /// The control plane.
    pub fn control_plane(&self) -> &ControlPlane {
        self.cp
            .as_deref()
            .expect("control plane present while the cluster lives")
    }

    /// The lab's per-run prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The client on the LAN.
    pub fn client(&self) -> &Endpoint {
        &self.client
    }

    /// The control-plane namespace.
    pub fn cp_netns(&self) -> &str {
        &self.cp_netns
    }

    /// The lab's nodes.
    pub fn nodes(&self) -> &[NodeHandle] {
        &self.nodes
    }

    /// The spec it was built from.
    pub fn spec(&self) -> &LabClusterSpec {
        &self.spec
    }

    /// Waits until the kubelet loop has acted on everything written so far.
    pub fn settle(&self) -> Result<()> {
        match &self.kubelet {
            Some(k) => k.settle(Duration::from_secs(10)),
            None => Ok(()),
        }
    }

    /// The kubelet loop.
    pub fn kubelet(&self) -> Option<&KubeletLoop> {
        self.kubelet.as_ref()
    }

    fn node(&self, name: &str) -> Result<&NodeHandle> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("the lab has no node {name}"))
    }

    /// The agents.
    pub fn agents(&self) -> &LabAgents {
        &self.agents
    }

    /// `GET path` on the node's agent (from the control-plane host).
    pub fn agent_get(&self, node: &str, path: &str) -> Result<(u16, String)> {
        self.agents.get(node, path)
    }

    /// Whether the node's agent process is running.
    pub fn agent_running(&mut self, node: &str) -> bool {
        self.agents.running(node)
    }

    /// Everything the node's agent (all its runs) logged.
    pub fn agent_log(&self, node: &str) -> String {
        self.agents.log(node)
    }

    fn resolve(&self, peer: &Peer) -> Result<Endpoint> {
        match peer {
            Peer::Client => Ok(self.client.clone()),
            Peer::Pod(id) => {
                let (ns, name) = id
                    .split_once('/')
                    .with_context(|| format!("{id} is not ns/name"))?;
                Ok(self.lab().pod(ns, name)?.endpoint())
            }
        }
    }
}

impl Drop for LabCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.agents.log_tails(60));
        }
        self.agents.kill_all();
        if self.outage != ApiOutage::Off {
            // So the kubelet's pass in flight ends now rather than at its call timeout.
            if let Some(cp) = &self.cp {
                let _ = cp.set_outage(Outage::Off);
            }
        }
        if let Some(mut k) = self.kubelet.take() {
            k.stop();
        }
        self.cp.take();
        if let Err(e) = lock(&self.lab).teardown() {
            eprintln!("lab {}: teardown: {e:#}", self.prefix);
        }
    }
}

/// A background prober on its own thread (inside the source namespace).
struct LabProber {
    stop: Arc<AtomicBool>,
    started: Instant,
    thread: Option<JoinHandle<Result<ProbeLog>>>,
}

impl Prober for LabProber {
    fn started(&self) -> Instant {
        self.started
    }

    fn stop(mut self: Box<Self>) -> Result<ProbeLog> {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.take().context("prober already stopped")?;
        thread
            .join()
            .map_err(|_| anyhow!("a prober thread panicked"))?
    }
}

impl Drop for LabProber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Cluster for LabCluster {
    fn backend(&self) -> &'static str {
        "lab"
    }

    fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    fn pod_manifest(&self, ns: &str, name: &str, labels: &Labels, node: &str) -> Value {
        let ports: Vec<NamedPort> = [80, 81]
            .into_iter()
            .flat_map(|p| {
                [
                    NamedPort::upstream(p, Protocol::Tcp),
                    NamedPort::upstream(p, Protocol::Udp),
                ]
            })
            .collect();
        let mut pod = k8s::pod(&k8s::PodSpec {
            namespace: ns,
            name,
            labels,
            node_name: node,
            host_ip: Ipv4Addr::UNSPECIFIED,
            pod_ip: Ipv4Addr::UNSPECIFIED,
            ports: &ports,
        });
        // The lab's kubelet writes the status; uids come from the API.
        if let Some(o) = pod.as_object_mut() {
            o.remove("status");
        }
        if let Some(m) = pod["metadata"].as_object_mut() {
            m.remove("uid");
        }
        pod
    }

    fn apply(&mut self, object: &Value) -> Result<()> {
        self.control_plane().api().apply(object).map(|_| ())
    }

    fn delete(
        &mut self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Result<()> {
        self.control_plane()
            .api()
            .delete(&Kind::of(api_version, kind), ns, name)
            .map(|_| ())
    }

    fn get(
        &mut self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>> {
        self.control_plane()
            .api()
            .get(&Kind::of(api_version, kind), ns, name)
    }

    fn wait_pods_ready(&mut self, ids: &[String], timeout: Duration) -> Result<()> {
        let api = self.control_plane().api();
        let kind = Kind::of("v1", "Pod");
        let mut pending: Vec<String> = ids.to_vec();
        let done = poll(timeout, Duration::from_millis(50), || {
            let mut still = Vec::new();
            for id in &pending {
                let (ns, name) = id
                    .split_once('/')
                    .with_context(|| format!("{id} is not ns/name"))?;
                let ready = api
                    .get(&kind, Some(ns), name)?
                    .is_some_and(|p| pod_is_ready(&p) && p["status"]["podIP"].is_string());
                if !ready {
                    still.push(id.clone());
                }
            }
            pending = still;
            Ok(pending.is_empty().then_some(()))
        })?;
        match done {
            Some(()) => Ok(()),
            None => bail!(
                "pods {pending:?} not ready after {timeout:?} (kubelet: {:?})",
                self.kubelet.as_ref().and_then(|k| k.last_error())
            ),
        }
    }

    fn delete_pod_gracefully(&mut self, id: &str) -> Result<()> {
        let (ns, name) = id
            .split_once('/')
            .with_context(|| format!("{id} is not ns/name"))?;
        let kind = Kind::of("v1", "Pod");
        let api = self.control_plane().api();
        // 1. Terminating: not ready, so it leaves the endpoints and the nat rules.
        api.merge_patch(
            &kind,
            Some(ns),
            name,
            &json!({ "metadata": { "annotations": { TERMINATING_ANNOTATION: "true" } } }),
            false,
        )?;
        let gone_from_rules = poll(Duration::from_secs(10), Duration::from_millis(20), || {
            let ip = self.lab().pod(ns, name).map(|p| p.ip).ok();
            let rules = self.kubelet.as_ref().map(|k| k.rules()).unwrap_or_default();
            let pod = api.get(&kind, Some(ns), name)?;
            let not_ready = pod.is_none_or(|p| !pod_is_ready(&p));
            Ok((not_ready
                && !rules
                    .iter()
                    .any(|r| r.backends.iter().any(|(b, _)| Some(*b) == ip)))
            .then_some(()))
        })?;
        ensure!(
            gone_from_rules.is_some(),
            "pod {id} did not leave the endpoints within 10s"
        );
        // 2. The grace period: established connections finish.
        std::thread::sleep(Duration::from_millis(300));
        // 3. Gone.
        api.delete(&kind, Some(ns), name)?;
        let removed = poll(Duration::from_secs(10), Duration::from_millis(20), || {
            Ok(self.lab().pod(ns, name).is_err().then_some(()))
        })?;
        ensure!(removed.is_some(), "pod {id} was not removed within 10s");
        Ok(())
    }

    fn pod_ip(&mut self, id: &str) -> Result<Ipv4Addr> {
        let (ns, name) = id
            .split_once('/')
            .with_context(|| format!("{id} is not ns/name"))?;
        let pod = self
            .control_plane()
            .api()
            .get(&Kind::of("v1", "Pod"), Some(ns), name)?
            .with_context(|| format!("pod {id} does not exist"))?;
        pod["status"]["podIP"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("pod {id} has no IP yet"))
    }

    fn probe_matrix(
        &mut self,
        froms: &[Peer],
        tos: &[(String, Ipv4Addr)],
        port: u16,
        protocol: Protocol,
    ) -> Result<Matrix> {
        let froms_ep: Vec<Endpoint> = froms
            .iter()
            .map(|p| self.resolve(p))
            .collect::<Result<_>>()?;
        let jobs: Vec<Job> = {
            let lab = self.lab();
            let mut jobs = Vec::new();
            for from in &froms_ep {
                for (name, ip) in tos {
                    let to = Endpoint {
                        name: name.clone(),
                        netns: String::new(),
                        ip: *ip,
                    };
                    jobs.push(lab.job(from, &to, port, protocol));
                }
            }
            jobs
        };
        let outcomes = probe::run_all(&jobs, self.spec.probe_timeout)?;
        let mut m = Matrix::new(
            froms.iter().map(Peer::label).collect(),
            tos.iter().map(|(n, _)| n.clone()).collect(),
            false,
        );
        for (i, o) in outcomes.iter().enumerate() {
            m.set_at(i / tos.len(), i % tos.len(), o.reachable);
        }
        Ok(m)
    }

    fn start_prober(
        &mut self,
        from: &Peer,
        to: Ipv4Addr,
        port: u16,
        protocol: Protocol,
        interval: Duration,
        timeout: Duration,
    ) -> Result<Box<dyn Prober>> {
        ensure!(
            protocol != Protocol::Sctp,
            "background probers do TCP and UDP"
        );
        let from = self.resolve(from)?;
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let job = Job {
            from_netns: from.netns.clone(),
            to_ip: to,
            port,
            protocol,
            dst_log: None,
        };
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("prober-{}", from.name))
                .spawn(move || -> Result<ProbeLog> {
                    let mut hopper = Hopper::default();
                    hopper.enter(&job.from_netns)?;
                    let mut log = ProbeLog::default();
                    // Bounded: a prober nobody stops ends by itself after 10 minutes.
                    let limit = started + Duration::from_secs(600);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
                        let at = started.elapsed();
                        let o = probe::probe_here(&job, timeout)?;
                        log.attempts.push(Attempt {
                            at,
                            ok: o.reachable,
                            detail: o.detail,
                        });
                        let spent = started.elapsed() - at;
                        if spent < interval {
                            std::thread::sleep(interval - spent);
                        }
                    }
                    Ok(log)
                })
                .context("spawning a prober")?
        };
        Ok(Box::new(LabProber {
            stop,
            started,
            thread: Some(thread),
        }))
    }

    fn arrivals(&mut self, from: &Peer, port: u16, protocol: Protocol) -> Result<Option<u64>> {
        let src = self.resolve(from)?.ip;
        let mut total = 0;
        {
            let lab = self.lab();
            for pod in lab.pods() {
                if let Some(log) = lab.server_log(pod.ip) {
                    total += log.count(protocol, src, port);
                }
            }
        }
        if let Some(k) = &self.kubelet {
            for retired in k.retired() {
                total += retired.log.count(protocol, src, port);
            }
        }
        Ok(Some(total))
    }

    fn exec_on_node(&mut self, node: &str, argv: &[&str]) -> Result<String> {
        let netns = self.node(node)?.netns.clone();
        netns::exec_ok(&netns, argv)
    }

    fn kill_agent(&mut self, node: &str) -> Result<()> {
        let netns = self.node(node)?.netns.clone();
        // As a container runtime would: every process of the node's "container".
        self.lab().kill_all_in(&netns)?;
        self.agents.kill(node)?;
        Ok(())
    }

    fn start_agent(&mut self, node: &str) -> Result<()> {
        let kubeconfig = self.control_plane().agent_kubeconfig().to_path_buf();
        let mut flags: Vec<&str> = vec![
            "--pod-namespace",
            SYSTEM_NAMESPACE,
            "--enable-netpol=true",
            "--enable-loadbalancer=true",
            "--log-level",
            &self.spec.agent_log_level,
        ];
        flags.extend_from_slice(FAST_LEASE_FLAGS);
        flags.extend_from_slice(FAST_SYNC_FLAGS);
        if self.l2 {
            flags.push("--enable-l2=true");
        }
        flags.extend(self.spec.agent_args.iter().map(String::as_str));
        self.agents.start(node, &kubeconfig, &flags)
    }

    fn wait_agent_ready(&mut self, node: &str, timeout: Duration) -> Result<()> {
        self.agents.wait_ready(node, timeout)
    }

    fn isolate_node(&mut self, node: &str, isolated: bool) -> Result<()> {
        let index = self.node(node)?.index;
        let lan = self.lab().lan_netns().to_string();
        // The node's port on the LAN bridge (see Lab::build).
        let port = format!("{}l{index}", self.prefix);
        let state = if isolated { "down" } else { "up" };
        netns::ip_in(&lan, &["link", "set", &port, state])?;
        if !isolated {
            netns::wait_links_up(&lan, &[&port], Duration::from_secs(5))?;
        }
        Ok(())
    }

    fn set_api_outage(&mut self, outage: ApiOutage) -> Result<()> {
        self.control_plane().set_outage(match outage {
            ApiOutage::Off => Outage::Off,
            ApiOutage::Disconnect => Outage::Disconnect,
            ApiOutage::Unavailable => Outage::ServiceUnavailable,
        })?;
        self.outage = outage;
        Ok(())
    }

    fn supports_api_outage(&self) -> bool {
        self.cp.as_ref().is_some_and(|cp| cp.is_lab())
    }

    fn lan_cidr(&self) -> String {
        "198.51.100.0/24".into()
    }

    fn lb_pool_addresses(&self) -> Vec<String> {
        vec!["198.51.100.200-198.51.100.250".into()]
    }

    fn announcer_available(&mut self) -> Result<bool> {
        if let Ok(v) = std::env::var("PALISADE_E2E_ANNOUNCER") {
            return Ok(matches!(v.as_str(), "1" | "true" | "yes"));
        }
        if self.l2 {
            return Ok(true);
        }
        // An announcer without the flag would still show in the metrics.
        let names = self.node_names();
        for node in names {
            if let Ok((200, body)) = self.agent_get(&node, "/metrics") {
                return Ok(metrics_show_announcer(&body));
            }
        }
        bail!("no agent answered /metrics")
    }

    fn announcing_node(&mut self, vip: Ipv4Addr) -> Result<Option<String>> {
        let out = netns::ip_in(&self.client.netns, &["neigh", "show", &vip.to_string()])?;
        let mac = out
            .split_whitespace()
            .skip_while(|w| *w != "lladdr")
            .nth(1)
            .map(str::to_ascii_lowercase);
        let Some(mac) = mac else { return Ok(None) };
        for node in &self.nodes {
            if mac_of(&node.netns, "eth0")?.eq_ignore_ascii_case(&mac) {
                return Ok(Some(node.name.clone()));
            }
        }
        Ok(Some(format!("unknown MAC {mac}")))
    }

    fn diagnostics(&mut self) -> String {
        let mut out = String::new();
        if let Some(k) = &self.kubelet {
            out.push_str(&format!(
                "kubelet last error: {:?}\nLB rules: {:?}\n",
                k.last_error(),
                k.rules()
            ));
        }
        for node in self.nodes.clone() {
            out.push_str(&format!("==== {} ====\n", node.name));
            for argv in [&["iptables-save"][..], &["ipset", "list", "-n"][..]] {
                match netns::exec_ok(&node.netns, argv) {
                    Ok(t) => out.push_str(&format!("-- {}:\n{t}", argv.join(" "))),
                    Err(e) => out.push_str(&format!("-- {}: {e:#}\n", argv.join(" "))),
                }
            }
            let log = self.agent_log(&node.name);
            let lines: Vec<&str> = log.lines().collect();
            out.push_str(&format!(
                "-- agent log (last 40 lines):\n{}\n",
                lines[lines.len().saturating_sub(40)..].join("\n")
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_value_reads_one_exact_sample() {
        let text = "# HELP palisade_leader leader\npalisade_leader 1\n\
                    palisade_leader_changes_total 3\n\
                    palisade_allocator_addresses{pool=\"lan\",family=\"IPv4\"} 51\n";
        assert_eq!(metric_value(text, "palisade_leader"), Some(1.0));
        assert_eq!(
            metric_value(
                text,
                "palisade_allocator_addresses{pool=\"lan\",family=\"IPv4\"}"
            ),
            Some(51.0)
        );
        assert_eq!(metric_value(text, "palisade_allocator_addresses"), None);
        assert_eq!(metric_value(text, "palisade_missing"), None);
    }

    #[test]
    fn http_get_returns_status_and_body() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut byte = [0u8];
            while !request.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap() == 1 {
                request.push(byte[0]);
            }
            s.write_all(b"HTTP/1.0 503 Service Unavailable\r\nX: y\r\n\r\nnot ready\n")
                .unwrap();
            String::from_utf8_lossy(&request).into_owned()
        });
        let got = http_get(
            addr,
            "/readyz",
            Duration::from_secs(2),
            Duration::from_secs(5),
        );
        assert_eq!(got.unwrap(), (503, "not ready\n".to_string()));
        assert!(server
            .join()
            .unwrap()
            .starts_with("GET /readyz HTTP/1.0\r\n"));
    }

    #[test]
    fn announcer_detection_reads_metric_names_only() {
        let without = "# HELP palisade_ready ready (announces nothing)\npalisade_ready 1\n\
                       palisade_allocator_addresses{pool=\"lan\",family=\"ipv4\"} 51\n";
        assert!(!metrics_show_announcer(without));
        let with = format!("{without}palisade_speaker_replies_sent_total 3\n");
        assert!(metrics_show_announcer(&with));
        assert_eq!(
            metric_names(without),
            vec!["palisade_ready", "palisade_allocator_addresses"]
        );
    }
}
