//! NetworkPolicy benchmark: a synthetic 10,000-pod cluster compiled for one node and applied
//! to a fresh network namespace.
//!
//! ```text
//! cargo run --release -p palisade-dataplane --example netpol_bench
//! ```
//!
//! Cluster: 1,000 namespaces × 10 pods (web/api/worker/db, named ports), 100 nodes with the
//! benchmarked node holding 110 pods, 2,000 policies from seven templates (default deny,
//! namespace selectors, namespace+pod AND, matchExpressions, named ports, endPort ranges,
//! ipBlocks with except, egress with DNS). Applying needs root (a throw-away netns
//! `pal-bench-<pid>-<n>` is created and deleted); without root only compile/render run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade_dataplane::netns::{is_root, Netns};
use palisade_dataplane::{Executor, KernelExecutor};
use palisade_netpol::builders::*;
use palisade_netpol::k8s_openapi::api::core::v1::Pod;
use palisade_netpol::k8s_openapi::api::networking::v1::NetworkPolicy;
use palisade_netpol::{compile, render, ClusterState, IncrementalCompiler, NodeConfig, SyncMode};
use serde_json::json;

const NAMESPACES: usize = 1000;
const PODS_PER_NS: usize = 10;
const NODES: usize = 100;
const LOCAL_PODS: usize = 110;
const NODE: &str = "node-000";
const RUNS: usize = 9;
const COMPILE_RUNS: usize = 25;

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const APPS: [&str; 4] = ["web", "api", "worker", "db"];

fn ports(app: &str) -> Vec<(&'static str, i32, &'static str)> {
    match app {
        "web" => vec![("http", 8080, "TCP"), ("metrics", 9100, "TCP")],
        "api" => vec![("http", 8000, "TCP"), ("grpc", 9000, "TCP")],
        "db" => vec![("pg", 5432, "TCP")],
        _ => vec![("metrics", 9100, "TCP")],
    }
}

fn ns_name(i: usize) -> String {
    format!("ns-{i:04}")
}

struct Cluster {
    state: ClusterState,
    /// Node of every pod (namespace index, pod index) → node index.
    local_namespaces: Vec<usize>,
}

fn pod_ip(node: usize, slot: usize) -> String {
    // node n owns 10.(64 + n/256).(n%256).0/24
    format!("10.{}.{}.{}", 64 + node / 256, node % 256, slot + 2)
}

fn build_cluster() -> Cluster {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let nodes: Vec<_> = (0..NODES)
        .map(|n| {
            mk_node(
                &format!("node-{n:03}"),
                &format!("10.{}.{}.0/24", 64 + n / 256, n % 256),
            )
        })
        .collect();
    let mut namespaces = Vec::new();
    for i in 0..NAMESPACES {
        let team = format!("team-{}", i % 50);
        let env = ["prod", "staging", "dev"][i % 3];
        let mut labels = vec![("team", team.as_str()), ("env", env)];
        if i % 100 == 7 {
            labels.push(("purpose", "monitoring"));
        }
        if i % 250 == 3 {
            labels.push(("purpose", "ingress"));
        }
        namespaces.push(mk_ns(&ns_name(i), &labels));
    }
    namespaces.push(mk_ns("kube-system", &[]));

    // 110 pods on our node, the rest spread over the others.
    let total = NAMESPACES * PODS_PER_NS;
    let mut local = vec![false; total];
    let mut placed = 0;
    while placed < LOCAL_PODS {
        let k = rng.below(total);
        if !local[k] {
            local[k] = true;
            placed += 1;
        }
    }
    let mut next_slot = vec![0usize; NODES];
    let mut pods = Vec::with_capacity(total + 2);
    let mut local_namespaces = Vec::new();
    let mut remote = 1;
    for (k, is_local) in local.iter().enumerate() {
        let (i, j) = (k / PODS_PER_NS, k % PODS_PER_NS);
        let node = if *is_local {
            local_namespaces.push(i);
            0
        } else {
            let n = remote;
            remote = if remote + 1 >= NODES { 1 } else { remote + 1 };
            n
        };
        let slot = next_slot[node];
        next_slot[node] += 1;
        let app = APPS[j % APPS.len()];
        let version = format!("v{}", j % 3);
        let pod = mk_pod(
            &ns_name(i),
            &format!("{app}-{j}"),
            &[("app", app), ("version", version.as_str())],
            &pod_ip(node, slot),
            &format!("node-{node:03}"),
        );
        pods.push(with_ports(pod, &ports(app)));
    }
    for d in 0..2 {
        let node = 1 + d;
        let slot = next_slot[node];
        next_slot[node] += 1;
        pods.push(with_ports(
            mk_pod(
                "kube-system",
                &format!("coredns-{d}"),
                &[("k8s-app", "kube-dns")],
                &pod_ip(node, slot),
                &format!("node-{node:03}"),
            ),
            &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
        ));
    }
    local_namespaces.sort_unstable();
    local_namespaces.dedup();

    let mut policies = Vec::new();
    for i in 0..NAMESPACES {
        for k in 0..2 {
            policies.push(policy(i, (i * 2 + k) % 7, 0));
        }
    }
    Cluster {
        state: cluster(nodes, namespaces, pods, policies),
        local_namespaces,
    }
}

/// Policy template `t` for namespace `i`; `variant` perturbs it (for "one policy changed").
fn policy(i: usize, t: usize, variant: u16) -> NetworkPolicy {
    let ns = ns_name(i);
    let team = format!("team-{}", i % 50);
    let extra_port = 7000 + variant;
    let (name, spec) = match t {
        0 => (
            "default-deny",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                            "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]}),
        ),
        1 => (
            "web-from-ingress",
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"purpose": "ingress"}}}], "ports": [{"port": "http"}, {"port": extra_port}]},
                {"from": [{"namespaceSelector": {"matchLabels": {"purpose": "monitoring"}}}], "ports": [{"port": "metrics"}]}]}),
        ),
        2 => (
            "api-from-web",
            json!({"podSelector": {"matchLabels": {"app": "api"}}, "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 8000}, {"port": "grpc"}, {"port": extra_port}]}]}),
        ),
        3 => (
            "db-from-team-api",
            json!({"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"team": team}}, "podSelector": {"matchLabels": {"app": "api"}}}],
                 "ports": [{"port": "pg"}, {"port": extra_port}]}]}),
        ),
        4 => (
            "api-egress",
            json!({"podSelector": {"matchLabels": {"app": "api"}}, "policyTypes": ["Egress"], "egress": [
                {"to": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}, "podSelector": {"matchLabels": {"app": "db"}}}], "ports": [{"port": "pg"}]},
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "192.168.0.0/16"]}}], "ports": [{"port": 443}, {"port": extra_port}]},
                {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}], "ports": [{"port": 53, "protocol": "UDP"}]}]}),
        ),
        5 => (
            "nodeports-from-lan",
            json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}]}, "ingress": [
                {"from": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}], "ports": [{"port": 30000, "endPort": 32767}, {"port": extra_port}]}]}),
        ),
        _ => (
            "from-prod-staging",
            json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]}, "ingress": [
                {"from": [{"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "staging"]}]},
                           "podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["worker"]}, {"key": "version", "operator": "Exists"}]}}],
                 "ports": [{"port": 8000, "endPort": 8100}, {"port": 9100, "protocol": "TCP"}, {"port": extra_port, "protocol": "SCTP"}]}]}),
        ),
    };
    mk_policy(&ns, name, spec)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// "median (min)": the machine is shared, the minimum shows the cost without preemption.
fn stats(v: &[Duration]) -> String {
    let min = v.iter().min().copied().unwrap_or_default();
    format!("{} (min {})", ms(median(v.to_vec())), ms(min))
}

struct Row(String, String, String);

/// Set in the child that runs inside the benchmark's network namespace.
const INSIDE: &str = "PALISADE_BENCH_IN_NETNS";

fn main() {
    let compile_only = std::env::var_os("PALISADE_BENCH_COMPILE_ONLY").is_some();
    if std::env::var_os(INSIDE).is_none() && is_root() && !compile_only {
        // Re-run this program inside a fresh namespace, so the executor runs its commands
        // directly (as the agent does), without an `ip netns exec` per command.
        match Netns::create("pal-bench") {
            Ok(ns) => {
                let exe = std::env::current_exe().expect("own path");
                let status = std::process::Command::new("ip")
                    .args(["netns", "exec", ns.name()])
                    .arg(exe)
                    .env(INSIDE, "1")
                    .status();
                drop(ns);
                match status {
                    Ok(s) if s.success() => return,
                    other => {
                        eprintln!("benchmark inside the namespace failed: {other:?}");
                        std::process::exit(1);
                    }
                }
            }
            Err(e) => eprintln!("cannot create a network namespace ({e}); compile only"),
        }
    }
    run();
}

fn run() {
    let t = Instant::now();
    let cl = build_cluster();
    let build_time = t.elapsed();
    let cfg = NodeConfig::new(NODE);
    let st = &cl.state;

    // Compile + render (cold, repeated for a median).
    let mut compile_t = Vec::new();
    let mut render_t = Vec::new();
    let mut compiled = None;
    let mut payload = None;
    for _ in 0..COMPILE_RUNS {
        let t = Instant::now();
        let c = compile(st, &cfg);
        compile_t.push(t.elapsed());
        let t = Instant::now();
        let p = render(&c);
        render_t.push(t.elapsed());
        compiled = Some(c);
        payload = Some(p);
    }
    let (Some(c), Some(p1)) = (compiled, payload) else {
        return;
    };
    let policy_chains = p1
        .chains
        .iter()
        .filter(|n| n.starts_with("PAL-PI-") || n.starts_with("PAL-PE-"))
        .count();

    let mut rows = vec![
        Row(
            "cluster".into(),
            format!(
                "{} pods, {} namespaces, {} policies, {} nodes",
                st.pods.len(),
                st.namespaces.len(),
                st.policies.len(),
                st.nodes.len()
            ),
            String::new(),
        ),
        Row(
            "local pods (node-000)".into(),
            LOCAL_PODS.to_string(),
            format!("in {} namespaces", cl.local_namespaces.len()),
        ),
        Row(
            "build objects (not counted)".into(),
            ms(build_time),
            String::new(),
        ),
        Row(
            "model + compile".into(),
            stats(&compile_t),
            format!("median of {COMPILE_RUNS}"),
        ),
        Row(
            "render".into(),
            stats(&render_t),
            format!("median of {COMPILE_RUNS}"),
        ),
        Row(
            "rules (-A lines)".into(),
            p1.stats.rules.to_string(),
            format!(
                "{} policy chains, {} chains in all",
                policy_chains, p1.stats.chains
            ),
        ),
        Row(
            "ipsets / members".into(),
            format!("{} / {}", p1.stats.sets, p1.stats.members),
            String::new(),
        ),
        Row(
            "payload bytes".into(),
            format!(
                "{} (iptables {}, ipset {})",
                p1.stats.bytes,
                p1.iptables_restore.len(),
                p1.ipset_restore.len()
            ),
            String::new(),
        ),
        Row(
            "diagnostics".into(),
            c.diagnostics.len().to_string(),
            String::new(),
        ),
    ];

    // Variants for the incremental steps.
    let local_ns = cl.local_namespaces.first().copied().unwrap_or(0);
    let changed_policy = |variant: u16| {
        let mut s = st.clone();
        let np = policy(local_ns, (local_ns * 2) % 7, variant);
        if let Some(slot) = s.policies.iter_mut().find(|p| {
            p.metadata.namespace == np.metadata.namespace && p.metadata.name == np.metadata.name
        }) {
            *slot = Arc::new(np);
        }
        s
    };
    let with_remote_pod = |n: usize, base: &ClusterState| {
        let mut s = base.clone();
        let pod: Pod = with_ports(
            mk_pod(
                &ns_name(local_ns),
                &format!("api-new-{n}"),
                &[("app", "api"), ("version", "v1")],
                &format!("10.200.0.{}", 10 + n),
                "node-050",
            ),
            &ports("api"),
        );
        s.pods.push(Arc::new(pod));
        s
    };

    if std::env::var_os(INSIDE).is_none() {
        rows.push(Row(
            "apply".into(),
            "skipped (needs root)".into(),
            String::new(),
        ));
        print_rows(&rows);
        return;
    }
    // We run inside the throw-away namespace: drive the kernel exactly as the agent does.
    let exec = match KernelExecutor::detect() {
        Ok(x) => x,
        Err(e) => {
            rows.push(Row("apply".into(), format!("skipped: {e}"), String::new()));
            print_rows(&rows);
            return;
        }
    };

    // The agent's path: an IncrementalCompiler (full compile unless only remote pods
    // changed) feeding the KernelExecutor.
    let mut inc = IncrementalCompiler::new(cfg.clone());

    // Cold sync end to end: compile + render + apply into an empty namespace.
    let t = Instant::now();
    let p = inc.sync(st);
    let cp = t.elapsed();
    let r = exec.apply(p).expect("cold apply");
    let total = t.elapsed();
    rows.push(Row(
        "cold sync, end to end".into(),
        ms(total),
        format!(
            "compile+render {} + ipset {} + iptables-restore {} ({:?} backend); target ≤ 1 s",
            ms(cp),
            ms(r.ipset_duration),
            ms(r.iptables_duration),
            exec.backend()
        ),
    ));

    // Same payload again (the periodic resync: reads the kernel back, changes nothing).
    let p = p.clone();
    let mut v = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        let r = exec.apply(&p).expect("resync");
        assert!(!r.changed, "{r:?}");
        v.push(t.elapsed());
    }
    rows.push(Row(
        "resync, unchanged (verify only)".into(),
        stats(&v),
        "iptables-save + ipset save + compare".into(),
    ));

    // (a) one policy changed: alternate between two variants (full compile, partial restore).
    let variants = [changed_policy(1), changed_policy(2)];
    let mut v = Vec::new();
    let mut sync_t = Vec::new();
    let mut last_report = None;
    for k in 0..RUNS {
        let s = &variants[k % 2];
        let t = Instant::now();
        inc.sync(s);
        sync_t.push(t.elapsed());
        assert_eq!(inc.last_mode(), SyncMode::Full);
        let p = inc.payload().expect("synced");
        let r = exec.apply(p).expect("policy change");
        v.push(t.elapsed());
        assert!(r.iptables_applied && r.chains_written <= 2, "{r:?}");
        last_report = Some(r);
    }
    let detail = last_report
        .map(|r| {
            format!(
                "compile+render {}, then ipset {} + iptables-restore {} ({} chain rewritten); target ≤ 100 ms",
                stats(&sync_t),
                ms(r.ipset_duration),
                ms(r.iptables_duration),
                r.chains_written
            )
        })
        .unwrap_or_default();
    rows.push(Row("(a) one policy changed".into(), stats(&v), detail));

    // (b) one remote pod added / removed: set members only.
    let base = &variants[1];
    let base_rules = inc.sync(base).iptables_restore.clone();
    exec.apply(inc.sync(base)).expect("base");
    let mut v = Vec::new();
    let mut sync_t = Vec::new();
    let mut apply_t = Vec::new();
    let mut patched = 0;
    for k in 0..RUNS * 2 {
        let s = if k % 2 == 0 {
            with_remote_pod(k, base)
        } else {
            base.clone()
        };
        let t = Instant::now();
        inc.sync(&s);
        let synced = t.elapsed();
        assert_eq!(inc.last_mode(), SyncMode::Patched);
        let p = inc.payload().expect("synced");
        assert!(
            p.iptables_restore == base_rules,
            "pod churn must not change rules"
        );
        let r = exec.apply(p).expect("pod churn");
        v.push(t.elapsed());
        sync_t.push(synced);
        apply_t.push(r.total_duration);
        assert!(!r.iptables_applied && r.changed, "{r:?}");
        patched = patched.max(r.sets_patched);
    }
    rows.push(Row(
        "(b) one remote pod added/removed".into(),
        stats(&v),
        format!(
            "incremental compile+render {} + apply {} (ipset only: {patched} sets patched by add/del; iptables untouched); target ≤ 20 ms",
            stats(&sync_t),
            stats(&apply_t)
        ),
    ));

    // For comparison: the same pod churn through a full compile.
    let mut v = Vec::new();
    for k in 0..RUNS {
        let s = if k % 2 == 0 {
            with_remote_pod(100 + k, base)
        } else {
            base.clone()
        };
        let t = Instant::now();
        let p = render(&compile(&s, &cfg));
        exec.apply(&p).expect("pod churn");
        v.push(t.elapsed());
    }
    rows.push(Row(
        "(b') same, full compile + render + apply".into(),
        stats(&v),
        String::new(),
    ));
    print_rows(&rows);
}

fn print_rows(rows: &[Row]) {
    println!("| measure | value | notes |");
    println!("|---|---:|---|");
    for Row(a, b, c) in rows {
        println!("| {a} | {b} | {c} |");
    }
}
