//! Tasks and their durable store: an embedded redb database, so the task list survives restarts
//! and unfinished tasks are resumed.
//!
//! Writes go through one writer thread that commits whatever is waiting in one transaction
//! (group commit): each caller learns its write is on disk, and a burst of webhooks costs one
//! sync instead of one per event.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::convert::TargetResult;
use crate::drivers::DriverKind;
use crate::oci::{Digest, Platform, Reference};

/// Task id → task as JSON.
const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// Idempotency key → id of the task that holds it.
const KEYS: TableDefinition<&str, &str> = TableDefinition::new("keys");
/// `sink NUL sequence` → a result not yet delivered to that sink. Written in the same
/// transaction as the finished task, so a result is never finished but forgotten.
const OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("outbox");

/// Writes waiting for the writer thread; senders wait beyond this.
const WRITE_QUEUE: usize = 4096;
/// Most operations committed in one transaction.
const MAX_BATCH: usize = 1024;

/// Status names as the acceleration service's API shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskStatus {
    /// Queued, running, or waiting to retry.
    Processing,
    Completed,
    Failed,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 3] = [TaskStatus::Processing, TaskStatus::Completed, TaskStatus::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Processing => "PROCESSING",
            TaskStatus::Completed => "COMPLETED",
            TaskStatus::Failed => "FAILED",
        }
    }

    pub fn is_finished(self) -> bool {
        self != TaskStatus::Processing
    }
}

impl std::fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One try at a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub started: DateTime<Utc>,
    /// Unset while the attempt runs, and for an attempt cut short by a crash or shutdown.
    #[serde(default)]
    pub finished: Option<DateTime<Utc>>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Whether that failure was worth another attempt.
    #[serde(default)]
    pub retryable: bool,
}

/// One image a task produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskTarget {
    pub driver: DriverKind,
    pub reference: Reference,
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<Platform>,
}

impl From<&TargetResult> for TaskTarget {
    fn from(t: &TargetResult) -> Self {
        TaskTarget {
            driver: t.driver,
            reference: t.reference.clone(),
            digest: t.digest.clone(),
            media_type: t.media_type.clone(),
            size: t.size,
            platforms: t.platforms.clone(),
        }
    }
}

/// One conversion of one source image by one pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: Uuid,
    pub pipeline: String,
    /// Source (event origin) that asked for it.
    pub origin: String,
    /// The image as the event named it.
    pub source: Reference,
    /// Manifest digest the source resolved to, once known.
    #[serde(default)]
    pub source_digest: Option<Digest>,
    /// Idempotency key (pipeline, its options, the source).
    pub key: String,
    pub status: TaskStatus,
    pub created: DateTime<Utc>,
    #[serde(default)]
    pub finished: Option<DateTime<Utc>>,
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    #[serde(default)]
    pub source_size: u64,
    #[serde(default)]
    pub target_size: u64,
    #[serde(default)]
    pub targets: Vec<TaskTarget>,
    /// Why it failed, or why nothing was converted.
    #[serde(default)]
    pub reason: String,
}

/// A task to create.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub pipeline: String,
    pub origin: String,
    pub source: Reference,
    pub key: String,
    /// Whether a completed task with the same key makes this one unnecessary. True when the
    /// source is pinned by digest; a tag alone may have moved since.
    pub reuse_completed: bool,
}

/// A new task, encoded, waiting to learn whether its key is free.
struct Prepared {
    task: Task,
    id: String,
    json: Vec<u8>,
    reuse_completed: bool,
}

impl Prepared {
    fn new(n: NewTask) -> Prepared {
        let task = Task {
            id: Uuid::now_v7(),
            pipeline: n.pipeline,
            origin: n.origin,
            source: n.source,
            source_digest: None,
            key: n.key,
            status: TaskStatus::Processing,
            created: Utc::now(),
            finished: None,
            attempts: Vec::new(),
            source_size: 0,
            target_size: 0,
            targets: Vec::new(),
            reason: String::new(),
        };
        Prepared { id: task.id.to_string(), json: encode(&task), task, reuse_completed: n.reuse_completed }
    }
}

/// What `insert` did with one new task.
#[derive(Debug, Clone, PartialEq)]
pub enum Inserted {
    Created(Task),
    /// A task with the same key was in flight (or completed, when reusable): nothing new.
    Existing(Task),
}

impl Inserted {
    pub fn task(&self) -> &Task {
        match self {
            Inserted::Created(t) | Inserted::Existing(t) => t,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum TaskStoreError {
    #[error("task database {path} is in use by another process (is another acceld running with the same tasks.path?)")]
    InUse { path: PathBuf },
    #[error("task database {path}: {why}")]
    Open { path: PathBuf, why: String },
    #[error("task database: {0}")]
    Db(String),
    #[error("task database holds a record that cannot be read ({id}): {why}")]
    Corrupt { id: String, why: String },
    #[error("task database writer stopped")]
    Closed,
}

impl From<redb::Error> for TaskStoreError {
    fn from(e: redb::Error) -> Self {
        TaskStoreError::Db(e.to_string())
    }
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for TaskStoreError {
            fn from(e: $t) -> Self {
                TaskStoreError::Db(redb::Error::from(e).to_string())
            }
        }
    )*};
}
db_err!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

type Reply<T> = oneshot::Sender<Result<T, TaskStoreError>>;

enum Op {
    Insert(Vec<Prepared>, Reply<Vec<Inserted>>),
    /// Writes a task; also points `keys` at it and adds outbox entries.
    Put(Box<Task>, Vec<String>, Vec<Undelivered>, Reply<()>),
    /// Removes delivered outbox entries.
    Delivered(Vec<String>, Reply<()>),
    /// Deletes finished tasks that finished before the time.
    Purge(DateTime<Utc>, Reply<usize>),
}

/// A result waiting to be delivered to a sink.
#[derive(Debug, Clone, PartialEq)]
pub struct Undelivered {
    /// Outbox key; ordered by when the result was recorded.
    pub key: String,
    pub sink: String,
    pub body: Vec<u8>,
}

impl Undelivered {
    /// A new entry for `sink`, ordered after every earlier one.
    pub fn new(sink: &str, body: Vec<u8>) -> Undelivered {
        Undelivered { key: format!("{sink}\u{0}{}", Uuid::now_v7()), sink: sink.to_string(), body }
    }
}

/// Handle to the task database. Cheap to clone.
#[derive(Clone)]
pub struct TaskStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    path: PathBuf,
    writes: Option<mpsc::Sender<Op>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer after its current batch; waiting for it releases
        // the database file before a reopen.
        self.writes.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl TaskStore {
    /// Opens (creating when missing) the database at `path`.
    pub fn open(path: &Path) -> Result<TaskStore, TaskStoreError> {
        let open_err = |why: String| TaskStoreError::Open { path: path.to_path_buf(), why };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_err(format!("cannot create directory {}: {e}", dir.display())))?;
        }
        let db = match Database::create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(TaskStoreError::InUse { path: path.to_path_buf() }),
            Err(e) => return Err(open_err(e.to_string())),
        };
        let txn = db.begin_write()?;
        txn.open_table(TASKS)?;
        txn.open_table(KEYS)?;
        txn.open_table(OUTBOX)?;
        txn.commit()?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("task-db-writer".into())
            .spawn(move || write_loop(&writer_db, rx))
            .map_err(|e| open_err(format!("cannot start writer thread: {e}")))?;
        Ok(TaskStore { inner: Arc::new(Inner { db, path: path.to_path_buf(), writes: Some(tx), writer: Some(writer) }) })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Waits up to `timeout` for the other handles to go, then closes the database (the writer
    /// finishes what is queued and the file is released). False when other handles remained;
    /// the database then closes with the last of them.
    pub async fn close(self, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while Arc::strong_count(&self.inner) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let last = Arc::strong_count(&self.inner) == 1;
        // Dropping the last handle joins the writer thread: not on an executor thread.
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
        last
    }

    async fn write<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, TaskStoreError> {
        let (tx, rx) = oneshot::channel();
        let writes = self.inner.writes.as_ref().ok_or(TaskStoreError::Closed)?;
        writes.send(op(tx)).await.map_err(|_| TaskStoreError::Closed)?;
        rx.await.map_err(|_| TaskStoreError::Closed)?
    }

    /// Creates tasks, durably, unless a task with the same key already stands for the work.
    /// Results are in the order of `tasks`.
    pub async fn insert(&self, tasks: Vec<NewTask>) -> Result<Vec<Inserted>, TaskStoreError> {
        // Built and encoded here, on the caller's thread: the writer thread, which every
        // commit waits for, only looks up keys and stores bytes.
        let prepared = tasks.into_iter().map(Prepared::new).collect();
        self.write(|reply| Op::Insert(prepared, reply)).await
    }

    /// Writes a task's new state durably, and points `extra_keys` at it (a source resolved to a
    /// digest gets the digest's key once converted).
    pub async fn put(&self, task: &Task, extra_keys: Vec<String>) -> Result<(), TaskStoreError> {
        self.write(|reply| Op::Put(Box::new(task.clone()), extra_keys, Vec::new(), reply)).await
    }

    /// Like [`put`](Self::put), and records results for sinks in the same transaction.
    pub async fn put_with_results(&self, task: &Task, extra_keys: Vec<String>, results: Vec<Undelivered>) -> Result<(), TaskStoreError> {
        self.write(|reply| Op::Put(Box::new(task.clone()), extra_keys, results, reply)).await
    }

    /// Removes outbox entries once their sink has the result.
    pub async fn delivered(&self, keys: Vec<String>) -> Result<(), TaskStoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.write(|reply| Op::Delivered(keys, reply)).await
    }

    /// Up to `limit` results waiting for `sink`, oldest first, after the key `after` if given.
    pub async fn undelivered(&self, sink: &str, after: Option<String>, limit: usize) -> Result<Vec<Undelivered>, TaskStoreError> {
        let sink = sink.to_string();
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(OUTBOX)?;
            let start = after.unwrap_or_else(|| format!("{sink}\u{0}"));
            let end = format!("{sink}\u{1}");
            let mut out = Vec::new();
            for row in table.range(start.as_str()..end.as_str())? {
                let (k, v) = row?;
                if k.value() == start {
                    continue;
                }
                out.push(Undelivered { key: k.value().to_string(), sink: sink.clone(), body: v.value().to_vec() });
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    /// Results waiting, per sink name.
    pub async fn undelivered_counts(&self) -> Result<std::collections::BTreeMap<String, u64>, TaskStoreError> {
        self.read(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(OUTBOX)?;
            let mut out = std::collections::BTreeMap::new();
            for row in table.iter()? {
                let (k, _) = row?;
                let sink = k.value().split('\u{0}').next().unwrap_or_default().to_string();
                *out.entry(sink).or_insert(0) += 1;
            }
            Ok(out)
        })
        .await
    }

    /// Deletes tasks that finished before `before`; returns how many.
    pub async fn purge(&self, before: DateTime<Utc>) -> Result<usize, TaskStoreError> {
        self.write(|reply| Op::Purge(before, reply)).await
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, TaskStoreError> + Send + 'static,
    ) -> Result<T, TaskStoreError> {
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(|e| TaskStoreError::Db(format!("reader stopped: {e}")))?
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<Task>, TaskStoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(TASKS)?;
            let key = id.to_string();
            let got = table.get(key.as_str())?;
            got.map(|v| decode(&key, v.value())).transpose()
        })
        .await
    }

    /// The task holding an idempotency key, if any.
    pub async fn find(&self, key: &str) -> Result<Option<Task>, TaskStoreError> {
        let key = key.to_string();
        self.read(move |db| {
            let txn = db.begin_read()?;
            let keys = txn.open_table(KEYS)?;
            let tasks = txn.open_table(TASKS)?;
            let Some(id) = keys.get(key.as_str())?.map(|v| v.value().to_string()) else { return Ok(None) };
            let got = tasks.get(id.as_str())?;
            got.map(|v| decode(&id, v.value())).transpose()
        })
        .await
    }

    /// Every task, oldest first.
    pub async fn list(&self) -> Result<Vec<Task>, TaskStoreError> {
        self.scan(|_| true).await
    }

    /// Tasks not finished (queued, running or waiting to retry when the process stopped),
    /// oldest first.
    pub async fn unfinished(&self) -> Result<Vec<Task>, TaskStoreError> {
        self.scan(|t| !t.status.is_finished()).await
    }

    /// Number of tasks stored.
    pub async fn count(&self) -> Result<u64, TaskStoreError> {
        self.read(|db| Ok(db.begin_read()?.open_table(TASKS)?.len()?)).await
    }

    async fn scan(&self, keep: impl Fn(&Task) -> bool + Send + 'static) -> Result<Vec<Task>, TaskStoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(TASKS)?;
            let mut out = Vec::new();
            for row in table.iter()? {
                let (k, v) = row?;
                let task = decode(k.value(), v.value())?;
                if keep(&task) {
                    out.push(task);
                }
            }
            out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
            Ok(out)
        })
        .await
    }
}

fn decode(id: &str, bytes: &[u8]) -> Result<Task, TaskStoreError> {
    serde_json::from_slice(bytes).map_err(|e| TaskStoreError::Corrupt { id: id.to_string(), why: e.to_string() })
}

fn encode(task: &Task) -> Vec<u8> {
    serde_json::to_vec(task).expect("a task serializes")
}

/// Outcome of one operation inside a batch, sent once the batch commits.
enum Done {
    Insert(Reply<Vec<Inserted>>, Vec<Inserted>),
    Put(Reply<()>),
    Purge(Reply<usize>, usize),
}

impl Done {
    fn send(self, failed: Option<&TaskStoreError>) {
        match (self, failed) {
            (Done::Insert(r, v), None) => drop(r.send(Ok(v))),
            (Done::Put(r), None) => drop(r.send(Ok(()))),
            (Done::Purge(r, n), None) => drop(r.send(Ok(n))),
            (Done::Insert(r, _), Some(e)) => drop(r.send(Err(e.clone()))),
            (Done::Put(r), Some(e)) => drop(r.send(Err(e.clone()))),
            (Done::Purge(r, _), Some(e)) => drop(r.send(Err(e.clone()))),
        }
    }
}

fn write_loop(db: &Database, mut rx: mpsc::Receiver<Op>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut done = Vec::with_capacity(batch.len());
        let ops = batch.len();
        let started = std::time::Instant::now();
        let result = apply(db, batch, &mut done);
        // How well commits are grouped, and what the disk makes each caller wait.
        tracing::debug!(ops, took_us = started.elapsed().as_micros() as u64, "task database commit");
        if let Err(e) = &result {
            tracing::error!("task database write failed: {e}");
        }
        let failed = result.err();
        for d in done {
            d.send(failed.as_ref());
        }
    }
}

type Tasks<'t> = redb::Table<'t, &'static str, &'static [u8]>;
type Keys<'t> = redb::Table<'t, &'static str, &'static str>;

fn apply(db: &Database, batch: Vec<Op>, done: &mut Vec<Done>) -> Result<(), TaskStoreError> {
    // Replies are held until the commit: nobody hears "stored" before it is on disk. Should
    // the transaction fail, every operation in it fails.
    let mut ops = batch.into_iter();
    let result = (|| {
        let txn = db.begin_write()?;
        {
            let mut tasks = txn.open_table(TASKS)?;
            let mut keys = txn.open_table(KEYS)?;
            let mut outbox = txn.open_table(OUTBOX)?;
            for op in ops.by_ref() {
                match op {
                    Op::Insert(new, reply) => match insert(&mut tasks, &mut keys, new) {
                        Ok(out) => done.push(Done::Insert(reply, out)),
                        Err(e) => {
                            let _ = reply.send(Err(e.clone()));
                            return Err(e);
                        }
                    },
                    Op::Put(task, extra_keys, results, reply) => match put(&mut tasks, &mut keys, &mut outbox, &task, &extra_keys, &results) {
                        Ok(()) => done.push(Done::Put(reply)),
                        Err(e) => {
                            let _ = reply.send(Err(e.clone()));
                            return Err(e);
                        }
                    },
                    Op::Delivered(gone, reply) => match delivered(&mut outbox, &gone) {
                        Ok(()) => done.push(Done::Put(reply)),
                        Err(e) => {
                            let _ = reply.send(Err(e.clone()));
                            return Err(e);
                        }
                    },
                    Op::Purge(before, reply) => match purge(&mut tasks, &mut keys, before) {
                        Ok(n) => done.push(Done::Purge(reply, n)),
                        Err(e) => {
                            let _ = reply.send(Err(e.clone()));
                            return Err(e);
                        }
                    },
                }
            }
        }
        txn.commit()?;
        Ok(())
    })();
    // Operations never reached (an error stopped the batch) fail with the same error.
    if let Err(e) = &result {
        for op in ops {
            match op {
                Op::Insert(_, r) => drop(r.send(Err(e.clone()))),
                Op::Put(_, _, _, r) | Op::Delivered(_, r) => drop(r.send(Err(e.clone()))),
                Op::Purge(_, r) => drop(r.send(Err(e.clone()))),
            }
        }
    }
    result
}

fn insert(tasks: &mut Tasks, keys: &mut Keys, new: Vec<Prepared>) -> Result<Vec<Inserted>, TaskStoreError> {
    let mut out = Vec::with_capacity(new.len());
    for n in new {
        let holder = keys.get(n.task.key.as_str())?.map(|v| v.value().to_string());
        let existing = match holder {
            Some(id) => tasks.get(id.as_str())?.map(|v| decode(&id, v.value())).transpose()?,
            None => None,
        };
        match existing {
            Some(t) if t.status == TaskStatus::Processing || (t.status == TaskStatus::Completed && n.reuse_completed) => {
                out.push(Inserted::Existing(t));
            }
            _ => {
                tasks.insert(n.id.as_str(), n.json.as_slice())?;
                keys.insert(n.task.key.as_str(), n.id.as_str())?;
                out.push(Inserted::Created(n.task));
            }
        }
    }
    Ok(out)
}

type Outbox<'t> = redb::Table<'t, &'static str, &'static [u8]>;

fn put(tasks: &mut Tasks, keys: &mut Keys, outbox: &mut Outbox, task: &Task, extra_keys: &[String], results: &[Undelivered]) -> Result<(), TaskStoreError> {
    let id = task.id.to_string();
    tasks.insert(id.as_str(), encode(task).as_slice())?;
    for k in extra_keys {
        keys.insert(k.as_str(), id.as_str())?;
    }
    for r in results {
        outbox.insert(r.key.as_str(), r.body.as_slice())?;
    }
    Ok(())
}

fn delivered(outbox: &mut Outbox, gone: &[String]) -> Result<(), TaskStoreError> {
    for k in gone {
        outbox.remove(k.as_str())?;
    }
    Ok(())
}

fn purge(tasks: &mut Tasks, keys: &mut Keys, before: DateTime<Utc>) -> Result<usize, TaskStoreError> {
    let mut gone = std::collections::HashSet::new();
    for row in tasks.iter()? {
        let (k, v) = row?;
        let t = decode(k.value(), v.value())?;
        if t.status.is_finished() && t.finished.is_some_and(|f| f < before) {
            gone.insert(k.value().to_string());
        }
    }
    for id in &gone {
        tasks.remove(id.as_str())?;
    }
    let mut stale = Vec::new();
    for row in keys.iter()? {
        let (k, v) = row?;
        if gone.contains(v.value()) {
            stale.push(k.value().to_string());
        }
    }
    for k in stale {
        keys.remove(k.as_str())?;
    }
    Ok(gone.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_task(source: &str, reuse: bool) -> NewTask {
        NewTask {
            pipeline: "p".into(),
            origin: "harbor".into(),
            source: source.parse().unwrap(),
            key: format!("p|{source}"),
            reuse_completed: reuse,
        }
    }

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn status_names_round_trip() {
        for s in TaskStatus::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<TaskStatus>(&json).unwrap(), s);
        }
        assert!(serde_json::from_str::<TaskStatus>("\"RUNNING\"").is_err());
    }

    #[tokio::test]
    async fn tasks_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/tasks.redb");
        let (a, b) = {
            let store = TaskStore::open(&path).unwrap();
            let got = store.insert(vec![new_task("h.io/a:1", true), new_task("h.io/b:1", true)]).await.unwrap();
            let mut a = got[0].task().clone();
            a.status = TaskStatus::Completed;
            a.finished = Some(Utc::now());
            a.attempts.push(Attempt { started: a.created, finished: a.finished, error: Some("boom".into()), retryable: true });
            a.targets.push(TaskTarget {
                driver: DriverKind::Estargz,
                reference: "h.io/a:1-esgz".parse().unwrap(),
                digest: D.parse().unwrap(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                size: 42,
                platforms: vec![],
            });
            store.put(&a, vec![]).await.unwrap();
            (a, got[1].task().clone())
        };
        // Dropping the last handle closes the database, so it can be opened again.
        let store = TaskStore::open(&path).unwrap();
        let all = store.list().await.unwrap();
        assert_eq!(all, vec![a.clone(), b.clone()]);
        assert_eq!(store.unfinished().await.unwrap(), vec![b.clone()]);
        assert_eq!(store.get(a.id).await.unwrap(), Some(a.clone()));
        assert_eq!(store.find(&a.key).await.unwrap(), Some(a));
        assert_eq!(store.get(Uuid::now_v7()).await.unwrap(), None);
    }

    #[tokio::test]
    async fn second_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.redb");
        let _store = TaskStore::open(&path).unwrap();
        assert!(matches!(TaskStore::open(&path), Err(TaskStoreError::InUse { .. })));
    }

    #[tokio::test]
    async fn dedupe_in_flight_and_completed() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(&dir.path().join("t.redb")).unwrap();
        // The same key twice in one batch, and again later: one task.
        let got = store.insert(vec![new_task("h.io/a:1", true), new_task("h.io/a:1", true)]).await.unwrap();
        assert!(matches!(got[0], Inserted::Created(_)));
        assert_eq!(got[1], Inserted::Existing(got[0].task().clone()));
        let again = store.insert(vec![new_task("h.io/a:1", true)]).await.unwrap();
        assert_eq!(again[0], Inserted::Existing(got[0].task().clone()));

        let mut t = got[0].task().clone();
        t.status = TaskStatus::Completed;
        t.finished = Some(Utc::now());
        store.put(&t, vec![]).await.unwrap();
        assert!(matches!(&store.insert(vec![new_task("h.io/a:1", true)]).await.unwrap()[0], Inserted::Existing(x) if x.status == TaskStatus::Completed));
        // A tag-only source is converted again once the earlier task is done: the tag may have moved.
        let fresh = store.insert(vec![new_task("h.io/a:1", false)]).await.unwrap();
        assert!(matches!(&fresh[0], Inserted::Created(x) if x.id != t.id));

        // A failed task does not block a new attempt.
        let f = store.insert(vec![new_task("h.io/f:1", true)]).await.unwrap();
        let mut f = f[0].task().clone();
        f.status = TaskStatus::Failed;
        f.finished = Some(Utc::now());
        store.put(&f, vec![]).await.unwrap();
        assert!(matches!(&store.insert(vec![new_task("h.io/f:1", true)]).await.unwrap()[0], Inserted::Created(x) if x.id != f.id));
    }

    #[tokio::test]
    async fn extra_keys_point_at_the_task() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(&dir.path().join("t.redb")).unwrap();
        let t = store.insert(vec![new_task("h.io/a:1", false)]).await.unwrap()[0].task().clone();
        let digest_key = format!("p|h.io/a:1@{D}");
        store.put(&t, vec![digest_key.clone()]).await.unwrap();
        assert_eq!(store.find(&digest_key).await.unwrap().map(|x| x.id), Some(t.id));
    }

    #[tokio::test]
    async fn purge_removes_old_finished_tasks_and_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(&dir.path().join("t.redb")).unwrap();
        let got = store.insert(vec![new_task("h.io/old:1", true), new_task("h.io/new:1", true), new_task("h.io/run:1", true)]).await.unwrap();
        let now = Utc::now();
        let mut old = got[0].task().clone();
        old.status = TaskStatus::Completed;
        old.finished = Some(now - chrono::Duration::hours(2));
        let mut new = got[1].task().clone();
        new.status = TaskStatus::Failed;
        new.finished = Some(now);
        store.put(&old, vec!["extra".into()]).await.unwrap();
        store.put(&new, vec![]).await.unwrap();
        assert_eq!(store.purge(now - chrono::Duration::hours(1)).await.unwrap(), 1);
        let left: Vec<_> = store.list().await.unwrap().into_iter().map(|t| t.id).collect();
        assert_eq!(left, vec![new.id, got[2].task().id]);
        assert_eq!(store.find(&old.key).await.unwrap(), None);
        assert_eq!(store.find("extra").await.unwrap(), None);
        assert_eq!(store.count().await.unwrap(), 2);
    }

    #[tokio::test]
    async fn results_wait_in_the_outbox_until_delivered_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let store = TaskStore::open(&path).unwrap();
        let mut t = store.insert(vec![new_task("h.io/a:1", true)]).await.unwrap()[0].task().clone();
        t.status = TaskStatus::Completed;
        let a1 = Undelivered::new("a", b"1".to_vec());
        let b1 = Undelivered::new("b", b"1".to_vec());
        let a2 = Undelivered::new("a", b"2".to_vec());
        store.put_with_results(&t, vec![], vec![a1.clone(), b1.clone(), a2.clone()]).await.unwrap();
        assert_eq!(store.get(t.id).await.unwrap().unwrap().status, TaskStatus::Completed);
        assert_eq!(store.undelivered("a", None, 10).await.unwrap(), vec![a1.clone(), a2.clone()]);
        assert_eq!(store.undelivered("a", None, 1).await.unwrap(), vec![a1.clone()]);
        assert_eq!(store.undelivered("a", Some(a1.key.clone()), 10).await.unwrap(), vec![a2.clone()]);
        assert_eq!(store.undelivered("ab", None, 10).await.unwrap(), vec![]);
        store.delivered(vec![a1.key.clone()]).await.unwrap();
        drop(store);
        let store = TaskStore::open(&path).unwrap();
        assert_eq!(store.undelivered("a", None, 10).await.unwrap(), vec![a2]);
        let counts = store.undelivered_counts().await.unwrap();
        assert_eq!(counts.into_iter().collect::<Vec<_>>(), vec![("a".to_string(), 1), ("b".to_string(), 1)]);
    }

    #[tokio::test]
    async fn many_concurrent_inserts_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(&dir.path().join("t.redb")).unwrap();
        let mut joins = Vec::new();
        for i in 0..200 {
            let s = store.clone();
            joins.push(tokio::spawn(async move { s.insert(vec![new_task(&format!("h.io/a:{}", i % 50), true)]).await.unwrap() }));
        }
        let mut created = 0;
        for j in joins {
            if matches!(j.await.unwrap()[0], Inserted::Created(_)) {
                created += 1;
            }
        }
        assert_eq!(created, 50);
        assert_eq!(store.list().await.unwrap().len(), 50);
    }
}
