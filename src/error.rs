//! The crate-level error: one variant per primitive, each wrapping that
//! module's own error enum.

use crate::vm::VmError;

/// Any error snapvm returns. Match on the variant to reach the module's own
/// error type, or use the module error directly where only one primitive is
/// involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A VM failed to start, a guest failed, or KVM refused something.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
