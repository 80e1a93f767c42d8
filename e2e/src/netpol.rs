//! The NetworkPolicy harness: upstream's x/y/z × a/b/c model on a two-node lab, driven through
//! the `palisade netpol apply` CLI, and checked with real packets.
//!
//! ```text
//!   node1: x/a x/c y/b z/a z/c        node2: x/b y/a y/c z/b
//!   namespaces x, y, z   labels ns=<name> (+ kubernetes.io/metadata.name)
//!   pods a, b, c         labels pod=<name>; containers cont-<port>-<proto> with named ports
//!                        serve-<port>-<proto> for ports 80, 81 and TCP, UDP, SCTP
//! ```
//!
//! A scenario sets policies (and maybe relabels), calls [`Cluster::apply`] — which writes the
//! manifests and runs `palisade netpol apply --manifests DIR --node nodeN` inside every node's
//! namespace — and compares the probed 9×9 matrix with an expectation written from the
//! scenario's intent ([`Cluster::expect`]). A pod reaching itself goes over its own loopback and
//! never crosses a node, so the diagonal is always expected reachable (upstream's
//! `AllowLoopback`).
//!
//! Also here: locating the `palisade` binary, and [`snapshot`], the normalised
//! `iptables-save` + `ipset save` of a namespace used to compare dataplane states.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::k8s::{self, Labels, NamedPort};
use crate::lab::{Endpoint, Lab, LabSpec, NodeHandle, PodHandle};
use crate::matrix::Matrix;
use crate::server::Protocol;

/// Namespaces of the model.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// Pod names in every namespace.
pub const POD_NAMES: [&str; 3] = ["a", "b", "c"];
/// Ports every pod serves (TCP, UDP and SCTP).
pub const PORTS: [u16; 2] = [80, 81];
/// How long one `palisade netpol apply` may take before the harness gives up.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// The `palisade` binary: `$PALISADE_BIN`, else `palisade` next to the test executable's
/// directory (`target/debug/deps/<test>` → `target/debug/palisade`). Build it first with
/// `cargo build -p palisade`.
pub fn palisade_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("PALISADE_BIN") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("PALISADE_BIN={} does not exist", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut candidates = Vec::new();
    for dir in exe.ancestors().skip(1).take(2) {
        candidates.push(dir.join("palisade"));
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "the palisade binary is not built (looked at {}); run `cargo build -p palisade` \
                 first or set PALISADE_BIN",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// Runs `palisade netpol apply --manifests DIR --node NODE_NAME` inside `netns` and waits
/// (bounded by [`APPLY_TIMEOUT`]). Returns its output; a failure carries it.
pub fn run_apply(
    lab: &Lab,
    bin: &Path,
    netns: &str,
    dir: &Path,
    node_name: &str,
    log: &str,
) -> Result<String> {
    let argv = apply_argv(bin, dir, node_name);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut process = lab.spawn_in(netns, log, &argv)?;
    finish_apply(&mut process, netns)
}

/// The argv of an apply.
pub fn apply_argv(bin: &Path, dir: &Path, node_name: &str) -> Vec<String> {
    vec![
        bin.display().to_string(),
        "netpol".into(),
        "apply".into(),
        "--manifests".into(),
        dir.display().to_string(),
        "--node".into(),
        node_name.into(),
    ]
}

fn finish_apply(process: &mut crate::LabProcess, netns: &str) -> Result<String> {
    let status = process.wait_timeout(APPLY_TIMEOUT)?;
    let output = process.output();
    match status {
        Some(s) if s.success() => Ok(output),
        Some(s) => bail!("palisade netpol apply in {netns} failed ({s}):\n{output}"),
        None => {
            process.kill()?;
            bail!("palisade netpol apply in {netns} did not finish within {APPLY_TIMEOUT:?}:\n{output}")
        }
    }
}

/// `iptables-save` with comments and counters dropped and chains in a stable order; rules
/// keep their order within a chain (that order is meaningful).
pub fn normalize_iptables_save(text: &str) -> String {
    #[derive(Default)]
    struct Table {
        chains: BTreeSet<String>,
        rules: BTreeMap<String, Vec<String>>,
    }
    let mut tables: BTreeMap<String, Table> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim_end) {
        if line.is_empty() || line.starts_with('#') || line == "COMMIT" {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            tables.entry(name.to_string()).or_default();
            current = Some(name.to_string());
            continue;
        }
        let table = tables
            .entry(current.clone().unwrap_or_default())
            .or_default();
        if let Some(decl) = line.strip_prefix(':') {
            let mut parts = decl.split_whitespace();
            let (name, policy) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            table.chains.insert(format!(":{name} {policy}"));
        } else {
            let chain = line
                .strip_prefix("-A ")
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("");
            table
                .rules
                .entry(chain.to_string())
                .or_default()
                .push(line.to_string());
        }
    }
    let mut out = String::new();
    for (name, table) in tables {
        out.push_str(&format!("*{name}\n"));
        for chain in table.chains {
            out.push_str(&chain);
            out.push('\n');
        }
        for rules in table.rules.values() {
            for rule in rules {
                out.push_str(rule);
                out.push('\n');
            }
        }
    }
    out
}

/// `ipset save` with the tuning values that vary between equal sets (`hashsize`, `bucketsize`,
/// the random `initval`) dropped and the lines sorted (members of a hash set have no order).
pub fn normalize_ipset_save(text: &str) -> String {
    let mut lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| {
            if !line.starts_with("create ") {
                return line.to_string();
            }
            let mut kept = Vec::new();
            let mut tokens = line.split_whitespace();
            while let Some(token) = tokens.next() {
                if matches!(token, "hashsize" | "bucketsize" | "initval") {
                    tokens.next();
                } else {
                    kept.push(token);
                }
            }
            kept.join(" ")
        })
        .collect();
    lines.sort();
    lines.join("\n") + "\n"
}

/// The normalised dataplane state of a namespace: `iptables-save` and `ipset save`.
pub fn snapshot(lab: &Lab, netns: &str) -> Result<String> {
    let iptables = lab.exec_ok(netns, &["iptables-save"])?;
    let ipset = lab.exec_ok(netns, &["ipset", "save"])?;
    Ok(format!(
        "## iptables\n{}## ipset\n{}",
        normalize_iptables_save(&iptables),
        normalize_ipset_save(&ipset)
    ))
}

/// A line diff of two texts (lines only in `a` as `-`, only in `b` as `+`), for messages.
pub fn line_diff(a: &str, b: &str) -> String {
    let left: BTreeSet<&str> = a.lines().collect();
    let right: BTreeSet<&str> = b.lines().collect();
    let mut out = String::new();
    for l in left.difference(&right) {
        out.push_str(&format!("- {l}\n"));
    }
    for l in right.difference(&left) {
        out.push_str(&format!("+ {l}\n"));
    }
    if out.is_empty() && a != b {
        out.push_str("(same lines, different order)\n");
    }
    out
}

/// A pod of the model, as an expectation sees it.
#[derive(Clone, Copy, Debug)]
pub struct PodRef<'a> {
    pub ns: &'a str,
    pub name: &'a str,
    pub node: usize,
    pub ip: Ipv4Addr,
}

impl PodRef<'_> {
    /// Whether this is the pod `ns/name`.
    pub fn is(&self, id: &str) -> bool {
        id.split_once('/') == Some((self.ns, self.name))
    }
}

/// The container ports every model pod declares.
pub fn model_ports() -> Vec<NamedPort> {
    let mut ports = Vec::new();
    for port in PORTS {
        for protocol in Protocol::ALL {
            ports.push(NamedPort::upstream(port, protocol));
        }
    }
    ports
}

/// The x/y/z × a/b/c model on a two-node lab.
pub struct Cluster {
    lab: Lab,
    bin: PathBuf,
    ns_labels: BTreeMap<String, Labels>,
    pod_labels: BTreeMap<String, Labels>,
    hidden: BTreeSet<String>,
    extra_ports: BTreeMap<String, Vec<NamedPort>>,
    policies: Vec<Value>,
    extra: Vec<Value>,
    manifests: PathBuf,
    applies: usize,
}

impl Cluster {
    /// Builds the lab (2 nodes, client, 9 pods) and finds the `palisade` binary. Applies nothing.
    pub fn new() -> Result<Cluster> {
        let bin = palisade_bin()?;
        let mut lab = Lab::new(LabSpec::new(2))?;
        let mut ns_labels = BTreeMap::new();
        let mut pod_labels = BTreeMap::new();
        let mut i = 0;
        for ns in NAMESPACES {
            ns_labels.insert(ns.to_string(), k8s::labels([("ns", ns)]));
            for name in POD_NAMES {
                lab.add_pod(i % 2 + 1, ns, name, None)?;
                pod_labels.insert(format!("{ns}/{name}"), k8s::labels([("pod", name)]));
                i += 1;
            }
        }
        let manifests = lab.tmp_dir().join("manifests");
        Ok(Cluster {
            lab,
            bin,
            ns_labels,
            pod_labels,
            hidden: BTreeSet::new(),
            extra_ports: BTreeMap::new(),
            policies: Vec::new(),
            extra: Vec::new(),
            manifests,
            applies: 0,
        })
    }

    /// The lab underneath.
    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// The lab underneath, mutably (e.g. to add a pod).
    pub fn lab_mut(&mut self) -> &mut Lab {
        &mut self.lab
    }

    /// The `palisade` binary in use.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Every lab pod as a probe endpoint, in model order (x/a, x/b, ... z/c, then extras).
    pub fn pods(&self) -> Vec<Endpoint> {
        self.lab.pods().iter().map(PodHandle::endpoint).collect()
    }

    /// The pod `ns/name`.
    pub fn pod(&self, id: &str) -> Result<&PodHandle> {
        let (ns, name) = id
            .split_once('/')
            .with_context(|| format!("{id} is not ns/name"))?;
        self.lab.pod(ns, name)
    }

    /// Replaces the NetworkPolicies (objects from [`k8s::network_policy`]).
    pub fn set_policies(&mut self, policies: Vec<Value>) {
        self.policies = policies;
    }

    /// Extra objects written along with the model (e.g. more namespaces).
    pub fn set_extra_objects(&mut self, objects: Vec<Value>) {
        self.extra = objects;
    }

    /// Sets (or with `None` removes) a label of the pod `ns/name`.
    pub fn set_pod_label(&mut self, id: &str, key: &str, value: Option<&str>) {
        let labels = self.pod_labels.entry(id.to_string()).or_default();
        match value {
            Some(v) => labels.insert(key.into(), v.into()),
            None => labels.remove(key),
        };
    }

    /// Sets (or with `None` removes) a label of namespace `ns`.
    pub fn set_namespace_label(&mut self, ns: &str, key: &str, value: Option<&str>) {
        let labels = self.ns_labels.entry(ns.to_string()).or_default();
        match value {
            Some(v) => labels.insert(key.into(), v.into()),
            None => labels.remove(key),
        };
    }

    /// Declares more named container ports on the pod `ns/name` (besides the model's
    /// `serve-<port>-<proto>`), e.g. one name that means port 80 on one pod and 81 on another.
    pub fn set_extra_ports(&mut self, id: &str, ports: Vec<NamedPort>) {
        self.extra_ports.insert(id.to_string(), ports);
    }

    /// Leaves the lab pod `ns/name` out of (or puts it back into) the manifests: the agent
    /// does not know it, though it has an address and a veth.
    pub fn set_hidden(&mut self, id: &str, hidden: bool) {
        if hidden {
            self.hidden.insert(id.to_string());
        } else {
            self.hidden.remove(id);
        }
    }

    /// Every object the next apply writes.
    pub fn objects(&self) -> Vec<Value> {
        let mut objects: Vec<Value> = self.lab.nodes().iter().map(k8s::node).collect();
        let mut namespaces: BTreeSet<&str> = self.ns_labels.keys().map(String::as_str).collect();
        namespaces.extend(self.lab.pods().iter().map(|p| p.namespace.as_str()));
        let empty = Labels::new();
        for ns in namespaces {
            objects.push(k8s::namespace(ns, self.ns_labels.get(ns).unwrap_or(&empty)));
        }
        for pod in self.lab.pods() {
            let id = pod.id();
            if self.hidden.contains(&id) {
                continue;
            }
            let mut ports = model_ports();
            ports.extend(self.extra_ports.get(&id).cloned().unwrap_or_default());
            let node = &self.lab.nodes()[pod.node - 1];
            objects.push(k8s::pod(&k8s::PodSpec {
                namespace: &pod.namespace,
                name: &pod.name,
                labels: self.pod_labels.get(&id).unwrap_or(&empty),
                node_name: &node.name,
                host_ip: node.ip,
                pod_ip: pod.ip,
                ports: &ports,
            }));
        }
        objects.extend(self.policies.iter().cloned());
        objects.extend(self.extra.iter().cloned());
        objects
    }

    /// The manifest directory the CLI reads.
    pub fn manifest_dir(&self) -> &Path {
        &self.manifests
    }

    /// Writes the manifests and runs `palisade netpol apply` in every node (concurrently).
    pub fn apply(&mut self) -> Result<()> {
        k8s::write_manifests(&self.manifests, &self.objects())?;
        self.applies += 1;
        let mut running = Vec::new();
        for node in self.lab.nodes() {
            let argv = apply_argv(&self.bin, &self.manifests, &node.name);
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let log = format!("apply-{}-{}", self.applies, node.name);
            running.push((
                node.netns.clone(),
                self.lab.spawn_in(&node.netns, &log, &argv)?,
            ));
        }
        let mut errors = Vec::new();
        for (netns, mut process) in running {
            if let Err(e) = finish_apply(&mut process, &netns) {
                errors.push(format!("{e:#}"));
            }
        }
        if !errors.is_empty() {
            bail!(
                "{}\nmanifests:\n{}",
                errors.join("\n"),
                self.manifest_listing()
            );
        }
        Ok(())
    }

    fn manifest_listing(&self) -> String {
        self.objects()
            .iter()
            .filter(|o| o["kind"] == "NetworkPolicy" || o["kind"] == "ClusterNetworkPolicy")
            .map(|o| serde_json::to_string(o).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The expectation matrix over all pods: cell (from, to) = `f(from, to)`, the diagonal
    /// always reachable.
    pub fn expect(&self, f: impl Fn(PodRef<'_>, PodRef<'_>) -> bool) -> Matrix {
        let pods = self.lab.pods();
        let names: Vec<String> = pods.iter().map(PodHandle::id).collect();
        let mut m = Matrix::new(names.clone(), names, true);
        for (r, from) in pods.iter().enumerate() {
            for (c, to) in pods.iter().enumerate() {
                let value = r == c || f(pod_ref(from), pod_ref(to));
                m.set_at(r, c, value);
            }
        }
        m
    }

    /// Probes all pods → all pods on `port`/`protocol` and compares with `expected`.
    pub fn check(&self, port: u16, protocol: Protocol, expected: &Matrix) -> Result<()> {
        let pods = self.pods();
        self.check_between(&pods, &pods, port, protocol, expected)
    }

    /// Probes `froms` → `tos` and compares; a failure carries the truth tables, the policies,
    /// and what the CLI compiled and the kernel holds on every node.
    pub fn check_between(
        &self,
        froms: &[Endpoint],
        tos: &[Endpoint],
        port: u16,
        protocol: Protocol,
        expected: &Matrix,
    ) -> Result<()> {
        match self.lab.check_matrix(froms, tos, port, protocol, expected) {
            Ok(()) => Ok(()),
            Err(e) => Err(anyhow!(
                "{e:#}\npolicies:\n{}\n{}",
                self.manifest_listing(),
                self.dump()
            )),
        }
    }

    /// The expectation for `froms` → all pods, cell = `f(from endpoint, to pod)`.
    pub fn expect_from(
        &self,
        froms: &[Endpoint],
        f: impl Fn(&Endpoint, PodRef<'_>) -> bool,
    ) -> Matrix {
        let pods = self.lab.pods();
        Matrix::from_fn(
            froms.iter().map(|e| e.name.clone()).collect(),
            pods.iter().map(PodHandle::id).collect(),
            |from, to| {
                let from = froms.iter().find(|e| e.name == from);
                let to = pods.iter().find(|p| p.id() == to);
                match (from, to) {
                    (Some(from), Some(to)) => f(from, pod_ref(to)),
                    _ => false,
                }
            },
        )
    }

    /// What `palisade netpol compile` prints and what the kernel holds, per node.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for node in self.lab.nodes() {
            out.push_str(&format!("==== {} ({})\n", node.name, node.netns));
            let compile = std::process::Command::new(&self.bin)
                .args(["netpol", "compile", "--manifests"])
                .arg(&self.manifests)
                .args(["--node", &node.name])
                .output();
            match compile {
                Ok(o) => out.push_str(&format!(
                    "-- palisade netpol compile ({}):\n{}{}",
                    o.status,
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )),
                Err(e) => out.push_str(&format!("-- palisade netpol compile: {e}\n")),
            }
            for argv in [&["iptables-save"][..], &["ipset", "save"][..]] {
                match self.lab.exec_ok(&node.netns, argv) {
                    Ok(text) => out.push_str(&format!("-- {}:\n{text}", argv.join(" "))),
                    Err(e) => out.push_str(&format!("-- {}: {e:#}\n", argv.join(" "))),
                }
            }
        }
        out
    }

    /// Normalised dataplane state of every node, in node order.
    pub fn snapshots(&self) -> Result<Vec<String>> {
        self.lab
            .nodes()
            .iter()
            .map(|n| snapshot(&self.lab, &n.netns))
            .collect()
    }
}

fn pod_ref(p: &PodHandle) -> PodRef<'_> {
    PodRef {
        ns: &p.namespace,
        name: &p.name,
        node: p.node,
        ip: p.ip,
    }
}

/// A large, API-only cluster (no lab pods behind it) to make one apply do real work:
/// `pods_per_node` pods on every node, 20 namespaces, `policies` policies mixing namespace
/// and pod selectors, match expressions, ipBlocks with except, numeric/named/ranged ports and
/// egress. `variant` shifts labels and selectors so two variants differ in sets and chains.
pub fn big_manifests(
    nodes: &[NodeHandle],
    pods_per_node: usize,
    policies: usize,
    variant: usize,
) -> Vec<Value> {
    let mut objects: Vec<Value> = nodes.iter().map(k8s::node).collect();
    let teams = ["red", "green", "blue", "gold"];
    let envs = ["prod", "dev", "test"];
    let tiers = ["web", "db", "cache"];
    for i in 0..20 {
        let labels = k8s::labels([("team", teams[(i + variant) % 4]), ("env", envs[i % 3])]);
        objects.push(k8s::namespace(&format!("ns{i}"), &labels));
    }
    let mut ports = model_ports();
    ports.push(NamedPort {
        name: "http".into(),
        port: 8080 + (variant % 2) as u16,
        protocol: Protocol::Tcp,
    });
    for node in nodes {
        for i in 0..pods_per_node.min(250) {
            let labels = k8s::labels([
                ("app", format!("app{}", (i + variant) % 10)),
                ("tier", tiers[i % 3].to_string()),
            ]);
            let ip = Ipv4Addr::new(10, 244, node.index as u8, 2 + i as u8);
            objects.push(k8s::pod(&k8s::PodSpec {
                namespace: &format!("ns{}", i % 20),
                name: &format!("p{}-{i}", node.index),
                labels: &labels,
                node_name: &node.name,
                host_ip: node.ip,
                pod_ip: ip,
                ports: &ports,
            }));
        }
    }
    for i in 0..policies {
        let ns = format!("ns{}", i % 20);
        let app = format!("app{}", (i * 7 + variant) % 10);
        let block = i % 200 + 1;
        let mut spec = json!({
            "podSelector": { "matchLabels": { "app": app } },
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [
                    { "namespaceSelector": { "matchLabels": { "team": teams[(i + variant) % 4] } } },
                    {
                        "namespaceSelector": { "matchExpressions": [
                            { "key": "env", "operator": "In", "values": [envs[i % 3]] }
                        ] },
                        "podSelector": { "matchLabels": { "tier": tiers[(i + variant) % 3] } },
                    },
                    { "ipBlock": { "cidr": format!("172.{}.0.0/16", 16 + i % 16),
                                   "except": [format!("172.{}.{block}.0/24", 16 + i % 16)] } },
                ],
                "ports": [
                    { "protocol": "TCP", "port": 80 },
                    { "protocol": "TCP", "port": "http" },
                    { "protocol": "UDP", "port": 81, "endPort": 90 + variant as u16 },
                    { "protocol": "SCTP", "port": "serve-81-sctp" },
                ],
            }],
        });
        if (i + variant) & 1 == 0 {
            spec["policyTypes"] = json!(["Ingress", "Egress"]);
            spec["egress"] = json!([{
                "to": [{ "podSelector": { "matchLabels": { "tier": "db" } },
                         "namespaceSelector": {} }],
                "ports": [{ "port": "serve-80-tcp" }],
            }]);
        }
        objects.push(k8s::network_policy(&ns, &format!("pol-{i}"), spec));
    }
    objects
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_save_normalises_counters_comments_and_chain_order() {
        let a = "# Generated by iptables-save v1.8.9 on Mon\n*filter\n:INPUT ACCEPT [10:200]\n\
                 :B - [0:0]\n:A - [0:0]\n-A B -j DROP\n-A A -s 1.2.3.4 -j ACCEPT\n-A A -j RETURN\nCOMMIT\n";
        let b = "*filter\n:A - [0:0]\n:INPUT ACCEPT [0:0]\n:B - [3:4]\n-A A -s 1.2.3.4 -j ACCEPT\n\
                 -A A -j RETURN\n-A B -j DROP\nCOMMIT\n# Completed\n";
        assert_eq!(normalize_iptables_save(a), normalize_iptables_save(b));
        let c = b.replace(
            "-A A -s 1.2.3.4 -j ACCEPT\n-A A -j RETURN",
            "-A A -j RETURN\n-A A -s 1.2.3.4 -j ACCEPT",
        );
        assert_ne!(
            normalize_iptables_save(a),
            normalize_iptables_save(&c),
            "rule order matters"
        );
    }

    #[test]
    fn ipset_save_ignores_tuning_and_member_order() {
        let a =
            "create S hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x01\n\
                 add S 10.0.0.1\nadd S 10.0.0.2\n";
        let b =
            "create S hash:ip family inet hashsize 2048 maxelem 65536 bucketsize 14 initval 0x99\n\
                 add S 10.0.0.2\nadd S 10.0.0.1\n";
        assert_eq!(normalize_ipset_save(a), normalize_ipset_save(b));
        assert!(normalize_ipset_save(a).contains("create S hash:ip family inet maxelem 65536"));
        assert_ne!(
            normalize_ipset_save(a),
            normalize_ipset_save(&b.replace("10.0.0.2", "10.0.0.3"))
        );
    }

    #[test]
    fn big_manifests_vary_and_stay_in_range() {
        let nodes: Vec<NodeHandle> = (1..=2)
            .map(|i| NodeHandle {
                index: i,
                name: format!("node{i}"),
                netns: format!("n{i}"),
                ip: Ipv4Addr::new(198, 51, 100, 10 + i as u8),
                pod_cidr: Ipv4Addr::new(10, 244, i as u8, 0),
            })
            .collect();
        let a = big_manifests(&nodes, 250, 80, 0);
        let b = big_manifests(&nodes, 250, 80, 1);
        assert_eq!(a.len(), 2 + 20 + 500 + 80);
        assert_ne!(a, b);
        assert!(a.iter().any(|o| o["status"]["podIP"] == "10.244.2.251"));
    }

    #[test]
    fn pod_refs_match_ids() {
        let p = PodRef {
            ns: "x",
            name: "a",
            node: 1,
            ip: Ipv4Addr::LOCALHOST,
        };
        assert!(p.is("x/a"));
        assert!(!p.is("x/b"));
        assert!(!p.is("xa"));
    }
}
