//! Nydus (RAFS) writer, built in-process with nydus's own builder crates: each source layer
//! becomes one Nydus data blob plus a layer bootstrap, and the image step merges the layer
//! bootstraps (whiteouts applied) into the image bootstrap, appended as the last layer.
//!
//! The image is laid out as nydusify and nydus-snapshotter expect it: data blobs with media type
//! `application/vnd.oci.image.layer.nydus.blob.v1`, whose diff_id is their own digest (a blob is
//! not compressed at the layer level), and a gzip tar layer holding `image/image.boot`.

mod build;
mod merge;
mod prefetch;
pub mod reader;

#[cfg(test)]
mod tests;

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use super::{BlobAccess, Driver, DriverError, DriverKind, ImageDraft, LayerOutput, Publication};
use crate::config::ByteSize;

/// Media type of a Nydus data blob layer.
pub const MEDIA_TYPE_BLOB: &str = "application/vnd.oci.image.layer.nydus.blob.v1";
/// Marks a data blob layer.
pub const ANNOTATION_BLOB: &str = "containerd.io/snapshot/nydus-blob";
/// Marks the bootstrap layer.
pub const ANNOTATION_BOOTSTRAP: &str = "containerd.io/snapshot/nydus-bootstrap";
/// RAFS version of the bootstrap layer, "5" or "6".
pub const ANNOTATION_FS_VERSION: &str = "containerd.io/snapshot/nydus-fs-version";
/// Path of the bootstrap inside the bootstrap layer's tar.
pub const BOOTSTRAP_PATH: &str = "image/image.boot";
/// `artifactType` of a Nydus manifest in an index that also holds the source manifests.
pub const ARTIFACT_TYPE_MANIFEST: &str = "application/vnd.nydus.image.manifest.v1+json";
/// Platform `os.features` entry of a Nydus manifest in such an index.
pub const OS_FEATURE: &str = "nydus.remoteimage.v1";

const MIN_CHUNK_SIZE: u64 = 0x1000;
const MAX_CHUNK_SIZE: u64 = 0x100_0000;

/// How chunk data is compressed inside the data blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compressor {
    Zstd,
    Lz4Block,
    None,
}

impl Compressor {
    fn algorithm(self) -> nydus_utils::compress::Algorithm {
        match self {
            Compressor::Zstd => nydus_utils::compress::Algorithm::Zstd,
            Compressor::Lz4Block => nydus_utils::compress::Algorithm::Lz4Block,
            Compressor::None => nydus_utils::compress::Algorithm::None,
        }
    }
}

/// Options of the Nydus driver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NydusOptions {
    /// RAFS version: 6 (EROFS-compatible, the default) or 5.
    pub fs_version: u32,
    /// Chunk compression: `zstd`, `lz4_block` or `none`.
    pub compressor: Compressor,
    /// Files are cut into chunks of this size, each fetched on its own: a power of two from
    /// 4 KiB to 16 MiB.
    pub chunk_size: ByteSize,
    /// Absolute paths whose data a runtime fetches first (a directory covers what is under it);
    /// written to the bootstrap's prefetch table.
    #[serde(deserialize_with = "crate::config::string_or_list")]
    pub prefetch_patterns: Vec<String>,
    /// Push the Nydus manifest as an OCI referrer of the source manifest (`subject` set).
    pub with_referrer: bool,
    /// Push one index holding the source manifests and the Nydus manifests, the latter marked
    /// with `artifactType` and the `nydus.remoteimage.v1` OS feature.
    pub merge_manifest: bool,
}

impl Default for NydusOptions {
    fn default() -> Self {
        NydusOptions {
            fs_version: 6,
            compressor: Compressor::Zstd,
            chunk_size: ByteSize(1 << 20),
            prefetch_patterns: Vec::new(),
            with_referrer: false,
            merge_manifest: false,
        }
    }
}

impl NydusOptions {
    /// Checks every option; the error lists each problem.
    fn validate(&self) -> Result<(), DriverError> {
        let mut problems = Vec::new();
        if !matches!(self.fs_version, 5 | 6) {
            problems.push(format!(
                "fs_version must be 5 or 6, got {}",
                self.fs_version
            ));
        }
        let chunk = self.chunk_size.bytes();
        if !chunk.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk) {
            problems.push(format!(
                "chunk_size must be a power of two from {} to {}, got {} ({chunk:#x})",
                ByteSize(MIN_CHUNK_SIZE),
                ByteSize(MAX_CHUNK_SIZE),
                self.chunk_size
            ));
        }
        for p in &self.prefetch_patterns {
            if let Err(why) = prefetch::check_pattern(p) {
                problems.push(format!("prefetch_patterns: {p:?} {why}"));
            }
        }
        if self.with_referrer && self.merge_manifest {
            problems.push(
                "with_referrer and merge_manifest cannot both be set; choose one way to publish"
                    .into(),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(DriverError::Options {
                driver: DriverKind::Nydus,
                why: problems.join("; "),
            })
        }
    }

    fn rafs_version(&self) -> nydus_rafs::metadata::RafsVersion {
        if self.fs_version == 5 {
            nydus_rafs::metadata::RafsVersion::V5
        } else {
            nydus_rafs::metadata::RafsVersion::V6
        }
    }
}

pub struct Nydus {
    options: NydusOptions,
}

impl Nydus {
    pub fn new(options: NydusOptions) -> Result<Self, DriverError> {
        options.validate()?;
        Ok(Nydus { options })
    }
}

impl Driver for Nydus {
    fn kind(&self) -> DriverKind {
        DriverKind::Nydus
    }

    fn version(&self) -> &str {
        "1"
    }

    fn options(&self) -> serde_json::Value {
        serde_json::to_value(&self.options).expect("options serialize")
    }

    fn convert_layer(
        &self,
        input: &mut dyn Read,
        output: &mut dyn Write,
    ) -> Result<LayerOutput, DriverError> {
        build::convert_layer(&self.options, input, output)
    }

    fn finish_image(
        &self,
        image: &mut ImageDraft,
        blobs: &dyn BlobAccess,
    ) -> Result<(), DriverError> {
        merge::finish_image(&self.options, image, blobs)
    }

    fn publication(&self) -> Publication {
        if self.options.with_referrer {
            Publication::Referrer
        } else if self.options.merge_manifest {
            Publication::MergedIndex {
                artifact_type: ARTIFACT_TYPE_MANIFEST,
                os_feature: OS_FEATURE,
            }
        } else {
            Publication::Tag
        }
    }
}
