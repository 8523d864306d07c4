//! The tar-split: everything of the tar stream but file contents, as JSON lines in the format
//! of `vbatts/tar-split` (`storage.Entry`), so a reader that builds files from the TOC can put
//! the exact source tar back together and check it against the layer's diff ID.
//!
//! Segments (type 2) hold raw bytes, base64; file entries (type 1) name the file whose content
//! comes next, with its size and CRC-64 (ISO). Entries are laid out as tar-split's
//! `NewInputTarStream` lays them out, which readers rely on: one segment per entry holding the
//! padding of the entry before it and every header block of the entry, then the file entry; at
//! the end, one segment with the last padding and the end-of-archive marker, then whatever
//! follows, in segments of at most 1 MiB.

use std::io;

use base64::Engine as _;
use serde::Serialize;

use super::toc::{Compressed, Spool};

/// Trailing data after the end-of-archive marker goes in segments of at most this size.
pub const TRAILING_SEGMENT_BYTES: usize = 1 << 20;

const SEGMENT: u8 = 2;
const FILE: u8 = 1;

#[derive(Serialize)]
struct Entry<'a> {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    size: u64,
    /// Base64, or `null` (Go's nil `[]byte`).
    payload: Option<String>,
    position: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

pub struct TarSplitWriter {
    spool: Spool,
    position: u64,
    /// Padding after the last payload, which goes in front of the next header.
    padding: Vec<u8>,
    segment: Vec<u8>,
    line: Vec<u8>,
}

impl TarSplitWriter {
    pub fn new(level: i32) -> io::Result<Self> {
        Ok(TarSplitWriter {
            spool: Spool::new(level)?,
            position: 0,
            padding: Vec::new(),
            segment: Vec::new(),
            line: Vec::new(),
        })
    }

    /// The raw header blocks of the next entry (extension headers included).
    pub fn header(&mut self, raw: &[u8]) -> io::Result<()> {
        let mut segment = std::mem::take(&mut self.segment);
        segment.clear();
        segment.append(&mut self.padding);
        segment.extend_from_slice(raw);
        let result = self.segment_entry(&segment);
        self.segment = segment;
        result
    }

    /// The file entry after a header: `size` is the header's size field, `crc` the CRC-64 of the
    /// payload read, given exactly when the size field is not zero (tar-split checksums what it
    /// reads then, which is nothing for entry types without payload).
    pub fn file(&mut self, name: &str, size: u64, crc: Option<u64>) -> io::Result<()> {
        let payload = crc.map(|c| base64::engine::general_purpose::STANDARD.encode(c.to_be_bytes()));
        self.entry(Entry { kind: FILE, name, size, payload, position: self.position })
    }

    /// The padding after the current payload, as read.
    pub fn padding(&mut self, padding: &[u8]) {
        self.padding.extend_from_slice(padding);
    }

    /// The end-of-archive marker (zero, one or two zero blocks, as read).
    pub fn end(&mut self, marker: &[u8]) -> io::Result<()> {
        let mut segment = std::mem::take(&mut self.padding);
        segment.extend_from_slice(marker);
        if segment.is_empty() {
            return Ok(());
        }
        self.segment_entry(&segment)
    }

    /// Bytes after the end-of-archive marker, in pieces of at most [`TRAILING_SEGMENT_BYTES`].
    pub fn trailing(&mut self, bytes: &[u8]) -> io::Result<()> {
        for piece in bytes.chunks(TRAILING_SEGMENT_BYTES) {
            self.segment_entry(piece)?;
        }
        Ok(())
    }

    pub fn finish(self) -> io::Result<Compressed> {
        self.spool.finish()
    }

    fn segment_entry(&mut self, bytes: &[u8]) -> io::Result<()> {
        let payload = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
        self.entry(Entry { kind: SEGMENT, name: "", size: 0, payload, position: self.position })
    }

    fn entry(&mut self, entry: Entry<'_>) -> io::Result<()> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, &entry).map_err(io::Error::other)?;
        self.line.push(b'\n');
        self.spool.write_all(&self.line)?;
        self.position += 1;
        Ok(())
    }
}

/// CRC-64 with the ISO polynomial, as Go's `hash/crc64` computes it (reflected, inverted in
/// and out), eight bytes at a time.
#[derive(Clone, Default)]
pub struct Crc64 {
    crc: u64,
}

const CRC64_ISO_REFLECTED: u64 = 0xd800_0000_0000_0000;

static CRC64_TABLES: std::sync::LazyLock<[[u64; 256]; 8]> = std::sync::LazyLock::new(|| {
    let mut t = [[0u64; 256]; 8];
    for (i, slot) in t[0].iter_mut().enumerate() {
        let mut crc = i as u64;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ CRC64_ISO_REFLECTED } else { crc >> 1 };
        }
        *slot = crc;
    }
    // Table k: the CRC of a byte followed by k zero bytes, for eight bytes per step.
    for k in 1..8 {
        for i in 0..256 {
            let prev = t[k - 1][i];
            t[k][i] = t[0][(prev & 0xff) as usize] ^ (prev >> 8);
        }
    }
    t
});

impl Crc64 {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        let t = &*CRC64_TABLES;
        let mut crc = !self.crc;
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            crc ^= u64::from_le_bytes(w.try_into().expect("8 bytes"));
            crc = t[7][(crc & 0xff) as usize]
                ^ t[6][((crc >> 8) & 0xff) as usize]
                ^ t[5][((crc >> 16) & 0xff) as usize]
                ^ t[4][((crc >> 24) & 0xff) as usize]
                ^ t[3][((crc >> 32) & 0xff) as usize]
                ^ t[2][((crc >> 40) & 0xff) as usize]
                ^ t[1][((crc >> 48) & 0xff) as usize]
                ^ t[0][(crc >> 56) as usize];
        }
        for &b in words.remainder() {
            crc = t[0][((crc ^ u64::from(b)) & 0xff) as usize] ^ (crc >> 8);
        }
        self.crc = !crc;
    }

    pub fn value(&self) -> u64 {
        self.crc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crc(data: &[u8]) -> u64 {
        let mut c = Crc64::new();
        c.update(data);
        c.value()
    }

    #[test]
    fn crc64_matches_go() {
        // Values from Go's crc64.New(crc64.MakeTable(crc64.ISO)).
        assert_eq!(crc(b""), 0);
        assert_eq!(crc(b"a"), 0x3420_0000_0000_0000);
        assert_eq!(crc(b"hello world"), 0xb9cf_3f57_2ad9_ac3e);
        assert_eq!(crc(b"123456789"), 0xb909_56c7_75a4_1001);
        let big: Vec<u8> = (0..100_000usize).map(|i| (i * 7 + i / 13) as u8).collect();
        assert_eq!(crc(&big), 0xd923_fce0_41d9_e9b1);
        let mut split = Crc64::new();
        for part in big.chunks(777) {
            split.update(part);
        }
        assert_eq!(split.value(), 0xd923_fce0_41d9_e9b1);
    }

    #[test]
    fn lines_are_tar_split_entries() {
        let mut w = TarSplitWriter::new(3).unwrap();
        w.header(b"HDR1").unwrap();
        w.file("a", 11, Some(crc(b"hello world"))).unwrap();
        w.padding(b"pp");
        w.header(b"HDR2").unwrap();
        w.file("d/", 0, None).unwrap();
        w.end(&[0; 4]).unwrap();
        w.trailing(&vec![7u8; TRAILING_SEGMENT_BYTES + 1]).unwrap();
        let mut done = w.finish().unwrap();
        let mut compressed = Vec::new();
        done.copy_to(&mut compressed).unwrap();
        let text = String::from_utf8(zstd::decode_all(&compressed[..]).unwrap()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 7);
        assert_eq!(lines[0], r#"{"type":2,"payload":"SERSMQ==","position":0}"#);
        assert_eq!(lines[1], r#"{"type":1,"name":"a","size":11,"payload":"uc8/VyrZrD4=","position":1}"#);
        assert_eq!(lines[2], r#"{"type":2,"payload":"cHBIRFIy","position":2}"#);
        assert_eq!(lines[3], r#"{"type":1,"name":"d/","payload":null,"position":3}"#);
        assert_eq!(lines[4], r#"{"type":2,"payload":"AAAAAA==","position":4}"#);
        assert!(lines[6].ends_with(r#""position":6}"#));
    }
}
