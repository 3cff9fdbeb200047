//! The guest-profile hypercalls (`TraceExport`, `TraceImport`): blobs a
//! guest carries to later environments of the same code and tenant,
//! through the [`ProfileScope`]'s [`TraceCache`](crate::trace::TraceCache).
//!
//! Everything the guest says is untrusted: its buffers are checked with
//! [`check_user_range`], an export over [`VmConfig::max_profile`] is refused
//! before a byte is copied, and a stored blob over the limit is never
//! offered (a cache shared with VMs of a larger limit, or a tampered one).
//!
//! [`VmConfig::max_profile`]: super::VmConfig::max_profile

use super::abi_page::{bad, check_user_range, ARGS, RET};
use super::error::VmError;
use super::persist::SnapshotId;
use super::VmInstance;
use crate::abi;
use crate::trace::{CodeId, ProfileScope, TraceKey};

/// A VM's profile state.
#[derive(Clone, Debug, Default)]
pub(crate) struct Profiles {
    /// Where profiles go; `None`: the hypercalls answer `TRACE_UNAVAILABLE`.
    pub(crate) scope: Option<ProfileScope>,
    /// The snapshot this VM's state came from (restored, or reset to);
    /// `None` for a VM booted from its program.
    pub(crate) origin: Option<SnapshotId>,
    /// A blob an import found too large for the guest's buffer, kept with
    /// its key for the guest's second import (bounded by the profile limit).
    pending: Option<(TraceKey, Vec<u8>)>,
}

impl Profiles {
    /// The state of a new VM: profiles go to `scope`; booted, not restored.
    pub(crate) fn new(scope: Option<ProfileScope>) -> Self {
        Self {
            scope,
            ..Self::default()
        }
    }
}

impl VmInstance {
    /// The code identity profiles of this VM are keyed by.
    pub fn code_id(&self) -> CodeId {
        match self.profiles.origin {
            Some(id) => CodeId::of(self.program_digest(), id),
            None => CodeId::booted(self.program_digest()),
        }
    }

    /// Sets (or clears) where this VM's guest profiles are kept, replacing
    /// the config's [`VmConfig::profiles`](super::VmConfig::profiles):
    /// for a VM restored from a shared pool for one tenant.
    pub fn set_profiles(&mut self, scope: Option<ProfileScope>) {
        self.profiles.scope = scope;
        self.profiles.pending = None;
    }

    fn profile_key(&self, scope: &ProfileScope) -> TraceKey {
        let function =
            super::hypercall::current_function_name(&self.functions, self.current_function);
        scope.key(self.code_id(), function)
    }

    /// `TraceExport`: `args = [ptr, len]`, `ret = [status]`.
    pub(super) fn hypercall_trace_export(&mut self) -> Result<(), VmError> {
        let [ptr, len] = self.read_words::<2>(ARGS)?;
        check_user_range(self.memory_size(), ptr, len).map_err(|e| bad("TraceExport", e))?;
        let Some(scope) = self.profiles.scope.clone() else {
            return self.write_words(RET, &[abi::TRACE_UNAVAILABLE]);
        };
        let limit = self.limits.profile;
        if len > limit {
            log::warn!(
                target: "snapvm::trace",
                "guest profile of {len} bytes exceeds the {limit}-byte limit; not stored"
            );
            return self.write_words(RET, &[abi::TRACE_TOO_LARGE]);
        }
        let blob = self
            .machine
            .ram
            .read_vec(ptr, len)
            .map_err(|e| bad("TraceExport", e.into()))?;
        let key = self.profile_key(&scope);
        let status = match scope.cache().put(&key, &blob) {
            Ok(()) => abi::TRACE_OK,
            Err(e) => {
                log::warn!(target: "snapvm::trace", "storing a guest profile failed: {e}");
                abi::TRACE_UNAVAILABLE
            }
        };
        self.write_words(RET, &[status])
    }

    /// `TraceImport`: `args = [ptr, cap]`, `ret = [status, len]`.
    pub(super) fn hypercall_trace_import(&mut self) -> Result<(), VmError> {
        let [ptr, cap] = self.read_words::<2>(ARGS)?;
        check_user_range(self.memory_size(), ptr, cap).map_err(|e| bad("TraceImport", e))?;
        let Some(scope) = self.profiles.scope.clone() else {
            return self.write_words(RET, &[abi::TRACE_UNAVAILABLE, 0]);
        };
        let key = self.profile_key(&scope);
        let blob = match self.profiles.pending.take() {
            // The blob the previous import announced, if it was for the same
            // function and tenant and now fits.
            Some((pending, blob)) if pending == key && blob.len() as u64 <= cap => Some(blob),
            _ => scope.cache().get(&key),
        };
        let limit = self.limits.profile;
        let blob = match blob {
            Some(blob) if blob.len() as u64 > limit => {
                log::warn!(
                    target: "snapvm::trace",
                    "stored guest profile of {} bytes exceeds the {limit}-byte limit; not offered",
                    blob.len()
                );
                None
            }
            other => other,
        };
        let Some(blob) = blob else {
            return self.write_words(RET, &[abi::TRACE_NONE, 0]);
        };
        let len = blob.len() as u64;
        if len > cap {
            self.profiles.pending = Some((key, blob));
            return self.write_words(RET, &[abi::TRACE_TOO_SMALL, len]);
        }
        self.machine
            .ram
            .write(ptr, &blob)
            .map_err(|e| bad("TraceImport", e.into()))?;
        self.note_host_write(ptr, len);
        self.write_words(RET, &[abi::TRACE_OK, len])
    }
}
