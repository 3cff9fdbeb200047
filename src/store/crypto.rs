//! Convergent block encryption, salt derivation and manifest sealing.
//!
//! Everything here is a pure function of its inputs: the random nonce of a
//! manifest is drawn by the caller ([`Manifest::seal`](super::Manifest::seal)).
//! The exact byte layouts and domain-separation strings are specified in
//! `docs/store-format.md`; the constants below are the single source of them.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use sha2::{Digest, Sha256};

use super::ids::{BlockId, BlockKey, ManifestKey, Salt, HASH_LEN};

/// Domain-separation prefix of a block key: `SHA-256(prefix || salt || plaintext)`.
pub const BLOCK_KEY_DOMAIN: &[u8] = b"snapvm-store-v1 block-key\0";
/// Domain-separation prefix of a redundancy salt:
/// `SHA-256(prefix || secret || u32le(index))`.
pub const SALT_DOMAIN: &[u8] = b"snapvm-store-v1 salt\0";
/// Domain-separation prefix of a manifest key id:
/// first 8 bytes of `SHA-256(prefix || manifest key)`.
pub const MANIFEST_KEY_ID_DOMAIN: &[u8] = b"snapvm-store-v1 manifest-key-id\0";
/// The nonce of every block encryption: twelve zero bytes (see
/// [`seal_block_in_place`]).
pub const BLOCK_NONCE: [u8; 12] = [0; 12];
/// Length of an AES-GCM tag, appended to every ciphertext.
pub const TAG_LEN: usize = 16;
/// Length of an AES-GCM nonce.
pub const NONCE_LEN: usize = 12;

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; HASH_LEN] {
    Sha256::digest(bytes).into()
}

/// The block key of `plaintext` under `salt`:
/// `SHA-256(BLOCK_KEY_DOMAIN || salt || plaintext)`.
pub fn block_key(salt: &Salt, plaintext: &[u8]) -> BlockKey {
    let mut h = Sha256::new();
    h.update(BLOCK_KEY_DOMAIN);
    h.update(salt.as_bytes());
    h.update(plaintext);
    BlockKey::from_bytes(h.finalize().into())
}

/// Encrypts one block convergently and returns its key and id: `buf` holds
/// the plaintext on entry and the stored bytes (ciphertext followed by the
/// 16-byte tag) on return.
///
/// The nonce is fixed ([`BLOCK_NONCE`]). That is safe because a key encrypts
/// exactly one plaintext: the key is a collision-resistant hash of the
/// plaintext (and salt), so two different plaintexts under the same key would
/// be a SHA-256 collision. Re-encrypting the same plaintext under the same key
/// and nonce yields the same ciphertext, which reveals nothing beyond
/// "identical block" — the property deduplication needs.
pub fn seal_block_in_place(salt: &Salt, buf: &mut Vec<u8>) -> (BlockKey, BlockId) {
    let key = block_key(salt, buf);
    let cipher = Aes256Gcm::new(key.as_bytes().into());
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(&BLOCK_NONCE), b"", buf)
        .expect("blocks are at most 16 MiB, far below the AES-GCM message limit");
    buf.extend_from_slice(&tag);
    let id = BlockId::from_bytes(sha256(buf));
    (key, id)
}

/// Decrypts stored block bytes in place: on success `buf` holds the plaintext.
/// Returns `false` when authentication fails (wrong key or altered bytes).
pub fn open_block(key: &BlockKey, buf: &mut Vec<u8>) -> bool {
    open_in_place(key.as_bytes(), &BLOCK_NONCE, b"", buf)
}

/// AES-256-GCM decryption of `buf` (ciphertext followed by its tag) in
/// place; `false` when authentication fails.
fn open_in_place(key: &[u8; 32], nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut Vec<u8>) -> bool {
    let Some(ct_len) = buf.len().checked_sub(TAG_LEN) else {
        return false;
    };
    let tag = *Tag::from_slice(&buf[ct_len..]);
    buf.truncate(ct_len);
    let cipher = Aes256Gcm::new(key.into());
    cipher
        .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf, &tag)
        .is_ok()
}

/// Salt number `index` of the salt set defined by `secret`:
/// `SHA-256(SALT_DOMAIN || secret || u32le(index))`.
pub fn derive_salt(secret: &[u8; HASH_LEN], index: u32) -> Salt {
    let mut h = Sha256::new();
    h.update(SALT_DOMAIN);
    h.update(secret);
    h.update(index.to_le_bytes());
    Salt::from_bytes(h.finalize().into())
}

/// The public 8-byte id of a manifest key, written in each sealed manifest so
/// a reader can tell "not my manifest" from "tampered manifest".
pub fn manifest_key_id(key: &ManifestKey) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(MANIFEST_KEY_ID_DOMAIN);
    h.update(key.as_bytes());
    let d: [u8; HASH_LEN] = h.finalize().into();
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    id
}

/// Encrypts a manifest body in place under `nonce`, binding `aad`; appends
/// the tag. The caller draws `nonce` fresh from the OS generator for every
/// sealing (manifest keys encrypt many manifests, unlike block keys).
pub fn seal_manifest_body_with_nonce(
    key: &ManifestKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    body: &mut Vec<u8>,
) {
    let cipher = Aes256Gcm::new(key.as_bytes().into());
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, body)
        .expect("manifest bodies are bounded far below the AES-GCM message limit");
    body.extend_from_slice(&tag);
}

/// Decrypts a sealed manifest body (ciphertext and tag) in place. Returns
/// `false` when authentication fails.
pub fn open_manifest_body(
    key: &ManifestKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut Vec<u8>,
) -> bool {
    open_in_place(key.as_bytes(), nonce, aad, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal_block(salt: &Salt, plaintext: &[u8], out: &mut Vec<u8>) -> (BlockKey, BlockId) {
        out.clear();
        out.extend_from_slice(plaintext);
        seal_block_in_place(salt, out)
    }

    #[test]
    fn convergent_and_salted() {
        let a = vec![7u8; 1000];
        let (mut o1, mut o2, mut o3) = (Vec::new(), Vec::new(), Vec::new());
        let (k1, id1) = seal_block(&Salt::ZERO, &a, &mut o1);
        let (k2, id2) = seal_block(&Salt::ZERO, &a, &mut o2);
        let (k3, id3) = seal_block(&derive_salt(&[1; 32], 0), &a, &mut o3);
        assert_eq!((k1.clone(), id1, &o1), (k2, id2, &o2));
        assert_ne!(id1, id3);
        assert_ne!(k1, k3);
        assert_eq!(o1.len(), a.len() + TAG_LEN);
        assert_eq!(id1.as_bytes(), &sha256(&o1));
        assert_ne!(&o1[..a.len()], &a[..]);
        let mut buf = o1.clone();
        assert!(open_block(&k1, &mut buf));
        assert_eq!(buf, a);
        let mut bad = o1.clone();
        bad[3] ^= 1;
        assert!(!open_block(&k1, &mut bad));
        assert!(!open_block(&k1, &mut vec![1, 2, 3]));
    }

    /// Pins the block format: a change here breaks every existing store.
    #[test]
    fn known_answer() {
        let mut out = Vec::new();
        let (key, id) = seal_block(&Salt::ZERO, b"snapvm", &mut out);
        let mut h = Sha256::new();
        h.update(b"snapvm-store-v1 block-key\0");
        h.update([0u8; 32]);
        h.update(b"snapvm");
        assert_eq!(key.as_bytes(), &<[u8; 32]>::from(h.finalize()));
        assert_eq!(id.as_bytes(), &sha256(&out));
        assert_eq!(
            BLOCK_KEY_DOMAIN.len() + SALT_DOMAIN.len() + MANIFEST_KEY_ID_DOMAIN.len(),
            26 + 21 + 32
        );
    }

    #[test]
    fn manifest_body_round_trip() {
        let key = ManifestKey::from_bytes([9; 32]);
        let mut body = b"hello manifest".to_vec();
        let nonce = [3u8; NONCE_LEN];
        seal_manifest_body_with_nonce(&key, &nonce, b"hdr", &mut body);
        let mut copy = body.clone();
        assert!(open_manifest_body(&key, &nonce, b"hdr", &mut copy));
        assert_eq!(copy, b"hello manifest");
        let mut copy = body.clone();
        assert!(!open_manifest_body(&key, &nonce, b"hdX", &mut copy));
        let mut copy = body.clone();
        assert!(!open_manifest_body(
            &ManifestKey::from_bytes([8; 32]),
            &nonce,
            b"hdr",
            &mut copy
        ));
    }
}
