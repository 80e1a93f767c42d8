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
use palisade_netpol::synthetic::*;
use palisade_netpol::{compile, render, ClusterState, IncrementalCompiler, NodeConfig, SyncMode};

const RUNS: usize = 9;
const COMPILE_RUNS: usize = 25;

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
    cluster_policy_rows(&mut rows, &exec, &cfg, base);
    print_rows(&rows);
}

/// The same cluster plus [`CLUSTER_POLICIES`] ClusterNetworkPolicies (Admin and Baseline):
/// compile, the apply that adds them, and one of them changing priority.
fn cluster_policy_rows(
    rows: &mut Vec<Row>,
    exec: &KernelExecutor,
    cfg: &NodeConfig,
    base: &ClusterState,
) {
    let with = |variant: i32| {
        let mut s = base.clone();
        s.cluster_policies = cluster_network_policies()
            .into_iter()
            .map(Arc::new)
            .collect();
        s.cluster_policies[0] = Arc::new(cluster_network_policy(0, variant));
        s
    };
    let s = with(0);
    let mut compile_t = Vec::new();
    let mut payload = None;
    for _ in 0..COMPILE_RUNS {
        let t = Instant::now();
        let p = render(&compile(&s, cfg));
        compile_t.push(t.elapsed());
        payload = Some(p);
    }
    let Some(p) = payload else { return };
    let cnp_chains = p
        .chains
        .iter()
        .filter(|n| n.starts_with("PAL-CI-") || n.starts_with("PAL-CE-"))
        .count();
    let tiered = p
        .chains
        .iter()
        .filter(|n| n.starts_with("PAL-XI-") || n.starts_with("PAL-XE-"))
        .count();
    rows.push(Row(
        format!("+{CLUSTER_POLICIES} CNPs: model + compile + render"),
        stats(&compile_t),
        format!("median of {COMPILE_RUNS}"),
    ));
    rows.push(Row(
        format!("+{CLUSTER_POLICIES} CNPs: rules / ipsets / members"),
        format!("{} / {} / {}", p.stats.rules, p.stats.sets, p.stats.members),
        format!(
            "{cnp_chains} CNP chains, {tiered} tiered profiles, {} chains in all",
            p.stats.chains
        ),
    ));
    exec.apply(&render(&compile(base, cfg))).expect("base");
    let t = Instant::now();
    let r = exec.apply(&p).expect("adding CNPs");
    rows.push(Row(
        format!("(c) {CLUSTER_POLICIES} CNPs added (apply only)"),
        ms(t.elapsed()),
        format!(
            "ipset {} + iptables-restore {} ({} chains written)",
            ms(r.ipset_duration),
            ms(r.iptables_duration),
            r.chains_written
        ),
    ));
    // cnp-000 moves from first to last in its tier and back: the profiles holding it change.
    let variants = [with(997), with(1)];
    let mut inc = IncrementalCompiler::new(cfg.clone());
    exec.apply(inc.sync(&s)).expect("with CNPs");
    let mut v = Vec::new();
    let mut sync_t = Vec::new();
    let mut last = None;
    for k in 0..RUNS {
        let t = Instant::now();
        inc.sync(&variants[k % 2]);
        sync_t.push(t.elapsed());
        let p = inc.payload().expect("synced");
        let r = exec.apply(p).expect("CNP change");
        v.push(t.elapsed());
        if std::env::var_os("PALISADE_BENCH_DEBUG").is_some() {
            eprintln!("{r:?}");
        }
        last = Some(r);
    }
    rows.push(Row(
        "(d) one CNP changed (priority)".into(),
        stats(&v),
        last.map(|r| {
            format!(
                "compile+render {}, then ipset {} ({} sets updated) + iptables-restore {} ({} chain(s) rewritten)",
                stats(&sync_t),
                ms(r.ipset_duration),
                r.sets_updated,
                ms(r.iptables_duration),
                r.chains_written
            )
        })
        .unwrap_or_default(),
    ));
}

fn print_rows(rows: &[Row]) {
    println!("| measure | value | notes |");
    println!("|---|---:|---|");
    for Row(a, b, c) in rows {
        println!("| {a} | {b} | {c} |");
    }
}
