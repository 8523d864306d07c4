//! Event sources: Harbor webhooks (served by the API) and message buses. One module per kind.
//!
//! A bus source reads messages and hands each to its [`Inbox`], which reads the body
//! ([`message::read_message`]), stores the tasks through [`Workers::accept`], and says what to
//! do with the message:
//! - [`Disposition::Ack`]: the tasks are on disk (or there was nothing to convert, or the
//!   message was malformed and has been logged, counted and dead-lettered). Acknowledge or
//!   commit it now, and not before. A dead letter that cannot be published is tried again
//!   (with backoff) until it is, so a malformed message is never acknowledged unrecorded.
//! - [`Disposition::Stop`]: acceld is stopping. Do not acknowledge; the bus delivers the
//!   message again, to this instance after its restart or to another one.
//!
//! A full queue or a failing task database is waited out inside the inbox (with backoff, and a
//! keep-alive for buses with an acknowledgement deadline), so the source stops fetching while
//! it waits: backpressure reaches the bus.
//!
//! With [`AckWhen::Finished`] the inbox also waits for the tasks to finish before it answers
//! `Ack` (sending keep-alives meanwhile). A bus that redelivers unacknowledged messages then
//! hands the work of an instance that died mid-conversion to another instance.

pub mod forward;
pub mod harbor;
pub mod kafka;
pub mod message;
pub mod nats;
pub mod poll;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::config::AckWhen;
use crate::config::{Config, SourceConfig};
use crate::pipeline::worker::SubmitError;
use crate::pipeline::{Event, Workers};

pub use message::{parse_message, read_message, MessageError, MessageKind, Parsed};
pub use status::{SourceState, SourceStatus, SourceStatuses};

/// One message as a bus delivered it.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub body: &'a [u8],
    /// The message's `Content-Type` header, when the bus carries headers.
    pub content_type: Option<&'a str>,
    /// Where it was read, for logs and dead letters: `subject images.pushed`, `topic t
    /// partition 0 offset 42`, `stream S sequence 7`.
    pub location: &'a str,
    /// The record's key, on buses with keys (Kafka); a dead letter keeps it.
    pub key: Option<&'a [u8]>,
    /// Its other text headers, which its dead letter carries on.
    pub headers: &'a [(&'a str, &'a str)],
}

/// What a source does with a message once its inbox is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Acknowledge (commit) it.
    Ack,
    /// acceld is stopping: leave it unacknowledged, to be delivered again.
    Stop,
}

/// A malformed message on its way to the dead-letter destination.
#[derive(Debug, Clone, Copy)]
pub struct Letter<'a> {
    /// Name of the source that read it.
    pub source: &'a str,
    pub body: &'a [u8],
    pub content_type: Option<&'a str>,
    /// Where it was read (see [`Message::location`]).
    pub location: &'a str,
    /// Why it is no usable event.
    pub reason: &'a str,
    /// The message's size when `body` holds only its first [`DEAD_LETTER_MAX_BODY`] bytes.
    pub truncated_from: Option<usize>,
    /// The message's key and headers ([`Message::key`], [`Message::headers`]).
    pub key: Option<&'a [u8]>,
    pub headers: &'a [(&'a str, &'a str)],
}

impl Letter<'_> {
    /// The message's own headers a letter carries on: all but those the letter sets itself,
    /// and the NATS server's own (`Nats-Msg-Id` would make a stream that deduplicates drop the
    /// letter as a copy of the message).
    pub fn carried_headers(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        let ours = [headers::ERROR, headers::SOURCE, headers::LOCATION, headers::TRUNCATED, "Content-Type"];
        self.headers
            .iter()
            .copied()
            .filter(move |(k, _)| !ours.iter().any(|o| o.eq_ignore_ascii_case(k)) && !k.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("nats-")))
    }
}

/// Header names a dead letter carries, on buses with headers.
pub mod headers {
    /// Why the message was refused.
    pub const ERROR: &str = "Accel-Error";
    /// Name of the source that read it.
    pub const SOURCE: &str = "Accel-Source";
    /// Where it was read.
    pub const LOCATION: &str = "Accel-Location";
    /// The message's size in bytes, when the letter carries only its beginning.
    pub const TRUNCATED: &str = "Accel-Truncated";
}

/// Where malformed messages are published (a NATS subject, a Kafka topic).
#[async_trait]
pub trait DeadLetter: Send + Sync + 'static {
    /// The destination, for logs (`subject images.dead`).
    fn target(&self) -> String;
    async fn publish(&self, letter: &Letter<'_>) -> Result<(), String>;
}

/// A dead letter carries at most this much of the message body (the whole message stays where
/// `Accel-Location` says), so that it fits the default message size limit of NATS and Kafka.
pub const DEAD_LETTER_MAX_BODY: usize = 512 * 1024;

/// Hands a source's messages to the workers. Cheap to clone.
#[derive(Clone)]
pub struct Inbox {
    source: Arc<str>,
    workers: Workers,
    dead_letter: Option<Arc<dyn DeadLetter>>,
    shutdown: CancellationToken,
    backoff_first: Duration,
    backoff_max: Duration,
    ack_when: AckWhen,
    keepalive_every: Duration,
    statuses: SourceStatuses,
    keep_on_stop: bool,
}

impl Inbox {
    /// The inbox of source `name`; malformed messages go to `dead_letter` when given.
    pub fn new(name: &str, workers: Workers, dead_letter: Option<Arc<dyn DeadLetter>>, shutdown: CancellationToken) -> Inbox {
        Inbox {
            source: name.into(),
            workers,
            dead_letter,
            shutdown,
            backoff_first: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            ack_when: AckWhen::Stored,
            keepalive_every: Duration::from_secs(10),
            statuses: SourceStatuses::default(),
            keep_on_stop: false,
        }
    }

    /// For a bus that does not deliver a message again (core NATS): a message that arrives
    /// while acceld stops has its tasks stored for the next start instead of being left.
    pub fn keep_on_stop(mut self) -> Inbox {
        self.keep_on_stop = true;
        self
    }

    /// When messages count as done; with [`AckWhen::Finished`], `keepalive` runs every
    /// `keepalive_every` while the tasks run.
    pub fn ack_when(mut self, when: AckWhen, keepalive_every: Duration) -> Inbox {
        self.ack_when = when;
        self.keepalive_every = keepalive_every.max(Duration::from_millis(10));
        self
    }

    /// Waits between tries when the queue is full or the task database fails.
    pub fn with_backoff(mut self, first: Duration, max: Duration) -> Inbox {
        self.backoff_first = first;
        self.backoff_max = max;
        self
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn workers(&self) -> &Workers {
        &self.workers
    }

    /// Where the source's state is shown (health, metrics); a source may say there that its
    /// bus cannot be reached ([`SourceStatuses::disconnected`]).
    pub fn statuses(&self) -> &SourceStatuses {
        &self.statuses
    }

    /// Handles one message; see the module docs.
    pub async fn handle(&self, msg: &Message<'_>) -> Disposition {
        self.handle_keepalive(msg, || async {}).await
    }

    /// Like [`handle`](Self::handle); `keepalive` runs before each wait for room in the queue,
    /// so a bus with an acknowledgement deadline (JetStream `in_progress`) keeps the message.
    pub async fn handle_keepalive<F, Fut>(&self, msg: &Message<'_>, keepalive: F) -> Disposition
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let metrics = self.workers.metrics();
        let parsed = match read_message(msg.body, msg.content_type, &self.source) {
            Ok(p) => p,
            Err(e) => return self.malformed(msg, &e, &keepalive).await,
        };
        for why in &parsed.ignored {
            tracing::debug!(source = %self.source, at = %msg.location, "ignored: {why}");
        }
        if parsed.events.is_empty() {
            metrics.source_message(&self.source, "ignored");
            return Disposition::Ack;
        }
        let mut failures = 0u32;
        loop {
            match self.workers.accept(&parsed.events).await {
                Ok(accepted) => {
                    let created = accepted.tasks.iter().filter(|t| t.created).count();
                    tracing::debug!(source = %self.source, at = %msg.location, "{created} task(s) created, {} already known, {} image(s) skipped",
                        accepted.tasks.len() - created, accepted.skipped.len());
                    metrics.source_message(&self.source, "accepted");
                    if self.ack_when == AckWhen::Finished {
                        for t in accepted.tasks.iter().filter(|t| !t.task.status.is_finished()) {
                            let wait = self.workers.wait(t.task.id);
                            tokio::pin!(wait);
                            loop {
                                tokio::select! {
                                    done = &mut wait => match done {
                                        Some(_) => break,
                                        // Stopped first: the task stays stored here, and the bus
                                        // may hand the message to another instance.
                                        None => return Disposition::Stop,
                                    },
                                    _ = tokio::time::sleep(self.keepalive_every) => keepalive().await,
                                }
                            }
                        }
                    }
                    return Disposition::Ack;
                }
                Err(SubmitError::ShuttingDown) => return self.stopping(&parsed.events, msg).await,
                Err(e) => {
                    failures += 1;
                    metrics.source_message(&self.source, if matches!(e, SubmitError::QueueFull { .. }) { "queue_full" } else { "store_error" });
                    let wait = self.backoff_first.saturating_mul(1u32.checked_shl(failures - 1).unwrap_or(u32::MAX)).min(self.backoff_max);
                    if failures == 1 || failures % 20 == 0 {
                        tracing::warn!(source = %self.source, at = %msg.location, "cannot take the message yet (try {failures}), waiting {wait:?}: {e}");
                    }
                    keepalive().await;
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.cancelled() => return self.stopping(&parsed.events, msg).await,
                    }
                }
            }
        }
    }

    /// A message whose tasks acceld, stopping, no longer queues: left to its bus, or, with
    /// [`keep_on_stop`](Self::keep_on_stop), stored for the next start.
    async fn stopping(&self, events: &[Event], msg: &Message<'_>) -> Disposition {
        if !self.keep_on_stop {
            return Disposition::Stop;
        }
        match self.workers.accept_for_later(events).await {
            Ok(_) => {
                self.workers.metrics().source_message(&self.source, "accepted");
                Disposition::Ack
            }
            Err(e) => {
                tracing::warn!(source = %self.source, at = %msg.location, "acceld is stopping and cannot store the message's tasks: {e}");
                Disposition::Stop
            }
        }
    }

    /// Logs, counts and dead-letters a message that is no usable event. Publishing the letter
    /// is tried again, with backoff, until it works or acceld stops (then the message stays
    /// unacknowledged and is read again).
    async fn malformed<F, Fut>(&self, msg: &Message<'_>, e: &MessageError, keepalive: &F) -> Disposition
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let metrics = self.workers.metrics();
        metrics.source_message(&self.source, "malformed");
        let reason = e.to_string();
        let Some(dl) = &self.dead_letter else {
            tracing::warn!(source = %self.source, at = %msg.location, "dropping a malformed message: {reason}");
            return Disposition::Ack;
        };
        let (body, truncated_from) = match msg.body.len() {
            n if n > DEAD_LETTER_MAX_BODY => (&msg.body[..DEAD_LETTER_MAX_BODY], Some(n)),
            _ => (msg.body, None),
        };
        let letter = Letter { source: &self.source, body, content_type: msg.content_type, location: msg.location, reason: &reason, truncated_from, key: msg.key, headers: msg.headers };
        let mut failures = 0u32;
        loop {
            match dl.publish(&letter).await {
                Ok(()) => {
                    metrics.source_message(&self.source, "dead_lettered");
                    tracing::warn!(source = %self.source, at = %msg.location, "malformed message sent to {}: {reason}", dl.target());
                    return Disposition::Ack;
                }
                Err(why) => {
                    failures += 1;
                    metrics.source_message(&self.source, "dead_letter_failed");
                    let wait = self.backoff_first.saturating_mul(1u32.checked_shl(failures - 1).unwrap_or(u32::MAX)).min(self.backoff_max);
                    if failures == 1 || failures % 20 == 0 {
                        tracing::warn!(source = %self.source, at = %msg.location,
                            "cannot send a malformed message to {} (try {failures}), holding it and trying again in {wait:?}: {why}", dl.target());
                    }
                    keepalive().await;
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.cancelled() => return Disposition::Stop,
                    }
                }
            }
        }
    }
}

/// Why a source cannot start or go on.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source {source_name:?}: cannot connect to {url}: {why}")]
    Connect { source_name: String, url: String, why: String },
    #[error("source {source_name:?}: {why}")]
    Setup { source_name: String, why: String },
    #[error("source {source_name:?}: {why}")]
    Read { source_name: String, why: String },
}

/// A running bus source.
#[async_trait]
pub trait Source: Send + Sync + 'static {
    fn name(&self) -> &str;
    /// Reads messages into `inbox` until `shutdown`. An error ends this run; the source is
    /// run again after a pause (the bus redelivers what was not acknowledged).
    async fn run(&self, inbox: &Inbox, shutdown: &CancellationToken) -> Result<(), SourceError>;
}

/// What building a source may use.
pub struct SourceContext {
    pub workers: Workers,
    pub shutdown: CancellationToken,
}

/// Builds the source `name`: connects and checks what it needs (a missing stream is an error
/// here, at start-up). `None` for kinds that are not read in a loop (Harbor webhooks arrive
/// through the API).
pub async fn build(name: &str, config: &SourceConfig, ctx: &SourceContext) -> Result<Option<(Arc<dyn Source>, Inbox)>, SourceError> {
    match config {
        SourceConfig::Harbor { .. } => Ok(None),
        // Needs the registry settings and target suffixes of the whole config: `start_all`
        // builds it with `poll::PollSource::build`.
        SourceConfig::Poll(_) => Ok(None),
        SourceConfig::Nats(c) => nats::NatsSource::build(name, c, ctx).await.map(Some),
        SourceConfig::Jetstream(c) => nats::JetStreamSource::build(name, c, ctx).await.map(Some),
        SourceConfig::Kafka(c) => kafka::KafkaSource::build(name, c, ctx).await.map(Some),
    }
}

/// Bus sources running in the background.
pub struct Running {
    loops: Vec<(String, JoinHandle<()>)>,
    statuses: SourceStatuses,
}

/// How long a run must last after a failure before the source counts as reading again.
const RUN_SETTLED: Duration = Duration::from_secs(5);

/// Longest pause before a failed source runs again.
const RESTART_MAX: Duration = Duration::from_secs(30);

/// Builds and starts every source of the config; the first that cannot be built fails
/// start-up (those already built are stopped).
pub async fn start_all(config: &Config, ctx: &SourceContext) -> Result<Running, SourceError> {
    let mut built = Vec::new();
    for (name, c) in &config.sources {
        let source = match c {
            SourceConfig::Poll(p) => Some(poll::PollSource::build(name, p, config, ctx).await?),
            other => build(name, other, ctx).await?,
        };
        if let Some(s) = source {
            built.push(s);
        }
    }
    let mut loops = Vec::new();
    let statuses = SourceStatuses::default();
    for (source, mut inbox) in built {
        inbox.statuses = statuses.clone();
        let shutdown = ctx.shutdown.clone();
        let name = source.name().to_string();
        loops.push((name, tokio::spawn(supervise(source, inbox, statuses.clone(), shutdown))));
    }
    Ok(Running { loops, statuses })
}

async fn supervise(source: Arc<dyn Source>, inbox: Inbox, statuses: SourceStatuses, shutdown: CancellationToken) {
    let mut failures = 0u32;
    loop {
        let started = std::time::Instant::now();
        let run = source.run(&inbox, &shutdown);
        tokio::pin!(run);
        // After a failure the source counts as reading again once a run has lasted a while,
        // not as soon as it is started: a run that fails at once keeps it `restarting`.
        let result = if failures == 0 {
            statuses.reading(source.name(), 0);
            run.await
        } else {
            tokio::select! {
                r = &mut run => r,
                _ = tokio::time::sleep(RUN_SETTLED) => {
                    statuses.reading(source.name(), failures);
                    run.await
                }
            }
        };
        let why = match result {
            Ok(()) if shutdown.is_cancelled() => return,
            Ok(()) => {
                tracing::warn!(source = %source.name(), "the source stopped reading; starting it again");
                "the source stopped reading".to_string()
            }
            Err(e) => {
                tracing::error!(source = %source.name(), "{e}; starting it again");
                e.to_string()
            }
        };
        if started.elapsed() > RESTART_MAX * 2 {
            failures = 0;
        }
        failures += 1;
        statuses.restarting(source.name(), failures, why);
        let wait = Duration::from_millis(500).saturating_mul(1u32.checked_shl(failures - 1).unwrap_or(u32::MAX)).min(RESTART_MAX);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

impl Running {
    /// No sources.
    pub fn none() -> Running {
        Running { loops: Vec::new(), statuses: SourceStatuses::default() }
    }

    /// What each source is doing, kept current while they run.
    pub fn statuses(&self) -> SourceStatuses {
        self.statuses.clone()
    }

    /// Names of the running sources.
    pub fn names(&self) -> Vec<String> {
        self.loops.iter().map(|(n, _)| n.clone()).collect()
    }

    /// After the shutdown token is cancelled: waits up to `within` for the sources to stop
    /// reading (a message being handled is acknowledged or left for redelivery), then ends
    /// them.
    pub async fn stop(self, within: Duration) {
        for (name, mut h) in self.loops {
            if tokio::time::timeout(within, &mut h).await.is_err() {
                tracing::warn!(source = %name, "source did not stop within {within:?}; ending it");
                h.abort();
                let _ = h.await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Reference;
    use crate::pipeline::convert::{ConvertError, ConvertResult};
    use crate::pipeline::metrics::TaskMetrics;
    use crate::pipeline::tasks::TaskStore;
    use crate::pipeline::worker::{Resolved, Runner, WorkerOptions};
    use crate::pipeline::{Plan, Router};
    use std::sync::Mutex;

    /// Resolves every source; conversions wait until the test ends (the queue stays full).
    struct Stuck;

    #[async_trait]
    impl Runner for Stuck {
        async fn resolve(&self, source: &Reference) -> Result<Resolved, ConvertError> {
            Ok(Resolved { digest: crate::oci::Digest::of(source.to_string().as_bytes()), converted_from: None })
        }
        async fn convert(&self, _: &Plan, _: &Reference) -> Result<ConvertResult, ConvertError> {
            std::future::pending().await
        }
    }

    #[derive(Default)]
    struct Letters(Mutex<Vec<(String, String)>>);

    #[async_trait]
    impl DeadLetter for Letters {
        fn target(&self) -> String {
            "test letters".into()
        }
        async fn publish(&self, l: &Letter<'_>) -> Result<(), String> {
            self.0.lock().unwrap().push((String::from_utf8_lossy(l.body).into_owned(), l.reason.to_string()));
            Ok(())
        }
    }

    /// Refuses the first `fail` letters (all of them with `u32::MAX`), then keeps them.
    struct Flaky {
        fail: std::sync::atomic::AtomicU32,
        tries: std::sync::atomic::AtomicU32,
        kept: Mutex<Vec<(usize, Option<usize>)>>,
    }

    impl Flaky {
        fn new(fail: u32) -> Arc<Flaky> {
            Arc::new(Flaky { fail: fail.into(), tries: 0.into(), kept: Mutex::default() })
        }
    }

    #[async_trait]
    impl DeadLetter for Flaky {
        fn target(&self) -> String {
            "flaky letters".into()
        }
        async fn publish(&self, l: &Letter<'_>) -> Result<(), String> {
            use std::sync::atomic::Ordering;
            self.tries.fetch_add(1, Ordering::SeqCst);
            let left = self.fail.load(Ordering::SeqCst);
            if left > 0 {
                if left != u32::MAX {
                    self.fail.store(left - 1, Ordering::SeqCst);
                }
                return Err("broker said no".into());
            }
            self.kept.lock().unwrap().push((l.body.len(), l.truncated_from));
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_dead_letter_that_fails_is_tried_again_and_the_message_held_until_it_is_kept() {
        let flaky = Flaky::new(4);
        let (inbox, _stop, _dir) = inbox(8, Some(flaky.clone() as Arc<dyn DeadLetter>)).await;
        assert_eq!(inbox.handle(&msg("{oops")).await, Disposition::Ack);
        assert_eq!(flaky.tries.load(std::sync::atomic::Ordering::SeqCst), 5);
        assert_eq!(*flaky.kept.lock().unwrap(), vec![(5, None)]);
        let m = inbox.workers().metrics();
        assert_eq!((m.source_messages("bus", "dead_letter_failed"), m.source_messages("bus", "dead_lettered")), (4, 1));

        // A letter that never goes out holds the message until acceld stops; it is then left
        // unacknowledged, to be read again.
        let never = Flaky::new(u32::MAX);
        let (inbox, stop, _dir) = self::inbox(8, Some(never.clone() as Arc<dyn DeadLetter>)).await;
        let held = tokio::spawn(async move { inbox.handle(&msg("{oops")).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!held.is_finished(), "acknowledged although the dead letter was not kept");
        assert!(never.tries.load(std::sync::atomic::Ordering::SeqCst) > 2);
        stop.cancel();
        assert_eq!(held.await.unwrap(), Disposition::Stop);
    }

    #[tokio::test]
    async fn a_large_malformed_message_is_dead_lettered_with_its_beginning_and_size() {
        let kept = Flaky::new(0);
        let (inbox, _stop, _dir) = inbox(8, Some(kept.clone() as Arc<dyn DeadLetter>)).await;
        let big = "x".repeat(DEAD_LETTER_MAX_BODY + 10);
        assert_eq!(inbox.handle(&msg(&big)).await, Disposition::Ack);
        let small = "y".repeat(DEAD_LETTER_MAX_BODY);
        assert_eq!(inbox.handle(&msg(&small)).await, Disposition::Ack);
        assert_eq!(*kept.kept.lock().unwrap(), vec![(DEAD_LETTER_MAX_BODY, Some(DEAD_LETTER_MAX_BODY + 10)), (DEAD_LETTER_MAX_BODY, None)]);
    }

    async fn inbox(queue_size: usize, letters: Option<Arc<dyn DeadLetter>>) -> (Inbox, CancellationToken, tempfile::TempDir) {
        let config = Config::parse("pipelines: [{ name: p, convert: [{ driver: estargz }] }]", "t", &|_| None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(&dir.path().join("t.redb")).unwrap();
        let mut options = WorkerOptions::from_config(&config);
        options.queue_size = queue_size;
        options.grace = Duration::from_millis(10);
        let shutdown = CancellationToken::new();
        let router = Router::new(&config, Plan::all(&config).unwrap());
        let workers = Workers::start(store, Arc::new(Stuck), router, options, Arc::new(TaskMetrics::default()), None, shutdown.clone()).await.unwrap();
        let inbox = Inbox::new("bus", workers, letters, shutdown.clone()).with_backoff(Duration::from_millis(5), Duration::from_millis(20));
        (inbox, shutdown, dir)
    }

    fn msg(body: &str) -> Message<'_> {
        Message { body: body.as_bytes(), content_type: None, location: "subject t", key: None, headers: &[] }
    }

    #[tokio::test]
    async fn events_are_stored_before_the_ack() {
        let (inbox, _stop, _dir) = inbox(8, None).await;
        assert_eq!(inbox.handle(&msg(r#"{"reference":"h.io/a/b:1"}"#)).await, Disposition::Ack);
        let tasks = inbox.workers().store().list().await.unwrap();
        assert_eq!(tasks.len(), 1);
        assert_eq!((tasks[0].source.to_string().as_str(), tasks[0].origin.as_str()), ("h.io/a/b:1", "bus"));
        assert_eq!(inbox.workers().metrics().source_messages("bus", "accepted"), 1);
        // Nothing to convert in it: acknowledged and counted as ignored.
        assert_eq!(inbox.handle(&msg(r#"{"type":"PULL_ARTIFACT","event_data":{}}"#)).await, Disposition::Ack);
        assert_eq!(inbox.workers().metrics().source_messages("bus", "ignored"), 1);
    }

    #[tokio::test]
    async fn malformed_messages_are_dead_lettered_counted_and_acked() {
        let letters = Arc::new(Letters::default());
        let (inbox, _stop, _dir) = inbox(8, Some(letters.clone() as Arc<dyn DeadLetter>)).await;
        for body in ["{oops", r#"{"reference":"nginx"}"#, r#"{"x":1}"#] {
            assert_eq!(inbox.handle(&msg(body)).await, Disposition::Ack);
        }
        let got = letters.0.lock().unwrap().clone();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].0, "{oops");
        assert!(got[0].1.contains("not valid JSON"), "{got:?}");
        assert!(got[1].1.contains("reference"), "{got:?}");
        let m = inbox.workers().metrics();
        assert_eq!((m.source_messages("bus", "malformed"), m.source_messages("bus", "dead_lettered")), (3, 3));
        assert!(inbox.workers().store().list().await.unwrap().is_empty());
        // The inbox goes on with good messages.
        assert_eq!(inbox.handle(&msg(r#"{"reference":"h.io/a/b:2"}"#)).await, Disposition::Ack);
        assert_eq!(inbox.workers().store().list().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_full_queue_is_waited_out_with_keepalives_and_shutdown_leaves_the_message() {
        // One running (stuck) conversion and one queued fill a queue of one.
        let (inbox, stop, _dir) = inbox(1, None).await;
        for i in 0..2 {
            assert_eq!(inbox.handle(&msg(&format!(r#"{{"reference":"h.io/a/b:{i}"}}"#))).await, Disposition::Ack);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pings = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let p = pings.clone();
        let waiting = {
            let inbox = inbox.clone();
            tokio::spawn(async move {
                let body = r#"{"reference":"h.io/a/b:9"}"#;
                inbox
                    .handle_keepalive(&Message { body: body.as_bytes(), content_type: None, location: "t", key: None, headers: &[] }, move || {
                        p.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        async {}
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!waiting.is_finished(), "the message waits for room");
        assert!(pings.load(std::sync::atomic::Ordering::SeqCst) >= 2);
        stop.cancel();
        assert_eq!(waiting.await.unwrap(), Disposition::Stop);
        assert_eq!(inbox.workers().store().list().await.unwrap().len(), 2, "the waiting message created no task");
        assert!(inbox.workers().metrics().source_messages("bus", "queue_full") >= 2);
    }
}
