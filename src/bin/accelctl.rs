//! `accelctl`: one-shot conversions (`convert`), config checks (`validate`) and acceld tasks
//! (`task create|list`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};

use accel::config::{Config, ConversionConfig};
use accel::drivers::DriverKind;
use accel::oci::{Platform, Reference};
use accel::pipeline::{BarProgress, Conversion, ConvertRequest, ConvertResult, Converter, LogProgress, Matcher, Progress, TargetNaming};
use accel::registry::RegistryClient;

#[derive(Parser)]
#[command(name = "accelctl", version = accel::VERSION, about = "Convert container images to lazily pullable formats")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pull an image, convert it, and push the result (no daemon needed).
    Convert(ConvertArgs),
    /// Check a config file and report every problem in it.
    Validate {
        /// Config file.
        #[arg(long, short, default_value = "pipelines.yaml")]
        config: PathBuf,
    },
    /// Create and list conversion tasks of a running acceld.
    Task(accel::api::cli::TaskArgs),
}

#[derive(Args)]
struct ConvertArgs {
    /// Config file (registries, credentials, store, pipelines). Optional.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Target format; repeat or separate with commas for several. Default: the conversions of
    /// the config's pipelines that match the image, else estargz.
    #[arg(long = "driver", short = 'd', value_delimiter = ',')]
    drivers: Vec<DriverKind>,
    /// Driver option KEY=VALUE, for every driver of the command (e.g. compression_level=6);
    /// DRIVER.KEY=VALUE applies to one driver only (e.g. estargz.chunk_size_bytes=1MiB).
    /// Repeatable.
    #[arg(long = "option", short = 'o', value_name = "KEY=VALUE")]
    options: Vec<String>,
    /// Tag suffix of the target (default per driver: -esgz for estargz).
    #[arg(long, allow_hyphen_values = true)]
    tag_suffix: Option<String>,
    /// Exact target reference (one driver only).
    #[arg(long)]
    target: Option<String>,
    /// Platform to convert from a multi-platform image (os/arch[/variant]); repeatable.
    /// Default: all.
    #[arg(long = "platform", value_delimiter = ',')]
    platforms: Vec<Platform>,
    /// Result format on standard output.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Image to convert: host/repository[:tag][@sha256:…].
    source: String,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    /// Also `table`, the name `accelctl task list` uses.
    #[value(alias = "table")]
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| accel::DEFAULT_LOG_FILTER.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Convert(args) => convert(args).await,
            Command::Validate { config } => validate(&config),
            Command::Task(args) => args.run().await.map_err(Into::into),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", accel::error_report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn validate(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    println!(
        "{}: ok ({}, {}, {})",
        path.display(),
        count(config.pipelines.len(), "pipeline"),
        count(config.sources.len(), "source"),
        count(config.sinks.len(), "sink")
    );
    Ok(())
}

async fn convert(args: ConvertArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let source: Reference = args.source.parse()?;
    let (conversions, platforms) = plan(&args, &config, &source)?;

    let registry = Arc::new(RegistryClient::new(&config)?);
    let store = accel::store::open(&config.store).await?;
    let progress: Arc<dyn Progress> = if std::io::stderr().is_terminal() {
        Arc::new(BarProgress::default())
    } else {
        Arc::new(LogProgress::default())
    };
    let converter = Converter::new(registry, store, progress);
    let request = ConvertRequest { source: source.clone(), conversions, platforms };
    let result = converter.convert(&request).await.with_context(|| format!("converting {source}"))?;
    print_result(&result, args.output)
}

/// The conversions to run: from `--driver`/`--option`/naming flags when given, else from the
/// config's pipelines matching the image, else one estargz conversion with defaults.
fn plan(args: &ConvertArgs, config: &Config, source: &Reference) -> anyhow::Result<(Vec<Conversion>, Vec<Platform>)> {
    let mut platforms = args.platforms.clone();
    let mut specs: Vec<ConversionConfig> = Vec::new();
    if args.drivers.is_empty() {
        for p in config.pipelines.iter().filter(|p| Matcher::new(p).matches(source)) {
            specs.extend(p.convert.iter().cloned());
            if args.platforms.is_empty() {
                platforms.extend(p.platforms.iter().cloned());
            }
        }
        if specs.is_empty() {
            specs.push(ConversionConfig::new(DriverKind::Estargz));
        }
    } else {
        let mut seen = std::collections::BTreeSet::new();
        for d in &args.drivers {
            if seen.insert(*d) {
                specs.push(ConversionConfig::new(*d));
            }
        }
    }
    apply_options(&mut specs, &args.options)?;
    if args.target.is_some() && specs.len() > 1 {
        bail!("--target names one image, but {} conversions were asked for; use --tag-suffix or one --driver", specs.len());
    }
    if args.tag_suffix.is_some() && specs.len() > 1 {
        bail!("--tag-suffix would give {} conversions the same target; use it with one --driver", specs.len());
    }
    if let Some(s) = &args.tag_suffix {
        if s.is_empty() {
            bail!("--tag-suffix is empty: the target would be the source's own tag; use --target to name another image");
        }
        accel::pipeline::naming::check_suffix(s).map_err(|why| anyhow::anyhow!("--tag-suffix {why}"))?;
    }
    specs
        .into_iter()
        .map(|spec| {
            let driver = spec.driver.build(&spec.options)?;
            let naming = match (&args.target, &args.tag_suffix) {
                (Some(t), _) => TargetNaming::Exact(t.parse().context("--target")?),
                (None, Some(s)) => TargetNaming::Suffix { suffix: s.clone(), repository: spec.repository.clone() },
                (None, None) => TargetNaming::from_config(&spec),
            };
            Ok(Conversion { driver, naming })
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .map(|c| (c, platforms))
}

/// Applies `KEY=VALUE` and `DRIVER.KEY=VALUE` options. Values are read as JSON when they parse
/// (numbers, booleans, lists), else as strings.
fn apply_options(specs: &mut [ConversionConfig], options: &[String]) -> anyhow::Result<()> {
    for opt in options {
        let (key, value) = opt.split_once('=').with_context(|| format!("--option {opt:?} is not KEY=VALUE"))?;
        let (only, key) = match key.split_once('.') {
            Some((d, k)) => (Some(d.parse::<DriverKind>()?), k),
            None => (None, key),
        };
        if key.is_empty() {
            bail!("--option {opt:?} has an empty key");
        }
        let value = serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
        let mut applied = false;
        for spec in specs.iter_mut().filter(|s| only.is_none_or(|d| d == s.driver)) {
            if !spec.options.is_object() {
                spec.options = serde_json::json!({});
            }
            spec.options[key] = value.clone();
            applied = true;
        }
        if !applied {
            bail!("--option {opt:?} names a driver that is not being run");
        }
    }
    Ok(())
}

fn print_result(result: &ConvertResult, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string(result)?),
        Output::Text => {
            // A source named by digest carries it already.
            match result.source.digest() {
                Some(_) => println!("source  {}", result.source),
                None => println!("source  {}@{}", result.source, result.source_digest),
            }
            for t in &result.targets {
                println!("{:<8}{}@{}  ({} bytes)", t.driver.as_str(), t.reference, t.digest, t.size);
            }
        }
    }
    Ok(())
}
