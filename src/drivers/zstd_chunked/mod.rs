//! zstd:chunked writer, in the dialect containers/storage (podman, buildah, skopeo, CRI-O)
//! writes and reads: per-file zstd frames, content-defined chunks, TOC, tar-split and footer.
//!
//! The blob is the source tar, byte for byte, in zstd frames: a plain zstd decoder (which skips
//! skippable frames) gives back the source, so the diff ID does not change. Every file payload
//! and every content-defined chunk of it starts a frame that the TOC points at. After the data
//! come three skippable frames: the TOC (zstd-compressed JSON), the tar-split (zstd-compressed
//! JSON lines, from which a reader that wrote files from the TOC rebuilds the exact tar) and a
//! 64-byte footer locating both. Readers find the TOC through the layer annotations; the footer
//! only makes the blob self-describing.

mod chunker;
mod tarsplit;
mod toc;
mod writer;

#[cfg(test)]
mod tests;

use std::io::{BufWriter, Read, Write};

use serde::{Deserialize, Serialize};

use super::tar::TarReader;
use super::{Driver, DriverError, DriverKind, LayerOutput};
use writer::{LayerWriter, Limits};

/// containers/storage's level when none is configured.
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 10;
/// Levels above this (zstd's "ultra" levels) need windows of 32 to 128 MiB per thread when a
/// large chunk is compressed as a stream, which the memory bound of a conversion cannot afford.
pub const MAX_COMPRESSION_LEVEL: i32 = 19;

/// Options of the zstd:chunked driver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZstdChunkedOptions {
    /// zstd level, 1 (fastest) to 19 (smallest); 10 is containers/storage's default.
    pub compression_level: i32,
}

impl Default for ZstdChunkedOptions {
    fn default() -> Self {
        ZstdChunkedOptions { compression_level: DEFAULT_COMPRESSION_LEVEL }
    }
}

pub struct ZstdChunked {
    options: ZstdChunkedOptions,
    workers: usize,
    limits: Limits,
}

impl ZstdChunked {
    pub fn new(options: ZstdChunkedOptions) -> Result<Self, DriverError> {
        let level = options.compression_level;
        if !(1..=MAX_COMPRESSION_LEVEL).contains(&level) {
            return Err(DriverError::Options {
                driver: DriverKind::ZstdChunked,
                why: format!("compression_level must be between 1 and {MAX_COMPRESSION_LEVEL}, got {level}"),
            });
        }
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(ZstdChunked { options, workers, limits: Limits::default() })
    }
}

impl Driver for ZstdChunked {
    fn kind(&self) -> DriverKind {
        DriverKind::ZstdChunked
    }
    fn version(&self) -> &str {
        "1"
    }
    fn options(&self) -> serde_json::Value {
        serde_json::to_value(&self.options).expect("options serialize")
    }

    fn convert_layer(&self, input: &mut dyn Read, output: &mut dyn Write) -> Result<LayerOutput, DriverError> {
        let mut output = BufWriter::with_capacity(1 << 20, output);
        let level = self.options.compression_level;
        let result = std::thread::scope(|scope| {
            LayerWriter::new(scope, self.workers, level, self.limits, &mut output)?.convert(TarReader::new(&mut *input))
        })?;
        output.flush()?;
        Ok(result)
    }
}
