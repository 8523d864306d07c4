//! The zstd:chunked table of contents (containers/storage calls it the manifest), the
//! compressed spools that hold it and the tar-split until the end, the skippable frames that
//! carry them and the footer.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};

use serde::Serialize;

use crate::oci::{Digest, Hasher};

/// The only manifest type: a CRFS-style TOC.
pub const MANIFEST_TYPE_CRFS: u64 = 1;
/// Payload of the last skippable frame.
pub const FOOTER_SIZE: usize = 64;
/// Ends the footer. (Before 1.50, containers/storage wrote `GnUlInUx`; before 1.47, in a 40-byte
/// footer without the tar-split fields.)
pub const FOOTER_MAGIC: [u8; 8] = *b"GNUlInUx";
/// Magic number and size field in front of a skippable frame's payload.
pub const SKIPPABLE_HEADER_SIZE: u64 = 8;
const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];

pub const TYPE_REG: &str = "reg";
pub const TYPE_CHUNK: &str = "chunk";
pub const CHUNK_TYPE_ZEROS: &str = "zeros";

/// One TOC entry, field for field as containers/storage's `FileMetadata` serialises it (Go's
/// `encoding/json`, zero values omitted).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TocEntry {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub name: String,
    #[serde(rename = "linkName", skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub mode: i64,
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub size: u64,
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub uid: i64,
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub gid: i64,
    #[serde(rename = "modtime", skip_serializing_if = "Option::is_none")]
    pub mod_time: Option<String>,
    #[serde(rename = "accesstime", skip_serializing_if = "Option::is_none")]
    pub access_time: Option<String>,
    #[serde(rename = "changetime", skip_serializing_if = "Option::is_none")]
    pub change_time: Option<String>,
    #[serde(rename = "devMajor", skip_serializing_if = "is_zero_i64")]
    pub dev_major: i64,
    #[serde(rename = "devMinor", skip_serializing_if = "is_zero_i64")]
    pub dev_minor: i64,
    /// Values base64 (standard alphabet).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// sha256 of the whole file; empty for empty files.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// Where the frame of the file's (or chunk's) first byte starts in the blob.
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub offset: u64,
    /// Where the frame of the file's last byte ends (set on the file's entry only).
    #[serde(rename = "endOffset", skip_serializing_if = "is_zero_u64")]
    pub end_offset: u64,
    #[serde(rename = "chunkSize", skip_serializing_if = "is_zero_u64")]
    pub chunk_size: u64,
    #[serde(rename = "chunkOffset", skip_serializing_if = "is_zero_u64")]
    pub chunk_offset: u64,
    #[serde(rename = "chunkDigest", skip_serializing_if = "String::is_empty")]
    pub chunk_digest: String,
    #[serde(rename = "chunkType", skip_serializing_if = "str::is_empty")]
    pub chunk_type: &'static str,
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

impl TocEntry {
    /// The entry of a file's second and later chunks.
    pub fn chunk(name: &str) -> Self {
        TocEntry { kind: TYPE_CHUNK, name: name.to_string(), ..TocEntry::default() }
    }

    /// Drops what describes chunks, for a file that is one chunk: the reference writes chunk
    /// fields only when there are several.
    pub fn clear_chunk_fields(&mut self) {
        self.chunk_size = 0;
        self.chunk_offset = 0;
        self.chunk_digest.clear();
        self.chunk_type = "";
    }
}

/// A time as Go's `time.Time` marshals to JSON (RFC 3339, nanoseconds without trailing zeros),
/// in UTC. `None` for Go's zero time, which the TOC leaves out, and for years outside 0-9999,
/// which Go refuses to marshal (the caller must refuse them too).
pub fn go_time(secs: i64, nanos: u32) -> Result<Option<String>, String> {
    // January 1 of year 1, UTC: Go's zero time.
    if secs == -62_135_596_800 && nanos == 0 {
        return Ok(None);
    }
    let t = chrono::DateTime::from_timestamp(secs, nanos)
        .filter(|t| (0..=9999).contains(&chrono::Datelike::year(t)))
        .ok_or_else(|| format!("time {secs}.{nanos:09} is outside the years 0 to 9999"))?;
    let mut s = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    if nanos > 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push('Z');
    Ok(Some(s))
}

/// Where a skippable frame's payload sits in the blob and how large it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub length: u64,
    pub length_uncompressed: u64,
}

/// The header of a skippable frame holding `len` bytes.
pub fn skippable_header(len: u64) -> io::Result<[u8; 8]> {
    let len = u32::try_from(len)
        .map_err(|_| io::Error::other(format!("{len} bytes do not fit in one zstd skippable frame")))?;
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&SKIPPABLE_MAGIC);
    h[4..].copy_from_slice(&len.to_le_bytes());
    Ok(h)
}

/// The footer: manifest and tar-split positions as little-endian u64s, then the magic.
pub fn footer(manifest: Position, tar_split: Position) -> [u8; FOOTER_SIZE] {
    let mut f = [0u8; FOOTER_SIZE];
    let fields = [
        manifest.offset,
        manifest.length,
        manifest.length_uncompressed,
        MANIFEST_TYPE_CRFS,
        tar_split.offset,
        tar_split.length,
        tar_split.length_uncompressed,
    ];
    for (i, v) in fields.into_iter().enumerate() {
        f[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    f[56..].copy_from_slice(&FOOTER_MAGIC);
    f
}

/// JSON compressed as it is written, into memory while small and a temp file beyond, so a layer
/// with millions of entries does not hold its metadata in memory.
pub struct Spool {
    encoder: zstd::stream::write::Encoder<'static, Sink>,
    uncompressed: u64,
}

pub struct Sink {
    file: tempfile::SpooledTempFile,
    digest: Hasher,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.digest.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A finished spool: one zstd frame.
pub struct Compressed {
    file: tempfile::SpooledTempFile,
    pub length: u64,
    pub length_uncompressed: u64,
    /// Of the compressed bytes.
    pub digest: Digest,
}

impl Spool {
    pub fn new(level: i32) -> io::Result<Self> {
        let sink = Sink { file: tempfile::SpooledTempFile::new(8 << 20), digest: Hasher::new() };
        let mut encoder = zstd::stream::write::Encoder::new(sink, level)?;
        encoder.include_checksum(true)?;
        Ok(Spool { encoder, uncompressed: 0 })
    }

    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.uncompressed += data.len() as u64;
        self.encoder.write_all(data)
    }

    pub fn finish(self) -> io::Result<Compressed> {
        let sink = self.encoder.finish()?;
        Ok(Compressed {
            length: sink.digest.len(),
            digest: sink.digest.finish(),
            file: sink.file,
            length_uncompressed: self.uncompressed,
        })
    }
}

impl Compressed {
    /// Copies the compressed bytes to `out`.
    pub fn copy_to(&mut self, out: &mut impl Write) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(0))?;
        let copied = io::copy(&mut (&mut self.file).take(self.length), out)?;
        if copied != self.length {
            return Err(io::Error::other("the metadata spool is shorter than what was written to it"));
        }
        Ok(())
    }
}

/// Accumulates the TOC as compact JSON (Go's `json.Marshal` layout), compressed on the fly.
pub struct TocWriter {
    spool: Spool,
    entries: u64,
    record: Vec<u8>,
}

impl TocWriter {
    pub fn new(level: i32) -> io::Result<Self> {
        let mut spool = Spool::new(level)?;
        spool.write_all(br#"{"version":1,"entries":["#)?;
        Ok(TocWriter { spool, entries: 0, record: Vec::with_capacity(512) })
    }

    pub fn push(&mut self, entry: &TocEntry) -> io::Result<()> {
        self.record.clear();
        if self.entries > 0 {
            self.record.push(b',');
        }
        serde_json::to_writer(&mut self.record, entry).map_err(io::Error::other)?;
        self.spool.write_all(&self.record)?;
        self.entries += 1;
        Ok(())
    }

    /// Closes the document with the digest of the compressed tar-split.
    pub fn finish(mut self, tar_split_digest: &Digest) -> io::Result<Compressed> {
        self.spool.write_all(format!(r#"],"tarSplitDigest":"{tar_split_digest}"}}"#).as_bytes())?;
        self.spool.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_marshal_like_go() {
        assert_eq!(go_time(1_700_000_000, 0).unwrap().unwrap(), "2023-11-14T22:13:20Z");
        assert_eq!(go_time(1_700_000_000, 750_000_000).unwrap().unwrap(), "2023-11-14T22:13:20.75Z");
        assert_eq!(go_time(1, 1).unwrap().unwrap(), "1970-01-01T00:00:01.000000001Z");
        assert_eq!(go_time(-1, 0).unwrap().unwrap(), "1969-12-31T23:59:59Z");
        assert_eq!(go_time(0, 0).unwrap().unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(go_time(-62_135_596_800, 0).unwrap(), None);
        assert_eq!(go_time(-62_167_219_200, 0).unwrap().unwrap(), "0000-01-01T00:00:00Z");
        assert!(go_time(253_402_300_800, 0).unwrap_err().contains("9999"));
        assert!(go_time(-62_167_219_201, 0).is_err());
        assert!(go_time(i64::MAX, 0).is_err());
    }

    #[test]
    fn entries_serialise_like_file_metadata() {
        let mut e = TocEntry { kind: TYPE_REG, name: "usr/bin/x".into(), mode: 0o755, size: 3, ..Default::default() };
        e.mod_time = go_time(1_700_000_000, 0).unwrap();
        e.xattrs.insert("user.b".into(), "Yg==".into());
        e.xattrs.insert("user.a".into(), "".into());
        e.digest = "sha256:x".into();
        e.offset = 10;
        e.end_offset = 20;
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"reg","name":"usr/bin/x","mode":493,"size":3,"modtime":"2023-11-14T22:13:20Z","xattrs":{"user.a":"","user.b":"Yg=="},"digest":"sha256:x","offset":10,"endOffset":20}"#
        );
        let mut c = TocEntry::chunk("usr/bin/x");
        c.offset = 30;
        c.chunk_offset = 5;
        c.chunk_size = 7;
        c.chunk_digest = "sha256:y".into();
        c.chunk_type = CHUNK_TYPE_ZEROS;
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"type":"chunk","name":"usr/bin/x","offset":30,"chunkSize":7,"chunkOffset":5,"chunkDigest":"sha256:y","chunkType":"zeros"}"#
        );
    }

    #[test]
    fn toc_document_and_footer() {
        let mut w = TocWriter::new(3).unwrap();
        w.push(&TocEntry { kind: "dir", name: "a/".into(), ..Default::default() }).unwrap();
        w.push(&TocEntry { kind: "symlink", name: "a/l".into(), link_name: "t".into(), ..Default::default() }).unwrap();
        let mut done = w.finish(&Digest::of(b"")).unwrap();
        let mut compressed = Vec::new();
        done.copy_to(&mut compressed).unwrap();
        assert_eq!(compressed.len() as u64, done.length);
        assert_eq!(Digest::of(&compressed), done.digest);
        let json = zstd::decode_all(&compressed[..]).unwrap();
        assert_eq!(json.len() as u64, done.length_uncompressed);
        assert_eq!(
            String::from_utf8(json).unwrap(),
            format!(
                r#"{{"version":1,"entries":[{{"type":"dir","name":"a/"}},{{"type":"symlink","name":"a/l","linkName":"t"}}],"tarSplitDigest":"{}"}}"#,
                Digest::of(b"")
            )
        );

        let m = Position { offset: 0x0102, length: 3, length_uncompressed: 4 };
        let t = Position { offset: 5, length: 6, length_uncompressed: 7 };
        let f = footer(m, t);
        let words: Vec<u64> = f[..56].chunks(8).map(|w| u64::from_le_bytes(w.try_into().unwrap())).collect();
        assert_eq!(words, [0x0102, 3, 4, 1, 5, 6, 7]);
        assert_eq!(&f[56..], &[0x47, 0x4e, 0x55, 0x6c, 0x49, 0x6e, 0x55, 0x78]);
        assert_eq!(skippable_header(64).unwrap(), [0x50, 0x2a, 0x4d, 0x18, 64, 0, 0, 0]);
        assert!(skippable_header(1 << 32).is_err());
    }
}
