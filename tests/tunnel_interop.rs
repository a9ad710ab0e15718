//! Our proxy-server and proxy-agent against a Konnectivity implementation we
//! did not write: Python grpcio (gRPC C-core) compiled from
//! tests/proto/konnectivity.proto at test time, playing each upstream role
//! (issue 5: "a user must be able to mix ours with upstream's: same wire").
//!
//! - a grpcio frontend (kube-apiserver's konnectivity client) -> our
//!   proxy-server (h2c on a Unix socket, and mTLS TCP) -> our proxy-agent;
//! - a grpcio agent -> our proxy-server, driven through the HTTP CONNECT
//!   and the gRPC frontends;
//! - our proxy-agent -> a grpcio AgentService (upstream's proxy-server),
//!   which drives the protocol's flows, several server ids, and DRAIN.
//!
//! The peers are tests/peers/konn_*.py; they check the packets they get and
//! print events, which these tests check in turn. Needs
//! APISERVER_PROXY_PYTHON (a venv with grpcio, grpcio-tools, protobuf),
//! which `make integration` provides.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{ChildGuard, poll, run_ok, unique};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-server");
const AGENT: &str = env!("CARGO_BIN_EXE_proxy-agent");
const CLIENT: &str = env!("CARGO_BIN_EXE_proxy-test-client");
const TEST_SERVER: &str = env!("CARGO_BIN_EXE_http-test-server");
const DEADLINE: Duration = Duration::from_secs(20);
/// A Python peer's whole script (it has its own 20 s deadline per wait).
const PEER_DEADLINE: Duration = Duration::from_secs(90);

// --- set-up: a temp dir with certificates and the compiled schema ---------------

/// A temporary directory (certificates, compiled schema, Unix sockets),
/// removed on drop, also when the test fails.
struct Workdir {
    dir: PathBuf,
}

impl Workdir {
    /// Certificates in the upstream layout (scripts/make-certs.sh) under
    /// `certs/`, the schema compiled with grpc_tools.protoc under `schema/`.
    fn new() -> Workdir {
        let dir = std::env::temp_dir().join(unique("konn-interop-"));
        fs::create_dir_all(&dir).unwrap();
        let work = Workdir { dir };
        common::interop::make_certs(Path::new(&work.path("certs")));
        let schema = work.path("schema");
        fs::create_dir_all(&schema).unwrap();
        let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/proto");
        run_ok(
            &python(),
            &[
                "-m",
                "grpc_tools.protoc",
                &format!("-I{}", proto.display()),
                &format!("--python_out={schema}"),
                &format!("--grpc_python_out={schema}"),
                proto.join("konnectivity.proto").to_str().unwrap(),
            ],
        );
        work
    }

    fn path(&self, rel: &str) -> String {
        self.dir.join(rel).to_string_lossy().into_owned()
    }

    fn cert(&self, rel: &str) -> String {
        self.path(&format!("certs/{rel}"))
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn python() -> String {
    std::env::var("APISERVER_PROXY_PYTHON").expect(
        "APISERVER_PROXY_PYTHON is not set: run the suite with `make integration`, \
         which creates the grpcio venv first",
    )
}

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

// --- processes --------------------------------------------------------------------

/// A child whose stdout and stderr lines are collected into one log (our
/// binaries log on stderr, the Python peers print events on stdout). Killed
/// on drop.
struct Proc {
    name: String,
    child: ChildGuard,
    log: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    fn start(name: &str, cmd: &mut Command) -> Proc {
        cmd.env("RUST_LOG", "debug")
            .env("PYTHONPATH", peers_dir())
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(cmd);
        let log = Arc::new(Mutex::new(String::new()));
        let inner = child.child.as_mut().expect("just spawned");
        let out = inner.stdout.take().expect("piped");
        let err = inner.stderr.take().expect("piped");
        // The readers end when the child dies (the guard kills it on drop).
        let mut readers = Vec::new();
        for pipe in [Box::new(out) as Box<dyn Read + Send>, Box::new(err)] {
            let sink = log.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut log = sink.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            }));
        }
        Proc {
            name: name.to_string(),
            child,
            log,
            readers,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Fails with the log when the peer reported a failure or exited.
    fn check_alive(&mut self) {
        let log = self.log();
        assert!(
            !log.lines().any(|l| l.starts_with("FAIL")),
            "{} failed:\n{log}",
            self.name
        );
        assert!(
            self.child.is_running(),
            "{} exited early:\n{log}",
            self.name
        );
    }

    /// Waits for a log line containing `needle` and returns it.
    fn wait_for(&mut self, needle: &str) -> String {
        poll(&format!("{needle:?} from {}", self.name), DEADLINE, || {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return Some(line.to_string());
            }
            self.check_alive();
            None
        })
    }

    /// Waits for "<what> listening on ADDR" and returns ADDR's port.
    fn port(&mut self, what: &str) -> u16 {
        let needle = format!("{what} listening on ");
        let line = self.wait_for(&needle);
        let addr = line
            .split(&needle)
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next();
        addr.and_then(|a| a.rsplit(':').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"))
    }

    /// Runs to completion (a Python script) and asserts it printed PASS.
    fn expect_pass(mut self) {
        poll(&format!("{} to finish", self.name), PEER_DEADLINE, || {
            (!self.child.is_running()).then_some(())
        });
        let status = self.child.wait_output(DEADLINE).status;
        // The pipes are closed now: the readers end after the last line.
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let log = self.log();
        assert!(
            status.success() && log.lines().any(|l| l == "PASS"),
            "{} failed ({status}):\n{log}",
            self.name
        );
        eprintln!("{}:\n{log}", self.name);
    }
}

fn python_peer(name: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(python());
    cmd.arg(peers_dir().join(name)).args(args);
    Proc::start(name, &mut cmd)
}

/// Our proxy-server with agent, health and admin ports chosen by the kernel.
struct Server {
    proc: Proc,
    agent_port: u16,
    health_port: u16,
    frontend_port: Option<u16>,
}

impl Server {
    /// `uds`: the frontend socket path, or None for mTLS TCP.
    fn start(work: &Workdir, mode: &str, uds: Option<&str>, extra: &[&str]) -> Server {
        let mut args = vec![
            format!("--mode={mode}"),
            "--server-port=0".into(),
            "--agent-port=0".into(),
            "--health-port=0".into(),
            "--admin-port=0".into(),
            "--agent-bind-address=127.0.0.1".into(),
            "--health-bind-address=127.0.0.1".into(),
        ];
        args.extend(common::interop::cluster_flags(&|r| work.cert(r)));
        match uds {
            Some(path) => args.push(format!("--uds-name={path}")),
            None => args.extend(
                [
                    vec!["--server-bind-address=127.0.0.1".to_string()],
                    common::interop::frontend_flags(&|r| work.cert(r)),
                ]
                .concat(),
            ),
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proc = Proc::start("proxy-server", Command::new(SERVER).args(&args));
        let agent_port = proc.port("agent port");
        let health_port = proc.port("health port");
        let frontend_port = uds
            .is_none()
            .then(|| proc.port(&format!("frontend ({mode})")));
        Server {
            proc,
            agent_port,
            health_port,
            frontend_port,
        }
    }

    fn health(&self, path: &str) -> (u16, String) {
        http_get(self.health_port, path)
    }

    fn metrics(&self) -> String {
        self.health("/metrics").1
    }

    /// Polls /readyz until it answers `status`.
    fn wait_ready(&mut self, status: u16) {
        poll(&format!("/readyz {status}"), DEADLINE, || {
            self.proc.check_alive();
            (self.health("/readyz").0 == status).then_some(())
        });
    }

    /// Polls /metrics until it has every line of `lines`.
    fn wait_metrics(&mut self, lines: &[&str]) {
        poll(&format!("metrics {lines:?}"), DEADLINE, || {
            self.proc.check_alive();
            let m = self.metrics();
            lines
                .iter()
                .all(|l| m.lines().any(|m| m == *l))
                .then_some(())
        });
    }
}

/// Our proxy-agent against `port` on 127.0.0.1, with the agent PKI.
fn our_agent(work: &Workdir, port: u16, extra: &[&str]) -> Proc {
    let mut args = vec![
        format!("--ca-cert={}", work.cert("agent/issued/ca.crt")),
        format!("--agent-cert={}", work.cert("agent/issued/proxy-agent.crt")),
        format!("--agent-key={}", work.cert("agent/private/proxy-agent.key")),
        "--proxy-server-host=127.0.0.1".into(),
        format!("--proxy-server-port={port}"),
        "--health-server-host=127.0.0.1".into(),
        "--health-server-port=0".into(),
        "--admin-server-port=0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::start("proxy-agent", Command::new(AGENT).args(&args))
}

// --- destinations and plain clients ---------------------------------------------------

fn http_get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut sock) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let _ = sock.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let mut text = Vec::new();
    let _ = sock.read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// A TCP destination on 127.0.0.1 serving each connection with `serve` on
/// its own thread (the threads end with the test process).
fn destination(serve: fn(TcpStream)) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || serve(conn));
        }
    });
    port
}

fn echo(conn: TcpStream) {
    let mut reader = conn.try_clone().unwrap();
    let mut writer = conn;
    let _ = std::io::copy(&mut reader, &mut writer);
}

/// Speaks first, then closes.
fn greeter(mut conn: TcpStream) {
    let _ = conn.write_all(b"hello from the destination");
}

/// A port with no listener.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A destination whose connects hang: a listener with a full backlog that
/// never accepts (Linux then drops further SYNs).
fn blackhole() -> (ChildGuard, u16) {
    let script = "import socket,time\n\
        s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(0)\n\
        held=[]\n\
        for _ in range(4):\n\
        \x20   c=socket.socket(); c.settimeout(0.3)\n\
        \x20   try: c.connect(s.getsockname()); held.append(c)\n\
        \x20   except OSError: pass\n\
        print(s.getsockname()[1], flush=True)\n\
        time.sleep(600)\n";
    let mut cmd = Command::new(python());
    cmd.args(["-c", script]).stdout(Stdio::piped());
    let mut child = ChildGuard::spawn(&mut cmd);
    let stdout = child.child.as_mut().unwrap().stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let port = line.trim().parse().expect("the blackhole's port");
    (child, port)
}

fn connect_uds(uds: &str, target: &str) -> (UnixStream, String) {
    let mut sock = UnixStream::connect(uds).expect("connect to the frontend socket");
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    sock.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .unwrap();
    let head = common::read_head(&mut sock);
    (sock, head)
}

/// Sends `payload` through `sock` (to an echo destination) and checks
/// every byte that comes back, writing and reading at once.
fn echo_exactly(sock: &UnixStream, payload: Vec<u8>) {
    let mut writer = sock.try_clone().unwrap();
    let mut reader = sock.try_clone().unwrap();
    let expected = payload.clone();
    let write = std::thread::spawn(move || writer.write_all(&payload));
    let mut got = vec![0u8; expected.len()];
    reader.read_exact(&mut got).expect("the echo came back");
    write.join().unwrap().expect("the payload went out");
    assert!(got == expected, "{} bytes came back different", got.len());
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

// --- 1. a grpcio frontend -> our proxy-server -> our proxy-agent ---------------------

/// Runs tests/peers/konn_frontend.py against our server (grpc mode) with
/// our agent: tunnels to an echo destination from 1 byte to 1 MiB, a
/// refused dial, DIAL_CLS for a pending dial. `uds`: h2c on a Unix socket,
/// else mTLS TCP.
fn grpcio_frontend_against_our_server(uds: bool) {
    let work = Workdir::new();
    let socket = work.path("f.sock");
    let mut server = Server::start(&work, "grpc", uds.then_some(socket.as_str()), &[]);
    let _agent = our_agent(&work, server.agent_port, &["--dial-timeout=30s"]);
    server.wait_ready(200);
    let echo_port = destination(echo);
    let (_hole, hole_port) = blackhole();
    let (target, certs) = match server.frontend_port {
        None => (format!("unix:{socket}"), "-".to_string()),
        Some(port) => (format!("127.0.0.1:{port}"), work.path("certs")),
    };
    let metrics_url = format!("http://127.0.0.1:{}/metrics", server.health_port);
    python_peer(
        "konn_frontend.py",
        &[
            &work.path("schema"),
            &target,
            &certs,
            &echo_port.to_string(),
            &hole_port.to_string(),
            &metrics_url,
        ],
    )
    .expect_pass();
    let p = "konnectivity_network_proxy_server_";
    server.wait_metrics(&[
        &format!("{p}pending_backend_dials 0"),
        &format!("{p}established_connections 0"),
        &format!("{p}grpc_connections{{service_method=\"ProxyService/Proxy\"}} 0"),
    ]);
    let metrics = server.metrics();
    assert!(
        metrics.contains(&format!(
            "{p}dial_failure_count{{reason=\"error_response\"}} 1"
        )),
        "the refused dial was not counted:\n{metrics}"
    );
}

#[test]
fn grpcio_frontend_to_our_server_over_h2c_uds() {
    grpcio_frontend_against_our_server(true);
}

#[test]
fn grpcio_frontend_to_our_server_over_mtls_tcp() {
    grpcio_frontend_against_our_server(false);
}

// --- 2. a grpcio agent -> our proxy-server --------------------------------------------

const PY_AGENT_ID: &str = "py-agent";
const PY_IDENTIFIERS: &str = "host=localhost&ipv4=127.0.0.1";

/// Starts tests/peers/konn_agent.py against our server's agent port and
/// checks the server id and count it was told.
fn python_agent(work: &Workdir, server: &Server) -> Proc {
    let target = format!("127.0.0.1:{}", server.agent_port);
    let mut agent = python_peer(
        "konn_agent.py",
        &[
            &work.path("schema"),
            &target,
            &work.path("certs"),
            PY_AGENT_ID,
            PY_IDENTIFIERS,
        ],
    );
    agent.wait_for("SERVER id=interop-server count=3");
    agent
}

#[test]
fn grpcio_agent_behind_our_http_connect_frontend() {
    let work = Workdir::new();
    let uds = work.path("c.sock");
    let mut server = Server::start(
        &work,
        "http-connect",
        Some(&uds),
        &["--server-id=interop-server", "--server-count=3"],
    );
    assert_eq!(server.health("/readyz").0, 500, "ready without an agent");
    let mut agent = python_agent(&work, &server);
    server.wait_ready(200);
    server.wait_metrics(&["konnectivity_network_proxy_server_ready_backends 1"]);

    // Two tunnels at once, byte-exact both ways, then a client close
    // (the agent gets CLOSE_REQ).
    let echo_port = destination(echo);
    let tunnels: Vec<_> = (0..2u8)
        .map(|seed| {
            let (sock, head) = connect_uds(&uds, &format!("127.0.0.1:{echo_port}"));
            assert_eq!(head, "HTTP/1.1 200 Connection Established\r\n\r\n");
            std::thread::spawn(move || {
                for size in [1, 1000, 65_537, 1 << 20] {
                    echo_exactly(&sock, pattern(size, seed));
                }
                sock.shutdown(Shutdown::Both).unwrap();
            })
        })
        .collect();
    for t in tunnels {
        t.join().expect("a tunnel failed");
    }
    agent.wait_for("DIAL 127.0.0.1:");
    poll("CLOSE_REQ for both tunnels", DEADLINE, || {
        agent.check_alive();
        (agent.log().matches("CLOSE_REQ ").count() == 2).then_some(())
    });

    // The destination speaks first and closes: its bytes, then EOF (the
    // agent's unsolicited CLOSE_RSP closes the tunnel).
    let greeter_port = destination(greeter);
    let (mut sock, head) = connect_uds(&uds, &format!("127.0.0.1:{greeter_port}"));
    assert_eq!(head, "HTTP/1.1 200 Connection Established\r\n\r\n");
    let mut rest = String::new();
    sock.read_to_string(&mut rest).expect("the tunnel closed");
    assert_eq!(rest, "hello from the destination");
    agent.wait_for("DEST_CLOSED 3");

    // A refused dial: 502 with the grpcio agent's error text.
    let (mut sock, head) = connect_uds(&uds, &format!("127.0.0.1:{}", closed_port()));
    assert!(head.starts_with("HTTP/1.1 502 "), "{head}");
    let mut body = String::new();
    let _ = sock.read_to_string(&mut body);
    assert!(body.contains("Connection refused"), "{body}");

    server.wait_metrics(&["konnectivity_network_proxy_server_established_connections 0"]);
    // The agent leaves: not ready any more.
    agent.child.signal("KILL");
    server.wait_ready(500);
    server.wait_metrics(&["konnectivity_network_proxy_server_ready_backends 0"]);
}

#[test]
fn grpcio_agent_behind_our_grpc_frontend() {
    let work = Workdir::new();
    let uds = work.path("g.sock");
    // destHost: only an agent whose identifiers name the dial host is
    // chosen, so the grpcio agent's agentidentifiers must have arrived.
    let mut server = Server::start(
        &work,
        "grpc",
        Some(&uds),
        &[
            "--server-id=interop-server",
            "--server-count=3",
            "--proxy-strategies=destHost",
        ],
    );
    assert_eq!(server.health("/readyz").0, 500, "ready without an agent");
    let mut agent = python_agent(&work, &server);
    server.wait_ready(200);
    let mut dest = Proc::start(
        "http-test-server",
        Command::new(TEST_SERVER).arg("--server-port=0"),
    );
    let dest_port = dest.port("http-test-server");
    for host in ["localhost", "127.0.0.1"] {
        let out = Command::new(CLIENT)
            .args(["--proxy-port=0", "--proxy-host="])
            .arg(format!("--proxy-uds={uds}"))
            .arg(format!("--request-host={host}"))
            .arg(format!("--request-port={dest_port}"))
            .arg("--test-requests=3")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "proxy-test-client to {host}: {}\nagent:\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        );
        assert_eq!(stdout.matches("The success test page!").count(), 3);
    }
    // Six requests, six connections, ids 1 to 6, each closed from our side.
    agent.wait_for(" -> 6");
    poll("six CLOSE_REQs or destination closes", DEADLINE, || {
        let log = agent.log();
        let closes = log.matches("CLOSE_REQ ").count() + log.matches("DEST_CLOSED ").count();
        (closes == 6).then_some(())
    });
    server.wait_metrics(&[
        "konnectivity_network_proxy_server_established_connections 0",
        "konnectivity_network_proxy_server_pending_backend_dials 0",
    ]);
    agent.child.signal("TERM");
    server.wait_ready(500);
}

// --- 3. our proxy-agent -> a grpcio AgentService ----------------------------------------

const OUR_AGENT_ID: &str = "our-agent";
const OUR_IDENTIFIERS: &str = "host=node-1&ipv4=10.0.0.7&default-route=true";

/// Starts tests/peers/konn_server.py and returns it with its port.
fn grpcio_server(work: &Workdir, mode: &str, server_ids: &str) -> (Proc, u16) {
    let mut server = python_peer(
        "konn_server.py",
        &[
            &work.path("schema"),
            &work.path("certs"),
            mode,
            OUR_AGENT_ID,
            OUR_IDENTIFIERS,
            server_ids,
        ],
    );
    let line = server.wait_for("PORT ");
    let port = line.trim_start_matches("PORT ").trim().parse().unwrap();
    (server, port)
}

fn our_agent_for(work: &Workdir, port: u16, extra: &[&str]) -> Proc {
    let mut args = vec![
        format!("--agent-id={OUR_AGENT_ID}"),
        format!("--agent-identifiers={OUR_IDENTIFIERS}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    our_agent(work, port, &args)
}

/// Runs `wait` (on a peer); if it fails, the failure also shows `other`'s
/// log, the side that peer was waiting for.
fn with_log_of<T>(other: &Proc, wait: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(wait)) {
        Ok(value) => value,
        Err(failure) => {
            let why = failure
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| failure.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            panic!("{why}\n--- {} log:\n{}", other.name, other.log())
        }
    }
}

/// Index of the first line containing `needle`.
fn line_of(log: &str, needle: &str) -> Option<usize> {
    log.lines().position(|l| l.contains(needle))
}

/// SIGTERM to our agent: every stream gets DRAIN, then ends; the agent
/// exits 0.
fn sigterm_drains(agent: &mut Proc, server: &mut Proc, streams: &[(u32, &str)]) {
    agent.child.signal("TERM");
    let out = agent.child.wait_output(DEADLINE);
    assert!(
        out.status.success(),
        "agent exit {}:\n{}",
        out.status,
        agent.log()
    );
    for (n, id) in streams {
        let end = format!("END {n} {id}");
        server.wait_for(&end);
        let log = server.log();
        let drain = line_of(&log, &format!("DRAIN {n} {id}"));
        assert!(
            drain.is_some() && drain < line_of(&log, &end),
            "stream {n} ({id}) ended without a DRAIN first:\n{log}"
        );
    }
}

#[test]
fn our_agent_under_a_grpcio_server_then_drains() {
    let work = Workdir::new();
    let (mut server, port) = grpcio_server(&work, "drive", "py-1");
    let mut agent = our_agent_for(&work, port, &["--dial-timeout=30s"]);
    agent.wait_for("connected to server py-1 (1 of 1)");
    server.wait_for("PASS drive");
    sigterm_drains(&mut agent, &mut server, &[(1, "py-1")]);
}

/// One grpcio server behind one address answering servercount=2 with the
/// server ids of `ids` in turn: our agent must keep exactly one stream per
/// distinct id (`kept`: stream numbers of s1 and s2) and close the
/// duplicates (`closed`: stream number and id).
fn our_agent_keeps_one_stream_per_server_id(
    ids: &str,
    extra: &[&str],
    kept: [u32; 2],
    closed: &[(u32, &str)],
) {
    let work = Workdir::new();
    let (mut server, port) = grpcio_server(&work, "ha", ids);
    let mut args = vec!["--sync-interval=50ms", "--sync-interval-cap=200ms"];
    args.extend(extra);
    let mut agent = our_agent_for(&work, port, &args);
    agent.wait_for("(2 of 2)");
    let health = agent.port("health port");
    // The first stream of each id was kept and serves dials (ids from 1).
    with_log_of(&agent, || {
        server.wait_for(&format!("PROBE {} s1 connectID=1", kept[0]));
        server.wait_for(&format!("PROBE {} s2 connectID=1", kept[1]));
        for (n, id) in closed {
            server.wait_for(&format!("END {n} {id}"));
        }
    });
    poll("the agent's metrics", DEADLINE, || {
        let (_, m) = http_get(health, "/metrics");
        let want = [
            "konnectivity_network_proxy_agent_open_server_connections 2",
            "konnectivity_network_proxy_agent_known_server_count 2",
        ];
        want.iter()
            .all(|w| m.lines().any(|l| l == *w))
            .then_some(())
    });
    let log = server.log();
    for n in kept {
        assert!(
            line_of(&log, &format!("END {n} ")).is_none(),
            "stream {n} should have been kept:\n{log}"
        );
    }
    sigterm_drains(&mut agent, &mut server, &[(kept[0], "s1"), (kept[1], "s2")]);
}

#[test]
fn our_agent_closes_a_duplicate_server_id_and_keeps_connecting() {
    // Default agent settings: the second stream repeats s1; the agent closes
    // it and connects again, finding s2.
    our_agent_keeps_one_stream_per_server_id("s1,s1,s2", &[], [1, 3], &[(2, "s1")]);
}

#[test]
fn our_agent_with_sync_forever_keeps_exactly_two_streams() {
    // s1, s2, s1, s2, ...: the agent keeps syncing, and every stream after
    // the second is a duplicate it closes.
    our_agent_keeps_one_stream_per_server_id(
        "s1,s2",
        &["--sync-forever"],
        [1, 2],
        &[(3, "s1"), (4, "s2")],
    );
}
