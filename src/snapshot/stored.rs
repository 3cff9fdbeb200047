//! Snapshots in a [`ConvergentStore`]: the fleet case. A snapshot saved into
//! a store shared by several hosts (an S3 bucket) restores on any of them,
//! and snapshots of one runtime share nearly all their blocks.
//!
//! # Layout in the store
//! One data set per snapshot: first the memory image, exactly
//! `memory_size` bytes with guest page *n* at offset *n* × 4096 (pages the
//! snapshot does not store are zero, and all-zero store blocks cost
//! nothing); then the snapshot file's header and state section
//! (`docs/snapshot-format.md`). Putting the memory first keeps every page
//! at the same offset in every snapshot of a guest, whatever the length of
//! its state, so equal pages fall into equal blocks. The manifest's
//! (sealed) metadata is `snapvm.snapshot.1` followed by the memory size as
//! a little-endian `u64`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::file::{encode_header_and_state, load_file, HEADER_SIZE, MAX_HEADER_AND_STATE};
use super::image::{is_zero, memfd, Extent};
use super::{Snapshot, SnapshotError};
use crate::abi::{HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::store::{ConvergentStore, Entry, ManifestId, ManifestReader};
use crate::vm::MAX_MEMORY_SIZE;

const METADATA_TAG: &[u8] = b"snapvm.snapshot.1";

/// Streams a snapshot's memory image: stored pages, zeroes elsewhere.
struct MemoryStream<'a> {
    snapshot: &'a Snapshot,
    extents: std::slice::Iter<'a, Extent>,
    current: Option<&'a Extent>,
    pos: u64,
    size: u64,
}

impl Read for MemoryStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        while let Some(e) = self.current {
            if e.addr() + e.len() > self.pos && !e.zero {
                break;
            }
            self.current = self.extents.next();
        }
        let n = match self.current {
            Some(e) if e.addr() <= self.pos => {
                let data = self.snapshot.inner.memory.data(e);
                let from = (self.pos - e.addr()) as usize;
                let n = buf.len().min(data.len() - from);
                buf[..n].copy_from_slice(&data[from..from + n]);
                n
            }
            next => {
                let until = next.map_or(self.size, Extent::addr);
                let n = buf.len().min((until - self.pos) as usize);
                buf[..n].fill(0);
                n
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}

impl Snapshot {
    /// Saves this snapshot into `store` and returns the manifest id to load
    /// it with. A diff is saved alone: save its base too.
    pub fn save_to_store(&self, store: &ConvergentStore) -> Result<ManifestId, SnapshotError> {
        self.inner.memory.ensure_all()?;
        let (head, _) = encode_header_and_state(self);
        let size = self.memory_size();
        let mut extents = self.inner.memory.extents.iter();
        let current = extents.next();
        let memory = MemoryStream {
            snapshot: self,
            extents,
            current,
            pos: 0,
            size,
        };
        let mut metadata = METADATA_TAG.to_vec();
        metadata.extend_from_slice(&size.to_le_bytes());
        let report = store.put(memory.chain(&head[..]), &metadata)?;
        Ok(report.manifest)
    }

    /// Loads a full snapshot saved with [`Snapshot::save_to_store`], from
    /// this or any other store handle on the same backend and owner key. The
    /// store verifies every block; the snapshot is then checked like a file.
    ///
    /// The cost follows the snapshot's stored data, not its memory size:
    /// only the blocks the manifest stores are fetched (once each), and the
    /// blocks it records as zero are neither fetched nor scanned.
    pub fn load_from_store(
        store: &ConvergentStore,
        id: &ManifestId,
    ) -> Result<Snapshot, SnapshotError> {
        load_from_store(store, id, None)
    }

    /// Loads a diff snapshot saved with [`Snapshot::save_to_store`], taken
    /// against `base`.
    pub fn load_diff_from_store(
        store: &ConvergentStore,
        id: &ManifestId,
        base: &Snapshot,
    ) -> Result<Snapshot, SnapshotError> {
        load_from_store(store, id, Some(base))
    }
}

/// Checks a stored snapshot's memory size against the data set's length and
/// reads the header and state that follow the memory image.
pub(super) fn read_head_and_state(
    reader: &mut ManifestReader<'_>,
    size: u64,
) -> Result<Vec<u8>, SnapshotError> {
    let malformed = |reason| SnapshotError::Malformed {
        section: "store data set",
        reason,
    };
    if size == 0 || size % HUGE_PAGE_SIZE != 0 || size > MAX_MEMORY_SIZE {
        return Err(malformed("memory size"));
    }
    let tail = reader
        .len()
        .checked_sub(size)
        .filter(|&t| (HEADER_SIZE..=MAX_HEADER_AND_STATE).contains(&t))
        .ok_or(malformed("length does not match the memory size"))?;
    let io = |step| SnapshotError::io(step, None);
    // Header and state: bounded by MAX_HEADER_AND_STATE, checked above.
    let mut head = vec![0u8; tail as usize];
    reader
        .seek(SeekFrom::Start(size))
        .map_err(io("seeking in the store"))?;
    reader
        .read_exact(&mut head)
        .map_err(io("reading the snapshot state"))?;
    Ok(head)
}
fn load_from_store(
    store: &ConvergentStore,
    id: &ManifestId,
    base: Option<&Snapshot>,
) -> Result<Snapshot, SnapshotError> {
    let malformed = |reason| SnapshotError::Malformed {
        section: "store data set",
        reason,
    };
    let mut reader = store.reader(id)?;
    let size = memory_size_of(&reader.manifest().metadata)?;
    let head = read_head_and_state(&mut reader, size)?;
    let tail = head.len() as u64;
    let io = |step| SnapshotError::io(step, None);
    let memory_offset = u64::from_le_bytes(head[32..40].try_into().expect("8 bytes"));
    if memory_offset % PAGE_SIZE != 0
        || memory_offset < tail
        || memory_offset > MAX_HEADER_AND_STATE + PAGE_SIZE
    {
        return Err(malformed("memory offset"));
    }
    // Lay the snapshot out as a file in memory, zero pages left as holes.
    // Only the pages that stored blocks cover are read: a block the
    // manifest records as zero is neither fetched nor scanned.
    let file = memfd(memory_offset + size)?;
    file.write_all_at(&head, 0)
        .map_err(io("writing the snapshot state"))?;
    let runs = stored_runs(&reader.manifest().entries, size);
    let longest = runs.iter().map(|r| r.end - r.start).max().unwrap_or(0);
    let mut chunk = vec![0u8; longest.min(CHUNK) as usize];
    for run in runs {
        reader
            .seek(SeekFrom::Start(run.start))
            .map_err(io("seeking in the store"))?;
        let mut pos = run.start;
        while pos < run.end {
            let n = chunk.len().min((run.end - pos) as usize);
            reader
                .read_exact(&mut chunk[..n])
                .map_err(io("reading the memory image"))?;
            write_nonzero_pages(&file, &chunk[..n], memory_offset + pos)
                .map_err(io("writing the memory image"))?;
            pos += n as u64;
        }
    }
    load_file(file, &PathBuf::from(format!("store:{id}")), base)
}

/// The memory size a snapshot's manifest metadata records.
pub(crate) fn memory_size_of(metadata: &[u8]) -> Result<u64, SnapshotError> {
    metadata
        .strip_prefix(METADATA_TAG)
        .and_then(|rest| <[u8; 8]>::try_from(rest).ok())
        .map(u64::from_le_bytes)
        .ok_or(SnapshotError::Malformed {
            section: "store data set",
            reason: "not a snapshot (unknown metadata)",
        })
}

/// Bytes of the memory image read from the store at a time.
const CHUNK: u64 = 1 << 20;

/// The page-aligned byte ranges of the first `size` bytes of a data set
/// that its stored (non-zero) blocks cover, sorted and merged. Block
/// boundaries need not fall on pages: a page shared by a stored block and a
/// zero block is in a range (the reader fills the zero part).
fn stored_runs(entries: &[Entry], size: u64) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    let mut offset = 0u64;
    for entry in entries {
        let start = offset;
        offset += u64::from(entry.len());
        if start >= size {
            break;
        }
        if let Entry::Data { .. } = entry {
            // `size` is a multiple of the page size, so `end` stays within it.
            let (start, end) = (
                start - start % PAGE_SIZE,
                offset.min(size).next_multiple_of(PAGE_SIZE),
            );
            match runs.last_mut() {
                Some(last) if last.end >= start => last.end = last.end.max(end),
                _ => runs.push(start..end),
            }
        }
    }
    runs
}

/// Writes the pages of `bytes` (page aligned, a whole number of pages) that
/// are not all zero to `file` at `at`, one write per run of such pages.
fn write_nonzero_pages(file: &File, bytes: &[u8], at: u64) -> std::io::Result<()> {
    let page = PAGE_SIZE as usize;
    let mut run: Option<usize> = None;
    for (i, p) in bytes.chunks(page).enumerate() {
        match (is_zero(p), run) {
            (false, None) => run = Some(i),
            (true, Some(first)) => {
                file.write_all_at(&bytes[first * page..i * page], at + (first * page) as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(first) = run {
        file.write_all_at(&bytes[first * page..], at + (first * page) as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BlockId, BlockKey};

    fn data(len: u32) -> Entry {
        Entry::Data {
            id: BlockId::from_bytes([1; 32]),
            key: BlockKey::from_bytes([2; 32]),
            len,
        }
    }

    fn zero(len: u32) -> Entry {
        Entry::Zero { len }
    }

    /// The pages a naive reader would read: every page holding a byte of a
    /// stored block, below `size`.
    fn naive(entries: &[Entry], size: u64) -> Vec<u64> {
        let mut pages = Vec::new();
        let mut offset = 0;
        for e in entries {
            for b in offset..offset + u64::from(e.len()) {
                let page = b / PAGE_SIZE;
                if matches!(e, Entry::Data { .. }) && b < size && pages.last() != Some(&page) {
                    pages.push(page);
                }
            }
            offset += u64::from(e.len());
        }
        pages.dedup();
        pages
    }

    fn pages(runs: &[Range<u64>]) -> Vec<u64> {
        runs.iter()
            .flat_map(|r| {
                assert!(r.start % PAGE_SIZE == 0 && r.end % PAGE_SIZE == 0 && r.start < r.end);
                r.start / PAGE_SIZE..r.end / PAGE_SIZE
            })
            .collect()
    }

    #[test]
    fn runs_cover_exactly_the_stored_pages() {
        let size = 16 * PAGE_SIZE;
        let cases: Vec<Vec<Entry>> = vec![
            // Page-sized and larger aligned blocks, the state after memory.
            vec![zero(8192), data(8192), zero(8192), zero(8192), data(8192)]
                .into_iter()
                .chain([zero(8192), data(8192), zero(8192), data(300)])
                .collect(),
            // Blocks that straddle pages, and a block that straddles the end
            // of memory.
            vec![
                zero(5000),
                data(100),
                zero(10_000),
                data(4096),
                zero(30_000),
            ]
            .into_iter()
            .chain([data(20_000), data(100)])
            .collect(),
            vec![zero(65_536), data(7)],
            vec![data(65_536), data(10)],
            vec![],
        ];
        for entries in cases {
            let runs = stored_runs(&entries, size);
            assert_eq!(pages(&runs), naive(&entries, size), "{entries:?}");
            // Merged: no two runs touch.
            assert!(runs.windows(2).all(|w| w[0].end < w[1].start));
        }
    }

    #[test]
    fn only_nonzero_pages_are_written() {
        let page = PAGE_SIZE as usize;
        let mut bytes = vec![0u8; 6 * page];
        for p in [0, 2, 3, 5] {
            bytes[p * page + 17] = p as u8 + 1;
        }
        let file = memfd(PAGE_SIZE + 6 * PAGE_SIZE).unwrap();
        write_nonzero_pages(&file, &bytes, PAGE_SIZE).unwrap();
        let mut back = vec![0u8; 7 * page];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[page..], &bytes[..]);
        // Zero pages stay holes: the data regions are pages 1, 3-4 and 6.
        let data = crate::sys::fs::seek_data(&file, PAGE_SIZE * 2).unwrap();
        assert_eq!(data, Some(PAGE_SIZE * 3));
    }
}
