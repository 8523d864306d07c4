//! eStargz writer: per-file gzip members, chunked large files, TOC and footer.
//!
//! The output is the source tar, entry for entry and byte for byte (raw headers included), with
//! a landmark entry in front (or after the prioritized files) and the TOC entry plus the
//! end-of-archive marker at the end; every piece sits in gzip members laid out as
//! stargz-snapshotter's writer lays them out, so its reader and any gzip/tar tool can read it.

mod order;
mod toc;
mod writer;

#[cfg(test)]
mod tests;

use std::io::{BufWriter, Read, Write};

use serde::{Deserialize, Serialize};

use super::tar::{Entry, TarReader};
use super::{compression, Driver, DriverError, DriverKind, LayerOutput};
use toc::TOC_NAME;
use writer::LayerWriter;

/// Marks the end of the prioritized files; a runtime prefetches everything before it.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Put first when nothing is prioritized: tells a runtime not to prefetch at all.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";

const MIN_CHUNK_SIZE: u64 = 4 << 10;
/// Chunks are compressed whole in memory, several at once; beyond this the memory bound of a
/// conversion (a few hundred MiB) would no longer hold.
const MAX_CHUNK_SIZE: u64 = 32 << 20;

/// Options of the eStargz driver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EstargzOptions {
    /// gzip level, 0 (store) to 9 (smallest).
    pub compression_level: u32,
    /// Files larger than this are split into chunks, each its own gzip member.
    pub chunk_size_bytes: crate::config::ByteSize,
    /// Paths placed first in the layer, in this order, followed by `.prefetch.landmark`.
    #[serde(deserialize_with = "crate::config::string_or_list")]
    pub prioritized_files: Vec<String>,
}

impl Default for EstargzOptions {
    fn default() -> Self {
        EstargzOptions {
            compression_level: 9,
            chunk_size_bytes: crate::config::ByteSize(4 << 20),
            prioritized_files: Vec::new(),
        }
    }
}

pub struct Estargz {
    options: EstargzOptions,
    workers: usize,
}

impl Estargz {
    pub fn new(options: EstargzOptions) -> Result<Self, DriverError> {
        let bad = |why: String| DriverError::Options { driver: DriverKind::Estargz, why };
        if options.compression_level > 9 {
            return Err(bad(format!(
                "compression_level must be between 0 and 9, got {}",
                options.compression_level
            )));
        }
        let chunk = options.chunk_size_bytes;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk.bytes()) {
            return Err(bad(format!(
                "chunk_size_bytes must be between {} and {}, got {chunk}",
                crate::config::ByteSize(MIN_CHUNK_SIZE),
                crate::config::ByteSize(MAX_CHUNK_SIZE),
            )));
        }
        // A worker holds up to one chunk of input and its output; capping the workers keeps
        // that within the in-flight budget however many cores the machine has.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let fit = (crate::drivers::members::IN_FLIGHT_BUDGET_BYTES as u64 / (2 * chunk.bytes())).max(1) as usize;
        let workers = cores.min(fit);
        Ok(Estargz { options, workers })
    }
}

impl Driver for Estargz {
    fn kind(&self) -> DriverKind {
        DriverKind::Estargz
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
        let chunk_size = self.options.chunk_size_bytes.bytes();
        let result = std::thread::scope(|scope| {
            let mut w = LayerWriter::new(scope, self.workers, level, chunk_size, &mut output)?;
            let prioritized = &self.options.prioritized_files;
            if prioritized.is_empty() {
                w.add_landmark(NO_PREFETCH_LANDMARK)?;
                let mut tr = TarReader::new(&mut *input);
                while let Some(entry) = tr.next_entry()? {
                    if !is_reserved(&entry) {
                        w.add_entry(&mut tr, &entry)?;
                    }
                }
                compression::drain(tr.into_inner())?;
            } else {
                let spill = order::Spill::new(input, prioritized, is_reserved_name)?;
                for &offset in spill.front() {
                    let mut tr = spill.reader_at(offset)?;
                    let entry = tr.next_entry()?.ok_or_else(|| DriverError::InvalidTar {
                        offset,
                        why: "an indexed entry is missing when read again".into(),
                    })?;
                    w.add_entry(&mut tr, &entry)?;
                }
                w.add_landmark(PREFETCH_LANDMARK)?;
                let mut tr = spill.reader_at(0)?;
                while let Some(entry) = tr.next_entry()? {
                    if !spill.is_front(entry.offset) && !is_reserved(&entry) {
                        w.add_entry(&mut tr, &entry)?;
                    }
                }
            }
            w.finish()
        })?;
        output.flush()?;
        Ok(result)
    }
}

/// Entries this writer produces itself. A source that already has them (an eStargz layer being
/// converted again) loses its copies, which would otherwise shadow or confuse the new ones.
fn is_reserved(entry: &Entry) -> bool {
    is_reserved_name(&clean_name(&entry.header.name))
}

fn is_reserved_name(clean: &str) -> bool {
    matches!(clean, TOC_NAME | PREFETCH_LANDMARK | NO_PREFETCH_LANDMARK)
}

/// A tar name as a path relative to the root, the way the reference reader normalises it
/// (Go's `path.Clean("/" + name)` without the leading slash); the root itself is `""`.
pub(crate) fn clean_name(name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}
