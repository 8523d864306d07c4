//! End to end over Kafka: the real `acceld` binary reading topics of the `tansu` broker through
//! a consumer group, converting images in Debian's `docker-registry`, and publishing results to
//! a Kafka topic; malformed messages dead-lettered with headers; a restart resuming at the
//! committed offset; Harbor webhooks forwarded into Kafka; start-up errors; a broker that goes
//! away and comes back (health); and two instances in one group, the converting one killed
//! with SIGKILL.

mod common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use accel::oci::annotations;
use common::acceld::{start_fails, Acceld};
use common::fixtures::{check_estargz, debian_image, handmade_image, PushedImage};
use common::kafka::Tansu;
use common::registry::{free_port, RegistryAuth, RegistryServer};

/// The plain event for `image`: its reference by digest.
fn event(image: &PushedImage) -> String {
    json!({ "reference": format!("{}@{}", image.reference, image.digest) }).to_string()
}

fn subject(image: &PushedImage) -> String {
    format!("{}@{}", image.reference, image.digest)
}

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

async fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {within:?}\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How often acceld converted `image` according to its log.
fn conversions(log: &str, image: &PushedImage) -> usize {
    log.matches(&format!("converting image {}", image.reference)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_events_are_converted_and_results_published_to_kafka() {
    let reg = RegistryServer::start(RegistryAuth::None);
    let kafka = Tansu::start();
    for t in ["images", "images.dead", "results"] {
        kafka.create_topic(t, 1).await;
    }
    let results = kafka.follow("results", 1);
    let dead = kafka.follow("images.dead", 1);
    let brokers = kafka.brokers();
    let body = format!(
        r#"
sources:
  k: {{ kind: kafka, brokers: "{brokers}", topic: images, group: acceld, dead_letter_topic: images.dead, session_timeout_secs: 6 }}
sinks:
  r: {{ kind: kafka, brokers: ["{brokers}"], topic: results }}
pipelines:
  - name: accelerate
    convert: [{{ driver: estargz, options: {{ compression_level: 1 }} }}]
    sinks: [r]
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Acceld::start(dir.path(), &reg.host(), &body).await;
    let producer = kafka.producer();

    let app = handmade_image().build().push(&reg.host(), "library/app:1");
    producer.send("images", None, &event(&app), &[("content-type", "application/json")]).await;
    let r = results.result_for(&subject(&app), Duration::from_secs(180), || d.log()).await;
    assert_eq!(r["specversion"], "1.0");
    assert_eq!(r["type"], "io.accel.conversion.completed", "{r}");
    assert_eq!(r["data"]["status"], "COMPLETED", "{r}");
    assert_eq!(r["data"]["origin"], "k");
    assert_eq!(r["data"]["targets"][0]["reference"], format!("{}-esgz", app.reference));
    verify_estargz(&reg, "library/app", "1-esgz", &app);
    let record = results.all().into_iter().find(|rec| rec.json()["subject"] == subject(&app)).unwrap();
    assert_eq!(record.headers.get("content-type").map(String::as_str), Some("application/cloudevents+json"));
    assert_eq!(record.key.as_deref(), Some(subject(&app).as_str()), "results are keyed by their subject");

    // A malformed message is dead-lettered with the reason and where it was read; the source
    // goes on with the next one.
    let bad_offset = producer.send_keyed("images", None, Some("app-7"), "{oops", &[("trace-id", "t-1"), ("Accel-Error", "forged")]).await;
    let two = handmade_image().build().push(&reg.host(), "library/two:1");
    producer.send("images", None, &event(&two), &[]).await;
    let letters = dead.wait_count(1, Duration::from_secs(60), || d.log()).await;
    let letter = &letters[0];
    assert_eq!(letter.body, b"{oops");
    assert!(letter.headers["Accel-Error"].contains("not valid JSON"), "{letter:?}");
    assert_eq!(letter.headers["Accel-Source"], "k");
    assert_eq!(letter.headers["Accel-Location"], format!("topic images partition 0 offset {bad_offset}"));
    // The record's key and its own headers go on with it; the letter's headers replace any
    // of the same name.
    assert_eq!(letter.key.as_deref(), Some("app-7"));
    assert_eq!(letter.headers.get("trace-id").map(String::as_str), Some("t-1"));
    let r = results.result_for(&subject(&two), Duration::from_secs(120), || d.log()).await;
    assert_eq!(r["data"]["status"], "COMPLETED", "{r}");

    // Everything read is committed: the group's offset is the end of the topic.
    wait_until(
        "the group committed the end of the topic",
        Duration::from_secs(30),
        || kafka.committed("acceld", "images", 1) == kafka.ends("images", 1),
        || d.log(),
    )
    .await;
    let m = d.metrics().await;
    for line in [
        r#"accel_source_messages_total{source="k",outcome="dead_lettered"} 1"#,
        r#"accel_source_messages_total{source="k",outcome="malformed"} 1"#,
        r#"accel_source_messages_total{source="k",outcome="accepted"} 2"#,
    ] {
        assert!(m.lines().any(|l| l == line), "metrics lack {line}:\n{m}");
    }
    assert!(d.log().contains("malformed message sent to Kafka topic images.dead"), "{}", d.log());
    assert_eq!(results.all().len(), 2, "{:?}", results.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_at_the_committed_offset() {
    let reg = RegistryServer::start(RegistryAuth::None);
    let kafka = Tansu::start();
    kafka.create_topic("images", 1).await;
    kafka.create_topic("results", 1).await;
    let results = kafka.follow("results", 1);
    let brokers = kafka.brokers();
    let body = format!(
        r#"
sources:
  k: {{ kind: kafka, brokers: "{brokers}", topic: images, group: acceld, session_timeout_secs: 6 }}
sinks:
  r: {{ kind: kafka, brokers: "{brokers}", topic: results }}
pipelines:
  - name: accelerate
    convert: [{{ driver: estargz, options: {{ compression_level: 1 }} }}]
    sinks: [r]
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let producer = kafka.producer();
    let first: Vec<PushedImage> = (0..2).map(|i| handmade_image().build().push(&reg.host(), &format!("library/first{i}:1"))).collect();
    let mut d = Acceld::start(dir.path(), &reg.host(), &body).await;
    for i in &first {
        producer.send("images", None, &event(i), &[]).await;
    }
    for i in &first {
        results.result_for(&subject(i), Duration::from_secs(180), || d.log()).await;
    }
    wait_until("the group committed both events", Duration::from_secs(30), || kafka.committed("acceld", "images", 1) == vec![2], || d.log()).await;
    d.stop();
    let before = d.log();

    // Published while acceld is down: read after the restart; the committed ones are not.
    let later = handmade_image().build().push(&reg.host(), "library/later:1");
    producer.send("images", None, &event(&later), &[]).await;
    let d = Acceld::start(dir.path(), &reg.host(), &body).await;
    let r = results.result_for(&subject(&later), Duration::from_secs(180), || d.log()).await;
    assert_eq!(r["data"]["status"], "COMPLETED", "{r}");
    wait_until("the group committed the new event", Duration::from_secs(30), || kafka.committed("acceld", "images", 1) == vec![3], || d.log()).await;
    let after = &d.log()[before.len()..];
    for i in &first {
        assert_eq!(conversions(after, i), 0, "{} converted again after the restart:\n{after}", i.reference);
    }
    assert_eq!(conversions(after, &later), 1, "{after}");
    assert_eq!(results.all().len(), 3, "{:?}", results.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harbor_webhooks_forwarded_into_kafka_are_converted_from_the_topic() {
    let reg = RegistryServer::start(RegistryAuth::None);
    let kafka = Tansu::start();
    kafka.create_topic("harbor", 1).await;
    kafka.create_topic("results", 1).await;
    let results = kafka.follow("results", 1);
    let forwarded = kafka.follow("harbor", 1);
    let brokers = kafka.brokers();
    let body = format!(
        r#"
sources:
  harbor: {{ kind: harbor, forward: {{ kind: kafka, brokers: "{brokers}", topic: harbor }} }}
  bus: {{ kind: kafka, brokers: "{brokers}", topic: harbor, group: acceld }}
sinks:
  r: {{ kind: kafka, brokers: "{brokers}", topic: results }}
pipelines:
  - name: accelerate
    sources: [bus]
    convert: [{{ driver: estargz, options: {{ compression_level: 1 }} }}]
    sinks: [r]
"#
    );
    let dir = tempfile::tempdir().unwrap();
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
    assert_eq!(answer["forwarded"], "Kafka topic harbor", "{answer}");
    // Answered after the broker stored it: the record is there.
    assert_eq!(kafka.ends("harbor", 1), vec![1]);
    let resp = reqwest::Client::new().post(d.url("/api/v1/conversions")).body(r#"{"type":"PUSH_ARTIFACT"}"#).send().await.unwrap();
    assert_eq!(resp.status(), 400, "a bad webhook is refused before it reaches the topic");

    let r = results.result_for(&subject(&app), Duration::from_secs(180), || d.log()).await;
    assert_eq!(r["data"]["status"], "COMPLETED", "{r}");
    assert_eq!(r["data"]["origin"], "bus");
    verify_estargz(&reg, "library/hooked", "1-esgz", &app);
    let records = forwarded.wait_count(1, Duration::from_secs(10), || d.log()).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].headers.get("Accel-Source").map(String::as_str), Some("harbor"));
    assert_eq!(kafka.ends("harbor", 1), vec![1], "the refused webhook was not forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_or_missing_topic_stops_start_up_with_the_reason() {
    let reg = RegistryServer::start(RegistryAuth::None);
    let kafka = Tansu::start();
    kafka.create_topic("images", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let brokers = kafka.brokers();
    let pipeline = "pipelines: [{ name: p, convert: [{ driver: estargz }], sinks: [s] }]";
    let err = start_fails(
        &dir.path().join("a"),
        &reg.host(),
        &format!("sources: {{ k: {{ kind: kafka, brokers: \"{brokers}\", topic: nope, group: g }} }}\nsinks: {{ s: {{ kind: stdout }} }}\n{pipeline}"),
    );
    assert!(err.contains("topic nope does not exist on the Kafka brokers"), "{err}");
    assert!(err.contains(&brokers), "{err}");
    let err = start_fails(
        &dir.path().join("b"),
        &reg.host(),
        &format!("sources: {{ k: {{ kind: kafka, brokers: \"{brokers}\", topic: images, group: g, dead_letter_topic: dead }} }}\nsinks: {{ s: {{ kind: stdout }} }}\n{pipeline}"),
    );
    assert!(err.contains("topic dead does not exist"), "{err}");
    let err = start_fails(&dir.path().join("c"), &reg.host(), &format!("sinks: {{ s: {{ kind: kafka, brokers: \"{brokers}\", topic: nobody }} }}\n{pipeline}"));
    assert!(err.contains("sink \"s\"") && err.contains("topic nobody does not exist"), "{err}");
    let dead = format!("127.0.0.1:{}", free_port());
    let err = start_fails(
        &dir.path().join("d"),
        &reg.host(),
        &format!("sources: {{ k: {{ kind: kafka, brokers: \"{dead}\", topic: images, group: g }} }}\nsinks: {{ s: {{ kind: stdout }} }}\n{pipeline}"),
    );
    assert!(err.contains("cannot reach the Kafka brokers") && err.contains(&dead), "{err}");
}

async fn health(d: &Acceld) -> Value {
    reqwest::get(d.url("/api/v1/health")).await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_goes_away_shows_in_health_and_its_return_is_picked_up() {
    let reg = RegistryServer::start(RegistryAuth::None);
    let mut kafka = Tansu::start();
    kafka.create_topic("images", 1).await;
    let port = kafka.port;
    let body = format!(
        r#"
sources:
  k: {{ kind: kafka, brokers: "{}", topic: images, group: acceld, session_timeout_secs: 6,
       client_options: {{ topic.metadata.refresh.interval.ms: 1000 }} }}
sinks:
  s: {{ kind: stdout }}
pipelines:
  - name: accelerate
    convert: [{{ driver: estargz, options: {{ compression_level: 1 }} }}]
    sinks: [s]
"#,
        kafka.brokers()
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Acceld::start(dir.path(), &reg.host(), &body).await;
    let h = health(&d).await;
    assert_eq!((h["status"].as_str(), h["sources"]["k"]["state"].as_str()), (Some("ok"), Some("reading")), "{h}");

    kafka.kill();
    let deadline = Instant::now() + Duration::from_secs(90);
    let h = loop {
        let h = health(&d).await;
        if h["sources"]["k"]["state"] == "disconnected" {
            break h;
        }
        assert!(Instant::now() < deadline, "health never shows the broker gone: {h}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(h["sources"]["k"]["error"].as_str().is_some_and(|e| e.contains("no Kafka broker answers")), "{h}");
    assert!(d.metrics().await.lines().any(|l| l == "accel_source_up{source=\"k\"} 0"));
    // Said once, not at every retry of the client.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(d.log().matches("no Kafka broker answers").count(), 1, "{}", d.log());

    // A broker is back on the same address: an empty one, as tansu keeps topics in memory, so
    // the source may first see no topic; the short metadata refresh above makes it notice the
    // topic soon after it is created.
    let kafka = Tansu::start_on(port);
    kafka.create_topic("images", 1).await;
    let app = handmade_image().build().push(&reg.host(), "library/app:1");
    kafka.producer().send("images", None, &event(&app), &[]).await;
    wait_until("the source sees the broker again", Duration::from_secs(120), || d.log().contains("the Kafka brokers answer again"), || d.log()).await;
    wait_until("the event sent after the return is converted", Duration::from_secs(180), || reg.tag_digest("library/app", "1-esgz").is_some(), || d.log())
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = health(&d).await;
        if h["status"] == "ok" {
            assert_eq!(h["sources"]["k"]["state"], "reading", "{h}");
            break;
        }
        assert!(Instant::now() < deadline, "health not ok again: {h}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(d.metrics().await.lines().any(|l| l == "accel_source_up{source=\"k\"} 1"));
    assert!(!d.log().contains("read errors in a row"), "the source was restarted although only the broker was away:\n{}", d.log());
    verify_estargz(&reg, "library/app", "1-esgz", &app);
}

/// The last `partitions assigned:` line of an acceld log (`none` or a list).
fn last_assignment(log: &str) -> Option<String> {
    log.lines().rev().find_map(|l| l.split_once("partitions assigned: ").map(|(_, a)| a.trim().to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_group_and_one_killed_mid_conversion_loses_nothing() {
    let reg = RegistryServer::start(RegistryAuth::None);
    let kafka = Tansu::start();
    kafka.create_topic("images", 2).await;
    kafka.create_topic("results", 1).await;
    let results = kafka.follow("results", 1);
    let brokers = kafka.brokers();
    // One message at a time per instance, committed when converted. A member silent for 6 s
    // leaves the group; a member idle while another's partition has not moved for 15 s joins
    // the group again, which makes the broker hand out every partition anew.
    let body = format!(
        r#"
sources:
  k: {{ kind: kafka, brokers: "{brokers}", topic: images, group: acceld, max_in_flight: 1, session_timeout_secs: 6, rejoin_stalled_secs: 15 }}
sinks:
  r: {{ kind: kafka, brokers: "{brokers}", topic: results }}
pipelines:
  - name: accelerate
    convert: [{{ driver: estargz, options: {{ compression_level: 9 }} }}]
    sinks: [r]
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let mut a = Acceld::start(&dir.path().join("a"), &reg.host(), &body).await;
    let mut b = Acceld::start(&dir.path().join("b"), &reg.host(), &body).await;
    let both = || format!("a:\n{}\nb:\n{}", a.log(), b.log());
    // Each member holds one of the two partitions.
    wait_until(
        "each instance holds a partition",
        Duration::from_secs(120),
        || [&a, &b].iter().all(|d| last_assignment(&d.log()).is_some_and(|p| p.starts_with("images[") && !p.contains(','))),
        both,
    )
    .await;

    let big = debian_image("amd64").build().push(&reg.host(), "library/big:1");
    let small: Vec<PushedImage> = (0..3).map(|i| handmade_image().build().push(&reg.host(), &format!("library/small{i}:1"))).collect();
    let producer = kafka.producer();
    producer.send("images", Some(0), &event(&big), &[]).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let a_has_it = loop {
        if conversions(&a.log(), &big) > 0 {
            break true;
        }
        if conversions(&b.log(), &big) > 0 {
            break false;
        }
        assert!(Instant::now() < deadline, "nobody converts the big image:\n{}", both());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for s in &small {
        producer.send("images", Some(1), &event(s), &[]).await;
    }
    let (victim, survivor) = if a_has_it { (&mut a, &mut b) } else { (&mut b, &mut a) };
    // The survivor converts the small ones of its partition meanwhile.
    for s in &small {
        results.result_for(&subject(s), Duration::from_secs(120), || survivor.log()).await;
    }
    assert!(reg.tag_digest("library/big", "1-esgz").is_none(), "the big conversion ended before the kill");
    victim.kill9();

    let log = || format!("survivor:\n{}\nbroker:\n{}", survivor.log(), kafka.log());
    let r = results.result_for(&subject(&big), Duration::from_secs(600), log).await;
    assert_eq!(r["data"]["status"], "COMPLETED", "{r}");
    assert_eq!(conversions(&survivor.log(), &big), 1, "the survivor converted the unfinished message");
    verify_estargz(&reg, "library/big", "1-esgz", &big);
    for s in &small {
        let (_, rest) = s.reference.split_once('/').unwrap();
        let (repo, _) = rest.rsplit_once(':').unwrap();
        assert!(reg.tag_digest(repo, "1-esgz").is_some(), "{repo}:1-esgz pushed");
        let times = conversions(&victim.log(), s) + conversions(&survivor.log(), s);
        assert_eq!(times, 1, "{} converted {times} times", s.reference);
    }
    // Each event has one result; the group has committed the end of both partitions.
    assert_eq!(results.all().len(), 4, "{:?}", results.all());
    wait_until(
        "the group committed the end of both partitions",
        Duration::from_secs(30),
        || kafka.committed("acceld", "images", 2) == kafka.ends("images", 2),
        log,
    )
    .await;
}
