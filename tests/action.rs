//! The GitHub Action (`action.yml`) run the way a runner runs it: a step's `run` line under
//! `bash --noprofile --norc -eo pipefail`, with the environment its `env:` block maps from the
//! inputs, `GITHUB_OUTPUT` and `GITHUB_STEP_SUMMARY` in temp files, against Debian's
//! `docker-registry` on loopback. What the outputs name is checked in the registry with skopeo.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fixtures::handmade_image;
use common::registry::{RegistryAuth, RegistryServer};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;
use sha2::{Digest as _, Sha256};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn action() -> Yaml {
    let text = std::fs::read_to_string(Path::new(REPO).join("action.yml")).unwrap();
    serde_yaml::from_str(&text).expect("action.yml is YAML")
}

fn step(action: &Yaml, id: &str) -> Yaml {
    action["runs"]["steps"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|s| s["id"].as_str() == Some(id))
        .unwrap_or_else(|| panic!("action.yml has no step with id {id}"))
        .clone()
}

/// The value of `${{ inputs.NAME }}`: as given, else the input's default.
fn input_value(action: &Yaml, inputs: &[(&str, &str)], name: &str) -> String {
    if let Some((_, v)) = inputs.iter().find(|(k, _)| *k == name) {
        return v.to_string();
    }
    let decl = &action["inputs"][name];
    assert!(!decl.is_null(), "action.yml uses input {name}, which it does not declare");
    decl["default"].as_str().unwrap_or("").to_string()
}

/// A step's `env:` evaluated as the runner would: `${{ inputs.NAME }}` from `inputs`, an
/// earlier step's `outputs.accelctl` as `accelctl`, other step outputs and
/// `github.action_repository` (which composite actions may leave empty) as empty, and `a || b`
/// as the first non-empty one. Other expressions fail the test, so a new one gets a rule here.
fn step_env(action: &Yaml, step: &Yaml, inputs: &[(&str, &str)], accelctl: &str) -> Vec<(String, String)> {
    let Some(env) = step["env"].as_mapping() else { return Vec::new() };
    let eval = |key: &str, term: &str| -> String {
        if let Some(name) = term.strip_prefix("inputs.") {
            input_value(action, inputs, name)
        } else if term.starts_with("steps.") && term.ends_with(".outputs.accelctl") {
            accelctl.to_string()
        } else if term.starts_with("steps.") || term == "github.action_repository" {
            String::new()
        } else {
            panic!("no rule in tests/action.rs for {term:?} in env {key}")
        }
    };
    env.iter()
        .map(|(k, v)| {
            let key = k.as_str().unwrap().to_string();
            let expr = v.as_str().unwrap().trim();
            let inner = expr
                .strip_prefix("${{")
                .and_then(|e| e.strip_suffix("}}"))
                .unwrap_or_else(|| panic!("env {key} of step {:?} is not one expression: {expr}", step["id"]));
            let value = inner.split("||").map(|term| eval(&key, term.trim())).find(|v| !v.is_empty()).unwrap_or_default();
            (key, value)
        })
        .collect()
}

/// What one run of a step left behind.
struct Run {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
    /// `$GITHUB_OUTPUT`, parsed.
    outputs: BTreeMap<String, String>,
    /// `$GITHUB_OUTPUT` as written.
    outputs_raw: String,
    summary: String,
}

impl Run {
    fn assert_success(&self) {
        assert!(self.status.success(), "step failed ({}):\nstdout:\n{}\nstderr:\n{}\nsummary:\n{}", self.status, self.stdout, self.stderr, self.summary);
    }

    fn assert_failure(&self) {
        assert!(!self.status.success(), "step succeeded but should fail:\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
    }

    fn output(&self, name: &str) -> &str {
        self.outputs.get(name).unwrap_or_else(|| panic!("no output {name}; outputs: {:?}", self.outputs))
    }
}

/// Parses `$GITHUB_OUTPUT`: `name=value` lines and `name<<DELIMITER` … `DELIMITER` blocks.
fn parse_outputs(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let (name, value) = if let Some((name, delimiter)) = line.split_once("<<") {
            let mut value = Vec::new();
            loop {
                let l = lines.next().unwrap_or_else(|| panic!("output {name}: delimiter {delimiter} never closes"));
                if l == delimiter {
                    break;
                }
                value.push(l);
            }
            (name, value.join("\n"))
        } else {
            let (name, value) = line.split_once('=').unwrap_or_else(|| panic!("bad GITHUB_OUTPUT line {line:?}"));
            (name, value.to_string())
        };
        assert!(out.insert(name.to_string(), value).is_none(), "output {name} written twice");
    }
    out
}

/// A runner's scratch space: temp dir, tool cache, home (with no docker credentials).
struct Runner {
    dir: tempfile::TempDir,
}

impl Runner {
    fn new() -> Runner {
        let dir = tempfile::tempdir().unwrap();
        for d in ["temp", "tool-cache", "home"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        Runner { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs step `id` of action.yml with `inputs` and extra environment `env`.
    fn run_step(&self, id: &str, inputs: &[(&str, &str)], env: &[(&str, &str)]) -> Run {
        let action = action();
        let step = step(&action, id);
        let run = step["run"].as_str().unwrap();
        assert!(!run.contains("${{"), "step {id}: expressions in `run` are injection risks; pass them through env");
        let output_file = self.path(&format!("output-{id}"));
        let summary_file = self.path(&format!("summary-{id}"));
        std::fs::write(&output_file, "").unwrap();
        std::fs::write(&summary_file, "").unwrap();
        let out: Output = Command::new("bash")
            .args(["--noprofile", "--norc", "-eo", "pipefail", "-c", run])
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap())
            .env("HOME", self.path("home"))
            .env("GITHUB_ACTIONS", "true")
            .env("GITHUB_ACTION_PATH", REPO)
            .env("GITHUB_OUTPUT", &output_file)
            .env("GITHUB_STEP_SUMMARY", &summary_file)
            .env("RUNNER_TEMP", self.path("temp"))
            .env("RUNNER_TOOL_CACHE", self.path("tool-cache"))
            .envs(step_env(&action, &step, inputs, env!("CARGO_BIN_EXE_accelctl")))
            .envs(env.iter().copied())
            .output()
            .expect("bash");
        let outputs_raw = std::fs::read_to_string(&output_file).unwrap();
        Run {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            outputs: parse_outputs(&outputs_raw),
            outputs_raw,
            summary: std::fs::read_to_string(&summary_file).unwrap(),
        }
    }

    fn convert(&self, inputs: &[(&str, &str)]) -> Run {
        self.run_step("convert", inputs, &[])
    }
}

/// `skopeo inspect --raw` of `reference`: the manifest's bytes.
fn raw_manifest(reference: &str, creds: Option<(&str, &str)>) -> Vec<u8> {
    let mut cmd = Command::new("skopeo");
    cmd.args(["inspect", "--raw", "--tls-verify=false"]);
    if let Some((user, password)) = creds {
        cmd.arg("--creds").arg(format!("{user}:{password}"));
    }
    let out = cmd.arg(format!("docker://{reference}")).output().expect("skopeo is needed; run scripts/test (it installs Debian's skopeo)");
    assert!(out.status.success(), "skopeo inspect {reference}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The size as the summary should show it, written independently of the script.
fn human(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Checks that the target the outputs name is in the registry with that digest and came from
/// `source_digest`, and that the summary has its table row.
fn check_target(run: &Run, expected_reference: &str, source: &str, source_digest: &str, creds: Option<(&str, &str)>) {
    let reference = run.output("reference");
    let digest = run.output("digest");
    assert_eq!(reference, expected_reference);
    assert_eq!(run.output("references"), reference);
    assert_eq!(run.output("digests"), digest);
    assert_eq!(run.output("source-digest"), source_digest);

    let result: Json = serde_json::from_str(run.output("result")).expect("output result is JSON");
    assert_eq!(result["source"], source);
    assert_eq!(result["source_digest"], source_digest);
    let targets = result["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0]["driver"], "estargz");
    assert_eq!(targets[0]["reference"], reference);
    assert_eq!(targets[0]["digest"], digest);

    let raw = raw_manifest(reference, creds);
    assert_eq!(sha256(&raw), digest, "{reference} in the registry is not the digest the outputs name");
    let manifest: Json = serde_json::from_slice(&raw).unwrap();
    assert_eq!(manifest["annotations"]["io.accel.source.digest"], source_digest);
    assert_eq!(raw_manifest(&format!("{}@{digest}", reference.rsplit_once(':').unwrap().0), creds), raw);

    let size = targets[0]["size"].as_u64().unwrap();
    let source_size = result["source_size"].as_u64().unwrap();
    let summary = &run.summary;
    assert!(summary.contains(&format!("### accel: converted `{source}`\n")), "{summary}");
    assert!(summary.contains(&format!("Source: `{source}` `{source_digest}`, {}\n", human(source_size))), "{summary}");
    assert!(summary.contains("\n| Format | Reference | Digest | Size |\n| --- | --- | --- | ---: |\n"), "{summary}");
    assert!(summary.contains(&format!("\n| estargz | `{reference}` | `{digest}` | {} |\n", human(size))), "{summary}");
    assert!(run.stdout.contains(&format!("estargz: {reference}@{digest}")), "{}", run.stdout);
}

/// The error the summary shows after a failed step.
fn summary_error(run: &Run) -> String {
    let summary = &run.summary;
    let start = summary.find("```text\n").unwrap_or_else(|| panic!("no error block in summary:\n{summary}")) + 8;
    let end = summary[start..].find("\n```").unwrap() + start;
    summary[start..end].to_string()
}

#[test]
fn converts_an_image_and_reports_it() {
    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = handmade_image().build().push(&server.host(), "app/web:1.0");
    let runner = Runner::new();

    let run = runner.convert(&[("image", &pushed.reference)]);
    run.assert_success();
    check_target(&run, &format!("{}/app/web:1.0-esgz", server.host()), &pushed.reference, &pushed.digest, None);

    // Every output the action declares is written, under the name it maps.
    let action = action();
    for (name, decl) in action["outputs"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        assert_eq!(decl["value"].as_str().unwrap(), format!("${{{{ steps.convert.outputs.{name} }}}}"));
        assert!(run.outputs.contains_key(name), "output {name} is declared but not written");
    }
    assert_eq!(run.outputs.len(), action["outputs"].as_mapping().unwrap().len(), "undeclared outputs: {:?}", run.outputs.keys());
}

#[test]
fn credentials_from_inputs_stay_secret() {
    // '$' and '${HOME}' would change if the password went through the config's ${VAR} expansion.
    let (user, password) = ("robot$ci", "pa$$w0rd:${HOME}:$x");
    let auth = RegistryAuth::Basic { user: user.into(), password: password.into() };
    let server = RegistryServer::start(auth.clone());
    let pushed = handmade_image().build().push_with_auth(&server.host(), "team/app:2.1", &auth);
    let runner = Runner::new();

    let inputs = [
        ("image", pushed.reference.as_str()),
        ("username", user),
        ("password", password),
        ("registry", &server.host()),
        ("tag-suffix", "-lazy"),
        ("options", "compression_level=6\n# smaller chunks for this image\n\n  estargz.chunk_size_bytes=1MiB  \n"),
    ];
    let run = runner.convert(&inputs);
    run.assert_success();
    let creds = Some((user, password));
    check_target(&run, &format!("{}/team/app:2.1-lazy", server.host()), &pushed.reference, &pushed.digest, creds);
    assert!(run.stdout.contains("--option compression_level=6 --option estargz.chunk_size_bytes=1MiB"), "{}", run.stdout);

    // The runner masks the password; nothing else shows it.
    for line in run.stdout.lines().filter(|l| l.contains(password)) {
        assert_eq!(line, format!("::add-mask::{password}"));
    }
    assert!(run.stdout.contains(&format!("::add-mask::{password}\n")));
    for (what, text) in [("outputs", &run.outputs_raw), ("summary", &run.summary), ("stderr", &run.stderr)] {
        assert!(!text.contains(password), "the password appears in the {what}:\n{text}");
    }
    let leftovers: Vec<_> = walk(&runner.path("temp")).into_iter().filter(|p| std::fs::read(p).is_ok_and(|b| contains(&b, password.as_bytes()))).collect();
    assert!(leftovers.is_empty(), "the password was written to {leftovers:?}");

    // The credentials are what got the step in: without them the registry refuses.
    let run = runner.convert(&[("image", &pushed.reference)]);
    run.assert_failure();
    let error = summary_error(&run);
    assert!(error.starts_with("error: "), "{error}");
    assert!(error.to_lowercase().contains("auth"), "{error}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_missing_image_fails_with_the_error_in_the_summary() {
    let server = RegistryServer::start(RegistryAuth::None);
    let runner = Runner::new();
    let image = format!("{}/nothing/here:1.0", server.host());

    let run = runner.convert(&[("image", &image)]);
    run.assert_failure();
    assert!(run.outputs.is_empty(), "a failed step wrote outputs: {:?}", run.outputs);
    assert!(run.summary.starts_with(&format!("### accel: converting `{image}` failed\n")), "{}", run.summary);
    // The summary shows accelctl's own error, which is also the last thing in the log.
    let error = summary_error(&run);
    let logged = &run.stderr[run.stderr.rfind("error: ").expect("accelctl logs its error")..];
    assert_eq!(error, logged.trim_end());
    assert!(error.contains("nothing/here"), "{error}");
    assert!(run.stdout.contains("::error title=accel convert::error: "), "{}", run.stdout);
}

#[test]
fn bad_inputs_fail_before_converting() {
    let runner = Runner::new();
    for (inputs, message) in [
        (vec![("image", "")], "the input 'image' is empty"),
        (vec![("image", "127.0.0.1:1/a:b"), ("username", "u")], "'username' is set but 'password' is empty"),
        (vec![("image", "127.0.0.1:1/a:b"), ("insecure", "good.example:5000, bad/host")], "'bad/host' in the input 'insecure'"),
        (vec![("image", "127.0.0.1:1/a:b"), ("drivers", "squashfs")], "squashfs"),
    ] {
        let run = runner.convert(&inputs);
        run.assert_failure();
        let error = summary_error(&run);
        assert!(error.contains(message), "{inputs:?}: summary error {error:?} lacks {message:?}");
        assert!(run.stderr.contains(message), "{inputs:?}: {}", run.stderr);
    }
}

#[test]
fn action_inputs_reach_the_scripts() {
    let action = action();
    let inputs: Vec<&str> = action["inputs"].as_mapping().unwrap().keys().map(|k| k.as_str().unwrap()).collect();
    let steps = action["runs"]["steps"].as_sequence().unwrap();
    let env_text: String = steps.iter().map(|s| serde_yaml::to_string(&s["env"]).unwrap()).collect();
    for name in &inputs {
        assert!(env_text.contains(&format!("inputs.{name} ")), "input {name} is declared but no step uses it");
    }
    // Every INPUT_ variable the scripts document is set by the step that runs them.
    for (script, id) in [("action-convert.sh", "convert"), ("action-install.sh", "resolve")] {
        let text = std::fs::read_to_string(Path::new(REPO).join("scripts").join(script)).unwrap();
        let env = step(&action, id)["env"].clone();
        for var in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("INPUT_")) {
            assert!(!env[var].is_null(), "{script} reads {var}, which step {id} does not set");
        }
    }
}

#[test]
fn action_scripts_pass_shellcheck() {
    let scripts: Vec<PathBuf> = ["action-convert.sh", "action-install.sh"].iter().map(|s| Path::new(REPO).join("scripts").join(s)).collect();
    let out = match Command::new("shellcheck").args(&scripts).output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run shellcheck ({e}); run scripts/test (it installs Debian's shellcheck)"),
    };
    assert!(out.status.success(), "shellcheck:\n{}", String::from_utf8_lossy(&out.stdout));
}

/// Rust's name for this machine, as release archives are named.
fn target_triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

#[test]
fn install_uses_a_given_binary_or_a_cached_build() {
    let runner = Runner::new();
    let accelctl = env!("CARGO_BIN_EXE_accelctl");

    let run = runner.run_step("resolve", &[("accelctl", accelctl)], &[]);
    run.assert_success();
    assert_eq!(run.outputs, BTreeMap::from([("accelctl".to_string(), accelctl.to_string())]));
    assert!(run.stdout.contains(&format!("accelctl {}", env!("CARGO_PKG_VERSION"))), "{}", run.stdout);

    let run = runner.run_step("resolve", &[("accelctl", "/nonexistent/accelctl")], &[]);
    run.assert_failure();
    assert!(run.stderr.contains("is not an executable"), "{}", run.stderr);

    // By default the binary is built from source, cached under a key of the source.
    let run = runner.run_step("resolve", &[], &[]);
    run.assert_success();
    let key = run.output("cache-key").to_string();
    let dir = PathBuf::from(run.output("cache-dir"));
    assert!(key.starts_with("accelctl-Linux-") && key.len() > 64, "{key}");
    assert!(dir.starts_with(runner.path("tool-cache")) && dir.ends_with(&key), "{}", dir.display());
    assert_eq!(runner.run_step("resolve", &[], &[]).output("cache-key"), key, "the key is not stable");

    // A restored cache is used as it is; nothing is built (cargo is not even on PATH).
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy(accelctl, dir.join("bin/accelctl")).unwrap();
    let run = runner.run_step(
        "build",
        &[],
        &[("CACHE_DIR", dir.to_str().unwrap()), ("PATH", "/usr/local/bin:/usr/bin:/bin")],
    );
    run.assert_success();
    assert_eq!(run.output("accelctl"), dir.join("bin/accelctl").to_str().unwrap());
    assert!(run.stdout.contains("already built"), "{}", run.stdout);
}

/// The build step's env maps the resolve step's outputs, which this test passes by hand.
#[test]
fn install_downloads_a_release_and_checks_its_checksum() {
    let runner = Runner::new();
    let releases = runner.path("releases");
    let version = "v9.8.7";
    let archive = format!("accel-{version}-{}.tar.gz", target_triple());
    let top = runner.path("stage").join(format!("accel-{version}-{}", target_triple()));
    std::fs::create_dir_all(&top).unwrap();
    std::fs::create_dir_all(releases.join(version)).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_accelctl"), top.join("accelctl")).unwrap();
    let tar = Command::new("tar")
        .arg("-czf")
        .arg(releases.join(version).join(&archive))
        .arg("-C")
        .arg(runner.path("stage"))
        .arg(top.file_name().unwrap())
        .status()
        .unwrap();
    assert!(tar.success());
    let bytes = std::fs::read(releases.join(version).join(&archive)).unwrap();
    let checksum = format!("{}  {archive}\n", hex::encode(Sha256::digest(&bytes)));
    std::fs::write(releases.join(version).join(format!("{archive}.sha256")), &checksum).unwrap();
    let base = format!("file://{}", releases.display());
    let env = [("ACCEL_RELEASE_BASE_URL", base.as_str())];

    let run = runner.run_step("resolve", &[("accelctl-version", "9.8.7"), ("accelctl-repository", "example/accel")], &env);
    run.assert_success();
    let installed = PathBuf::from(run.output("accelctl"));
    assert!(installed.starts_with(runner.path("tool-cache")), "{}", installed.display());
    let version_out = Command::new(&installed).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version_out.stdout).starts_with("accelctl "));

    // A tampered archive is refused.
    std::fs::remove_dir_all(runner.path("tool-cache")).unwrap();
    std::fs::create_dir(runner.path("tool-cache")).unwrap();
    std::fs::write(releases.join(version).join(format!("{archive}.sha256")), checksum.replace(&checksum[..8], "00000000")).unwrap();
    let run = runner.run_step("resolve", &[("accelctl-version", version), ("accelctl-repository", "example/accel")], &env);
    run.assert_failure();
    assert!(run.stderr.contains("does not match its .sha256 file"), "{}", run.stderr);
    assert!(!installed.exists());
}
