//! Converts one layer file to zstd:chunked and reports throughput, for measuring speed and peak
//! memory (`/usr/bin/time -v`) on real layers.
//!
//! ```sh
//! cargo build --release --example zstdchunked_convert
//! /usr/bin/time -v target/release/examples/zstdchunked_convert layer.tar /tmp/out.zst
//! ```
//!
//! The annotations are printed as `KEY VALUE` lines, ready for `layercheck zstdchunked`.

use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;
use std::time::Instant;

use accel::drivers::zstd_chunked::{ZstdChunked, ZstdChunkedOptions, DEFAULT_COMPRESSION_LEVEL};
use accel::drivers::{compression, Driver};
use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Source layer: tar, tar+gzip or tar+zstd.
    input: PathBuf,
    /// Where the zstd:chunked blob goes.
    output: PathBuf,
    #[arg(long, default_value_t = DEFAULT_COMPRESSION_LEVEL)]
    level: i32,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let driver = ZstdChunked::new(ZstdChunkedOptions { compression_level: args.level })?;
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
    println!("diff_id {}", out.diff_id);
    for (k, v) in &out.annotations {
        println!("{k} {v}");
    }
    eprintln!(
        "uncompressed {:.1} MB -> blob {:.1} MB ({:.1}%) in {secs:.2} s: {:.1} MB/s",
        mb,
        written as f64 / 1e6,
        100.0 * written as f64 / out.uncompressed_size.max(1) as f64,
        mb / secs,
    );
    Ok(())
}
