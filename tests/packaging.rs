//! What packagers rely on: `--version` names the version and commit; the systemd unit and
//! the container image's config agree with acceld's defaults.

use std::path::{Path, PathBuf};
use std::process::Command;

use accel::config::{Config, ServerConfig};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The commit `build.rs` should have recorded: `ACCEL_GIT_COMMIT` when the build was given one,
/// else HEAD's short hash in a git checkout of this crate, else `unknown`.
fn expected_commit() -> String {
    if let Ok(c) = std::env::var("ACCEL_GIT_COMMIT").map(|c| c.trim().to_string()) {
        if !c.is_empty() {
            return c;
        }
    }
    let dir = REPO;
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

/// `Key=value` settings of a unit file's section, in order (a key may repeat).
fn unit_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut current = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_string();
        } else if current == section {
            let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("not Key=value: {line}"));
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

fn setting<'a>(settings: &'a [(String, String)], key: &str) -> &'a str {
    let values: Vec<&str> = settings.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect();
    assert_eq!(values.len(), 1, "{key} should be set once: {values:?}");
    values[0]
}

#[test]
fn systemd_unit_runs_acceld_with_its_state_and_a_long_enough_stop_timeout() {
    let text = std::fs::read_to_string(Path::new(REPO).join("packaging/acceld.service")).unwrap();
    let service = unit_section(&text, "Service");
    assert_eq!(setting(&service, "ExecStart"), "/usr/local/bin/acceld --config /etc/accel/pipelines.yaml");
    assert_eq!(setting(&service, "User"), "accel");
    assert_eq!(setting(&service, "StateDirectory"), "accel");
    assert_eq!(setting(&service, "CacheDirectory"), "accel");
    assert_eq!(setting(&service, "Restart"), "on-failure");
    // acceld's default paths land in the two writable directories.
    assert_eq!(setting(&service, "Environment"), "XDG_DATA_HOME=%S XDG_CACHE_HOME=%C");
    assert_eq!(setting(&service, "ProtectSystem"), "strict");
    // Conversions get the grace period, then the API drains for up to 5 s and the task database
    // closes; systemd must not kill acceld before that.
    let timeout: u64 = setting(&service, "TimeoutStopSec").parse().unwrap();
    let grace = ServerConfig::default().shutdown_grace_secs;
    assert!(timeout >= grace + 15, "TimeoutStopSec={timeout} leaves too little after the {grace} s grace period");
    assert_eq!(setting(&unit_section(&text, "Install"), "WantedBy"), "multi-user.target");
}

/// `systemd-analyze verify` in a scratch root that holds the unit, the binary it starts and the
/// targets it refers to (no running systemd is needed).
#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let root = tempfile::tempdir().unwrap();
    let units = root.path().join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::create_dir_all(root.path().join("etc/systemd/system")).unwrap();
    std::fs::create_dir_all(root.path().join("usr/local/bin")).unwrap();
    let system_units = Path::new("/usr/lib/systemd/system");
    assert!(system_units.is_dir(), "{} is missing; run scripts/test (it installs Debian's systemd package)", system_units.display());
    for entry in std::fs::read_dir(system_units).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), units.join(entry.file_name())).unwrap();
        }
    }
    std::fs::copy(env!("CARGO_BIN_EXE_acceld"), root.path().join("usr/local/bin/acceld")).unwrap();
    std::fs::copy(Path::new(REPO).join("packaging/acceld.service"), root.path().join("etc/systemd/system/acceld.service")).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(format!("--root={}", root.path().display()))
        .arg("acceld.service")
        .current_dir(root.path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run systemd-analyze ({e}); run scripts/test (it installs Debian's systemd package)"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify:\n{stderr}");
}

#[test]
fn container_image_config_is_valid_and_listens_on_the_exposed_port() {
    let path: PathBuf = Path::new(REPO).join("packaging/container.yaml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.server.listen, "0.0.0.0:2077");
    assert_eq!(config.server.shutdown_grace_secs, ServerConfig::default().shutdown_grace_secs);
    let containerfile = std::fs::read_to_string(Path::new(REPO).join("packaging/Containerfile")).unwrap();
    let lines: Vec<&str> = containerfile.lines().collect();
    assert!(lines.contains(&"EXPOSE 2077"));
    assert!(lines.contains(&r#"ENTRYPOINT ["acceld"]"#));
    assert!(lines.contains(&"COPY packaging/container.yaml /etc/accel/pipelines.yaml"));
    // Everything the Containerfile copies from the build context is let in by its ignore file.
    let ignore = std::fs::read_to_string(Path::new(REPO).join("packaging/Containerfile.dockerignore")).unwrap();
    for needed in ["Cargo.toml", "Cargo.lock", "build.rs", "src/", "packaging/container.yaml"] {
        assert!(ignore.lines().any(|l| l == format!("!{needed}")), "Containerfile.dockerignore keeps out {needed}");
    }
}
