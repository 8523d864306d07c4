//! One source layer, decoded once, fed to every driver of a conversion at once.
//!
//! The calling thread reads the compressed blob, decompresses and hashes it, and hands the
//! same pieces to one thread per driver through bounded queues. A driver slower than the rest
//! fills its queue and holds the decoder back, so memory stays bounded by the queues whatever
//! the layer size. A driver that fails stops the decoder, which ends the other drivers' streams
//! early; the failure reported is the first real one, never the stops it caused.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::drivers::{compression, Driver, DriverError, LayerOutput};
use crate::oci::{Digest, Hasher};

/// Bytes of decoded source per piece handed to the drivers.
const PIECE_BYTES: usize = 256 << 10;
/// Pieces queued per driver: with [`PIECE_BYTES`], 2 MiB of look-ahead per driver.
const QUEUE_PIECES: usize = 8;

/// The decoded source layer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decoded {
    /// Digest of the decompressed stream, to check against the config's diff_id.
    pub diff_id: Digest,
    /// Bytes of the decompressed stream.
    pub size: u64,
}

/// Why a layer was not converted.
#[derive(Debug)]
pub(crate) enum FanoutError {
    /// The source blob could not be read or decompressed.
    Source(DriverError),
    /// The driver at this index failed.
    Driver(usize, DriverError),
}

/// Decodes `input` (a blob of `media_type`) once and converts it with every driver, driver `i`
/// writing to `outputs[i]`. Returns the decoded stream's digest and size, and per driver what
/// it reported with its output handed back (flushed).
pub(crate) fn convert_all<W: Write + Send>(
    input: impl Read,
    media_type: &str,
    drivers: &[Arc<dyn Driver>],
    outputs: Vec<W>,
) -> Result<(Decoded, Vec<(LayerOutput, W)>), FanoutError> {
    assert_eq!(drivers.len(), outputs.len(), "one output per driver");
    let stop = AtomicBool::new(false);
    let first_failure = OnceLock::new();
    std::thread::scope(|scope| {
        let mut queues = Vec::with_capacity(drivers.len());
        let mut threads = Vec::with_capacity(drivers.len());
        for (i, (driver, output)) in drivers.iter().zip(outputs).enumerate() {
            let (tx, rx) = mpsc::sync_channel(QUEUE_PIECES);
            queues.push(Some(tx));
            let (stop, first_failure) = (&stop, &first_failure);
            let thread = std::thread::Builder::new()
                .name(format!("convert-{}", driver.kind()))
                .spawn_scoped(scope, move || {
                    let mut input = Pieces { rx, piece: Bytes::new(), ended: false, cut: false };
                    let result = run_driver(driver.as_ref(), &mut input, output);
                    // A stream cut short is a consequence of someone else's failure.
                    if result.is_err() && !input.cut {
                        let _ = first_failure.set(i);
                        stop.store(true, Ordering::Release);
                    }
                    result
                })
                .map_err(|e| FanoutError::Source(DriverError::Io(e)))?;
            threads.push(thread);
        }
        let decoded = decode(input, media_type, &mut queues, &stop);
        drop(queues);
        let results: Vec<Result<(LayerOutput, W), DriverError>> = threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| Err(DriverError::Io(io::Error::other("driver thread panicked")))))
            .collect();
        if let Some(&i) = first_failure.get() {
            let err = results.into_iter().nth(i).and_then(Result::err).expect("the first failure is an error");
            return Err(FanoutError::Driver(i, err));
        }
        let decoded = decoded.map_err(FanoutError::Source)?;
        let mut outputs = Vec::with_capacity(results.len());
        for (i, r) in results.into_iter().enumerate() {
            outputs.push(r.map_err(|e| FanoutError::Driver(i, e))?);
        }
        Ok((decoded, outputs))
    })
}

fn run_driver<W: Write>(driver: &dyn Driver, input: &mut Pieces, output: W) -> Result<(LayerOutput, W), DriverError> {
    let mut out = BufWriter::with_capacity(1 << 20, output);
    let produced = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| driver.convert_layer(input, &mut out)))
        .unwrap_or_else(|_| Err(DriverError::Io(io::Error::other(format!("the {} driver panicked", driver.kind())))))?;
    out.flush()?;
    let output = out.into_inner().map_err(|e| e.into_error())?;
    Ok((produced, output))
}

/// Reads, decompresses and hashes the source, handing each piece to every queue still open.
/// An empty piece marks the end of the stream; a queue closed without it was cut short.
fn decode(input: impl Read, media_type: &str, queues: &mut [Option<SyncSender<Bytes>>], stop: &AtomicBool) -> Result<Decoded, DriverError> {
    let mut decoder = compression::decompressed(BufReader::with_capacity(1 << 20, input), Some(media_type))?;
    let mut hasher = Hasher::new();
    loop {
        if stop.load(Ordering::Acquire) {
            return Err(DriverError::Io(io::Error::other("stopped because a driver failed")));
        }
        let mut piece = vec![0u8; PIECE_BYTES];
        let n = fill(&mut decoder, &mut piece).map_err(compression::driver_error)?;
        if n == 0 {
            break;
        }
        piece.truncate(n);
        hasher.update(&piece);
        let piece = Bytes::from(piece);
        for queue in queues.iter_mut() {
            // A driver that returned has dropped its end: it needs no more (or it failed, and
            // `stop` ends the loop).
            if queue.as_ref().is_some_and(|tx| tx.send(piece.clone()).is_err()) {
                *queue = None;
            }
        }
    }
    for tx in queues.iter().flatten() {
        let _ = tx.send(Bytes::new());
    }
    Ok(Decoded { size: hasher.len(), diff_id: hasher.finish() })
}

/// Reads until `buf` is full or the stream ends.
fn fill(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A driver's view of the decoded stream.
struct Pieces {
    rx: Receiver<Bytes>,
    piece: Bytes,
    ended: bool,
    /// The stream stopped before its end (the decoder failed or was stopped).
    cut: bool,
}

impl Read for Pieces {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.piece.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(piece) if piece.is_empty() => self.ended = true,
                Ok(piece) => self.piece = piece,
                Err(_) => {
                    self.cut = true;
                    return Err(io::Error::other("the source layer stream stopped early"));
                }
            }
        }
        let n = buf.len().min(self.piece.len());
        buf[..n].copy_from_slice(&self.piece[..n]);
        self.piece = self.piece.slice(n..);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::DriverKind;
    use std::sync::atomic::AtomicUsize;

    fn source(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    /// A test driver: copies (optionally slowly), or fails after some bytes, or stops reading
    /// early and succeeds.
    struct Probe {
        fail_after: Option<usize>,
        stop_after: Option<usize>,
        slow: bool,
        reads: AtomicUsize,
    }

    impl Probe {
        fn copy() -> Arc<dyn Driver> {
            Arc::new(Probe { fail_after: None, stop_after: None, slow: false, reads: AtomicUsize::new(0) })
        }
    }

    impl Driver for Probe {
        fn kind(&self) -> DriverKind {
            DriverKind::Uncompressed
        }
        fn version(&self) -> &str {
            "test"
        }
        fn options(&self) -> serde_json::Value {
            serde_json::json!({})
        }
        fn convert_layer(&self, input: &mut dyn Read, output: &mut dyn Write) -> Result<LayerOutput, DriverError> {
            let mut buf = vec![0u8; 100_000];
            let mut total = 0;
            loop {
                if self.fail_after.is_some_and(|n| total >= n) {
                    return Err(DriverError::InvalidTar { offset: total as u64, why: "probe failure".into() });
                }
                if self.stop_after.is_some_and(|n| total >= n) {
                    break;
                }
                if self.slow {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                let n = input.read(&mut buf).map_err(compression::driver_error)?;
                self.reads.fetch_add(1, Ordering::Relaxed);
                if n == 0 {
                    break;
                }
                output.write_all(&buf[..n])?;
                total += n;
            }
            Ok(LayerOutput {
                media_type: "test".into(),
                diff_id: None,
                uncompressed_size: total as u64,
                annotations: Default::default(),
                state: None,
            })
        }
    }

    #[test]
    fn every_driver_gets_the_whole_stream_decoded_once() {
        let src = source(3_000_000);
        let drivers = vec![Probe::copy(), Probe::copy(), Probe::copy()];
        let (decoded, outs) = convert_all(&gzip(&src)[..], "application/vnd.oci.image.layer.v1.tar+gzip", &drivers, vec![Vec::new(); 3]).unwrap();
        assert_eq!(decoded, Decoded { diff_id: Digest::of(&src), size: src.len() as u64 });
        for (out, bytes) in outs {
            assert!(bytes == src);
            assert_eq!(out.uncompressed_size, src.len() as u64);
        }
    }

    #[test]
    fn a_driver_that_stops_early_is_not_a_failure_and_the_rest_is_still_hashed() {
        let src = source(2_000_000);
        let early = Arc::new(Probe { fail_after: None, stop_after: Some(300_000), slow: false, reads: AtomicUsize::new(0) });
        let drivers: Vec<Arc<dyn Driver>> = vec![early, Probe::copy()];
        let (decoded, outs) = convert_all(&src[..], "application/vnd.oci.image.layer.v1.tar", &drivers, vec![Vec::new(); 2]).unwrap();
        assert_eq!(decoded.diff_id, Digest::of(&src));
        assert!(outs[0].1.len() < src.len());
        assert!(outs[1].1 == src);
    }

    #[test]
    fn a_failing_driver_fails_the_layer_with_its_own_error_while_others_are_slow() {
        let src = source(20 << 20);
        let slow = Arc::new(Probe { fail_after: None, stop_after: None, slow: true, reads: AtomicUsize::new(0) });
        let failing = Arc::new(Probe { fail_after: Some(1_000_000), stop_after: None, slow: false, reads: AtomicUsize::new(0) });
        let drivers: Vec<Arc<dyn Driver>> = vec![slow.clone(), failing, Probe::copy()];
        let err = convert_all(&src[..], "application/vnd.oci.image.layer.v1.tar", &drivers, vec![Vec::new(); 3]).unwrap_err();
        match err {
            FanoutError::Driver(1, DriverError::InvalidTar { why, .. }) => assert_eq!(why, "probe failure"),
            other => panic!("expected the failing driver's error, got {other:?}"),
        }
        // The slow driver was stopped long before the end: 20 MiB in 100 kB reads is ~200.
        assert!(slow.reads.load(Ordering::Relaxed) < 100, "the slow driver read on after the failure");
    }

    #[test]
    fn a_corrupt_source_is_reported_as_such_not_as_the_drivers_cut_streams() {
        let src = source(1_000_000);
        let mut gz = gzip(&src);
        let len = gz.len();
        gz[len - 6] ^= 0xff; // CRC
        let drivers = vec![Probe::copy(), Probe::copy()];
        match convert_all(&gz[..], "application/vnd.oci.image.layer.v1.tar+gzip", &drivers, vec![Vec::new(); 2]).unwrap_err() {
            FanoutError::Source(DriverError::Decompress(why)) => assert!(why.contains("gzip"), "{why}"),
            other => panic!("expected a decompression error, got {other:?}"),
        }
    }

    #[test]
    fn a_slow_driver_bounds_how_far_the_decoder_runs_ahead() {
        struct Counting<'a>(&'a [u8], &'a AtomicUsize);
        impl Read for Counting<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.read(buf)?;
                self.1.fetch_add(n, Ordering::Relaxed);
                Ok(n)
            }
        }
        let src = source(40 << 20);
        let read = AtomicUsize::new(0);
        let stuck = Arc::new(Probe { fail_after: None, stop_after: None, slow: true, reads: AtomicUsize::new(0) });
        let drivers: Vec<Arc<dyn Driver>> = vec![stuck.clone(), Probe::copy()];
        std::thread::scope(|s| {
            let t = s.spawn(|| convert_all(Counting(&src, &read), "application/vnd.oci.image.layer.v1.tar", &drivers, vec![Vec::new(); 2]));
            std::thread::sleep(std::time::Duration::from_millis(300));
            let consumed = stuck.reads.load(Ordering::Relaxed) * 100_000;
            let ahead = read.load(Ordering::Relaxed).saturating_sub(consumed);
            // Queue, one piece in hand, one being decoded, and the 1 MiB read buffer.
            let bound = (QUEUE_PIECES + 2) * PIECE_BYTES + (1 << 20) + 100_000;
            assert!(ahead <= bound, "decoder ran {ahead} bytes ahead of the slow driver (bound {bound})");
            let (_, outs) = t.join().unwrap().unwrap();
            assert!(outs.iter().all(|(_, b)| *b == src));
        });
    }
}
