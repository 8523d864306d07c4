//! eStargz writer: per-file gzip members, chunked large files, TOC and footer.

use serde::{Deserialize, Serialize};

use super::{Driver, DriverError, DriverKind, LayerOutput};

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
}

impl Estargz {
    pub fn new(options: EstargzOptions) -> Result<Self, DriverError> {
        Ok(Estargz { options })
    }
}

impl Driver for Estargz {
    fn kind(&self) -> DriverKind {
        DriverKind::Estargz
    }
    fn version(&self) -> &str {
        "0"
    }
    fn options(&self) -> serde_json::Value {
        serde_json::to_value(&self.options).expect("options serialize")
    }
    fn convert_layer(
        &self,
        _input: &mut dyn std::io::Read,
        _output: &mut dyn std::io::Write,
    ) -> Result<LayerOutput, DriverError> {
        todo!("eStargz writer")
    }
}
