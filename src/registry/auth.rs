//! Registry auth vocabulary: `WWW-Authenticate` challenges, token scopes, token responses and
//! the per-host cache of what a host asked for and which tokens are still good.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::config::Secret;

/// One challenge from a `WWW-Authenticate` header. Scheme and parameter names are lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// Parses a `WWW-Authenticate` value (RFC 7235): one or more challenges separated by commas,
/// each a scheme followed by `name=value` parameters whose values may be quoted strings that
/// contain commas and escaped quotes.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let chars: Vec<char> = header.chars().collect();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let is_sep = |c: char| c.is_whitespace() || c == ',' || c == '=';
    while i < chars.len() {
        while i < chars.len() && (chars[i].is_whitespace() || chars[i] == ',') {
            i += 1;
        }
        let start = i;
        while i < chars.len() && !is_sep(chars[i]) {
            i += 1;
        }
        let token: String = chars[start..i].iter().collect();
        if token.is_empty() {
            // A stray `=` or `"` where a name should be: skip it rather than loop forever.
            i += 1;
            continue;
        }
        let mut j = i;
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        if j < chars.len() && chars[j] == '=' {
            j += 1;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let mut value = String::new();
            if j < chars.len() && chars[j] == '"' {
                j += 1;
                while j < chars.len() && chars[j] != '"' {
                    if chars[j] == '\\' && j + 1 < chars.len() {
                        j += 1;
                    }
                    value.push(chars[j]);
                    j += 1;
                }
                j += 1;
            } else {
                while j < chars.len() && chars[j] != ',' && !chars[j].is_whitespace() {
                    value.push(chars[j]);
                    j += 1;
                }
            }
            if let Some(current) = out.last_mut() {
                current.params.insert(token.to_ascii_lowercase(), value);
            }
            i = j;
        } else {
            out.push(Challenge { scheme: token.to_ascii_lowercase(), params: BTreeMap::new() });
            i = j;
        }
    }
    out
}

/// How a host wants to be authenticated, learned from its challenges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostAuth {
    Basic,
    Bearer { realm: String, service: Option<String> },
}

impl HostAuth {
    /// Picks the scheme to use from a response's challenges; bearer is preferred because it
    /// keeps the password off every request.
    pub fn from_challenges(challenges: &[Challenge]) -> Option<(HostAuth, Option<String>)> {
        if let Some(c) = challenges.iter().find(|c| c.scheme == "bearer") {
            let realm = c.param("realm").filter(|r| !r.is_empty())?.to_string();
            let service = c.param("service").map(str::to_string);
            return Some((HostAuth::Bearer { realm, service }, c.param("scope").map(str::to_string)));
        }
        challenges.iter().find(|c| c.scheme == "basic").map(|_| (HostAuth::Basic, None))
    }
}

/// What an operation needs on a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Pull,
    Push,
    /// Push to the repository and pull from `from`, for a cross-repository mount.
    Mount { from: String },
    /// List the registry's repositories (`/v2/_catalog`); not tied to a repository.
    Catalog,
}

impl Access {
    /// The token scopes for `repository`, e.g. `repository:app:pull,push`.
    pub fn scopes(&self, repository: &str) -> Vec<String> {
        match self {
            Access::Pull => vec![format!("repository:{repository}:pull")],
            Access::Push => vec![format!("repository:{repository}:pull,push")],
            Access::Mount { from } => {
                vec![format!("repository:{repository}:pull,push"), format!("repository:{from}:pull")]
            }
            Access::Catalog => vec!["registry:catalog:*".to_string()],
        }
    }

    /// The actions on the target repository, as shown in error messages.
    pub fn actions(&self) -> &'static str {
        match self {
            Access::Pull => "pull",
            Access::Push | Access::Mount { .. } => "pull,push",
            Access::Catalog => "catalog",
        }
    }
}

/// Adds the scopes a challenge names to ours when ours do not already cover them: some
/// registries want more (or differently spelled) access than we would have asked for.
pub fn merge_scopes(mut ours: Vec<String>, challenge_scope: Option<&str>) -> Vec<String> {
    if let Some(extra) = challenge_scope {
        for s in extra.split_whitespace() {
            if !ours.iter().any(|o| covers(o, s)) {
                ours.push(s.to_string());
            }
        }
    }
    ours
}

/// Whether scope `a` grants everything scope `b` asks for (same resource, superset of actions).
fn covers(a: &str, b: &str) -> bool {
    match (a.rsplit_once(':'), b.rsplit_once(':')) {
        (Some((ra, aa)), Some((rb, ab))) => ra == rb && ab.split(',').all(|x| aa.split(',').any(|y| y == x)),
        _ => a == b,
    }
}

/// A token endpoint's answer. `access_token` is the OAuth2 spelling of `token`.
#[derive(Debug, Deserialize)]
pub struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl TokenResponse {
    pub fn parse(body: &[u8]) -> Result<(Secret, Duration), String> {
        let r: TokenResponse =
            serde_json::from_slice(body).map_err(|e| format!("the token response is not the expected JSON: {e}"))?;
        let token = r
            .token
            .filter(|t| !t.is_empty())
            .or(r.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| "the token response has neither `token` nor `access_token`".to_string())?;
        Ok((Secret::new(token), cache_lifetime(r.expires_in)))
    }
}

/// How long to reuse a token: its `expires_in` (60 s when absent, as the token spec says) less a
/// margin, so a request does not set off with a token that expires on the way.
pub fn cache_lifetime(expires_in: Option<u64>) -> Duration {
    let total = Duration::from_secs(expires_in.unwrap_or(60));
    let margin = (total / 10).min(Duration::from_secs(30));
    total - margin
}

#[derive(Debug)]
struct CachedToken {
    value: Secret,
    valid_until: Instant,
}

/// What the client has learned per API host: its auth scheme and its tokens per scope set.
#[derive(Debug, Default)]
pub struct AuthCache {
    hosts: HashMap<String, HostAuth>,
    tokens: HashMap<(String, String), CachedToken>,
}

fn scope_key(scopes: &[String]) -> String {
    let mut s = scopes.to_vec();
    s.sort();
    s.join(" ")
}

impl AuthCache {
    pub fn host_auth(&self, host: &str) -> Option<&HostAuth> {
        self.hosts.get(host)
    }

    pub fn set_host_auth(&mut self, host: &str, auth: HostAuth) {
        self.hosts.insert(host.to_string(), auth);
    }

    pub fn token(&self, host: &str, scopes: &[String], now: Instant) -> Option<Secret> {
        self.tokens
            .get(&(host.to_string(), scope_key(scopes)))
            .filter(|t| now < t.valid_until)
            .map(|t| t.value.clone())
    }

    pub fn store_token(&mut self, host: &str, scopes: &[String], value: Secret, lifetime: Duration, now: Instant) {
        self.tokens.retain(|_, t| now < t.valid_until);
        self.tokens.insert((host.to_string(), scope_key(scopes)), CachedToken { value, valid_until: now + lifetime });
    }

    pub fn forget_token(&mut self, host: &str, scopes: &[String]) {
        self.tokens.remove(&(host.to_string(), scope_key(scopes)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_with_quoted_commas() {
        let h = r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope""#;
        let c = parse_challenges(h);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.example.com/token"));
        assert_eq!(c[0].param("service"), Some("registry.example.com"));
        assert_eq!(c[0].param("scope"), Some("repository:a/b:pull,push repository:c:pull"));
        assert_eq!(c[0].param("error"), Some("insufficient_scope"));
        let (auth, scope) = HostAuth::from_challenges(&c).unwrap();
        assert_eq!(
            auth,
            HostAuth::Bearer { realm: "https://auth.example.com/token".into(), service: Some("registry.example.com".into()) }
        );
        assert_eq!(scope.as_deref(), Some("repository:a/b:pull,push repository:c:pull"));
    }

    #[test]
    fn several_challenges_spacing_escapes_and_tokens() {
        let h = r#"Basic realm="Harbor \"main\", eu", BEARER Realm = "http://127.0.0.1:1/t" , service=reg"#;
        let c = parse_challenges(h);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some(r#"Harbor "main", eu"#));
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].param("realm"), Some("http://127.0.0.1:1/t"));
        assert_eq!(c[1].param("service"), Some("reg"));
        assert!(matches!(HostAuth::from_challenges(&c), Some((HostAuth::Bearer { .. }, None))));
        let basic = parse_challenges(r#"Basic realm="accel-test""#);
        assert_eq!(HostAuth::from_challenges(&basic), Some((HostAuth::Basic, None)));
        assert!(HostAuth::from_challenges(&parse_challenges("Bearer service=x")).is_none());
        assert!(parse_challenges("").is_empty());
        // Malformed input must not panic or hang.
        for junk in ["=", "\"", "Bearer realm=\"unterminated", ",,, =x", "Bearer ="] {
            let _ = parse_challenges(junk);
        }
    }

    #[test]
    fn scopes() {
        assert_eq!(Access::Pull.scopes("a/b"), vec!["repository:a/b:pull"]);
        assert_eq!(Access::Push.scopes("a/b"), vec!["repository:a/b:pull,push"]);
        assert_eq!(
            Access::Mount { from: "c".into() }.scopes("a/b"),
            vec!["repository:a/b:pull,push", "repository:c:pull"]
        );
        let merged = merge_scopes(Access::Push.scopes("a"), Some("repository:a:push,pull repository:x:pull"));
        assert_eq!(merged, vec!["repository:a:pull,push", "repository:x:pull"]);
        // A challenge for less than we ask for adds nothing.
        assert_eq!(merge_scopes(Access::Push.scopes("a"), Some("repository:a:pull")).len(), 1);
        let more = merge_scopes(Access::Pull.scopes("a"), Some("repository:a:pull,delete"));
        assert_eq!(more, vec!["repository:a:pull", "repository:a:pull,delete"]);
        assert_eq!(merge_scopes(Access::Pull.scopes("a"), None).len(), 1);
    }

    #[test]
    fn token_response_and_cache() {
        let (t, life) = TokenResponse::parse(br#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!(t.expose(), "abc");
        assert_eq!(life, Duration::from_secs(270));
        let (t, life) = TokenResponse::parse(br#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!(t.expose(), "xyz");
        assert_eq!(life, Duration::from_secs(54));
        assert!(TokenResponse::parse(br#"{"token":""}"#).is_err());
        assert!(TokenResponse::parse(b"<html>").is_err());
        assert_eq!(cache_lifetime(Some(3600)), Duration::from_secs(3570));

        let mut cache = AuthCache::default();
        let now = Instant::now();
        let scopes = Access::Mount { from: "b".into() }.scopes("a");
        cache.store_token("h", &scopes, Secret::new("t1"), Duration::from_secs(10), now);
        let reversed: Vec<String> = scopes.iter().rev().cloned().collect();
        assert_eq!(cache.token("h", &reversed, now).unwrap().expose(), "t1");
        assert!(cache.token("h", &scopes, now + Duration::from_secs(11)).is_none());
        assert!(cache.token("other", &scopes, now).is_none());
        assert!(cache.token("h", &Access::Pull.scopes("a"), now).is_none());
        cache.forget_token("h", &scopes);
        assert!(cache.token("h", &scopes, now).is_none());
    }
}
