//! Records the git commit the binaries are built from, for `--version`.
//!
//! `ACCEL_GIT_COMMIT` in the build environment wins (for builds from a source tarball whose
//! commit is known); otherwise `git rev-parse --short HEAD` when the crate is a git checkout;
//! otherwise `unknown`. The script reruns only when HEAD moves, not on every build.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=ACCEL_GIT_COMMIT");
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let commit = match std::env::var("ACCEL_GIT_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => git_commit(&manifest_dir).unwrap_or_else(|| "unknown".into()),
    };
    println!("cargo:rustc-env=ACCEL_GIT_COMMIT={commit}");
}

/// The short commit of HEAD, when `dir` is the top of a git work tree. Registers the files
/// whose change means a new HEAD: `HEAD` itself, the branch it points to, and `packed-refs`.
fn git_commit(dir: &Path) -> Option<String> {
    // A tarball unpacked inside some other repository must not report that repository's commit.
    let top = git(dir, &["rev-parse", "--show-toplevel"])?;
    if std::fs::canonicalize(&top).ok()? != std::fs::canonicalize(dir).ok()? {
        return None;
    }
    for name in ["HEAD", "packed-refs"] {
        if let Some(path) = git_path(dir, name).filter(|p| p.exists()) {
            // Cargo treats a missing file as always changed, which would rerun this every build.
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    if let Some(path) = git(dir, &["symbolic-ref", "-q", "HEAD"]).and_then(|branch| git_path(dir, &branch)) {
        // A branch that is only in packed-refs gets its loose file at the next commit: then
        // watch the folder it will appear in.
        let watch = if path.exists() { Some(path) } else { path.parent().filter(|p| p.is_dir()).map(Path::to_path_buf) };
        if let Some(watch) = watch {
            println!("cargo:rerun-if-changed={}", watch.display());
        }
    }
    git(dir, &["rev-parse", "--short", "HEAD"])
}

/// Where git keeps `name` (`HEAD`, `refs/heads/main`, …), which differs in linked work trees.
fn git_path(dir: &Path, name: &str) -> Option<PathBuf> {
    git(dir, &["rev-parse", "--git-path", name]).map(|p| dir.join(p))
}

/// Runs git in `dir` and returns its trimmed output, or `None` if git is missing or fails.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(dir).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}
