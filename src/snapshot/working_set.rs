//! Working-set traces: the pages a restored VM touched, in fault order.
//!
//! A [`WorkingSet`] belongs to one snapshot (its [`SnapshotId`] is inside
//! the trace and in its cache key). Record it after a restored VM's first
//! invocations ([`WorkingSet::record`]); before the next restore of the same
//! snapshot, [`WorkingSet::prefetch`] brings those pages in ahead of the
//! guest. Traces of several runs merge: the newest run's pages come first,
//! in the order it touched them, and a page no run touched for
//! [`WorkingSet::MAX_AGE`] runs ages out. See `docs/trace.md`.

use log::warn;

use super::{Snapshot, SnapshotError, SnapshotId};
use crate::trace::{CodeId, TraceCache, TraceError, TraceKey, TraceKind};
use crate::VmInstance;

/// `"SVWS"`, then the format version.
const MAGIC: [u8; 4] = *b"SVWS";
const VERSION: u8 = 1;

/// A run of consecutive pages last touched in the same run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    first: u64,
    pages: u64,
    /// The run (1-based) that last touched these pages.
    last_run: u32,
}

/// The pages restored VMs of one snapshot touched, in the order they first
/// touched them, as page ranges. Cheap to encode (a few bytes per range).
///
/// ```no_run
/// use snapvm::snapshot::WorkingSet;
/// use snapvm::trace::TraceCache;
/// use snapvm::{GuestProgram, Snapshot, VmConfig, VmInstance};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = VmConfig::new(GuestProgram::from_file("guest.elf")?);
/// let snapshot = Snapshot::load("ready.snap")?;
/// let cache = TraceCache::open("/var/cache/snapvm-traces", 64 << 20)?;
/// let key = WorkingSet::key("tenant-a", "v1", &snapshot);
///
/// let mut trace = WorkingSet::load(&cache, &key, &snapshot)
///     .unwrap_or_else(|| WorkingSet::new(&snapshot));
/// trace.prefetch(&snapshot); // before the first guest instruction
/// let mut vm = VmInstance::restore(&config, &snapshot)?;
/// vm.invoke("handle", b"request")?;
/// trace.record(&vm)?; // merge what this run touched
/// trace.save(&cache, &key)?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkingSet {
    snapshot: SnapshotId,
    memory_pages: u64,
    runs: u32,
    ranges: Vec<Range>,
}

impl WorkingSet {
    /// Runs a page may go untouched before it leaves the trace.
    pub const MAX_AGE: u32 = 3;

    /// An empty trace for `snapshot`.
    pub fn new(snapshot: &Snapshot) -> Self {
        Self {
            snapshot: snapshot.id(),
            memory_pages: snapshot.memory_size() / crate::abi::PAGE_SIZE,
            runs: 0,
            ranges: Vec::new(),
        }
    }

    /// The cache key of `snapshot`'s working set: the tenant, the code
    /// (guest image and snapshot id), the runtime version, and
    /// [`TraceKind::WorkingSet`].
    pub fn key(tenant: &str, runtime: &str, snapshot: &Snapshot) -> TraceKey {
        TraceKey {
            tenant: tenant.to_string(),
            code: CodeId::of(&snapshot.inner.program_digest, snapshot.id()),
            runtime: runtime.to_string(),
            kind: TraceKind::WorkingSet,
        }
    }

    /// The snapshot this trace belongs to.
    pub fn snapshot_id(&self) -> SnapshotId {
        self.snapshot
    }

    /// How many runs were merged into it.
    pub fn runs(&self) -> u32 {
        self.runs
    }

    /// Number of pages in the trace.
    pub fn page_count(&self) -> u64 {
        self.ranges.iter().map(|r| r.pages).sum()
    }

    /// The traced pages (guest page numbers), newest run first, in the
    /// order they were touched.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|r| r.first..r.first + r.pages)
    }

    /// Merges the pages `vm` touched since it was restored (it must have
    /// been restored from this trace's snapshot, else nothing changes and
    /// `Ok(false)` is returned). A VM restored on demand reports its pages
    /// in fault order; a lazily restored one in address order (the kernel
    /// keeps no order for file-backed faults).
    pub fn record<D>(&mut self, vm: &VmInstance<D>) -> Result<bool, SnapshotError> {
        if vm.restored_from() != Some(self.snapshot) {
            return Ok(false);
        }
        let pages = super::touched_pages(vm)?;
        self.merge_run(&pages);
        Ok(true)
    }

    /// Merges one run that touched `pages` (in this order; pages outside
    /// the snapshot's memory and repeats are ignored).
    pub fn merge_run(&mut self, pages: &[u64]) {
        self.runs = self.runs.saturating_add(1);
        let run = self.runs;
        let mut seen = vec![0u64; self.memory_pages.div_ceil(64) as usize];
        let mut mark = |p: u64| {
            let (w, b) = ((p / 64) as usize, p % 64);
            let new = seen[w] & (1 << b) == 0;
            seen[w] |= 1 << b;
            new
        };
        let mut out: Vec<Range> = Vec::new();
        let mut push = |p: u64, last_run: u32| match out.last_mut() {
            Some(r) if r.first + r.pages == p && r.last_run == last_run => r.pages += 1,
            _ => out.push(Range {
                first: p,
                pages: 1,
                last_run,
            }),
        };
        for &p in pages {
            if p < self.memory_pages && mark(p) {
                push(p, run);
            }
        }
        for r in std::mem::take(&mut self.ranges) {
            if run - r.last_run >= Self::MAX_AGE {
                continue; // aged out
            }
            for p in r.first..r.first + r.pages {
                if mark(p) {
                    push(p, r.last_run);
                }
            }
        }
        self.ranges = out;
    }

    /// Brings the traced pages of `snapshot` in ahead of the guest, if
    /// this trace belongs to it (otherwise it is ignored with a warning and
    /// `false` is returned). Never changes what the guest sees: it only
    /// warms caches. For a snapshot loaded from a file, it asks the kernel
    /// to read the traced parts of the file into the page cache (in
    /// address order, so the disk reads sequentially); for one opened on
    /// demand from a store, it queues the traced blocks, in fault order,
    /// for the fetch threads, which fetch them in parallel while the guest
    /// starts.
    pub fn prefetch(&self, snapshot: &Snapshot) -> bool {
        if snapshot.id() != self.snapshot {
            warn!(
                trace = self.snapshot.to_string().as_str(),
                snapshot = snapshot.id().to_string().as_str();
                "working set of another snapshot ignored"
            );
            return false;
        }
        super::prefetch_pages(snapshot, self.pages());
        true
    }

    /// The trace as bytes (see `docs/trace.md` for the format).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40 + self.ranges.len() * 4);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.snapshot.0);
        out.extend_from_slice(&self.memory_pages.to_le_bytes());
        out.extend_from_slice(&self.runs.to_le_bytes());
        out.extend_from_slice(&(self.ranges.len() as u32).to_le_bytes());
        let mut prev_end = 0u64;
        for r in &self.ranges {
            // Signed distance from the end of the previous range, zigzag.
            let delta = r.first.wrapping_sub(prev_end) as i64;
            put_varint(&mut out, ((delta << 1) ^ (delta >> 63)) as u64);
            put_varint(&mut out, r.pages);
            put_varint(&mut out, u64::from(self.runs - r.last_run));
            prev_end = r.first + r.pages;
        }
        out
    }

    /// Decodes a trace for `snapshot`. `None` (with a warning) when the
    /// bytes are malformed, of another version, or belong to another
    /// snapshot: a trace is never applied to memory it was not recorded
    /// on. Untrusted input: every count and range is bounded by the
    /// snapshot's memory before anything is allocated.
    pub fn decode(bytes: &[u8], snapshot: &Snapshot) -> Option<Self> {
        let decoded = Self::decode_for(bytes, snapshot.id(), snapshot.memory_size());
        if let Err(reason) = &decoded {
            warn!(
                snapshot = snapshot.id().to_string().as_str(),
                reason = *reason;
                "working-set trace ignored"
            );
        }
        decoded.ok()
    }

    fn decode_for(bytes: &[u8], id: SnapshotId, memory_size: u64) -> Result<Self, &'static str> {
        let mut r = bytes;
        let mut take = |n: usize| -> Result<&[u8], &'static str> {
            if r.len() < n {
                return Err("truncated");
            }
            let (head, tail) = r.split_at(n);
            r = tail;
            Ok(head)
        };
        if take(4)? != MAGIC {
            return Err("not a working-set trace");
        }
        if take(1)?[0] != VERSION {
            return Err("unknown version");
        }
        let snapshot = SnapshotId(take(16)?.try_into().expect("16 bytes"));
        let memory_pages = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        let runs = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
        let count = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
        if snapshot != id {
            return Err("recorded on another snapshot");
        }
        if memory_pages != memory_size / crate::abi::PAGE_SIZE {
            return Err("memory size differs");
        }
        // Each range takes at least three bytes and one page.
        if u64::from(count) > memory_pages || count as usize > r.len() / 3 {
            return Err("range count exceeds the trace");
        }
        let mut seen = vec![0u64; memory_pages.div_ceil(64) as usize];
        let mut ranges = Vec::with_capacity(count as usize);
        let mut prev_end = 0u64;
        for _ in 0..count {
            let zz = get_varint(&mut r)?;
            let delta = ((zz >> 1) as i64) ^ -((zz & 1) as i64);
            let first = prev_end.wrapping_add(delta as u64);
            let pages = get_varint(&mut r)?;
            let age = get_varint(&mut r)?;
            let end = first.checked_add(pages).ok_or("range overflows")?;
            if pages == 0 || end > memory_pages {
                return Err("range outside memory");
            }
            if age >= u64::from(Self::MAX_AGE) || age >= u64::from(runs.max(1)) {
                return Err("age out of bounds");
            }
            for p in first..end {
                let (w, b) = ((p / 64) as usize, p % 64);
                if seen[w] & (1 << b) != 0 {
                    return Err("a page appears twice");
                }
                seen[w] |= 1 << b;
            }
            ranges.push(Range {
                first,
                pages,
                last_run: runs - age as u32,
            });
            prev_end = end;
        }
        if !r.is_empty() {
            return Err("trailing bytes");
        }
        Ok(Self {
            snapshot,
            memory_pages,
            runs,
            ranges,
        })
    }

    /// The trace stored under `key` in `cache`, if there is one for
    /// `snapshot` (a foreign or corrupt entry is ignored with a warning).
    pub fn load(cache: &TraceCache, key: &TraceKey, snapshot: &Snapshot) -> Option<Self> {
        Self::decode(&cache.get(key)?, snapshot)
    }

    /// Stores the trace under `key` in `cache`.
    pub fn save(&self, cache: &TraceCache, key: &TraceKey) -> Result<(), TraceError> {
        cache.put(key, &self.encode())
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(r: &mut &[u8]) -> Result<u64, &'static str> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = r.split_first().ok_or("truncated")?;
        *r = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty(pages: u64) -> WorkingSet {
        WorkingSet {
            snapshot: SnapshotId([7; 16]),
            memory_pages: pages,
            runs: 0,
            ranges: Vec::new(),
        }
    }

    fn roundtrip(ws: &WorkingSet) -> WorkingSet {
        let bytes = ws.encode();
        WorkingSet::decode_for(&bytes, ws.snapshot, ws.memory_pages * 4096).unwrap()
    }

    #[test]
    fn keeps_fault_order_and_merges_ranges() {
        let mut ws = empty(1000);
        ws.merge_run(&[10, 11, 12, 500, 3, 4, 11, 2000]);
        assert_eq!(ws.pages().collect::<Vec<_>>(), [10, 11, 12, 500, 3, 4]);
        assert_eq!(ws.ranges.len(), 3);
        assert_eq!(roundtrip(&ws), ws);
    }

    #[test]
    fn newest_run_first_and_unused_pages_age_out() {
        let mut ws = empty(100);
        ws.merge_run(&[1, 2, 3]);
        ws.merge_run(&[50, 2]);
        assert_eq!(ws.pages().collect::<Vec<_>>(), [50, 2, 1, 3]);
        ws.merge_run(&[50]);
        assert_eq!(ws.pages().collect::<Vec<_>>(), [50, 2, 1, 3]);
        // Pages 1 and 3 were last used in run 1: gone after run 4.
        ws.merge_run(&[50]);
        assert_eq!(ws.pages().collect::<Vec<_>>(), [50, 2]);
        ws.merge_run(&[]);
        assert_eq!(ws.pages().collect::<Vec<_>>(), [50]);
        assert_eq!(roundtrip(&ws), ws);
    }

    #[test]
    fn encoding_is_compact() {
        let mut ws = empty(65536);
        let pages: Vec<u64> = (0..4096).map(|i| (i * 7919) % 65536).collect();
        ws.merge_run(&pages);
        let bytes = ws.encode();
        assert!(bytes.len() < 4096 * 6, "{} bytes", bytes.len());
        assert_eq!(roundtrip(&ws), ws);
    }

    #[test]
    fn foreign_or_malformed_traces_are_refused() {
        let mut ws = empty(64);
        ws.merge_run(&[1, 2, 9]);
        let bytes = ws.encode();
        assert!(WorkingSet::decode_for(&bytes, SnapshotId([8; 16]), 64 * 4096).is_err());
        assert!(WorkingSet::decode_for(&bytes, ws.snapshot, 128 * 4096).is_err());
        // Every truncation and every single-byte change either fails or
        // decodes to a trace inside memory.
        for n in 0..bytes.len() {
            assert!(WorkingSet::decode_for(&bytes[..n], ws.snapshot, 64 * 4096).is_err());
        }
        for i in 0..bytes.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] = v;
                if let Ok(d) = WorkingSet::decode_for(&b, ws.snapshot, 64 * 4096) {
                    assert!(d.pages().all(|p| p < 64));
                }
            }
        }
        // A huge count in a short trace is refused before allocating.
        let mut b = bytes.clone();
        b[33..37].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(WorkingSet::decode_for(&b, ws.snapshot, 64 * 4096).is_err());
    }
}
