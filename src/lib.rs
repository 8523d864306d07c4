//! accel converts container images into lazily pullable formats (eStargz today; zstd:chunked
//! and Nydus next to it) and pushes the result back to the registry.
//!
//! Data flows from `sources` (events) through `pipeline` (matching, tasks, conversion) using
//! `registry` (pull/push), `store` (blobs between stages) and `drivers` (format writers), and
//! results go to `sinks`. The binaries `accelctl` and `acceld` are thin wrappers over this crate.

pub mod api;
pub mod bus;
pub mod config;
pub mod drivers;
pub mod oci;
pub mod pipeline;
pub mod registry;
pub mod sinks;
pub mod sources;
pub mod store;

pub use api::run;

/// `VERSION (COMMIT)`, as `--version` prints it; the commit is `unknown` outside a git checkout.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("ACCEL_GIT_COMMIT"), ")");
