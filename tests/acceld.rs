//! `acceld` over a real loopback socket, with a stand-in for the registry and the drivers:
//! the API with the `accelctl task` client, durability across a restart, resuming, shutdown,
//! and the binaries' command lines.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use accel::api::client::{ApiClient, ClientError};
use accel::config::{Config, Secret};
use accel::oci::{media_types, Digest, Reference};
use accel::pipeline::worker::Resolved;
use accel::pipeline::{ConvertError, ConvertResult, Plan, Runner, TargetResult, TaskStatus};

const AUTH: &str = "Bearer test-token";

/// Converts every image instantly, except while `hold` has no permits.
struct Stand {
    converts: AtomicU32,
    hold: tokio::sync::Semaphore,
}

impl Stand {
    fn open() -> Arc<Self> {
        Arc::new(Stand { converts: AtomicU32::new(0), hold: tokio::sync::Semaphore::new(1 << 20) })
    }
    fn closed() -> Arc<Self> {
        Arc::new(Stand { converts: AtomicU32::new(0), hold: tokio::sync::Semaphore::new(0) })
    }
}

#[async_trait]
impl Runner for Stand {
    async fn resolve(&self, source: &Reference) -> Result<Resolved, ConvertError> {
        let digest = source.digest().cloned().unwrap_or_else(|| Digest::of(source.to_string().as_bytes()));
        Ok(Resolved { digest, converted_from: None })
    }
    async fn convert(&self, plan: &Plan, source: &Reference) -> Result<ConvertResult, ConvertError> {
        self.converts.fetch_add(1, Ordering::SeqCst);
        self.hold.acquire().await.unwrap().forget();
        let targets = plan
            .conversions
            .iter()
            .map(|c| TargetResult {
                driver: c.driver.kind(),
                reference: c.naming.target_for(source).unwrap(),
                digest: Digest::of(source.to_string().as_bytes()),
                media_type: media_types::OCI_MANIFEST.into(),
                size: 321,
                platforms: vec![],
            })
            .collect();
        Ok(ConvertResult { source: source.clone(), source_digest: source.digest().unwrap().clone(), source_size: 123, targets })
    }
}

struct Daemon {
    addr: String,
    shutdown: CancellationToken,
    join: tokio::task::JoinHandle<Result<(), accel::api::RunError>>,
}

impl Daemon {
    async fn start(config: &str, runner: Arc<Stand>) -> Daemon {
        let config = Config::parse(config, "test", &|_| None).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let join = tokio::spawn(accel::api::serve(config, runner, listener, shutdown.clone()));
        Daemon { addr, shutdown, join }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.join).await.expect("acceld stops").unwrap().unwrap();
    }
}

fn config(db: &std::path::Path, grace_secs: u64) -> String {
    format!(
        r#"
server: {{ listen: "127.0.0.1:0", auth_header: "{AUTH}", shutdown_grace_secs: {grace_secs} }}
tasks: {{ path: "{}", retry_backoff_secs: 0 }}
sources: {{ harbor: {{ kind: harbor }} }}
pipelines:
  - name: accelerate
    sources: [harbor]
    concurrency: 1
    match: {{ repositories: ["library/*"] }}
    convert: [{{ driver: estargz }}]
"#,
        db.display()
    )
}

fn client(d: &Daemon) -> ApiClient {
    ApiClient::new(&d.addr, Some(Secret::new(AUTH))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_survive_a_restart_and_unfinished_ones_resume() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tasks.redb");
    let done_ref: Reference = "127.0.0.1:5000/library/done:1".parse().unwrap();
    let pending_ref: Reference = "127.0.0.1:5000/library/pending:1".parse().unwrap();

    // First run: one task converts; the next one is held mid-conversion when the daemon stops,
    // and its grace period is too short for it.
    let stand = Stand::closed();
    let d = Daemon::start(&config(&db, 0), stand.clone()).await;
    let c = client(&d);
    stand.hold.add_permits(1);
    let first = c.create(&done_ref, true).await.unwrap();
    assert_eq!(first.tasks[0].task.status, TaskStatus::Completed);
    let pending = c.create(&pending_ref, false).await.unwrap();
    assert_eq!(pending.tasks[0].task.status, TaskStatus::Processing);
    while stand.converts.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    d.stop().await;

    // Second run: the list is as it was, and the unfinished task completes.
    let stand = Stand::open();
    let d = Daemon::start(&config(&db, 5), stand.clone()).await;
    let c = client(&d);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        tasks = c.list().await.unwrap();
        if tasks.iter().all(|t| t.status == TaskStatus::Completed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    assert_eq!(tasks[0].id, first.tasks[0].task.id);
    assert_eq!(tasks[0].targets[0].reference, "127.0.0.1:5000/library/done:1-esgz");
    assert_eq!(tasks[1].id, pending.tasks[0].task.id);
    assert_eq!(tasks[1].status, TaskStatus::Completed, "{:?}", tasks[1]);
    assert_eq!(tasks[1].attempts.len(), 2, "the interrupted attempt and the one that finished: {:?}", tasks[1].attempts);
    assert_eq!(stand.converts.load(Ordering::SeqCst), 1, "only the unfinished task ran again");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_waiting_sync_requests_and_keeps_the_task() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tasks.redb");
    let stand = Stand::closed();
    let d = Daemon::start(&config(&db, 0), stand.clone()).await;
    let c = client(&d);
    let r: Reference = "127.0.0.1:5000/library/slow:1".parse().unwrap();
    let waiting = tokio::spawn(async move { c.create(&r, true).await });
    while stand.converts.load(Ordering::SeqCst) < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    d.stop().await;
    match waiting.await.unwrap() {
        Err(ClientError::Api { status, code, .. }) => {
            assert_eq!(status.as_u16(), 503);
            assert_eq!(code, "shutting_down");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    let store = accel::pipeline::TaskStore::open(&db).unwrap();
    let unfinished = store.unfinished().await.unwrap();
    assert_eq!(unfinished.len(), 1, "the task waits for the next start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reports_auth_and_reference_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&config(&dir.path().join("t.redb"), 5), Stand::open()).await;
    let r: Reference = "127.0.0.1:5000/library/a:1".parse().unwrap();
    for auth in [None, Some(Secret::new("Bearer nope"))] {
        let c = ApiClient::new(&d.addr, auth).unwrap();
        let err = c.create(&r, false).await.unwrap_err();
        assert!(matches!(&err, ClientError::Api { status, .. } if status.as_u16() == 401), "{err}");
        assert!(err.to_string().contains("--auth-header"), "{err}");
        assert!(matches!(c.list().await, Err(ClientError::Api { .. })));
    }
    d.stop().await;
    let gone = ApiClient::new(&d_addr_unused(), None).unwrap();
    assert!(matches!(gone.list().await, Err(ClientError::Connect { .. })));
}

fn d_addr_unused() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accelctl_task_create_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&config(&dir.path().join("t.redb"), 5), Stand::open()).await;
    let accelctl = env!("CARGO_BIN_EXE_accelctl");
    let addr = d.addr.clone();
    let out = tokio::task::spawn_blocking(move || {
        let create = Command::new(accelctl)
            .args(["task", "create", "--sync", "--addr", &addr, "127.0.0.1:5000/library/nginx:1.25"])
            .env("ACCEL_AUTH_HEADER", AUTH)
            .output()
            .unwrap();
        let list = Command::new(accelctl).args(["task", "list", "--output", "json", "--addr", &addr, "--auth-header", AUTH]).output().unwrap();
        // `text` is the name `accelctl convert` uses for the same thing.
        let table = Command::new(accelctl).args(["task", "list", "--output", "text", "--addr", &addr]).env("ACCEL_AUTH_HEADER", AUTH).output().unwrap();
        let bad_header = Command::new(accelctl).args(["task", "list", "--addr", &addr, "--auth-header", "x\r\nEvil: 1"]).output().unwrap();
        let denied = Command::new(accelctl).args(["task", "list", "--addr", &addr]).env_remove("ACCEL_AUTH_HEADER").output().unwrap();
        let unmatched = Command::new(accelctl)
            .args(["task", "create", "--addr", &addr, "127.0.0.1:5000/other/x:1"])
            .env("ACCEL_AUTH_HEADER", AUTH)
            .output()
            .unwrap();
        (create, list, table, denied, unmatched, bad_header)
    })
    .await
    .unwrap();
    let (create, list, table, denied, unmatched, bad_header) = out;
    let text = |o: &std::process::Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(create.status.success(), "{}", text(&create));
    assert!(String::from_utf8_lossy(&create.stdout).contains("COMPLETED"), "{}", text(&create));
    assert!(String::from_utf8_lossy(&create.stdout).contains("127.0.0.1:5000/library/nginx:1.25-esgz"), "{}", text(&create));
    assert!(list.status.success(), "{}", text(&list));
    let tasks: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(tasks.as_array().unwrap().len(), 1);
    assert_eq!(tasks[0]["status"], "COMPLETED");
    assert_eq!(tasks[0]["source"].as_str().unwrap(), "127.0.0.1:5000/library/nginx:1.25");
    assert!(table.status.success(), "{}", text(&table));
    let table_out = String::from_utf8_lossy(&table.stdout);
    assert!(table_out.starts_with("ID"), "{table_out}");
    assert!(table_out.lines().nth(1).unwrap().contains("COMPLETED"), "{table_out}");
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("401"), "{}", text(&denied));
    assert!(!bad_header.status.success());
    let bad = String::from_utf8_lossy(&bad_header.stderr);
    assert!(bad.contains("auth header cannot be sent") && !bad.contains("cannot reach"), "{bad}");
    assert!(!unmatched.status.success(), "creating nothing is an error");
    assert!(String::from_utf8_lossy(&unmatched.stdout).contains("no pipeline"), "{}", text(&unmatched));
    d.stop().await;
}

#[test]
fn acceld_reports_config_problems() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "tasks: { retention_sec: 5, queue_size: 0 }\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_acceld")).arg("--config").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("retention_sec"), "{err}");
    std::fs::write(&path, "tasks: { queue_size: 0 }\npipelines: [{ name: a, concurrency: 0, convert: [{ driver: estargz }] }]\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_acceld")).arg("--config").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("tasks.queue_size") && err.contains("pipelines[0].concurrency"), "{err}");
}
