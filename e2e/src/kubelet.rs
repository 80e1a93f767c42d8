//! The lab plays the parts of a cluster that Palisade relies on but does not implement:
//! kubelet, the EndpointSlice controller and kube-proxy (for LoadBalancer IPs only).
//!
//! ```text
//!   API (Pods, Services) ──list every 100 ms──► Kubelet::sync
//!      Pod with spec.nodeName = a lab node, new   → netns + veth + servers (Lab::add_pod),
//!                                                   status: Running, podIP, hostIP, Ready=False
//!      ... `ready_delay` later                    → Ready=True (like a readiness probe passing)
//!      annotation lab.palisade.dev/pod-ip         → that address instead of the next free one
//!      annotation lab.palisade.dev/terminating    → Ready=False (graceful termination)
//!      Pod gone from the API                       → netns removed (its server log is kept)
//!      Service with a selector                     → EndpointSlice <svc>-lab (ready, nodeName)
//!      Service type LoadBalancer with an IP in     → nat rules in every node:
//!        status.loadBalancer.ingress                 PREROUTING/OUTPUT -j LAB-LB
//!                                                    LAB-LB: -d VIP -p P --dport N -j LAB-S<k>
//!                                                    LAB-S<k>: -m statistic ... -j DNAT pod:port
//!                                                    POSTROUTING -j LAB-LB-POST:
//!                                                      ! -s 10.244.0.0/16 -o eth0 ctstate DNAT
//!                                                      -j MASQUERADE
//! ```
//!
//! kube-proxy's part is deliberately small: `externalTrafficPolicy: Cluster` semantics only
//! (every node forwards a LoadBalancer IP to every ready endpoint, picked at random per new
//! connection with `-m statistic`), and traffic from outside the pod network that leaves the
//! node towards another node's pod is masqueraded (as kube-proxy does), so replies come back
//! the same way. Pod-sourced traffic keeps its address, so NetworkPolicies see the real pod.
//! Only ready endpoints receive new connections; conntrack keeps established ones.
//!
//! With a real cluster behind the lab (`--kubeconfig`), the cluster's own EndpointSlice
//! controller writes slices; the lab then only creates pods, writes their status and
//! programs the nat rules.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::api::{ControlPlane, Kind};
use crate::lab::Lab;
use crate::server::ServerLog;

/// Annotation that makes the lab's kubelet report a pod not ready (graceful termination).
pub const TERMINATING_ANNOTATION: &str = "lab.palisade.dev/terminating";
/// Annotation asking the lab's kubelet for a specific pod IP (to test address reuse).
pub const POD_IP_ANNOTATION: &str = "lab.palisade.dev/pod-ip";
/// `endpointslice.kubernetes.io/managed-by` of the slices the lab writes.
pub const SLICE_MANAGER: &str = "endpointslice.lab.palisade.dev";
/// The whole pod network of a lab (every node's /24 is inside).
pub const POD_NETWORK: &str = "10.244.0.0/16";
/// How often the kubelet loop runs.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// How the lab's kubelet behaves.
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    /// Time from "Running" to "Ready" (a readiness probe's initial delay).
    pub ready_delay: Duration,
    /// Write EndpointSlices (off when a real cluster's controller does it).
    pub write_endpoint_slices: bool,
}

impl Default for KubeletConfig {
    fn default() -> KubeletConfig {
        KubeletConfig {
            ready_delay: Duration::from_millis(500),
            write_endpoint_slices: true,
        }
    }
}

/// A pod server log kept after the pod is gone (so "did anything ever arrive" can still be
/// asked about pods a rolling update removed).
#[derive(Clone)]
pub struct RetiredLog {
    pub id: String,
    pub ip: Ipv4Addr,
    pub log: Arc<ServerLog>,
}

#[derive(Clone, Debug, PartialEq)]
struct PodRecord {
    uid: String,
    node: usize,
    ip: Ipv4Addr,
    created: Instant,
    /// The Ready value last written to the API.
    written_ready: Option<bool>,
}

/// A LoadBalancer Service port with its ready backends, for the nat rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LbRule {
    pub vip: Ipv4Addr,
    pub protocol: String,
    pub port: u16,
    /// (pod IP, target port), in a stable order.
    pub backends: Vec<(Ipv4Addr, u16)>,
}

/// The kubelet/endpoints/kube-proxy state machine; [`Kubelet::sync`] is one pass.
pub struct Kubelet {
    cfg: KubeletConfig,
    pods: HashMap<(String, String), PodRecord>,
    slices: HashMap<(String, String), Value>,
    nat: HashMap<usize, String>,
    nat_chains: HashMap<usize, usize>,
    nat_base: HashMap<usize, bool>,
    retired: Arc<Mutex<Vec<RetiredLog>>>,
    rules: Arc<Mutex<Vec<LbRule>>>,
    /// Pods (namespace, name, uid) the lab could not create; reported once, not retried.
    failed: std::collections::HashSet<(String, String, String)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn labels_of(object: &Value) -> BTreeMap<String, String> {
    object["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn named_ports(pod: &Value) -> BTreeMap<String, u16> {
    let mut out = BTreeMap::new();
    for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
        for p in c["ports"].as_array().into_iter().flatten() {
            if let (Some(name), Some(port)) = (p["name"].as_str(), p["containerPort"].as_u64()) {
                out.insert(name.to_string(), port as u16);
            }
        }
    }
    out
}

fn now_rfc3339() -> String {
    // Seconds since the epoch as a UTC timestamp, without a date crate.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// The status the lab's kubelet writes for a pod.
pub fn pod_status(ip: Ipv4Addr, host_ip: Ipv4Addr, ready: bool) -> Value {
    let flag = if ready { "True" } else { "False" };
    let now = now_rfc3339();
    json!({
        "phase": "Running",
        "podIP": ip.to_string(),
        "podIPs": [{ "ip": ip.to_string() }],
        "hostIP": host_ip.to_string(),
        "hostIPs": [{ "ip": host_ip.to_string() }],
        "conditions": [
            { "type": "PodScheduled", "status": "True", "lastTransitionTime": now },
            { "type": "Initialized", "status": "True", "lastTransitionTime": now },
            { "type": "ContainersReady", "status": flag, "lastTransitionTime": now },
            { "type": "Ready", "status": flag, "lastTransitionTime": now },
        ],
    })
}

/// Whether a pod object says Ready=True.
pub fn pod_is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// The nat payload for one node (`iptables-restore --noflush`). `base` adds the jumps from
/// the built-in chains (once per node); `old_chains` service chains that existed before are
/// declared (so flushed) even when no longer used.
pub fn render_nat(rules: &[LbRule], base: bool, old_chains: usize) -> (String, usize) {
    let chains = rules.len().max(old_chains);
    let mut out = String::from("*nat\n:LAB-LB - [0:0]\n:LAB-LB-POST - [0:0]\n");
    for k in 0..chains {
        out.push_str(&format!(":LAB-S{k} - [0:0]\n"));
    }
    if base {
        out.push_str(
            "-A PREROUTING -j LAB-LB\n-A OUTPUT -j LAB-LB\n-A POSTROUTING -j LAB-LB-POST\n",
        );
    }
    out.push_str(&format!(
        "-A LAB-LB-POST ! -s {POD_NETWORK} -o eth0 -m conntrack --ctstate DNAT -j MASQUERADE\n"
    ));
    for (k, rule) in rules.iter().enumerate() {
        if rule.backends.is_empty() {
            continue;
        }
        let proto = rule.protocol.to_ascii_lowercase();
        out.push_str(&format!(
            "-A LAB-LB -d {}/32 -p {proto} -m {proto} --dport {} -j LAB-S{k}\n",
            rule.vip, rule.port
        ));
        let n = rule.backends.len();
        for (i, (ip, port)) in rule.backends.iter().enumerate() {
            let left = n - i;
            if left > 1 {
                out.push_str(&format!(
                    "-A LAB-S{k} -p {proto} -m statistic --mode random --probability {:.5} -j DNAT --to-destination {ip}:{port}\n",
                    1.0 / left as f64
                ));
            } else {
                out.push_str(&format!(
                    "-A LAB-S{k} -p {proto} -j DNAT --to-destination {ip}:{port}\n"
                ));
            }
        }
    }
    out.push_str("COMMIT\n");
    (out, chains)
}

struct SvcPort {
    name: Option<String>,
    port: u16,
    protocol: String,
    target: Value,
}

fn service_ports(svc: &Value) -> Vec<SvcPort> {
    svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(SvcPort {
                name: p["name"].as_str().map(str::to_string),
                port: p["port"].as_u64()? as u16,
                protocol: p["protocol"].as_str().unwrap_or("TCP").to_string(),
                target: p.get("targetPort").cloned().unwrap_or(Value::Null),
            })
        })
        .collect()
}

fn resolve_target(port: &SvcPort, pod: &Value) -> Option<u16> {
    match &port.target {
        Value::Number(n) => n.as_u64().map(|n| n as u16),
        Value::String(s) => match s.parse::<u16>() {
            Ok(n) => Some(n),
            Err(_) => named_ports(pod).get(s).copied(),
        },
        _ => Some(port.port),
    }
}

fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    match selector.as_object() {
        Some(sel) if !sel.is_empty() => sel.iter().all(|(k, v)| {
            v.as_str()
                .is_some_and(|v| labels.get(k).map(String::as_str) == Some(v))
        }),
        _ => false,
    }
}

fn lb_ips(svc: &Value) -> Vec<Ipv4Addr> {
    svc["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["ip"].as_str()?.parse().ok())
        .collect()
}

impl Kubelet {
    pub fn new(cfg: KubeletConfig) -> Kubelet {
        Kubelet {
            cfg,
            pods: HashMap::new(),
            slices: HashMap::new(),
            nat: HashMap::new(),
            nat_chains: HashMap::new(),
            nat_base: HashMap::new(),
            retired: Arc::new(Mutex::new(Vec::new())),
            rules: Arc::new(Mutex::new(Vec::new())),
            failed: std::collections::HashSet::new(),
        }
    }

    /// Logs of pods that were removed.
    pub fn retired(&self) -> Arc<Mutex<Vec<RetiredLog>>> {
        self.retired.clone()
    }

    /// The LoadBalancer rules last programmed.
    pub fn rules(&self) -> Arc<Mutex<Vec<LbRule>>> {
        self.rules.clone()
    }

    /// One pass: pods, their status, EndpointSlices, nat rules.
    pub fn sync(&mut self, lab: &Mutex<Lab>, cp: &ControlPlane) -> Result<()> {
        let api = cp.api();
        let pod_kind = Kind::of("v1", "Pod");
        let pods = api.list(&pod_kind, None).context("listing pods")?;
        let services = api
            .list(&Kind::of("v1", "Service"), None)
            .context("listing services")?;

        // 1. Pods: create what is new, remove what is gone (under the lab lock, no API calls).
        let (node_ips, node_names) = {
            let lab = lock(lab);
            let ips: Vec<Ipv4Addr> = lab.nodes().iter().map(|n| n.ip).collect();
            let names: Vec<String> = lab.nodes().iter().map(|n| n.name.clone()).collect();
            (ips, names)
        };
        let mut wanted: HashMap<(String, String), (String, usize, Option<Ipv4Addr>)> =
            HashMap::new();
        for pod in &pods {
            let Some(node) = pod["spec"]["nodeName"].as_str() else {
                continue;
            };
            let Some(index) = node_names.iter().position(|n| n == node) else {
                continue;
            };
            if matches!(
                pod["status"]["phase"].as_str(),
                Some("Succeeded" | "Failed")
            ) {
                continue;
            }
            let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
            let name = pod["metadata"]["name"].as_str().unwrap_or("");
            let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_string();
            let ip = pod["metadata"]["annotations"][POD_IP_ANNOTATION]
                .as_str()
                .and_then(|s| s.parse().ok());
            wanted.insert((ns.to_string(), name.to_string()), (uid, index + 1, ip));
        }
        {
            let mut lab = lock(lab);
            let gone: Vec<(String, String)> = self
                .pods
                .iter()
                .filter(|(key, rec)| wanted.get(*key).is_none_or(|(uid, _, _)| *uid != rec.uid))
                .map(|(key, _)| key.clone())
                .collect();
            for key in gone {
                if let Some(rec) = self.pods.remove(&key) {
                    if let Some(log) = lab.server_log(rec.ip) {
                        lock(&self.retired).push(RetiredLog {
                            id: format!("{}/{}", key.0, key.1),
                            ip: rec.ip,
                            log,
                        });
                    }
                }
                if lab.pod(&key.0, &key.1).is_ok() {
                    if let Err(e) = lab.remove_pod(&key.0, &key.1) {
                        eprintln!("lab kubelet: removing pod {}/{}: {e:#}", key.0, key.1);
                    }
                }
            }
            for (key, (uid, node, ip)) in &wanted {
                let id = (key.0.clone(), key.1.clone(), uid.clone());
                if self.pods.contains_key(key) || self.failed.contains(&id) {
                    continue;
                }
                match lab.add_pod(*node, &key.0, &key.1, *ip) {
                    Ok(handle) => {
                        self.pods.insert(
                            key.clone(),
                            PodRecord {
                                uid: uid.clone(),
                                node: *node,
                                ip: handle.ip,
                                created: Instant::now(),
                                written_ready: None,
                            },
                        );
                    }
                    Err(e) => {
                        eprintln!("lab kubelet: cannot start pod {}/{}: {e:#}", key.0, key.1);
                        self.failed.insert(id);
                    }
                }
            }
        }

        // 2. Status: Running with its IP; Ready after the delay unless terminating.
        let by_key: HashMap<(String, String), &Value> = pods
            .iter()
            .map(|p| {
                (
                    (
                        p["metadata"]["namespace"]
                            .as_str()
                            .unwrap_or("default")
                            .to_string(),
                        p["metadata"]["name"].as_str().unwrap_or("").to_string(),
                    ),
                    p,
                )
            })
            .collect();
        let mut ready_now: HashMap<(String, String), bool> = HashMap::new();
        for (key, rec) in self.pods.iter_mut() {
            let Some(pod) = by_key.get(key) else { continue };
            let terminating = pod["metadata"]["annotations"][TERMINATING_ANNOTATION] == "true";
            let ready = !terminating && rec.created.elapsed() >= self.cfg.ready_delay;
            let api_ip = pod["status"]["podIP"].as_str().and_then(|s| s.parse().ok());
            let in_sync = rec.written_ready == Some(ready)
                && api_ip == Some(rec.ip)
                && pod_is_ready(pod) == ready;
            if !in_sync {
                let status = pod_status(rec.ip, node_ips[rec.node - 1], ready);
                api.merge_patch(
                    &pod_kind,
                    Some(&key.0),
                    &key.1,
                    &json!({ "status": status }),
                    true,
                )
                .with_context(|| format!("writing the status of pod {}/{}", key.0, key.1))?;
                rec.written_ready = Some(ready);
            }
            ready_now.insert(key.clone(), ready);
        }

        // 3. EndpointSlices and 4. LoadBalancer nat rules, from Services and lab pods.
        let mut rules = Vec::new();
        let slice_kind = Kind::of("discovery.k8s.io/v1", "EndpointSlice");
        let mut live_slices = Vec::new();
        for svc in &services {
            let ns = svc["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let name = svc["metadata"]["name"].as_str().unwrap_or("").to_string();
            let selector = &svc["spec"]["selector"];
            let ports = service_ports(svc);
            // Lab pods of this Service, in a stable order.
            let mut members: Vec<(&(String, String), &PodRecord, &Value)> = self
                .pods
                .iter()
                .filter(|(key, _)| key.0 == ns)
                .filter_map(|(key, rec)| by_key.get(key).map(|pod| (key, rec, *pod)))
                .filter(|(_, _, pod)| selects(selector, &labels_of(pod)))
                .collect();
            members.sort_by(|a, b| a.0.cmp(b.0));
            if self.cfg.write_endpoint_slices && selector.as_object().is_some_and(|s| !s.is_empty())
            {
                let slice_ports: Vec<Value> = ports
                    .iter()
                    .filter_map(|p| {
                        let target = members
                            .first()
                            .and_then(|(_, _, pod)| resolve_target(p, pod))
                            .or(match &p.target {
                                Value::Number(n) => n.as_u64().map(|n| n as u16),
                                Value::Null => Some(p.port),
                                _ => None,
                            })?;
                        let mut v = json!({ "port": target, "protocol": p.protocol });
                        if let Some(n) = &p.name {
                            v["name"] = json!(n);
                        }
                        Some(v)
                    })
                    .collect();
                let endpoints: Vec<Value> = members
                    .iter()
                    .map(|(key, rec, pod)| {
                        let ready = ready_now.get(*key).copied().unwrap_or(false);
                        let terminating =
                            pod["metadata"]["annotations"][TERMINATING_ANNOTATION] == "true";
                        json!({
                            "addresses": [rec.ip.to_string()],
                            "conditions": { "ready": ready, "serving": ready || terminating, "terminating": terminating },
                            "nodeName": node_names[rec.node - 1],
                            "targetRef": { "kind": "Pod", "namespace": key.0, "name": key.1, "uid": rec.uid },
                        })
                    })
                    .collect();
                let slice_name = format!("{name}-lab");
                let slice = json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": slice_name,
                        "namespace": ns,
                        "labels": {
                            "kubernetes.io/service-name": name,
                            "endpointslice.kubernetes.io/managed-by": SLICE_MANAGER,
                        },
                    },
                    "addressType": "IPv4",
                    "endpoints": endpoints,
                    "ports": slice_ports,
                });
                let key = (ns.clone(), slice_name.clone());
                if self.slices.get(&key) != Some(&slice) {
                    api.apply(&slice)
                        .with_context(|| format!("writing EndpointSlice {ns}/{slice_name}"))?;
                    self.slices.insert(key.clone(), slice);
                }
                live_slices.push(key);
            }
            if svc["spec"]["type"] == "LoadBalancer" {
                for vip in lb_ips(svc) {
                    for p in &ports {
                        let backends: Vec<(Ipv4Addr, u16)> = members
                            .iter()
                            .filter(|(key, _, _)| ready_now.get(*key).copied().unwrap_or(false))
                            .filter_map(|(_, rec, pod)| Some((rec.ip, resolve_target(p, pod)?)))
                            .collect();
                        rules.push(LbRule {
                            vip,
                            protocol: p.protocol.clone(),
                            port: p.port,
                            backends,
                        });
                    }
                }
            }
        }
        let stale: Vec<(String, String)> = self
            .slices
            .keys()
            .filter(|k| !live_slices.contains(k))
            .cloned()
            .collect();
        for key in stale {
            api.delete(&slice_kind, Some(&key.0), &key.1)
                .with_context(|| format!("deleting EndpointSlice {}/{}", key.0, key.1))?;
            self.slices.remove(&key);
        }

        // 4. nat rules on every node, when they changed.
        rules.sort_by(|a, b| (a.vip, &a.protocol, a.port).cmp(&(b.vip, &b.protocol, b.port)));
        let (netnses, tmp) = {
            let lab = lock(lab);
            let ns: Vec<(usize, String)> = lab
                .nodes()
                .iter()
                .map(|n| (n.index, n.netns.clone()))
                .collect();
            (ns, lab.tmp_dir().to_path_buf())
        };
        for (index, netns) in netnses {
            let base = !self.nat_base.get(&index).copied().unwrap_or(false);
            let old = self.nat_chains.get(&index).copied().unwrap_or(0);
            let (payload, chains) = render_nat(&rules, base, old);
            if !base && self.nat.get(&index) == Some(&payload) {
                continue;
            }
            let file = tmp.join(format!("nat-node{index}.rules"));
            std::fs::write(&file, &payload)
                .with_context(|| format!("writing {}", file.display()))?;
            let file_arg = file.display().to_string();
            crate::netns::exec_ok(&netns, &["iptables-restore", "--noflush", &file_arg])
                .with_context(|| {
                    format!("programming LoadBalancer nat rules in node{index}:\n{payload}")
                })?;
            self.nat_base.insert(index, true);
            self.nat_chains.insert(index, chains);
            // Remember the payload without the one-time jumps, for the change check.
            let (steady, _) = render_nat(&rules, false, old.max(chains));
            self.nat.insert(index, steady);
        }
        *lock(&self.rules) = rules;
        Ok(())
    }
}

/// The kubelet loop on its own thread; stops on drop.
pub struct KubeletLoop {
    stop: Arc<AtomicBool>,
    passes: Arc<AtomicU64>,
    last_error: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
    retired: Arc<Mutex<Vec<RetiredLog>>>,
    rules: Arc<Mutex<Vec<LbRule>>>,
}

impl KubeletLoop {
    /// Runs [`Kubelet::sync`] every [`SYNC_INTERVAL`] until dropped. Errors (an API outage)
    /// are kept for [`KubeletLoop::last_error`] and the loop goes on.
    pub fn start(
        cfg: KubeletConfig,
        lab: Arc<Mutex<Lab>>,
        cp: Arc<ControlPlane>,
    ) -> Result<KubeletLoop> {
        let mut kubelet = Kubelet::new(cfg);
        let stop = Arc::new(AtomicBool::new(false));
        let passes = Arc::new(AtomicU64::new(0));
        let last_error = Arc::new(Mutex::new(None));
        let retired = kubelet.retired();
        let rules = kubelet.rules();
        let thread = {
            let (stop, passes, last_error) = (stop.clone(), passes.clone(), last_error.clone());
            std::thread::Builder::new()
                .name("lab-kubelet".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match kubelet.sync(&lab, &cp) {
                            Ok(()) => *lock(&last_error) = None,
                            Err(e) => *lock(&last_error) = Some(format!("{e:#}")),
                        }
                        passes.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(SYNC_INTERVAL);
                    }
                })
                .context("spawning the kubelet thread")?
        };
        Ok(KubeletLoop {
            stop,
            passes,
            last_error,
            thread: Some(thread),
            retired,
            rules,
        })
    }

    /// Passes completed so far.
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::SeqCst)
    }

    /// Waits (at most `timeout`) until two more passes completed, so everything written to
    /// the API before the call has been acted on. Returns the last pass's error, if any.
    pub fn settle(&self, timeout: Duration) -> Result<()> {
        let start = self.passes();
        let deadline = Instant::now() + timeout;
        while self.passes() < start + 2 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the lab's kubelet did not run within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        match self.last_error() {
            Some(e) => Err(anyhow::anyhow!("lab kubelet: {e}")),
            None => Ok(()),
        }
    }

    /// The error of the last pass, if it failed.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// Server logs of removed pods.
    pub fn retired(&self) -> Vec<RetiredLog> {
        lock(&self.retired).clone()
    }

    /// The LoadBalancer rules last programmed.
    pub fn rules(&self) -> Vec<LbRule> {
        lock(&self.rules).clone()
    }

    /// Stops the loop and waits for it.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for KubeletLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_rules_spread_over_backends() {
        let rules = vec![LbRule {
            vip: "198.51.100.200".parse().unwrap(),
            protocol: "TCP".into(),
            port: 80,
            backends: vec![
                ("10.244.1.2".parse().unwrap(), 80),
                ("10.244.2.2".parse().unwrap(), 8080),
                ("10.244.3.2".parse().unwrap(), 80),
            ],
        }];
        let (text, chains) = render_nat(&rules, true, 2);
        assert_eq!(chains, 2);
        assert!(text.contains(":LAB-S1 - [0:0]"));
        assert!(text.contains("-A PREROUTING -j LAB-LB\n"));
        assert!(
            text.contains("-A LAB-LB -d 198.51.100.200/32 -p tcp -m tcp --dport 80 -j LAB-S0\n")
        );
        assert!(text.contains("--probability 0.33333 -j DNAT --to-destination 10.244.1.2:80\n"));
        assert!(text.contains("--probability 0.50000 -j DNAT --to-destination 10.244.2.2:8080\n"));
        assert!(text.contains("-A LAB-S0 -p tcp -j DNAT --to-destination 10.244.3.2:80\n"));
        let (steady, _) = render_nat(&rules, false, 0);
        assert!(!steady.contains("PREROUTING"));
        let none = vec![LbRule {
            backends: vec![],
            ..rules[0].clone()
        }];
        assert!(!render_nat(&none, false, 0).0.contains("-A LAB-LB -d"));
    }

    #[test]
    fn status_and_readiness() {
        let s = pod_status(
            "10.244.1.2".parse().unwrap(),
            "198.51.100.11".parse().unwrap(),
            true,
        );
        assert!(pod_is_ready(&json!({ "status": s })));
        let s = pod_status(
            "10.244.1.2".parse().unwrap(),
            "198.51.100.11".parse().unwrap(),
            false,
        );
        assert!(!pod_is_ready(&json!({ "status": s.clone() })));
        assert_eq!(s["podIP"], "10.244.1.2");
        let ts = now_rfc3339();
        assert_eq!(ts.len(), 20, "{ts}");
        assert!(ts.starts_with("20"), "{ts}");
    }

    #[test]
    fn targets_and_selectors() {
        let pod = json!({ "spec": { "containers": [ { "ports": [ { "name": "http", "containerPort": 8080 } ] } ] } });
        let p = |target: Value| SvcPort {
            name: None,
            port: 80,
            protocol: "TCP".into(),
            target,
        };
        assert_eq!(resolve_target(&p(json!("http")), &pod), Some(8080));
        assert_eq!(resolve_target(&p(json!(81)), &pod), Some(81));
        assert_eq!(resolve_target(&p(Value::Null), &pod), Some(80));
        assert_eq!(resolve_target(&p(json!("nope")), &pod), None);
        let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        assert!(selects(&json!({ "app": "web" }), &labels));
        assert!(!selects(&json!({ "app": "db" }), &labels));
        assert!(
            !selects(&json!({}), &labels),
            "an empty selector selects nothing for endpoints"
        );
    }
}
