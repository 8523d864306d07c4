//! Embedded content store: `blobs/sha256/<hex>` files under one directory.
//!
//! Writes go to `ingest/` and are renamed into place only after the digest checks out and the
//! data is synced, so a crash never leaves a partial blob under a real digest. Beyond
//! `max_size`, least recently used blobs that no lease holds are evicted.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::io::AsyncWrite;

use super::{BlobReader, BlobWriter, Lease, PinLease, Pins, Store, StoreError};
use crate::oci::{Digest, Hasher};

pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    max_size: u64,
    usage: AtomicU64,
    pins: Pins,
    evicting: tokio::sync::Mutex<()>,
}

impl EmbeddedStore {
    pub async fn open(root: &Path, max_size: u64) -> Result<Self, StoreError> {
        let blobs = root.join("blobs").join("sha256");
        let ingest = root.join("ingest");
        for dir in [&blobs, &ingest] {
            tokio::fs::create_dir_all(dir).await.map_err(StoreError::io(dir))?;
        }
        // Leftovers of writes that never committed (a crash or a kill): never visible, now garbage.
        let mut rd = tokio::fs::read_dir(&ingest).await.map_err(StoreError::io(&ingest))?;
        while let Some(e) = rd.next_entry().await.map_err(StoreError::io(&ingest))? {
            let _ = tokio::fs::remove_file(e.path()).await;
        }
        let store = EmbeddedStore {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                max_size,
                usage: AtomicU64::new(0),
                pins: Pins::default(),
                evicting: tokio::sync::Mutex::new(()),
            }),
        };
        let total: u64 = store.inner.list().await?.iter().map(|(_, size, _)| size).sum();
        store.inner.usage.store(total, Ordering::Relaxed);
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Path of a committed blob (for readers that want a plain file).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner.blob_path(digest)
    }
}

impl Inner {
    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(d.hex())
    }

    async fn list(&self) -> Result<Vec<(Digest, u64, SystemTime)>, StoreError> {
        let dir = self.root.join("blobs").join("sha256");
        let mut rd = tokio::fs::read_dir(&dir).await.map_err(StoreError::io(&dir))?;
        let mut out = Vec::new();
        while let Some(e) = rd.next_entry().await.map_err(StoreError::io(&dir))? {
            let Some(d) = e.file_name().to_str().and_then(|n| format!("sha256:{n}").parse::<Digest>().ok()) else {
                continue;
            };
            if let Ok(m) = e.metadata().await {
                out.push((d, m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
            }
        }
        Ok(out)
    }

    /// Evicts down to `max_size`, never touching `keep` (the blob just committed: its lease
    /// may end with the writer, but the caller has yet to see it).
    async fn evict(&self, keep: &Digest) -> Result<(), StoreError> {
        if self.usage.load(Ordering::Relaxed) <= self.max_size {
            return Ok(());
        }
        let _one_at_a_time = self.evicting.lock().await;
        let mut blobs = self.list().await?;
        blobs.sort_by_key(|(_, _, used)| *used);
        for (d, size, _) in blobs {
            if self.usage.load(Ordering::Relaxed) <= self.max_size {
                break;
            }
            if self.pins.is_pinned(&d) || d == *keep {
                continue;
            }
            if tokio::fs::remove_file(self.blob_path(&d)).await.is_ok() {
                self.usage.fetch_sub(size, Ordering::Relaxed);
                tracing::debug!(digest = %d, size, "evicted blob from content store");
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn has(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        match tokio::fs::metadata(self.inner.blob_path(digest)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io { path: self.inner.blob_path(digest), source: e }),
        }
    }

    async fn reader(&self, digest: &Digest) -> Result<BlobReader, StoreError> {
        let path = self.inner.blob_path(digest);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotFound(digest.clone())),
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        // The modification time records last use for eviction; failing to set it is harmless.
        let _ = file.set_modified(SystemTime::now());
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn writer(&self, lease: &Lease) -> Result<Box<dyn BlobWriter>, StoreError> {
        let lease = lease.pins().expect("an embedded store hands out pin leases only");
        let path = self.inner.root.join("ingest").join(uuid::Uuid::new_v4().to_string());
        let file = tokio::fs::File::create(&path).await.map_err(StoreError::io(&path))?;
        Ok(Box::new(EmbeddedWriter { inner: self.inner.clone(), lease, path, file, hasher: Hasher::new() }))
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.inner.blob_path(digest);
        match tokio::fs::metadata(&path).await {
            Ok(m) => {
                tokio::fs::remove_file(&path).await.map_err(StoreError::io(&path))?;
                self.inner.usage.fetch_sub(m.len(), Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    async fn usage(&self) -> Result<u64, StoreError> {
        Ok(self.inner.usage.load(Ordering::Relaxed))
    }

    async fn lease(&self) -> Result<Lease, StoreError> {
        Ok(Lease::new(self.inner.pins.clone()))
    }
}

struct EmbeddedWriter {
    inner: Arc<Inner>,
    lease: Arc<PinLease>,
    path: PathBuf,
    file: tokio::fs::File,
    hasher: Hasher,
}

impl AsyncWrite for EmbeddedWriter {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.file).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.hasher.update(&buf[..n]);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl Drop for EmbeddedWriter {
    fn drop(&mut self) {
        // Not committed (error or cancellation): the temp file goes. After a commit it is gone.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[async_trait]
impl BlobWriter for EmbeddedWriter {
    async fn commit(mut self: Box<Self>, expected: Option<&Digest>) -> Result<(Digest, u64), StoreError> {
        use tokio::io::AsyncWriteExt;
        let ingest = self.path.clone();
        self.file.flush().await.map_err(StoreError::io(&ingest))?;
        self.file.sync_all().await.map_err(StoreError::io(&ingest))?;
        let size = self.hasher.len();
        let digest = std::mem::take(&mut self.hasher).finish();
        if let Some(expected) = expected {
            if *expected != digest {
                return Err(StoreError::DigestMismatch { expected: expected.clone(), actual: digest, size });
            }
        }
        let target = self.inner.blob_path(&digest);
        let existed = tokio::fs::try_exists(&target).await.unwrap_or(false);
        tokio::fs::rename(&ingest, &target).await.map_err(StoreError::io(&target))?;
        if let Some(dir) = target.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        if !existed {
            self.inner.usage.fetch_add(size, Ordering::Relaxed);
        }
        self.lease.add(&digest);
        self.inner.evict(&digest).await?;
        Ok((digest, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn put(store: &EmbeddedStore, data: &[u8]) -> Digest {
        // A lease of its own, dropped at once: the blob is then free to evict.
        let lease = store.lease().await.unwrap();
        let mut w = store.writer(&lease).await.unwrap();
        w.write_all(data).await.unwrap();
        w.commit(Some(&Digest::of(data))).await.unwrap().0
    }

    #[tokio::test]
    async fn write_read_verify() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), 1 << 20).await.unwrap();
        let d = put(&store, b"hello").await;
        assert_eq!(store.has(&d).await.unwrap(), Some(5));
        let mut s = String::new();
        store.reader(&d).await.unwrap().read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello");
        assert_eq!(store.usage().await.unwrap(), 5);

        let lease = store.lease().await.unwrap();
        let mut w = store.writer(&lease).await.unwrap();
        w.write_all(b"tampered").await.unwrap();
        let err = w.commit(Some(&Digest::of(b"original"))).await.unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert_eq!(store.has(&Digest::of(b"tampered")).await.unwrap(), None);
        assert_eq!(std::fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);
        assert!(matches!(store.reader(&Digest::of(b"x")).await, Err(StoreError::NotFound(_))));
    }

    #[tokio::test]
    async fn uncommitted_writes_vanish_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), 1 << 20).await.unwrap();
        put(&store, b"kept").await;
        std::fs::write(dir.path().join("ingest").join("half"), b"partial").unwrap();
        drop(store);
        let store = EmbeddedStore::open(dir.path(), 1 << 20).await.unwrap();
        assert_eq!(store.usage().await.unwrap(), 4);
        assert_eq!(std::fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn evicts_least_recently_used_but_not_leased() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), 25).await.unwrap();
        let a = put(&store, &[b'a'; 10]).await;
        let b = put(&store, &[b'b'; 10]).await;
        // Make `a` the oldest, then lease it: `b` must go instead when `c` arrives.
        let age = |d: &Digest, secs| {
            let when = SystemTime::now() - std::time::Duration::from_secs(secs);
            std::fs::File::options().write(true).open(store.blob_path(d)).unwrap().set_modified(when).unwrap();
        };
        age(&a, 3600);
        age(&b, 1800);
        let lease = store.lease().await.unwrap();
        lease.add(&a).await.unwrap();
        let c = put(&store, &[b'c'; 10]).await;
        assert!(store.has(&a).await.unwrap().is_some(), "leased blob was evicted");
        assert!(store.has(&b).await.unwrap().is_none());
        assert!(store.has(&c).await.unwrap().is_some());
        drop(lease);
        let _d = put(&store, &[b'd'; 10]).await;
        assert!(store.has(&a).await.unwrap().is_none(), "oldest unleased blob should go");
        assert!(store.usage().await.unwrap() <= 25);
    }
}
