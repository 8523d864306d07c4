//! End to end: the real `acceld` binary against Debian's `docker-registry` on loopback, with
//! the shared real-content fixtures (the Debian rootfs image, the hand-made image), posted
//! Harbor webhooks, and converted layers read back with the reference reader.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use accel::oci::annotations;
use common::fixtures::{check_estargz, debian_image, handmade_image, PushedImage};
use common::registry::{free_port, RegistryAuth, RegistryServer};

const AUTH: &str = "Basic YWNjZWw6dGVzdA==";

/// A stored blob parsed as JSON.
fn stored_json(reg: &RegistryServer, digest: &str) -> Value {
    let hex = digest.strip_prefix("sha256:").unwrap_or_else(|| panic!("not a sha256 digest: {digest}"));
    let bytes = std::fs::read(reg.blob_data_path(hex)).unwrap_or_else(|e| panic!("blob {digest} is not stored: {e}"));
    serde_json::from_slice(&bytes).unwrap()
}

/// The manifest `repo:tag` points at, if the tag exists.
fn manifest(reg: &RegistryServer, repo: &str, tag: &str) -> Option<Value> {
    reg.tag_digest(repo, tag).map(|d| stored_json(reg, &d))
}

/// Checks the converted image `repo:tag` against `source`: it names its source, and every
/// layer's tar view and TOC view read back by the reference reader equal the source layer.
fn verify_estargz(reg: &RegistryServer, repo: &str, tag: &str, source: &PushedImage) {
    let converted = manifest(reg, repo, tag).unwrap_or_else(|| panic!("{repo}:{tag} is not in the registry"));
    assert_eq!(converted["annotations"][annotations::SOURCE_DIGEST], source.digest.as_str(), "{repo}:{tag}");
    let layers = converted["layers"].as_array().unwrap();
    assert_eq!(layers.len(), source.layers().len(), "{repo}:{tag}");
    for (layer, src) in layers.iter().zip(source.layers()) {
        let toc = layer["annotations"][annotations::ESTARGZ_TOC_DIGEST].as_str().expect("TOC digest annotation");
        let hex = layer["digest"].as_str().unwrap().trim_start_matches("sha256:");
        check_estargz(&src.blob, &reg.blob_data_path(hex), toc);
    }
}

/// The `acceld` binary with its own config, task database, store and log.
struct Acceld {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    http: reqwest::Client,
}

impl Acceld {
    fn write_config(dir: &Path, registry_host: &str, port: u16, compression_level: u32) {
        let config = format!(
            r#"
server: {{ listen: "127.0.0.1:{port}", auth_header: "{AUTH}", shutdown_grace_secs: 30 }}
store: {{ kind: embedded, path: "{store}" }}
registries: {{ "{registry_host}": {{}} }}
tasks: {{ path: "{tasks}", retry_backoff_secs: 1 }}
sources: {{ harbor: {{ kind: harbor }} }}
pipelines:
  - name: accelerate
    sources: [harbor]
    match: {{ repositories: ["library/*"] }}
    convert: [{{ driver: estargz, options: {{ compression_level: {compression_level} }} }}]
"#,
            store = dir.join("store").display(),
            tasks = dir.join("tasks.redb").display(),
        );
        std::fs::write(dir.join("pipelines.yaml"), config).unwrap();
    }

    async fn start(dir: &Path, port: u16) -> Acceld {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("acceld.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_acceld"))
            .arg("--config")
            .arg(dir.join("pipelines.yaml"))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let mut d = Acceld { child: Some(child), dir: dir.to_path_buf(), port, http: reqwest::Client::new() };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("acceld exited with {status}:\n{}", d.log());
            }
            if let Ok(r) = d.http.get(d.url("/api/v1/health")).header("authorization", AUTH).send().await {
                if r.status().is_success() {
                    return d;
                }
            }
            assert!(Instant::now() < deadline, "acceld not healthy within 30 s:\n{}", d.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("acceld.log")).unwrap_or_default()
    }

    /// Waits until the log holds `line`.
    async fn wait_for_log(&self, line: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log().contains(line) {
            assert!(Instant::now() < deadline, "no {line:?} in the log within {within:?}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn post(&self, body: &str, content_type: &str, sync: bool, auth: Option<&str>) -> (u16, Value) {
        let url = if sync { self.url("/api/v1/conversions?sync=true") } else { self.url("/api/v1/conversions") };
        let mut r = self.http.post(url).header("content-type", content_type).body(body.to_string());
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
    }

    /// Posts Harbor's default payload for `image`, with the configured auth header.
    async fn post_push(&self, image: &PushedImage, sync: bool) -> (u16, Value) {
        self.post(&harbor_default(image), "application/json", sync, Some(AUTH)).await
    }

    async fn list(&self) -> Vec<Value> {
        let r = self.http.get(self.url("/api/v1/conversions")).header("authorization", AUTH).send().await.unwrap();
        assert!(r.status().is_success());
        r.json().await.unwrap()
    }

    fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        let ok = Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "acceld did not stop after SIGTERM:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Acceld {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `host`, `repo` and `tag` of a pushed `HOST/REPO:TAG`.
fn split_reference(reference: &str) -> (&str, &str, &str) {
    let (host, rest) = reference.split_once('/').unwrap();
    let (repo, tag) = rest.rsplit_once(':').unwrap();
    (host, repo, tag)
}

/// Harbor's default webhook payload (`PUSH_ARTIFACT`) for a push of `image`.
fn harbor_default(image: &PushedImage) -> String {
    let (host, repo, tag) = split_reference(&image.reference);
    harbor_default_for(host, repo, tag, &image.digest)
}

fn harbor_default_for(host: &str, repo: &str, tag: &str, digest: &str) -> String {
    let (namespace, name) = repo.split_once('/').unwrap();
    json!({
        "type": "PUSH_ARTIFACT", "occur_at": 1737446601, "operator": "admin",
        "event_data": {
            "resources": [{ "digest": digest, "tag": tag, "resource_url": format!("{host}/{repo}:{tag}") }],
            "repository": { "date_created": 1737446600, "name": name, "namespace": namespace, "repo_full_name": repo, "repo_type": "private" }
        }
    })
    .to_string()
}

/// Harbor's CloudEvents payload for a push of `image`, naming it by digest only (as a
/// proxy-cache project does).
fn harbor_cloudevent(image: &PushedImage) -> String {
    let (host, repo, _) = split_reference(&image.reference);
    let (namespace, name) = repo.split_once('/').unwrap();
    let digest = &image.digest;
    json!({
        "specversion": "1.0", "requestid": "51c0b694-0168-4f3c-b0db-282565455d7b",
        "id": "66e18103-09c1-41f6-982f-37df223f3eeb", "source": "/projects/2/webhook/policies/15",
        "type": "harbor.artifact.pushed", "datacontenttype": "application/json", "time": "2023-04-03T06:04:46Z",
        "data": {
            "resources": [{ "digest": digest, "tag": digest, "resource_url": format!("{host}/{repo}@{digest}") }],
            "repository": { "date_created": 1680501893, "name": name, "namespace": namespace, "repo_full_name": repo, "repo_type": "private" }
        },
        "operator": "robot$ci"
    })
    .to_string()
}

async fn setup(level: u32) -> (RegistryServer, tempfile::TempDir, Acceld) {
    let reg = RegistryServer::start(RegistryAuth::None);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    Acceld::write_config(dir.path(), &reg.host(), port, level);
    let d = Acceld::start(dir.path(), port).await;
    (reg, dir, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harbor_payloads_convert_and_the_result_verifies() {
    let (reg, _dir, d) = setup(1).await;
    let debian = debian_image("amd64").build().push(&reg.host(), "library/debian:bookworm");

    let (status, body) = d.post_push(&debian, true).await;
    assert_eq!(status, 200, "{body}\n{}", d.log());
    assert_eq!(body["tasks"][0]["status"], "COMPLETED", "{body}");
    let converted = reg.tag_digest("library/debian", "bookworm-esgz").expect("bookworm-esgz pushed");
    assert_eq!(body["tasks"][0]["targets"][0]["digest"], converted.as_str(), "{body}");
    assert_eq!(body["tasks"][0]["targets"][0]["media_type"], "application/vnd.oci.image.manifest.v1+json", "{body}");
    verify_estargz(&reg, "library/debian", "bookworm-esgz", &debian);
    // The acceleration service's lines, which existing log searches look for.
    let log = d.log();
    for line in [
        format!("[API] HTTP server started on 127.0.0.1:{}\n", d.port),
        "received webhook request from 127.0.0.1:".into(),
        "POST /api/v1/conversions?sync=true 200".into(),
        format!("pulling image {}", debian.reference),
        format!("converting image {}", debian.reference),
        format!("converted image {}-esgz module=converter", debian.reference),
        format!("pushed image {}-esgz module=converter", debian.reference),
    ] {
        assert!(log.contains(&line), "log lacks {line:?}:\n{log}");
    }
    assert!(log.lines().any(|l| l.contains("received webhook request from 127.0.0.1:") && l.ends_with(" module=api")), "{log}");

    // CloudEvents, naming the image by digest only.
    let other = handmade_image().build().push(&reg.host(), "library/other:v2");
    let (status, body) = d.post(&harbor_cloudevent(&other), "application/cloudevents+json", true, Some(AUTH)).await;
    assert_eq!(status, 200, "{body}\n{}", d.log());
    assert_eq!(body["tasks"][0]["status"], "COMPLETED", "{body}");
    let target = format!("sha256-{}-esgz", other.digest.trim_start_matches("sha256:"));
    verify_estargz(&reg, "library/other", &target, &other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_bad_bodies_are_refused() {
    let (reg, _dir, d) = setup(1).await;
    let digest = format!("sha256:{}", "ab".repeat(32));
    let body = harbor_default_for(&reg.host(), "library/a", "1", &digest);
    for auth in [None, Some("Basic d3Jvbmc=")] {
        let (status, resp) = d.post(&body, "application/json", false, auth).await;
        assert_eq!(status, 401, "{resp}");
    }
    for (bad, field) in [
        (r#"{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"tag":"1"}]}}"#, "event_data.resources[0].resource_url"),
        (r#"{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"resource_url":"Bad/Ref"}]}}"#, "event_data.resources[0].resource_url"),
    ] {
        let (status, resp) = d.post(bad, "application/json", false, Some(AUTH)).await;
        assert_eq!((status, resp["field"].as_str()), (400, Some(field)), "{resp}");
    }
    let (status, _) = d.post("{", "application/json", false, Some(AUTH)).await;
    assert_eq!(status, 400);
    assert!(d.list().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_converts_once_and_the_pushed_result_is_not_converted() {
    let (reg, _dir, d) = setup(1).await;
    let app = handmade_image().build().push(&reg.host(), "library/app:1.0");
    for _ in 0..20 {
        let (status, body) = d.post_push(&app, false).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = d.post_push(&app, true).await;
    assert_eq!(status, 200, "{body}");
    // Harbor's event for the converted image, as the push of the result produces it.
    let converted_digest = reg.tag_digest("library/app", "1.0-esgz").expect("1.0-esgz pushed");
    let event = harbor_default_for(&reg.host(), "library/app", "1.0-esgz", &converted_digest);
    let (status, body) = d.post(&event, "application/json", true, Some(AUTH)).await;
    assert_eq!(status, 200);
    assert!(body["tasks"].as_array().unwrap().is_empty(), "{body}");
    let tasks = d.list().await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(d.log().matches("converting image").count(), 1, "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_conversion_then_restart_completes() {
    // The Debian rootfs at gzip level 9 takes seconds to convert: long enough to kill mid-way.
    let (reg, dir, mut d) = setup(9).await;
    let big = debian_image("amd64").build().push(&reg.host(), "library/big:1");
    let (status, body) = d.post_push(&big, false).await;
    assert_eq!(status, 200, "{body}");
    d.wait_for_log("converting image", Duration::from_secs(120)).await;
    let before = d.list().await;
    assert_eq!(before[0]["status"], "PROCESSING", "killed mid-conversion");
    d.kill9();
    assert!(reg.tag_digest("library/big", "1-esgz").is_none(), "the conversion was cut short:\n{}", d.log());

    let d = Acceld::start(dir.path(), d.port).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    let task = loop {
        let tasks = d.list().await;
        if tasks[0]["status"] != "PROCESSING" {
            break tasks[0].clone();
        }
        assert!(Instant::now() < deadline, "task not finished after restart:\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(task["status"], "COMPLETED", "{task}");
    assert!(task["attempts"].as_array().unwrap().len() >= 2, "{task}");
    verify_estargz(&reg, "library/big", "1-esgz", &big);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_running_conversion_and_exits() {
    // The Debian image at level 9 takes seconds to convert, so the signal lands mid-way.
    let (reg, _dir, mut d) = setup(9).await;
    let term = debian_image("amd64").build().push(&reg.host(), "library/term:1");
    let (status, _) = d.post_push(&term, false).await;
    assert_eq!(status, 200);
    d.wait_for_log("converting image", Duration::from_secs(60)).await;
    assert!(reg.tag_digest("library/term", "1-esgz").is_none(), "the conversion ended before the signal");
    let status = d.sigterm();
    assert!(status.success(), "exit {status}:\n{}", d.log());
    assert!(reg.tag_digest("library/term", "1-esgz").is_some(), "the running conversion finished:\n{}", d.log());
}
