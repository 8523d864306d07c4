//! Registry polling, for registries that send no webhooks: on an interval, list the watched
//! repositories and their tags, find new tags and tags moved to another digest, and hand them
//! to the workers as events.
//!
//! What was handed over is recorded in a state file only after the workers stored the tasks, so
//! a crash between the two hands a change over again (the task store deduplicates it) instead
//! of losing it. Registry failures back off exponentially; a failing repository does not stop
//! the others.

mod config;
mod diff;
mod metrics;
mod state;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use config::{Initial, PollSourceConfig};
pub use diff::{diff, is_glob, jittered, Backoff, Change, Diff, RepoSelector, TagFilter};
pub use metrics::{PollMetrics, Stage};
pub use state::{RepoState, RepoUpdate, SeenStore, StateError};

use crate::config::Config;
use crate::oci::{annotations, Digest, Reference};
use crate::pipeline::metrics::TaskMetrics;
use crate::pipeline::worker::{Accepted, SubmitError};
use crate::pipeline::{Event, Workers};
use crate::registry::{RegistryClient, RegistryError};

/// Events handed to the workers in one call; a full queue then stops the round early without
/// holding back much.
const SUBMIT_BATCH: usize = 16;

/// Where a poll source hands its events. The daemon passes its [`Workers`].
#[async_trait]
pub trait Submit: Send + Sync + 'static {
    /// Stores the events' tasks durably; `Ok` means they will be converted.
    async fn submit(&self, events: &[Event]) -> Result<Accepted, SubmitError>;
}

#[async_trait]
impl Submit for Workers {
    async fn submit(&self, events: &[Event]) -> Result<Accepted, SubmitError> {
        self.accept(events).await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("sources.{name}: {why}")]
    Config { name: String, why: String },
    #[error("sources.{name}: {error}")]
    State { name: String, error: StateError },
}

/// Why a round ended early.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    /// The registry as a whole failed (unreachable, overloaded, refusing every request).
    #[error("{0}")]
    Registry(RegistryError),
    #[error("{0}")]
    State(StateError),
    /// Shutdown, or the workers stopped taking events.
    #[error("stopped")]
    Stopped,
}

impl From<StateError> for RoundError {
    fn from(e: StateError) -> Self {
        RoundError::State(e)
    }
}

/// Whether a failure concerns the registry as a whole rather than one repository: polling
/// other repositories in the same round would only fail the same way.
fn is_registry_wide(e: &RegistryError) -> bool {
    match e {
        RegistryError::Connect { .. }
        | RegistryError::Timeout { .. }
        | RegistryError::Transport { .. }
        | RegistryError::Tls { .. }
        | RegistryError::Credentials { .. }
        | RegistryError::DockerConfig { .. }
        | RegistryError::Client(_) => true,
        RegistryError::Status { status, .. } => matches!(status.as_u16(), 429 | 502 | 503 | 504),
        _ => false,
    }
}

/// The state file of source `name` when the config does not set one: next to the task
/// database.
pub fn default_state_path(tasks_path: &Path, name: &str) -> PathBuf {
    let safe: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    tasks_path.parent().unwrap_or(Path::new(".")).join(format!("poll-{safe}.redb"))
}

/// Target tag suffixes of every configured conversion: tags ending in one are outputs.
pub fn output_suffixes(config: &Config) -> Vec<String> {
    let mut s: Vec<String> = config
        .pipelines
        .iter()
        .flat_map(|p| p.convert.iter().map(|c| c.tag_suffix().to_string()))
        .filter(|s| !s.is_empty())
        .collect();
    s.sort();
    s.dedup();
    s
}

/// One poll source, ready to run.
pub struct Poller {
    name: String,
    config: PollSourceConfig,
    registry: Arc<RegistryClient>,
    state: SeenStore,
    repos: RepoSelector,
    tags: TagFilter,
    submit: Arc<dyn Submit>,
    metrics: Arc<TaskMetrics>,
    failures: Backoff,
    catalog_backoff: (Backoff, Option<Instant>),
    repo_backoff: HashMap<String, (Backoff, Instant)>,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller").field("name", &self.name).field("registry", &self.config.registry).finish_non_exhaustive()
    }
}

impl Poller {
    /// Opens the source's state file (`state_path` or `default_state`) and compiles its
    /// patterns. `suffixes` are the configured target tag suffixes.
    pub fn new(
        name: &str,
        config: PollSourceConfig,
        default_state: PathBuf,
        suffixes: Vec<String>,
        registry: Arc<RegistryClient>,
        submit: Arc<dyn Submit>,
        metrics: Arc<TaskMetrics>,
    ) -> Result<Poller, PollError> {
        let bad = |why: String| PollError::Config { name: name.to_string(), why };
        let repos = RepoSelector::new(&config.repositories).map_err(|e| bad(format!("repositories: {e}")))?;
        let tags = TagFilter::new(&config.tags, suffixes).map_err(|e| bad(format!("tags: {e}")))?;
        let path = config.state_path.clone().unwrap_or(default_state);
        let state = SeenStore::open(&path, &config.registry).map_err(|error| PollError::State { name: name.to_string(), error })?;
        Ok(Poller {
            name: name.to_string(),
            config,
            registry,
            state,
            repos,
            tags,
            submit,
            metrics,
            failures: Backoff::default(),
            catalog_backoff: (Backoff::default(), None),
            repo_backoff: HashMap::new(),
        })
    }

    pub fn state_path(&self) -> &Path {
        self.state.path()
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(self.config.interval_secs.max(1))
    }

    fn backoff_max(&self) -> Duration {
        Duration::from_secs(self.config.backoff_max_secs.max(1))
    }

    /// Polls until `shutdown` is cancelled. The first round starts at once.
    pub async fn run(&mut self, shutdown: &CancellationToken) {
        tracing::info!(
            source = %self.name,
            "polling {} every {}s for {} (state: {})",
            self.config.registry,
            self.config.interval_secs,
            self.config.repositories.join(", "),
            self.state.path().display()
        );
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            let round = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.round(shutdown) => r,
            };
            wait = match round {
                Ok(watched) => {
                    let before = self.failures.succeeded();
                    if before > 0 {
                        tracing::info!(source = %self.name, "registry {} answers again after {before} failed polls", self.config.registry);
                    }
                    self.metrics.poll().round_ok(&self.name, watched);
                    jittered(self.interval(), random_unit())
                }
                Err(RoundError::Registry(e)) => {
                    let wait = jittered(self.failures.failed(self.interval(), self.backoff_max()), random_unit());
                    self.metrics.poll().error(&self.name, Stage::Registry);
                    self.metrics.poll().round_failed(&self.name, wait);
                    tracing::warn!(
                        source = %self.name,
                        failures = self.failures.failures(),
                        "polling {} failed: {e}; trying again in {:.1}s",
                        self.config.registry,
                        wait.as_secs_f64()
                    );
                    wait
                }
                Err(RoundError::State(e)) => {
                    let wait = jittered(self.failures.failed(self.interval(), self.backoff_max()), random_unit());
                    self.metrics.poll().error(&self.name, Stage::State);
                    self.metrics.poll().round_failed(&self.name, wait);
                    tracing::error!(source = %self.name, "{e}; trying again in {:.1}s", wait.as_secs_f64());
                    wait
                }
                Err(RoundError::Stopped) => break,
            };
        }
        tracing::info!(source = %self.name, "stopped polling {}", self.config.registry);
    }

    /// One look at every watched repository, as each interval runs it. Returns how many were
    /// watched. Failures of single repositories are logged and backed off, not returned.
    pub async fn poll_once(&mut self) -> Result<usize, RoundError> {
        self.round(&CancellationToken::new()).await
    }

    async fn round(&mut self, shutdown: &CancellationToken) -> Result<usize, RoundError> {
        let catalog = self.list_catalog().await?;
        // Without the catalog, repositories it would have added are unknown: none is forgotten.
        let complete = !self.repos.needs_catalog() || catalog.is_some();
        let watched = self.repos.select(catalog.iter().flatten());
        let state = self.state.clone();
        if complete {
            let recorded = blocking(move || state.repositories()).await?;
            let gone: Vec<RepoUpdate> = recorded
                .into_iter()
                .filter(|r| !watched.contains(r))
                .map(|r| RepoUpdate { repository: r, forget_repository: true, ..Default::default() })
                .collect();
            if !gone.is_empty() {
                tracing::info!(source = %self.name, "no longer watching {} (deleted or unmatched); forgetting their tags", names(&gone));
                let state = self.state.clone();
                blocking(move || state.apply(&gone)).await?;
            }
            let state = self.state.clone();
            if !blocking(move || state.started()).await? {
                let present: Vec<String> = watched.iter().cloned().collect();
                let state = self.state.clone();
                blocking(move || state.start(&present)).await?;
            }
        }
        let now = Instant::now();
        for repo in &watched {
            if shutdown.is_cancelled() {
                return Err(RoundError::Stopped);
            }
            if self.repo_backoff.get(repo).is_some_and(|(_, until)| now < *until) {
                continue;
            }
            self.poll_repository(repo).await?;
        }
        Ok(watched.len())
    }

    /// The catalog, when the patterns need it and it is not backing off; `None` when it could
    /// not be listed (logged).
    async fn list_catalog(&mut self) -> Result<Option<Vec<String>>, RoundError> {
        if !self.repos.needs_catalog() {
            return Ok(None);
        }
        if self.catalog_backoff.1.is_some_and(|until| Instant::now() < until) {
            return Ok(None);
        }
        match self.registry.catalog(&self.config.registry, self.config.page_size).await {
            Ok(c) => {
                self.catalog_backoff = (Backoff::default(), None);
                Ok(Some(c))
            }
            Err(e) if is_registry_wide(&e) => Err(RoundError::Registry(e)),
            Err(e) => {
                let wait = self.catalog_backoff.0.failed(self.interval(), self.backoff_max());
                self.catalog_backoff.1 = Some(Instant::now() + wait);
                self.metrics.poll().error(&self.name, Stage::Catalog);
                tracing::warn!(
                    source = %self.name,
                    "{e}; repositories named without globs are still polled; listing again in {}s",
                    wait.as_secs()
                );
                Ok(None)
            }
        }
    }

    fn repo_failed(&mut self, repo: &str, stage: Stage, e: &RegistryError) {
        let (interval, max) = (self.interval(), self.backoff_max());
        let entry = self.repo_backoff.entry(repo.to_string()).or_insert_with(|| (Backoff::default(), Instant::now()));
        let wait = entry.0.failed(interval, max);
        entry.1 = Instant::now() + wait;
        self.metrics.poll().error(&self.name, stage);
        tracing::warn!(source = %self.name, repository = %repo, "{e}; polling {repo} again in {}s, the other repositories go on", wait.as_secs());
    }

    async fn poll_repository(&mut self, repo: &str) -> Result<(), RoundError> {
        let base: Reference = match format!("{}/{repo}", self.config.registry).parse() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(source = %self.name, "skipping repository {repo:?}: {e}");
                return Ok(());
            }
        };
        let listed = match self.registry.list_tags(&base, self.config.page_size).await {
            Ok(t) => t,
            Err(e) if e.is_not_found() => {
                let state = self.state.clone();
                let r = repo.to_string();
                if blocking(move || state.repository(&r)).await?.is_some() {
                    tracing::info!(source = %self.name, "repository {} is gone; forgetting its tags", base.name());
                }
                self.repo_backoff.remove(repo);
                let update = RepoUpdate { repository: repo.to_string(), forget_repository: true, ..Default::default() };
                let state = self.state.clone();
                blocking(move || state.apply(&[update])).await?;
                return Ok(());
            }
            Err(e) if is_registry_wide(&e) => return Err(RoundError::Registry(e)),
            Err(e) => {
                self.repo_failed(repo, Stage::Tags, &e);
                return Ok(());
            }
        };
        let mut wanted = Vec::new();
        for tag in listed.into_iter().filter(|t| self.tags.wants(t)) {
            match base.with_tag(&tag) {
                Ok(r) => wanted.push((tag, r)),
                Err(e) => tracing::warn!(source = %self.name, "skipping a tag the registry listed: {e}"),
            }
        }
        let registry = self.registry.clone();
        let mut checks = futures::stream::iter(wanted)
            .map(|(tag, r)| {
                let registry = registry.clone();
                async move { (tag, registry.manifest_digest(&r).await) }
            })
            .buffer_unordered(self.config.concurrent_requests.max(1));
        let mut now = BTreeMap::new();
        let mut failure = None;
        while let Some((tag, result)) = checks.next().await {
            match result {
                Ok(Some(d)) => {
                    now.insert(tag, d);
                }
                // Deleted between the list and the check.
                Ok(None) => {}
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        drop(checks);
        if let Some(e) = failure {
            if is_registry_wide(&e) {
                return Err(RoundError::Registry(e));
            }
            self.repo_failed(repo, Stage::Manifest, &e);
            return Ok(());
        }
        if let Some((b, _)) = self.repo_backoff.remove(repo) {
            tracing::info!(source = %self.name, "repository {} answers again after {} failed polls", base.name(), b.failures());
        }

        let state = self.state.clone();
        let r = repo.to_string();
        let (recorded, seen) = blocking(move || Ok((state.repository(&r)?, state.tags(&r)?))).await?;
        let d = diff(&seen, &now);
        let baseline = match recorded {
            Some(RepoState::Tracked) => false,
            // Present at the first look (or the first look is not complete yet).
            Some(RepoState::Pending) => self.config.initial == Initial::None,
            None => {
                let state = self.state.clone();
                !blocking(move || state.started()).await? && self.config.initial == Initial::None
            }
        };
        if baseline {
            tracing::info!(
                source = %self.name,
                "first look at {}: {} existing tags recorded as seen, not converted (initial: none; `initial: all` converts them)",
                base.name(),
                now.len()
            );
            let update = RepoUpdate { repository: repo.to_string(), seen: now.into_iter().collect(), forget: d.gone, tracked: true, ..Default::default() };
            let state = self.state.clone();
            blocking(move || state.apply(&[update])).await?;
            return Ok(());
        }
        if !d.gone.is_empty() || recorded != Some(RepoState::Tracked) {
            if !d.gone.is_empty() {
                tracing::info!(source = %self.name, "{}: tags {} are gone; forgotten", base.name(), d.gone.join(", "));
            }
            let update = RepoUpdate { repository: repo.to_string(), forget: d.gone.clone(), tracked: true, ..Default::default() };
            let state = self.state.clone();
            blocking(move || state.apply(&[update])).await?;
        }
        self.hand_over(repo, &base, d.changed).await
    }

    /// Turns changed tags into events and hands them to the workers in batches, recording each
    /// batch as seen once the workers accepted it.
    async fn hand_over(&mut self, repo: &str, base: &Reference, changed: Vec<(String, Digest, Change)>) -> Result<(), RoundError> {
        let mut events = Vec::new();
        let mut outputs = Vec::new();
        for (tag, digest, change) in changed {
            let reference = match base.with_tag(&tag) {
                Ok(r) => r.with_digest(digest.clone()),
                Err(_) => continue,
            };
            match self.is_conversion_output(&reference).await {
                Ok(true) => {
                    tracing::debug!(source = %self.name, "{reference} is a conversion output; not converting it");
                    self.metrics.poll().skipped_output(&self.name);
                    outputs.push((tag, digest));
                    continue;
                }
                Ok(false) => {}
                Err(e) if is_registry_wide(&e) => return Err(RoundError::Registry(e)),
                // The worker fetches the manifest again and reports what is wrong with it.
                Err(e) => tracing::debug!(source = %self.name, "cannot read {reference} to check whether it is a conversion output: {e}"),
            }
            match &change {
                Change::New => tracing::info!(source = %self.name, "new tag {reference}"),
                Change::Moved { from } => tracing::info!(source = %self.name, "tag {reference} was pushed again (it was {from})"),
            }
            let kind = if change == Change::New { "new" } else { "moved" };
            events.push((Event::new(reference, self.name.clone()), tag, digest, kind));
        }
        if !outputs.is_empty() {
            let update = RepoUpdate { repository: repo.to_string(), seen: outputs, ..Default::default() };
            let state = self.state.clone();
            blocking(move || state.apply(&[update])).await?;
        }
        for batch in events.chunks(SUBMIT_BATCH) {
            let list: Vec<Event> = batch.iter().map(|(e, ..)| e.clone()).collect();
            match self.submit.submit(&list).await {
                Ok(_) => {
                    for (.., kind) in batch {
                        self.metrics.poll().event(&self.name, kind);
                    }
                    let seen = batch.iter().map(|(_, tag, digest, _)| (tag.clone(), digest.clone())).collect();
                    let update = RepoUpdate { repository: repo.to_string(), seen, ..Default::default() };
                    let state = self.state.clone();
                    blocking(move || state.apply(&[update])).await?;
                }
                Err(SubmitError::ShuttingDown) => return Err(RoundError::Stopped),
                Err(e) => {
                    self.metrics.poll().error(&self.name, Stage::Submit);
                    tracing::warn!(source = %self.name, "{e}; the changes of {} not handed over yet are retried at the next poll", base.name());
                    break;
                }
            }
        }
        Ok(())
    }

    /// Whether the manifest carries the annotation conversions put on their outputs.
    async fn is_conversion_output(&self, reference: &Reference) -> Result<bool, RegistryError> {
        let m = self.registry.get_manifest(reference).await?;
        let doc: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap_or_default();
        Ok(doc.get("annotations").and_then(|a| a.get(annotations::SOURCE_DIGEST)).is_some())
    }
}

fn names(updates: &[RepoUpdate]) -> String {
    updates.iter().map(|u| u.repository.as_str()).collect::<Vec<_>>().join(", ")
}

/// A number in `[0, 1)` for jitter; no need for a seeded generator.
fn random_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() & ((1u128 << 53) - 1)) as f64 / (1u64 << 53) as f64
}

/// Runs a state file call off the executor threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, StateError> + Send + 'static) -> Result<T, RoundError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(RoundError::State),
        Err(e) => Err(RoundError::State(StateError::Db { path: PathBuf::new(), why: format!("state call stopped: {e}") })),
    }
}

/// A poll source as the daemon runs it, next to the bus sources.
pub struct PollSource {
    name: String,
    poller: tokio::sync::Mutex<Poller>,
}

impl PollSource {
    /// Opens the state file and prepares the registry client of source `name`. Needs the whole
    /// config: registry credentials and the target suffixes of every pipeline. The state file
    /// defaults to `poll-<name>.redb` beside the task database.
    pub async fn build(
        name: &str,
        c: &PollSourceConfig,
        config: &Config,
        ctx: &super::SourceContext,
    ) -> Result<(Arc<dyn super::Source>, super::Inbox), super::SourceError> {
        let setup = |why: String| super::SourceError::Setup { source_name: name.to_string(), why };
        let registry = Arc::new(RegistryClient::new(config).map_err(|e| setup(e.to_string()))?);
        let default_state = default_state_path(ctx.workers.store().path(), name);
        let submit: Arc<dyn Submit> = Arc::new(ctx.workers.clone());
        let metrics = ctx.workers.metrics().clone();
        let (n, c, suffixes) = (name.to_string(), c.clone(), output_suffixes(config));
        let poller = tokio::task::spawn_blocking(move || Poller::new(&n, c, default_state, suffixes, registry, submit, metrics))
            .await
            .map_err(|e| setup(format!("opening the poll state stopped: {e}")))?
            .map_err(|e| setup(e.to_string()))?;
        let source = PollSource { name: name.to_string(), poller: tokio::sync::Mutex::new(poller) };
        let inbox = super::Inbox::new(name, ctx.workers.clone(), None, ctx.shutdown.clone());
        Ok((Arc::new(source), inbox))
    }
}

#[async_trait]
impl super::Source for PollSource {
    fn name(&self) -> &str {
        &self.name
    }

    /// Polls until shutdown; registry failures are backed off inside, never returned.
    async fn run(&self, _inbox: &super::Inbox, shutdown: &CancellationToken) -> Result<(), super::SourceError> {
        self.poller.lock().await.run(shutdown).await;
        Ok(())
    }
}
