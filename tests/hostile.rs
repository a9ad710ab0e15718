//! Hostile clients against every listener of proxy-server and the webhook,
//! with the real binaries:
//! - slowloris (a byte a second) on the gRPC frontend (Unix h2c, mTLS TCP)
//!   and the agent port: cut off after `--header-timeout`, which bounds the
//!   TLS handshake plus the HTTP/2 preface and first SETTINGS, while other
//!   clients are served;
//! - a thousand malformed requests of each kind (truncated ClientHellos,
//!   garbage and invalid frames after the preface, oversized and malformed
//!   CONNECT heads, 100 MiB and malformed reviews), after which every
//!   server answers normally and is back at its baseline of threads and
//!   descriptors;
//! - every connection and dial limit: the refused client gets the refusal,
//!   the log names the limit, and service resumes once the load is gone.

mod common;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apiserver_proxy::grpc::{self, Code};
use apiserver_proxy::h2::frame::{self, ErrorCode, Frame};
use apiserver_proxy::h2::{self, Transport};
use apiserver_proxy::tunnel::message::Message;
use apiserver_proxy::tunnel::proto::Packet;
use common::interop::{TempDir, client_tls, make_certs};
use common::{ChildGuard, Logged, poll};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-server");
const AGENT: &str = env!("CARGO_BIN_EXE_proxy-agent");
const CLIENT: &str = env!("CARGO_BIN_EXE_proxy-test-client");
const TEST_SERVER: &str = env!("CARGO_BIN_EXE_http-test-server");
const WEBHOOK: &str = env!("CARGO_BIN_EXE_apiserver-proxy-pod-webhook");

/// Generous: two loaded cores.
const DEADLINE: Duration = Duration::from_secs(60);
const IO: Option<Duration> = Some(Duration::from_secs(20));
/// Malformed requests of each kind, and the client threads sending them.
const ROUNDS: usize = 1000;
const CLIENTS: usize = 4;

// --- processes ----------------------------------------------------------------

/// Certificates in upstream's layout (scripts/make-certs.sh).
struct Certs(TempDir);

impl Certs {
    fn new() -> Certs {
        let dir = TempDir::new("hostile-certs-");
        make_certs(&dir.0);
        Certs(dir)
    }

    fn path(&self, rel: &str) -> String {
        self.0.path(rel).to_string_lossy().into_owned()
    }

    /// What kube-apiserver presents to the frontend (ALPN h2).
    fn frontend_client(&self) -> Arc<rustls::ClientConfig> {
        client_tls(
            &self.0.path("frontend/issued/ca.crt"),
            &self.0.path("frontend/issued/proxy-client.crt"),
            &self.0.path("frontend/private/proxy-client.key"),
        )
    }

    /// What an agent presents to the agent port (ALPN h2).
    fn agent_client(&self) -> Arc<rustls::ClientConfig> {
        client_tls(
            &self.0.path("agent/issued/ca.crt"),
            &self.0.path("agent/issued/proxy-agent.crt"),
            &self.0.path("agent/private/proxy-agent.key"),
        )
    }
}

/// A proxy-server (and its agent, once started).
struct Proxy {
    certs: Certs,
    server: Logged,
    agent: Option<Logged>,
    agent_port: u16,
    health_port: u16,
    frontend_port: Option<u16>,
    uds: Option<PathBuf>,
}

impl Proxy {
    /// `mode`: grpc or http-connect; `tcp`: mTLS TCP frontend, else a Unix socket.
    fn start(mode: &str, tcp: bool, extra: &[&str]) -> Proxy {
        let certs = Certs::new();
        let mut args: Vec<String> = vec![
            format!("--mode={mode}"),
            "--agent-port=0".into(),
            "--health-port=0".into(),
            "--admin-port=0".into(),
            "--agent-bind-address=127.0.0.1".into(),
            "--health-bind-address=127.0.0.1".into(),
            "--server-port=0".into(),
        ];
        args.extend(common::interop::cluster_flags(&|r| certs.path(r)));
        let uds = (!tcp).then(|| {
            std::env::temp_dir().join(common::unique("hostile").replace('-', "") + ".sock")
        });
        match &uds {
            Some(path) => args.push(format!("--uds-name={}", path.display())),
            None => args.extend(
                [
                    vec!["--server-bind-address=127.0.0.1".to_string()],
                    common::interop::frontend_flags(&|r| certs.path(r)),
                ]
                .concat(),
            ),
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut server = Logged::start(SERVER, &args);
        let agent_port = server.port("agent port");
        let health_port = server.port("health port");
        let frontend_port = tcp.then(|| server.port(&format!("frontend ({mode})")));
        Proxy {
            certs,
            server,
            agent: None,
            agent_port,
            health_port,
            frontend_port,
            uds,
        }
    }

    fn with_agent(self) -> Proxy {
        self.with_agent_flags(&[])
    }

    fn with_agent_flags(mut self, extra: &[&str]) -> Proxy {
        let mut args = vec![
            format!("--ca-cert={}", self.certs.path("agent/issued/ca.crt")),
            format!(
                "--agent-cert={}",
                self.certs.path("agent/issued/proxy-agent.crt")
            ),
            format!(
                "--agent-key={}",
                self.certs.path("agent/private/proxy-agent.key")
            ),
            format!("--proxy-server-port={}", self.agent_port),
            "--health-server-port=0".into(),
            "--admin-server-port=0".into(),
            "--health-server-host=127.0.0.1".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut agent = Logged::start(AGENT, &args);
        agent.wait_for_log("connected to server");
        poll("the server to see the agent", DEADLINE, || {
            (http_get(self.health_port, "/readyz").0 == 200).then_some(())
        });
        self.agent = Some(agent);
        self
    }

    fn pid(&self) -> u32 {
        self.server.child.pid()
    }

    fn uds(&self) -> UnixStream {
        let sock = UnixStream::connect(self.uds.as_ref().expect("a Unix frontend")).unwrap();
        sock.set_read_timeout(IO).unwrap();
        sock.set_write_timeout(IO).unwrap();
        sock
    }

    fn frontend(&self) -> TcpStream {
        tcp(self.frontend_port.expect("a TCP frontend"))
    }

    /// One request through proxy-test-client (gRPC frontend) to the
    /// http-test-server on `dest`: whether it was served.
    fn grpc_request(&self, dest: u16) -> Result<(), String> {
        let mut cmd = Command::new(CLIENT);
        match (&self.uds, self.frontend_port) {
            (Some(path), _) => {
                cmd.args(["--proxy-port=0", "--proxy-host="])
                    .arg(format!("--proxy-uds={}", path.display()));
            }
            (None, Some(port)) => {
                cmd.arg("--proxy-host=127.0.0.1")
                    .arg(format!("--proxy-port={port}"))
                    .arg(format!(
                        "--ca-cert={}",
                        self.certs.path("frontend/issued/ca.crt")
                    ))
                    .arg(format!(
                        "--client-cert={}",
                        self.certs.path("frontend/issued/proxy-client.crt")
                    ))
                    .arg(format!(
                        "--client-key={}",
                        self.certs.path("frontend/private/proxy-client.key")
                    ));
            }
            (None, None) => unreachable!(),
        }
        let out = cmd
            .arg(format!("--request-port={dest}"))
            .arg("--test-requests=1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && stdout.contains("The success test page!") {
            Ok(())
        } else {
            Err(format!(
                "{:?}: {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// A CONNECT tunnel to the echo server on `echo` (Unix frontend):
    /// the answer head and the socket.
    fn connect(&self, target: &str) -> (String, UnixStream) {
        let mut sock = self.uds();
        // A refused connection may be closed before the request is written.
        let _ = sock
            .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes());
        (common::read_head(&mut sock), sock)
    }

    /// A CONNECT tunnel to `echo` carries bytes both ways (over the Unix
    /// socket or mTLS, whichever the frontend is).
    fn connect_works(&self, echo: u16) {
        let target = format!("127.0.0.1:{echo}");
        let mut sock: Box<dyn ReadWrite> = match self.frontend_port {
            None => Box::new(self.uds()),
            Some(_) => {
                let config = apiserver_proxy::tls::client_config(
                    &self.certs.0.path("frontend/issued/ca.crt"),
                    Some((
                        &self.certs.0.path("frontend/issued/proxy-client.crt"),
                        &self.certs.0.path("frontend/private/proxy-client.key"),
                    )),
                    vec![b"http/1.1".to_vec()],
                )
                .unwrap();
                Box::new(tls_connect(self.frontend(), config).unwrap())
            }
        };
        sock.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .unwrap();
        sock.flush().unwrap();
        let head = common::read_head(&mut sock);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        sock.write_all(b"ping").unwrap();
        sock.flush().unwrap();
        let mut back = [0u8; 4];
        sock.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ping");
    }

    fn log(&self) -> String {
        self.server.log()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(path) = &self.uds {
            let _ = fs::remove_file(path);
        }
    }
}

/// The webhook with the test certificates.
struct Webhook {
    _dir: TempDir,
    proc: Logged,
    port: u16,
}

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

impl Webhook {
    fn start(extra: &[&str]) -> Webhook {
        let dir = TempDir::new("hostile-webhook-");
        fs::copy(data("server.crt"), dir.path("tls.crt")).unwrap();
        fs::copy(data("server.key"), dir.path("tls.key")).unwrap();
        let mut args: Vec<String> = [
            "--apiserver-fqdn",
            "foo.bar.",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push("--cert-dir".into());
        args.push(dir.0.to_string_lossy().into_owned());
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proc = Logged::start(WEBHOOK, &args);
        let port = poll("the webhook's startup line", DEADLINE, || {
            assert!(proc.child.is_running(), "exited early:\n{}", proc.log());
            let log = proc.log();
            let start = log.find("listening on https://")? + "listening on https://".len();
            log[start..]
                .split_whitespace()
                .next()?
                .rsplit(':')
                .next()?
                .trim_end_matches('/')
                .parse()
                .ok()
        });
        Webhook {
            _dir: dir,
            proc,
            port,
        }
    }

    fn tls(&self) -> io::Result<Tls> {
        let config =
            apiserver_proxy::tls::client_config(&data("ca.crt"), None, vec![b"http/1.1".to_vec()])
                .unwrap();
        tls_connect(tcp(self.port), config)
    }

    /// A review answered 200 (normal service).
    fn review_works(&self) {
        let body = fs::read(data("admission.json")).unwrap();
        let mut s = self.tls().unwrap();
        let (status, text) = post(&mut s, &body, true).unwrap();
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("\"allowed\":true"), "{text}");
    }
}

// --- clients ------------------------------------------------------------------

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn tcp(port: u16) -> TcpStream {
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(IO).unwrap();
    sock.set_write_timeout(IO).unwrap();
    sock
}

/// A finished TLS handshake on `sock`.
fn tls_connect(sock: TcpStream, config: Arc<rustls::ClientConfig>) -> io::Result<Tls> {
    let conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut sock) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    sock.set_read_timeout(IO).unwrap();
    let _ = sock.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let mut out = Vec::new();
    let _ = sock.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn metric(port: u16, name: &str) -> f64 {
    let (_, text) = http_get(port, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Everything until the peer closes (or the read timeout).
fn read_to_close(sock: &mut impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => {
                if out.len() < 64 * 1024 {
                    out.extend_from_slice(&buf[..n]);
                }
            }
        }
    }
}

/// One response with a Content-Length body: status and text.
fn read_response(sock: &mut impl Read) -> io::Result<(u16, String)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                let text = String::from_utf8_lossy(&out).into_owned();
                let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                return Ok((status, text));
            }
        }
        let n = sock.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                String::from_utf8_lossy(&out).into_owned(),
            ));
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// POSTs a review body; `close` asks the server to close afterwards.
fn post(s: &mut Tls, body: &[u8], close: bool) -> io::Result<(u16, String)> {
    let head = format!(
        "POST /webhook/pod-apiserver-env HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()?;
    read_response(s)
}

/// Deterministic pseudo-random numbers (xorshift) for input `i`.
struct Rng(u64);

impl Rng {
    fn new(i: usize) -> Rng {
        Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next() >> 24) as u8).collect()
    }
}

/// Runs `attack(i)` for every i below [`ROUNDS`] on [`CLIENTS`] threads.
/// The child's log is collected by a thread of ours, so a line written
/// as an answer goes out may land just after the client has read it.
fn log_shows(log: impl Fn() -> String, line: &str) {
    poll(&format!("{line:?} in the log"), DEADLINE, || {
        log().contains(line).then_some(())
    });
}

fn flood(attack: impl Fn(usize) + Sync) {
    std::thread::scope(|scope| {
        for first in 0..CLIENTS {
            let attack = &attack;
            scope.spawn(move || {
                for i in (first..ROUNDS).step_by(CLIENTS) {
                    attack(i);
                }
            });
        }
    });
}

/// A ClientHello (as a client offering `alpn` would send it).
fn client_hello(alpn: &[u8]) -> Vec<u8> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    hello
}

/// Sends a ClientHello cut at a random point, ends the stream, and waits
/// for the server to close.
fn truncated_hello(port: u16, hello: &[u8], i: usize) {
    let cut = Rng::new(i).below(hello.len());
    let mut sock = tcp(port);
    let _ = sock.write_all(&hello[..cut]);
    let _ = sock.shutdown(Shutdown::Write);
    read_to_close(&mut sock);
}

// --- resources ----------------------------------------------------------------

/// Threads and open descriptors of a process.
fn resources(pid: u32) -> (usize, usize) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (threads, fds)
}

/// A `/proc/PID/status` figure in KiB (VmRSS, VmHWM).
fn memory_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The counts once they hold still for two polls in a row.
fn settled(pid: u32) -> (usize, usize) {
    let mut last = None;
    poll("the process to settle", DEADLINE, || {
        let now = resources(pid);
        let same = last == Some(now);
        last = Some(now);
        same.then_some(now)
    })
}

/// Polls until `pid` is at or below `baseline` (warm-up threads may still
/// be on their way out; a leak of one per request would show far above).
fn back_to_baseline(what: &str, pid: u32, baseline: (usize, usize)) {
    let mut now = resources(pid);
    let end = Instant::now() + DEADLINE;
    while now.0 > baseline.0 || now.1 > baseline.1 {
        assert!(
            Instant::now() < end,
            "{what}: threads and descriptors {now:?}, baseline {baseline:?}"
        );
        std::thread::sleep(Duration::from_millis(50)); // polling interval
        now = resources(pid);
    }
}

// --- destinations -------------------------------------------------------------

/// A TCP echo server.
fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut reader = conn.try_clone().unwrap();
                let mut writer = conn;
                let _ = io::copy(&mut reader, &mut writer);
            });
        }
    });
    port
}

fn test_server() -> (Logged, u16) {
    let mut proc = Logged::start(TEST_SERVER, &["--server-port=0".into()]);
    let port = proc.port("http-test-server");
    (proc, port)
}

/// A destination whose connects hang: a listener with a full backlog that
/// never accepts (Linux then drops further SYNs).
fn blackhole() -> (ChildGuard, u16, Vec<TcpStream>) {
    let script = "import socket,sys,time\n\
        s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(0)\n\
        print(s.getsockname()[1], flush=True)\n\
        time.sleep(600)\n";
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script]).stdout(Stdio::piped());
    let mut child = ChildGuard::spawn(&mut cmd);
    let stdout = child.child.as_mut().unwrap().stdout.take().unwrap();
    let mut line = String::new();
    io::BufRead::read_line(&mut io::BufReader::new(stdout), &mut line).unwrap();
    let port: u16 = line.trim().parse().unwrap();
    let held = (0..4)
        .filter_map(|_| {
            TcpStream::connect_timeout(
                &format!("127.0.0.1:{port}").parse().unwrap(),
                Duration::from_millis(300),
            )
            .ok()
        })
        .collect();
    (child, port, held)
}

// --- HTTP/2 by hand -----------------------------------------------------------

/// The client's opening: preface and an empty SETTINGS frame.
fn h2_opening() -> Vec<u8> {
    let mut out = frame::PREFACE.to_vec();
    frame::write_settings(&mut out, &[]);
    out
}

fn raw_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// HPACK literals without indexing or Huffman (short names and values).
fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// Garbage or an invalid frame sequence after a valid preface, variant
/// chosen by `i`.
fn bad_h2(i: usize) -> Vec<u8> {
    const DATA: u8 = 0;
    const HEADERS: u8 = 1;
    const SETTINGS: u8 = 4;
    const PING: u8 = 6;
    const WINDOW_UPDATE: u8 = 8;
    const CONTINUATION: u8 = 9;
    const END_HEADERS: u8 = 4;
    let mut rng = Rng::new(i);
    let request = hpack(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/ProxyService/Proxy"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
    ]);
    let mut out = frame::PREFACE.to_vec();
    if i % 10 == 0 {
        // No SETTINGS first.
        raw_frame(&mut out, PING, 0, 0, &[0; 8]);
        return out;
    }
    if i % 10 == 1 {
        // A SETTINGS frame of the wrong length.
        raw_frame(&mut out, SETTINGS, 0, 0, &[0; 5]);
        return out;
    }
    frame::write_settings(&mut out, &[]);
    match i % 10 {
        2 => {
            let n = 1 + rng.below(2000);
            out.extend(rng.bytes(n));
        }
        3 => raw_frame(&mut out, DATA, 0, 0, b"data on stream 0"),
        4 => raw_frame(&mut out, HEADERS, END_HEADERS, 1, &rng.bytes(40)),
        5 => raw_frame(&mut out, HEADERS, END_HEADERS, 2, &request),
        6 => raw_frame(&mut out, WINDOW_UPDATE, 0, 0, &[0; 4]),
        7 => raw_frame(&mut out, CONTINUATION, END_HEADERS, 1, &request),
        8 => {
            // A frame header announcing 16 MiB.
            out.extend_from_slice(&[0xff, 0xff, 0xff, DATA, 0, 0, 0, 0, 1]);
            out.extend(rng.bytes(100));
        }
        _ => {
            // A real call, then a gRPC message claiming 4 GiB, then garbage.
            raw_frame(&mut out, HEADERS, END_HEADERS, 1, &request);
            raw_frame(&mut out, DATA, 0, 1, &[0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
            let n = 1 + rng.below(500);
            out.extend(rng.bytes(n));
        }
    }
    out
}

/// The frames a server sent until it closed.
fn frames_of(bytes: &[u8]) -> Vec<Frame> {
    let mut decoder = frame::Decoder::new(frame::MAX_MAX_FRAME_SIZE);
    decoder.spare(bytes.len())[..bytes.len()].copy_from_slice(bytes);
    decoder.filled(bytes.len());
    let mut frames = Vec::new();
    while let Ok(Some(f)) = decoder.next_frame() {
        frames.push(f);
    }
    frames
}

fn goaway_of(frames: &[Frame]) -> Option<(ErrorCode, String)> {
    frames.iter().find_map(|f| match f {
        Frame::GoAway { code, debug, .. } => {
            Some((*code, String::from_utf8_lossy(debug).into_owned()))
        }
        _ => None,
    })
}

// --- slowloris ----------------------------------------------------------------

/// Sends `bytes` a byte a second (the pace is a read with a one-second
/// timeout, which also notices the close) until the server closes; returns
/// the time from `started`. Panics if every byte went through.
fn trickle(sock: &mut (impl Read + Write), bytes: &[u8], started: Instant) -> Duration {
    let mut buf = [0u8; 4096];
    for &b in bytes {
        if sock.write_all(&[b]).and_then(|()| sock.flush()).is_err() {
            return started.elapsed();
        }
        let pace = Instant::now() + Duration::from_secs(1);
        while Instant::now() < pace {
            match sock.read(&mut buf) {
                Ok(0) => return started.elapsed(),
                Ok(_) => {} // the server's SETTINGS, say
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return started.elapsed(),
            }
        }
    }
    panic!("the server took {} bytes at a byte a second", bytes.len());
}

fn paced<S: Read + Write>(mut sock: S, set_timeout: impl Fn(&S), bytes: &[u8]) -> Duration {
    set_timeout(&sock);
    trickle(&mut sock, bytes, Instant::now())
}

fn one_second(sock: &TcpStream) {
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
}

/// Cut off after the header timeout (2 s), well before the bytes ran out.
fn assert_cut_off(what: &str, after: Duration) {
    assert!(
        after >= Duration::from_millis(1500),
        "{what}: cut off early, after {after:?}"
    );
    assert!(
        after < Duration::from_secs(20),
        "{what}: cut off late, after {after:?}"
    );
}

#[test]
fn slowloris_on_the_grpc_unix_frontend_and_the_agent_port_is_cut_off_while_others_are_served() {
    let (_dest, dest) = test_server();
    let proxy = Proxy::start("grpc", false, &["--header-timeout=2s"]).with_agent();
    let agent_tls = proxy.certs.agent_client();
    let hello = client_hello(b"h2");
    std::thread::scope(|scope| {
        let preface = scope.spawn(|| {
            let sock = proxy.uds();
            sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut sock = sock;
            trickle(&mut sock, &h2_opening(), Instant::now())
        });
        let handshake = scope.spawn(|| paced(tcp(proxy.agent_port), one_second, &hello));
        // A good TLS handshake, then the preface a byte a second: the
        // budget covers both.
        let after_tls = scope.spawn(|| {
            let started = Instant::now();
            let sock = tcp(proxy.agent_port);
            one_second(&sock);
            let mut tls = tls_connect(sock, agent_tls.clone()).unwrap();
            trickle(&mut tls, &h2_opening(), started)
        });
        // Meanwhile others are served, more than once.
        for _ in 0..3 {
            proxy.grpc_request(dest).unwrap();
        }
        assert_cut_off("preface on the Unix frontend", preface.join().unwrap());
        assert_cut_off("ClientHello on the agent port", handshake.join().unwrap());
        assert_cut_off(
            "preface after TLS on the agent port",
            after_tls.join().unwrap(),
        );
    });
    proxy.grpc_request(dest).unwrap();
    assert_eq!(
        http_get(proxy.health_port, "/readyz").0,
        200,
        "the agent stayed"
    );
}

#[test]
fn slowloris_on_the_grpc_tls_frontend_is_cut_off_while_others_are_served() {
    let (_dest, dest) = test_server();
    let proxy = Proxy::start("grpc", true, &["--header-timeout=2s"]).with_agent();
    let frontend_tls = proxy.certs.frontend_client();
    let hello = client_hello(b"h2");
    std::thread::scope(|scope| {
        let handshake = scope.spawn(|| paced(proxy.frontend(), one_second, &hello));
        let after_tls = scope.spawn(|| {
            let started = Instant::now();
            let sock = proxy.frontend();
            one_second(&sock);
            let mut tls = tls_connect(sock, frontend_tls.clone()).unwrap();
            trickle(&mut tls, &h2_opening(), started)
        });
        for _ in 0..3 {
            proxy.grpc_request(dest).unwrap();
        }
        assert_cut_off("ClientHello on the frontend", handshake.join().unwrap());
        assert_cut_off(
            "preface after TLS on the frontend",
            after_tls.join().unwrap(),
        );
    });
    proxy.grpc_request(dest).unwrap();
}

// --- a thousand malformed requests of each kind -----------------------------------

#[test]
fn the_connect_frontend_survives_a_thousand_malformed_requests_of_each_kind() {
    let echo = echo_server();
    let uds = Proxy::start("http-connect", false, &[]).with_agent();
    let tls = Proxy::start("http-connect", true, &[]).with_agent();
    for proxy in [&uds, &tls] {
        // Warm up: a tunnel, a refused head, a truncated handshake.
        proxy.connect_works(echo);
    }
    let hello = client_hello(b"http/1.1");
    truncated_hello(tls.frontend_port.unwrap(), &hello, 0);
    truncated_hello(tls.agent_port, &client_hello(b"h2"), 0);
    let baselines = [settled(uds.pid()), settled(tls.pid())];

    // Heads over 16 KiB: 431.
    flood(|i| {
        let mut sock = uds.uds();
        let pad = 16 * 1024 + 1 + Rng::new(i).below(8 * 1024);
        let head = format!(
            "CONNECT 127.0.0.1:{echo} HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(pad)
        );
        let _ = sock.write_all(head.as_bytes());
        let answer = common::read_head(&mut sock);
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");
    });
    // Malformed heads: a 4xx each.
    let many_lines: String = (0..100).map(|i| format!("X-{i}: v\r\n")).collect();
    flood(|i| {
        let mut rng = Rng::new(i);
        let head: Vec<u8> = match i % 8 {
            0 => b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            1 => b"CONNECT\r\n\r\n".to_vec(),
            2 => b"CONNECT nohostport HTTP/1.1\r\n\r\n".to_vec(),
            3 => format!("CONNECT 127.0.0.1:{echo} HTTP/1.1\r\nNo colon here\r\n\r\n").into_bytes(),
            4 => format!("CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n{many_lines}\r\n").into_bytes(),
            5 => format!("CONNECT 127.0.0.1:{echo} HTTP/1.1\r\nBad\0Name: v\r\n\r\n").into_bytes(),
            6 => {
                let n = 1 + rng.below(300);
                let mut junk: Vec<u8> = rng.bytes(n);
                // Printable garbage never makes a request line.
                junk.insert(0, b'\x01');
                junk.extend_from_slice(b"\r\n\r\n");
                junk
            }
            _ => format!("CONNECT 127.0.0.1:{echo} HTTP/1.1\r\nHost: x\r\n\r").into_bytes(),
        };
        let mut sock = uds.uds();
        let _ = sock.write_all(&head);
        if i % 8 == 7 {
            // An unfinished head, then the end: closed without a tunnel.
            let _ = sock.shutdown(Shutdown::Write);
            let answer = read_to_close(&mut sock);
            assert!(!answer.starts_with(b"HTTP/1.1 200"));
            return;
        }
        let answer = common::read_head(&mut sock);
        assert!(
            answer.starts_with("HTTP/1.1 4"),
            "variant {}: {answer:?}",
            i % 8
        );
    });
    // Truncated ClientHellos on the TLS frontend and the agent port.
    flood(|i| truncated_hello(tls.frontend_port.unwrap(), &hello, i));
    let h2_hello = client_hello(b"h2");
    flood(|i| truncated_hello(tls.agent_port, &h2_hello, i));

    for proxy in [&uds, &tls] {
        proxy.connect_works(echo);
    }
    assert_eq!(
        http_get(tls.health_port, "/readyz").0,
        200,
        "the agent stayed"
    );
    back_to_baseline("unix frontend", uds.pid(), baselines[0]);
    back_to_baseline("tls frontend", tls.pid(), baselines[1]);
    for proxy in [&uds, &tls] {
        assert!(!proxy.log().contains("panicked"), "{}", proxy.log());
    }
}

#[test]
fn the_grpc_frontend_and_agent_port_survive_a_thousand_malformed_requests_of_each_kind() {
    let (_dest, dest) = test_server();
    let uds = Proxy::start("grpc", false, &[]).with_agent();
    let tls = Proxy::start("grpc", true, &[]).with_agent();
    for proxy in [&uds, &tls] {
        proxy.grpc_request(dest).unwrap();
    }
    let frontend_tls = tls.certs.frontend_client();
    let hello = client_hello(b"h2");
    truncated_hello(tls.frontend_port.unwrap(), &hello, 0);
    let baselines = [settled(uds.pid()), settled(tls.pid())];

    // Garbage and invalid frames after the preface: the server answers
    // with GOAWAY (or just closes) and keeps serving.
    flood(|i| {
        let mut sock = uds.uds();
        let _ = sock.write_all(&bad_h2(i));
        let _ = sock.shutdown(Shutdown::Write);
        let answer = frames_of(&read_to_close(&mut sock));
        // Protocol errors are named in a GOAWAY (random bytes may end
        // anywhere, even inside a frame, so they are not checked).
        if ![2, 9].contains(&(i % 10)) {
            let goaway = goaway_of(&answer);
            assert!(
                goaway
                    .as_ref()
                    .is_some_and(|(code, _)| *code != ErrorCode::NO_ERROR),
                "variant {}: {answer:?}",
                i % 10
            );
        }
    });
    flood(|i| {
        let mut tls = tls_connect(tls.frontend(), frontend_tls.clone()).unwrap();
        let _ = tls.write_all(&bad_h2(i));
        let _ = tls.flush();
        tls.conn.send_close_notify();
        let _ = tls.conn.complete_io(&mut tls.sock);
        let _ = tls.sock.shutdown(Shutdown::Write);
        read_to_close(&mut tls);
    });
    // Truncated ClientHellos on the frontend and the agent port.
    flood(|i| truncated_hello(tls.frontend_port.unwrap(), &hello, i));
    flood(|i| truncated_hello(tls.agent_port, &hello, i));

    for proxy in [&uds, &tls] {
        proxy.grpc_request(dest).unwrap();
        assert_eq!(
            http_get(proxy.health_port, "/readyz").0,
            200,
            "the agent stayed"
        );
    }
    back_to_baseline("unix frontend", uds.pid(), baselines[0]);
    back_to_baseline("tls frontend", tls.pid(), baselines[1]);
    for proxy in [&uds, &tls] {
        assert!(!proxy.log().contains("panicked"), "{}", proxy.log());
    }
}

#[test]
fn the_webhook_survives_a_thousand_malformed_requests_and_refuses_100_mib_quickly() {
    let webhook = Webhook::start(&[]);
    let pid = webhook.proc.child.pid();
    let hello = client_hello(b"http/1.1");
    // Warm up the connection pool as wide as the floods below go.
    let held: Vec<Tls> = (0..3 * CLIENTS)
        .map(|_| {
            let mut s = webhook.tls().unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .unwrap();
            s.flush().unwrap();
            assert_eq!(read_response(&mut s).unwrap().0, 200);
            s
        })
        .collect();
    drop(held);
    webhook.review_works();
    truncated_hello(webhook.port, &hello, 0);
    let baseline = settled(pid);
    let memory_before = memory_kib(pid, "VmRSS:");

    flood(|i| truncated_hello(webhook.port, &hello, i));

    // Malformed reviews on keep-alive connections: 400 each.
    let review = fs::read(data("admission.json")).unwrap();
    std::thread::scope(|scope| {
        for first in 0..CLIENTS {
            let (webhook, review) = (&webhook, &review);
            scope.spawn(move || {
                let mut conn = webhook.tls().unwrap();
                for i in (first..ROUNDS).step_by(CLIENTS) {
                    let mut rng = Rng::new(i);
                    let body: Vec<u8> = match i % 6 {
                        0 => review[..rng.below(review.len())].to_vec(),
                        1 => {
                            let n = 1 + rng.below(2000);
                            rng.bytes(n)
                        }
                        2 => "[".repeat(100_000).into_bytes(),
                        3 => b"{\"apiVersion\":\"admission.k8s.io/v1\",\"request\":7}".to_vec(),
                        4 => {
                            let mut b = review.clone();
                            let at = rng.below(b.len());
                            b[at] = 0xff;
                            b
                        }
                        _ => b"{\"kind\":\"AdmissionReview\",\"request\":{\"uid\":1e999999}}"
                            .to_vec(),
                    };
                    let answer = match post(&mut conn, &body, false) {
                        Ok(answer) => answer,
                        // Closed after an error answer: a new connection.
                        Err(_) => {
                            conn = webhook.tls().unwrap();
                            post(&mut conn, &body, false).unwrap()
                        }
                    };
                    // A flipped byte may land in a string and leave valid JSON.
                    let fine = i % 6 == 4 && answer.0 == 200;
                    assert!(answer.0 == 400 || fine, "variant {}: {answer:?}", i % 6);
                }
            });
        }
    });

    // 100 MiB reviews: 413 from the head, long before the body is read.
    const HUGE: usize = 100 * 1024 * 1024;
    std::thread::scope(|scope| {
        for _ in 0..CLIENTS {
            scope.spawn(|| {
                let mut s = webhook.tls().unwrap();
                let head = format!(
                    "POST /webhook/pod-apiserver-env HTTP/1.1\r\nHost: localhost\r\n\
                     Content-Type: application/json\r\nContent-Length: {HUGE}\r\n\r\n"
                );
                s.write_all(head.as_bytes()).unwrap();
                let chunk = vec![b' '; 64 * 1024];
                s.write_all(&chunk).unwrap();
                s.flush().unwrap();
                let started = Instant::now();
                let (status, text) = read_response(&mut s).unwrap();
                assert_eq!(status, 413, "{text}");
                assert!(started.elapsed() < Duration::from_secs(20));
                // Whatever else we send is not read to the end.
                let mut sent = chunk.len();
                while sent < HUGE && s.write_all(&chunk).and_then(|()| s.flush()).is_ok() {
                    sent += chunk.len();
                }
                assert!(sent < HUGE, "the server read all 100 MiB");
            });
        }
    });
    let peak = memory_kib(pid, "VmHWM:");
    assert!(
        peak < memory_before + 64 * 1024,
        "memory grew from {memory_before} KiB to a peak of {peak} KiB"
    );

    webhook.review_works();
    back_to_baseline("webhook", pid, baseline);
    assert!(!webhook.proc.log().contains("panicked"));
}

// --- limits -------------------------------------------------------------------

#[test]
fn connect_connections_over_the_cap_get_503_naming_the_limit_and_service_resumes() {
    let echo = echo_server();
    // The agent's connection counts: two tunnels fill the cap of three.
    let proxy = Proxy::start("http-connect", false, &["--max-connections=3"]).with_agent();
    let held: Vec<UnixStream> = (0..2)
        .map(|_| {
            let (head, sock) = proxy.connect(&format!("127.0.0.1:{echo}"));
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            sock
        })
        .collect();
    let (head, mut refused) = proxy.connect(&format!("127.0.0.1:{echo}"));
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    let rest = String::from_utf8_lossy(&read_to_close(&mut refused)).into_owned();
    assert!(rest.contains("--max-connections=3"), "{rest}");
    poll("the refusal in the log", DEADLINE, || {
        proxy
            .log()
            .contains("connection limit reached (--max-connections=3)")
            .then_some(())
    });
    let baseline = settled(proxy.pid());
    refusal_flood(proxy.pid(), baseline, || {
        proxy
            .connect(&format!("127.0.0.1:{echo}"))
            .0
            .starts_with("HTTP/1.1 503 ")
    });
    drop(held);
    // The tunnel that finds a free slot must carry bytes. (A second tunnel
    // opened after it could find the other held slot not yet released.)
    let mut sock = poll("a free slot", DEADLINE, || {
        let (head, sock) = proxy.connect(&format!("127.0.0.1:{echo}"));
        head.starts_with("HTTP/1.1 200").then_some(sock)
    });
    sock.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    sock.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
}

#[test]
fn connect_over_tls_past_the_cap_gets_503_through_curl() {
    let echo = echo_server();
    let proxy = Proxy::start("http-connect", true, &["--max-connections=1"]).with_agent();
    // The agent holds the only slot.
    let out = Command::new("curl")
        .args(["-s", "-p", "--max-time", "20", "-o", "/dev/null"])
        .args(["--write-out", "%{http_connect}"])
        .args([
            "--proxy-cacert",
            &proxy.certs.path("frontend/issued/ca.crt"),
        ])
        .args([
            "--proxy-cert",
            &proxy.certs.path("frontend/issued/proxy-client.crt"),
        ])
        .args([
            "--proxy-key",
            &proxy.certs.path("frontend/private/proxy-client.key"),
        ])
        .args([
            "-x",
            &format!("https://127.0.0.1:{}", proxy.frontend_port.unwrap()),
        ])
        .arg(format!("http://127.0.0.1:{echo}/"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "503",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    log_shows(
        || proxy.log(),
        "frontend: connection limit reached (--max-connections=1)",
    );
}

#[test]
fn grpc_connections_over_the_cap_get_a_goaway_naming_the_limit_and_service_resumes() {
    let (_dest, dest) = test_server();
    // The agent plus one frontend connection fill the cap of two.
    let proxy = Proxy::start("grpc", false, &["--max-connections=2"]).with_agent();
    let mut held = proxy.uds();
    held.write_all(&h2_opening()).unwrap();
    poll("the held connection to count", DEADLINE, || {
        // Until it counts, a probe is served like any other.
        let mut probe = proxy.uds();
        probe.write_all(&h2_opening()).unwrap();
        probe
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let frames = frames_of(&read_to_close(&mut probe));
        goaway_of(&frames)
    });
    let mut refused = proxy.uds();
    refused.write_all(&h2_opening()).unwrap();
    let frames = frames_of(&read_to_close(&mut refused));
    assert!(
        matches!(frames.first(), Some(Frame::Settings { ack: false, .. })),
        "{frames:?}"
    );
    let (code, debug) = goaway_of(&frames).expect("a GOAWAY");
    assert_eq!(code, ErrorCode::ENHANCE_YOUR_CALM);
    assert!(debug.contains("--max-connections=2"), "{debug}");
    // A real client is refused too (UNAVAILABLE), and so is an agent on
    // the agent port, after its TLS handshake.
    assert!(proxy.grpc_request(dest).is_err());
    let mut agent = tls_connect(tcp(proxy.agent_port), proxy.certs.agent_client()).unwrap();
    agent.write_all(&h2_opening()).unwrap();
    agent.flush().unwrap();
    let (code, debug) = goaway_of(&frames_of(&read_to_close(&mut agent))).expect("a GOAWAY");
    assert_eq!(code, ErrorCode::ENHANCE_YOUR_CALM);
    assert!(debug.contains("--max-connections=2"), "{debug}");
    log_shows(
        || proxy.log(),
        "connection limit reached (--max-connections=2)",
    );
    drop(held);
    poll("a free slot", DEADLINE, || proxy.grpc_request(dest).ok());
}

/// A Proxy stream over the Unix socket.
fn proxy_call(proxy: &Proxy) -> (grpc::Client, grpc::ClientCall) {
    let transport = Transport::plain(proxy.uds(), IO, IO).unwrap();
    let conn = h2::Connection::client(transport, h2::Config::default()).unwrap();
    let client = grpc::Client::new(conn, "localhost");
    let call = client.call("/ProxyService/Proxy", &[]).unwrap();
    (client, call)
}

fn dial(call: &grpc::ClientCall, address: &str, random: i64) -> Result<Message, grpc::Status> {
    call.send_msg(&Packet::from(Message::DialReq {
        protocol: "tcp".into(),
        address: address.into(),
        random,
    }))?;
    let packet: Packet = call
        .recv_msg()?
        .ok_or_else(|| grpc::Status::new(Code::INTERNAL, "call ended"))?;
    Message::try_from(packet).map_err(|e| grpc::Status::new(Code::INTERNAL, e))
}

#[test]
fn dials_over_the_pending_cap_are_refused_503_and_resource_exhausted() {
    let echo = echo_server();
    let (_hole, hole, _held) = blackhole();
    let pending = "konnectivity_network_proxy_server_pending_backend_dials";
    let limit = ["--max-pending-dials=1", "--backend-dial-timeout=3s"];

    // HTTP CONNECT: the second dial while one hangs gets 503.
    let connect = Proxy::start("http-connect", false, &limit).with_agent();
    let hanging = std::thread::scope(|scope| {
        let hanging = scope.spawn(|| connect.connect(&format!("127.0.0.1:{hole}")).0);
        poll("the hanging dial", DEADLINE, || {
            (metric(connect.health_port, pending) >= 1.0).then_some(())
        });
        let (head, mut sock) = connect.connect(&format!("127.0.0.1:{echo}"));
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        let body = String::from_utf8_lossy(&read_to_close(&mut sock)).into_owned();
        assert!(body.contains("--max-pending-dials"), "{body}");
        hanging.join().unwrap()
    });
    assert!(hanging.starts_with("HTTP/1.1 504 "), "{hanging}");
    log_shows(
        || connect.log(),
        "503 too many pending dials (--max-pending-dials)",
    );
    connect.connect_works(echo);

    // gRPC: the refused dial's DIAL_RSP names the limit, then its stream
    // (which carried nothing else) ends with RESOURCE_EXHAUSTED.
    let grpc = Proxy::start("grpc", false, &limit).with_agent();
    let (_c1, hanging) = proxy_call(&grpc);
    hanging
        .send_msg(&Packet::from(Message::DialReq {
            protocol: "tcp".into(),
            address: format!("127.0.0.1:{hole}"),
            random: 1,
        }))
        .unwrap();
    poll("the hanging dial", DEADLINE, || {
        (metric(grpc.health_port, pending) >= 1.0).then_some(())
    });
    let (_c2, refused) = proxy_call(&grpc);
    match dial(&refused, &format!("127.0.0.1:{echo}"), 2).unwrap() {
        Message::DialRsp { error, .. } => {
            assert!(error.contains("--max-pending-dials"), "{error}")
        }
        other => panic!("expected DIAL_RSP, got {other:?}"),
    }
    let status = refused.recv().unwrap_err();
    assert_eq!(status.code, Code::RESOURCE_EXHAUSTED, "{status}");
    log_shows(
        || grpc.log(),
        "dial refused: too many pending dials (--max-pending-dials)",
    );
    // Once the hanging dial times out, dials go through again.
    poll("the hanging dial to time out", DEADLINE, || {
        (metric(grpc.health_port, pending) == 0.0).then_some(())
    });
    let (_c3, ok) = proxy_call(&grpc);
    match dial(&ok, &format!("127.0.0.1:{echo}"), 3).unwrap() {
        Message::DialRsp { error, .. } => assert_eq!(error, ""),
        other => panic!("expected DIAL_RSP, got {other:?}"),
    }
}

#[test]
fn slowloris_on_the_webhook_tls_handshake_is_cut_off_while_others_are_served() {
    let webhook = Webhook::start(&["--header-timeout", "2s"]);
    let hello = client_hello(b"http/1.1");
    std::thread::scope(|scope| {
        let handshake = scope.spawn(|| paced(tcp(webhook.port), one_second, &hello));
        for _ in 0..3 {
            webhook.review_works();
        }
        assert_cut_off("ClientHello on the webhook", handshake.join().unwrap());
    });
    webhook.review_works();
}

/// Threads a process may add while refusing (its refusal threads).
const REFUSERS: usize = 8;

/// Many connections over a full cap at once: each is refused (`attempt`
/// says whether with the expected answer, or closed past the refusal
/// threads); meanwhile the process never holds more than [`REFUSERS`]
/// threads over `baseline`, and afterwards it is back at it.
fn refusal_flood(pid: u32, baseline: (usize, usize), attempt: impl Fn() -> bool + Sync) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let answered = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let peak = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = 0;
            while !done.load(Ordering::Acquire) {
                peak = peak.max(resources(pid).0);
                std::thread::sleep(Duration::from_millis(5)); // sampling interval
            }
            peak
        });
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                scope.spawn(|| {
                    for _ in 0..50 {
                        if attempt() {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for client in clients {
            client.join().unwrap();
        }
        done.store(true, Ordering::Release);
        sampler.join().unwrap()
    });
    assert!(
        answered.into_inner() > 0,
        "no refusal was answered (all closed at once)"
    );
    assert!(
        peak <= baseline.0 + REFUSERS,
        "refusing took {peak} threads, baseline {}",
        baseline.0
    );
    back_to_baseline("after the refusals", pid, baseline);
}

#[test]
fn webhook_connections_over_the_cap_get_503_naming_the_limit_and_service_resumes() {
    let webhook = Webhook::start(&["--max-connections", "2"]);
    let pid = webhook.proc.child.pid();
    let mut held: Vec<Tls> = (0..2)
        .map(|_| {
            let mut s = webhook.tls().unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .unwrap();
            s.flush().unwrap();
            assert_eq!(read_response(&mut s).unwrap().0, 200);
            s
        })
        .collect();
    let baseline = settled(pid);
    let get = |s: &mut Tls| {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
        s.flush()?;
        read_response(s)
    };
    let (status, text) = webhook.tls().and_then(|mut s| get(&mut s)).unwrap();
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("too many connections"), "{text}");
    poll("the refusal in the log", DEADLINE, || {
        webhook
            .proc
            .log()
            .contains("connection limit of 2 reached")
            .then_some(())
    });
    refusal_flood(pid, baseline, || {
        matches!(webhook.tls().and_then(|mut s| get(&mut s)), Ok((503, _)))
    });
    // The held connections were served throughout.
    for s in &mut held {
        assert_eq!(get(s).unwrap().0, 200);
    }
    drop(held);
    poll("a free slot", DEADLINE, || {
        webhook
            .tls()
            .and_then(|mut s| get(&mut s))
            .ok()
            .filter(|(status, _)| *status == 200)
    });
    webhook.review_works();
}

#[test]
fn dials_over_the_agents_cap_are_refused_naming_the_limit() {
    let echo = echo_server();
    let proxy = Proxy::start("http-connect", false, &[]).with_agent_flags(&["--max-connections=1"]);
    let (head, held) = proxy.connect(&format!("127.0.0.1:{echo}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (head, mut refused) = proxy.connect(&format!("127.0.0.1:{echo}"));
    assert!(head.starts_with("HTTP/1.1 5"), "{head}");
    let body = String::from_utf8_lossy(&read_to_close(&mut refused)).into_owned();
    assert!(
        body.contains("too many connections on this agent (--max-connections)"),
        "{body}"
    );
    // The server logs the refused dial as it answers it: the line may land
    // just after the client has read the answer.
    poll("the refusal in the server's log", DEADLINE, || {
        proxy.log().contains("(--max-connections)").then_some(())
    });
    drop(held);
    poll("the agent's free slot", DEADLINE, || {
        let (head, _) = proxy.connect(&format!("127.0.0.1:{echo}"));
        head.starts_with("HTTP/1.1 200").then_some(())
    });
}

// --- graceful shutdown --------------------------------------------------------

#[test]
fn sigterm_on_a_grpc_server_drains_then_ends_tunnels_left_open_after_the_grace_period() {
    let echo = echo_server();
    let mut proxy = Proxy::start("grpc", false, &["--graceful-shutdown-timeout=3s"]).with_agent();
    let (_client, call) = proxy_call(&proxy);
    let connect_id = match dial(&call, &format!("127.0.0.1:{echo}"), 1).unwrap() {
        Message::DialRsp {
            error, connect_id, ..
        } => {
            assert_eq!(error, "");
            connect_id
        }
        other => panic!("expected DIAL_RSP, got {other:?}"),
    };
    let echoed = |text: &[u8]| {
        call.send_msg(&Packet::from(Message::Data {
            connect_id,
            error: String::new(),
            data: text.to_vec().into(),
        }))
        .unwrap();
        let mut got = Vec::new();
        while got.len() < text.len() {
            let packet: Packet = call.recv_msg().unwrap().expect("a packet");
            if let Ok(Message::Data { data, .. }) = Message::try_from(packet) {
                got.extend(data);
            }
        }
        assert_eq!(got, text);
    };
    echoed(b"before");
    proxy.server.child.signal("TERM");
    let uds = proxy.uds.clone().unwrap();
    poll("the frontend to stop accepting", DEADLINE, || {
        UnixStream::connect(&uds).is_err().then_some(())
    });
    // The open tunnel still works during the grace period...
    echoed(b"during the grace period");
    assert!(proxy.server.child.is_running());
    // ...and the server ends it and exits once the period is over.
    let out = proxy.server.child.wait_output(DEADLINE);
    assert!(out.status.success(), "{}", proxy.log());
    log_shows(|| proxy.log(), "draining 1 tunnels");
    assert!(call.recv().is_err(), "the call outlived the server");
}

#[test]
fn sigterm_on_the_webhook_lets_a_slowly_sent_review_finish() {
    let mut webhook = Webhook::start(&[]);
    let body = fs::read(data("admission.json")).unwrap();
    let mut s = webhook.tls().unwrap();
    let head = format!(
        "POST /webhook/pod-apiserver-env HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body[..64]).unwrap();
    s.flush().unwrap();
    // A second request completes: the server is live and has our head.
    webhook.review_works();
    webhook.proc.child.signal("TERM");
    webhook.proc.wait_for_log("received SIGTERM");
    // The rest of the body, 64 bytes at a time, a tenth of a second apart
    // (the client's pace), well after the signal.
    s.sock
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let chunks: Vec<&[u8]> = body[64..].chunks(64).collect();
    for (n, chunk) in chunks.iter().enumerate() {
        s.write_all(chunk).unwrap();
        s.flush().unwrap();
        if n + 1 == chunks.len() {
            break; // complete: the answer is due now
        }
        let mut none = [0u8; 1];
        match s.read(&mut none) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            other => panic!("the server answered or closed early: {other:?}"),
        }
    }
    s.sock.set_read_timeout(IO).unwrap();
    let (status, text) = read_response(&mut s).unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("Connection: close"), "{text}");
    assert!(text.contains("\"allowed\":true"), "{text}");
    let out = webhook.proc.child.wait_output(DEADLINE);
    assert_eq!(out.status.code(), Some(0), "{}", webhook.proc.log());
}
