//! The agent's NetworkPolicy reconciler, in-process: real reflector stores fed by the test API
//! server, the real compiler, and a recording executor instead of the kernel. Shows the
//! safety rules: nothing is applied before the caches have listed, changes are applied once
//! (coalesced), an API outage never produces a "no policies" payload, and a failed apply is
//! retried without losing the rules that are in force.
use std::sync::Arc;
use std::time::Duration;

use palisade_dataplane::RecordingExecutor;
use palisade_enforcement::{ExecutorFactory, NetpolCaches, NetpolReconciler};
use palisade_netpol::builders::{mk_node, mk_node_cidrs, mk_ns, mk_pod, mk_policy, with_pod_ips};
use palisade_netpol::{Family, NodeConfig};
use palisade_poll::poll_async;
use palisade_runtime::config::SyncSettings;
use palisade_runtime::events::EventSink;
use palisade_runtime::metrics::Metrics;
use palisade_runtime::stores::Caches;
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

/// Waits (palisade-poll, every 25 ms, at most 5 s) until `f` holds; panics naming `what`.
async fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let held = poll_async(Duration::from_secs(5), Duration::from_millis(25), || {
        std::future::ready(f())
    })
    .await;
    assert!(held, "timed out waiting for {what}");
}

/// Waits until the last payload `exec` applied has NetworkPolicy ingress chains (`PAL-IN-`),
/// or, with `enforced` false, has none.
async fn wait_enforced(exec: &RecordingExecutor, enforced: bool, what: &str) {
    wait_until(
        || {
            exec.last()
                .is_some_and(|p| p.iptables_restore.contains("PAL-IN-") == enforced)
        },
        what,
    )
    .await;
}

struct Harness {
    server: TestApiServer,
    exec: Arc<RecordingExecutor>,
    shutdown: CancellationToken,
}

async fn start(api_down_at_start: bool) -> Harness {
    let exec = Arc::new(RecordingExecutor::new());
    let executors: ExecutorFactory = {
        let exec = exec.clone();
        Arc::new(move |_| Ok(exec.clone() as Arc<dyn palisade_dataplane::Executor>))
    };
    let (server, shutdown) = start_with(api_down_at_start, false, executors).await;
    Harness {
        server,
        exec,
        shutdown,
    }
}

/// The API server with Node n1 and pods x/a, x/b (dual-stack: IPv6 pod CIDR and addresses
/// too), and the reconciler running with `executors`.
async fn start_with(
    api_down_at_start: bool,
    dual_stack: bool,
    executors: ExecutorFactory,
) -> (TestApiServer, CancellationToken) {
    let server = TestApiServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let store = server.store();
    let node = if dual_stack {
        mk_node_cidrs("n1", &["10.244.1.0/24", "fd00:10:1::/64"])
    } else {
        mk_node("n1", "10.244.1.0/24")
    };
    store.put_object(to_json("Node", "v1", &node)).unwrap();
    store
        .put_object(to_json("Namespace", "v1", &mk_ns("x", &[])))
        .unwrap();
    for (name, ip, ip6) in [
        ("a", "10.244.1.10", "fd00:10:1::10"),
        ("b", "10.244.1.11", "fd00:10:1::11"),
    ] {
        let mut pod = mk_pod("x", name, &[("app", name)], ip, "n1");
        if dual_stack {
            pod = with_pod_ips(pod, &[ip, ip6]);
        }
        store.put_object(to_json("Pod", "v1", &pod)).unwrap();
    }
    if api_down_at_start {
        server.set_outage(Outage::Disconnect);
    }
    let config = kube::Config::new(server.url().parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let trigger = Trigger::new();
    let mut caches = Caches::new(
        client,
        metrics.clone(),
        Duration::from_millis(500),
        shutdown.clone(),
    );
    let stores = NetpolCaches::register(&mut caches, &trigger);
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
    (server, shutdown)
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
    wait_enforced(&h.exec, true, "the policy to be applied").await;
    let applied = h.exec.attempts();
    // Nothing changed: no further applies.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.exec.attempts(), applied);

    h.server
        .store()
        .delete_object("networking.k8s.io/v1", "NetworkPolicy", Some("x"), "deny")
        .unwrap();
    wait_enforced(&h.exec, false, "the policy removal to be applied").await;
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
    wait_enforced(&h.exec, true, "the policy to be applied").await;
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
    wait_enforced(&h.exec, true, "the policy to be applied after retries").await;
    h.shutdown.cancel();
}

/// A dual-stack node: each family gets its own payload and executor, and a policy change
/// reaches both. Then a node whose IPv6 rules cannot be applied (no ip6tables) keeps
/// enforcing IPv4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_node_enforces_both_families() {
    let v4 = Arc::new(RecordingExecutor::new());
    let v6 = Arc::new(RecordingExecutor::new());
    let executors: ExecutorFactory = {
        let (v4, v6) = (v4.clone(), v6.clone());
        Arc::new(move |f| {
            Ok(match f {
                Family::V4 => v4.clone() as Arc<dyn palisade_dataplane::Executor>,
                Family::V6 => v6.clone(),
            })
        })
    };
    let (server, shutdown) = start_with(false, true, executors).await;
    wait_until(
        || v4.attempts() >= 1 && v6.attempts() >= 1,
        "a first apply per family",
    )
    .await;
    let p6 = v6.last().unwrap();
    assert_eq!(p6.family, Family::V6);
    assert!(
        p6.iptables_restore.contains("fd00:10:1::10/128"),
        "{}",
        p6.iptables_restore
    );
    assert!(!p6.iptables_restore.contains("10.244.1.10"));
    assert_eq!(v4.last().unwrap().family, Family::V4);
    assert!(v4.payloads().iter().all(|p| p.family == Family::V4));

    server.store().put_object(deny_all()).unwrap();
    for (exec, what) in [(&v4, "IPv4"), (&v6, "IPv6")] {
        wait_enforced(exec, true, &format!("the policy to be applied over {what}")).await;
    }
    shutdown.cancel();

    // No ip6tables: IPv4 still enforced, IPv6 reported.
    let v4 = Arc::new(RecordingExecutor::new());
    let executors: ExecutorFactory = {
        let v4 = v4.clone();
        Arc::new(move |f| match f {
            Family::V4 => Ok(v4.clone() as Arc<dyn palisade_dataplane::Executor>),
            Family::V6 => Err("ip6tables-nft-restore not found".into()),
        })
    };
    let (server, shutdown) = start_with(false, true, executors).await;
    server.store().put_object(deny_all()).unwrap();
    wait_enforced(&v4, true, "IPv4 enforcement without an IPv6 executor").await;
    shutdown.cancel();
}
