//! The agent's enforcement reconciler with ClusterNetworkPolicies, in-process: the test API
//! server serves the upstream kind (`policy.networking.k8s.io/v1alpha2`), real reflector
//! stores, the real compiler and a recording executor. Shows: policies are watched and
//! compiled, each node writes its own status condition, a status-only change does not
//! re-apply, and a policy the node cannot use reports `False`.
use std::sync::Arc;
use std::time::Duration;

use palisade_dataplane::RecordingExecutor;
use palisade_enforcement::{ExecutorFactory, NetpolCaches, NetpolReconciler};
use palisade_netpol::builders::{mk_node, mk_ns, mk_pod};
use palisade_netpol::NodeConfig;
use palisade_poll::poll_async;
use palisade_runtime::config::SyncSettings;
use palisade_runtime::events::EventSink;
use palisade_runtime::metrics::Metrics;
use palisade_runtime::stores::Caches;
use palisade_runtime::sync::Trigger;
use palisade_testapi::TestApiServer;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const API: &str = "policy.networking.k8s.io/v1alpha2";
const KIND: &str = "ClusterNetworkPolicy";

fn to_json<T: serde::Serialize>(kind: &str, api_version: &str, obj: &T) -> Value {
    let mut v = serde_json::to_value(obj).unwrap();
    v["kind"] = json!(kind);
    v["apiVersion"] = json!(api_version);
    v
}

/// Waits (palisade-poll, every 25 ms, at most 5 s) until `f` holds; panics naming `what`.
async fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let held = poll_async(Duration::from_secs(5), Duration::from_millis(25), || {
        std::future::ready(f())
    })
    .await;
    assert!(held, "timed out waiting for {what}");
}

fn cnp(name: &str, tier: &str) -> Value {
    json!({
        "apiVersion": API,
        "kind": KIND,
        "metadata": { "name": name },
        "spec": {
            "tier": tier,
            "priority": 10,
            "subject": { "namespaces": { "matchLabels": { "kubernetes.io/metadata.name": "x" } } },
            "ingress": [{ "name": "deny-y", "action": "Deny", "from": [{ "namespaces": { "matchLabels": { "kubernetes.io/metadata.name": "y" } } }] }],
        },
    })
}

/// This node's condition on policy `name`: (status, reason).
fn condition(server: &TestApiServer, name: &str) -> Option<(String, String)> {
    let obj = server.store().get_object(API, KIND, None, name)?;
    let conds = obj.pointer("/status/conditions")?.as_array()?.clone();
    conds
        .iter()
        .find(|c| c["type"] == "palisade.dev/n1")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
}

async fn start() -> (TestApiServer, Arc<RecordingExecutor>, CancellationToken) {
    let server = TestApiServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let store = server.store();
    store
        .put_object(to_json("Node", "v1", &mk_node("n1", "10.244.1.0/24")))
        .unwrap();
    for ns in ["x", "y"] {
        store
            .put_object(to_json("Namespace", "v1", &mk_ns(ns, &[])))
            .unwrap();
    }
    store
        .put_object(to_json(
            "Pod",
            "v1",
            &mk_pod("x", "a", &[], "10.244.1.10", "n1"),
        ))
        .unwrap();
    let exec = Arc::new(RecordingExecutor::new());
    let executors: ExecutorFactory = {
        let exec = exec.clone();
        Arc::new(move |_| Ok(exec.clone() as Arc<dyn palisade_dataplane::Executor>))
    };
    let config = kube::Config::new(server.url().parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let trigger = Trigger::new();
    let mut caches = Caches::new(
        client.clone(),
        metrics.clone(),
        Duration::from_millis(500),
        shutdown.clone(),
    );
    let stores = NetpolCaches::register_with(&mut caches, &trigger, Some(client));
    let reconciler = NetpolReconciler {
        stores,
        node: NodeConfig::new("n1"),
        executors,
        links: None,
        conntrack: None,
        metrics: metrics.clone(),
        events: EventSink::log_only(metrics),
        settings: SyncSettings {
            min_interval: Duration::from_millis(20),
            resync_interval: Duration::from_secs(3600),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_millis(200),
        },
        deny_index: None,
    };
    tokio::spawn(reconciler.run(trigger, shutdown.clone()));
    (server, exec, shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_network_policies_are_enforced_and_report_status() {
    let (server, exec, shutdown) = start().await;
    wait_until(|| exec.attempts() >= 1, "the first apply").await;
    server.store().put_object(cnp("guard", "Admin")).unwrap();
    wait_until(
        || {
            exec.last()
                .is_some_and(|p| p.iptables_restore.contains("cnp/admin/guard/ingress/0"))
        },
        "the policy to be applied",
    )
    .await;
    wait_until(
        || condition(&server, "guard") == Some(("True".into(), "Applied".into())),
        "the Applied condition",
    )
    .await;
    // Our own status write changed the object; it must not cause another apply.
    let applied = exec.attempts();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(exec.attempts(), applied, "status-only change re-applied");

    // A tier this version does not know: not applied, and said so.
    server
        .store()
        .put_object(cnp("future", "Developer"))
        .unwrap();
    wait_until(
        || condition(&server, "future") == Some(("False".into(), "NotApplied".into())),
        "the NotApplied condition",
    )
    .await;

    // Deleting the policy removes its rules.
    server
        .store()
        .delete_object(API, KIND, None, "guard")
        .unwrap();
    wait_until(
        || {
            exec.last()
                .is_some_and(|p| !p.iptables_restore.contains("cnp/admin/guard"))
        },
        "the policy removal",
    )
    .await;
    shutdown.cancel();
}
