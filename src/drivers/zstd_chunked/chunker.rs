//! Content-defined chunks of a file's payload, cut where containers/storage's writer cuts them,
//! so a file shared between layers gets the same chunks (and chunk digests) from either writer.
//!
//! A bup-style rolling sum over the last 64 bytes ends a chunk after every byte where its low 16
//! bits are all ones (about every 64 KiB of varied data); there is no minimum or maximum size.
//! Every run of at least 1024 zero bytes is a chunk of its own (a "hole") and is rolled into the
//! sum without looking for cut points inside it; shorter zero runs are ordinary data.

/// Zero runs this long or longer are holes.
pub const HOLE_MIN_BYTES: u64 = 1 << 10;

const WINDOW: usize = 64;
const CHAR_OFFSET: u32 = 31;
const CUT_MASK: u32 = (1 << 16) - 1;

/// The rolling sum of bup (and Perkeep), 32-bit wrapping arithmetic throughout.
#[derive(Clone)]
pub struct RollSum {
    s1: u32,
    s2: u32,
    window: [u8; WINDOW],
    at: usize,
}

impl Default for RollSum {
    fn default() -> Self {
        RollSum {
            s1: WINDOW as u32 * CHAR_OFFSET,
            s2: WINDOW as u32 * (WINDOW as u32 - 1) * CHAR_OFFSET,
            window: [0; WINDOW],
            at: 0,
        }
    }
}

impl RollSum {
    #[inline]
    pub fn roll(&mut self, add: u8) {
        let drop = u32::from(self.window[self.at]);
        self.s1 = self.s1.wrapping_add(u32::from(add)).wrapping_sub(drop);
        self.s2 = self.s2.wrapping_add(self.s1).wrapping_sub(WINDOW as u32 * (drop + CHAR_OFFSET));
        self.window[self.at] = add;
        self.at = (self.at + 1) & (WINDOW - 1);
    }

    #[inline]
    pub fn at_cut(&self) -> bool {
        self.s2 & CUT_MASK == CUT_MASK
    }

    /// Rolls in `n` zero bytes at once.
    fn roll_zeros(&mut self, n: u64) {
        let first = n.min(WINDOW as u64);
        for _ in 0..first {
            self.roll(0);
        }
        // With a window of zeros, each further zero leaves s1 alone and adds the same amount to s2;
        // every slot holds zero, so where the window position ends up does not matter either.
        let rest = n - first;
        let step = self.s1.wrapping_sub(WINDOW as u32 * CHAR_OFFSET);
        self.s2 = self.s2.wrapping_add(step.wrapping_mul(rest as u32));
        self.at = (self.at + (rest % WINDOW as u64) as usize) & (WINDOW - 1);
    }
}

/// What the chunker finds, in payload order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Bytes of the current data chunk, as given to [`Chunker::feed`].
    Data(&'a [u8]),
    /// Zero bytes of the current data chunk that arrived in an earlier buffer (a zero run that
    /// turned out too short to be a hole).
    Zeros(u64),
    /// The current data chunk ends here.
    Cut,
    /// A hole: this many zero bytes form a chunk of their own. The data chunk before it ends.
    Hole(u64),
}

/// Splits one file's payload, fed in buffers of any size; the pieces do not depend on how the
/// payload is split into buffers.
#[derive(Default)]
pub struct Chunker {
    sum: RollSum,
    /// Zero bytes at the end of what was fed so far, not yet known to be a hole or data.
    zeros: u64,
}

impl Chunker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed<E>(&mut self, buf: &[u8], emit: &mut impl FnMut(Piece<'_>) -> Result<(), E>) -> Result<(), E> {
        let mut i = 0;
        if self.zeros > 0 {
            let lead = buf.iter().position(|&b| b != 0).unwrap_or(buf.len());
            if lead == buf.len() {
                self.zeros += lead as u64;
                return Ok(());
            }
            let run = std::mem::take(&mut self.zeros) + lead as u64;
            if run >= HOLE_MIN_BYTES {
                self.sum.roll_zeros(run);
                emit(Piece::Hole(run))?;
                i = lead;
            } else {
                // Only the part from earlier buffers is emitted here; the loop below reads the
                // zeros at the start of this buffer as data.
                self.data_zeros(run - lead as u64, emit)?;
            }
        }
        let mut start = i;
        while i < buf.len() {
            if buf[i] != 0 {
                self.sum.roll(buf[i]);
                i += 1;
                if self.sum.at_cut() {
                    emit(Piece::Data(&buf[start..i]))?;
                    emit(Piece::Cut)?;
                    start = i;
                }
                continue;
            }
            let end = buf[i..].iter().position(|&b| b != 0).map_or(buf.len(), |n| i + n);
            if end == buf.len() {
                if start < i {
                    emit(Piece::Data(&buf[start..i]))?;
                }
                self.zeros = (end - i) as u64;
                return Ok(());
            }
            let run = (end - i) as u64;
            if run >= HOLE_MIN_BYTES {
                if start < i {
                    emit(Piece::Data(&buf[start..i]))?;
                }
                self.sum.roll_zeros(run);
                emit(Piece::Hole(run))?;
                i = end;
                start = i;
                continue;
            }
            while i < end {
                self.sum.roll(0);
                i += 1;
                if self.sum.at_cut() {
                    emit(Piece::Data(&buf[start..i]))?;
                    emit(Piece::Cut)?;
                    start = i;
                }
            }
        }
        if start < buf.len() {
            emit(Piece::Data(&buf[start..]))?;
        }
        Ok(())
    }

    /// Ends the payload: zeros still pending are a hole or data.
    pub fn finish<E>(&mut self, emit: &mut impl FnMut(Piece<'_>) -> Result<(), E>) -> Result<(), E> {
        let run = std::mem::take(&mut self.zeros);
        if run >= HOLE_MIN_BYTES {
            self.sum.roll_zeros(run);
            emit(Piece::Hole(run))
        } else {
            self.data_zeros(run, emit)
        }
    }

    fn data_zeros<E>(&mut self, n: u64, emit: &mut impl FnMut(Piece<'_>) -> Result<(), E>) -> Result<(), E> {
        let mut pending = 0;
        for _ in 0..n {
            self.sum.roll(0);
            pending += 1;
            if self.sum.at_cut() {
                emit(Piece::Zeros(pending))?;
                emit(Piece::Cut)?;
                pending = 0;
            }
        }
        if pending > 0 {
            emit(Piece::Zeros(pending))?;
        }
        Ok(())
    }
}

/// Chunk lengths and kinds of a whole payload, for tests: `(length, is_hole)`.
#[cfg(test)]
pub fn chunks_of(payload: &[u8], buffer: usize) -> Vec<(u64, bool)> {
    let mut chunks: Vec<(u64, bool)> = Vec::new();
    let mut current = 0u64;
    let mut emit = |piece: Piece<'_>| -> Result<(), ()> {
        match piece {
            Piece::Data(b) => current += b.len() as u64,
            Piece::Zeros(n) => current += n,
            Piece::Cut => {
                if current > 0 {
                    chunks.push((current, false));
                    current = 0;
                }
            }
            Piece::Hole(n) => {
                if current > 0 {
                    chunks.push((current, false));
                    current = 0;
                }
                chunks.push((n, true));
            }
        }
        Ok(())
    };
    let mut c = Chunker::new();
    for part in payload.chunks(buffer.max(1)) {
        c.feed(part, &mut emit).unwrap();
    }
    c.finish(&mut emit).unwrap();
    if current > 0 {
        chunks.push((current, false));
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::testutil::Rng;

    #[test]
    fn rolling_many_zeros_at_once_equals_one_at_a_time() {
        let mut rng = Rng(7);
        for n in [0u64, 1, 63, 64, 65, 1000, 1 << 20] {
            let mut a = RollSum::default();
            for b in rng.bytes(100) {
                a.roll(b);
            }
            let mut b = a.clone();
            a.roll_zeros(n);
            for _ in 0..n {
                b.roll(0);
            }
            assert_eq!((a.s1, a.s2, a.window, a.at), (b.s1, b.s2, b.window, b.at), "{n} zeros");
        }
    }

    #[test]
    fn pieces_do_not_depend_on_buffer_sizes() {
        let mut rng = Rng(99);
        let mut payload = Vec::new();
        for i in 0..40 {
            // No zero bytes next to the runs below, which would lengthen them.
            payload.extend(rng.bytes(20_000 + i * 997).into_iter().map(|b| b.max(1)));
            // Zero runs just under, at and over the hole size, some across buffer ends.
            payload.extend(vec![0u8; [1023, 1024, 1025, 5, 70_000][i % 5]]);
        }
        let reference = chunks_of(&payload, payload.len());
        assert!(reference.len() > 40, "{} chunks", reference.len());
        for buffer in [1, 7, 512, 1023, 1024, 4096, 65_536] {
            assert_eq!(chunks_of(&payload, buffer), reference, "buffer of {buffer}");
        }
        let total: u64 = reference.iter().map(|c| c.0).sum();
        assert_eq!(total, payload.len() as u64);
        let holes: Vec<u64> = reference.iter().filter(|c| c.1).map(|c| c.0).collect();
        assert_eq!(holes, [1024, 1025, 70_000].repeat(8));
    }
}
