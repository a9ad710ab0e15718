//! Scaffolding shared by the gRPC interop tests (grpcio and grpc-go):
//! temporary directories, TLS configs from PEM files, deterministic payloads,
//! and our gRPC server on a TCP (mTLS) or Unix listener.

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apiserver_proxy::grpc;
use apiserver_proxy::h2::{self, TlsSetup, Transport};
use apiserver_proxy::shutdown::Worker;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Socket timeouts of the test connections.
pub const IO_TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(super::unique(prefix));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// proxy-server's agent-side certificate flags (`--cluster-*`) for the
/// certificates `make_certs` wrote; `cert` turns a path in upstream's
/// layout into a full one.
#[allow(dead_code)]
pub fn cluster_flags(cert: &dyn Fn(&str) -> String) -> Vec<String> {
    vec![
        format!("--cluster-cert={}", cert("agent/issued/proxy-frontend.crt")),
        format!("--cluster-key={}", cert("agent/private/proxy-frontend.key")),
        format!("--cluster-ca-cert={}", cert("agent/issued/ca.crt")),
    ]
}

/// proxy-server's mTLS frontend flags (`--server-*`), as [`cluster_flags`].
#[allow(dead_code)]
pub fn frontend_flags(cert: &dyn Fn(&str) -> String) -> Vec<String> {
    vec![
        format!(
            "--server-cert={}",
            cert("frontend/issued/proxy-frontend.crt")
        ),
        format!(
            "--server-key={}",
            cert("frontend/private/proxy-frontend.key")
        ),
        format!("--server-ca-cert={}", cert("frontend/issued/ca.crt")),
    ]
}

/// Writes certificates in upstream Konnectivity's layout into `dir` with
/// the project's own scripts/make-certs.sh (openssl).
pub fn make_certs(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-certs.sh");
    let out = std::process::Command::new(script)
        .arg(dir)
        .output()
        .expect("run make-certs.sh");
    assert!(
        out.status.success(),
        "make-certs.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::ring::default_provider().into()
}

pub fn pem_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(|c| c.unwrap())
        .collect()
}

fn roots(ca: &Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(ca) {
        roots.add(c).unwrap();
    }
    roots
}

/// A server config (ALPN h2) that requires client certificates from `ca`.
pub fn server_tls(ca: &Path, cert: &Path, key: &Path) -> Arc<rustls::ServerConfig> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca).into(), provider())
            .build()
            .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(pem_certs(cert), PrivateKeyDer::from_pem_file(key).unwrap())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A client config (ALPN h2) trusting `ca`, presenting `cert`/`key`.
pub fn client_tls(ca: &Path, cert: &Path, key: &Path) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca))
        .with_client_auth_cert(pem_certs(cert), PrivateKeyDer::from_pem_file(key).unwrap())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Deterministic bytes to send (xorshift), sliced at varying offsets.
pub fn pool(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a, to compare what was sent with what came back.
pub fn fnv(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash = (*hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
}

/// Where our test server listens.
pub enum Listener {
    Tcp(TcpListener, Arc<rustls::ServerConfig>),
    Unix(UnixListener, PathBuf),
}

/// Our gRPC server on a listener, each connection on its own thread, until
/// dropped.
pub struct OurServer {
    stop: Arc<AtomicBool>,
    wake: Box<dyn Fn()>,
    acceptor: Option<Worker>,
}

impl OurServer {
    pub fn start(listener: Listener, server: grpc::Server) -> OurServer {
        let stop = Arc::new(AtomicBool::new(false));
        let wake: Box<dyn Fn()> = match &listener {
            Listener::Tcp(l, _) => {
                let addr = l.local_addr().unwrap();
                Box::new(move || drop(TcpStream::connect(addr)))
            }
            Listener::Unix(_, path) => {
                let path = path.clone();
                Box::new(move || drop(UnixStream::connect(&path)))
            }
        };
        let s = stop.clone();
        let acceptor = Worker::spawn("acceptor", move || {
            let conns: Arc<Mutex<Vec<h2::Closer>>> = Arc::default();
            let mut workers = Vec::new();
            loop {
                let transport = match &listener {
                    Listener::Tcp(l, tls) => {
                        let (sock, _) = l.accept().unwrap();
                        if s.load(Ordering::SeqCst) {
                            break;
                        }
                        let conn = TlsSetup::Server(tls.clone());
                        Transport::tls(sock, conn, IO_TIMEOUT, IO_TIMEOUT)
                    }
                    Listener::Unix(l, _) => {
                        let (sock, _) = l.accept().unwrap();
                        if s.load(Ordering::SeqCst) {
                            break;
                        }
                        Transport::plain(sock, IO_TIMEOUT, IO_TIMEOUT)
                    }
                };
                let transport = match transport {
                    Ok(t) => t,
                    Err(err) => {
                        eprintln!("server transport: {err}");
                        continue;
                    }
                };
                let server = server.clone();
                let conns = conns.clone();
                workers.push(
                    Worker::spawn("conn", move || {
                        let conn =
                            h2::Connection::server(transport, h2::Config::default()).unwrap();
                        conns.lock().unwrap().push(conn.closer());
                        server.serve(&conn);
                    })
                    .unwrap(),
                );
            }
            for c in conns.lock().unwrap().iter() {
                c.close();
            }
            drop(workers);
        })
        .unwrap();
        OurServer {
            stop,
            wake,
            acceptor: Some(acceptor),
        }
    }
}

impl Drop for OurServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        (self.wake)();
        drop(self.acceptor.take());
    }
}
