//! Naming of conversion targets: tag suffix, other repository, or an explicit reference.

use crate::config::ConversionConfig;
use crate::oci::{Reference, ReferenceError};

/// Where one conversion's result is pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetNaming {
    /// `repo:<tag><suffix>` in the source repository, or in `repository` of the same registry.
    Suffix { suffix: String, repository: Option<String> },
    /// Exactly this reference (its tag, or `latest` when it has none).
    Exact(Reference),
}

impl TargetNaming {
    pub fn from_config(c: &ConversionConfig) -> Self {
        TargetNaming::Suffix { suffix: c.tag_suffix().to_string(), repository: c.repository.clone() }
    }

    /// The target reference for `source`.
    ///
    /// The tag a suffix is appended to is the source's tag; a digest-only source
    /// (`repo@sha256:<hex>`) uses `sha256-<hex>`, the convention cosign and others use for
    /// digest-derived tags; a reference with neither uses `latest`.
    ///
    /// A target that is the source's own tag is an error: pushing there would replace the
    /// source image with its conversion.
    pub fn target_for(&self, source: &Reference) -> Result<Reference, ReferenceError> {
        let target = self.name(source)?;
        // A source with neither tag nor digest is its `latest` tag.
        let source_tag = source.tag().or(source.digest().is_none().then_some("latest"));
        let same = same_registry(target.registry(), source.registry()) && target.repository() == source.repository() && target.tag() == source_tag;
        if source_tag.is_some() && same {
            return Err(ReferenceError::Invalid {
                reference: target.to_string(),
                why: "is the source image's own tag: converting onto it would replace the source; name another tag or suffix".into(),
            });
        }
        Ok(target)
    }

    fn name(&self, source: &Reference) -> Result<Reference, ReferenceError> {
        match self {
            TargetNaming::Exact(r) => {
                let tag = r.tag().unwrap_or("latest");
                r.repository_only().with_tag(tag)
            }
            TargetNaming::Suffix { suffix, repository } => {
                let base = match (source.tag(), source.digest()) {
                    (Some(t), _) => t.to_string(),
                    (None, Some(d)) => format!("sha256-{}", d.hex()),
                    (None, None) => "latest".to_string(),
                };
                let repo = match repository {
                    Some(r) => format!("{}/{}", source.registry(), r).parse::<Reference>()?,
                    None => source.repository_only(),
                };
                repo.with_tag(&format!("{base}{suffix}"))
            }
        }
    }
}

/// Whether two registry hosts are the same server: host names compare without case, and the
/// loopback names (`localhost`, `127.0.0.1`, `[::1]`) are one host.
fn same_registry(a: &str, b: &str) -> bool {
    fn key(r: &str) -> (String, &str) {
        let (host, port) = match r.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => (h, p),
            _ => (r, ""),
        };
        let host = host.to_ascii_lowercase();
        let host = if matches!(host.as_str(), "localhost" | "127.0.0.1" | "[::1]") { "loopback".to_string() } else { host };
        (host, port)
    }
    key(a) == key(b)
}

/// Checks a tag suffix as given in the config or on the command line.
pub fn check_suffix(s: &str) -> Result<(), String> {
    if !s.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | '-')) {
        return Err(format!("{s:?} may hold only ASCII letters, digits, '_', '.', '-'"));
    }
    // A tag is at most 128 characters; leave room for the source tag in front.
    if s.len() > 64 {
        return Err(format!("{s:?} is longer than 64 characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn suffix(s: &str) -> TargetNaming {
        TargetNaming::Suffix { suffix: s.into(), repository: None }
    }

    #[test]
    fn suffix_naming() {
        let src: Reference = "h.io/lib/nginx:1.25".parse().unwrap();
        assert_eq!(suffix("-esgz").target_for(&src).unwrap().to_string(), "h.io/lib/nginx:1.25-esgz");
        let src: Reference = format!("h.io/lib/nginx@sha256:{HEX}").parse().unwrap();
        assert_eq!(suffix("-esgz").target_for(&src).unwrap().to_string(), format!("h.io/lib/nginx:sha256-{HEX}-esgz"));
        let src: Reference = format!("h.io/lib/nginx:v1@sha256:{HEX}").parse().unwrap();
        assert_eq!(suffix("-esgz").target_for(&src).unwrap().to_string(), "h.io/lib/nginx:v1-esgz");
        let src: Reference = "h.io/lib/nginx".parse().unwrap();
        assert_eq!(suffix("-esgz").target_for(&src).unwrap().to_string(), "h.io/lib/nginx:latest-esgz");
    }

    #[test]
    fn other_repository_and_exact() {
        let src: Reference = "h.io/lib/nginx:1".parse().unwrap();
        let n = TargetNaming::Suffix { suffix: "".into(), repository: Some("accelerated/nginx".into()) };
        assert_eq!(n.target_for(&src).unwrap().to_string(), "h.io/accelerated/nginx:1");
        let n = TargetNaming::Exact("other.io/x/y".parse().unwrap());
        assert_eq!(n.target_for(&src).unwrap().to_string(), "other.io/x/y:latest");
    }

    #[test]
    fn the_source_tag_itself_is_no_target() {
        let src: Reference = "h.io/lib/nginx:1.25".parse().unwrap();
        let err = suffix("").target_for(&src).unwrap_err().to_string();
        assert!(err.contains("source image's own tag"), "{err}");
        assert!(TargetNaming::Exact("h.io/lib/nginx:1.25".parse().unwrap()).target_for(&src).is_err());
        assert!(TargetNaming::Exact("h.io/lib/nginx:1.26".parse().unwrap()).target_for(&src).is_ok());
        assert!(TargetNaming::Exact("other.io/lib/nginx:1.25".parse().unwrap()).target_for(&src).is_ok());
        // Another repository with an empty suffix is fine, and so is a digest-only source.
        let other = TargetNaming::Suffix { suffix: String::new(), repository: Some("accelerated/nginx".into()) };
        assert_eq!(other.target_for(&src).unwrap().to_string(), "h.io/accelerated/nginx:1.25");
        let pinned: Reference = format!("h.io/lib/nginx@sha256:{HEX}").parse().unwrap();
        assert!(suffix("").target_for(&pinned).is_ok());
        // The same server by another name.
        let local: Reference = "127.0.0.1:5000/lib/nginx:1".parse().unwrap();
        for other in ["localhost:5000/lib/nginx:1", "LOCALHOST:5000/lib/nginx:1", "[::1]:5000/lib/nginx:1"] {
            assert!(TargetNaming::Exact(other.parse().unwrap()).target_for(&local).is_err(), "{other}");
        }
        assert!(TargetNaming::Exact("localhost:5001/lib/nginx:1".parse().unwrap()).target_for(&local).is_ok());
        // No tag and no digest is `latest`.
        let bare: Reference = "h.io/lib/nginx".parse().unwrap();
        assert!(TargetNaming::Exact("h.io/lib/nginx:latest".parse().unwrap()).target_for(&bare).is_err());
        assert!(TargetNaming::Exact("h.io/lib/nginx".parse().unwrap()).target_for(&bare).is_err());
        assert!(suffix("").target_for(&bare).is_err());
        assert_eq!(check_suffix("-esgz"), Ok(()));
        assert!(check_suffix("/../").is_err());
        assert!(check_suffix("-é").unwrap_err().contains("ASCII"));
        assert!(check_suffix(&"x".repeat(65)).is_err());
    }

    #[test]
    fn overlong_tag_is_an_error() {
        let src: Reference = format!("h.io/r@sha256:{HEX}").parse().unwrap();
        let long = "-".to_string() + &"x".repeat(60);
        assert!(suffix(&long).target_for(&src).is_err());
    }
}
