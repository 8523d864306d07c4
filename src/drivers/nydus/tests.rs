use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Mutex;

use ::tar::EntryType;

use super::reader::{read_tree, FileKind};
use super::*;
use crate::drivers::testutil::{text, Layer, Rng};
use crate::drivers::{ConvertedLayer, LayerOutput};
use crate::oci::{Descriptor, Digest};

fn options(json: serde_json::Value) -> Result<Nydus, DriverError> {
    let opts: NydusOptions =
        serde_path_to_error::deserialize(json).map_err(|e| DriverError::Options {
            driver: DriverKind::Nydus,
            why: e.to_string(),
        })?;
    Nydus::new(opts)
}

#[test]
fn defaults_and_valid_options() {
    let d = NydusOptions::default();
    assert_eq!(d.fs_version, 6);
    assert_eq!(d.compressor, Compressor::Zstd);
    assert_eq!(d.chunk_size.bytes(), 1 << 20);
    let n = options(serde_json::json!({
        "fs_version": 5, "compressor": "lz4_block", "chunk_size": "64KiB",
        "prefetch_patterns": "/usr/bin,/etc/hosts", "merge_manifest": true
    }))
    .unwrap();
    assert_eq!(n.options.prefetch_patterns, ["/usr/bin", "/etc/hosts"]);
    assert_eq!(n.options.chunk_size.bytes(), 64 << 10);
    assert!(matches!(n.publication(), Publication::MergedIndex { .. }));
    assert_eq!(
        options(serde_json::json!({"with_referrer": true}))
            .unwrap()
            .publication(),
        Publication::Referrer
    );
    assert_eq!(
        options(serde_json::json!({})).unwrap().publication(),
        Publication::Tag
    );
    let via_kind = DriverKind::Nydus
        .build(&serde_json::json!({"compressor": "none"}))
        .unwrap();
    assert_eq!(via_kind.options()["compressor"], "none");
}

#[test]
fn bad_options_are_named() {
    let cases = [
        (
            serde_json::json!({"fs_version": 4}),
            "fs_version must be 5 or 6, got 4",
        ),
        (
            serde_json::json!({"chunk_size": 3000}),
            "chunk_size must be a power of two",
        ),
        (
            serde_json::json!({"chunk_size": "32MiB"}),
            "chunk_size must be a power of two from 4KiB to 16MiB",
        ),
        (serde_json::json!({"chunk_size": 0x1800}), "0x1800"),
        (
            serde_json::json!({"compressor": "gzip"}),
            "unknown variant `gzip`",
        ),
        (
            serde_json::json!({"prefetch_patterns": ["usr/bin"]}),
            "\"usr/bin\" is not an absolute path",
        ),
        (
            serde_json::json!({"prefetch_patterns": ["/a\nb"]}),
            "line break",
        ),
        (
            serde_json::json!({"with_referrer": true, "merge_manifest": true}),
            "cannot both be set",
        ),
        (serde_json::json!({"level": 3}), "unknown field `level`"),
    ];
    for (json, want) in cases {
        let err = options(json.clone())
            .err()
            .unwrap_or_else(|| panic!("{json} accepted"))
            .to_string();
        assert!(err.contains(want), "{json}: {err}");
        assert!(err.contains("nydus"), "{err}");
    }
    // Every problem at once.
    let err = options(serde_json::json!({"fs_version": 7, "chunk_size": 100}))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("fs_version") && err.contains("chunk_size"),
        "{err}"
    );
}

#[test]
fn history_keeps_one_entry_per_layer() {
    let mut config = serde_json::json!({"history": [
        {"created_by": "a"}, {"created_by": "env", "empty_layer": true}, {"created_by": "b"}, {"created_by": "c"}
    ]});
    merge::rewrite_history(&mut config, &[true, false, true]);
    let h = config["history"].as_array().unwrap();
    assert_eq!(h.len(), 5);
    assert_eq!(h[2]["empty_layer"], true);
    assert!(h[3].get("empty_layer").is_none());
    assert_eq!(h[4]["comment"], merge::HISTORY_COMMENT);
    let mut none = serde_json::json!({});
    merge::rewrite_history(&mut none, &[true]);
    assert!(none.get("history").is_none());
}

#[test]
fn prefetch_patterns_become_lines() {
    assert_eq!(
        prefetch::pattern_lines(&["/a".into(), "/b/c".into()]),
        "/a\n/b/c\n"
    );
    assert!(prefetch::check_pattern("/ok/path").is_ok());
    assert!(prefetch::check_pattern(" /x").is_err());
}

/// Blobs of the image step, in memory.
#[derive(Default)]
struct MemBlobs(Mutex<HashMap<Digest, Vec<u8>>>);

impl BlobAccess for MemBlobs {
    fn open(&self, digest: &Digest) -> Result<Box<dyn Read + Send>, DriverError> {
        let data = self
            .0
            .lock()
            .unwrap()
            .get(digest)
            .cloned()
            .ok_or_else(|| DriverError::Io(std::io::ErrorKind::NotFound.into()))?;
        Ok(Box::new(std::io::Cursor::new(data)))
    }

    fn add(
        &self,
        write: &mut dyn FnMut(&mut dyn Write) -> Result<(), DriverError>,
    ) -> Result<(Digest, u64), DriverError> {
        let mut buf = Vec::new();
        write(&mut buf)?;
        let d = Digest::of(&buf);
        let n = buf.len() as u64;
        self.0.lock().unwrap().insert(d.clone(), buf);
        Ok((d, n))
    }
}

/// Converts layers and runs the image step; returns the draft and a directory with the blobs
/// (named by blob id) and the bootstrap.
fn convert(driver: &Nydus, layers: &[Vec<u8>]) -> (ImageDraft, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut converted = Vec::new();
    for tar in layers {
        let mut out = Vec::new();
        let LayerOutput {
            media_type,
            diff_id,
            annotations,
            state,
            ..
        } = driver.convert_layer(&mut tar.as_slice(), &mut out).unwrap();
        let digest = Digest::of(&out);
        assert_eq!(
            diff_id.as_ref(),
            Some(&digest),
            "a blob's diff_id is its digest"
        );
        std::fs::write(dir.path().join(digest.hex()), &out).unwrap();
        let mut descriptor = Descriptor::new(&media_type, digest.clone(), out.len() as u64);
        descriptor.annotations = annotations;
        converted.push(ConvertedLayer {
            descriptor,
            diff_id: digest,
            state,
        });
    }
    let history: Vec<serde_json::Value> = layers
        .iter()
        .map(|_| serde_json::json!({"created_by": "x"}))
        .collect();
    let mut draft = ImageDraft {
        layers: converted,
        config: serde_json::json!({"rootfs": {"type": "layers"}, "history": history}),
        annotations: Default::default(),
        source: "localhost:5000/a:1".into(),
    };
    let blobs = MemBlobs::default();
    driver.finish_image(&mut draft, &blobs).unwrap();
    let boot = draft.layers.last().unwrap();
    let mut gz = Vec::new();
    blobs
        .open(&boot.descriptor.digest)
        .unwrap()
        .read_to_end(&mut gz)
        .unwrap();
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_end(&mut tar)
        .unwrap();
    assert_eq!(
        Digest::of(&tar),
        boot.diff_id,
        "bootstrap diff_id is its tar's digest"
    );
    let mut archive = ::tar::Archive::new(tar.as_slice());
    let mut found = false;
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_str() == Some(BOOTSTRAP_PATH) {
            let mut f = std::fs::File::create(dir.path().join("image.boot")).unwrap();
            std::io::copy(&mut e, &mut f).unwrap();
            found = true;
        }
    }
    assert!(found, "bootstrap layer holds {BOOTSTRAP_PATH}");
    (draft, dir)
}

#[test]
fn layers_merge_with_whiteouts_and_read_back() {
    let mut rng = Rng(7);
    let big = rng.bytes(300_000);
    let mut lower = Layer::new();
    lower
        .dir("etc", 0o755)
        .file("etc/hosts", 0o644, b"127.0.0.1 localhost\n")
        .file("etc/gone", 0o600, b"x")
        .dir("opt", 0o755)
        .file("opt/old", 0o644, b"old")
        .file("big.bin", 0o755, &big)
        .link(EntryType::Link, "big.hard", "big.bin")
        .link(EntryType::Symlink, "hosts.link", "/etc/hosts")
        .device(EntryType::Char, "null", 1, 3);
    let mut upper = Layer::new();
    upper
        .dir("etc", 0o755)
        .file("etc/.wh.gone", 0o644, b"")
        .dir("opt", 0o700)
        .file("opt/.wh..wh..opq", 0o644, b"")
        .file("opt/new", 0o644, &text(5000));
    // A layer with only a directory has no file data, so no blob.
    let mut empty = Layer::new();
    empty.dir("var", 0o755);
    for (fs_version, compressor) in [(6, "zstd"), (5, "lz4_block"), (6, "none")] {
        let driver = options(serde_json::json!({
            "fs_version": fs_version, "compressor": compressor, "chunk_size": "64KiB",
            "prefetch_patterns": ["/etc", "/big.bin", "/not/there"]
        }))
        .unwrap();
        let layers = [
            lower.0.get_ref().clone(),
            upper.0.get_ref().clone(),
            empty.0.get_ref().clone(),
        ];
        let layers: Vec<Vec<u8>> = layers.into_iter().map(finish_tar).collect();
        let (draft, dir) = convert(&driver, &layers);
        assert_eq!(
            draft.layers.len(),
            3,
            "two blobs and the bootstrap; the empty layer is left out"
        );
        let boot = &draft.layers[2].descriptor;
        assert_eq!(boot.annotations[ANNOTATION_BOOTSTRAP], "true");
        assert_eq!(
            boot.annotations[ANNOTATION_FS_VERSION],
            fs_version.to_string()
        );
        assert_eq!(
            draft.layers[0].descriptor.annotations[ANNOTATION_BLOB],
            "true"
        );
        assert_eq!(draft.config["history"][2]["empty_layer"], true);
        assert_eq!(draft.config["history"].as_array().unwrap().len(), 4);
        assert_eq!(
            draft.annotations[crate::oci::annotations::SOURCE_REFERENCE],
            "localhost:5000/a:1"
        );

        let tree = read_tree(&dir.path().join("image.boot"), dir.path()).unwrap();
        assert_eq!(tree.fs_version, fs_version);
        assert_eq!(
            tree.prefetch_entries, 2,
            "the two patterns found in the tree"
        );
        assert_eq!(
            tree.blob_ids,
            [
                draft.layers[0].descriptor.digest.hex(),
                draft.layers[1].descriptor.digest.hex()
            ]
        );
        let f = &tree.files;
        assert!(!f.contains_key("/etc/gone"), "whiteout applied");
        assert!(!f.contains_key("/opt/old"), "opaque directory applied");
        assert!(f.contains_key("/var"));
        assert_eq!(f["/opt"].mode, 0o700);
        assert_eq!(
            f["/opt/new"].sha256.as_deref(),
            Some(hex::encode(sha2::Sha256::digest(text(5000))).as_str())
        );
        assert_eq!(
            f["/big.bin"].sha256.as_deref(),
            Some(hex::encode(sha2::Sha256::digest(&big)).as_str())
        );
        assert_eq!(f["/big.bin"].ino, f["/big.hard"].ino, "hard link");
        assert_ne!(f["/big.bin"].ino, f["/etc/hosts"].ino);
        assert_eq!(f["/hosts.link"].link.as_deref(), Some("/etc/hosts"));
        assert_eq!(f["/null"].kind, FileKind::Char);
        assert_eq!(f["/null"].device, Some((1, 3)));
        assert_eq!(f["/etc/hosts"].mode, 0o644);
    }
}

fn finish_tar(mut data: Vec<u8>) -> Vec<u8> {
    data.extend_from_slice(&[0u8; 1024]);
    data
}

use sha2::Digest as _;

#[test]
fn newline_in_pax_value_is_refused_with_its_entry() {
    let mut l = Layer::new();
    l.file("ok", 0o644, b"fine");
    l.pax(&[("path", b"bad\nname")]);
    l.file("placeholder", 0o644, b"data");
    let tar = l.finish();
    let driver = Nydus::new(NydusOptions::default()).unwrap();
    let err = driver
        .convert_layer(&mut tar.as_slice(), &mut Vec::new())
        .expect_err("refused")
        .to_string();
    assert!(err.contains("\"bad\\nname\""), "{err}");
    assert!(err.contains("newline"), "{err}");
}

#[test]
fn a_builder_failure_is_an_error_not_a_panic() {
    // A hard link to a file that is not in the layer: nydus's builder refuses it.
    let mut l = Layer::new();
    l.link(EntryType::Link, "orphan", "missing/target");
    let tar = l.finish();
    let driver = Nydus::new(NydusOptions::default()).unwrap();
    let err = driver
        .convert_layer(&mut tar.as_slice(), &mut Vec::new())
        .expect_err("refused")
        .to_string();
    assert!(err.contains("nydus could not build the layer"), "{err}");
    assert!(err.contains("orphan"), "{err}");
}
