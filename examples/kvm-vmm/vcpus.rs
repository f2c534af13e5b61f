//! The vCPU threads, their exit loop, and the `Vcpus` trait over them.

use super::*;

/// Where a vCPU thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Where {
    /// Running, or about to: it may be inside `KVM_RUN`.
    Running,
    /// Parked by a pause (or not yet resumed).
    Parked,
    /// Parked on a HLT exit until the next resume.
    Halted,
    /// Stopped for good on an exit it cannot handle.
    Stopped,
    /// The thread has ended.
    Ended,
}

/// What the VMM and its vCPU threads share.
#[derive(Debug)]
pub(crate) struct Ctl {
    /// The VMM wants the vCPUs out of the guest.
    pub(crate) paused: bool,
    /// The VMM wants the threads to end.
    pub(crate) quit: bool,
    /// Each vCPU thread's state.
    pub(crate) at: Vec<Where>,
    /// Why a vCPU stopped, if one did.
    pub(crate) fault: Option<String>,
    /// The first vCPU's progress reports.
    pub(crate) progress: Progress,
    /// Auto-converge: percent of the time each vCPU is held out of the
    /// guest (0: not throttled).
    pub(crate) throttle_pct: u8,
    /// Per vCPU: not back into the guest before this moment (throttle).
    pub(crate) held_until: Vec<Option<Instant>>,
    /// Whether the thread that kicks throttled vCPUs each slice runs.
    pub(crate) slicer: bool,
}

/// The throttle's period: a throttled vCPU is kicked out of the guest
/// this often, so that a guest that never exits is held too.
pub(crate) const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// The first vCPU's progress reports (port 0x10).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Progress {
    /// How many.
    pub(crate) count: u64,
    /// The first after the last resume, and the latest.
    pub(crate) first_since_resume: Option<u64>,
    pub(crate) last: Option<u64>,
    /// When the last one was printed.
    pub(crate) printed: Option<Instant>,
}

/// One vCPU.
pub(crate) struct Vcpu {
    pub(crate) fd: Mutex<VcpuFd>,
    pub(crate) kick: VcpuKick,
    /// The thread's `schedstat`, once it runs.
    pub(crate) schedstat: Mutex<Option<PathBuf>>,
}

/// The VMM's vCPU threads, as [`Vcpus`] for the backend.
pub(crate) struct VcpuThreads {
    pub(crate) vcpus: Vec<Arc<Vcpu>>,
    pub(crate) ctl: Arc<(Mutex<Ctl>, Condvar)>,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) serial: Arc<Serial>,
}

impl VcpuThreads {
    /// Starts a thread per vCPU, paused.
    pub(crate) fn start(fds: Vec<VcpuFd>) -> Result<Self, KvmError> {
        let ctl = Arc::new((
            Mutex::new(Ctl {
                paused: true,
                quit: false,
                at: vec![Where::Running; fds.len()],
                fault: None,
                progress: Progress::default(),
                throttle_pct: 0,
                held_until: vec![None; fds.len()],
                slicer: false,
            }),
            Condvar::new(),
        ));
        let mut this = VcpuThreads {
            vcpus: Vec::new(),
            ctl,
            threads: Mutex::new(Vec::new()),
            serial: Arc::new(Serial::default()),
        };
        for (index, fd) in fds.into_iter().enumerate() {
            if let Err(e) = this.spawn(index, fd) {
                // Ends the threads already started.
                this.shutdown();
                return Err(e);
            }
        }
        Ok(this)
    }

    /// Starts vCPU `index`'s thread, paused: the pending kick keeps it out
    /// of the guest until the first resume.
    pub(crate) fn spawn(&mut self, index: usize, fd: VcpuFd) -> Result<(), KvmError> {
        let vcpu = Arc::new(Vcpu {
            fd: Mutex::new(fd),
            kick: VcpuKick::new()?,
            schedstat: Mutex::new(None),
        });
        vcpu.kick.kick();
        let (v, c, s) = (vcpu.clone(), self.ctl.clone(), self.serial.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || vcpu_loop(index, &v, &c, &s))
            .map_err(KvmError::Thread)?;
        lock(&self.threads).push(thread);
        self.vcpus.push(vcpu);
        Ok(())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Ctl> {
        lock(&self.ctl.0)
    }

    /// The first vCPU's progress so far.
    pub(crate) fn progress(&self) -> Progress {
        self.lock().progress
    }

    /// Waits until `done` holds for the shared state, a vCPU stops, or
    /// `timeout` passes; returns whether `done` held.
    pub(crate) fn wait_for(&self, timeout: Duration, done: impl Fn(&Ctl) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut c = self.lock();
        loop {
            if done(&c) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || c.fault.is_some() {
                return false;
            }
            c = self
                .ctl
                .1
                .wait_timeout(c, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Ends every vCPU thread and joins it: quit, kick, wait.
    pub(crate) fn shutdown(&self) {
        {
            let mut c = self.lock();
            c.quit = true;
            c.paused = true;
        }
        for v in &self.vcpus {
            v.kick.kick();
        }
        self.ctl.1.notify_all();
        for t in lock(&self.threads).drain(..) {
            if t.join().is_err() {
                eprintln!("kvm-vmm {}: a vCPU thread panicked", role());
            }
        }
        self.serial.flush();
    }
}

impl Vcpus for VcpuThreads {
    fn count(&self) -> usize {
        self.vcpus.len()
    }

    /// Sets the paused flag, kicks every vCPU and waits until none is in
    /// the guest.
    fn pause(&self, timeout: Duration) -> Result<(), KvmError> {
        let mut c = self.lock();
        c.paused = true;
        for v in &self.vcpus {
            v.kick.kick();
        }
        let deadline = Instant::now() + timeout;
        while c.at.contains(&Where::Running) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(KvmError::PauseTimeout(timeout));
            }
            c = self
                .ctl
                .1
                .wait_timeout(c, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Clears the flag, resets every kick and wakes the threads (halted
    /// ones too).
    fn resume(&self) -> Result<(), KvmError> {
        let mut c = self.lock();
        if c.quit {
            return Err(KvmError::Config("the VM is shutting down".into()));
        }
        c.paused = false;
        c.progress.first_since_resume = None;
        c.held_until.fill(None);
        for (at, v) in c.at.iter_mut().zip(&self.vcpus) {
            if *at == Where::Halted {
                *at = Where::Parked;
            }
            v.kick.reset();
        }
        drop(c);
        self.ctl.1.notify_all();
        Ok(())
    }

    fn with_vcpu(
        &self,
        index: usize,
        f: &mut dyn FnMut(&VcpuFd) -> Result<(), KvmError>,
    ) -> Result<(), KvmError> {
        let v = self
            .vcpus
            .get(index)
            .ok_or_else(|| KvmError::Config(format!("no vCPU {index}")))?;
        {
            let c = self.lock();
            if !c.paused || c.at[index] == Where::Running {
                return Err(KvmError::Config(format!("vCPU {index} is not paused")));
            }
        }
        f(&lock(&v.fd))
    }

    fn cpu_time(&self) -> Option<Duration> {
        self.vcpus
            .iter()
            .map(|v| {
                let path = lock(&v.schedstat).clone()?;
                let text = std::fs::read_to_string(path).ok()?;
                let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
                Some(Duration::from_nanos(ns))
            })
            .sum()
    }

    fn fault(&self) -> Option<String> {
        self.lock().fault.clone()
    }

    /// Auto-converge, as QEMU does it: after each stay in the guest a vCPU
    /// is held out `pct / (100 - pct)` times as long as it ran (see
    /// [`vcpu_loop`]), and a thread kicks the vCPUs out of the guest every
    /// [`THROTTLE_SLICE`] while the throttle is on.
    fn set_throttle(&self, pct: u8) -> Result<(), KvmError> {
        if pct > 99 {
            return Err(KvmError::Config(format!("throttle of {pct}%: at most 99")));
        }
        let mut c = self.lock();
        c.throttle_pct = pct;
        if pct == 0 {
            c.held_until.fill(None);
        }
        if pct > 0 && !c.slicer {
            c.slicer = true;
            drop(c);
            let (vcpus, ctl) = (self.vcpus.clone(), self.ctl.clone());
            let spawned = std::thread::Builder::new()
                .name("throttle".into())
                .spawn(move || slice(&vcpus, &ctl));
            if let Err(e) = spawned {
                self.lock().slicer = false;
                return Err(KvmError::Thread(e));
            }
        } else {
            drop(c);
        }
        self.ctl.1.notify_all();
        Ok(())
    }
}

/// The throttle's slicer: kicks the running vCPUs out of the guest every
/// [`THROTTLE_SLICE`] until the throttle is lifted or the VM ends.
fn slice(vcpus: &[Arc<Vcpu>], ctl: &(Mutex<Ctl>, Condvar)) {
    loop {
        std::thread::sleep(THROTTLE_SLICE);
        let mut c = lock(&ctl.0);
        if c.quit || c.throttle_pct == 0 {
            c.slicer = false;
            return;
        }
        if c.paused {
            continue;
        }
        // Under the lock: a vCPU clears a kick only while not paused, so
        // it can never clear a pause's kick for one of these.
        for (v, at) in vcpus.iter().zip(&c.at) {
            if *at == Where::Running {
                v.kick.kick();
            }
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What one exit asks of the loop.
pub(crate) enum Next {
    /// Enter the guest again.
    Run,
    /// The exit is done by the VMM, but KVM finishes the instruction on
    /// the next `KVM_RUN`: enter once more even when paused (the pending
    /// kick makes that entry return at once, instruction completed), so
    /// the state a pause saves is the state after the instruction.
    Complete,
    /// Park until the next resume (HLT).
    Halt,
    /// Stop for good.
    Stop(String),
}

/// A vCPU thread: enter the guest through the kick, handle the exit, park
/// when paused.
pub(crate) fn vcpu_loop(index: usize, v: &Vcpu, ctl: &(Mutex<Ctl>, Condvar), serial: &Serial) {
    if let Ok(me) = std::fs::read_link("/proc/thread-self") {
        *lock(&v.schedstat) = Some(PathBuf::from("/proc").join(me).join("schedstat"));
    }
    let (m, cv) = ctl;
    let mut complete = false;
    loop {
        if !complete {
            let mut c = lock(m);
            loop {
                if c.quit {
                    c.at[index] = Where::Ended;
                    cv.notify_all();
                    return;
                }
                // Throttled: out of the guest (parked, so a pause need not
                // wait for it) until its hold ends.
                let now = Instant::now();
                let held = c.held_until[index].filter(|t| *t > now);
                if let (Some(until), false, Where::Running | Where::Parked) =
                    (held, c.paused, c.at[index])
                {
                    if c.at[index] == Where::Running {
                        c.at[index] = Where::Parked;
                        cv.notify_all();
                    }
                    c = cv
                        .wait_timeout(c, until - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    continue;
                }
                match c.at[index] {
                    Where::Running if !c.paused => break,
                    Where::Running => {
                        c.at[index] = Where::Parked;
                        cv.notify_all();
                    }
                    Where::Parked if !c.paused => {
                        c.at[index] = Where::Running;
                        break;
                    }
                    // Paused, halted or stopped: wait for a resume or quit.
                    _ => {}
                }
                c = cv.wait(c).unwrap_or_else(|e| e.into_inner());
            }
            if v.kick.is_kicked() {
                // Not paused (checked under this lock), so the kick is
                // the throttle slicer's: enter again.
                v.kick.reset();
            }
        }
        let entered = Instant::now();
        let mut fd = lock(&v.fd);
        let next = match v.kick.run(&mut fd) {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut b = [0u8; 8];
                let n = data.len().min(8);
                b[..n].copy_from_slice(&data[..n]);
                match port {
                    REPORT_PORT => report(index, u64::from_le_bytes(b), m, cv),
                    COM1 => serial.put(data[0]),
                    _ => {}
                }
                Next::Complete
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                data.fill(0);
                if port == COM1_LSR {
                    data[0] = LSR_IDLE;
                }
                Next::Complete
            }
            Ok(VcpuExit::MmioRead(_, data)) => {
                data.fill(0);
                Next::Complete
            }
            Ok(VcpuExit::MmioWrite(..)) => Next::Complete,
            Ok(VcpuExit::Hlt) => Next::Halt,
            Ok(VcpuExit::Intr) => Next::Run,
            Ok(VcpuExit::Shutdown) => Next::Stop(format!("vCPU {index}: shutdown (triple fault)")),
            Ok(other) => Next::Stop(format!("vCPU {index}: unhandled exit {other:?}")),
            // Kicked (or a signal): look at the flags.
            Err(e) if VcpuKick::is_kick(&e) => Next::Run,
            Err(e) => Next::Stop(format!("vCPU {index}: KVM_RUN failed: {e}")),
        };
        drop(fd);
        {
            let mut c = lock(m);
            if c.throttle_pct > 0 {
                // Held out for pct / (100 - pct) of the time it ran.
                let now = Instant::now();
                let pct = u32::from(c.throttle_pct);
                let hold = now.duration_since(entered) * pct / (100 - pct);
                let from = c.held_until[index].map_or(now, |t| t.max(now));
                c.held_until[index] = Some(from + hold);
            }
        }
        complete = matches!(next, Next::Complete);
        match next {
            Next::Run | Next::Complete => {}
            Next::Halt => {
                let mut c = lock(m);
                c.at[index] = Where::Halted;
                cv.notify_all();
            }
            Next::Stop(why) => {
                eprintln!("kvm-vmm {}: guest stopped: {why}", role());
                let mut c = lock(m);
                c.at[index] = Where::Stopped;
                c.fault.get_or_insert(why);
                cv.notify_all();
            }
        }
    }
}

/// Records a progress report (the first vCPU's); prints one a second.
pub(crate) fn report(index: usize, value: u64, m: &Mutex<Ctl>, cv: &Condvar) {
    if index != 0 {
        return;
    }
    let mut c = lock(m);
    let p = &mut c.progress;
    p.count += 1;
    p.last = Some(value);
    p.first_since_resume.get_or_insert(value);
    let now = Instant::now();
    if p.printed.is_none_or(|t| now - t >= Duration::from_secs(1)) {
        p.printed = Some(now);
        eprintln!("kvm-vmm {}: progress {value} ({} reports)", role(), p.count);
    }
    cv.notify_all();
}

/// COM1's transmitter: the guest's bytes, printed a line at a time (so
/// the lines of this program's own output are never split).
#[derive(Default)]
pub(crate) struct Serial {
    pub(crate) line: Mutex<Vec<u8>>,
}

impl Serial {
    pub(crate) fn put(&self, byte: u8) {
        let mut line = lock(&self.line);
        line.push(byte);
        if byte == b'\n' || line.len() >= 4096 {
            emit(&line);
            line.clear();
        }
    }

    pub(crate) fn flush(&self) {
        let mut line = lock(&self.line);
        if !line.is_empty() {
            line.push(b'\n');
            emit(&line);
            line.clear();
        }
    }
}

/// Writes whole lines to standard output.
pub(crate) fn emit(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(bytes);
    let _ = out.flush();
}

/// Prints one line of this program's output.
pub(crate) fn say(line: &str) {
    emit(format!("{line}\n").as_bytes());
}
