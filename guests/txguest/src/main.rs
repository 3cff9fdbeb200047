//! A guest with transactions (`snapvm_guest::tx`), for the transaction
//! tests, the `transactions` example and the `tx.*` benchmark figures.
//!
//! Every transaction appends one record (its attempt number) to `LOG`, a
//! static buffer that is not preserved: after a successful transaction
//! that failed k times, a log holding one record shows that the k failed
//! attempts left no trace in guest memory.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use snapvm_guest::{host, tx, Exports};

snapvm_guest::entry!(init);

/// Appended to inside transactions: attempt numbers.
static LOG: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];
static LOG_LEN: AtomicU64 = AtomicU64::new(0);
/// Preserved across resets; incremented inside `preserved_tx`.
static PRESERVED: AtomicU64 = AtomicU64::new(0);
/// Incremented before `tx::begin` (runs once per call).
static BEFORE: AtomicU64 = AtomicU64::new(0);

/// 256 pages to dirty inside transactions.
#[repr(C, align(4096))]
struct Pages([u8; 256 * 4096]);
static mut PAGES: Pages = Pages([0; 256 * 4096]);

fn init(exports: &mut Exports) {
    snapvm_guest::preserve(&PRESERVED).expect("preserve the counter");
    exports
        .export("fail_times", fail_times)
        .export("contended", contended)
        .export("timeout_once", timeout_once)
        .export("preserved_tx", preserved_tx)
        .export("pages", pages)
        .export("increment", increment)
        .export("notify_many", notify_many)
        .export("fault_once", fault_once)
        .export("no_tx", |input| input.to_vec())
        .export("one_tx", |_| match tx::run(|| Ok::<_, &str>(())) {
            Ok(()) => b"committed".to_vec(),
            Err(_) => b"refused".to_vec(),
        })
        .export("nested", |_| {
            tx::begin();
            tx::begin();
            Vec::new()
        })
        .export("commit_only", |_| {
            tx::commit();
            Vec::new()
        })
        .export("unbalanced", |_| {
            tx::begin();
            Vec::new()
        })
        .export("twice", |_| {
            tx::run(|| Ok::<_, &str>(())).ok();
            tx::run(|| Ok::<_, &str>(())).ok();
            Vec::new()
        })
        .export_fallible("fatal", |_| {
            tx::begin();
            append();
            tx::abort("fatal: bad input");
            Err(snapvm_guest::GuestError::new(7, "bad input"))
        })
        .export("state", |_| state());
}

/// Appends the current attempt number to `LOG`.
fn append() {
    let i = LOG_LEN.load(Ordering::Relaxed) as usize;
    if let Some(slot) = LOG.get(i) {
        slot.store(tx::attempt(), Ordering::Relaxed);
        LOG_LEN.store(i as u64 + 1, Ordering::Relaxed);
    }
}

/// `[LOG_LEN, LOG.., PRESERVED, BEFORE]` as little-endian u64 words.
fn state() -> Vec<u8> {
    let len = LOG_LEN.load(Ordering::Relaxed);
    let mut out = Vec::new();
    out.extend_from_slice(&len.to_le_bytes());
    for slot in LOG.iter().take(len as usize) {
        out.extend_from_slice(&slot.load(Ordering::Relaxed).to_le_bytes());
    }
    out.extend_from_slice(&PRESERVED.load(Ordering::Relaxed).to_le_bytes());
    out.extend_from_slice(&BEFORE.load(Ordering::Relaxed).to_le_bytes());
    out
}

/// Writes `value` into the first byte of `n` distinct pages of `PAGES`.
fn dirty(n: usize, value: u8) {
    let base = core::ptr::addr_of_mut!(PAGES).cast::<u8>();
    for i in 0..n.min(256) {
        // SAFETY: `i * 4096` is inside the 256-page static buffer; this
        // guest runs one thread.
        unsafe { base.add(i * 4096).write_volatile(value) };
    }
}

/// `[k, pages]`: aborts while the attempt number is at most `k`, then
/// commits. Each attempt appends to `LOG`, pushes to a heap vector and
/// dirties `pages` pages. Returns `state()`.
fn fail_times(input: &[u8]) -> Vec<u8> {
    let k = u64::from(input.first().copied().unwrap_or(0));
    let n = usize::from(input.get(1).copied().unwrap_or(0));
    BEFORE.fetch_add(1, Ordering::Relaxed);
    let attempt = tx::begin();
    append();
    let mut heap: Vec<u64> = Vec::with_capacity(16);
    heap.push(attempt);
    dirty(n, attempt as u8);
    if attempt <= k {
        tx::abort(&format!("conflict on attempt {attempt}"));
    } else {
        tx::commit();
    }
    state()
}

/// Asks the immediate host function `try` whether this attempt may
/// commit, and tells the deferred host function `notify` about it.
fn contended(_: &[u8]) -> Vec<u8> {
    tx::begin();
    append();
    let answer = host::call("try", &tx::attempt().to_le_bytes());
    let notified = host::call("notify", &tx::attempt().to_le_bytes());
    match (answer.as_deref(), notified.as_deref()) {
        (Ok(b"ok"), Ok(b"")) => tx::commit(),
        (Ok(b"ok"), _) => tx::abort("the deferred call did not answer empty"),
        _ => tx::abort("conflict"),
    }
    state()
}

/// Spins forever on the first attempt (to time out), commits afterwards.
fn timeout_once(_: &[u8]) -> Vec<u8> {
    tx::begin();
    append();
    if tx::attempt() == 1 {
        let mut x = 0u64;
        loop {
            x = core::hint::black_box(x.wrapping_add(1));
        }
    }
    tx::commit();
    state()
}

/// `[k]`: increments the preserved counter and appends inside a
/// transaction that aborts `k` times.
fn preserved_tx(input: &[u8]) -> Vec<u8> {
    let k = u64::from(input.first().copied().unwrap_or(0));
    let attempt = tx::begin();
    PRESERVED.fetch_add(1, Ordering::Relaxed);
    append();
    if attempt <= k {
        tx::abort("again");
    } else {
        tx::commit();
    }
    state()
}

/// `[pages, commit_on]`: dirties `pages` pages, aborts until attempt
/// `commit_on`. Returns nothing (for the benchmark).
fn pages(input: &[u8]) -> Vec<u8> {
    let n = usize::from(input.first().copied().unwrap_or(0));
    let commit_on = u64::from(input.get(1).copied().unwrap_or(1));
    let attempt = tx::begin();
    dirty(n, attempt as u8);
    if attempt < commit_on {
        tx::abort("not yet");
    } else {
        tx::commit();
    }
    Vec::new()
}

/// The `transactions` example: reads `counter` from the host's key-value
/// store, writes it back plus one with compare-and-swap (an immediate host
/// function that fails on a conflict), and notifies (deferred). Returns
/// the new value.
fn increment(_: &[u8]) -> Vec<u8> {
    let result = tx::run(|| {
        let seen = host::call("kv_get", b"counter").map_err(|e| format!("{e}"))?;
        let old = u64::from_le_bytes(seen.as_slice().try_into().map_err(|_| "bad value")?);
        let mut cas = Vec::with_capacity(16);
        cas.extend_from_slice(&old.to_le_bytes());
        cas.extend_from_slice(&(old + 1).to_le_bytes());
        match host::call("kv_cas", &cas)
            .map_err(|e| format!("{e}"))?
            .as_slice()
        {
            b"ok" => {}
            _ => return Err(format!("conflict at {old}")),
        }
        host::call("notify", &(old + 1).to_le_bytes()).map_err(|e| format!("{e}"))?;
        Ok(old + 1)
    });
    match result {
        Ok(value) => value.to_le_bytes().to_vec(),
        Err(_) => Vec::new(),
    }
}

/// `[calls (u16 LE), size]`: inside a committed transaction, calls the
/// deferred host function `notify` `calls` times with `size` bytes each.
/// Returns `[answered empty, failed]` as two u64 words.
fn notify_many(input: &[u8]) -> Vec<u8> {
    let calls = u16::from_le_bytes([
        input.first().copied().unwrap_or(0),
        input.get(1).copied().unwrap_or(0),
    ]);
    let payload = alloc::vec![0xAB; usize::from(input.get(2).copied().unwrap_or(0))];
    let (mut ok, mut failed) = (0u64, 0u64);
    tx::begin();
    for _ in 0..calls {
        match host::call("notify", &payload) {
            Ok(answer) if answer.is_empty() => ok += 1,
            _ => failed += 1,
        }
    }
    tx::commit();
    let mut out = ok.to_le_bytes().to_vec();
    out.extend_from_slice(&failed.to_le_bytes());
    out
}

/// Writes to the null page on the first attempt (a page fault inside the
/// transaction), commits afterwards.
fn fault_once(_: &[u8]) -> Vec<u8> {
    tx::begin();
    append();
    if tx::attempt() == 1 {
        // SAFETY: deliberately invalid: the null guard page is not mapped,
        // so this faults and the host reports a guest fault.
        unsafe { core::ptr::null_mut::<u64>().add(8).write_volatile(1) };
    }
    tx::commit();
    state()
}
