//! What packagers rely on: `--version` names the version and commit.

use std::path::Path;
use std::process::Command;

/// The commit `build.rs` should have recorded: `ACCEL_GIT_COMMIT` when the build was given one,
/// else HEAD's short hash in a git checkout of this crate, else `unknown`.
fn expected_commit() -> String {
    if let Ok(c) = std::env::var("ACCEL_GIT_COMMIT").map(|c| c.trim().to_string()) {
        if !c.is_empty() {
            return c;
        }
    }
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_string())
    };
    match git(&["rev-parse", "--show-toplevel"]) {
        Some(top) if Path::new(&top).canonicalize().unwrap() == Path::new(dir).canonicalize().unwrap() => {
            git(&["rev-parse", "--short", "HEAD"]).expect("git rev-parse --short HEAD")
        }
        _ => "unknown".into(),
    }
}

#[test]
fn version_names_version_and_commit() {
    let commit = expected_commit();
    for (name, bin) in [("accelctl", env!("CARGO_BIN_EXE_accelctl")), ("acceld", env!("CARGO_BIN_EXE_acceld"))] {
        let out = Command::new(bin).arg("--version").output().unwrap();
        assert!(out.status.success(), "{name} --version failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text, format!("{name} {} ({commit})\n", env!("CARGO_PKG_VERSION")));
        if commit != "unknown" {
            assert!(commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit()), "{text:?}");
        }
    }
}
