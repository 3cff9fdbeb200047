//! Memory mappings: the aligned mapping that backs guest memory (owned,
//! unmapped on drop) and read-only mappings of snapshot image files.

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use memmap2::{Mmap, MmapOptions};

/// What backs an [`AlignedMapping`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum Backing<'a> {
    /// Zeroed anonymous memory, advised for transparent huge pages.
    Anonymous,
    /// A private copy-on-write mapping of `len` bytes of a file at `offset`:
    /// reads come from the file (sharing its page cache), writes stay private.
    File { fd: BorrowedFd<'a>, offset: u64 },
}

/// A private read-write mapping of `size` bytes at an address aligned to
/// `align` (2 MiB for guest memory), owned by this value and unmapped on
/// drop. Only [`super::memory`] uses it: that is where references into it
/// are made, under the rules of its `Stopped` token.
pub(super) struct AlignedMapping {
    addr: NonNull<u8>,
    size: usize,
}

// SAFETY: the mapping is plain memory owned by this value; nothing about it is
// tied to the thread that created it.
unsafe impl Send for AlignedMapping {}
// SAFETY: `AlignedMapping`'s `&self` methods only pass its range to the
// kernel (madvise, mincore) or return its address; they make no references
// into it, so sharing it between threads shares no Rust data.
unsafe impl Sync for AlignedMapping {}

impl AlignedMapping {
    /// Maps `size` bytes with `backing` at an `align`-aligned address (a
    /// power of two), advised for transparent huge pages.
    pub(super) fn new(size: usize, align: usize, backing: Backing<'_>) -> io::Result<Self> {
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
            let mapped = match libc::off_t::try_from(offset) {
                // SAFETY: replaces `[aligned, aligned + size)`, which lies
                // inside the reservation made above and is owned by no one
                // else, with a private mapping of the file (MAP_FIXED over
                // our own pages). `fd` is borrowed, so open, for the call.
                Ok(offset) => unsafe {
                    libc::mmap(
                        aligned as *mut libc::c_void,
                        size,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                        fd.as_raw_fd(),
                        offset,
                    )
                },
                Err(_) => {
                    // SAFETY: unmapping the whole reservation made above,
                    // which nothing references.
                    unsafe { libc::munmap(raw, padded) };
                    return Err(io::Error::from(io::ErrorKind::InvalidInput));
                }
            };
            if mapped == libc::MAP_FAILED {
                let err = io::Error::last_os_error();
                // SAFETY: unmapping the whole reservation made above, which
                // nothing references.
                unsafe { libc::munmap(raw, padded) };
                return Err(err);
            }
        }
        let head = aligned - start;
        let tail = padded - head - size;
        // SAFETY: `[start, start + head)` and `[aligned + size, start + padded)`
        // lie inside the mapping created above and are not used by anyone: we
        // trim them so that exactly `[aligned, aligned + size)` remains. The
        // madvise covers that remainder, ours, and changes no contents.
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

    /// The first byte of the mapping.
    pub(super) fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// Size in bytes.
    pub(super) fn len(&self) -> usize {
        self.size
    }

    /// Which 4 KiB pages are resident, one byte per page with bit 0 set
    /// for resident pages.
    pub(super) fn resident_pages(&self) -> io::Result<Vec<u8>> {
        // x86-64's page size, the unit `mincore` reports in.
        const PAGE: usize = 4096;
        let mut vec = vec![0u8; self.size.div_ceil(PAGE)];
        // SAFETY: the range is our own live mapping and `vec` has one byte
        // per page of it, as `mincore` requires; `mincore` only writes `vec`.
        let rc = unsafe { libc::mincore(self.addr.as_ptr().cast(), self.size, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(vec)
    }

    /// Allocates host memory for `[offset, offset + len)` now, without
    /// changing its contents. Advisory: a range outside the mapping or an
    /// error is ignored (the memory is then allocated on first touch).
    pub(super) fn populate(&self, offset: usize, len: usize) {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return;
        }
        // SAFETY: the range was checked to lie inside our live mapping;
        // MADV_POPULATE_WRITE (Linux 5.14+) only faults pages in, keeping
        // their contents.
        unsafe {
            libc::madvise(
                self.addr.as_ptr().add(offset).cast(),
                len,
                libc::MADV_POPULATE_WRITE,
            );
        }
    }

    /// Drops the contents of the whole mapping: anonymous memory reads
    /// back as zeroes, a private file mapping as the file's contents.
    ///
    /// # Safety
    /// No reference into the mapping may be alive: the bytes change under
    /// it.
    pub(super) unsafe fn discard(&self) -> io::Result<()> {
        // SAFETY: our own live mapping; MADV_DONTNEED only drops its pages,
        // and the caller guarantees no reference observes the change.
        let rc =
            unsafe { libc::madvise(self.addr.as_ptr().cast(), self.size, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for AlignedMapping {
    fn drop(&mut self) {
        // SAFETY: `[addr, addr + size)` is the mapping this value owns, and
        // dropping it means no one uses it any more: its one user,
        // `GuestRam`, drops its `vm-memory` region first (field order), and
        // the KVM memslot over it lives in `kvm::VmFds`, which holds the
        // `GuestRam` and closes its fds before releasing it.
        unsafe {
            libc::munmap(self.addr.as_ptr().cast(), self.size);
        }
    }
}

/// A read-only shared mapping of part of a file: the memory image of a
/// snapshot. Reads are slices of it (`Deref<Target = [u8]>`).
///
/// The mapped bytes must not change while the mapping is in use: snapshot
/// images are files nothing writes after they were made (a memfd filled
/// before it is mapped, or a snapshot file, which must not change while it
/// is loaded: its identity is checked before each restore), or a block
/// cache whose holes are filled once, before anything reads them. That
/// rule is the mapped file's, not this type's to check: like every mapping
/// of a file, it cannot stop another process from writing the file.
pub(crate) struct FileMap(Mmap);

impl FileMap {
    /// Maps `len` bytes of `file` at `offset`, read-only and shared.
    pub(crate) fn new(file: &File, offset: u64, len: usize) -> io::Result<Self> {
        // SAFETY: memmap2's requirement is that the file does not change
        // while mapped, which is the contract of this type (see its docs):
        // the images mapped here are not written after creation, except a
        // block cache's holes, filled before they are read. Every read is a
        // bounds-checked slice of the mapping.
        unsafe { MmapOptions::new().offset(offset).len(len).map(file) }.map(Self)
    }

    /// Drops the mapping's page-table entries, so that it pins nothing in
    /// the page cache (a file page mapped anywhere cannot be evicted).
    /// Later reads see the file again.
    pub(crate) fn release_pages(&self) {
        // SAFETY: a read-only shared file mapping (the only kind `new`
        // makes): MADV_DONTNEED drops its page-table entries and later
        // reads fault the same file pages in again, so no byte any slice
        // of it sees changes.
        let _ = unsafe { self.0.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
    }
}

impl Deref for FileMap {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}
