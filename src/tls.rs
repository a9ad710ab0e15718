//! TLS configuration from PEM files, for every role.
//!
//! Owns: the rustls configs (ring provider, TLS 1.2 and 1.3), PEM loading
//! (certificate chains; RSA PKCS#1, PKCS#8 and SEC1 EC keys), client
//! certificate verification against a CA file, and certificate reload.
//! Must not: touch sockets; callers wrap their streams in the connections
//! made from [`Reloader::server_config`] or [`client_config`].
//!
//! Reload: a server config is built once; its certificate resolver hands
//! out the current `Arc<CertifiedKey>`. Before each handshake it compares a
//! cheap `stat` of the certificate and key files (following symlinks, so the
//! `..data` swap of a mounted Kubernetes secret counts) with the last one it
//! loaded; on a change it loads the pair and swaps it in. A bad new pair
//! (unreadable, unparsable, mismatched) is logged once and the old pair kept.
//! Established connections are never touched. The client CA is read once at
//! start.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Everything that can go wrong building a TLS config.
#[derive(Debug)]
pub enum Error {
    /// A certificate file could not be read or parsed.
    Certificate { path: PathBuf, reason: String },
    /// A key file could not be read or parsed.
    Key { path: PathBuf, reason: String },
    /// The key does not belong to the certificate (or rustls cannot use it).
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    /// A CA bundle could not be read, parsed or used.
    Ca { path: PathBuf, reason: String },
    /// rustls refused the configuration.
    Config(rustls::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Certificate { path, reason } => {
                write!(f, "reading certificate {}: {reason}", path.display())
            }
            Error::Key { path, reason } => write!(f, "reading key {}: {reason}", path.display()),
            Error::Mismatch { cert, key, reason } => write!(
                f,
                "certificate {} and key {} do not form a usable pair: {reason}",
                cert.display(),
                key.display()
            ),
            Error::Ca { path, reason } => write!(f, "reading CA {}: {reason}", path.display()),
            Error::Config(err) => write!(f, "building TLS config: {err}"),
        }
    }
}

impl std::error::Error for Error {}

/// The one crypto provider of the crate: ring's, with its AES-128-GCM
/// suites preferred over AES-256-GCM, as Go's crypto/tls (upstream's
/// stack) orders them. Both sides of our own links (agent to server) then
/// use AES-128: 10 AES rounds a block instead of 14, the largest single
/// cost of a tunnel's bytes. Every suite stays offered.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| !format!("{:?}", suite.suite()).contains("AES_128"));
    Arc::new(provider)
}

fn pem_reason(err: rustls::pki_types::pem::Error) -> String {
    match err {
        rustls::pki_types::pem::Error::Io(err) => err.to_string(),
        other => format!("invalid PEM: {other:?}"),
    }
}

/// Every certificate in a PEM file, in order (leaf first for a chain).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let error = |reason: String| Error::Certificate {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(pem_reason(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(pem_reason(e)))?;
    if certs.is_empty() {
        return Err(error("no CERTIFICATE block found".to_string()));
    }
    Ok(certs)
}

/// The first private key in a PEM file: `RSA PRIVATE KEY` (PKCS#1),
/// `PRIVATE KEY` (PKCS#8) or `EC PRIVATE KEY` (SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| Error::Key {
        path: path.to_path_buf(),
        reason: match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no private key block found".to_string(),
            other => pem_reason(other),
        },
    })
}

/// A root store holding every certificate of a CA bundle.
pub fn load_roots(path: &Path) -> Result<RootCertStore, Error> {
    let certs = load_certs(path).map_err(|err| match err {
        Error::Certificate { path, reason } => Error::Ca { path, reason },
        other => other,
    })?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| Error::Ca {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Loads and checks a certificate chain and its key.
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, Error> {
    let chain = load_certs(cert)?;
    let der = load_key(key)?;
    CertifiedKey::from_der(chain, der, &provider()).map_err(|e| Error::Mismatch {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        reason: e.to_string(),
    })
}

/// What a file looked like when it was last loaded: enough to notice a
/// rewrite, a rename over it, or a symlink swap, without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stamp(path: &Path) -> io::Result<Stamp> {
    let m = fs::metadata(path)?;
    Ok(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

type ReloadHook = Box<dyn Fn(Result<(), &Error>) + Send + Sync>;

/// Hands out the current certificate and reloads it when its files change.
struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// The stamps of the files as last seen (loaded or rejected); also the
    /// lock that lets one handshake reload while others use the old pair.
    seen: Mutex<(Option<Stamp>, Option<Stamp>)>,
    hook: OnceLock<ReloadHook>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl CertStore {
    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reloads when the files changed since last seen; returns whether a new
    /// pair was swapped in.
    fn refresh(&self) -> bool {
        // Another thread is already checking: use the current pair.
        let Ok(mut seen) = self.seen.try_lock() else {
            return false;
        };
        let now = (stamp(&self.cert_path).ok(), stamp(&self.key_path).ok());
        if now == *seen {
            return false;
        }
        *seen = now;
        match load_pair(&self.cert_path, &self.key_path) {
            Ok(pair) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(pair);
                log::info!(
                    "reloaded certificate {} and key {}",
                    self.cert_path.display(),
                    self.key_path.display()
                );
                if let Some(hook) = self.hook.get() {
                    hook(Ok(()));
                }
                true
            }
            Err(err) => {
                // Often the first of two files of a rotation: the next
                // change (the second file) triggers another attempt.
                log::warn!("keeping the previous certificate: {err}");
                if let Some(hook) = self.hook.get() {
                    hook(Err(&err));
                }
                false
            }
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.refresh();
        Some(self.current())
    }
}

/// The files a TLS server is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With a CA, clients must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
    /// ALPN protocols offered, most preferred first (empty: no ALPN).
    pub alpn: Vec<Vec<u8>>,
}

/// A server config whose certificate follows its files. Clones share state.
#[derive(Clone)]
pub struct Reloader {
    config: Arc<ServerConfig>,
    store: Arc<CertStore>,
}

impl fmt::Debug for Reloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloader")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// Loads the pair (and CA) now, so that bad files fail at start.
    pub fn new(files: &ServerFiles) -> Result<Reloader, Error> {
        let first = (stamp(&files.cert).ok(), stamp(&files.key).ok());
        let pair = load_pair(&files.cert, &files.key)?;
        let store = Arc::new(CertStore {
            cert_path: files.cert.clone(),
            key_path: files.key.clone(),
            current: RwLock::new(Arc::new(pair)),
            seen: Mutex::new(first),
            hook: OnceLock::new(),
        });
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(Error::Config)?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = Arc::new(load_roots(ca)?);
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| Error::Ca {
                        path: ca.clone(),
                        reason: e.to_string(),
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(store.clone());
        config.alpn_protocols = files.alpn.clone();
        // The h2 transport encrypts records itself after the handshake
        // (crate::h2::records); the keys never leave the process.
        config.enable_secret_extraction = true;
        Ok(Reloader {
            config: Arc::new(config),
            store,
        })
    }

    /// The config for new connections (built once; the certificate inside
    /// is resolved per handshake).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// Checks the files now and reloads them if they changed; returns
    /// whether a new pair is in use. Handshakes call this on their own.
    pub fn refresh(&self) -> bool {
        self.store.refresh()
    }

    /// The DER leaf certificate currently served.
    pub fn current_leaf(&self) -> CertificateDer<'static> {
        // A CertifiedKey is only built from a non-empty chain (load_certs).
        self.store
            .current()
            .cert
            .first()
            .cloned()
            .unwrap_or_else(|| CertificateDer::from(Vec::new()))
    }

    /// Calls `hook` after every reload attempt (success or a kept old pair).
    /// Only the first hook set is kept.
    pub fn on_reload(&self, hook: impl Fn(Result<(), &Error>) + Send + Sync + 'static) {
        let _ = self.store.hook.set(Box::new(hook));
    }
}

/// A client config trusting `ca`, presenting `identity` (certificate, key)
/// when given. TLS 1.2 and 1.3.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<ClientConfig>, Error> {
    let roots = load_roots(ca)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(Error::Config)?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = load_certs(cert)?;
            let der = load_key(key)?;
            // Check the pair here for a clear error naming both files.
            load_pair(cert, key)?;
            builder
                .with_client_auth_cert(chain, der)
                .map_err(|e| Error::Mismatch {
                    cert: cert.to_path_buf(),
                    key: key.to_path_buf(),
                    reason: e.to_string(),
                })?
        }
    };
    config.alpn_protocols = alpn;
    // As for servers: the h2 transport's record layer takes the keys.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// A file of this repository's `tests/data` (test certificates), for unit
/// tests and fuzz targets. Not for the binaries.
#[doc(hidden)]
pub fn test_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// A server config (ALPN h2) from a `tests/data` pair, for unit tests and
/// fuzz targets.
#[doc(hidden)]
pub fn test_server_config(cert: &str, key: &str) -> Result<Arc<ServerConfig>, Error> {
    Reloader::new(&ServerFiles {
        cert: test_data(cert),
        key: test_data(key),
        client_ca: None,
        alpn: vec![b"h2".to_vec()],
    })
    .map(|r| r.server_config())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(name: &str) -> PathBuf {
        test_data(name)
    }

    #[test]
    fn aes_128_gcm_is_preferred_and_every_suite_stays() {
        let names: Vec<String> = provider()
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert_eq!(names[0], "TLS13_AES_128_GCM_SHA256", "{names:?}");
        assert_eq!(
            names.len(),
            rustls::crypto::ring::default_provider().cipher_suites.len()
        );
        let first_13_256 = names.iter().position(|n| n == "TLS13_AES_256_GCM_SHA384");
        assert!(first_13_256.is_some(), "{names:?}");
    }

    #[test]
    fn every_key_format_loads() {
        for key in ["server-pkcs1.key", "server.key", "server-ec.key"] {
            let cert = if key == "server-ec.key" {
                "server-ec.crt"
            } else {
                "server.crt"
            };
            load_pair(&data(cert), &data(key)).unwrap_or_else(|e| panic!("{key}: {e}"));
        }
    }

    #[test]
    fn mismatched_and_missing_files_are_named() {
        let err = load_pair(&data("server.crt"), &data("server-ec.key")).unwrap_err();
        assert!(
            err.to_string().contains("do not form a usable pair"),
            "{err}"
        );
        let err = load_pair(&data("nope.crt"), &data("server.key")).unwrap_err();
        assert!(err.to_string().starts_with("reading certificate"), "{err}");
        assert!(err.to_string().contains("nope.crt"), "{err}");
        let err = load_key(&data("server.crt")).unwrap_err();
        assert!(err.to_string().contains("no private key"), "{err}");
        let err = load_certs(&data("server.key")).unwrap_err();
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");
    }

    #[test]
    fn server_and_client_configs_build() {
        let files = ServerFiles {
            cert: data("server.crt"),
            key: data("server.key"),
            client_ca: Some(data("ca.crt")),
            alpn: vec![b"http/1.1".to_vec()],
        };
        let reloader = Reloader::new(&files).unwrap();
        assert!(!reloader.refresh(), "unchanged files must not reload");
        client_config(
            &data("ca.crt"),
            Some((&data("client.crt"), &data("client.key"))),
            vec![],
        )
        .unwrap();
        client_config(&data("ca.crt"), None, vec![]).unwrap();
    }
}
