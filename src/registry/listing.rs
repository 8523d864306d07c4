//! Listing what a registry holds: repositories (`/v2/_catalog`), tags (`/v2/<name>/tags/list`)
//! with their pagination, and the digest a tag points at (`HEAD` on the manifest).

use reqwest::header::{HeaderMap, ACCEPT, LINK};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::auth::Access;
use super::request::{self, Target};
use super::transport::{redact_url, same_origin, with_query_param};
use super::{RegistryClient, RegistryError};
use crate::oci::{media_types, Digest, Reference};

/// Largest body of one list page. A registry that ignores `n` answers with everything at once;
/// this still leaves room for a few hundred thousand names.
const MAX_LIST_BODY: u64 = 32 << 20;
/// Pages followed for one listing before giving up on a registry that never says "last page".
const MAX_PAGES: usize = 100_000;

/// What a list is of, for requests and messages.
#[derive(Debug, Clone, Copy)]
enum ListKind {
    Repositories,
    Tags,
}

#[derive(Deserialize)]
struct CatalogBody {
    #[serde(default)]
    repositories: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct TagsBody {
    // distribution answers `"tags": null` for a repository whose tags were all deleted.
    #[serde(default)]
    tags: Option<Vec<String>>,
}

impl RegistryClient {
    /// Every repository of `registry` (`host` or `host:port`), following the pagination of
    /// `/v2/_catalog` with pages of `page_size` names. Needs the `registry:catalog:*` scope;
    /// Harbor grants it to system administrators only.
    pub async fn catalog(&self, registry: &str, page_size: usize) -> Result<Vec<String>, RegistryError> {
        let op = format!("list the repositories of {registry}");
        // A placeholder repository only gives the host its usual spelling (docker.io's API host).
        let probe: Reference = format!("{registry}/catalog").parse().map_err(|e| RegistryError::InvalidRequest {
            op: op.clone(),
            why: format!("{registry:?} is not a registry host: {e}"),
        })?;
        let target = Target { registry: probe.registry(), host: probe.api_host(), repository: "", access: Access::Catalog };
        self.list(&target, &op, "_catalog", page_size, ListKind::Repositories).await
    }

    /// Every tag of the repository `repo` names, sorted, following the pagination of
    /// `/v2/<name>/tags/list`. A repository that does not exist is a 404 error
    /// ([`RegistryError::is_not_found`]).
    pub async fn list_tags(&self, repo: &Reference, page_size: usize) -> Result<Vec<String>, RegistryError> {
        let op = format!("list the tags of {}", repo.name());
        let target = Target::new(repo, Access::Pull);
        let path = format!("{}/tags/list", repo.repository());
        self.list(&target, &op, &path, page_size, ListKind::Tags).await
    }

    /// The digest of the manifest or index `reference` names now, from a `HEAD` request (a
    /// `GET` when the registry does not send `Docker-Content-Digest`); `None` when it does not
    /// exist.
    pub async fn manifest_digest(&self, reference: &Reference) -> Result<Option<Digest>, RegistryError> {
        let op = format!("check manifest {reference}");
        let target = Target::new(reference, Access::Pull);
        let base = self.base_url(&target, &op).await?;
        let url = request::api_url(&base, &format!("{}/manifests/{}", reference.repository(), reference.manifest_selector()))?;
        let accept = media_types::MANIFEST_ACCEPT.join(", ");
        let response = self.send(&target, &op, Method::HEAD, &url, |rb| rb.header(ACCEPT, accept.as_str())).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let response = self.expect_status(response, &[StatusCode::OK], &op, &url).await?;
        if let Some(digest) = request::content_digest(&response) {
            if let Some(expected) = reference.digest() {
                if *expected != digest {
                    return Err(RegistryError::DigestMismatch { op, expected: expected.clone(), actual: digest });
                }
            }
            return Ok(Some(digest));
        }
        match self.get_manifest(reference).await {
            Ok(m) => Ok(Some(m.digest)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list(&self, target: &Target<'_>, op: &str, path: &str, page_size: usize, kind: ListKind) -> Result<Vec<String>, RegistryError> {
        let page_size = page_size.max(1);
        let base = self.base_url(target, op).await?;
        let first = with_query_param(&request::api_url(&base, path)?, "n", &page_size.to_string());
        let mut url = first.clone();
        // Whether `url` was made here from `last` rather than given by a Link header.
        let mut guessed = false;
        let mut out: Vec<String> = Vec::new();
        for _ in 0..MAX_PAGES {
            let response = self.send(target, op, Method::GET, &url, |rb| rb.header(ACCEPT, "application/json")).await?;
            let response = self.expect_status(response, &[StatusCode::OK], op, &url).await?;
            let link = next_link(response.headers());
            let body = self.read_limited(response, op, &url, target.registry, MAX_LIST_BODY).await?;
            let invalid = |why: String| RegistryError::InvalidResponse { op: op.to_string(), url: redact_url(&url), why };
            let names = match kind {
                ListKind::Repositories => serde_json::from_slice::<CatalogBody>(&body).map(|b| b.repositories.unwrap_or_default()),
                ListKind::Tags => serde_json::from_slice::<TagsBody>(&body).map(|b| b.tags.unwrap_or_default()),
            }
            .map_err(|e| invalid(format!("the list is not the expected JSON: {e}")))?;
            // A registry that ignores `last` answers the first page again: the list is complete.
            if guessed && names.first().is_some_and(|n| out.contains(n)) {
                break;
            }
            let full_page = names.len() >= page_size;
            out.extend(names);
            url = match link {
                Some(l) => {
                    let next = url.join(&l).map_err(|e| invalid(format!("the Link header's next page {l:?} is not a URL: {e}")))?;
                    if !same_origin(&base, &next) {
                        return Err(invalid(format!("the Link header points to another server ({})", redact_url(&next))));
                    }
                    if next == url {
                        return Err(invalid("the Link header's next page is the page just read".into()));
                    }
                    guessed = false;
                    next
                }
                // Registries that page without a Link header still honour `last`: a full page
                // may have a next one.
                None if full_page => {
                    guessed = true;
                    with_query_param(&first, "last", out.last().map(String::as_str).unwrap_or_default())
                }
                None => break,
            };
        }
        // The catalog is in lexical order by the spec; tag lists are in whatever order the
        // registry's storage gives.
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// The target of the `rel="next"` entry of `Link` headers (RFC 8288), e.g.
/// `</v2/_catalog?last=b&n=2>; rel="next"`.
fn next_link(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all(LINK).iter().filter_map(|v| v.to_str().ok()) {
        let mut rest = value;
        while let Some(open) = rest.find('<') {
            let after = &rest[open + 1..];
            let close = after.find('>')?;
            let target = &after[..close];
            let params_end = after[close..].find('<').map(|i| close + i).unwrap_or(after.len());
            let params = &after[close + 1..params_end];
            let is_next = params.split(';').any(|p| {
                let Some((k, v)) = p.split_once('=') else { return false };
                k.trim().eq_ignore_ascii_case("rel")
                    && v.trim().trim_matches('"').split_whitespace().any(|r| r.eq_ignore_ascii_case("next"))
            });
            if is_next {
                return Some(target.trim().to_string());
            }
            rest = &after[params_end..];
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(LINK, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn next_link_forms() {
        assert_eq!(next_link(&headers(&[r#"</v2/_catalog?last=b&n=2>; rel="next""#])).as_deref(), Some("/v2/_catalog?last=b&n=2"));
        assert_eq!(next_link(&headers(&["<https://h/v2/a/tags/list?n=1&last=x>;rel=next"])).as_deref(), Some("https://h/v2/a/tags/list?n=1&last=x"));
        assert_eq!(
            next_link(&headers(&[r#"</first>; rel="first", </v2/_catalog?last=c>; rel="next""#])).as_deref(),
            Some("/v2/_catalog?last=c")
        );
        assert_eq!(next_link(&headers(&[r#"</prev>; rel="prev""#, r#"</n>; REL="next""#])).as_deref(), Some("/n"));
        assert_eq!(next_link(&headers(&[r#"</prev>; rel="prev""#])), None);
        assert_eq!(next_link(&headers(&[])), None);
        assert_eq!(next_link(&headers(&["garbage"])), None);
    }
}
