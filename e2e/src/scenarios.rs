//! The e2e scenarios, written once against [`Cluster`] and run by `tests/e2e_*.rs` on the lab
//! (or, with `PALISADE_E2E_BACKEND=kind`, on a kind cluster).
//!
//! ```text
//!   model: namespaces x, y, z (label ns=<name>) × pods a, b, c (label pod=<name>),
//!          placed round-robin over the first N nodes:
//!          2 nodes → node1: x/a x/c y/b z/a z/c   node2: x/b y/a y/c z/b
//! ```
//!
//! Expectations are written per step from Kubernetes semantics, as `|from, to| reachable?`
//! over [`PodRef`]s (the lab harness's expectation helper), never derived from Palisade's
//! compiler. A pod reaching itself is always expected reachable (loopback).
//!
//! Agents watch the API, so a policy change takes effect "soon": [`Model::converge`] probes
//! until the matrix equals the expectation (bounded), then probes once more after a pause
//! and requires it to still hold. Steps whose expectation does not change (e.g. deleting a
//! policy that another policy overrides) pause first so the agents have acted before the
//! check.
//!
//! Each scenario returns `Ok(())` or an error carrying the truth tables and diagnostics.
//! A scenario that cannot run on a backend (no announcer yet, no outage simulation) prints
//! `skipped: ...` with the reason and returns `Ok(())`.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::cluster::{poll, ApiOutage, Cluster, Peer, ProbeLog, Prober};
use crate::k8s::{self, network_policy as np, Labels};
use crate::matrix::Matrix;
use crate::netpol::PodRef;
use crate::server::Protocol::{self, Tcp, Udp};

/// Namespaces of the model.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// Pods in every namespace.
pub const POD_NAMES: [&str; 3] = ["a", "b", "c"];
/// Longest wait for agents to converge after a change.
pub const CONVERGE: Duration = Duration::from_secs(20);
/// Longest wait for pods to become ready.
pub const POD_READY: Duration = Duration::from_secs(60);

/// A pod of the model.
#[derive(Clone, Debug)]
pub struct ModelPod {
    pub ns: String,
    pub name: String,
    /// 1-based index into [`Cluster::node_names`].
    pub node: usize,
    pub ip: Ipv4Addr,
}

impl ModelPod {
    pub fn id(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }

    fn as_ref(&self) -> PodRef<'_> {
        PodRef {
            ns: &self.ns,
            name: &self.name,
            node: self.node,
            ip: self.ip,
        }
    }
}

/// The x/y/z × a/b/c model running on a cluster.
#[derive(Clone, Debug)]
pub struct Model {
    pub pods: Vec<ModelPod>,
}

/// Creates or updates a Namespace with `labels`.
pub fn namespace(c: &mut dyn Cluster, name: &str, labels: &[(&str, &str)]) -> Result<()> {
    c.apply(&k8s::namespace(name, &k8s::labels(labels.iter().copied())))
}

/// Sets (`Some`) or removes (`None`) a label of an object.
pub fn set_label(
    c: &mut dyn Cluster,
    api_version: &str,
    kind: &str,
    ns: Option<&str>,
    name: &str,
    key: &str,
    value: Option<&str>,
) -> Result<()> {
    c.set_label(api_version, kind, ns, name, key, value)
}

fn pause_for_agents() {
    // Agents sync at most every 20 ms after a watch event; a second is plenty even on a
    // loaded machine, and makes "nothing changed" checks meaningful.
    std::thread::sleep(Duration::from_millis(1000));
}

impl Model {
    /// Creates namespaces x, y, z and pods a, b, c in each, round-robin over the first
    /// `nodes` nodes, and waits until all are ready.
    pub fn deploy(c: &mut dyn Cluster, nodes: usize) -> Result<Model> {
        let node_names = c.node_names();
        ensure!(
            node_names.len() >= nodes && nodes > 0,
            "the model needs {nodes} nodes, the cluster has {}",
            node_names.len()
        );
        let mut placed = Vec::new();
        let mut i = 0;
        for ns in NAMESPACES {
            namespace(c, ns, &[("ns", ns)])?;
            for name in POD_NAMES {
                let node = i % nodes + 1;
                let labels: Labels = k8s::labels([("pod", name)]);
                let pod = c.pod_manifest(ns, name, &labels, &node_names[node - 1]);
                c.apply(&pod)?;
                placed.push((ns.to_string(), name.to_string(), node));
                i += 1;
            }
        }
        let ids: Vec<String> = placed
            .iter()
            .map(|(ns, n, _)| format!("{ns}/{n}"))
            .collect();
        c.wait_pods_ready(&ids, POD_READY)?;
        let mut pods = Vec::new();
        for (ns, name, node) in placed {
            let ip = c.pod_ip(&format!("{ns}/{name}"))?;
            pods.push(ModelPod { ns, name, node, ip });
        }
        Ok(Model { pods })
    }

    /// The pod `ns/name`.
    pub fn pod(&self, id: &str) -> Result<&ModelPod> {
        self.pods
            .iter()
            .find(|p| p.id() == id)
            .with_context(|| format!("the model has no pod {id}"))
    }

    fn peers(&self) -> Vec<Peer> {
        self.pods.iter().map(|p| Peer::Pod(p.id())).collect()
    }

    fn targets(&self) -> Vec<(String, Ipv4Addr)> {
        self.pods.iter().map(|p| (p.id(), p.ip)).collect()
    }

    /// The expectation: cell (from, to) = `f(from, to)`, a pod to itself always reachable.
    pub fn expect(&self, f: impl Fn(PodRef<'_>, PodRef<'_>) -> bool) -> Matrix {
        let names: Vec<String> = self.pods.iter().map(ModelPod::id).collect();
        let mut m = Matrix::new(names.clone(), names, true);
        for (r, from) in self.pods.iter().enumerate() {
            for (col, to) in self.pods.iter().enumerate() {
                m.set_at(r, col, r == col || f(from.as_ref(), to.as_ref()));
            }
        }
        m
    }

    /// Probes every pod → every pod once.
    pub fn observe(&self, c: &mut dyn Cluster, port: u16, protocol: Protocol) -> Result<Matrix> {
        c.probe_matrix(&self.peers(), &self.targets(), port, protocol)
    }

    /// Probes until the matrix equals `expected` (at most [`CONVERGE`]), then once more after
    /// a pause; returns how long convergence took.
    pub fn converge(
        &self,
        c: &mut dyn Cluster,
        step: &str,
        port: u16,
        protocol: Protocol,
        expected: &Matrix,
    ) -> Result<Duration> {
        let started = Instant::now();
        let mut observed;
        loop {
            observed = self.observe(c, port, protocol)?;
            if &observed == expected {
                break;
            }
            if started.elapsed() > CONVERGE {
                bail!(
                    "{step}: {protocol}/{port} did not converge within {CONVERGE:?}\n{}\n{}",
                    Matrix::report(expected, &observed),
                    c.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let took = started.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        // Confirm; a cell that disagrees is probed up to twice more (a slow machine must not
        // turn "reachable" into "blocked"), and must then agree.
        for attempt in 0..3 {
            observed = self.observe(c, port, protocol)?;
            if &observed == expected {
                println!("  {step}: {protocol}/{port} as expected after {took:?}");
                self.check_explain(c, step, port, protocol, &observed)?;
                return Ok(took);
            }
            if attempt < 2 {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        bail!(
            "{step}: {protocol}/{port} matched once, then differed\n{}\n{}",
            Matrix::report(expected, &observed),
            c.diagnostics()
        )
    }
}

impl Model {
    /// `palisade netpol explain` in live mode (the cluster's objects, listed through the
    /// API) must give the verdict the kernel gave, for every probe but a pod to itself.
    pub fn check_explain(
        &self,
        c: &mut dyn Cluster,
        step: &str,
        port: u16,
        protocol: Protocol,
        observed: &Matrix,
    ) -> Result<()> {
        let mut probes = String::new();
        let mut cells = Vec::new();
        for (r, from) in self.pods.iter().enumerate() {
            for (col, to) in self.pods.iter().enumerate() {
                if r == col {
                    continue;
                }
                // Sources by name, destinations by address: both resolutions are exercised.
                probes.push_str(&format!(
                    "{}\t{}\t{port}\t{}\n",
                    from.id(),
                    to.ip,
                    protocol.to_string().to_uppercase()
                ));
                cells.push((r, col));
            }
        }
        let Some(out) = c.explain_probes(&probes)? else {
            return Ok(());
        };
        let lines: Vec<&str> = out.lines().collect();
        ensure!(
            lines.len() == cells.len(),
            "{step}: explain printed {} lines for {} probes:\n{out}",
            lines.len(),
            cells.len()
        );
        let mut wrong = Vec::new();
        for (line, &(r, col)) in lines.iter().zip(&cells) {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{step}: explain printed non-JSON: {line}"))?;
            let said = v["verdict"] == "allowed";
            if said != observed.at(r, col) {
                wrong.push(format!(
                    "{} -> {}: kernel {}, explain {}: {}",
                    self.pods[r].id(),
                    self.pods[col].id(),
                    if observed.at(r, col) {
                        "reachable"
                    } else {
                        "blocked"
                    },
                    v["verdict"],
                    v["reason"]
                ));
            }
        }
        ensure!(
            wrong.is_empty(),
            "{step}: {protocol}/{port}: explain (live) disagrees with the kernel:\n{}",
            wrong.join("\n")
        );
        println!("  {step}: explain agrees on {} probes", cells.len());
        Ok(())
    }
}

/// Waits until the Service has an IP in `status.loadBalancer.ingress`; returns it.
pub fn wait_lb_ip(
    c: &mut dyn Cluster,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> Result<Ipv4Addr> {
    let found = poll(timeout, Duration::from_millis(100), || {
        let svc = c.get("v1", "Service", Some(ns), name)?;
        Ok(svc.and_then(|s| {
            s["status"]["loadBalancer"]["ingress"][0]["ip"]
                .as_str()
                .and_then(|ip| ip.parse().ok())
        }))
    })?;
    match found {
        Some(ip) => Ok(ip),
        None => bail!(
            "Service {ns}/{name} got no LoadBalancer IP within {timeout:?}\n{}",
            c.diagnostics()
        ),
    }
}

/// Whether `ip` lies in one of the pool's entries (`a-b` ranges or CIDRs).
pub fn in_pool(ip: Ipv4Addr, entries: &[String]) -> bool {
    entries.iter().any(|e| {
        if let Some((a, b)) = e.split_once('-') {
            match (a.trim().parse::<Ipv4Addr>(), b.trim().parse::<Ipv4Addr>()) {
                (Ok(a), Ok(b)) => (u32::from(a)..=u32::from(b)).contains(&u32::from(ip)),
                _ => false,
            }
        } else if let Some((net, len)) = e.split_once('/') {
            match (net.parse::<Ipv4Addr>(), len.parse::<u32>()) {
                (Ok(net), Ok(len)) if len <= 32 => {
                    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                    u32::from(ip) & mask == u32::from(net) & mask
                }
                _ => false,
            }
        } else {
            e.parse::<Ipv4Addr>() == Ok(ip)
        }
    })
}

/// An IPAddressPool `name` with the backend's addresses and an L2Advertisement for it.
pub fn pool_objects(c: &dyn Cluster, name: &str) -> Vec<Value> {
    vec![
        json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "IPAddressPool",
            "metadata": { "name": name },
            "spec": { "addresses": c.lb_pool_addresses() },
        }),
        json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "L2Advertisement",
            "metadata": { "name": name },
            "spec": { "ipAddressPools": [name] },
        }),
    ]
}

/// A `type: LoadBalancer` Service on TCP 80 selecting `app=<app>`.
pub fn lb_service(ns: &str, name: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": name, "namespace": ns },
        "spec": {
            "type": "LoadBalancer",
            "selector": { "app": app },
            "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": 80 }],
        },
    })
}

/// Waits until the client connects to `vip:80`; returns how long it took.
pub fn wait_client_reaches(
    c: &mut dyn Cluster,
    vip: Ipv4Addr,
    timeout: Duration,
) -> Result<Option<Duration>> {
    let started = Instant::now();
    let target = [("vip".to_string(), vip)];
    let ok = poll(timeout, Duration::from_millis(50), || {
        let m = c.probe_matrix(&[Peer::Client], &target, 80, Tcp)?;
        Ok(m.at(0, 0).then_some(()))
    })?;
    Ok(ok.map(|()| started.elapsed()))
}

fn stop_all(probers: Vec<(String, Box<dyn Prober>)>) -> Result<Vec<(String, ProbeLog)>> {
    probers
        .into_iter()
        .map(|(name, p)| Ok((name, p.stop()?)))
        .collect()
}

fn announcer_or_skip(c: &mut dyn Cluster, scenario: &str) -> Result<bool> {
    if c.announcer_available()? {
        return Ok(true);
    }
    println!(
        "skipped: {scenario} (client part): L2 announcement is not available in this build \
         (the agents expose no announcer/speaker metrics; set PALISADE_E2E_ANNOUNCER=1 to force)"
    );
    Ok(false)
}

// ---- scenarios --------------------------------------------------------------------------

/// Policies created, changed and deleted across two nodes, with namespace selectors, a named
/// port, an egress policy, and a deletion that must not open anything while another policy
/// still isolates the pods.
pub fn netpol_policy_lifecycle(c: &mut dyn Cluster) -> Result<()> {
    let m = Model::deploy(c, 2)?;
    m.converge(c, "no policy", 80, Tcp, &m.expect(|_, _| true))?;

    c.apply(&np(
        "x",
        "default-deny",
        json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
    ))?;
    m.converge(
        c,
        "default-deny in x",
        80,
        Tcp,
        &m.expect(|_, to| to.ns != "x"),
    )?;

    c.apply(&np(
        "x",
        "allow-from",
        json!({
            "podSelector": {},
            "ingress": [{ "from": [{ "namespaceSelector": { "matchLabels": { "ns": "y" } } }] }],
        }),
    ))?;
    let from_y = m.expect(|from, to| to.ns != "x" || from.ns == "y");
    m.converge(c, "allow-from ns=y", 80, Tcp, &from_y)?;
    m.converge(c, "allow-from ns=y", 81, Udp, &from_y)?;

    // The same policy changed: from z now, and only on the named port serve-81-tcp.
    c.apply(&np(
        "x",
        "allow-from",
        json!({
            "podSelector": {},
            "ingress": [{
                "from": [{ "namespaceSelector": { "matchLabels": { "ns": "z" } } }],
                "ports": [{ "port": "serve-81-tcp" }],
            }],
        }),
    ))?;
    m.converge(
        c,
        "allow-from changed to ns=z on serve-81-tcp",
        80,
        Tcp,
        &m.expect(|_, to| to.ns != "x"),
    )?;
    m.converge(
        c,
        "allow-from changed to ns=z on serve-81-tcp",
        81,
        Tcp,
        &m.expect(|from, to| to.ns != "x" || from.ns == "z"),
    )?;

    c.apply(&np(
        "y",
        "egress-to-z",
        json!({
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{ "to": [{ "namespaceSelector": { "matchLabels": { "ns": "z" } } }] }],
        }),
    ))?;
    let with_egress = m.expect(|from, to| to.ns != "x" && (from.ns != "y" || to.ns == "z"));
    m.converge(c, "egress from y only to z", 80, Tcp, &with_egress)?;

    // Deleting default-deny opens nothing: allow-from still selects every pod of x.
    c.delete(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        Some("x"),
        "default-deny",
    )?;
    pause_for_agents();
    m.converge(
        c,
        "default-deny deleted, allow-from still isolates x",
        80,
        Tcp,
        &with_egress,
    )?;

    c.delete(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        Some("x"),
        "allow-from",
    )?;
    m.converge(
        c,
        "allow-from deleted",
        80,
        Tcp,
        &m.expect(|from, to| from.ns != "y" || to.ns == "z"),
    )?;

    c.delete(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        Some("y"),
        "egress-to-z",
    )?;
    m.converge(c, "every policy deleted", 80, Tcp, &m.expect(|_, _| true))?;
    Ok(())
}

/// A policy whose peer is "pods labelled role=client in namespaces labelled team=blue", with
/// pods and namespaces relabelled under it, and its target relabelled out of and back into it.
pub fn netpol_relabel(c: &mut dyn Cluster) -> Result<()> {
    let m = Model::deploy(c, 2)?;
    let pod = |c: &mut dyn Cluster, id: &str, key: &str, value: Option<&str>| {
        let (ns, name) = id.split_once('/').unwrap_or(("", id));
        set_label(c, "v1", "Pod", Some(ns), name, key, value)
    };
    let ns_label = |c: &mut dyn Cluster, ns: &str, key: &str, value: Option<&str>| {
        set_label(c, "v1", "Namespace", None, ns, key, value)
    };
    c.apply(&np(
        "x",
        "a-from-blue-clients",
        json!({
            "podSelector": { "matchLabels": { "pod": "a" } },
            "ingress": [{ "from": [{
                "namespaceSelector": { "matchLabels": { "team": "blue" } },
                "podSelector": { "matchLabels": { "role": "client" } },
            }] }],
        }),
    ))?;
    let nobody = m.expect(|_, to| !to.is("x/a"));
    m.converge(c, "no blue clients yet", 80, Tcp, &nobody)?;

    ns_label(c, "y", "team", Some("blue"))?;
    pause_for_agents();
    m.converge(
        c,
        "namespace y is blue, but has no client pod",
        80,
        Tcp,
        &nobody,
    )?;

    pod(c, "y/b", "role", Some("client"))?;
    m.converge(
        c,
        "pod y/b labelled role=client",
        80,
        Tcp,
        &m.expect(|from, to| !to.is("x/a") || from.is("y/b")),
    )?;

    ns_label(c, "y", "team", None)?;
    m.converge(c, "namespace y no longer blue", 80, Tcp, &nobody)?;

    ns_label(c, "z", "team", Some("blue"))?;
    pod(c, "z/c", "role", Some("client"))?;
    m.converge(
        c,
        "namespace z blue, pod z/c client",
        80,
        Tcp,
        &m.expect(|from, to| !to.is("x/a") || from.is("z/c")),
    )?;

    // The target itself relabelled: x/a is no longer selected, so no longer isolated.
    pod(c, "x/a", "pod", Some("a-retired"))?;
    m.converge(
        c,
        "x/a relabelled out of the policy",
        80,
        Tcp,
        &m.expect(|_, _| true),
    )?;
    pod(c, "x/a", "pod", Some("a"))?;
    m.converge(
        c,
        "x/a relabelled back",
        80,
        Tcp,
        &m.expect(|from, to| !to.is("x/a") || from.is("z/c")),
    )?;
    Ok(())
}

/// Address reuse: a pod the policy allows is deleted and its address goes to a new pod the
/// policy does not allow (lab only: it picks pod addresses). The new pod must be denied; the
/// policy must follow the pod, not the address.
pub fn netpol_ip_reuse(c: &mut dyn Cluster) -> Result<()> {
    if c.backend() != "lab" {
        println!(
            "skipped: netpol_ip_reuse: the {} backend cannot choose pod addresses",
            c.backend()
        );
        return Ok(());
    }
    let m = Model::deploy(c, 2)?;
    c.apply(&np(
        "x",
        "a-from-yb",
        json!({
            "podSelector": { "matchLabels": { "pod": "a" } },
            "ingress": [{ "from": [{
                "namespaceSelector": { "matchLabels": { "ns": "y" } },
                "podSelector": { "matchLabels": { "pod": "b" } },
            }] }],
        }),
    ))?;
    m.converge(
        c,
        "x/a only from y/b",
        80,
        Tcp,
        &m.expect(|from, to| !to.is("x/a") || from.is("y/b")),
    )?;
    let old = m.pod("y/b")?.clone();
    let x_a = m.pod("x/a")?.ip;
    let node = c.node_names()[old.node - 1].clone();
    let before = c.arrivals(&Peer::pod("y/b"), 80, Tcp)?;
    c.delete("v1", "Pod", Some("y"), "b")?;
    // The same address, at once, for a pod of another namespace with other labels.
    let mut pod = c.pod_manifest("z", "reuse", &k8s::labels([("pod", "reuse")]), &node);
    pod["metadata"]["annotations"] =
        json!({ crate::kubelet::POD_IP_ANNOTATION: old.ip.to_string() });
    c.apply(&pod)?;
    let ip = poll(POD_READY, Duration::from_millis(5), || {
        Ok(c.pod_ip("z/reuse").ok())
    })?
    .context("z/reuse got no IP")?;
    ensure!(ip == old.ip, "z/reuse got {ip}, not the reused {}", old.ip);
    let prober = c.start_prober(
        &Peer::pod("z/reuse"),
        x_a,
        80,
        Tcp,
        Duration::from_millis(5),
        Duration::from_millis(50),
    )?;
    c.wait_pods_ready(&["z/reuse".to_string()], POD_READY)?;
    std::thread::sleep(Duration::from_millis(1500));
    let log = prober.stop()?;
    println!("  z/reuse (was y/b's {ip}) -> x/a: {}", log.summary());
    // Arrivals are counted per source address, which y/b and z/reuse share.
    let after = c.arrivals(&Peer::pod("z/reuse"), 80, Tcp)?;
    ensure!(
        log.successes() == 0,
        "z/reuse reached x/a {} times with y/b's old address ({}); the allow set still holds it\n{}",
        log.successes(),
        log.summary(),
        c.diagnostics()
    );
    if let (Some(b), Some(a)) = (before, after) {
        ensure!(
            a == b,
            "{} connections from {ip} arrived after y/b was deleted",
            a - b
        );
    }
    Ok(())
}

/// The restart and outage scenarios' policy: x isolated for ingress, x/a open to namespace y
/// on TCP 80 only.
fn guard_policies(c: &mut dyn Cluster) -> Result<()> {
    c.apply(&np(
        "x",
        "default-deny",
        json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
    ))?;
    c.apply(&np(
        "x",
        "a-from-y",
        json!({
            "podSelector": { "matchLabels": { "pod": "a" } },
            "ingress": [{
                "from": [{ "namespaceSelector": { "matchLabels": { "ns": "y" } } }],
                "ports": [{ "protocol": "TCP", "port": 80 }],
            }],
        }),
    ))
}

fn guard_expectation(m: &Model) -> Matrix {
    m.expect(|from, to| to.ns != "x" || (to.is("x/a") && from.ns == "y"))
}

/// Denied pairs (same node and across nodes, TCP and UDP) and allowed pairs of the guard
/// policy, probed continuously by [`guarded`].
const DENIED: &[(&str, &str, u16, Protocol)] = &[
    ("z/a", "x/a", 80, Tcp), // same node (node1)
    ("z/b", "x/a", 80, Tcp), // across nodes
    ("z/b", "x/a", 80, Udp),
    ("y/a", "x/a", 81, Tcp), // allowed namespace, wrong port
    ("z/c", "x/b", 80, Tcp), // to the other node's isolated pod
];
const ALLOWED: &[(&str, &str, u16, Protocol)] = &[
    ("y/a", "x/a", 80, Tcp), // across nodes
    ("y/b", "x/a", 80, Tcp), // same node
    ("x/b", "z/a", 80, Tcp), // not isolated
];

/// Runs `disturb` while every DENIED pair is hammered and every ALLOWED pair probed, then
/// checks that no denied probe succeeded or arrived and no allowed probe failed.
fn guarded(
    c: &mut dyn Cluster,
    m: &Model,
    what: &str,
    disturb: impl FnOnce(&mut dyn Cluster) -> Result<()>,
) -> Result<()> {
    let mut before = Vec::new();
    for (from, _, port, proto) in DENIED {
        before.push(c.arrivals(&Peer::pod(from), *port, *proto)?);
    }
    let mut probers: Vec<(String, Box<dyn Prober>)> = Vec::new();
    for (from, to, port, proto) in DENIED {
        let ip = m.pod(to)?.ip;
        let p = c.start_prober(
            &Peer::pod(from),
            ip,
            *port,
            *proto,
            Duration::from_millis(10),
            Duration::from_millis(200),
        )?;
        probers.push((format!("denied {from} -> {to} {proto}/{port}"), p));
    }
    for (from, to, port, proto) in ALLOWED {
        let ip = m.pod(to)?.ip;
        let p = c.start_prober(
            &Peer::pod(from),
            ip,
            *port,
            *proto,
            Duration::from_millis(20),
            Duration::from_secs(1),
        )?;
        probers.push((format!("allowed {from} -> {to} {proto}/{port}"), p));
    }
    let disturbed = disturb(c);
    let logs = stop_all(probers)?;
    disturbed?;
    let mut problems = Vec::new();
    for (name, log) in &logs {
        println!("  {what}: {name}: {}", log.summary());
        if name.starts_with("denied") && log.successes() > 0 {
            problems.push(format!(
                "{name}: {} probes got through ({})",
                log.successes(),
                log.summary()
            ));
        }
        if name.starts_with("allowed") && log.failures() > 0 {
            problems.push(format!(
                "{name}: {} probes failed ({}); first: {:?}",
                log.failures(),
                log.summary(),
                log.first_failures(3)
            ));
        }
        if name.starts_with("allowed") && log.successes() == 0 {
            problems.push(format!("{name}: never probed successfully"));
        }
    }
    for (i, (from, to, port, proto)) in DENIED.iter().enumerate() {
        let after = c.arrivals(&Peer::pod(from), *port, *proto)?;
        if let (Some(a), Some(b)) = (after, before[i]) {
            if a != b {
                problems.push(format!(
                    "{a_b} packets from {from} ({proto}/{port}) arrived at pods while {from} -> {to} was denied",
                    a_b = a - b
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(
            "{what}:\n  {}\n{}",
            problems.join("\n  "),
            c.diagnostics()
        ))
    }
}

/// Agents SIGKILLed and started again, one after the other, while denied pairs are hammered
/// and allowed pairs probed: nothing denied gets through at any moment, nothing allowed
/// fails; afterwards the restarted agents still follow policy changes.
pub fn agent_restart_keeps_enforcement(c: &mut dyn Cluster) -> Result<()> {
    let m = Model::deploy(c, 2)?;
    guard_policies(c)?;
    m.converge(c, "guard policies", 80, Tcp, &guard_expectation(&m))?;
    let nodes = c.node_names();
    guarded(c, &m, "agent restarts", |c| {
        for node in &nodes[..2] {
            std::thread::sleep(Duration::from_millis(500));
            c.kill_agent(node)?;
            println!("  killed the agent of {node} (SIGKILL)");
            std::thread::sleep(Duration::from_millis(1000));
            c.start_agent(node)?;
            c.wait_agent_ready(node, Duration::from_secs(30))?;
            println!("  agent of {node} restarted and ready");
        }
        // Both restarted agents have synced (and re-applied) by now.
        std::thread::sleep(Duration::from_millis(1500));
        Ok(())
    })?;
    m.converge(c, "after restarts", 80, Tcp, &guard_expectation(&m))?;
    c.delete(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        Some("x"),
        "a-from-y",
    )?;
    m.converge(
        c,
        "a policy change after the restarts",
        80,
        Tcp,
        &m.expect(|_, to| to.ns != "x"),
    )?;
    Ok(())
}

/// The API server goes away (connections dropped, then 503s) while denied pairs are hammered
/// and allowed pairs probed; an agent is even restarted during the outage (it cannot list
/// anything and must not touch the rules). Enforcement stays exactly as it was; once the API
/// is back, policy changes are followed again.
pub fn api_outage_keeps_enforcement(c: &mut dyn Cluster) -> Result<()> {
    if !c.supports_api_outage() {
        println!(
            "skipped: api_outage_keeps_enforcement: the {} backend cannot simulate an API outage",
            c.backend()
        );
        return Ok(());
    }
    let m = Model::deploy(c, 2)?;
    guard_policies(c)?;
    m.converge(c, "guard policies", 80, Tcp, &guard_expectation(&m))?;
    let node1 = c.node_names()[0].clone();
    guarded(c, &m, "API outage", |c| {
        std::thread::sleep(Duration::from_millis(300));
        c.set_api_outage(ApiOutage::Disconnect)?;
        println!("  API outage: every connection dropped");
        std::thread::sleep(Duration::from_millis(1500));
        c.kill_agent(&node1)?;
        c.start_agent(&node1)?;
        println!("  agent of {node1} restarted while the API is unreachable");
        std::thread::sleep(Duration::from_millis(2500));
        c.set_api_outage(ApiOutage::Unavailable)?;
        println!("  API outage: every request answered 503");
        std::thread::sleep(Duration::from_millis(2000));
        c.set_api_outage(ApiOutage::Off)?;
        println!("  API back");
        c.wait_agent_ready(&node1, Duration::from_secs(40))?;
        std::thread::sleep(Duration::from_millis(1000));
        Ok(())
    })
    .inspect_err(|_| {
        let _ = c.set_api_outage(ApiOutage::Off);
    })?;
    c.delete(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        Some("x"),
        "a-from-y",
    )?;
    m.converge(
        c,
        "a policy change after the outage",
        80,
        Tcp,
        &m.expect(|_, to| to.ns != "x"),
    )?;
    Ok(())
}

/// An IPAddressPool and a LoadBalancer Service: the Service gets an IP from the pool in its
/// status. With an announcer, the client connects to it, and then:
///
/// - handover: the announcing node's agent is SIGKILLed; another node must take the IP over
///   (the client's neighbour entry moves to it, by gratuitous ARP) while the client keeps
///   connecting without a single failure (the old node still forwards until then);
/// - node failure: the announcing node is cut off the LAN; the client must connect again
///   through another node (the time it takes is the failover time, printed).
pub fn lb_allocation_and_failover(c: &mut dyn Cluster) -> Result<()> {
    let nodes = c.node_names();
    namespace(c, "web", &[("ns", "web")])?;
    let mut ids = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let name = format!("web-{i}");
        c.apply(&c.pod_manifest("web", &name, &k8s::labels([("app", "web")]), node))?;
        ids.push(format!("web/{name}"));
    }
    for o in pool_objects(&*c, "lan") {
        c.apply(&o)?;
    }
    c.apply(&lb_service("web", "web", "web"))?;
    c.wait_pods_ready(&ids, POD_READY)?;
    let vip = wait_lb_ip(c, "web", "web", Duration::from_secs(20))?;
    let pool = c.lb_pool_addresses();
    ensure!(
        in_pool(vip, &pool),
        "Service web/web got {vip}, outside the pool {pool:?}"
    );
    println!("  Service web/web got {vip} from pool lan");

    if !announcer_or_skip(c, "lb_allocation_and_failover")? {
        return Ok(());
    }
    let first = wait_client_reaches(c, vip, Duration::from_secs(20))?
        .ok_or_else(|| anyhow!("the client never reached {vip}:80\n{}", c.diagnostics()))?;
    let announcer = c
        .announcing_node(vip)?
        .ok_or_else(|| anyhow!("the client reached {vip} but has no neighbour entry for it"))?;
    ensure!(
        nodes.contains(&announcer),
        "{vip} is answered by {announcer}, not a node"
    );
    println!("  client reached {vip}:80 after {first:?}; {announcer} announces it");
    wait_l2_status(c, "web", "web", &announcer, vip)?;

    // Handover: the agent dies, the node lives.
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
    std::thread::sleep(Duration::from_millis(500));
    let log = prober.stop()?;
    let Some(successor) = moved else {
        bail!(
            "{vip} still resolves to {announcer} 20s after its agent was killed\n{}",
            c.diagnostics()
        );
    };
    println!(
        "  agent of {announcer} killed: {successor} took {vip} over after {handover:?}; client: {}",
        log.summary()
    );
    ensure!(
        nodes.contains(&successor),
        "{vip} moved to {successor}, not a node"
    );
    ensure!(
        log.failures() == 0,
        "the client failed to connect {} times during the handover: {:?}",
        log.failures(),
        log.first_failures(3)
    );
    // The successor's ServiceL2Status replaces the dead node's.
    wait_l2_status(c, "web", "web", &successor, vip)?;
    c.start_agent(&announcer)?;
    c.wait_agent_ready(&announcer, Duration::from_secs(30))?;
    // Let the restarted agent rejoin the membership (and maybe win the IP back) first.
    std::thread::sleep(Duration::from_secs(2));

    // Node failure: the announcing node drops off the LAN.
    wait_client_reaches(c, vip, Duration::from_secs(10))?.ok_or_else(|| {
        anyhow!(
            "the client lost {vip} after the agent came back\n{}",
            c.diagnostics()
        )
    })?;
    let victim = c
        .announcing_node(vip)?
        .ok_or_else(|| anyhow!("no neighbour entry for {vip}"))?;
    let failed = Instant::now();
    c.isolate_node(&victim, true)?;
    let back = wait_client_reaches(c, vip, Duration::from_secs(30));
    let failover = failed.elapsed();
    let now = c.announcing_node(vip);
    c.isolate_node(&victim, false)?;
    let Some(_) = back? else {
        bail!(
            "after {victim} failed the client never reached {vip} again\n{}",
            c.diagnostics()
        );
    };
    let now = now?;
    println!("  {victim} cut off the LAN: the client connected again after {failover:?}, through {now:?}");
    ensure!(
        now.as_deref() != Some(victim.as_str()),
        "{vip} still resolves to the failed {victim}"
    );
    c.wait_agent_ready(&victim, Duration::from_secs(30))?;
    Ok(())
}

/// The Service's `ServiceL2Status` objects as `(name, status)`: one name per node is looked up
/// (`<service>.<node>`), so this works through the Cluster trait's `get` on every backend.
pub fn l2_statuses(c: &mut dyn Cluster, ns: &str, service: &str) -> Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    for n in c.node_names() {
        let name = format!("{service}.{n}");
        if let Some(o) = c.get("palisade.dev/v1alpha1", "ServiceL2Status", Some(ns), &name)? {
            out.push((name, o["status"].clone()));
        }
    }
    Ok(out)
}

/// Waits until `<service>.<node>` is the Service's only `ServiceL2Status`, saying that `node`
/// announces `vip`.
fn wait_l2_status(
    c: &mut dyn Cluster,
    ns: &str,
    service: &str,
    node: &str,
    vip: Ipv4Addr,
) -> Result<()> {
    let mut seen = Vec::new();
    let ok = poll(Duration::from_secs(15), Duration::from_millis(200), || {
        seen = l2_statuses(c, ns, service)?;
        let right = seen.len() == 1
            && seen[0].1["node"] == node
            && seen[0].1["serviceName"] == service
            && seen[0].1["ips"] == json!([vip.to_string()]);
        Ok(right.then_some(()))
    })?;
    ensure!(
        ok.is_some(),
        "ServiceL2Status of {ns}/{service}: want only {service}.{node} listing {vip}, found {seen:?}"
    );
    println!("  kubectl get servicel2statuses -n {ns}: {service}.{node} announces {vip}");
    Ok(())
}

/// A Deployment-like set of pods behind a LoadBalancer IP, under a policy that admits only the
/// LAN, replaced pod by pod (surge one, wait ready, retire one gracefully) while the client
/// connects continuously and a pod of another namespace hammers every backend pod from the
/// moment it has an IP: zero failed client connections, zero intruder packets let through.
pub fn rolling_update_behind_lb(c: &mut dyn Cluster) -> Result<()> {
    let nodes = c.node_names();
    namespace(c, "shop", &[("ns", "shop")])?;
    namespace(c, "other", &[("ns", "other")])?;
    let lan = c.lan_cidr();
    c.apply(&np(
        "shop",
        "web-from-lan",
        json!({
            "podSelector": { "matchLabels": { "app": "web" } },
            "ingress": [{
                "from": [{ "ipBlock": { "cidr": lan } }],
                "ports": [{ "protocol": "TCP", "port": 80 }],
            }],
        }),
    ))?;
    c.apply(&c.pod_manifest(
        "other",
        "intruder",
        &k8s::labels([("app", "intruder")]),
        &nodes[0],
    ))?;
    let replicas = 3;
    let mut old = Vec::new();
    for i in 0..replicas {
        let name = format!("web-v1-{i}");
        let labels = k8s::labels([("app", "web"), ("version", "v1")]);
        c.apply(&c.pod_manifest("shop", &name, &labels, &nodes[i % nodes.len()]))?;
        old.push(format!("shop/{name}"));
    }
    for o in pool_objects(&*c, "lan") {
        c.apply(&o)?;
    }
    c.apply(&lb_service("shop", "web", "web"))?;
    let mut all = old.clone();
    all.push("other/intruder".into());
    c.wait_pods_ready(&all, POD_READY)?;
    let vip = wait_lb_ip(c, "shop", "web", Duration::from_secs(20))?;
    println!("  Service shop/web got {vip}");
    if !announcer_or_skip(c, "rolling_update_behind_lb")? {
        return Ok(());
    }
    wait_client_reaches(c, vip, Duration::from_secs(20))?
        .ok_or_else(|| anyhow!("the client never reached {vip}:80\n{}", c.diagnostics()))?;

    let intruder = Peer::pod("other/intruder");
    let before = c.arrivals(&intruder, 80, Tcp)?;
    let client = c.start_prober(
        &Peer::Client,
        vip,
        80,
        Tcp,
        Duration::from_millis(20),
        Duration::from_secs(1),
    )?;
    let mut intruders: Vec<(String, Box<dyn Prober>)> = Vec::new();
    for id in &old {
        let ip = c.pod_ip(id)?;
        intruders.push((
            id.clone(),
            c.start_prober(
                &intruder,
                ip,
                80,
                Tcp,
                Duration::from_millis(10),
                Duration::from_millis(200),
            )?,
        ));
    }
    let rolled = (|| -> Result<()> {
        for (i, old_id) in old.iter().enumerate() {
            let name = format!("web-v2-{i}");
            let id = format!("shop/{name}");
            let labels = k8s::labels([("app", "web"), ("version", "v2")]);
            c.apply(&c.pod_manifest("shop", &name, &labels, &nodes[i % nodes.len()]))?;
            // Hammer the new pod from the moment it has an address (before it is ready, and
            // maybe before its node's agent has programmed it).
            let ip = poll(POD_READY, Duration::from_millis(5), || {
                Ok(c.pod_ip(&id).ok())
            })?
            .with_context(|| format!("{id} got no IP"))?;
            intruders.push((
                id.clone(),
                c.start_prober(
                    &intruder,
                    ip,
                    80,
                    Tcp,
                    Duration::from_millis(10),
                    Duration::from_millis(200),
                )?,
            ));
            c.wait_pods_ready(std::slice::from_ref(&id), POD_READY)?;
            c.delete_pod_gracefully(old_id)?;
            println!("  rolled {old_id} -> {id}");
        }
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    })();
    let client_log = client.stop()?;
    let intruder_logs = stop_all(intruders)?;
    rolled?;
    let after = c.arrivals(&intruder, 80, Tcp)?;
    println!("  client -> {vip}:80: {}", client_log.summary());
    let mut problems = Vec::new();
    if client_log.failures() > 0 {
        problems.push(format!(
            "client: {} of {} connections failed; first: {:?}",
            client_log.failures(),
            client_log.attempts.len(),
            client_log.first_failures(3)
        ));
    }
    for (id, log) in &intruder_logs {
        println!("  intruder -> {id}: {}", log.summary());
        if log.successes() > 0 {
            problems.push(format!(
                "intruder -> {id}: {} connections got through ({})",
                log.successes(),
                log.summary()
            ));
        }
    }
    if let (Some(b), Some(a)) = (before, after) {
        if a != b {
            problems.push(format!(
                "{} connections from the intruder arrived at shop pods",
                a - b
            ));
        }
    }
    ensure!(
        problems.is_empty(),
        "rolling update:\n  {}\n{}",
        problems.join("\n  "),
        c.diagnostics()
    );
    Ok(())
}

/// Which backend `tests/e2e_*.rs` run on: `PALISADE_E2E_BACKEND` = `lab` (default) or `kind`.
pub fn backend_from_env() -> Result<&'static str> {
    match std::env::var("PALISADE_E2E_BACKEND").as_deref() {
        Err(_) | Ok("") | Ok("lab") => Ok("lab"),
        Ok("kind") => Ok("kind"),
        Ok(other) => bail!("PALISADE_E2E_BACKEND={other}: use lab or kind"),
    }
}

/// Runs one scenario on the backend the environment names, with a fresh lab cluster of
/// `nodes` nodes (lab backend) or the prepared kind cluster. Skips (prints `skipped: ...`,
/// passes) when the lab cannot run here (not root); panics with the scenario's error.
pub fn run(test: &str, nodes: usize, scenario: fn(&mut dyn Cluster) -> Result<()>) {
    let backend = backend_from_env().unwrap_or_else(|e| panic!("{test}: {e:#}"));
    let started = Instant::now();
    let result = match backend {
        "kind" => crate::kind::KindCluster::from_env()
            .with_context(|| format!("{test}: connecting to the kind cluster"))
            .and_then(|mut c| {
                // One cluster for every scenario: start from a clean slate.
                c.reset()?;
                scenario(&mut c)
            }),
        _ => {
            if !crate::lab_ready(test) {
                return;
            }
            let spec = crate::lab_cluster::LabClusterSpec::new(nodes);
            match crate::lab_cluster::LabCluster::start(spec) {
                Ok(mut c) => {
                    println!("{test}: lab {} up in {:?}", c.prefix(), started.elapsed());
                    scenario(&mut c)
                }
                Err(e) => Err(e.context("building the lab cluster")),
            }
        }
    };
    match result {
        Ok(()) => println!("{test} ({backend}): passed in {:?}", started.elapsed()),
        Err(e) => panic!(
            "{test} ({backend}) failed after {:?}: {e:#}",
            started.elapsed()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_membership() {
        let pool = vec![
            "198.51.100.200-198.51.100.250".to_string(),
            "172.18.255.0/28".to_string(),
        ];
        assert!(in_pool("198.51.100.200".parse().unwrap(), &pool));
        assert!(in_pool("198.51.100.250".parse().unwrap(), &pool));
        assert!(!in_pool("198.51.100.251".parse().unwrap(), &pool));
        assert!(in_pool("172.18.255.15".parse().unwrap(), &pool));
        assert!(!in_pool("172.18.255.16".parse().unwrap(), &pool));
    }

    #[test]
    fn expectations_keep_the_diagonal() {
        let m = Model {
            pods: vec![
                ModelPod {
                    ns: "x".into(),
                    name: "a".into(),
                    node: 1,
                    ip: "10.244.1.2".parse().unwrap(),
                },
                ModelPod {
                    ns: "y".into(),
                    name: "a".into(),
                    node: 2,
                    ip: "10.244.2.2".parse().unwrap(),
                },
            ],
        };
        let e = m.expect(|_, _| false);
        assert_eq!(e.get("x/a", "x/a"), Some(true));
        assert_eq!(e.get("x/a", "y/a"), Some(false));
    }
}
