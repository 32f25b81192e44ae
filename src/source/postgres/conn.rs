//! Where a PostgreSQL server is and how to reach it: the URL, the password,
//! TLS (`sslmode` disable / prefer / require / verify-ca / verify-full with a
//! CA file), for both the ordinary connections (tokio-postgres) and the
//! replication connection (our own, see `replication`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use secrecy::{ExposeSecret, SecretString};
use tracing::warn;

use crate::config::redact_url;
use crate::error::{Error, ErrorKind, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A PostgreSQL endpoint. `Debug` never shows the password.
#[derive(Clone)]
pub struct PgEndpoint {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    password: Option<SecretString>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    shown: String,
}

impl std::fmt::Debug for PgEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|c| (*c as char).to_digit(16)),
                b.get(i + 2).and_then(|c| (*c as char).to_digit(16)),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl PgEndpoint {
    /// Parses `postgres://user@host:port/db?sslmode=…&sslrootcert=…`.
    pub fn parse(url: &str, password: Option<SecretString>, key: &str) -> Result<Self> {
        let shown = redact_url(url);
        let bad = |what: &str| Error::config(format!("{key}: {what} in {shown}"));
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| bad("expected postgres://USER@HOST:PORT/DATABASE"))?;
        let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, db) = main.split_once('/').unwrap_or((main, ""));
        let (userinfo, hostport) = authority
            .rsplit_once('@')
            .ok_or_else(|| bad("a user name is required (postgres://USER@HOST/DB)"))?;
        if userinfo.contains(':') {
            return Err(bad(
                "put the password in the password key (\"${VAR}\"), not in the URL",
            ));
        }
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => (
                h.trim_matches(['[', ']']).to_string(),
                p.parse::<u16>().map_err(|_| bad("invalid port"))?,
            ),
            _ => (hostport.trim_matches(['[', ']']).to_string(), 5432),
        };
        if host.is_empty() {
            return Err(bad("a host is required"));
        }
        let mut sslmode = SslMode::Prefer;
        let mut sslrootcert = None;
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "sslmode" => {
                    sslmode = match v {
                        "disable" => SslMode::Disable,
                        "prefer" | "allow" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        _ => return Err(bad(
                            "sslmode must be disable, prefer, require, verify-ca or verify-full",
                        )),
                    }
                }
                "sslrootcert" => sslrootcert = Some(PathBuf::from(percent_decode(v))),
                "application_name" | "connect_timeout" => {}
                other => {
                    return Err(bad(&format!(
                        "unsupported URL parameter {other:?} (supported: sslmode, sslrootcert)"
                    )))
                }
            }
        }
        let dbname = if db.is_empty() {
            percent_decode(userinfo)
        } else {
            percent_decode(db)
        };
        Ok(Self {
            host,
            port,
            user: percent_decode(userinfo),
            dbname,
            password,
            sslmode,
            sslrootcert,
            shown,
        })
    }

    pub fn shown(&self) -> &str {
        &self.shown
    }

    pub fn password(&self) -> Option<&str> {
        self.password.as_ref().map(|p| p.expose_secret())
    }

    /// The rustls configuration for the sslmode, or None for `disable`.
    pub fn tls_config(&self) -> Result<Option<Arc<ClientConfig>>> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::config(format!("TLS setup: {e}")))?;
        let config = match self.sslmode {
            SslMode::Disable => return Ok(None),
            SslMode::Prefer | SslMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
                .with_no_client_auth(),
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let mut roots = RootCertStore::empty();
                match &self.sslrootcert {
                    Some(path) => {
                        let pem = std::fs::read(path).map_err(|e| {
                            Error::config(format!(
                                "source.url: cannot read sslrootcert {}",
                                path.display()
                            ))
                            .with_source(e)
                        })?;
                        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                            let cert = cert.map_err(|e| {
                                Error::config(format!(
                                    "sslrootcert {}: not a PEM certificate",
                                    path.display()
                                ))
                                .with_source(e)
                            })?;
                            roots.add(cert).map_err(|e| {
                                Error::config(format!("sslrootcert {}: {e}", path.display()))
                            })?;
                        }
                    }
                    None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
                }
                let verifier =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| Error::config(format!("TLS roots: {e}")))?;
                let verifier: Arc<dyn ServerCertVerifier> = if self.sslmode == SslMode::VerifyCa {
                    Arc::new(IgnoreHostname(verifier))
                } else {
                    verifier
                };
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth()
            }
        };
        Ok(Some(Arc::new(config)))
    }

    fn pg_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name("switchyard")
            .connect_timeout(Duration::from_secs(10))
            .keepalives_idle(Duration::from_secs(30));
        if let Some(p) = self.password() {
            c.password(p);
        }
        c.ssl_mode(match self.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        c
    }

    /// An ordinary connection; its driver runs on a task of its own.
    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        let config = self.pg_config();
        let client = match self.tls_config()? {
            Some(tls) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
                let (client, conn) = config
                    .connect(tls)
                    .await
                    .map_err(|e| pg_error(self, "cannot connect", e))?;
                spawn_driver(conn);
                client
            }
            None => {
                let (client, conn) = config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| pg_error(self, "cannot connect", e))?;
                spawn_driver(conn);
                client
            }
        };
        Ok(client)
    }
}

fn spawn_driver<T>(conn: T)
where
    T: std::future::Future<Output = std::result::Result<(), tokio_postgres::Error>>
        + Send
        + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            warn!(error = %e, "postgres connection closed");
        }
    });
}

/// SQLSTATE classes that are worth retrying: connection exceptions (08),
/// insufficient resources (53), operator intervention (57P), serialization
/// failures and deadlocks (40001, 40P01).
pub fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code == "40001"
        || code == "40P01"
}

/// Converts a tokio-postgres error, classifying it and naming the endpoint
/// (never its password).
pub fn pg_error(ep: &PgEndpoint, what: &str, e: tokio_postgres::Error) -> Error {
    let (kind, detail) = match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            let kind = if is_transient_sqlstate(code) {
                ErrorKind::Transient
            } else if code.starts_with("28") {
                ErrorKind::Connect
            } else {
                ErrorKind::Definite
            };
            let mut d = format!("{} (SQLSTATE {code})", db.message());
            if let Some(h) = db.hint() {
                d.push_str(&format!("; hint: {h}"));
            }
            (kind, d)
        }
        None if e.is_closed() => (ErrorKind::Transient, "connection closed".to_string()),
        None => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            // I/O errors (refused, reset) are transient once we were connected;
            // at startup the caller decides.
            (ErrorKind::Transient, msg)
        }
    };
    let mut detail = detail;
    if let Some(p) = ep.password() {
        if !p.is_empty() {
            detail = detail.replace(p, "***");
        }
    }
    Error::new(kind, format!("{what} ({}): {detail}", ep.shown()))
}

/// `sslmode=require` / `prefer`: encrypt, but do not verify the certificate
/// (libpq's meaning of these modes).
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the host name
/// is not checked.
#[derive(Debug)]
struct IgnoreHostname(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreHostname {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_never_show_passwords() {
        let e = PgEndpoint::parse(
            "postgres://app@db.internal:6543/shop?sslmode=verify-full&sslrootcert=/etc/ca.pem",
            Some(SecretString::from("hunter2")),
            "source.url",
        )
        .unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.user.as_str(), e.dbname.as_str()),
            ("db.internal", 6543, "app", "shop")
        );
        assert_eq!(e.sslmode, SslMode::VerifyFull);
        assert_eq!(
            e.sslrootcert.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert!(!format!("{e:?}").contains("hunter2"));
        let d = PgEndpoint::parse("postgres://u@h/db", None, "k").unwrap();
        assert_eq!((d.port, d.sslmode), (5432, SslMode::Prefer));
        let err = PgEndpoint::parse("postgres://u:hunter2@h/db", None, "source.url")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("source.url") && !err.contains("hunter2"),
            "{err}"
        );
        assert!(PgEndpoint::parse("postgres://u@h/db?sslmode=bogus", None, "k").is_err());
        assert!(PgEndpoint::parse("mysql://u@h/db", None, "k").is_err());
    }
}
