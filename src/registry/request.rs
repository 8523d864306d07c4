//! Sending one registry API request: base URL per host, credentials, the bearer-token dance on
//! 401, status checks, bounded bodies, and the streamed upload with its stall watchdog.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use tokio::io::AsyncRead;
use url::Url;

use super::auth::{merge_scopes, parse_challenges, Access, Challenge, HostAuth, TokenResponse};
use super::credentials::Credentials;
use super::error::{ApiErrors, AuthFailure};
use super::transport::{self, plan_for, redact_url, same_origin, Plan, UploadBody, UploadProgress};
use super::{RegistryClient, RegistryError};
use crate::config::Secret;
use crate::oci::{Digest, Reference};

/// Error bodies and token responses are small; anything bigger is not what we asked for.
const MAX_ERROR_BODY: u64 = 64 << 10;
const MAX_TOKEN_BODY: u64 = 1 << 20;

/// Who a request is for: the registry (credentials key), the host to talk to, the repository
/// and the access it needs.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub registry: &'a str,
    pub host: &'a str,
    pub repository: &'a str,
    pub access: Access,
}

impl<'a> Target<'a> {
    pub fn new(reference: &'a Reference, access: Access) -> Target<'a> {
        Target { registry: reference.registry(), host: reference.api_host(), repository: reference.repository(), access }
    }
}

/// `<base>v2/<path>`. Repository names, tags and digests never need escaping.
pub fn api_url(base: &Url, path: &str) -> Result<Url, RegistryError> {
    let text = format!("{base}v2/{path}");
    Url::parse(&text).map_err(|e| RegistryError::InvalidRequest { op: "build request URL".into(), why: format!("{text:?}: {e}") })
}

/// The `Docker-Content-Digest` header, when present and well formed.
pub fn content_digest(response: &Response) -> Option<Digest> {
    response.headers().get("docker-content-digest")?.to_str().ok()?.trim().parse().ok()
}

fn challenges_of(response: &Response) -> Vec<Challenge> {
    response
        .headers()
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(parse_challenges)
        .collect()
}

fn header_value(secret: &Secret) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(secret.expose()).ok()?;
    v.set_sensitive(true);
    Some(v)
}

impl RegistryClient {
    fn client_for(&self, registry: &str) -> &reqwest::Client {
        match (&self.http_insecure, self.credentials.insecure(registry)) {
            (Some(insecure), true) => insecure,
            _ => &self.http,
        }
    }

    /// `scheme://host/` for a target, probing once which scheme an insecure host speaks.
    pub(super) async fn base_url(&self, t: &Target<'_>, op: &str) -> Result<Url, RegistryError> {
        let insecure = self.credentials.insecure(t.registry);
        let scheme = match plan_for(t.host, insecure) {
            Plan::Http => "http",
            Plan::Https => "https",
            Plan::HttpsUnverifiedThenHttp => {
                let known = self.schemes.lock().ok().and_then(|s| s.get(t.host).copied());
                match known {
                    Some(s) => s,
                    None => {
                        let s = self.probe_scheme(t, op).await?;
                        if let Ok(mut schemes) = self.schemes.lock() {
                            schemes.insert(t.host.to_string(), s);
                        }
                        s
                    }
                }
            }
        };
        let text = format!("{scheme}://{}/", t.host);
        Url::parse(&text).map_err(|e| RegistryError::InvalidRequest { op: op.to_string(), why: format!("registry host {:?} does not form a URL: {e}", t.host) })
    }

    /// Like docker for insecure registries: HTTPS (certificate unchecked) when the host answers
    /// it, else plain HTTP.
    async fn probe_scheme(&self, t: &Target<'_>, op: &str) -> Result<&'static str, RegistryError> {
        let client = self.client_for(t.registry);
        let mut first_error = None;
        for scheme in ["https", "http"] {
            let url = Url::parse(&format!("{scheme}://{}/v2/", t.host))
                .map_err(|e| RegistryError::InvalidRequest { op: op.to_string(), why: format!("registry host {:?}: {e}", t.host) })?;
            let sent = transport::with_timeout(op, &url, self.options.idle_timeout, async {
                client.get(url.clone()).send().await.map_err(|e| transport::transport_error(op, &url, t.registry, e))
            })
            .await;
            match sent {
                Ok(_) => {
                    tracing::debug!(host = t.host, scheme, "insecure registry answers");
                    return Ok(scheme);
                }
                Err(e @ (RegistryError::Tls { .. } | RegistryError::Connect { .. } | RegistryError::Transport { .. })) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(first_error.unwrap_or_else(|| RegistryError::InvalidRequest { op: op.to_string(), why: "no scheme to try".into() }))
    }

    /// Sends a request, authenticating as the host demands: on a 401 it learns the challenge,
    /// gets a token (or uses basic credentials) and sends the request once more. `build` must
    /// be callable twice, so bodies here are in memory; streamed uploads go through `upload`.
    pub(super) async fn send(
        &self,
        t: &Target<'_>,
        op: &str,
        method: Method,
        url: &Url,
        build: impl Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let credentials = self.credentials.lookup(t.registry)?;
        let base_scopes = t.access.scopes(t.repository);
        let mut authorization = self.authorization(t, op, &base_scopes, &base_scopes, credentials.as_ref(), false).await?;
        let mut retried = false;
        loop {
            let mut rb = build(self.client_for(t.registry).request(method.clone(), url.clone()));
            if let Some(v) = authorization.as_ref().and_then(header_value) {
                rb = rb.header(AUTHORIZATION, v);
            }
            let response = transport::with_timeout(op, url, self.options.idle_timeout, async {
                rb.send().await.map_err(|e| transport::transport_error(op, url, t.registry, e))
            })
            .await?;
            tracing::trace!(%method, url = %redact_url(url), status = %response.status(), "registry answered");
            if response.status() != StatusCode::UNAUTHORIZED {
                return Ok(response);
            }
            let challenges = challenges_of(&response);
            let errors = self.error_body(response, url).await;
            let learned = HostAuth::from_challenges(&challenges);
            let (host_auth, challenge_scope) = match learned {
                Some(l) if !retried => l,
                _ => {
                    let mut failure = self.unauthorized(t, op, credentials.as_ref(), errors);
                    if let RegistryError::Unauthorized(f) = &mut failure {
                        f.insufficient_scope = f.credentials.is_some()
                            && challenges.iter().any(|c| c.param("error") == Some("insufficient_scope"));
                    }
                    return Err(failure);
                }
            };
            if host_auth == HostAuth::Basic && credentials.is_none() {
                return Err(self.unauthorized(t, op, None, errors));
            }
            if let Ok(mut cache) = self.auth.lock() {
                cache.set_host_auth(t.host, host_auth);
            }
            let scopes = merge_scopes(base_scopes.clone(), challenge_scope.as_deref());
            authorization = self.authorization(t, op, &base_scopes, &scopes, credentials.as_ref(), true).await?;
            retried = true;
        }
    }

    /// The `Authorization` value for a target, from what the host is known to want: basic
    /// credentials, or a bearer token for the scopes (cached under `cache_scopes`, fetched when
    /// missing or when `refresh`). `None` while the host has not challenged us.
    async fn authorization(
        &self,
        t: &Target<'_>,
        op: &str,
        cache_scopes: &[String],
        scopes: &[String],
        credentials: Option<&Credentials>,
        refresh: bool,
    ) -> Result<Option<Secret>, RegistryError> {
        let host_auth = self.auth.lock().ok().and_then(|c| c.host_auth(t.host).cloned());
        match host_auth {
            None => Ok(None),
            Some(HostAuth::Basic) => Ok(credentials.map(Credentials::basic_header)),
            Some(HostAuth::Bearer { realm, service }) => {
                if !refresh {
                    let cached = self.auth.lock().ok().and_then(|c| c.token(t.host, cache_scopes, Instant::now()));
                    if let Some(token) = cached {
                        return Ok(Some(Secret::new(format!("Bearer {}", token.expose()))));
                    }
                } else if let Ok(mut cache) = self.auth.lock() {
                    cache.forget_token(t.host, cache_scopes);
                }
                let (token, lifetime) = self.fetch_token(t, op, &realm, service.as_deref(), scopes, credentials).await?;
                if let Ok(mut cache) = self.auth.lock() {
                    cache.store_token(t.host, cache_scopes, token.clone(), lifetime, Instant::now());
                }
                Ok(Some(Secret::new(format!("Bearer {}", token.expose()))))
            }
        }
    }

    async fn fetch_token(
        &self,
        t: &Target<'_>,
        op: &str,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
        credentials: Option<&Credentials>,
    ) -> Result<(Secret, Duration), RegistryError> {
        let invalid = |why: String| RegistryError::InvalidResponse { op: op.to_string(), url: realm.to_string(), why };
        let mut url = Url::parse(realm).map_err(|e| invalid(format!("the token realm in the auth challenge is not a URL: {e}")))?;
        let insecure = self.credentials.insecure(t.registry);
        match url.scheme() {
            "https" => {}
            "http" if credentials.is_none() || insecure || url.host_str().is_some_and(transport::is_loopback_host) => {}
            "http" => {
                return Err(invalid(format!(
                    "the token realm is plain HTTP; refusing to send the credentials for {} over it (set `insecure: true` under registries.\"{}\" if this is intended)",
                    t.registry, t.registry
                )))
            }
            other => return Err(invalid(format!("the token realm has scheme {other:?}"))),
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in scopes {
                q.append_pair("scope", s);
            }
        }
        let token_op = format!("{op}: get a token");
        let mut rb = self.client_for(t.registry).get(url.clone());
        if let Some(v) = credentials.map(Credentials::basic_header).as_ref().and_then(header_value) {
            rb = rb.header(AUTHORIZATION, v);
        }
        let response = transport::with_timeout(&token_op, &url, self.options.idle_timeout, async {
            rb.send().await.map_err(|e| transport::transport_error(&token_op, &url, t.registry, e))
        })
        .await?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let errors = self.error_body(response, &url).await;
            return Err(self.unauthorized(t, op, credentials, errors));
        }
        let response = self.expect_status(response, &[StatusCode::OK], &token_op, &url).await?;
        let body = self.read_limited(response, &token_op, &url, t.registry, MAX_TOKEN_BODY).await?;
        let (token, lifetime) = TokenResponse::parse(&body).map_err(|why| RegistryError::InvalidResponse {
            op: token_op.clone(),
            url: redact_url(&url),
            why,
        })?;
        tracing::debug!(host = t.host, scopes = ?scopes, lifetime_secs = lifetime.as_secs(), "got registry token");
        Ok((token, lifetime))
    }

    pub(super) fn unauthorized(&self, t: &Target<'_>, op: &str, credentials: Option<&Credentials>, errors: ApiErrors) -> RegistryError {
        RegistryError::Unauthorized(Box::new(AuthFailure {
            op: op.to_string(),
            host: t.registry.to_string(),
            repository: t.repository.to_string(),
            access: t.access.actions(),
            credentials: credentials.map(|c| c.origin.clone()),
            insufficient_scope: false,
            errors,
        }))
    }

    /// Passes responses with an expected status; turns others into errors carrying the
    /// registry's explanation.
    pub(super) async fn expect_status(
        &self,
        response: Response,
        expected: &[StatusCode],
        op: &str,
        url: &Url,
    ) -> Result<Response, RegistryError> {
        let status = response.status();
        if expected.contains(&status) {
            return Ok(response);
        }
        let errors = self.error_body(response, url).await;
        Err(RegistryError::Status { op: op.to_string(), url: redact_url(url), status, errors })
    }

    /// The registry's error list from a failed response; empty when the body is unreadable.
    async fn error_body(&self, response: Response, url: &Url) -> ApiErrors {
        let mut stream = response.bytes_stream();
        let mut body = BytesMut::new();
        let read = tokio::time::timeout(self.options.idle_timeout, async {
            while let Some(Ok(chunk)) = stream.next().await {
                body.extend_from_slice(&chunk);
                if body.len() as u64 > MAX_ERROR_BODY {
                    break;
                }
            }
        })
        .await;
        if read.is_err() {
            tracing::debug!(url = %redact_url(url), "gave up reading an error body");
        }
        ApiErrors::parse(&body)
    }

    /// Reads a whole body, refusing more than `limit` bytes.
    pub(super) async fn read_limited(
        &self,
        response: Response,
        op: &str,
        url: &Url,
        registry: &str,
        limit: u64,
    ) -> Result<Bytes, RegistryError> {
        let stream =
            transport::idle_limited_body(response, op.to_string(), url.clone(), registry.to_string(), self.options.idle_timeout);
        let mut stream = std::pin::pin!(stream);
        let mut body = BytesMut::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(RegistryError::TooLarge { op: op.to_string(), limit, size: None });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    /// The monolithic `PUT` of a blob, streamed from `body`. It cannot be replayed, so it is sent
    /// once with the authorization the upload's `POST` established; a watchdog fails it when
    /// the body stops moving, or when the registry takes too long to answer after the last byte.
    pub(super) async fn upload(
        &self,
        t: &Target<'_>,
        op: &str,
        base: &Url,
        url: &Url,
        size: u64,
        body: Box<dyn AsyncRead + Send + Unpin>,
    ) -> Result<Response, RegistryError> {
        let credentials = self.credentials.lookup(t.registry)?;
        let scopes = t.access.scopes(t.repository);
        // Credentials go only to the registry itself, never to another host it points at.
        let authorization = if same_origin(base, url) {
            self.authorization(t, op, &scopes, &scopes, credentials.as_ref(), false).await?
        } else {
            None
        };
        let progress = UploadProgress::new();
        let stream = UploadBody::new(body, size, progress.clone(), op.to_string());
        let mut rb = self
            .client_for(t.registry)
            .put(url.clone())
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, size.to_string())
            .body(reqwest::Body::wrap_stream(stream));
        if let Some(v) = authorization.as_ref().and_then(header_value) {
            rb = rb.header(AUTHORIZATION, v);
        }
        let idle = self.options.idle_timeout;
        let commit = self.options.upload_commit_timeout;
        let tick = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let send = rb.send();
        tokio::pin!(send);
        let result = loop {
            tokio::select! {
                r = &mut send => break r,
                _ = tokio::time::sleep(tick) => {
                    let (limit, stalled) = if progress.is_done() { (commit, progress.idle_for() > commit) } else { (idle, progress.idle_for() > idle) };
                    if stalled {
                        return Err(RegistryError::Timeout { op: op.to_string(), url: redact_url(url), after: limit });
                    }
                }
            }
        };
        let response = match result {
            Ok(r) => r,
            // A failure of our own body (short, long, unreadable) says more than the transport
            // error it caused.
            Err(e) => return Err(progress.take_failure().unwrap_or_else(|| transport::transport_error(op, url, t.registry, e))),
        };
        if let Some(failure) = progress.take_failure() {
            return Err(failure);
        }
        if response.status() == StatusCode::UNAUTHORIZED {
            let errors = self.error_body(response, url).await;
            return Err(self.unauthorized(t, op, credentials.as_ref(), errors));
        }
        Ok(response)
    }
}
