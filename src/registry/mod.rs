//! Registry client over the OCI distribution API: auth, manifests, streamed blobs, push, mount.

mod auth;
mod credentials;
mod error;
mod listing;
mod request;
mod transport;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode};
use tokio::io::AsyncRead;

use crate::config::Config;
use crate::oci::{media_types, Digest, Reference};

pub use credentials::Credentials;
pub use error::{ApiError, ApiErrors, AuthFailure, RegistryError};

use auth::{Access, AuthCache};
use credentials::CredentialStore;
use transport::{redact_url, resolve_location, with_query_param};

/// A manifest or index as the registry returned it. `bytes` are kept verbatim: the digest is
/// over them.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub media_type: String,
    pub digest: Digest,
    pub bytes: Bytes,
}

/// A blob body being downloaded.
pub struct BlobStream {
    /// Size announced by the registry, when it sent one.
    pub size: Option<u64>,
    pub stream: BoxStream<'static, Result<Bytes, RegistryError>>,
}

impl fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStream").field("size", &self.size).finish_non_exhaustive()
    }
}

/// How a blob reached the target repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// Already there (found with HEAD); nothing sent.
    Exists,
    /// Mounted from another repository of the same registry; nothing sent.
    Mounted,
    /// Uploaded.
    Uploaded,
}

/// Timeouts and limits of a [`RegistryClient`]. There is deliberately no total timeout on a
/// request: a multi-gigabyte blob over a slow link is legitimate, a stalled one is not.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Establishing a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Longest wait for response headers or for the next chunk of a body, and longest stall
    /// while sending an upload.
    pub idle_timeout: Duration,
    /// Longest wait for the registry to answer once an upload's last byte is sent; registries
    /// on object storage copy the blob into place before answering.
    pub upload_commit_timeout: Duration,
    /// Manifests and indexes larger than this are refused.
    pub max_manifest_bytes: u64,
    /// Addresses to use for host names instead of asking DNS (as curl's `--resolve`), for
    /// registries reachable under a name DNS does not know. Ports come from the URL.
    pub resolve: Vec<(String, IpAddr)>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            upload_commit_timeout: Duration::from_secs(600),
            max_manifest_bytes: 4 << 20,
            resolve: Vec::new(),
        }
    }
}

/// A client for the registries a config names. Cheap to share (`Arc`) between tasks: tokens and
/// what it learns about hosts are cached inside.
pub struct RegistryClient {
    http: reqwest::Client,
    /// Used only for hosts marked `insecure`: skips certificate verification.
    http_insecure: Option<reqwest::Client>,
    credentials: CredentialStore,
    options: ClientOptions,
    auth: Mutex<AuthCache>,
    /// Scheme found to work for each insecure host (probed once).
    schemes: Mutex<HashMap<String, &'static str>>,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Credentials and tokens stay out of this on purpose.
        f.debug_struct("RegistryClient").field("options", &self.options).finish_non_exhaustive()
    }
}

const USER_AGENT: &str = concat!("accel/", env!("CARGO_PKG_VERSION"));

/// `Content-Type` values that say nothing about what a manifest is; the body's `mediaType`
/// field is used instead.
const GENERIC_CONTENT_TYPES: [&str; 4] = ["", "application/json", "text/plain", "application/octet-stream"];

impl RegistryClient {
    /// Client using `config.registries` (credentials, `insecure`) and docker `config.json`.
    pub fn new(config: &Config) -> Result<Self, RegistryError> {
        RegistryClient::with_options(config, ClientOptions::default())
    }

    /// Like [`RegistryClient::new`], with other timeouts and limits.
    pub fn with_options(config: &Config, options: ClientOptions) -> Result<Self, RegistryError> {
        let credentials = CredentialStore::from_config(config)?;
        let builder = || {
            let mut b = reqwest::Client::builder()
                .user_agent(USER_AGENT)
                .connect_timeout(options.connect_timeout)
                .tcp_keepalive(Duration::from_secs(60))
                // reqwest drops Authorization when a redirect leaves the host, which is what
                // blob downloads redirected to object storage need.
                .redirect(reqwest::redirect::Policy::limited(10));
            for (name, ip) in &options.resolve {
                b = b.resolve(name, SocketAddr::new(*ip, 0));
            }
            b
        };
        let http = builder().build().map_err(RegistryError::Client)?;
        let http_insecure = if credentials.any_insecure() {
            Some(builder().danger_accept_invalid_certs(true).build().map_err(RegistryError::Client)?)
        } else {
            None
        };
        Ok(RegistryClient {
            http,
            http_insecure,
            credentials,
            options,
            auth: Mutex::new(AuthCache::default()),
            schemes: Mutex::new(HashMap::new()),
        })
    }

    /// Fetches the manifest or index a reference names (by digest when it has one, else by tag,
    /// else `latest`). Fetching by digest verifies the bytes against it.
    pub async fn get_manifest(&self, reference: &Reference) -> Result<Manifest, RegistryError> {
        let op = format!("pull manifest {reference}");
        let target = request::Target::new(reference, Access::Pull);
        let base = self.base_url(&target, &op).await?;
        let url = request::api_url(&base, &format!("{}/manifests/{}", reference.repository(), reference.manifest_selector()))?;
        let accept = media_types::MANIFEST_ACCEPT.join(", ");
        let response = self.send(&target, &op, Method::GET, &url, |rb| rb.header(ACCEPT, accept.as_str())).await?;
        let response = self.expect_status(response, &[StatusCode::OK], &op, &url).await?;

        let limit = self.options.max_manifest_bytes;
        if let Some(len) = response.content_length().filter(|l| *l > limit) {
            return Err(RegistryError::TooLarge { op, limit, size: Some(len) });
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
            .unwrap_or_default();
        let bytes = self.read_limited(response, &op, &url, target.registry, limit).await?;

        let media_type = if GENERIC_CONTENT_TYPES.contains(&content_type.as_str()) {
            media_type_field(&bytes).ok_or_else(|| RegistryError::InvalidResponse {
                op: op.clone(),
                url: redact_url(&url),
                why: format!(
                    "the body has no mediaType field and the Content-Type {content_type:?} does not say what it is"
                ),
            })?
        } else {
            content_type
        };
        // Manifests are small (bounded above), so hashing them in place costs microseconds.
        let digest = Digest::of(&bytes);
        if let Some(expected) = reference.digest() {
            if *expected != digest {
                return Err(RegistryError::DigestMismatch { op, expected: expected.clone(), actual: digest });
            }
        }
        tracing::debug!(reference = %reference, %digest, %media_type, size = bytes.len(), "pulled manifest");
        Ok(Manifest { media_type, digest, bytes })
    }

    /// Size of a blob in `repo` when it is there.
    pub async fn head_blob(&self, repo: &Reference, digest: &Digest) -> Result<Option<u64>, RegistryError> {
        self.head_blob_as(repo, digest, Access::Pull).await
    }

    async fn head_blob_as(&self, repo: &Reference, digest: &Digest, access: Access) -> Result<Option<u64>, RegistryError> {
        let op = format!("check blob {digest} in {}", repo.name());
        let target = request::Target::new(repo, access);
        let base = self.base_url(&target, &op).await?;
        let url = request::api_url(&base, &format!("{}/blobs/{digest}", repo.repository()))?;
        let response = self.send(&target, &op, Method::HEAD, &url, |rb| rb).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let response = self.expect_status(response, &[StatusCode::OK], &op, &url).await?;
        // Read the header itself: for HEAD the body is empty, so reqwest's content_length() is 0.
        let size = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| RegistryError::InvalidResponse {
                op,
                url: redact_url(&url),
                why: "the blob exists but the answer has no Content-Length".into(),
            })?;
        Ok(Some(size))
    }

    /// Streams a blob of `repo`. The caller verifies the digest (the store does on commit).
    pub async fn get_blob(&self, repo: &Reference, digest: &Digest) -> Result<BlobStream, RegistryError> {
        let op = format!("pull blob {digest} from {}", repo.name());
        let target = request::Target::new(repo, Access::Pull);
        let base = self.base_url(&target, &op).await?;
        let url = request::api_url(&base, &format!("{}/blobs/{digest}", repo.repository()))?;
        let response = self.send(&target, &op, Method::GET, &url, |rb| rb).await?;
        let response = self.expect_status(response, &[StatusCode::OK], &op, &url).await?;
        let size = response.content_length();
        let stream = transport::idle_limited_body(response, op, url, target.registry.to_string(), self.options.idle_timeout);
        Ok(BlobStream { size, stream: stream.boxed() })
    }

    /// Makes a blob present in `repo`: nothing when it already is, a cross-repository mount when
    /// `mount_from` is in the same registry, else a streamed upload of `body` (`size` bytes).
    pub async fn push_blob(
        &self,
        repo: &Reference,
        digest: &Digest,
        size: u64,
        mount_from: Option<&Reference>,
        body: Box<dyn AsyncRead + Send + Unpin>,
    ) -> Result<PushOutcome, RegistryError> {
        // Push scope from the first request on, so one token serves HEAD, POST and PUT.
        if self.head_blob_as(repo, digest, Access::Push).await?.is_some() {
            tracing::debug!(repository = %repo.name(), %digest, "blob already present");
            return Ok(PushOutcome::Exists);
        }
        let op = format!("push blob {digest} to {}", repo.name());
        let mount = mount_from.filter(|m| m.registry() == repo.registry() && m.repository() != repo.repository());
        let mut opened = None;
        if let Some(m) = mount {
            let access = Access::Mount { from: m.repository().to_string() };
            match self.start_upload(repo, digest, Some(m), access.clone(), &op).await {
                Ok(UploadStart::Mounted) => {
                    tracing::debug!(repository = %repo.name(), %digest, from = %m.name(), "blob mounted");
                    return Ok(PushOutcome::Mounted);
                }
                Ok(UploadStart::Upload(url)) => opened = Some((url, access)),
                // No pull access to the source: a plain upload still works, as docker does it.
                Err(e) if matches!(e.status(), Some(StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)) => {
                    tracing::debug!(repository = %repo.name(), %digest, from = %m.name(), error = %e, "mount refused; uploading");
                }
                Err(e) => return Err(e),
            }
        }
        let (upload_url, access) = match opened {
            Some(o) => o,
            None => match self.start_upload(repo, digest, None, Access::Push, &op).await? {
                UploadStart::Upload(url) => (url, Access::Push),
                UploadStart::Mounted => return Ok(PushOutcome::Mounted),
            },
        };
        let target = request::Target::new(repo, access);
        let base = self.base_url(&target, &op).await?;
        let put_url = with_query_param(&upload_url, "digest", &digest.to_string());
        let response = self.upload(&target, &op, &base, &put_url, size, body).await?;
        let response = self.expect_status(response, &[StatusCode::CREATED], &op, &put_url).await?;
        if let Some(stored) = request::content_digest(&response) {
            if stored != *digest {
                return Err(RegistryError::DigestMismatch { op, expected: digest.clone(), actual: stored });
            }
        }
        tracing::debug!(repository = %repo.name(), %digest, size, "blob uploaded");
        Ok(PushOutcome::Uploaded)
    }

    /// Opens an upload session (`POST …/blobs/uploads/`), asking for a mount from `mount` when
    /// given.
    async fn start_upload(
        &self,
        repo: &Reference,
        digest: &Digest,
        mount: Option<&Reference>,
        access: Access,
        op: &str,
    ) -> Result<UploadStart, RegistryError> {
        let target = request::Target::new(repo, access);
        let base = self.base_url(&target, op).await?;
        let mut url = request::api_url(&base, &format!("{}/blobs/uploads/", repo.repository()))?;
        if let Some(m) = mount {
            url = with_query_param(&url, "mount", &digest.to_string());
            url = with_query_param(&url, "from", m.repository());
        }
        let response =
            self.send(&target, op, Method::POST, &url, |rb| rb.header(CONTENT_LENGTH, "0").body(Vec::<u8>::new())).await?;
        if mount.is_some() && response.status() == StatusCode::CREATED {
            return Ok(UploadStart::Mounted);
        }
        // A 202 to a mount request means the registry could not mount and opened an upload.
        let response = self.expect_status(response, &[StatusCode::ACCEPTED], op, &url).await?;
        let location = response.headers().get(LOCATION).and_then(|v| v.to_str().ok()).ok_or_else(|| {
            RegistryError::InvalidResponse {
                op: op.to_string(),
                url: redact_url(&url),
                why: "the upload was accepted without a Location to send the blob to".into(),
            }
        })?;
        resolve_location(response.url(), location)
            .map(UploadStart::Upload)
            .map_err(|why| RegistryError::InvalidResponse { op: op.to_string(), url: redact_url(&url), why })
    }

    /// Pushes a manifest or index under the reference's tag (or its digest when untagged).
    pub async fn put_manifest(&self, reference: &Reference, media_type: &str, bytes: Bytes) -> Result<Digest, RegistryError> {
        let op = format!("push manifest {reference}");
        if media_type.trim().is_empty() {
            return Err(RegistryError::InvalidRequest { op, why: "the media type is empty".into() });
        }
        let digest = Digest::of(&bytes);
        if let Some(expected) = reference.digest() {
            if *expected != digest {
                return Err(RegistryError::DigestMismatch { op, expected: expected.clone(), actual: digest });
            }
        }
        let selector = match reference.tag() {
            Some(tag) => tag.to_string(),
            None => digest.to_string(),
        };
        let target = request::Target::new(reference, Access::Push);
        let base = self.base_url(&target, &op).await?;
        let url = request::api_url(&base, &format!("{}/manifests/{selector}", reference.repository()))?;
        let response = self
            .send(&target, &op, Method::PUT, &url, |rb| rb.header(CONTENT_TYPE, media_type).body(bytes.clone()))
            .await?;
        let response = self.expect_status(response, &[StatusCode::CREATED, StatusCode::OK], &op, &url).await?;
        if let Some(stored) = request::content_digest(&response) {
            if stored != digest {
                return Err(RegistryError::DigestMismatch { op, expected: digest, actual: stored });
            }
        }
        tracing::debug!(reference = %reference, %digest, %media_type, "pushed manifest");
        Ok(digest)
    }
}

/// What the registry did with a request to open an upload.
enum UploadStart {
    /// It mounted the blob from the requested source; nothing to send.
    Mounted,
    /// Send the blob to this URL.
    Upload(url::Url),
}

/// The `mediaType` field of a manifest or index body, when it has one.
fn media_type_field(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(bytes).ok()?.media_type.filter(|m| !m.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_from_body() {
        assert_eq!(
            media_type_field(br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}"#).as_deref(),
            Some(media_types::OCI_INDEX)
        );
        assert_eq!(media_type_field(br#"{"schemaVersion":2}"#), None);
        assert_eq!(media_type_field(b"not json"), None);
    }

    #[test]
    fn debug_shows_no_credentials() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let docker_config = dir.path().join("config.json");
        std::fs::write(&docker_config, "{}").unwrap();
        let mut config = Config { docker_config: Some(docker_config), ..Default::default() };
        config.registries.insert(
            "h.example".into(),
            crate::config::RegistryConfig {
                auth: Some(crate::config::Secret::new(base64::engine::general_purpose::STANDARD.encode("u:topsecret"))),
                ..Default::default()
            },
        );
        let client = RegistryClient::new(&config).unwrap();
        assert!(!format!("{client:?}").contains("topsecret"));
        assert!(!format!("{client:?}").contains("dTp0b3BzZWNyZXQ"));
    }
}
