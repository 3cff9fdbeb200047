//! userfaultfd: guest memory whose pages are filled by a handler thread on
//! first touch (restore straight from a store, see `snapshot::ondemand`),
//! and the state that turns a failed fill into a poisoned VM.
//!
//! The userfaultfd itself is `sys::uffd`'s. Faults from KVM (the vCPU
//! touching guest memory) reach the handler like faults from host code; a
//! signal to the vCPU thread (the interrupt kick) makes a `KVM_RUN` that
//! waits on a fault return `EINTR` without the guest seeing the page.

use std::error::Error as StdError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::{InterruptHandle, VmError};

/// Why a VM's memory could not be filled: set once by the thread that
/// fills it, checked by the VM before and after every entry into the guest
/// and before any exit is served.
#[derive(Default)]
pub(crate) struct MemoryFault {
    failed: AtomicBool,
    error: OnceLock<(u64, Arc<dyn StdError + Send + Sync>)>,
    interrupt: Mutex<Option<InterruptHandle>>,
}

impl std::fmt::Debug for MemoryFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryFault")
            .field("failed", &self.failed.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl MemoryFault {
    /// Records the failure (the first one wins) and kicks the vCPU out of
    /// the guest. Done before the faulting access is woken, so the VM sees
    /// the flag before anything the guest computes from the stand-in page.
    pub(crate) fn fail(&self, page: u64, error: Arc<dyn StdError + Send + Sync>) {
        let _ = self.error.set((page, error));
        self.failed.store(true, Ordering::SeqCst);
        let handle = self
            .interrupt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(h) = handle {
            h.interrupt();
        }
    }

    /// Whether the memory failed.
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// The error for a VM whose memory failed.
    pub(crate) fn check(&self) -> Result<(), VmError> {
        if !self.failed() {
            return Ok(());
        }
        let (page, source) = self.error.get().cloned().expect("set before the flag");
        Err(VmError::MemoryUnavailable { page, source })
    }

    /// The handle that kicks the VM's vCPU when the memory fails.
    pub(crate) fn set_interrupt(&self, handle: InterruptHandle) {
        *self.interrupt.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
    }
}
