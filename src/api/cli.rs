//! `accelctl task create|list`: command-line arguments and output over [`ApiClient`].

use std::io::Write;

use clap::{Args, Subcommand, ValueEnum};

use super::client::{ApiClient, ClientError};
use super::types::{CreateResponse, TaskView};
use crate::config::Secret;
use crate::oci::{Reference, ReferenceError};
use crate::pipeline::tasks::TaskStatus;

#[derive(Args, Debug)]
pub struct TaskArgs {
    /// Address of acceld's API.
    #[arg(long, env = "ACCEL_ADDR", default_value = "http://127.0.0.1:2077", global = true)]
    pub addr: String,
    /// Authorization header value acceld requires (server.auth_header).
    #[arg(long, env = "ACCEL_AUTH_HEADER", hide_env_values = true, global = true)]
    pub auth_header: Option<String>,
    #[command(subcommand)]
    pub command: TaskCommand,
}

#[derive(Subcommand, Debug)]
pub enum TaskCommand {
    /// Ask acceld to convert an image.
    Create {
        /// Wait until the conversion is done and report its result.
        #[arg(long)]
        sync: bool,
        /// Image: host/repository[:tag][@sha256:…].
        reference: String,
    },
    /// List acceld's tasks.
    List {
        #[arg(long, value_enum, default_value_t = ListOutput::Table)]
        output: ListOutput,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ListOutput {
    /// Also `text`, the name `accelctl convert` uses.
    #[value(alias = "text")]
    Table,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum TaskCliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    #[error("{0}")]
    Failed(String),
}

impl TaskArgs {
    pub async fn run(self) -> Result<(), TaskCliError> {
        let client = ApiClient::new(&self.addr, self.auth_header.filter(|a| !a.is_empty()).map(Secret::new))?;
        let mut out = std::io::stdout().lock();
        match self.command {
            TaskCommand::Create { sync, reference } => {
                let reference: Reference = reference.parse()?;
                let resp = client.create(&reference, sync).await?;
                write_created(&mut out, &resp)?;
                let failed: Vec<&TaskView> = resp.tasks.iter().map(|t| &t.task).filter(|t| t.status == TaskStatus::Failed).collect();
                if let Some(t) = failed.first() {
                    return Err(TaskCliError::Failed(format!("task {} failed: {}", t.id, t.reason)));
                }
                if resp.tasks.is_empty() {
                    return Err(TaskCliError::Failed("no task was created".into()));
                }
            }
            TaskCommand::List { output } => {
                let tasks = client.list().await?;
                match output {
                    ListOutput::Json => writeln!(out, "{}", serde_json::to_string_pretty(&tasks).expect("tasks serialize"))?,
                    ListOutput::Table => write_table(&mut out, &tasks)?,
                }
            }
        }
        Ok(())
    }
}

fn write_created(out: &mut impl Write, resp: &CreateResponse) -> std::io::Result<()> {
    for t in &resp.tasks {
        let v = &t.task;
        let what = if t.duplicate { "existing task" } else { "task" };
        write!(out, "{what} {} ({}) {} {}", v.id, v.pipeline, v.status, v.source)?;
        if !v.reason.is_empty() {
            write!(out, ": {}", v.reason)?;
        }
        writeln!(out)?;
        for target in &v.targets {
            writeln!(out, "  {:<8} {}@{} ({} bytes)", target.driver, target.reference, target.digest, target.size)?;
        }
    }
    for s in &resp.skipped {
        writeln!(out, "skipped {}: {}", s.source, s.reason)?;
    }
    if let Some(i) = &resp.ignored {
        writeln!(out, "ignored: {i}")?;
    }
    Ok(())
}

fn write_table(out: &mut impl Write, tasks: &[TaskView]) -> std::io::Result<()> {
    let rows: Vec<[String; 6]> = tasks
        .iter()
        .map(|t| {
            let detail = if t.status == TaskStatus::Failed || t.targets.is_empty() {
                t.reason.clone()
            } else {
                t.targets.iter().map(|x| x.reference.clone()).collect::<Vec<_>>().join(", ")
            };
            [
                t.id.to_string(),
                t.created.format("%Y-%m-%d %H:%M:%S").to_string(),
                t.status.to_string(),
                t.pipeline.clone(),
                t.source.clone(),
                detail,
            ]
        })
        .collect();
    let header = ["ID", "CREATED", "STATUS", "PIPELINE", "SOURCE", "TARGETS / REASON"];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: &[&str]| -> std::io::Result<()> {
        let last = cells.len() - 1;
        for (i, c) in cells.iter().enumerate() {
            if i == last {
                writeln!(out, "{c}")?;
            } else {
                write!(out, "{c:<w$}  ", w = widths[i])?;
            }
        }
        Ok(())
    };
    line(out, &header)?;
    for r in &rows {
        line(out, &r.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t: TaskView = serde_json::from_value(serde_json::json!({
            "id": "0190e1d2-3b4c-7d5e-8f60-718293a4b5c6", "created": "2026-01-02T03:04:05Z", "finished": null,
            "source": "h.io/a:1", "source_size": 0, "target_size": 0, "status": "FAILED", "reason": "boom",
            "pipeline": "p"
        }))
        .unwrap();
        let mut buf = Vec::new();
        write_table(&mut buf, &[t]).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].find("STATUS"), lines[1].find("FAILED"));
        assert!(lines[1].ends_with("boom"));
    }
}
