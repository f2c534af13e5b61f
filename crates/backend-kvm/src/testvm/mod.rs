//! A small test VMM: one VM, guest memory, one vCPU running a payload
//! that dirties pages and reports its progress through port I/O.
//!
//! The guest starts directly in 64-bit long mode at CPL 3 with IOPL 3, so
//! no guest code runs at CPL 0 (on a software-assisted KVM such as
//! `kvm_pvm`, CPL 0 is emulated while CPL 3 runs natively). Identity page
//! tables of 2 MiB user pages map the first GiB; there is no IDT, so any
//! exception ends in a shutdown exit.
//!
//! Guest memory layout: GDT at 0x500, PML4 at 0x1000, PDPT at 0x2000, PD at
//! 0x3000, the payload at 0x10000, the working set from 1 MiB.
//!
//! The payload, 75 bytes, assembled from `payload/payload.S` (a test checks
//! that the file assembles to exactly [`PAYLOAD`]). Registers set by the
//! VMM: `rdi` = working-set base, `rsi` = working-set pages, `r8` = report
//! mask, `rcx` = counter, `r9` = TSC ticks between reports (0: no pacing in
//! the guest), `r10` = TSC deadline of the next report.
//!
//! ```text
//! 10000: 48 ff c1          loop: inc  rcx            ; the progress counter
//! 10003: 48 89 c8                mov  rax, rcx
//! 10006: 31 d2                   xor  edx, edx
//! 10008: 48 f7 f6                div  rsi            ; rdx = counter % pages
//! 1000b: 48 c1 e2 0c             shl  rdx, 12
//! 1000f: 48 89 0c 17             mov  [rdi+rdx], rcx ; dirty one page
//! 10013: 4c 85 c1                test rcx, r8
//! 10016: 75 e8                   jnz  loop
//! 10018: 89 c8                   mov  eax, ecx
//! 1001a: ba 10 00 00 00          mov  edx, 0x10
//! 1001f: ef                      out  dx, eax        ; report to the VMM
//! 10020: 4d 85 c9                test r9, r9
//! 10023: 74 db                   jz   loop           ; no pacing
//! 10025: 0f 31             wait: rdtsc
//! 10027: 48 c1 e2 20             shl  rdx, 32
//! 1002b: 48 09 d0                or   rax, rdx       ; rax = TSC
//! 1002e: 4c 89 d2                mov  rdx, r10
//! 10031: 48 29 c2                sub  rdx, rax       ; deadline - TSC
//! 10034: 76 0b                   jbe  next           ; the deadline has come
//! 10036: 4c 39 ca                cmp  rdx, r9
//! 10039: 76 ea                   jbe  wait           ; within one interval
//! 1003b: 4e 8d 14 08    restart: lea  r10, [rax+r9]  ; TSC jumped: start again
//! 1003f: eb bf                   jmp  loop
//! 10041: 4d 01 ca          next: add  r10, r9
//! 10044: 49 39 c2                cmp  r10, rax
//! 10047: 76 f2                   jbe  restart        ; more than an interval late
//! 10049: eb b5                   jmp  loop
//! ```
//!
//! The same file holds a multiboot boot stub, so the payload also runs
//! under any multiboot loader (`qemu-system-x86_64 -kernel payload.elf`):
//! `payload/build.sh` builds the image, and [`TestVm::boot_multiboot`]
//! starts it in this VMM through the same entry a loader uses.

mod multiboot;
mod runner;

pub use multiboot::{enter_multiboot, load_multiboot, MultibootEntry};
pub use runner::{
    Report, RingFull, Runners, Throttle, VcpuRecord, VcpuRunner, VcpuWatch, THROTTLE_SLICE,
};

use crate::kvm_bindings::kvm_segment;
use crate::kvm_ioctls::Kvm;
use crate::vm_memory::{Bytes, GuestAddress};
use crate::{
    advise_huge_pages, KvmControl, KvmDirtyTracker, KvmError, KvmMemory, KvmPages, TrackedMemory,
    VcpuCaps,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The payload's machine code (listing in the module docs).
pub const PAYLOAD: [u8; 75] = [
    0x48, 0xff, 0xc1, 0x48, 0x89, 0xc8, 0x31, 0xd2, 0x48, 0xf7, 0xf6, 0x48, 0xc1, 0xe2, 0x0c, 0x48,
    0x89, 0x0c, 0x17, 0x4c, 0x85, 0xc1, 0x75, 0xe8, 0x89, 0xc8, 0xba, 0x10, 0x00, 0x00, 0x00, 0xef,
    0x4d, 0x85, 0xc9, 0x74, 0xdb, 0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0, 0x4c, 0x89,
    0xd2, 0x48, 0x29, 0xc2, 0x76, 0x0b, 0x4c, 0x39, 0xca, 0x76, 0xea, 0x4e, 0x8d, 0x14, 0x08, 0xeb,
    0xbf, 0x4d, 0x01, 0xca, 0x49, 0x39, 0xc2, 0x76, 0xf2, 0xeb, 0xb5,
];
/// A payload that only computes: `inc rcx; jmp` back, for ever. It never
/// leaves the guest on its own, so only a kick pauses it.
pub const COMPUTE_PAYLOAD: [u8; 5] = [0x48, 0xff, 0xc1, 0xeb, 0xfb];
/// Where the payload is loaded.
pub const PAYLOAD_ADDR: u64 = 0x10000;
/// Where the working set starts.
pub const WSS_BASE: u64 = 1 << 20;
/// The port the payload reports on.
pub const REPORT_PORT: u16 = 0x10;

fn throttle(report_every: u64, pages_per_sec: Option<f64>) -> Option<Throttle> {
    pages_per_sec.filter(|r| *r > 0.0).map(|per_sec| Throttle {
        per_report: report_every,
        per_sec,
    })
}

/// How the payload's dirtying rate is held.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    /// As fast as the vCPU runs.
    Unlimited,
    /// The VMM holds the vCPU at each report so that it dirties at most
    /// this many pages a second (the vCPU thread sleeps; the guest cannot
    /// tell).
    Vmm(f64),
    /// The guest waits on its own TSC between reports so that it dirties
    /// this many pages a second, as it does under any other VMM (the
    /// multiboot image paces itself the same way). The vCPU spins while it
    /// waits.
    GuestTsc(f64),
}

/// The largest test VM: 64 GiB (memory is reserved, not touched; the
/// payload uses the first GiB).
const MAX_MEM: u64 = 64 << 30;

/// With the dirty ring, has each runner empty the rings into `memory`'s
/// dirty log when its ring is full.
fn collect_full_rings(memory: &Arc<KvmMemory>, runners: &[VcpuRunner]) {
    if !memory.uses_dirty_rings() {
        return;
    }
    for r in runners {
        let m = memory.clone();
        r.on_dirty_ring_full(Box::new(move || m.fetch().map_err(|e| e.to_string())));
    }
}

/// Which dirty log a test VM has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DirtyLog {
    /// `KVM_GET_DIRTY_LOG`: a bitmap of every page of every slot.
    #[default]
    Bitmap,
    /// The dirty ring with this many entries per vCPU (a power of two).
    Ring(u32),
}

struct Built {
    memory: Arc<KvmMemory>,
    vm: Arc<kvm_ioctls::VmFd>,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    caps: Arc<VcpuCaps>,
}

/// Whether test VMs back their memory with transparent huge pages.
static HUGE_PAGES: AtomicBool = AtomicBool::new(true);

/// A test VM.
///
/// Dropping it ends and joins every vCPU thread before its memory can be
/// unmapped, and the memory's slots are removed from the VM before that.
#[derive(Debug)]
pub struct TestVm {
    memory: Arc<KvmMemory>,
    control: KvmControl,
    runners: Arc<Runners>,
}

impl Drop for TestVm {
    fn drop(&mut self) {
        for r in &self.runners.0 {
            if let Err(e) = r.shutdown(Duration::from_secs(10)) {
                eprintln!("livemig test VMM: a vCPU thread did not end: {e}");
            }
        }
    }
}

/// The GDT: null, kernel code, kernel data, user data, user code (the same
/// as the multiboot stub's).
const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00cf_f300_0000_ffff,
    0x00af_fb00_0000_ffff,
];

/// Loads `code` into CS, `data` into every data segment register, and a
/// busy TSS into TR.
fn flat_segments(s: &mut kvm_bindings::kvm_sregs, code: kvm_segment, data: kvm_segment) {
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = busy_tss();
}

/// A busy 32/64-bit TSS, as the processor has after reset: what long
/// mode requires of TR even when nothing uses it.
fn busy_tss() -> kvm_segment {
    kvm_segment {
        limit: 0x67,
        selector: 0x28,
        type_: 11,
        s: 0,
        l: 0,
        db: 0,
        g: 0,
        dpl: 0,
        ..segment(0, 0, 0, 0, 0)
    }
}

fn segment(selector: u16, type_: u8, l: u8, db: u8, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl TestVm {
    fn build(mem_bytes: u64, vcpus: usize, log: DirtyLog) -> Result<Built, KvmError> {
        if !(1..=16).contains(&vcpus) {
            return Err(KvmError::Config(format!("1 to 16 vCPUs, not {vcpus}")));
        }
        if !(4 << 20..=MAX_MEM).contains(&mem_bytes) || !mem_bytes.is_multiple_of(2 << 20) {
            return Err(KvmError::Config(format!(
                "test VM memory must be a multiple of 2 MiB from 4 MiB to 64 GiB, not {mem_bytes}"
            )));
        }
        let kvm = Kvm::new().map_err(|e| KvmError::Open(e.to_string()))?;
        let vm = Arc::new(kvm.create_vm().map_err(|source| KvmError::Ioctl {
            op: "KVM_CREATE_VM",
            source,
        })?);
        let gm = TrackedMemory::from_ranges(&[(GuestAddress(0), mem_bytes as usize)])
            .map_err(|e| KvmError::Config(format!("guest memory: {e}")))?;
        if HUGE_PAGES.load(Ordering::Relaxed) {
            // A host without THP runs the guest on 4 KiB pages all the same.
            if let Err(e) = advise_huge_pages(&gm) {
                tracing::warn!(error = %e, "guest memory without transparent huge pages");
            }
        }
        let memory = Arc::new(KvmMemory::register(vm.clone(), gm)?);
        if let DirtyLog::Ring(entries) = log {
            crate::enable_dirty_ring(&vm, entries)?;
        }
        // An in-kernel interrupt controller and PIT, as a VMM would have:
        // they are part of the state a migration carries.
        vm.create_irq_chip().map_err(|source| KvmError::Ioctl {
            op: "KVM_CREATE_IRQCHIP",
            source,
        })?;
        vm.create_pit2(kvm_bindings::kvm_pit_config::default())
            .map_err(|source| KvmError::Ioctl {
                op: "KVM_CREATE_PIT2",
                source,
            })?;
        // The CPUID the host supports, as a VMM passes it on: long mode
        // and NX among it, which a guest that enables them itself needs.
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| KvmError::Ioctl {
                op: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        let vcpus = (0..vcpus as u64)
            .map(|id| {
                let fd = vm.create_vcpu(id).map_err(|source| KvmError::Ioctl {
                    op: "KVM_CREATE_VCPU",
                    source,
                })?;
                let own = crate::vcpu_cpuid(&cpuid, id as u32);
                fd.set_cpuid2(&own).map_err(|source| KvmError::Ioctl {
                    op: "KVM_SET_CPUID2",
                    source,
                })?;
                Ok(fd)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let caps = Arc::new(VcpuCaps::probe(&kvm));
        if let DirtyLog::Ring(entries) = log {
            let fds: Vec<_> = vcpus.iter().collect();
            memory.use_dirty_rings(crate::DirtyRings::map(&vm, &fds, entries)?);
        }
        Ok(Built {
            memory,
            vm,
            vcpus,
            caps,
        })
    }

    /// A running source VM of `mem_bytes` whose payload writes a page of
    /// its `wss_pages`-page working set per iteration and reports every
    /// `report_every` iterations (a power of two), at most `pages_per_sec`
    /// pages a second if given (the VMM holds it at the reports).
    pub fn source(
        mem_bytes: u64,
        wss_pages: u64,
        report_every: u64,
        pages_per_sec: Option<f64>,
    ) -> Result<Self, KvmError> {
        Self::source_smp(mem_bytes, 1, wss_pages, report_every, pages_per_sec)
    }

    /// As [`TestVm::source`] with `vcpus` vCPUs, each running the payload
    /// over its own slice of the working set (`wss_pages / vcpus` pages) at
    /// its share of the rate, each with its own counter.
    pub fn source_smp(
        mem_bytes: u64,
        vcpus: usize,
        wss_pages: u64,
        report_every: u64,
        pages_per_sec: Option<f64>,
    ) -> Result<Self, KvmError> {
        let pacing = pages_per_sec.map_or(Pacing::Unlimited, Pacing::Vmm);
        Self::source_paced(mem_bytes, vcpus, wss_pages, report_every, pacing)
    }

    /// As [`TestVm::source_smp`], with the rate held as `pacing` says (the
    /// whole guest's rate, shared out among the vCPUs).
    pub fn source_paced(
        mem_bytes: u64,
        vcpus: usize,
        wss_pages: u64,
        report_every: u64,
        pacing: Pacing,
    ) -> Result<Self, KvmError> {
        Self::source_logged(
            mem_bytes,
            vcpus,
            wss_pages,
            report_every,
            pacing,
            DirtyLog::Bitmap,
        )
    }

    /// As [`TestVm::source_paced`], with the dirty log `log`.
    pub fn source_logged(
        mem_bytes: u64,
        vcpus: usize,
        wss_pages: u64,
        report_every: u64,
        pacing: Pacing,
        log: DirtyLog,
    ) -> Result<Self, KvmError> {
        Self::start(
            mem_bytes,
            vcpus,
            wss_pages,
            report_every,
            pacing,
            log,
            &PAYLOAD,
        )
    }

    /// A running VM of `mem_bytes` whose one vCPU runs
    /// [`COMPUTE_PAYLOAD`]: it never exits to the VMM, never reports and
    /// writes no memory, so only a kick can pause it.
    pub fn compute(mem_bytes: u64) -> Result<Self, KvmError> {
        Self::start(
            mem_bytes,
            1,
            1,
            1,
            Pacing::Unlimited,
            DirtyLog::Bitmap,
            &COMPUTE_PAYLOAD,
        )
    }

    fn start(
        mem_bytes: u64,
        vcpus: usize,
        wss_pages: u64,
        report_every: u64,
        pacing: Pacing,
        log: DirtyLog,
        payload: &[u8],
    ) -> Result<Self, KvmError> {
        if let Pacing::Vmm(r) | Pacing::GuestTsc(r) = pacing {
            if !(r.is_finite() && r > 0.0) {
                return Err(KvmError::Config(format!(
                    "the dirtying rate must be a positive number of pages a second, not {r}"
                )));
            }
        }
        // The payload's page tables map the first GiB.
        let max_wss = (mem_bytes.min(1 << 30) - WSS_BASE) / 4096;
        if wss_pages == 0 || wss_pages > max_wss || !report_every.is_power_of_two() {
            return Err(KvmError::Config(format!(
                "working set must be 1..={max_wss} pages and the report interval a power of two"
            )));
        }
        let Built {
            memory,
            vm,
            vcpus: fds,
            caps,
        } = Self::build(mem_bytes, vcpus, log)?;
        let n = fds.len() as u64;
        if wss_pages < n {
            return Err(KvmError::Config(
                "fewer working-set pages than vCPUs".into(),
            ));
        }
        let share = wss_pages / n;
        let m = memory.guest_memory();
        let w = |addr: u64, v: u64| m.write_obj(v, GuestAddress(addr));
        let setup = || -> Result<(), vm_memory::GuestMemoryError> {
            for (i, e) in GDT.iter().enumerate() {
                w(0x500 + i as u64 * 8, *e)?;
            }
            w(0x1000, 0x2000 | 7)?;
            w(0x2000, 0x3000 | 7)?;
            for i in 0..512u64 {
                // 2 MiB pages: present, writable, user, large.
                w(0x3000 + i * 8, (i << 21) | 0x87)?;
            }
            m.write_slice(payload, GuestAddress(PAYLOAD_ADDR))
        };
        setup().map_err(|e| KvmError::Config(format!("writing the payload: {e}")))?;
        let ioctl = |op| move |source| KvmError::Ioctl { op, source };
        let mut runners = Vec::new();
        for (i, vcpu) in fds.into_iter().enumerate() {
            let (vmm_throttle, tsc_ticks) = match pacing {
                Pacing::Unlimited => (None, 0),
                Pacing::Vmm(r) => (throttle(report_every, Some(r / n as f64)), 0),
                Pacing::GuestTsc(r) => {
                    let khz = vcpu.get_tsc_khz().map_err(ioctl("KVM_GET_TSC_KHZ"))?;
                    let ticks = khz as f64 * 1000.0 * report_every as f64 / (r / n as f64);
                    (None, (ticks as u64).max(1))
                }
            };
            let mut s = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
            // User code (64-bit) and user data.
            flat_segments(
                &mut s,
                segment(0x23, 11, 1, 0, 3),
                segment(0x1b, 3, 0, 1, 3),
            );
            s.gdt.base = 0x500;
            s.gdt.limit = 5 * 8 - 1;
            s.idt.base = 0;
            s.idt.limit = 0;
            s.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
            s.cr3 = 0x1000;
            s.cr4 = 0x620; // OSXMMEXCPT | OSFXSR | PAE
            s.efer = 0xd00; // NXE | LMA | LME
            vcpu.set_sregs(&s).map_err(ioctl("KVM_SET_SREGS"))?;
            let mut r = vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
            r.rip = PAYLOAD_ADDR;
            r.rsp = 0x9000 - i as u64 * 0x100;
            r.rflags = 0x3002; // IOPL 3
            r.rdi = WSS_BASE + i as u64 * share * 4096;
            r.rsi = share;
            r.r8 = report_every - 1;
            r.rcx = 0;
            r.r9 = tsc_ticks;
            r.r10 = 0;
            vcpu.set_regs(&r).map_err(ioctl("KVM_SET_REGS"))?;
            // With an in-kernel LAPIC every vCPU but the first waits for
            // INIT/SIPI; the test guest starts them all at once.
            vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            })
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
            runners.push(VcpuRunner::new(vcpu, vmm_throttle)?);
        }
        collect_full_rings(&memory, &runners);
        for r in &runners {
            r.resume();
        }
        Ok(Self::assemble(memory, vm, caps, runners))
    }

    /// Starts a multiboot (version 1) ELF image the way a multiboot loader
    /// does: its loadable segments at their physical addresses, the
    /// command line and the multiboot information at 0x7000, and one vCPU
    /// in 32-bit protected mode at CPL 0 with paging off, `eax` =
    /// 0x2BADB002 and `ebx` = the information's address. With the image
    /// `payload/build.sh` builds, the guest then sets itself up and runs
    /// [`PAYLOAD`] at CPL 3 with the parameters `cmdline` gives (see
    /// `payload/payload.S`), reporting on [`REPORT_PORT`].
    pub fn boot_multiboot(mem_bytes: u64, image: &[u8], cmdline: &str) -> Result<Self, KvmError> {
        let Built {
            memory,
            vm,
            vcpus: mut fds,
            caps,
        } = Self::build(mem_bytes, 1, DirtyLog::Bitmap)?;
        let entry = multiboot::load_multiboot(memory.guest_memory(), image, cmdline)?;
        let vcpu = fds.remove(0);
        multiboot::enter_multiboot(&vcpu, &entry)?;
        let runner = VcpuRunner::new(vcpu, None)?;
        runner.resume();
        Ok(Self::assemble(memory, vm, caps, vec![runner]))
    }

    /// A paused, empty destination VM of `mem_bytes`, to be restored; a
    /// payload restored into it is held to the same rate as on the source
    /// if given the same `report_every` and `pages_per_sec`.
    pub fn destination(
        mem_bytes: u64,
        report_every: u64,
        pages_per_sec: Option<f64>,
    ) -> Result<Self, KvmError> {
        Self::destination_smp(mem_bytes, 1, report_every, pages_per_sec)
    }

    /// As [`TestVm::destination`] with `vcpus` vCPUs.
    pub fn destination_smp(
        mem_bytes: u64,
        vcpus: usize,
        report_every: u64,
        pages_per_sec: Option<f64>,
    ) -> Result<Self, KvmError> {
        let Built {
            memory,
            vm,
            vcpus: fds,
            caps,
        } = Self::build(mem_bytes, vcpus, DirtyLog::Bitmap)?;
        let rate = pages_per_sec.map(|r| r / fds.len() as f64);
        let runners = fds
            .into_iter()
            .map(|fd| VcpuRunner::new(fd, throttle(report_every, rate)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::assemble(memory, vm, caps, runners))
    }

    fn assemble(
        memory: Arc<KvmMemory>,
        vm: Arc<crate::kvm_ioctls::VmFd>,
        caps: Arc<VcpuCaps>,
        runners: Vec<VcpuRunner>,
    ) -> Self {
        let runners = Arc::new(Runners(runners));
        TestVm {
            memory,
            control: KvmControl::new(vm, caps, runners.clone()),
            runners,
        }
    }

    /// Whether test VMs made from now on back their memory with
    /// transparent huge pages (on by default; see [`advise_huge_pages`]).
    /// A setting for the whole process.
    pub fn use_huge_pages(on: bool) {
        HUGE_PAGES.store(on, Ordering::Relaxed);
    }

    /// The vCPU runners.
    pub fn runners(&self) -> &[VcpuRunner] {
        &self.runners.0
    }

    /// A view of each vCPU thread that outlives the VM.
    pub fn watch(&self) -> Vec<VcpuWatch> {
        self.runners.0.iter().map(|r| r.watch()).collect()
    }

    /// The guest's memory.
    pub fn memory(&self) -> Arc<KvmMemory> {
        self.memory.clone()
    }

    /// The dirty tracker.
    pub fn tracker(&self) -> KvmDirtyTracker {
        KvmDirtyTracker(self.memory.clone())
    }

    /// Guest memory.
    pub fn pages(&self) -> KvmPages {
        KvmPages(self.memory.clone())
    }

    /// vCPU control.
    pub fn control(&self) -> KvmControl {
        self.control.clone()
    }

    /// The first vCPU's reports so far, stamped with host time.
    pub fn reports(&self) -> Vec<Report> {
        self.reports_of(0)
    }

    /// vCPU `i`'s reports so far (none for a vCPU that does not exist).
    pub fn reports_of(&self, i: usize) -> Vec<Report> {
        self.runners
            .0
            .get(i)
            .map(|r| r.reports())
            .unwrap_or_default()
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.runners.0.len()
    }

    /// Why the guest stopped, if a vCPU did.
    pub fn fault(&self) -> Option<String> {
        self.runners.0.iter().find_map(|r| r.fault())
    }
}
