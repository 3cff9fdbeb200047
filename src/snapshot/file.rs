//! The snapshot file format (see `docs/snapshot-format.md`): a fixed header,
//! a checksummed state section, and the memory image stored page-aligned and
//! sparse (zero pages are holes) so it can be mapped directly.
//!
//! Loading treats the file as untrusted: every length is checked against the
//! file size and the section it lives in before anything is allocated, and
//! every malformation is a [`SnapshotError`].

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use sha2::{Digest, Sha256};
use zerocopy::{FromBytes, IntoBytes};

use super::image::{Extent, FileIdentity, MemoryImage, BLOCK_SIZE};
use super::{GuestState, Inner, Snapshot, SnapshotError, SnapshotId};
use crate::abi::{MAX_FUNCTIONS, MAX_FUNCTION_NAME, PAGE_SIZE};
use crate::net::{ConnKey, ConnState, Connection, Direction, Endpoint};
use crate::sys::fs::{open_untrusted, UntrustedError};
use crate::vm::cpu::CpuState;
use crate::vm::TableId;
use crate::vm::{Generation, MAX_MEMORY_SIZE};

/// `"SNAPVMSN"`.
pub(crate) const MAGIC: [u8; 8] = *b"SNAPVMSN";
/// The format version this build writes and reads.
pub(crate) const FORMAT_VERSION: u32 = 1;
/// Size of the fixed header.
pub(crate) const HEADER_SIZE: u64 = 128;
/// Largest state section accepted.
const MAX_STATE: u64 = 16 << 20;
/// Header flag: the snapshot is a diff.
const FLAG_DIFF: u32 = 1;
/// Extent flag (top bit of the page count): a run of zero pages.
const EXTENT_ZERO: u64 = 1 << 63;
/// Tag of the optional section of tracked TCP connections at the end of the
/// state section (`"NET1"`).
const NET_SECTION: u32 = u32::from_le_bytes(*b"NET1");
/// Bytes of one saved connection record.
const CONNECTION_RECORD: u64 = 12 + 4 + 12 + 2 * 16;
/// Most connections a snapshot file may carry.
pub(crate) const MAX_SAVED_CONNECTIONS: u64 = 1 << 16;

const _: () = assert!(HEADER_SIZE <= PAGE_SIZE);

/// The fixed header, little endian:
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `SNAPVMSN` |
/// | 8 | 4 | format version |
/// | 12 | 4 | flags (bit 0: diff) |
/// | 16 | 8 | state offset |
/// | 24 | 8 | state length |
/// | 32 | 8 | memory offset (page aligned) |
/// | 40 | 8 | memory size |
/// | 48 | 32 | SHA-256 of the state section |
/// | 80 | 32 | SHA-256 of bytes 0..80 |
/// | 112 | 16 | zero |
struct Header {
    flags: u32,
    state_offset: u64,
    state_len: u64,
    memory_offset: u64,
    memory_size: u64,
    state_digest: [u8; 32],
}

impl Header {
    fn encode(&self) -> [u8; HEADER_SIZE as usize] {
        let mut b = [0u8; HEADER_SIZE as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.state_offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.state_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.memory_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.memory_size.to_le_bytes());
        b[48..80].copy_from_slice(&self.state_digest);
        let digest: [u8; 32] = Sha256::digest(&b[..80]).into();
        b[80..112].copy_from_slice(&digest);
        b
    }

    fn decode(b: &[u8; HEADER_SIZE as usize], file_len: u64) -> Result<Self, SnapshotError> {
        if b[0..8] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let mut r = Reader::new(&b[8..80], "header");
        let version = r.u32()?;
        if version != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let digest: [u8; 32] = Sha256::digest(&b[..80]).into();
        if b[80..112] != digest {
            return Err(SnapshotError::ChecksumMismatch { section: "header" });
        }
        if b[112..] != [0; 16] {
            return Err(SnapshotError::Malformed {
                section: "header",
                reason: "reserved bytes are not zero",
            });
        }
        let h = Header {
            flags: r.u32()?,
            state_offset: r.u64()?,
            state_len: r.u64()?,
            memory_offset: r.u64()?,
            memory_size: r.u64()?,
            state_digest: r.array()?,
        };
        let malformed = |reason| SnapshotError::Malformed {
            section: "header",
            reason,
        };
        if h.flags & !FLAG_DIFF != 0 {
            return Err(malformed("unknown flags"));
        }
        if h.state_offset != HEADER_SIZE || h.state_len > MAX_STATE {
            return Err(malformed("state section out of place or too large"));
        }
        if h.memory_size == 0 || h.memory_size % BLOCK_SIZE != 0 {
            return Err(malformed("memory size is not a positive multiple of 2 MiB"));
        }
        if h.memory_size > MAX_MEMORY_SIZE {
            return Err(SnapshotError::MemoryTooLarge {
                snapshot: h.memory_size,
                limit: MAX_MEMORY_SIZE,
            });
        }
        let state_end = h.state_offset + h.state_len;
        if h.memory_offset % PAGE_SIZE != 0 || h.memory_offset < state_end {
            return Err(malformed("memory image not page aligned after the state"));
        }
        let needed = h
            .memory_offset
            .checked_add(h.memory_size)
            .ok_or(malformed("memory image end overflows"))?;
        if needed > file_len {
            return Err(SnapshotError::Truncated {
                section: "memory image",
                needed,
                available: file_len,
            });
        }
        Ok(h)
    }
}

/// A bounds-checked little-endian reader over a section.
struct Reader<'a> {
    bytes: &'a [u8],
    section: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], section: &'static str) -> Self {
        Self { bytes, section }
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], SnapshotError> {
        let available = self.bytes.len() as u64;
        if n > available {
            return Err(SnapshotError::Truncated {
                section: self.section,
                needed: n,
                available,
            });
        }
        let (head, rest) = self.bytes.split_at(n as usize);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        Ok(self.take(N as u64)?.try_into().expect("exact length"))
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of items of at least `min_size` bytes each, checked against
    /// what is left so a lying count cannot cause a large allocation.
    fn count(&mut self, min_size: u64, limit: u64) -> Result<usize, SnapshotError> {
        let n = self.u64()?;
        let fits = n
            .checked_mul(min_size)
            .is_some_and(|total| total <= self.bytes.len() as u64);
        if n > limit || !fits {
            return Err(SnapshotError::Malformed {
                section: self.section,
                reason: "item count exceeds the section",
            });
        }
        Ok(n as usize)
    }

    /// A kernel structure stored as a length-prefixed copy of its bytes.
    fn kvm<T: FromBytes>(&mut self) -> Result<T, SnapshotError> {
        let len = self.u64()?;
        if len != std::mem::size_of::<T>() as u64 {
            return Err(SnapshotError::Malformed {
                section: self.section,
                reason: "CPU structure has the wrong size",
            });
        }
        let bytes = self.take(len)?;
        T::read_from_bytes(bytes).map_err(|_| SnapshotError::Malformed {
            section: self.section,
            reason: "CPU structure",
        })
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn finish(self) -> Result<(), SnapshotError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError::Malformed {
                section: self.section,
                reason: "trailing bytes",
            })
        }
    }
}

fn put_kvm<T: IntoBytes + zerocopy::Immutable>(out: &mut Vec<u8>, value: &T) {
    let bytes = value.as_bytes();
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Encodes the state section.
fn encode_state(s: &Inner) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&s.id.0);
    out.extend_from_slice(&s.base.as_ref().map_or([0; 16], |b| b.id().0));
    out.extend_from_slice(&s.program_digest);
    put_u64(&mut out, s.generation.0);
    let g = &s.guest;
    for v in [g.input_buf, g.input_cap, g.heap_used, g.invocations] {
        put_u64(&mut out, v);
    }
    put_u64(&mut out, u64::from(g.resets_cpu));
    put_u64(&mut out, g.preserved.len() as u64);
    for &(addr, len) in &g.preserved {
        put_u64(&mut out, addr);
        put_u64(&mut out, len);
    }
    put_u64(&mut out, g.functions.len() as u64);
    for (name, index) in &g.functions {
        put_u64(&mut out, *index);
        put_u64(&mut out, name.len() as u64);
        out.extend_from_slice(name.as_bytes());
    }
    let c = &s.cpu;
    put_kvm(&mut out, &c.regs);
    put_kvm(&mut out, &c.sregs);
    put_kvm(&mut out, &c.xsave);
    put_kvm(&mut out, &c.xcrs);
    put_kvm(&mut out, &c.debugregs);
    put_kvm(&mut out, &c.events);
    put_u64(&mut out, c.msrs.len() as u64);
    c.msrs.iter().for_each(|m| put_kvm(&mut out, m));
    put_u64(&mut out, c.cpuid.len() as u64);
    c.cpuid.iter().for_each(|e| put_kvm(&mut out, e));
    let m = &s.memory;
    put_u64(&mut out, m.extents.len() as u64);
    for e in &m.extents {
        put_u64(&mut out, e.first_page);
        put_u64(&mut out, e.pages | if e.zero { EXTENT_ZERO } else { 0 });
    }
    put_u64(&mut out, m.block_crc.len() as u64);
    for crc in &m.block_crc {
        out.extend_from_slice(&crc.to_le_bytes());
    }
    // Written only when there is something to carry: a snapshot without
    // open connections stays readable by builds that predate the section.
    if !s.connections.is_empty() {
        encode_connections(&mut out, &s.connections);
    }
    out
}

/// Appends the optional section of tracked connections: its tag, a count,
/// then one fixed-size record per connection, in key order.
fn encode_connections(out: &mut Vec<u8>, connections: &[Connection]) {
    let mut sorted: Vec<&Connection> = connections.iter().collect();
    sorted.sort_by_key(|c| c.key);
    out.extend_from_slice(&NET_SECTION.to_le_bytes());
    put_u64(out, sorted.len() as u64);
    for c in sorted {
        for addr in [c.key.guest, c.key.peer] {
            out.extend_from_slice(&addr.ip().octets());
            out.extend_from_slice(&addr.port().to_le_bytes());
        }
        out.push(match c.state {
            ConnState::SynSent => 0,
            ConnState::SynReceived => 1,
            ConnState::Established => 2,
            ConnState::Closing => 3,
        });
        out.push(match c.opened_by {
            Direction::FromGuest => 0,
            Direction::ToGuest => 1,
        });
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&c.guest_mac);
        out.extend_from_slice(&c.peer_mac);
        for e in [&c.guest, &c.peer] {
            let flags = u8::from(e.syn_seen)
                | u8::from(e.fin_sent) << 1
                | u8::from(e.ack.is_some()) << 2
                | u8::from(e.window_scale.is_some()) << 3;
            out.push(flags);
            out.push(e.window_scale.unwrap_or(0));
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&e.next_seq.to_le_bytes());
            out.extend_from_slice(&e.ack.unwrap_or(0).to_le_bytes());
            out.extend_from_slice(&e.window.to_le_bytes());
        }
    }
}

/// The header and state section of `snapshot` as one buffer, and the
/// (page-aligned) offset of the memory image that follows them in a file.
pub(crate) fn encode_header_and_state(snapshot: &Snapshot) -> (Vec<u8>, u64) {
    let s = &snapshot.inner;
    let state = encode_state(s);
    let memory_offset = (HEADER_SIZE + state.len() as u64).next_multiple_of(PAGE_SIZE);
    let header = Header {
        flags: if s.base.is_some() { FLAG_DIFF } else { 0 },
        state_offset: HEADER_SIZE,
        state_len: state.len() as u64,
        memory_offset,
        memory_size: s.memory.size(),
        state_digest: Sha256::digest(&state).into(),
    };
    let mut out = header.encode().to_vec();
    out.extend_from_slice(&state);
    (out, memory_offset)
}

/// Largest header plus state section a loader accepts.
pub(crate) const MAX_HEADER_AND_STATE: u64 = HEADER_SIZE + MAX_STATE;

/// Reads a snapshot laid out as a file in `file` (see `load`).
pub(crate) fn load_file(
    file: File,
    path: &Path,
    base: Option<&Snapshot>,
) -> Result<Snapshot, SnapshotError> {
    load_from(file, path, base)
}

/// Creates a new temporary file beside `path`, named
/// `<path>.<pid>-<counter>-<random>.tmp`, with `O_EXCL`: no other save (in
/// this process or another) can be writing the same file.
fn create_temp(path: &Path) -> std::io::Result<(File, PathBuf)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut attempts = 0;
    loop {
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let random = getrandom::u64().unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{}-{count}-{random:016x}.tmp", std::process::id()));
        let tmp = PathBuf::from(name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(file) => return Ok((file, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempts < 16 => {
                attempts += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Writes `snapshot` to `path`, replacing it atomically: a new temporary
/// file in the same directory (see [`create_temp`]), synced, then renamed
/// over `path`. Concurrent saves to one path each write their own file; the
/// last rename wins, and `path` always holds one complete snapshot.
pub(crate) fn save(snapshot: &Snapshot, path: &Path) -> Result<(), SnapshotError> {
    let s = &snapshot.inner;
    let (head, memory_offset) = encode_header_and_state(snapshot);
    let io = |step| SnapshotError::io(step, Some(path));
    let (mut file, tmp) = create_temp(path).map_err(io("creating the snapshot file"))?;
    s.memory.ensure_all()?;
    let result = (|| {
        file.write_all(&head)
            .map_err(io("writing the header and state"))?;
        file.set_len(memory_offset + s.memory.size())
            .map_err(io("sizing the snapshot file"))?;
        for e in s.memory.extents.iter().filter(|e| !e.zero) {
            file.write_all_at(s.memory.data(e), memory_offset + e.addr())
                .map_err(io("writing memory"))?;
        }
        file.sync_all().map_err(io("syncing the snapshot file"))?;
        std::fs::rename(&tmp, path).map_err(io("renaming the snapshot file"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads a snapshot file. `base` must be given for a diff snapshot.
pub(crate) fn load(path: &Path, base: Option<&Snapshot>) -> Result<Snapshot, SnapshotError> {
    // The one way files from shared directories are opened: no link
    // followed, no wait on a FIFO (it is then rejected as not a regular
    // file), a regular file by fstat. The format accepts files longer than
    // the memory image (the bytes past it are ignored), so the length is
    // not capped here: every read below is bounded by the header's fields,
    // which are checked against MAX_STATE, MAX_MEMORY_SIZE and the length.
    let file = open_untrusted(path, u64::MAX)
        .map_err(|e| match e {
            UntrustedError::Symlink => SnapshotError::Symlink {
                path: path.to_path_buf(),
            },
            UntrustedError::Open(e) => {
                SnapshotError::io("opening the snapshot file", Some(path))(e)
            }
            UntrustedError::Stat(e) | UntrustedError::Read(e) => {
                SnapshotError::io("stat", Some(path))(e)
            }
            UntrustedError::NotAFile => SnapshotError::Malformed {
                section: "file",
                reason: "not a regular file",
            },
            UntrustedError::TooLarge { .. } => SnapshotError::Malformed {
                section: "file",
                reason: "larger than the format allows",
            },
        })?
        .file;
    load_from(file, path, base)
}

/// Loads a snapshot from `bytes` held in an anonymous in-memory file, through
/// the same path as [`Snapshot::load`]. The entry point of the fuzz target
/// (`snapvm::fuzzing::snapshot_file`).
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_load(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    let path = Path::new("<fuzz input>");
    let mut file = super::image::memfd(0)?;
    file.write_all(bytes)
        .map_err(SnapshotError::io("writing the fuzz input", Some(path)))?;
    load_from(file, path, None)
}

/// Reads a snapshot from an open `file`; `path` names it in errors and in
/// the identity checked before each restore.
fn load_from(file: File, path: &Path, base: Option<&Snapshot>) -> Result<Snapshot, SnapshotError> {
    let meta = file
        .metadata()
        .map_err(SnapshotError::io("stat", Some(path)))?;
    if !meta.is_file() {
        return Err(SnapshotError::Malformed {
            section: "file",
            reason: "not a regular file",
        });
    }
    let file_len = meta.len();
    let mut header = [0u8; HEADER_SIZE as usize];
    if file_len < HEADER_SIZE {
        return Err(SnapshotError::Truncated {
            section: "header",
            needed: HEADER_SIZE,
            available: file_len,
        });
    }
    file.read_exact_at(&mut header, 0)
        .map_err(SnapshotError::io("reading the header", Some(path)))?;
    let h = Header::decode(&header, file_len)?;
    // The state length is bounded by MAX_STATE and by the file (checked in
    // `decode`), so this allocation is bounded.
    let mut state = vec![0u8; h.state_len as usize];
    file.read_exact_at(&mut state, h.state_offset)
        .map_err(SnapshotError::io("reading the state", Some(path)))?;
    let digest: [u8; 32] = Sha256::digest(&state).into();
    if digest != h.state_digest {
        return Err(SnapshotError::ChecksumMismatch { section: "state" });
    }
    let source = FileIdentity::of(&file, path.to_path_buf())
        .map_err(SnapshotError::io("stat", Some(path)))?;
    let offset = h.memory_offset;
    decode_state(&state, &h, base, |size, extents, block_crc| {
        MemoryImage::from_file(file, offset, size, extents, block_crc, source)
    })
}

/// Reads the header and state of a full snapshot from `head` (the tail of
/// its data set in a store) for an on-demand image of `size` bytes held in
/// `cache` and filled by `memory`.
pub(crate) fn load_on_demand(
    head: &[u8],
    cache: File,
    size: u64,
    memory: Arc<super::ondemand::StoreMemory>,
) -> Result<Snapshot, SnapshotError> {
    let header: &[u8; HEADER_SIZE as usize] = head
        .get(..HEADER_SIZE as usize)
        .and_then(|h| h.try_into().ok())
        .ok_or(SnapshotError::Truncated {
            section: "header",
            needed: HEADER_SIZE,
            available: head.len() as u64,
        })?;
    // The memory image is not in `head`: any length passes the header's
    // own check, the sizes are checked here.
    let h = Header::decode(header, u64::MAX)?;
    let malformed = |reason| SnapshotError::Malformed {
        section: "store data set",
        reason,
    };
    if h.memory_size != size {
        return Err(malformed("memory size differs from the manifest's"));
    }
    if h.flags & FLAG_DIFF != 0 {
        return Err(malformed("a diff snapshot cannot be opened on demand"));
    }
    let state = usize::try_from(h.state_offset + h.state_len)
        .ok()
        .and_then(|end| head.get(h.state_offset as usize..end))
        .ok_or(SnapshotError::Truncated {
            section: "state",
            needed: h.state_offset + h.state_len,
            available: head.len() as u64,
        })?;
    let digest: [u8; 32] = Sha256::digest(state).into();
    if digest != h.state_digest {
        return Err(SnapshotError::ChecksumMismatch { section: "state" });
    }
    decode_state(state, &h, None, |size, extents, block_crc| {
        MemoryImage::new_on_demand(cache, size, extents, block_crc, memory)
    })
}

fn decode_state(
    state: &[u8],
    h: &Header,
    base: Option<&Snapshot>,
    image: impl FnOnce(u64, Vec<Extent>, Vec<u32>) -> Result<MemoryImage, SnapshotError>,
) -> Result<Snapshot, SnapshotError> {
    let mut r = Reader::new(state, "state");
    let malformed = |reason| SnapshotError::Malformed {
        section: "state",
        reason,
    };
    let id = SnapshotId(r.array()?);
    let base_id = SnapshotId(r.array()?);
    let is_diff = h.flags & FLAG_DIFF != 0;
    let base = match (is_diff, base) {
        (false, _) if base_id.0 != [0; 16] => {
            return Err(malformed("a full snapshot names a base"))
        }
        (false, _) => None,
        (true, None) => return Err(SnapshotError::BaseRequired { base: base_id }),
        (true, Some(b)) if b.id() != base_id => {
            return Err(SnapshotError::WrongBase {
                expected: base_id,
                found: b.id(),
            })
        }
        (true, Some(b)) if b.memory_size() != h.memory_size => {
            return Err(malformed("diff and base memory sizes differ"))
        }
        (true, Some(b)) => Some(b.clone()),
    };
    let program_digest = r.array()?;
    let generation = Generation(r.u64()?);
    let (input_buf, input_cap, heap_used, invocations) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
    let resets_cpu = match r.u64()? {
        0 => false,
        1 => true,
        _ => return Err(malformed("guest flags")),
    };
    let regions = r.count(16, crate::vm::MAX_PRESERVED_REGIONS as u64)?;
    let mut preserved = Vec::with_capacity(regions);
    for _ in 0..regions {
        let (addr, len) = (r.u64()?, r.u64()?);
        if addr.checked_add(len).is_none_or(|end| end > h.memory_size) {
            return Err(malformed("preserved region outside memory"));
        }
        preserved.push((addr, len));
    }
    let pages = h.memory_size / PAGE_SIZE;
    if input_buf
        .checked_add(input_cap)
        .is_none_or(|end| end > h.memory_size)
    {
        return Err(malformed("input buffer outside memory"));
    }
    let count = r.count(16, MAX_FUNCTIONS)?;
    let mut functions = Vec::with_capacity(count);
    for _ in 0..count {
        let index = r.u64()?;
        let len = r.u64()?;
        if len == 0 || len > MAX_FUNCTION_NAME {
            return Err(malformed("function name length"));
        }
        let name = std::str::from_utf8(r.take(len)?)
            .map_err(|_| malformed("function name is not UTF-8"))?;
        if index != functions.len() as u64 {
            return Err(malformed("function indices out of order"));
        }
        functions.push((name.to_string(), index));
    }
    let cpu = CpuState {
        regs: r.kvm::<kvm_regs>()?,
        sregs: r.kvm::<kvm_sregs>()?,
        xsave: r.kvm::<kvm_xsave>()?,
        xcrs: r.kvm::<kvm_xcrs>()?,
        debugregs: r.kvm::<kvm_debugregs>()?,
        events: r.kvm::<kvm_vcpu_events>()?,
        msrs: {
            let n = r.count(8 + std::mem::size_of::<kvm_msr_entry>() as u64, 256)?;
            (0..n)
                .map(|_| r.kvm::<kvm_msr_entry>())
                .collect::<Result<_, _>>()?
        },
        cpuid: {
            let n = r.count(8 + std::mem::size_of::<kvm_cpuid_entry2>() as u64, 256)?;
            (0..n)
                .map(|_| r.kvm::<kvm_cpuid_entry2>())
                .collect::<Result<_, _>>()?
        },
        compatible: Default::default(),
    }
    // Files may hold the APIC id of the CPU they were taken on.
    .normalized();
    let n = r.count(16, pages)?;
    let mut extents = Vec::with_capacity(n);
    let mut next_free = 0u64;
    for _ in 0..n {
        let first_page = r.u64()?;
        let raw = r.u64()?;
        let (zero, count) = (raw & EXTENT_ZERO != 0, raw & !EXTENT_ZERO);
        let end = first_page
            .checked_add(count)
            .ok_or(malformed("extent end overflows"))?;
        if count == 0 || first_page < next_free || end > pages {
            return Err(malformed(
                "extents must be non-empty, sorted, disjoint and inside memory",
            ));
        }
        if zero && !is_diff {
            return Err(malformed("a full snapshot lists zero pages"));
        }
        next_free = end;
        extents.push(Extent {
            first_page,
            pages: count,
            zero,
        });
    }
    let blocks = r.count(4, h.memory_size / BLOCK_SIZE)?;
    if blocks as u64 != h.memory_size / BLOCK_SIZE {
        return Err(malformed("one checksum per 2 MiB block expected"));
    }
    let block_crc = (0..blocks)
        .map(|_| r.u32())
        .collect::<Result<Vec<_>, _>>()?;
    // Files without open connections end here (and all files written
    // before the section existed).
    let connections = if r.is_empty() {
        Vec::new()
    } else {
        decode_connections(&mut r)?
    };
    r.finish()?;
    let memory = image(h.memory_size, extents, block_crc)?;
    Ok(Snapshot {
        inner: Arc::new(Inner {
            id,
            base,
            program_digest,
            generation,
            cpu,
            guest: GuestState {
                functions,
                // A table read from a file is not known to be any other.
                function_table: TableId::fresh(),
                input_buf,
                input_cap,
                heap_used,
                invocations,
                preserved,
                resets_cpu,
            },
            memory,
            connections,
        }),
    })
}

/// Reads the optional section of tracked connections (see
/// [`encode_connections`]): a known tag, a count bounded by
/// [`MAX_SAVED_CONNECTIONS`] and by the bytes left, valid fields, and keys
/// strictly increasing (so no duplicates).
fn decode_connections(r: &mut Reader<'_>) -> Result<Vec<Connection>, SnapshotError> {
    let malformed = |reason| SnapshotError::Malformed {
        section: "connections",
        reason,
    };
    if r.u32()? != NET_SECTION {
        return Err(SnapshotError::Malformed {
            section: "state",
            reason: "trailing bytes",
        });
    }
    r.section = "connections";
    let n = r.count(CONNECTION_RECORD, MAX_SAVED_CONNECTIONS)?;
    if n == 0 {
        return Err(malformed("an empty section is not written"));
    }
    let mut connections: Vec<Connection> = Vec::with_capacity(n);
    for _ in 0..n {
        let mut addr = || -> Result<SocketAddrV4, SnapshotError> {
            let ip = Ipv4Addr::from(r.array::<4>()?);
            Ok(SocketAddrV4::new(ip, r.u16()?))
        };
        let key = ConnKey {
            guest: addr()?,
            peer: addr()?,
        };
        let state = match r.u8()? {
            0 => ConnState::SynSent,
            1 => ConnState::SynReceived,
            2 => ConnState::Established,
            3 => ConnState::Closing,
            _ => return Err(malformed("connection state")),
        };
        let opened_by = match r.u8()? {
            0 => Direction::FromGuest,
            1 => Direction::ToGuest,
            _ => return Err(malformed("connection direction")),
        };
        if r.array::<2>()? != [0; 2] {
            return Err(malformed("reserved bytes are not zero"));
        }
        let guest_mac = r.array()?;
        let peer_mac = r.array()?;
        let mut endpoint = || -> Result<Endpoint, SnapshotError> {
            let flags = r.u8()?;
            let scale = r.u8()?;
            if flags & !0b1111 != 0 || r.array::<2>()? != [0; 2] {
                return Err(malformed("endpoint flags"));
            }
            // RFC 7323: a shift count above 14 is not sent.
            if scale > 14 || (flags & 8 == 0 && scale != 0) {
                return Err(malformed("window scale"));
            }
            let next_seq = r.u32()?;
            let ack = r.u32()?;
            if flags & 4 == 0 && ack != 0 {
                return Err(malformed("acknowledgement number without its flag"));
            }
            Ok(Endpoint {
                syn_seen: flags & 1 != 0,
                fin_sent: flags & 2 != 0,
                next_seq,
                ack: (flags & 4 != 0).then_some(ack),
                window: r.u32()?,
                window_scale: (flags & 8 != 0).then_some(scale),
            })
        };
        let guest = endpoint()?;
        let peer = endpoint()?;
        if connections.last().is_some_and(|last| last.key >= key) {
            return Err(malformed(
                "connections not in strictly increasing key order",
            ));
        }
        connections.push(Connection {
            key,
            state,
            opened_by,
            guest,
            peer,
            guest_mac,
            peer_mac,
        });
    }
    Ok(connections)
}

impl Snapshot {
    /// Writes the snapshot to `path` (atomically replacing any file there).
    /// A diff is written alone; save its base separately.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), SnapshotError> {
        save(self, path.as_ref())
    }

    /// Loads a full snapshot file. The header and state are verified now;
    /// each 2 MiB block of memory is verified the first time a restore uses
    /// it. The file must not change while the snapshot is loaded (checked
    /// before each restore) and must not be a symbolic link.
    pub fn load(path: impl AsRef<Path>) -> Result<Snapshot, SnapshotError> {
        load(path.as_ref(), None)
    }

    /// Loads a diff snapshot file taken against `base`.
    pub fn load_diff(path: impl AsRef<Path>, base: &Snapshot) -> Result<Snapshot, SnapshotError> {
        load(path.as_ref(), Some(base))
    }
}
