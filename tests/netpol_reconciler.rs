//! The agent's NetworkPolicy reconciler, in-process: real reflector stores fed by the test API
//! server, the real compiler, and a recording executor instead of the kernel. Shows the
//! safety rules: nothing is applied before the caches have listed, changes are applied once
//! (coalesced), an API outage never produces a "no policies" payload, and a failed apply is
//! retried without losing the rules that are in force.
use std::sync::Arc;
use std::time::Duration;

use palisade_dataplane::RecordingExecutor;
use palisade_netpol::builders::{mk_node, mk_ns, mk_pod, mk_policy};
use palisade_netpol::NodeConfig;
use palisade_runtime::config::SyncSettings;
use palisade_runtime::events::EventSink;
use palisade_runtime::metrics::Metrics;
use palisade_runtime::netpol::NetpolReconciler;
use palisade_runtime::stores::{Stores, Subscribers, Wanted};
use palisade_runtime::sync::Trigger;
use palisade_testapi::{Outage, TestApiServer};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn to_json<T: serde::Serialize>(kind: &str, api_version: &str, obj: &T) -> serde_json::Value {
    let mut v = serde_json::to_value(obj).unwrap();
    v["kind"] = json!(kind);
    v["apiVersion"] = json!(api_version);
    v
}

async fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

struct Harness {
    server: TestApiServer,
    exec: Arc<RecordingExecutor>,
    shutdown: CancellationToken,
}

async fn start(api_down_at_start: bool) -> Harness {
    let server = TestApiServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let store = server.store();
    store
        .put_object(to_json("Node", "v1", &mk_node("n1", "10.244.1.0/24")))
        .unwrap();
    store
        .put_object(to_json("Namespace", "v1", &mk_ns("x", &[])))
        .unwrap();
    for (name, ip) in [("a", "10.244.1.10"), ("b", "10.244.1.11")] {
        store
            .put_object(to_json(
                "Pod",
                "v1",
                &mk_pod("x", name, &[("app", name)], ip, "n1"),
            ))
            .unwrap();
    }
    if api_down_at_start {
        server.set_outage(Outage::Disconnect);
    }
    let config = kube::Config::new(server.url().parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let trigger = Trigger::new();
    let subs = Subscribers {
        pods: vec![trigger.clone()],
        namespaces: vec![trigger.clone()],
        network_policies: vec![trigger.clone()],
        nodes: vec![trigger.clone()],
        ..Default::default()
    };
    let stores = Stores::start(
        &client,
        Wanted::netpol(),
        subs,
        metrics.clone(),
        Duration::from_millis(500),
        shutdown.clone(),
    );
    let exec = Arc::new(RecordingExecutor::new());
    let reconciler = NetpolReconciler {
        stores,
        node: NodeConfig::new("n1"),
        executor: exec.clone(),
        metrics: metrics.clone(),
        events: EventSink::log_only(metrics),
        settings: SyncSettings {
            min_interval: Duration::from_millis(20),
            resync_interval: Duration::from_secs(3600),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_millis(200),
        },
    };
    tokio::spawn(reconciler.run(trigger, shutdown.clone()));
    Harness {
        server,
        exec,
        shutdown,
    }
}

fn deny_all() -> serde_json::Value {
    to_json(
        "NetworkPolicy",
        "networking.k8s.io/v1",
        &mk_policy(
            "x",
            "deny",
            json!({"podSelector": {"matchLabels": {"app": "a"}}}),
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_after_sync_then_on_each_change() {
    let h = start(false).await;
    wait_until(|| h.exec.attempts() >= 1, "the first apply").await;
    let first = h.exec.last().unwrap();
    assert!(
        !first.iptables_restore.contains("PAL-PI-"),
        "no policy yet:\n{}",
        first.iptables_restore
    );

    h.server.store().put_object(deny_all()).unwrap();
    wait_until(
        || {
            h.exec
                .last()
                .is_some_and(|p| p.iptables_restore.contains("PAL-IN-"))
        },
        "the policy to be applied",
    )
    .await;
    let applied = h.exec.attempts();
    // Nothing changed: no further applies.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.exec.attempts(), applied);

    h.server
        .store()
        .delete_object("networking.k8s.io/v1", "NetworkPolicy", Some("x"), "deny")
        .unwrap();
    wait_until(
        || {
            h.exec
                .last()
                .is_some_and(|p| !p.iptables_restore.contains("PAL-IN-"))
        },
        "the policy removal to be applied",
    )
    .await;
    h.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_applied_before_the_caches_list_and_an_outage_keeps_the_rules() {
    // The API is down from the start: no list, so nothing may be applied (an empty cache
    // would "converge" to no policies).
    let h = start(true).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(h.exec.attempts(), 0, "applied before the caches listed");
    h.server.set_outage(Outage::Off);
    wait_until(|| h.exec.attempts() >= 1, "the first apply").await;
    h.server.store().put_object(deny_all()).unwrap();
    wait_until(
        || {
            h.exec
                .last()
                .is_some_and(|p| p.iptables_restore.contains("PAL-IN-"))
        },
        "the policy to be applied",
    )
    .await;
    let enforced = h.exec.last().unwrap();

    // API outage: watches fail, caches keep their content, nothing new is applied.
    h.server.set_outage(Outage::Disconnect);
    let before = h.exec.payloads().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for p in &h.exec.payloads()[before..] {
        assert_eq!(p, &enforced, "an outage changed the enforced rules");
    }
    h.server.set_outage(Outage::Off);
    h.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_apply_is_retried_until_it_succeeds() {
    let h = start(false).await;
    wait_until(|| h.exec.attempts() >= 1, "the first apply").await;
    h.exec.fail_next(3);
    let before = h.exec.attempts();
    h.server.store().put_object(deny_all()).unwrap();
    wait_until(
        || h.exec.attempts() >= before + 4,
        "three failures and a retry",
    )
    .await;
    wait_until(
        || {
            h.exec
                .last()
                .is_some_and(|p| p.iptables_restore.contains("PAL-IN-"))
        },
        "the policy to be applied after retries",
    )
    .await;
    h.shutdown.cancel();
}
