//! NATS: connecting with the configured credentials, and publishing to a core subject or to a
//! JetStream subject (waiting for the stream's acknowledgement).

use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;

use crate::config::NatsAuth;

/// Name acceld gives its connections (`nats server --connz` shows it).
const CLIENT_NAME: &str = "acceld";

/// Connects to `url` (comma-separated servers). Fails when no server answers within
/// `timeout`; after that the client reconnects by itself.
pub async fn connect(url: &str, auth: Option<&NatsAuth>, timeout: Duration) -> Result<async_nats::Client, String> {
    let mut opts = async_nats::ConnectOptions::new().name(CLIENT_NAME).connection_timeout(timeout);
    if let Some(a) = auth {
        if let (Some(u), Some(p)) = (&a.user, &a.password) {
            opts = opts.user_and_password(u.clone(), p.expose().to_string());
        }
        if let Some(t) = &a.token {
            opts = opts.token(t.expose().to_string());
        }
        if let Some(f) = &a.credentials_file {
            opts = opts.credentials_file(f).await.map_err(|e| format!("cannot read credentials file {}: {e}", f.display()))?;
        }
    }
    let servers: Vec<&str> = url.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let addrs: Vec<async_nats::ServerAddr> =
        servers.iter().map(|s| s.parse().map_err(|e| format!("{s:?} is not a NATS server URL: {e}"))).collect::<Result<_, _>>()?;
    match tokio::time::timeout(timeout + Duration::from_secs(1), opts.connect(addrs)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Replaces what a header value may not hold (line breaks, other control characters).
pub fn header_value(s: &str) -> String {
    let clean: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    clean.chars().take(1024).collect()
}

/// Publishes to one subject, through JetStream or not.
#[derive(Clone)]
pub struct Publisher {
    client: async_nats::Client,
    jetstream: Option<jetstream::Context>,
    subject: String,
    timeout: Duration,
}

impl Publisher {
    /// A publisher on `client`. With `jetstream`, each publish waits for the stream to store
    /// the message; a subject no stream takes is then an error.
    pub fn new(client: async_nats::Client, subject: &str, jetstream: bool, timeout: Duration) -> Publisher {
        let js = jetstream.then(|| {
            let mut ctx = async_nats::jetstream::new(client.clone());
            ctx.set_timeout(timeout);
            ctx
        });
        Publisher { client, jetstream: js, subject: subject.to_string(), timeout }
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// `subject S` or `JetStream subject S`, for messages.
    pub fn describe(&self) -> String {
        if self.jetstream.is_some() {
            format!("JetStream subject {}", self.subject)
        } else {
            format!("NATS subject {}", self.subject)
        }
    }

    /// Publishes one message. Core NATS: returns once the server has read it (flush).
    /// JetStream: once the stream acknowledged it.
    pub async fn publish(&self, headers: HeaderMap, body: Bytes) -> Result<(), String> {
        let work = async {
            match &self.jetstream {
                Some(js) => {
                    let ack = js.publish_with_headers(self.subject.clone(), headers, body).await.map_err(|e| e.to_string())?;
                    ack.await.map(|_| ()).map_err(|e| e.to_string())
                }
                None => {
                    self.client.publish_with_headers(self.subject.clone(), headers, body).await.map_err(|e| e.to_string())?;
                    self.client.flush().await.map_err(|e| e.to_string())
                }
            }
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r.map_err(|e| format!("publishing to {}: {e}", self.describe())),
            Err(_) => Err(format!("publishing to {}: no acknowledgement within {:?}", self.describe(), self.timeout)),
        }
    }

    /// Checks the server is connected and, for JetStream, that a stream takes the subject.
    pub async fn check(&self) -> Result<(), String> {
        let state = self.client.connection_state();
        if state != async_nats::connection::State::Connected {
            return Err(format!("not connected to NATS ({state})"));
        }
        if let Some(js) = &self.jetstream {
            let found = tokio::time::timeout(self.timeout, js.stream_by_subject(self.subject.clone())).await;
            match found {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("no JetStream stream takes subject {}: {e}; create one that lists it", self.subject)),
                Err(_) => return Err(format!("JetStream did not answer within {:?}", self.timeout)),
            }
        }
        Ok(())
    }
}
