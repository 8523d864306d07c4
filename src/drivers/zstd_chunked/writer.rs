//! Lays out one zstd:chunked blob: the source tar cut into zstd frames, then the TOC, the
//! tar-split and the footer in skippable frames.
//!
//! Frame boundaries follow containers/storage's writer: the payload of every non-empty regular
//! file starts a new frame and each of its content-defined chunks is a frame of its own; tar
//! headers, padding and header-only entries share the frames in between. A long run of those is
//! also cut at entry boundaries, so no frame grows without bound; no TOC offset points there,
//! so readers do not notice. A chunk too large to hold (a long stretch without a cut point, or
//! a long hole) is compressed as a stream, after everything before it is written.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read, Write};
use std::thread::Scope;

use base64::Engine as _;

use super::chunker::{Chunker, Piece};
use super::tarsplit::{Crc64, TarSplitWriter};
use super::toc::{self, Position, TocEntry, TocWriter, CHUNK_TYPE_ZEROS, SKIPPABLE_HEADER_SIZE, TYPE_REG};
use crate::drivers::compression;
use crate::drivers::members::{MemberSink, Members, Zstd};
use crate::drivers::tar::{Entry, Header, TarReader};
use crate::drivers::{DriverError, DriverKind, LayerOutput};
use crate::oci::{annotations, media_types, Digest, Hasher};

/// Size limits of frames held in memory.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A chunk that grows past this is compressed as a stream instead.
    pub chunk_in_memory_bytes: usize,
    /// Frames of headers and padding are cut at the next entry once this large.
    pub header_frame_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { chunk_in_memory_bytes: 16 << 20, header_frame_bytes: 4 << 20 }
    }
}

/// Payload bytes read from the source at a time.
const READ_BYTES: usize = 256 << 10;

/// Compression windows are capped at 1 MiB. Each compressing thread keeps tables sized by its
/// window; uncapped they grow to 21 MiB per thread at level 10 and 83 MiB at level 19 once a
/// large chunk comes by, which on a many-core host would break the memory bound. Chunks average
/// 64 KiB, so almost no frame is longer than the window anyway.
const WINDOW_LOG: u32 = 20;

pub struct LayerWriter<'o> {
    members: Members<Frame>,
    out: Output<'o>,
    tar_split: TarSplitWriter,
    /// Bytes of the source stream. The layer's diff ID is the source's, which the engine hashes.
    diff: ByteCount,
    level: i32,
    limits: Limits,
    /// TOC entries of the header-only entries in the open frame; they travel with it.
    open: Vec<TocEntry>,
    /// First 16 bytes of the sha256 of each entry's cleaned name, to refuse duplicates.
    seen: HashSet<[u8; 16]>,
    buf: Vec<u8>,
}

/// What a frame carries to the sink, which fills in offsets once it is written.
enum Frame {
    /// Headers and padding, with the TOC entries of the entries without payload among them.
    Headers(Vec<TocEntry>),
    /// One chunk of a file's payload.
    Chunk(Box<ChunkFrame>),
}

struct ChunkFrame {
    /// The file's own entry, on its first chunk.
    file: Option<TocEntry>,
    chunk_offset: u64,
    size: u64,
    /// Empty when the chunk is the whole file.
    digest: String,
    zeros: bool,
    /// The digest of the whole file, on its last chunk.
    file_digest: Option<String>,
}

/// The chunking state of the file being written.
struct FileChunks {
    entry: Option<TocEntry>,
    /// Payload bytes placed in chunks so far.
    pos: u64,
    chunk_start: u64,
    zeros: bool,
    /// The current chunk ended at a cut point; it is closed when more data comes, or as the last.
    cut_pending: bool,
    stream: Option<Stream>,
    digest: Hasher,
}

/// A chunk being compressed as a stream straight into the output.
struct Stream {
    encoder: zstd::stream::write::Encoder<'static, Vec<u8>>,
    start: u64,
    digest: Hasher,
}

enum Bytes<'a> {
    Slice(&'a [u8]),
    Zeros(u64),
}

impl<'o> LayerWriter<'o> {
    pub fn new<'scope>(
        scope: &'scope Scope<'scope, '_>,
        workers: usize,
        level: i32,
        limits: Limits,
        out: &'o mut dyn Write,
    ) -> Result<Self, DriverError> {
        Ok(LayerWriter {
            members: Members::start(scope, workers, || Zstd::new(level)?.window_log(WINDOW_LOG))?,
            out: Output { blob: Blob { w: out, offset: 0 }, toc: TocWriter::new(level)?, file: Vec::new() },
            tar_split: TarSplitWriter::new(level)?,
            diff: ByteCount::default(),
            level,
            limits,
            open: Vec::new(),
            seen: HashSet::new(),
            buf: vec![0; READ_BYTES],
        })
    }

    /// Converts the whole tar stream and writes the metadata frames.
    pub fn convert<R: Read>(mut self, mut tr: TarReader<R>) -> Result<LayerOutput, DriverError> {
        loop {
            let before = tr.position();
            let Some(entry) = tr.next_entry()? else {
                // Zero, one or two zero blocks; what the reader consumed is the marker.
                let marker = vec![0u8; (tr.position() - before) as usize];
                self.tar_split.end(&marker)?;
                self.append(&marker);
                break;
            };
            self.add_entry(&mut tr, &entry)?;
        }
        let end = tr.position();
        self.add_trailing(tr.into_rest(), end)?;
        self.finish()
    }

    /// What follows the end-of-archive marker (GNU tar pads to a whole record). It must be zero
    /// blocks: containers/storage parses every tar-split segment as tar headers and fails on
    /// anything else, so such a layer could not be pulled.
    fn add_trailing(&mut self, mut rest: impl Read, end: u64) -> Result<(), DriverError> {
        let mut buf = std::mem::take(&mut self.buf);
        let mut at = end;
        let result = (|| loop {
            // Whole buffers, so every segment but the last is whole blocks.
            let mut n = 0;
            while n < buf.len() {
                match rest.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(compression::driver_error(e)),
                }
            }
            if n == 0 {
                return Ok(());
            }
            if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                return Err(self.trailing_refused(end, at + i as u64, "non-zero data"));
            }
            if n % crate::drivers::tar::BLOCK_SIZE != 0 {
                return Err(self.trailing_refused(end, at + n as u64, "a partial block of zeros"));
            }
            if self.members.open_len() >= self.limits.header_frame_bytes {
                self.cut_headers()?;
            }
            self.tar_split.trailing(&buf[..n])?;
            self.append(&buf[..n]);
            at += n as u64;
        })();
        self.buf = buf;
        result
    }

    fn trailing_refused(&self, end: u64, at: u64, what: &str) -> DriverError {
        DriverError::Unsupported {
            driver: DriverKind::ZstdChunked,
            offset: end,
            why: format!(
                "{what} at byte {at}, after the end-of-archive marker; containers/storage accepts only whole zero \
                 blocks there (its tar-split check reads them as headers)"
            ),
        }
    }

    fn add_entry<R: Read>(&mut self, tr: &mut TarReader<R>, entry: &Entry) -> Result<(), DriverError> {
        let record = self.toc_entry(entry)?;
        if self.members.open_len() >= self.limits.header_frame_bytes {
            self.cut_headers()?;
        }
        self.tar_split.header(&entry.raw_header)?;
        self.append(&entry.raw_header);
        let size = entry.payload_size();
        let mut crc = Crc64::new();
        let name = record.name.clone();
        if record.kind == TYPE_REG && size > 0 {
            self.add_payload(tr, record, size, &mut crc)?;
        } else {
            self.open.push(record);
        }
        // tar-split checksums the payload whenever the size field is set, even for entry types
        // that have none (it then reads nothing).
        let crc = (entry.header.size > 0).then(|| crc.value());
        self.tar_split.file(&name, entry.header.size, crc)?;
        let before = tr.position();
        let mut padding = [0u8; crate::drivers::tar::BLOCK_SIZE];
        let len = {
            let p = tr.read_padding()?;
            padding[..p.len()].copy_from_slice(p);
            p.len()
        };
        // An archive cut right after a payload gets zeros from the reader; only what was there
        // belongs in the output.
        let real = &padding[..len.min((tr.position() - before) as usize)];
        self.tar_split.padding(real);
        self.members.append(real);
        self.diff.update(real);
        Ok(())
    }

    fn add_payload<R: Read>(
        &mut self,
        tr: &mut TarReader<R>,
        entry: TocEntry,
        size: u64,
        crc: &mut Crc64,
    ) -> Result<(), DriverError> {
        // The frame with the headers ends where the payload begins.
        self.cut_headers()?;
        let mut file = FileChunks {
            entry: Some(entry),
            pos: 0,
            chunk_start: 0,
            zeros: false,
            cut_pending: false,
            stream: None,
            digest: Hasher::new(),
        };
        let mut chunker = Chunker::new();
        let mut buf = std::mem::take(&mut self.buf);
        let mut left = size;
        let result = (|| {
            while left > 0 {
                let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                tr.read_payload_exact(&mut buf[..n])?;
                left -= n as u64;
                let data = &buf[..n];
                self.diff.update(data);
                file.digest.update(data);
                crc.update(data);
                chunker.feed(data, &mut |piece| self.piece(&mut file, piece))?;
            }
            chunker.finish(&mut |piece| self.piece(&mut file, piece))?;
            self.end_chunk(&mut file, true)
        })();
        self.buf = buf;
        result
    }

    fn piece(&mut self, file: &mut FileChunks, piece: Piece<'_>) -> Result<(), DriverError> {
        match piece {
            Piece::Data(b) => self.chunk_bytes(file, Bytes::Slice(b)),
            Piece::Zeros(n) => self.chunk_bytes(file, Bytes::Zeros(n)),
            Piece::Cut => {
                if file.pos > file.chunk_start {
                    file.cut_pending = true;
                }
                Ok(())
            }
            Piece::Hole(n) => {
                if file.pos > file.chunk_start {
                    self.end_chunk(file, false)?;
                }
                file.zeros = true;
                self.chunk_bytes(file, Bytes::Zeros(n))?;
                file.cut_pending = true;
                Ok(())
            }
        }
    }

    fn chunk_bytes(&mut self, file: &mut FileChunks, bytes: Bytes<'_>) -> Result<(), DriverError> {
        if file.cut_pending {
            self.end_chunk(file, false)?;
        }
        let len = match bytes {
            Bytes::Slice(b) => b.len() as u64,
            Bytes::Zeros(n) => n,
        };
        if file.stream.is_none() && self.members.open_len() as u64 + len > self.limits.chunk_in_memory_bytes as u64 {
            self.start_stream(file)?;
        }
        match (&mut file.stream, bytes) {
            (Some(stream), Bytes::Slice(b)) => stream.write(b, &mut self.out)?,
            (Some(stream), Bytes::Zeros(n)) => {
                let zeros = vec![0u8; n.min(READ_BYTES as u64) as usize];
                let mut left = n;
                while left > 0 {
                    let k = left.min(zeros.len() as u64) as usize;
                    stream.write(&zeros[..k], &mut self.out)?;
                    left -= k as u64;
                }
            }
            (None, Bytes::Slice(b)) => self.members.append(b),
            (None, Bytes::Zeros(n)) => {
                self.members.append_with(n as usize, |buf| {
                    buf.fill(0);
                    Ok(())
                })?;
            }
        }
        file.pos += len;
        Ok(())
    }

    /// Writes everything before the current chunk, then goes on with the chunk as a stream.
    fn start_stream(&mut self, file: &mut FileChunks) -> Result<(), DriverError> {
        let head = self.members.flush(&mut self.out)?;
        let mut encoder = zstd::stream::write::Encoder::new(Vec::with_capacity(1 << 20), self.level)?;
        encoder.include_checksum(true)?;
        encoder.window_log(WINDOW_LOG)?;
        let mut stream = Stream { encoder, start: self.out.blob.offset, digest: Hasher::new() };
        stream.write(&head, &mut self.out)?;
        file.stream = Some(stream);
        Ok(())
    }

    fn end_chunk(&mut self, file: &mut FileChunks, last: bool) -> Result<(), DriverError> {
        let whole_file = last && file.chunk_start == 0;
        let file_digest = last.then(|| std::mem::take(&mut file.digest).finish().to_string());
        let mut frame = ChunkFrame {
            file: file.entry.take(),
            chunk_offset: file.chunk_start,
            size: file.pos - file.chunk_start,
            digest: String::new(),
            zeros: file.zeros,
            file_digest,
        };
        if let Some(Stream { encoder, start, digest }) = file.stream.take() {
            if !whole_file {
                frame.digest = digest.finish().to_string();
            }
            let rest = encoder.finish()?;
            self.out.blob.write_all(&rest)?;
            self.out.written(start, Frame::Chunk(Box::new(frame)))?;
        } else {
            if !whole_file {
                frame.digest = Digest::of(self.members.open_bytes()).to_string();
            }
            self.members.close(Frame::Chunk(Box::new(frame)), &mut self.out)?;
        }
        file.chunk_start = file.pos;
        file.zeros = false;
        file.cut_pending = false;
        Ok(())
    }

    /// Appends bytes that are neither payload nor read through the chunker.
    fn append(&mut self, bytes: &[u8]) {
        self.members.append(bytes);
        self.diff.update(bytes);
    }

    fn cut_headers(&mut self) -> Result<(), DriverError> {
        if self.members.open_len() == 0 {
            debug_assert!(self.open.is_empty(), "TOC entries without a frame");
            return Ok(());
        }
        let entries = std::mem::take(&mut self.open);
        self.members.close(Frame::Headers(entries), &mut self.out)
    }

    /// The TOC entry of a tar entry, as containers/storage builds it from Go's tar header; or
    /// why the entry cannot be in a zstd:chunked layer.
    fn toc_entry(&mut self, entry: &Entry) -> Result<TocEntry, DriverError> {
        let h = &entry.header;
        let refuse = |why: String| DriverError::Unsupported { driver: DriverKind::ZstdChunked, offset: entry.offset, why };
        let name = utf8(&h.name).ok_or_else(|| {
            refuse(format!("the name {:?} is not UTF-8, which the JSON of the TOC and tar-split cannot carry", h.name_lossy()))
        })?;
        if h.after_global_header {
            return Err(refuse(format!(
                "a PAX global header precedes {name:?}; containers/storage has no TOC entry type for global headers"
            )));
        }
        let kind = toc_type(h).ok_or_else(|| {
            refuse(format!(
                "{name:?} has tar type {:?}{}, which zstd:chunked cannot describe",
                h.typeflag as char,
                if h.gnu_sparse { " (GNU sparse file)" } else { "" },
            ))
        })?;
        let link_name = utf8(&h.linkname).ok_or_else(|| refuse(format!("the link target of {name:?} is not UTF-8")))?;
        let time = |what: &str, t: Option<(i64, u32)>| -> Result<Option<String>, DriverError> {
            match t {
                None => Ok(None),
                Some((secs, nanos)) => toc::go_time(secs, nanos).map_err(|e| refuse(format!("the {what} of {name:?}: {e}"))),
            }
        };
        let mut xattrs = BTreeMap::new();
        for (k, v) in &h.schily_xattrs {
            let k = utf8(k).ok_or_else(|| refuse(format!("an xattr name of {name:?} is not UTF-8")))?;
            xattrs.insert(k.to_string(), base64::engine::general_purpose::STANDARD.encode(v));
        }
        let record = TocEntry {
            kind,
            name: name.to_string(),
            link_name: link_name.to_string(),
            mode: h.mode,
            size: h.size,
            uid: h.uid,
            gid: h.gid,
            mod_time: time("modification time", Some((h.mtime, h.mtime_nanos)))?,
            access_time: time("access time", h.atime)?,
            change_time: time("change time", h.ctime)?,
            dev_major: h.dev_major,
            dev_minor: h.dev_minor,
            xattrs,
            ..TocEntry::default()
        };
        // tar-split refuses a second entry with the same cleaned name, and containers/storage a
        // second TOC entry of the same name.
        let key: [u8; 16] = Digest::of(go_clean(name).as_bytes()).as_bytes()[..16].try_into().expect("16 bytes");
        if !self.seen.insert(key) {
            return Err(refuse(format!(
                "{name:?} is a second entry for the same path; tar-split (and so zstd:chunked) cannot hold duplicate paths"
            )));
        }
        Ok(record)
    }

    fn finish(mut self) -> Result<LayerOutput, DriverError> {
        self.cut_headers()?;
        let LayerWriter { members, mut out, tar_split, diff, .. } = self;
        members.finish(&mut out)?;
        debug_assert!(out.file.is_empty(), "a file's TOC entries were left behind");
        let Output { blob: mut out, toc, .. } = out;
        let mut tar_split = tar_split.finish()?;
        let mut manifest = toc.finish(&tar_split.digest)?;

        let manifest_at = Position {
            offset: out.offset + SKIPPABLE_HEADER_SIZE,
            length: manifest.length,
            length_uncompressed: manifest.length_uncompressed,
        };
        out.write_all(&toc::skippable_header(manifest.length)?)?;
        manifest.copy_to(&mut out)?;
        let tar_split_at = Position {
            offset: out.offset + SKIPPABLE_HEADER_SIZE,
            length: tar_split.length,
            length_uncompressed: tar_split.length_uncompressed,
        };
        out.write_all(&toc::skippable_header(tar_split.length)?)?;
        tar_split.copy_to(&mut out)?;
        out.write_all(&toc::skippable_header(toc::FOOTER_SIZE as u64)?)?;
        out.write_all(&toc::footer(manifest_at, tar_split_at))?;
        out.flush()?;

        let mut annotations = BTreeMap::new();
        annotations.insert(annotations::ZSTD_CHUNKED_MANIFEST_CHECKSUM.to_string(), manifest.digest.to_string());
        annotations.insert(
            annotations::ZSTD_CHUNKED_MANIFEST_POSITION.to_string(),
            format!(
                "{}:{}:{}:{}",
                manifest_at.offset,
                manifest_at.length,
                manifest_at.length_uncompressed,
                toc::MANIFEST_TYPE_CRFS
            ),
        );
        annotations.insert(
            annotations::ZSTD_CHUNKED_TARSPLIT_POSITION.to_string(),
            format!("{}:{}:{}", tar_split_at.offset, tar_split_at.length, tar_split_at.length_uncompressed),
        );
        let uncompressed_size = diff.len();
        Ok(LayerOutput {
            media_type: media_types::OCI_LAYER_ZSTD.to_string(),
            diff_id: None,
            uncompressed_size,
            annotations,
            state: None,
        })
    }
}

/// Counts the bytes of the source stream.
#[derive(Default)]
struct ByteCount(u64);

impl ByteCount {
    fn update(&mut self, bytes: &[u8]) {
        self.0 += bytes.len() as u64;
    }
    fn len(&self) -> u64 {
        self.0
    }
}

impl Stream {
    fn write(&mut self, bytes: &[u8], out: &mut Output<'_>) -> io::Result<()> {
        self.digest.update(bytes);
        self.encoder.write_all(bytes)?;
        let compressed = self.encoder.get_mut();
        out.blob.write_all(compressed)?;
        compressed.clear();
        Ok(())
    }
}

/// TOC type of a tar entry, as containers/storage maps Go's type flags; `None` for entries it
/// has no type for (contiguous files, GNU sparse files, vendor types).
fn toc_type(h: &Header) -> Option<&'static str> {
    if h.gnu_sparse || h.typeflag == b'7' {
        return None;
    }
    h.entry_type.toc_name()
}

fn utf8(b: &[u8]) -> Option<&str> {
    std::str::from_utf8(b).ok()
}

/// Go's `path.Clean`: the shortest equivalent path, `"."` for nothing.
pub(super) fn go_clean(name: &str) -> String {
    let rooted = name.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

/// Where frames go: the blob, and the TOC, whose entries get their offsets as frames arrive
/// in order.
struct Output<'o> {
    blob: Blob<'o>,
    toc: TocWriter,
    /// The entries of the file whose chunks are being written, its own first.
    file: Vec<TocEntry>,
}

impl Output<'_> {
    /// Records that `frame` was written at `start` and ends at the current offset.
    fn written(&mut self, start: u64, frame: Frame) -> Result<(), DriverError> {
        match frame {
            Frame::Headers(entries) => {
                for e in &entries {
                    self.toc.push(e)?;
                }
            }
            Frame::Chunk(chunk) => {
                let chunk = *chunk;
                let mut e = match chunk.file {
                    Some(e) => e,
                    None => {
                        let name = &self.file.first().ok_or_else(|| internal("a chunk without its file"))?.name;
                        TocEntry::chunk(name)
                    }
                };
                e.offset = start;
                e.chunk_offset = chunk.chunk_offset;
                e.chunk_size = chunk.size;
                e.chunk_digest = chunk.digest;
                e.chunk_type = if chunk.zeros { CHUNK_TYPE_ZEROS } else { "" };
                self.file.push(e);
                if let Some(digest) = chunk.file_digest {
                    let mut entries = std::mem::take(&mut self.file);
                    let single = entries.len() == 1;
                    let head = &mut entries[0];
                    head.digest = digest;
                    head.end_offset = self.blob.offset;
                    if single {
                        head.clear_chunk_fields();
                    }
                    for e in &entries {
                        self.toc.push(e)?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl MemberSink<Frame> for Output<'_> {
    fn member(&mut self, compressed: &[u8], frame: Frame) -> Result<(), DriverError> {
        let start = self.blob.offset;
        self.blob.write_all(compressed)?;
        self.written(start, frame)
    }
}

/// The output, counting the bytes written.
struct Blob<'o> {
    w: &'o mut dyn Write,
    offset: u64,
}

impl Write for Blob<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.w.write(buf)?;
        self.offset += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

fn internal(why: &str) -> DriverError {
    DriverError::Io(io::Error::other(why.to_string()))
}

#[cfg(test)]
mod tests {
    use super::go_clean;

    #[test]
    fn clean_like_go() {
        for (input, want) in [
            ("", "."),
            (".", "."),
            ("./", "."),
            ("a/", "a"),
            ("./a//b/./c/", "a/b/c"),
            ("a/../b", "b"),
            ("../a", "../a"),
            ("a/../../b", "../b"),
            ("/../a", "/a"),
            ("/", "/"),
            ("//a", "/a"),
        ] {
            assert_eq!(go_clean(input), want, "{input:?}");
        }
    }
}
