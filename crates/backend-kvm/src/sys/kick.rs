//! Kicking a vCPU thread out of `KVM_RUN`, as VMMs do to pause a guest.
//!
//! A vCPU leaves `KVM_RUN` on its own only when the guest does something
//! the kernel hands to user space (port I/O, MMIO, a shutdown). A guest
//! that only computes, or a vCPU halted in an in-kernel irqchip, stays in
//! the kernel for as long as it likes. To get it out, the VMM signals the
//! vCPU thread: `KVM_RUN` returns `EINTR` when a signal is pending.
//!
//! A signal alone has a race: if it lands after the vCPU thread decided to
//! enter the guest but before the ioctl began, the handler runs, nothing
//! is pending any more, and `KVM_RUN` goes in for as long as the guest
//! likes. `kvm_run.immediate_exit` closes it: KVM checks that flag on
//! entry and returns `EINTR` at once when it is set. The handler sets it,
//! and [`VcpuKick::run`] sets it itself when a kick is already pending.
//!
//! ```text
//!  pausing thread                       vCPU thread (VcpuKick::run)
//!  kicked = true                        immediate_exit = 0
//!  lock; if inside run: pthread_kill ─┐ publish kvm_run; inside run = true
//!                                      │ if kicked: immediate_exit = 1
//!                                      └▶ handler: immediate_exit = 1
//!                                         KVM_RUN  → EINTR
//!                                         inside run = false; unpublish
//! ```
//!
//! The signal is `SIGRTMIN` unless the VMM picks another
//! ([`VcpuKick::with_signal`]); its handler is installed for the whole
//! process and does nothing outside [`VcpuKick::run`].

use crate::KvmError;
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::sync::atomic::{compiler_fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

thread_local! {
    /// The `kvm_run` of the vCPU this thread is running, while it is
    /// inside [`VcpuKick::run`]; null otherwise.
    static RUNNING: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal's handler: asks the vCPU this thread runs, if any, to
/// leave `KVM_RUN` at once. Only async-signal-safe work: a thread-local
/// read and one store.
extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = RUNNING.with(|r| r.get());
    if !run.is_null() {
        // `RUNNING` is non-null only between the point where
        // `VcpuKick::run` published the `kvm_run` of a `VcpuFd` it holds by
        // `&mut` and the point where it cleared it, on this same thread;
        // that mapping lives as long as the `VcpuFd`.
        // SAFETY: the pointer is valid (above); the handler interrupted
        // this thread, so nothing else on it touches the field.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Signals whose handler this process has installed.
static INSTALLED: Mutex<Vec<libc::c_int>> = Mutex::new(Vec::new());

fn install(signal: libc::c_int) -> Result<(), KvmError> {
    let mut done = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if done.contains(&signal) {
        return Ok(());
    }
    vmm_sys_util::signal::register_signal_handler(signal, on_kick).map_err(|e| {
        KvmError::Config(format!(
            "installing the vCPU kick handler for signal {signal}: {e}"
        ))
    })?;
    done.push(signal);
    Ok(())
}

/// The default kick signal: `SIGRTMIN`.
pub fn default_kick_signal() -> libc::c_int {
    static SIG: OnceLock<libc::c_int> = OnceLock::new();
    *SIG.get_or_init(vmm_sys_util::signal::SIGRTMIN)
}

#[derive(Debug)]
struct Inner {
    signal: libc::c_int,
    /// Set by [`VcpuKick::kick`], cleared by [`VcpuKick::reset`]: while
    /// set, every [`VcpuKick::run`] returns `EINTR` at once.
    kicked: AtomicBool,
    /// The thread inside [`VcpuKick::run`], if one is.
    inside: Mutex<Option<libc::pthread_t>>,
}

/// Gets one vCPU out of `KVM_RUN` on request, whatever its guest does.
///
/// The vCPU thread enters the guest through [`VcpuKick::run`] instead of
/// `VcpuFd::run`; any other thread calls [`VcpuKick::kick`] (a clone of
/// the same `VcpuKick`), after which the vCPU's current `KVM_RUN`, or its
/// next one, returns `EINTR` promptly, and so does every later one until
/// [`VcpuKick::reset`]. The VMM's vCPU loop sees the `EINTR`, checks why
/// (pause, quit), parks, and calls `reset` before it enters the guest
/// again.
///
/// ```no_run
/// # use backend_kvm::VcpuKick;
/// # fn demo(mut vcpu: kvm_ioctls::VcpuFd) -> Result<(), backend_kvm::KvmError> {
/// let kick = VcpuKick::new()?;
/// let k = kick.clone();
/// let thread = std::thread::spawn(move || loop {
///     match k.run(&mut vcpu) {
///         Err(e) if e.errno() == libc::EINTR => break, // kicked: park here
///         Ok(_exit) => { /* handle the exit */ }
///         Err(_) => break,
///     }
/// });
/// kick.kick(); // from any thread
/// thread.join().unwrap();
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct VcpuKick {
    inner: Arc<Inner>,
}

impl VcpuKick {
    /// A kick on the default signal ([`default_kick_signal`]); installs
    /// its handler for the process the first time.
    pub fn new() -> Result<Self, KvmError> {
        Self::with_signal(default_kick_signal())
    }

    /// A kick on `signal`, which the VMM must not use for anything else
    /// (a real-time signal: `SIGRTMIN..=SIGRTMAX`). Installs the handler
    /// for the process the first time, replacing any other.
    pub fn with_signal(signal: libc::c_int) -> Result<Self, KvmError> {
        install(signal)?;
        Ok(VcpuKick {
            inner: Arc::new(Inner {
                signal,
                kicked: AtomicBool::new(false),
                inside: Mutex::new(None),
            }),
        })
    }

    /// The signal this kick sends.
    pub fn signal(&self) -> libc::c_int {
        self.inner.signal
    }

    /// Runs `vcpu` (`KVM_RUN`) on the calling thread, where a kick can
    /// reach it. Returns what `VcpuFd::run` returns; after a kick, an
    /// error whose `errno()` is `EINTR` ([`VcpuKick::is_kick`]).
    pub fn run<'a>(&self, vcpu: &'a mut VcpuFd) -> Result<VcpuExit<'a>, kvm_ioctls::Error> {
        self.enter(vcpu, false)
    }

    /// Completes the I/O or MMIO access of the vCPU's last exit without
    /// letting the guest run any further: `KVM_RUN` with
    /// `immediate_exit` set. KVM finishes such an access (for an `in`,
    /// storing the value the VMM answered; for any, moving past the
    /// instruction) only when the vCPU next enters, and that pending part
    /// is in no state a migration saves: a vCPU parked right after such
    /// an exit must be completed this way before its state is saved, or
    /// the destination runs the instruction again. Harmless when nothing
    /// is pending.
    pub fn complete_pending(&self, vcpu: &mut VcpuFd) -> Result<(), kvm_ioctls::Error> {
        match self.enter(vcpu, true) {
            Err(e) if Self::is_kick(&e) => Ok(()),
            Err(e) => Err(e),
            // KVM returns EINTR when immediate_exit is set; anything else
            // came from completing the access itself.
            Ok(_) => Ok(()),
        }
    }

    /// Whether `e`, returned by [`VcpuKick::run`], says the vCPU was
    /// kicked out (`EINTR`) or should simply enter again (`EAGAIN`).
    pub fn is_kick(e: &kvm_ioctls::Error) -> bool {
        e.errno() == libc::EINTR || e.errno() == libc::EAGAIN
    }

    fn enter<'a>(
        &self,
        vcpu: &'a mut VcpuFd,
        force: bool,
    ) -> Result<VcpuExit<'a>, kvm_ioctls::Error> {
        let run: *mut kvm_run = vcpu.get_kvm_run();
        // SAFETY: `run` points at the vCPU's mapped `kvm_run`, valid while
        // `vcpu` is borrowed; no handler writes it yet (not published).
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(u8::from(force)) };
        RUNNING.with(|r| r.set(run));
        compiler_fence(Ordering::SeqCst);
        *self.lock() = Some(current_thread());
        if self.inner.kicked.load(Ordering::SeqCst) {
            // SAFETY: as above; a handler may store the same value
            // concurrently on this thread, which is harmless.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
        compiler_fence(Ordering::SeqCst);
        let exit = vcpu.run();
        *self.lock() = None;
        compiler_fence(Ordering::SeqCst);
        RUNNING.with(|r| r.set(std::ptr::null_mut()));
        exit
    }

    /// Gets the vCPU out of `KVM_RUN` now, or keeps it from entering:
    /// until [`VcpuKick::reset`], [`VcpuKick::run`] returns `EINTR` at once.
    /// Does not wait.
    pub fn kick(&self) {
        self.inner.kicked.store(true, Ordering::SeqCst);
        let inside = self.lock();
        if let Some(thread) = *inside {
            // SAFETY: `thread` is inside `run`, which cannot return (and so
            // the thread cannot end) while this lock is held; a signal to
            // a live thread of this process, whose handler is installed.
            unsafe { libc::pthread_kill(thread, self.inner.signal) };
        }
    }

    /// Whether a kick is pending.
    pub fn is_kicked(&self) -> bool {
        self.inner.kicked.load(Ordering::SeqCst)
    }

    /// Lets [`VcpuKick::run`] enter the guest again.
    pub fn reset(&self) {
        self.inner.kicked.store(false, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<libc::pthread_t>> {
        self.inner.inside.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn current_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}
