//! Blocking content-store access for a driver's image step, which runs on the blocking pool.
//!
//! Blobs the step adds are staged in temporary files and stored (under the conversion's lease)
//! by [`StoreBlobs::store_added`] once the step has returned, back on the runtime.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::runtime::Handle;
use tokio_util::io::SyncIoBridge;

use crate::drivers::{BlobAccess, DriverError};
use crate::oci::{Digest, Hasher};
use crate::store::{Lease, Store, StoreError};

/// [`BlobAccess`] over a [`Store`].
pub(crate) struct StoreBlobs {
    store: Arc<dyn Store>,
    runtime: Handle,
    added: Mutex<Vec<(Digest, tempfile::NamedTempFile)>>,
}

impl StoreBlobs {
    /// Must be made on the runtime (it keeps its handle).
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        StoreBlobs { store, runtime: Handle::current(), added: Mutex::new(Vec::new()) }
    }

    /// Stores the blobs the step added, each checked against the digest the step was given.
    pub(crate) async fn store_added(self, lease: &Lease) -> Result<(), StoreError> {
        let added = self.added.into_inner().unwrap_or_else(|e| e.into_inner());
        for (digest, file) in added {
            let mut source = tokio::fs::File::open(file.path()).await.map_err(StoreError::io(file.path()))?;
            let mut w = self.store.writer(lease).await?;
            tokio::io::copy(&mut source, &mut w).await.map_err(StoreError::io(file.path()))?;
            w.shutdown().await.map_err(StoreError::io("ingest"))?;
            w.commit(Some(&digest)).await?;
        }
        Ok(())
    }
}

fn store_error(e: StoreError) -> DriverError {
    DriverError::Io(io::Error::other(e.to_string()))
}

impl BlobAccess for StoreBlobs {
    fn open(&self, digest: &Digest) -> Result<Box<dyn Read + Send>, DriverError> {
        let staged = self.added.lock().unwrap().iter().find(|(d, _)| d == digest).map(|(_, f)| f.reopen());
        if let Some(file) = staged {
            return Ok(Box::new(file?));
        }
        let reader = self.runtime.block_on(self.store.reader(digest)).map_err(store_error)?;
        Ok(Box::new(SyncIoBridge::new_with_handle(reader, self.runtime.clone())))
    }

    fn add(&self, write: &mut dyn FnMut(&mut dyn Write) -> Result<(), DriverError>) -> Result<(Digest, u64), DriverError> {
        let file = tempfile::NamedTempFile::new()?;
        let mut out = Tee { file: io::BufWriter::with_capacity(1 << 20, file.reopen()?), hasher: Hasher::new() };
        write(&mut out)?;
        out.file.flush()?;
        let size = out.hasher.len();
        let digest = out.hasher.finish();
        self.added.lock().unwrap().push((digest.clone(), file));
        Ok((digest, size))
    }
}

/// Writes to a file and hashes what it writes.
struct Tee {
    file: io::BufWriter<std::fs::File>,
    hasher: Hasher,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}
