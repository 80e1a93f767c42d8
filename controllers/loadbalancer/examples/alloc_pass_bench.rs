//! One allocation pass (`palisade_loadbalancer::plan::AllocationState::pass`) at scale, as
//! the leader runs it on every event: N LoadBalancer Services that already hold their IPs
//! (restored at the first pass), then steady-state passes (nothing changed, the common case:
//! the watch echo of the agent's own writes), and passes after one new Service; each size
//! once recomputing every Service on every pass ("full", what the agent did before passes
//! became incremental) and once incremental.
//!
//! ```text
//! cargo run --release -p palisade-loadbalancer --example alloc_pass_bench
//! # knobs: PASS_BENCH_SIZES=1000,10000 PASS_BENCH_RUNS=50
//! ```
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use palisade_loadbalancer::plan::{AllocationState, Inputs};
use palisade_loadbalancer::IPAddressPool;
use serde_json::json;

fn service(i: usize, ip: Option<String>) -> Arc<Service> {
    let status = match ip {
        Some(ip) => json!({"loadBalancer": {"ingress": [{"ip": ip}]}}),
        None => json!({}),
    };
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {
                "namespace": format!("ns-{}", i % 50), "name": format!("svc-{i}"),
                "uid": format!("uid-{i}"), "resourceVersion": format!("{}", 1000 + i),
                "creationTimestamp": "2026-11-23T10:00:00Z",
                "labels": {"app": format!("app-{}", i % 7)}
            },
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}],
                     "selector": {"app": format!("app-{}", i % 7)}},
            "status": status
        }))
        .expect("service"),
    )
}

fn pools() -> Vec<IPAddressPool> {
    ["10.200.0.0/17", "10.200.128.0/17"]
        .iter()
        .enumerate()
        .map(|(i, cidr)| {
            serde_json::from_value(json!({
                "apiVersion": "palisade.dev/v1alpha1", "kind": "IPAddressPool",
                "metadata": {"name": format!("pool-{i}")},
                "spec": {"addresses": [cidr]}
            }))
            .expect("pool")
        })
        .collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let sizes: Vec<usize> = std::env::var("PASS_BENCH_SIZES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let runs: usize = std::env::var("PASS_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let namespaces: Vec<Arc<Namespace>> = (0..50)
        .map(|i| {
            Arc::new(
                serde_json::from_value(json!({"metadata": {"name": format!("ns-{i}"),
                    "labels": {"team": format!("t{}", i % 3)}}}))
                .expect("namespace"),
            )
        })
        .collect();
    let nodes: Vec<Arc<Node>> = vec![Arc::new(
        serde_json::from_value(json!({"metadata": {"name": "n1"},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]}}))
        .expect("node"),
    )];
    let pools = pools();
    println!("| Services | pass | first pass (restore all) | steady pass (median) | pass after one new Service (median) |");
    println!("|---:|---|---:|---:|---:|");
    for (&n, mode) in sizes.iter().flat_map(|n| [(n, "full"), (n, "incremental")]) {
        // Addresses as a previous leader left them in status.
        let mut services: Vec<Arc<Service>> = (0..n)
            .map(|i| {
                let ip = format!("10.200.{}.{}", i / 250, 1 + i % 250);
                service(i, Some(ip))
            })
            .collect();
        let mut state = if mode == "full" {
            AllocationState::recomputing_everything()
        } else {
            AllocationState::default()
        };
        let pass = |state: &mut AllocationState, services: &[Arc<Service>]| {
            let t = Instant::now();
            let plan = state.pass(&Inputs {
                pools: &pools,
                services,
                namespaces: &namespaces,
                nodes: &nodes,
                class: "palisade.dev/palisade",
                claim_unclassed: true,
                now: jiff::Timestamp::now(),
            });
            (t.elapsed(), plan)
        };
        let (first, plan) = pass(&mut state, &services);
        assert_eq!(plan.services_allocated, n, "every Service restored");
        assert!(plan.service_status.is_empty(), "restore rewrote statuses");
        let steady: Vec<Duration> = (0..runs)
            .map(|_| {
                let (d, plan) = pass(&mut state, &services);
                assert!(plan.service_status.is_empty() && plan.events.is_empty());
                d
            })
            .collect();
        let mut after_new = Vec::new();
        for k in 0..runs {
            services.push(service(n + k, None));
            let (d, plan) = pass(&mut state, &services);
            assert_eq!(plan.service_status.len(), 1, "the new Service gets an IP");
            // The leader writes it; the next list shows it in status.
            let (key, ips) = &plan.service_status[0];
            assert_eq!(key.name, format!("svc-{}", n + k));
            let mut v = serde_json::to_value(services.last().unwrap().as_ref()).unwrap();
            v["status"] = json!({"loadBalancer": {"ingress": [{"ip": ips[0].to_string()}]}});
            v["metadata"]["resourceVersion"] = json!(format!("{}", 900_000 + k));
            *services.last_mut().unwrap() = Arc::new(serde_json::from_value(v).unwrap());
            after_new.push(d);
        }
        println!(
            "| {n} | {mode} | {} | {} | {} |",
            ms(first),
            ms(median(steady)),
            ms(median(after_new))
        );
    }
}
