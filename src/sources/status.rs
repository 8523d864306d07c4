//! What each running bus source is doing, for `/api/v1/health` and `/metrics`: reading,
//! running but unable to reach its bus (the source says so itself), or waiting to start again
//! after an error (with the error and how many times in a row).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::pipeline::metrics::write_up_gauge;

/// One source's state as the health answer shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceStatus {
    /// `reading`, `disconnected` (running, but its bus does not answer), or `restarting` after
    /// an error.
    pub state: SourceState,
    /// Since when it is in this state.
    pub since: DateTime<Utc>,
    /// Runs that ended in an error in a row (0 once a run has lasted).
    pub failures: u32,
    /// Why the last run ended, while the source is restarting; why the bus cannot be reached,
    /// while it is disconnected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceState {
    Reading,
    Disconnected,
    Restarting,
}

/// The states of all running sources. Cheap to clone; shared by the supervisors and the API.
#[derive(Debug, Clone, Default)]
pub struct SourceStatuses(Arc<Mutex<BTreeMap<String, SourceStatus>>>);

impl SourceStatuses {
    /// The source runs. A source that said it is disconnected stays so until it says otherwise.
    pub fn reading(&self, name: &str, failures: u32) {
        let mut all = self.0.lock().unwrap();
        match all.get_mut(name) {
            Some(s) if s.state == SourceState::Disconnected => s.failures = failures,
            _ => {
                all.insert(name.to_string(), SourceStatus { state: SourceState::Reading, since: Utc::now(), failures, error: None });
            }
        }
    }

    /// Said by a running source whose bus does not answer (its client keeps trying).
    pub fn disconnected(&self, name: &str, why: String) {
        let mut all = self.0.lock().unwrap();
        if let Some(s) = all.get_mut(name) {
            match s.state {
                SourceState::Reading => *s = SourceStatus { state: SourceState::Disconnected, since: Utc::now(), failures: s.failures, error: Some(why) },
                SourceState::Disconnected => s.error = Some(why),
                SourceState::Restarting => {}
            }
        }
    }

    /// Said by a running source that reached its bus again.
    pub fn connected(&self, name: &str) {
        let mut all = self.0.lock().unwrap();
        if let Some(s) = all.get_mut(name) {
            if s.state == SourceState::Disconnected {
                *s = SourceStatus { state: SourceState::Reading, since: Utc::now(), failures: s.failures, error: None };
            }
        }
    }

    /// Whether `name` said it is disconnected.
    pub fn is_disconnected(&self, name: &str) -> bool {
        self.0.lock().unwrap().get(name).is_some_and(|s| s.state == SourceState::Disconnected)
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

    /// `accel_source_up{source}`: 1 while reading, 0 while disconnected or restarting.
    pub fn render(&self, out: &mut String) {
        write_up_gauge(
            out,
            "accel_source_up",
            "Whether a bus source is reading (1), or cannot reach its bus or is waiting to start again after an error (0).",
            "source",
            self.snapshot().into_iter().map(|(name, s)| (name, s.state == SourceState::Reading)),
        );
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

    #[test]
    fn a_running_source_can_say_its_bus_is_unreachable_until_it_is_back() {
        let s = SourceStatuses::default();
        s.disconnected("a", "nobody".into());
        assert!(s.snapshot().is_empty(), "a source not started yet is not shown");
        s.reading("a", 1);
        s.disconnected("a", "all brokers down".into());
        assert_eq!(s.failing(), ["a"]);
        let since = s.snapshot()["a"].since;
        // Still disconnected: the reason is updated, the time kept; the supervisor's "the run
        // lasted" does not hide it.
        s.disconnected("a", "all brokers down (2)".into());
        s.reading("a", 0);
        let a = &s.snapshot()["a"];
        assert_eq!((a.state, a.since, a.failures, a.error.as_deref()), (SourceState::Disconnected, since, 0, Some("all brokers down (2)")));
        assert_eq!(serde_json::to_value(a).unwrap()["state"], "disconnected");
        let mut out = String::new();
        s.render(&mut out);
        assert!(out.contains("accel_source_up{source=\"a\"} 0\n"), "{out}");
        s.connected("a");
        assert!(s.failing().is_empty());
        assert!(!s.is_disconnected("a"));
        // A restart wins over a disconnection, and a later connection does not hide it.
        s.restarting("a", 1, "gone".into());
        s.disconnected("a", "x".into());
        s.connected("a");
        assert_eq!(s.snapshot()["a"].state, SourceState::Restarting);
    }
}
