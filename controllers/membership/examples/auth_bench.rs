//! Per-datagram cost of the membership's authentication: encoding (HMAC-SHA256 over the
//! datagram) and the receiver's full check (parse, key lookup, constant-time MAC verify,
//! source, clock, incarnation and replay checks), for short and maximal node names, and the
//! cost of rejecting a forged datagram (bad MAC), what a flood costs the receiver.
//!
//! ```text
//! cargo run --release -p palisade-membership --example auth_bench
//! ```
use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use palisade_membership::memberlist_key::{Key, KeyRing};
use palisade_membership::memberlist_wire::{encode, Context, Datagram, Guard, Kind};

const N: u64 = 200_000;
const RUNS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let key = Key::parse(b"0123456789abcdef0123456789abcdef").expect("key");
    let keys = KeyRing::new(Key::parse(b"0123456789abcdef0123456789abcdef").expect("key"));
    let from: IpAddr = [192, 0, 2, 2].into();
    let wall_ms = 1_800_000_000_000u64;
    println!("| datagram | bytes | encode (ns) | check, accepted (ns) | check, forged MAC rejected (ns) |");
    println!("|---|---:|---:|---:|---:|");
    for (label, node) in [
        ("node name 5 B", "node2".to_string()),
        ("node name 255 B", "n".repeat(255)),
    ] {
        let mut peers = BTreeMap::new();
        peers.insert(node.clone(), BTreeSet::from([from]));
        let mk = |seq: u64| Datagram {
            kind: Kind::Alive,
            node: node.clone(),
            incarnation: wall_ms * 1000,
            seq,
            timestamp_ms: wall_ms,
            reach: Vec::new(),
            owned: None,
        };
        let bytes = encode("palisade", &mk(0), &key).len();
        let (mut enc, mut ok, mut bad) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let t = Instant::now();
            for s in 0..N {
                black_box(encode("palisade", &mk(s), &key));
            }
            enc.push(t.elapsed().as_nanos() as f64 / N as f64);
            let data: Vec<Vec<u8>> = (1..=N).map(|s| encode("palisade", &mk(s), &key)).collect();
            let mut guard = Guard::new(Duration::from_secs(30));
            let now = tokio::time::Instant::now();
            let cx = Context {
                tag: "palisade",
                me: "node1",
                keys: &keys,
                peers: &peers,
                wall_ms,
                now,
            };
            let t = Instant::now();
            for d in &data {
                assert!(guard.check(d, from, &cx).is_ok());
            }
            ok.push(t.elapsed().as_nanos() as f64 / N as f64);
            let mut forged = data[0].clone();
            let last = forged.len() - 1;
            forged[last] ^= 1;
            let t = Instant::now();
            for _ in 0..N {
                assert!(guard.check(black_box(&forged), from, &cx).is_err());
            }
            bad.push(t.elapsed().as_nanos() as f64 / N as f64);
        }
        println!(
            "| {label} | {bytes} | {:.0} | {:.0} | {:.0} |",
            median(enc),
            median(ok),
            median(bad)
        );
    }
    println!("\n{N} datagrams per run, median of {RUNS} runs; times include building the datagram (encode) / nothing else (check).");
}
