//! Transactions: a part of a guest function the host may run several
//! times, rewinding the VM between attempts (see `docs/transactions.md`).
//!
//! ```ignore
//! use snapvm_guest::{host, tx};
//!
//! fn transfer(input: &[u8]) -> Vec<u8> {
//!     let request = parse(input);              // runs once
//!     let result = tx::run(|| {                // may run several times
//!         let balance = host::call("kv_get", b"balance")?;
//!         host::call("kv_cas", &update(&balance, &request))?; // fails on a conflict
//!         Ok::<_, host::HostError>(balance)
//!     });
//!     encode(result)                           // runs after every attempt
//! }
//! ```
//!
//! Under a host transaction runner, the host checkpoints the VM at
//! [`begin`]; if it judges an attempt failed, every write the guest made
//! after `begin` is undone and execution continues right after `begin`
//! again, which returns the next attempt number. Without a runner (a
//! plain `invoke`), `begin` returns 1 and the code runs once.
//!
//! One transaction per call: a second `begin` in the same call, a `begin`
//! inside a transaction, or [`commit`]/[`abort`] without one is a protocol
//! error the host reports as a typed error (and the call ends).

use super::alloc;
use core::fmt::Display;
use core::sync::atomic::{AtomicU64, Ordering};

use super::{hypercall, hypercall_stop, ret, set_arg, RESETS};
use crate::abi::{self, Hypercall};

/// The attempt number `begin` returned last.
static ATTEMPT: AtomicU64 = AtomicU64::new(0);

/// Starts the transaction and returns the attempt number: 1 on the first
/// run, 2 after the host rewound the VM once, and so on.
pub fn begin() -> u64 {
    hypercall_stop(Hypercall::TxBegin, RESETS.load(Ordering::Relaxed));
    let attempt = ret(0);
    ATTEMPT.store(attempt, Ordering::Relaxed);
    attempt
}

/// The attempt number of the transaction in progress (0 before the first
/// [`begin`]).
pub fn attempt() -> u64 {
    ATTEMPT.load(Ordering::Relaxed)
}

/// Ends the transaction as successful.
pub fn commit() {
    end(abi::TX_COMMIT, "");
}

/// Ends the transaction as failed, with a reason the host's success
/// criteria see (and may retry on).
pub fn abort(reason: &str) {
    end(abi::TX_ABORT, reason);
}

fn end(outcome: u64, reason: &str) {
    set_arg(0, outcome);
    set_arg(1, reason.as_ptr() as u64);
    set_arg(2, reason.len() as u64);
    hypercall(Hypercall::TxEnd);
}

/// Runs `f` as the transaction: [`begin`], then [`commit`] if `f` returns
/// `Ok`, or [`abort`] with the error's text if it returns `Err`. Returns
/// what `f` returned.
pub fn run<T, E: Display>(f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    begin();
    let result = f();
    match &result {
        Ok(_) => commit(),
        Err(e) => abort(&alloc::format!("{e}")),
    }
    result
}
