//! Agent CPU under a flood of denied packets: one lab node running the real agent, x/a
//! isolated for ingress, y/b sending UDP datagrams to x/a as fast as one socket can for
//! `FLOOD`. Every datagram reaches our chains (an unanswered UDP flow stays NEW) and is
//! dropped; the denied-traffic log's kernel limit (hashlimit per pod) decides how many reach
//! NFLOG and the agent. Configurations: log off, the default limit (10/min, burst 5), and
//! deliberately high ones (1000/sec and the maximum 10000/sec, burst 1000).
//!
//! Run (root; builds network namespaces, touches nothing else):
//!   cargo build --release -p palisade
//!   PALISADE_BIN=target/release/palisade cargo run --release -p palisade-tests --example denied_flood_bench
//!
//! Agent CPU is read from /proc/<pid>/stat (user + system ticks) over the flood.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use palisade_e2e::cluster::Cluster;
use palisade_e2e::k8s::network_policy as np;
use palisade_e2e::lab_cluster::{LabCluster, LabClusterSpec};
use palisade_e2e::netns;
use palisade_e2e::scenarios::Model;
use serde_json::json;

const FLOOD: Duration = Duration::from_secs(10);
const SAMPLE: &str =
    r#"palisade_netpol_denied_packets_total{direction="ingress",namespace="x",pod="a"}"#;

fn agent_pid(node_netns: &str) -> Result<u32> {
    let pids = std::process::Command::new("ip")
        .args(["netns", "pids", node_netns])
        .output()
        .context("ip netns pids")?;
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.iter().any(|a| *a == b"agent")
            && args.first().is_some_and(|a| a.ends_with(b"palisade"))
        {
            return pid.parse().context("pid");
        }
    }
    anyhow::bail!("no agent process in {node_netns}")
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state(0) ... utime(11) stime(12).
    let utime: u64 = f.get(11).context("utime")?.parse()?;
    let stime: u64 = f.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

struct Row {
    config: String,
    sent: u64,
    logged: f64,
    cpu: f64,
}

fn run(label: &str, agent_args: &[&str]) -> Result<Row> {
    let mut spec = LabClusterSpec::new(1);
    spec.agent_args = agent_args.iter().map(|s| s.to_string()).collect();
    let mut c = LabCluster::start(spec)?;
    let model = Model::deploy(&mut c, 1)?;
    let xa = model.pod("x/a")?.ip;
    c.apply(&np(
        "x",
        "isolate-a",
        json!({ "podSelector": { "matchLabels": { "pod": "a" } }, "policyTypes": ["Ingress"] }),
    ))?;
    let node_netns = c.lab().nodes()[0].netns.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !netns::exec_ok(&node_netns, &["iptables-save"])?.contains("PAL-IN-") {
        anyhow::ensure!(Instant::now() < deadline, "policy never programmed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let yb = c.lab().pod("y", "b")?.netns.clone();
    let pid = agent_pid(&node_netns)?;
    let before = c.agents().metric("node1", SAMPLE).unwrap_or(0.0);
    let t0 = cpu_ticks(pid)?;
    let started = Instant::now();
    let sender = std::thread::spawn(move || -> Result<u64> {
        netns::enter(&yb)?;
        let s = UdpSocket::bind("0.0.0.0:0")?;
        let to = SocketAddr::from((xa, 80));
        let mut sent = 0u64;
        let end = Instant::now() + FLOOD;
        let buf = [0u8; 64];
        while Instant::now() < end {
            for _ in 0..256 {
                if s.send_to(&buf, to).is_ok() {
                    sent += 1;
                }
            }
        }
        Ok(sent)
    });
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    let elapsed = started.elapsed().as_secs_f64();
    let t1 = cpu_ticks(pid)?;
    std::thread::sleep(Duration::from_millis(500));
    let logged = c.agents().metric("node1", SAMPLE).unwrap_or(0.0) - before;
    let cpu = (t1 - t0) as f64 / 100.0 / elapsed * 100.0;
    Ok(Row {
        config: label.to_string(),
        sent,
        logged,
        cpu,
    })
}

fn main() -> Result<()> {
    if !palisade_tests::is_root() {
        println!("skipped: denied_flood_bench needs root (network namespaces)");
        return Ok(());
    }
    let configs: [(&str, &[&str]); 4] = [
        ("log off", &["--denied-log=false"]),
        ("default (10/min, burst 5)", &[]),
        (
            "1000/sec, burst 1000",
            &["--denied-log-rate=1000/sec", "--denied-log-burst=1000"],
        ),
        (
            "10000/sec (the maximum), burst 1000",
            &["--denied-log-rate=10000/sec", "--denied-log-burst=1000"],
        ),
    ];
    let mut rows = Vec::new();
    for (label, args) in configs {
        rows.push(run(label, args)?);
    }
    println!("\n| denied-log setting | datagrams sent ({FLOOD:?}) | packets logged | agent CPU |");
    println!("|---|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.1} % |",
            r.config, r.sent, r.logged, r.cpu
        );
    }
    Ok(())
}
