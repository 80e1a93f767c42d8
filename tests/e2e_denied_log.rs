//! The denied-traffic log with real packets: real agents in a two-node lab cluster (default
//! settings: NFLOG, 10/min per pod, burst 5), the model's pods, and a policy isolating x/a
//! for ingress.
//!
//! - a denied probe (y/b → x/a, same node) gives exactly one `denied traffic` line on node1's
//!   agent naming both pods and the isolating policy, and the counter of x/a rises;
//! - an allowed probe (y/b → z/a) gives none;
//! - a flood of denied UDP datagrams (one new socket each) raises the counter by no more
//!   than the kernel's per-pod limit allows (burst + rate × elapsed), and logs one line.
//!
//! Lab only (needs root). Needs `cargo build -p palisade` first (or `PALISADE_BIN`).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use palisade_e2e::cluster::{Cluster, Peer};
use palisade_e2e::k8s::network_policy as np;
use palisade_e2e::lab_cluster::{LabCluster, LabClusterSpec};
use palisade_e2e::netns;
use palisade_e2e::scenarios::Model;
use palisade_e2e::Protocol::Tcp;
use serde_json::json;

const SAMPLE: &str =
    r#"palisade_netpol_denied_packets_total{direction="ingress",namespace="x",pod="a"}"#;

fn denied_lines(c: &LabCluster, node: &str, needle: &[&str]) -> Vec<String> {
    c.agents()
        .log(node)
        .lines()
        .filter(|l| l.contains("denied traffic") && needle.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

fn wait_until(timeout: Duration, f: impl FnMut() -> bool) -> bool {
    palisade_poll::poll(timeout, Duration::from_millis(100), f)
}

fn scenario(c: &mut LabCluster) -> Result<()> {
    let model = Model::deploy(c, 2)?;
    let xa = model.pod("x/a")?.clone();
    ensure!(xa.node == 1, "the model puts x/a on node1");
    c.apply(&np(
        "x",
        "isolate-a",
        json!({ "podSelector": { "matchLabels": { "pod": "a" } }, "policyTypes": ["Ingress"] }),
    ))?;
    // Wait for node1's rules (the NFLOG rule of x/a's profile), without probing: every
    // probe before the check would be a denied flow of its own.
    let netns1 = c.lab().nodes()[0].netns.clone();
    let programmed = wait_until(Duration::from_secs(20), || {
        netns::exec_ok(&netns1, &["iptables-save"])
            .map(|t| t.contains("-j NFLOG --nflog-prefix PAL-IN-"))
            .unwrap_or(false)
    });
    ensure!(programmed, "node1 never got the NFLOG rule");
    ensure!(
        denied_lines(c, "node1", &[]).is_empty(),
        "denials logged before any probe"
    );
    let before = c.agents().metric("node1", SAMPLE).unwrap_or(0.0);

    // One denied probe.
    let m = c.probe_matrix(&[Peer::pod("y/b")], &[("x/a".into(), xa.ip)], 80, Tcp)?;
    ensure!(!m.at(0, 0), "y/b reached x/a through the policy");
    let want = [
        "src_pod=y/b",
        "dst_pod=x/a",
        "policies=x/isolate-a",
        "direction=ingress",
    ];
    let logged = wait_until(Duration::from_secs(10), || {
        !denied_lines(c, "node1", &want).is_empty()
    });
    if !logged {
        bail!(
            "no denied-traffic line for y/b -> x/a; node1 log:\n{}",
            c.agents().log("node1")
        );
    }
    let counted = wait_until(Duration::from_secs(10), || {
        c.agents().metric("node1", SAMPLE).unwrap_or(0.0) > before
    });
    ensure!(counted, "{SAMPLE} did not rise");
    // Retransmitted SYNs of the same flow are folded into the one line.
    std::thread::sleep(Duration::from_secs(2));
    let lines = denied_lines(c, "node1", &["dst_pod=x/a"]);
    ensure!(
        lines.len() == 1,
        "expected exactly one line, got:\n{}",
        lines.join("\n")
    );
    ensure!(
        lines[0].contains("protocol=TCP") && lines[0].contains("dport=80"),
        "{}",
        lines[0]
    );

    // An allowed probe: nothing logged anywhere.
    let za = model.pod("z/a")?.clone();
    let m = c.probe_matrix(&[Peer::pod("y/b")], &[("z/a".into(), za.ip)], 80, Tcp)?;
    ensure!(m.at(0, 0), "y/b must reach z/a");
    std::thread::sleep(Duration::from_secs(2));
    for node in ["node1", "node2"] {
        let l = denied_lines(c, node, &["dst_pod=z/a"]);
        ensure!(l.is_empty(), "allowed traffic logged on {node}: {l:?}");
    }

    // A flood: 300 UDP datagrams from new sockets to x/a.
    let yb_netns = {
        let lab = c.lab();
        lab.pod("y", "b")?.netns.clone()
    };
    let counter_before = c.agents().metric("node1", SAMPLE).unwrap_or(0.0);
    let start = Instant::now();
    let script = format!(
        "for i in $(seq 300); do echo flood > /dev/udp/{}/80 || true; done",
        xa.ip
    );
    netns::exec_ok(&yb_netns, &["bash", "-c", &script]).context("flooding")?;
    std::thread::sleep(Duration::from_secs(2));
    let elapsed = start.elapsed().as_secs_f64();
    let counter_after = c.agents().metric("node1", SAMPLE).unwrap_or(0.0);
    let logged = counter_after - counter_before;
    // Burst 5, then 10 per minute, per destination pod.
    let bound = 5.0 + (elapsed / 60.0 * 10.0).ceil() + 1.0;
    println!("flood: 300 datagrams in {elapsed:.1}s, {logged} logged (bound {bound})");
    ensure!(
        logged <= bound,
        "the per-pod rate limit did not hold: {logged} packets logged for 300 sent (bound {bound})"
    );
    let udp = denied_lines(c, "node1", &["dst_pod=x/a", "protocol=UDP"]);
    ensure!(udp.len() <= 1, "one flow, at most one line: {udp:?}");
    Ok(())
}

/// Audit mode: x/a isolated only by an audited policy; y/b reaches it, one `would-deny`
/// line names both pods and the policy, and the would-deny counter rises.
fn audit_scenario(c: &mut LabCluster) -> Result<()> {
    let model = Model::deploy(c, 2)?;
    let xa = model.pod("x/a")?.clone();
    let mut policy = np(
        "x",
        "isolate-a",
        json!({ "podSelector": { "matchLabels": { "pod": "a" } }, "policyTypes": ["Ingress"] }),
    );
    policy["metadata"]["annotations"] = json!({ "palisade.dev/enforcement": "audit" });
    c.apply(&policy)?;
    let netns1 = c.lab().nodes()[0].netns.clone();
    let programmed = wait_until(Duration::from_secs(20), || {
        netns::exec_ok(&netns1, &["iptables-save"])
            .map(|t| t.contains("--comment would-deny"))
            .unwrap_or(false)
    });
    ensure!(programmed, "node1 never got the audit-mode profile");
    let sample =
        r#"palisade_netpol_would_deny_packets_total{direction="ingress",namespace="x",pod="a"}"#;
    let m = c.probe_matrix(&[Peer::pod("y/b")], &[("x/a".into(), xa.ip)], 80, Tcp)?;
    ensure!(m.at(0, 0), "an audit-mode policy must not block y/b -> x/a");
    let needle = [
        "would-deny traffic",
        "src_pod=y/b",
        "dst_pod=x/a",
        "policies=x/isolate-a",
    ];
    let logged = wait_until(Duration::from_secs(10), || {
        c.agents()
            .log("node1")
            .lines()
            .any(|l| needle.iter().all(|n| l.contains(n)))
    });
    ensure!(
        logged,
        "no would-deny line; node1 log:\n{}",
        c.agents().log("node1")
    );
    let counted = wait_until(Duration::from_secs(10), || {
        c.agents().metric("node1", sample).unwrap_or(0.0) > 0.0
    });
    ensure!(counted, "{sample} did not rise");
    ensure!(
        denied_lines(c, "node1", &[]).is_empty(),
        "audit mode logged a real denial"
    );
    Ok(())
}

#[test]
fn e2e_audit_mode_would_deny() {
    let test = "e2e_audit_mode_would_deny";
    if !palisade_e2e::lab_ready(test) {
        return;
    }
    let mut c = LabCluster::start(LabClusterSpec::new(2)).expect("lab cluster");
    if let Err(e) = audit_scenario(&mut c) {
        panic!("{test}: {e:#}\n{}", c.diagnostics());
    }
}

#[test]
fn e2e_denied_traffic_log() {
    let test = "e2e_denied_traffic_log";
    if !palisade_e2e::lab_ready(test) {
        return;
    }
    let mut c = LabCluster::start(LabClusterSpec::new(2)).expect("lab cluster");
    if let Err(e) = scenario(&mut c) {
        panic!("{test}: {e:#}\n{}", c.diagnostics());
    }
}
