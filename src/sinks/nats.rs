//! The `nats` and `jetstream` sinks: each result published to a subject as a CloudEvent in
//! structured mode; the JetStream sink waits for the stream's acknowledgement.

use std::time::Duration;

use async_nats::HeaderMap;
use async_trait::async_trait;
use bytes::Bytes;

use super::result::CONTENT_TYPE;
use super::{ResultEvent, Sink, SinkError};
use crate::bus::nats::{connect, header_value, Publisher};
use crate::config::NatsPublishConfig;

pub struct NatsSink {
    name: String,
    publisher: Publisher,
}

impl NatsSink {
    /// Connects; `jetstream` makes each publish wait for the stream.
    pub async fn new(name: &str, c: &NatsPublishConfig, jetstream: bool) -> Result<NatsSink, SinkError> {
        let timeout = Duration::from_secs(c.timeout_secs.max(1));
        let client = connect(&c.url, c.auth.as_ref(), timeout)
            .await
            .map_err(|why| SinkError::Unavailable { sink: name.into(), why: format!("cannot connect to {}: {why}", c.url) })?;
        Ok(NatsSink { name: name.into(), publisher: Publisher::new(client, &c.subject, jetstream, timeout) })
    }
}

#[async_trait]
impl Sink for NatsSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn health(&self) -> Result<(), SinkError> {
        self.publisher.check().await.map_err(|why| SinkError::Unavailable { sink: self.name.clone(), why })
    }

    async fn send(&self, event: &ResultEvent) -> Result<(), SinkError> {
        let mut h = HeaderMap::new();
        h.insert("Content-Type", CONTENT_TYPE);
        // Lets JetStream drop a result sent twice within its duplicate window.
        h.insert("Nats-Msg-Id", header_value(&event.id).as_str());
        h.insert("ce-type", header_value(&event.event_type).as_str());
        self.publisher
            .publish(h, Bytes::from(event.to_json()))
            .await
            .map_err(|why| SinkError::Unavailable { sink: self.name.clone(), why })
    }
}
