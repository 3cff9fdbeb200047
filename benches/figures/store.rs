//! ConvergentStore figures.
//!
//! - `crypto.limit_mbps`: the crypto this store format requires per byte,
//!   with the bare primitives and nothing else, on one core: per 64 KiB
//!   block, SHA-256 of (domain, salt, plaintext) for the key, AES-256-GCM
//!   encryption into a second buffer, SHA-256 of the ciphertext for the id.
//! - `store.ingest_mbps`: `ConvergentStore::put` of the same bytes from a
//!   reader, one thread, into a fresh `FsBackend` on tmpfs (fsync on, which
//!   tmpfs makes cheap). Target: at least 0.7 × `crypto.limit_mbps`.
//! - `store.ingest_mbps_all`: the same with `ingest_threads = 2`.
//! - `store.read_mbps`: `ConvergentStore::get` of that data set into a sink,
//!   default settings (two threads).

use std::io::Cursor;
use std::path::PathBuf;
use std::time::Instant;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use sha2::{Digest, Sha256};
use snapvm::store::{ConvergentStore, FsBackend, ManifestKey, StoreConfig};

use super::{median, Ctx, Figure, Target};

const BLOCK: usize = 64 * 1024;

fn mbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

fn crypto_limit(data: &[u8]) -> f64 {
    let mut out = Vec::with_capacity(BLOCK + 16);
    let salt = [0u8; 32];
    let start = Instant::now();
    for block in data.chunks(BLOCK) {
        let mut h = Sha256::new();
        h.update(b"snapvm-store-v1 block-key\0");
        h.update(salt);
        h.update(block);
        let key: [u8; 32] = h.finalize().into();
        out.clear();
        out.extend_from_slice(block);
        let tag = Aes256Gcm::new(&key.into())
            .encrypt_in_place_detached(Nonce::from_slice(&[0; 12]), b"", &mut out)
            .expect("block fits");
        out.extend_from_slice(&tag);
        std::hint::black_box(Sha256::digest(&out));
    }
    mbps(data.len(), start.elapsed().as_secs_f64())
}

fn scratch_root() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    let base = if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    };
    base.join(format!("snapvm-bench-store-{}", std::process::id()))
}

fn store(root: &std::path::Path, threads: usize) -> ConvergentStore {
    let config = StoreConfig {
        ingest_threads: threads,
        ..StoreConfig::default()
    };
    let backend = FsBackend::open(root).expect("scratch store");
    ConvergentStore::new(&config, backend, ManifestKey::from_bytes([1; 32])).expect("store")
}

/// One timed put into a fresh store; returns MB/s.
fn ingest(data: &[u8], threads: usize, root: &std::path::Path) -> f64 {
    let _ = std::fs::remove_dir_all(root);
    let s = store(root, threads);
    let start = Instant::now();
    s.put(Cursor::new(data), b"").expect("put");
    let secs = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(root);
    mbps(data.len(), secs)
}

/// Measures the store figures.
pub fn measure(ctx: &Ctx) -> Vec<Figure> {
    let len = if ctx.quick { 32 << 20 } else { 128 << 20 };
    let samples = ctx.samples(9, 5);
    let data = super::common::pseudo_random(len, 0x9e37_79b9_7f4a_7c15);
    let root = scratch_root();

    // Interleave the samples so that load from other processes on this
    // shared machine hits the figure and its baseline alike.
    let (mut c, mut one, mut all) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..samples {
        c.push(crypto_limit(&data));
        one.push(ingest(&data, 1, &root));
        all.push(ingest(&data, 2, &root));
    }
    let crypto = Figure::plain("crypto.limit_mbps", median(&mut c), "MB/s");
    let one = Figure::plain("store.ingest_mbps", median(&mut one), "MB/s")
        .against(&crypto)
        .target(Target::AtLeast(0.7));
    let all = Figure::plain("store.ingest_mbps_all", median(&mut all), "MB/s").against(&crypto);

    let _ = std::fs::remove_dir_all(&root);
    let s = store(&root, StoreConfig::default().ingest_threads);
    let id = s.put(Cursor::new(&data), b"").expect("put").manifest;
    let mut v: Vec<f64> = (0..samples)
        .map(|_| {
            let start = Instant::now();
            s.get(&id, std::io::sink()).expect("get");
            mbps(len, start.elapsed().as_secs_f64())
        })
        .collect();
    let read = Figure::plain("store.read_mbps", median(&mut v), "MB/s").against(&crypto);
    drop(s);
    let _ = std::fs::remove_dir_all(&root);

    let mut figures = vec![crypto, one, all, read];
    figures.extend(dedup_ratio(&root));
    let _ = std::fs::remove_dir_all(&root);
    figures
}

/// Bytes of all files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    })
}

/// `store.dedup_ratio`: ten snapshots of one runtime (the `runtime` guest,
/// 8 MiB of state built at init) with different function state, saved into
/// one store. Logical bytes are what the snapshots hold (their non-zero
/// pages, so all-zero memory does not inflate the ratio); stored bytes are
/// the store directory's size afterwards (blocks, manifests, everything).
fn dedup_ratio(root: &std::path::Path) -> Option<Figure> {
    if snapvm::vm::check_kvm().is_err() {
        assert!(
            std::env::var_os("SNAPVM_REQUIRE_KVM").is_none(),
            "KVM required"
        );
        println!("note: store.dedup_ratio skipped: KVM is unavailable");
        return None;
    }
    let guest = std::path::Path::new(env!("SNAPVM_GUESTS_DIR")).join("runtime");
    let program = snapvm::GuestProgram::from_file(guest).expect("runtime guest");
    let config = snapvm::VmConfig::new(program).memory_size(32 << 20);
    let dir = root.join("dedup");
    let store = store(&dir, StoreConfig::default().ingest_threads);
    let mut logical = 0;
    for i in 0..10u32 {
        let mut vm = snapvm::VmInstance::new(&config).expect("boot");
        for k in 0..=i {
            let mut input = format!("key{k}=").into_bytes();
            input.extend(std::iter::repeat_n(
                b'a' + (k % 26) as u8,
                100 * (i as usize + 1),
            ));
            vm.invoke("set", &input).expect("set");
        }
        let snapshot = vm.snapshot().expect("snapshot");
        logical += snapshot.stored_bytes();
        snapshot.save_to_store(&store).expect("save");
    }
    let ratio = logical as f64 / dir_bytes(&dir) as f64;
    Some(Figure::plain("store.dedup_ratio", ratio, "x").target(Target::AtLeast(5.0)))
}
