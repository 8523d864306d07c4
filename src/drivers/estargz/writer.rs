//! Lays out one eStargz blob: source entries cut into gzip members, TOC records with their
//! compressed offsets, then the TOC member and the footer.
//!
//! Member boundaries follow the reference writer: a new member starts at every chunk of every
//! non-empty regular file (files larger than the chunk size have several), and the headers,
//! padding and header-only entries in between share the member before them. A long run of
//! header-only entries is also cut at entry boundaries so no member grows without bound; no TOC
//! offset points there, so readers do not notice.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::thread::Scope;

use super::toc::{self, TocEntry, TocWriter, TOC_NAME};
use crate::drivers::members::{Gzip, MemberSink, Members};
use crate::drivers::tar::{self, Entry, TarReader, BLOCK_SIZE};
use crate::drivers::{DriverError, LayerOutput};
use crate::oci::{annotations, media_types, Digest, Hasher};

/// Contents of a landmark file; any single byte would do, this is the reference's.
const LANDMARK_CONTENTS: u8 = 0x0f;

pub struct LayerWriter<'o> {
    members: Members<Vec<TocEntry>>,
    out: Output<'o>,
    /// Digest of the whole uncompressed stream: the layer's diff ID.
    diff: Hasher,
    chunk_size: u64,
    level: u32,
    /// TOC records completed while the current member is open; they travel with it.
    open_toc: Vec<TocEntry>,
    /// Index the open member will have once closed.
    open_member: u64,
}

impl<'o> LayerWriter<'o> {
    pub fn new<'scope>(
        scope: &'scope Scope<'scope, '_>,
        workers: usize,
        level: u32,
        chunk_size: u64,
        out: &'o mut dyn Write,
    ) -> Result<Self, DriverError> {
        Ok(LayerWriter {
            members: Members::start(scope, workers, || Gzip::new(level))?,
            out: Output {
                w: out,
                offset: 0,
                written_members: 0,
                member_offsets: VecDeque::new(),
                toc: TocWriter::new(),
            },
            diff: Hasher::new(),
            chunk_size: chunk_size.max(1),
            level,
            open_toc: Vec::new(),
            open_member: 0,
        })
    }

    /// Writes a landmark entry (a one-byte regular file named `name`).
    pub fn add_landmark(&mut self, name: &str) -> Result<(), DriverError> {
        let mut bytes = tar::ustar_header(name, b'0', 1, 0o644).to_vec();
        bytes.push(LANDMARK_CONTENTS);
        bytes.resize(2 * BLOCK_SIZE, 0);
        let mut tr = TarReader::new(&bytes[..]);
        let entry = tr.next_entry()?.ok_or_else(|| internal("landmark entry did not parse"))?;
        self.add_entry(&mut tr, &entry)
    }

    /// Writes `entry` (just read from `tr`) with its raw header bytes, payload and padding.
    pub fn add_entry<R: Read>(&mut self, tr: &mut TarReader<R>, entry: &Entry) -> Result<(), DriverError> {
        let h = &entry.header;
        let kind = match h.entry_type.toc_name() {
            Some(kind) if !h.gnu_sparse => kind,
            _ => {
                return Err(DriverError::InvalidTar {
                    offset: entry.offset,
                    why: format!(
                        "entry {:?} has tar type {:?}{}, which eStargz cannot describe",
                        h.name_lossy(),
                        h.typeflag as char,
                        if h.gnu_sparse { " (GNU sparse file)" } else { "" },
                    ),
                })
            }
        };
        if self.members.open_len() as u64 >= self.chunk_size {
            self.cut()?;
        }
        self.append(&entry.raw_header);
        let mut record = TocEntry::from_header(h, kind);
        let size = entry.payload_size();
        if kind == "reg" && size > 0 {
            self.add_payload(tr, record, size)?;
        } else {
            if kind == "reg" {
                record.digest = Digest::of(b"").to_string();
            }
            self.open_toc.push(record);
        }
        let padding = tr.read_padding()?;
        self.members.append(padding);
        self.diff.update(padding);
        Ok(())
    }

    fn add_payload<R: Read>(
        &mut self,
        tr: &mut TarReader<R>,
        first: TocEntry,
        size: u64,
    ) -> Result<(), DriverError> {
        let name = first.name.clone();
        let mut first = Some(first);
        let mut file_digest = Hasher::new();
        // Not preallocated: `size` comes from the input and may be absurd.
        let mut records = Vec::new();
        let mut done = 0u64;
        while done < size {
            self.cut()?;
            let remaining = size - done;
            let len = remaining.min(self.chunk_size);
            let member = self.open_member;
            let len_usize = usize::try_from(len).map_err(|_| internal("chunk larger than memory"))?;
            let bytes = self.members.append_with(len_usize, |buf| tr.read_payload_exact(buf))?;
            self.diff.update(bytes);
            file_digest.update(bytes);
            let mut record = first.take().unwrap_or_else(|| TocEntry::chunk(&name));
            // Only a file's last, short chunk leaves chunkSize out ("to the end of the file").
            record.chunk_size = if remaining >= self.chunk_size { len } else { 0 };
            record.chunk_offset = done;
            if len < size {
                record.chunk_digest = Digest::of(bytes).to_string();
            }
            record.member = Some(member);
            records.push(record);
            done += len;
        }
        let file_digest = file_digest.finish().to_string();
        if let Some(head) = records.first_mut() {
            if head.chunk_digest.is_empty() {
                head.chunk_digest = file_digest.clone();
            }
            head.digest = file_digest;
        }
        self.open_toc.extend(records);
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) {
        self.members.append(bytes);
        self.diff.update(bytes);
    }

    fn cut(&mut self) -> Result<(), DriverError> {
        if self.members.open_len() == 0 {
            debug_assert!(self.open_toc.is_empty(), "TOC records without a member");
            return Ok(());
        }
        let records = std::mem::take(&mut self.open_toc);
        self.members.close(records, &mut self.out)?;
        self.open_member += 1;
        Ok(())
    }

    /// Writes the remaining members, the TOC member and the footer.
    pub fn finish(mut self) -> Result<LayerOutput, DriverError> {
        self.cut()?;
        let LayerWriter { members, mut out, mut diff, level, .. } = self;
        members.finish(&mut out)?;

        let toc_offset = out.offset;
        let json_len = out.toc.json_len();
        let mut toc = std::mem::replace(&mut out.toc, TocWriter::new());
        let mut gz = flate2::write::GzEncoder::new(&mut out, flate2::Compression::new(level));
        let mut emit = |b: &[u8]| -> io::Result<()> {
            diff.update(b);
            gz.write_all(b)
        };
        emit(&tar::ustar_header(TOC_NAME, b'0', json_len, 0o644))?;
        let toc_digest = toc.write_json(&mut emit)?;
        emit(&vec![0u8; tar::padding_len(json_len)])?;
        // End of archive: tar readers stop here, before the footer.
        emit(&[0u8; 2 * BLOCK_SIZE])?;
        gz.finish()?;
        out.write_all(&toc::footer(toc_offset))?;
        out.flush()?;

        let uncompressed_size = diff.len();
        let mut annotations = std::collections::BTreeMap::new();
        annotations.insert(annotations::ESTARGZ_TOC_DIGEST.to_string(), toc_digest.to_string());
        annotations.insert(annotations::ESTARGZ_UNCOMPRESSED_SIZE.to_string(), uncompressed_size.to_string());
        Ok(LayerOutput {
            media_type: media_types::OCI_LAYER_GZIP.to_string(),
            diff_id: Some(diff.finish()),
            uncompressed_size,
            annotations,
            state: None,
        })
    }
}

fn internal(why: &str) -> DriverError {
    DriverError::Io(io::Error::other(why.to_string()))
}

/// The blob being written: counts compressed bytes and turns member indexes in TOC records
/// into offsets as members arrive in order.
struct Output<'o> {
    w: &'o mut dyn Write,
    offset: u64,
    written_members: u64,
    /// (member index, compressed offset) of members a pending TOC record may still point at.
    /// Records arrive in member order, so older ones are dropped as records are resolved.
    member_offsets: VecDeque<(u64, u64)>,
    toc: TocWriter,
}

impl Output<'_> {
    fn offset_of(&mut self, member: u64) -> Result<u64, DriverError> {
        while self.member_offsets.front().is_some_and(|&(i, _)| i < member) {
            self.member_offsets.pop_front();
        }
        match self.member_offsets.front() {
            Some(&(i, offset)) if i == member => Ok(offset),
            _ => Err(internal("TOC record points at a gzip member that was not written")),
        }
    }
}

impl MemberSink<Vec<TocEntry>> for Output<'_> {
    fn member(&mut self, gzip: &[u8], records: Vec<TocEntry>) -> Result<(), DriverError> {
        self.member_offsets.push_back((self.written_members, self.offset));
        self.written_members += 1;
        self.write_all(gzip)?;
        for mut record in records {
            if let Some(member) = record.member.take() {
                record.offset = self.offset_of(member)?;
            }
            self.toc.push(record)?;
        }
        Ok(())
    }
}

impl Write for Output<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.w.write(buf)?;
        self.offset += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}
