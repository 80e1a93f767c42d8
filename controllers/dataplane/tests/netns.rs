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
use palisade_netpol::{compile, names, render, Family, NodeConfig, Payload};
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
                {"to": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}], "ports": [{"port": "pg"}]},
                // A /0 without excepts: `iptables-save` prints no `-d`, the renderer neither
                // (else every re-apply below would find the chain changed).
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 53, "protocol": "UDP"}]}
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

/// x/server accepts only x/client, on its port named `http`; x/client may only reach
/// x/server.
fn client_server_policies() -> Vec<NetworkPolicy> {
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
    ]
}

fn serve(ns: &Netns, py: &str) -> Server {
    serve_script(ns, py, SERVER)
}

/// Runs a probe server script (ports 8080 and 9090) in `ns`, once it says it is ready.
fn serve_script(ns: &Netns, py: &str, script: &str) -> Server {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), py, "-c", script, "8080", "9090"])
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
        client_server_policies(),
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

/// A dual-stack probe server: one socket on `::` takes IPv4 and IPv6 (bindv6only is 0).
const SERVER6: &str = r#"
import socket, sys, threading
def serve(port):
    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(64)
    while True:
        c, _ = s.accept(); c.close()
for p in sys.argv[1:]:
    threading.Thread(target=serve, args=(int(p),), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// Dual-stack: the same objects compiled per family and applied by one executor per family
/// in the same node. Both families enforce the same policy on real packets; each family's
/// executor leaves the other family's sets alone (they share the kernel's ipset namespace);
/// an egress-isolated pod still resolves its IPv6 gateway (Neighbor Solicitations from its
/// global address reach the node's INPUT chain and must pass).
#[test]
fn dual_stack_real_packets_follow_the_policy_in_both_families() {
    skip_unless_root!();
    let Some(py) = python() else {
        eprintln!("skipped: no python3 for the probe servers");
        return;
    };
    let six = Command::new("ip6tables-save").arg("--version").output();
    if six.is_err() {
        eprintln!("skipped: ip6tables not installed");
        return;
    }
    let node = Netns::create("pal-dp6-node").expect("netns");
    let addrs = [
        ("10.244.1.10", "fd00:10:1::10"),
        ("10.244.1.11", "fd00:10:1::11"),
        ("10.244.1.12", "fd00:10:1::12"),
    ];
    let pods: Vec<Netns> = addrs
        .iter()
        .map(|_| Netns::create("pal-dp6-pod").expect("netns"))
        .collect();
    let no_dad = "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0";
    node.sh(&format!(
        "{no_dad} && ip link set lo up && sysctl -qw net.ipv4.ip_forward=1 \
         net.ipv6.conf.all.forwarding=1"
    ))
    .expect("node setup");
    for (i, (pod, (v4, v6))) in pods.iter().zip(addrs).enumerate() {
        pod.sh(no_dad).expect("pod sysctl");
        node.sh(&format!(
            "ip link add h{i} type veth peer name eth0 netns {pod} && ip link set h{i} up \
             && ip addr add 169.254.1.1/32 dev h{i} && ip route add {v4}/32 dev h{i} \
             && ip -6 addr add fe80::1/64 dev h{i} nodad && ip -6 route add {v6}/128 dev h{i}",
            pod = pod.name()
        ))
        .expect("veth");
        pod.sh(&format!(
            "ip link set lo up && ip link set eth0 up && ip addr add {v4}/32 dev eth0 \
             && ip route add 169.254.1.1 dev eth0 && ip route add default via 169.254.1.1 dev eth0 \
             && ip -6 addr add {v6}/128 dev eth0 nodad && ip -6 route add default via fe80::1 dev eth0"
        ))
        .expect("pod setup");
    }
    let servers: Vec<Server> = pods.iter().map(|p| serve_script(p, py, SERVER6)).collect();
    let (client, server, unknown) = (&pods[0], &pods[1], &pods[2]);
    for (v4, v6) in [addrs[1], addrs[2]] {
        assert!(connects(client, py, v4, 9090), "before policies: {v4}");
        assert!(connects(client, py, v6, 9090), "before policies: {v6}");
    }

    let st = cluster(
        vec![mk_node_cidrs("n1", &["10.244.1.0/24", "fd00:10:1::/64"])],
        vec![mk_ns("x", &[])],
        vec![
            with_pod_ips(
                mk_pod("x", "client", &[("app", "client")], "", "n1"),
                &[addrs[0].0, addrs[0].1],
            ),
            with_ports(
                with_pod_ips(
                    mk_pod("x", "server", &[("app", "server")], "", "n1"),
                    &[addrs[1].0, addrs[1].1],
                ),
                &[("http", 8080, "TCP")],
            ),
        ],
        client_server_policies(),
    );
    let cfg = |family| {
        let mut c = NodeConfig::new("n1");
        c.family = family;
        c
    };
    let p4 = render(&compile(&st, &cfg(Family::V4)));
    let p6 = render(&compile(&st, &cfg(Family::V6)));
    let exec4 = KernelExecutor::for_family(Family::V4, "auto", Some(node.name())).expect("v4");
    let exec6 =
        KernelExecutor::for_family(Family::V6, exec4.backend().as_flag(), Some(node.name()))
            .expect("v6");
    assert_eq!(exec6.backend(), exec4.backend());
    // The wrong family is refused, not applied.
    assert!(matches!(
        exec6.apply(&p4),
        Err(DataplaneError::WrongFamily { .. })
    ));
    exec4.apply(&p4).expect("apply v4");
    exec6.apply(&p6).expect("apply v6");
    // Applying one family again (a resync reads the kernel back) keeps the other's sets.
    let r = exec4.apply(&p4).expect("resync v4");
    assert!(r.verified && r.sets_destroyed == 0, "{r:?}");
    // The kernel prints the IPv6 rules back exactly as rendered: a resync rewrites nothing.
    let r = exec6.apply(&p6).expect("resync v6");
    assert!(
        r.verified && !r.iptables_applied && r.sets_destroyed == 0 && !r.changed,
        "{r:?}"
    );
    let listed = node.exec("ipset", &["list", "-n"]).expect("ipset list");
    for s in p4.sets.iter().chain(&p6.sets) {
        assert!(
            listed.lines().any(|l| l == s),
            "{s} missing after resync: {listed}"
        );
    }
    let v6_rules = node
        .exec("ip6tables-save", &["-t", "filter"])
        .unwrap_or_default();
    let v6_rules = if v6_rules.contains("PALISADE-FORWARD") {
        v6_rules
    } else {
        let tool = match exec6.backend() {
            Backend::Legacy => "ip6tables-legacy-save",
            _ => "ip6tables-nft-save",
        };
        node.exec(tool, &["-t", "filter"]).expect("ip6tables-save")
    };
    assert!(
        v6_rules.contains("-A FORWARD -j PALISADE-FORWARD"),
        "{v6_rules}"
    );

    // Forget every neighbour learnt before the policies: IPv6 neighbour discovery must work
    // under isolation (ARP is not IP; NDP is ICMPv6 and crosses the filter table).
    for ns in std::iter::once(&node).chain(&pods) {
        ns.sh("ip -6 neigh flush all; ip -4 neigh flush all")
            .expect("neigh flush");
    }
    for (fam, i) in [("IPv4", 0usize), ("IPv6", 1)] {
        let ip = |k: usize| if i == 0 { addrs[k].0 } else { addrs[k].1 };
        assert!(
            connects(client, py, ip(1), 8080),
            "{fam}: client → server:http allowed"
        );
        assert!(
            !connects(client, py, ip(1), 9090),
            "{fam}: server ingress allows only http"
        );
        assert!(
            connects(server, py, ip(0), 9090),
            "{fam}: client is not ingress-isolated"
        );
        assert!(
            !connects(client, py, ip(2), 8080),
            "{fam}: client egress only to server"
        );
        assert!(
            !connects(unknown, py, ip(0), 8080),
            "{fam}: unknown local pod gets nothing"
        );
        assert!(
            !connects(server, py, ip(2), 8080),
            "{fam}: ... in either direction"
        );
        assert!(
            connects(&node, py, ip(1), 9090),
            "{fam}: the node reaches its pods"
        );
    }
    // The egress-isolated client resolved its IPv6 gateway (and the node the client): the
    // neighbour entries exist, so NDP passed the isolation.
    let neigh = client.sh("ip -6 neigh show dev eth0").expect("ip neigh");
    assert!(
        neigh.contains("fe80::1"),
        "client has no neighbour entry for its gateway: {neigh}"
    );
    drop(servers);
}

/// ClusterNetworkPolicies on real packets in both families, and the kernel's round trip of
/// their rules (tiered profiles, CNP chains, the pass bit): a resync of the same payloads
/// rewrites nothing.
///
/// NetworkPolicy: the server accepts nothing. Admin: the server accepts the client on 9090
/// (beats the NetworkPolicy deny); the client may not reach the server's IPv6 address
/// (networks peer, IPv6 only) and passes everything else to the Baseline, which denies the
/// client's egress to the third pod.
#[test]
fn cluster_network_policies_dual_stack_real_packets() {
    skip_unless_root!();
    let Some(py) = python() else {
        eprintln!("skipped: no python3 for the probe servers");
        return;
    };
    if Command::new("ip6tables-save")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: ip6tables not installed");
        return;
    }
    let node = Netns::create("pal-cnp6-node").expect("netns");
    let addrs = [
        ("10.244.1.10", "fd00:10:1::10"),
        ("10.244.1.11", "fd00:10:1::11"),
        ("10.244.1.12", "fd00:10:1::12"),
    ];
    let pods: Vec<Netns> = addrs
        .iter()
        .map(|_| Netns::create("pal-cnp6-pod").expect("netns"))
        .collect();
    let no_dad = "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0";
    node.sh(&format!(
        "{no_dad} && ip link set lo up && sysctl -qw net.ipv4.ip_forward=1 \
         net.ipv6.conf.all.forwarding=1"
    ))
    .expect("node setup");
    for (i, (pod, (v4, v6))) in pods.iter().zip(addrs).enumerate() {
        pod.sh(no_dad).expect("pod sysctl");
        node.sh(&format!(
            "ip link add h{i} type veth peer name eth0 netns {pod} && ip link set h{i} up \
             && ip addr add 169.254.1.1/32 dev h{i} && ip route add {v4}/32 dev h{i} \
             && ip -6 addr add fe80::1/64 dev h{i} nodad && ip -6 route add {v6}/128 dev h{i}",
            pod = pod.name()
        ))
        .expect("veth");
        pod.sh(&format!(
            "ip link set lo up && ip link set eth0 up && ip addr add {v4}/32 dev eth0 \
             && ip route add 169.254.1.1 dev eth0 && ip route add default via 169.254.1.1 dev eth0 \
             && ip -6 addr add {v6}/128 dev eth0 nodad && ip -6 route add default via fe80::1 dev eth0"
        ))
        .expect("pod setup");
    }
    let servers: Vec<Server> = pods.iter().map(|p| serve_script(p, py, SERVER6)).collect();
    let (client, server, third) = (&pods[0], &pods[1], &pods[2]);

    let mut st = cluster(
        vec![mk_node_cidrs("n1", &["10.244.1.0/24", "fd00:10:1::/64"])],
        vec![mk_ns("x", &[])],
        ["client", "server", "third"]
            .iter()
            .zip(addrs)
            .map(|(name, (v4, v6))| {
                with_pod_ips(mk_pod("x", name, &[("app", name)], "", "n1"), &[v4, v6])
            })
            .collect(),
        vec![mk_policy(
            "x",
            "server-deny",
            json!({"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"]}),
        )],
    );
    let app = |a: &str| json!({"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": a}}}});
    st.cluster_policies = vec![
        std::sync::Arc::new(mk_cnp(
            "server-from-client",
            json!({"tier": "Admin", "priority": 1,
                   "subject": {"pods": app("server")["pods"].clone()},
                   "ingress": [{"action": "Accept", "from": [app("client")],
                                "protocols": [{"tcp": {"destinationPort": {"number": 9090}}}]}]}),
        )),
        std::sync::Arc::new(mk_cnp(
            "client-out",
            json!({"tier": "Admin", "priority": 2,
            "subject": {"pods": app("client")["pods"].clone()},
            "egress": [
                {"action": "Deny", "to": [{"networks": [format!("{}/128", addrs[1].1)]}]},
                {"action": "Pass", "to": [{"networks": ["0.0.0.0/0", "::/0"]}]},
            ]}),
        )),
        std::sync::Arc::new(mk_cnp(
            "baseline-client",
            json!({"tier": "Baseline", "priority": 1,
                   "subject": {"pods": app("client")["pods"].clone()},
                   "egress": [{"action": "Deny", "to": [app("third")]}]}),
        )),
    ];
    let cfg = |family| {
        let mut c = NodeConfig::new("n1");
        c.family = family;
        c
    };
    let c4 = compile(&st, &cfg(Family::V4));
    assert!(c4.diagnostics.is_empty(), "{:?}", c4.diagnostics);
    let p4 = render(&c4);
    let p6 = render(&compile(&st, &cfg(Family::V6)));
    assert!(p4.iptables_restore.contains(names::CNP_PASS_CHAIN));
    let exec4 = KernelExecutor::for_family(Family::V4, "auto", Some(node.name())).expect("v4");
    let exec6 =
        KernelExecutor::for_family(Family::V6, exec4.backend().as_flag(), Some(node.name()))
            .expect("v6");
    exec4.apply(&p4).expect("apply v4");
    exec6.apply(&p6).expect("apply v6");
    for (exec, p) in [(&exec4, &p4), (&exec6, &p6)] {
        let r = exec.apply(p).expect("resync");
        assert!(
            r.verified && !r.iptables_applied && !r.changed,
            "the kernel prints the CNP rules back as rendered: {r:?}"
        );
    }
    for ns in std::iter::once(&node).chain(&pods) {
        ns.sh("ip -6 neigh flush all; ip -4 neigh flush all")
            .expect("neigh flush");
    }
    let (v4, v6) = (|k: usize| addrs[k].0, |k: usize| addrs[k].1);
    assert!(
        connects(client, py, v4(1), 9090),
        "Admin Accept beats the NP deny"
    );
    assert!(
        !connects(client, py, v4(1), 8080),
        "not on 8080: the NP deny"
    );
    assert!(!connects(third, py, v4(1), 9090), "only the client");
    assert!(
        !connects(client, py, v6(1), 9090),
        "IPv6 networks Deny (egress)"
    );
    assert!(
        !connects(client, py, v4(2), 8080),
        "Pass → Baseline Deny (IPv4)"
    );
    assert!(
        !connects(client, py, v6(2), 8080),
        "Pass → Baseline Deny (IPv6)"
    );
    assert!(
        connects(third, py, v4(0), 8080),
        "the client's ingress is open"
    );
    assert!(
        connects(server, py, v6(0), 8080),
        "... from the server over IPv6 too"
    );
    drop(servers);
}
