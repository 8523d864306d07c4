//! Format drivers: each turns a source layer's tar stream into a target layer blob.
//!
//! Drivers are synchronous and CPU-bound; the pipeline runs them on the blocking pool and
//! bridges the content store's async streams to `Read`/`Write`.

pub mod compression;
pub mod estargz;
pub mod image;
pub mod members;
pub mod nydus;
pub mod recompress;
pub mod tar;
pub mod zstd_chunked;

#[cfg(test)]
pub(crate) mod testutil;

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::oci::Digest;

pub use image::{BlobAccess, ConvertedLayer, ImageDraft, LayerState};

/// The formats this project writes. The serde name is the one used in config, CLI and results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    Estargz,
    ZstdChunked,
    /// Plain zstd, the source tar byte for byte.
    Zstd,
    /// Plain gzip at another level.
    Gzip,
    /// The plain source tar.
    Uncompressed,
    /// Nydus (RAFS v5/v6): data blobs plus a bootstrap layer.
    Nydus,
}

impl DriverKind {
    pub const ALL: [DriverKind; 6] = [
        DriverKind::Estargz,
        DriverKind::ZstdChunked,
        DriverKind::Zstd,
        DriverKind::Gzip,
        DriverKind::Uncompressed,
        DriverKind::Nydus,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Estargz => "estargz",
            DriverKind::ZstdChunked => "zstdchunked",
            DriverKind::Zstd => "zstd",
            DriverKind::Gzip => "gzip",
            DriverKind::Uncompressed => "uncompressed",
            DriverKind::Nydus => "nydus",
        }
    }

    /// Tag suffix used when neither config nor CLI names the target.
    pub fn default_tag_suffix(self) -> &'static str {
        match self {
            DriverKind::Estargz => "-esgz",
            DriverKind::ZstdChunked => "-zstdchunked",
            DriverKind::Zstd => "-zstd",
            DriverKind::Gzip => "-gzip",
            DriverKind::Uncompressed => "-uncompressed",
            DriverKind::Nydus => "-nydus",
        }
    }

    /// Builds the driver from its options (a JSON object; `{}` means all defaults).
    /// Unknown or ill-typed options are errors naming the option.
    pub fn build(self, options: &serde_json::Value) -> Result<Arc<dyn Driver>, DriverError> {
        let options = if options.is_null() { serde_json::json!({}) } else { options.clone() };
        match self {
            DriverKind::Estargz => {
                let opts: estargz::EstargzOptions = serde_path_to_error::deserialize(options)
                    .map_err(|e| DriverError::Options { driver: self, why: e.to_string() })?;
                Ok(Arc::new(estargz::Estargz::new(opts)?))
            }
            DriverKind::ZstdChunked => {
                let opts: zstd_chunked::ZstdChunkedOptions = serde_path_to_error::deserialize(options)
                    .map_err(|e| DriverError::Options { driver: self, why: e.to_string() })?;
                Ok(Arc::new(zstd_chunked::ZstdChunked::new(opts)?))
            }
            DriverKind::Zstd => Ok(Arc::new(recompress::Recompress::zstd(parse_options(self, options)?)?)),
            DriverKind::Gzip => Ok(Arc::new(recompress::Recompress::gzip(parse_options(self, options)?)?)),
            DriverKind::Uncompressed => {
                Ok(Arc::new(recompress::Recompress::uncompressed(parse_options(self, options)?)?))
            }
            DriverKind::Nydus => Ok(Arc::new(nydus::Nydus::new(parse_options(self, options)?)?)),
        }
    }
}

fn parse_options<T: serde::de::DeserializeOwned>(driver: DriverKind, options: serde_json::Value) -> Result<T, DriverError> {
    serde_path_to_error::deserialize(options).map_err(|e| DriverError::Options { driver, why: e.to_string() })
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DriverKind {
    type Err = DriverError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DriverKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| DriverError::Unknown(s.to_string()))
    }
}

/// What a driver reports about one target layer. The compressed digest and size are measured
/// by the caller on the bytes written to `output`.
pub struct LayerOutput {
    pub media_type: String,
    /// Digest of the uncompressed target layer: the new `rootfs.diff_ids` entry. `None` when
    /// the target layer decompresses to the source tar byte for byte; the engine then uses the
    /// source's diff_id, which it hashes once while decoding the source for every driver.
    pub diff_id: Option<Digest>,
    /// Bytes of the uncompressed target layer.
    pub uncompressed_size: u64,
    pub annotations: BTreeMap<String, String>,
    /// Kept for this driver's [`Driver::finish_image`]; `None` for drivers without one.
    pub state: Option<LayerState>,
}

impl fmt::Debug for LayerOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerOutput")
            .field("media_type", &self.media_type)
            .field("diff_id", &self.diff_id)
            .field("uncompressed_size", &self.uncompressed_size)
            .field("annotations", &self.annotations)
            .field("state", &self.state.as_ref().map(|_| ".."))
            .finish()
    }
}

/// A target format writer. One instance serves many conversions at once (layers of several
/// images in parallel), so per-image data travels in [`LayerOutput::state`] and
/// [`ImageDraft`], never in the driver.
pub trait Driver: Send + Sync {
    fn kind(&self) -> DriverKind;

    /// Version of the format writer; part of the identity of a conversion.
    fn version(&self) -> &str;

    /// Options in effect, as a canonical JSON object (for idempotency keys and results).
    fn options(&self) -> serde_json::Value;

    /// Converts one layer. `input` is the decompressed source tar stream; the target blob is
    /// written to `output`. The engine decodes each source layer once and feeds the same
    /// stream to every driver of a request, each on its own thread; it also hashes the stream
    /// and checks it against the config's diff_id, so drivers need not.
    fn convert_layer(&self, input: &mut dyn Read, output: &mut dyn Write) -> Result<LayerOutput, DriverError>;

    /// The image-level step, run once per platform image after all its layers are converted
    /// and stored, before its config and manifest are written (blocking; on the blocking
    /// pool). The default changes nothing.
    fn finish_image(&self, image: &mut ImageDraft, blobs: &dyn BlobAccess) -> Result<(), DriverError> {
        let _ = (image, blobs);
        Ok(())
    }

    /// How the engine publishes this driver's target. The default pushes it under its target
    /// tag.
    fn publication(&self) -> Publication {
        Publication::Tag
    }
}

/// How a converted image is published, besides being pushed under its target reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publication {
    /// The target manifest (or index) alone.
    Tag,
    /// The target manifest (or index) carries `subject` = the source manifest (or index), so
    /// the registry lists it among the source's referrers.
    Referrer,
    /// One index holding the source manifests and the target manifests; each target entry gets
    /// this `artifactType` and this platform `os.features` entry.
    MergedIndex { artifact_type: &'static str, os_feature: &'static str },
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("unknown driver {0:?}; known drivers: {known}", known = known_drivers())]
    Unknown(String),
    #[error("invalid options for driver {driver}: {why}")]
    Options { driver: DriverKind, why: String },
    #[error("source layer is not a valid tar stream at byte {offset}: {why}")]
    InvalidTar { offset: u64, why: String },
    /// A valid tar stream holding something the target format cannot represent.
    #[error("source layer cannot be written as {driver} (tar entry at byte {offset}): {why}")]
    Unsupported { driver: DriverKind, offset: u64, why: String },
    /// The format writer failed on a layer or image it was given (not an I/O failure).
    #[error("could not write {driver}: {why}")]
    Format { driver: DriverKind, why: String },
    #[error("source layer could not be decompressed: {0}")]
    Decompress(String),
    #[error("I/O error while converting a layer: {0}")]
    Io(#[from] std::io::Error),
}

fn known_drivers() -> String {
    DriverKind::ALL.map(DriverKind::as_str).join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_names_round_trip() {
        for k in DriverKind::ALL {
            assert_eq!(k.as_str().parse::<DriverKind>().unwrap(), k);
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<DriverKind>(&json).unwrap(), k);
        }
        let unknown = "squashfs".parse::<DriverKind>().unwrap_err().to_string();
        assert!(unknown.contains("estargz, zstdchunked, zstd, gzip, uncompressed, nydus"), "{unknown}");
        assert_eq!(DriverKind::ZstdChunked.as_str(), "zstdchunked");
        assert_eq!(DriverKind::ZstdChunked.default_tag_suffix(), "-zstdchunked");
        assert_eq!(serde_json::from_str::<DriverKind>("\"zstdchunked\"").unwrap(), DriverKind::ZstdChunked);
        let suffixes: Vec<&str> = DriverKind::ALL.iter().map(|k| k.default_tag_suffix()).collect();
        assert_eq!(suffixes, ["-esgz", "-zstdchunked", "-zstd", "-gzip", "-uncompressed", "-nydus"]);
        assert_eq!(serde_json::from_str::<DriverKind>("\"nydus\"").unwrap(), DriverKind::Nydus);
    }
}
