//! Guest profiles: blobs a guest hands to later environments of the same
//! code and tenant (see `docs/trace.md`).
//!
//! A guest that does expensive work — compiling scripts, patterns or
//! queries — exports the result with [`export`]; the host keeps the newest
//! blob per function (init counts as a function named `(init)`), tenant
//! and code version, and the next environment [`import`]s it instead of
//! redoing the work. The host offers a blob only to the tenant and code
//! that exported it, but the bytes are untrusted all the same (they come
//! from an earlier run of the same code, through the host's storage):
//! validate them before use, and fall back to doing the work.
//!
//! ```ignore
//! fn init(exports: &mut snapvm_guest::Exports) {
//!     let compiled = match snapvm_guest::trace::import().and_then(|b| parse(&b)) {
//!         Some(c) => c,
//!         None => {
//!             let c = compile();
//!             let _ = snapvm_guest::trace::export(&c.to_bytes());
//!             c
//!         }
//!     };
//!     // ...
//! }
//! ```

use super::{hypercall, ret, set_arg, Vec};
use crate::abi::{self, Hypercall};

/// Largest blob [`import`] accepts (the host's own limit,
/// `VmConfig::max_profile`, is usually lower).
pub const MAX_IMPORT: usize = 64 << 20;

/// Why [`export`] did not store a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExportError {
    /// The blob exceeds the VM's profile size limit.
    TooLarge,
    /// The host keeps no profiles for this VM, or failed to store the blob.
    Unavailable,
    /// The host answered with an unknown status.
    Protocol(u64),
}

/// Offers `bytes` to later environments of the same code and tenant, as
/// the profile of the function running now (`(init)` during init). It
/// replaces any blob stored earlier for that function.
pub fn export(bytes: &[u8]) -> Result<(), ExportError> {
    set_arg(0, bytes.as_ptr() as u64);
    set_arg(1, bytes.len() as u64);
    hypercall(Hypercall::TraceExport);
    match ret(0) {
        abi::TRACE_OK => Ok(()),
        abi::TRACE_TOO_LARGE => Err(ExportError::TooLarge),
        abi::TRACE_UNAVAILABLE => Err(ExportError::Unavailable),
        other => Err(ExportError::Protocol(other)),
    }
}

/// The newest blob an earlier environment of the same code and tenant
/// exported for the function running now (`(init)` during init), or `None`
/// if there is none, if it is larger than [`MAX_IMPORT`], or if the guest
/// cannot allocate room for it. The bytes are untrusted: validate them.
pub fn import() -> Option<Vec<u8>> {
    import_max(MAX_IMPORT)
}

/// Like [`import`], for blobs of at most `max_len` bytes. The length the
/// host reports is checked against `max_len` before anything is allocated.
pub fn import_max(max_len: usize) -> Option<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::new();
    // The blob can be replaced between the two exits (another environment
    // exported a newer one): retry a few times with the new length.
    for _ in 0..4 {
        set_arg(0, buf.as_mut_ptr() as u64);
        set_arg(1, buf.len() as u64);
        hypercall(Hypercall::TraceImport);
        let (status, len) = (ret(0), ret(1));
        match status {
            abi::TRACE_OK if len <= buf.len() as u64 => {
                buf.truncate(len as usize);
                return Some(buf);
            }
            abi::TRACE_TOO_SMALL if len > buf.len() as u64 && len <= max_len as u64 => {
                let len = len as usize;
                buf.clear();
                buf.try_reserve_exact(len).ok()?;
                buf.resize(len, 0);
            }
            _ => return None,
        }
    }
    None
}
