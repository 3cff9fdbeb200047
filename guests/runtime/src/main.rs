//! A guest that stands in for a language runtime: at init it builds 8 MiB
//! of deterministic state (what an interpreter's heap looks like after
//! loading its standard library), then serves functions that keep a little
//! state of their own. Snapshots of it share the runtime and differ in the
//! function state: the case the convergent store's deduplication is for.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicPtr, Ordering};

use snapvm_guest::Exports;

snapvm_guest::entry!(init);

/// Size of the simulated runtime state.
const RUNTIME_BYTES: usize = 8 << 20;

static RUNTIME: AtomicPtr<Vec<u8>> = AtomicPtr::new(core::ptr::null_mut());
static STATE: AtomicPtr<BTreeMap<Vec<u8>, Vec<u8>>> = AtomicPtr::new(core::ptr::null_mut());

fn init(exports: &mut Exports) {
    // Deterministic pseudo-random bytes: the same in every VM of this program.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let runtime: Vec<u8> = (0..RUNTIME_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    RUNTIME.store(
        alloc::boxed::Box::into_raw(alloc::boxed::Box::new(runtime)),
        Ordering::Relaxed,
    );
    let state = alloc::boxed::Box::new(BTreeMap::new());
    STATE.store(alloc::boxed::Box::into_raw(state), Ordering::Relaxed);
    exports
        .export("set", set)
        .export("get", get)
        .export("checksum", checksum);
}

fn state() -> &'static mut BTreeMap<Vec<u8>, Vec<u8>> {
    // SAFETY: set once at init to a leaked Box; the guest is single-threaded
    // and no other reference to the map is live during a call.
    unsafe { &mut *STATE.load(Ordering::Relaxed) }
}

/// `key=value`: stores value under key.
fn set(input: &[u8]) -> Vec<u8> {
    let split = input.iter().position(|&b| b == b'=').unwrap_or(input.len());
    let value = input.get(split + 1..).unwrap_or(&[]).to_vec();
    state().insert(input[..split].to_vec(), value);
    Vec::new()
}

/// Returns the value stored under the key.
fn get(input: &[u8]) -> Vec<u8> {
    state().get(input).cloned().unwrap_or_default()
}

/// A checksum of the runtime state (it never changes).
fn checksum(_: &[u8]) -> Vec<u8> {
    // SAFETY: set once at init to a leaked Box, never written again.
    let runtime = unsafe { &*RUNTIME.load(Ordering::Relaxed) };
    let sum = runtime
        .iter()
        .fold(0u64, |a, &b| a.rotate_left(5) ^ u64::from(b));
    sum.to_le_bytes().to_vec()
}
