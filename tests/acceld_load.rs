//! Load benchmark of the webhook endpoint (not a test; run on purpose):
//!
//! ```text
//! cargo test --release --test acceld_load -- --ignored --nocapture
//! ```
//!
//! Posts distinct Harbor push events from concurrent keep-alive clients to `acceld` on
//! loopback, then prints the accepted rate and latency percentiles, and checks that every
//! accepted event is a stored task. Conversions are replaced by a stand-in that never finishes:
//! in a burst, events arrive far faster than images convert, so the burst is what is measured.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use accel::config::Config;
use accel::oci::{Digest, Reference};
use accel::pipeline::worker::Resolved;
use accel::pipeline::{ConvertError, ConvertResult, Plan, Runner, TaskStore};

struct Busy;

#[async_trait]
impl Runner for Busy {
    async fn resolve(&self, source: &Reference) -> Result<Resolved, ConvertError> {
        Ok(Resolved { digest: source.digest().cloned().unwrap_or_else(|| Digest::of(b"x")), converted_from: None })
    }
    async fn convert(&self, _plan: &Plan, _source: &Reference) -> Result<ConvertResult, ConvertError> {
        futures::future::pending().await
    }
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run with --ignored --nocapture"]
async fn webhook_accept_rate() {
    let events = env_or("ACCEL_LOAD_EVENTS", 20_000);
    let clients = env_or("ACCEL_LOAD_CLIENTS", 32);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tasks.redb");
    let yaml = format!(
        "server: {{ auth_header: 'Bearer x', shutdown_grace_secs: 0 }}\ntasks: {{ path: '{}', queue_size: {} }}\npipelines: [{{ name: p, concurrency: 2, convert: [{{ driver: estargz }}] }}]\n",
        db.display(),
        events + 1
    );
    let config = Config::parse(&yaml, "load", &|_| None).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/v1/conversions", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(accel::api::serve(config, Arc::new(Busy), listener, shutdown.clone()));

    let http = reqwest::Client::builder().pool_max_idle_per_host(clients).build().unwrap();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut joins = Vec::new();
    for _ in 0..clients {
        let (http, url, next) = (http.clone(), url.clone(), next.clone());
        joins.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut failed = 0usize;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= events {
                    break;
                }
                let digest = Digest::of(i.to_string().as_bytes());
                let body = format!(
                    r#"{{"type":"PUSH_ARTIFACT","occur_at":1737446601,"operator":"admin","event_data":{{"resources":[{{"digest":"{digest}","tag":"v{i}","resource_url":"harbor.example.com/library/app:v{i}"}}],"repository":{{"name":"app","namespace":"library","repo_full_name":"library/app","repo_type":"private"}}}}}}"#
                );
                let t = Instant::now();
                let r = http.post(&url).header("authorization", "Bearer x").header("content-type", "application/json").body(body).send().await;
                let ok = matches!(&r, Ok(resp) if resp.status().is_success());
                if let Ok(resp) = r {
                    let _ = resp.bytes().await;
                }
                lat.push(t.elapsed());
                if !ok {
                    failed += 1;
                }
            }
            (lat, failed)
        }));
    }
    let mut lat = Vec::new();
    let mut failed = 0;
    for j in joins {
        let (l, f) = j.await.unwrap();
        lat.extend(l);
        failed += f;
    }
    let took = start.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "{} events from {clients} clients in {:.2}s: {:.0} accepted/s, {failed} refused; latency p50 {:?} p90 {:?} p99 {:?} max {:?}",
        lat.len(),
        took.as_secs_f64(),
        (lat.len() - failed) as f64 / took.as_secs_f64(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        lat[lat.len() - 1]
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), server).await.unwrap().unwrap().unwrap();
    let stored = TaskStore::open(&db).unwrap().count().await.unwrap();
    assert_eq!(stored as usize, events - failed, "every accepted event is a stored task");
}
