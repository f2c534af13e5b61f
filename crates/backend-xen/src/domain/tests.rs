//! Backend tests that need no Xen: bitmap conversion, batching, layouts,
//! and the errors on a host without Xen.

use super::{batches, bitmap_from_xen, layout_mask, regions_of, MAP_BATCH};
use crate::{Xen, XenError};
use migrate_core::{MemoryLayout, PageSize, Region};

fn pvh_like() -> MemoryLayout {
    // RAM below 128 MiB and a few special frames just under 4 GiB, as a
    // PVH domain has them.
    MemoryLayout::new(
        PageSize::DEFAULT,
        vec![
            Region {
                first_page: 0,
                pages: 32768,
            },
            Region {
                first_page: 0xfeff0,
                pages: 16,
            },
        ],
    )
    .unwrap()
}

#[test]
fn xen_bitmap_words_become_the_cores_bitmap() {
    let layout = pvh_like();
    let words_len = (0xff000u64).div_ceil(64) as usize;
    let mut words = vec![0u64; words_len];
    // Frame f is bit f % 64 of word f / 64, least significant first.
    for f in [0u64, 1, 63, 64, 4097, 32767, 0xfeff0, 0xfefff] {
        words[(f / 64) as usize] |= 1 << (f % 64);
    }
    // Bits in the hole and beyond the end are dropped.
    words[(40000 / 64) as usize] |= 1 << (40000 % 64);
    let b = bitmap_from_xen(words, &layout_mask(&layout));
    let got: Vec<u64> = b.iter_ones().collect();
    assert_eq!(got, vec![0, 1, 63, 64, 4097, 32767, 0xfeff0, 0xfefff]);
    // A short bitmap (Xen's is sized from the maximum GFN) is padded.
    let short = bitmap_from_xen(vec![0b101], &layout_mask(&layout));
    assert_eq!(short.iter_ones().collect::<Vec<_>>(), vec![0, 2]);
}

#[test]
fn frames_that_map_group_into_regions() {
    let present = (0..10u64).chain(12..13).chain(0xfeff0..0xff000);
    let r = regions_of(present);
    let got: Vec<(u64, u64)> = r.iter().map(|r| (r.first_page, r.pages)).collect();
    assert_eq!(got, vec![(0, 10), (12, 1), (0xfeff0, 16)]);
    assert!(regions_of(std::iter::empty()).is_empty());
}

#[test]
fn reads_go_in_batches_of_map_batch_frames() {
    let pages: Vec<u64> = (0..(MAP_BATCH as u64 * 2 + 5)).collect();
    let sizes: Vec<usize> = batches(&pages).map(|b| b.len()).collect();
    assert_eq!(sizes, vec![MAP_BATCH, MAP_BATCH, 5]);
    let joined: Vec<u64> = batches(&pages).flatten().copied().collect();
    assert_eq!(joined, pages);
}

#[test]
fn without_xen_open_names_what_is_missing() {
    if std::path::Path::new("/proc/xen/capabilities").exists() {
        eprintln!("this host runs on Xen; the no-Xen error path is not reachable here");
        return;
    }
    let e = Xen::open().expect_err("this host is not a Xen dom0");
    let msg = e.to_string();
    match &e {
        XenError::Library { tried, .. } => {
            assert!(tried.contains("libxen"), "{msg}");
            assert!(msg.contains("dom0"), "{msg}");
        }
        XenError::Open { what, .. } => assert_eq!(*what, "xc_interface_open", "{msg}"),
        XenError::Symbol { function, .. } => assert!(function.starts_with("x"), "{msg}"),
        other => panic!("unexpected error without Xen: {other}"),
    }
}

#[test]
fn without_xen_the_pager_event_channel_names_what_is_missing() {
    if std::path::Path::new("/proc/xen/capabilities").exists() {
        eprintln!("this host runs on Xen; the no-Xen error path is not reachable here");
        return;
    }
    let e = crate::xc::EventChannel::bind(1, 1).expect_err("no libxenevtchn here");
    let msg = e.to_string();
    match &e {
        XenError::Library { tried, .. } => assert!(tried.contains("libxenevtchn"), "{msg}"),
        XenError::Open { what, .. } => assert_eq!(*what, "xenevtchn_open", "{msg}"),
        other => panic!("unexpected error without Xen: {other}"),
    }
}
