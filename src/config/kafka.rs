//! Config of Kafka sources, sinks and Harbor webhook forwarding into Kafka.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::bus::{AckWhen, Report};
use super::units::{self, Secret};

/// Brokers and security settings shared by every Kafka client (built from the fields every
/// Kafka section has).
#[derive(Debug, Clone)]
pub struct KafkaConnection {
    pub brokers: Vec<String>,
    pub sasl: Option<KafkaSasl>,
    pub tls: Option<KafkaTls>,
    pub client_options: BTreeMap<String, String>,
}

/// Settings given to librdkafka as they are; numbers and booleans are taken as written.
fn options<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        F(f64),
        B(bool),
    }
    let raw = BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Scalar::S(s) => s,
                Scalar::I(i) => i.to_string(),
                Scalar::F(f) => f.to_string(),
                Scalar::B(b) => b.to_string(),
            };
            (k, v)
        })
        .collect())
}

/// SASL user and password.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSasl {
    /// `PLAIN` (default), `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    #[serde(default = "default_mechanism")]
    pub mechanism: String,
    pub user: String,
    pub password: Secret,
}

/// TLS settings; an empty section means TLS with the system's trusted roots.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaTls {
    /// PEM file of the CA that signed the brokers' certificates.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), for brokers that authenticate clients by TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Do not verify the brokers' certificates (tests only).
    pub insecure: bool,
}

fn default_mechanism() -> String {
    "PLAIN".into()
}

/// A Kafka topic read through a consumer group: every instance with the same group shares
/// the topic's partitions. Offsets are committed only over messages that are done, in order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap brokers, `host:port`: a list or one comma-separated string.
    #[serde(deserialize_with = "units::string_or_list")]
    pub brokers: Vec<String>,
    /// SASL authentication.
    #[serde(default)]
    pub sasl: Option<KafkaSasl>,
    /// TLS to the brokers.
    #[serde(default)]
    pub tls: Option<KafkaTls>,
    /// Further librdkafka settings (`fetch.max.bytes: 1048576`); the ones acceld sets itself
    /// may not be given here.
    #[serde(default, deserialize_with = "options")]
    pub client_options: BTreeMap<String, String>,
    /// Topic(s) to read: `topic` (one name) or `topics` (a list).
    #[serde(default)]
    pub topic: Option<String>,
    #[serde(default, deserialize_with = "units::string_or_list")]
    pub topics: Vec<String>,
    /// Consumer group id.
    pub group: String,
    /// When a message is committed: `finished` (default) once its conversions are done, so
    /// that another instance takes over the work of one that dies; `stored` once its tasks are
    /// stored here.
    #[serde(default = "default_ack")]
    pub ack: AckWhen,
    /// Malformed messages are published here, with `Accel-Error`, `Accel-Source` and
    /// `Accel-Location` headers.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Messages this instance handles at once; at the limit it stops fetching.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// A member that is silent this long leaves the group; its partitions go to the others.
    #[serde(default = "default_session_timeout")]
    pub session_timeout_secs: u64,
    /// The source stops fetching while `max_in_flight` messages are handled; a member that
    /// fetches nothing for this long leaves the group (and joins again when it fetches).
    #[serde(default = "default_max_poll_interval")]
    pub max_poll_interval_secs: u64,
    /// Leave and join the group again when a partition held by another member has not moved
    /// for this long while this instance is idle (0: never). A safety net for brokers that do
    /// not hand out the partitions of a member whose session expired.
    #[serde(default)]
    pub rejoin_stalled_secs: u64,
}

fn default_ack() -> AckWhen {
    AckWhen::Finished
}
fn default_max_in_flight() -> usize {
    64
}
fn default_session_timeout() -> u64 {
    30
}
fn default_max_poll_interval() -> u64 {
    1800
}

/// Publishing to one Kafka topic (results, forwarded webhooks). The connection settings are
/// spelled out here as in [`KafkaSourceConfig`] rather than flattened from one struct: serde
/// cannot check unknown keys of a struct with a flattened part. `connection()` gathers them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaPublishConfig {
    /// Bootstrap brokers, `host:port`: a list or one comma-separated string.
    #[serde(deserialize_with = "units::string_or_list")]
    pub brokers: Vec<String>,
    /// SASL authentication.
    #[serde(default)]
    pub sasl: Option<KafkaSasl>,
    /// TLS to the brokers.
    #[serde(default)]
    pub tls: Option<KafkaTls>,
    /// Further librdkafka settings (`fetch.max.bytes: 1048576`); the ones acceld sets itself
    /// may not be given here.
    #[serde(default, deserialize_with = "options")]
    pub client_options: BTreeMap<String, String>,
    pub topic: String,
    /// Longest wait for the brokers' acknowledgement of one record.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Record key: `subject` (the source image, default: its results stay in order on one
    /// partition), `id` (the event id) or `none`.
    #[serde(default)]
    pub key: KafkaKey,
}

/// What a published record is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KafkaKey {
    #[default]
    Subject,
    Id,
    None,
}

fn default_timeout() -> u64 {
    10
}

/// librdkafka settings acceld sets itself; `client_options` may not override them.
pub const OWNED_OPTIONS: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "session.timeout.ms",
    "max.poll.interval.ms",
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "enable.ssl.certificate.verification",
    "client.id",
];

impl KafkaConnection {
    pub fn check(&self, at: &str, problem: &mut Report) {
        if self.brokers.is_empty() {
            problem(format!("{at}.brokers"), "name at least one broker (host:port)".into());
        }
        for (i, b) in self.brokers.iter().enumerate() {
            if let Err(why) = check_broker(b) {
                problem(format!("{at}.brokers[{i}]"), why);
            }
        }
        if let Some(s) = &self.sasl {
            if !matches!(s.mechanism.as_str(), "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512") {
                problem(format!("{at}.sasl.mechanism"), format!("{:?}: use PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", s.mechanism));
            }
            if s.user.is_empty() {
                problem(format!("{at}.sasl.user"), "must not be empty".into());
            }
        }
        if let Some(t) = &self.tls {
            if t.cert_file.is_some() != t.key_file.is_some() {
                problem(format!("{at}.tls"), "cert_file and key_file go together".into());
            }
        }
        for (k, v) in &self.client_options {
            let key = k.trim();
            if key == "transactional.id" || key == "transaction.timeout.ms" {
                problem(format!("{at}.client_options.{k}"), format!("{k:?}: acceld's producers are idempotent, not transactional"));
            } else if OWNED_OPTIONS.contains(&key) {
                problem(format!("{at}.client_options.{k}"), format!("{k:?} is set by acceld from the other settings; it cannot be overridden"));
            } else if key.starts_with("sasl.") || (key.starts_with("ssl.") && key != "ssl.endpoint.identification.algorithm") {
                problem(format!("{at}.client_options.{k}"), format!("{k:?}: set TLS and SASL through the tls and sasl sections"));
            } else if key.is_empty() || key.chars().any(|c| !(c.is_ascii_alphanumeric() || c == '.' || c == '_')) {
                problem(format!("{at}.client_options.{k}"), format!("{k:?} is not a librdkafka setting name"));
            } else if v.is_empty() {
                problem(format!("{at}.client_options.{k}"), "the value must not be empty".into());
            }
        }
    }
}

fn check_broker(b: &str) -> Result<(), String> {
    let b = b.trim();
    let Some((host, port)) = b.rsplit_once(':') else {
        return Err(format!("{b:?} is not host:port"));
    };
    if host.is_empty() || host.chars().any(char::is_whitespace) || host.contains("://") {
        return Err(format!("{b:?} is not host:port"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{b:?}: {port:?} is not a port")),
    }
}

/// Checks a topic name as Kafka does: 1 to 249 characters out of `[a-zA-Z0-9._-]`.
pub fn check_topic(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("must not be empty".into());
    }
    if t.len() > 249 {
        return Err(format!("{t:?} is longer than 249 characters"));
    }
    if t == "." || t == ".." {
        return Err(format!("{t:?} is not a topic name"));
    }
    if let Some(c) = t.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("{t:?} has {c:?}; topic names hold only letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

impl KafkaSourceConfig {
    pub fn connection(&self) -> KafkaConnection {
        KafkaConnection { brokers: self.brokers.clone(), sasl: self.sasl.clone(), tls: self.tls.clone(), client_options: self.client_options.clone() }
    }

    /// The topics read, `topic` first.
    pub fn all_topics(&self) -> Vec<String> {
        self.topic.iter().cloned().chain(self.topics.iter().cloned()).collect()
    }

    pub fn check(&self, at: &str, problem: &mut Report) {
        self.connection().check(at, problem);
        let topics = self.all_topics();
        if topics.is_empty() {
            problem(format!("{at}.topic"), "name the topic to read (topic, or topics for several)".into());
        }
        if let Some(t) = &self.topic {
            if let Err(why) = check_topic(t) {
                problem(format!("{at}.topic"), why);
            }
        }
        for (i, t) in self.topics.iter().enumerate() {
            if let Err(why) = check_topic(t) {
                problem(format!("{at}.topics[{i}]"), why);
            } else if self.topic.as_ref() == Some(t) || self.topics[..i].contains(t) {
                problem(format!("{at}.topics[{i}]"), format!("{t:?} is named twice (topic and topics together name each topic once)"));
            }
        }
        if self.group.is_empty() || self.group.chars().any(char::is_whitespace) {
            problem(format!("{at}.group"), format!("{:?}: a consumer group id is not empty and has no white space", self.group));
        }
        if let Some(d) = &self.dead_letter_topic {
            if let Err(why) = check_topic(d) {
                problem(format!("{at}.dead_letter_topic"), why);
            } else if topics.contains(d) {
                problem(format!("{at}.dead_letter_topic"), format!("{d:?} is read by this source itself"));
            }
        }
        if self.max_in_flight == 0 {
            problem(format!("{at}.max_in_flight"), "must be at least 1".into());
        }
        if !(1..=3600).contains(&self.session_timeout_secs) {
            problem(format!("{at}.session_timeout_secs"), "must be between 1 and 3600".into());
        }
        if self.max_poll_interval_secs < self.session_timeout_secs || self.max_poll_interval_secs > 86_400 {
            problem(format!("{at}.max_poll_interval_secs"), "must be at least session_timeout_secs and at most 86400".into());
        }
        if self.rejoin_stalled_secs != 0 && self.rejoin_stalled_secs <= self.session_timeout_secs {
            problem(format!("{at}.rejoin_stalled_secs"), "must be longer than session_timeout_secs (or 0 for never)".into());
        }
    }
}

impl KafkaPublishConfig {
    pub fn connection(&self) -> KafkaConnection {
        KafkaConnection { brokers: self.brokers.clone(), sasl: self.sasl.clone(), tls: self.tls.clone(), client_options: self.client_options.clone() }
    }

    pub fn check(&self, at: &str, problem: &mut Report) {
        self.connection().check(at, problem);
        if let Err(why) = check_topic(&self.topic) {
            problem(format!("{at}.topic"), why);
        }
        if self.timeout_secs == 0 {
            problem(format!("{at}.timeout_secs"), "must be at least 1".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ForwardConfig, SinkConfig, SourceConfig};

    #[test]
    fn kafka_source_sink_and_forward_parse() {
        let yaml = r#"
sources:
  harbor: { kind: harbor, forward: { kind: kafka, brokers: "k1:9092", topic: images.harbor } }
  k: { kind: kafka, brokers: "k1:9092, k2:9093", topic: images, topics: [more], group: acceld, ack: stored,
       dead_letter_topic: images.dead, max_in_flight: 8, session_timeout_secs: 10, rejoin_stalled_secs: 60,
       sasl: { mechanism: SCRAM-SHA-512, user: u, password: hunter2 }, tls: { ca_file: /etc/ca.pem },
       client_options: { fetch.max.bytes: 1048576 } }
sinks:
  r: { kind: kafka, brokers: [ "k1:9092" ], topic: results, key: id, timeout_secs: 3 }
pipelines: [{ name: p, sources: [k], sinks: [r], convert: [{ driver: estargz }] }]
"#;
        let c = Config::parse(yaml, "t", &|_| None).unwrap_or_else(|e| panic!("{e}"));
        let SourceConfig::Kafka(k) = &c.sources["k"] else { panic!() };
        assert_eq!(k.brokers, ["k1:9092", "k2:9093"]);
        assert_eq!(k.all_topics(), ["images", "more"]);
        assert_eq!((k.ack, k.max_in_flight, k.session_timeout_secs, k.rejoin_stalled_secs), (AckWhen::Stored, 8, 10, 60));
        assert_eq!(k.client_options["fetch.max.bytes"], "1048576");
        let sasl = k.sasl.as_ref().unwrap();
        assert_eq!(sasl.password.expose(), "hunter2");
        assert!(!format!("{k:?}").contains("hunter2"), "the password shows in {k:?}");
        let SinkConfig::Kafka(r) = &c.sinks["r"] else { panic!() };
        assert_eq!((r.key, r.timeout_secs, r.topic.as_str()), (KafkaKey::Id, 3, "results"));
        assert!(matches!(&c.sources["harbor"], SourceConfig::Harbor { forward: Some(ForwardConfig::Kafka(_)) }));
        // Defaults.
        let c = Config::parse("sources: { k: { kind: kafka, brokers: \"h:1\", topic: t, group: g } }", "t", &|_| None).unwrap();
        let SourceConfig::Kafka(k) = &c.sources["k"] else { panic!() };
        assert_eq!((k.ack, k.max_in_flight, k.session_timeout_secs, k.rejoin_stalled_secs), (AckWhen::Finished, 64, 30, 0));
        let c = Config::parse("sinks: { s: { kind: kafka, brokers: \"h:1\", topic: t } }", "t", &|_| None).unwrap();
        let SinkConfig::Kafka(s) = &c.sinks["s"] else { panic!() };
        assert_eq!((s.key, s.timeout_secs), (KafkaKey::Subject, 10));
    }

    #[test]
    fn a_topic_named_twice_and_transactional_producers_are_refused() {
        for (yaml, path) in [
            ("sources: { k: { kind: kafka, brokers: \"h:1\", topic: a, topics: [a], group: g } }", "sources.k.topics[0]"),
            ("sources: { k: { kind: kafka, brokers: \"h:1\", topics: [a, b, a], group: g } }", "sources.k.topics[2]"),
            ("sinks: { s: { kind: kafka, brokers: \"h:1\", topic: t, client_options: { transactional.id: x } } }", "sinks.s.client_options.transactional.id"),
        ] {
            let e = Config::parse(yaml, "t", &|_| None).unwrap_err();
            assert!(e.problems().iter().any(|p| p.path == path), "{yaml}: {e}");
        }
    }

    #[test]
    fn bad_kafka_values_are_reported_with_their_paths() {
        let bad = r#"
sources:
  k: { kind: kafka, brokers: "nohost, kafka://h:9092, h:99999", topics: ["a b", ok], group: "", dead_letter_topic: ok,
       max_in_flight: 0, session_timeout_secs: 0, rejoin_stalled_secs: 0,
       sasl: { mechanism: MD5, user: "", password: p }, tls: { cert_file: /c.pem },
       client_options: { group.id: x, sasl.kerberos.keytab: y, "bad key": z } }
  none: { kind: kafka, brokers: [], group: g }
  harbor: { kind: harbor, forward: { kind: kafka, brokers: "h:1", topic: "", timeout_secs: 0 } }
sinks:
  s: { kind: kafka, brokers: "h:1", topic: "x/y" }
"#;
        let e = Config::parse(bad, "t", &|_| None).unwrap_err();
        let paths: Vec<&str> = e.problems().iter().map(|p| p.path.as_str()).collect();
        for want in [
            "sources.k.brokers[0]",
            "sources.k.brokers[1]",
            "sources.k.brokers[2]",
            "sources.k.topics[0]",
            "sources.k.group",
            "sources.k.dead_letter_topic",
            "sources.k.max_in_flight",
            "sources.k.session_timeout_secs",
            "sources.k.sasl.mechanism",
            "sources.k.sasl.user",
            "sources.k.tls",
            "sources.k.client_options.group.id",
            "sources.k.client_options.sasl.kerberos.keytab",
            "sources.k.client_options.bad key",
            "sources.none.brokers",
            "sources.none.topic",
            "sources.harbor.forward.topic",
            "sources.harbor.forward.timeout_secs",
            "sinks.s.topic",
        ] {
            assert!(paths.contains(&want), "{want} not in {paths:?}\n{e}");
        }
        let e = Config::parse(
            "sources: { k: { kind: kafka, brokers: \"h:1\", topic: t, group: g, session_timeout_secs: 30, rejoin_stalled_secs: 10 } }",
            "t",
            &|_| None,
        )
        .unwrap_err();
        assert!(e.problems().iter().any(|p| p.path == "sources.k.rejoin_stalled_secs"), "{e}");
        let e = Config::parse("sources: { k: { kind: kafka, brokers: \"h:1\", topic: t, group: g, partition: 1 } }", "t", &|_| None).unwrap_err();
        assert!(e.to_string().contains("partition"), "{e}");
    }

    #[test]
    fn topics() {
        assert!(check_topic("images.pushed-1_x").is_ok());
        assert!(check_topic("").is_err());
        assert!(check_topic("a b").is_err());
        assert!(check_topic("..").is_err());
        assert!(check_topic(&"x".repeat(250)).is_err());
        assert!(check_broker("localhost:9092").is_ok());
        assert!(check_broker("[::1]:9092").is_ok());
        assert!(check_broker("localhost").is_err());
        assert!(check_broker("h:0").is_err());
    }
}
