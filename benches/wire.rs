//! Throughput of the migration stream over loopback TCP, next to raw
//! TCP between the same two threads with the same write size.
//!
//! Run with `cargo bench --bench wire`. It first moves `TOTAL` bytes over
//! a plain loopback `TcpStream` in writes of one batch's size (the raw
//! figure), then moves the same guest bytes through the library as the
//! engines do: the sender reads pages from a source buffer straight into
//! page-batch frames (`encode_page_batch_from`), numbers them
//! (`Sequencer`) and sends them on a `StreamTransport` over TCP; the
//! receiver checks each frame with a sequenced `Decoder` while copying
//! its pages into a destination buffer (`Decoder::decode_placing`, as a
//! destination does before its guest runs). After each run the
//! destination buffer is compared with the source byte for byte.
//!
//! The data: pages of random bytes (incompressible), pages of text-like
//! bytes (a small alphabet, which compresses), and zero pages (sent as a
//! flag). Each line gives guest bytes moved per second and the ratio to
//! the raw figure measured just before it; zeros move faster than raw
//! because their pages carry no data. The stream runs without a
//! compressor, with LZ4 and with Zstandard at level 1 (each batch
//! compressed with `BatchCompressor`, sent as it was where that does not
//! save an eighth, expanded with `BatchExpander`), over one connection
//! for everything (`StreamTransport`) and over a control connection and
//! 2 or 4 data connections (`MultiTransport`); the connections column
//! counts the connections that carry pages. One more line per data runs
//! the stream over one connection under mutual TLS (certificates from a
//! test CA made at start), to set TLS against plain TCP on the same data.
//!
//! Each figure is the median of `RUNS` runs, raw and stream interleaved,
//! so a machine shared with other work moves both alike.
//!
//! `cargo bench --bench wire -- random plain` runs a part: words among
//! `random`, `text` and `zero` pick the data, `plain` keeps only the
//! stream without compressor or TLS.

use livemig::core::copy::copy_bytes;
use livemig::core::protocol::PageBatch;
use livemig::core::protocol::{
    encode, encode_page_batch_from, BatchCompressor, BatchExpander, Capabilities, Codec, Decoder,
    Placed, Record, Sequencer, VERSION,
};
use livemig::core::tls::test_pki::TestCa;
use livemig::core::tls::{self, TlsConfig, TlsSession};
use livemig::core::transport::{StreamTransport, Transport};
use livemig::core::MultiTransport;
use livemig::core::{MemoryLayout, PageNum, PageSize};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Page size of the guest.
const PAGE: usize = 4096;
/// Pages per batch (the engine's default batch is 256 pages).
const BATCH: usize = 256;
/// Size of the source and destination buffers.
const MEM: usize = 64 << 20;
/// Bytes of guest memory moved by one run (the buffer, several times).
const TOTAL: usize = 1 << 30;
/// Runs per figure.
const RUNS: usize = 5;
/// How long a receiver waits for a frame before the run is abandoned.
const PEER_TIMEOUT: Duration = Duration::from_secs(120);

#[path = "support/splitmix.rs"]
mod splitmix;
#[path = "support/text.rs"]
mod text;
use splitmix::SplitMix64;

#[derive(Clone, Copy)]
enum Data {
    Random,
    Text,
    Zeros,
}

impl Data {
    fn name(self) -> &'static str {
        match self {
            Data::Random => "random (incompressible)",
            Data::Text => "text-like (compressible)",
            Data::Zeros => "zero pages",
        }
    }

    fn fill(self, buf: &mut [u8]) {
        let mut rng = SplitMix64(0x5EED);
        match self {
            Data::Random => rng.fill(buf),
            Data::Text => text::fill(&mut rng, buf),
            // Written, so the pages are resident like guest memory.
            Data::Zeros => buf.fill(0),
        }
    }
}

fn loopback() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let a = TcpStream::connect(l.local_addr().expect("address")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    a.set_nodelay(true).expect("nodelay");
    b.set_nodelay(true).expect("nodelay");
    (a, b)
}

/// Raw TCP: `TOTAL` bytes in writes of one batch's size; seconds.
fn raw_tcp(src: &[u8]) -> f64 {
    let (mut tx, mut rx) = loopback();
    let chunk = BATCH * PAGE;
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut sent = 0;
            while sent < TOTAL {
                let at = sent % MEM;
                tx.write_all(&src[at..at + chunk]).expect("raw write");
                sent += chunk;
            }
        });
        let mut buf = vec![0u8; chunk];
        let mut got = 0;
        while got < TOTAL {
            let n = rx.read(&mut buf).expect("raw read");
            assert!(n > 0, "raw stream closed early");
            got += n;
        }
    });
    start.elapsed().as_secs_f64()
}

fn frame_of(record: &Record<'_>, seq: &mut Sequencer) -> Vec<u8> {
    let mut f = Vec::new();
    encode(record, &mut f);
    seq.seal(&mut f);
    f
}

/// Copies the pages of `batch` into `dst`; how many bytes of guest
/// memory that was.
fn place(batch: &PageBatch<'_>, dst: &mut [u8]) -> usize {
    for (gfn, data) in batch.iter() {
        place_page(dst, gfn, data);
    }
    batch.len() * PAGE
}

/// Copies one page into `dst` as a sink does, or zero-fills it.
fn place_page(dst: &mut [u8], gfn: PageNum, data: Option<&[u8]>) {
    let at = gfn as usize * PAGE;
    let page = &mut dst[at..at + PAGE];
    match data {
        Some(d) => copy_bytes(page, d),
        None => page.fill(0),
    }
}

/// Reads `pages` out of `src` into `out` as a backend's `read_pages` does.
fn read_pages(src: &[u8], pages: &[PageNum], out: &mut [u8]) {
    for (p, slot) in pages.iter().zip(out.chunks_exact_mut(PAGE)) {
        let at = *p as usize * PAGE;
        copy_bytes(slot, &src[at..at + PAGE]);
    }
}

/// The two ends of the library's transport over loopback TCP: one
/// connection for everything (`StreamTransport`), or a control and
/// `connections` data connections (`MultiTransport`).
fn transports(connections: usize, tls: Option<&Pki>) -> (Box<dyn Transport>, Box<dyn Transport>) {
    if let Some(pki) = tls {
        return tls_transports(pki);
    }
    if connections == 1 {
        let (a, b) = loopback();
        return (
            Box::new(StreamTransport::new(a).expect("sender transport")),
            Box::new(StreamTransport::new(b).expect("receiver transport")),
        );
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = l.local_addr().expect("address");
    let acceptor = std::thread::spawn(move || {
        MultiTransport::accept(|| {
            let (s, _) = l.accept()?;
            s.set_nodelay(true)?;
            Ok(s)
        })
        .expect("accept connections")
    });
    let tx = MultiTransport::connect(connections, || {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Ok(s)
    })
    .expect("connect");
    let rx = acceptor.join().expect("acceptor");
    (Box::new(tx), Box::new(rx))
}

/// The source's and the destination's TLS configurations, both issued by
/// one test CA made at start.
struct Pki {
    source: TlsConfig,
    destination: TlsConfig,
}

impl Pki {
    fn new() -> Self {
        let ca = TestCa::new("wire bench CA").expect("test CA");
        let config = |name| {
            ca.issue(name)
                .and_then(|i| i.config())
                .expect("certificate")
        };
        Pki {
            source: config("source"),
            destination: config("destination"),
        }
    }
}

/// One loopback TCP connection under mutual TLS, as `kvm-migrate --tls-*`
/// sets it up (`StreamTransport` over `tls::TlsStream`).
fn tls_transports(pki: &Pki) -> (Box<dyn Transport>, Box<dyn Transport>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = l.local_addr().expect("address");
    let dst = pki.destination.clone();
    let acceptor = std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        tls::accept(&dst, s, &mut TlsSession::acceptor()).expect("TLS accept")
    });
    let mut session = TlsSession::initiator(&pki.source).expect("TLS session");
    let sock = TcpStream::connect(addr).expect("connect");
    sock.set_nodelay(true).expect("nodelay");
    let tx = tls::connect(&pki.source, sock, "localhost", &mut session).expect("TLS connect");
    let rx = acceptor.join().expect("acceptor");
    (Box::new(tx), Box::new(rx))
}

/// The library's stream with `connections` TCP connections for pages (or
/// one under mutual TLS if `tls` is given), page batches compressed with
/// `codec` if given (each batch that pays); seconds. The destination
/// buffer must equal `src` afterwards.
fn stream(
    src: &[u8],
    dst: &mut [u8],
    connections: usize,
    codec: Option<Codec>,
    tls: Option<&Pki>,
) -> f64 {
    let (mut tx, mut rx) = transports(connections, tls);
    let layout = MemoryLayout::flat(PageSize::DEFAULT, MEM as u64).expect("layout");
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut seq = Sequencer::new();
            tx.send(&frame_of(&Record::Header { version: VERSION }, &mut seq))
                .expect("send header");
            tx.send(&frame_of(&Record::Layout(layout), &mut seq))
                .expect("send layout");
            let mut frame = Vec::new();
            let mut compressor = codec.map(|c| BatchCompressor::new(c).expect("codec"));
            let mut gfns: Vec<PageNum> = Vec::with_capacity(BATCH);
            let mut sent = 0;
            while sent < TOTAL {
                let at = sent % MEM;
                gfns.clear();
                gfns.extend((0..BATCH as u64).map(|i| (at / PAGE) as u64 + i));
                frame.clear();
                encode_page_batch_from(
                    1,
                    PageSize::DEFAULT,
                    &gfns,
                    &[],
                    |p: &[PageNum], out: &mut [u8]| {
                        read_pages(src, p, out);
                        Ok::<(), ()>(())
                    },
                    &mut frame,
                )
                .expect("read pages");
                if let Some(c) = &mut compressor {
                    c.compress(&mut frame);
                }
                seq.seal(&mut frame);
                tx.send(&frame).expect("send batch");
                sent += BATCH * PAGE;
            }
        });
        let mut dec = Decoder::sequenced();
        dec.accept(Capabilities::ALL);
        let mut expander = BatchExpander::new();
        let mut got = 0;
        while got < TOTAL {
            let f = rx
                .recv(Some(PEER_TIMEOUT))
                .expect("receive")
                .expect("a frame within the peer timeout");
            let placed = dec.decode_placing(&f, |gfn, data| {
                place_page(dst, gfn, data);
                Ok::<(), ()>(())
            });
            match placed.expect("decode") {
                Placed::Batch { pages, .. } => got += pages * PAGE,
                Placed::Record(Record::CompressedBatch(packed)) => {
                    let batch = expander.expand(&packed, PageSize::DEFAULT).expect("expand");
                    got += place(&batch, dst);
                }
                Placed::Record(Record::Header { .. } | Record::Layout(_)) => {}
                Placed::Record(other) => panic!("unexpected record {:?}", other.record_type()),
            }
        }
    });
    start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let started = Instant::now();
    println!(
        "livemig wire throughput over loopback TCP, {} MiB of guest memory per run, \
         {}-page batches of {} KiB pages, median of {RUNS} runs; GB = 10^9 bytes",
        TOTAL >> 20,
        BATCH,
        PAGE >> 10
    );
    let mut src = vec![0u8; MEM];
    let mut dst = vec![0xA5u8; MEM];
    let mut rows = Vec::new();
    let codecs = [None, Some(Codec::Lz4), Some(Codec::Zstd { level: 1 })];
    // (data connections, compressor, mutual TLS)
    let mut variants: Vec<(usize, Option<Codec>, bool)> = [1, 2, 4]
        .into_iter()
        .flat_map(|n| codecs.iter().map(move |c| (n, *c, false)))
        .collect();
    variants.push((1, None, true));
    // `cargo bench --bench wire -- WORD…`: `random`, `text` or `zero`
    // keep those data, `plain` keeps the stream without compressor or TLS.
    let words: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if words.iter().any(|w| w == "plain") {
        variants.retain(|(_, codec, tls)| codec.is_none() && !tls);
    }
    let picked = |d: Data| {
        let named: Vec<&String> = words.iter().filter(|w| *w != "plain").collect();
        named.is_empty() || named.iter().any(|w| d.name().contains(w.as_str()))
    };
    let pki = Pki::new();
    for data in [Data::Random, Data::Text, Data::Zeros]
        .into_iter()
        .filter(|d| picked(*d))
    {
        data.fill(&mut src);
        let mut raw = Vec::with_capacity(RUNS);
        let mut ours = vec![Vec::with_capacity(RUNS); variants.len()];
        for _ in 0..RUNS {
            raw.push(raw_tcp(&src));
            for ((connections, codec, tls), times) in variants.iter().zip(&mut ours) {
                dst.fill(0xA5);
                let tls = tls.then_some(&pki);
                times.push(stream(&src, &mut dst, *connections, *codec, tls));
                assert!(dst == src, "destination differs from the source");
            }
        }
        let raw_gbps = TOTAL as f64 / median(raw) / 1e9;
        rows.push([
            data.name().to_owned(),
            "raw TCP".to_owned(),
            "1".to_owned(),
            "-".to_owned(),
            format!("{raw_gbps:.2}"),
            "1.000".to_owned(),
        ]);
        for ((connections, codec, tls), times) in variants.iter().zip(ours) {
            let gbps = TOTAL as f64 / median(times) / 1e9;
            let name = match codec {
                None => "none".to_owned(),
                Some(Codec::Zstd { level }) => format!("zstd {level}"),
                Some(c) => c.name().to_owned(),
            };
            rows.push([
                data.name().to_owned(),
                if *tls {
                    "livemig stream, mutual TLS".to_owned()
                } else {
                    "livemig stream".to_owned()
                },
                connections.to_string(),
                name,
                format!("{gbps:.2}"),
                format!("{:.3}", gbps / raw_gbps),
            ]);
        }
        eprintln!("({} done)", data.name());
    }
    let head = [
        "data",
        "path",
        "connections",
        "compressor",
        "GB/s",
        "ratio to raw",
    ];
    println!();
    println!("| {} |", head.join(" | "));
    println!("|---|---|---:|---|---:|---:|");
    for r in &rows {
        println!("| {} |", r.join(" | "));
    }
    eprintln!("(ran in {:.1} s)", started.elapsed().as_secs_f64());
}
