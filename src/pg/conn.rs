//! Where a PostgreSQL server is and how to reach it: the URL, the password,
//! TLS (`sslmode` disable / prefer / require / verify-ca / verify-full with a
//! CA file), for the ordinary connections (tokio-postgres) and the
//! replication connection of the source.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use secrecy::{ExposeSecret, SecretString};
use tracing::warn;

use super::{session_settings_sql, sqlstate_kind};
use crate::error::{Error, ErrorKind, Result};
use crate::redact::{redact_url, url_has_password};

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
    /// The config key the URL came from, for messages.
    key: String,
    shown: String,
}

impl std::fmt::Debug for PgEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

fn decoded(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

impl PgEndpoint {
    /// Parses `postgres://user@host:port/db?sslmode=…&sslrootcert=…`;
    /// `key` is the config key it comes from (`source.url`), for messages.
    pub fn parse(url: &str, password: Option<SecretString>, key: &str) -> Result<Self> {
        let shown = redact_url(url);
        let bad = |what: &str| Error::config(format!("{key}: {what} in {shown}"));
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(bad("expected postgres://USER@HOST:PORT/DATABASE"));
        }
        if url_has_password(url) {
            return Err(bad(
                "put the password in the password key (\"${VAR}\"), not in the URL",
            ));
        }
        let parsed = url::Url::parse(url).map_err(|e| bad(&format!("not a URL ({e})")))?;
        if parsed.username().is_empty() {
            return Err(bad("a user name is required (postgres://USER@HOST/DB)"));
        }
        let host = match parsed.host() {
            Some(url::Host::Ipv6(a)) => a.to_string(),
            Some(h) => decoded(&h.to_string()),
            None => return Err(bad("a host is required")),
        };
        if host.is_empty() {
            return Err(bad("a host is required"));
        }
        let mut sslmode = SslMode::Prefer;
        let mut sslrootcert = None;
        for (k, v) in parsed.query_pairs() {
            match k.as_ref() {
                "sslmode" => {
                    sslmode = match v.as_ref() {
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
                "sslrootcert" => sslrootcert = Some(PathBuf::from(v.as_ref())),
                "application_name" | "connect_timeout" => {}
                other => {
                    return Err(bad(&format!(
                        "unsupported URL parameter {other:?} (supported: sslmode, sslrootcert)"
                    )))
                }
            }
        }
        let user = decoded(parsed.username());
        let db = decoded(parsed.path().trim_start_matches('/'));
        Ok(Self {
            host,
            port: parsed.port().unwrap_or(5432),
            dbname: if db.is_empty() { user.clone() } else { db },
            user,
            password,
            sslmode,
            sslrootcert,
            key: key.to_string(),
            shown,
        })
    }

    /// Whether the server runs on this machine (a loopback address,
    /// `localhost` or a socket directory): it then shares its cores with
    /// switchyard and with the other server, if that is local too.
    pub fn is_local(&self) -> bool {
        is_local_host(&self.host)
    }

    pub fn shown(&self) -> &str {
        &self.shown
    }

    pub fn password(&self) -> Option<&str> {
        self.password.as_ref().map(|p| p.expose_secret())
    }

    /// `text` with the password, wherever a server echoed it, hidden.
    pub fn scrub(&self, text: &str) -> String {
        match self.password() {
            Some(p) if !p.is_empty() => text.replace(p, "***"),
            _ => text.to_string(),
        }
    }

    /// The same server, another database.
    pub fn with_dbname(&self, dbname: &str) -> Self {
        let mut e = self.clone();
        e.shown = e
            .shown
            .replacen(&format!("/{}", self.dbname), &format!("/{dbname}"), 1);
        e.dbname = dbname.to_string();
        e
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
                                "{}: cannot read sslrootcert {}",
                                self.key,
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

    /// A connection with switchyard's session settings (see
    /// [`super::SESSION_SETTINGS`]).
    pub async fn session(&self) -> Result<tokio_postgres::Client> {
        let c = self.connect().await?;
        c.batch_execute(&session_settings_sql())
            .await
            .map_err(|e| pg_error(self, "session settings", e))?;
        Ok(c)
    }
}

/// Sessions (connections with switchyard's session settings) kept for
/// reuse: taking an idle one saves a connection's start, about 20 ms on a
/// local server (TCP, TLS, authentication, a backend, the settings). At
/// most [`Sessions::IDLE`] wait; a closed one is never handed out.
#[derive(Clone)]
pub struct Sessions {
    ep: PgEndpoint,
    idle: Arc<std::sync::Mutex<Vec<tokio_postgres::Client>>>,
}

impl Sessions {
    /// Idle sessions kept at most.
    pub const IDLE: usize = 2;

    pub fn new(ep: PgEndpoint) -> Self {
        Self {
            ep,
            idle: Arc::default(),
        }
    }

    /// Keeps `client`, a session of this endpoint, for the next taker.
    pub fn keep(&self, client: tokio_postgres::Client) {
        Session {
            client: Some(client),
            home: self.idle.clone(),
        }
        .release();
    }

    /// An idle session, or a new one.
    pub async fn take(&self) -> Result<Session> {
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            std::iter::from_fn(|| idle.pop()).find(|c| !c.is_closed())
        };
        let client = match idle {
            Some(c) => c,
            None => self.ep.session().await?,
        };
        Ok(Session {
            client: Some(client),
            home: self.idle.clone(),
        })
    }
}

/// A session taken from [`Sessions`]; it goes back when dropped (a
/// transaction left open is rolled back first: tokio-postgres sends the
/// ROLLBACK when the transaction is dropped, before anything the next
/// taker sends).
pub struct Session {
    client: Option<tokio_postgres::Client>,
    home: Arc<std::sync::Mutex<Vec<tokio_postgres::Client>>>,
}

impl Session {
    fn release(&mut self) {
        let Some(c) = self.client.take() else { return };
        if c.is_closed() {
            return;
        }
        let mut idle = self.home.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < Sessions::IDLE {
            idle.push(c);
        }
    }
}

impl std::ops::Deref for Session {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &Self::Target {
        self.client
            .as_ref()
            .expect("a session is held until dropped")
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.client
            .as_mut()
            .expect("a session is held until dropped")
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.release();
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

/// Converts a tokio-postgres error, classifying it and naming the endpoint
/// (never its password).
pub fn pg_error(ep: &PgEndpoint, what: &str, e: tokio_postgres::Error) -> Error {
    let (kind, detail) = match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            let mut d = format!("{} (SQLSTATE {code})", db.message());
            if let Some(h) = db.hint() {
                d.push_str(&format!("; hint: {h}"));
            }
            (sqlstate_kind(code), d)
        }
        None if e.is_closed() => (ErrorKind::Transient, "connection closed".to_string()),
        None => {
            let mut msg = e.to_string();
            let mut io = false;
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                io |= s.is::<std::io::Error>();
                src = s.source();
            }
            // I/O errors (refused, reset) are transient once we were connected;
            // at startup the caller decides. Anything else (a parameter that
            // does not encode, a row that does not decode) is a bug to report.
            let kind = if io || msg.contains("timed out") {
                ErrorKind::Transient
            } else {
                ErrorKind::Definite
            };
            (kind, msg)
        }
    };
    Error::new(
        kind,
        format!("{what} ({}): {}", ep.shown(), ep.scrub(&detail)),
    )
}

/// `pg_error` for `map_err`: the endpoint and what was being done.
pub fn pg_err<'a>(
    ep: &'a PgEndpoint,
    what: &'a str,
) -> impl Fn(tokio_postgres::Error) -> Error + 'a {
    move |e| pg_error(ep, what, e)
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

/// Whether relation `name` (quoted as SQL writes it: `switchyard.checkpoint`,
/// `"public"."orders"`) exists; `what` names the read in an error.
pub async fn relation_exists(
    c: &impl tokio_postgres::GenericClient,
    ep: &PgEndpoint,
    name: &str,
    what: &str,
) -> Result<bool> {
    Ok(c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await
        .map_err(pg_err(ep, what))?
        .get(0))
}

/// Whether `host` (of a PostgreSQL URL) names this machine: `localhost`, a
/// loopback address or a socket directory.
fn is_local_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.starts_with('/')
        || h.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_on_this_machine_are_known_by_their_host() {
        for local in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "/var/run/postgresql",
        ] {
            assert!(is_local_host(local), "{local}");
        }
        for remote in [
            "db.internal",
            "10.0.0.5",
            "192.168.1.1",
            "::2",
            "localhost.example.com",
        ] {
            assert!(!is_local_host(remote), "{remote}");
        }
    }

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
        assert_eq!(e.scrub("password hunter2 refused"), "password *** refused");
        let d = PgEndpoint::parse("postgres://u@h/db", None, "k").unwrap();
        assert_eq!((d.port, d.sslmode), (5432, SslMode::Prefer));
        let v6 = PgEndpoint::parse("postgres://u@[::1]:5433/d%20b", None, "k").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.port, v6.dbname.as_str()),
            ("::1", 5433, "d b")
        );
        let no_db = PgEndpoint::parse("postgres://app%40corp@h", None, "k").unwrap();
        assert_eq!(
            (no_db.user.as_str(), no_db.dbname.as_str()),
            ("app@corp", "app@corp")
        );
        for bad in ["postgres://u:hunter2@h/db", "postgres://u:pa/ss@h/db"] {
            let err = PgEndpoint::parse(bad, None, "source.url")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("source.url") && !err.contains("hunter2") && !err.contains("pa/ss"),
                "{err}"
            );
        }
        assert!(PgEndpoint::parse("postgres://u@h/db?sslmode=bogus", None, "k").is_err());
        assert!(PgEndpoint::parse("postgres://h/db", None, "k").is_err());
        assert!(PgEndpoint::parse("mysql://u@h/db", None, "k").is_err());
        let other = d.with_dbname("postgres");
        assert_eq!(
            (other.dbname.as_str(), other.shown()),
            ("postgres", "postgres://u@h/postgres")
        );
    }
}
