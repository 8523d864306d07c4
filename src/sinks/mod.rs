//! Result sinks: where the results of finished tasks are published. One module per kind; each
//! result is a CloudEvents event ([`ResultEvent`]) built from the finished task.
//!
//! Results are recorded in the task database with the finished task and delivered from there
//! ([`delivery`]), so a sink that is down, or a restart, delays a result but does not lose it.

pub mod delivery;
pub mod file;
pub mod http;
pub mod kafka;
pub mod nats;
pub mod result;
pub mod status;
pub mod stdout;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use delivery::Delivery;
pub use result::ResultEvent;
pub use status::SinkStatuses;

use crate::config::{Config, SinkConfig};

/// Why a sink could not take a result, or is not usable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// Worth trying again later: the server is down, timed out or answered 5xx.
    #[error("sink {sink:?}: {why}")]
    Unavailable { sink: String, why: String },
    /// The receiver refused this result (an HTTP 4xx, say); sending it again will not help.
    #[error("sink {sink:?} refused the result: {why}")]
    Rejected { sink: String, why: String },
    /// The sink's config cannot work (checked when it is built).
    #[error("sink {sink:?}: {why}")]
    Config { sink: String, why: String },
}

impl SinkError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Unavailable { .. })
    }
}

/// A place results are published to.
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// The sink's name in the config.
    fn name(&self) -> &str;
    /// Whether the sink can take results; run at start-up, where an error stops acceld.
    async fn health(&self) -> Result<(), SinkError>;
    /// Publishes one result. Returns once the receiver has it (as far as the kind can tell).
    async fn send(&self, event: &ResultEvent) -> Result<(), SinkError>;
}

/// Builds the sink `name` from its config.
pub async fn build(name: &str, config: &SinkConfig) -> Result<Arc<dyn Sink>, SinkError> {
    Ok(match config {
        SinkConfig::Stdout {} => Arc::new(stdout::StdoutSink::new(name)),
        SinkConfig::File(c) => Arc::new(file::FileSink::new(name, c)),
        SinkConfig::Http(c) => Arc::new(http::HttpSink::new(name, c)?),
        SinkConfig::Nats(c) => Arc::new(nats::NatsSink::new(name, c, false).await?),
        SinkConfig::Jetstream(c) => Arc::new(nats::NatsSink::new(name, c, true).await?),
        SinkConfig::Kafka(c) => Arc::new(kafka::KafkaSink::new(name, c)?),
    })
}

/// How long a sink's health check may take at start-up.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(15);

/// Builds every sink a pipeline names and checks its health, all at once; the error names each
/// sink that failed.
pub async fn build_all(config: &Config) -> Result<BTreeMap<String, Arc<dyn Sink>>, String> {
    let used: std::collections::BTreeSet<&String> = config.pipelines.iter().flat_map(|p| &p.sinks).collect();
    let mut sinks = BTreeMap::new();
    let mut problems = Vec::new();
    for (name, c) in &config.sinks {
        if !used.contains(name) {
            tracing::warn!("sink {name:?} is configured but no pipeline names it; it hears nothing");
            continue;
        }
        match build(name, c).await {
            Ok(s) => {
                sinks.insert(name.clone(), s);
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    let checks = sinks.values().map(|s| async move {
        match tokio::time::timeout(HEALTH_TIMEOUT, s.health()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("{e}")),
            Err(_) => Err(format!("sink {:?}: no answer within {HEALTH_TIMEOUT:?}", s.name())),
        }
    });
    for r in futures::future::join_all(checks).await {
        if let Err(e) = r {
            problems.push(e);
        }
    }
    if problems.is_empty() {
        Ok(sinks)
    } else {
        Err(problems.join("; "))
    }
}
