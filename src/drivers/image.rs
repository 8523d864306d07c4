//! The image-level step of a driver: after every layer of a platform image is converted, a
//! driver may add layers, edit the config and annotate the manifest (Nydus appends its
//! bootstrap layer here). Most drivers keep the default, which changes nothing.

use std::any::Any;
use std::collections::BTreeMap;
use std::io::{Read, Write};

use super::DriverError;
use crate::oci::{Descriptor, Digest};

/// What a driver keeps from one layer's conversion for its image step (for example the path of
/// a layer's bootstrap). The step downcasts it to its own type.
pub type LayerState = Box<dyn Any + Send + Sync>;

/// One converted layer, its blob already in the content store.
pub struct ConvertedLayer {
    /// Media type, digest, size and annotations of the target blob, as the manifest lists it.
    pub descriptor: Descriptor,
    /// The layer's `rootfs.diff_ids` entry.
    pub diff_id: Digest,
    /// What [`Driver::convert_layer`](super::Driver::convert_layer) returned in
    /// [`LayerOutput::state`](super::LayerOutput::state).
    pub state: Option<LayerState>,
}

impl std::fmt::Debug for ConvertedLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertedLayer")
            .field("descriptor", &self.descriptor)
            .field("diff_id", &self.diff_id)
            .field("state", &self.state.as_ref().map(|_| ".."))
            .finish()
    }
}

/// A target platform image before its config and manifest are written. The image step may
/// change any of it; the engine then sets `rootfs.diff_ids` from `layers`, stores the config
/// and writes the manifest with `layers` in order.
#[derive(Debug)]
pub struct ImageDraft {
    /// The converted layers, in source order.
    pub layers: Vec<ConvertedLayer>,
    /// The target config: the source's, whose `rootfs.diff_ids` is rewritten afterwards.
    pub config: serde_json::Value,
    /// Annotations of the target manifest (the source's plus the engine's own).
    pub annotations: BTreeMap<String, String>,
    /// The source image's reference as given (`host/repo:tag`), for the driver's annotations.
    pub source: String,
}

/// Blocking access to the content store for the image step, which runs on the blocking pool.
pub trait BlobAccess {
    /// Reads a blob of the store, e.g. a converted layer.
    fn open(&self, digest: &Digest) -> Result<Box<dyn Read + Send>, DriverError>;

    /// Stores a new blob whose bytes `write` produces; returns its digest and size. The blob is
    /// kept for the rest of the conversion (readable with `open` at once) and pushed if a
    /// descriptor in the draft names it.
    fn add(&self, write: &mut dyn FnMut(&mut dyn Write) -> Result<(), DriverError>) -> Result<(Digest, u64), DriverError>;
}
