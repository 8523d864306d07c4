//! NATS sources: a core subject (optionally in a queue group) and a JetStream durable pull
//! consumer. Both hand messages to the [`Inbox`]; JetStream messages are acknowledged only once
//! their tasks are stored, so a crash before that means the message is delivered again (to
//! this or another instance sharing the consumer).

use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, AckKind};
use async_nats::HeaderMap;
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::{headers, DeadLetter, Disposition, Inbox, Letter, Message, Source, SourceContext, SourceError, SourceStatuses};
use crate::bus::nats::{connect, header_value, Publisher};
use crate::config::{JetStreamSourceConfig, NatsSourceConfig};

/// How long connecting and JetStream set-up may take at start-up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages of a core subscription handled at once.
const CORE_IN_FLIGHT: usize = 64;
/// Read errors in a row after which the JetStream consumer is set up again.
const MAX_READ_ERRORS: u32 = 10;
/// On stopping, a core subscription's remaining messages are read until none comes for this long.
const DRAIN_IDLE: Duration = Duration::from_millis(200);
/// How often a running source looks at its connection, for health.
const CONNECTION_CHECK: Duration = Duration::from_millis(500);

/// Malformed messages published to a NATS subject, with the reason in `Accel-Error`.
struct NatsDeadLetter {
    publisher: Publisher,
}

#[async_trait]
impl DeadLetter for NatsDeadLetter {
    fn target(&self) -> String {
        self.publisher.describe()
    }

    async fn publish(&self, letter: &Letter<'_>) -> Result<(), String> {
        let mut h = HeaderMap::new();
        h.insert(headers::ERROR, header_value(letter.reason).as_str());
        h.insert(headers::SOURCE, header_value(letter.source).as_str());
        h.insert(headers::LOCATION, header_value(letter.location).as_str());
        if let Some(ct) = letter.content_type {
            h.insert("Content-Type", header_value(ct).as_str());
        }
        if let Some(n) = letter.truncated_from {
            h.insert(headers::TRUNCATED, n.to_string().as_str());
        }
        for (k, v) in letter.carried_headers() {
            h.append(k, header_value(v).as_str());
        }
        self.publisher.publish(h, Bytes::copy_from_slice(letter.body)).await
    }
}

/// Hands one NATS message to the inbox, with its `Content-Type` and its other headers (as text
/// pairs; a header with several values gives several pairs).
async fn hand_in<F, Fut>(inbox: &Inbox, body: &[u8], headers: Option<&HeaderMap>, location: &str, keepalive: F) -> Disposition
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let texts: Vec<(String, String)> =
        headers.iter().flat_map(|h| h.iter()).flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.as_str().to_string()))).collect();
    let pairs: Vec<(&str, &str)> = texts.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let content_type = pairs.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-type")).map(|(_, v)| *v);
    let m = Message { body, content_type, location, key: None, headers: &pairs };
    inbox.handle_keepalive(&m, keepalive).await
}

/// Hands a core NATS message to the inbox, and answers a request with whether it was taken.
async fn take_core(inbox: &Inbox, client: &async_nats::Client, name: &str, msg: async_nats::Message) -> Disposition {
    let location = format!("subject {}", msg.subject);
    let outcome = hand_in(inbox, &msg.payload, msg.headers.as_ref(), &location, || async {}).await;
    if outcome == Disposition::Stop {
        tracing::warn!(source = %name, at = %location, "acceld is stopping and could not store this message's tasks; it is lost (core NATS does not deliver it again)");
    }
    if let Some(reply) = msg.reply {
        let answer = if outcome == Disposition::Ack { "{\"accepted\":true}" } else { "{\"accepted\":false}" };
        let _ = client.publish(reply, Bytes::from_static(answer.as_bytes())).await;
    }
    outcome
}

/// Shows in the source's status whether its client reaches a NATS server, while the source
/// runs: `disconnected` while the client is trying to reconnect, `reading` again once it has.
/// The client resubscribes by itself, so the source itself goes on.
fn watch_connection(client: async_nats::Client, statuses: SourceStatuses, name: String, url: String) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        let mut down = false;
        let mut tick = tokio::time::interval(CONNECTION_CHECK);
        loop {
            tick.tick().await;
            let now_down = client.connection_state() == State::Disconnected;
            if now_down && !down {
                tracing::warn!(source = %name, "lost the connection to NATS at {url}; reconnecting");
                statuses.disconnected(&name, format!("no NATS server answers at {url}"));
            } else if !now_down && down {
                tracing::info!(source = %name, "connected to NATS again");
                statuses.connected(&name);
            }
            down = now_down;
        }
    }))
}

fn dead_letter(client: &async_nats::Client, subject: Option<&String>) -> Option<Arc<dyn DeadLetter>> {
    subject.map(|s| Arc::new(NatsDeadLetter { publisher: Publisher::new(client.clone(), s, false, CONNECT_TIMEOUT) }) as Arc<dyn DeadLetter>)
}

/// A core NATS subscription. Core NATS does not redeliver: what the subscription received is
/// stored as tasks even while acceld stops, but a message published while nobody is subscribed
/// is gone, so use JetStream where every event counts.
pub struct NatsSource {
    name: String,
    client: async_nats::Client,
    config: NatsSourceConfig,
}

impl NatsSource {
    pub async fn build(name: &str, config: &NatsSourceConfig, ctx: &SourceContext) -> Result<(Arc<dyn Source>, Inbox), SourceError> {
        let client = connect(&config.url, config.auth.as_ref(), CONNECT_TIMEOUT)
            .await
            .map_err(|why| SourceError::Connect { source_name: name.into(), url: config.url.clone(), why })?;
        // Core NATS does not deliver a message again: one that comes in while acceld stops is
        // stored for the next start.
        let inbox = Inbox::new(name, ctx.workers.clone(), dead_letter(&client, config.dead_letter_subject.as_ref()), ctx.shutdown.clone())
            .keep_on_stop();
        let source = NatsSource { name: name.into(), client, config: config.clone() };
        Ok((Arc::new(source), inbox))
    }
}

#[async_trait]
impl Source for NatsSource {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(&self, inbox: &Inbox, shutdown: &CancellationToken) -> Result<(), SourceError> {
        let read_err = |why: String| SourceError::Read { source_name: self.name.clone(), why };
        let subject = self.config.subject.clone();
        let mut sub = match &self.config.queue_group {
            Some(q) => self.client.queue_subscribe(subject.clone(), q.clone()).await,
            None => self.client.subscribe(subject.clone()).await,
        }
        .map_err(|e| read_err(format!("cannot subscribe to {subject}: {e}")))?;
        tracing::info!(source = %self.name, "subscribed to NATS subject {subject}{}",
            self.config.queue_group.as_ref().map(|q| format!(" in queue group {q}")).unwrap_or_default());
        let _watch = watch_connection(self.client.clone(), inbox.statuses().clone(), self.name.clone(), self.config.url.clone());
        let slots = Arc::new(Semaphore::new(CORE_IN_FLIGHT));
        let mut running = JoinSet::new();
        let result = loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                p = slots.clone().acquire_owned() => p.expect("never closed"),
            };
            let msg = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                m = sub.next() => match m {
                    Some(m) => m,
                    None => break Err(read_err(format!("the subscription to {subject} ended"))),
                },
            };
            while running.try_join_next().is_some() {}
            let (inbox, client, name) = (inbox.clone(), self.client.clone(), self.name.clone());
            running.spawn(async move {
                let _permit = permit;
                take_core(&inbox, &client, &name, msg).await;
            });
        };
        // The server sends no more; what the client holds already is stored for the next start.
        let _ = sub.unsubscribe().await;
        if shutdown.is_cancelled() {
            let mut kept = 0usize;
            while let Ok(Some(msg)) = tokio::time::timeout(DRAIN_IDLE, sub.next()).await {
                if take_core(inbox, &self.client, &self.name, msg).await == Disposition::Ack {
                    kept += 1;
                }
            }
            if kept > 0 {
                tracing::info!(source = %self.name, "took {kept} more message(s) received before unsubscribing; their tasks run at the next start");
            }
        }
        while running.join_next().await.is_some() {}
        result
    }
}

/// A JetStream durable pull consumer.
pub struct JetStreamSource {
    name: String,
    client: async_nats::Client,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    config: JetStreamSourceConfig,
}

impl JetStreamSource {
    pub async fn build(name: &str, config: &JetStreamSourceConfig, ctx: &SourceContext) -> Result<(Arc<dyn Source>, Inbox), SourceError> {
        let setup = |why: String| SourceError::Setup { source_name: name.into(), why };
        let client = connect(&config.url, config.auth.as_ref(), CONNECT_TIMEOUT)
            .await
            .map_err(|why| SourceError::Connect { source_name: name.into(), url: config.url.clone(), why })?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(CONNECT_TIMEOUT);
        let stream = match js.get_stream(&config.stream).await {
            Ok(s) => s,
            Err(e) if is_not_found(&e.to_string(), &e.kind()) && config.create => {
                let c = jetstream::stream::Config { name: config.stream.clone(), subjects: config.subjects.clone(), ..Default::default() };
                tracing::info!(source = %name, "creating JetStream stream {} for subjects {:?}", config.stream, config.subjects);
                js.create_stream(c).await.map_err(|e| setup(format!("cannot create stream {}: {e}", config.stream)))?
            }
            Err(e) if is_not_found(&e.to_string(), &e.kind()) => {
                return Err(setup(format!(
                    "JetStream stream {} does not exist on {}; create it (nats stream add {} --subjects ...) or set create: true",
                    config.stream, config.url, config.stream
                )))
            }
            Err(e) => return Err(setup(format!("cannot look up JetStream stream {} on {}: {e}", config.stream, config.url))),
        };
        let consumer = match stream.get_consumer::<pull::Config>(&config.consumer).await {
            Ok(c) => {
                let ack = c.cached_info().config.ack_policy;
                if ack != AckPolicy::Explicit {
                    return Err(setup(format!(
                        "consumer {} of stream {} acknowledges {ack:?}; acceld needs ack_policy explicit to acknowledge a message only once its tasks are stored",
                        config.consumer, config.stream
                    )));
                }
                let info = &c.cached_info().config;
                let wanted = Duration::from_secs(config.ack_wait_secs);
                if info.ack_wait != wanted || info.max_deliver != config.max_deliver {
                    // acceld does not change a consumer others may share; it paces its
                    // keep-alives by the deadline the server applies.
                    tracing::warn!(source = %name,
                        "durable consumer {} of stream {} has ack_wait {:?} and max_deliver {}, not the configured {wanted:?} and {}; \
                         using the consumer's own settings (change them with `nats consumer edit`)",
                        config.consumer, config.stream, info.ack_wait, info.max_deliver, config.max_deliver);
                }
                c
            }
            Err(e) if e.to_string().to_lowercase().contains("not found") && config.create => {
                let c = pull::Config {
                    durable_name: Some(config.consumer.clone()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(config.ack_wait_secs),
                    max_deliver: config.max_deliver,
                    filter_subject: config.filter_subject.clone().unwrap_or_default(),
                    ..Default::default()
                };
                tracing::info!(source = %name, "creating durable consumer {} on stream {}", config.consumer, config.stream);
                stream.create_consumer(c).await.map_err(|e| setup(format!("cannot create consumer {} on stream {}: {e}", config.consumer, config.stream)))?
            }
            Err(e) if e.to_string().to_lowercase().contains("not found") => {
                return Err(setup(format!(
                    "durable consumer {} does not exist on stream {}; create it (pull, ack explicit) or set create: true",
                    config.consumer, config.stream
                )))
            }
            Err(e) => return Err(setup(format!("cannot look up consumer {} of stream {}: {e}", config.consumer, config.stream))),
        };
        // Keep-alives well inside the deadline the server applies, so a long conversion keeps
        // its message.
        let ack_wait = consumer.cached_info().config.ack_wait;
        let ack_wait = if ack_wait.is_zero() { Duration::from_secs(30) } else { ack_wait };
        let keepalive = ack_wait.mul_f64(0.4);
        let inbox = Inbox::new(name, ctx.workers.clone(), dead_letter(&client, config.dead_letter_subject.as_ref()), ctx.shutdown.clone())
            .ack_when(config.ack, keepalive);
        Ok((Arc::new(JetStreamSource { name: name.into(), client, consumer, config: config.clone() }), inbox))
    }
}

fn is_not_found(text: &str, kind: &jetstream::context::GetStreamErrorKind) -> bool {
    match kind {
        jetstream::context::GetStreamErrorKind::JetStream(e) => e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND,
        _ => text.to_lowercase().contains("not found"),
    }
}

#[async_trait]
impl Source for JetStreamSource {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(&self, inbox: &Inbox, shutdown: &CancellationToken) -> Result<(), SourceError> {
        let read_err = |why: String| SourceError::Read { source_name: self.name.clone(), why };
        let mut messages = self
            .consumer
            .stream()
            .max_messages_per_batch(self.config.batch)
            .messages()
            .await
            .map_err(|e| read_err(format!("cannot read consumer {} of stream {}: {e}", self.config.consumer, self.config.stream)))?;
        tracing::info!(source = %self.name, "reading JetStream stream {} through durable consumer {}", self.config.stream, self.config.consumer);
        let _watch = watch_connection(self.client.clone(), inbox.statuses().clone(), self.name.clone(), self.config.url.clone());
        // Messages of one pull are handled at once, so their tasks share database commits.
        let slots = Arc::new(Semaphore::new(self.config.batch));
        let mut running = JoinSet::new();
        let mut errors = 0u32;
        let result = loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                p = slots.clone().acquire_owned() => p.expect("never closed"),
            };
            let msg = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                m = messages.next() => match m {
                    Some(Ok(m)) => { errors = 0; m }
                    Some(Err(e)) if self.client.connection_state() != State::Connected => {
                        // The server is away (health says so); the client reconnects and the
                        // consumer's stream goes on, so this does not count towards a restart.
                        tracing::debug!(source = %self.name, "reading the consumer while disconnected: {e}");
                        tokio::time::sleep(CONNECTION_CHECK).await;
                        continue;
                    }
                    Some(Err(e)) => {
                        errors += 1;
                        tracing::warn!(source = %self.name, "reading the consumer: {e}");
                        if errors >= MAX_READ_ERRORS {
                            break Err(read_err(format!("{errors} read errors in a row, the last: {e}")));
                        }
                        continue;
                    }
                    None => break Err(read_err("the consumer's message stream ended".into())),
                },
            };
            while running.try_join_next().is_some() {}
            let (inbox, name) = (inbox.clone(), self.name.clone());
            running.spawn(async move {
                let _permit = permit;
                let location = match msg.info() {
                    Ok(i) => format!("stream {} sequence {} delivery {}", i.stream, i.stream_sequence, i.delivered),
                    Err(_) => format!("subject {}", msg.subject),
                };
                let keepalive = || async {
                    // Still working on it: the server must not hand it to another consumer yet.
                    let _ = msg.ack_with(AckKind::Progress).await;
                };
                match hand_in(&inbox, &msg.payload, msg.headers.as_ref(), &location, keepalive).await {
                    Disposition::Ack => {
                        // Waits for the server's confirmation, so that a taken message is not
                        // delivered to another instance as well.
                        if let Err(e) = msg.double_ack().await {
                            tracing::warn!(source = %name, at = %location, "acknowledging failed; the message may be delivered again (its tasks are stored, so it is not converted twice here): {e}");
                        }
                    }
                    Disposition::Stop => {
                        // Another instance may take it at once.
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                    }
                }
            });
        };
        while running.join_next().await.is_some() {}
        result
    }
}
