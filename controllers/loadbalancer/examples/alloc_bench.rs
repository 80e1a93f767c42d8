//! Allocator benchmark: 10,000 Services over pools totalling a /16.
//!
//! `cargo run --release -p palisade-loadbalancer --example alloc_bench`
//!
//! Pools: 4 × /18 (one /16): `gold` (priority 1, serviceSelector tier=gold), `team`
//! (priority 2, namespaces team-0..team-4), `labelled` (priority 3, namespaceSelector
//! env=prod) and `general` (no priority, catch-all). Services are spread over 20 namespaces
//! so every pool gets used. Each phase runs on fresh state `RUNS` times; the median is shown.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use palisade_loadbalancer::{Allocator, Pool, Port, ServiceRequest};

const SERVICES: usize = 10_000;
const CHURN: usize = 1_000;
const RUNS: usize = 5;

fn labels(k: &str, v: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(k.to_string(), v.to_string())])
}

fn pools() -> Vec<Pool> {
    let sel = |k: &str, v: &str| {
        palisade_loadbalancer::selector::parse(&LabelSelector {
            match_labels: Some(labels(k, v)),
            ..Default::default()
        })
        .expect("valid selector")
    };
    let mut gold = Pool::new("gold", &["10.96.0.0/18"]).expect("pool");
    gold.priority = Some(1);
    gold.service_selectors = vec![sel("tier", "gold")];
    let mut team = Pool::new("team", &["10.96.64.0/18"]).expect("pool");
    team.priority = Some(2);
    team.namespaces = (0..5).map(|i| format!("team-{i}")).collect();
    let mut labelled = Pool::new("labelled", &["10.96.128.0-10.96.191.255"]).expect("pool");
    labelled.priority = Some(3);
    labelled.namespace_selectors = vec![sel("env", "prod")];
    let general = Pool::new("general", &["10.96.192.0/18"]).expect("pool");
    vec![general, labelled, team, gold]
}

fn request(i: usize) -> ServiceRequest {
    let ns = if i % 4 == 0 {
        format!("team-{}", i % 5)
    } else {
        format!("app-{}", i % 15)
    };
    let mut req = ServiceRequest::new(&ns, &format!("svc-{i}"));
    if i % 10 == 0 {
        req.labels = labels("tier", "gold");
    }
    if i % 3 == 0 {
        req.namespace_labels = labels("env", "prod");
    }
    req.ports = vec![Port::tcp(80), Port::tcp(443)];
    req
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[derive(Default)]
struct Row {
    name: &'static str,
    ops: usize,
    times: Vec<Duration>,
}

fn main() {
    let reqs: Vec<ServiceRequest> = (0..SERVICES).map(request).collect();
    let mut rows: Vec<Row> = vec![
        Row {
            name: "set_pools (4 × /18)",
            ops: 1,
            ..Default::default()
        },
        Row {
            name: "assign, cold (10,000 Services)",
            ops: SERVICES,
            ..Default::default()
        },
        Row {
            name: "assign again, unchanged (converge)",
            ops: SERVICES,
            ..Default::default()
        },
        Row {
            name: "restore from status (fresh allocator)",
            ops: SERVICES,
            ..Default::default()
        },
        Row {
            name: "unassign 1,000 (every 10th)",
            ops: CHURN,
            ..Default::default()
        },
        Row {
            name: "reassign those 1,000",
            ops: CHURN,
            ..Default::default()
        },
        Row {
            name: "assign with sharing key (5,000 pairs)",
            ops: SERVICES,
            ..Default::default()
        },
        Row {
            name: "fill the /16, then 1,000 exhausted",
            ops: 65_536 + 1_000,
            ..Default::default()
        },
    ];
    let mut per_pool = String::new();
    for run in 0..RUNS {
        let mut a = Allocator::new();
        let t = Instant::now();
        a.set_pools(pools());
        rows[0].times.push(t.elapsed());

        let t = Instant::now();
        let mut status: Vec<Vec<IpAddr>> = Vec::with_capacity(SERVICES);
        for r in &reqs {
            status.push(a.assign(r).expect("assign"));
        }
        rows[1].times.push(t.elapsed());

        let t = Instant::now();
        for (r, want) in reqs.iter().zip(&status) {
            assert_eq!(&a.assign(r).expect("converge"), want);
        }
        rows[2].times.push(t.elapsed());

        if run == 0 {
            for p in ["gold", "team", "labelled", "general"] {
                let c = a.counters(p).expect("pool");
                per_pool.push_str(&format!(
                    "| {p} | {} | {} |\n",
                    c.assigned_v4, c.available_v4
                ));
            }
        }

        let mut b = Allocator::new();
        b.set_pools(pools());
        let t = Instant::now();
        for (r, ips) in reqs.iter().zip(&status) {
            b.restore(r, ips).expect("restore");
        }
        rows[3].times.push(t.elapsed());

        let t = Instant::now();
        for r in reqs.iter().step_by(10) {
            a.unassign(&r.key);
        }
        rows[4].times.push(t.elapsed());
        let t = Instant::now();
        for r in reqs.iter().step_by(10) {
            a.assign(r).expect("reassign");
        }
        rows[5].times.push(t.elapsed());

        let mut s = Allocator::new();
        s.set_pools(pools());
        let shared: Vec<ServiceRequest> = (0..SERVICES)
            .map(|i| {
                let mut r = request(i & !1);
                r.key.name = format!("svc-{i}");
                r.sharing_key = Some(format!("pair-{}", i / 2));
                r.ports = vec![Port::tcp(8000 + (i % 2) as u16)];
                r
            })
            .collect();
        let t = Instant::now();
        for r in &shared {
            s.assign(r).expect("shared assign");
        }
        rows[6].times.push(t.elapsed());

        let mut f = Allocator::new();
        let mut catch_all = Pool::new("all", &["10.96.0.0/16"]).expect("pool");
        catch_all.priority = Some(1);
        f.set_pools(vec![catch_all]);
        let t = Instant::now();
        for i in 0..65_536 {
            f.assign(&ServiceRequest::new("fill", &format!("s{i}")))
                .expect("fill");
        }
        for i in 0..1_000 {
            assert!(f
                .assign(&ServiceRequest::new("over", &format!("s{i}")))
                .is_err());
        }
        rows[7].times.push(t.elapsed());
    }

    println!("| phase | ops | median total | per op |");
    println!("|---|---:|---:|---:|");
    for r in rows {
        let m = median(r.times);
        println!(
            "| {} | {} | {:.2} ms | {:.2} µs |",
            r.name,
            r.ops,
            m.as_secs_f64() * 1e3,
            m.as_secs_f64() * 1e6 / r.ops as f64
        );
    }
    println!();
    println!("| pool (after cold assign) | assigned v4 | available v4 |");
    println!("|---|---:|---:|");
    print!("{per_pool}");
}
