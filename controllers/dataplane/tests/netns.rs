//! The real executor in fresh network namespaces (root only; skipped otherwise).
//!
//! Nothing here touches the namespace the test runs in: every command goes through
//! `ip netns exec`, veths are created inside the node namespace, and dropping the
//! [`Netns`] guards deletes the namespaces (and with them every ipset and rule), also when
//! an assertion fails.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use palisade_dataplane::netns::{is_root, Netns};
use palisade_dataplane::{Backend, DataplaneError, Executor, KernelExecutor};
use palisade_netpol::builders::*;
use palisade_netpol::k8s_openapi::api::core::v1::Pod;
use palisade_netpol::k8s_openapi::api::networking::v1::NetworkPolicy;
use palisade_netpol::{compile, names, render, NodeConfig, Payload};
use serde_json::json;

fn skip_reason() -> Option<String> {
    if !is_root() {
        return Some("needs root".into());
    }
    for tool in ["ip", "ipset"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("{tool} not installed"));
        }
    }
    match Netns::create("pal-dp-probe") {
        Ok(_) => None,
        Err(e) => Some(format!("cannot create network namespaces: {e}")),
    }
}

macro_rules! skip_unless_root {
    () => {
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

fn payload(pods: Vec<Pod>, policies: Vec<NetworkPolicy>) -> Payload {
    let st = cluster(
        vec![mk_node("n1", "10.244.1.0/24")],
        vec![mk_ns("a", &[("team", "a")]), mk_ns("b", &[("team", "b")])],
        pods,
        policies,
    );
    let c = compile(&st, &NodeConfig::new("n1"));
    assert!(c.diagnostics.is_empty(), "{:?}", c.diagnostics);
    render(&c)
}

fn base_pods() -> Vec<Pod> {
    vec![
        with_ports(
            mk_pod("a", "web-1", &[("app", "web")], "10.244.1.10", "n1"),
            &[("http", 8080, "TCP")],
        ),
        mk_pod("a", "api-1", &[("app", "api")], "10.244.1.11", "n1"),
        with_ports(
            mk_pod("b", "db-1", &[("app", "db")], "10.244.2.20", "n2"),
            &[("pg", 5432, "TCP")],
        ),
    ]
}

fn policies_v1() -> Vec<NetworkPolicy> {
    vec![
        mk_policy("a", "deny", json!({"podSelector": {}})),
        mk_policy(
            "a",
            "web",
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}], "ports": [{"port": "http"}]}
            ]}),
        ),
        mk_policy(
            "a",
            "api-egress",
            json!({"podSelector": {"matchLabels": {"app": "api"}}, "policyTypes": ["Egress"], "egress": [
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]},
                {"to": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}], "ports": [{"port": "pg"}]}
            ]}),
        ),
    ]
}

fn policies_v2() -> Vec<NetworkPolicy> {
    let mut p = policies_v1();
    p.retain(|x| x.metadata.name.as_deref() != Some("web"));
    p.push(mk_policy(
        "a",
        "web-v2",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"app": "api"}}}], "ports": [{"port": 8080, "endPort": 8090}]}
        ]}),
    ));
    p
}

fn save_tool(b: Backend) -> &'static str {
    match b {
        Backend::Nft => "iptables-nft-save",
        Backend::Legacy => "iptables-legacy-save",
        Backend::System => "iptables-save",
    }
}

fn iptables_tool(b: Backend) -> &'static str {
    match b {
        Backend::Nft => "iptables-nft",
        Backend::Legacy => "iptables-legacy",
        Backend::System => "iptables",
    }
}

/// Asserts the namespace holds exactly the payload's chains/rules/sets, hooks at position 1,
/// and the foreign objects untouched.
fn assert_kernel_matches(ns: &Netns, b: Backend, p: &Payload) {
    let saved = ns.exec(save_tool(b), &["-t", "filter"]).expect("save");
    let mut ours: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut forward = Vec::new();
    let mut input = Vec::new();
    for l in saved.lines() {
        if let Some(d) = l.strip_prefix(':') {
            let n = d.split_whitespace().next().unwrap_or_default();
            if names::is_ours_chain(n) {
                ours.entry(n.to_string()).or_default();
            }
        } else if let Some(r) = l.strip_prefix("-A ") {
            let chain = r.split_whitespace().next().unwrap_or_default();
            if names::is_ours_chain(chain) {
                ours.entry(chain.to_string())
                    .or_default()
                    .push(l.to_string());
            } else if chain == "FORWARD" {
                forward.push(l.to_string());
            } else if chain == "INPUT" {
                input.push(l.to_string());
            }
        }
    }
    assert_eq!(ours, p.chain_rules(), "our chains in the kernel:\n{saved}");
    assert_eq!(
        forward.first().map(String::as_str),
        Some("-A FORWARD -j PALISADE-FORWARD")
    );
    assert_eq!(
        input.first().map(String::as_str),
        Some("-A INPUT -j PALISADE-INPUT")
    );
    assert_eq!(forward.iter().filter(|l| l.contains("PALISADE")).count(), 1);
    assert_eq!(input.iter().filter(|l| l.contains("PALISADE")).count(), 1);
    // Foreign objects survive.
    assert!(
        forward.contains(&"-A FORWARD -j FOREIGN".to_string()),
        "{saved}"
    );
    assert!(
        saved.contains("-A FOREIGN -s 192.0.2.1/32 -j ACCEPT"),
        "{saved}"
    );
    assert!(
        input.contains(&"-A INPUT -s 192.0.2.2/32 -j DROP".to_string()),
        "{saved}"
    );

    let listed = ns.exec("ipset", &["list", "-n"]).expect("ipset list");
    let sets: BTreeSet<String> = listed.lines().map(str::to_string).collect();
    let ours: BTreeSet<String> = sets
        .iter()
        .filter(|s| names::is_ours_set(s))
        .cloned()
        .collect();
    assert_eq!(ours, p.sets, "our sets in the kernel");
    assert!(sets.contains("foreign-set") && sets.contains("KUBE-TEST"));
    let foreign = ns.exec("ipset", &["list", "foreign-set"]).expect("list");
    assert!(foreign.contains("192.0.2.1"));
    for s in &p.set_specs {
        let saved = ns.exec("ipset", &["save", &s.name]).expect("save set");
        let members: BTreeSet<String> = saved
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("add {} ", s.name)))
            .map(str::to_string)
            .collect();
        let want: BTreeSet<String> = s.members.iter().map(ToString::to_string).collect();
        assert_eq!(members, want, "members of {}", s.name);
    }
}

fn converge_with(backend: &str) {
    let ns = Netns::create("pal-dp").expect("netns");
    let exec = match KernelExecutor::detect_in_netns(ns.name(), backend) {
        Ok(x) => x,
        Err(DataplaneError::BinaryNotFound { tool }) => {
            eprintln!("skipped backend {backend}: {tool} missing");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let b = exec.backend();
    let ipt = iptables_tool(b);
    // Someone else's chain, rules and sets, before we start.
    ns.sh(&format!(
        "{ipt} -N FOREIGN && {ipt} -A FOREIGN -s 192.0.2.1 -j ACCEPT && {ipt} -A FORWARD -j FOREIGN \
         && {ipt} -A INPUT -s 192.0.2.2 -j DROP \
         && ipset create foreign-set hash:ip && ipset add foreign-set 192.0.2.1 \
         && ipset create KUBE-TEST hash:net"
    ))
    .expect("foreign setup");

    // 1. First apply creates everything.
    let p1 = payload(base_pods(), policies_v1());
    let r = exec.apply(&p1).expect("apply p1");
    assert!(r.changed && r.iptables_applied && r.verified, "{r:?}");
    assert_eq!(r.sets_created, p1.sets.len());
    assert_eq!(r.hooks_fixed, 2);
    assert_kernel_matches(&ns, b, &p1);

    // 2. The same payload again, by this executor and by a fresh one: nothing to do.
    let r = exec.apply(&p1).expect("re-apply");
    assert!(!r.changed && r.verified, "{r:?}");
    let fresh = KernelExecutor::detect_in_netns(ns.name(), backend).expect("detect");
    assert_eq!(
        fresh.backend(),
        b,
        "auto-detection prefers the backend in use"
    );
    let r = fresh.apply(&p1).expect("fresh re-apply");
    assert!(!r.changed, "{r:?}");
    assert_kernel_matches(&ns, b, &p1);

    // 3. Other policies: stale chains and sets are removed.
    let p2 = payload(base_pods(), policies_v2());
    let stale_chains: Vec<&String> = p1.chains.difference(&p2.chains).collect();
    let stale_sets: Vec<&String> = p1.sets.difference(&p2.sets).collect();
    assert!(!stale_chains.is_empty() && !stale_sets.is_empty());
    let r = exec.apply(&p2).expect("apply p2");
    assert!(r.changed && !r.verified, "{r:?}");
    assert!(
        r.chains_written < p2.chains.len(),
        "only changed chains are rewritten: {r:?}"
    );
    assert_eq!(r.chains_deleted, stale_chains.len());
    assert_eq!(r.sets_destroyed, stale_sets.len());
    assert_kernel_matches(&ns, b, &p2);

    // 4. A remote pod appears: only set members change, iptables is not run.
    let mut pods = base_pods();
    pods.push(with_ports(
        mk_pod("b", "db-2", &[("app", "db")], "10.244.3.7", "n3"),
        &[("pg", 5432, "TCP")],
    ));
    let p3 = payload(pods, policies_v2());
    assert_eq!(p3.iptables_restore, p2.iptables_restore);
    let r = exec.apply(&p3).expect("apply p3");
    assert!(r.changed && !r.iptables_applied, "{r:?}");
    assert!(r.sets_updated >= 1 && r.sets_created == 0 && r.sets_destroyed == 0);
    assert_eq!(
        r.sets_patched, r.sets_updated,
        "one new member: add, no swap"
    );
    assert_kernel_matches(&ns, b, &p3);

    // 5. Drift: someone inserts a rule above our hook and duplicates it; a leftover temp
    //    set of ours lingers. The same payload again (a resync) repairs all of it.
    //    Also an apply killed half-way: a set with a wrong member and its temp twin left.
    let pod_set = p3
        .set_specs
        .iter()
        .find(|s| s.name.starts_with("PAL-P4-"))
        .expect("a pod set");
    ns.sh(&format!(
        "{ipt} -I FORWARD 1 -j ACCEPT && {ipt} -A FORWARD -j PALISADE-FORWARD \
         && ipset create PAL-P4-LEFTOVER-T hash:ip \
         && ipset add {s} 10.99.99.99 && ipset create {s}-T hash:ip && ipset add {s}-T 10.1.1.1",
        s = pod_set.name
    ))
    .expect("drift");
    let r = exec.apply(&p3).expect("repair");
    assert!(r.verified && r.changed && r.hooks_fixed == 1, "{r:?}");
    // One wrong member is patched in place; both leftover temp sets are destroyed.
    assert!(r.sets_updated == 1 && r.sets_patched == 1, "{r:?}");
    assert!(r.sets_destroyed == 2 && r.warnings.is_empty(), "{r:?}");
    let saved = ns.exec(save_tool(b), &["-t", "filter"]).expect("save");
    assert!(saved.contains("-A FORWARD -j ACCEPT"), "foreign rule kept");
    assert_kernel_matches(&ns, b, &p3);

    // 6. A payload the kernel rejects: error names the line, previous rules stay.
    let mut bad = p3.clone();
    bad.iptables_restore = bad.iptables_restore.replace(
        "COMMIT\n",
        "-A PALISADE-FORWARD -m set --match-set PAL-P4-NOPE src -j DROP\nCOMMIT\n",
    );
    match exec.apply(&bad) {
        Err(DataplaneError::CommandFailed {
            line, offending, ..
        }) => {
            assert!(line.is_some(), "line number reported");
            assert!(
                offending
                    .as_deref()
                    .unwrap_or_default()
                    .contains("PAL-P4-NOPE"),
                "{offending:?}"
            );
        }
        other => panic!("expected a restore failure, got {other:?}"),
    }
    assert_kernel_matches(&ns, b, &p3);
    let r = exec.apply(&p3).expect("recover");
    assert!(r.verified && !r.changed, "{r:?}");
}

#[test]
fn executor_converges_in_fresh_netns_nft() {
    skip_unless_root!();
    converge_with("nft");
}

#[test]
fn executor_converges_in_fresh_netns_legacy() {
    skip_unless_root!();
    // Legacy needs the ip_tables kernel module; skip if this kernel cannot.
    let probe = Netns::create("pal-dp-leg").expect("netns");
    if probe.exec("iptables-legacy-save", &[]).is_err() {
        eprintln!("skipped: iptables-legacy unusable here");
        return;
    }
    drop(probe);
    converge_with("legacy");
}

/// A server in a pod namespace (killed on drop, before the namespace goes).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const SERVER: &str = r#"
import socket, sys, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    while True:
        c, _ = s.accept(); c.close()
for p in sys.argv[1:]:
    threading.Thread(target=serve, args=(int(p),), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

const CLIENT: &str = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.7).close()";

fn python() -> Option<&'static str> {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
}

fn serve(ns: &Netns, py: &str) -> Server {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), py, "-c", SERVER, "8080", "9090"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("server");
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    assert_eq!(line.trim(), "ready");
    Server(child)
}

fn connects(from: &Netns, py: &str, ip: &str, port: u16) -> bool {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            from.name(),
            py,
            "-c",
            CLIENT,
            ip,
            &port.to_string(),
        ])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn real_packets_follow_the_policy() {
    skip_unless_root!();
    let Some(py) = python() else {
        eprintln!("skipped: no python3 for the probe servers");
        return;
    };
    // node + three routed pods (Calico-style: /32 on eth0, default via 169.254.1.1).
    let node = Netns::create("pal-dp-node").expect("netns");
    let pods: Vec<(Netns, &str)> = [("10.244.1.10"), ("10.244.1.11"), ("10.244.1.12")]
        .into_iter()
        .map(|ip| (Netns::create("pal-dp-pod").expect("netns"), ip))
        .collect();
    node.sh("ip link set lo up && sysctl -qw net.ipv4.ip_forward=1")
        .expect("node setup");
    for (i, (pod, ip)) in pods.iter().enumerate() {
        node.sh(&format!(
            "ip link add h{i} type veth peer name eth0 netns {pod} && ip link set h{i} up \
             && ip addr add 169.254.1.1/32 dev h{i} && ip route add {ip}/32 dev h{i}",
            pod = pod.name()
        ))
        .expect("veth");
        pod.sh(&format!(
            "ip link set lo up && ip link set eth0 up && ip addr add {ip}/32 dev eth0 \
             && ip route add 169.254.1.1 dev eth0 && ip route add default via 169.254.1.1 dev eth0"
        ))
        .expect("pod setup");
    }
    let servers: Vec<Server> = pods.iter().map(|(p, _)| serve(p, py)).collect();
    let (client, server, unknown) = (&pods[0].0, &pods[1].0, &pods[2].0);
    let (client_ip, server_ip, unknown_ip) = (pods[0].1, pods[1].1, pods[2].1);

    // Before any policy everything flows.
    assert!(connects(client, py, server_ip, 9090));

    // x/client may only talk to x/server; x/server accepts only the client on `http`.
    let st = cluster(
        vec![mk_node("n1", "10.244.1.0/24")],
        vec![mk_ns("x", &[])],
        vec![
            mk_pod("x", "client", &[("app", "client")], client_ip, "n1"),
            with_ports(
                mk_pod("x", "server", &[("app", "server")], server_ip, "n1"),
                &[("http", 8080, "TCP")],
            ),
        ],
        vec![
            mk_policy(
                "x",
                "server",
                json!({"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [
                    {"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": "http"}]}
                ]}),
            ),
            mk_policy(
                "x",
                "client",
                json!({"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"], "egress": [
                    {"to": [{"podSelector": {"matchLabels": {"app": "server"}}}]}
                ]}),
            ),
        ],
    );
    let p = render(&compile(&st, &NodeConfig::new("n1")));
    let exec = KernelExecutor::detect_in_netns(node.name(), "auto").expect("detect");
    exec.apply(&p).expect("apply");

    assert!(
        connects(client, py, server_ip, 8080),
        "client → server:http allowed"
    );
    assert!(
        !connects(client, py, server_ip, 9090),
        "server ingress allows only http"
    );
    assert!(
        connects(server, py, client_ip, 9090),
        "client is not ingress-isolated"
    );
    assert!(
        !connects(client, py, unknown_ip, 8080),
        "client egress only to server"
    );
    assert!(
        !connects(server, py, unknown_ip, 8080),
        "unknown local pod gets nothing"
    );
    assert!(
        !connects(unknown, py, client_ip, 8080),
        "... in either direction"
    );
    assert!(
        connects(&node, py, server_ip, 9090),
        "the node reaches its pods"
    );

    // A policy change (only the changed chain is rewritten) takes effect.
    let mut st = st;
    st.policies[0] = std::sync::Arc::new(mk_policy(
        "x",
        "server",
        json!({"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": "http"}, {"port": 9090}]}
        ]}),
    ));
    let r = exec
        .apply(&render(&compile(&st, &NodeConfig::new("n1"))))
        .expect("apply 2");
    assert!(r.chains_written >= 1 && !r.verified, "{r:?}");
    assert!(connects(client, py, server_ip, 9090), "now allowed");

    // The unknown pod becomes a known client: dispatch + set membership change.
    st.pods.push(std::sync::Arc::new(mk_pod(
        "x",
        "client-2",
        &[("app", "client")],
        unknown_ip,
        "n1",
    )));
    exec.apply(&render(&compile(&st, &NodeConfig::new("n1"))))
        .expect("apply 3");
    assert!(
        connects(unknown, py, server_ip, 8080),
        "the new client is allowed in"
    );
    assert!(
        !connects(unknown, py, client_ip, 8080),
        "client-2's egress only reaches the server"
    );
    drop(servers);
}

#[test]
fn ten_thousand_ip_block_excepts_apply_to_the_kernel() {
    skip_unless_root!();
    let ns = Netns::create("pal-dp-exc").expect("netns");
    let exec = KernelExecutor::detect_in_netns(ns.name(), "auto").expect("detect");
    let excepts: Vec<String> = (0..10_000u32)
        .map(|i| format!("10.100.{}.{}/30", i / 64, (i % 64) * 4))
        .collect();
    let p = payload(
        base_pods(),
        vec![mk_policy(
            "a",
            "many-excepts",
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [
                {"ipBlock": {"cidr": "10.0.0.0/8", "except": excepts}}
            ]}]}),
        )],
    );
    let r = exec.apply(&p).expect("apply 10,000 excepts");
    assert!(r.changed && r.verified, "{r:?}");
    // The kernel holds the set with every nomatch entry.
    let set = p
        .set_specs
        .iter()
        .find(|s| s.members.len() == 10_001)
        .expect("the except set");
    let listed = ns.exec("ipset", &["list", &set.name]).expect("ipset list");
    let nomatch = listed.lines().filter(|l| l.ends_with("nomatch")).count();
    assert_eq!(
        nomatch,
        10_000,
        "kernel set:\n{}",
        &listed[..listed.len().min(2000)]
    );
    // And a re-apply is a no-op.
    let r = exec.apply(&p).expect("re-apply");
    assert!(!r.changed, "{r:?}");
}
