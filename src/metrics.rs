//! Prometheus text exposition (format 0.0.4), written by hand.
//!
//! Owns: counters, gauges and histograms with labels, kept in a [`Registry`]
//! that renders them in registration order. Every role's `/metrics` endpoint
//! uses it. Must not: know metric names (roles choose them) or do I/O.
//!
//! Label sets are created on first use, so callers must only pass values from
//! a bounded set (status codes, known paths), never raw client input.
//!
//! ```
//! use apiserver_proxy::metrics::Registry;
//! let registry = Registry::new();
//! let requests = registry.counter("demo_requests_total", "Requests served.", &["code"]);
//! requests.inc(&["200"]);
//! assert!(registry.render().contains("demo_requests_total{code=\"200\"} 1\n"));
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The `Content-Type` of [`Registry::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Latency buckets in seconds, from 100 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Metrics are plain numbers: a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Default, Clone)]
struct Series {
    /// Counter or gauge value; the sum for histograms.
    value: f64,
    /// Histogram only: per-bucket (non-cumulative) counts, then the count.
    buckets: Vec<u64>,
    count: u64,
}

struct Family {
    name: String,
    help: String,
    kind: Kind,
    labels: Vec<String>,
    bounds: Vec<f64>,
    series: Mutex<BTreeMap<Vec<String>, Series>>,
}

impl Family {
    fn update(&self, values: &[&str], change: impl FnOnce(&mut Series)) {
        let key = self.key(values);
        let mut series = lock(&self.series);
        let entry = series.entry(key).or_insert_with(|| Series {
            buckets: vec![0; self.bounds.len()],
            ..Series::default()
        });
        change(entry);
    }

    /// Label values padded or cut to the declared label count, so a caller's
    /// mistake shows in the output instead of panicking.
    fn key(&self, values: &[&str]) -> Vec<String> {
        (0..self.labels.len())
            .map(|i| values.get(i).copied().unwrap_or("").to_string())
            .collect()
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, escape_help(&self.help));
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind.name());
        let series = lock(&self.series);
        if series.is_empty() && self.labels.is_empty() {
            // An unlabelled metric exists from registration on, at zero.
            self.render_series(
                out,
                &[],
                &Series {
                    buckets: vec![0; self.bounds.len()],
                    ..Series::default()
                },
            );
        }
        for (values, s) in series.iter() {
            self.render_series(out, values, s);
        }
    }

    fn render_series(&self, out: &mut String, values: &[String], s: &Series) {
        let labels = label_text(&self.labels, values, None);
        match self.kind {
            Kind::Counter | Kind::Gauge => {
                let _ = writeln!(out, "{}{labels} {}", self.name, number(s.value));
            }
            Kind::Histogram => {
                let mut cumulative = 0;
                for (bound, n) in self.bounds.iter().zip(&s.buckets) {
                    cumulative += n;
                    let le = label_text(&self.labels, values, Some(&number(*bound)));
                    let _ = writeln!(out, "{}_bucket{le} {cumulative}", self.name);
                }
                let le = label_text(&self.labels, values, Some("+Inf"));
                let _ = writeln!(out, "{}_bucket{le} {}", self.name, s.count);
                let _ = writeln!(out, "{}_sum{labels} {}", self.name, number(s.value));
                let _ = writeln!(out, "{}_count{labels} {}", self.name, s.count);
            }
        }
    }
}

fn label_text(names: &[String], values: &[String], le: Option<&str>) -> String {
    if names.is_empty() && le.is_none() {
        return String::new();
    }
    let mut parts: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape_label(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    format!("{{{}}}", parts.join(","))
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Prometheus number syntax: integers without a fraction, `+Inf`, `NaN`.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_string()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// A set of metric families rendered together. Cheap to share behind `Arc`.
#[derive(Default)]
pub struct Registry {
    families: Mutex<Vec<Arc<Family>>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn register(
        &self,
        name: &str,
        help: &str,
        kind: Kind,
        labels: &[&str],
        bounds: &[f64],
    ) -> Arc<Family> {
        let family = Arc::new(Family {
            name: name.to_string(),
            help: help.to_string(),
            kind,
            labels: labels.iter().map(|l| l.to_string()).collect(),
            bounds: bounds.to_vec(),
            series: Mutex::new(BTreeMap::new()),
        });
        lock(&self.families).push(family.clone());
        family
    }

    /// A monotonically increasing count.
    pub fn counter(&self, name: &str, help: &str, labels: &[&str]) -> Counter {
        Counter(self.register(name, help, Kind::Counter, labels, &[]))
    }

    /// A value that goes up and down.
    pub fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> Gauge {
        Gauge(self.register(name, help, Kind::Gauge, labels, &[]))
    }

    /// A histogram with the given upper bucket bounds (ascending; `+Inf` is
    /// implicit).
    pub fn histogram(&self, name: &str, help: &str, labels: &[&str], bounds: &[f64]) -> Histogram {
        Histogram(self.register(name, help, Kind::Histogram, labels, bounds))
    }

    /// Every family in registration order, in the text exposition format.
    pub fn render(&self) -> String {
        let families: Vec<Arc<Family>> = lock(&self.families).clone();
        let mut out = String::new();
        for family in families {
            family.render(&mut out);
        }
        out
    }
}

/// A counter family; `labels` are values for the declared label names.
#[derive(Clone)]
pub struct Counter(Arc<Family>);

impl Counter {
    pub fn inc(&self, labels: &[&str]) {
        self.add(labels, 1);
    }

    pub fn add(&self, labels: &[&str], n: u64) {
        self.0.update(labels, |s| s.value += n as f64);
    }

    /// The current value (0 for a label set never used).
    pub fn value(&self, labels: &[&str]) -> f64 {
        let key = self.0.key(labels);
        lock(&self.0.series).get(&key).map_or(0.0, |s| s.value)
    }
}

/// A gauge family.
#[derive(Clone)]
pub struct Gauge(Arc<Family>);

impl Gauge {
    pub fn set(&self, labels: &[&str], value: f64) {
        self.0.update(labels, |s| s.value = value);
    }

    pub fn add(&self, labels: &[&str], delta: f64) {
        self.0.update(labels, |s| s.value += delta);
    }

    pub fn value(&self, labels: &[&str]) -> f64 {
        let key = self.0.key(labels);
        lock(&self.0.series).get(&key).map_or(0.0, |s| s.value)
    }
}

/// A histogram family.
#[derive(Clone)]
pub struct Histogram(Arc<Family>);

impl Histogram {
    pub fn observe(&self, labels: &[&str], value: f64) {
        let slot = self.0.bounds.iter().position(|b| value <= *b);
        self.0.update(labels, |s| {
            if let Some(i) = slot {
                s.buckets[i] += 1;
            }
            s.count += 1;
            s.value += value;
        });
    }

    /// How many observations the label set has.
    pub fn count(&self, labels: &[&str]) -> u64 {
        let key = self.0.key(labels);
        lock(&self.0.series).get(&key).map_or(0, |s| s.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let registry = Registry::new();
        let requests = registry.counter("x_requests_total", "Requests by code.", &["path", "code"]);
        let open = registry.gauge("x_open", "Open things.", &[]);
        let latency = registry.histogram("x_seconds", "Latency.", &["path"], &[0.1, 1.0]);
        let idle = registry.counter("x_idle_total", "Never touched.", &[]);
        requests.inc(&["/a", "200"]);
        requests.add(&["/a", "200"], 2);
        requests.inc(&["/b", "404"]);
        open.set(&[], 3.0);
        open.add(&[], -1.0);
        latency.observe(&["/a"], 0.05);
        latency.observe(&["/a"], 0.5);
        latency.observe(&["/a"], 5.0);
        assert_eq!(requests.value(&["/a", "200"]), 3.0);
        assert_eq!(idle.value(&[]), 0.0);
        assert_eq!(latency.count(&["/a"]), 3);
        let text = registry.render();
        let expected = "\
# HELP x_requests_total Requests by code.
# TYPE x_requests_total counter
x_requests_total{path=\"/a\",code=\"200\"} 3
x_requests_total{path=\"/b\",code=\"404\"} 1
# HELP x_open Open things.
# TYPE x_open gauge
x_open 2
# HELP x_seconds Latency.
# TYPE x_seconds histogram
x_seconds_bucket{path=\"/a\",le=\"0.1\"} 1
x_seconds_bucket{path=\"/a\",le=\"1\"} 2
x_seconds_bucket{path=\"/a\",le=\"+Inf\"} 3
x_seconds_sum{path=\"/a\"} 5.55
x_seconds_count{path=\"/a\"} 3
# HELP x_idle_total Never touched.
# TYPE x_idle_total counter
x_idle_total 0
";
        assert_eq!(text, expected);
    }

    #[test]
    fn escapes_labels_and_help_and_tolerates_wrong_label_counts() {
        let registry = Registry::new();
        let c = registry.counter("y_total", "a \\ b\nc", &["v"]);
        c.inc(&["q\"u\\o\nte"]);
        c.inc(&[]);
        c.inc(&["a", "extra"]);
        let text = registry.render();
        assert!(text.contains("# HELP y_total a \\\\ b\\nc\n"), "{text}");
        assert!(
            text.contains("y_total{v=\"q\\\"u\\\\o\\nte\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("y_total{v=\"\"} 1\n"), "{text}");
        assert!(text.contains("y_total{v=\"a\"} 1\n"), "{text}");
    }

    #[test]
    fn numbers_use_prometheus_syntax() {
        assert_eq!(number(1.0), "1");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NAN), "NaN");
    }
}
