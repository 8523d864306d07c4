//! The prefetch table of the image bootstrap: which files a runtime fetches first.
//!
//! nydus's builder takes prefetch patterns only from standard input (as `nydus-image` reads them
//! from its caller), one absolute path a line. To hand it ours in-process, standard input is
//! pointed at a pipe holding them for the duration of that one call, under a lock; nothing else
//! in this program reads standard input.

use std::io::{self, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use nydus_builder::{Prefetch, PrefetchPolicy};

/// Checks one pattern as the builder will read it.
pub(super) fn check_pattern(p: &str) -> Result<(), &'static str> {
    if !p.starts_with('/') {
        return Err("is not an absolute path");
    }
    if p.contains(['\n', '\r', '\0']) {
        return Err("holds a line break or NUL");
    }
    if p.trim() != p {
        return Err("has leading or trailing white space");
    }
    Ok(())
}

/// The patterns as nydus reads them: one a line.
pub(super) fn pattern_lines(patterns: &[String]) -> String {
    patterns.iter().map(|p| format!("{p}\n")).collect()
}

static STDIN: Mutex<()> = Mutex::new(());

/// A prefetch policy for the merge: none without patterns, else the filesystem prefetch table
/// with these patterns.
pub(super) fn prefetch(patterns: &[String]) -> io::Result<Prefetch> {
    if patterns.is_empty() {
        return Ok(Prefetch::default());
    }
    let _guard = STDIN.lock().unwrap_or_else(|e| e.into_inner());
    let lines = pattern_lines(patterns);
    let (read, write) = pipe()?;
    // Patterns are small; a pipe holds 64 KiB, so this write does not block. Larger lists go
    // through a thread.
    let writer = std::thread::spawn(move || {
        let mut w = std::fs::File::from(write);
        w.write_all(lines.as_bytes())
    });
    // SAFETY: duplicating and restoring descriptor 0 with descriptors this function owns.
    // Standard input may be closed (a daemon); then it is closed again afterwards.
    let saved = match unsafe { libc::dup(0) } {
        fd if fd >= 0 => Some(unsafe { OwnedFd::from_raw_fd(fd) }),
        _ if io::Error::last_os_error().raw_os_error() == Some(libc::EBADF) => None,
        _ => return Err(io::Error::last_os_error()),
    };
    if unsafe { libc::dup2(read.as_raw_fd(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(read);
    let result = Prefetch::new(PrefetchPolicy::Fs);
    let restored = match &saved {
        Some(fd) => unsafe { libc::dup2(fd.as_raw_fd(), 0) },
        None => unsafe { libc::close(0) },
    };
    writer
        .join()
        .map_err(|_| io::Error::other("prefetch pattern writer failed"))??;
    if restored < 0 {
        return Err(io::Error::last_os_error());
    }
    result.map_err(|e| io::Error::other(format!("prefetch patterns: {e:#}")))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
