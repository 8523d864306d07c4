//! Content store: blobs kept between pull, convert and push, addressed by digest.
//!
//! `EmbeddedStore` (local disk) is the default; `ContainerdStore` keeps blobs in a running
//! containerd's content store. Both implement the same trait.

pub mod containerd;
mod embedded;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

pub use containerd::{ContainerdError, ContainerdStore};
pub use embedded::EmbeddedStore;

use crate::config::StoreConfig;
use crate::oci::{Descriptor, Digest, Reference};

pub type BlobReader = Box<dyn AsyncRead + Send + Unpin>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob {0} is not in the content store")]
    NotFound(Digest),
    #[error("content written as {expected} hashes to {actual} ({size} bytes); the data was corrupted in transit")]
    DigestMismatch { expected: Digest, actual: Digest, size: u64 },
    #[error("content store at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { path, source }
    }

    /// A digest mismatch may be a truncated download; retrying the pull can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::DigestMismatch { .. } => true,
            StoreError::Containerd(e) => e.is_retryable(),
            _ => false,
        }
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
    /// A writer whose blob, once committed, is held by `lease` (with no gap in which it could
    /// be evicted or collected).
    async fn writer(&self, lease: &Lease) -> Result<Box<dyn BlobWriter>, StoreError>;
    async fn delete(&self, digest: &Digest) -> Result<(), StoreError>;
    /// Bytes held by committed blobs.
    async fn usage(&self) -> Result<u64, StoreError>;
    /// Keeps blobs from eviction (or garbage collection) until the lease is released.
    async fn lease(&self) -> Result<Lease, StoreError>;

    /// Stores a manifest or index that accel wrote. Stores with garbage collection also
    /// record what it refers to, so that whatever keeps it keeps its config, layers and
    /// child manifests too.
    async fn put_manifest(&self, media_type: &str, bytes: &[u8], lease: &Lease) -> Result<Digest, StoreError> {
        use tokio::io::AsyncWriteExt;
        let _ = media_type;
        let mut w = self.writer(lease).await?;
        w.write_all(bytes).await.map_err(StoreError::io("ingest"))?;
        Ok(w.commit(Some(&Digest::of(bytes))).await?.0)
    }

    /// Records a converted image under `name` once it is pushed, for stores that keep image
    /// records (containerd with `register_images`). Others keep nothing.
    async fn register_image(&self, name: &Reference, target: &Descriptor) -> Result<(), StoreError> {
        let _ = (name, target);
        Ok(())
    }
}

/// Builds the store a config names.
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    match config {
        StoreConfig::Embedded { path, max_size } => {
            let path = path.clone().unwrap_or_else(default_store_path);
            Ok(Arc::new(EmbeddedStore::open(&path, max_size.bytes()).await?))
        }
        StoreConfig::Containerd { address, namespace, register_images } => {
            Ok(Arc::new(ContainerdStore::open(address, namespace, *register_images).await?))
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

/// Protects the blobs added to it (or written under it) until released or dropped.
pub struct Lease(LeaseKind);

enum LeaseKind {
    Pins(Arc<PinLease>),
    Containerd(containerd::RemoteLease),
}

impl Lease {
    /// A lease over in-process pin counts.
    pub fn new(pins: Pins) -> Self {
        Lease(LeaseKind::Pins(Arc::new(PinLease { pins, held: Mutex::new(Vec::new()) })))
    }

    pub(crate) fn containerd(lease: containerd::RemoteLease) -> Self {
        Lease(LeaseKind::Containerd(lease))
    }

    /// Holds `d`, present or not yet written.
    pub async fn add(&self, d: &Digest) -> Result<(), StoreError> {
        match &self.0 {
            LeaseKind::Pins(p) => {
                p.add(d);
                Ok(())
            }
            LeaseKind::Containerd(l) => l.add(d).await,
        }
    }

    /// Ends the lease now. Dropping it does the same, but in the background for remote stores.
    pub async fn release(self) {
        match self.0 {
            LeaseKind::Pins(_) => {}
            LeaseKind::Containerd(l) => l.release().await,
        }
    }

    fn pins(&self) -> Option<Arc<PinLease>> {
        match &self.0 {
            LeaseKind::Pins(p) => Some(p.clone()),
            LeaseKind::Containerd(_) => None,
        }
    }

    fn containerd_id(&self) -> Option<&str> {
        match &self.0 {
            LeaseKind::Containerd(l) => Some(l.id()),
            LeaseKind::Pins(_) => None,
        }
    }
}

/// The pins one lease holds on an [`EmbeddedStore`].
struct PinLease {
    pins: Pins,
    held: Mutex<Vec<Digest>>,
}

impl PinLease {
    fn add(&self, d: &Digest) {
        *self.pins.0.lock().unwrap().entry(d.clone()).or_default() += 1;
        self.held.lock().unwrap().push(d.clone());
    }
}

impl Drop for PinLease {
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
