//! Image references (`host[:port]/repo[:tag][@sha256:…]`), parsed the way docker does.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Digest;

const DOCKER_HUB: &str = "docker.io";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("image reference is empty")]
    Empty,
    #[error("image reference {}: {why}", shown(.reference))]
    Invalid { reference: String, why: String },
}

/// A reference quoted for an error message: long ones (a message may carry megabytes) are
/// cut to their beginning and size.
fn shown(reference: &str) -> String {
    const KEEP: usize = 128;
    if reference.len() <= 2 * KEEP {
        return format!("{reference:?}");
    }
    let mut end = KEEP;
    while !reference.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &reference[..end], reference.len())
}

/// A parsed image reference. The registry host is always explicit after parsing
/// (`nginx` becomes `docker.io/library/nginx`); a reference may carry a tag, a digest, both, or
/// neither (then it means the tag `latest`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Registry host as written (`127.0.0.1:5000`, `docker.io`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Host to talk to over the API: docker.io is served by `registry-1.docker.io`.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What to ask the registry for: the digest when known, else the tag, else `latest`.
    pub fn manifest_selector(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// Same repository, the given tag, no digest.
    pub fn with_tag(&self, tag: &str) -> Result<Reference, ReferenceError> {
        validate_tag(tag).map_err(|why| ReferenceError::Invalid {
            reference: format!("{}/{}:{}", self.registry, self.repository, tag),
            why,
        })?;
        Ok(Reference { tag: Some(tag.to_string()), digest: None, ..self.clone() })
    }

    /// Same repository and tag, pinned to a digest.
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference { digest: Some(digest), ..self.clone() }
    }

    /// Same registry and repository, no tag or digest.
    pub fn repository_only(&self) -> Reference {
        Reference { tag: None, digest: None, ..self.clone() }
    }

    /// `host/repository`, the name blobs are addressed under.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reference({self})")
    }
}

fn validate_tag(tag: &str) -> Result<(), String> {
    let ok_first = tag.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    let ok_rest = tag.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if tag.is_empty() || tag.len() > 128 || !ok_first || !ok_rest {
        return Err(format!(
            "tag {tag:?} must be 1 to 128 characters of letters, digits, '_', '.', '-', not starting with '.' or '-'"
        ));
    }
    Ok(())
}

fn validate_path_component(c: &str) -> Result<(), String> {
    // [a-z0-9]+ separated by '.', '_', '__' or one or more '-'.
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(format!(
            "repository component {c:?} must start and end with a lowercase letter or digit"
        ));
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let valid = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !valid {
            return Err(format!(
                "repository component {c:?} has separator {sep:?}; only lowercase letters, digits, '.', '_', '__' and '-' are allowed"
            ));
        }
    }
    Ok(())
}

fn looks_like_host(s: &str) -> bool {
    s.contains('.') || s.contains(':') || s == "localhost" || s.starts_with('[')
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let invalid = |why: String| ReferenceError::Invalid { reference: input.to_string(), why };
        if s.contains("://") {
            return Err(invalid("a reference has no URL scheme; write host/repository:tag".into()));
        }
        let (rest, digest) = match s.split_once('@') {
            // `user:password@host/...`: the `@` comes before the first `/`.
            Some((_, d)) if d.contains('/') => {
                return Err(invalid("has credentials or an `@` before the repository; a reference is host/repository[:tag][@sha256:…], and credentials go in the config or the Docker credentials file".into()));
            }
            Some((r, d)) => (r, Some(d.parse::<Digest>().map_err(|e| invalid(e.to_string()))?)),
            None => (s, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, remainder)) if looks_like_host(first) => (first.to_string(), remainder),
            _ => (DOCKER_HUB.to_string(), rest),
        };
        if registry.is_empty() {
            return Err(invalid("registry host is empty".into()));
        }
        let (repo, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_string())),
            _ => (path, None),
        };
        if repo.is_empty() {
            return Err(invalid("repository name is empty".into()));
        }
        let mut repository = repo.to_string();
        if registry == DOCKER_HUB && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        if repository.len() > 255 {
            return Err(invalid("repository name is longer than 255 characters".into()));
        }
        for component in repository.split('/') {
            validate_path_component(component).map_err(invalid)?;
        }
        if let Some(t) = &tag {
            validate_tag(t).map_err(invalid)?;
        }
        Ok(Reference { registry, repository, tag, digest })
    }
}

impl Serialize for Reference {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Reference {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_invalid_reference_is_shown_by_its_beginning_and_size() {
        let long = format!("h.io/{}:1", "a".repeat(5000));
        let e = long.parse::<Reference>().unwrap_err().to_string();
        assert!(e.contains("longer than 255 characters"), "{e}");
        assert!(e.contains("(5007 bytes)") && e.len() < 300, "{e}");
        let short = "h.io/UPPER:1".parse::<Reference>().unwrap_err().to_string();
        assert!(short.contains("\"h.io/UPPER:1\""), "{short}");
    }

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn parse(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_defaults() {
        let r = parse("nginx");
        assert_eq!(r.to_string(), "docker.io/library/nginx");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.manifest_selector(), "latest");
        assert_eq!(parse("bitnami/redis:7").repository(), "bitnami/redis");
    }

    #[test]
    fn hosts_ports_tags_digests() {
        let r = parse("127.0.0.1:5000/library/nginx:1.25");
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "library/nginx");
        assert_eq!(r.tag(), Some("1.25"));
        let r = parse(&format!("localhost/a/b/c@{D}"));
        assert_eq!(r.registry(), "localhost");
        assert_eq!(r.tag(), None);
        assert_eq!(r.manifest_selector(), D);
        let r = parse(&format!("harbor.example.com/p/r:v1@{D}"));
        assert_eq!(r.to_string(), format!("harbor.example.com/p/r:v1@{D}"));
        assert_eq!(r.manifest_selector(), D);
        // A port without a tag must not be read as a tag.
        let r = parse("registry:5000/repo");
        assert_eq!(r.registry(), "registry:5000");
        assert_eq!(r.tag(), None);
    }

    #[test]
    fn rejects_malformed() {
        for bad in ["", "Upper/Case", "host.com/repo:", "host.com/repo:-tag", "http://host/repo",
            "host.com/a//b", "host.com/repo@sha256:xyz", "host.com/re..po", "host.com/"] {
            assert!(bad.parse::<Reference>().is_err(), "{bad:?} should be rejected");
        }
        let e = "user:pw@127.0.0.1:1/a/b:t".parse::<Reference>().unwrap_err().to_string();
        assert!(e.contains("credentials") && !e.contains("algorithm"), "{e}");
    }

    #[test]
    fn with_tag_and_digest() {
        let r = parse("h.io/a/b:v1");
        assert_eq!(r.with_tag("v1-esgz").unwrap().to_string(), "h.io/a/b:v1-esgz");
        assert!(r.with_tag("bad tag").is_err());
        let d: Digest = D.parse().unwrap();
        assert_eq!(r.with_digest(d).to_string(), format!("h.io/a/b:v1@{D}"));
    }
}
