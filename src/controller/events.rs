//! Kubernetes Events about ImageBuilds (`events.k8s.io/v1`), written as
//! they happen and kept nowhere in the controller.
//!
//! kube-runtime's `Recorder` keeps every Event it published for six
//! minutes (to count repeats into a series) and scans that cache on each
//! publish. Tripod writes Events for outcomes only (a build finished, an
//! attempt is retried, a spec refused): at most a few per build, so there
//! is nothing to fold into a series, and the cache would be a few KiB per
//! build for nothing.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// Longest note written, in bytes (the API server refuses more than 1 KiB).
const MAX_NOTE_BYTES: usize = 1024;
/// Longest part of an Event's name taken from its object's name (the name
/// is at most 253 characters, with `.` and the time in hex after it).
const MAX_NAME_PREFIX: usize = 200;

/// Whether an Event reports something normal or something to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// A normal outcome.
    Normal,
    /// A failure or a retry.
    Warning,
}

/// Writes Events as one controller instance.
#[derive(Clone)]
pub struct EventWriter {
    client: Client,
    /// `reportingController`.
    controller: String,
    /// `reportingInstance`.
    instance: String,
}

impl EventWriter {
    /// A writer reporting as `controller` (its instance `instance`).
    pub fn new(client: Client, controller: &str, instance: &str) -> Self {
        Self {
            client,
            controller: controller.to_string(),
            instance: instance.to_string(),
        }
    }

    /// Writes one Event about `regarding`, in its namespace.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let event = self.event(regarding, type_, reason, note, Timestamp::now());
        let ns = regarding.namespace.as_deref().unwrap_or("default");
        Api::<Event>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &event)
            .await
            .map(|_| ())
    }

    fn event(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: &str,
        now: Timestamp,
    ) -> Event {
        let object = regarding.name.as_deref().unwrap_or(&self.controller);
        let object = cut(object, MAX_NAME_PREFIX).trim_end_matches(['.', '-']);
        Event {
            metadata: ObjectMeta {
                // Unique per object and time, as kubectl and client-go name them.
                name: Some(format!("{object}.{:x}", now.as_nanosecond())),
                namespace: regarding.namespace.clone(),
                ..Default::default()
            },
            action: Some("Reconcile".into()),
            reason: Some(reason.to_string()),
            note: Some(cut(note, MAX_NOTE_BYTES).to_string()),
            type_: Some(
                match type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        }
    }
}

/// The longest start of `text` of at most `max` bytes that ends on a
/// character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_names_its_object_and_cuts_long_notes() {
        // Needs no server: the client is only built, never used.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let w = EventWriter::new(Client::try_from(config).unwrap(), "tripod", "pod-a");
        let regarding = ObjectReference {
            kind: Some("ImageBuild".into()),
            name: Some("hello".into()),
            namespace: Some("team".into()),
            ..Default::default()
        };
        let now: Timestamp = "2026-12-01T10:00:00Z".parse().unwrap();
        let event = |regarding: &ObjectReference, note: &str| {
            w.event(regarding, EventType::Warning, "Retrying", note, now)
        };
        let e = event(&regarding, &"x".repeat(5000));
        assert_eq!(
            e.metadata.name.as_deref(),
            Some(format!("hello.{:x}", now.as_nanosecond()).as_str())
        );
        assert_eq!(e.metadata.namespace.as_deref(), Some("team"));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reporting_instance.as_deref(), Some("pod-a"));
        assert_eq!(e.regarding.as_ref(), Some(&regarding));
        assert_eq!(e.note.map(|n| n.len()), Some(MAX_NOTE_BYTES));
        // Bytes, not characters, on a character boundary.
        let note = event(&regarding, &"é".repeat(800)).note.unwrap();
        assert!(note.len() <= MAX_NOTE_BYTES && note.chars().all(|c| c == 'é'));
        // A long object name still makes a valid Event name.
        let long = ObjectReference {
            name: Some("a".repeat(253)),
            ..regarding.clone()
        };
        assert!(event(&long, "ok").metadata.name.unwrap().len() <= 253);
    }
}
