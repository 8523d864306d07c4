//! What can go wrong talking to a registry, with enough context to act on, and which failures
//! are worth retrying.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;

use crate::oci::Digest;

/// One entry of the `errors` array a registry sends with a failure status.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ApiError {
    /// `MANIFEST_UNKNOWN`, `DENIED`, `UNAUTHORIZED`, … (spec'd codes; registries add their own).
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code.is_empty(), self.message.is_empty()) {
            (false, false) => write!(f, "{}: {}", self.code, self.message),
            (false, true) => f.write_str(&self.code),
            (true, _) => f.write_str(&self.message),
        }
    }
}

/// The registry's explanation of a failure, formatted as ` (CODE: message; …)` or nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiErrors(pub Vec<ApiError>);

impl ApiErrors {
    /// Parses an error body. Bodies that are not the spec'd JSON (proxies, HTML pages) give an
    /// empty list rather than a parse error: the status is what matters then.
    pub fn parse(body: &[u8]) -> ApiErrors {
        #[derive(Deserialize)]
        struct Body {
            #[serde(default)]
            errors: Vec<ApiError>,
        }
        match serde_json::from_slice::<Body>(body) {
            Ok(b) => ApiErrors(b.errors.into_iter().filter(|e| !(e.code.is_empty() && e.message.is_empty())).collect()),
            Err(_) => ApiErrors::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn has_code(&self, code: &str) -> bool {
        self.0.iter().any(|e| e.code.eq_ignore_ascii_case(code))
    }
}

impl fmt::Display for ApiErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return Ok(());
        }
        f.write_str(" (")?;
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        f.write_str(")")
    }
}

/// The registry refused us: wrong or missing credentials, or too little access.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op}: {}", unauthorized_text(self))]
pub struct AuthFailure {
    pub op: String,
    /// Registry host as written in references and config keys.
    pub host: String,
    pub repository: String,
    /// `pull` or `pull,push`.
    pub access: &'static str,
    /// Where the credentials that were rejected came from; `None` when there were none.
    pub credentials: Option<String>,
    /// The credentials were accepted but do not grant the access needed (the registry said
    /// `insufficient_scope`).
    pub insufficient_scope: bool,
    pub errors: ApiErrors,
}

/// Why a registry operation failed. `op` fields name the operation and its subject, e.g.
/// `pull manifest 127.0.0.1:5000/app:v1`.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("credentials for registry {host} ({origin}) are unusable: {why}")]
    Credentials { host: String, origin: String, why: String },

    #[error("cannot read docker config {}: {why}; fix the file, or point docker_config (or $DOCKER_CONFIG) elsewhere", path.display())]
    DockerConfig { path: PathBuf, why: String },

    #[error("cannot set up the HTTP client: {0}")]
    Client(#[source] reqwest::Error),

    #[error("{op}: cannot connect to {url}: {}; check that the registry is running and reachable", chain(cause))]
    Connect {
        op: String,
        url: String,
        /// Named in the message; not a `source()`, so reports do not repeat it.
        cause: reqwest::Error,
    },

    #[error(
        "{op}: TLS with {url} failed: {}; if the registry serves plain HTTP or a certificate from a \
         private CA, add that CA to the system trust store or set `insecure: true` under registries.\"{host}\"",
        chain(cause)
    )]
    Tls {
        op: String,
        url: String,
        host: String,
        /// Named in the message; not a `source()`, so reports do not repeat it.
        cause: reqwest::Error,
    },

    #[error("{op}: {url} sent nothing for {after:?}; the registry or the network is stalled")]
    Timeout { op: String, url: String, after: Duration },

    #[error("{op}: the connection to {url} failed: {}", chain(cause))]
    Transport {
        op: String,
        url: String,
        /// Named in the message; not a `source()`, so reports do not repeat it.
        cause: reqwest::Error,
    },

    #[error("{op}: {url} answered {status}{errors}{}", status_hint(*status))]
    Status { op: String, url: String, status: StatusCode, errors: ApiErrors },

    #[error("{0}")]
    Unauthorized(Box<AuthFailure>),

    #[error("{op}: the content's digest is {actual}, not the {expected} asked for; the registry returned other bytes than it addressed")]
    DigestMismatch { op: String, expected: Digest, actual: Digest },

    #[error("{op}: the body is larger than the {limit}-byte limit for manifests and indexes{}; this is not an image manifest", size.map(|s| format!(" ({s} bytes)")).unwrap_or_default())]
    TooLarge { op: String, limit: u64, size: Option<u64> },

    #[error("{op}: unexpected answer from {url}: {why}")]
    InvalidResponse { op: String, url: String, why: String },

    #[error("{op}: the blob to upload {why}")]
    UploadBody { op: String, why: String },

    #[error("{op}: reading the blob to upload failed: {source}")]
    UploadRead {
        op: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{op}: {why}")]
    InvalidRequest { op: String, why: String },
}

impl RegistryError {
    /// Whether trying again later can succeed (5xx, timeouts, connection resets, 429).
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Connect { .. } | RegistryError::Timeout { .. } | RegistryError::Transport { .. } => true,
            RegistryError::Status { status, .. } => status_is_retryable(*status),
            RegistryError::Credentials { .. }
            | RegistryError::DockerConfig { .. }
            | RegistryError::Client(_)
            | RegistryError::Tls { .. }
            | RegistryError::Unauthorized(_)
            | RegistryError::DigestMismatch { .. }
            | RegistryError::TooLarge { .. }
            | RegistryError::InvalidResponse { .. }
            | RegistryError::UploadBody { .. }
            | RegistryError::UploadRead { .. }
            | RegistryError::InvalidRequest { .. } => false,
        }
    }

    /// The HTTP status the registry answered with, for failures that have one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            RegistryError::Status { status, .. } => Some(*status),
            RegistryError::Unauthorized(_) => Some(StatusCode::UNAUTHORIZED),
            _ => None,
        }
    }

    /// The manifest, blob or repository does not exist (404).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }
}

pub(crate) fn status_is_retryable(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT
}

fn status_hint(status: StatusCode) -> &'static str {
    match status.as_u16() {
        403 => "; the account is not allowed to do this: grant it access to the repository (for a Harbor robot account, add the permission to the robot)",
        404 => "; check the repository name, tag and digest",
        413 => "; the registry or a proxy in front of it refuses bodies this large: raise its upload limit",
        429 => "; the registry is rate limiting: retry later",
        s if s >= 500 => "; a registry-side failure: retry later, and look at the registry's log if it persists",
        _ => "",
    }
}

fn unauthorized_text(f: &AuthFailure) -> String {
    let AuthFailure { host, repository, access, errors, .. } = f;
    if *access == "catalog" {
        return match &f.credentials {
            Some(origin) => format!(
                "registry {host} does not let the account from {origin} list its repositories (registry:catalog:*){errors}; \
                 use an account that may (in Harbor: a system administrator), or name the repositories without globs"
            ),
            None => format!(
                "registry {host} requires authentication to list its repositories{errors} and no credentials are configured \
                 for it; set registries.\"{host}\".auth (base64 of user:secret) or username and password in the config"
            ),
        };
    }
    match &f.credentials {
        Some(origin) if f.insufficient_scope => format!(
            "registry {host} accepted the credentials from {origin} but they do not grant {access} access to repository \
             {repository}{errors}; give the account (or robot account) {access} permission on {repository}"
        ),
        Some(origin) => format!(
            "registry {host} rejected the credentials from {origin} for {access} access to repository {repository}{errors}; \
             check the user name and password (or robot secret) and that the account may {access} {repository}"
        ),
        None => format!(
            "registry {host} requires authentication for {access} access to repository {repository}{errors} and no credentials \
             are configured for it; set registries.\"{host}\".auth (base64 of user:secret) or username and password in the \
             config, or log in with `docker login {host}`"
        ),
    }
}

/// The causes of a transport error: reqwest's own message (`error sending request for url
/// (…)`) repeats the URL and hides the part a user can act on (`connection refused`,
/// `certificate expired`).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        // hyper-util's wrapper adds nothing but its own name.
        if !text.starts_with("client error (") && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> RegistryError {
        RegistryError::Status {
            op: "pull manifest h/r:t".into(),
            url: "https://h/v2/r/manifests/t".into(),
            status: StatusCode::from_u16(code).unwrap(),
            errors: ApiErrors::default(),
        }
    }

    #[test]
    fn classification() {
        for code in [500, 502, 503, 504, 429, 408] {
            assert!(status(code).is_retryable(), "{code} should be retryable");
        }
        for code in [400, 401, 403, 404, 405, 413] {
            assert!(!status(code).is_retryable(), "{code} should not be retryable");
        }
        assert!(RegistryError::Timeout { op: "x".into(), url: "u".into(), after: Duration::from_secs(1) }.is_retryable());
        let d = Digest::of(b"a");
        assert!(!RegistryError::DigestMismatch { op: "x".into(), expected: d.clone(), actual: d }.is_retryable());
        let unauthorized = RegistryError::Unauthorized(Box::new(AuthFailure {
            op: "x".into(),
            host: "h".into(),
            repository: "r".into(),
            access: "pull",
            credentials: None,
            insufficient_scope: false,
            errors: ApiErrors::default(),
        }));
        assert!(!unauthorized.is_retryable());
        assert!(status(404).is_not_found());
        assert!(!status(500).is_not_found());
    }

    #[test]
    fn api_errors_parse_and_display() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"x"}},{"code":"DENIED","message":""}]}"#;
        let errors = ApiErrors::parse(body);
        assert_eq!(errors.0.len(), 2);
        assert!(errors.has_code("manifest_unknown"));
        assert_eq!(errors.to_string(), " (MANIFEST_UNKNOWN: manifest unknown; DENIED)");
        assert!(ApiErrors::parse(b"<html>bad gateway</html>").is_empty());
        assert_eq!(ApiErrors::default().to_string(), "");
    }

    #[test]
    fn messages_say_what_to_do() {
        let e = RegistryError::Unauthorized(Box::new(AuthFailure {
            op: "push blob".into(),
            host: "harbor.example.com".into(),
            repository: "p/app".into(),
            access: "pull,push",
            credentials: Some("registries.\"harbor.example.com\" in the config".into()),
            insufficient_scope: false,
            errors: ApiErrors::default(),
        }));
        let text = e.to_string();
        assert!(text.contains("rejected the credentials"), "{text}");
        assert!(text.contains("harbor.example.com") && text.contains("p/app"), "{text}");
        if let RegistryError::Unauthorized(mut f) = e {
            f.insufficient_scope = true;
            let text = f.to_string();
            assert!(text.contains("do not grant pull,push access"), "{text}");
        }
        let e = RegistryError::Unauthorized(Box::new(AuthFailure {
            op: "pull manifest".into(),
            host: "h:5000".into(),
            repository: "r".into(),
            access: "pull",
            credentials: None,
            insufficient_scope: false,
            errors: ApiErrors::default(),
        }));
        assert!(e.to_string().contains("registries.\"h:5000\".auth"), "{e}");
        assert!(status(503).to_string().contains("retry later"));
    }
}
