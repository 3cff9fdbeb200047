//! Salt-controlled redundancy: dedup within a salt, isolation across salts.

use std::sync::Arc;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use sha2::{Digest, Sha256};
use snapvm::store::{
    BlockId, ConvergentStore, ManifestKey, MemoryBackend, Namespace, ObjectName, PerTenant,
    PutInfo, Random, Redundancy, Salt, SaltSelector, StoreConfig,
};

/// The id of `plaintext` stored under `salt`, computed from
/// `docs/store-format.md` alone ("Block key", "Block ciphertext", "Block id").
fn spec_block_id(salt: &Salt, plaintext: &[u8]) -> BlockId {
    let mut h = Sha256::new();
    h.update(b"snapvm-store-v1 block-key\0");
    h.update(salt.as_bytes());
    h.update(plaintext);
    let key: [u8; 32] = h.finalize().into();
    let mut stored = plaintext.to_vec();
    let tag = Aes256Gcm::new(&key.into())
        .encrypt_in_place_detached(Nonce::from_slice(&[0; 12]), b"", &mut stored)
        .unwrap();
    stored.extend_from_slice(&tag);
    BlockId::from_bytes(Sha256::digest(&stored).into())
}

fn data() -> Vec<u8> {
    (0..64 * 1024 * 4)
        .map(|i| (i % 253) as u8 ^ (i / 4096) as u8)
        .collect()
}

fn store_with(
    backend: &MemoryBackend,
    redundancy: Redundancy,
    selector: impl SaltSelector + 'static,
) -> ConvergentStore {
    let config = StoreConfig {
        redundancy,
        salt_selector: Arc::new(selector),
        ..StoreConfig::default()
    };
    ConvergentStore::new(&config, backend.clone(), ManifestKey::generate().unwrap()).unwrap()
}

#[test]
fn same_plaintext_same_salt_is_stored_once() {
    let backend = MemoryBackend::new();
    let r = Redundancy::copies(1).with_secret([1; 32]);
    // Two owners (different manifest keys), same salt: blocks are shared.
    let a = store_with(&backend, r.clone(), PerTenant::with_index(0));
    let b = store_with(&backend, r, PerTenant::with_index(0));
    let pa = a.put_bytes(&data(), b"").unwrap();
    let pb = b.put_bytes(&data(), b"").unwrap();
    assert_eq!(pa.new_blocks, 4);
    assert_eq!(pb.new_blocks, 0);
    assert_eq!(backend.count(Namespace::Blocks), 4);
    assert_eq!(backend.count(Namespace::Manifests), 2);
    // Each owner sees only its own manifest.
    assert_eq!(a.list().unwrap().len(), 1);
    assert_eq!(b.list().unwrap()[0].id, pb.manifest);
}

#[test]
fn n_salts_store_at_most_n_copies() {
    for n in [1u32, 2, 3, 5] {
        let backend = MemoryBackend::new();
        let r = Redundancy::copies(n).with_secret([2; 32]);
        // Many puts with random salt choices; and every index explicitly.
        for _ in 0..20 {
            store_with(&backend, r.clone(), Random)
                .put_bytes(&data(), b"")
                .unwrap();
        }
        for i in 0..2 * n {
            store_with(&backend, r.clone(), PerTenant::with_index(i))
                .put_bytes(&data(), b"")
                .unwrap();
        }
        assert_eq!(
            backend.count(Namespace::Blocks),
            4 * n as usize,
            "copies({n})"
        );
    }
}

#[test]
fn tenants_with_different_salts_cannot_confirm_each_others_blocks() {
    let backend = MemoryBackend::new();
    let r = Redundancy::copies(2).with_secret([3; 32]);
    let tenant_b = store_with(&backend, r.clone(), |_: &PutInfo<'_>, _: u32| 1u32);
    let secret_doc = data();
    tenant_b.put_bytes(&secret_doc, b"").unwrap();

    // Tenant A knows the plaintext and its own salt (index 0), and can read
    // every object name in the backend. The block ids it can compute for
    // the document are not there: it cannot confirm B stored it.
    let salt_a = r.salt(0);
    for chunk in secret_doc.chunks(64 * 1024) {
        let id = spec_block_id(&salt_a, chunk);
        assert!(!snapvm::store::Backend::has(&backend, &ObjectName::block(&id)).unwrap());
    }
    // Putting the same document as A stores fresh ciphertexts (no dedup hit).
    let tenant_a = store_with(&backend, r, |_: &PutInfo<'_>, _: u32| 0u32);
    let pa = tenant_a.put_bytes(&secret_doc, b"").unwrap();
    assert_eq!(pa.new_blocks, 4);
    // They are the ids A computed: the check above looked for the right names.
    for chunk in secret_doc.chunks(64 * 1024) {
        let id = spec_block_id(&salt_a, chunk);
        assert!(snapvm::store::Backend::has(&backend, &ObjectName::block(&id)).unwrap());
    }
    assert_eq!(backend.count(Namespace::Blocks), 8);
}

#[test]
fn stored_blocks_are_ciphertext() {
    let backend = MemoryBackend::new();
    let store = store_with(&backend, Redundancy::copies(1), PerTenant::new("t"));
    let text = b"a very recognisable plaintext line\n".repeat(3000);
    store.put_bytes(&text, b"").unwrap();
    for name in snapvm::store::Backend::list(&backend, Namespace::Blocks).unwrap() {
        let bytes = snapvm::store::Backend::get(&backend, &name, 1 << 20)
            .unwrap()
            .unwrap();
        assert!(!bytes.windows(12).any(|w| w == b"recognisable"));
        // Anyone can check a block against its id without a key.
        assert_eq!(<[u8; 32]>::from(Sha256::digest(&bytes)), name.id);
    }
}
