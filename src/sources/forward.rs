//! Forwarding accepted Harbor webhooks into a bus instead of converting them here, so every
//! instance reading the bus shares the work. The webhook is answered once the bus has the
//! message. One implementation per bus kind.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_trait::async_trait;
use bytes::Bytes;

use super::{headers, SourceError};
use crate::bus::nats::{connect, header_value, Publisher};
use crate::config::ForwardConfig;

/// Where accepted webhook bodies go.
#[async_trait]
pub trait Forward: Send + Sync + 'static {
    /// The destination, for answers and logs.
    fn target(&self) -> String;
    /// Publishes the body as received; returns once the bus acknowledged it.
    async fn forward(&self, body: &[u8], content_type: Option<&str>) -> Result<(), String>;
}

struct NatsForward {
    source: String,
    publisher: Publisher,
}

#[async_trait]
impl Forward for NatsForward {
    fn target(&self) -> String {
        self.publisher.describe()
    }

    async fn forward(&self, body: &[u8], content_type: Option<&str>) -> Result<(), String> {
        let mut h = HeaderMap::new();
        if let Some(ct) = content_type {
            h.insert("Content-Type", header_value(ct).as_str());
        }
        h.insert(headers::SOURCE, header_value(&self.source).as_str());
        self.publisher.publish(h, Bytes::copy_from_slice(body)).await
    }
}

/// Webhook bodies published to a Kafka topic, keyed by nothing (spread over partitions).
struct KafkaForward {
    source: String,
    publisher: crate::bus::kafka::Publisher,
}

#[async_trait]
impl Forward for KafkaForward {
    fn target(&self) -> String {
        self.publisher.describe()
    }

    async fn forward(&self, body: &[u8], content_type: Option<&str>) -> Result<(), String> {
        let mut h = vec![(headers::SOURCE, self.source.as_str())];
        if let Some(ct) = content_type {
            h.push(("Content-Type", ct));
        }
        self.publisher.publish(None, &h, body).await
    }
}

/// Connects the forwarding of source `name`; a bus that cannot be reached fails start-up.
pub async fn build(name: &str, config: &ForwardConfig) -> Result<Arc<dyn Forward>, SourceError> {
    match config {
        ForwardConfig::Nats(c) | ForwardConfig::Jetstream(c) => {
            let jetstream = matches!(config, ForwardConfig::Jetstream(_));
            let timeout = Duration::from_secs(c.timeout_secs.max(1));
            let client = connect(&c.url, c.auth.as_ref(), timeout)
                .await
                .map_err(|why| SourceError::Connect { source_name: name.into(), url: c.url.clone(), why })?;
            let publisher = Publisher::new(client, &c.subject, jetstream, timeout);
            publisher.check().await.map_err(|why| SourceError::Setup { source_name: name.into(), why: format!("forward: {why}") })?;
            Ok(Arc::new(NatsForward { source: name.into(), publisher }))
        }
        ForwardConfig::Kafka(c) => {
            let setup = |why: String| SourceError::Setup { source_name: name.into(), why: format!("forward: {why}") };
            let publisher = crate::bus::kafka::Publisher::new(&c.connection(), &c.topic, Duration::from_secs(c.timeout_secs.max(1))).map_err(setup)?;
            publisher.check().await.map_err(setup)?;
            Ok(Arc::new(KafkaForward { source: name.into(), publisher }))
        }
    }
}
