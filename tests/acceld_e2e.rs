//! End to end: the real `acceld` binary against Debian's `docker-registry` on loopback, with
//! images made of Debian files from this machine, posted Harbor webhooks, and converted layers
//! read back with the reference reader (`layercheck`, built from ../shared/tools/layercheck).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use accel::oci::{annotations, media_types, Digest};
use common::registry::{free_port, RegistryAuth, RegistryServer};

const AUTH: &str = "Basic YWNjZWw6dGVzdA==";

/// A gzip tar layer of files from this machine, stored under their own paths (copies under
/// `copies` extra names, to make a layer large enough to take a while to convert).
fn layer(files: &[&str], copies: usize) -> (Vec<u8>, Digest) {
    let mut tar = tar::Builder::new(Vec::new());
    for f in files {
        let name = f.trim_start_matches('/');
        tar.append_path_with_name(f, name).unwrap_or_else(|e| panic!("{f}: {e}"));
        for i in 0..copies {
            tar.append_path_with_name(f, format!("{name}.copy{i}")).unwrap();
        }
    }
    let raw = tar.into_inner().unwrap();
    let diff_id = Digest::of(&raw);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    (gz.finish().unwrap(), diff_id)
}

fn some_debian_files() -> Vec<&'static str> {
    ["/etc/debian_version", "/etc/os-release", "/usr/bin/dash", "/usr/bin/ls", "/usr/bin/cat", "/usr/share/doc/base-files/copyright"]
        .into_iter()
        .filter(|p| Path::new(p).exists())
        .collect()
}

struct Registry {
    server: RegistryServer,
    http: reqwest::Client,
}

impl Registry {
    fn start() -> Registry {
        Registry { server: RegistryServer::start(RegistryAuth::None), http: reqwest::Client::new() }
    }

    fn host(&self) -> String {
        self.server.host()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.host())
    }

    async fn push_blob(&self, repo: &str, data: &[u8]) -> Digest {
        let digest = Digest::of(data);
        let r = self.http.post(self.url(&format!("/v2/{repo}/blobs/uploads/"))).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 202, "start upload: {}", r.text().await.unwrap_or_default());
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let loc = if loc.starts_with("http") { loc } else { self.url(&loc) };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = self
            .http
            .put(format!("{loc}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "finish upload: {}", r.text().await.unwrap_or_default());
        digest
    }

    /// Pushes a one-platform OCI image; returns the manifest digest.
    async fn push_image(&self, repo: &str, tag: &str, layers: &[(Vec<u8>, Digest)]) -> Digest {
        let config = json!({
            "architecture": "amd64", "os": "linux",
            "config": { "Cmd": ["/usr/bin/dash"] },
            "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|(_, d)| d.to_string()).collect::<Vec<_>>() },
        });
        let config = serde_json::to_vec(&config).unwrap();
        let config_digest = self.push_blob(repo, &config).await;
        let mut descs = Vec::new();
        for (blob, _) in layers {
            let d = self.push_blob(repo, blob).await;
            descs.push(json!({ "mediaType": media_types::OCI_LAYER_GZIP, "digest": d.to_string(), "size": blob.len() }));
        }
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": media_types::OCI_MANIFEST,
            "config": { "mediaType": media_types::OCI_CONFIG, "digest": config_digest.to_string(), "size": config.len() },
            "layers": descs,
        }))
        .unwrap();
        let r = self
            .http
            .put(self.url(&format!("/v2/{repo}/manifests/{tag}")))
            .header("content-type", media_types::OCI_MANIFEST)
            .body(manifest.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "push manifest: {}", r.text().await.unwrap_or_default());
        Digest::of(&manifest)
    }

    async fn manifest(&self, repo: &str, reference: &str) -> Option<Value> {
        let r = self
            .http
            .get(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("accept", media_types::MANIFEST_ACCEPT.join(", "))
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 404 {
            return None;
        }
        assert!(r.status().is_success(), "get manifest {repo}:{reference}: {}", r.status());
        Some(r.json().await.unwrap())
    }

    /// Digest of a manifest as the registry reports it.
    async fn manifest_digest(&self, repo: &str, reference: &str) -> Digest {
        let r = self
            .http
            .head(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("accept", media_types::MANIFEST_ACCEPT.join(", "))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "head manifest {repo}:{reference}: {}", r.status());
        r.headers()["docker-content-digest"].to_str().unwrap().parse().unwrap()
    }

    async fn blob(&self, repo: &str, digest: &str) -> Vec<u8> {
        let r = self.http.get(self.url(&format!("/v2/{repo}/blobs/{digest}"))).send().await.unwrap();
        assert!(r.status().is_success(), "get blob {digest}: {}", r.status());
        r.bytes().await.unwrap().to_vec()
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

fn harbor_default(host: &str, repo: &str, tag: &str, digest: &Digest) -> String {
    let (namespace, name) = repo.split_once('/').unwrap();
    json!({
        "type": "PUSH_ARTIFACT", "occur_at": 1737446601, "operator": "admin",
        "event_data": {
            "resources": [{ "digest": digest.to_string(), "tag": tag, "resource_url": format!("{host}/{repo}:{tag}") }],
            "repository": { "date_created": 1737446600, "name": name, "namespace": namespace, "repo_full_name": repo, "repo_type": "private" }
        }
    })
    .to_string()
}

fn harbor_cloudevent(host: &str, repo: &str, digest: &Digest) -> String {
    let (namespace, name) = repo.split_once('/').unwrap();
    json!({
        "specversion": "1.0", "requestid": "51c0b694-0168-4f3c-b0db-282565455d7b",
        "id": "66e18103-09c1-41f6-982f-37df223f3eeb", "source": "/projects/2/webhook/policies/15",
        "type": "harbor.artifact.pushed", "datacontenttype": "application/json", "time": "2023-04-03T06:04:46Z",
        "data": {
            "resources": [{ "digest": digest.to_string(), "tag": digest.to_string(), "resource_url": format!("{host}/{repo}@{digest}") }],
            "repository": { "date_created": 1680501893, "name": name, "namespace": namespace, "repo_full_name": repo, "repo_type": "private" }
        },
        "operator": "robot$ci"
    })
    .to_string()
}

/// The reference reader: `ACCEL_LAYERCHECK`, else built once from ../shared/tools/layercheck.
fn layercheck() -> PathBuf {
    if let Some(p) = std::env::var_os("ACCEL_LAYERCHECK") {
        return p.into();
    }
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("layercheck");
    if !out.exists() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/layercheck/build.sh");
        let st = Command::new("sh").arg(&script).arg(&out).status().unwrap();
        assert!(st.success(), "building layercheck with {} failed", script.display());
    }
    out
}

/// Checks every converted layer of `target` with the reference reader against the source layer.
async fn verify_estargz(reg: &Registry, repo: &str, target_tag: &str, source_layers: &[(Vec<u8>, Digest)]) {
    let manifest = reg.manifest(repo, target_tag).await.expect("converted image is in the registry");
    let tool = layercheck();
    let dir = tempfile::tempdir().unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), source_layers.len());
    for (i, (l, (src, _))) in layers.iter().zip(source_layers).enumerate() {
        let toc = l["annotations"][annotations::ESTARGZ_TOC_DIGEST].as_str().expect("TOC digest annotation");
        let blob = reg.blob(repo, l["digest"].as_str().unwrap()).await;
        let (src_path, dst_path) = (dir.path().join(format!("src{i}")), dir.path().join(format!("dst{i}")));
        std::fs::write(&src_path, src).unwrap();
        std::fs::write(&dst_path, blob).unwrap();
        let run = |args: &[&std::ffi::OsStr], out: &Path| {
            let o = Command::new(&tool).args(args).output().unwrap();
            assert!(o.status.success(), "layercheck {args:?}: {}", String::from_utf8_lossy(&o.stderr));
            std::fs::write(out, o.stdout).unwrap();
        };
        let (a, b, c) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"), dir.path().join("c.jsonl"));
        run(&["tar".as_ref(), src_path.as_os_str()], &a);
        run(&["tar".as_ref(), dst_path.as_os_str()], &b);
        run(&["estargz".as_ref(), dst_path.as_os_str(), toc.as_ref()], &c);
        for other in [&b, &c] {
            let o = Command::new(&tool).arg("diff").arg(&a).arg(other).output().unwrap();
            assert!(o.status.success(), "layer {i} differs from its source:\n{}", String::from_utf8_lossy(&o.stdout));
        }
    }
}

async fn setup(level: u32) -> (Registry, tempfile::TempDir, Acceld) {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    Acceld::write_config(dir.path(), &reg.host(), port, level);
    let d = Acceld::start(dir.path(), port).await;
    (reg, dir, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harbor_payloads_convert_and_the_result_verifies() {
    let (reg, _dir, d) = setup(9).await;
    let layers = vec![layer(&some_debian_files(), 0)];
    let digest = reg.push_image("library/tools", "v1", &layers).await;

    let (status, body) = d.post(&harbor_default(&reg.host(), "library/tools", "v1", &digest), "application/json", true, Some(AUTH)).await;
    assert_eq!(status, 200, "{body}\n{}", d.log());
    assert_eq!(body["tasks"][0]["status"], "COMPLETED");
    let converted = reg.manifest("library/tools", "v1-esgz").await.expect("v1-esgz pushed");
    assert_eq!(converted["annotations"][annotations::SOURCE_DIGEST], digest.to_string());
    verify_estargz(&reg, "library/tools", "v1-esgz", &layers).await;
    let log = d.log();
    for line in ["received webhook request from 127.0.0.1:", "POST /api/v1/conversions?sync=true 200", "pulling image", "converted image"] {
        assert!(log.contains(line), "log lacks {line:?}:\n{log}");
    }

    // CloudEvents, pushed by digest only (as a proxy-cache project does).
    let digest2 = reg.push_image("library/other", "v2", &layers).await;
    let (status, body) = d.post(&harbor_cloudevent(&reg.host(), "library/other", &digest2), "application/cloudevents+json", true, Some(AUTH)).await;
    assert_eq!(status, 200, "{body}\n{}", d.log());
    let target = format!("sha256-{}-esgz", digest2.hex());
    assert!(reg.manifest("library/other", &target).await.is_some(), "{target} pushed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_bad_bodies_are_refused() {
    let (reg, _dir, d) = setup(1).await;
    let digest = Digest::of(b"x");
    let body = harbor_default(&reg.host(), "library/a", "1", &digest);
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
    let layers = vec![layer(&some_debian_files(), 0)];
    let digest = reg.push_image("library/app", "1.0", &layers).await;
    let event = harbor_default(&reg.host(), "library/app", "1.0", &digest);
    for _ in 0..20 {
        let (status, body) = d.post(&event, "application/json", false, Some(AUTH)).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, _) = d.post(&event, "application/json", true, Some(AUTH)).await;
    assert_eq!(status, 200);
    // Harbor's event for the converted image, as the push of the result produces it.
    let converted_digest = reg.manifest_digest("library/app", "1.0-esgz").await;
    let (status, body) = d.post(&harbor_default(&reg.host(), "library/app", "1.0-esgz", &converted_digest), "application/json", true, Some(AUTH)).await;
    assert_eq!(status, 200);
    assert!(body["tasks"].as_array().unwrap().is_empty(), "{body}");
    let tasks = d.list().await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(d.log().matches("converting image").count(), 1, "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_conversion_then_restart_completes() {
    let (reg, dir, mut d) = setup(9).await;
    // Large enough to take a while at level 9: Debian binaries, several copies.
    let mut files = some_debian_files();
    files.push("/usr/bin/docker-registry");
    let layers = vec![layer(&files, 4)];
    let digest = reg.push_image("library/big", "1", &layers).await;
    let (status, body) = d.post(&harbor_default(&reg.host(), "library/big", "1", &digest), "application/json", false, Some(AUTH)).await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !d.log().contains("converting image") {
        assert!(Instant::now() < deadline, "conversion did not start:\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = d.list().await;
    assert_eq!(before[0]["status"], "PROCESSING", "killed mid-conversion");
    d.kill9();
    assert!(reg.manifest("library/big", "1-esgz").await.is_none());

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
    verify_estargz(&reg, "library/big", "1-esgz", &layers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_running_conversion_and_exits() {
    let (reg, _dir, mut d) = setup(6).await;
    let layers = vec![layer(&some_debian_files(), 0)];
    let digest = reg.push_image("library/term", "1", &layers).await;
    let (status, _) = d.post(&harbor_default(&reg.host(), "library/term", "1", &digest), "application/json", false, Some(AUTH)).await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !d.log().contains("pulling image") {
        assert!(Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = d.sigterm();
    assert!(status.success(), "exit {status}:\n{}", d.log());
    assert!(reg.manifest("library/term", "1-esgz").await.is_some(), "the running conversion finished:\n{}", d.log());
}
