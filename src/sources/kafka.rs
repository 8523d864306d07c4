//! Kafka source: topics read through a consumer group, so instances with the same group share
//! the partitions.
//!
//! Offsets are committed by acceld, never automatically: each message goes to the [`Inbox`],
//! messages are handled concurrently (up to `max_in_flight`), and a partition's committed
//! offset moves only over the contiguous run of messages that are done ([`offsets`]). With
//! `ack: finished` that means converted, so the partitions of an instance that dies go to
//! another one, which reads the unfinished messages again. At `max_in_flight` the source stops
//! fetching until a message is done.
//!
//! Rebalances: a revoked partition gets its settled offset committed and is forgotten; its
//! work still running commits nothing afterwards.

pub mod offsets;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::offsets::{Offsets, Partition};
use super::{headers, DeadLetter, Disposition, Inbox, Letter, Message, Source, SourceContext, SourceError, SourceStatuses};
use crate::bus::kafka::{check_topics, client_config, describe_brokers, Publisher};
use crate::config::KafkaSourceConfig;

/// How long start-up checks (metadata of the topics) may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a source whose brokers do not answer asks them again.
const PROBE_EVERY: Duration = Duration::from_secs(3);
/// Read errors in a row after which the consumer is set up again.
const MAX_READ_ERRORS: u32 = 10;

/// Malformed messages published to a Kafka topic, the reason in `Accel-Error`.
struct KafkaDeadLetter {
    publisher: Publisher,
}

#[async_trait]
impl DeadLetter for KafkaDeadLetter {
    fn target(&self) -> String {
        self.publisher.describe()
    }

    async fn publish(&self, letter: &Letter<'_>) -> Result<(), String> {
        let mut h: Vec<(&str, &str)> = letter.carried_headers().collect();
        h.extend([(headers::ERROR, letter.reason), (headers::SOURCE, letter.source), (headers::LOCATION, letter.location)]);
        let size = letter.truncated_from.map(|n| n.to_string());
        if let Some(ct) = letter.content_type {
            h.push(("Content-Type", ct));
        }
        if let Some(n) = &size {
            h.push((headers::TRUNCATED, n));
        }
        self.publisher.publish(letter.key, &h, letter.body).await
    }
}

/// Consumer callbacks: rebalances update the offset tracking; librdkafka's log goes to ours;
/// losing every broker shows in the source's status (and its repeated errors go to debug).
struct GroupContext {
    source: String,
    offsets: Arc<Mutex<Offsets>>,
    statuses: SourceStatuses,
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, line: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error
                if self.statuses.is_disconnected(&self.source) =>
            {
                tracing::debug!(source = %self.source, "kafka: {fac} {line}")
            }
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(source = %self.source, "kafka: {fac} {line}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(source = %self.source, "kafka: {fac} {line}"),
            _ => tracing::debug!(source = %self.source, "kafka: {fac} {line}"),
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            if !self.statuses.is_disconnected(&self.source) {
                tracing::warn!(source = %self.source, "no Kafka broker answers ({reason}); still trying");
            }
            self.statuses.disconnected(&self.source, format!("no Kafka broker answers: {reason}"));
        } else if self.statuses.is_disconnected(&self.source) {
            tracing::debug!(source = %self.source, "kafka: {error}: {reason}");
        } else {
            tracing::warn!(source = %self.source, "kafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let mut commit = TopicPartitionList::new();
                {
                    let mut offsets = self.offsets.lock().unwrap();
                    for e in tpl.elements() {
                        if let Some(o) = offsets.revoke(&(e.topic().to_string(), e.partition())) {
                            let _ = commit.add_partition_offset(e.topic(), e.partition(), Offset::Offset(o));
                        }
                    }
                }
                tracing::info!(source = %self.source, "partitions revoked: {}", list(tpl));
                if commit.count() > 0 {
                    if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
                        tracing::warn!(source = %self.source, "committing revoked partitions failed (their done messages may be read again): {e}");
                    }
                }
            }
            Rebalance::Assign(tpl) => {
                let mut offsets = self.offsets.lock().unwrap();
                for e in tpl.elements() {
                    offsets.assign((e.topic().to_string(), e.partition()));
                }
                tracing::info!(source = %self.source, "partitions assigned: {}", list(tpl));
            }
            Rebalance::Error(e) => tracing::warn!(source = %self.source, "rebalance failed: {e}"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(source = %self.source, "committing offsets {} failed: {e}", list(offsets));
        }
    }
}

fn list(tpl: &TopicPartitionList) -> String {
    let parts: Vec<String> = tpl
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => format!("{}[{}]@{o}", e.topic(), e.partition()),
            _ => format!("{}[{}]", e.topic(), e.partition()),
        })
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

type GroupConsumer = StreamConsumer<GroupContext>;

/// A consumer group member reading the configured topics.
pub struct KafkaSource {
    name: String,
    config: KafkaSourceConfig,
    topics: Vec<String>,
}

impl KafkaSource {
    /// Checks that the brokers answer and the topics (and the dead-letter topic) exist.
    pub async fn build(name: &str, config: &KafkaSourceConfig, ctx: &SourceContext) -> Result<(Arc<dyn Source>, Inbox), SourceError> {
        let setup = |why: String| SourceError::Setup { source_name: name.into(), why };
        let conn = config.connection();
        let brokers = describe_brokers(&conn);
        let topics = config.all_topics();
        let mut check = topics.clone();
        check.extend(config.dead_letter_topic.iter().cloned());
        let c = conn.clone();
        let checked = tokio::task::spawn_blocking(move || check_topics(&c, &check, SETUP_TIMEOUT)).await.map_err(|e| setup(e.to_string()))?;
        checked.map_err(|why| {
            if why.starts_with("cannot reach") {
                SourceError::Connect { source_name: name.into(), url: brokers.clone(), why }
            } else {
                setup(why)
            }
        })?;
        let dead_letter = match &config.dead_letter_topic {
            Some(t) => {
                let publisher = Publisher::new(&conn, t, SETUP_TIMEOUT).map_err(setup)?;
                Some(Arc::new(KafkaDeadLetter { publisher }) as Arc<dyn DeadLetter>)
            }
            None => None,
        };
        // Kafka has no per-message deadline: the keep-alive only paces the waits.
        let inbox = Inbox::new(name, ctx.workers.clone(), dead_letter, ctx.shutdown.clone()).ack_when(config.ack, Duration::from_secs(30));
        Ok((Arc::new(KafkaSource { name: name.into(), config: config.clone(), topics }), inbox))
    }

    fn consumer(&self, offsets: Arc<Mutex<Offsets>>, statuses: SourceStatuses) -> Result<Arc<GroupConsumer>, String> {
        let c = &self.config;
        let mut cfg = client_config(&c.connection());
        cfg.set("group.id", &c.group);
        cfg.set("enable.auto.commit", "false");
        cfg.set("enable.auto.offset.store", "false");
        cfg.set("session.timeout.ms", (c.session_timeout_secs * 1000).to_string());
        // The source stops polling while `max_in_flight` messages are being handled (conversions
        // with `ack: finished` can take long); librdkafka would otherwise leave the group.
        cfg.set("max.poll.interval.ms", (c.max_poll_interval_secs * 1000).to_string());
        if cfg.get("heartbeat.interval.ms").is_none() {
            cfg.set("heartbeat.interval.ms", (c.session_timeout_secs * 1000 / 3).max(100).to_string());
        }
        // A new group starts at the oldest event, not only at those published from now on.
        if cfg.get("auto.offset.reset").is_none() {
            cfg.set("auto.offset.reset", "earliest");
        }
        let ctx = GroupContext { source: self.name.clone(), offsets, statuses };
        let consumer: GroupConsumer =
            cfg.create_with_context(ctx).map_err(|e| format!("cannot set up a Kafka consumer for {}: {e}", describe_brokers(&c.connection())))?;
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|e| format!("cannot subscribe to {topics:?}: {e}"))?;
        Ok(Arc::new(consumer))
    }
}

/// Commits what settled since the last commit (asynchronously: a failure is logged and the
/// offset goes out with the next commit or at revocation).
fn commit_settled(consumer: &GroupConsumer, offsets: &Mutex<Offsets>) {
    let commits = offsets.lock().unwrap().take_commits();
    if commits.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), o) in &commits {
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*o));
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::debug!("committing {} failed, trying again later: {e}", list(&tpl));
        offsets.lock().unwrap().retry_commits(commits);
    }
}

/// Why a consumer's run ended.
enum End {
    /// acceld is stopping.
    Stopped,
    /// Leave the group and join again (a partition of another member stalled).
    Rejoin,
}

/// Partitions held by other members, watched for progress while this member is idle.
#[derive(Default)]
struct Stalls {
    /// Committed offset as last seen, and since when it has not moved.
    seen: HashMap<Partition, (i64, Instant)>,
}

impl Stalls {
    /// Looks at the partitions this member does not hold; returns one that has messages left
    /// and whose committed offset has not moved for `limit`.
    fn check(&mut self, consumer: &GroupConsumer, topics: &[String], limit: Duration) -> Result<Option<(Partition, i64, i64)>, String> {
        let timeout = SETUP_TIMEOUT;
        let assigned: Vec<Partition> =
            consumer.assignment().map_err(|e| e.to_string())?.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        let mut others = TopicPartitionList::new();
        for t in topics {
            let md = consumer.fetch_metadata(Some(t), timeout).map_err(|e| e.to_string())?;
            for mt in md.topics() {
                for p in mt.partitions() {
                    if !assigned.contains(&(mt.name().to_string(), p.id())) {
                        others.add_partition(mt.name(), p.id());
                    }
                }
            }
        }
        if others.count() == 0 {
            self.seen.clear();
            return Ok(None);
        }
        let committed = consumer.committed_offsets(others, timeout).map_err(|e| e.to_string())?;
        let now = Instant::now();
        let mut stalled = None;
        let mut still = HashMap::new();
        for e in committed.elements() {
            let p = (e.topic().to_string(), e.partition());
            let (low, high) = consumer.fetch_watermarks(e.topic(), e.partition(), timeout).map_err(|e| e.to_string())?;
            let at = match e.offset() {
                Offset::Offset(o) => o,
                _ => low,
            };
            if at >= high {
                continue;
            }
            let since = match self.seen.get(&p) {
                Some((o, since)) if *o == at => *since,
                _ => now,
            };
            if now.duration_since(since) >= limit && stalled.is_none() {
                stalled = Some((p.clone(), at, high));
            }
            still.insert(p, (at, since));
        }
        self.seen = still;
        Ok(stalled)
    }
}

impl KafkaSource {
    async fn run_consumer(&self, inbox: &Inbox, shutdown: &CancellationToken) -> Result<End, SourceError> {
        let read_err = |why: String| SourceError::Read { source_name: self.name.clone(), why };
        let offsets = Arc::new(Mutex::new(Offsets::new()));
        let consumer = self.consumer(offsets.clone(), inbox.statuses().clone()).map_err(read_err)?;
        tracing::info!(source = %self.name, "reading Kafka topic(s) {} in consumer group {}", self.topics.join(", "), self.config.group);
        let slots = Arc::new(Semaphore::new(self.config.max_in_flight));
        let mut running = JoinSet::new();
        let mut errors = 0u32;
        let rejoin_after = Duration::from_secs(self.config.rejoin_stalled_secs);
        let mut stall_tick = tokio::time::interval(Duration::from_secs(self.config.session_timeout_secs.max(1)));
        stall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stalls = Arc::new(Mutex::new(Stalls::default()));
        // While no broker answers, a metadata request now and then tells when one is back (with
        // no message to read there is no other sign).
        let mut probe_tick = tokio::time::interval(PROBE_EVERY);
        probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            let next = async {
                let permit = slots.clone().acquire_owned().await.expect("never closed");
                (permit, consumer.recv().await.map(|m| m.detach()))
            };
            let (permit, msg) = tokio::select! {
                _ = shutdown.cancelled() => break Ok(End::Stopped),
                _ = probe_tick.tick(), if inbox.statuses().is_disconnected(&self.name) => {
                    let c = consumer.clone();
                    let answered = tokio::task::spawn_blocking(move || c.fetch_metadata(None, PROBE_EVERY).is_ok()).await.unwrap_or(false);
                    if answered {
                        tracing::info!(source = %self.name, "the Kafka brokers answer again");
                        inbox.statuses().connected(&self.name);
                    }
                    continue;
                }
                _ = stall_tick.tick(), if !rejoin_after.is_zero() => {
                    while running.try_join_next().is_some() {}
                    if !running.is_empty() || offsets.lock().unwrap().in_flight() > 0 {
                        continue;
                    }
                    let (c, s, topics) = (consumer.clone(), stalls.clone(), self.topics.clone());
                    let found = tokio::task::spawn_blocking(move || s.lock().unwrap().check(&c, &topics, rejoin_after)).await;
                    match found {
                        Ok(Ok(Some(((topic, partition), at, high)))) => {
                            tracing::warn!(source = %self.name,
                                "partition {topic}[{partition}] is held by another member but has not moved from offset {at} (end {high}) for {rejoin_after:?}; leaving and joining group {} again", self.config.group);
                            break Ok(End::Rejoin);
                        }
                        Ok(Ok(None)) => {}
                        Ok(Err(e)) => tracing::debug!(source = %self.name, "looking at the group's progress: {e}"),
                        Err(e) => tracing::debug!(source = %self.name, "looking at the group's progress: {e}"),
                    }
                    continue;
                }
                m = next => m,
            };
            let msg = match msg {
                Ok(m) => {
                    errors = 0;
                    if inbox.statuses().is_disconnected(&self.name) {
                        tracing::info!(source = %self.name, "the Kafka brokers answer again");
                        inbox.statuses().connected(&self.name);
                    }
                    m
                }
                // Setting the consumer up again would not help: wait, and say so in health.
                Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) => {
                    inbox.statuses().disconnected(&self.name, format!("no Kafka broker answers: {e}"));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => {
                    errors += 1;
                    tracing::warn!(source = %self.name, "reading Kafka: {e}");
                    if errors >= MAX_READ_ERRORS {
                        break Err(read_err(format!("{errors} read errors in a row, the last: {e}")));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            while running.try_join_next().is_some() {}
            let Some(ticket) = offsets.lock().unwrap().begin((msg.topic().to_string(), msg.partition()), msg.offset()) else {
                tracing::debug!(source = %self.name, "skipping a message of {}[{}], no longer assigned", msg.topic(), msg.partition());
                continue;
            };
            let (inbox, name, consumer, offsets) = (inbox.clone(), self.name.clone(), consumer.clone(), offsets.clone());
            running.spawn(async move {
                let _permit = permit;
                let location = format!("topic {} partition {} offset {}", msg.topic(), msg.partition(), msg.offset());
                let ct = msg.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key.eq_ignore_ascii_case("content-type"))
                        .and_then(|h| h.value)
                        .and_then(|v| std::str::from_utf8(v).ok().map(String::from))
                });
                let texts: Vec<(&str, &str)> = msg
                    .headers()
                    .map(|h| h.iter().filter_map(|h| Some((h.key, std::str::from_utf8(h.value?).ok()?))).collect())
                    .unwrap_or_default();
                let m = Message { body: msg.payload().unwrap_or_default(), content_type: ct.as_deref(), location: &location, key: msg.key(), headers: &texts };
                match inbox.handle(&m).await {
                    Disposition::Ack => {
                        let moved = offsets.lock().unwrap().settle(&ticket);
                        if moved.is_some() {
                            commit_settled(&consumer, &offsets);
                        }
                    }
                    // Left uncommitted: read again after the restart, or by another member.
                    Disposition::Stop => tracing::debug!(source = %name, at = %location, "not committed: acceld is stopping"),
                }
            });
        };
        // Messages being handled end now (stored, or left for the next reader).
        while running.join_next().await.is_some() {}
        let settled = offsets.lock().unwrap().settled();
        if !settled.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for ((topic, partition), o) in &settled {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*o));
            }
            let c = consumer.clone();
            let committed = tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync)).await;
            match committed {
                Ok(Ok(())) => tracing::info!(source = %self.name, "committed offsets {}", describe(&settled)),
                Ok(Err(e)) => tracing::warn!(source = %self.name, "final commit failed (done messages may be read again): {e}"),
                Err(e) => tracing::warn!(source = %self.name, "final commit failed: {e}"),
            }
        }
        // Dropping the consumer leaves the group (its partitions go to the other members).
        tokio::task::spawn_blocking(move || drop(consumer)).await.ok();
        result
    }
}

fn describe(offsets: &[(Partition, i64)]) -> String {
    offsets.iter().map(|((t, p), o)| format!("{t}[{p}]@{o}")).collect::<Vec<_>>().join(", ")
}

#[async_trait]
impl Source for KafkaSource {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(&self, inbox: &Inbox, shutdown: &CancellationToken) -> Result<(), SourceError> {
        loop {
            match self.run_consumer(inbox, shutdown).await? {
                End::Stopped => return Ok(()),
                End::Rejoin => continue,
            }
        }
    }
}
