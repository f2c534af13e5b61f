//! Mutual TLS for the stream transport (feature `tls`).
//!
//! Both ends hold a certificate, its key and the certificate of the CA
//! that issued their peer's ([`TlsConfig`]). The connecting end (source
//! or destination, whichever dials) verifies the listener's certificate against that CA and the
//! name it dialled; the listening end (the destination) requires a client
//! certificate and verifies it against the same CA. A peer that presents
//! no certificate, a certificate from another CA, or speaks plain TCP is
//! refused during the handshake, before a single migration record is
//! read, and each side gets a [`TlsError`] naming why.
//!
//! # Sessions
//!
//! A migration session may use several connections (a reconnection, or
//! several data streams). Each is bound to its session inside TLS:
//! right after the handshake the connecting end sends a binding record
//! (a magic and the 16-byte [`SessionId`] it drew at random when the
//! session began), and the listening end answers with one status byte.
//! A [`TlsSession`] on each side remembers the session id and the peer's
//! end-entity certificate from the first connection, and refuses a later
//! connection that names another session or comes from another peer
//! certificate ([`TlsError::SessionMismatch`] on both sides). Because the
//! id travels inside the authenticated channel, only a holder of a
//! certificate from the CA can present it, and only the peer of the
//! first connection can join the session.
//!
//! # Use
//!
//! ```no_run
//! # use migrate_core::tls::{TlsConfig, TlsSession};
//! # use std::net::{TcpListener, TcpStream};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = TlsConfig::from_pem_files("src.pem".as_ref(), "src.key".as_ref(), "ca.pem".as_ref())?;
//! // Source: dial, and verify the destination as "dst.example".
//! let mut session = TlsSession::initiator(&cfg)?;
//! let sock = TcpStream::connect("192.0.2.7:7700")?;
//! let transport = migrate_core::tls::connect(&cfg, sock, "dst.example", &mut session)?;
//! # let _ = transport; Ok(()) }
//! ```
//!
//! The listening side calls [`accept`] with a [`TlsSession::acceptor`].
//! [`connect_stream`] and [`accept_stream`] hand back the TLS stream
//! itself, for a program that exchanges something of its own over it
//! before the migration stream.
//! The result is a [`StreamTransport`] like any other: the engines and
//! drivers do not change.

use crate::transport::{SplitStream, StreamTransport};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore, ServerConfig};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The first bytes of a binding record (then the 16-byte session id).
const BIND_MAGIC: &[u8; 8] = b"LMTLSB\x00\x01";
/// Binding accepted.
const BIND_OK: u8 = 0;
/// Binding refused: another session or another peer.
const BIND_MISMATCH: u8 = 1;

/// Why a TLS connection could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate, key or CA file could not be read or used.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The peer presented no certificate (it is not authenticated).
    #[error("peer presented no certificate")]
    PeerUnauthenticated,
    /// The peer's certificate is not one the configured CA vouches for
    /// (another CA, expired, wrong name, bad signature).
    #[error("peer certificate rejected: {0}")]
    UntrustedPeer(String),
    /// The peer refused this end during the handshake (it sent this
    /// alert): it does not trust this end's certificate, or got none.
    #[error("refused by peer: {0}")]
    RefusedByPeer(String),
    /// What the peer sent is not TLS (a plain-TCP migration stream, say).
    #[error("peer does not speak TLS ({0})")]
    NotTls(String),
    /// The connection names another session, or comes from another peer
    /// certificate than the session's first connection.
    #[error("connection is not bound to this migration session")]
    SessionMismatch,
    /// The peer closed the connection before the setup finished.
    #[error("peer closed the connection during the TLS setup")]
    Closed,
    /// The handshake or binding did not finish in time.
    #[error("TLS setup timed out after {0:?}")]
    Timeout(Duration),
    /// Another handshake failure.
    #[error("TLS handshake: {0}")]
    Handshake(rustls::Error),
    /// An operating-system error.
    #[error("TLS I/O: {0}")]
    Io(io::Error),
}

impl TlsError {
    fn from_rustls(e: rustls::Error) -> TlsError {
        use rustls::Error as E;
        match e {
            E::NoCertificatesPresented => TlsError::PeerUnauthenticated,
            E::InvalidCertificate(c) => TlsError::UntrustedPeer(match c {
                CertificateError::UnknownIssuer => "issued by an unknown CA".into(),
                other => format!("{other:?}"),
            }),
            E::AlertReceived(a) => match a {
                AlertDescription::CertificateRequired => {
                    TlsError::RefusedByPeer("it requires a certificate".into())
                }
                AlertDescription::UnknownCA
                | AlertDescription::BadCertificate
                | AlertDescription::DecryptError => {
                    TlsError::RefusedByPeer(format!("it does not trust this certificate ({a:?})"))
                }
                other => TlsError::RefusedByPeer(format!("{other:?}")),
            },
            E::InvalidMessage(m) => TlsError::NotTls(format!("{m:?}")),
            E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
                TlsError::NotTls(e.to_string())
            }
            other => TlsError::Handshake(other),
        }
    }

    fn from_io(e: io::Error, timeout: Duration) -> TlsError {
        if let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return TlsError::from_rustls(r.clone());
        }
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TlsError::Timeout(timeout),
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => TlsError::Closed,
            _ => TlsError::Io(e),
        }
    }
}

/// Certificates for both roles of mutual TLS: this end's certificate
/// chain and key, and the CA that issued the peers' certificates.
#[derive(Clone)]
pub struct TlsConfig {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    provider: Arc<CryptoProvider>,
    timeout: Duration,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// How long a handshake and binding may take by default.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Reads PEM files: this end's certificate chain (leaf first), its
    /// private key (PKCS#8, PKCS#1 or SEC1), and the CA certificate(s)
    /// that peers' certificates must chain to.
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| TlsError::Config(format!("{}: {e}", p.display())))
        };
        Self::from_pem(&read(cert)?, &read(key)?, &read(ca)?)
    }

    /// As [`TlsConfig::from_pem_files`], from PEM text in memory.
    pub fn from_pem(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Config(format!("certificate: {e}")))?;
        if chain.is_empty() {
            return Err(TlsError::Config("certificate: no certificate found".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| TlsError::Config(format!("private key: {e}")))?;
        let mut roots = RootCertStore::empty();
        let mut n = 0;
        for c in CertificateDer::pem_slice_iter(ca) {
            let c = c.map_err(|e| TlsError::Config(format!("CA: {e}")))?;
            roots
                .add(c)
                .map_err(|e| TlsError::Config(format!("CA: {e}")))?;
            n += 1;
        }
        if n == 0 {
            return Err(TlsError::Config("CA: no certificate found".into()));
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg_err = |what: &str| {
            let what = what.to_owned();
            move |e: rustls::Error| TlsError::Config(format!("{what}: {e}"))
        };
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(cfg_err("protocol versions"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(cfg_err("certificate and key"))?;
        // No resumption: every connection is a full, mutually
        // authenticated handshake.
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(cfg_err("protocol versions"))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(cfg_err("certificate and key"))?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(TlsConfig {
            client: Arc::new(client),
            server: Arc::new(server),
            provider,
            timeout: Self::DEFAULT_TIMEOUT,
        })
    }

    /// As [`TlsConfig::from_pem_files`] when all three paths are given,
    /// `None` when none is (plain TCP), an error when only some are.
    pub fn from_optional_paths(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<Option<Self>, TlsError> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(c), Some(k), Some(a)) => Self::from_pem_files(c, k, a).map(Some),
            _ => Err(TlsError::Config(
                "give a certificate, its key and a CA, or none of them".into(),
            )),
        }
    }

    /// Bounds how long a handshake and its binding may take
    /// ([`TlsConfig::DEFAULT_TIMEOUT`] unless set).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }
}

/// The identity of a migration session: 16 random bytes drawn by the
/// connecting end when the session begins.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 16]);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// One side's view of a migration session: which session its
/// connections belong to and which peer certificate they come from.
/// Both are fixed by the first connection; every later one must match.
#[derive(Debug, Clone)]
pub struct TlsSession {
    id: Option<SessionId>,
    peer: Option<CertificateDer<'static>>,
    connections: u32,
}

impl TlsSession {
    /// A new session on the connecting end, with a fresh random id.
    pub fn initiator(cfg: &TlsConfig) -> Result<Self, TlsError> {
        let mut id = [0u8; 16];
        cfg.provider
            .secure_random
            .fill(&mut id)
            .map_err(|_| TlsError::Config("no secure random source".into()))?;
        Ok(TlsSession {
            id: Some(SessionId(id)),
            peer: None,
            connections: 0,
        })
    }

    /// A session on the listening end: it takes the id and the peer of
    /// the first connection it accepts.
    pub fn acceptor() -> Self {
        TlsSession {
            id: None,
            peer: None,
            connections: 0,
        }
    }

    /// The session's id (`None` on an acceptor before its first
    /// connection).
    pub fn id(&self) -> Option<SessionId> {
        self.id
    }

    /// How many connections have been bound to the session.
    pub fn connections(&self) -> u32 {
        self.connections
    }

    /// Whether `id` and `peer` may join: the first connection fixes both.
    fn admits(&self, id: SessionId, peer: &CertificateDer<'_>) -> bool {
        self.id.is_none_or(|s| s == id) && self.peer.as_ref().is_none_or(|p| p == peer)
    }

    fn bind(&mut self, id: SessionId, peer: CertificateDer<'static>) {
        self.id = Some(id);
        self.peer = Some(peer);
        self.connections += 1;
    }
}

/// A TLS connection over TCP, shared by a stream transport's reader
/// thread and its writer. The reader reads the socket without the lock
/// and decrypts under it; the writer encrypts under the lock and writes
/// the socket without it, so neither direction waits on the other.
pub struct TlsStream {
    sock: TcpStream,
    conn: Arc<Mutex<rustls::Connection>>,
    /// Ciphertext read from the socket; `pos..len` not yet decrypted.
    rbuf: Vec<u8>,
    pos: usize,
    len: usize,
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream").finish_non_exhaustive()
    }
}

fn poisoned<T>(_: T) -> io::Error {
    io::Error::other("TLS connection state poisoned")
}

impl TlsStream {
    fn new(sock: TcpStream, conn: rustls::Connection) -> Self {
        TlsStream {
            sock,
            conn: Arc::new(Mutex::new(conn)),
            rbuf: vec![0; 32 << 10],
            pos: 0,
            len: 0,
        }
    }
}

impl TlsStream {
    /// Bounds how long a read may wait (`None`: no bound), for an
    /// exchange before the stream is handed to a transport.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(timeout)
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut c = self.conn.lock().map_err(poisoned)?;
                loop {
                    match c.reader().read(buf) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        r => return r,
                    }
                    // No plaintext: decrypt more of what the socket gave,
                    // a little at a time (rustls holds a bounded amount).
                    if self.pos == self.len {
                        break;
                    }
                    let mut data = &self.rbuf[self.pos..self.len];
                    c.read_tls(&mut data)?;
                    self.pos = self.len - data.len();
                    c.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                }
            }
            let n = self.sock.read(&mut self.rbuf)?;
            (self.pos, self.len) = (0, n);
            if n == 0 {
                // End of stream: the reader reports a clean or an
                // unexpected end from now on.
                let mut c = self.conn.lock().map_err(poisoned)?;
                c.read_tls(&mut io::empty())?;
                c.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut out = Vec::new();
        let n = {
            let mut c = self.conn.lock().map_err(poisoned)?;
            let n = c.writer().write_vectored(bufs)?;
            while c.wants_write() {
                c.write_tls(&mut out)?;
            }
            n
        };
        self.sock.write_all(&out)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SplitStream for TlsStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        Ok(TlsStream {
            sock: self.sock.try_clone()?,
            conn: self.conn.clone(),
            rbuf: vec![0; self.rbuf.len()],
            pos: 0,
            len: 0,
        })
    }
    fn shutdown_both(&self) {
        let _ = self.sock.shutdown(Shutdown::Both);
    }
    fn set_write_limit(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.sock.set_write_timeout(timeout)
    }
}

/// The host part of `HOST:PORT` (brackets of an IPv6 address removed):
/// the name a connecting end verifies the listener's certificate against
/// when it is given no other.
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Runs the handshake on `sock` within `timeout`, then hands the peer's
/// end-entity certificate back.
fn handshake(
    sock: &mut TcpStream,
    conn: &mut rustls::Connection,
    timeout: Duration,
) -> Result<CertificateDer<'static>, TlsError> {
    let io_err = |e| TlsError::from_io(e, timeout);
    sock.set_read_timeout(Some(timeout)).map_err(io_err)?;
    sock.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let _ = sock.set_nodelay(true);
    while conn.is_handshaking() {
        match conn.complete_io(sock) {
            Ok((0, 0)) if conn.is_handshaking() => return Err(TlsError::Closed),
            Ok(_) => {}
            Err(e) => {
                // Send the alert that explains the refusal, if any.
                let _ = conn.write_tls(sock);
                return Err(io_err(e));
            }
        }
    }
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned())
        .ok_or(TlsError::PeerUnauthenticated)
}

/// Reads exactly `buf.len()` plaintext bytes of the binding exchange.
fn read_binding(s: &mut TlsStream, buf: &mut [u8], timeout: Duration) -> Result<(), TlsError> {
    s.read_exact(buf).map_err(|e| TlsError::from_io(e, timeout))
}

/// Ends the setup phase: no read or write timeout (a transport's reader
/// blocks; the drivers set their own send timeout).
fn end_setup(s: TlsStream, timeout: Duration) -> Result<TlsStream, TlsError> {
    let io_err = |e| TlsError::from_io(e, timeout);
    s.sock.set_read_timeout(None).map_err(io_err)?;
    s.sock.set_write_timeout(None).map_err(io_err)?;
    Ok(s)
}

fn transport(s: TlsStream, timeout: Duration) -> Result<StreamTransport<TlsStream>, TlsError> {
    StreamTransport::new(s).map_err(|e| TlsError::from_io(e, timeout))
}

/// [`connect_stream`], and a stream transport over the result.
pub fn connect(
    cfg: &TlsConfig,
    sock: TcpStream,
    server_name: &str,
    session: &mut TlsSession,
) -> Result<StreamTransport<TlsStream>, TlsError> {
    transport(
        connect_stream(cfg, sock, server_name, session)?,
        cfg.timeout,
    )
}

/// [`accept_stream`], and a stream transport over the result.
pub fn accept(
    cfg: &TlsConfig,
    sock: TcpStream,
    session: &mut TlsSession,
) -> Result<StreamTransport<TlsStream>, TlsError> {
    transport(accept_stream(cfg, sock, session)?, cfg.timeout)
}

/// Sets up mutual TLS as the connecting end over a connected socket:
/// verifies the listener's certificate against the CA and `server_name`
/// (a DNS name or an IP address its certificate names), presents this
/// end's certificate, and binds the connection to `session`. The stream
/// returned has no read or write timeout.
pub fn connect_stream(
    cfg: &TlsConfig,
    mut sock: TcpStream,
    server_name: &str,
    session: &mut TlsSession,
) -> Result<TlsStream, TlsError> {
    let timeout = cfg.timeout;
    let id = session.id.ok_or(TlsError::Config(
        "connect needs an initiator session".into(),
    ))?;
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| TlsError::Config(format!("server name {server_name:?}: {e}")))?;
    let mut conn: rustls::Connection = rustls::ClientConnection::new(cfg.client.clone(), name)
        .map_err(TlsError::from_rustls)?
        .into();
    let peer = handshake(&mut sock, &mut conn, timeout)?;
    if !session.admits(id, &peer) {
        return Err(TlsError::SessionMismatch);
    }
    let mut s = TlsStream::new(sock, conn);
    let mut bind = [0u8; 24];
    bind[..8].copy_from_slice(BIND_MAGIC);
    bind[8..].copy_from_slice(&id.0);
    s.write_all(&bind)
        .map_err(|e| TlsError::from_io(e, timeout))?;
    // In TLS 1.3 the listener checks this end's certificate after this
    // end has finished: its verdict (an alert) arrives here.
    let mut status = [0u8; 1];
    read_binding(&mut s, &mut status, timeout)?;
    match status[0] {
        BIND_OK => {}
        BIND_MISMATCH => return Err(TlsError::SessionMismatch),
        other => return Err(TlsError::NotTls(format!("binding status {other}"))),
    }
    session.bind(id, peer);
    end_setup(s, timeout)
}

/// Sets up mutual TLS as the listening end over an accepted socket:
/// requires a client certificate issued by the CA, then reads the
/// binding and admits the connection to `session` (the first connection
/// fixes the session's id and peer). The stream returned has no read or
/// write timeout.
pub fn accept_stream(
    cfg: &TlsConfig,
    mut sock: TcpStream,
    session: &mut TlsSession,
) -> Result<TlsStream, TlsError> {
    let timeout = cfg.timeout;
    let mut conn: rustls::Connection = rustls::ServerConnection::new(cfg.server.clone())
        .map_err(TlsError::from_rustls)?
        .into();
    let peer = handshake(&mut sock, &mut conn, timeout)?;
    let mut s = TlsStream::new(sock, conn);
    let mut bind = [0u8; 24];
    read_binding(&mut s, &mut bind, timeout)?;
    if &bind[..8] != BIND_MAGIC {
        return Err(TlsError::NotTls("no session binding".into()));
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&bind[8..]);
    let id = SessionId(id);
    if !session.admits(id, &peer) {
        let _ = s.write_all(&[BIND_MISMATCH]);
        return Err(TlsError::SessionMismatch);
    }
    s.write_all(&[BIND_OK])
        .map_err(|e| TlsError::from_io(e, timeout))?;
    session.bind(id, peer);
    end_setup(s, timeout)
}

/// Certificates made at run time, for tests and benchmarks (feature
/// `tls-test-pki`): a CA and leaf certificates it issues, valid for
/// `localhost` and `127.0.0.1`, usable as client and server.
#[cfg(feature = "tls-test-pki")]
pub mod test_pki {
    use super::{TlsConfig, TlsError};
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };

    /// A certificate authority made at run time.
    pub struct TestCa {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    impl std::fmt::Debug for TestCa {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("TestCa").finish_non_exhaustive()
        }
    }

    /// A leaf certificate and its key, in PEM, with its CA's certificate.
    #[derive(Debug, Clone)]
    pub struct TestIdentity {
        /// The certificate.
        pub cert_pem: String,
        /// Its private key.
        pub key_pem: String,
        /// The CA certificate that issued it.
        pub ca_pem: String,
    }

    fn err(e: rcgen::Error) -> TlsError {
        TlsError::Config(format!("certificate generation: {e}"))
    }

    impl TestCa {
        /// A new CA named `name`.
        pub fn new(name: &str) -> Result<Self, TlsError> {
            let key = KeyPair::generate().map_err(err)?;
            let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
            p.distinguished_name.push(DnType::CommonName, name);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let cert = p.self_signed(&key).map_err(err)?;
            Ok(TestCa { cert, key })
        }

        /// The CA's certificate in PEM.
        pub fn cert_pem(&self) -> String {
            self.cert.pem()
        }

        /// A leaf certificate named `name`, for `localhost` and
        /// `127.0.0.1`.
        pub fn issue(&self, name: &str) -> Result<TestIdentity, TlsError> {
            let key = KeyPair::generate().map_err(err)?;
            let mut p =
                CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                    .map_err(err)?;
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = p.signed_by(&key, &self.cert, &self.key).map_err(err)?;
            Ok(TestIdentity {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                ca_pem: self.cert_pem(),
            })
        }
    }

    impl TestIdentity {
        /// The TLS configuration for this identity, trusting its CA.
        pub fn config(&self) -> Result<TlsConfig, TlsError> {
            TlsConfig::from_pem(
                self.cert_pem.as_bytes(),
                self.key_pem.as_bytes(),
                self.ca_pem.as_bytes(),
            )
        }

        /// Writes `NAME.pem`, `NAME.key` and `NAME-ca.pem` into `dir` and
        /// returns their paths (certificate, key, CA).
        pub fn write_to(
            &self,
            dir: &std::path::Path,
            name: &str,
        ) -> std::io::Result<[std::path::PathBuf; 3]> {
            let paths = [
                dir.join(format!("{name}.pem")),
                dir.join(format!("{name}.key")),
                dir.join(format!("{name}-ca.pem")),
            ];
            std::fs::write(&paths[0], &self.cert_pem)?;
            std::fs::write(&paths[1], &self.key_pem)?;
            std::fs::write(&paths[2], &self.ca_pem)?;
            Ok(paths)
        }
    }
}
