//! userfaultfd: a descriptor that receives the page faults of a registered
//! range (missing-page mode) for a handler thread to resolve.
//!
//! Only the few ioctls needed are wrapped here (`UFFDIO_API`, `REGISTER`,
//! `WAKE`, `ZEROPAGE`), with the structures from `linux/userfaultfd.h`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::memory::GuestRam;

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

    /// Registers all of `ram` for missing-page faults: its first touch of
    /// a page not yet there waits until the handler resolves it.
    pub(crate) fn register(&self, ram: &GuestRam) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: ram.host_addr(),
                len: ram.size(),
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes the struct we pass, which
        // lives for the call; the kernel checks the range against the
        // process's mappings. Registering changes no byte: a first touch of
        // a missing page of guest memory waits until the handler maps one.
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
        // SAFETY: UFFDIO_WAKE reads the range we pass, which lives for the
        // call; it only wakes threads waiting on faults in it.
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
        // SAFETY: UFFDIO_ZEROPAGE reads and writes the struct we pass, which
        // lives for the call; the kernel acts only inside ranges registered
        // with this descriptor (guest memory, see `register`) and only maps
        // zero pages where none is mapped yet: a page nothing has read (a
        // read would be waiting for this very call), so no reader sees a
        // byte change.
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
}

impl AsFd for Userfault {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
