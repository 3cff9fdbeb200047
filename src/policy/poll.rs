//! [`PollingVm`]: a managed VM whose warm calls cost no VM exit.

use std::time::{Duration, Instant};

use super::managed::Ledger;
use super::{InvokeStats, ManagedVm, Outcome, RestorePolicy};
use crate::snapshot::{Snapshot, SnapshotError};
use crate::vm::poll::{self, HotView, PollWorker, RunEnd, Waited};
use crate::vm::{VmError, VmState};
use crate::VmInstance;

/// Shortest polling window [`PollConfig::window`] accepts.
pub const MIN_POLL_WINDOW: Duration = Duration::from_micros(1);
/// Longest polling window [`PollConfig::window`] accepts.
pub const MAX_POLL_WINDOW: Duration = Duration::from_secs(1);

/// Settings of a [`PollingVm`].
#[derive(Clone, Copy, Debug)]
pub struct PollConfig {
    window: Duration,
}

impl Default for PollConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl PollConfig {
    /// The defaults: a 1 ms window.
    pub fn new() -> Self {
        Self {
            window: Duration::from_millis(1),
        }
    }

    /// How long the guest keeps spinning for the next call after each call
    /// before it stops its vCPU (default 1 ms; between [`MIN_POLL_WINDOW`]
    /// and [`MAX_POLL_WINDOW`]). A call that arrives within the window costs
    /// no VM exit; meanwhile the spinning vCPU keeps one host core busy.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// The polling window set by [`PollConfig::window`]. (A getter beside
    /// a builder method of the same name carries what it returns in its
    /// name, as [`VmConfig::memory_size_bytes`](crate::VmConfig::memory_size_bytes)
    /// does.)
    pub fn window_duration(&self) -> Duration {
        self.window
    }

    /// The polling window.
    #[deprecated(note = "renamed `window_duration` (getters take no `get_` prefix)")]
    pub fn get_window(&self) -> Duration {
        self.window_duration()
    }
}

/// A [`ManagedVm`] in polling mode: between calls its guest keeps running
/// on a vCPU thread of its own and spins on the shared ABI page for the
/// next request, so a call that arrives while the guest is hot costs no VM
/// exit — the caller writes the request into guest memory and watches for
/// the result. After [`PollConfig::window`] without a call the guest stops
/// (one exit) and the thread sleeps; the next call wakes it.
///
/// The policy still decides after every call. A reset always happens with
/// the vCPU stopped, by the host: the guest is asked to stop and, if it
/// does not within a few milliseconds, is stopped by force (and reset in
/// full) — a guest cannot skip its own reset. With [`super::Always`] every
/// call therefore ends with a stop and a reset, and a [`ManagedVm`] is
/// cheaper; polling pays off with [`super::Never`], [`super::EveryN`] and
/// other policies that keep the VM between calls. Policies that read the
/// dirty-page counts ([`RestorePolicy::reads_dirty_pages`]) are refused: a
/// running guest's dirty log cannot be read per call.
///
/// Timeouts ([`crate::VmConfig::timeout`]) apply to each call on the wall
/// clock, whatever the VM's timeout clock; a guest that does not answer in
/// time is stopped and the call fails with [`VmError::Timeout`], at most
/// about 20 ms after its deadline (plus the time the calling thread waits
/// for a core): the VM is reset before the next call, not inside the
/// timed-out one, and a guest still inside a host function is left to
/// finish it meanwhile. Dropping a `PollingVm` stops its guest and joins
/// its thread.
///
/// The cost: while hot, the guest's vCPU keeps one core busy and the
/// caller spins on the result, so a call costs far less latency than an
/// exit but not less CPU; `docs/executor.md` has the measured trade-off.
///
/// ```no_run
/// use std::time::Duration;
/// use snapvm::policy::{EveryN, ManagedVm, PollConfig, PollingVm};
/// use snapvm::{GuestProgram, VmConfig, VmInstance};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = VmConfig::new(GuestProgram::from_file("guest.elf")?).dirty_tracking(true);
/// let ready = VmInstance::new(&config)?.snapshot()?;
/// let managed = ManagedVm::new(VmInstance::restore(&config, &ready)?, ready, EveryN(1000))?;
/// let mut vm = PollingVm::new(managed, PollConfig::new().window(Duration::from_micros(500)))?;
/// for _ in 0..1000 {
///     vm.invoke("handle", b"request")?; // no VM exit while calls keep coming
/// }
/// # Ok(()) }
/// ```
pub struct PollingVm<P: RestorePolicy, D: Send + 'static = ()> {
    holder: Holder<D>,
    ledger: Ledger<P>,
}

impl<P: RestorePolicy, D: Send + 'static> std::fmt::Debug for PollingVm<P, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollingVm")
            .field("hot", &self.holder.vm.is_none())
            .field("resets", &self.ledger.resets)
            .finish_non_exhaustive()
    }
}

/// What a call carries besides its function and input.
enum Extra<'a> {
    None,
    Cancel(&'a crate::CancelToken),
    /// Call data for the host functions (see [`PollingVm::invoke_with`]).
    Data(&'a mut (dyn std::any::Any + Send)),
}

/// Where the VM is: in the caller's hands, or with the vCPU thread.
struct Holder<D: Send + 'static> {
    /// `Some` while the vCPU thread does not run it.
    vm: Option<VmInstance<D>>,
    view: HotView,
    worker: PollWorker<crate::Features, D>,
    /// The guest's window in time-stamp-counter ticks.
    window: u64,
    /// The last request number posted.
    seq: u64,
    /// Bytes of the input buffer written by polled calls since the last
    /// reset (page-rounded), and how many of them the VM's dirty tracker
    /// knows of: the host's writes must be rewound like the guest's.
    posted_len: u64,
    noted_len: u64,
    /// Calls finished while hot, not yet counted in the VM's stats.
    polled: u64,
    last_heap: u64,
    last_garbage: Option<u64>,
    /// The VM was handed out ([`PollingVm::into_managed`]).
    released: bool,
}

impl<D: Send + 'static> Holder<D> {
    /// Tells the VM's dirty tracker about the input bytes polled calls
    /// wrote since it last heard (once per page-rounded high mark, so the
    /// record stays small however often the VM goes hot and cold).
    fn note_inputs(&mut self, vm: &mut VmInstance<D>) {
        if self.posted_len > self.noted_len {
            vm.note_input_written(self.posted_len);
            self.noted_len = self.posted_len;
        }
    }

    /// After a reset (or a grown input buffer): nothing is left to note.
    fn forget_inputs(&mut self) {
        self.posted_len = 0;
        self.noted_len = 0;
    }

    fn next_seq(&mut self) -> u64 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Takes the VM back, stopping its guest if it runs. False in the
    /// second value when the VM must be reset before guest code runs again
    /// (its run ended in an error).
    fn take(&mut self) -> (VmInstance<D>, bool) {
        if let Some(mut vm) = self.vm.take() {
            self.note_inputs(&mut vm);
            return (vm, true);
        }
        let seq = self.next_seq();
        let (vm, end) = self.worker.stop(&self.view, seq);
        self.absorb(vm, end)
    }

    /// Takes back a VM whose run ended by itself (the guest's window
    /// passed, or the vCPU thread stopped a guest that spun on), so the
    /// next call sees its state (and resets it if it was poisoned).
    fn collect(&mut self) {
        if self.vm.is_none() {
            if let Some((vm, end)) = self.worker.take() {
                let (vm, _) = self.absorb(vm, end);
                self.vm = Some(vm);
            }
        }
    }

    /// Accounts for a VM coming back from the vCPU thread.
    fn absorb(&mut self, mut vm: VmInstance<D>, end: RunEnd) -> (VmInstance<D>, bool) {
        self.note_inputs(&mut vm);
        vm.account_polled(
            std::mem::take(&mut self.polled),
            self.last_heap,
            self.last_garbage,
        );
        let clean = match end {
            RunEnd::Idle => true,
            RunEnd::Parked => false,
            RunEnd::Failed(e) => {
                vm.poison_with(&e);
                false
            }
        };
        (vm, clean)
    }
}

impl<D: Send + 'static> Drop for Holder<D> {
    fn drop(&mut self) {
        if self.vm.is_none() && !self.released {
            // Stop the guest before the worker thread is told to quit.
            drop(self.take());
        }
    }
}

impl<P: RestorePolicy, D: Send + 'static> PollingVm<P, D> {
    /// Puts `managed` in polling mode. Fails with
    /// [`VmError::InvalidConfig`] if its policy reads dirty-page counts
    /// (see the type's docs) or the window is out of range.
    pub fn new(managed: ManagedVm<P, D>, config: PollConfig) -> Result<Self, crate::Error> {
        if managed.ledger.policy.reads_dirty_pages() {
            return Err(VmError::InvalidConfig {
                field: "policy",
                reason: "polling mode cannot count dirty pages per call; \
                         use a policy whose reads_dirty_pages() is false"
                    .into(),
            }
            .into());
        }
        if !(MIN_POLL_WINDOW..=MAX_POLL_WINDOW).contains(&config.window) {
            return Err(VmError::InvalidConfig {
                field: "window",
                reason: format!(
                    "{:?} is outside {MIN_POLL_WINDOW:?}..={MAX_POLL_WINDOW:?}",
                    config.window
                ),
            }
            .into());
        }
        let ManagedVm { vm, ledger } = managed;
        let last_heap = vm.stats().heap_used;
        let holder = Holder {
            view: vm.hot_view(),
            vm: Some(vm),
            worker: PollWorker::start(config.window)?,
            window: poll::window_ticks(config.window),
            seq: 0,
            posted_len: 0,
            noted_len: 0,
            polled: 0,
            last_heap,
            last_garbage: None,
            released: false,
        };
        Ok(Self { holder, ledger })
    }

    /// Calls `name` with `input`, then applies the policy, like
    /// [`ManagedVm::invoke`]. Without an exit when the guest is hot; an
    /// input larger than the guest's input buffer takes the ordinary path
    /// once (the buffer grows).
    pub fn invoke(&mut self, name: &str, input: &[u8]) -> Result<Vec<u8>, crate::Error> {
        self.invoke_inner(name, None, input, Extra::None)
    }

    /// A typed call (the `serde` feature), like [`VmInstance::call`], then
    /// the policy as for [`Self::invoke`].
    #[cfg(feature = "serde")]
    pub fn call<In, Out>(&mut self, name: &str, input: &In) -> Result<Out, crate::Error>
    where
        In: serde::Serialize + ?Sized,
        Out: serde::de::DeserializeOwned,
    {
        crate::vm::typed_call(input, |bytes| self.invoke(name, bytes))
    }

    /// Like [`Self::invoke`], cancellable through `cancel` as
    /// [`VmInstance::invoke_cancellable`] is: never lost, never reaching
    /// another call. A cancelled call poisons the VM; the policy resets it.
    pub fn invoke_cancellable(
        &mut self,
        name: &str,
        input: &[u8],
        cancel: &crate::CancelToken,
    ) -> Result<Vec<u8>, crate::Error> {
        self.invoke_inner(name, None, input, Extra::Cancel(cancel))
    }

    /// Like [`Self::invoke`], with `call_data` for the host functions the
    /// call makes, as [`VmInstance::invoke_with`]: they see it as
    /// [`HostCaller::call_data`](crate::HostCaller::call_data). The data is
    /// borrowed from the caller's thread, so this call runs there, through
    /// exits, like a [`ManagedVm`] call: a hot guest is stopped first, as
    /// for a reset (one that does not stop within a few milliseconds is
    /// stopped by force and reset), and the next call without call data
    /// makes it hot again. Use it for the calls that need per-request data,
    /// and plain calls on the hot path.
    ///
    /// ```no_run
    /// # fn f(vm: &mut snapvm::PollingVm<snapvm::policy::Never>) -> Result<(), snapvm::Error> {
    /// struct RequestId(u64);
    /// let out = vm.invoke_with("handle", b"request", &mut RequestId(7))?;
    /// # Ok(()) }
    /// ```
    pub fn invoke_with(
        &mut self,
        name: &str,
        input: &[u8],
        call_data: &mut (dyn std::any::Any + Send),
    ) -> Result<Vec<u8>, crate::Error> {
        self.invoke_inner(name, None, input, Extra::Data(call_data))
    }

    /// The handle of exported function `name` (see [`crate::vm::Func`]).
    pub(crate) fn resolve(&self, name: &str) -> Result<crate::vm::Func, VmError> {
        let view = &self.holder.view;
        let index = view
            .function(name)
            .ok_or_else(|| VmError::UnknownFunction { name: name.into() })?;
        Ok(crate::vm::Func::new(name, index, view.function_table()))
    }

    /// Like [`Self::invoke`], for a function resolved earlier (see
    /// [`crate::vm::Func`]).
    pub(crate) fn invoke_resolved(
        &mut self,
        func: &crate::vm::Func,
        input: &[u8],
    ) -> Result<Vec<u8>, crate::Error> {
        self.invoke_inner(func.name(), Some(func), input, Extra::None)
    }

    /// Calls `name` (by `func`'s index when that is valid here).
    fn invoke_inner(
        &mut self,
        name: &str,
        func: Option<&crate::vm::Func>,
        input: &[u8],
        extra: Extra<'_>,
    ) -> Result<Vec<u8>, crate::Error> {
        self.holder.collect();
        let poisoned = self
            .holder
            .vm
            .as_ref()
            .is_some_and(|vm| vm.state() == VmState::Poisoned);
        if self.ledger.needs_reset || poisoned {
            self.reset()?;
        }
        let view = &self.holder.view;
        let resolved = func.and_then(|f| f.index_in(view.function_table()));
        let Some(index) = resolved.or_else(|| view.function(name)) else {
            return Err(VmError::UnknownFunction { name: name.into() }.into());
        };
        let start = Instant::now();
        let cancel = match extra {
            Extra::None => None,
            Extra::Cancel(token) => Some(token),
            // Host functions reach borrowed data only on this thread.
            Extra::Data(_) => return self.invoke_through_exit(name, input, start, extra),
        };
        if !self.holder.view.input_fits(input.len()) {
            let extra = cancel.map_or(Extra::None, Extra::Cancel);
            return self.invoke_through_exit(name, input, start, extra);
        }
        let _bound = match cancel.map(|token| self.holder.view.bind(token)) {
            Some(Err(VmError::Cancelled)) => {
                // Cancelled before it started: no guest code of this call
                // runs; the VM is poisoned like after any cancel.
                let (mut vm, _) = self.holder.take();
                vm.poison_with(&VmError::Cancelled);
                self.holder.vm = Some(vm);
                let (heap, garbage) = (self.holder.last_heap, self.holder.last_garbage);
                return self.settle(name, start, Err(VmError::Cancelled), heap, garbage, true);
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(bound)) => Some(bound),
            None => None,
        };
        self.invoke_posted(name, input, index, start)
    }

    /// Posts a call to the (hot) guest and waits for it.
    fn invoke_posted(
        &mut self,
        name: &str,
        input: &[u8],
        index: u64,
        start: Instant,
    ) -> Result<Vec<u8>, crate::Error> {
        let holder = &mut self.holder;
        let seq = holder.next_seq();
        let deadline = holder.view.timeout().map(|t| start + t);
        holder.worker.begin_call(seq, index, deadline);
        if let Err(e) = holder.view.post_call(index, input, holder.window, seq) {
            holder.worker.end_call();
            return Err(e.into());
        }
        holder.posted_len = holder
            .posted_len
            .max((input.len() as u64).next_multiple_of(crate::abi::PAGE_SIZE));
        if let Some(mut vm) = holder.vm.take() {
            holder.note_inputs(&mut vm);
            holder.worker.dispatch(vm);
        }
        let waited = holder.worker.wait(&holder.view, seq, deadline);
        holder.worker.end_call();
        let (result, broken) = match waited {
            Waited::Finished => {
                let read = holder.view.read_result();
                holder.last_heap = read.heap_used;
                holder.last_garbage = read.garbage;
                // A call that ends with its transaction open fails as it
                // does at `Done` on the exit path.
                let output = match holder.worker.transaction_left_open(seq) {
                    true => Err(VmError::Transaction(crate::vm::TxFault::NotEnded)),
                    false => read.output,
                };
                match output {
                    Ok(out) => {
                        holder.polled += 1;
                        (Ok(out), false)
                    }
                    Err(e) if e.poisons() => {
                        // A malformed result: stop the guest, poison it.
                        let (mut vm, _) = holder.take();
                        vm.poison_with(&e);
                        holder.vm = Some(vm);
                        (Err(e), true)
                    }
                    Err(e) => (Err(e), false),
                }
            }
            Waited::Stopped(mut vm, end) => {
                let e = match end {
                    RunEnd::Failed(e) => e,
                    RunEnd::Parked | RunEnd::Idle => VmError::PollWindowOverrun {
                        grace: poll::PARK_GRACE,
                    },
                };
                vm.poison_with(&e);
                holder.vm = Some(vm);
                (Err(e), true)
            }
            Waited::TimedOut(vm) => {
                let e = poll::timeout_error(holder.view.timeout().unwrap_or_default());
                // Without the VM, the vCPU thread still holds it (kicked):
                // the next call takes it back, and the reset follows.
                if let Some(mut vm) = vm {
                    vm.poison_with(&e);
                    holder.vm = Some(vm);
                }
                (Err(e), true)
            }
        };
        let (heap, garbage) = (holder.last_heap, holder.last_garbage);
        self.settle(name, start, result, heap, garbage, broken)
    }

    /// A call the ordinary way, through exits on this thread: one whose
    /// input needs a larger guest buffer, or that carries call data.
    fn invoke_through_exit(
        &mut self,
        name: &str,
        input: &[u8],
        start: Instant,
        extra: Extra<'_>,
    ) -> Result<Vec<u8>, crate::Error> {
        let (mut vm, clean) = self.holder.take();
        if !clean {
            self.holder.vm = Some(vm);
            self.reset()?;
            vm = self.holder.take().0;
        }
        let result = match extra {
            Extra::None => vm.invoke(name, input),
            Extra::Cancel(token) => vm.invoke_cancellable(name, input, token),
            Extra::Data(data) => vm.invoke_with(name, input, data),
        };
        self.holder.view.refresh(&vm);
        self.holder.forget_inputs();
        let stats = vm.stats();
        let broken = vm.state() == VmState::Poisoned;
        self.holder.vm = Some(vm);
        let garbage = stats.guest_garbage;
        self.settle(name, start, result, stats.heap_used, garbage, broken)
    }

    /// Applies the policy to a finished call.
    fn settle(
        &mut self,
        name: &str,
        start: Instant,
        result: Result<Vec<u8>, VmError>,
        heap_used: u64,
        guest_garbage: Option<u64>,
        broken: bool,
    ) -> Result<Vec<u8>, crate::Error> {
        let outcome = match (&result, broken) {
            (Ok(_), _) => Outcome::Success,
            (Err(_), true) => Outcome::Poisoned,
            (Err(_), false) => Outcome::Failed,
        };
        let stats = InvokeStats {
            function: name,
            outcome,
            elapsed: start.elapsed(),
            pages_dirtied: 0,
            dirty_pages_since_reset: 0,
            invocations_since_reset: 0,
            heap_used,
            heap_growth: 0,
            guest_garbage,
        };
        // A call that ran out of time returns at once: its reset waits for
        // the next call (which resets a VM the policy marked before it
        // runs anything), so it never runs past the deadline.
        let timed_out = matches!(result, Err(VmError::Timeout { .. }));
        if self.ledger.judge(stats, broken) && !timed_out {
            if let Err(e) = self.reset() {
                log::warn!(
                    target: "snapvm::policy",
                    "reset after a call to {name:?} failed, retried before the next call: {e}"
                );
            }
        }
        result.map_err(Into::into)
    }

    /// Stops the guest and resets the VM to its ready snapshot now.
    pub fn reset(&mut self) -> Result<(), SnapshotError> {
        let (mut vm, _) = self.holder.take();
        let result = self.ledger.reset(&mut vm);
        self.holder.view.refresh(&vm);
        self.holder.forget_inputs();
        self.holder.vm = Some(vm);
        result
    }

    /// The VM's host data (see [`VmInstance::data_mut`]). Host functions
    /// of a hot guest run on the vCPU thread, so this stops the guest (as
    /// a call with call data does): the next call starts it again.
    pub fn data_mut(&mut self) -> &mut D {
        let (vm, clean) = self.holder.take();
        self.ledger.needs_reset |= !clean;
        self.holder.vm.insert(vm).data_mut()
    }

    /// Resets performed so far.
    pub fn resets(&self) -> u64 {
        self.ledger.resets
    }

    /// Whether the guest is running on the vCPU thread (spinning for the
    /// next call, or about to stop).
    pub fn is_hot(&self) -> bool {
        self.holder.vm.is_none() && !self.holder.worker.has_stopped()
    }

    /// The ready snapshot resets return to.
    pub fn ready(&self) -> &Snapshot {
        &self.ledger.ready
    }

    /// Stops the guest and gives back the [`ManagedVm`] (its calls go
    /// through exits again).
    pub fn into_managed(self) -> ManagedVm<P, D> {
        let Self {
            mut holder,
            mut ledger,
        } = self;
        let (vm, clean) = holder.take();
        holder.released = true;
        drop(holder);
        ledger.needs_reset |= !clean;
        ManagedVm { vm, ledger }
    }
}
