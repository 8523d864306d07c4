//! `pipelines.yaml`: the schema shared by `accelctl` and `acceld`, `${VAR}` expansion, and
//! validation that reports every problem with its path.

pub mod bus;
pub mod kafka;
mod load;
mod units;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use kafka::{KafkaConnection, KafkaKey, KafkaPublishConfig, KafkaSasl, KafkaSourceConfig, KafkaTls};
pub use bus::{AckWhen, FileSinkConfig, ForwardConfig, HttpSinkConfig, JetStreamSourceConfig, NatsAuth, NatsPublishConfig, NatsSourceConfig};
pub use load::{ConfigError, Problem};
pub use units::{string_or_list, ByteSize, Secret};

use crate::drivers::DriverKind;
use crate::oci::Platform;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HTTP API of `acceld`.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where blobs are kept between pull, convert and push.
    #[serde(default, deserialize_with = "store_of_default_kind")]
    pub store: StoreConfig,
    /// Durable task database, queues and retries of `acceld`.
    #[serde(default)]
    pub tasks: TasksConfig,
    /// Per registry host (`host` or `host:port`, as in image references): credentials and
    /// transport.
    #[serde(default)]
    pub registries: BTreeMap<String, RegistryConfig>,
    /// Docker `config.json` to take credentials from for hosts not listed under `registries`.
    /// Default: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, when present.
    #[serde(default)]
    pub docker_config: Option<PathBuf>,
    /// Named event sources; pipelines refer to them by name.
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
    /// Named result sinks; pipelines refer to them by name.
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkConfig>,
    /// What to convert, how, and where results go.
    #[serde(default)]
    pub pipelines: Vec<PipelineConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the API listens on.
    pub listen: String,
    /// When set, every API request must carry exactly this `Authorization` header value.
    #[serde(deserialize_with = "units::non_empty_secret")]
    pub auth_header: Option<Secret>,
    /// Request bodies larger than this are refused with 413.
    pub max_body_bytes: ByteSize,
    /// On SIGINT/SIGTERM, running conversions get this long to finish; queued ones stay queued
    /// for the next start.
    pub shutdown_grace_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { listen: "127.0.0.1:2077".into(), auth_header: None, max_body_bytes: ByteSize(1 << 20), shutdown_grace_secs: 60 }
    }
}

/// Durable tasks of `acceld`: where they are kept, how long, how many wait, how failures retry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TasksConfig {
    /// Task database file. Default: `$XDG_DATA_HOME/accel/tasks.redb` or
    /// `~/.local/share/accel/tasks.redb`.
    pub path: Option<PathBuf>,
    /// Finished (completed or failed) tasks are deleted this long after they finished.
    pub retention_secs: u64,
    /// Tasks waiting for a worker, per pipeline. When full, new events are refused with 503 so
    /// the sender retries later.
    pub queue_size: usize,
    /// Attempts at a task whose failures are retryable (5xx, timeouts, connection resets),
    /// the first one included. Permanent failures are not retried.
    pub max_attempts: u32,
    /// Wait before the second attempt; it doubles for each further attempt.
    pub retry_backoff_secs: u64,
    /// Longest wait between two attempts.
    pub retry_backoff_max_secs: u64,
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            path: None,
            retention_secs: 7 * 24 * 3600,
            queue_size: 1024,
            max_attempts: 5,
            retry_backoff_secs: 5,
            retry_backoff_max_secs: 300,
        }
    }
}

/// `store` without `kind` is the embedded store, the default.
fn store_of_default_kind<'de, D: serde::Deserializer<'de>>(d: D) -> Result<StoreConfig, D::Error> {
    use serde::de::Error;
    let mut v = serde_yaml::Value::deserialize(d)?;
    if let serde_yaml::Value::Mapping(m) = &mut v {
        if !m.contains_key("kind") {
            m.insert("kind".into(), "embedded".into());
        }
    }
    StoreConfig::deserialize(v).map_err(D::Error::custom)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// Content-addressed blobs on local disk (no external service).
    Embedded {
        /// Directory of the store. Default: `$XDG_CACHE_HOME/accel/store` or `~/.cache/accel/store`.
        #[serde(default)]
        path: Option<PathBuf>,
        /// Least recently used blobs are evicted beyond this size.
        #[serde(default = "default_store_max_size")]
        max_size: ByteSize,
    },
    /// The content store of a running containerd (1.3 or newer), through its gRPC API.
    /// Content is held by a containerd lease while a conversion uses it.
    Containerd {
        /// containerd's gRPC socket (`[grpc] address` in its config).
        #[serde(default = "default_containerd_address")]
        address: PathBuf,
        /// containerd namespace that holds the blobs, leases and images.
        #[serde(default = "default_containerd_namespace")]
        namespace: String,
        /// Also record each converted image in containerd's image store under its target
        /// reference, so `ctr -n NAMESPACE images ls` lists it and its content is kept.
        #[serde(default)]
        register_images: bool,
    },
}

fn default_containerd_address() -> PathBuf {
    PathBuf::from("/run/containerd/containerd.sock")
}

fn default_containerd_namespace() -> String {
    "accel".into()
}

fn default_store_max_size() -> ByteSize {
    ByteSize(20 << 30)
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::Embedded { path: None, max_size: default_store_max_size() }
    }
}

/// Credentials and transport for one registry host.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// base64 of `user:secret` (as Harbor shows for robot accounts). The secret may contain `:`.
    #[serde(deserialize_with = "units::non_empty_secret")]
    pub auth: Option<Secret>,
    /// Alternative to `auth`: user name and password given separately.
    pub username: Option<String>,
    #[serde(deserialize_with = "units::non_empty_secret")]
    pub password: Option<Secret>,
    /// Allow plain HTTP and unverified TLS for this host. Hosts on loopback always use HTTP.
    pub insecure: bool,
}

/// One event source, by `kind`. Each kind's module under `src/sources/` builds and runs it.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// Harbor webhooks (`artifact pushed`) posted to `/api/v1/conversions`.
    Harbor {
        /// Forward each accepted webhook into a bus instead of converting it here; the webhook
        /// is answered once the bus has it, and every instance reading the bus shares the work.
        forward: Option<ForwardConfig>,
    },
    /// A NATS core subject (`src/sources/nats.rs`).
    Nats(NatsSourceConfig),
    /// A JetStream durable pull consumer (`src/sources/nats.rs`).
    Jetstream(JetStreamSourceConfig),
    /// Polls a registry's tag lists for new tags and moved digests, for registries without
    /// webhooks (`src/sources/poll/`).
    Poll(crate::sources::poll::PollSourceConfig),
    /// Kafka topics read through a consumer group (`src/sources/kafka.rs`).
    Kafka(KafkaSourceConfig),
}

impl SourceConfig {
    /// The `kind` as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Harbor { .. } => "harbor",
            SourceConfig::Nats(_) => "nats",
            SourceConfig::Jetstream(_) => "jetstream",
            SourceConfig::Poll(_) => "poll",
            SourceConfig::Kafka(_) => "kafka",
        }
    }
}

/// One result sink, by `kind`. Each kind's module under `src/sinks/` builds it.
#[derive(Debug, Clone)]
pub enum SinkConfig {
    /// One JSON result per line on standard output.
    Stdout {},
    /// One JSON result per line appended to a file.
    File(FileSinkConfig),
    /// Each result POSTed to a URL.
    Http(HttpSinkConfig),
    /// Each result published to a NATS subject.
    Nats(NatsPublishConfig),
    /// Each result published to a JetStream subject, waiting for the stream's acknowledgement.
    Jetstream(NatsPublishConfig),
    /// Each result published to a Kafka topic, waiting for the brokers' acknowledgement.
    Kafka(KafkaPublishConfig),
}

impl SinkConfig {
    /// The `kind` as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Stdout {} => "stdout",
            SinkConfig::File(_) => "file",
            SinkConfig::Http(_) => "http",
            SinkConfig::Nats(_) => "nats",
            SinkConfig::Jetstream(_) => "jetstream",
            SinkConfig::Kafka(_) => "kafka",
        }
    }
}

/// Sources and sinks are read by `kind` first, then the rest as that kind's settings, so that
/// an error names the setting (`ack: unknown variant ...`), which serde's tagged enums lose.
mod by_kind {
    use serde::de::{DeserializeOwned, Error};
    use serde::{Deserialize, Deserializer};
    use serde_yaml::Value;

    use super::{ForwardConfig, SinkConfig, SourceConfig};

    /// Removes `kind` from a mapping and returns it.
    fn take_kind<E: Error>(v: &mut Value) -> Result<String, E> {
        let Value::Mapping(m) = v else {
            return Err(E::custom("expected a mapping with `kind`"));
        };
        match m.remove("kind") {
            Some(Value::String(k)) => Ok(k),
            Some(_) => Err(E::custom("`kind` must be a string")),
            None => Err(E::missing_field("kind")),
        }
    }

    /// The settings of one kind, an error naming the setting at fault.
    fn settings<T: DeserializeOwned, E: Error>(v: Value) -> Result<T, E> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." {
                E::custom(inner)
            } else {
                E::custom(format!("{path}: {inner}"))
            }
        })
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Harbor {
        #[serde(default)]
        forward: Option<ForwardConfig>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Nothing {}

    impl<'de> Deserialize<'de> for SourceConfig {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let mut v = Value::deserialize(d)?;
            let kind = take_kind(&mut v)?;
            match kind.as_str() {
                "harbor" => settings::<Harbor, _>(v).map(|h| SourceConfig::Harbor { forward: h.forward }),
                "nats" => settings(v).map(SourceConfig::Nats),
                "jetstream" => settings(v).map(SourceConfig::Jetstream),
                "poll" => settings(v).map(SourceConfig::Poll),
                "kafka" => settings(v).map(SourceConfig::Kafka),
                other => Err(D::Error::unknown_variant(other, &["harbor", "nats", "jetstream", "poll", "kafka"])),
            }
        }
    }

    impl<'de> Deserialize<'de> for SinkConfig {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let mut v = Value::deserialize(d)?;
            let kind = take_kind(&mut v)?;
            match kind.as_str() {
                "stdout" => settings::<Nothing, _>(v).map(|_| SinkConfig::Stdout {}),
                "file" => settings(v).map(SinkConfig::File),
                "http" => settings(v).map(SinkConfig::Http),
                "nats" => settings(v).map(SinkConfig::Nats),
                "jetstream" => settings(v).map(SinkConfig::Jetstream),
                "kafka" => settings(v).map(SinkConfig::Kafka),
                other => Err(D::Error::unknown_variant(other, &["stdout", "file", "http", "nats", "jetstream", "kafka"])),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use crate::config::Config;

        fn problem(yaml: &str) -> String {
            let e = Config::parse(yaml, "t", &|_| None).unwrap_err();
            e.problems().iter().map(|p| format!("{}: {}", p.path, p.message)).collect::<Vec<_>>().join("\n")
        }

        #[test]
        fn an_error_in_a_source_or_sink_names_the_setting() {
            let e = problem("sources: { k: { kind: kafka, brokers: \"h:1\", topic: t, group: g, ack: sometimes } }");
            assert!(e.starts_with("sources.k: ack: unknown variant `sometimes`"), "{e}");
            let e = problem("sources: { k: { kind: kafka, brokers: \"h:1\", topic: t, group: g, max_in_flight: many } }");
            assert!(e.starts_with("sources.k: max_in_flight: invalid type"), "{e}");
            let e = problem("sources: { k: { kind: kafka, brokers: \"h:1\", topic: t, group: g, sasl: { mechanism: PLAIN } } }");
            assert!(e.starts_with("sources.k: sasl: missing field `user`"), "{e}");
            let e = problem("sinks: { s: { kind: http, url: \"http://h/\", timeout_secs: soon } }");
            assert!(e.starts_with("sinks.s: timeout_secs: invalid type"), "{e}");
            let e = problem("sinks: { s: { kind: stdout, path: x } }");
            assert!(e.contains("unknown field `path`"), "{e}");
            let e = problem("sources: { h: { kind: harbor, forward: { kind: kafka, brokers: \"h:1\" } } }");
            assert!(e.starts_with("sources.h: forward:"), "{e}");
            let e = problem("sources: { x: { kind: sqs } }");
            assert!(e.contains("unknown variant `sqs`") && e.contains("kafka"), "{e}");
            let e = problem("sinks: { x: { url: y } }");
            assert!(e.contains("missing field `kind`"), "{e}");
            let e = problem("sinks: { x: [1] }");
            assert!(e.contains("expected a mapping with `kind`"), "{e}");
        }

        #[test]
        fn values_acceld_could_not_use_are_refused_at_load() {
            let e = problem("server: { max_body_bytes: 0 }");
            assert!(e.starts_with("server.max_body_bytes: must be at least 1 byte"), "{e}");
            for bad in ["not-an-addr", "localhost:99999", ":2077", "h: x", " 127.0.0.1:2077", "http://127.0.0.1:2077"] {
                let e = problem(&format!("server: {{ listen: \"{bad}\" }}"));
                assert!(e.starts_with("server.listen: "), "{bad}: {e}");
            }
            for good in ["0.0.0.0:2077", "[::1]:2077", "localhost:0"] {
                Config::parse(&format!("server: {{ listen: \"{good}\" }}"), "t", &|_| None).unwrap_or_else(|e| panic!("{good}: {e}"));
            }
            let e = problem("tasks: { retention_secs: 10000000000000 }");
            assert!(e.starts_with("tasks.retention_secs: must be at most"), "{e}");
            let e = problem("sources: { n: { kind: nats, url: \"http://127.0.0.1:1\", subject: s } }");
            assert!(e.starts_with("sources.n.url: "), "{e}");
            let e = problem("sources: { a: { kind: harbor }, b: { kind: harbor } }");
            assert!(e.starts_with("sources.b: a second Harbor source"), "{e}");
            let e = problem("pipelines: [{ name: p, convert: [{ driver: estargz, tag_suffix: \"-\u{e9}\" }] }]");
            assert!(e.contains("ASCII letters"), "{e}");
        }

        #[test]
        fn a_store_without_kind_is_the_embedded_one() {
            let c = Config::parse("store: { path: /tmp/x, max_size: 1GiB }", "t", &|_| None).unwrap();
            assert!(matches!(&c.store, crate::config::StoreConfig::Embedded { path: Some(p), .. } if p.to_str() == Some("/tmp/x")), "{:?}", c.store);
            let e = problem("store: { address: /run/c.sock }");
            assert!(e.contains("unknown field `address`"), "{e}");
            let e = problem("store: { kind: s3 }");
            assert!(e.contains("unknown variant `s3`"), "{e}");
        }

        #[test]
        fn an_empty_file_is_refused() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("pipelines.yaml");
            for text in ["\n  \n", "# only a comment\n", "---\n"] {
                std::fs::write(&path, text).unwrap();
                let e = Config::load(&path).unwrap_err().to_string();
                assert!(e.contains("the file is empty"), "{text:?}: {e}");
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Unique name; appears in tasks, logs and results.
    pub name: String,
    /// Names of `sources` that feed this pipeline. Empty: all sources.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Which images this pipeline converts. Omitted: all.
    #[serde(default, rename = "match")]
    pub matches: MatchConfig,
    /// Platforms to convert from a multi-platform index (`os/arch[/variant]`). Empty: all.
    #[serde(default)]
    pub platforms: Vec<Platform>,
    /// Conversions made from one pull of the source image.
    pub convert: Vec<ConversionConfig>,
    /// Names of `sinks` that hear each result.
    #[serde(default)]
    pub sinks: Vec<String>,
    /// Conversions of this pipeline `acceld` runs at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

fn default_concurrency() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatchConfig {
    /// Glob patterns over the repository path (without host), e.g. `library/*`.
    pub repositories: Vec<String>,
    /// Glob patterns over the tag.
    pub tags: Vec<String>,
}

impl Default for MatchConfig {
    fn default() -> Self {
        MatchConfig { repositories: vec!["**".into()], tags: vec!["*".into()] }
    }
}

/// One target format and how the target is named.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversionConfig {
    pub driver: DriverKind,
    /// Driver options; see the driver's documentation. Unknown options are errors.
    #[serde(default = "empty_object")]
    pub options: serde_json::Value,
    /// Appended to the source tag to name the target. Default: the driver's (`-esgz`, …).
    #[serde(default)]
    pub tag_suffix: Option<String>,
    /// Push the target to this repository (same registry) instead of the source repository.
    #[serde(default)]
    pub repository: Option<String>,
}

fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}

impl ConversionConfig {
    pub fn new(driver: DriverKind) -> Self {
        ConversionConfig { driver, options: empty_object(), tag_suffix: None, repository: None }
    }

    pub fn tag_suffix(&self) -> &str {
        self.tag_suffix.as_deref().unwrap_or(self.driver.default_tag_suffix())
    }
}
