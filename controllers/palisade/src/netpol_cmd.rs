//! `palisade netpol compile|apply --manifests PATH... --node NAME`: the agent's NetworkPolicy
//! path, driven by YAML files instead of a cluster.
//!
//! ```text
//!  files/dirs (*.yaml, *.yml, *.json; recursive, sorted) ─► manifests::parse ─► merge
//!        ─► compile(node) ─► render ─┬─ compile: print both payloads (stdout), diagnostics (stderr)
//!                                    └─ apply:   KernelExecutor (current netns), report (stderr)
//! ```
//! Re-running `apply` with other manifests converges: chains and sets of ours the new
//! payload does not have are deleted.

use std::io::Read as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use palisade_dataplane::{pod_interfaces, Executor, KernelExecutor, KernelLinks};
use palisade_netpol::{
    compile, manifests, render, ClusterState, Family, IpNetwork, NodeConfig, PodInterface,
};

#[derive(Subcommand, Debug)]
pub enum NetpolCmd {
    /// Print the ipset and iptables-restore payloads the agent would apply on a node.
    /// Touches nothing.
    Compile(Args),
    /// Apply the payloads once to the current network namespace, then exit.
    Apply(Args),
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// YAML or JSON files or directories (searched recursively for *.yaml, *.yml and
    /// *.json, in sorted order); `-` reads standard input. Any number of documents per file
    /// and `kind: List` dumps of any size (`kubectl get ... -o yaml|json`). Objects read: Pods, Namespaces, Nodes,
    /// NetworkPolicies, ClusterNetworkPolicies (policy.networking.k8s.io/v1alpha2); other
    /// kinds are skipped. A later object with the same name wins.
    #[arg(long, required = true, num_args = 1..)]
    pub manifests: Vec<PathBuf>,

    /// The node to compile for (its pods are the ones programmed).
    #[arg(long, env = "NODE_NAME")]
    pub node: String,

    /// Drop traffic of pods in the node's pod CIDR that the manifests do not contain.
    #[arg(long, env = "PALISADE_BLOCK_UNKNOWN_PODS", default_value_t = true, action = clap::ArgAction::Set)]
    pub block_unknown_pods: bool,

    /// Drop packets entering from a local pod's interface with another source address.
    /// The interfaces come from `--pod-interface`, or else from this machine's kernel
    /// (routes, neighbours, bridge FDB).
    #[arg(long, env = "PALISADE_ANTI_SPOOFING", default_value_t = true, action = clap::ArgAction::Set)]
    pub anti_spoofing: bool,

    /// A local pod's interface, `IP=IF` (routed: the pod's veth) or `IP=bridge:PORT`
    /// (bridged: the pod's bridge port). Given at least once, the kernel is not read.
    #[arg(long = "pod-interface", value_name = "IP=[bridge:]IF", value_parser = parse_pod_interface)]
    pub pod_interfaces: Vec<(IpAddr, PodInterface)>,

    /// Extra pod CIDRs of the node (when the Node object has no spec.podCIDRs).
    #[arg(long = "pod-cidr", value_name = "CIDR")]
    pub pod_cidrs: Vec<IpNetwork>,

    /// Address family: `ipv4` (iptables) or `ipv6` (ip6tables). A dual-stack node needs
    /// both; the agent does both by itself.
    #[arg(long, default_value = "ipv4", value_parser = ["ipv4", "ipv6"])]
    pub family: String,

    /// iptables backend for `apply`: auto-detect, or force nft / legacy.
    #[arg(long, env = "PALISADE_IPTABLES_BACKEND", default_value = "auto",
          value_parser = ["auto", "nft", "legacy"])]
    pub iptables_backend: String,
}

/// Runs a `palisade netpol` subcommand.
pub fn run(cmd: NetpolCmd) -> Result<()> {
    match cmd {
        NetpolCmd::Compile(args) => {
            let payload = build(&args)?;
            print!(
                "# ---- ipset restore (ipset -exist restore) ----\n{}\
                 # ---- iptables restore (iptables-restore --noflush) ----\n{}",
                payload.ipset_restore, payload.iptables_restore
            );
            let s = payload.stats;
            eprintln!(
                "node {}: {} rules in {} chains, {} sets with {} members, {} bytes",
                args.node, s.rules, s.chains, s.sets, s.members, s.bytes
            );
            Ok(())
        }
        NetpolCmd::Apply(args) => {
            let payload = build(&args)?;
            let exec = KernelExecutor::for_family(family(&args), &args.iptables_backend, None)
                .context("cannot find the iptables/ipset tools")?;
            let r = exec
                .apply(&payload)
                .context("applying the payload failed; the previous rules are still in force")?;
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            let s = payload.stats;
            if r.changed {
                eprintln!(
                    "node {}: applied {} rules in {} chains, {} sets ({} created, {} updated, {} stale destroyed), \
                     {} stale chains deleted, {} hooks fixed, in {} ms ({:?} backend)",
                    args.node,
                    s.rules,
                    s.chains,
                    s.sets,
                    r.sets_created,
                    r.sets_updated,
                    r.sets_destroyed,
                    r.chains_deleted,
                    r.hooks_fixed,
                    r.total_duration.as_millis(),
                    exec.backend()
                );
            } else {
                eprintln!(
                    "node {}: already up to date ({} rules, {} sets; checked in {} ms)",
                    args.node,
                    s.rules,
                    s.sets,
                    r.total_duration.as_millis()
                );
            }
            Ok(())
        }
    }
}

/// `IP=IF` or `IP=bridge:IF`.
fn parse_pod_interface(s: &str) -> Result<(IpAddr, PodInterface), String> {
    let (ip, dev) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected IP=IF or IP=bridge:IF"))?;
    let ip: IpAddr = ip.parse().map_err(|e| format!("{ip:?}: {e}"))?;
    let iface = match dev.strip_prefix("bridge:") {
        Some(port) => PodInterface::BridgePort(port.to_string()),
        None => PodInterface::Routed(dev.to_string()),
    };
    if !PodInterface::valid_name(iface.name()) {
        return Err(format!("{:?} is not a usable interface name", iface.name()));
    }
    Ok((ip, iface))
}

fn family(args: &Args) -> Family {
    if args.family == "ipv6" {
        Family::V6
    } else {
        Family::V4
    }
}

/// Reads the manifests, compiles for the node, prints diagnostics, renders.
fn build(args: &Args) -> Result<palisade_netpol::Payload> {
    let state = load(&args.manifests)?;
    let mut cfg = NodeConfig::new(args.node.clone());
    cfg.block_unknown_pods = args.block_unknown_pods;
    cfg.extra_pod_cidrs = args.pod_cidrs.clone();
    cfg.family = family(args);
    cfg.anti_spoofing = args.anti_spoofing;
    if args.anti_spoofing {
        cfg.pod_interfaces = if args.pod_interfaces.is_empty() {
            let ips = palisade_netpol::local_pod_ips(&state, &args.node, cfg.family);
            match KernelLinks::detect().and_then(|l| pod_interfaces(&l, &ips)) {
                Ok(found) => found,
                Err(e) => {
                    eprintln!("warning: cannot read pod interfaces from the kernel: {e}");
                    Default::default()
                }
            }
        } else {
            args.pod_interfaces.iter().cloned().collect()
        };
    }
    let compiled = compile(&state, &cfg);
    for d in &compiled.diagnostics {
        eprintln!("warning: {d}");
    }
    Ok(render(&compiled))
}

fn load(paths: &[PathBuf]) -> Result<ClusterState> {
    let mut state = ClusterState::default();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading manifests from stdin")?;
            state.merge(manifests::parse(&text).context("<stdin>")?);
            continue;
        }
        let files = yaml_files(path)?;
        for f in files {
            let text =
                std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            state.merge(manifests::parse(&text).with_context(|| f.display().to_string())?);
        }
    }
    Ok(state)
}

/// A file as given, or the *.yaml / *.yml / *.json files below a directory, sorted by path.
fn yaml_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !meta.is_dir() {
        bail!("{} is neither a file nor a directory", path.display());
    }
    let mut out = Vec::new();
    walk(path, 0, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    if depth > 32 {
        bail!(
            "{}: directories nested too deep (symlink loop?)",
            dir.display()
        );
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let path = entry?.path();
        let meta = std::fs::metadata(&path).with_context(|| format!("{}", path.display()))?;
        if meta.is_dir() {
            walk(&path, depth + 1, out)?;
        } else if meta.is_file()
            && matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: NetpolCmd,
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "x",
            "compile",
            "--manifests",
            "a.yaml",
            "dir",
            "--node",
            "n1",
            "--pod-cidr",
            "10.244.1.0/24",
        ])
        .unwrap();
        let NetpolCmd::Compile(a) = cli.cmd else {
            panic!("compile")
        };
        assert_eq!(a.manifests.len(), 2);
        assert_eq!(a.node, "n1");
        assert!(a.block_unknown_pods);
        assert!(a.anti_spoofing);
        assert!(a.pod_interfaces.is_empty());
        assert_eq!(a.pod_cidrs.len(), 1);
        assert_eq!(family(&a), Family::V4);
        assert!(Cli::try_parse_from(["x", "apply", "--node", "n1"]).is_err());
        let six = Cli::try_parse_from([
            "x",
            "compile",
            "--manifests",
            "a.yaml",
            "--node",
            "n1",
            "--family",
            "ipv6",
        ])
        .unwrap();
        let NetpolCmd::Compile(a) = six.cmd else {
            panic!("compile")
        };
        assert_eq!(family(&a), Family::V6);
        assert!(Cli::try_parse_from([
            "x",
            "compile",
            "--manifests",
            "a.yaml",
            "--node",
            "n1",
            "--family",
            "inet6"
        ])
        .is_err());
    }

    #[test]
    fn directories_are_read_recursively_and_sorted() {
        let dir = std::env::temp_dir().join(format!("palisade-netpol-cmd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let ns = |name: &str, team: &str| {
            format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{team: {team}}}}}\n")
        };
        std::fs::write(dir.join("b.yaml"), ns("x", "b")).unwrap();
        std::fs::write(dir.join("a.yml"), ns("x", "a")).unwrap();
        std::fs::write(dir.join("sub/c.yaml"), ns("y", "c")).unwrap();
        std::fs::write(dir.join("notes.txt"), "not yaml: [").unwrap();
        let files = yaml_files(&dir).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.strip_prefix(&dir).unwrap().display().to_string())
            .collect();
        assert_eq!(names, vec!["a.yml", "b.yaml", "sub/c.yaml"]);
        let state = load(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(state.namespaces.len(), 2);
        // b.yaml comes after a.yml: its labels win.
        let x = &state.namespaces[0];
        assert_eq!(x.metadata.labels.as_ref().unwrap()["team"], "b");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pod_interfaces_parse() {
        let cli = Cli::try_parse_from([
            "x",
            "compile",
            "--manifests",
            "a.yaml",
            "--node",
            "n1",
            "--anti-spoofing=false",
            "--pod-interface",
            "10.244.1.5=veth1",
            "--pod-interface",
            "fd00::5=bridge:vethb",
        ])
        .unwrap();
        let NetpolCmd::Compile(a) = cli.cmd else {
            panic!("compile")
        };
        assert!(!a.anti_spoofing);
        assert_eq!(
            a.pod_interfaces,
            vec![
                (
                    "10.244.1.5".parse().unwrap(),
                    PodInterface::Routed("veth1".into())
                ),
                (
                    "fd00::5".parse().unwrap(),
                    PodInterface::BridgePort("vethb".into())
                ),
            ]
        );
        for bad in [
            "10.244.1.5",
            "x=veth1",
            "10.244.1.5=bad name",
            "10.244.1.5=bridge:",
        ] {
            assert!(parse_pod_interface(bad).is_err(), "{bad}");
        }
    }
}
