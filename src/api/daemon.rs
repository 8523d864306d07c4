//! Assembly of `acceld`: task database, workers and the HTTP server, and their orderly stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{router, AppState};
use crate::config::Config;
use crate::drivers::DriverError;
use crate::pipeline::metrics::TaskMetrics;
use crate::pipeline::tasks::{TaskStore, TaskStoreError};
use crate::pipeline::worker::WorkerOptions;
use crate::pipeline::{ConverterRunner, Plan, Router, Runner, Workers};
use crate::registry::{RegistryClient, RegistryError};
use crate::sources::poll::{self, PollError, PollMetrics};
use crate::store::StoreError;

/// How long requests still open after the workers stopped get to finish.
const HTTP_DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("registry client: {0}")]
    Registry(#[from] RegistryError),
    #[error("content store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Tasks(#[from] TaskStoreError),
    #[error("pipeline: {0}")]
    Driver(#[from] DriverError),
    #[error("cannot listen on {addr} (server.listen): {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
    #[error("{0}")]
    Poll(#[from] PollError),
}

/// Runs `acceld` until `shutdown` is cancelled: resumes unfinished tasks, serves the API on
/// `server.listen`, converts with the registry client and content store of the config.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let registry = Arc::new(RegistryClient::new(&config)?);
    let store = crate::store::open(&config.store).await?;
    let runner: Arc<dyn Runner> = Arc::new(ConverterRunner::new(registry, store));
    let listener = TcpListener::bind(&config.server.listen)
        .await
        .map_err(|source| RunError::Bind { addr: config.server.listen.clone(), source })?;
    serve(config, runner, listener, shutdown).await
}

/// Like [`run`], with the conversion work and the listening socket given.
pub async fn serve(config: Config, runner: Arc<dyn Runner>, listener: TcpListener, shutdown: CancellationToken) -> Result<(), RunError> {
    let plans = Plan::all(&config)?;
    if plans.is_empty() {
        tracing::warn!("the config has no pipelines: events are accepted but nothing is converted");
    }
    let router_ = Router::new(&config, plans);
    let path = config.tasks.path.clone().unwrap_or_else(default_tasks_path);
    let open_path = path.clone();
    let store = tokio::task::spawn_blocking(move || TaskStore::open(&open_path))
        .await
        .map_err(|e| TaskStoreError::Db(format!("opening the task database stopped: {e}")))??;
    tracing::info!("task database: {}", store.path().display());
    let workers = Workers::start(
        store,
        runner,
        router_,
        WorkerOptions::from_config(&config),
        Arc::new(TaskMetrics::default()),
        shutdown.clone(),
    )
    .await?;
    let poll_metrics = Arc::new(PollMetrics::default());
    let pollers = match poll::start_all(&config, &path, Arc::new(workers.clone()), poll_metrics.clone(), shutdown.clone()).await {
        Ok(p) => p,
        Err(e) => {
            shutdown.cancel();
            workers.stop().await;
            return Err(e.into());
        }
    };
    let app = router(AppState::new(&config, workers.clone()).with_poll_metrics(poll_metrics))
        .into_make_service_with_connect_info::<SocketAddr>();
    let addr = listener.local_addr().map_err(RunError::Serve)?;
    tracing::info!("[API] HTTP server started on {addr}");
    let stop_http = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(async move { stop_http.cancelled().await }).await
    });

    shutdown.cancelled().await;
    tracing::info!("shutting down: no new work is taken; running conversions may finish");
    pollers.join().await;
    workers.stop().await;
    // Requests waiting for a task that did not finish have been answered by now.
    match tokio::time::timeout(HTTP_DRAIN, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(RunError::Serve(e)),
        Ok(Err(e)) => return Err(RunError::Serve(std::io::Error::other(e.to_string()))),
        Err(_) => tracing::warn!("some API connections were still open after {HTTP_DRAIN:?}; closing them"),
    }
    // Closed before returning, so the same database can be opened again at once.
    let store = workers.store().clone();
    drop(workers);
    if !store.close(HTTP_DRAIN).await {
        tracing::warn!("the task database was still in use when acceld stopped");
    }
    tracing::info!("stopped");
    Ok(())
}

fn default_tasks_path() -> PathBuf {
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("share")))
        .unwrap_or_else(std::env::temp_dir);
    data.join("accel").join("tasks.redb")
}
