//! Guest profiles on real KVM: the regex guest (`guests/regexguest`)
//! compiles its patterns into a DFA at init and exports it; a later VM of
//! the same tenant, code and runtime imports it instead of compiling. Blobs
//! never cross tenants or code versions; corrupt, foreign or oversized ones
//! are ignored with a warning; a hostile guest gets a typed error.

mod common;

use std::mem::offset_of;
use std::sync::{Arc, Mutex, OnceLock};

use snapvm::abi::{self, AbiPage, Hypercall};
use snapvm::trace::{CodeId, ProfileScope, TraceCache, TraceKey, TraceKind};
use snapvm::vm::ScratchDisk;
use snapvm::{GuestProgram, VmConfig, VmError, VmInstance, VmState};

/// A log of every record, for the tests that expect a warning.
struct Capture(Mutex<Vec<(log::Level, String)>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0
            .lock()
            .unwrap()
            .push((record.level(), record.args().to_string()));
    }
    fn flush(&self) {}
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let c: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        log::set_logger(c).expect("the only logger");
        log::set_max_level(log::LevelFilter::Trace);
        c
    })
}

/// Whether a warning containing `text` was logged.
fn warned(text: &str) -> bool {
    capture()
        .0
        .lock()
        .unwrap()
        .iter()
        .any(|(level, msg)| *level == log::Level::Warn && msg.contains(text))
}

fn regex_program() -> GuestProgram {
    GuestProgram::from_file(common::guest_path("regexguest")).expect("regexguest builds")
}

fn config(cache: &Arc<TraceCache>, tenant: &str) -> VmConfig {
    capture();
    VmConfig::new(regex_program()).profiles(ProfileScope::new(Arc::clone(cache), tenant))
}

/// The key the regex guest's init profile is stored under when booted.
fn init_key(tenant: &str) -> TraceKey {
    ProfileScope::new(Arc::new(TraceCache::in_memory(0)), tenant)
        .key(CodeId::booted(regex_program().digest()), "(init)")
}

const LOG: &[u8] = b"2024-05-01 10:00:00 GET /index.html 10.0.0.1 user=alice\n\
2024-05-01 10:00:01 POST /login token=abc123 ERROR refused\n\
plain line\n\
HTTP/1.1\" 503 from 192.168.1.20 panic\n";

fn boot(config: &VmConfig) -> (VmInstance, String, Vec<u8>) {
    let mut vm = VmInstance::new(config).expect("regexguest boots");
    let source = String::from_utf8(vm.invoke("source", b"").unwrap()).unwrap();
    let scan = vm.invoke("scan", LOG).unwrap();
    (vm, source, scan)
}

fn counts(scan: &[u8]) -> Vec<u32> {
    scan.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn a_profile_exported_by_one_vm_is_imported_by_the_next() {
    require_kvm!();
    let cache = Arc::new(TraceCache::in_memory(64 << 20));
    let config = config(&cache, "acme");
    let (_, first, scan_compiled) = boot(&config);
    assert_eq!(first, "compiled");
    assert_eq!(cache.len(), 1);
    let blob = cache
        .get(&init_key("acme"))
        .expect("the init profile is stored");
    assert!(blob.starts_with(b"SNVRXDFA"));
    let (_, second, scan_imported) = boot(&config);
    assert_eq!(second, "imported");
    // The imported DFA finds exactly what the compiled one found.
    assert_eq!(scan_imported, scan_compiled);
    assert_eq!(counts(&scan_compiled), [2, 2, 1, 1, 2, 1, 2]);
}

#[test]
fn profiles_never_cross_tenants() {
    require_kvm!();
    let cache = Arc::new(TraceCache::in_memory(64 << 20));
    assert_eq!(boot(&config(&cache, "tenant-a")).1, "compiled");
    assert_eq!(boot(&config(&cache, "tenant-b")).1, "compiled");
    assert_eq!(boot(&config(&cache, "tenant-a")).1, "imported");
    assert_eq!(cache.len(), 2);
}

#[test]
fn profiles_never_cross_code_or_runtime_versions() {
    require_kvm!();
    let cache = Arc::new(TraceCache::in_memory(64 << 20));
    // A valid profile of this guest, stored under another program's code
    // identity, is not offered to this program.
    let (vm, _, _) = boot(&config(&cache, "acme"));
    let blob = cache.get(&init_key("acme")).unwrap();
    cache.remove(&init_key("acme"));
    let other_program = GuestProgram::from_file(common::guest_path("testguest")).unwrap();
    let foreign = TraceKey {
        code: CodeId::booted(other_program.digest()),
        ..init_key("acme")
    };
    cache.put(&foreign, &blob).unwrap();
    assert_eq!(boot(&config(&cache, "acme")).1, "compiled");

    // Another runtime version sees none of the older one's profiles.
    let v2 = VmConfig::new(regex_program())
        .profiles(ProfileScope::new(Arc::clone(&cache), "acme").runtime("v2"));
    assert_eq!(boot(&v2).1, "compiled");
    assert_eq!(boot(&v2).1, "imported");

    // A restored VM has the snapshot's code identity, not the booted one.
    let mut vm = vm;
    let snap = vm.snapshot().unwrap();
    let restored = VmInstance::restore(&config(&cache, "acme"), &snap).unwrap();
    assert_eq!(
        restored.code_id(),
        CodeId::of(regex_program().digest(), snap.id())
    );
    assert_ne!(restored.code_id(), CodeId::booted(regex_program().digest()));
}

#[test]
fn a_corrupt_profile_file_is_ignored_with_a_warning() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(TraceCache::open(dir.path(), 64 << 20).unwrap());
    assert_eq!(boot(&config(&cache, "acme")).1, "compiled");
    let file = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "trace"))
        .expect("one entry file");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&file, &bytes).unwrap();
    assert_eq!(boot(&config(&cache, "acme")).1, "compiled");
    assert!(warned("checksum does not match"));
    // The VM exported a good profile again; the next one imports it.
    assert_eq!(boot(&config(&cache, "acme")).1, "imported");
}

#[test]
fn a_profile_the_guest_cannot_validate_is_ignored_with_a_warning() {
    require_kvm!();
    let cache = Arc::new(TraceCache::in_memory(64 << 20));
    // Right magic, wrong everything else: passes the host's checks (it is
    // a well-formed cache entry), fails the guest's.
    let mut bogus = b"SNVRXDFA".to_vec();
    bogus.extend_from_slice(&common::pseudo_random(4096, 7));
    cache.put(&init_key("acme"), &bogus).unwrap();
    let (_, source, scan) = boot(&config(&cache, "acme"));
    assert_eq!(source, "compiled");
    assert_eq!(counts(&scan), [2, 2, 1, 1, 2, 1, 2]);
    assert!(warned("ignoring the imported profile"));
    // The bogus blob was replaced by the VM's own export.
    assert_ne!(cache.get(&init_key("acme")).unwrap(), bogus);
    assert_eq!(boot(&config(&cache, "acme")).1, "imported");
}

#[test]
fn oversized_profiles_are_neither_stored_nor_offered() {
    require_kvm!();
    let cache = Arc::new(TraceCache::in_memory(64 << 20));
    // The guest's export (hundreds of KiB) exceeds a 4 KiB limit.
    let small = config(&cache, "acme").max_profile(4096);
    assert_eq!(boot(&small).1, "compiled");
    assert!(cache.is_empty());
    assert!(warned("exceeds the 4096-byte limit; not stored"));
    // A stored blob over the limit (put by a VM with a larger limit) is
    // not offered.
    let (_, _, _) = boot(&config(&cache, "acme"));
    assert_eq!(cache.len(), 1);
    assert_eq!(boot(&small).1, "compiled");
    assert!(warned("not offered"));
}

#[test]
fn restored_environments_of_one_snapshot_share_function_profiles() {
    require_kvm!();
    let cache = Arc::new(TraceCache::in_memory(64 << 20));
    let config = config(&cache, "acme");
    let snap_a = VmInstance::new(&config).unwrap().snapshot().unwrap();
    let snap_b = VmInstance::new(&config).unwrap().snapshot().unwrap();
    let words = |vm: &mut VmInstance| {
        assert_eq!(vm.invoke("words_source", b"").unwrap(), b"none");
        let count = vm
            .invoke("words", b"alpha one\nnothing\nZulu two\n")
            .unwrap();
        assert_eq!(count, 2u32.to_le_bytes());
        String::from_utf8(vm.invoke("words_source", b"").unwrap()).unwrap()
    };
    // The first VM restored from snapshot A builds the DFA of `words` on
    // its first call and exports it; the next one imports it.
    let mut first = VmInstance::restore(&config, &snap_a).unwrap();
    assert_eq!(words(&mut first), "compiled");
    let mut second = VmInstance::restore(&config, &snap_a).unwrap();
    assert_eq!(words(&mut second), "imported");
    // So does a VM restored into a pooled shell.
    let pool = snapvm::snapshot::ShellPool::new(&config, 1).unwrap();
    let mut pooled = pool.restore(&snap_a).unwrap();
    assert_eq!(words(&mut pooled), "imported");
    // Snapshot B is another code identity: its VMs start cold.
    let mut other_snapshot = VmInstance::restore(&config, &snap_b).unwrap();
    assert_eq!(words(&mut other_snapshot), "compiled");
    // A VM of snapshot A serving another tenant starts cold too.
    let mut other_tenant = VmInstance::restore(&config, &snap_a).unwrap();
    other_tenant.set_profiles(Some(ProfileScope::new(Arc::clone(&cache), "globex")));
    assert_eq!(words(&mut other_tenant), "compiled");
    let key = ProfileScope::new(Arc::clone(&cache), "acme").key(first.code_id(), "words");
    assert!(cache.get(&key).is_some());
    assert_eq!(
        first.code_id(),
        CodeId::of(regex_program().digest(), snap_a.id())
    );
}

#[test]
fn without_a_scope_exports_are_refused_and_imports_find_nothing() {
    require_kvm!();
    let (_, source, _) = boot(&VmConfig::new(regex_program()));
    assert_eq!(source, "compiled");
}

// --- A hostile guest (guests/rawguest, see tests/hostile.rs) ---

const MEMORY: u64 = 64 << 20;
const DISK: u64 = MEMORY;
const DATA: u64 = 0x1000;
const NAMES: u64 = DATA + 0x100;
const INPUT: u64 = 0x4000;
const OUT: u64 = DATA + 0x400;

/// A rawguest script: `Ready` with one function, `f`, which runs `attack`
/// and answers 8 bytes from `OUT`.
fn hostile_config(cache: &Arc<TraceCache>, attack: impl FnOnce(&mut Vec<u64>)) -> VmConfig {
    let mut w: Vec<u64> = Vec::new();
    let abi_field = |w: &mut Vec<u64>, field: usize, value: u64| w.extend([1, field as u64, value]);
    let abi_disk = |w: &mut Vec<u64>, field: usize, add: u64| w.extend([10, field as u64, add]);
    abi_field(
        &mut w,
        offset_of!(AbiPage, version),
        u64::from(abi::ABI_VERSION) | u64::from(abi::ABI_VERSION) << 32,
    );
    abi_disk(&mut w, offset_of!(AbiPage, func_table), NAMES);
    abi_field(&mut w, offset_of!(AbiPage, func_count), 1);
    abi_disk(&mut w, offset_of!(AbiPage, input_buf), INPUT);
    abi_field(&mut w, offset_of!(AbiPage, input_cap), 0x1000);
    w.extend([3, Hypercall::Ready as u64]);
    let call = w.len() as u64;
    attack(&mut w);
    abi_disk(&mut w, offset_of!(AbiPage, output_ptr), OUT);
    abi_field(&mut w, offset_of!(AbiPage, output_len), 8);
    abi_field(&mut w, offset_of!(AbiPage, status), abi::STATUS_OK);
    w.extend([3, Hypercall::Done as u64, 9, call]);

    let mut disk = vec![0u8; 64 << 10];
    for (i, word) in w.iter().enumerate() {
        disk[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
    }
    let mut entry = [0u8; 16];
    entry[..8].copy_from_slice(&(DISK + NAMES + 0x100).to_le_bytes());
    entry[8..].copy_from_slice(&1u64.to_le_bytes());
    disk[NAMES as usize..NAMES as usize + 16].copy_from_slice(&entry);
    disk[NAMES as usize + 0x100] = b'f';
    disk[OUT as usize..OUT as usize + 8].copy_from_slice(b"answered");
    capture();
    VmConfig::new(GuestProgram::from_file(common::guest_path("rawguest")).unwrap())
        .memory_size(MEMORY)
        .scratch_disk(ScratchDisk::from_bytes(disk))
        .timeout(Some(std::time::Duration::from_secs(2)))
        .profiles(ProfileScope::new(Arc::clone(cache), "mallory"))
}

fn set_arg(w: &mut Vec<u64>, i: usize, value: u64) {
    w.extend([1, (offset_of!(AbiPage, args) + 8 * i) as u64, value]);
}

/// Calls `f` and checks that the host refused the guest's `hypercall`
/// with a typed error and poisoned the VM.
fn assert_refused(vm: &mut VmInstance, hypercall: &str, what: &str) {
    let err = vm.invoke("f", b"").map(|_| ()).expect_err(what);
    assert!(
        matches!(&err, VmError::BadHypercall { hypercall: h, .. } if *h == hypercall),
        "{what}: {err}"
    );
    assert_eq!(vm.state(), VmState::Poisoned);
}

/// Guest addresses no guest may make the host read or write.
const WILD: [(u64, u64); 7] = [
    (0xA000, 0x1000),              // the page tables
    (abi::ABI_PAGE_ADDR, 0x100),   // the ABI page
    (abi::STACK_GUARD_ADDR, 0x10), // the stack guard
    (0, 0x10),                     // the null page
    (MEMORY + (2 << 20), 0x1000),  // past the end of memory and disk
    (DISK + INPUT, u64::MAX),      // a length that wraps
    (u64::MAX - 0x10, 0x100),      // an address that wraps
];

#[test]
fn hostile_exports_with_wild_buffers_get_a_typed_error() {
    require_kvm!();
    let cache = Arc::new(TraceCache::in_memory(64 << 20));
    for (ptr, len) in WILD {
        let config = hostile_config(&cache, |w| {
            set_arg(w, 0, ptr);
            set_arg(w, 1, len);
            w.extend([3, Hypercall::TraceExport as u64]);
        });
        let mut vm = VmInstance::new(&config).expect("rawguest boots");
        assert_refused(
            &mut vm,
            "TraceExport",
            &format!("wild export {ptr:#x}+{len:#x}"),
        );
    }
    assert!(cache.is_empty(), "nothing was stored");
}

#[test]
fn hostile_imports_with_wild_buffers_get_a_typed_error() {
    require_kvm!();
    let cache = Arc::new(TraceCache::in_memory(64 << 20));
    for (ptr, cap) in WILD {
        let config = hostile_config(&cache, |w| {
            set_arg(w, 0, ptr);
            set_arg(w, 1, cap);
            w.extend([3, Hypercall::TraceImport as u64]);
        });
        let mut vm = VmInstance::new(&config).expect("rawguest boots");
        // A blob waits for this VM's code and tenant.
        let key = ProfileScope::new(Arc::clone(&cache), "mallory").key(vm.code_id(), "f");
        cache.put(&key, &[0xEE; 64]).unwrap();
        assert_refused(
            &mut vm,
            "TraceImport",
            &format!("wild import {ptr:#x}+{cap:#x}"),
        );
    }
}

#[test]
fn a_hostile_export_over_the_limit_is_refused_before_copying() {
    require_kvm!();
    let cache = Arc::new(TraceCache::in_memory(64 << 20));
    // 32 MiB of the guest's own memory: a valid range, over the limit.
    let config = hostile_config(&cache, |w| {
        set_arg(w, 0, 16 << 20);
        set_arg(w, 1, 32 << 20);
        w.extend([3, Hypercall::TraceExport as u64]);
        // A second, well-formed export of the 8 bytes at OUT is stored.
        set_arg(w, 0, DISK + OUT);
        set_arg(w, 1, 8);
        w.extend([3, Hypercall::TraceExport as u64]);
    })
    .max_profile(1 << 20);
    let mut vm = VmInstance::new(&config).expect("rawguest boots");
    assert_eq!(vm.invoke("f", b"").unwrap(), b"answered");
    assert_eq!(vm.state(), VmState::Ready);
    let key = ProfileScope::new(Arc::clone(&cache), "mallory").key(vm.code_id(), "f");
    assert_eq!(cache.get(&key).as_deref(), Some(&b"answered"[..]));
    assert_eq!(
        key.kind,
        TraceKind::Profile {
            function: "f".into()
        }
    );
}
