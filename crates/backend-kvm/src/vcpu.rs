//! vCPU control for migration: run a vCPU on a thread, pause it, resume
//! it, save and restore its state.

use crate::KvmError;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use migrate_core::{BackendError, BackendErrorKind, DeviceState, GuestControl};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Name of this backend's device-state format.
pub const STATE_FORMAT: &str = "kvm";
/// Version of that format.
pub const STATE_VERSION: u32 = 1;

/// The state of one vCPU that a migration carries: general and special
/// registers and the FPU. (LAPIC, MSRs, XSAVE, events and the in-kernel
/// irqchip are not carried yet: the test guests use none of them.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU and SSE state.
    pub fpu: Fpu,
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

/// A guest's migratable state: its vCPUs, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuestState {
    /// One entry per vCPU.
    pub vcpus: Vec<VcpuState>,
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}

/// Reads a vCPU's state.
pub fn save_vcpu(fd: &VcpuFd) -> Result<VcpuState, KvmError> {
    Ok(VcpuState {
        regs: fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
        fpu: Fpu::from(&fd.get_fpu().map_err(ioctl("KVM_GET_FPU"))?),
    })
}

/// Writes a vCPU's state.
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), KvmError> {
    fd.set_sregs(&s.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    fd.set_regs(&s.regs).map_err(ioctl("KVM_SET_REGS"))?;
    fd.set_fpu(&s.fpu.to_kvm()).map_err(ioctl("KVM_SET_FPU"))?;
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
}

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

    /// Port-I/O reports so far.
    pub fn reports(&self) -> Vec<Report> {
        self.ctl().reports.clone()
    }

    /// Runs `f` on the vCPU fd; the vCPU must be paused.
    pub fn with_vcpu<R>(&self, f: impl FnOnce(&VcpuFd) -> R) -> R {
        let v = self.shared.vcpu.lock().unwrap_or_else(|e| e.into_inner());
        f(&v)
    }
}

impl Drop for VcpuRunner {
    fn drop(&mut self) {
        {
            let mut c = self.ctl();
            c.quit = true;
            c.run = false;
        }
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn vcpu_loop(s: &Shared) {
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

const fn libc_eintr() -> i32 {
    4
}

const fn libc_eagain() -> i32 {
    11
}

/// [`GuestControl`] over one or more vCPU runners.
#[derive(Clone, Debug)]
pub struct KvmControl {
    runners: Arc<Vec<VcpuRunner>>,
    started: Arc<Mutex<Option<Instant>>>,
}

impl KvmControl {
    /// Control over these vCPUs.
    pub fn new(runners: Arc<Vec<VcpuRunner>>) -> Self {
        KvmControl {
            runners,
            started: Arc::new(Mutex::new(None)),
        }
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
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
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
            vcpus.push(r.with_vcpu(save_vcpu).map_err(backend)?);
        }
        let data = serde_json::to_vec(&GuestState { vcpus })
            .map_err(|e| BackendError::new(BackendErrorKind::Other, e.to_string()))?;
        Ok(DeviceState {
            format: STATE_FORMAT.into(),
            version: STATE_VERSION,
            data,
        })
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
        for (r, s) in self.runners.iter().zip(&g.vcpus) {
            r.with_vcpu(|fd| restore_vcpu(fd, s)).map_err(backend)?;
        }
        Ok(())
    }
}
