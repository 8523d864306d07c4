//! `accelctl convert` end to end: real-content images in a real registry are converted to
//! eStargz, and every converted layer is read back with the reference eStargz reader.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fixtures::*;
use common::registry::{RegistryAuth, RegistryServer};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
const UNCOMPRESSED_SIZE: &str = "io.containers.estargz.uncompressed-size";

/// A scratch directory with a config file naming a private store and the given registries.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new(registries_yaml: &str) -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        let config = format!("store: {{ kind: embedded, path: {} }}\n{registries_yaml}", dir.path().join("store").display());
        std::fs::write(dir.path().join("pipelines.yaml"), config).unwrap();
        Workspace { dir }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("pipelines.yaml")
    }

    /// Runs `accelctl convert --config <ws> ARGS...` with a clean environment for credentials.
    fn convert(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_accelctl"))
            .arg("convert")
            .arg("--config")
            .arg(self.config())
            .args(args)
            .env("DOCKER_CONFIG", self.dir.path().join("docker"))
            .env("RUST_LOG", "info")
            .output()
            .unwrap()
    }

    /// Like `convert` with `--output json`; asserts success and returns the result object.
    fn convert_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = self.convert(&all);
        assert!(
            out.status.success(),
            "accelctl convert {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    }
}

fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    format!("sha256:{}", hex::encode(h.finalize()))
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

/// Digest and size of the decompressed blob (all gzip members).
fn gunzip_digest(path: &Path) -> (String, u64) {
    let mut r = flate2::read::MultiGzDecoder::new(std::fs::File::open(path).unwrap());
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    (format!("sha256:{}", hex::encode(h.finalize())), n)
}

/// Checks one converted image in the registry against the fixture it came from: media types,
/// annotations, config (`diff_ids` rewritten, everything else kept) and, with the reference
/// reader, every layer's TOC, chunks and file listing.
fn verify_estargz_image(server: &RegistryServer, target: &str, manifest: &Value, source: &Image) {
    assert_eq!(manifest["mediaType"], OCI_MANIFEST, "{target}");
    assert_eq!(manifest["config"]["mediaType"], OCI_CONFIG, "{target}");
    assert_eq!(manifest["annotations"]["io.accel.source.digest"], source.manifest.digest.as_str(), "{target}");
    assert!(manifest["annotations"]["io.accel.driver"].as_str().unwrap().starts_with("estargz/"), "{target}");
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), source.layers.len(), "{target}");

    let config_path = server.blob_data_path(hex_of(manifest["config"]["digest"].as_str().unwrap()));
    let config: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    let source_config = source.config_json();
    for key in ["architecture", "os", "history", "config"] {
        assert_eq!(config[key], source_config[key], "{target}: config field {key} changed");
    }
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(diff_ids.len(), layers.len());

    for (i, (layer, src)) in layers.iter().zip(&source.layers).enumerate() {
        assert_eq!(layer["mediaType"], OCI_GZIP, "{target} layer {i}");
        let digest = layer["digest"].as_str().unwrap();
        let blob = server.blob_data_path(hex_of(digest));
        assert_eq!(sha256_file(&blob), digest, "{target} layer {i}: blob does not match its digest");
        assert_eq!(std::fs::metadata(&blob).unwrap().len(), layer["size"].as_u64().unwrap());
        let toc = layer["annotations"][TOC_DIGEST].as_str().unwrap_or_else(|| panic!("{target} layer {i} has no TOC digest"));
        check_estargz(&src.blob, &blob, toc);
        let (uncompressed, size) = gunzip_digest(&blob);
        assert_eq!(diff_ids[i], uncompressed.as_str(), "{target} layer {i}: diff_id is not the digest of the decompressed layer");
        assert_eq!(layer["annotations"][UNCOMPRESSED_SIZE], size.to_string(), "{target} layer {i}");
    }
}

fn target_manifest(server: &RegistryServer, result: &Value, i: usize) -> (String, Value) {
    let t = &result["targets"][i];
    let reference = t["reference"].as_str().unwrap().to_string();
    let by_tag = inspect_raw(&reference);
    let digest = t["digest"].as_str().unwrap();
    let path = server.blob_data_path(hex_of(digest));
    assert_eq!(sha256_file(&path), digest, "the reported digest is not what the registry holds");
    (reference, by_tag)
}

#[test]
fn debian_image_converts_to_estargz() {
    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = debian_image("amd64").build().push(&server.host(), "library/debian:bookworm");
    let ws = Workspace::new("");
    let result = ws.convert_json(&[&pushed.reference]);

    assert_eq!(result["source"], pushed.reference.as_str());
    assert_eq!(result["source_digest"], pushed.digest.as_str());
    let targets = result["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0]["driver"], "estargz");
    assert_eq!(targets[0]["reference"], format!("{}-esgz", pushed.reference));
    let (reference, manifest) = target_manifest(&server, &result, 0);
    verify_estargz_image(&server, &reference, &manifest, &pushed.image);
    assert!(targets[0]["size"].as_u64().unwrap() > 10 << 20);
}

#[test]
fn output_is_deterministic_and_a_rerun_reuses_the_store() {
    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = handmade_image().build().push(&server.host(), "hand/made:v1");
    let first = Workspace::new("").convert_json(&["--tag-suffix", "-one", &pushed.reference]);
    let ws = Workspace::new("");
    let second = ws.convert_json(&["--tag-suffix", "-two", &pushed.reference]);
    assert_eq!(first["targets"][0]["digest"], second["targets"][0]["digest"], "same input and options must give the same image");
    // Converting again from a warm store gives the same result without pulling.
    let out = ws.convert(&["--tag-suffix", "-two", &pushed.reference]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("pulled layer"), "a warm store should not pull again");
    // Each finished step is numbered, 1, 2, 3 …, with no running total that would keep growing.
    let numbers: Vec<u64> = err.lines().filter_map(|l| l.split_once("] ")?.0.rsplit_once('[')?.1.parse().ok()).collect();
    assert!(numbers.len() >= 3, "{err}");
    assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>(), "{err}");
}

#[test]
fn handmade_layers_by_digest_with_options() {
    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = handmade_image().build().push(&server.host(), "hand/made:v1");
    let ws = Workspace::new("");
    // A digest-only source (as Harbor proxy-cache projects send) and small chunks, so large
    // files are split into many chunks.
    let result = ws.convert_json(&[
        "--option",
        "chunk_size_bytes=1MiB",
        "--option",
        "compression_level=6",
        &pushed.by_digest(),
    ]);
    let expected = format!("{}/hand/made:sha256-{}-esgz", server.host(), hex_of(&pushed.digest));
    assert_eq!(result["targets"][0]["reference"], expected.as_str());
    let (reference, manifest) = target_manifest(&server, &result, 0);
    verify_estargz_image(&server, &reference, &manifest, &pushed.image);
}

#[test]
fn prioritized_files_come_first() {
    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = debian_image("amd64").build().push(&server.host(), "library/debian:prio");
    let ws = Workspace::new("");
    let result = ws.convert_json(&["--option", "prioritized_files=usr/bin/bash,etc/passwd", &pushed.reference]);
    let (reference, manifest) = target_manifest(&server, &result, 0);
    verify_estargz_image(&server, &reference, &manifest, &pushed.image);
    let blob = server.blob_data_path(hex_of(manifest["layers"][0]["digest"].as_str().unwrap()));
    let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(std::fs::File::open(blob).unwrap()));
    // Before the landmark: the prioritized files in order, with the directories that hold them.
    let mut files = Vec::new();
    let mut landmark = false;
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().trim_start_matches("./").to_string();
        if name == ".prefetch.landmark" {
            landmark = true;
            break;
        }
        if entry.header().entry_type() != tar::EntryType::Directory {
            files.push(name);
        }
    }
    assert!(landmark, "no .prefetch.landmark in the layer");
    assert_eq!(files, ["usr/bin/bash", "etc/passwd"]);
}

#[test]
fn multi_platform_index_with_attestations() {
    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = debian_index().with_attestations().build().push(&server.host(), "library/debian:multi");
    let ws = Workspace::new("");
    let result = ws.convert_json(&[&pushed.reference]);
    let (reference, index) = target_manifest(&server, &result, 0);
    assert_eq!(index["mediaType"], OCI_INDEX);
    assert_eq!(index["annotations"]["io.accel.source.digest"], pushed.digest.as_str());
    let entries = index["manifests"].as_array().unwrap();
    // Attestations describe the source manifests, so they are left out of the converted index.
    let archs: Vec<&str> = entries.iter().map(|e| e["platform"]["architecture"].as_str().unwrap()).collect();
    assert_eq!(archs, ["amd64", "arm64"], "{reference}");
    assert_eq!(result["targets"][0]["platforms"], serde_json::json!(["linux/amd64", "linux/arm64/v8"]));
    for (entry, source) in entries.iter().zip(&pushed.index.images) {
        assert_eq!(entry["mediaType"], OCI_MANIFEST);
        let child = inspect_raw(&format!("{}@{}", reference.rsplit_once(':').unwrap().0, entry["digest"].as_str().unwrap()));
        verify_estargz_image(&server, &reference, &child, source);
    }

    // Only one platform, named by flag.
    let result = ws.convert_json(&["--platform", "linux/arm64", "--tag-suffix", "-arm", &pushed.reference]);
    let (_, index) = target_manifest(&server, &result, 0);
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["platform"]["architecture"], "arm64");

    let out = ws.convert(&["--platform", "linux/s390x", &pushed.reference]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("linux/s390x") && err.contains("linux/amd64"), "{err}");
}

#[test]
fn docker_schema2_image_with_basic_auth() {
    let auth = RegistryAuth::Basic { user: "robot$ci".into(), password: "pa:ss:word".into() };
    let server = RegistryServer::start(auth.clone());
    let pushed = debian_image("amd64").flavour(Flavour::Docker).build().push_with_auth(&server.host(), "library/debian:docker", &auth);
    let b64 = base64_encode("robot$ci:pa:ss:word");
    let ws = Workspace::new(&format!("registries:\n  '{}': {{ auth: '{b64}' }}\n", server.host()));
    let result = ws.convert_json(&[&pushed.reference]);
    let manifest: Value = serde_json::from_slice(&std::fs::read(server.blob_data_path(hex_of(result["targets"][0]["digest"].as_str().unwrap()))).unwrap()).unwrap();
    // Docker media types in, OCI media types out.
    verify_estargz_image(&server, &pushed.reference, &manifest, &pushed.image);

    let ws = Workspace::new(&format!("registries:\n  '{}': {{ username: 'robot$ci', password: wrong }}\n", server.host()));
    let out = ws.convert(&[&pushed.reference]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("credentials") && err.contains(&server.host()), "{err}");
}

#[test]
fn bearer_token_registry() {
    let auth = RegistryAuth::Token { user: "ci".into(), password: "s3cret".into() };
    let server = RegistryServer::start(auth.clone());
    let pushed = handmade_image().build().push_with_auth(&server.host(), "team/app:1", &auth);
    let ws = Workspace::new(&format!("registries:\n  '{}': {{ username: ci, password: s3cret }}\n", server.host()));
    let result = ws.convert_json(&[&pushed.reference]);
    let digest = result["targets"][0]["digest"].as_str().unwrap();
    let manifest: Value = serde_json::from_slice(&std::fs::read(server.blob_data_path(hex_of(digest))).unwrap()).unwrap();
    verify_estargz_image(&server, &pushed.reference, &manifest, &pushed.image);
    assert!(!server.token.as_ref().unwrap().requests().is_empty(), "no token was requested");
}

#[test]
fn clear_errors_for_bad_input() {
    let server = RegistryServer::start(RegistryAuth::None);
    let ws = Workspace::new("");
    let missing = format!("{}/no/such:image", server.host());
    let cases: [(&[&str], &str); 5] = [
        (&[&missing], "no/such"),
        (&["--option", "compression_level=12", &missing], "compression_level"),
        (&["--option", "nonsense", &missing], "KEY=VALUE"),
        (&["--platform", "linux", &missing], "os/architecture"),
        (&["Not A Reference"], "reference"),
    ];
    for (args, needle) in cases {
        let out = ws.convert(args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: error should mention {needle:?}:\n{err}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout on failure");
    }

    // A target that would replace the source is refused, and the source tag stays as it was.
    let pushed = handmade_image().build().push(&server.host(), "hand/made:v1");
    let same = pushed.reference.clone();
    let cases: [(&[&str], &str); 4] = [
        (&["--tag-suffix", "", &same], "--tag-suffix is empty"),
        (&["--target", &same, &same], "source image's own tag"),
        (&["--tag-suffix", "/../", &same], "may hold only"),
        (&["--driver", "zstd", "--option", "chunk_size_bytes=1MiB", &same], "invalid options for driver zstd"),
    ];
    for (args, needle) in cases {
        let out = ws.convert(args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: error should mention {needle:?}:\n{err}");
    }
    assert_eq!(server.tag_digest("hand/made", "v1").as_deref(), Some(pushed.digest.as_str()), "the source tag is untouched");
}

fn base64_encode(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Digest of a blob's decompressed content (gzip members or zstd frames, by magic), or of the
/// blob itself when it is a plain tar.
fn content_digest(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic).unwrap();
    let f = std::fs::File::open(path).unwrap();
    let mut r: Box<dyn Read> = match magic {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(f)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(zstd::stream::read::Decoder::new(f).unwrap()),
        _ => Box::new(f),
    };
    let mut h = Sha256::new();
    std::io::copy(&mut r, &mut h).unwrap();
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Checks a target of a lossless driver: the config's diff_ids are the source's, every layer
/// has `media_type` and decompresses to its source layer's tar. Returns the layer blobs.
fn verify_lossless_image(server: &RegistryServer, result: &Value, i: usize, driver: &str, media_type: &str, source: &PushedImage) -> Vec<PathBuf> {
    let (reference, manifest) = target_manifest(server, result, i);
    assert_eq!(result["targets"][i]["driver"], driver);
    assert_eq!(result["targets"][i]["reference"], format!("{}-{driver}", source.reference), "default suffix of {driver}");
    assert_eq!(manifest["mediaType"], OCI_MANIFEST, "{reference}");
    assert_eq!(manifest["annotations"]["io.accel.driver"].as_str().unwrap().split('/').next(), Some(driver), "{reference}");
    assert_eq!(manifest["annotations"]["io.accel.source.digest"], source.digest.as_str(), "{reference}");
    let config: Value = serde_json::from_slice(&std::fs::read(server.blob_data_path(hex_of(manifest["config"]["digest"].as_str().unwrap()))).unwrap()).unwrap();
    assert_eq!(config["rootfs"]["diff_ids"], source.image.config_json()["rootfs"]["diff_ids"], "{reference}");
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), source.layers().len(), "{reference}");
    let mut blobs = Vec::new();
    for (n, (layer, src)) in layers.iter().zip(source.layers()).enumerate() {
        assert_eq!(layer["mediaType"], media_type, "{reference} layer {n}");
        let digest = layer["digest"].as_str().unwrap();
        let blob = server.blob_data_path(hex_of(digest));
        assert_eq!(sha256_file(&blob), digest, "{reference} layer {n}: blob does not match its digest");
        assert_eq!(std::fs::metadata(&blob).unwrap().len(), layer["size"].as_u64().unwrap(), "{reference} layer {n}");
        assert_eq!(content_digest(&blob), src.diff_id, "{reference} layer {n}: decompressed layer differs from the source");
        blobs.push(blob);
    }
    blobs
}

#[test]
fn several_formats_from_one_command() {
    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = handmade_image().build().push(&server.host(), "hand/multi:v1");
    let ws = Workspace::new("");
    let result = ws.convert_json(&[
        "--driver",
        "estargz,zstdchunked",
        "--driver",
        "zstd,gzip",
        "--driver",
        "uncompressed",
        "--option",
        "gzip.compression_level=1",
        "--option",
        "zstd.compression_level=7",
        &pushed.reference,
    ]);
    let targets = result["targets"].as_array().unwrap();
    let drivers: Vec<&str> = targets.iter().map(|t| t["driver"].as_str().unwrap()).collect();
    assert_eq!(drivers, ["estargz", "zstdchunked", "zstd", "gzip", "uncompressed"]);
    let references: Vec<&str> = targets.iter().map(|t| t["reference"].as_str().unwrap()).collect();
    let suffixes: Vec<&str> = references.iter().map(|r| r.strip_prefix(pushed.reference.as_str()).unwrap()).collect();
    assert_eq!(suffixes, ["-esgz", "-zstdchunked", "-zstd", "-gzip", "-uncompressed"]);

    let (reference, manifest) = target_manifest(&server, &result, 0);
    verify_estargz_image(&server, &reference, &manifest, &pushed.image);

    // zstd:chunked is lossless: each layer decompresses to the source tar, so diff_ids stay.
    verify_lossless_image(&server, &result, 1, "zstdchunked", "application/vnd.oci.image.layer.v1.tar+zstd", &pushed);
    let (reference, manifest) = target_manifest(&server, &result, 1);
    for layer in manifest["layers"].as_array().unwrap() {
        for key in ["manifest-checksum", "manifest-position", "tarsplit-position"] {
            let k = format!("io.github.containers.zstd-chunked.{key}");
            assert!(layer["annotations"][&k].is_string(), "{reference}: layer lacks {k}");
        }
    }

    // Plain zstd: no zstd:chunked metadata, several frames for the layers larger than a frame.
    let blobs = verify_lossless_image(&server, &result, 2, "zstd", "application/vnd.oci.image.layer.v1.tar+zstd", &pushed);
    let (_, manifest) = target_manifest(&server, &result, 2);
    assert!(manifest["layers"].as_array().unwrap().iter().all(|l| l.get("annotations").is_none()), "plain zstd layers carry no annotations");
    let big = std::fs::read(blobs.iter().max_by_key(|b| std::fs::metadata(b).unwrap().len()).unwrap()).unwrap();
    assert!(zstd::zstd_safe::find_frame_compressed_size(&big).unwrap() < big.len(), "a large layer is compressed in several frames");

    // gzip at level 1: libdeflate marks the fastest level in each member's header.
    let blobs = verify_lossless_image(&server, &result, 3, "gzip", OCI_GZIP, &pushed);
    for (blob, src) in blobs.iter().zip(pushed.layers()) {
        let bytes = std::fs::read(blob).unwrap();
        assert_eq!(bytes[8], 4, "{}: gzip header does not say fastest compression", blob.display());
        assert_ne!(sha256_file(blob), src.digest(), "the gzip layer is a new blob");
    }

    // Uncompressed: the blob is the source tar, so its digest is the diff_id.
    let blobs = verify_lossless_image(&server, &result, 4, "uncompressed", "application/vnd.oci.image.layer.v1.tar", &pushed);
    for (blob, src) in blobs.iter().zip(pushed.layers()) {
        assert_eq!(sha256_file(blob), src.diff_id);
    }

    // The text output lists every target as well.
    let out = ws.convert(&["--driver", "zstd,uncompressed", &pushed.reference]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{}-zstd@", pushed.reference)) && text.contains(&format!("{}-uncompressed@", pushed.reference)), "{text}");
}

#[test]
fn a_config_whose_diff_ids_do_not_match_its_layers_is_refused() {
    let server = RegistryServer::start(RegistryAuth::None);
    let bogus = format!("sha256:{}", "ab".repeat(32));
    let pushed = handmade_image().wrong_diff_id(2, &bogus).build().push(&server.host(), "hand/corrupt:v1");
    let ws = Workspace::new("");
    for drivers in ["zstd", "gzip", "uncompressed", "estargz,zstdchunked,zstd"] {
        let out = ws.convert(&["--driver", drivers, &pushed.reference]);
        assert!(!out.status.success(), "{drivers}: a corrupt image must not convert");
        let err = String::from_utf8_lossy(&out.stderr);
        let layer = pushed.layers()[2].digest();
        assert!(
            err.contains(&bogus) && err.contains(&pushed.layers()[2].diff_id) && err.contains(layer) && err.contains("corrupt"),
            "{drivers}: the error should name the layer, both digests and the cause:\n{err}"
        );
        for d in drivers.split(',') {
            let suffix = if d == "estargz" { "esgz".to_string() } else { d.to_string() };
            assert_eq!(server.tag_digest("hand/corrupt", &format!("v1-{suffix}")), None, "{drivers}: nothing may be pushed for {d}");
        }
    }
}

/// Counts what the engine reports about decoding source layers.
#[derive(Default)]
struct Decodes(std::sync::Mutex<Vec<(String, u64, usize)>>);

impl accel::pipeline::Progress for Decodes {
    fn stage(&self, _: accel::pipeline::Stage, _: &accel::oci::Reference) {}
    fn add_steps(&self, _: u64) {}
    fn step_done(&self, _: &str) {}
    fn layer_decoded(&self, layer: &accel::oci::Digest, bytes: u64, drivers: usize) {
        self.0.lock().unwrap().push((layer.to_string(), bytes, drivers));
    }
}

#[test]
fn several_formats_decode_each_source_layer_once() {
    use accel::pipeline::{Conversion, ConvertRequest, Converter, TargetNaming};
    use std::sync::Arc;

    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = handmade_image().build().push(&server.host(), "hand/once:v1");
    let dir = tempfile::tempdir().unwrap();
    let config = accel::config::Config::parse(&format!("store: {{ kind: embedded, path: {} }}\n", dir.path().display()), "test", &|_| None).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let decodes = Arc::new(Decodes::default());
    let result = runtime.block_on(async {
        let registry = Arc::new(accel::registry::RegistryClient::new(&config).unwrap());
        let store = accel::store::open(&config.store).await.unwrap();
        let converter = Converter::new(registry, store, decodes.clone());
        let conversions = ["estargz", "zstdchunked", "zstd"]
            .iter()
            .map(|d| {
                let kind: accel::drivers::DriverKind = d.parse().unwrap();
                Conversion {
                    driver: kind.build(&serde_json::json!({})).unwrap(),
                    naming: TargetNaming::Suffix { suffix: kind.default_tag_suffix().into(), repository: None },
                }
            })
            .collect();
        let request = ConvertRequest { source: pushed.reference.parse().unwrap(), conversions, platforms: Vec::new() };
        converter.convert(&request).await.unwrap()
    });
    assert_eq!(result.targets.len(), 3);
    let mut seen = decodes.0.lock().unwrap().clone();
    seen.sort();
    // One decoding per source layer, each of the whole tar, each feeding all three drivers.
    let mut expected: Vec<(String, u64, usize)> = pushed
        .layers()
        .iter()
        .map(|l| (l.digest().to_string(), std::fs::metadata(&l.tar).unwrap().len(), 3))
        .collect();
    expected.sort();
    assert_eq!(seen, expected);
}

/// A TCP proxy in front of a registry on loopback that passes everything through, except
/// that, for each `(path, after)` in `cuts`, the answer to the first `GET <path>` is cut off
/// after `after` bytes (headers included) by closing the connection. Counts the `GET`s of
/// those paths it forwards.
struct CuttingProxy {
    port: u16,
    gets: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl CuttingProxy {
    fn gets(&self, path: &str) -> usize {
        self.gets.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn start(upstream: u16, cuts: &[(String, u64)]) -> CuttingProxy {
        use std::collections::HashMap;
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let gets = Arc::new(Mutex::new(HashMap::new()));
        // Cuts still to make, by path.
        let armed: Arc<Mutex<HashMap<String, u64>>> = Arc::new(Mutex::new(cuts.iter().cloned().collect()));
        let paths: Arc<Vec<String>> = Arc::new(cuts.iter().map(|(p, _)| p.clone()).collect());
        let counter = gets.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                // Bytes of answers sent on this connection, and where to stop.
                let sent = Arc::new(AtomicU64::new(0));
                let cut_at = Arc::new(AtomicU64::new(u64::MAX));
                let (armed, counter, paths, answered, cut) = (armed.clone(), counter.clone(), paths.clone(), sent.clone(), cut_at.clone());
                pump(client.try_clone().unwrap(), server.try_clone().unwrap(), move |piece| {
                    for path in paths.iter() {
                        let needle = format!("GET {path} ").into_bytes();
                        if piece.windows(needle.len()).any(|w| w == needle.as_slice()) {
                            *counter.lock().unwrap().entry(path.clone()).or_insert(0) += 1;
                            if let Some(after) = armed.lock().unwrap().remove(path) {
                                cut.store(answered.load(Ordering::SeqCst) + after, Ordering::SeqCst);
                            }
                        }
                    }
                    piece.len()
                });
                pump(server, client, move |piece| {
                    let room = cut_at.load(Ordering::SeqCst).saturating_sub(sent.load(Ordering::SeqCst));
                    let pass = (piece.len() as u64).min(room);
                    sent.fetch_add(pass, Ordering::SeqCst);
                    pass as usize
                });
            }
        });
        CuttingProxy { port, gets }
    }
}

/// Copies `from` to `to` on a thread, piece by piece; `pass` says how many bytes of each piece
/// go through. Passing fewer than all cuts both connections; the end of `from` ends `to`'s
/// writing side.
fn pump(mut from: std::net::TcpStream, mut to: std::net::TcpStream, mut pass: impl FnMut(&[u8]) -> usize + Send + 'static) {
    use std::io::Write;
    use std::net::Shutdown;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let k = pass(&buf[..n]);
            if to.write_all(&buf[..k]).is_err() || k < n {
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

#[test]
fn a_layer_pull_that_breaks_off_while_converting_is_pulled_again() {
    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = handmade_image().build().push(&server.host(), "hand/cut:v1");
    let layers = pushed.layers();
    assert!(layers.len() >= 3, "the image needs layers beyond the two converted first");
    // The first layer is pulled by its conversion as it converts; the last is fetched into the
    // store ahead of its conversion. Both downloads break off halfway.
    let (streamed, ahead) = (&layers[0], &layers[layers.len() - 1]);
    assert!(streamed.descriptor.size > 8 << 10, "the first layer is too small to cut in the middle");
    let path = |l: &Layer| format!("/v2/hand/cut/blobs/{}", l.digest());
    let proxy = CuttingProxy::start(
        server.port,
        &[(path(streamed), streamed.descriptor.size / 2), (path(ahead), ahead.descriptor.size / 2)],
    );
    let through_proxy = format!("127.0.0.1:{}/hand/cut:v1", proxy.port);

    let ws = Workspace::new("");
    let out = ws.convert(&["--output", "json", "--driver", "estargz,zstdchunked,zstd", &through_proxy]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the conversion should survive broken pulls:\n{err}");
    for l in [streamed, ahead] {
        assert_eq!(proxy.gets(&path(l)), 2, "layer {} is fetched again, once:\n{err}", l.digest());
    }
    let said = |what: &str, l: &Layer| err.lines().any(|line| line.contains(what) && line.contains(l.digest()));
    assert!(said("broke off", streamed), "the log should say which pull broke off while converting:\n{err}");
    assert!(said("retrying after", ahead), "the layer fetched ahead should be fetched again by its own retry:\n{err}");
    let cut: Value = serde_json::from_slice(&out.stdout).unwrap();

    // The same conversion with nothing in the way gives the same images.
    let direct = Workspace::new("").convert_json(&["--driver", "estargz,zstdchunked,zstd", &pushed.reference]);
    for i in 0..3 {
        assert_eq!(cut["targets"][i]["digest"], direct["targets"][i]["digest"], "target {i}");
    }
    // And the converted layers read back as they should.
    verify_lossless_image(&server, &direct, 2, "zstd", "application/vnd.oci.image.layer.v1.tar+zstd", &pushed);
}

#[test]
fn a_layer_that_does_not_match_its_digest_is_refused_and_not_kept() {
    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = handmade_image().build().push(&server.host(), "hand/altered:v1");
    let layer = pushed.layers().iter().max_by_key(|l| l.descriptor.size).unwrap().clone();
    let path = server.blob_data_path(hex_of(layer.digest()));
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x5a;
    std::fs::write(&path, &bad).unwrap();

    let ws = Workspace::new("");
    for drivers in ["zstd", "estargz,zstdchunked,nydus"] {
        let out = ws.convert(&["--driver", drivers, &pushed.reference]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{drivers}: an altered layer must not convert");
        assert!(err.contains(layer.digest()) && err.contains("corrupted in transit"), "{drivers}: the error should name the layer and the cause:\n{err}");
        for d in drivers.split(',') {
            let suffix = if d == "estargz" { "esgz".to_string() } else { d.to_string() };
            assert_eq!(server.tag_digest("hand/altered", &format!("v1-{suffix}")), None, "{drivers}: nothing may be tagged for {d}");
        }
    }
    // Nothing of the altered content stayed in the store: once the registry serves the right
    // bytes again, the same workspace pulls the layer and converts it.
    std::fs::write(&path, &good).unwrap();
    let out = ws.convert(&["--driver", "zstd", &pushed.reference]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("pulled layer {}", layer.digest())), "the layer is pulled again:\n{err}");
}
