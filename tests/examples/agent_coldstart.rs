//! Agent cold start and memory at scale: the real `palisade agent` (NetworkPolicy
//! enforcement only) against the project's test API server preloaded with the synthetic
//! bench cluster (`palisade_netpol::synthetic`: 100 nodes, 1,001 namespaces, 10,002 pods,
//! 2,000 policies = 13,103 objects; the agent is `node-000`, which holds 110 pods).
//!
//! Every run gets a fresh network namespace (`pal-cs-<pid>-<n>`, deleted afterwards): this
//! program re-executes itself inside it, starts the API server on its loopback, then the
//! agent, so the agent's `iptables-restore` / `ipset restore` land in that namespace and
//! never in the host's. Measured per run:
//! - **rules in the kernel**: agent spawn → its first successful apply (the agent's
//!   `palisade_netpol_last_success_timestamp_seconds`, polled every 10 ms); afterwards the
//!   kernel is checked (`iptables-save`, `ipset list`) against the agent's own counts;
//! - **CPU**: the agent's CPU time until then (with its `ipset` / `iptables-restore` children)
//!   and this program's meanwhile (the API server serving the lists), from `/proc/PID/stat`;
//!   and the API server alone listing the pods as the agent pages them (500 per page);
//! - **memory**: `VmHWM` (peak RSS) and `VmRSS` of the agent from `/proc/PID/status` at the
//!   first apply and after `COLDSTART_STEADY_SECS` (steady state);
//! - **where the time goes**: timestamps of the agent's own log lines (JSON format): client
//!   ready, each watch's first list complete, caches synced, then the first sync's phases
//!   (snapshot, compile + render, apply) as the reconciler logs them.
//!
//! ```text
//! cargo build --release -p palisade
//! PALISADE_BIN=target/release/palisade cargo run --release -p palisade-tests --example agent_coldstart
//! ```
//! Knobs: `COLDSTART_RUNS` (5), `COLDSTART_PODS` (`apiserver`: pods as a kube-apiserver
//! serves those of a Deployment — defaults, managedFields, status conditions — or `minimal`:
//! the synthetic pods as built), `COLDSTART_STEADY_SECS` (5), `COLDSTART_AGENT_FLAGS` (extra
//! agent flags, space-separated; default `--anti-spoofing=false`, since the lab has no pod
//! interfaces and every local pod would otherwise be reported unprotected).
//! Needs root (network namespaces); without it the program says so and exits.
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use palisade_netpol::synthetic;
use palisade_tests::{is_root, palisade_bin, AgentProc, Api, TempDir};
use serde_json::{json, Value};

/// Set in the child that runs inside a run's network namespace.
const INSIDE: &str = "PALISADE_COLDSTART_IN_NETNS";
const RESULT: &str = "COLDSTART-RESULT ";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn main() -> Result<()> {
    if std::env::var_os(INSIDE).is_some() {
        let r = inside()?;
        println!("{RESULT}{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    if !is_root() {
        println!("agent_coldstart: skipped, needs root (a network namespace per run)");
        return Ok(());
    }
    let runs: usize = env_or("COLDSTART_RUNS", "5").parse()?;
    println!(
        "binary: {}\npods: {}, agent flags: {}\nload average at start: {}",
        palisade_bin().display(),
        env_or("COLDSTART_PODS", "apiserver"),
        agent_flags().join(" "),
        loadavg()
    );
    let mut results = Vec::new();
    for run in 0..runs {
        let r = outside(run).with_context(|| format!("run {run}"))?;
        eprintln!("run {run}: {r}");
        results.push(r);
    }
    print_tables(&results);
    println!("\nload average at end: {}", loadavg());
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn agent_flags() -> Vec<String> {
    env_or("COLDSTART_AGENT_FLAGS", "--anti-spoofing=false")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// A named network namespace, deleted on drop (also when the run fails).
struct Netns(String);

impl Netns {
    fn create(run: usize) -> Result<Netns> {
        let name = format!("pal-cs-{}-{run}", std::process::id());
        let ok = Command::new("ip").args(["netns", "add", &name]).status()?;
        if !ok.success() {
            bail!("ip netns add {name} failed");
        }
        let ns = Netns(name);
        let ok = Command::new("ip")
            .args(["-n", &ns.0, "link", "set", "lo", "up"])
            .status()?;
        if !ok.success() {
            bail!("bringing lo up in {} failed", ns.0);
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// One run: a fresh namespace, this program inside it, its result line.
fn outside(run: usize) -> Result<Value> {
    let ns = Netns::create(run)?;
    let exe = std::env::current_exe()?;
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(exe)
        .env(INSIDE, "1")
        .env("PALISADE_BIN", palisade_bin())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the benchmark inside the namespace")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("inside {} failed ({}):\n{stdout}", ns.0, out.status);
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(RESULT))
        .with_context(|| format!("no result line in:\n{stdout}"))?;
    Ok(serde_json::from_str(line)?)
}

/// What a kube-apiserver holds for a pod of a Deployment after the scheduler and the kubelet
/// have been at it: API defaults, owner reference, managedFields of the controller manager and
/// the kubelet, conditions and container status. Labels, IPs, node and ports are untouched,
/// so the compiled rules are the same as for the minimal pods.
fn apiserver_like(pod: &mut Value, i: usize) {
    let name = pod["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let node = pod["spec"]["nodeName"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let ip = pod["status"]["podIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let ports = pod["spec"]["containers"][0]["ports"].clone();
    let ts = "2026-11-30T09:12:44Z";
    let hash = format!(
        "{:010x}",
        (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 24
    );
    let meta = &mut pod["metadata"];
    meta["generateName"] = json!(format!("{name}-{hash}-"));
    meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "name": format!("{name}-{hash}"), "uid": format!("5f0c{i:08x}-1b7e-4c1d-9a51-0c0ffee0{i:04x}"),
        "controller": true, "blockOwnerDeletion": true}]);
    meta["annotations"] = json!({"kubectl.kubernetes.io/restartedAt": ts,
        "prometheus.io/scrape": "true", "prometheus.io/port": "9100"});
    meta["managedFields"] = json!([
        {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
         "time": ts, "fieldsType": "FieldsV1", "fieldsV1": {
            "f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/restartedAt": {},
                "f:prometheus.io/port": {}, "f:prometheus.io/scrape": {}},
                "f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:version": {}},
                "f:ownerReferences": {".": {}, "k:{\"uid\":\"5f0c\"}": {}}},
            "f:spec": {"f:containers": {"k:{\"name\":\"main\"}": {".": {}, "f:env": {".": {},
                "k:{\"name\":\"LOG_LEVEL\"}": {".": {}, "f:name": {}, "f:value": {}}},
                "f:image": {}, "f:imagePullPolicy": {}, "f:name": {}, "f:ports": {".": {}},
                "f:readinessProbe": {".": {}, "f:failureThreshold": {}, "f:httpGet": {".": {},
                    "f:path": {}, "f:port": {}, "f:scheme": {}}, "f:periodSeconds": {}},
                "f:resources": {".": {}, "f:limits": {".": {}, "f:memory": {}},
                    "f:requests": {".": {}, "f:cpu": {}, "f:memory": {}}},
                "f:terminationMessagePath": {}, "f:terminationMessagePolicy": {}}},
                "f:dnsPolicy": {}, "f:enableServiceLinks": {}, "f:restartPolicy": {},
                "f:schedulerName": {}, "f:securityContext": {},
                "f:terminationGracePeriodSeconds": {}}}},
        {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": ts,
         "fieldsType": "FieldsV1", "subresource": "status", "fieldsV1": {
            "f:status": {"f:conditions": {
                "k:{\"type\":\"ContainersReady\"}": {".": {}, "f:lastProbeTime": {},
                    "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}},
                "k:{\"type\":\"Initialized\"}": {".": {}, "f:lastProbeTime": {},
                    "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}},
                "k:{\"type\":\"PodReadyToStartContainers\"}": {".": {}, "f:lastProbeTime": {},
                    "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}},
                "k:{\"type\":\"Ready\"}": {".": {}, "f:lastProbeTime": {},
                    "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}}},
                "f:containerStatuses": {}, "f:hostIP": {}, "f:hostIPs": {}, "f:phase": {},
                "f:podIP": {}, "f:podIPs": {".": {}, format!("k:{{\"ip\":\"{ip}\"}}"): {".": {}, "f:ip": {}}},
                "f:startTime": {}}}}
    ]);
    pod["spec"] = json!({
        "nodeName": node,
        "containers": [{
            "name": "main",
            "image": format!("registry.example.com/team/{name}:1.4.{}", i % 10),
            "imagePullPolicy": "IfNotPresent",
            "ports": ports,
            "env": [{"name": "LOG_LEVEL", "value": "info"},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}],
            "resources": {"limits": {"memory": "256Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"},
                "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
            "volumeMounts": [{"name": format!("kube-api-access-{}", &hash[..5]),
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File"
        }],
        "dnsPolicy": "ClusterFirst", "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority",
        "priority": 0, "restartPolicy": "Always", "schedulerName": "default-scheduler",
        "securityContext": {}, "serviceAccount": "default", "serviceAccountName": "default",
        "terminationGracePeriodSeconds": 30,
        "tolerations": [
            {"effect": "NoExecute", "key": "node.kubernetes.io/not-ready", "operator": "Exists", "tolerationSeconds": 300},
            {"effect": "NoExecute", "key": "node.kubernetes.io/unreachable", "operator": "Exists", "tolerationSeconds": 300}],
        "volumes": [{"name": format!("kube-api-access-{}", &hash[..5]), "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}]
    });
    let cond = |t: &str| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": ts});
    let status = &mut pod["status"];
    status["conditions"] = json!([
        cond("PodReadyToStartContainers"),
        cond("Initialized"),
        cond("Ready"),
        cond("ContainersReady"),
        cond("PodScheduled")
    ]);
    status["hostIP"] = json!("192.0.2.10");
    status["hostIPs"] = json!([{"ip": "192.0.2.10"}]);
    status["qosClass"] = json!("Burstable");
    status["startTime"] = json!(ts);
    status["containerStatuses"] = json!([{"name": "main", "ready": true, "restartCount": 0,
        "started": true, "image": format!("registry.example.com/team/{name}:1.4.{}", i % 10),
        "imageID": format!("registry.example.com/team/{name}@sha256:{:064x}", i),
        "containerID": format!("containerd://{:064x}", i as u128 * 7919),
        "lastState": {}, "state": {"running": {"startedAt": ts}}}]);
}

/// Inside the run's namespace: API server, agent, measurements.
fn inside() -> Result<Value> {
    let cluster = synthetic::build_cluster();
    let mut objects = synthetic::objects(&cluster.state);
    let apiserver = env_or("COLDSTART_PODS", "apiserver") == "apiserver";
    let mut pods = 0;
    for o in objects.iter_mut() {
        if o["kind"] == "Pod" {
            if apiserver {
                apiserver_like(o, pods);
            }
            pods += 1;
        }
    }
    let count = objects.len();
    let bytes: usize = objects.iter().map(|o| o.to_string().len()).sum();
    let api = Api::start();
    for o in objects {
        api.server
            .store()
            .put_object(o)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    drop(cluster);

    // The API server alone: the pod list as the agent's watcher pages it (500 per page),
    // bodies read and dropped. What the agent cannot go below against this server.
    let server_list_ms = list_pods_raw(&api)?;

    let dir = TempDir::new("coldstart");
    let kc = api.kubeconfig(&dir);
    let mut args: Vec<String> = [
        "--node-name",
        synthetic::NODE,
        "--pod-name",
        synthetic::NODE,
        "--kubeconfig",
        &kc,
        "--enable-loadbalancer=false",
        "--enable-l2=false",
        "--log-format",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(agent_flags());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let env = [(
        "PALISADE_LOG_LEVEL",
        "info,palisade_runtime=debug,palisade_enforcement=debug",
    )];
    let own_cpu0 = cpu_ms("self")?;
    let spawn_unix = unix_now();
    let t0 = Instant::now();
    let mut agent = AgentProc::spawn("agent", &argv, &env, dir.path());
    let pid = agent.child.id();

    // Poll the first successful apply; sample memory meanwhile.
    let mut applied = None;
    while t0.elapsed() < Duration::from_secs(120) {
        if let Some(ts) = agent
            .metric("palisade_netpol_last_success_timestamp_seconds")
            .filter(|v| *v > 0.0)
        {
            applied = Some(ts);
            break;
        }
        if let Some(mut c) = agent.child.try_wait().ok().flatten().map(|s| s.to_string()) {
            c.push('\n');
            bail!("agent exited: {c}{}", agent.logs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let Some(applied) = applied else {
        bail!("no successful apply within 120 s:\n{}", agent.logs());
    };
    let mem_at_apply = proc_mem(pid)?;
    let agent_cpu = cpu_ms(&pid.to_string())?;
    let server_cpu = cpu_ms("self")? - own_cpu0;
    let steady: u64 = env_or("COLDSTART_STEADY_SECS", "5").parse()?;
    let until = t0 + Duration::from_secs(steady);
    if let Some(d) = until.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
    let mem_steady = proc_mem(pid)?;

    // The kernel holds what the agent says it applied.
    let metric = |m: &str| agent.metric(m).unwrap_or(-1.0);
    let (k_rules, k_sets, k_members) = kernel_counts()?;
    let (m_sets, m_members) = (
        metric("palisade_netpol_ipsets"),
        metric("palisade_netpol_ipset_members"),
    );
    if k_sets as f64 != m_sets || k_members as f64 != m_members || k_rules == 0 {
        bail!(
            "kernel has {k_rules} rules, {k_sets} sets, {k_members} members; agent says \
             {m_sets} sets, {m_members} members"
        );
    }
    let logs = agent.logs();
    if logs.contains("panicked") {
        bail!("agent panicked:\n{logs}");
    }
    let phases = phases(&logs, spawn_unix);
    drop(agent);
    Ok(json!({
        "objects": count, "pods": pods, "json_bytes": bytes,
        "applied_ms": (applied - spawn_unix) * 1e3,
        "agent_cpu_ms": agent_cpu, "server_cpu_ms": server_cpu,
        "server_list_ms": server_list_ms,
        "hwm_apply_kib": mem_at_apply.0, "rss_apply_kib": mem_at_apply.1,
        "hwm_kib": mem_steady.0, "rss_kib": mem_steady.1,
        "rss_anon_kib": mem_steady.2, "rss_file_kib": mem_steady.3,
        "kernel_rules": k_rules, "kernel_sets": k_sets, "kernel_members": k_members,
        "phases": phases,
    }))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// CPU time (user + system, with reaped children: the agent's `ipset` and `iptables-restore`)
/// of a process (`self` or a pid), in ms.
fn cpu_ms(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`: state is field 3; utime, stime, cutime, cstime are 14–17.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or_default();
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() != 4 {
        bail!("unexpected /proc/{pid}/stat: {stat}");
    }
    let tck = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(100.0);
    Ok(f.iter().sum::<f64>() * 1000.0 / tck)
}

/// Lists every pod from the API server in pages of 500 over plain HTTP; returns ms.
fn list_pods_raw(api: &Api) -> Result<f64> {
    let url = api.server.url();
    let addr: std::net::SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("API server address of {url}"))?;
    let t = Instant::now();
    let mut cont = String::new();
    for _ in 0..1000 {
        let path = if cont.is_empty() {
            "/api/v1/pods?limit=500".to_string()
        } else {
            format!("/api/v1/pods?limit=500&continue={cont}")
        };
        let (code, body) =
            palisade_e2e::http_get(addr, &path, Duration::from_secs(2), Duration::from_secs(30))?;
        if code != 200 {
            bail!("GET {path}: {code}");
        }
        // The list metadata comes before the items.
        let head = &body[..body.len().min(512)];
        cont = head
            .split_once("\"continue\":\"")
            .and_then(|(_, r)| r.split_once('"'))
            .map(|(c, _)| c.to_string())
            .unwrap_or_default();
        if cont.is_empty() {
            return Ok(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    bail!("the pod list did not end")
}

/// (VmHWM, VmRSS, RssAnon, RssFile) in KiB.
fn proc_mem(pid: u32) -> Result<(u64, u64, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((
        field("VmHWM:"),
        field("VmRSS:"),
        field("RssAnon:"),
        field("RssFile:"),
    ))
}

/// Rules in our chains, our ipsets and their members, as the kernel of this namespace has them.
fn kernel_counts() -> Result<(usize, usize, usize)> {
    let save = Command::new("iptables-save").output()?;
    let rules = String::from_utf8_lossy(&save.stdout)
        .lines()
        .filter(|l| l.starts_with("-A PAL"))
        .count();
    let list = Command::new("ipset").args(["list", "-t"]).output()?;
    let text = String::from_utf8_lossy(&list.stdout);
    let mut sets = 0;
    let mut members = 0;
    let mut ours = false;
    for l in text.lines() {
        if let Some(name) = l.strip_prefix("Name: ") {
            ours = name.starts_with("PAL-");
            sets += usize::from(ours);
        } else if let Some(n) = l.strip_prefix("Number of entries: ") {
            if ours {
                members += n.trim().parse::<usize>().unwrap_or(0);
            }
        }
    }
    Ok((rules, sets, members))
}

/// Unix seconds of an RFC 3339 UTC timestamp (`2026-12-03T12:19:11.123456Z`).
fn parse_ts(s: &str) -> Option<f64> {
    let (date, time) = s.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + sec)
}

/// Milliseconds after spawn of the agent's milestones, from its JSON log, plus the phases the
/// first applied sync reports.
fn phases(logs: &str, spawn_unix: f64) -> Value {
    let mut out = BTreeMap::<String, Value>::new();
    for line in logs.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(ts) = v["timestamp"].as_str().and_then(parse_ts) else {
            continue;
        };
        let at = json!(((ts - spawn_unix) * 1e3 * 10.0).round() / 10.0);
        let msg = v["message"].as_str().unwrap_or_default();
        let key = match msg {
            "palisade agent starting" => "client ready".to_string(),
            "initial list complete" => {
                format!("listed {}", v["resource"].as_str().unwrap_or("?"))
            }
            "caches synced; NetworkPolicy enforcement starts" => "caches synced".to_string(),
            "netpol sync applied" => {
                if out.contains_key("first apply done") {
                    continue;
                }
                for f in ["snapshot_ms", "compile_ms", "apply_ms"] {
                    if let Some(x) = v.get(f) {
                        out.insert(f.to_string(), x.clone());
                    }
                }
                "first apply done".to_string()
            }
            _ => continue,
        };
        out.entry(key).or_insert(at);
    }
    json!(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn print_tables(results: &[Value]) {
    let Some(first) = results.first() else {
        return;
    };
    println!(
        "\n{} objects ({} pods), {:.1} MB of JSON in the API server\n",
        first["objects"],
        first["pods"],
        first["json_bytes"].as_f64().unwrap_or(0.0) / 1e6
    );
    let col = |k: &str| -> Vec<f64> { results.iter().filter_map(|r| r[k].as_f64()).collect() };
    let mib = |kib: f64| format!("{:.1} MiB", kib / 1024.0);
    println!("| run | spawn → rules in the kernel | agent CPU until then | API server CPU meanwhile | API server alone: list pods | peak RSS at apply | peak RSS (steady) | RSS (steady) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (i, r) in results.iter().enumerate() {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        println!(
            "| {i} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {} | {} | {} |",
            f("applied_ms"),
            f("agent_cpu_ms"),
            f("server_cpu_ms"),
            f("server_list_ms"),
            mib(f("hwm_apply_kib")),
            mib(f("hwm_kib")),
            mib(f("rss_kib"))
        );
    }
    println!(
        "| **median** | **{:.0} ms** | {:.0} ms | {:.0} ms | {:.0} ms | {} | **{}** | **{}** |",
        median(col("applied_ms")),
        median(col("agent_cpu_ms")),
        median(col("server_cpu_ms")),
        median(col("server_list_ms")),
        mib(median(col("hwm_apply_kib"))),
        mib(median(col("hwm_kib"))),
        mib(median(col("rss_kib")))
    );
    println!(
        "\nsteady RSS, median: {} anonymous (heap, stacks) + {} file-backed (the binary's pages)",
        mib(median(col("rss_anon_kib"))),
        mib(median(col("rss_file_kib")))
    );
    println!(
        "\nkernel after the first apply: {} rules in PAL chains, {} sets, {} members\n",
        first["kernel_rules"], first["kernel_sets"], first["kernel_members"]
    );
    // Milestones: median over runs of ms after spawn.
    let mut keys: Vec<String> = Vec::new();
    for r in results {
        if let Some(o) = r["phases"].as_object() {
            for k in o.keys() {
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
    }
    let ordered = |k: &String| {
        let v: Vec<f64> = results
            .iter()
            .filter_map(|r| r["phases"][k.as_str()].as_f64())
            .collect();
        (!v.is_empty()).then(|| median(v))
    };
    let mut milestones: Vec<(String, f64)> = keys
        .iter()
        .filter(|k| !k.ends_with("_ms"))
        .filter_map(|k| ordered(k).map(|v| (k.clone(), v)))
        .collect();
    milestones.sort_by(|a, b| a.1.total_cmp(&b.1));
    println!("| milestone (agent log) | ms after spawn (median) |");
    println!("|---|---:|");
    for (k, v) in milestones {
        println!("| {k} | {v:.1} |");
    }
    println!("\n| first sync phase | ms (median) |");
    println!("|---|---:|");
    for k in keys.iter().filter(|k| k.ends_with("_ms")) {
        if let Some(v) = ordered(k) {
            println!("| {} | {v:.1} |", k.trim_end_matches("_ms"));
        }
    }
}
