//! `proxy-test-client`: upstream's sample frontend. Sends `GET
//! /--request-path` to `--request-host:--request-port` through the
//! proxy-server, in `--mode=grpc` (as kube-apiserver does) or
//! `--mode=http-connect`, over mTLS TCP or a Unix socket (`--proxy-uds`),
//! and prints each response body. Exits 1 unless every request got a 2xx.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lexopt::Parser;

use super::message::Message;
use super::proto::Packet;
use crate::cli::{self, Command, LogFlags, UsageError};
use crate::grpc;
use crate::h2::conn::{Config as H2Config, Connection};
use crate::h2::transport::{TlsSetup, Transport};

const PROXY_PATH: &str = "/ProxyService/Proxy";
const TIMEOUT: Duration = Duration::from_secs(30);
/// The most response bytes kept per request.
const MAX_RESPONSE: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub mode: String,
    pub ca_cert: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub request_proto: String,
    pub request_path: String,
    pub request_host: String,
    pub request_port: u16,
    pub proxy_host: String,
    pub proxy_port: u16,
    pub proxy_uds: Option<PathBuf>,
    pub user_agent: String,
    pub test_requests: u32,
    pub test_delay: Duration,
    pub after_delay: Duration,
    pub log: LogFlags,
}

pub const HELP: &str = "\
proxy-test-client: sends test requests through the proxy-server.

Usage: proxy-test-client [flags]

      --mode MODE                grpc or http-connect (default \"grpc\")
      --proxy-host HOST          proxy-server frontend host (default \"localhost\")
      --proxy-port PORT          proxy-server frontend port; 0 with --proxy-uds (default 8090)
      --proxy-uds PATH           connect to the frontend's Unix socket instead (plaintext)
      --ca-cert FILE             CA of the frontend's certificate (TCP)
      --client-cert FILE         client certificate (TCP, mTLS)
      --client-key FILE          client key (TCP, mTLS)
      --request-proto PROTO      http only (default \"http\")
      --request-host HOST        destination host (default \"localhost\")
      --request-port PORT        destination port (default 8000)
      --request-path PATH        destination path, without the leading / (default \"success\")
      --user-agent TEXT          (default \"test-client\")
      --test-requests N          requests to send, one tunnel each (default 1)
      --test-delay SECONDS       pause between requests (default 0)
      --after-delay SECONDS      pause after the last request (default 0)
      --close-idle-conn[=BOOL], --enable-http2-healthchecks[=BOOL]  accepted for compatibility
  -h, --help                     print this help
";

pub fn parse(args: Vec<OsString>) -> Result<Command<Config>, UsageError> {
    let mut p = Parser::from_args(args);
    let mut c = Config {
        mode: "grpc".into(),
        ca_cert: None,
        client_cert: None,
        request_proto: "http".into(),
        request_path: "success".into(),
        request_host: "localhost".into(),
        request_port: 8000,
        proxy_host: "localhost".into(),
        proxy_port: 8090,
        proxy_uds: None,
        user_agent: "test-client".into(),
        test_requests: 1,
        test_delay: Duration::ZERO,
        after_delay: Duration::ZERO,
        log: LogFlags::default(),
    };
    let (mut cert, mut key) = (String::new(), String::new());
    let secs = |s: &str| s.parse::<u64>().map(Duration::from_secs);
    while let Some(next) = cli::next_long(&mut p, &mut c.log)? {
        let cli::Next::Long(name) = next else {
            return Ok(Command::Help);
        };
        let n = name.as_str();
        match n {
            "mode" => c.mode = cli::string_value(&mut p, n)?,
            "ca-cert" => {
                c.ca_cert = Some(cli::string_value(&mut p, n)?)
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
            }
            "client-cert" => cert = cli::string_value(&mut p, n)?,
            "client-key" => key = cli::string_value(&mut p, n)?,
            "request-proto" => c.request_proto = cli::string_value(&mut p, n)?,
            "request-path" => c.request_path = cli::string_value(&mut p, n)?,
            "request-host" => c.request_host = cli::string_value(&mut p, n)?,
            "request-port" => c.request_port = cli::parsed_value(&mut p, n, |s| s.parse::<u16>())?,
            "proxy-host" => c.proxy_host = cli::string_value(&mut p, n)?,
            "proxy-port" => c.proxy_port = cli::parsed_value(&mut p, n, |s| s.parse::<u16>())?,
            "proxy-uds" => {
                c.proxy_uds = Some(cli::string_value(&mut p, n)?)
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
            }
            "user-agent" => c.user_agent = cli::string_value(&mut p, n)?,
            "test-requests" => {
                c.test_requests = cli::parsed_value(&mut p, n, |s| s.parse::<u32>())?
            }
            "test-delay" => c.test_delay = cli::parsed_value(&mut p, n, secs)?,
            "after-delay" => c.after_delay = cli::parsed_value(&mut p, n, secs)?,
            "close-idle-conn" | "enable-http2-healthchecks" => {
                cli::bool_value(&mut p, n)?;
            }
            _ => return Err(cli::unknown_flag(n)),
        }
    }
    if c.mode != "grpc" && c.mode != "http-connect" {
        return Err(UsageError(format!(
            "mode must be grpc or http-connect, not {:?}",
            c.mode
        )));
    }
    if c.request_proto != "http" {
        return Err(UsageError(format!(
            "--request-proto {:?} is not supported (http only)",
            c.request_proto
        )));
    }
    c.client_cert = match (cert.is_empty(), key.is_empty()) {
        (true, true) => None,
        (false, false) => Some((PathBuf::from(cert), PathBuf::from(key))),
        _ => {
            return Err(UsageError(
                "--client-cert and --client-key go together".into(),
            ));
        }
    };
    if c.proxy_uds.is_none() && c.ca_cert.is_none() {
        return Err(UsageError(
            "--ca-cert is required unless --proxy-uds is set".into(),
        ));
    }
    Ok(Command::Run(c))
}

/// A response: status and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(raw) {
        Ok(httparse::Status::Complete(n)) => Ok(Response {
            status: response.code.unwrap_or(0),
            body: raw[n..].to_vec(),
        }),
        Ok(httparse::Status::Partial) => Err(format!("incomplete response ({} bytes)", raw.len())),
        Err(e) => Err(format!("malformed response: {e}")),
    }
}

fn request(config: &Config) -> Vec<u8> {
    format!(
        "GET /{} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: {}\r\nConnection: close\r\n\r\n",
        config.request_path.trim_start_matches('/'),
        config.request_host,
        config.request_port,
        config.user_agent
    )
    .into_bytes()
}

fn target(config: &Config) -> String {
    if config.request_host.contains(':') {
        format!("[{}]:{}", config.request_host, config.request_port)
    } else {
        format!("{}:{}", config.request_host, config.request_port)
    }
}

fn tls_config(config: &Config, alpn: &[u8]) -> Result<Arc<rustls::ClientConfig>, String> {
    let ca = config
        .ca_cert
        .as_ref()
        .ok_or("--ca-cert is required over TCP")?;
    let identity = config
        .client_cert
        .as_ref()
        .map(|(c, k)| (c.as_path(), k.as_path()));
    crate::tls::client_config(ca, identity, vec![alpn.to_vec()]).map_err(|e| e.to_string())
}

fn tcp(config: &Config) -> Result<TcpStream, String> {
    let addr = format!("{}:{}", config.proxy_host, config.proxy_port);
    let sock = TcpStream::connect(&addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
    sock.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    sock.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok(sock)
}

fn read_to_end_bounded(reader: &mut impl Read) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) if out.len() + n > MAX_RESPONSE => return Err("response too large".into()),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // A TLS peer that closes without close_notify still delivered
            // what it sent.
            Err(e) if !out.is_empty() => {
                log::debug!("reading after {} bytes: {e}", out.len());
                return Ok(out);
            }
            Err(e) => return Err(format!("reading: {e}")),
        }
    }
}

/// One request through an HTTP CONNECT tunnel.
fn via_connect(config: &Config) -> Result<Response, String> {
    let mut stream: Box<dyn ReadWrite> = match &config.proxy_uds {
        Some(path) => {
            let sock = UnixStream::connect(path)
                .map_err(|e| format!("connecting to {}: {e}", path.display()))?;
            sock.set_read_timeout(Some(TIMEOUT))
                .map_err(|e| e.to_string())?;
            Box::new(sock)
        }
        None => {
            let name = rustls::pki_types::ServerName::try_from(config.proxy_host.clone())
                .map_err(|e| e.to_string())?;
            let conn = rustls::ClientConnection::new(tls_config(config, b"http/1.1")?, name)
                .map_err(|e| e.to_string())?;
            Box::new(rustls::StreamOwned::new(conn, tcp(config)?))
        }
    };
    let target = target(config);
    stream
        .write_all(
            format!(
                "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: {}\r\n\r\n",
                config.user_agent
            )
            .as_bytes(),
        )
        .map_err(|e| format!("sending CONNECT: {e}"))?;
    // The answer's head, byte by byte so no tunnel byte is consumed.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024
            || stream
                .read(&mut byte)
                .map_err(|e| format!("reading the CONNECT answer: {e}"))?
                == 0
        {
            return Err(format!(
                "proxy answered: {}",
                String::from_utf8_lossy(&head)
            ));
        }
        head.push(byte[0]);
    }
    let answer = parse_response(&head)?;
    if answer.status != 200 {
        let rest = read_to_end_bounded(&mut stream).unwrap_or_default();
        return Err(format!(
            "proxy refused: {} {}",
            answer.status,
            String::from_utf8_lossy(&rest).trim()
        ));
    }
    stream
        .write_all(&request(config))
        .map_err(|e| format!("sending the request: {e}"))?;
    parse_response(&read_to_end_bounded(&mut stream)?)
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// One request through a gRPC Proxy stream.
fn via_grpc(config: &Config) -> Result<Response, String> {
    let h2 = H2Config::default();
    let (transport, authority) = match &config.proxy_uds {
        Some(path) => {
            let sock = UnixStream::connect(path)
                .map_err(|e| format!("connecting to {}: {e}", path.display()))?;
            (
                Transport::plain(sock, Some(TIMEOUT), Some(TIMEOUT)),
                "localhost".to_string(),
            )
        }
        None => {
            let name = rustls::pki_types::ServerName::try_from(config.proxy_host.clone())
                .map_err(|e| e.to_string())?;
            let setup = TlsSetup::Client(tls_config(config, b"h2")?, name);
            (
                Transport::tls(tcp(config)?, setup, Some(TIMEOUT), Some(TIMEOUT)),
                format!("{}:{}", config.proxy_host, config.proxy_port),
            )
        }
    };
    let conn =
        Connection::client(transport.map_err(|e| e.to_string())?, h2).map_err(|e| e.to_string())?;
    let client = grpc::Client::new(conn, &authority);
    let call = client.call(PROXY_PATH, &[]).map_err(|s| format!("{s:?}"))?;
    let send = |m: Message| {
        let (head, data) = m.encode_parts();
        call.send_parts(&head, &data).map_err(|s| format!("{s:?}"))
    };
    let recv = || -> Result<Option<Message>, String> {
        match call
            .recv_decoded::<Packet>()
            .map_err(|s| format!("{s:?}"))?
        {
            None => Ok(None),
            Some(packet) => Message::try_from(packet?).map(Some),
        }
    };
    let random = (crate::sys::random_u64() >> 1) as i64;
    send(Message::DialReq {
        protocol: "tcp".into(),
        address: target(config),
        random,
    })?;
    let connect_id = match recv()? {
        Some(Message::DialRsp {
            error, connect_id, ..
        }) if error.is_empty() => connect_id,
        Some(Message::DialRsp { error, .. }) => return Err(format!("dial failed: {error}")),
        other => return Err(format!("expected DIAL_RSP, got {other:?}")),
    };
    send(Message::Data {
        connect_id,
        error: String::new(),
        data: request(config).into(),
    })?;
    let mut raw = Vec::new();
    loop {
        match recv()? {
            Some(Message::Data { data, .. }) => {
                raw.extend_from_slice(&data);
                if raw.len() > MAX_RESPONSE {
                    return Err("response too large".into());
                }
            }
            Some(Message::CloseRsp { .. }) | None => break,
            Some(_) => {}
        }
    }
    let _ = call.close_send();
    parse_response(&raw)
}

/// Sends the requests; prints each body to stdout.
pub fn run(config: &Config) -> Result<(), String> {
    let mut failures = 0;
    for i in 0..config.test_requests {
        if i > 0 {
            std::thread::sleep(config.test_delay);
        }
        let outcome = if config.mode == "grpc" {
            via_grpc(config)
        } else {
            via_connect(config)
        };
        match outcome {
            Ok(response) => {
                let mut stdout = std::io::stdout();
                let _ = stdout.write_all(&response.body);
                let _ = stdout.write_all(b"\n");
                if !(200..300).contains(&response.status) {
                    log::error!("request {} got status {}", i + 1, response.status);
                    failures += 1;
                }
            }
            Err(e) => {
                log::error!("request {}: {e}", i + 1);
                failures += 1;
            }
        }
    }
    std::thread::sleep(config.after_delay);
    if failures == 0 {
        Ok(())
    } else {
        Err(format!(
            "{failures} of {} requests failed",
            config.test_requests
        ))
    }
}
