//! The real `acceld` binary run by tests: its own config, task database, store and log.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::registry::free_port;

/// The `acceld` binary with its own config, task database, store and log.
pub struct Acceld {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
}

impl Acceld {
    /// Starts acceld with `body` (sources, sinks, pipelines) under a server/store/tasks head.
    pub async fn start(dir: &Path, registry: &str, body: &str) -> Acceld {
        Self::start_with_env(dir, registry, body, &[]).await
    }

    /// Like [`start`](Self::start), with extra environment variables.
    pub async fn start_with_env(dir: &Path, registry: &str, body: &str, env: &[(&str, &str)]) -> Acceld {
        Self::start_with(dir, registry, body, env, "").await
    }

    /// Like [`start_with_env`](Self::start_with_env); `tasks` holds more settings of the
    /// `tasks` section (`queue_size: 1`).
    pub async fn start_with(dir: &Path, registry: &str, body: &str, env: &[(&str, &str)], tasks: &str) -> Acceld {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let more = if tasks.is_empty() { String::new() } else { format!(", {tasks}") };
        let config = format!(
            "server: {{ listen: \"127.0.0.1:{port}\", shutdown_grace_secs: 30 }}\nstore: {{ kind: embedded, path: \"{store}\" }}\nregistries: {{ \"{registry}\": {{}} }}\ntasks: {{ path: \"{tasks_path}\", retry_backoff_secs: 1{more} }}\n{body}",
            store = dir.join("store").display(),
            tasks_path = dir.join("tasks.redb").display(),
        );
        std::fs::write(dir.join("pipelines.yaml"), config).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("acceld.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_acceld"))
            .arg("--config")
            .arg(dir.join("pipelines.yaml"))
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let mut d = Acceld { child: Some(child), dir: dir.to_path_buf(), port };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("acceld exited with {status}:\n{}", d.log());
            }
            if let Ok(r) = http.get(d.url("/api/v1/health")).send().await {
                if r.status().is_success() {
                    return d;
                }
            }
            assert!(Instant::now() < deadline, "acceld not healthy within 30 s:\n{}", d.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("acceld.log")).unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics")).await.unwrap().text().await.unwrap()
    }

    /// Stops acceld with SIGTERM (a clean shutdown) and waits for it to exit.
    pub fn stop(&mut self) {
        let mut c = self.child.take().unwrap();
        let sent = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status().unwrap();
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                assert!(status.success(), "acceld exited with {status} after SIGTERM:\n{}", self.log());
                return;
            }
            assert!(Instant::now() < deadline, "acceld did not stop within 90 s of SIGTERM:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
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

/// Runs acceld's start-up with a config and returns its exit and log, for start-up failures.
pub fn start_fails(dir: &Path, registry: &str, body: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let config = format!(
        "server: {{ listen: \"127.0.0.1:{}\" }}\nstore: {{ kind: embedded, path: \"{}\" }}\nregistries: {{ \"{registry}\": {{}} }}\ntasks: {{ path: \"{}\" }}\n{body}",
        free_port(),
        dir.join("store").display(),
        dir.join("tasks.redb").display(),
    );
    std::fs::write(dir.join("pipelines.yaml"), config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_acceld")).arg("--config").arg(dir.join("pipelines.yaml")).output().unwrap();
    assert!(!out.status.success(), "acceld started:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).into_owned()
}
