//! Polling mode, the host side: a vCPU thread that keeps a VM's guest
//! running between calls, and the caller's view of the shared ABI page.
//!
//! After a call the guest publishes its result (`poll_done`) and spins on
//! `poll_seq` for its window (`poll_window`, in time-stamp-counter ticks);
//! the caller writes the next request into guest memory and bumps
//! `poll_seq`, then watches `poll_done`. While the guest spins, a call costs
//! no exit. When the window ends the guest stops with `Idle` and the vCPU
//! thread parks until the next call.
//!
//! Nothing here trusts the guest: the caller's deadline stops a guest that
//! never answers (through the interrupt handle), the vCPU thread's own
//! timer parks a guest that spins past its window (and poisons it), and a
//! result is checked as strictly as after `Done`.

use std::collections::HashMap;
use std::mem::offset_of;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::abi_page::{self, bad, field, ResultLimits};
use super::error::{HypercallFault, VmError};
use super::hypercall::{PollHooks, PolledCall, Watch};
use super::userfault::MemoryFault;
use super::TableId;
use super::{Extension, InterruptHandle, Stop, TimeoutClock, Vm, VmState};
use crate::abi::{self, AbiPage};
use crate::sys::clock::rdtsc;
use crate::sys::memory::GuestRam;

/// How long a stop request (`REQUEST_IDLE`) may take before the vCPU is
/// kicked instead.
const STOP_GRACE: Duration = Duration::from_millis(20);
/// How long a caller whose call ran out of time waits for the kicked vCPU
/// thread to give the VM back. Past it the call returns without the VM
/// (the thread keeps it until the guest is out; the next call takes it
/// back and resets it), so a timed-out call returns at most this long
/// after its deadline, plus the time its own thread waits for a core.
const TIMEOUT_GRACE: Duration = Duration::from_millis(20);
/// How long the vCPU thread lets a guest spin past its window before it
/// stops the guest itself (and poisons it: a guest that follows the
/// protocol stops at the window).
pub(crate) const PARK_GRACE: Duration = Duration::from_millis(50);
/// Spins on the result word before the waiting thread starts sleeping
/// between looks. Sleeping matters on a host whose cores are all busy: a
/// spinning caller would keep the vCPU thread off the core it shares until
/// the scheduler's next tick (milliseconds), while a caller that wakes from
/// a sleep preempts the spinning guest at once.
const SPINS_BEFORE_SLEEP: u32 = 4_000;
/// A call running longer than this is checked every [`LONG_CALL_NAP`].
const LONG_CALL: Duration = Duration::from_millis(2);
const LONG_CALL_NAP: Duration = Duration::from_micros(100);

/// Time-stamp-counter ticks per second, measured once against the
/// monotonic clock (about 2 ms, on first use).
fn tsc_per_second() -> u64 {
    static HZ: OnceLock<u64> = OnceLock::new();
    *HZ.get_or_init(|| {
        let (t0, c0) = clock_pair();
        while t0.elapsed() < Duration::from_millis(2) {
            std::hint::spin_loop();
        }
        let (t1, c1) = clock_pair();
        let (ns, ticks) = ((t1 - t0).as_nanos(), c1.wrapping_sub(c0));
        u64::try_from(u128::from(ticks) * 1_000_000_000 / ns.max(1)).unwrap_or(u64::MAX)
    })
}

/// A monotonic instant and the time-stamp counter read at (nearly) the
/// same moment: the counter is read before and after the clock and the
/// midpoint taken, from the narrowest of a few tries, so a thread
/// preempted between the two reads does not skew the calibration (a
/// skewed one would make every guest's window far too short or long).
fn clock_pair() -> (Instant, u64) {
    let mut best: Option<(u64, Instant, u64)> = None;
    for _ in 0..16 {
        let before = rdtsc();
        let now = Instant::now();
        let after = rdtsc();
        let width = after.wrapping_sub(before);
        if best.is_none_or(|(w, _, _)| width < w) {
            best = Some((width, now, before.wrapping_add(width / 2)));
        }
    }
    let (_, now, ticks) = best.expect("at least one try");
    (now, ticks)
}

/// `window` in the guest's time-stamp-counter ticks (at least 1: 0 would
/// turn polling off).
pub(crate) fn window_ticks(window: Duration) -> u64 {
    let ticks = u128::from(tsc_per_second()) * window.as_nanos() / 1_000_000_000;
    u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
}

/// The caller's view of a polling VM: its memory and what it needs to post
/// calls and check results while another thread runs the vCPU.
pub(crate) struct HotView {
    ram: Arc<GuestRam>,
    functions: HashMap<String, u64>,
    /// The identity of `functions` (see [`TableId`]).
    function_table: TableId,
    input_buf: u64,
    input_cap: u64,
    limits: ResultLimits,
    timeout: Option<Duration>,
    interrupt: InterruptHandle,
    /// Set when memory filled on demand could not be filled: a result read
    /// while it is set may come from a stand-in page and is refused.
    memory_fault: Option<Arc<MemoryFault>>,
}

/// A finished call as a polling caller reads it.
pub(crate) struct HotResult {
    pub(crate) output: Result<Vec<u8>, VmError>,
    pub(crate) heap_used: u64,
    pub(crate) garbage: Option<u64>,
}

impl HotView {
    /// The index of exported function `name`.
    pub(crate) fn function(&self, name: &str) -> Option<u64> {
        self.functions.get(name).copied()
    }

    /// The identity of the function table [`Self::function`] looks in.
    pub(crate) fn function_table(&self) -> TableId {
        self.function_table
    }

    /// Whether an input of `len` bytes fits the guest's input buffer.
    pub(crate) fn input_fits(&self, len: usize) -> bool {
        len as u64 <= self.input_cap
    }

    /// The VM's call timeout (measured on the wall clock here).
    pub(crate) fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Binds `token` to the call about to be posted (see
    /// [`CancelToken`](super::CancelToken)): a cancel kicks the vCPU
    /// thread, whose run then ends in `Cancelled` while this call is the
    /// token's.
    pub(crate) fn bind<'t>(
        &self,
        token: &'t super::CancelToken,
    ) -> Result<super::interrupt::BoundCall<'t>, VmError> {
        token.bind(&self.interrupt.shared)
    }

    /// Takes the input buffer and limits of `vm` (they change when it is
    /// reset or grows its buffer).
    pub(crate) fn refresh<X: Extension, D>(&mut self, vm: &Vm<X, D>) {
        self.input_buf = vm.input_buf;
        self.input_cap = vm.input_cap;
        self.ram = vm.machine.shared_ram();
        self.memory_fault = vm.memory_fault.clone();
    }

    fn store(&self, name: usize, value: u64, order: Ordering) -> Result<(), VmError> {
        self.ram
            .store_u64(field(name), value, order)
            .map_err(|e| bad("ABI page", e.into()))
    }

    fn load(&self, name: usize, order: Ordering) -> Result<u64, VmError> {
        self.ram
            .load_u64(field(name), order)
            .map_err(|e| bad("ABI page", e.into()))
    }

    /// Posts a call of function `index` with `input` as request `seq`: the
    /// input and request fields first, `poll_seq` last (release), so a
    /// guest that sees the new sequence number sees the whole request.
    pub(crate) fn post_call(
        &self,
        index: u64,
        input: &[u8],
        window: u64,
        seq: u64,
    ) -> Result<(), VmError> {
        if !self.input_fits(input.len()) {
            return Err(VmError::InputTooLarge { len: input.len() });
        }
        self.ram
            .write(self.input_buf, input)
            .map_err(|e| bad("Ready", e.into()))?;
        let relaxed = Ordering::Relaxed;
        self.store(offset_of!(AbiPage, request), abi::REQUEST_CALL, relaxed)?;
        self.store(offset_of!(AbiPage, func_index), index, relaxed)?;
        self.store(offset_of!(AbiPage, input_len), input.len() as u64, relaxed)?;
        self.store(offset_of!(AbiPage, poll_window), window, relaxed)?;
        self.store(offset_of!(AbiPage, poll_seq), seq, Ordering::Release)
    }

    /// Asks the guest to stop spinning, as request `seq`.
    pub(crate) fn post_idle(&self, seq: u64) -> Result<(), VmError> {
        self.store(
            offset_of!(AbiPage, request),
            abi::REQUEST_IDLE,
            Ordering::Relaxed,
        )?;
        self.store(offset_of!(AbiPage, poll_seq), seq, Ordering::Release)
    }

    /// Whether the guest reported request `seq` finished (acquire: its
    /// result fields are visible after this).
    fn finished(&self, seq: u64) -> bool {
        self.load(offset_of!(AbiPage, poll_done), Ordering::Acquire)
            .is_ok_and(|done| done == seq)
    }

    /// Reads the result of the finished request, checked like a result
    /// after `Done`. The guest may still be running and change its memory
    /// meanwhile: every field is read once, checked, then used.
    pub(crate) fn read_result(&self) -> HotResult {
        let report = match abi_page::read_result(&self.ram, self.limits) {
            Ok(report) => report,
            Err(e) => {
                return HotResult {
                    output: Err(e),
                    heap_used: 0,
                    garbage: None,
                }
            }
        };
        let output = report
            .output
            .and_then(|(ptr, len)| {
                self.ram
                    .read_vec(ptr, len)
                    .map_err(|e| bad("Done", e.into()))
            })
            // As after `Done`: nothing computed from a stand-in for memory
            // that could not be filled leaves the VM.
            .and_then(|output| match &self.memory_fault {
                Some(fault) => fault.check().map(|()| output),
                None => Ok(output),
            });
        HotResult {
            output,
            heap_used: report.heap_used,
            garbage: (report.garbage != abi::GARBAGE_UNREPORTED).then_some(report.garbage),
        }
    }
}

impl<X: Extension, D: Send + 'static> Vm<X, D> {
    /// The caller's view of this VM for polling mode.
    pub(crate) fn hot_view(&self) -> HotView {
        HotView {
            ram: self.machine.shared_ram(),
            functions: self.functions.clone(),
            function_table: self.function_table(),
            input_buf: self.input_buf,
            input_cap: self.input_cap,
            limits: self.result_limits(),
            timeout: self.timeout,
            interrupt: self.interrupt_handle(),
            memory_fault: self.memory_fault.clone(),
        }
    }

    /// Records the first `len` bytes of the input buffer as written by the
    /// host (polling calls write it while the vCPU thread owns the VM).
    pub(crate) fn note_input_written(&mut self, len: u64) {
        self.note_host_write(self.input_buf, len.min(self.input_cap));
    }

    /// Counts calls finished in polling mode and the guest's last report.
    pub(crate) fn account_polled(&mut self, calls: u64, heap_used: u64, garbage: Option<u64>) {
        self.stats.invocations += calls;
        self.stats.heap_used = heap_used;
        self.stats.guest_garbage = garbage;
    }

    /// Poisons this VM with `error`, whatever the error: a polling run
    /// ended in it (or a polled result was refused), so the guest stopped
    /// mid-call and must be reset before it runs again.
    pub(crate) fn poison_with(&mut self, error: &VmError) {
        if self.state != VmState::Poisoned {
            self.state = VmState::Poisoned;
            self.poison_cause = std::borrow::Cow::Owned(error.to_string());
        }
    }
}

/// How a polling run of the vCPU thread ended.
#[derive(Debug)]
pub(crate) enum RunEnd {
    /// The guest stopped by itself (`Idle`) or was asked to.
    Idle,
    /// The guest spun past its window; the thread stopped it. Poisoned.
    Parked,
    /// An error (a fault, panic, timeout, cancel); poisoned when it poisons.
    Failed(VmError),
}

enum Slot<X: Extension, D: Send + 'static> {
    Empty,
    Run(Vm<X, D>),
    Stopped(Vm<X, D>, RunEnd),
    Quit,
}

struct Shared<X: Extension, D: Send + 'static> {
    slot: Mutex<Slot<X, D>>,
    cv: Condvar,
    /// The slot holds a stopped VM (read without the lock while spinning).
    stopped: AtomicBool,
    /// A call is posted and its caller waits: the guest must run.
    busy: AtomicBool,
    /// The caller asked the guest to stop.
    stopping: AtomicBool,
    /// When the last call ended, in nanoseconds since `epoch`.
    last_ns: AtomicU64,
    epoch: Instant,
    /// How long after the last call the thread stops a guest that spins on.
    park_after: Duration,
    /// The call posted last ([`PolledCall`]): its request number (0: none
    /// yet), function index and deadline (nanoseconds since `epoch`,
    /// `u64::MAX` for none). The number is written last and read first
    /// and last, so a reader never mixes two calls.
    call_seq: AtomicU64,
    call_index: AtomicU64,
    call_deadline_ns: AtomicU64,
    /// The request number whose transaction the guest left open, 0 for
    /// none (published by the vCPU thread after each hypercall).
    tx_open_seq: AtomicU64,
}

/// The vCPU thread's answers to a polling run (see [`PollHooks`]).
struct Hooks<'a, X: Extension, D: Send + 'static>(&'a Shared<X, D>);

impl<X: Extension, D: Send + 'static> PollHooks for Hooks<'_, X, D> {
    fn watch(&mut self) -> Watch {
        self.0.watch()
    }

    fn posted(&self) -> Option<PolledCall> {
        let shared = self.0;
        loop {
            let seq = shared.call_seq.load(Ordering::SeqCst);
            if seq == 0 {
                return None;
            }
            let index = shared.call_index.load(Ordering::SeqCst);
            let deadline_ns = shared.call_deadline_ns.load(Ordering::SeqCst);
            if shared.call_seq.load(Ordering::SeqCst) == seq {
                let deadline = (deadline_ns != u64::MAX)
                    .then(|| shared.epoch + Duration::from_nanos(deadline_ns));
                return Some(PolledCall {
                    seq,
                    index,
                    deadline,
                });
            }
        }
    }

    fn transaction_open(&self, seq: Option<u64>) {
        self.0.tx_open_seq.store(seq.unwrap_or(0), Ordering::SeqCst);
    }
}

impl<X: Extension, D: Send + 'static> Shared<X, D> {
    fn lock(&self) -> MutexGuard<'_, Slot<X, D>> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The vCPU thread's timer fired: park the guest if it spun too long.
    fn watch(&self) -> Watch {
        if self.busy.load(Ordering::SeqCst) || self.stopping.load(Ordering::SeqCst) {
            return Watch::Again(self.park_after);
        }
        let idle = Duration::from_nanos(
            self.now_ns()
                .saturating_sub(self.last_ns.load(Ordering::SeqCst)),
        );
        match self.park_after.checked_sub(idle) {
            Some(left) if !left.is_zero() => Watch::Again(left),
            _ => Watch::Park,
        }
    }
}

/// The vCPU thread of a polling VM.
pub(crate) struct PollWorker<X: Extension, D: Send + 'static> {
    shared: Arc<Shared<X, D>>,
    thread: Option<JoinHandle<()>>,
}

/// What a caller waiting for its call found.
pub(crate) enum Waited<X: Extension, D: Send + 'static> {
    /// The guest published the call's result; it is still running.
    Finished,
    /// The run ended (the VM is back in the caller's hands).
    Stopped(Vm<X, D>, RunEnd),
    /// The deadline passed; the vCPU was kicked. The VM is back, or, when
    /// the thread did not give it back within [`TIMEOUT_GRACE`], `None`:
    /// the thread keeps it until its guest is out ([`PollWorker::take`]).
    TimedOut(Option<Vm<X, D>>),
}

impl<X: Extension, D: Send + 'static> PollWorker<X, D> {
    /// Starts the vCPU thread; `window` is the guest's spin window.
    pub(crate) fn start(window: Duration) -> Result<Self, VmError> {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot::Empty),
            cv: Condvar::new(),
            stopped: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            last_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            park_after: window.saturating_add(PARK_GRACE),
            call_seq: AtomicU64::new(0),
            call_index: AtomicU64::new(0),
            call_deadline_ns: AtomicU64::new(u64::MAX),
            tx_open_seq: AtomicU64::new(0),
        });
        let thread = std::thread::Builder::new()
            .name("snapvm-vcpu".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || work(&shared)
            })
            .map_err(VmError::VcpuThread)?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Hands `vm` to the vCPU thread, which resumes it.
    pub(crate) fn dispatch(&self, vm: Vm<X, D>) {
        let mut slot = self.shared.lock();
        *slot = Slot::Run(vm);
        self.shared.stopped.store(false, Ordering::SeqCst);
        self.shared.cv.notify_all();
    }

    /// Leaves a stopped VM with the thread again (see [`Self::take`]).
    fn put_back(&self, vm: Vm<X, D>, end: RunEnd) {
        let mut slot = self.shared.lock();
        *slot = Slot::Stopped(vm, end);
        self.shared.stopped.store(true, Ordering::SeqCst);
    }

    /// Marks call `seq` of function `index` as posted (before the request
    /// is written): the vCPU thread runs the call's bookkeeping from this
    /// when the guest first makes a hypercall in it.
    pub(crate) fn begin_call(&self, seq: u64, index: u64, deadline: Option<Instant>) {
        let shared = &self.shared;
        shared.busy.store(true, Ordering::SeqCst);
        let deadline_ns = deadline.map_or(u64::MAX, |d| {
            u64::try_from(d.saturating_duration_since(shared.epoch).as_nanos())
                .unwrap_or(u64::MAX - 1)
        });
        // Invalidate first, so a reader never pairs the new fields with
        // the previous number.
        shared.call_seq.store(0, Ordering::SeqCst);
        shared.call_index.store(index, Ordering::SeqCst);
        shared.call_deadline_ns.store(deadline_ns, Ordering::SeqCst);
        shared.call_seq.store(seq, Ordering::SeqCst);
    }

    /// Whether the guest answered call `seq` with its transaction still
    /// open (the exit path's `TxFault::NotEnded`). Read after the guest
    /// published the answer: the vCPU thread published the transaction's
    /// state before it resumed the guest.
    pub(crate) fn transaction_left_open(&self, seq: u64) -> bool {
        seq != 0 && self.shared.tx_open_seq.load(Ordering::SeqCst) == seq
    }

    /// Marks the call as over: the guest's idle time starts now.
    pub(crate) fn end_call(&self) {
        self.shared
            .last_ns
            .store(self.shared.now_ns(), Ordering::SeqCst);
        self.shared.busy.store(false, Ordering::SeqCst);
    }

    /// Whether the thread stopped and holds the VM.
    pub(crate) fn has_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::SeqCst)
    }

    /// Takes the VM back if the thread stopped with it.
    pub(crate) fn take(&self) -> Option<(Vm<X, D>, RunEnd)> {
        if !self.shared.stopped.load(Ordering::SeqCst) {
            return None;
        }
        let mut slot = self.shared.lock();
        match std::mem::replace(&mut *slot, Slot::Empty) {
            Slot::Stopped(vm, end) => {
                self.shared.stopped.store(false, Ordering::SeqCst);
                Some((vm, end))
            }
            other => {
                *slot = other;
                None
            }
        }
    }

    /// Waits for the thread to stop, kicking the vCPU every millisecond.
    fn take_by_force(&self, view: &HotView) -> (Vm<X, D>, RunEnd) {
        loop {
            if let Some(taken) = self.take_by_force_until(view, None) {
                return taken;
            }
        }
    }

    /// [`Self::take_by_force`] until `until` at most: `None` when the
    /// thread still runs the guest then (kicked: it stops when it next
    /// gets a core).
    fn take_by_force_until(
        &self,
        view: &HotView,
        until: Option<Instant>,
    ) -> Option<(Vm<X, D>, RunEnd)> {
        loop {
            if let Some(taken) = self.take() {
                return Some(taken);
            }
            let left = match until {
                Some(until) => match until.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left.min(Duration::from_millis(1)),
                    _ => return None,
                },
                None => Duration::from_millis(1),
            };
            view.interrupt.interrupt();
            let slot = self.shared.lock();
            if !self.shared.stopped.load(Ordering::SeqCst) {
                drop(
                    self.shared
                        .cv
                        .wait_timeout(slot, left)
                        .unwrap_or_else(|e| e.into_inner()),
                );
            }
        }
    }

    /// Waits until the guest finished request `seq`, the run ended, or
    /// `deadline` passed. A guest that stopped by itself before it saw the
    /// request is resumed.
    pub(crate) fn wait(&self, view: &HotView, seq: u64, deadline: Option<Instant>) -> Waited<X, D> {
        let mut spins = 0u32;
        let start = Instant::now();
        let mut nap = Duration::from_micros(1);
        loop {
            if view.finished(seq) {
                return Waited::Finished;
            }
            if let Some((vm, end)) = self.take() {
                if !matches!(end, RunEnd::Idle) {
                    return Waited::Stopped(vm, end);
                }
                if view.finished(seq) {
                    // Answered, then stopped: the next call takes it.
                    self.put_back(vm, end);
                    return Waited::Finished;
                }
                // Stopped just before the request arrived: resume it.
                self.dispatch(vm);
            }
            spins = spins.saturating_add(1);
            let sleeping = spins >= SPINS_BEFORE_SLEEP;
            // The clock is read every 64 looks while spinning, and at every
            // look once sleeping: on a busy host a nap can last
            // milliseconds, and the deadline must not wait for 64 of them.
            if sleeping || spins % 64 == 0 {
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    return self.time_out(view, now);
                }
                if now.duration_since(start) > LONG_CALL {
                    // A long call: look less often.
                    nap = LONG_CALL_NAP;
                }
            }
            if sleeping {
                std::thread::sleep(nap);
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// The call ran out of time (noticed at `now`): kicks the vCPU and
    /// waits for the VM at most [`TIMEOUT_GRACE`].
    fn time_out(&self, view: &HotView, now: Instant) -> Waited<X, D> {
        match self.take_by_force_until(view, Some(now + TIMEOUT_GRACE)) {
            // It finished or failed on its own meanwhile.
            Some((vm, RunEnd::Failed(e))) if !matches!(e, VmError::Cancelled) => {
                Waited::Stopped(vm, RunEnd::Failed(e))
            }
            Some((vm, _)) => Waited::TimedOut(Some(vm)),
            None => Waited::TimedOut(None),
        }
    }

    /// Stops the guest and takes the VM back: asks it to stop
    /// (`REQUEST_IDLE` as request `seq`), and kicks the vCPU if it did
    /// not within [`STOP_GRACE`]. Returns the VM and how its run ended.
    pub(crate) fn stop(&self, view: &HotView, seq: u64) -> (Vm<X, D>, RunEnd) {
        if let Some(taken) = self.take() {
            return taken;
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        let asked = view.post_idle(seq).is_ok();
        let until = Instant::now() + STOP_GRACE;
        let taken = loop {
            if let Some(taken) = self.take() {
                break taken;
            }
            if !asked || Instant::now() >= until {
                break self.take_by_force(view);
            }
            std::thread::yield_now();
        };
        self.shared.stopping.store(false, Ordering::SeqCst);
        taken
    }
}

impl<X: Extension, D: Send + 'static> Drop for PollWorker<X, D> {
    fn drop(&mut self) {
        {
            let mut slot = self.shared.lock();
            // The owner stopped the guest first; a VM left here is dropped.
            *slot = Slot::Quit;
            self.shared.cv.notify_all();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The vCPU thread: runs each VM it is handed until the guest stops, the
/// thread's timer parks it, or the run fails; then hands it back.
fn work<X: Extension, D: Send + 'static>(shared: &Shared<X, D>) {
    loop {
        let mut vm = {
            let mut slot = shared.lock();
            loop {
                match std::mem::replace(&mut *slot, Slot::Empty) {
                    Slot::Run(vm) => break vm,
                    Slot::Quit => return,
                    other => {
                        *slot = other;
                        slot = shared.cv.wait(slot).unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
        };
        let end = loop {
            match vm.run_polling(shared.park_after, &mut Hooks(shared)) {
                Ok(Stop::Idle | Stop::Done) => {
                    // A call posted while the guest decided to stop: go on.
                    // (Pairs with the caller's `busy` store and `stopped`
                    // load: one of the two sides sees the other.)
                    fence(Ordering::SeqCst);
                    if shared.busy.load(Ordering::SeqCst) && !shared.stopping.load(Ordering::SeqCst)
                    {
                        continue;
                    }
                    break RunEnd::Idle;
                }
                Ok(Stop::Parked) => {
                    let error = VmError::PollWindowOverrun { grace: PARK_GRACE };
                    vm.poison_with(&error);
                    break RunEnd::Parked;
                }
                Ok(Stop::Ready) => {
                    break RunEnd::Failed(bad(
                        "Ready",
                        HypercallFault::OutOfSequence("Ready after init"),
                    ))
                }
                Err(e) => break RunEnd::Failed(e),
            }
        };
        let mut slot = shared.lock();
        if matches!(*slot, Slot::Quit) {
            return;
        }
        *slot = Slot::Stopped(vm, end);
        shared.stopped.store(true, Ordering::SeqCst);
        shared.cv.notify_all();
    }
}

/// The error a polling call that ran out of time gets.
pub(crate) fn timeout_error(limit: Duration) -> VmError {
    VmError::Timeout {
        limit,
        clock: TimeoutClock::Wall,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calibration agrees with the monotonic clock over a longer
    /// interval than it measured (within 5 %, loose for a loaded host:
    /// the pairing keeps the error per read to a few microseconds).
    #[test]
    fn the_tsc_calibration_matches_the_clock() {
        let hz = tsc_per_second();
        assert!((100_000_000..20_000_000_000).contains(&hz), "{hz} Hz");
        let (t0, c0) = clock_pair();
        std::thread::sleep(Duration::from_millis(50));
        let (t1, c1) = clock_pair();
        let measured = c1.wrapping_sub(c0) as f64 / (t1 - t0).as_secs_f64();
        let ratio = measured / hz as f64;
        assert!((0.95..1.05).contains(&ratio), "ratio {ratio}");
        assert!(window_ticks(Duration::from_millis(10)) > window_ticks(Duration::from_millis(1)));
        assert_eq!(window_ticks(Duration::ZERO), 1);
    }
}
