//! Interop with grpc-go, the gRPC of kube-apiserver and of upstream
//! Konnectivity: our HTTP/2 + gRPC layer against a grpc-go server and
//! client, over mTLS TCP and over h2c on a Unix socket, grpc-go's keepalive
//! enforcement, and our proxy-server and proxy-agent against grpc-go
//! playing kube-apiserver's konnectivity client, an upstream agent and an
//! upstream proxy-server.
//!
//! The peers are Go programs in tests/peers/go/<name>/main.go (plus the
//! shared package tests/peers/go/konnwire), built at test time in GOPATH
//! mode against Debian's grpc-go sources (`make deps-test` installs
//! golang-go, golang-google-grpc-dev and golang-google-protobuf-dev). They
//! print "OK ..." lines and "PASS" on stdout, or "FAIL ..." and exit 1.

mod common;

use common::interop::{self, Listener, OurServer, TempDir, fnv, pool};

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use apiserver_proxy::grpc::{self, Code, ServerCall, Status};
use apiserver_proxy::h2::{self, ErrorCode, TlsSetup, Transport};
use common::{ChildGuard, poll};
use rustls::pki_types::ServerName;

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-server");
const AGENT: &str = env!("CARGO_BIN_EXE_proxy-agent");
const CLIENT: &str = env!("CARGO_BIN_EXE_proxy-test-client");
const TEST_SERVER: &str = env!("CARGO_BIN_EXE_http-test-server");
const DEADLINE: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));
const ECHO: &str = "/interop.Echo/Bidi";
const STREAMS: usize = 3;
const MIB_PER_STREAM: usize = 32;
/// Percent-encoding, UTF-8 and a newline in grpc-message.
const ERROR_MESSAGE: &str = "boom: 100% \u{fc}n\u{ef}code\nline two";
/// Message sizes, cycled: 1 byte up to 4 MiB minus the 5-byte framing.
const SIZES: [usize; 9] = [1, 7, 100, 1000, 16384, 16385, 65536, 1 << 20, (4 << 20) - 5];

// --- scaffolding ------------------------------------------------------------------

const GO_PEERS: [&str; 5] = [
    "echo_server",
    "echo_client",
    "frontend",
    "agent",
    "proxy_server",
];

/// The path of a Go peer. The first call builds them all, once per test
/// run, with one `go build` into cargo's temporary directory for
/// integration tests (target/tmp); the Go build cache lives there too, so
/// only the first run compiles grpc-go.
fn go_peer(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let bin = BUILT
        .get_or_init(build_go_peers)
        .as_ref()
        .unwrap_or_else(|err| panic!("{err}"));
    bin.join(name)
}

fn build_go_peers() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("grpc-go-interop");
    let src = root.join("gopath/src");
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    let peers = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/go");
    for entry in fs::read_dir(&peers).map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        std::os::unix::fs::symlink(entry.path(), src.join(entry.file_name()))
            .map_err(|e| e.to_string())?;
    }
    let bin = root.join("bin");
    fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
    let mut build = ChildGuard::spawn(
        Command::new("go")
            .arg("build")
            .arg("-o")
            .arg(format!("{}/", bin.display()))
            .args(GO_PEERS)
            .current_dir(&root)
            .env(
                "GOPATH",
                format!("{}:/usr/share/gocode", root.join("gopath").display()),
            )
            .env("GO111MODULE", "off")
            .env("GOFLAGS", "")
            .env("GOCACHE", root.join("cache"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    // A cold build compiles grpc-go (tens of seconds on a busy machine).
    let out = build.wait_output(Duration::from_secs(300));
    if !out.status.success() {
        return Err(format!(
            "go build (make deps-test installs golang-go and Debian's grpc-go): {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(bin)
}

/// A Go peer whose stdout lines are collected.
struct GoPeer {
    child: ChildGuard,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

impl GoPeer {
    fn start(program: &Path, args: &[String]) -> GoPeer {
        let mut child = ChildGuard::spawn(
            Command::new(program)
                .args(args)
                // grpc-go's own log goes to stderr, shown on failure.
                .env("GRPC_GO_LOG_SEVERITY_LEVEL", "info")
                .env("GRPC_GO_LOG_VERBOSITY_LEVEL", "2")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        let c = child.child.as_mut().unwrap();
        let out = collect(c.stdout.take().unwrap());
        let err = collect(c.stderr.take().unwrap());
        GoPeer { child, out, err }
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.out.lock().unwrap(),
            self.err.lock().unwrap()
        )
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest.
    fn line(&mut self, prefix: &str) -> String {
        poll(&format!("{prefix:?} from the Go peer"), DEADLINE, || {
            let out = self.out.lock().unwrap().clone();
            if let Some(line) = out.lines().find(|l| l.starts_with(prefix)) {
                return Some(line[prefix.len()..].trim().to_string());
            }
            assert!(
                self.child.is_running(),
                "Go peer exited early:\n{}",
                self.output()
            );
            None
        })
    }

    /// Waits for the exit and asserts PASS.
    fn pass(&mut self, deadline: Duration) -> String {
        let status = self.child.wait_output(deadline).status;
        // The collectors see EOF once the process is gone.
        poll("the Go peer's output", DEADLINE, || {
            self.out
                .lock()
                .unwrap()
                .contains("PASS\n")
                .then_some(())
                .or_else(|| (!status.success()).then_some(()))
        });
        let out = self.out.lock().unwrap().clone();
        assert!(
            status.success() && out.contains("PASS"),
            "Go peer failed ({status}):\n{}",
            self.output()
        );
        out
    }
}

fn collect(pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let mut text = sink.lock().unwrap();
            text.push_str(&line);
            text.push('\n');
        }
    });
    text
}

/// Certificates in upstream's layout from scripts/make-certs.sh: the
/// frontend PKI serves the generic gRPC tests too.
struct Certs {
    dir: TempDir,
}

impl Certs {
    fn new() -> Certs {
        let dir = TempDir::new("go-interop-certs-");
        interop::make_certs(&dir.0);
        Certs { dir }
    }

    fn path(&self, rel: &str) -> String {
        self.dir.path(rel).to_string_lossy().into_owned()
    }

    /// (ca, cert, key) of a PKI (`frontend` or `agent`) and a holder.
    fn triple(&self, pki: &str, who: &str) -> [String; 3] {
        [
            self.path(&format!("{pki}/issued/ca.crt")),
            self.path(&format!("{pki}/issued/{who}.crt")),
            self.path(&format!("{pki}/private/{who}.key")),
        ]
    }
}

fn server_tls([ca, cert, key]: &[String; 3]) -> Arc<rustls::ServerConfig> {
    interop::server_tls(Path::new(ca), Path::new(cert), Path::new(key))
}

fn client_tls([ca, cert, key]: &[String; 3]) -> Arc<rustls::ClientConfig> {
    interop::client_tls(Path::new(ca), Path::new(cert), Path::new(key))
}

fn tls_flags(prefix: &str, [ca, cert, key]: &[String; 3]) -> Vec<String> {
    vec![
        format!("-{prefix}ca={ca}"),
        format!("-{prefix}cert={cert}"),
        format!("-{prefix}key={key}"),
    ]
}

// --- 1a: our grpc::Client against a grpc-go server ------------------------------

/// One echo call: MIB_PER_STREAM MiB each way, hashed on both sides.
fn echo_call(client: &grpc::Client, index: usize, pool: &[u8]) {
    let id = index.to_string();
    let call = client
        .call(ECHO, &[("x-mode", "echo"), ("x-id", &id)])
        .unwrap();
    let total = MIB_PER_STREAM << 20;
    let (mut sent, mut got) = (0xcbf2_9ce4_8422_2325u64, 0xcbf2_9ce4_8422_2325u64);
    let mut received = 0;
    std::thread::scope(|scope| {
        let call = &call;
        let sender = scope.spawn(move || {
            let (mut n, mut i) = (0, 0);
            while n < total {
                let size = SIZES[i % SIZES.len()].min(total - n);
                let off = (i * 977 + index) % 4096;
                let chunk = &pool[off..off + size];
                fnv(&mut sent, chunk);
                call.send(chunk).unwrap();
                n += size;
                i += 1;
            }
            call.close_send().unwrap();
            sent
        });
        let headers = call.headers().unwrap();
        assert_eq!(headers.get("serverid"), Some("go-server"));
        assert_eq!(headers.get("x-echo-id"), Some(id.as_str()));
        while let Some(msg) = call.recv().unwrap() {
            fnv(&mut got, &msg);
            received += msg.len();
        }
        sent = sender.join().unwrap();
    });
    assert_eq!(received, total, "stream {index}");
    assert_eq!(sent, got, "echoed bytes differ on stream {index}");
}

/// One message out, the answers until the status.
fn exchange(client: &grpc::Client, mode: &str, msg: &[u8]) -> Result<Vec<Vec<u8>>, Status> {
    let call = client.call(ECHO, &[("x-mode", mode)])?;
    call.send(msg)?;
    call.close_send()?;
    let mut out = Vec::new();
    while let Some(m) = call.recv()? {
        out.push(m);
    }
    Ok(out)
}

fn drive_go_server(client: grpc::Client) {
    let pool = pool(SIZES[8] + 4096);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for index in 1..=STREAMS {
            let (client, pool) = (&client, &pool);
            scope.spawn(move || echo_call(client, index, pool));
        }
    });
    eprintln!(
        "echo: {STREAMS} x {MIB_PER_STREAM} MiB each way in {:?}",
        start.elapsed()
    );

    // An error status after a message, with a message that needs
    // percent-encoding.
    let call = client.call(ECHO, &[("x-mode", "error")]).unwrap();
    call.send(b"first").unwrap();
    assert_eq!(call.recv().unwrap().unwrap(), b"first");
    assert_eq!(
        call.recv().unwrap_err(),
        Status::new(Code::INVALID_ARGUMENT, ERROR_MESSAGE)
    );
    drop(call);

    // A cancelled call: grpc-go's handler sees codes.Canceled.
    let call = client.call(ECHO, &[("x-mode", "hold")]).unwrap();
    call.send(b"x").unwrap();
    assert_eq!(call.recv().unwrap().unwrap(), b"x");
    call.cancel();
    assert_eq!(call.recv().unwrap_err().code, Code::CANCELLED);
    drop(call);
    poll("grpc-go to see the cancellation", DEADLINE, || {
        (exchange(&client, "probe", b"?").unwrap() == [b"yes".to_vec()]).then_some(())
    });

    // Still healthy; a graceful GOAWAY ends it cleanly.
    assert_eq!(
        exchange(&client, "echo", b"last").unwrap(),
        [b"last".to_vec()]
    );
    client.connection().goaway();
    assert!(
        client
            .connection()
            .wait_closed(Some(Duration::from_secs(10)))
            .is_some()
    );
}

/// A grpc-go echo server on a Unix socket (`tls` None) or on mTLS TCP.
fn start_go_server(
    bin: &Path,
    dir: &TempDir,
    certs: Option<&Certs>,
    extra: &[&str],
) -> (GoPeer, String) {
    let mut args = vec![format!("-error-message={ERROR_MESSAGE}")];
    match certs {
        Some(c) => {
            args.push("-listen=tcp://127.0.0.1:0".into());
            args.extend(tls_flags("", &c.triple("frontend", "proxy-frontend")));
        }
        None => args.push(format!("-listen=unix://{}", dir.path("go.sock").display())),
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut peer = GoPeer::start(bin, &args);
    let addr = peer.line("LISTENING ");
    (peer, addr)
}

fn our_client(addr: &str, certs: Option<&Certs>, config: h2::Config) -> grpc::Client {
    let transport = match certs {
        Some(c) => {
            let sock = TcpStream::connect(addr).unwrap();
            let name = ServerName::try_from("127.0.0.1").unwrap();
            let tls = TlsSetup::Client(client_tls(&c.triple("frontend", "proxy-client")), name);
            Transport::tls(sock, tls, IO_TIMEOUT, IO_TIMEOUT).unwrap()
        }
        None => {
            Transport::plain(UnixStream::connect(addr).unwrap(), IO_TIMEOUT, IO_TIMEOUT).unwrap()
        }
    };
    let authority = if certs.is_some() { addr } else { "localhost" };
    grpc::Client::new(
        h2::Connection::client(transport, config).unwrap(),
        authority,
    )
}

#[test]
fn our_client_to_grpc_go_server_over_mtls() {
    let dir = TempDir::new("go-interop-");
    let bin = go_peer("echo_server");
    let certs = Certs::new();
    let (_peer, addr) = start_go_server(&bin, &dir, Some(&certs), &[]);
    drive_go_server(our_client(&addr, Some(&certs), h2::Config::default()));
}

#[test]
fn our_client_to_grpc_go_server_over_uds() {
    let dir = TempDir::new("go-interop-");
    let bin = go_peer("echo_server");
    let (_peer, addr) = start_go_server(&bin, &dir, None, &[]);
    drive_go_server(our_client(&addr, None, h2::Config::default()));
}

/// grpc-go's keepalive EnforcementPolicy against our client's PINGs. Our
/// client PINGs after `keepalive_interval` without receiving anything. A
/// server whose policy allows that interval (MinTime <= interval,
/// PermitWithoutStream) keeps the idle connection open. With grpc-go's
/// default policy (MinTime 5 min, no PINGs without an open stream) the
/// third "strike" is answered with GOAWAY ENHANCE_YOUR_CALM
/// "too_many_pings" and the connection closed: the reason our default
/// interval is 5 min 10 s and roles take `--keepalive-time`.
#[test]
fn grpc_go_keepalive_enforcement_against_our_pings() {
    let dir = TempDir::new("go-interop-");
    let bin = go_peer("echo_server");
    let (_allowing, addr) = start_go_server(&bin, &dir, None, &["-min-time=500ms"]);
    let config = h2::Config {
        keepalive_interval: Some(Duration::from_millis(700)),
        ..h2::Config::default()
    };
    let client = our_client(&addr, None, config.clone());
    // Idle for about 3 s (several PINGs): nothing closes the connection.
    assert_eq!(
        client
            .connection()
            .wait_closed(Some(Duration::from_millis(2800))),
        None
    );
    assert_eq!(exchange(&client, "echo", b"ok").unwrap(), [b"ok".to_vec()]);
    drop(client);

    let strict_dir = TempDir::new("go-interop-");
    let (strict, addr) = start_go_server(&bin, &strict_dir, None, &[]);
    let config = h2::Config {
        keepalive_interval: Some(Duration::from_millis(200)),
        ..config
    };
    let client = our_client(&addr, None, config);
    let err = client
        .connection()
        .wait_closed(Some(Duration::from_secs(10)))
        .unwrap_or_else(|| {
            panic!(
                "grpc-go's default policy did not close a connection PINGed every 200ms:\n{}",
                strict.output()
            )
        });
    match err {
        h2::Error::GoAway { code, debug, .. } => {
            assert_eq!(code, ErrorCode::ENHANCE_YOUR_CALM);
            assert_eq!(debug, "too_many_pings");
        }
        other => panic!("expected GOAWAY too_many_pings, got {other}"),
    }
}

// --- 1b: a grpc-go client against our grpc::Server -------------------------------

/// The modes of tests/peers/go/echo_server, on our server.
fn echo_handler(cancelled: Arc<AtomicBool>) -> impl Fn(&Arc<ServerCall>) -> Status + Send + Sync {
    move |call| {
        let mode = call.metadata().get("x-mode").unwrap_or("echo").to_string();
        if mode == "probe" {
            let answer: &[u8] = if cancelled.load(Ordering::SeqCst) {
                b"yes"
            } else {
                b"no"
            };
            return call.send(answer).err().unwrap_or_else(Status::ok);
        }
        if mode == "echo" {
            let id = call.metadata().get("x-id").unwrap_or("").to_string();
            call.set_header("serverid", "rust-server");
            call.set_header("x-echo-id", &id);
        }
        loop {
            let msg = match call.recv() {
                Ok(Some(m)) => m,
                Ok(None) => return Status::ok(),
                Err(status) => {
                    if mode == "hold" && status.code == Code::CANCELLED {
                        cancelled.store(true, Ordering::SeqCst);
                    }
                    return status;
                }
            };
            if let Err(status) = call.send(&msg) {
                return status;
            }
            if mode == "error" {
                return Status::new(Code::INVALID_ARGUMENT, ERROR_MESSAGE);
            }
        }
    }
}

/// Our server with the echo service grpc-go's client calls.
fn echo_server() -> grpc::Server {
    grpc::Server::new().route(ECHO, echo_handler(Arc::new(AtomicBool::new(false))))
}

fn run_go_client(bin: &Path, target: String, tls: Option<[String; 3]>) {
    let mut args = vec![
        format!("-target={target}"),
        format!("-streams={STREAMS}"),
        format!("-mib={MIB_PER_STREAM}"),
        format!("-error-message={ERROR_MESSAGE}"),
    ];
    if let Some(tls) = tls {
        args.extend(tls_flags("", &tls));
    }
    let out = GoPeer::start(bin, &args).pass(Duration::from_secs(150));
    eprint!("{out}");
}

#[test]
fn grpc_go_client_to_our_server_over_mtls() {
    let bin = go_peer("echo_client");
    let certs = Certs::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = server_tls(&certs.triple("frontend", "proxy-frontend"));
    let _server = OurServer::start(Listener::Tcp(listener, tls), echo_server());
    run_go_client(
        &bin,
        addr.to_string(),
        Some(certs.triple("frontend", "proxy-client")),
    );
}

#[test]
fn grpc_go_client_to_our_server_over_uds() {
    let dir = TempDir::new("go-interop-");
    let bin = go_peer("echo_client");
    let path = dir.path("ours.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let _server = OurServer::start(Listener::Unix(listener, path.clone()), echo_server());
    run_go_client(&bin, format!("unix://{}", path.display()), None);
}

// --- 2: our proxy-server and proxy-agent against grpc-go roles -------------------

/// One of our binaries with its log (tests/common).
type Ours = common::Logged;

/// Our proxy-server with its frontend on a Unix socket (`uds`) or on mTLS
/// TCP; returns it, its agent port, its health port and the gRPC target of
/// its frontend.
fn our_server(certs: &Certs, dir: &TempDir, mode: &str, uds: bool) -> (Ours, u16, u16, String) {
    let [ca, cert, key] = certs.triple("agent", "proxy-frontend");
    let mut args = vec![
        format!("--mode={mode}"),
        "--agent-port=0".into(),
        "--health-port=0".into(),
        "--admin-port=0".into(),
        "--agent-bind-address=127.0.0.1".into(),
        "--health-bind-address=127.0.0.1".into(),
        "--server-port=0".into(),
        "--server-id=rust-server-1".into(),
        format!("--cluster-ca-cert={ca}"),
        format!("--cluster-cert={cert}"),
        format!("--cluster-key={key}"),
    ];
    let path = dir.path("konn.sock");
    if uds {
        args.push(format!("--uds-name={}", path.display()));
    } else {
        let [ca, cert, key] = certs.triple("frontend", "proxy-frontend");
        args.extend([
            "--server-bind-address=127.0.0.1".into(),
            format!("--server-ca-cert={ca}"),
            format!("--server-cert={cert}"),
            format!("--server-key={key}"),
        ]);
    }
    let mut server = Ours::start(SERVER, &args);
    let agent_port = server.port("agent port");
    let health_port = server.port("health port");
    let target = if uds {
        format!("unix://{}", path.display())
    } else {
        format!("127.0.0.1:{}", server.port(&format!("frontend ({mode})")))
    };
    (server, agent_port, health_port, target)
}

fn our_agent(certs: &Certs, port: u16) -> Ours {
    let [ca, cert, key] = certs.triple("agent", "proxy-agent");
    Ours::start(
        AGENT,
        &[
            format!("--ca-cert={ca}"),
            format!("--agent-cert={cert}"),
            format!("--agent-key={key}"),
            "--proxy-server-host=127.0.0.1".into(),
            format!("--proxy-server-port={port}"),
            "--health-server-port=0".into(),
            "--admin-server-port=0".into(),
            "--health-server-host=127.0.0.1".into(),
        ],
    )
}

fn http_status(port: u16, path: &str) -> u16 {
    let Ok(mut sock) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    sock.set_read_timeout(IO_TIMEOUT).unwrap();
    let _ = sock.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let mut text = String::new();
    let _ = sock.read_to_string(&mut text);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn wait_ready(server: &mut Ours, health_port: u16) {
    poll("the server to see an agent", DEADLINE, || {
        assert!(server.child.is_running(), "{}", server.log());
        (http_status(health_port, "/readyz") == 200).then_some(())
    });
}

/// A kube-apiserver-like grpc-go frontend through our server and agent.
fn grpc_go_frontend(uds: bool) {
    let dir = TempDir::new("go-interop-");
    let bin = go_peer("frontend");
    let certs = Certs::new();
    let (mut server, agent_port, health_port, target) = our_server(&certs, &dir, "grpc", uds);
    let _agent = our_agent(&certs, agent_port);
    wait_ready(&mut server, health_port);
    let mut args = vec![format!("-target={target}")];
    if !uds {
        args.extend(tls_flags("", &certs.triple("frontend", "proxy-client")));
    }
    let out = GoPeer::start(&bin, &args).pass(DEADLINE * 2);
    assert!(out.contains("OK DIAL_RSP connectID=1"), "{out}");
    assert!(out.contains("OK DATA 1048576 bytes"), "{out}");
    assert!(out.contains("OK CLOSE_RSP connectID=1"), "{out}");
    assert!(out.contains("OK refused DIAL_RSP error="), "{out}");
    eprint!("{out}");
}

#[test]
fn grpc_go_frontend_through_our_server_and_agent_over_uds() {
    grpc_go_frontend(true);
}

#[test]
fn grpc_go_frontend_through_our_server_and_agent_over_mtls() {
    grpc_go_frontend(false);
}

/// A destination that echoes, and one that says "bye" and closes.
fn destinations() -> (u16, u16) {
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let closer = TcpListener::bind("127.0.0.1:0").unwrap();
    let ports = (
        echo.local_addr().unwrap().port(),
        closer.local_addr().unwrap().port(),
    );
    // The threads end with the test process.
    std::thread::spawn(move || {
        for conn in echo.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut reader = conn.try_clone().unwrap();
                let mut writer = conn;
                let _ = std::io::copy(&mut reader, &mut writer);
            });
        }
    });
    std::thread::spawn(move || {
        for mut conn in closer.incoming().map_while(Result::ok) {
            let _ = conn.write_all(b"bye");
        }
    });
    ports
}

fn start_go_agent(bin: &Path, certs: &Certs, agent_port: u16) -> GoPeer {
    let mut args = vec![format!("-target=127.0.0.1:{agent_port}")];
    args.extend(tls_flags("", &certs.triple("agent", "proxy-agent")));
    let mut agent = GoPeer::start(bin, &args);
    assert_eq!(agent.line("SERVER "), "rust-server-1 1");
    agent
}

fn connect(uds: &Path, target: &str) -> (UnixStream, String) {
    let mut sock = UnixStream::connect(uds).unwrap();
    sock.set_read_timeout(IO_TIMEOUT).unwrap();
    sock.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match sock.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    (sock, String::from_utf8_lossy(&head).into_owned())
}

#[test]
fn grpc_go_agent_behind_our_http_connect_frontend() {
    let dir = TempDir::new("go-interop-");
    let bin = go_peer("agent");
    let certs = Certs::new();
    let (mut server, agent_port, health_port, target) =
        our_server(&certs, &dir, "http-connect", true);
    let uds = PathBuf::from(target.trim_start_matches("unix://"));
    let mut agent = start_go_agent(&bin, &certs, agent_port);
    wait_ready(&mut server, health_port);
    let (echo, closer) = destinations();

    // 1 MiB each way, byte-exact, through the Go agent.
    let (mut sock, head) = connect(&uds, &format!("127.0.0.1:{echo}"));
    assert_eq!(head, "HTTP/1.1 200 Connection Established\r\n\r\n");
    let payload: Vec<u8> = pool(1 << 20);
    let mut writer = sock.try_clone().unwrap();
    let sent = payload.clone();
    let sender = std::thread::spawn(move || writer.write_all(&sent).unwrap());
    let mut back = vec![0u8; payload.len()];
    sock.read_exact(&mut back).unwrap();
    sender.join().unwrap();
    assert!(back == payload, "echoed bytes differ");
    assert_eq!(agent.line("DIAL ok "), format!("127.0.0.1:{echo} 1"));
    // Our side closes: the server sends CLOSE_REQ to the agent.
    drop(sock);
    assert_eq!(agent.line("CLOSE_REQ "), "1");

    // A refused destination: the agent's DIAL_RSP error becomes a 502.
    let refused = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (mut sock, head) = connect(&uds, &format!("127.0.0.1:{refused}"));
    assert!(head.starts_with("HTTP/1.1 502 "), "{head}");
    let mut body = String::new();
    let _ = sock.read_to_string(&mut body);
    assert!(body.to_lowercase().contains("refused"), "{body}");

    // The destination closes: the agent's unsolicited CLOSE_RSP ends our
    // tunnel after the bytes it sent.
    let (mut sock, head) = connect(&uds, &format!("127.0.0.1:{closer}"));
    assert_eq!(head, "HTTP/1.1 200 Connection Established\r\n\r\n");
    let mut rest = Vec::new();
    sock.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    assert_eq!(agent.line("DEST_CLOSED "), "2");
    assert!(server.child.is_running(), "{}", server.log());
}

#[test]
fn grpc_go_agent_serves_our_test_client_over_grpc() {
    let dir = TempDir::new("go-interop-");
    let bin = go_peer("agent");
    let certs = Certs::new();
    let (mut server, agent_port, health_port, target) = our_server(&certs, &dir, "grpc", true);
    let _agent = start_go_agent(&bin, &certs, agent_port);
    wait_ready(&mut server, health_port);
    let mut dest = Ours::start(TEST_SERVER, &["--server-port=0".into()]);
    let dest_port = dest.port("http-test-server");
    let out = Command::new(CLIENT)
        .args(["--mode=grpc", "--proxy-port=0", "--proxy-host="])
        .arg(format!(
            "--proxy-uds={}",
            target.trim_start_matches("unix://")
        ))
        .arg(format!("--request-port={dest_port}"))
        .arg("--test-requests=10")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\nserver:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("The success test page!").count(), 10);
}

/// Our proxy-agent against a grpc-go server playing upstream's proxy-server.
#[test]
fn our_agent_against_a_grpc_go_proxy_server() {
    let bin = go_peer("proxy_server");
    let certs = Certs::new();
    let mut go_server = GoPeer::start(
        &bin,
        &tls_flags("", &certs.triple("agent", "proxy-frontend")),
    );
    let addr = go_server.line("LISTENING ");
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let mut agent = our_agent(&certs, port);
    assert!(
        go_server.line("AGENT ").starts_with("agentid=["),
        "{}",
        go_server.output()
    );
    go_server.line("AWAIT_DRAIN");
    agent.child.signal("TERM");
    let out = go_server.pass(DEADLINE);
    for step in [
        "OK DIAL_RSP connectID=1",
        "OK DATA 1048576 bytes each way",
        "OK CLOSE_RSP connectID=1",
        "OK CLOSE_RSP for unknown connectID",
        "OK CLOSE_RSP for DATA on unknown connectID",
        "OK unsolicited CLOSE_RSP connectID=2",
        "OK refused DIAL_RSP",
        "OK DIAL_CLS honoured",
        "OK DRAIN",
    ] {
        assert!(out.contains(step), "{step} missing:\n{out}");
    }
    eprint!("{out}");
    let status = agent.child.wait_output(DEADLINE).status;
    assert!(status.success(), "agent exit {status}:\n{}", agent.log());
}
