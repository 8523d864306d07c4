//! Router tests with a stand-in for the registry and drivers.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::*;
use crate::oci::{Digest, Reference};
use crate::pipeline::convert::{ConvertError, ConvertResult, TargetResult};
use crate::pipeline::metrics::TaskMetrics;
use crate::pipeline::tasks::TaskStore;
use crate::pipeline::worker::{Resolved, WorkerOptions};
use crate::pipeline::{Plan, Runner};

const D: &str = "sha256:76525f02955aec223342400a080c73024c995c9db1ba2eabf7505cf3bdf3f1f0";
const AUTH: &str = "Basic cm9ib3Q6c2VjcmV0";

/// Converts instantly; images whose repository ends in `broken` fail permanently; conversions
/// wait on `gate` when one is set.
#[derive(Default)]
struct Stand {
    converts: AtomicU32,
    gate: Option<Arc<tokio::sync::Semaphore>>,
}

#[async_trait]
impl Runner for Stand {
    async fn resolve(&self, source: &Reference) -> Result<Resolved, ConvertError> {
        Ok(Resolved { digest: source.digest().cloned().unwrap_or_else(|| Digest::of(source.to_string().as_bytes())), converted_from: None })
    }
    async fn convert(&self, plan: &Plan, source: &Reference) -> Result<ConvertResult, ConvertError> {
        self.converts.fetch_add(1, Ordering::SeqCst);
        if let Some(g) = &self.gate {
            g.acquire().await.unwrap().forget();
        }
        if source.repository().ends_with("broken") {
            return Err(ConvertError::BadImage { reference: source.to_string(), why: "layer 0 is not a tar stream".into() });
        }
        let targets = plan
            .conversions
            .iter()
            .map(|c| TargetResult {
                driver: c.driver.kind(),
                reference: c.naming.target_for(source).unwrap(),
                digest: Digest::of(b"target"),
                media_type: crate::oci::media_types::OCI_MANIFEST.into(),
                size: 900,
                platforms: vec![],
            })
            .collect();
        Ok(ConvertResult { source: source.clone(), source_digest: source.digest().unwrap().clone(), source_size: 1000, targets })
    }
}

struct Api {
    app: axum::Router,
    stand: Arc<Stand>,
    workers: Workers,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

async fn api_with(yaml: &str, stand: Stand, queue_size: usize) -> Api {
    let config = Config::parse(yaml, "t", &|_| None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = TaskStore::open(&dir.path().join("tasks.redb")).unwrap();
    let stand = Arc::new(stand);
    let shutdown = CancellationToken::new();
    let mut options = WorkerOptions::from_config(&config);
    options.queue_size = queue_size;
    let workers = Workers::start(
        store,
        stand.clone(),
        Router::new(&config, Plan::all(&config).unwrap()),
        options,
        Arc::new(TaskMetrics::default()),
        None,
        shutdown.clone(),
    )
    .await
    .unwrap();
    let app = router(AppState::new(&config, workers.clone()));
    Api { app, stand, workers, shutdown, _dir: dir }
}

const YAML: &str = r#"
server: { auth_header: "Basic cm9ib3Q6c2VjcmV0", max_body_bytes: 4KiB }
sources: { harbor: { kind: harbor } }
pipelines:
  - name: accelerate
    sources: [harbor]
    match: { repositories: ["library/*"] }
    convert: [{ driver: estargz }]
"#;

async fn api() -> Api {
    api_with(YAML, Stand::default(), 16).await
}

fn post(uri: &str, body: impl Into<Body>, content_type: &str) -> Request<Body> {
    Request::post(uri).header("authorization", AUTH).header("content-type", content_type).body(body.into()).unwrap()
}

fn get_req(uri: &str) -> Request<Body> {
    Request::get(uri).header("authorization", AUTH).body(Body::empty()).unwrap()
}

async fn call(app: &axum::Router, req: Request<Body>) -> (StatusCode, HeaderMap, Vec<u8>) {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = axum::body::to_bytes(res.into_body(), usize::MAX).await.unwrap().to_vec();
    (status, headers, body)
}

async fn call_json(app: &axum::Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
    let (s, _, b) = call(app, req).await;
    (s, serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&b))))
}

fn harbor_default(url: &str, tag: &str) -> String {
    serde_json::json!({
        "type": "PUSH_ARTIFACT",
        "occur_at": 1737446601,
        "operator": "admin",
        "event_data": {
            "resources": [{ "digest": D, "tag": tag, "resource_url": url }],
            "repository": { "date_created": 1737446600, "name": "nginx", "namespace": "library",
                            "repo_full_name": "library/nginx", "repo_type": "public" }
        }
    })
    .to_string()
}

fn harbor_cloudevent(url: &str, tag: &str) -> String {
    serde_json::json!({
        "specversion": "1.0",
        "requestid": "2eedfab8-61d3-4f3c-8ec3-8f82d1ec4c84",
        "id": "4b2f89a6-548d-4c12-9993-a1f5790b97d2",
        "source": "/projects/1/webhook/policies/3",
        "type": "harbor.artifact.pushed",
        "datacontenttype": "application/json",
        "time": "2023-03-06T06:08:43Z",
        "data": {
            "resources": [{ "digest": D, "tag": tag, "resource_url": url }],
            "repository": { "date_created": 1677053165, "name": "busybox", "namespace": "library",
                            "repo_full_name": "library/busybox", "repo_type": "public" }
        },
        "operator": "admin"
    })
    .to_string()
}

#[tokio::test]
async fn auth_is_required_but_for_health_and_metrics() {
    let a = api().await;
    for (method, uri) in [("POST", CONVERSIONS_PATH), ("GET", CONVERSIONS_PATH), ("GET", "/nope")] {
        let missing = Request::builder().method(method).uri(uri).body(Body::empty()).unwrap();
        let (s, body) = call_json(&a.app, missing).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{method} {uri}");
        assert_eq!(body["code"], "unauthorized");
        assert!(body["message"].as_str().unwrap().contains("missing"));
        for wrong in ["Basic wrong", "Basic cm9ib3Q6c2VjcmV0 ", "basic cm9ib3Q6c2VjcmV0", ""] {
            let req = Request::builder().method(method).uri(uri).header("authorization", wrong).body(Body::empty()).unwrap();
            let (s, body) = call_json(&a.app, req).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{method} {uri} with {wrong:?}");
            assert!(body["message"].as_str().unwrap().contains("wrong"));
        }
    }
    let (s, _) = call_json(&a.app, get_req(HEALTH_PATH)).await;
    assert_eq!(s, StatusCode::OK);
    // Probes and scrapes come without the header, or with another one.
    for uri in [HEALTH_PATH, METRICS_PATH] {
        for given in [None, Some("Basic wrong")] {
            let mut req = Request::builder().method("GET").uri(uri);
            if let Some(v) = given {
                req = req.header("authorization", v);
            }
            let resp = a.app.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "GET {uri} with {given:?}");
        }
    }
    assert_eq!(a.stand.converts.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn no_auth_configured_lets_requests_in() {
    let a = api_with("pipelines: [{ name: p, convert: [{ driver: estargz }] }]", Stand::default(), 4).await;
    let (s, _) = call_json(&a.app, Request::get(CONVERSIONS_PATH).body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn default_payload_creates_a_task_and_the_list_shows_it() {
    let a = api().await;
    let url = "harbor.example.com/library/nginx:v1";
    let (s, body) = call_json(&a.app, post(CONVERSIONS_PATH, harbor_default(url, "v1"), "application/json")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let id: uuid::Uuid = body["tasks"][0]["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(body["tasks"][0]["duplicate"], false);
    assert_eq!(body["tasks"][0]["source"], format!("{url}@{D}"));
    let done = a.workers.wait(id).await.unwrap();
    assert_eq!(done.status, TaskStatus::Completed);

    let (s, list) = call_json(&a.app, get_req(CONVERSIONS_PATH)).await;
    assert_eq!(s, StatusCode::OK);
    let t = &list[0];
    for field in ["id", "created", "finished", "source", "source_size", "target_size", "status", "reason", "targets"] {
        assert!(t.get(field).is_some(), "{field} missing from {t}");
    }
    assert_eq!(t["status"], "COMPLETED");
    assert_eq!(t["source_size"], 1000);
    assert_eq!(t["target_size"], 900);
    assert_eq!(t["targets"][0]["reference"], "harbor.example.com/library/nginx:v1-esgz");
    assert_eq!(t["attempts"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn cloudevents_payload_creates_a_task() {
    let a = api().await;
    let url = format!("harbor.dev/library/busybox@{D}");
    let (s, body) = call_json(&a.app, post(&format!("{CONVERSIONS_PATH}?sync=true"), harbor_cloudevent(&url, D), harbor::CLOUDEVENTS_CONTENT_TYPE)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["tasks"][0]["status"], "COMPLETED");
    assert_eq!(body["tasks"][0]["source"], url);
    let hex = D.strip_prefix("sha256:").unwrap();
    assert_eq!(body["tasks"][0]["targets"][0]["reference"], format!("harbor.dev/library/busybox:sha256-{hex}-esgz"));
}

#[tokio::test]
async fn other_event_types_are_acknowledged_and_ignored() {
    let a = api().await;
    let pull = harbor_default("harbor.example.com/library/nginx:v1", "v1").replace("PUSH_ARTIFACT", "PULL_ARTIFACT");
    let (s, body) = call_json(&a.app, post(CONVERSIONS_PATH, pull, "application/json")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body["ignored"].as_str().unwrap().contains("PULL_ARTIFACT"));
    let deleted = harbor_cloudevent("harbor.dev/library/busybox:1", "1").replace("harbor.artifact.pushed", "harbor.artifact.deleted");
    let (s, body) = call_json(&a.app, post(CONVERSIONS_PATH, deleted, harbor::CLOUDEVENTS_CONTENT_TYPE)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body["ignored"].is_string());
    assert!(a.workers.store().list().await.unwrap().is_empty());
}

#[tokio::test]
async fn bad_bodies_are_400_naming_the_field() {
    let a = api().await;
    let cases = [
        ("{not json", "invalid_json", None),
        (r#"{"event_data":{"resources":[]}}"#, "missing_field", Some("type")),
        (r#"{"type":"PUSH_ARTIFACT"}"#, "missing_field", Some("event_data")),
        (r#"{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"tag":"v1"}]}}"#, "missing_field", Some("event_data.resources[0].resource_url")),
        (r#"{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"resource_url":"http://h.io/a:1"}]}}"#, "invalid_field", Some("event_data.resources[0].resource_url")),
        (r#"{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"resource_url":"h.io/a:1","digest":"sha256:12345"}]}}"#, "invalid_field", Some("event_data.resources[0].digest")),
    ];
    for (body, code, field) in cases {
        let (s, resp) = call_json(&a.app, post(CONVERSIONS_PATH, body, "application/json")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(resp["code"], code, "{body}: {resp}");
        match field {
            Some(f) => {
                assert_eq!(resp["field"], f, "{body}: {resp}");
                assert!(resp["message"].as_str().unwrap().contains(f), "{resp}");
            }
            None => assert!(resp.get("field").is_none()),
        }
    }
    let (s, resp) = call_json(&a.app, post(&format!("{CONVERSIONS_PATH}?sync=maybe"), harbor_default("h.io/library/a:1", "1"), "application/json")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(resp["field"], "sync");
    assert!(a.workers.store().list().await.unwrap().is_empty(), "nothing is stored for a refused request");
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let a = api().await;
    let padding = "x".repeat(5000);
    let big = harbor_default("h.io/library/a:1", "1").replacen('{', &format!("{{\"pad\":\"{padding}\","), 1);
    let (s, resp) = call_json(&a.app, post(CONVERSIONS_PATH, big.clone(), "application/json")).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(resp["code"], "payload_too_large");
    // Without a Content-Length (a streamed body) the limit holds as well.
    let stream = futures::stream::iter(big.into_bytes().chunks(512).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>());
    let (s, _) = call_json(&a.app, post(CONVERSIONS_PATH, Body::from_stream(stream), "application/json")).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn sync_failure_is_500_with_the_reason() {
    let a = api().await;
    let (s, resp) = call_json(&a.app, post(&format!("{CONVERSIONS_PATH}?sync=true"), harbor_default("h.io/library/broken:1", "1"), "application/json")).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(resp["code"], "conversion_failed");
    assert!(resp["message"].as_str().unwrap().contains("not a tar stream"), "{resp}");
    let (_, list) = call_json(&a.app, get_req(CONVERSIONS_PATH)).await;
    assert_eq!(list[0]["status"], "FAILED");
    assert!(list[0]["reason"].as_str().unwrap().contains("not a tar stream"));
}

#[tokio::test]
async fn redelivery_converts_once_and_outputs_are_skipped() {
    let a = api().await;
    let body = harbor_default("h.io/library/nginx:v1", "v1");
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..20 {
        let uri = if i == 19 { format!("{CONVERSIONS_PATH}?sync=true") } else { CONVERSIONS_PATH.to_string() };
        let (s, resp) = call_json(&a.app, post(&uri, body.clone(), "application/json")).await;
        assert_eq!(s, StatusCode::OK);
        ids.insert(resp["tasks"][0]["id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(a.stand.converts.load(Ordering::SeqCst), 1);
    // Harbor's event for the pushed result.
    let (s, resp) = call_json(&a.app, post(CONVERSIONS_PATH, harbor_default("h.io/library/nginx:v1-esgz", "v1-esgz"), "application/json")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(resp["tasks"].as_array().unwrap().is_empty());
    assert!(resp["skipped"][0]["reason"].as_str().unwrap().contains("conversion output"), "{resp}");
    // An image no pipeline matches.
    let (_, resp) = call_json(&a.app, post(CONVERSIONS_PATH, harbor_default("h.io/other/nginx:v1", "v1"), "application/json")).await;
    assert!(resp["skipped"][0]["reason"].as_str().unwrap().contains("no pipeline"), "{resp}");
    assert_eq!(a.stand.converts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn full_queue_is_503() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let a = api_with(YAML, Stand { gate: Some(gate.clone()), ..Default::default() }, 1).await;
    let send = |repo: &str| post(CONVERSIONS_PATH, harbor_default(&format!("h.io/library/{repo}:1"), "1"), "application/json");
    let (s, _) = call_json(&a.app, send("a")).await;
    assert_eq!(s, StatusCode::OK);
    while a.stand.converts.load(Ordering::SeqCst) < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (s, _) = call_json(&a.app, send("b")).await;
    assert_eq!(s, StatusCode::OK, "one waits in the queue");
    let (s, headers, body) = call(&a.app, send("c")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["code"], "queue_full");
    assert_eq!(a.workers.store().list().await.unwrap().len(), 2);
    // The metrics show the depth.
    let (_, _, text) = call(&a.app, get_req(METRICS_PATH)).await;
    let text = String::from_utf8(text).unwrap();
    assert!(text.lines().any(|l| l == "accel_queue_depth{pipeline=\"accelerate\"} 1"), "{text}");
    gate.add_permits(100);
}

#[tokio::test]
async fn metrics_count_tasks_and_requests() {
    let a = api().await;
    let (s, _) = call_json(&a.app, post(&format!("{CONVERSIONS_PATH}?sync=true"), harbor_default("h.io/library/a:1", "1"), "application/json")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, headers, text) = call(&a.app, get_req(METRICS_PATH)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = String::from_utf8(text).unwrap();
    for line in [
        "accel_tasks_finished_total{pipeline=\"accelerate\",driver=\"estargz\",status=\"COMPLETED\"} 1",
        "accel_tasks{pipeline=\"accelerate\",driver=\"estargz\",status=\"PROCESSING\"} 0",
        "accel_source_bytes_total{pipeline=\"accelerate\"} 1000",
        "accel_target_bytes_total{pipeline=\"accelerate\",driver=\"estargz\"} 900",
        "accel_http_requests_total{method=\"POST\",route=\"/api/v1/conversions\",status=\"200\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }
    assert!(text.contains("accel_conversion_duration_seconds_count{pipeline=\"accelerate\",status=\"COMPLETED\"} 1"));
}

#[tokio::test]
async fn health_turns_500_when_shutting_down() {
    let a = api().await;
    let (s, body) = call_json(&a.app, get_req(HEALTH_PATH)).await;
    assert_eq!((s, body["status"].as_str()), (StatusCode::OK, Some("ok")));
    a.shutdown.cancel();
    let (s, body) = call_json(&a.app, get_req(HEALTH_PATH)).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["code"], "unhealthy");
    assert!(body["message"].as_str().unwrap().contains("shutting down"));
    let (s, body) = call_json(&a.app, post(CONVERSIONS_PATH, harbor_default("h.io/library/a:1", "1"), "application/json")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["code"], "shutting_down");
}

#[tokio::test]
async fn health_and_metrics_show_bus_sources() {
    let a = api().await;
    let config = Config::parse(YAML, "t", &|_| None).unwrap();
    let statuses = crate::sources::SourceStatuses::default();
    let app = router(AppState::new(&config, a.workers.clone()).with_sources(statuses.clone()));
    statuses.reading("bus", 0);
    let (s, body) = call_json(&app, get_req(HEALTH_PATH)).await;
    assert_eq!((s, body["status"].as_str()), (StatusCode::OK, Some("ok")));
    assert_eq!(body["sources"]["bus"]["state"], "reading");
    statuses.restarting("bus", 3, "cannot read consumer acceld of stream IMAGES: timed out".into());
    let (s, body) = call_json(&app, get_req(HEALTH_PATH)).await;
    assert_eq!((s, body["status"].as_str()), (StatusCode::OK, Some("degraded")));
    assert_eq!(body["sources"]["bus"]["state"], "restarting");
    assert_eq!(body["sources"]["bus"]["failures"], 3);
    assert!(body["sources"]["bus"]["error"].as_str().unwrap().contains("timed out"), "{body}");
    assert!(body["message"].as_str().unwrap().contains("bus"), "{body}");
    let res = app.clone().oneshot(get_req("/metrics")).await.unwrap();
    let text = String::from_utf8(axum::body::to_bytes(res.into_body(), usize::MAX).await.unwrap().to_vec()).unwrap();
    assert!(text.lines().any(|l| l == "accel_source_up{source=\"bus\"} 0"), "{text}");
    // Without bus sources the answer is the plain one.
    let (_, body) = call_json(&a.app, get_req(HEALTH_PATH)).await;
    assert!(body.get("sources").is_none(), "{body}");
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_json() {
    let a = api().await;
    let (s, body) = call_json(&a.app, get_req("/api/v2/x")).await;
    assert_eq!((s, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    let req = Request::delete(CONVERSIONS_PATH).header("authorization", AUTH).body(Body::empty()).unwrap();
    let (s, body) = call_json(&a.app, req).await;
    assert_eq!((s, body["code"].as_str()), (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")));
}
