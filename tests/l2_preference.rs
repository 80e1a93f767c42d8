//! `preferredNodeSelectors` with real agents: the lab of `tests/l2_failover.rs` (three
//! `palisade agent` processes in their node namespaces, the test API server, a client that
//! asks for the VIPs with real ARP every 100 ms and captures every reply and gratuitous ARP).
//!
//! The expected owners are written out by hand (the preferred node), or come from the plain
//! hash election (`expected_winner`) where no node is preferred: never from the preference
//! code under test, so the test fails when preferences do nothing (checked by making
//! `preference_score` return 0: the first step of both tests fails).
//!
//! 1. `preferred_node_answers_follows_labels_and_gets_its_ips_back`: four VIPs; a node that
//!    the hash makes owner of at most one of them is labelled and preferred (weight 80): it
//!    answers all four, alone, and every `ServiceL2Status` names it. Another node is labelled
//!    too (a tie: the hash picks between the two), then the first loses its label: every VIP
//!    moves to the second. Its agent is SIGKILLed: the hash winners among the two others take
//!    over (bound: 15 s, generous for a loaded machine); restarted, it gets every VIP back
//!    (the design: the election is a pure function of the live nodes, so the preferred node
//!    re-wins as soon as its peers hear it). Over the whole capture no probe round is answered
//!    by two MACs and each VIP's sequence of answering nodes is exactly the expected one.
//! 2. `higher_summed_weight_wins_and_malformed_terms_are_reported`: terms of weight 80
//!    (`pref`), 50 (`rack`) and 40 (`ssd`): a node with `rack`+`ssd` (90) beats the node with
//!    `pref` (80); without `ssd` (50) it loses. Then an advertisement whose terms are broken
//!    (unknown operator, `Exists` with values, weight 1000 — the test API server does not
//!    enforce the CRD's `maximum`, like an old CRD) next to one valid term: the agents keep
//!    running, only the valid term counts, and the leader reports a Warning Event
//!    `InvalidPreference` on the L2Advertisement and an `Invalid=True` condition naming the
//!    broken terms; once fixed, the condition goes back to `Invalid=False`.
//!
//! Needs root and `cargo build -p palisade` first (or `PALISADE_BIN`); otherwise prints
//! `skipped: ...`. Everything lives in lab namespaces, removed on drop, also on panic.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use palisade_e2e::l2::*;
use pnet::datalink::MacAddr;
use serde_json::{json, Value};

/// The lab tests share two cores: one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn start(test: &str) -> Option<L2Cluster> {
    if !palisade_e2e::lab_ready(test) {
        return None;
    }
    Some(
        L2Cluster::start(Options {
            nodes: 3,
            ipv6: false,
            segment_b: Vec::new(),
            extra_flags: Vec::new(),
        })
        .expect("lab cluster"),
    )
}

/// Generous convergence bound (membership timeout 1 s; machine load 6-15 on 2 cores).
const CONVERGE: Duration = Duration::from_secs(15);

const PREF: &str = "lab.palisade.dev/pref";
const RACK: &str = "lab.palisade.dev/rack";
const SSD: &str = "lab.palisade.dev/ssd";
const ZONE: &str = "lab.palisade.dev/zone";

/// Replaces the spec of the L2Advertisement `lan` (announcing every pool from every node),
/// keeping its status as a real API server does for a spec update (the status subresource).
fn put_advertisement(c: &L2Cluster, spec: Value) {
    let store = c.store().expect("store");
    let mut ad = store
        .get_object("palisade.dev/v1alpha1", "L2Advertisement", None, "lan")
        .expect("L2Advertisement lan");
    ad["spec"] = spec;
    if let Some(m) = ad["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    store
        .put_object(ad)
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .expect("put L2Advertisement");
}

/// Sets (`Some`) or removes (`None`) a label on a Node.
fn label(c: &L2Cluster, node: &str, key: &str, value: Option<&str>) {
    c.edit_node(node, |n| match value {
        Some(v) => n["metadata"]["labels"][key] = json!(v),
        None => {
            if let Some(l) = n["metadata"]["labels"].as_object_mut() {
                l.remove(key);
            }
        }
    })
    .expect("edit node");
}

/// Services `names`, their VIPs, and the plain hash winner of each among all nodes.
fn services(c: &L2Cluster, names: &[&str]) -> (Vec<(String, IpAddr)>, BTreeMap<IpAddr, String>) {
    for n in names {
        c.add_service(n, false).expect("service");
    }
    let all = c.node_names();
    let svcs: Vec<(String, IpAddr)> = names
        .iter()
        .map(|n| {
            (
                n.to_string(),
                c.wait_vip(n, Duration::from_secs(20)).expect("vip"),
            )
        })
        .collect();
    let hash = svcs
        .iter()
        .map(|(_, v)| (*v, expected_winner(*v, &all)))
        .collect();
    (svcs, hash)
}

/// The nodes ordered by how many of the VIPs the plain hash gives them (fewest first).
fn by_hash_wins(c: &L2Cluster, hash: &BTreeMap<IpAddr, String>) -> Vec<String> {
    let mut nodes = c.node_names();
    nodes.sort_by_key(|n| (hash.values().filter(|w| *w == n).count(), n.clone()));
    nodes
}

fn all_to(vips: &[IpAddr], mac: MacAddr) -> BTreeMap<IpAddr, MacAddr> {
    vips.iter().map(|v| (*v, mac)).collect()
}

/// Every Service's only `ServiceL2Status` names `node`.
fn statuses_name(c: &L2Cluster, svcs: &[(String, IpAddr)], node: &str) {
    for (svc, vip) in svcs {
        c.wait_l2_status(svc, node, *vip)
            .unwrap_or_else(|seen| panic!("ServiceL2Status of {svc}: want {node}, seen {seen:?}"));
    }
}

/// `seq` with consecutive repeats collapsed.
fn runs(seq: &[&String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in seq {
        if out.last() != Some(*s) {
            out.push((*s).clone());
        }
    }
    out
}

fn done(test: &str, started: Instant, c: &L2Cluster) {
    let panics = c.agents.panics();
    assert!(panics.is_empty(), "{panics:?}");
    println!("{test}: {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn preferred_node_answers_follows_labels_and_gets_its_ips_back() {
    let _serial = serial();
    let test = "preferred_node_answers_follows_labels_and_gets_its_ips_back";
    let started = Instant::now();
    let Some(mut c) = start(test) else {
        return;
    };
    let (svcs, hash) = services(&c, &["pa", "pb", "pc", "pd"]);
    let vips: Vec<IpAddr> = svcs.iter().map(|(_, v)| *v).collect();
    let order = by_hash_wins(&c, &hash);
    let (x, y) = (order[0].clone(), order[1].clone());
    println!("hash owners {hash:?}; preferred first {x}, then {y}");
    let moved = hash.values().filter(|w| **w != x).count();
    assert!(moved >= 3, "the preference must move VIPs: {hash:?}");
    let wire = c.start_wire(&vips, Duration::from_secs(300)).expect("wire");
    let t_wire = Instant::now();
    let hash_macs: BTreeMap<IpAddr, MacAddr> = hash.iter().map(|(v, n)| (*v, c.mac(n))).collect();
    wire.wait_stable(&hash_macs, t_wire, 10, Duration::from_secs(20))
        .expect("hash owners answer before any preference");

    // (a) X labelled and preferred with weight 80: it answers every VIP, alone.
    let t_a = Instant::now();
    label(&c, &x, PREF, Some("yes"));
    put_advertisement(
        &c,
        json!({"preferredNodeSelectors": [
            {"weight": 80, "preference": {"matchLabels": {PREF: "yes"}}}]}),
    );
    let first = wire
        .wait_stable(&all_to(&vips, c.mac(&x)), t_a, 10, CONVERGE)
        .expect("(a) the preferred node answers every VIP alone");
    println!("(a) {x} answers all after {}", ms(first - t_a));
    statuses_name(&c, &svcs, &x);
    assert_eq!(
        tcp_once(&c.client_netns, vips[0], Duration::from_secs(2)).expect("TCP"),
        x,
        "TCP reaches the preferred node"
    );

    // (b) Y labelled too (a tie: the hash picks between X and Y), then X unlabelled: every
    // VIP ends on Y, each moving once.
    let t_b = Instant::now();
    label(&c, &y, PREF, Some("yes"));
    let pair = vec![x.clone(), y.clone()];
    let tie: BTreeMap<IpAddr, MacAddr> = vips
        .iter()
        .map(|v| (*v, c.mac(&expected_winner(*v, &pair))))
        .collect();
    wire.wait_stable(&tie, t_b, 10, CONVERGE)
        .expect("(b) X and Y tie: the hash between them");
    let t_b2 = Instant::now();
    label(&c, &x, PREF, Some("no"));
    let first = wire
        .wait_stable(&all_to(&vips, c.mac(&y)), t_b2, 10, CONVERGE)
        .expect("(b) every VIP moves to the newly preferred node");
    println!("(b) relabel → {y} answers all after {}", ms(first - t_b2));
    statuses_name(&c, &svcs, &y);

    // (c) Y's agent killed: the hash winners among the others (none preferred) take over;
    // restarted, Y gets every VIP back.
    let rest = without(&c.node_names(), &y);
    let fallback: BTreeMap<IpAddr, String> = vips
        .iter()
        .map(|v| (*v, expected_winner(*v, &rest)))
        .collect();
    let fallback_macs: BTreeMap<IpAddr, MacAddr> =
        fallback.iter().map(|(v, n)| (*v, c.mac(n))).collect();
    let t_kill = c.kill_agent(&y).expect("kill");
    let first = wire
        .wait_stable(&fallback_macs, t_kill, 5, CONVERGE)
        .expect("(c) non-preferred nodes take over from the killed preferred node");
    println!(
        "(c) SIGKILL {y} → {fallback:?} answer after {}",
        ms(first - t_kill)
    );
    for (svc, vip) in &svcs {
        c.wait_l2_status(svc, &fallback[vip], *vip)
            .unwrap_or_else(|seen| panic!("ServiceL2Status of {svc} after the kill: {seen:?}"));
    }
    c.start_agent(&y).expect("restart");
    let t_back = Instant::now();
    c.agents
        .wait_ready(&y, Duration::from_secs(30))
        .expect("restarted agent ready");
    let first = wire
        .wait_stable(
            &all_to(&vips, c.mac(&y)),
            t_back,
            10,
            Duration::from_secs(20),
        )
        .expect("(c) the restarted preferred node gets every VIP back");
    println!("(c) restart {y} → answers all after {}", ms(first - t_back));
    statuses_name(&c, &svcs, &y);
    std::thread::sleep(Duration::from_millis(500));

    // The whole capture: never two MACs in one round, each VIP's owners in order.
    let log = wire.finish().expect("wire");
    let doubles = log.double_answers();
    assert!(
        doubles.is_empty(),
        "rounds answered by two MACs: {doubles:?}"
    );
    for v in &vips {
        let seen: Vec<String> = log
            .owner_runs(*v, t_wire)
            .into_iter()
            .map(|m| c.who(m))
            .collect();
        let want = runs(&[&hash[v], &x, &y, &fallback[v], &y]);
        assert_eq!(seen, want, "nodes answering for {v}");
    }
    println!(
        "capture: {} rounds, {} claims",
        log.rounds.len(),
        log.claims.len()
    );
    done(test, started, &c);
}

/// The Warning Events with `reason` about the L2Advertisement `lan`: their notes.
fn advertisement_events(c: &L2Cluster, reason: &str) -> Vec<String> {
    let store = c.store().expect("store");
    store
        .list_objects("events.k8s.io/v1", "Event", Some(NS))
        .into_iter()
        .filter(|e| {
            e["reason"] == reason
                && e["type"] == "Warning"
                && e["regarding"]["kind"] == "L2Advertisement"
                && e["regarding"]["name"] == "lan"
        })
        .map(|e| e["note"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The L2Advertisement's condition `type_`: (status, reason, message).
fn advertisement_condition(c: &L2Cluster, type_: &str) -> Option<(String, String, String)> {
    let ad = c
        .store()
        .ok()?
        .get_object("palisade.dev/v1alpha1", "L2Advertisement", None, "lan")?;
    ad["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|k| k["type"] == type_)
        .map(|k| {
            let s = |f: &str| k[f].as_str().unwrap_or_default().to_string();
            (s("status"), s("reason"), s("message"))
        })
}

#[test]
fn higher_summed_weight_wins_and_malformed_terms_are_reported() {
    let _serial = serial();
    let test = "higher_summed_weight_wins_and_malformed_terms_are_reported";
    let started = Instant::now();
    let Some(c) = start(test) else {
        return;
    };
    let (svcs, hash) = services(&c, &["wa", "wb", "wc", "wd"]);
    let vips: Vec<IpAddr> = svcs.iter().map(|(_, v)| *v).collect();
    let order = by_hash_wins(&c, &hash);
    // B: rack + ssd (50 + 40 = 90), A: pref (80), C: zone only (no valid term matches it).
    let (b, a, z) = (order[0].clone(), order[1].clone(), order[2].clone());
    println!("hash owners {hash:?}; A={a} B={b} C={z}");
    let wire = c.start_wire(&vips, Duration::from_secs(300)).expect("wire");
    label(&c, &a, PREF, Some("yes"));
    label(&c, &b, RACK, Some("r1"));
    label(&c, &b, SSD, Some("true"));
    label(&c, &z, ZONE, Some("c"));
    // (d) The higher total score wins, not the heaviest single term.
    let t_d = Instant::now();
    put_advertisement(
        &c,
        json!({"preferredNodeSelectors": [
            {"weight": 80, "preference": {"matchLabels": {PREF: "yes"}}},
            {"weight": 50, "preference": {"matchLabels": {RACK: "r1"}}},
            {"weight": 40, "preference": {"matchExpressions": [{"key": SSD, "operator": "Exists"}]}}]}),
    );
    wire.wait_stable(&all_to(&vips, c.mac(&b)), t_d, 10, CONVERGE)
        .expect("(d) 50 + 40 beats 80");
    statuses_name(&c, &svcs, &b);
    let t_d2 = Instant::now();
    label(&c, &b, SSD, None);
    wire.wait_stable(&all_to(&vips, c.mac(&a)), t_d2, 10, CONVERGE)
        .expect("(d) 50 loses to 80");
    statuses_name(&c, &svcs, &a);
    assert!(
        advertisement_condition(&c, "Invalid").is_none(),
        "a valid advertisement gets no Invalid condition"
    );

    // Malformed terms: each would make B or C win if it counted; only the weight-30 term on
    // `pref` counts, so A keeps every VIP, and the leader says so.
    let t_m = Instant::now();
    put_advertisement(
        &c,
        json!({"preferredNodeSelectors": [
            {"weight": 100, "preference": {"matchExpressions": [{"key": RACK, "operator": "Bogus"}]}},
            {"weight": 100, "preference": {"matchExpressions": [
                {"key": SSD, "operator": "Exists", "values": ["true"]}]}},
            {"weight": 1000, "preference": {"matchLabels": {ZONE: "c"}}},
            {"weight": 30, "preference": {"matchLabels": {PREF: "yes"}}}]}),
    );
    // B matches the `Exists`-with-values term again (it would score 100 if it counted).
    label(&c, &b, SSD, Some("true"));
    let invalid = poll(CONVERGE, Duration::from_millis(100), || {
        advertisement_condition(&c, "Invalid").filter(|k| k.0 == "True")
    })
    .unwrap_or_else(|| {
        panic!(
            "no Invalid=True condition on the L2Advertisement: {:?}",
            advertisement_condition(&c, "Invalid")
        )
    });
    println!("Invalid condition: {invalid:?}");
    assert_eq!(invalid.1, "InvalidPreference");
    for i in 0..3 {
        assert!(
            invalid.2.contains(&format!("preferredNodeSelectors[{i}]")),
            "term {i} named: {}",
            invalid.2
        );
    }
    assert!(!invalid.2.contains("[3]"), "the valid term is not named");
    let ready = advertisement_condition(&c, "Ready").expect("Ready condition");
    assert_eq!(
        ready.0, "True",
        "the advertisement still announces: {ready:?}"
    );
    let notes = poll(CONVERGE, Duration::from_millis(100), || {
        let n = advertisement_events(&c, "InvalidPreference");
        (!n.is_empty()).then_some(n)
    })
    .expect("a Warning Event InvalidPreference on the L2Advertisement");
    println!("Event InvalidPreference: {notes:?}");
    assert!(notes[0].contains("Bogus"), "{notes:?}");
    // The agents keep running, and only the valid term counts: A answers, alone.
    wire.wait_stable(&all_to(&vips, c.mac(&a)), t_m, 20, CONVERGE)
        .expect("only the valid term counts");
    statuses_name(&c, &svcs, &a);
    for n in c.node_names() {
        assert_eq!(
            c.agents.metric(&n, "palisade_members_alive"),
            Some(3.0),
            "agent on {n} alive and seeing its peers"
        );
    }

    // Fixed: the condition clears.
    put_advertisement(
        &c,
        json!({"preferredNodeSelectors": [
            {"weight": 30, "preference": {"matchLabels": {PREF: "yes"}}}]}),
    );
    let cleared = poll(CONVERGE, Duration::from_millis(100), || {
        advertisement_condition(&c, "Invalid").filter(|k| k.0 == "False")
    });
    assert!(
        cleared.is_some(),
        "Invalid condition not cleared: {:?}",
        advertisement_condition(&c, "Invalid")
    );
    std::thread::sleep(Duration::from_millis(500));
    let log = wire.finish().expect("wire");
    let doubles = log.double_answers();
    assert!(
        doubles.is_empty(),
        "rounds answered by two MACs: {doubles:?}"
    );
    for v in &vips {
        let seen: Vec<String> = log
            .owner_runs(*v, t_m)
            .into_iter()
            .map(|m| c.who(m))
            .collect();
        assert_eq!(
            seen,
            vec![a.clone()],
            "{v} stays on {a} through the malformed terms"
        );
    }
    done(test, started, &c);
}
