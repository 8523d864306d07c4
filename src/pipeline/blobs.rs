//! Blocking content-store access for a driver's image step, which runs on the blocking pool.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::runtime::Handle;
use tokio_util::io::SyncIoBridge;

use crate::drivers::{BlobAccess, DriverError};
use crate::oci::Digest;
use crate::store::{Store, StoreError};

/// [`BlobAccess`] over a [`Store`]; remembers the blobs it added so the caller can lease them.
pub(crate) struct StoreBlobs {
    store: Arc<dyn Store>,
    runtime: Handle,
    added: Mutex<Vec<Digest>>,
}

impl StoreBlobs {
    /// Must be made on the runtime (it keeps its handle).
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        StoreBlobs { store, runtime: Handle::current(), added: Mutex::new(Vec::new()) }
    }

    /// Digests of the blobs added so far.
    pub(crate) fn added(&self) -> Vec<Digest> {
        self.added.lock().unwrap().clone()
    }
}

fn store_error(e: StoreError) -> DriverError {
    DriverError::Io(io::Error::other(e.to_string()))
}

impl BlobAccess for StoreBlobs {
    fn open(&self, digest: &Digest) -> Result<Box<dyn Read + Send>, DriverError> {
        let reader = self.runtime.block_on(self.store.reader(digest)).map_err(store_error)?;
        Ok(Box::new(SyncIoBridge::new_with_handle(reader, self.runtime.clone())))
    }

    fn add(&self, write: &mut dyn FnMut(&mut dyn Write) -> Result<(), DriverError>) -> Result<(Digest, u64), DriverError> {
        let writer = self.runtime.block_on(self.store.writer()).map_err(store_error)?;
        let mut bridge = io::BufWriter::with_capacity(1 << 20, SyncIoBridge::new_with_handle(writer, self.runtime.clone()));
        write(&mut bridge)?;
        bridge.flush()?;
        let bridge = bridge.into_inner().map_err(|e| e.into_error())?;
        let mut writer = bridge.into_inner();
        let (digest, size) = self
            .runtime
            .block_on(async move {
                writer.shutdown().await.map_err(|e| StoreError::Io { path: "ingest".into(), source: e })?;
                writer.commit(None).await
            })
            .map_err(store_error)?;
        self.added.lock().unwrap().push(digest.clone());
        Ok((digest, size))
    }
}
