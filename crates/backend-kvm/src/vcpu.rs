//! vCPU control for migration: run a vCPU on a thread, pause it, resume
//! it, save and restore its state.

use crate::KvmError;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use migrate_core::{BackendError, BackendErrorKind, DeviceState, GuestControl};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Name of this backend's device-state format.
pub const STATE_FORMAT: &str = "kvm";
/// Version of that format.
pub const STATE_VERSION: u32 = 2;

/// The state of one vCPU that a migration carries. Parts the host or VM
/// does not have (no in-kernel LAPIC, no XSAVE) are `None`.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU and SSE state (used when XSAVE is not carried).
    pub fpu: Fpu,
    /// Extended processor state.
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers.
    pub xcrs: Option<kvm_xcrs>,
    /// Model-specific registers: every one in the host's save list that
    /// this vCPU could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// The in-kernel local APIC.
    pub lapic: Option<kvm_lapic_state>,
    /// Pending exceptions, interrupts and NMIs.
    pub events: Option<kvm_vcpu_events>,
    /// Debug registers.
    pub debugregs: Option<kvm_debugregs>,
    /// Run state (running, halted, waiting for INIT/SIPI).
    pub mp_state: Option<kvm_mp_state>,
}

/// VM-wide device state: the in-kernel interrupt controllers, PIT and
/// kvmclock, where the VM has them.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The in-kernel PIT.
    pub pit: Option<kvm_pit_state2>,
    /// kvmclock.
    pub clock: Option<kvm_clock_data>,
}

/// What a vCPU can carry on this host, worked out once.
#[derive(Clone, Debug, Default)]
pub struct VcpuCaps {
    /// MSR indices to save (the host's list).
    pub msr_indices: Vec<u32>,
    /// Whether XSAVE state fits the legacy 4 KiB `kvm_xsave`, so that
    /// `KVM_SET_XSAVE` copies no more than the struct holds.
    pub xsave_legacy: bool,
}

impl VcpuCaps {
    /// Asks the host.
    pub fn probe(kvm: &kvm_ioctls::Kvm) -> Self {
        use kvm_ioctls::Cap;
        let msr_indices = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        let xsave = kvm.check_extension(Cap::Xsave);
        let size = kvm.check_extension_int(Cap::Xsave2);
        VcpuCaps {
            msr_indices,
            xsave_legacy: xsave && size <= 4096,
        }
    }
}

/// `kvm_fpu`, field for field, in a form serde can carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fpu {
    /// x87 registers.
    pub fpr: Vec<[u8; 16]>,
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// SSE registers.
    pub xmm: Vec<[u8; 16]>,
    /// SSE control and status.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Self {
        Fpu {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl Fpu {
    fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        for (d, s) in f.fpr.iter_mut().zip(&self.fpr) {
            *d = *s;
        }
        for (d, s) in f.xmm.iter_mut().zip(&self.xmm) {
            *d = *s;
        }
        f
    }
}

/// A guest's migratable state: the VM's devices and its vCPUs, in order.
#[derive(Debug, Serialize, Deserialize)]
pub struct GuestState {
    /// VM-wide state.
    pub vm: VmState,
    /// One entry per vCPU.
    pub vcpus: Vec<VcpuState>,
}

/// Reads the VM-wide state.
pub fn save_vm(vm: &VmFd) -> VmState {
    let mut irqchips = Vec::new();
    for chip_id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut c = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        if vm.get_irqchip(&mut c).is_ok() {
            irqchips.push(c);
        }
    }
    VmState {
        irqchips,
        pit: vm.get_pit2().ok(),
        clock: vm.get_clock().ok(),
    }
}

/// Writes the VM-wide state.
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), KvmError> {
    for c in &s.irqchips {
        vm.set_irqchip(c).map_err(ioctl("KVM_SET_IRQCHIP"))?;
    }
    if let Some(p) = &s.pit {
        vm.set_pit2(p).map_err(ioctl("KVM_SET_PIT2"))?;
    }
    if let Some(c) = &s.clock {
        // Only the clock value carries over; flags describe the source host.
        let clock = kvm_clock_data {
            clock: c.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))?;
    }
    Ok(())
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}

/// Reads the MSRs in `indices` that the vCPU can read. `KVM_GET_MSRS`
/// stops at the first it cannot; that one is skipped.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, KvmError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let chunk = &indices[i..(i + 256).min(indices.len())];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|index| kvm_msr_entry {
                index: *index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| KvmError::Config(format!("MSR list: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        i += if n < chunk.len() { n + 1 } else { n };
    }
    Ok(out)
}

/// Reads a vCPU's state.
pub fn save_vcpu(fd: &VcpuFd, caps: &VcpuCaps) -> Result<VcpuState, KvmError> {
    Ok(VcpuState {
        regs: fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
        fpu: Fpu::from(&fd.get_fpu().map_err(ioctl("KVM_GET_FPU"))?),
        xsave: if caps.xsave_legacy {
            fd.get_xsave().ok()
        } else {
            None
        },
        xcrs: fd.get_xcrs().ok(),
        msrs: read_msrs(fd, &caps.msr_indices)?,
        lapic: fd.get_lapic().ok(),
        events: fd.get_vcpu_events().ok(),
        debugregs: fd.get_debug_regs().ok(),
        mp_state: fd.get_mp_state().ok(),
    })
}

/// Writes a vCPU's state, in the order KVM needs: special registers, then
/// general ones, FPU or XSAVE and XCRs, MSRs, events, the LAPIC, the run
/// state and the debug registers.
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState, caps: &VcpuCaps) -> Result<(), KvmError> {
    fd.set_sregs(&s.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    fd.set_regs(&s.regs).map_err(ioctl("KVM_SET_REGS"))?;
    match &s.xsave {
        Some(x) if caps.xsave_legacy => {
            // SAFETY: `caps.xsave_legacy` says this host's XSAVE state fits
            // the 4 KiB `kvm_xsave` (KVM_CAP_XSAVE2 <= 4096), so the ioctl
            // reads no further than the struct we pass.
            unsafe { fd.set_xsave(x) }.map_err(ioctl("KVM_SET_XSAVE"))?
        }
        _ => fd.set_fpu(&s.fpu.to_kvm()).map_err(ioctl("KVM_SET_FPU"))?,
    }
    if let Some(x) = &s.xcrs {
        fd.set_xcrs(x).map_err(ioctl("KVM_SET_XCRS"))?;
    }
    if !s.msrs.is_empty() {
        let msrs = Msrs::from_entries(&s.msrs)
            .map_err(|e| KvmError::Config(format!("MSR list: {e:?}")))?;
        let n = fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if n != s.msrs.len() {
            return Err(KvmError::Config(format!(
                "the destination refused MSR {:#x} ({} of {} set)",
                s.msrs[n].index,
                n,
                s.msrs.len()
            )));
        }
    }
    if let Some(e) = &s.events {
        fd.set_vcpu_events(e)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    }
    if let Some(l) = &s.lapic {
        fd.set_lapic(l).map_err(ioctl("KVM_SET_LAPIC"))?;
    }
    if let Some(m) = s.mp_state {
        fd.set_mp_state(m).map_err(ioctl("KVM_SET_MP_STATE"))?;
    }
    if let Some(d) = &s.debugregs {
        fd.set_debug_regs(d).map_err(ioctl("KVM_SET_DEBUGREGS"))?;
    }
    Ok(())
}

/// A port-I/O write the guest made, stamped with host time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// When the VMM saw it.
    pub at: Instant,
    /// The same moment on the wall clock, comparable across processes on
    /// one host.
    pub wall: SystemTime,
    /// The port.
    pub port: u16,
    /// The value (the guest's progress counter for the test payload).
    pub value: u64,
}

#[derive(Default)]
struct Ctl {
    run: bool,
    in_guest: bool,
    quit: bool,
    fault: Option<String>,
    reports: Vec<Report>,
    /// Throttle: the guest may not run ahead of this moment.
    due: Option<Instant>,
    /// Exits because the dirty ring was full.
    ring_full: u64,
}

/// Holds a guest to a rate: each report stands for `per_report` units of
/// work (pages dirtied, for the test payload), at most `per_sec` a second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Throttle {
    /// Work per report.
    pub per_report: u64,
    /// Work per second.
    pub per_sec: f64,
}

struct Shared {
    vcpu: Mutex<VcpuFd>,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    throttle: Option<Throttle>,
    /// `/proc/<pid>/task/<tid>/schedstat` of the vCPU thread.
    schedstat: std::sync::OnceLock<std::path::PathBuf>,
    /// Collects the dirty rings when this vCPU's is full.
    ring_full: std::sync::OnceLock<RingFull>,
}

/// What a vCPU runner calls when its dirty ring is full.
pub type RingFull = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A vCPU run on its own thread until paused. The guest must leave
/// `KVM_RUN` regularly (any exit will do; the test payload writes to an
/// I/O port): a pause takes effect at the next exit.
pub struct VcpuRunner {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VcpuRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuRunner").finish_non_exhaustive()
    }
}

impl VcpuRunner {
    /// Takes over `vcpu`, paused, optionally held to a rate.
    pub fn new(vcpu: VcpuFd, throttle: Option<Throttle>) -> Result<Self, KvmError> {
        let shared = Arc::new(Shared {
            vcpu: Mutex::new(vcpu),
            ctl: Mutex::new(Ctl::default()),
            cv: Condvar::new(),
            throttle,
            schedstat: std::sync::OnceLock::new(),
            ring_full: std::sync::OnceLock::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("livemig-vcpu".into())
            .spawn(move || vcpu_loop(&s))
            .map_err(KvmError::Thread)?;
        Ok(VcpuRunner {
            shared,
            thread: Some(thread),
        })
    }

    fn ctl(&self) -> MutexGuard<'_, Ctl> {
        self.shared.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets the vCPU run.
    pub fn resume(&self) {
        let mut c = self.ctl();
        c.run = true;
        c.due = None;
        drop(c);
        self.shared.cv.notify_all();
    }

    /// With the dirty ring: `collect` empties the rings (collecting their
    /// entries into the dirty log) when this vCPU exits with
    /// `KVM_EXIT_DIRTY_RING_FULL`; the vCPU then goes on. Without it such
    /// an exit stops the guest. Set once.
    pub fn on_dirty_ring_full(&self, collect: RingFull) {
        let _ = self.shared.ring_full.set(collect);
    }

    /// Tells the vCPU to stop at its next exit, without waiting: a vCPU
    /// parked in the kernel on a post-copy page that never comes does not
    /// exit at all.
    pub fn stop(&self) {
        self.ctl().run = false;
    }

    /// Stops the vCPU at its next exit and waits until it is out of the
    /// guest, at most `timeout`.
    pub fn pause(&self, timeout: Duration) -> Result<(), KvmError> {
        let mut c = self.ctl();
        c.run = false;
        let deadline = Instant::now() + timeout;
        while c.in_guest {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(KvmError::PauseTimeout(timeout));
            }
            c = self
                .shared
                .cv
                .wait_timeout(c, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Whether the vCPU is meant to run.
    pub fn running(&self) -> bool {
        self.ctl().run
    }

    /// The exit that stopped the guest for good, if one did.
    pub fn fault(&self) -> Option<String> {
        self.ctl().fault.clone()
    }

    /// How often the vCPU found its dirty ring full.
    pub fn ring_full_exits(&self) -> u64 {
        self.ctl().ring_full
    }

    /// Port-I/O reports so far.
    pub fn reports(&self) -> Vec<Report> {
        self.ctl().reports.clone()
    }

    /// CPU time the vCPU thread has used (nearly all of it in the guest),
    /// where the host can say.
    pub fn cpu_time(&self) -> Option<Duration> {
        let text = std::fs::read_to_string(self.shared.schedstat.get()?).ok()?;
        let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
        Some(Duration::from_nanos(ns))
    }

    /// Runs `f` on the vCPU fd; the vCPU must be paused.
    pub fn with_vcpu<R>(&self, f: impl FnOnce(&VcpuFd) -> R) -> R {
        let v = self.shared.vcpu.lock().unwrap_or_else(|e| e.into_inner());
        f(&v)
    }
}

impl Drop for VcpuRunner {
    /// Tells the thread to stop. It is not joined: a vCPU that never leaves
    /// `KVM_RUN` (a guest halted with interrupts off) would block the drop
    /// for ever; the thread ends at its next exit instead.
    fn drop(&mut self) {
        {
            let mut c = self.ctl();
            c.quit = true;
            c.run = false;
        }
        self.shared.cv.notify_all();
        drop(self.thread.take());
    }
}

fn vcpu_loop(s: &Shared) {
    if let Ok(me) = std::fs::read_link("/proc/thread-self") {
        let _ = s
            .schedstat
            .set(std::path::Path::new("/proc").join(me).join("schedstat"));
    }
    loop {
        {
            let mut c = s.ctl.lock().unwrap_or_else(|e| e.into_inner());
            c.in_guest = false;
            s.cv.notify_all();
            loop {
                if c.quit {
                    break;
                }
                if !c.run {
                    c = s.cv.wait(c).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                // Held to a rate: wait (interruptibly) until due.
                let now = Instant::now();
                match c.due {
                    Some(due) if due > now => {
                        c =
                            s.cv.wait_timeout(c, due - now)
                                .unwrap_or_else(|e| e.into_inner())
                                .0;
                    }
                    _ => break,
                }
            }
            if c.quit {
                return;
            }
            c.in_guest = true;
        }
        let mut vcpu = s.vcpu.lock().unwrap_or_else(|e| e.into_inner());
        let exit = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut v = [0u8; 8];
                let n = data.len().min(8);
                v[..n].copy_from_slice(&data[..n]);
                Ok(Some((port, u64::from_le_bytes(v))))
            }
            Ok(VcpuExit::Intr) => Ok(None),
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => match s.ring_full.get() {
                Some(collect) => {
                    s.ctl.lock().unwrap_or_else(|e| e.into_inner()).ring_full += 1;
                    collect()
                        .map(|()| None)
                        .map_err(|e| format!("collecting a full dirty ring: {e}"))
                }
                None => Err("dirty ring full and nothing collects it".into()),
            },
            Ok(other) => Err(format!("guest stopped: {other:?}")),
            Err(e) if e.errno() == libc_eintr() || e.errno() == libc_eagain() => Ok(None),
            Err(e) => Err(format!("KVM_RUN failed: {e}")),
        };
        drop(vcpu);
        let mut c = s.ctl.lock().unwrap_or_else(|e| e.into_inner());
        match exit {
            Ok(Some((port, value))) => {
                let at = Instant::now();
                c.reports.push(Report {
                    at,
                    wall: SystemTime::now(),
                    port,
                    value,
                });
                if let Some(t) = s.throttle {
                    let step = Duration::from_secs_f64(t.per_report as f64 / t.per_sec);
                    c.due = Some(c.due.unwrap_or(at) + step);
                }
            }
            Ok(None) => {}
            Err(why) => {
                c.fault = Some(why);
                c.run = false;
            }
        }
    }
}

/// `KVM_EXIT_DIRTY_RING_FULL`.
const KVM_EXIT_DIRTY_RING_FULL: u32 = kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;

const fn libc_eintr() -> i32 {
    4
}

const fn libc_eagain() -> i32 {
    11
}

/// [`GuestControl`] over a VM and its vCPU runners.
#[derive(Clone)]
pub struct KvmControl {
    vm: Arc<VmFd>,
    caps: Arc<VcpuCaps>,
    runners: Arc<Vec<VcpuRunner>>,
}

impl std::fmt::Debug for KvmControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmControl")
            .field("vcpus", &self.runners.len())
            .finish_non_exhaustive()
    }
}

impl KvmControl {
    /// Control over `vm` and these vCPUs; `caps` from [`VcpuCaps::probe`].
    pub fn new(vm: Arc<VmFd>, caps: Arc<VcpuCaps>, runners: Arc<Vec<VcpuRunner>>) -> Self {
        KvmControl { vm, caps, runners }
    }

    /// The runners.
    pub fn runners(&self) -> &[VcpuRunner] {
        &self.runners
    }
}

fn backend(e: KvmError) -> BackendError {
    BackendError::new(BackendErrorKind::Io, e.to_string())
}

impl GuestControl for KvmControl {
    fn pause(&mut self) -> Result<(), BackendError> {
        for r in self.runners.iter() {
            r.pause(Duration::from_secs(5)).map_err(backend)?;
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        if let Some(f) = self.runners.iter().find_map(|r| r.fault()) {
            return Err(BackendError::new(BackendErrorKind::InvalidState, f));
        }
        for r in self.runners.iter() {
            r.resume();
        }
        Ok(())
    }

    fn save_state(&mut self) -> Result<DeviceState, BackendError> {
        let mut vcpus = Vec::new();
        for r in self.runners.iter() {
            if r.running() {
                return Err(BackendError::new(
                    BackendErrorKind::InvalidState,
                    "vCPU state saved while running",
                ));
            }
            vcpus.push(
                r.with_vcpu(|fd| save_vcpu(fd, &self.caps))
                    .map_err(backend)?,
            );
        }
        let vm = save_vm(&self.vm);
        let data = serde_json::to_vec(&GuestState { vm, vcpus })
            .map_err(|e| BackendError::new(BackendErrorKind::Other, e.to_string()))?;
        Ok(DeviceState {
            format: STATE_FORMAT.into(),
            version: STATE_VERSION,
            data,
        })
    }

    fn guest_cpu_time(&self) -> Option<Duration> {
        self.runners.iter().map(|r| r.cpu_time()).sum()
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), BackendError> {
        if state.format != STATE_FORMAT || state.version != STATE_VERSION {
            return Err(BackendError::new(
                BackendErrorKind::IncompatibleState,
                format!(
                    "state {} v{} is not {STATE_FORMAT} v{STATE_VERSION}",
                    state.format, state.version
                ),
            ));
        }
        let g: GuestState = serde_json::from_slice(&state.data).map_err(|e| {
            BackendError::new(
                BackendErrorKind::IncompatibleState,
                format!("bad kvm state: {e}"),
            )
        })?;
        if g.vcpus.len() != self.runners.len() {
            return Err(BackendError::new(
                BackendErrorKind::IncompatibleState,
                format!(
                    "state has {} vCPUs, this VM {}",
                    g.vcpus.len(),
                    self.runners.len()
                ),
            ));
        }
        restore_vm(&self.vm, &g.vm).map_err(backend)?;
        for (r, s) in self.runners.iter().zip(&g.vcpus) {
            r.with_vcpu(|fd| restore_vcpu(fd, s, &self.caps))
                .map_err(backend)?;
        }
        Ok(())
    }
}
