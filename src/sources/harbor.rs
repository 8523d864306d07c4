//! Harbor webhooks: the default payload (`type: PUSH_ARTIFACT`, `event_data`) and the
//! CloudEvents payload (`type: harbor.artifact.pushed`, `data`), read into events.
//!
//! Harbor fills a resource from the artifact's first tag, or from its digest when it has none:
//! then `tag` holds the digest too and `resource_url` is `host/project/repo@sha256:…`.

use serde::Deserialize;
use serde_json::Value;

use crate::oci::{Digest, Reference};
use crate::pipeline::Event;

/// Event type of an artifact push in the default payload.
pub const PUSH_ARTIFACT: &str = "PUSH_ARTIFACT";
/// Event type of an artifact push in the CloudEvents payload.
pub const CLOUDEVENTS_PUSH: &str = "harbor.artifact.pushed";
/// `Content-Type` Harbor sends with CloudEvents payloads.
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json";

/// Which of Harbor's payload formats a body was in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Default,
    CloudEvents,
}

/// What a webhook body asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Webhook {
    /// Artifacts were pushed.
    Pushed { format: Format, operator: Option<String>, events: Vec<Event> },
    /// Another event type; it is acknowledged and otherwise ignored.
    Ignored { format: Format, event_type: String },
}

/// Why a body is not a usable Harbor webhook. `field` is the JSON path of the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("request body is not valid JSON: {0}")]
    Json(String),
    #[error("{field} is missing")]
    Missing { field: String },
    #[error("{field}: {why}")]
    Invalid { field: String, why: String },
}

impl PayloadError {
    /// The JSON path of the offending value; empty for a body that is not JSON at all.
    pub fn field(&self) -> &str {
        match self {
            PayloadError::Json(_) => "",
            PayloadError::Missing { field } | PayloadError::Invalid { field, .. } => field,
        }
    }
}

#[derive(Deserialize)]
struct DefaultPayload {
    #[serde(rename = "type")]
    event_type: Option<String>,
    #[serde(default)]
    operator: Option<String>,
    #[serde(default)]
    event_data: Option<Value>,
}

#[derive(Deserialize)]
struct CloudEvent {
    #[serde(rename = "type")]
    event_type: Option<String>,
    #[serde(default)]
    operator: Option<String>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct EventData {
    resources: Option<Vec<Resource>>,
}

#[derive(Deserialize)]
struct Resource {
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    resource_url: Option<String>,
}

/// Reads a webhook body. `content_type` is the request's `Content-Type`, if any; a body with
/// `specversion` is read as CloudEvents whatever the header says. `origin` names the source
/// in the events.
pub fn parse(body: &[u8], content_type: Option<&str>, origin: &str) -> Result<Webhook, PayloadError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| PayloadError::Json(e.to_string()))?;
    if !value.is_object() {
        return Err(PayloadError::Invalid { field: ".".into(), why: "must be a JSON object".into() });
    }
    let cloudevents = value.get("specversion").is_some()
        || content_type.is_some_and(|c| c.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case(CLOUDEVENTS_CONTENT_TYPE)));
    if cloudevents {
        let ce: CloudEvent = typed(value, "")?;
        let event_type = ce.event_type.ok_or_else(|| missing("type"))?;
        if event_type != CLOUDEVENTS_PUSH {
            return Ok(Webhook::Ignored { format: Format::CloudEvents, event_type });
        }
        let data = match ce.data.ok_or_else(|| missing("data"))? {
            // The CloudEvents JSON format allows data as a string when it is not itself JSON.
            Value::String(s) => serde_json::from_str(&s)
                .map_err(|e| PayloadError::Invalid { field: "data".into(), why: format!("a string that is not JSON: {e}") })?,
            v => v,
        };
        let events = events(data, "data", origin)?;
        Ok(Webhook::Pushed { format: Format::CloudEvents, operator: ce.operator, events })
    } else {
        let p: DefaultPayload = typed(value, "")?;
        let event_type = p.event_type.ok_or_else(|| missing("type"))?;
        if event_type != PUSH_ARTIFACT {
            return Ok(Webhook::Ignored { format: Format::Default, event_type });
        }
        let data = p.event_data.ok_or_else(|| missing("event_data"))?;
        let events = events(data, "event_data", origin)?;
        Ok(Webhook::Pushed { format: Format::Default, operator: p.operator, events })
    }
}

fn missing(field: &str) -> PayloadError {
    PayloadError::Missing { field: field.into() }
}

/// Deserializes with the path of a wrongly typed value in the error.
fn typed<T: serde::de::DeserializeOwned>(v: Value, prefix: &str) -> Result<T, PayloadError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let inner = e.path().to_string();
        let field = match (prefix.is_empty(), inner.as_str()) {
            (true, p) => p.to_string(),
            (false, ".") => prefix.to_string(),
            (false, p) => format!("{prefix}.{p}"),
        };
        PayloadError::Invalid { field, why: e.into_inner().to_string() }
    })
}

fn events(data: Value, at: &str, origin: &str) -> Result<Vec<Event>, PayloadError> {
    let data: EventData = typed(data, at)?;
    let resources = data.resources.ok_or_else(|| missing(&format!("{at}.resources")))?;
    if resources.is_empty() {
        return Err(PayloadError::Invalid { field: format!("{at}.resources"), why: "lists no resource".into() });
    }
    resources
        .into_iter()
        .enumerate()
        .map(|(i, r)| resource(r, &format!("{at}.resources[{i}]")).map(|reference| Event::new(reference, origin)))
        .collect()
}

fn resource(r: Resource, at: &str) -> Result<Reference, PayloadError> {
    let url = r.resource_url.filter(|u| !u.trim().is_empty()).ok_or_else(|| missing(&format!("{at}.resource_url")))?;
    let mut reference: Reference = url
        .parse()
        .map_err(|e: crate::oci::ReferenceError| PayloadError::Invalid { field: format!("{at}.resource_url"), why: e.to_string() })?;
    if let Some(d) = r.digest.filter(|d| !d.is_empty()) {
        let digest: Digest =
            d.parse().map_err(|e: crate::oci::DigestError| PayloadError::Invalid { field: format!("{at}.digest"), why: e.to_string() })?;
        match reference.digest() {
            Some(pinned) if *pinned != digest => {
                return Err(PayloadError::Invalid {
                    field: format!("{at}.digest"),
                    why: format!("{digest} differs from the digest in resource_url ({pinned})"),
                })
            }
            Some(_) => {}
            None => reference = reference.with_digest(digest),
        }
    }
    // `tag` repeats what resource_url says (or holds the digest); a tag missing from the URL is
    // added so matching and target naming see it.
    if let Some(tag) = r.tag.filter(|t| !t.is_empty() && !t.contains(':')) {
        if reference.tag().is_none() {
            let digest = reference.digest().cloned();
            let tagged = reference
                .with_tag(&tag)
                .map_err(|e| PayloadError::Invalid { field: format!("{at}.tag"), why: e.to_string() })?;
            reference = match digest {
                Some(d) => tagged.with_digest(d),
                None => tagged,
            };
        }
    }
    Ok(reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:76525f02955aec223342400a080c73024c995c9db1ba2eabf7505cf3bdf3f1f0";

    /// Shaped as Harbor's default format documents it (type, occur_at, operator, event_data
    /// with resources and repository).
    fn default_payload(tag: &str, url: &str) -> String {
        serde_json::json!({
            "type": "PUSH_ARTIFACT",
            "occur_at": 1737446601,
            "operator": "admin",
            "event_data": {
                "resources": [{ "digest": D, "tag": tag, "resource_url": url }],
                "repository": {
                    "date_created": 1737446600,
                    "name": "nginx",
                    "namespace": "library",
                    "repo_full_name": "library/nginx",
                    "repo_type": "public"
                }
            }
        })
        .to_string()
    }

    /// Shaped as Harbor's CloudEvents formatter writes it: the envelope, the `requestid` and
    /// `operator` extensions, and the event data (not the whole default payload) in `data`.
    fn cloudevent(event_type: &str, tag: &str, url: &str) -> String {
        serde_json::json!({
            "specversion": "1.0",
            "requestid": "51c0b694-0168-4f3c-b0db-282565455d7b",
            "id": "66e18103-09c1-41f6-982f-37df223f3eeb",
            "source": "/projects/2/webhook/policies/15",
            "type": event_type,
            "datacontenttype": "application/json",
            "time": "2023-04-03T06:04:46Z",
            "data": {
                "resources": [{ "digest": D, "tag": tag, "resource_url": url }],
                "repository": { "date_created": 1680501893, "name": "alpine", "namespace": "harbor",
                                "repo_full_name": "harbor/alpine", "repo_type": "private" }
            },
            "operator": "robot$ci"
        })
        .to_string()
    }

    fn refs(w: &Webhook) -> Vec<String> {
        match w {
            Webhook::Pushed { events, .. } => events.iter().map(|e| e.reference.to_string()).collect(),
            Webhook::Ignored { .. } => panic!("ignored: {w:?}"),
        }
    }

    #[test]
    fn default_payload_with_tag() {
        let w = parse(default_payload("v1", "harbor.example.com/library/nginx:v1").as_bytes(), Some("application/json"), "harbor").unwrap();
        assert_eq!(refs(&w), [format!("harbor.example.com/library/nginx:v1@{D}")]);
        let Webhook::Pushed { format, operator, events } = w else { unreachable!() };
        assert_eq!(format, Format::Default);
        assert_eq!(operator.as_deref(), Some("admin"));
        assert_eq!(events[0].origin, "harbor");
    }

    #[test]
    fn digest_only_push_has_the_digest_as_tag() {
        let url = format!("harbor.example.com:8443/proxy/library/nginx@{D}");
        let w = parse(default_payload(D, &url).as_bytes(), None, "harbor").unwrap();
        assert_eq!(refs(&w), [url.as_str()]);
        let w = parse(cloudevent(CLOUDEVENTS_PUSH, D, &url).as_bytes(), Some(CLOUDEVENTS_CONTENT_TYPE), "harbor").unwrap();
        let Webhook::Pushed { events, .. } = &w else { panic!() };
        assert_eq!(events[0].reference.tag(), None);
        assert_eq!(events[0].reference.digest().unwrap().to_string(), D);
    }

    #[test]
    fn cloudevents_payload() {
        let w = parse(cloudevent(CLOUDEVENTS_PUSH, "3.19", "localhost/harbor/alpine:3.19").as_bytes(), Some("application/cloudevents+json; charset=utf-8"), "hook").unwrap();
        assert_eq!(refs(&w), [format!("localhost/harbor/alpine:3.19@{D}")]);
        let Webhook::Pushed { format, operator, .. } = w else { unreachable!() };
        assert_eq!(format, Format::CloudEvents);
        assert_eq!(operator.as_deref(), Some("robot$ci"));
        // Recognised by `specversion` even with a plain JSON content type.
        let w = parse(cloudevent(CLOUDEVENTS_PUSH, "3.19", "localhost/harbor/alpine:3.19").as_bytes(), Some("application/json"), "hook").unwrap();
        assert_eq!(refs(&w).len(), 1);
    }

    #[test]
    fn other_event_types_are_ignored() {
        let body = default_payload("v1", "h.io/a/b:v1").replace("PUSH_ARTIFACT", "PULL_ARTIFACT");
        assert_eq!(parse(body.as_bytes(), None, "h").unwrap(), Webhook::Ignored { format: Format::Default, event_type: "PULL_ARTIFACT".into() });
        let body = cloudevent("harbor.artifact.deleted", "v1", "h.io/a/b:v1");
        assert!(matches!(parse(body.as_bytes(), None, "h").unwrap(), Webhook::Ignored { format: Format::CloudEvents, .. }));
    }

    #[test]
    fn the_acceleration_service_minimal_body_works() {
        let body = r#"{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"resource_url":"192.168.1.1/library/nginx:latest"}]}}"#;
        assert_eq!(refs(&parse(body.as_bytes(), None, "h").unwrap()), ["192.168.1.1/library/nginx:latest"]);
    }

    #[test]
    fn errors_name_the_field() {
        let field = |body: &str| parse(body.as_bytes(), None, "h").unwrap_err().field().to_string();
        assert_eq!(field(r#"{"event_data":{}}"#), "type");
        assert_eq!(field(r#"{"type":"PUSH_ARTIFACT"}"#), "event_data");
        assert_eq!(field(r#"{"type":"PUSH_ARTIFACT","event_data":{}}"#), "event_data.resources");
        assert_eq!(field(r#"{"type":"PUSH_ARTIFACT","event_data":{"resources":[]}}"#), "event_data.resources");
        assert_eq!(field(r#"{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"tag":"v1"}]}}"#), "event_data.resources[0].resource_url");
        assert_eq!(
            field(r#"{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"resource_url":"h.io/a:1"},{"resource_url":"h.io/Bad:1"}]}}"#),
            "event_data.resources[1].resource_url"
        );
        assert_eq!(field(r#"{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"resource_url":"h.io/a:1","digest":"md5:x"}]}}"#), "event_data.resources[0].digest");
        assert_eq!(field(r#"{"type":"PUSH_ARTIFACT","event_data":{"resources":"x"}}"#), "event_data.resources");
        assert_eq!(field(r#"{"type":7}"#), "type");
        assert_eq!(field(r#"{"specversion":"1.0","type":"harbor.artifact.pushed"}"#), "data");
        assert_eq!(field(r#"{"specversion":"1.0","type":"harbor.artifact.pushed","data":{"resources":[{}]}}"#), "data.resources[0].resource_url");
        assert!(matches!(parse(b"{not json", None, "h"), Err(PayloadError::Json(_))));
        assert!(matches!(parse(b"[1]", None, "h"), Err(PayloadError::Invalid { .. })));
        let other = format!("sha256:{}", "0".repeat(64));
        let body = format!(r#"{{"type":"PUSH_ARTIFACT","event_data":{{"resources":[{{"resource_url":"h.io/a@{D}","digest":"{other}"}}]}}}}"#);
        assert_eq!(field(&body), "event_data.resources[0].digest");
    }

    #[test]
    fn tag_field_fills_a_url_without_tag() {
        let body = format!(r#"{{"type":"PUSH_ARTIFACT","event_data":{{"resources":[{{"resource_url":"h.io/a/b","tag":"v2","digest":"{D}"}}]}}}}"#);
        assert_eq!(refs(&parse(body.as_bytes(), None, "h").unwrap()), [format!("h.io/a/b:v2@{D}")]);
    }
}
