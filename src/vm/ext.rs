//! The one interface features plug into the core through.
//!
//! The core ([`Vm`](super::Vm)) runs guest code, serves the hypercalls of
//! the call protocol (ready, done, log, host calls, preserve, panic, abort,
//! out of memory, polling) and keeps the VM's memory, vCPU and dirty pages.
//! Everything else — networking, guest profiles — is an [`Extension`]: the
//! core calls its hooks and it owns its state. The core is generic over its
//! extension set, so the hooks are static calls, never `dyn`; the crate
//! builds its VMs with one set (`snapvm::VmInstance`).
//!
//! A hook gets a [`CallContext`]: the hypercall's arguments and result
//! words, guest memory only through the guest-rights check (what CPL3 code
//! could reach itself), the call's limits and its deadline.

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::abi_page::{bad, check_user_range, ram_words, read_str, ARGS, RET};
use super::config::GuestLimits;
use super::dirty::DirtyTracker;
use super::error::{HypercallFault, VmError};
use super::hypercall::Deadline;
use super::{interrupt, timer, Checkpoint, SnapshotId, VmConfig};
use crate::abi::Hypercall;
use crate::sys::memory::GuestRam;

pub(crate) mod sealed {
    /// Only the crate's own extension sets implement [`super::Extension`].
    pub trait Sealed {}
}

/// A set of features plugged into the VM core (see the module docs).
///
/// Sealed: snapvm builds every VM with its own set (the
/// [`VmInstance`](crate::VmInstance) alias); the trait is public only
/// because the core's methods name it.
pub trait Extension: sealed::Sealed + Send + Sized + 'static {
    /// The extension state of a VM built or restored with `config`.
    #[doc(hidden)]
    fn open<D>(config: &VmConfig<D>) -> Result<Self, VmError>;

    /// A call starts (through an exit or posted to a polling guest).
    #[doc(hidden)]
    fn call_start(&mut self) {}

    /// Whether the call may end now; an error fails it (checked when the
    /// guest answers, and after every hypercall of a polled call).
    #[doc(hidden)]
    fn call_end(&self) -> Result<(), VmError> {
        Ok(())
    }

    /// Whether calls to deferred host functions are to be held back
    /// ([`Self::defer_host_call`]) instead of run now.
    #[doc(hidden)]
    fn defers_host_calls(&self) -> bool {
        false
    }

    /// Holds back a call to deferred host function `name` (its input at
    /// most `limit` bytes in all); returns the status and result the guest
    /// gets now.
    #[doc(hidden)]
    fn defer_host_call(&mut self, name: String, input: Vec<u8>, limit: u64) -> (u64, Vec<u8>) {
        let _ = (name, input, limit);
        (crate::abi::HOST_CALL_FAILED, Vec::new())
    }

    /// The checkpoint a hypercall asked for
    /// ([`CallContext::request_checkpoint`]).
    #[doc(hidden)]
    fn checkpoint_taken(&mut self, checkpoint: Checkpoint) {
        drop(checkpoint);
    }

    /// Serves hypercall `nr`, which the core does not own; `None` if no
    /// extension owns it either (the core then fails the call with
    /// `UnknownHypercall`).
    #[doc(hidden)]
    fn hypercall(&mut self, nr: Hypercall, cx: &mut CallContext<'_>)
        -> Option<Result<(), VmError>>;

    /// The VM's memory and vCPU are about to be replaced (a restore in
    /// place, a policy reset, a pooled VM handed to its next user).
    #[doc(hidden)]
    fn before_reset(&mut self) {}
}

/// What an extension may see and do while it serves a hypercall. Every
/// guest address it passes is checked against what the guest could reach
/// at CPL3; every host write is recorded for dirty tracking.
pub struct CallContext<'a> {
    pub(super) ram: &'a GuestRam,
    pub(super) limits: &'a GuestLimits,
    pub(super) deadline: &'a mut Option<Deadline>,
    pub(super) polled_deadline: Option<Instant>,
    pub(super) dirty: Option<&'a mut DirtyTracker>,
    pub(super) interrupt: &'a interrupt::Shared,
    /// The function table and the index being called, for
    /// [`Self::function`] (looked up only when a hook asks: a name search,
    /// kept off the network's per-exchange path).
    pub(super) functions: &'a HashMap<String, u64>,
    pub(super) current_function: Option<u64>,
    pub(super) program_digest: &'a [u8; 32],
    pub(super) origin: Option<SnapshotId>,
    pub(super) hypercall: &'static str,
    pub(super) checkpoint: bool,
}

impl std::fmt::Debug for CallContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallContext")
            .field("hypercall", &self.hypercall)
            .field("function", &self.function())
            .finish_non_exhaustive()
    }
}

impl CallContext<'_> {
    /// The hypercall's first `N` argument words.
    pub(crate) fn args<const N: usize>(&self) -> Result<[u64; N], VmError> {
        ram_words(self.ram, ARGS)
    }

    /// Writes the hypercall's result words.
    pub(crate) fn ret(&mut self, words: &[u64]) -> Result<(), VmError> {
        let mut bytes = [0u8; 8 * 32];
        let len = words.len() * 8;
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        self.ram
            .write(RET, &bytes[..len])
            .map_err(|e| bad("ABI page", e.into()))
    }

    /// A guest-rights check of `len` bytes at `addr`.
    pub(crate) fn check_user(&self, addr: u64, len: u64) -> Result<(), VmError> {
        check_user_range(self.ram.size(), addr, len).map_err(|e| bad(self.hypercall, e))
    }

    /// Fails the hypercall as malformed.
    pub(crate) fn bad(&self, reason: HypercallFault) -> VmError {
        bad(self.hypercall, reason)
    }

    /// Copies `buf.len()` guest bytes at `addr` (checked) into `buf`.
    pub(crate) fn read_into(&self, addr: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.check_user(addr, buf.len() as u64)?;
        self.ram
            .read(addr, buf)
            .map_err(|e| bad(self.hypercall, e.into()))
    }

    /// Copies `len` guest bytes at `addr` (checked); the caller bounds
    /// `len` by a limit first.
    pub(crate) fn read_vec(&self, addr: u64, len: u64) -> Result<Vec<u8>, VmError> {
        self.check_user(addr, len)?;
        self.ram
            .read_vec(addr, len)
            .map_err(|e| bad(self.hypercall, e.into()))
    }

    /// Reads a guest string of at most `limit` bytes (checked; invalid
    /// UTF-8 replaced).
    pub(crate) fn read_text(&self, addr: u64, len: u64, limit: u64) -> Result<String, VmError> {
        self.check_user(addr, len)?;
        let len = len.min(limit);
        read_str(self.ram, addr, len, len, true).map_err(|e| bad(self.hypercall, e))
    }

    /// Writes `bytes` to guest memory at `addr` (checked), recorded for
    /// dirty tracking.
    pub(crate) fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), VmError> {
        self.check_user(addr, bytes.len() as u64)?;
        self.ram
            .write(addr, bytes)
            .map_err(|e| bad(self.hypercall, e.into()))?;
        if let Some(dirty) = self.dirty.as_deref_mut() {
            dirty.note_host_write(addr, bytes.len() as u64);
        }
        Ok(())
    }

    /// Asks the core for a checkpoint of the call once this hypercall was
    /// served, if the VM can take one (it tracks written pages against a
    /// base snapshot); it arrives through [`Extension::checkpoint_taken`].
    pub(crate) fn request_checkpoint(&mut self) {
        self.checkpoint = true;
    }

    /// The limit on one guest message (log line, abort reason).
    pub(crate) fn message_limit(&self) -> u64 {
        self.limits.message
    }

    /// The limit on one guest profile blob.
    pub(crate) fn profile_limit(&self) -> u64 {
        self.limits.profile
    }

    /// The exported function being called (`"(init)"` in init).
    pub(crate) fn function(&self) -> &str {
        super::hypercall::current_function_name(self.functions, self.current_function)
    }

    /// SHA-256 of the guest program.
    pub(crate) fn program_digest(&self) -> &[u8; 32] {
        self.program_digest
    }

    /// The snapshot the VM was last restored from or rewound to.
    pub(crate) fn origin(&self) -> Option<SnapshotId> {
        self.origin
    }

    /// When the call times out at the earliest, if it has a limit.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
            .as_ref()
            .map(|d| d.at)
            .or(self.polled_deadline)
    }

    /// Whether the call was cancelled.
    pub(crate) fn interrupted(&self) -> bool {
        self.interrupt.requested()
    }

    /// Checks the call's limit after a wait: fails with
    /// [`VmError::Timeout`] once it is reached, and re-arms the timer when
    /// a CPU-time limit was pushed back.
    pub(crate) fn check_deadline(&mut self) -> Result<(), VmError> {
        if let Some(d) = self.deadline.as_mut() {
            if Instant::now() >= d.at {
                let before = d.at;
                let left = d.check()?;
                if d.at != before {
                    timer::arm(left).map_err(VmError::Timer)?;
                }
            }
        }
        Ok(())
    }

    /// At most `wait`, cut to the time left before the call's deadline.
    pub(crate) fn bounded_wait(&self, wait: Duration) -> Duration {
        match self.deadline() {
            Some(at) => wait.min(at.saturating_duration_since(Instant::now())),
            None => wait,
        }
    }
}

/// The extensions' settings in a [`VmConfig`], one per type (set by the
/// features' own builder methods, such as `VmConfig::network`).
#[derive(Clone, Default)]
pub(crate) struct ExtSettings {
    map: BTreeMap<TypeIdKey, Arc<dyn Setting>>,
}

/// A `TypeId` with an order (for a map printed in a stable order).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct TypeIdKey(TypeId);

/// One extension's settings in a [`VmConfig`].
pub(crate) trait Setting: AsAny + Send + Sync + std::fmt::Debug {
    /// Checks the settings (when a VM is built or restored, before any
    /// KVM object is created).
    fn validate(&self) -> Result<(), VmError> {
        Ok(())
    }
}

/// `self` as `dyn Any`, to downcast a [`Setting`].
pub(crate) trait AsAny: Any {
    fn as_any(&self) -> &dyn Any;
}

impl<T: Any> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl ExtSettings {
    /// Sets (replaces) the setting of type `T`.
    pub(crate) fn set<T: Setting>(&mut self, value: T) {
        self.map
            .insert(TypeIdKey(TypeId::of::<T>()), Arc::new(value));
    }

    /// Checks every setting.
    pub(crate) fn validate(&self) -> Result<(), VmError> {
        self.map.values().try_for_each(|s| s.validate())
    }

    /// The setting of type `T`, if set.
    pub(crate) fn get<T: Setting>(&self) -> Option<&T> {
        self.map
            .get(&TypeIdKey(TypeId::of::<T>()))
            .and_then(|s| (**s).as_any().downcast_ref())
    }
}

impl std::fmt::Debug for ExtSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.map.values()).finish()
    }
}

/// The name of hypercall `nr` in error messages.
pub(super) fn hypercall_name(nr: Hypercall) -> &'static str {
    match nr {
        Hypercall::TxBegin => "TxBegin",
        Hypercall::TxEnd => "TxEnd",
        Hypercall::TraceExport => "TraceExport",
        Hypercall::TraceImport => "TraceImport",
        Hypercall::NetInfo => "NetInfo",
        Hypercall::NetExchange => "NetExchange",
        _ => "hypercall",
    }
}
