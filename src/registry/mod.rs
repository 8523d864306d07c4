//! Registry client over the OCI distribution API: auth, manifests, streamed blobs, push, mount.

use bytes::Bytes;
use futures::stream::BoxStream;
use tokio::io::AsyncRead;

use crate::config::Config;
use crate::oci::{Digest, Reference};

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

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry request failed: {0}")]
    Other(String),
}

impl RegistryError {
    /// Whether trying again later can succeed (5xx, timeouts, connection resets, 429).
    pub fn is_retryable(&self) -> bool {
        false
    }
}

pub struct RegistryClient {}

impl RegistryClient {
    /// Client using `config.registries` (credentials, `insecure`) and docker `config.json`.
    pub fn new(_config: &Config) -> Result<Self, RegistryError> {
        todo!()
    }

    /// Fetches the manifest or index a reference names (by digest when it has one, else by tag,
    /// else `latest`). Fetching by digest verifies the bytes against it.
    pub async fn get_manifest(&self, _reference: &Reference) -> Result<Manifest, RegistryError> {
        todo!()
    }

    /// Size of a blob in `repo` when it is there.
    pub async fn head_blob(&self, _repo: &Reference, _digest: &Digest) -> Result<Option<u64>, RegistryError> {
        todo!()
    }

    /// Streams a blob of `repo`. The caller verifies the digest (the store does on commit).
    pub async fn get_blob(&self, _repo: &Reference, _digest: &Digest) -> Result<BlobStream, RegistryError> {
        todo!()
    }

    /// Makes a blob present in `repo`: nothing when it already is, a cross-repository mount when
    /// `mount_from` is in the same registry, else a streamed upload of `body` (`size` bytes).
    pub async fn push_blob(
        &self,
        _repo: &Reference,
        _digest: &Digest,
        _size: u64,
        _mount_from: Option<&Reference>,
        _body: Box<dyn AsyncRead + Send + Unpin>,
    ) -> Result<PushOutcome, RegistryError> {
        todo!()
    }

    /// Pushes a manifest or index under the reference's tag (or its digest when untagged).
    pub async fn put_manifest(&self, _reference: &Reference, _media_type: &str, _bytes: Bytes) -> Result<Digest, RegistryError> {
        todo!()
    }
}
