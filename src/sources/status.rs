//! What each running bus source is doing, for `/api/v1/health` and `/metrics`: reading, or
//! waiting to start again after an error (with the error and how many times in a row).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Serialize;

/// One source's state as the health answer shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceStatus {
    /// `reading`, or `restarting` after an error.
    pub state: SourceState,
    /// Since when it is in this state.
    pub since: DateTime<Utc>,
    /// Runs that ended in an error in a row (0 once a run has lasted).
    pub failures: u32,
    /// Why the last run ended, while the source is restarting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceState {
    Reading,
    Restarting,
}

/// The states of all running sources. Cheap to clone; shared by the supervisors and the API.
#[derive(Debug, Clone, Default)]
pub struct SourceStatuses(Arc<Mutex<BTreeMap<String, SourceStatus>>>);

impl SourceStatuses {
    pub fn reading(&self, name: &str, failures: u32) {
        self.set(name, SourceStatus { state: SourceState::Reading, since: Utc::now(), failures, error: None });
    }

    pub fn restarting(&self, name: &str, failures: u32, error: String) {
        self.set(name, SourceStatus { state: SourceState::Restarting, since: Utc::now(), failures, error: Some(error) });
    }

    pub fn remove(&self, name: &str) {
        self.0.lock().unwrap().remove(name);
    }

    fn set(&self, name: &str, status: SourceStatus) {
        self.0.lock().unwrap().insert(name.to_string(), status);
    }

    pub fn snapshot(&self) -> BTreeMap<String, SourceStatus> {
        self.0.lock().unwrap().clone()
    }

    /// Names of the sources that are not reading.
    pub fn failing(&self) -> Vec<String> {
        self.0.lock().unwrap().iter().filter(|(_, s)| s.state != SourceState::Reading).map(|(n, _)| n.clone()).collect()
    }

    /// `accel_source_up{source}`: 1 while reading, 0 while restarting.
    pub fn render(&self, out: &mut String) {
        let all = self.snapshot();
        if all.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP accel_source_up Whether a bus source is reading (1) or waiting to start again after an error (0).");
        let _ = writeln!(out, "# TYPE accel_source_up gauge");
        for (name, s) in all {
            let up = u8::from(s.state == SourceState::Reading);
            let _ = writeln!(out, "accel_source_up{{source=\"{}\"}} {up}", name.replace('\\', "\\\\").replace('"', "\\\""));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_show_in_snapshot_and_metrics() {
        let s = SourceStatuses::default();
        s.reading("a", 0);
        s.restarting("b", 2, "cannot read consumer c: timed out".into());
        assert_eq!(s.failing(), ["b"]);
        let snap = s.snapshot();
        assert_eq!(snap["a"].state, SourceState::Reading);
        assert_eq!(snap["b"].error.as_deref(), Some("cannot read consumer c: timed out"));
        let json = serde_json::to_value(&snap["b"]).unwrap();
        assert_eq!(json["state"], "restarting");
        assert_eq!(json["failures"], 2);
        let mut out = String::new();
        s.render(&mut out);
        assert!(out.contains("accel_source_up{source=\"a\"} 1\n"), "{out}");
        assert!(out.contains("accel_source_up{source=\"b\"} 0\n"), "{out}");
        s.reading("b", 0);
        assert!(s.failing().is_empty());
    }
}
