//! Fuzzes the trace cache's entry file parser (what `TraceCache::open` and
//! `get` run on every file in the cache directory).
//!
//! Run with `cargo +nightly fuzz run trace_entry` from the repository root.
//!
//! An input is one mode byte followed by an entry file. Blind mutations
//! almost never get past the trailing SHA-256, so bit 0 of the mode byte
//! recomputes it after mutation, letting the fuzzer reach the length and
//! key decoding. Every input must parse or be rejected: a panic, an abort
//! or a huge allocation is a bug; whatever parses encodes back to the same
//! bytes (one encoding per entry).

#![no_main]

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, file)) = data.split_first() else {
        return;
    };
    let mut bytes = file.to_vec();
    if mode & 1 != 0 && bytes.len() >= 32 {
        let body = bytes.len() - 32;
        let digest = Sha256::digest(&bytes[..body]);
        bytes[body..].copy_from_slice(&digest);
    }
    if let Some((key, value)) = snapvm::fuzzing::trace_entry::parse(&bytes) {
        assert_eq!(snapvm::fuzzing::trace_entry::encode(&key, &value), bytes);
    }
});
