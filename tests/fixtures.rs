//! The image fixtures are real and valid: pushed to a real registry, read back with skopeo,
//! and every source layer read to its end by the reference checker.

mod common;

use std::collections::BTreeSet;

use common::fixtures::*;
use common::registry::{RegistryAuth, RegistryServer};
use serde_json::Value;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

fn layer_types(manifest: &Value) -> Vec<&str> {
    manifest["layers"].as_array().unwrap().iter().map(|l| l["mediaType"].as_str().unwrap()).collect()
}

fn layer_digests(manifest: &Value) -> Vec<&str> {
    manifest["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap()).collect()
}

/// Checks the manifest in the registry against the fixture, and each source layer with layercheck.
fn assert_pushed(pushed: &PushedImage, manifest_type: &str, layer_types_expected: &[&str]) -> Vec<Vec<ListingEntry>> {
    let manifest = inspect_raw(&pushed.reference);
    assert_eq!(manifest["mediaType"], manifest_type, "{}", pushed.reference);
    assert_eq!(layer_types(&manifest), layer_types_expected, "{}", pushed.reference);
    let built: Vec<&str> = pushed.layers().iter().map(|l| l.digest()).collect();
    assert_eq!(layer_digests(&manifest), built, "layers of {} were not pushed as built", pushed.reference);
    assert_eq!(manifest, inspect_raw(&pushed.by_digest()));

    let config = inspect_config(&pushed.reference);
    let diff_ids: Vec<&str> = pushed.layers().iter().map(|l| l.diff_id.as_str()).collect();
    assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!(diff_ids));
    assert_eq!(config["architecture"], pushed.image.platform.architecture.as_str());
    assert_eq!(config["os"], pushed.image.platform.os.as_str());
    let history = config["history"].as_array().unwrap();
    assert_eq!(history.iter().filter(|h| h["empty_layer"] != true).count(), pushed.layers().len());

    pushed
        .layers()
        .iter()
        .map(|layer| {
            // The blob as pushed and its uncompressed tar must list the same tree.
            let listing = layercheck_tar(&layer.blob);
            assert!(!listing.is_empty(), "{} lists no entry", layer.blob.display());
            assert_eq!(listing, layercheck_tar(&layer.tar), "{} and {}", layer.blob.display(), layer.tar.display());
            listing
        })
        .collect()
}

fn find<'a>(listing: &'a [ListingEntry], name: &str) -> &'a ListingEntry {
    listing.iter().find(|e| e.name == name).unwrap_or_else(|| panic!("{name} is not in the listing"))
}

#[test]
fn debian_amd64_oci_gzip() {
    let registry = RegistryServer::start(RegistryAuth::None);
    let pushed = debian_image("amd64").build().push(&registry.host(), "debian:oci");
    let listings = assert_pushed(&pushed, OCI_MANIFEST, &["application/vnd.oci.image.layer.v1.tar+gzip"]);
    let rootfs = &listings[0];
    assert!(rootfs.iter().filter(|e| e.kind == "reg").count() > 1000, "a Debian rootfs has thousands of files");
    assert_eq!(find(rootfs, "usr/bin/bash").kind, "reg");
    assert_eq!(find(rootfs, "bin").kind, "symlink");
    assert_eq!(find(rootfs, "dev/null").kind, "char");
    assert!(rootfs.iter().any(|e| e.kind == "hardlink"));
    assert!(rootfs.iter().any(|e| e.name.starts_with("usr/lib/x86_64-linux-gnu/")));
}

#[test]
fn debian_amd64_docker_schema2() {
    let registry = RegistryServer::start(RegistryAuth::None);
    let pushed = debian_image("amd64").flavour(Flavour::Docker).build().push(&registry.host(), "debian:docker");
    assert_pushed(&pushed, DOCKER_MANIFEST, &["application/vnd.docker.image.rootfs.diff.tar.gzip"]);
    let manifest = inspect_raw(&pushed.reference);
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.docker.container.image.v1+json");
}

#[test]
fn debian_multiplatform_index_with_attestations() {
    let registry = RegistryServer::start(RegistryAuth::None);
    let pushed = debian_index().with_attestations().build().push(&registry.host(), "debian:multi");

    let index = inspect_raw(&pushed.reference);
    assert_eq!(index["mediaType"], OCI_INDEX);
    let entries = index["manifests"].as_array().unwrap();
    let platforms: Vec<String> = entries
        .iter()
        .map(|m| {
            let p = &m["platform"];
            let variant = p["variant"].as_str().map(|v| format!("/{v}")).unwrap_or_default();
            format!("{}/{}{variant}", p["os"].as_str().unwrap(), p["architecture"].as_str().unwrap())
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64/v8", "unknown/unknown", "unknown/unknown"]);

    for image in &pushed.index.images {
        let arch = &image.platform.architecture;
        let reference = pushed.image_reference(arch);
        let manifest = inspect_raw(&reference);
        assert_eq!(manifest["mediaType"], OCI_MANIFEST);
        assert_eq!(layer_digests(&manifest), [image.layers[0].digest()]);
        let config = inspect_config(&reference);
        assert_eq!(&config["architecture"], arch.as_str());
        let listing = layercheck_tar(&image.layers[0].blob);
        let libdir = if arch == "amd64" { "usr/lib/x86_64-linux-gnu/" } else { "usr/lib/aarch64-linux-gnu/" };
        assert!(listing.iter().any(|e| e.name.starts_with(libdir)), "{arch} rootfs has no {libdir}");
        assert_eq!(find(&listing, "usr/bin/bash").kind, "reg");
    }

    for (entry, attestation) in entries[2..].iter().zip(&pushed.index.attestations) {
        assert_eq!(entry["digest"], attestation.manifest.digest.as_str());
        assert_eq!(entry["annotations"][ATTESTATION_REFERENCE_TYPE], "attestation-manifest");
        let subject = entry["annotations"][ATTESTATION_REFERENCE_DIGEST].as_str().unwrap();
        assert!(entries[..2].iter().any(|m| m["digest"] == subject), "attestation refers to no image: {subject}");
        let manifest = inspect_raw(&pushed.manifest_reference(&attestation.manifest.digest));
        assert_eq!(layer_types(&manifest), ["application/vnd.in-toto+json"]);
    }
}

#[test]
fn handmade_image_has_every_entry_kind() {
    let registry = RegistryServer::start(RegistryAuth::None);
    let pushed = handmade_image().build().push(&registry.host(), "handmade/kinds:v1");
    let listings = assert_pushed(
        &pushed,
        OCI_MANIFEST,
        &[
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ],
    );
    let all: Vec<&ListingEntry> = listings.iter().flatten().collect();
    let kinds: BTreeSet<&str> = all.iter().map(|e| e.kind.as_str()).collect();
    for kind in ["dir", "reg", "symlink", "hardlink", "char", "block", "fifo"] {
        assert!(kinds.contains(kind), "no {kind} entry in the hand-made layers");
    }
    let has = |what: &str, pred: &dyn Fn(&ListingEntry) -> bool| {
        assert!(all.iter().any(|e| pred(e)), "no {what} in the hand-made layers");
    };
    has("whiteout", &|e| e.name.rsplit('/').next().unwrap().starts_with(".wh.") && !e.name.ends_with(".wh..wh..opq"));
    has("opaque directory marker", &|e| e.name.ends_with("/.wh..wh..opq"));
    has("name over 100 bytes", &|e| (101..=255).contains(&e.name.len()));
    has("name over 255 bytes", &|e| e.name.len() > 255);
    has("symlink target over 100 bytes", &|e| e.kind == "symlink" && e.linkname.as_ref().unwrap().len() > 100);
    has("hard link to a name over 255 bytes", &|e| e.kind == "hardlink" && e.linkname.as_ref().unwrap().len() > 255);
    has("empty file", &|e| e.kind == "reg" && e.size == 0 && !e.name.contains(".wh."));
    has("file over the chunk size", &|e| e.kind == "reg" && e.size > CHUNK_SIZE as u64 + 1);
    has("file of exactly the chunk size", &|e| e.kind == "reg" && e.size == CHUNK_SIZE as u64);
    has("user.foo xattr", &|e| e.xattrs.contains_key("user.foo"));
    has("security.capability xattr", &|e| e.xattrs.contains_key("security.capability"));
    has("setuid file", &|e| e.kind == "reg" && e.mode == "4755");
    has("setgid file", &|e| e.kind == "reg" && e.mode == "2755");
    has("sticky directory", &|e| e.kind == "dir" && e.mode == "1777");
    has("owner ID over the ustar limit", &|e| e.uid > 0o7777777 && e.gid > 0o7777777);
    has("non-ASCII name", &|e| !e.name.is_ascii());

    let base = &listings[0];
    let dev = find(base, "dev/block-loop7");
    assert_eq!((dev.devmajor, dev.devminor, dev.gid), (Some(7), Some(7), 6));
    assert_eq!(find(base, "bin/ping-hardlink").linkname.as_deref(), Some("bin/ping-like"));
    assert_eq!(find(base, "links/relative").linkname.as_deref(), Some("../etc/hostname"));
    assert_eq!(find(base, "bin/ping-like").xattrs["security.capability"], "AQAAAiAAAAAAAAAAAAAAAAAAAAA=");
}

#[test]
fn handmade_layers_are_deterministic() {
    let a = handmade_layers();
    let b = handmade_layers();
    assert_eq!(a.len(), 3);
    for (a, b) in a.iter().zip(&b) {
        assert!(a.tar == b.tar, "layer {} differs between two builds", a.name);
    }
}

#[test]
fn push_with_basic_auth() {
    let auth = RegistryAuth::Basic { user: "fixture".into(), password: "s3cret".into() };
    let registry = RegistryServer::start(auth.clone());
    let image =
        ImageBuilder::new(Platform::linux_arm64()).layer(handmade_layers().remove(1).tar, Compression::Gzip).build();
    let pushed = image.push_with_auth(&registry.host(), "private/image:v1", &auth);
    let manifest = inspect_raw_with_auth(&pushed.reference, &auth);
    assert_eq!(layer_digests(&manifest), [pushed.layers()[0].digest()]);
    let denied = std::panic::catch_unwind(|| inspect_raw(&pushed.reference));
    assert!(denied.is_err(), "the registry answered without credentials");
}

#[test]
fn docker_manifest_list() {
    let registry = RegistryServer::start(RegistryAuth::None);
    let layers = handmade_layers();
    let index = IndexBuilder::new()
        .flavour(Flavour::Docker)
        .image(ImageBuilder::new(Platform::linux_amd64()).layer(layers[0].tar.clone(), Compression::Gzip))
        .image(ImageBuilder::new(Platform::linux_arm64()).layer(layers[2].tar.clone(), Compression::None))
        .build();
    let pushed = index.push(&registry.host(), "list:v1");
    let list = inspect_raw(&pushed.reference);
    assert_eq!(list["mediaType"], DOCKER_LIST);
    assert_eq!(list["manifests"].as_array().unwrap().len(), 2);
    let arm = inspect_raw(&pushed.image_reference("arm64"));
    assert_eq!(arm["mediaType"], DOCKER_MANIFEST);
    assert_eq!(layer_types(&arm), ["application/vnd.docker.image.rootfs.diff.tar"]);
}

#[test]
#[should_panic(expected = "layercheck estargz")]
fn layercheck_rejects_a_plain_layer_as_estargz() {
    let image =
        ImageBuilder::new(Platform::linux_amd64()).layer(handmade_layers().remove(2).tar, Compression::Gzip).build();
    let layer = &image.layers[0];
    check_estargz(&layer.tar, &layer.blob, layer.digest());
}
