//! Snapshot files as untrusted input: real snapshots of the test guest,
//! truncated, bit-flipped, re-encoded with lying lengths and counts, swapped
//! for symlinks, directories and devices, or changed after loading. Every
//! case must give a typed [`SnapshotError`], never a panic.
//!
//! The byte-level cases double as the seed corpus of the `snapshot_file`
//! fuzz target: each also goes through its entry point,
//! `snapvm::fuzzing::snapshot_file::load`, which must agree with
//! `Snapshot::load`, and with `SNAPVM_FUZZ_CORPUS=<dir>` set they are
//! written to `<dir>` as seeds (see `fuzz/fuzz_targets/`).
//!
//! The helpers below follow `docs/snapshot-format.md`, independently of the
//! crate's own encoder.

mod common;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use snapvm::snapshot::RestoreStrategy;
use snapvm::{Snapshot, SnapshotError, VmConfig, VmInstance};

const PAGE: usize = 4096;
const HEADER: usize = 128;
const BLOCK_PAGES: u64 = 512;
/// Bytes of `struct kvm_cpuid_entry2`.
const CPUID_ENTRY: usize = 40;
/// Bytes of `struct kvm_msr_entry`.
const MSR_ENTRY: usize = 16;

/// Guest memory of the fixtures: small, so that each corrupt copy is cheap
/// to write, yet several 2 MiB blocks.
const MEMORY: u64 = 16 << 20;

fn config() -> VmConfig {
    common::config("testguest").memory_size(MEMORY)
}

fn dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("snapvm-file-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------
// The layout, read and patched independently of the crate.

fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn state_len(b: &[u8]) -> usize {
    get_u64(b, 24) as usize
}

fn memory_offset(b: &[u8]) -> usize {
    get_u64(b, 32) as usize
}

/// Recomputes the header digest (bytes 80..112 = SHA-256 of bytes 0..80).
fn fix_header_digest(b: &mut [u8]) {
    let digest = Sha256::digest(&b[..80]);
    b[80..112].copy_from_slice(&digest);
}

/// Recomputes the state digest (bytes 48..80) over the `state_len` bytes at
/// offset 128 (as far as they exist), then the header digest.
fn fix_digests(b: &mut [u8]) {
    let end = HEADER.saturating_add(state_len(b)).min(b.len());
    let digest = Sha256::digest(&b[HEADER..end]);
    b[48..80].copy_from_slice(&digest);
    fix_header_digest(b);
}

/// Where the fields of a state section are (absolute file offsets).
#[derive(Debug)]
struct StateMap {
    preserved: usize,
    functions: usize,
    first_name: (usize, usize),
    /// Offset of each length-prefixed CPU structure's length.
    cpu_structs: Vec<usize>,
    msr_count: usize,
    cpuid_count: usize,
    /// Offset of each `kvm_cpuid_entry2` (after its length).
    cpuid: Vec<usize>,
    extent_count: usize,
    /// (offset, first page, raw page count) of each extent.
    extents: Vec<(usize, u64, u64)>,
    crc_count: usize,
    end: usize,
}

fn map_state(b: &[u8]) -> StateMap {
    let mut at = HEADER + 16 + 16 + 32 + 8 + 4 * 8;
    at += 8; // guest flags
    let preserved = at;
    at += 8 + 16 * get_u64(b, at) as usize;
    let functions = at;
    let n = get_u64(b, at);
    at += 8;
    let mut first_name = (0, 0);
    for i in 0..n {
        let len = get_u64(b, at + 8) as usize;
        if i == 0 {
            first_name = (at + 16, len);
        }
        at += 16 + len;
    }
    let mut cpu_structs = Vec::new();
    for _ in 0..6 {
        cpu_structs.push(at);
        at += 8 + get_u64(b, at) as usize;
    }
    let msr_count = at;
    let n = get_u64(b, at);
    at += 8;
    for _ in 0..n {
        assert_eq!(get_u64(b, at), MSR_ENTRY as u64);
        at += 8 + MSR_ENTRY;
    }
    let cpuid_count = at;
    let n = get_u64(b, at);
    at += 8;
    let mut cpuid = Vec::new();
    for _ in 0..n {
        assert_eq!(get_u64(b, at), CPUID_ENTRY as u64);
        cpuid.push(at + 8);
        at += 8 + CPUID_ENTRY;
    }
    let extent_count = at;
    let n = get_u64(b, at);
    at += 8;
    let mut extents = Vec::new();
    for _ in 0..n {
        extents.push((at, get_u64(b, at), get_u64(b, at + 8)));
        at += 16;
    }
    let crc_count = at;
    at += 8 + 4 * get_u64(b, at) as usize;
    assert_eq!(
        at,
        HEADER + state_len(b),
        "the state map covers the section"
    );
    StateMap {
        preserved,
        functions,
        first_name,
        cpu_structs,
        msr_count,
        cpuid_count,
        cpuid,
        extent_count,
        extents,
        crc_count,
        end: at,
    }
}

/// Replaces `range` of the state section with `with`, fixing the state
/// length and both digests (the state must still fit before the memory).
fn splice_state(b: &[u8], range: std::ops::Range<usize>, with: &[u8]) -> Vec<u8> {
    let mut out = b.to_vec();
    let old_end = HEADER + state_len(b);
    let mut state = b[HEADER..range.start].to_vec();
    state.extend_from_slice(with);
    state.extend_from_slice(&b[range.end..old_end]);
    assert!(HEADER + state.len() <= memory_offset(b));
    out[HEADER..memory_offset(b)].fill(0);
    out[HEADER..HEADER + state.len()].copy_from_slice(&state);
    put_u64(&mut out, 24, state.len() as u64);
    fix_digests(&mut out);
    out
}

// ---------------------------------------------------------------------------
// Fixtures: real snapshot files of the test guest, read into memory.

struct Fixture {
    /// A full snapshot (also the base of `diff`).
    full: Vec<u8>,
    full_path: PathBuf,
    /// A diff against `full`.
    diff: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let config = config().dirty_tracking(true);
        let mut vm = VmInstance::new(&config).unwrap();
        vm.invoke("counter", b"").unwrap();
        let base = vm.snapshot().unwrap();
        vm.invoke("write_pages", &[4, 0x42]).unwrap();
        vm.invoke("counter", b"").unwrap();
        let diff = vm.snapshot_diff(&base).unwrap();
        let (full_path, diff_path) = (dir().join("full.snap"), dir().join("diff.snap"));
        base.save(&full_path).unwrap();
        diff.save(&diff_path).unwrap();
        Fixture {
            full: std::fs::read(&full_path).unwrap(),
            full_path,
            diff: std::fs::read(&diff_path).unwrap(),
        }
    })
}

/// Writes `bytes` to `name`, leaving all-zero pages as holes.
fn write_sparse(name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir().join(name);
    let file = File::create(&path).unwrap();
    for (i, page) in bytes.chunks(PAGE).enumerate() {
        if page.iter().any(|&b| b != 0) {
            file.write_all_at(page, (i * PAGE) as u64).unwrap();
        }
    }
    file.set_len(bytes.len() as u64).unwrap();
    path
}

/// With `SNAPVM_FUZZ_CORPUS=<dir>`, saves a case as a seed of the
/// `snapshot_file` fuzz target: mode byte 2 (pad the memory image with
/// zeros) and the bytes before the memory image (at most 64 KiB).
fn save_seed(name: &str, bytes: &[u8]) {
    let Some(dir) = std::env::var_os("SNAPVM_FUZZ_CORPUS") else {
        return;
    };
    let end = if bytes.len() >= HEADER {
        memory_offset(bytes).min(bytes.len()).min(64 << 10)
    } else {
        bytes.len()
    };
    let seed = [&[2u8][..], &bytes[..end]].concat();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(Path::new(&dir).join(name), seed).unwrap();
}

/// Loads `bytes` both from a file and through the fuzz entry point; the
/// two must agree.
fn load(name: &str, bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    save_seed(name, bytes);
    let path = write_sparse(name, bytes);
    let from_file = Snapshot::load(&path);
    let fuzzed = snapvm::fuzzing::snapshot_file::load(bytes);
    match (&from_file, &fuzzed) {
        (Ok(a), Ok(b)) => assert_eq!(a.id(), b.id(), "{name}"),
        (Err(a), Err(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}"), "{name}"),
        _ => panic!("{name}: load gave {from_file:?}, the fuzz entry point gave {fuzzed:?}"),
    }
    from_file
}

fn load_err(name: &str, bytes: &[u8]) -> SnapshotError {
    match load(name, bytes) {
        Ok(s) => panic!("{name}: loaded {s:?}, expected an error"),
        Err(e) => e,
    }
}

fn assert_malformed(name: &str, bytes: &[u8], section: &str) {
    match load_err(name, bytes) {
        SnapshotError::Malformed { section: s, .. } if s == section => {}
        e => panic!("{name}: expected Malformed in {section}, got {e:?}"),
    }
}

fn counter(vm: &mut VmInstance) -> u64 {
    u64::from_le_bytes(vm.invoke("counter", b"").unwrap().try_into().unwrap())
}

// ---------------------------------------------------------------------------

#[test]
fn an_intact_file_loads_the_same_both_ways_and_restores() {
    require_kvm!();
    let f = fixture();
    let snap = load("intact.snap", &f.full).unwrap();
    let fuzzed = snapvm::fuzzing::snapshot_file::load(&f.full).unwrap();
    for s in [&snap, &fuzzed] {
        for strategy in [RestoreStrategy::Eager, RestoreStrategy::Lazy] {
            let mut vm = VmInstance::restore_with(&config(), s, strategy).unwrap();
            assert_eq!(counter(&mut vm), 2, "{strategy:?}");
        }
    }
}

#[test]
fn truncation_at_every_section_boundary_is_a_typed_error() {
    require_kvm!();
    let f = &fixture().full;
    let (state_end, mem) = (HEADER + state_len(f), memory_offset(f));
    let cases = [
        0,
        1,
        7,
        8,
        HEADER / 2,
        HEADER - 1,
        HEADER,
        HEADER + state_len(f) / 2,
        state_end,
        mem,
        mem + PAGE,
        f.len() - PAGE,
        f.len() - 1,
    ];
    for len in cases {
        let e = load_err(&format!("truncated-{len}.snap"), &f[..len]);
        let want = if len < HEADER {
            "header"
        } else {
            "memory image"
        };
        assert!(
            matches!(e, SnapshotError::Truncated { section, needed, available }
                if section == want && available == len as u64 && needed > available),
            "truncated to {len}: {e:?}"
        );
    }
}

#[test]
fn every_flipped_header_bit_is_detected() {
    require_kvm!();
    let f = &fixture().full;
    // One file, its header rewritten in place for each bit.
    let path = write_sparse("header-bits.snap", f);
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    for bit in 0..HEADER * 8 {
        let mut header = f[..HEADER].to_vec();
        header[bit / 8] ^= 1 << (bit % 8);
        file.write_all_at(&header, 0).unwrap();
        let e = Snapshot::load(&path).expect_err("a flipped header bit loads");
        let ok = match bit / 8 {
            0..8 => matches!(e, SnapshotError::BadMagic),
            8..12 => matches!(e, SnapshotError::UnsupportedVersion { supported: 1, .. }),
            12..112 => matches!(e, SnapshotError::ChecksumMismatch { section: "header" }),
            _ => matches!(
                e,
                SnapshotError::Malformed {
                    section: "header",
                    ..
                }
            ),
        };
        assert!(ok, "bit {bit}: {e:?}");
    }
    // A few of them also as corpus cases.
    for byte in [0, 9, 13, 20, 30, 40, 47, 60, 90, 120] {
        let mut b = f.clone();
        b[byte] ^= 0x10;
        load_err(&format!("header-byte-{byte}.snap"), &b);
    }
}

#[test]
fn every_flipped_state_bit_is_detected() {
    require_kvm!();
    let f = &fixture().full;
    let state_end = HEADER + state_len(f);
    let path = write_sparse("state-bits.snap", f);
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    // A bit in every 8-byte word of the state section.
    for (i, at) in (HEADER..state_end).step_by(8).enumerate() {
        let byte = f[at] ^ (1 << (i % 8));
        file.write_all_at(&[byte], at as u64).unwrap();
        let e = Snapshot::load(&path).expect_err("a flipped state bit loads");
        assert!(
            matches!(e, SnapshotError::ChecksumMismatch { section: "state" }),
            "byte {at}: {e:?}"
        );
        file.write_all_at(&f[at..at + 1], at as u64).unwrap();
    }
    // The padding between the state and the memory image is not covered.
    let mut b = f.clone();
    if state_end < memory_offset(f) {
        b[state_end] = 0xff;
    }
    b[HEADER + 20] ^= 4;
    assert!(matches!(
        load_err("state-flip.snap", &b),
        SnapshotError::ChecksumMismatch { section: "state" }
    ));
}

#[test]
fn a_flipped_memory_bit_fails_the_restore_with_the_block() {
    require_kvm!();
    let f = &fixture().full;
    let map = map_state(f);
    let mem = memory_offset(f);
    // A bit in the last page of each of the first and last data extents.
    let data: Vec<_> = map.extents.iter().filter(|e| e.2 >> 63 == 0).collect();
    assert!(!data.is_empty());
    for (_, first, pages) in [data[0], data[data.len() - 1]] {
        let page = first + pages - 1;
        let mut b = f.clone();
        b[mem + page as usize * PAGE + 123] ^= 0x20;
        let snap =
            load(&format!("memory-flip-{page}.snap"), &b).expect("the image is checked lazily");
        for strategy in [RestoreStrategy::Eager, RestoreStrategy::Lazy] {
            let e = VmInstance::restore_with(&config(), &snap, strategy).unwrap_err();
            assert!(
                matches!(e, SnapshotError::CorruptMemory { block } if block == page / BLOCK_PAGES),
                "page {page}, {strategy:?}: {e:?}"
            );
        }
    }
    // Data in a page the file says is a hole.
    let hole = (0..f.len() / PAGE - mem / PAGE)
        .find(|&p| !data.iter().any(|e| (e.1..e.1 + e.2).contains(&(p as u64))))
        .unwrap();
    let mut b = f.clone();
    b[mem + hole * PAGE] = 1;
    let snap = load("memory-in-hole.snap", &b).unwrap();
    // Eager restores copy only listed pages; lazy ones map the file, where
    // such a byte is not covered by any checksum (see the format doc).
    VmInstance::restore_with(&config(), &snap, RestoreStrategy::Eager).unwrap();
    let _ = VmInstance::restore_with(&config(), &snap, RestoreStrategy::Lazy);
}

#[test]
fn wrong_magic_and_future_versions_are_rejected() {
    require_kvm!();
    let f = &fixture().full;
    let mut b = f.clone();
    b[..8].copy_from_slice(b"SNAPVMSX");
    fix_header_digest(&mut b);
    assert!(matches!(
        load_err("magic.snap", &b),
        SnapshotError::BadMagic
    ));
    let mut b = f.clone();
    b[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
    assert!(matches!(load_err("elf.snap", &b), SnapshotError::BadMagic));

    for version in [0, 2, u32::MAX] {
        let mut b = f.clone();
        put_u32(&mut b, 8, version);
        fix_header_digest(&mut b);
        assert!(
            matches!(
                load_err(&format!("version-{version}.snap"), &b),
                SnapshotError::UnsupportedVersion { found, supported: 1 } if found == version
            ),
            "version {version}"
        );
    }
}

#[test]
fn lengths_that_overflow_or_lie_are_rejected() {
    require_kvm!();
    let f = &fixture().full;
    let patched = |at: usize, v: u64| {
        let mut b = f.clone();
        put_u64(&mut b, at, v);
        fix_header_digest(&mut b);
        b
    };
    // state_offset (16), state_len (24), memory_offset (32), memory_size (40).
    let malformed = [
        (16, 0),
        (16, 129),
        (16, u64::MAX),
        (24, u64::MAX),
        (24, u64::MAX - 127),
        (24, (16 << 20) + 1),
        (24, memory_offset(f) as u64 - 127),
        (32, 0),
        (32, 4096 - 1),
        (32, memory_offset(f) as u64 + 1),
        (32, !4095),
        (40, 0),
        (40, 4096),
        (40, (2 << 20) + 4096),
    ];
    for (at, v) in malformed {
        let e = load_err(&format!("len-{at}-{v:x}.snap"), &patched(at, v));
        assert!(
            matches!(
                e,
                SnapshotError::Malformed {
                    section: "header",
                    ..
                }
            ),
            "field {at} = {v:#x}: {e:?}"
        );
    }
    for v in [(64 << 30) + (2 << 20), 1 << 62, !((2 << 20) - 1)] {
        let e = load_err(&format!("memsize-{v:x}.snap"), &patched(40, v));
        assert!(
            matches!(e, SnapshotError::MemoryTooLarge { snapshot, .. } if snapshot == v),
            "memory size {v:#x}: {e:?}"
        );
    }
    let truncated = [
        (40, 64 << 30),
        (40, 2 * MEMORY),
        (32, 1 << 40),
        (32, 1 << 63),
    ];
    for (at, v) in truncated {
        let e = load_err(&format!("trunc-{at}-{v:x}.snap"), &patched(at, v));
        assert!(
            matches!(
                e,
                SnapshotError::Truncated {
                    section: "memory image",
                    ..
                }
            ),
            "field {at} = {v:#x}: {e:?}"
        );
    }
    // A state length that grows into the padding, digest recomputed: the
    // extra zero bytes are trailing garbage.
    let mut b = patched(24, state_len(f) as u64 + 8);
    fix_digests(&mut b);
    assert_malformed("state-len-plus-8.snap", &b, "state");
    // One that shrinks: the section ends early.
    let mut b = patched(24, state_len(f) as u64 - 4);
    fix_digests(&mut b);
    let e = load_err("state-len-minus-4.snap", &b);
    assert!(
        matches!(
            e,
            SnapshotError::Truncated {
                section: "state",
                ..
            } | SnapshotError::Malformed {
                section: "state",
                ..
            }
        ),
        "{e:?}"
    );
    // Unknown flags.
    let mut b = f.clone();
    put_u32(&mut b, 12, 2);
    fix_header_digest(&mut b);
    assert_malformed("flags.snap", &b, "header");
}

#[test]
fn state_sections_with_lying_counts_are_malformed() {
    require_kvm!();
    let f = &fixture().full;
    let map = map_state(f);
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    let mut patch = |name: &str, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = f.clone();
        edit(&mut b);
        fix_digests(&mut b);
        cases.push((name.to_string(), b));
    };
    for (name, at) in [
        ("preserved", map.preserved),
        ("functions", map.functions),
        ("msrs", map.msr_count),
        ("cpuid", map.cpuid_count),
        ("extents", map.extent_count),
        ("crcs", map.crc_count),
    ] {
        for v in [u64::MAX, 1 << 63, 1 << 40, 1 << 20, 4097] {
            patch(&format!("count-{name}-{v:x}"), &|b| put_u64(b, at, v));
        }
    }
    let (name_at, name_len) = map.first_name;
    patch("name-not-utf8", &|b| b[name_at] = 0xff);
    patch("name-len-zero", &|b| put_u64(b, name_at - 8, 0));
    patch("name-len-huge", &|b| put_u64(b, name_at - 8, u64::MAX));
    patch("name-len-257", &|b| put_u64(b, name_at - 8, 257));
    patch("name-len-past-state", &|b| put_u64(b, name_at - 8, 256));
    patch("function-index", &|b| put_u64(b, name_at - 16, 7));
    assert!(name_len > 0);
    for (i, &at) in map.cpu_structs.iter().enumerate() {
        let len = get_u64(f, at);
        patch(&format!("cpu-struct-{i}-short"), &|b| {
            put_u64(b, at, len - 1)
        });
        patch(&format!("cpu-struct-{i}-huge"), &|b| {
            put_u64(b, at, u64::MAX)
        });
    }
    patch("msr-entry-len", &|b| put_u64(b, map.msr_count + 8, 8));
    patch("cpuid-entry-len", &|b| put_u64(b, map.cpuid_count + 8, 80));
    let input_buf = HEADER + 16 + 16 + 32 + 8;
    patch("input-outside-memory", &|b| {
        put_u64(b, input_buf, u64::MAX - 10)
    });
    patch("input-cap-overflow", &|b| {
        put_u64(b, input_buf + 8, u64::MAX)
    });
    patch("full-names-a-base", &|b| b[HEADER + 16] = 1);
    patch("preserved-count-65", &|b| put_u64(b, map.preserved, 65));

    let pages = get_u64(f, 40) / PAGE as u64;
    let ext = &map.extents;
    assert!(ext.len() >= 2, "the fixture has several extents");
    let (e0, e1) = (ext[0], ext[1]);
    patch("extent-empty", &|b| put_u64(b, e0.0 + 8, 0));
    patch("extent-zero-in-full", &|b| {
        put_u64(b, e0.0 + 8, e0.2 | 1 << 63)
    });
    patch("extent-overlap", &|b| put_u64(b, e1.0, e0.1 + e0.2 - 1));
    patch("extent-order", &|b| {
        let (a, c) = (b[e0.0..e0.0 + 16].to_vec(), b[e1.0..e1.0 + 16].to_vec());
        b[e0.0..e0.0 + 16].copy_from_slice(&c);
        b[e1.0..e1.0 + 16].copy_from_slice(&a);
    });
    let last = ext[ext.len() - 1];
    patch("extent-past-memory", &|b| {
        put_u64(b, last.0 + 8, pages - last.1 + 1)
    });
    patch("extent-start-past-memory", &|b| put_u64(b, last.0, pages));
    patch("extent-end-overflows", &|b| {
        put_u64(b, last.0, u64::MAX - 1)
    });
    patch("extent-count-overflows", &|b| {
        put_u64(b, last.0 + 8, (1 << 63) - 1)
    });
    patch("crc-count-short", &|b| {
        put_u64(b, map.crc_count, get_u64(f, map.crc_count) - 1)
    });

    for (name, b) in &cases {
        let e = load_err(&format!("{name}.snap"), b);
        assert!(
            matches!(
                e,
                SnapshotError::Malformed {
                    section: "state",
                    ..
                } | SnapshotError::Truncated {
                    section: "state",
                    ..
                }
            ),
            "{name}: {e:?}"
        );
    }

    // Re-encoded sections of a different length, lengths and digests fixed.
    let name_len_at = name_at - 8;
    let cases = [
        ("extra-trailing-bytes", map.end..map.end, vec![0u8; 4]),
        ("state-ends-mid-crc", map.end - 2..map.end, vec![]),
        ("state-ends-in-header", HEADER + 10..map.end, vec![]),
        ("empty-state", HEADER..map.end, vec![]),
        (
            "preserved-outside-memory",
            map.preserved..map.functions,
            [1u64, MEMORY - 8, 16]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        (
            "preserved-overflows",
            map.preserved..map.functions,
            [1u64, u64::MAX, 2]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        (
            "name-longer-than-256",
            name_len_at..name_at + name_len,
            [&300u64.to_le_bytes()[..], &[b'a'; 300]].concat(),
        ),
        (
            "extents-all-of-memory-twice",
            map.extent_count..map.crc_count,
            [2u64, 0, pages, 0, pages]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    ];
    for (name, range, with) in cases {
        let b = splice_state(f, range, &with);
        let e = load_err(&format!("{name}.snap"), &b);
        assert!(
            matches!(
                e,
                SnapshotError::Malformed {
                    section: "state",
                    ..
                } | SnapshotError::Truncated {
                    section: "state",
                    ..
                }
            ),
            "{name}: {e:?}"
        );
    }
    // Covering all of memory with one extent is well-formed (a fully
    // populated guest); the memory checksums then fail at restore.
    let whole: Vec<u8> = [1u64, 0, pages]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let b = splice_state(f, map.extent_count..map.crc_count, &whole);
    let snap = load("one-extent.snap", &b).unwrap();
    assert!(matches!(
        VmInstance::restore(&config(), &snap),
        Err(SnapshotError::CorruptMemory { .. })
    ));
}

#[test]
fn memory_larger_than_the_config_allows_fails_the_restore() {
    require_kvm!();
    let snap = Snapshot::load(&fixture().full_path).unwrap();
    let e = VmInstance::restore(&config().memory_size(MEMORY / 2), &snap).unwrap_err();
    assert!(
        matches!(e, SnapshotError::MemoryTooLarge { snapshot, limit }
            if snapshot == MEMORY && limit == MEMORY / 2),
        "{e:?}"
    );
}

#[test]
fn diffs_need_their_own_base() {
    require_kvm!();
    let f = fixture();
    let base = Snapshot::load(&f.full_path).unwrap();
    let path = write_sparse("diff.snap", &f.diff);
    let e = load_err("diff-alone.snap", &f.diff);
    assert!(
        matches!(e, SnapshotError::BaseRequired { base: b } if b == base.id()),
        "{e:?}"
    );
    let other = VmInstance::new(&config()).unwrap().snapshot().unwrap();
    let e = Snapshot::load_diff(&path, &other).unwrap_err();
    assert!(
        matches!(e, SnapshotError::WrongBase { expected, found }
            if expected == base.id() && found == other.id()),
        "{e:?}"
    );
    // A diff is not a base: a diff names a base, so loading a diff
    // against itself fails too.
    let diff = Snapshot::load_diff(&path, &base).unwrap();
    assert!(matches!(
        Snapshot::load_diff(&path, &diff),
        Err(SnapshotError::WrongBase { .. })
    ));
    let mut vm = VmInstance::restore(&config(), &diff).unwrap();
    assert_eq!(counter(&mut vm), 3);

    // A diff's flag cleared (digests fixed): a full snapshot naming a base.
    let mut b = f.diff.clone();
    put_u32(&mut b, 12, 0);
    fix_header_digest(&mut b);
    assert_malformed("diff-flag-cleared.snap", &b, "state");
    // A full snapshot flagged as a diff names the all-zero base.
    let mut b = f.full.clone();
    put_u32(&mut b, 12, 1);
    fix_header_digest(&mut b);
    assert!(matches!(
        load_err("full-flagged-diff.snap", &b),
        SnapshotError::BaseRequired { base } if base.0 == [0; 16]
    ));
    let path = write_sparse("full-flagged-diff.snap", &b);
    assert!(matches!(
        Snapshot::load_diff(&path, &base),
        Err(SnapshotError::WrongBase { .. })
    ));

    // A base of another memory size carrying the right id.
    let big = config().memory_size(2 * MEMORY);
    let mut big_base = {
        let p = dir().join("big-base.snap");
        VmInstance::new(&big)
            .unwrap()
            .snapshot()
            .unwrap()
            .save(&p)
            .unwrap();
        std::fs::read(&p).unwrap()
    };
    big_base[HEADER..HEADER + 16].copy_from_slice(&base.id().0);
    fix_digests(&mut big_base);
    let big_base = load("big-base-patched.snap", &big_base).unwrap();
    let e = Snapshot::load_diff(dir().join("diff.snap"), &big_base).unwrap_err();
    assert!(
        matches!(
            e,
            SnapshotError::Malformed {
                section: "state",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn only_regular_files_are_loaded() {
    require_kvm!();
    let f = fixture();
    let link = dir().join("link.snap");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&f.full_path, &link).unwrap();
    assert!(matches!(
        Snapshot::load(&link),
        Err(SnapshotError::Symlink { path }) if path == link
    ));
    for path in [dir(), PathBuf::from("/dev/null")] {
        let e = Snapshot::load(&path).unwrap_err();
        assert!(
            matches!(
                e,
                SnapshotError::Malformed {
                    section: "file",
                    ..
                }
            ),
            "{}: {e:?}",
            path.display()
        );
    }
    let e = Snapshot::load(dir().join("does-not-exist.snap")).unwrap_err();
    assert!(
        matches!(&e, SnapshotError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
        "{e:?}"
    );
    // A symlink to /dev/zero is refused at once, never read.
    let zero = dir().join("zero.snap");
    let _ = std::fs::remove_file(&zero);
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let started = std::time::Instant::now();
    assert!(matches!(
        Snapshot::load(&zero),
        Err(SnapshotError::Symlink { path }) if path == zero
    ));
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    // A FIFO is rejected without waiting for a writer.
    let fifo = dir().join("fifo.snap");
    let _ = std::fs::remove_file(&fifo);
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if made.is_ok_and(|s| s.success()) {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || tx.send(Snapshot::load(&path).map(|_| ())));
        let e = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("loading a FIFO must not block")
            .unwrap_err();
        assert!(
            matches!(
                e,
                SnapshotError::Malformed {
                    section: "file",
                    ..
                }
            ),
            "{e:?}"
        );
    }
}

fn assert_file_changed(path: &Path, snap: &Snapshot) {
    for strategy in [RestoreStrategy::Eager, RestoreStrategy::Lazy] {
        let e = VmInstance::restore_with(&config(), snap, strategy).unwrap_err();
        assert!(
            matches!(&e, SnapshotError::FileChanged { path: p } if p == path),
            "{strategy:?}: {e:?}"
        );
    }
    let mut vm = VmInstance::new(&config()).unwrap();
    assert!(matches!(
        vm.restore_in_place(snap),
        Err(SnapshotError::FileChanged { .. })
    ));
}

#[test]
fn a_file_that_changes_after_loading_is_not_restored() {
    require_kvm!();
    let f = &fixture().full;
    // Appended to.
    let path = write_sparse("appended.snap", f);
    let snap = Snapshot::load(&path).unwrap();
    VmInstance::restore(&config(), &snap).unwrap();
    OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(&[0])
        .unwrap();
    assert_file_changed(&path, &snap);

    // One byte rewritten in place (with its own value), mtime moved on.
    let path = write_sparse("rewritten.snap", f);
    let snap = Snapshot::load(&path).unwrap();
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    let at = memory_offset(f) + 5;
    file.write_all_at(&f[at..at + 1], at as u64).unwrap();
    file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(2))
        .unwrap();
    assert_file_changed(&path, &snap);

    // Replaced by a save (a rename): the loaded snapshot keeps the file it
    // opened, which did not change.
    let path = write_sparse("replaced.snap", f);
    let snap = Snapshot::load(&path).unwrap();
    let other = VmInstance::new(&config()).unwrap().snapshot().unwrap();
    other.save(&path).unwrap();
    let mut vm = VmInstance::restore(&config(), &snap).unwrap();
    assert_eq!(counter(&mut vm), 2);
}

/// A leaf-7 sub-leaf-0 EBX bit that neither the saved CPUID nor this CPU has.
fn missing_leaf7_ebx_bit(saved: u32) -> Option<u32> {
    #[allow(unused_unsafe, reason = "__cpuid_count is unsafe on older toolchains")]
    // SAFETY: CPUID is available on every x86-64 CPU.
    let host = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.ebx;
    // Skip bits KVM may report without the host having them
    // (TSC_ADJUST, FDP_EXCPTN_ONLY, ZERO_FCS_FDS).
    let emulated = (1 << 1) | (1 << 6) | (1 << 13);
    (0..32)
        .rev()
        .map(|b| 1u32 << b)
        .find(|bit| (saved | host | emulated) & bit == 0)
}

#[test]
fn a_cpu_fingerprint_the_host_cannot_satisfy_is_a_cpu_mismatch() {
    require_kvm!();
    let f = &fixture().full;
    let map = map_state(f);
    let entry = *map
        .cpuid
        .iter()
        .find(|&&at| get_u32(f, at) == 7 && get_u32(f, at + 4) == 0)
        .expect("the snapshot has CPUID leaf 7");
    let ebx_at = entry + 16;
    let saved = get_u32(f, ebx_at);
    let Some(bit) = missing_leaf7_ebx_bit(saved) else {
        eprintln!("skipped: this CPU has every leaf 7 EBX feature");
        return;
    };
    let mut b = f.clone();
    put_u32(&mut b, ebx_at, saved | bit);
    fix_digests(&mut b);
    let snap = load("cpuid.snap", &b).unwrap();
    for strategy in [RestoreStrategy::Eager, RestoreStrategy::Lazy] {
        let e = VmInstance::restore_with(&config(), &snap, strategy).unwrap_err();
        assert!(
            matches!(e, SnapshotError::CpuMismatch { leaf: 7, index: 0, register: "ebx", missing }
                if missing == bit),
            "{strategy:?}: {e:?}"
        );
    }
    // Extended leaf 0x8000_0001 ECX: the same check.
    if let Some(&entry) = map.cpuid.iter().find(|&&at| get_u32(f, at) == 0x8000_0001) {
        let ecx_at = entry + 20;
        let saved = get_u32(f, ecx_at);
        #[allow(unused_unsafe, reason = "__cpuid is unsafe on older toolchains")]
        // SAFETY: CPUID is available on every x86-64 CPU.
        let host = unsafe { std::arch::x86_64::__cpuid(0x8000_0001) }.ecx;
        if let Some(bit) = (0..32)
            .rev()
            .map(|b| 1u32 << b)
            .find(|b| (saved | host) & b == 0)
        {
            let mut b = f.clone();
            put_u32(&mut b, ecx_at, saved | bit);
            fix_digests(&mut b);
            let snap = load("cpuid-ext.snap", &b).unwrap();
            let e = VmInstance::restore(&config(), &snap).unwrap_err();
            assert!(
                matches!(
                    e,
                    SnapshotError::CpuMismatch {
                        leaf: 0x8000_0001,
                        register: "ecx",
                        ..
                    }
                ),
                "{e:?}"
            );
        }
    }
}

/// xorshift64: a tiny deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_corruption_of_header_and_state_never_panics() {
    require_kvm!();
    let f = &fixture().full;
    let prefix_len = memory_offset(f);
    let state_end = HEADER + state_len(f);
    let path = write_sparse("random.snap", f);
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    let interesting = [0, 1, 8, 127, 128, 4096, 1 << 21, 1 << 32, 1 << 63, u64::MAX];
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    let (mut loaded, mut digest_fixed) = (0, 0);
    for _ in 0..3000 {
        let mut b = f[..prefix_len].to_vec();
        for _ in 0..1 + rng.below(4) {
            // Half the mutations in the header, half in the state.
            let at = if rng.below(2) == 0 {
                rng.below(HEADER)
            } else {
                HEADER + rng.below(state_end - HEADER)
            };
            match rng.below(3) {
                0 => b[at] ^= 1 << rng.below(8),
                1 => b[at] = rng.next() as u8,
                _ => {
                    let at = (at & !7).min(prefix_len - 8);
                    put_u64(&mut b, at, interesting[rng.below(interesting.len())]);
                }
            }
        }
        if rng.below(2) == 0 {
            // Keep magic and version so the parser goes deeper.
            b[..12].copy_from_slice(&f[..12]);
            fix_digests(&mut b);
            digest_fixed += 1;
        }
        file.write_all_at(&b, 0).unwrap();
        match Snapshot::load(&path) {
            Ok(_) => loaded += 1,
            Err(SnapshotError::Io { .. }) => {
                panic!("an I/O error from a corrupt but readable file")
            }
            Err(_) => {}
        }
    }
    assert!(digest_fixed > 1000);
    // Some mutations hit fields any value of which is valid (registers).
    eprintln!("{loaded} of 3000 random mutations still loaded");
}

#[test]
fn data_in_a_hole_never_reaches_a_lazily_restored_guest() {
    require_kvm!();
    let mut bytes = fixture().full.clone();
    // The last page of guest memory: never stored by a testguest snapshot.
    let at = memory_offset(&bytes) + MEMORY as usize - PAGE;
    assert!(bytes[at..at + PAGE].iter().all(|&b| b == 0));
    bytes[at + 17] = 0xA5;
    let path = write_sparse("hole-data.snap", &bytes);
    let snapshot = Snapshot::load(&path).unwrap();
    // Eager restores copy only the stored pages: the byte never matters.
    let mut eager = VmInstance::restore_with(&config(), &snapshot, RestoreStrategy::Eager).unwrap();
    assert_eq!(counter(&mut eager), 2);
    // A lazy restore would map it: refused.
    assert!(matches!(
        VmInstance::restore_with(&config(), &snapshot, RestoreStrategy::Lazy),
        Err(SnapshotError::Malformed {
            section: "memory",
            ..
        })
    ));
}

#[test]
fn preserved_regions_must_fit_the_restoring_vm() {
    require_kvm!();
    // The testguest preserves an 8-byte counter at init.
    let snapshot = Snapshot::load(&fixture().full_path).unwrap();
    assert!(matches!(
        VmInstance::restore(&config().max_preserved(4), &snapshot),
        Err(SnapshotError::Malformed {
            section: "guest state",
            ..
        })
    ));
    assert!(VmInstance::restore(&config().max_preserved(8), &snapshot).is_ok());
}

/// Offsets of the CPUID fields that hold the APIC id of the CPU a snapshot
/// was taken on (before normalisation): leaf 0x1 EBX (bits 31:24) and leaf
/// 0xB / 0x1F EDX, as (offset, mask of the id bits).
fn apic_id_fields(f: &[u8], map: &StateMap) -> Vec<(usize, u32)> {
    let mut fields = Vec::new();
    for &at in &map.cpuid {
        match get_u32(f, at) {
            0x1 => fields.push((at + 16, 0xFF00_0000)),
            0xB | 0x1F => fields.push((at + 24, u32::MAX)),
            _ => {}
        }
    }
    fields
}

#[test]
fn a_file_taken_on_another_cpu_restores_into_vms_that_have_run() {
    require_kvm!();
    // Files written before CPUID normalisation hold the APIC id of the CPU
    // they were taken on; here, one this host's KVM would not report.
    let f = &fixture().full;
    let map = map_state(f);
    let fields = apic_id_fields(f, &map);
    assert!(!fields.is_empty(), "the snapshot has CPUID leaf 0x1");
    // Saved files are already normalised.
    for &(at, mask) in &fields {
        assert_eq!(get_u32(f, at) & mask, 0, "APIC id at {at}");
    }
    let mut b = f.clone();
    for &(at, mask) in &fields {
        let value = get_u32(&b, at) & !mask | 0x0700_0007 & mask;
        put_u32(&mut b, at, value);
    }
    fix_digests(&mut b);
    let snap = load("apic-id.snap", &b).unwrap();

    // A pooled shell's vCPU has run: KVM takes no other CPUID for it.
    let pool = snapvm::snapshot::ShellPool::for_snapshot(&config(), &snap, 1).unwrap();
    let mut vm = pool.restore(&snap).unwrap();
    assert_eq!(counter(&mut vm), 2);
    // Nor for a poisoned VM rewound in place.
    let mut vm = VmInstance::new(&config()).unwrap();
    assert!(vm.invoke("panic", b"").is_err());
    vm.restore_in_place(&snap).unwrap();
    assert_eq!(counter(&mut vm), 2);
    // A new VM took any CPUID before; it still does.
    let mut vm = VmInstance::restore(&config(), &snap).unwrap();
    assert_eq!(counter(&mut vm), 2);

    // Saved again, the file holds the normalised CPUID.
    let path = dir().join("apic-id-resaved.snap");
    snap.save(&path).unwrap();
    let resaved = std::fs::read(&path).unwrap();
    let map = map_state(&resaved);
    for (at, mask) in apic_id_fields(&resaved, &map) {
        assert_eq!(get_u32(&resaved, at) & mask, 0, "APIC id at {at}");
    }
}

#[test]
fn concurrent_saves_to_one_path_leave_one_complete_file() {
    require_kvm!();
    const SAVERS: usize = 4;
    let mut vm = VmInstance::new(&config()).unwrap();
    let snapshots: Vec<Snapshot> = (0..SAVERS)
        .map(|_| {
            // A different counter in each, and a few more pages to write.
            counter(&mut vm);
            vm.invoke("write_pages", &[8, 0x5A]).unwrap();
            vm.snapshot().unwrap()
        })
        .collect();
    let dir = dir().join("concurrent-saves");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("one.snap");
    for round in 0..8 {
        let start = std::sync::Barrier::new(SAVERS);
        std::thread::scope(|scope| {
            for snap in &snapshots {
                let (start, path) = (&start, &path);
                scope.spawn(move || {
                    start.wait();
                    snap.save(path)
                        .unwrap_or_else(|e| panic!("round {round}: {e} ({e:?})"));
                });
            }
        });
        let loaded = Snapshot::load(&path).unwrap();
        let winner = snapshots
            .iter()
            .find(|s| s.id() == loaded.id())
            .unwrap_or_else(|| panic!("round {round}: {loaded:?} is none of the saved"));
        assert_eq!(loaded.stored_bytes(), winner.stored_bytes());
        let mut restored = VmInstance::restore(&config(), &loaded).unwrap();
        let mut original = VmInstance::restore(&config(), winner).unwrap();
        assert_eq!(
            counter(&mut restored),
            counter(&mut original),
            "round {round}"
        );
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["one.snap"], "round {round}: temporary files left");
    }
}

#[test]
fn a_lazily_restored_vm_reads_pages_it_has_not_written_from_the_file_as_it_is() {
    // Documented behaviour (docs/snapshot-format.md, "File rules"): a lazy
    // restore maps the file privately, so a change to the file after the
    // restore shows through in every page the VM has not written; it is
    // detected at the next restore from that snapshot, not before.
    require_kvm!();
    let f = &fixture().full;
    let path = write_sparse("changed-under-a-lazy-vm.snap", f);
    let snap = Snapshot::load(&path).unwrap();
    let mut vm = VmInstance::restore_with(&config(), &snap, RestoreStrategy::Lazy).unwrap();
    // The program's first page: stored, and not written by a restore.
    let addr = snapvm::abi::USER_BASE;
    let map = map_state(f);
    assert!(map.extents.iter().any(|&(_, first, raw)| {
        let pages = raw & !(1 << 63);
        (first..first + pages).contains(&(addr / PAGE as u64))
    }));
    let mut before = [0u8; 16];
    vm.read_memory(addr, &mut before).unwrap();
    let at = memory_offset(f) as u64 + addr;
    assert_eq!(&f[at as usize..at as usize + 16], &before);

    let changed: Vec<u8> = before.iter().map(|b| !b).collect();
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&changed, at).unwrap();
    // File times may be coarser than the test: make the change visible.
    file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(2))
        .unwrap();
    let mut after = [0u8; 16];
    vm.read_memory(addr, &mut after).unwrap();
    assert_eq!(
        &after[..],
        &changed[..],
        "the VM sees the file as it is now"
    );

    assert!(matches!(
        VmInstance::restore(&config(), &snap),
        Err(SnapshotError::FileChanged { .. })
    ));
    assert!(matches!(
        vm.restore_in_place(&snap),
        Err(SnapshotError::FileChanged { .. })
    ));
}

/// Blocks of a file without data pages (from its extents).
fn empty_blocks(f: &[u8], map: &StateMap) -> Vec<u64> {
    let blocks = get_u64(f, map.crc_count);
    (0..blocks)
        .filter(|&k| {
            !map.extents.iter().any(|&(_, first, raw)| {
                let pages = raw & !(1 << 63);
                raw & (1 << 63) == 0
                    && first < (k + 1) * BLOCK_PAGES
                    && first + pages > k * BLOCK_PAGES
            })
        })
        .collect()
}

#[test]
fn crcs_of_blocks_without_data_are_zero_and_checked_only_by_lazy_full_restores() {
    // Documented in docs/snapshot-format.md, "Block CRCs".
    require_kvm!();
    let fx = fixture();
    for f in [&fx.full, &fx.diff] {
        let map = map_state(f);
        let empty = empty_blocks(f, &map);
        assert!(!empty.is_empty());
        for &k in &empty {
            assert_eq!(get_u32(f, map.crc_count + 8 + 4 * k as usize), 0);
        }
    }
    let corrupt = |f: &[u8]| {
        let map = map_state(f);
        let k = *empty_blocks(f, &map).last().unwrap();
        let mut b = f.to_vec();
        put_u32(&mut b, map.crc_count + 8 + 4 * k as usize, 0xDEAD_BEEF);
        fix_digests(&mut b);
        (b, k)
    };
    // A full snapshot: eager restores never look; a lazy one does.
    let (full, k) = corrupt(&fx.full);
    let snap = load("empty-crc-full.snap", &full).unwrap();
    let mut vm = VmInstance::restore_with(&config(), &snap, RestoreStrategy::Eager).unwrap();
    assert_eq!(counter(&mut vm), 2);
    assert!(matches!(
        VmInstance::restore_with(&config(), &snap, RestoreStrategy::Lazy),
        Err(SnapshotError::CorruptMemory { block }) if block == k
    ));
    // A diff: never checked.
    let base = Snapshot::load(&fx.full_path).unwrap();
    let (diff, _) = corrupt(&fx.diff);
    let path = write_sparse("empty-crc-diff.snap", &diff);
    let snap = Snapshot::load_diff(&path, &base).unwrap();
    for strategy in [RestoreStrategy::Eager, RestoreStrategy::Lazy] {
        let mut vm = VmInstance::restore_with(&config(), &snap, strategy).unwrap();
        assert_eq!(counter(&mut vm), 3, "{strategy:?}");
    }
}

#[test]
fn padding_after_the_state_is_not_checked() {
    // Documented in docs/snapshot-format.md, "Memory image".
    require_kvm!();
    let f = &fixture().full;
    let (state_end, memory) = (HEADER + state_len(f), memory_offset(f));
    assert!(state_end < memory, "the fixture has padding");
    assert!(f[state_end..memory].iter().all(|&b| b == 0));
    let mut b = f.clone();
    b[state_end..memory].fill(0xA5);
    let snap = load("padding.snap", &b).unwrap();
    let mut vm = VmInstance::restore(&config(), &snap).unwrap();
    assert_eq!(counter(&mut vm), 2);
}

/// A tampered file with valid digests cannot aim the host's writes of every
/// request's input at the system area or the ABI page: the restore refuses
/// its guest state, and an in-place restore leaves the VM poisoned.
#[test]
fn a_rehashed_file_cannot_aim_host_writes_outside_user_memory() {
    require_kvm!();
    let input_buf = HEADER + 16 + 16 + 32 + 8;
    for (name, target) in [("idt", 0x3000u64), ("pml4", 0xA000), ("abi", 0x1000)] {
        let mut b = fixture().full.clone();
        put_u64(&mut b, input_buf, target);
        put_u64(&mut b, input_buf + 8, 0x1000);
        fix_digests(&mut b);
        let snap =
            load(&format!("input-at-{name}.snap"), &b).expect("the loader checks only bounds");
        assert!(
            matches!(
                VmInstance::restore(&config(), &snap),
                Err(SnapshotError::Malformed {
                    section: "guest state",
                    ..
                })
            ),
            "{name}"
        );
        let mut vm = VmInstance::new(&config()).unwrap();
        assert!(vm.restore_in_place(&snap).is_err(), "{name}");
        assert_eq!(vm.state(), snapvm::VmState::Poisoned, "{name}");
        assert!(matches!(
            vm.invoke("counter", b""),
            Err(snapvm::VmError::Poisoned { .. })
        ));
    }
}

// ---------------------------------------------------------------------------
// The optional section of tracked connections.

/// `"NET1"`, the tag of the connections section.
const NET_TAG: &[u8; 4] = b"NET1";

/// One saved connection record (60 bytes, see `docs/snapshot-format.md`):
/// 10.0.0.2:`guest_port` to 10.0.0.1:7000, established, opened by the
/// guest, both SYNs seen, acknowledgements and windows known.
fn net_record(guest_port: u16) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&[10, 0, 0, 2]);
    r.extend_from_slice(&guest_port.to_le_bytes());
    r.extend_from_slice(&[10, 0, 0, 1]);
    r.extend_from_slice(&7000u16.to_le_bytes());
    r.extend_from_slice(&[2, 0, 0, 0]);
    r.extend_from_slice(&[2, 0, 0, 0, 0, 2]);
    r.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    for (seq, ack) in [(1000u32, 5000u32), (5000, 1000)] {
        // syn_seen | ack present | window scale present; scale 7.
        r.extend_from_slice(&[0b1101, 7, 0, 0]);
        r.extend_from_slice(&seq.to_le_bytes());
        r.extend_from_slice(&ack.to_le_bytes());
        r.extend_from_slice(&65535u32.to_le_bytes());
    }
    assert_eq!(r.len(), 60);
    r
}

/// `section` appended to the fixture's state section (the memory image
/// moved one page on to make room), digests fixed.
fn with_net_section(section: &[u8]) -> Vec<u8> {
    let f = &fixture().full;
    let (len, mem) = (state_len(f), memory_offset(f));
    assert!(section.len() <= PAGE);
    let mut b = f[..HEADER + len].to_vec();
    b.extend_from_slice(section);
    b.resize(mem + PAGE, 0);
    b.extend_from_slice(&f[mem..]);
    put_u64(&mut b, 24, (len + section.len()) as u64);
    put_u64(&mut b, 32, (mem + PAGE) as u64);
    fix_digests(&mut b);
    b
}

fn net_section(count: u64, records: &[Vec<u8>]) -> Vec<u8> {
    let mut s = NET_TAG.to_vec();
    s.extend_from_slice(&count.to_le_bytes());
    records.iter().for_each(|r| s.extend_from_slice(r));
    s
}

#[test]
fn a_connections_section_loads_and_restores() {
    require_kvm!();
    let b = with_net_section(&net_section(2, &[net_record(49152), net_record(49153)]));
    let snap = load("net-valid.snap", &b).expect("a valid connections section");
    // The test guest has no network device: nothing to reset, it runs.
    let mut vm = VmInstance::restore(&config(), &snap).unwrap();
    assert_eq!(counter(&mut vm), 2);
    // Saved again, the section survives: the file loads to the same bytes
    // of state.
    let path = dir().join("net-resaved.snap");
    snap.save(&path).unwrap();
    let again = std::fs::read(&path).unwrap();
    let state = |b: &[u8]| b[HEADER..HEADER + state_len(b)].to_vec();
    assert_eq!(state(&again), state(&b));
}

#[test]
fn a_corrupt_or_oversized_connections_section_is_a_typed_error() {
    require_kvm!();
    let good = net_record(49152);
    let patched = |at: usize, byte: u8| {
        let mut r = good.clone();
        r[at] = byte;
        r
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "net-unknown-tag",
            [b"NET2".as_slice(), &1u64.to_le_bytes(), &good].concat(),
            "state",
        ),
        (
            "net-count-max",
            net_section(u64::MAX, std::slice::from_ref(&good)),
            "connections",
        ),
        (
            "net-count-over-limit",
            net_section(1 << 17, std::slice::from_ref(&good)),
            "connections",
        ),
        (
            "net-count-past-the-end",
            net_section(2, std::slice::from_ref(&good)),
            "connections",
        ),
        ("net-count-zero", net_section(0, &[]), "connections"),
        (
            "net-short-record",
            net_section(1, &[good[..30].to_vec()]),
            "connections",
        ),
        (
            "net-trailing",
            [net_section(1, std::slice::from_ref(&good)), vec![0; 8]].concat(),
            "connections",
        ),
        (
            "net-bad-state",
            net_section(1, &[patched(12, 4)]),
            "connections",
        ),
        (
            "net-bad-direction",
            net_section(1, &[patched(13, 2)]),
            "connections",
        ),
        (
            "net-reserved",
            net_section(1, &[patched(14, 1)]),
            "connections",
        ),
        (
            "net-bad-flags",
            net_section(1, &[patched(28, 0x30)]),
            "connections",
        ),
        (
            "net-window-scale",
            net_section(1, &[patched(29, 15)]),
            "connections",
        ),
        (
            "net-duplicate",
            net_section(2, &[good.clone(), good.clone()]),
            "connections",
        ),
        (
            "net-unsorted",
            net_section(2, &[net_record(49153), net_record(49152)]),
            "connections",
        ),
    ];
    for (name, section, want) in cases {
        assert_malformed(&format!("{name}.snap"), &with_net_section(&section), want);
    }
    // Cut off inside the tag, or right after it.
    for (name, section, want) in [
        ("net-short-tag", &b"NE"[..], "state"),
        ("net-tag-only", &NET_TAG[..], "connections"),
    ] {
        let e = load_err(&format!("{name}.snap"), &with_net_section(section));
        assert!(
            matches!(e, SnapshotError::Truncated { section, .. } if section == want),
            "{name}: {e:?}"
        );
    }
}
