//! The containerd content store (`store.kind: containerd`) against a real containerd started
//! by the test: conversions of real-content images keep their blobs in containerd under a
//! lease while they run, release it after, label manifests so containerd's garbage
//! collector keeps what a registered image refers to, and push exactly what the embedded
//! store produces.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use accel::config::{Config, ConversionConfig};
use accel::drivers::DriverKind;
use accel::oci::Reference;
use accel::pipeline::{Conversion, ConvertRequest, ConvertResult, Converter, Progress, Stage, TargetNaming};
use accel::registry::RegistryClient;
use accel::store::containerd::LEASE_LABEL;
use common::containerd::{ContainerdServer, ContentEntry, LeaseEntry};
use common::fixtures::*;
use common::registry::{RegistryAuth, RegistryServer};
use serde_json::Value;

/// What `ctr` showed at the moment the conversion started pushing: everything converted,
/// nothing pushed yet.
#[derive(Default, Clone)]
struct Seen {
    leases: Vec<LeaseEntry>,
    content: Vec<String>,
    /// Content still there after a garbage collection run at that moment.
    content_after_gc: Vec<String>,
}

/// Looks into containerd with `ctr` when the conversion reaches the push, and runs its
/// garbage collector there: the lease must keep every blob the push is about to read.
struct Inspect {
    ctrd: Arc<ContainerdServer>,
    ns: String,
    seen: Mutex<Option<Seen>>,
}

impl Progress for Inspect {
    fn stage(&self, stage: Stage, _reference: &Reference) {
        if stage != Stage::Pushing {
            return;
        }
        let leases = self.ctrd.leases(&self.ns);
        let content = self.ctrd.content_digests(&self.ns);
        self.ctrd.collect_garbage(&self.ns);
        let content_after_gc = self.ctrd.content_digests(&self.ns);
        *self.seen.lock().unwrap() = Some(Seen { leases, content, content_after_gc });
    }
    fn add_steps(&self, _steps: u64) {}
    fn step_done(&self, _what: &str) {}
}

fn store_yaml(ctrd: &ContainerdServer, ns: &str, register: bool) -> String {
    format!("store: {{ kind: containerd, address: {}, namespace: {ns}, register_images: {register} }}\n", ctrd.socket.display())
}

/// Converts `source` to eStargz in this process with the containerd store, inspecting
/// containerd when the push starts.
async fn convert_in_containerd(ctrd: &Arc<ContainerdServer>, ns: &str, register: bool, source: &str, suffix: &str) -> (ConvertResult, Seen) {
    let config = Config::parse(&store_yaml(ctrd, ns, register), "test", &|_| None).unwrap();
    let store = accel::store::open(&config.store).await.unwrap();
    let registry = Arc::new(RegistryClient::new(&config).unwrap());
    let inspect = Arc::new(Inspect { ctrd: ctrd.clone(), ns: ns.to_string(), seen: Mutex::new(None) });
    let converter = Converter::new(registry, store, inspect.clone());
    let spec = ConversionConfig::new(DriverKind::Estargz);
    let conversion = Conversion {
        driver: DriverKind::Estargz.build(&spec.options).unwrap(),
        naming: TargetNaming::Suffix { suffix: suffix.to_string(), repository: None },
    };
    let request = ConvertRequest { source: source.parse().unwrap(), conversions: vec![conversion], platforms: Vec::new() };
    let result = converter.convert(&request).await.unwrap_or_else(|e| panic!("conversion through containerd failed: {e}\ncontainerd log:\n{}", ctrd.log()));
    let seen = inspect.seen.lock().unwrap().clone().expect("the conversion never reached the push");
    (result, seen)
}

/// `accelctl convert` with a config of `yaml`.
fn accelctl(dir: &Path, yaml: &str, args: &[&str]) -> Output {
    let config = dir.join("pipelines.yaml");
    std::fs::write(&config, yaml).unwrap();
    Command::new(env!("CARGO_BIN_EXE_accelctl"))
        .arg("convert")
        .arg("--config")
        .arg(&config)
        .args(args)
        .env("DOCKER_CONFIG", dir.join("docker"))
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

/// The same conversion with the embedded store, as `accelctl convert` does it.
fn convert_embedded(source: &str, suffix: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!("store: {{ kind: embedded, path: {} }}\n", dir.path().join("store").display());
    let out = accelctl(dir.path(), &yaml, &["--output", "json", "--tag-suffix", suffix, source]);
    assert!(out.status.success(), "embedded conversion failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The manifest (or index) a result points at, as the registry serves it.
fn pushed(reference: &str) -> Value {
    inspect_raw(reference)
}

fn accel_leases(leases: &[LeaseEntry]) -> Vec<&LeaseEntry> {
    leases.iter().filter(|l| l.labels.contains_key(LEASE_LABEL)).collect()
}

fn label_of<'a>(content: &'a [ContentEntry], digest: &str, key: &str) -> Option<&'a str> {
    content.iter().find(|c| c.digest == digest).and_then(|c| c.labels.get(key)).map(String::as_str)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_image_through_containerd_is_leased_registered_and_identical() {
    let server = RegistryServer::start(RegistryAuth::None);
    let ctrd = Arc::new(ContainerdServer::start());
    let ns = "accel-test";
    let source = debian_image("amd64").build().push(&server.host(), "library/debian:bookworm");

    let (result, seen) = convert_in_containerd(&ctrd, ns, true, &source.reference, "-ctrd").await;
    let target = &result.targets[0];
    let manifest = pushed(&target.reference.to_string());
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_string();
    let layer_digests: Vec<String> = manifest["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect();

    // While the conversion ran: one lease of accel's, and every source and converted blob in
    // containerd — still there after a garbage collection, because the lease held them.
    let during = accel_leases(&seen.leases);
    assert_eq!(during.len(), 1, "leases while converting: {:?}", seen.leases);
    assert!(during[0].labels.contains_key("containerd.io/gc.expire"), "{:?}", during[0]);
    let mut needed: Vec<String> = source.layers().iter().map(|l| l.digest().to_string()).collect();
    needed.push(source.image.config.digest.clone());
    needed.push(config_digest.clone());
    needed.push(target.digest.to_string());
    needed.extend(layer_digests.iter().cloned());
    for d in &needed {
        assert!(seen.content.contains(d), "{d} was not in containerd while converting: {:?}", seen.content);
        assert!(seen.content_after_gc.contains(d), "garbage collection took leased blob {d}");
    }

    // After: the lease is gone and the image is registered under its target name.
    assert!(accel_leases(&ctrd.leases(ns)).is_empty(), "lease left behind: {:?}", ctrd.leases(ns));
    let images = ctrd.images(ns);
    let image = images.iter().find(|i| i.name == target.reference.to_string()).unwrap_or_else(|| panic!("{} not in ctr images ls: {images:?}", target.reference));
    assert_eq!(image.digest, target.digest.to_string());
    assert_eq!(image.media_type, "application/vnd.oci.image.manifest.v1+json");

    // The manifest carries containerd's GC labels for its config and layers.
    let content = ctrd.content(ns);
    assert_eq!(label_of(&content, &target.digest.to_string(), "containerd.io/gc.ref.content.config"), Some(config_digest.as_str()));
    for (i, d) in layer_digests.iter().enumerate() {
        assert_eq!(label_of(&content, &target.digest.to_string(), &format!("containerd.io/gc.ref.content.l.{i}")), Some(d.as_str()));
    }

    // The collector now keeps exactly what the image refers to; the source blobs, which only
    // the lease held, go.
    ctrd.collect_garbage(ns);
    let kept = ctrd.content_digests(ns);
    for d in layer_digests.iter().chain([&config_digest, &target.digest.to_string()]) {
        assert!(kept.contains(d), "{d} of the registered image was collected; left: {kept:?}");
    }
    for l in source.layers() {
        assert!(!kept.contains(&l.digest().to_string()), "source layer {} outlived its lease", l.digest());
    }
    ctrd.ctr(ns, &["images", "check"]);

    // Same bytes as the embedded store pushes.
    let embedded = convert_embedded(&source.reference, "-emb");
    let emb_target = &embedded["targets"][0];
    assert_eq!(emb_target["digest"].as_str().unwrap(), target.digest.to_string(), "manifest digests differ between stores");
    let emb_manifest = pushed(emb_target["reference"].as_str().unwrap());
    assert_eq!(emb_manifest, manifest);
    assert_eq!(emb_target["size"].as_u64().unwrap(), target.size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_platform_index_through_containerd_matches_embedded() {
    let server = RegistryServer::start(RegistryAuth::None);
    let ctrd = Arc::new(ContainerdServer::start());
    let ns = "multi";
    let source = debian_index().build().push(&server.host(), "library/debian:multi");

    let (result, seen) = convert_in_containerd(&ctrd, ns, false, &source.reference, "-ctrd").await;
    // Listed at once: with the lease gone nothing holds the index, and containerd may collect
    // it in the background any time after (its scheduler runs after deletions).
    let content = ctrd.content(ns);
    let target = &result.targets[0];
    assert_eq!(accel_leases(&seen.leases).len(), 1, "{:?}", seen.leases);
    let index = pushed(&target.reference.to_string());
    let children: Vec<String> = index["manifests"].as_array().unwrap().iter().map(|m| m["digest"].as_str().unwrap().to_string()).collect();
    assert_eq!(children.len(), source.index.images.len());
    // The index itself is written when the push of its images is done, after this point.
    for d in &children {
        assert!(seen.content_after_gc.contains(d), "{d} not held while converting");
    }

    // Without register_images nothing is named, and the index's labels name its manifests.
    assert!(ctrd.images(ns).is_empty(), "{:?}", ctrd.images(ns));
    assert!(accel_leases(&ctrd.leases(ns)).is_empty());
    assert!(
        content.iter().any(|c| c.digest == target.digest.to_string()),
        "the index {} was not in containerd's content right after the conversion: {:?}\n{}",
        target.digest,
        content.iter().map(|c| &c.digest).collect::<Vec<_>>(),
        ctrd.log()
    );
    for (i, d) in children.iter().enumerate() {
        assert_eq!(label_of(&content, &target.digest.to_string(), &format!("containerd.io/gc.ref.content.m.{i}")), Some(d.as_str()));
    }
    // With the lease released and no image, everything is garbage.
    ctrd.collect_garbage(ns);
    assert!(ctrd.content_digests(ns).is_empty(), "{:?}", ctrd.content_digests(ns));

    let embedded = convert_embedded(&source.reference, "-emb");
    let emb_target = &embedded["targets"][0];
    assert_eq!(emb_target["digest"].as_str().unwrap(), target.digest.to_string(), "index digests differ between stores");
    let emb_index = pushed(emb_target["reference"].as_str().unwrap());
    assert_eq!(emb_index, index);
    // Equal index digests mean equal child manifests, hence equal layers; say which differ if not.
    for (ours, theirs) in children.iter().zip(emb_index["manifests"].as_array().unwrap()) {
        assert_eq!(ours, theirs["digest"].as_str().unwrap());
    }
}

#[test]
fn accelctl_converts_with_containerd_store() {
    let server = RegistryServer::start(RegistryAuth::None);
    let ctrd = ContainerdServer::start();
    let source = handmade_image().build().push(&server.host(), "hand/made:v1");
    let dir = tempfile::tempdir().unwrap();
    let out = accelctl(dir.path(), &store_yaml(&ctrd, "cli", true), &["--output", "json", &source.reference]);
    assert!(out.status.success(), "{}\ncontainerd log:\n{}", String::from_utf8_lossy(&out.stderr), ctrd.log());
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let target = &result["targets"][0];
    let images = ctrd.images("cli");
    assert!(
        images.iter().any(|i| i.name == target["reference"].as_str().unwrap() && i.digest == target["digest"].as_str().unwrap()),
        "{images:?} lacks {target}"
    );
    assert!(accel_leases(&ctrd.leases("cli")).is_empty(), "the process left its lease: {:?}", ctrd.leases("cli"));
}

#[test]
fn missing_socket_and_dead_socket_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope").join("containerd.sock");
    let yaml = format!("store: {{ kind: containerd, address: {} }}\n", missing.display());
    let out = accelctl(dir.path(), &yaml, &["127.0.0.1:1/x:y"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("no containerd socket at {}", missing.display())), "{err}");
    assert!(err.contains("containerd must be running") && err.contains("store.address"), "{err}");

    // A socket file nobody listens on (containerd stopped without cleaning up).
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let yaml = format!("store: {{ kind: containerd, address: {} }}\n", stale.display());
    let out = accelctl(dir.path(), &yaml, &["127.0.0.1:1/x:y"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("nothing accepts connections on the containerd socket {}", stale.display())), "{err}");

    // A bad namespace is a config problem, reported by `accelctl validate` with its path.
    std::fs::write(dir.path().join("bad.yaml"), "store: { kind: containerd, namespace: 'a b', address: rel.sock }\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_accelctl")).args(["validate", "--config"]).arg(dir.path().join("bad.yaml")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("store.address") && err.contains("store.namespace"), "{err}");
}

/// The `Store` operations one by one against containerd: verified writes, reads, sizes,
/// deletes, and writes that must leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_operations_against_containerd() {
    use accel::oci::Digest;
    use accel::store::{ContainerdStore, Store, StoreError};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let ctrd = ContainerdServer::start();
    let ns = "ops";
    let store = ContainerdStore::open(&ctrd.socket, ns, false).await.unwrap();
    assert!(store.version().starts_with("1.") || store.version().starts_with("v"), "{}", store.version());
    let lease = store.lease().await.unwrap();

    // Several write messages' worth, with a size that is not a multiple of a chunk.
    let data: Vec<u8> = (0..3_500_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let digest = Digest::of(&data);
    let mut w = store.writer(&lease).await.unwrap();
    for piece in data.chunks(300_001) {
        w.write_all(piece).await.unwrap();
    }
    assert_eq!(w.commit(Some(&digest)).await.unwrap(), (digest.clone(), data.len() as u64));
    assert_eq!(store.has(&digest).await.unwrap(), Some(data.len() as u64));
    let mut back = Vec::new();
    store.reader(&digest).await.unwrap().read_to_end(&mut back).await.unwrap();
    assert!(back == data, "read back {} bytes that differ from the {} written", back.len(), data.len());
    assert!(ctrd.content_digests(ns).contains(&digest.to_string()));

    // Unknown digest at commit: the writer reports the digest and nothing becomes visible.
    let mut w = store.writer(&lease).await.unwrap();
    w.write_all(b"tampered").await.unwrap();
    match w.commit(Some(&Digest::of(b"original"))).await {
        Err(StoreError::DigestMismatch { actual, size: 8, .. }) => assert_eq!(actual, Digest::of(b"tampered")),
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert_eq!(store.has(&Digest::of(b"tampered")).await.unwrap(), None);
    // The same bytes twice: the second commit finds them there and still succeeds.
    for _ in 0..2 {
        let mut w = store.writer(&lease).await.unwrap();
        w.write_all(b"twice").await.unwrap();
        assert_eq!(w.commit(None).await.unwrap(), (Digest::of(b"twice"), 5));
    }
    // An empty blob is a blob too.
    let w = store.writer(&lease).await.unwrap();
    assert_eq!(w.commit(None).await.unwrap(), (Digest::of(b""), 0));
    // A writer dropped before commit leaves no ingest behind.
    let mut w = store.writer(&lease).await.unwrap();
    w.write_all(&data[..2_000_000]).await.unwrap();
    w.flush().await.unwrap();
    drop(w);
    let mut active = String::new();
    for _ in 0..50 {
        active = ctrd.ctr(ns, &["content", "active"]);
        if active.lines().count() <= 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(active.lines().count() <= 1, "unfinished write left an ingest: {active}");

    assert_eq!(store.usage().await.unwrap(), data.len() as u64 + 5);
    assert!(matches!(store.reader(&Digest::of(b"absent")).await, Err(StoreError::NotFound(_))));
    store.delete(&digest).await.unwrap();
    store.delete(&digest).await.unwrap();
    assert_eq!(store.has(&digest).await.unwrap(), None);

    // Existing content added to a lease is held by it; released, it is collected.
    let lease2 = store.lease().await.unwrap();
    lease2.add(&Digest::of(b"twice")).await.unwrap();
    lease.release().await;
    ctrd.collect_garbage(ns);
    assert!(ctrd.content_digests(ns).contains(&Digest::of(b"twice").to_string()), "a leased blob was collected");
    lease2.release().await;
    ctrd.collect_garbage(ns);
    assert!(ctrd.content_digests(ns).is_empty(), "{:?}", ctrd.content_digests(ns));
    assert!(accel_leases(&ctrd.leases(ns)).is_empty());
}

/// A user the socket does not admit (containerd's socket is `root:root 0660`) is told so.
#[test]
fn permission_denied_names_the_socket() {
    use std::os::unix::fs::PermissionsExt;
    let ctrd = ContainerdServer::start();
    let dir = tempfile::tempdir().unwrap();
    // The unprivileged user must reach the binary, the config and the socket's directory;
    // the test binary's own tree may sit under a private home.
    for d in [dir.path(), ctrd.dir.path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let bin = dir.path().join("accelctl");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_accelctl"), &bin).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_accelctl"), &bin).unwrap();
    }
    let config = dir.path().join("pipelines.yaml");
    std::fs::write(&config, store_yaml(&ctrd, "perm", false)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .args(["convert", "--config"])
        .arg(&config)
        .arg("127.0.0.1:1/x:y")
        .env("HOME", dir.path())
        .output()
        .expect("setpriv (util-linux) runs accelctl as nobody");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("permission denied on the containerd socket {}", ctrd.socket.display())), "{err}");
}

/// A stand-in for a containerd older than accel supports: it answers the Version service
/// only, with the version it is given.
mod old_containerd {
    use containerd_client::services::v1::VersionResponse;
    use tonic::codegen::{http, BoxFuture, Context, Poll, Service};

    #[derive(Clone)]
    pub struct Version(pub &'static str);

    impl tonic::server::NamedService for Version {
        const NAME: &'static str = "containerd.services.version.v1.Version";
    }

    struct Answer(&'static str);

    impl tonic::server::UnaryService<()> for Answer {
        type Response = VersionResponse;
        type Future = BoxFuture<tonic::Response<VersionResponse>, tonic::Status>;
        fn call(&mut self, _: tonic::Request<()>) -> Self::Future {
            let version = self.0.to_string();
            Box::pin(async move { Ok(tonic::Response::new(VersionResponse { version, revision: "stand-in".into() })) })
        }
    }

    impl Service<http::Request<tonic::body::Body>> for Version {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
            let version = self.0;
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(Answer(version), req).await)
            })
        }
    }
}

#[tokio::test]
async fn too_old_containerd_is_refused_with_both_versions() {
    use accel::store::ContainerdStore;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("old.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let incoming = futures::stream::unfold(listener, |l| async move { Some((l.accept().await.map(|(s, _)| s), l)) });
    let server = tokio::spawn(tonic::transport::Server::builder().add_service(old_containerd::Version("v1.2.13")).serve_with_incoming(incoming));
    let err = ContainerdStore::open(&socket, "accel", false).await.err().expect("containerd 1.2 must be refused").to_string();
    assert!(err.contains("version v1.2.13") && err.contains("needs containerd 1.3.0 or newer"), "{err}");
    assert!(err.contains(&socket.display().to_string()), "{err}");
    server.abort();
}
