//! `proxy-server`: the Konnectivity server. This module owns its flags and
//! validated [`Config`], with upstream's names, defaults and checks; the
//! work is in [`hub`] (routing core and delivery), [`streams`] (the gRPC
//! services), [`connect_frontend`] (HTTP CONNECT), [`crate::tunnel::listen`]
//! (sockets and connection threads) and [`run`](mod@run) (start-up and shutdown).

pub mod connect_frontend;
pub mod hub;
pub mod metrics;
pub mod refusal;
pub mod run;
pub mod streams;

pub use run::run;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use lexopt::Parser;

use super::identifiers::{Strategy, parse_strategies};
use crate::cli::{self, Command, LogFlags, UsageError};

/// Which protocol the frontend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Grpc,
    HttpConnect,
}

/// Certificate, key and the CA that verifies peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Empty: no client verification (only allowed on the agent port).
    pub ca: Option<PathBuf>,
}

/// Where the frontend listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frontend {
    /// TCP with mandatory mTLS.
    Tcp {
        bind: String,
        port: u16,
        tls: TlsFiles,
    },
    /// A Unix socket, plaintext (h2c in grpc mode).
    Uds {
        path: PathBuf,
        delete_existing: bool,
    },
}

/// The validated command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub mode: Mode,
    pub frontend: Frontend,
    pub agent_bind: String,
    pub agent_port: u16,
    /// The agent port's certificate; agents are verified against its CA.
    pub cluster_tls: TlsFiles,
    pub health_bind: String,
    pub health_port: u16,
    pub admin_bind: String,
    pub admin_port: u16,
    pub keepalive_time: Duration,
    pub frontend_keepalive_time: Duration,
    pub server_id: String,
    pub server_count: u32,
    pub strategies: Vec<Strategy>,
    /// None: wait for DIAL_RSP forever (upstream's default, 0).
    pub backend_dial_timeout: Option<Duration>,
    /// Zero: close at once on SIGTERM (upstream's default).
    pub graceful_shutdown_timeout: Duration,
    /// Packets queued per tunnelled connection (`--xfr-channel-size`).
    pub xfr_channel_size: usize,
    /// Pending dials across all frontends (`--max-pending-dials`, ours).
    pub max_pending_dials: usize,
    /// Frontend connections plus agent connections (`--max-connections`, ours).
    pub max_connections: usize,
    /// TLS handshake plus CONNECT request head, or plus the HTTP/2 preface
    /// and first SETTINGS, on every listener (`--header-timeout`, ours).
    pub header_timeout: Duration,
    pub log: LogFlags,
}

pub const HELP: &str = "\
proxy-server: the Konnectivity server. Accepts tunnel requests from the control
plane (gRPC or HTTP CONNECT) and carries them over the agents' streams.

Usage: proxy-server [flags]

Frontend (kube-apiserver side):
      --mode MODE                        grpc or http-connect (default \"grpc\")
      --server-port PORT                 TCP port for frontend connections; 0 with --uds-name (default 8090)
      --server-bind-address ADDR         bind address for frontend connections (default: all)
      --uds-name PATH                    serve the frontend on this Unix socket instead, plaintext
      --delete-existing-uds-file[=BOOL]  remove a stale socket file first (default true)
      --server-cert FILE                 frontend certificate (TCP mode)
      --server-key FILE                  frontend key (TCP mode)
      --server-ca-cert FILE              CA that frontend clients' certificates must chain to (required in TCP mode)
      --frontend-keepalive-time DURATION HTTP/2 keepalive ping interval on frontend connections (default 1h0m0s)
Agents:
      --agent-port PORT                  port for agent connections (default 8091)
      --agent-bind-address ADDR          bind address for agent connections (default: all)
      --cluster-cert FILE                agent-port certificate
      --cluster-key FILE                 agent-port key
      --cluster-ca-cert FILE             CA that agents' certificates must chain to
      --keepalive-time DURATION          HTTP/2 keepalive ping interval on agent connections (default 1h0m0s)
      --server-id ID                     this server's id, sent to agents (default: $PROXY_SERVER_ID or a random UUID)
      --server-count N                   number of server replicas, sent to agents (default 1)
      --proxy-strategies LIST            agent selection, tried in order: default, destHost, defaultRoute (default \"default\")
      --backend-dial-timeout DURATION    fail a dial the agent has not answered in this time; 0 = never (default 0s)
Operations:
      --health-port PORT                 /healthz, /readyz, /metrics (default 8092)
      --health-bind-address ADDR         (default: all)
      --admin-port PORT                  /metrics for operators (default 8095)
      --admin-bind-address ADDR          (default \"127.0.0.1\")
      --graceful-shutdown-timeout DURATION  on SIGTERM stop accepting and let tunnels finish this long (default 0s)
      --xfr-channel-size N               packets queued per tunnelled connection (default 10)
      --max-pending-dials N              dials waiting for an agent's answer, in all; more fail at once
                                         (CONNECT 503, gRPC RESOURCE_EXHAUSTED) (default 10000)
      --max-connections N                open frontend and agent connections, in all; more are refused
                                         (CONNECT 503, gRPC GOAWAY) (default 20000)
      --header-timeout DURATION          every listener: TLS handshake plus the CONNECT request head,
                                         or plus the HTTP/2 preface and first SETTINGS, must finish
                                         within this (slowloris guard; default 10s)
Accepted for compatibility: --enable-profiling, --enable-contention-profiling, --warn-on-channel-limit,
      --cipher-suites, --tls-min-version (VersionTLS12 or VersionTLS13), --lease-namespace, --lease-label,
      --kubeconfig-qps, --kubeconfig-burst, --kube-api-content-type.
Not supported (rejected when set): agent token authentication (--agent-namespace,
      --agent-service-account, --authentication-audience, --kubeconfig) and --enable-lease-controller.
  -h, --help                             print this help
";

/// Parses the command line (without the program name). `server_id_env` is
/// `$PROXY_SERVER_ID`, passed in to keep this pure.
pub fn parse(
    args: Vec<OsString>,
    server_id_env: Option<String>,
) -> Result<Command<Config>, UsageError> {
    let mut p = Parser::from_args(args);
    let mut log = LogFlags::default();
    let mut mode = "grpc".to_string();
    let mut server_port: u16 = 8090;
    let mut server_bind = String::new();
    let mut uds_name = String::new();
    let mut delete_uds = true;
    let (mut server_cert, mut server_key, mut server_ca) =
        (String::new(), String::new(), String::new());
    let (mut cluster_cert, mut cluster_key, mut cluster_ca) =
        (String::new(), String::new(), String::new());
    let mut agent_port: u16 = 8091;
    let mut agent_bind = String::new();
    let mut health_port: u16 = 8092;
    let mut health_bind = String::new();
    let mut admin_port: u16 = 8095;
    let mut admin_bind = "127.0.0.1".to_string();
    let mut keepalive = Duration::from_secs(3600);
    let mut frontend_keepalive = Duration::from_secs(3600);
    let mut server_id = server_id_env.filter(|s| !s.is_empty());
    let mut server_count: u32 = 1;
    let mut strategies = "default".to_string();
    let mut dial_timeout = Duration::ZERO;
    let mut graceful = Duration::ZERO;
    let mut xfr: i64 = 10;
    let mut max_pending: usize = 10_000;
    let mut max_connections: usize = 20_000;
    let mut header_timeout = Duration::from_secs(10);
    let mut profiling = false;
    let mut contention = false;
    let mut token_auth: Vec<(String, String)> = Vec::new();
    let mut lease_controller = false;
    while let Some(next) = cli::next_long(&mut p, &mut log)? {
        let cli::Next::Long(name) = next else {
            return Ok(Command::Help);
        };
        let n = name.as_str();
        match n {
            "mode" => mode = cli::string_value(&mut p, n)?,
            "server-port" => server_port = cli::parsed_value(&mut p, n, parse_port)?,
            "server-bind-address" => server_bind = cli::string_value(&mut p, n)?,
            "uds-name" => uds_name = cli::string_value(&mut p, n)?,
            "delete-existing-uds-file" => delete_uds = cli::bool_value(&mut p, n)?,
            "server-cert" => server_cert = cli::string_value(&mut p, n)?,
            "server-key" => server_key = cli::string_value(&mut p, n)?,
            "server-ca-cert" => server_ca = cli::string_value(&mut p, n)?,
            "cluster-cert" => cluster_cert = cli::string_value(&mut p, n)?,
            "cluster-key" => cluster_key = cli::string_value(&mut p, n)?,
            "cluster-ca-cert" => cluster_ca = cli::string_value(&mut p, n)?,
            "agent-port" => agent_port = cli::parsed_value(&mut p, n, parse_port)?,
            "agent-bind-address" => agent_bind = cli::string_value(&mut p, n)?,
            "health-port" => health_port = cli::parsed_value(&mut p, n, parse_port)?,
            "health-bind-address" => health_bind = cli::string_value(&mut p, n)?,
            "admin-port" => admin_port = cli::parsed_value(&mut p, n, parse_port)?,
            "admin-bind-address" => admin_bind = cli::string_value(&mut p, n)?,
            "keepalive-time" => keepalive = cli::parsed_value(&mut p, n, cli::parse_duration)?,
            "frontend-keepalive-time" => {
                frontend_keepalive = cli::parsed_value(&mut p, n, cli::parse_duration)?
            }
            "server-id" => {
                server_id = Some(cli::string_value(&mut p, n)?).filter(|s| !s.is_empty())
            }
            "server-count" => server_count = cli::parsed_value(&mut p, n, parse_count)?,
            "proxy-strategies" => strategies = cli::string_value(&mut p, n)?,
            "backend-dial-timeout" => {
                dial_timeout = cli::parsed_value(&mut p, n, cli::parse_duration)?
            }
            "graceful-shutdown-timeout" => {
                graceful = cli::parsed_value(&mut p, n, cli::parse_duration)?
            }
            "xfr-channel-size" => xfr = cli::parsed_value(&mut p, n, |s| s.parse::<i64>())?,
            "max-pending-dials" => max_pending = cli::parsed_value(&mut p, n, parse_positive)?,
            "max-connections" => max_connections = cli::parsed_value(&mut p, n, parse_positive)?,
            "header-timeout" => header_timeout = cli::parsed_value(&mut p, n, cli::parse_duration)?,
            "enable-profiling" => profiling = cli::bool_value(&mut p, n)?,
            "enable-contention-profiling" => contention = cli::bool_value(&mut p, n)?,
            "warn-on-channel-limit" => {
                cli::bool_value(&mut p, n)?;
            }
            "enable-lease-controller" => lease_controller = cli::bool_value(&mut p, n)?,
            "cipher-suites"
            | "lease-namespace"
            | "lease-label"
            | "kubeconfig-qps"
            | "kubeconfig-burst"
            | "kube-api-content-type" => {
                cli::string_value(&mut p, n)?;
            }
            "tls-min-version" => {
                let v = cli::string_value(&mut p, n)?;
                if !matches!(v.as_str(), "" | "VersionTLS12" | "VersionTLS13") {
                    return Err(UsageError::invalid(
                        n,
                        &v,
                        "only VersionTLS12 and VersionTLS13 are supported (TLS 1.0 and 1.1 are insecure)",
                    ));
                }
            }
            "agent-namespace"
            | "agent-service-account"
            | "authentication-audience"
            | "kubeconfig" => {
                let v = cli::string_value(&mut p, n)?;
                if !v.is_empty() {
                    token_auth.push((name.clone(), v));
                }
            }
            _ => return Err(cli::unknown_flag(n)),
        }
    }

    if let Some((flag, _)) = token_auth.first() {
        return Err(UsageError(format!(
            "--{flag}: agent token authentication is not supported; agents authenticate with \
             client certificates (--cluster-ca-cert)"
        )));
    }
    if lease_controller {
        return Err(UsageError(
            "--enable-lease-controller is not supported; set --server-count".into(),
        ));
    }
    if contention && !profiling {
        return Err(UsageError(
            "if --enable-contention-profiling is set, --enable-profiling must also be set".into(),
        ));
    }
    if profiling {
        log::warn!("--enable-profiling has no effect: there is no pprof endpoint");
    }
    let mode = match mode.as_str() {
        "grpc" => Mode::Grpc,
        "http-connect" => Mode::HttpConnect,
        other => {
            return Err(UsageError(format!(
                "mode must be set to either 'grpc' or 'http-connect' not {other:?}"
            )));
        }
    };
    let frontend = if !uds_name.is_empty() {
        if server_port != 0 {
            return Err(UsageError(format!(
                "server port should be set to 0 not {server_port} for UDS"
            )));
        }
        for (flag, value) in [
            ("server-key", &server_key),
            ("server-cert", &server_cert),
            ("server-ca-cert", &server_ca),
        ] {
            if !value.is_empty() {
                return Err(UsageError(format!("--{flag} should not be set for UDS")));
            }
        }
        Frontend::Uds {
            path: PathBuf::from(&uds_name),
            delete_existing: delete_uds,
        }
    } else {
        if server_ca.is_empty() {
            return Err(UsageError(
                "--server-ca-cert must be set when in TCP mode (uds-name is empty): frontends need mTLS".into(),
            ));
        }
        let tls = tls_files("server", &server_cert, &server_key, &server_ca)?.ok_or_else(|| {
            UsageError("--server-cert and --server-key must be set in TCP mode".into())
        })?;
        Frontend::Tcp {
            bind: server_bind,
            port: server_port,
            tls,
        }
    };
    let cluster_tls =
        tls_files("cluster", &cluster_cert, &cluster_key, &cluster_ca)?.ok_or_else(|| {
            UsageError(
                "--cluster-cert and --cluster-key must be set: the agent port always uses TLS"
                    .into(),
            )
        })?;
    let strategies = parse_strategies(&strategies)
        .map_err(|e| UsageError(format!("invalid proxy strategies: {e}")))?;
    if xfr <= 0 {
        return Err(UsageError(format!(
            "channel size {xfr} must be greater than 0"
        )));
    }
    if header_timeout.is_zero() {
        return Err(UsageError(
            "--header-timeout must be greater than zero".into(),
        ));
    }
    if keepalive.is_zero() || frontend_keepalive.is_zero() {
        return Err(UsageError(
            "keepalive times must be greater than zero".into(),
        ));
    }
    Ok(Command::Run(Config {
        mode,
        frontend,
        agent_bind,
        agent_port,
        cluster_tls,
        health_bind,
        health_port,
        admin_bind,
        admin_port,
        keepalive_time: keepalive,
        frontend_keepalive_time: frontend_keepalive,
        server_id: server_id.unwrap_or_else(crate::sys::random_uuid),
        server_count,
        strategies,
        backend_dial_timeout: (!dial_timeout.is_zero()).then_some(dial_timeout),
        graceful_shutdown_timeout: graceful,
        xfr_channel_size: xfr as usize,
        max_pending_dials: max_pending,
        max_connections,
        header_timeout,
        log,
    }))
}

/// Cert, key and CA: a key without a cert (or the reverse) is an error, as
/// is a file that does not exist. `None` when neither cert nor key is set.
fn tls_files(
    prefix: &str,
    cert: &str,
    key: &str,
    ca: &str,
) -> Result<Option<TlsFiles>, UsageError> {
    for (what, path) in [("cert", cert), ("key", key), ("ca-cert", ca)] {
        if !path.is_empty() && std::fs::metadata(path).is_err() {
            return Err(UsageError(format!(
                "--{prefix}-{what} {path}: file not found or unreadable"
            )));
        }
    }
    match (cert.is_empty(), key.is_empty()) {
        (true, true) => Ok(None),
        (false, true) => Err(UsageError(format!(
            "cannot have {prefix} key empty when {prefix} cert is set to {cert:?}"
        ))),
        (true, false) => Err(UsageError(format!(
            "cannot have {prefix} cert empty when {prefix} key is set to {key:?}"
        ))),
        (false, false) => Ok(Some(TlsFiles {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
            ca: (!ca.is_empty()).then(|| PathBuf::from(ca)),
        })),
    }
}

/// A port number; 0 means "any free port" on TCP listeners (logged at start).
fn parse_port(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .map_err(|_| "expected a port number from 0 to 65535".to_string())
}

fn parse_count(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(0) | Err(_) => Err("expected a positive number".into()),
        Ok(n) => Ok(n),
    }
}

fn parse_positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) | Err(_) => Err("expected a positive number".into()),
        Ok(n) => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certs() -> (String, String) {
        // Any existing file passes the existence check; contents are read later.
        let file = std::env::current_exe()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        (file.clone(), file)
    }

    fn parse_args(args: &[String]) -> Result<Command<Config>, UsageError> {
        parse(args.iter().map(OsString::from).collect(), None)
    }

    fn base() -> Vec<String> {
        let (f, _) = certs();
        vec![
            format!("--cluster-cert={f}"),
            format!("--cluster-key={f}"),
            format!("--cluster-ca-cert={f}"),
        ]
    }

    fn uds() -> Vec<String> {
        let mut args = base();
        args.extend([
            "--uds-name=/tmp/x.sock".to_string(),
            "--server-port=0".to_string(),
        ]);
        args
    }

    fn config(args: Vec<String>) -> Config {
        match parse_args(&args) {
            Ok(Command::Run(c)) => c,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn error(args: Vec<String>) -> String {
        match parse_args(&args) {
            Err(e) => e.0,
            other => panic!("{args:?} should fail: {other:?}"),
        }
    }

    #[test]
    fn upstream_defaults() {
        let c = config(uds());
        assert_eq!(c.mode, Mode::Grpc);
        assert_eq!(
            c.frontend,
            Frontend::Uds {
                path: "/tmp/x.sock".into(),
                delete_existing: true
            }
        );
        assert_eq!(
            (c.agent_port, c.health_port, c.admin_port),
            (8091, 8092, 8095)
        );
        assert_eq!(c.admin_bind, "127.0.0.1");
        assert_eq!(c.server_count, 1);
        assert_eq!(c.strategies, vec![Strategy::Default]);
        assert_eq!(c.backend_dial_timeout, None);
        assert_eq!(c.graceful_shutdown_timeout, Duration::ZERO);
        assert_eq!(c.keepalive_time, Duration::from_secs(3600));
        assert_eq!(c.xfr_channel_size, 10);
        assert_eq!(c.server_id.len(), 36, "a random uuid");
    }

    #[test]
    fn server_id_from_env_or_flag() {
        let args: Vec<OsString> = uds().iter().map(OsString::from).collect();
        let Ok(Command::Run(c)) = parse(args.clone(), Some("from-env".into())) else {
            panic!()
        };
        assert_eq!(c.server_id, "from-env");
        let mut with_flag = args;
        with_flag.push("--server-id=from-flag".into());
        let Ok(Command::Run(c)) = parse(with_flag, Some("from-env".into())) else {
            panic!()
        };
        assert_eq!(c.server_id, "from-flag");
    }

    #[test]
    fn tcp_frontend_needs_mtls() {
        let (f, _) = certs();
        let mut args = base();
        args.push(format!("--server-cert={f}"));
        args.push(format!("--server-key={f}"));
        assert!(error(args.clone()).contains("--server-ca-cert must be set"));
        args.push(format!("--server-ca-cert={f}"));
        args.extend([
            "--mode=http-connect".into(),
            "--server-port=0".into(),
            "--proxy-strategies=destHost,default".into(),
        ]);
        let c = config(args);
        assert_eq!(c.mode, Mode::HttpConnect);
        assert!(matches!(c.frontend, Frontend::Tcp { port: 0, .. }));
        assert_eq!(c.strategies, vec![Strategy::DestHost, Strategy::Default]);
    }

    #[test]
    fn bad_input() {
        let with = |extra: &[&str]| {
            let mut a = uds();
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };
        assert!(error(with(&["--mode=tcp"])).contains("grpc' or 'http-connect"));
        assert!(error(with(&["--server-port=8090"])).contains("should be set to 0"));
        assert!(error(with(&["--proxy-strategies=nearest"])).contains("unknown proxy strategy"));
        assert!(error(with(&["--xfr-channel-size=0"])).contains("greater than 0"));
        assert!(error(with(&["--agent-namespace=kube-system"])).contains("not supported"));
        assert!(error(with(&["--enable-lease-controller"])).contains("not supported"));
        assert!(error(with(&["--tls-min-version=VersionTLS10"])).contains("VersionTLS12"));
        assert!(error(with(&["--server-count=0"])).contains("positive"));
        assert!(error(with(&["--backend-dial-timeout=5"])).contains("invalid duration"));
        assert!(error(with(&["--cluster-key=/nonexistent"])).contains("not found"));
        assert!(
            error(vec!["--uds-name=/x".into(), "--server-port=0".into()])
                .contains("--cluster-cert")
        );
        // Accepted for compatibility.
        config(with(&[
            "--warn-on-channel-limit",
            "--cipher-suites=TLS_AES_128_GCM_SHA256",
            "--v=4",
            "--logtostderr",
        ]));
    }
}
