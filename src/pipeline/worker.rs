//! Workers: a bounded queue and a fixed number of workers per pipeline, retries with backoff,
//! waiting for results, resuming unfinished tasks at start, and stopping within a grace period.
//!
//! Work goes in only once it is durable: `accept` reserves room in the queues, stores the tasks,
//! then queues them. A task in the database but not in a queue (the process stopped) is queued
//! again at the next start.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;
use chrono::Utc;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::convert::{ConvertError, ConvertRequest, ConvertResult, Converter};
use super::event::{Event, Router, Skipped};
use super::metrics::{AttemptOutcome, QueueDepth, TaskMetrics};
use super::plan::Plan;
use super::progress::LogProgress;
use super::tasks::{Attempt, Inserted, NewTask, Task, TaskStatus, TaskStore, TaskStoreError, TaskTarget, Undelivered};
use crate::config::Config;
use crate::oci::{annotations, Digest, Reference};
use crate::registry::RegistryClient;
use crate::store::Store;

/// What a source reference points at right now.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub digest: Digest,
    /// Set when the manifest says it is itself a conversion output: the digest it was
    /// converted from.
    pub converted_from: Option<String>,
}

/// The outside work a task needs: looking up the source and converting it. The daemon uses
/// [`ConverterRunner`]; tests put a stand-in here.
#[async_trait]
pub trait Runner: Send + Sync + 'static {
    async fn resolve(&self, source: &Reference) -> Result<Resolved, ConvertError>;
    /// Converts `source` (pinned by digest) as `plan` says, pushing the targets.
    async fn convert(&self, plan: &Plan, source: &Reference) -> Result<ConvertResult, ConvertError>;
}

/// Where results of finished tasks go: entries recorded with the finished task in one
/// transaction, then handed over for delivery. The daemon uses `sinks::Delivery`.
pub trait ResultOutbox: Send + Sync + 'static {
    /// The results to record for a finished task (none when its pipeline names no sink).
    fn entries(&self, task: &Task) -> Vec<Undelivered>;
    /// The entries are on disk: deliver them.
    fn stored(&self, entries: &[Undelivered]);
}

/// Runs conversions with the registry client and the content store.
pub struct ConverterRunner {
    registry: Arc<RegistryClient>,
    store: Arc<dyn Store>,
}

impl ConverterRunner {
    pub fn new(registry: Arc<RegistryClient>, store: Arc<dyn Store>) -> Self {
        ConverterRunner { registry, store }
    }
}

#[async_trait]
impl Runner for ConverterRunner {
    async fn resolve(&self, source: &Reference) -> Result<Resolved, ConvertError> {
        let m = self
            .registry
            .get_manifest(source)
            .await
            .map_err(|e| ConvertError::Registry { action: format!("fetch manifest of {source}"), source: e })?;
        // A body that is not JSON is left for the converter to report.
        let doc: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap_or_default();
        let converted_from = doc
            .get("annotations")
            .and_then(|a| a.get(annotations::SOURCE_DIGEST))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        Ok(Resolved { digest: m.digest, converted_from })
    }

    async fn convert(&self, plan: &Plan, source: &Reference) -> Result<ConvertResult, ConvertError> {
        // A fresh progress per task keeps its step counts its own.
        let converter = Converter::new(self.registry.clone(), self.store.clone(), Arc::new(LogProgress::default()));
        let request = ConvertRequest { source: source.clone(), conversions: plan.conversions.clone(), platforms: plan.platforms.clone() };
        converter.convert(&request).instrument(tracing::Span::current()).await
    }
}

/// Queue sizes, retries, shutdown and retention, from `tasks` and `server` of the config.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub queue_size: usize,
    pub max_attempts: u32,
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub grace: Duration,
    pub retention: Duration,
    /// How often finished tasks past their retention are deleted.
    pub purge_every: Duration,
}

impl WorkerOptions {
    pub fn from_config(c: &Config) -> Self {
        let retention = Duration::from_secs(c.tasks.retention_secs);
        WorkerOptions {
            queue_size: c.tasks.queue_size.max(1),
            max_attempts: c.tasks.max_attempts.max(1),
            backoff: Duration::from_secs(c.tasks.retry_backoff_secs),
            backoff_max: Duration::from_secs(c.tasks.retry_backoff_max_secs),
            grace: Duration::from_secs(c.server.shutdown_grace_secs),
            retention,
            purge_every: retention.clamp(Duration::from_secs(1), Duration::from_secs(600)),
        }
    }

    /// Wait after failed attempt number `attempt` (1-based): doubling from `backoff`, at most
    /// `backoff_max`.
    pub fn backoff_after(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
        self.backoff.saturating_mul(factor).min(self.backoff_max)
    }
}

/// Why events were not accepted. The webhook answers 503 for the first two, so the sender
/// tries again later; nothing was stored.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("acceld is shutting down; send the event again later")]
    ShuttingDown,
    #[error("the queue of pipeline {pipeline:?} is full ({capacity} tasks waiting); send the event again later")]
    QueueFull { pipeline: String, capacity: usize },
    #[error("{0}")]
    Store(#[from] TaskStoreError),
}

/// One task an accepted event stands for.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub task: Task,
    /// False when a task for the same work was already in flight or done.
    pub created: bool,
}

/// What became of a batch of events.
#[derive(Debug, Clone, Default)]
pub struct Accepted {
    pub tasks: Vec<Submitted>,
    pub skipped: Vec<Skipped>,
}

/// Handle to the workers of every pipeline. Cheap to clone.
#[derive(Clone)]
pub struct Workers {
    shared: Arc<Shared>,
}

struct Shared {
    store: TaskStore,
    runner: Arc<dyn Runner>,
    router: Router,
    plans: HashMap<String, Arc<Plan>>,
    queues: HashMap<String, mpsc::Sender<Uuid>>,
    options: WorkerOptions,
    metrics: Arc<TaskMetrics>,
    outbox: Option<Arc<dyn ResultOutbox>>,
    waiters: Mutex<HashMap<Uuid, Vec<oneshot::Sender<Task>>>>,
    /// Cancelled when new work must stop being taken.
    shutdown: CancellationToken,
    /// Cancelled once every worker has stopped.
    stopped: CancellationToken,
    loops: Mutex<Vec<(String, JoinHandle<()>)>>,
    /// Resume feeder and retention purger; they end on shutdown.
    background: Mutex<Vec<JoinHandle<()>>>,
}

impl Workers {
    /// Starts the workers and queues every unfinished task found in the store. Results of
    /// finished tasks go to `outbox`, when given.
    pub async fn start(
        store: TaskStore,
        runner: Arc<dyn Runner>,
        router: Router,
        options: WorkerOptions,
        metrics: Arc<TaskMetrics>,
        outbox: Option<Arc<dyn ResultOutbox>>,
        shutdown: CancellationToken,
    ) -> Result<Workers, TaskStoreError> {
        let mut queues = HashMap::new();
        let mut receivers = Vec::new();
        let plans: HashMap<String, Arc<Plan>> = router.plans().iter().map(|p| (p.name.clone(), p.clone())).collect();
        for plan in router.plans() {
            let (tx, rx) = mpsc::channel(options.queue_size);
            queues.insert(plan.name.clone(), tx);
            receivers.push((plan.clone(), Arc::new(tokio::sync::Mutex::new(rx))));
        }
        let unfinished = store.unfinished().await?;
        let shared = Arc::new(Shared {
            store,
            runner,
            router,
            plans,
            queues,
            options,
            metrics,
            outbox,
            waiters: Mutex::new(HashMap::new()),
            shutdown,
            stopped: CancellationToken::new(),
            loops: Mutex::new(Vec::new()),
            background: Mutex::new(Vec::new()),
        });
        {
            let mut loops = shared.loops.lock().unwrap();
            for (plan, rx) in receivers {
                for _ in 0..plan.concurrency {
                    let s = shared.clone();
                    let (plan, rx) = (plan.clone(), rx.clone());
                    loops.push((plan.name.clone(), tokio::spawn(async move { s.work(plan, rx).await })));
                }
            }
        }
        shared.clone().resume(unfinished).await;
        let s = shared.clone();
        let purge = tokio::spawn(async move { s.purge_loop().await });
        shared.background.lock().unwrap().push(purge);
        Ok(Workers { shared })
    }

    /// Routes events to pipelines and stores and queues their tasks, unless the same work is
    /// already in flight or done. All or nothing: on error no task was created.
    pub async fn accept(&self, events: &[Event]) -> Result<Accepted, SubmitError> {
        self.take(events, false).await
    }

    /// Like [`accept`](Self::accept), for events that arrive while acceld stops and that their
    /// bus will not deliver again (core NATS): their tasks are stored but not queued, and the
    /// next start runs them.
    pub async fn accept_for_later(&self, events: &[Event]) -> Result<Accepted, SubmitError> {
        self.take(events, true).await
    }

    async fn take(&self, events: &[Event], later: bool) -> Result<Accepted, SubmitError> {
        let mut accepted = Accepted::default();
        let mut routed = Vec::new();
        for e in events {
            match self.shared.router.route(e) {
                Ok(r) => routed.extend(r),
                Err(s) => {
                    tracing::info!(module = %"api", source = %s.source, "not converting: {}", s.reason);
                    self.shared.metrics.event_skipped(s.kind);
                    accepted.skipped.push(s);
                }
            }
        }
        if routed.is_empty() {
            return Ok(accepted);
        }
        let s = &self.shared;
        if s.shutdown.is_cancelled() && !later {
            return Err(SubmitError::ShuttingDown);
        }
        // Room in the queues first: a task stored but not queued would wait for a restart.
        let mut permits = Vec::with_capacity(routed.len());
        for r in &routed {
            if later {
                permits.push(None);
                continue;
            }
            let queue = &s.queues[&r.plan.name];
            match queue.clone().try_reserve_owned() {
                Ok(p) => permits.push(Some(p)),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return Err(SubmitError::QueueFull { pipeline: r.plan.name.clone(), capacity: queue.max_capacity() })
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(SubmitError::ShuttingDown),
            }
        }
        let new = routed
            .iter()
            .map(|r| NewTask {
                pipeline: r.plan.name.clone(),
                origin: r.event.origin.clone(),
                source: r.event.reference.clone(),
                key: r.plan.key(&r.event.reference),
                reuse_completed: r.event.reference.digest().is_some(),
            })
            .collect();
        // Storing and queueing run to the end even if the caller goes away (a webhook client
        // that hangs up), so a stored task is never left out of its queue.
        let shared = s.clone();
        let submitted = tokio::spawn(async move {
            let inserted = shared.store.insert(new).await?;
            let mut out = Vec::with_capacity(inserted.len());
            for ((ins, permit), r) in inserted.into_iter().zip(permits).zip(&routed) {
                match ins {
                    Inserted::Created(task) => {
                        // Debug: per request the acceleration service logs only that it
                        // received it and how it was answered; the task's own lines follow.
                        tracing::debug!(module = %"api", task = %task.id, pipeline = %task.pipeline, "created task for {}", task.source);
                        shared.metrics.task_started(&task.pipeline, &driver_names(&r.plan), true);
                        match permit {
                            Some(permit) => {
                                permit.send(task.id);
                            }
                            None => tracing::info!(module = %"api", task = %task.id, "acceld is stopping: {} is stored and converted at the next start", task.source),
                        }
                        out.push(Submitted { task, created: true });
                    }
                    Inserted::Existing(task) => {
                        tracing::info!(module = %"api", task = %task.id, pipeline = %task.pipeline, status = %task.status, "{} is already converted or in flight", task.source);
                        shared.metrics.task_deduplicated(&task.pipeline);
                        out.push(Submitted { task, created: false });
                    }
                }
            }
            Ok::<_, TaskStoreError>(out)
        });
        accepted.tasks = submitted.await.map_err(|e| TaskStoreError::Db(format!("storing tasks stopped: {e}")))??;
        Ok(accepted)
    }

    /// Waits for a task to finish. `None` when the workers stopped first (the task stays
    /// queued for the next start) or the task does not exist.
    pub async fn wait(&self, id: Uuid) -> Option<Task> {
        let s = &self.shared;
        let (tx, rx) = oneshot::channel();
        s.waiters.lock().unwrap().entry(id).or_default().push(tx);
        let result = {
            // Owned here so it is gone before the clean-up below looks for closed senders.
            let rx = rx;
            match s.store.get(id).await {
                Ok(Some(t)) if t.status.is_finished() => Some(t),
                Ok(None) => None,
                _ => tokio::select! {
                    t = rx => t.ok(),
                    _ = s.stopped.cancelled() => None,
                },
            }
        };
        let mut waiters = s.waiters.lock().unwrap();
        if let Some(list) = waiters.get_mut(&id) {
            list.retain(|w| !w.is_closed());
            if list.is_empty() {
                waiters.remove(&id);
            }
        }
        result
    }

    pub fn store(&self) -> &TaskStore {
        &self.shared.store
    }

    pub fn metrics(&self) -> &Arc<TaskMetrics> {
        &self.shared.metrics
    }

    pub fn queue_depths(&self) -> Vec<QueueDepth> {
        let mut out: Vec<QueueDepth> = self
            .shared
            .queues
            .iter()
            .map(|(name, q)| QueueDepth { pipeline: name.clone(), depth: q.max_capacity() - q.capacity(), capacity: q.max_capacity() })
            .collect();
        out.sort_by(|a, b| a.pipeline.cmp(&b.pipeline));
        out
    }

    /// Whether the workers can take work; the error says why not.
    pub async fn health(&self) -> Result<(), String> {
        let s = &self.shared;
        if s.shutdown.is_cancelled() {
            return Err("shutting down".into());
        }
        if let Some((name, _)) = s.loops.lock().unwrap().iter().find(|(_, h)| h.is_finished()) {
            return Err(format!("a worker of pipeline {name:?} stopped"));
        }
        s.store.count().await.map(|_| ()).map_err(|e| format!("cannot read tasks: {e}"))
    }

    /// After the shutdown token is cancelled: waits for running tasks up to the grace period,
    /// then abandons them (they stay PROCESSING and resume at the next start).
    pub async fn stop(&self) {
        let s = &self.shared;
        s.shutdown.cancel();
        let mut loops: Vec<(String, JoinHandle<()>)> = std::mem::take(&mut *s.loops.lock().unwrap());
        let all = futures::future::join_all(loops.iter_mut().map(|(_, h)| h));
        if tokio::time::timeout(s.options.grace, all).await.is_err() {
            tracing::warn!(
                "running conversions did not finish within the {:?} grace period; they resume at the next start",
                s.options.grace
            );
            for (_, h) in &loops {
                h.abort();
            }
            for (_, h) in loops {
                let _ = h.await;
            }
        }
        let background: Vec<JoinHandle<()>> = std::mem::take(&mut *s.background.lock().unwrap());
        for h in background {
            let _ = h.await;
        }
        s.stopped.cancel();
    }

    /// Cancelled once `stop` has finished.
    pub fn stopped(&self) -> CancellationToken {
        self.shared.stopped.clone()
    }
}

fn driver_names(plan: &Plan) -> Vec<String> {
    plan.drivers().iter().map(|d| d.to_string()).collect()
}

/// How a task ended without an error.
enum Finish {
    Converted(ConvertResult),
    /// Nothing to do; the reason says why.
    Skipped(String),
    /// The same content was already converted by this task.
    Reused(Task),
}

impl Shared {
    async fn resume(self: Arc<Self>, unfinished: Vec<Task>) {
        let mut queued = Vec::new();
        for mut task in unfinished {
            match self.plans.get(&task.pipeline) {
                Some(plan) => {
                    self.metrics.task_started(&task.pipeline, &driver_names(plan), false);
                    queued.push((task.pipeline.clone(), task.id));
                }
                None => {
                    task.status = TaskStatus::Failed;
                    task.finished = Some(Utc::now());
                    task.reason = format!("pipeline {:?} is no longer configured", task.pipeline);
                    if let Err(e) = self.store.put(&task, Vec::new()).await {
                        tracing::error!(task = %task.id, "cannot record the end of a task: {e}");
                    }
                }
            }
        }
        if queued.is_empty() {
            return;
        }
        tracing::info!("resuming {} unfinished task(s)", queued.len());
        // Fed in the background: the backlog may exceed the queues, and the API must not wait.
        let s = self.clone();
        let feeder = tokio::spawn(async move {
            for (pipeline, id) in queued {
                tokio::select! {
                    biased;
                    _ = s.shutdown.cancelled() => return,
                    r = s.queues[&pipeline].send(id) => if r.is_err() { return },
                }
            }
        });
        self.background.lock().unwrap().push(feeder);
    }

    async fn purge_loop(self: Arc<Self>) {
        loop {
            let keep = chrono::Duration::from_std(self.options.retention).unwrap_or(chrono::Duration::MAX);
            let before = Utc::now().checked_sub_signed(keep).unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
            match self.store.purge(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!("deleted {n} finished task(s) older than the retention"),
                Err(e) => tracing::warn!("cannot delete old tasks: {e}"),
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.options.purge_every) => {}
            }
        }
    }

    async fn work(self: Arc<Self>, plan: Arc<Plan>, rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Uuid>>>) {
        loop {
            let id = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return,
                id = async { rx.lock().await.recv().await } => match id {
                    Some(id) => id,
                    None => return,
                },
            };
            let span = tracing::info_span!("task", id = %id, pipeline = %plan.name);
            // Run inline, so that abandoning this worker drops the task with it; a panic fails
            // the task instead of taking the worker down.
            let run = std::panic::AssertUnwindSafe(self.run(plan.clone(), id).instrument(span));
            if let Err(panic) = run.catch_unwind().await {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(task = %id, pipeline = %plan.name, "task panicked: {what}");
                self.fail_after_panic(id, &plan).await;
            }
        }
    }

    async fn fail_after_panic(&self, id: Uuid, plan: &Plan) {
        let Ok(Some(mut task)) = self.store.get(id).await else { return };
        task.status = TaskStatus::Failed;
        task.finished = Some(Utc::now());
        task.reason = "the conversion stopped unexpectedly (internal error; see the acceld log)".into();
        if let Some(a) = task.attempts.last_mut().filter(|a| a.finished.is_none()) {
            a.finished = task.finished;
            a.error = Some(task.reason.clone());
        }
        self.finish(plan, task, Vec::new(), Duration::ZERO).await;
    }

    async fn run(&self, plan: Arc<Plan>, id: Uuid) {
        let mut task = match self.store.get(id).await {
            Ok(Some(t)) if !t.status.is_finished() => t,
            Ok(_) => return,
            Err(e) => {
                // Left PROCESSING in the database: the next start tries again.
                tracing::error!(task = %id, "cannot read task: {e}");
                return;
            }
        };
        let started = Instant::now();
        // An attempt left open was cut short: acceld stopped or died during it.
        if let Some(a) = task.attempts.last_mut().filter(|a| a.finished.is_none()) {
            a.error = Some("interrupted: acceld stopped during this attempt".into());
            a.retryable = true;
            let n = task.attempts.len() as u32;
            // An image that brings the process down every time must not do so forever.
            if n >= self.options.max_attempts {
                task.status = TaskStatus::Failed;
                task.finished = Some(Utc::now());
                task.reason = format!("gave up after {n} attempts; the last one was interrupted (did acceld crash on this image?)");
                tracing::error!(source = %task.source, "{}", task.reason);
                self.finish(&plan, task, Vec::new(), Duration::ZERO).await;
                return;
            }
        }
        loop {
            task.attempts.push(Attempt { started: Utc::now(), finished: None, error: None, retryable: false });
            let n = task.attempts.len() as u32;
            if let Err(e) = self.store.put(&task, Vec::new()).await {
                tracing::warn!("cannot record the start of attempt {n}: {e}");
            }
            let outcome = self.attempt(&plan, &mut task).await;
            let now = Utc::now();
            let attempt = task.attempts.last_mut().expect("pushed above");
            attempt.finished = Some(now);
            let mut extra_keys = Vec::new();
            match outcome {
                Ok(finish) => {
                    self.metrics.attempt(&plan.name, AttemptOutcome::Ok);
                    task.status = TaskStatus::Completed;
                    match finish {
                        Finish::Converted(result) => {
                            task.source_size = result.source_size;
                            task.targets = result.targets.iter().map(TaskTarget::from).collect();
                            task.target_size = task.targets.iter().map(|t| t.size).sum();
                            if task.source.digest().is_none() {
                                extra_keys.push(plan.key(&task.source.with_digest(result.source_digest.clone())));
                            }
                            tracing::info!(source = %task.source, "converted in {:.1}s", started.elapsed().as_secs_f64());
                        }
                        Finish::Skipped(reason) => {
                            tracing::info!(source = %task.source, "{reason}");
                            task.reason = reason;
                        }
                        Finish::Reused(done) => {
                            task.source_size = done.source_size;
                            task.target_size = done.target_size;
                            task.targets = done.targets.clone();
                            task.reason = format!("already converted by task {}", done.id);
                            tracing::info!(source = %task.source, "{}", task.reason);
                        }
                    }
                }
                Err(e) => {
                    let retryable = e.is_retryable();
                    attempt.error = Some(e.to_string());
                    attempt.retryable = retryable;
                    let kind = if retryable { AttemptOutcome::Retryable } else { AttemptOutcome::Permanent };
                    self.metrics.attempt(&plan.name, kind);
                    if retryable && n < self.options.max_attempts {
                        let wait = self.options.backoff_after(n);
                        tracing::warn!(source = %task.source, "attempt {n} of {} failed, retrying in {wait:?}: {e}", self.options.max_attempts);
                        if let Err(e) = self.store.put(&task, Vec::new()).await {
                            tracing::warn!("cannot record attempt {n}: {e}");
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => continue,
                            // Stays PROCESSING: the next start retries it.
                            _ = self.shutdown.cancelled() => return,
                        }
                    }
                    task.status = TaskStatus::Failed;
                    task.reason = if retryable { format!("{e} (gave up after {n} attempts)") } else { e.to_string() };
                    tracing::error!(source = %task.source, "conversion failed: {}", task.reason);
                }
            }
            task.finished = Some(now);
            self.finish(&plan, task, extra_keys, started.elapsed()).await;
            return;
        }
    }

    async fn attempt(&self, plan: &Plan, task: &mut Task) -> Result<Finish, ConvertError> {
        let resolved = self.runner.resolve(&task.source).await?;
        task.source_digest = Some(resolved.digest.clone());
        if let Some(from) = resolved.converted_from {
            return Ok(Finish::Skipped(format!("skipped: {} is a conversion output (of {from})", task.source)));
        }
        let pinned = match task.source.digest() {
            Some(_) => task.source.clone(),
            // A reference with neither tag nor digest names `latest`, and its targets are named
            // from that tag, as `accelctl convert` names them.
            None if task.source.tag().is_none() => task.source.with_tag("latest").unwrap_or_else(|_| task.source.clone()).with_digest(resolved.digest),
            None => task.source.with_digest(resolved.digest),
        };
        if task.source.digest().is_none() {
            // Named by tag: the content it points at may have been converted already.
            match self.store.find(&plan.key(&pinned)).await {
                Ok(Some(done)) if done.status == TaskStatus::Completed && done.id != task.id => return Ok(Finish::Reused(done)),
                Ok(_) => {}
                Err(e) => tracing::warn!("cannot look up earlier conversions: {e}"),
            }
        }
        self.runner.convert(plan, &pinned).await.map(Finish::Converted)
    }

    async fn finish(&self, plan: &Plan, task: Task, extra_keys: Vec<String>, took: Duration) {
        let results = self.outbox.as_ref().map(|o| o.entries(&task)).unwrap_or_default();
        match self.store.put_with_results(&task, extra_keys, results.clone()).await {
            Ok(()) => {
                if let Some(o) = &self.outbox {
                    o.stored(&results);
                }
            }
            // Stays PROCESSING on disk; the next start does it again.
            Err(e) => tracing::error!(task = %task.id, "cannot record the end of the task: {e}"),
        }
        let per_driver: Vec<(String, u64)> = task.targets.iter().map(|t| (t.driver.to_string(), t.size)).collect();
        self.metrics.task_finished(&plan.name, &driver_names(plan), task.status, took, task.source_size, &per_driver);
        let waiters = self.waiters.lock().unwrap().remove(&task.id).unwrap_or_default();
        for w in waiters {
            let _ = w.send(task.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::DriverError;
    use crate::pipeline::convert::TargetResult;
    use crate::store::StoreError;
    use std::sync::atomic::{AtomicU32, Ordering};

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn digest_of(r: &Reference) -> Digest {
        Digest::of(format!("{}/{}", r.name(), r.tag().unwrap_or("latest")).as_bytes())
    }

    /// Stand-in for registry and drivers: resolves every tag to a digest derived from it, and
    /// fails the first `fail_first` conversions with `error`.
    #[derive(Default)]
    struct Fake {
        converts: AtomicU32,
        fail_first: u32,
        error: Option<fn() -> ConvertError>,
        converted_from: Option<String>,
        /// Conversions wait for this before they return, when set.
        gate: Option<Arc<tokio::sync::Semaphore>>,
    }

    #[async_trait]
    impl Runner for Fake {
        async fn resolve(&self, source: &Reference) -> Result<Resolved, ConvertError> {
            let digest = source.digest().cloned().unwrap_or_else(|| digest_of(source));
            Ok(Resolved { digest, converted_from: self.converted_from.clone() })
        }
        async fn convert(&self, plan: &Plan, source: &Reference) -> Result<ConvertResult, ConvertError> {
            assert!(source.digest().is_some(), "conversions get pinned sources");
            let n = self.converts.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some(g) = &self.gate {
                g.acquire().await.unwrap().forget();
            }
            if n <= self.fail_first {
                return Err((self.error.unwrap())());
            }
            let targets = plan
                .conversions
                .iter()
                .map(|c| TargetResult {
                    driver: c.driver.kind(),
                    reference: c.naming.target_for(source).unwrap(),
                    digest: D.parse().unwrap(),
                    media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                    size: 700,
                    platforms: vec![],
                })
                .collect();
            Ok(ConvertResult { source: source.clone(), source_digest: source.digest().unwrap().clone(), source_size: 1000, targets })
        }
    }

    fn retryable() -> ConvertError {
        ConvertError::Store(StoreError::DigestMismatch { expected: D.parse().unwrap(), actual: D.parse().unwrap(), size: 1 })
    }

    fn retryable_io() -> ConvertError {
        ConvertError::Driver { image: "x".into(), layer: D.parse().unwrap(), source: DriverError::Io(std::io::Error::other("reset")) }
    }

    fn permanent() -> ConvertError {
        ConvertError::BadImage { reference: "h.io/a:1".into(), why: "config lists 2 diff_ids for 3 layers".into() }
    }

    const YAML: &str = "pipelines: [{ name: p, concurrency: 2, convert: [{ driver: estargz }] }]";

    struct Setup {
        workers: Workers,
        runner: Arc<Fake>,
        shutdown: CancellationToken,
        _dir: Option<tempfile::TempDir>,
    }

    fn options(queue_size: usize) -> WorkerOptions {
        WorkerOptions {
            queue_size,
            max_attempts: 3,
            backoff: Duration::from_millis(5),
            backoff_max: Duration::from_millis(20),
            grace: Duration::from_secs(5),
            retention: Duration::from_secs(3600),
            purge_every: Duration::from_secs(3600),
        }
    }

    async fn setup_at(path: &std::path::Path, runner: Fake, opts: WorkerOptions) -> Setup {
        let config = Config::parse(YAML, "t", &|_| None).unwrap();
        let plans = Plan::all(&config).unwrap();
        let router = Router::new(&config, plans);
        let store = TaskStore::open(path).unwrap();
        let runner = Arc::new(runner);
        let shutdown = CancellationToken::new();
        let workers = Workers::start(store, runner.clone(), router, opts, Arc::new(TaskMetrics::default()), None, shutdown.clone()).await.unwrap();
        Setup { workers, runner, shutdown, _dir: None }
    }

    async fn setup(runner: Fake, opts: WorkerOptions) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let mut s = setup_at(&dir.path().join("t.redb"), runner, opts).await;
        s._dir = Some(dir);
        s
    }

    fn event(r: &str) -> Event {
        Event::new(r.parse().unwrap(), "harbor")
    }

    async fn accept_one(w: &Workers, r: &str) -> Submitted {
        w.accept(&[event(r)]).await.unwrap().tasks.remove(0)
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let o = WorkerOptions { backoff: Duration::from_secs(2), backoff_max: Duration::from_secs(10), ..options(1) };
        let waits: Vec<u64> = (1..=5).map(|n| o.backoff_after(n).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 10, 10]);
        assert_eq!(o.backoff_after(200), Duration::from_secs(10));
    }

    #[test]
    fn retry_classification() {
        assert!(retryable().is_retryable());
        assert!(retryable_io().is_retryable());
        assert!(!permanent().is_retryable());
    }

    #[tokio::test]
    async fn converts_and_records_the_result() {
        let s = setup(Fake::default(), options(8)).await;
        let sub = accept_one(&s.workers, &format!("h.io/lib/a:1@{D}")).await;
        assert!(sub.created);
        let done = s.workers.wait(sub.task.id).await.unwrap();
        assert_eq!(done.status, TaskStatus::Completed, "{done:?}");
        assert_eq!(done.targets[0].reference.to_string(), "h.io/lib/a:1-esgz");
        assert_eq!((done.source_size, done.target_size), (1000, 700));
        assert_eq!(done.attempts.len(), 1);
        assert!(done.finished.is_some());
        assert_eq!(s.workers.store().get(done.id).await.unwrap().unwrap(), done);
    }

    #[tokio::test]
    async fn a_source_without_tag_or_digest_is_its_latest_tag() {
        let s = setup(Fake::default(), options(8)).await;
        let sub = accept_one(&s.workers, "h.io/lib/a").await;
        let done = s.workers.wait(sub.task.id).await.unwrap();
        assert_eq!(done.status, TaskStatus::Completed, "{done:?}");
        assert_eq!(done.targets[0].reference.to_string(), "h.io/lib/a:latest-esgz");
    }

    #[tokio::test]
    async fn retryable_failures_are_retried_and_recorded() {
        let fake = Fake { fail_first: 2, error: Some(retryable_io), ..Default::default() };
        let s = setup(fake, options(8)).await;
        let sub = accept_one(&s.workers, "h.io/lib/a:1").await;
        let done = s.workers.wait(sub.task.id).await.unwrap();
        assert_eq!(done.status, TaskStatus::Completed, "{done:?}");
        assert_eq!(done.attempts.len(), 3);
        assert!(done.attempts[0].retryable && done.attempts[0].error.as_deref().unwrap().contains("reset"));
        assert!(done.attempts[2].error.is_none());
        assert_eq!(s.runner.converts.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn retries_stop_at_max_attempts() {
        let fake = Fake { fail_first: 100, error: Some(retryable), ..Default::default() };
        let s = setup(fake, options(8)).await;
        let done = s.workers.wait(accept_one(&s.workers, "h.io/lib/a:1").await.task.id).await.unwrap();
        assert_eq!(done.status, TaskStatus::Failed);
        assert_eq!(done.attempts.len(), 3);
        assert!(done.reason.contains("gave up after 3 attempts"), "{}", done.reason);
    }

    #[tokio::test]
    async fn permanent_failures_are_not_retried() {
        let fake = Fake { fail_first: 100, error: Some(permanent), ..Default::default() };
        let s = setup(fake, options(8)).await;
        let done = s.workers.wait(accept_one(&s.workers, "h.io/lib/a:1").await.task.id).await.unwrap();
        assert_eq!(done.status, TaskStatus::Failed);
        assert_eq!(done.attempts.len(), 1);
        assert!(done.reason.contains("diff_ids"), "{}", done.reason);
        assert!(!done.attempts[0].retryable);
        assert_eq!(s.runner.converts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_same_event_twenty_times_converts_once() {
        let s = setup(Fake::default(), options(64)).await;
        let r = format!("h.io/lib/a:1@{D}");
        let mut ids = Vec::new();
        for _ in 0..20 {
            ids.push(accept_one(&s.workers, &r).await.task.id);
        }
        s.workers.wait(ids[0]).await.unwrap();
        for _ in 0..5 {
            let again = accept_one(&s.workers, &r).await;
            assert!(!again.created);
            assert_eq!(again.task.id, ids[0]);
        }
        assert!(ids.iter().all(|id| *id == ids[0]));
        assert_eq!(s.runner.converts.load(Ordering::SeqCst), 1);
        assert_eq!(s.workers.store().list().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_tag_converted_before_is_not_converted_again() {
        let s = setup(Fake::default(), options(8)).await;
        let first = s.workers.wait(accept_one(&s.workers, "h.io/lib/a:1").await.task.id).await.unwrap();
        let second = accept_one(&s.workers, "h.io/lib/a:1").await;
        assert!(second.created, "a tag alone may have moved, so a new task looks");
        let second = s.workers.wait(second.task.id).await.unwrap();
        assert_eq!(second.status, TaskStatus::Completed);
        assert_eq!(second.reason, format!("already converted by task {}", first.id));
        assert_eq!(second.targets, first.targets);
        assert_eq!(s.runner.converts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn conversion_outputs_found_in_the_manifest_are_skipped() {
        let fake = Fake { converted_from: Some(D.into()), ..Default::default() };
        let s = setup(fake, options(8)).await;
        let done = s.workers.wait(accept_one(&s.workers, "h.io/lib/a:1").await.task.id).await.unwrap();
        assert_eq!(done.status, TaskStatus::Completed);
        assert!(done.reason.contains("conversion output"), "{}", done.reason);
        assert!(done.targets.is_empty());
        assert_eq!(s.runner.converts.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn full_queue_refuses_and_stores_nothing() {
        // One worker busy, a queue of one: the third distinct event finds no room.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let fake = Fake { gate: Some(gate.clone()), ..Default::default() };
        let s = setup(fake, options(1)).await;
        let running = |n: u32| {
            let runner = s.runner.clone();
            async move {
                while runner.converts.load(Ordering::SeqCst) < n {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        // Both workers (concurrency 2) take a task, then one more fills the queue.
        let a = accept_one(&s.workers, "h.io/lib/a:1").await;
        running(1).await;
        let b = accept_one(&s.workers, "h.io/lib/b:1").await;
        running(2).await;
        let c = accept_one(&s.workers, "h.io/lib/c:1").await;
        let err = s.workers.accept(&[event("h.io/lib/d:1")]).await.unwrap_err();
        assert!(matches!(err, SubmitError::QueueFull { ref pipeline, capacity: 1 } if pipeline == "p"), "{err}");
        assert_eq!(s.workers.store().list().await.unwrap().len(), 3, "the refused event left no task");
        assert_eq!(s.workers.queue_depths()[0].depth, 1);
        gate.add_permits(10);
        for id in [a.task.id, b.task.id, c.task.id] {
            assert_eq!(s.workers.wait(id).await.unwrap().status, TaskStatus::Completed);
        }
        assert!(s.workers.accept(&[event("h.io/lib/d:1")]).await.is_ok());
    }

    #[tokio::test]
    async fn unfinished_tasks_resume_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let ids = {
            // Conversions never finish here: the process "dies" with tasks running and queued.
            let gate = Arc::new(tokio::sync::Semaphore::new(0));
            let s = setup_at(&path, Fake { gate: Some(gate), ..Default::default() }, WorkerOptions { grace: Duration::from_millis(50), ..options(8) }).await;
            let mut ids = Vec::new();
            for r in ["h.io/lib/a:1", "h.io/lib/b:1", "h.io/lib/c:1"] {
                ids.push(accept_one(&s.workers, r).await.task.id);
            }
            s.shutdown.cancel();
            s.workers.stop().await;
            assert!(s.workers.accept(&[event("h.io/lib/z:1")]).await.is_err(), "no work is taken after shutdown");
            let store = s.workers.store().clone();
            drop(s);
            assert!(store.close(Duration::from_secs(5)).await, "nothing holds the database after stop");
            ids
        };
        let s = setup_at(&path, Fake::default(), options(8)).await;
        for id in &ids {
            let t = s.workers.wait(*id).await.unwrap();
            assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
        }
        assert_eq!(s.runner.converts.load(Ordering::SeqCst), 3);
        let listed = s.workers.store().list().await.unwrap();
        assert_eq!(listed.len(), 3);
    }

    #[tokio::test]
    async fn interrupted_attempts_are_recorded_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let (once, always) = {
            let store = TaskStore::open(&path).unwrap();
            let new = |r: &str| NewTask { pipeline: "p".into(), origin: "harbor".into(), source: r.parse().unwrap(), key: r.into(), reuse_completed: true };
            let got = store.insert(vec![new("h.io/lib/once:1"), new("h.io/lib/always:1")]).await.unwrap();
            let (mut once, mut always) = (got[0].task().clone(), got[1].task().clone());
            let open = Attempt { started: Utc::now(), finished: None, error: None, retryable: false };
            once.attempts = vec![open.clone()];
            always.attempts = vec![open.clone(), open.clone(), open];
            store.put(&once, vec![]).await.unwrap();
            store.put(&always, vec![]).await.unwrap();
            assert!(store.close(Duration::from_secs(5)).await);
            (once.id, always.id)
        };
        let s = setup_at(&path, Fake::default(), options(8)).await;
        let once = s.workers.wait(once).await.unwrap();
        assert_eq!(once.status, TaskStatus::Completed, "{once:?}");
        assert_eq!(once.attempts.len(), 2);
        assert!(once.attempts[0].error.as_deref().unwrap().contains("interrupted"));
        let always = s.workers.wait(always).await.unwrap();
        assert_eq!(always.status, TaskStatus::Failed, "{always:?}");
        assert!(always.reason.contains("gave up after 3 attempts"), "{}", always.reason);
        assert_eq!(s.runner.converts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn shutdown_lets_running_conversions_finish_within_grace() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let s = setup(Fake { gate: Some(gate.clone()), ..Default::default() }, options(8)).await;
        let a = accept_one(&s.workers, "h.io/lib/a:1").await;
        while s.runner.converts.load(Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s.shutdown.cancel();
        let stopping = tokio::spawn({
            let w = s.workers.clone();
            async move { w.stop().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!stopping.is_finished(), "stop waits for the running conversion");
        gate.add_permits(1);
        stopping.await.unwrap();
        let t = s.workers.store().get(a.task.id).await.unwrap().unwrap();
        assert_eq!(t.status, TaskStatus::Completed);
    }

    #[tokio::test]
    async fn waiting_leaves_nothing_behind() {
        let s = setup(Fake::default(), options(8)).await;
        let id = accept_one(&s.workers, "h.io/lib/a:1").await.task.id;
        s.workers.wait(id).await.unwrap();
        // Already finished: answered from the store.
        assert_eq!(s.workers.wait(id).await.unwrap().status, TaskStatus::Completed);
        assert_eq!(s.workers.wait(Uuid::now_v7()).await, None, "unknown task");
        assert!(s.workers.shared.waiters.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn health_reports_shutdown() {
        let s = setup(Fake::default(), options(8)).await;
        assert_eq!(s.workers.health().await, Ok(()));
        s.shutdown.cancel();
        assert!(s.workers.health().await.unwrap_err().contains("shutting down"));
    }
}
