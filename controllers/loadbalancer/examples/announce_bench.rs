//! L2 announcement decision benchmark: the pure `l2::decide` over 10,000 LoadBalancer IPs and
//! 100 live nodes, as every agent runs it on each announcer pass.
//!
//! `cargo run --release -p palisade-loadbalancer --example announce_bench`
//!
//! Cluster: one pool `10.200.0.0/16`; two L2Advertisements (`zone=a` nodes on `eth0`, `zone=b`
//! nodes through a `matchExpressions` selector on the route interface); 100 nodes alternating
//! between the zones; 10,000 Services with one IP each, every tenth with
//! `externalTrafficPolicy: Local` and one EndpointSlice (3 endpoints on 3 nodes, one not
//! ready). No API server, no I/O (the route lookup is a closure): this is the cost of deciding.
//!
//! Rows: a full pass for one node; the parts of a pass (election alone, eligible sets alone);
//! and the cost of a pass after one change (a Service added, a node dead, a slice changed),
//! with the number of IPs whose owner actually changed. Every row is the median of `RUNS`.
//! The 100-node row checks that every IP has exactly one owner.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use palisade_loadbalancer::announce::{advertisements_for_pool, eligible_nodes, winner};
use palisade_loadbalancer::announce::{NodeReach, ReachInterface, TrafficPolicy};
use palisade_loadbalancer::l2::{decide, AnnounceInputs, IpDecision, Owned};
use palisade_loadbalancer::{IPAddressPool, L2Advertisement};
use serde_json::json;

const SERVICES: usize = 10_000;
const NODES: usize = 100;
const RUNS: usize = 9;
const CLASS: &str = "palisade.dev/palisade";

fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("valid object")
}

fn node_name(n: usize) -> String {
    format!("node-{n:03}")
}

fn nodes() -> Vec<Arc<Node>> {
    (0..NODES)
        .map(|n| {
            let zone = if n % 2 == 0 { "a" } else { "b" };
            Arc::new(obj(json!({"metadata": {"name": node_name(n), "labels": {
                "zone": zone, "kubernetes.io/hostname": node_name(n)}}})))
        })
        .collect()
}

fn ip_of(i: usize) -> String {
    format!("10.200.{}.{}", i / 250, 1 + i % 250)
}

fn service(i: usize) -> Arc<Service> {
    let policy = if i % 10 == 0 { "Local" } else { "Cluster" };
    Arc::new(obj(json!({
        "metadata": {"namespace": format!("ns-{}", i % 100), "name": format!("svc-{i:05}"),
                     "uid": format!("uid-{i}")},
        "spec": {"type": "LoadBalancer", "externalTrafficPolicy": policy,
                 "ports": [{"port": 80, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": ip_of(i)}]}}
    })))
}

fn slice(i: usize, shift: usize) -> Arc<EndpointSlice> {
    let ep = |k: usize, ready: bool| {
        json!({"addresses": [format!("10.64.{}.{}", k, 2 + i % 200)],
               "nodeName": node_name((i + k * 7 + shift) % NODES),
               "conditions": {"ready": ready}})
    };
    Arc::new(obj(json!({
        "metadata": {"namespace": format!("ns-{}", i % 100), "name": format!("svc-{i:05}-abcde"),
                     "labels": {"kubernetes.io/service-name": format!("svc-{i:05}")}},
        "addressType": "IPv4",
        "endpoints": [ep(0, true), ep(1, true), ep(2, false)]
    })))
}

fn pools() -> Vec<IPAddressPool> {
    vec![obj(
        json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "IPAddressPool",
        "metadata": {"name": "lan", "labels": {"site": "dc1"}},
        "spec": {"addresses": ["10.200.0.0/16"]}}),
    )]
}

fn advertisements() -> Vec<L2Advertisement> {
    vec![
        obj(
            json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "L2Advertisement",
            "metadata": {"name": "zone-a"},
            "spec": {"ipAddressPools": ["lan"], "interfaces": ["eth0"],
                     "nodeSelectors": [{"matchLabels": {"zone": "a"}}]}}),
        ),
        obj(
            json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "L2Advertisement",
            "metadata": {"name": "zone-b"},
            "spec": {"ipAddressPoolSelectors": [{"matchLabels": {"site": "dc1"}}],
                     "nodeSelectors": [{"matchExpressions": [
                         {"key": "zone", "operator": "In", "values": ["b"]}]}]}}),
        ),
    ]
}

struct World {
    services: Vec<Arc<Service>>,
    nodes: Vec<Arc<Node>>,
    slices: Vec<Arc<EndpointSlice>>,
    live: BTreeSet<String>,
    /// What every agent reported over the membership: both NICs up on the pool's subnet (so
    /// the reach filter runs on every IP and keeps every node).
    reach: BTreeMap<String, NodeReach>,
    pools: Vec<IPAddressPool>,
    ads: Vec<L2Advertisement>,
}

impl World {
    fn new() -> World {
        World {
            services: (0..SERVICES).map(service).collect(),
            nodes: nodes(),
            slices: (0..SERVICES).step_by(10).map(|i| slice(i, 0)).collect(),
            live: (0..NODES).map(node_name).collect(),
            reach: (0..NODES)
                .map(|i| {
                    let nic = |name: &str| ReachInterface {
                        name: name.into(),
                        up: true,
                        nets: vec![("10.200.0.0".parse().unwrap(), 16)],
                    };
                    (
                        node_name(i),
                        NodeReach {
                            interfaces: vec![nic("eth0"), nic("eth1")],
                        },
                    )
                })
                .collect(),
            pools: pools(),
            ads: advertisements(),
        }
    }

    fn decide(&self, me: &str) -> (Owned, Vec<IpDecision>) {
        decide(&AnnounceInputs {
            me,
            route_interface: &|_| Ok("eth1".to_string()),
            live: &self.live,
            reach: &self.reach,
            services: &self.services,
            pools: &self.pools,
            advertisements: &self.ads,
            nodes: &self.nodes,
            slices: &self.slices,
            class: CLASS,
            claim_unclassed: true,
            exclude_unschedulable: false,
        })
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        let out = f();
        times.push(t.elapsed());
        last = Some(out);
    }
    (median(times), last.expect("at least one run"))
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn winners(d: &[IpDecision]) -> BTreeMap<IpAddr, Option<String>> {
    d.iter().map(|d| (d.ip, d.winner.clone())).collect()
}

fn moved(a: &[IpDecision], b: &[IpDecision]) -> usize {
    let (a, b) = (winners(a), winners(b));
    let keys: BTreeSet<&IpAddr> = a.keys().chain(b.keys()).collect();
    keys.into_iter().filter(|k| a.get(k) != b.get(k)).count()
}

fn main() {
    let me = node_name(0);
    let mut w = World::new();
    let mut rows: Vec<(String, String, String)> = Vec::new();

    // Full pass, one node (what each agent runs).
    let (full, (owned, base)) = time(RUNS, || w.decide(&me));
    assert_eq!(base.len(), SERVICES, "every IP decided");
    rows.push((
        format!("full pass, one node ({SERVICES} IPs, {NODES} live nodes)"),
        ms(full),
        format!(
            "{:.2} µs per IP; this node owns {}",
            full.as_secs_f64() * 1e6 / SERVICES as f64,
            owned.len()
        ),
    ));

    // Every node decides alone; together they must name exactly one owner per IP (every
    // Local Service here has a ready endpoint on a node of each zone's reach or not: an IP
    // without eligible node has no owner, and that count is shown).
    let t = Instant::now();
    let mut owners: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for n in 0..NODES {
        let (owned, _) = w.decide(&node_name(n));
        for ip in owned.keys() {
            *owners.entry(*ip).or_default() += 1;
        }
    }
    let all_nodes = t.elapsed();
    assert!(owners.values().all(|c| *c == 1), "an IP with two owners");
    let unowned = base.iter().filter(|d| d.winner.is_none()).count();
    assert_eq!(
        owners.len() + unowned,
        SERVICES,
        "owned + unowned = all IPs"
    );
    rows.push((
        format!("full pass on each of the {NODES} nodes (cluster-wide CPU)"),
        ms(all_nodes),
        format!(
            "{} IPs owned by exactly one node, {unowned} without eligible node",
            owners.len()
        ),
    ));

    // The parts: eligible sets (selectors) and the election (hashing) alone.
    let pool_ads: Vec<_> = {
        let specs: Vec<_> = w.ads.iter().map(|a| &a.spec).collect();
        let labels = w.pools[0].metadata.labels.clone().unwrap_or_default();
        advertisements_for_pool(specs, "lan", &labels)
    };
    let node_labels: Vec<(String, BTreeMap<String, String>)> = w
        .nodes
        .iter()
        .map(|n| {
            (
                n.metadata.name.clone().unwrap_or_default(),
                n.metadata.labels.clone().unwrap_or_default(),
            )
        })
        .collect();
    let (elig_t, eligible) = time(RUNS, || {
        let mut last = Vec::new();
        for _ in 0..SERVICES {
            last = eligible_nodes(
                &pool_ads,
                node_labels.iter().map(|(n, l)| (n.as_str(), l)),
                TrafficPolicy::Cluster,
            );
        }
        last
    });
    rows.push((
        format!("  part: eligible nodes (selectors) × {SERVICES} IPs"),
        ms(elig_t),
        format!("{} eligible per IP", eligible.len()),
    ));
    let ips: Vec<IpAddr> = (0..SERVICES)
        .map(|i| ip_of(i).parse().expect("ip"))
        .collect();
    let refs: Vec<&str> = eligible.iter().map(String::as_str).collect();
    let (elect_t, _) = time(RUNS, || {
        ips.iter()
            .filter(|ip| winner(**ip, refs.iter().copied()) == Some(me.as_str()))
            .count()
    });
    rows.push((
        format!(
            "  part: election sha256(node#ip) × {SERVICES} IPs × {} nodes",
            refs.len()
        ),
        ms(elect_t),
        format!(
            "{:.0} ns per hash",
            elect_t.as_secs_f64() * 1e9 / (SERVICES * refs.len()) as f64
        ),
    ));

    // One change, then the pass that follows it.
    w.services.push(service(SERVICES));
    let (t_add, (_, after)) = time(RUNS, || w.decide(&me));
    rows.push((
        "one change: Service added, next pass".into(),
        ms(t_add),
        format!("{} IP(s) changed owner or appeared", moved(&base, &after)),
    ));
    w.services.pop();

    let dead = winners(&base)
        .get(&ips[1])
        .cloned()
        .flatten()
        .expect("svc 1 has an owner");
    w.live.remove(&dead);
    let (t_dead, (_, after)) = time(RUNS, || w.decide(&me));
    rows.push((
        format!("one change: node {dead} dead, next pass"),
        ms(t_dead),
        format!("{} IP(s) changed owner", moved(&base, &after)),
    ));
    w.live.insert(dead);

    let pos = w.slices.len() / 2;
    let i = pos * 10;
    w.slices[pos] = slice(i, 3);
    let (t_slice, (_, after)) = time(RUNS, || w.decide(&me));
    rows.push((
        "one change: EndpointSlice moved (Local Service), next pass".into(),
        ms(t_slice),
        format!("{} IP(s) changed owner", moved(&base, &after)),
    ));

    println!("| measurement | median of {RUNS} | notes |");
    println!("|---|---:|---|");
    for (a, b, c) in rows {
        println!("| {a} | {b} | {c} |");
    }
}
