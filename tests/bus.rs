//! End to end over message buses: the real `acceld` binary reading Debian's `nats-server`
//! (core NATS and JetStream) and converting images in Debian's `docker-registry`, with results
//! published to every kind of sink; malformed messages dead-lettered; Harbor webhooks forwarded
//! into JetStream; two instances sharing one durable consumer, one killed mid-conversion; and
//! the NATS server going away and coming back.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};

use accel::oci::annotations;
use common::fixtures::{check_estargz, debian_image, handmade_image, PushedImage};
use common::acceld::{start_fails, Acceld};
use common::nats::NatsServer;
use common::registry::{free_port, RegistryAuth, RegistryServer};

/// Checks the converted image `repo:tag` against `source` with the reference eStargz reader.
fn verify_estargz(reg: &RegistryServer, repo: &str, tag: &str, source: &PushedImage) {
    let digest = reg.tag_digest(repo, tag).unwrap_or_else(|| panic!("{repo}:{tag} is not in the registry"));
    let bytes = std::fs::read(reg.blob_data_path(digest.trim_start_matches("sha256:"))).unwrap();
    let converted: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(converted["annotations"][annotations::SOURCE_DIGEST], source.digest.as_str(), "{repo}:{tag}");
    let layers = converted["layers"].as_array().unwrap();
    assert_eq!(layers.len(), source.layers().len());
    for (layer, src) in layers.iter().zip(source.layers()) {
        let toc = layer["annotations"][annotations::ESTARGZ_TOC_DIGEST].as_str().expect("TOC digest annotation");
        let hex = layer["digest"].as_str().unwrap().trim_start_matches("sha256:");
        check_estargz(&src.blob, &reg.blob_data_path(hex), toc);
    }
}

/// The distribution registry's notification for a push of `image` by tag.
fn registry_notification(image: &PushedImage) -> String {
    let (host, rest) = image.reference.split_once('/').unwrap();
    let (repo, tag) = rest.rsplit_once(':').unwrap();
    json!({ "events": [
        {
            "id": "a4f9c2d0-1", "timestamp": "2026-01-01T00:00:00Z", "action": "push",
            "target": { "mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 1, "digest": image.digest,
                        "length": 1, "repository": repo, "url": format!("http://{host}/v2/{repo}/manifests/{}", image.digest), "tag": tag },
            "request": { "id": "r1", "addr": "127.0.0.1:1", "host": host, "method": "PUT", "useragent": "skopeo" },
            "actor": {}, "source": { "addr": "registry:5000", "instanceID": "i1" }
        },
        {
            "action": "push",
            "target": { "mediaType": "application/octet-stream", "digest": image.digest, "repository": repo },
            "request": { "host": host }
        }
    ]})
    .to_string()
}

/// Results (CloudEvents) read from a core NATS subject, by subject image.
struct Results {
    got: Arc<Mutex<Vec<Value>>>,
}

impl Results {
    async fn subscribe(client: &async_nats::Client, subject: &str) -> Results {
        let mut sub = client.subscribe(subject.to_string()).await.unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                g.lock().unwrap().push(serde_json::from_slice(&m.payload).unwrap_or_else(|e| panic!("result is not JSON ({e}): {:?}", m.payload)));
            }
        });
        client.flush().await.unwrap();
        Results { got }
    }

    /// Waits for the result of `subject` (the source image as the event named it).
    async fn wait_for(&self, subject: &str, within: Duration, log: impl Fn() -> String) -> Value {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = self.got.lock().unwrap().iter().find(|v| v["subject"] == subject) {
                return v.clone();
            }
            assert!(Instant::now() < deadline, "no result for {subject} within {within:?}; got {:?}\n{}", self.got.lock().unwrap(), log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn all(&self) -> Vec<Value> {
        self.got.lock().unwrap().clone()
    }
}

/// What an HTTP receiver got: `Authorization` header and body of each POST.
type Posted = Arc<Mutex<Vec<(Option<String>, Value)>>>;

/// Bodies and `Authorization` headers POSTed to a local HTTP receiver.
async fn http_receiver() -> (String, Posted) {
    use axum::http::HeaderMap;
    let got: Posted = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let app = axum::Router::new().route(
        "/results",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let g = g.clone();
            async move {
                let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).map(String::from);
                assert_eq!(headers.get("content-type").unwrap(), "application/cloudevents+json");
                g.lock().unwrap().push((auth, serde_json::from_slice(&body).unwrap()));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/results", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

async fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A message on a dead-letter subject: its body, its `Accel-Error` header and all its headers.
#[derive(Clone)]
struct Letter {
    body: String,
    why: String,
    headers: Vec<(String, String)>,
}

impl Letter {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }
}

/// Messages on a dead-letter subject.
async fn dead_letters(client: &async_nats::Client, subject: &str) -> Arc<Mutex<Vec<Letter>>> {
    let mut sub = client.subscribe(subject.to_string()).await.unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let why = m.headers.as_ref().and_then(|h| h.get("Accel-Error")).map(|v| v.as_str().to_string()).unwrap_or_default();
            let headers = m.headers.iter().flat_map(|h| h.iter()).flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.as_str().to_string()))).collect();
            g.lock().unwrap().push(Letter { body: String::from_utf8_lossy(&m.payload).into_owned(), why, headers });
        }
    });
    client.flush().await.unwrap();
    got
}

async fn js_publish(js: &jetstream::Context, subject: &str, body: String) {
    js.publish(subject.to_string(), body.into()).await.unwrap().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_sources_convert_and_every_sink_hears_the_result() {
    let reg = RegistryServer::start(RegistryAuth::None);
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    js.create_stream(jetstream::stream::Config { name: "RESULTS".into(), subjects: vec!["results.js".into()], ..Default::default() })
        .await
        .unwrap();
    let results = Results::subscribe(&client, "results.core").await;
    let dead_js = dead_letters(&client, "dead.js").await;
    let dead_core = dead_letters(&client, "dead.core").await;
    let (hook, posted) = http_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let url = nats.url();
    let body = format!(
        r#"
sources:
  js: {{ kind: jetstream, url: "{url}", stream: IMAGES, subjects: ["images.>"], consumer: acceld, create: true, ack_wait_secs: 10, dead_letter_subject: dead.js }}
  core: {{ kind: nats, url: "{url}", subject: core.images, queue_group: acceld, dead_letter_subject: dead.core }}
sinks:
  out: {{ kind: stdout }}
  file: {{ kind: file, path: "{file}" }}
  hook: {{ kind: http, url: "{hook}", headers: {{ Authorization: "Bearer sink-token" }} }}
  core: {{ kind: nats, url: "{url}", subject: results.core }}
  js: {{ kind: jetstream, url: "{url}", subject: results.js }}
pipelines:
  - name: accelerate
    sources: [js, core]
    match: {{ repositories: ["library/*"] }}
    convert: [{{ driver: estargz, options: {{ compression_level: 1 }} }}]
    sinks: [out, file, hook, core, js]
"#,
        file = dir.path().join("results.jsonl").display(),
    );
    let d = Acceld::start(dir.path(), &reg.host(), &body).await;

    // A registry notification through JetStream.
    let app = handmade_image().build().push(&reg.host(), "library/app:1");
    js_publish(&js, "images.pushed", registry_notification(&app)).await;
    let r = results.wait_for(&format!("{}@{}", app.reference, app.digest), Duration::from_secs(180), || d.log()).await;
    assert_eq!(r["specversion"], "1.0");
    assert_eq!(r["type"], "io.accel.conversion.completed", "{r}");
    assert_eq!(r["source"], "/accel/pipelines/accelerate");
    assert_eq!(r["data"]["status"], "COMPLETED", "{r}");
    assert_eq!(r["data"]["origin"], "js");
    assert_eq!(r["data"]["source"]["digest"], app.digest.as_str());
    assert_eq!(r["data"]["attempts"], 1);
    let target = &r["data"]["targets"][0];
    assert_eq!(target["driver"], "estargz");
    assert_eq!(target["reference"], format!("{}-esgz", app.reference));
    assert_eq!(target["digest"], reg.tag_digest("library/app", "1-esgz").expect("1-esgz pushed").as_str());
    assert!(target["size"].as_u64().unwrap() > 0);
    verify_estargz(&reg, "library/app", "1-esgz", &app);

    // Every other sink has the same event.
    let id = r["id"].as_str().unwrap().to_string();
    wait_until("the webhook got the result", Duration::from_secs(30), || posted.lock().unwrap().len() == 1).await;
    let (auth, event) = posted.lock().unwrap()[0].clone();
    assert_eq!((auth.as_deref(), event["id"].as_str()), (Some("Bearer sink-token"), Some(id.as_str())));
    let file = dir.path().join("results.jsonl");
    wait_until("the file got the result", Duration::from_secs(30), || std::fs::read_to_string(&file).is_ok_and(|t| t.lines().count() == 1)).await;
    let line: Value = serde_json::from_str(std::fs::read_to_string(&file).unwrap().trim()).unwrap();
    assert_eq!(line["id"], id.as_str());
    wait_until("stdout got the result", Duration::from_secs(30), || d.log().lines().any(|l| l.starts_with('{') && l.contains(&id))).await;
    let mut stream = js.get_stream("RESULTS").await.unwrap();
    let stored = stream.info().await.unwrap().state.messages;
    assert_eq!(stored, 1, "the JetStream sink stored the result once");
    let msg = stream.get_last_raw_message_by_subject("results.js").await.unwrap();
    let event: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(event["id"], id.as_str());

    // Malformed messages on both sources are dead-lettered with the reason and the message's
    // own headers, but for the server's (Nats-*); the sources go on.
    let mut h = async_nats::HeaderMap::new();
    h.insert("X-Trace", "t-1");
    h.append("X-Trace", "t-2");
    h.insert("Nats-Msg-Id", "m-1");
    h.insert("Accel-Error", "not this one");
    js.publish_with_headers("images.bad", h.clone(), "{oops".into()).await.unwrap().await.unwrap();
    client.publish_with_headers("core.images", h, Bytes::from_static(br#"{"reference":"nginx"}"#)).await.unwrap();
    client.flush().await.unwrap();
    wait_until("dead letters arrived", Duration::from_secs(30), || dead_js.lock().unwrap().len() == 1 && dead_core.lock().unwrap().len() == 1).await;
    let letter = dead_js.lock().unwrap()[0].clone();
    assert_eq!(letter.body, "{oops");
    assert!(letter.why.contains("not valid JSON"), "{}", letter.why);
    let core = dead_core.lock().unwrap()[0].clone();
    assert_eq!(core.body, r#"{"reference":"nginx"}"#);
    assert!(core.why.contains("names no registry host"), "{}", core.why);
    for l in [&letter, &core] {
        let mut trace = l.header("X-Trace");
        trace.sort();
        assert_eq!(trace, ["t-1", "t-2"], "{:?}", l.headers);
        assert!(l.header("Nats-Msg-Id").is_empty(), "{:?}", l.headers);
        assert_eq!(l.header("Accel-Error").len(), 1, "{:?}", l.headers);
    }

    let two = handmade_image().build().push(&reg.host(), "library/two:1");
    let plain = json!({ "reference": format!("{}@{}", two.reference, two.digest) }).to_string();
    client.publish("core.images", plain.into()).await.unwrap();
    let r = results.wait_for(&format!("{}@{}", two.reference, two.digest), Duration::from_secs(120), || d.log()).await;
    assert_eq!(r["data"]["status"], "COMPLETED", "{r}");
    assert_eq!(r["data"]["origin"], "core");
    let third = handmade_image().build().push(&reg.host(), "library/three:1");
    js_publish(&js, "images.pushed", registry_notification(&third)).await;
    results.wait_for(&format!("{}@{}", third.reference, third.digest), Duration::from_secs(120), || d.log()).await;

    let m = d.metrics().await;
    for line in [
        r#"accel_source_messages_total{source="js",outcome="dead_lettered"} 1"#,
        r#"accel_source_messages_total{source="js",outcome="malformed"} 1"#,
        r#"accel_source_messages_total{source="core",outcome="dead_lettered"} 1"#,
        r#"accel_source_messages_total{source="js",outcome="accepted"} 2"#,
        r#"accel_source_messages_total{source="core",outcome="accepted"} 1"#,
    ] {
        assert!(m.lines().any(|l| l == line), "metrics lack {line}:\n{m}");
    }
    assert!(d.log().contains("malformed message sent to NATS subject dead.js"), "{}", d.log());
    assert_eq!(results.all().len(), 3, "{:?}", results.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harbor_webhooks_forwarded_into_jetstream_are_converted_from_the_bus() {
    let reg = RegistryServer::start(RegistryAuth::None);
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let results = Results::subscribe(&client, "results").await;
    let dir = tempfile::tempdir().unwrap();
    let url = nats.url();
    let body = format!(
        r#"
sources:
  harbor: {{ kind: harbor, forward: {{ kind: jetstream, url: "{url}", subject: images.harbor }} }}
  bus: {{ kind: jetstream, url: "{url}", stream: IMAGES, subjects: ["images.>"], consumer: acceld, create: true }}
sinks:
  bus: {{ kind: nats, url: "{url}", subject: results }}
pipelines:
  - name: accelerate
    sources: [bus]
    convert: [{{ driver: estargz, options: {{ compression_level: 1 }} }}]
    sinks: [bus]
"#
    );
    let d = Acceld::start(dir.path(), &reg.host(), &body).await;
    let app = handmade_image().build().push(&reg.host(), "library/hooked:1");
    let (host, rest) = app.reference.split_once('/').unwrap();
    let (repo, tag) = rest.rsplit_once(':').unwrap();
    let hook = json!({
        "type": "PUSH_ARTIFACT", "occur_at": 1737446601, "operator": "admin",
        "event_data": { "resources": [{ "digest": app.digest, "tag": tag, "resource_url": format!("{host}/{repo}:{tag}") }],
                        "repository": { "name": "hooked", "namespace": "library", "repo_full_name": repo, "repo_type": "private" } }
    });
    let resp = reqwest::Client::new().post(d.url("/api/v1/conversions")).json(&hook).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["forwarded"], "JetStream subject images.harbor", "{answer}");
    // A bad webhook is refused before it reaches the bus.
    let resp = reqwest::Client::new().post(d.url("/api/v1/conversions")).body(r#"{"type":"PUSH_ARTIFACT"}"#).send().await.unwrap();
    assert_eq!(resp.status(), 400);

    let r = results.wait_for(&format!("{}@{}", app.reference, app.digest), Duration::from_secs(180), || d.log()).await;
    assert_eq!(r["data"]["status"], "COMPLETED", "{r}");
    assert_eq!(r["data"]["origin"], "bus");
    verify_estargz(&reg, "library/hooked", "1-esgz", &app);
    let js = jetstream::new(client.clone());
    assert_eq!(js.get_stream("IMAGES").await.unwrap().info().await.unwrap().state.messages, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_or_sink_stops_start_up_with_the_reason() {
    let reg = RegistryServer::start(RegistryAuth::None);
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let url = nats.url();
    let pipeline = "pipelines: [{ name: p, convert: [{ driver: estargz }], sinks: [s] }]";
    let err = start_fails(
        &dir.path().join("a"),
        &reg.host(),
        &format!("sources: {{ js: {{ kind: jetstream, url: \"{url}\", stream: NOPE, consumer: c }} }}\nsinks: {{ s: {{ kind: stdout }} }}\n{pipeline}"),
    );
    assert!(err.contains("JetStream stream NOPE does not exist"), "{err}");
    let err = start_fails(&dir.path().join("b"), &reg.host(), &format!("sinks: {{ s: {{ kind: jetstream, url: \"{url}\", subject: nobody.listens }} }}\n{pipeline}"));
    assert!(err.contains("no JetStream stream takes subject nobody.listens"), "{err}");
    let dead = format!("nats://127.0.0.1:{}", free_port());
    let err = start_fails(&dir.path().join("c"), &reg.host(), &format!("sinks: {{ s: {{ kind: nats, url: \"{dead}\", subject: r }} }}\n{pipeline}"));
    assert!(err.contains("cannot connect to"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_durable_consumer_and_one_killed_mid_conversion_loses_nothing() {
    let reg = RegistryServer::start(RegistryAuth::None);
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let results = Results::subscribe(&client, "results").await;
    let url = nats.url();
    // One message at a time per instance, acknowledged when converted; a silent instance's
    // message goes to the other after 5 s.
    let body = format!(
        r#"
sources:
  bus: {{ kind: jetstream, url: "{url}", stream: IMAGES, subjects: ["images.>"], consumer: acceld, create: true, ack_wait_secs: 5, batch: 1 }}
sinks:
  bus: {{ kind: nats, url: "{url}", subject: results }}
pipelines:
  - name: accelerate
    convert: [{{ driver: estargz, options: {{ compression_level: 9 }} }}]
    sinks: [bus]
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let mut a = Acceld::start(&dir.path().join("a"), &reg.host(), &body).await;
    let mut b = Acceld::start(&dir.path().join("b"), &reg.host(), &body).await;

    // The Debian image at gzip level 9 takes seconds: long enough to kill mid-way.
    let big = debian_image("amd64").build().push(&reg.host(), "library/big:1");
    let small: Vec<PushedImage> = (0..4).map(|i| handmade_image().build().push(&reg.host(), &format!("library/small{i}:1"))).collect();
    js_publish(&js, "images.pushed", json!({ "reference": format!("{}@{}", big.reference, big.digest) }).to_string()).await;
    let converting_big = format!("converting image {}", big.reference);
    let deadline = Instant::now() + Duration::from_secs(120);
    let a_has_it = loop {
        if a.log().contains(&converting_big) {
            break true;
        }
        if b.log().contains(&converting_big) {
            break false;
        }
        assert!(Instant::now() < deadline, "nobody converts the big image:\n{}\n{}", a.log(), b.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for s in &small {
        js_publish(&js, "images.pushed", json!({ "reference": format!("{}@{}", s.reference, s.digest) }).to_string()).await;
    }
    // Let the other instance take some of the small ones, then kill the busy one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (victim, survivor) = if a_has_it { (&mut a, &mut b) } else { (&mut b, &mut a) };
    assert!(reg.tag_digest("library/big", "1-esgz").is_none(), "the big conversion ended before the kill");
    victim.kill9();

    let log = || format!("survivor:\n{}", survivor.log());
    let r = results.wait_for(&format!("{}@{}", big.reference, big.digest), Duration::from_secs(600), log).await;
    assert_eq!(r["data"]["status"], "COMPLETED", "{r}");
    assert!(survivor.log().contains(&converting_big), "the survivor converted the redelivered message");
    verify_estargz(&reg, "library/big", "1-esgz", &big);
    for s in &small {
        let r = results.wait_for(&format!("{}@{}", s.reference, s.digest), Duration::from_secs(300), log).await;
        assert_eq!(r["data"]["status"], "COMPLETED", "{r}");
        let (_, rest) = s.reference.split_once('/').unwrap();
        let (repo, _) = rest.rsplit_once(':').unwrap();
        assert!(reg.tag_digest(repo, "1-esgz").is_some(), "{repo}:1-esgz pushed");
        // Converted by one instance only.
        let line = format!("converting image {}", s.reference);
        let times = victim.log().matches(&line).count() + survivor.log().matches(&line).count();
        assert_eq!(times, 1, "{line} appears {times} times");
    }
    // Each event has exactly one result (the killed instance's unfinished one is not reported).
    assert_eq!(results.all().len(), 5, "{:?}", results.all());
    // Nothing is left pending on the consumer.
    let mut consumer: jetstream::consumer::PullConsumer = js.get_stream("IMAGES").await.unwrap().get_consumer("acceld").await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "{info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_consumer_keeps_its_deadline_and_a_source_that_cannot_read_shows_in_health() {
    use jetstream::consumer::{pull, AckPolicy};
    let reg = RegistryServer::start(RegistryAuth::None);
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    // Made by someone else with a 1 s deadline; the config asks for 60 s and does not create.
    let stream = js
        .create_stream(jetstream::stream::Config { name: "IMAGES".into(), subjects: vec!["images.>".into()], ..Default::default() })
        .await
        .unwrap();
    stream
        .create_consumer(pull::Config {
            durable_name: Some("acceld".into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .unwrap();
    let results = Results::subscribe(&client, "results").await;
    let url = nats.url();
    let body = format!(
        r#"
sources:
  bus: {{ kind: jetstream, url: "{url}", stream: IMAGES, consumer: acceld, ack_wait_secs: 60, batch: 1 }}
sinks:
  bus: {{ kind: nats, url: "{url}", subject: results }}
pipelines:
  - name: accelerate
    convert: [{{ driver: estargz, options: {{ compression_level: 9 }} }}]
    sinks: [bus]
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let acceld = Acceld::start(dir.path(), &reg.host(), &body).await;
    assert!(acceld.log().contains("has ack_wait 1s"), "the differing deadline is reported:\n{}", acceld.log());
    let health = health(&acceld).await;
    assert_eq!((health["status"].as_str(), health["sources"]["bus"]["state"].as_str()), (Some("ok"), Some("reading")), "{health}");

    // Seconds of conversion, far past the 1 s deadline: keep-alives paced by the consumer's
    // own deadline keep the message from being delivered again.
    let big = debian_image("amd64").build().push(&reg.host(), "library/big:1");
    js_publish(&js, "images.pushed", json!({ "reference": format!("{}@{}", big.reference, big.digest) }).to_string()).await;
    let log = || acceld.log();
    let r = results.wait_for(&format!("{}@{}", big.reference, big.digest), Duration::from_secs(600), log).await;
    assert_eq!(r["data"]["status"], "COMPLETED", "{r}");
    let mut consumer: jetstream::consumer::PullConsumer = js.get_stream("IMAGES").await.unwrap().get_consumer("acceld").await.unwrap();
    // The result is sent as the task finishes, and the message is acked alongside: give the
    // ack a moment to reach the server.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut info = consumer.info().await.unwrap().clone();
    while info.num_ack_pending > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        info = consumer.info().await.unwrap().clone();
    }
    assert_eq!((info.num_redelivered, info.num_ack_pending, info.num_pending), (0, 0, 0), "{info:?}\n{}", acceld.log());

    // The consumer goes away: the source cannot read, and health says so until it can.
    js.get_stream("IMAGES").await.unwrap().delete_consumer("acceld").await.unwrap();
    let health = wait_for_sources(&acceld, &["bus"], "restarting", Duration::from_secs(120)).await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(health["sources"]["bus"]["error"].as_str().is_some_and(|e| !e.is_empty()), "{health}");
    assert!(acceld.metrics().await.lines().any(|l| l == "accel_source_up{source=\"bus\"} 0"));
}

async fn health(d: &Acceld) -> Value {
    reqwest::get(d.url("/api/v1/health")).await.unwrap().json().await.unwrap()
}

/// Waits until the health answer is `ok` by `what`, and returns it.
async fn wait_for_health(d: &Acceld, what: &str, within: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let h = health(d).await;
        if ok(&h) {
            return h;
        }
        assert!(Instant::now() < deadline, "health does not show {what} within {within:?}: {h}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until health shows `state` for each of `sources`, and returns that answer.
async fn wait_for_sources(d: &Acceld, sources: &[&str], state: &str, within: Duration) -> Value {
    wait_for_health(d, &format!("{sources:?} {state}"), within, |h| sources.iter().all(|s| h["sources"][s]["state"] == state)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_that_goes_away_shows_in_health_and_its_return_is_picked_up() {
    let reg = RegistryServer::start(RegistryAuth::None);
    let mut nats = NatsServer::start();
    let url = nats.url();
    let body = format!(
        r#"
sources:
  js: {{ kind: jetstream, url: "{url}", stream: IMAGES, subjects: ["images.>"], consumer: acceld, create: true }}
  core: {{ kind: nats, url: "{url}", subject: core.images }}
sinks:
  bus: {{ kind: nats, url: "{url}", subject: results }}
pipelines:
  - name: accelerate
    convert: [{{ driver: estargz, options: {{ compression_level: 1 }} }}]
    sinks: [bus]
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Acceld::start(dir.path(), &reg.host(), &body).await;
    let h = wait_for_sources(&d, &["js", "core"], "reading", Duration::from_secs(30)).await;
    assert_eq!(h["status"], "ok", "{h}");

    // The server goes away: both sources say so, and acceld keeps running.
    nats.stop();
    let h = wait_for_sources(&d, &["js", "core"], "disconnected", Duration::from_secs(30)).await;
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(h["sources"]["js"]["error"].as_str().is_some_and(|e| e.contains(&url)), "{h}");
    let metrics = d.metrics().await;
    for s in ["js", "core"] {
        assert!(metrics.lines().any(|l| l == format!("accel_source_up{{source=\"{s}\"}} 0")), "{metrics}");
    }

    // Back on the same port with the same store: both read on without a restart.
    nats.restart();
    let h = wait_for_sources(&d, &["js", "core"], "reading", Duration::from_secs(60)).await;
    assert_eq!(h["status"], "ok", "{h}");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let results = Results::subscribe(&client, "results").await;
    let js = jetstream::new(client.clone());
    let one = handmade_image().build().push(&reg.host(), "library/one:1");
    let two = handmade_image().build().push(&reg.host(), "library/two:1");
    js_publish(&js, "images.pushed", json!({ "reference": format!("{}@{}", one.reference, one.digest) }).to_string()).await;
    // Core NATS keeps nothing: ask until acceld's subscription is back and answers.
    let plain = json!({ "reference": format!("{}@{}", two.reference, two.digest) }).to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        match client.request("core.images", plain.clone().into()).await {
            Ok(a) => break a,
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("the core source does not answer: {e}\n{}", d.log()),
        }
    };
    assert_eq!(String::from_utf8_lossy(&answer.payload), r#"{"accepted":true}"#);
    for image in [&one, &two] {
        let r = results.wait_for(&format!("{}@{}", image.reference, image.digest), Duration::from_secs(120), || d.log()).await;
        assert_eq!(r["data"]["status"], "COMPLETED", "{r}");
    }
    verify_estargz(&reg, "library/one", "1-esgz", &one);
    verify_estargz(&reg, "library/two", "1-esgz", &two);
    let log = d.log();
    assert!(log.contains("lost the connection to NATS"), "{log}");
    assert!(!log.contains("starting it again"), "a source was restarted although only the server was away:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_messages_held_when_acceld_stops_are_converted_after_the_restart() {
    let reg = RegistryServer::start(RegistryAuth::None);
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let url = nats.url();
    // One conversion at a time and a queue of one: the messages after that wait in acceld.
    let body = format!(
        r#"
sources:
  core: {{ kind: nats, url: "{url}", subject: core.images }}
pipelines:
  - name: accelerate
    concurrency: 1
    convert: [{{ driver: estargz, options: {{ compression_level: 1 }} }}]
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let mut d = Acceld::start_with(dir.path(), &reg.host(), &body, &[], "queue_size: 1").await;
    let big = debian_image("amd64").build().push(&reg.host(), "library/big:1");
    let small: Vec<PushedImage> = (0..3).map(|i| handmade_image().build().push(&reg.host(), &format!("library/small{i}:1"))).collect();
    let event = |i: &PushedImage| Bytes::from(json!({ "reference": format!("{}@{}", i.reference, i.digest) }).to_string());
    client.publish("core.images", event(&big)).await.unwrap();
    client.flush().await.unwrap();
    wait_until("the big conversion runs", Duration::from_secs(60), || d.log().contains(&format!("converting image {}", big.reference))).await;
    for s in &small {
        client.publish("core.images", event(s)).await.unwrap();
    }
    client.flush().await.unwrap();
    // The first small one is queued; the other two wait for room.
    wait_until("two messages wait for room in the queue", Duration::from_secs(30), || d.log().matches("cannot take the message yet").count() >= 2).await;
    d.stop();
    let log = d.log();
    assert_eq!(log.matches("is stored and converted at the next start").count(), 2, "{log}");
    assert!(!log.contains("it is lost"), "{log}");

    // The next start converts everything, the two held messages included.
    let d = Acceld::start_with(dir.path(), &reg.host(), &body, &[], "queue_size: 1").await;
    let repos = [("library/big", &big), ("library/small0", &small[0]), ("library/small1", &small[1]), ("library/small2", &small[2])];
    wait_until("every image converted after the restart", Duration::from_secs(600), || {
        repos.iter().all(|(repo, _)| reg.tag_digest(repo, "1-esgz").is_some())
    })
    .await;
    for (repo, image) in &repos[1..] {
        verify_estargz(&reg, repo, "1-esgz", image);
    }
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_fails_shows_in_health_until_its_results_go_through() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let reg = RegistryServer::start(RegistryAuth::None);
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    // A receiver that answers 503 while `down`, and counts what it took.
    let down = Arc::new(AtomicBool::new(true));
    let took = Arc::new(AtomicUsize::new(0));
    let (d2, t2) = (down.clone(), took.clone());
    let app = axum::Router::new().route(
        "/results",
        axum::routing::post(move || {
            let (down, took) = (d2.clone(), t2.clone());
            async move {
                if down.load(Ordering::SeqCst) {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down")
                } else {
                    took.fetch_add(1, Ordering::SeqCst);
                    (axum::http::StatusCode::OK, "ok")
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/results", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let url = nats.url();
    let body = format!(
        r#"
sources:
  core: {{ kind: nats, url: "{url}", subject: core.images }}
sinks:
  hook: {{ kind: http, url: "{hook}", max_attempts: 1 }}
pipelines:
  - name: accelerate
    convert: [{{ driver: estargz, options: {{ compression_level: 1 }} }}]
    sinks: [hook]
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Acceld::start(dir.path(), &reg.host(), &body).await;
    let h = health(&d).await;
    assert_eq!((h["status"].as_str(), h["sinks"]["hook"]["state"].as_str()), (Some("ok"), Some("delivering")), "{h}");

    let app = handmade_image().build().push(&reg.host(), "library/app:1");
    client.publish("core.images", json!({ "reference": format!("{}@{}", app.reference, app.digest) }).to_string().into()).await.unwrap();
    client.flush().await.unwrap();
    let h = wait_for_health(&d, "the sink failing", Duration::from_secs(120), |h| h["sinks"]["hook"]["state"] == "failing").await;
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(h["sinks"]["hook"]["error"].as_str().is_some_and(|e| e.contains("503")), "{h}");
    assert!(h["message"].as_str().is_some_and(|m| m.contains("hook")), "{h}");
    assert!(d.metrics().await.lines().any(|l| l == "accel_sink_up{sink=\"hook\"} 0"));
    assert_eq!(took.load(Ordering::SeqCst), 0);

    // The receiver is back: the held result goes through, and health is ok again.
    down.store(false, Ordering::SeqCst);
    wait_for_health(&d, "ok with the sink delivering", Duration::from_secs(60), |h| h["status"] == "ok" && h["sinks"]["hook"]["state"] == "delivering").await;
    assert_eq!(took.load(Ordering::SeqCst), 1);
    assert!(d.metrics().await.lines().any(|l| l == "accel_sink_up{sink=\"hook\"} 1"));
}
