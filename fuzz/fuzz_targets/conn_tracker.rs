//! Fuzzes `snapvm::net::ConnTracker`: the input is a list of frames in both
//! directions (format in `snapvm::fuzzing::net`); the tracker must never
//! panic, keep its table within its limit, and produce only valid RST
//! frames between each connection's own addresses.
//!
//! `cargo +nightly fuzz run conn_tracker fuzz/corpus/conn_tracker` from the
//! repository root. No KVM needed.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    snapvm::fuzzing::net::run(data);
});
