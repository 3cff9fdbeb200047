//! Guest profiles as a VM feature: the `TraceExport` and `TraceImport`
//! hypercalls, served through the core's extension hooks (the VM's profile
//! methods are in `instance`) — blobs a guest
//! carries to later environments of the same code and tenant, through the
//! [`ProfileScope`]'s [`TraceCache`](super::TraceCache).
//!
//! Everything the guest says is untrusted: its buffers are checked against
//! what the guest could reach itself, an export over
//! [`VmConfig::max_profile`] is refused before a byte is copied, and a
//! stored blob over the limit is never offered (a cache shared with VMs of
//! a larger limit, or a tampered one).

use super::{CodeId, ProfileScope, TraceKey};
use crate::abi::{self, Hypercall};
use crate::vm::{CallContext, Setting, VmConfig, VmError};

impl Setting for ProfileScope {}

impl<D> VmConfig<D> {
    /// Keeps the guest's profiles (`snapvm_guest::trace`) in `scope`'s
    /// cache, for its tenant: what a VM exports is offered to later VMs of
    /// the same tenant, code and runtime version (see [`ProfileScope`] and
    /// `docs/trace.md`). Without it the guest's exports are refused and its
    /// imports find nothing.
    pub fn profiles(mut self, scope: ProfileScope) -> Self {
        self.ext.set(scope);
        self
    }
}

/// A VM's profile feature.
#[derive(Clone, Debug, Default)]
pub(crate) struct ProfileExt {
    /// Where profiles go; `None`: the hypercalls answer `TRACE_UNAVAILABLE`.
    pub(crate) scope: Option<ProfileScope>,
    /// A blob an import found too large for the guest's buffer, kept with
    /// its key for the guest's second import (bounded by the profile limit).
    pub(crate) pending: Option<(TraceKey, Vec<u8>)>,
}

/// The code identity of a VM running the program with `digest`, restored
/// from `origin` (or booted).
pub(crate) fn code_id(digest: &[u8; 32], origin: Option<crate::vm::SnapshotId>) -> CodeId {
    match origin {
        Some(id) => CodeId::of(digest, id),
        None => CodeId::booted(digest),
    }
}

impl ProfileExt {
    /// The state of a VM built or restored with `config`.
    pub(crate) fn open<D>(config: &VmConfig<D>) -> Self {
        Self {
            scope: config.ext.get::<ProfileScope>().cloned(),
            pending: None,
        }
    }

    /// Serves the profile hypercalls; `None` for any other.
    pub(crate) fn hypercall(
        &mut self,
        nr: Hypercall,
        cx: &mut CallContext<'_>,
    ) -> Option<Result<(), VmError>> {
        match nr {
            Hypercall::TraceExport => Some(self.export(cx)),
            Hypercall::TraceImport => Some(self.import(cx)),
            _ => None,
        }
    }

    fn key(scope: &ProfileScope, cx: &CallContext<'_>) -> TraceKey {
        scope.key(code_id(cx.program_digest(), cx.origin()), cx.function())
    }

    /// `TraceExport`: `args = [ptr, len]`, `ret = [status]`.
    fn export(&mut self, cx: &mut CallContext<'_>) -> Result<(), VmError> {
        let [ptr, len] = cx.args::<2>()?;
        cx.check_user(ptr, len)?;
        let Some(scope) = self.scope.as_ref() else {
            return cx.ret(&[abi::TRACE_UNAVAILABLE]);
        };
        let limit = cx.profile_limit();
        if len > limit {
            log::warn!(
                target: "snapvm::trace",
                "guest profile of {len} bytes exceeds the {limit}-byte limit; not stored"
            );
            return cx.ret(&[abi::TRACE_TOO_LARGE]);
        }
        let blob = cx.read_vec(ptr, len)?;
        let key = Self::key(scope, cx);
        let status = match scope.cache().put(&key, &blob) {
            Ok(()) => abi::TRACE_OK,
            Err(e) => {
                log::warn!(target: "snapvm::trace", "storing a guest profile failed: {e}");
                abi::TRACE_UNAVAILABLE
            }
        };
        cx.ret(&[status])
    }

    /// `TraceImport`: `args = [ptr, cap]`, `ret = [status, len]`.
    fn import(&mut self, cx: &mut CallContext<'_>) -> Result<(), VmError> {
        let [ptr, cap] = cx.args::<2>()?;
        cx.check_user(ptr, cap)?;
        let Some(scope) = self.scope.as_ref() else {
            return cx.ret(&[abi::TRACE_UNAVAILABLE, 0]);
        };
        let key = Self::key(scope, cx);
        let blob = match self.pending.take() {
            // The blob the previous import announced, if it was for the same
            // function and tenant and now fits.
            Some((pending, blob)) if pending == key && blob.len() as u64 <= cap => Some(blob),
            _ => scope.cache().get(&key),
        };
        let limit = cx.profile_limit();
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
            return cx.ret(&[abi::TRACE_NONE, 0]);
        };
        let len = blob.len() as u64;
        if len > cap {
            self.pending = Some((key, blob));
            return cx.ret(&[abi::TRACE_TOO_SMALL, len]);
        }
        cx.write(ptr, &blob)?;
        cx.ret(&[abi::TRACE_OK, len])
    }
}
