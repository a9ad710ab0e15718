//! proxy-server, proxy-agent, proxy-test-client and http-test-server end to
//! end: real processes on loopback and Unix sockets, real mTLS with
//! certificates from scripts/make-certs.sh, and curl as an independent
//! HTTP CONNECT client.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use apiserver_proxy::tunnel::message::Message;
use common::{ChildGuard, poll, unique};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-server");
const AGENT: &str = env!("CARGO_BIN_EXE_proxy-agent");
const CLIENT: &str = env!("CARGO_BIN_EXE_proxy-test-client");
const TEST_SERVER: &str = env!("CARGO_BIN_EXE_http-test-server");
const DEADLINE: Duration = Duration::from_secs(20);

/// A temporary directory with the upstream certificate layout.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("tunnel-certs-"));
        common::interop::make_certs(&dir);
        Certs { dir }
    }

    fn path(&self, rel: &str) -> String {
        self.dir.join(rel).to_string_lossy().into_owned()
    }

    fn cluster_flags(&self) -> Vec<String> {
        common::interop::cluster_flags(&|r| self.path(r))
    }

    fn frontend_flags(&self) -> Vec<String> {
        common::interop::frontend_flags(&|r| self.path(r))
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One of our binaries with its log (tests/common).
type Proc = common::Logged;

fn uds_path() -> PathBuf {
    std::env::temp_dir().join(unique("konn-").replace('-', "") + ".sock")
}

/// A running tunnel: server, optional agent, destination.
struct Tunnel {
    agent_bin: String,
    certs: Certs,
    server: Proc,
    agent: Option<Proc>,
    agent_port: u16,
    health_port: u16,
    frontend_port: Option<u16>,
    uds: Option<PathBuf>,
}

impl Tunnel {
    /// `frontend`: "uds" or "tcp"; `mode`: grpc or http-connect.
    fn start(mode: &str, frontend: &str, extra: &[&str], with_agent: bool) -> Tunnel {
        Self::start_with(SERVER, AGENT, mode, frontend, extra, with_agent)
    }

    fn start_with(
        server_bin: &str,
        agent_bin: &str,
        mode: &str,
        frontend: &str,
        extra: &[&str],
        with_agent: bool,
    ) -> Tunnel {
        let certs = Certs::new();
        let mut args = vec![
            format!("--mode={mode}"),
            "--agent-port=0".into(),
            "--health-port=0".into(),
            "--admin-port=0".into(),
            "--agent-bind-address=127.0.0.1".into(),
            "--health-bind-address=127.0.0.1".into(),
        ];
        args.extend(certs.cluster_flags());
        let uds = (frontend == "uds").then(uds_path);
        match &uds {
            Some(path) => {
                args.push(format!("--uds-name={}", path.display()));
                args.push("--server-port=0".into());
            }
            None => {
                args.extend(certs.frontend_flags());
                args.push("--server-port=0".into());
                args.push("--server-bind-address=127.0.0.1".into());
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut server = Proc::start(server_bin, &args);
        let agent_port = server.port("agent port");
        let health_port = server.port("health port");
        let frontend_port = uds
            .is_none()
            .then(|| server.port(&format!("frontend ({mode})")));
        let mut tunnel = Tunnel {
            agent_bin: agent_bin.to_string(),
            certs,
            server,
            agent: None,
            agent_port,
            health_port,
            frontend_port,
            uds,
        };
        if with_agent {
            tunnel.start_agent(&[]);
        }
        tunnel
    }

    fn start_agent(&mut self, extra: &[&str]) {
        let agent = self.spawn_agent(self.agent_port, extra);
        poll("the server to see the agent", DEADLINE, || {
            (self.health("/readyz").0 == 200).then_some(())
        });
        self.agent = Some(agent);
    }

    /// Another server with the same certificates (a replica): its agent
    /// port and health port.
    fn start_replica(&self, extra: &[&str]) -> (Proc, u16, u16) {
        let mut args = vec![
            "--agent-port=0".into(),
            "--health-port=0".into(),
            "--admin-port=0".into(),
            "--agent-bind-address=127.0.0.1".into(),
            "--health-bind-address=127.0.0.1".into(),
            format!("--uds-name={}", uds_path().display()),
            "--server-port=0".into(),
        ];
        args.extend(self.certs.cluster_flags());
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut server = Proc::start(SERVER, &args);
        let agent_port = server.port("agent port");
        let health_port = server.port("health port");
        (server, agent_port, health_port)
    }

    /// An agent connecting to `port`, once it reports a connection.
    fn spawn_agent(&self, port: u16, extra: &[&str]) -> Proc {
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
            format!("--proxy-server-port={port}"),
            "--health-server-port=0".into(),
            "--admin-server-port=0".into(),
            "--health-server-host=127.0.0.1".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut agent = Proc::start(&self.agent_bin, &args);
        agent.wait_for_log("connected to server");
        agent
    }

    /// GET on the server's health port: status and body.
    fn health(&self, path: &str) -> (u16, String) {
        http_get(self.health_port, path)
    }

    /// Opens a CONNECT tunnel over the Unix socket; returns the stream and
    /// the raw answer head.
    fn connect_uds(&self, target: &str) -> (UnixStream, String) {
        let mut sock =
            UnixStream::connect(self.uds.as_ref().expect("uds frontend")).expect("connect uds");
        sock.set_read_timeout(Some(DEADLINE)).unwrap();
        sock.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .unwrap();
        let head = common::read_head(&mut sock);
        (sock, head)
    }

    fn curl_connect(&self, url: &str, with_cert: bool) -> std::process::Output {
        let mut args = vec![
            "-s".to_string(),
            "-p".into(),
            "--max-time".into(),
            "15".into(),
        ];
        args.extend([
            "--proxy-cacert".into(),
            self.certs.path("frontend/issued/ca.crt"),
        ]);
        if with_cert {
            args.extend([
                "--proxy-cert".into(),
                self.certs.path("frontend/issued/proxy-client.crt"),
            ]);
            args.extend([
                "--proxy-key".into(),
                self.certs.path("frontend/private/proxy-client.key"),
            ]);
        }
        args.extend([
            "-x".into(),
            format!("https://127.0.0.1:{}", self.frontend_port.unwrap()),
            url.into(),
        ]);
        Command::new("curl").args(&args).output().expect("run curl")
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        if let Some(path) = &self.uds {
            let _ = fs::remove_file(path);
        }
    }
}

fn read_all(sock: &mut impl Read) -> String {
    let mut out = Vec::new();
    let _ = sock.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut sock) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let _ = sock.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let text = read_all(&mut sock);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        text.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    )
}

/// The sample destination on a free port.
fn test_server() -> (Proc, u16) {
    let mut proc = Proc::start(TEST_SERVER, &["--server-port=0".into()]);
    let port = proc.port("http-test-server");
    (proc, port)
}

/// A TCP echo destination (for byte-exact transfers).
fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut reader = conn.try_clone().unwrap();
                let mut writer = conn;
                let _ = std::io::copy(&mut reader, &mut writer);
            });
        }
    });
    port
}

/// A destination whose connects hang: a listener with a full backlog that
/// never accepts (Linux then drops further SYNs).
fn blackhole() -> (ChildGuard, u16) {
    let script = "import socket,sys,time\n\
        s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(0)\n\
        print(s.getsockname()[1], flush=True)\n\
        time.sleep(600)\n";
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script]).stdout(Stdio::piped());
    let mut child = ChildGuard::spawn(&mut cmd);
    let stdout = child.child.as_mut().unwrap().stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let port: u16 = line.trim().parse().unwrap();
    // Fill the backlog with connections nobody accepts.
    let mut held = Vec::new();
    for _ in 0..4 {
        if let Ok(s) = TcpStream::connect_timeout(
            &format!("127.0.0.1:{port}").parse().unwrap(),
            Duration::from_millis(300),
        ) {
            held.push(s);
        }
    }
    std::mem::forget(held); // kept open for the test's life
    (child, port)
}

#[test]
fn upstream_example_http_connect_mtls_with_curl() {
    let (_dest, dest_port) = test_server();
    let tunnel = Tunnel::start("http-connect", "tcp", &[], true);
    let out = tunnel.curl_connect(&format!("http://localhost:{dest_port}/success"), true);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.contains("The success test page!"),
        "curl: {body} {}",
        tunnel.server.log()
    );
    // The destination's own error status comes through the tunnel.
    let out = tunnel.curl_connect(&format!("http://localhost:{dest_port}/error"), true);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Internal Server Error"));
    // No client certificate: the TLS handshake is refused.
    let out = tunnel.curl_connect(&format!("http://localhost:{dest_port}/success"), false);
    assert!(
        !out.status.success(),
        "a client without a certificate got through"
    );
}

#[test]
fn upstream_example_grpc_over_uds_with_the_test_client() {
    let (_dest, dest_port) = test_server();
    let tunnel = Tunnel::start("grpc", "uds", &[], true);
    let out = Command::new(CLIENT)
        .args(["--proxy-port=0", "--proxy-host="])
        .arg(format!(
            "--proxy-uds={}",
            tunnel.uds.as_ref().unwrap().display()
        ))
        .arg(format!("--request-port={dest_port}"))
        .arg("--test-requests=20")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("The success test page!").count(), 20);
}

#[test]
fn grpc_over_mtls_tcp_with_the_test_client() {
    let (_dest, dest_port) = test_server();
    let tunnel = Tunnel::start("grpc", "tcp", &[], true);
    let out = Command::new(CLIENT)
        .args(["--proxy-host=127.0.0.1"])
        .arg(format!("--proxy-port={}", tunnel.frontend_port.unwrap()))
        .arg(format!(
            "--ca-cert={}",
            tunnel.certs.path("frontend/issued/ca.crt")
        ))
        .arg(format!(
            "--client-cert={}",
            tunnel.certs.path("frontend/issued/proxy-client.crt")
        ))
        .arg(format!(
            "--client-key={}",
            tunnel.certs.path("frontend/private/proxy-client.key")
        ))
        .arg(format!("--request-port={dest_port}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("The success test page!"));
}

#[test]
fn connect_answers_exactly_and_with_the_right_errors() {
    let echo = echo_server();
    let tunnel = Tunnel::start("http-connect", "uds", &[], true);
    // Success: exactly the status line and a blank line, then tunnel bytes.
    let (mut sock, head) = tunnel.connect_uds(&format!("127.0.0.1:{echo}"));
    assert_eq!(head, "HTTP/1.1 200 Connection Established\r\n\r\n");
    sock.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    sock.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
    // A refused dial: 502 with the agent's error.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (mut sock, head) = tunnel.connect_uds(&format!("127.0.0.1:{closed}"));
    assert!(head.starts_with("HTTP/1.1 502 "), "{head}");
    assert!(read_all(&mut sock).to_lowercase().contains("refused"));
    // Not CONNECT: 405.
    let mut sock = UnixStream::connect(tunnel.uds.as_ref().unwrap()).unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    sock.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(common::read_head(&mut sock).starts_with("HTTP/1.1 405 "));
    // A huge header: 431.
    let mut sock = UnixStream::connect(tunnel.uds.as_ref().unwrap()).unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut huge = b"CONNECT x:1 HTTP/1.1\r\nX-Big: ".to_vec();
    huge.resize(20 * 1024, b'a');
    let _ = sock.write_all(&huge);
    assert!(common::read_head(&mut sock).starts_with("HTTP/1.1 431 "));
}

#[test]
fn no_agent_means_503_and_not_ready() {
    let tunnel = Tunnel::start("http-connect", "uds", &[], false);
    assert_eq!(
        tunnel.health("/readyz"),
        (500, "no connection to any proxy agent".into())
    );
    assert_eq!(tunnel.health("/healthz").0, 200);
    let (_sock, head) = tunnel.connect_uds("127.0.0.1:1");
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
}

#[test]
fn backend_dial_timeout_means_504() {
    let (_hole, port) = blackhole();
    let mut tunnel = Tunnel::start(
        "http-connect",
        "uds",
        &["--backend-dial-timeout=300ms"],
        false,
    );
    tunnel.start_agent(&["--dial-timeout=20s"]);
    let started = Instant::now();
    let (_sock, head) = tunnel.connect_uds(&format!("127.0.0.1:{port}"));
    assert!(head.starts_with("HTTP/1.1 504 "), "{head}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let (_, metrics) = tunnel.health("/metrics");
    assert!(metrics.contains("konnectivity_network_proxy_server_dial_failure_count{reason=\"backend_dial_timeout\"} 1"), "{metrics}\n{}", tunnel.server.log());
}

#[test]
fn pending_dials_fail_at_once_when_their_agent_goes() {
    let (_hole, port) = blackhole();
    let mut tunnel = Tunnel::start("http-connect", "uds", &[], false);
    tunnel.start_agent(&["--dial-timeout=60s"]);
    let uds = tunnel.uds.clone().unwrap();
    let target = format!("127.0.0.1:{port}");
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let uds = uds.clone();
            let target = target.clone();
            std::thread::spawn(move || {
                let mut sock = UnixStream::connect(&uds).unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                sock.write_all(format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes())
                    .unwrap();
                common::read_head(&mut sock)
            })
        })
        .collect();
    poll("20 pending dials", DEADLINE, || {
        tunnel
            .health("/metrics")
            .1
            .contains("konnectivity_network_proxy_server_pending_backend_dials 20")
            .then_some(())
    });
    let killed = Instant::now();
    tunnel.agent.as_mut().unwrap().child.signal("KILL");
    for waiter in waiters {
        let head = waiter.join().unwrap();
        assert!(head.starts_with("HTTP/1.1 502 "), "{head}");
    }
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "dials failed only after {:?}",
        killed.elapsed()
    );
    let (_, metrics) = tunnel.health("/metrics");
    assert!(
        metrics.contains("konnectivity_network_proxy_server_pending_backend_dials 0"),
        "{metrics}"
    );
}

#[test]
fn bytes_arrive_exactly_both_ways_on_parallel_tunnels() {
    let echo = echo_server();
    let tunnel = Tunnel::start("http-connect", "uds", &[], true);
    let handles: Vec<_> = (0..4u8)
        .map(|seed| {
            let (sock, head) = tunnel.connect_uds(&format!("127.0.0.1:{echo}"));
            assert!(head.starts_with("HTTP/1.1 200"));
            std::thread::spawn(move || {
                let payload: Vec<u8> = (0..4 * 1024 * 1024u32)
                    .map(|i| (i.wrapping_mul(31) as u8) ^ seed)
                    .collect();
                let mut writer = sock.try_clone().unwrap();
                let mut reader = sock;
                let sent = payload.clone();
                let w = std::thread::spawn(move || writer.write_all(&sent).unwrap());
                let mut got = vec![0u8; payload.len()];
                reader.read_exact(&mut got).unwrap();
                w.join().unwrap();
                assert!(got == payload, "tunnel {seed} corrupted its bytes");
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn bad_flags_exit_2() {
    for (program, args, message) in [
        (SERVER, vec!["--mode=tcp"], "mode must be"),
        (
            SERVER,
            vec!["--uds-name=/tmp/x", "--server-port=8090"],
            "should be set to 0",
        ),
        (AGENT, vec![], "--ca-cert is required"),
        (CLIENT, vec!["--mode=udp", "--proxy-uds=/x"], "mode must be"),
    ] {
        let out = Command::new(program).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{program} {args:?}: {stderr}");
        assert!(stderr.contains(message), "{program} {args:?}: {stderr}");
    }
}

#[test]
fn sigterm_drains_the_agent_and_stops_the_server_cleanly() {
    let mut tunnel = Tunnel::start("grpc", "uds", &[], true);
    let agent = tunnel.agent.as_mut().unwrap();
    agent.child.signal("TERM");
    let out = agent.child.wait_output(DEADLINE);
    assert!(
        out.status.success(),
        "agent exit {:?}: {}",
        out.status,
        agent.log()
    );
    tunnel.server.wait_for_log("is draining");
    poll("the server to notice", DEADLINE, || {
        (tunnel.health("/readyz").0 == 500).then_some(())
    });
    tunnel.server.child.signal("TERM");
    let out = tunnel.server.child.wait_output(DEADLINE);
    assert!(
        out.status.success(),
        "server exit {:?}: {}",
        out.status,
        tunnel.server.log()
    );
    assert!(
        !tunnel.uds.as_ref().unwrap().exists(),
        "the socket file was left behind"
    );
}

#[test]
fn everything_sent_before_the_client_closes_arrives() {
    // A sink that reports how many bytes it got once its peer closes.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut total = 0usize;
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n;
                }
                let _ = tx.send(total);
            });
        }
    });
    let tunnel = Tunnel::start("http-connect", "uds", &[], true);
    for size in [1usize, 100_000, 16 * 1024 * 1024 + 7] {
        let (mut sock, head) = tunnel.connect_uds(&format!("127.0.0.1:{port}"));
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        sock.write_all(&vec![0xA5; size]).unwrap();
        sock.shutdown(std::net::Shutdown::Write).unwrap();
        let got = rx.recv_timeout(DEADLINE).expect("the sink saw the close");
        assert_eq!(got, size, "bytes lost when the client closed");
    }
}

/// A destination that reads nothing until `go` (or the deadline), then
/// reads to the end, checking every byte against `pattern_at(7, ..)`; it
/// reports how many bytes it got, or where they went wrong.
fn late_reader() -> (
    u16,
    std::sync::mpsc::Sender<()>,
    std::sync::mpsc::Receiver<Result<usize, String>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let _ = go_rx.recv_timeout(DEADLINE);
        let (mut offset, mut buf, mut want) = (0usize, vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
        let verdict = loop {
            match conn.read(&mut buf) {
                Ok(0) => break Ok(offset),
                Ok(n) => {
                    pattern_at(7, offset, &mut want[..n]);
                    if buf[..n] != want[..n] {
                        break Err(format!("corrupt bytes at offset {offset}"));
                    }
                    offset += n;
                }
                Err(e) => break Err(format!("read at offset {offset}: {e}")),
            }
        };
        let _ = done_tx.send(verdict);
    });
    (port, go_tx, done_rx)
}

/// Sends `total` pattern bytes in 64 KiB pieces, telling the destination
/// to start reading once `go_after` are sent.
fn send_pattern(
    total: usize,
    go_after: usize,
    go: std::sync::mpsc::Sender<()>,
    mut send: impl FnMut(&[u8]),
) {
    let mut chunk = vec![0u8; 64 * 1024];
    let (mut sent, mut go) = (0usize, Some(go));
    while sent < total {
        let n = chunk.len().min(total - sent);
        pattern_at(7, sent, &mut chunk[..n]);
        send(&chunk[..n]);
        sent += n;
        if sent >= go_after {
            if let Some(go) = go.take() {
                go.send(()).unwrap();
            }
        }
    }
}

#[test]
fn a_destination_that_reads_late_gets_every_byte_in_order() {
    // The destination reads nothing until the client has sent more than the
    // socket buffers and windows on the way hold, so the agent must queue
    // (its destination writer thread starts only then), then reads all;
    // the client closes right after its last byte, with data still queued.
    const TOTAL: usize = 24 * 1024 * 1024;
    const GO_AFTER: usize = 12 * 1024 * 1024;
    let (port, go, done) = late_reader();
    let tunnel = Tunnel::start("http-connect", "uds", &[], true);
    let (mut sock, head) = tunnel.connect_uds(&format!("127.0.0.1:{port}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    send_pattern(TOTAL, GO_AFTER, go, |chunk| sock.write_all(chunk).unwrap());
    sock.shutdown(std::net::Shutdown::Write).unwrap();
    let got = done
        .recv_timeout(DEADLINE)
        .expect("the destination saw the close");
    assert_eq!(got, Ok(TOTAL));
}

#[test]
fn a_destination_that_reads_late_gets_every_byte_in_order_through_grpc() {
    // As above through the gRPC frontend. 20 MiB is more than the agent's
    // side holds (its stream's window, its queue, the socket buffers), so
    // the server's queue towards the agent fills and the frontend
    // connection's reader hands the stream's packets to the call's drainer
    // (a pooled job started then), which waits for room (checked once by
    // making that hand-over abort the server); the CLOSE_REQ right after
    // the last byte comes after all of it.
    const TOTAL: usize = 32 * 1024 * 1024;
    const GO_AFTER: usize = 20 * 1024 * 1024;
    let (port, go, done) = late_reader();
    let tunnel = Tunnel::start("grpc", "uds", &[], true);
    let grpc = GrpcTunnel::dial(
        tunnel.uds.as_ref().unwrap(),
        &format!("127.0.0.1:{port}"),
        1,
    )
    .unwrap();
    send_pattern(TOTAL, GO_AFTER, go, |chunk| grpc.send(chunk));
    grpc.close();
    let got = done
        .recv_timeout(DEADLINE)
        .expect("the destination saw the close");
    assert_eq!(got, Ok(TOTAL));
}

/// A TCP forwarder that sends each new connection to the next backend in
/// turn: the load balancer in front of server replicas.
fn round_robin(backends: Vec<u16>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (i, client) in listener.incoming().map_while(Result::ok).enumerate() {
            let backend = backends[i % backends.len()];
            let Ok(server) = TcpStream::connect(("127.0.0.1", backend)) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    port
}

fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, text) = http_get(port, "/metrics");
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn one_agent_serves_every_replica_behind_one_address() {
    let tunnel = Tunnel::start(
        "grpc",
        "uds",
        &["--server-id=s1", "--server-count=2"],
        false,
    );
    let (_replica, replica_agent_port, replica_health) =
        tunnel.start_replica(&["--server-id=s2", "--server-count=2"]);
    let balancer = round_robin(vec![tunnel.agent_port, replica_agent_port]);
    let mut agent = tunnel.spawn_agent(balancer, &[]);
    poll("both replicas to have the agent", DEADLINE, || {
        (tunnel.health("/readyz").0 == 200 && http_get(replica_health, "/readyz").0 == 200)
            .then_some(())
    });
    poll("the agent to report two servers", DEADLINE, || {
        agent.log().contains("(2 of 2)").then_some(())
    });
    let health = agent.port("health port");
    assert_eq!(
        metric(
            health,
            "konnectivity_network_proxy_agent_open_server_connections"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            health,
            "konnectivity_network_proxy_agent_known_server_count"
        ),
        Some(2.0)
    );
    for server_health in [tunnel.health_port, replica_health] {
        assert_eq!(
            metric(
                server_health,
                "konnectivity_network_proxy_server_ready_backends"
            ),
            Some(1.0)
        );
    }
}

#[test]
fn dest_host_strategy_picks_the_agent_that_names_the_host() {
    // An echo destination on 127.0.0.2, which only the first agent names.
    let listener = TcpListener::bind("127.0.0.2:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            drop(conn);
        }
    });
    let tunnel = Tunnel::start(
        "http-connect",
        "uds",
        &["--proxy-strategies=destHost,default"],
        false,
    );
    let mut named = tunnel.spawn_agent(
        tunnel.agent_port,
        &[
            "--agent-id=named",
            "--agent-identifiers=ipv4=127.0.0.2&host=node-2",
        ],
    );
    let mut other = tunnel.spawn_agent(tunnel.agent_port, &["--agent-id=other"]);
    poll("two ready backends", DEADLINE, || {
        (metric(
            tunnel.health_port,
            "konnectivity_network_proxy_server_ready_backends",
        ) == Some(2.0))
        .then_some(())
    });
    for _ in 0..10 {
        let (_sock, head) = tunnel.connect_uds(&format!("127.0.0.2:{port}"));
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let dials = |agent: &mut Proc| {
        let health = agent.port("health port");
        metric(
            health,
            "konnectivity_network_proxy_agent_dial_duration_seconds_count",
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        dials(&mut named),
        10.0,
        "every dial to 127.0.0.2 goes to the agent naming it"
    );
    assert_eq!(dials(&mut other), 0.0);
}

#[test]
fn sigterm_with_a_grace_period_lets_open_tunnels_finish() {
    let echo = echo_server();
    let mut tunnel = Tunnel::start(
        "http-connect",
        "uds",
        &["--graceful-shutdown-timeout=30s"],
        true,
    );
    let (mut sock, head) = tunnel.connect_uds(&format!("127.0.0.1:{echo}"));
    assert!(head.starts_with("HTTP/1.1 200"));
    tunnel.server.child.signal("TERM");
    let uds = tunnel.uds.clone().unwrap();
    poll("the frontend to stop accepting", DEADLINE, || {
        UnixStream::connect(&uds).is_err().then_some(())
    });
    // The open tunnel still works during the grace period.
    sock.write_all(b"still here").unwrap();
    let mut back = [0u8; 10];
    sock.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"still here");
    assert!(tunnel.server.child.is_running());
    // Once it closes, the server exits at once, not after 30 s.
    let closed = Instant::now();
    drop(sock);
    let out = tunnel.server.child.wait_output(DEADLINE);
    assert!(out.status.success(), "{}", tunnel.server.log());
    assert!(
        closed.elapsed() < Duration::from_secs(10),
        "exit took {:?}",
        closed.elapsed()
    );
}

/// Whether `now` has at most the threads and descriptors of `baseline`.
fn at_most(now: (usize, usize), baseline: (usize, usize)) -> bool {
    now.0 <= baseline.0 && now.1 <= baseline.1
}

/// Threads and open file descriptors of a process.
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

/// How many of a process's threads have this name.
fn threads_named(pid: u32, name: &str) -> usize {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|n| n.trim() == name)
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn one_pump_thread_reads_every_plaintext_client_of_an_agent_stream() {
    let echo = echo_server();
    let mut tunnel = Tunnel::start("http-connect", "uds", &[], true);
    let server = tunnel.server.child.pid();
    assert_eq!(
        threads_named(server, "conn-pump"),
        0,
        "started on first use"
    );
    let mut socks: Vec<_> = (0..12)
        .map(|_| {
            let (sock, head) = tunnel.connect_uds(&format!("127.0.0.1:{echo}"));
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            sock
        })
        .collect();
    // Every tunnel at once, both ways, in order (the bulk test moves 10 MiB
    // over 100 of them).
    let round = |socks: &mut Vec<UnixStream>, seed: u64| {
        std::thread::scope(|scope| {
            for (i, sock) in socks.iter_mut().enumerate() {
                scope.spawn(move || {
                    let mut data = vec![0u8; 300_000];
                    pattern_at(seed + i as u64, 0, &mut data);
                    let mut writer = sock.try_clone().unwrap();
                    let sent = data.clone();
                    let sending = std::thread::spawn(move || writer.write_all(&sent).unwrap());
                    let mut back = vec![0u8; data.len()];
                    sock.read_exact(&mut back).unwrap();
                    sending.join().unwrap();
                    assert!(back == data, "tunnel {i}: bytes differ");
                });
            }
        });
    };
    round(&mut socks, 1);
    assert_eq!(
        threads_named(server, "conn-pump"),
        1,
        "one per agent stream"
    );
    // A client that closes ends its tunnel; the others go on.
    drop(socks.pop());
    round(&mut socks, 50);
    // The stream's end stops its pump, which lets its clients go.
    tunnel.agent.as_mut().unwrap().child.signal("KILL");
    for sock in &mut socks {
        sock.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut rest = Vec::new();
        let _ = sock.read_to_end(&mut rest);
    }
    poll("the pump gone with its stream", DEADLINE, || {
        (threads_named(server, "conn-pump") == 0).then_some(())
    });
}

#[test]
fn no_thread_or_descriptor_outlives_its_tunnel() {
    let echo = echo_server();
    let tunnel = Tunnel::start("http-connect", "uds", &[], true);
    let server = tunnel.server.child.pid();
    let agent = tunnel.agent.as_ref().unwrap().child.pid();
    let round = |n: usize| {
        let socks: Vec<_> = (0..n)
            .map(|_| {
                let (mut sock, head) = tunnel.connect_uds(&format!("127.0.0.1:{echo}"));
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                sock.write_all(b"x").unwrap();
                let mut one = [0u8; 1];
                sock.read_exact(&mut one).unwrap();
                sock
            })
            .collect();
        drop(socks);
    };
    // Warm up (lazily created pools, allocator arenas), then measure.
    round(2);
    // Settled: the same counts on two polls in a row.
    let settled = |pid: u32| {
        let mut last = None;
        poll("the process to settle", DEADLINE, || {
            let now = resources(pid);
            let same = last == Some(now);
            last = Some(now);
            same.then_some(now)
        })
    };
    let (server_before, agent_before) = (settled(server), settled(agent));
    round(50);
    // At or below: the baseline may still include warm-up threads on their
    // way out; 50 leaked tunnels would show far above it.
    poll("the server back at its baseline", DEADLINE, || {
        at_most(resources(server), server_before).then_some(())
    });
    poll("the agent back at its baseline", DEADLINE, || {
        at_most(resources(agent), agent_before).then_some(())
    });
    // Each tunnel's end ran once, also for those no thread waited on.
    let (_, metrics) = tunnel.health("/metrics");
    assert!(
        metrics.contains("konnectivity_network_proxy_server_established_connections 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("konnectivity_network_proxy_server_http_connections 0"),
        "{metrics}"
    );
}

/// Every thread of a process by name, with counts (for failure messages).
fn thread_census(pid: u32) -> std::collections::BTreeMap<String, usize> {
    let mut names = std::collections::BTreeMap::new();
    for task in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
    {
        if let Some(name) = task
            .ok()
            .and_then(|t| fs::read_to_string(t.path().join("comm")).ok())
        {
            *names.entry(name.trim().to_string()).or_insert(0) += 1;
        }
    }
    names
}

/// A destination that accepts and stays silent, holding its connections
/// for the test's life; its port.
fn quiet_destination() -> u16 {
    let quiet = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = quiet.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in quiet.incoming().map_while(Result::ok) {
            held.push(conn);
        }
    });
    port
}

/// An idle plaintext CONNECT tunnel holds no thread in proxy-server (the
/// agent stream's pump reads its client, and the thread that dialled goes
/// back to the pool) and none in proxy-agent (the stream's pump reads its
/// destination). The frontend's writer thread must not start for a tunnel
/// that never had anything to write: the agent stream's reader that
/// delivered the DIAL_RSP wakes the tunnel's writing side, and when the
/// frontend thread has taken the DIAL_RSP and set that side up by then,
/// the wake finds nothing queued (on two cores, that race started a writer
/// for about one tunnel in fifteen).
#[test]
fn an_idle_plaintext_tunnel_holds_no_thread_in_either_process() {
    let port = quiet_destination();
    let tunnel = Tunnel::start("http-connect", "uds", &[], true);
    let server = tunnel.server.child.pid();
    let agent = tunnel.agent.as_ref().unwrap().child.pid();
    // Warm up, then settle (the same counts twice in a row).
    drop(tunnel.connect_uds(&format!("127.0.0.1:{port}")));
    let settled = |pid: u32| {
        let mut last = None;
        poll("the process to settle", DEADLINE, || {
            let now = resources(pid);
            let same = last == Some(now);
            last = Some(now);
            same.then_some(now)
        })
    };
    let (server_before, agent_before) = (settled(server), settled(agent));
    const TUNNELS: usize = 300;
    let socks: Vec<_> = (0..TUNNELS)
        .map(|_| {
            let (sock, head) = tunnel.connect_uds(&format!("127.0.0.1:{port}"));
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            sock
        })
        .collect();
    // The agent stream's pump in each (which may have ended after the
    // warm-up), and at the server the next leader on the listener; pooled
    // threads that dialled wait 3 s for work before they end.
    let within =
        || resources(server).0 <= server_before.0 + 2 && resources(agent).0 <= agent_before.0 + 1;
    let limit = Instant::now() + Duration::from_secs(10);
    while !within() && Instant::now() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        within(),
        "{TUNNELS} idle tunnels: server {} -> {} threads {:?}; agent {} -> {} threads {:?}",
        server_before.0,
        resources(server).0,
        thread_census(server),
        agent_before.0,
        resources(agent).0,
        thread_census(agent)
    );
    drop(socks);
}

/// A plaintext client that half-closes while data waits for it at the
/// server (its socket full): the tunnel has no thread of its own, so the
/// pump that sees the client's end hands what is queued to a writer
/// thread, which writes it before the connection closes; the connection is
/// then counted closed.
#[test]
fn a_plaintext_client_that_half_closes_still_gets_what_was_queued_for_it() {
    let flood = flood_server();
    let tunnel = Tunnel::start("http-connect", "uds", &[], true);
    let (mut sock, head) = tunnel.connect_uds(&format!("127.0.0.1:{flood}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Its socket full: the same count of unread bytes three times running.
    let mut seen = (0, 0);
    let unread = poll("the client's socket to fill", DEADLINE, || {
        let mut now: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int to the pointer given.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::FIONREAD,
                &mut now,
            )
        };
        assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
        let now = usize::try_from(now).unwrap_or(0);
        seen = if now > 0 && now == seen.0 {
            (now, seen.1 + 1)
        } else {
            (now, 0)
        };
        (seen.1 >= 2).then_some(now)
    });
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    sock.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                assert!(buf[..n].iter().all(|&b| b == 0x5A), "bytes out of place");
                got += n;
            }
            Err(e) => panic!("reading to the end, after {got} bytes: {e}"),
        }
    }
    eprintln!("{unread} bytes unread at the half-close, {got} read to the end");
    assert!(
        got > unread,
        "only the {unread} bytes already in the socket came ({got})"
    );
    poll("the connection counted closed", DEADLINE, || {
        let (_, metrics) = tunnel.health("/metrics");
        metrics
            .contains("konnectivity_network_proxy_server_http_connections 0")
            .then_some(())
    });
}

/// A destination that sends as fast as it can until the peer goes; its
/// port.
fn flood_server() -> u16 {
    let flood = TcpListener::bind("127.0.0.1:0").unwrap();
    let flood_port = flood.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in flood.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut conn = conn;
                let chunk = vec![0x5A; 64 * 1024];
                while conn.write_all(&chunk).is_ok() {}
            });
        }
    });
    flood_port
}

#[test]
fn a_client_that_stops_reading_does_not_stall_the_others() {
    let flood_port = flood_server();
    let echo = echo_server();
    let tunnel = Tunnel::start("http-connect", "uds", &[], true);
    // The stalled tunnel: connected, then never read.
    let (stalled, head) = tunnel.connect_uds(&format!("127.0.0.1:{flood_port}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Meanwhile another tunnel on the same agent moves 16 MiB each way.
    let (sock, head) = tunnel.connect_uds(&format!("127.0.0.1:{echo}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let payload: Vec<u8> = (0..16 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut writer = sock.try_clone().unwrap();
    let sent = payload.clone();
    let w = std::thread::spawn(move || writer.write_all(&sent).unwrap());
    let mut got = vec![0u8; payload.len()];
    let mut reader = sock;
    reader
        .read_exact(&mut got)
        .expect("the healthy tunnel kept flowing");
    w.join().unwrap();
    assert!(got == payload);
    // The stalled one was closed as too slow, and counted.
    poll("the stalled tunnel to be closed", DEADLINE, || {
        metric(
            tunnel.health_port,
            "konnectivity_network_proxy_server_slow_frontend_closes_total",
        )
        .filter(|n| *n >= 1.0)
    });
    drop(stalled);
}

#[test]
fn a_client_that_reads_slowly_is_not_mistaken_for_a_stuck_one() {
    // Its queue at the server stays full (the destination sends far
    // faster), but it takes a packet every few milliseconds, well within
    // the grace the server gives a full queue: it keeps its tunnel.
    let flood_port = flood_server();
    let tunnel = Tunnel::start("http-connect", "uds", &[], true);
    let (mut slow, head) = tunnel.connect_uds(&format!("127.0.0.1:{flood_port}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut buf = vec![0u8; 16 * 1024];
    let (mut got, mut pauses) = (0usize, 0);
    let end = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < end {
        let n = slow.read(&mut buf).expect("the slow tunnel stays open");
        assert!(n > 0, "closed after {got} bytes");
        assert!(buf[..n].iter().all(|b| *b == 0x5A));
        got += n;
        if got >= (pauses + 1) * 64 * 1024 {
            // About 6 MB/s: 64 KiB, then a pause.
            pauses += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    assert!(pauses >= 20, "only {got} bytes in 1.5 s");
    assert_eq!(
        metric(
            tunnel.health_port,
            "konnectivity_network_proxy_server_slow_frontend_closes_total",
        ),
        Some(0.0),
        "closed as too slow"
    );
}

#[test]
fn a_client_that_pauses_alone_on_its_agent_stream_keeps_its_tunnel() {
    // A destination that sends 12 MiB of pattern at once, and a client
    // that reads nothing for 1.5 s (past SLOW_GRACE), then all of it. Its
    // queue at the server is full meanwhile, but no other tunnel's packet
    // waits behind it (12 MiB also leaves the agent stream's reader room
    // to read on): it gets the longer grace and keeps its tunnel.
    const TOTAL: usize = 12 * 1024 * 1024;
    let source = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = source.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = source.accept() {
            let mut chunk = vec![0u8; 64 * 1024];
            let mut sent = 0;
            while sent < TOTAL {
                pattern_at(11, sent, &mut chunk);
                if conn.write_all(&chunk).is_err() {
                    return;
                }
                sent += chunk.len();
            }
            let mut rest = Vec::new();
            let _ = conn.read_to_end(&mut rest);
        }
    });
    let tunnel = Tunnel::start("http-connect", "uds", &[], true);
    let (mut sock, head) = tunnel.connect_uds(&format!("127.0.0.1:{port}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    std::thread::sleep(Duration::from_millis(1500));
    let mut got = vec![0u8; TOTAL];
    sock.read_exact(&mut got)
        .expect("every byte after the pause");
    let mut want = vec![0u8; TOTAL];
    pattern_at(11, 0, &mut want);
    assert!(got == want, "the bytes differ");
    assert_eq!(
        metric(
            tunnel.health_port,
            "konnectivity_network_proxy_server_slow_frontend_closes_total",
        ),
        Some(0.0)
    );
}

/// Bytes `[offset, offset + out.len())` of a deterministic stream per
/// seed: byte k is byte k % 8 of splitmix64(seed + k / 8). Writer and reader
/// of a tunnel agree on every byte however the transfer is chunked.
fn pattern_at(seed: u64, offset: usize, out: &mut [u8]) {
    let mut k = offset;
    let mut i = 0;
    while i < out.len() {
        let mut z = seed
            .wrapping_add((k / 8) as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let word = (z ^ (z >> 31)).to_le_bytes();
        let from = k % 8;
        let n = (8 - from).min(out.len() - i);
        out[i..i + n].copy_from_slice(&word[from..from + n]);
        i += n;
        k += n;
    }
}

const BULK_TUNNELS: usize = 100;
const BULK_BYTES: usize = 10 * 1024 * 1024;

/// Sends BULK_BYTES of `seed`'s pattern with `send` while `recv` checks
/// the echo byte by byte; returns once both are done.
fn echo_and_check(
    seed: u64,
    mut send: impl FnMut(&[u8]) + Send,
    mut recv: impl FnMut(&mut Vec<u8>) -> bool,
) {
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut sent = 0;
            while sent < BULK_BYTES {
                let n = buf.len().min(BULK_BYTES - sent);
                pattern_at(seed, sent, &mut buf[..n]);
                send(&buf[..n]);
                sent += n;
            }
        });
        let mut want = Vec::new();
        let mut got = Vec::new();
        let mut checked = 0;
        while checked < BULK_BYTES {
            assert!(recv(&mut got), "tunnel {seed} ended after {checked} bytes");
            want.resize(got.len(), 0);
            pattern_at(seed, checked, &mut want);
            assert!(
                got == want,
                "tunnel {seed}: corrupted bytes after {checked}"
            );
            checked += got.len();
            got.clear();
        }
    });
}

/// The release binaries when `make test` provides them (this test moves
/// 2 GiB through each frontend), else the debug ones.
fn bulk_binary(name: &str, debug: &str) -> String {
    match std::env::var_os("APISERVER_PROXY_RELEASE_DIR") {
        Some(dir) => PathBuf::from(dir).join(name).to_string_lossy().into_owned(),
        None => debug.to_string(),
    }
}

#[test]
fn a_hundred_tunnels_move_10_mib_each_way_through_http_connect() {
    let echo = echo_server();
    let tunnel = Tunnel::start_with(
        &bulk_binary("proxy-server", SERVER),
        &bulk_binary("proxy-agent", AGENT),
        "http-connect",
        "uds",
        &[],
        true,
    );
    std::thread::scope(|scope| {
        for seed in 0..BULK_TUNNELS as u64 {
            let tunnel = &tunnel;
            scope.spawn(move || {
                let (sock, head) = tunnel.connect_uds(&format!("127.0.0.1:{echo}"));
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                let mut writer = sock.try_clone().unwrap();
                let mut reader = sock;
                let mut buf = vec![0u8; 64 * 1024];
                echo_and_check(
                    seed,
                    move |data| writer.write_all(data).unwrap(),
                    |got| match reader.read(&mut buf) {
                        Ok(n) if n > 0 => {
                            got.extend_from_slice(&buf[..n]);
                            true
                        }
                        _ => false,
                    },
                );
            });
        }
    });
}

#[test]
fn a_hundred_tunnels_move_10_mib_each_way_through_grpc() {
    let echo = echo_server();
    let tunnel = Tunnel::start_with(
        &bulk_binary("proxy-server", SERVER),
        &bulk_binary("proxy-agent", AGENT),
        "grpc",
        "uds",
        &[],
        true,
    );
    let uds = tunnel.uds.clone().unwrap();
    std::thread::scope(|scope| {
        for seed in 0..BULK_TUNNELS as u64 {
            let uds = uds.clone();
            scope.spawn(move || {
                let grpc = GrpcTunnel::dial(&uds, &format!("127.0.0.1:{echo}"), seed as i64 + 1)
                    .unwrap_or_else(|e| panic!("tunnel {seed}: {e}"));
                echo_and_check(seed, |data| grpc.send(data), |got| grpc.recv_into(got));
                grpc.close();
            });
        }
    });
}

/// The threads of a process by id.
fn thread_ids(pid: u32) -> std::collections::BTreeSet<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// kube-apiserver opens an HTTP/2 connection per tunnel: its reader, its
/// writer and its call must run on reused threads, not on three new ones
/// per tunnel (a thread start cost about 0.2 ms of each dial here).
#[test]
fn grpc_tunnels_one_connection_each_reuse_the_servers_threads() {
    let echo = echo_server();
    let tunnel = Tunnel::start("grpc", "uds", &[], true);
    let server = tunnel.server.child.pid();
    let uds = tunnel.uds.clone().unwrap();
    let one = |seed: i64, seen: &mut std::collections::BTreeSet<u32>| {
        let grpc = GrpcTunnel::dial(&uds, &format!("127.0.0.1:{echo}"), seed).unwrap();
        grpc.send(b"x");
        let mut got = Vec::new();
        assert!(grpc.recv_into(&mut got) && got == b"x", "{got:?}");
        seen.extend(thread_ids(server));
        grpc.close();
    };
    let mut warm = std::collections::BTreeSet::new();
    for seed in 1..=3 {
        one(seed, &mut warm);
    }
    let before = thread_ids(server);
    let mut seen = before.clone();
    const TUNNELS: i64 = 60;
    for seed in 0..TUNNELS {
        one(100 + seed, &mut seen);
    }
    let new = seen.difference(&before).count();
    assert!(
        new <= 12,
        "{new} threads started for {TUNNELS} sequential gRPC tunnels: {:?}",
        thread_census(server)
    );
}

/// A gRPC tunnel's DIAL_RSP goes out on the thread that delivers it, so a
/// tunnel that has nothing else to receive holds no writer thread in
/// proxy-server (a writer starts only when something must wait), its
/// connection is read by the thread that accepted it, the connection's
/// HTTP/2 writer ends once it has nothing to write, and the call holds no
/// thread while nothing waits.
#[test]
fn an_idle_grpc_tunnel_holds_no_writer_thread() {
    let port = quiet_destination();
    let tunnel = Tunnel::start("grpc", "uds", &[], true);
    let server = tunnel.server.child.pid();
    let uds = tunnel.uds.clone().unwrap();
    const TUNNELS: i64 = 30;
    let tunnels: Vec<_> = (1..=TUNNELS)
        .map(|seed| GrpcTunnel::dial(&uds, &format!("127.0.0.1:{port}"), seed).unwrap())
        .collect();
    // The name as the kernel keeps it (15 bytes).
    let writers = threads_named(server, "grpc-frontend-w");
    assert_eq!(
        writers,
        0,
        "{TUNNELS} idle gRPC tunnels: {:?}",
        thread_census(server)
    );
    // Each connection is read by the thread that accepted it: no
    // HTTP/2 reader thread of its own (one each before).
    let readers = threads_named(server, "h2-reader");
    assert!(
        readers <= 2,
        "{TUNNELS} idle gRPC tunnels: {:?}",
        thread_census(server)
    );
    // Nor an HTTP/2 writer: each connection's writer ends soon after its
    // last frame (its pooled thread a few seconds later), one each before.
    poll("the idle connections' writers to end", DEADLINE, || {
        (threads_named(server, "h2-writer") <= 2).then_some(())
    });
    // Nor a thread for its call: the handler returns once the stream is
    // set up (one each before, waiting for the stream's end).
    poll("the idle calls' threads to end", DEADLINE, || {
        (threads_named(server, "grpc-call") <= 2).then_some(())
    });
    // A tunnel with something to write still gets it.
    let echo = echo_server();
    let busy = GrpcTunnel::dial(&uds, &format!("127.0.0.1:{echo}"), 99).unwrap();
    busy.send(&[7; 100_000]);
    let mut got = Vec::new();
    while got.len() < 100_000 && busy.recv_into(&mut got) {}
    assert_eq!(got, vec![7; 100_000]);
    drop(tunnels);
}

/// A tunnel through the gRPC frontend, as kube-apiserver opens one: its
/// own HTTP/2 connection to the server's Unix socket, one Proxy call.
struct GrpcTunnel {
    /// Holds the connection open.
    _client: apiserver_proxy::grpc::Client,
    call: apiserver_proxy::grpc::ClientCall,
    connect_id: i64,
}

impl GrpcTunnel {
    fn dial(uds: &std::path::Path, address: &str, random: i64) -> Result<GrpcTunnel, String> {
        use apiserver_proxy::grpc;
        use apiserver_proxy::h2::{Config, Connection, Transport};
        let sock = UnixStream::connect(uds).map_err(|e| e.to_string())?;
        let transport =
            Transport::plain(sock, Some(DEADLINE), Some(DEADLINE)).map_err(|e| e.to_string())?;
        let conn = Connection::client(transport, Config::default()).map_err(|e| e.to_string())?;
        let client = grpc::Client::new(conn, "localhost");
        let call = client
            .call("/ProxyService/Proxy", &[])
            .map_err(|e| format!("{e:?}"))?;
        let mut tunnel = GrpcTunnel {
            _client: client,
            call,
            connect_id: 0,
        };
        tunnel.send_message(Message::DialReq {
            protocol: "tcp".into(),
            address: address.into(),
            random,
        });
        match tunnel.recv() {
            Some(Message::DialRsp {
                error, connect_id, ..
            }) if error.is_empty() => tunnel.connect_id = connect_id,
            other => return Err(format!("dial answered {other:?}")),
        }
        Ok(tunnel)
    }

    fn send_message(&self, message: Message) {
        use prost::Message as _;
        let packet = apiserver_proxy::tunnel::proto::Packet::from(message);
        self.call.send(&packet.encode_to_vec()).unwrap();
    }

    fn send(&self, data: &[u8]) {
        self.send_message(Message::Data {
            connect_id: self.connect_id,
            error: String::new(),
            data: data.to_vec().into(),
        })
    }

    fn recv(&self) -> Option<Message> {
        use prost::Message as _;
        let bytes = self.call.recv().ok()??;
        let packet = apiserver_proxy::tunnel::proto::Packet::decode(bytes.as_slice()).ok()?;
        Message::try_from(packet).ok()
    }

    /// Appends the next DATA packet's bytes; false at anything else.
    fn recv_into(&self, got: &mut Vec<u8>) -> bool {
        match self.recv() {
            Some(Message::Data { data, .. }) => {
                got.extend_from_slice(&data);
                true
            }
            _ => false,
        }
    }

    /// CLOSE_REQ, then reads until the CLOSE_RSP (or the end).
    fn close(self) {
        self.send_message(Message::CloseReq {
            connect_id: self.connect_id,
        });
        while !matches!(self.recv(), Some(Message::CloseRsp { .. }) | None) {}
    }
}

#[test]
fn killing_an_agent_mid_transfer_closes_its_tunnels_and_the_other_agent_serves() {
    let echo = echo_server();
    let mut tunnel = Tunnel::start("http-connect", "uds", &[], true);
    let server_pid = tunnel.server.child.pid();
    // The baseline with one agent connected: what is left at the end.
    let baseline = {
        let mut last = None;
        poll("the server to settle", DEADLINE, || {
            let now = resources(server_pid);
            let same = last == Some(now);
            last = Some(now);
            same.then_some(now)
        })
    };
    let mut spare = tunnel.spawn_agent(tunnel.agent_port, &["--agent-id=spare"]);
    poll("two ready backends", DEADLINE, || {
        (metric(
            tunnel.health_port,
            "konnectivity_network_proxy_server_ready_backends",
        ) == Some(2.0))
        .then_some(())
    });
    // Tunnels through both agents, mid-transfer (bytes flowing).
    let mut socks = Vec::new();
    for _ in 0..20 {
        // all on one agent by chance: odds of 2 in a million
        let (mut sock, head) = tunnel.connect_uds(&format!("127.0.0.1:{echo}"));
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        sock.write_all(&[7u8; 1000]).unwrap();
        let mut back = [0u8; 1000];
        sock.read_exact(&mut back).unwrap();
        socks.push(sock);
    }
    let killed = Instant::now();
    tunnel.agent.as_mut().unwrap().child.signal("KILL");
    // The killed agent's tunnels end promptly; the spare's stay up.
    let mut ended = 0;
    for sock in &mut socks {
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let _ = sock.write_all(b"?");
        let mut one = [0u8; 1];
        match sock.read(&mut one) {
            Ok(1) => {}
            _ => ended += 1,
        }
    }
    assert!(
        ended > 0 && ended < 20,
        "{ended} of 20 tunnels ended (random agent choice)"
    );
    assert!(killed.elapsed() < Duration::from_secs(10));
    assert_eq!(
        tunnel.health("/readyz").0,
        200,
        "the spare agent keeps the server ready"
    );
    let (mut sock, head) = tunnel.connect_uds(&format!("127.0.0.1:{echo}"));
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "new tunnels go to the spare: {head}"
    );
    sock.write_all(b"ok").unwrap();
    drop((sock, socks));
    poll(
        "the server back at its one-agent baseline",
        DEADLINE,
        || at_most(resources(server_pid), baseline).then_some(()),
    );
    assert!(spare.child.is_running());
    let _ = spare.port("health port");
}

#[test]
fn the_agent_comes_back_after_a_server_restart() {
    let mut tunnel = Tunnel::start("grpc", "uds", &[], false);
    tunnel.start_agent(&["--sync-interval=100ms", "--sync-interval-cap=1s"]);
    let agent_port = tunnel.agent_port;
    tunnel.server.child.signal("KILL");
    let _ = tunnel.server.child.wait_output(DEADLINE);
    // A new server on the same agent port.
    let mut args = vec![
        format!("--agent-port={agent_port}"),
        "--health-port=0".into(),
        "--admin-port=0".into(),
        "--agent-bind-address=127.0.0.1".into(),
        "--health-bind-address=127.0.0.1".into(),
        format!("--uds-name={}", uds_path().display()),
        "--server-port=0".into(),
    ];
    args.extend(tunnel.certs.cluster_flags());
    let mut server = Proc::start(SERVER, &args);
    let health = server.port("health port");
    let restarted = Instant::now();
    poll("the agent to reconnect", DEADLINE, || {
        (http_get(health, "/readyz").0 == 200).then_some(())
    });
    assert!(
        restarted.elapsed() < Duration::from_secs(5),
        "took {:?}",
        restarted.elapsed()
    );
}

#[test]
fn an_agent_with_a_certificate_from_another_ca_is_refused() {
    let tunnel = Tunnel::start("grpc", "uds", &[], false);
    let stranger = Certs::new();
    let args = vec![
        format!("--ca-cert={}", tunnel.certs.path("agent/issued/ca.crt")),
        format!(
            "--agent-cert={}",
            stranger.path("agent/issued/proxy-agent.crt")
        ),
        format!(
            "--agent-key={}",
            stranger.path("agent/private/proxy-agent.key")
        ),
        format!("--proxy-server-port={}", tunnel.agent_port),
        "--health-server-port=0".into(),
        "--admin-server-port=0".into(),
        "--sync-interval=100ms".into(),
        "--sync-interval-cap=200ms".into(),
    ];
    let mut agent = Proc::start(AGENT, &args);
    poll("the refused connection in the agent log", DEADLINE, || {
        assert!(agent.child.is_running());
        agent.log().contains("connecting to").then_some(())
    });
    assert!(
        !agent.log().contains("connected to server"),
        "{}",
        agent.log()
    );
    assert_eq!(tunnel.health("/readyz").0, 500);
}

#[test]
fn slowloris_is_cut_off_after_the_header_timeout_and_others_are_served() {
    let echo = echo_server();
    let tunnel = Tunnel::start("http-connect", "uds", &["--header-timeout=1s"], true);
    let uds = tunnel.uds.clone().unwrap();
    let mut slow = UnixStream::connect(&uds).unwrap();
    slow.set_read_timeout(Some(DEADLINE)).unwrap();
    let started = Instant::now();
    // One header byte every 100 ms: the whole head would take 10 s.
    let mut pacer = slow.try_clone().unwrap();
    let pacing = std::thread::spawn(move || {
        let head = format!(
            "CONNECT 127.0.0.1:1 HTTP/1.1\r\nX-Slow: {}\r\n\r\n",
            "a".repeat(60)
        );
        for byte in head.bytes() {
            if pacer.write_all(&[byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100)); // the attack's pace, not a wait
        }
    });
    // Meanwhile a normal client is served.
    let (mut ok, head) = tunnel.connect_uds(&format!("127.0.0.1:{echo}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    ok.write_all(b"hi").unwrap();
    let mut back = [0u8; 2];
    ok.read_exact(&mut back).unwrap();
    // The slow one is answered 408 and closed once the timeout passes.
    let answer = read_all(&mut slow);
    let elapsed = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    assert!(
        elapsed >= Duration::from_secs(1),
        "cut off early, after {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(8),
        "cut off late, after {elapsed:?}"
    );
    pacing.join().unwrap();
}

#[test]
fn a_silent_tls_client_is_cut_off_after_the_header_timeout() {
    let tunnel = Tunnel::start("http-connect", "tcp", &["--header-timeout=1s"], true);
    let mut silent = TcpStream::connect(("127.0.0.1", tunnel.frontend_port.unwrap())).unwrap();
    silent.set_read_timeout(Some(DEADLINE)).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = silent.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "expected the server to close the silent connection");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed early"
    );
    assert!(started.elapsed() < Duration::from_secs(8), "closed late");
}
