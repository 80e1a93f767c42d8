//! Kubernetes Events, published through kube-runtime's `Recorder` (events.k8s.io/v1, with
//! its de-duplication into series). Publishing never fails the caller: an API error is
//! logged and counted, because an Event is a report, not part of the state.
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;

use crate::metrics::Metrics;

/// The reporting controller name on every Event.
pub const CONTROLLER: &str = "palisade";

#[derive(Clone)]
pub struct EventSink {
    recorder: Option<Recorder>,
    metrics: Arc<Metrics>,
}

impl EventSink {
    pub fn new(client: Client, instance: String, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: CONTROLLER.into(),
            instance: Some(instance),
        };
        EventSink {
            recorder: Some(Recorder::new(client, reporter)),
            metrics,
        }
    }

    /// A sink that only logs (offline commands, tests).
    pub fn log_only(metrics: Arc<Metrics>) -> Self {
        EventSink {
            recorder: None,
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
        let Some(recorder) = &self.recorder else {
            return;
        };
        // The events API caps the note at 1 kB.
        let mut note = note;
        if note.len() > 1000 {
            let mut cut = 1000;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        let result = match recorder.publish(&ev, obj).await {
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
                ("result", result.into()),
            ])
            .inc();
    }
}
