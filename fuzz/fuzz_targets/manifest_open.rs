//! Fuzzes the manifest parser: both layers, as `ConvergentStore` runs them
//! on bytes read from a backend.
//!
//! `cargo fuzz run manifest_open` (from this directory's parent).
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapvm::store::manifest::SealedHeader;
use snapvm::store::{BlockId, Manifest, ManifestKey};

fuzz_target!(|data: &[u8]| {
    // Layer 1: the sealed object (header, reference table, authentication).
    let key = ManifestKey::from_bytes([7; 32]);
    let _ = SealedHeader::parse(data);
    let _ = Manifest::open(data, &key);

    // Layer 2: the plaintext body, which authentication normally shields
    // from the fuzzer. The first byte picks a reference table size.
    if let Some((&n, body)) = data.split_first() {
        let refs: Vec<BlockId> = (0..n % 5).map(|i| BlockId::from_bytes([i; 32])).collect();
        if let Ok(m) = Manifest::decode_body(body, &refs) {
            // Whatever parses re-encodes to the same bytes (one encoding per
            // manifest), and seals and opens again.
            assert_eq!(m.encode_body(&refs).as_deref(), Some(body));
            if m.refs() == refs {
                let sealed = m.seal(&key).expect("randomness");
                assert_eq!(Manifest::open(&sealed, &key).as_ref(), Ok(&m));
            }
        }
    }
});
