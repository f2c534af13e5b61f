//! The test VMM's vCPU threads: each runs its vCPU in a loop, records the
//! payload's port-I/O reports, and parks when paused. Pauses and teardown
//! kick the thread out of the guest ([`VcpuKick`]), so they work whatever
//! the guest does.

use crate::{KvmError, VcpuKick, Vcpus};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

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

/// What a vCPU thread did, kept after the runner is gone (see
/// [`VcpuRunner::watch`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuRecord {
    /// `KVM_RUN` calls made.
    pub entries: u64,
    /// Shutdown exits (a triple fault, for instance).
    pub shutdowns: u64,
    /// Whether the thread has ended.
    pub ended: bool,
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
    /// Auto-converge: percent of the time the vCPU is held out.
    throttle_pct: u8,
    /// Whether the thread that ends each throttle slice runs.
    slicer: bool,
    record: VcpuRecord,
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
    ctl: Arc<Mutex<Ctl>>,
    cv: Condvar,
    kick: VcpuKick,
    throttle: Option<Throttle>,
    /// `/proc/<pid>/task/<tid>/schedstat` of the vCPU thread.
    schedstat: OnceLock<std::path::PathBuf>,
    /// Collects the dirty rings when this vCPU's is full.
    ring_full: OnceLock<RingFull>,
}

impl Shared {
    fn ctl(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a vCPU runner calls when its dirty ring is full.
pub type RingFull = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The period of the auto-converge throttle: a throttled vCPU is kicked
/// out of the guest this often.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// How long a dropped runner waits for its thread to leave the guest.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A vCPU run on its own thread until paused. A pause kicks the vCPU out
/// of the guest, so it takes effect whatever the guest is doing.
pub struct VcpuRunner {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
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
            ctl: Arc::new(Mutex::new(Ctl::default())),
            cv: Condvar::new(),
            kick: VcpuKick::new()?,
            throttle,
            schedstat: OnceLock::new(),
            ring_full: OnceLock::new(),
        });
        // The kick is pending until the first resume: the vCPU does not
        // enter the guest before.
        shared.kick.kick();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("livemig-vcpu".into())
            .spawn(move || vcpu_loop(&s))
            .map_err(KvmError::Thread)?;
        Ok(VcpuRunner {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn ctl(&self) -> MutexGuard<'_, Ctl> {
        self.shared.ctl()
    }

    /// Auto-converge: from now on the vCPU is held out of the guest for
    /// `pct` percent of the time (at most 99; 0 lifts it). After each stay
    /// in the guest it waits `pct / (100 - pct)` times as long as it ran,
    /// and a thread kicks it out of the guest every [`THROTTLE_SLICE`] so
    /// that a guest that never exits is held too.
    pub fn set_throttle(&self, pct: u8) -> Result<(), KvmError> {
        if pct > 99 {
            return Err(KvmError::Config(format!("throttle of {pct}%: at most 99")));
        }
        let mut c = self.ctl();
        c.throttle_pct = pct;
        if pct == 0 {
            c.due = None;
        }
        if pct > 0 && !c.slicer {
            c.slicer = true;
            drop(c);
            let s = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("livemig-throttle".into())
                .spawn(move || loop {
                    std::thread::sleep(THROTTLE_SLICE);
                    let mut c = s.ctl();
                    if c.quit || c.throttle_pct == 0 {
                        c.slicer = false;
                        return;
                    }
                    if c.run && c.in_guest {
                        // The ctl lock is held: a pause cannot interleave.
                        s.kick.kick();
                    }
                });
            if let Err(e) = spawned {
                self.ctl().slicer = false;
                return Err(KvmError::Thread(e));
            }
        }
        self.shared.cv.notify_all();
        Ok(())
    }

    /// The throttle in force, percent.
    pub fn throttle(&self) -> u8 {
        self.ctl().throttle_pct
    }

    /// Lets the vCPU run.
    pub fn resume(&self) {
        let mut c = self.ctl();
        if c.quit {
            return;
        }
        c.run = true;
        c.due = None;
        self.shared.kick.reset();
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

    /// Tells the vCPU to stop and kicks it, without waiting.
    pub fn stop(&self) {
        self.ctl().run = false;
        self.shared.kick.kick();
    }

    /// Stops the vCPU (kicking it out of the guest) and waits until it is
    /// out, at most `timeout`. On a timeout the vCPU still does not enter
    /// the guest again until [`VcpuRunner::resume`].
    pub fn pause(&self, timeout: Duration) -> Result<(), KvmError> {
        let mut c = self.ctl();
        c.run = false;
        self.shared.kick.kick();
        let (_c, waited) = self
            .shared
            .cv
            .wait_timeout_while(c, timeout, |c| c.in_guest)
            .unwrap_or_else(|e| e.into_inner());
        if waited.timed_out() {
            return Err(KvmError::PauseTimeout(timeout));
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

    /// A view of what the vCPU thread does that outlives the runner.
    pub fn watch(&self) -> VcpuWatch {
        VcpuWatch(self.shared.ctl.clone())
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

    /// Ends the vCPU thread: tells it to quit, kicks it out of the guest
    /// and joins it, at most `timeout`. After `Ok`, the vCPU never enters
    /// the guest again. A vCPU the kernel keeps in `KVM_RUN` despite the
    /// signal (parked on a post-copy page that never comes, on a kernel
    /// whose userfaultfd waits ignore signals) times out.
    pub fn shutdown(&self, timeout: Duration) -> Result<(), KvmError> {
        {
            let mut c = self.ctl();
            c.quit = true;
            c.run = false;
        }
        self.shared.kick.kick();
        self.shared.cv.notify_all();
        let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(());
        };
        let (c, waited) = self
            .shared
            .cv
            .wait_timeout_while(self.ctl(), timeout, |c| !c.record.ended)
            .unwrap_or_else(|e| e.into_inner());
        drop(c);
        if waited.timed_out() {
            // Not joined: put it back so a later call can try again.
            *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
            return Err(KvmError::PauseTimeout(timeout));
        }
        thread
            .join()
            .map_err(|_| KvmError::Config("a vCPU thread panicked".into()))
    }
}

impl Drop for VcpuRunner {
    /// Ends the thread and joins it ([`VcpuRunner::shutdown`]). If the
    /// kernel keeps the vCPU in `KVM_RUN`, the thread is left to end at
    /// its next exit and the failure is logged; guest memory is still safe
    /// to unmap, because [`KvmMemory`](crate::KvmMemory) removes its slots
    /// from the VM before it unmaps them.
    fn drop(&mut self) {
        if let Err(e) = self.shutdown(JOIN_TIMEOUT) {
            eprintln!("livemig test VMM: a vCPU thread did not end: {e}");
        }
    }
}

/// What a vCPU thread did, readable after its runner is dropped.
#[derive(Clone)]
pub struct VcpuWatch(Arc<Mutex<Ctl>>);

impl std::fmt::Debug for VcpuWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("VcpuWatch").field(&self.record()).finish()
    }
}

impl VcpuWatch {
    /// The record so far.
    pub fn record(&self) -> VcpuRecord {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record
            .clone()
    }

    /// The exit that stopped the guest for good, if one did.
    pub fn fault(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fault
            .clone()
    }
}

/// The runners of a test VM's vCPUs, as the [`Vcpus`] a
/// [`KvmControl`](crate::KvmControl) drives.
#[derive(Debug)]
pub struct Runners(pub Vec<VcpuRunner>);

impl Vcpus for Runners {
    fn count(&self) -> usize {
        self.0.len()
    }

    fn pause(&self, timeout: Duration) -> Result<(), KvmError> {
        // Kick them all first, then wait: the pauses overlap.
        for r in &self.0 {
            r.stop();
        }
        let deadline = Instant::now() + timeout;
        for r in &self.0 {
            r.pause(deadline.saturating_duration_since(Instant::now()))?;
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), KvmError> {
        for r in &self.0 {
            r.resume();
        }
        Ok(())
    }

    fn with_vcpu(
        &self,
        index: usize,
        f: &mut dyn FnMut(&VcpuFd) -> Result<(), KvmError>,
    ) -> Result<(), KvmError> {
        let r = self
            .0
            .get(index)
            .ok_or_else(|| KvmError::Config(format!("no vCPU {index}")))?;
        if r.running() {
            return Err(KvmError::Config(format!("vCPU {index} is running")));
        }
        r.with_vcpu(f)
    }

    fn cpu_time(&self) -> Option<Duration> {
        self.0.iter().map(|r| r.cpu_time()).sum()
    }

    fn fault(&self) -> Option<String> {
        self.0.iter().find_map(|r| r.fault())
    }

    fn set_throttle(&self, pct: u8) -> Result<(), KvmError> {
        self.0.iter().try_for_each(|r| r.set_throttle(pct))
    }
}

fn vcpu_loop(s: &Shared) {
    if let Ok(me) = std::fs::read_link("/proc/thread-self") {
        let _ = s
            .schedstat
            .set(std::path::Path::new("/proc").join(me).join("schedstat"));
    }
    // Whether the last exit left an I/O access for KVM to complete on the
    // next entry (see `VcpuKick::complete_pending`).
    let mut pending_io = false;
    loop {
        {
            let mut c = s.ctl();
            loop {
                if c.quit {
                    c.in_guest = false;
                    c.record.ended = true;
                    s.cv.notify_all();
                    return;
                }
                if !c.run {
                    if pending_io {
                        // Parking: finish the access first, so the saved
                        // state is past the instruction.
                        drop(c);
                        let mut vcpu = s.vcpu.lock().unwrap_or_else(|e| e.into_inner());
                        if let Err(e) = s.kick.complete_pending(&mut vcpu) {
                            s.ctl().fault = Some(format!("completing an I/O exit: {e}"));
                        }
                        drop(vcpu);
                        pending_io = false;
                        c = s.ctl();
                        continue;
                    }
                    c.in_guest = false;
                    s.cv.notify_all();
                    c = s.cv.wait(c).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                // Held to a rate: wait (interruptibly) until due.
                let now = Instant::now();
                match c.due {
                    Some(due) if due > now => {
                        c.in_guest = false;
                        s.cv.notify_all();
                        c =
                            s.cv.wait_timeout(c, due - now)
                                .unwrap_or_else(|e| e.into_inner())
                                .0;
                    }
                    _ => break,
                }
            }
            if s.kick.is_kicked() {
                // `run` is set, so this kick is the throttle slicer's (a
                // pause or stop clears `run` before it kicks): enter again.
                s.kick.reset();
            }
            c.in_guest = true;
            c.record.entries += 1;
        }
        let entered = Instant::now();
        let mut vcpu = s.vcpu.lock().unwrap_or_else(|e| e.into_inner());
        // Any entry completes what the last exit left pending.
        pending_io = false;
        let exit = match s.kick.run(&mut vcpu) {
            Ok(VcpuExit::IoOut(port, data)) => {
                pending_io = true;
                let mut v = [0u8; 8];
                let n = data.len().min(8);
                v[..n].copy_from_slice(&data[..n]);
                Ok(Some((port, u64::from_le_bytes(v))))
            }
            Ok(VcpuExit::Intr) => Ok(None),
            Ok(VcpuExit::Shutdown) => {
                s.ctl().record.shutdowns += 1;
                Err("guest stopped: shutdown (triple fault)".to_string())
            }
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => match s.ring_full.get() {
                Some(collect) => {
                    s.ctl().ring_full += 1;
                    collect()
                        .map(|()| None)
                        .map_err(|e| format!("collecting a full dirty ring: {e}"))
                }
                None => Err("dirty ring full and nothing collects it".into()),
            },
            Ok(other) => Err(format!("guest stopped: {other:?}")),
            Err(e) if VcpuKick::is_kick(&e) => Ok(None),
            Err(e) => Err(format!("KVM_RUN failed: {e}")),
        };
        drop(vcpu);
        let mut c = s.ctl();
        if c.throttle_pct > 0 {
            // Held out for pct / (100 - pct) of the time it ran.
            let now = Instant::now();
            let pct = u32::from(c.throttle_pct);
            let hold = now.duration_since(entered) * pct / (100 - pct);
            c.due = Some(c.due.map_or(now, |d| d.max(now)) + hold);
        }
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
