//! One layer: the decompressed tar stream -> one Nydus data blob and the layer's bootstrap, as
//! `nydus-image create --type tar-rafs` makes them.
//!
//! nydus's tar builder reads its source from a path, so the stream reaches it through a FIFO:
//! no copy of the layer on disk. This thread feeds the FIFO (checking each tar entry on the way
//! for what nydus's tar parser cannot take) while the builder runs on its own thread. The blob
//! goes to a temporary file, as the builder writes its tail after the data; it is then copied
//! to the output and hashed: the digest is the blob id nydus put in the bootstrap.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::ScopedJoinHandle;
use std::time::Duration;

use nydus_api::ConfigV2;
use nydus_builder::attributes::Attributes;
use nydus_builder::{
    ArtifactStorage, BlobManager, BootstrapManager, BuildContext, Builder, ConversionType,
    Features, Prefetch, TarballBuilder, WhiteoutSpec,
};
use nydus_utils::digest;

use super::{NydusOptions, ANNOTATION_BLOB, MEDIA_TYPE_BLOB};
use crate::drivers::tar::{EntryType, Header, TarReader};
use crate::drivers::{DriverError, DriverKind, LayerOutput};
use crate::oci::{Digest, Hasher};

/// Chunk and inode digests, as `nydus-image create` makes them by default.
pub(super) const DIGESTER: digest::Algorithm = digest::Algorithm::Blake3;

/// What one layer's conversion keeps for the image step.
pub(super) struct LayerBootstrap {
    /// Holds the layer's bootstrap; removed when the image step is done with it.
    dir: tempfile::TempDir,
    /// The data blob's id in the bootstrap (sha256 hex of the blob), `None` when the layer holds
    /// no file data and so has no blob.
    pub blob_id: Option<String>,
}

impl LayerBootstrap {
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("bootstrap")
    }
}

pub(super) fn convert_layer(
    opts: &NydusOptions,
    input: &mut dyn Read,
    output: &mut dyn Write,
) -> Result<LayerOutput, DriverError> {
    let dir = tempfile::Builder::new().prefix("accel-nydus-").tempdir()?;
    let fifo = dir.path().join("layer.tar");
    mkfifo(&fifo)?;
    let blob_path = dir.path().join("blob");
    let boot_path = dir.path().join("bootstrap");

    let (fed, built) = std::thread::scope(|s| {
        let builder = s.spawn(|| build(opts, &fifo, &blob_path, &boot_path));
        let fed = feed(input, &fifo, &builder);
        (fed, builder.join())
    });
    // A failure of the source stream, or an entry our own check refuses (naming it), comes
    // first: the builder then only saw a cut-off stream.
    let fed = fed?;
    let blob_id = match built {
        Ok(Ok(blob_id)) => blob_id,
        Ok(Err(e)) => {
            let near = fed
                .last_entry
                .map(|n| format!(" (at or just before tar entry {n:?})"))
                .unwrap_or_default();
            return Err(DriverError::Format {
                driver: DriverKind::Nydus,
                why: format!("nydus could not build the layer{near}: {e:#}"),
            });
        }
        Err(panic) => {
            return Err(DriverError::Format {
                driver: DriverKind::Nydus,
                why: format!(
                    "nydus's builder failed on this layer: {}",
                    panic_message(&*panic)
                ),
            })
        }
    };

    let (digest, size) = copy_blob(&blob_path, output)?;
    let _ = std::fs::remove_file(&blob_path);
    if let Some(id) = &blob_id {
        if *id != digest.hex() {
            return Err(DriverError::Format {
                driver: DriverKind::Nydus,
                why: format!("nydus named the blob {id}, but the blob written is {digest}"),
            });
        }
    }
    let mut annotations = std::collections::BTreeMap::new();
    annotations.insert(ANNOTATION_BLOB.to_string(), "true".to_string());
    Ok(LayerOutput {
        media_type: MEDIA_TYPE_BLOB.to_string(),
        // A data blob is not compressed at the layer level: its diff_id is its digest.
        diff_id: Some(digest),
        uncompressed_size: size,
        annotations,
        state: Some(Box::new(LayerBootstrap { dir, blob_id })),
    })
}

/// Runs nydus's tar builder as `nydus-image create --type tar-rafs` does.
fn build(
    opts: &NydusOptions,
    source: &Path,
    blob: &Path,
    bootstrap: &Path,
) -> anyhow::Result<Option<String>> {
    // RAFS v6 needs chunks aligned to 4 KiB in the uncompressed blob (nydus-image enforces it).
    let aligned_chunk = opts.fs_version == 6;
    let mut ctx = BuildContext::new(
        String::new(),
        aligned_chunk,
        0,
        opts.compressor.algorithm(),
        DIGESTER,
        true,
        WhiteoutSpec::Oci,
        ConversionType::TarToRafs,
        source.to_path_buf(),
        Prefetch::default(),
        Some(ArtifactStorage::SingleFile(blob.to_path_buf())),
        None,
        false,
        Features::new(),
        false,
        Attributes::default(),
    );
    ctx.set_fs_version(opts.rafs_version());
    ctx.set_chunk_size(opts.chunk_size.bytes() as u32);
    let config = ConfigV2::default();
    config.internal.set_blob_accessible(true);
    ctx.set_configuration(Arc::new(config));
    let mut bootstrap_mgr = BootstrapManager::new(
        Some(ArtifactStorage::SingleFile(bootstrap.to_path_buf())),
        None,
    );
    let mut blob_mgr = BlobManager::new(DIGESTER, false);
    let out = TarballBuilder::new(ConversionType::TarToRafs).build(
        &mut ctx,
        &mut bootstrap_mgr,
        &mut blob_mgr,
    )?;
    Ok(out.blobs.into_iter().next())
}

/// How feeding the builder ended.
struct Fed {
    /// The last tar entry that went to the builder.
    last_entry: Option<String>,
}

/// Passes the source stream to the builder through the FIFO, checking each entry on the way.
fn feed(
    input: &mut dyn Read,
    fifo: &Path,
    builder: &ScopedJoinHandle<'_, anyhow::Result<Option<String>>>,
) -> Result<Fed, DriverError> {
    let Some(pipe) = open_writer(fifo, builder)? else {
        // The builder stopped before it opened its source; its error says why.
        io::copy(input, &mut io::sink())?;
        return Ok(Fed { last_entry: None });
    };
    let mut tar = TarReader::new(Tee {
        input,
        pipe: Some(pipe),
    });
    let mut last_entry = None;
    while let Some(entry) = tar.next_entry()? {
        let name = entry.header.name_lossy().into_owned();
        check_entry(&entry.header).map_err(|why| DriverError::Unsupported {
            driver: DriverKind::Nydus,
            offset: entry.offset,
            why: format!("tar entry {name:?}: {why}"),
        })?;
        last_entry = Some(name);
        io::copy(&mut tar.payload(), &mut io::sink())?;
    }
    io::copy(&mut tar.into_rest(), &mut io::sink())?;
    Ok(Fed { last_entry })
}

/// What nydus's tar parser (the `tar` crate, then nydus's own checks) refuses, found before it
/// sees the entry so the error can name it.
fn check_entry(h: &Header) -> Result<(), String> {
    let newline = |v: &[u8]| v.contains(&b'\n');
    if newline(&h.name) || newline(&h.linkname) || newline(&h.uname) || newline(&h.gname) {
        return Err(
            "a PAX header value holds a newline, which nydus's tar parser cannot read".into(),
        );
    }
    for (k, v) in h.xattrs.iter().chain(&h.schily_xattrs) {
        if newline(k) || newline(v) {
            return Err(format!(
                "the PAX value of extended attribute {:?} holds a newline, which nydus's tar parser cannot read",
                String::from_utf8_lossy(k)
            ));
        }
    }
    if h.gnu_sparse {
        return Err("sparse files are not supported by nydus".into());
    }
    if h.after_global_header {
        return Err("PAX global headers are not supported by nydus".into());
    }
    match h.entry_type {
        EntryType::Regular if h.typeflag == b'7' => {
            Err("contiguous files (type 7) are not supported by nydus".into())
        }
        EntryType::Other(flag) => Err(format!(
            "tar entry type {:?} is not supported by nydus",
            flag as char
        )),
        _ => Ok(()),
    }
}

/// Reads the source and copies what it reads into the FIFO. Once the builder stops reading (it
/// failed, or it is done) the rest is still read, so the source is checked to its end.
struct Tee<'a> {
    input: &'a mut dyn Read,
    pipe: Option<File>,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        if let Some(pipe) = &mut self.pipe {
            if pipe.write_all(&buf[..n]).is_err() {
                // The builder closed its end; its own result says why.
                self.pipe = None;
            }
        }
        Ok(n)
    }
}

fn mkfifo(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens the FIFO's write end once the builder has opened its read end; `None` when the builder
/// ended first. A blocking open would hang forever if the builder failed before opening it.
fn open_writer(
    fifo: &Path,
    builder: &ScopedJoinHandle<'_, anyhow::Result<Option<String>>>,
) -> io::Result<Option<File>> {
    loop {
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
        {
            Ok(f) => {
                let fd = f.as_raw_fd();
                // SAFETY: `fd` is an open descriptor owned by `f`.
                let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
                if flags < 0
                    || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0
                {
                    return Err(io::Error::last_os_error());
                }
                return Ok(Some(f));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if builder.is_finished() {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Copies the blob to the layer output, hashing it.
fn copy_blob(path: &Path, output: &mut dyn Write) -> io::Result<(Digest, u64)> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        // No file data in the layer: the builder wrote no blob.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Digest::of(b""), 0)),
        Err(e) => return Err(e),
    };
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        output.write_all(&buf[..n])?;
    }
    let size = hasher.len();
    Ok((hasher.finish(), size))
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "it panicked".into())
}
