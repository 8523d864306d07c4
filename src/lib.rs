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

/// The log filter when `RUST_LOG` is not set: accel's lines at info, the notes nydus's crates
/// write while building (RAFS features and the like) only when they warn.
pub const DEFAULT_LOG_FILTER: &str = "info,nydus_api=warn,nydus_builder=warn,nydus_rafs=warn,nydus_storage=warn,nydus_utils=warn";

/// The message of `e` followed by those of its causes, `: `-separated, leaving out a cause whose
/// text the message already carries (most errors here name their cause in their own message,
/// and a plain chain would repeat it).
pub fn error_report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(cause) = cur {
        let part = cause.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cur = cause.source();
    }
    text
}

/// `VERSION (COMMIT)`, as `--version` prints it; the commit is `unknown` outside a git checkout.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("ACCEL_GIT_COMMIT"), ")");

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Leaf(&'static str);

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("pulling x: {source}")]
        Says { source: Leaf },
        #[error("pulling y")]
        Silent { source: Leaf },
    }

    #[test]
    fn report_names_each_cause_once() {
        let says = Outer::Says { source: Leaf("connection refused") };
        assert_eq!(super::error_report(&says), "pulling x: connection refused");
        let silent = Outer::Silent { source: Leaf("connection refused") };
        assert_eq!(super::error_report(&silent), "pulling y: connection refused");
        let wrapped = anyhow::Error::new(says).context("converting r");
        assert_eq!(super::error_report(wrapped.as_ref()), "converting r: pulling x: connection refused");
    }
}
