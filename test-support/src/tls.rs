//! Test certificates made with openssl (Debian package openssl), and a rustls server
//! configuration serving one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct Certificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Certificate {
    pub fn cert_pem(&self) -> String {
        read(&self.cert)
    }

    pub fn key_pem(&self) -> String {
        read(&self.key)
    }

    /// A rustls server configuration (ring, safe default versions, no client
    /// authentication) presenting this certificate.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let (cert, key) = (self.cert_pem(), self.key_pem());
        let certs: Vec<_> = rustls_pemfile::certs(&mut cert.as_bytes())
            .collect::<Result<_, _>>()
            .expect("certificates in the PEM file");
        let key = rustls_pemfile::private_key(&mut key.as_bytes())
            .expect("a readable key file")
            .expect("a private key in the PEM file");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        Arc::new(config)
    }
}

/// A test CA and a server certificate for IP 127.0.0.1 it signed.
#[derive(Debug, Clone)]
pub struct TestCa {
    /// The CA certificate (PEM), to trust.
    pub ca: PathBuf,
    pub server: Certificate,
}

impl TestCa {
    pub fn ca_pem(&self) -> String {
        read(&self.ca)
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `openssl <args>` in `dir`; panics with openssl's message when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    crate::run_ok(
        std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args),
        "Debian package openssl makes the test certificates",
    );
}

/// A new P-256 key, unencrypted.
const NEW_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

fn req(dir: &Path, extra: &[&str]) {
    let mut args = vec!["req"];
    args.extend(NEW_KEY);
    args.extend(extra);
    openssl(dir, &args);
}

/// A self-signed certificate for `common_name` as `openssl req -x509` makes it (a CA
/// certificate without subject alternative names), valid one day: `<name>.crt` and
/// `<name>.key` in `dir`.
pub fn self_signed(dir: &Path, name: &str, common_name: &str) -> Certificate {
    let cert = format!("{name}.crt");
    let key = format!("{name}.key");
    let subject = format!("/CN={common_name}");
    req(
        dir,
        &[
            "-x509", "-days", "1", "-subj", &subject, "-keyout", &key, "-out", &cert,
        ],
    );
    Certificate {
        cert: dir.join(cert),
        key: dir.join(key),
    }
}

/// A test CA (`ca.crt`, `ca.key`) and a server certificate for 127.0.0.1 it signed
/// (`server.crt`, `server.key`: subjectAltName IP:127.0.0.1, not a CA, serverAuth), in `dir`,
/// valid two days.
pub fn ca_and_server(dir: &Path) -> TestCa {
    req(
        dir,
        &[
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=spright test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    req(
        dir,
        &[
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("server-ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write the server certificate's extensions");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server-ext.cnf",
            "-out",
            "server.crt",
        ],
    );
    TestCa {
        ca: dir.join("ca.crt"),
        server: Certificate {
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_load_into_rustls_and_the_server_one_is_signed_by_the_ca() {
        let dir = crate::TestDir::new("tls-certificates");
        let own = self_signed(dir.path(), "self", "localhost");
        let ca = ca_and_server(dir.path());
        for c in [&own, &ca.server] {
            assert!(c.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
            let _ = c.server_config();
        }
        assert!(ca.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let verify = std::process::Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(&ca.ca)
            .arg(&ca.server.cert)
            .output()
            .expect("openssl verify");
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stdout)
        );
    }
}
