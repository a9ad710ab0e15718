//! Starts the proxy-server: the agent port, the frontend (gRPC or HTTP
//! CONNECT, TCP with mTLS or a Unix socket), the health and admin ports,
//! the dial-timeout timer; then waits for SIGTERM and shuts down (drain for
//! `--graceful-shutdown-timeout`, then close everything and join).

use std::net::SocketAddr;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::connect_frontend::{self, Timeouts};
use super::hub::Hub;
use super::metrics::ServerMetrics;
use super::refusal;
use super::streams::{AGENT_PATH, PROXY_PATH, agent_handler, proxy_handler};
use super::{Config, Frontend, Mode};
use crate::grpc;
use crate::h2::conn::Config as H2Config;
use crate::h2::transport::{TlsSetup, Transport};
use crate::http;
use crate::shutdown::{Shutdown, Worker};
use crate::tls::{Reloader, ServerFiles};
use crate::tunnel::listen::{Conn, Listener, Listeners, Refuse};
use crate::tunnel::router;

pub use crate::tunnel::StartError as Error;

/// A write to a peer that stalls this long ends its connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

fn h2_config(keepalive: Duration) -> H2Config {
    H2Config {
        keepalive_interval: Some(keepalive),
        ..H2Config::default()
    }
}

/// Runs one gRPC connection (TLS when `tls` is given) to its end. The TLS
/// handshake, the client's preface and its first SETTINGS frame must all
/// arrive within `header_timeout` (slowloris guard); after that the
/// connection lives under keepalive.
fn serve_grpc(
    conn: Conn,
    tls: Option<&Reloader>,
    h2: &H2Config,
    server: &grpc::Server,
    header_timeout: Duration,
) {
    let peer = conn.peer();
    let deadline = Instant::now() + header_timeout;
    let transport = match (conn, tls) {
        (Conn::Tcp(sock), Some(tls)) => Transport::tls_alpn::<TcpStream>(
            sock,
            TlsSetup::Server(tls.server_config()),
            None,
            Some(WRITE_TIMEOUT),
            true,
            Some(deadline),
        ),
        (Conn::Tcp(sock), None) => Transport::plain::<TcpStream>(sock, None, Some(WRITE_TIMEOUT)),
        (Conn::Unix(sock), _) => Transport::plain::<UnixStream>(sock, None, Some(WRITE_TIMEOUT)),
    };
    let transport = match transport {
        Ok(t) => t,
        Err(e) => {
            log::debug!("{peer}: {e}");
            return;
        }
    };
    let h2 = H2Config {
        handshake_timeout: deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1)),
        ..h2.clone()
    };
    // This thread reads the connection; each call starts as it arrives.
    if let Err(e) = server.serve_here(transport, h2) {
        log::debug!("{peer}: {e}");
    }
}

fn socket_addr(bind: &str, port: u16) -> Result<SocketAddr, Error> {
    let host = if bind.is_empty() { "0.0.0.0" } else { bind };
    let text = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    text.parse()
        .map_err(|_| Error(format!("bad bind address {host:?}")))
}

fn reloader(files: &super::TlsFiles, alpn: &[u8]) -> Result<Reloader, Error> {
    Reloader::new(&ServerFiles {
        cert: files.cert.clone(),
        key: files.key.clone(),
        client_ca: files.ca.clone(),
        alpn: vec![alpn.to_vec()],
    })
    .map_err(|e| Error(e.to_string()))
}

/// The health port: `/healthz`, `/readyz` (500 without agents, as
/// upstream), `/metrics`. The admin port serves `/metrics` only.
fn health_handler(hub: Arc<Hub>, with_probes: bool) -> http::Handler {
    Arc::new(
        move |request: &crate::http::Request| match request.url().as_str() {
            "/healthz" if with_probes => crate::http::Response::text("ok"),
            "/readyz" if with_probes => {
                if hub.ready() {
                    crate::http::Response::text("ok")
                } else {
                    crate::http::Response::text("no connection to any proxy agent")
                        .with_status_code(500)
                }
            }
            "/metrics" => crate::http::Response::from_data(
                crate::metrics::CONTENT_TYPE,
                hub.metrics.registry.render(),
            ),
            _ => crate::http::Response::empty_404(),
        },
    )
}

/// Runs the server until `shutdown` triggers.
pub fn run(config: &Config, shutdown: &Shutdown) -> Result<(), Error> {
    // Threads started before a failure wait for shutdown when dropped:
    // trigger it before returning an error.
    let fail = |message: String| {
        shutdown.trigger("start-up failed");
        Error(message)
    };
    let metrics = ServerMetrics::new();
    let hub = Hub::new(
        config.strategies.clone(),
        router::Limits {
            max_pending_dials: config.max_pending_dials,
            dial_timeout: config.backend_dial_timeout,
        },
        config.xfr_channel_size,
        metrics.clone(),
    );
    let header_timeout = config.header_timeout;
    let mut listeners = Listeners::new(config.max_connections, shutdown);
    let refused = |name: &'static str| -> Arc<dyn Fn() + Send + Sync> {
        let metrics = metrics.clone();
        Arc::new(move || metrics.refused_connections.inc(&[name]))
    };

    // Agents: always TLS; client certificates verified when a CA is given.
    let cluster = reloader(&config.cluster_tls, b"h2").map_err(|e| fail(e.0))?;
    if config.cluster_tls.ca.is_none() {
        log::warn!("--cluster-ca-cert is empty: agents are not authenticated");
    }
    let agent_server = grpc::Server::new().route(
        AGENT_PATH,
        agent_handler(hub.clone(), config.server_id.clone(), config.server_count),
    );
    let agent_h2 = h2_config(config.keepalive_time);
    let agent_listener = Listener::tcp(&config.agent_bind, config.agent_port).map_err(|e| {
        fail(format!(
            "agent port {}:{}: {e}",
            config.agent_bind, config.agent_port
        ))
    })?;
    log::info!(
        "agent port listening on {} (server id {}, count {})",
        agent_listener.describe(),
        config.server_id,
        config.server_count
    );
    let refuse_agent: Refuse = {
        let cluster = cluster.clone();
        let answer = refusal::grpc_answer(config.max_connections);
        Arc::new(move |conn| refusal::refuse(conn, Some(&cluster), true, header_timeout, &answer))
    };
    listeners
        .spawn_refusing(
            "agent",
            agent_listener,
            Arc::new(move |conn, _held| {
                serve_grpc(
                    conn,
                    Some(&cluster),
                    &agent_h2,
                    &agent_server,
                    header_timeout,
                )
            }),
            Some(refuse_agent),
            refused("agent"),
        )
        .map_err(|e| fail(format!("starting the agent listener: {e}")))?;

    // The frontend.
    let (frontend_listener, frontend_tls) = match &config.frontend {
        Frontend::Tcp { bind, port, tls } => {
            let alpn: &[u8] = if config.mode == Mode::Grpc {
                b"h2"
            } else {
                b"http/1.1"
            };
            let listener = Listener::tcp(bind, *port)
                .map_err(|e| fail(format!("frontend port {bind}:{port}: {e}")))?;
            (listener, Some(reloader(tls, alpn).map_err(|e| fail(e.0))?))
        }
        Frontend::Uds {
            path,
            delete_existing,
        } => {
            let listener = Listener::unix(path, *delete_existing)
                .map_err(|e| fail(format!("frontend socket {}: {e}", path.display())))?;
            (listener, None)
        }
    };
    let mode_name = if config.mode == Mode::Grpc {
        "grpc"
    } else {
        "http-connect"
    };
    log::info!(
        "frontend ({mode_name}) listening on {}",
        frontend_listener.describe()
    );
    let refuse_frontend: Refuse = {
        let tls = frontend_tls.clone();
        let (h2, answer) = match config.mode {
            Mode::Grpc => (true, refusal::grpc_answer(config.max_connections)),
            Mode::HttpConnect => (false, refusal::connect_answer(config.max_connections)),
        };
        Arc::new(move |conn| refusal::refuse(conn, tls.as_ref(), h2, header_timeout, &answer))
    };
    let serve: crate::tunnel::listen::Serve = match config.mode {
        Mode::Grpc => {
            let server = grpc::Server::new().route(PROXY_PATH, proxy_handler(hub.clone()));
            let h2 = h2_config(config.frontend_keepalive_time);
            Arc::new(move |conn, _held| {
                serve_grpc(conn, frontend_tls.as_ref(), &h2, &server, header_timeout)
            })
        }
        Mode::HttpConnect => {
            let hub = hub.clone();
            // With a backend dial timeout the router decides (and counts
            // it); the frontend's own wait is only a backstop.
            let timeouts = Timeouts {
                dial: config
                    .backend_dial_timeout
                    .map(|t| t + Duration::from_secs(1))
                    .unwrap_or(Timeouts::default().dial),
                header: config.header_timeout,
                ..Timeouts::default()
            };
            Arc::new(move |conn, held| {
                connect_frontend::serve(&hub, conn, held, frontend_tls.as_ref(), &timeouts)
            })
        }
    };
    listeners
        .spawn_refusing(
            "frontend",
            frontend_listener,
            serve,
            Some(refuse_frontend),
            refused("frontend"),
        )
        .map_err(|e| fail(format!("starting the frontend listener: {e}")))?;

    // Health and admin ports.
    let health_addr =
        socket_addr(&config.health_bind, config.health_port).map_err(|e| fail(e.0))?;
    let health = http::Server::bind(
        health_addr,
        None,
        http::Limits::default(),
        health_handler(hub.clone(), true),
        shutdown,
    )
    .map_err(|e| fail(format!("health port: {e}")))?;
    log::info!("health port listening on {}", health.local_addr());
    let admin_addr = socket_addr(&config.admin_bind, config.admin_port).map_err(|e| fail(e.0))?;
    let admin = http::Server::bind(
        admin_addr,
        None,
        http::Limits::default(),
        health_handler(hub.clone(), false),
        shutdown,
    )
    .map_err(|e| fail(format!("admin port: {e}")))?;
    log::info!("admin port listening on {}", admin.local_addr());

    // Fails dials past --backend-dial-timeout.
    let expirer = config.backend_dial_timeout.map(|timeout| {
        let hub = hub.clone();
        let shutdown = shutdown.clone();
        Worker::spawn("dial-timeouts", move || {
            loop {
                let next = hub.expire_dials();
                let wait = next
                    .map(|t| t.saturating_duration_since(Instant::now()))
                    .unwrap_or(timeout);
                if shutdown.wait_timeout(wait.max(Duration::from_millis(10)).min(timeout)) {
                    return;
                }
            }
        })
    });
    let _expirer = match expirer {
        Some(Ok(w)) => Some(w),
        Some(Err(e)) => return Err(fail(format!("starting the dial timer: {e}"))),
        None => None,
    };

    while !shutdown.wait_timeout(Duration::from_secs(3600)) {}
    // Listeners stop accepting on their own. Let tunnels finish.
    if !config.graceful_shutdown_timeout.is_zero() {
        let deadline = Instant::now() + config.graceful_shutdown_timeout;
        log::info!(
            "draining {} tunnels for up to {:?}",
            hub.frontends(),
            config.graceful_shutdown_timeout
        );
        while hub.frontends() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    listeners.join();
    health.wait();
    admin.wait();
    log::info!("stopped");
    Ok(())
}
