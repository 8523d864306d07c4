//! Starts the `tansu` Kafka broker (in-memory storage) on a free loopback port, and talks to
//! it as producer, group member and reader.
//!
//! The test script installs tansu under /usr/local/lib/accel-test/tansu; `ACCEL_TANSU` names
//! another binary. Records are produced one per batch (each awaited before the next): tansu
//! hands nothing to a consumer whose committed offset falls inside a multi-record batch.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::registry::free_port;

const DEFAULT_TANSU: &str = "/usr/local/lib/accel-test/tansu/bin/tansu";

/// Path of the broker binary; fails the test when it is missing (scripts/test installs it).
pub fn tansu_binary() -> PathBuf {
    let path = std::env::var_os("ACCEL_TANSU").map(PathBuf::from).unwrap_or_else(|| DEFAULT_TANSU.into());
    assert!(path.exists(), "the tansu Kafka broker is not installed at {}; run scripts/test (it installs it) or set ACCEL_TANSU", path.display());
    path
}

pub struct Tansu {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Tansu {
    pub fn start() -> Tansu {
        Tansu::start_on(free_port())
    }

    /// A broker on `port` (to stand in for one that was stopped: its clients reconnect).
    pub fn start_on(port: u16) -> Tansu {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("tansu.log")).unwrap();
        let child = Command::new(tansu_binary())
            .args(["broker", "--storage-engine", "memory://tansu/", "--listener-url", &url, "--advertised-listener-url", &url])
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start tansu");
        let mut t = Tansu { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = t.child.try_wait().unwrap() {
                panic!("tansu exited with {status}:\n{}", t.log());
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                let c: BaseConsumer = t.config().create().unwrap();
                if c.fetch_metadata(None, Duration::from_secs(2)).is_ok() {
                    return t;
                }
            }
            assert!(Instant::now() < deadline, "tansu not ready within 30 s:\n{}", t.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the broker (its in-memory topics and offsets go with it).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.brokers());
        c
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self.config().create().unwrap();
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let r = admin.create_topics([&topic], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))).await.unwrap();
        for t in r {
            t.unwrap_or_else(|(n, e)| panic!("creating topic {n}: {e}"));
        }
    }

    pub fn producer(&self) -> Producer {
        let mut c = self.config();
        c.set("linger.ms", "0");
        Producer { inner: c.create().unwrap() }
    }

    /// Committed offsets of `group` for partitions 0..partitions of `topic` (-1: none).
    pub fn committed(&self, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
        let mut c = self.config();
        c.set("group.id", group);
        let consumer: BaseConsumer = c.create().unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let got = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
        got.elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => -1,
            })
            .collect()
    }

    /// End offsets (high watermarks) of partitions 0..partitions of `topic`.
    pub fn ends(&self, topic: &str, partitions: i32) -> Vec<i64> {
        let consumer: BaseConsumer = self.config().create().unwrap();
        (0..partitions).map(|p| consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap().1).collect()
    }

    /// Reads every record of `topic` from the start, in the background.
    pub fn follow(&self, topic: &str, partitions: i32) -> Records {
        let mut c = self.config();
        c.set("group.id", format!("test-reader-{}", uuid::Uuid::new_v4()));
        c.set("enable.auto.commit", "false");
        let consumer: BaseConsumer = c.create().unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        let headers = m
                            .headers()
                            .map(|h| h.iter().map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())).collect())
                            .unwrap_or_default();
                        g.lock().unwrap().push(Record {
                            partition: m.partition(),
                            offset: m.offset(),
                            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                            headers,
                            body: m.payload().unwrap_or_default().to_vec(),
                        });
                    }
                    Some(Err(e)) => eprintln!("reading test records: {e}"),
                    None => {}
                }
            }
        });
        Records { got, stop }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Produces records one at a time (one per batch).
pub struct Producer {
    inner: FutureProducer,
}

impl Producer {
    /// Sends one record (to `partition`, or as the producer picks) and waits for it to be
    /// stored; returns its offset.
    pub async fn send(&self, topic: &str, partition: Option<i32>, body: &str, headers: &[(&str, &str)]) -> i64 {
        self.send_keyed(topic, partition, None, body, headers).await
    }

    /// [`send`](Self::send) with a record key.
    pub async fn send_keyed(&self, topic: &str, partition: Option<i32>, key: Option<&str>, body: &str, headers: &[(&str, &str)]) -> i64 {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header { key: k, value: Some(v.as_bytes()) });
        }
        let mut r = FutureRecord::<str, str>::to(topic).payload(body).headers(h);
        if let Some(k) = key {
            r = r.key(k);
        }
        if let Some(p) = partition {
            r = r.partition(p);
        }
        let delivery = self.inner.send(r, Duration::from_secs(10)).await.unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
        delivery.offset
    }
}

#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Record {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("record is not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// Records read from a topic so far.
pub struct Records {
    got: Arc<Mutex<Vec<Record>>>,
    stop: Arc<AtomicBool>,
}

impl Records {
    pub fn all(&self) -> Vec<Record> {
        self.got.lock().unwrap().clone()
    }

    /// Waits for a result (CloudEvent) about `subject`.
    pub async fn result_for(&self, subject: &str, within: Duration, log: impl Fn() -> String) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = self.all().iter().map(Record::json).find(|v| v["subject"] == subject) {
                return v;
            }
            assert!(Instant::now() < deadline, "no result for {subject} within {within:?}; got {:?}\n{}", self.all(), log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for `n` records.
    pub async fn wait_count(&self, n: usize, within: Duration, log: impl Fn() -> String) -> Vec<Record> {
        let deadline = Instant::now() + within;
        loop {
            let all = self.all();
            if all.len() >= n {
                return all;
            }
            assert!(Instant::now() < deadline, "{} of {n} records within {within:?}: {all:?}\n{}", all.len(), log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Records {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
