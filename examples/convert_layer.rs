//! Converts one layer file with any driver and reports throughput, for measuring speed and peak
//! memory (`/usr/bin/time -v`) on real or synthetic layers. Annotations are printed as
//! `KEY VALUE` lines, ready for `layercheck estargz` / `layercheck zstdchunked`.
//!
//! ```sh
//! cargo build --release --example convert_layer
//! /usr/bin/time -v target/release/examples/convert_layer --synthetic-mb 300 /tmp/src.tar /tmp/out.esgz
//! target/release/examples/convert_layer --driver zstdchunked -o compression_level=10 layer.tar /tmp/out.zst
//! ```

use std::fs::File;
use std::io::{self, BufWriter, Read};
use std::path::PathBuf;
use std::time::Instant;

use accel::drivers::{compression, DriverKind};
use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Source layer: tar, tar+gzip or tar+zstd. Written first when --synthetic-mb is given.
    input: PathBuf,
    /// Where the converted blob goes.
    output: PathBuf,
    /// Write a synthetic layer of about this many MB of mixed files to INPUT first.
    #[arg(long)]
    synthetic_mb: Option<u64>,
    #[arg(long, default_value = "estargz")]
    driver: DriverKind,
    /// Driver option KEY=VALUE, as `accelctl convert --option` takes it.
    #[arg(long = "option", short = 'o')]
    options: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(mb) = args.synthetic_mb {
        let started = Instant::now();
        let size = synthetic_layer(&args.input, mb << 20)?;
        eprintln!("wrote synthetic layer {} ({size} bytes) in {:.1?}", args.input.display(), started.elapsed());
    }
    let mut options = serde_json::Map::new();
    for opt in &args.options {
        let (k, v) = opt.split_once('=').with_context(|| format!("--option {opt:?} is not KEY=VALUE"))?;
        let v = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
        options.insert(k.to_string(), v);
    }
    let driver = args.driver.build(&serde_json::Value::Object(options))?;
    let source = File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
    let mut input = compression::decompressed(source, None)?;
    let mut output = BufWriter::new(
        File::create(&args.output).with_context(|| format!("creating {}", args.output.display()))?,
    );
    let started = Instant::now();
    let out = driver.convert_layer(&mut input, &mut output)?;
    drop(output);
    let secs = started.elapsed().as_secs_f64();
    let written = std::fs::metadata(&args.output)?.len();
    let mb = out.uncompressed_size as f64 / 1e6;
    match &out.diff_id {
        Some(d) => println!("diff_id            {d}"),
        None => println!("diff_id            (the source's: the layer decompresses to it)"),
    }
    for (k, v) in &out.annotations {
        println!("{k:<18} {v}");
    }
    println!(
        "uncompressed {:.1} MB -> blob {:.1} MB ({:.1}%) in {secs:.2} s: {:.1} MB/s",
        mb,
        written as f64 / 1e6,
        100.0 * written as f64 / out.uncompressed_size as f64,
        mb / secs,
    );
    Ok(())
}

/// A layer like a typical image: many small text and binary files, some medium ones, and one
/// large file taking about a third of the size; contents compress roughly like real ones.
fn synthetic_layer(path: &PathBuf, total: u64) -> Result<u64> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut tar = tar::Builder::new(BufWriter::new(File::create(path)?));
    let header = |kind: tar::EntryType, size: u64, mode: u32| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h
    };
    let big = total / 3;
    tar.append_data(&mut header(tar::EntryType::Regular, big, 0o644), "opt/model.bin", Content::new(Kind::Binary, big, 1))?;
    let mut written = big;
    let mut n = 0u64;
    while written < total {
        if n % 100 == 0 {
            tar.append_data(&mut header(tar::EntryType::Directory, 0, 0o755), format!("usr/lib/d{}", n / 100), io::empty())?;
        }
        let size = match rng.next() % 100 {
            0..=89 => 100 + rng.next() % (16 << 10),
            90..=98 => (16 << 10) + rng.next() % (1 << 20),
            _ => (1 << 20) + rng.next() % (16 << 20),
        }
        .min(total - written);
        let kind = match rng.next() % 10 {
            0..=4 => Kind::Text,
            5..=8 => Kind::Binary,
            _ => Kind::Random,
        };
        let name = format!("usr/lib/d{}/f{n}", n / 100);
        tar.append_data(&mut header(tar::EntryType::Regular, size, 0o755), &name, Content::new(kind, size, n))?;
        if n % 17 == 0 {
            let mut h = header(tar::EntryType::Symlink, 0, 0o777);
            tar.append_link(&mut h, format!("{name}.link"), format!("f{n}"))?;
        }
        written += size;
        n += 1;
    }
    tar.into_inner()?.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(std::fs::metadata(path)?.len())
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Clone, Copy)]
enum Kind {
    /// Words from a small vocabulary: compresses about 3-4x, like source and config files.
    Text,
    /// Small values with structure and some noise: compresses about 2x, like executables.
    Binary,
    /// Incompressible, like already-compressed assets.
    Random,
}

/// File contents generated on the fly, so writing a large layer needs no memory.
struct Content {
    kind: Kind,
    left: u64,
    rng: Rng,
}

impl Content {
    fn new(kind: Kind, size: u64, seed: u64) -> Self {
        Content { kind, left: size, rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1) }
    }
}

impl Read for Content {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        const WORDS: [&[u8]; 16] = [
            b"the ", b"layer ", b"return ", b"struct ", b"config ", b"value ", b"error ", b"for ",
            b"if ", b"self", b".into() ", b"{\n", b"}\n", b"    ", b"// ", b"fn ",
        ];
        let n = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let mut i = 0;
        while i < n {
            let r = self.rng.next();
            match self.kind {
                Kind::Text => {
                    let w = WORDS[(r % 16) as usize];
                    let k = w.len().min(n - i);
                    buf[i..i + k].copy_from_slice(&w[..k]);
                    i += k;
                }
                Kind::Binary => {
                    let k = 8.min(n - i);
                    for (j, b) in buf[i..i + k].iter_mut().enumerate() {
                        let v = (r >> (j * 8)) as u8;
                        *b = if v < 200 { v & 0x0f } else { v };
                    }
                    i += k;
                }
                Kind::Random => {
                    let k = 8.min(n - i);
                    buf[i..i + k].copy_from_slice(&r.to_le_bytes()[..k]);
                    i += k;
                }
            }
        }
        self.left -= n as u64;
        Ok(n)
    }
}
