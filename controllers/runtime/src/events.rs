//! Kubernetes Events (`events.k8s.io/v1`), published directly.
//!
//! Repeats of the same Event — same object, type, reason, action *and note* — within ten
//! minutes are folded into one Event whose `series.count` grows, like kubectl expects. The
//! note is part of the identity on purpose: "assigned 198.51.100.200" and later "assigned
//! 198.51.100.202" are two different Events, never a stale note with a count of 2 (which is
//! what kube-runtime's `Recorder` 5.0 does, as it groups without the note).
//!
//! Publishing never fails the caller: an API error is logged and counted, because an Event is
//! a report, not part of the state.
use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use tokio::sync::Mutex;

use crate::metrics::Metrics;

/// The reporting controller name on every Event.
pub const CONTROLLER: &str = "palisade.dev/agent";

/// How long a published Event can still be continued as a series.
const SERIES_WINDOW: jiff::SignedDuration = jiff::SignedDuration::from_mins(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
    type_: EventType,
    reason: String,
    action: String,
    note: String,
}

struct Published {
    namespace: String,
    name: String,
    count: i32,
    last: jiff::Timestamp,
}

#[derive(Clone)]
pub struct EventSink {
    client: Option<Client>,
    instance: String,
    cache: Arc<Mutex<HashMap<Key, Published>>>,
    metrics: Arc<Metrics>,
}

impl EventSink {
    pub fn new(client: Client, instance: String, metrics: Arc<Metrics>) -> Self {
        EventSink {
            client: Some(client),
            instance,
            cache: Arc::default(),
            metrics,
        }
    }

    /// A sink that only logs (offline commands, tests).
    pub fn log_only(metrics: Arc<Metrics>) -> Self {
        EventSink {
            client: None,
            instance: String::new(),
            cache: Arc::default(),
            metrics,
        }
    }

    pub async fn normal(&self, obj: &ObjectReference, reason: &str, action: &str, note: String) {
        self.publish(obj, EventType::Normal, reason, action, note)
            .await
    }

    pub async fn warning(&self, obj: &ObjectReference, reason: &str, action: &str, note: String) {
        self.publish(obj, EventType::Warning, reason, action, note)
            .await
    }

    async fn publish(
        &self,
        obj: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let who = format!(
            "{}/{}{}",
            obj.kind.as_deref().unwrap_or("?"),
            obj.namespace
                .as_deref()
                .map(|n| format!("{n}/"))
                .unwrap_or_default(),
            obj.name.as_deref().unwrap_or("?")
        );
        match type_ {
            EventType::Normal => tracing::info!(object = %who, reason, "{note}"),
            EventType::Warning => tracing::warn!(object = %who, reason, "{note}"),
        }
        let Some(client) = &self.client else {
            return;
        };
        let note = truncate(note, 1000);
        let key = Key {
            kind: obj.kind.clone(),
            namespace: obj.namespace.clone(),
            name: obj.name.clone(),
            uid: obj.uid.clone(),
            type_,
            reason: reason.to_string(),
            action: action.to_string(),
            note: note.clone(),
        };
        let now = jiff::Timestamp::now();
        let mut cache = self.cache.lock().await;
        cache.retain(|_, p| now.duration_since(p.last) < SERIES_WINDOW);
        let result = match cache.get_mut(&key) {
            Some(p) => {
                let count = p.count + 1;
                let patch = serde_json::json!({
                    "series": EventSeries { count, last_observed_time: MicroTime(now) }
                });
                let api: Api<Event> = Api::namespaced(client.clone(), &p.namespace);
                let r = api
                    .patch(&p.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
                if r.is_ok() {
                    p.count = count;
                    p.last = now;
                } else {
                    // Gone (expired or deleted): start a new Event next time.
                    cache.remove(&key);
                }
                r.map(|_| ())
            }
            None => {
                // Cluster-scoped objects get their Events in "default", like kubectl looks.
                let namespace = obj.namespace.clone().unwrap_or_else(|| "default".into());
                let name = format!(
                    "{}.{:x}",
                    obj.name.as_deref().unwrap_or("palisade"),
                    now.as_nanosecond()
                );
                let ev = Event {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(namespace.clone()),
                        ..Default::default()
                    },
                    event_time: Some(MicroTime(now)),
                    type_: Some(
                        match type_ {
                            EventType::Normal => "Normal",
                            EventType::Warning => "Warning",
                        }
                        .into(),
                    ),
                    reason: Some(reason.to_string()),
                    action: Some(action.to_string()),
                    note: Some(note),
                    regarding: Some(obj.clone()),
                    reporting_controller: Some(CONTROLLER.into()),
                    reporting_instance: Some(self.instance.clone()),
                    ..Default::default()
                };
                let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
                let r = api.create(&PostParams::default(), &ev).await;
                if r.is_ok() {
                    cache.insert(
                        key,
                        Published {
                            namespace,
                            name,
                            count: 1,
                            last: now,
                        },
                    );
                }
                r.map(|_| ())
            }
        };
        drop(cache);
        let label = match result {
            Ok(()) => "ok",
            Err(e) => {
                tracing::debug!(error = %e, reason, "cannot publish event");
                "error"
            }
        };
        self.metrics
            .events_published
            .get_or_create(&vec![
                ("reason", reason.to_string()),
                ("result", label.into()),
            ])
            .inc();
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary (the API caps notes at 1 kB).
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("abc".into(), 10), "abc");
        assert_eq!(truncate("ééé".into(), 3), "é");
        assert_eq!(truncate("x".repeat(2000), 1000).len(), 1000);
    }
}
