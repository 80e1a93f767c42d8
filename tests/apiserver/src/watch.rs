//! Watch streams: newline-delimited JSON `{"type": ..., "object": ...}` events, sent with
//! chunked encoding, fed from the store's event history.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::{interval_at, sleep_until, Instant};

use crate::meta::set_resource_version;
use crate::resources::{ResourceDef, ResourceId};
use crate::selectors::Selector;
use crate::status::ApiError;
use crate::store::{EventType, HistoryEntry, Store, WatchStart};

/// Everything one watch needs besides the store.
#[derive(Debug)]
pub(crate) struct WatchSpec {
    pub(crate) id: ResourceId,
    pub(crate) def: ResourceDef,
    pub(crate) namespace: Option<String>,
    pub(crate) selector: Selector,
    pub(crate) bookmarks: bool,
    /// Send the `k8s.io/initial-events-end` bookmark after the initial events.
    pub(crate) initial_events_end: bool,
    pub(crate) timeout: Duration,
    pub(crate) bookmark_interval: Duration,
}

/// Counts open watch streams while alive.
struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    fn new(counter: Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn event_line(kind: &str, object: &Value) -> Vec<u8> {
    let mut line = format!("{{\"type\":\"{kind}\",\"object\":").into_bytes();
    // Serializing a `Value` cannot fail.
    line.extend(serde_json::to_vec(object).unwrap_or_default());
    line.extend(b"}\n");
    line
}

fn bookmark_line(def: &ResourceDef, rv: u64, initial_events_end: bool) -> Vec<u8> {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": metadata}),
    )
}

/// The event a watcher with `selector` sees for one history entry, like upstream's cacher:
/// an object that starts matching is ADDED, one that stops matching is DELETED (its previous
/// state, with the new resourceVersion).
fn translate(entry: &HistoryEntry, selector: &Selector) -> Option<Vec<u8>> {
    let now = selector.matches(&entry.object);
    match entry.event {
        EventType::Added => now.then(|| event_line("ADDED", &entry.object)),
        EventType::Deleted => now.then(|| event_line("DELETED", &entry.object)),
        EventType::Modified => {
            let before = entry.prev.as_deref().is_some_and(|p| selector.matches(p));
            match (before, now) {
                (true, true) => Some(event_line("MODIFIED", &entry.object)),
                (false, true) => Some(event_line("ADDED", &entry.object)),
                (true, false) => {
                    let mut last = entry.prev.as_deref().cloned().unwrap_or(Value::Null);
                    set_resource_version(&mut last, entry.rv);
                    Some(event_line("DELETED", &last))
                }
                (false, false) => None,
            }
        }
    }
}

/// A watch that only reports `err` (how the real server reports `410 Expired`: status 200 and
/// one ERROR event).
pub(crate) fn error_body(err: &ApiError) -> Body {
    Body::from(event_line("ERROR", &err.to_status()))
}

/// Starts the task feeding one watch stream and returns the response body.
///
/// The stream ends at `timeoutSeconds`, when `cut` changes (outage, close_watches, shutdown),
/// when the client goes away, or after an ERROR event (history expired under a slow reader).
pub(crate) fn watch_body(
    store: Store,
    mut cut: watch::Receiver<u64>,
    open: Arc<AtomicUsize>,
    spec: WatchSpec,
    start: WatchStart,
) -> Body {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
    // Subscribe before the first poll so that no write between start and subscribe is missed.
    let mut changes = store.subscribe();
    let guard = OpenGuard::new(open);
    tokio::spawn(async move {
        let _guard = guard;
        // Clamped so that no parameter can overflow an Instant.
        const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
        let deadline = Instant::now() + spec.timeout.min(YEAR);
        let interval = spec
            .bookmark_interval
            .clamp(Duration::from_millis(10), YEAR);
        let mut ticker = interval_at(Instant::now() + interval, interval);
        let mut position = start.position;
        for obj in &start.initial {
            if tx.send(event_line("ADDED", obj)).await.is_err() {
                return;
            }
        }
        if spec.initial_events_end
            && tx
                .send(bookmark_line(&spec.def, position, true))
                .await
                .is_err()
        {
            return;
        }
        loop {
            changes.borrow_and_update();
            match store.watch_poll(spec.id, spec.namespace.as_deref(), position) {
                Ok((entries, next)) => {
                    for entry in &entries {
                        if let Some(line) = translate(entry, &spec.selector) {
                            if tx.send(line).await.is_err() {
                                return;
                            }
                        }
                    }
                    position = next;
                }
                Err(err) => {
                    let _ = tx.send(event_line("ERROR", &err.to_status())).await;
                    return;
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = ticker.tick() => {
                    if spec.bookmarks
                        && tx.send(bookmark_line(&spec.def, position, false)).await.is_err()
                    {
                        return;
                    }
                }
                () = sleep_until(deadline) => return,
                _ = cut.changed() => return,
                () = tx.closed() => return,
            }
        }
    });
    let stream =
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(Ok::<_, Infallible>)));
    Body::from_stream(stream)
}
