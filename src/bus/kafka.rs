//! Kafka: client settings from the config, and a producer that waits for the brokers'
//! acknowledgement (all in-sync replicas, idempotent) before a publish counts as done.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::KafkaConnection;

/// Name acceld gives its clients (brokers log it).
const CLIENT_ID: &str = "acceld";

/// Client settings for `c`: brokers, security, then the extra `client_options` (which the
/// config check keeps off the settings made here).
pub fn client_config(c: &KafkaConnection) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", c.brokers.join(","));
    cfg.set("client.id", CLIENT_ID);
    let protocol = match (&c.sasl, &c.tls) {
        (None, None) => "plaintext",
        (None, Some(_)) => "ssl",
        (Some(_), None) => "sasl_plaintext",
        (Some(_), Some(_)) => "sasl_ssl",
    };
    cfg.set("security.protocol", protocol);
    if let Some(s) = &c.sasl {
        cfg.set("sasl.mechanism", &s.mechanism);
        cfg.set("sasl.username", &s.user);
        cfg.set("sasl.password", s.password.expose());
    }
    if let Some(t) = &c.tls {
        if let Some(ca) = &t.ca_file {
            cfg.set("ssl.ca.location", ca.display().to_string());
        }
        if let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) {
            cfg.set("ssl.certificate.location", cert.display().to_string());
            cfg.set("ssl.key.location", key.display().to_string());
        }
        if t.insecure {
            cfg.set("enable.ssl.certificate.verification", "false");
        }
    }
    for (k, v) in &c.client_options {
        cfg.set(k.trim(), v);
    }
    cfg
}

/// Checks that the TLS files of `c` can be read, so that a wrong path is named as such
/// (librdkafka reports only a certificate library error).
pub fn check_tls_files(c: &KafkaConnection) -> Result<(), String> {
    let Some(t) = &c.tls else { return Ok(()) };
    for (key, path) in [("ca_file", &t.ca_file), ("cert_file", &t.cert_file), ("key_file", &t.key_file)] {
        if let Some(p) = path {
            std::fs::File::open(p).map_err(|e| format!("tls.{key} {}: {e}", p.display()))?;
        }
    }
    Ok(())
}

/// The brokers, for messages.
pub fn describe_brokers(c: &KafkaConnection) -> String {
    c.brokers.join(",")
}

/// Checks that each of `topics` exists on the brokers of `c` (a metadata request each, as a
/// consumer: that never creates a topic), within `timeout`. Blocking: run it off the async
/// threads.
pub fn check_topics(c: &KafkaConnection, topics: &[String], timeout: Duration) -> Result<(), String> {
    let brokers = describe_brokers(c);
    check_tls_files(c)?;
    let client: BaseConsumer = client_config(c).create().map_err(|e| format!("cannot set up a Kafka client for {brokers}: {e}"))?;
    for topic in topics {
        let md = client.fetch_metadata(Some(topic), timeout).map_err(|e| format!("cannot reach the Kafka brokers {brokers} within {timeout:?}: {e}"))?;
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            return Err(format!("the Kafka brokers {brokers} did not describe topic {topic}"));
        };
        if t.error().is_some() || t.partitions().is_empty() {
            let why = t.error().map(|e| format!(" ({})", rdkafka::error::RDKafkaErrorCode::from(e))).unwrap_or_default();
            return Err(format!("topic {topic} does not exist on the Kafka brokers {brokers}{why}; create it first"));
        }
    }
    Ok(())
}

/// Publishes records to one topic and waits for the brokers' acknowledgement.
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    connection: KafkaConnection,
    brokers: String,
    topic: String,
    timeout: Duration,
}

impl Publisher {
    /// A producer on `c` for `topic`: every record acknowledged by all in-sync replicas,
    /// idempotent (retries do not duplicate records).
    pub fn new(c: &KafkaConnection, topic: &str, timeout: Duration) -> Result<Publisher, String> {
        check_tls_files(c)?;
        let mut cfg = client_config(c);
        cfg.set("acks", "all");
        cfg.set("enable.idempotence", "true");
        cfg.set("message.timeout.ms", timeout.as_millis().max(1).to_string());
        // Each record is awaited before the next is sent (results go out in order): waiting for
        // more records to batch (librdkafka's default 5 ms) would only add that to each one.
        if cfg.get("linger.ms").is_none() && cfg.get("queue.buffering.max.ms").is_none() {
            cfg.set("linger.ms", "0");
        }
        let producer: FutureProducer = cfg.create().map_err(|e| format!("cannot set up a Kafka producer for {}: {e}", describe_brokers(c)))?;
        Ok(Publisher { producer, connection: c.clone(), brokers: describe_brokers(c), topic: topic.to_string(), timeout })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// `Kafka topic T`, for messages.
    pub fn describe(&self) -> String {
        format!("Kafka topic {}", self.topic)
    }

    /// Checks that the topic exists (within the publish timeout).
    pub async fn check(&self) -> Result<(), String> {
        let (c, topic, timeout) = (self.connection.clone(), self.topic.clone(), self.timeout);
        tokio::task::spawn_blocking(move || check_topics(&c, &[topic], timeout)).await.map_err(|e| format!("checking topic {}: {e}", self.topic))?
    }

    /// Publishes one record; returns once the brokers acknowledged it.
    pub async fn publish(&self, key: Option<&[u8]>, headers: &[(&str, &str)], body: &[u8]) -> Result<(), String> {
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            h = h.insert(Header { key: k, value: Some(header_value(v).as_bytes()) });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).payload(body).headers(h);
        if let Some(k) = key {
            record = record.key(k);
        }
        match self.producer.send(record, self.timeout).await {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(format!("publishing to {} on {}: {e}", self.describe(), self.brokers)),
        }
    }
}

/// Keeps a header value printable and short.
pub fn header_value(s: &str) -> String {
    let clean: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    clean.chars().take(1024).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::config::{KafkaSasl, KafkaTls};

    #[test]
    fn settings_follow_the_config() {
        let mut c = KafkaConnection { brokers: vec!["a:1".into(), "b:2".into()], sasl: None, tls: None, client_options: Default::default() };
        c.client_options.insert("fetch.max.bytes".into(), "1000".into());
        let cfg = client_config(&c);
        assert_eq!(cfg.get("bootstrap.servers"), Some("a:1,b:2"));
        assert_eq!(cfg.get("security.protocol"), Some("plaintext"));
        assert_eq!(cfg.get("fetch.max.bytes"), Some("1000"));
        c.sasl = Some(KafkaSasl { mechanism: "SCRAM-SHA-256".into(), user: "u".into(), password: Secret::new("p") });
        c.tls = Some(KafkaTls { ca_file: Some("/ca.pem".into()), ..Default::default() });
        let cfg = client_config(&c);
        assert_eq!(cfg.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!((cfg.get("sasl.username"), cfg.get("sasl.password")), (Some("u"), Some("p")));
        assert_eq!(cfg.get("ssl.ca.location"), Some("/ca.pem"));
        let missing = check_tls_files(&c).unwrap_err();
        assert!(missing.starts_with("tls.ca_file /ca.pem: "), "{missing}");
        c.tls = None;
        assert_eq!(check_tls_files(&c), Ok(()));
        assert_eq!(header_value("a\nb"), "a b");
    }
}
