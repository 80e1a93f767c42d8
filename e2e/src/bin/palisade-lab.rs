//! `palisade-lab`: the lab for people.
//!
//! ```text
//! palisade-lab demo [--kubeconfig PATH] [--examples DIR]
//!                              the demo (make demo): a 3-node lab cluster with real agents,
//!                              NetworkPolicies and a LoadBalancer IP, then everything removed
//! palisade-lab up [--nodes N] [--bare] [--kubeconfig PATH]
//!                              a lab cluster (control plane, lab kubelet, one agent per node)
//!                              with the x/y/z × a/b/c pods, kept until Ctrl-C; --bare: only
//!                              namespaces and pods, no control plane or agents
//! palisade-lab clean [--all]   remove lab namespaces of runs that are gone (--all: every one)
//! ```
//!
//! SIGINT, SIGTERM and SIGHUP are blocked in every thread and taken by one signal thread:
//! `up` tears its lab down in order; the demo (which never waits for anything unbounded, but
//! may be in the middle of a step) is stopped at once: every process in its namespaces is
//! killed and the namespaces removed, then the program exits with 130.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{SigSet, Signal};
use palisade_e2e::cluster::Cluster;
use palisade_e2e::demo::{self, DemoOptions};
use palisade_e2e::lab::{cleanup_all, cleanup_own, cleanup_stale};
use palisade_e2e::netpol::{NAMESPACES, POD_NAMES};
use palisade_e2e::{k8s, Lab, LabCluster, LabClusterSpec, LabSpec, PodHandle};

const USAGE: &str = "usage: palisade-lab demo [--kubeconfig PATH] [--examples DIR]\n\
                     \x20      palisade-lab up [--nodes N] [--bare] [--kubeconfig PATH]\n\
                     \x20      palisade-lab clean [--all]";

fn main() {
    if let Err(e) = run(std::env::args().skip(1).collect()) {
        eprintln!("palisade-lab: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Vec<String>) -> Result<()> {
    let Some((command, rest)) = args.split_first() else {
        bail!("{USAGE}");
    };
    let mut nodes = 2usize;
    let mut bare = false;
    let mut kubeconfig = None;
    let mut examples = None;
    let mut all = false;
    let mut it = rest.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--nodes" => nodes = value("--nodes")?.parse().context("--nodes")?,
            "--bare" => bare = true,
            "--all" => all = true,
            "--kubeconfig" => kubeconfig = Some(PathBuf::from(value("--kubeconfig")?)),
            "--examples" => examples = Some(PathBuf::from(value("--examples")?)),
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    match command.as_str() {
        "clean" if all => report(cleanup_all()?),
        "clean" => report(cleanup_stale()?),
        "demo" => {
            preflight()?;
            let _signals = Signals::start(false)?;
            demo::run(&DemoOptions {
                kubeconfig,
                examples,
            })
        }
        "up" if bare => {
            preflight()?;
            let signals = Signals::start(true)?;
            up_bare(nodes, &signals)
        }
        "up" => {
            preflight()?;
            let signals = Signals::start(true)?;
            up(nodes, kubeconfig, &signals)
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}

fn preflight() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab needs root (it builds network namespaces); try: sudo make demo");
    }
    let missing: Vec<&str> = palisade_e2e::REQUIRED_TOOLS
        .iter()
        .copied()
        .filter(|t| !palisade_e2e::on_path(t))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools: {} (make deps installs them)",
            missing.join(", ")
        );
    }
    Ok(())
}

fn report(removed: Vec<String>) -> Result<()> {
    for name in &removed {
        println!("removed {name}");
    }
    println!("{} lab namespace(s) removed", removed.len());
    Ok(())
}

/// The signal thread. Graceful: it raises `stop` and gives the main thread 20 s to tear down
/// before the emergency exit; otherwise the emergency exit is immediate.
struct Signals {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
}

impl Signals {
    fn start(graceful: bool) -> Result<Signals> {
        // Blocked before any other thread exists, so every thread inherits the mask.
        let mut set = SigSet::empty();
        set.add(Signal::SIGINT);
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGHUP);
        set.thread_block()
            .context("blocking SIGINT/SIGTERM/SIGHUP")?;
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let (s, d) = (stop.clone(), done.clone());
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let Ok(signal) = set.wait() else { return };
                s.store(true, Ordering::SeqCst);
                if graceful {
                    for _ in 0..200 {
                        if d.load(Ordering::SeqCst) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                eprintln!("\n{signal:?}: stopping; killing the lab's processes and removing its namespaces ...");
                match cleanup_own() {
                    Ok(removed) => eprintln!("removed {} namespace(s)", removed.len()),
                    Err(e) => eprintln!("cleanup failed: {e:#} (run: palisade-lab clean)"),
                }
                std::process::exit(130);
            })
            .context("spawning the signal thread")?;
        Ok(Signals { stop, done })
    }

    fn wait(&self) {
        // Bounded only by the user: `up` runs until a signal comes.
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn up(nodes: usize, kubeconfig: Option<PathBuf>, signals: &Signals) -> Result<()> {
    let mut spec = LabClusterSpec::new(nodes);
    spec.kubeconfig = kubeconfig;
    let mut c = LabCluster::start(spec)?;
    let names = c.node_names();
    let mut i = 0;
    for ns in NAMESPACES {
        c.apply(&k8s::namespace(ns, &k8s::labels([("ns", ns)])))?;
        for name in POD_NAMES {
            let labels = k8s::labels([("pod", name)]);
            c.apply(&c.pod_manifest(ns, name, &labels, &names[i % nodes]))?;
            i += 1;
        }
    }
    let ids: Vec<String> = NAMESPACES
        .iter()
        .flat_map(|ns| POD_NAMES.iter().map(move |n| format!("{ns}/{n}")))
        .collect();
    c.wait_pods_ready(&ids, Duration::from_secs(60))?;
    let kubeconfig = c.control_plane().agent_kubeconfig().display().to_string();
    println!("lab cluster {} is up:", c.prefix());
    println!(
        "  {:<8} {:<15} Kubernetes API {}  netns {}",
        "cp",
        "198.51.100.2",
        c.control_plane().url(),
        c.cp_netns()
    );
    for node in c.nodes().to_vec() {
        println!(
            "  {:<8} {:<15} pods {}  agent :9476  netns {}",
            node.name,
            node.ip,
            node.pod_cidr_text(),
            node.netns
        );
    }
    println!(
        "  {:<8} {:<15} netns {}",
        "client",
        c.client().ip,
        c.client().netns
    );
    let mut pods = c.lab().pods().to_vec();
    pods.sort_by_key(|p| p.id());
    print_pods(&pods);
    println!(
        "the API is reachable only inside the lab (JSON only, no OpenAPI), e.g. with kubectl:"
    );
    println!(
        "  ip netns exec {} kubectl --kubeconfig {kubeconfig} get pods -A -o wide",
        c.cp_netns()
    );
    println!(
        "  ip netns exec {} kubectl --kubeconfig {kubeconfig} apply --validate=false -f examples/netpol/",
        c.cp_netns()
    );
    println!(
        "  ip netns exec {}-x-a bash        (a pod's shell; Ctrl-C here removes the lab)",
        c.prefix()
    );
    println!(
        "agent logs: {}/agent-node*.log",
        c.lab().tmp_dir().display()
    );
    signals.wait();
    println!("removing lab {}", c.prefix());
    drop(c);
    signals.done.store(true, Ordering::SeqCst);
    Ok(())
}

/// One line per pod of the `up` listings.
fn print_pods(pods: &[PodHandle]) {
    for pod in pods {
        println!(
            "  {:<8} {:<15} on node{}  netns {}",
            pod.id(),
            pod.ip,
            pod.node,
            pod.netns
        );
    }
}

fn up_bare(nodes: usize, signals: &Signals) -> Result<()> {
    let mut lab = Lab::new(LabSpec::new(nodes))?;
    let mut i = 0;
    for ns in NAMESPACES {
        for name in POD_NAMES {
            lab.add_pod(i % nodes + 1, ns, name, None)?;
            i += 1;
        }
    }
    println!("lab {} is up (no control plane, no agents):", lab.prefix());
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
    print_pods(lab.pods());
    println!(
        "pods serve TCP/UDP {:?} and receive SCTP INITs",
        lab.spec().ports
    );
    println!("explore with: ip netns exec <netns> bash    (Ctrl-C here removes the lab)");
    signals.wait();
    println!("removing lab {}", lab.prefix());
    let result = lab.teardown();
    signals.done.store(true, Ordering::SeqCst);
    result
}
