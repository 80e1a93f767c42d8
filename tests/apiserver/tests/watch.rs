//! Watch behaviour through the real `kube::Client` and `kube::runtime`: event streams,
//! bookmarks, selectors, 410 recovery by relisting, outages, streaming lists, the events
//! recorder.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{api_code, client, eventually, server, server_with};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{
    Api, ListParams, Patch, PatchParams, PostParams, ResourceExt, WatchEvent, WatchParams,
};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store as Reader};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::Resource;
use palisade_testapi::{Options, Outage, TestApiServer};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);

fn pod_json(ns: &str, name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": labels},
           "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "x"}]}})
}

/// What a watcher reported, in a compact form for assertions.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Init,
    InitApply(String),
    InitDone,
    Apply(String),
    Delete(String),
    Error(String),
}

/// A reflector over `api` that records every watcher event.
struct Reflector {
    reader: Reader<Pod>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Reflector {
    fn start(api: Api<Pod>, config: watcher::Config) -> Self {
        let (reader, writer) = reflector::store::<Pod>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let stream = watcher(api, config).default_backoff().reflect(writer);
        let task = tokio::spawn(async move {
            stream
                .for_each(|ev| {
                    let item = match ev {
                        Ok(watcher::Event::Init) => Seen::Init,
                        Ok(watcher::Event::InitApply(p)) => Seen::InitApply(p.name_any()),
                        Ok(watcher::Event::InitDone) => Seen::InitDone,
                        Ok(watcher::Event::Apply(p)) => Seen::Apply(p.name_any()),
                        Ok(watcher::Event::Delete(p)) => Seen::Delete(p.name_any()),
                        Err(e) => Seen::Error(e.to_string()),
                    };
                    log.lock().unwrap().push(item);
                    async {}
                })
                .await;
        });
        Self { reader, seen, task }
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.reader.state().iter().map(|p| p.name_any()).collect();
        names.sort();
        names
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    async fn wait_for(&self, what: &str, want: &[&str]) {
        eventually(what, WAIT, || async { self.names() == want }).await;
    }

    /// Waits until the cached pod `name` has the label `key`.
    async fn wait_labelled(&self, what: &str, name: &str, key: &str) {
        eventually(what, WAIT, || async {
            self.reader
                .state()
                .iter()
                .any(|p| p.name_any() == name && p.labels().contains_key(key))
        })
        .await;
    }
}

/// The query string of the first watch request the server got.
fn first_watch_query(server: &TestApiServer) -> String {
    server
        .request_log()
        .into_iter()
        .find(|r| r.verb == "watch")
        .expect("a watch request")
        .query
}

impl Drop for Reflector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn reflector_follows_initial_list_then_changes() {
    let server = server().await;
    server
        .store()
        .put_object(pod_json("a", "p1", json!({})))
        .unwrap();
    server
        .store()
        .put_object(pod_json("b", "p2", json!({})))
        .unwrap();
    let client = client(&server);
    let r = Reflector::start(Api::all(client.clone()), watcher::Config::default());
    r.wait_for("initial list", &["p1", "p2"]).await;

    let pods: Api<Pod> = Api::namespaced(client, "a");
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod_json("a", "p3", json!({}))).unwrap(),
    )
    .await
    .unwrap();
    r.wait_for("ADDED p3", &["p1", "p2", "p3"]).await;
    pods.patch(
        "p3",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"x": "1"}}})),
    )
    .await
    .unwrap();
    r.wait_labelled("MODIFIED p3", "p3", "x").await;
    server
        .store()
        .delete_object("v1", "Pod", Some("b"), "p2")
        .unwrap();
    r.wait_for("DELETED p2", &["p1", "p3"]).await;

    assert_eq!(
        r.seen(),
        [
            Seen::Init,
            Seen::InitApply("p1".into()),
            Seen::InitApply("p2".into()),
            Seen::InitDone,
            Seen::Apply("p3".into()),
            Seen::Apply("p3".into()),
            Seen::Delete("p2".into()),
        ]
    );
    assert_eq!(server.count_requests("list", "pods"), 1);
    assert_eq!(server.count_requests("watch", "pods"), 1);
    let query = first_watch_query(&server);
    assert!(query.contains("allowWatchBookmarks=true"), "{query}");
}

async fn collect_events(
    api: &Api<Pod>,
    wp: &WatchParams,
    rv: &str,
) -> Result<Vec<WatchEvent<Pod>>, kube::Error> {
    api.watch(wp, rv).await?.try_collect().await
}

fn summary(events: &[WatchEvent<Pod>]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Added(p) => Some(format!("ADDED {}", p.name_any())),
            WatchEvent::Modified(p) => Some(format!("MODIFIED {}", p.name_any())),
            WatchEvent::Deleted(p) => Some(format!("DELETED {}", p.name_any())),
            WatchEvent::Bookmark(_) => None,
            WatchEvent::Error(e) => Some(format!("ERROR {} {}", e.code, e.reason)),
        })
        .collect()
}

#[tokio::test]
async fn raw_watch_replays_history_sends_bookmarks_and_times_out() {
    let server = server().await;
    let store = server.store();
    store.put_object(pod_json("a", "old", json!({}))).unwrap();
    let rv = store.resource_version().to_string();
    store.put_object(pod_json("a", "p1", json!({}))).unwrap();
    store
        .put_object(pod_json("a", "p1", json!({"v": "2"})))
        .unwrap();
    store.delete_object("v1", "Pod", Some("a"), "p1").unwrap();
    let api: Api<Pod> = Api::namespaced(client(&server), "a");

    // Strictly after `rv`, then bookmarks, then the stream ends at timeoutSeconds.
    let started = std::time::Instant::now();
    let events = collect_events(&api, &WatchParams::default().timeout(1), &rv)
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    assert_eq!(summary(&events), ["ADDED p1", "MODIFIED p1", "DELETED p1"]);
    let bookmarks: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Bookmark(b) => Some(b.metadata.resource_version.clone()),
            _ => None,
        })
        .collect();
    assert!(
        bookmarks.len() >= 2,
        "bookmarks every 200 ms: {bookmarks:?}"
    );
    assert!(bookmarks
        .iter()
        .all(|b| *b == store.resource_version().to_string()));
    // Object resourceVersions increase; the DELETED one carries the delete's version.
    let rvs: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Added(p) | WatchEvent::Modified(p) | WatchEvent::Deleted(p) => {
                p.resource_version().and_then(|v| v.parse().ok())
            }
            _ => None,
        })
        .collect();
    assert!(rvs.windows(2).all(|w| w[0] < w[1]), "{rvs:?}");
    assert_eq!(rvs.last().copied(), Some(store.resource_version()));

    // No bookmarks unless asked for.
    let events = collect_events(
        &api,
        &WatchParams::default().timeout(1).disable_bookmarks(),
        &rv,
    )
    .await
    .unwrap();
    assert!(!events.iter().any(|e| matches!(e, WatchEvent::Bookmark(_))));

    // "0" starts from the current state.
    let events = collect_events(&api, &WatchParams::default().timeout(1), "0")
        .await
        .unwrap();
    assert_eq!(summary(&events), ["ADDED old"]);

    // An expired resourceVersion is an ERROR event with 410 Expired.
    server.compact();
    let events = collect_events(&api, &WatchParams::default().timeout(1), &rv)
        .await
        .unwrap();
    assert_eq!(summary(&events), ["ERROR 410 Expired"]);
}

#[tokio::test]
async fn selector_watch_turns_leaving_objects_into_deleted() {
    let server = server().await;
    let store = server.store();
    store
        .put_object(pod_json("a", "p1", json!({"app": "web"})))
        .unwrap();
    let rv = store.resource_version().to_string();
    let api: Api<Pod> = Api::namespaced(client(&server), "a");
    let watch = {
        let api = api.clone();
        let rv = rv.clone();
        tokio::spawn(async move {
            collect_events(
                &api,
                &WatchParams::default()
                    .labels("app=web")
                    .timeout(2)
                    .disable_bookmarks(),
                &rv,
            )
            .await
        })
    };
    // Give the watch a moment to start; events after `rv` are replayed anyway.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let set_app = |app: &'static str| {
        let api = api.clone();
        async move {
            api.patch(
                "p1",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"app": app}}})),
            )
            .await
            .unwrap()
        }
    };
    let left = set_app("db").await;
    set_app("cache").await;
    set_app("web").await;
    store
        .put_object(pod_json("a", "p2", json!({"app": "db"})))
        .unwrap();
    let events = watch.await.unwrap().unwrap();
    assert_eq!(summary(&events), ["DELETED p1", "ADDED p1"]);
    // The DELETED object is the last matching state with the change's resourceVersion.
    let WatchEvent::Deleted(deleted) = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!(deleted.labels().get("app").map(String::as_str), Some("web"));
    assert_eq!(deleted.resource_version(), left.resource_version());

    // Field selectors filter watches too.
    let node_b = collect_events(
        &api,
        &WatchParams::default()
            .fields("spec.nodeName=node-b")
            .timeout(1),
        &rv,
    )
    .await
    .unwrap();
    assert!(summary(&node_b).is_empty());
}

#[tokio::test]
async fn expired_resource_version_makes_the_watcher_relist() {
    let server = server().await;
    let store = server.store();
    for name in ["p1", "p2", "p3"] {
        store.put_object(pod_json("a", name, json!({}))).unwrap();
    }
    let r = Reflector::start(Api::all(client(&server)), watcher::Config::default());
    r.wait_for("initial list", &["p1", "p2", "p3"]).await;

    // Cut the watcher off, change things behind its back, and drop the history it would
    // resume from.
    server.set_outage(Outage::Disconnect);
    store.delete_object("v1", "Pod", Some("a"), "p1").unwrap();
    store
        .put_object(pod_json("a", "p2", json!({"changed": "yes"})))
        .unwrap();
    store.put_object(pod_json("a", "p4", json!({}))).unwrap();
    server.compact();
    server.set_outage(Outage::Off);

    r.wait_for("relisted state", &["p2", "p3", "p4"]).await;
    r.wait_labelled("p2 updated", "p2", "changed").await;
    let seen = r.seen();
    assert!(
        seen.iter()
            .any(|s| matches!(s, Seen::Error(e) if e.contains("410") || e.contains("Expired"))),
        "{seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|s| **s == Seen::InitDone).count(),
        2,
        "{seen:?}"
    );
    assert_eq!(server.count_requests("list", "pods"), 2);
    let expired_watch = server
        .request_log()
        .into_iter()
        .filter(|r| r.verb == "watch")
        .count();
    assert!(expired_watch >= 2);
}

#[tokio::test]
async fn close_watches_resumes_from_history_without_relisting() {
    let server = server().await;
    let store = server.store();
    store.put_object(pod_json("a", "p1", json!({}))).unwrap();
    let r = Reflector::start(Api::all(client(&server)), watcher::Config::default());
    r.wait_for("initial list", &["p1"]).await;
    eventually("watch open", WAIT, || async { server.open_watches() == 1 }).await;
    server.close_watches();
    // p2 may still go out on the closing stream (the cut and the event race, as with a real
    // API server); either way the watcher opens a second watch and never lists again.
    store.put_object(pod_json("a", "p2", json!({}))).unwrap();
    r.wait_for("resumed watch", &["p1", "p2"]).await;
    eventually("second watch", WAIT, || async {
        server.count_requests("watch", "pods") == 2
    })
    .await;
    assert_eq!(server.count_requests("list", "pods"), 1);
    assert!(!r.seen().iter().any(|s| matches!(s, Seen::Error(_))));

    // A change made while the watcher cannot connect at all reaches it from the history.
    server.set_outage(Outage::Disconnect);
    eventually("watch cut", WAIT, || async { server.open_watches() == 0 }).await;
    store.put_object(pod_json("a", "p3", json!({}))).unwrap();
    server.set_outage(Outage::Off);
    r.wait_for("change from history", &["p1", "p2", "p3"]).await;
    assert_eq!(server.count_requests("list", "pods"), 1);
}

#[tokio::test]
async fn outages_fail_calls_and_watchers_recover() {
    let server = server().await;
    let store = server.store();
    store.put_object(pod_json("a", "p1", json!({}))).unwrap();
    let client = client(&server);
    let api: Api<Pod> = Api::namespaced(client.clone(), "a");
    let r = Reflector::start(Api::all(client.clone()), watcher::Config::default());
    r.wait_for("initial list", &["p1"]).await;

    // Disconnect: calls fail at once with a transport error, the watch is cut.
    server.set_outage(Outage::Disconnect);
    assert!(server.is_unavailable());
    let err = api.get("p1").await.unwrap_err();
    assert!(!matches!(err, kube::Error::Api(_)), "{err:?}");
    eventually("watch cut", WAIT, || async { server.open_watches() == 0 }).await;
    store.put_object(pod_json("a", "p2", json!({}))).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        r.names(),
        ["p1"],
        "nothing reaches the watcher during the outage"
    );
    server.set_outage(Outage::Off);
    r.wait_for("watcher back after outage", &["p1", "p2"]).await;

    // 503: a client without kube's default retry sees the Status at once...
    server.set_unavailable(true);
    let mut config = kube::Config::new(server.url().parse().unwrap());
    config.default_retry = false;
    let no_retry: Api<Pod> = Api::namespaced(kube::Client::try_from(config).unwrap(), "a");
    assert_eq!(
        api_code(no_retry.get("p1").await),
        (503, "ServiceUnavailable".to_owned())
    );
    eventually("watch cut by 503", WAIT, || async {
        server.open_watches() == 0
    })
    .await;
    store.put_object(pod_json("a", "p3", json!({}))).unwrap();
    // ...while the default client retries 503 and succeeds once the outage ends.
    let pending = {
        let api = api.clone();
        tokio::spawn(async move { api.get("p3").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.set_unavailable(false);
    assert!(!server.is_unavailable());
    assert_eq!(pending.await.unwrap().unwrap().name_any(), "p3");
    r.wait_for("watcher back after 503", &["p1", "p2", "p3"])
        .await;
    let unavailable = server
        .request_log()
        .iter()
        .filter(|r| r.code == 503)
        .count();
    assert!(unavailable >= 2, "{unavailable}");
}

#[tokio::test]
async fn streaming_list_watcher_gets_initial_events_then_changes() {
    let server = server().await;
    let store = server.store();
    store
        .put_object(pod_json("a", "p1", json!({"app": "web"})))
        .unwrap();
    store
        .put_object(pod_json("a", "p2", json!({"app": "db"})))
        .unwrap();
    let r = Reflector::start(
        Api::all(client(&server)),
        watcher::Config::default()
            .streaming_lists()
            .labels("app=web"),
    );
    r.wait_for("initial events", &["p1"]).await;
    store
        .put_object(pod_json("a", "p3", json!({"app": "web"})))
        .unwrap();
    r.wait_for("later events", &["p1", "p3"]).await;
    assert_eq!(
        r.seen(),
        [
            Seen::Init,
            Seen::InitApply("p1".into()),
            Seen::InitDone,
            Seen::Apply("p3".into())
        ]
    );
    assert_eq!(server.count_requests("list", "pods"), 0);
    let query = first_watch_query(&server);
    assert!(query.contains("sendInitialEvents=true"), "{query}");
}

#[tokio::test]
async fn small_history_expires_lagging_resume_points() {
    let server = server_with(Options {
        history_limit: 3,
        bookmark_interval: Duration::from_millis(200),
        ..Options::default()
    })
    .await;
    let store = server.store();
    let rv = store.resource_version().to_string();
    for i in 0..5 {
        store
            .put_object(pod_json("a", &format!("p{i}"), json!({})))
            .unwrap();
    }
    let api: Api<Pod> = Api::namespaced(client(&server), "a");
    let events = collect_events(&api, &WatchParams::default().timeout(1), &rv)
        .await
        .unwrap();
    assert_eq!(summary(&events), ["ERROR 410 Expired"]);
    let recent = (store.resource_version() - 3).to_string();
    let events = collect_events(&api, &WatchParams::default().timeout(1), &recent)
        .await
        .unwrap();
    assert_eq!(summary(&events), ["ADDED p2", "ADDED p3", "ADDED p4"]);
    // Lists are not affected by the history size.
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        5
    );
}

#[tokio::test]
async fn recorder_creates_then_patches_events() {
    let server = server().await;
    let client = client(&server);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod_json("default", "web", json!({}))).unwrap(),
        )
        .await
        .unwrap();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "palisade".into(),
            instance: Some("node-a".into()),
        },
    );
    let event = Event {
        type_: EventType::Normal,
        reason: "IPAllocated".into(),
        note: Some("198.51.100.200".into()),
        action: "Allocate".into(),
        secondary: None,
    };
    recorder
        .publish(&event, &pod.object_ref(&()))
        .await
        .unwrap();
    recorder
        .publish(&event, &pod.object_ref(&()))
        .await
        .unwrap();
    let events: Api<K8sEvent> = Api::namespaced(client, "default");
    let list = events.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].reason.as_deref(), Some("IPAllocated"));
    assert_eq!(list[0].series.as_ref().map(|s| s.count), Some(2));
    assert_eq!(server.count_requests("create", "events"), 1);
    assert_eq!(server.count_requests("patch", "events"), 1);
}

#[tokio::test]
async fn shutdown_ends_watches_and_frees_the_port() {
    let server = server().await;
    let addr = server.addr();
    let api: Api<Pod> = Api::namespaced(client(&server), "a");
    let watch =
        tokio::spawn(async move { collect_events(&api, &WatchParams::default(), "0").await });
    eventually("watch open", WAIT, || async { server.open_watches() == 1 }).await;
    tokio::time::timeout(Duration::from_secs(5), server.shutdown())
        .await
        .expect("shutdown in time");
    // The stream ends (cleanly or with a transport error), it does not hang.
    let _ = tokio::time::timeout(Duration::from_secs(5), watch)
        .await
        .expect("watch ended");
    let again = TestApiServer::start(addr).await.expect("port free again");
    assert_eq!(again.addr(), addr);
}
