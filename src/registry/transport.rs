//! HTTP plumbing below the registry API: scheme choice per host, `Location` resolution, idle
//! timeouts on streamed bodies, and turning transport failures into `RegistryError`s.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::AsyncRead;
use tokio_util::io::ReaderStream;
use url::Url;

use super::RegistryError;

/// How to reach a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Plain HTTP: loopback hosts, as docker does.
    Http,
    /// HTTPS with verified certificates: every other host unless marked insecure.
    Https,
    /// Insecure hosts: HTTPS without certificate checks, falling back to plain HTTP when the
    /// host does not speak TLS.
    HttpsUnverifiedThenHttp,
}

pub fn plan_for(host: &str, insecure: bool) -> Plan {
    if is_loopback_host(host) {
        Plan::Http
    } else if insecure {
        Plan::HttpsUnverifiedThenHttp
    } else {
        Plan::Https
    }
}

/// Whether `host[:port]` names this machine: `localhost`, `127.0.0.0/8` or `::1`.
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inside, _)) => inside,
            None => return false,
        }
    } else if host.matches(':').count() == 1 {
        host.split(':').next().unwrap_or(host)
    } else {
        // No port, or a bare IPv6 address.
        host
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Resolves a `Location` header against the URL of the request that returned it. Registries
/// send absolute URLs, paths (`/v2/…`), and occasionally paths relative to the request.
pub fn resolve_location(request_url: &Url, location: &str) -> Result<Url, String> {
    let location = location.trim();
    if location.is_empty() {
        return Err("the Location header is empty".into());
    }
    let url = request_url.join(location).map_err(|e| format!("the Location header {location:?} is not a URL: {e}"))?;
    match url.scheme() {
        "http" | "https" => Ok(url),
        other => Err(format!("the Location header {location:?} has scheme {other:?}, not http or https")),
    }
}

/// Whether two URLs reach the same server (scheme, host and port), i.e. whether credentials
/// for one may be sent to the other.
pub fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme() && a.host_str() == b.host_str() && a.port_or_known_default() == b.port_or_known_default()
}

/// Adds `name=value` to a URL's query, keeping what is there (upload URLs carry state).
pub fn with_query_param(url: &Url, name: &str, value: &str) -> Url {
    let mut u = url.clone();
    u.query_pairs_mut().append_pair(name, value);
    u
}

/// Kinds of transport failure, decided from a reqwest error and its causes.
pub fn transport_error(op: &str, url: &Url, host: &str, e: reqwest::Error) -> RegistryError {
    let op = op.to_string();
    let url_text = redact_url(url);
    if e.is_connect() && has_io_kind(&e, io::ErrorKind::InvalidData) {
        // tokio-rustls reports certificate and handshake failures as InvalidData; retrying will
        // not fix a certificate.
        return RegistryError::Tls { op, url: url_text, host: host.to_string(), cause: e };
    }
    // Connect timeouts land here too: they are connection failures, worth retrying.
    if e.is_connect() {
        return RegistryError::Connect { op, url: url_text, cause: e };
    }
    if e.is_builder() || e.is_redirect() {
        return RegistryError::InvalidRequest { op, why: format!("request to {url_text} failed: {e}") };
    }
    RegistryError::Transport { op, url: url_text, cause: e }
}

fn has_io_kind(e: &(dyn std::error::Error + 'static), kind: io::ErrorKind) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if io.kind() == kind {
                return true;
            }
            // An io::Error's source() skips the error it wraps, which may itself be an
            // io::Error of the kind sought (hyper-util wraps rustls failures that way).
            if let Some(inner) = io.get_ref() {
                if has_io_kind(inner, kind) {
                    return true;
                }
            }
        }
        cur = err.source();
    }
    false
}

/// A URL as shown in errors and logs: without its query, which for upload sessions and
/// storage redirects can carry signed state.
pub fn redact_url(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    let _ = u.set_password(None);
    let _ = u.set_username("");
    u.to_string()
}

/// Awaits `fut`, failing with a timeout error after `after`.
pub async fn with_timeout<T>(
    op: &str,
    url: &Url,
    after: Duration,
    fut: impl std::future::Future<Output = Result<T, RegistryError>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r,
        Err(_) => Err(RegistryError::Timeout { op: op.to_string(), url: redact_url(url), after }),
    }
}

/// A response body as a stream of chunks that fails when no chunk arrives for `idle`; the total
/// time is unbounded because blobs can be many gigabytes.
pub fn idle_limited_body(
    response: reqwest::Response,
    op: String,
    url: Url,
    host: String,
    idle: Duration,
) -> impl Stream<Item = Result<Bytes, RegistryError>> + Send + 'static {
    let inner = response.bytes_stream();
    futures::stream::unfold(Some(inner), move |state| {
        let (op, url, host) = (op.clone(), url.clone(), host.clone());
        async move {
            let mut inner = state?;
            match tokio::time::timeout(idle, inner.next()).await {
                Err(_) => Some((Err(RegistryError::Timeout { op, url: redact_url(&url), after: idle }), None)),
                Ok(None) => None,
                Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(inner))),
                Ok(Some(Err(e))) => Some((Err(transport_error(&op, &url, &host, e)), None)),
            }
        }
    })
}

/// Shared between an upload body and the task that waits for the upload's response: when the
/// body last made progress, whether it has finished, and why it failed if it did.
#[derive(Debug)]
pub struct UploadProgress {
    last: Mutex<Instant>,
    done: AtomicBool,
    failure: Mutex<Option<RegistryError>>,
}

impl UploadProgress {
    pub fn new() -> Arc<UploadProgress> {
        Arc::new(UploadProgress { last: Mutex::new(Instant::now()), done: AtomicBool::new(false), failure: Mutex::new(None) })
    }

    fn touch(&self) {
        if let Ok(mut last) = self.last.lock() {
            *last = Instant::now();
        }
    }

    pub fn idle_for(&self) -> Duration {
        self.last.lock().map(|l| l.elapsed()).unwrap_or_default()
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    pub fn take_failure(&self) -> Option<RegistryError> {
        self.failure.lock().ok().and_then(|mut f| f.take())
    }

    fn fail(&self, e: RegistryError) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(e);
        }
    }
}

/// Streams exactly `size` bytes of `reader` as an upload body, recording progress and failing
/// (instead of sending a short or long body) when the reader gives a different amount.
pub struct UploadBody {
    inner: ReaderStream<Box<dyn AsyncRead + Send + Unpin>>,
    expected: u64,
    sent: u64,
    progress: Arc<UploadProgress>,
    op: String,
}

impl UploadBody {
    pub fn new(reader: Box<dyn AsyncRead + Send + Unpin>, expected: u64, progress: Arc<UploadProgress>, op: String) -> Self {
        UploadBody { inner: ReaderStream::with_capacity(reader, 256 * 1024), expected, sent: 0, progress, op }
    }

    fn failed(&mut self, e: RegistryError) -> Poll<Option<Result<Bytes, io::Error>>> {
        let text = e.to_string();
        self.progress.fail(e);
        Poll::Ready(Some(Err(io::Error::other(text))))
    }
}

impl Stream for UploadBody {
    type Item = Result<Bytes, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Being polled means the previous chunk went out: that is progress on the wire.
        self.progress.touch();
        match self.inner.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                self.sent += chunk.len() as u64;
                if self.sent > self.expected {
                    let why = format!("is longer than the {} bytes announced", self.expected);
                    let op = self.op.clone();
                    return self.failed(RegistryError::UploadBody { op, why });
                }
                // hyper stops polling once Content-Length bytes are out, so the end of the
                // stream may never be seen: the last byte is the end.
                if self.sent == self.expected {
                    self.progress.done.store(true, Ordering::Release);
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                let op = self.op.clone();
                self.failed(RegistryError::UploadRead { op, source: e })
            }
            Poll::Ready(None) => {
                if self.sent != self.expected {
                    let why = format!("ended after {} of the {} bytes announced", self.sent, self.expected);
                    let op = self.op.clone();
                    return self.failed(RegistryError::UploadBody { op, why });
                }
                self.progress.touch();
                self.progress.done.store(true, Ordering::Release);
                Poll::Ready(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_use_http() {
        for h in ["localhost", "localhost:5000", "LOCALHOST:1", "127.0.0.1", "127.0.0.1:5000", "127.8.9.10:80", "[::1]:5000", "[::1]", "::1"] {
            assert!(is_loopback_host(h), "{h}");
            assert_eq!(plan_for(h, false), Plan::Http, "{h}");
        }
        for h in ["harbor.example.com", "10.0.0.1:5000", "128.0.0.1", "[::2]:5000", "localhost.example.com", "[::1", "example.com:5000"] {
            assert!(!is_loopback_host(h), "{h}");
            assert_eq!(plan_for(h, false), Plan::Https, "{h}");
        }
        assert_eq!(plan_for("registry.lan:5000", true), Plan::HttpsUnverifiedThenHttp);
        assert_eq!(plan_for("localhost:5000", true), Plan::Http);
    }

    #[test]
    fn location_resolution() {
        let req = Url::parse("http://127.0.0.1:5000/v2/app/blobs/uploads/").unwrap();
        let abs = resolve_location(&req, "https://storage.example.com/up/123?_state=abc").unwrap();
        assert_eq!(abs.as_str(), "https://storage.example.com/up/123?_state=abc");
        let rooted = resolve_location(&req, "/v2/app/blobs/uploads/uuid?_state=x").unwrap();
        assert_eq!(rooted.as_str(), "http://127.0.0.1:5000/v2/app/blobs/uploads/uuid?_state=x");
        let relative = resolve_location(&req, "uuid").unwrap();
        assert_eq!(relative.as_str(), "http://127.0.0.1:5000/v2/app/blobs/uploads/uuid");
        assert!(resolve_location(&req, "").is_err());
        assert!(resolve_location(&req, "ftp://x/y").is_err());
        assert!(same_origin(&req, &rooted));
        assert!(!same_origin(&req, &abs));
        let other_port = Url::parse("http://127.0.0.1:5001/v2/").unwrap();
        assert!(!same_origin(&req, &other_port));
        let https_default = Url::parse("https://h/v2/").unwrap();
        assert!(same_origin(&https_default, &Url::parse("https://h:443/x").unwrap()));
    }

    #[test]
    fn query_params_are_appended_and_redacted() {
        let u = Url::parse("http://h/v2/r/blobs/uploads/u?_state=abc").unwrap();
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let put = with_query_param(&u, "digest", d);
        assert_eq!(put.as_str(), format!("http://h/v2/r/blobs/uploads/u?_state=abc&digest=sha256%3A{}", &d[7..]));
        assert_eq!(redact_url(&put), "http://h/v2/r/blobs/uploads/u");
    }

    #[test]
    fn nested_invalid_data_is_found() {
        let inner = io::Error::new(io::ErrorKind::InvalidData, "bad certificate");
        let outer = io::Error::other(inner);
        assert!(has_io_kind(&outer, io::ErrorKind::InvalidData));
        assert!(!has_io_kind(&io::Error::other("x"), io::ErrorKind::InvalidData));
    }

    #[tokio::test]
    async fn upload_body_checks_length() {
        async fn run(data: &'static [u8], expected: u64) -> (Vec<u8>, Option<RegistryError>) {
            let progress = UploadProgress::new();
            let mut body = UploadBody::new(Box::new(data), expected, progress.clone(), "push".into());
            let mut out = Vec::new();
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(c) => out.extend_from_slice(&c),
                    Err(_) => break,
                }
            }
            (out, progress.take_failure())
        }
        let (out, failure) = run(b"hello", 5).await;
        assert_eq!(out, b"hello");
        assert!(failure.is_none());
        let (_, failure) = run(b"hello", 9).await;
        assert!(matches!(failure, Some(RegistryError::UploadBody { .. })), "{failure:?}");
        let (_, failure) = run(b"hello", 3).await;
        assert!(matches!(failure, Some(RegistryError::UploadBody { .. })), "{failure:?}");
    }
}
