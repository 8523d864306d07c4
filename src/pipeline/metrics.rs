//! Counters of tasks and conversions, written in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use super::tasks::TaskStatus;

/// Upper bounds (seconds) of the conversion duration buckets.
const CONVERSION_BUCKETS: &[f64] = &[1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

/// A cumulative histogram with fixed buckets.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    pub fn observe(&mut self, v: f64) {
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    /// Writes `name_bucket`, `name_sum` and `name_count` lines with `labels` (already
    /// formatted, without braces; may be empty).
    pub fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = |l: &str| if l.is_empty() { String::new() } else { format!("{{{l}}}") };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

/// Escapes a label value for the text format.
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Writes a 0/1 gauge with one series per `(label value, up)`, or nothing when there are none.
pub fn write_up_gauge(out: &mut String, metric: &str, help: &str, label_name: &str, series: impl IntoIterator<Item = (String, bool)>) {
    let mut series = series.into_iter().peekable();
    if series.peek().is_none() {
        return;
    }
    let _ = writeln!(out, "# HELP {metric} {help}");
    let _ = writeln!(out, "# TYPE {metric} gauge");
    for (value, up) in series {
        let _ = writeln!(out, "{metric}{{{label_name}=\"{}\"}} {}", label(&value), u8::from(up));
    }
}

/// How an attempt at a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AttemptOutcome {
    Ok,
    Retryable,
    Permanent,
}

impl AttemptOutcome {
    fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Ok => "ok",
            AttemptOutcome::Retryable => "retryable_error",
            AttemptOutcome::Permanent => "permanent_error",
        }
    }
}

/// Depth of one pipeline's queue at the time of a scrape.
pub struct QueueDepth {
    pub pipeline: String,
    pub depth: usize,
    pub capacity: usize,
}

#[derive(Default)]
pub struct TaskMetrics {
    inner: Mutex<Inner>,
    /// Counters of registry poll sources.
    poll: crate::sources::poll::PollMetrics,
}

#[derive(Default)]
struct Inner {
    /// Tasks in PROCESSING, by (pipeline, driver).
    processing: BTreeMap<(String, String), i64>,
    /// Finished tasks since start, by (pipeline, driver, status).
    finished: BTreeMap<(String, String, TaskStatus), u64>,
    created: BTreeMap<String, u64>,
    deduplicated: BTreeMap<String, u64>,
    skipped: BTreeMap<String, u64>,
    attempts: BTreeMap<(String, AttemptOutcome), u64>,
    durations: BTreeMap<(String, TaskStatus), Histogram>,
    source_bytes: BTreeMap<String, u64>,
    target_bytes: BTreeMap<(String, String), u64>,
    /// Bus messages by (source, outcome).
    messages: BTreeMap<(String, &'static str), u64>,
    /// Result deliveries by (sink, outcome).
    deliveries: BTreeMap<(String, &'static str), u64>,
    /// Results waiting to be delivered, by sink.
    undelivered: BTreeMap<String, u64>,
}

impl TaskMetrics {
    /// A task entered PROCESSING (created, or resumed at start).
    pub fn task_started(&self, pipeline: &str, drivers: &[String], created: bool) {
        let mut m = self.inner.lock().unwrap();
        for d in drivers {
            *m.processing.entry((pipeline.into(), d.clone())).or_default() += 1;
        }
        if created {
            *m.created.entry(pipeline.into()).or_default() += 1;
        }
    }

    pub fn task_deduplicated(&self, pipeline: &str) {
        *self.inner.lock().unwrap().deduplicated.entry(pipeline.into()).or_default() += 1;
    }

    /// An event (or one of its images) created no task; `why` is a short fixed word.
    pub fn event_skipped(&self, why: &str) {
        *self.inner.lock().unwrap().skipped.entry(why.into()).or_default() += 1;
    }

    pub fn attempt(&self, pipeline: &str, outcome: AttemptOutcome) {
        *self.inner.lock().unwrap().attempts.entry((pipeline.into(), outcome)).or_default() += 1;
    }

    /// A task finished. `target_bytes` are per driver.
    pub fn task_finished(
        &self,
        pipeline: &str,
        drivers: &[String],
        status: TaskStatus,
        took: Duration,
        source_bytes: u64,
        target_bytes: &[(String, u64)],
    ) {
        let mut m = self.inner.lock().unwrap();
        for d in drivers {
            *m.processing.entry((pipeline.into(), d.clone())).or_default() -= 1;
            *m.finished.entry((pipeline.into(), d.clone(), status)).or_default() += 1;
        }
        m.durations
            .entry((pipeline.into(), status))
            .or_insert_with(|| Histogram::new(CONVERSION_BUCKETS))
            .observe(took.as_secs_f64());
        *m.source_bytes.entry(pipeline.into()).or_default() += source_bytes;
        for (d, n) in target_bytes {
            *m.target_bytes.entry((pipeline.into(), d.clone())).or_default() += n;
        }
    }

    /// A message from a bus source was dealt with; `outcome` is a fixed word (`accepted`,
    /// `ignored`, `malformed`, `dead_lettered`, `retried`, …).
    pub fn source_message(&self, source: &str, outcome: &'static str) {
        *self.inner.lock().unwrap().messages.entry((source.into(), outcome)).or_default() += 1;
    }

    /// Messages from `source` with `outcome`, as counted here.
    pub fn source_messages(&self, source: &str, outcome: &'static str) -> u64 {
        self.inner.lock().unwrap().messages.get(&(source.to_string(), outcome)).copied().unwrap_or(0)
    }

    /// A try at delivering a result to a sink; `outcome` is `ok`, `error` or `rejected`.
    pub fn sink_delivery(&self, sink: &str, outcome: &'static str) {
        *self.inner.lock().unwrap().deliveries.entry((sink.into(), outcome)).or_default() += 1;
    }

    /// Results waiting for a sink right now.
    pub fn sink_undelivered(&self, sink: &str, n: u64) {
        self.inner.lock().unwrap().undelivered.insert(sink.into(), n);
    }

    /// Tasks of a pipeline and driver in PROCESSING, as counted here.
    pub fn processing(&self, pipeline: &str, driver: &str) -> i64 {
        self.inner.lock().unwrap().processing.get(&(pipeline.to_string(), driver.to_string())).copied().unwrap_or(0)
    }

    pub fn render(&self, out: &mut String, queues: &[QueueDepth]) {
        let m = self.inner.lock().unwrap();
        let _ = writeln!(out, "# HELP accel_tasks Tasks in PROCESSING (queued, running or waiting to retry).");
        let _ = writeln!(out, "# TYPE accel_tasks gauge");
        for ((p, d), n) in &m.processing {
            let _ = writeln!(out, "accel_tasks{{pipeline=\"{}\",driver=\"{}\",status=\"PROCESSING\"}} {n}", label(p), label(d));
        }
        let _ = writeln!(out, "# HELP accel_tasks_finished_total Tasks finished since start, by final status.");
        let _ = writeln!(out, "# TYPE accel_tasks_finished_total counter");
        for ((p, d, s), n) in &m.finished {
            let _ = writeln!(out, "accel_tasks_finished_total{{pipeline=\"{}\",driver=\"{}\",status=\"{s}\"}} {n}", label(p), label(d));
        }
        let counters: [(&str, &str, &BTreeMap<String, u64>, &str); 4] = [
            ("accel_tasks_created_total", "Tasks created from events since start.", &m.created, "pipeline"),
            ("accel_tasks_deduplicated_total", "Events that matched a task already in flight or done.", &m.deduplicated, "pipeline"),
            ("accel_events_skipped_total", "Events (per image) that created no task, by reason.", &m.skipped, "reason"),
            ("accel_source_bytes_total", "Bytes of source images converted.", &m.source_bytes, "pipeline"),
        ];
        for (name, help, map, key) in counters {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for (k, n) in map {
                let _ = writeln!(out, "{name}{{{key}=\"{}\"}} {n}", label(k));
            }
        }
        let _ = writeln!(out, "# HELP accel_target_bytes_total Bytes of converted images produced.");
        let _ = writeln!(out, "# TYPE accel_target_bytes_total counter");
        for ((p, d), n) in &m.target_bytes {
            let _ = writeln!(out, "accel_target_bytes_total{{pipeline=\"{}\",driver=\"{}\"}} {n}", label(p), label(d));
        }
        let _ = writeln!(out, "# HELP accel_conversion_attempts_total Attempts at tasks, by outcome.");
        let _ = writeln!(out, "# TYPE accel_conversion_attempts_total counter");
        for ((p, o), n) in &m.attempts {
            let _ = writeln!(out, "accel_conversion_attempts_total{{pipeline=\"{}\",outcome=\"{}\"}} {n}", label(p), o.as_str());
        }
        let _ = writeln!(out, "# HELP accel_conversion_duration_seconds Time from a task's first attempt to its end.");
        let _ = writeln!(out, "# TYPE accel_conversion_duration_seconds histogram");
        for ((p, s), h) in &m.durations {
            h.write(out, "accel_conversion_duration_seconds", &format!("pipeline=\"{}\",status=\"{s}\"", label(p)));
        }
        let _ = writeln!(out, "# HELP accel_source_messages_total Messages read from bus sources, by outcome.");
        let _ = writeln!(out, "# TYPE accel_source_messages_total counter");
        for ((src, o), n) in &m.messages {
            let _ = writeln!(out, "accel_source_messages_total{{source=\"{}\",outcome=\"{o}\"}} {n}", label(src));
        }
        let _ = writeln!(out, "# HELP accel_sink_deliveries_total Tries at delivering results to sinks, by outcome.");
        let _ = writeln!(out, "# TYPE accel_sink_deliveries_total counter");
        for ((sink, o), n) in &m.deliveries {
            let _ = writeln!(out, "accel_sink_deliveries_total{{sink=\"{}\",outcome=\"{o}\"}} {n}", label(sink));
        }
        let _ = writeln!(out, "# HELP accel_sink_undelivered Results waiting to be delivered to a sink.");
        let _ = writeln!(out, "# TYPE accel_sink_undelivered gauge");
        for (sink, n) in &m.undelivered {
            let _ = writeln!(out, "accel_sink_undelivered{{sink=\"{}\"}} {n}", label(sink));
        }
        let _ = writeln!(out, "# HELP accel_queue_depth Tasks waiting for a worker.");
        let _ = writeln!(out, "# TYPE accel_queue_depth gauge");
        for q in queues {
            let _ = writeln!(out, "accel_queue_depth{{pipeline=\"{}\"}} {}", label(&q.pipeline), q.depth);
        }
        let _ = writeln!(out, "# HELP accel_queue_capacity Tasks that may wait for a worker before events are refused.");
        let _ = writeln!(out, "# TYPE accel_queue_capacity gauge");
        for q in queues {
            let _ = writeln!(out, "accel_queue_capacity{{pipeline=\"{}\"}} {}", label(&q.pipeline), q.capacity);
        }
        drop(m);
        self.poll.render(out);
    }

    /// Counters of registry poll sources.
    pub fn poll(&self) -> &crate::sources::poll::PollMetrics {
        &self.poll
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let mut h = Histogram::new(&[1.0, 10.0]);
        h.observe(0.5);
        h.observe(5.0);
        h.observe(50.0);
        let mut out = String::new();
        h.write(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{a=\"b\"} 55.5\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 3\n"), "{out}");
    }

    #[test]
    fn task_lifecycle_counts() {
        let m = TaskMetrics::default();
        let d = vec!["estargz".to_string()];
        m.task_started("p", &d, true);
        m.task_started("p", &d, true);
        assert_eq!(m.processing("p", "estargz"), 2);
        m.task_finished("p", &d, TaskStatus::Completed, Duration::from_secs(3), 100, &[("estargz".into(), 80)]);
        assert_eq!(m.processing("p", "estargz"), 1);
        m.source_message("bus", "malformed");
        m.source_message("bus", "malformed");
        m.sink_delivery("hook", "ok");
        m.sink_undelivered("hook", 3);
        assert_eq!(m.source_messages("bus", "malformed"), 2);
        let mut out = String::new();
        m.render(&mut out, &[QueueDepth { pipeline: "p".into(), depth: 1, capacity: 8 }]);
        for line in [
            "accel_tasks{pipeline=\"p\",driver=\"estargz\",status=\"PROCESSING\"} 1",
            "accel_tasks_finished_total{pipeline=\"p\",driver=\"estargz\",status=\"COMPLETED\"} 1",
            "accel_tasks_created_total{pipeline=\"p\"} 2",
            "accel_source_bytes_total{pipeline=\"p\"} 100",
            "accel_target_bytes_total{pipeline=\"p\",driver=\"estargz\"} 80",
            "accel_conversion_duration_seconds_bucket{pipeline=\"p\",status=\"COMPLETED\",le=\"5\"} 1",
            "accel_queue_depth{pipeline=\"p\"} 1",
            "accel_source_messages_total{source=\"bus\",outcome=\"malformed\"} 2",
            "accel_sink_deliveries_total{sink=\"hook\",outcome=\"ok\"} 1",
            "accel_sink_undelivered{sink=\"hook\"} 3",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in:\n{out}");
        }
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
