//! Progress of a conversion: log lines for services and pipes, a bar on a terminal.

use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

use crate::oci::{Digest, Reference};

/// Stages named as the acceleration service logs them, so existing log searches keep working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Pulling,
    Pulled,
    Converting,
    Converted,
    Pushing,
    Pushed,
}

impl Stage {
    fn verb(self) -> &'static str {
        match self {
            Stage::Pulling => "pulling image",
            Stage::Pulled => "pulled image",
            Stage::Converting => "converting image",
            Stage::Converted => "converted image",
            Stage::Pushing => "pushing image",
            Stage::Pushed => "pushed image",
        }
    }
}

pub trait Progress: Send + Sync {
    /// A stage of the whole image started or ended.
    fn stage(&self, stage: Stage, reference: &Reference);
    /// `steps` more units of work are known (a layer to pull, convert or push).
    fn add_steps(&self, steps: u64);
    /// One unit of work finished; `what` says which, for the log.
    fn step_done(&self, what: &str);
    /// A source layer was decoded (decompressed and hashed): `bytes` of tar, measured as read,
    /// fed to `drivers` drivers at once. Called once per decoding, for counting; the default
    /// does nothing.
    fn layer_decoded(&self, layer: &Digest, bytes: u64, drivers: usize) {
        let _ = (layer, bytes, drivers);
    }
}

/// Log lines only: stages at info, each finished step at info with a running number. No total
/// is shown: blobs to push become known only as layers are converted, so it would keep growing.
#[derive(Default)]
pub struct LogProgress {
    done: AtomicU64,
}

impl Progress for LogProgress {
    fn stage(&self, stage: Stage, reference: &Reference) {
        tracing::info!(module = %"converter", "{} {}", stage.verb(), reference);
    }
    fn add_steps(&self, _steps: u64) {}
    fn step_done(&self, what: &str) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(module = %"converter", "[{done}] {what}");
    }
    fn layer_decoded(&self, layer: &Digest, bytes: u64, drivers: usize) {
        tracing::debug!(module = %"converter", %layer, bytes, drivers, "decoded source layer once for every driver");
    }
}

/// A progress bar on standard error, for interactive use.
pub struct BarProgress {
    bar: ProgressBar,
}

impl Default for BarProgress {
    fn default() -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {wide_msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        BarProgress { bar }
    }
}

impl Progress for BarProgress {
    fn stage(&self, stage: Stage, reference: &Reference) {
        self.bar.println(format!("{} {}", stage.verb(), reference));
    }
    fn add_steps(&self, steps: u64) {
        self.bar.inc_length(steps);
    }
    fn step_done(&self, what: &str) {
        self.bar.set_message(what.to_string());
        self.bar.inc(1);
    }
}

impl Drop for BarProgress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
