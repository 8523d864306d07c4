//! Reading `pipelines.yaml`: YAML → `${VAR}` expansion → typed config → cross-checks.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use serde_yaml::Value;

use super::{Config, SinkConfig, SourceConfig, StoreConfig};
use crate::oci::Reference;

/// One thing wrong with a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the offending key, e.g. `pipelines[0].convert[1].options.chunk_size_bytes`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() || self.path == "." {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config {origin} is invalid:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { origin: String, problems: Vec<Problem> },
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            ConfigError::Read { .. } => &[],
        }
    }
}

/// Longest `tasks.retention_secs`: 100 years.
const MAX_RETENTION_SECS: u64 = 100 * 365 * 24 * 3600;

/// `host:port` or `[v6]:port`, with a port number.
fn check_listen(listen: &str) -> Result<(), String> {
    let (host, port) = listen.rsplit_once(':').ok_or_else(|| format!("{listen:?} is not host:port (for example 127.0.0.1:2077)"))?;
    if listen.chars().any(char::is_whitespace) {
        return Err(format!("{listen:?} holds a space"));
    }
    if host.is_empty() {
        return Err(format!("{listen:?} names no host (for example 0.0.0.0:2077 for every address)"));
    }
    if host.contains('/') {
        return Err(format!("{listen:?} is not host:port; leave out the scheme and path (for example 127.0.0.1:2077)"));
    }
    port.parse::<u16>().map_err(|_| format!("{listen:?}: {port:?} is not a port number (0 to 65535)"))?;
    Ok(())
}

impl Config {
    /// Reads and validates a config file, expanding `${VAR}` from the process environment.
    /// An empty file is refused: it is more likely a mistake than a wish for every default.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        if text.trim().is_empty() || matches!(serde_yaml::from_str::<Value>(&text), Ok(Value::Null)) {
            let problem = Problem { path: String::new(), message: "the file is empty (or holds only comments); see pipelines.yaml in the project for an example".into() };
            return Err(ConfigError::Invalid { origin: path.display().to_string(), problems: vec![problem] });
        }
        Config::parse(&text, &path.display().to_string(), &|k| std::env::var(k).ok())
    }

    /// Parses and validates config text. `origin` names it in errors; `env` looks up variables.
    pub fn parse(text: &str, origin: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let invalid = |problems| ConfigError::Invalid { origin: origin.to_string(), problems };
        let mut value: Value = if text.trim().is_empty() {
            Value::Mapping(Default::default())
        } else {
            serde_yaml::from_str(text).map_err(|e| invalid(vec![Problem { path: String::new(), message: format!("not valid YAML: {e}") }]))?
        };
        let mut problems = Vec::new();
        expand_env(&mut value, "", env, &mut problems);
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        let config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            invalid(vec![Problem { path, message: e.into_inner().to_string() }])
        })?;
        let problems = config.check();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(invalid(problems))
        }
    }

    /// Cross-field checks that serde cannot express. Returns every problem found.
    fn check(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut problem = |path: String, message: String| out.push(Problem { path, message });
        for host in self.registries.keys() {
            if format!("{host}/x").parse::<Reference>().map(|r| r.registry() != host).unwrap_or(true) {
                problem(format!("registries.{host}"), "is not a registry host (host or host:port)".into());
            }
        }
        if let StoreConfig::Containerd { address, namespace, .. } = &self.store {
            if let Err(e) = crate::store::containerd::check_address(address) {
                problem("store.address".into(), e);
            }
            if let Err(e) = crate::store::containerd::check_namespace(namespace) {
                problem("store.namespace".into(), e);
            }
        }
        if self.server.max_body_bytes.0 == 0 {
            problem("server.max_body_bytes".into(), "must be at least 1 byte (Harbor's webhooks are about 1 KiB)".into());
        }
        if let Err(why) = check_listen(&self.server.listen) {
            problem("server.listen".into(), why);
        }
        if self.tasks.retention_secs > MAX_RETENTION_SECS {
            problem("tasks.retention_secs".into(), format!("must be at most {MAX_RETENTION_SECS} (100 years)"));
        }
        if self.tasks.queue_size == 0 {
            problem("tasks.queue_size".into(), "must be at least 1".into());
        }
        if self.tasks.max_attempts == 0 {
            problem("tasks.max_attempts".into(), "must be at least 1 (the first attempt counts)".into());
        }
        let mut names = BTreeSet::new();
        for (i, p) in self.pipelines.iter().enumerate() {
            let at = format!("pipelines[{i}]");
            if p.concurrency == 0 {
                problem(format!("{at}.concurrency"), "must be at least 1".into());
            }
            if p.name.trim().is_empty() {
                problem(format!("{at}.name"), "must not be empty".into());
            } else if !names.insert(p.name.as_str()) {
                problem(format!("{at}.name"), format!("pipeline name {:?} is used twice", p.name));
            }
            for (j, s) in p.sources.iter().enumerate() {
                if !self.sources.contains_key(s) {
                    problem(format!("{at}.sources[{j}]"), format!("no source named {s:?} under `sources`"));
                }
            }
            for (j, s) in p.sinks.iter().enumerate() {
                if !self.sinks.contains_key(s) {
                    problem(format!("{at}.sinks[{j}]"), format!("no sink named {s:?} under `sinks`"));
                }
            }
            for (field, globs) in [("repositories", &p.matches.repositories), ("tags", &p.matches.tags)] {
                for (j, g) in globs.iter().enumerate() {
                    if let Err(e) = globset::Glob::new(g) {
                        problem(format!("{at}.match.{field}[{j}]"), format!("bad glob {g:?}: {e}"));
                    }
                }
            }
            if p.convert.is_empty() {
                problem(format!("{at}.convert"), "lists no conversion; add at least one `{ driver: estargz }`".into());
            }
            let mut targets = BTreeSet::new();
            for (j, c) in p.convert.iter().enumerate() {
                let at = format!("{at}.convert[{j}]");
                if let Err(e) = c.driver.build(&c.options) {
                    problem(format!("{at}.options"), e.to_string());
                }
                if let Some(s) = &c.tag_suffix {
                    if s.is_empty() && c.repository.is_none() {
                        problem(format!("{at}.tag_suffix"), "an empty suffix would overwrite the source tag; set `repository` too".into());
                    }
                    if let Err(why) = crate::pipeline::naming::check_suffix(s) {
                        problem(format!("{at}.tag_suffix"), why);
                    }
                }
                if let Some(r) = &c.repository {
                    if format!("example.com/{r}").parse::<Reference>().map(|x| x.repository() != r).unwrap_or(true) {
                        problem(format!("{at}.repository"), format!("{r:?} is not a repository path"));
                    }
                }
                if !targets.insert((c.repository.clone(), c.tag_suffix().to_string())) {
                    problem(at, "names the same target as an earlier conversion; give it another tag_suffix".into());
                }
            }
        }
        let harbors: Vec<&String> = self.sources.iter().filter(|(_, s)| matches!(s, SourceConfig::Harbor { .. })).map(|(n, _)| n).collect();
        if let [first, rest @ ..] = harbors.as_slice() {
            for name in rest {
                problem(format!("sources.{name}"), format!("a second Harbor source: the webhook endpoint is one, and {first:?} is it"));
            }
        }
        for (name, s) in &self.sources {
            let at = format!("sources.{name}");
            match s {
                SourceConfig::Harbor { forward } => {
                    if let Some(f) = forward {
                        f.check(&format!("{at}.forward"), &mut problem);
                    }
                }
                SourceConfig::Nats(c) => c.check(&at, &mut problem),
                SourceConfig::Jetstream(c) => c.check(&at, &mut problem),
                SourceConfig::Poll(c) => c.check(&at, &mut problem),
                SourceConfig::Kafka(c) => c.check(&at, &mut problem),
            }
        }
        for (name, s) in &self.sinks {
            let at = format!("sinks.{name}");
            match s {
                SinkConfig::Stdout {} => {}
                SinkConfig::File(c) => c.check(&at, &mut problem),
                SinkConfig::Http(c) => c.check(&at, &mut problem),
                SinkConfig::Nats(c) | SinkConfig::Jetstream(c) => c.check(&at, &mut problem),
                SinkConfig::Kafka(c) => c.check(&at, &mut problem),
            }
        }
        out
    }
}

/// Replaces `${VAR}` and `${VAR:-default}` in every string scalar. `$$` is a literal `$`.
fn expand_env(v: &mut Value, path: &str, env: &dyn Fn(&str) -> Option<String>, problems: &mut Vec<Problem>) {
    match v {
        Value::String(s) if s.contains('$') => match expand_str(s, env) {
            Ok(new) => *s = new,
            Err(message) => problems.push(Problem { path: path.to_string(), message }),
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_env(item, &format!("{path}[{i}]"), env, problems);
            }
        }
        Value::Mapping(map) => {
            for (k, item) in map.iter_mut() {
                let key = k.as_str().map(str::to_string).unwrap_or_else(|| format!("{k:?}"));
                let sub = if path.is_empty() { key } else { format!("{path}.{key}") };
                expand_env(item, &sub, env, problems);
            }
        }
        Value::Tagged(t) => expand_env(&mut t.value, path, env, problems),
        _ => {}
    }
}

fn expand_str(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').ok_or_else(|| format!("unterminated `${{` in {s:?}"))?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("`${{{expr}}}` is not a valid variable reference"));
            }
            match (env(name).filter(|v| !(default.is_some() && v.is_empty())), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!("environment variable {name} is not set (write ${{{name}:-default}} for a default)"))
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreConfig;

    fn env(k: &str) -> Option<String> {
        match k {
            "AUTH" => Some("Basic abc".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test", &env)
    }

    #[test]
    fn empty_file_is_defaults() {
        let c = parse("").unwrap();
        assert!(c.pipelines.is_empty());
        assert!(matches!(c.store, StoreConfig::Embedded { .. }));
    }

    #[test]
    fn expands_variables() {
        assert_eq!(expand_str("a${AUTH}b", &env).unwrap(), "aBasic abcb");
        assert_eq!(expand_str("${NOPE:-x}", &env).unwrap(), "x");
        assert_eq!(expand_str("${EMPTY:-x}", &env).unwrap(), "x");
        assert_eq!(expand_str("$$5 $x", &env).unwrap(), "$5 $x");
        assert!(expand_str("${NOPE}", &env).unwrap_err().contains("NOPE is not set"));
        let c = parse("server: { auth_header: '${AUTH}' }").unwrap();
        assert_eq!(c.server.auth_header.unwrap().expose(), "Basic abc");
        let e = parse("server: { auth_header: '${NOPE}' }").unwrap_err();
        assert_eq!(e.problems()[0].path, "server.auth_header");
    }

    #[test]
    fn unknown_key_names_its_path() {
        let e = parse("pipelines:\n  - name: a\n    convert:\n      - { driver: estargz, tag_sufix: -x }\n").unwrap_err();
        let p = &e.problems()[0];
        assert_eq!(p.path, "pipelines[0].convert[0].tag_sufix");
        assert!(p.message.contains("tag_sufix"), "{p}");
        let e = parse("store: { kind: embedded, max_size: 3 parsecs }").unwrap_err();
        // Inside a `kind`-tagged section the path stops at the section; the message names the value.
        assert_eq!(e.problems()[0].path, "store");
        assert!(e.problems()[0].message.contains("3 parsecs"), "{e}");
    }

    #[test]
    fn containerd_store_defaults_and_checks() {
        let c = parse("store: { kind: containerd }").unwrap();
        let StoreConfig::Containerd { address, namespace, register_images } = c.store else { panic!("{:?}", c.store) };
        assert_eq!(address, std::path::Path::new("/run/containerd/containerd.sock"));
        assert_eq!(namespace, "accel");
        assert!(!register_images);
        let c = parse("store: { kind: containerd, address: 'unix:///tmp/c.sock', namespace: a.b-c, register_images: true }").unwrap();
        assert!(matches!(c.store, StoreConfig::Containerd { register_images: true, .. }));

        let e = parse("store: { kind: containerd, address: relative.sock, namespace: 'no space' }").unwrap_err();
        let paths: Vec<_> = e.problems().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["store.address", "store.namespace"], "{e}");
        assert!(e.problems()[0].message.contains("absolute"), "{e}");
        assert!(e.problems()[1].message.contains("no space"), "{e}");
        let e = parse("store: { kind: containerd, adress: /x.sock }").unwrap_err();
        assert!(e.problems()[0].message.contains("adress"), "{e}");
    }

    #[test]
    fn reports_every_cross_check_at_once() {
        let text = r#"
pipelines:
  - name: a
    sources: [nope]
    sinks: [gone]
    convert:
      - { driver: estargz, options: { compression_level: "high" } }
  - name: a
    convert: []
"#;
        let e = parse(text).unwrap_err();
        let paths: Vec<_> = e.problems().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            ["pipelines[0].sources[0]", "pipelines[0].sinks[0]", "pipelines[0].convert[0].options", "pipelines[1].name", "pipelines[1].convert"]
        );
        assert!(e.problems()[2].message.contains("compression_level"), "{}", e.problems()[2]);
    }

    #[test]
    fn unknown_driver_is_rejected() {
        let e = parse("pipelines: [{ name: a, convert: [{ driver: squashfs }] }]").unwrap_err();
        assert!(e.to_string().contains("squashfs"), "{e}");
    }
}
