//! Whether each sink takes results, for `/api/v1/health` and `/metrics`: `delivering` until a
//! result cannot be sent, then `failing` (with the error and the tries in a row) until one is
//! sent again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::pipeline::metrics::write_up_gauge;

/// One sink's state as the health answer shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SinkStatus {
    pub state: SinkState,
    /// Since when it is in this state.
    pub since: DateTime<Utc>,
    /// Failed tries in a row at the result it is sending.
    #[serde(skip_serializing_if = "is_zero")]
    pub failures: u32,
    /// Why the last try failed, while failing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkState {
    Delivering,
    Failing,
}

/// The states of all sinks. Cheap to clone; shared by the delivery loops and the API.
#[derive(Debug, Clone, Default)]
pub struct SinkStatuses(Arc<Mutex<BTreeMap<String, SinkStatus>>>);

impl SinkStatuses {
    /// A sink that has not failed yet.
    pub fn add(&self, name: &str) {
        self.0.lock().unwrap().entry(name.to_string()).or_insert_with(|| SinkStatus { state: SinkState::Delivering, since: Utc::now(), failures: 0, error: None });
    }

    /// A result was sent (or refused for good, which says the sink answers).
    pub fn delivered(&self, name: &str) {
        let mut all = self.0.lock().unwrap();
        if all.get(name).is_none_or(|s| s.state != SinkState::Delivering) {
            all.insert(name.to_string(), SinkStatus { state: SinkState::Delivering, since: Utc::now(), failures: 0, error: None });
        }
    }

    /// A try failed and will be made again.
    pub fn failed(&self, name: &str, failures: u32, error: String) {
        let mut all = self.0.lock().unwrap();
        let since = all.get(name).filter(|s| s.state == SinkState::Failing).map(|s| s.since).unwrap_or_else(Utc::now);
        all.insert(name.to_string(), SinkStatus { state: SinkState::Failing, since, failures, error: Some(error) });
    }

    pub fn snapshot(&self) -> BTreeMap<String, SinkStatus> {
        self.0.lock().unwrap().clone()
    }

    /// Names of the sinks that are failing.
    pub fn failing(&self) -> Vec<String> {
        self.0.lock().unwrap().iter().filter(|(_, s)| s.state == SinkState::Failing).map(|(n, _)| n.clone()).collect()
    }

    /// `accel_sink_up{sink}`: 1 while delivering, 0 while failing.
    pub fn render(&self, out: &mut String) {
        write_up_gauge(
            out,
            "accel_sink_up",
            "Whether a result sink takes results (1) or its last try failed and is being repeated (0).",
            "sink",
            self.snapshot().into_iter().map(|(name, s)| (name, s.state == SinkState::Delivering)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_sink_shows_until_a_result_goes_through() {
        let s = SinkStatuses::default();
        s.add("hook");
        assert!(s.failing().is_empty());
        s.failed("hook", 1, "503 Service Unavailable".into());
        let since = s.snapshot()["hook"].since;
        s.failed("hook", 2, "timed out".into());
        let h = &s.snapshot()["hook"];
        assert_eq!((h.state, h.since, h.failures, h.error.as_deref()), (SinkState::Failing, since, 2, Some("timed out")));
        assert_eq!(s.failing(), ["hook"]);
        let json = serde_json::to_value(h).unwrap();
        assert_eq!((json["state"].as_str(), json["failures"].as_u64()), (Some("failing"), Some(2)));
        let mut out = String::new();
        s.render(&mut out);
        assert!(out.contains("accel_sink_up{sink=\"hook\"} 0\n"), "{out}");
        s.delivered("hook");
        assert!(s.failing().is_empty());
        let json = serde_json::to_value(&s.snapshot()["hook"]).unwrap();
        assert_eq!(json, serde_json::json!({ "state": "delivering", "since": json["since"] }));
    }
}
