//! Registry polling against Debian's `docker-registry` on loopback: the catalog and tag-list
//! calls of the registry client, the poller's diffing and state (with a recording stand-in for
//! the workers), and `acceld` running a poll source end to end, through a registry outage.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::Value;

use accel::config::{Config, RegistryConfig, Secret};
use accel::oci::{annotations, Reference};
use accel::pipeline::worker::{Accepted, SubmitError};
use accel::pipeline::Event;
use accel::registry::{RegistryClient, RegistryError};
use accel::pipeline::metrics::TaskMetrics;
use accel::sources::poll::{PollSourceConfig, Poller, RoundError, Submit};
use common::fixtures::{handmade_image, PushedImage};
use common::registry::{free_port, RegistryAuth, RegistryServer};

// ---------------------------------------------------------------------------------------------
// Helpers

fn config_in(dir: &Path, registries: Vec<(String, RegistryConfig)>) -> Config {
    let docker = dir.join("docker-config.json");
    std::fs::write(&docker, "{}").unwrap();
    Config { docker_config: Some(docker), registries: registries.into_iter().collect(), ..Default::default() }
}

/// A distinct small image: the hand-made layers with its own `Cmd`.
fn image(name: &str) -> common::fixtures::ImageBuilder {
    handmade_image().cmd(&["/bin/sh", "-c", name])
}

/// Stands in for the workers: keeps what it is given, or refuses like a full queue.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
    refuse: AtomicBool,
}

impl Recorder {
    /// References handed over since the last call, sorted.
    fn take(&self) -> Vec<String> {
        let mut v: Vec<String> = self.events.lock().unwrap().drain(..).map(|e| e.reference.to_string()).collect();
        v.sort();
        v
    }
}

#[async_trait]
impl Submit for Recorder {
    async fn submit(&self, events: &[Event]) -> Result<Accepted, SubmitError> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(SubmitError::QueueFull { pipeline: "p".into(), capacity: 1 });
        }
        assert!(events.iter().all(|e| e.origin == "poller"), "{events:?}");
        self.events.lock().unwrap().extend_from_slice(events);
        Ok(Accepted::default())
    }
}

fn poller(dir: &Path, host: &str, settings: &str, submit: Arc<Recorder>) -> Poller {
    let yaml = format!("{{ registry: '{host}', interval_secs: 1, {settings} }}");
    let config: PollSourceConfig = serde_yaml::from_str(&yaml).unwrap();
    assert!(config.problems("sources.poller").is_empty(), "{:?}", config.problems("sources.poller"));
    let registry = Arc::new(RegistryClient::new(&config_in(dir, vec![])).unwrap());
    Poller::new("poller", config, dir.join("poll.redb"), vec!["-esgz".into()], registry, submit, Arc::new(TaskMetrics::default()))
        .unwrap()
}

/// `HOST/REPO:TAG@DIGEST` of a pushed image, as the poller names it.
fn pinned(p: &PushedImage) -> String {
    format!("{}@{}", p.reference, p.digest)
}

async fn delete_manifest(host: &str, repo: &str, digest: &str) {
    let r = reqwest::Client::new().delete(format!("http://{host}/v2/{repo}/manifests/{digest}")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202, "delete {repo}@{digest}: {}", r.text().await.unwrap());
}

// ---------------------------------------------------------------------------------------------
// Registry client: catalog, tag lists, manifest digests

#[tokio::test]
async fn catalog_and_tags_are_listed_across_pages() {
    let reg = RegistryServer::start(RegistryAuth::None);
    let host = reg.host();
    let dir = tempfile::tempdir().unwrap();
    let client = RegistryClient::new(&config_in(dir.path(), vec![])).unwrap();
    let built = image("paged").build();
    let mut pushed = Vec::new();
    for tag in ["a", "b", "c", "d", "e"] {
        pushed.push(built.push(&host, &format!("paged/app:{tag}")));
    }
    for repo in ["paged/one", "paged/two", "other/three"] {
        built.push(&host, &format!("{repo}:1"));
    }

    for n in [1, 2, 3, 100] {
        let catalog = client.catalog(&host, n).await.unwrap();
        assert_eq!(catalog, ["other/three", "paged/app", "paged/one", "paged/two"], "page size {n}");
        let repo: Reference = format!("{host}/paged/app").parse().unwrap();
        let tags = client.list_tags(&repo, n).await.unwrap();
        assert_eq!(tags, ["a", "b", "c", "d", "e"], "page size {n}");
    }

    let tagged: Reference = pushed[2].reference.parse().unwrap();
    assert_eq!(client.manifest_digest(&tagged).await.unwrap().unwrap().to_string(), pushed[2].digest);
    let pinned: Reference = pinned(&pushed[2]).parse().unwrap();
    assert_eq!(client.manifest_digest(&pinned).await.unwrap().unwrap().to_string(), pushed[2].digest);
    let missing: Reference = format!("{host}/paged/app:nope").parse().unwrap();
    assert_eq!(client.manifest_digest(&missing).await.unwrap(), None);
    let no_repo: Reference = format!("{host}/paged/none").parse().unwrap();
    let e = client.list_tags(&no_repo, 10).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");

    // Every tag deleted: the repository is listed with no tags.
    delete_manifest(&host, "paged/one", &pushed[0].digest).await;
    let one: Reference = format!("{host}/paged/one").parse().unwrap();
    match client.list_tags(&one, 10).await {
        Ok(tags) => assert!(tags.is_empty(), "{tags:?}"),
        Err(e) => assert!(e.is_not_found(), "{e}"),
    }
}

#[tokio::test]
async fn catalog_with_token_auth_asks_for_the_catalog_scope() {
    let auth = RegistryAuth::Token { user: "poller".into(), password: "s3cret".into() };
    let reg = RegistryServer::start(auth.clone());
    let host = reg.host();
    image("auth").build().push_with_auth(&host, "secured/app:1", &auth);
    let dir = tempfile::tempdir().unwrap();
    let rc = RegistryConfig { username: Some("poller".into()), password: Some(Secret::new("s3cret")), ..Default::default() };
    let client = RegistryClient::new(&config_in(dir.path(), vec![(host.clone(), rc)])).unwrap();
    assert_eq!(client.catalog(&host, 10).await.unwrap(), ["secured/app"]);
    let repo: Reference = format!("{host}/secured/app").parse().unwrap();
    assert_eq!(client.list_tags(&repo, 10).await.unwrap(), ["1"]);
    let token = reg.token.as_ref().unwrap();
    assert!(token.requests().iter().any(|r| r.scopes.contains(&"registry:catalog:*".to_string())), "{:?}", token.requests());

    // Anonymous: refused, with a message that says what to configure.
    let anonymous = RegistryClient::new(&config_in(dir.path(), vec![])).unwrap();
    let e = anonymous.catalog(&host, 10).await.unwrap_err();
    assert!(matches!(e, RegistryError::Unauthorized(_)), "{e:?}");
    assert!(e.to_string().contains("list its repositories"), "{e}");
    assert!(!e.is_retryable());
}

// ---------------------------------------------------------------------------------------------
// The poller with a stand-in for the workers

#[tokio::test]
async fn later_pushes_moves_and_deletions_are_seen_once() {
    let reg = RegistryServer::start(RegistryAuth::None);
    let host = reg.host();
    let dir = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder::default());
    let v1 = image("v1").build().push(&host, "team/app:1");
    // Default `initial: none`: what is there at the first look is recorded, not handed over.
    let mut p = poller(dir.path(), &host, "repositories: ['team/*']", rec.clone());
    assert_eq!(p.poll_once().await.unwrap(), 1);
    assert!(rec.take().is_empty());

    let v2 = image("v2").build().push(&host, "team/app:2");
    p.poll_once().await.unwrap();
    assert_eq!(rec.take(), [pinned(&v2)]);
    p.poll_once().await.unwrap();
    assert!(rec.take().is_empty(), "a seen tag is not handed over again");

    // The same tag pushed with other content.
    let v2b = image("v2b").build().push(&host, "team/app:2");
    p.poll_once().await.unwrap();
    assert_eq!(rec.take(), [pinned(&v2b)]);

    // Conversion outputs: by suffix, and by the annotation on the manifest.
    image("v2b").build().push(&host, "team/app:2-esgz");
    image("out").annotation(annotations::SOURCE_DIGEST, &v2b.digest).build().push(&host, "team/app:lazy");
    // A repository created after the first look is new: its tags are handed over.
    let other = image("other").build().push(&host, "team/other:1");
    // Not matched by the glob.
    image("deep").build().push(&host, "team/a/b:1");
    assert_eq!(p.poll_once().await.unwrap(), 2);
    assert_eq!(rec.take(), [pinned(&other)]);

    // A deleted tag is forgotten without an event; pushed again, it is new.
    delete_manifest(&host, "team/app", &v1.digest).await;
    p.poll_once().await.unwrap();
    assert!(rec.take().is_empty());
    let again = image("v1").build().push(&host, "team/app:1");
    p.poll_once().await.unwrap();
    assert_eq!(rec.take(), [pinned(&again)]);

    // A restart (a new poller on the same state) hands nothing over again.
    drop(p);
    let mut p = poller(dir.path(), &host, "repositories: ['team/*']", rec.clone());
    p.poll_once().await.unwrap();
    assert!(rec.take().is_empty());
}

#[tokio::test]
async fn initial_all_converts_existing_tags_and_refused_events_come_back() {
    let reg = RegistryServer::start(RegistryAuth::None);
    let host = reg.host();
    let dir = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder::default());
    let a1 = image("a1").build().push(&host, "lib/a:1");
    let a2 = image("a2").build().push(&host, "lib/a:v2");
    let settings = "repositories: [lib/a, lib/later], tags: ['v*', '1'], initial: all";
    let mut p = poller(dir.path(), &host, settings, rec.clone());

    // Workers refusing (full queue): nothing is recorded as seen, so nothing is lost.
    rec.refuse.store(true, Ordering::SeqCst);
    p.poll_once().await.unwrap();
    assert!(rec.take().is_empty());
    rec.refuse.store(false, Ordering::SeqCst);
    p.poll_once().await.unwrap();
    assert_eq!(rec.take(), [pinned(&a1), pinned(&a2)]);

    // Tags outside the tag globs are not watched.
    image("skip").build().push(&host, "lib/a:latest");
    // A named repository that did not exist at the first look is new when it appears.
    let later = image("later").build().push(&host, "lib/later:1");
    p.poll_once().await.unwrap();
    assert_eq!(rec.take(), [pinned(&later)]);

    drop(p);
    let mut p = poller(dir.path(), &host, settings, rec.clone());
    p.poll_once().await.unwrap();
    assert!(rec.take().is_empty(), "a restart hands nothing over again");
}

#[tokio::test]
async fn an_unreachable_registry_fails_the_round_and_polling_recovers() {
    let mut reg = RegistryServer::start(RegistryAuth::None);
    let host = reg.host();
    let dir = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder::default());
    image("x").build().push(&host, "down/app:1");
    let mut p = poller(dir.path(), &host, "repositories: ['down/**']", rec.clone());
    p.poll_once().await.unwrap();
    reg.stop();
    // The first request may still go out on a pooled connection the registry dropped.
    let e = p.poll_once().await.unwrap_err();
    assert!(matches!(&e, RoundError::Registry(RegistryError::Connect { .. } | RegistryError::Transport { .. })), "{e:?}");
    let e = p.poll_once().await.unwrap_err();
    assert!(matches!(&e, RoundError::Registry(RegistryError::Connect { .. })), "{e:?}");
    assert!(e.to_string().contains("check that the registry is running"), "{e}");
    reg.restart();
    let new = image("y").build().push(&host, "down/app:2");
    p.poll_once().await.unwrap();
    assert_eq!(rec.take(), [pinned(&new)]);
}

// ---------------------------------------------------------------------------------------------
// acceld with a poll source

const AUTH: &str = "Basic YWNjZWw6dGVzdA==";

/// The `acceld` binary with its own config, task database, store and log.
struct Acceld {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    http: reqwest::Client,
}

impl Acceld {
    fn write_config(dir: &Path, host: &str, port: u16, poll: &str) {
        let config = format!(
            r#"
server: {{ listen: "127.0.0.1:{port}", auth_header: "{AUTH}", shutdown_grace_secs: 30 }}
store: {{ kind: embedded, path: "{store}" }}
registries: {{ "{host}": {{}} }}
tasks: {{ path: "{tasks}", retry_backoff_secs: 1 }}
sources:
  registry:
    kind: poll
    registry: "{host}"
    interval_secs: 1
    backoff_max_secs: 4
    {poll}
pipelines:
  - name: accelerate
    sources: [registry]
    convert: [{{ driver: estargz, options: {{ compression_level: 1 }} }}]
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
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let mut d = Acceld { child: Some(child), dir: dir.to_path_buf(), port, http: reqwest::Client::new() };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            d.assert_running();
            if let Ok(r) = d.get("/api/v1/health").await {
                if r.status().is_success() {
                    return d;
                }
            }
            assert!(Instant::now() < deadline, "acceld not healthy within 30 s:\n{}", d.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("acceld exited with {status}:\n{}", self.log());
        }
    }

    async fn get(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        self.http.get(format!("http://127.0.0.1:{}{path}", self.port)).header("authorization", AUTH).send().await
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("acceld.log")).unwrap_or_default()
    }

    async fn tasks(&self) -> Vec<Value> {
        self.get("/api/v1/conversions").await.unwrap().json().await.unwrap()
    }

    /// Waits until there are `n` tasks and none is still running; returns them.
    async fn finished_tasks(&mut self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let tasks = self.tasks().await;
            if tasks.len() == n && tasks.iter().all(|t| t["status"] != "PROCESSING") {
                return tasks;
            }
            self.assert_running();
            assert!(Instant::now() < deadline, "not {n} finished tasks within 60 s: {tasks:#?}\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metrics(&self) -> String {
        self.get("/metrics").await.unwrap().text().await.unwrap()
    }

    /// Waits until `f` holds for the log.
    async fn wait_log(&mut self, what: &str, within: Duration, f: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + within;
        while !f(&self.log()) {
            self.assert_running();
            assert!(Instant::now() < deadline, "{what} not within {within:?}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn sigterm(&mut self) {
        let mut c = self.child.take().unwrap();
        assert!(Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap().success());
        let status = c.wait().unwrap();
        assert!(status.success(), "acceld exited with {status}:\n{}", self.log());
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

/// Waits until `repo:tag` exists and was converted from `source`; returns its manifest.
async fn wait_converted(reg: &RegistryServer, d: &mut Acceld, repo: &str, tag: &str, source: &PushedImage) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(digest) = reg.tag_digest(repo, tag) {
            let hex = digest.trim_start_matches("sha256:");
            let manifest: Value = serde_json::from_slice(&std::fs::read(reg.blob_data_path(hex)).unwrap()).unwrap();
            if manifest["annotations"][annotations::SOURCE_DIGEST] == source.digest.as_str() {
                return manifest;
            }
        }
        d.assert_running();
        assert!(Instant::now() < deadline, "{repo}:{tag} not converted from {} within 120 s:\n{}", source.digest, d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of the sample `name{labels}` in a metrics text.
fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceld_converts_new_and_moved_tags_once_across_restarts() {
    let reg = RegistryServer::start(RegistryAuth::None);
    let host = reg.host();
    let existing = image("existing").build().push(&host, "team/app:1");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    Acceld::write_config(dir.path(), &host, port, "repositories: ['team/*']");
    let mut d = Acceld::start(dir.path(), port).await;
    d.wait_log("the first look", Duration::from_secs(30), |l| l.contains("1 existing tags recorded as seen")).await;

    let v2 = image("v2").build().push(&host, "team/app:2");
    wait_converted(&reg, &mut d, "team/app", "2-esgz", &v2).await;
    let moved = image("v2-again").build().push(&host, "team/app:2");
    wait_converted(&reg, &mut d, "team/app", "2-esgz", &moved).await;
    let fresh = image("fresh").build().push(&host, "team/fresh:1.0");
    wait_converted(&reg, &mut d, "team/fresh", "1.0-esgz", &fresh).await;

    // Three conversions; the existing tag and the pushed outputs were not converted.
    let tasks = d.finished_tasks(3).await;
    let mut sources: Vec<String> = tasks.iter().map(|t| t["source"].as_str().unwrap_or_default().to_string()).collect();
    sources.sort();
    let mut expected = vec![pinned(&v2), pinned(&moved), pinned(&fresh)];
    expected.sort();
    assert_eq!(sources, expected, "{tasks:#?}");
    assert!(tasks.iter().all(|t| t["status"] == "COMPLETED"), "{tasks:#?}");
    assert!(reg.tag_digest("team/app", "1-esgz").is_none(), "{} was there before; initial: none", existing.reference);
    let metrics = d.metrics().await;
    assert_eq!(metric(&metrics, "accel_poll_events_total{source=\"registry\",change=\"new\"}"), Some(2.0), "{metrics}");
    assert_eq!(metric(&metrics, "accel_poll_events_total{source=\"registry\",change=\"moved\"}"), Some(1.0), "{metrics}");

    // A restart converts nothing again.
    d.sigterm();
    let starts = count(&d.log(), &format!("polling {host} every"));
    let d = Acceld::start(dir.path(), port).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = d.metrics().await;
        if metric(&m, "accel_poll_rounds_total{source=\"registry\",outcome=\"ok\"}").is_some_and(|n| n >= 3.0) {
            break;
        }
        assert!(Instant::now() < deadline, "no three poll rounds after the restart:\n{m}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count(&d.log(), &format!("polling {host} every")), starts + 1);
    assert_eq!(d.tasks().await.len(), 3, "{:#?}", d.tasks().await);
    let log = d.log();
    let after_restart = &log[log.rfind("Version:").unwrap()..];
    assert!(!after_restart.contains("new tag") && !after_restart.contains("pushed again"), "{after_restart}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceld_rides_out_a_registry_outage() {
    let mut reg = RegistryServer::start(RegistryAuth::None);
    let host = reg.host();
    let before = image("before").build().push(&host, "lib/app:1");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    Acceld::write_config(dir.path(), &host, port, "repositories: [lib/app]\n    initial: all");
    let mut d = Acceld::start(dir.path(), port).await;
    wait_converted(&reg, &mut d, "lib/app", "1-esgz", &before).await;

    reg.stop();
    let failed = format!("polling {host} failed");
    d.wait_log("two failed polls", Duration::from_secs(30), |l| count(l, &failed) >= 2).await;
    let log = d.log();
    assert!(log.contains("check that the registry is running"), "the reason is logged:\n{log}");
    assert!(log.contains("trying again in"), "{log}");
    // Still serving while the registry is away.
    assert!(d.get("/api/v1/health").await.unwrap().status().is_success());
    let metrics = d.metrics().await;
    assert!(metric(&metrics, "accel_poll_errors_total{source=\"registry\",stage=\"registry\"}").is_some_and(|n| n >= 2.0), "{metrics}");
    assert!(metric(&metrics, "accel_poll_backoff_seconds{source=\"registry\"}").is_some_and(|s| s > 0.0), "{metrics}");

    reg.restart();
    let during = image("during").build().push(&host, "lib/app:2");
    wait_converted(&reg, &mut d, "lib/app", "2-esgz", &during).await;
    d.wait_log("recovery", Duration::from_secs(10), |l| l.contains("answers again")).await;
    let tasks = d.finished_tasks(2).await;
    assert!(tasks.iter().all(|t| t["status"] == "COMPLETED"), "{tasks:#?}");
}
