//! Which pipelines an image reference matches (repository and tag globs).

use globset::{Glob, GlobMatcher};

use crate::config::PipelineConfig;
use crate::oci::Reference;

/// Compiled match rules of one pipeline.
pub struct Matcher {
    repositories: Vec<GlobMatcher>,
    tags: Vec<GlobMatcher>,
}

impl Matcher {
    /// Globs were checked when the config was loaded; one that fails here matches nothing.
    pub fn new(p: &PipelineConfig) -> Self {
        let compile = |globs: &[String], literal_separator: bool| {
            globs
                .iter()
                .filter_map(|g| {
                    globset::GlobBuilder::new(g).literal_separator(literal_separator).build().ok().map(|g: Glob| g.compile_matcher())
                })
                .collect()
        };
        Matcher { repositories: compile(&p.matches.repositories, true), tags: compile(&p.matches.tags, false) }
    }

    /// Repository globs treat `/` as a separator (`library/*` does not match `library/a/b`; `**`
    /// does). A reference without a tag is matched as tag `latest` when it has no digest, and
    /// passes the tag rules when it is digest-only.
    pub fn matches(&self, r: &Reference) -> bool {
        let repo_ok = self.repositories.iter().any(|g| g.is_match(r.repository()));
        let tag_ok = match (r.tag(), r.digest()) {
            (Some(t), _) => self.tags.iter().any(|g| g.is_match(t)),
            (None, Some(_)) => true,
            (None, None) => self.tags.iter().any(|g| g.is_match("latest")),
        };
        repo_ok && tag_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn matcher(yaml: &str) -> Matcher {
        let c = Config::parse(yaml, "t", &|_| None).unwrap();
        Matcher::new(&c.pipelines[0])
    }

    #[test]
    fn globs() {
        let m = matcher("pipelines: [{ name: a, match: { repositories: ['library/*'], tags: ['v*', 'latest'] }, convert: [{ driver: estargz }] }]");
        assert!(m.matches(&"h.io/library/nginx:v1".parse().unwrap()));
        assert!(!m.matches(&"h.io/library/nginx:1.0".parse().unwrap()));
        assert!(!m.matches(&"h.io/library/a/b:v1".parse().unwrap()));
        assert!(!m.matches(&"h.io/other/nginx:v1".parse().unwrap()));
        assert!(m.matches(&"h.io/library/nginx".parse().unwrap()));
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert!(m.matches(&format!("h.io/library/nginx@{d}").parse().unwrap()));
    }

    #[test]
    fn default_matches_everything() {
        let m = matcher("pipelines: [{ name: a, convert: [{ driver: estargz }] }]");
        assert!(m.matches(&"h.io/a/b/c:anything".parse().unwrap()));
        assert!(m.matches(&"h.io/x".parse().unwrap()));
    }
}
