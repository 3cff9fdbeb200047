//! The crate-level error: one variant per primitive, each wrapping that
//! module's own error enum.

use crate::snapshot::SnapshotError;
use crate::store::StoreError;
use crate::trace::TraceError;
use crate::tx::TxError;
use crate::vm::{InvalidGuest, VmError};

/// Any error snapvm returns. Match on the variant to reach the module's own
/// error type, or use the module error directly where only one primitive is
/// involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A VM failed to start, a guest failed, or KVM refused something.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A snapshot could not be taken, saved, loaded or restored.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The convergent store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A transaction did not succeed.
    #[error(transparent)]
    Tx(#[from] TxError),
    /// The trace cache failed.
    #[error(transparent)]
    Trace(#[from] TraceError),
}

impl From<InvalidGuest> for Error {
    fn from(e: InvalidGuest) -> Self {
        Self::Vm(VmError::InvalidGuest(e))
    }
}

impl Error {
    /// What kind of failure this is (see [`crate::ErrorKind`]).
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            Self::Vm(e) => e.kind(),
            Self::Snapshot(e) => e.kind(),
            Self::Store(e) => e.kind(),
            Self::Tx(e) => e.kind(),
            Self::Trace(e) => e.kind(),
        }
    }

    /// The VM error inside, if this is (or wraps) a VM failure.
    pub fn vm_error(&self) -> Option<&VmError> {
        match self {
            Self::Vm(e) => Some(e),
            Self::Snapshot(e) => e.vm_error(),
            Self::Store(_) | Self::Trace(_) => None,
            Self::Tx(e) => e.vm_error(),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
