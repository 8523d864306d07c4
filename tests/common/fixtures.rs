//! Image fixtures for integration tests: real Debian rootfs layers prepared by
//! `scripts/test`, hand-made layers with every special tar entry kind, image and
//! index builders that push with Debian's `skopeo`, and the reference checker.
//!
//! Everything here panics with a hint instead of skipping: a missing tool or
//! cache means the test environment is broken, which `scripts/test` repairs.

// Each test binary uses some of these re-exports.
#![allow(unused_imports)]

mod handmade;
mod image;
mod layercheck;
mod rootfs;
mod skopeo;

pub use handmade::{handmade_image, handmade_layers, HandmadeLayer, CHUNK_SIZE};
pub use image::{
    Attestation, Compression, Descriptor, Flavour, Image, ImageBuilder, Index, IndexBuilder, Layer, LayerTar, Platform,
    PushedImage, PushedIndex, ATTESTATION_REFERENCE_DIGEST, ATTESTATION_REFERENCE_TYPE,
};
pub use layercheck::{
    check_estargz, check_zstd_chunked, layercheck_binary, layercheck_diff, layercheck_tar, ListingEntry,
};
pub use rootfs::{debian_image, debian_index, debian_rootfs, fixture_cache};
pub use skopeo::{inspect_config, inspect_raw, inspect_raw_with_auth};
