//! End-to-end checks of the eStargz writer: layers built with the `tar` crate are converted and
//! read back with the reference readers (`layercheck`) and with plain gzip.

use std::io::{self, Read};
use std::path::Path;

use serde_json::{json, Value};

use super::toc::{footer, FOOTER_SIZE};
use super::*;
use crate::config::ByteSize;
use crate::drivers::testutil::{layercheck, run, text, Layer, Rng};
use crate::oci::{annotations, Digest};

const CHUNK: u64 = 64 << 10;

// ---------------------------------------------------------------------------------------------
// Reference reader

/// The full check of the layercheck README: the source listing must equal both the tar view and
/// the TOC view of the converted blob. Returns the source listing's names.
fn layercheck_all(src: &[u8], blob: &[u8], out: &LayerOutput) -> Vec<String> {
    let lc = layercheck();
    let dir = tempfile::tempdir().unwrap();
    let (src_path, blob_path) = (dir.path().join("src.tar"), dir.path().join("out.blob"));
    std::fs::write(&src_path, src).unwrap();
    std::fs::write(&blob_path, blob).unwrap();
    let toc_digest = &out.annotations[annotations::ESTARGZ_TOC_DIGEST];
    let listings = [
        ("a.jsonl", run(&lc, &[&"tar", &src_path])),
        ("b.jsonl", run(&lc, &[&"tar", &blob_path])),
        ("c.jsonl", run(&lc, &[&"estargz", &blob_path, toc_digest])),
    ];
    for (name, listing) in &listings {
        std::fs::write(dir.path().join(name), listing).unwrap();
    }
    let (a, b, c) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"), dir.path().join("c.jsonl"));
    run(&lc, &[&"diff", &a, &b]);
    run(&lc, &[&"diff", &a, &c]);
    String::from_utf8(listings[0].1.clone())
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["name"].as_str().unwrap().to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Conversion and structural checks

fn convert(src: &[u8], options: EstargzOptions) -> Result<(Vec<u8>, LayerOutput), DriverError> {
    let driver = Estargz::new(options)?;
    let mut blob = Vec::new();
    let out = driver.convert_layer(&mut &src[..], &mut blob)?;
    Ok((blob, out))
}

fn options(chunk: u64) -> EstargzOptions {
    EstargzOptions { chunk_size_bytes: ByteSize(chunk), ..EstargzOptions::default() }
}

fn gunzip_all(blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(blob).read_to_end(&mut out).unwrap();
    out
}

/// Decompresses exactly one gzip member starting at `offset` and returns its first `len` bytes.
fn member_prefix(blob: &[u8], offset: u64, len: u64) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    let mut gz = flate2::read::GzDecoder::new(&blob[offset as usize..]);
    gz.read_exact(&mut out).unwrap_or_else(|e| panic!("member at {offset}: {e}"));
    out
}

/// Checks everything a reader relies on without layercheck (so failures point at the cause) and
/// returns the TOC entries.
fn check_blob(blob: &[u8], out: &LayerOutput) -> Vec<Value> {
    assert_eq!(out.media_type, "application/vnd.oci.image.layer.v1.tar+gzip");
    let plain = gunzip_all(blob);
    assert_eq!(out.diff_id, Some(Digest::of(&plain)), "diff_id is the digest of the uncompressed stream");
    assert_eq!(out.uncompressed_size, plain.len() as u64);
    assert_eq!(out.annotations[annotations::ESTARGZ_UNCOMPRESSED_SIZE], plain.len().to_string());

    let tail = &blob[blob.len() - FOOTER_SIZE..];
    let toc_offset = u64::from_str_radix(std::str::from_utf8(&tail[16..32]).unwrap(), 16).unwrap();
    assert_eq!(tail, footer(toc_offset));
    let mut toc_member = Vec::new();
    flate2::read::GzDecoder::new(&blob[toc_offset as usize..blob.len() - FOOTER_SIZE])
        .read_to_end(&mut toc_member)
        .unwrap();
    let mut archive = ::tar::Archive::new(&toc_member[..]);
    let mut entries = archive.entries().unwrap();
    let mut toc_entry = entries.next().unwrap().unwrap();
    assert_eq!(toc_entry.path_bytes().as_ref(), b"stargz.index.json");
    let mut json = Vec::new();
    toc_entry.read_to_end(&mut json).unwrap();
    assert_eq!(out.annotations[annotations::ESTARGZ_TOC_DIGEST], Digest::of(&json).to_string());
    let toc: Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(toc["version"], 1);
    let toc_entries = toc["entries"].as_array().unwrap().clone();

    // Every chunk starts its own gzip member at its offset and has the recorded digest.
    let mut file_size = 0;
    for e in &toc_entries {
        match e["type"].as_str().unwrap() {
            "reg" => file_size = e["size"].as_u64().unwrap_or(0),
            "chunk" => {}
            _ => continue,
        }
        if file_size == 0 {
            assert_eq!(e["digest"], Digest::of(b"").to_string());
            continue;
        }
        let chunk_offset = e["chunkOffset"].as_u64().unwrap_or(0);
        let len = match e["chunkSize"].as_u64() {
            Some(n) => n,
            None => file_size - chunk_offset,
        };
        let data = member_prefix(blob, e["offset"].as_u64().unwrap(), len);
        assert_eq!(e["chunkDigest"], Digest::of(&data).to_string(), "chunk digest of {e}");
    }
    toc_entries
}

fn names_in_toc(toc: &[Value]) -> Vec<String> {
    toc.iter().filter(|e| e["type"] != "chunk").map(|e| e["name"].as_str().unwrap().to_string()).collect()
}

fn tar_names(plain: &[u8]) -> Vec<String> {
    let mut archive = ::tar::Archive::new(plain);
    archive
        .entries()
        .unwrap()
        .map(|e| String::from_utf8_lossy(&e.unwrap().path_bytes()).into_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Fixtures

const BIG_FILES: [(&str, u64); 5] = [
    ("big/random", 3 * CHUNK + 123),
    ("big/text-two-chunks", 2 * CHUNK),
    ("big/one-chunk", CHUNK),
    ("big/one-short", CHUNK - 1),
    ("big/one-over", CHUNK + 1),
];

/// Every kind of entry a container layer holds.
fn every_kind() -> Vec<u8> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut l = Layer::new();
    l.raw(Layer::header(::tar::EntryType::Directory, 0o755), b"./", b"");
    l.dir("bin", 0o755).dir("etc", 0o755).dir("big", 0o755);
    l.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    let mut h = Layer::header(::tar::EntryType::Regular, 0o640);
    h.set_gid(42);
    h.set_groupname("shadow").unwrap();
    h.set_username("root").unwrap();
    l.raw(h, b"etc/shadow", b"root:*:19000:0:99999:7:::\n");
    let capability = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
    l.pax(&[("SCHILY.xattr.security.capability", capability), ("SCHILY.xattr.user.note", b"hi")]);
    l.file("bin/su", 0o4755, &rng.bytes(3000));
    l.link(::tar::EntryType::Link, "bin/su-link", "bin/su");
    l.link(::tar::EntryType::Symlink, "bin/sh", "busybox");
    l.file("bin/sgid", 0o2755, b"#!/bin/sh\n");
    let long_target = format!("/usr/lib/{}", "t".repeat(140));
    l.link(::tar::EntryType::Symlink, "bin/long-target", &long_target);
    let pax_target = format!("../{}/target", "x".repeat(300));
    l.pax(&[("linkpath", pax_target.as_bytes())]);
    l.raw(Layer::header(::tar::EntryType::Symlink, 0o777), b"bin/pax-target", b"");
    l.dir("var", 0o755).file("var/.wh.removed", 0o644, b"");
    l.dir("opt", 0o755).file("opt/.wh..wh..opq", 0o644, b"");
    l.file("empty", 0o600, b"");
    // Over 100 bytes: ustar prefix split, then a GNU long name (no '/' to split at).
    let deep = format!("{}/{}/file", "a".repeat(90), "b".repeat(40));
    l.file(&deep, 0o644, b"deep\n");
    let mut h = ::tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(5);
    let gnu_long = "g".repeat(180);
    l.0.append_data(&mut h, &gnu_long, &b"gnu!\n"[..]).unwrap();
    // Over 255 bytes: only PAX can name it.
    let pax_long = format!("{}/{}", "p".repeat(200), "q".repeat(120));
    l.pax(&[("path", pax_long.as_bytes()), ("mtime", b"1700000000.75")]);
    l.raw(Layer::header(::tar::EntryType::Regular, 0o644), b"placeholder", b"pax named\n");
    for (name, size) in BIG_FILES {
        let data = if name.contains("text") { text(size as usize) } else { rng.bytes(size as usize) };
        l.file(name, 0o644, &data);
    }
    l.dir("dev", 0o755);
    l.device(::tar::EntryType::Char, "dev/null", 1, 3);
    l.device(::tar::EntryType::Block, "dev/sda", 8, 0);
    l.device(::tar::EntryType::Fifo, "dev/fifo", 0, 0);
    l.dir("tmp", 0o1777);
    l.pax(&[("SCHILY.xattr.user.dir", b"attr on a directory")]);
    l.dir("data", 0o750);
    let mut h = ::tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(4);
    h.set_uid(3_000_000); // does not fit 7 octal digits: base-256
    h.set_gid(3_000_001);
    l.0.append_data(&mut h, "data/big-ids", &b"ids\n"[..]).unwrap();
    l.finish()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn every_entry_kind_round_trips_through_the_reference_reader() {
    let src = every_kind();
    let (blob, out) = convert(&src, options(CHUNK)).unwrap();
    let toc = check_blob(&blob, &out);
    let listed = layercheck_all(&src, &blob, &out);
    assert!(listed.len() >= 30, "source listing is suspiciously short: {listed:?}");
    for name in ["bin/su-link", "dev/null", "dev/sda", "dev/fifo", "var/.wh.removed", "opt/.wh..wh..opq"] {
        assert!(listed.iter().any(|n| n == name), "{name} missing from the listing");
    }

    // Lossless: after the landmark comes the source, byte for byte, minus its end marker.
    let plain = gunzip_all(&blob);
    let body = &src[..src.len() - 1024];
    assert_eq!(&plain[1024..1024 + body.len()], body);
    assert_eq!(tar_names(&plain).first().unwrap(), NO_PREFETCH_LANDMARK);
    assert_eq!(tar_names(&plain).last().unwrap(), "stargz.index.json");

    assert_eq!(toc[0]["name"], NO_PREFETCH_LANDMARK);
    for (name, size) in BIG_FILES {
        let records: Vec<&Value> = toc.iter().filter(|e| e["name"] == name).collect();
        assert_eq!(records.len() as u64, size.div_ceil(CHUNK), "chunks of {name}");
        assert_eq!(records[0]["type"], "reg");
        assert_eq!(records[0]["size"], size);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r["chunkOffset"].as_u64().unwrap_or(0), i as u64 * CHUNK);
            let expected_size = if size - i as u64 * CHUNK >= CHUNK { json!(CHUNK) } else { Value::Null };
            assert_eq!(r["chunkSize"], expected_size, "chunkSize of {name} chunk {i}");
        }
    }
    let su = toc.iter().find(|e| e["name"] == "bin/su").unwrap();
    assert_eq!(su["mode"], 0o4755);
    assert_eq!(su["xattrs"]["user.note"], "aGk=");
    let link = toc.iter().find(|e| e["name"] == "bin/su-link").unwrap();
    assert_eq!((&link["type"], &link["linkName"]), (&json!("hardlink"), &json!("bin/su")));
    let null = toc.iter().find(|e| e["name"] == "dev/null").unwrap();
    assert_eq!((&null["devMajor"], &null["devMinor"]), (&json!(1), &json!(3)));
    let pax = toc.iter().find(|e| e["name"].as_str().unwrap().ends_with(&"q".repeat(120))).unwrap();
    assert_eq!(pax["modtime"], "2023-11-14T22:13:21Z");
}

#[test]
fn store_level_and_default_chunk_size_also_verify() {
    let src = every_kind();
    let opts = EstargzOptions { compression_level: 0, ..EstargzOptions::default() };
    let (blob, out) = convert(&src, opts).unwrap();
    check_blob(&blob, &out);
    layercheck_all(&src, &blob, &out);
    assert!(blob.len() > src.len(), "level 0 stores the data uncompressed");
}

#[test]
fn diff_id_is_the_digest_of_gzip_dc_output() {
    let src = every_kind();
    let (blob, out) = convert(&src, options(CHUNK)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.gz");
    std::fs::write(&path, &blob).unwrap();
    let plain = run(Path::new("gzip"), &[&"-dc", &path]);
    assert_eq!(out.diff_id, Some(Digest::of(&plain)));
    assert_eq!(out.uncompressed_size, plain.len() as u64);
    // GNU tar reads it as an ordinary archive, TOC included.
    let tar_path = dir.path().join("layer.tar");
    std::fs::write(&tar_path, &plain).unwrap();
    let listed = String::from_utf8(run(Path::new("tar"), &[&"-tf", &tar_path])).unwrap();
    let listed: Vec<&str> = listed.lines().collect();
    assert_eq!(listed.first(), Some(&NO_PREFETCH_LANDMARK));
    assert_eq!(listed.last(), Some(&"stargz.index.json"));
    assert!(listed.contains(&"bin/su-link") && listed.contains(&"dev/fifo"), "{listed:?}");
    assert_eq!(listed.len(), tar_names(&src).len() + 2);
}

#[test]
fn prioritized_files_come_first_with_their_parents_and_link_targets() {
    let src = every_kind();
    let mut opts = options(CHUNK);
    opts.prioritized_files =
        vec!["bin/su-link".into(), "etc/passwd".into(), "nope/missing".into(), "/etc/shadow".into()];
    let (blob, out) = convert(&src, opts).unwrap();
    let toc = check_blob(&blob, &out);
    layercheck_all(&src, &blob, &out);

    let front = ["./", "bin", "bin/su", "bin/su-link", "etc", "etc/passwd", "etc/shadow"];
    let mut expected: Vec<String> = front.iter().map(|s| s.to_string()).collect();
    expected.push(PREFETCH_LANDMARK.into());
    let source_names = tar_names(&src);
    expected.extend(source_names.iter().filter(|n| !front.contains(&n.as_str())).cloned());
    expected.push("stargz.index.json".into());
    let plain = gunzip_all(&blob);
    assert_eq!(tar_names(&plain), expected);
    let toc_names = names_in_toc(&toc);
    assert_eq!(toc_names, expected[..expected.len() - 1]);
    // Only moved, not rewritten: the source entries plus the landmark fill exactly the space
    // of the source (whose end marker is as long as the landmark).
    let mut archive = ::tar::Archive::new(&plain[..]);
    let toc_start = archive.entries().unwrap().last().unwrap().unwrap().raw_header_position();
    assert_eq!(toc_start, src.len() as u64);
}

#[test]
fn many_small_entries_keep_their_order_across_parallel_jobs() {
    let mut rng = Rng(42);
    let mut l = Layer::new();
    for d in 0..60 {
        l.dir(&format!("d{d}"), 0o755);
        for f in 0..50 {
            let size = (rng.next() % 6000) as usize;
            let data = if f % 3 == 0 { rng.bytes(size) } else { text(size) };
            l.file(&format!("d{d}/f{f}"), 0o644, &data);
        }
        // A run of header-only entries longer than the chunk size.
        for s in 0..12 {
            l.link(::tar::EntryType::Symlink, &format!("d{d}/s{s}"), "f0");
        }
    }
    let src = l.finish();
    let (blob, out) = convert(&src, options(4 << 10)).unwrap();
    check_blob(&blob, &out);
    let listed = layercheck_all(&src, &blob, &out);
    assert_eq!(listed.len(), 60 * 63);
    let plain = gunzip_all(&blob);
    assert_eq!(&plain[1024..1024 + src.len() - 1024], &src[..src.len() - 1024]);
}

#[test]
fn converting_the_output_again_gives_the_same_blob() {
    let src = every_kind();
    let (blob, out) = convert(&src, options(CHUNK)).unwrap();
    let (again, out_again) = convert(&gunzip_all(&blob), options(CHUNK)).unwrap();
    assert_eq!(out.diff_id, out_again.diff_id);
    assert_eq!(out.annotations, out_again.annotations);
    assert!(blob == again, "re-conversion changed the blob");
}

#[test]
fn empty_layers_convert() {
    for src in [Vec::new(), vec![0u8; 1024]] {
        let (blob, out) = convert(&src, EstargzOptions::default()).unwrap();
        let toc = check_blob(&blob, &out);
        assert_eq!(names_in_toc(&toc), [NO_PREFETCH_LANDMARK]);
        let lc = layercheck();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.blob");
        std::fs::write(&path, &blob).unwrap();
        run(&lc, &[&"estargz", &path, &out.annotations[annotations::ESTARGZ_TOC_DIGEST]]);
    }
}

#[test]
fn corrupt_and_unsupported_input_is_rejected() {
    let src = every_kind();
    let cut = src.len() / 2;
    match convert(&src[..cut], options(CHUNK)) {
        Err(DriverError::InvalidTar { why, .. }) => assert!(why.contains("ends inside"), "{why}"),
        other => panic!("expected InvalidTar, got {:?}", other.map(|(_, o)| o)),
    }
    let mut bad = src.clone();
    bad[1024 + 100] ^= 0x10; // mode field of the second header
    assert!(matches!(convert(&bad, options(CHUNK)), Err(DriverError::InvalidTar { offset: 1024, .. })));

    // A PAX size no layer could have must fail as truncated input, not exhaust memory.
    let mut l = Layer::new();
    l.pax(&[("size", b"999999999999999999")]);
    l.file("huge", 0o644, b"tiny");
    match convert(&l.finish(), options(CHUNK)) {
        Err(DriverError::InvalidTar { why, .. }) => assert!(why.contains("ends inside"), "{why}"),
        other => panic!("expected InvalidTar, got {:?}", other.map(|(_, o)| o)),
    }

    let mut h = ::tar::Header::new_gnu();
    h.set_entry_type(::tar::EntryType::GNUSparse);
    h.set_size(0);
    let mut l = Layer::new();
    l.0.append_data(&mut h, "sparse", io::empty()).unwrap();
    match convert(&l.finish(), options(CHUNK)) {
        Err(DriverError::InvalidTar { why, .. }) => assert!(why.contains("sparse"), "{why}"),
        other => panic!("expected InvalidTar, got {:?}", other.map(|(_, o)| o)),
    }
}

#[test]
fn options_are_validated_with_their_names() {
    let kind = DriverKind::Estargz;
    for (opts, needle) in [
        (json!({"compression_level": 10}), "compression_level"),
        (json!({"chunk_size_bytes": 0}), "chunk_size_bytes"),
        (json!({"chunk_size_bytes": "1GiB"}), "chunk_size_bytes"),
        (json!({"chunk_sise_bytes": 4096}), "chunk_sise_bytes"),
    ] {
        match kind.build(&opts) {
            Err(e @ DriverError::Options { .. }) => assert!(e.to_string().contains(needle), "{e}"),
            Err(e) => panic!("{opts}: expected an Options error, got {e}"),
            Ok(_) => panic!("{opts} should be rejected"),
        }
    }
    let driver = kind
        .build(&json!({"compression_level": 0, "chunk_size_bytes": "64KiB", "prioritized_files": "a, b"}))
        .unwrap();
    assert_eq!(
        driver.options(),
        json!({"compression_level": 0, "chunk_size_bytes": 65536, "prioritized_files": ["a", "b"]})
    );
    assert!(kind.build(&Value::Null).is_ok());
}

#[test]
fn names_are_cleaned_like_the_reference_reader() {
    assert_eq!(clean_name(b"./a//b/"), "a/b");
    assert_eq!(clean_name(b"/../a/./b/../c"), "a/c");
    assert_eq!(clean_name(b"./"), "");
    assert_eq!(clean_name(b"/"), "");
}
