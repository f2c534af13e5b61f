//! Throughput of the stream transport over loopback TCP, plain and with
//! mutual TLS, on the same frames, and their ratio.
//!
//! ```text
//! cargo run --release --example tls-wire -- --total 2GiB --frame 256KiB --runs 3
//! ```
//!
//! Each run sends `--total` bytes in frames of `--frame` bytes (pseudo-
//! random content, as guest pages are to a cipher) from one thread to a
//! receiver on another, which acknowledges the last frame; the rate is
//! bytes over the time from the first send to the acknowledgement. Plain
//! and TLS runs alternate; the median of each is reported. The TLS
//! certificates are made at start (a CA and one certificate per end).

use clap::Parser;
use livemig::core::tls::test_pki::TestCa;
use livemig::core::tls::{self, TlsConfig, TlsSession};
use livemig::core::{StreamTransport, Transport};
use livemig::units::parse_size;
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Plain TCP against mutual TLS on the same frames.
#[derive(Parser, Debug)]
#[command(
    about,
    after_help = "Exit codes: 0 measured; 1 a connection, handshake or transfer failed (the sizes are checked by clap, invalid ones exit with 2)."
)]
struct Args {
    /// Bytes sent per run.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    total: u64,
    /// Bytes per frame (at most the protocol's frame limit).
    #[arg(long, default_value = "256KiB", value_parser = parse_size)]
    frame: u64,
    /// Runs of each kind.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

const TIMEOUT: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tls-wire: {e}");
            ExitCode::from(1)
        }
    }
}

/// A connected pair: (sender, receiver).
type Pair = (Box<dyn Transport>, Box<dyn Transport>);

fn plain_pair() -> Result<Pair, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let a = StreamTransport::connect_tcp(addr).map_err(|e| e.to_string())?;
    let (s, _) = l.accept().map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let b = StreamTransport::new(s).map_err(|e| e.to_string())?;
    Ok((Box::new(a), Box::new(b)))
}

fn tls_pair(src: &TlsConfig, dst: &TlsConfig) -> Result<Pair, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let dst = dst.clone();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().map_err(|e| e.to_string())?;
        tls::accept(&dst, s, &mut TlsSession::acceptor()).map_err(|e| e.to_string())
    });
    let mut session = TlsSession::initiator(src).map_err(|e| e.to_string())?;
    let sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let a = tls::connect(src, sock, "localhost", &mut session).map_err(|e| e.to_string())?;
    let b = server
        .join()
        .map_err(|_| "the accepting thread panicked".to_string())??;
    Ok((Box::new(a), Box::new(b)))
}

/// Sends `total` bytes in `frame`-sized frames and returns bytes/s.
fn measure((mut tx, mut rx): Pair, data: &[u8], total: u64) -> Result<f64, String> {
    let frames = total.div_ceil(data.len() as u64);
    tx.set_send_timeout(Some(TIMEOUT));
    let receiver = std::thread::spawn(move || -> Result<u64, String> {
        let mut bytes = 0u64;
        for _ in 0..frames {
            let f = rx
                .recv(Some(TIMEOUT))
                .map_err(|e| e.to_string())?
                .ok_or("receive timed out")?;
            bytes += f.len() as u64;
        }
        rx.send(b"done").map_err(|e| e.to_string())?;
        Ok(bytes)
    });
    let start = Instant::now();
    for _ in 0..frames {
        tx.send(data).map_err(|e| e.to_string())?;
    }
    tx.recv(Some(TIMEOUT))
        .map_err(|e| e.to_string())?
        .ok_or("no acknowledgement")?;
    let secs = start.elapsed().as_secs_f64();
    let bytes = receiver
        .join()
        .map_err(|_| "the receiving thread panicked".to_string())??;
    if bytes != frames * data.len() as u64 {
        return Err(format!(
            "received {bytes} bytes of {}",
            frames * data.len() as u64
        ));
    }
    Ok(bytes as f64 / secs)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn run(a: &Args) -> Result<(), String> {
    let max = livemig::core::protocol::MAX_FRAME_LEN as u64;
    if a.frame == 0 || a.frame > max || a.runs == 0 {
        return Err(format!("--frame from 1 to {max} bytes, --runs at least 1"));
    }
    let ca = TestCa::new("tls-wire CA").map_err(|e| e.to_string())?;
    let src = ca
        .issue("source")
        .and_then(|i| i.config())
        .map_err(|e| e.to_string())?;
    let dst = ca
        .issue("destination")
        .and_then(|i| i.config())
        .map_err(|e| e.to_string())?;
    // xorshift: content a cipher cannot shortcut, the same for both kinds.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..a.frame)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    for _ in 0..a.runs {
        plain.push(measure(plain_pair()?, &data, a.total)?);
        tls.push(measure(tls_pair(&src, &dst)?, &data, a.total)?);
    }
    let (p, t) = (median(&mut plain), median(&mut tls));
    let mb = |r: f64| r / 1e6;
    println!(
        "{} MiB per run in {} KiB frames, {} runs each, median:",
        a.total >> 20,
        a.frame >> 10,
        a.runs
    );
    println!("plain TCP  {:>8.0} MB/s", mb(p));
    println!("mutual TLS {:>8.0} MB/s", mb(t));
    println!("TLS/plain  {:>8.2}", t / p);
    Ok(())
}
