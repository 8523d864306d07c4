//! Load client for `acceld`'s webhook endpoint: posts distinct Harbor push events over
//! keep-alive connections and reports the accepted rate and latency percentiles, then checks
//! with `GET /api/v1/conversions` that every accepted event is a stored task.
//! `bench/acceld-load.sh` runs it against a release `acceld`.
//!
//! ```sh
//! acceld_load --addr 127.0.0.1:2077 --auth 'Bearer x' --events 50000 --clients 64 --save-ids ids.txt
//! acceld_load --addr 127.0.0.1:2077 --auth 'Bearer x' --check-ids ids.txt   # e.g. after a restart
//! ```
//!
//! HTTP/1.1 is spoken directly on the socket so that the client costs little CPU next to the
//! server on the same machine. With `--rate`, requests are scheduled at fixed intervals; one
//! that is due while every connection still waits for an answer is timed from its scheduled
//! time, so a server that falls behind shows it in the percentiles (no coordinated omission).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use accel::oci::Digest;

#[derive(Parser, Clone)]
struct Args {
    /// `host:port` of acceld.
    #[arg(long, default_value = "127.0.0.1:2077")]
    addr: String,
    /// `Authorization` header value (acceld's `server.auth_header`).
    #[arg(long)]
    auth: Option<String>,
    /// Events to post.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Concurrent connections, one request in flight on each.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Events per second to offer; 0 posts as fast as the server answers.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Registry host named in the events (`resource_url`).
    #[arg(long, default_value = "127.0.0.1:9")]
    registry: String,
    /// Repository named in the events; it must match a pipeline.
    #[arg(long, default_value = "library/load")]
    repository: String,
    /// Distinguishes the tags of this run from earlier runs against the same database.
    #[arg(long, default_value = "run")]
    run_id: String,
    /// Writes the ids of the tasks created, one per line.
    #[arg(long)]
    save_ids: Option<PathBuf>,
    /// Posts nothing: checks that every task id in this file is listed.
    #[arg(long)]
    check_ids: Option<PathBuf>,
    /// Posts only; leaves the check to a later `--check-ids`.
    #[arg(long)]
    no_check: bool,
    /// Posts nothing: times this many 4 KiB writes each followed by fdatasync in a file in
    /// this directory, the floor under every durable commit on that disk.
    #[arg(long, value_name = "DIR")]
    fsync_probe: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if let Some(dir) = &args.fsync_probe {
        return fsync_probe(dir, args.events);
    }
    rt.block_on(async {
        if let Some(file) = &args.check_ids {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            let ids: Vec<String> = text.lines().filter(|l| !l.is_empty()).map(str::to_string).collect();
            return check(&args, &ids).await;
        }
        let ids = load(&args).await?;
        if let Some(file) = &args.save_ids {
            std::fs::write(file, ids.join("\n") + "\n").with_context(|| format!("writing {}", file.display()))?;
        }
        if args.no_check {
            return Ok(());
        }
        check(&args, &ids).await
    })
}

/// One request's outcome.
struct Sample {
    latency: Duration,
    status: u16,
    body: Vec<u8>,
}

async fn load(args: &Args) -> Result<Vec<String>> {
    let next = Arc::new(AtomicUsize::new(0));
    let args = Arc::new(args.clone());
    let start = Instant::now() + Duration::from_millis(50);
    let mut joins = Vec::new();
    for _ in 0..args.clients.max(1) {
        let (args, next) = (args.clone(), next.clone());
        let mut conn = Conn::open(&args.addr).await?;
        joins.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= args.events {
                    return Ok::<_, anyhow::Error>(samples);
                }
                let body = event(&args, i);
                // A request already due when a connection takes it waited for acceld to answer
                // earlier ones, and that wait counts. One not yet due is timed from when it is
                // sent, so that the timer waking late (by up to a millisecond) does not count.
                let due = if args.rate > 0 { start + Duration::from_secs_f64(i as f64 / args.rate as f64) } else { Instant::now() };
                let sent = if Instant::now() >= due {
                    due
                } else {
                    tokio::time::sleep_until(due.into()).await;
                    Instant::now()
                };
                let (status, body) = conn.request("POST", "/api/v1/conversions", args.auth.as_deref(), Some(&body)).await?;
                samples.push(Sample { latency: sent.elapsed(), status, body });
            }
        }));
    }
    let mut samples = Vec::new();
    for j in joins {
        samples.extend(j.await??);
    }
    let took = start.elapsed();
    let accepted: Vec<&Sample> = samples.iter().filter(|s| s.status == 200).collect();
    let mut refused: Vec<u16> = samples.iter().filter(|s| s.status != 200).map(|s| s.status).collect();
    refused.sort();
    refused.dedup();
    let mut lat: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let offered = if args.rate > 0 { format!("{} events/s offered", args.rate) } else { "closed loop".into() };
    println!(
        "{} events, {} clients, {offered}: {} accepted in {:.2} s = {:.0} accepted events/s; {} refused {refused:?}",
        samples.len(),
        args.clients,
        accepted.len(),
        took.as_secs_f64(),
        accepted.len() as f64 / took.as_secs_f64(),
        samples.len() - accepted.len(),
    );
    println!(
        "latency ms: p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
        ms(pct(0.50)),
        ms(pct(0.90)),
        ms(pct(0.99)),
        ms(pct(0.999)),
        ms(lat[lat.len() - 1])
    );
    let mut ids = Vec::with_capacity(accepted.len());
    for s in accepted {
        let v: Value = serde_json::from_slice(&s.body).context("answer is not JSON")?;
        let tasks = v["tasks"].as_array().context("answer has no tasks")?;
        if tasks.len() != 1 || tasks[0]["duplicate"] != false {
            bail!("expected one new task per event, got {v}");
        }
        ids.push(tasks[0]["id"].as_str().context("task without id")?.to_string());
    }
    Ok(ids)
}

/// Checks that every id is listed by `GET /api/v1/conversions`.
async fn check(args: &Args, ids: &[String]) -> Result<()> {
    let mut conn = Conn::open(&args.addr).await?;
    let (status, body) = conn.request("GET", "/api/v1/conversions", args.auth.as_deref(), None).await?;
    if status != 200 {
        bail!("GET /api/v1/conversions answered {status}: {}", String::from_utf8_lossy(&body));
    }
    let listed: Vec<Value> = serde_json::from_slice(&body).context("task list is not JSON")?;
    let listed: HashSet<&str> = listed.iter().filter_map(|t| t["id"].as_str()).collect();
    let lost: Vec<&String> = ids.iter().filter(|id| !listed.contains(id.as_str())).collect();
    println!("checked: {} accepted events, {} tasks listed, {} lost", ids.len(), listed.len(), lost.len());
    if !lost.is_empty() {
        bail!("{} accepted events have no task, e.g. {}", lost.len(), lost[0]);
    }
    Ok(())
}

fn fsync_probe(dir: &std::path::Path, n: usize) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("fsync-probe");
    let file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let page = [0x5a_u8; 4096];
    let mut lat = Vec::with_capacity(n);
    for i in 0..n.max(1) {
        file.write_all_at(&page, (i % 256) as u64 * 4096)?;
        let t = Instant::now();
        file.sync_data()?;
        lat.push(t.elapsed());
    }
    std::fs::remove_file(&path)?;
    lat.sort();
    let ms = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1000.0;
    println!("disk fdatasync ms: p50 {:.2} p90 {:.2} p99 {:.2} max {:.2} ({n})", ms(0.5), ms(0.9), ms(0.99), ms(1.0));
    Ok(())
}

/// Harbor's default payload for a push of `REPOSITORY:RUN-I`, with a digest of its own.
fn event(args: &Args, i: usize) -> String {
    let tag = format!("{}-{i}", args.run_id);
    let digest = Digest::of(format!("{}/{}:{tag}", args.registry, args.repository).as_bytes());
    let (namespace, name) = args.repository.split_once('/').unwrap_or(("library", &args.repository));
    serde_json::json!({
        "type": "PUSH_ARTIFACT", "occur_at": 1737446601, "operator": "admin",
        "event_data": {
            "resources": [{
                "digest": digest.to_string(), "tag": tag,
                "resource_url": format!("{}/{}:{tag}", args.registry, args.repository),
            }],
            "repository": { "name": name, "namespace": namespace, "repo_full_name": args.repository, "repo_type": "private" }
        }
    })
    .to_string()
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    host: String,
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

impl Conn {
    async fn open(addr: &str) -> Result<Conn> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        Ok(Conn { host: addr.to_string(), read: BufReader::with_capacity(64 << 10, read), write })
    }

    async fn request(&mut self, method: &str, path: &str, auth: Option<&str>, body: Option<&str>) -> Result<(u16, Vec<u8>)> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if let Some(a) = auth {
            req.push_str(&format!("Authorization: {a}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len()));
        } else {
            req.push_str("\r\n");
        }
        self.write.write_all(req.as_bytes()).await.context("sending request")?;

        let mut line = String::new();
        self.read.read_line(&mut line).await.context("reading status line")?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let mut length = None;
        loop {
            line.clear();
            if self.read.read_line(&mut line).await.context("reading headers")? == 0 {
                bail!("connection closed in the headers");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = Some(v.trim().parse::<usize>()?);
                }
            }
        }
        let length = length.context("answer without Content-Length")?;
        let mut out = vec![0; length];
        self.read.read_exact(&mut out).await.context("reading body")?;
        Ok((status, out))
    }
}
