//! LoadBalancer IP allocation end to end: the real `palisade agent` binary (LoadBalancer side
//! only, `--enable-netpol=false`, so no root and no firewall changes) against the project's
//! test API server. Each test has its own API server and agent(s), so they run in parallel.
//!
//! What is checked, from the outside only (Service status, IPAddressPool status, Events,
//! metrics, the API server's request log):
//! - allocation from a pool (first free address), IPAllocated Events, pool counters;
//! - release on delete and reuse of the released address;
//! - restart: every Service keeps its IP, also with a Service created while the agent was down;
//! - two agents: only the Lease holder writes (each agent talks to its own front-end of one
//!   shared store, so each request log belongs to exactly one agent), fail-over on SIGKILL;
//! - pool edits that remove an assigned address (move or AllocationFailed);
//! - bad input: requested IPs outside every pool / taken, unknown pool, exhausted pool,
//!   overlapping and invalid pools, IPv6 in an IPv4-only cluster, sharing, foreign classes,
//!   type changes.
//!
//! After every test: no IP on two Services that may not share it, and no panic in any log.
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use palisade_testapi::{Options, RequestRecord, Store, TestApiServer};
use palisade_tests::{lb_agent, poll, runtime, AgentProc, Api, TempDir, POLL_EVERY};
use serde_json::{json, Value};

/// Every wait is bounded by this.
const WAIT: Duration = Duration::from_secs(15);
const POOLS: &str = "palisade.dev/v1alpha1";
const NS: &str = "default";

// ---- objects ------------------------------------------------------------------------------

fn pool(name: &str, addresses: &[&str]) -> Value {
    json!({
        "apiVersion": POOLS, "kind": "IPAddressPool",
        "metadata": {"name": name},
        "spec": {"addresses": addresses}
    })
}

/// A `type: LoadBalancer` Service in `default` with one TCP port, 80 unless `ports` says
/// otherwise; `annotations` as given.
fn lb_service(name: &str, annotations: &[(&str, &str)], ports: &[u16]) -> Value {
    let ports: Vec<u16> = if ports.is_empty() {
        vec![80]
    } else {
        ports.to_vec()
    };
    let ann: BTreeMap<&str, &str> = annotations.iter().copied().collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": NS, "name": name, "annotations": ann},
        "spec": {
            "type": "LoadBalancer",
            "selector": {"app": name},
            "ports": ports.iter().map(|p| json!({"name": format!("p{p}"), "port": p, "protocol": "TCP"})).collect::<Vec<_>>()
        }
    })
}

/// A Node with an IPv4 pod CIDR (the cluster's address families come from these).
fn v4_node(name: &str, cidr: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}
    })
}

fn put(store: &Store, obj: Value) {
    store.put_object(obj).expect("put object");
}

/// Read-modify-write of a stored object (keeps its status, like a client's update would).
fn edit(
    store: &Store,
    api_version: &str,
    kind: &str,
    ns: Option<&str>,
    name: &str,
    f: impl FnOnce(&mut Value),
) {
    let mut obj = store
        .get_object(api_version, kind, ns, name)
        .unwrap_or_else(|| panic!("{kind} {name} not found"));
    f(&mut obj);
    obj["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    store.put_object(obj).expect("update object");
}

// ---- observations -------------------------------------------------------------------------

fn service(store: &Store, name: &str) -> Option<Value> {
    store.get_object("v1", "Service", Some(NS), name)
}

/// IPs in `status.loadBalancer.ingress`.
fn ips_of(svc: &Value) -> Vec<String> {
    svc["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["ip"].as_str().map(str::to_string))
        .collect()
}

fn status_ips(store: &Store, name: &str) -> Vec<String> {
    service(store, name).map(|s| ips_of(&s)).unwrap_or_default()
}

/// Waits until the Service shows exactly one IP; returns it. Also checks `ipMode: VIP`.
fn wait_ip(store: &Store, agent: &AgentProc, name: &str) -> String {
    let svc = poll(WAIT, POLL_EVERY, || {
        service(store, name).filter(|s| ips_of(s).len() == 1)
    })
    .unwrap_or_else(|| panic!("Service {name} got no IP:\n{}", agent.logs()));
    assert_eq!(
        svc["status"]["loadBalancer"]["ingress"][0]["ipMode"], "VIP",
        "{svc}"
    );
    ips_of(&svc).remove(0)
}

/// Waits until the Service's status shows no IP.
fn wait_no_ip(store: &Store, agent: &AgentProc, name: &str) {
    poll(WAIT, POLL_EVERY, || {
        status_ips(store, name).is_empty().then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "Service {name} still has {:?}:\n{}",
            status_ips(store, name),
            agent.logs()
        )
    });
}

/// events.k8s.io/v1 Events about Service `name`.
fn events_for(store: &Store, name: &str) -> Vec<Value> {
    store
        .list_objects("events.k8s.io/v1", "Event", Some(NS))
        .into_iter()
        .filter(|e| e["regarding"]["kind"] == "Service" && e["regarding"]["name"] == name)
        .collect()
}

/// Waits for an Event with `reason` on Service `name` whose note contains `needle`.
fn wait_event(store: &Store, agent: &AgentProc, name: &str, reason: &str, needle: &str) -> Value {
    poll(WAIT, POLL_EVERY, || {
        events_for(store, name).into_iter().find(|e| {
            e["reason"] == reason && e["note"].as_str().is_some_and(|n| n.contains(needle))
        })
    })
    .unwrap_or_else(|| {
        panic!(
            "no {reason} Event containing {needle:?} on Service {name}; events: {:#?}\n{}",
            events_for(store, name),
            agent.logs()
        )
    })
}

fn pool_obj(store: &Store, name: &str) -> Value {
    store
        .get_object(POOLS, "IPAddressPool", None, name)
        .unwrap_or_else(|| panic!("pool {name} missing"))
}

fn condition(pool: &Value, type_: &str) -> Option<Value> {
    pool["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// Waits until pool `name` has condition `type_` with `status`; returns the condition.
fn wait_condition(
    store: &Store,
    agent: &AgentProc,
    name: &str,
    type_: &str,
    status: &str,
) -> Value {
    poll(WAIT, POLL_EVERY, || {
        condition(&pool_obj(store, name), type_).filter(|c| c["status"] == status)
    })
    .unwrap_or_else(|| {
        panic!(
            "pool {name}: no {type_}={status}; pool: {:#}\n{}",
            pool_obj(store, name),
            agent.logs()
        )
    })
}

/// Waits until the pool's status shows these IPv4 counters.
fn wait_counters(store: &Store, agent: &AgentProc, name: &str, assigned: i64, available: i64) {
    poll(WAIT, POLL_EVERY, || {
        let st = pool_obj(store, name)["status"].clone();
        (st["assignedIPv4"] == assigned && st["availableIPv4"] == available).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "pool {name}: want assignedIPv4={assigned} availableIPv4={available}; status: {:#}\n{}",
            pool_obj(store, name)["status"],
            agent.logs()
        )
    });
}

fn wait_metric(agent: &AgentProc, sample: &str, want: f64) {
    poll(WAIT, POLL_EVERY, || {
        (agent.metric(sample) == Some(want)).then_some(())
    })
    .unwrap_or_else(|| panic!("metric {sample} != {want} (is {:?})", agent.metric(sample)));
}

/// No IP is on two Services unless both carry the same `palisade.dev/allow-shared-ip` key
/// and use disjoint (protocol, port)s.
fn assert_no_double_assignment(store: &Store) {
    let services = store.list_objects("v1", "Service", None);
    let mut holders: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for svc in &services {
        for ip in ips_of(svc) {
            holders.entry(ip).or_default().push(svc);
        }
    }
    for (ip, on) in holders {
        if on.len() < 2 {
            continue;
        }
        let names: Vec<String> = on
            .iter()
            .map(|s| {
                format!(
                    "{}/{}",
                    s["metadata"]["namespace"].as_str().unwrap_or(""),
                    s["metadata"]["name"].as_str().unwrap_or("")
                )
            })
            .collect();
        let keys: BTreeSet<Option<&str>> = on
            .iter()
            .map(|s| s["metadata"]["annotations"]["palisade.dev/allow-shared-ip"].as_str())
            .collect();
        assert!(
            keys.len() == 1 && keys.iter().all(|k| k.is_some_and(|k| !k.is_empty())),
            "IP {ip} is on {names:?}, which do not share one sharing key ({keys:?})"
        );
        let mut ports = BTreeSet::new();
        for s in &on {
            for p in s["spec"]["ports"].as_array().into_iter().flatten() {
                let port = (
                    p["protocol"].as_str().unwrap_or("TCP").to_string(),
                    p["port"].as_i64(),
                );
                assert!(
                    ports.insert(port.clone()),
                    "IP {ip} is on {names:?}, which both use port {port:?}"
                );
            }
        }
    }
}

fn assert_no_panic(agent: &AgentProc) {
    let logs = agent.logs();
    assert!(
        !logs.contains("panicked"),
        "agent {} panicked:\n{logs}",
        agent.name
    );
}

/// One API server, one agent (the leader), one Node with an IPv4 pod CIDR.
struct Lab {
    api: Api,
    dir: TempDir,
    kubeconfig: String,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let api = Api::start();
        let dir = TempDir::new(tag);
        let kubeconfig = api.kubeconfig(&dir);
        put(api.server.store(), v4_node("node-a", "10.244.0.0/24"));
        Lab {
            api,
            dir,
            kubeconfig,
        }
    }

    fn store(&self) -> &Store {
        self.api.server.store()
    }

    /// Starts an agent and waits until it is ready and leads.
    fn leader(&self, name: &str) -> AgentProc {
        let agent = lb_agent(name, &self.kubeconfig, &self.dir);
        assert!(
            agent.wait_ready(WAIT),
            "agent {name} not ready:\n{}",
            agent.logs()
        );
        poll(WAIT, POLL_EVERY, || {
            (agent.metric("palisade_leader") == Some(1.0)).then_some(())
        })
        .unwrap_or_else(|| panic!("agent {name} did not lead:\n{}", agent.logs()));
        agent
    }
}

// ---- 1. allocation ------------------------------------------------------------------------

#[test]
fn service_gets_first_free_ip_from_pool_with_event_and_pool_status() {
    let lab = Lab::new("lb-alloc");
    let store = lab.store();
    put(store, pool("lan", &["198.51.100.200-198.51.100.250"]));
    let agent = lab.leader("node-a");

    put(store, lb_service("web", &[], &[]));
    let ip = wait_ip(store, &agent, "web");
    assert_eq!(ip, "198.51.100.200", "first address of the pool");
    let ev = wait_event(store, &agent, "web", "IPAllocated", "198.51.100.200");
    assert!(ev["note"].as_str().unwrap().contains("pool lan"), "{ev}");
    assert_eq!(ev["type"], "Normal", "{ev}");

    wait_counters(store, &agent, "lan", 1, 50);
    let ready = wait_condition(store, &agent, "lan", "Ready", "True");
    assert_eq!(ready["reason"], "Valid", "{ready}");
    assert_eq!(
        condition(&pool_obj(store, "lan"), "Invalid").unwrap()["status"],
        "False"
    );
    assert_eq!(
        condition(&pool_obj(store, "lan"), "Overlapping").unwrap()["status"],
        "False"
    );
    wait_metric(
        &agent,
        "palisade_allocator_addresses{pool=\"lan\",family=\"IPv4\"}",
        51.0,
    );
    wait_metric(
        &agent,
        "palisade_allocator_addresses_in_use{pool=\"lan\",family=\"IPv4\"}",
        1.0,
    );
    wait_metric(&agent, "palisade_allocator_services_allocated", 1.0);

    // The next Service gets the next address; the first keeps its own.
    put(store, lb_service("api", &[], &[]));
    assert_eq!(wait_ip(store, &agent, "api"), "198.51.100.201");
    wait_counters(store, &agent, "lan", 2, 49);
    assert_eq!(status_ips(store, "web"), vec!["198.51.100.200"]);
    // One IPAllocated per assignment, not one per sync.
    std::thread::sleep(Duration::from_millis(500));
    let allocated: Vec<Value> = events_for(store, "web")
        .into_iter()
        .filter(|e| e["reason"] == "IPAllocated")
        .collect();
    assert_eq!(allocated.len(), 1, "{allocated:#?}");
    assert!(
        allocated[0]["series"].is_null(),
        "IPAllocated repeated: {allocated:#?}"
    );
    assert_no_double_assignment(store);
    assert_no_panic(&agent);
}

// ---- 2. release and reuse -----------------------------------------------------------------

#[test]
fn deleted_service_releases_its_ip_for_reuse() {
    let lab = Lab::new("lb-release");
    let store = lab.store();
    put(store, pool("lan", &["198.51.100.200-198.51.100.209"]));
    let agent = lab.leader("node-a");

    put(store, lb_service("one", &[], &[]));
    let ip = wait_ip(store, &agent, "one");
    wait_counters(store, &agent, "lan", 1, 9);
    wait_metric(
        &agent,
        "palisade_allocator_addresses_in_use{pool=\"lan\",family=\"IPv4\"}",
        1.0,
    );

    store
        .delete_object("v1", "Service", Some(NS), "one")
        .expect("delete");
    wait_counters(store, &agent, "lan", 0, 10);
    wait_metric(
        &agent,
        "palisade_allocator_addresses_in_use{pool=\"lan\",family=\"IPv4\"}",
        0.0,
    );
    wait_metric(&agent, "palisade_allocator_services_allocated", 0.0);

    put(store, lb_service("two", &[], &[]));
    assert_eq!(
        wait_ip(store, &agent, "two"),
        ip,
        "the released address is reused"
    );
    wait_counters(store, &agent, "lan", 1, 9);
    assert_no_double_assignment(store);
    assert_no_panic(&agent);
}

// ---- 3. restart ---------------------------------------------------------------------------

#[test]
fn restart_keeps_every_ip() {
    let lab = Lab::new("lb-restart");
    let store = lab.store();
    put(store, pool("lan", &["198.51.100.200-198.51.100.250"]));
    let mut agent = lab.leader("node-a");

    let names = ["s1", "s2", "s3", "s4", "s5"];
    for n in names {
        put(store, lb_service(n, &[], &[]));
    }
    let before: BTreeMap<&str, String> = names
        .iter()
        .map(|n| (*n, wait_ip(store, &agent, n)))
        .collect();
    // Free a hole in the middle: restore must not hand it to someone else either way.
    store
        .delete_object("v1", "Service", Some(NS), "s3")
        .expect("delete");
    wait_counters(store, &agent, "lan", 4, 47);

    agent.signal("TERM");
    let status = agent
        .wait_exit(WAIT)
        .expect("agent did not stop on SIGTERM");
    assert!(status.success(), "{status:?}\n{}", agent.logs());
    assert_no_panic(&agent);
    drop(agent);

    // Created while no agent runs; its name sorts first, so an allocator that assigned
    // before restoring would give it 198.51.100.200 (held by s1).
    put(store, lb_service("a-new", &[], &[]));
    // Also created while down, but its status claims s1's address (a copied manifest, or a
    // stale writer): s1 is older and keeps it; `dup` gets a new address.
    let mut dup = lb_service("dup", &[], &[]);
    dup["metadata"]["creationTimestamp"] = json!("2999-01-01T00:00:00Z");
    dup["status"] = json!({"loadBalancer": {"ingress": [{"ip": before["s1"], "ipMode": "VIP"}]}});
    put(store, dup);
    let agent = lab.leader("node-a");
    let new_ip = wait_ip(store, &agent, "a-new");
    let dup_ip = poll(WAIT, POLL_EVERY, || {
        Some(status_ips(store, "dup")).filter(|ips| ips.len() == 1 && ips[0] != before["s1"])
    })
    .unwrap_or_else(|| panic!("dup kept s1's address:\n{}", agent.logs()));
    assert_eq!(dup_ip, vec!["198.51.100.205"]);
    let ev = wait_event(store, &agent, "dup", "IPAllocated", "198.51.100.205");
    assert!(
        ev["note"].as_str().unwrap().contains("could not be kept"),
        "{ev}"
    );
    for n in ["s1", "s2", "s4", "s5"] {
        assert_eq!(
            status_ips(store, n),
            vec![before[n].clone()],
            "{n} changed its IP"
        );
    }
    for n in ["s1", "s2", "s4", "s5"] {
        assert_ne!(before[n], new_ip, "a-new got {new_ip}, held by {n}");
    }
    assert_eq!(
        new_ip, before["s3"],
        "lowest free address (the one s3 released)"
    );

    // And one more after the restart: a fresh address.
    put(store, lb_service("late", &[], &[]));
    let late = wait_ip(store, &agent, "late");
    assert_eq!(late, "198.51.100.206");
    for n in ["s1", "s2", "s4", "s5"] {
        assert_eq!(
            status_ips(store, n),
            vec![before[n].clone()],
            "{n} changed its IP"
        );
    }
    wait_counters(store, &agent, "lan", 7, 44);
    // Restored Services got no new IPAllocated Event (no churn).
    for n in ["s1", "s2", "s4", "s5"] {
        let count = events_for(store, n)
            .iter()
            .filter(|e| e["reason"] == "IPAllocated")
            .count();
        assert_eq!(count, 1, "{n}: {:#?}", events_for(store, n));
    }
    assert_no_double_assignment(store);
    assert_no_panic(&agent);
}

// ---- 4. two agents ------------------------------------------------------------------------

/// A second HTTP front-end over the same store (its own request log), on its own runtime.
struct Frontend {
    server: TestApiServer,
    _rt: tokio::runtime::Runtime,
}

impl Frontend {
    fn start(store: &Store) -> Frontend {
        let rt = runtime(1);
        let server = rt
            .block_on(TestApiServer::start_with_store(
                "127.0.0.1:0".parse().unwrap(),
                Options::default(),
                store.clone(),
            ))
            .expect("second front-end");
        Frontend { server, _rt: rt }
    }
}

/// Writes other than the Lease (Service/pool status, Events, ...).
fn non_lease_writes(log: &[RequestRecord]) -> Vec<String> {
    log.iter()
        .filter(|r| r.is_write() && r.resource != "leases")
        .map(|r| format!("{} {} {}", r.verb, r.path, r.code))
        .collect()
}

fn status_patches(log: &[RequestRecord], resource: &str) -> Vec<String> {
    log.iter()
        .filter(|r| r.verb == "patch" && r.resource == resource && r.subresource == "status")
        .map(|r| r.name.clone().unwrap_or_default())
        .collect()
}

#[test]
fn only_the_leader_writes_and_the_follower_takes_over_on_kill() {
    let lab = Lab::new("lb-two");
    let store = lab.store();
    put(store, v4_node("node-b", "10.244.1.0/24"));
    put(store, pool("lan", &["198.51.100.200-198.51.100.250"]));
    // Agent A talks to the lab's server, agent B to a second front-end of the same store:
    // every request in a server's log comes from exactly one agent.
    let front_b = Frontend::start(store);
    let kc_b = lab.dir.path().join("kubeconfig-b");
    front_b.server.write_kubeconfig(&kc_b).expect("kubeconfig");
    let a = lb_agent("node-a", &lab.kubeconfig, &lab.dir);
    let b = lb_agent("node-b", kc_b.to_str().unwrap(), &lab.dir);
    assert!(a.wait_ready(WAIT), "{}", a.logs());
    assert!(b.wait_ready(WAIT), "{}", b.logs());
    let leader_name = poll(WAIT, POLL_EVERY, || {
        match (a.metric("palisade_leader"), b.metric("palisade_leader")) {
            (Some(1.0), Some(0.0)) => Some("node-a"),
            (Some(0.0), Some(1.0)) => Some("node-b"),
            _ => None,
        }
    })
    .expect("no single leader");
    assert_eq!(lab.api.lease_holder().as_deref(), Some(leader_name));
    let (leader, follower, leader_srv, follower_srv) = if leader_name == "node-a" {
        (a, b, &lab.api.server, &front_b.server)
    } else {
        (b, a, &front_b.server, &lab.api.server)
    };

    for n in ["x1", "x2", "x3"] {
        put(store, lb_service(n, &[], &[]));
    }
    let before: BTreeMap<&str, String> = ["x1", "x2", "x3"]
        .iter()
        .map(|n| (*n, wait_ip(store, &leader, n)))
        .collect();
    wait_counters(store, &leader, "lan", 3, 48);
    wait_event(store, &leader, "x3", "IPAllocated", &before["x3"]);
    // Let the follower see all of it and run its passes too.
    std::thread::sleep(Duration::from_millis(700));

    let leader_log = leader_srv.request_log();
    let follower_log = follower_srv.request_log();
    let mut patched = status_patches(&leader_log, "services");
    patched.sort();
    patched.dedup();
    assert_eq!(
        patched,
        vec!["x1", "x2", "x3"],
        "leader wrote every Service status"
    );
    assert!(
        !status_patches(&leader_log, "ipaddresspools").is_empty(),
        "leader wrote pool status"
    );
    assert!(
        leader_log
            .iter()
            .any(|r| r.is_write() && r.resource == "events"),
        "leader published Events"
    );
    let follower_writes = non_lease_writes(&follower_log);
    assert!(
        follower_writes.is_empty(),
        "the follower wrote: {follower_writes:#?}"
    );
    assert_eq!(
        follower.metric("palisade_allocator_services_allocated"),
        Some(0.0)
    );

    // SIGKILL the leader: no Lease release; the follower waits for expiry, then leads.
    follower_srv.clear_request_log();
    let mut leader = leader;
    leader.signal("KILL");
    leader
        .wait_exit(Duration::from_secs(5))
        .expect("killed agent exited");
    poll(WAIT, POLL_EVERY, || {
        (follower.metric("palisade_leader") == Some(1.0)).then_some(())
    })
    .unwrap_or_else(|| panic!("follower never took over:\n{}", follower.logs()));
    assert_eq!(
        lab.api.lease_holder().as_deref(),
        Some(follower.name.as_str())
    );

    put(store, lb_service("x4", &[], &[]));
    let x4 = wait_ip(store, &follower, "x4");
    assert!(
        !before.values().any(|ip| *ip == x4),
        "x4 got {x4}, already in use"
    );
    assert_eq!(x4, "198.51.100.203");
    for (n, ip) in &before {
        assert_eq!(
            status_ips(store, n),
            vec![ip.clone()],
            "{n} changed its IP after fail-over"
        );
    }
    wait_counters(store, &follower, "lan", 4, 47);
    // The new leader rewrote no existing Service: it restored them from their status.
    let rewritten: Vec<String> = status_patches(&follower_srv.request_log(), "services")
        .into_iter()
        .filter(|n| n != "x4")
        .collect();
    assert!(rewritten.is_empty(), "new leader rewrote {rewritten:?}");
    assert_no_double_assignment(store);
    assert_no_panic(&leader);
    assert_no_panic(&follower);
}

// ---- 5. pool edits ------------------------------------------------------------------------

#[test]
fn pool_edit_moves_or_fails_services_whose_ip_left_the_pool() {
    let lab = Lab::new("lb-edit");
    let store = lab.store();
    put(store, pool("lan", &["198.51.100.200-198.51.100.203"]));
    let agent = lab.leader("node-a");
    put(store, lb_service("a", &[], &[]));
    assert_eq!(wait_ip(store, &agent, "a"), "198.51.100.200");
    put(store, lb_service("b", &[], &[]));
    assert_eq!(wait_ip(store, &agent, "b"), "198.51.100.201");

    // .200 leaves the pool: `a` moves to the lowest free address that remains.
    edit(store, POOLS, "IPAddressPool", None, "lan", |p| {
        p["spec"]["addresses"] = json!(["198.51.100.201-198.51.100.203"]);
    });
    let moved = poll(WAIT, POLL_EVERY, || {
        Some(status_ips(store, "a")).filter(|ips| ips.len() == 1 && ips[0] != "198.51.100.200")
    })
    .unwrap_or_else(|| panic!("a did not move:\n{}", agent.logs()));
    assert_eq!(moved, vec!["198.51.100.202"]);
    let ev = wait_event(store, &agent, "a", "IPAllocated", "198.51.100.202");
    assert!(
        ev["note"].as_str().unwrap().contains("198.51.100.200"),
        "note names the old IP: {ev}"
    );
    assert_eq!(
        status_ips(store, "b"),
        vec!["198.51.100.201"],
        "b untouched"
    );
    wait_counters(store, &agent, "lan", 2, 1);

    // Now the pool is only b's address: nothing fits `a` any more.
    edit(store, POOLS, "IPAddressPool", None, "lan", |p| {
        p["spec"]["addresses"] = json!(["198.51.100.201/32"]);
    });
    let ev = wait_event(store, &agent, "a", "AllocationFailed", "PoolExhausted");
    assert_eq!(ev["type"], "Warning", "{ev}");
    wait_no_ip(store, &agent, "a");
    assert_eq!(
        status_ips(store, "b"),
        vec!["198.51.100.201"],
        "b untouched"
    );
    wait_counters(store, &agent, "lan", 1, 0);
    assert!(agent
        .metric("palisade_allocator_errors_total{reason=\"PoolExhausted\"}")
        .is_some_and(|v| v >= 1.0));

    // A requested IP that leaves the pool: AllocationFailed (IPNotInPool), status cleared.
    edit(store, POOLS, "IPAddressPool", None, "lan", |p| {
        p["spec"]["addresses"] = json!(["198.51.100.201-198.51.100.210"]);
    });
    assert_eq!(
        wait_ip(store, &agent, "a"),
        "198.51.100.202",
        "a gets an address again"
    );
    put(
        store,
        lb_service(
            "pinned",
            &[("palisade.dev/loadBalancerIPs", "198.51.100.210")],
            &[],
        ),
    );
    assert_eq!(wait_ip(store, &agent, "pinned"), "198.51.100.210");
    edit(store, POOLS, "IPAddressPool", None, "lan", |p| {
        p["spec"]["addresses"] = json!(["198.51.100.201-198.51.100.209"]);
    });
    wait_event(store, &agent, "pinned", "AllocationFailed", "IPNotInPool");
    wait_no_ip(store, &agent, "pinned");
    assert_eq!(status_ips(store, "a"), vec!["198.51.100.202"]);
    assert_eq!(status_ips(store, "b"), vec!["198.51.100.201"]);
    wait_counters(store, &agent, "lan", 2, 7);
    assert_no_double_assignment(store);
    assert_no_panic(&agent);
}

// ---- 6. bad input -------------------------------------------------------------------------

/// Requested IPs outside pools / taken, unknown pool, exhausted pool, garbage IP.
#[test]
fn bad_requests_get_allocation_failed_with_the_specific_reason() {
    let lab = Lab::new("lb-badreq");
    let store = lab.store();
    put(store, pool("lan", &["198.51.100.200-198.51.100.201"]));
    let agent = lab.leader("node-a");

    put(store, lb_service("s1", &[], &[]));
    assert_eq!(wait_ip(store, &agent, "s1"), "198.51.100.200");
    put(store, lb_service("s2", &[], &[]));
    assert_eq!(wait_ip(store, &agent, "s2"), "198.51.100.201");
    // Pool of 2, third Service: exhausted.
    put(store, lb_service("s3", &[], &[]));

    let mut spec_ip = lb_service("out-spec", &[], &[]);
    spec_ip["spec"]["loadBalancerIP"] = json!("203.0.113.5");
    put(store, spec_ip);
    put(
        store,
        lb_service(
            "out-ann",
            &[("palisade.dev/loadBalancerIPs", "203.0.113.6")],
            &[],
        ),
    );
    put(
        store,
        lb_service(
            "taken",
            &[("palisade.dev/loadBalancerIPs", "198.51.100.200")],
            &[],
        ),
    );
    put(
        store,
        lb_service("unknown", &[("palisade.dev/address-pool", "nope")], &[]),
    );
    put(
        store,
        lb_service(
            "garbage",
            &[("palisade.dev/loadBalancerIPs", "not-an-ip")],
            &[],
        ),
    );

    let cases = [
        ("s3", "PoolExhausted", "lan"),
        ("out-spec", "IPNotInPool", "203.0.113.5"),
        ("out-ann", "IPNotInPool", "203.0.113.6"),
        ("taken", "IPInUse", "default/s1"),
        ("unknown", "UnknownPool", "\"nope\""),
        ("garbage", "InvalidAddress", "not-an-ip"),
    ];
    for (name, reason, detail) in cases {
        let ev = wait_event(store, &agent, name, "AllocationFailed", reason);
        let note = ev["note"].as_str().unwrap();
        assert!(
            note.starts_with(reason),
            "{name}: note should start with {reason}: {note}"
        );
        assert!(
            note.contains(detail),
            "{name}: note should name {detail}: {note}"
        );
        assert_eq!(ev["type"], "Warning", "{ev}");
        assert!(status_ips(store, name).is_empty(), "{name} got an IP");
        assert!(agent
            .metric(&format!(
                "palisade_allocator_errors_total{{reason=\"{reason}\"}}"
            ))
            .is_some_and(|v| v >= 1.0));
    }
    // The holders are untouched.
    assert_eq!(status_ips(store, "s1"), vec!["198.51.100.200"]);
    assert_eq!(status_ips(store, "s2"), vec!["198.51.100.201"]);
    wait_counters(store, &agent, "lan", 2, 0);
    // Failing Services are retried each pass, but stay without an address.
    std::thread::sleep(Duration::from_millis(500));
    for (name, _, _) in cases {
        assert!(status_ips(store, name).is_empty(), "{name} got an IP");
    }

    // Freeing an address serves the exhausted one; a requested IP that becomes free is granted.
    store
        .delete_object("v1", "Service", Some(NS), "s2")
        .expect("delete");
    assert_eq!(wait_ip(store, &agent, "s3"), "198.51.100.201");
    store
        .delete_object("v1", "Service", Some(NS), "s1")
        .expect("delete");
    assert_eq!(wait_ip(store, &agent, "taken"), "198.51.100.200");
    assert_no_double_assignment(store);
    assert_no_panic(&agent);
}

/// Overlapping pools, invalid entries, IPv6 in an IPv4-only cluster.
#[test]
fn bad_pools_report_conditions_naming_the_problem() {
    let lab = Lab::new("lb-badpool");
    let store = lab.store();
    put(store, pool("a", &["198.51.100.200-198.51.100.220"]));
    put(store, pool("b", &["198.51.100.216/29"]));
    put(store, pool("reversed", &["198.51.100.250-198.51.100.240"]));
    put(
        store,
        pool("garbage", &["198.51.100.230-198.51.100.231", "bogus"]),
    );
    put(store, pool("everything", &["0.0.0.0/0"]));
    put(store, pool("v6", &["2001:db8::/120"]));
    put(
        store,
        pool(
            "mixed",
            &["198.51.100.240-198.51.100.241", "2001:db8:1::/120"],
        ),
    );
    let agent = lab.leader("node-a");

    // Overlaps: both pools say so, each naming the other; both stay usable (Invalid False).
    let oa = wait_condition(store, &agent, "a", "Overlapping", "True");
    let ob = wait_condition(store, &agent, "b", "Overlapping", "True");
    assert!(oa["message"].as_str().unwrap().contains("pool b"), "{oa}");
    assert!(ob["message"].as_str().unwrap().contains("pool a"), "{ob}");
    assert!(
        oa["message"].as_str().unwrap().contains("198.51.100.216"),
        "{oa}"
    );
    assert_eq!(
        condition(&pool_obj(store, "a"), "Invalid").unwrap()["status"],
        "False"
    );
    assert_eq!(
        condition(&pool_obj(store, "a"), "Ready").unwrap()["status"],
        "True"
    );

    // Unusable entries: Invalid True, naming the entry; not Ready.
    for (name, entry) in [
        ("reversed", "198.51.100.250-198.51.100.240"),
        ("garbage", "bogus"),
        ("everything", "0.0.0.0/0"),
    ] {
        let c = wait_condition(store, &agent, name, "Invalid", "True");
        assert!(
            c["message"].as_str().unwrap().contains(entry),
            "{name}: {c}"
        );
        assert_eq!(c["reason"], "InvalidAddress", "{c}");
        assert_eq!(
            condition(&pool_obj(store, name), "Ready").unwrap()["status"],
            "False"
        );
    }

    // IPv6 addresses in a cluster whose Nodes have only IPv4 pod CIDRs.
    for name in ["v6", "mixed"] {
        let c = wait_condition(store, &agent, name, "Invalid", "True");
        assert_eq!(c["reason"], "FamilyNotSupported", "{name}: {c}");
        assert!(
            c["message"].as_str().unwrap().contains("IPv6"),
            "{name}: {c}"
        );
    }
    // The IPv6-only pool has nothing usable: it must not claim to be Ready.
    let v6_ready = condition(&pool_obj(store, "v6"), "Ready").unwrap();
    assert_eq!(
        v6_ready["status"], "False",
        "an IPv6-only pool in an IPv4 cluster: {v6_ready}"
    );
    // The mixed pool still serves its IPv4 part.
    put(
        store,
        lb_service("from-mixed", &[("palisade.dev/address-pool", "mixed")], &[]),
    );
    assert_eq!(wait_ip(store, &agent, "from-mixed"), "198.51.100.240");
    put(
        store,
        lb_service("from-v6", &[("palisade.dev/address-pool", "v6")], &[]),
    );
    wait_event(
        store,
        &agent,
        "from-v6",
        "AllocationFailed",
        "FamilyNotSupported",
    );
    assert!(status_ips(store, "from-v6").is_empty());

    // Auto-assignment still works from the valid pools, lowest address of the first pool.
    put(store, lb_service("auto", &[], &[]));
    assert_eq!(wait_ip(store, &agent, "auto"), "198.51.100.200");

    // Fixing a pool clears its Invalid condition.
    edit(store, POOLS, "IPAddressPool", None, "reversed", |p| {
        p["spec"]["addresses"] = json!(["198.51.100.242-198.51.100.250"]);
    });
    wait_condition(store, &agent, "reversed", "Invalid", "False");
    wait_condition(store, &agent, "reversed", "Ready", "True");
    assert_no_double_assignment(store);
    assert_no_panic(&agent);
}

/// Sharing keys, foreign loadBalancerClass, type change to ClusterIP.
#[test]
fn sharing_foreign_classes_and_type_changes() {
    let lab = Lab::new("lb-share");
    let store = lab.store();
    put(store, pool("lan", &["198.51.100.200-198.51.100.210"]));
    let agent = lab.leader("node-a");

    put(
        store,
        lb_service("sh-a", &[("palisade.dev/allow-shared-ip", "web")], &[80]),
    );
    let ip_a = wait_ip(store, &agent, "sh-a");
    put(
        store,
        lb_service("sh-b", &[("palisade.dev/allow-shared-ip", "web")], &[443]),
    );
    assert_eq!(
        wait_ip(store, &agent, "sh-b"),
        ip_a,
        "same key, disjoint ports: shared"
    );
    // Same key, clashing port: a different address (the allocator falls back to a free one).
    put(
        store,
        lb_service(
            "sh-c",
            &[("palisade.dev/allow-shared-ip", "web")],
            &[80, 8080],
        ),
    );
    let ip_c = wait_ip(store, &agent, "sh-c");
    assert_ne!(ip_c, ip_a, "port 80 clashes with sh-a");
    // Another key asking for the shared IP explicitly: refused.
    put(
        store,
        lb_service(
            "sh-d",
            &[
                ("palisade.dev/allow-shared-ip", "other"),
                ("palisade.dev/loadBalancerIPs", &ip_a),
            ],
            &[9000],
        ),
    );
    wait_event(store, &agent, "sh-d", "AllocationFailed", "SharingConflict");
    assert!(status_ips(store, "sh-d").is_empty());
    // No key at all asking for it: IPInUse.
    put(
        store,
        lb_service("sh-e", &[("palisade.dev/loadBalancerIPs", &ip_a)], &[9001]),
    );
    wait_event(store, &agent, "sh-e", "AllocationFailed", "IPInUse");
    wait_counters(store, &agent, "lan", 2, 9);

    // A Service of another class is not ours: no status, no Event.
    let mut foreign = lb_service("foreign", &[], &[]);
    foreign["spec"]["loadBalancerClass"] = json!("example.com/other-lb");
    put(store, foreign);
    // A later Service of ours gets its IP, so a pass has seen `foreign`.
    let mut classed = lb_service("classed", &[], &[]);
    classed["spec"]["loadBalancerClass"] = json!("palisade.dev/palisade");
    put(store, classed);
    let ip_classed = wait_ip(store, &agent, "classed");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        status_ips(store, "foreign").is_empty(),
        "foreign class got an IP"
    );
    assert!(
        events_for(store, "foreign").is_empty(),
        "{:#?}",
        events_for(store, "foreign")
    );
    // A plain ClusterIP Service is not ours either.
    let mut plain = lb_service("plain", &[], &[]);
    plain["spec"]["type"] = json!("ClusterIP");
    put(store, plain);

    // LoadBalancer -> ClusterIP: released (Event, status cleared, address reusable).
    edit(store, "v1", "Service", Some(NS), "classed", |s| {
        s["spec"]["type"] = json!("ClusterIP");
        s["spec"]
            .as_object_mut()
            .unwrap()
            .remove("loadBalancerClass");
    });
    wait_event(store, &agent, "classed", "IPReleased", &ip_classed);
    wait_no_ip(store, &agent, "classed");
    wait_counters(store, &agent, "lan", 2, 9);
    put(store, lb_service("after", &[], &[]));
    assert_eq!(
        wait_ip(store, &agent, "after"),
        ip_classed,
        "released address reused"
    );
    assert!(status_ips(store, "plain").is_empty());

    // Sharing Services released one by one: the shared IP is free only after both.
    store
        .delete_object("v1", "Service", Some(NS), "sh-a")
        .expect("delete");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(status_ips(store, "sh-b"), vec![ip_a.clone()]);
    assert!(
        status_ips(store, "sh-e").is_empty(),
        "sh-b still holds {ip_a}"
    );
    store
        .delete_object("v1", "Service", Some(NS), "sh-b")
        .expect("delete");
    // sh-d (key "other") or sh-e (no key) may now take it; exactly one of them.
    let taken = poll(WAIT, POLL_EVERY, || {
        let d = status_ips(store, "sh-d") == vec![ip_a.clone()];
        let e = status_ips(store, "sh-e") == vec![ip_a.clone()];
        (d || e).then_some((d, e))
    })
    .unwrap_or_else(|| panic!("nobody took the freed shared IP:\n{}", agent.logs()));
    assert!(taken.0 != taken.1, "both took {ip_a}");
    assert_no_double_assignment(store);
    assert_no_panic(&agent);
}
