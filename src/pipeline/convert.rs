//! One conversion of one source image into one or more target formats. Manifests and configs
//! are fetched first; then each layer is pulled once, streamed into the store and, while it
//! arrives, decoded once and converted by every driver at the same time (layers beyond those
//! being converted are fetched into the store meanwhile). Each converted layer
//! is pushed as soon as it is done, while later layers are still being pulled and converted;
//! the targets' configs and manifests follow, pushed concurrently.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::naming::TargetNaming;
use super::progress::{Progress, Stage};
use super::blobs::StoreBlobs;
use super::fanout::{self, FanoutError};
use crate::drivers::{compression, ConvertedLayer, Driver, DriverError, DriverKind, ImageDraft, Publication};
use crate::oci::{annotations, media_types, Descriptor, Digest, ImageIndex, ImageManifest, Platform, PlatformSpec, Reference, ReferenceError};
use crate::registry::{RegistryClient, RegistryError};
use crate::store::{BlobReader, Lease, Store, StoreError};

/// Pieces of a layer download queued for the drivers while the store writes them too.
const STREAM_QUEUE: usize = 16;

/// One target to produce from the source.
#[derive(Clone)]
pub struct Conversion {
    pub driver: Arc<dyn Driver>,
    pub naming: TargetNaming,
}

pub struct ConvertRequest {
    pub source: Reference,
    pub conversions: Vec<Conversion>,
    /// Platforms to keep from an index; empty keeps every runnable image.
    pub platforms: Vec<Platform>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ConvertResult {
    pub source: Reference,
    pub source_digest: Digest,
    /// Bytes of the source: manifests, configs and layers.
    pub source_size: u64,
    pub targets: Vec<TargetResult>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TargetResult {
    pub driver: DriverKind,
    pub reference: Reference,
    pub digest: Digest,
    pub media_type: String,
    /// Bytes of the target: manifests, configs and layers.
    pub size: u64,
    /// Platforms converted, for a multi-platform target.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<Platform>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{action}: {source}")]
    Registry { action: String, source: RegistryError },
    #[error("content store: {0}")]
    Store(#[from] StoreError),
    #[error("layer {layer} of {image}: {source}")]
    Driver { image: String, layer: Digest, source: DriverError },
    #[error("image step of {driver} for {image}: {source}")]
    ImageStep { image: String, driver: DriverKind, source: DriverError },
    #[error("{reference}: {why}")]
    BadImage { reference: String, why: String },
    #[error("{reference}: not a container image ({why}); only images are converted")]
    NotAnImage { reference: String, why: String },
    #[error("layer {layer} of {image} decompresses to {actual}, but the image config lists diff_id {expected}; the source image is corrupt")]
    DiffIdMismatch { image: String, layer: Digest, expected: Digest, actual: Digest },
    #[error("{reference} has no image for platform(s) {wanted}; it has: {available}")]
    NoPlatform { reference: String, wanted: String, available: String },
    #[error("target name: {0}")]
    Target(#[from] ReferenceError),
    #[error("conversion worker stopped unexpectedly: {0}")]
    Join(String),
}

impl ConvertError {
    /// Whether the same conversion may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConvertError::Registry { source, .. } => source.is_retryable(),
            ConvertError::Store(e) => e.is_retryable(),
            ConvertError::Driver { source: DriverError::Io(_), .. } => true,
            ConvertError::ImageStep { source: DriverError::Io(_), .. } => true,
            _ => false,
        }
    }
}

/// A platform image of the source: manifest and config fetched; its layers are pulled as they
/// are converted.
struct SourceImage {
    reference: Reference,
    digest: Digest,
    /// The index entry it came from (platform, annotations), for a multi-platform source.
    entry: Option<Descriptor>,
    manifest: ImageManifest,
    /// The manifest as pulled, for a target that republishes it (a merged index).
    manifest_bytes: Bytes,
    manifest_size: u64,
    config: serde_json::Value,
}

impl SourceImage {
    /// The source manifest as an index entry: its platform is the index entry's, else the
    /// config's.
    fn descriptor(&self) -> Descriptor {
        let media_type = self.manifest.media_type.clone().unwrap_or_else(|| media_types::OCI_MANIFEST.to_string());
        let mut d = Descriptor::new(&media_type, self.digest.clone(), self.manifest_size);
        d.platform = match &self.entry {
            Some(e) => e.platform.clone(),
            None => {
                let field = |k: &str| self.config.get(k).and_then(|v| v.as_str()).map(str::to_string);
                match (field("os"), field("architecture")) {
                    (Some(os), Some(architecture)) => Some(PlatformSpec { architecture, os, variant: field("variant"), extra: Default::default() }),
                    _ => None,
                }
            }
        };
        d
    }

    /// The source's config and layers.
    fn blobs(&self) -> Vec<Descriptor> {
        let mut blobs = vec![self.manifest.config.clone()];
        blobs.extend(self.manifest.layers.iter().cloned());
        blobs
    }
}

/// A converted platform image, in the store, ready to push.
struct TargetImage {
    entry: Option<Descriptor>,
    /// The source manifest (as an index entry), its bytes and blobs.
    source: Descriptor,
    source_bytes: Bytes,
    source_blobs: Vec<Descriptor>,
    manifest: Bytes,
    digest: Digest,
    blobs: Vec<Descriptor>,
    size: u64,
}

pub struct Converter {
    registry: Arc<RegistryClient>,
    store: Arc<dyn Store>,
    progress: Arc<dyn Progress>,
    /// Layers converted at once. Each driver already uses every core inside a layer; two
    /// overlaps one layer's reading with another's compression.
    layer_jobs: usize,
    /// Blob transfers at once.
    transfer_jobs: usize,
}

const RETRIES: u32 = 3;

impl Converter {
    pub fn new(registry: Arc<RegistryClient>, store: Arc<dyn Store>, progress: Arc<dyn Progress>) -> Self {
        Converter { registry, store, progress, layer_jobs: 2, transfer_jobs: 4 }
    }

    pub async fn convert(&self, req: &ConvertRequest) -> Result<ConvertResult, ConvertError> {
        let lease = self.store.lease().await?;
        let result = self.convert_leased(req, &lease).await;
        lease.release().await;
        result
    }

    async fn convert_leased(&self, req: &ConvertRequest, lease: &Lease) -> Result<ConvertResult, ConvertError> {
        let source = &req.source;
        self.progress.stage(Stage::Pulling, source);
        let top = self
            .retry(&format!("fetch manifest of {source}"), || self.registry.get_manifest(source))
            .await?;
        let (images, index) = if media_types::is_index(&top.media_type) {
            let index: ImageIndex = parse_json(&top.bytes, source)?;
            let entries = select_platforms(source, &index, &req.platforms)?;
            let mut images = Vec::new();
            for entry in entries {
                let r = source.repository_only().with_digest(entry.digest.clone());
                let m = self.retry(&format!("fetch manifest {}", r), || self.registry.get_manifest(&r)).await?;
                images.push(self.pull_image(source, m.bytes, m.digest, Some(entry), lease).await?);
            }
            (images, Some(index))
        } else if media_types::is_manifest(&top.media_type) {
            let image = self.pull_image(source, top.bytes.clone(), top.digest.clone(), None, lease).await?;
            check_single_platform(source, &image, &req.platforms)?;
            (vec![image], None)
        } else {
            return Err(ConvertError::NotAnImage {
                reference: source.to_string(),
                why: format!("manifest media type {}", top.media_type),
            });
        };
        let source_size = top.bytes.len() as u64
            + if index.is_some() { images.iter().map(|i| i.manifest_size).sum::<u64>() } else { 0 }
            + images.iter().map(image_blob_size).sum::<u64>();

        // Every target is named before any work, so a bad name fails fast.
        let target_refs = req.conversions.iter().map(|c| c.naming.target_for(source)).collect::<Result<Vec<_>, _>>()?;
        let drivers: Vec<Arc<dyn Driver>> = req.conversions.iter().map(|c| c.driver.clone()).collect();
        let mounts: Vec<Option<&Reference>> = target_refs.iter().map(|t| mount_source(source, t)).collect();
        let pulls = LayerPulls::new(source, images.iter().map(|i| i.manifest.layers.len()).sum());
        if pulls.remaining.load(Ordering::Relaxed) == 0 {
            self.progress.stage(Stage::Pulled, source);
        }
        self.progress.stage(Stage::Converting, source);
        // Converted layers go to their targets while the next layers are pulled and converted.
        let (early_tx, early_rx) = mpsc::unbounded_channel::<(usize, Descriptor)>();
        let conversions = async {
            let early_tx = early_tx;
            let mut converted: Vec<Vec<TargetImage>> = drivers.iter().map(|_| Vec::new()).collect();
            for image in &images {
                for (k, target) in self.convert_image(image, &drivers, &pulls, &early_tx, lease).await?.into_iter().enumerate() {
                    converted[k].push(target);
                }
            }
            Ok::<_, ConvertError>(converted)
        };
        let (converted, pushed) = futures::try_join!(conversions, self.push_early(early_rx, &target_refs, &mounts))?;
        let top_desc = Descriptor::new(&top.media_type, top.digest.clone(), top.bytes.len() as u64);
        let pushes = req.conversions.iter().zip(&target_refs).zip(converted).zip(&pushed).map(|(((conv, target_ref), images), pushed)| {
            let index = index.as_ref();
            let top_desc = &top_desc;
            async move {
                self.progress.stage(Stage::Converted, target_ref);
                self.progress.stage(Stage::Pushing, target_ref);
                let result = self.push_target(source, top_desc, target_ref, conv, images, index, pushed, lease).await?;
                self.progress.stage(Stage::Pushed, &result.reference);
                Ok::<_, ConvertError>(result)
            }
        });
        let targets = futures::future::try_join_all(pushes).await?;
        Ok(ConvertResult { source: source.clone(), source_digest: top.digest, source_size, targets })
    }

    async fn pull_image(
        &self,
        source: &Reference,
        bytes: Bytes,
        digest: Digest,
        entry: Option<Descriptor>,
        lease: &Lease,
    ) -> Result<SourceImage, ConvertError> {
        let reference = source.repository_only().with_digest(digest.clone());
        let manifest: ImageManifest = parse_manifest(&bytes, &reference)?;
        let config_type = manifest.config.media_type.as_str();
        if config_type != media_types::OCI_CONFIG && config_type != media_types::DOCKER_CONFIG {
            return Err(ConvertError::NotAnImage { reference: reference.to_string(), why: format!("config media type {config_type}") });
        }
        for layer in &manifest.layers {
            if compression::Compression::from_media_type(&layer.media_type).is_none() {
                return Err(ConvertError::NotAnImage {
                    reference: reference.to_string(),
                    why: format!("layer {} has media type {}, which is not a tar layer", layer.digest, layer.media_type),
                });
            }
            if layer.extra.contains_key("urls") {
                return Err(ConvertError::BadImage {
                    reference: reference.to_string(),
                    why: format!("layer {} is a foreign layer (it has `urls`); such layers cannot be redistributed", layer.digest),
                });
            }
        }
        // The layers are pulled while they are converted (`convert_layer`).
        self.pull_blob(source, &manifest.config, lease).await?;
        let config_bytes = self.read_small(&manifest.config.digest).await?;
        let config: serde_json::Value = parse_json(&config_bytes, &reference)?;
        let diff_ids = config.pointer("/rootfs/diff_ids").and_then(|v| v.as_array()).map(|v| v.len());
        if diff_ids != Some(manifest.layers.len()) {
            return Err(ConvertError::BadImage {
                reference: reference.to_string(),
                why: format!(
                    "config lists {} diff_ids for {} layers",
                    diff_ids.map(|n| n.to_string()).unwrap_or_else(|| "no".into()),
                    manifest.layers.len()
                ),
            });
        }
        Ok(SourceImage { reference, digest, entry, manifest, manifest_size: bytes.len() as u64, manifest_bytes: bytes, config })
    }

    /// Makes a blob of the source present in the store.
    async fn pull_blob(&self, source: &Reference, d: &Descriptor, lease: &Lease) -> Result<(), ConvertError> {
        lease.add(&d.digest).await?;
        if self.store.has(&d.digest).await?.is_some() {
            return Ok(());
        }
        self.pull_with_retries(source, d, lease).await
    }

    /// Pulls a blob into the store, trying again after retryable errors. The caller has added
    /// it to the lease.
    async fn pull_with_retries(&self, source: &Reference, d: &Descriptor, lease: &Lease) -> Result<(), ConvertError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.pull_once(source, d, None, lease).await {
                Err(e) if e.is_retryable() && attempt < RETRIES => {
                    tracing::warn!(digest = %d.digest, attempt, "retrying after: {e}");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                other => return other,
            }
        }
    }

    async fn read_small(&self, d: &Digest) -> Result<Bytes, ConvertError> {
        use tokio::io::AsyncReadExt;
        let mut r = self.store.reader(d).await?;
        let mut buf = Vec::new();
        r.read_to_end(&mut buf).await.map_err(|e| StoreError::Io { path: d.to_string().into(), source: e })?;
        Ok(buf.into())
    }

    async fn put_small(&self, data: &[u8], lease: &Lease) -> Result<Digest, ConvertError> {
        let mut w = self.store.writer(lease).await?;
        w.write_all(data).await.map_err(|e| StoreError::Io { path: "ingest".into(), source: e })?;
        let (d, _) = w.commit(Some(&Digest::of(data))).await?;
        Ok(d)
    }

    /// Converts one platform image with every driver: each layer is decoded once for all of
    /// them. Returns one target image per driver, in driver order.
    /// Converted layers are sent to `early` (driver index, blob) as soon as they are stored.
    async fn convert_image(
        &self,
        image: &SourceImage,
        drivers: &[Arc<dyn Driver>],
        pulls: &LayerPulls<'_>,
        early: &mpsc::UnboundedSender<(usize, Descriptor)>,
        lease: &Lease,
    ) -> Result<Vec<TargetImage>, ConvertError> {
        let source = pulls.source;
        let layers = &image.manifest.layers;
        self.progress.add_steps(layers.len() as u64);
        let diff_ids: Vec<Option<Digest>> = (0..layers.len())
            .map(|i| image.config.pointer(&format!("/rootfs/diff_ids/{i}")).and_then(|v| v.as_str()).and_then(|s| s.parse().ok()))
            .collect();
        let conversions = futures::stream::iter(layers.iter().cloned().zip(diff_ids))
            .map(|(layer, diff_id)| async move {
                let out = self.convert_layer(image, &layer, diff_id, drivers, pulls, lease).await?;
                let sizes: Vec<String> = drivers.iter().zip(&out).map(|(d, l)| format!("{} {}", d.kind(), human(l.descriptor.size))).collect();
                self.progress.step_done(&format!("converted layer {} ({} -> {})", layer.digest, human(layer.size), sizes.join(", ")));
                for (k, converted) in out.iter().enumerate() {
                    // An empty output is no blob (a Nydus driver leaves such layers out).
                    if converted.descriptor.size > 0 {
                        // The receiver lives as long as the conversion; a send cannot fail before.
                        let _ = early.send((k, converted.descriptor.clone()));
                    }
                }
                Ok::<_, ConvertError>(out)
            })
            .buffered(self.layer_jobs)
            .try_collect::<Vec<Vec<ConvertedLayer>>>();
        // The first layers are pulled by their conversions; the next ones are fetched into the
        // store meanwhile, so the transfers stay busy however many layers there are.
        let ahead = layers.iter().skip(self.layer_jobs).cloned().collect::<Vec<_>>();
        let (per_layer, ()) = futures::try_join!(conversions, async {
            self.prefetch(ahead, pulls, lease).await;
            Ok::<(), ConvertError>(())
        })?;
        let mut per_driver: Vec<Vec<ConvertedLayer>> = drivers.iter().map(|_| Vec::with_capacity(layers.len())).collect();
        for layer in per_layer {
            for (k, converted) in layer.into_iter().enumerate() {
                per_driver[k].push(converted);
            }
        }
        let targets = drivers.iter().zip(per_driver).map(|(driver, converted)| async move {
            let mut annotations = image.manifest.annotations.clone();
            annotations.insert(annotations::SOURCE_DIGEST.into(), image.digest.to_string());
            annotations.insert(annotations::DRIVER.into(), format!("{}/{}", driver.kind(), driver.version()));
            let draft = ImageDraft { layers: converted, config: image.config.clone(), annotations, source: source.to_string() };
            let draft = self.finish_image(image, driver.clone(), draft, lease).await?;
            self.assemble(image, draft, driver.publication(), lease).await
        });
        futures::future::try_join_all(targets).await
    }

    /// Runs the driver's image step on the blocking pool.
    async fn finish_image(&self, image: &SourceImage, driver: Arc<dyn Driver>, mut draft: ImageDraft, lease: &Lease) -> Result<ImageDraft, ConvertError> {
        let blobs = StoreBlobs::new(self.store.clone());
        let kind = driver.kind();
        let (result, draft, blobs) = tokio::task::spawn_blocking(move || {
            let result = driver.finish_image(&mut draft, &blobs);
            (result, draft, blobs)
        })
        .await
        .map_err(|e| ConvertError::Join(e.to_string()))?;
        result.map_err(|source| ConvertError::ImageStep { image: image.reference.to_string(), driver: kind, source })?;
        blobs.store_added(lease).await?;
        Ok(draft)
    }

    /// Stores the config of a finished draft and builds its manifest.
    async fn assemble(&self, image: &SourceImage, draft: ImageDraft, publication: Publication, lease: &Lease) -> Result<TargetImage, ConvertError> {
        let ImageDraft { layers, mut config, annotations, source: _ } = draft;
        let new_ids: Vec<serde_json::Value> = layers.iter().map(|l| serde_json::Value::String(l.diff_id.to_string())).collect();
        config["rootfs"]["diff_ids"] = serde_json::Value::Array(new_ids);
        let config_bytes = serde_json::to_vec(&config).map_err(|e| ConvertError::BadImage { reference: image.reference.to_string(), why: e.to_string() })?;
        let config_digest = self.put_small(&config_bytes, lease).await?;
        let config_desc = Descriptor::new(media_types::OCI_CONFIG, config_digest, config_bytes.len() as u64);

        let mut manifest = image.manifest.clone();
        manifest.media_type = Some(media_types::OCI_MANIFEST.to_string());
        manifest.config = config_desc.clone();
        manifest.layers = layers.into_iter().map(|l| l.descriptor).collect();
        manifest.annotations = annotations;
        if publication == Publication::Referrer {
            let mut subject = image.descriptor();
            subject.platform = None;
            manifest.subject = Some(subject);
        }
        let bytes = Bytes::from(serde_json::to_vec(&manifest).expect("manifest serializes"));
        self.store.put_manifest(media_types::OCI_MANIFEST, &bytes, lease).await?;
        let mut blobs = manifest.layers.clone();
        blobs.push(config_desc);
        let size = bytes.len() as u64 + blobs.iter().map(|b| b.size).sum::<u64>();
        Ok(TargetImage {
            entry: image.entry.clone(),
            source: image.descriptor(),
            source_bytes: image.manifest_bytes.clone(),
            source_blobs: image.blobs(),
            digest: Digest::of(&bytes),
            manifest: bytes,
            blobs,
            size,
        })
    }

    /// Converts one source layer with every driver at once, from one decoding of it, and
    /// checks the decoded stream against the config's diff_id. A layer missing from the store
    /// is pulled into it and converted as it arrives; the drivers see the end of the stream
    /// only once the store has checked the blob's digest. When that pull breaks off, the layer
    /// is pulled again in full (with retries) and converted from the store.
    async fn convert_layer(
        &self,
        image: &SourceImage,
        layer: &Descriptor,
        expected_diff_id: Option<Digest>,
        drivers: &[Arc<dyn Driver>],
        pulls: &LayerPulls<'_>,
        lease: &Lease,
    ) -> Result<Vec<ConvertedLayer>, ConvertError> {
        lease.add(&layer.digest).await?;
        let _turn = loop {
            if self.store.has(&layer.digest).await?.is_some() {
                self.layer_pulled(pulls, layer, false);
                let reader = self.store.reader(&layer.digest).await?;
                return self.convert_stream(image, layer, expected_diff_id, drivers, reader, lease).await;
            }
            match pulls.claim(&layer.digest) {
                Claim::Mine(turn) => break turn,
                // Being fetched ahead, or by the conversion of the same layer in another image
                // slot: wait for that to end, then take it from the store (or pull it here).
                Claim::Wait(mut done) => {
                    let _ = done.changed().await;
                }
            }
        };
        let (feed, pieces) = futures::channel::mpsc::channel::<io::Result<Bytes>>(STREAM_QUEUE);
        let input: BlobReader = Box::new(StreamReader::new(pieces));
        let (pulled, converted) = futures::join!(
            self.pull_and_feed(pulls.source, layer, feed, lease),
            self.convert_stream(image, layer, expected_diff_id.clone(), drivers, input, lease)
        );
        match pulled {
            Ok(()) => {
                self.layer_pulled(pulls, layer, true);
                converted
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(digest = %layer.digest, "pulling the layer while converting it broke off ({e}); pulling it again before converting it");
                self.pull_with_retries(pulls.source, layer, lease).await?;
                self.layer_pulled(pulls, layer, true);
                let reader = self.store.reader(&layer.digest).await?;
                self.convert_stream(image, layer, expected_diff_id, drivers, reader, lease).await
            }
            Err(e) => Err(e),
        }
    }

    /// Fetches `layers` into the store, a few at a time, skipping those present or already
    /// being fetched. A failure is left to the layer's conversion, which pulls it again and
    /// reports it.
    async fn prefetch(&self, layers: Vec<Descriptor>, pulls: &LayerPulls<'_>, lease: &Lease) {
        let jobs = self.transfer_jobs.saturating_sub(self.layer_jobs).max(1);
        futures::stream::iter(layers)
            .for_each_concurrent(jobs, |layer| async move {
                if lease.add(&layer.digest).await.is_err() || !matches!(self.store.has(&layer.digest).await, Ok(None)) {
                    return;
                }
                let Claim::Mine(_turn) = pulls.claim(&layer.digest) else { return };
                match self.pull_with_retries(pulls.source, &layer, lease).await {
                    Ok(()) => pulls.fetched_ahead(&layer.digest),
                    Err(e) => tracing::debug!(digest = %layer.digest, "fetching a layer ahead of its conversion failed: {e}"),
                }
            })
            .await;
    }

    /// A layer is in the store for its conversion: pulled by it (`pulled_here`), fetched ahead,
    /// or there before.
    fn layer_pulled(&self, pulls: &LayerPulls<'_>, layer: &Descriptor, pulled_here: bool) {
        self.progress.add_steps(1);
        let pulled = pulled_here || pulls.was_fetched_ahead(&layer.digest);
        let how = if pulled { "pulled layer" } else { "layer already in the store:" };
        self.progress.step_done(&format!("{how} {} ({})", layer.digest, human(layer.size)));
        if pulls.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.progress.stage(Stage::Pulled, pulls.source);
        }
    }

    /// One pull of a blob into the store, each piece also sent to `feed`. The feed ends after
    /// the store has committed the blob under its digest, or with an error saying why not;
    /// when its reader goes away early, the blob is still pulled and stored.
    async fn pull_and_feed(
        &self,
        source: &Reference,
        d: &Descriptor,
        mut feed: futures::channel::mpsc::Sender<io::Result<Bytes>>,
        lease: &Lease,
    ) -> Result<(), ConvertError> {
        use futures::SinkExt;
        let result = self.pull_once(source, d, Some(&mut feed), lease).await;
        if let Err(e) = &result {
            // The drivers must not take a cut or unverified stream for a whole layer.
            let _ = feed.send(Err(io::Error::other(e.to_string()))).await;
        }
        result
    }

    /// One download of a blob into the store, committed under its digest; each piece is also
    /// sent to `feed` while its reader is there.
    async fn pull_once(
        &self,
        source: &Reference,
        d: &Descriptor,
        mut feed: Option<&mut futures::channel::mpsc::Sender<io::Result<Bytes>>>,
        lease: &Lease,
    ) -> Result<(), ConvertError> {
        use futures::SinkExt;
        let action = || format!("pull blob {} of {}", d.digest, source.name());
        let mut blob = self.registry.get_blob(source, &d.digest).await.map_err(|e| ConvertError::Registry { action: action(), source: e })?;
        let mut w = self.store.writer(lease).await?;
        while let Some(piece) = blob.stream.next().await {
            let piece = piece.map_err(|e| ConvertError::Registry { action: action(), source: e })?;
            w.write_all(&piece).await.map_err(|e| StoreError::Io { path: "ingest".into(), source: e })?;
            if let Some(f) = feed.as_deref_mut() {
                if f.send(Ok(piece)).await.is_err() {
                    feed = None;
                }
            }
        }
        w.commit(Some(&d.digest)).await?;
        Ok(())
    }

    /// Converts one layer, read from `input`, with every driver (see `convert_layer`).
    async fn convert_stream(
        &self,
        image: &SourceImage,
        layer: &Descriptor,
        expected_diff_id: Option<Digest>,
        drivers: &[Arc<dyn Driver>],
        reader: BlobReader,
        lease: &Lease,
    ) -> Result<Vec<ConvertedLayer>, ConvertError> {
        let mut writers = Vec::with_capacity(drivers.len());
        for _ in drivers {
            // The bridges block on the runtime from the blocking pool, never from executor threads.
            writers.push(SyncIoBridge::new(self.store.writer(lease).await?));
        }
        let media_type = layer.media_type.clone();
        let input = SyncIoBridge::new(reader);
        let all = drivers.to_vec();
        let joined = tokio::task::spawn_blocking(move || {
            let (decoded, outputs) = fanout::convert_all(input, &media_type, &all, writers)?;
            let mut done = Vec::with_capacity(outputs.len());
            for (i, (produced, mut bridge)) in outputs.into_iter().enumerate() {
                bridge.shutdown().map_err(|e| FanoutError::Driver(i, DriverError::Io(e)))?;
                done.push((produced, bridge.into_inner()));
            }
            Ok::<_, FanoutError>((decoded, done))
        })
        .await
        .map_err(|e| ConvertError::Join(e.to_string()))?;
        let (decoded, outputs) = joined.map_err(|e| match e {
            FanoutError::Source(source) => ConvertError::Driver { image: image.reference.to_string(), layer: layer.digest.clone(), source },
            FanoutError::Driver(i, source) => ConvertError::Driver {
                image: format!("{} ({})", image.reference, drivers[i].kind()),
                layer: layer.digest.clone(),
                source,
            },
        })?;
        self.progress.layer_decoded(&layer.digest, decoded.size, drivers.len());
        if let Some(expected) = expected_diff_id {
            if expected != decoded.diff_id {
                return Err(ConvertError::DiffIdMismatch {
                    image: image.reference.to_string(),
                    layer: layer.digest.clone(),
                    expected,
                    actual: decoded.diff_id,
                });
            }
        }
        let mut converted = Vec::with_capacity(outputs.len());
        for (produced, writer) in outputs {
            let (digest, size) = writer.commit(None).await?;
            let mut descriptor = Descriptor::new(&produced.media_type, digest, size);
            descriptor.annotations = produced.annotations;
            let diff_id = produced.diff_id.unwrap_or_else(|| decoded.diff_id.clone());
            converted.push(ConvertedLayer { descriptor, diff_id, state: produced.state });
        }
        Ok(converted)
    }

    #[allow(clippy::too_many_arguments)]
    async fn push_target(
        &self,
        source: &Reference,
        source_top: &Descriptor,
        target: &Reference,
        conv: &Conversion,
        images: Vec<TargetImage>,
        index: Option<&ImageIndex>,
        pushed: &HashSet<Digest>,
        lease: &Lease,
    ) -> Result<TargetResult, ConvertError> {
        let source_digest = &source_top.digest;
        let mount_from = mount_source(source, target);
        let publication = conv.driver.publication();
        for image in &images {
            let rest: Vec<Descriptor> = image.blobs.iter().filter(|b| !pushed.contains(&b.digest)).cloned().collect();
            self.push_blobs(target, &rest, mount_from).await?;
        }
        if let Publication::MergedIndex { artifact_type, os_feature } = publication {
            return self.push_merged_index(source_top, target, conv, images, index, mount_from, artifact_type, os_feature, lease).await;
        }
        let driver = &conv.driver;
        let Some(index) = index else {
            let image = images.into_iter().next().expect("one image for a manifest source");
            let digest = self.put_manifest(target, media_types::OCI_MANIFEST, image.manifest.clone()).await?;
            let top = Descriptor::new(media_types::OCI_MANIFEST, digest.clone(), image.manifest.len() as u64);
            self.store.register_image(target, &top).await?;
            return Ok(TargetResult {
                driver: driver.kind(),
                reference: target.clone(),
                digest,
                media_type: media_types::OCI_MANIFEST.into(),
                size: image.size,
                platforms: Vec::new(),
            });
        };
        let mut new_index = index.clone();
        new_index.media_type = Some(media_types::OCI_INDEX.to_string());
        new_index.manifests.clear();
        let mut size = 0;
        let mut platforms = Vec::new();
        for image in images {
            let child = target.repository_only().with_digest(image.digest.clone());
            self.put_manifest(&child, media_types::OCI_MANIFEST, image.manifest.clone()).await?;
            let mut entry = image.entry.clone().expect("index entries carry their descriptor");
            entry.media_type = media_types::OCI_MANIFEST.to_string();
            entry.digest = image.digest.clone();
            entry.size = image.manifest.len() as u64;
            if let Some(p) = &entry.platform {
                platforms.push(p.platform());
            }
            size += image.size;
            new_index.manifests.push(entry);
        }
        new_index.annotations.insert(annotations::SOURCE_DIGEST.into(), source_digest.to_string());
        new_index.annotations.insert(annotations::DRIVER.into(), format!("{}/{}", driver.kind(), driver.version()));
        if publication == Publication::Referrer {
            new_index.subject = Some(source_top.clone());
        }
        let bytes = Bytes::from(serde_json::to_vec(&new_index).expect("index serializes"));
        size += bytes.len() as u64;
        self.store.put_manifest(media_types::OCI_INDEX, &bytes, lease).await?;
        let top_size = bytes.len() as u64;
        let digest = self.put_manifest(target, media_types::OCI_INDEX, bytes).await?;
        self.store.register_image(target, &Descriptor::new(media_types::OCI_INDEX, digest.clone(), top_size)).await?;
        Ok(TargetResult { driver: driver.kind(), reference: target.clone(), digest, media_type: media_types::OCI_INDEX.into(), size, platforms })
    }

    /// Pushes the converted layers sent on `early` (driver index, blob) to that driver's target
    /// as they come, until the sender is dropped. Returns, per driver, the blobs pushed.
    async fn push_early(
        &self,
        early: mpsc::UnboundedReceiver<(usize, Descriptor)>,
        targets: &[Reference],
        mounts: &[Option<&Reference>],
    ) -> Result<Vec<HashSet<Digest>>, ConvertError> {
        let mut pushed: Vec<HashSet<Digest>> = targets.iter().map(|_| HashSet::new()).collect();
        let incoming = futures::stream::unfold(early, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        incoming
            .filter(|(k, b)| futures::future::ready(pushed[*k].insert(b.digest.clone())))
            .map(|(k, b)| async move {
                self.progress.add_steps(1);
                self.push_blob(&targets[k], &b, mounts[k]).await?;
                self.progress.step_done(&format!("pushed blob {} ({})", b.digest, human(b.size)));
                Ok::<_, ConvertError>(())
            })
            .buffer_unordered(self.transfer_jobs)
            .try_collect::<()>()
            .await?;
        Ok(pushed)
    }

    async fn push_blobs(&self, target: &Reference, blobs: &[Descriptor], mount_from: Option<&Reference>) -> Result<(), ConvertError> {
        self.progress.add_steps(blobs.len() as u64);
        futures::stream::iter(blobs.iter().cloned())
            .map(|b| async move {
                self.push_blob(target, &b, mount_from).await?;
                self.progress.step_done(&format!("pushed blob {} ({})", b.digest, human(b.size)));
                Ok::<_, ConvertError>(())
            })
            .buffer_unordered(self.transfer_jobs)
            .try_collect::<()>()
            .await
    }

    /// Publishes one index holding, per platform, the source manifest and the target manifest
    /// (marked with `artifact_type` and the `os_feature` platform feature), so one tag serves
    /// runtimes that read the target format and those that do not. The source manifests and
    /// blobs are copied into the target repository when it is another one.
    #[allow(clippy::too_many_arguments)]
    async fn push_merged_index(
        &self,
        source_top: &Descriptor,
        target: &Reference,
        conv: &Conversion,
        images: Vec<TargetImage>,
        index: Option<&ImageIndex>,
        mount_from: Option<&Reference>,
        artifact_type: &str,
        os_feature: &str,
        lease: &Lease,
    ) -> Result<TargetResult, ConvertError> {
        let driver = &conv.driver;
        let mut merged: ImageIndex = match index {
            Some(index) => {
                let mut i = index.clone();
                i.manifests.clear();
                i
            }
            None => serde_json::from_value(serde_json::json!({"schemaVersion": 2, "manifests": []})).expect("empty index parses"),
        };
        merged.media_type = Some(media_types::OCI_INDEX.to_string());
        let mut size = 0;
        let mut platforms = Vec::new();
        for image in images {
            self.push_blobs(target, &image.source_blobs, mount_from).await?;
            let source_ref = target.repository_only().with_digest(image.source.digest.clone());
            // The index names it, so the store keeps it with the index.
            self.store.put_manifest(&image.source.media_type, &image.source_bytes, lease).await?;
            self.put_manifest(&source_ref, &image.source.media_type, image.source_bytes.clone()).await?;
            let child = target.repository_only().with_digest(image.digest.clone());
            self.put_manifest(&child, media_types::OCI_MANIFEST, image.manifest.clone()).await?;
            let mut entry = Descriptor::new(media_types::OCI_MANIFEST, image.digest.clone(), image.manifest.len() as u64);
            entry.artifact_type = Some(artifact_type.to_string());
            let mut platform = image.source.platform.clone().unwrap_or_else(|| PlatformSpec {
                architecture: String::new(),
                os: String::new(),
                variant: None,
                extra: Default::default(),
            });
            if !platform.os.is_empty() {
                platforms.push(platform.platform());
            }
            let features = platform.extra.entry("os.features").or_insert_with(|| serde_json::json!([]));
            if let Some(list) = features.as_array_mut() {
                list.push(serde_json::Value::String(os_feature.to_string()));
            }
            entry.platform = Some(platform);
            size += image.size;
            merged.manifests.push(image.source);
            merged.manifests.push(entry);
        }
        merged.annotations.insert(annotations::SOURCE_DIGEST.into(), source_top.digest.to_string());
        merged.annotations.insert(annotations::DRIVER.into(), format!("{}/{}", driver.kind(), driver.version()));
        let bytes = Bytes::from(serde_json::to_vec(&merged).expect("index serializes"));
        size += bytes.len() as u64;
        self.store.put_manifest(media_types::OCI_INDEX, &bytes, lease).await?;
        let top_size = bytes.len() as u64;
        let digest = self.put_manifest(target, media_types::OCI_INDEX, bytes).await?;
        self.store.register_image(target, &Descriptor::new(media_types::OCI_INDEX, digest.clone(), top_size)).await?;
        Ok(TargetResult { driver: driver.kind(), reference: target.clone(), digest, media_type: media_types::OCI_INDEX.into(), size, platforms })
    }

    async fn push_blob(&self, target: &Reference, b: &Descriptor, mount_from: Option<&Reference>) -> Result<(), ConvertError> {
        let action = format!("push blob {} to {}", b.digest, target.name());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let body = self.store.reader(&b.digest).await?;
            match self.registry.push_blob(target, &b.digest, b.size, mount_from, body).await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_retryable() && attempt < RETRIES => {
                    tracing::warn!(digest = %b.digest, attempt, "retrying push after: {e}");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => return Err(ConvertError::Registry { action, source: e }),
            }
        }
    }

    async fn put_manifest(&self, target: &Reference, media_type: &str, bytes: Bytes) -> Result<Digest, ConvertError> {
        self.retry(&format!("push manifest {target}"), || self.registry.put_manifest(target, media_type, bytes.clone())).await
    }

    async fn retry<T, F, Fut>(&self, action: &str, mut f: F) -> Result<T, ConvertError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && attempt < RETRIES => {
                    tracing::warn!(attempt, "{action}: retrying after: {e}");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => return Err(ConvertError::Registry { action: action.to_string(), source: e }),
            }
        }
    }
}

/// The layer transfers of one conversion, across its images.
struct LayerPulls<'a> {
    source: &'a Reference,
    /// Layers not yet pulled or found in the store.
    remaining: AtomicUsize,
    /// Layers being pulled: whoever claimed one holds its sender, and dropping it wakes those
    /// waiting for it.
    claims: Mutex<HashMap<Digest, watch::Receiver<()>>>,
    /// Layers fetched into the store ahead of their conversion.
    fetched_ahead: Mutex<HashSet<Digest>>,
}

enum Claim {
    /// The caller pulls the layer; others wait until this is dropped.
    Mine(#[allow(dead_code)] watch::Sender<()>),
    /// Someone else is pulling it; `changed()` returns once they are done.
    Wait(watch::Receiver<()>),
}

impl<'a> LayerPulls<'a> {
    fn new(source: &'a Reference, layers: usize) -> Self {
        LayerPulls { source, remaining: AtomicUsize::new(layers), claims: Mutex::default(), fetched_ahead: Mutex::default() }
    }

    fn claim(&self, d: &Digest) -> Claim {
        let mut claims = self.claims.lock().unwrap();
        if let Some(rx) = claims.get(d) {
            // Err once the claimer's sender is gone, i.e. that pull has ended.
            if rx.has_changed().is_ok() {
                return Claim::Wait(rx.clone());
            }
        }
        let (tx, rx) = watch::channel(());
        claims.insert(d.clone(), rx);
        Claim::Mine(tx)
    }

    fn fetched_ahead(&self, d: &Digest) {
        self.fetched_ahead.lock().unwrap().insert(d.clone());
    }

    fn was_fetched_ahead(&self, d: &Digest) -> bool {
        self.fetched_ahead.lock().unwrap().contains(d)
    }
}

/// Where a target's blobs can be mounted from: the source, when it is another repository of
/// the same registry.
fn mount_source<'a>(source: &'a Reference, target: &Reference) -> Option<&'a Reference> {
    (source.registry() == target.registry() && source.repository() != target.repository()).then_some(source)
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500 * 2u64.pow(attempt.saturating_sub(1)))
}

fn image_blob_size(i: &SourceImage) -> u64 {
    i.manifest.config.size + i.manifest.layers.iter().map(|l| l.size).sum::<u64>()
}

fn human(bytes: u64) -> String {
    const MIB: f64 = (1 << 20) as f64;
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / MIB)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], reference: &Reference) -> Result<T, ConvertError> {
    serde_json::from_slice(bytes).map_err(|e| ConvertError::BadImage { reference: reference.to_string(), why: format!("malformed JSON document: {e}") })
}

fn parse_manifest(bytes: &[u8], reference: &Reference) -> Result<ImageManifest, ConvertError> {
    let v: serde_json::Value = parse_json(bytes, reference)?;
    if v.get("schemaVersion").and_then(|s| s.as_u64()) == Some(1) {
        return Err(ConvertError::BadImage {
            reference: reference.to_string(),
            why: "Docker schema 1 manifests are not supported; re-push the image with a current client".into(),
        });
    }
    parse_json(bytes, reference)
}

/// Which index entries are converted. Entries that are not runnable images are left out of the
/// converted index: attestation manifests (platform `unknown/unknown` or the
/// `vnd.docker.reference.type` annotation), nested indexes, and non-manifest artifacts — they
/// describe the source manifests, not the converted ones. With `platforms`, only entries that
/// one of them selects are kept.
fn select_platforms(source: &Reference, index: &ImageIndex, platforms: &[Platform]) -> Result<Vec<Descriptor>, ConvertError> {
    let mut keep = Vec::new();
    let mut available = Vec::new();
    for entry in &index.manifests {
        let attestation = entry.annotations.contains_key("vnd.docker.reference.type")
            || entry.platform.as_ref().is_some_and(|p| p.platform().is_unknown());
        if attestation || !media_types::is_manifest(&entry.media_type) {
            tracing::info!(digest = %entry.digest, media_type = %entry.media_type, "leaving non-image index entry out of the conversion");
            continue;
        }
        let platform = entry.platform.as_ref().map(|p| p.platform());
        if let Some(p) = &platform {
            available.push(p.to_string());
        }
        let wanted = platforms.is_empty() || platform.as_ref().is_some_and(|p| platforms.iter().any(|w| w.selects(p)));
        if wanted {
            keep.push(entry.clone());
        }
    }
    if keep.is_empty() {
        return Err(ConvertError::NoPlatform {
            reference: source.to_string(),
            wanted: if platforms.is_empty() { "any".into() } else { join(platforms) },
            available: if available.is_empty() { "no runnable images".into() } else { available.join(", ") },
        });
    }
    Ok(keep)
}

fn check_single_platform(source: &Reference, image: &SourceImage, platforms: &[Platform]) -> Result<(), ConvertError> {
    if platforms.is_empty() {
        return Ok(());
    }
    let field = |k: &str| image.config.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let p = Platform::new(field("os"), field("architecture"), image.config.get("variant").and_then(|v| v.as_str()));
    if platforms.iter().any(|w| w.selects(&p)) {
        Ok(())
    } else {
        Err(ConvertError::NoPlatform { reference: source.to_string(), wanted: join(platforms), available: p.to_string() })
    }
}

fn join(platforms: &[Platform]) -> String {
    platforms.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Daemon workers spawn conversions on the runtime, which needs a `Send` future.
    #[allow(dead_code)]
    fn conversion_future_is_send(c: &Converter, r: &ConvertRequest) {
        fn is_send<T: Send>(_: T) {}
        is_send(c.convert(r));
    }

    fn entry(platform: Option<(&str, &str)>, annotations: &[(&str, &str)]) -> serde_json::Value {
        let mut e = serde_json::json!({
            "mediaType": media_types::OCI_MANIFEST,
            "digest": Digest::of(format!("{platform:?}{annotations:?}").as_bytes()).to_string(),
            "size": 10,
        });
        if let Some((os, arch)) = platform {
            e["platform"] = serde_json::json!({"os": os, "architecture": arch});
        }
        if !annotations.is_empty() {
            e["annotations"] = annotations.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>().into();
        }
        e
    }

    fn index(entries: Vec<serde_json::Value>) -> ImageIndex {
        serde_json::from_value(serde_json::json!({"schemaVersion": 2, "manifests": entries})).unwrap()
    }

    #[test]
    fn attestations_are_left_out_and_platforms_filter() {
        let src: Reference = "h.io/a:1".parse().unwrap();
        let idx = index(vec![
            entry(Some(("linux", "amd64")), &[]),
            entry(Some(("linux", "arm64")), &[]),
            entry(Some(("unknown", "unknown")), &[("vnd.docker.reference.type", "attestation-manifest")]),
        ]);
        assert_eq!(select_platforms(&src, &idx, &[]).unwrap().len(), 2);
        let arm: Platform = "linux/arm64".parse().unwrap();
        let kept = select_platforms(&src, &idx, &[arm]).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].platform.as_ref().unwrap().architecture, "arm64");
        let err = select_platforms(&src, &idx, &["linux/s390x".parse().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("linux/amd64, linux/arm64"), "{err}");
    }

    #[test]
    fn schema1_is_rejected_clearly() {
        let r: Reference = "h.io/a:1".parse().unwrap();
        let err = parse_manifest(br#"{"schemaVersion":1,"fsLayers":[]}"#, &r).unwrap_err();
        assert!(err.to_string().contains("schema 1"), "{err}");
        let err = parse_manifest(b"{not json", &r).unwrap_err();
        assert!(err.to_string().contains("malformed JSON"), "{err}");
    }
}
