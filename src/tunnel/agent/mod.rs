//! `proxy-agent`: the Konnectivity agent. This module owns its flags and
//! validated [`Config`], with upstream's names, defaults and checks; the
//! work is in [`table`] (the per-stream connection table, pure) and
//! [`run`](mod@run) (streams, dials, pumps, reconnecting, draining).

pub mod run;
pub mod table;

pub use run::run;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use lexopt::Parser;

use super::identifiers::Identifiers;
use crate::cli::{self, Command, LogFlags, UsageError};

/// The validated command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server_host: String,
    pub server_port: u16,
    /// CA for the server's certificate (empty: the system has none in a
    /// scratch image, so it is required).
    pub ca_cert: PathBuf,
    /// Client certificate and key (mTLS); None with token authentication.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// File holding a bearer token, sent as `authorization` metadata.
    pub token_path: Option<PathBuf>,
    /// ALPN protocols offered besides `h2`.
    pub alpn: Vec<String>,
    pub agent_id: String,
    pub identifiers: Identifiers,
    pub sync_interval: Duration,
    pub sync_interval_cap: Duration,
    pub probe_interval: Duration,
    pub sync_forever: bool,
    pub keepalive_time: Duration,
    pub health_host: String,
    pub health_port: u16,
    pub admin_bind: String,
    pub admin_port: u16,
    /// Packets queued per destination connection (`--xfr-channel-size`).
    pub xfr_channel_size: usize,
    /// Destination dial timeout (`--dial-timeout`, ours; upstream uses 5 s).
    pub dial_timeout: Duration,
    /// Open destination connections, in all (`--max-connections`, ours).
    pub max_connections: usize,
    pub log: LogFlags,
}

pub const HELP: &str = "\
proxy-agent: the Konnectivity agent. Connects to every proxy-server replica and
opens the connections they ask for.

Usage: proxy-agent --ca-cert=FILE --agent-cert=FILE --agent-key=FILE [flags]

Server connection:
      --proxy-server-host HOST           proxy-server (or its load balancer) to connect to (default \"127.0.0.1\")
      --proxy-server-port PORT           its agent port (default 8091)
      --ca-cert FILE                     CA that the server's certificate must chain to (required)
      --agent-cert FILE                  client certificate (mTLS)
      --agent-key FILE                   client key (mTLS)
      --service-account-token-path FILE  send this token as 'authorization: Bearer' instead of or besides mTLS
      --alpn-proto LIST                  extra ALPN protocols to offer besides h2 (comma list)
      --agent-id ID                      this agent's id (default: $PROXY_AGENT_ID or a random UUID)
      --agent-identifiers QUERY          what this agent serves, URL-query encoded, e.g.
                                         host=node1&ipv4=1.2.3.4&ipv6=%3A%3A1&default-route=true
      --keepalive-time DURATION          HTTP/2 keepalive ping interval (default 1h0m0s)
Reconnecting (one stream per server replica, up to the server count):
      --sync-interval DURATION           first retry interval (default 1s)
      --sync-interval-cap DURATION       retry interval cap; backoff x1.5 with jitter (default 10s)
      --probe-interval DURATION          how often readiness is re-evaluated (default 1s)
      --sync-forever[=BOOL]              keep syncing after all servers are connected (default false)
Destinations and operations:
      --dial-timeout DURATION            destination dial timeout (default 5s)
      --xfr-channel-size N               packets queued per destination connection (default 150)
      --max-connections N                open destination connections, in all (default 20000)
      --health-server-host HOST          (default: all)
      --health-server-port PORT          /healthz, /readyz, /metrics (default 8093)
      --admin-server-port PORT           /metrics for operators (default 8094)
      --admin-bind-address ADDR          (default \"127.0.0.1\")
Accepted for compatibility: --enable-profiling, --enable-contention-profiling, --warn-on-channel-limit,
      --lease-namespace, --lease-label-selector, --lease-label, --server-count-source=default,
      --kube-api-content-type, --kubeconfig (unused without lease counting).
Not supported (rejected when set): --count-server-leases.
  -h, --help                             print this help
";

/// Parses the command line (without the program name). `agent_id_env` is
/// `$PROXY_AGENT_ID`, passed in to keep this pure apart from file checks.
pub fn parse(
    args: Vec<OsString>,
    agent_id_env: Option<String>,
) -> Result<Command<Config>, UsageError> {
    let mut p = Parser::from_args(args);
    let mut log = LogFlags::default();
    let mut server_host = "127.0.0.1".to_string();
    let mut server_port: u16 = 8091;
    let (mut ca, mut cert, mut key, mut token) =
        (String::new(), String::new(), String::new(), String::new());
    let mut alpn: Vec<String> = Vec::new();
    let mut agent_id = agent_id_env.filter(|s| !s.is_empty());
    let mut identifiers = String::new();
    let mut sync_interval = Duration::from_secs(1);
    let mut sync_cap = Duration::from_secs(10);
    let mut probe = Duration::from_secs(1);
    let mut sync_forever = false;
    let mut keepalive = Duration::from_secs(3600);
    let mut health_host = String::new();
    let mut health_port: u16 = 8093;
    let mut admin_bind = "127.0.0.1".to_string();
    let mut admin_port: u16 = 8094;
    let mut xfr: i64 = 150;
    let mut dial_timeout = Duration::from_secs(5);
    let mut max_connections: usize = 20_000;
    let mut count_leases = false;
    let mut profiling = false;
    let mut contention = false;
    while let Some(next) = cli::next_long(&mut p, &mut log)? {
        let cli::Next::Long(name) = next else {
            return Ok(Command::Help);
        };
        let n = name.as_str();
        match n {
            "proxy-server-host" => server_host = cli::string_value(&mut p, n)?,
            "proxy-server-port" => server_port = cli::parsed_value(&mut p, n, parse_port)?,
            "ca-cert" => ca = cli::string_value(&mut p, n)?,
            "agent-cert" => cert = cli::string_value(&mut p, n)?,
            "agent-key" => key = cli::string_value(&mut p, n)?,
            "service-account-token-path" => token = cli::string_value(&mut p, n)?,
            "alpn-proto" => alpn.extend(
                cli::string_value(&mut p, n)?
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            ),
            "agent-id" => agent_id = Some(cli::string_value(&mut p, n)?).filter(|s| !s.is_empty()),
            "agent-identifiers" => identifiers = cli::string_value(&mut p, n)?,
            "sync-interval" => sync_interval = cli::parsed_value(&mut p, n, cli::parse_duration)?,
            "sync-interval-cap" => sync_cap = cli::parsed_value(&mut p, n, cli::parse_duration)?,
            "probe-interval" => probe = cli::parsed_value(&mut p, n, cli::parse_duration)?,
            "sync-forever" => sync_forever = cli::bool_value(&mut p, n)?,
            "keepalive-time" => keepalive = cli::parsed_value(&mut p, n, cli::parse_duration)?,
            "health-server-host" => health_host = cli::string_value(&mut p, n)?,
            "health-server-port" => health_port = cli::parsed_value(&mut p, n, parse_port)?,
            "admin-server-port" => admin_port = cli::parsed_value(&mut p, n, parse_port)?,
            "admin-bind-address" => admin_bind = cli::string_value(&mut p, n)?,
            "xfr-channel-size" => xfr = cli::parsed_value(&mut p, n, |s| s.parse::<i64>())?,
            "dial-timeout" => dial_timeout = cli::parsed_value(&mut p, n, cli::parse_duration)?,
            "max-connections" => {
                max_connections = cli::parsed_value(&mut p, n, |s| match s.parse::<usize>() {
                    Ok(0) | Err(_) => Err("expected a positive number"),
                    Ok(v) => Ok(v),
                })?
            }
            "count-server-leases" => count_leases = cli::bool_value(&mut p, n)?,
            "enable-profiling" => profiling = cli::bool_value(&mut p, n)?,
            "enable-contention-profiling" => contention = cli::bool_value(&mut p, n)?,
            "warn-on-channel-limit" => {
                cli::bool_value(&mut p, n)?;
            }
            "server-count-source" => {
                let v = cli::string_value(&mut p, n)?;
                if v != "default" {
                    return Err(UsageError::invalid(
                        n,
                        &v,
                        "only 'default' is supported (no lease counting)",
                    ));
                }
            }
            "lease-namespace"
            | "lease-label-selector"
            | "lease-label"
            | "kube-api-content-type"
            | "kubeconfig" => {
                cli::string_value(&mut p, n)?;
            }
            _ => return Err(cli::unknown_flag(n)),
        }
    }

    if count_leases {
        return Err(UsageError(
            "--count-server-leases is not supported; the agent learns the count from the servers"
                .into(),
        ));
    }
    if contention && !profiling {
        return Err(UsageError(
            "if --enable-contention-profiling is set, --enable-profiling must also be set".into(),
        ));
    }
    if ca.is_empty() {
        return Err(UsageError(
            "--ca-cert is required: the agent verifies the server's certificate against it".into(),
        ));
    }
    for (flag, path) in [
        ("ca-cert", &ca),
        ("agent-cert", &cert),
        ("agent-key", &key),
        ("service-account-token-path", &token),
    ] {
        if !path.is_empty() && std::fs::metadata(path).is_err() {
            return Err(UsageError(format!(
                "--{flag} {path}: file not found or unreadable"
            )));
        }
    }
    let client_cert = match (cert.is_empty(), key.is_empty()) {
        (false, false) => Some((PathBuf::from(&cert), PathBuf::from(&key))),
        (true, true) => None,
        (false, true) => {
            return Err(UsageError(
                "--agent-key must be set with --agent-cert".into(),
            ));
        }
        (true, false) => {
            return Err(UsageError(
                "--agent-cert must be set with --agent-key".into(),
            ));
        }
    };
    if client_cert.is_none() && token.is_empty() {
        return Err(UsageError(
            "set --agent-cert and --agent-key (or --service-account-token-path): the server authenticates agents".into(),
        ));
    }
    let identifiers = Identifiers::parse(&identifiers, true)
        .map_err(|e| UsageError::invalid("agent-identifiers", &identifiers, e))?;
    for (flag, value) in [
        ("sync-interval", sync_interval),
        ("sync-interval-cap", sync_cap),
        ("probe-interval", probe),
        ("keepalive-time", keepalive),
        ("dial-timeout", dial_timeout),
    ] {
        if value.is_zero() {
            return Err(UsageError::invalid(
                flag,
                &cli::format_duration(value),
                "must be greater than zero",
            ));
        }
    }
    if sync_cap < sync_interval {
        return Err(UsageError(
            "--sync-interval-cap must not be below --sync-interval".into(),
        ));
    }
    if xfr <= 0 {
        return Err(UsageError(format!(
            "channel size {xfr} must be greater than 0"
        )));
    }
    if server_host.is_empty() {
        return Err(UsageError("--proxy-server-host must not be empty".into()));
    }
    Ok(Command::Run(Config {
        server_host,
        server_port,
        ca_cert: PathBuf::from(ca),
        client_cert,
        token_path: (!token.is_empty()).then(|| PathBuf::from(token)),
        alpn,
        agent_id: agent_id.unwrap_or_else(crate::sys::random_uuid),
        identifiers,
        sync_interval,
        sync_interval_cap: sync_cap,
        probe_interval: probe,
        sync_forever,
        keepalive_time: keepalive,
        health_host,
        health_port,
        admin_bind,
        admin_port,
        xfr_channel_size: xfr as usize,
        dial_timeout,
        max_connections,
        log,
    }))
}

fn parse_port(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .map_err(|_| "expected a port number from 0 to 65535".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> String {
        std::env::current_exe()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    fn base() -> Vec<String> {
        let f = file();
        vec![
            format!("--ca-cert={f}"),
            format!("--agent-cert={f}"),
            format!("--agent-key={f}"),
        ]
    }

    fn run(args: Vec<String>) -> Result<Command<Config>, UsageError> {
        parse(args.into_iter().map(OsString::from).collect(), None)
    }

    fn config(args: Vec<String>) -> Config {
        match run(args.clone()) {
            Ok(Command::Run(c)) => c,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn error(args: Vec<String>) -> String {
        match run(args.clone()) {
            Err(e) => e.0,
            other => panic!("{args:?} should fail: {other:?}"),
        }
    }

    fn with(extra: &[&str]) -> Vec<String> {
        let mut a = base();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    #[test]
    fn upstream_defaults() {
        let c = config(base());
        assert_eq!((c.server_host.as_str(), c.server_port), ("127.0.0.1", 8091));
        assert_eq!((c.health_port, c.admin_port), (8093, 8094));
        assert_eq!(c.sync_interval, Duration::from_secs(1));
        assert_eq!(c.sync_interval_cap, Duration::from_secs(10));
        assert_eq!(c.probe_interval, Duration::from_secs(1));
        assert!(!c.sync_forever);
        assert_eq!(c.keepalive_time, Duration::from_secs(3600));
        assert_eq!(c.xfr_channel_size, 150);
        assert_eq!(c.dial_timeout, Duration::from_secs(5));
        assert_eq!(c.agent_id.len(), 36);
        assert_eq!(c.identifiers, Identifiers::default());
    }

    #[test]
    fn flags_and_env() {
        let c = config(with(&[
            "--proxy-server-host=konnectivity.example",
            "--proxy-server-port=443",
            "--agent-id=node-agent",
            "--agent-identifiers=host=node1&default-route=true",
            "--sync-forever",
            "--alpn-proto=konnectivity,x",
            "--sync-interval-cap=30s",
        ]));
        assert_eq!(c.server_host, "konnectivity.example");
        assert_eq!(c.agent_id, "node-agent");
        assert_eq!(c.identifiers.host, vec!["node1"]);
        assert!(c.identifiers.default_route && c.sync_forever);
        assert_eq!(c.alpn, vec!["konnectivity", "x"]);
        let args: Vec<OsString> = base().into_iter().map(OsString::from).collect();
        let Ok(Command::Run(c)) = parse(args, Some("env-id".into())) else {
            panic!()
        };
        assert_eq!(c.agent_id, "env-id");
    }

    #[test]
    fn bad_input() {
        assert!(error(vec![]).contains("--ca-cert is required"));
        assert!(error(vec![format!("--ca-cert={}", file())]).contains("--agent-cert"));
        assert!(error(with(&["--agent-identifiers=zone=a"])).contains("unknown agent identifier"));
        assert!(error(with(&["--sync-interval=0s"])).contains("greater than zero"));
        assert!(error(with(&["--sync-interval=20s"])).contains("cap"));
        assert!(error(with(&["--count-server-leases"])).contains("not supported"));
        assert!(error(with(&["--server-count-source=max"])).contains("only 'default'"));
        assert!(error(with(&["--xfr-channel-size=-1"])).contains("greater than 0"));
        assert!(error(with(&["--proxy-server-port=x"])).contains("port"));
        assert!(error(with(&["--agent-key=/nonexistent"])).contains("not found"));
        config(with(&[
            "--warn-on-channel-limit",
            "--lease-namespace=kube-system",
            "-v=5",
        ]));
    }
}
