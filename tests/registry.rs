//! Registry client against a real `docker-registry` (no auth, htpasswd, bearer tokens) and
//! against small fake servers for failures a real registry does not produce on demand.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use accel::config::{Config, RegistryConfig, Secret};
use accel::oci::{media_types, Digest, Hasher, Reference};
use accel::registry::{ClientOptions, PushOutcome, RegistryClient, RegistryError};
use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncRead;

use common::registry::{RegistryAuth, RegistryServer};

// ---------------------------------------------------------------------------------------------
// Helpers

/// A config whose docker `config.json` is an empty file of its own, so that nothing from the
/// machine running the tests leaks in.
fn config_in(dir: &Path, registries: Vec<(String, RegistryConfig)>) -> Config {
    let docker = dir.join("docker-config.json");
    if !docker.exists() {
        std::fs::write(&docker, "{}").unwrap();
    }
    Config { docker_config: Some(docker), registries: registries.into_iter().collect::<BTreeMap<_, _>>(), ..Default::default() }
}

fn anonymous_client(dir: &Path) -> RegistryClient {
    RegistryClient::new(&config_in(dir, vec![])).unwrap()
}

fn client_with_password(dir: &Path, host: &str, user: &str, password: &str) -> RegistryClient {
    let rc = RegistryConfig { username: Some(user.into()), password: Some(Secret::new(password)), ..Default::default() };
    RegistryClient::new(&config_in(dir, vec![(host.to_string(), rc)])).unwrap()
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn reference(s: &str) -> Reference {
    s.parse().unwrap()
}

/// Deterministic, poorly compressible bytes.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A blob written to a temp file, pushed from the file so the upload is streamed from disk.
struct FileBlob {
    path: std::path::PathBuf,
    digest: Digest,
    size: u64,
}

fn file_blob(dir: &Path, name: &str, data: &[u8]) -> FileBlob {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    let mut h = Hasher::new();
    h.update(data);
    FileBlob { path, digest: h.finish(), size: data.len() as u64 }
}

async fn open(blob: &FileBlob) -> Box<dyn AsyncRead + Send + Unpin> {
    Box::new(tokio::fs::File::open(&blob.path).await.unwrap())
}

fn bytes_body(data: &[u8]) -> Box<dyn AsyncRead + Send + Unpin> {
    Box::new(std::io::Cursor::new(data.to_vec()))
}

async fn collect(client: &RegistryClient, repo: &Reference, digest: &Digest) -> (Option<u64>, Vec<u8>) {
    let mut blob = client.get_blob(repo, digest).await.unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = blob.stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    (blob.size, out)
}

fn image_config() -> Vec<u8> {
    serde_json::to_vec_pretty(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [Digest::of(b"layer").to_string()]},
    }))
    .unwrap()
}

fn manifest_json(media_type: &str, config_type: &str, config: &[u8], layer: &FileBlob, layer_type: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": config_type, "digest": Digest::of(config).to_string(), "size": config.len()},
        "layers": [{"mediaType": layer_type, "digest": layer.digest.to_string(), "size": layer.size}],
        "annotations": {"org.opencontainers.image.title": "accel registry test aaaa"},
    }))
    .unwrap()
}

fn index_json(manifest: &[u8]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_types::OCI_INDEX,
        "manifests": [{
            "mediaType": media_types::OCI_MANIFEST,
            "digest": Digest::of(manifest).to_string(),
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    }))
    .unwrap()
}

/// Pushes a config, a layer from `layer` and a manifest tagged `tag`; returns the manifest bytes.
async fn push_image(client: &RegistryClient, repo: &Reference, tag: &str, layer: &FileBlob) -> Vec<u8> {
    let config = image_config();
    let outcome = client.push_blob(repo, &Digest::of(&config), config.len() as u64, None, bytes_body(&config)).await.unwrap();
    assert_ne!(outcome, PushOutcome::Mounted);
    client.push_blob(repo, &layer.digest, layer.size, None, open(layer).await).await.unwrap();
    let manifest = manifest_json(media_types::OCI_MANIFEST, media_types::OCI_CONFIG, &config, layer, media_types::OCI_LAYER_GZIP);
    let digest = client
        .put_manifest(&repo.with_tag(tag).unwrap(), media_types::OCI_MANIFEST, Bytes::from(manifest.clone()))
        .await
        .unwrap();
    assert_eq!(digest, Digest::of(&manifest));
    manifest
}

fn unauthorized(e: &RegistryError) -> &accel::registry::AuthFailure {
    match e {
        RegistryError::Unauthorized(f) => f,
        other => panic!("expected an authorization failure, got {other:?}: {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Real registry, no auth

#[tokio::test]
async fn push_and_pull_blobs_manifests_and_index() {
    let server = RegistryServer::start(RegistryAuth::None);
    let dir = tempfile::tempdir().unwrap();
    let client = anonymous_client(dir.path());
    let repo = reference(&format!("{}/accel/app", server.host()));

    // Several MiB plus an odd tail, so the upload spans many chunks and is not aligned.
    let layer = file_blob(dir.path(), "layer", &pseudo_random(6 * 1024 * 1024 + 12_345, 1));
    assert_eq!(client.head_blob(&repo, &layer.digest).await.unwrap(), None);
    let outcome = client.push_blob(&repo, &layer.digest, layer.size, None, open(&layer).await).await.unwrap();
    assert_eq!(outcome, PushOutcome::Uploaded);
    assert_eq!(client.head_blob(&repo, &layer.digest).await.unwrap(), Some(layer.size));
    // Pushing again finds it with HEAD and sends nothing.
    let outcome = client.push_blob(&repo, &layer.digest, layer.size, None, open(&layer).await).await.unwrap();
    assert_eq!(outcome, PushOutcome::Exists);

    let manifest = push_image(&client, &repo, "v1", &layer).await;
    let index = index_json(&manifest);
    let index_digest = client
        .put_manifest(&repo.with_tag("multi").unwrap(), media_types::OCI_INDEX, Bytes::from(index.clone()))
        .await
        .unwrap();

    let got = client.get_manifest(&repo.with_tag("v1").unwrap()).await.unwrap();
    assert_eq!(got.bytes.as_ref(), manifest.as_slice());
    assert_eq!(got.media_type, media_types::OCI_MANIFEST);
    assert_eq!(got.digest, Digest::of(&manifest));
    let by_digest = client.get_manifest(&repo.with_digest(got.digest.clone())).await.unwrap();
    assert_eq!(by_digest.bytes, got.bytes);
    let got_index = client.get_manifest(&repo.with_tag("multi").unwrap()).await.unwrap();
    assert_eq!(got_index.media_type, media_types::OCI_INDEX);
    assert_eq!(got_index.digest, index_digest);
    assert_eq!(got_index.bytes.as_ref(), index.as_slice());

    let (size, data) = collect(&client, &repo, &layer.digest).await;
    assert_eq!(size, Some(layer.size));
    assert_eq!(Digest::of(&data), layer.digest);

    // An untagged push goes by digest.
    let untagged = client.put_manifest(&repo.repository_only(), media_types::OCI_INDEX, Bytes::from(index.clone())).await.unwrap();
    assert_eq!(untagged, index_digest);

    // Docker media types round-trip as well.
    let config = image_config();
    let docker = manifest_json(
        media_types::DOCKER_MANIFEST,
        media_types::DOCKER_CONFIG,
        &config,
        &layer,
        media_types::DOCKER_LAYER_GZIP,
    );
    client.put_manifest(&repo.with_tag("docker").unwrap(), media_types::DOCKER_MANIFEST, Bytes::from(docker.clone())).await.unwrap();
    let got = client.get_manifest(&repo.with_tag("docker").unwrap()).await.unwrap();
    assert_eq!(got.media_type, media_types::DOCKER_MANIFEST);
    assert_eq!(got.bytes.as_ref(), docker.as_slice());

    let missing = client.get_manifest(&repo.with_tag("nope").unwrap()).await.unwrap_err();
    assert!(missing.is_not_found() && !missing.is_retryable(), "{missing:?}");
    assert!(missing.to_string().contains("MANIFEST_UNKNOWN"), "{missing}");
    let missing_blob = client.get_blob(&repo, &Digest::of(b"absent")).await.unwrap_err();
    assert!(missing_blob.is_not_found(), "{missing_blob:?}");
}

#[tokio::test]
async fn mounts_across_repositories_of_the_same_registry() {
    let server = RegistryServer::start(RegistryAuth::None);
    let dir = tempfile::tempdir().unwrap();
    let client = anonymous_client(dir.path());
    let source = reference(&format!("{}/accel/source", server.host()));
    let target = reference(&format!("{}/accel/target", server.host()));
    let layer = file_blob(dir.path(), "layer", &pseudo_random(2 * 1024 * 1024, 2));
    client.push_blob(&source, &layer.digest, layer.size, None, open(&layer).await).await.unwrap();

    // The body must not be read for a mount: an empty reader would fail the size check.
    let outcome = client.push_blob(&target, &layer.digest, layer.size, Some(&source), Box::new(tokio::io::empty())).await.unwrap();
    assert_eq!(outcome, PushOutcome::Mounted);
    assert_eq!(client.head_blob(&target, &layer.digest).await.unwrap(), Some(layer.size));

    // A source on another registry cannot be mounted from: the blob is uploaded.
    let elsewhere = reference("registry.example.com/accel/source");
    let other = file_blob(dir.path(), "other", &pseudo_random(300_000, 3));
    let outcome = client.push_blob(&target, &other.digest, other.size, Some(&elsewhere), open(&other).await).await.unwrap();
    assert_eq!(outcome, PushOutcome::Uploaded);

    // A mount source that lacks the blob makes the registry open a normal upload instead.
    let third = file_blob(dir.path(), "third", &pseudo_random(100_000, 4));
    let outcome = client.push_blob(&target, &third.digest, third.size, Some(&source), open(&third).await).await.unwrap();
    assert_eq!(outcome, PushOutcome::Uploaded);
    let (_, data) = collect(&client, &target, &third.digest).await;
    assert_eq!(Digest::of(&data), third.digest);
}

#[tokio::test]
async fn upload_body_of_the_wrong_length_fails_clearly() {
    let server = RegistryServer::start(RegistryAuth::None);
    let dir = tempfile::tempdir().unwrap();
    let client = anonymous_client(dir.path());
    let repo = reference(&format!("{}/accel/app", server.host()));
    let data = pseudo_random(50_000, 5);
    let digest = Digest::of(&data);
    let err = client.push_blob(&repo, &digest, data.len() as u64 + 10, None, bytes_body(&data)).await.unwrap_err();
    assert!(matches!(err, RegistryError::UploadBody { .. }), "{err:?}");
    assert!(err.to_string().contains("ended after 50000"), "{err}");
    assert!(!err.is_retryable());
    // Announcing the right size but sending other bytes: the registry rejects the digest.
    let other = pseudo_random(50_000, 6);
    let err = client.push_blob(&repo, &digest, other.len() as u64, None, bytes_body(&other)).await.unwrap_err();
    assert!(!err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains("DIGEST_INVALID"), "{err}");
    assert_eq!(client.head_blob(&repo, &digest).await.unwrap(), None);
}

#[tokio::test]
async fn fetch_by_digest_detects_altered_content() {
    let server = RegistryServer::start(RegistryAuth::None);
    let dir = tempfile::tempdir().unwrap();
    let client = anonymous_client(dir.path());
    let repo = reference(&format!("{}/accel/app", server.host()));
    let layer = file_blob(dir.path(), "layer", &pseudo_random(10_000, 7));
    let manifest = push_image(&client, &repo, "v1", &layer).await;
    let digest = Digest::of(&manifest);

    // Change one byte of the stored manifest, keeping its length, as a faulty storage would.
    let stored = server.blob_data_path(&digest.hex());
    let bytes = std::fs::read(&stored).unwrap();
    assert_eq!(bytes, manifest);
    let text = String::from_utf8(bytes).unwrap().replacen("test aaaa", "test aaab", 1);
    std::fs::write(&stored, text).unwrap();

    let err = client.get_manifest(&repo.with_digest(digest.clone())).await.unwrap_err();
    match &err {
        RegistryError::DigestMismatch { expected, actual, .. } => {
            assert_eq!(*expected, digest);
            assert_ne!(*actual, digest);
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert!(!err.is_retryable());
    // By tag there is nothing to check against; the caller sees the new digest.
    let by_tag = client.get_manifest(&repo.with_tag("v1").unwrap()).await.unwrap();
    assert_ne!(by_tag.digest, digest);
    // Pushing bytes under a digest they do not have is refused before sending.
    let err = client.put_manifest(&repo.with_digest(digest), media_types::OCI_MANIFEST, by_tag.bytes).await.unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Real registry, htpasswd basic auth

#[tokio::test]
async fn basic_auth_with_credentials_from_config_and_docker_config() {
    // Harbor robot secrets may contain ':'; only the first one separates the user.
    let (user, password) = ("robot$accel", "s3:cr:et");
    let server = RegistryServer::start(RegistryAuth::Basic { user: user.into(), password: password.into() });
    let dir = tempfile::tempdir().unwrap();
    let repo = reference(&format!("{}/accel/app", server.host()));
    let layer = file_blob(dir.path(), "layer", &pseudo_random(3 * 1024 * 1024, 8));

    // `auth` as Harbor shows it: base64 of user:secret.
    let rc = RegistryConfig { auth: Some(Secret::new(b64(&format!("{user}:{password}")))), ..Default::default() };
    let client = RegistryClient::new(&config_in(dir.path(), vec![(server.host(), rc)])).unwrap();
    let manifest = push_image(&client, &repo, "v1", &layer).await;
    assert_eq!(client.get_manifest(&repo.with_tag("v1").unwrap()).await.unwrap().bytes.as_ref(), manifest.as_slice());
    let (_, data) = collect(&client, &repo, &layer.digest).await;
    assert_eq!(Digest::of(&data), layer.digest);

    // The same credentials from a docker config.json, under the URL-style key older docker wrote.
    let docker_dir = tempfile::tempdir().unwrap();
    let docker_config = docker_dir.path().join("config.json");
    let key = format!("https://{}/v1/", server.host());
    std::fs::write(&docker_config, serde_json::json!({"auths": {key: {"auth": b64(&format!("{user}:{password}"))}}}).to_string()).unwrap();
    let config = Config { docker_config: Some(docker_config.clone()), ..Default::default() };
    let client = RegistryClient::new(&config).unwrap();
    let got = client.get_manifest(&repo.with_tag("v1").unwrap()).await.unwrap();
    assert_eq!(got.digest, Digest::of(&manifest));
    let target = reference(&format!("{}/accel/other", server.host()));
    let outcome = client.push_blob(&target, &layer.digest, layer.size, Some(&repo), Box::new(tokio::io::empty())).await.unwrap();
    assert_eq!(outcome, PushOutcome::Mounted);

    // username/password in the docker config work too.
    std::fs::write(&docker_config, serde_json::json!({"auths": {server.host(): {"username": user, "password": password}}}).to_string()).unwrap();
    let client = RegistryClient::new(&config).unwrap();
    assert!(client.head_blob(&repo, &layer.digest).await.unwrap().is_some());
}

#[tokio::test]
async fn basic_auth_wrong_or_missing_credentials_are_explained() {
    let server = RegistryServer::start(RegistryAuth::Basic { user: "accel".into(), password: "right:pw".into() });
    let dir = tempfile::tempdir().unwrap();
    let repo = reference(&format!("{}/accel/app", server.host()));

    let wrong = client_with_password(dir.path(), &server.host(), "accel", "right:pwX");
    let err = wrong.get_manifest(&repo.with_tag("v1").unwrap()).await.unwrap_err();
    let failure = unauthorized(&err);
    assert_eq!(failure.host, server.host());
    assert_eq!(failure.repository, "accel/app");
    assert!(failure.credentials.as_deref().unwrap().contains(&server.host()), "{err}");
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(text.contains("rejected the credentials") && text.contains(&server.host()) && text.contains("accel/app"), "{text}");
    assert!(!text.contains("right:pwX"), "{text}");

    let data = pseudo_random(1000, 9);
    let err = wrong.push_blob(&repo, &Digest::of(&data), 1000, None, bytes_body(&data)).await.unwrap_err();
    assert!(unauthorized(&err).access.contains("push"), "{err}");

    let anonymous = anonymous_client(dir.path());
    let err = anonymous.head_blob(&repo, &Digest::of(&data)).await.unwrap_err();
    assert!(unauthorized(&err).credentials.is_none());
    assert!(err.to_string().contains(&format!("registries.\"{}\".auth", server.host())), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Real registry, bearer tokens from a token server

const TOKEN_USER: &str = "accel-robot";
const TOKEN_PASSWORD: &str = "t0ken:pass";

fn token_server() -> RegistryServer {
    RegistryServer::start(RegistryAuth::Token { user: TOKEN_USER.into(), password: TOKEN_PASSWORD.into() })
}

#[tokio::test]
async fn bearer_token_push_pull_and_mount() {
    let server = token_server();
    let tokens = server.token.as_ref().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = client_with_password(dir.path(), &server.host(), TOKEN_USER, TOKEN_PASSWORD);
    let repo = reference(&format!("{}/accel/app", server.host()));
    let layer = file_blob(dir.path(), "layer", &pseudo_random(4 * 1024 * 1024 + 1, 10));

    let manifest = push_image(&client, &repo, "v1", &layer).await;
    let requests = tokens.requests();
    assert!(requests.iter().all(|r| r.issued && r.user.as_deref() == Some(TOKEN_USER)), "{requests:?}");
    assert!(requests.iter().all(|r| r.service.as_deref() == Some(common::registry::TOKEN_SERVICE)), "{requests:?}");
    // Two blobs (HEAD, POST, PUT each) and a manifest share one push token.
    let push_scope = "repository:accel/app:pull,push".to_string();
    assert_eq!(requests.iter().filter(|r| r.scopes.contains(&push_scope)).count(), 1, "{requests:?}");

    let got = client.get_manifest(&repo.with_tag("v1").unwrap()).await.unwrap();
    assert_eq!(got.bytes.as_ref(), manifest.as_slice());
    let (_, data) = collect(&client, &repo, &layer.digest).await;
    assert_eq!(Digest::of(&data), layer.digest);
    let pull_scope = "repository:accel/app:pull".to_string();
    assert_eq!(tokens.requests().iter().filter(|r| r.scopes == vec![pull_scope.clone()]).count(), 1);

    // A mount needs push on the target and pull on the source, in one token.
    let target = reference(&format!("{}/accel/converted", server.host()));
    let outcome = client.push_blob(&target, &layer.digest, layer.size, Some(&repo), Box::new(tokio::io::empty())).await.unwrap();
    assert_eq!(outcome, PushOutcome::Mounted);
    let mount_request = tokens.requests().into_iter().find(|r| r.scopes.len() == 2).expect("a token request for the mount");
    assert!(mount_request.scopes.contains(&"repository:accel/converted:pull,push".to_string()), "{mount_request:?}");
    assert!(mount_request.scopes.contains(&"repository:accel/app:pull".to_string()), "{mount_request:?}");
    assert_eq!(client.head_blob(&target, &layer.digest).await.unwrap(), Some(layer.size));
}

#[tokio::test]
async fn bearer_token_cache_respects_expiry() {
    let server = token_server();
    let tokens = server.token.as_ref().unwrap();
    tokens.set_expires_in(2);
    let dir = tempfile::tempdir().unwrap();
    let client = client_with_password(dir.path(), &server.host(), TOKEN_USER, TOKEN_PASSWORD);
    let repo = reference(&format!("{}/accel/app", server.host()));
    let digest = Digest::of(b"absent");
    assert_eq!(client.head_blob(&repo, &digest).await.unwrap(), None);
    assert_eq!(client.head_blob(&repo, &digest).await.unwrap(), None);
    assert_eq!(tokens.requests().len(), 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(client.head_blob(&repo, &digest).await.unwrap(), None);
    assert_eq!(tokens.requests().len(), 2, "an expired token must be replaced");
}

#[tokio::test]
async fn bearer_token_wrong_or_missing_credentials_are_explained() {
    let server = token_server();
    let dir = tempfile::tempdir().unwrap();
    let repo = reference(&format!("{}/accel/app", server.host()));

    let wrong = client_with_password(dir.path(), &server.host(), TOKEN_USER, "nope");
    let err = wrong.get_manifest(&repo.with_tag("v1").unwrap()).await.unwrap_err();
    let failure = unauthorized(&err);
    assert!(failure.credentials.is_some());
    assert!(err.to_string().contains("rejected the credentials"), "{err}");
    assert!(err.to_string().contains("invalid user name or password"), "{err}");
    assert!(!err.is_retryable());

    // Anonymous clients get a token that grants nothing; the registry then refuses it.
    let anonymous = anonymous_client(dir.path());
    let err = anonymous.get_manifest(&repo.with_tag("v1").unwrap()).await.unwrap_err();
    assert!(unauthorized(&err).credentials.is_none(), "{err:?}");
    assert!(err.to_string().contains("no credentials are configured"), "{err}");
    let requests = server.token.as_ref().unwrap().requests();
    assert!(requests.iter().any(|r| r.user.is_none() && r.issued), "{requests:?}");
}

#[tokio::test]
async fn bearer_token_without_permission_is_explained_and_mount_falls_back() {
    let server = token_server();
    let tokens = server.token.as_ref().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = client_with_password(dir.path(), &server.host(), TOKEN_USER, TOKEN_PASSWORD);
    let secret = reference(&format!("{}/accel/secret", server.host()));
    let target = reference(&format!("{}/accel/target", server.host()));
    let layer = file_blob(dir.path(), "layer", &pseudo_random(700_000, 13));
    client.push_blob(&secret, &layer.digest, layer.size, None, open(&layer).await).await.unwrap();

    // No pull on the mount source: the mount is refused and the blob is uploaded instead.
    tokens.deny("accel/secret", "pull");
    let fresh = client_with_password(dir.path(), &server.host(), TOKEN_USER, TOKEN_PASSWORD);
    let outcome = fresh.push_blob(&target, &layer.digest, layer.size, Some(&secret), open(&layer).await).await.unwrap();
    assert_eq!(outcome, PushOutcome::Uploaded);
    assert!(tokens.requests().iter().any(|r| r.scopes.contains(&"repository:accel/secret:pull".to_string())));

    // Pull but no push: checking works, pushing is refused with what permission is missing.
    tokens.deny("*", "push");
    let read_only = client_with_password(dir.path(), &server.host(), TOKEN_USER, TOKEN_PASSWORD);
    let repo = reference(&format!("{}/accel/app", server.host()));
    let data = pseudo_random(1000, 14);
    let err = read_only.push_blob(&repo, &Digest::of(&data), 1000, None, bytes_body(&data)).await.unwrap_err();
    let failure = unauthorized(&err);
    assert!(failure.insufficient_scope && failure.credentials.is_some(), "{failure:?}");
    assert!(err.to_string().contains("do not grant pull,push access to repository accel/app"), "{err}");
    assert!(!err.is_retryable());
}

// ---------------------------------------------------------------------------------------------
// Fake servers

/// A request as a fake server saw it.
#[derive(Debug, Clone)]
struct SeenRequest {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl SeenRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

enum Reply {
    Respond { status: u16, headers: Vec<(String, String)>, body: Vec<u8> },
    /// Close the connection without answering.
    Close,
    /// Answer nothing for this long.
    Stall(Duration),
}

fn respond(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    Reply::Respond {
        status,
        headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        body: body.to_vec(),
    }
}

type Handler = dyn Fn(&SeenRequest, usize) -> Reply + Send + Sync;

/// A tiny HTTP/1.1 server on loopback answering each request with `handler(request, n)`.
struct FakeServer {
    port: u16,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    stop: Arc<AtomicBool>,
}

impl FakeServer {
    fn start(handler: impl Fn(&SeenRequest, usize) -> Reply + Send + Sync + 'static) -> FakeServer {
        FakeServer::start_with(true, handler)
    }

    /// With `read_bodies` false the handler runs as soon as the head is in, and the request
    /// body stays unread (to make a client's upload stall).
    fn start_with(read_bodies: bool, handler: impl Fn(&SeenRequest, usize) -> Reply + Send + Sync + 'static) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let counter = Arc::new(AtomicUsize::new(0));
        {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (seen, handler, counter) = (seen.clone(), handler.clone(), counter.clone());
                    std::thread::spawn(move || serve_fake(conn, &seen, &*handler, &counter, read_bodies));
                }
            });
        }
        FakeServer { port, seen, stop }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve_fake(mut conn: TcpStream, seen: &Mutex<Vec<SeenRequest>>, handler: &Handler, counter: &AtomicUsize, read_bodies: bool) {
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_string();
    let target = first.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while read_bodies && body.len() < length {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let request = SeenRequest { method: method.clone(), target, headers, body };
    seen.lock().unwrap().push(request.clone());
    let n = counter.fetch_add(1, Ordering::SeqCst);
    match handler(&request, n) {
        Reply::Close => {}
        Reply::Stall(d) => std::thread::sleep(d),
        Reply::Respond { status, headers, body } => {
            let mut out = format!("HTTP/1.1 {status} Fake\r\nConnection: close\r\n");
            let has_length = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
            for (k, v) in &headers {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            if !has_length {
                out.push_str(&format!("Content-Length: {}\r\n", body.len()));
            }
            out.push_str("\r\n");
            let _ = conn.write_all(out.as_bytes());
            if method != "HEAD" {
                let _ = conn.write_all(&body);
            }
        }
    }
}

fn small_manifest() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": media_types::OCI_INDEX, "manifests": []})).unwrap()
}

#[tokio::test]
async fn server_error_is_retryable_and_a_retry_succeeds() {
    let manifest = small_manifest();
    let body = manifest.clone();
    let fake = FakeServer::start(move |_, n| match n {
        0 => respond(500, &[("Content-Type", "application/json")], br#"{"errors":[{"code":"UNKNOWN","message":"storage hiccup"}]}"#),
        1 => respond(429, &[], b""),
        // No useful Content-Type: the media type comes from the body.
        _ => respond(200, &[("Content-Type", "application/json")], &body),
    });
    let dir = tempfile::tempdir().unwrap();
    let client = anonymous_client(dir.path());
    let r = reference(&format!("{}/accel/app:v1", fake.host()));
    let err = client.get_manifest(&r).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(err.status().map(|s| s.as_u16()), Some(500));
    assert!(err.to_string().contains("storage hiccup"), "{err}");
    let err = client.get_manifest(&r).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    let got = client.get_manifest(&r).await.unwrap();
    assert_eq!(got.bytes.as_ref(), manifest.as_slice());
    assert_eq!(got.media_type, media_types::OCI_INDEX);
    let seen = fake.seen();
    assert!(seen[0].header("accept").unwrap().contains(media_types::OCI_MANIFEST), "{seen:?}");
    assert!(seen[0].header("user-agent").unwrap().starts_with("accel/"), "{seen:?}");
}

#[tokio::test]
async fn dropped_connection_and_stalled_server_are_retryable() {
    let dropping = FakeServer::start(|_, _| Reply::Close);
    let stalling = FakeServer::start(|_, _| Reply::Stall(Duration::from_secs(3)));
    let dir = tempfile::tempdir().unwrap();
    let options = ClientOptions { idle_timeout: Duration::from_millis(500), ..Default::default() };
    let client = RegistryClient::with_options(&config_in(dir.path(), vec![]), options).unwrap();

    let err = client.get_manifest(&reference(&format!("{}/a:v1", dropping.host()))).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    let err = client.get_manifest(&reference(&format!("{}/a:v1", stalling.host()))).await.unwrap_err();
    assert!(matches!(err, RegistryError::Timeout { .. }), "{err:?}");
    assert!(err.is_retryable());

    // A body cut short by a closed connection.
    let cut = FakeServer::start(|_, _| respond(200, &[("Content-Length", "100000")], b"only a little"));
    let repo = reference(&format!("{}/a", cut.host()));
    let mut blob = client.get_blob(&repo, &Digest::of(b"x")).await.unwrap();
    assert_eq!(blob.size, Some(100_000));
    let mut failure = None;
    while let Some(chunk) = blob.stream.next().await {
        if let Err(e) = chunk {
            failure = Some(e);
            break;
        }
    }
    let failure = failure.expect("a truncated body must end in an error");
    assert!(failure.is_retryable(), "{failure:?}");

    // Nothing listening at all.
    let port = common::registry::free_port();
    let err = client.get_manifest(&reference(&format!("127.0.0.1:{port}/a:v1"))).await.unwrap_err();
    assert!(matches!(err, RegistryError::Connect { .. }) && err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains("refused"), "{err}");
}

#[tokio::test]
async fn oversized_manifest_is_refused() {
    let big = vec![b' '; 5 * 1024 * 1024];
    let fake = FakeServer::start(move |_, _| respond(200, &[("Content-Type", media_types::OCI_MANIFEST)], &big));
    let dir = tempfile::tempdir().unwrap();
    let client = anonymous_client(dir.path());
    let err = client.get_manifest(&reference(&format!("{}/a:v1", fake.host()))).await.unwrap_err();
    assert!(matches!(err, RegistryError::TooLarge { .. }) && !err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains("limit"), "{err}");
}

/// A registry that wants basic auth and points blob downloads and uploads at a second server
/// (as registries on object storage do); the second server must never see the credentials.
#[tokio::test]
async fn redirects_and_foreign_upload_locations_do_not_receive_credentials() {
    let blob = pseudo_random(200_000, 11);
    let digest = Digest::of(&blob);
    let storage = {
        let blob = blob.clone();
        FakeServer::start(move |req, _| match req.method.as_str() {
            "GET" => respond(200, &[("Content-Type", "application/octet-stream")], &blob),
            "PUT" => respond(201, &[], b""),
            _ => respond(405, &[], b""),
        })
    };
    let storage_host = storage.host();
    let expected_auth = format!("Basic {}", b64("user:pw"));
    let registry = {
        let expected_auth = expected_auth.clone();
        FakeServer::start(move |req, _| {
            if req.header("authorization") != Some(expected_auth.as_str()) {
                return respond(401, &[("WWW-Authenticate", r#"Basic realm="fake""#)], b"");
            }
            match (req.method.as_str(), req.target.as_str()) {
                ("GET", t) if t.contains("/blobs/") => {
                    respond(307, &[("Location", &format!("http://{storage_host}/bucket/blob?X-Signature=s3cr3t"))], b"")
                }
                ("HEAD", _) => respond(404, &[], b""),
                ("POST", _) => respond(202, &[("Location", &format!("http://{storage_host}/upload/u1?_state=abc"))], b""),
                _ => respond(400, &[], b""),
            }
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let client = client_with_password(dir.path(), &registry.host(), "user", "pw");
    let repo = reference(&format!("{}/accel/app", registry.host()));

    let mut stream = client.get_blob(&repo, &digest).await.unwrap();
    let mut data = Vec::new();
    while let Some(chunk) = stream.stream.next().await {
        data.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(data, blob);

    let outcome = client.push_blob(&repo, &digest, blob.len() as u64, None, bytes_body(&blob)).await.unwrap();
    assert_eq!(outcome, PushOutcome::Uploaded);

    let at_storage = storage.seen();
    assert_eq!(at_storage.len(), 2, "{at_storage:?}");
    assert!(at_storage.iter().all(|r| r.header("authorization").is_none()), "credentials leaked: {at_storage:?}");
    let put = at_storage.iter().find(|r| r.method == "PUT").unwrap();
    assert!(put.target.starts_with("/upload/u1?_state=abc&digest=sha256%3A"), "{}", put.target);
    assert_eq!(put.header("content-length"), Some(blob.len().to_string().as_str()));
    assert_eq!(put.body, blob);
    assert!(registry.seen().iter().any(|r| r.header("authorization") == Some(expected_auth.as_str())));
}

// ---------------------------------------------------------------------------------------------
// Transport: HTTPS for names that are not loopback, and what `insecure` relaxes

/// Options that make `registry.test` (a name no DNS knows) reach this machine; not being a
/// loopback name, it gets the HTTPS rules.
fn resolving_registry_test() -> ClientOptions {
    ClientOptions { resolve: vec![("registry.test".into(), IpAddr::V4(Ipv4Addr::LOCALHOST))], ..Default::default() }
}

fn insecure(host: &str) -> Vec<(String, RegistryConfig)> {
    vec![(host.to_string(), RegistryConfig { insecure: true, ..Default::default() })]
}

/// `openssl s_server -WWW` with a throwaway self-signed certificate, serving files below a
/// directory over HTTPS on loopback.
struct TlsServer {
    child: Child,
    port: u16,
    _root: tempfile::TempDir,
}

impl TlsServer {
    fn start(files: &[(&str, &[u8])]) -> TlsServer {
        let root = tempfile::tempdir().unwrap();
        for (path, data) in files {
            let p = root.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        let keys = tempfile::tempdir().unwrap();
        let (key, cert) = (keys.path().join("key.pem"), keys.path().join("cert.pem"));
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=registry.test"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("the openssl CLI is needed for TLS tests (Debian package openssl)");
        assert!(out.status.success(), "openssl req: {}", String::from_utf8_lossy(&out.stderr));
        let port = common::registry::free_port();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-WWW", "-accept", &format!("127.0.0.1:{port}")])
            .arg("-key")
            .arg(&key)
            .arg("-cert")
            .arg(&cert)
            .current_dir(root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start openssl s_server");
        let mut server = TlsServer { child, port, _root: root };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("openssl s_server exited with {status}");
            }
            assert!(std::time::Instant::now() < deadline, "openssl s_server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn tls_certificates_are_verified_unless_the_host_is_insecure() {
    let index = small_manifest();
    let tls = TlsServer::start(&[("v2/accel/app/manifests/v1", &index)]);
    let host = format!("registry.test:{}", tls.port);
    let r = reference(&format!("{host}/accel/app:v1"));
    let dir = tempfile::tempdir().unwrap();

    let verifying = RegistryClient::with_options(&config_in(dir.path(), vec![]), resolving_registry_test()).unwrap();
    let err = verifying.get_manifest(&r).await.unwrap_err();
    assert!(matches!(err, RegistryError::Tls { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains(&format!("`insecure: true` under registries.\"{host}\"")), "{err}");

    let relaxed = RegistryClient::with_options(&config_in(dir.path(), insecure(&host)), resolving_registry_test()).unwrap();
    let got = relaxed.get_manifest(&r).await.unwrap();
    assert_eq!(got.bytes.as_ref(), index.as_slice());
    // s_server says text/plain; the body's mediaType says what it is.
    assert_eq!(got.media_type, media_types::OCI_INDEX);
}

#[tokio::test]
async fn insecure_host_without_tls_is_reached_over_plain_http() {
    let server = RegistryServer::start(RegistryAuth::None);
    let host = format!("registry.test:{}", server.port);
    let repo = reference(&format!("{host}/accel/app"));
    let dir = tempfile::tempdir().unwrap();

    // Not loopback by name, not insecure: HTTPS only, and the plain-HTTP registry cannot do it.
    let strict = RegistryClient::with_options(&config_in(dir.path(), vec![]), resolving_registry_test()).unwrap();
    let err = strict.head_blob(&repo, &Digest::of(b"x")).await.unwrap_err();
    assert!(matches!(err, RegistryError::Tls { .. }) && !err.is_retryable(), "{err:?}");

    let relaxed = RegistryClient::with_options(&config_in(dir.path(), insecure(&host)), resolving_registry_test()).unwrap();
    let layer = file_blob(dir.path(), "layer", &pseudo_random(500_000, 12));
    let manifest = push_image(&relaxed, &repo, "v1", &layer).await;
    let got = relaxed.get_manifest(&repo.with_tag("v1").unwrap()).await.unwrap();
    assert_eq!(got.bytes.as_ref(), manifest.as_slice());
}

/// A fake registry that opens uploads and then misbehaves on the PUT.
fn stalling_upload_registry(read_bodies: bool) -> FakeServer {
    FakeServer::start_with(read_bodies, |req, _| match req.method.as_str() {
        "HEAD" => respond(404, &[], b""),
        "POST" => respond(202, &[("Location", "/v2/a/blobs/uploads/u1?_state=s")], b""),
        _ => Reply::Stall(Duration::from_secs(5)),
    })
}

#[tokio::test]
async fn stalled_uploads_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 64 << 20;
    let body = || -> Box<dyn AsyncRead + Send + Unpin> { Box::new(tokio::io::AsyncReadExt::take(tokio::io::repeat(7), size)) };

    // The registry stops reading mid-upload: the body stops moving.
    let fake = stalling_upload_registry(false);
    let options = ClientOptions { idle_timeout: Duration::from_millis(600), ..Default::default() };
    let client = RegistryClient::with_options(&config_in(dir.path(), vec![]), options).unwrap();
    let repo = reference(&format!("{}/a", fake.host()));
    let started = std::time::Instant::now();
    let err = client.push_blob(&repo, &Digest::of(b"x"), size, None, body()).await.unwrap_err();
    assert!(matches!(err, RegistryError::Timeout { after, .. } if after == Duration::from_millis(600)), "{err:?}");
    assert!(err.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());

    // The registry takes the whole body, then never answers.
    let fake = stalling_upload_registry(true);
    let options = ClientOptions {
        idle_timeout: Duration::from_secs(3),
        upload_commit_timeout: Duration::from_millis(700),
        ..Default::default()
    };
    let client = RegistryClient::with_options(&config_in(dir.path(), vec![]), options).unwrap();
    let repo = reference(&format!("{}/a", fake.host()));
    let err = client.push_blob(&repo, &Digest::of(b"x"), 1 << 20, None, Box::new(tokio::io::AsyncReadExt::take(tokio::io::repeat(7), 1 << 20))).await.unwrap_err();
    assert!(matches!(err, RegistryError::Timeout { after, .. } if after == Duration::from_millis(700)), "{err:?}");
    let put = fake.seen().into_iter().find(|r| r.method == "PUT").unwrap();
    assert_eq!(put.body.len(), 1 << 20);
    assert!(put.target.starts_with("/v2/a/blobs/uploads/u1?_state=s&digest="), "{}", put.target);
}
