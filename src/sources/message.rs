//! Bus message bodies read into events: Harbor webhook payloads (default and CloudEvents), the
//! CNCF distribution registry's notification envelope, and a plain `{"reference": "…"}`.
//!
//! Every bus source (NATS, JetStream, Kafka) reads its messages here, so one body means the
//! same thing whichever bus carried it.

use serde::Deserialize;
use serde_json::Value;

use super::harbor::{self, PayloadError, Webhook};
use crate::oci::{media_types, Digest, Reference};
use crate::pipeline::Event;

/// `Content-Type` of the distribution registry's notification envelope.
pub const DISTRIBUTION_EVENTS_CONTENT_TYPE: &str = "application/vnd.docker.distribution.events.v1+json";

/// Which kind of body a message was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// Harbor's default webhook payload.
    Harbor,
    /// Harbor's CloudEvents payload.
    HarborCloudEvents,
    /// The distribution registry's `{"events": [...]}` envelope.
    Distribution,
    /// `{"reference": "host/repo:tag[@digest]"}`.
    Reference,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Harbor => "harbor",
            MessageKind::HarborCloudEvents => "harbor-cloudevents",
            MessageKind::Distribution => "distribution",
            MessageKind::Reference => "reference",
        }
    }
}

/// A message read: the pushes it reports, and what in it was left out and why (other event
/// types, other actions, blob pushes).
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub kind: MessageKind,
    pub events: Vec<Event>,
    pub ignored: Vec<String>,
}

/// Why a message body is not a usable event. `field` is the JSON path of the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("message body is empty")]
    Empty,
    #[error("message body is not valid JSON: {0}")]
    Json(String),
    #[error("message body is not a known event: it must be a JSON object with `reference` (an image reference), `events` (a registry notification), or `type` (a Harbor webhook); it has {found}")]
    Unrecognized { found: String },
    #[error("{field} is missing or empty")]
    Missing { field: String },
    #[error("{field}: {why}")]
    Invalid { field: String, why: String },
}

impl MessageError {
    /// The JSON path of the offending value; empty when the body as a whole is wrong.
    pub fn field(&self) -> &str {
        match self {
            MessageError::Empty | MessageError::Json(_) | MessageError::Unrecognized { .. } => "",
            MessageError::Missing { field } | MessageError::Invalid { field, .. } => field,
        }
    }
}

impl From<PayloadError> for MessageError {
    fn from(e: PayloadError) -> Self {
        match e {
            PayloadError::Json(j) => MessageError::Json(j),
            PayloadError::Missing { field } => MessageError::Missing { field },
            PayloadError::Invalid { field, why } => MessageError::Invalid { field, why },
        }
    }
}

/// Reads a message body into events; see [`read_message`] for what was left out.
pub fn parse_message(body: &[u8], content_type: Option<&str>, origin: &str) -> Result<Vec<Event>, MessageError> {
    read_message(body, content_type, origin).map(|p| p.events)
}

/// Reads a message body. `content_type` is the message's `Content-Type` header, if the bus
/// carries one; without it the body's shape decides. `origin` names the source in the events.
pub fn read_message(body: &[u8], content_type: Option<&str>, origin: &str) -> Result<Parsed, MessageError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(MessageError::Empty);
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| MessageError::Json(e.to_string()))?;
    let Some(object) = value.as_object() else {
        return Err(MessageError::Invalid { field: ".".into(), why: format!("must be a JSON object, not {}", kind_of(&value)) });
    };
    let media_type = content_type.and_then(|c| c.split(';').next()).map(|m| m.trim().to_ascii_lowercase());
    if media_type.as_deref() == Some(DISTRIBUTION_EVENTS_CONTENT_TYPE) || object.contains_key("events") {
        return distribution(value, origin);
    }
    if object.contains_key("reference") {
        return plain(value, origin);
    }
    if object.contains_key("type") || object.contains_key("specversion") {
        return match harbor::parse(body, content_type, origin)? {
            Webhook::Pushed { format, events, .. } => {
                let kind = match format {
                    harbor::Format::Default => MessageKind::Harbor,
                    harbor::Format::CloudEvents => MessageKind::HarborCloudEvents,
                };
                Ok(Parsed { kind, events, ignored: Vec::new() })
            }
            Webhook::Ignored { format, event_type } => {
                let kind = if format == harbor::Format::CloudEvents { MessageKind::HarborCloudEvents } else { MessageKind::Harbor };
                Ok(Parsed { kind, events: Vec::new(), ignored: vec![format!("Harbor event type {event_type} does not trigger conversions")] })
            }
        };
    }
    let mut keys: Vec<&str> = object.keys().map(String::as_str).take(8).collect();
    keys.sort_unstable();
    let found = if keys.is_empty() { "no keys".to_string() } else { format!("keys {}", keys.join(", ")) };
    Err(MessageError::Unrecognized { found })
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Deserializes with the path of a wrongly typed value in the error.
fn typed<T: serde::de::DeserializeOwned>(v: Value, prefix: &str) -> Result<T, MessageError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let inner = e.path().to_string();
        let field = match (prefix.is_empty(), inner.as_str()) {
            (true, p) => p.to_string(),
            (false, ".") => prefix.to_string(),
            (false, p) => format!("{prefix}.{p}"),
        };
        MessageError::Invalid { field, why: e.into_inner().to_string() }
    })
}

#[derive(Deserialize)]
struct Plain {
    reference: String,
}

fn plain(value: Value, origin: &str) -> Result<Parsed, MessageError> {
    let p: Plain = typed(value, "")?;
    let reference: Reference = p
        .reference
        .trim()
        .parse()
        .map_err(|e: crate::oci::ReferenceError| MessageError::Invalid { field: "reference".into(), why: e.to_string() })?;
    if !p.reference.trim().contains('/') {
        // `nginx` would silently mean Docker Hub; a bus message names its registry.
        return Err(MessageError::Invalid {
            field: "reference".into(),
            why: format!("{:?} names no registry host; write host/repository[:tag][@digest]", p.reference),
        });
    }
    Ok(Parsed { kind: MessageKind::Reference, events: vec![Event::new(reference, origin)], ignored: Vec::new() })
}

#[derive(Deserialize)]
struct Envelope {
    events: Option<Vec<Value>>,
}

#[derive(Deserialize)]
struct Notification {
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    target: Option<Target>,
    #[serde(default)]
    request: Option<Request>,
}

#[derive(Deserialize)]
struct Target {
    #[serde(default, rename = "mediaType")]
    media_type: Option<String>,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    repository: Option<String>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    url: Option<String>,
}

#[derive(Deserialize)]
struct Request {
    #[serde(default)]
    host: Option<String>,
}

fn distribution(value: Value, origin: &str) -> Result<Parsed, MessageError> {
    let envelope: Envelope = typed(value, "")?;
    let events = envelope.events.ok_or_else(|| MessageError::Missing { field: "events".into() })?;
    if events.is_empty() {
        return Err(MessageError::Invalid { field: "events".into(), why: "lists no event".into() });
    }
    let mut out = Parsed { kind: MessageKind::Distribution, events: Vec::new(), ignored: Vec::new() };
    for (i, e) in events.into_iter().enumerate() {
        let at = format!("events[{i}]");
        let n: Notification = typed(e, &at)?;
        let action = n.action.ok_or_else(|| MessageError::Missing { field: format!("{at}.action") })?;
        if action != "push" {
            out.ignored.push(format!("{at}: action {action:?} does not trigger conversions (only \"push\")"));
            continue;
        }
        let target = n.target.ok_or_else(|| MessageError::Missing { field: format!("{at}.target") })?;
        let media_type = target.media_type.unwrap_or_default();
        if !media_types::is_manifest(&media_type) && !media_types::is_index(&media_type) {
            let what = if media_type.is_empty() { "no media type".to_string() } else { format!("media type {media_type}") };
            out.ignored.push(format!("{at}: the pushed target has {what}; only image manifests and indexes are converted"));
            continue;
        }
        let host = n
            .request
            .and_then(|r| r.host)
            .filter(|h| !h.is_empty())
            .or_else(|| target.url.as_deref().and_then(url_host))
            .ok_or_else(|| MessageError::Missing { field: format!("{at}.request.host") })?;
        let repository =
            target.repository.filter(|r| !r.is_empty()).ok_or_else(|| MessageError::Missing { field: format!("{at}.target.repository") })?;
        let tag = target.tag.filter(|t| !t.is_empty());
        let digest = match target.digest.filter(|d| !d.is_empty()) {
            Some(d) => Some(d.parse::<Digest>().map_err(|e| MessageError::Invalid { field: format!("{at}.target.digest"), why: e.to_string() })?),
            None => None,
        };
        if tag.is_none() && digest.is_none() {
            return Err(MessageError::Missing { field: format!("{at}.target.digest") });
        }
        let repo: Reference = format!("{host}/{repository}").parse().map_err(|e: crate::oci::ReferenceError| MessageError::Invalid {
            field: format!("{at}.target.repository"),
            why: format!("{e} (with request.host {host:?})"),
        })?;
        let reference = match &tag {
            Some(t) => repo.with_tag(t).map_err(|e| MessageError::Invalid { field: format!("{at}.target.tag"), why: e.to_string() })?,
            None => repo,
        };
        let reference = match digest {
            Some(d) => reference.with_digest(d),
            None => reference,
        };
        out.events.push(Event::new(reference, origin));
    }
    Ok(out)
}

/// `host[:port]` of a URL such as `http://127.0.0.1:5000/v2/repo/manifests/sha256:…`.
fn url_host(u: &str) -> Option<String> {
    let url = url::Url::parse(u).ok()?;
    let host = url.host_str()?;
    Some(match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:76525f02955aec223342400a080c73024c995c9db1ba2eabf7505cf3bdf3f1f0";

    /// Shaped as the distribution registry's notifications: a manifest push with tag, a blob
    /// push, and a pull.
    fn envelope() -> String {
        serde_json::json!({ "events": [
            {
                "id": "320678d8-ca14-430f-8bb6-4ca139cd83f7",
                "timestamp": "2016-03-09T14:44:26.402973972-08:00",
                "action": "push",
                "target": {
                    "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                    "size": 708, "digest": D, "length": 708,
                    "repository": "library/nginx",
                    "url": format!("http://127.0.0.1:5000/v2/library/nginx/manifests/{D}"),
                    "tag": "1.25"
                },
                "request": { "id": "6df24a34", "addr": "127.0.0.1:51234", "host": "127.0.0.1:5000", "method": "PUT", "useragent": "skopeo" },
                "actor": {},
                "source": { "addr": "reg:5000", "instanceID": "a6a4f0b1" }
            },
            {
                "action": "push",
                "target": { "mediaType": "application/octet-stream", "digest": D, "repository": "library/nginx" },
                "request": { "host": "127.0.0.1:5000" }
            },
            {
                "action": "pull",
                "target": { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": D, "repository": "library/nginx" },
                "request": { "host": "127.0.0.1:5000" }
            }
        ]})
        .to_string()
    }

    #[test]
    fn distribution_envelope_keeps_manifest_pushes() {
        let p = read_message(envelope().as_bytes(), Some(DISTRIBUTION_EVENTS_CONTENT_TYPE), "bus").unwrap();
        assert_eq!(p.kind, MessageKind::Distribution);
        let refs: Vec<String> = p.events.iter().map(|e| e.reference.to_string()).collect();
        assert_eq!(refs, [format!("127.0.0.1:5000/library/nginx:1.25@{D}")]);
        assert_eq!(p.events[0].origin, "bus");
        assert_eq!(p.ignored.len(), 2, "{:?}", p.ignored);
        assert!(p.ignored[0].contains("application/octet-stream"), "{:?}", p.ignored);
        assert!(p.ignored[1].contains("\"pull\""), "{:?}", p.ignored);
        // Recognised by shape without the content type, too.
        assert_eq!(parse_message(envelope().as_bytes(), None, "bus").unwrap().len(), 1);
    }

    #[test]
    fn distribution_digest_only_and_host_from_url() {
        let body = serde_json::json!({ "events": [{
            "action": "push",
            "target": { "mediaType": media_types::OCI_INDEX, "digest": D, "repository": "a/b",
                        "url": format!("http://reg.example.com:5000/v2/a/b/manifests/{D}") }
        }]});
        let events = parse_message(body.to_string().as_bytes(), None, "o").unwrap();
        assert_eq!(events[0].reference.to_string(), format!("reg.example.com:5000/a/b@{D}"));
    }

    #[test]
    fn distribution_errors_name_the_field() {
        let field = |v: Value| read_message(v.to_string().as_bytes(), None, "o").unwrap_err().field().to_string();
        let push = |target: Value, request: Value| serde_json::json!({ "events": [{ "action": "push", "target": target, "request": request }] });
        let m = media_types::OCI_MANIFEST;
        assert_eq!(field(serde_json::json!({ "events": [] })), "events");
        assert_eq!(field(serde_json::json!({ "events": "x" })), "events");
        assert_eq!(field(serde_json::json!({ "events": [{ "target": {} }] })), "events[0].action");
        assert_eq!(field(push(serde_json::json!({ "mediaType": m, "repository": "a/b", "tag": "1" }), serde_json::json!({}))), "events[0].request.host");
        assert_eq!(field(push(serde_json::json!({ "mediaType": m, "tag": "1" }), serde_json::json!({ "host": "h" }))), "events[0].target.repository");
        assert_eq!(field(push(serde_json::json!({ "mediaType": m, "repository": "a/b" }), serde_json::json!({ "host": "h" }))), "events[0].target.digest");
        assert_eq!(
            field(push(serde_json::json!({ "mediaType": m, "repository": "a/b", "digest": "md5:1" }), serde_json::json!({ "host": "h" }))),
            "events[0].target.digest"
        );
        assert_eq!(field(push(serde_json::json!({ "mediaType": m, "repository": "a/b", "tag": "bad tag" }), serde_json::json!({ "host": "h" }))), "events[0].target.tag");
        assert_eq!(field(push(serde_json::json!({ "mediaType": m, "repository": "A/B", "tag": "1" }), serde_json::json!({ "host": "h" }))), "events[0].target.repository");
        assert_eq!(field(serde_json::json!({ "events": [{ "action": 3 }] })), "events[0].action");
    }

    #[test]
    fn plain_reference() {
        let events = parse_message(format!(r#"{{"reference":"h.io:5000/a/b:1@{D}"}}"#).as_bytes(), Some("application/json"), "o").unwrap();
        assert_eq!(events[0].reference.to_string(), format!("h.io:5000/a/b:1@{D}"));
        let e = read_message(br#"{"reference":"nginx"}"#, None, "o").unwrap_err();
        assert_eq!(e.field(), "reference");
        assert!(e.to_string().contains("names no registry host"), "{e}");
        assert_eq!(read_message(br#"{"reference":"h.io/Bad"}"#, None, "o").unwrap_err().field(), "reference");
        assert_eq!(read_message(br#"{"reference":5}"#, None, "o").unwrap_err().field(), "reference");
    }

    #[test]
    fn harbor_payloads() {
        let body = r#"{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"resource_url":"h.io/library/nginx:latest"}]}}"#;
        let p = read_message(body.as_bytes(), None, "o").unwrap();
        assert_eq!((p.kind, p.events.len()), (MessageKind::Harbor, 1));
        let ce = r#"{"specversion":"1.0","type":"harbor.artifact.pushed","data":{"resources":[{"resource_url":"h.io/a/b:1"}]}}"#;
        let p = read_message(ce.as_bytes(), Some("application/cloudevents+json"), "o").unwrap();
        assert_eq!((p.kind, p.events.len()), (MessageKind::HarborCloudEvents, 1));
        let p = read_message(br#"{"type":"DELETE_ARTIFACT","event_data":{}}"#, None, "o").unwrap();
        assert!(p.events.is_empty());
        assert!(p.ignored[0].contains("DELETE_ARTIFACT"), "{:?}", p.ignored);
        assert_eq!(read_message(br#"{"type":"PUSH_ARTIFACT"}"#, None, "o").unwrap_err().field(), "event_data");
    }

    #[test]
    fn bodies_that_are_no_event() {
        assert_eq!(read_message(b"", None, "o").unwrap_err(), MessageError::Empty);
        assert_eq!(read_message(b" \n", None, "o").unwrap_err(), MessageError::Empty);
        assert!(matches!(read_message(b"{oops", None, "o").unwrap_err(), MessageError::Json(_)));
        let e = read_message(b"[1,2]", None, "o").unwrap_err();
        assert!(e.to_string().contains("an array"), "{e}");
        let e = read_message(br#"{"image":"h.io/a:1","x":1}"#, None, "o").unwrap_err();
        assert_eq!(e, MessageError::Unrecognized { found: "keys image, x".into() });
        assert!(e.to_string().contains("`reference`"), "{e}");
    }
}
