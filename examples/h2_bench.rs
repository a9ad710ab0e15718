//! Throughput and latency of one gRPC stream over TLS on loopback, next to
//! the same transfer over a bare rustls stream (no HTTP/2), as ratios.
//! Reports, asserts nothing.
//!
//! ```sh
//! cargo run --release --example h2_bench            # 1 GiB, 20000 round trips
//! cargo run --release --example h2_bench -- 4096 50000
//! ```
//! Arguments: MiB to send, round trips. Needs the openssl CLI (test certs).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apiserver_proxy::grpc::{self, ServerCall, Status};
use apiserver_proxy::h2::{self, Transport};
use apiserver_proxy::shutdown::Worker;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const MESSAGE: usize = 16 * 1024;
const SMALL: usize = 100;
const TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let dir = std::env::temp_dir().join(format!("h2-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    make_certs(&dir);
    let (server_cfg, client_cfg) = (server_tls(&dir), client_tls(&dir));
    let bytes = mib << 20;

    let tls_tput = bare_tls_throughput(&server_cfg, &client_cfg, bytes);
    let grpc_tput = grpc_throughput(&server_cfg, &client_cfg, bytes);
    let tls_lat = bare_tls_latency(&server_cfg, &client_cfg, rounds);
    let grpc_lat = grpc_latency(&server_cfg, &client_cfg, rounds);
    let _ = std::fs::remove_dir_all(&dir);

    println!("one stream, TLS 1.3 on loopback, {MESSAGE}-byte messages, {mib} MiB:");
    println!("  bare rustls         {:8.3} GB/s", tls_tput);
    println!(
        "  gRPC over our h2    {:8.3} GB/s   ratio {:.2}",
        grpc_tput,
        grpc_tput / tls_tput
    );
    println!("{SMALL}-byte round trip, median of {rounds}:");
    println!(
        "  bare rustls         {:8.1} us",
        tls_lat.as_secs_f64() * 1e6
    );
    println!(
        "  gRPC over our h2    {:8.1} us   ratio {:.2}",
        grpc_lat.as_secs_f64() * 1e6,
        grpc_lat.as_secs_f64() / tls_lat.as_secs_f64()
    );
}

fn gbps(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e9
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

// --- bare rustls ----------------------------------------------------------------

fn bare_pair(
    server_cfg: &Arc<rustls::ServerConfig>,
    client_cfg: &Arc<rustls::ClientConfig>,
) -> (
    rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
    rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = server_cfg.clone();
    let accept = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        sock.set_nodelay(true).unwrap();
        rustls::StreamOwned::new(rustls::ServerConnection::new(cfg).unwrap(), sock)
    });
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_nodelay(true).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let client = rustls::StreamOwned::new(
        rustls::ClientConnection::new(client_cfg.clone(), name).unwrap(),
        sock,
    );
    (accept.join().unwrap(), client)
}

fn bare_tls_throughput(
    s: &Arc<rustls::ServerConfig>,
    c: &Arc<rustls::ClientConfig>,
    bytes: usize,
) -> f64 {
    let (mut server, mut client) = bare_pair(s, c);
    let reader = Worker::spawn("bare-reader", move || {
        let mut buf = vec![0; 64 * 1024];
        let mut got = 0;
        while got < bytes {
            got += server.read(&mut buf).unwrap();
        }
        server.write_all(b"k").unwrap();
        server.flush().unwrap();
    })
    .unwrap();
    let chunk = vec![7u8; MESSAGE];
    let start = Instant::now();
    for _ in 0..bytes / MESSAGE {
        client.write_all(&chunk).unwrap();
    }
    client.flush().unwrap();
    let mut ack = [0u8; 1];
    client.read_exact(&mut ack).unwrap();
    let took = start.elapsed();
    reader.join();
    gbps(bytes, took)
}

fn bare_tls_latency(
    s: &Arc<rustls::ServerConfig>,
    c: &Arc<rustls::ClientConfig>,
    rounds: usize,
) -> Duration {
    let (mut server, mut client) = bare_pair(s, c);
    let echo = Worker::spawn("bare-echo", move || {
        let mut buf = [0u8; SMALL];
        for _ in 0..rounds {
            server.read_exact(&mut buf).unwrap();
            server.write_all(&buf).unwrap();
            server.flush().unwrap();
        }
    })
    .unwrap();
    let mut buf = [1u8; SMALL];
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        client.write_all(&buf).unwrap();
        client.flush().unwrap();
        client.read_exact(&mut buf).unwrap();
        samples.push(start.elapsed());
    }
    echo.join();
    median(samples)
}

// --- gRPC over our HTTP/2 -----------------------------------------------------------

/// Our server (sink and echo methods) on loopback TLS, and a client on it.
fn grpc_pair(
    s: &Arc<rustls::ServerConfig>,
    c: &Arc<rustls::ClientConfig>,
) -> (Worker, grpc::Client) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = s.clone();
    let server = Worker::spawn("bench-server", move || {
        let (sock, _) = listener.accept().unwrap();
        let t = Transport::tls(sock, h2::TlsSetup::Server(cfg), TIMEOUT, TIMEOUT).unwrap();
        let conn = h2::Connection::server(t, h2::Config::default()).unwrap();
        grpc::Server::new()
            .route("/Bench/Sink", sink)
            .route("/Bench/Echo", echo)
            .serve(&conn);
    })
    .unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = h2::TlsSetup::Client(c.clone(), name);
    let t = Transport::tls(sock, tls, TIMEOUT, TIMEOUT).unwrap();
    let conn = h2::Connection::client(t, h2::Config::default()).unwrap();
    (server, grpc::Client::new(conn, "localhost"))
}

fn sink(call: &Arc<ServerCall>) -> Status {
    let mut got = 0u64;
    while let Ok(Some(msg)) = call.recv() {
        got += msg.len() as u64;
    }
    match call.send(&got.to_be_bytes()) {
        Ok(()) => Status::ok(),
        Err(status) => status,
    }
}

fn echo(call: &Arc<ServerCall>) -> Status {
    while let Ok(Some(msg)) = call.recv() {
        if let Err(status) = call.send(&msg) {
            return status;
        }
    }
    Status::ok()
}

fn grpc_throughput(
    s: &Arc<rustls::ServerConfig>,
    c: &Arc<rustls::ClientConfig>,
    bytes: usize,
) -> f64 {
    let (_server, client) = grpc_pair(s, c);
    let call = client.call("/Bench/Sink", &[]).unwrap();
    let chunk = vec![7u8; MESSAGE];
    let start = Instant::now();
    for _ in 0..bytes / MESSAGE {
        call.send(&chunk).unwrap();
    }
    call.close_send().unwrap();
    let got = call.recv().unwrap().unwrap();
    let took = start.elapsed();
    assert_eq!(
        u64::from_be_bytes(got.try_into().unwrap()),
        (bytes / MESSAGE * MESSAGE) as u64
    );
    gbps(bytes, took)
}

fn grpc_latency(
    s: &Arc<rustls::ServerConfig>,
    c: &Arc<rustls::ClientConfig>,
    rounds: usize,
) -> Duration {
    let (_server, client) = grpc_pair(s, c);
    let call = client.call("/Bench/Echo", &[]).unwrap();
    let msg = [1u8; SMALL];
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        call.send(&msg).unwrap();
        call.recv().unwrap().unwrap();
        samples.push(start.elapsed());
    }
    call.close_send().unwrap();
    assert_eq!(call.recv().unwrap(), None);
    median(samples)
}

// --- certificates -------------------------------------------------------------

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl CLI");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_certs(dir: &Path) {
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca_key, ca_crt) = (p("ca.key"), p("ca.crt"));
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_crt,
        "-days",
        "1",
        "-subj",
        "/CN=bench-ca",
    ]);
    args.extend([
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    openssl(&args);
    for (name, ext) in [
        (
            "server",
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
        ),
        (
            "client",
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
        args.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"]);
        openssl(&args);
        openssl(&[
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
            "1",
            "-extfile",
            &extfile,
        ]);
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::ring::default_provider().into()
}

fn load_certs(path: PathBuf) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(|c| c.unwrap())
        .collect()
}

fn roots(dir: &Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(dir.join("ca.crt")) {
        roots.add(c).unwrap();
    }
    roots
}

fn server_tls(dir: &Path) -> Arc<rustls::ServerConfig> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(dir).into(), provider())
            .build()
            .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            load_certs(dir.join("server.crt")),
            PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

fn client_tls(dir: &Path) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(dir))
        .with_client_auth_cert(
            load_certs(dir.join("client.crt")),
            PrivateKeyDer::from_pem_file(dir.join("client.key")).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}
