//! OCI vocabulary shared by every stage: digests, image references, media types, annotation keys.

mod digest;
mod manifest;
mod platform;
mod reference;

pub use digest::{Digest, DigestError, Hasher};
pub use manifest::{Descriptor, ImageIndex, ImageManifest, PlatformSpec};
pub use platform::Platform;
pub use reference::{Reference, ReferenceError};

/// Media types this project reads and writes.
pub mod media_types {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const OCI_LAYER_NONDIST_TAR: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
    pub const OCI_LAYER_NONDIST_GZIP: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
    pub const OCI_LAYER_NONDIST_ZSTD: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    pub const DOCKER_LAYER_FOREIGN_GZIP: &str =
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

    /// Every manifest or index type, as sent in `Accept` when resolving a reference.
    pub const MANIFEST_ACCEPT: [&str; 4] = [OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

    pub fn is_index(media_type: &str) -> bool {
        media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
    }

    pub fn is_manifest(media_type: &str) -> bool {
        media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
    }
}

/// Annotation keys written on converted images and layers.
pub mod annotations {
    /// eStargz: digest of the uncompressed TOC JSON.
    pub const ESTARGZ_TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
    /// eStargz: size of the decompressed layer blob.
    pub const ESTARGZ_UNCOMPRESSED_SIZE: &str = "io.containers.estargz.uncompressed-size";
    /// zstd:chunked: digest of the compressed TOC (the manifest) as stored in the blob.
    pub const ZSTD_CHUNKED_MANIFEST_CHECKSUM: &str = "io.github.containers.zstd-chunked.manifest-checksum";
    /// zstd:chunked: where the TOC is, `offset:length:uncompressed_length:type` (type 1).
    pub const ZSTD_CHUNKED_MANIFEST_POSITION: &str = "io.github.containers.zstd-chunked.manifest-position";
    /// zstd:chunked: where the tar-split is, `offset:length:uncompressed_length`.
    pub const ZSTD_CHUNKED_TARSPLIT_POSITION: &str = "io.github.containers.zstd-chunked.tarsplit-position";
    /// On a converted manifest: the manifest digest it was converted from.
    pub const SOURCE_DIGEST: &str = "io.accel.source.digest";
    /// On a converted manifest: the reference it was converted from.
    pub const SOURCE_REFERENCE: &str = "io.accel.source.reference";
    /// On a converted manifest: the driver that produced it and its version, `name/version`.
    pub const DRIVER: &str = "io.accel.driver";
}
