//! Compile + render of arbitrary well-formed clusters (pods, namespaces, NetworkPolicies with
//! selectors, ipBlocks, named and numbered ports, every NodeConfig knob): the payload is
//! always accepted by the tracer (every jump and set exists, every line is syntax the tracer
//! knows — the same syntax `iptables-restore` takes), tracing packets never errors, and the
//! incremental compiler gives the same payload as a full compile after any change.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use palisade_netpol::builders::*;
use palisade_netpol::compile::Protocol;
use palisade_netpol::trace::{CtState, Packet, Tracer};
use palisade_netpol::{
    compile, render, ClusterState, Family, IncrementalCompiler, NodeConfig, PodInterface,
};
use serde_json::{json, Value};

const NS: [&str; 3] = ["a", "b", "c"];
const KEYS: [&str; 3] = ["app", "tier", "ns"];
const VALS: [&str; 3] = ["web", "db", "x"];
const PORT_NAMES: [&str; 3] = ["http", "dns", "metrics"];
const IFACES: [&str; 4] = ["veth0", "cali1.2", "bad name", "a-very-long-interface"];

#[derive(Arbitrary, Debug)]
struct Input {
    v6: bool,
    anti_spoofing: bool,
    revoke: bool,
    block_unknown: bool,
    pods: Vec<PodIn>,
    ns_labels: [(u8, u8); 3],
    policies: Vec<PolicyIn>,
    /// A second version of the policies, for the incremental check.
    policies2: Vec<PolicyIn>,
    packets: Vec<PacketIn>,
}

#[derive(Arbitrary, Debug)]
struct PodIn {
    ns: u8,
    labels: Vec<(u8, u8)>,
    host: u8,
    remote: bool,
    ports: Vec<(u8, u16, u8)>,
    iface: Option<(u8, bool)>,
}

#[derive(Arbitrary, Debug)]
struct SelIn {
    labels: Vec<(u8, u8)>,
    exprs: Vec<(u8, u8, Vec<u8>)>,
}

#[derive(Arbitrary, Debug)]
enum PeerIn {
    Pods(Option<SelIn>, Option<SelIn>),
    Block(u8, u8, Vec<(u8, u8)>),
}

#[derive(Arbitrary, Debug)]
struct PortIn {
    proto: u8,
    named: Option<u8>,
    port: Option<u16>,
    end: Option<u16>,
}

#[derive(Arbitrary, Debug)]
struct RuleIn {
    peers: Option<Vec<PeerIn>>,
    ports: Option<Vec<PortIn>>,
}

#[derive(Arbitrary, Debug)]
struct PolicyIn {
    ns: u8,
    selector: SelIn,
    types: u8,
    ingress: Option<Vec<RuleIn>>,
    egress: Option<Vec<RuleIn>>,
}

#[derive(Arbitrary, Debug)]
struct PacketIn {
    src: u8,
    dst: u8,
    proto: u8,
    dport: u16,
    state: u8,
    input: bool,
    mid_stream: bool,
}

fn pick<T: Copy>(xs: &[T], i: u8) -> T {
    xs[i as usize % xs.len()]
}

fn sel(s: &SelIn) -> Value {
    let labels: serde_json::Map<String, Value> = s
        .labels
        .iter()
        .take(3)
        .map(|(k, v)| (pick(&KEYS, *k).to_string(), json!(pick(&VALS, *v))))
        .collect();
    let exprs: Vec<Value> = s
        .exprs
        .iter()
        .take(3)
        .map(|(k, op, vals)| {
            let op = pick(&["In", "NotIn", "Exists", "DoesNotExist"], *op);
            let values: Vec<&str> = vals.iter().take(3).map(|v| pick(&VALS, *v)).collect();
            if op == "Exists" || op == "DoesNotExist" {
                json!({"key": pick(&KEYS, *k), "operator": op})
            } else {
                json!({"key": pick(&KEYS, *k), "operator": op, "values": values})
            }
        })
        .collect();
    json!({"matchLabels": labels, "matchExpressions": exprs})
}

fn addr(v6: bool, node: u8, host: u8) -> String {
    if v6 {
        format!("fd00:{node}::{host:x}")
    } else {
        format!("10.0.{node}.{host}")
    }
}

fn rules(rs: &[RuleIn], v6: bool, dir: &str) -> Value {
    let peer_key = if dir == "ingress" { "from" } else { "to" };
    let out: Vec<Value> = rs
        .iter()
        .take(3)
        .map(|r| {
            let mut o = serde_json::Map::new();
            if let Some(peers) = &r.peers {
                let list: Vec<Value> = peers
                    .iter()
                    .take(3)
                    .map(|p| match p {
                        PeerIn::Pods(pods, nss) => {
                            let mut m = serde_json::Map::new();
                            if let Some(s) = pods {
                                m.insert("podSelector".into(), sel(s));
                            }
                            if let Some(s) = nss {
                                m.insert("namespaceSelector".into(), sel(s));
                            }
                            if m.is_empty() {
                                m.insert("podSelector".into(), json!({}));
                            }
                            Value::Object(m)
                        }
                        PeerIn::Block(node, prefix, except) => {
                            let (base, max) = if v6 {
                                (format!("fd00:{}::", node % 3), 128)
                            } else {
                                (format!("10.0.{}.0", node % 3), 32)
                            };
                            let p = 8 + (*prefix as u32 % (max - 7));
                            let ex: Vec<String> = except
                                .iter()
                                .take(2)
                                .map(|(h, pl)| {
                                    let pl = p + (*pl as u32 % (max - p + 1));
                                    format!("{}/{pl}", addr(v6, node % 3, *h))
                                })
                                .collect();
                            json!({"ipBlock": {"cidr": format!("{base}/{p}"), "except": ex}})
                        }
                    })
                    .collect();
                o.insert(peer_key.into(), Value::Array(list));
            }
            if let Some(ports) = &r.ports {
                let list: Vec<Value> = ports
                    .iter()
                    .take(4)
                    .map(|p| {
                        let mut m = serde_json::Map::new();
                        m.insert(
                            "protocol".into(),
                            json!(pick(&["TCP", "UDP", "SCTP", "ICMP"], p.proto)),
                        );
                        match (p.named, p.port) {
                            (Some(n), _) => {
                                m.insert("port".into(), json!(pick(&PORT_NAMES, n)));
                            }
                            (None, Some(port)) => {
                                m.insert("port".into(), json!(port));
                            }
                            (None, None) => {}
                        }
                        if let Some(e) = p.end {
                            m.insert("endPort".into(), json!(e));
                        }
                        Value::Object(m)
                    })
                    .collect();
                o.insert("ports".into(), Value::Array(list));
            }
            Value::Object(o)
        })
        .collect();
    Value::Array(out)
}

fn policies(
    input: &Input,
    list: &[PolicyIn],
) -> Vec<palisade_netpol::k8s_openapi::api::networking::v1::NetworkPolicy> {
    list.iter()
        .take(6)
        .enumerate()
        .map(|(i, p)| {
            let mut spec = serde_json::Map::new();
            spec.insert("podSelector".into(), sel(&p.selector));
            let mut types = Vec::new();
            if p.types & 1 == 1 {
                types.push("Ingress");
            }
            if p.types & 2 == 2 {
                types.push("Egress");
            }
            if p.types & 4 == 4 {
                spec.insert("policyTypes".into(), json!(types));
            }
            if let Some(r) = &p.ingress {
                spec.insert("ingress".into(), rules(r, input.v6, "ingress"));
            }
            if let Some(r) = &p.egress {
                spec.insert("egress".into(), rules(r, input.v6, "egress"));
            }
            mk_policy(pick(&NS, p.ns), &format!("p{i}"), Value::Object(spec))
        })
        .collect()
}

fn state(input: &Input, list: &[PolicyIn]) -> ClusterState {
    let v6 = input.v6;
    let cidr = |n: u8| {
        if v6 {
            format!("fd00:{n}::/64")
        } else {
            format!("10.0.{n}.0/24")
        }
    };
    let nodes = vec![mk_node("n1", &cidr(1)), mk_node("n2", &cidr(2))];
    let nss = NS
        .iter()
        .zip(input.ns_labels.iter())
        .map(|(n, (k, v))| mk_ns(n, &[(pick(&KEYS, *k), pick(&VALS, *v)), ("ns", n)]))
        .collect();
    let pods = input
        .pods
        .iter()
        .take(8)
        .enumerate()
        .map(|(i, p)| {
            let labels: Vec<(&str, &str)> = p
                .labels
                .iter()
                .take(3)
                .map(|(k, v)| (pick(&KEYS, *k), pick(&VALS, *v)))
                .collect();
            let node = if p.remote { 2 } else { 1 };
            let pod = mk_pod(
                pick(&NS, p.ns),
                &format!("pod{i}"),
                &labels,
                &addr(v6, node, p.host % 8 + 2),
                if p.remote { "n2" } else { "n1" },
            );
            let ports: Vec<(&str, i32, &str)> = p
                .ports
                .iter()
                .take(3)
                .map(|(n, port, proto)| {
                    (
                        pick(&PORT_NAMES, *n),
                        i32::from(*port),
                        pick(&["TCP", "UDP", "SCTP"], *proto),
                    )
                })
                .collect();
            with_ports(pod, &ports)
        })
        .collect();
    cluster(nodes, nss, pods, policies(input, list))
}

fn config(input: &Input) -> NodeConfig {
    let mut cfg = NodeConfig::new("n1");
    cfg.family = if input.v6 { Family::V6 } else { Family::V4 };
    cfg.anti_spoofing = input.anti_spoofing;
    cfg.revoke_denied_connections = input.revoke;
    cfg.block_unknown_pods = input.block_unknown;
    for p in input.pods.iter().take(8).filter(|p| !p.remote) {
        if let Some((i, bridged)) = p.iface {
            let Ok(ip) = addr(input.v6, 1, p.host % 8 + 2).parse() else {
                continue;
            };
            let name = pick(&IFACES, i).to_string();
            let iface = if bridged {
                PodInterface::BridgePort(name)
            } else {
                PodInterface::Routed(name)
            };
            cfg.pod_interfaces.insert(ip, iface);
        }
    }
    cfg
}

fuzz_target!(|input: Input| {
    let cfg = config(&input);
    let st = state(&input, &input.policies);
    let payload = render(&compile(&st, &cfg));
    let tracer = match Tracer::new(&payload) {
        Ok(t) => t,
        Err(e) => panic!(
            "tracer rejects the rendered payload: {e}\n{}\n{}",
            payload.ipset_restore, payload.iptables_restore
        ),
    };
    for p in input.packets.iter().take(8) {
        let src = addr(input.v6, p.src % 3, p.src / 3 % 8 + 2);
        let dst = addr(input.v6, p.dst % 3, p.dst / 3 % 8 + 2);
        let proto = pick(&[Protocol::Tcp, Protocol::Udp, Protocol::Sctp], p.proto);
        let state = pick(
            &[
                CtState::New,
                CtState::Established,
                CtState::Related,
                CtState::Invalid,
            ],
            p.state,
        );
        let mut pkt = Packet::new(&src, &dst, proto, p.dport).with_state(state);
        if p.mid_stream {
            pkt = pkt.mid_stream();
        }
        let chain = if p.input { "INPUT" } else { "FORWARD" };
        if let Err(e) = tracer.trace(chain, &pkt) {
            panic!("trace {pkt:?}: {e}");
        }
    }
    // Incremental: first state, then the second policy set, equals a full compile of it.
    let mut inc = IncrementalCompiler::new(cfg.clone());
    let _ = inc.sync(&st);
    let st2 = state(&input, &input.policies2);
    let got = inc.sync(&st2).clone();
    let want = render(&compile(&st2, &cfg));
    assert_eq!(got, want, "incremental sync differs from a full compile");
});
