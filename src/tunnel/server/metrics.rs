//! The proxy-server's Prometheus metrics, with upstream's names
//! (`konnectivity_network_proxy_server_*`) so dashboards keep working.

use std::sync::Arc;

use crate::metrics::{Counter, Gauge, Histogram, LATENCY_BUCKETS, Registry};

/// Handles to every server metric; clones share the series.
#[derive(Clone)]
pub struct ServerMetrics {
    pub registry: Arc<Registry>,
    pub dial_duration: Histogram,
    pub dial_failures: Counter,
    pub pending_dials: Gauge,
    pub established: Gauge,
    pub ready_backends: Gauge,
    pub grpc_connections: Gauge,
    pub http_connections: Gauge,
    pub connection_duration: Histogram,
    pub slow_frontends: Counter,
    pub refused_connections: Counter,
}

const PREFIX: &str = "konnectivity_network_proxy_server_";

impl ServerMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let name = |n: &str| format!("{PREFIX}{n}");
        ServerMetrics {
            dial_duration: registry.histogram(
                &name("dial_duration_seconds"),
                "Latency of dial to the remote endpoint in seconds",
                &[],
                LATENCY_BUCKETS,
            ),
            dial_failures: registry.counter(
                &name("dial_failure_count"),
                "Number of dial failures observed, by reason.",
                &["reason"],
            ),
            pending_dials: registry.gauge(
                &name("pending_backend_dials"),
                "Current number of pending backend dial requests",
                &[],
            ),
            established: registry.gauge(
                &name("established_connections"),
                "Current number of established end-to-end connections (post-dial).",
                &[],
            ),
            ready_backends: registry.gauge(
                &name("ready_backends"),
                "Number of konnectivity agents connected to the proxy server",
                &[],
            ),
            grpc_connections: registry.gauge(
                &name("grpc_connections"),
                "Number of current grpc connections, partitioned by service method.",
                &["service_method"],
            ),
            http_connections: registry.gauge(
                &name("http_connections"),
                "Number of current HTTP CONNECT connections",
                &[],
            ),
            connection_duration: registry.histogram(
                &name("connection_duration_seconds"),
                "Duration in seconds a proxied end-to-end connection was established (post-dial) before being closed.",
                &[],
                &[0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0, 86400.0],
            ),
            slow_frontends: registry.counter(
                &name("slow_frontend_closes_total"),
                "Tunnels closed because their frontend stopped reading (ours, not upstream's).",
                &[],
            ),
            refused_connections: registry.counter(
                &name("refused_connections_total"),
                "Connections refused at the connection cap, by listener (ours, not upstream's).",
                &["listener"],
            ),
            registry: Arc::new(registry),
        }
    }
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}
