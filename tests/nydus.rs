//! `accelctl convert --driver nydus` end to end: real-content images in a real registry are
//! converted to Nydus, and the pushed image is read back with nydus's own reader crates
//! (bootstrap inode tree, file data through the data blobs) and compared with the source
//! image's merged file tree, whiteouts applied.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use accel::drivers::nydus::reader::{read_tree, FileEntry, FileKind, Tree};
use common::fixtures::*;
use common::registry::{RegistryAuth, RegistryServer};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const NYDUS_BLOB: &str = "application/vnd.oci.image.layer.nydus.blob.v1";
const NYDUS_ARTIFACT: &str = "application/vnd.nydus.image.manifest.v1+json";

struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "store: {{ kind: embedded, path: {} }}\n",
            dir.path().join("store").display()
        );
        std::fs::write(dir.path().join("pipelines.yaml"), config).unwrap();
        Workspace { dir }
    }

    fn convert(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_accelctl"))
            .arg("convert")
            .arg("--config")
            .arg(self.dir.path().join("pipelines.yaml"))
            .args(args)
            .env("DOCKER_CONFIG", self.dir.path().join("docker"))
            .env("RUST_LOG", "info")
            .output()
            .unwrap()
    }

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
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

fn sha256_file(path: &Path) -> String {
    let mut h = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path).unwrap(), &mut h).unwrap();
    format!("sha256:{}", hex::encode(h.finalize()))
}

fn blob_json(server: &RegistryServer, digest: &str) -> Value {
    let path = server.blob_data_path(hex_of(digest));
    assert_eq!(
        sha256_file(&path),
        digest,
        "the registry's blob does not match its digest"
    );
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

// ---- the source image's merged tree, computed here from the layer tars ----

/// One file of the expected tree; `link_group` ties hard links together.
#[derive(Debug, Clone)]
struct Expected {
    entry: FileEntry,
    link_group: Option<usize>,
}

fn normalize(path: &[u8]) -> String {
    let s = String::from_utf8_lossy(path).into_owned();
    let s = s
        .trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/');
    if s.is_empty() || s == "." {
        "/".into()
    } else {
        format!("/{s}")
    }
}

fn parent_and_name(path: &str) -> (&str, &str) {
    let (p, n) = path.rsplit_once('/').unwrap();
    (if p.is_empty() { "/" } else { p }, n)
}

fn remove_tree(tree: &mut BTreeMap<String, Expected>, path: &str, keep_self: bool) {
    let prefix = if path == "/" {
        "/".to_string()
    } else {
        format!("{path}/")
    };
    let doomed: Vec<String> = tree
        .keys()
        .filter(|k| k.starts_with(&prefix) || (!keep_self && k.as_str() == path))
        .cloned()
        .collect();
    for k in doomed {
        tree.remove(&k);
    }
}

/// Applies the layers as an overlay filesystem would (OCI whiteouts and opaque directories).
fn merged_tree(layers: &[PathBuf]) -> BTreeMap<String, Expected> {
    let mut tree: BTreeMap<String, Expected> = BTreeMap::new();
    let mut groups = 0usize;
    for tar_path in layers {
        let read = || tar::Archive::new(std::fs::File::open(tar_path).unwrap());
        // Whiteouts hide what the lower layers hold, whatever their place in the tar.
        let mut archive = read();
        for e in archive.entries().unwrap() {
            let e = e.unwrap();
            let path = normalize(&e.path_bytes());
            let (dir, name) = parent_and_name(&path);
            if name == ".wh..wh..opq" {
                remove_tree(&mut tree, dir, true);
            } else if let Some(hidden) = name.strip_prefix(".wh.") {
                let victim = if dir == "/" {
                    format!("/{hidden}")
                } else {
                    format!("{dir}/{hidden}")
                };
                remove_tree(&mut tree, &victim, false);
            }
        }
        let mut archive = read();
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let path = normalize(&e.path_bytes());
            let name = parent_and_name(&path).1;
            if name.starts_with(".wh.") {
                continue;
            }
            let h = e.header().clone();
            let kind = match h.entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => FileKind::Regular,
                tar::EntryType::Directory => FileKind::Directory,
                tar::EntryType::Symlink => FileKind::Symlink,
                tar::EntryType::Char => FileKind::Char,
                tar::EntryType::Block => FileKind::Block,
                tar::EntryType::Fifo => FileKind::Fifo,
                tar::EntryType::Link => {
                    let target = normalize(&e.link_name_bytes().unwrap());
                    let mut linked = tree
                        .get(&target)
                        .unwrap_or_else(|| panic!("{path}: hard link to missing {target}"))
                        .clone();
                    let group = *linked.link_group.get_or_insert_with(|| {
                        groups += 1;
                        groups
                    });
                    tree.get_mut(&target).unwrap().link_group = Some(group);
                    remove_tree(&mut tree, &path, false);
                    tree.insert(path, linked);
                    continue;
                }
                other => panic!("{path}: unexpected entry type {other:?}"),
            };
            let mut xattrs = BTreeMap::new();
            if let Some(exts) = e.pax_extensions().unwrap() {
                for ext in exts {
                    let ext = ext.unwrap();
                    if let Some(k) = ext.key().unwrap().strip_prefix("SCHILY.xattr.") {
                        xattrs.insert(k.to_string(), ext.value_bytes().to_vec());
                    }
                }
            }
            let (size, sha256) = if kind == FileKind::Regular {
                let mut h = Sha256::new();
                let n = std::io::copy(&mut e, &mut h).unwrap();
                (n, Some(hex::encode(h.finalize())))
            } else {
                (0, None)
            };
            let entry = FileEntry {
                kind,
                mode: h.mode().unwrap() & 0o7777,
                uid: h.uid().unwrap() as u32,
                gid: h.gid().unwrap() as u32,
                link: (kind == FileKind::Symlink)
                    .then(|| String::from_utf8_lossy(&e.link_name_bytes().unwrap()).into_owned()),
                device: matches!(kind, FileKind::Char | FileKind::Block).then(|| {
                    (
                        h.device_major().unwrap().unwrap(),
                        h.device_minor().unwrap().unwrap(),
                    )
                }),
                size,
                sha256,
                xattrs,
                ino: 0,
            };
            match tree.get_mut(&path) {
                // A directory over a directory changes its metadata and keeps its contents.
                Some(old)
                    if old.entry.kind == FileKind::Directory && kind == FileKind::Directory =>
                {
                    old.entry = entry;
                }
                _ => {
                    remove_tree(&mut tree, &path, false);
                    tree.insert(
                        path,
                        Expected {
                            entry,
                            link_group: None,
                        },
                    );
                }
            }
        }
    }
    tree
}

/// Compares what nydus's reader sees with the expected tree: every path, and for each its type,
/// mode, owner, symlink target, device numbers, contents and xattrs; hard links as groups.
fn compare_trees(what: &str, got: &Tree, want: &BTreeMap<String, Expected>) {
    assert!(
        want.len() > 1000,
        "{what}: the source tree has only {} paths; the fixture is broken",
        want.len()
    );
    let got_paths: BTreeSet<&String> = got.files.keys().filter(|p| p.as_str() != "/").collect();
    let want_paths: BTreeSet<&String> = want.keys().filter(|p| p.as_str() != "/").collect();
    let missing: Vec<_> = want_paths.difference(&got_paths).take(10).collect();
    let extra: Vec<_> = got_paths.difference(&want_paths).take(10).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: paths differ; missing {missing:?}, unexpected {extra:?}"
    );
    let mut mismatches = Vec::new();
    for (path, w) in want {
        if path == "/" {
            continue;
        }
        let g = &got.files[path];
        let mut g_cmp = g.clone();
        g_cmp.ino = 0;
        if g_cmp != w.entry {
            mismatches.push(format!(
                "{path}:\n  nydus  {g_cmp:?}\n  source {:?}",
                w.entry
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{what}: {} files differ:\n{}",
        mismatches.len(),
        mismatches
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Hard links: the paths of each source group share one inode, and no other path shares it.
    let mut by_group: BTreeMap<usize, BTreeSet<&String>> = BTreeMap::new();
    for (path, w) in want {
        if let Some(g) = w.link_group {
            by_group.entry(g).or_default().insert(path);
        }
    }
    let mut by_ino: BTreeMap<u64, BTreeSet<&String>> = BTreeMap::new();
    for (path, g) in &got.files {
        if g.kind == FileKind::Regular {
            by_ino.entry(g.ino).or_default().insert(path);
        }
    }
    let want_sets: BTreeSet<BTreeSet<&String>> =
        by_group.into_values().filter(|s| s.len() > 1).collect();
    let got_sets: BTreeSet<BTreeSet<&String>> =
        by_ino.into_values().filter(|s| s.len() > 1).collect();
    assert_eq!(got_sets, want_sets, "{what}: hard links differ");
}

// ---- reading the converted image back ----

/// Checks one pushed Nydus manifest against its source and returns the tree nydus reads.
fn verify_nydus_image(
    server: &RegistryServer,
    what: &str,
    manifest: &Value,
    source: &Image,
    fs_version: u32,
) -> Tree {
    assert_eq!(manifest["mediaType"], OCI_MANIFEST, "{what}");
    assert_eq!(
        manifest["annotations"]["io.accel.source.digest"],
        source.manifest.digest.as_str(),
        "{what}"
    );
    assert!(
        manifest["annotations"]["io.accel.driver"]
            .as_str()
            .unwrap()
            .starts_with("nydus/"),
        "{what}"
    );
    assert!(
        manifest["annotations"]["io.accel.source.reference"].is_string(),
        "{what}"
    );
    let layers = manifest["layers"].as_array().unwrap();
    let (boot, blobs) = layers.split_last().unwrap();
    assert!(!blobs.is_empty(), "{what}: no data blobs");
    for l in blobs {
        assert_eq!(l["mediaType"], NYDUS_BLOB, "{what}");
        assert_eq!(
            l["annotations"]["containerd.io/snapshot/nydus-blob"], "true",
            "{what}"
        );
    }
    assert_eq!(boot["mediaType"], OCI_GZIP, "{what}");
    assert_eq!(
        boot["annotations"]["containerd.io/snapshot/nydus-bootstrap"], "true",
        "{what}"
    );
    assert_eq!(
        boot["annotations"]["containerd.io/snapshot/nydus-fs-version"],
        fs_version.to_string(),
        "{what}"
    );

    let config = blob_json(server, manifest["config"]["digest"].as_str().unwrap());
    let source_config = source.config_json();
    for key in ["architecture", "os", "config"] {
        assert_eq!(
            config[key], source_config[key],
            "{what}: config field {key} changed"
        );
    }
    // diff_ids: each blob's own digest, then the bootstrap tar's digest.
    let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert_eq!(diff_ids.len(), layers.len(), "{what}");
    for (l, d) in blobs.iter().zip(&diff_ids) {
        assert_eq!(
            l["digest"].as_str().unwrap(),
            *d,
            "{what}: a blob's diff_id is its digest"
        );
    }
    let history = config["history"].as_array().unwrap();
    let non_empty = history
        .iter()
        .filter(|h| !h["empty_layer"].as_bool().unwrap_or(false))
        .count();
    assert_eq!(
        non_empty,
        layers.len(),
        "{what}: one history entry per layer"
    );

    let dir = tempfile::tempdir().unwrap();
    let boot_blob = server.blob_data_path(hex_of(boot["digest"].as_str().unwrap()));
    assert_eq!(sha256_file(&boot_blob), boot["digest"].as_str().unwrap());
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&boot_blob).unwrap())
        .read_to_end(&mut tar_bytes)
        .unwrap();
    assert_eq!(
        format!("sha256:{}", hex::encode(Sha256::digest(&tar_bytes))),
        *diff_ids.last().unwrap(),
        "{what}: bootstrap diff_id"
    );
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    let boot_path = dir.path().join("image.boot");
    let mut found = false;
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap() == Path::new("image/image.boot") {
            std::io::copy(&mut e, &mut std::fs::File::create(&boot_path).unwrap()).unwrap();
            found = true;
        }
    }
    assert!(found, "{what}: the bootstrap layer has no image/image.boot");
    // The blobs as nydusd's localfs backend finds them: named by blob id.
    let blob_dir = dir.path().join("blobs");
    std::fs::create_dir(&blob_dir).unwrap();
    for l in blobs {
        let hex = hex_of(l["digest"].as_str().unwrap());
        std::os::unix::fs::symlink(server.blob_data_path(hex), blob_dir.join(hex)).unwrap();
    }
    let tree = read_tree(&boot_path, &blob_dir)
        .unwrap_or_else(|e| panic!("{what}: nydus cannot read the image: {e}"));
    assert_eq!(tree.fs_version, fs_version, "{what}");
    let blob_ids: BTreeSet<&str> = blobs
        .iter()
        .map(|l| hex_of(l["digest"].as_str().unwrap()))
        .collect();
    let table: BTreeSet<&str> = tree.blob_ids.iter().map(String::as_str).collect();
    assert_eq!(
        table, blob_ids,
        "{what}: the bootstrap's blob table names exactly the blob layers"
    );
    tree
}

fn check_against_source(
    server: &RegistryServer,
    what: &str,
    manifest: &Value,
    source: &Image,
    fs_version: u32,
) -> Tree {
    let tree = verify_nydus_image(server, what, manifest, source, fs_version);
    let tars: Vec<PathBuf> = source.layers.iter().map(|l| l.tar.clone()).collect();
    compare_trees(what, &tree, &merged_tree(&tars));
    tree
}

/// A layer over the Debian rootfs: whiteouts of Debian files and a directory, an opaque
/// directory, a replaced file, new hard links, a symlink and a device node.
fn debian_changes() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        match link {
            Some(t) => b.append_link(&mut h, path, t).unwrap(),
            None => b.append_data(&mut h, path, data).unwrap(),
        }
    };
    add("etc/", tar::EntryType::Directory, 0o755, b"", None);
    add("etc/.wh.issue", tar::EntryType::Regular, 0o644, b"", None);
    add(
        "etc/hostname",
        tar::EntryType::Regular,
        0o644,
        b"nydus-test\n",
        None,
    );
    add(
        "etc/hostname-link",
        tar::EntryType::Link,
        0o644,
        b"",
        Some("etc/hostname"),
    );
    add("usr/", tar::EntryType::Directory, 0o755, b"", None);
    add("usr/share/", tar::EntryType::Directory, 0o755, b"", None);
    add(
        "usr/share/.wh.info",
        tar::EntryType::Regular,
        0o644,
        b"",
        None,
    );
    add(
        "usr/share/doc/",
        tar::EntryType::Directory,
        0o700,
        b"",
        None,
    );
    add(
        "usr/share/doc/.wh..wh..opq",
        tar::EntryType::Regular,
        0o644,
        b"",
        None,
    );
    add(
        "usr/share/doc/README",
        tar::EntryType::Regular,
        0o644,
        &vec![b'n'; 3 << 20],
        None,
    );
    add("opt/", tar::EntryType::Directory, 0o755, b"", None);
    add(
        "opt/sh",
        tar::EntryType::Symlink,
        0o777,
        b"",
        Some("/bin/sh"),
    );
    b.into_inner().unwrap()
}

/// Debian rootfs, the hand-made whiteout and link layers (their base layer holds an xattr whose
/// PAX value has a newline, which nydus refuses, so it is not used) and the Debian changes.
fn layered_image() -> ImageBuilder {
    let handmade = handmade_layers();
    debian_image("amd64")
        .layer(handmade[1].tar.clone(), Compression::Zstd)
        .layer(handmade[2].tar.clone(), Compression::Gzip)
        .layer(debian_changes(), Compression::None)
}

#[test]
fn layered_debian_image_converts_to_nydus_v6() {
    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = layered_image()
        .build()
        .push(&server.host(), "library/debian:layers");
    let ws = Workspace::new();
    let result = ws.convert_json(&["--driver", "nydus", &pushed.reference]);
    let t = &result["targets"][0];
    assert_eq!(t["driver"], "nydus");
    assert_eq!(t["reference"], format!("{}-nydus", pushed.reference));
    assert_eq!(t["media_type"], OCI_MANIFEST);
    let manifest = blob_json(&server, t["digest"].as_str().unwrap());
    assert!(manifest.get("subject").is_none());
    check_against_source(&server, "v6 zstd", &manifest, &pushed.image, 6);
    assert_eq!(
        server
            .tag_digest("library/debian", "layers-nydus")
            .as_deref(),
        t["digest"].as_str()
    );

    // The same again gives the same image.
    let again = Workspace::new().convert_json(&[
        "--driver",
        "nydus",
        "--tag-suffix",
        "-again",
        &pushed.reference,
    ]);
    assert_eq!(
        again["targets"][0]["digest"], t["digest"],
        "conversion is deterministic"
    );
}

#[test]
fn rafs_v5_and_every_compressor() {
    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = layered_image()
        .build()
        .push(&server.host(), "library/debian:v5");
    let ws = Workspace::new();
    for (fs_version, compressor, chunk) in [
        (5, "zstd", "1MiB"),
        (5, "lz4_block", "256KiB"),
        (6, "none", "4KiB"),
        (6, "lz4_block", "16MiB"),
    ] {
        let suffix = format!("-nydus-{fs_version}-{compressor}");
        let result = ws.convert_json(&[
            "--driver",
            "nydus",
            "--option",
            &format!("fs_version={fs_version}"),
            "--option",
            &format!("compressor={compressor}"),
            "--option",
            &format!("chunk_size={chunk}"),
            "--tag-suffix",
            &suffix,
            &pushed.reference,
        ]);
        let manifest = blob_json(&server, result["targets"][0]["digest"].as_str().unwrap());
        check_against_source(&server, &suffix, &manifest, &pushed.image, fs_version);
    }
}

#[test]
fn multi_platform_index_converts_each_image() {
    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = debian_index()
        .with_attestations()
        .build()
        .push(&server.host(), "library/debian:multi");
    let ws = Workspace::new();
    let result = ws.convert_json(&[
        "--driver",
        "nydus",
        "--option",
        "prefetch_patterns=/usr/bin/bash,/etc",
        &pushed.reference,
    ]);
    let t = &result["targets"][0];
    assert_eq!(t["media_type"], OCI_INDEX);
    let index = blob_json(&server, t["digest"].as_str().unwrap());
    let entries = index["manifests"].as_array().unwrap();
    let archs: Vec<&str> = entries
        .iter()
        .map(|e| e["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(archs, ["amd64", "arm64"]);
    for (entry, source) in entries.iter().zip(&pushed.index.images) {
        let manifest = blob_json(&server, entry["digest"].as_str().unwrap());
        let what = format!("index {}", source.platform.architecture);
        let tree = check_against_source(&server, &what, &manifest, source, 6);
        assert_eq!(
            tree.prefetch_entries, 2,
            "{what}: both prefetch patterns are in the table"
        );
    }
}

#[test]
fn referrer_mode_sets_the_subject() {
    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = debian_image("amd64")
        .build()
        .push(&server.host(), "library/debian:ref");
    let ws = Workspace::new();
    let result = ws.convert_json(&[
        "--driver",
        "nydus",
        "--option",
        "with_referrer=true",
        &pushed.reference,
    ]);
    let manifest = blob_json(&server, result["targets"][0]["digest"].as_str().unwrap());
    let subject = &manifest["subject"];
    assert_eq!(subject["digest"], pushed.digest.as_str());
    assert_eq!(subject["mediaType"], OCI_MANIFEST);
    assert_eq!(subject["size"].as_u64(), Some(pushed.image.manifest.size));
    check_against_source(&server, "referrer", &manifest, &pushed.image, 6);

    // An index source: the target index's subject is the source index.
    let pushed = debian_index()
        .build()
        .push(&server.host(), "library/debian:refidx");
    let result = ws.convert_json(&[
        "--driver",
        "nydus",
        "--option",
        "with_referrer=true",
        &pushed.reference,
    ]);
    let index = blob_json(&server, result["targets"][0]["digest"].as_str().unwrap());
    assert_eq!(index["subject"]["digest"], pushed.digest.as_str());
    assert_eq!(index["subject"]["mediaType"], OCI_INDEX);
    for entry in index["manifests"].as_array().unwrap() {
        let child = blob_json(&server, entry["digest"].as_str().unwrap());
        let source = pushed
            .index
            .images
            .iter()
            .find(|i| i.platform.architecture == entry["platform"]["architecture"])
            .unwrap();
        assert_eq!(
            child["subject"]["digest"],
            source.manifest.digest.as_str(),
            "each platform manifest refers to its source"
        );
    }
}

#[test]
fn merged_index_holds_source_and_nydus_manifests() {
    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = debian_image("amd64")
        .build()
        .push(&server.host(), "library/debian:merged");
    let ws = Workspace::new();
    let result = ws.convert_json(&[
        "--driver",
        "nydus",
        "--option",
        "merge_manifest=true",
        &pushed.reference,
    ]);
    let t = &result["targets"][0];
    assert_eq!(t["media_type"], OCI_INDEX);
    let index = blob_json(&server, t["digest"].as_str().unwrap());
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(
        entries[0]["digest"],
        pushed.digest.as_str(),
        "the source manifest comes first"
    );
    assert!(entries[0].get("artifactType").is_none());
    assert_eq!(entries[0]["platform"]["architecture"], "amd64");
    assert_eq!(entries[1]["artifactType"], NYDUS_ARTIFACT);
    assert_eq!(
        entries[1]["platform"]["os.features"],
        serde_json::json!(["nydus.remoteimage.v1"])
    );
    assert_eq!(entries[1]["platform"]["architecture"], "amd64");
    let manifest = blob_json(&server, entries[1]["digest"].as_str().unwrap());
    check_against_source(&server, "merged", &manifest, &pushed.image, 6);
    // Both manifests resolve in the target repository.
    for e in entries {
        let r = format!(
            "{}/library/debian@{}",
            server.host(),
            e["digest"].as_str().unwrap()
        );
        assert_eq!(inspect_raw(&r)["schemaVersion"], 2, "{r}");
    }

    // An index source, into another repository: the source manifests are copied along.
    let pushed = debian_index()
        .build()
        .push(&server.host(), "library/debian:mergedidx");
    let target = format!("{}/mirror/debian:nydus", server.host());
    let result = ws.convert_json(&[
        "--driver",
        "nydus",
        "--option",
        "merge_manifest=true",
        "--target",
        &target,
        &pushed.reference,
    ]);
    let index = blob_json(&server, result["targets"][0]["digest"].as_str().unwrap());
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 4);
    let nydus: Vec<&Value> = entries
        .iter()
        .filter(|e| e["artifactType"] == NYDUS_ARTIFACT)
        .collect();
    assert_eq!(nydus.len(), 2);
    for e in entries {
        let r = format!(
            "{}/mirror/debian@{}",
            server.host(),
            e["digest"].as_str().unwrap()
        );
        assert_eq!(inspect_raw(&r)["schemaVersion"], 2, "{r}");
    }
}

#[test]
fn several_drivers_at_once_including_nydus() {
    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = layered_image()
        .build()
        .push(&server.host(), "library/debian:many");
    let ws = Workspace::new();
    let result = ws.convert_json(&[
        "--driver",
        "estargz,zstdchunked,nydus",
        "--option",
        "nydus.compressor=lz4_block",
        &pushed.reference,
    ]);
    let drivers: Vec<&str> = result["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["driver"].as_str().unwrap())
        .collect();
    assert_eq!(drivers, ["estargz", "zstdchunked", "nydus"]);
    let manifest = blob_json(&server, result["targets"][2]["digest"].as_str().unwrap());
    check_against_source(&server, "fan-out", &manifest, &pushed.image, 6);
    for t in &result["targets"].as_array().unwrap()[..2] {
        let m = blob_json(&server, t["digest"].as_str().unwrap());
        assert_eq!(m["layers"].as_array().unwrap().len(), pushed.layers().len());
    }
}

#[test]
fn bad_options_and_unsupported_layers_fail_clearly() {
    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = handmade_image()
        .build()
        .push(&server.host(), "hand/made:v1");
    let ws = Workspace::new();
    for (option, needle) in [
        ("fs_version=4", "fs_version must be 5 or 6"),
        ("chunk_size=3000", "chunk_size must be a power of two"),
        ("compressor=gzip", "compressor"),
        ("prefetch_patterns=usr/bin", "not an absolute path"),
    ] {
        let out = ws.convert(&["--driver", "nydus", "--option", option, &pushed.reference]);
        assert!(!out.status.success(), "{option} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle) && err.contains("nydus"),
            "{option}: {err}"
        );
    }
    // The hand-made base layer has an xattr whose PAX value holds a newline.
    let out = ws.convert(&["--driver", "nydus", &pushed.reference]);
    assert!(
        !out.status.success(),
        "the hand-made image must not convert to nydus"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let layer = pushed.layers()[0].digest();
    assert!(
        err.contains("xattr/user-only") && err.contains("newline") && err.contains(layer),
        "{err}"
    );
    assert_eq!(
        server.tag_digest("hand/made", "v1-nydus"),
        None,
        "nothing is pushed"
    );
}

#[test]
fn the_default_log_has_accels_lines_and_not_nydus_build_notes() {
    let server = RegistryServer::start(RegistryAuth::None);
    let pushed = debian_image("amd64").build().push(&server.host(), "library/debian:log");
    let ws = Workspace::new();
    let out = Command::new(env!("CARGO_BIN_EXE_accelctl"))
        .arg("convert")
        .arg("--config")
        .arg(ws.dir.path().join("pipelines.yaml"))
        .args(["--driver", "nydus", &pushed.reference])
        .env("DOCKER_CONFIG", ws.dir.path().join("docker"))
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("pushed image"), "{err}");
    assert!(!err.contains("nydus_rafs") && !err.contains("RAFS features"), "{err}");
    // Asked for, nydus's notes are there.
    let out = ws.convert(&["--driver", "nydus", "--tag-suffix", "-again", &pushed.reference]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("RAFS features"), "{err}");
}
