//! Events ("this image was pushed") and which pipelines turn them into tasks.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::plan::Plan;
use crate::config::{Config, SourceConfig};
use crate::oci::Reference;

/// One pushed image, as every source reports it. The digest, when the source knows it, is part
/// of `reference` (`host/repo:tag@sha256:…` or `host/repo@sha256:…`).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub reference: Reference,
    /// Name of the source it came from (a key of `sources` in the config, or the source kind
    /// when the config names none).
    pub origin: String,
    pub received_at: DateTime<Utc>,
}

impl Event {
    pub fn new(reference: Reference, origin: impl Into<String>) -> Self {
        Event { reference, origin: origin.into(), received_at: Utc::now() }
    }
}

/// A task to create for an event: this pipeline converts this reference.
#[derive(Debug, Clone)]
pub struct Routed {
    pub plan: Arc<Plan>,
    pub event: Event,
}

/// An event, or part of one, that creates no task, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub source: String,
    pub reason: String,
    /// A fixed word for metrics: `conversion_output`, `no_pipeline`.
    #[serde(skip)]
    pub kind: &'static str,
}

/// Decides which pipelines an event feeds.
pub struct Router {
    plans: Vec<Arc<Plan>>,
    /// Non-empty tag suffixes of every configured conversion: a tag ending in one names a
    /// conversion output, and converting it again would loop.
    suffixes: Vec<String>,
}

impl Router {
    pub fn new(config: &Config, plans: Vec<Arc<Plan>>) -> Self {
        let mut suffixes: Vec<String> = config
            .pipelines
            .iter()
            .flat_map(|p| p.convert.iter().map(|c| c.tag_suffix().to_string()))
            .filter(|s| !s.is_empty())
            .collect();
        suffixes.sort();
        suffixes.dedup();
        Router { plans, suffixes }
    }

    pub fn plans(&self) -> &[Arc<Plan>] {
        &self.plans
    }

    /// Name under which events from a source kind arrive: the first configured source of that
    /// kind, or the kind itself.
    pub fn harbor_origin(config: &Config) -> String {
        config
            .sources
            .iter()
            .find(|(_, s)| matches!(s, SourceConfig::Harbor { .. }))
            .map(|(name, _)| name.clone())
            .unwrap_or_else(|| "harbor".into())
    }

    /// The tasks an event creates, or why it creates none.
    pub fn route(&self, event: &Event) -> Result<Vec<Routed>, Skipped> {
        let source = event.reference.to_string();
        if let Some(tag) = event.reference.tag() {
            if let Some(suffix) = self.suffixes.iter().find(|s| tag.ends_with(s.as_str())) {
                return Err(Skipped {
                    source,
                    reason: format!("tag {tag:?} ends with the target suffix {suffix:?}: it is a conversion output"),
                    kind: "conversion_output",
                });
            }
        }
        let routed: Vec<Routed> = self
            .plans
            .iter()
            .filter(|p| p.takes_from(&event.origin) && p.matcher.matches(&event.reference))
            .map(|p| Routed { plan: p.clone(), event: event.clone() })
            .collect();
        if routed.is_empty() {
            return Err(Skipped {
                source,
                reason: format!("no pipeline fed by source {:?} matches this image", event.origin),
                kind: "no_pipeline",
            });
        }
        Ok(routed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::plan::Plan;

    fn router(yaml: &str) -> Router {
        let config = Config::parse(yaml, "t", &|_| None).unwrap();
        let plans = Plan::all(&config).unwrap();
        Router::new(&config, plans)
    }

    const YAML: &str = r#"
sources: { hook: { kind: harbor } }
pipelines:
  - name: lib
    sources: [hook]
    match: { repositories: ["library/*"] }
    convert: [{ driver: estargz }]
  - name: all
    convert: [{ driver: estargz, tag_suffix: -lazy }]
"#;

    fn ev(r: &str, origin: &str) -> Event {
        Event::new(r.parse().unwrap(), origin)
    }

    #[test]
    fn routes_to_matching_pipelines_of_the_source() {
        let r = router(YAML);
        let names = |e: &Event| r.route(e).unwrap().iter().map(|x| x.plan.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&ev("h.io/library/nginx:1", "hook")), ["lib", "all"]);
        assert_eq!(names(&ev("h.io/other/nginx:1", "hook")), ["all"]);
        // A pipeline listing sources only hears those; one listing none hears every source.
        assert_eq!(names(&ev("h.io/library/nginx:1", "elsewhere")), ["all"]);
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(names(&ev(&format!("h.io/library/nginx@{d}"), "hook")), ["lib", "all"]);
    }

    #[test]
    fn conversion_outputs_are_skipped() {
        let r = router(YAML);
        for tag in ["1-esgz", "1-lazy"] {
            let skipped = r.route(&ev(&format!("h.io/library/nginx:{tag}"), "hook")).unwrap_err();
            assert!(skipped.reason.contains("conversion output"), "{skipped:?}");
        }
        assert!(r.route(&ev("h.io/library/nginx:esgz", "hook")).is_ok());
    }

    #[test]
    fn no_match_says_so() {
        let r = router("pipelines: [{ name: a, match: { tags: ['v*'] }, convert: [{ driver: estargz }] }]");
        let s = r.route(&ev("h.io/a/b:latest", "harbor")).unwrap_err();
        assert!(s.reason.contains("no pipeline"), "{s:?}");
    }
}
