//! Content store: blobs kept between pull, convert and push, addressed by digest.
//!
//! `EmbeddedStore` (local disk) is the default; other back ends implement the same trait.

mod embedded;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

pub use embedded::EmbeddedStore;

use crate::config::StoreConfig;
use crate::oci::Digest;

pub type BlobReader = Box<dyn AsyncRead + Send + Unpin>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob {0} is not in the content store")]
    NotFound(Digest),
    #[error("content written as {expected} hashes to {actual} ({size} bytes); the data was corrupted in transit")]
    DigestMismatch { expected: Digest, actual: Digest, size: u64 },
    #[error("content store at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { path, source }
    }

    /// A digest mismatch may be a truncated download; retrying the pull can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::DigestMismatch { .. })
    }
}

/// A blob being written. Nothing is visible under its digest until `commit` succeeds.
#[async_trait]
pub trait BlobWriter: AsyncWrite + Send + Unpin {
    /// Makes the blob visible. With `expected`, fails (and keeps nothing) unless the content
    /// hashes to it. Returns the digest and size written.
    async fn commit(self: Box<Self>, expected: Option<&Digest>) -> Result<(Digest, u64), StoreError>;
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Size of the blob when present.
    async fn has(&self, digest: &Digest) -> Result<Option<u64>, StoreError>;
    async fn reader(&self, digest: &Digest) -> Result<BlobReader, StoreError>;
    async fn writer(&self) -> Result<Box<dyn BlobWriter>, StoreError>;
    async fn delete(&self, digest: &Digest) -> Result<(), StoreError>;
    /// Bytes held by committed blobs.
    async fn usage(&self) -> Result<u64, StoreError>;
    /// Keeps blobs from eviction while the returned lease lives.
    fn lease(&self) -> Lease;
}

/// Builds the store a config names.
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    match config {
        StoreConfig::Embedded { path, max_size } => {
            let path = path.clone().unwrap_or_else(default_store_path);
            Ok(Arc::new(EmbeddedStore::open(&path, max_size.bytes()).await?))
        }
    }
}

fn default_store_path() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("accel").join("store")
}

/// Shared pin counts: a blob with a non-zero count is never evicted.
#[derive(Default, Clone)]
pub struct Pins(Arc<Mutex<HashMap<Digest, usize>>>);

impl Pins {
    pub fn is_pinned(&self, d: &Digest) -> bool {
        self.0.lock().unwrap().get(d).is_some_and(|n| *n > 0)
    }
}

/// Protects the blobs added to it from eviction until dropped.
pub struct Lease {
    pins: Pins,
    held: Mutex<Vec<Digest>>,
}

impl Lease {
    pub fn new(pins: Pins) -> Self {
        Lease { pins, held: Mutex::new(Vec::new()) }
    }

    pub fn add(&self, d: &Digest) {
        *self.pins.0.lock().unwrap().entry(d.clone()).or_default() += 1;
        self.held.lock().unwrap().push(d.clone());
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut pins = self.pins.0.lock().unwrap();
        for d in self.held.lock().unwrap().drain(..) {
            if let Some(n) = pins.get_mut(&d) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(&d);
                }
            }
        }
    }
}
