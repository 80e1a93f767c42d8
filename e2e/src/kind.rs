//! [`KindCluster`]: the [`Cluster`] trait over `kubectl` and `docker` against a kind cluster
//! that `e2e/kind/run.sh` prepared (Palisade installed with its chart, a client container on
//! the `kind` docker network). Selected with `PALISADE_E2E_BACKEND=kind`; cannot run where
//! there is no Docker (the lab is the default backend there).
//!
//! ```text
//!   scenario ── apply/get/delete ──► kubectl (context kind-<cluster>)
//!            ── probe from a pod ──► kubectl exec <pod> -c cont-80-tcp -- /agnhost connect IP:PORT
//!            ── probe from client ► docker exec <client> /agnhost connect IP:PORT
//!            ── kill an agent ────► docker exec <node> pkill -KILL -x palisade (kubelet restarts it)
//!            ── API outage ───────► docker pause/unpause <cluster>-control-plane
//!            ── who announces ────► the client's /proc/net/arp MAC vs the nodes' MACs
//! ```
//!
//! Environment: `PALISADE_E2E_KIND_CLUSTER` (default `palisade-e2e`), `PALISADE_E2E_KIND_CLIENT`
//! (default `palisade-e2e-client`), `PALISADE_E2E_LB_RANGE` (default: `.200-.250` of the last
//! /24 of the kind network), `PALISADE_E2E_NAMESPACE` (Palisade's, default `palisade-system`),
//! `AGNHOST_IMAGE`.
//!
//! Differences from the lab: no destination-side packet counts ([`Cluster::arrivals`] is
//! `None`; probers' own successes are the evidence), probes cost a `kubectl exec` each (about
//! 0.1–0.3 s), and the kubelet restarts a killed agent by itself (so "restart" is immediate and
//! failover is measured against that).

use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::api::Kind;
use crate::cluster::{poll, ApiOutage, Attempt, Cluster, Peer, ProbeLog, Prober};
use crate::k8s::Labels;
use crate::matrix::Matrix;
use crate::server::Protocol;

/// The image the upstream network-policy e2e tests use for their pods.
pub const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.53";
/// How many `kubectl exec` probes run at once.
const PARALLEL_PROBES: usize = 12;

/// A kind cluster with Palisade installed (see `e2e/kind/run.sh`).
pub struct KindCluster {
    cluster: String,
    context: String,
    client: String,
    system_ns: String,
    agnhost: String,
    nodes: Vec<String>,
    subnet: String,
    pool: Vec<String>,
    paused: bool,
    /// Nodes taken off the kind network, with their address there.
    detached: Vec<(String, String)>,
}

fn run(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_with_input(cmd: &mut Command, input: &str) -> Result<String> {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The resource argument kubectl takes for a kind (`pods`, `networkpolicies.networking.k8s.io`).
fn resource_arg(api_version: &str, kind: &str) -> String {
    let k = Kind::of(api_version, kind);
    match api_version.split_once('/') {
        Some((group, _)) => format!("{}.{group}", k.plural),
        None => k.plural,
    }
}

/// `a.b.c.d/n` → the default pool: `.200-.250` of the subnet's last /24.
pub fn default_pool(subnet: &str) -> Result<String> {
    let (net, len) = subnet.split_once('/').context("subnet without /len")?;
    let net: Ipv4Addr = net.parse().context("subnet address")?;
    let len: u32 = len.parse().context("subnet length")?;
    anyhow::ensure!(len <= 24, "the kind network {subnet} is smaller than a /24");
    let host_mask = if len == 0 {
        u32::MAX
    } else {
        (1u32 << (32 - len)) - 1
    };
    let last24 = (u32::from(net) | host_mask) & !0xff;
    let a = Ipv4Addr::from(last24 | 200);
    let b = Ipv4Addr::from(last24 | 250);
    Ok(format!("{a}-{b}"))
}

fn agnhost_args(port: u16, protocol: Protocol) -> Vec<String> {
    let flag = match protocol {
        Protocol::Udp => "--udp",
        _ => "--tcp",
    };
    vec![
        "/agnhost".into(),
        "serve-hostname".into(),
        flag.into(),
        "--http=false".into(),
        "--port".into(),
        port.to_string(),
    ]
}

impl KindCluster {
    /// Connects to the kind cluster named by the environment (see the module docs).
    pub fn from_env() -> Result<KindCluster> {
        let cluster =
            std::env::var("PALISADE_E2E_KIND_CLUSTER").unwrap_or_else(|_| "palisade-e2e".into());
        let client = std::env::var("PALISADE_E2E_KIND_CLIENT")
            .unwrap_or_else(|_| "palisade-e2e-client".into());
        let system_ns =
            std::env::var("PALISADE_E2E_NAMESPACE").unwrap_or_else(|_| "palisade-system".into());
        let agnhost = std::env::var("AGNHOST_IMAGE").unwrap_or_else(|_| AGNHOST.into());
        let context = format!("kind-{cluster}");
        let mut me = KindCluster {
            cluster,
            context,
            client,
            system_ns,
            agnhost,
            nodes: Vec::new(),
            subnet: String::new(),
            pool: Vec::new(),
            paused: false,
            detached: Vec::new(),
        };
        let workers = me.kubectl_ok(&[
            "get",
            "nodes",
            "-l",
            "!node-role.kubernetes.io/control-plane",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])?;
        me.nodes = workers.split_whitespace().map(str::to_string).collect();
        me.nodes.sort();
        anyhow::ensure!(
            me.nodes.len() >= 2,
            "the kind cluster needs 2 workers, has {:?}",
            me.nodes
        );
        let subnets = run_ok(Command::new("docker").args([
            "network",
            "inspect",
            "kind",
            "-f",
            "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
        ]))?;
        me.subnet = subnets
            .split_whitespace()
            .find(|s| s.parse::<Ipv4Addr>().is_err() && !s.contains(':'))
            .context("the kind network has no IPv4 subnet")?
            .to_string();
        me.pool = vec![match std::env::var("PALISADE_E2E_LB_RANGE") {
            Ok(r) => r,
            Err(_) => default_pool(&me.subnet)?,
        }];
        Ok(me)
    }

    /// Removes what scenarios create (their namespaces, the pool and advertisement `lan`) and
    /// waits until it is gone, so scenarios can share the cluster one after the other.
    pub fn reset(&mut self) -> Result<()> {
        let namespaces = ["x", "y", "z", "web", "shop", "other", "demo"];
        let mut args = vec![
            "delete",
            "namespace",
            "--ignore-not-found",
            "--wait=true",
            "--timeout=180s",
        ];
        args.extend(namespaces);
        self.kubectl_ok(&args)?;
        for kind in [
            "l2advertisements.palisade.dev",
            "ipaddresspools.palisade.dev",
        ] {
            self.kubectl_ok(&["delete", kind, "lan", "--ignore-not-found", "--wait=true"])?;
        }
        Ok(())
    }

    fn kubectl(&self) -> Command {
        let mut c = Command::new("kubectl");
        c.args(["--context", &self.context]);
        c
    }

    fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        run_ok(self.kubectl().args(args))
    }

    fn agent_pod(&self, node: &str) -> Result<String> {
        let out = self.kubectl_ok(&[
            "get",
            "pods",
            "-n",
            &self.system_ns,
            "-l",
            "app.kubernetes.io/name=palisade,app.kubernetes.io/component=agent",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])?;
        let name = out.trim().to_string();
        anyhow::ensure!(!name.is_empty(), "no Palisade agent pod on {node}");
        Ok(name)
    }

    fn connect_argv(to: Ipv4Addr, port: u16, protocol: Protocol, timeout: Duration) -> Vec<String> {
        vec![
            "/agnhost".into(),
            "connect".into(),
            format!("{to}:{port}"),
            format!("--timeout={}ms", timeout.as_millis().max(100)),
            format!("--protocol={}", protocol.lower()),
        ]
    }

    /// The command that probes `to:port` from `from`; exit status 0 = reachable.
    fn probe_cmd(
        &self,
        from: &Peer,
        to: Ipv4Addr,
        port: u16,
        protocol: Protocol,
        timeout: Duration,
    ) -> Result<Command> {
        let argv = Self::connect_argv(to, port, protocol, timeout);
        match from {
            Peer::Client => {
                let mut c = Command::new("docker");
                c.args(["exec", &self.client]).args(&argv);
                Ok(c)
            }
            Peer::Pod(id) => {
                let (ns, name) = id
                    .split_once('/')
                    .with_context(|| format!("{id} is not ns/name"))?;
                let mut c = self.kubectl();
                c.args(["exec", "-n", ns, name, "-c", "cont-80-tcp", "--"])
                    .args(&argv);
                Ok(c)
            }
        }
    }

    fn node_mac(&self, node: &str) -> Result<String> {
        let out = run_ok(Command::new("docker").args([
            "inspect",
            "-f",
            "{{(index .NetworkSettings.Networks \"kind\").MacAddress}}",
            node,
        ]))?;
        Ok(out.trim().to_ascii_lowercase())
    }
}

struct KindProber {
    stop: Arc<AtomicBool>,
    started: Instant,
    thread: Option<JoinHandle<ProbeLog>>,
}

impl Prober for KindProber {
    fn started(&self) -> Instant {
        self.started
    }

    fn stop(mut self: Box<Self>) -> Result<ProbeLog> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .context("prober already stopped")?
            .join()
            .map_err(|_| anyhow!("a prober thread panicked"))
    }
}

impl Drop for KindProber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Cluster for KindCluster {
    fn backend(&self) -> &'static str {
        "kind"
    }

    fn node_names(&self) -> Vec<String> {
        self.nodes.clone()
    }

    fn pod_manifest(&self, ns: &str, name: &str, labels: &Labels, node: &str) -> Value {
        // Like the upstream netpol e2e pods: one agnhost container per port and protocol,
        // each declaring its named port `serve-<port>-<proto>`.
        let mut containers = Vec::new();
        for port in [80u16, 81] {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let mut c = json!({
                    "name": format!("cont-{port}-{}", protocol.lower()),
                    "image": self.agnhost,
                    "imagePullPolicy": "IfNotPresent",
                    "command": agnhost_args(port, protocol),
                    "ports": [{
                        "name": format!("serve-{port}-{}", protocol.lower()),
                        "containerPort": port,
                        "protocol": protocol.k8s_name(),
                    }],
                    "securityContext": {},
                });
                if port == 80 && protocol == Protocol::Tcp {
                    c["readinessProbe"] =
                        json!({ "tcpSocket": { "port": 80 }, "periodSeconds": 1 });
                    // Keep serving while the endpoint is withdrawn (graceful deletion).
                    c["lifecycle"] = json!({ "preStop": { "sleep": { "seconds": 2 } } });
                }
                containers.push(c);
            }
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name, "namespace": ns, "labels": labels },
            "spec": {
                "nodeName": node,
                "terminationGracePeriodSeconds": 5,
                "containers": containers,
            },
        })
    }

    fn apply(&mut self, object: &Value) -> Result<()> {
        let text = serde_json::to_string(object)?;
        run_with_input(self.kubectl().args(["apply", "-f", "-"]), &text).map(|_| ())
    }

    fn delete(
        &mut self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Result<()> {
        let mut cmd = self.kubectl();
        cmd.args([
            "delete",
            &resource_arg(api_version, kind),
            name,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=60s",
        ]);
        if let Some(ns) = ns {
            cmd.args(["-n", ns]);
        }
        run_ok(&mut cmd).map(|_| ())
    }

    fn get(
        &mut self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>> {
        let mut cmd = self.kubectl();
        cmd.args([
            "get",
            &resource_arg(api_version, kind),
            name,
            "-o",
            "json",
            "--ignore-not-found",
        ]);
        if let Some(ns) = ns {
            cmd.args(["-n", ns]);
        }
        let out = run_ok(&mut cmd)?;
        if out.trim().is_empty() {
            return Ok(None);
        }
        Ok(Some(
            serde_json::from_str(&out).context("kubectl get -o json")?,
        ))
    }

    fn set_label(
        &mut self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<()> {
        let change = match value {
            Some(v) => format!("{key}={v}"),
            None => format!("{key}-"),
        };
        let resource = resource_arg(api_version, kind);
        let mut args = vec![
            "label",
            "--overwrite",
            resource.as_str(),
            name,
            change.as_str(),
        ];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        self.kubectl_ok(&args).map(|_| ())
    }

    fn wait_pods_ready(&mut self, ids: &[String], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for id in ids {
            let (ns, name) = id
                .split_once('/')
                .with_context(|| format!("{id} is not ns/name"))?;
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_secs()
                .max(1);
            self.kubectl_ok(&[
                "wait",
                "-n",
                ns,
                "--for=condition=Ready",
                &format!("pod/{name}"),
                &format!("--timeout={left}s"),
            ])
            .with_context(|| format!("pod {id} not ready"))?;
        }
        Ok(())
    }

    fn delete_pod_gracefully(&mut self, id: &str) -> Result<()> {
        let (ns, name) = id
            .split_once('/')
            .with_context(|| format!("{id} is not ns/name"))?;
        // Terminating pods leave the endpoints at once; preStop keeps them serving 2 s.
        self.kubectl_ok(&[
            "delete",
            "pod",
            "-n",
            ns,
            name,
            "--wait=true",
            "--timeout=60s",
        ])
        .map(|_| ())
    }

    fn pod_ip(&mut self, id: &str) -> Result<Ipv4Addr> {
        let (ns, name) = id
            .split_once('/')
            .with_context(|| format!("{id} is not ns/name"))?;
        let out = self.kubectl_ok(&[
            "get",
            "pod",
            "-n",
            ns,
            name,
            "-o",
            "jsonpath={.status.podIP}",
        ])?;
        out.trim()
            .parse()
            .with_context(|| format!("pod {id} has no IP yet"))
    }

    fn probe_matrix(
        &mut self,
        froms: &[Peer],
        tos: &[(String, Ipv4Addr)],
        port: u16,
        protocol: Protocol,
    ) -> Result<Matrix> {
        let mut cmds = Vec::new();
        for from in froms {
            for (_, ip) in tos {
                cmds.push(Mutex::new(Some(self.probe_cmd(
                    from,
                    *ip,
                    port,
                    protocol,
                    Duration::from_secs(1),
                )?)));
            }
        }
        let results: Vec<Mutex<Option<bool>>> = (0..cmds.len()).map(|_| Mutex::new(None)).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..PARALLEL_PROBES.min(cmds.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(cell) = cmds.get(i) else { return };
                    let cmd = cell.lock().ok().and_then(|mut c| c.take());
                    let ok = cmd.is_some_and(|mut c| run(&mut c).is_ok_and(|o| o.status.success()));
                    if let Ok(mut r) = results[i].lock() {
                        *r = Some(ok);
                    }
                });
            }
        });
        let mut m = Matrix::new(
            froms.iter().map(Peer::label).collect(),
            tos.iter().map(|(n, _)| n.clone()).collect(),
            false,
        );
        for (i, r) in results.iter().enumerate() {
            let v = r
                .lock()
                .map_err(|_| anyhow!("probe result poisoned"))?
                .unwrap_or(false);
            m.set_at(i / tos.len(), i % tos.len(), v);
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
        // Build the command line once; each attempt is one exec.
        let template = self.probe_cmd(from, to, port, protocol, timeout)?;
        let program = template.get_program().to_owned();
        let args: Vec<_> = template.get_args().map(|a| a.to_owned()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut log = ProbeLog::default();
                let limit = started + Duration::from_secs(600);
                while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
                    let at = started.elapsed();
                    let out = Command::new(&program)
                        .args(&args)
                        .stdin(Stdio::null())
                        .output();
                    let (ok, detail) = match out {
                        Ok(o) if o.status.success() => (true, "connected".to_string()),
                        Ok(o) => (false, String::from_utf8_lossy(&o.stderr).trim().to_string()),
                        Err(e) => (false, e.to_string()),
                    };
                    log.attempts.push(Attempt { at, ok, detail });
                    let spent = started.elapsed() - at;
                    if spent < interval {
                        std::thread::sleep(interval - spent);
                    }
                }
                log
            })
        };
        Ok(Box::new(KindProber {
            stop,
            started,
            thread: Some(thread),
        }))
    }

    fn arrivals(&mut self, _from: &Peer, _port: u16, _protocol: Protocol) -> Result<Option<u64>> {
        Ok(None)
    }

    fn exec_on_node(&mut self, node: &str, argv: &[&str]) -> Result<String> {
        run_ok(Command::new("docker").args(["exec", node]).args(argv))
    }

    fn kill_agent(&mut self, node: &str) -> Result<()> {
        run_ok(Command::new("docker").args(["exec", node, "pkill", "-KILL", "-x", "palisade"]))
            .map(|_| ())
    }

    fn start_agent(&mut self, node: &str) -> Result<()> {
        // The kubelet restarts the container by itself; wait until a new process runs.
        let found = poll(Duration::from_secs(60), Duration::from_millis(200), || {
            let out = run(Command::new("docker").args(["exec", node, "pgrep", "-x", "palisade"]))?;
            Ok(out.status.success().then_some(()))
        })?;
        found.with_context(|| format!("the kubelet did not restart the agent on {node}"))
    }

    fn wait_agent_ready(&mut self, node: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let pod = self.agent_pod(node)?;
            let ready = self.kubectl_ok(&[
                "get",
                "pod",
                "-n",
                &self.system_ns,
                &pod,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])?;
            if ready.trim() == "True" {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the agent on {node} is not ready after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn isolate_node(&mut self, node: &str, isolated: bool) -> Result<()> {
        if isolated {
            let ip = run_ok(Command::new("docker").args([
                "inspect",
                "-f",
                "{{(index .NetworkSettings.Networks \"kind\").IPAddress}}",
                node,
            ]))?;
            self.detached
                .push((node.to_string(), ip.trim().to_string()));
            run_ok(Command::new("docker").args(["network", "disconnect", "kind", node])).map(|_| ())
        } else {
            let pos = self
                .detached
                .iter()
                .position(|(n, _)| n == node)
                .with_context(|| format!("{node} was not isolated"))?;
            let (_, ip) = self.detached.remove(pos);
            // Back with the same address, so the node's kubelet and the cluster still agree.
            run_ok(Command::new("docker").args(["network", "connect", "--ip", &ip, "kind", node]))
                .map(|_| ())
        }
    }

    fn set_api_outage(&mut self, outage: ApiOutage) -> Result<()> {
        let cp = format!("{}-control-plane", self.cluster);
        match (outage, self.paused) {
            (ApiOutage::Off, true) => {
                run_ok(Command::new("docker").args(["unpause", &cp]))?;
                self.paused = false;
            }
            (ApiOutage::Disconnect | ApiOutage::Unavailable, false) => {
                // The whole control-plane node freezes: connections hang, nothing answers.
                run_ok(Command::new("docker").args(["pause", &cp]))?;
                self.paused = true;
            }
            _ => {}
        }
        Ok(())
    }

    fn supports_api_outage(&self) -> bool {
        true
    }

    fn lan_cidr(&self) -> String {
        self.subnet.clone()
    }

    fn lb_pool_addresses(&self) -> Vec<String> {
        self.pool.clone()
    }

    fn announcer_available(&mut self) -> Result<bool> {
        if let Ok(v) = std::env::var("PALISADE_E2E_ANNOUNCER") {
            return Ok(matches!(v.as_str(), "1" | "true" | "yes"));
        }
        let args = self.kubectl_ok(&[
            "get",
            "daemonset",
            "-n",
            &self.system_ns,
            "-l",
            "app.kubernetes.io/name=palisade",
            "-o",
            "jsonpath={.items[0].spec.template.spec.containers[0].args}",
        ])?;
        Ok(args.contains("--enable-l2=true"))
    }

    fn announcing_node(&mut self, vip: Ipv4Addr) -> Result<Option<String>> {
        let arp =
            run_ok(Command::new("docker").args(["exec", &self.client, "cat", "/proc/net/arp"]))?;
        let mac = arp.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&vip.to_string().as_str())
                && f.get(3).is_some_and(|m| *m != "00:00:00:00:00:00"))
            .then(|| f[3].to_ascii_lowercase())
        });
        let Some(mac) = mac else { return Ok(None) };
        for node in self.nodes.clone() {
            if self.node_mac(&node)? == mac {
                return Ok(Some(node));
            }
        }
        Ok(Some(format!("unknown MAC {mac}")))
    }

    fn diagnostics(&mut self) -> String {
        let mut out = String::new();
        for node in self.nodes.clone() {
            out.push_str(&format!("==== {node} ====\n"));
            if let Ok(pod) = self.agent_pod(&node) {
                match self.kubectl_ok(&["logs", "-n", &self.system_ns, &pod, "--tail=40"]) {
                    Ok(t) => out.push_str(&format!("-- agent log:\n{t}")),
                    Err(e) => out.push_str(&format!("-- agent log: {e:#}\n")),
                }
            }
            match run_ok(Command::new("docker").args(["exec", &node, "iptables-save"])) {
                Ok(t) => {
                    let ours: Vec<&str> = t.lines().filter(|l| l.contains("PAL")).collect();
                    out.push_str(&format!(
                        "-- iptables-save | grep PAL:\n{}\n",
                        ours.join("\n")
                    ));
                }
                Err(e) => out.push_str(&format!("-- iptables-save: {e:#}\n")),
            }
        }
        out
    }
}

impl Drop for KindCluster {
    fn drop(&mut self) {
        if self.paused {
            let _ = self.set_api_outage(ApiOutage::Off);
        }
        for (node, _) in self.detached.clone() {
            let _ = self.isolate_node(&node, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_from_the_kind_network() {
        assert_eq!(
            default_pool("172.18.0.0/16").unwrap(),
            "172.18.255.200-172.18.255.250"
        );
        assert_eq!(
            default_pool("10.89.0.0/24").unwrap(),
            "10.89.0.200-10.89.0.250"
        );
        assert!(default_pool("10.89.0.0/28").is_err());
    }

    #[test]
    fn kubectl_resource_names() {
        assert_eq!(resource_arg("v1", "Pod"), "pods");
        assert_eq!(
            resource_arg("networking.k8s.io/v1", "NetworkPolicy"),
            "networkpolicies.networking.k8s.io"
        );
        assert_eq!(
            resource_arg("palisade.dev/v1alpha1", "IPAddressPool"),
            "ipaddresspools.palisade.dev"
        );
    }

    #[test]
    fn pods_look_like_upstreams() {
        // Pod manifests need no cluster.
        let k = KindCluster {
            cluster: "c".into(),
            context: "kind-c".into(),
            client: "cl".into(),
            system_ns: "palisade-system".into(),
            agnhost: AGNHOST.into(),
            nodes: vec![],
            subnet: String::new(),
            pool: vec![],
            paused: false,
            detached: vec![],
        };
        let p = k.pod_manifest("x", "a", &crate::k8s::labels([("pod", "a")]), "w1");
        assert_eq!(p["spec"]["containers"].as_array().unwrap().len(), 4);
        assert_eq!(
            p["spec"]["containers"][1]["ports"][0]["name"],
            "serve-80-udp"
        );
        assert_eq!(p["spec"]["containers"][1]["command"][2], "--udp");
        assert_eq!(p["spec"]["nodeName"], "w1");
    }
}
