//! `apiserver-proxy-pod-webhook`: a mutating admission webhook that gives
//! every pod container `KUBERNETES_SERVICE_HOST=<--apiserver-fqdn>`.
//!
//! Owns: the role's flags ([`parse`] into a validated [`Config`]: the TLS
//! files are loaded here, so bad ones are usage errors) and [`run`], which
//! serves HTTPS until shutdown. [`review`] decides (pure); [`server`] routes
//! HTTP requests and keeps the metrics.
//! Must not: parse HTTP or TLS itself (that is [`crate::http`] and
//! [`crate::tls`]), or install signal handling (the binary does).

pub mod review;
mod scan;
pub mod server;

use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lexopt::Parser;

use crate::cli::{self, Command, Flag, LogFlags, UsageError};
use crate::http;
use crate::shutdown::Shutdown;
use crate::tls;

/// The binary's name, for messages.
pub const NAME: &str = "apiserver-proxy-pod-webhook";

/// `--help` output, without the logging flags (see [`help`]).
pub const HELP: &str = "\
apiserver-proxy-pod-webhook: a mutating admission webhook that sets
KUBERNETES_SERVICE_HOST to the API server's FQDN in every container and
init container of a pod (POST /webhook/pod-apiserver-env over HTTPS).

Usage:
  apiserver-proxy-pod-webhook --apiserver-fqdn NAME --cert-dir DIR [flags]

Flags:
      --apiserver-fqdn string   fully qualified domain name of the kube-apiserver, e.g. example.com. (required)
      --cert-dir string         directory that holds the server certificate and key (required)
      --cert-name string        [optional] server certificate file name in --cert-dir (default \"tls.crt\")
      --key-name string         [optional] server key file name in --cert-dir: RSA (PKCS#1), PKCS#8 or
                                SEC1 EC (default \"tls.key\")
      --client-ca-name string   [optional] CA certificate file name in --cert-dir; when set, clients must
                                present a certificate it signed (default \"\": no client verification)
      --host string             [optional] address to listen on (default \"\": all addresses)
      --port int                [optional] port to listen on; 0 picks a free port (default 9443)
      --max-connections int     [optional] connections served at once; more are refused with 503 (default 256)
      --header-timeout duration [optional] time for the TLS handshake and a request head (default 10s)
      --idle-timeout duration   [optional] time a keep-alive connection may idle (default 1m30s)
  -h, --help                    print this help and exit

Endpoints: POST /webhook/pod-apiserver-env, GET /healthz, GET /readyz, GET /metrics.
The certificate and key are reloaded when their files change.

";

/// The whole `--help` text: [`HELP`] and the klog-compatible flags.
pub fn help() -> String {
    format!("{HELP}{}", cli::LOG_FLAGS_HELP)
}

/// A validated command line.
#[derive(Debug)]
pub struct Config {
    pub fqdn: String,
    /// Where to listen; several candidates for \"all addresses\" (IPv6
    /// dual-stack first, then IPv4).
    pub listen: Vec<SocketAddr>,
    pub files: tls::ServerFiles,
    /// Built (and so checked) while parsing.
    pub tls: tls::Reloader,
    pub limits: http::Limits,
    pub log: LogFlags,
}

/// Errors while serving (exit 1).
#[derive(Debug)]
pub enum Error {
    Http(http::Error),
    Signals(std::io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Http(err) => write!(f, "{err}"),
            Error::Signals(err) => write!(f, "setting up signal handling: {err}"),
        }
    }
}

impl std::error::Error for Error {}

/// Raw flag values, before validation.
#[derive(Default)]
struct Raw {
    fqdn: Option<String>,
    cert_dir: Option<String>,
    cert_name: Option<String>,
    key_name: Option<String>,
    client_ca_name: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    max_connections: Option<usize>,
    header_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    log: LogFlags,
}

/// Parses the command line into a [`Config`], loading the TLS files.
pub fn parse(args: Vec<OsString>) -> Result<Command<Config>, UsageError> {
    let mut parser = Parser::from_args(args);
    let mut raw = Raw::default();
    while let Some(flag) = cli::next_flag(&mut parser)? {
        let p = &mut parser;
        match &flag {
            Flag::Short('h') => return Ok(Command::Help),
            Flag::Long(name) => match name.as_str() {
                "help" => return Ok(Command::Help),
                "apiserver-fqdn" => raw.fqdn = Some(cli::string_value(p, name)?),
                "cert-dir" => raw.cert_dir = Some(cli::string_value(p, name)?),
                "cert-name" => raw.cert_name = Some(cli::string_value(p, name)?),
                "key-name" => raw.key_name = Some(cli::string_value(p, name)?),
                "client-ca-name" => raw.client_ca_name = Some(cli::string_value(p, name)?),
                "host" => raw.host = Some(cli::string_value(p, name)?),
                "port" => raw.port = Some(cli::parsed_value(p, name, parse_port)?),
                "max-connections" => {
                    raw.max_connections = Some(cli::parsed_value(p, name, parse_positive)?)
                }
                "header-timeout" => {
                    raw.header_timeout = Some(cli::parsed_value(p, name, parse_timeout)?)
                }
                "idle-timeout" => {
                    raw.idle_timeout = Some(cli::parsed_value(p, name, parse_timeout)?)
                }
                _ if raw.log.accept(&flag, p)? => {}
                _ => return Err(cli::unexpected(flag)),
            },
            _ if raw.log.accept(&flag, p)? => {}
            _ => return Err(cli::unexpected(flag)),
        }
    }
    validate(raw).map(Command::Run)
}

fn validate(raw: Raw) -> Result<Config, UsageError> {
    let fqdn = raw
        .fqdn
        .ok_or_else(|| UsageError("--apiserver-fqdn is required".into()))?;
    check_dns_name(&fqdn).map_err(|why| UsageError::invalid("apiserver-fqdn", &fqdn, why))?;
    let cert_dir = raw
        .cert_dir
        .ok_or_else(|| UsageError("--cert-dir is required".into()))?;
    if cert_dir.is_empty() {
        return Err(UsageError("--cert-dir must not be empty".into()));
    }
    let dir = PathBuf::from(&cert_dir);
    let file = |flag: &str, name: Option<String>, default: &str| -> Result<PathBuf, UsageError> {
        let name = name.unwrap_or_else(|| default.to_string());
        if name.is_empty() {
            return Err(UsageError(format!("--{flag} must not be empty")));
        }
        Ok(dir.join(name))
    };
    let cert = file("cert-name", raw.cert_name, "tls.crt")?;
    let key = file("key-name", raw.key_name, "tls.key")?;
    let client_ca = match raw.client_ca_name {
        Some(name) if !name.is_empty() => Some(dir.join(name)),
        _ => None,
    };
    let files = tls::ServerFiles {
        cert,
        key,
        client_ca,
        alpn: vec![b"http/1.1".to_vec()],
    };
    let tls = tls::Reloader::new(&files).map_err(|err| UsageError(err.to_string()))?;
    let port = raw.port.unwrap_or(9443);
    let listen = listen_addresses(raw.host.as_deref().unwrap_or(""), port)?;
    let mut limits = http::Limits::default();
    if let Some(n) = raw.max_connections {
        limits.max_connections = n;
    }
    if let Some(t) = raw.header_timeout {
        limits.header_timeout = t;
    }
    if let Some(t) = raw.idle_timeout {
        limits.idle_timeout = t;
    }
    Ok(Config {
        fqdn,
        listen,
        files,
        tls,
        limits,
        log: raw.log,
    })
}

fn parse_port(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .map_err(|_| "expected a port number from 0 to 65535".to_string())
}

fn parse_positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("expected a positive integer".to_string()),
    }
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    match cli::parse_duration(text)? {
        d if d.is_zero() => Err("must be greater than zero".to_string()),
        d => Ok(d),
    }
}

/// An empty host means every address: dual-stack IPv6 when the kernel has
/// it, else IPv4. Names are resolved now, so a bad one is a usage error.
fn listen_addresses(host: &str, port: u16) -> Result<Vec<SocketAddr>, UsageError> {
    if host.is_empty() {
        return Ok(vec![
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
        ]);
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let addrs: Vec<SocketAddr> = (bare, port)
        .to_socket_addrs()
        .map_err(|err| UsageError::invalid("host", host, err))?
        .collect();
    if addrs.is_empty() {
        return Err(UsageError::invalid("host", host, "resolves to no address"));
    }
    Ok(addrs)
}

/// A DNS name as RFC 1123 allows it: labels of 1 to 63 letters, digits and
/// hyphens, not starting or ending with a hyphen, 253 characters in all; one
/// trailing dot (the fully qualified form) is allowed.
pub fn check_dns_name(name: &str) -> Result<(), String> {
    let body = name.strip_suffix('.').unwrap_or(name);
    if body.is_empty() {
        return Err("empty name".to_string());
    }
    if body.len() > 253 {
        return Err("longer than 253 characters".to_string());
    }
    for label in body.split('.') {
        if label.is_empty() {
            return Err("empty label (two dots in a row?)".to_string());
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "label {label:?} has characters other than letters, digits and '-'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

/// Serves until `shutdown` triggers, then finishes requests in flight.
pub fn run(config: Config, shutdown: &Shutdown) -> Result<(), Error> {
    let state = Arc::new(server::State::new(
        config.fqdn.clone(),
        config.tls.clone(),
        shutdown.clone(),
    ));
    let hook_state = state.clone();
    config
        .tls
        .on_reload(move |result| hook_state.metrics.certificate_reloaded(result.is_ok()));
    let handler = server::handler(state.clone());
    let observer = server::observer(state.clone());
    let mut last_error = None;
    let mut bound = None;
    for addr in &config.listen {
        match http::Server::bind_observed(
            *addr,
            Some(config.tls.clone()),
            config.limits.clone(),
            handler.clone(),
            Some(observer.clone()),
            shutdown,
        ) {
            Ok(server) => {
                bound = Some(server);
                break;
            }
            Err(err) => last_error = Some(err),
        }
    }
    let server = match (bound, last_error) {
        (Some(server), _) => server,
        (None, Some(err)) => return Err(Error::Http(err)),
        (None, None) => unreachable!("listen always holds at least one address"),
    };
    log::info!(
        "listening on https://{} for the pod webhook (apiserver FQDN {}, certificate {}, client CA {})",
        server.local_addr(),
        config.fqdn,
        config.files.cert.display(),
        config
            .files
            .client_ca
            .as_ref()
            .map_or("none".to_string(), |p| p.display().to_string()),
    );
    server.wait();
    log::info!("stopped ({})", shutdown.reason().unwrap_or_default());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn data_dir() -> String {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .display()
            .to_string()
    }

    fn parse_args(args: &[&str]) -> Result<Command<Config>, UsageError> {
        parse(args.iter().map(OsString::from).collect())
    }

    #[test]
    fn dns_names() {
        for ok in [
            "foo.bar.",
            "foo.bar",
            "a",
            "kube-apiserver.example.com",
            "10.0.0.1",
            "x1.y-2.z",
        ] {
            assert!(check_dns_name(ok).is_ok(), "{ok}");
        }
        let long_label = "a".repeat(64);
        let long_name = vec!["a".repeat(60); 5].join(".");
        for bad in [
            "",
            ".",
            "foo..bar",
            "-foo.bar",
            "foo-.bar",
            "foo_bar.com",
            "foo bar",
            "é.com",
            "https://foo",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            assert!(check_dns_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_and_defaults() {
        let dir = data_dir();
        let config = match parse_args(&[
            "--apiserver-fqdn=foo.bar.",
            "--cert-dir",
            &dir,
            "--cert-name=server.crt",
            "--key-name=server.key",
            "--host=127.0.0.1",
            "--port=0",
            "-v=4",
            "--logtostderr",
        ])
        .unwrap()
        {
            Command::Run(config) => config,
            Command::Help => panic!("not help"),
        };
        assert_eq!(config.fqdn, "foo.bar.");
        assert_eq!(config.listen, vec!["127.0.0.1:0".parse().unwrap()]);
        assert_eq!(config.files.client_ca, None);
        assert_eq!(config.log.verbosity, 4);
        assert_eq!(config.limits.max_connections, 256);
        assert!(matches!(parse_args(&["--help"]), Ok(Command::Help)));
        assert!(matches!(parse_args(&["-h"]), Ok(Command::Help)));
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        let dir = data_dir();
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (vec!["--cert-dir", &dir], "--apiserver-fqdn is required"),
            (vec!["--apiserver-fqdn=a.b"], "--cert-dir is required"),
            (
                vec!["--apiserver-fqdn=a..b", "--cert-dir", &dir],
                "--apiserver-fqdn",
            ),
            (
                vec!["--apiserver-fqdn=a.b", "--cert-dir", &dir, "--port=70000"],
                "--port",
            ),
            (
                vec!["--apiserver-fqdn=a.b", "--cert-dir", &dir, "--port=-1"],
                "--port",
            ),
            (
                vec!["--apiserver-fqdn=a.b", "--cert-dir", &dir, "--nope"],
                "unknown flag --nope",
            ),
            (
                vec!["--apiserver-fqdn=a.b", "--cert-dir", "/nonexistent"],
                "reading certificate /nonexistent/tls.crt",
            ),
            (
                vec![
                    "--apiserver-fqdn=a.b",
                    "--cert-dir",
                    &dir,
                    "--cert-name=server.crt",
                    "--key-name=server-ec.key",
                ],
                "do not form a usable pair",
            ),
            (
                vec![
                    "--apiserver-fqdn=a.b",
                    "--cert-dir",
                    &dir,
                    "--cert-name=server.crt",
                    "--key-name=server.key",
                    "--client-ca-name=nope.crt",
                ],
                "reading CA",
            ),
            (
                vec![
                    "--apiserver-fqdn=a.b",
                    "--cert-dir",
                    &dir,
                    "--cert-name=server.crt",
                    "--key-name=server.key",
                    "--max-connections=0",
                ],
                "--max-connections",
            ),
            (
                vec![
                    "--apiserver-fqdn=a.b",
                    "--cert-dir",
                    &dir,
                    "--cert-name=server.crt",
                    "--key-name=server.key",
                    "--header-timeout=0",
                ],
                "--header-timeout",
            ),
        ];
        for (args, expected) in cases {
            let err = parse_args(&args).unwrap_err().to_string();
            assert!(err.contains(expected), "{args:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }
}
