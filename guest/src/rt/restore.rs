//! Uniqueness across snapshots: the generation, the random number generator
//! and restore hooks.
//!
//! The host writes a new generation and 256 bits of fresh entropy into the
//! ABI page at boot and before a restored VM runs its first instruction.
//! Before serving each request the runtime compares the generation with the
//! last one it saw; when it changed, it reseeds the generator from the new
//! entropy and runs every restore hook, in registration order, before the
//! request's function. So two VMs restored from one snapshot never share
//! random output, and code that cached a secret at init can regenerate it.

extern crate alloc;
use alloc::vec::Vec;

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::{abi_read_generation, GuestCell};

static RNG: GuestCell<Option<ChaCha20Rng>> = GuestCell::new(None);
static SEEN_GENERATION: GuestCell<u64> = GuestCell::new(0);
static HOOKS: GuestCell<Vec<fn()>> = GuestCell::new(Vec::new());

/// Reseeds from the ABI page if the generation changed; returns whether it did.
pub(crate) fn refresh() -> bool {
    let (generation, entropy) = abi_read_generation();
    // SAFETY: single-threaded guest (see `GuestCell`).
    let seen = unsafe { &mut *SEEN_GENERATION.get() };
    if *seen == generation {
        return false;
    }
    *seen = generation;
    let mut seed = [0u8; 32];
    for (chunk, word) in seed.chunks_exact_mut(8).zip(entropy) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    // SAFETY: single-threaded guest; no reference to the RNG is live here.
    unsafe { *RNG.get() = Some(ChaCha20Rng::from_seed(seed)) };
    true
}

/// Runs the restore hooks (after `refresh` returned true, except at boot).
pub(crate) fn run_hooks() {
    // Copy the list so a hook may register another hook.
    // SAFETY: single-threaded guest; the borrow ends before the hooks run.
    let hooks: Vec<fn()> = unsafe { (*HOOKS.get()).clone() };
    for hook in hooks {
        hook();
    }
}

/// Fills `buf` with cryptographically strong random bytes (ChaCha20 seeded
/// with host entropy, reseeded on every new [`generation`]).
pub fn random_bytes(buf: &mut [u8]) {
    refresh();
    // SAFETY: single-threaded guest; this is the only live reference.
    let rng = unsafe { &mut *RNG.get() };
    match rng {
        Some(rng) => rng.fill_bytes(buf),
        None => unreachable!("the generator is seeded at boot"),
    }
}

/// A random `u64` (see [`random_bytes`]).
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    random_bytes(&mut bytes);
    u64::from_le_bytes(bytes)
}

/// The generation of this VM lifetime: a random value that changes at boot
/// and at every restore from a snapshot. Two VMs restored from one snapshot
/// have different generations.
pub fn generation() -> u64 {
    abi_read_generation().0
}

/// Registers `hook` to run after every restore, before the next guest
/// function (like CRaC's `afterRestore`). Typical use: regenerate secrets,
/// nonces or identifiers that init cached. Hooks run in registration order.
pub fn on_restore(hook: fn()) {
    // SAFETY: single-threaded guest; no other reference to the list is live.
    unsafe { (*HOOKS.get()).push(hook) };
}
