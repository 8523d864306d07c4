//! Starts Debian's `containerd` with a private config, root, state and gRPC socket under a
//! temporary directory (no CRI plugin), and reads its state back with `ctr`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct ContainerdServer {
    child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

/// One blob of `ctr content ls`.
#[derive(Debug, Clone)]
pub struct ContentEntry {
    pub digest: String,
    pub labels: BTreeMap<String, String>,
}

/// One lease of `ctr leases ls`.
#[derive(Debug, Clone)]
pub struct LeaseEntry {
    pub id: String,
    pub labels: BTreeMap<String, String>,
}

/// One image of `ctr images ls`.
#[derive(Debug, Clone)]
pub struct ImageEntry {
    pub name: String,
    pub media_type: String,
    pub digest: String,
}

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed; run scripts/test (it installs Debian's containerd package)");
}

fn labels(field: &str) -> BTreeMap<String, String> {
    if field == "-" {
        return BTreeMap::new();
    }
    field.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

static GC_RUNS: AtomicU64 = AtomicU64::new(0);

impl ContainerdServer {
    pub fn start() -> ContainerdServer {
        let dir = tempfile::Builder::new().prefix("ctrd").tempdir().unwrap();
        let d = dir.path();
        let socket = d.join("c.sock");
        // Plugins that need kernel features or other hosts' setups are off; content, leases,
        // images, namespaces and the garbage collector are all that is used.
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = "{debug}"
  level = "warn"
[metrics]
  address = ""
# Collect garbage only when a test asks for it (`ctr leases delete --sync`). By default the
# scheduler also collects in the background, soon after a collection, whenever content changed,
# and would remove unreferenced content a test still looks at.
[plugins."io.containerd.gc.v1.scheduler"]
  deletion_threshold = 0
  mutation_threshold = 1000000
  pause_threshold = 0.001
  schedule_delay = "0s"
  startup_delay = "1h"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            socket = socket.display(),
            debug = d.join("debug.sock").display(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let child = Command::new(tool("containerd"))
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start containerd");
        let mut server = ContainerdServer { child, dir, socket };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("containerd exited with {status}; log:\n{}", self.log());
            }
            // The socket file appears before the server answers; `ctr version` needs both.
            if self.socket.exists() {
                let out = Command::new(tool("ctr")).arg("--address").arg(&self.socket).arg("--timeout").arg("2s").arg("version").output().unwrap();
                if out.status.success() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("containerd did not answer on {} within 30 s; log:\n{}", self.socket.display(), self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr --address SOCKET -n NS ARGS...`; panics with its output when it fails.
    pub fn ctr(&self, ns: &str, args: &[&str]) -> String {
        let out = Command::new(tool("ctr")).arg("--address").arg(&self.socket).args(["-n", ns]).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ctr -n {ns} {args:?} failed ({}): {}\ncontainerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `ctr content ls`: every committed blob of the namespace.
    pub fn content(&self, ns: &str) -> Vec<ContentEntry> {
        // Columns: DIGEST SIZE AGE LABELS, where AGE may be several words ("2 seconds").
        self.ctr(ns, &["content", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| {
                let cols: Vec<&str> = l.split('\t').map(str::trim).filter(|c| !c.is_empty()).collect();
                (cols.len() >= 4).then(|| ContentEntry { digest: cols[0].to_string(), labels: labels(cols[cols.len() - 1]) })
            })
            .collect()
    }

    pub fn content_digests(&self, ns: &str) -> Vec<String> {
        self.content(ns).into_iter().map(|c| c.digest).collect()
    }

    /// `ctr leases ls`.
    pub fn leases(&self, ns: &str) -> Vec<LeaseEntry> {
        self.ctr(ns, &["leases", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols.len() >= 3).then(|| LeaseEntry { id: cols[0].to_string(), labels: labels(cols[cols.len() - 1]) })
            })
            .collect()
    }

    /// `ctr images ls`.
    pub fn images(&self, ns: &str) -> Vec<ImageEntry> {
        self.ctr(ns, &["images", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols.len() >= 3).then(|| ImageEntry { name: cols[0].into(), media_type: cols[1].into(), digest: cols[2].into() })
            })
            .collect()
    }

    /// Runs containerd's garbage collector now: deleting a lease with `--sync` collects
    /// everything no root (image, lease, …) refers to before it returns.
    pub fn collect_garbage(&self, ns: &str) {
        let id = format!("accel-test-gc-{}", GC_RUNS.fetch_add(1, Ordering::Relaxed));
        self.ctr(ns, &["leases", "create", "--id", &id]);
        self.ctr(ns, &["leases", "delete", "--sync", &id]);
    }
}

impl Drop for ContainerdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
