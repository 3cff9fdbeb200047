//! Guest RAM: one anonymous (or private file) mapping, 2 MiB aligned and
//! advised for transparent huge pages, owned here and unmapped on drop.
//!
//! Two kinds of access, for two situations:
//!
//! - [`GuestRam`]'s own methods are bounds-checked `vm-memory` calls
//!   (volatile copies, atomic words). They are right at any time, also
//!   while the guest runs and writes the same memory (the polling caller
//!   posts calls that way).
//! - [`Stopped`] gives plain `memcpy`s, comparisons and slices of guest
//!   memory, which are faster but only sound while nothing else writes it.
//!   Holding one proves that: it is minted from `&mut GuestRam` (memory no
//!   VM runs on yet) or from `&mut` of the [`VmFds`](super::kvm::VmFds)
//!   that own the memory's only vCPU, so no `KVM_RUN` is in progress and no
//!   other access goes through the VM while it lives.

use std::io;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestRegionMmap, MemoryRegionAddress, MmapRegion};

use super::mmap::AlignedMapping;
pub(crate) use super::mmap::Backing;
use crate::abi::{HUGE_PAGE_SIZE, PAGE_SIZE};

/// Guest RAM, mapped at guest physical address 0.
///
/// Shared (`Arc`) between a VM's [`VmFds`](super::kvm::VmFds) and, in
/// polling mode, the `PollingVm` that posts its calls while another thread
/// runs the vCPU. That side uses only the methods of this type
/// (`vm-memory`'s volatile and atomic accessors), and never during a reset,
/// restore or capture, which need the VM (and so the `PollingVm`)
/// exclusively.
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
        let mapping = AlignedMapping::new(size, HUGE_PAGE_SIZE as usize, backing)?;
        // SAFETY: `mapping` is a live mapping of exactly `size` bytes with
        // these protection and flags; it outlives `region` (field order).
        let mmap = unsafe {
            MmapRegion::build_raw(
                mapping.as_ptr(),
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

    /// Exclusive access to memory this caller owns outright: registered
    /// with no VM (that takes it by value into [`VmFds`](super::kvm::VmFds)),
    /// so no vCPU can run on it.
    pub(crate) fn stopped(&mut self) -> Stopped<'_> {
        Stopped { ram: self }
    }

    /// Size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.mapping.len() as u64
    }

    /// Host address of guest address 0, for the KVM memslot.
    pub(crate) fn host_addr(&self) -> u64 {
        self.mapping.as_ptr() as u64
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

    /// Guest pages this process's page tables map (touched since the
    /// mapping was made or last discarded), from `/proc/self/pagemap`.
    pub(crate) fn present_pages(&self) -> io::Result<Vec<u64>> {
        use std::os::unix::fs::FileExt;
        let page = PAGE_SIZE as usize;
        let pages = self.mapping.len() / page;
        let file = std::fs::File::open("/proc/self/pagemap")?;
        let first = (self.mapping.as_ptr() as usize / page) as u64 * 8;
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

    /// Allocates host memory for `[addr, addr + len)` now (without changing
    /// its contents), so later first touches do not fault. Advisory: errors
    /// are ignored, the memory is then allocated on first touch as usual.
    pub(crate) fn populate(&self, addr: u64, len: u64) {
        if self.check(addr, len).is_err() {
            return;
        }
        self.mapping.populate(addr as usize, len as usize);
    }
}

/// Guest memory while its vCPU is stopped and no one else accesses it:
/// plain (non-volatile) copies, comparisons and slices of it.
///
/// Minted only from `&mut` of what owns the memory (see the module docs):
/// [`GuestRam::stopped`] for memory no VM runs on, `VmFds::stopped` for a
/// VM's (`Vm::stopped` in `vm` reaches it). The borrow keeps every other
/// path to the memory through its owner closed while this lives, so no
/// `KVM_RUN` can run the vCPU and no host write can happen meanwhile, and
/// no second token for the same memory can exist. The one handle outside
/// the owner is the `Arc<GuestRam>` of a polling caller
/// (`VmFds::shared_ram`; see [`GuestRam`]), which the borrow does not
/// reach: it uses only [`GuestRam`]'s volatile and atomic methods, on the
/// thread that owns the `PollingVm` and never inside a `&mut` call on the
/// VM there (where tokens live), while the vCPU thread, which has the VM
/// the rest of the time, takes no token. Methods that write take
/// `&mut self`, so they cannot run while a slice from [`Self::as_slice`]
/// is alive.
pub(crate) struct Stopped<'a> {
    ram: &'a GuestRam,
}

impl<'a> Stopped<'a> {
    /// Mints the token for `ram`, owned by a [`VmFds`](super::kvm::VmFds)
    /// that the caller borrows mutably for `'a`.
    pub(super) fn of_vm(ram: &'a GuestRam) -> Self {
        Self { ram }
    }

    /// Size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.ram.size()
    }

    /// Which 4 KiB pages are resident (have ever been touched), one byte per
    /// page with bit 0 set for resident pages.
    pub(crate) fn resident_pages(&self) -> io::Result<Vec<u8>> {
        self.ram.mapping.resident_pages()
    }

    /// The whole of guest memory as a byte slice.
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is live, readable and `size` bytes long for as
        // long as `self.ram` is borrowed; this token proves nothing writes it
        // while `&self` is borrowed (the type's docs: the vCPU is stopped,
        // the writes of this token need `&mut self`, every other path is
        // closed by the owner's `&mut` borrow).
        unsafe { std::slice::from_raw_parts(self.ram.mapping.as_ptr(), self.ram.mapping.len()) }
    }

    /// Whether guest memory at `addr` holds exactly `bytes`, compared in
    /// place (no copy).
    pub(crate) fn equals(&self, addr: u64, bytes: &[u8]) -> Result<bool, OutOfRange> {
        self.ram.check(addr, bytes.len() as u64)?;
        // SAFETY: the range was checked to lie inside our live, readable
        // mapping; nothing writes it while the slice is alive (as in
        // `as_slice`).
        let current = unsafe {
            std::slice::from_raw_parts(self.ram.mapping.as_ptr().add(addr as usize), bytes.len())
        };
        Ok(current == bytes)
    }

    /// Copies `src` into guest memory at `addr` with a plain `memcpy`
    /// (faster than the volatile copy for large restores).
    pub(crate) fn copy_in(&mut self, addr: u64, src: &[u8]) -> Result<(), OutOfRange> {
        self.ram.check(addr, src.len() as u64)?;
        // SAFETY: the range was checked to lie inside our live, writable
        // mapping. `src` cannot overlap it: a slice of guest memory exists
        // only from `as_slice`/`equals`, which borrow this token, and
        // `&mut self` excludes that. Nothing else accesses the range
        // meanwhile (the type's docs).
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.ram.mapping.as_ptr().add(addr as usize),
                src.len(),
            );
        }
        Ok(())
    }

    /// Zeroes `len` bytes of guest memory at `addr`.
    pub(crate) fn zero(&mut self, addr: u64, len: u64) -> Result<(), OutOfRange> {
        self.ram.check(addr, len)?;
        // SAFETY: the range was checked to lie inside our live, writable
        // mapping, and nothing else accesses it meanwhile (as in `copy_in`).
        unsafe {
            std::ptr::write_bytes(
                self.ram.mapping.as_ptr().add(addr as usize),
                0,
                len as usize,
            )
        };
        Ok(())
    }

    /// Drops the contents of the whole memory: anonymous memory reads back
    /// as zeroes, a private file mapping as the file's contents.
    pub(crate) fn discard_all(&mut self) -> io::Result<()> {
        // SAFETY: references into the mapping exist only from `as_slice` and
        // `equals`, which borrow this token: `&mut self` excludes them.
        unsafe { self.ram.mapping.discard() }
    }
}
