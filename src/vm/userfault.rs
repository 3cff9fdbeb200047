//! userfaultfd: guest memory whose pages are filled by a handler thread on
//! first touch (restore straight from a store, see `snapshot::ondemand`),
//! and the state that turns a failed fill into a poisoned VM.
//!
//! Only the few ioctls needed are wrapped here (`UFFDIO_API`, `REGISTER`,
//! `WAKE`, `ZEROPAGE`), with the structures from `linux/userfaultfd.h`.
//! Faults from KVM (the vCPU touching guest memory) reach the handler like
//! faults from host code; a signal to the vCPU thread (the interrupt kick)
//! makes a `KVM_RUN` that waits on a fault return `EINTR` without the guest
//! seeing the page.

use std::error::Error as StdError;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::{InterruptHandle, VmError};

const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (32 bytes, packed in the kernel; every field here is
/// naturally aligned, so `repr(C)` gives the same layout).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u32,
    pad: u32,
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);

/// A userfaultfd with one registered range (missing-page mode).
#[derive(Debug)]
pub(crate) struct Userfault {
    fd: OwnedFd,
}

/// What resolving a fault did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolved {
    /// The page was mapped (or was already).
    Done,
}

impl Userfault {
    /// A new, non-blocking userfaultfd that also sees faults from the
    /// kernel on the process's behalf (KVM reading guest memory).
    pub(crate) fn new() -> io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd system call takes only flags and returns a
        // new descriptor (or -1), which we own from here on.
        let mut raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as i32;
        if raw < 0 {
            // Without the system call's permission, the device grants the
            // same descriptor to whoever can open it.
            let dev = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/userfaultfd")?;
            // SAFETY: USERFAULTFD_IOC_NEW on the device takes the flags by
            // value and returns a new descriptor (or -1).
            raw = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes the `UffdioApi` we pass,
        // which lives for the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Registers `[start, start + len)` for missing-page faults.
    pub(crate) fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes the struct we pass; the
        // kernel checks the range against the caller's mappings.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads pending page faults (their addresses) into `out`; returns how
    /// many. Zero when none are pending.
    pub(crate) fn read_faults(&self, out: &mut [u64; 16]) -> io::Result<usize> {
        let mut msgs = [UffdMsg::default(); 16];
        // SAFETY: reads at most `size_of_val(&msgs)` bytes into `msgs`, a
        // plain array of `repr(C)` integers valid for any bit pattern.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                std::mem::size_of_val(&msgs),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        let count = n as usize / std::mem::size_of::<UffdMsg>();
        let mut found = 0;
        for m in msgs.iter().take(count) {
            if m.event == UFFD_EVENT_PAGEFAULT {
                out[found] = m.address;
                found += 1;
            }
        }
        Ok(found)
    }

    /// Wakes the threads waiting on faults in `[start, start + len)` (the
    /// memory now holds what they need: they retry the access).
    pub(crate) fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads the range we pass.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut range) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Maps zero pages at `[start, start + len)` in the registered
    /// mapping (private to it) and wakes the waiters. A page already
    /// mapped is left alone.
    pub(crate) fn zero(&self, start: u64, len: u64) -> io::Result<Resolved> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes the struct we pass; it
        // only maps zero pages where the registered range has none.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) } < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // Some page was there already, or the mapping changed
                // meanwhile: wake the waiters, who retry (and fault again
                // if they still need us).
                Some(libc::EEXIST) | Some(libc::EAGAIN) => {
                    self.wake(start, len)?;
                    Ok(Resolved::Done)
                }
                _ => Err(e),
            };
        }
        Ok(Resolved::Done)
    }

    /// The descriptor, for `poll`.
    pub(crate) fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

/// Why a VM's memory could not be filled: set once by the thread that
/// fills it, checked by the VM before and after every entry into the guest
/// and before any exit is served.
#[derive(Default)]
pub(crate) struct MemoryFault {
    failed: AtomicBool,
    error: OnceLock<(u64, Arc<dyn StdError + Send + Sync>)>,
    interrupt: Mutex<Option<InterruptHandle>>,
}

impl std::fmt::Debug for MemoryFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryFault")
            .field("failed", &self.failed.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl MemoryFault {
    /// Records the failure (the first one wins) and kicks the vCPU out of
    /// the guest. Done before the faulting access is woken, so the VM sees
    /// the flag before anything the guest computes from the stand-in page.
    pub(crate) fn fail(&self, page: u64, error: Arc<dyn StdError + Send + Sync>) {
        let _ = self.error.set((page, error));
        self.failed.store(true, Ordering::SeqCst);
        let handle = self
            .interrupt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(h) = handle {
            h.interrupt();
        }
    }

    /// Whether the memory failed.
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// The error for a VM whose memory failed.
    pub(crate) fn check(&self) -> Result<(), VmError> {
        if !self.failed() {
            return Ok(());
        }
        let (page, source) = self.error.get().cloned().expect("set before the flag");
        Err(VmError::MemoryUnavailable { page, source })
    }

    /// The handle that kicks the VM's vCPU when the memory fails.
    pub(crate) fn set_interrupt(&self, handle: InterruptHandle) {
        *self.interrupt.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
    }
}
