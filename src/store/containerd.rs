//! containerd content store: blobs, leases and image records of a running containerd, over
//! its gRPC API.
//!
//! Every blob is written under a containerd lease, so containerd's garbage collector never
//! takes what a conversion still uses; releasing the lease hands the blobs back to it.
//! Manifests and indexes accel writes carry the `containerd.io/gc.ref.content.*` labels that
//! containerd's own pulls set, so an image record (`register_images`) keeps all it refers to.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use containerd_client::services::v1 as api;
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{self, Code, Request, Status};
use futures::{SinkExt, TryStreamExt};
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use super::{BlobReader, BlobWriter, Lease, Store, StoreError};
use crate::oci::{media_types, Descriptor, Digest, ImageIndex, ImageManifest, Reference};

/// Oldest containerd accel works with: leases gained explicit resources (used to hold blobs
/// that already exist) in 1.3.
pub const MINIMUM_VERSION: (u64, u64, u64) = (1, 3, 0);
/// Leases carry an expiry, so one left by a process that died is collected a day later.
const LEASE_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// How long the first exchange with containerd (its version) may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes per write message: well under the gRPC message limits of both sides.
const CHUNK: usize = 1 << 20;
const NAMESPACE_HEADER: &str = "containerd-namespace";
const LEASE_HEADER: &str = "containerd-lease";
/// Label marking the leases accel creates, so `ctr leases ls` tells them apart.
pub const LEASE_LABEL: &str = "io.accel.lease";

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("no containerd socket at {path}: containerd must be running and listening there, or `store.address` must name its socket (the `[grpc] address` of its config)")]
    SocketMissing { path: PathBuf },
    #[error("permission denied on the containerd socket {path}: run accel as root or as a user the socket admits (containerd's `[grpc] uid`/`gid`)")]
    PermissionDenied { path: PathBuf },
    #[error("nothing accepts connections on the containerd socket {path} ({source}); is containerd running? (`store.address`)")]
    NotListening { path: PathBuf, source: io::Error },
    #[error("cannot talk to containerd at {path}: {message}")]
    Connect { path: PathBuf, message: String },
    #[error("containerd at {path} is version {found}; accel needs containerd {minimum} or newer")]
    TooOld { path: PathBuf, found: String, minimum: String },
    #[error("`store.namespace` {namespace:?}: {why}")]
    Namespace { namespace: String, why: String },
    #[error("containerd at {path}, namespace {namespace}: {action}: {message} ({code:?})")]
    Api { path: PathBuf, namespace: String, action: String, code: Code, message: String },
    #[error("manifest {digest} written to containerd is not valid JSON of its type: {why}")]
    BadManifest { digest: Digest, why: String },
}

impl ContainerdError {
    /// containerd restarting or busy: the same call can succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            ContainerdError::NotListening { .. } => true,
            ContainerdError::Api { code, .. } => {
                matches!(code, Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::ResourceExhausted)
            }
            _ => false,
        }
    }
}

/// The socket path of `store.address`, which may be written as `unix:///path`.
fn socket_path(address: &Path) -> PathBuf {
    match address.to_str().and_then(|s| s.strip_prefix("unix://")) {
        Some(rest) => PathBuf::from(rest),
        None => address.to_path_buf(),
    }
}

/// Checks `store.address`: an absolute socket path, optionally with `unix://`.
pub fn check_address(address: &Path) -> Result<(), String> {
    let path = socket_path(address);
    if path.as_os_str().is_empty() {
        return Err("must name containerd's socket, e.g. /run/containerd/containerd.sock".into());
    }
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path to containerd's socket", address.display()));
    }
    Ok(())
}

/// Checks a containerd namespace name as containerd does: labels of letters and digits joined
/// by single `.`, `_` or `-`, at most 76 characters.
pub fn check_namespace(ns: &str) -> Result<(), String> {
    if ns.is_empty() || ns.len() > 76 {
        return Err(format!("{ns:?} must be 1 to 76 characters long"));
    }
    let mut prev_sep = true;
    for c in ns.chars() {
        let sep = matches!(c, '.' | '_' | '-');
        if !(c.is_ascii_alphanumeric() || sep) || (sep && prev_sep) {
            return Err(format!("{ns:?} is not a containerd namespace: letters and digits joined by single '.', '_' or '-'"));
        }
        prev_sep = sep;
    }
    if prev_sep {
        return Err(format!("{ns:?} must end with a letter or digit"));
    }
    Ok(())
}

/// `major.minor.patch` at the start of a containerd version string (`v1.7.2`, `1.6.20~ds1`).
pub fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let v = v.trim().trim_start_matches('v');
    let end = v.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(v.len());
    let mut parts = v[..end].split('.').filter(|p| !p.is_empty()).map(|p| p.parse::<u64>());
    let major = parts.next()?.ok()?;
    let minor = parts.next().unwrap_or(Ok(0)).ok()?;
    let patch = parts.next().unwrap_or(Ok(0)).ok()?;
    Some((major, minor, patch))
}

/// The `containerd.io/gc.ref.content.*` labels of a manifest or index, named as containerd
/// names them: `config`, `l.N` for layers, `m.N` for manifests, `N` for anything else.
pub fn gc_labels(media_type: &str, bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
    let children: Vec<Descriptor> = if media_types::is_index(media_type) {
        serde_json::from_slice::<ImageIndex>(bytes).map_err(|e| e.to_string())?.manifests
    } else if media_types::is_manifest(media_type) {
        let m: ImageManifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        std::iter::once(m.config).chain(m.layers).collect()
    } else {
        return Ok(Vec::new());
    };
    let mut counts: HashMap<&str, usize> = HashMap::new();
    let mut labels = Vec::new();
    for child in &children {
        let mt = child.media_type.as_str();
        let prefix = if mt == media_types::OCI_CONFIG || mt == media_types::DOCKER_CONFIG {
            "containerd.io/gc.ref.content.config"
        } else if media_types::is_manifest(mt) {
            "containerd.io/gc.ref.content.m."
        } else if mt.starts_with("application/vnd.oci.image.layer.") || mt.starts_with("application/vnd.docker.image.rootfs.") {
            "containerd.io/gc.ref.content.l."
        } else {
            "containerd.io/gc.ref.content."
        };
        let n = counts.entry(prefix).or_default();
        let key = if *n > 0 || prefix.ends_with('.') { format!("{prefix}{n}") } else { prefix.to_string() };
        *n += 1;
        labels.push((key, child.digest.to_string()));
    }
    Ok(labels)
}

/// What every call needs: the channel, and the address and namespace for requests and errors.
struct Conn {
    channel: Channel,
    path: PathBuf,
    namespace: String,
}

impl Conn {
    fn request<T>(&self, msg: T, lease: Option<&str>) -> Request<T> {
        let mut req = Request::new(msg);
        let md = req.metadata_mut();
        // Both were checked to be ASCII tokens (namespace at open, lease ids are ours).
        md.insert(NAMESPACE_HEADER, self.namespace.parse().expect("namespace is a valid header value"));
        if let Some(id) = lease {
            md.insert(LEASE_HEADER, id.parse().expect("lease id is a valid header value"));
        }
        req
    }

    fn api(&self, action: impl Into<String>, status: Status) -> ContainerdError {
        ContainerdError::Api {
            path: self.path.clone(),
            namespace: self.namespace.clone(),
            action: action.into(),
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    fn content(&self) -> api::content_client::ContentClient<Channel> {
        api::content_client::ContentClient::new(self.channel.clone())
    }

    fn leases(&self) -> api::leases_client::LeasesClient<Channel> {
        api::leases_client::LeasesClient::new(self.channel.clone())
    }

    async fn add_to_lease(&self, lease: &str, d: &Digest) -> Result<(), ContainerdError> {
        let resource = api::Resource { id: d.to_string(), r#type: "content".into() };
        let req = self.request(api::AddResourceRequest { id: lease.into(), resource: Some(resource) }, None);
        self.leases().add_resource(req).await.map_err(|s| self.api(format!("add {d} to lease {lease}"), s))?;
        Ok(())
    }

    async fn delete_lease(&self, id: &str) -> Result<(), ContainerdError> {
        let req = self.request(api::DeleteRequest { id: id.into(), sync: false }, None);
        match self.leases().delete(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(self.api(format!("delete lease {id}"), s)),
        }
    }

    async fn abort(&self, ingest: &str) {
        let req = self.request(api::AbortRequest { r#ref: ingest.into() }, None);
        if let Err(s) = self.content().abort(req).await {
            if s.code() != Code::NotFound {
                tracing::debug!(ingest, "aborting an unfinished containerd write: {}", s.message());
            }
        }
    }
}

/// Blobs in containerd's content store, in one namespace.
pub struct ContainerdStore {
    conn: Arc<Conn>,
    register_images: bool,
    version: String,
}

impl ContainerdStore {
    /// Connects to the socket at `address` and checks containerd's version.
    pub async fn open(address: &Path, namespace: &str, register_images: bool) -> Result<Self, ContainerdError> {
        let path = socket_path(address);
        check_namespace(namespace).map_err(|why| ContainerdError::Namespace { namespace: namespace.into(), why })?;
        // A plain connection first: its error says precisely what is wrong with the socket.
        if let Err(e) = tokio::net::UnixStream::connect(&path).await {
            return Err(match e.kind() {
                io::ErrorKind::NotFound => ContainerdError::SocketMissing { path },
                io::ErrorKind::PermissionDenied => ContainerdError::PermissionDenied { path },
                io::ErrorKind::ConnectionRefused => ContainerdError::NotListening { path, source: e },
                _ => ContainerdError::Connect { message: e.to_string(), path },
            });
        }
        let connect_err = |message: String| ContainerdError::Connect { path: path.clone(), message };
        let channel = tokio::time::timeout(OPEN_TIMEOUT, containerd_client::connect(&path))
            .await
            .map_err(|_| connect_err(format!("no connection within {} s", OPEN_TIMEOUT.as_secs())))?
            .map_err(|e| connect_err(e.to_string()))?;
        let mut version_client = api::version_client::VersionClient::new(channel.clone());
        let answer = tokio::time::timeout(OPEN_TIMEOUT, version_client.version(()))
            .await
            .map_err(|_| connect_err(format!("no answer to a version request within {} s; is this containerd's gRPC socket?", OPEN_TIMEOUT.as_secs())))?
            .map_err(|s| connect_err(format!("version request failed: {} ({:?}); is this containerd's gRPC socket?", s.message(), s.code())))?
            .into_inner();
        check_version(&path, &answer.version)?;
        tracing::info!(address = %path.display(), namespace, version = %answer.version, "content store: containerd");
        Ok(ContainerdStore {
            conn: Arc::new(Conn { channel, path, namespace: namespace.to_string() }),
            register_images,
            version: answer.version,
        })
    }

    /// containerd's version as it reported it.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn namespace(&self) -> &str {
        &self.conn.namespace
    }

    async fn set_labels(&self, digest: &Digest, labels: Vec<(String, String)>) -> Result<(), ContainerdError> {
        if labels.is_empty() {
            return Ok(());
        }
        // One field path per label: other labels on the blob (set by others) stay.
        let paths = labels.iter().map(|(k, _)| format!("labels.{k}")).collect();
        let info = api::Info { digest: digest.to_string(), labels: labels.into_iter().collect(), ..Default::default() };
        let req = self.conn.request(api::UpdateRequest { info: Some(info), update_mask: Some(prost_types::FieldMask { paths }) }, None);
        self.conn.content().update(req).await.map_err(|s| self.conn.api(format!("label {digest} with what it refers to"), s))?;
        Ok(())
    }
}

fn check_version(path: &Path, found: &str) -> Result<(), ContainerdError> {
    let (ma, mi, pa) = MINIMUM_VERSION;
    match parse_version(found) {
        Some(v) if v < MINIMUM_VERSION => Err(ContainerdError::TooOld {
            path: path.to_path_buf(),
            found: found.to_string(),
            minimum: format!("{ma}.{mi}.{pa}"),
        }),
        Some(_) => Ok(()),
        None => {
            tracing::warn!(version = found, "containerd reports a version accel cannot read; assuming it is recent enough");
            Ok(())
        }
    }
}

#[async_trait]
impl Store for ContainerdStore {
    async fn has(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let req = self.conn.request(api::InfoRequest { digest: digest.to_string() }, None);
        match self.conn.content().info(req).await {
            Ok(r) => Ok(r.into_inner().info.map(|i| i.size.max(0) as u64)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(self.conn.api(format!("look up {digest}"), s).into()),
        }
    }

    async fn reader(&self, digest: &Digest) -> Result<BlobReader, StoreError> {
        let req = self.conn.request(api::ReadContentRequest { digest: digest.to_string(), offset: 0, size: 0 }, None);
        let stream = match self.conn.content().read(req).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::NotFound => return Err(StoreError::NotFound(digest.clone())),
            Err(s) => return Err(self.conn.api(format!("read {digest}"), s).into()),
        };
        let conn = self.conn.clone();
        let what = format!("read {digest}");
        let bytes = stream
            .map_ok(|m| bytes::Bytes::from(m.data))
            .map_err(move |s| io::Error::other(conn.api(what.clone(), s)));
        Ok(Box::new(tokio_util::io::StreamReader::new(bytes)))
    }

    async fn writer(&self, lease: &Lease) -> Result<Box<dyn BlobWriter>, StoreError> {
        let lease = lease.containerd_id().expect("a containerd store hands out containerd leases only").to_string();
        let (tx, rx) = mpsc::channel(2);
        let failure = Arc::new(Mutex::new(None));
        let task = tokio::spawn(write_session(self.conn.clone(), lease, rx, failure.clone()));
        Ok(Box::new(ContainerdWriter { tx: PollSender::new(tx), buf: Vec::with_capacity(CHUNK), task, failure }))
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        let req = self.conn.request(api::DeleteContentRequest { digest: digest.to_string() }, None);
        match self.conn.content().delete(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(self.conn.api(format!("delete {digest}"), s).into()),
        }
    }

    async fn usage(&self) -> Result<u64, StoreError> {
        let req = self.conn.request(api::ListContentRequest { filters: Vec::new() }, None);
        let api_err = |s| self.conn.api("list content", s);
        let mut stream = self.conn.content().list(req).await.map_err(api_err)?.into_inner();
        let mut total = 0u64;
        while let Some(page) = stream.message().await.map_err(api_err)? {
            total += page.info.iter().map(|i| i.size.max(0) as u64).sum::<u64>();
        }
        Ok(total)
    }

    async fn lease(&self) -> Result<Lease, StoreError> {
        let id = format!("accel-{}", uuid::Uuid::new_v4());
        let expires = chrono::Utc::now() + chrono::Duration::from_std(LEASE_EXPIRY).expect("expiry fits");
        let labels = HashMap::from([
            ("containerd.io/gc.expire".to_string(), expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            (LEASE_LABEL.to_string(), "conversion".to_string()),
        ]);
        let req = self.conn.request(api::CreateRequest { id: id.clone(), labels }, None);
        self.conn.leases().create(req).await.map_err(|s| self.conn.api("create a lease", s))?;
        tracing::debug!(lease = %id, "created containerd lease");
        Ok(Lease::containerd(RemoteLease { conn: self.conn.clone(), id, released: AtomicBool::new(false) }))
    }

    async fn put_manifest(&self, media_type: &str, bytes: &[u8], lease: &Lease) -> Result<Digest, StoreError> {
        use tokio::io::AsyncWriteExt;
        let digest = Digest::of(bytes);
        let labels = gc_labels(media_type, bytes).map_err(|why| ContainerdError::BadManifest { digest: digest.clone(), why })?;
        let mut w = self.writer(lease).await?;
        w.write_all(bytes).await.map_err(StoreError::io("ingest"))?;
        w.commit(Some(&digest)).await?;
        // Set after the write, not with it: a blob that already existed gets them too.
        self.set_labels(&digest, labels).await?;
        Ok(digest)
    }

    async fn register_image(&self, name: &Reference, target: &Descriptor) -> Result<(), StoreError> {
        if !self.register_images {
            return Ok(());
        }
        let image = api::Image {
            name: name.to_string(),
            target: Some(containerd_client::types::Descriptor {
                media_type: target.media_type.clone(),
                digest: target.digest.to_string(),
                size: target.size as i64,
                annotations: target.annotations.clone().into_iter().collect(),
            }),
            ..Default::default()
        };
        let mut images = api::images_client::ImagesClient::new(self.conn.channel.clone());
        let req = self.conn.request(api::CreateImageRequest { image: Some(image.clone()), source_date_epoch: None }, None);
        match images.create(req).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {
                let mask = prost_types::FieldMask { paths: vec!["target".into()] };
                let req = self.conn.request(api::UpdateImageRequest { image: Some(image), update_mask: Some(mask), source_date_epoch: None }, None);
                images.update(req).await.map_err(|s| self.conn.api(format!("update image {name}"), s))?;
            }
            Err(s) => return Err(self.conn.api(format!("create image {name}"), s).into()),
        }
        tracing::info!(image = %name, digest = %target.digest, namespace = %self.conn.namespace, "registered image in containerd");
        Ok(())
    }
}

/// A containerd lease held for one conversion.
pub(crate) struct RemoteLease {
    conn: Arc<Conn>,
    id: String,
    released: AtomicBool,
}

impl RemoteLease {
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(crate) async fn add(&self, d: &Digest) -> Result<(), StoreError> {
        Ok(self.conn.add_to_lease(&self.id, d).await?)
    }

    pub(crate) async fn release(self) {
        self.released.store(true, Ordering::Relaxed);
        match self.conn.delete_lease(&self.id).await {
            Ok(()) => tracing::debug!(lease = %self.id, "released containerd lease"),
            Err(e) => tracing::warn!(lease = %self.id, "could not release the lease; containerd drops it when it expires: {e}"),
        }
    }
}

impl Drop for RemoteLease {
    fn drop(&mut self) {
        if self.released.load(Ordering::Relaxed) {
            return;
        }
        // Dropped without `release` (a cancelled conversion): delete it in the background.
        let (conn, id) = (self.conn.clone(), self.id.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = conn.delete_lease(&id).await {
                        tracing::warn!(lease = %id, "could not release the lease; containerd drops it when it expires: {e}");
                    }
                });
            }
            Err(_) => tracing::warn!(lease = %id, "lease left to expire: no runtime to release it on"),
        }
    }
}

/// What the writer hands to its write session.
enum Msg {
    Data(Vec<u8>),
    Commit(Option<Digest>),
}

/// Streams written bytes to containerd; see [`write_session`] for the exchange.
struct ContainerdWriter {
    tx: PollSender<Msg>,
    buf: Vec<u8>,
    task: tokio::task::JoinHandle<Result<(Digest, u64), StoreError>>,
    /// Why the session ended early, for the error a write then returns.
    failure: Arc<Mutex<Option<String>>>,
}

impl ContainerdWriter {
    fn broken(&self) -> io::Error {
        let why = self.failure.lock().unwrap().clone().unwrap_or_else(|| "the write session ended".into());
        io::Error::other(format!("writing to containerd: {why}"))
    }

    fn poll_send_buf(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if ready!(self.tx.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(self.broken()));
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        if self.tx.send_item(Msg::Data(chunk)).is_err() {
            return Poll::Ready(Err(self.broken()));
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ContainerdWriter {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.buf.len() >= CHUNK {
            ready!(this.poll_send_buf(cx))?;
        }
        let n = data.len().min(CHUNK - this.buf.len());
        this.buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_send_buf(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_send_buf(cx)
    }
}

#[async_trait]
impl BlobWriter for ContainerdWriter {
    async fn commit(mut self: Box<Self>, expected: Option<&Digest>) -> Result<(Digest, u64), StoreError> {
        let sent = async {
            futures::future::poll_fn(|cx| self.poll_send_buf(cx)).await?;
            futures::future::poll_fn(|cx| self.tx.poll_reserve(cx)).await.map_err(|_| self.broken())?;
            self.tx.send_item(Msg::Commit(expected.cloned())).map_err(|_| self.broken())
        }
        .await;
        self.tx.close();
        let this = *self;
        let outcome = this.task.await.map_err(|e| StoreError::Io { path: "containerd write".into(), source: io::Error::other(e) })?;
        // The session's own error says more than a failed hand-over to it.
        match (sent, outcome) {
            (_, Err(e)) => Err(e),
            (Err(e), Ok(_)) => Err(StoreError::Io { path: "containerd write".into(), source: e }),
            (Ok(()), Ok(done)) => Ok(done),
        }
    }
}

/// One containerd `Write` session, under `lease`. Every request gets one answer:
/// `STAT` opens the ingest; each chunk is a `WRITE` at the current offset; on commit a `STAT`
/// gives the digest of what was written (checked against the expected one), and `COMMIT`
/// makes it visible. A blob that already exists is added to the lease instead. When the
/// writer goes away without committing, the ingest is aborted.
async fn write_session(
    conn: Arc<Conn>,
    lease: String,
    mut rx: mpsc::Receiver<Msg>,
    failure: Arc<Mutex<Option<String>>>,
) -> Result<(Digest, u64), StoreError> {
    let ingest = format!("accel-{}", uuid::Uuid::new_v4());
    let api_err = |action: &str, s: Status| StoreError::from(conn.api(format!("{action} (ingest {ingest})"), s));
    let result = async {
        let (mut req_tx, req_rx) = futures::channel::mpsc::channel::<api::WriteContentRequest>(1);
        let stat = api::WriteContentRequest { action: api::WriteAction::Stat as i32, r#ref: ingest.clone(), ..Default::default() };
        // The call completes once containerd answers, which it does to the first request.
        req_tx.send(stat.clone()).await.map_err(|_| api_err("open a write", closed()))?;
        let mut responses = conn.content().write(conn.request(req_rx, Some(&lease))).await.map_err(|s| api_err("open a write", s))?.into_inner();
        let first = responses.message().await.map_err(|s| api_err("open a write", s))?.ok_or_else(|| api_err("open a write", closed()))?;
        let mut offset = first.offset;
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Data(data) => {
                    let len = data.len() as i64;
                    let req = api::WriteContentRequest {
                        action: api::WriteAction::Write as i32,
                        r#ref: ingest.clone(),
                        offset,
                        data,
                        ..Default::default()
                    };
                    let resp = exchange(&mut req_tx, &mut responses, req).await.map_err(|s| api_err("write", s))?;
                    if resp.offset != offset + len {
                        return Err(api_err("write", Status::data_loss(format!("offset {} after writing {len} bytes at {offset}", resp.offset))));
                    }
                    offset = resp.offset;
                }
                Msg::Commit(expected) => {
                    let action = "check the written digest";
                    let resp = exchange(&mut req_tx, &mut responses, stat.clone()).await.map_err(|s| api_err(action, s))?;
                    let actual: Digest =
                        resp.digest.parse().map_err(|_| api_err(action, Status::internal(format!("unreadable digest {:?}", resp.digest))))?;
                    let size = offset as u64;
                    if let Some(expected) = expected {
                        if expected != actual {
                            return Err(StoreError::DigestMismatch { expected, actual, size });
                        }
                    }
                    let commit = api::WriteContentRequest {
                        action: api::WriteAction::Commit as i32,
                        r#ref: ingest.clone(),
                        total: offset,
                        expected: actual.to_string(),
                        offset,
                        ..Default::default()
                    };
                    match exchange(&mut req_tx, &mut responses, commit).await {
                        Ok(_) => {}
                        // Someone else committed the same bytes first; hold theirs.
                        Err(s) if s.code() == Code::AlreadyExists => conn.add_to_lease(&lease, &actual).await?,
                        Err(s) => return Err(api_err("commit", s)),
                    }
                    return Ok((actual, size));
                }
            }
        }
        Err(StoreError::Io { path: format!("containerd ingest {ingest}").into(), source: io::Error::other("writer dropped before commit") })
    }
    .await;
    if let Err(e) = &result {
        *failure.lock().unwrap() = Some(e.to_string());
        conn.abort(&ingest).await;
    }
    result
}

fn closed() -> Status {
    Status::unavailable("containerd closed the write stream")
}

/// Sends one request of a write session and waits for its answer.
async fn exchange(
    req_tx: &mut futures::channel::mpsc::Sender<api::WriteContentRequest>,
    responses: &mut tonic::Streaming<api::WriteContentResponse>,
    req: api::WriteContentRequest,
) -> Result<api::WriteContentResponse, Status> {
    if req_tx.send(req).await.is_err() {
        // The request stream ended: containerd's status says why.
        return Err(responses.message().await.err().unwrap_or_else(closed));
    }
    responses.message().await?.ok_or_else(closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_and_compared() {
        assert_eq!(parse_version("v1.7.2"), Some((1, 7, 2)));
        assert_eq!(parse_version("1.6.20~ds1"), Some((1, 6, 20)));
        assert_eq!(parse_version("2.0.0-rc.1"), Some((2, 0, 0)));
        assert_eq!(parse_version("1.2"), Some((1, 2, 0)));
        assert_eq!(parse_version("unknown"), None);
        let p = Path::new("/run/c.sock");
        assert!(check_version(p, "1.6.20~ds1").is_ok());
        assert!(check_version(p, "v2.1.0").is_ok());
        let e = check_version(p, "v1.2.13").unwrap_err().to_string();
        assert!(e.contains("v1.2.13") && e.contains("1.3.0 or newer") && e.contains("/run/c.sock"), "{e}");
    }

    #[test]
    fn namespaces_and_addresses_are_checked() {
        for ok in ["accel", "k8s.io", "a-b_c.d", "A1"] {
            assert!(check_namespace(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "a..b", "a b", "ä", &"x".repeat(77)] {
            assert!(check_namespace(bad).is_err(), "{bad}");
        }
        assert!(check_address(Path::new("/run/containerd/containerd.sock")).is_ok());
        assert!(check_address(Path::new("unix:///run/c.sock")).is_ok());
        assert!(check_address(Path::new("c.sock")).unwrap_err().contains("absolute"));
        assert_eq!(socket_path(Path::new("unix:///run/c.sock")), Path::new("/run/c.sock"));
    }

    #[test]
    fn gc_labels_follow_containerd_naming() {
        let d = |c: u8| Digest::of(&[c]).to_string();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_types::OCI_MANIFEST,
            "config": {"mediaType": media_types::OCI_CONFIG, "digest": d(0), "size": 1},
            "layers": [
                {"mediaType": media_types::OCI_LAYER_GZIP, "digest": d(1), "size": 1},
                {"mediaType": media_types::OCI_LAYER_ZSTD, "digest": d(2), "size": 1},
            ],
        });
        let labels = gc_labels(media_types::OCI_MANIFEST, &serde_json::to_vec(&manifest).unwrap()).unwrap();
        assert_eq!(
            labels,
            [
                ("containerd.io/gc.ref.content.config".to_string(), d(0)),
                ("containerd.io/gc.ref.content.l.0".to_string(), d(1)),
                ("containerd.io/gc.ref.content.l.1".to_string(), d(2)),
            ]
        );
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                {"mediaType": media_types::OCI_MANIFEST, "digest": d(3), "size": 1},
                {"mediaType": media_types::DOCKER_MANIFEST, "digest": d(4), "size": 1},
                {"mediaType": media_types::OCI_INDEX, "digest": d(5), "size": 1},
            ],
        });
        let labels = gc_labels(media_types::OCI_INDEX, &serde_json::to_vec(&index).unwrap()).unwrap();
        let keys: Vec<_> = labels.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["containerd.io/gc.ref.content.m.0", "containerd.io/gc.ref.content.m.1", "containerd.io/gc.ref.content.0"]);
        assert!(gc_labels(media_types::OCI_CONFIG, b"{}").unwrap().is_empty());
        assert!(gc_labels(media_types::OCI_MANIFEST, b"{").is_err());
    }
}
