//! Guest RAM: one anonymous mapping, 2 MiB aligned and advised for
//! transparent huge pages, owned here and unmapped on drop. All access from
//! the rest of the crate goes through bounds-checked `vm-memory` calls.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

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

/// What backs guest memory.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Backing<'a> {
    /// Zeroed anonymous memory, advised for transparent huge pages.
    Anonymous,
    /// A private copy-on-write mapping of `len` bytes of a file at `offset`:
    /// reads come from the file (sharing its page cache), writes stay private.
    File { fd: BorrowedFd<'a>, offset: u64 },
}

impl AlignedMapping {
    fn new(size: usize, backing: Backing<'_>) -> io::Result<Self> {
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
        if let Backing::File { fd, offset } = backing {
            let offset = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: replaces `[aligned, aligned + size)`, which lies inside
            // the reservation made above and is owned by no one else, with a
            // private mapping of the file (MAP_FIXED over our own pages).
            let mapped = unsafe {
                libc::mmap(
                    aligned as *mut libc::c_void,
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    fd.as_raw_fd(),
                    offset,
                )
            };
            if mapped == libc::MAP_FAILED {
                let err = io::Error::last_os_error();
                // SAFETY: unmapping the whole reservation made above.
                unsafe { libc::munmap(raw, padded) };
                return Err(err);
            }
        }
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
///
/// Shared (`Arc`) between a VM and, in polling mode, the `PollingVm` that
/// posts its calls while another thread runs the vCPU. That side touches
/// guest memory only through `vm-memory`'s volatile and atomic accessors,
/// and never during a reset or restore of the VM (both need the
/// `PollingVm` exclusively); the raw-pointer methods here
/// ([`Self::copy_in`], [`Self::equals`]) run only then, with the vCPU
/// stopped.
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
    /// Maps `size` bytes of zeroed anonymous guest memory.
    pub(crate) fn new(size: u64) -> io::Result<Self> {
        Self::with_backing(size, Backing::Anonymous)
    }

    /// Maps `size` bytes of guest memory with the given backing.
    pub(crate) fn with_backing(size: u64, backing: Backing<'_>) -> io::Result<Self> {
        let size =
            usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let mapping = AlignedMapping::new(size, backing)?;
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

    /// Atomically loads the aligned 64-bit word at guest address `addr`
    /// (polling mode reads the words the guest publishes while it runs).
    pub(crate) fn load_u64(&self, addr: u64, order: Ordering) -> Result<u64, OutOfRange> {
        self.check(addr, 8)?;
        self.region
            .load(MemoryRegionAddress(addr), order)
            .map_err(|_| OutOfRange { addr, len: 8 })
    }

    /// Atomically stores `value` at the aligned 64-bit guest address `addr`.
    pub(crate) fn store_u64(
        &self,
        addr: u64,
        value: u64,
        order: Ordering,
    ) -> Result<(), OutOfRange> {
        self.check(addr, 8)?;
        self.region
            .store(value, MemoryRegionAddress(addr), order)
            .map_err(|_| OutOfRange { addr, len: 8 })
    }

    /// Reads `len` guest bytes at `addr` into a new vector, after checking the
    /// range (so the allocation is bounded by guest memory size).
    pub(crate) fn read_vec(&self, addr: u64, len: u64) -> Result<Vec<u8>, OutOfRange> {
        self.check(addr, len)?;
        let mut out = vec![0u8; len as usize];
        self.read(addr, &mut out)?;
        Ok(out)
    }

    /// Which 4 KiB pages are resident (have ever been touched), one byte per
    /// page with bit 0 set for resident pages.
    pub(crate) fn resident_pages(&self) -> io::Result<Vec<u8>> {
        let pages = self.mapping.size / crate::abi::PAGE_SIZE as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: the range is our own live mapping and `vec` has one byte
        // per page of it, as `mincore` requires.
        let rc = unsafe {
            libc::mincore(
                self.mapping.addr.as_ptr().cast(),
                self.mapping.size,
                vec.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(vec)
    }

    /// Guest pages this process's page tables map (touched since the
    /// mapping was made or last discarded), from `/proc/self/pagemap`.
    pub(crate) fn present_pages(&self) -> io::Result<Vec<u64>> {
        use std::os::unix::fs::FileExt;
        let page = crate::abi::PAGE_SIZE as usize;
        let pages = self.mapping.size / page;
        let file = std::fs::File::open("/proc/self/pagemap")?;
        let first = (self.mapping.addr.as_ptr() as usize / page) as u64 * 8;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8 * 4096];
        let mut done = 0usize;
        while done < pages {
            let n = (pages - done).min(4096);
            file.read_exact_at(&mut buf[..n * 8], first + done as u64 * 8)?;
            for (i, e) in buf[..n * 8].chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                // Bit 63: present; bit 62: swapped out.
                if e & (3 << 62) != 0 {
                    out.push((done + i) as u64);
                }
            }
            done += n;
        }
        Ok(out)
    }

    /// The whole of guest memory as a byte slice.
    ///
    /// # Safety
    /// The vCPU must not run while the slice is alive (guest writes would
    /// alias it). Callers hold `&mut` to the VM, which keeps the vCPU stopped.
    pub(crate) unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is live for `&self`'s lifetime, readable, and
        // the caller guarantees nothing writes to it meanwhile.
        unsafe { std::slice::from_raw_parts(self.mapping.addr.as_ptr(), self.mapping.size) }
    }

    /// Copies `src` into guest memory at `addr` with a plain `memcpy`
    /// (faster than the volatile copy for large restores).
    pub(crate) fn copy_in(&self, addr: u64, src: &[u8]) -> Result<(), OutOfRange> {
        self.check(addr, src.len() as u64)?;
        // SAFETY: the range was checked to lie inside our live mapping; `src`
        // is host memory outside guest RAM (the snapshot image), so the
        // regions do not overlap; the vCPU is stopped and no polling caller
        // writes (callers hold the VM; see the type's docs).
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.mapping.addr.as_ptr().add(addr as usize),
                src.len(),
            );
        }
        Ok(())
    }

    /// Whether guest memory at `addr` holds exactly `bytes`, compared in
    /// place (no copy).
    pub(crate) fn equals(&self, addr: u64, bytes: &[u8]) -> Result<bool, OutOfRange> {
        self.check(addr, bytes.len() as u64)?;
        // SAFETY: the range was checked to lie inside our live mapping,
        // which is readable; the vCPU is stopped and no polling caller writes
        // (callers hold the VM; see the type's docs), so nothing writes the
        // bytes while the slice is alive.
        let current = unsafe {
            std::slice::from_raw_parts(self.mapping.addr.as_ptr().add(addr as usize), bytes.len())
        };
        Ok(current == bytes)
    }

    /// Zeroes `len` bytes of guest memory at `addr`.
    pub(crate) fn zero(&self, addr: u64, len: u64) -> Result<(), OutOfRange> {
        self.check(addr, len)?;
        // SAFETY: the range was checked to lie inside our live mapping.
        unsafe {
            std::ptr::write_bytes(
                self.mapping.addr.as_ptr().add(addr as usize),
                0,
                len as usize,
            )
        };
        Ok(())
    }

    /// Allocates host memory for `[addr, addr + len)` now (without changing
    /// its contents), so later first touches do not fault. Advisory: errors
    /// are ignored, the memory is then allocated on first touch as usual.
    pub(crate) fn populate(&self, addr: u64, len: u64) {
        if self.check(addr, len).is_err() {
            return;
        }
        // SAFETY: the range was checked to lie inside our live mapping;
        // MADV_POPULATE_WRITE (Linux 5.14+) only faults pages in.
        unsafe {
            libc::madvise(
                self.mapping.addr.as_ptr().add(addr as usize).cast(),
                len as usize,
                libc::MADV_POPULATE_WRITE,
            );
        }
    }

    /// Drops the contents of the whole memory: anonymous memory reads back
    /// as zeroes, a private file mapping as the file's contents.
    pub(crate) fn discard_all(&self) -> io::Result<()> {
        // SAFETY: our own live mapping; MADV_DONTNEED only drops its pages.
        let rc = unsafe {
            libc::madvise(
                self.mapping.addr.as_ptr().cast(),
                self.mapping.size,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
