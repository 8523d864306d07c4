//! Streaming tar reader that keeps each entry's raw header blocks next to its parsed metadata.
//!
//! Writers that must reproduce the source tar byte for byte (eStargz, zstd:chunked) copy
//! [`Entry::raw_header`], stream the payload through [`TarReader::read_payload`] and copy
//! [`TarReader::read_padding`]; nothing is re-encoded. Parsing follows Go's `archive/tar`, which
//! is what the reference readers of every lazy-pull format use, so both sides agree on names,
//! sizes and xattrs.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read};

use base64::Engine as _;

use super::DriverError;

pub const BLOCK_SIZE: usize = 512;

/// Go's reader refuses PAX and GNU long-name payloads above 1 MiB, so nothing valid is larger;
/// the limit stops a corrupt size field from making us buffer gigabytes.
pub const MAX_EXTENSION_SIZE: u64 = 1 << 20;

const ZERO_BLOCK: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

/// Bytes of zero padding that follow a payload of `size` bytes.
pub fn padding_len(size: u64) -> usize {
    ((BLOCK_SIZE as u64 - size % BLOCK_SIZE as u64) % BLOCK_SIZE as u64) as usize
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryType {
    Regular,
    HardLink,
    Symlink,
    Char,
    Block,
    Directory,
    Fifo,
    /// Any other type flag (GNU sparse `S`, volume labels, vendor types), kept as read.
    Other(u8),
}

impl EntryType {
    fn from_flag(flag: u8) -> Self {
        match flag {
            // '7' is "contiguous file"; every reader treats it as a regular file.
            b'0' | 0 | b'7' => EntryType::Regular,
            b'1' => EntryType::HardLink,
            b'2' => EntryType::Symlink,
            b'3' => EntryType::Char,
            b'4' => EntryType::Block,
            b'5' => EntryType::Directory,
            b'6' => EntryType::Fifo,
            other => EntryType::Other(other),
        }
    }

    /// Types whose size field is ignored: they never have a payload (as GNU tar and Go read
    /// them), even when a writer put a non-zero size there.
    /// The entry type name the TOCs of eStargz and zstd:chunked use (Go's `archive/tar` types);
    /// `None` for types neither format can describe.
    pub fn toc_name(self) -> Option<&'static str> {
        Some(match self {
            EntryType::Regular => "reg",
            EntryType::HardLink => "hardlink",
            EntryType::Symlink => "symlink",
            EntryType::Char => "char",
            EntryType::Block => "block",
            EntryType::Directory => "dir",
            EntryType::Fifo => "fifo",
            EntryType::Other(_) => return None,
        })
    }

    pub fn is_header_only(self) -> bool {
        matches!(
            self,
            EntryType::HardLink
                | EntryType::Symlink
                | EntryType::Char
                | EntryType::Block
                | EntryType::Directory
                | EntryType::Fifo
        )
    }
}

/// An entry's metadata after PAX and GNU long-name records are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: Vec<u8>,
    pub entry_type: EntryType,
    /// The type flag byte as written in the header.
    pub typeflag: u8,
    /// Size field (PAX `size` wins). See [`Entry::payload_size`] for the bytes that follow.
    pub size: u64,
    pub mode: i64,
    pub uid: i64,
    pub gid: i64,
    pub uname: Vec<u8>,
    pub gname: Vec<u8>,
    /// Seconds since the epoch, rounded down; `mtime_nanos` holds the PAX sub-second part.
    pub mtime: i64,
    pub mtime_nanos: u32,
    pub linkname: Vec<u8>,
    pub dev_major: i64,
    pub dev_minor: i64,
    /// From PAX `SCHILY.xattr.*` and `LIBARCHIVE.xattr.*` records (SCHILY wins on a clash).
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The PAX `SCHILY.xattr.*` records alone, empty values included: what Go keeps in
    /// `Header.PAXRecords`, which is where containers/storage takes xattrs from.
    pub schily_xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Access and change times as Go reads them (PAX `atime`/`ctime`, else the GNU or star
    /// header fields), as (seconds, nanoseconds); `None` where the archive has none.
    pub atime: Option<(i64, u32)>,
    pub ctime: Option<(i64, u32)>,
    /// The payload is a GNU sparse encoding (old GNU `S` type or PAX `GNU.sparse.*` records),
    /// not the file's bytes.
    pub gnu_sparse: bool,
    /// A PAX global header (type `g`) comes just before this entry; its raw bytes are part of
    /// the entry's, its records are not applied. Go's reader returns it as an entry of its own.
    pub after_global_header: bool,
}

impl Header {
    pub fn name_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.name)
    }
}

/// One entry as read from the stream.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Offset in the tar stream of the entry's first raw header block.
    pub offset: u64,
    /// Every block that precedes the payload, as read: PAX `x`/`g` and GNU `L`/`K` headers with
    /// their data and padding, the entry's own header, and old-GNU sparse extension blocks.
    pub raw_header: Vec<u8>,
    pub header: Header,
}

impl Entry {
    /// Bytes of payload that follow the raw header.
    pub fn payload_size(&self) -> u64 {
        if self.header.entry_type.is_header_only() {
            0
        } else {
            self.header.size
        }
    }
}

/// Reads entries one at a time; between two calls to [`TarReader::next_entry`] the caller may
/// stream the current payload and padding. Whatever it leaves unread is skipped.
pub struct TarReader<R> {
    inner: BufReader<R>,
    pos: u64,
    payload_left: u64,
    padding_left: usize,
    padding: [u8; BLOCK_SIZE],
    done: bool,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        Self::with_offset(inner, 0)
    }

    /// A reader whose first byte sits at `offset` of a larger tar stream, so offsets in entries
    /// and errors stay those of the whole stream.
    pub fn with_offset(inner: R, offset: u64) -> Self {
        TarReader {
            inner: BufReader::with_capacity(128 << 10, inner),
            pos: offset,
            payload_left: 0,
            padding_left: 0,
            padding: [0; BLOCK_SIZE],
            done: false,
        }
    }

    /// Offset in the tar stream of the next byte to be read.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The underlying reader; bytes already buffered are dropped.
    pub fn into_inner(self) -> R {
        self.inner.into_inner()
    }

    /// Whatever follows the last byte read (after the end-of-archive marker: the padding some
    /// writers add to fill a record, or trailing data), buffered bytes included.
    pub fn into_rest(self) -> BufReader<R> {
        self.inner
    }

    /// The next entry, or `None` at the end of the archive: two zero blocks, one zero block and
    /// then end of input, or end of input at an entry boundary.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, DriverError> {
        if self.done {
            return Ok(None);
        }
        self.skip_payload()?;
        self.read_padding()?;
        if self.done {
            return Ok(None);
        }

        let offset = self.pos;
        let mut raw = Vec::with_capacity(BLOCK_SIZE);
        let mut pax = Pax::default();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut after_global_header = false;
        loop {
            let block_offset = self.pos;
            let Some(block) = self.read_block()? else {
                if raw.is_empty() {
                    self.done = true;
                    return Ok(None);
                }
                return Err(invalid(
                    block_offset,
                    "the archive ends after an extension header, before the entry it describes",
                ));
            };
            if block == ZERO_BLOCK {
                if !raw.is_empty() {
                    return Err(invalid(
                        block_offset,
                        "an extension header is followed by a zero block instead of the entry it describes",
                    ));
                }
                match self.read_block()? {
                    None => {}
                    Some(next) if next == ZERO_BLOCK => {}
                    Some(_) => {
                        return Err(invalid(
                            block_offset + BLOCK_SIZE as u64,
                            "a single zero block is followed by more headers; the end-of-archive marker is two zero blocks",
                        ))
                    }
                }
                self.done = true;
                return Ok(None);
            }
            verify_checksum(&block, block_offset)?;
            raw.extend_from_slice(&block);

            let flag = block[156];
            match flag {
                b'x' | b'g' | b'L' | b'K' => {
                    let size = numeric(&block[124..136], "size", block_offset)?;
                    if size < 0 || size as u64 > MAX_EXTENSION_SIZE {
                        return Err(invalid(
                            block_offset,
                            format!(
                                "extension header of type '{}' declares {size} bytes of data; the limit is {MAX_EXTENSION_SIZE}",
                                flag as char
                            ),
                        ));
                    }
                    let size = size as usize;
                    let start = raw.len();
                    raw.resize(start + size + padding_len(size as u64), 0);
                    self.fill(&mut raw[start..], "extension header data")?;
                    let data = &raw[start..start + size];
                    match flag {
                        b'x' => pax.parse(data, block_offset)?,
                        // Global records are checked but not applied: Go's reader, and so every
                        // reference reader, ignores them too, and we must list what they list.
                        b'g' => {
                            after_global_header = true;
                            Pax::default().parse(data, block_offset)?
                        }
                        b'L' => long_name = Some(until_nul(data).to_vec()),
                        _ => long_link = Some(until_nul(data).to_vec()),
                    }
                }
                _ => {
                    let mut header = parse_header(&block, block_offset)?;
                    pax.apply(&mut header);
                    header.after_global_header = after_global_header;
                    if let Some(name) = long_name {
                        header.name = name;
                    }
                    if let Some(link) = long_link {
                        header.linkname = link;
                    }
                    // Pre-POSIX archives mark directories only by a trailing slash.
                    if flag == 0 && header.name.ends_with(b"/") {
                        header.entry_type = EntryType::Directory;
                    }
                    if flag == b'S' && is_gnu(&block) {
                        header.gnu_sparse = true;
                        let mut extended = block[482] != 0;
                        while extended {
                            let ext_offset = self.pos;
                            let Some(ext) = self.read_block()? else {
                                return Err(invalid(ext_offset, "the archive ends inside a GNU sparse map"));
                            };
                            raw.extend_from_slice(&ext);
                            extended = ext[504] != 0;
                        }
                    }
                    let entry = Entry { offset, raw_header: raw, header };
                    self.payload_left = entry.payload_size();
                    self.padding_left = padding_len(self.payload_left);
                    return Ok(Some(entry));
                }
            }
        }
    }

    /// Bytes of the current entry's payload not yet read.
    pub fn payload_remaining(&self) -> u64 {
        self.payload_left
    }

    /// Reads payload bytes of the current entry; `Ok(0)` once the payload is exhausted.
    pub fn read_payload(&mut self, buf: &mut [u8]) -> Result<usize, DriverError> {
        if self.payload_left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
        let n = loop {
            match self.inner.read(&mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e)),
            }
        };
        if n == 0 {
            return Err(invalid(
                self.pos,
                format!("the archive ends inside an entry's payload, {} bytes short", self.payload_left),
            ));
        }
        self.pos += n as u64;
        self.payload_left -= n as u64;
        Ok(n)
    }

    /// Fills `buf` entirely from the current payload.
    pub fn read_payload_exact(&mut self, buf: &mut [u8]) -> Result<(), DriverError> {
        if (buf.len() as u64) > self.payload_left {
            return Err(invalid(self.pos, "asked for more bytes than the entry's payload holds"));
        }
        let mut filled = 0;
        while filled < buf.len() {
            filled += self.read_payload(&mut buf[filled..])?;
        }
        Ok(())
    }

    /// The padding after the current payload, as read (normally zeros). Skips any unread
    /// payload first. Empty once the padding has been returned.
    ///
    /// An archive that ends right after a payload, without its padding, is read the way Go
    /// reads it (as the end of the archive); the padding is then returned as zeros so a writer
    /// copying it still produces a well-formed archive.
    pub fn read_padding(&mut self) -> Result<&[u8], DriverError> {
        self.skip_payload()?;
        let len = std::mem::take(&mut self.padding_left);
        if len == 0 {
            return Ok(&[]);
        }
        let start = self.pos;
        let mut filled = 0;
        while filled < len {
            match self.inner.read(&mut self.padding[filled..len]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(read_error(e)),
            }
        }
        self.pos += filled as u64;
        if filled == 0 {
            self.done = true;
            self.padding[..len].fill(0);
        } else if filled < len {
            return Err(invalid(start, "the archive ends inside the padding after an entry's payload"));
        }
        Ok(&self.padding[..len])
    }

    /// The current payload as a `Read`; errors come back as `io::Error` wrapping the
    /// [`DriverError`].
    pub fn payload(&mut self) -> Payload<'_, R> {
        Payload(self)
    }

    fn skip_payload(&mut self) -> Result<(), DriverError> {
        let mut scratch = [0u8; 8192];
        while self.payload_left > 0 {
            self.read_payload(&mut scratch)?;
        }
        Ok(())
    }

    /// One 512-byte block, or `None` at end of input on a block boundary.
    fn read_block(&mut self) -> Result<Option<[u8; BLOCK_SIZE]>, DriverError> {
        let mut block = [0u8; BLOCK_SIZE];
        let mut filled = 0;
        while filled < BLOCK_SIZE {
            match self.inner.read(&mut block[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(read_error(e)),
            }
        }
        let start = self.pos;
        self.pos += filled as u64;
        match filled {
            0 => Ok(None),
            BLOCK_SIZE => Ok(Some(block)),
            n => Err(invalid(start, format!("the archive ends inside a header block ({n} of 512 bytes)"))),
        }
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<(), DriverError> {
        let start = self.pos;
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(invalid(
                        start,
                        format!("the archive ends inside {what} ({filled} of {} bytes)", buf.len()),
                    ))
                }
                Ok(n) => {
                    filled += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(read_error(e)),
            }
        }
        Ok(())
    }
}

/// See [`TarReader::payload`].
pub struct Payload<'a, R>(&'a mut TarReader<R>);

impl<R: Read> Read for Payload<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_payload(buf).map_err(io::Error::other)
    }
}

/// Builds a plain ustar header block, for entries a writer adds itself (landmarks, TOCs).
/// `name` must fit the 100-byte name field.
pub fn ustar_header(name: &str, typeflag: u8, size: u64, mode: u32) -> [u8; BLOCK_SIZE] {
    debug_assert!(name.len() <= 100, "ustar_header is for short, fixed names");
    let mut block = [0u8; BLOCK_SIZE];
    let n = name.len().min(100);
    block[..n].copy_from_slice(&name.as_bytes()[..n]);
    write_octal(&mut block[100..108], u64::from(mode));
    write_octal(&mut block[108..116], 0);
    write_octal(&mut block[116..124], 0);
    if size < 1 << 33 {
        write_octal(&mut block[124..136], size);
    } else {
        // Base-256, as GNU tar and Go write sizes beyond 11 octal digits.
        block[124] = 0x80;
        block[128..136].copy_from_slice(&size.to_be_bytes());
    }
    write_octal(&mut block[136..148], 0);
    block[156] = typeflag;
    block[257..263].copy_from_slice(b"ustar\0");
    block[263..265].copy_from_slice(b"00");
    write_octal(&mut block[329..337], 0);
    write_octal(&mut block[337..345], 0);
    let (sum, _) = checksums(&block);
    block[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    block[155] = b' ';
    block
}

fn write_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
    field[digits] = 0;
}

fn invalid(offset: u64, why: impl Into<String>) -> DriverError {
    DriverError::InvalidTar { offset, why: why.into() }
}

/// Keeps a decompression error raised under us (see `compression`) as what it is, rather than
/// a generic I/O error.
fn read_error(e: io::Error) -> DriverError {
    super::compression::driver_error(e)
}

fn until_nul(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

fn is_gnu(block: &[u8; BLOCK_SIZE]) -> bool {
    &block[257..263] == b"ustar " && &block[263..265] == b" \0"
}

/// Unsigned and signed byte sums with the checksum field read as spaces; historic writers
/// used either.
fn checksums(block: &[u8; BLOCK_SIZE]) -> (i64, i64) {
    let mut unsigned = 0i64;
    let mut signed = 0i64;
    for (i, &c) in block.iter().enumerate() {
        let c = if (148..156).contains(&i) { b' ' } else { c };
        unsigned += i64::from(c);
        signed += i64::from(c as i8);
    }
    (unsigned, signed)
}

fn verify_checksum(block: &[u8; BLOCK_SIZE], offset: u64) -> Result<(), DriverError> {
    let stored = parse_octal(&block[148..156])
        .ok_or_else(|| invalid(offset, "header checksum field is not an octal number; this is not a tar header"))?;
    let (unsigned, signed) = checksums(block);
    if stored != unsigned && stored != signed {
        return Err(invalid(
            offset,
            format!("header checksum mismatch: stored {stored:o}, computed {unsigned:o}; the data is corrupt or not a tar archive"),
        ));
    }
    Ok(())
}

/// Octal text, padded with spaces or NULs on either side; empty means 0.
fn parse_octal(field: &[u8]) -> Option<i64> {
    let trimmed = {
        let is_pad = |c: &u8| *c == b' ' || *c == 0;
        let start = field.iter().position(|c| !is_pad(c)).unwrap_or(field.len());
        let end = field.iter().rposition(|c| !is_pad(c)).map_or(start, |i| i + 1);
        until_nul(&field[start..end])
    };
    if trimmed.is_empty() {
        return Some(0);
    }
    let mut value: u64 = 0;
    for &c in trimmed {
        if !(b'0'..=b'7').contains(&c) {
            return None;
        }
        value = value.checked_mul(8)?.checked_add(u64::from(c - b'0'))?;
    }
    i64::try_from(value).ok()
}

/// Octal or, when the high bit of the first byte is set, big-endian two's complement
/// ("base-256", the GNU extension for values that do not fit the octal field).
fn parse_numeric(field: &[u8]) -> Option<i64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let invert = if field[0] & 0x40 != 0 { 0xff } else { 0 };
        let mut value: u64 = 0;
        for (i, &b) in field.iter().enumerate() {
            let mut c = b ^ invert;
            if i == 0 {
                c &= 0x7f;
            }
            if value >> 56 != 0 {
                return None;
            }
            value = (value << 8) | u64::from(c);
        }
        if value >> 63 != 0 {
            return None;
        }
        return Some(if invert == 0xff { !(value as i64) } else { value as i64 });
    }
    parse_octal(field)
}

fn numeric(field: &[u8], what: &str, offset: u64) -> Result<i64, DriverError> {
    parse_numeric(field).ok_or_else(|| invalid(offset, format!("header field {what} is not a valid number")))
}

fn parse_header(block: &[u8; BLOCK_SIZE], offset: u64) -> Result<Header, DriverError> {
    let size = numeric(&block[124..136], "size", offset)?;
    if size < 0 {
        return Err(invalid(offset, format!("header declares a negative size ({size})")));
    }
    let mut header = Header {
        name: until_nul(&block[0..100]).to_vec(),
        entry_type: EntryType::from_flag(block[156]),
        typeflag: block[156],
        size: size as u64,
        mode: numeric(&block[100..108], "mode", offset)?,
        uid: numeric(&block[108..116], "uid", offset)?,
        gid: numeric(&block[116..124], "gid", offset)?,
        uname: Vec::new(),
        gname: Vec::new(),
        mtime: numeric(&block[136..148], "mtime", offset)?,
        mtime_nanos: 0,
        linkname: until_nul(&block[157..257]).to_vec(),
        dev_major: 0,
        dev_minor: 0,
        xattrs: BTreeMap::new(),
        schily_xattrs: BTreeMap::new(),
        atime: None,
        ctime: None,
        gnu_sparse: false,
        after_global_header: false,
    };
    let ustar = &block[257..263] == b"ustar\0";
    if ustar || is_gnu(block) {
        header.uname = until_nul(&block[265..297]).to_vec();
        header.gname = until_nul(&block[297..329]).to_vec();
        header.dev_major = numeric(&block[329..337], "devmajor", offset)?;
        header.dev_minor = numeric(&block[337..345], "devminor", offset)?;
    }
    let star = ustar && &block[508..512] == b"tar\0";
    if star {
        header.atime = parse_numeric(&block[476..488]).map(|t| (t, 0));
        header.ctime = parse_numeric(&block[488..500]).map(|t| (t, 0));
    } else if is_gnu(block) {
        // Go reads these only when set, and drops both when either is not a number (archives
        // from old Go writers put a name prefix there).
        let time = |field: &[u8]| if field[0] == 0 { Some(None) } else { parse_numeric(field).map(|t| Some((t, 0))) };
        if let (Some(atime), Some(ctime)) = (time(&block[345..357]), time(&block[357..369])) {
            (header.atime, header.ctime) = (atime, ctime);
        }
    }
    if ustar {
        // The star variant (trailer "tar\0") keeps times after a shorter prefix.
        let prefix = if star { &block[345..476] } else { &block[345..500] };
        let prefix = until_nul(prefix);
        if !prefix.is_empty() {
            let mut name = prefix.to_vec();
            name.push(b'/');
            name.extend_from_slice(&header.name);
            header.name = name;
        }
    }
    Ok(header)
}

/// PAX extended-header records that apply to the next entry.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<i64>,
    gid: Option<i64>,
    uname: Option<Vec<u8>>,
    gname: Option<Vec<u8>>,
    mtime: Option<(i64, u32)>,
    atime: Option<(i64, u32)>,
    ctime: Option<(i64, u32)>,
    schily_xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Every `SCHILY.xattr.*` record, empty ones too.
    schily_records: BTreeMap<Vec<u8>, Vec<u8>>,
    libarchive_xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    sparse: bool,
}

impl Pax {
    /// Records are `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
    fn parse(&mut self, mut data: &[u8], offset: u64) -> Result<(), DriverError> {
        let bad = |why: &str| invalid(offset, format!("malformed PAX record: {why}"));
        while !data.is_empty() {
            let space = data.iter().position(|&c| c == b' ').ok_or_else(|| bad("no length field"))?;
            let len: usize = std::str::from_utf8(&data[..space])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("length is not a decimal number"))?;
            if len <= space + 1 || len > data.len() {
                return Err(bad("length does not fit the header"));
            }
            let record = &data[space + 1..len];
            data = &data[len..];
            let record = record.strip_suffix(b"\n").ok_or_else(|| bad("record does not end in a newline"))?;
            let eq = record.iter().position(|&c| c == b'=').ok_or_else(|| bad("record has no '='"))?;
            self.record(&record[..eq], &record[eq + 1..], offset)?;
        }
        Ok(())
    }

    fn record(&mut self, key: &[u8], value: &[u8], offset: u64) -> Result<(), DriverError> {
        if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
            self.schily_records.insert(name.to_vec(), value.to_vec());
        }
        // Go keeps the header's own field when a record's value is empty, and drops empty
        // xattrs the same way; we follow it so listings agree.
        if value.is_empty() {
            return Ok(());
        }
        let text = || {
            std::str::from_utf8(value).map_err(|_| {
                invalid(offset, format!("PAX record {} is not UTF-8", String::from_utf8_lossy(key)))
            })
        };
        let decimal = |what: &str| -> Result<i64, DriverError> {
            text()?
                .parse::<i64>()
                .map_err(|_| invalid(offset, format!("PAX record {what} is not a decimal number")))
        };
        match key {
            b"path" => self.path = Some(value.to_vec()),
            b"linkpath" => self.linkpath = Some(value.to_vec()),
            b"uname" => self.uname = Some(value.to_vec()),
            b"gname" => self.gname = Some(value.to_vec()),
            b"uid" => self.uid = Some(decimal("uid")?),
            b"gid" => self.gid = Some(decimal("gid")?),
            b"size" => {
                let size = decimal("size")?;
                if size < 0 {
                    return Err(invalid(offset, format!("PAX size is negative ({size})")));
                }
                self.size = Some(size as u64);
            }
            b"mtime" | b"atime" | b"ctime" => {
                let what = String::from_utf8_lossy(key);
                let time = parse_pax_time(text()?)
                    .ok_or_else(|| invalid(offset, format!("PAX record {what} is not a decimal time")))?;
                match key {
                    b"mtime" => self.mtime = Some(time),
                    b"atime" => self.atime = Some(time),
                    _ => self.ctime = Some(time),
                }
            }
            _ => {
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    self.schily_xattrs.insert(name.to_vec(), value.to_vec());
                } else if let Some(name) = key.strip_prefix(b"LIBARCHIVE.xattr.") {
                    let name = percent_decode(name)
                        .ok_or_else(|| invalid(offset, "LIBARCHIVE.xattr name has a bad %-escape"))?;
                    let value = base64::engine::general_purpose::GeneralPurpose::new(
                        &base64::alphabet::STANDARD,
                        base64::engine::GeneralPurposeConfig::new()
                            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
                    )
                    .decode(value)
                    .map_err(|e| invalid(offset, format!("LIBARCHIVE.xattr value is not base64: {e}")))?;
                    self.libarchive_xattrs.insert(name, value);
                } else if key.starts_with(b"GNU.sparse.") {
                    self.sparse = true;
                }
            }
        }
        Ok(())
    }

    fn apply(self, header: &mut Header) {
        if let Some(v) = self.path {
            header.name = v;
        }
        if let Some(v) = self.linkpath {
            header.linkname = v;
        }
        if let Some(v) = self.size {
            header.size = v;
        }
        if let Some(v) = self.uid {
            header.uid = v;
        }
        if let Some(v) = self.gid {
            header.gid = v;
        }
        if let Some(v) = self.uname {
            header.uname = v;
        }
        if let Some(v) = self.gname {
            header.gname = v;
        }
        if let Some((secs, nanos)) = self.mtime {
            header.mtime = secs;
            header.mtime_nanos = nanos;
        }
        if self.atime.is_some() {
            header.atime = self.atime;
        }
        if self.ctime.is_some() {
            header.ctime = self.ctime;
        }
        header.xattrs = self.libarchive_xattrs;
        header.xattrs.extend(self.schily_xattrs);
        header.schily_xattrs = self.schily_records;
        header.gnu_sparse |= self.sparse;
    }
}

/// `"<secs>[.<fraction>]"`, possibly negative, as (seconds rounded down, nanoseconds).
fn parse_pax_time(s: &str) -> Option<(i64, u32)> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let whole: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut digits = frac.as_bytes()[..frac.len().min(9)].to_vec();
    digits.resize(9, b'0');
    let nanos: u32 = std::str::from_utf8(&digits).ok()?.parse().ok()?;
    if secs.starts_with('-') && nanos > 0 {
        Some((whole.checked_sub(1)?, 1_000_000_000 - nanos))
    } else {
        Some((whole, nanos))
    }
}

fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each entry with its payload and padding.
    type Read3 = (Entry, Vec<u8>, Vec<u8>);

    fn entries(data: &[u8]) -> Result<Vec<Read3>, DriverError> {
        let mut tr = TarReader::new(data);
        let mut out = Vec::new();
        while let Some(e) = tr.next_entry()? {
            let mut payload = Vec::new();
            let mut buf = [0u8; 1000];
            loop {
                let n = tr.read_payload(&mut buf)?;
                if n == 0 {
                    break;
                }
                payload.extend_from_slice(&buf[..n]);
            }
            let padding = tr.read_padding()?.to_vec();
            out.push((e, payload, padding));
        }
        Ok(out)
    }

    /// Re-assembles the archive from raw headers, payloads and padding.
    fn reassemble(list: &[Read3]) -> Vec<u8> {
        let mut out = Vec::new();
        for (e, payload, padding) in list {
            out.extend_from_slice(&e.raw_header);
            out.extend_from_slice(payload);
            out.extend_from_slice(padding);
        }
        out
    }

    fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
        let body = key.len() + value.len() + 3;
        let mut len = body + body.to_string().len();
        if len.to_string().len() != body.to_string().len() {
            len += 1;
        }
        let mut rec = format!("{len} {key}=").into_bytes();
        rec.extend_from_slice(value);
        rec.push(b'\n');
        assert_eq!(rec.len(), len);
        rec
    }

    fn file_header(name: &str, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        h
    }

    fn with_checksum(mut block: [u8; 512]) -> [u8; 512] {
        block[148..156].fill(b' ');
        let (sum, _) = checksums(&block);
        block[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        block
    }

    #[test]
    fn reads_every_kind_and_keeps_raw_bytes() {
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("{}/file.txt", "d".repeat(150));
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o4755);
        h.set_uid(3_000_000); // beyond 7 octal digits: base-256
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, &long, &b"hello"[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        let target = format!("/{}", "t".repeat(120));
        b.append_link(&mut h, "link", &target).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Char);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_size(0);
        b.append_data(&mut h, "dev/null", io::empty()).unwrap();
        let data = b.into_inner().unwrap();

        let list = entries(&data).unwrap();
        assert_eq!(list.len(), 3);
        let (e, payload, _) = &list[0];
        assert_eq!(e.header.name, long.as_bytes());
        assert_eq!(e.header.entry_type, EntryType::Regular);
        assert_eq!(e.header.uid, 3_000_000);
        assert_eq!(e.header.mode, 0o4755);
        assert_eq!(e.header.mtime, 1_700_000_000);
        assert_eq!(payload, b"hello");
        assert!(e.raw_header.len() > 512, "GNU long name header must be part of the raw bytes");
        assert_eq!(list[1].0.header.linkname, target.as_bytes());
        assert_eq!(list[1].0.header.entry_type, EntryType::Symlink);
        assert_eq!((list[2].0.header.dev_major, list[2].0.header.dev_minor), (1, 3));
        assert_eq!(list[2].0.header.entry_type, EntryType::Char);
        // Everything but the end-of-archive blocks is reproduced exactly.
        assert_eq!(reassemble(&list), data[..data.len() - 1024]);
        assert_eq!(list[1].0.offset as usize, list[0].0.raw_header.len() + 512);
    }

    #[test]
    fn pax_records_override_header_fields() {
        let long = "p/".repeat(150) + "name";
        let mut records = Vec::new();
        records.extend(pax_record("path", long.as_bytes()));
        records.extend(pax_record("size", b"3"));
        records.extend(pax_record("uid", b"4000000000"));
        records.extend(pax_record("gid", b"77"));
        records.extend(pax_record("uname", b"someone"));
        records.extend(pax_record("mtime", b"1234567890.75"));
        records.extend(pax_record("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"));
        records.extend(pax_record("LIBARCHIVE.xattr.user.a%3Db", b"dmFsdWU")); // "value", unpadded
        records.extend(pax_record("LIBARCHIVE.xattr.security.capability", b"AAAA"));
        records.extend(pax_record("SCHILY.xattr.user.empty", b""));
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_path("PaxHeaders/x").unwrap();
        h.set_size(records.len() as u64);
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_cksum();
        b.append(&h, &records[..]).unwrap();
        // The ustar size field says 99 but the PAX size (3) wins.
        let mut h = file_header("short", 99);
        h.set_size(99);
        h.set_cksum();
        let mut data = b.into_inner().unwrap();
        data.truncate(data.len() - 1024); // drop the builder's end-of-archive marker
        data.extend_from_slice(h.as_bytes());
        data.extend_from_slice(b"abc");
        data.extend_from_slice(&[0; 509]);
        data.extend_from_slice(&[0; 1024]);

        let list = entries(&data).unwrap();
        assert_eq!(list.len(), 1);
        let hdr = &list[0].0.header;
        assert_eq!(hdr.name, long.as_bytes());
        assert_eq!(hdr.size, 3);
        assert_eq!(list[0].1, b"abc");
        assert_eq!(hdr.uid, 4_000_000_000);
        assert_eq!(hdr.gid, 77);
        assert_eq!(hdr.uname, b"someone");
        assert_eq!((hdr.mtime, hdr.mtime_nanos), (1_234_567_890, 750_000_000));
        assert_eq!(hdr.xattrs.get(&b"security.capability"[..]).unwrap(), b"\x01\x00\x00\x02");
        assert_eq!(hdr.xattrs.get(&b"user.a=b"[..]).unwrap(), b"value");
        assert!(!hdr.xattrs.contains_key(&b"user.empty"[..]));
        assert_eq!(list[0].0.raw_header.len(), 512 + records.len().div_ceil(512) * 512 + 512);
    }

    #[test]
    fn access_and_change_times_and_raw_schily_records_as_go_reads_them() {
        let mut records = pax_record("atime", b"1600000000.5");
        records.extend(pax_record("ctime", b"1600000001"));
        records.extend(pax_record("SCHILY.xattr.user.empty", b""));
        records.extend(pax_record("SCHILY.xattr.user.set", b"v"));
        records.extend(pax_record("LIBARCHIVE.xattr.user.lib", b"dmFsdWU="));
        let mut b = tar::Builder::new(Vec::new());
        let mut x = tar::Header::new_ustar();
        x.set_path("PaxHeaders/f").unwrap();
        x.set_entry_type(tar::EntryType::XHeader);
        x.set_size(records.len() as u64);
        x.set_cksum();
        b.append(&x, &records[..]).unwrap();
        b.append_data(&mut file_header("f", 1), "f", &b"x"[..]).unwrap();
        // GNU headers carry times of their own; zero fields mean "not recorded".
        let mut gnu = tar::Header::new_gnu();
        gnu.set_size(0);
        gnu.set_mode(0o644);
        gnu.as_gnu_mut().unwrap().set_atime(1_500_000_000);
        b.append_data(&mut gnu, "g", io::empty()).unwrap();
        let mut plain_gnu = tar::Header::new_gnu();
        plain_gnu.set_size(0);
        b.append_data(&mut plain_gnu, "h", io::empty()).unwrap();
        let data = b.into_inner().unwrap();

        let list = entries(&data).unwrap();
        let f = &list[0].0.header;
        assert_eq!(f.atime, Some((1_600_000_000, 500_000_000)));
        assert_eq!(f.ctime, Some((1_600_000_001, 0)));
        let schily: Vec<(&[u8], &[u8])> = f.schily_xattrs.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        assert_eq!(schily, [(&b"user.empty"[..], &b""[..]), (b"user.set", b"v")]);
        assert!(!f.xattrs.contains_key(&b"user.empty"[..]));
        assert!(f.xattrs.contains_key(&b"user.lib"[..]));
        assert_eq!((list[1].0.header.atime, list[1].0.header.ctime), (Some((1_500_000_000, 0)), None));
        assert_eq!((list[2].0.header.atime, list[2].0.header.ctime), (None, None));
        assert!(!f.after_global_header);

        let mut bad = pax_record("ctime", b"yesterday");
        bad.extend_from_slice(&[0; 512]);
        let mut x = tar::Header::new_ustar();
        x.set_path("PaxHeaders/f").unwrap();
        x.set_entry_type(tar::EntryType::XHeader);
        x.set_size(bad.len() as u64 - 512);
        x.set_cksum();
        let mut data = x.as_bytes().to_vec();
        data.extend_from_slice(&bad[..bad.len() - 512]);
        data.resize(1024, 0);
        data.extend_from_slice(file_header("f", 0).as_bytes());
        match entries(&data) {
            Err(DriverError::InvalidTar { why, .. }) => assert!(why.contains("ctime"), "{why}"),
            other => panic!("expected InvalidTar, got {other:?}"),
        }
    }

    #[test]
    fn the_rest_after_the_end_marker_can_be_read() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut file_header("f", 3), "f", &b"abc"[..]).unwrap();
        let mut data = b.into_inner().unwrap();
        data.extend_from_slice(b"trailing bytes");
        let mut tr = TarReader::new(&data[..]);
        tr.next_entry().unwrap();
        let before = tr.position();
        assert!(tr.next_entry().unwrap().is_none());
        assert_eq!(tr.position() - before, 512 + 1024, "payload, padding and the end marker");
        let mut rest = Vec::new();
        tr.into_rest().read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"trailing bytes");
    }

    #[test]
    fn global_pax_headers_are_kept_but_not_applied() {
        let records = pax_record("uname", b"global-user");
        let mut g = tar::Header::new_ustar();
        g.set_path("pax_global_header").unwrap();
        g.set_entry_type(tar::EntryType::XGlobalHeader);
        g.set_size(records.len() as u64);
        g.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&g, &records[..]).unwrap();
        b.append_data(&mut file_header("f", 2), "f", &b"hi"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let list = entries(&data).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].0.header.name, b"f");
        assert!(list[0].0.header.uname.is_empty(), "Go's reader ignores global records; so do we");
        assert!(list[0].0.header.after_global_header);
        assert_eq!(list[0].0.raw_header.len(), 3 * 512);
        assert_eq!(reassemble(&list), data[..data.len() - 1024]);
    }

    #[test]
    fn negative_pax_times_round_down() {
        assert_eq!(parse_pax_time("-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time("-0.25"), Some((-1, 750_000_000)));
        assert_eq!(parse_pax_time("12"), Some((12, 0)));
        assert_eq!(parse_pax_time("1.1234567891"), Some((1, 123_456_789)));
        assert_eq!(parse_pax_time("1.x"), None);
    }

    #[test]
    fn base256_numbers() {
        let mut field = [0u8; 12];
        field[0] = 0x80;
        field[4..].copy_from_slice(&(10u64 << 30).to_be_bytes());
        assert_eq!(parse_numeric(&field), Some(10 << 30));
        assert_eq!(parse_numeric(&[0xff; 8]), Some(-1));
        assert_eq!(parse_numeric(b"0000644\0"), Some(0o644));
        assert_eq!(parse_numeric(b"  644 \0\0"), Some(0o644));
        assert_eq!(parse_numeric(b"\0\0\0\0\0\0\0\0"), Some(0));
        assert_eq!(parse_numeric(b"00008\0\0\0"), None);

        // A ustar header with a base-256 size of 600 bytes.
        let mut block = file_header("big", 0).as_bytes().to_owned();
        block[124..136].fill(0);
        block[124] = 0x80;
        block[134..136].copy_from_slice(&600u16.to_be_bytes());
        let mut data = with_checksum(block).to_vec();
        data.extend(vec![7u8; 600]);
        data.extend(vec![0u8; 424 + 1024]);
        let list = entries(&data).unwrap();
        assert_eq!(list[0].0.header.size, 600);
        assert_eq!(list[0].1, vec![7u8; 600]);
    }

    #[test]
    fn old_style_directories_and_end_markers() {
        let mut block = [0u8; 512];
        block[..4].copy_from_slice(b"dir/");
        block[100..108].copy_from_slice(b"000755 \0");
        block[124..136].copy_from_slice(b"00000000000\0");
        let block = with_checksum(block);
        // V7 header, then end of input without any zero block.
        let list = entries(&block).unwrap();
        assert_eq!(list[0].0.header.entry_type, EntryType::Directory);
        // One zero block then end of input.
        let mut data = block.to_vec();
        data.extend_from_slice(&[0; 512]);
        assert_eq!(entries(&data).unwrap().len(), 1);
        // Trailing bytes after the end-of-archive marker are not read as entries.
        data.extend_from_slice(&[0; 512]);
        data.extend_from_slice(&block);
        assert_eq!(entries(&data).unwrap().len(), 1);
        assert_eq!(entries(&[]).unwrap().len(), 0);
    }

    #[test]
    fn ustar_header_round_trips() {
        let mut data = ustar_header("stargz.index.json", b'0', 3, 0o644).to_vec();
        data.extend_from_slice(b"{}\n");
        data.extend_from_slice(&[0; 509]);
        let list = entries(&data).unwrap();
        assert_eq!(list[0].0.header.name, b"stargz.index.json");
        assert_eq!(list[0].0.header.mode, 0o644);
        assert_eq!(list[0].1, b"{}\n");
        let big = ustar_header("big", b'0', 20 << 30, 0o644);
        assert_eq!(parse_numeric(&big[124..136]), Some(20 << 30));
    }

    fn expect_invalid(data: &[u8], needle: &str) -> u64 {
        match entries(data) {
            Err(DriverError::InvalidTar { offset, why }) => {
                assert!(why.contains(needle), "error {why:?} should mention {needle:?}");
                offset
            }
            other => panic!("expected InvalidTar mentioning {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn corrupt_input_is_reported_with_offset() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut file_header("a", 3), "a", &b"abc"[..]).unwrap();
        b.append_data(&mut file_header("b", 700), "b", &[1u8; 700][..]).unwrap();
        let good = b.into_inner().unwrap();

        let mut bad = good.clone();
        bad[1024 + 10] ^= 0x55; // inside the second header's name
        assert_eq!(expect_invalid(&bad, "checksum mismatch"), 1024);

        expect_invalid(&good[..1024 + 512 + 100], "ends inside an entry's payload");
        expect_invalid(&good[..1024 + 200], "ends inside a header block");
        expect_invalid(&good[..1024 + 512 + 700 + 10], "ends inside the padding");

        let mut zero_then_data = good[..1024].to_vec();
        zero_then_data.extend_from_slice(&[0; 512]);
        zero_then_data.extend_from_slice(&good[1024..1536]);
        expect_invalid(&zero_then_data, "single zero block");

        let mut huge = tar::Header::new_ustar();
        huge.set_path("PaxHeaders/x").unwrap();
        huge.set_entry_type(tar::EntryType::XHeader);
        huge.set_size(64 << 20);
        huge.set_cksum();
        expect_invalid(huge.as_bytes(), "limit is");

        let mut neg = file_header("neg", 0).as_bytes().to_owned();
        neg[124..136].fill(0xff);
        expect_invalid(&with_checksum(neg), "negative size");

        let mut pax = tar::Header::new_ustar();
        pax.set_path("PaxHeaders/x").unwrap();
        pax.set_entry_type(tar::EntryType::XHeader);
        pax.set_size(10);
        pax.set_cksum();
        let mut data = pax.as_bytes().to_vec();
        data.extend_from_slice(b"99 path=x\n");
        data.extend_from_slice(&[0; 502]);
        data.extend_from_slice(file_header("f", 0).as_bytes());
        expect_invalid(&data, "malformed PAX record");

        // Payload reads past what a caller asked for are refused, not silently truncated.
        let mut tr = TarReader::new(&good[..]);
        tr.next_entry().unwrap();
        assert!(tr.read_payload_exact(&mut [0u8; 4]).is_err());
        // Going on without reading a payload skips it.
        let mut tr = TarReader::new(&good[..]);
        tr.next_entry().unwrap();
        assert_eq!(tr.next_entry().unwrap().unwrap().header.name, b"b");
        assert!(tr.next_entry().unwrap().is_none());
        // The `Read` view stops at the end of the payload.
        let mut tr = TarReader::new(&good[..]);
        tr.next_entry().unwrap();
        let mut payload = Vec::new();
        tr.payload().read_to_end(&mut payload).unwrap();
        assert_eq!(payload, b"abc");
    }

    #[test]
    fn payload_without_padding_at_end_is_padded_with_zeros() {
        let mut data = file_header("a", 3).as_bytes().to_vec();
        data.extend_from_slice(b"abc");
        let list = entries(&data).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].2, vec![0u8; 509]);
    }
}
