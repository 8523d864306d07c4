//! Plain recompression: the source tar, byte for byte, as zstd, as gzip at another level, or
//! uncompressed. The target decompresses to the source, so `rootfs.diff_ids` stay as they are.
//!
//! Compression runs on several threads: the stream is cut into fixed-size pieces, each
//! compressed on its own as a gzip member or zstd frame, and written in order. Every gzip and
//! zstd reader reads such concatenations as one stream (gzip's multi-member files, zstd's
//! multi-frame files); the windows of both formats are smaller than a piece, so the cuts cost
//! almost nothing in size.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use super::members::{Codec, Gzip, MemberSink, Members, Zstd, IN_FLIGHT_BUDGET_BYTES};
use super::{compression, Driver, DriverError, DriverKind, LayerOutput};
use crate::oci::media_types;

/// zstd's own default level, as containerd and the zstd tool use it.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Beyond this, zstd's "ultra" levels want windows far larger than a piece.
pub const MAX_ZSTD_LEVEL: i32 = 19;
/// gzip at its smallest as gzip tools know it: recompressing is mostly done to shrink.
pub const DEFAULT_GZIP_LEVEL: u32 = 9;
/// libdeflate's levels 10 to 12 are slower still and a little smaller.
pub const MAX_GZIP_LEVEL: u32 = 12;

/// Uncompressed bytes per zstd frame.
const ZSTD_PIECE_BYTES: usize = 4 << 20;
/// Uncompressed bytes per gzip member; deflate looks back only 32 KiB.
const GZIP_PIECE_BYTES: usize = 1 << 20;
/// Source bytes read at a time.
const READ_BYTES: usize = 256 << 10;

/// Options of the `zstd` driver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZstdOptions {
    /// zstd level, 1 (fastest) to 19 (smallest); 3 is zstd's default.
    pub compression_level: i32,
}

impl Default for ZstdOptions {
    fn default() -> Self {
        ZstdOptions { compression_level: DEFAULT_ZSTD_LEVEL }
    }
}

/// Options of the `gzip` driver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GzipOptions {
    /// gzip level, 0 (store) to 9 (smallest) as gzip knows them; 10 to 12 are smaller still and
    /// much slower.
    pub compression_level: u32,
}

impl Default for GzipOptions {
    fn default() -> Self {
        GzipOptions { compression_level: DEFAULT_GZIP_LEVEL }
    }
}

/// The `uncompressed` driver has no options; the empty object is its only valid setting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UncompressedOptions {}

/// The target compression with its level.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Zstd(i32),
    Gzip(u32),
    Uncompressed,
}

/// One of the three plain recompression drivers.
pub struct Recompress {
    target: Target,
    options: serde_json::Value,
    workers: usize,
}

impl Recompress {
    pub fn zstd(options: ZstdOptions) -> Result<Self, DriverError> {
        let level = options.compression_level;
        if !(1..=MAX_ZSTD_LEVEL).contains(&level) {
            return Err(DriverError::Options {
                driver: DriverKind::Zstd,
                why: format!("compression_level must be between 1 and {MAX_ZSTD_LEVEL}, got {level}"),
            });
        }
        Ok(Self::new(Target::Zstd(level), serde_json::to_value(&options), ZSTD_PIECE_BYTES))
    }

    pub fn gzip(options: GzipOptions) -> Result<Self, DriverError> {
        let level = options.compression_level;
        if level > MAX_GZIP_LEVEL {
            return Err(DriverError::Options {
                driver: DriverKind::Gzip,
                why: format!("compression_level must be between 0 and {MAX_GZIP_LEVEL}, got {level}"),
            });
        }
        Ok(Self::new(Target::Gzip(level), serde_json::to_value(&options), GZIP_PIECE_BYTES))
    }

    pub fn uncompressed(options: UncompressedOptions) -> Result<Self, DriverError> {
        Ok(Self::new(Target::Uncompressed, serde_json::to_value(&options), 1))
    }

    fn new(target: Target, options: Result<serde_json::Value, serde_json::Error>, piece: usize) -> Self {
        // A worker holds a piece and its output; the cap keeps a many-core host within the
        // in-flight budget of the member compressor.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = cores.min((IN_FLIGHT_BUDGET_BYTES / (2 * piece)).max(1));
        Recompress { target, options: options.expect("options serialize"), workers }
    }
}

impl Driver for Recompress {
    fn kind(&self) -> DriverKind {
        match self.target {
            Target::Zstd(_) => DriverKind::Zstd,
            Target::Gzip(_) => DriverKind::Gzip,
            Target::Uncompressed => DriverKind::Uncompressed,
        }
    }

    fn version(&self) -> &str {
        "1"
    }

    fn options(&self) -> serde_json::Value {
        self.options.clone()
    }

    fn convert_layer(&self, input: &mut dyn Read, output: &mut dyn Write) -> Result<LayerOutput, DriverError> {
        let (media_type, uncompressed_size) = match self.target {
            Target::Zstd(level) => {
                let n = pieces(input, output, self.workers, ZSTD_PIECE_BYTES, || Zstd::new(level))?;
                (media_types::OCI_LAYER_ZSTD, n)
            }
            Target::Gzip(level) => {
                let n = pieces(input, output, self.workers, GZIP_PIECE_BYTES, || Gzip::new(level))?;
                (media_types::OCI_LAYER_GZIP, n)
            }
            Target::Uncompressed => {
                let n = copy(input, output)?;
                (media_types::OCI_LAYER_TAR, n)
            }
        };
        Ok(LayerOutput {
            media_type: media_type.to_string(),
            diff_id: None,
            uncompressed_size,
            annotations: Default::default(),
            state: None,
        })
    }
}

/// Writes compressed pieces straight to the output, in order.
struct Output<'a>(&'a mut dyn Write);

impl MemberSink<()> for Output<'_> {
    fn member(&mut self, compressed: &[u8], _: ()) -> Result<(), DriverError> {
        self.0.write_all(compressed).map_err(DriverError::Io)
    }
}

/// Compresses `input` in pieces of `piece` bytes on `workers` threads; returns the bytes read.
fn pieces<C: Codec>(
    input: &mut dyn Read,
    output: &mut dyn Write,
    workers: usize,
    piece: usize,
    codec: impl Fn() -> Result<C, DriverError>,
) -> Result<u64, DriverError> {
    let mut sink = Output(output);
    let mut buf = vec![0u8; READ_BYTES];
    let mut total = 0u64;
    std::thread::scope(|scope| {
        let mut members = Members::<()>::start(scope, workers, codec)?;
        loop {
            let want = (piece - members.open_len()).min(buf.len());
            let n = read_some(input, &mut buf[..want])?;
            if n == 0 {
                break;
            }
            total += n as u64;
            members.append(&buf[..n]);
            if members.open_len() >= piece {
                members.close((), &mut sink)?;
            }
        }
        // An empty source still gets one (empty) piece, so the blob is a valid stream.
        if members.open_len() > 0 || total == 0 {
            members.close((), &mut sink)?;
        }
        members.finish(&mut sink)
    })?;
    sink.0.flush()?;
    Ok(total)
}

fn copy(input: &mut dyn Read, output: &mut dyn Write) -> Result<u64, DriverError> {
    let mut buf = vec![0u8; READ_BYTES];
    let mut total = 0u64;
    loop {
        let n = read_some(input, &mut buf)?;
        if n == 0 {
            break;
        }
        output.write_all(&buf[..n])?;
        total += n as u64;
    }
    output.flush()?;
    Ok(total)
}

fn read_some(input: &mut dyn Read, buf: &mut [u8]) -> Result<usize, DriverError> {
    loop {
        match input.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(compression::driver_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compressible but not trivially so, and longer than several pieces.
    fn source(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_u32;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if i % 3 == 0 {
                    (x % 7) as u8 + b'a'
                } else {
                    b"some repeated text "[i % 19]
                }
            })
            .collect()
    }

    fn run(driver: &dyn Driver, src: &[u8]) -> (Vec<u8>, LayerOutput) {
        let mut blob = Vec::new();
        let out = driver.convert_layer(&mut &src[..], &mut blob).unwrap();
        (blob, out)
    }

    fn gunzip(blob: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(blob).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn each_target_decompresses_to_the_source() {
        for len in [0, 1, 100_000, 9 * (1 << 20) + 77] {
            let src = source(len);
            let zstd = Recompress::zstd(ZstdOptions::default()).unwrap();
            let (blob, out) = run(&zstd, &src);
            assert_eq!(out.media_type, media_types::OCI_LAYER_ZSTD);
            assert!(zstd::stream::decode_all(&blob[..]).unwrap() == src, "zstd, {len} bytes");
            assert_eq!((out.diff_id, out.uncompressed_size), (None, len as u64));
            if len > ZSTD_PIECE_BYTES {
                assert!(blob.len() < src.len() / 2, "zstd should compress this source");
            }

            let gzip = Recompress::gzip(GzipOptions::default()).unwrap();
            let (blob, out) = run(&gzip, &src);
            assert_eq!(out.media_type, media_types::OCI_LAYER_GZIP);
            assert!(gunzip(&blob) == src, "gzip, {len} bytes");
            assert_eq!((out.diff_id, out.uncompressed_size), (None, len as u64));

            let plain = Recompress::uncompressed(UncompressedOptions {}).unwrap();
            let (blob, out) = run(&plain, &src);
            assert_eq!(out.media_type, media_types::OCI_LAYER_TAR);
            assert!(blob == src, "uncompressed, {len} bytes");
            assert_eq!((out.diff_id, out.uncompressed_size), (None, len as u64));
        }
    }

    #[test]
    fn pieces_are_independent_members_and_frames() {
        let src = source(3 * ZSTD_PIECE_BYTES + 5);
        let (blob, _) = run(&Recompress::zstd(ZstdOptions::default()).unwrap(), &src);
        let mut frames = 0;
        let mut at = 0;
        while at < blob.len() {
            let size = zstd::zstd_safe::find_frame_compressed_size(&blob[at..]).unwrap();
            let piece = zstd::bulk::decompress(&blob[at..at + size], ZSTD_PIECE_BYTES).unwrap();
            assert_eq!(piece, src[frames * ZSTD_PIECE_BYTES..(src.len()).min((frames + 1) * ZSTD_PIECE_BYTES)]);
            at += size;
            frames += 1;
        }
        assert_eq!(frames, 4);
    }

    #[test]
    fn the_level_changes_the_output_not_the_content() {
        let src = source(2 << 20);
        let fast = run(&Recompress::gzip(GzipOptions { compression_level: 1 }).unwrap(), &src).0;
        let small = run(&Recompress::gzip(GzipOptions { compression_level: 9 }).unwrap(), &src).0;
        assert!(small.len() < fast.len(), "level 9 ({}) should be smaller than level 1 ({})", small.len(), fast.len());
        assert!(gunzip(&fast) == gunzip(&small));
        // gzip's header records the level class: 2 = maximum compression, 4 = fastest.
        assert_eq!((fast[8], small[8]), (4, 2));
        let z1 = run(&Recompress::zstd(ZstdOptions { compression_level: 1 }).unwrap(), &src).0;
        let z19 = run(&Recompress::zstd(ZstdOptions { compression_level: 19 }).unwrap(), &src).0;
        assert_ne!(z1, z19);
        assert_eq!(zstd::stream::decode_all(&z1[..]).unwrap(), zstd::stream::decode_all(&z19[..]).unwrap());
    }

    #[test]
    fn options_are_checked_and_named() {
        let err = DriverKind::Zstd.build(&serde_json::json!({"compression_level": 0})).err().unwrap().to_string();
        assert!(err.contains("zstd") && err.contains("between 1 and 19"), "{err}");
        let err = DriverKind::Gzip.build(&serde_json::json!({"compression_level": 13})).err().unwrap().to_string();
        assert!(err.contains("gzip") && err.contains("between 0 and 12"), "{err}");
        let err = DriverKind::Uncompressed.build(&serde_json::json!({"compression_level": 1})).err().unwrap().to_string();
        assert!(err.contains("uncompressed") && err.contains("compression_level"), "{err}");
        let err = DriverKind::Gzip.build(&serde_json::json!({"level": 5})).err().unwrap().to_string();
        assert!(err.contains("unknown field `level`"), "{err}");
        let zstd = DriverKind::Zstd.build(&serde_json::Value::Null).unwrap();
        assert_eq!(zstd.options(), serde_json::json!({"compression_level": 3}));
        assert_eq!(DriverKind::Gzip.build(&serde_json::json!({})).unwrap().options(), serde_json::json!({"compression_level": 9}));
        assert_eq!(DriverKind::Uncompressed.build(&serde_json::json!({})).unwrap().options(), serde_json::json!({}));
    }

    #[test]
    fn read_errors_surface() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::UnexpectedEof, "source cut short"))
            }
        }
        for kind in [DriverKind::Zstd, DriverKind::Gzip, DriverKind::Uncompressed] {
            let driver = kind.build(&serde_json::json!({})).unwrap();
            let err = driver.convert_layer(&mut Broken, &mut Vec::new()).unwrap_err();
            assert!(err.to_string().contains("source cut short"), "{kind}: {err}");
        }
    }
}
