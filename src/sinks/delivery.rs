//! Delivery of results to sinks through an outbox in the task database.
//!
//! A finished task and one outbox entry per sink of its pipeline are written in one
//! transaction. One loop per sink sends the entries in order and removes each once the sink
//! has it; a sink that is down is retried with backoff, and entries left at a stop or crash
//! are sent after the next start. Delivery is at least once: a consumer drops repeats by the
//! event `id` (the task id).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{ResultEvent, Sink, SinkStatuses};
use crate::config::Config;
use crate::pipeline::metrics::TaskMetrics;
use crate::pipeline::tasks::{TaskStore, Undelivered};
use crate::pipeline::worker::ResultOutbox;
use crate::pipeline::Task;

/// Entries read from the outbox at a time.
const BATCH: usize = 256;
/// A loop with nothing to do looks at the outbox this often anyway.
const IDLE_CHECK: Duration = Duration::from_secs(30);
/// After a stop, loops may go on sending what is waiting this long.
const DRAIN: Duration = Duration::from_secs(5);

/// Waits between tries at a failing sink.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { first: Duration::from_secs(1), max: Duration::from_secs(60) }
    }
}

impl Backoff {
    /// Wait after `failures` failed tries in a row (1-based).
    pub fn after(&self, failures: u32) -> Duration {
        self.first.saturating_mul(1u32.checked_shl(failures.saturating_sub(1)).unwrap_or(u32::MAX)).min(self.max)
    }
}

/// Routes results of finished tasks to their pipelines' sinks. Cheap to clone.
#[derive(Clone)]
pub struct Delivery {
    inner: Arc<Inner>,
}

struct Inner {
    store: TaskStore,
    /// Pipeline name → names of its sinks (only sinks that exist).
    routes: HashMap<String, Vec<String>>,
    sinks: BTreeMap<String, Arc<dyn Sink>>,
    wake: HashMap<String, Arc<Notify>>,
    metrics: Arc<TaskMetrics>,
    backoff: Backoff,
    stop: CancellationToken,
    loops: Mutex<Vec<JoinHandle<()>>>,
    statuses: SinkStatuses,
}

impl Delivery {
    /// Starts one delivery loop per sink; results left undelivered by an earlier run go first.
    pub fn start(config: &Config, store: TaskStore, sinks: BTreeMap<String, Arc<dyn Sink>>, metrics: Arc<TaskMetrics>, backoff: Backoff) -> Delivery {
        let routes = config
            .pipelines
            .iter()
            .map(|p| (p.name.clone(), p.sinks.iter().filter(|s| sinks.contains_key(*s)).cloned().collect()))
            .collect();
        let wake = sinks.keys().map(|k| (k.clone(), Arc::new(Notify::new()))).collect();
        let statuses = SinkStatuses::default();
        for name in sinks.keys() {
            statuses.add(name);
        }
        let inner =
            Arc::new(Inner { store, routes, sinks, wake, metrics, backoff, stop: CancellationToken::new(), loops: Mutex::new(Vec::new()), statuses });
        let mut loops = Vec::new();
        for (name, sink) in &inner.sinks {
            let (i, name, sink) = (inner.clone(), name.clone(), sink.clone());
            loops.push(tokio::spawn(async move { i.run(name, sink).await }));
        }
        *inner.loops.lock().unwrap() = loops;
        let d = Delivery { inner };
        let check = d.clone();
        tokio::spawn(async move { check.warn_about_unknown_sinks().await });
        d
    }

    /// Whether each sink takes results, for health and metrics.
    pub fn statuses(&self) -> SinkStatuses {
        self.inner.statuses.clone()
    }

    async fn warn_about_unknown_sinks(&self) {
        match self.inner.store.undelivered_counts().await {
            Ok(counts) => {
                for (sink, n) in counts {
                    if !self.inner.sinks.contains_key(&sink) {
                        tracing::warn!("{n} result(s) wait for sink {sink:?}, which no pipeline names any more; they stay in the task database");
                    } else {
                        tracing::info!("{n} result(s) from before the start wait for sink {sink:?}");
                    }
                }
            }
            Err(e) => tracing::warn!("cannot count undelivered results: {e}"),
        }
    }

    /// Stops taking new work; loops send what is waiting for a few seconds more, then stop.
    /// Whatever is left is sent after the next start.
    pub async fn stop(&self) {
        self.inner.stop.cancel();
        let loops: Vec<JoinHandle<()>> = std::mem::take(&mut *self.inner.loops.lock().unwrap());
        let aborts: Vec<_> = loops.iter().map(|h| h.abort_handle()).collect();
        let mut all = futures::future::join_all(loops);
        if tokio::time::timeout(DRAIN, &mut all).await.is_err() {
            tracing::warn!("some results were not delivered before the stop; they are sent after the next start");
            for a in aborts {
                a.abort();
            }
            let _ = all.await;
        }
    }
}

impl ResultOutbox for Delivery {
    fn entries(&self, task: &Task) -> Vec<Undelivered> {
        let Some(sinks) = self.inner.routes.get(&task.pipeline).filter(|s| !s.is_empty()) else { return Vec::new() };
        let body = ResultEvent::from_task(task).to_json();
        sinks.iter().map(|s| Undelivered::new(s, body.clone())).collect()
    }

    fn stored(&self, entries: &[Undelivered]) {
        for e in entries {
            if let Some(w) = self.inner.wake.get(&e.sink) {
                w.notify_one();
            }
        }
    }
}

impl Inner {
    async fn run(self: Arc<Self>, name: String, sink: Arc<dyn Sink>) {
        let wake = self.wake[&name].clone();
        let mut store_failures = 0u32;
        loop {
            let batch = match self.store.undelivered(&name, None, BATCH).await {
                Ok(b) => b,
                Err(e) => {
                    store_failures += 1;
                    tracing::error!(sink = %name, "cannot read undelivered results: {e}");
                    if self.pause(self.backoff.after(store_failures)).await {
                        return;
                    }
                    continue;
                }
            };
            store_failures = 0;
            if let Ok(n) = self.store.undelivered_counts().await.map(|c| c.get(&name).copied().unwrap_or(0)) {
                self.metrics.sink_undelivered(&name, n);
            }
            if batch.is_empty() {
                if self.stop.is_cancelled() {
                    return;
                }
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(IDLE_CHECK) => {}
                    _ = self.stop.cancelled() => {}
                }
                continue;
            }
            let mut done = Vec::with_capacity(batch.len());
            for entry in batch {
                match serde_json::from_slice::<ResultEvent>(&entry.body) {
                    Ok(event) => {
                        if !self.deliver(&name, sink.as_ref(), &event).await {
                            // Stopped while the sink was failing: what is left waits for the
                            // next start.
                            let _ = self.store.delivered(done).await;
                            return;
                        }
                    }
                    Err(e) => tracing::error!(sink = %name, key = %entry.key, "dropping an unreadable result from the outbox: {e}"),
                }
                done.push(entry.key);
            }
            if let Err(e) = self.store.delivered(done).await {
                // They are sent again: at least once, never lost.
                tracing::warn!(sink = %name, "cannot record delivered results; they may be sent again: {e}");
            }
        }
    }

    /// Sends one result until the sink takes or refuses it. False when stopped first.
    async fn deliver(&self, name: &str, sink: &dyn Sink, event: &ResultEvent) -> bool {
        let mut failures = 0u32;
        loop {
            match sink.send(event).await {
                Ok(()) => {
                    self.statuses.delivered(name);
                    self.metrics.sink_delivery(name, "ok");
                    tracing::debug!(sink = %name, task = %event.id, "result delivered");
                    return true;
                }
                Err(e) if !e.is_retryable() => {
                    self.statuses.delivered(name);
                    self.metrics.sink_delivery(name, "rejected");
                    tracing::error!(sink = %name, task = %event.id, source = %event.subject, "result dropped: {e}");
                    return true;
                }
                Err(e) => {
                    failures += 1;
                    self.metrics.sink_delivery(name, "error");
                    let wait = self.backoff.after(failures);
                    self.statuses.failed(name, failures, e.to_string());
                    tracing::warn!(sink = %name, task = %event.id, "cannot deliver the result (try {failures}), again in {wait:?}: {e}");
                    if self.pause(wait).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Sleeps; true when stopped first.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = self.stop.cancelled() => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::TaskStatus;
    use crate::sinks::SinkError;
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Records what it receives; fails the first `fail` sends.
    struct Recorder {
        got: Mutex<Vec<String>>,
        fail: AtomicU32,
        reject: bool,
    }

    #[async_trait]
    impl Sink for Recorder {
        fn name(&self) -> &str {
            "rec"
        }
        async fn health(&self) -> Result<(), SinkError> {
            Ok(())
        }
        async fn send(&self, event: &ResultEvent) -> Result<(), SinkError> {
            if self.reject {
                return Err(SinkError::Rejected { sink: "rec".into(), why: "400".into() });
            }
            if self.fail.load(Ordering::SeqCst) > 0 {
                self.fail.fetch_sub(1, Ordering::SeqCst);
                return Err(SinkError::Unavailable { sink: "rec".into(), why: "down".into() });
            }
            self.got.lock().unwrap().push(event.subject.clone());
            Ok(())
        }
    }

    fn config() -> Config {
        let yaml = "sinks: { rec: { kind: stdout } }\npipelines: [{ name: p, sinks: [rec], convert: [{ driver: estargz }] }, { name: q, convert: [{ driver: estargz }] }]";
        Config::parse(yaml, "t", &|_| None).unwrap()
    }

    async fn finished(store: &TaskStore, d: &Delivery, source: &str, pipeline: &str) {
        let new = crate::pipeline::tasks::NewTask {
            pipeline: pipeline.into(),
            origin: "o".into(),
            source: source.parse().unwrap(),
            key: format!("{pipeline}|{source}"),
            reuse_completed: true,
        };
        let mut t = store.insert(vec![new]).await.unwrap()[0].task().clone();
        t.status = TaskStatus::Completed;
        t.finished = Some(chrono::Utc::now());
        let entries = d.entries(&t);
        store.put_with_results(&t, vec![], entries.clone()).await.unwrap();
        d.stored(&entries);
    }

    fn fast() -> Backoff {
        Backoff { first: Duration::from_millis(5), max: Duration::from_millis(20) }
    }

    async fn wait_for(rec: &Recorder, n: usize) {
        for _ in 0..400 {
            if rec.got.lock().unwrap().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("got {:?}", rec.got.lock().unwrap());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff { first: Duration::from_secs(1), max: Duration::from_secs(5) };
        assert_eq!((1..=5).map(|n| b.after(n).as_secs()).collect::<Vec<_>>(), [1, 2, 4, 5, 5]);
    }

    #[tokio::test]
    async fn results_reach_the_sink_in_order_after_failures() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(&dir.path().join("t.redb")).unwrap();
        let rec = Arc::new(Recorder { got: Mutex::new(vec![]), fail: AtomicU32::new(3), reject: false });
        let sinks = BTreeMap::from([("rec".to_string(), rec.clone() as Arc<dyn Sink>)]);
        let metrics = Arc::new(TaskMetrics::default());
        let d = Delivery::start(&config(), store.clone(), sinks, metrics.clone(), fast());
        finished(&store, &d, "h.io/a:1", "p").await;
        finished(&store, &d, "h.io/a:2", "p").await;
        // A pipeline without sinks records nothing.
        finished(&store, &d, "h.io/a:3", "q").await;
        wait_for(&rec, 2).await;
        assert_eq!(*rec.got.lock().unwrap(), ["h.io/a:1", "h.io/a:2"]);
        d.stop().await;
        assert!(store.undelivered("rec", None, 10).await.unwrap().is_empty());
        let mut out = String::new();
        metrics.render(&mut out, &[]);
        assert!(out.contains("accel_sink_deliveries_total{sink=\"rec\",outcome=\"error\"} 3"), "{out}");
        assert!(out.contains("accel_sink_deliveries_total{sink=\"rec\",outcome=\"ok\"} 2"), "{out}");
    }

    #[tokio::test]
    async fn undelivered_results_are_sent_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let store = TaskStore::open(&path).unwrap();
        let down = Arc::new(Recorder { got: Mutex::new(vec![]), fail: AtomicU32::new(u32::MAX), reject: false });
        let sinks = BTreeMap::from([("rec".to_string(), down.clone() as Arc<dyn Sink>)]);
        let d = Delivery::start(&config(), store.clone(), sinks, Arc::new(TaskMetrics::default()), fast());
        finished(&store, &d, "h.io/b:1", "p").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        d.stop().await;
        assert_eq!(store.undelivered("rec", None, 10).await.unwrap().len(), 1);
        drop(d);
        assert!(store.close(Duration::from_secs(5)).await);

        let store = TaskStore::open(&path).unwrap();
        let up = Arc::new(Recorder { got: Mutex::new(vec![]), fail: AtomicU32::new(0), reject: false });
        let sinks = BTreeMap::from([("rec".to_string(), up.clone() as Arc<dyn Sink>)]);
        let d = Delivery::start(&config(), store.clone(), sinks, Arc::new(TaskMetrics::default()), fast());
        wait_for(&up, 1).await;
        assert_eq!(*up.got.lock().unwrap(), ["h.io/b:1"]);
        d.stop().await;
    }

    #[tokio::test]
    async fn a_refused_result_is_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(&dir.path().join("t.redb")).unwrap();
        let rec = Arc::new(Recorder { got: Mutex::new(vec![]), fail: AtomicU32::new(0), reject: true });
        let sinks = BTreeMap::from([("rec".to_string(), rec.clone() as Arc<dyn Sink>)]);
        let metrics = Arc::new(TaskMetrics::default());
        let d = Delivery::start(&config(), store.clone(), sinks, metrics.clone(), fast());
        finished(&store, &d, "h.io/c:1", "p").await;
        for _ in 0..200 {
            if store.undelivered("rec", None, 10).await.unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(store.undelivered("rec", None, 10).await.unwrap().is_empty());
        d.stop().await;
        let mut out = String::new();
        metrics.render(&mut out, &[]);
        assert!(out.contains("accel_sink_deliveries_total{sink=\"rec\",outcome=\"rejected\"} 1"), "{out}");
    }
}
