//! Counters of API requests, in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::pipeline::metrics::{label, Histogram};

/// Upper bounds (seconds) of the request duration buckets.
const BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];

#[derive(Default)]
pub struct HttpMetrics {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// By (method, route, status).
    requests: BTreeMap<(String, String, u16), u64>,
    /// By (method, route).
    durations: BTreeMap<(String, String), Histogram>,
}

impl HttpMetrics {
    /// `route` is the matched route pattern (never the raw path, which would grow without bound).
    pub fn observe(&self, method: &str, route: &str, status: u16, took: Duration) {
        let mut m = self.inner.lock().unwrap();
        *m.requests.entry((method.into(), route.into(), status)).or_default() += 1;
        m.durations.entry((method.into(), route.into())).or_insert_with(|| Histogram::new(BUCKETS)).observe(took.as_secs_f64());
    }

    pub fn render(&self, out: &mut String) {
        let m = self.inner.lock().unwrap();
        let _ = writeln!(out, "# HELP accel_http_requests_total API requests, by method, route and status.");
        let _ = writeln!(out, "# TYPE accel_http_requests_total counter");
        for ((method, route, status), n) in &m.requests {
            let _ = writeln!(out, "accel_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {n}", label(method), label(route));
        }
        let _ = writeln!(out, "# HELP accel_http_request_duration_seconds Time to answer API requests.");
        let _ = writeln!(out, "# TYPE accel_http_request_duration_seconds histogram");
        for ((method, route), h) in &m.durations {
            h.write(out, "accel_http_request_duration_seconds", &format!("method=\"{}\",route=\"{}\"", label(method), label(route)));
        }
    }
}
