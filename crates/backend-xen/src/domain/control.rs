//! Control: stopping, resuming, saving and restoring a domain (HVM
//! context and parameters, or PV vCPU state and page tables), as the
//! core's [`GuestControl`].

use super::attach::published_p2m;
use super::{be, read_frames, DomainKind, PvInfo, XenDomain, MAP_BATCH};
use crate::frame::{Mfn, Pfn};
use crate::pv::{self, PvState, VcpuContext};
use crate::walk::{self, ResumeWindow};
use crate::xc::{Scheduler, XenError, SHUTDOWN_SUSPEND};
use crate::{sys, XenDeviceState};
use migrate_core::PageNum;
use migrate_core::{BackendError, BackendErrorKind, DeviceState, GuestControl};
use std::time::{Duration, Instant};

/// How the source stops the guest for the final copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Ask the guest to suspend itself (xenstore `control/shutdown` =
    /// `suspend`, as `xl migrate` does) and wait until it has. A guest
    /// stopped this way reconnects its event channels, xenstore and
    /// console when it resumes in the destination domain.
    Suspend,
    /// Pause its vCPUs, unbeknown to it. Memory and CPU state move
    /// exactly, but a PV-aware guest's event channels live in the
    /// hypervisor and do not follow, so the destination copy runs only
    /// until it next needs one.
    Pause,
}

/// HVM parameters that travel with the guest. Those that connect it to
/// the toolstack (the xenstore and console pages and event channels) must
/// already agree in the destination domain, created with the same
/// configuration; the others are set there.
pub(super) const CARRIED_PARAMS: &[(u32, bool)] = &[
    (sys::HVM_PARAM_STORE_PFN, true),
    (sys::HVM_PARAM_STORE_EVTCHN, true),
    (sys::HVM_PARAM_CONSOLE_PFN, true),
    (sys::HVM_PARAM_CONSOLE_EVTCHN, true),
    (sys::HVM_PARAM_PAE_ENABLED, false),
    (sys::HVM_PARAM_TIMER_MODE, false),
    (sys::HVM_PARAM_IDENT_PT, false),
    (sys::HVM_PARAM_VM86_TSS_SIZED, false),
    (sys::HVM_PARAM_ACPI_IOPORTS_LOCATION, false),
    (sys::HVM_PARAM_VIRIDIAN, false),
    (sys::HVM_PARAM_X87_FIP_WIDTH, false),
    (sys::HVM_PARAM_MCA_CAP, false),
];

/// Pause, resume and state of a domain.
#[derive(Debug)]
pub struct XenControl {
    d: XenDomain,
    stop: StopMode,
    suspended: bool,
    paused: bool,
    suspend_timeout: Duration,
    resume_window: ResumeWindow,
    /// While auto-converge caps the domain: its scheduler and the cap it
    /// had before.
    uncapped: Option<(Scheduler, u16)>,
}

/// The scheduler cap that holds a domain of `vcpus` vCPUs out for `pct`
/// percent of the time: each vCPU may use `100 - pct` percent of one
/// physical CPU (the cap counts percent of one CPU for the whole domain),
/// never more than a cap the domain already had (`original`, 0 for none).
fn throttle_cap(vcpus: u32, pct: u8, original: u16) -> u16 {
    let per_vcpu = 100 - u32::from(pct.min(99));
    let cap = vcpus
        .max(1)
        .saturating_mul(per_vcpu)
        .clamp(1, u32::from(u16::MAX)) as u16;
    if original == 0 {
        cap
    } else {
        cap.min(original)
    }
}

impl XenControl {
    /// How long [`StopMode::Suspend`] waits for the guest to suspend.
    pub fn with_suspend_timeout(mut self, t: Duration) -> Self {
        self.suspend_timeout = t;
        self
    }

    /// How much around each vCPU's registers a post-copy source sends
    /// before the resume (see [`GuestControl::resume_pages`] and
    /// [`ResumeWindow`](crate::ResumeWindow)).
    pub fn with_resume_window(mut self, w: ResumeWindow) -> Self {
        self.resume_window = w;
        self
    }

    fn suspend(&mut self) -> Result<(), BackendError> {
        let path = format!("/local/domain/{}/control/shutdown", self.d.domid);
        let out = std::process::Command::new("xenstore-write")
            .args([&path, "suspend"])
            .output()
            .map_err(|e| BackendError::io("running xenstore-write (xen-utils)", e))?;
        if !out.status.success() {
            return Err(BackendError::new(
                BackendErrorKind::Io,
                format!(
                    "xenstore-write {path} suspend: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        let deadline = Instant::now() + self.suspend_timeout;
        loop {
            let i = self.d.info().map_err(be)?;
            if i.shutdown && i.shutdown_reason == SHUTDOWN_SUSPEND {
                self.suspended = true;
                return Ok(());
            }
            if i.shutdown || i.dying {
                return Err(BackendError::new(
                    BackendErrorKind::InvalidState,
                    format!(
                        "domain {} shut down (reason {}) instead of suspending",
                        self.d.domid, i.shutdown_reason
                    ),
                ));
            }
            if Instant::now() > deadline {
                return Err(BackendError::new(
                    BackendErrorKind::InvalidState,
                    format!(
                        "domain {} did not suspend within {:?} (no PV suspend support?)",
                        self.d.domid, self.suspend_timeout
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn pv_err(domid: u32, e: impl std::fmt::Display) -> BackendError {
    BackendError::new(
        BackendErrorKind::IncompatibleState,
        format!("PV domain {domid}: {e}"),
    )
}

impl XenControl {
    /// The source's PV state, taken while the guest is suspended.
    fn save_pv(&mut self, pv: &PvInfo) -> Result<DeviceState, BackendError> {
        let d = &self.d;
        let domid = d.domid;
        if !self.suspended {
            return Err(pv_err(
                domid,
                "the state of a PV guest is taken after it suspends itself (stop mode suspend)",
            ));
        }
        if let Some(p) = pv
            .unsettled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first()
        {
            return Err(pv_err(
                domid,
                format!("page table {p:#x} still maps a frame that is not the guest's"),
            ));
        }
        let info = d.info().map_err(be)?;
        let m2p = |m: u64| pv.pfn(Mfn(m)).map(|p| p.0);
        let mut vcpus = Vec::new();
        for v in 0..=info.max_vcpu_id {
            let mut c = VcpuContext::new(d.xen.pv_vcpu_context(domid, v).map_err(be)?)
                .map_err(|e| pv_err(domid, e))?;
            if !c.online() {
                vcpus.push(None);
                continue;
            }
            c.translate(v == 0, &m2p)
                .map_err(|e| pv_err(domid, format!("vCPU {v}: {e}")))?;
            vcpus.push(Some(c));
        }
        let start_info_pfn = match &vcpus.first() {
            Some(Some(c)) => c.rdx(),
            _ => return Err(pv_err(domid, "vCPU 0 is down")),
        };
        let mut shared_info = read_frames(&d.xen, domid, &[pv.shared_info_frame]).map_err(be)?;
        let fll = pv::read_u64(&shared_info, pv::shared_info::FRAME_LIST_LIST);
        pv::write_u64(
            &mut shared_info,
            pv::shared_info::FRAME_LIST_LIST,
            m2p(fll).unwrap_or(0),
        );
        // The memory map must be the one the migration used.
        let (now, frames) = published_p2m(&d.xen, domid, pv.shared_info_frame).map_err(be)?;
        for p in d.layout.pages() {
            if now.get(p as usize).copied().and_then(pv::p2m_entry_mfn)
                != pv.mfn(Pfn(p)).map(|m| m.0)
            {
                return Err(pv_err(
                    domid,
                    format!("the guest changed its memory map during the migration (frame {p:#x})"),
                ));
            }
        }
        let p2m_frames = frames
            .iter()
            .map(|&m| {
                m2p(m).ok_or_else(|| pv_err(domid, format!("p2m frame {m:#x} is not the guest's")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pages: Vec<u64> = d.layout.pages().collect();
        let mfns: Vec<u64> = pages.iter().map(|&p| d.frame(p)).collect();
        let types = d.xen.page_types(domid, &mfns).map_err(be)?;
        let page_tables = pages
            .iter()
            .zip(&types)
            .filter(|(_, &t)| pv::table_level(t).is_some())
            .map(|(&p, &t)| (p, t))
            .collect();
        Ok(PvState {
            vcpus,
            shared_info,
            start_info_pfn,
            page_tables,
            p2m_frames,
        }
        .to_device_state())
    }

    /// Makes the received PV guest runnable: local page tables, p2m,
    /// start info and shared info, pinned tables, vCPU contexts.
    fn restore_pv(&mut self, pv: &PvInfo, state: &DeviceState) -> Result<(), BackendError> {
        let s = PvState::from_device_state(state)?;
        let d = &self.d;
        let domid = d.domid;
        // Pages mapped writable cannot become page tables.
        *d.window.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let p2m = |p: u64| pv.mfn(Pfn(p)).map(|m| m.0);
        let need = |p: u64, what: &str| {
            p2m(p).ok_or_else(|| {
                pv_err(
                    domid,
                    format!("{what} frame {p:#x} is not in the destination"),
                )
            })
        };
        // Rewrite pages in place, in batches.
        type Edit<'a> = &'a dyn Fn(usize, &mut [u8]) -> Result<(), String>;
        let rewrite = |list: &[(u64, usize)], f: Edit<'_>| -> Result<(), BackendError> {
            for chunk in list.chunks(MAP_BATCH) {
                let frames = chunk
                    .iter()
                    .map(|&(p, _)| need(p, "page"))
                    .collect::<Result<Vec<_>, _>>()?;
                let m = d.xen.map(domid, &frames, true).map_err(be)?;
                let mut page = vec![0u8; 4096];
                for (j, &(p, k)) in chunk.iter().enumerate() {
                    m.read(j, &mut page).map_err(be)?;
                    f(k, &mut page).map_err(|e| pv_err(domid, format!("frame {p:#x}: {e}")))?;
                    m.write(j, &page).map_err(be)?;
                }
            }
            Ok(())
        };
        let tables: Vec<(u64, usize)> = s
            .page_tables
            .iter()
            .enumerate()
            .map(|(k, &(p, _))| (p, k))
            .collect();
        rewrite(&tables, &|k, page| {
            let level = pv::table_level(s.page_tables[k].1).ok_or("not a page table")?;
            pv::localise_table(page, level, &p2m)
        })?;
        let p2m_pages: Vec<(u64, usize)> = s
            .p2m_frames
            .iter()
            .enumerate()
            .map(|(k, &p)| (p, k))
            .collect();
        rewrite(&p2m_pages, &|k, page| {
            pv::localise_p2m_page(page, (k * pv::ENTRIES) as u64, &p2m)
        })?;
        use pv::start_info as sinfo;
        let store = need(pv.store_pfn, "xenstore ring")?;
        let console = need(pv.console_pfn, "console ring")?;
        rewrite(&[(s.start_info_pfn, 0)], &|_, page| {
            pv::write_u64(page, sinfo::SHARED_INFO, pv.shared_info_frame << 12);
            pv::write_u64(page, sinfo::STORE_MFN, store);
            pv::write_u32(page, sinfo::STORE_EVTCHN, pv.store_evtchn);
            pv::write_u64(page, sinfo::CONSOLE_MFN, console);
            pv::write_u32(page, sinfo::CONSOLE_EVTCHN, pv.console_evtchn);
            Ok(())
        })?;
        // Shared info: the source's vCPU and architecture parts, no
        // event pending and every channel masked (the guest binds its
        // channels again when it resumes).
        {
            use pv::shared_info as si;
            let m = d
                .xen
                .map(domid, &[pv.shared_info_frame], true)
                .map_err(be)?;
            let mut page = vec![0u8; 4096];
            m.read(0, &mut page).map_err(be)?;
            page[si::VCPU_INFO..si::VCPU_INFO + si::VCPU_INFO_LEN]
                .copy_from_slice(&s.shared_info[si::VCPU_INFO..si::VCPU_INFO + si::VCPU_INFO_LEN]);
            page[si::ARCH..si::ARCH + si::ARCH_LEN]
                .copy_from_slice(&s.shared_info[si::ARCH..si::ARCH + si::ARCH_LEN]);
            let fll = pv::read_u64(&page, si::FRAME_LIST_LIST);
            pv::write_u64(&mut page, si::FRAME_LIST_LIST, p2m(fll).unwrap_or(0));
            page[si::EVTCHN_PENDING..si::EVTCHN_PENDING + si::EVTCHN_LEN].fill(0);
            page[si::EVTCHN_MASK..si::EVTCHN_MASK + si::EVTCHN_LEN].fill(0xff);
            for v in 0..32 {
                let at = si::VCPU_INFO + v * si::VCPU_INFO_SIZE;
                page[at + si::UPCALL_PENDING] = 0;
                pv::write_u64(&mut page, at + si::PENDING_SEL, 0);
            }
            m.write(0, &page).map_err(be)?;
        }
        let pins = s
            .page_tables
            .iter()
            .filter(|(_, t)| pv::pinned(*t))
            .map(|&(p, t)| {
                let level = pv::table_level(t).unwrap_or(1);
                Ok((pv::pin_command(level), need(p, "page-table")?))
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        d.xen.mmuext(domid, &pins).map_err(be)?;
        for (v, c) in s.vcpus.iter().enumerate() {
            let Some(c) = c else { continue };
            let mut c = c.clone();
            c.translate(v == 0, &p2m)
                .map_err(|e| pv_err(domid, format!("vCPU {v}: {e}")))?;
            d.xen
                .set_pv_vcpu_context(domid, v as u32, Some(&c.0))
                .map_err(be)?;
        }
        Ok(())
    }
}

impl GuestControl for XenControl {
    /// Auto-converge through the scheduler's cap (credit2 or credit),
    /// where the host allows: a domain that neither schedules, or a
    /// libxenctrl without their calls, refuses with
    /// [`BackendErrorKind::Unsupported`]. 0 puts back the cap the domain
    /// had.
    fn set_throttle(&mut self, pct: u8) -> Result<(), BackendError> {
        let d = &self.d;
        let (sched, original) = match self.uncapped {
            Some(held) => held,
            None if pct == 0 => return Ok(()),
            None => match d.xen.sched_cap(d.domid).map_err(be)? {
                Some(held) => held,
                None => {
                    return Err(BackendError::new(
                        BackendErrorKind::Unsupported,
                        format!(
                            "domain {}: neither the credit2 nor the credit scheduler runs it, so Xen cannot cap it",
                            d.domid
                        ),
                    ))
                }
            },
        };
        let cap = if pct == 0 {
            original
        } else {
            let vcpus = d.xen.domain_info(d.domid).map_err(be)?.max_vcpu_id + 1;
            throttle_cap(vcpus, pct, original)
        };
        d.xen.set_sched_cap(d.domid, sched, cap).map_err(be)?;
        self.uncapped = (pct > 0).then_some((sched, original));
        Ok(())
    }

    fn pause(&mut self) -> Result<(), BackendError> {
        if self.d.is_pv() && self.stop == StopMode::Pause {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                "a PV guest must suspend itself to move (stop mode suspend): its page tables hold machine frames that only a suspended guest has put in order",
            ));
        }
        match self.stop {
            StopMode::Suspend => self.suspend(),
            StopMode::Pause => {
                self.d.xen.pause(self.d.domid).map_err(be)?;
                self.paused = true;
                Ok(())
            }
        }
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        if self.suspended {
            // The source after a failed migration: the suspend is
            // cancelled and the guest goes on where it was.
            self.d.xen.resume(self.d.domid, true).map_err(be)?;
            self.suspended = false;
            return Ok(());
        }
        self.paused = false;
        self.d.xen.unpause(self.d.domid).map_err(be)
    }

    fn save_state(&mut self) -> Result<DeviceState, BackendError> {
        if let DomainKind::Pv(pv) = self.d.kind.clone() {
            return self.save_pv(&pv);
        }
        let context = self.d.xen.hvm_context(self.d.domid).map_err(be)?;
        let mut params = Vec::new();
        for &(p, must_match) in CARRIED_PARAMS {
            match self.d.xen.hvm_param(self.d.domid, p) {
                Ok(v) => params.push((p, v)),
                // Not every parameter exists for every guest type (PVH
                // has no VM86 TSS, for one); those that do not are not
                // carried.
                Err(XenError::Call { source, .. })
                    if !must_match && source.raw_os_error() == Some(22) => {}
                Err(e) => {
                    return Err(BackendError::new(
                        BackendErrorKind::Io,
                        format!("HVM parameter {p}: {e}"),
                    ))
                }
            }
        }
        Ok(XenDeviceState { context, params }.to_device_state())
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), BackendError> {
        if let DomainKind::Pv(pv) = self.d.kind.clone() {
            return self.restore_pv(&pv, state);
        }
        *self.d.window.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let s = XenDeviceState::from_device_state(state)?;
        for &(p, v) in &s.params {
            let must_match = CARRIED_PARAMS
                .iter()
                .find(|(q, _)| *q == p)
                .is_some_and(|(_, m)| *m);
            let here = self.d.xen.hvm_param(self.d.domid, p).map_err(be)?;
            if here == v {
                continue;
            }
            if must_match {
                return Err(BackendError::new(
                    BackendErrorKind::IncompatibleState,
                    format!(
                        "HVM parameter {p} is {v:#x} on the source and {here:#x} in domain {}: create the destination with the same configuration",
                        self.d.domid
                    ),
                ));
            }
            self.d.xen.set_hvm_param(self.d.domid, p, v).map_err(be)?;
        }
        self.d
            .xen
            .set_hvm_context(self.d.domid, &s.context)
            .map_err(be)
    }

    /// HVM/PVH: the frames each stopped vCPU points at (its per-CPU
    /// area, stack, code and descriptor tables, and the page tables on
    /// the way), found by walking the guest's page tables from its
    /// registers. A resuming guest hands Xen frames from these (Linux's
    /// `vcpu_info` is in its per-CPU area), and Xen refuses paged-out
    /// ones. PV guests have no post-copy and name none.
    fn resume_pages(&mut self) -> Result<Vec<PageNum>, BackendError> {
        if self.d.is_pv() {
            return Ok(Vec::new());
        }
        let domid = self.d.domid;
        let context = self.d.xen.hvm_context(domid).map_err(be)?;
        let cpus = walk::vcpu_regs(&context).ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::Other,
                format!("domain {domid}: the hypervisor's context record is malformed"),
            )
        })?;
        let xen = self.d.xen.clone();
        let max = self.d.max_gpfn;
        let mut walker = walk::Walker::new(|gfn: u64| {
            if gfn > max {
                return None;
            }
            read_frames(&xen, domid, &[gfn]).ok()
        });
        let set = walker.resume_set(&cpus, self.resume_window);
        tracing::debug!(domid, vcpus = cpus.len(), pages = set.len(), "resume set");
        Ok(set.into_iter().collect())
    }

    fn guest_cpu_time(&self) -> Option<Duration> {
        self.d
            .info()
            .ok()
            .map(|i| Duration::from_nanos(i.cpu_time_ns))
    }
}

impl XenDomain {
    /// Pause, resume and state; `stop` says how the source stops the
    /// guest.
    pub fn control(&self, stop: StopMode) -> XenControl {
        XenControl {
            d: self.clone(),
            stop,
            suspended: false,
            paused: false,
            suspend_timeout: Duration::from_secs(30),
            resume_window: ResumeWindow::default(),
            uncapped: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::throttle_cap;

    #[test]
    fn the_cap_holds_each_vcpu_for_the_throttle() {
        // One vCPU at 20 %: 80 % of a CPU; four at 50 %: two CPUs.
        assert_eq!(throttle_cap(1, 20, 0), 80);
        assert_eq!(throttle_cap(4, 50, 0), 200);
        // At most 99 %, never a cap of 0 (which would lift it).
        assert_eq!(throttle_cap(1, 99, 0), 1);
        assert_eq!(throttle_cap(1, 100, 0), 1);
        // A tighter cap the domain already had stays.
        assert_eq!(throttle_cap(2, 20, 100), 100);
        assert_eq!(throttle_cap(2, 60, 100), 80);
        // Huge domains saturate rather than wrap.
        assert_eq!(throttle_cap(4096, 1, 0), u16::MAX);
    }
}
