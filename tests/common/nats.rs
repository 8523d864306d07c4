//! Starts Debian's `nats-server` on a free loopback port, with JetStream (`-js`) storing in a
//! temporary directory.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::registry::free_port;

pub struct NatsServer {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

/// Path of the server binary; fails the test when it is missing (the test script installs it).
pub fn nats_binary() -> PathBuf {
    for p in ["/usr/bin/nats-server", "/usr/sbin/nats-server"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("nats-server is not installed; run scripts/test (it installs Debian's nats-server)");
}

impl NatsServer {
    /// A server with JetStream enabled.
    pub fn start() -> NatsServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("nats.log")).unwrap();
        let child = Command::new(nats_binary())
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path().join("store"))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start nats-server");
        let mut s = NatsServer { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("nats-server exited with {status}:\n{}", s.log());
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() && s.log().contains("Server is ready") {
                return s;
            }
            assert!(Instant::now() < deadline, "nats-server not ready within 20 s:\n{}", s.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
