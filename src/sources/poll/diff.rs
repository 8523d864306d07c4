//! The pure part of polling: which repositories and tags are watched, what changed since the
//! last look, and how long to wait after failures.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use globset::{Glob, GlobBuilder, GlobMatcher};

use crate::oci::Digest;

/// Whether a repository pattern needs the catalog: it holds glob syntax.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '[', '{'])
}

/// Which repositories a source watches: names taken as they are, globs matched over the
/// registry's catalog (`/` separates levels: `team/*` does not match `team/a/b`, `team/**`
/// does).
#[derive(Debug, Clone)]
pub struct RepoSelector {
    names: BTreeSet<String>,
    globs: Vec<GlobMatcher>,
}

impl RepoSelector {
    /// Patterns were checked when the config was loaded; a bad one here is an error all the same.
    pub fn new(patterns: &[String]) -> Result<RepoSelector, globset::Error> {
        let mut names = BTreeSet::new();
        let mut globs = Vec::new();
        for p in patterns {
            if is_glob(p) {
                globs.push(GlobBuilder::new(p).literal_separator(true).build()?.compile_matcher());
            } else {
                names.insert(p.trim_matches('/').to_string());
            }
        }
        Ok(RepoSelector { names, globs })
    }

    /// Whether the catalog must be listed.
    pub fn needs_catalog(&self) -> bool {
        !self.globs.is_empty()
    }

    /// Repositories named outright.
    pub fn names(&self) -> &BTreeSet<String> {
        &self.names
    }

    /// The names plus the catalog entries the globs match.
    pub fn select<'a>(&self, catalog: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
        let mut out = self.names.clone();
        out.extend(catalog.into_iter().filter(|r| self.globs.iter().any(|g| g.is_match(r.as_str()))).cloned());
        out
    }
}

/// Which tags of a watched repository count: those matching the tag globs (every tag when there
/// are none), minus conversion outputs (tags ending in a configured target suffix).
#[derive(Debug, Clone)]
pub struct TagFilter {
    globs: Vec<GlobMatcher>,
    suffixes: Vec<String>,
}

impl TagFilter {
    pub fn new(globs: &[String], suffixes: Vec<String>) -> Result<TagFilter, globset::Error> {
        let globs = globs.iter().map(|g| Glob::new(g).map(|g| g.compile_matcher())).collect::<Result<_, _>>()?;
        Ok(TagFilter { globs, suffixes: suffixes.into_iter().filter(|s| !s.is_empty()).collect() })
    }

    pub fn wants(&self, tag: &str) -> bool {
        (self.globs.is_empty() || self.globs.iter().any(|g| g.is_match(tag))) && !self.is_output(tag)
    }

    /// Whether the tag names a conversion output.
    pub fn is_output(&self, tag: &str) -> bool {
        self.suffixes.iter().any(|s| tag.ends_with(s.as_str()))
    }
}

/// Why a tag is handed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Not seen before.
    New,
    /// Seen at another digest: the tag was pushed again.
    Moved { from: Digest },
}

/// What differs between the recorded tags of a repository and its tags now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// New tags and tags at a new digest, in tag order.
    pub changed: Vec<(String, Digest, Change)>,
    /// Recorded tags that are gone (deleted, or no longer watched).
    pub gone: Vec<String>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.gone.is_empty()
    }
}

/// Compares what was seen with what is there now.
pub fn diff(seen: &BTreeMap<String, Digest>, now: &BTreeMap<String, Digest>) -> Diff {
    let mut out = Diff::default();
    for (tag, digest) in now {
        match seen.get(tag) {
            None => out.changed.push((tag.clone(), digest.clone(), Change::New)),
            Some(old) if old != digest => out.changed.push((tag.clone(), digest.clone(), Change::Moved { from: old.clone() })),
            Some(_) => {}
        }
    }
    out.gone = seen.keys().filter(|t| !now.contains_key(*t)).cloned().collect();
    out
}

/// Consecutive failures of one thing (the registry, its catalog, a repository) and when to try
/// it again: waits double from `base` up to `max`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// Records a failure; returns how long to wait before the next try.
    pub fn failed(&mut self, base: Duration, max: Duration) -> Duration {
        self.failures = self.failures.saturating_add(1);
        Self::delay(self.failures, base, max)
    }

    /// Records a success; returns how many failures came before it.
    pub fn succeeded(&mut self) -> u32 {
        std::mem::take(&mut self.failures)
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The wait after failure number `n` (1-based).
    pub fn delay(n: u32, base: Duration, max: Duration) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        base.saturating_mul(factor).min(max).max(base.min(max))
    }
}

/// `interval` moved by up to a tenth either way, from `unit` in `[0, 1)`: sources started
/// together (or many instances) drift apart instead of polling in step.
pub fn jittered(interval: Duration, unit: f64) -> Duration {
    let unit = if unit.is_finite() { unit.clamp(0.0, 1.0) } else { 0.5 };
    interval.mul_f64(0.9 + 0.2 * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn map(entries: &[(&str, u8)]) -> BTreeMap<String, Digest> {
        entries.iter().map(|(t, n)| (t.to_string(), d(*n))).collect()
    }

    #[test]
    fn diff_finds_new_moved_and_gone_tags() {
        let seen = map(&[("1", 1), ("2", 2), ("old", 3)]);
        let now = map(&[("1", 1), ("2", 9), ("3", 4)]);
        let got = diff(&seen, &now);
        assert_eq!(
            got.changed,
            vec![("2".to_string(), d(9), Change::Moved { from: d(2) }), ("3".to_string(), d(4), Change::New)]
        );
        assert_eq!(got.gone, vec!["old".to_string()]);
        assert!(diff(&now, &now).is_empty());
        let first = diff(&BTreeMap::new(), &now);
        assert_eq!(first.changed.len(), 3);
        assert!(first.changed.iter().all(|c| c.2 == Change::New));
        assert_eq!(diff(&now, &BTreeMap::new()).gone.len(), 3);
    }

    #[test]
    fn repository_selection() {
        let s = RepoSelector::new(&["team/*".into(), "library/debian".into(), "deep/**".into()]).unwrap();
        assert!(s.needs_catalog());
        let catalog: Vec<String> =
            ["team/a", "team/a/b", "deep/x/y", "other/z", "library/alpine"].iter().map(|s| s.to_string()).collect();
        let got: Vec<String> = s.select(&catalog).into_iter().collect();
        assert_eq!(got, ["deep/x/y", "library/debian", "team/a"]);
        let plain = RepoSelector::new(&["a/b".into()]).unwrap();
        assert!(!plain.needs_catalog());
        assert_eq!(plain.select(&[]).into_iter().collect::<Vec<_>>(), ["a/b"]);
        assert!(RepoSelector::new(&["a/[".into()]).is_err());
    }

    #[test]
    fn tag_filter_skips_outputs() {
        let f = TagFilter::new(&[], vec!["-esgz".into(), "".into()]).unwrap();
        assert!(f.wants("1.0") && f.wants("esgz"));
        assert!(!f.wants("1.0-esgz"));
        let f = TagFilter::new(&["v*".into(), "latest".into()], vec!["-zstd".into()]).unwrap();
        assert!(f.wants("v1") && f.wants("latest"));
        assert!(!f.wants("1") && !f.wants("v1-zstd"));
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let (base, max) = (Duration::from_secs(2), Duration::from_secs(10));
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..5).map(|_| b.failed(base, max).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 10, 10]);
        assert_eq!(b.succeeded(), 5);
        assert_eq!(b.failed(base, max), base);
        assert_eq!(Backoff::delay(200, base, max), max);
        // A cap below the base wins.
        assert_eq!(Backoff::delay(1, Duration::from_secs(60), Duration::from_secs(5)), Duration::from_secs(5));
    }

    #[test]
    fn jitter_stays_within_a_tenth() {
        let i = Duration::from_secs(100);
        assert_eq!(jittered(i, 0.0), Duration::from_secs(90));
        assert_eq!(jittered(i, 1.0), Duration::from_secs(110));
        assert_eq!(jittered(i, 0.5), i);
        assert_eq!(jittered(i, f64::NAN), i);
    }
}
