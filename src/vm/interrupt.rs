//! [`InterruptHandle`]: stop a running call from another thread.
//!
//! The vCPU thread's timeout timer (see `timer.rs`) doubles as the kick:
//! `interrupt` sets a flag and makes that timer fire at once and then every
//! millisecond, so `KVM_RUN` returns `EINTR` whether the vCPU was in the
//! guest or about to enter it; the run loop sees the flag and ends the call
//! with [`VmError::Cancelled`](super::VmError::Cancelled).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::timer::{self, TimerId};
use super::VmError;

/// How often the kick repeats until the vCPU thread notices it.
const KICK_INTERVAL: Duration = Duration::from_millis(1);

#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// An interrupt was asked for during the current run.
    requested: AtomicBool,
    /// The timer of the thread inside a run of this VM, while it is.
    running: Mutex<Option<TimerId>>,
    /// The kick fired during the current run (the timer needs disarming
    /// even when the call has no timeout).
    kicked: AtomicBool,
}

impl Shared {
    fn running(&self) -> MutexGuard<'_, Option<TimerId>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the calling thread as running this VM until the guard is
    /// dropped. An interrupt asked for before this point is forgotten.
    pub(crate) fn enter(self: &Arc<Self>) -> Result<Running, VmError> {
        let id = timer::current().map_err(VmError::Timer)?;
        let mut running = self.running();
        self.requested.store(false, Ordering::SeqCst);
        self.kicked.store(false, Ordering::SeqCst);
        *running = Some(id);
        Ok(Running(Arc::clone(self)))
    }

    /// Whether an interrupt was asked for during this run.
    pub(crate) fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}

/// A thread inside a run; see [`Shared::enter`].
pub(crate) struct Running(Arc<Shared>);

impl Drop for Running {
    fn drop(&mut self) {
        *self.0.running() = None;
        if self.0.kicked.swap(false, Ordering::SeqCst) {
            timer::disarm();
        }
    }
}

/// Stops a running call of one [`VmInstance`](super::VmInstance) from any
/// thread: a request whose client hung up, a shutdown. Cheap to clone,
/// `Send + Sync`; get one with
/// [`VmInstance::interrupt_handle`](super::VmInstance::interrupt_handle).
///
/// The interrupted call returns [`VmError::Cancelled`], which poisons the
/// VM (the guest stopped mid-call); `restore_in_place` (or a `ManagedVm`
/// reset) makes it usable again. If no call is running, `interrupt` does
/// nothing: it never cancels a later call. The vCPU leaves the guest within
/// about a millisecond; a host function that is running when the interrupt
/// arrives finishes first (its system calls may see the signal, which is
/// installed with `SA_RESTART`).
///
/// ```no_run
/// use snapvm::{GuestProgram, VmConfig, VmError, VmInstance};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = VmConfig::new(GuestProgram::from_file("guest.elf")?);
/// let mut vm = VmInstance::new(&config)?;
/// let handle = vm.interrupt_handle();
/// std::thread::spawn(move || {
///     std::thread::sleep(std::time::Duration::from_millis(50));
///     handle.interrupt(); // the client went away
/// });
/// match vm.invoke("slow", b"") {
///     Err(VmError::Cancelled) => { /* reset the VM before reusing it */ }
///     other => { other?; }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct InterruptHandle {
    pub(crate) shared: Arc<Shared>,
}

impl InterruptHandle {
    /// Stops the call that is running now, if any (see the type's docs).
    pub fn interrupt(&self) {
        let running = self.shared.running();
        if let Some(id) = *running {
            self.shared.requested.store(true, Ordering::SeqCst);
            self.shared.kicked.store(true, Ordering::SeqCst);
            // A failure here leaves the flag set: the call still ends at its
            // next exit, or at its deadline.
            let _ = id.fire_now(KICK_INTERVAL);
        }
    }
}
