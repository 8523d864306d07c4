//! The result of a finished task as a CloudEvents 1.0 event (JSON format), as every sink
//! publishes it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::drivers::DriverKind;
use crate::oci::{Digest, Platform, Reference};
use crate::pipeline::{Task, TaskStatus};

/// CloudEvents `type` of a task that completed (converted, reused or skipped with a reason).
pub const TYPE_COMPLETED: &str = "io.accel.conversion.completed";
/// CloudEvents `type` of a task that failed.
pub const TYPE_FAILED: &str = "io.accel.conversion.failed";
/// `Content-Type` of a result in the CloudEvents structured mode.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// One result, in the CloudEvents JSON format. `id` is the task id, so a consumer can drop a
/// result delivered twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultEvent {
    pub specversion: String,
    pub id: String,
    /// `/accel/pipelines/<pipeline>`.
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub time: DateTime<Utc>,
    pub datacontenttype: String,
    /// The source image as the event named it.
    pub subject: String,
    pub data: ResultData,
}

/// What the task did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultData {
    pub task_id: Uuid,
    pub pipeline: String,
    /// The event source that asked for it.
    pub origin: String,
    pub status: TaskStatus,
    pub source: SourceImage,
    pub targets: Vec<TargetImage>,
    /// Why it failed, or why nothing was converted; empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Attempts made, the last one included.
    pub attempts: u32,
    pub created: DateTime<Utc>,
    pub finished: Option<DateTime<Utc>>,
    pub durations: Durations,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceImage {
    pub reference: Reference,
    /// Manifest digest the reference resolved to, when it got that far.
    pub digest: Option<Digest>,
    /// Bytes pulled: manifests, configs and layers.
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetImage {
    pub driver: DriverKind,
    pub reference: Reference,
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<Platform>,
}

/// Seconds spent, from the task's timestamps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Durations {
    /// From the task's creation to its end.
    pub total_secs: f64,
    /// From creation to the start of the first attempt.
    pub queued_secs: f64,
    /// From the start of the first attempt to the end (retries and their waits included).
    pub converting_secs: f64,
}

fn secs(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6
}

impl ResultEvent {
    /// The result of a finished task.
    pub fn from_task(task: &Task) -> ResultEvent {
        let end = task.finished.unwrap_or_else(Utc::now);
        let first = task.attempts.first().map(|a| a.started).unwrap_or(end);
        let event_type = if task.status == TaskStatus::Failed { TYPE_FAILED } else { TYPE_COMPLETED };
        ResultEvent {
            specversion: "1.0".into(),
            id: task.id.to_string(),
            source: format!("/accel/pipelines/{}", task.pipeline),
            event_type: event_type.into(),
            time: end,
            datacontenttype: "application/json".into(),
            subject: task.source.to_string(),
            data: ResultData {
                task_id: task.id,
                pipeline: task.pipeline.clone(),
                origin: task.origin.clone(),
                status: task.status,
                source: SourceImage {
                    reference: task.source.clone(),
                    digest: task.source_digest.clone().or_else(|| task.source.digest().cloned()),
                    size: task.source_size,
                },
                targets: task
                    .targets
                    .iter()
                    .map(|t| TargetImage {
                        driver: t.driver,
                        reference: t.reference.clone(),
                        digest: t.digest.clone(),
                        media_type: t.media_type.clone(),
                        size: t.size,
                        platforms: t.platforms.clone(),
                    })
                    .collect(),
                reason: task.reason.clone(),
                attempts: task.attempts.len() as u32,
                created: task.created,
                finished: task.finished,
                durations: Durations {
                    total_secs: secs(task.created, end),
                    queued_secs: secs(task.created, first),
                    converting_secs: secs(first, end),
                },
            },
        }
    }

    /// The event as one line of JSON (no trailing newline).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a result event serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::tasks::{Attempt, TaskTarget};

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn task() -> Task {
        let created: DateTime<Utc> = "2026-01-02T03:04:05Z".parse().unwrap();
        let s = |n: i64| created + chrono::Duration::seconds(n);
        Task {
            id: Uuid::now_v7(),
            pipeline: "accelerate".into(),
            origin: "bus".into(),
            source: "h.io/library/nginx:1.25".parse().unwrap(),
            source_digest: Some(D.parse().unwrap()),
            key: "k".into(),
            status: TaskStatus::Completed,
            created,
            finished: Some(s(12)),
            attempts: vec![
                Attempt { started: s(2), finished: Some(s(4)), error: Some("503".into()), retryable: true },
                Attempt { started: s(6), finished: Some(s(12)), error: None, retryable: false },
            ],
            source_size: 1000,
            target_size: 900,
            targets: vec![TaskTarget {
                driver: DriverKind::Estargz,
                reference: "h.io/library/nginx:1.25-esgz".parse().unwrap(),
                digest: D.parse().unwrap(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                size: 900,
                platforms: vec![],
            }],
            reason: String::new(),
        }
    }

    #[test]
    fn a_completed_task_as_cloudevent() {
        let t = task();
        let v: serde_json::Value = serde_json::from_slice(&ResultEvent::from_task(&t).to_json()).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], t.id.to_string());
        assert_eq!(v["type"], TYPE_COMPLETED);
        assert_eq!(v["source"], "/accel/pipelines/accelerate");
        assert_eq!(v["subject"], "h.io/library/nginx:1.25");
        assert_eq!(v["time"], "2026-01-02T03:04:17Z");
        assert_eq!(v["datacontenttype"], "application/json");
        let d = &v["data"];
        assert_eq!(d["status"], "COMPLETED");
        assert_eq!(d["source"]["digest"], D);
        assert_eq!(d["source"]["size"], 1000);
        assert_eq!(d["targets"][0]["driver"], "estargz");
        assert_eq!(d["targets"][0]["reference"], "h.io/library/nginx:1.25-esgz");
        assert_eq!(d["targets"][0]["size"], 900);
        assert_eq!(d["attempts"], 2);
        assert_eq!(d["durations"]["total_secs"], 12.0);
        assert_eq!(d["durations"]["queued_secs"], 2.0);
        assert_eq!(d["durations"]["converting_secs"], 10.0);
        assert!(d.get("reason").is_none(), "{d}");
        let back: ResultEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, ResultEvent::from_task(&t));
    }

    #[test]
    fn a_failed_task_carries_its_reason() {
        let mut t = task();
        t.status = TaskStatus::Failed;
        t.targets.clear();
        t.reason = "h.io/library/nginx:1.25: manifest unknown".into();
        let e = ResultEvent::from_task(&t);
        assert_eq!(e.event_type, TYPE_FAILED);
        assert_eq!(e.data.reason, t.reason);
        assert!(e.data.targets.is_empty());
    }
}
