//! Load client for `acceld` reading a bus: publishes distinct push events into a JetStream
//! stream (or a Kafka topic, with `--kafka`) and times them until their results arrive on a
//! NATS subject (or a Kafka topic), with every result checked. `bench/bus.sh` runs it against
//! `acceld`, a `nats-server -js` and a `docker-registry`; `bench/kafka.sh` against the `tansu`
//! Kafka broker instead.
//!
//! ```sh
//! bus_load --registry 127.0.0.1:5000 --setup-only          # push the already-converted image
//! bus_load --nats nats://127.0.0.1:4222 --registry 127.0.0.1:5000 --events 20000
//! bus_load --kafka 127.0.0.1:9092 --subject images --results results --registry 127.0.0.1:5000
//! ```
//!
//! Every event names the same image, which is already a conversion output (its manifest
//! carries `io.accel.source.digest`), under a tag of its own. So each event becomes a task of
//! its own that resolves the image, finds nothing to convert and finishes: what is measured is
//! the bus source, the task database, the workers and the sink, without the conversion itself.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

#[derive(Parser)]
struct Args {
    /// NATS server.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Kafka brokers: publish to the topic `--subject` and read results from the topic
    /// `--results` instead of NATS.
    #[arg(long)]
    kafka: Option<String>,
    /// Subject events are published to (a subject of acceld's JetStream source), or topic.
    #[arg(long, default_value = "bench.images")]
    subject: String,
    /// Subject of acceld's `nats` sink, or topic of its `kafka` sink.
    #[arg(long, default_value = "bench.results")]
    results: String,
    /// Registry host the image is pushed to and the events name.
    #[arg(long)]
    registry: String,
    /// Repository of the image.
    #[arg(long, default_value = "bench/converted")]
    repository: String,
    /// Events to publish.
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    /// Publishes awaiting JetStream's acknowledgement at once.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Distinguishes the tags of this run from earlier runs against the same database.
    #[arg(long, default_value = "run")]
    run_id: String,
    /// Longest wait for all results.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Only push the image, print its digest and exit.
    #[arg(long)]
    setup_only: bool,
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Pushes a one-layer image whose manifest says it is a conversion output; returns its digest.
async fn push_converted(args: &Args) -> Result<String> {
    let http = reqwest::Client::new();
    let base = format!("http://{}/v2/{}", args.registry, args.repository);
    let layer = {
        let mut tar = vec![0u8; 1024]; // an empty tar: two zero blocks
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &tar)?;
        tar = gz.finish()?;
        tar
    };
    let diff_id = sha256(&[0u8; 1024]);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": { "type": "layers", "diff_ids": [diff_id] }
    }))?;
    for blob in [&layer, &config] {
        let digest = sha256(blob);
        // An upload session, then its content in one PUT.
        let r = http.post(format!("{base}/blobs/uploads/")).send().await?;
        let location = r.headers().get("location").and_then(|l| l.to_str().ok()).map(str::to_string);
        let Some(location) = location.filter(|_| r.status().is_success()) else {
            bail!("starting an upload: {} {}", r.status(), r.text().await.unwrap_or_default());
        };
        let url = if location.starts_with("http") { location } else { format!("http://{}{location}", args.registry) };
        let sep = if url.contains('?') { '&' } else { '?' };
        let r = http.put(format!("{url}{sep}digest={digest}")).body(blob.to_vec()).send().await?;
        if !r.status().is_success() {
            bail!("uploading {digest}: {} {}", r.status(), r.text().await.unwrap_or_default());
        }
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(&layer), "size": layer.len() }],
        "annotations": { accel::oci::annotations::SOURCE_DIGEST: sha256(b"the source this stands for") }
    }))?;
    let digest = sha256(&manifest);
    let r = http
        .put(format!("{base}/manifests/converted"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("pushing the manifest: {} {}", r.status(), r.text().await.unwrap_or_default());
    }
    Ok(digest)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Where events are published.
#[derive(Clone)]
enum Bus {
    JetStream(async_nats::jetstream::Context),
    Kafka(rdkafka::producer::FutureProducer),
}

type Ack = futures::future::BoxFuture<'static, Result<()>>;

impl Bus {
    async fn new(args: &Args) -> Result<Bus> {
        Ok(match &args.kafka {
            Some(brokers) => Bus::Kafka(
                rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", brokers)
                    .set("acks", "all")
                    .set("linger.ms", "5")
                    .create()
                    .context("a Kafka producer")?,
            ),
            None => {
                let client = async_nats::connect(&args.nats).await.with_context(|| format!("connecting to {}", args.nats))?;
                Bus::JetStream(async_nats::jetstream::new(client))
            }
        })
    }

    /// Publishes; the returned future ends with the bus's acknowledgement.
    async fn publish(&self, subject: String, body: String) -> Result<Ack> {
        use futures::FutureExt;
        match self {
            Bus::JetStream(js) => {
                let ack = js.publish(subject, body.into()).await?;
                Ok(async move { ack.await.map(|_| ()).map_err(anyhow::Error::from) }.boxed())
            }
            Bus::Kafka(p) => {
                let p = p.clone();
                Ok(async move {
                    let record = rdkafka::producer::FutureRecord::<(), str>::to(&subject).payload(&body);
                    p.send(record, Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| anyhow::anyhow!("publishing to {subject}: {e}"))
                }
                .boxed())
            }
        }
    }
}

/// Result bodies as they arrive.
async fn results(args: &Args) -> Result<futures::stream::BoxStream<'static, Vec<u8>>> {
    use futures::StreamExt as _;
    match &args.kafka {
        Some(brokers) => {
            use rdkafka::consumer::{Consumer, StreamConsumer};
            use rdkafka::Message as _;
            let consumer: StreamConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("group.id", format!("bus-load-{}", args.run_id))
                .set("auto.offset.reset", "earliest")
                .create()
                .context("a Kafka consumer")?;
            consumer.subscribe(&[&args.results])?;
            let consumer = std::sync::Arc::new(consumer);
            Ok(futures::stream::unfold(consumer, |c| async move {
                loop {
                    match c.recv().await {
                        Ok(m) => {
                            let body = m.payload().unwrap_or_default().to_vec();
                            return Some((body, c.clone()));
                        }
                        Err(e) => eprintln!("reading results: {e}"),
                    }
                }
            })
            .boxed())
        }
        None => {
            let client = async_nats::connect(&args.nats).await.with_context(|| format!("connecting to {}", args.nats))?;
            let sub = client.subscribe(args.results.clone()).await?;
            client.flush().await?;
            Ok(sub.map(|m| m.payload.to_vec()).boxed())
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let digest = push_converted(&args).await.context("pushing the already-converted image")?;
    if args.setup_only {
        println!("{digest}");
        return Ok(());
    }
    let subjects: Vec<String> =
        (0..args.events).map(|i| format!("{}/{}:{}-{i}@{digest}", args.registry, args.repository, args.run_id)).collect();
    let mut sent_at = std::collections::HashMap::with_capacity(args.events);
    let mut results = results(&args).await?;
    let start = Instant::now();
    // Publishing runs beside the reading of results.
    let publish = {
        let (args_bus, subject, refs, in_flight) = (Bus::new(&args).await?, args.subject.clone(), subjects.clone(), args.in_flight.max(1));
        tokio::spawn(async move {
            let mut times = Vec::with_capacity(refs.len());
            let mut pending = futures::stream::FuturesUnordered::new();
            for r in refs {
                let body = json!({ "reference": r }).to_string();
                let acked = args_bus.publish(subject.clone(), body).await?;
                pending.push(acked);
                times.push((r, Instant::now()));
                while pending.len() >= in_flight {
                    pending.next().await.expect("not empty")?;
                }
            }
            while let Some(a) = pending.next().await {
                a?;
            }
            Ok::<_, anyhow::Error>((times, Instant::now()))
        })
    };
    let mut seen = HashSet::with_capacity(args.events);
    let mut arrivals: Vec<(String, Instant)> = Vec::with_capacity(args.events);
    let mut failed = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    while seen.len() < args.events {
        let payload = match tokio::time::timeout_at(deadline, results.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => bail!("the results subscription ended"),
            Err(_) => bail!("only {} of {} results within {} s", seen.len(), args.events, args.timeout_secs),
        };
        let v: Value = serde_json::from_slice(&payload).context("a result that is not JSON")?;
        let subject = v["subject"].as_str().unwrap_or_default().to_string();
        if v["data"]["status"] != "COMPLETED" {
            failed.push(format!("{subject}: {}", v["data"]["reason"]));
        }
        if seen.insert(subject.clone()) {
            arrivals.push((subject, Instant::now()));
        }
    }
    let end = Instant::now();
    let (times, published) = publish.await??;
    sent_at.extend(times);
    let total = end.duration_since(start).as_secs_f64();
    let publish_secs = published.duration_since(start).as_secs_f64();
    let mut lat: Vec<f64> = arrivals.iter().filter_map(|(s, t)| sent_at.get(s).map(|s0| t.duration_since(*s0).as_secs_f64() * 1000.0)).collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let wanted: HashSet<&String> = subjects.iter().collect();
    let missing = wanted.iter().filter(|s| !seen.contains(**s)).count();
    let acked = if args.kafka.is_some() { "Kafka-acknowledged" } else { "JetStream-acknowledged" };
    println!("events: {}  published in {publish_secs:.2} s ({:.0}/s, {acked})", args.events, args.events as f64 / publish_secs);
    println!("results: {}  all in {total:.2} s: {:.0} events/s end to end", seen.len(), args.events as f64 / total);
    println!(
        "publish-to-result ms: p50 {:.1} p90 {:.1} p99 {:.1} max {:.1}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0.0)
    );
    if missing > 0 || !failed.is_empty() {
        bail!("{missing} event(s) without a result; {} failed: {:?}", failed.len(), failed.iter().take(5).collect::<Vec<_>>());
    }
    Ok(())
}
