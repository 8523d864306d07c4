//! The `stdout` sink: one JSON result per line on standard output (acceld logs to standard
//! error, so the two stay apart).

use std::io::Write;

use async_trait::async_trait;

use super::{ResultEvent, Sink, SinkError};

pub struct StdoutSink {
    name: String,
}

impl StdoutSink {
    pub fn new(name: &str) -> Self {
        StdoutSink { name: name.into() }
    }
}

#[async_trait]
impl Sink for StdoutSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn health(&self) -> Result<(), SinkError> {
        Ok(())
    }

    async fn send(&self, event: &ResultEvent) -> Result<(), SinkError> {
        let mut line = event.to_json();
        line.push(b'\n');
        // A slow reader of the pipe must not hold an executor thread.
        let r = tokio::task::spawn_blocking(move || {
            let mut out = std::io::stdout().lock();
            out.write_all(&line)?;
            out.flush()
        })
        .await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SinkError::Unavailable { sink: self.name.clone(), why: format!("cannot write to standard output: {e}") }),
            Err(e) => Err(SinkError::Unavailable { sink: self.name.clone(), why: format!("writer stopped: {e}") }),
        }
    }
}
