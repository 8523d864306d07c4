//! Credentials per registry host: from `registries` in the config, else from a docker
//! `config.json`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use super::RegistryError;
use crate::config::{Config, RegistryConfig, Secret};

/// A user name and password (or robot name and secret). `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
    /// Where they came from, for error messages (`registries."h" in the config`, a file path).
    pub origin: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password)
            .field("origin", &self.origin)
            .finish()
    }
}

impl Credentials {
    /// `Authorization` value for HTTP basic auth.
    pub fn basic_header(&self) -> Secret {
        let raw = format!("{}:{}", self.username, self.password.expose());
        Secret::new(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw)))
    }
}

/// Decodes base64 `user:secret`. Only the first `:` separates: robot secrets may contain more.
pub fn decode_auth(encoded: &str) -> Result<(String, Secret), String> {
    let trimmed: String = encoded.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let engines = [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let bytes = engines
        .iter()
        .find_map(|e| e.decode(&trimmed).ok())
        .ok_or_else(|| "`auth` is not valid base64 (expected base64 of user:secret)".to_string())?;
    let text = String::from_utf8(bytes).map_err(|_| "`auth` does not decode to UTF-8 text".to_string())?;
    let (user, secret) = text
        .split_once(':')
        .ok_or_else(|| "`auth` decodes to text without ':' (expected base64 of user:secret)".to_string())?;
    if user.is_empty() {
        return Err("`auth` has an empty user name".into());
    }
    Ok((user.to_string(), Secret::new(secret)))
}

/// Canonical name of a registry host as written in config keys, references and docker
/// `config.json` keys: scheme and path dropped, lower case, and Docker Hub's aliases folded
/// into `docker.io`.
pub fn normalize_host(key: &str) -> String {
    let mut s = key.trim();
    for scheme in ["https://", "http://"] {
        if s.len() >= scheme.len() && s[..scheme.len()].eq_ignore_ascii_case(scheme) {
            s = &s[scheme.len()..];
        }
    }
    let host = s.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".to_string(),
        _ => host,
    }
}

fn config_origin(host: &str) -> String {
    format!("registries.\"{host}\" in the config")
}

fn from_registry_config(host: &str, rc: &RegistryConfig) -> Result<Option<Credentials>, String> {
    let origin = config_origin(host);
    let bad = |why: &str| why.to_string();
    match (&rc.auth, &rc.username, &rc.password) {
        (None, None, None) => Ok(None),
        (Some(auth), None, None) => {
            let (username, password) = decode_auth(auth.expose())?;
            Ok(Some(Credentials { username, password, origin }))
        }
        (Some(_), _, _) => Err(bad("set either `auth` or `username` and `password`, not both")),
        (None, Some(user), Some(password)) if !user.is_empty() => {
            Ok(Some(Credentials { username: user.clone(), password: password.clone(), origin }))
        }
        (None, Some(_), Some(_)) => Err(bad("`username` is empty")),
        (None, Some(_), None) => Err(bad("`username` is set without `password`")),
        (None, None, Some(_)) => Err(bad("`password` is set without `username`")),
    }
}

/// One entry of `auths` in a docker `config.json`.
#[derive(Debug, Default, Deserialize)]
struct DockerAuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuthEntry>,
}

/// Credentials found in a docker `config.json`, by normalised host. Entries that cannot be
/// decoded are kept as their error, so that only a host that needs them fails.
#[derive(Debug, Default)]
pub struct DockerCredentials {
    by_host: BTreeMap<String, Result<Credentials, String>>,
    path: Option<PathBuf>,
}

impl DockerCredentials {
    pub fn parse(text: &str, path: &Path) -> Result<DockerCredentials, RegistryError> {
        let file: DockerConfigFile = serde_json::from_str(text)
            .map_err(|e| RegistryError::DockerConfig { path: path.to_path_buf(), why: format!("not valid JSON: {e}") })?;
        let origin = format!("docker config {}", path.display());
        let mut by_host = BTreeMap::new();
        for (key, entry) in file.auths {
            let decoded = match (&entry.auth, &entry.username, &entry.password) {
                (Some(a), _, _) if !a.trim().is_empty() => decode_auth(a).map(|(username, password)| Credentials {
                    username,
                    password,
                    origin: origin.clone(),
                }),
                (_, Some(u), Some(p)) if !u.is_empty() => {
                    Ok(Credentials { username: u.clone(), password: Secret::new(p.clone()), origin: origin.clone() })
                }
                // Entries managed by a credential helper or holding only an identity token carry
                // nothing usable here; skipping them keeps anonymous access working.
                _ => continue,
            };
            let host = normalize_host(&key);
            // An exact `host` key wins over `https://host/...` forms written by older docker.
            let exact = key.trim().eq_ignore_ascii_case(&host);
            if exact || !by_host.contains_key(&host) {
                by_host.insert(host, decoded);
            }
        }
        Ok(DockerCredentials { by_host, path: Some(path.to_path_buf()) })
    }

    /// Reads `path` when it exists. A missing file is only an error when it was asked for.
    pub fn load(path: &Path, required: bool) -> Result<DockerCredentials, RegistryError> {
        match std::fs::read_to_string(path) {
            Ok(text) => DockerCredentials::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(DockerCredentials::default()),
            Err(e) => Err(RegistryError::DockerConfig { path: path.to_path_buf(), why: e.to_string() }),
        }
    }

    pub fn lookup(&self, registry: &str) -> Result<Option<Credentials>, RegistryError> {
        match self.by_host.get(&normalize_host(registry)) {
            None => Ok(None),
            Some(Ok(c)) => Ok(Some(c.clone())),
            Some(Err(why)) => Err(RegistryError::Credentials {
                host: registry.to_string(),
                origin: self.path.as_ref().map(|p| format!("docker config {}", p.display())).unwrap_or_default(),
                why: why.clone(),
            }),
        }
    }
}

/// Which docker `config.json` to read, and whether it must exist: the configured path, else
/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn docker_config_path(
    configured: Option<&Path>,
    docker_config_env: Option<&str>,
    home: Option<&Path>,
) -> Option<(PathBuf, bool)> {
    if let Some(p) = configured {
        return Some((p.to_path_buf(), true));
    }
    if let Some(dir) = docker_config_env.filter(|d| !d.is_empty()) {
        return Some((Path::new(dir).join("config.json"), false));
    }
    home.map(|h| (h.join(".docker").join("config.json"), false))
}

/// Every credential source the client consults, resolved at construction.
#[derive(Debug, Default)]
pub struct CredentialStore {
    configured: BTreeMap<String, Result<Option<Credentials>, String>>,
    insecure: BTreeMap<String, bool>,
    docker: DockerCredentials,
}

impl CredentialStore {
    pub fn from_config(config: &Config) -> Result<CredentialStore, RegistryError> {
        let env = std::env::var("DOCKER_CONFIG").ok();
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let docker = match docker_config_path(config.docker_config.as_deref(), env.as_deref(), home.as_deref()) {
            Some((path, required)) => DockerCredentials::load(&path, required)?,
            None => DockerCredentials::default(),
        };
        let mut store = CredentialStore { docker, ..Default::default() };
        for (host, rc) in &config.registries {
            let key = normalize_host(host);
            // Misconfigured credentials fail every use of that host, with the reason, instead of
            // silently falling back to anonymous access.
            store.configured.insert(key.clone(), from_registry_config(host, rc));
            store.insecure.insert(key, rc.insecure);
        }
        Ok(store)
    }

    /// Credentials for a registry host (as written in references), if any are configured.
    pub fn lookup(&self, registry: &str) -> Result<Option<Credentials>, RegistryError> {
        match self.configured.get(&normalize_host(registry)) {
            Some(Err(why)) => Err(RegistryError::Credentials {
                host: registry.to_string(),
                origin: config_origin(registry),
                why: why.clone(),
            }),
            Some(Ok(Some(c))) => Ok(Some(c.clone())),
            Some(Ok(None)) | None => self.docker.lookup(registry),
        }
    }

    pub fn insecure(&self, registry: &str) -> bool {
        self.insecure.get(&normalize_host(registry)).copied().unwrap_or(false)
    }

    pub fn any_insecure(&self) -> bool {
        self.insecure.values().any(|v| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn auth_splits_at_first_colon() {
        let (user, secret) = decode_auth(&b64("robot$accel+conv:se:cr:et")).unwrap();
        assert_eq!(user, "robot$accel+conv");
        assert_eq!(secret.expose(), "se:cr:et");
        let (user, secret) = decode_auth(&b64("u:")).unwrap();
        assert_eq!((user.as_str(), secret.expose()), ("u", ""));
        // Pasted values often carry a trailing newline or lose their padding.
        let (user, _) = decode_auth(&format!("{}\n", b64("abc:def"))).unwrap();
        assert_eq!(user, "abc");
        assert!(decode_auth(b64("user:pw").trim_end_matches('=')).is_ok());
        assert!(decode_auth(&b64("no-colon")).unwrap_err().contains("':'"));
        assert!(decode_auth(&b64(":pw")).is_err());
        assert!(decode_auth("%%%").unwrap_err().contains("base64"));
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(normalize_host("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(normalize_host("registry-1.docker.io"), "docker.io");
        assert_eq!(normalize_host("docker.io"), "docker.io");
        assert_eq!(normalize_host("https://Harbor.Example.com/v2/"), "harbor.example.com");
        assert_eq!(normalize_host("http://127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(normalize_host("127.0.0.1:5000"), "127.0.0.1:5000");
    }

    #[test]
    fn docker_config_lookup() {
        let text = serde_json::json!({
            "auths": {
                "https://index.docker.io/v1/": {"auth": b64("hubuser:hubpw")},
                "https://harbor.example.com/v1/": {"auth": b64("old:old")},
                "harbor.example.com": {"auth": b64("robot$x:a:b")},
                "127.0.0.1:5000": {"username": "u", "password": "p:w"},
                "helper.example.com": {},
                "broken.example.com": {"auth": "!!!"}
            },
            "credsStore": "desktop"
        })
        .to_string();
        let d = DockerCredentials::parse(&text, Path::new("/tmp/config.json")).unwrap();
        let hub = d.lookup("docker.io").unwrap().unwrap();
        assert_eq!((hub.username.as_str(), hub.password.expose()), ("hubuser", "hubpw"));
        let harbor = d.lookup("harbor.example.com").unwrap().unwrap();
        assert_eq!((harbor.username.as_str(), harbor.password.expose()), ("robot$x", "a:b"));
        let local = d.lookup("127.0.0.1:5000").unwrap().unwrap();
        assert_eq!(local.password.expose(), "p:w");
        assert!(local.origin.contains("/tmp/config.json"));
        assert!(d.lookup("helper.example.com").unwrap().is_none());
        assert!(d.lookup("other.example.com").unwrap().is_none());
        assert!(d.lookup("broken.example.com").is_err());
        assert!(DockerCredentials::parse("{not json", Path::new("x")).is_err());
    }

    #[test]
    fn docker_config_location() {
        let explicit = docker_config_path(Some(Path::new("/etc/accel/docker.json")), Some("/d"), Some(Path::new("/home/u")));
        assert_eq!(explicit, Some((PathBuf::from("/etc/accel/docker.json"), true)));
        let env = docker_config_path(None, Some("/d"), Some(Path::new("/home/u")));
        assert_eq!(env, Some((PathBuf::from("/d/config.json"), false)));
        let home = docker_config_path(None, Some(""), Some(Path::new("/home/u")));
        assert_eq!(home, Some((PathBuf::from("/home/u/.docker/config.json"), false)));
        assert_eq!(docker_config_path(None, None, None), None);
        assert!(DockerCredentials::load(Path::new("/nonexistent/config.json"), false).is_ok());
        assert!(DockerCredentials::load(Path::new("/nonexistent/config.json"), true).is_err());
    }

    #[test]
    fn registry_config_credentials() {
        let rc = RegistryConfig { auth: Some(Secret::new(b64("robot$r:x:y"))), ..Default::default() };
        let c = from_registry_config("h", &rc).unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.expose()), ("robot$r", "x:y"));
        let rc = RegistryConfig { username: Some("u".into()), password: Some(Secret::new("p")), ..Default::default() };
        assert_eq!(from_registry_config("h", &rc).unwrap().unwrap().username, "u");
        let rc = RegistryConfig { username: Some("u".into()), ..Default::default() };
        assert!(from_registry_config("h", &rc).is_err());
        let rc = RegistryConfig { insecure: true, ..Default::default() };
        assert!(from_registry_config("h", &rc).unwrap().is_none());
    }

    #[test]
    fn config_entry_wins_over_docker_config_and_debug_is_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, serde_json::json!({"auths": {"a.example": {"auth": b64("docker:dpw")}, "b.example": {"auth": b64("docker:dpw")}}}).to_string()).unwrap();
        let mut config = Config { docker_config: Some(path), ..Default::default() };
        config.registries.insert(
            "a.example".into(),
            RegistryConfig { username: Some("cfg".into()), password: Some(Secret::new("hunter2")), ..Default::default() },
        );
        config.registries.insert("b.example".into(), RegistryConfig { insecure: true, ..Default::default() });
        let store = CredentialStore::from_config(&config).unwrap();
        let a = store.lookup("a.example").unwrap().unwrap();
        assert_eq!(a.username, "cfg");
        assert!(!format!("{a:?}").contains("hunter2"));
        assert_eq!(store.lookup("b.example").unwrap().unwrap().username, "docker");
        assert!(store.insecure("b.example") && !store.insecure("a.example"));
        assert!(store.lookup("c.example").unwrap().is_none());
    }
}
