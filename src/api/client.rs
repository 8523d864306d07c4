//! Client of the `acceld` API, as `accelctl task` uses it.

use reqwest::StatusCode;
use url::Url;

use super::types::{CreateResponse, ErrorBody, TaskView};
use super::CONVERSIONS_PATH;
use crate::config::Secret;
use crate::oci::Reference;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("address {addr:?} is not a URL: {why}")]
    Addr { addr: String, why: String },
    /// The cause follows in the error's source chain.
    #[error("cannot reach acceld at {url} (is it running, and is --addr right?)")]
    Connect { url: String, source: reqwest::Error },
    #[error("acceld refused the request ({status}): {message}{hint}", hint = if *.status == StatusCode::UNAUTHORIZED { " (pass --auth-header or set ACCEL_AUTH_HEADER)" } else { "" })]
    Api { status: StatusCode, code: String, message: String },
    #[error("acceld answered {status} with a body that cannot be read: {why}")]
    Decode { status: StatusCode, why: String },
    #[error("the auth header cannot be sent in an HTTP header: {why}")]
    AuthHeader { why: String },
}

pub struct ApiClient {
    base: Url,
    auth_header: Option<Secret>,
    http: reqwest::Client,
}

impl ApiClient {
    /// `addr` is `http://host:port` (a bare `host:port` means http).
    pub fn new(addr: &str, auth_header: Option<Secret>) -> Result<Self, ClientError> {
        let with_scheme = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
        let base = Url::parse(&with_scheme).map_err(|e| ClientError::Addr { addr: addr.into(), why: e.to_string() })?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(ClientError::Addr { addr: addr.into(), why: "use http:// or https://".into() });
        }
        if let Some(a) = &auth_header {
            reqwest::header::HeaderValue::from_str(a.expose())
                .map_err(|_| ClientError::AuthHeader { why: "it holds a line break or another control character".into() })?;
        }
        let http = reqwest::Client::builder().build().map_err(|e| ClientError::Connect { url: base.to_string(), source: e })?;
        Ok(ApiClient { base, auth_header, http })
    }

    fn url(&self, path: &str) -> Url {
        let mut u = self.base.clone();
        let prefix = u.path().trim_end_matches('/').to_string();
        u.set_path(&format!("{prefix}{path}"));
        u
    }

    fn request(&self, method: reqwest::Method, url: Url) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url);
        match &self.auth_header {
            Some(a) => r.header(reqwest::header::AUTHORIZATION, a.expose()),
            None => r,
        }
    }

    /// Asks for `reference` to be converted, with the same body the acceleration service's
    /// `accelctl` sends (a Harbor push event). With `sync`, waits for the result.
    pub async fn create(&self, reference: &Reference, sync: bool) -> Result<CreateResponse, ClientError> {
        let mut url = self.url(CONVERSIONS_PATH);
        if sync {
            url.set_query(Some("sync=true"));
        }
        let body = serde_json::json!({
            "type": crate::sources::harbor::PUSH_ARTIFACT,
            "event_data": { "resources": [{ "resource_url": reference.to_string() }] },
        });
        self.send(self.request(reqwest::Method::POST, url).json(&body)).await
    }

    pub async fn list(&self) -> Result<Vec<TaskView>, ClientError> {
        self.send(self.request(reqwest::Method::GET, self.url(CONVERSIONS_PATH))).await
    }

    async fn send<T: serde::de::DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let resp = req.send().await.map_err(|e| ClientError::Connect { url: self.base.to_string(), source: e })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| ClientError::Connect { url: self.base.to_string(), source: e })?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => ClientError::Api { status, code: e.code, message: e.message },
                Err(_) => ClientError::Api { status, code: String::new(), message: String::from_utf8_lossy(&bytes).trim().to_string() },
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode { status, why: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let c = ApiClient::new("127.0.0.1:2077", None).unwrap();
        assert_eq!(c.url(CONVERSIONS_PATH).as_str(), "http://127.0.0.1:2077/api/v1/conversions");
        let c = ApiClient::new("https://accel.example.com/prefix/", None).unwrap();
        assert_eq!(c.url(CONVERSIONS_PATH).as_str(), "https://accel.example.com/prefix/api/v1/conversions");
        assert!(matches!(ApiClient::new("ftp://x", None), Err(ClientError::Addr { .. })));
        assert!(matches!(ApiClient::new("http://", None), Err(ClientError::Addr { .. })));
    }
}
