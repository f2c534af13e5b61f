//! The agreement on which frames move, before a Xen migration between two
//! processes: an offer and an answer in the core protocol's own records,
//! on the transport the migration then uses.
//!
//! ```text
//!  source                                        destination
//!  Header, Layout (its frames),
//!  DeviceState "xen-frames" (kind, rings) ─────▶ prepare the domain
//!                      ◀───── Header, Layout (the frames both move)
//!                      ◀───── or Header, Abort (why not)
//! ```
//!
//! The Xen part of the offer (whether the source is PV, and where a PV
//! source's xenstore and console rings are) travels as an opaque
//! `DeviceState` of format [`FRAMES_FORMAT`]: the core carries it without
//! reading it. Each direction is a session of its own (a header, then
//! its records), so the migration stream that follows starts afresh.

use crate::domain::SourceFrames;
use crate::frame::Pfn;
use migrate_core::protocol::{encode, Decoder, ProtocolError, Record, VERSION};
use migrate_core::transport::TransportError;
use migrate_core::MemoryLayout;
use migrate_core::{DeviceState, Transport};
use std::time::Duration;

/// The format name of the offer's Xen part.
pub const FRAMES_FORMAT: &str = "xen-frames";
/// The version of that format.
pub const FRAMES_VERSION: u32 = 1;
/// Bytes of the Xen part: kind (0 HVM/PVH, 1 PV), then the xenstore and
/// console ring frames (u64 little-endian each).
const FRAMES_LEN: usize = 17;

/// Why the agreement failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The connection failed or timed out.
    #[error("handshake: {0}")]
    Transport(#[from] TransportError),
    /// The peer sent a frame that is not a valid record.
    #[error("handshake: {0}")]
    Protocol(#[from] ProtocolError),
    /// The peer sent a valid record where another was due.
    #[error("handshake: expected {expected}, got a {got:?} record")]
    Unexpected {
        /// What was due.
        expected: &'static str,
        /// What came.
        got: migrate_core::protocol::RecordType,
    },
    /// The offer's Xen part is not one this version reads.
    #[error("handshake: {0}")]
    BadOffer(String),
    /// The destination refused, saying why.
    #[error("the receiver refused: {0}")]
    Refused(String),
    /// The destination answered frames that a PV source cannot move (a PV
    /// destination takes exactly the source's frames).
    #[error("the receiver would move other frames than the PV source has")]
    NotTheSourceFrames,
}

/// Why a destination's answer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnswerError<E> {
    /// Preparing the destination failed; the source was told why.
    #[error("{0}")]
    Prepare(E),
    /// The exchange itself failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}

/// The source's side: offers `frames` and returns the frames the
/// destination agreed to move (a subset of the offer for HVM/PVH, exactly
/// the offer for PV).
pub fn offer<X: Transport + ?Sized>(
    transport: &mut X,
    frames: &SourceFrames,
    timeout: Duration,
) -> Result<MemoryLayout, HandshakeError> {
    let mut data = Vec::with_capacity(FRAMES_LEN);
    data.push(u8::from(frames.pv));
    data.extend_from_slice(&frames.store_pfn.0.to_le_bytes());
    data.extend_from_slice(&frames.console_pfn.0.to_le_bytes());
    send(
        transport,
        &[
            Record::Header { version: VERSION },
            Record::Layout(frames.layout.clone()),
            Record::DeviceState(DeviceState {
                format: FRAMES_FORMAT.into(),
                version: FRAMES_VERSION,
                data,
            }),
        ],
    )?;
    let mut d = Decoder::new();
    expect_header(transport, &mut d, timeout)?;
    let frame = recv(transport, timeout)?;
    let agreed = match d.decode(&frame)? {
        Record::Layout(l) => l,
        Record::Abort { reason } => return Err(HandshakeError::Refused(reason)),
        other => {
            return Err(HandshakeError::Unexpected {
                expected: "the agreed layout",
                got: other.record_type(),
            })
        }
    };
    if frames.pv && agreed != frames.layout {
        return Err(HandshakeError::NotTheSourceFrames);
    }
    Ok(agreed)
}

/// The destination's side: reads the offer, hands it to `prepare` (which
/// readies the destination and returns the frames both will move, or why
/// it cannot), and answers. Returns what `prepare` returned, with the
/// offer.
pub fn answer<X, T, E, F>(
    transport: &mut X,
    timeout: Duration,
    prepare: F,
) -> Result<(T, SourceFrames), AnswerError<E>>
where
    X: Transport + ?Sized,
    E: std::fmt::Display,
    F: FnOnce(&SourceFrames) -> Result<(T, MemoryLayout), E>,
{
    let frames = read_offer(transport, timeout)?;
    let header = Record::Header { version: VERSION };
    match prepare(&frames) {
        Ok((value, agreed)) => {
            send(transport, &[header, Record::Layout(agreed)]).map_err(HandshakeError::from)?;
            Ok((value, frames))
        }
        Err(e) => {
            let reason = e.to_string();
            // The refusal is a courtesy: the source learns why instead of
            // seeing the connection drop.
            let _ = send(transport, &[header, Record::Abort { reason }]);
            Err(AnswerError::Prepare(e))
        }
    }
}

/// Reads a source's offer.
fn read_offer<X: Transport + ?Sized>(
    transport: &mut X,
    timeout: Duration,
) -> Result<SourceFrames, HandshakeError> {
    let mut d = Decoder::new();
    expect_header(transport, &mut d, timeout)?;
    let frame = recv(transport, timeout)?;
    let layout = match d.decode(&frame)? {
        Record::Layout(l) => l,
        other => {
            return Err(HandshakeError::Unexpected {
                expected: "the source's layout",
                got: other.record_type(),
            })
        }
    };
    let frame = recv(transport, timeout)?;
    let state = match d.decode(&frame)? {
        Record::DeviceState(s) => s,
        other => {
            return Err(HandshakeError::Unexpected {
                expected: "the offer's Xen part",
                got: other.record_type(),
            })
        }
    };
    if state.format != FRAMES_FORMAT || state.version != FRAMES_VERSION {
        return Err(HandshakeError::BadOffer(format!(
            "an offer of format {:?} version {}, not {FRAMES_FORMAT:?} version {FRAMES_VERSION}",
            state.format, state.version
        )));
    }
    let b = &state.data;
    if b.len() != FRAMES_LEN || b[0] > 1 {
        return Err(HandshakeError::BadOffer(format!(
            "a Xen part of {} bytes with kind {:?}",
            b.len(),
            b.first()
        )));
    }
    let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    Ok(SourceFrames {
        pv: b[0] == 1,
        layout,
        store_pfn: Pfn(word(1)),
        console_pfn: Pfn(word(9)),
    })
}

fn send<X: Transport + ?Sized>(
    transport: &mut X,
    records: &[Record<'_>],
) -> Result<(), TransportError> {
    for r in records {
        let mut frame = Vec::new();
        encode(r, &mut frame);
        transport.send(&frame)?;
    }
    Ok(())
}

fn recv<X: Transport + ?Sized>(
    transport: &mut X,
    timeout: Duration,
) -> Result<Vec<u8>, TransportError> {
    match transport.recv(Some(timeout))? {
        Some(frame) => Ok(frame.to_vec()),
        None => Err(TransportError::Timeout(timeout)),
    }
}

fn expect_header<X: Transport + ?Sized>(
    transport: &mut X,
    d: &mut Decoder,
    timeout: Duration,
) -> Result<(), HandshakeError> {
    let frame = recv(transport, timeout)?;
    match d.decode(&frame)? {
        Record::Header { .. } => Ok(()),
        other => Err(HandshakeError::Unexpected {
            expected: "a header",
            got: other.record_type(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migrate_core::transport::channel_pair;
    use migrate_core::{PageSize, Region};

    const T: Duration = Duration::from_secs(5);

    fn layout(regions: &[(u64, u64)]) -> MemoryLayout {
        let r = regions
            .iter()
            .map(|&(first_page, pages)| Region { first_page, pages })
            .collect();
        MemoryLayout::new(PageSize::DEFAULT, r).unwrap()
    }

    fn pv_frames() -> SourceFrames {
        SourceFrames {
            pv: true,
            layout: layout(&[(0, 18945), (0x4a03, 13821)]),
            store_pfn: Pfn(0x4a01),
            console_pfn: Pfn(0x4a02),
        }
    }

    #[test]
    fn an_offer_arrives_whole_and_the_answer_is_the_agreed_layout() {
        let (mut a, mut b) = channel_pair(16);
        let offered = pv_frames();
        let common = offered.layout.clone();
        let dest = std::thread::spawn(move || {
            answer(&mut b, T, |f| Ok::<_, String>(((), f.layout.clone()))).map(|(_, f)| f)
        });
        assert_eq!(offer(&mut a, &offered, T).unwrap(), common);
        assert_eq!(dest.join().unwrap().unwrap(), offered);
    }

    #[test]
    fn an_hvm_destination_may_move_fewer_frames() {
        let (mut a, mut b) = channel_pair(16);
        let offered = SourceFrames {
            pv: false,
            layout: layout(&[(0, 100)]),
            store_pfn: Pfn(0),
            console_pfn: Pfn(0),
        };
        let fewer = layout(&[(0, 90)]);
        let answered = fewer.clone();
        let dest = std::thread::spawn(move || {
            answer(&mut b, T, |_| Ok::<_, String>(((), answered))).map(|(_, f)| f)
        });
        assert_eq!(offer(&mut a, &offered, T).unwrap(), fewer);
        assert!(!dest.join().unwrap().unwrap().pv);
    }

    #[test]
    fn a_refusal_reaches_the_source_with_its_reason() {
        let (mut a, mut b) = channel_pair(16);
        let dest = std::thread::spawn(move || {
            match answer(&mut b, T, |_| {
                Err::<((), MemoryLayout), _>("domain 4 is running")
            }) {
                Err(AnswerError::Prepare(reason)) => reason,
                other => panic!("{other:?}"),
            }
        });
        match offer(&mut a, &pv_frames(), T) {
            Err(HandshakeError::Refused(r)) => assert_eq!(r, "domain 4 is running"),
            other => panic!("{other:?}"),
        }
        assert_eq!(dest.join().unwrap(), "domain 4 is running");
    }

    #[test]
    fn a_pv_source_refuses_other_frames_than_its_own() {
        let (mut a, mut b) = channel_pair(16);
        let dest = std::thread::spawn(move || {
            let _ = answer(&mut b, T, |_| Ok::<_, String>(((), layout(&[(0, 5)]))));
        });
        assert!(matches!(
            offer(&mut a, &pv_frames(), T),
            Err(HandshakeError::NotTheSourceFrames)
        ));
        dest.join().unwrap();
    }

    #[test]
    fn offers_of_another_format_or_shape_are_refused() {
        for (format, version, data) in [
            ("xen-frames", 2, vec![0u8; FRAMES_LEN]),
            ("kvm", 1, vec![0u8; FRAMES_LEN]),
            ("xen-frames", 1, vec![0u8; FRAMES_LEN - 1]),
            ("xen-frames", 1, vec![2u8; FRAMES_LEN]),
        ] {
            let (mut a, mut b) = channel_pair(16);
            send(
                &mut a,
                &[
                    Record::Header { version: VERSION },
                    Record::Layout(layout(&[(0, 1)])),
                    Record::DeviceState(DeviceState {
                        format: format.into(),
                        version,
                        data,
                    }),
                ],
            )
            .unwrap();
            let got = answer(&mut b, T, |_| -> Result<((), MemoryLayout), String> {
                panic!("a bad offer reached prepare")
            });
            assert!(
                matches!(
                    got,
                    Err(AnswerError::Handshake(HandshakeError::BadOffer(_)))
                ),
                "{format} {version}: {got:?}"
            );
        }
    }
}
