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
    /// Times started; the log (appended to) says "Server is ready" once per start.
    starts: usize,
}

fn spawn(port: u16, dir: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("nats.log")).unwrap();
    Command::new(nats_binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.join("store"))
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start nats-server")
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
        let child = spawn(port, dir.path());
        let mut s = NatsServer { child, port, dir, starts: 1 };
        s.wait_ready();
        s
    }

    /// Stops the server (SIGKILL); [`restart`](Self::restart) brings it back.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port with the same JetStream store.
    pub fn restart(&mut self) {
        self.child = spawn(self.port, self.dir.path());
        self.starts += 1;
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("nats-server exited with {status}:\n{}", self.log());
            }
            let ready = self.log().matches("Server is ready").count() >= self.starts;
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() && ready {
                return;
            }
            assert!(Instant::now() < deadline, "nats-server not ready within 20 s:\n{}", self.log());
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
