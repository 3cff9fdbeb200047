//! [`ErrorKind`]: one classification for every snapvm error, so an
//! executor maps `invoke`, `restore`, `ManagedVm::invoke` and
//! `ShellPool::restore` failures the same way (to an HTTP status, a retry
//! decision, a metric label).

/// What kind of failure an error is. Every error type of snapvm has a
/// `kind()` ([`crate::Error::kind`], [`crate::VmError::kind`],
/// [`crate::SnapshotError::kind`], [`crate::StoreError::kind`],
/// [`crate::trace::TraceError::kind`]) and a
/// `vm_error()` that reaches the [`VmError`](crate::VmError) inside, if
/// any, so one `match` serves them all.
///
/// ```
/// use snapvm::{ErrorKind, VmError};
///
/// fn status(kind: ErrorKind) -> u16 {
///     match kind {
///         ErrorKind::BadRequest | ErrorKind::GuestError => 400,
///         ErrorKind::Timeout => 504,
///         ErrorKind::Cancelled => 499,
///         ErrorKind::GuestCrash | ErrorKind::Poisoned => 500,
///         _ => 503,
///     }
/// }
/// let err = VmError::UnknownFunction { name: "nope".into() };
/// assert_eq!(status(err.kind()), 400);
/// assert_eq!(status(snapvm::Error::from(err).kind()), 400);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The guest crashed or broke the protocol: a panic, abort, CPU fault,
    /// triple fault, out-of-memory, bad or unknown hypercall, unexpected
    /// exit. The VM is poisoned; a reset recovers it.
    GuestCrash,
    /// A guest function returned an error of its own
    /// ([`VmError::GuestError`](crate::VmError::GuestError)). The VM is ready.
    GuestError,
    /// The call ran out of time. The VM is poisoned.
    Timeout,
    /// The call was stopped by an
    /// [`InterruptHandle`](crate::vm::InterruptHandle). The VM is poisoned.
    Cancelled,
    /// The request was wrong: an unknown function, an input or output over
    /// a limit, a buffer too small, a value that does not encode or decode.
    /// The VM is ready.
    BadRequest,
    /// The VM was already poisoned by an earlier error.
    Poisoned,
    /// Invalid input given to snapvm rather than to the guest: a config, a
    /// guest program, a snapshot or manifest that is malformed, corrupt, or
    /// does not fit this VM or CPU.
    Invalid,
    /// The host failed: KVM, memory, entropy, timers, I/O, a host function
    /// that panicked, a storage backend.
    Host,
}
