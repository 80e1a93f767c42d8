//! The real `palisade agent` binary against the project's test API server: start-up,
//! readiness, metrics, SIGTERM, leader election and bad input. These tests run the
//! LoadBalancer side only (`--enable-netpol=false`), so they need no root and never touch the
//! host's firewall; NetworkPolicy enforcement by the agent is tested in network namespaces.
use std::time::Duration;

use palisade_tests::{lb_agent, poll, Api, TempDir, POLL_EVERY};
use serde_json::json;

#[test]
fn agent_becomes_ready_serves_metrics_and_stops_on_sigterm() {
    let api = Api::start();
    let dir = TempDir::new("agent-ready");
    let kc = api.kubeconfig(&dir);
    let mut agent = lb_agent("node-a", &kc, &dir);

    assert!(
        agent.wait_ready(Duration::from_secs(20)),
        "agent never became ready:\n{}",
        agent.logs()
    );
    assert_eq!(agent.get("/healthz").map(|r| r.0), Some(200));
    assert_eq!(agent.metric("palisade_ready"), Some(1.0));
    assert!(agent
        .metric("palisade_watch_events_total{resource=\"services\"}")
        .is_some_and(|v| v >= 1.0));
    let (_, metrics) = agent.get("/metrics").unwrap();
    assert!(
        metrics.contains("palisade_build_info{version="),
        "{metrics}"
    );
    // Alone, it becomes the allocator leader.
    assert!(
        poll(Duration::from_secs(10), POLL_EVERY, || (agent
            .metric("palisade_leader")
            == Some(1.0))
        .then_some(()))
        .is_some(),
        "single agent did not take the lease:\n{}",
        agent.logs()
    );
    assert_eq!(api.lease_holder().as_deref(), Some("node-a"));

    agent.signal("TERM");
    let status = agent
        .wait_exit(Duration::from_secs(15))
        .expect("agent did not exit on SIGTERM");
    assert!(status.success(), "exit status {status:?}\n{}", agent.logs());
    let logs = agent.logs();
    assert!(logs.contains("SIGTERM received"), "{logs}");
    assert!(logs.contains("palisade agent stopped"), "{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
    // It stepped down and released the lease on the way out.
    assert_eq!(api.lease_holder().unwrap_or_default(), "");
}

#[test]
fn readiness_waits_for_the_initial_lists() {
    let api = Api::start();
    // Connections are closed without an answer (kube retries 503s for minutes, which would
    // only delay the same outcome).
    api.server.set_outage(palisade_testapi::Outage::Disconnect);
    let dir = TempDir::new("agent-notready");
    let kc = api.kubeconfig(&dir);
    let agent = lb_agent("node-a", &kc, &dir);

    let not_ready = poll(Duration::from_secs(10), POLL_EVERY, || {
        agent.get("/readyz").filter(|(c, _)| *c == 503)
    })
    .expect("readyz never answered");
    assert!(
        not_ready.1.contains("waiting for the first list of"),
        "{}",
        not_ready.1
    );
    // Still not ready a little later, and alive.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(agent.get("/readyz").map(|r| r.0), Some(503));
    assert_eq!(agent.get("/healthz").map(|r| r.0), Some(200));

    api.server.set_outage(palisade_testapi::Outage::Off);
    assert!(
        agent.wait_ready(Duration::from_secs(20)),
        "not ready after the API came back:\n{}",
        agent.logs()
    );
    let logs = agent.logs();
    assert!(logs.contains("watch failed"), "{logs}");
}

#[test]
fn leader_election_one_leader_and_failover_on_kill() {
    let api = Api::start();
    let dir = TempDir::new("agent-leader");
    let kc = api.kubeconfig(&dir);
    let a = lb_agent("node-a", &kc, &dir);
    let b = lb_agent("node-b", &kc, &dir);
    assert!(a.wait_ready(Duration::from_secs(20)) && b.wait_ready(Duration::from_secs(20)));

    let leaders = || {
        let la = a.metric("palisade_leader") == Some(1.0);
        let lb = b.metric("palisade_leader") == Some(1.0);
        (la, lb)
    };
    let first = poll(Duration::from_secs(10), POLL_EVERY, || match leaders() {
        (true, false) => Some("node-a"),
        (false, true) => Some("node-b"),
        _ => None,
    })
    .expect("no single leader emerged");
    // Exactly one leader, stably, and the Lease names it.
    for _ in 0..10 {
        let (la, lb) = leaders();
        assert!(!(la && lb), "two leaders at once");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(api.lease_holder().as_deref(), Some(first));

    // SIGKILL the leader: no release, so the other must wait for expiry and take over.
    let (mut leader, follower) = if first == "node-a" { (a, b) } else { (b, a) };
    leader.signal("KILL");
    leader
        .wait_exit(Duration::from_secs(5))
        .expect("killed agent exited");
    let t0 = std::time::Instant::now();
    let took = poll(Duration::from_secs(15), POLL_EVERY, || {
        (follower.metric("palisade_leader") == Some(1.0)).then_some(())
    });
    assert!(
        took.is_some(),
        "follower never took the lease:\n{}",
        follower.logs()
    );
    let elapsed = t0.elapsed();
    assert_eq!(api.lease_holder().as_deref(), Some(follower.name.as_str()));
    // Lease duration 2s: the take-over must wait for expiry, never steal a live lease.
    assert!(
        elapsed >= Duration::from_millis(1000),
        "took over after only {elapsed:?}"
    );
}

#[test]
fn garbage_kubeconfig_fails_clearly() {
    let dir = TempDir::new("agent-badkc");
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, "this is: [not a kubeconfig\n").unwrap();
    let mut agent = lb_agent("node-a", path.to_str().unwrap(), &dir);
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .expect("agent should exit on a garbage kubeconfig");
    assert!(!status.success());
    let logs = agent.logs();
    assert!(logs.contains("cannot read kubeconfig"), "{logs}");
    assert!(logs.contains(path.to_str().unwrap()), "{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
}

#[test]
fn unreachable_api_server_is_reported_and_survived() {
    let dir = TempDir::new("agent-unreachable");
    let port = palisade_tests::free_port();
    let kc = dir.path().join("kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{port}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user: {{}}\n"
        ),
    )
    .unwrap();
    let mut agent = lb_agent("node-a", kc.to_str().unwrap(), &dir);
    let logged = poll(Duration::from_secs(10), POLL_EVERY, || {
        agent.logs().contains("watch failed").then_some(())
    });
    assert!(logged.is_some(), "no clear log line:\n{}", agent.logs());
    assert_eq!(agent.get("/healthz").map(|r| r.0), Some(200));
    assert_eq!(agent.get("/readyz").map(|r| r.0), Some(503));
    assert!(agent
        .metric("palisade_watch_errors_total{resource=\"services\"}")
        .is_some_and(|v| v >= 1.0));
    agent.signal("TERM");
    let status = agent
        .wait_exit(Duration::from_secs(15))
        .expect("exit on SIGTERM");
    assert!(status.success(), "{}", agent.logs());
    assert!(!agent.logs().contains("panicked"));
}

#[test]
fn malformed_ip_address_pool_is_reported_and_skipped() {
    let api = Api::start();
    let store = api.server.store();
    store
        .put_object(json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "IPAddressPool",
            "metadata": {"name": "good"},
            "spec": {"addresses": ["198.51.100.200-198.51.100.250"]}
        }))
        .unwrap();
    store
        .put_object(json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "IPAddressPool",
            "metadata": {"name": "broken"},
            "spec": {"addresses": "198.51.100.0/24", "autoAssign": "maybe"}
        }))
        .unwrap();
    let dir = TempDir::new("agent-malformed");
    let kc = api.kubeconfig(&dir);
    let agent = lb_agent("node-a", &kc, &dir);
    assert!(
        agent.wait_ready(Duration::from_secs(20)),
        "{}",
        agent.logs()
    );
    let gauge = poll(Duration::from_secs(10), POLL_EVERY, || {
        agent
            .metric("palisade_invalid_objects{kind=\"IPAddressPool\"}")
            .filter(|v| *v == 1.0)
    });
    assert!(
        gauge.is_some(),
        "invalid_objects gauge not 1:\n{}",
        agent.logs()
    );
    // The leader writes an Invalid condition that names the problem.
    let cond = poll(Duration::from_secs(10), POLL_EVERY, || {
        let pool = store.get_object("palisade.dev/v1alpha1", "IPAddressPool", None, "broken")?;
        pool["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Invalid" && c["status"] == "True")
            .cloned()
    })
    .unwrap_or_else(|| panic!("no Invalid condition:\n{}", agent.logs()));
    assert_eq!(cond["reason"], "MalformedObject");
    assert!(
        cond["message"].as_str().unwrap().contains("invalid type"),
        "{cond}"
    );
    let logs = agent.logs();
    assert!(
        logs.contains("skipping a malformed custom resource") && logs.contains("broken"),
        "{logs}"
    );
    assert!(!logs.contains("panicked"));
    // The good pool is untouched by the malformed-object path.
    let good = store
        .get_object("palisade.dev/v1alpha1", "IPAddressPool", None, "good")
        .unwrap();
    assert!(good["status"]["conditions"]
        .as_array()
        .is_none_or(|c| !c.iter().any(|c| c["reason"] == "MalformedObject")));
}

#[test]
fn a_list_that_keeps_failing_backs_off_and_is_not_reported_as_recovered() {
    let api = Api::start();
    // A Service that does not decode (the test API server validates nothing): every list of
    // Services fails in the client, like a 403 or a removed CRD would.
    api.server
        .store()
        .put_object(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "broken", "namespace": "default"},
            "spec": {"ports": "not-a-list"}
        }))
        .unwrap();
    let dir = TempDir::new("agent-backoff");
    let kc = api.kubeconfig(&dir);
    api.server.clear_request_log();
    let agent = lb_agent("node-a", &kc, &dir);
    std::thread::sleep(Duration::from_secs(6));
    let lists = api.server.count_requests("list", "services");
    // Exponential backoff from 250 ms (with jitter): about 5 attempts in 6 s; without it, ~18.
    assert!(
        (2..=10).contains(&lists),
        "{lists} lists of services in 6 s:\n{}",
        agent.logs()
    );
    let logs = agent.logs();
    assert!(logs.contains("watch failed"), "{logs}");
    assert!(
        !logs.contains("watch recovered"),
        "false recovery reported:\n{logs}"
    );
    assert_eq!(agent.get("/readyz").map(|r| r.0), Some(503));
}
