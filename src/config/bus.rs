//! Config of message-bus sources and sinks (NATS, JetStream; Kafka is in `kafka.rs`), of Harbor webhook forwarding,
//! and of the sinks that need no server (file, HTTP webhook).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::units::{self, Secret};

fn default_nats_url() -> String {
    "nats://127.0.0.1:4222".into()
}

/// How to authenticate to NATS; at most one way.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsAuth {
    /// User name, with `password`.
    pub user: Option<String>,
    #[serde(deserialize_with = "units::non_empty_secret")]
    pub password: Option<Secret>,
    /// Token authentication.
    #[serde(deserialize_with = "units::non_empty_secret")]
    pub token: Option<Secret>,
    /// A `.creds` file (JWT and NKey seed), as `nsc` writes it.
    pub credentials_file: Option<PathBuf>,
}

/// A NATS core subscription.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSourceConfig {
    /// Server URL(s), comma-separated: `nats://host:4222`.
    #[serde(default = "default_nats_url")]
    pub url: String,
    #[serde(default)]
    pub auth: Option<NatsAuth>,
    /// Subject to subscribe to; wildcards (`images.>`) allowed.
    pub subject: String,
    /// Queue group: the instances in one group share the messages (each goes to one of them).
    #[serde(default)]
    pub queue_group: Option<String>,
    /// Messages that are not a usable event are published here, with the reason in the
    /// `Accel-Error` header.
    #[serde(default)]
    pub dead_letter_subject: Option<String>,
}

/// When a message counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckWhen {
    /// Once its tasks are stored (they resume on this instance after a crash).
    #[default]
    Stored,
    /// Once its tasks have finished (another instance takes over after a crash).
    Finished,
}

/// A JetStream stream read through a durable pull consumer: a message is acknowledged only once
/// its tasks are stored, so instances sharing the consumer share the work and a crash before
/// that means redelivery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamSourceConfig {
    /// Server URL(s), comma-separated.
    #[serde(default = "default_nats_url")]
    pub url: String,
    #[serde(default)]
    pub auth: Option<NatsAuth>,
    /// Stream name.
    pub stream: String,
    /// Subjects of the stream, used when `create` makes it.
    #[serde(default, deserialize_with = "units::string_or_list")]
    pub subjects: Vec<String>,
    /// Durable consumer name; every instance with the same name shares its messages.
    pub consumer: String,
    /// Only messages on this subject (wildcards allowed), when the consumer is created.
    #[serde(default)]
    pub filter_subject: Option<String>,
    /// Create the stream and the consumer when they do not exist. Otherwise a missing one is
    /// an error at start-up.
    #[serde(default)]
    pub create: bool,
    /// A message not acknowledged this long after delivery is delivered again.
    #[serde(default = "default_ack_wait")]
    pub ack_wait_secs: u64,
    /// Deliveries of one message at most (-1: no limit).
    #[serde(default = "default_max_deliver")]
    pub max_deliver: i64,
    /// Messages this instance holds at once (and fetches per pull request).
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// When a message is acknowledged: `finished` (default) once its conversions are done, so
    /// that if this instance dies another one takes the message over; `stored` once its tasks
    /// are stored here (they resume when this instance restarts).
    #[serde(default = "default_ack_when")]
    pub ack: AckWhen,
    /// Messages that are not a usable event are published here (with `Accel-Error`).
    #[serde(default)]
    pub dead_letter_subject: Option<String>,
}

fn default_ack_wait() -> u64 {
    30
}
fn default_max_deliver() -> i64 {
    20
}
fn default_ack_when() -> AckWhen {
    AckWhen::Finished
}
fn default_batch() -> usize {
    64
}

/// Where an accepted Harbor webhook is forwarded, so that every instance reading the bus shares
/// the work.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ForwardConfig {
    /// A NATS core subject (no acknowledgement beyond the server's flush).
    Nats(NatsPublishConfig),
    /// A JetStream subject: the webhook is answered once the stream stored the message.
    Jetstream(NatsPublishConfig),
    /// A Kafka topic: the webhook is answered once the brokers acknowledged the record.
    Kafka(super::KafkaPublishConfig),
}

/// Publishing to a NATS subject.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsPublishConfig {
    /// Server URL(s), comma-separated.
    #[serde(default = "default_nats_url")]
    pub url: String,
    #[serde(default)]
    pub auth: Option<NatsAuth>,
    /// Subject to publish to (no wildcards).
    pub subject: String,
    /// Longest wait for the server (and, for JetStream, its acknowledgement).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_timeout() -> u64 {
    10
}

/// JSON lines appended to a file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// File to append to; created when missing.
    pub path: PathBuf,
}

/// An HTTP webhook: each result is POSTed as a CloudEvent (`application/cloudevents+json`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// `http://` or `https://` URL.
    pub url: String,
    /// Longest wait for one request.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Tries per delivery round; then the result waits and is sent again later.
    #[serde(default = "default_http_attempts")]
    pub max_attempts: u32,
    /// Wait after the first failed try; it doubles for each further one.
    #[serde(default = "default_http_backoff")]
    pub retry_backoff_secs: u64,
    /// Extra request headers, e.g. `Authorization`.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
}

fn default_http_attempts() -> u32 {
    3
}
fn default_http_backoff() -> u64 {
    1
}

/// Collects problems of one config section: `(path, message)`.
pub type Report<'a> = dyn FnMut(String, String) + 'a;

impl NatsAuth {
    fn check(&self, at: &str, problem: &mut Report) {
        let ways = [self.user.is_some() || self.password.is_some(), self.token.is_some(), self.credentials_file.is_some()];
        if ways.iter().filter(|w| **w).count() > 1 {
            problem(at.into(), "set one of user/password, token or credentials_file".into());
        }
        if self.user.is_some() != self.password.is_some() {
            problem(at.into(), "user and password go together".into());
        }
    }
}

fn check_url(url: &str, at: &str, problem: &mut Report) {
    for u in url.split(',').map(str::trim) {
        if u.is_empty() || u.chars().any(char::is_whitespace) || u.parse::<async_nats::ServerAddr>().is_err() {
            problem(format!("{at}.url"), format!("{url:?} is not a list of NATS server URLs (nats://host:port, comma-separated)"));
            return;
        }
    }
}

fn check_with(at: String, r: Result<(), String>, problem: &mut Report) {
    if let Err(why) = r {
        problem(at, why);
    }
}

impl NatsSourceConfig {
    pub fn check(&self, at: &str, problem: &mut Report) {
        check_url(&self.url, at, problem);
        if let Some(a) = &self.auth {
            a.check(&format!("{at}.auth"), problem);
        }
        check_with(format!("{at}.subject"), check_subject(&self.subject), problem);
        if let Some(q) = &self.queue_group {
            check_with(format!("{at}.queue_group"), check_name(q), problem);
        }
        if let Some(d) = &self.dead_letter_subject {
            check_with(format!("{at}.dead_letter_subject"), check_publish_subject(d), problem);
            if subject_matches(&self.subject, d) {
                problem(format!("{at}.dead_letter_subject"), format!("{d:?} is read by this source itself (subject {:?})", self.subject));
            }
        }
    }
}

impl JetStreamSourceConfig {
    pub fn check(&self, at: &str, problem: &mut Report) {
        check_url(&self.url, at, problem);
        if let Some(a) = &self.auth {
            a.check(&format!("{at}.auth"), problem);
        }
        check_with(format!("{at}.stream"), check_name(&self.stream), problem);
        check_with(format!("{at}.consumer"), check_name(&self.consumer), problem);
        for (i, s) in self.subjects.iter().enumerate() {
            check_with(format!("{at}.subjects[{i}]"), check_subject(s), problem);
        }
        if self.create && self.subjects.is_empty() {
            problem(format!("{at}.subjects"), "`create: true` needs the stream's subjects".into());
        }
        if let Some(f) = &self.filter_subject {
            check_with(format!("{at}.filter_subject"), check_subject(f), problem);
        }
        if self.ack_wait_secs == 0 {
            problem(format!("{at}.ack_wait_secs"), "must be at least 1".into());
        }
        if self.max_deliver == 0 || self.max_deliver < -1 {
            problem(format!("{at}.max_deliver"), "must be at least 1, or -1 for no limit".into());
        }
        if self.batch == 0 {
            problem(format!("{at}.batch"), "must be at least 1".into());
        }
        if let Some(d) = &self.dead_letter_subject {
            check_with(format!("{at}.dead_letter_subject"), check_publish_subject(d), problem);
            let read = self.filter_subject.iter().chain(&self.subjects).find(|s| subject_matches(s, d));
            if let Some(s) = read {
                problem(format!("{at}.dead_letter_subject"), format!("{d:?} is read by this source itself (subject {s:?})"));
            }
        }
    }
}

impl ForwardConfig {
    pub fn check(&self, at: &str, problem: &mut Report) {
        match self {
            ForwardConfig::Nats(c) | ForwardConfig::Jetstream(c) => c.check(at, problem),
            ForwardConfig::Kafka(c) => c.check(at, problem),
        }
    }
}

impl NatsPublishConfig {
    pub fn check(&self, at: &str, problem: &mut Report) {
        check_url(&self.url, at, problem);
        if let Some(a) = &self.auth {
            a.check(&format!("{at}.auth"), problem);
        }
        check_with(format!("{at}.subject"), check_publish_subject(&self.subject), problem);
        if self.timeout_secs == 0 {
            problem(format!("{at}.timeout_secs"), "must be at least 1".into());
        }
    }
}

impl FileSinkConfig {
    pub fn check(&self, at: &str, problem: &mut Report) {
        if self.path.as_os_str().is_empty() {
            problem(format!("{at}.path"), "must not be empty".into());
        }
    }
}

impl HttpSinkConfig {
    pub fn check(&self, at: &str, problem: &mut Report) {
        match url::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
            Ok(u) => problem(format!("{at}.url"), format!("{:?}: only http:// and https:// URLs with a host are served, not {}:", self.url, u.scheme())),
            Err(e) => problem(format!("{at}.url"), format!("{:?} is not a URL: {e}", self.url)),
        }
        if self.timeout_secs == 0 {
            problem(format!("{at}.timeout_secs"), "must be at least 1".into());
        }
        if self.max_attempts == 0 {
            problem(format!("{at}.max_attempts"), "must be at least 1".into());
        }
        for (k, v) in &self.headers {
            if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
                problem(format!("{at}.headers.{k}"), format!("{k:?} is not a valid header name"));
            }
            if reqwest::header::HeaderValue::from_str(v.expose()).is_err() {
                problem(format!("{at}.headers.{k}"), "the value is not a valid header value".into());
            }
        }
    }
}

/// Whether a message published on `subject` is delivered to a subscription on `pattern`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Checks a subject to publish to: no wildcard, no empty token, no white space.
pub fn check_publish_subject(s: &str) -> Result<(), String> {
    check_subject(s)?;
    if s.split('.').any(|t| t == "*" || t == ">") {
        return Err(format!("{s:?} has a wildcard; messages are published to one subject"));
    }
    Ok(())
}

/// Checks a subject to subscribe to (wildcards allowed).
pub fn check_subject(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.chars().any(char::is_whitespace) {
        return Err(format!("{s:?} has white space"));
    }
    if s.split('.').any(str::is_empty) {
        return Err(format!("{s:?} has an empty token (leading, trailing or double '.')"));
    }
    let tokens: Vec<&str> = s.split('.').collect();
    if tokens[..tokens.len() - 1].contains(&">") {
        return Err(format!("{s:?}: '>' may only be the last token"));
    }
    Ok(())
}

/// Checks a stream or consumer name.
pub fn check_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.chars().any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\')) {
        return Err(format!("{s:?} may not hold '.', '*', '>', '/', '\\' or white space"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, SinkConfig, SourceConfig};

    const ALL: &str = r#"
sources:
  harbor: { kind: harbor, forward: { kind: jetstream, subject: images.harbor } }
  bus: { kind: jetstream, url: "nats://a:4222,nats://b:4222", stream: IMAGES, subjects: "images.>", consumer: acceld, create: true,
         ack: stored, ack_wait_secs: 60, max_deliver: -1, batch: 8, dead_letter_subject: dead.images }
  core: { kind: nats, subject: "images.*", queue_group: acceld, auth: { token: t } }
sinks:
  out: { kind: stdout }
  file: { kind: file, path: /tmp/r.jsonl }
  hook: { kind: http, url: "https://h.example.com/x", headers: { Authorization: "Bearer x" } }
  n: { kind: nats, subject: results }
  j: { kind: jetstream, subject: results.js, timeout_secs: 3 }
pipelines: [{ name: p, sources: [bus, core], sinks: [out, file, hook, n, j], convert: [{ driver: estargz }] }]
"#;

    #[test]
    fn every_kind_parses() {
        let c = Config::parse(ALL, "t", &|_| None).unwrap_or_else(|e| panic!("{e}"));
        let SourceConfig::Jetstream(j) = &c.sources["bus"] else { panic!() };
        assert_eq!((j.ack, j.max_deliver, j.subjects.clone()), (AckWhen::Stored, -1, vec!["images.>".to_string()]));
        let SourceConfig::Nats(n) = &c.sources["core"] else { panic!() };
        assert_eq!((n.url.as_str(), n.queue_group.as_deref()), ("nats://127.0.0.1:4222", Some("acceld")));
        assert!(matches!(&c.sources["harbor"], SourceConfig::Harbor { forward: Some(ForwardConfig::Jetstream(_)) }));
        let kinds: Vec<&str> = c.sinks.values().map(SinkConfig::kind).collect();
        assert_eq!(kinds, ["file", "http", "jetstream", "nats", "stdout"]);
        let SinkConfig::Http(h) = &c.sinks["hook"] else { panic!() };
        assert_eq!((h.timeout_secs, h.max_attempts), (10, 3));
        // Defaults of a JetStream source.
        let c = Config::parse("sources: { b: { kind: jetstream, stream: S, consumer: c } }", "t", &|_| None).unwrap();
        let SourceConfig::Jetstream(j) = &c.sources["b"] else { panic!() };
        assert_eq!((j.ack, j.ack_wait_secs, j.create), (AckWhen::Finished, 30, false));
    }

    #[test]
    fn bad_values_are_reported_with_their_paths() {
        let bad = r#"
sources:
  bus: { kind: jetstream, stream: "A.B", consumer: "", create: true, ack_wait_secs: 0, max_deliver: 0, dead_letter_subject: "images.dead", subjects: ["images.>"] }
  core: { kind: nats, subject: "a..b", dead_letter_subject: "x.*", auth: { user: u, token: t } }
  harbor: { kind: harbor, forward: { kind: nats, subject: "" } }
sinks:
  hook: { kind: http, url: "ftp://h/x", max_attempts: 0, headers: { "Bad Header": "v" } }
  n: { kind: nats, subject: "r.>" }
"#;
        let e = Config::parse(bad, "t", &|_| None).unwrap_err();
        let paths: Vec<&str> = e.problems().iter().map(|p| p.path.as_str()).collect();
        for want in [
            "sources.bus.stream",
            "sources.bus.consumer",
            "sources.bus.ack_wait_secs",
            "sources.bus.max_deliver",
            "sources.bus.dead_letter_subject",
            "sources.core.auth",
            "sources.core.subject",
            "sources.core.dead_letter_subject",
            "sources.harbor.forward.subject",
            "sinks.hook.url",
            "sinks.hook.max_attempts",
            "sinks.hook.headers.Bad Header",
            "sinks.n.subject",
        ] {
            assert!(paths.contains(&want), "{want} not in {paths:?}\n{e}");
        }
        let unknown = Config::parse("sources: { b: { kind: jetstream, stream: S, consumer: c, acks: 1 } }", "t", &|_| None).unwrap_err();
        assert!(unknown.to_string().contains("acks"), "{unknown}");
        let kind = Config::parse("sinks: { b: { kind: carrier-pigeon } }", "t", &|_| None).unwrap_err();
        assert!(kind.to_string().contains("carrier-pigeon"), "{kind}");
    }

    #[test]
    fn subjects() {
        assert!(check_subject("images.>").is_ok());
        assert!(check_subject("a.*.c").is_ok());
        assert!(check_subject("a.>.c").is_err());
        assert!(check_subject("a..c").is_err());
        assert!(check_subject("").is_err());
        assert!(check_subject("a b").is_err());
        assert!(check_publish_subject("a.*").is_err());
        assert!(check_publish_subject("accel.results").is_ok());
        assert!(check_name("ACCEL").is_ok());
        assert!(check_name("a.b").is_err());
        assert!(subject_matches("images.>", "images.pushed"));
        assert!(subject_matches("images.*", "images.pushed"));
        assert!(!subject_matches("images.*", "images.pushed.x"));
        assert!(!subject_matches("images", "images.dead"));
        assert!(subject_matches("a.b", "a.b"));
    }
}
