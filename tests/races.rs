//! Dial/close races and churn against the real binaries (issue 7): the
//! bugs upstream Konnectivity's tracker is full of (pending dials never
//! failed, connections leaked when a dial is abandoned, goroutines and fds
//! left behind when a stream dies) must not exist here.
//!
//! The peers are scripted with the crate's own gRPC library, so each test
//! decides exactly when each packet goes:
//! - server side: our proxy-server with a fake agent (AgentService/Connect
//!   over mTLS) and frontends (ProxyService/Proxy over h2c on a Unix socket,
//!   or HTTP CONNECT on a Unix socket);
//! - agent side: our proxy-agent against a fake AgentService.
//!
//! Each case checks that the frontend gets an answer, that the agent is
//! told to close whatever it opened for an abandoned dial, and that the
//! server's and agent's gauges, threads and descriptors come back to their
//! baseline (polled with deadlines). Race cases run many iterations.

mod common;

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use apiserver_proxy::grpc::{self, ClientCall, ServerCall, Status};
use apiserver_proxy::h2::{self, TlsSetup, Transport};
use apiserver_proxy::tunnel::message::Message;
use apiserver_proxy::tunnel::proto::Packet;
use common::interop::{self, Listener, OurServer, TempDir};
use common::{ChildGuard, Logged, poll, unique};
use prost::Message as _;
use rustls::pki_types::ServerName;

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-server");
const AGENT: &str = env!("CARGO_BIN_EXE_proxy-agent");
const DEADLINE: Duration = Duration::from_secs(20);
const IO_TIMEOUT: Option<Duration> = Some(Duration::from_secs(60));

// --- packets ----------------------------------------------------------------------

fn dial_req(address: &str, random: i64) -> Message {
    Message::DialReq {
        protocol: "tcp".into(),
        address: address.into(),
        random,
    }
}

fn dial_ok(random: i64, connect_id: i64) -> Message {
    Message::DialRsp {
        error: String::new(),
        connect_id,
        random,
    }
}

fn dial_err(random: i64, error: &str) -> Message {
    Message::DialRsp {
        error: error.into(),
        connect_id: 0,
        random,
    }
}

fn close_rsp(connect_id: i64) -> Message {
    Message::CloseRsp {
        error: String::new(),
        connect_id,
    }
}

fn encode(message: Message) -> Vec<u8> {
    Packet::from(message).encode_to_vec()
}

fn decode(bytes: &[u8]) -> Message {
    Message::try_from(Packet::decode(bytes).expect("a packet")).expect("a message")
}

/// The messages of one stream, read by a thread, with deadlines. `None`
/// marks the end of the stream.
struct Inbox {
    rx: Receiver<Option<Message>>,
    ended: bool,
}

impl Inbox {
    fn spawn(recv: impl Fn() -> Result<Option<Vec<u8>>, Status> + Send + 'static) -> Inbox {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            while let Ok(Some(bytes)) = recv() {
                if tx.send(Some(decode(&bytes))).is_err() {
                    return;
                }
            }
            let _ = tx.send(None);
        });
        Inbox { rx, ended: false }
    }

    /// The next message, or None when the stream ended.
    fn next(&mut self, what: &str) -> Option<Message> {
        self.next_within(what, DEADLINE)
    }

    fn next_within(&mut self, what: &str, deadline: Duration) -> Option<Message> {
        if self.ended {
            return None;
        }
        match self.rx.recv_timeout(deadline) {
            Ok(Some(m)) => Some(m),
            Ok(None) | Err(RecvTimeoutError::Disconnected) => {
                self.ended = true;
                None
            }
            Err(RecvTimeoutError::Timeout) => panic!("{what}: nothing within {deadline:?}"),
        }
    }

    /// The next message, which must be `expected`.
    fn expect(&mut self, what: &str, expected: &Message) {
        let got = self.next(what);
        assert_eq!(got.as_ref(), Some(expected), "{what}");
    }
}

// --- certificates, processes, metrics -------------------------------------------

struct Certs(TempDir);

impl Certs {
    fn new() -> Certs {
        let dir = TempDir::new("races-certs-");
        interop::make_certs(&dir.0);
        Certs(dir)
    }

    fn path(&self, rel: &str) -> String {
        self.0.path(rel).to_string_lossy().into_owned()
    }

    fn agent_client_tls(&self) -> Arc<rustls::ClientConfig> {
        interop::client_tls(
            Path::new(&self.path("agent/issued/ca.crt")),
            Path::new(&self.path("agent/issued/proxy-agent.crt")),
            Path::new(&self.path("agent/private/proxy-agent.key")),
        )
    }

    /// The agent port's side, as proxy-server presents it.
    fn agent_server_tls(&self) -> Arc<rustls::ServerConfig> {
        interop::server_tls(
            Path::new(&self.path("agent/issued/ca.crt")),
            Path::new(&self.path("agent/issued/proxy-frontend.crt")),
            Path::new(&self.path("agent/private/proxy-frontend.key")),
        )
    }
}

/// Threads and open descriptors of a process. The threads serving our own
/// /metrics scrapes (`http-conn-*`, which the HTTP server keeps a while)
/// are not counted: they are the measurement, not the subject.
fn resources(pid: u32) -> (usize, usize) {
    let threads = thread_names(pid)
        .iter()
        .filter(|n| !n.starts_with("http-conn"))
        .count();
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (threads, fds)
}

/// The names of a process's threads (for failure messages).
fn thread_names(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .map(|n| n.trim().to_string())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The counts once they are the same on two polls in a row.
fn settled(pid: u32) -> (usize, usize) {
    let mut last = None;
    poll("the process to settle", DEADLINE, || {
        let now = resources(pid);
        let same = last == Some(now);
        last = Some(now);
        if !same {
            std::thread::sleep(Duration::from_millis(50));
        }
        same.then_some(now)
    })
}

/// Polls until the process is at or below `baseline` (threads, fds).
fn back_to_baseline(what: &str, pid: u32, baseline: (usize, usize)) {
    let end = Instant::now() + DEADLINE;
    loop {
        let now = resources(pid);
        if now.0 <= baseline.0 && now.1 <= baseline.1 {
            return;
        }
        assert!(
            Instant::now() < end,
            "{what}: threads/fds {now:?}, baseline {baseline:?}; threads: {:?}",
            thread_names(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn http_get(port: u16, path: &str) -> String {
    let Ok(mut sock) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let _ = sock.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let mut out = String::new();
    let _ = sock.read_to_string(&mut out);
    out
}

/// The value of an unlabelled metric on a /metrics page.
fn metric(port: u16, name: &str) -> Option<f64> {
    http_get(port, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
}

fn wait_metric(port: u16, name: &str, want: f64) {
    poll(&format!("{name} == {want}"), DEADLINE, || {
        (metric(port, name) == Some(want)).then_some(())
    });
}

const PENDING: &str = "konnectivity_network_proxy_server_pending_backend_dials";
const ESTABLISHED: &str = "konnectivity_network_proxy_server_established_connections";
const HTTP_CONNS: &str = "konnectivity_network_proxy_server_http_connections";
const PROXY_STREAMS: &str =
    "konnectivity_network_proxy_server_grpc_connections{service_method=\"ProxyService/Proxy\"}";
const OPEN_ENDPOINTS: &str = "konnectivity_network_proxy_agent_open_endpoint_connections";

// --- the server and its peers ------------------------------------------------------

/// Our proxy-server with its frontend on a Unix socket.
struct Server {
    certs: Certs,
    proc: Logged,
    agent_port: u16,
    health_port: u16,
    uds: PathBuf,
    frontend_port: Option<u16>,
}

impl Server {
    fn start(mode: &str) -> Server {
        Self::start_with(mode, &[])
    }

    fn start_with(mode: &str, extra: &[&str]) -> Server {
        Self::launch(mode, false, extra)
    }

    /// `tls`: the frontend on TCP with mTLS instead of the Unix socket.
    fn launch(mode: &str, tls: bool, extra: &[&str]) -> Server {
        let certs = Certs::new();
        let uds = std::env::temp_dir().join(unique("races-").replace('-', "") + ".sock");
        let mut args = vec![
            format!("--mode={mode}"),
            "--server-port=0".into(),
            "--agent-port=0".into(),
            "--health-port=0".into(),
            "--admin-port=0".into(),
            "--agent-bind-address=127.0.0.1".into(),
            "--health-bind-address=127.0.0.1".into(),
        ];
        args.extend(common::interop::cluster_flags(&|r| certs.path(r)));
        if tls {
            args.extend(
                [
                    vec!["--server-bind-address=127.0.0.1".to_string()],
                    common::interop::frontend_flags(&|r| certs.path(r)),
                ]
                .concat(),
            );
        } else {
            args.push(format!("--uds-name={}", uds.display()));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proc = Logged::start(SERVER, &args);
        let agent_port = proc.port("agent port");
        let health_port = proc.port("health port");
        let frontend_port = tls.then(|| proc.port(&format!("frontend ({mode})")));
        if !tls {
            poll("the frontend socket", DEADLINE, || {
                uds.exists().then_some(())
            });
        }
        Server {
            certs,
            proc,
            agent_port,
            health_port,
            uds,
            frontend_port,
        }
    }

    /// A CONNECT request over mTLS TCP; the head is not read.
    fn connect_request_tls(
        &self,
        target: &str,
    ) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
        let sock =
            TcpStream::connect(("127.0.0.1", self.frontend_port.expect("a TLS frontend"))).unwrap();
        sock.set_read_timeout(Some(DEADLINE)).unwrap();
        let config = interop::client_tls(
            Path::new(&self.certs.path("frontend/issued/ca.crt")),
            Path::new(&self.certs.path("frontend/issued/proxy-client.crt")),
            Path::new(&self.certs.path("frontend/private/proxy-client.key")),
        );
        // The CONNECT frontend speaks HTTP/1.1 inside TLS, no ALPN needed.
        let mut config = (*config).clone();
        config.alpn_protocols.clear();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        tls.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .unwrap();
        tls.flush().unwrap();
        tls
    }

    fn pid(&self) -> u32 {
        self.proc.child.pid()
    }

    fn metric(&self, name: &str) -> Option<f64> {
        metric(self.health_port, name)
    }

    /// Pending dials and established connections back at 0.
    fn idle(&self) {
        wait_metric(self.health_port, PENDING, 0.0);
        wait_metric(self.health_port, ESTABLISHED, 0.0);
    }

    /// No frontend left: no Proxy stream, no CONNECT connection.
    fn no_frontends(&self) {
        // (A series that was never set is not on the page: 0.)
        poll("no frontend left", DEADLINE, || {
            let open = |name| self.metric(name).unwrap_or(0.0);
            (open(PROXY_STREAMS) == 0.0 && open(HTTP_CONNS) == 0.0).then_some(())
        });
    }

    fn fake_agent(&self, id: &str) -> FakeAgent {
        let sock = TcpStream::connect(("127.0.0.1", self.agent_port)).unwrap();
        let raw = sock.try_clone().unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let tls = TlsSetup::Client(self.certs.agent_client_tls(), name);
        let transport = Transport::tls(sock, tls, IO_TIMEOUT, IO_TIMEOUT).unwrap();
        let conn = h2::Connection::client(transport, h2::Config::default()).unwrap();
        let client = grpc::Client::new(conn, &format!("127.0.0.1:{}", self.agent_port));
        let call = Arc::new(
            client
                .call(
                    "/AgentService/Connect",
                    &[("agentid", id), ("agentidentifiers", "")],
                )
                .unwrap(),
        );
        call.headers().expect("serverid and servercount");
        let reader = call.clone();
        let inbox = Inbox::spawn(move || reader.recv());
        poll("the server to see the agent", DEADLINE, || {
            (self.metric("konnectivity_network_proxy_server_ready_backends") == Some(1.0))
                .then_some(())
        });
        FakeAgent {
            _client: client,
            call,
            inbox,
            raw,
            stale: HashSet::new(),
        }
    }

    fn grpc_frontend(&self) -> GrpcFrontend {
        let sock = UnixStream::connect(&self.uds).unwrap();
        let raw = sock.try_clone().unwrap();
        let transport = Transport::plain(sock, IO_TIMEOUT, IO_TIMEOUT).unwrap();
        let conn = h2::Connection::client(transport, h2::Config::default()).unwrap();
        let client = grpc::Client::new(conn, "localhost");
        let call = Arc::new(client.call("/ProxyService/Proxy", &[]).unwrap());
        let reader = call.clone();
        let inbox = Inbox::spawn(move || reader.recv());
        GrpcFrontend {
            _client: client,
            call,
            inbox,
            raw,
        }
    }

    /// One h2c connection to the gRPC frontend, for many Proxy streams;
    /// and its raw socket, to kill it.
    fn grpc_connection(&self) -> (grpc::Client, UnixStream) {
        let sock = UnixStream::connect(&self.uds).unwrap();
        let raw = sock.try_clone().unwrap();
        let transport = Transport::plain(sock, IO_TIMEOUT, IO_TIMEOUT).unwrap();
        let conn = h2::Connection::client(transport, h2::Config::default()).unwrap();
        (grpc::Client::new(conn, "localhost"), raw)
    }

    /// An HTTP CONNECT request on the Unix socket; the head is not read.
    fn connect_request(&self, target: &str) -> UnixStream {
        let mut sock = UnixStream::connect(&self.uds).unwrap();
        sock.set_read_timeout(Some(DEADLINE)).unwrap();
        sock.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .unwrap();
        sock
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.uds);
    }
}

/// A scripted agent on our server's agent port.
struct FakeAgent {
    _client: grpc::Client,
    call: Arc<ClientCall>,
    inbox: Inbox,
    raw: TcpStream,
    /// Dials whose DIAL_CLS may still come (see `orphan_closed`).
    stale: HashSet<i64>,
}

impl FakeAgent {
    /// The next message if one comes within `wait` (None on timeout or
    /// at the end of the stream).
    fn try_next(&mut self, wait: Duration) -> Option<Message> {
        self.inbox.rx.recv_timeout(wait).unwrap_or_default()
    }

    fn send(&self, message: Message) {
        self.call.send(&encode(message)).expect("agent send");
    }

    /// The next message, skipping the late DIAL_CLS of `orphan_closed`.
    fn next(&mut self, what: &str) -> Message {
        loop {
            let message = self
                .inbox
                .next(what)
                .unwrap_or_else(|| panic!("{what}: the agent stream ended"));
            match message {
                Message::DialCls { random } if self.stale.remove(&random) => {}
                other => return other,
            }
        }
    }

    /// The next message, which must be `expected`.
    fn expect(&mut self, what: &str, expected: &Message) {
        assert_eq!(&self.next(what), expected, "{what}");
    }

    /// The next DIAL_REQ; returns its random.
    fn dial_request(&mut self) -> i64 {
        match self.next("DIAL_REQ at the agent") {
            Message::DialReq { random, .. } => random,
            other => panic!("expected DIAL_REQ at the agent, got {other:?}"),
        }
    }

    /// After a frontend left while its dial's DIAL_RSP was on the way: the
    /// agent gets DIAL_CLS and CLOSE_REQ for what it opened, or only
    /// CLOSE_REQ (the DIAL_RSP won). Both are sent after the server's lock
    /// is released, by two threads (the frontend's and this agent's
    /// reader), so the DIAL_CLS may also come after the CLOSE_REQ: then
    /// `next` skips it when it comes.
    /// Harmless: the agent no longer knows that dial and ignores it.
    fn orphan_closed(&mut self, random: i64, connect_id: i64) {
        match self.next("DIAL_CLS or CLOSE_REQ") {
            Message::DialCls { random: r } if r == random => {
                self.expect(
                    "CLOSE_REQ for the orphan",
                    &Message::CloseReq { connect_id },
                );
            }
            Message::CloseReq { connect_id: c } if c == connect_id => {
                self.stale.insert(random);
            }
            other => panic!("unexpected at the agent: {other:?}"),
        }
    }

    /// The agent's process dies: its socket closes under the stream.
    fn kill(self) {
        let _ = self.raw.shutdown(Shutdown::Both);
    }
}

/// A scripted gRPC frontend (kube-apiserver's konnectivity client).
struct GrpcFrontend {
    _client: grpc::Client,
    call: Arc<ClientCall>,
    inbox: Inbox,
    raw: UnixStream,
}

impl GrpcFrontend {
    fn send(&self, message: Message) {
        self.call.send(&encode(message)).expect("frontend send");
    }

    fn next(&mut self, what: &str) -> Message {
        self.inbox
            .next(what)
            .unwrap_or_else(|| panic!("{what}: the frontend stream ended"))
    }

    /// The frontend's process dies.
    fn kill(self) {
        let _ = self.raw.shutdown(Shutdown::Both);
    }
}

// --- server side: gRPC frontend --------------------------------------------------------

/// When the frontend's DIAL_CLS goes, relative to the agent's DIAL_RSP.
#[derive(Clone, Copy, Debug)]
enum When {
    Before,
    Racing,
    After,
}

/// One dial abandoned with DIAL_CLS, on a fresh frontend stream. Whatever
/// the order, the agent is told to close what it opened (DIAL_CLS, then
/// CLOSE_REQ for the late DIAL_RSP; or CLOSE_REQ from the frontend that got
/// the DIAL_RSP first), exactly one of those stories happens, and nothing
/// else reaches either side. Returns whether the DIAL_RSP won.
fn dial_cls_round(server: &Server, agent: &mut FakeAgent, when: When, round: i64) -> bool {
    let mut f = server.grpc_frontend();
    let random = 1_000 + round;
    let connect_id = 10_000 + round;
    f.send(dial_req("10.0.0.1:443", random));
    assert_eq!(agent.dial_request(), random);
    match when {
        When::Before => {
            f.send(Message::DialCls { random });
            agent.expect("DIAL_CLS reaches the agent", &Message::DialCls { random });
            agent.send(dial_ok(random, connect_id));
        }
        When::Racing => {
            let barrier = Barrier::new(2);
            let call = f.call.clone();
            std::thread::scope(|s| {
                s.spawn(|| {
                    barrier.wait();
                    call.send(&encode(Message::DialCls { random })).unwrap();
                });
                barrier.wait();
                agent.send(dial_ok(random, connect_id));
            });
        }
        When::After => {
            agent.send(dial_ok(random, connect_id));
            f.inbox.expect("the DIAL_RSP", &dial_ok(random, connect_id));
            f.send(Message::DialCls { random });
        }
    }
    // A second dial on the same stream marks the end of what the first one
    // can cause: the router handles the frontend's packets in order.
    let random2 = 5_000 + round;
    f.send(dial_req("10.0.0.1:443", random2));
    let (agent_saw_cls, rsp_won) = std::thread::scope(|s| {
        // The agent: answers the second dial, closes the first connection
        // when told; notes whether the DIAL_CLS came through.
        let agent_side = s.spawn(|| {
            let mut saw_cls = matches!(when, When::Before);
            let (mut saw_dial2, mut saw_close) = (false, false);
            while !(saw_dial2 && saw_close) {
                match agent.next("the agent's packets") {
                    Message::DialCls { random: r } if r == random => {
                        assert!(!saw_cls, "DIAL_CLS twice");
                        assert!(!saw_dial2, "DIAL_CLS after the next dial");
                        saw_cls = true;
                    }
                    Message::DialReq { random: r, .. } if r == random2 => {
                        saw_dial2 = true;
                        agent.send(dial_err(random2, "connection refused"));
                    }
                    Message::CloseReq { connect_id: c } if c == connect_id => {
                        assert!(!saw_close, "CLOSE_REQ twice");
                        saw_close = true;
                        agent.send(close_rsp(connect_id));
                    }
                    other => panic!("{when:?} round {round}: unexpected at the agent: {other:?}"),
                }
            }
            saw_cls
        });
        // The frontend: closes the connection if its DIAL_RSP came, until
        // the second dial's answer and (then) the CLOSE_RSP.
        let mut rsp_won = matches!(when, When::After);
        if rsp_won {
            f.send(Message::CloseReq { connect_id });
        }
        let (mut done2, mut closed) = (false, false);
        while !(done2 && (closed || !rsp_won)) {
            match f.next("the frontend's packets") {
                m if m == dial_ok(random, connect_id) => {
                    assert!(!rsp_won && !done2, "DIAL_RSP twice or late");
                    rsp_won = true;
                    f.send(Message::CloseReq { connect_id });
                }
                m if m == close_rsp(connect_id) => {
                    assert!(rsp_won && !closed);
                    closed = true;
                }
                Message::DialRsp {
                    random: r, error, ..
                } if r == random2 => {
                    assert!(!error.is_empty());
                    done2 = true;
                }
                other => panic!("{when:?} round {round}: unexpected at the frontend: {other:?}"),
            }
        }
        (agent_side.join().unwrap(), rsp_won)
    });
    // Exactly one story: the DIAL_CLS reached the agent, or the DIAL_RSP
    // reached the frontend.
    assert!(
        rsp_won != agent_saw_cls,
        "{when:?} round {round}: DIAL_RSP delivered: {rsp_won}, DIAL_CLS forwarded: {agent_saw_cls}"
    );
    rsp_won
}

#[test]
fn grpc_frontend_dial_cls_before_racing_and_after_the_dial_rsp() {
    let server = Server::start("grpc");
    let pid = server.pid();
    let baseline = settled(pid);
    let mut agent = server.fake_agent("fake-agent");
    let mut outcomes = (0, 0);
    for (when, first, rounds) in [
        (When::Before, 0, 5),
        (When::After, 100, 5),
        (When::Racing, 200, 60),
    ] {
        for round in first..first + rounds {
            let won = dial_cls_round(&server, &mut agent, when, round);
            if matches!(when, When::Racing) {
                if won {
                    outcomes.0 += 1;
                } else {
                    outcomes.1 += 1;
                }
            }
        }
    }
    eprintln!(
        "racing: DIAL_RSP won {}, DIAL_CLS won {}",
        outcomes.0, outcomes.1
    );
    server.idle();
    server.no_frontends();
    agent.kill();
    back_to_baseline("server", pid, baseline);
}

/// A frontend that dies (its connection closed, or only its stream reset
/// with RST_STREAM) before or while its dial's DIAL_RSP arrives: the agent
/// gets DIAL_CLS and, for the late DIAL_RSP, CLOSE_REQ.
#[test]
fn a_frontend_that_dies_while_dialling_cancels_and_closes_at_the_agent() {
    let server = Server::start("grpc");
    let pid = server.pid();
    let baseline = settled(pid);
    let mut agent = server.fake_agent("fake-agent");
    for round in 0..40i64 {
        let frontend = server.grpc_frontend();
        let random = 77_000 + round;
        let connect_id = 500 + round;
        frontend.send(dial_req("10.0.0.1:443", random));
        assert_eq!(agent.dial_request(), random);
        let reset_only = round % 4 >= 2;
        let die = move |f: GrpcFrontend| {
            if reset_only {
                f.call.cancel();
                // The connection stays open until the frontend is dropped.
                std::mem::forget(f.inbox);
            } else {
                f.kill();
            }
        };
        if round % 2 == 0 {
            // Dies first; the agent answers after it saw the DIAL_CLS.
            die(frontend);
            agent.expect(
                "DIAL_CLS for the dead frontend",
                &Message::DialCls { random },
            );
            agent.send(dial_ok(random, connect_id));
            agent.expect(
                "CLOSE_REQ for the orphan",
                &Message::CloseReq { connect_id },
            );
        } else {
            // Dies while the DIAL_RSP is on its way.
            let barrier = Barrier::new(2);
            std::thread::scope(|s| {
                s.spawn(|| {
                    barrier.wait();
                    die(frontend);
                });
                barrier.wait();
                agent.send(dial_ok(random, connect_id));
            });
            agent.orphan_closed(random, connect_id);
        }
        agent.send(close_rsp(connect_id));
        server.idle();
    }
    server.no_frontends();
    agent.kill();
    back_to_baseline("server", pid, baseline);
}

/// The server's --backend-dial-timeout fails a dial the agent is slow to
/// answer (the frontend gets its DIAL_RSP error, the agent DIAL_CLS); the
/// agent's DIAL_RSP after that is closed with CLOSE_REQ.
#[test]
fn a_dial_rsp_after_the_backend_dial_timeout_is_closed() {
    let server = Server::start_with("grpc", &["--backend-dial-timeout=300ms"]);
    let mut agent = server.fake_agent("fake-agent");
    let mut frontend = server.grpc_frontend();
    for round in 0..5i64 {
        let (random, connect_id) = (60 + round, 600 + round);
        frontend.send(dial_req("10.0.0.1:443", random));
        assert_eq!(agent.dial_request(), random);
        match frontend.next("the timed-out dial's answer") {
            Message::DialRsp {
                random: r, error, ..
            } => {
                assert_eq!(r, random);
                assert!(error.contains("timeout"), "{error}");
            }
            other => panic!("expected DIAL_RSP error, got {other:?}"),
        }
        agent.expect("DIAL_CLS after the timeout", &Message::DialCls { random });
        agent.send(dial_ok(random, connect_id));
        agent.expect(
            "CLOSE_REQ for the late DIAL_RSP",
            &Message::CloseReq { connect_id },
        );
        agent.send(close_rsp(connect_id));
        server.idle();
    }
    // Nothing else reached the frontend: the next answer is its next dial's.
    frontend.send(dial_req("10.0.0.1:443", 99));
    assert_eq!(agent.dial_request(), 99);
    agent.send(dial_err(99, "refused"));
    match frontend.next("the last dial's answer") {
        Message::DialRsp { random: 99, .. } => {}
        other => panic!("expected DIAL_RSP 99, got {other:?}"),
    }
}

#[test]
fn close_req_for_a_connection_still_dialling_is_answered() {
    let server = Server::start("grpc");
    let mut agent = server.fake_agent("fake-agent");
    let mut frontend = server.grpc_frontend();
    frontend.send(dial_req("10.0.0.1:443", 42));
    assert_eq!(agent.dial_request(), 42);
    // The frontend does not know the connection id yet: 0, and a guess.
    for guess in [0, 1] {
        frontend.send(Message::CloseReq { connect_id: guess });
        match frontend.next("the answer to CLOSE_REQ") {
            Message::CloseRsp { connect_id, error } => {
                assert_eq!(connect_id, guess);
                assert!(!error.is_empty());
            }
            other => panic!("expected CLOSE_RSP, got {other:?}"),
        }
    }
    // The dial is still pending and completes normally.
    assert_eq!(server.metric(PENDING), Some(1.0));
    agent.send(dial_ok(42, 1));
    frontend.inbox.expect("the DIAL_RSP", &dial_ok(42, 1));
    frontend.send(Message::CloseReq { connect_id: 1 });
    agent.expect("CLOSE_REQ", &Message::CloseReq { connect_id: 1 });
    agent.send(close_rsp(1));
    frontend.inbox.expect("CLOSE_RSP", &close_rsp(1));
    server.idle();
    // Nothing else reached the agent: the next thing is a new dial.
    frontend.send(dial_req("10.0.0.1:443", 43));
    assert_eq!(agent.dial_request(), 43);
}

/// Runs `threads` frontend threads, each running `round(t)`,
/// against one scripted agent that answers every DIAL_REQ at once with a
/// new connection and every CLOSE_REQ with CLOSE_RSP. The invariant: every
/// connection the agent announced gets exactly one CLOSE_REQ, no unknown id
/// is ever closed, and the server ends idle. Returns (announced, DIAL_CLS).
fn storm(
    server: &Server,
    agent: &mut FakeAgent,
    threads: i64,
    round: impl Fn(i64) + Sync,
) -> (i64, usize) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let open: Mutex<HashSet<i64>> = Mutex::new(HashSet::new());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let agent_side = s.spawn(|| {
            let (mut next_id, mut cancels) = (1i64, 0);
            while !stop.load(Ordering::SeqCst) {
                let Some(message) = agent.try_next(Duration::from_millis(50)) else {
                    continue;
                };
                match message {
                    Message::DialReq { random, .. } => {
                        open.lock().unwrap().insert(next_id);
                        agent.send(dial_ok(random, next_id));
                        next_id += 1;
                    }
                    Message::CloseReq { connect_id } => {
                        assert!(
                            open.lock().unwrap().remove(&connect_id),
                            "CLOSE_REQ for {connect_id}: twice, or never announced"
                        );
                        agent.send(close_rsp(connect_id));
                    }
                    Message::DialCls { .. } => cancels += 1,
                    Message::Data { connect_id, .. } => assert!(
                        open.lock().unwrap().contains(&connect_id),
                        "DATA for {connect_id}, which is not open"
                    ),
                    other => panic!("unexpected at the agent: {other:?}"),
                }
            }
            (next_id - 1, cancels)
        });
        let round = &round;
        let frontends: Vec<_> = (0..threads).map(|t| s.spawn(move || round(t))).collect();
        for f in frontends {
            f.join().unwrap();
        }
        server.idle();
        server.no_frontends();
        poll(
            "every announced connection closed at the agent",
            DEADLINE,
            || open.lock().unwrap().is_empty().then_some(()),
        );
        stop.store(true, Ordering::SeqCst);
        agent_side.join().unwrap()
    })
}

/// A storm of gRPC frontends, each round one of: DIAL_CLS right after
/// DIAL_REQ (racing the agent's instant DIAL_RSP), a normal dial and close,
/// a frontend killed right after its DIAL_REQ, a stream reset.
#[test]
fn a_storm_of_grpc_frontends_leaves_nothing_open_at_the_agent() {
    let server = Server::start("grpc");
    let pid = server.pid();
    let baseline = settled(pid);
    let mut agent = server.fake_agent("fake-agent");
    let (threads, rounds) = (12i64, 100i64);
    let (announced, cancels) = storm(&server, &mut agent, threads, |t| {
        for round in 0..rounds {
            let random = t * 1_000 + round + 1;
            let mut f = server.grpc_frontend();
            f.send(dial_req("10.0.0.1:443", random));
            match (t + round) % 4 {
                0 => {
                    f.send(Message::DialCls { random });
                    let _ = f.call.close_send();
                }
                1 => {
                    let connect_id = match f.next("DIAL_RSP") {
                        Message::DialRsp {
                            error, connect_id, ..
                        } => {
                            assert!(error.is_empty(), "{error}");
                            connect_id
                        }
                        other => panic!("expected DIAL_RSP, got {other:?}"),
                    };
                    f.send(Message::CloseReq { connect_id });
                    f.inbox.expect("CLOSE_RSP", &close_rsp(connect_id));
                }
                2 => f.kill(),
                _ => f.call.cancel(),
            }
        }
    });
    eprintln!(
        "{} dials, {announced} connections announced and closed, {cancels} DIAL_CLS",
        threads * rounds
    );
    // Killed and reset frontends may die before their DIAL_REQ is out;
    // the normal dials (one round in four) all got through.
    assert!(announced >= threads * rounds / 4, "{announced}");
    agent.kill();
    back_to_baseline("server", pid, baseline);
}

/// A storm of CONNECT clients, each round one of: hang up right after the
/// request, half-close right after it, take the 200 and then hang up, send
/// bytes through the tunnel and hang up.
#[test]
fn a_storm_of_connect_clients_leaves_nothing_open_at_the_agent() {
    let server = Server::start("http-connect");
    let pid = server.pid();
    let baseline = settled(pid);
    let mut agent = server.fake_agent("fake-agent");
    let (threads, rounds) = (12i64, 50i64);
    let (announced, cancels) = storm(&server, &mut agent, threads, |t| {
        for round in 0..rounds {
            let mut client = server.connect_request("10.0.0.1:443");
            match (t + round) % 4 {
                0 => drop(client),
                1 => {
                    let _ = client.shutdown(Shutdown::Write);
                    // Answered (200 if the DIAL_RSP won, else nothing) or closed.
                    let _ = common::read_head(&mut client);
                }
                2 => {
                    let head = common::read_head(&mut client);
                    assert_eq!(head, "HTTP/1.1 200 Connection Established\r\n\r\n");
                }
                _ => {
                    let head = common::read_head(&mut client);
                    assert_eq!(head, "HTTP/1.1 200 Connection Established\r\n\r\n");
                    client.write_all(b"bytes for the agent").unwrap();
                }
            }
        }
    });
    eprintln!(
        "{} CONNECTs, {announced} connections announced and closed, {cancels} DIAL_CLS",
        threads * rounds
    );
    assert!(announced >= threads * rounds / 2, "{announced}");
    agent.kill();
    back_to_baseline("server", pid, baseline);
}

/// One frontend connection multiplexing 100 Proxy streams, 50 of them
/// established and 50 still dialling, dies: the agent gets CLOSE_REQ for
/// each of the 50 connections and DIAL_CLS for each of the 50 dials.
#[test]
fn a_frontend_connection_with_100_streams_dies() {
    let server = Server::start("grpc");
    let pid = server.pid();
    let baseline = settled(pid);
    let mut agent = server.fake_agent("fake-agent");
    for round in 0..3i64 {
        let (client, raw) = server.grpc_connection();
        let mut calls = Vec::new();
        for i in 0..100i64 {
            let call = Arc::new(client.call("/ProxyService/Proxy", &[]).unwrap());
            let reader = call.clone();
            let inbox = Inbox::spawn(move || reader.recv());
            call.send(&encode(dial_req("10.0.0.1:443", round * 1_000 + i + 1)))
                .unwrap();
            calls.push((call, inbox));
        }
        let mut dialling = HashSet::new();
        let mut established = HashSet::new();
        for _ in 0..100 {
            let random = agent.dial_request();
            if random % 2 == 0 {
                let connect_id = random + 50_000;
                agent.send(dial_ok(random, connect_id));
                established.insert(connect_id);
            } else {
                dialling.insert(random);
            }
        }
        // The established ones are told so.
        for (i, (_, inbox)) in calls.iter_mut().enumerate() {
            let random = round * 1_000 + i as i64 + 1;
            if random % 2 == 0 {
                inbox.expect("DIAL_RSP", &dial_ok(random, random + 50_000));
            }
        }
        wait_metric(server.health_port, PENDING, 50.0);
        wait_metric(server.health_port, ESTABLISHED, 50.0);
        let _ = raw.shutdown(Shutdown::Both);
        while !(dialling.is_empty() && established.is_empty()) {
            match agent.next("DIAL_CLS and CLOSE_REQ for the dead connection") {
                Message::DialCls { random } => assert!(dialling.remove(&random), "{random}"),
                Message::CloseReq { connect_id } => {
                    assert!(established.remove(&connect_id), "{connect_id}");
                    agent.send(close_rsp(connect_id));
                }
                other => panic!("unexpected at the agent: {other:?}"),
            }
        }
        server.idle();
        server.no_frontends();
        drop(calls);
        drop(client);
    }
    agent.kill();
    back_to_baseline("server", pid, baseline);
}

/// The agent vanishes with 100 dials pending: every frontend gets its
/// DIAL_RSP error promptly, the gauges go to 0, threads and fds back.
#[test]
fn an_agent_that_vanishes_fails_100_pending_grpc_dials() {
    let server = Server::start("grpc");
    let pid = server.pid();
    let baseline = settled(pid);
    for round in 0..3 {
        let mut agent = server.fake_agent(&format!("fake-agent-{round}"));
        let mut frontends: Vec<GrpcFrontend> = (0..100).map(|_| server.grpc_frontend()).collect();
        for (i, f) in frontends.iter().enumerate() {
            f.send(dial_req("10.0.0.1:443", i as i64 + 1));
        }
        let mut seen = HashSet::new();
        for _ in 0..100 {
            seen.insert(agent.dial_request());
        }
        assert_eq!(seen.len(), 100);
        assert_eq!(server.metric(PENDING), Some(100.0));
        let killed = Instant::now();
        if round == 1 {
            agent.call.cancel(); // RST_STREAM only, the connection lives
            std::mem::forget(agent.inbox); // keep the reader's channel alive
            drop(agent._client);
        } else {
            agent.kill();
        }
        for (i, f) in frontends.iter_mut().enumerate() {
            match f.next("the dial's answer") {
                Message::DialRsp { random, error, .. } => {
                    assert_eq!(random, i as i64 + 1);
                    assert!(!error.is_empty());
                }
                other => panic!("expected DIAL_RSP error, got {other:?}"),
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "answers took {:?}",
            killed.elapsed()
        );
        server.idle();
        drop(frontends);
    }
    server.no_frontends();
    back_to_baseline("server", pid, baseline);
}

// --- server side: HTTP CONNECT frontend -------------------------------------------------

/// A CONNECT client that hangs up while its dial is pending: the agent is
/// told (DIAL_CLS, or CLOSE_REQ for what it opened) whatever the order.
#[test]
fn a_connect_client_that_hangs_up_while_dialling_releases_everything() {
    let server = Server::start("http-connect");
    let pid = server.pid();
    let baseline = settled(pid);
    let mut agent = server.fake_agent("fake-agent");
    for round in 0..30i64 {
        let connect_id = 900 + round;
        let mut client = server.connect_request("10.0.0.1:443");
        let random = agent.dial_request();
        match round % 3 {
            // Before: the server notices the hang-up and cancels the dial.
            0 => {
                drop(client);
                agent.expect(
                    "DIAL_CLS for the hung-up client",
                    &Message::DialCls { random },
                );
                agent.send(dial_ok(random, connect_id));
                agent.expect(
                    "CLOSE_REQ for the orphan",
                    &Message::CloseReq { connect_id },
                );
            }
            // Racing.
            1 => {
                let barrier = Barrier::new(2);
                std::thread::scope(|s| {
                    s.spawn(|| {
                        barrier.wait();
                        let _ = client.shutdown(Shutdown::Both);
                    });
                    barrier.wait();
                    agent.send(dial_ok(random, connect_id));
                });
                agent.orphan_closed(random, connect_id);
            }
            // After: the client got its 200, then hangs up.
            _ => {
                agent.send(dial_ok(random, connect_id));
                let head = common::read_head(&mut client);
                assert_eq!(head, "HTTP/1.1 200 Connection Established\r\n\r\n");
                drop(client);
                agent.expect(
                    "CLOSE_REQ after the hang-up",
                    &Message::CloseReq { connect_id },
                );
            }
        }
        agent.send(close_rsp(connect_id));
        server.idle();
        wait_metric(server.health_port, HTTP_CONNS, 0.0);
    }
    agent.kill();
    back_to_baseline("server", pid, baseline);
}

fn data(connect_id: i64, bytes: &[u8]) -> Message {
    Message::Data {
        connect_id,
        error: String::new(),
        data: bytes.to_vec().into(),
    }
}

/// Reads exactly `want` from a tunnel's client.
fn expect_bytes(client: &mut UnixStream, want: &[u8], what: &str) {
    let mut got = vec![0u8; want.len()];
    client
        .read_exact(&mut got)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(got, want, "{what}");
}

/// A CONNECT tunnel's writer thread starts only when something has to wait
/// for it: data that comes while the client is being answered (right
/// behind the DIAL_RSP) or that the client's socket cannot take, and the
/// agent's close. Every byte arrives in order; an agent's CLOSE_RSP ends
/// the client's connection whether a writer ran or not; and an idle
/// tunnel that only ever had data its socket took at once holds one
/// thread on the server (its reader), not two.
#[test]
fn a_connect_tunnel_starts_its_writer_only_when_something_waits() {
    let server = Server::start("http-connect");
    let pid = server.pid();
    let mut agent = server.fake_agent("fake-agent");
    let baseline = settled(pid);
    const TUNNELS: i64 = 20;
    let mut clients = Vec::new();
    for i in 0..TUNNELS {
        let connect_id = 500 + i;
        let mut client = server.connect_request("10.0.0.1:22");
        let random = agent.dial_request();
        // Even tunnels: the destination speaks first, its greeting right
        // behind the DIAL_RSP (queued: the client is still being answered).
        if i % 2 == 0 {
            agent.send(dial_ok(random, connect_id));
            agent.send(data(connect_id, format!("greeting {i};").as_bytes()));
            assert_eq!(
                common::read_head(&mut client),
                "HTTP/1.1 200 Connection Established\r\n\r\n"
            );
            expect_bytes(&mut client, format!("greeting {i};").as_bytes(), "greeting");
        } else {
            agent.send(dial_ok(random, connect_id));
            assert_eq!(
                common::read_head(&mut client),
                "HTTP/1.1 200 Connection Established\r\n\r\n"
            );
        }
        client.write_all(b"ping").unwrap();
        agent.expect("the client's bytes", &data(connect_id, b"ping"));
        // Both kinds: an answer the client's socket takes at once.
        agent.send(data(connect_id, format!("pong {i}").as_bytes()));
        expect_bytes(&mut client, format!("pong {i}").as_bytes(), "pong");
        clients.push((connect_id, client));
    }
    // Odd tunnels never needed a writer: TUNNELS / 2 writers at most.
    let open = settled(pid);
    let per_tunnel = (open.0 - baseline.0) as f64 / TUNNELS as f64;
    assert!(
        per_tunnel <= 1.5 + 4.0 / TUNNELS as f64,
        "{} threads for {TUNNELS} tunnels ({per_tunnel:.2} each): {:?}",
        open.0 - baseline.0,
        thread_names(pid)
    );
    // The agent closes every tunnel: each client reads to EOF (some with a
    // writer running, some without).
    for (connect_id, client) in &mut clients {
        agent.send(close_rsp(*connect_id));
        let mut rest = Vec::new();
        client
            .read_to_end(&mut rest)
            .unwrap_or_else(|e| panic!("connection {connect_id}: {e}"));
        assert!(rest.is_empty(), "{rest:?}");
    }
    drop(clients);
    server.idle();
    wait_metric(server.health_port, HTTP_CONNS, 0.0);
    agent.kill();
    back_to_baseline("server", pid, baseline);
}

/// The same over mTLS TCP: a TLS client that closes (close_notify, FIN)
/// while its dial is pending cancels it at the agent.
#[test]
fn a_tls_connect_client_that_hangs_up_while_dialling_cancels_the_dial() {
    let server = Server::launch("http-connect", true, &[]);
    let mut agent = server.fake_agent("fake-agent");
    for round in 0..10i64 {
        let connect_id = 700 + round;
        let mut client = server.connect_request_tls("10.0.0.1:443");
        let random = agent.dial_request();
        if round % 2 == 0 {
            client.conn.send_close_notify();
            let _ = client.flush();
        }
        drop(client);
        agent.expect(
            "DIAL_CLS for the hung-up TLS client",
            &Message::DialCls { random },
        );
        agent.send(dial_ok(random, connect_id));
        agent.expect(
            "CLOSE_REQ for the orphan",
            &Message::CloseReq { connect_id },
        );
        agent.send(close_rsp(connect_id));
        server.idle();
    }
    server.no_frontends();
}

#[test]
fn an_agent_that_vanishes_fails_100_pending_connects_with_502() {
    let server = Server::start("http-connect");
    let pid = server.pid();
    let baseline = settled(pid);
    for round in 0..2 {
        let mut agent = server.fake_agent(&format!("fake-agent-{round}"));
        let mut clients: Vec<UnixStream> = (0..100)
            .map(|_| server.connect_request("10.0.0.1:443"))
            .collect();
        for _ in 0..100 {
            agent.dial_request();
        }
        assert_eq!(server.metric(PENDING), Some(100.0));
        let killed = Instant::now();
        agent.kill();
        for client in &mut clients {
            let head = common::read_head(client);
            assert!(head.starts_with("HTTP/1.1 502 "), "{head:?}");
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "answers took {:?}",
            killed.elapsed()
        );
        drop(clients);
        server.idle();
        wait_metric(server.health_port, HTTP_CONNS, 0.0);
    }
    server.no_frontends();
    back_to_baseline("server", pid, baseline);
}

// --- agent side ----------------------------------------------------------------------

/// A fake proxy-server (AgentService/Connect) for our proxy-agent: every
/// agent stream is handed to the test, which scripts it; the handler ends
/// the call when the test says so (or the test drops the whole server).
struct FakeServer {
    streams: Receiver<AgentStream>,
    _server: OurServer,
    port: u16,
}

struct AgentStream {
    call: Arc<ServerCall>,
    inbox: Inbox,
    end: mpsc::Sender<()>,
}

impl AgentStream {
    fn send(&self, message: Message) {
        self.call.send(&encode(message)).expect("server send");
    }

    fn next(&mut self, what: &str) -> Message {
        self.inbox
            .next(what)
            .unwrap_or_else(|| panic!("{what}: the agent's stream ended"))
    }

    /// A CLOSE_REQ for an id nobody uses, and its CLOSE_RSP: the agent's
    /// stream threads are all running (before a baseline is taken).
    fn round_trip(&mut self) {
        self.send(Message::CloseReq { connect_id: -1 });
        match self.next("the CLOSE_RSP for an unknown id") {
            Message::CloseRsp { connect_id: -1, .. } => {}
            other => panic!("expected CLOSE_RSP -1, got {other:?}"),
        }
    }

    /// The next message if one comes within `wait`.
    fn try_next(&mut self, wait: Duration) -> Option<Message> {
        match self.inbox.rx.recv_timeout(wait) {
            Ok(Some(m)) => Some(m),
            Ok(None) | Err(RecvTimeoutError::Disconnected) => panic!("the agent's stream ended"),
            Err(RecvTimeoutError::Timeout) => None,
        }
    }

    /// Ends the call from the server's side (the handler returns an error
    /// status: trailers, then the stream is gone).
    fn reset(self) {
        let _ = self.end.send(());
    }
}

impl FakeServer {
    fn start(certs: &Certs) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, streams) = mpsc::channel::<AgentStream>();
        let tx = Mutex::new(tx);
        let server = grpc::Server::new().route("/AgentService/Connect", move |call| {
            call.set_header("serverid", "fake-server");
            call.set_header("servercount", "1");
            if let Err(status) = call.send_headers() {
                return status;
            }
            let (end, ended) = mpsc::channel();
            let reader = call.clone();
            let inbox = Inbox::spawn(move || reader.recv());
            let stream = AgentStream {
                call: call.clone(),
                inbox,
                end,
            };
            if tx.lock().unwrap().send(stream).is_err() {
                return Status::new(grpc::Code::UNAVAILABLE, "test over");
            }
            // Until the test ends the stream (or drops it).
            let _ = ended.recv();
            Status::new(grpc::Code::UNAVAILABLE, "reset by the test")
        });
        let our = OurServer::start(Listener::Tcp(listener, certs.agent_server_tls()), server);
        FakeServer {
            streams,
            _server: our,
            port,
        }
    }

    fn next_stream(&self) -> AgentStream {
        self.streams
            .recv_timeout(DEADLINE)
            .expect("the agent connects")
    }
}

/// Our proxy-agent on a fake server.
struct Agent {
    proc: Logged,
    health_port: u16,
}

impl Agent {
    fn start(certs: &Certs, port: u16, extra: &[&str]) -> Agent {
        let mut args = vec![
            format!("--ca-cert={}", certs.path("agent/issued/ca.crt")),
            format!(
                "--agent-cert={}",
                certs.path("agent/issued/proxy-agent.crt")
            ),
            format!(
                "--agent-key={}",
                certs.path("agent/private/proxy-agent.key")
            ),
            "--proxy-server-host=127.0.0.1".into(),
            format!("--proxy-server-port={port}"),
            "--health-server-port=0".into(),
            "--admin-server-port=0".into(),
            "--health-server-host=127.0.0.1".into(),
            "--sync-interval=100ms".into(),
            "--sync-interval-cap=500ms".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proc = Logged::start(AGENT, &args);
        let health_port = proc.port("health port");
        Agent { proc, health_port }
    }

    fn pid(&self) -> u32 {
        self.proc.child.pid()
    }

    fn open_endpoints(&self) -> Option<f64> {
        metric(self.health_port, OPEN_ENDPOINTS)
    }
}

/// A destination whose connects hang: a listener with a full backlog that
/// never accepts (Linux then drops further SYNs). Killed on drop.
fn blackhole() -> (ChildGuard, u16) {
    let script = "import socket,time\n\
        s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(0)\n\
        print(s.getsockname()[1], flush=True)\n\
        held=[]\n\
        for _ in range(4):\n\
        \x20   c=socket.socket(); c.settimeout(0.3)\n\
        \x20   try:\n\
        \x20       c.connect(s.getsockname()); held.append(c)\n\
        \x20   except OSError:\n\
        \x20       c.close()\n\
        print('full', flush=True)\n\
        time.sleep(600)\n";
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script]).stdout(Stdio::piped());
    let mut child = ChildGuard::spawn(&mut cmd);
    let stdout = child.child.as_mut().unwrap().stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let port: u16 = lines.next().unwrap().unwrap().trim().parse().unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "full");
    (child, port)
}

/// A destination that accepts and records each connection; each accepted
/// socket is kept so the test can check it sees EOF.
fn recording_destination() -> (u16, Receiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            if tx.send(conn).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

/// Reads until EOF (the agent closed its side); fails on timeout.
fn expect_eof(mut conn: TcpStream, what: &str) {
    conn.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{what}: no EOF: {e}"),
        }
    }
}

/// DIAL_CLS and CLOSE_REQ while the agent's dial hangs on a blackhole:
/// nothing is announced, the dial thread ends, the gauge stays at 0.
#[test]
fn agent_dial_cls_while_the_dial_hangs() {
    let certs = Certs::new();
    let fake = FakeServer::start(&certs);
    let (_hole, hole) = blackhole();
    let agent = Agent::start(&certs, fake.port, &["--dial-timeout=2s"]);
    let mut stream = fake.next_stream();
    let pid = agent.pid();
    stream.round_trip();
    let baseline = settled(pid);
    let target = format!("127.0.0.1:{hole}");
    for round in 0..5i64 {
        let random = 300 + round;
        stream.send(dial_req(&target, random));
        // In flight: a dial thread more than the baseline.
        poll("the dial thread", DEADLINE, || {
            (resources(pid).0 > baseline.0).then_some(())
        });
        // A CLOSE_REQ for the id the dial would get is answered as unknown.
        stream.send(Message::CloseReq { connect_id: 1 });
        match stream.next("CLOSE_RSP for an unknown id") {
            Message::CloseRsp {
                connect_id: 1,
                error,
            } => assert!(!error.is_empty()),
            other => panic!("expected CLOSE_RSP, got {other:?}"),
        }
        stream.send(Message::DialCls { random });
        back_to_baseline("agent after the cancelled dial", pid, baseline);
        assert_eq!(agent.open_endpoints(), Some(0.0));
    }
    // The same dial id again while the cancelled dial still hangs (a
    // frontend reusing its random after DIAL_CLS): answered, not ignored.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    for round in 0..3i64 {
        let random = 400 + round;
        stream.send(dial_req(&target, random));
        poll("the dial thread", DEADLINE, || {
            (resources(pid).0 > baseline.0).then_some(())
        });
        stream.send(Message::DialCls { random });
        stream.send(dial_req(&format!("127.0.0.1:{closed_port}"), random));
        match stream.next("the answer to the reused dial id") {
            Message::DialRsp {
                random: r, error, ..
            } if r == random => {
                assert!(!error.is_empty(), "{error}")
            }
            other => panic!("expected DIAL_RSP {random}, got {other:?}"),
        }
        back_to_baseline("agent after the reused dial id", pid, baseline);
    }
    // Nothing was announced for the cancelled dials: the next packet is
    // the answer to a dial of a closed port.
    stream.send(dial_req(&format!("127.0.0.1:{closed_port}"), 999));
    match stream.next("the refused dial's answer") {
        Message::DialRsp {
            random: 999, error, ..
        } => assert!(!error.is_empty()),
        other => panic!("expected DIAL_RSP 999, got {other:?}"),
    }
}

/// DIAL_CLS racing a dial that succeeds at once: either the dial is
/// cancelled (no DIAL_RSP, the destination closed at once) or announced
/// (then the server's CLOSE_REQ closes it). Never both, never neither; the
/// destination always sees EOF and the gauge returns to 0.
#[test]
fn agent_dial_cls_racing_a_fast_dial() {
    let certs = Certs::new();
    let fake = FakeServer::start(&certs);
    let (port, accepted) = recording_destination();
    let agent = Agent::start(&certs, fake.port, &[]);
    let mut stream = fake.next_stream();
    let pid = agent.pid();
    stream.round_trip();
    let baseline = settled(pid);
    let target = format!("127.0.0.1:{port}");
    let (mut announced, mut cancelled) = (0, 0);
    for round in 0..50i64 {
        let random = 7_000 + round;
        stream.send(dial_req(&target, random));
        stream.send(Message::DialCls { random });
        let conn = accepted
            .recv_timeout(DEADLINE)
            .expect("the dial reaches the destination");
        // EOF at the destination, seen by a thread.
        let (eof_tx, eof) = mpsc::channel();
        std::thread::spawn(move || {
            expect_eof(conn, "the destination");
            let _ = eof_tx.send(());
        });
        // Either the DIAL_RSP comes, or the destination is closed unannounced.
        let end = Instant::now() + DEADLINE;
        let connect_id = loop {
            if let Some(m) = stream.try_next(Duration::from_millis(20)) {
                match m {
                    Message::DialRsp {
                        random: r,
                        error,
                        connect_id,
                    } if r == random => {
                        assert!(error.is_empty(), "{error}");
                        break Some(connect_id);
                    }
                    other => panic!("round {round}: unexpected at the server: {other:?}"),
                }
            }
            if eof.try_recv().is_ok() {
                break None;
            }
            assert!(
                Instant::now() < end,
                "round {round}: neither DIAL_RSP nor EOF"
            );
        };
        match connect_id {
            Some(connect_id) => {
                announced += 1;
                assert!(eof.try_recv().is_err(), "announced and closed");
                // What our proxy-server does for a DIAL_RSP it no longer wants.
                stream.send(Message::CloseReq { connect_id });
                stream.inbox.expect("CLOSE_RSP", &close_rsp(connect_id));
                eof.recv_timeout(DEADLINE).expect("EOF after CLOSE_REQ");
            }
            None => {
                cancelled += 1;
                // Nothing was announced: the answer to an unknown id comes
                // next, and no DIAL_RSP before it.
                let marker = 1_000_000 + round;
                stream.send(Message::CloseReq { connect_id: marker });
                match stream.next("the marker's answer") {
                    Message::CloseRsp { connect_id: m, .. } if m == marker => {}
                    other => panic!("round {round}: cancelled, yet {other:?}"),
                }
            }
        }
        poll("the gauge at 0", DEADLINE, || {
            (agent.open_endpoints() == Some(0.0)).then_some(())
        });
    }
    eprintln!("announced {announced}, cancelled {cancelled}");
    back_to_baseline("agent", pid, baseline);
}

/// 300 dials at once to a destination that accepts at once, half of them
/// cancelled right after their DIAL_REQ: every dial not cancelled is
/// announced, every announced connection is closed by CLOSE_REQ, every
/// cancelled one is closed unannounced, and the destination sees EOF on
/// all 300.
#[test]
fn agent_storm_of_dials_and_cancels() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let certs = Certs::new();
    let fake = FakeServer::start(&certs);
    let (port, accepted) = recording_destination();
    let agent = Agent::start(&certs, fake.port, &[]);
    let mut stream = fake.next_stream();
    let pid = agent.pid();
    stream.round_trip();
    let baseline = settled(pid);
    let target = format!("127.0.0.1:{port}");
    let total = 300i64;
    let eofs = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let eofs = eofs.clone();
        std::thread::spawn(move || {
            for _ in 0..total {
                let conn = accepted
                    .recv_timeout(DEADLINE)
                    .expect("every dial connects");
                let eofs = eofs.clone();
                std::thread::spawn(move || {
                    expect_eof(conn, "a stormed destination");
                    eofs.fetch_add(1, Ordering::SeqCst);
                });
            }
        })
    };
    for random in 1..=total {
        stream.send(dial_req(&target, random));
        if random % 2 == 0 {
            stream.send(Message::DialCls { random });
        }
    }
    let (mut announced, mut closed) = (HashSet::new(), 0usize);
    let end = Instant::now() + DEADLINE * 2;
    while eofs.load(Ordering::SeqCst) < total as usize
        || closed < announced.len()
        || (1..=total).step_by(2).any(|r| !announced.contains(&r))
    {
        assert!(
            Instant::now() < end,
            "stuck: {} announced, {closed} closed, {} EOF",
            announced.len(),
            eofs.load(Ordering::SeqCst)
        );
        match stream.try_next(Duration::from_millis(20)) {
            None => {}
            Some(Message::DialRsp {
                random,
                error,
                connect_id,
            }) => {
                assert!(error.is_empty(), "{error}");
                assert!(announced.insert(random), "dial {random} announced twice");
                stream.send(Message::CloseReq { connect_id });
            }
            Some(Message::CloseRsp { error, .. }) => {
                assert!(error.is_empty(), "{error}");
                closed += 1;
            }
            Some(other) => panic!("unexpected at the server: {other:?}"),
        }
    }
    watcher.join().unwrap();
    // Every CLOSE_REQ answered.
    while closed < announced.len() {
        match stream.next("the last CLOSE_RSPs") {
            Message::CloseRsp { .. } => closed += 1,
            other => panic!("unexpected at the server: {other:?}"),
        }
    }
    eprintln!(
        "{total} dials: {} announced, {} cancelled unannounced",
        announced.len(),
        total as usize - announced.len()
    );
    poll("the gauge at 0", DEADLINE, || {
        (agent.open_endpoints() == Some(0.0)).then_some(())
    });
    back_to_baseline("agent", pid, baseline);
}

/// 100 dials hang on a blackhole, then the server resets the stream: the
/// agent releases every dial, its gauge is 0, its threads and fds come
/// back, established destinations see EOF, and it reconnects.
#[test]
fn agent_stream_reset_with_100_dials_in_flight() {
    let certs = Certs::new();
    let fake = FakeServer::start(&certs);
    let (_hole, hole) = blackhole();
    let (port, accepted) = recording_destination();
    let agent = Agent::start(&certs, fake.port, &["--dial-timeout=10s"]);
    let pid = agent.pid();
    let mut stream = fake.next_stream();
    stream.round_trip();
    let baseline = settled(pid);
    for round in 0..2 {
        // Two established connections as well, to see them closed.
        let target = format!("127.0.0.1:{port}");
        let mut conns = Vec::new();
        for random in [1, 2] {
            stream.send(dial_req(&target, random));
            match stream.next("DIAL_RSP") {
                Message::DialRsp { error, .. } => assert!(error.is_empty(), "{error}"),
                other => panic!("expected DIAL_RSP, got {other:?}"),
            }
            conns.push(accepted.recv_timeout(DEADLINE).unwrap());
        }
        assert_eq!(agent.open_endpoints(), Some(2.0));
        let hole_target = format!("127.0.0.1:{hole}");
        for random in 0..100 {
            stream.send(dial_req(&hole_target, 1000 + random));
        }
        poll("100 dial threads", DEADLINE, || {
            (resources(pid).0 >= baseline.0 + 100).then_some(())
        });
        let reset = Instant::now();
        stream.reset();
        for conn in conns {
            expect_eof(conn, "an established destination");
        }
        // Reconnects without waiting for the dials to time out (10 s): the
        // 100 dial threads are still there when the new stream arrives.
        stream = fake.next_stream();
        eprintln!("round {round}: reconnected after {:?}", reset.elapsed());
        // (+90: the old stream's own threads are gone, the new one's may
        // not all be there yet.)
        assert!(
            resources(pid).0 >= baseline.0 + 90,
            "the agent reconnected only after its dials ended ({:?})",
            reset.elapsed()
        );
        back_to_baseline("agent", pid, baseline);
        assert_eq!(agent.open_endpoints(), Some(0.0));
        // The new stream starts clean: a dial gets connection id 1.
        stream.send(dial_req(&target, 5));
        match stream.next("DIAL_RSP on the new stream") {
            Message::DialRsp {
                error, connect_id, ..
            } => {
                assert!(error.is_empty(), "{error}");
                assert_eq!(connect_id, 1);
            }
            other => panic!("expected DIAL_RSP, got {other:?}"),
        }
        let conn = accepted.recv_timeout(DEADLINE).unwrap();
        stream.send(Message::CloseReq { connect_id: 1 });
        stream.inbox.expect("CLOSE_RSP", &close_rsp(1));
        expect_eof(conn, "the destination after CLOSE_REQ");
        back_to_baseline("agent", pid, baseline);
    }
}
