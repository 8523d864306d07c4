//! The `file` sink: one JSON result per line, appended to a file and synced before the result
//! counts as delivered.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{ResultEvent, Sink, SinkError};
use crate::config::FileSinkConfig;

pub struct FileSink {
    name: String,
    path: PathBuf,
    /// Opened on first use (or by the health check) and kept.
    file: Arc<Mutex<Option<std::fs::File>>>,
}

impl FileSink {
    pub fn new(name: &str, c: &FileSinkConfig) -> Self {
        FileSink { name: name.into(), path: c.path.clone(), file: Arc::new(Mutex::new(None)) }
    }

    fn err(&self, why: String) -> SinkError {
        SinkError::Unavailable { sink: self.name.clone(), why }
    }

    async fn with_file(&self, line: Option<Vec<u8>>) -> Result<(), SinkError> {
        let (path, file) = (self.path.clone(), self.file.clone());
        let r = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let mut slot = file.lock().unwrap();
            if slot.is_none() {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create directory {}: {e}", dir.display()))?;
                }
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| format!("cannot open {} for appending: {e}", path.display()))?;
                *slot = Some(f);
            }
            if let Some(line) = line {
                let f = slot.as_mut().expect("opened above");
                let written = f.write_all(&line).and_then(|_| f.sync_data());
                if let Err(e) = written {
                    // Reopened next time: the file may have been rotated or its disk replaced.
                    *slot = None;
                    return Err(format!("cannot append to {}: {e}", path.display()));
                }
            }
            Ok(())
        })
        .await;
        match r {
            Ok(r) => r.map_err(|why| self.err(why)),
            Err(e) => Err(self.err(format!("writer stopped: {e}"))),
        }
    }
}

#[async_trait]
impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn health(&self) -> Result<(), SinkError> {
        self.with_file(None).await
    }

    async fn send(&self, event: &ResultEvent) -> Result<(), SinkError> {
        let mut line = event.to_json();
        line.push(b'\n');
        self.with_file(Some(line)).await
    }
}
