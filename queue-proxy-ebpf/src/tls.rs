//! The TLS listener of the serving port (knative-contract.md A.2): started when both
//! `tls.crt` and `tls.key` exist in the certificate directory. Knative re-reads them every
//! minute; here the check happens on a handshake at most once a minute, so an idle
//! process does nothing. Settings from `QUEUE_PROXY_TLS_*` (v1.22+).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::ring::{self as provider, cipher_suite, kx_group};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedCipherSuite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::env::{TlsSettings, TlsVersion};
use crate::server::Wrap;

pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
const RECHECK: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: no certificate found")]
    NoCert(PathBuf),
    #[error("{0}: no private key found")]
    NoKey(PathBuf),
    #[error("unusable key: {0}")]
    Key(String),
    #[error("unsupported cipher suite {0:?}")]
    CipherSuite(String),
    #[error("unsupported curve {0:?}")]
    Curve(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Both files present: TLS is enabled (checked once at start, as Knative does).
pub fn enabled(dir: &str) -> bool {
    Path::new(dir).join(CERT_FILE).exists() && Path::new(dir).join(KEY_FILE).exists()
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCert(cert.to_owned()));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::NoKey(key.to_owned()))?;
    let signing =
        provider::sign::any_supported_type(&key).map_err(|e| TlsError::Key(e.to_string()))?;
    Ok(CertifiedKey::new(certs, signing))
}

#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    checked: Instant,
    stamps: (Option<SystemTime>, Option<SystemTime>),
}

/// Serves the certificate on disk, reloading it when the files change.
#[derive(Debug)]
pub struct CertWatcher {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Current>,
}

impl CertWatcher {
    pub fn new(dir: &str) -> Result<Self, TlsError> {
        let cert = Path::new(dir).join(CERT_FILE);
        let key = Path::new(dir).join(KEY_FILE);
        let loaded = load(&cert, &key)?;
        let stamps = (mtime(&cert), mtime(&key));
        Ok(Self {
            current: RwLock::new(Current {
                key: Arc::new(loaded),
                checked: Instant::now(),
                stamps,
            }),
            cert,
            key,
        })
    }

    fn refresh(&self) {
        let due = self
            .current
            .read()
            .map(|c| c.checked.elapsed() >= RECHECK)
            .unwrap_or(true);
        if !due {
            return;
        }
        let Ok(mut c) = self.current.write() else {
            return;
        };
        c.checked = Instant::now();
        let stamps = (mtime(&self.cert), mtime(&self.key));
        if stamps == c.stamps {
            return;
        }
        match load(&self.cert, &self.key) {
            Ok(k) => {
                tracing::info!("Certificate and key reloaded");
                c.key = Arc::new(k);
                c.stamps = stamps;
            }
            // Keep serving the previous pair (the files may be mid-update).
            Err(e) => tracing::error!(error = %e, "failed to reload certificate"),
        }
    }
}

impl ResolvesServerCert for CertWatcher {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.refresh();
        self.current.read().ok().map(|c| Arc::clone(&c.key))
    }
}

fn suite(name: &str) -> Option<SupportedCipherSuite> {
    Some(match name {
        "TLS_AES_128_GCM_SHA256" => cipher_suite::TLS13_AES_128_GCM_SHA256,
        "TLS_AES_256_GCM_SHA384" => cipher_suite::TLS13_AES_256_GCM_SHA384,
        "TLS_CHACHA20_POLY1305_SHA256" => cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => {
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        }
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => {
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        }
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => {
            cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        }
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => {
            cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        }
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305"
        | "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" => {
            cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        }
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305" | "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" => {
            cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        }
        _ => return None,
    })
}

fn curve(name: &str) -> Option<&'static dyn rustls::crypto::SupportedKxGroup> {
    Some(match name {
        "X25519" => kx_group::X25519,
        "CurveP256" | "P256" => kx_group::SECP256R1,
        "CurveP384" | "P384" => kx_group::SECP384R1,
        _ => return None,
    })
}

/// The rustls server configuration for `settings`, serving `certs`.
pub fn server_config(
    settings: &TlsSettings,
    certs: Arc<CertWatcher>,
) -> Result<ServerConfig, TlsError> {
    let mut p = provider::default_provider();
    if !settings.cipher_suites.is_empty() {
        let mut suites = settings
            .cipher_suites
            .iter()
            .map(|n| suite(n).ok_or_else(|| TlsError::CipherSuite(n.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        // Go applies the list to TLS 1.2 only; TLS 1.3 suites stay available.
        for s13 in provider::DEFAULT_CIPHER_SUITES
            .iter()
            .filter(|s| s.version() == &rustls::version::TLS13)
        {
            if !suites.iter().any(|s| s.suite() == s13.suite()) {
                suites.push(*s13);
            }
        }
        p.cipher_suites = suites;
    }
    if !settings.curve_preferences.is_empty() {
        p.kx_groups = settings
            .curve_preferences
            .iter()
            .map(|n| curve(n).ok_or_else(|| TlsError::Curve(n.clone())))
            .collect::<Result<Vec<_>, _>>()?;
    }
    let max = settings.max_version.unwrap_or(TlsVersion::V1_3);
    let mut versions: Vec<&'static rustls::SupportedProtocolVersion> = Vec::new();
    if settings.min_version <= TlsVersion::V1_3 && max >= TlsVersion::V1_3 {
        versions.push(&rustls::version::TLS13);
    }
    if settings.min_version <= TlsVersion::V1_2 && max >= TlsVersion::V1_2 {
        versions.push(&rustls::version::TLS12);
    }
    if versions.is_empty() {
        return Err(TlsError::Config("minimum TLS version above maximum".into()));
    }
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(p))
        .with_protocol_versions(&versions)
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Wraps accepted connections in TLS.
#[derive(Clone)]
pub struct Tls(pub TlsAcceptor);

impl Wrap for Tls {
    type Io = TlsStream<tokio::net::TcpStream>;
    async fn wrap(
        &self,
        s: tokio::net::TcpStream,
        _: std::net::SocketAddr,
        _: tokio::sync::watch::Receiver<bool>,
    ) -> Option<Self::Io> {
        match tokio::time::timeout(Duration::from_secs(10), self.0.accept(s)).await {
            Ok(Ok(t)) => Some(t),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map() {
        assert!(suite("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256").is_some());
        assert!(suite("TLS_RSA_WITH_RC4_128_SHA").is_none());
        assert!(curve("X25519").is_some());
        assert!(curve("P521x").is_none());
    }

    #[test]
    fn missing_files_are_errors() {
        assert!(!enabled("/nonexistent"));
        assert!(matches!(
            CertWatcher::new("/nonexistent"),
            Err(TlsError::Read { .. })
        ));
    }
}
