//! Offline CLI input at scale: parse + compile time of the synthetic 13,103-object cluster
//! (`palisade_netpol::synthetic`) per input format; the two YAML forms once more with the
//! fast reader off (every document through serde-saphyr), for comparison.
//!
//! ```text
//! cargo run --release -p palisade-netpol --example manifests_bench
//! ```

use std::time::{Duration, Instant};

use palisade_netpol::synthetic::{build_cluster, dumps, NODE};
use palisade_netpol::{compile, manifests, render, ClusterState, NodeConfig};

const RUNS: usize = 5;

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let cluster = build_cluster().state;
    let d = dumps(&cluster);
    let cfg = NodeConfig::new(NODE);
    let split_bytes: usize = d.split.iter().map(String::len).sum();
    type Parser = fn(&str) -> Result<ClusterState, palisade_netpol::ManifestError>;
    let general: Parser = manifests::parse_yaml_general_only;
    let forms: Vec<(String, Vec<&str>, usize, Parser)> = vec![
        (
            "multi-document YAML".into(),
            vec![d.multi_yaml.as_str()],
            d.multi_yaml.len(),
            manifests::parse,
        ),
        (
            "one YAML List".into(),
            vec![d.yaml_list.as_str()],
            d.yaml_list.len(),
            manifests::parse,
        ),
        (
            "one JSON List".into(),
            vec![d.json_list.as_str()],
            d.json_list.len(),
            manifests::parse,
        ),
        (
            format!("{} split YAML files", d.split.len()),
            d.split.iter().map(String::as_str).collect(),
            split_bytes,
            manifests::parse,
        ),
        (
            "multi-document YAML, serde-saphyr only".into(),
            vec![d.multi_yaml.as_str()],
            d.multi_yaml.len(),
            general,
        ),
        (
            "one YAML List, serde-saphyr only".into(),
            vec![d.yaml_list.as_str()],
            d.yaml_list.len(),
            general,
        ),
    ];
    println!("| input (13,103 objects) | size | parse | compile + render | total |");
    println!("|---|---|---|---|---|");
    for (name, files, bytes, parse) in forms {
        let (mut parse_t, mut compile_t) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let t = Instant::now();
            let mut st = ClusterState::default();
            for f in &files {
                st.merge(parse(f).expect("parses"));
            }
            parse_t.push(t.elapsed());
            let t = Instant::now();
            let p = render(&compile(&st, &cfg));
            compile_t.push(t.elapsed());
            assert!(p.stats.rules > 0);
        }
        parse_t.sort();
        compile_t.sort();
        let (p, c) = (parse_t[RUNS / 2], compile_t[RUNS / 2]);
        println!(
            "| {name} | {:.1} MB | {} | {} | {} |",
            bytes as f64 / 1e6,
            ms(p),
            ms(c),
            ms(p + c)
        );
    }
    println!("(median of {RUNS} runs each)");
}
