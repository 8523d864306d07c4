//! A pipeline compiled from config: its matcher, its conversions, and the identity of what it
//! produces (for idempotent re-delivery).

use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::convert::Conversion;
use super::matching::Matcher;
use super::naming::TargetNaming;
use crate::config::{Config, PipelineConfig};
use crate::drivers::{DriverError, DriverKind};
use crate::oci::{Platform, Reference};

pub struct Plan {
    pub name: String,
    pub matcher: Matcher,
    pub conversions: Vec<Conversion>,
    pub platforms: Vec<Platform>,
    /// Conversions of this pipeline run at once.
    pub concurrency: usize,
    /// Source names this pipeline hears; empty means every source.
    sources: Vec<String>,
    /// Hash of everything that shapes the output (drivers, their versions and options, target
    /// naming, platforms): a change makes earlier conversions count as different work.
    pub fingerprint: String,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan").field("name", &self.name).field("fingerprint", &self.fingerprint).finish()
    }
}

impl Plan {
    pub fn new(p: &PipelineConfig) -> Result<Plan, DriverError> {
        let mut identity = Vec::new();
        let mut conversions = Vec::new();
        for c in &p.convert {
            let driver = c.driver.build(&c.options)?;
            let naming = TargetNaming::from_config(c);
            identity.push(serde_json::json!({
                "driver": driver.kind(),
                "version": driver.version(),
                "options": driver.options(),
                "tag_suffix": c.tag_suffix(),
                "repository": c.repository,
            }));
            conversions.push(Conversion { driver, naming });
        }
        let identity = serde_json::json!({ "conversions": identity, "platforms": p.platforms });
        let fingerprint = hex::encode(&Sha256::digest(identity.to_string().as_bytes())[..12]);
        Ok(Plan {
            name: p.name.clone(),
            matcher: Matcher::new(p),
            conversions,
            platforms: p.platforms.clone(),
            concurrency: p.concurrency.max(1),
            sources: p.sources.clone(),
            fingerprint,
        })
    }

    /// Every pipeline of the config, in config order.
    pub fn all(config: &Config) -> Result<Vec<Arc<Plan>>, DriverError> {
        config.pipelines.iter().map(|p| Plan::new(p).map(Arc::new)).collect()
    }

    /// Whether events from the named source feed this pipeline.
    pub fn takes_from(&self, origin: &str) -> bool {
        self.sources.is_empty() || self.sources.iter().any(|s| s == origin)
    }

    pub fn drivers(&self) -> Vec<DriverKind> {
        self.conversions.iter().map(|c| c.driver.kind()).collect()
    }

    /// Identity of "this pipeline, with these options, converts this image". A source with a
    /// digest names fixed content; one without names whatever its tag points at now.
    pub fn key(&self, source: &Reference) -> String {
        format!("{}\u{1f}{}\u{1f}{}", self.name, self.fingerprint, source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(yaml: &str) -> Plan {
        let c = Config::parse(yaml, "t", &|_| None).unwrap();
        Plan::new(&c.pipelines[0]).unwrap()
    }

    #[test]
    fn fingerprint_follows_options_that_shape_the_output() {
        let a = plan("pipelines: [{ name: a, convert: [{ driver: estargz }] }]");
        let same = plan("pipelines: [{ name: a, convert: [{ driver: estargz, options: { compression_level: 9 } }] }]");
        let level = plan("pipelines: [{ name: a, convert: [{ driver: estargz, options: { compression_level: 6 } }] }]");
        let suffix = plan("pipelines: [{ name: a, convert: [{ driver: estargz, tag_suffix: -x }] }]");
        let platforms = plan("pipelines: [{ name: a, platforms: [linux/amd64], convert: [{ driver: estargz }] }]");
        assert_eq!(a.fingerprint, same.fingerprint, "defaults written out are the same work");
        for other in [&level, &suffix, &platforms] {
            assert_ne!(a.fingerprint, other.fingerprint);
        }
        let r: Reference = "h.io/a/b:1".parse().unwrap();
        assert_ne!(a.key(&r), level.key(&r));
        assert_ne!(a.key(&r), a.key(&"h.io/a/b:2".parse().unwrap()));
    }

    #[test]
    fn sources() {
        let c = Config::parse(
            "sources: { h: { kind: harbor } }\npipelines: [{ name: a, sources: [h], convert: [{ driver: estargz }] }, { name: b, convert: [{ driver: estargz, tag_suffix: -b }] }]",
            "t",
            &|_| None,
        )
        .unwrap();
        let plans = Plan::all(&c).unwrap();
        assert!(plans[0].takes_from("h") && !plans[0].takes_from("other"));
        assert!(plans[1].takes_from("h") && plans[1].takes_from("other"));
    }
}
