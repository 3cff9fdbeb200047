//! The `snapshot_file` fuzz target's entry point, shared with the test that
//! replays its seeds (`tests/snapshot_file.rs`). Not a stable API.

use crate::snapshot::{Snapshot, SnapshotError};

/// Loads a snapshot from `bytes`, held in an anonymous in-memory file,
/// through the same path as [`Snapshot::load`]: the same checks, the same
/// errors.
pub fn load(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    crate::snapshot::fuzz_load(bytes)
}
