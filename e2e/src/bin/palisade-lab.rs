//! `palisade-lab`: the lab for people.
//!
//! ```text
//! palisade-lab up [--nodes N]   build a lab with the x/y/z × a/b/c pods; keep it until Ctrl-C
//! palisade-lab clean [--all]    remove lab namespaces of runs that are gone (--all: every one)
//! ```
#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use nix::sys::signal::{SigSet, Signal};
use palisade_e2e::lab::{cleanup_all, cleanup_stale};
use palisade_e2e::netpol::{NAMESPACES, POD_NAMES};
use palisade_e2e::{Lab, LabSpec};

const USAGE: &str = "usage: palisade-lab up [--nodes N] | clean [--all]";

fn main() {
    if let Err(e) = run(std::env::args().skip(1).collect()) {
        eprintln!("palisade-lab: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Vec<String>) -> Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["clean"] => report(cleanup_stale()?),
        ["clean", "--all"] => report(cleanup_all()?),
        ["up"] => up(2),
        ["up", "--nodes", n] => up(n.parse().with_context(|| format!("--nodes {n}"))?),
        ["-h" | "--help" | "help"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}

fn report(removed: Vec<String>) -> Result<()> {
    for name in &removed {
        println!("removed {name}");
    }
    println!("{} lab namespace(s) removed", removed.len());
    Ok(())
}

fn up(nodes: usize) -> Result<()> {
    // Block the stop signals before any thread exists, so every thread inherits the mask and
    // the main thread receives them in `wait` below, then tears the lab down.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGHUP);
    stop.thread_block().context("blocking SIGINT/SIGTERM")?;

    let mut lab = Lab::new(LabSpec::new(nodes))?;
    let mut i = 0;
    for ns in NAMESPACES {
        for name in POD_NAMES {
            lab.add_pod(i % nodes + 1, ns, name, None)?;
            i += 1;
        }
    }
    println!("lab {} is up:", lab.prefix());
    for node in lab.nodes() {
        println!(
            "  {:<8} {:<15} pods {}  netns {}",
            node.name,
            node.ip,
            node.pod_cidr_text(),
            node.netns
        );
    }
    if let Some(client) = lab.client() {
        println!(
            "  {:<8} {:<15} netns {}",
            client.name, client.ip, client.netns
        );
    }
    for pod in lab.pods() {
        println!(
            "  {:<8} {:<15} on node{}  netns {}",
            pod.id(),
            pod.ip,
            pod.node,
            pod.netns
        );
    }
    println!(
        "pods serve TCP/UDP {:?} and receive SCTP INITs",
        lab.spec().ports
    );
    println!("explore with: ip netns exec <netns> bash    (Ctrl-C here removes the lab)");
    let signal = stop.wait().context("waiting for a signal")?;
    println!("{signal:?}: removing lab {}", lab.prefix());
    lab.teardown()
}
