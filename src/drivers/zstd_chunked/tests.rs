//! End-to-end checks of the zstd:chunked writer: layers built with the `tar` crate are converted,
//! taken apart here frame by frame (TOC, tar-split, footer, the frame of every chunk), and read
//! back with the reference readers (`layercheck`, which also has containers/storage apply the
//! layer) and with plain zstd.

use std::collections::HashMap;
use std::io;
use std::path::Path;

use base64::Engine as _;
use serde_json::{json, Value};

use super::chunker::{chunks_of, HOLE_MIN_BYTES};
use super::tarsplit::Crc64;
use super::writer::Limits;
use super::*;
use crate::drivers::tar::{padding_len, TarReader};
use crate::drivers::testutil::{layercheck, run, text, Layer, Rng};
use crate::oci::{annotations, Digest};

const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

// ---------------------------------------------------------------------------------------------
// Conversion and structural checks

fn convert(src: &[u8]) -> Result<(Vec<u8>, LayerOutput), DriverError> {
    convert_with(src, ZstdChunkedOptions::default(), Limits::default())
}

fn convert_with(
    src: &[u8],
    options: ZstdChunkedOptions,
    limits: Limits,
) -> Result<(Vec<u8>, LayerOutput), DriverError> {
    let mut driver = ZstdChunked::new(options)?;
    driver.limits = limits;
    let mut blob = Vec::new();
    let out = driver.convert_layer(&mut &src[..], &mut blob)?;
    Ok((blob, out))
}

fn numbers(out: &LayerOutput, key: &str) -> Vec<u64> {
    out.annotations[key].split(':').map(|n| n.parse().unwrap()).collect()
}

/// The payload of the skippable frame whose payload starts at `at`.
fn skippable(blob: &[u8], at: u64, len: u64) -> &[u8] {
    let header = &blob[at as usize - 8..at as usize];
    assert_eq!(header[..4], SKIPPABLE_MAGIC, "no skippable frame before offset {at}");
    assert_eq!(u64::from(u32::from_le_bytes(header[4..].try_into().unwrap())), len, "size of the frame at {at}");
    &blob[at as usize..(at + len) as usize]
}

/// What a blob holds besides the source tar.
struct Parsed {
    toc: Vec<Value>,
    /// (start, end) of every data frame, in order.
    frames: Vec<(u64, u64)>,
    /// Each file's contents as read through the TOC, by name.
    files: HashMap<String, Vec<u8>>,
}

impl Parsed {
    fn entry(&self, name: &str) -> &Value {
        self.toc.iter().find(|e| e["name"] == name && e["type"] != "chunk").unwrap_or_else(|| panic!("{name} not in TOC"))
    }

    /// A file's entry followed by its chunk entries.
    fn chunks(&self, name: &str) -> Vec<&Value> {
        self.toc.iter().filter(|e| e["name"] == name && matches!(e["type"].as_str(), Some("reg" | "chunk"))).collect()
    }
}

/// Checks everything a reader relies on, without layercheck (so failures point at the cause):
/// lossless decompression, annotations, footer, manifest, tar-split, and that every chunk is a
/// frame of its own holding exactly its bytes.
fn check_blob(src: &[u8], blob: &[u8], out: &LayerOutput) -> Parsed {
    assert_eq!(out.media_type, "application/vnd.oci.image.layer.v1.tar+zstd");
    let plain = zstd::stream::decode_all(blob).unwrap();
    assert!(plain == src, "decompressing the blob must give back the source tar byte for byte");
    assert_eq!(out.diff_id, None, "lossless: the diff_id is the source's, which the engine hashes");
    assert_eq!(out.uncompressed_size, src.len() as u64);

    let m = numbers(out, annotations::ZSTD_CHUNKED_MANIFEST_POSITION);
    let t = numbers(out, annotations::ZSTD_CHUNKED_TARSPLIT_POSITION);
    assert_eq!((m.len(), m[3], t.len()), (4, 1, 3));
    assert_eq!(t[0], m[0] + m[1] + 8, "the tar-split frame follows the manifest frame");
    let footer = skippable(blob, t[0] + t[1] + 8, 64);
    assert_eq!(t[0] + t[1] + 8 + 64, blob.len() as u64, "the footer ends the blob");
    let words: Vec<u64> = footer[..56].chunks(8).map(|w| u64::from_le_bytes(w.try_into().unwrap())).collect();
    assert_eq!(words, [m[0], m[1], m[2], 1, t[0], t[1], t[2]]);
    assert_eq!(&footer[56..], b"GNUlInUx");

    let manifest = skippable(blob, m[0], m[1]);
    assert_eq!(out.annotations[annotations::ZSTD_CHUNKED_MANIFEST_CHECKSUM], Digest::of(manifest).to_string());
    let json = zstd::stream::decode_all(manifest).unwrap();
    assert_eq!(json.len() as u64, m[2]);
    let toc: Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(toc["version"], 1);
    let tar_split = skippable(blob, t[0], t[1]);
    assert_eq!(toc["tarSplitDigest"], Digest::of(tar_split).to_string());
    let tar_split = zstd::stream::decode_all(tar_split).unwrap();
    assert_eq!(tar_split.len() as u64, t[2]);
    let toc = toc["entries"].as_array().unwrap().clone();

    // The data: zstd frames only, up to the manifest's frame.
    let data_end = m[0] as usize - 8;
    let mut frames = Vec::new();
    let mut at = 0;
    while at < data_end {
        assert_eq!(blob[at..at + 4], ZSTD_MAGIC, "a zstd frame at {at}");
        assert_eq!(blob[at + 4] & 0x04, 0x04, "the frame at {at} has a checksum");
        let len = zstd::zstd_safe::find_frame_compressed_size(&blob[at..data_end]).unwrap();
        frames.push((at as u64, (at + len) as u64));
        at += len;
    }
    let frame_end: HashMap<u64, u64> = frames.iter().copied().collect();

    // Every chunk starts a frame that holds exactly its bytes.
    let mut files = HashMap::new();
    let mut i = 0;
    while i < toc.len() {
        let e = &toc[i];
        let name = e["name"].as_str().unwrap().to_string();
        assert_ne!(e["type"], "chunk", "a chunk entry without its file: {e}");
        let n = 1 + toc[i + 1..].iter().take_while(|c| c["type"] == "chunk").count();
        let size = e["size"].as_u64().unwrap_or(0);
        if e["type"] != "reg" || size == 0 {
            assert_eq!(n, 1);
            for field in ["digest", "offset", "endOffset", "chunkSize", "chunkDigest"] {
                assert!(e.get(field).is_none(), "{field} on {e}");
            }
            if e["type"] == "reg" {
                files.insert(name, Vec::new());
            }
            i += 1;
            continue;
        }
        let chunks = &toc[i..i + n];
        let mut content = Vec::new();
        let mut last_end = 0;
        for (k, c) in chunks.iter().enumerate() {
            assert_eq!(c["name"], name);
            let offset = c["offset"].as_u64().unwrap();
            let end = *frame_end.get(&offset).unwrap_or_else(|| panic!("{name} chunk {k} does not start a frame"));
            let len = if n == 1 {
                for field in ["chunkSize", "chunkOffset", "chunkDigest", "chunkType"] {
                    assert!(c.get(field).is_none(), "{field} on a single-chunk file: {c}");
                }
                size
            } else {
                assert_eq!(c["chunkOffset"].as_u64().unwrap_or(0), content.len() as u64, "{name} chunk {k}");
                c["chunkSize"].as_u64().unwrap()
            };
            let data = zstd::bulk::decompress(&blob[offset as usize..end as usize], len as usize + 1).unwrap();
            assert_eq!(data.len() as u64, len, "{name} chunk {k} is its frame, no more and no less");
            if n > 1 {
                assert_eq!(c["chunkDigest"], Digest::of(&data).to_string(), "{name} chunk {k}");
            }
            if c["chunkType"] == "zeros" {
                assert!(data.iter().all(|&b| b == 0) && len >= HOLE_MIN_BYTES, "{name} chunk {k}");
            } else {
                assert!(c.get("chunkType").is_none());
            }
            content.extend_from_slice(&data);
            last_end = end;
        }
        assert_eq!(content.len() as u64, size);
        assert_eq!(e["digest"], Digest::of(&content).to_string(), "{name}");
        assert_eq!(e["endOffset"].as_u64().unwrap(), last_end, "{name}: endOffset is the end of its last frame");
        files.insert(name, content);
        i += n;
    }

    // The tar-split puts the exact source back together from the files, and each of its
    // header segments describes the next TOC entry.
    let mut rebuilt = Vec::new();
    let mut entries = toc.iter().filter(|e| e["type"] != "chunk");
    let mut padding = 0;
    let b64 = base64::engine::general_purpose::STANDARD;
    for (i, line) in tar_split.split(|&c| c == b'\n').filter(|l| !l.is_empty()).enumerate() {
        let ts: Value = serde_json::from_slice(line).unwrap();
        assert_eq!(ts["position"], i as u64);
        match ts["type"].as_u64().unwrap() {
            2 => {
                let bytes = b64.decode(ts["payload"].as_str().unwrap()).unwrap();
                assert!(!bytes.is_empty());
                rebuilt.extend_from_slice(&bytes);
                let header = &bytes[padding.min(bytes.len())..];
                if let Some(h) = TarReader::new(header).next_entry().unwrap() {
                    let e = entries.next().expect("a tar-split header without TOC entry");
                    assert_eq!(e["name"].as_str().unwrap().as_bytes(), &h.header.name[..]);
                    assert_eq!(e["size"].as_u64().unwrap_or(0), h.header.size);
                    padding = padding_len(h.payload_size());
                } else {
                    padding = 0;
                }
            }
            1 => {
                let name = ts["name"].as_str().unwrap();
                let size = ts.get("size").and_then(Value::as_u64).unwrap_or(0);
                if size == 0 {
                    assert!(ts["payload"].is_null(), "{ts}");
                    continue;
                }
                let content = files.get(name).map(Vec::as_slice).unwrap_or_default();
                let mut crc = Crc64::new();
                crc.update(content);
                assert_eq!(b64.decode(ts["payload"].as_str().unwrap()).unwrap(), crc.value().to_be_bytes(), "{name}");
                rebuilt.extend_from_slice(content);
            }
            other => panic!("tar-split entry type {other}"),
        }
    }
    assert!(entries.next().is_none(), "TOC entries missing from the tar-split");
    assert!(rebuilt == src, "the tar-split and the files must rebuild the source tar");
    Parsed { toc, frames, files }
}

// ---------------------------------------------------------------------------------------------
// Reference reader

/// The blob with the footer containers/storage wrote before version 1.47 (40 bytes, magic
/// `GnUlInUx`, no tar-split fields) instead of the current one. layercheck is built from
/// Debian's containers/storage 1.43 and finds the manifest only through that footer; the TOC,
/// the tar-split and every data frame stay where they are, and containers/storage's reader (old
/// and new) locates them through the annotations, never the footer.
fn with_old_footer(blob: &[u8], out: &LayerOutput) -> Vec<u8> {
    let m = numbers(out, annotations::ZSTD_CHUNKED_MANIFEST_POSITION);
    let mut old = blob[..blob.len() - 72].to_vec();
    old.extend_from_slice(&SKIPPABLE_MAGIC);
    old.extend_from_slice(&40u32.to_le_bytes());
    for v in m {
        old.extend_from_slice(&v.to_le_bytes());
    }
    old.extend_from_slice(b"GnUlInUx");
    old
}

/// The full check of the layercheck README: the source listing must equal both the tar view
/// and the manifest view of the converted blob, and containers/storage must apply the layer to
/// the same tree. Returns the source listing's names.
fn layercheck_all(src: &[u8], blob: &[u8], out: &LayerOutput) -> Vec<String> {
    let lc = layercheck();
    let dir = tempfile::tempdir().unwrap();
    let (src_path, blob_path, old_path) =
        (dir.path().join("src.tar"), dir.path().join("out.zst"), dir.path().join("old-footer.zst"));
    std::fs::write(&src_path, src).unwrap();
    std::fs::write(&blob_path, blob).unwrap();
    std::fs::write(&old_path, with_old_footer(blob, out)).unwrap();
    let checksum = &out.annotations[annotations::ZSTD_CHUNKED_MANIFEST_CHECKSUM];
    let position = &out.annotations[annotations::ZSTD_CHUNKED_MANIFEST_POSITION];
    let listings = [
        ("a.jsonl", run(&lc, &[&"tar", &src_path])),
        ("b.jsonl", run(&lc, &[&"tar", &blob_path])),
        ("c.jsonl", run(&lc, &[&"zstdchunked", &old_path, checksum, position])),
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
// Fixtures

/// Random bytes with no zero byte, so zero runs placed next to them keep their length.
fn nonzero(rng: &mut Rng, n: usize) -> Vec<u8> {
    rng.bytes(n).into_iter().map(|b| b.max(1)).collect()
}

/// A file with holes: one in the middle, one too short to count, one at the end.
fn holey(rng: &mut Rng) -> Vec<u8> {
    let mut data = nonzero(rng, 150_000);
    data.extend(vec![0u8; 4096]);
    data.extend(nonzero(rng, 3000));
    data.extend(vec![0u8; 1023]);
    data.extend(nonzero(rng, 2000));
    data.extend(vec![0u8; 2000]);
    data
}

/// Every kind of entry a container layer holds, files of every chunk layout, and the record
/// padding GNU tar writes after the end marker.
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
    // As tar writers do, the hard link carries its file's mode (containers/storage applies it).
    let mut h = Layer::header(::tar::EntryType::Link, 0o4755);
    h.set_link_name("bin/su").unwrap();
    l.raw(h, b"bin/su-link", b"");
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
    h.set_mtime(1_700_000_000);
    let gnu_long = "g".repeat(180);
    l.0.append_data(&mut h, &gnu_long, &b"gnu!\n"[..]).unwrap();
    // Over 255 bytes: only PAX can name it. Sub-second and access/change times, an empty xattr.
    let pax_long = format!("{}/{}", "p".repeat(200), "q".repeat(120));
    l.pax(&[
        ("path", pax_long.as_bytes()),
        ("mtime", b"1700000000.75"),
        ("atime", b"1700000100.5"),
        ("ctime", b"1700000200"),
        ("SCHILY.xattr.user.empty", b""),
    ]);
    l.raw(Layer::header(::tar::EntryType::Regular, 0o644), b"placeholder", b"pax named\n");
    l.file("big/random", 0o644, &rng.bytes(1 << 20));
    l.file("big/text", 0o644, &text(300_000));
    l.file("big/holes", 0o644, &holey(&mut rng));
    l.file("big/only-zeros", 0o644, &[0u8; 5000]);
    let mut starts_with_hole = vec![0u8; 3000];
    starts_with_hole.extend(nonzero(&mut rng, 2000));
    l.file("big/starts-with-hole", 0o644, &starts_with_hole);
    l.file("big/short-zero-run", 0o644, &[0u8; 1023]);
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
    h.set_mtime(1_700_000_000);
    l.0.append_data(&mut h, "data/big-ids", &b"ids\n"[..]).unwrap();
    let mut src = l.finish();
    src.resize(src.len().div_ceil(10240) * 10240, 0);
    src
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn every_entry_kind_round_trips_through_the_reference_readers() {
    let src = every_kind();
    let (blob, out) = convert(&src).unwrap();
    let p = check_blob(&src, &blob, &out);
    let listed = layercheck_all(&src, &blob, &out);
    assert_eq!(listed.len(), 33, "{listed:?}");
    for name in ["bin/su-link", "dev/null", "dev/sda", "dev/fifo", "var/.wh.removed", "opt/.wh..wh..opq", "big/holes"] {
        assert!(listed.iter().any(|n| n == name), "{name} missing from the listing");
    }

    // Names as in the tar, not cleaned.
    assert_eq!(p.toc[0]["name"], "./");
    assert_eq!(p.entry("bin")["type"], "dir");
    let su = p.entry("bin/su");
    assert_eq!(su["mode"], 0o4755);
    assert_eq!(su["xattrs"]["user.note"], "aGk=");
    assert_eq!(su["modtime"], "2023-11-14T22:13:20Z");
    let link = p.entry("bin/su-link");
    assert_eq!((&link["type"], &link["linkName"]), (&json!("hardlink"), &json!("bin/su")));
    let null = p.entry("dev/null");
    assert_eq!((&null["type"], &null["devMajor"], &null["devMinor"]), (&json!("char"), &json!(1), &json!(3)));
    assert_eq!(p.entry("dev/fifo")["type"], "fifo");
    let shadow = p.entry("etc/shadow");
    assert_eq!((&shadow["gid"], &shadow["mode"]), (&json!(42), &json!(0o640)));
    assert!(shadow.get("userName").is_none(), "the TOC has no user names");
    let ids = p.entry("data/big-ids");
    assert_eq!((&ids["uid"], &ids["gid"]), (&json!(3_000_000), &json!(3_000_001)));
    let pax = p.toc.iter().find(|e| e["name"].as_str().unwrap().ends_with(&"q".repeat(120))).unwrap();
    assert_eq!(pax["modtime"], "2023-11-14T22:13:20.75Z");
    assert_eq!(pax["accesstime"], "2023-11-14T22:15:00.5Z");
    assert_eq!(pax["changetime"], "2023-11-14T22:16:40Z");
    assert_eq!(pax["xattrs"], json!({"user.empty": ""}), "empty xattrs are kept, as containers/storage lists them");
    assert_eq!(p.entry(&"g".repeat(180))["size"], 5);
    assert_eq!(p.entry("data")["xattrs"]["user.dir"], "YXR0ciBvbiBhIGRpcmVjdG9yeQ==");
    assert!(p.entry("empty").get("digest").is_none());

    // Chunk layouts.
    let random = p.chunks("big/random");
    assert!(random.len() >= 6, "1 MiB of random data has content-defined chunks: {}", random.len());
    assert!(random.iter().all(|c| c.get("chunkType").is_none()));
    let kinds = |name: &str| -> Vec<(u64, bool)> {
        p.chunks(name)
            .iter()
            .map(|c| (c["chunkSize"].as_u64().unwrap_or(0), c["chunkType"] == "zeros"))
            .collect()
    };
    let holes = kinds("big/holes");
    assert_eq!(holes.iter().filter(|c| c.1).map(|c| c.0).collect::<Vec<_>>(), [4096, 2000]);
    assert_eq!(holes.last(), Some(&(2000, true)), "a hole at the end is a chunk too");
    assert_eq!(kinds("big/starts-with-hole")[0], (3000, true));
    // A file that is one chunk has no chunk fields, even when that chunk is a hole.
    assert_eq!(kinds("big/only-zeros"), [(0, false)]);
    assert_eq!(kinds("big/short-zero-run"), [(0, false)]);
    for name in ["big/random", "big/holes", "big/starts-with-hole", "big/text"] {
        let expected: Vec<(u64, bool)> = chunks_of(&p.files[name], 4096);
        let got = kinds(name);
        if expected.len() == 1 {
            assert_eq!(got, [(0, false)], "{name}");
        } else {
            assert_eq!(got, expected, "{name}");
        }
    }

    // Header-only entries never start a frame of their own: a frame starts at offset 0 (the
    // first headers), at every chunk, and after every file (its padding and the next headers).
    let chunk_starts = p.toc.iter().filter_map(|e| e["offset"].as_u64()).count();
    let files_with_data = p.toc.iter().filter(|e| e["type"] == "reg" && e.get("offset").is_some()).count();
    assert_eq!(p.frames.len(), 1 + chunk_starts + files_with_data);
}

#[test]
fn chunks_are_cut_where_containers_storage_cuts_them() {
    // Chunk sizes from containers/storage's writer (pkg/chunked/compressor, 1.43 and current
    // alike) for this very payload.
    let mut rng = Rng(0x5eed);
    let mut payload = rng.bytes(400_000);
    payload.extend(vec![0u8; 5000]);
    payload.extend(rng.bytes(100_000));
    payload.extend(vec![0u8; 1023]);
    payload.extend(rng.bytes(50_000));
    payload.extend(text(200_000));
    payload.extend(rng.bytes(64_000));
    payload.extend(vec![0u8; 1024]);
    let expected = REFERENCE_CHUNKS.to_vec();
    assert_eq!(chunks_of(&payload, 4096), expected);

    let mut l = Layer::new();
    l.file("payload", 0o644, &payload);
    let src = l.finish();
    let (blob, out) = convert(&src).unwrap();
    let p = check_blob(&src, &blob, &out);
    let got: Vec<(u64, bool)> =
        p.chunks("payload").iter().map(|c| (c["chunkSize"].as_u64().unwrap(), c["chunkType"] == "zeros")).collect();
    assert_eq!(got, expected);
    let digests: Vec<&str> = p.chunks("payload").iter().map(|c| c["chunkDigest"].as_str().unwrap()).collect();
    assert_eq!(digests[..2], REFERENCE_CHUNK_DIGESTS);
    assert_eq!(p.entry("payload")["digest"], REFERENCE_FILE_DIGEST);
}

/// See `chunks_are_cut_where_containers_storage_cuts_them`.
const REFERENCE_CHUNKS: [(u64, bool); 13] = [
    (22061, false),
    (119262, false),
    (51562, false),
    (37566, false),
    (54340, false),
    (86398, false),
    (28811, false),
    (5000, true),
    (55305, false),
    (27831, false),
    (315541, false),
    (16346, false),
    (1024, true),
];
const REFERENCE_FILE_DIGEST: &str = "sha256:2bb115fe0f8f9435a82870322831ec41f80ae6fcb84a2dec04b7fac78c2d22b4";
const REFERENCE_CHUNK_DIGESTS: [&str; 2] = [
    "sha256:1171dbc64f1b3b25a2837302548a07aeaad32669cef0118d93d0b1c160a1af11",
    "sha256:e2e92beee06a633b17036adc0a3493c96c0e5ba4ef3ad5b35e3f7da8b09afed5",
];

#[test]
fn zstd_d_gives_back_the_source() {
    let src = every_kind();
    let (blob, out) = convert(&src).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.zst");
    std::fs::write(&path, &blob).unwrap();
    let plain = run(Path::new("zstd"), &[&"-d", &"-c", &path]);
    assert!(plain == src, "zstd -d must give back the source tar");
    assert_eq!(out.diff_id, None, "the diff_id stays the source's");
}

#[test]
fn chunks_too_large_to_hold_are_streamed_and_long_header_runs_cut() {
    // A periodic stretch that has no cut point, a long hole, many header-only entries.
    let mut rng = Rng(3);
    let period: Vec<u8> = nonzero(&mut rng, 1000);
    let periodic: Vec<u8> = period.iter().copied().cycle().take(600_000).collect();
    assert_eq!(chunks_of(&periodic, 4096).len(), 1, "the fixture needs a stretch without a cut point");
    let mut mixed = nonzero(&mut rng, 100_000);
    mixed.extend(&periodic);
    mixed.extend(vec![0u8; 300_000]);
    mixed.extend(nonzero(&mut rng, 100_000));
    let mut l = Layer::new();
    l.file("periodic", 0o644, &periodic);
    l.file("mixed", 0o644, &mixed);
    l.dir("links", 0o755);
    for i in 0..300 {
        l.link(::tar::EntryType::Symlink, &format!("links/{i}"), "../periodic");
    }
    l.file("after", 0o644, &rng.bytes(70_000));
    let src = l.finish();

    let small = Limits { chunk_in_memory_bytes: 64 << 10, header_frame_bytes: 16 << 10 };
    let (blob, out) = convert_with(&src, ZstdChunkedOptions::default(), small).unwrap();
    let p = check_blob(&src, &blob, &out);
    layercheck_all(&src, &blob, &out);
    let (plain_blob, plain_out) = convert(&src).unwrap();
    let q = check_blob(&src, &plain_blob, &plain_out);
    // Same chunks either way; only frames of headers are cut differently.
    let strip = |toc: &[Value]| -> Vec<Value> {
        toc.iter()
            .map(|e| {
                let mut e = e.clone();
                e.as_object_mut().unwrap().remove("offset");
                e.as_object_mut().unwrap().remove("endOffset");
                e
            })
            .collect()
    };
    assert_eq!(strip(&p.toc), strip(&q.toc));
    assert!(p.frames.len() > q.frames.len() + 5, "{} vs {} frames", p.frames.len(), q.frames.len());
    let mixed_chunks = p.chunks("mixed");
    assert!(mixed_chunks.iter().any(|c| c["chunkSize"].as_u64().unwrap() > 500_000));
    assert!(mixed_chunks.iter().any(|c| c["chunkType"] == "zeros" && c["chunkSize"] == 300_000));
}

#[test]
fn conversion_is_deterministic() {
    let src = every_kind();
    let (a, out_a) = convert(&src).unwrap();
    let (b, out_b) = convert(&src).unwrap();
    assert!(a == b, "two conversions of the same layer differ");
    assert_eq!(out_a.annotations, out_b.annotations);
    // Levels change the frames, never the TOC's view of the files.
    let opts = ZstdChunkedOptions { compression_level: 1 };
    let (fast, out_fast) = convert_with(&src, opts, Limits::default()).unwrap();
    let p = check_blob(&src, &fast, &out_fast);
    let q = check_blob(&src, &a, &out_a);
    assert_eq!(p.files, q.files);
    assert_eq!((out_fast.diff_id, out_a.diff_id), (None, None));
}

#[test]
fn empty_and_odd_endings_convert_losslessly() {
    let mut l = Layer::new();
    l.file("a", 0o644, b"abc");
    let one = l.finish();
    // Cut right after the payload (no padding, no end marker), with one zero block, and with
    // data after the end marker.
    let cut = one[..512 + 3].to_vec();
    let mut one_block = one[..1024].to_vec();
    one_block.extend_from_slice(&[0; 512]);
    let mut padded = one.clone();
    padded.resize(one.len() + 300 * 1024, 0);
    for src in [Vec::new(), vec![0u8; 1024], vec![0u8; 10240], one.clone(), cut, one_block, padded] {
        let (blob, out) = convert(&src).unwrap();
        check_blob(&src, &blob, &out);
        layercheck_all(&src, &blob, &out);
    }
}

fn expect_unsupported(src: &[u8], needle: &str) {
    match convert(src) {
        Err(e @ DriverError::Unsupported { driver: DriverKind::ZstdChunked, .. }) => {
            assert!(e.to_string().contains(needle), "error {e} should mention {needle:?}")
        }
        Err(e) => panic!("expected Unsupported mentioning {needle:?}, got {e}"),
        Ok(_) => panic!("expected Unsupported mentioning {needle:?}, got a layer"),
    }
}

#[test]
fn entries_zstd_chunked_cannot_hold_are_refused() {
    let mut l = Layer::new();
    l.file("etc/a", 0o644, b"1").file("etc/b", 0o644, b"2").file("./etc//a", 0o644, b"3");
    expect_unsupported(&l.finish(), "duplicate paths");

    let mut g = ::tar::Header::new_ustar();
    g.set_path("pax_global_header").unwrap();
    g.set_entry_type(::tar::EntryType::XGlobalHeader);
    g.set_size(18);
    g.set_cksum();
    let mut l = Layer::new();
    l.0.append(&g, &b"18 comment=global\n"[..]).unwrap();
    l.file("f", 0o644, b"x");
    expect_unsupported(&l.finish(), "global header");

    let mut h = ::tar::Header::new_gnu();
    h.set_entry_type(::tar::EntryType::GNUSparse);
    h.set_size(0);
    let mut l = Layer::new();
    l.0.append_data(&mut h, "sparse", io::empty()).unwrap();
    expect_unsupported(&l.finish(), "GNU sparse");

    let mut l = Layer::new();
    l.raw(Layer::header(::tar::EntryType::Continuous, 0o644), b"contiguous", b"x");
    expect_unsupported(&l.finish(), "'7'");

    let mut l = Layer::new();
    l.raw(Layer::header(::tar::EntryType::Regular, 0o644), b"latin1-\xe9", b"x");
    expect_unsupported(&l.finish(), "not UTF-8");

    let mut l = Layer::new();
    let mut h = Layer::header(::tar::EntryType::Regular, 0o644);
    h.set_mtime(300_000_000_000);
    l.raw(h, b"far-future", b"x");
    expect_unsupported(&l.finish(), "9999");

    // After the end marker, containers/storage reads the tar-split as tar headers: only whole
    // zero blocks may follow.
    let mut l = Layer::new();
    l.file("a", 0o644, b"abc");
    let one = l.finish();
    let mut garbage = one.clone();
    garbage.extend_from_slice(&[b'x'; 512]);
    expect_unsupported(&garbage, "after the end-of-archive marker");
    let mut partial = one.clone();
    partial.extend_from_slice(&[0; 100]);
    expect_unsupported(&partial, "after the end-of-archive marker");
}

#[test]
fn corrupt_input_is_rejected() {
    let src = every_kind();
    match convert(&src[..src.len() / 2]) {
        Err(DriverError::InvalidTar { why, .. }) => assert!(why.contains("ends inside"), "{why}"),
        other => panic!("expected InvalidTar, got {:?}", other.map(|(_, o)| o)),
    }
    let mut bad = src.clone();
    bad[1024 + 100] ^= 0x10;
    assert!(matches!(convert(&bad), Err(DriverError::InvalidTar { offset: 1024, .. })));
}

#[test]
fn options_are_validated_with_their_names() {
    let kind = DriverKind::ZstdChunked;
    for (opts, needle) in [
        (json!({"compression_level": 0}), "compression_level must be between 1 and 19, got 0"),
        (json!({"compression_level": 20}), "compression_level"),
        (json!({"compression_level": -3}), "compression_level"),
        (json!({"compression_level": "fast"}), "compression_level"),
        (json!({"chunk_size_bytes": 4096}), "chunk_size_bytes"),
    ] {
        match kind.build(&opts) {
            Err(e @ DriverError::Options { .. }) => {
                assert!(e.to_string().contains(needle), "{e}");
                assert!(e.to_string().contains("zstdchunked"), "{e}");
            }
            Err(e) => panic!("{opts}: expected an Options error, got {e}"),
            Ok(_) => panic!("{opts} should be rejected"),
        }
    }
    assert_eq!(kind.build(&Value::Null).unwrap().options(), json!({"compression_level": 10}));
    assert_eq!(kind.build(&json!({"compression_level": 19})).unwrap().options(), json!({"compression_level": 19}));
    assert_eq!(kind.build(&json!({})).unwrap().kind(), DriverKind::ZstdChunked);
}
