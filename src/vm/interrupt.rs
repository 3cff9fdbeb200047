//! [`InterruptHandle`]: stop a running call from another thread.
//!
//! The vCPU thread's timeout timer (see `timer.rs`) doubles as the kick:
//! `interrupt` sets a flag and makes that timer fire at once and then every
//! millisecond, so `KVM_RUN` returns `EINTR` whether the vCPU was in the
//! guest or about to enter it; the run loop sees the flag and ends the call
//! with [`VmError::Cancelled`](super::VmError::Cancelled).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    running: Mutex<RunningTimer>,
    /// The kick fired during the current run (the timer needs disarming
    /// even when the call has no timeout).
    kicked: AtomicBool,
    /// The call a [`CancelToken`] is bound to (0: none), and the one a
    /// token cancelled. Unlike `requested`, a run's start does not clear
    /// them: a cancel between the call's start and its guest running is
    /// kept.
    call: AtomicU64,
    cancelled_call: AtomicU64,
    /// Numbers the calls tokens are bound to.
    next_call: AtomicU64,
}

/// The timer of the thread that last ran this VM, kept after the run so
/// that the next run on the same thread takes no new handle to it.
#[derive(Debug, Default)]
struct RunningTimer {
    timer: Option<TimerId>,
    /// That thread is inside a run now.
    inside: bool,
}

impl RunningTimer {
    /// The timer of the thread inside a run, if one is.
    fn current(&self) -> Option<&TimerId> {
        self.timer.as_ref().filter(|_| self.inside)
    }
}

impl Shared {
    fn running(&self) -> MutexGuard<'_, RunningTimer> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the calling thread as running this VM until the guard is
    /// dropped. An interrupt asked for before this point is forgotten.
    pub(crate) fn enter(self: &Arc<Self>) -> Result<Running, VmError> {
        let mut running = self.running();
        timer::with_current(|id| {
            if !running.timer.as_ref().is_some_and(|t| t.same(id)) {
                running.timer = Some(id.clone());
            }
        })
        .map_err(VmError::Timer)?;
        self.requested.store(false, Ordering::SeqCst);
        self.kicked.store(false, Ordering::SeqCst);
        running.inside = true;
        Ok(Running(Arc::clone(self)))
    }

    /// Whether an interrupt was asked for during this run, or the call
    /// being served was cancelled through its token.
    pub(crate) fn requested(&self) -> bool {
        if self.requested.load(Ordering::SeqCst) {
            return true;
        }
        let call = self.call.load(Ordering::SeqCst);
        call != 0 && self.cancelled_call.load(Ordering::SeqCst) == call
    }

    /// Kicks the thread running this VM, if one is: it leaves the guest
    /// within about a millisecond (the kick repeats until it notices).
    /// `run_wide`: the whole run stops ([`InterruptHandle::interrupt`]);
    /// otherwise only the call a token cancelled does (`cancelled_call`),
    /// so a kick that lands after that call ended stops nothing else.
    fn kick(&self, running: &RunningTimer, run_wide: bool) {
        if let Some(id) = running.current() {
            if run_wide {
                self.requested.store(true, Ordering::SeqCst);
            }
            self.kicked.store(true, Ordering::SeqCst);
            // A failure here leaves the flag set: the call still ends at its
            // next exit, or at its deadline.
            let _ = id.fire_now(KICK_INTERVAL);
        }
    }
}

/// A thread inside a run; see [`Shared::enter`].
pub(crate) struct Running(Arc<Shared>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running().inside = false;
        if self.0.kicked.swap(false, Ordering::SeqCst) {
            timer::disarm();
        }
    }
}

/// Stops a running call of one [`VmInstance`](crate::VmInstance) from any
/// thread: a request whose client hung up, a shutdown. Cheap to clone,
/// `Send + Sync`; get one with
/// [`VmInstance::interrupt_handle`](crate::vm::Vm::interrupt_handle).
///
/// The interrupted call returns [`VmError::Cancelled`], which poisons the
/// VM (the guest stopped mid-call); `restore_in_place` (or a `ManagedVm`
/// reset) makes it usable again. If no call is running, `interrupt` does
/// nothing: an interrupt sent while a call is still starting is lost, and
/// a handle kept after its request ended stops whatever call the VM runs
/// then. To cancel one particular call, use a [`CancelToken`] instead. The vCPU leaves the guest within
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
        self.shared.kick(&running, true);
    }
}

/// Cancels one call, and only that call: the per-call counterpart of
/// [`InterruptHandle`]. Create one, give it to the call
/// ([`VmInstance::invoke_cancellable`](crate::vm::Vm::invoke_cancellable),
/// [`ManagedVm::invoke_cancellable`](crate::policy::ManagedVm::invoke_cancellable),
/// [`PollingVm::invoke_cancellable`](crate::policy::PollingVm::invoke_cancellable)),
/// and [`cancel`](Self::cancel) it from any thread.
///
/// Unlike an interrupt, a cancel is never lost: one made before the call
/// reaches the guest (even before the call starts) stops the call before
/// any guest code runs, and one made after the call ended does nothing, so
/// a token kept past its request can never stop another request served by
/// the same VM. A token serves one call; giving it to a second call is
/// refused (`VmError::InvalidConfig`). The cancelled call returns
/// [`VmError::Cancelled`], which poisons the VM like an interrupt does.
///
/// ```no_run
/// use snapvm::{CancelToken, GuestProgram, VmConfig, VmError, VmInstance};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = VmConfig::new(GuestProgram::from_file("guest.elf")?);
/// let mut vm = VmInstance::new(&config)?;
/// let cancel = CancelToken::new();
/// let remote = cancel.clone();
/// std::thread::spawn(move || {
///     // The client went away: true if the call had not finished.
///     let stopped = remote.cancel();
///     println!("cancelled a live call: {stopped}");
/// });
/// match vm.invoke_cancellable("slow", b"", &cancel) {
///     Err(VmError::Cancelled) => { /* reset the VM before reusing it */ }
///     other => { other?; }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
pub struct CancelToken {
    state: Arc<Mutex<Token>>,
}

#[derive(Debug, Default)]
enum Token {
    /// Not given to a call yet.
    #[default]
    Unused,
    /// Cancelled before it was given to a call.
    CancelledEarly,
    /// Given to call `call` of the VM whose shared state this is.
    Bound { shared: Arc<Shared>, call: u64 },
    /// Its call ended (`cancelled`: by this token).
    Finished { cancelled: bool },
}

impl CancelToken {
    /// A token for one call.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Token> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cancels the token's call. Returns `true` if that call had not
    /// finished: it has not started yet (it will not run guest code), or it
    /// is running (it returns [`VmError::Cancelled`] unless it finishes in
    /// the moment the cancel takes to arrive — its result says which).
    /// Returns `false` if the call already ended (or was cancelled before):
    /// nothing is stopped, and no other call is touched.
    pub fn cancel(&self) -> bool {
        let mut state = self.lock();
        match &*state {
            Token::Unused => {
                *state = Token::CancelledEarly;
                true
            }
            Token::CancelledEarly | Token::Finished { .. } => false,
            Token::Bound { shared, call } => {
                let running = shared.running();
                if shared.call.load(Ordering::SeqCst) != *call {
                    return false;
                }
                let first = shared.cancelled_call.swap(*call, Ordering::SeqCst) != *call;
                shared.kick(&running, false);
                first
            }
        }
    }

    /// Whether [`Self::cancel`] stopped (or is stopping) the token's call.
    pub fn is_cancelled(&self) -> bool {
        match &*self.lock() {
            Token::Unused => false,
            Token::CancelledEarly => true,
            Token::Finished { cancelled } => *cancelled,
            Token::Bound { shared, call } => shared.cancelled_call.load(Ordering::SeqCst) == *call,
        }
    }

    /// Binds the token to the call about to start on the VM `shared`
    /// belongs to, until the returned guard is dropped (however the call
    /// ends). Fails with [`VmError::Cancelled`] if the token was cancelled
    /// already (the caller poisons the VM, as any cancel does), and with
    /// [`VmError::InvalidConfig`] if it served a call before.
    pub(crate) fn bind(&self, shared: &Arc<Shared>) -> Result<BoundCall<'_>, VmError> {
        let mut state = self.lock();
        match &*state {
            Token::Unused => {
                let call = shared.next_call.fetch_add(1, Ordering::SeqCst) + 1;
                shared.call.store(call, Ordering::SeqCst);
                *state = Token::Bound {
                    shared: Arc::clone(shared),
                    call,
                };
                Ok(BoundCall(self))
            }
            Token::CancelledEarly => {
                *state = Token::Finished { cancelled: true };
                Err(VmError::Cancelled)
            }
            Token::Bound { .. } | Token::Finished { .. } => Err(VmError::InvalidConfig {
                field: "cancel",
                reason: "a CancelToken serves one call; this one served another".into(),
            }),
        }
    }

    /// Ends the token's call: a later cancel does nothing.
    fn finish(&self) {
        let mut state = self.lock();
        let cancelled = match &*state {
            Token::Bound { shared, call } => {
                let _ = shared
                    .call
                    .compare_exchange(*call, 0, Ordering::SeqCst, Ordering::SeqCst);
                shared.cancelled_call.load(Ordering::SeqCst) == *call
            }
            Token::CancelledEarly => true,
            Token::Finished { cancelled } => *cancelled,
            Token::Unused => false,
        };
        *state = Token::Finished { cancelled };
    }
}

/// A [`CancelToken`] bound to a running call; dropping it ends the binding,
/// so no way out of the call (an error, a panic) leaves the VM's next call
/// cancellable through this token.
pub(crate) struct BoundCall<'a>(&'a CancelToken);

impl Drop for BoundCall<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}
