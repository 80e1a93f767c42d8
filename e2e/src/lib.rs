//! The Palisade lab: a simulated bare-metal cluster in network namespaces, for tests and demos.
//!
//! ```text
//!   lab ──┬─ netns     named namespaces, `ip -n`, per-thread setns (root netns never touched)
//!         ├─ lab       LAN bridge, nodes, client, pods; Drop tears it all down
//!         ├─ api       control plane: the test API server inside a lab netns (or a relay to a
//!         │            real cluster) and a blocking JSON client
//!         ├─ kubelet   the lab plays kubelet, the EndpointSlice controller and kube-proxy
//!         ├─ l2        real-agent L2 harness: three agents, the client's ARP/NDP wire, TCP probers
//!         ├─ lab_cluster  lab + control plane + kubelet + one real `palisade agent` per node
//!         │            (`LabAgents`: the agents alone, for other harnesses; `http_get`)
//!         ├─ cluster   the `Cluster` trait the e2e scenarios are written against
//!         ├─ scenarios the e2e scenarios (tests/e2e_*.rs run them)
//!         ├─ kind      the same trait over kubectl/docker against a kind cluster
//!         ├─ demo      `palisade-lab demo`
//!         ├─ server    in-process TCP/UDP/SCTP-INIT servers per endpoint, with a log
//!         ├─ probe     parallel TCP/UDP/SCTP probes from any namespace
//!         ├─ sctp      hand-built INIT packets (no kernel SCTP needed)
//!         ├─ matrix    reachability truth tables and their diffs
//!         ├─ process   processes started inside lab namespaces (CLI, agents, API server)
//!         ├─ saturate  every CPU busy (busy threads) for the tests under load
//!         ├─ k8s       Kubernetes manifests (Nodes, Namespaces, Pods) written from the lab
//!         └─ netpol    the upstream-style x/y/z × a/b/c NetworkPolicy harness
//!
//!   bin/palisade-lab   `demo`, `up` (a cluster for people, until Ctrl-C), `clean` (leftovers)
//! ```
//!
//! Lab tests need root. Call [`lab_ready`] first: it prints `skipped: ...` and returns false
//! where the lab cannot run (not root; tools missing outside CI), and panics under `CI=true`
//! when a tool is missing.
#![forbid(unsafe_code)]

pub mod api;
pub mod cluster;
pub mod demo;
pub mod k8s;
pub mod kind;
pub mod kubelet;
pub mod l2;
pub mod lab;
pub mod lab_cluster;
pub mod matrix;
pub mod netns;
pub mod netpol;
pub mod probe;
pub mod process;
pub mod saturate;
pub mod scenarios;
pub mod sctp;
pub mod server;

pub use cluster::{poll, ApiOutage, Cluster, Peer};
pub use lab::{Endpoint, Lab, LabSpec, NodeHandle, PodHandle};
pub use lab_cluster::{http_get, http_get_in, metric_value, LabAgents, LabCluster, LabClusterSpec};
pub use matrix::Matrix;
pub use probe::Outcome;
pub use process::LabProcess;
pub use server::{Protocol, ServerLog};

/// Tools the lab and the netpol tests run.
pub const REQUIRED_TOOLS: [&str; 5] = [
    "ip",
    "iptables",
    "iptables-save",
    "ipset",
    "iptables-restore",
];

/// Whether `program` is an executable file on `PATH`.
pub fn on_path(program: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(program))
            .map(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
            .unwrap_or(false)
    })
}

/// Whether this run is under CI (`CI=true`).
pub fn under_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Whether the lab can run here. Prints `skipped: <test> needs root (network namespaces)` when
/// not root, and `skipped: <test> needs <tools>` when tools are missing outside CI; under CI a
/// missing tool is a failure (panic), since CI installs them.
pub fn lab_ready(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: {test} needs root (network namespaces)");
        return false;
    }
    let missing: Vec<&str> = REQUIRED_TOOLS
        .iter()
        .copied()
        .filter(|t| !on_path(t))
        .collect();
    if !missing.is_empty() {
        if under_ci() {
            panic!("{test}: missing tools under CI: {}", missing.join(", "));
        }
        println!("skipped: {test} needs {}", missing.join(", "));
        return false;
    }
    true
}
