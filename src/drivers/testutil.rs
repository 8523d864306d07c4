//! Helpers shared by the format drivers' tests: the reference reader (`layercheck`) and a
//! builder of tar layers with every kind of entry.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn layercheck() -> PathBuf {
    if let Some(path) = std::env::var_os("ACCEL_LAYERCHECK") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "ACCEL_LAYERCHECK={} is not a file; scripts/test builds layercheck",
            path.display()
        );
        return path;
    }
    if let Some(dirs) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&dirs) {
            let candidate = dir.join("layercheck");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "layercheck (the reference reader of lazy-pull formats) was not found: set ACCEL_LAYERCHECK or put it on \
         PATH; scripts/test builds it from ../shared/tools/layercheck"
    );
}

pub fn run(program: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<u8> {
    let out = Command::new(program)
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {:?} failed ({}):\nstderr:\n{}\nstdout:\n{}",
        program.display(),
        args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect::<Vec<_>>(),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
    );
    out.stdout
}

/// Deterministic pseudo-random bytes (xorshift), incompressible like real binaries.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

pub fn text(n: usize) -> Vec<u8> {
    let words = ["layer ", "chunk ", "gzip ", "member ", "offset\n", "toc "];
    words.iter().cycle().flat_map(|w| w.bytes()).take(n).collect()
}

pub struct Layer(pub ::tar::Builder<Vec<u8>>);

impl Layer {
    pub fn new() -> Self {
        Layer(::tar::Builder::new(Vec::new()))
    }

    pub fn header(kind: ::tar::EntryType, mode: u32) -> ::tar::Header {
        let mut h = ::tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h
    }

    pub fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        let mut h = Self::header(::tar::EntryType::Directory, mode);
        self.0.append_data(&mut h, name, io::empty()).unwrap();
        self
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        let mut h = Self::header(::tar::EntryType::Regular, mode);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, name, data).unwrap();
        self
    }

    pub fn link(&mut self, kind: ::tar::EntryType, name: &str, target: &str) -> &mut Self {
        let mut h = Self::header(kind, 0o777);
        self.0.append_link(&mut h, name, target).unwrap();
        self
    }

    pub fn device(&mut self, kind: ::tar::EntryType, name: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = Self::header(kind, 0o660);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, name, io::empty()).unwrap();
        self
    }

    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.0.append_pax_extensions(records.iter().copied()).unwrap();
        self
    }

    /// A header written as given, for names the builder would rewrite (`./`, PAX-only names).
    pub fn raw(&mut self, mut h: ::tar::Header, name: &[u8], data: &[u8]) -> &mut Self {
        h.as_old_mut().name.fill(0);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}
