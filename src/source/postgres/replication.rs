//! The replication connection: PostgreSQL's streaming replication protocol in
//! logical mode, on our own framing (tokio-postgres has no replication mode).
//! Message codecs and SCRAM come from `postgres-protocol`.
//!
//! ```text
//!  TCP ─(SSLRequest → 'S' → rustls)─ StartupMessage(replication=database)
//!      ◀─ Authentication{Ok | CleartextPassword | MD5Password | SASL…} ─▶ answers
//!      ◀─ ParameterStatus*, BackendKeyData, ReadyForQuery
//!  simple queries: IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')
//!  START_REPLICATION SLOT s LOGICAL lsn (…) ─▶ CopyBothResponse, then CopyData both ways:
//!      server: XLogData (one pgoutput message each), PrimaryKeepalive
//!      client: StandbyStatusUpdate (write / flush / apply)
//! ```

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::pgoutput::{standby_status_update, ReplicationMessage, PG_EPOCH_OFFSET_MICROS};
use crate::error::{Error, ErrorKind, Result};
use crate::pg::conn::{PgEndpoint, SslMode};
use crate::pg::{quote_ident, quote_literal, sqlstate_kind, Lsn, SESSION_SETTINGS};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// `IDENTIFY_SYSTEM`'s answer.
#[derive(Debug, Clone)]
pub struct SystemId {
    pub system_id: String,
    pub timeline: u32,
    pub xlogpos: Lsn,
}

/// `CREATE_REPLICATION_SLOT`'s answer.
#[derive(Debug, Clone)]
pub struct CreatedSlot {
    pub name: String,
    pub consistent_point: Lsn,
    /// The exported snapshot; valid until this connection runs its next
    /// command or closes.
    pub snapshot: Option<String>,
}

pub struct ReplicationConn {
    io: Box<dyn Io>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    shown: String,
    password: Option<String>,
}

enum Backend {
    Msg(Message),
    CopyBothResponse,
}

fn io_error(shown: &str, what: &str, e: std::io::Error) -> Error {
    Error::transient(format!("{what} ({shown}): {e}"))
}

impl ReplicationConn {
    /// Connects, negotiates TLS as the sslmode says, and authenticates.
    pub async fn connect(ep: &PgEndpoint) -> Result<Self> {
        let shown = ep.shown().to_string();
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            TcpStream::connect((ep.host.as_str(), ep.port)),
        )
        .await
        .map_err(|_| {
            Error::transient(format!(
                "cannot reach PostgreSQL ({shown}): connection timed out after 10 s"
            ))
        })?
        .map_err(|e| io_error(&shown, "cannot reach PostgreSQL", e))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match ep.tls_config()? {
            None => Box::new(tcp),
            Some(tls) => {
                let mut tcp = tcp;
                let mut req = BytesMut::new();
                frontend::ssl_request(&mut req);
                tcp.write_all(&req)
                    .await
                    .map_err(|e| io_error(&shown, "sending SSLRequest", e))?;
                let answer = tcp
                    .read_u8()
                    .await
                    .map_err(|e| io_error(&shown, "reading the SSLRequest answer", e))?;
                match answer {
                    b'S' => {
                        let name = ServerName::try_from(ep.host.clone()).map_err(|e| {
                            Error::config(format!("source.url: host {:?} is not a valid TLS server name: {e}", ep.host))
                        })?;
                        let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| {
                            let kind = if e.kind() == std::io::ErrorKind::InvalidData { ErrorKind::Connect } else { ErrorKind::Transient };
                            Error::new(kind, format!("TLS handshake with PostgreSQL ({shown}) failed: {e}"))
                        })?;
                        Box::new(stream)
                    }
                    b'N' if ep.sslmode == SslMode::Prefer => Box::new(tcp),
                    b'N' => {
                        return Err(Error::connect(format!(
                            "PostgreSQL ({shown}) does not accept TLS, and sslmode requires it; enable ssl on the server or lower sslmode"
                        )))
                    }
                    other => {
                        return Err(Error::connect(format!(
                            "PostgreSQL ({shown}) answered the SSLRequest with {:?}; is this a PostgreSQL server?",
                            other as char
                        )))
                    }
                }
            }
        };
        let mut conn = ReplicationConn {
            io,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(1024),
            shown,
            password: ep.password().map(str::to_string),
        };
        conn.startup(&ep.user, &ep.dbname).await?;
        Ok(conn)
    }

    async fn flush(&mut self) -> Result<()> {
        let shown = self.shown.clone();
        self.io
            .write_all(&self.wbuf)
            .await
            .map_err(|e| io_error(&shown, "writing to PostgreSQL", e))?;
        self.io
            .flush()
            .await
            .map_err(|e| io_error(&shown, "writing to PostgreSQL", e))?;
        self.wbuf.clear();
        Ok(())
    }

    /// Reads one whole backend message. Cancel-safe: bytes read so far stay
    /// in the buffer.
    async fn next_backend(&mut self) -> Result<Backend> {
        loop {
            if self.rbuf.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]])
                        as usize;
                // PostgreSQL's messages stay under 1 GiB (its allocation limit).
                if !(4..=(1 << 30)).contains(&len) {
                    return Err(Error::definite(format!(
                        "PostgreSQL ({}) sent a message with the invalid length {len}",
                        self.shown
                    )));
                }
                if self.rbuf.len() > len {
                    if self.rbuf[0] == b'W' {
                        // CopyBothResponse, which postgres-protocol does not parse.
                        self.rbuf.advance(len + 1);
                        return Ok(Backend::CopyBothResponse);
                    }
                    let msg = Message::parse(&mut self.rbuf).map_err(|e| {
                        Error::definite(format!(
                            "unreadable message from PostgreSQL ({}): {e}",
                            self.shown
                        ))
                    })?;
                    if let Some(m) = msg {
                        return Ok(Backend::Msg(m));
                    }
                }
                self.rbuf.reserve(len + 1 - self.rbuf.len().min(len + 1));
            }
            let n = self
                .io
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| io_error(&self.shown, "reading from PostgreSQL", e))?;
            if n == 0 {
                return Err(Error::transient(format!(
                    "PostgreSQL ({}) closed the connection",
                    self.shown
                )));
            }
        }
    }

    fn server_error(
        &self,
        what: &str,
        body: &postgres_protocol::message::backend::ErrorResponseBody,
    ) -> Error {
        let mut code = String::new();
        let mut message = String::new();
        let mut detail = None;
        let mut hint = None;
        let mut fields = body.fields();
        while let Ok(Some(f)) = fields.next() {
            let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
            match f.type_() {
                b'C' => code = value,
                b'M' => message = value,
                b'D' => detail = Some(value),
                b'H' => hint = Some(value),
                _ => {}
            }
        }
        let kind = sqlstate_kind(&code);
        // The server's words are scrubbed of the password; our own context
        // (the URL as shown) never holds it.
        let mut said = format!("{message} (SQLSTATE {code})");
        if let Some(d) = detail {
            said.push_str(&format!("; {d}"));
        }
        if let Some(h) = hint {
            said.push_str(&format!("; hint: {h}"));
        }
        if let Some(p) = &self.password {
            if !p.is_empty() {
                said = said.replace(p.as_str(), "***");
            }
        }
        Error::new(kind, format!("{what} ({}): {said}", self.shown))
    }

    async fn startup(&mut self, user: &str, dbname: &str) -> Result<()> {
        let mut params: Vec<(&str, &str)> = vec![
            ("user", user),
            ("database", dbname),
            ("replication", "database"),
            ("application_name", "switchyard"),
            ("client_encoding", "UTF8"),
        ];
        params.extend(SESSION_SETTINGS.iter().copied());
        frontend::startup_message(params, &mut self.wbuf)
            .map_err(|e| Error::definite(format!("building the startup message: {e}")))?;
        self.flush().await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let Backend::Msg(msg) = self.next_backend().await? else {
                return Err(Error::definite(
                    "unexpected CopyBothResponse during startup",
                ));
            };
            let bad = |e: std::io::Error| Error::definite(format!("authentication message: {e}"));
            match msg {
                Message::AuthenticationOk => break,
                Message::AuthenticationCleartextPassword => {
                    let pw = self.require_password(user)?;
                    frontend::password_message(pw.as_bytes(), &mut self.wbuf).map_err(bad)?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let pw = self.require_password(user)?;
                    let hash = postgres_protocol::authentication::md5_hash(user.as_bytes(), pw.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf).map_err(bad)?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechs = body.mechanisms();
                    let mut offered = Vec::new();
                    while let Some(m) = mechs.next().map_err(bad)? {
                        offered.push(m.to_string());
                    }
                    if !offered.iter().any(|m| m == SCRAM_SHA_256) {
                        return Err(Error::connect(format!(
                            "PostgreSQL ({}) offers only the SASL mechanisms {offered:?}; switchyard speaks SCRAM-SHA-256",
                            self.shown
                        )));
                    }
                    let pw = self.require_password(user)?;
                    let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.wbuf).map_err(bad)?;
                    scram = Some(s);
                    self.flush().await?;
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| Error::definite("SASL continue without a SASL start"))?;
                    s.update(body.data()).map_err(|e| {
                        Error::connect(format!("SCRAM exchange with PostgreSQL ({}) failed: {e}", self.shown))
                    })?;
                    frontend::sasl_response(s.message(), &mut self.wbuf).map_err(bad)?;
                    self.flush().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram.as_mut().ok_or_else(|| Error::definite("SASL final without a SASL start"))?;
                    s.finish(body.data()).map_err(|e| {
                        Error::connect(format!(
                            "PostgreSQL ({}) failed SCRAM server verification: {e}; is this the server you meant?",
                            self.shown
                        ))
                    })?;
                }
                Message::ErrorResponse(body) => return Err(self.server_error("cannot connect", &body)),
                Message::NoticeResponse(_) => {}
                _ => {
                    return Err(Error::connect(format!(
                        "PostgreSQL ({}) asks for an authentication method switchyard does not speak (GSS/SSPI); use scram-sha-256, md5 or password in pg_hba.conf",
                        self.shown
                    )))
                }
            }
        }
        loop {
            match self.next_backend().await? {
                Backend::Msg(Message::ReadyForQuery(_)) => return Ok(()),
                Backend::Msg(Message::ErrorResponse(body)) => {
                    return Err(self.server_error("cannot connect", &body))
                }
                _ => {}
            }
        }
    }

    fn require_password(&self, user: &str) -> Result<String> {
        self.password.clone().ok_or_else(|| {
            Error::connect(format!(
                "PostgreSQL ({}) asks for a password for user {user:?}; set source.password (\"${{VAR}}\")",
                self.shown
            ))
        })
    }

    /// Runs a simple query and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        frontend::query(sql, &mut self.wbuf)
            .map_err(|e| Error::definite(format!("building a query: {e}")))?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.next_backend().await? {
                Backend::Msg(Message::DataRow(body)) => {
                    let buf = body.buffer();
                    let mut row = Vec::new();
                    let mut ranges = body.ranges();
                    while let Some(r) = ranges
                        .next()
                        .map_err(|e| Error::definite(format!("data row: {e}")))?
                    {
                        row.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(row);
                }
                Backend::Msg(Message::ErrorResponse(body)) => {
                    let what = sql.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
                    error = Some(self.server_error(&what, &body));
                }
                Backend::Msg(Message::ReadyForQuery(_)) => break,
                Backend::CopyBothResponse => {
                    return Err(Error::definite(format!(
                        "{sql}: unexpected CopyBothResponse"
                    )));
                }
                Backend::Msg(_) => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemId> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| Error::definite("IDENTIFY_SYSTEM returned no row"))?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok(SystemId {
            system_id: field(0),
            timeline: field(1).parse().unwrap_or(0),
            xlogpos: field(2).parse().map_err(|_| {
                Error::definite(format!("IDENTIFY_SYSTEM: bad xlogpos {:?}", field(2)))
            })?,
        })
    }

    /// `CREATE_REPLICATION_SLOT name [TEMPORARY] LOGICAL pgoutput (SNAPSHOT 'export')`.
    pub async fn create_slot(&mut self, name: &str, temporary: bool) -> Result<CreatedSlot> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} {}LOGICAL pgoutput (SNAPSHOT 'export')",
            quote_ident(name),
            if temporary { "TEMPORARY " } else { "" }
        );
        let rows = self.simple_query(&sql).await?;
        let row = rows
            .first()
            .ok_or_else(|| Error::definite("CREATE_REPLICATION_SLOT returned no row"))?;
        let field = |i: usize| row.get(i).cloned().flatten();
        let cp = field(1).unwrap_or_default();
        Ok(CreatedSlot {
            name: field(0).unwrap_or_else(|| name.to_string()),
            consistent_point: cp.parse().map_err(|_| {
                Error::definite(format!(
                    "CREATE_REPLICATION_SLOT: bad consistent point {cp:?}"
                ))
            })?,
            snapshot: field(2),
        })
    }

    /// Starts logical replication; the connection becomes a stream.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<ReplicationStream> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '2', publication_names {}, messages 'true')",
            quote_ident(slot),
            quote_literal(&quote_ident(publication))
        );
        frontend::query(&sql, &mut self.wbuf)
            .map_err(|e| Error::definite(format!("building a query: {e}")))?;
        self.flush().await?;
        loop {
            match self.next_backend().await? {
                Backend::CopyBothResponse => break,
                Backend::Msg(Message::ErrorResponse(body)) => {
                    let e = self
                        .server_error(&format!("starting replication from slot {slot:?}"), &body);
                    return Err(e);
                }
                Backend::Msg(_) => {}
            }
        }
        Ok(ReplicationStream { conn: self })
    }
}

/// A connection in CopyBoth mode after `START_REPLICATION`.
pub struct ReplicationStream {
    conn: ReplicationConn,
}

impl ReplicationStream {
    /// The next message from the server; `None` when the server ended the
    /// stream. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<ReplicationMessage>> {
        loop {
            match self.conn.next_backend().await? {
                Backend::Msg(Message::CopyData(body)) => {
                    let data: Bytes = body.into_bytes();
                    return ReplicationMessage::decode(data).map(Some).map_err(|e| {
                        Error::definite(format!(
                            "undecodable replication message from {}: {e}",
                            self.conn.shown
                        ))
                    });
                }
                Backend::Msg(Message::CopyDone) => return Ok(None),
                Backend::Msg(Message::ErrorResponse(body)) => {
                    return Err(self.conn.server_error("replication stream", &body));
                }
                _ => {}
            }
        }
    }

    /// Sends a standby status update: `flush` is what the target has made
    /// durable; the server may recycle WAL up to it.
    pub async fn send_status(&mut self, received: Lsn, flush: Lsn, reply: bool) -> Result<()> {
        let now = chrono::Utc::now().timestamp_micros() - PG_EPOCH_OFFSET_MICROS;
        let msg = standby_status_update(received, flush, flush, now, reply);
        frontend::CopyData::new(msg)
            .map_err(|e| Error::definite(format!("building a status update: {e}")))?
            .write(&mut self.conn.wbuf);
        self.conn.flush().await
    }
}
