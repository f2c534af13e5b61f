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
//! The payload, 34 bytes, registers set by the VMM: `rdi` = working-set
//! base, `rsi` = working-set pages, `r8` = report mask, `rcx` = counter.
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
//! 10020: eb de                   jmp  loop
//! ```

use crate::memory::TrackedMemory;
use crate::memory::{KvmDirtyTracker, KvmMemory, KvmPages};
use crate::vcpu::{KvmControl, Report, Throttle, VcpuCaps, VcpuRunner};
use crate::KvmError;
use kvm_bindings::kvm_segment;
use kvm_ioctls::Kvm;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

/// The payload's machine code (listing in the module docs).
pub const PAYLOAD: [u8; 34] = [
    0x48, 0xFF, 0xC1, 0x48, 0x89, 0xC8, 0x31, 0xD2, 0x48, 0xF7, 0xF6, 0x48, 0xC1, 0xE2, 0x0C, 0x48,
    0x89, 0x0C, 0x17, 0x4C, 0x85, 0xC1, 0x75, 0xE8, 0x89, 0xC8, 0xBA, 0x10, 0x00, 0x00, 0x00, 0xEF,
    0xEB, 0xDE,
];
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

struct Built {
    memory: Arc<KvmMemory>,
    vm: Arc<kvm_ioctls::VmFd>,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    caps: Arc<VcpuCaps>,
}

/// A test VM.
#[derive(Debug)]
pub struct TestVm {
    memory: Arc<KvmMemory>,
    control: KvmControl,
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
    fn build(mem_bytes: u64, vcpus: usize) -> Result<Built, KvmError> {
        if !(1..=16).contains(&vcpus) {
            return Err(KvmError::Config(format!("1 to 16 vCPUs, not {vcpus}")));
        }
        if !(4 << 20..=1 << 30).contains(&mem_bytes) || mem_bytes % (2 << 20) != 0 {
            return Err(KvmError::Config(format!(
                "test VM memory must be a multiple of 2 MiB from 4 MiB to 1 GiB, not {mem_bytes}"
            )));
        }
        let kvm = Kvm::new().map_err(|e| KvmError::Open(e.to_string()))?;
        let vm = Arc::new(kvm.create_vm().map_err(|source| KvmError::Ioctl {
            op: "KVM_CREATE_VM",
            source,
        })?);
        let gm = TrackedMemory::from_ranges(&[(GuestAddress(0), mem_bytes as usize)])
            .map_err(|e| KvmError::Config(format!("guest memory: {e}")))?;
        let memory = Arc::new(KvmMemory::register(vm.clone(), gm)?);
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
        let vcpus = (0..vcpus as u64)
            .map(|id| {
                vm.create_vcpu(id).map_err(|source| KvmError::Ioctl {
                    op: "KVM_CREATE_VCPU",
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let caps = Arc::new(VcpuCaps::probe(&kvm));
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
        let max_wss = (mem_bytes - WSS_BASE) / 4096;
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
        } = Self::build(mem_bytes, vcpus)?;
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
            // GDT: null, kernel code, kernel data, user data, user code.
            let gdt = [
                0u64,
                0x00af_9b00_0000_ffff,
                0x00cf_9300_0000_ffff,
                0x00cf_f300_0000_ffff,
                0x00af_fb00_0000_ffff,
            ];
            for (i, e) in gdt.iter().enumerate() {
                w(0x500 + i as u64 * 8, *e)?;
            }
            w(0x1000, 0x2000 | 7)?;
            w(0x2000, 0x3000 | 7)?;
            for i in 0..512u64 {
                // 2 MiB pages: present, writable, user, large.
                w(0x3000 + i * 8, (i << 21) | 0x87)?;
            }
            m.write_slice(&PAYLOAD, GuestAddress(PAYLOAD_ADDR))
        };
        setup().map_err(|e| KvmError::Config(format!("writing the payload: {e}")))?;
        let ioctl = |op| move |source| KvmError::Ioctl { op, source };
        let rate = pages_per_sec.map(|r| r / n as f64);
        let mut runners = Vec::new();
        for (i, vcpu) in fds.into_iter().enumerate() {
            let mut s = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
            s.cs = segment(0x23, 11, 1, 0, 3);
            let data = segment(0x1b, 3, 0, 1, 3);
            s.ds = data;
            s.es = data;
            s.fs = data;
            s.gs = data;
            s.ss = data;
            s.tr = kvm_segment {
                limit: 0x67,
                selector: 0x28,
                type_: 11,
                s: 0,
                l: 0,
                db: 0,
                g: 0,
                dpl: 0,
                ..segment(0, 0, 0, 0, 0)
            };
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
            vcpu.set_regs(&r).map_err(ioctl("KVM_SET_REGS"))?;
            // With an in-kernel LAPIC every vCPU but the first waits for
            // INIT/SIPI; the test guest starts them all at once.
            vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            })
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
            runners.push(VcpuRunner::new(vcpu, throttle(report_every, rate))?);
        }
        for r in &runners {
            r.resume();
        }
        Ok(TestVm {
            memory,
            control: KvmControl::new(vm, caps, Arc::new(runners)),
        })
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
        } = Self::build(mem_bytes, vcpus)?;
        let rate = pages_per_sec.map(|r| r / fds.len() as f64);
        let runners = fds
            .into_iter()
            .map(|fd| VcpuRunner::new(fd, throttle(report_every, rate)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TestVm {
            memory,
            control: KvmControl::new(vm, caps, Arc::new(runners)),
        })
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
        self.control
            .runners()
            .get(i)
            .map(|r| r.reports())
            .unwrap_or_default()
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.control.runners().len()
    }

    /// Why the guest stopped, if a vCPU did.
    pub fn fault(&self) -> Option<String> {
        self.control.runners().iter().find_map(|r| r.fault())
    }
}
