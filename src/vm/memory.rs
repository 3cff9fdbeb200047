//! Guest RAM: one anonymous mapping, 2 MiB aligned and advised for
//! transparent huge pages, owned here and unmapped on drop. All access from
//! the rest of the crate goes through bounds-checked `vm-memory` calls.

use std::io;
use std::ptr::NonNull;

use vm_memory::{Bytes, GuestRegionMmap, MemoryRegionAddress, MmapRegion};

use crate::abi::HUGE_PAGE_SIZE;

/// An anonymous private mapping aligned to 2 MiB. Unmapped on drop.
struct AlignedMapping {
    addr: NonNull<u8>,
    size: usize,
}

// SAFETY: the mapping is plain memory owned by this value; nothing about it is
// tied to the thread that created it.
unsafe impl Send for AlignedMapping {}
// SAFETY: `AlignedMapping` hands out no references itself; concurrent access
// goes through `vm-memory`'s volatile accessors.
unsafe impl Sync for AlignedMapping {}

impl AlignedMapping {
    fn new(size: usize) -> io::Result<Self> {
        let align = HUGE_PAGE_SIZE as usize;
        let padded = size
            .checked_add(align)
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // SAFETY: an anonymous private mapping of `padded` bytes at an address
        // the kernel chooses; it aliases no existing memory. The result is
        // checked against MAP_FAILED before use.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                padded,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(align);
        let head = aligned - start;
        let tail = padded - head - size;
        // SAFETY: `[start, start + head)` and `[aligned + size, start + padded)`
        // lie inside the mapping created above and are not used by anyone: we
        // trim them so that exactly `[aligned, aligned + size)` remains.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + size) as *mut libc::c_void, tail);
            }
            // Advisory only: failure leaves 4 KiB pages, which is slower but correct.
            libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
        }
        let addr = NonNull::new(aligned as *mut u8).expect("mmap never returns address 0 here");
        Ok(Self { addr, size })
    }
}

impl Drop for AlignedMapping {
    fn drop(&mut self) {
        // SAFETY: `[addr, addr + size)` is the mapping this value owns; every
        // user of it (`GuestRam::region`, the KVM memslot) is gone by now:
        // `GuestRam` drops its region first and the VM fd is closed before the
        // RAM (field order in `Machine`).
        unsafe {
            libc::munmap(self.addr.as_ptr().cast(), self.size);
        }
    }
}

/// Guest RAM, mapped at guest physical address 0.
pub(crate) struct GuestRam {
    // Field order matters: `region` must drop before `mapping`.
    region: GuestRegionMmap,
    mapping: AlignedMapping,
}

/// A guest address range that is not inside guest memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutOfRange {
    pub(crate) addr: u64,
    pub(crate) len: u64,
}

impl GuestRam {
    /// Maps `size` bytes of zeroed guest memory.
    pub(crate) fn new(size: u64) -> io::Result<Self> {
        let size =
            usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let mapping = AlignedMapping::new(size)?;
        // SAFETY: `mapping` is a live mapping of exactly `size` bytes with
        // these protection and flags; it outlives `region` (field order).
        let mmap = unsafe {
            MmapRegion::build_raw(
                mapping.addr.as_ptr(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
        }
        .map_err(|e| io::Error::other(e.to_string()))?;
        let region = GuestRegionMmap::new(mmap, vm_memory::GuestAddress(0))
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(Self { region, mapping })
    }

    /// Size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.mapping.size as u64
    }

    /// Host address of guest address 0, for the KVM memslot.
    pub(crate) fn host_addr(&self) -> u64 {
        self.mapping.addr.as_ptr() as u64
    }

    /// Checks that `[addr, addr + len)` lies inside guest memory.
    pub(crate) fn check(&self, addr: u64, len: u64) -> Result<(), OutOfRange> {
        match addr.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(OutOfRange { addr, len }),
        }
    }

    /// Copies guest memory at `addr` into `buf`.
    pub(crate) fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        self.check(addr, buf.len() as u64)?;
        self.region
            .read_slice(buf, MemoryRegionAddress(addr))
            .map_err(|_| OutOfRange {
                addr,
                len: buf.len() as u64,
            })
    }

    /// Copies `buf` into guest memory at `addr`.
    pub(crate) fn write(&self, addr: u64, buf: &[u8]) -> Result<(), OutOfRange> {
        self.check(addr, buf.len() as u64)?;
        self.region
            .write_slice(buf, MemoryRegionAddress(addr))
            .map_err(|_| OutOfRange {
                addr,
                len: buf.len() as u64,
            })
    }

    /// Reads `len` guest bytes at `addr` into a new vector, after checking the
    /// range (so the allocation is bounded by guest memory size).
    pub(crate) fn read_vec(&self, addr: u64, len: u64) -> Result<Vec<u8>, OutOfRange> {
        self.check(addr, len)?;
        let mut out = vec![0u8; len as usize];
        self.read(addr, &mut out)?;
        Ok(out)
    }
}
