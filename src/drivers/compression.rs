//! Decompression of source layers: gzip, zstd or plain tar, chosen by media type or magic bytes.
// Placeholder API, replaced by the full implementation.
use std::io::Read;
use super::DriverError;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression { None, Gzip, Zstd }
impl Compression {
    pub fn from_media_type(mt: &str) -> Option<Compression> {
        if mt.ends_with("+gzip") || mt.ends_with(".tar.gzip") { Some(Compression::Gzip) }
        else if mt.ends_with("+zstd") { Some(Compression::Zstd) }
        else if mt.ends_with(".tar") { Some(Compression::None) } else { None }
    }
}
pub fn decompress<'a, R: Read + Send + 'a>(_media_type: &str, _r: R) -> Result<Box<dyn Read + Send + 'a>, DriverError> { todo!() }
