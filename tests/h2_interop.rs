//! Interop of our HTTP/2 + gRPC layers with a real gRPC implementation
//! (Python grpcio, i.e. gRPC C-core), both ways, over mTLS TCP and over h2c
//! on a Unix socket. The peers live in tests/peers/*.py; the schema in
//! tests/proto/konnectivity.proto is compiled at test time.
//!
//! Needs APISERVER_PROXY_PYTHON (a venv with grpcio, grpcio-tools,
//! protobuf), which `make integration` provides.

mod common;

use common::interop::{self, Listener, OurServer, TempDir, fnv, pool};

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use apiserver_proxy::grpc::{self, Code, ServerCall, Status};
use apiserver_proxy::h2::{self, TlsSetup, Transport};
use apiserver_proxy::tunnel::proto::{Packet, Payload};
use common::{ChildGuard, run_ok};
use prost::Message;
use rustls::pki_types::ServerName;

const STREAMS: usize = 3;
const MIB_PER_STREAM: usize = 64;
const ERROR_MESSAGE: &str = "boom: 100% \u{fc}n\u{ef}code\nline two";
const SIZES: [usize; 9] = [
    1,
    7,
    100,
    1000,
    16384,
    16385,
    65536,
    1 << 20,
    4 * 1024 * 1024 - 64,
];
const IO_TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));

fn python() -> String {
    std::env::var("APISERVER_PROXY_PYTHON").expect(
        "APISERVER_PROXY_PYTHON is not set: run the suite with `make integration`, \
         which creates the grpcio venv first",
    )
}

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// Compiles the schema with grpc_tools.protoc into `dir/schema`.
fn compile_schema(dir: &TempDir) -> PathBuf {
    let out = dir.path("schema");
    std::fs::create_dir_all(&out).unwrap();
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/proto");
    let out_s = out.to_str().unwrap();
    run_ok(
        &python(),
        &[
            "-m",
            "grpc_tools.protoc",
            &format!("-I{}", proto.display()),
            &format!("--python_out={out_s}"),
            &format!("--grpc_python_out={out_s}"),
            proto.join("konnectivity.proto").to_str().unwrap(),
        ],
    );
    out
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client
/// certificate, made with the openssl CLI.
fn make_certs(dir: &TempDir) -> PathBuf {
    let d = dir.path("certs");
    std::fs::create_dir_all(&d).unwrap();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    let (ca_key, ca_crt) = (p("ca.key"), p("ca.crt"));
    args.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_crt,
        "-days",
        "2",
        "-subj",
        "/CN=h2-interop-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run_ok("openssl", &args);
    for (name, cn, ext) in [
        (
            "server",
            "localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
        ),
        (
            "client",
            "agent-1",
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
        ),
    ] {
        let (key, csr, crt, extfile) = (
            p(&format!("{name}.key")),
            p(&format!("{name}.csr")),
            p(&format!("{name}.crt")),
            p(&format!("{name}.ext")),
        );
        std::fs::write(&extfile, ext).unwrap();
        let mut args = vec!["req"];
        args.extend(ec);
        let subj = format!("/CN={cn}");
        args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        run_ok("openssl", &args);
        run_ok(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ],
        );
    }
    d
}

/// Our test certificates: `ca.crt`, `server.*` and `client.*` in one folder.
fn server_tls(d: &Path) -> Arc<rustls::ServerConfig> {
    interop::server_tls(
        &d.join("ca.crt"),
        &d.join("server.crt"),
        &d.join("server.key"),
    )
}

fn client_tls(d: &Path) -> Arc<rustls::ClientConfig> {
    interop::client_tls(
        &d.join("ca.crt"),
        &d.join("client.crt"),
        &d.join("client.key"),
    )
}

/// Reads the child's stdout until a line starting with `prefix`.
fn wait_line(child: &mut ChildGuard, prefix: &str) -> String {
    let stdout = child.child.as_mut().unwrap().stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let prefix = prefix.to_string();
    // The reader ends when the child dies (ChildGuard kills it on drop).
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with(&prefix) {
                let _ = tx.send(line);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("peer did not start within 60s")
}

// --- our server ---------------------------------------------------------------

/// The echo service of tests/peers/echo_server.py, written on our server.
fn echo_handler(cancelled: Arc<AtomicBool>) -> impl Fn(&Arc<ServerCall>) -> Status + Send + Sync {
    move |call| {
        call.set_header("serverid", "rust-server");
        call.set_header("servercount", "3");
        let agent = call.metadata().get("agentid").unwrap_or("").to_string();
        call.set_header("x-agentid", &agent);
        loop {
            let packet = match call.recv_msg::<Packet>() {
                Ok(Some(p)) => p,
                Ok(None) => return Status::ok(),
                Err(status) => {
                    if status.code == Code::CANCELLED {
                        cancelled.store(true, Ordering::SeqCst);
                    }
                    return status;
                }
            };
            let reply = match &packet.payload {
                Some(Payload::DialRequest(d)) if d.address == "error" => {
                    return Status::new(Code::INVALID_ARGUMENT, ERROR_MESSAGE);
                }
                Some(Payload::DialRequest(d)) if d.address == "big" => {
                    Packet::data(1, vec![0; 5 << 20])
                }
                Some(Payload::DialRequest(d)) if d.address == "cancelled?" => {
                    let yes = if cancelled.load(Ordering::SeqCst) {
                        "yes"
                    } else {
                        "no"
                    };
                    Packet::dial_response(0, 0, yes)
                }
                _ => packet,
            };
            if let Err(status) = call.send_msg(&reply) {
                return status;
            }
        }
    }
}

/// Our server with the echo service on the path grpcio's peer calls.
fn echo_server() -> grpc::Server {
    grpc::Server::new().route(
        "/ProxyService/Proxy",
        echo_handler(Arc::new(AtomicBool::new(false))),
    )
}

fn run_grpcio_client(schema: &Path, target: &str, certs: Option<&Path>) {
    let certs = certs
        .map(|c| c.to_str().unwrap().to_string())
        .unwrap_or("-".into());
    let mut child = ChildGuard::spawn(
        Command::new(python())
            .arg(peers_dir().join("echo_client.py"))
            .args([
                schema.to_str().unwrap(),
                target,
                &certs,
                &STREAMS.to_string(),
                &MIB_PER_STREAM.to_string(),
            ])
            .env("PYTHONPATH", peers_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let out = child.wait_output(Duration::from_secs(600));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(
        out.status.success() && stdout.contains("PASS"),
        "grpcio client failed:\n{stdout}\n{stderr}"
    );
}

#[test]
fn grpcio_client_to_our_server_over_mtls() {
    let dir = TempDir::new("h2-interop-");
    let schema = compile_schema(&dir);
    let certs = make_certs(&dir);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let _server = OurServer::start(Listener::Tcp(listener, server_tls(&certs)), echo_server());
    run_grpcio_client(&schema, &format!("127.0.0.1:{port}"), Some(&certs));
}

#[test]
fn grpcio_client_to_our_server_over_uds() {
    let dir = TempDir::new("h2-interop-");
    let schema = compile_schema(&dir);
    let path = dir.path("server.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let _server = OurServer::start(Listener::Unix(listener, path.clone()), echo_server());
    run_grpcio_client(&schema, &format!("unix:{}", path.display()), None);
}

// --- our client ---------------------------------------------------------------

fn echo_stream(client: &grpc::Client, index: i64, pool: &[u8]) {
    let agent = format!("agent-{index}");
    let call = client
        .call(
            "/ProxyService/Proxy",
            &[
                ("agentid", &agent),
                ("agentidentifiers", "host=n1&ipv4=1.2.3.4"),
            ],
        )
        .unwrap();
    let total = MIB_PER_STREAM << 20;
    let (mut sent_hash, mut got_hash) = (0xcbf2_9ce4_8422_2325u64, 0xcbf2_9ce4_8422_2325u64);
    let mut received = 0;
    std::thread::scope(|scope| {
        let call = &call;
        let sender = scope.spawn(move || {
            let (mut n, mut i) = (0, 0);
            while n < total {
                let size = SIZES[i % SIZES.len()].min(total - n);
                let off = (i * 977 + index as usize) % 4096;
                let chunk = &pool[off..off + size];
                fnv(&mut sent_hash, chunk);
                call.send_msg(&Packet::data(index, chunk.to_vec())).unwrap();
                n += size;
                i += 1;
            }
            call.close_send().unwrap();
            sent_hash
        });
        let headers = call.headers().unwrap();
        assert_eq!(headers.get("serverid"), Some("py-server"));
        assert_eq!(headers.get("servercount"), Some("1"));
        assert_eq!(headers.get("x-agentid"), Some(agent.as_str()));
        while let Some(packet) = call.recv_msg::<Packet>().unwrap() {
            let Some(Payload::Data(d)) = packet.payload else {
                panic!("not DATA: {packet:?}")
            };
            assert_eq!(d.connect_id, index);
            fnv(&mut got_hash, &d.data);
            received += d.data.len();
        }
        sent_hash = sender.join().unwrap();
    });
    assert_eq!(received, total);
    assert_eq!(sent_hash, got_hash, "echoed bytes differ on stream {index}");
}

fn one_packet(client: &grpc::Client, packet: &Packet) -> Result<Vec<Packet>, Status> {
    let call = client.call("/ProxyService/Proxy", &[])?;
    call.send_msg(packet)?;
    call.close_send()?;
    let mut out = Vec::new();
    while let Some(p) = call.recv_msg::<Packet>()? {
        out.push(p);
    }
    Ok(out)
}

fn drive_grpcio_server(conn: h2::Connection) {
    let client = grpc::Client::new(conn, "localhost");
    let pool = pool(SIZES[8] + 4096);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for index in 1..=STREAMS as i64 {
            let (client, pool) = (&client, &pool);
            scope.spawn(move || echo_stream(client, index, pool));
        }
    });
    eprintln!(
        "echo: {STREAMS} x {MIB_PER_STREAM} MiB each way in {:?}",
        start.elapsed()
    );

    let err = one_packet(&client, &Packet::dial_request("tcp", "error", 0)).unwrap_err();
    assert_eq!(err, Status::new(Code::INVALID_ARGUMENT, ERROR_MESSAGE));
    // Larger than 4 MiB both ways: each receiver refuses it.
    let err = one_packet(&client, &Packet::dial_request("tcp", "big", 0)).unwrap_err();
    assert_eq!(err.code, Code::RESOURCE_EXHAUSTED, "{err}");
    let err = one_packet(&client, &Packet::data(1, vec![0; 5 << 20])).unwrap_err();
    assert_eq!(err.code, Code::RESOURCE_EXHAUSTED, "{err}");

    // Cancel a call mid-stream; the server must notice.
    let call = client.call("/ProxyService/Proxy", &[]).unwrap();
    call.send_msg(&Packet::data(9, b"x".to_vec())).unwrap();
    assert_eq!(
        call.recv_msg::<Packet>().unwrap().unwrap(),
        Packet::data(9, b"x".to_vec())
    );
    call.cancel();
    assert_eq!(call.recv().unwrap_err().code, Code::CANCELLED);
    drop(call);
    common::poll(
        "the server to see the cancellation",
        Duration::from_secs(20),
        || {
            let answer =
                one_packet(&client, &Packet::dial_request("tcp", "cancelled?", 0)).unwrap();
            match &answer[0].payload {
                Some(Payload::DialResponse(r)) if r.error == "yes" => Some(()),
                _ => None,
            }
        },
    );
    // The connection is still healthy and ends cleanly.
    assert_eq!(
        one_packet(&client, &Packet::close_request(1)).unwrap(),
        vec![Packet::close_request(1)]
    );
    client.connection().goaway();
    assert!(
        client
            .connection()
            .wait_closed(Some(Duration::from_secs(10)))
            .is_some()
    );
}

fn start_grpcio_server(
    schema: &Path,
    mode: &str,
    address: &str,
    certs: &str,
) -> (ChildGuard, String) {
    let mut child = ChildGuard::spawn(
        Command::new(python())
            .arg(peers_dir().join("echo_server.py"))
            .args([schema.to_str().unwrap(), mode, address, certs])
            .env("PYTHONPATH", peers_dir())
            .stdout(Stdio::piped()),
    );
    let line = wait_line(&mut child, if mode == "tls" { "PORT" } else { "READY" });
    (child, line)
}

#[test]
fn our_client_to_grpcio_server_over_mtls() {
    let dir = TempDir::new("h2-interop-");
    let schema = compile_schema(&dir);
    let certs = make_certs(&dir);
    let (_child, line) =
        start_grpcio_server(&schema, "tls", "127.0.0.1:0", certs.to_str().unwrap());
    let port: u16 = line.trim_start_matches("PORT ").parse().unwrap();
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = TlsSetup::Client(client_tls(&certs), name);
    let transport = Transport::tls(sock, tls, IO_TIMEOUT, IO_TIMEOUT).unwrap();
    drive_grpcio_server(h2::Connection::client(transport, h2::Config::default()).unwrap());
}

#[test]
fn our_client_to_grpcio_server_over_uds() {
    let dir = TempDir::new("h2-interop-");
    let schema = compile_schema(&dir);
    let path = dir.path("py.sock");
    let (_child, _) = start_grpcio_server(&schema, "uds", &format!("unix:{}", path.display()), "-");
    let sock = UnixStream::connect(&path).unwrap();
    let transport = Transport::plain(sock, IO_TIMEOUT, IO_TIMEOUT).unwrap();
    drive_grpcio_server(h2::Connection::client(transport, h2::Config::default()).unwrap());
}

/// The Python protobuf runtime and our prost derives agree byte for byte.
#[test]
fn packets_match_python_protobuf() {
    let dir = TempDir::new("h2-interop-");
    let schema = compile_schema(&dir);
    let out = run_ok(
        &python(),
        &[
            peers_dir().join("golden_packets.py").to_str().unwrap(),
            schema.to_str().unwrap(),
        ],
    );
    let ours = [
        ("dial_req", Packet::dial_request("tcp", "10.0.0.1:443", 42)),
        (
            "dial_req_negative",
            Packet::dial_request("tcp", "[::1]:6443", -1),
        ),
        ("dial_rsp_ok", Packet::dial_response(42, 7, "")),
        (
            "dial_rsp_err",
            Packet::dial_response(-5, 0, "connection refused"),
        ),
        ("data", Packet::data(7, b"\x00\x01hello\xff".to_vec())),
        ("data_empty", Packet::data(0, Vec::new())),
        ("close_req", Packet::close_request(9_000_000_000)),
        ("close_rsp", Packet::close_response(3, "unknown connectID")),
        ("dial_cls", Packet::close_dial(i64::MAX)),
        ("drain", Packet::drain()),
        ("empty", Packet::default()),
    ];
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), ours.len());
    for (line, (name, packet)) in lines.iter().zip(ours) {
        let hex: String = packet
            .encode_to_vec()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            line.trim_end(),
            format!("{name} {hex}").trim_end(),
            "{name}"
        );
    }
}
