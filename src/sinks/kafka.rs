//! The `kafka` sink: each result published to a topic as a CloudEvent in structured mode
//! (`content-type: application/cloudevents+json`), waiting for the brokers' acknowledgement.

use std::time::Duration;

use async_trait::async_trait;

use super::result::CONTENT_TYPE;
use super::{ResultEvent, Sink, SinkError};
use crate::bus::kafka::Publisher;
use crate::config::{KafkaKey, KafkaPublishConfig};

pub struct KafkaSink {
    name: String,
    publisher: Publisher,
    key: KafkaKey,
}

impl KafkaSink {
    pub fn new(name: &str, c: &KafkaPublishConfig) -> Result<KafkaSink, SinkError> {
        let publisher = Publisher::new(&c.connection(), &c.topic, Duration::from_secs(c.timeout_secs.max(1)))
            .map_err(|why| SinkError::Config { sink: name.into(), why })?;
        Ok(KafkaSink { name: name.into(), publisher, key: c.key })
    }
}

#[async_trait]
impl Sink for KafkaSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn health(&self) -> Result<(), SinkError> {
        self.publisher.check().await.map_err(|why| SinkError::Unavailable { sink: self.name.clone(), why })
    }

    async fn send(&self, event: &ResultEvent) -> Result<(), SinkError> {
        let key = match self.key {
            KafkaKey::Subject => Some(event.subject.as_bytes()),
            KafkaKey::Id => Some(event.id.as_bytes()),
            KafkaKey::None => None,
        };
        let headers = [("content-type", CONTENT_TYPE), ("ce_type", event.event_type.as_str())];
        self.publisher.publish(key, &headers, &event.to_json()).await.map_err(|why| SinkError::Unavailable { sink: self.name.clone(), why })
    }
}
