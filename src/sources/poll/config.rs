//! Settings of a poll source (`kind: poll` under `sources`), with their defaults and checks.

use std::path::PathBuf;

use serde::Deserialize;

use crate::config::bus::Report;
use crate::config::Problem;
use crate::oci::Reference;

/// What happens to the tags a repository already has when the source first looks at it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Initial {
    /// Record them as seen; only tags pushed (or moved) afterwards are converted, as with a
    /// webhook.
    #[default]
    None,
    /// Convert them too (a backfill of the existing images).
    All,
}

/// A registry polled for new tags and moved digests, for registries that send no webhooks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollSourceConfig {
    /// Registry host (`host` or `host:port`, as in image references); credentials and
    /// transport come from `registries` as for conversions.
    pub registry: String,
    /// Repositories to watch: names (`library/debian`), or globs matched over the registry's
    /// catalog (`team/*`, `project/**`, `**` for all). Globs need catalog access.
    pub repositories: Vec<String>,
    /// Tag globs to watch. Empty: every tag. Tags ending in a target suffix of any pipeline
    /// are conversion outputs and never watched.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Time between two looks at the registry; each wait is moved by up to a tenth at random.
    #[serde(default = "default_interval_secs")]
    pub interval_secs: u64,
    /// On the first look at a repository that already existed when the source started:
    /// `none` (default) records its tags without converting them; `all` converts them.
    #[serde(default)]
    pub initial: Initial,
    /// Longest wait after repeated registry errors (waits double from `interval_secs`).
    #[serde(default = "default_backoff_max_secs")]
    pub backoff_max_secs: u64,
    /// Names asked for per page of the catalog and tag lists.
    #[serde(default = "default_page_size")]
    pub page_size: usize,
    /// Manifest requests in flight at once while checking tags.
    #[serde(default = "default_concurrent_requests")]
    pub concurrent_requests: usize,
    /// File keeping what was seen. Default: `poll-<source name>.redb` next to the task
    /// database.
    #[serde(default)]
    pub state_path: Option<PathBuf>,
}

fn default_interval_secs() -> u64 {
    60
}

fn default_backoff_max_secs() -> u64 {
    900
}

fn default_page_size() -> usize {
    100
}

fn default_concurrent_requests() -> usize {
    8
}

impl PollSourceConfig {
    /// Problems of this source's settings; `at` is its path in the config (`sources.NAME`).
    pub fn problems(&self, at: &str) -> Vec<Problem> {
        let mut out = Vec::new();
        self.check(at, &mut |path, message| out.push(Problem { path, message }));
        out
    }

    /// Reports each problem of this source's settings with its path under `at`.
    pub fn check(&self, at: &str, report: &mut Report) {
        let mut problem = |path: String, message: String| report(format!("{at}.{path}"), message);
        if format!("{}/x", self.registry).parse::<Reference>().map(|r| r.registry() != self.registry).unwrap_or(true) {
            problem("registry".into(), format!("{:?} is not a registry host (host or host:port)", self.registry));
        }
        if self.repositories.is_empty() {
            problem(
                "repositories".into(),
                "must name at least one repository or glob (`**` watches the whole registry)".into(),
            );
        }
        for (i, r) in self.repositories.iter().enumerate() {
            let path = format!("repositories[{i}]");
            if super::diff::is_glob(r) {
                if let Err(e) = globset::GlobBuilder::new(r).literal_separator(true).build() {
                    problem(path, format!("bad glob {r:?}: {e}"));
                }
            } else if format!("{}/{}", self.registry, r.trim_matches('/')).parse::<Reference>().is_err() || r.trim().is_empty() {
                problem(path, format!("{r:?} is not a repository name"));
            }
        }
        for (i, t) in self.tags.iter().enumerate() {
            if let Err(e) = globset::Glob::new(t) {
                problem(format!("tags[{i}]"), format!("bad glob {t:?}: {e}"));
            }
        }
        if self.interval_secs == 0 {
            problem("interval_secs".into(), "must be at least 1".into());
        }
        if self.page_size == 0 {
            problem("page_size".into(), "must be at least 1".into());
        }
        if self.concurrent_requests == 0 {
            problem("concurrent_requests".into(), "must be at least 1".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> PollSourceConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults() {
        let c = parse("{ registry: 'r.example:5000', repositories: [a/b] }");
        assert_eq!(c.initial, Initial::None);
        assert_eq!((c.interval_secs, c.backoff_max_secs, c.page_size, c.concurrent_requests), (60, 900, 100, 8));
        assert!(c.problems("sources.p").is_empty());
        assert_eq!(parse("{ registry: h.io, repositories: ['**'], initial: all }").initial, Initial::All);
    }

    #[test]
    fn loads_as_a_source_of_the_config() {
        use crate::config::{Config, SourceConfig};
        let c = Config::parse("sources: { p: { kind: poll, registry: 'h:5000', repositories: ['a/*'] } }", "t", &|_| None).unwrap();
        assert!(matches!(&c.sources["p"], SourceConfig::Poll(p) if p.repositories == ["a/*"]));
        let e = Config::parse("sources: { p: { kind: poll, registry: h.io, repositories: [a], every: 3 } }", "t", &|_| None).unwrap_err();
        assert!(e.to_string().contains("every"), "{e}");
        let e = Config::parse("sources: { p: { kind: poll, registry: h.io, repositories: [a], interval_secs: 0 } }", "t", &|_| None)
            .unwrap_err();
        assert_eq!(e.problems()[0].path, "sources.p.interval_secs", "{e}");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let c = parse("{ registry: 'Bad Host', repositories: ['a/[', 'UPPER'], tags: ['['], interval_secs: 0, page_size: 0 }");
        let paths: Vec<String> = c.problems("sources.p").into_iter().map(|p| p.path).collect();
        for p in ["registry", "repositories[0]", "repositories[1]", "tags[0]", "interval_secs", "page_size"] {
            assert!(paths.contains(&format!("sources.p.{p}")), "{p} missing from {paths:?}");
        }
        let empty = parse("{ registry: h.io, repositories: [] }");
        assert_eq!(empty.problems("s")[0].path, "s.repositories");
        assert!(serde_yaml::from_str::<PollSourceConfig>("{ registry: h.io, repositories: [a], initial: some }").is_err());
        assert!(serde_yaml::from_str::<PollSourceConfig>("{ registry: h.io, repositories: [a], intervall_secs: 3 }").is_err());
    }
}
