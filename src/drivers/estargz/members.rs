//! Gzip members compressed in parallel on worker threads and handed back in order, with a bound
//! on the bytes in flight.
//!
//! The caller appends uncompressed bytes and closes a member whenever the format needs a gzip
//! boundary. Closed members are batched into jobs (so tiny members do not cost a thread
//! hand-off each), each member is compressed independently with libdeflate, and results are
//! passed to a [`MemberSink`] strictly in the order the members were closed.

use std::collections::BTreeMap;
use std::io;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::Scope;

use crate::drivers::DriverError;

/// Receives compressed members in order, each with the metadata given when it was closed.
pub trait MemberSink<M> {
    fn member(&mut self, gzip: &[u8], meta: M) -> Result<(), DriverError>;
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
    gzip: Vec<u8>,
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
    /// Starts `workers` compression threads in `scope`, compressing at libdeflate `level`.
    pub fn start<'scope>(
        scope: &'scope Scope<'scope, '_>,
        workers: usize,
        level: u32,
    ) -> Result<Self, DriverError>
    where
        M: 'scope,
    {
        let workers = workers.max(1);
        let level = i32::try_from(level)
            .ok()
            .and_then(|l| libdeflater::CompressionLvl::new(l).ok())
            .ok_or_else(|| DriverError::Io(io::Error::other(format!("libdeflate has no compression level {level}"))))?;
        let max_jobs = 2 * workers + 2;
        let (job_tx, job_rx) = mpsc::sync_channel::<Job<M>>(max_jobs);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (result_tx, result_rx) = mpsc::channel();
        for i in 0..workers {
            let jobs = Arc::clone(&job_rx);
            let results = result_tx.clone();
            std::thread::Builder::new()
                .name(format!("gzip-member-{i}"))
                .spawn_scoped(scope, move || worker(jobs, results, level))?;
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
                sink.member(&done.gzip[at..at + len], meta)?;
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
    DriverError::Io(io::Error::other("gzip compression threads stopped unexpectedly"))
}

fn worker<M>(jobs: Arc<Mutex<Receiver<Job<M>>>>, results: Sender<JobResult<M>>, level: libdeflater::CompressionLvl) {
    let mut compressor = libdeflater::Compressor::new(level);
    loop {
        // The lock is held only while waiting for the next job, never while compressing.
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        // A panicking worker would leave the writer waiting for its job forever; report it.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compress(&mut compressor, job)))
            .unwrap_or_else(|_| Err(DriverError::Io(io::Error::other("gzip compression thread panicked"))));
        if results.send(result).is_err() {
            return;
        }
    }
}

fn compress<M>(c: &mut libdeflater::Compressor, job: Job<M>) -> JobResult<M> {
    let bound: usize = job.members.iter().map(|(len, _)| c.gzip_compress_bound(*len)).sum();
    let mut gzip = vec![0u8; bound];
    let mut members = Vec::with_capacity(job.members.len());
    let (mut src, mut dst) = (0, 0);
    for (len, meta) in job.members {
        let room = c.gzip_compress_bound(len);
        let n = c
            .gzip_compress(&job.data[src..src + len], &mut gzip[dst..dst + room])
            .map_err(|e| DriverError::Io(io::Error::other(format!("gzip compression failed: {e:?}"))))?;
        members.push((n, meta));
        src += len;
        dst += n;
    }
    gzip.truncate(dst);
    Ok(Done { seq: job.seq, input_len: job.data.len(), gzip, members })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    struct Collect(Vec<(Vec<u8>, u32)>);

    impl MemberSink<u32> for Collect {
        fn member(&mut self, gzip: &[u8], meta: u32) -> Result<(), DriverError> {
            self.0.push((gzip.to_vec(), meta));
            Ok(())
        }
    }

    #[test]
    fn members_come_back_in_order_and_decompress_independently() {
        // Sizes vary so jobs finish out of order across four workers.
        let sizes: Vec<usize> = (0..400).map(|i| (i * 7919) % 300_000 + 1).collect();
        let mut sink = Collect(Vec::new());
        std::thread::scope(|s| {
            let mut m = Members::<u32>::start(s, 4, 6).unwrap();
            for (i, &size) in sizes.iter().enumerate() {
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
        assert_eq!(sink.0.len(), sizes.len());
        for (i, (gzip, meta)) in sink.0.iter().enumerate() {
            assert_eq!(*meta as usize, i);
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&gzip[..]).read_to_end(&mut out).unwrap();
            assert_eq!(out.len(), sizes[i]);
            assert!(out.iter().all(|&b| b == (i % 251) as u8));
        }
    }

    #[test]
    fn a_failed_fill_leaves_nothing_behind() {
        std::thread::scope(|s| {
            let mut m = Members::<u32>::start(s, 1, 1).unwrap();
            m.append(b"abc");
            let err = m.append_with(10, |_| Err(DriverError::Decompress("boom".into())));
            assert!(err.is_err());
            assert_eq!(m.open_len(), 3);
        });
    }
}
