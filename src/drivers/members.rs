//! Independently compressed members (gzip members, zstd frames) made in parallel on worker
//! threads and handed back in order, with a bound on the bytes in flight.
//!
//! The caller appends uncompressed bytes and closes a member whenever the format needs a
//! compression boundary. Closed members are batched into jobs (so tiny members do not cost a
//! thread hand-off each), each member is compressed on its own by a [`Codec`], and results are
//! passed to a [`MemberSink`] strictly in the order the members were closed.

use std::collections::BTreeMap;
use std::io;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::Scope;

use crate::drivers::DriverError;

/// Receives compressed members in order, each with the metadata given when it was closed.
pub trait MemberSink<M> {
    fn member(&mut self, compressed: &[u8], meta: M) -> Result<(), DriverError>;
}

/// Compresses one member at a time; each worker thread owns one.
pub trait Codec: Send {
    /// Short name of the format, for thread names and error messages.
    const NAME: &'static str;

    /// Appends `input`, compressed as one self-contained member, to `out`.
    fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), DriverError>;
}

/// Gzip members made with libdeflate.
pub struct Gzip(libdeflater::Compressor);

impl Gzip {
    /// `level` 0 (store) to 12; gzip tools know 0 to 9.
    pub fn new(level: u32) -> Result<Self, DriverError> {
        let lvl = i32::try_from(level)
            .ok()
            .and_then(|l| libdeflater::CompressionLvl::new(l).ok())
            .ok_or_else(|| DriverError::Io(io::Error::other(format!("libdeflate has no compression level {level}"))))?;
        Ok(Gzip(libdeflater::Compressor::new(lvl)))
    }
}

impl Codec for Gzip {
    const NAME: &'static str = "gzip";

    fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), DriverError> {
        let start = out.len();
        out.resize(start + self.0.gzip_compress_bound(input.len()), 0);
        let n = self
            .0
            .gzip_compress(input, &mut out[start..])
            .map_err(|e| DriverError::Io(io::Error::other(format!("gzip compression failed: {e:?}"))))?;
        out.truncate(start + n);
        Ok(())
    }
}

/// Zstd frames, each with its content size and checksum, as libzstd writes them.
pub struct Zstd(zstd::bulk::Compressor<'static>);

impl Zstd {
    pub fn new(level: i32) -> Result<Self, DriverError> {
        let mut c = zstd::bulk::Compressor::new(level)?;
        c.set_parameter(zstd::stream::raw::CParameter::ChecksumFlag(true))?;
        Ok(Zstd(c))
    }

    /// Caps the window at `2^log` bytes, which also caps the memory of the compressor (its
    /// tables follow the window): members larger than the window compress a little worse.
    pub fn window_log(mut self, log: u32) -> Result<Self, DriverError> {
        self.0.set_parameter(zstd::stream::raw::CParameter::WindowLog(log))?;
        Ok(self)
    }
}

impl Codec for Zstd {
    const NAME: &'static str = "zstd";

    fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), DriverError> {
        let start = out.len();
        out.resize(start + zstd::zstd_safe::compress_bound(input.len()), 0);
        let n = self
            .0
            .compress_to_buffer(input, &mut out[start..])
            .map_err(|e| DriverError::Io(io::Error::other(format!("zstd compression failed: {e}"))))?;
        out.truncate(start + n);
        Ok(())
    }
}

/// A job is sent once it holds this many uncompressed bytes.
const JOB_TARGET_BYTES: usize = 1 << 20;
/// Uncompressed bytes in flight (queued, compressing, or compressed but not yet written)
/// beyond which the producer waits, once every worker has a job.
pub(super) const IN_FLIGHT_BUDGET_BYTES: usize = 64 << 20;

struct Job<M> {
    seq: u64,
    data: Vec<u8>,
    members: Vec<(usize, M)>,
}

struct Done<M> {
    seq: u64,
    input_len: usize,
    compressed: Vec<u8>,
    /// Compressed length of each member, with its metadata.
    members: Vec<(usize, M)>,
}

type JobResult<M> = Result<Done<M>, DriverError>;

pub struct Members<M> {
    data: Vec<u8>,
    members: Vec<(usize, M)>,
    open_start: usize,
    jobs: Option<SyncSender<Job<M>>>,
    results: Receiver<JobResult<M>>,
    next_seq: u64,
    next_write: u64,
    finished: BTreeMap<u64, Done<M>>,
    in_flight: usize,
    in_flight_bytes: usize,
    min_jobs: usize,
    max_jobs: usize,
}

impl<M: Send> Members<M> {
    /// Starts `workers` compression threads in `scope`, each with a codec from `codec`.
    pub fn start<'scope, C: Codec + 'scope>(
        scope: &'scope Scope<'scope, '_>,
        workers: usize,
        codec: impl Fn() -> Result<C, DriverError>,
    ) -> Result<Self, DriverError>
    where
        M: 'scope,
    {
        let workers = workers.max(1);
        // Made here, so a bad setting fails the call rather than a thread.
        let codecs = (0..workers).map(|_| codec()).collect::<Result<Vec<_>, _>>()?;
        let max_jobs = 2 * workers + 2;
        let (job_tx, job_rx) = mpsc::sync_channel::<Job<M>>(max_jobs);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (result_tx, result_rx) = mpsc::channel();
        for (i, codec) in codecs.into_iter().enumerate() {
            let jobs = Arc::clone(&job_rx);
            let results = result_tx.clone();
            std::thread::Builder::new()
                .name(format!("{}-member-{i}", C::NAME))
                .spawn_scoped(scope, move || worker(jobs, results, codec))?;
        }
        Ok(Members {
            data: Vec::with_capacity(JOB_TARGET_BYTES),
            members: Vec::new(),
            open_start: 0,
            jobs: Some(job_tx),
            results: result_rx,
            next_seq: 0,
            next_write: 0,
            finished: BTreeMap::new(),
            in_flight: 0,
            in_flight_bytes: 0,
            min_jobs: workers,
            max_jobs,
        })
    }

    /// Uncompressed bytes in the member being built.
    pub fn open_len(&self) -> usize {
        self.data.len() - self.open_start
    }

    /// The bytes of the member being built.
    pub fn open_bytes(&self) -> &[u8] {
        &self.data[self.open_start..]
    }

    pub fn append(&mut self, bytes: &[u8]) {
        self.data.extend_from_slice(bytes);
    }

    /// Appends `len` bytes produced by `fill` straight into the member buffer and returns them.
    pub fn append_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), DriverError>,
    ) -> Result<&[u8], DriverError> {
        let start = self.data.len();
        self.data.resize(start + len, 0);
        if let Err(e) = fill(&mut self.data[start..]) {
            self.data.truncate(start);
            return Err(e);
        }
        Ok(&self.data[start..])
    }

    /// Ends the member being built; `meta` comes back with it, in order, through `sink`.
    pub fn close(&mut self, meta: M, sink: &mut impl MemberSink<M>) -> Result<(), DriverError> {
        self.members.push((self.open_len(), meta));
        self.open_start = self.data.len();
        if self.data.len() >= JOB_TARGET_BYTES {
            self.send_job(sink)?;
        }
        Ok(())
    }

    /// Compresses and hands over every closed member, waiting for all of them, and takes the
    /// bytes of the open member out (it is empty afterwards). For a caller that must write
    /// something itself, after everything closed so far and in place of the open member.
    pub fn flush(&mut self, sink: &mut impl MemberSink<M>) -> Result<Vec<u8>, DriverError> {
        let open = self.data.split_off(self.open_start);
        if self.members.is_empty() {
            self.data.clear();
            self.open_start = 0;
        } else {
            self.send_job(sink)?;
        }
        while self.next_write < self.next_seq {
            self.wait_one(sink)?;
        }
        Ok(open)
    }

    /// Compresses and hands over every closed member. Bytes appended after the last `close`
    /// are dropped, so callers close first.
    pub fn finish(mut self, sink: &mut impl MemberSink<M>) -> Result<(), DriverError> {
        debug_assert_eq!(self.open_len(), 0, "finish with an open member");
        if !self.members.is_empty() {
            self.send_job(sink)?;
        }
        self.jobs = None;
        while self.next_write < self.next_seq {
            self.wait_one(sink)?;
        }
        Ok(())
    }

    fn send_job(&mut self, sink: &mut impl MemberSink<M>) -> Result<(), DriverError> {
        let mut data = std::mem::replace(&mut self.data, Vec::with_capacity(JOB_TARGET_BYTES));
        data.truncate(self.open_start);
        let job = Job { seq: self.next_seq, data, members: std::mem::take(&mut self.members) };
        self.open_start = 0;
        self.next_seq += 1;
        self.in_flight += 1;
        self.in_flight_bytes += job.data.len();
        let sent = self.jobs.as_ref().map(|tx| tx.send(job).is_ok()).unwrap_or(false);
        if !sent {
            return Err(workers_gone());
        }
        // Write whatever is already done, then wait while too much is in flight.
        while let Ok(result) = self.results.try_recv() {
            self.accept(result, sink)?;
        }
        while self.in_flight >= self.max_jobs
            || (self.in_flight_bytes > IN_FLIGHT_BUDGET_BYTES && self.in_flight > self.min_jobs)
        {
            self.wait_one(sink)?;
        }
        Ok(())
    }

    fn wait_one(&mut self, sink: &mut impl MemberSink<M>) -> Result<(), DriverError> {
        let result = self.results.recv().map_err(|_| workers_gone())?;
        self.accept(result, sink)
    }

    fn accept(&mut self, result: JobResult<M>, sink: &mut impl MemberSink<M>) -> Result<(), DriverError> {
        let done = result?;
        self.finished.insert(done.seq, done);
        while let Some(done) = self.finished.remove(&self.next_write) {
            let mut at = 0;
            for (len, meta) in done.members {
                sink.member(&done.compressed[at..at + len], meta)?;
                at += len;
            }
            self.next_write += 1;
            self.in_flight -= 1;
            self.in_flight_bytes -= done.input_len;
        }
        Ok(())
    }
}

fn workers_gone() -> DriverError {
    DriverError::Io(io::Error::other("compression threads stopped unexpectedly"))
}

fn worker<M, C: Codec>(jobs: Arc<Mutex<Receiver<Job<M>>>>, results: Sender<JobResult<M>>, mut codec: C) {
    loop {
        // The lock is held only while waiting for the next job, never while compressing.
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        // A panicking worker would leave the writer waiting for its job forever; report it.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compress(&mut codec, job)))
            .unwrap_or_else(|_| {
                Err(DriverError::Io(io::Error::other(format!("{} compression thread panicked", C::NAME))))
            });
        if results.send(result).is_err() {
            return;
        }
    }
}

fn compress<M, C: Codec>(codec: &mut C, job: Job<M>) -> JobResult<M> {
    let mut compressed = Vec::with_capacity(job.data.len() / 2 + 1024);
    let mut members = Vec::with_capacity(job.members.len());
    let mut src = 0;
    for (len, meta) in job.members {
        let before = compressed.len();
        codec.compress(&job.data[src..src + len], &mut compressed)?;
        members.push((compressed.len() - before, meta));
        src += len;
    }
    Ok(Done { seq: job.seq, input_len: job.data.len(), compressed, members })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    struct Collect(Vec<(Vec<u8>, u32)>);

    impl MemberSink<u32> for Collect {
        fn member(&mut self, compressed: &[u8], meta: u32) -> Result<(), DriverError> {
            self.0.push((compressed.to_vec(), meta));
            Ok(())
        }
    }

    /// Sizes vary so jobs finish out of order across four workers.
    fn sizes() -> Vec<usize> {
        (0..400).map(|i| (i * 7919) % 300_000 + 1).collect()
    }

    fn fill_and_close<C: Codec>(codec: impl Fn() -> Result<C, DriverError>) -> Vec<(Vec<u8>, u32)> {
        let mut sink = Collect(Vec::new());
        std::thread::scope(|s| {
            let mut m = Members::<u32>::start(s, 4, codec).unwrap();
            for (i, &size) in sizes().iter().enumerate() {
                let byte = (i % 251) as u8;
                m.append_with(size, |buf| {
                    buf.fill(byte);
                    Ok(())
                })
                .unwrap();
                m.close(i as u32, &mut sink).unwrap();
            }
            m.finish(&mut sink).unwrap();
        });
        sink.0
    }

    fn check(members: &[(Vec<u8>, u32)], decompress: impl Fn(&[u8]) -> Vec<u8>) {
        let sizes = sizes();
        assert_eq!(members.len(), sizes.len());
        for (i, (compressed, meta)) in members.iter().enumerate() {
            assert_eq!(*meta as usize, i);
            let out = decompress(compressed);
            assert_eq!(out.len(), sizes[i]);
            assert!(out.iter().all(|&b| b == (i % 251) as u8));
        }
    }

    #[test]
    fn members_come_back_in_order_and_decompress_independently() {
        check(&fill_and_close(|| Gzip::new(6)), |gzip| {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(gzip).read_to_end(&mut out).unwrap();
            out
        });
        check(&fill_and_close(|| Zstd::new(3)), |frame| {
            // Exactly one frame, which says how large it is and carries a checksum.
            let size = zstd::zstd_safe::find_frame_compressed_size(frame).unwrap();
            assert_eq!(size, frame.len());
            assert_eq!(frame[4] & 0x04, 0x04, "checksum flag");
            zstd::bulk::decompress(frame, 1 << 20).unwrap()
        });
    }

    #[test]
    fn flush_writes_everything_closed_and_hands_back_the_open_member() {
        let mut sink = Collect(Vec::new());
        std::thread::scope(|s| {
            let mut m = Members::<u32>::start(s, 2, || Zstd::new(1)).unwrap();
            m.append(b"first");
            m.close(0, &mut sink).unwrap();
            m.append(b"second");
            m.close(1, &mut sink).unwrap();
            m.append(b"open");
            assert_eq!(m.open_bytes(), b"open");
            assert_eq!(m.flush(&mut sink).unwrap(), b"open");
            assert_eq!(sink.0.len(), 2, "everything closed is written by flush");
            assert_eq!(m.open_len(), 0);
            assert!(m.flush(&mut sink).unwrap().is_empty());
            m.append(b"third");
            m.close(2, &mut sink).unwrap();
            m.finish(&mut sink).unwrap();
        });
        let plain: Vec<Vec<u8>> = sink.0.iter().map(|(f, _)| zstd::bulk::decompress(f, 100).unwrap()).collect();
        assert_eq!(plain, [&b"first"[..], b"second", b"third"]);
    }

    #[test]
    fn bad_settings_fail_the_start() {
        std::thread::scope(|s| {
            assert!(Members::<u32>::start(s, 2, || Gzip::new(13)).is_err());
            assert!(Members::<u32>::start(s, 2, || Zstd::new(1000)).is_ok(), "zstd clamps levels");
        });
    }

    #[test]
    fn a_failed_fill_leaves_nothing_behind() {
        std::thread::scope(|s| {
            let mut m = Members::<u32>::start(s, 1, || Gzip::new(1)).unwrap();
            m.append(b"abc");
            let err = m.append_with(10, |_| Err(DriverError::Decompress("boom".into())));
            assert!(err.is_err());
            assert_eq!(m.open_len(), 3);
        });
    }
}
