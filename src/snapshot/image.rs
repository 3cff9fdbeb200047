//! Memory images: the guest memory of a snapshot, held as a sparse image
//! in a file (a memfd for snapshots taken in this process, the snapshot
//! file itself after loading) plus the list of pages it stores.
//!
//! A full snapshot stores every page that is not all zero; a diff stores
//! every page written since its base (data pages, and zero pages marked as
//! such). Each 2 MiB block of guest memory has a CRC32 of the data pages it
//! holds, verified the first time the block is used.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::ondemand::StoreMemory;
use super::SnapshotError;
use crate::abi::PAGE_SIZE;
pub(crate) use crate::store::block::is_zero;
use crate::sys::memory::{Backing, Stopped};
use crate::sys::mmap::FileMap;

/// Guest memory covered by one checksum.
pub(crate) const BLOCK_SIZE: u64 = 2 << 20;
const BLOCK_PAGES: u64 = BLOCK_SIZE / PAGE_SIZE;

/// A run of pages, either stored in the image or known to be all zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) first_page: u64,
    pub(crate) pages: u64,
    pub(crate) zero: bool,
}

impl Extent {
    pub(crate) fn addr(&self) -> u64 {
        self.first_page * PAGE_SIZE
    }
    pub(crate) fn len(&self) -> u64 {
        self.pages * PAGE_SIZE
    }
}

/// Identity of a loaded snapshot file, to notice later modification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileIdentity {
    pub(crate) path: PathBuf,
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl FileIdentity {
    pub(crate) fn of(file: &File, path: PathBuf) -> std::io::Result<Self> {
        let m = file.metadata()?;
        Ok(Self {
            path,
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }
}

/// The memory of one snapshot (full or diff).
pub(crate) struct MemoryImage {
    file: File,
    offset: u64,
    size: u64,
    map: FileMap,
    pub(crate) extents: Vec<Extent>,
    pub(crate) block_crc: Vec<u32>,
    verified: Vec<AtomicBool>,
    holes_checked: AtomicBool,
    pub(crate) source: Option<FileIdentity>,
    /// For an image restored straight from a store: the block cache that
    /// fills `file` on demand (its blocks are authenticated by the store,
    /// so the CRCs are not checked).
    on_demand: Option<Arc<StoreMemory>>,
}

pub(crate) fn memfd(size: u64) -> Result<File, SnapshotError> {
    let file = crate::sys::fs::memfd(c"snapvm-snapshot")
        .map_err(SnapshotError::io("memfd_create", None))?;
    file.set_len(size)
        .map_err(SnapshotError::io("sizing the memory image", None))?;
    Ok(file)
}

fn map(file: &File, offset: u64, size: u64) -> Result<FileMap, SnapshotError> {
    FileMap::new(file, offset, size as usize)
        .map_err(SnapshotError::io("mapping the memory image", None))
}

/// Appends page `page` (zero or not) to `extents`, merging with the last run.
fn push_page(extents: &mut Vec<Extent>, page: u64, zero: bool) {
    if let Some(last) = extents.last_mut() {
        if last.zero == zero && last.first_page + last.pages == page {
            last.pages += 1;
            return;
        }
    }
    extents.push(Extent {
        first_page: page,
        pages: 1,
        zero,
    });
}

impl MemoryImage {
    /// Captures every non-zero page of `ram` (a full snapshot).
    pub(crate) fn capture_full(ram: &Stopped<'_>) -> Result<Self, SnapshotError> {
        let resident = ram
            .resident_pages()
            .map_err(SnapshotError::io("mincore", None))?;
        let memory = ram.as_slice();
        let mut extents = Vec::new();
        for (page, flags) in resident.iter().enumerate() {
            if flags & 1 == 0 {
                continue;
            }
            let start = page * PAGE_SIZE as usize;
            if !is_zero(&memory[start..start + PAGE_SIZE as usize]) {
                push_page(&mut extents, page as u64, false);
            }
        }
        Self::write(memory, ram.size(), extents)
    }

    /// Captures the pages listed in `dirty` (a diff): data pages and zero pages.
    pub(crate) fn capture_pages(
        ram: &Stopped<'_>,
        dirty: impl Iterator<Item = u64>,
    ) -> Result<Self, SnapshotError> {
        let memory = ram.as_slice();
        let mut extents = Vec::new();
        for page in dirty {
            let start = (page * PAGE_SIZE) as usize;
            push_page(
                &mut extents,
                page,
                is_zero(&memory[start..start + PAGE_SIZE as usize]),
            );
        }
        Self::write(memory, ram.size(), extents)
    }

    fn write(memory: &[u8], size: u64, extents: Vec<Extent>) -> Result<Self, SnapshotError> {
        let file = memfd(size)?;
        let mut crc = vec![crc32fast::Hasher::new(); (size / BLOCK_SIZE) as usize];
        for e in extents.iter().filter(|e| !e.zero) {
            let bytes = &memory[e.addr() as usize..(e.addr() + e.len()) as usize];
            file.write_all_at(bytes, e.addr())
                .map_err(SnapshotError::io("writing the memory image", None))?;
            for (i, page) in bytes.chunks_exact(PAGE_SIZE as usize).enumerate() {
                crc[((e.first_page + i as u64) / BLOCK_PAGES) as usize].update(page);
            }
        }
        let block_crc = crc.into_iter().map(|h| h.finalize()).collect();
        Self::from_parts(file, 0, size, extents, block_crc, None, None)
    }

    /// An image stored in a snapshot file at `offset` (already validated:
    /// extents inside memory, one CRC per block, file long enough).
    pub(crate) fn from_file(
        file: File,
        offset: u64,
        size: u64,
        extents: Vec<Extent>,
        block_crc: Vec<u32>,
        source: FileIdentity,
    ) -> Result<Self, SnapshotError> {
        Self::from_parts(file, offset, size, extents, block_crc, Some(source), None)
    }

    /// An image of `size` bytes in `cache` (a memfd, empty at first) that
    /// `memory` fills block by block from a store.
    pub(crate) fn new_on_demand(
        cache: File,
        size: u64,
        extents: Vec<Extent>,
        block_crc: Vec<u32>,
        memory: Arc<StoreMemory>,
    ) -> Result<Self, SnapshotError> {
        Self::from_parts(cache, 0, size, extents, block_crc, None, Some(memory))
    }

    /// Maps `size` bytes of `file` at `offset`. An image read from a
    /// snapshot file (`source`) starts unverified: its blocks' CRCs and its
    /// holes are checked before use. One written here or filled from a
    /// store starts verified.
    fn from_parts(
        file: File,
        offset: u64,
        size: u64,
        extents: Vec<Extent>,
        block_crc: Vec<u32>,
        source: Option<FileIdentity>,
        on_demand: Option<Arc<StoreMemory>>,
    ) -> Result<Self, SnapshotError> {
        let map = map(&file, offset, size)?;
        let checked = source.is_none();
        let verified = block_crc.iter().map(|_| AtomicBool::new(checked)).collect();
        Ok(Self {
            file,
            offset,
            size,
            map,
            extents,
            block_crc,
            verified,
            holes_checked: AtomicBool::new(checked),
            source,
            on_demand,
        })
    }

    /// The block cache filling this image, if it is restored on demand.
    pub(crate) fn on_demand(&self) -> Option<&Arc<StoreMemory>> {
        self.on_demand.as_ref()
    }

    /// Makes sure every stored page of the image is present (fetches the
    /// rest of an on-demand image; nothing to do for others).
    pub(crate) fn ensure_all(&self) -> Result<(), SnapshotError> {
        self.ensure(0, self.size)
    }

    fn ensure(&self, addr: u64, len: u64) -> Result<(), SnapshotError> {
        match &self.on_demand {
            Some(m) => m.ensure_range(addr, len),
            None => Ok(()),
        }
    }

    /// Guest memory size.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of page data stored.
    pub(crate) fn stored_bytes(&self) -> u64 {
        self.extents
            .iter()
            .filter(|e| !e.zero)
            .map(Extent::len)
            .sum()
    }

    /// The stored bytes of `extent`.
    pub(crate) fn data(&self, extent: &Extent) -> &[u8] {
        &self.map[extent.addr() as usize..(extent.addr() + extent.len()) as usize]
    }

    /// The file and offset holding the image, for a private file mapping.
    pub(crate) fn backing(&self) -> Backing<'_> {
        Backing::File {
            fd: self.file.as_fd(),
            offset: self.offset,
        }
    }

    /// Checks that a loaded file has not changed since it was loaded.
    pub(crate) fn check_unchanged(&self) -> Result<(), SnapshotError> {
        if let Some(source) = &self.source {
            let now = FileIdentity::of(&self.file, source.path.clone())
                .map_err(SnapshotError::io("stat", Some(&source.path)))?;
            if &now != source {
                return Err(SnapshotError::FileChanged {
                    path: source.path.clone(),
                });
            }
        }
        Ok(())
    }

    /// Verifies everything a private mapping of the whole image exposes:
    /// the CRC of every block that holds data, and (for a loaded file) that
    /// the pages the image does not store read as zeroes. Done once.
    pub(crate) fn verify_all(&self) -> Result<(), SnapshotError> {
        (0..self.block_crc.len() as u64).try_for_each(|b| self.verify_block(b))?;
        if self.source.is_some() && !self.holes_checked.load(Ordering::Acquire) {
            self.check_holes()?;
            self.holes_checked.store(true, Ordering::Release);
            // The checks read the whole image through this mapping: drop
            // its page-table entries so that it pins nothing in the page
            // cache (a file page mapped anywhere cannot be evicted).
            self.map.release_pages();
        }
        Ok(())
    }

    /// Checks that every byte of the file's memory image outside the stored
    /// extents is zero. The file's data regions are found with
    /// `SEEK_DATA`/`SEEK_HOLE`, so a well-formed sparse file costs a few
    /// system calls; only data outside the extents (a tampered or foreign
    /// file, or a file system without hole support) is read.
    fn check_holes(&self) -> Result<(), SnapshotError> {
        let (start, end) = (self.offset, self.offset + self.size);
        let mut pos = start;
        while pos < end {
            let Ok(Some(data)) = crate::sys::fs::seek_data(&self.file, pos) else {
                break; // ENXIO: no data after `pos`
            };
            let data = data.max(pos);
            if data >= end {
                break;
            }
            let hole = match crate::sys::fs::seek_hole(&self.file, data) {
                Ok(Some(hole)) => hole.min(end),
                _ => end,
            };
            let first = (data - start) / PAGE_SIZE;
            let last = (hole - start).div_ceil(PAGE_SIZE);
            for page in first..last {
                if self.page(page)?.is_none() {
                    let at = (page * PAGE_SIZE) as usize;
                    if !is_zero(&self.map[at..at + PAGE_SIZE as usize]) {
                        return Err(SnapshotError::Malformed {
                            section: "memory",
                            reason: "a page the image does not store is not zero",
                        });
                    }
                }
            }
            pos = hole.max(data + 1);
        }
        Ok(())
    }

    fn verify_block(&self, block: u64) -> Result<(), SnapshotError> {
        let flag = &self.verified[block as usize];
        if flag.load(Ordering::Acquire) {
            return Ok(());
        }
        let (start, end) = (block * BLOCK_PAGES, (block + 1) * BLOCK_PAGES);
        let mut hasher = crc32fast::Hasher::new();
        for e in self
            .extents
            .iter()
            .filter(|e| !e.zero && e.first_page < end && e.first_page + e.pages > start)
        {
            let from = e.first_page.max(start);
            let to = (e.first_page + e.pages).min(end);
            hasher.update(&self.map[(from * PAGE_SIZE) as usize..(to * PAGE_SIZE) as usize]);
        }
        if hasher.finalize() != self.block_crc[block as usize] {
            return Err(SnapshotError::CorruptMemory { block });
        }
        flag.store(true, Ordering::Release);
        Ok(())
    }

    /// Page `page` of this image: `Some(Some(bytes))` if stored (block
    /// verified), `Some(None)` if recorded as zero, `None` if not in the image.
    pub(crate) fn page(&self, page: u64) -> Result<Option<Option<&[u8]>>, SnapshotError> {
        let i = self
            .extents
            .partition_point(|e| e.first_page + e.pages <= page);
        match self.extents.get(i) {
            Some(e) if e.first_page <= page => {
                if e.zero {
                    return Ok(Some(None));
                }
                self.verify_block(page / BLOCK_PAGES)?;
                self.ensure(page * PAGE_SIZE, PAGE_SIZE)?;
                let start = (page * PAGE_SIZE) as usize;
                Ok(Some(Some(&self.map[start..start + PAGE_SIZE as usize])))
            }
            _ => Ok(None),
        }
    }

    /// Writes the image's pages into `ram` (zero extents are zeroed),
    /// verifying each block on its first use.
    pub(crate) fn apply(&self, ram: &mut Stopped<'_>) -> Result<(), SnapshotError> {
        let mut last_verified = u64::MAX;
        for e in &self.extents {
            if !e.zero {
                let first = e.first_page / BLOCK_PAGES;
                let last = (e.first_page + e.pages - 1) / BLOCK_PAGES;
                for block in first..=last {
                    if block != last_verified {
                        self.verify_block(block)?;
                        last_verified = block;
                    }
                }
            }
            let done = if e.zero {
                ram.zero(e.addr(), e.len())
            } else {
                self.ensure(e.addr(), e.len())?;
                ram.copy_in(e.addr(), self.data(e))
            };
            done.map_err(|_| SnapshotError::Malformed {
                section: "memory",
                reason: "extent outside guest memory",
            })?;
        }
        Ok(())
    }

    /// Asks the kernel to read `pages` of the image file into the page
    /// cache (sorted and merged into ranges, so the reads are sequential).
    /// Advisory: errors are ignored.
    pub(crate) fn prefetch(&self, pages: impl Iterator<Item = u64>) {
        let limit = self.size / PAGE_SIZE;
        let mut sorted: Vec<u64> = pages.filter(|&p| p < limit).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut i = 0;
        while i < sorted.len() {
            let first = sorted[i];
            let mut end = first + 1;
            i += 1;
            while i < sorted.len() && sorted[i] == end {
                end += 1;
                i += 1;
            }
            let (Ok(at), Ok(len)) = (
                libc::off_t::try_from(self.offset + first * PAGE_SIZE),
                libc::off_t::try_from((end - first) * PAGE_SIZE),
            ) else {
                return;
            };
            crate::sys::fs::will_need(&self.file, at, len);
        }
    }

    /// Zeroes in `ram` every page this image stores data for.
    pub(crate) fn zero_data_pages(&self, ram: &mut Stopped<'_>) -> Result<(), SnapshotError> {
        for e in self.extents.iter().filter(|e| !e.zero) {
            ram.zero(e.addr(), e.len())
                .map_err(|_| SnapshotError::Malformed {
                    section: "memory",
                    reason: "extent outside guest memory",
                })?;
        }
        Ok(())
    }
}
