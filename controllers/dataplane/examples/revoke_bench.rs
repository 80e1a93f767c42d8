//! Cost of one revocation pass against the conntrack table size, for both backends: list +
//! trace + delete with 1,000 / 10,000 / 100,000 entries in a fresh network namespace (root;
//! the entries go away with the namespace).
//!
//! ```text
//! cargo run --release -p palisade-dataplane --example revoke_bench
//! REVOKE_SIZES=1000,10000 REVOKE_DENIED=100,1000 REVOKE_BACKENDS=netlink \
//!   cargo run --release -p palisade-dataplane --example revoke_bench
//! ```
//!
//! Table: TCP ESTABLISHED entries inserted with `conntrack -R` (one `-I` line each, 600 s
//! timeout), all to local pod x/a (10.9.6.10:80 and up) which accepts ingress only from
//! namespace y: `REVOKE_DENIED` of them (default 100 and 1,000, at most a tenth of the table)
//! come from z/c (denied, deleted), the others from y/b (allowed, untouched).
//! Backends (`REVOKE_BACKENDS`, default `netlink,tool`): `netlink` = [`NetlinkConntrack`]
//! (one ctnetlink dump, exact-tuple deletes batched per socket write), `tool` =
//! [`KernelConntrack`] (`conntrack -L`, then one `conntrack -D` process per entry, each of
//! which walks the table: quadratic).
//! `REVOKE_PORTS=distinct` gives every entry its own destination port (1–65,000, then
//! again), so almost every entry is its own view (protocol, source, destination, port) and
//! has to be traced: the worst case for `trace`; the default (`shared`) uses ports 80 and up,
//! one per 60,000 entries, like many connections of a few clients to one port.
//! Columns: `views` = distinct (protocol, source, destination, port) among the entries (each
//! traced once), `list` = listing + parse, `trace` = judging every entry against the payload,
//! `revoke` = the whole [`revoke_denied`] pass (list, trace, the deletions), and
//! `delete` = revoke − list − trace.

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use palisade_dataplane::conntrack::Conntrack;
use palisade_dataplane::netns::{is_root, Netns};
use palisade_dataplane::{revoke_denied, KernelConntrack, NetlinkConntrack};
use palisade_netpol::builders::*;
use palisade_netpol::revoke::{self, RevokeContext};
use palisade_netpol::trace::Tracer;
use palisade_netpol::{compile, render, Family, NodeConfig};
use serde_json::json;

const X: &str = "10.9.6.10";
const Y: &str = "10.9.6.20";
const Z: &str = "10.9.6.30";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Inserts `n` entries into `ns`'s table; every `every`-th from z, the others from y; with
/// `distinct_ports` each to its own port.
fn fill(ns: &Netns, n: usize, every: usize, distinct_ports: bool) -> Duration {
    let path = std::env::temp_dir().join(format!("pal-revoke-bench-{}.txt", std::process::id()));
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("file"));
        for i in 0..n {
            let src = if i % every == every - 1 { Z } else { Y };
            let (sport, dport) = if distinct_ports {
                (1024 + i / 65000, 1 + i % 65000)
            } else {
                (1024 + i % 60000, 80 + i / 60000)
            };
            writeln!(
                f,
                "-I -p tcp --state ESTABLISHED -t 600 -s {src} -d {X} --sport {sport} --dport {dport}"
            )
            .expect("write");
        }
    }
    let start = Instant::now();
    let ok = Command::new("ip")
        .args(["netns", "exec", ns.name(), "conntrack", "-R"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let took = start.elapsed();
    let _ = std::fs::remove_file(&path);
    assert!(ok, "conntrack -R failed");
    took
}

fn main() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces, conntrack)");
        return;
    }
    let sizes: Vec<usize> = std::env::var("REVOKE_SIZES")
        .unwrap_or_else(|_| "1000,10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let denied_counts: Vec<usize> = std::env::var("REVOKE_DENIED")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let backends: Vec<String> = std::env::var("REVOKE_BACKENDS")
        .unwrap_or_else(|_| "netlink,tool".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let distinct_ports = match std::env::var("REVOKE_PORTS").as_deref() {
        Ok("distinct") => true,
        Ok("shared") | Err(_) => false,
        Ok(other) => panic!("REVOKE_PORTS={other:?}: shared or distinct"),
    };
    let st = cluster(
        vec![mk_node("n1", "10.9.6.0/24")],
        vec![
            mk_ns("x", &[("ns", "x")]),
            mk_ns("y", &[("ns", "y")]),
            mk_ns("z", &[("ns", "z")]),
        ],
        vec![
            mk_pod("x", "a", &[], X, "n1"),
            mk_pod("y", "b", &[], Y, "n1"),
            mk_pod("z", "c", &[], Z, "n1"),
        ],
        vec![mk_policy(
            "x",
            "from-y",
            json!({"podSelector": {}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        )],
    );
    let mut cfg = NodeConfig::new("n1");
    cfg.revoke_denied_connections = true;
    let payload = render(&compile(&st, &cfg));
    let pods: BTreeSet<IpAddr> = [X, Y, Z].iter().map(|s| s.parse().unwrap()).collect();
    println!(
        "| backend | entries | views | insert (conntrack -R) | list ms | trace ms | delete ms | revoke pass ms | denied | deleted | left |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    // A denied count above a tenth of the table would repeat the smaller one: skipped.
    let first = denied_counts.first().copied().unwrap_or(100);
    let mut runs = Vec::new();
    for &n in &sizes {
        for &d in denied_counts
            .iter()
            .filter(|d| **d == first || **d * 10 <= n)
        {
            for b in &backends {
                runs.push((n, d, b.clone()));
            }
        }
    }
    for (n, denied, backend) in runs {
        let ns = Netns::create("pal-rvkb").expect("netns");
        let every = (n / denied.clamp(1, n.max(1))).max(10);
        let insert = fill(&ns, n, every, distinct_ports);
        let ct: Box<dyn Conntrack> = match backend.as_str() {
            "netlink" => Box::new(NetlinkConntrack::in_netns(ns.name()).expect("ctnetlink")),
            "tool" => Box::new(KernelConntrack::in_netns(ns.name()).expect("conntrack")),
            other => panic!("unknown backend {other:?} (netlink or tool)"),
        };
        let t = Instant::now();
        let entries = ct.entries(Family::V4).expect("list");
        let list = t.elapsed();
        let views = entries
            .iter()
            .map(|e| (e.proto, e.filter_view()))
            .collect::<HashSet<_>>()
            .len();
        let ctx = RevokeContext {
            local_pods: pods.clone(),
            local_addrs: ct.local_addresses().expect("addresses"),
            interfaces: Default::default(),
        };
        let t = Instant::now();
        let tracer = Tracer::new(&payload).expect("tracer");
        let judged = revoke::denied(&tracer, &ctx, &entries)
            .expect("judge")
            .len();
        let trace = t.elapsed();
        let report = revoke_denied(ct.as_ref(), &payload, ctx).expect("revoke");
        assert_eq!(report.entries, n, "every inserted entry listed");
        assert_eq!(report.denied, judged);
        let left = ct.entries(Family::V4).expect("list").len();
        let delete = report.duration.saturating_sub(list + trace);
        assert_eq!(left, n - report.deleted, "only the denied entries deleted");
        println!(
            "| {backend} | {n} | {views} | {:.0} ms | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {left} |",
            ms(insert),
            ms(list),
            ms(trace),
            ms(delete),
            ms(report.duration),
            report.denied,
            report.deleted,
        );
        drop(ns);
    }
}
