//! The `http` sink: each result POSTed to a webhook URL as a CloudEvent in structured mode
//! (`Content-Type: application/cloudevents+json`), with a timeout and retries with backoff.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::StatusCode;

use super::result::CONTENT_TYPE as CLOUDEVENTS_JSON;
use super::{ResultEvent, Sink, SinkError};
use crate::config::HttpSinkConfig;

pub struct HttpSink {
    name: String,
    url: url::Url,
    client: reqwest::Client,
    max_attempts: u32,
    backoff: Duration,
    timeout: Duration,
}

impl HttpSink {
    pub fn new(name: &str, c: &HttpSinkConfig) -> Result<Self, SinkError> {
        let config_err = |why: String| SinkError::Config { sink: name.into(), why };
        let url = url::Url::parse(&c.url).map_err(|e| config_err(format!("url {:?}: {e}", c.url)))?;
        let mut headers = HeaderMap::new();
        for (k, v) in &c.headers {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| config_err(format!("{k:?} is not a header name")))?;
            let mut value = HeaderValue::from_str(v.expose()).map_err(|_| config_err(format!("the value of header {k:?} is not valid")))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let timeout = Duration::from_secs(c.timeout_secs.max(1));
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .default_headers(headers)
            .user_agent(concat!("accel/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| config_err(format!("cannot build the HTTP client: {e}")))?;
        Ok(HttpSink {
            name: name.into(),
            url,
            client,
            max_attempts: c.max_attempts.max(1),
            backoff: Duration::from_secs(c.retry_backoff_secs),
            timeout,
        })
    }

    fn unavailable(&self, why: String) -> SinkError {
        SinkError::Unavailable { sink: self.name.clone(), why }
    }

    async fn post(&self, body: &[u8]) -> Result<(), SinkError> {
        let r = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, CLOUDEVENTS_JSON)
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| self.unavailable(format!("POST {}: {}", self.url, error_chain(&e))))?;
        let status = r.status();
        if status.is_success() {
            return Ok(());
        }
        let text = r.text().await.unwrap_or_default();
        let text: String = text.chars().take(300).collect();
        let why = format!("POST {} answered {status}: {}", self.url, text.trim());
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT {
            Err(self.unavailable(why))
        } else {
            Err(SinkError::Rejected { sink: self.name.clone(), why })
        }
    }
}

/// An error with its causes, which is where reqwest says what actually went wrong.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

#[async_trait]
impl Sink for HttpSink {
    fn name(&self) -> &str {
        &self.name
    }

    /// The endpoint's host must accept connections; nothing is posted.
    async fn health(&self) -> Result<(), SinkError> {
        let host = self.url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
        let port = self.url.port_or_known_default().unwrap_or(80);
        match tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect((host.as_str(), port))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.unavailable(format!("cannot connect to {host}:{port} for {}: {e}", self.url))),
            Err(_) => Err(self.unavailable(format!("no connection to {host}:{port} within {:?}", self.timeout))),
        }
    }

    async fn send(&self, event: &ResultEvent) -> Result<(), SinkError> {
        let body = event.to_json();
        let mut attempt = 1;
        loop {
            match self.post(&body).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() && attempt < self.max_attempts => {
                    let wait = self.backoff.saturating_mul(1 << (attempt - 1).min(16));
                    tracing::debug!(sink = %self.name, "try {attempt} of {} failed, again in {wait:?}: {e}", self.max_attempts);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
