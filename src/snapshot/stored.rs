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

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::file::{encode_header_and_state, load_file, HEADER_SIZE, MAX_HEADER_AND_STATE};
use super::image::{memfd, Extent};
use super::{Snapshot, SnapshotError};
use crate::abi::{HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::store::{ConvergentStore, ManifestId};
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
    let metadata = reader.manifest().metadata.clone();
    let size = metadata
        .strip_prefix(METADATA_TAG)
        .and_then(|rest| <[u8; 8]>::try_from(rest).ok())
        .map(u64::from_le_bytes)
        .ok_or(malformed("not a snapshot (unknown metadata)"))?;
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
    let memory_offset = u64::from_le_bytes(head[32..40].try_into().expect("8 bytes"));
    if memory_offset % PAGE_SIZE != 0
        || memory_offset < tail
        || memory_offset > MAX_HEADER_AND_STATE + PAGE_SIZE
    {
        return Err(malformed("memory offset"));
    }
    // Lay the snapshot out as a file in memory, zero pages left as holes.
    let file = memfd(memory_offset + size)?;
    file.write_all_at(&head, 0)
        .map_err(io("writing the snapshot state"))?;
    reader
        .seek(SeekFrom::Start(0))
        .map_err(io("seeking in the store"))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        let n = chunk.len().min((size - pos) as usize);
        reader
            .read_exact(&mut chunk[..n])
            .map_err(io("reading the memory image"))?;
        for (i, page) in chunk[..n].chunks(PAGE_SIZE as usize).enumerate() {
            if page.iter().any(|&b| b != 0) {
                let at = memory_offset + pos + (i as u64) * PAGE_SIZE;
                file.write_all_at(page, at)
                    .map_err(io("writing the memory image"))?;
            }
        }
        pos += n as u64;
    }
    load_file(file, &PathBuf::from(format!("store:{id}")), base)
}
