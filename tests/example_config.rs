//! The example `pipelines.yaml` at the repository root must always load.

use accel::config::{Config, Problem};

#[test]
fn example_pipelines_yaml_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let config = Config::parse(&text, "pipelines.yaml", &|_| None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.pipelines.len(), 1);
    let p = &config.pipelines[0];
    assert_eq!(p.convert[0].tag_suffix(), "-esgz");
    assert_eq!(p.platforms.len(), 2);
    // Unset variables with an empty default leave the secrets unset rather than empty.
    assert!(config.server.auth_header.is_none());
    assert!(config.registries["harbor.example.com"].auth.is_none());
    let with_env = Config::parse(&text, "pipelines.yaml", &|k| (k == "HARBOR_ROBOT_AUTH").then(|| "cm9ib3Q6cw==".to_string())).unwrap();
    assert_eq!(with_env.registries["harbor.example.com"].auth.as_ref().unwrap().expose(), "cm9ib3Q6cw==");
}

#[test]
fn a_typo_in_the_example_is_reported_with_its_path() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines.yaml");
    let text = std::fs::read_to_string(&path).unwrap().replace("compression_level:", "compresion_level:");
    let err = Config::parse(&text, "pipelines.yaml", &|_| None).unwrap_err();
    let problems: &[Problem] = err.problems();
    assert_eq!(problems.len(), 1, "{err}");
    assert_eq!(problems[0].path, "pipelines[0].convert[0].options");
    assert!(problems[0].message.contains("compresion_level"), "{err}");
}

#[test]
fn validate_counts_what_the_example_holds() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines.yaml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_accelctl")).args(["validate", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let config = Config::load(&path).unwrap();
    let (p, so, si) = (config.pipelines.len(), config.sources.len(), config.sinks.len());
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    let want = format!("ok ({p} pipeline{}, {so} source{}, {si} sink{})", plural(p), plural(so), plural(si));
    assert!(stdout.trim_end().ends_with(&want), "{stdout:?} does not end with {want:?}");
    assert!(!stdout.contains("1 pipelines"), "{stdout}");
}
