//! `palisade-lab demo`: Palisade on a three-node lab cluster, in about half a minute.
//!
//! ```text
//!  1 lab: LAN, 3 nodes, client, control plane (test API server in a netns)
//!  2 one real `palisade agent` per node (inside the node's netns)
//!  3 pods x/y/z × a/b/c created through the API (the lab plays kubelet)
//!  4 pod-to-pod matrix before any policy
//!  5 examples/netpol/*.yaml applied through the API → matrices after (TCP 80 and 81), checked
//!    against what Kubernetes semantics say for the shipped examples
//!  6 examples/loadbalancer/*.yaml: pool + Service → IP in the Service status; then, if the
//!    agent has the L2 announcer: the client connects, the announcing agent is killed
//!    (handover), the announcing node is cut off the LAN (failover), each timed
//!  7 everything removed
//! ```
//!
//! Output is plain text when stdout is not a terminal (bold headings otherwise). Nothing is
//! faked: every matrix cell is a real TCP connection between namespaces, every address comes
//! from the API, and when this build cannot do something the demo says so.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::api::Kind;
use crate::cluster::{poll, Cluster, Peer};
use crate::k8s;
use crate::lab_cluster::{LabCluster, LabClusterSpec, SYSTEM_NAMESPACE};
use crate::matrix::Matrix;
use crate::scenarios::{self, Model};
use crate::server::Protocol::Tcp;

/// Demo options.
#[derive(Clone, Debug, Default)]
pub struct DemoOptions {
    /// Use a real cluster's API instead of the lab's own (the lab still plays kubelet).
    pub kubeconfig: Option<PathBuf>,
    /// Where the example manifests are (default: `examples/` found from the working
    /// directory or the binary's location).
    pub examples: Option<PathBuf>,
}

struct Out {
    tty: bool,
    started: Instant,
}

impl Out {
    fn heading(&self, step: usize, text: &str) {
        let t = self.started.elapsed().as_secs_f64();
        if self.tty {
            println!("\n\x1b[1m[{step}/6] {text}\x1b[0m  ({t:.1}s)");
        } else {
            println!("\n[{step}/6] {text}  ({t:.1}s)");
        }
    }

    fn line(&self, text: impl AsRef<str>) {
        for l in text.as_ref().lines() {
            println!("      {l}");
        }
        let _ = std::io::stdout().flush();
    }

    fn ok(&self, text: impl AsRef<str>) {
        let mark = if self.tty { "\x1b[32m✓\x1b[0m" } else { "OK" };
        self.line(format!("{mark} {}", text.as_ref()));
    }

    fn bad(&self, text: impl AsRef<str>) {
        let mark = if self.tty { "\x1b[31m✗\x1b[0m" } else { "!!" };
        self.line(format!("{mark} {}", text.as_ref()));
    }
}

/// Finds `examples/`: the option, `./examples`, or `examples/` next to an ancestor of the
/// binary (`target/release/palisade-lab` → the repository root).
pub fn examples_dir(option: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = option {
        return Ok(p.to_path_buf());
    }
    let mut candidates = vec![PathBuf::from("examples")];
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(exe.ancestors().skip(1).take(4).map(|d| d.join("examples")));
    }
    candidates
        .into_iter()
        .find(|p| p.join("netpol").is_dir())
        .context(
            "cannot find the examples/ directory (run from the repository, or pass --examples DIR)",
        )
}

/// The YAML files of `dir` (sorted), each with its objects and its first comment line.
pub fn read_examples(dir: &Path) -> Result<Vec<(String, String, Vec<Value>)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let summary = text
            .lines()
            .find_map(|l| l.strip_prefix("# "))
            .unwrap_or("")
            .to_string();
        let docs: Vec<Value> = serde_saphyr::from_str_multiple::<Value, Vec<Value>>(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let docs: Vec<Value> = docs.into_iter().filter(|d| d.is_object()).collect();
        for d in &docs {
            check_string_maps(d).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push((name, summary, docs));
    }
    Ok(out)
}

/// Label maps (`labels`, `matchLabels`, `annotations`, `selector` of a Service) must hold
/// strings. YAML 1.1 — what kubectl's parser follows — reads bare `y`, `n`, `yes`, `no`, `on`,
/// `off` as booleans, and a real API server rejects the object; the lab's test API server has
/// no schema validation, so the demo checks instead.
pub fn check_string_maps(v: &Value) -> Result<()> {
    fn walk(v: &Value, path: &str) -> Result<()> {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    let here = format!("{path}.{k}");
                    let is_map = matches!(k.as_str(), "labels" | "matchLabels" | "annotations")
                        || (k == "selector"
                            && path.ends_with(".spec")
                            && !child["matchLabels"].is_object());
                    if is_map {
                        if let Value::Object(entries) = child {
                            for (key, value) in entries {
                                if !value.is_string() {
                                    bail!(
                                        "{here}.{key} is {value}, not a string: quote it (YAML 1.1, which \
                                         kubectl follows, reads a bare y/n/yes/no/on/off as a boolean)"
                                    );
                                }
                            }
                        }
                    }
                    walk(child, &here)?;
                }
                Ok(())
            }
            Value::Array(items) => items
                .iter()
                .enumerate()
                .try_for_each(|(i, c)| walk(c, &format!("{path}[{i}]"))),
            _ => Ok(()),
        }
    }
    walk(v, "")
}

/// Tables next to each other, each under its title.
fn side_by_side(tables: &[(String, String)]) -> String {
    let cols: Vec<(Vec<String>, usize)> = tables
        .iter()
        .map(|(title, body)| {
            let mut lines = vec![title.clone()];
            lines.extend(body.lines().map(str::to_string));
            let width = lines.iter().map(|l| l.chars().count()).max().unwrap_or(0);
            (lines, width)
        })
        .collect();
    let rows = cols.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let mut out = String::new();
    for r in 0..rows {
        let mut line = String::new();
        for (i, (lines, width)) in cols.iter().enumerate() {
            let cell = lines.get(r).map(String::as_str).unwrap_or("");
            line.push_str(cell);
            if i + 1 < cols.len() {
                line.push_str(&" ".repeat(width - cell.chars().count() + 4));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The policy files the demo knows the meaning of.
const SHIPPED_NETPOL: [&str; 3] = [
    "01-default-deny-ingress.yaml",
    "02-allow-from-namespace.yaml",
    "03-allow-named-port.yaml",
];

/// Probes until the matrix equals `expected` (bounded) or, with no expectation, until two
/// probes a second apart agree; returns the last observation.
fn settle(c: &mut LabCluster, m: &Model, port: u16, expected: Option<&Matrix>) -> Result<Matrix> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last: Option<Matrix> = None;
    loop {
        let observed = m.observe(c, port, Tcp)?;
        match expected {
            Some(e) if &observed == e => return Ok(observed),
            None if last.as_ref() == Some(&observed) => return Ok(observed),
            _ => {}
        }
        if Instant::now() >= deadline {
            return Ok(observed);
        }
        last = Some(observed);
        std::thread::sleep(Duration::from_millis(if expected.is_some() {
            200
        } else {
            1000
        }));
    }
}

/// Runs the demo (needs root). Everything it builds is removed when it returns.
pub fn run(options: &DemoOptions) -> Result<()> {
    let out = Out {
        tty: std::io::stdout().is_terminal(),
        started: Instant::now(),
    };
    let examples = examples_dir(options.examples.as_deref())?;
    let netpol_examples = read_examples(&examples.join("netpol"))?;
    let lb_examples = read_examples(&examples.join("loadbalancer"))?;
    println!("Palisade lab demo");
    println!(
        "A small bare-metal \"cluster\" built from network namespaces on this machine: a LAN,"
    );
    println!("three nodes each running the real `palisade agent`, a client on the LAN and a");
    println!("Kubernetes API. Nothing is added to this machine's own network namespace, and");
    println!("everything is removed at the end (also on Ctrl-C).");

    // 1. The lab.
    out.heading(1, "Building the lab");
    let mut spec = LabClusterSpec::new(3);
    spec.agents = false;
    spec.kubeconfig = options.kubeconfig.clone();
    let mut c = LabCluster::start(spec)?;
    let external = options.kubeconfig.is_some();
    out.line(format!(
        "lab {} (every namespace and interface is named {}-*)",
        c.prefix(),
        c.prefix()
    ));
    out.line("LAN     198.51.100.0/24, a bridge in its own namespace");
    if external {
        out.line(format!(
            "cp      198.51.100.2     relay to the cluster of {} (agents use it)",
            options
                .kubeconfig
                .as_deref()
                .unwrap_or(Path::new(""))
                .display()
        ));
    } else {
        out.line(
            "cp      198.51.100.2     Kubernetes API: the project's test API server, port 6443",
        );
    }
    for n in c.nodes().to_vec() {
        out.line(format!(
            "{:<7} {:<16} pods {}",
            n.name,
            n.ip.to_string(),
            n.pod_cidr_text()
        ));
    }
    out.line(format!(
        "client  {:<16} a machine on the LAN",
        c.client().ip.to_string()
    ));

    // 2. Agents.
    out.heading(
        2,
        "Starting one palisade agent per node (inside the node's namespace)",
    );
    let nodes = c.node_names();
    for node in &nodes {
        c.start_agent(node)?;
    }
    for node in &nodes {
        let t = Instant::now();
        c.wait_agent_ready(node, Duration::from_secs(30))?;
        out.line(format!(
            "{node}: ready in {:.1}s (netpol + loadbalancer{})",
            t.elapsed().as_secs_f64(),
            if c.announcer_available().unwrap_or(false) {
                " + L2 announcer"
            } else {
                ""
            }
        ));
    }
    let lease = Kind::of("coordination.k8s.io/v1", "Lease");
    let leader = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        Ok(c.control_plane()
            .api()
            .get(&lease, Some(SYSTEM_NAMESPACE), "palisade-allocator")?
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string)))
    })?;
    match leader {
        Some(l) => out.line(format!(
            "leader (the one agent that allocates LoadBalancer IPs): {l}"
        )),
        None => out.bad("no agent took the allocator Lease within 10s"),
    }

    // 3. Pods.
    out.heading(
        3,
        "Creating pods x/a .. z/c through the API (the lab plays kubelet)",
    );
    let m = Model::deploy(&mut c, 3)?;
    for ns in scenarios::NAMESPACES {
        let line: Vec<String> = m
            .pods
            .iter()
            .filter(|p| p.ns == ns)
            .map(|p| format!("{:<4} {:<11} node{}", p.id(), p.ip.to_string(), p.node))
            .collect();
        out.line(line.join("   "));
    }
    out.line("every pod serves TCP and UDP on ports 80 and 81 (named ports serve-80-tcp, ...)");

    // 4. Before.
    out.heading(
        4,
        "Who reaches whom, before any NetworkPolicy (TCP 80; '.' = connected, 'X' = blocked)",
    );
    let open = m.expect(|_, _| true);
    let before = settle(&mut c, &m, 80, Some(&open))?;
    out.line(before.to_string());
    if before == open {
        out.ok("all 81 connections succeed: without policies Kubernetes allows everything");
    } else {
        out.bad(format!(
            "unexpected before any policy:\n{}",
            Matrix::report(&open, &before)
        ));
    }

    // 5. Policies.
    out.heading(
        5,
        &format!("Applying {}", examples.join("netpol").display()),
    );
    for (name, summary, docs) in &netpol_examples {
        for d in docs {
            c.apply(d).with_context(|| format!("applying {name}"))?;
        }
        out.line(format!("{name:<30} {summary}"));
    }
    let names: BTreeSet<&str> = netpol_examples.iter().map(|(n, _, _)| n.as_str()).collect();
    let shipped = names == SHIPPED_NETPOL.into_iter().collect();
    let (exp80, exp81) = if shipped {
        (
            Some(m.expect(|from, to| to.ns != "x" || from.ns == "y")),
            Some(m.expect(|from, to| {
                to.ns != "x" || from.ns == "y" || (to.is("x/a") && from.ns == "z")
            })),
        )
    } else {
        (None, None)
    };
    let t = Instant::now();
    let after80 = settle(&mut c, &m, 80, exp80.as_ref())?;
    let after81 = settle(&mut c, &m, 81, exp81.as_ref())?;
    out.line(side_by_side(&[
        ("TCP 80 after".to_string(), after80.to_string()),
        ("TCP 81 after".to_string(), after81.to_string()),
    ]));
    match (&exp80, &exp81) {
        (Some(e80), Some(e81)) if &after80 == e80 && &after81 == e81 => out.ok(format!(
            "enforced on all three nodes within {:.1}s: x accepts only y, plus z on x/a's port named serve-81-tcp",
            t.elapsed().as_secs_f64()
        )),
        (Some(e80), Some(e81)) => {
            out.bad("differs from what Kubernetes semantics say for these policies:");
            out.line(Matrix::report(e80, &after80));
            out.line(Matrix::report(e81, &after81));
        }
        _ => out.line("(the examples were changed; the matrices show what the agents enforce)"),
    }

    // 6. LoadBalancer.
    out.heading(
        6,
        &format!(
            "LoadBalancer IPs: applying {}",
            examples.join("loadbalancer").display()
        ),
    );
    let service_created = Instant::now();
    for (name, summary, docs) in &lb_examples {
        for d in docs {
            c.apply(d).with_context(|| format!("applying {name}"))?;
        }
        out.line(format!("{name:<30} {summary}"));
    }
    let mut web = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let name = format!("web-{}", i + 1);
        c.apply(&c.pod_manifest("demo", &name, &k8s::labels([("app", "web")]), node))?;
        web.push(format!("demo/{name}"));
    }
    c.wait_pods_ready(&web, Duration::from_secs(30))?;
    out.line(format!(
        "pods {} (app=web) behind Service demo/web",
        web.join(", ")
    ));
    let vip = scenarios::wait_lb_ip(&mut c, "demo", "web", Duration::from_secs(20))?;
    out.ok(format!(
        "Service demo/web: status.loadBalancer.ingress = {vip} (seen {:.1}s after the Service was created)",
        service_created.elapsed().as_secs_f64()
    ));
    if c.announcer_available()? {
        lb_client_part(&mut c, &out, vip, ("demo", "web"))?;
    } else {
        out.line("L2 announcement: not yet available in this build, so the client on the LAN");
        out.line(format!(
            "cannot reach {vip} yet (nobody answers its ARP request); the address is"
        ));
        out.line("allocated and recorded in the Service status, which is what exists today.");
    }

    // 7. Clean-up.
    println!();
    let prefix = c.prefix().to_string();
    if external {
        cleanup_external(&mut c, &netpol_examples, &lb_examples, &m, &web);
    }
    print!("Cleaning up ... ");
    let _ = std::io::stdout().flush();
    drop(c);
    let left = crate::lab::leftovers(&prefix)?;
    if left.is_empty() {
        println!("done: every namespace, interface and process of the lab is gone.");
    } else {
        println!("left behind: {left:?} (palisade-lab clean removes them)");
    }
    println!("Total {:.1}s.", out.started.elapsed().as_secs_f64());
    Ok(())
}

/// What `kubectl get servicel2statuses` would show for the Service, on one line.
fn l2_status_line(c: &mut LabCluster, (ns, svc): (&str, &str)) -> String {
    match scenarios::l2_statuses(c, ns, svc) {
        Ok(list) if list.is_empty() => format!("kubectl get servicel2statuses -n {ns}: none yet"),
        Ok(list) => {
            let rows: Vec<String> = list
                .iter()
                .map(|(name, s)| {
                    let ips: Vec<&str> = s["ips"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    let node = s["node"].as_str().unwrap_or("?");
                    format!("{name}: node {node} answers ARP for {}", ips.join(", "))
                })
                .collect();
            format!("kubectl get servicel2statuses -n {ns}: {}", rows.join(", "))
        }
        Err(e) => format!("kubectl get servicel2statuses -n {ns}: {e}"),
    }
}

/// Waits (up to 5 s) until the Service's only ServiceL2Status names `node`, and prints it.
fn show_l2_status(c: &mut LabCluster, out: &Out, svc: (&str, &str), node: &str) {
    let _ = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        let list = scenarios::l2_statuses(c, svc.0, svc.1)?;
        Ok((list.len() == 1 && list[0].1["node"] == node).then_some(()))
    });
    out.line(l2_status_line(c, svc));
}

fn lb_client_part(c: &mut LabCluster, out: &Out, vip: Ipv4Addr, svc: (&str, &str)) -> Result<()> {
    let Some(first) = scenarios::wait_client_reaches(c, vip, Duration::from_secs(15))? else {
        out.bad(format!(
            "the client could not connect to {vip}:80 within 15s"
        ));
        return Ok(());
    };
    let Some(announcer) = c.announcing_node(vip)? else {
        out.bad(format!(
            "the client connected but has no ARP entry for {vip}"
        ));
        return Ok(());
    };
    out.ok(format!(
        "client -> {vip}:80 connected ({:.1}s); {announcer} answered the client's ARP request",
        first.as_secs_f64()
    ));
    show_l2_status(c, out, svc, &announcer);

    out.line(format!(
        "Killing the agent on {announcer} (SIGKILL) while the client keeps connecting ..."
    ));
    let prober = c.start_prober(
        &Peer::Client,
        vip,
        80,
        Tcp,
        Duration::from_millis(20),
        Duration::from_secs(1),
    )?;
    let killed = Instant::now();
    c.kill_agent(&announcer)?;
    let moved = poll(Duration::from_secs(20), Duration::from_millis(20), || {
        Ok(c.announcing_node(vip)?.filter(|n| *n != announcer))
    })?;
    let handover = killed.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let log = prober.stop()?;
    match moved {
        Some(next) => {
            out.ok(format!(
                "{next} took {vip} over after {:.2}s (gratuitous ARP); client connections meanwhile: {} ok, {} failed",
                handover.as_secs_f64(),
                log.successes(),
                log.failures()
            ));
            show_l2_status(c, out, svc, &next);
        }
        None => out.bad(format!("nobody took {vip} over within 20s")),
    }
    c.start_agent(&announcer)?;
    c.wait_agent_ready(&announcer, Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_secs(2));

    let Some(victim) = c.announcing_node(vip)? else {
        bail!("no ARP entry for {vip} any more");
    };
    out.line(format!("Cutting {victim} off the LAN (a node failure) ..."));
    let failed = Instant::now();
    c.isolate_node(&victim, true)?;
    let back = scenarios::wait_client_reaches(c, vip, Duration::from_secs(30));
    let failover = failed.elapsed();
    let now = c.announcing_node(vip);
    c.isolate_node(&victim, false)?;
    match (back?, now?) {
        (Some(_), Some(via)) => out.ok(format!(
            "the client connects again after {:.2}s, through {via}",
            failover.as_secs_f64()
        )),
        _ => out.bad(format!("the client did not reach {vip} again within 30s")),
    }
    Ok(())
}

/// Removes what the demo created in a real cluster (best effort).
fn cleanup_external(
    c: &mut LabCluster,
    netpol: &[(String, String, Vec<Value>)],
    lb: &[(String, String, Vec<Value>)],
    m: &Model,
    web: &[String],
) {
    let api = c.control_plane().api();
    for id in m.pods.iter().map(|p| p.id()).chain(web.iter().cloned()) {
        if let Some((ns, name)) = id.split_once('/') {
            let _ = api.delete(&Kind::of("v1", "Pod"), Some(ns), name);
        }
    }
    for (_, _, docs) in netpol.iter().chain(lb) {
        for d in docs.iter().rev() {
            if let Ok(kind) = Kind::of_object(d) {
                let (ns, name) = crate::api::ns_name(d);
                let _ = api.delete(&kind, ns, name);
            }
        }
    }
    for ns in scenarios::NAMESPACES {
        let _ = api.delete(&Kind::of("v1", "Namespace"), None, ns);
    }
    for n in c.nodes().to_vec() {
        let _ = api.delete(&Kind::of("v1", "Node"), None, &n.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_must_be_strings() {
        let ok = serde_json::json!({ "spec": { "podSelector": { "matchLabels": { "a": "y" } } } });
        assert!(check_string_maps(&ok).is_ok());
        let bad =
            serde_json::json!({ "spec": { "podSelector": { "matchLabels": { "a": true } } } });
        let e = check_string_maps(&bad).unwrap_err().to_string();
        assert!(e.contains(".spec.podSelector.matchLabels.a is true"), "{e}");
        let svc = serde_json::json!({ "spec": { "selector": { "app": 1 } } });
        assert!(check_string_maps(&svc).is_err());
    }

    #[test]
    fn tables_side_by_side() {
        let s = side_by_side(&[
            ("A".into(), "x y\n1 2\n".into()),
            ("B".into(), "zz\n".into()),
        ]);
        assert_eq!(s, "A      B\nx y    zz\n1 2\n");
    }

    #[test]
    fn shipped_examples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let netpol = read_examples(&dir.join("netpol")).unwrap();
        let names: Vec<&str> = netpol.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, SHIPPED_NETPOL);
        for (name, summary, docs) in &netpol {
            assert!(!summary.is_empty(), "{name} has no leading comment");
            assert_eq!(docs.len(), 1, "{name}");
            assert_eq!(docs[0]["kind"], "NetworkPolicy", "{name}");
            assert_eq!(docs[0]["metadata"]["namespace"], "x", "{name}");
        }
        let lb = read_examples(&dir.join("loadbalancer")).unwrap();
        let kinds: Vec<&str> = lb
            .iter()
            .flat_map(|(_, _, d)| d.iter().filter_map(|o| o["kind"].as_str()))
            .collect();
        assert_eq!(
            kinds,
            ["IPAddressPool", "L2Advertisement", "Namespace", "Service"]
        );
    }
}
