//! Decompression of source layers: gzip, zstd or plain tar, chosen by media type or magic bytes.

use std::fmt;
use std::io::{self, Read};

use super::DriverError;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// How a source layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Uncompressed,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression a layer media type names, or `None` when the media type does not say
    /// (unknown or vendor types); callers then go by magic bytes.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        // Parameters (`; charset=...`) never change the compression.
        let mt = media_type.split(';').next().unwrap_or("").trim();
        let layer = mt.starts_with("application/vnd.oci.image.layer.")
            || mt.starts_with("application/vnd.docker.image.rootfs.");
        // Docker names compression with a dotted suffix (`.tar.gzip`, and `.tar.zstd` as
        // containerd writes it), OCI with a structured suffix (`+gzip`).
        if mt.ends_with("+gzip") || mt.ends_with(".tar.gzip") {
            Some(Compression::Gzip)
        } else if mt.ends_with("+zstd") || mt.ends_with(".tar.zstd") {
            Some(Compression::Zstd)
        } else if layer && mt.ends_with(".tar") {
            Some(Compression::Uncompressed)
        } else {
            None
        }
    }

    /// The compression the first bytes of a blob show. A zstd skippable frame counts as zstd:
    /// zstd:chunked blobs may start with one.
    pub fn from_magic(prefix: &[u8]) -> Compression {
        if prefix.starts_with(&GZIP_MAGIC) {
            Compression::Gzip
        } else if prefix.starts_with(&ZSTD_MAGIC)
            || (prefix.len() >= 4 && prefix[0] & 0xf0 == 0x50 && prefix[1..4] == [0x2a, 0x4d, 0x18])
        {
            Compression::Zstd
        } else {
            Compression::Uncompressed
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Uncompressed => "uncompressed tar",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Opens the decompressed tar stream of a layer blob. The media type decides when it names a
/// compression, and the blob must then start with that format's magic bytes; otherwise the
/// magic bytes decide. Errors while decompressing surface as [`DriverError::Decompress`] (see
/// [`driver_error`]).
pub fn decompressed<'a, R: Read + 'a>(
    mut input: R,
    media_type: Option<&str>,
) -> Result<Box<dyn Read + 'a>, DriverError> {
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match input.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DriverError::Io(e)),
        }
    }
    let seen = Compression::from_magic(&magic[..got]);
    let format = match media_type.and_then(Compression::from_media_type) {
        None => seen,
        Some(expected) if expected == seen || (got == 0 && expected == Compression::Uncompressed) => expected,
        Some(expected) => {
            return Err(DriverError::Decompress(format!(
                "media type {} says the layer is {expected}, but the blob starts with {} ({seen})",
                media_type.unwrap_or_default(),
                hex::encode(&magic[..got]),
            )))
        }
    };
    let stream = SourceErrors(io::Cursor::new(magic).take(got as u64).chain(input));
    Ok(match format {
        Compression::Uncompressed => Box::new(stream),
        Compression::Gzip => Box::new(Decoded { inner: flate2::read::MultiGzDecoder::new(stream), format }),
        Compression::Zstd => {
            let decoder = zstd::stream::read::Decoder::new(stream)
                .map_err(|e| DriverError::Decompress(format!("cannot start the zstd decoder: {e}")))?;
            Box::new(Decoded { inner: decoder, format })
        }
    })
}

/// Turns an I/O error from a stream opened by [`decompressed`] back into the driver error it
/// carries (a decompression failure), or wraps it as plain I/O.
pub(crate) fn driver_error(e: io::Error) -> DriverError {
    if !e.get_ref().is_some_and(|inner| inner.is::<DriverError>()) {
        return DriverError::Io(e);
    }
    let kind = e.kind();
    match e.into_inner().map(|inner| inner.downcast::<DriverError>()) {
        Some(Ok(driver)) => *driver,
        Some(Err(other)) => DriverError::Io(io::Error::new(kind, other)),
        None => DriverError::Io(io::Error::from(kind)),
    }
}

/// Reads `input` to its end, so that a decompressor underneath checks its trailer (gzip CRC,
/// zstd checksum) even when the tar stream ended before the compressed data did.
pub(crate) fn drain(mut input: impl Read) -> Result<(), DriverError> {
    io::copy(&mut input, &mut io::sink()).map(drop).map_err(driver_error)
}

/// Marks errors of the compressed source itself, so [`Decoded`] can tell them from corrupt data.
struct SourceErrors<R>(R);

#[derive(Debug)]
struct SourceError(io::Error);

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl<R: Read> Read for SourceErrors<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| io::Error::new(e.kind(), SourceError(e)))
    }
}

struct Decoded<D> {
    inner: D,
    format: Compression,
}

impl<D: Read> Read for Decoded<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            if e.get_ref().is_some_and(|inner| inner.is::<SourceError>()) {
                let kind = e.kind();
                return match e.into_inner().map(|inner| inner.downcast::<SourceError>()) {
                    Some(Ok(source)) => source.0,
                    _ => io::Error::from(kind),
                };
            }
            io::Error::other(DriverError::Decompress(format!(
                "the layer is not valid {}: {e}",
                self.format
            )))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::media_types as mt;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn read_all(mut r: Box<dyn Read + '_>) -> Result<Vec<u8>, DriverError> {
        let mut out = Vec::new();
        r.read_to_end(&mut out).map_err(driver_error)?;
        Ok(out)
    }

    #[test]
    fn media_types() {
        assert_eq!(Compression::from_media_type(mt::OCI_LAYER_GZIP), Some(Compression::Gzip));
        assert_eq!(Compression::from_media_type(mt::DOCKER_LAYER_GZIP), Some(Compression::Gzip));
        assert_eq!(Compression::from_media_type(mt::DOCKER_LAYER_FOREIGN_GZIP), Some(Compression::Gzip));
        assert_eq!(Compression::from_media_type(mt::OCI_LAYER_NONDIST_GZIP), Some(Compression::Gzip));
        assert_eq!(Compression::from_media_type(mt::OCI_LAYER_ZSTD), Some(Compression::Zstd));
        assert_eq!(Compression::from_media_type(mt::OCI_LAYER_NONDIST_ZSTD), Some(Compression::Zstd));
        assert_eq!(Compression::from_media_type(mt::OCI_LAYER_TAR), Some(Compression::Uncompressed));
        assert_eq!(Compression::from_media_type(mt::OCI_LAYER_NONDIST_TAR), Some(Compression::Uncompressed));
        let docker = "application/vnd.docker.image.rootfs.diff.tar";
        assert_eq!(Compression::from_media_type(docker), Some(Compression::Uncompressed));
        assert_eq!(Compression::from_media_type(&format!("{docker}.zstd")), Some(Compression::Zstd));
        assert_eq!(Compression::from_media_type("application/octet-stream"), None);
        assert_eq!(Compression::from_media_type("application/x-tar"), None);
        assert_eq!(Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+gzip+encrypted"), None);
    }

    #[test]
    fn magic_bytes() {
        assert_eq!(Compression::from_magic(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(Compression::from_magic(&ZSTD_MAGIC), Compression::Zstd);
        assert_eq!(Compression::from_magic(&[0x50, 0x2a, 0x4d, 0x18]), Compression::Zstd);
        assert_eq!(Compression::from_magic(b"etc/"), Compression::Uncompressed);
        assert_eq!(Compression::from_magic(&[0x1f]), Compression::Uncompressed);
    }

    #[test]
    fn opens_each_format_by_magic_and_media_type() {
        let plain = b"some tar bytes".repeat(1000);
        // Two gzip members: layers made by parallel writers are often concatenations.
        let mut gz = gzip(&plain[..5000]);
        gz.extend(gzip(&plain[5000..]));
        let zst = zstd::encode_all(&plain[..], 3).unwrap();
        for media_type in [None, Some("application/x-unknown")] {
            assert_eq!(read_all(decompressed(&gz[..], media_type).unwrap()).unwrap(), plain);
            assert_eq!(read_all(decompressed(&zst[..], media_type).unwrap()).unwrap(), plain);
            assert_eq!(read_all(decompressed(&plain[..], media_type).unwrap()).unwrap(), plain);
        }
        assert_eq!(read_all(decompressed(&gz[..], Some(mt::OCI_LAYER_GZIP)).unwrap()).unwrap(), plain);
        assert_eq!(read_all(decompressed(&zst[..], Some(mt::OCI_LAYER_ZSTD)).unwrap()).unwrap(), plain);
        assert_eq!(read_all(decompressed(&plain[..], Some(mt::OCI_LAYER_TAR)).unwrap()).unwrap(), plain);
        assert!(read_all(decompressed(&[][..], Some(mt::OCI_LAYER_TAR)).unwrap()).unwrap().is_empty());
    }

    #[test]
    fn mismatch_and_corruption_are_decompress_errors() {
        let plain = b"x".repeat(10_000);
        let zst = zstd::encode_all(&plain[..], 3).unwrap();
        match decompressed(&zst[..], Some(mt::OCI_LAYER_GZIP)) {
            Err(DriverError::Decompress(why)) => {
                assert!(why.contains("gzip") && why.contains("zstd"), "{why}")
            }
            other => panic!("expected a Decompress error, got {:?}", other.map(|_| ())),
        }
        let mut gz = gzip(&plain);
        let len = gz.len();
        gz[len - 6] ^= 0xff; // CRC
        match read_all(decompressed(&gz[..], None).unwrap()) {
            Err(DriverError::Decompress(why)) => assert!(why.contains("gzip"), "{why}"),
            other => panic!("expected a Decompress error, got {other:?}"),
        }
        let mut zst = zst;
        zst.truncate(zst.len() - 3);
        assert!(matches!(read_all(decompressed(&zst[..], None).unwrap()), Err(DriverError::Decompress(_))));
    }

    #[test]
    fn source_errors_stay_io_errors() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::new(io::ErrorKind::ConnectionReset, "peer went away"));
                }
                let data = gzip(b"hello");
                let n = data.len().min(buf.len()).min(self.0);
                buf[..n].copy_from_slice(&data[..n]);
                self.0 = 0;
                Ok(n)
            }
        }
        match read_all(decompressed(Failing(12), None).unwrap()) {
            Err(DriverError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            other => panic!("expected an Io error, got {other:?}"),
        }
    }
}
