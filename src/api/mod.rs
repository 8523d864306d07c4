//! HTTP API of `acceld`, compatible with Harbor's acceleration service:
//! `POST|GET /api/v1/conversions`, `GET /api/v1/health`, plus `GET /metrics`.

pub mod cli;
pub mod client;
mod daemon;
mod http_metrics;
pub mod types;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, HttpBody};
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

pub use daemon::{run, serve, RunError};
use http_metrics::HttpMetrics;
use types::{CreateResponse, CreatedTask, ErrorBody, TaskView};

use crate::config::Config;
use crate::pipeline::tasks::TaskStatus;
use crate::pipeline::worker::SubmitError;
use crate::pipeline::{Router, Workers};
use crate::sources::forward::Forward;
use crate::sources::harbor::{self, PayloadError, Webhook};
use crate::sinks::SinkStatuses;
use crate::sources::SourceStatuses;

pub const CONVERSIONS_PATH: &str = "/api/v1/conversions";
pub const HEALTH_PATH: &str = "/api/v1/health";
pub const METRICS_PATH: &str = "/metrics";

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    workers: Workers,
    /// SHA-256 of the required `Authorization` value: comparing fixed-size hashes in constant
    /// time reveals neither the value nor its length.
    auth: Option<[u8; 32]>,
    max_body_bytes: u64,
    /// Source name of events posted here.
    origin: String,
    /// Where accepted webhooks go instead of the local workers, when configured.
    forward: Option<Arc<dyn Forward>>,
    http: HttpMetrics,
    started: Instant,
    /// States of the bus sources, shown by the health answer.
    sources: SourceStatuses,
    sinks: SinkStatuses,
}

impl AppState {
    pub fn new(config: &Config, workers: Workers) -> Self {
        Self::with_forward(config, workers, None)
    }

    /// Like [`new`](Self::new); accepted webhooks are forwarded to `forward` when given.
    pub fn with_forward(config: &Config, workers: Workers, forward: Option<Arc<dyn Forward>>) -> Self {
        AppState {
            inner: Arc::new(Inner {
                workers,
                auth: config.server.auth_header.as_ref().map(|s| Sha256::digest(s.expose().as_bytes()).into()),
                max_body_bytes: config.server.max_body_bytes.bytes(),
                origin: Router::harbor_origin(config),
                forward,
                http: HttpMetrics::default(),
                started: Instant::now(),
                sources: SourceStatuses::default(),
                sinks: SinkStatuses::default(),
            }),
        }
    }

    /// Shows these sources' states in the health answer and metrics. Call before the state is
    /// shared (cloned).
    pub fn with_sources(mut self, sources: SourceStatuses) -> Self {
        Arc::get_mut(&mut self.inner).expect("with_sources is called before the state is shared").sources = sources;
        self
    }

    /// Shows these sinks' states in the health answer and metrics. Call before the state is
    /// shared (cloned).
    pub fn with_sinks(mut self, sinks: SinkStatuses) -> Self {
        Arc::get_mut(&mut self.inner).expect("with_sinks is called before the state is shared").sinks = sinks;
        self
    }
}

/// The API's routes, with authentication and access logging.
pub fn router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route(CONVERSIONS_PATH, get(list).post(create))
        .route(HEALTH_PATH, get(health))
        .route(METRICS_PATH, get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), access_log))
        .with_state(state)
}

/// An error answer: status plus `{code, message[, field]}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError { status, body: ErrorBody { code: code.into(), message: message.into(), field: None } }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        r
    }
}

impl From<PayloadError> for ApiError {
    fn from(e: PayloadError) -> Self {
        let code = match &e {
            PayloadError::Json(_) => "invalid_json",
            PayloadError::Missing { .. } => "missing_field",
            PayloadError::Invalid { .. } => "invalid_field",
        };
        let field = Some(e.field().to_string()).filter(|f| !f.is_empty());
        ApiError { status: StatusCode::BAD_REQUEST, body: ErrorBody { code: code.into(), message: e.to_string(), field } }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match &e {
            SubmitError::ShuttingDown => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", e.to_string()),
            SubmitError::QueueFull { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "queue_full", e.to_string()),
            SubmitError::Store(_) => {
                tracing::error!(module = %"api", "cannot store tasks: {e}");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("cannot store the tasks: {e}"))
            }
        }
    }
}

fn remote(req: &Request) -> Option<SocketAddr> {
    req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}

/// Checks `Authorization` against `server.auth_header`. Health and metrics are open, as in the
/// acceleration service, so liveness probes and Prometheus scrapes need no secret.
async fn authenticate(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let open = matches!(req.uri().path(), HEALTH_PATH | METRICS_PATH);
    if let Some(want) = st.inner.auth.as_ref().filter(|_| !open) {
        let given = req.headers().get(header::AUTHORIZATION).map(|v| Sha256::digest(v.as_bytes()));
        let ok = given.is_some_and(|g| bool::from(g.as_slice().ct_eq(want.as_slice())));
        if !ok {
            let why = if req.headers().contains_key(header::AUTHORIZATION) { "is wrong" } else { "is missing" };
            let from = remote(&req).map(|a| a.to_string()).unwrap_or_else(|| "-".into());
            tracing::warn!(module = %"api", "refused {} {} from {from}: Authorization header {why}", req.method(), req.uri().path());
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!("the Authorization header {why}; send the value configured as server.auth_header"),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// One line per request, as the acceleration service logs them:
/// `POST /api/v1/conversions 200 552.695µs 392>5bytes 192.168.1.1`.
async fn access_log(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let path = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string());
    let ip = remote(&req).map(|a| a.ip().to_string()).unwrap_or_else(|| "-".into());
    let bytes_in = content_length(req.headers()).unwrap_or(0);
    let res = next.run(req).await;
    let took = start.elapsed();
    let bytes_out = res.body().size_hint().exact().unwrap_or(0);
    let status = res.status().as_u16();
    st.inner.http.observe(method.as_str(), path.as_deref().unwrap_or("other"), status, took);
    tracing::info!(module = %"api", "{method} {uri} {status} {took:?} {bytes_in}>{bytes_out}bytes {ip}");
    res
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no such endpoint: {}", req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("{} is not served on {}", req.method(), req.uri().path()))
}

/// `sync` from the query string: `true`/`false` (also `1`/`0`, or bare `sync`).
fn sync_param(query: Option<&str>) -> Result<bool, ApiError> {
    let mut sync = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
        if k != "sync" {
            continue;
        }
        sync = match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "" => true,
            "false" | "0" => false,
            other => {
                return Err(ApiError {
                    status: StatusCode::BAD_REQUEST,
                    body: ErrorBody {
                        code: "invalid_field".into(),
                        message: format!("query parameter sync={other:?} must be true or false"),
                        field: Some("sync".into()),
                    },
                })
            }
        };
    }
    Ok(sync)
}

async fn read_body(body: Body, headers: &HeaderMap, limit: u64) -> Result<Vec<u8>, ApiError> {
    let too_large =
        || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", format!("request body is larger than {limit} bytes (server.max_body_bytes)"));
    if content_length(headers).is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut out = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", format!("cannot read the request body: {e}")))?;
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

async fn create(State(st): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let addr = remote(&req).map(|a| a.to_string()).unwrap_or_else(|| "-".into());
    tracing::info!(module = %"api", "received webhook request from {addr}");
    let sync = sync_param(req.uri().query())?;
    let (parts, body) = req.into_parts();
    let body = read_body(body, &parts.headers, st.inner.max_body_bytes).await?;
    let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let events = match harbor::parse(&body, content_type, &st.inner.origin)? {
        Webhook::Ignored { event_type, .. } => {
            tracing::info!(module = %"api", "ignoring event of type {event_type}");
            let resp = CreateResponse { ignored: Some(format!("event type {event_type} does not trigger conversions")), ..Default::default() };
            return Ok(axum::Json(resp).into_response());
        }
        Webhook::Pushed { events, operator, .. } => {
            if let Some(op) = operator.filter(|o| !o.is_empty()) {
                tracing::debug!(module = %"api", "pushed by {op}");
            }
            events
        }
    };
    if let Some(forward) = &st.inner.forward {
        return forward_webhook(forward.as_ref(), &body, content_type, sync, events.len()).await;
    }
    let workers = &st.inner.workers;
    let accepted = workers.accept(&events).await?;
    let mut resp = CreateResponse {
        tasks: accepted.tasks.iter().map(|s| CreatedTask { task: TaskView::from(&s.task), duplicate: !s.created }).collect(),
        skipped: accepted.skipped,
        ignored: None,
        forwarded: None,
    };
    if !sync {
        return Ok(axum::Json(resp).into_response());
    }
    let mut failures = Vec::new();
    for t in &mut resp.tasks {
        if !t.task.status.is_finished() {
            match workers.wait(t.task.id).await {
                Some(done) => t.task = TaskView::from(&done),
                None => {
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "shutting_down",
                        format!("acceld stopped before task {} finished; it resumes at the next start", t.task.id),
                    ))
                }
            }
        }
        if t.task.status == TaskStatus::Failed {
            failures.push(format!("{} (task {}, pipeline {}): {}", t.task.source, t.task.id, t.task.pipeline, t.task.reason));
        }
    }
    if !failures.is_empty() {
        return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "conversion_failed", failures.join("; ")));
    }
    Ok(axum::Json(resp).into_response())
}

/// Publishes an accepted webhook into the bus; answers 200 once the bus has it, 503 when it
/// cannot be reached (Harbor sends it again).
async fn forward_webhook(forward: &dyn Forward, body: &[u8], content_type: Option<&str>, sync: bool, images: usize) -> Result<Response, ApiError> {
    if sync {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            body: ErrorBody {
                code: "invalid_field".into(),
                message: "sync=true cannot be served: webhooks are forwarded to the bus and converted by whichever instance reads them".into(),
                field: Some("sync".into()),
            },
        });
    }
    match forward.forward(body, content_type).await {
        Ok(()) => {
            tracing::info!(module = %"api", "forwarded a push of {images} image(s) to {}", forward.target());
            let resp = CreateResponse { forwarded: Some(forward.target()), ..Default::default() };
            Ok(axum::Json(resp).into_response())
        }
        Err(why) => {
            tracing::warn!(module = %"api", "cannot forward the webhook: {why}");
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "bus_unavailable", format!("cannot forward the event: {why}; send it again later")))
        }
    }
}

async fn list(State(st): State<AppState>) -> Result<axum::Json<Vec<TaskView>>, ApiError> {
    let tasks = st.inner.workers.store().list().await.map_err(|e| {
        tracing::error!(module = %"api", "cannot list tasks: {e}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("cannot read tasks: {e}"))
    })?;
    Ok(axum::Json(tasks.iter().map(TaskView::from).collect()))
}

/// 200 `{"status": "ok"}` when all is well. A bus source waiting to start again after an error
/// makes it 200 `{"status": "degraded"}`: webhooks and the API still work. Either way `sources`
/// lists every bus source's state. Workers or the task database failing is a 500.
async fn health(State(st): State<AppState>) -> Response {
    if let Err(why) = st.inner.workers.health().await {
        return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "unhealthy", why).into_response();
    }
    let sources = st.inner.sources.snapshot();
    let sinks = st.inner.sinks.snapshot();
    let mut body = serde_json::json!({ "status": "ok" });
    let mut trouble = Vec::new();
    if !sources.is_empty() {
        let failing = st.inner.sources.failing();
        if !failing.is_empty() {
            trouble.push(format!("source(s) {} not reading", failing.join(", ")));
        }
        body["sources"] = serde_json::to_value(sources).unwrap_or_default();
    }
    if !sinks.is_empty() {
        let failing = st.inner.sinks.failing();
        if !failing.is_empty() {
            trouble.push(format!("sink(s) {} failing (results wait in the task database)", failing.join(", ")));
        }
        body["sinks"] = serde_json::to_value(sinks).unwrap_or_default();
    }
    if !trouble.is_empty() {
        body["status"] = "degraded".into();
        body["message"] = trouble.join("; ").into();
    }
    axum::Json(body).into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    let mut out = String::new();
    let w = &st.inner.workers;
    w.metrics().render(&mut out, &w.queue_depths());
    st.inner.http.render(&mut out);
    st.inner.sources.render(&mut out);
    st.inner.sinks.render(&mut out);
    let _ = writeln!(out, "# HELP accel_uptime_seconds Time since acceld started.");
    let _ = writeln!(out, "# TYPE accel_uptime_seconds gauge");
    let _ = writeln!(out, "accel_uptime_seconds {}", st.inner.started.elapsed().as_secs_f64());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response()
}

#[cfg(test)]
mod tests;
