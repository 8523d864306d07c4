//! Assembly of `acceld`: sinks, task database, workers, bus sources and the HTTP server, and
//! their orderly stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{router, AppState};
use crate::config::{Config, SourceConfig};
use crate::drivers::DriverError;
use crate::pipeline::metrics::TaskMetrics;
use crate::pipeline::tasks::{TaskStore, TaskStoreError};
use crate::pipeline::worker::WorkerOptions;
use crate::pipeline::{ConverterRunner, Plan, Router, Runner, Workers};
use crate::registry::{RegistryClient, RegistryError};
use crate::sinks::delivery::{Backoff, Delivery};
use crate::sources::{SourceContext, SourceError};
use crate::store::StoreError;

/// How long bus sources get to stop reading at shutdown.
const SOURCE_STOP: Duration = Duration::from_secs(10);

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
    #[error("sinks: {0}")]
    Sinks(String),
    #[error("{0}")]
    Source(#[from] SourceError),
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
    // Sinks first: one that cannot work stops acceld before it takes any event.
    let sinks = crate::sinks::build_all(&config).await.map_err(RunError::Sinks)?;
    let path = config.tasks.path.clone().unwrap_or_else(default_tasks_path);
    let store = tokio::task::spawn_blocking(move || TaskStore::open(&path))
        .await
        .map_err(|e| TaskStoreError::Db(format!("opening the task database stopped: {e}")))??;
    tracing::info!("task database: {}", store.path().display());
    let metrics = Arc::new(TaskMetrics::default());
    let delivery = Delivery::start(&config, store.clone(), sinks, metrics.clone(), Backoff::default());
    let workers = Workers::start(
        store,
        runner,
        router_,
        WorkerOptions::from_config(&config),
        metrics,
        Some(Arc::new(delivery.clone())),
        shutdown.clone(),
    )
    .await?;
    let ctx = SourceContext { workers: workers.clone(), shutdown: shutdown.clone() };
    let sources = match crate::sources::start_all(&config, &ctx).await {
        Ok(s) => s,
        Err(e) => {
            shutdown.cancel();
            workers.stop().await;
            delivery.stop().await;
            return Err(e.into());
        }
    };
    for name in sources.names() {
        tracing::info!(source = %name, "reading events");
    }
    let forward = match harbor_forward(&config).await {
        Ok(f) => f,
        Err(e) => {
            shutdown.cancel();
            sources.stop(SOURCE_STOP).await;
            workers.stop().await;
            delivery.stop().await;
            return Err(e.into());
        }
    };
    let app = router(AppState::with_forward(&config, workers.clone(), forward).with_sources(sources.statuses()).with_sinks(delivery.statuses())).into_make_service_with_connect_info::<SocketAddr>();
    let addr = listener.local_addr().map_err(RunError::Serve)?;
    tracing::info!("[API] HTTP server started on {addr}");
    let stop_http = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(async move { stop_http.cancelled().await }).await
    });

    shutdown.cancelled().await;
    tracing::info!("shutting down: no new work is taken; running conversions may finish");
    sources.stop(SOURCE_STOP).await;
    workers.stop().await;
    // Results of the conversions that finished in the grace period, while there is time.
    delivery.stop().await;
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
    drop(delivery);
    drop(ctx);
    if !store.close(HTTP_DRAIN).await {
        tracing::warn!("the task database was still in use when acceld stopped");
    }
    tracing::info!("stopped");
    Ok(())
}

/// The bus the Harbor source forwards webhooks to, when it is configured to.
async fn harbor_forward(config: &Config) -> Result<Option<Arc<dyn crate::sources::forward::Forward>>, SourceError> {
    let origin = Router::harbor_origin(config);
    match config.sources.get(&origin) {
        Some(SourceConfig::Harbor { forward: Some(f) }) => {
            let fw = crate::sources::forward::build(&origin, f).await?;
            tracing::info!(source = %origin, "Harbor webhooks are forwarded to {}", fw.target());
            Ok(Some(fw))
        }
        _ => Ok(None),
    }
}

fn default_tasks_path() -> PathBuf {
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("share")))
        .unwrap_or_else(std::env::temp_dir);
    data.join("accel").join("tasks.redb")
}
