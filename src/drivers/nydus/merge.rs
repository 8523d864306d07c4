//! The image step: the layers' bootstraps are merged into the image bootstrap (whiteouts and
//! opaque directories applied across layers, as `nydus-image merge` does), written as a gzip
//! tar holding `image/image.boot` and appended as the last layer; `rootfs.diff_ids` and the
//! history follow.

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;

use nydus_api::ConfigV2;
use nydus_builder::{ArtifactStorage, BuildContext, Merger};

use super::build::{LayerBootstrap, DIGESTER};
use super::{prefetch, NydusOptions, ANNOTATION_BOOTSTRAP, ANNOTATION_FS_VERSION, BOOTSTRAP_PATH};
use crate::drivers::tar::ustar_header;
use crate::drivers::{BlobAccess, ConvertedLayer, DriverError, DriverKind, ImageDraft};
use crate::oci::{annotations, media_types, Descriptor, Hasher};

/// `created_by` of the history entry of the bootstrap layer.
pub(super) const HISTORY_CREATED_BY: &str = "accel nydus driver";
/// `comment` of the history entry of the bootstrap layer.
pub(super) const HISTORY_COMMENT: &str = "Nydus bootstrap layer";

fn format_error(why: String) -> DriverError {
    DriverError::Format {
        driver: DriverKind::Nydus,
        why,
    }
}

pub(super) fn finish_image(
    opts: &NydusOptions,
    image: &mut ImageDraft,
    blobs: &dyn BlobAccess,
) -> Result<(), DriverError> {
    let mut sources = Vec::with_capacity(image.layers.len());
    let mut digests = Vec::with_capacity(image.layers.len());
    let mut sizes = Vec::with_capacity(image.layers.len());
    let mut ids = Vec::with_capacity(image.layers.len());
    for (i, layer) in image.layers.iter().enumerate() {
        let state = layer
            .state
            .as_ref()
            .and_then(|s| s.downcast_ref::<LayerBootstrap>())
            .ok_or_else(|| {
                format_error(format!(
                    "layer {i} ({}) has no Nydus bootstrap",
                    layer.descriptor.digest
                ))
            })?;
        sources.push(state.path());
        ids.push(
            state
                .blob_id
                .clone()
                .unwrap_or_else(|| layer.descriptor.digest.hex()),
        );
        digests.push(layer.descriptor.digest.hex());
        sizes.push(layer.descriptor.size);
    }

    let dir = tempfile::Builder::new()
        .prefix("accel-nydus-merge-")
        .tempdir()?;
    let target = dir.path().join("image.boot");
    merge_bootstraps(opts, sources, digests, ids, sizes, target.clone())?;

    let (bootstrap, diff_id) = write_bootstrap_layer(&target, blobs)?;
    let mut desc = bootstrap;
    desc.annotations
        .insert(ANNOTATION_BOOTSTRAP.into(), "true".into());
    desc.annotations
        .insert(ANNOTATION_FS_VERSION.into(), opts.fs_version.to_string());

    // A layer without file data has no blob: it is left out, its history entry made empty.
    let kept: Vec<bool> = image.layers.iter().map(|l| l.descriptor.size > 0).collect();
    let layers = std::mem::take(&mut image.layers);
    image.layers = layers
        .into_iter()
        .filter(|l| l.descriptor.size > 0)
        .map(|mut l| {
            l.state = None;
            l
        })
        .collect();
    image.layers.push(ConvertedLayer {
        descriptor: desc,
        diff_id,
        state: None,
    });
    rewrite_history(&mut image.config, &kept);
    image
        .annotations
        .insert(annotations::SOURCE_REFERENCE.into(), image.source.clone());
    Ok(())
}

fn merge_bootstraps(
    opts: &NydusOptions,
    sources: Vec<PathBuf>,
    digests: Vec<String>,
    ids: Vec<String>,
    sizes: Vec<u64>,
    target: PathBuf,
) -> Result<(), DriverError> {
    let prefetch = prefetch::prefetch(&opts.prefetch_patterns)?;
    let mut ctx = BuildContext {
        prefetch,
        digester: DIGESTER,
        ..Default::default()
    };
    // As `nydus-image merge` without a backend config: blobs are named by the lists given.
    let config = Arc::new(ConfigV2::default());
    config.internal.set_blob_accessible(false);
    ctx.configuration = config.clone();
    Merger::merge(
        &mut ctx,
        None,
        sources,
        Some(digests),
        Some(ids),
        Some(sizes),
        None,
        None,
        ArtifactStorage::SingleFile(target),
        None,
        config,
    )
    .map_err(|e| format_error(format!("nydus could not merge the layer bootstraps: {e:#}")))?;
    Ok(())
}

/// Stores the bootstrap layer: a gzip tar with `image/` and `image/image.boot`. Returns its
/// descriptor and diff_id.
fn write_bootstrap_layer(
    bootstrap: &std::path::Path,
    blobs: &dyn BlobAccess,
) -> Result<(Descriptor, crate::oci::Digest), DriverError> {
    let size = std::fs::metadata(bootstrap)?.len();
    let mut diff = None;
    let (digest, blob_size) = blobs.add(&mut |out: &mut dyn Write| {
        let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        let mut tar = HashingWriter {
            inner: gz,
            hasher: Hasher::new(),
        };
        let dir = BOOTSTRAP_PATH
            .rsplit_once('/')
            .map(|(d, _)| format!("{d}/"))
            .unwrap_or_default();
        tar.write_all(&ustar_header(&dir, b'5', 0, 0o755))?;
        tar.write_all(&ustar_header(BOOTSTRAP_PATH, b'0', size, 0o644))?;
        let mut file = std::fs::File::open(bootstrap)?;
        let copied = io::copy(&mut file, &mut tar)?;
        if copied != size {
            return Err(format_error(format!(
                "bootstrap changed size while being written ({size} -> {copied} bytes)"
            )));
        }
        tar.write_all(&vec![0u8; crate::drivers::tar::padding_len(size)])?;
        tar.write_all(&[0u8; 1024])?;
        let HashingWriter { inner, hasher } = tar;
        inner.finish()?;
        diff = Some(hasher.finish());
        Ok(())
    })?;
    let diff_id = diff.expect("the bootstrap layer was written");
    Ok((
        Descriptor::new(media_types::OCI_LAYER_GZIP, digest, blob_size),
        diff_id,
    ))
}

struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Keeps one history entry per layer: entries of the layers left out become empty, and the
/// bootstrap layer gets its own entry (as nydusify adds it). A history that does not match the
/// layers is left as it is, plus the bootstrap entry.
pub(super) fn rewrite_history(config: &mut serde_json::Value, kept: &[bool]) {
    let Some(history) = config.get_mut("history").and_then(|h| h.as_array_mut()) else {
        return;
    };
    let is_empty = |h: &serde_json::Value| {
        h.get("empty_layer")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    };
    let layer_entries = history.iter().filter(|h| !is_empty(h)).count();
    if layer_entries == kept.len() {
        let mut layer = 0;
        for h in history.iter_mut() {
            if is_empty(h) {
                continue;
            }
            if !kept[layer] {
                h["empty_layer"] = serde_json::Value::Bool(true);
            }
            layer += 1;
        }
    }
    history.push(serde_json::json!({
        "created_by": HISTORY_CREATED_BY,
        "comment": HISTORY_COMMENT,
    }));
}
