//! Mutual TLS: migrations over it, and the peers it refuses (no
//! certificate, a certificate from another CA, plain TCP, a connection
//! bound to another session). Certificates are made at test time.

mod common;
use common::{guests, recovering_postcopy_source, source_engine, spawn_destination, TIMEOUT};
use migrate_core::driver::run_source;
use migrate_core::tls::test_pki::{TestCa, TestIdentity};
use migrate_core::tls::{self, TlsConfig, TlsError, TlsSession, TlsStream};
use migrate_core::transport::{StreamTransport, Transport};
use migrate_core::{Policy, PostCopy, Precopy};
use std::net::TcpListener;
use std::net::TcpStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

struct Pki {
    src: TestIdentity,
    dst: TestIdentity,
}

fn pki() -> Pki {
    let ca = TestCa::new("livemig test CA").unwrap();
    Pki {
        src: ca.issue("source").unwrap(),
        dst: ca.issue("destination").unwrap(),
    }
}

/// Accepts one TLS connection on a fresh listener, on its own thread.
fn listen(
    cfg: TlsConfig,
) -> (
    std::net::SocketAddr,
    JoinHandle<Result<StreamTransport<TlsStream>, TlsError>>,
) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        tls::accept(&cfg, s, &mut TlsSession::acceptor())
    });
    (addr, h)
}

fn dial(
    cfg: &TlsConfig,
    addr: std::net::SocketAddr,
) -> Result<StreamTransport<TlsStream>, TlsError> {
    let mut session = TlsSession::initiator(cfg).unwrap();
    tls::connect(
        cfg,
        TcpStream::connect(addr).unwrap(),
        "localhost",
        &mut session,
    )
}

fn migrate_over_tls<P: Policy + 'static>(policy: P) -> migrate_core::MigrationStats {
    let p = pki();
    let (addr, h) = listen(p.dst.config().unwrap());
    let mut src_t = dial(&p.src.config().unwrap(), addr).expect("source TLS setup");
    let dst_t = h.join().unwrap().expect("destination TLS setup");

    let (src, dst, clock) = guests(32 << 20, 50_000.0);
    let dest = spawn_destination(&dst, &clock, dst_t);
    let mut e = source_engine(&src, policy, clock);
    let stats = run_source(&mut e, &mut src_t, TIMEOUT).expect("source");
    let report = dest.join().unwrap().expect("destination");
    assert!(stats.memory_verified);
    assert!(report.resume_confirmed);
    // The digest the destination computed at the switch is the paused
    // source's (the destination guest runs on, so its memory moves).
    assert_eq!(report.digest.unwrap(), src.digest());
    assert!(src.is_paused() && !dst.is_paused());
    stats
}

#[test]
fn precopy_migrates_over_mutual_tls() {
    migrate_over_tls(Precopy::default());
}

#[test]
fn postcopy_migrates_over_mutual_tls() {
    let stats = migrate_over_tls(PostCopy::default());
    assert!(stats.postcopy.is_some(), "post-copy ran");
}

#[test]
fn hybrid_migrates_over_mutual_tls() {
    // One pre-copy round, then post-copy: both phases cross TLS.
    let stats = migrate_over_tls(migrate_core::Hybrid::new({
        let mut v = migrate_core::HybridConfig::default();
        v.precopy = {
            let mut v = migrate_core::PrecopyConfig::default();
            v.downtime_target = Duration::ZERO;
            v.max_rounds = 1;
            v
        };
        v
    }));
    assert!(stats.postcopy.is_some(), "the hybrid switched to post-copy");
}

#[test]
fn frames_of_every_size_cross_tls_both_ways() {
    let p = pki();
    let (addr, h) = listen(p.dst.config().unwrap());
    let mut a = dial(&p.src.config().unwrap(), addr).unwrap();
    let mut b = h.join().unwrap().unwrap();
    for len in [0usize, 1, 4095, 16 << 10, (16 << 10) + 1, 1 << 20] {
        let f: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        a.send(&f).unwrap();
        assert_eq!(&b.recv(Some(TIMEOUT)).unwrap().unwrap()[..], &f[..]);
        b.send(&f).unwrap();
        assert_eq!(&a.recv(Some(TIMEOUT)).unwrap().unwrap()[..], &f[..]);
    }
}

#[test]
fn a_client_without_a_certificate_is_refused_on_both_sides() {
    let p = pki();
    let (addr, h) = listen(p.dst.config().unwrap());
    // A client that trusts the CA but presents no certificate.
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(p.src.ca_pem.as_bytes()) {
            r.add(c.unwrap()).unwrap();
        }
        r
    };
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    // The handshake completes on the client side in TLS 1.3; the refusal
    // arrives as an alert on the next read.
    let client_err = loop {
        match conn.complete_io(&mut sock) {
            Ok((0, 0)) => break None,
            Ok(_) if !conn.is_handshaking() => {
                let mut b = [0u8; 1];
                match std::io::Read::read(&mut conn.reader(), &mut b) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    other => break Some(format!("{other:?}")),
                }
            }
            Ok(_) => {}
            Err(e) => break Some(e.to_string()),
        }
    };
    let server = h.join().unwrap();
    assert!(
        matches!(server, Err(TlsError::PeerUnauthenticated)),
        "{server:?}"
    );
    let client_err = client_err.expect("the client saw the refusal");
    assert!(
        client_err.contains("CertificateRequired") || client_err.contains("certificate"),
        "{client_err}"
    );
}

#[test]
fn a_source_from_another_ca_is_refused_on_both_sides() {
    let p = pki();
    let other = TestCa::new("another CA")
        .unwrap()
        .issue("intruder")
        .unwrap();
    // The intruder trusts the real CA (so it would accept the
    // destination) but its own certificate comes from another CA.
    let intruder = TestIdentity {
        ca_pem: p.dst.ca_pem.clone(),
        ..other
    };
    let (addr, h) = listen(p.dst.config().unwrap());
    let client = dial(&intruder.config().unwrap(), addr);
    let server = h.join().unwrap();
    assert!(
        matches!(server, Err(TlsError::UntrustedPeer(_))),
        "{server:?}"
    );
    assert!(
        matches!(client, Err(TlsError::RefusedByPeer(_))),
        "{:?}",
        client.err()
    );
}

#[test]
fn a_destination_from_another_ca_is_refused_on_both_sides() {
    let p = pki();
    let other = TestCa::new("another CA")
        .unwrap()
        .issue("impostor")
        .unwrap();
    let impostor = TestIdentity {
        ca_pem: p.dst.ca_pem.clone(),
        ..other
    };
    let (addr, h) = listen(impostor.config().unwrap());
    let client = dial(&p.src.config().unwrap(), addr);
    let server = h.join().unwrap();
    assert!(
        matches!(client, Err(TlsError::UntrustedPeer(_))),
        "{:?}",
        client.err()
    );
    assert!(
        matches!(server, Err(TlsError::RefusedByPeer(_))),
        "{server:?}"
    );
}

/// A plain-TCP source meets a TLS destination: the destination refuses
/// it before any record is parsed (no engine ever runs there), and the
/// source's migration fails before its point of no return with its
/// guest running.
#[test]
fn a_plain_tcp_source_is_refused_before_any_record_is_parsed() {
    let p = pki();
    let (addr, h) = listen(p.dst.config().unwrap());
    let (src, _dst, clock) = guests(4 << 20, 50_000.0);
    let mut t = StreamTransport::connect_tcp(addr).unwrap();
    let mut e = source_engine(&src, Precopy::default(), clock);
    let r = run_source(&mut e, &mut t, TIMEOUT);
    let server = h.join().unwrap();
    assert!(matches!(server, Err(TlsError::NotTls(_))), "{server:?}");
    let err = r.expect_err("a plain source cannot migrate to a TLS destination");
    assert_ne!(err.kind(), migrate_core::ErrorKind::Settle, "{err}");
    assert!(!src.is_paused(), "the source guest runs after the refusal");
}

#[test]
fn a_second_connection_joins_its_session_and_another_session_is_refused() {
    let p = pki();
    let (src_cfg, dst_cfg) = (p.src.config().unwrap(), p.dst.config().unwrap());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let mut session = TlsSession::acceptor();
        let mut out = Vec::new();
        for _ in 0..3 {
            let (s, _) = l.accept().unwrap();
            out.push(tls::accept(&dst_cfg, s, &mut session).map(|_| ()));
        }
        (out, session)
    });
    let mut session = TlsSession::initiator(&src_cfg).unwrap();
    let c = |s: &mut TlsSession| {
        tls::connect(&src_cfg, TcpStream::connect(addr).unwrap(), "127.0.0.1", s).map(|_| ())
    };
    c(&mut session).expect("first connection");
    c(&mut session).expect("second connection of the same session");
    let mut stranger = TlsSession::initiator(&src_cfg).unwrap();
    let third = c(&mut stranger);
    let (results, dst_session) = server.join().unwrap();
    assert!(results[0].is_ok() && results[1].is_ok(), "{results:?}");
    assert!(
        matches!(results[2], Err(TlsError::SessionMismatch)),
        "{results:?}"
    );
    assert!(matches!(third, Err(TlsError::SessionMismatch)), "{third:?}");
    assert_eq!(session.connections(), 2);
    assert_eq!(dst_session.connections(), 2);
    assert_eq!(dst_session.id(), session.id());
}

#[test]
fn bad_pem_is_a_config_error() {
    let p = pki();
    let r = TlsConfig::from_pem(
        b"not a certificate",
        p.src.key_pem.as_bytes(),
        p.src.ca_pem.as_bytes(),
    );
    assert!(matches!(r, Err(TlsError::Config(_))), "{r:?}");
    let r = TlsConfig::from_pem(p.src.cert_pem.as_bytes(), b"", p.src.ca_pem.as_bytes());
    assert!(matches!(r, Err(TlsError::Config(_))), "{r:?}");
    let r = TlsConfig::from_pem_files(
        "/nonexistent/c.pem".as_ref(),
        "/nonexistent/k.pem".as_ref(),
        "/nonexistent/ca.pem".as_ref(),
    );
    assert!(matches!(r, Err(TlsError::Config(_))), "{r:?}");
}

#[test]
fn postcopy_recovers_over_a_new_tls_connection_of_the_same_session() {
    use backend_sim::{Fault, FaultAt, FaultPlan, FaultyTransport};
    use migrate_core::driver::{run_destination_recoverable, run_source_recoverable};
    use migrate_core::protocol::RecordType;
    use migrate_core::transport::{accept_within, TransportError};
    use migrate_core::DestinationEngine;

    type Link = FaultyTransport<StreamTransport<TlsStream>>;
    let tls_err = |e: TlsError| TransportError::Io(std::io::Error::other(e));
    let p = pki();
    let (src_cfg, dst_cfg) = (p.src.config().unwrap(), p.dst.config().unwrap());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (src, dst, clock) = guests(4 << 20, 5_000.0);
    let (d, c) = (dst.clone(), clock.clone());
    let dest = std::thread::spawn(move || {
        // Every connection of the migration joins one session: the
        // first fixes its id and the source's certificate.
        let mut session = TlsSession::acceptor();
        let s = accept_within(&l, TIMEOUT).unwrap();
        let mut t = FaultyTransport::new(tls::accept(&dst_cfg, s, &mut session).unwrap(), None);
        let mut e = DestinationEngine::new(d.pages(), d.control(), c);
        e.set_recover_timeout(Some(TIMEOUT));
        let mut refused = 0;
        let mut again = |left: Duration| -> Result<Link, TransportError> {
            let s = accept_within(&l, left)?;
            match tls::accept(&dst_cfg, s, &mut session) {
                Ok(t) => Ok(FaultyTransport::new(t, None)),
                Err(e) => {
                    refused += 1;
                    Err(tls_err(e))
                }
            }
        };
        let r = run_destination_recoverable(&mut e, &mut t, None, &mut again, TIMEOUT);
        (r, refused, session.connections())
    });
    let mut session = TlsSession::initiator(&src_cfg).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    let first = tls::connect(&src_cfg, sock, "localhost", &mut session).unwrap();
    // The first page batch of the push never arrives: the link is cut.
    let plan = FaultPlan::new(
        Fault::Cut,
        FaultAt::FirstOfType(RecordType::PageBatch as u8),
    );
    let mut t = FaultyTransport::new(first, Some(plan));
    let mut e = recovering_postcopy_source(&src, clock, TIMEOUT);
    let mut intruded = false;
    let mut again = |_left: Duration| -> Result<Link, TransportError> {
        if !intruded {
            // A holder of a certificate from the same CA, in another
            // session, is refused by the TLS binding before any record.
            intruded = true;
            let other = p.src.config().unwrap();
            let mut theirs = TlsSession::initiator(&other).unwrap();
            let sock = TcpStream::connect(addr)?;
            let r = tls::connect(&other, sock, "localhost", &mut theirs);
            assert!(matches!(r, Err(TlsError::SessionMismatch)), "{r:?}");
        }
        let sock = TcpStream::connect(addr)?;
        let t = tls::connect(&src_cfg, sock, "localhost", &mut session).map_err(tls_err)?;
        Ok(FaultyTransport::new(t, None))
    };
    let stats = run_source_recoverable(&mut e, &mut t, &mut again, TIMEOUT).expect("source");
    let (report, refused, connections) = dest.join().unwrap();
    let report = report.expect("destination");
    assert_eq!(stats.postcopy.unwrap().recoveries, 1);
    assert_eq!(report.recoveries, 1);
    assert_eq!(refused, 1, "the other session's connection was refused");
    assert_eq!(connections, 2, "two connections of one session");
    assert_eq!(report.digest.unwrap(), src.digest());
    assert_eq!(dst.absent_pages(), 0);
    assert!(src.is_paused() && !dst.is_paused());
}
