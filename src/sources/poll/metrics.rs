//! Counters of poll sources, written in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::pipeline::metrics::label;

/// Where a poll failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// The registry could not be reached (or answered for none of the requests).
    Registry,
    Catalog,
    Tags,
    Manifest,
    /// Handing events to the workers.
    Submit,
    /// The state file.
    State,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Registry => "registry",
            Stage::Catalog => "catalog",
            Stage::Tags => "tags",
            Stage::Manifest => "manifest",
            Stage::Submit => "submit",
            Stage::State => "state",
        }
    }
}

#[derive(Debug, Default)]
pub struct PollMetrics {
    inner: Mutex<BTreeMap<String, Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    rounds_ok: u64,
    rounds_failed: u64,
    errors: BTreeMap<Stage, u64>,
    events: BTreeMap<&'static str, u64>,
    skipped_outputs: u64,
    backoff_secs: f64,
    repositories: u64,
    last_success: Option<f64>,
}

impl PollMetrics {
    fn with(&self, source: &str, f: impl FnOnce(&mut Inner)) {
        let mut m = self.inner.lock().unwrap();
        f(m.entry(source.to_string()).or_default())
    }

    /// A round went through; `repositories` were watched.
    pub fn round_ok(&self, source: &str, repositories: usize) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default();
        self.with(source, |m| {
            m.rounds_ok += 1;
            m.backoff_secs = 0.0;
            m.repositories = repositories as u64;
            m.last_success = Some(now);
        })
    }

    /// A round stopped because the registry failed; the next try is `wait` away.
    pub fn round_failed(&self, source: &str, wait: Duration) {
        self.with(source, |m| {
            m.rounds_failed += 1;
            m.backoff_secs = wait.as_secs_f64();
        })
    }

    pub fn error(&self, source: &str, stage: Stage) {
        self.with(source, |m| *m.errors.entry(stage).or_default() += 1)
    }

    /// An event was handed to the workers; `change` is `new` or `moved`.
    pub fn event(&self, source: &str, change: &'static str) {
        self.with(source, |m| *m.events.entry(change).or_default() += 1)
    }

    pub fn skipped_output(&self, source: &str) {
        self.with(source, |m| m.skipped_outputs += 1)
    }

    pub fn render(&self, out: &mut String) {
        let m = self.inner.lock().unwrap();
        if m.is_empty() {
            return;
        }
        let mut family = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in lines {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        };
        let src = |s: &str| format!("source=\"{}\"", label(s));
        family(
            "accel_poll_rounds_total",
            "counter",
            "Looks at the registry, by outcome.",
            m.iter()
                .flat_map(|(s, i)| {
                    [
                        (format!("{},outcome=\"ok\"", src(s)), i.rounds_ok.to_string()),
                        (format!("{},outcome=\"registry_error\"", src(s)), i.rounds_failed.to_string()),
                    ]
                })
                .collect(),
        );
        family(
            "accel_poll_errors_total",
            "counter",
            "Failed registry requests and hand-overs while polling, by stage.",
            m.iter()
                .flat_map(|(s, i)| i.errors.iter().map(move |(st, n)| (format!("{},stage=\"{}\"", src(s), st.as_str()), n.to_string())))
                .collect(),
        );
        family(
            "accel_poll_events_total",
            "counter",
            "Tags handed over for conversion, by change (new tag, or tag moved to another digest).",
            m.iter()
                .flat_map(|(s, i)| i.events.iter().map(move |(c, n)| (format!("{},change=\"{c}\"", src(s)), n.to_string())))
                .collect(),
        );
        family(
            "accel_poll_skipped_outputs_total",
            "counter",
            "Changed tags not handed over because their manifest is a conversion output.",
            m.iter().map(|(s, i)| (src(s), i.skipped_outputs.to_string())).collect(),
        );
        family(
            "accel_poll_backoff_seconds",
            "gauge",
            "Current wait after registry errors; 0 while the registry answers.",
            m.iter().map(|(s, i)| (src(s), i.backoff_secs.to_string())).collect(),
        );
        family(
            "accel_poll_repositories",
            "gauge",
            "Repositories watched in the last successful round.",
            m.iter().map(|(s, i)| (src(s), i.repositories.to_string())).collect(),
        );
        family(
            "accel_poll_last_success_timestamp_seconds",
            "gauge",
            "When a round last went through (Unix time).",
            m.iter().filter_map(|(s, i)| i.last_success.map(|t| (src(s), t.to_string()))).collect(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_per_source() {
        let m = PollMetrics::default();
        let mut empty = String::new();
        m.render(&mut empty);
        assert!(empty.is_empty());
        m.round_ok("p", 3);
        m.event("p", "new");
        m.event("p", "new");
        m.error("q", Stage::Registry);
        m.round_failed("q", Duration::from_secs(4));
        let mut out = String::new();
        m.render(&mut out);
        for line in [
            "accel_poll_rounds_total{source=\"p\",outcome=\"ok\"} 1",
            "accel_poll_rounds_total{source=\"q\",outcome=\"registry_error\"} 1",
            "accel_poll_errors_total{source=\"q\",stage=\"registry\"} 1",
            "accel_poll_events_total{source=\"p\",change=\"new\"} 2",
            "accel_poll_backoff_seconds{source=\"q\"} 4",
            "accel_poll_repositories{source=\"p\"} 3",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing:\n{out}");
        }
    }
}
