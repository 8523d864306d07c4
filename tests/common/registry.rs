//! Starts Debian's `docker-registry` (CNCF distribution) on a free loopback port, optionally
//! behind htpasswd basic auth or behind bearer tokens from a token server run in the test.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

/// How clients must authenticate to the registry.
#[derive(Debug, Clone)]
pub enum RegistryAuth {
    None,
    /// htpasswd basic auth with one user.
    Basic { user: String, password: String },
    /// Bearer tokens (`auth: token:`) from a [`TokenServer`] started with the registry. The user
    /// gets every action it asks for; anonymous clients get tokens granting nothing.
    Token { user: String, password: String },
}

pub struct RegistryServer {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// The token server, in `RegistryAuth::Token` mode.
    pub token: Option<TokenServer>,
}

/// Path of the registry binary; fails the test when it is missing (the test script installs it).
pub fn registry_binary() -> PathBuf {
    for p in ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("docker-registry is not installed; run scripts/test (it installs Debian's docker-registry)");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl RegistryServer {
    pub fn start(auth: RegistryAuth) -> RegistryServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut token = None;
        let auth_yaml = match &auth {
            RegistryAuth::None => String::new(),
            RegistryAuth::Token { user, password } => {
                let server = TokenServer::start(dir.path(), user, password);
                let yaml = format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {bundle}\n",
                    realm = server.realm(),
                    service = TOKEN_SERVICE,
                    issuer = TOKEN_ISSUER,
                    bundle = server.cert_path.display(),
                );
                token = Some(server);
                yaml
            }
            RegistryAuth::Basic { user, password } => {
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .expect("htpasswd (apache2-utils) is needed for basic-auth tests");
                assert!(out.status.success(), "htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, out.stdout).unwrap();
                format!("auth:\n  htpasswd:\n    realm: accel-test\n    path: {}\n", file.display())
            }
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth_yaml}",
            root = dir.path().join("data").display(),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = spawn_registry(dir.path());
        let mut server = RegistryServer { child, port, dir, token };
        server.wait_ready();
        server
    }

    /// Stops the registry process (as a crash or an outage would); the data stays.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "port {} still answers after the registry was stopped", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the registry again on the same port with the same data, after [`stop`].
    pub fn restart(&mut self) {
        self.child = spawn_registry(self.dir.path());
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("docker-registry exited with {status}; log:\n{}", self.log());
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("docker-registry did not listen on port {} within 20 s; log:\n{}", self.port, self.log());
    }

    /// `127.0.0.1:PORT`, the host part of image references in this registry.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Where the registry keeps a blob's bytes (filesystem storage driver layout), for tests that
    /// corrupt stored content.
    pub fn blob_data_path(&self, hex: &str) -> PathBuf {
        self.dir.path().join("data/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }

    /// The manifest digest tag `repo:tag` points at, as the registry stored it; `None` when
    /// the tag does not exist.
    pub fn tag_digest(&self, repo: &str, tag: &str) -> Option<String> {
        let link = self
            .dir
            .path()
            .join("data/docker/registry/v2/repositories")
            .join(repo)
            .join("_manifests/tags")
            .join(tag)
            .join("current/link");
        std::fs::read_to_string(link).ok().map(|s| s.trim().to_string())
    }
}

/// Runs `docker-registry serve` with the `config.yml` in `dir`, appending to its log there.
fn spawn_registry(dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("registry.log")).unwrap();
    Command::new(registry_binary())
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start docker-registry")
}

impl Drop for RegistryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `service` the registry is configured with and tokens are issued for (their `aud`).
pub const TOKEN_SERVICE: &str = "accel-test-registry";
/// `issuer` the registry trusts (the tokens' `iss`).
pub const TOKEN_ISSUER: &str = "accel-test-token-issuer";

/// One request the token server answered.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// The user that authenticated, `None` for anonymous requests.
    pub user: Option<String>,
    pub service: Option<String>,
    pub scopes: Vec<String>,
    /// Whether it issued a token (false: wrong credentials, answered 401).
    pub issued: bool,
}

struct TokenState {
    user: String,
    password: String,
    key_path: PathBuf,
    /// base64 (standard, padded) DER of the signing certificate, for the JWT's `x5c` header.
    cert_der_b64: String,
    expires_in: AtomicU64,
    requests: Mutex<Vec<TokenRequest>>,
    serial: AtomicU64,
    /// `(repository or "*", action)` pairs withheld from the user.
    denied: Mutex<Vec<(String, String)>>,
}

/// A minimal token server (the distribution token spec) on a loopback port. It signs RS256 JWTs
/// with the `openssl` CLI using a throwaway key whose self-signed certificate is the registry's
/// `rootcertbundle`; the certificate travels in the JWT header's `x5c`, which is how
/// distribution finds the key.
pub struct TokenServer {
    pub port: u16,
    pub cert_path: PathBuf,
    state: Arc<TokenState>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn openssl(args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the openssl CLI is needed for token-auth tests (Debian package openssl)");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

impl TokenServer {
    pub fn start(dir: &Path, user: &str, password: &str) -> TokenServer {
        let key_path = dir.join("token-key.pem");
        let cert_path = dir.join("token-cert.pem");
        openssl(
            &[
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=accel test token issuer",
                "-keyout", key_path.to_str().unwrap(), "-out", cert_path.to_str().unwrap(),
            ],
            None,
        );
        let der = openssl(&["x509", "-in", cert_path.to_str().unwrap(), "-outform", "DER"], None);
        let state = Arc::new(TokenState {
            user: user.to_string(),
            password: password.to_string(),
            key_path,
            cert_der_b64: base64::engine::general_purpose::STANDARD.encode(der),
            expires_in: AtomicU64::new(300),
            requests: Mutex::new(Vec::new()),
            serial: AtomicU64::new(0),
            denied: Mutex::new(Vec::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        let state = state.clone();
                        std::thread::spawn(move || serve_token(conn, &state));
                    }
                }
            })
        };
        TokenServer { port, cert_path, state, stop, thread: Some(thread) }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// `expires_in` announced with the next tokens (the JWTs themselves stay valid 5 minutes).
    pub fn set_expires_in(&self, secs: u64) {
        self.state.expires_in.store(secs, Ordering::SeqCst);
    }

    /// Stops granting `action` on `repository` (`"*"`: every repository) to the user, as a
    /// registry does for an account without that permission.
    pub fn deny(&self, repository: &str, action: &str) {
        self.state.denied.lock().unwrap().push((repository.to_string(), action.to_string()));
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_token(mut conn: TcpStream, state: &TokenState) {
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let mut lines = head.split("\r\n");
    let target = lines.next().unwrap_or("").split(' ').nth(1).unwrap_or("/").to_string();
    let authorization = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.trim().to_string());
    let url = url::Url::parse(&format!("http://token{target}")).unwrap();
    let service = url.query_pairs().find(|(k, _)| k == "service").map(|(_, v)| v.to_string());
    let scopes: Vec<String> = url.query_pairs().filter(|(k, _)| k == "scope").map(|(_, v)| v.to_string()).collect();

    let presented = authorization.and_then(|a| {
        let encoded = a.strip_prefix("Basic ")?;
        let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (u, p) = text.split_once(':')?;
        Some((u.to_string(), p.to_string()))
    });
    let (user, authorized) = match &presented {
        None => (None, false),
        Some((u, p)) if *u == state.user && *p == state.password => (Some(u.clone()), true),
        Some((u, _)) => {
            state.requests.lock().unwrap().push(TokenRequest { user: Some(u.clone()), service, scopes, issued: false });
            let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"invalid user name or password"}]}"#;
            let _ = write!(
                conn,
                "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            return;
        }
    };
    let access: Vec<serde_json::Value> = if authorized {
        let denied = state.denied.lock().unwrap().clone();
        scopes
            .iter()
            .filter_map(|s| {
                let (resource, actions) = s.rsplit_once(':')?;
                let (kind, name) = resource.split_once(':')?;
                let granted: Vec<&str> = actions
                    .split(',')
                    .filter(|a| !denied.iter().any(|(r, d)| (r == "*" || r == name) && d == a))
                    .collect();
                Some(serde_json::json!({"type": kind, "name": name, "actions": granted}))
            })
            .collect()
    } else {
        Vec::new()
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [state.cert_der_b64]});
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER,
        "sub": user.clone().unwrap_or_default(),
        "aud": service.clone().unwrap_or_default(),
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("accel-test-{}", state.serial.fetch_add(1, Ordering::SeqCst)),
        "access": access,
    });
    let signing_input = format!("{}.{}", b64url(header.to_string().as_bytes()), b64url(claims.to_string().as_bytes()));
    let signature = openssl(&["dgst", "-sha256", "-sign", state.key_path.to_str().unwrap()], Some(signing_input.as_bytes()));
    let jwt = format!("{signing_input}.{}", b64url(&signature));
    state.requests.lock().unwrap().push(TokenRequest { user, service, scopes, issued: true });
    let body = serde_json::json!({
        "token": jwt,
        "expires_in": state.expires_in.load(Ordering::SeqCst),
        "issued_at": chrono::Utc::now().to_rfc3339(),
    })
    .to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}
