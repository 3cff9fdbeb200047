//! Fuzzes the snapshot file parser (`Snapshot::load`'s path, fed from memory).
//!
//! Run with `cargo +nightly fuzz run snapshot_file` from the repository root.
//!
//! An input is one mode byte followed by a snapshot file. Blind mutations
//! almost never get past the SHA-256 digests or reach the state section
//! (the memory image it describes is at least 2 MiB), so the mode byte
//! lets the fuzzer opt into repairs that keep the rest of the parser
//! reachable:
//! - bit 0: recompute the state and header digests after mutation;
//! - bit 1: pad the file with zeros to the end of the memory image the
//!   header describes (up to 32 MiB), so that it is not merely truncated.
//!
//! With neither bit set the bytes are loaded as they are. Every input must
//! give a snapshot or a typed error: a panic, an abort or a huge allocation
//! is a bug.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

/// Size of the fixed header.
const HEADER: usize = 128;
/// The largest file the padding repair creates.
const MAX_PADDED: u64 = 32 << 20;

fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Recomputes bytes 48..80 (SHA-256 of the state section, as far as the
/// file holds it) and 80..112 (SHA-256 of bytes 0..80).
fn fix_digests(b: &mut [u8]) {
    let state_end = usize::try_from(get_u64(b, 24))
        .ok()
        .and_then(|len| len.checked_add(HEADER))
        .map_or(b.len(), |end| end.min(b.len()));
    let state = Sha256::digest(&b[HEADER..state_end]);
    b[48..80].copy_from_slice(&state);
    let header = Sha256::digest(&b[..80]);
    b[80..112].copy_from_slice(&header);
}

/// Pads `b` with zeros to the end of the memory image its header describes.
fn pad(b: &mut Vec<u8>) {
    let end = get_u64(b, 32).checked_add(get_u64(b, 40));
    if let Some(end) = end.filter(|&end| end <= MAX_PADDED) {
        if end as usize > b.len() {
            b.resize(end as usize, 0);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, file)) = data.split_first() else {
        return;
    };
    let mut bytes = file.to_vec();
    if bytes.len() >= HEADER {
        if mode & 1 != 0 {
            fix_digests(&mut bytes);
        }
        if mode & 2 != 0 {
            pad(&mut bytes);
        }
    }
    let _ = snapvm::fuzzing::snapshot_file::load(&bytes);
});
