//! The webhook's HTTP routes and metrics.
//!
//! Owns: routing (`POST /webhook/pod-apiserver-env`, `GET /healthz`,
//! `/readyz`, `/metrics`), the content checks in front of [`super::review`]
//! (405, 415, 400 with a short JSON reason) and the metric families.
//! Must not: read sockets (the [`crate::http`] server hands over a complete
//! request) or decide patches (that is [`super::review`]).

use std::sync::Arc;

use crate::http::{Request, Response};
use serde_json::json;

use super::review;
use crate::http::{Exchange, Handler, Observer};
use crate::metrics::{self, Counter, Histogram, Registry};
use crate::shutdown::Shutdown;
use crate::tls::Reloader;

/// The admission endpoint, as upstream serves it.
pub const WEBHOOK_PATH: &str = "/webhook/pod-apiserver-env";

/// The webhook's metric families.
pub struct Metrics {
    registry: Registry,
    requests: Counter,
    latency: Histogram,
    reviews: Counter,
    patches: Counter,
    patched_containers: Counter,
    reloads: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = registry.counter(
            "apiserver_proxy_webhook_requests_total",
            "HTTP requests answered, by path (known paths only; others are \"other\") and status code.",
            &["path", "code"],
        );
        let latency = registry.histogram(
            "apiserver_proxy_webhook_request_duration_seconds",
            "Time from a complete request head to the answer written, by path.",
            &["path"],
            metrics::LATENCY_BUCKETS,
        );
        let reviews = registry.counter(
            "apiserver_proxy_webhook_reviews_total",
            "Admission reviews, by result: patched, unchanged or invalid.",
            &["result"],
        );
        let patches = registry.counter(
            "apiserver_proxy_webhook_patches_total",
            "Admission reviews answered with a JSON patch.",
            &[],
        );
        let patched_containers = registry.counter(
            "apiserver_proxy_webhook_patched_containers_total",
            "Containers and init containers given KUBERNETES_SERVICE_HOST.",
            &[],
        );
        let reloads = registry.counter(
            "apiserver_proxy_webhook_certificate_reloads_total",
            "Certificate reloads after a file change, by result: success or failure (old pair kept).",
            &["result"],
        );
        Metrics {
            registry,
            requests,
            latency,
            reviews,
            patches,
            patched_containers,
            reloads,
        }
    }

    pub fn certificate_reloaded(&self, ok: bool) {
        self.reloads.inc(&[if ok { "success" } else { "failure" }]);
    }

    pub fn render(&self) -> String {
        self.registry.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What the handlers share.
pub struct State {
    pub fqdn: String,
    pub tls: Reloader,
    pub shutdown: Shutdown,
    pub metrics: Metrics,
}

impl State {
    pub fn new(fqdn: String, tls: Reloader, shutdown: Shutdown) -> Self {
        State {
            fqdn,
            tls,
            shutdown,
            metrics: Metrics::new(),
        }
    }
}

/// The server's handler over shared state.
pub fn handler(state: Arc<State>) -> Handler {
    Arc::new(move |request: &Request| route(&state, request))
}

/// Counts every answer (including the HTTP layer's own) by path and code.
pub fn observer(state: Arc<State>) -> Observer {
    Arc::new(move |exchange: &Exchange<'_>| {
        let path = match exchange.path {
            WEBHOOK_PATH | "/healthz" | "/readyz" | "/metrics" => exchange.path,
            "-" => "none",
            _ => "other",
        };
        let code = status_text(exchange.status);
        state.metrics.requests.inc(&[path, &code]);
        state
            .metrics
            .latency
            .observe(&[path], exchange.elapsed.as_secs_f64());
    })
}

/// The status as label text, without allocating for the usual ones.
fn status_text(status: u16) -> std::borrow::Cow<'static, str> {
    let known = match status {
        200 => "200",
        400 => "400",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
        415 => "415",
        431 => "431",
        503 => "503",
        _ => return status.to_string().into(),
    };
    known.into()
}

fn error(status: u16, reason: &str) -> Response {
    Response::from_data("application/json", json!({ "error": reason }).to_string())
        .with_status_code(status)
}

fn method_not_allowed(allowed: &'static str) -> Response {
    error(405, &format!("method not allowed (use {allowed})")).with_unique_header("Allow", allowed)
}

/// Routes one request.
pub fn route(state: &State, request: &Request) -> Response {
    let path = request.raw_url().split('?').next().unwrap_or("");
    let readable = matches!(request.method(), "GET" | "HEAD");
    match path {
        WEBHOOK_PATH if request.method() == "POST" => admit(state, request),
        WEBHOOK_PATH => method_not_allowed("POST"),
        "/healthz" if readable => Response::text("ok"),
        "/readyz" if readable => {
            // The certificate is loaded before the listener opens; only a
            // shutdown in progress makes the webhook unready.
            if state.shutdown.is_triggered() {
                Response::text("shutting down").with_status_code(503)
            } else {
                Response::text("ok")
            }
        }
        "/metrics" if readable => {
            Response::from_data(metrics::CONTENT_TYPE, state.metrics.render())
        }
        "/healthz" | "/readyz" | "/metrics" => method_not_allowed("GET"),
        _ => error(404, "not found"),
    }
}

/// `application/json`, with or without parameters such as `charset`.
fn is_json(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

fn admit(state: &State, request: &Request) -> Response {
    if !is_json(request.header("Content-Type")) {
        return error(415, "unsupported content type (use application/json)");
    }
    // The HTTP layer holds the whole (bounded) body.
    match review::review(request.body(), &state.fqdn) {
        Ok(answer) => {
            if answer.operations == 0 {
                state.metrics.reviews.inc(&["unchanged"]);
            } else {
                state.metrics.reviews.inc(&["patched"]);
                state.metrics.patches.inc(&[]);
                let operations = answer.operations as u64;
                state.metrics.patched_containers.add(&[], operations);
            }
            log::debug!("review answered with {} operation(s)", answer.operations);
            Response::from_data("application/json", answer.body)
        }
        Err(err) => {
            state.metrics.reviews.inc(&["invalid"]);
            log::debug!("rejecting a review: {err}");
            error(400, &err.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::ServerFiles;
    use std::path::Path;

    fn state() -> State {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let files = ServerFiles {
            cert: data.join("server.crt"),
            key: data.join("server.key"),
            client_ca: None,
            alpn: vec![],
        };
        State::new(
            "foo.bar.".into(),
            Reloader::new(&files).unwrap(),
            Shutdown::new().unwrap(),
        )
    }

    fn call(
        state: &State,
        method: &str,
        url: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> (u16, String) {
        let headers = content_type
            .map(|c| vec![("Content-Type".to_string(), c.to_string())])
            .unwrap_or_default();
        let request = Request::new(method, url, headers, body.to_vec());
        let response = route(state, &request);
        let text = String::from_utf8(response.body).unwrap();
        (response.status_code, text)
    }

    #[test]
    fn routes_and_content_checks() {
        let state = state();
        let review = include_bytes!("../../tests/data/admission.json");
        let (status, body) = call(
            &state,
            "POST",
            WEBHOOK_PATH,
            Some("application/json; charset=utf-8"),
            review,
        );
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"patchType\":\"JSONPatch\""), "{body}");
        let (status, _) = call(
            &state,
            "POST",
            "/webhook/pod-apiserver-env?timeout=10s",
            Some("Application/JSON"),
            review,
        );
        assert_eq!(status, 200);
        assert_eq!(
            call(&state, "POST", WEBHOOK_PATH, Some("text/plain"), review).0,
            415
        );
        assert_eq!(call(&state, "POST", WEBHOOK_PATH, None, review).0, 415);
        assert_eq!(
            call(
                &state,
                "POST",
                WEBHOOK_PATH,
                Some("application/jsonx"),
                review
            )
            .0,
            415
        );
        let (status, body) = call(
            &state,
            "POST",
            WEBHOOK_PATH,
            Some("application/json"),
            b"{nope",
        );
        assert_eq!(status, 400);
        let reason: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            reason["error"]
                .as_str()
                .unwrap()
                .starts_with("malformed JSON"),
            "{body}"
        );
        assert_eq!(call(&state, "GET", WEBHOOK_PATH, None, b"").0, 405);
        assert_eq!(
            call(
                &state,
                "PUT",
                WEBHOOK_PATH,
                Some("application/json"),
                review
            )
            .0,
            405
        );
        assert_eq!(
            call(&state, "GET", "/healthz", None, b""),
            (200, "ok".into())
        );
        assert_eq!(
            call(&state, "GET", "/readyz", None, b""),
            (200, "ok".into())
        );
        assert_eq!(call(&state, "POST", "/healthz", None, b"").0, 405);
        assert_eq!(call(&state, "GET", "/nope", None, b"").0, 404);
        let (status, metrics) = call(&state, "GET", "/metrics", None, b"");
        assert_eq!(status, 200);
        assert!(
            metrics.contains("apiserver_proxy_webhook_patches_total 2\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("apiserver_proxy_webhook_reviews_total{result=\"invalid\"} 1\n"),
            "{metrics}"
        );
        state.shutdown.trigger("test");
        assert_eq!(call(&state, "GET", "/readyz", None, b"").0, 503);
    }
}
