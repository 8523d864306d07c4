//! The eStargz table of contents (`stargz.index.json`) and the footer that points at it.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Seek, SeekFrom, Write};

use base64::Engine as _;
use serde::Serialize;

use crate::drivers::tar::Header;
use crate::oci::{Digest, Hasher};

pub const TOC_NAME: &str = "stargz.index.json";
pub const FOOTER_SIZE: usize = 51;

/// One TOC record, field for field as stargz-snapshotter's `TOCEntry` serialises it (zero values
/// omitted), so its reader sees exactly what its own writer would have written.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub size: u64,
    #[serde(rename = "modtime", skip_serializing_if = "String::is_empty")]
    pub mod_time: String,
    #[serde(rename = "linkName", skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub mode: i64,
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub uid: i64,
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub gid: i64,
    #[serde(rename = "userName", skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    #[serde(rename = "groupName", skip_serializing_if = "String::is_empty")]
    pub group_name: String,
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub offset: u64,
    #[serde(rename = "devMajor", skip_serializing_if = "is_zero_i64")]
    pub dev_major: i64,
    #[serde(rename = "devMinor", skip_serializing_if = "is_zero_i64")]
    pub dev_minor: i64,
    /// Values base64 (standard alphabet), as Go encodes `[]byte`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(rename = "chunkOffset", skip_serializing_if = "is_zero_u64")]
    pub chunk_offset: u64,
    #[serde(rename = "chunkSize", skip_serializing_if = "is_zero_u64")]
    pub chunk_size: u64,
    #[serde(rename = "chunkDigest", skip_serializing_if = "String::is_empty")]
    pub chunk_digest: String,
    /// Index of the gzip member this chunk starts; becomes `offset` once members before it are
    /// written and its compressed position is known.
    #[serde(skip)]
    pub member: Option<u64>,
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}


impl TocEntry {
    /// The TOC record of a tar entry, without its data fields (offset, digests, chunking).
    pub fn from_header(h: &Header, kind: &'static str) -> Self {
        let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let is_link = matches!(kind, "hardlink" | "symlink");
        let is_dev = matches!(kind, "char" | "block");
        TocEntry {
            name: lossy(&h.name),
            kind,
            size: if kind == "reg" { h.size } else { 0 },
            mod_time: format_mod_time(h.mtime, h.mtime_nanos),
            link_name: if is_link { lossy(&h.linkname) } else { String::new() },
            mode: h.mode,
            uid: h.uid,
            gid: h.gid,
            user_name: lossy(&h.uname),
            group_name: lossy(&h.gname),
            dev_major: if is_dev { h.dev_major } else { 0 },
            dev_minor: if is_dev { h.dev_minor } else { 0 },
            xattrs: h
                .xattrs
                .iter()
                .map(|(k, v)| (lossy(k), base64::engine::general_purpose::STANDARD.encode(v)))
                .collect(),
            ..TocEntry::default()
        }
    }

    /// The record of a file's second and later chunks.
    pub fn chunk(name: &str) -> Self {
        TocEntry { name: name.to_string(), kind: "chunk", ..TocEntry::default() }
    }
}

/// RFC 3339 in UTC, rounded to the second; empty for the epoch itself, which Go's writer treats
/// as "no time".
fn format_mod_time(secs: i64, nanos: u32) -> String {
    if secs == 0 {
        return String::new();
    }
    let rounded = secs.saturating_add(i64::from(nanos >= 500_000_000));
    chrono::DateTime::from_timestamp(rounded, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

const JSON_HEAD: &[u8] = b"{\n\t\"version\": 1,\n\t\"entries\": [\n";
const JSON_TAIL: &[u8] = b"\n\t]\n}";
const JSON_EMPTY: &[u8] = b"{\n\t\"version\": 1,\n\t\"entries\": []\n}";

/// Accumulates TOC records as JSON in a spool (memory while small, a temp file beyond), so a
/// layer with millions of entries does not hold its TOC in memory. The layout is that of Go's
/// `json.MarshalIndent(toc, "", "\t")`.
pub struct TocWriter {
    spool: tempfile::SpooledTempFile,
    spool_len: u64,
    entries: u64,
    record: Vec<u8>,
    indented: Vec<u8>,
    /// Last user and group name written per id: like the reference writer, a name is written
    /// only when it changes for its id.
    user_names: HashMap<i64, String>,
    group_names: HashMap<i64, String>,
}

impl TocWriter {
    pub fn new() -> Self {
        TocWriter {
            spool: tempfile::SpooledTempFile::new(8 << 20),
            spool_len: 0,
            entries: 0,
            record: Vec::new(),
            indented: Vec::new(),
            user_names: HashMap::new(),
            group_names: HashMap::new(),
        }
    }

    pub fn push(&mut self, mut entry: TocEntry) -> io::Result<()> {
        dedup_name(&mut self.user_names, entry.uid, &mut entry.user_name);
        dedup_name(&mut self.group_names, entry.gid, &mut entry.group_name);
        self.record.clear();
        let mut ser = serde_json::Serializer::with_formatter(
            &mut self.record,
            serde_json::ser::PrettyFormatter::with_indent(b"\t"),
        );
        entry.serialize(&mut ser).map_err(io::Error::other)?;
        // Records sit two levels deep in the document; JSON strings never contain a raw
        // newline, so indenting line by line is safe.
        self.indented.clear();
        if self.entries > 0 {
            self.indented.extend_from_slice(b",\n");
        }
        for (i, line) in self.record.split(|&c| c == b'\n').enumerate() {
            if i > 0 {
                self.indented.push(b'\n');
            }
            self.indented.extend_from_slice(b"\t\t");
            self.indented.extend_from_slice(line);
        }
        self.spool.write_all(&self.indented)?;
        self.spool_len += self.indented.len() as u64;
        self.entries += 1;
        Ok(())
    }

    /// Size of the finished JSON document.
    pub fn json_len(&self) -> u64 {
        if self.entries == 0 {
            JSON_EMPTY.len() as u64
        } else {
            (JSON_HEAD.len() + JSON_TAIL.len()) as u64 + self.spool_len
        }
    }

    /// Streams the finished JSON document to `out` and returns its digest.
    pub fn write_json(&mut self, mut out: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<Digest> {
        let mut digest = Hasher::new();
        let mut emit = |b: &[u8]| -> io::Result<()> {
            digest.update(b);
            out(b)
        };
        if self.entries == 0 {
            emit(JSON_EMPTY)?;
            return Ok(digest.finish());
        }
        emit(JSON_HEAD)?;
        self.spool.seek(SeekFrom::Start(0))?;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = self.spool.read(&mut buf)?;
            if n == 0 {
                break;
            }
            emit(&buf[..n])?;
        }
        emit(JSON_TAIL)?;
        Ok(digest.finish())
    }
}

fn dedup_name(last: &mut HashMap<i64, String>, id: i64, name: &mut String) {
    if name.is_empty() {
        return;
    }
    if last.get(&id) == Some(name) {
        name.clear();
    } else {
        last.insert(id, name.clone());
    }
}

/// The last 51 bytes of a blob: an empty gzip member (stored, so its size never varies) whose
/// extra field `SG` holds the TOC member's offset as 16 hex digits followed by `STARGZ`.
pub fn footer(toc_offset: u64) -> [u8; FOOTER_SIZE] {
    let mut f = [0u8; FOOTER_SIZE];
    // gzip header: deflate, FEXTRA flag, no mtime, no XFL hint, OS "unknown" (what Go writes).
    f[..10].copy_from_slice(&[0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff]);
    f[10..12].copy_from_slice(&26u16.to_le_bytes());
    f[12..14].copy_from_slice(b"SG");
    f[14..16].copy_from_slice(&22u16.to_le_bytes());
    f[16..38].copy_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    // One final stored block of length 0; CRC-32 and size of nothing are zero.
    f[38..43].copy_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footer_is_byte_identical_to_the_reference() {
        // Produced by stargz-snapshotter's gzipFooterBytes(0x1234abcd) (Go 1.19 compress/gzip).
        let reference = "1f8b08040000000000ff1a00534716003030303030303030313233346162636453544152475a010000ffff0000000000000000";
        assert_eq!(hex::encode(footer(0x1234abcd)), reference);
        // It is a valid, empty gzip member.
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&footer(77)[..]).read_to_end(&mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn json_layout_matches_go_marshal_indent() {
        let mut w = TocWriter::new();
        let mut a = TocEntry {
            name: "bin/su".into(),
            kind: "reg",
            size: 3,
            mode: 0o4755,
            user_name: "root".into(),
            offset: 42,
            digest: "sha256:x".into(),
            ..TocEntry::default()
        };
        a.xattrs.insert("security.capability".into(), "AQID".into());
        w.push(a.clone()).unwrap();
        a.name = "bin/other".into();
        w.push(a).unwrap();
        let mut json = Vec::new();
        let digest = w
            .write_json(|b| {
                json.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
        let expected = "{\n\t\"version\": 1,\n\t\"entries\": [\n\t\t{\n\t\t\t\"name\": \"bin/su\",\n\t\t\t\"type\": \"reg\",\n\t\t\t\"size\": 3,\n\t\t\t\"mode\": 2541,\n\t\t\t\"userName\": \"root\",\n\t\t\t\"offset\": 42,\n\t\t\t\"xattrs\": {\n\t\t\t\t\"security.capability\": \"AQID\"\n\t\t\t},\n\t\t\t\"digest\": \"sha256:x\"\n\t\t},\n\t\t{\n\t\t\t\"name\": \"bin/other\",\n\t\t\t\"type\": \"reg\",\n\t\t\t\"size\": 3,\n\t\t\t\"mode\": 2541,\n\t\t\t\"offset\": 42,\n\t\t\t\"xattrs\": {\n\t\t\t\t\"security.capability\": \"AQID\"\n\t\t\t},\n\t\t\t\"digest\": \"sha256:x\"\n\t\t}\n\t]\n}";
        assert_eq!(String::from_utf8(json.clone()).unwrap(), expected);
        assert_eq!(w.json_len(), json.len() as u64);
        assert_eq!(digest, Digest::of(&json));
    }

    #[test]
    fn mod_times() {
        assert_eq!(format_mod_time(0, 0), "");
        assert_eq!(format_mod_time(1_700_000_000, 0), "2023-11-14T22:13:20Z");
        assert_eq!(format_mod_time(1_700_000_000, 500_000_000), "2023-11-14T22:13:21Z");
        assert_eq!(format_mod_time(-1, 0), "1969-12-31T23:59:59Z");
    }
}
