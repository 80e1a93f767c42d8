//! [`KindCluster`]: the [`Cluster`] trait over `kubectl` and `docker` against a kind cluster
//! that `e2e/kind/run.sh up` prepared (flannel in host-gw mode, Palisade installed with its
//! chart, a client container on the kind docker network). Selected with
//! `PALISADE_E2E_BACKEND=kind`; cannot run where there is no Docker (the lab is the default
//! backend there).
//!
//! ```text
//!   scenario ── apply/get/delete/label ─► kubectl --context kind-<cluster>
//!            ── probe from a pod ───────► kubectl exec <pod> -c cont-80-tcp -- /agnhost connect IP:PORT
//!            ── probe from the client ──► docker exec <client> /agnhost connect IP:PORT
//!            ── kill an agent ──────────► docker exec <node> kill -KILL <pgrep -x palisade>
//!                                         (the kubelet restarts the container by itself)
//!            ── API outage ─────────────► iptables in every node: packets of connections to the
//!                                         `kubernetes` Service (what in-cluster clients such as the
//!                                         agents dial) dropped or reset; kubelet, kubectl exec and
//!                                         the harness keep their direct path to the API server
//!            ── node failure ───────────► docker pause/unpause <node>
//!            ── who announces a VIP ────► `ip neigh show <vip>` in the client, MAC → node container
//! ```
//!
//! Every probe's verdict comes from agnhost's own report (`TIMEOUT`, `REFUSED`, `OTHER: ...` on
//! stderr): a probe that failed for another reason (kubectl or docker could not exec) is retried
//! and, if it keeps failing, reported as an error, never counted as "blocked".
//!
//! Environment: `PALISADE_E2E_KIND_CLUSTER` (default `palisade-e2e`), `PALISADE_E2E_KIND_CLIENT`
//! (default `<cluster>-client`), `PALISADE_E2E_KIND_NETWORK` (default
//! `$KIND_EXPERIMENTAL_DOCKER_NETWORK` or `kind`), `PALISADE_E2E_LB_RANGE` (default: `.200-.250`
//! of the last /24 of the network's IPv4 subnet), `PALISADE_E2E_NAMESPACE` (Palisade's, default
//! `palisade-system`), `AGNHOST_IMAGE`.
//!
//! Differences from the lab: no destination-side packet counts ([`Cluster::arrivals`] is
//! `None`; probers' own successes are the evidence), probes cost a `kubectl exec` each (about
//! 0.1–0.3 s), the kubelet restarts a killed agent by itself (so [`Cluster::start_agent`] waits
//! for the new process), an API outage cannot answer 503 (`Unavailable` resets the agents'
//! connections instead of dropping them), and a node failure freezes the whole node.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::api::Kind;
use crate::cluster::{poll, ApiOutage, Attempt, Cluster, Peer, ProbeLog, Prober};
use crate::k8s::Labels;
use crate::matrix::Matrix;
use crate::server::Protocol;

/// The image the upstream network-policy e2e tests use for their pods.
pub const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.53";
/// How many probes run at once.
const PARALLEL_PROBES: usize = 12;
/// How often a probe that could not run (exec failed, not the connection) is tried in all.
const PROBE_TRIES: usize = 3;
/// What a probe may cost on top of its own timeout (the exec itself) before it is killed.
const PROBE_OVERHEAD: Duration = Duration::from_secs(20);
/// The comment on the iptables rules of a simulated API outage (no spaces: `iptables -S`
/// prints it unquoted, so leftovers can be deleted from that output).
const OUTAGE_COMMENT: &str = "palisade-e2e-api-outage";
/// The container of the agent pods (charts/palisade/templates/daemonset.yaml).
const AGENT_CONTAINER: &str = "agent";
/// The scenario pods' container that probes are sent from.
const PROBE_CONTAINER: &str = "cont-80-tcp";
/// How long a scenario pod keeps serving after its deletion began (its endpoint is withdrawn
/// at once; kube-proxy needs up to its min sync period, 1 s, to stop sending to it).
const PRE_STOP_SECONDS: u64 = 5;

/// A kind node container as `docker inspect` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NodeContainer {
    name: String,
    ip: Option<Ipv4Addr>,
    /// Lower case, `02:42:ac:12:00:03`.
    mac: String,
    paused: bool,
}

/// What [`Cluster::kill_agent`] killed, so the restart can be told apart from it.
#[derive(Clone, Debug, Default)]
struct Killed {
    pids: Vec<u32>,
    /// `containerd://...` of the agent container that was killed, when the API said.
    container_id: Option<String>,
}

/// One iptables rule of a simulated API outage, as inserted (for deleting it again).
#[derive(Clone, Debug, PartialEq, Eq)]
struct OutageRule {
    node: String,
    chain: &'static str,
    spec: Vec<String>,
}

/// A kind cluster with Palisade installed (see `e2e/kind/run.sh`).
pub struct KindCluster {
    cluster: String,
    context: String,
    network: String,
    client: String,
    system_ns: String,
    agnhost: String,
    /// The workers, sorted: where scenario pods go ([`Cluster::node_names`]).
    nodes: Vec<String>,
    /// Every node container (the control plane too), for MAC lookups and cluster-wide actions.
    containers: Vec<NodeContainer>,
    subnet: String,
    pool: Vec<String>,
    outage: Vec<OutageRule>,
    outage_mode: ApiOutage,
    /// Nodes frozen by [`Cluster::isolate_node`].
    paused: Vec<String>,
    killed: BTreeMap<String, Killed>,
}

// ---- processes -----------------------------------------------------------------------------

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

/// Runs a command whose output is small (a probe), killing it after `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(child.wait_with_output()?)
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

fn docker() -> Command {
    Command::new("docker")
}

fn command(argv: &[String]) -> Command {
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    c
}

// ---- pure helpers (unit-tested against output in the tools' formats) ------------------------

/// The resource argument kubectl takes for a kind (`pods`, `networkpolicies.networking.k8s.io`).
fn resource_arg(api_version: &str, kind: &str) -> String {
    let k = Kind::of(api_version, kind);
    match api_version.split_once('/') {
        Some((group, _)) => format!("{}.{group}", k.plural),
        None => k.plural,
    }
}

/// `a.b.c.d/n`, IPv4 only.
fn parse_v4_cidr(s: &str) -> Option<(Ipv4Addr, u32)> {
    let (net, len) = s.split_once('/')?;
    let net: Ipv4Addr = net.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    (len <= 32).then_some((net, len))
}

/// `a.b.c.d/n` → the default pool: `.200-.250` of the subnet's last /24.
pub fn default_pool(subnet: &str) -> Result<String> {
    let (net, len) =
        parse_v4_cidr(subnet).with_context(|| format!("{subnet} is not an IPv4 CIDR"))?;
    ensure!(len <= 24, "the kind network {subnet} is smaller than a /24");
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

/// The IPv4 subnet of a docker network, from `docker network inspect <net>` (the kind network
/// also has an IPv6 subnet, listed in either order).
fn network_v4_subnet(inspect: &str) -> Result<String> {
    let v: Value = serde_json::from_str(inspect).context("docker network inspect output")?;
    let configs = v[0]["IPAM"]["Config"]
        .as_array()
        .context("docker network inspect: no IPAM.Config")?;
    configs
        .iter()
        .filter_map(|c| c["Subnet"].as_str())
        .find(|s| parse_v4_cidr(s).is_some())
        .map(str::to_string)
        .context("the docker network has no IPv4 subnet")
}

/// Node containers from `docker inspect <node>...`, with their address and MAC on `network`.
fn node_containers(inspect: &str, network: &str) -> Result<Vec<NodeContainer>> {
    let v: Value = serde_json::from_str(inspect).context("docker inspect output")?;
    let items = v.as_array().context("docker inspect: not a list")?;
    items
        .iter()
        .map(|c| {
            let name = c["Name"]
                .as_str()
                .context("docker inspect: no Name")?
                .trim_start_matches('/')
                .to_string();
            let net = &c["NetworkSettings"]["Networks"][network];
            let mac = net["MacAddress"]
                .as_str()
                .unwrap_or_default()
                .to_ascii_lowercase();
            let ip = net["IPAddress"].as_str().and_then(|s| s.parse().ok());
            let paused = c["State"]["Paused"].as_bool().unwrap_or(false);
            Ok(NodeContainer {
                name,
                ip,
                mac,
                paused,
            })
        })
        .collect()
}

/// `(workers sorted, every node sorted)` from `kubectl get nodes -o json`.
fn split_nodes(list: &Value) -> (Vec<String>, Vec<String>) {
    let mut workers = Vec::new();
    let mut all = Vec::new();
    for n in list["items"].as_array().into_iter().flatten() {
        let Some(name) = n["metadata"]["name"].as_str() else {
            continue;
        };
        all.push(name.to_string());
        let labels = &n["metadata"]["labels"];
        if labels
            .get("node-role.kubernetes.io/control-plane")
            .is_none()
        {
            workers.push(name.to_string());
        }
    }
    workers.sort();
    all.sort();
    (workers, all)
}

/// The MAC a valid neighbour entry gives `vip`, from `ip neigh show <vip>`. Entries without a
/// link-layer address (INCOMPLETE, FAILED) do not count; STALE ones do (they are what the
/// client would still use).
fn neighbour_mac(ip_neigh: &str, vip: Ipv4Addr) -> Option<String> {
    let vip = vip.to_string();
    ip_neigh.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.first() != Some(&vip.as_str()) {
            return None;
        }
        let state = *f.last()?;
        if matches!(state, "FAILED" | "INCOMPLETE") {
            return None;
        }
        let i = f.iter().position(|w| *w == "lladdr")?;
        f.get(i + 1).map(|m| m.to_ascii_lowercase())
    })
}

/// The same from `/proc/net/arp` (for a client image without `ip`): only completed entries
/// (flag `ATF_COM`, 0x2) count; failed ones keep their old MAC there.
fn arp_table_mac(proc_net_arp: &str, vip: Ipv4Addr) -> Option<String> {
    let vip = vip.to_string();
    proc_net_arp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let flags = u32::from_str_radix(f.get(2)?.trim_start_matches("0x"), 16).ok()?;
        (f.first() == Some(&vip.as_str()) && flags & 0x2 != 0).then(|| f[3].to_ascii_lowercase())
    })
}

/// What a probe found out.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ProbeOutcome {
    Reachable,
    /// agnhost reported a network verdict (its stderr line).
    Blocked(String),
    /// The probe did not run (exec failed, unexpected output): no verdict.
    Error(String),
}

/// Classifies a finished `agnhost connect` run (through `kubectl exec` or `docker exec`).
/// agnhost exits 0 when it connected and prints `TIMEOUT`, `REFUSED` or `OTHER: ...` (UDP
/// socket errors: `UNKNOWN: read udp ...`) when the network said no; anything else (kubectl's
/// `error: ...`, docker's `Error response from daemon`, agnhost's own `UNKNOWN`/`DNS` argument
/// errors) is not a verdict.
fn classify_probe(success: bool, stdout: &str, stderr: &str) -> ProbeOutcome {
    if success {
        return ProbeOutcome::Reachable;
    }
    let verdict = stderr
        .lines()
        .chain(stdout.lines())
        .map(str::trim)
        .find(|l| {
            l.starts_with("TIMEOUT")
                || l.starts_with("REFUSED")
                || l.starts_with("OTHER:")
                || l.starts_with("UNKNOWN: read udp")
                || l.starts_with("UNKNOWN: write udp")
        });
    match verdict {
        Some(l) => ProbeOutcome::Blocked(l.to_string()),
        None => {
            let all = format!("{} {}", stderr.trim(), stdout.trim());
            ProbeOutcome::Error(all.trim().to_string())
        }
    }
}

/// The agent pod of a node from `kubectl get pods -o json` (filtered by node): the newest one
/// not being deleted.
fn pick_agent_pod(list: &Value) -> Option<&Value> {
    list["items"]
        .as_array()?
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .max_by(|a, b| {
            let t = |p: &Value| {
                p["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            };
            t(a).cmp(&t(b))
        })
}

fn agent_status(pod: &Value) -> Option<&Value> {
    pod["status"]["containerStatuses"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == AGENT_CONTAINER)
}

/// `containerd://...` of the pod's agent container.
fn agent_container_id(pod: &Value) -> Option<String> {
    agent_status(pod)?["containerID"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Whether the agent pod is Ready with a running agent container that is not `killed` (a
/// killed container's pod can still say Ready until the kubelet has noticed).
fn agent_ready(pod: &Value, killed: Option<&str>) -> bool {
    let pod_ready = pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    let Some(c) = agent_status(pod) else {
        return false;
    };
    let running = c["state"]["running"].is_object();
    let id = c["containerID"].as_str().unwrap_or_default();
    let fresh = killed.is_none_or(|k| !id.is_empty() && id != k);
    pod_ready && running && c["ready"] == true && fresh
}

/// Whether the agents announce at layer 2: `--enable-l2=true` in the agent container's args of
/// the DaemonSet (`kubectl get daemonsets -o json`).
fn l2_enabled(list: &Value) -> bool {
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|ds| {
            ds["spec"]["template"]["spec"]["containers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter(|c| c["name"] == AGENT_CONTAINER)
        .flat_map(|c| c["args"].as_array().cloned().unwrap_or_default())
        .any(|a| a == "--enable-l2=true")
}

/// PIDs printed by `pgrep`, one a line.
fn parse_pids(text: &str) -> Vec<u32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// `(cluster IP, port)` of the `kubernetes` Service (`kubectl get service kubernetes -o json`).
fn api_service(svc: &Value) -> Result<(Ipv4Addr, u16)> {
    let ip = svc["spec"]["clusterIP"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .context("the kubernetes Service has no IPv4 cluster IP")?;
    let port = svc["spec"]["ports"][0]["port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .context("the kubernetes Service has no port")?;
    Ok((ip, port))
}

/// The iptables rules (chain, spec after the chain) of an API outage: packets of connections
/// whose original destination is the `kubernetes` Service are dropped both ways
/// (`Disconnect`: connections hang), or the node's own packets are answered with a TCP reset
/// (`Unavailable`: every attempt fails at once). Only host-network processes that dial the
/// Service (the agents, flannel) are affected: the kubelet and kube-proxy dial the API
/// server's address directly, so `kubectl exec` keeps working.
fn outage_rules(mode: ApiOutage, ip: Ipv4Addr, port: u16) -> Vec<(&'static str, Vec<String>)> {
    let base = |action: &[&str]| {
        let mut spec: Vec<String> = [
            "-p",
            "tcp",
            "-m",
            "conntrack",
            "--ctorigdst",
            &ip.to_string(),
            "--ctorigdstport",
            &port.to_string(),
            "-m",
            "comment",
            "--comment",
            OUTAGE_COMMENT,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        spec.extend(action.iter().map(|s| s.to_string()));
        spec
    };
    match mode {
        ApiOutage::Off => Vec::new(),
        ApiOutage::Disconnect => vec![
            ("OUTPUT", base(&["-j", "DROP"])),
            ("INPUT", base(&["-j", "DROP"])),
        ],
        ApiOutage::Unavailable => vec![
            (
                "OUTPUT",
                base(&["-j", "REJECT", "--reject-with", "tcp-reset"]),
            ),
            ("INPUT", base(&["-j", "DROP"])),
        ],
    }
}

/// `iptables -D` argument lists for outage rules left in `iptables -S` output (by a run that
/// was killed before it could clean up).
fn leftover_outage_rules(iptables_s: &str) -> Vec<Vec<String>> {
    iptables_s
        .lines()
        .filter(|l| l.starts_with("-A ") && l.contains(OUTAGE_COMMENT))
        .map(|l| {
            let mut args: Vec<String> = l.split_whitespace().map(str::to_string).collect();
            args[0] = "-D".into();
            args
        })
        .collect()
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

fn connect_args(to: Ipv4Addr, port: u16, protocol: Protocol, timeout: Duration) -> Vec<String> {
    vec![
        "/agnhost".into(),
        "connect".into(),
        format!("{to}:{port}"),
        format!("--timeout={}ms", timeout.as_millis().max(100)),
        format!("--protocol={}", protocol.lower()),
    ]
}

/// Runs a probe; an exec that produced no verdict is tried again (at most [`PROBE_TRIES`]).
fn probe(argv: &[String], timeout: Duration) -> ProbeOutcome {
    let mut last = ProbeOutcome::Error("not run".into());
    for _ in 0..PROBE_TRIES {
        last = match run_bounded(&mut command(argv), timeout + PROBE_OVERHEAD) {
            Ok(o) => classify_probe(
                o.status.success(),
                &String::from_utf8_lossy(&o.stdout),
                &String::from_utf8_lossy(&o.stderr),
            ),
            Err(e) => ProbeOutcome::Error(format!("{e:#}")),
        };
        if !matches!(last, ProbeOutcome::Error(_)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    last
}

fn split_id(id: &str) -> Result<(&str, &str)> {
    id.split_once('/')
        .with_context(|| format!("{id} is not ns/name"))
}

// ---- the cluster ---------------------------------------------------------------------------

impl KindCluster {
    /// Connects to the kind cluster named by the environment (see the module docs).
    pub fn from_env() -> Result<KindCluster> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cluster = env("PALISADE_E2E_KIND_CLUSTER").unwrap_or_else(|| "palisade-e2e".into());
        let client = env("PALISADE_E2E_KIND_CLIENT").unwrap_or_else(|| format!("{cluster}-client"));
        let network = env("PALISADE_E2E_KIND_NETWORK")
            .or_else(|| env("KIND_EXPERIMENTAL_DOCKER_NETWORK"))
            .unwrap_or_else(|| "kind".into());
        let system_ns = env("PALISADE_E2E_NAMESPACE").unwrap_or_else(|| "palisade-system".into());
        let agnhost = env("AGNHOST_IMAGE").unwrap_or_else(|| AGNHOST.into());
        let mut me = KindCluster {
            context: format!("kind-{cluster}"),
            cluster,
            network,
            client,
            system_ns,
            agnhost,
            nodes: Vec::new(),
            containers: Vec::new(),
            subnet: String::new(),
            pool: Vec::new(),
            outage: Vec::new(),
            outage_mode: ApiOutage::Off,
            paused: Vec::new(),
            killed: BTreeMap::new(),
        };
        let list = me.kubectl_json(&["get", "nodes"])?;
        let (workers, all) = split_nodes(&list);
        ensure!(
            workers.len() >= 2,
            "the kind cluster {} needs 2 workers, has {workers:?}",
            me.cluster
        );
        me.nodes = workers;
        me.containers = me.inspect_nodes(&all)?;
        let inspect = run_ok(docker().args(["network", "inspect", &me.network]))?;
        me.subnet = network_v4_subnet(&inspect)
            .with_context(|| format!("the docker network {}", me.network))?;
        me.pool = vec![match env("PALISADE_E2E_LB_RANGE") {
            Some(r) => r,
            None => default_pool(&me.subnet)?,
        }];
        let running = run_ok(docker().args(["inspect", "-f", "{{.State.Running}}", &me.client]))
            .with_context(|| {
                format!(
                    "the client container {} (start it with e2e/kind/run.sh up)",
                    me.client
                )
            })?;
        ensure!(
            running.trim() == "true",
            "the client container {} is not running",
            me.client
        );
        Ok(me)
    }

    /// Removes what scenarios create (their namespaces, the pool and advertisement `lan`),
    /// waits until it is gone, and undoes what a killed earlier run may have left (frozen
    /// nodes, API-outage rules), so scenarios can share the cluster one after the other.
    pub fn reset(&mut self) -> Result<()> {
        for c in self.containers.clone() {
            if c.paused {
                run_ok(docker().args(["unpause", &c.name]))?;
                println!(
                    "  reset: unpaused {} (left paused by an earlier run)",
                    c.name
                );
            }
            for chain in ["INPUT", "OUTPUT"] {
                let rules =
                    run_ok(docker().args(["exec", &c.name, "iptables", "-w", "5", "-S", chain]))?;
                for args in leftover_outage_rules(&rules) {
                    run_ok(
                        docker()
                            .args(["exec", &c.name, "iptables", "-w", "5"])
                            .args(&args),
                    )?;
                }
            }
        }
        let all: Vec<String> = self.containers.iter().map(|c| c.name.clone()).collect();
        self.containers = self.inspect_nodes(&all)?;
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

    fn kubectl_json(&self, args: &[&str]) -> Result<Value> {
        let out = run_ok(self.kubectl().args(args).args(["-o", "json"]))?;
        serde_json::from_str(&out).with_context(|| format!("kubectl {} -o json", args.join(" ")))
    }

    fn inspect_nodes(&self, names: &[String]) -> Result<Vec<NodeContainer>> {
        let out = run_ok(docker().arg("inspect").args(names))?;
        let containers = node_containers(&out, &self.network)?;
        for c in &containers {
            ensure!(
                !c.mac.is_empty(),
                "{} has no MAC on the docker network {}",
                c.name,
                self.network
            );
        }
        Ok(containers)
    }

    /// The node's agent pod (the newest one not being deleted).
    fn agent_pod(&self, node: &str) -> Result<Value> {
        let field = format!("spec.nodeName={node}");
        let list = self.kubectl_json(&[
            "get",
            "pods",
            "-n",
            &self.system_ns,
            "-l",
            "app.kubernetes.io/name=palisade,app.kubernetes.io/component=agent",
            "--field-selector",
            &field,
        ])?;
        pick_agent_pod(&list)
            .cloned()
            .with_context(|| format!("no Palisade agent pod on {node}"))
    }

    /// The command line (program first) that probes `to:port` from `from`.
    fn probe_argv(
        &self,
        from: &Peer,
        to: Ipv4Addr,
        port: u16,
        protocol: Protocol,
        timeout: Duration,
    ) -> Result<Vec<String>> {
        let connect = connect_args(to, port, protocol, timeout);
        let mut argv: Vec<String> = match from {
            Peer::Client => vec!["docker".into(), "exec".into(), self.client.clone()],
            Peer::Pod(id) => {
                let (ns, name) = split_id(id)?;
                [
                    "kubectl",
                    "--context",
                    &self.context,
                    "exec",
                    "-n",
                    ns,
                    name,
                    "-c",
                    PROBE_CONTAINER,
                    "--",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            }
        };
        argv.extend(connect);
        Ok(argv)
    }

    fn node_for_mac(&self, mac: &str) -> Option<String> {
        self.containers
            .iter()
            .find(|c| c.mac == mac)
            .map(|c| c.name.clone())
    }

    fn agent_pids(&self, node: &str) -> Result<Vec<u32>> {
        let out = run(docker().args(["exec", node, "pgrep", "-x", "palisade"]))?;
        // pgrep: 0 = found, 1 = none; anything else is an error (e.g. the node is paused).
        match out.status.code() {
            Some(0) | Some(1) => Ok(parse_pids(&String::from_utf8_lossy(&out.stdout))),
            _ => bail!(
                "pgrep on {node} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }
    }

    /// Replaces the outage rules in every node with those of `mode`. Every rule inserted is
    /// recorded at once, so a failure half-way leaves nothing that `Off` (or Drop) would miss.
    fn set_outage_rules(&mut self, mode: ApiOutage) -> Result<()> {
        let old = std::mem::take(&mut self.outage);
        self.outage_mode = mode;
        let inserted = self.insert_outage_rules(mode);
        for r in old {
            let deleted = run_ok(
                docker()
                    .args(["exec", &r.node, "iptables", "-w", "5", "-D", r.chain])
                    .args(&r.spec),
            );
            if let Err(e) = deleted {
                self.outage.push(r);
                return Err(e.context("removing an API-outage rule"));
            }
        }
        inserted
    }

    fn insert_outage_rules(&mut self, mode: ApiOutage) -> Result<()> {
        if mode == ApiOutage::Off {
            return Ok(());
        }
        let svc = self.kubectl_json(&["get", "service", "kubernetes", "-n", "default"])?;
        let (ip, port) = api_service(&svc)?;
        for node in self
            .containers
            .iter()
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
        {
            for (chain, spec) in outage_rules(mode, ip, port) {
                run_ok(
                    docker()
                        .args(["exec", &node, "iptables", "-w", "5", "-I", chain, "1"])
                        .args(&spec),
                )?;
                self.outage.push(OutageRule {
                    node: node.clone(),
                    chain,
                    spec,
                });
            }
        }
        // The rules must really cut the agents' path: from a worker, the Service must time out
        // (Disconnect) or refuse/reset (Unavailable); any HTTP answer means they do not.
        let url = format!("https://{ip}:{port}/healthz");
        let out = run_bounded(
            docker().args([
                "exec",
                &self.nodes[0],
                "curl",
                "-sk",
                "--max-time",
                "2",
                &url,
            ]),
            Duration::from_secs(20),
        )?;
        // curl: 7 could not connect, 28 timed out, 35/52/56 reset during TLS/the request.
        ensure!(
            matches!(out.status.code(), Some(7 | 28 | 35 | 52 | 56)),
            "API outage ({mode:?}) not effective: curl {url} from {} ended with {} ({})",
            self.nodes[0],
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
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
                });
                if port == 80 && protocol == Protocol::Tcp {
                    c["readinessProbe"] =
                        json!({ "tcpSocket": { "port": 80 }, "periodSeconds": 1 });
                }
                // Keep serving while the endpoint is withdrawn (graceful deletion). An exec
                // hook (agnhost is Alpine: busybox sleep) works on every Kubernetes version,
                // unlike the `sleep` action (1.30+).
                c["lifecycle"] = json!({ "preStop": { "exec": {
                    "command": ["sleep", PRE_STOP_SECONDS.to_string()],
                } } });
                containers.push(c);
            }
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name, "namespace": ns, "labels": labels },
            "spec": {
                "nodeName": node,
                "terminationGracePeriodSeconds": PRE_STOP_SECONDS + 5,
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
            let (ns, name) = split_id(id)?;
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
        let (ns, name) = split_id(id)?;
        // The endpoint is withdrawn at once; the preStop hook keeps the pod serving a while.
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
        let (ns, name) = split_id(id)?;
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
        let timeout = Duration::from_secs(1);
        let mut argvs = Vec::new();
        for from in froms {
            for (_, ip) in tos {
                argvs.push(self.probe_argv(from, *ip, port, protocol, timeout)?);
            }
        }
        let results: Vec<Mutex<Option<ProbeOutcome>>> =
            (0..argvs.len()).map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..PARALLEL_PROBES.min(argvs.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(argv) = argvs.get(i) else { return };
                    let outcome = probe(argv, timeout);
                    if let Ok(mut r) = results[i].lock() {
                        *r = Some(outcome);
                    }
                });
            }
        });
        let mut m = Matrix::new(
            froms.iter().map(Peer::label).collect(),
            tos.iter().map(|(n, _)| n.clone()).collect(),
            false,
        );
        let mut errors = Vec::new();
        for (i, r) in results.iter().enumerate() {
            let (row, col) = (i / tos.len(), i % tos.len());
            let outcome = r
                .lock()
                .map_err(|_| anyhow!("probe result poisoned"))?
                .clone()
                .unwrap_or(ProbeOutcome::Error("not run".into()));
            match outcome {
                ProbeOutcome::Reachable => m.set_at(row, col, true),
                ProbeOutcome::Blocked(_) => m.set_at(row, col, false),
                ProbeOutcome::Error(e) => errors.push(format!(
                    "{} -> {} {protocol}/{port}: {e}",
                    froms[row].label(),
                    tos[col].0
                )),
            }
        }
        if !errors.is_empty() {
            bail!(
                "{} of {} probes could not run ({PROBE_TRIES} tries each); first: {:?}",
                errors.len(),
                argvs.len(),
                &errors[..errors.len().min(3)]
            );
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
        let argv = self.probe_argv(from, to, port, protocol, timeout)?;
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut log = ProbeLog::default();
                let limit = started + Duration::from_secs(600);
                while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
                    let at = started.elapsed();
                    let (ok, detail) = match probe(&argv, timeout) {
                        ProbeOutcome::Reachable => (true, "connected".to_string()),
                        ProbeOutcome::Blocked(v) => (false, v),
                        ProbeOutcome::Error(e) => (false, format!("probe did not run: {e}")),
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
        // Nothing counts packets at the agnhost servers: the probers' own results are the
        // evidence on this backend (see the trait).
        Ok(None)
    }

    fn exec_on_node(&mut self, node: &str, argv: &[&str]) -> Result<String> {
        run_ok(docker().args(["exec", node]).args(argv))
    }

    fn kill_agent(&mut self, node: &str) -> Result<()> {
        // Which container is killed, so that wait_agent_ready can insist on its successor.
        let container_id = self
            .agent_pod(node)
            .ok()
            .and_then(|p| agent_container_id(&p));
        let pids = self.agent_pids(node)?;
        ensure!(!pids.is_empty(), "no palisade process runs on {node}");
        let pid_args: Vec<String> = pids.iter().map(u32::to_string).collect();
        run_ok(
            docker()
                .args(["exec", node, "kill", "-KILL"])
                .args(&pid_args),
        )?;
        self.killed
            .insert(node.to_string(), Killed { pids, container_id });
        Ok(())
    }

    fn start_agent(&mut self, node: &str) -> Result<()> {
        // The kubelet restarts the container by itself (also without the API server); wait
        // until a palisade process runs that is not one of those killed (a killed one can
        // linger for a moment, also as a zombie).
        let old = self
            .killed
            .get(node)
            .map(|k| k.pids.clone())
            .unwrap_or_default();
        let found = poll(Duration::from_secs(60), Duration::from_millis(200), || {
            let pids = self.agent_pids(node)?;
            Ok(pids.iter().any(|p| !old.contains(p)).then_some(()))
        })?;
        found.with_context(|| format!("the kubelet did not restart the agent on {node} within 60s"))
    }

    fn wait_agent_ready(&mut self, node: &str, timeout: Duration) -> Result<()> {
        let killed = self.killed.get(node).and_then(|k| k.container_id.clone());
        let mut last = String::new();
        let ready = poll(timeout, Duration::from_millis(250), || {
            match self.agent_pod(node) {
                Ok(pod) => {
                    last = format!("{}", pod["status"]);
                    Ok(agent_ready(&pod, killed.as_deref()).then_some(()))
                }
                Err(e) => {
                    // The API itself may be coming back: keep trying until the deadline.
                    last = format!("{e:#}");
                    Ok(None)
                }
            }
        })?;
        ensure!(
            ready.is_some(),
            "the agent on {node} is not ready after {timeout:?} (last: {last})"
        );
        self.killed.remove(node);
        Ok(())
    }

    fn isolate_node(&mut self, node: &str, isolated: bool) -> Result<()> {
        // The whole node freezes: it answers nothing on the network (not even ARP), as a node
        // that died. `docker network disconnect` is no option: kind's network has no
        // user-configured IPv4 subnet, so docker cannot plug the node back in with its address.
        if isolated {
            ensure!(
                !self.paused.iter().any(|n| n == node),
                "{node} is isolated already"
            );
            run_ok(docker().args(["pause", node]))?;
            self.paused.push(node.to_string());
        } else {
            let pos = self
                .paused
                .iter()
                .position(|n| n == node)
                .with_context(|| format!("{node} was not isolated"))?;
            run_ok(docker().args(["unpause", node]))?;
            self.paused.remove(pos);
        }
        Ok(())
    }

    fn set_api_outage(&mut self, outage: ApiOutage) -> Result<()> {
        // `Off` always runs: it also removes what a failed change left behind.
        if outage == self.outage_mode && outage != ApiOutage::Off {
            return Ok(());
        }
        self.set_outage_rules(outage)
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
        let list = self.kubectl_json(&[
            "get",
            "daemonsets",
            "-n",
            &self.system_ns,
            "-l",
            "app.kubernetes.io/name=palisade",
        ])?;
        Ok(l2_enabled(&list))
    }

    fn announcing_node(&mut self, vip: Ipv4Addr) -> Result<Option<String>> {
        let vip_s = vip.to_string();
        let neigh = run(docker().args(["exec", &self.client, "ip", "neigh", "show", &vip_s]))?;
        let mac = if neigh.status.success() {
            neighbour_mac(&String::from_utf8_lossy(&neigh.stdout), vip)
        } else {
            let arp = run_ok(docker().args(["exec", &self.client, "cat", "/proc/net/arp"]))?;
            arp_table_mac(&arp, vip)
        };
        let Some(mac) = mac else { return Ok(None) };
        if let Some(node) = self.node_for_mac(&mac) {
            return Ok(Some(node));
        }
        // A node's MAC may have changed (a node container restarted): look again.
        let all: Vec<String> = self.containers.iter().map(|c| c.name.clone()).collect();
        self.containers = self.inspect_nodes(&all)?;
        Ok(Some(
            self.node_for_mac(&mac)
                .unwrap_or_else(|| format!("unknown MAC {mac}")),
        ))
    }

    fn diagnostics(&mut self) -> String {
        let mut out = String::new();
        if let Ok(t) = self.kubectl_ok(&["get", "pods", "-A", "-o", "wide"]) {
            out.push_str(&format!("==== kubectl get pods -A\n{t}"));
        }
        for node in self.nodes.clone() {
            out.push_str(&format!("==== {node} ====\n"));
            if let Ok(pod) = self.agent_pod(&node) {
                let name = pod["metadata"]["name"].as_str().unwrap_or_default();
                match self.kubectl_ok(&["logs", "-n", &self.system_ns, name, "--tail=40"]) {
                    Ok(t) => out.push_str(&format!("-- agent log:\n{t}")),
                    Err(e) => out.push_str(&format!("-- agent log: {e:#}\n")),
                }
            }
            match run_ok(docker().args(["exec", &node, "iptables-save"])) {
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
        match run_ok(docker().args(["exec", &self.client, "ip", "neigh", "show"])) {
            Ok(t) => out.push_str(&format!("==== client neighbours\n{t}")),
            Err(e) => out.push_str(&format!("==== client neighbours: {e:#}\n")),
        }
        out
    }
}

impl Drop for KindCluster {
    fn drop(&mut self) {
        if !self.outage.is_empty() {
            if let Err(e) = self.set_outage_rules(ApiOutage::Off) {
                eprintln!("kind: could not end the API outage: {e:#}");
            }
        }
        for node in self.paused.clone() {
            if let Err(e) = self.isolate_node(&node, false) {
                eprintln!("kind: could not unpause {node}: {e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> KindCluster {
        KindCluster {
            cluster: "c".into(),
            context: "kind-c".into(),
            network: "kind".into(),
            client: "c-client".into(),
            system_ns: "palisade-system".into(),
            agnhost: AGNHOST.into(),
            nodes: vec!["c-worker".into(), "c-worker2".into()],
            containers: vec![],
            subnet: String::new(),
            pool: vec![],
            outage: vec![],
            outage_mode: ApiOutage::Off,
            paused: vec![],
            killed: BTreeMap::new(),
        }
    }

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
        assert!(default_pool("fc00:f853:ccd:e793::/64").is_err());
    }

    /// `docker network inspect kind` as Docker prints it for a kind network: the IPv6 subnet kind
    /// asks for comes first, the IPv4 one docker picked second.
    const NETWORK_INSPECT: &str = r#"[
    {
        "Name": "kind",
        "Id": "8d3c2f4b0f1e6a4d9c0b7a5e3f2d1c0b9a8e7f6d5c4b3a2f1e0d9c8b7a6f5e4d",
        "Created": "2024-11-04T09:12:31.271183511Z",
        "Scope": "local",
        "Driver": "bridge",
        "EnableIPv6": true,
        "IPAM": {
            "Driver": "default",
            "Options": {},
            "Config": [
                {
                    "Subnet": "fc00:f853:ccd:e793::/64"
                },
                {
                    "Subnet": "172.18.0.0/16",
                    "Gateway": "172.18.0.1"
                }
            ]
        },
        "Internal": false,
        "Attachable": false,
        "Ingress": false,
        "ConfigFrom": {
            "Network": ""
        },
        "ConfigOnly": false,
        "Containers": {},
        "Options": {
            "com.docker.network.bridge.enable_ip_masquerade": "true",
            "com.docker.network.driver.mtu": "1500"
        },
        "Labels": {}
    }
]"#;

    #[test]
    fn ipv4_subnet_of_the_kind_network() {
        assert_eq!(network_v4_subnet(NETWORK_INSPECT).unwrap(), "172.18.0.0/16");
        let v6_only = NETWORK_INSPECT.replace(
            r#"{
                    "Subnet": "172.18.0.0/16",
                    "Gateway": "172.18.0.1"
                }"#,
            r#"{ "Subnet": "fc00:f853:ccd:e794::/64" }"#,
        );
        assert!(network_v4_subnet(&v6_only).is_err());
    }

    /// `docker inspect palisade-e2e-control-plane palisade-e2e-worker` in Docker's format, the
    /// worker trimmed to what is read (and paused, as isolate_node leaves it; the control
    /// plane's MAC in upper case to check the normalisation).
    const NODES_INSPECT: &str = r#"[
    {
        "Id": "5b1f7c9a2e4d",
        "Name": "/palisade-e2e-control-plane",
        "State": { "Status": "running", "Running": true, "Paused": false, "Pid": 41234 },
        "Config": { "Hostname": "palisade-e2e-control-plane",
                    "Labels": { "io.x-k8s.kind.cluster": "palisade-e2e", "io.x-k8s.kind.role": "control-plane" } },
        "NetworkSettings": {
            "Networks": {
                "kind": {
                    "IPAMConfig": null,
                    "Links": null,
                    "Aliases": null,
                    "MacAddress": "02:42:AC:12:00:02",
                    "NetworkID": "8d3c2f4b0f1e",
                    "EndpointID": "0e4f0a",
                    "Gateway": "172.18.0.1",
                    "IPAddress": "172.18.0.2",
                    "IPPrefixLen": 16,
                    "IPv6Gateway": "fc00:f853:ccd:e793::1",
                    "GlobalIPv6Address": "fc00:f853:ccd:e793::2",
                    "GlobalIPv6PrefixLen": 64,
                    "DriverOpts": null,
                    "DNSNames": ["palisade-e2e-control-plane", "5b1f7c9a2e4d"]
                }
            }
        }
    },
    {
        "Id": "9e2a6b3c1d0f",
        "Name": "/palisade-e2e-worker",
        "State": { "Status": "paused", "Running": true, "Paused": true, "Pid": 41377 },
        "Config": { "Hostname": "palisade-e2e-worker",
                    "Labels": { "io.x-k8s.kind.cluster": "palisade-e2e", "io.x-k8s.kind.role": "worker" } },
        "NetworkSettings": {
            "Networks": {
                "kind": {
                    "MacAddress": "02:42:ac:12:00:03",
                    "Gateway": "172.18.0.1",
                    "IPAddress": "172.18.0.3",
                    "IPPrefixLen": 16
                }
            }
        }
    }
]"#;

    #[test]
    fn node_containers_from_docker_inspect() {
        let nodes = node_containers(NODES_INSPECT, "kind").unwrap();
        assert_eq!(
            nodes,
            vec![
                NodeContainer {
                    name: "palisade-e2e-control-plane".into(),
                    ip: Some(Ipv4Addr::new(172, 18, 0, 2)),
                    mac: "02:42:ac:12:00:02".into(),
                    paused: false,
                },
                NodeContainer {
                    name: "palisade-e2e-worker".into(),
                    ip: Some(Ipv4Addr::new(172, 18, 0, 3)),
                    mac: "02:42:ac:12:00:03".into(),
                    paused: true,
                },
            ]
        );
        // On another network the nodes have no MAC (from_env refuses that).
        assert!(node_containers(NODES_INSPECT, "other")
            .unwrap()
            .iter()
            .all(|n| n.mac.is_empty() && n.ip.is_none()));
    }

    #[test]
    fn workers_and_nodes_from_kubectl() {
        let list: Value = serde_json::from_str(
            r#"{"apiVersion": "v1", "kind": "List", "items": [
              {"metadata": {"name": "palisade-e2e-worker2", "labels": {
                 "kubernetes.io/hostname": "palisade-e2e-worker2", "kubernetes.io/os": "linux"}}},
              {"metadata": {"name": "palisade-e2e-control-plane", "labels": {
                 "kubernetes.io/hostname": "palisade-e2e-control-plane",
                 "node-role.kubernetes.io/control-plane": "",
                 "node.kubernetes.io/exclude-from-external-load-balancers": ""}}},
              {"metadata": {"name": "palisade-e2e-worker", "labels": {
                 "kubernetes.io/hostname": "palisade-e2e-worker"}}}
            ]}"#,
        )
        .unwrap();
        let (workers, all) = split_nodes(&list);
        assert_eq!(workers, ["palisade-e2e-worker", "palisade-e2e-worker2"]);
        assert_eq!(
            all,
            [
                "palisade-e2e-control-plane",
                "palisade-e2e-worker",
                "palisade-e2e-worker2"
            ]
        );
    }

    #[test]
    fn announcer_from_the_neighbour_table() {
        let vip = Ipv4Addr::new(172, 18, 255, 200);
        // `ip neigh show 172.18.255.200` in the client, in its usual states.
        assert_eq!(
            neighbour_mac(
                "172.18.255.200 dev eth0 lladdr 02:42:ac:12:00:04 REACHABLE\n",
                vip
            )
            .as_deref(),
            Some("02:42:ac:12:00:04")
        );
        assert_eq!(
            neighbour_mac(
                "172.18.255.200 dev eth0 lladdr 02:42:AC:12:00:03 STALE\n",
                vip
            )
            .as_deref(),
            Some("02:42:ac:12:00:03")
        );
        assert_eq!(neighbour_mac("172.18.255.200 dev eth0 FAILED\n", vip), None);
        assert_eq!(
            neighbour_mac("172.18.255.200 dev eth0 INCOMPLETE\n", vip),
            None
        );
        assert_eq!(neighbour_mac("", vip), None);
        // Another address's entry (a prefix match, say) is not the VIP's.
        assert_eq!(
            neighbour_mac(
                "172.18.255.201 dev eth0 lladdr 02:42:ac:12:00:04 REACHABLE\n",
                vip
            ),
            None
        );

        // /proc/net/arp: a completed entry, and a failed one that still shows its old MAC.
        let arp =
            "IP address       HW type     Flags       HW address            Mask     Device\n\
                   172.18.0.1       0x1         0x2         02:42:5e:1d:3a:9b     *        eth0\n\
                   172.18.255.200   0x1         0x2         02:42:ac:12:00:04     *        eth0\n";
        assert_eq!(
            arp_table_mac(arp, vip).as_deref(),
            Some("02:42:ac:12:00:04")
        );
        let failed = arp.replace(
            "172.18.255.200   0x1         0x2",
            "172.18.255.200   0x1         0x0",
        );
        assert_eq!(arp_table_mac(&failed, vip), None);
    }

    #[test]
    fn probe_verdicts_from_agnhost_and_kubectl() {
        use ProbeOutcome::*;
        assert_eq!(classify_probe(true, "", ""), Reachable);
        // kubectl exec relays agnhost's stderr and adds its own line.
        assert_eq!(
            classify_probe(false, "", "TIMEOUT\ncommand terminated with exit code 1\n"),
            Blocked("TIMEOUT".into())
        );
        assert_eq!(
            classify_probe(
                false,
                "",
                "REFUSED: read udp 10.244.1.3:51234->10.244.2.4:81: read: connection refused\n\
                 command terminated with exit code 1\n"
            ),
            Blocked(
                "REFUSED: read udp 10.244.1.3:51234->10.244.2.4:81: read: connection refused"
                    .into()
            )
        );
        assert_eq!(
            classify_probe(
                false,
                "",
                "OTHER: dial tcp 10.244.2.4:80: connect: no route to host\n"
            ),
            Blocked("OTHER: dial tcp 10.244.2.4:80: connect: no route to host".into())
        );
        // No verdict: the exec itself failed, or agnhost was called wrongly.
        for stderr in [
            "error: unable to upgrade connection: container not found (\"cont-80-tcp\")\n",
            "Error from server (NotFound): pods \"a\" not found\n",
            "error: dial tcp 127.0.0.1:39327: connect: connection refused\n",
            "Error response from daemon: container 4f1c is not running\n",
            "UNKNOWN: address 10.244.2.4: missing port in address\n",
        ] {
            assert!(
                matches!(classify_probe(false, "", stderr), Error(_)),
                "{stderr}"
            );
        }
    }

    /// `kubectl get pods -n palisade-system -l ... --field-selector spec.nodeName=...` while the
    /// DaemonSet replaces a pod: the old one is terminating.
    const AGENT_PODS: &str = r#"{
      "apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
      "items": [
        {"metadata": {"name": "palisade-agent-7xk2p", "creationTimestamp": "2024-11-04T09:20:01Z",
                      "deletionTimestamp": "2024-11-04T09:31:00Z"},
         "status": {"phase": "Running"}},
        {"metadata": {"name": "palisade-agent-q9w4d", "creationTimestamp": "2024-11-04T09:31:02Z"},
         "status": {
           "phase": "Running",
           "conditions": [
             {"type": "PodReadyToStartContainers", "status": "True"},
             {"type": "Initialized", "status": "True"},
             {"type": "Ready", "status": "True"},
             {"type": "ContainersReady", "status": "True"},
             {"type": "PodScheduled", "status": "True"}
           ],
           "containerStatuses": [{
             "name": "agent",
             "containerID": "containerd://6b0e1f3c2a9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f",
             "image": "docker.io/library/palisade:e2e",
             "ready": true, "started": true, "restartCount": 1,
             "state": {"running": {"startedAt": "2024-11-04T09:33:10Z"}},
             "lastState": {"terminated": {"exitCode": 137, "reason": "Error",
               "containerID": "containerd://1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b"}}
           }]
         }}
      ]
    }"#;

    #[test]
    fn agent_pod_readiness_after_a_kill() {
        let list: Value = serde_json::from_str(AGENT_PODS).unwrap();
        let pod = pick_agent_pod(&list).unwrap();
        assert_eq!(pod["metadata"]["name"], "palisade-agent-q9w4d");
        let current = agent_container_id(pod).unwrap();
        assert!(current.starts_with("containerd://6b0e"));
        // Ready, and not the container that was killed...
        let killed =
            "containerd://1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b";
        assert!(agent_ready(pod, Some(killed)));
        assert!(agent_ready(pod, None));
        // ...but a pod still showing the killed container is not "restarted and ready".
        assert!(!agent_ready(pod, Some(&current)));
        let mut waiting = pod.clone();
        waiting["status"]["containerStatuses"][0]["state"] =
            json!({"waiting": {"reason": "CrashLoopBackOff"}});
        waiting["status"]["containerStatuses"][0]["ready"] = json!(false);
        assert!(!agent_ready(&waiting, None));
        let mut unready = pod.clone();
        unready["status"]["conditions"][2]["status"] = json!("False");
        assert!(!agent_ready(&unready, None));
        assert!(pick_agent_pod(&json!({"items": []})).is_none());
    }

    #[test]
    fn l2_from_the_daemonset_args() {
        // The args charts/palisade renders with loadbalancer.l2.enabled.
        let ds = |l2: bool| {
            json!({"items": [{"metadata": {"name": "palisade-agent"},
            "spec": {"template": {"spec": {"containers": [{
              "name": "agent",
              "image": "palisade:e2e",
              "args": ["agent", "--enable-netpol=true", "--enable-loadbalancer=true",
                       "--listen-addr=0.0.0.0:9476", "--lease-name=palisade-allocator",
                       format!("--enable-l2={l2}"), "--memberlist-port=7946"]
            }]}}}}]})
        };
        assert!(l2_enabled(&ds(true)));
        assert!(!l2_enabled(&ds(false)));
        assert!(!l2_enabled(&json!({"items": []})));
    }

    #[test]
    fn api_outage_rules() {
        let svc: Value = serde_json::from_str(
            r#"{"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "kubernetes", "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                         "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}],
                         "type": "ClusterIP"}}"#,
        )
        .unwrap();
        let (ip, port) = api_service(&svc).unwrap();
        assert_eq!((ip, port), (Ipv4Addr::new(10, 96, 0, 1), 443));

        assert!(outage_rules(ApiOutage::Off, ip, port).is_empty());
        let drop = outage_rules(ApiOutage::Disconnect, ip, port);
        assert_eq!(
            drop.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
            ["OUTPUT", "INPUT"]
        );
        assert_eq!(
            drop[0].1.join(" "),
            "-p tcp -m conntrack --ctorigdst 10.96.0.1 --ctorigdstport 443 \
             -m comment --comment palisade-e2e-api-outage -j DROP"
        );
        let reset = outage_rules(ApiOutage::Unavailable, ip, port);
        assert!(reset[0]
            .1
            .join(" ")
            .ends_with("-j REJECT --reject-with tcp-reset"));
        assert!(reset[1].1.join(" ").ends_with("-j DROP"));

        // `iptables -S OUTPUT` in a node after a killed run: only our rule is deleted.
        let saved = "-P OUTPUT ACCEPT\n\
            -A OUTPUT -p tcp -m conntrack --ctorigdst 10.96.0.1/32 --ctorigdstport 443 -m comment --comment palisade-e2e-api-outage -j DROP\n\
            -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
            -A OUTPUT -j KUBE-FIREWALL\n";
        let del = leftover_outage_rules(saved);
        assert_eq!(del.len(), 1);
        assert_eq!(&del[0][..2], ["-D", "OUTPUT"]);
        assert_eq!(del[0].last().map(String::as_str), Some("DROP"));
    }

    #[test]
    fn probes_run_bounded_and_retry_only_without_a_verdict() {
        let sh = |script: &str| -> Vec<String> { vec!["sh".into(), "-c".into(), script.into()] };
        let t = Duration::from_millis(100);
        assert_eq!(probe(&sh("exit 0"), t), ProbeOutcome::Reachable);
        // A verdict is final: the marker file shows the probe ran once.
        let dir = std::env::temp_dir().join(format!("palisade-kind-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let count = dir.join("runs");
        let script = |msg: &str| {
            format!(
                "echo run >> {}; echo '{msg}' >&2; echo 'command terminated with exit code 1' >&2; exit 1",
                count.display()
            )
        };
        assert_eq!(
            probe(&sh(&script("TIMEOUT")), t),
            ProbeOutcome::Blocked("TIMEOUT".into())
        );
        assert_eq!(std::fs::read_to_string(&count).unwrap().lines().count(), 1);
        std::fs::remove_file(&count).unwrap();
        // No verdict: tried PROBE_TRIES times, then an error (not "blocked").
        let out = probe(&sh(&script("error: unable to upgrade connection")), t);
        assert!(matches!(out, ProbeOutcome::Error(ref e) if e.contains("unable to upgrade")));
        assert_eq!(
            std::fs::read_to_string(&count).unwrap().lines().count(),
            PROBE_TRIES
        );
        std::fs::remove_dir_all(&dir).unwrap();
        // A hanging exec is killed at its limit.
        let started = Instant::now();
        assert!(run_bounded(&mut command(&sh("sleep 10")), Duration::from_millis(200)).is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn pids_from_pgrep() {
        assert_eq!(parse_pids("2314\n2391\n"), [2314, 2391]);
        assert!(parse_pids("").is_empty());
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
        assert_eq!(
            resource_arg("palisade.dev/v1alpha1", "ServiceL2Status"),
            "servicel2statuses.palisade.dev"
        );
    }

    #[test]
    fn probes_go_through_kubectl_exec_and_the_client() {
        let k = cluster();
        let to = Ipv4Addr::new(10, 244, 2, 4);
        let argv = k
            .probe_argv(
                &Peer::pod("x/a"),
                to,
                81,
                Protocol::Udp,
                Duration::from_millis(200),
            )
            .unwrap();
        assert_eq!(
            argv.join(" "),
            "kubectl --context kind-c exec -n x a -c cont-80-tcp -- \
             /agnhost connect 10.244.2.4:81 --timeout=200ms --protocol=udp"
        );
        let argv = k
            .probe_argv(&Peer::Client, to, 80, Protocol::Tcp, Duration::from_secs(1))
            .unwrap();
        assert_eq!(
            argv.join(" "),
            "docker exec c-client /agnhost connect 10.244.2.4:80 --timeout=1000ms --protocol=tcp"
        );
        assert!(k
            .probe_argv(
                &Peer::pod("no-namespace"),
                to,
                80,
                Protocol::Tcp,
                Duration::from_secs(1)
            )
            .is_err());
    }

    #[test]
    fn pods_look_like_upstreams() {
        let k = cluster();
        let p = k.pod_manifest("x", "a", &crate::k8s::labels([("pod", "a")]), "w1");
        let containers = p["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 4);
        let names: Vec<&str> = containers
            .iter()
            .map(|c| c["ports"][0]["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "serve-80-tcp",
                "serve-80-udp",
                "serve-81-tcp",
                "serve-81-udp"
            ]
        );
        assert_eq!(containers[0]["name"], PROBE_CONTAINER);
        assert_eq!(containers[1]["command"][2], "--udp");
        assert_eq!(containers[1]["ports"][0]["protocol"], "UDP");
        assert!(containers[0]["readinessProbe"].is_object());
        // Every server outlives the endpoint's withdrawal, within the grace period.
        let grace = p["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap();
        for c in containers {
            let sleep: u64 = c["lifecycle"]["preStop"]["exec"]["command"][1]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(sleep >= 2 && sleep < grace);
        }
        assert_eq!(p["spec"]["nodeName"], "w1");
        assert_eq!(p["metadata"]["labels"]["pod"], "a");
    }
}
