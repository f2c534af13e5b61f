//! A small userfaultfd layer: what post-copy needs and no more.
//!
//! Linux's userfaultfd lets a process serve the page faults of a memory
//! range itself: the kernel parks the faulting thread (here, a vCPU thread
//! inside `KVM_RUN`) and posts an event on the descriptor; the handler
//! fills the page with `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE`), which maps it
//! and wakes the thread.
//!
//! The `userfaultfd` crate generates its bindings with bindgen at build
//! time, which needs libclang on every machine that builds this crate.
//! The interface is a handful of ioctls and two structs, stable since Linux 4.11,
//! so they are written out here from `<linux/userfaultfd.h>` instead.
//!
//! Only missing-page mode on anonymous private memory is used: a page is
//! absent until the handler places it, and a page that is present is
//! never reported again (writes to it go straight to memory).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// `UFFD_API`: the API version the ioctls speak.
const UFFD_API: u64 = 0xAA;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: u64 = 0xC018_AA3F;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u64 = 0xC020_AA00;
/// `_IOR(0xAA, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: u64 = 0x8010_AA01;
/// `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
const UFFDIO_COPY: u64 = 0xC028_AA03;
/// `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`.
const UFFDIO_ZEROPAGE: u64 = 0xC020_AA04;
/// `_IO(0xAA, 0x00)` on `/dev/userfaultfd`: a new userfaultfd.
const USERFAULTFD_IOC_NEW: u64 = 0xAA00;
/// `UFFDIO_REGISTER_MODE_MISSING`.
const REGISTER_MODE_MISSING: u64 = 1;
/// Bits of `uffdio_register.ioctls`: `1 << _UFFDIO_COPY` and
/// `1 << _UFFDIO_ZEROPAGE`.
const NEED_RANGE_IOCTLS: u64 = (1 << 0x03) | (1 << 0x04);
/// `UFFD_EVENT_PAGEFAULT`.
const EVENT_PAGEFAULT: u8 = 0x12;
/// `sizeof(struct uffd_msg)`.
const MSG_LEN: usize = 32;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Default)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Default)]
struct Zeropage {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// What a placement did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placed {
    /// The page was absent and is now mapped with the data.
    Mapped,
    /// The page was already present (`EEXIST`); nothing was written.
    Present,
}

/// A userfaultfd in missing-page mode.
#[derive(Debug)]
pub(crate) struct Userfault {
    fd: OwnedFd,
}

fn ioctl<T>(fd: &OwnedFd, request: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `request` is one of the userfaultfd ioctls above and `arg` is
    // the `#[repr(C)]` struct of exactly the size encoded in it; the kernel
    // reads and writes only that struct, which outlives the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Userfault {
    /// Opens a non-blocking userfaultfd and agrees the API with the
    /// kernel. It tries the `userfaultfd` system call, then
    /// `/dev/userfaultfd` (Linux 6.1+) for processes that the
    /// `vm.unprivileged_userfaultfd` sysctl keeps from the call; faults
    /// that KVM takes on behalf of a vCPU are kernel-mode faults, so the
    /// user-mode-only flag cannot be used.
    pub(crate) fn open() -> io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd system call takes one flags argument and
        // returns a new descriptor or -1; no memory is passed.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if raw >= 0 {
            // SAFETY: `raw` is a descriptor the kernel just gave this
            // process; nothing else owns it.
            unsafe { OwnedFd::from_raw_fd(raw as i32) }
        } else {
            let first = io::Error::last_os_error();
            let dev = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/userfaultfd")
                .map_err(|e| {
                    io::Error::new(
                        first.kind(),
                        format!(
                            "userfaultfd: {first} (set vm.unprivileged_userfaultfd=1 or run with CAP_SYS_PTRACE); /dev/userfaultfd: {e}"
                        ),
                    )
                })?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument
            // by value and returns a new descriptor or -1.
            let raw = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: as above, a fresh descriptor owned by no one else.
            unsafe { OwnedFd::from_raw_fd(raw) }
        };
        let mut api = Api {
            api: UFFD_API,
            ..Api::default()
        };
        ioctl(&fd, UFFDIO_API, &mut api)?;
        Ok(Userfault { fd })
    }

    /// Registers `len` bytes at host address `start` (page aligned) in
    /// missing-page mode.
    pub(crate) fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = Register {
            range: Range { start, len },
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(&self.fd, UFFDIO_REGISTER, &mut r)?;
        if r.ioctls & NEED_RANGE_IOCTLS != NEED_RANGE_IOCTLS {
            let _ = self.unregister(start, len);
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "userfaultfd: the range does not support UFFDIO_COPY and UFFDIO_ZEROPAGE",
            ));
        }
        Ok(())
    }

    /// Unregisters a range: its faults are the kernel's again.
    pub(crate) fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = Range { start, len };
        ioctl(&self.fd, UFFDIO_UNREGISTER, &mut r)
    }

    /// Maps a copy of `data` (whole pages) at host address `dst` of a
    /// registered range and wakes the threads waiting on it.
    pub(crate) fn copy(&self, dst: u64, data: &[u8]) -> io::Result<Placed> {
        let mut c = Copy {
            dst,
            src: data.as_ptr() as u64,
            len: data.len() as u64,
            mode: 0,
            copy: 0,
        };
        self.place(UFFDIO_COPY, &mut c)
    }

    /// Maps zero pages over `len` bytes at `dst` and wakes its waiters.
    pub(crate) fn zeropage(&self, dst: u64, len: u64) -> io::Result<Placed> {
        let mut z = Zeropage {
            range: Range { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        self.place(UFFDIO_ZEROPAGE, &mut z)
    }

    /// Runs a placing ioctl: `EEXIST` means the page was there already,
    /// `EAGAIN` that the mapping changed under the call (try again).
    fn place<T>(&self, request: u64, arg: &mut T) -> io::Result<Placed> {
        loop {
            match ioctl(&self.fd, request, arg) {
                Ok(()) => return Ok(Placed::Mapped),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(Placed::Present),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits up to `timeout` for page faults and appends the faulting host
    /// addresses to `out`. Returns how many were added (0 on timeout).
    pub(crate) fn read_faults(&self, timeout: Duration, out: &mut Vec<u64>) -> io::Result<usize> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(0);
        }
        let mut buf = [0u8; MSG_LEN * 64];
        let mut added = 0;
        loop {
            // SAFETY: reads at most `buf.len()` bytes into `buf`.
            let got = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                )
            };
            if got < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(added),
                    _ => Err(e),
                };
            }
            let got = got as usize;
            for msg in buf[..got].chunks_exact(MSG_LEN) {
                // struct uffd_msg: u8 event, 7 bytes reserved, then for a
                // page fault: u64 flags, u64 address, u32 thread id.
                if msg[0] == EVENT_PAGEFAULT {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(&msg[16..24]);
                    out.push(u64::from_ne_bytes(a));
                    added += 1;
                }
            }
            if got < buf.len() {
                return Ok(added);
            }
        }
    }
}

/// Drops the pages of `len` bytes at host address `start` from a private
/// anonymous mapping (`MADV_DONTNEED`): they read as absent afterwards,
/// so a registered range reports the next access as a fault.
///
/// # Errors
/// Fails if the range is not page aligned or not mapped.
///
/// # Safety
/// The range must lie in a private anonymous mapping that the caller owns
/// (guest memory), and nothing may hold a Rust reference into it: its
/// contents turn to zeros (or to faults, under userfaultfd) at once.
pub(crate) unsafe fn drop_pages(start: u64, len: u64) -> io::Result<()> {
    // SAFETY: MADV_DONTNEED changes no mapping, only drops page contents;
    // the caller owns the range and holds no reference into it (above).
    let r = unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            len as usize,
            libc::MADV_DONTNEED,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_have_the_kernel_sizes() {
        // The sizes are encoded in the ioctl numbers (bits 16..30).
        let size = |req: u64| ((req >> 16) & 0x3fff) as usize;
        assert_eq!(std::mem::size_of::<Api>(), size(UFFDIO_API));
        assert_eq!(std::mem::size_of::<Register>(), size(UFFDIO_REGISTER));
        assert_eq!(std::mem::size_of::<Range>(), size(UFFDIO_UNREGISTER));
        assert_eq!(std::mem::size_of::<Copy>(), size(UFFDIO_COPY));
        assert_eq!(std::mem::size_of::<Zeropage>(), size(UFFDIO_ZEROPAGE));
    }
}
