//! LoadBalancer latency: one new Service → its IP in `status.loadBalancer.ingress`, through
//! the real `palisade agent` binary and the project's test API server.
//!
//! Each sample creates one `type: LoadBalancer` Service over HTTP with a kube `Client` (as
//! `kubectl apply` would), then polls the API server's store every 0.2 ms until the status
//! shows an IP. Samples are sequential and the Services are kept, so later samples see a
//! slightly fuller cluster. Runs for every combination of
//! - pre-existing allocated Services (already in status, restored by the agent at start-up),
//!   from two /17 pools that together make a /16, and
//! - the agent's `--sync-min-interval` (coalescing of its sync loop).
//!
//! ```text
//! cargo build --release -p palisade
//! PALISADE_BIN=target/release/palisade cargo run --release -p palisade-tests --example lb_latency
//! ```
//! Knobs: `LB_BENCH_SAMPLES` (200), `LB_BENCH_SIZES` (`0,1000,10000`),
//! `LB_BENCH_INTERVALS` (`default,10ms`; `default` passes no flag: 100ms).
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Service;
use kube::api::PostParams;
use palisade_testapi::Store;
use palisade_tests::{lb_agent_with, poll, Api, TempDir, POLL_EVERY};
use serde_json::{json, Value};

const NS: &str = "bench";
/// 10.200.0.0/16 as two /17 pools (API objects only; nothing is routed or configured).
const BASE: u32 = u32::from_be_bytes([10, 200, 0, 0]);

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn service(name: &str, ip: Option<Ipv4Addr>) -> Value {
    let mut svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": NS, "name": name},
        "spec": {"type": "LoadBalancer", "selector": {"app": name},
                 "ports": [{"port": 80, "protocol": "TCP"}]}
    });
    if let Some(ip) = ip {
        svc["status"] =
            json!({"loadBalancer": {"ingress": [{"ip": ip.to_string(), "ipMode": "VIP"}]}});
    }
    svc
}

fn status_ip(store: &Store, name: &str) -> Option<String> {
    store
        .get_object("v1", "Service", Some(NS), name)?
        .pointer("/status/loadBalancer/ingress/0/ip")?
        .as_str()
        .map(str::to_string)
}

struct Stats {
    median: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let q = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Stats {
        median: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        max: *v.last().unwrap(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// One configuration: fresh API server, `existing` allocated Services, one agent.
fn run(existing: usize, interval: &str, samples: usize) -> Result<(Stats, Duration)> {
    // With the palisade-system Namespace.
    let api = Api::start();
    let store = api.server.store().clone();
    store
        .put_object(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    store
        .put_object(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
                           "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]}}),
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for (name, cidr) in [("bench-a", "10.200.0.0/17"), ("bench-b", "10.200.128.0/17")] {
        store
            .put_object(
                json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "IPAddressPool",
                               "metadata": {"name": name}, "spec": {"addresses": [cidr]}}),
            )
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    for i in 0..existing {
        let ip = Ipv4Addr::from(BASE + i as u32);
        store
            .put_object(service(&format!("old-{i:05}"), Some(ip)))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }

    let dir = TempDir::new("lb-latency");
    let kc = api.kubeconfig(&dir);
    let flags: &[&str] = if interval == "default" {
        &[]
    } else {
        &["--sync-min-interval", interval]
    };
    // Production log level (info): every IPAllocated is also a log line.
    let agent = lb_agent_with(
        "node-a",
        &kc,
        &dir,
        flags,
        &[("PALISADE_LOG_LEVEL", "info")],
    );
    let t0 = Instant::now();
    if !agent.wait_ready(Duration::from_secs(60)) {
        bail!("agent not ready:\n{}", agent.logs());
    }
    let restored = poll(Duration::from_secs(120), POLL_EVERY, || {
        (agent.metric("palisade_leader") == Some(1.0)
            && agent.metric("palisade_allocator_services_allocated") == Some(existing as f64))
        .then_some(())
    });
    if restored.is_none() {
        bail!(
            "agent did not restore {existing} Services:\n{}",
            agent.logs()
        );
    }
    let startup = t0.elapsed();
    // Let the start-up passes (pool status writes and the pass they trigger) settle.
    std::thread::sleep(Duration::from_millis(500));

    let client = api.block_on(async {
        let cfg = kube::Config::new(api.server.url().parse()?);
        anyhow::Ok(kube::Client::try_from(cfg)?)
    })?;
    let services: kube::Api<Service> = kube::Api::namespaced(client, NS);
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples {
        let name = format!("new-{i:04}");
        let svc: Service = serde_json::from_value(service(&name, None))?;
        let start = Instant::now();
        api.block_on(services.create(&PostParams::default(), &svc))
            .with_context(|| format!("create {name}"))?;
        loop {
            if let Some(ip) = status_ip(&store, &name) {
                lat.push(start.elapsed());
                let n: u32 = ip.parse::<Ipv4Addr>()?.into();
                if n < BASE + existing as u32 {
                    bail!("{name} got {ip}, which a pre-existing Service holds");
                }
                break;
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("{name} got no IP within 10 s:\n{}", agent.logs());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        // Unsynchronised with the agent's loop: the next create lands anywhere in its cycle.
        std::thread::sleep(Duration::from_millis(7 + (i as u64 * 13) % 41));
    }
    if agent.logs().contains("panicked") {
        bail!("agent panicked:\n{}", agent.logs());
    }
    drop(agent);
    Ok((stats(lat), startup))
}

fn main() -> Result<()> {
    let samples: usize = env_or("LB_BENCH_SAMPLES", "200").parse()?;
    let sizes: Vec<usize> = env_or("LB_BENCH_SIZES", "0,1000,10000")
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let intervals: Vec<String> = env_or("LB_BENCH_INTERVALS", "default,10ms")
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    println!(
        "binary: {}\nsamples per row: {samples}\n",
        palisade_tests::palisade_bin().display()
    );
    println!("| pre-existing Services | --sync-min-interval | median | p90 | p99 | max | agent start-up (ready + restored) |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for &existing in &sizes {
        for interval in &intervals {
            let (s, startup) = run(existing, interval, samples)?;
            let shown = if interval == "default" {
                "100ms (default)"
            } else {
                interval
            };
            println!(
                "| {existing} | {shown} | {} | {} | {} | {} | {} |",
                ms(s.median),
                ms(s.p90),
                ms(s.p99),
                ms(s.max),
                ms(startup)
            );
        }
    }
    Ok(())
}
