//! JSON bodies of the API, shared by the server and the `accelctl task` client.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::pipeline::tasks::{Attempt, Task, TaskStatus};
use crate::pipeline::Skipped;

/// A task as `GET /api/v1/conversions` lists it: the acceleration service's fields first, then
/// what this service adds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub id: Uuid,
    pub created: DateTime<Utc>,
    pub finished: Option<DateTime<Utc>>,
    pub source: String,
    pub source_size: u64,
    pub target_size: u64,
    pub status: TaskStatus,
    pub reason: String,
    #[serde(default)]
    pub pipeline: String,
    #[serde(default)]
    pub source_digest: Option<String>,
    #[serde(default)]
    pub targets: Vec<TargetView>,
    #[serde(default)]
    pub attempts: Vec<Attempt>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetView {
    pub driver: String,
    pub reference: String,
    pub digest: String,
    /// Media type of the target's top manifest or index, as `accelctl convert --output json`.
    #[serde(default)]
    pub media_type: String,
    pub size: u64,
    /// Platforms converted, for a multi-platform target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
}

impl From<&Task> for TaskView {
    fn from(t: &Task) -> Self {
        TaskView {
            id: t.id,
            created: t.created,
            finished: t.finished,
            source: t.source.to_string(),
            source_size: t.source_size,
            target_size: t.target_size,
            status: t.status,
            reason: t.reason.clone(),
            pipeline: t.pipeline.clone(),
            source_digest: t.source_digest.as_ref().map(|d| d.to_string()),
            targets: t
                .targets
                .iter()
                .map(|x| TargetView {
                    driver: x.driver.to_string(),
                    reference: x.reference.to_string(),
                    digest: x.digest.to_string(),
                    media_type: x.media_type.clone(),
                    size: x.size,
                    platforms: x.platforms.iter().map(|p| p.to_string()).collect(),
                })
                .collect(),
            attempts: t.attempts.clone(),
        }
    }
}

/// Answer to `POST /api/v1/conversions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CreateResponse {
    /// One per image and matching pipeline.
    #[serde(default)]
    pub tasks: Vec<CreatedTask>,
    /// Images that created no task, and why.
    #[serde(default)]
    pub skipped: Vec<Skipped>,
    /// Set when the event type is not one that converts anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignored: Option<String>,
    /// Set when the webhook was forwarded into a bus instead of converted here: where to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarded: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreatedTask {
    #[serde(flatten)]
    pub task: TaskView,
    /// True when a task for the same work already existed and this is it.
    #[serde(default)]
    pub duplicate: bool,
}

/// Body of every error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable, machine-readable: `unauthorized`, `invalid_json`, `invalid_field`,
    /// `missing_field`, `payload_too_large`, `queue_full`, `shutting_down`,
    /// `conversion_failed`, `unhealthy`, `not_found`, `method_not_allowed`, `internal`.
    pub code: String,
    pub message: String,
    /// JSON path of the offending value, for `invalid_field` and `missing_field`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}
