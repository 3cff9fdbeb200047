//! Streaming put and get with bounded memory, on one or more threads.
//!
//! A put reads the input one block at a time into a fixed pool of buffers;
//! worker threads encrypt and store blocks while the caller's thread keeps
//! reading. A get works the other way round: workers fetch and decrypt
//! blocks ahead, the caller's thread writes them out in order. In both, at
//! most `ingest_threads * (queue_blocks + 2)` blocks are in memory.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Mutex};

use super::block::{is_zero, read_full};
use super::crypto::{self, TAG_LEN};
use super::gc::WriteLease;
use super::ids::{BlockId, BlockKey, ManifestId, Salt};
use super::manifest::{Entry, Manifest};
use super::{ConvergentStore, ObjectName, Op, PutInfo, PutOutcome, PutReport, StoreError};

/// Zero bytes written out for zero entries.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Outcome of one block of a put: its entry and the bytes newly stored.
type Sealed = Result<(Entry, Option<u64>), StoreError>;

/// Blocks this put has written, or is writing right now. A block that
/// occurs several times in a put is written (and counted as new) once, by
/// the first worker that gets it; a later occurrence, or another worker
/// meeting it meanwhile, skips the write: the put commits only after every
/// worker finished, and fails if that write failed. A block leaves the set
/// only when its write failed.
///
/// This is the only knowledge of earlier writes a put relies on besides the
/// backend's `put_if_absent`: under the put's write lease no sweep deletes a
/// block, so a write acknowledged in this put still holds. Nothing is
/// remembered from one put to the next (a sweep may run in between).
#[derive(Default)]
struct PutBlocks(Mutex<HashSet<BlockId>>);

impl PutBlocks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<BlockId>> {
        // Inserts and removes cannot leave the set half-updated.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes a block from a put's set unless its write succeeded.
struct WriteGuard<'a> {
    set: &'a PutBlocks,
    id: BlockId,
    written: bool,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if !self.written {
            self.set.lock().remove(&self.id);
        }
    }
}

/// Encrypts a batch of blocks in place (each `buf` holds a plaintext on
/// entry) and stores the new ones with one [`Backend::put_many`], so that a
/// backend with a long round trip has them all in flight at once. Zero
/// blocks are recorded, not stored. A block this put already wrote, or
/// another worker of it is writing right now, is not written again and not
/// counted as new. Returns one result per block, in order.
///
/// [`Backend::put_many`]: super::Backend::put_many
fn seal_and_store(
    store: &ConvergentStore,
    salt: &Salt,
    bufs: &mut [Vec<u8>],
    blocks: &PutBlocks,
) -> Vec<Sealed> {
    let mut entries = Vec::with_capacity(bufs.len());
    let mut writes: Vec<(usize, WriteGuard<'_>)> = Vec::new();
    for (i, buf) in bufs.iter_mut().enumerate() {
        let len = buf.len() as u32;
        if is_zero(buf) {
            entries.push(Entry::Zero { len });
            continue;
        }
        let (key, id) = crypto::seal_block_in_place(salt, buf);
        if blocks.lock().insert(id) {
            let guard = WriteGuard {
                set: blocks,
                id,
                written: false,
            };
            writes.push((i, guard));
        }
        entries.push(Entry::Data { id, key, len });
    }
    let objects: Vec<(ObjectName, &[u8])> = writes
        .iter()
        .map(|(i, guard)| (ObjectName::block(&guard.id), &bufs[*i][..]))
        .collect();
    let mut outcomes = if objects.is_empty() {
        Vec::new()
    } else {
        store.backend.put_many(&objects)
    }
    .into_iter();
    let mut new = vec![None; bufs.len()];
    let mut failed: Vec<Option<StoreError>> = (0..bufs.len()).map(|_| None).collect();
    for (i, mut guard) in writes {
        let object = ObjectName::block(&guard.id);
        let outcome = outcomes.next().unwrap_or_else(|| {
            Err(io::Error::other("the backend's put_many returned too few results").into())
        });
        match outcome {
            Ok(outcome) => {
                guard.written = true;
                new[i] = (outcome == PutOutcome::Stored).then_some(bufs[i].len() as u64);
            }
            Err(source) => {
                failed[i] = Some(StoreError::Backend {
                    op: Op::Put,
                    object,
                    source,
                });
            }
        }
    }
    entries
        .into_iter()
        .zip(new)
        .zip(failed)
        .map(|((entry, new), failed)| match failed {
            Some(e) => Err(e),
            None => Ok((entry, new)),
        })
        .collect()
}

/// Per-put tallies.
#[derive(Default)]
struct Tally {
    len: u64,
    zero_blocks: u64,
    new_blocks: u64,
    new_bytes: u64,
    /// A lower bound of the sealed manifest's size so far: a put whose
    /// manifest cannot fit stops early instead of growing its entry list
    /// (the one part of a put's memory that scales with the input).
    manifest_floor: usize,
}

/// Smallest encoding of a zero and of a data entry in a manifest body.
const ZERO_ENTRY_FLOOR: usize = 5;
const DATA_ENTRY_FLOOR: usize = 41;

impl Tally {
    fn new(metadata_len: usize) -> Self {
        Tally {
            manifest_floor: 44 + 24 + metadata_len + 16,
            ..Tally::default()
        }
    }

    fn add(&mut self, entry: &Entry, new: Option<u64>) {
        if matches!(entry, Entry::Zero { .. }) {
            self.zero_blocks += 1;
            self.manifest_floor += ZERO_ENTRY_FLOOR;
        } else {
            self.manifest_floor += DATA_ENTRY_FLOOR;
        }
        if let Some(bytes) = new {
            self.new_blocks += 1;
            self.new_bytes += bytes;
        }
    }

    fn check_manifest(&self, limit: usize) -> Result<(), StoreError> {
        if self.manifest_floor > limit {
            return Err(StoreError::ManifestTooLarge {
                len: self.manifest_floor,
                limit,
            });
        }
        Ok(())
    }
}

pub(super) fn put(
    store: &ConvergentStore,
    mut input: impl Read,
    metadata: &[u8],
) -> Result<PutReport, StoreError> {
    let cfg = &store.config;
    // Metadata must leave room for the manifest's fixed fields.
    let meta_limit = cfg.max_manifest_len - 1024;
    if metadata.len() > meta_limit {
        return Err(StoreError::MetadataTooLarge {
            len: metadata.len(),
            limit: meta_limit,
        });
    }
    let info = PutInfo::now(metadata);
    let index = cfg.salt_selector.select(&info, cfg.redundancy.count());
    let salt = cfg.redundancy.salt(index);

    let mut lease = WriteLease::acquire(store)?;
    let result = ingest(
        store,
        &mut input,
        &salt,
        &mut lease,
        Tally::new(metadata.len()),
    );
    let outcome =
        result.and_then(|(entries, tally)| commit(store, entries, tally, metadata, &mut lease));
    lease.release();
    outcome
}

/// Seals the manifest and stores it, if the lease still protects the blocks.
fn commit(
    store: &ConvergentStore,
    entries: Vec<Entry>,
    mut tally: Tally,
    metadata: &[u8],
    lease: &mut WriteLease<'_>,
) -> Result<PutReport, StoreError> {
    let cfg = &store.config;
    let manifest = Manifest {
        block_size: cfg.block_size as u32,
        total_len: tally.len,
        metadata: metadata.to_vec(),
        entries,
    };
    let sealed_len = manifest.sealed_len();
    if sealed_len > cfg.max_manifest_len {
        return Err(StoreError::ManifestTooLarge {
            len: sealed_len,
            limit: cfg.max_manifest_len,
        });
    }
    let sealed = manifest.seal(&store.key)?;
    let id = ManifestId::from_bytes(crypto::sha256(&sealed));
    // Renew first, so the lease has at least two thirds of its TTL left
    // while the manifest is written; refuse if it ever lapsed.
    lease.renew_if_due()?;
    lease.check_fresh()?;
    let name = ObjectName::manifest(&id);
    let backend_err = |source| StoreError::Backend {
        op: Op::Put,
        object: name,
        source,
    };
    // The blocks are durable before the manifest that references them is
    // written, and the manifest before the put returns.
    store.backend.flush().map_err(backend_err)?;
    store
        .backend
        .put_if_absent(&name, &sealed)
        .map_err(backend_err)?;
    store.backend.flush().map_err(backend_err)?;
    tally.new_bytes += sealed.len() as u64;
    Ok(PutReport {
        manifest: id,
        len: tally.len,
        blocks: manifest.entries.len() as u64,
        zero_blocks: tally.zero_blocks,
        new_blocks: tally.new_blocks,
        new_bytes: tally.new_bytes,
    })
}

fn ingest(
    store: &ConvergentStore,
    input: &mut dyn Read,
    salt: &Salt,
    lease: &mut WriteLease<'_>,
    tally: Tally,
) -> Result<(Vec<Entry>, Tally), StoreError> {
    if store.config.ingest_threads == 1 {
        ingest_inline(store, input, salt, lease, tally)
    } else {
        ingest_parallel(store, input, salt, lease, tally)
    }
}

fn ingest_inline(
    store: &ConvergentStore,
    input: &mut dyn Read,
    salt: &Salt,
    lease: &mut WriteLease<'_>,
    mut tally: Tally,
) -> Result<(Vec<Entry>, Tally), StoreError> {
    let bs = store.config.block_size;
    let batch = store.config.queue_blocks;
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    let mut entries = Vec::new();
    let blocks = PutBlocks::default();
    let mut eof = false;
    while !eof {
        // Read up to a batch of blocks, then seal and store them together.
        let mut filled = 0;
        while filled < batch && !eof {
            if bufs.len() == filled {
                bufs.push(Vec::with_capacity(bs + TAG_LEN));
            }
            let buf = &mut bufs[filled];
            buf.resize(bs, 0);
            let n = read_full(input, buf).map_err(|source| StoreError::Input {
                offset: tally.len,
                source,
            })?;
            eof = n < bs;
            if n == 0 {
                break;
            }
            tally.len += n as u64;
            buf.truncate(n);
            filled += 1;
        }
        for result in seal_and_store(store, salt, &mut bufs[..filled], &blocks) {
            let (entry, new) = result?;
            tally.add(&entry, new);
            tally.check_manifest(store.config.max_manifest_len)?;
            entries.push(entry);
        }
        lease.renew_if_due()?;
    }
    Ok((entries, tally))
}

struct Job {
    index: usize,
    buf: Vec<u8>,
    len: usize,
}

struct Done {
    index: usize,
    buf: Vec<u8>,
    result: Sealed,
}

fn ingest_parallel(
    store: &ConvergentStore,
    input: &mut dyn Read,
    salt: &Salt,
    lease: &mut WriteLease<'_>,
    mut tally: Tally,
) -> Result<(Vec<Entry>, Tally), StoreError> {
    let cfg = &store.config;
    let bs = cfg.block_size;
    let threads = cfg.ingest_threads;
    let pool_max = threads * (cfg.queue_blocks + 2);
    let (job_tx, job_rx) = mpsc::sync_channel::<Job>(threads * cfg.queue_blocks);
    let job_rx = Mutex::new(job_rx);
    let blocks = PutBlocks::default();
    std::thread::scope(|s| {
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        for _ in 0..threads {
            let done_tx = done_tx.clone();
            let job_rx = &job_rx;
            let blocks = &blocks;
            s.spawn(move || loop {
                // Wait for one job, then take the queued ones too, up to a
                // batch: the backend gets them in one `put_many`.
                let mut jobs = Vec::with_capacity(cfg.queue_blocks);
                if let Ok(rx) = job_rx.lock() {
                    if let Ok(job) = rx.recv() {
                        jobs.push(job);
                        jobs.extend(rx.try_iter().take(cfg.queue_blocks - 1));
                    }
                }
                if jobs.is_empty() {
                    break;
                }
                let (indices, mut bufs): (Vec<usize>, Vec<Vec<u8>>) = jobs
                    .into_iter()
                    .map(|mut job| {
                        job.buf.truncate(job.len);
                        (job.index, job.buf)
                    })
                    .unzip();
                let results = catch_unwind(AssertUnwindSafe(|| {
                    seal_and_store(store, salt, &mut bufs, blocks)
                }))
                .unwrap_or_else(|_| {
                    (0..indices.len())
                        .map(|_| Err(StoreError::WorkerPanicked))
                        .collect()
                });
                for ((index, buf), result) in indices.into_iter().zip(bufs).zip(results) {
                    if done_tx.send(Done { index, buf, result }).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);

        let mut free: Vec<Vec<u8>> = Vec::new();
        let mut allocated = 0;
        let mut in_flight = 0usize;
        let mut entries: Vec<Option<Entry>> = Vec::new();
        let mut error: Option<StoreError> = None;
        let mut eof = false;
        loop {
            while !eof && error.is_none() {
                let mut buf = match free.pop() {
                    Some(b) => b,
                    None if allocated < pool_max => {
                        allocated += 1;
                        Vec::with_capacity(bs + TAG_LEN)
                    }
                    None => break,
                };
                buf.resize(bs, 0);
                let n = match read_full(input, &mut buf) {
                    Ok(n) => n,
                    Err(source) => {
                        error = Some(StoreError::Input {
                            offset: tally.len,
                            source,
                        });
                        break;
                    }
                };
                if n == 0 {
                    eof = true;
                    free.push(buf);
                    break;
                }
                tally.len += n as u64;
                eof = n < bs;
                entries.push(None);
                let job = Job {
                    index: entries.len() - 1,
                    buf,
                    len: n,
                };
                if job_tx.send(job).is_err() {
                    error = Some(StoreError::WorkerPanicked);
                    break;
                }
                in_flight += 1;
                if let Err(e) = lease.renew_if_due() {
                    error = Some(e);
                }
            }
            if in_flight == 0 {
                break;
            }
            let Ok(done) = done_rx.recv() else {
                error.get_or_insert(StoreError::WorkerPanicked);
                break;
            };
            in_flight -= 1;
            free.push(done.buf);
            match done.result {
                Ok((entry, new)) => {
                    tally.add(&entry, new);
                    entries[done.index] = Some(entry);
                    if let Err(e) = tally.check_manifest(cfg.max_manifest_len) {
                        error.get_or_insert(e);
                    }
                }
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        drop(job_tx);
        if let Some(e) = error {
            return Err(e);
        }
        let entries: Option<Vec<Entry>> = entries.into_iter().collect();
        entries
            .map(|e| (e, tally))
            .ok_or(StoreError::WorkerPanicked)
    })
}

/// Fetches, checks and decrypts one block into `buf`.
pub(super) fn fetch_block(
    store: &ConvergentStore,
    id: &BlockId,
    key: &BlockKey,
    len: u32,
) -> Result<Vec<u8>, StoreError> {
    let name = ObjectName::block(id);
    let mut buf = match store.backend.get(&name, u64::from(len) + TAG_LEN as u64) {
        Ok(Some(b)) => b,
        Ok(None) => return Err(StoreError::Missing { block: *id }),
        // Longer than the manifest says: not the block that was stored.
        Err(super::BackendError::TooLarge { .. }) => {
            return Err(StoreError::Corrupt { block: *id })
        }
        Err(source) => {
            return Err(StoreError::Backend {
                op: Op::Get,
                object: name,
                source,
            })
        }
    };
    if crypto::sha256(&buf) != *id.as_bytes()
        || !crypto::open_block(key, &mut buf)
        || buf.len() != len as usize
    {
        return Err(StoreError::Corrupt { block: *id });
    }
    Ok(buf)
}

fn write_entry(out: &mut dyn Write, bytes: &[u8], offset: &mut u64) -> Result<(), StoreError> {
    out.write_all(bytes).map_err(|source| StoreError::Output {
        offset: *offset,
        source,
    })?;
    *offset += bytes.len() as u64;
    Ok(())
}

fn write_zeros(out: &mut dyn Write, mut len: usize, offset: &mut u64) -> Result<(), StoreError> {
    while len > 0 {
        let n = len.min(ZEROS.len());
        write_entry(out, &ZEROS[..n], offset)?;
        len -= n;
    }
    Ok(())
}

pub(super) fn get(
    store: &ConvergentStore,
    manifest: &Manifest,
    mut out: impl Write,
) -> Result<u64, StoreError> {
    let out: &mut dyn Write = &mut out;
    let mut offset = 0u64;
    let threads = store.config.ingest_threads;
    if threads == 1 || manifest.entries.len() < 2 {
        for e in &manifest.entries {
            match e {
                Entry::Zero { len } => write_zeros(out, *len as usize, &mut offset)?,
                Entry::Data { id, key, len } => {
                    write_entry(out, &fetch_block(store, id, key, *len)?, &mut offset)?
                }
            }
        }
    } else {
        get_parallel(store, manifest, out, &mut offset)?;
    }
    out.flush()
        .map_err(|source| StoreError::Output { offset, source })?;
    Ok(offset)
}

fn get_parallel(
    store: &ConvergentStore,
    manifest: &Manifest,
    out: &mut dyn Write,
    offset: &mut u64,
) -> Result<(), StoreError> {
    let threads = store.config.ingest_threads;
    let window = threads * (store.config.queue_blocks + 1);
    let entries = &manifest.entries;
    let (job_tx, job_rx) = mpsc::sync_channel::<usize>(window);
    let job_rx = Mutex::new(job_rx);
    std::thread::scope(|s| {
        let (done_tx, done_rx) = mpsc::channel::<(usize, Result<Vec<u8>, StoreError>)>();
        for _ in 0..threads {
            let done_tx = done_tx.clone();
            let job_rx = &job_rx;
            s.spawn(move || loop {
                let index = match job_rx.lock().map(|rx| rx.recv()) {
                    Ok(Ok(i)) => i,
                    _ => break,
                };
                let result = match &entries[index] {
                    Entry::Data { id, key, len } => {
                        catch_unwind(AssertUnwindSafe(|| fetch_block(store, id, key, *len)))
                            .unwrap_or(Err(StoreError::WorkerPanicked))
                    }
                    Entry::Zero { .. } => Ok(Vec::new()),
                };
                if done_tx.send((index, result)).is_err() {
                    break;
                }
            });
        }
        drop(done_tx);
        let data: Vec<usize> = (0..entries.len())
            .filter(|&i| matches!(entries[i], Entry::Data { .. }))
            .collect();
        let mut next_job = 0;
        let mut ready: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
        let mut in_flight = 0;
        let result = (|| {
            for (index, entry) in entries.iter().enumerate() {
                if let Entry::Zero { len } = entry {
                    write_zeros(out, *len as usize, offset)?;
                    continue;
                }
                loop {
                    while next_job < data.len() && in_flight + ready.len() < window {
                        job_tx
                            .send(data[next_job])
                            .map_err(|_| StoreError::WorkerPanicked)?;
                        next_job += 1;
                        in_flight += 1;
                    }
                    if let Some(bytes) = ready.remove(&index) {
                        write_entry(out, &bytes, offset)?;
                        break;
                    }
                    let (i, r) = done_rx.recv().map_err(|_| StoreError::WorkerPanicked)?;
                    in_flight -= 1;
                    ready.insert(i, r?);
                }
            }
            Ok(())
        })();
        drop(job_tx);
        result
    })
}

/// A [`Read`] and [`Seek`] view of one stored data set, fetching and
/// decrypting one block at a time. Store errors surface as
/// [`io::Error`]s wrapping the [`StoreError`] (recover it with
/// `io::Error::into_inner` and `downcast`).
pub struct ManifestReader<'a> {
    store: &'a ConvergentStore,
    manifest: Manifest,
    pos: u64,
    current: Option<(usize, Vec<u8>)>,
}

impl<'a> ManifestReader<'a> {
    pub(super) fn new(store: &'a ConvergentStore, manifest: Manifest) -> Self {
        Self {
            store,
            manifest,
            pos: 0,
            current: None,
        }
    }

    /// The manifest being read.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Length of the data set.
    pub fn len(&self) -> u64 {
        self.manifest.total_len
    }

    /// Whether the data set is empty.
    pub fn is_empty(&self) -> bool {
        self.manifest.total_len == 0
    }
}

impl Read for ManifestReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.pos >= self.manifest.total_len {
            return Ok(0);
        }
        let bs = u64::from(self.manifest.block_size);
        let index = (self.pos / bs) as usize;
        let within = (self.pos % bs) as usize;
        let entry = &self.manifest.entries[index];
        let n = (entry.len() as usize - within).min(buf.len());
        match entry {
            Entry::Zero { .. } => buf[..n].fill(0),
            Entry::Data { id, key, len } => {
                if self.current.as_ref().map(|c| c.0) != Some(index) {
                    let bytes = fetch_block(self.store, id, key, *len).map_err(io::Error::other)?;
                    self.current = Some((index, bytes));
                }
                let block = self.current.as_ref().map_or(&[][..], |c| &c.1[..]);
                buf[..n].copy_from_slice(&block[within..within + n]);
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for ManifestReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.manifest.total_len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let target = target.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the data set",
            )
        })?;
        self.pos = target;
        Ok(target)
    }
}
